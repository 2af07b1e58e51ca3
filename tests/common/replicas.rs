//! Several replicas of one sandboxd (src/sandbox/replicas.rs): the same instance, secret,
//! workspaces and fresh PostgreSQL database (on the server SANDBOXD_TEST_POSTGRES_URL names,
//! required: these tests never fall back to SQLite), in front of the one host engine. Replicas
//! run in this process (`spawn_replicas`) or as a `sandboxd serve` child that a test can
//! SIGKILL (`Replicas::spawn_process`). Everything the instance made is removed on drop.

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sandboxd::auth::Auth;
use sandboxd::config::Config;
use sandboxd::sandbox::Manager;
use sandboxd::startup::{self, Running};
use sandboxd::store::EventRow;
use sandboxd::user::UserId;

use super::{
    cleanup_instance, containers_of, gate, instance_name, postgres_db, require_docker, test_table,
    TestDb, SECRET,
};

/// The PostgreSQL server of the replica tests; fails loudly without one.
pub fn postgres_url() -> String {
    match std::env::var("SANDBOXD_TEST_POSTGRES_URL") {
        Ok(u) if u.starts_with("postgres") => u,
        _ => panic!(
            "SANDBOXD_TEST_POSTGRES_URL must name a PostgreSQL server for the replica tests \
             (bash scripts/ensure-postgres.sh | tail -1 prints one)"
        ),
    }
}

pub struct Replicas {
    pub instance: String,
    /// In-process replicas; `None` once stopped or dropped.
    pub apps: Vec<Option<Running>>,
    pub bases: Vec<String>,
    pub client: reqwest::Client,
    /// The configuration every replica runs with.
    pub table: toml::Table,
    auth: Auth,
    dir: tempfile::TempDir,
    // Dropped after the replicas (fields drop in order): the database goes last.
    _db: TestDb,
    _gate: gate::Shared,
}

/// `n` replicas started one after the other (the first runs the migrations).
pub async fn spawn_replicas(n: usize, tweak: impl FnOnce(&mut toml::Table)) -> Replicas {
    require_docker();
    let url = postgres_url();
    let gate = gate::shared().await;
    let dir = tempfile::tempdir().unwrap();
    let instance = instance_name();
    let db = postgres_db(&url).await;
    let mut table = test_table(&instance, dir.path(), &db.url);
    tweak(&mut table);
    let mut r = Replicas {
        instance,
        apps: vec![],
        bases: vec![],
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .unwrap(),
        table,
        auth: Auth::new(SECRET.as_bytes()),
        dir,
        _db: db,
        _gate: gate,
    };
    for _ in 0..n {
        r.add().await;
    }
    r
}

impl Replicas {
    /// Starts one more in-process replica; returns its index.
    pub async fn add(&mut self) -> usize {
        let cfg = Config::from_table(self.table.clone()).expect("test config is valid");
        let running = startup::build(cfg).await.expect("replica starts");
        self.bases.push(format!(
            "http://{}",
            running.http_addr.expect("http listener")
        ));
        self.apps.push(Some(running));
        self.apps.len() - 1
    }

    pub fn mgr(&self, i: usize) -> &Arc<Manager> {
        self.apps[i].as_ref().expect("replica is running").manager()
    }

    pub fn token(&self, user: &str) -> String {
        self.auth
            .issue(&UserId::parse(user).unwrap(), Duration::from_secs(3600))
            .unwrap()
    }

    pub async fn post(&self, base: &str, user: &str, path: &str) -> reqwest::Response {
        self.client
            .post(format!("{base}{path}"))
            .bearer_auth(self.token(user))
            .json(&serde_json::json!({}))
            .send()
            .await
            .unwrap()
    }

    pub async fn get(&self, base: &str, user: &str, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{base}{path}"))
            .bearer_auth(self.token(user))
            .send()
            .await
            .unwrap()
    }

    /// The user's sandbox state as replica `base` reports it (`None` without a sandbox).
    pub async fn state(&self, base: &str, user: &str) -> Option<String> {
        let r = self.get(base, user, "/sandbox/status").await;
        if r.status() == 404 {
            return None;
        }
        assert_eq!(r.status(), 200, "status {user} through {base}");
        let v: serde_json::Value = r.json().await.unwrap();
        v["state"].as_str().map(str::to_owned)
    }

    /// The user's session state as the store has it (reading it is no activity, unlike a
    /// status request).
    pub async fn stored_state(&self, user: &str) -> Option<String> {
        let mgr = self
            .apps
            .iter()
            .flatten()
            .next()
            .expect("a replica is running")
            .manager();
        mgr.store()
            .session(&UserId::parse(user).unwrap())
            .await
            .unwrap()
            .map(|s| s.state)
    }

    /// The user's history (shared by every replica), oldest first.
    pub async fn events(&self, user: &str) -> Vec<EventRow> {
        let mgr = self
            .apps
            .iter()
            .flatten()
            .next()
            .expect("a replica is running")
            .manager();
        let mut ev = mgr
            .store()
            .events(&UserId::parse(user).unwrap(), 1000)
            .await
            .unwrap();
        ev.reverse();
        ev
    }

    pub async fn count_events(&self, user: &str, kind: &str) -> usize {
        self.events(user)
            .await
            .iter()
            .filter(|e| e.kind == kind)
            .count()
    }

    /// The instance's containers (all states).
    pub fn containers(&self) -> Vec<String> {
        containers_of(&self.instance)
    }

    /// Which in-process replica leads, waiting up to `within` for one to.
    pub async fn leader(&self, within: Duration) -> Option<usize> {
        let until = Instant::now() + within;
        loop {
            let leaders: Vec<usize> = (0..self.apps.len())
                .filter(|&i| {
                    self.apps[i]
                        .as_ref()
                        .is_some_and(|a| a.manager().replicas().is_leader())
                })
                .collect();
            assert!(leaders.len() <= 1, "two leaders at once: {leaders:?}");
            if let Some(&l) = leaders.first() {
                return Some(l);
            }
            if Instant::now() >= until {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Drops replica `i` without a graceful shutdown (its tasks are aborted, its database
    /// connections close).
    pub fn kill(&mut self, i: usize) {
        self.apps[i].take();
    }

    /// A replica as a `sandboxd serve` child process (JSON logs), for SIGKILL.
    pub fn spawn_process(&self) -> ProcessReplica {
        let mut table = self.table.clone();
        table.insert("log_format".into(), "json".into());
        let path = self
            .dir
            .path()
            .join(format!("replica-{}.toml", uuid::Uuid::new_v4().simple()));
        std::fs::write(&path, toml::to_string(&table).unwrap()).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sandboxd"));
        for (k, _) in std::env::vars() {
            if k.starts_with("SANDBOXD_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("SANDBOXD_LOG", "info")
            .arg("--config")
            .arg(&path)
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("sandboxd serve");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut p = ProcessReplica {
            child,
            lines: rx,
            seen: vec![],
            base: String::new(),
        };
        let addr = p
            .wait_for(Duration::from_secs(60), |v| {
                v["message"]
                    .as_str()
                    .and_then(|m| m.strip_prefix("listening on http://"))
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| panic!("no listening line; stderr: {:#?}", p.seen));
        p.base = format!("http://{addr}");
        p
    }
}

impl Drop for Replicas {
    fn drop(&mut self) {
        self.apps.clear();
        cleanup_instance(&self.instance);
    }
}

/// A replica running as a child process; killed on drop.
pub struct ProcessReplica {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    pub seen: Vec<String>,
    pub base: String,
}

impl ProcessReplica {
    /// Reads log lines (JSON) until `pick` returns something or `within` ends.
    pub fn wait_for<T>(
        &mut self,
        within: Duration,
        mut pick: impl FnMut(&serde_json::Value) -> Option<T>,
    ) -> Option<T> {
        let until = Instant::now() + within;
        loop {
            let left = until.checked_duration_since(Instant::now())?;
            let line = self.lines.recv_timeout(left).ok()?;
            self.seen.push(line.clone());
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if let Some(t) = pick(&v) {
                    return Some(t);
                }
            }
        }
    }

    pub fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ProcessReplica {
    fn drop(&mut self) {
        self.sigkill();
    }
}
