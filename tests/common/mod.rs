//! Shared test harness: `spawn_app()` runs the real server on port 0 against the real Docker
//! engine and a real database, with everything randomised (instance name = container name
//! prefix and label, network, workspace folder, database). Containers and the network are
//! removed by label when the `TestApp` drops, even when the test panicked.
#![allow(dead_code)]

pub mod gate;
pub mod openapi;
pub mod preview;
pub mod replicas;
pub mod ws;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use sandboxd::auth::Auth;
use sandboxd::config::Config;
use sandboxd::startup::{self, Running};
use sandboxd::user::UserId;

pub const SECRET: &str = "test-secret-0123456789abcdef";

pub fn image() -> String {
    std::env::var("SANDBOXD_TEST_IMAGE").unwrap_or_else(|_| "sandboxd-sandbox:latest".into())
}

/// Fails loudly when the engine is not there: these tests never skip.
pub fn require_docker() {
    let out = Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .expect("the docker CLI is required for integration tests (run scripts/test)");
    assert!(
        out.status.success(),
        "the Docker engine is required for integration tests and is not answering: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("docker")
        .args(["image", "inspect", &image()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the sandbox image {} is missing: run scripts/test (or sandboxd image build)",
        image()
    );
}

pub struct TestDb {
    pub url: String,
    admin_url: Option<String>,
    name: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

/// SQLite in a temporary folder, or a fresh PostgreSQL database when
/// SANDBOXD_TEST_DATABASE_URL is a postgres:// URL.
pub async fn test_db() -> TestDb {
    match std::env::var("SANDBOXD_TEST_DATABASE_URL") {
        Ok(url) if url.starts_with("postgres") => postgres_db(&url).await,
        _ => sqlite_db(),
    }
}

pub fn sqlite_db() -> TestDb {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    TestDb {
        url,
        admin_url: None,
        name: None,
        _dir: Some(dir),
    }
}

pub async fn postgres_db(admin_url: &str) -> TestDb {
    use sqlx::Connection;
    let name = format!("sbt_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(admin_url)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL is required at {admin_url}: {e}"));
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .unwrap();
    let base = admin_url.rsplit_once('/').map(|(b, _)| b).unwrap();
    TestDb {
        url: format!("{base}/{name}"),
        admin_url: Some(admin_url.to_owned()),
        name: Some(name),
        _dir: None,
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let (Some(admin), Some(name)) = (self.admin_url.clone(), self.name.clone()) {
            // Drop runs outside the runtime: use a small one of our own.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    use sqlx::Connection;
                    if let Ok(mut c) = sqlx::PgConnection::connect(&admin).await {
                        let _ =
                            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                                .execute(&mut c)
                                .await;
                    }
                });
            })
            .join();
        }
    }
}

pub struct TestApp {
    pub addr: std::net::SocketAddr,
    pub https_addr: Option<std::net::SocketAddr>,
    pub base: String,
    pub instance: String,
    pub workspaces: PathBuf,
    pub certs: PathBuf,
    pub running: Option<Running>,
    pub client: reqwest::Client,
    pub db: TestDb,
    auth: Auth,
    _dir: tempfile::TempDir,
    /// The test's place beside the others (tests/common/gate.rs); `None` when the test holds
    /// `Alone`. Dropped after `drop` has removed what the instance made.
    _gate: Option<gate::Shared>,
}

pub fn instance_name() -> String {
    format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..10])
}

/// Configuration for a test app: port 0, unique instance, temporary folders.
pub fn test_table(instance: &str, dir: &std::path::Path, db_url: &str) -> toml::Table {
    let mut t = toml::Table::new();
    let mut set = |k: &str, v: toml::Value| {
        t.insert(k.to_owned(), v);
    };
    set("http_addr", "127.0.0.1:0".into());
    set("metrics_addr", "127.0.0.1:0".into());
    set("instance", instance.into());
    set("database_url", db_url.into());
    set(
        "workspaces_dir",
        dir.join("workspaces").display().to_string().into(),
    );
    set("certs_dir", dir.join("certs").display().to_string().into());
    set("auth_secret", SECRET.into());
    set("image", image().into());
    set("stop_timeout", "1s".into());
    // No boot CPU boost unless a test asks for it (tests/it/boot_quota.rs): the others read the
    // configured quota from containers that are still booting.
    set("boot_cpus", 0.0.into());
    t
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Starts a test app that may run beside other tests' (tests/common/gate.rs).
pub async fn spawn_app_with(tweak: impl FnOnce(&mut toml::Table)) -> TestApp {
    let gate = gate::shared().await;
    start(Some(gate), tweak).await
}

/// Starts a test app for a test that holds `Alone` and so runs by itself.
pub async fn spawn_app_alone(
    _alone: &gate::Alone,
    tweak: impl FnOnce(&mut toml::Table),
) -> TestApp {
    start(None, tweak).await
}

/// With `SANDBOXD_TEST_LOG` set (a `tracing` filter, e.g. `sandboxd::preview=debug`), the
/// servers this test binary runs log to the test's output (shown for a failing test).
fn init_test_log() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Ok(filter) = std::env::var("SANDBOXD_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
    });
}

async fn start(gate: Option<gate::Shared>, tweak: impl FnOnce(&mut toml::Table)) -> TestApp {
    require_docker();
    init_test_log();
    let dir = tempfile::tempdir().unwrap();
    let instance = instance_name();
    let db = test_db().await;
    let mut table = test_table(&instance, dir.path(), &db.url);
    tweak(&mut table);
    let cfg = Config::from_table(table).expect("test config is valid");
    let running = startup::build(cfg).await.expect("server starts");
    let addr = running.http_addr.expect("http listener");
    TestApp {
        addr,
        https_addr: running.https_addr,
        base: format!("http://{addr}"),
        workspaces: dir.path().join("workspaces"),
        certs: dir.path().join("certs"),
        instance,
        running: Some(running),
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .unwrap(),
        db,
        auth: Auth::new(SECRET.as_bytes()),
        _dir: dir,
        _gate: gate,
    }
}

impl TestApp {
    pub fn token(&self, user: &str) -> String {
        self.auth
            .issue(&UserId::parse(user).unwrap(), Duration::from_secs(3600))
            .unwrap()
    }

    /// Every answer through `post` and `get` is checked against docs/openapi.json.
    pub async fn post(&self, user: &str, path: &str, body: serde_json::Value) -> reqwest::Response {
        let r = self
            .client
            .post(format!("{}{path}", self.base))
            .bearer_auth(self.token(user))
            .json(&body)
            .send()
            .await
            .unwrap();
        openapi::checked("POST", path, r).await
    }

    pub async fn get(&self, user: &str, path: &str) -> reqwest::Response {
        let r = self
            .client
            .get(format!("{}{path}", self.base))
            .bearer_auth(self.token(user))
            .send()
            .await
            .unwrap();
        openapi::checked("GET", path, r).await
    }

    pub async fn init(&self, user: &str) -> serde_json::Value {
        let r = self
            .post(user, "/sandbox/init", serde_json::json!({}))
            .await;
        let status = r.status();
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(status, 200, "init {user}: {body}");
        body
    }

    pub async fn execute(&self, user: &str, body: serde_json::Value) -> serde_json::Value {
        let r = self.post(user, "/sandbox/execute", body).await;
        let status = r.status();
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(status, 200, "execute {user}: {body}");
        body
    }

    /// The server's sandbox manager, for the transitions a test drives directly (the idle
    /// policy's pause and stop).
    pub fn mgr(&self) -> &std::sync::Arc<sandboxd::sandbox::Manager> {
        self.running.as_ref().unwrap().manager()
    }

    /// Ids of this instance's containers, as Docker reports them (all states).
    pub fn containers(&self) -> Vec<String> {
        containers_of(&self.instance)
    }

    pub async fn shutdown(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}

/// A loopback port that was free a moment ago, for a server this test starts as another
/// process (its own configuration cannot take port 0 and report back).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn containers_of(instance: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--no-trunc",
            "--filter",
            &format!("label=sandboxd.instance={instance}"),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

pub fn docker_inspect(id: &str) -> serde_json::Value {
    let out = Command::new("docker")
        .args(["inspect", id])
        .output()
        .unwrap();
    assert!(out.status.success(), "docker inspect {id}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v[0].clone()
}

/// Removes every container and the network of an instance.
pub fn cleanup_instance(instance: &str) {
    let ids = containers_of(instance);
    if !ids.is_empty() {
        let _ = Command::new("docker")
            .arg("rm")
            .arg("-f")
            .args(&ids)
            .output();
    }
    let _ = Command::new("docker")
        .args(["network", "rm", &format!("{instance}-net")])
        .output();
    // The instance's packet-filter chains (src/sandbox/firewall.rs).
    let _ = sandboxd::sandbox::firewall::remove(instance);
}

impl Drop for TestApp {
    fn drop(&mut self) {
        // Stop serving first (the runtime may be gone; dropping the handles is enough), then
        // remove everything the instance made.
        self.running.take();
        cleanup_instance(&self.instance);
        // Workspaces are owned by uid 1000 and may hold files the sandbox made; the TempDir
        // removal runs as root and handles them.
    }
}
