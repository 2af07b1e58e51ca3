//! The benchmarks themselves, in phases that each run their own sandboxd:
//! A (proxy, execute, terminal, idle connections; sandboxes unthrottled so the app is not the
//! bottleneck), B1 (cold first hits, wake from paused, 20 users at once, memory per paused
//! sandbox; idle pause after 1 s), B2 (wake from stopped; idle stop after 1 s), C (1,000
//! tracked sandboxes adopted at start-up).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::chown;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use bollard::container::{
    CreateContainerOptions, InspectContainerOptions, ListContainersOptions, RemoveContainerOptions,
    StartContainerOptions, StopContainerOptions,
};
use bollard::Docker;
use futures_util::{stream, SinkExt, StreamExt};
use hyper::Method;
use sandboxd::config::Config;
use sandboxd::sandbox::testing::{Engine, ExecOutput, ExecSpec};
use sandboxd::user::UserId;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::http::{self, Api};
use crate::report::{ms, Breakdown, Fact, ProxyRow, Report, TimedRow, FLOOR_COLD, FLOOR_WAKE};
use crate::stats::{median, summarize};
use crate::sys::{self, Proc};
use crate::wrk::{Wrk, WrkResult};
use crate::{peers, Opts};

const PREVIEW_DOMAIN: &str = "preview.localhost";
const LISTEN_FILE: &str = ".bench-listen";
const SMALL_BODY: usize = 6;
const BIG_BODY: usize = 1 << 20;
const LOAD_CONNS: u32 = 32;
/// Phase A: sandboxes unthrottled, so that the app is not what limits the proxy.
const PHASE_A_ENV: &[(&str, &str)] = &[
    ("SANDBOXD_CPUS", "2"),
    ("SANDBOXD_MEMORY_MB", "1024"),
    ("SANDBOXD_NOFILE_LIMIT", "16384"),
];

/// The app every sandbox serves on 5173: a small response, 1 MiB, and WebSocket upgrades that
/// are accepted and then left idle. It writes when its process started and when it began to
/// listen (wall-clock ms), so cold starts can be split into phases.
const SERVER_JS: &str = r#"'use strict';
const http = require('http');
const crypto = require('crypto');
const fs = require('fs');
const big = Buffer.alloc(1 << 20, 120);
const server = http.createServer((q, s) => {
  if (q.url === '/1m') {
    s.writeHead(200, {'content-type': 'application/octet-stream', 'content-length': big.length});
    return s.end(big);
  }
  s.writeHead(200, {'content-type': 'text/plain', 'content-length': 6});
  s.end('hello\n');
});
server.on('upgrade', (q, sock) => {
  sock.on('error', () => {});
  const accept = crypto.createHash('sha1')
    .update((q.headers['sec-websocket-key'] || '') + '258EAFA5-E914-47DA-95CA-C5AB0DC85B11')
    .digest('base64');
  sock.write('HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n' +
    'Sec-WebSocket-Accept: ' + accept + '\r\n\r\n');
});
server.listen(5173, '0.0.0.0', () => {
  fs.writeFileSync('/workspace/.bench-listen',
    JSON.stringify({origin: performance.timeOrigin, listen: Date.now()}));
});
"#;

struct Sizes {
    rounds: usize,
    load_secs: f64,
    single_secs: f64,
    warm_secs: f64,
    wake_runs: usize,
    npm_runs: usize,
    crowd: usize,
    exec_runs: usize,
    keys: usize,
    idle_conns: usize,
    tracked: usize,
}

struct Server {
    proc: Proc,
    api: Api,
}

struct Insp {
    status: String,
    created_ms: f64,
    started_ms: f64,
    ip: Option<IpAddr>,
}

pub struct Ctx {
    opts: Opts,
    pids: PathBuf,
    ws: PathBuf,
    secret: String,
    http: SocketAddr,
    https: SocketAddr,
    docker: Docker,
    engine: Engine,
    pub report: Report,
    server: Option<Server>,
    n: Sizes,
    nofile: u64,
}

fn free_port() -> Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as f64 / 1000.0)
        .unwrap_or(0.0)
}

fn rfc3339_ms(s: Option<&str>) -> f64 {
    s.and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        .map(|d| d.timestamp_micros() as f64 / 1000.0)
        .unwrap_or(f64::NAN)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads a response head; (status, content-length, bytes after the head).
async fn read_head(s: &mut TcpStream) -> Result<(u16, usize, usize)> {
    let mut buf = Vec::with_capacity(1024);
    let mut tmp = [0u8; 4096];
    loop {
        let n = s.read(&mut tmp).await?;
        if n == 0 {
            bail!("connection closed before the response head");
        }
        buf.extend_from_slice(&tmp[..n]);
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .context("status line")?;
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            return Ok((status, len, buf.len() - i - 4));
        }
        if buf.len() > 64 * 1024 {
            bail!("response head too large");
        }
    }
}

/// How many of the connections are still open (no EOF or error seen).
fn count_open(conns: &[TcpStream]) -> usize {
    conns
        .iter()
        .filter(|s| {
            let mut b = [0u8; 1];
            matches!(s.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        })
        .count()
}

fn med(v: &[WrkResult]) -> WrkResult {
    let pick = |f: fn(&WrkResult) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
    WrkResult {
        rps: pick(|r| r.rps),
        p50_us: pick(|r| r.p50_us),
        p99_us: pick(|r| r.p99_us),
        requests: v.iter().map(|r| r.requests).sum(),
        errors: v.iter().map(|r| r.errors).sum(),
    }
}

impl Ctx {
    pub async fn new(opts: Opts, nofile: u64) -> Result<Ctx> {
        let work = &opts.work;
        for d in ["pids", "ws", "db", "certs", "logs"] {
            std::fs::create_dir_all(work.join(d))?;
        }
        let docker = Docker::connect_with_local_defaults()?
            .negotiate_version()
            .await?;
        let engine = Engine::connect().await?;
        let n = if opts.quick {
            Sizes {
                rounds: 1,
                load_secs: 2.0,
                single_secs: 1.0,
                warm_secs: 1.0,
                wake_runs: 5,
                npm_runs: 3,
                crowd: 5,
                exec_runs: 10,
                keys: 50,
                idle_conns: 500,
                tracked: 100,
            }
        } else {
            Sizes {
                rounds: 3,
                load_secs: 4.0,
                single_secs: 2.0,
                warm_secs: 1.0,
                wake_runs: 20,
                npm_runs: 10,
                crowd: 20,
                exec_runs: 30,
                keys: 200,
                idle_conns: 5000,
                tracked: 1000,
            }
        };
        Ok(Ctx {
            pids: work.join("pids"),
            ws: work.join("ws"),
            secret: format!("{:032x}", rand::random::<u128>()),
            http: free_port()?,
            https: free_port()?,
            docker,
            engine,
            report: Report {
                date: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
                command: opts.command.clone(),
                setup_s: opts.setup_secs,
                ..Default::default()
            },
            server: None,
            n,
            nofile,
            opts,
        })
    }

    fn note_err(&mut self, what: &str, r: Result<()>) {
        if let Err(e) = r {
            eprintln!("sandboxd-bench: {what} failed: {e:#}");
            self.report.errors.push(format!("{what}: {e:#}"));
        }
    }

    fn step(&self, what: &str) {
        eprintln!("[bench] {what}");
    }

    pub async fn run_all(&mut self) -> Result<()> {
        self.collect_machine();
        if ["proxy", "exec", "terminal", "idle"]
            .iter()
            .any(|g| self.opts.wants(g))
        {
            let r = self.phase_a().await;
            self.note_err("phase A (proxy, execute, terminal, idle connections)", r);
            self.stop_server().await;
        }
        if self.opts.wants("wake") {
            let r = self.phase_b().await;
            self.note_err("phase B (cold start and wake)", r);
            self.stop_server().await;
        }
        if self.opts.wants("tracked") {
            let r = self.phase_c().await;
            self.note_err("phase C (tracked sandboxes)", r);
            self.stop_server().await;
        }
        Ok(())
    }

    fn collect_machine(&mut self) {
        let r = &mut self.report;
        r.machine = vec![
            ("CPU".into(), sys::cpu_model()),
            ("cores (nproc)".into(), sys::nproc().to_string()),
            (
                "memory".into(),
                format!("{:.1} GiB", sys::meminfo_kib("MemTotal") as f64 / 1048576.0),
            ),
            ("kernel".into(), sys::kernel()),
            ("load average at start".into(), sys::loadavg()),
        ];
        let mut rev = sys::first_line(
            "git",
            &[
                "-C",
                &self.opts.repo.to_string_lossy(),
                "rev-parse",
                "--short",
                "HEAD",
            ],
        );
        let dirty = std::process::Command::new("git")
            .args(["-C", &self.opts.repo.to_string_lossy()])
            .args(["status", "--porcelain", "--untracked-files=no"])
            .output()
            .map(|o| !o.stdout.is_empty())
            .unwrap_or(false);
        if dirty {
            rev.push_str(" (with uncommitted changes)");
        }
        r.versions = vec![
            ("sandboxd (git)".into(), rev),
            ("rustc".into(), sys::first_line("rustc", &["--version"])),
            ("nginx".into(), sys::first_line("nginx", &["-v"])),
            ("wrk".into(), {
                let l = sys::first_line("wrk", &["-v"]);
                l.split(" Copyright").next().unwrap_or(&l).to_owned()
            }),
            (
                "configurable-http-proxy".into(),
                sys::first_line(&self.opts.chp.to_string_lossy(), &["--version"]),
            ),
            (
                "Docker engine".into(),
                sys::first_line(
                    "docker",
                    &[
                        "version",
                        "--format",
                        "{{.Server.Version}} (API {{.Server.APIVersion}}); {{range .Server.Components}}{{.Name}} {{.Version}}; {{end}}",
                    ],
                ),
            ),
            ("Node.js (host, runs configurable-http-proxy)".into(), sys::first_line("node", &["--version"])),
        ];
    }

    fn env(&self, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let work = &self.opts.work;
        let mut env: Vec<(String, String)> = [
            ("SANDBOXD_HTTP_ADDR", self.http.to_string()),
            ("SANDBOXD_HTTPS_ADDR", self.https.to_string()),
            ("SANDBOXD_METRICS_ADDR", String::new()),
            ("SANDBOXD_DOMAIN", "localhost".into()),
            ("SANDBOXD_PREVIEW_DOMAIN", PREVIEW_DOMAIN.into()),
            (
                "SANDBOXD_DATABASE_URL",
                format!("sqlite://{}", work.join("db/sandboxd.db").display()),
            ),
            ("SANDBOXD_WORKSPACES_DIR", self.ws.display().to_string()),
            (
                "SANDBOXD_CERTS_DIR",
                work.join("certs").display().to_string(),
            ),
            ("SANDBOXD_INSTANCE", self.opts.instance.clone()),
            ("SANDBOXD_AUTH_SECRET", self.secret.clone()),
            ("SANDBOXD_MAX_CONTAINERS", "64".into()),
            // The sandbox image: `SANDBOXD_IMAGE` of the bench's own environment, as for
            // scripts/ensure-image.sh in bench/run (default: the config's default).
            (
                "SANDBOXD_IMAGE",
                std::env::var("SANDBOXD_IMAGE")
                    .ok()
                    .filter(|v| !v.is_empty())
                    .unwrap_or_else(|| "sandboxd-sandbox:latest".into()),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for (k, v) in extra {
            env.retain(|(x, _)| x != k);
            env.push(((*k).to_owned(), (*v).to_owned()));
        }
        env
    }

    /// Starts sandboxd with the bench's environment plus `extra`; returns the time until
    /// `/healthz` answered 200.
    async fn start_server(&mut self, tag: &str, extra: &[(&str, &str)]) -> Result<Duration> {
        self.stop_server().await;
        let log = std::fs::File::create(self.opts.work.join(format!("logs/sandboxd-{tag}.log")))?;
        let mut cmd = tokio::process::Command::new(&self.opts.sandboxd);
        cmd.arg("serve").current_dir(&self.opts.work);
        for (k, _) in std::env::vars() {
            if k.starts_with("SANDBOXD_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(self.env(extra))
            .env(
                "SANDBOXD_LOG",
                std::env::var("BENCH_SANDBOXD_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(log.try_clone()?)
            .stderr(log);
        let t = Instant::now();
        let mut proc = Proc::spawn("sandboxd", &mut cmd, &self.pids)?;
        let api = Api::new(self.http, &self.secret);
        loop {
            if api.healthz().await {
                break;
            }
            proc.check_alive().with_context(|| {
                format!("see {}/logs/sandboxd-{tag}.log", self.opts.work.display())
            })?;
            if t.elapsed() > Duration::from_secs(300) {
                bail!("sandboxd did not become healthy within 300 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let took = t.elapsed();
        self.server = Some(Server { proc, api });
        Ok(took)
    }

    async fn stop_server(&mut self) {
        if let Some(s) = self.server.take() {
            s.proc.stop(libc::SIGTERM, Duration::from_secs(20)).await;
        }
    }

    fn api(&self) -> Result<&Api> {
        self.server
            .as_ref()
            .map(|s| &s.api)
            .ok_or_else(|| anyhow!("sandboxd is not running"))
    }

    fn server_pid(&self) -> Result<u32> {
        self.server
            .as_ref()
            .map(|s| s.proc.pid())
            .ok_or_else(|| anyhow!("sandboxd is not running"))
    }

    fn host(&self, user: &str) -> String {
        format!("user-{user}.{PREVIEW_DOMAIN}:{}", self.http.port())
    }

    /// Writes the app into the user's workspace on the host. With `npm`, the dev server is
    /// started by the default command (`npm run dev -- --host 0.0.0.0 --port 5173`); else
    /// `.sandboxd/preview.json` names `node server.js`.
    fn write_app(&self, user: &str, npm: bool) -> Result<()> {
        let dir = self.ws.join(format!("user-{user}"));
        std::fs::create_dir_all(dir.join(".sandboxd"))?;
        std::fs::write(
            dir.join("package.json"),
            json!({"name": "bench-app", "private": true, "scripts": {"dev": "node server.js"}})
                .to_string(),
        )?;
        std::fs::write(dir.join("server.js"), SERVER_JS)?;
        let preview = dir.join(".sandboxd/preview.json");
        if npm {
            let _ = std::fs::remove_file(&preview);
        } else {
            std::fs::write(&preview, json!({"command": "node server.js"}).to_string())?;
        }
        for p in [
            dir.clone(),
            dir.join(".sandboxd"),
            dir.join("package.json"),
            dir.join("server.js"),
        ] {
            chown(&p, Some(1000), Some(1000))?;
        }
        if !npm {
            chown(&preview, Some(1000), Some(1000))?;
        }
        Ok(())
    }

    fn listen_file(&self, user: &str) -> PathBuf {
        self.ws.join(format!("user-{user}")).join(LISTEN_FILE)
    }

    /// (process start, listening), wall-clock ms, as the app wrote them.
    fn read_listen(&self, user: &str) -> Option<(f64, f64)> {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.listen_file(user)).ok()?).ok()?;
        Some((v["origin"].as_f64()?, v["listen"].as_f64()?))
    }

    async fn containers(&self, user: Option<&str>) -> Result<Vec<String>> {
        let mut labels = vec![format!("sandboxd.instance={}", self.opts.instance)];
        if let Some(u) = user {
            labels.push(format!("sandboxd.user={u}"));
        }
        let list = self
            .docker
            .list_containers(Some(ListContainersOptions::<String> {
                all: true,
                filters: HashMap::from([("label".to_owned(), labels)]),
                ..Default::default()
            }))
            .await?;
        Ok(list.into_iter().filter_map(|c| c.id).collect())
    }

    async fn container_of(&self, user: &str) -> Result<String> {
        self.containers(Some(user))
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("user {user} has no container"))
    }

    async fn inspect(&self, id: &str) -> Result<Insp> {
        let c = self
            .docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await?;
        let st = c.state.unwrap_or_default();
        let net = format!("{}-net", self.opts.instance);
        Ok(Insp {
            status: st.status.map(|s| s.to_string()).unwrap_or_default(),
            created_ms: rfc3339_ms(c.created.as_deref()),
            started_ms: rfc3339_ms(st.started_at.as_deref()),
            ip: c
                .network_settings
                .and_then(|n| n.networks)
                .and_then(|mut n| n.remove(&net))
                .and_then(|e| e.ip_address)
                .and_then(|ip| ip.parse().ok()),
        })
    }

    async fn wait_status(&self, id: &str, want: &str, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let s = self.inspect(id).await?.status;
            if s == want {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("container stayed {s}, not {want}, for {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn remove_containers(&self, ids: Vec<String>) -> usize {
        stream::iter(ids)
            .map(|id| async move {
                self.docker
                    .remove_container(
                        &id,
                        Some(RemoveContainerOptions {
                            force: true,
                            v: true,
                            ..Default::default()
                        }),
                    )
                    .await
                    .is_ok()
            })
            .buffer_unordered(8)
            .filter(|ok| std::future::ready(*ok))
            .count()
            .await
    }

    pub async fn cleanup(&mut self) {
        self.stop_server().await;
        if let Ok(ids) = self.containers(None).await {
            let n = ids.len();
            let removed = self.remove_containers(ids).await;
            eprintln!("[bench] removed {removed} of {n} containers");
        }
        let _ = self.engine.remove_network(&self.opts.instance).await;
    }

    // ---------------------------------------------------------------- phase A

    async fn phase_a(&mut self) -> Result<()> {
        self.step("phase A: sandboxd with unthrottled sandboxes (2 CPUs, 1 GiB, nofile 16384)");
        self.start_server("a", PHASE_A_ENV).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let pid = self.server_pid()?;
        self.report.footprint.push(Fact {
            label: "sandboxd RSS, idle".into(),
            value: format!("{:.1} MiB", mib(sys::rss_kib(pid)?)),
            note: "just started, empty store, no sandbox".into(),
        });
        self.write_app("p1", false)?;
        let v = self.api()?.post("p1", "/sandbox/init", &json!({})).await?;
        let id = v["containerId"]
            .as_str()
            .context("containerId from init")?
            .to_owned();
        http::wait_200(self.http, &self.host("p1"), "/", Duration::from_secs(60)).await?;
        let ip = self.inspect(&id).await?.ip.context("container address")?;
        if let Ok((0, v)) = self
            .engine
            .run(&id, vec!["node".into(), "--version".into()])
            .await
        {
            self.report
                .versions
                .push(("Node.js (sandbox image)".into(), v.trim().to_owned()));
        }
        if self.opts.wants("proxy") {
            let r = self.bench_proxy(ip).await;
            self.note_err("proxy throughput", r);
        }
        if self.opts.wants("exec") {
            let r = self.bench_exec(&id).await;
            self.note_err("execute round trip", r);
        }
        if self.opts.wants("terminal") {
            let r = self.bench_terminal(&id).await;
            self.note_err("terminal echo", r);
        }
        if self.opts.wants("idle") {
            let r = self.bench_idle().await;
            self.note_err("idle connections", r);
        }
        Ok(())
    }

    async fn bench_proxy(&mut self, ip: IpAddr) -> Result<()> {
        self.step("proxy: starting nginx and configurable-http-proxy");
        let upstream = SocketAddr::new(ip, 5173);
        let (nh, ns, ch, ca) = (free_port()?, free_port()?, free_port()?, free_port()?);
        let certs = self.opts.work.join("certs");
        let nginx = peers::start_nginx(
            &self.opts.work,
            &self.pids,
            upstream,
            nh,
            ns,
            &certs.join("dev.crt"),
            &certs.join("dev.key"),
        )
        .await?;
        let chp = peers::start_chp(
            &self.opts.chp,
            &self.opts.work,
            &self.pids,
            upstream,
            ch,
            ca,
        )
        .await?;
        let name = format!("user-p1.{PREVIEW_DOMAIN}");
        let hosts_file = self.opts.work.join("hosts");
        let mut hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
        hosts.push_str(&format!("\n127.0.0.1 {name}\n"));
        std::fs::write(&hosts_file, hosts)?;
        let wrk = Wrk {
            hosts_file,
            threads: 1,
        };
        let targets: Vec<(&'static str, String, String)> = vec![
            (
                "a",
                "a. direct to the container".into(),
                format!("http://{ip}:5173"),
            ),
            (
                "b_http",
                "b. sandboxd preview, HTTP".into(),
                format!("http://{name}:{}", self.http.port()),
            ),
            (
                "b_https",
                "b. sandboxd preview, HTTPS".into(),
                format!("https://{name}:{}", self.https.port()),
            ),
            (
                "c_http",
                "c. nginx, HTTP".into(),
                format!("http://{name}:{}", nh.port()),
            ),
            (
                "c_https",
                "c. nginx, HTTPS".into(),
                format!("https://{name}:{}", ns.port()),
            ),
            (
                "d",
                "d. configurable-http-proxy, HTTP".into(),
                format!("http://{name}:{}", ch.port()),
            ),
        ];
        let sizes = [("small", "/", SMALL_BODY), ("1 MiB", "/1m", BIG_BODY)];
        // Every plain-HTTP path answers with the right body before anything is timed.
        for (key, _, base) in &targets {
            if key.ends_with("https") {
                continue;
            }
            let port: u16 = base
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            let addr = if *key == "a" {
                upstream
            } else {
                SocketAddr::from(([127, 0, 0, 1], port))
            };
            for (_, path, len) in sizes {
                let t = http::timed_get(addr, &name, path, Duration::from_secs(10)).await?;
                if t.status != 200 || t.body_len != len {
                    bail!("{key}{path}: status {} with {} bytes", t.status, t.body_len);
                }
            }
        }
        self.step("proxy: warm-up");
        for (_, _, base) in &targets {
            for (_, path, _) in sizes {
                wrk.run(&format!("{base}{path}"), LOAD_CONNS, self.n.warm_secs)
                    .await?;
            }
        }
        let mut load: HashMap<(usize, usize), Vec<WrkResult>> = HashMap::new();
        let mut single: HashMap<(usize, usize), Vec<WrkResult>> = HashMap::new();
        let mut cpu: HashMap<(usize, usize), Vec<f64>> = HashMap::new();
        let sandboxd = self.server_pid()?;
        let proxy_pid: Vec<Option<u32>> = targets
            .iter()
            .map(|(key, _, _)| match *key {
                "b_http" | "b_https" => Some(sandboxd),
                "c_http" | "c_https" => Some(nginx.pid()),
                "d" => Some(chp.pid()),
                _ => None,
            })
            .collect();
        for round in 0..self.n.rounds {
            self.step(&format!("proxy: round {} of {}", round + 1, self.n.rounds));
            for (si, (_, path, _)) in sizes.iter().enumerate() {
                for (ti, (_, _, base)) in targets.iter().enumerate() {
                    let url = format!("{base}{path}");
                    let pid = proxy_pid[ti];
                    let cpu0 = pid.map(sys::tree_cpu_ms);
                    let l = wrk.run(&url, LOAD_CONNS, self.n.load_secs).await?;
                    if let (Some(pid), Some(c0)) = (pid, cpu0) {
                        let per = (sys::tree_cpu_ms(pid) - c0) * 1000.0 / l.requests.max(1) as f64;
                        cpu.entry((si, ti)).or_default().push(per);
                    }
                    load.entry((si, ti)).or_default().push(l);
                    let s = wrk.run(&url, 1, self.n.single_secs).await?;
                    single.entry((si, ti)).or_default().push(s);
                }
            }
        }
        for (si, (size, _, _)) in sizes.iter().enumerate() {
            for (ti, (key, label, _)) in targets.iter().enumerate() {
                self.report.proxy.push(ProxyRow {
                    size: (*size).into(),
                    key,
                    label: label.clone(),
                    load: med(&load[&(si, ti)]),
                    single: med(&single[&(si, ti)]),
                    cpu_us: cpu.get(&(si, ti)).map(|v| median(v)),
                });
            }
        }
        let pid = self.server_pid()?;
        self.report.footprint.push(Fact {
            label: "sandboxd peak RSS during the proxy load".into(),
            value: format!("{:.1} MiB", mib(sys::hwm_kib(pid)?)),
            note: format!(
                "VmHWM after {LOAD_CONNS} keep-alive connections pulling 1 MiB responses"
            ),
        });
        self.report.settings.push((
            "proxy".into(),
            format!(
                "wrk -t1, {LOAD_CONNS} connections for {} s (load) and 1 connection for {} s, {} round(s) interleaved across paths, medians; warm-up {} s per path; the sandbox unthrottled (2 CPUs) so that the app is not the bottleneck; nginx: {} workers, upstream keepalive 64, proxy buffers in memory; configurable-http-proxy: defaults (keep-alive agent), one Node process",
                self.n.load_secs, self.n.single_secs, self.n.rounds, self.n.warm_secs, sys::nproc()
            ),
        ));
        nginx.stop(libc::SIGTERM, Duration::from_secs(5)).await;
        chp.stop(libc::SIGTERM, Duration::from_secs(5)).await;
        Ok(())
    }

    async fn bench_exec(&mut self, id: &str) -> Result<()> {
        self.step("execute: sandboxd vs docker exec");
        let code = json!({"code": "console.log(1)"});
        let (mut api_s, mut cli_s, mut eng_s) = (vec![], vec![], vec![]);
        let warm = 3;
        for i in 0..self.n.exec_runs + warm {
            let t = Instant::now();
            let v = self.api()?.post("p1", "/sandbox/execute", &code).await?;
            let d = t.elapsed().as_secs_f64() * 1e3;
            if v["output"] != "1\n" {
                bail!("execute answered {v}");
            }
            let t = Instant::now();
            let out = tokio::process::Command::new("docker")
                .args(["exec", id, "node", "-e", "console.log(1)"])
                .output()
                .await?;
            let c = t.elapsed().as_secs_f64() * 1e3;
            if out.stdout != b"1\n" {
                bail!(
                    "docker exec printed {:?}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let t = Instant::now();
            let (code_, outp) = self
                .engine
                .run(
                    id,
                    vec!["node".into(), "-e".into(), "console.log(1)".into()],
                )
                .await?;
            let e = t.elapsed().as_secs_f64() * 1e3;
            if code_ != 0 || outp != "1\n" {
                bail!("engine exec: {code_} {outp:?}");
            }
            if i >= warm {
                api_s.push(d);
                cli_s.push(c);
                eng_s.push(e);
            }
        }
        self.report.exec = vec![
            TimedRow {
                label: "sandboxd `POST /sandbox/execute`".into(),
                ms: summarize(&api_s),
                note: "HTTP API, code on the exec's stdin, `setsid` wrapper writes it to a file, `node` runs it as uid 1000".into(),
            },
            TimedRow {
                label: "`docker exec <id> node -e 'console.log(1)'` (CLI floor)".into(),
                ms: summarize(&cli_s),
                note: "the docker CLI process plus the engine's exec".into(),
            },
            TimedRow {
                label: "engine API exec of `node -e` (no CLI, no edge)".into(),
                ms: summarize(&eng_s),
                note: "create, start, read, inspect of one exec over the engine socket, the calls sandboxd makes".into(),
            },
        ];
        self.report.settings.push((
            "execute".into(),
            format!(
                "{} runs of each path after {warm} warm-up runs, interleaved, on a running sandbox",
                self.n.exec_runs
            ),
        ));
        Ok(())
    }

    async fn bench_terminal(&mut self, id: &str) -> Result<()> {
        self.step("terminal: keystroke echo");
        let mut req = format!("ws://{}/sandbox/terminal", self.http).into_client_request()?;
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {}", self.api()?.token("p1")?).parse()?,
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(req).await?;
        // Let the login shell print its prompt.
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(15) {
            match tokio::time::timeout(Duration::from_millis(700), ws.next()).await {
                Err(_) => break,
                Ok(Some(Ok(_))) => continue,
                Ok(other) => bail!("terminal ended while starting: {other:?}"),
            }
        }
        async fn until<S>(ws: &mut S, byte: u8) -> Result<()>
        where
            S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
                + Unpin,
        {
            loop {
                match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
                    Err(_) => bail!("no echo within 5 s"),
                    Ok(Some(Ok(Message::Binary(b)))) if b.contains(&byte) => return Ok(()),
                    Ok(Some(Ok(Message::Close(c)))) => bail!("terminal closed: {c:?}"),
                    Ok(Some(Ok(_))) => {}
                    Ok(Some(Err(e))) => bail!("terminal: {e}"),
                    Ok(None) => bail!("terminal stream ended"),
                }
            }
        }
        let warm = 5;
        let mut samples = vec![];
        for i in 0..self.n.keys + warm {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let t = Instant::now();
            ws.send(Message::Binary(b"x".to_vec())).await?;
            until(&mut ws, b'x').await?;
            if i >= warm {
                samples.push(t.elapsed().as_secs_f64() * 1e3);
            }
            ws.send(Message::Binary(vec![0x7f])).await?;
            until(&mut ws, 0x08).await?;
        }
        let _ = ws.send(Message::Binary(b"exit\r".to_vec())).await;
        let _ = ws.close(None).await;
        self.report.terminal.push(TimedRow {
            label: "sandboxd terminal WebSocket".into(),
            ms: summarize(&samples),
            note: "binary frame with one key → first binary frame carrying its echo (bash readline in the sandbox's PTY)".into(),
        });

        // Floor: the same PTY wrapper through the engine directly, no edge, no WebSocket.
        let (_exec, mut out, mut input) = self
            .engine
            .exec(
                id,
                ExecSpec {
                    cmd: vec![
                        "script".into(),
                        "-qfec".into(),
                        sandboxd::sandbox::shell::Script::TermWrapper
                            .source()
                            .into(),
                        "/dev/null".into(),
                    ],
                    env: vec![
                        "TERM=xterm-256color".into(),
                        "SHELL=/bin/bash".into(),
                        "SANDBOXD_TERMINAL_COLS=80".into(),
                        "SANDBOXD_TERMINAL_ROWS=24".into(),
                    ],
                    working_dir: Some("/workspace"),
                    tty: false,
                    stdin: true,
                },
            )
            .await?;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(15) {
            match tokio::time::timeout(Duration::from_millis(700), out.next()).await {
                Err(_) => break,
                Ok(Some(Ok(_))) => continue,
                Ok(_) => bail!("direct exec ended while starting"),
            }
        }
        async fn until_exec(
            out: &mut sandboxd::sandbox::testing::ExecStream,
            byte: u8,
        ) -> Result<()> {
            loop {
                match tokio::time::timeout(Duration::from_secs(5), out.next()).await {
                    Err(_) => bail!("no echo within 5 s"),
                    Ok(Some(Ok(ExecOutput::Stdout(b) | ExecOutput::Stderr(b))))
                        if b.contains(&byte) =>
                    {
                        return Ok(())
                    }
                    Ok(Some(Ok(_))) => {}
                    Ok(Some(Err(e))) => bail!("direct exec: {e:#}"),
                    Ok(None) => bail!("direct exec ended"),
                }
            }
        }
        let mut floor = vec![];
        for i in 0..self.n.keys + warm {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let t = Instant::now();
            input.write_all(b"x").await?;
            input.flush().await?;
            until_exec(&mut out, b'x').await?;
            if i >= warm {
                floor.push(t.elapsed().as_secs_f64() * 1e3);
            }
            input.write_all(&[0x7f]).await?;
            input.flush().await?;
            until_exec(&mut out, 0x08).await?;
        }
        let _ = input.write_all(b"exit\r").await;
        self.report.terminal.push(TimedRow {
            label: "engine exec attach, same PTY wrapper (floor)".into(),
            ms: summarize(&floor),
            note: "the exec sandboxd's terminal uses, driven over the engine socket by the bench: no edge, no WebSocket".into(),
        });
        self.report.settings.push((
            "terminal".into(),
            format!("{} keystrokes after {warm} warm-up ones, 20 ms apart, each erased again (DEL) before the next", self.n.keys),
        ));
        Ok(())
    }

    async fn bench_idle(&mut self) -> Result<()> {
        let n = self.n.idle_conns;
        let pid = self.server_pid()?;
        let host = self.host("p1");
        let addr = self.http;
        tokio::time::sleep(Duration::from_secs(1)).await;

        self.step(&format!("idle: {n} preview WebSocket tunnels"));
        let before = sys::rss_kib(pid)?;
        let t = Instant::now();
        let tunnels: Vec<Result<TcpStream>> = stream::iter(0..n)
            .map(|i| {
                let host = host.clone();
                async move {
                    let mut s = TcpStream::connect(addr).await?;
                    s.write_all(
                        format!(
                            "GET /ws/{i} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
                        )
                        .as_bytes(),
                    )
                    .await?;
                    let (status, _, _) = read_head(&mut s).await?;
                    if status != 101 {
                        bail!("status {status}");
                    }
                    Ok(s)
                }
            })
            .buffer_unordered(200)
            .collect()
            .await;
        let opened = t.elapsed();
        let failed = tunnels.iter().filter(|c| c.is_err()).count();
        let first_err = tunnels
            .iter()
            .find_map(|c| c.as_ref().err().map(|e| format!("{e:#}")));
        let tunnels: Vec<TcpStream> = tunnels.into_iter().filter_map(Result::ok).collect();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = sys::rss_kib(pid)?;
        let fds = sys::open_fds(pid);
        let open = count_open(&tunnels);
        self.report.footprint.push(Fact {
            label: format!("sandboxd RSS with {n} idle WebSockets"),
            value: format!("{:.1} MiB", mib(after)),
            note: format!(
                "preview WebSocket tunnels (HTTP/1.1 upgrade, as Vite's HMR socket) to one sandbox's app, idle after the handshake; each is a client socket and an upstream socket in sandboxd ({fds} fds open); {open} of {n} open when measured ({failed} failed{}; opened in {:.1} s, 200 at a time); {:.1} MiB before, {:.1} KiB per tunnel",
                first_err.map(|e| format!(": {e}")).unwrap_or_default(),
                opened.as_secs_f64(),
                mib(before),
                (after as f64 - before as f64) / n as f64
            ),
        });
        drop(tunnels);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let closed = sys::rss_kib(pid)?;
        self.report.footprint.push(Fact {
            label: "… after those tunnels closed".into(),
            value: format!("{:.1} MiB", mib(closed)),
            note: "3 s after the clients closed them: what the allocator kept".into(),
        });

        // A fresh process, so that the keep-alive figure does not include what the tunnels left.
        self.start_server("a2", PHASE_A_ENV).await?;
        let pid = self.server_pid()?;
        http::wait_200(self.http, &host, "/", Duration::from_secs(30)).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        self.step(&format!("idle: {n} keep-alive connections"));
        let before = sys::rss_kib(pid)?;
        let t = Instant::now();
        let conns: Vec<Result<TcpStream>> = stream::iter(0..n)
            .map(|_| {
                let host = host.clone();
                async move {
                    let mut s = TcpStream::connect(addr).await?;
                    s.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
                        .await?;
                    let (status, len, have) = read_head(&mut s).await?;
                    if status != 200 {
                        bail!("status {status}");
                    }
                    let mut rest = vec![0u8; len.saturating_sub(have)];
                    s.read_exact(&mut rest).await?;
                    Ok(s)
                }
            })
            .buffer_unordered(200)
            .collect()
            .await;
        let opened = t.elapsed();
        let failed = conns.iter().filter(|c| c.is_err()).count();
        let conns: Vec<TcpStream> = conns.into_iter().filter_map(Result::ok).collect();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = sys::rss_kib(pid)?;
        let open = count_open(&conns);
        // How long the edge keeps an idle keep-alive connection.
        let hold = Duration::from_secs(12);
        tokio::time::sleep(hold.saturating_sub(t.elapsed())).await;
        let open_later = count_open(&conns);
        self.report.footprint.push(Fact {
            label: format!("sandboxd RSS with {n} idle keep-alive HTTP connections"),
            value: format!("{:.1} MiB", mib(after)),
            note: format!(
                "each connection made one proxied GET to the preview and stayed open; {open} of {n} open when measured ({failed} failed to open, all opened in {:.1} s), {open_later} still open {} s after opening{}; {:.1} MiB before, {:.1} KiB per connection",
                opened.as_secs_f64(),
                hold.as_secs(),
                if open_later < open {
                    " (the edge closes idle keep-alive connections after `header_read_timeout`, 10 s)"
                } else {
                    ""
                },
                mib(before),
                (after as f64 - before as f64) / n as f64
            ),
        });
        drop(conns);
        tokio::time::sleep(Duration::from_secs(2)).await;
        self.report.settings.push((
            "idle connections".into(),
            format!(
                "open files limit of the bench and sandboxd: {}",
                self.nofile
            ),
        ));
        Ok(())
    }

    // ---------------------------------------------------------------- phase B

    async fn phase_b(&mut self) -> Result<()> {
        // B1: no idle policy in the way (a start that takes longer than `idle_pause_after`
        // would be paused by the reaper while the request waits; see the notes).
        self.step("phase B1: default sandbox limits, no idle policy");
        self.start_server("b1", &[]).await?;
        let r = self.bench_cold("cold", false, self.n.wake_runs).await;
        self.note_err("cold first hit", r);
        let r = self.bench_floors(self.n.wake_runs).await;
        self.note_err("floors without sandboxd", r);
        let r = self.bench_outside("cold", "pause", self.n.wake_runs).await;
        self.note_err("wake after an outside pause", r);
        let r = self.bench_outside("cold", "stop", self.n.wake_runs).await;
        self.note_err("wake after an outside stop", r);
        let r = self.bench_cold("npm", true, self.n.npm_runs).await;
        self.note_err("cold first hit (npm run dev)", r);
        let crowd = self.bench_crowd().await;
        let mem_before = match crowd {
            Ok(m) => Some(m),
            Err(e) => {
                self.note_err("20 users at once", Err(e));
                None
            }
        };
        // B2: paused by the idle policy after 1 s.
        self.step("phase B2: idle pause after 1 s");
        self.start_server(
            "b2",
            &[
                ("SANDBOXD_IDLE_PAUSE_AFTER", "1s"),
                ("SANDBOXD_IDLE_STOP_AFTER", "1h"),
                ("SANDBOXD_IDLE_CHECK_EVERY", "100ms"),
            ],
        )
        .await?;
        if let Some(before) = mem_before {
            let r = self.paused_memory(before).await;
            self.note_err("memory per paused sandbox", r);
        }
        let r = self.bench_paused().await;
        self.note_err("wake from paused", r);
        self.stop_server().await;
        // Only the "cold" user's sandbox goes on to B3.
        let mut others = self.containers(None).await?;
        let keep = self.container_of("cold").await.ok();
        others.retain(|id| Some(id) != keep.as_ref());
        self.remove_containers(others).await;

        // B3: stopped by the idle policy after 1 s.
        self.step("phase B3: idle stop after 1 s");
        self.start_server(
            "b3",
            &[
                ("SANDBOXD_IDLE_PAUSE_AFTER", "1s"),
                ("SANDBOXD_IDLE_STOP_AFTER", "1s"),
                ("SANDBOXD_IDLE_CHECK_EVERY", "100ms"),
            ],
        )
        .await?;
        let r = self.bench_stopped("cold", self.n.wake_runs, false).await;
        self.note_err("wake from stopped", r);
        self.stop_server().await;

        // B4: the same with a sandbox that has no CPU quota to speak of (comparison only).
        self.step("phase B4: wake from stopped with 2 CPUs");
        self.start_server(
            "b4",
            &[
                ("SANDBOXD_CPUS", "2"),
                ("SANDBOXD_IDLE_PAUSE_AFTER", "1s"),
                ("SANDBOXD_IDLE_STOP_AFTER", "1s"),
                ("SANDBOXD_IDLE_CHECK_EVERY", "100ms"),
            ],
        )
        .await?;
        let r = async {
            self.write_app("fast", false)?;
            self.api()?
                .post("fast", "/sandbox/init", &json!({}))
                .await?;
            http::wait_200(self.http, &self.host("fast"), "/", Duration::from_secs(60)).await?;
            self.bench_stopped("fast", self.n.npm_runs, true).await
        }
        .await;
        self.note_err("wake from stopped (2 CPUs)", r);
        // The outside rows (measured in B1, where no idle policy interferes) go beside
        // sandboxd's own paused and stopped wakes.
        let (outside, mut rows): (Vec<_>, Vec<_>) = std::mem::take(&mut self.report.wake)
            .into_iter()
            .partition(|r| r.label.starts_with("wake after an outside"));
        let at = rows
            .iter()
            .rposition(|r| r.label.starts_with("wake from paused"))
            .map_or(rows.len(), |i| i + 1);
        rows.splice(at..at, outside);
        self.report.wake = rows;
        self.report.settings.push((
            "cold start and wake".into(),
            format!(
                "{} timed runs each after one untimed run (npm variant: {}); cold = `POST /sandbox/exit` (container removed, user and workspace kept) then the timed GET, with no idle policy; paused and stopped = by sandboxd's idle policy (`idle_pause_after` 1 s; `idle_stop_after` 1 s for the stopped runs; checked every 100 ms), waited for through the engine and then `GET /sandbox/status` (which returns once sandboxd has recorded the transition) before the timed GET",
                self.n.wake_runs, self.n.npm_runs
            ),
        ));
        Ok(())
    }

    /// The floors of the cold first hit and of the wake from stopped, without sandboxd: the same
    /// image, limits and hardening (`spec::container_config` at the configured CPU quota, no
    /// boot boost), the same app started directly as the container's command
    /// (`node server.js`, no init of the image), timed from the engine call to the app's first
    /// 200 on the container's address (polled every 5 ms). Cold = create + start + the app's
    /// boot; wake = start of the same, stopped container + the app's boot.
    async fn bench_floors(&mut self, runs: usize) -> Result<()> {
        self.step(&format!("floors without sandboxd ({runs} runs)"));
        let user = "floor";
        self.write_app(user, false)?;
        let mut cfg = Config::load(None, self.env(&[]))?;
        cfg.limits.boot_nano_cpus = cfg.limits.nano_cpus;
        let uid = UserId::parse(user).map_err(|e| anyhow!("{e}"))?;
        let mut spec = sandboxd::sandbox::spec::container_config(
            &cfg,
            &uid,
            &self.ws.join(format!("user-{user}")),
        );
        spec.cmd = Some(vec!["node".into(), "server.js".into()]);
        // Not sandboxd's (it never adopts it); the instance label lets the cleanup find it.
        if let Some(l) = spec.labels.as_mut() {
            l.remove(sandboxd::sandbox::spec::LABEL_MANAGED);
        }
        let (mut cold, mut wake, mut cold_rows, mut wake_rows) = (vec![], vec![], vec![], vec![]);
        for i in 0..=runs {
            let name = format!("{}-floor-{i}", self.opts.instance);
            let _ = std::fs::remove_file(self.listen_file(user));
            let (t0, t) = (now_ms(), Instant::now());
            let id = self
                .docker
                .create_container(
                    Some(CreateContainerOptions {
                        name: name.as_str(),
                        platform: None,
                    }),
                    spec.clone(),
                )
                .await?
                .id;
            let measured = async {
                self.docker
                    .start_container(&id, None::<StartContainerOptions<String>>)
                    .await?;
                self.until_200(&id).await?;
                let total = t.elapsed().as_secs_f64() * 1e3;
                let cold_b = self.breakdown(user, t0, total, true).await;
                self.docker
                    .stop_container(&id, Some(StopContainerOptions { t: 1 }))
                    .await?;
                self.wait_status(&id, "exited", Duration::from_secs(20))
                    .await?;
                let _ = std::fs::remove_file(self.listen_file(user));
                let (w0, w) = (now_ms(), Instant::now());
                self.docker
                    .start_container(&id, None::<StartContainerOptions<String>>)
                    .await?;
                self.until_200(&id).await?;
                let wtotal = w.elapsed().as_secs_f64() * 1e3;
                let wake_b = self.breakdown(user, w0, wtotal, false).await;
                Ok::<_, anyhow::Error>((total, cold_b, wtotal, wake_b))
            }
            .await;
            self.remove_containers(vec![id]).await;
            let (total, cold_b, wtotal, wake_b) = measured?;
            if i > 0 {
                cold.push(total);
                wake.push(wtotal);
                cold_rows.extend(cold_b);
                wake_rows.extend(wake_b);
            }
        }
        self.report.wake.push(TimedRow {
            label: FLOOR_WAKE.into(),
            ms: summarize(&wake),
            note: "no sandboxd: `docker start` of a stopped container with the sandbox's image, limits (0.5 CPU) and hardening, whose command is the app itself (`node server.js`), until its first 200 on the container's address".into(),
        });
        self.report.wake.push(TimedRow {
            label: FLOOR_COLD.into(),
            ms: summarize(&cold),
            note: "no sandboxd: create + start of such a container until the app's first 200"
                .into(),
        });
        self.push_breakdown(FLOOR_WAKE, &wake_rows);
        self.push_breakdown(FLOOR_COLD, &cold_rows);
        Ok(())
    }

    /// Polls the app on the container's address every 5 ms until it answers 200 (60 s at most).
    async fn until_200(&self, id: &str) -> Result<()> {
        let ip = self.inspect(id).await?.ip.context("container address")?;
        let addr = SocketAddr::new(ip, 5173);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(t) = http::timed_get(addr, "floor", "/", Duration::from_secs(5)).await {
                if t.status == 200 {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("the floor container's app did not answer 200 within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until the engine reports `docker_state` and sandboxd's status says `state`.
    async fn wait_state(&self, user: &str, docker_state: &str, state: &str) -> Result<()> {
        let id = self.container_of(user).await?;
        self.wait_status(&id, docker_state, Duration::from_secs(20))
            .await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (s, v) = self
                .api()?
                .call(user, Method::GET, "/sandbox/status", None)
                .await?;
            if s.is_success() && v["state"] == state {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("sandboxd says {v} for {user}, not {state}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// One timed first hit on a fresh connection; must answer 200.
    async fn first_hit(&self, user: &str) -> Result<(f64, f64)> {
        let t0 = now_ms();
        let t = http::timed_get(self.http, &self.host(user), "/", Duration::from_secs(60)).await?;
        if t.status != 200 || t.body_len != SMALL_BODY {
            bail!(
                "first hit for {user}: status {} after {:.0} ms: {}",
                t.status,
                t.head.as_secs_f64() * 1e3,
                t.body
            );
        }
        Ok((t0, t.head.as_secs_f64() * 1e3))
    }

    async fn breakdown(&self, user: &str, t0: f64, total: f64, cold: bool) -> Option<Breakdown> {
        let id = self.container_of(user).await.ok()?;
        let i = self.inspect(&id).await.ok()?;
        let (origin, listen) = self.read_listen(user)?;
        Some(Breakdown {
            label: String::new(),
            created: cold.then_some(i.created_ms - t0),
            running: i.started_ms - t0,
            app_process: origin - t0,
            listening: listen - t0,
            first_byte: total,
            cpu: sys::cgroup_cpu(&id),
        })
    }

    fn push_breakdown(&mut self, label: &str, rows: &[Breakdown]) {
        if rows.is_empty() {
            return;
        }
        let m = |f: fn(&Breakdown) -> f64| median(&rows.iter().map(f).collect::<Vec<_>>());
        let created = rows.iter().filter_map(|b| b.created).collect::<Vec<_>>();
        let cpu = rows.iter().filter_map(|b| b.cpu).collect::<Vec<_>>();
        self.report.breakdown.push(Breakdown {
            label: label.into(),
            created: (!created.is_empty()).then(|| median(&created)),
            running: m(|b| b.running),
            app_process: m(|b| b.app_process),
            listening: m(|b| b.listening),
            first_byte: m(|b| b.first_byte),
            cpu: (!cpu.is_empty()).then(|| {
                (
                    median(&cpu.iter().map(|c| c.0).collect::<Vec<_>>()),
                    median(&cpu.iter().map(|c| c.1).collect::<Vec<_>>()),
                )
            }),
        });
    }

    async fn bench_cold(&mut self, user: &str, npm: bool, runs: usize) -> Result<()> {
        self.step(&format!("cold first hits ({user}, {runs} runs)"));
        self.write_app(user, npm)?;
        self.api()?.post(user, "/sandbox/init", &json!({})).await?;
        http::wait_200(self.http, &self.host(user), "/", Duration::from_secs(120)).await?;
        let (mut samples, mut rows) = (vec![], vec![]);
        for i in 0..=runs {
            self.api()?.post(user, "/sandbox/exit", &json!({})).await?;
            let _ = std::fs::remove_file(self.listen_file(user));
            tokio::time::sleep(Duration::from_millis(300)).await;
            let (t0, total) = self.first_hit(user).await?;
            if i > 0 {
                samples.push(total);
                if let Some(b) = self.breakdown(user, t0, total, true).await {
                    rows.push(b);
                }
            }
        }
        let (label, note) = if npm {
            (
                "cold first hit, app started by `npm run dev` (default command)",
                "as above, without `preview.json`: `sandboxd-init` runs the default `npm run dev -- --host 0.0.0.0 --port 5173`, whose script is `node server.js`",
            )
        } else {
            (
                "cold first hit (user known, no container)",
                "`POST /sandbox/exit` removed the container; the GET creates and starts one; `.sandboxd/preview.json` runs `node server.js`",
            )
        };
        self.report.wake.push(TimedRow {
            label: label.into(),
            ms: summarize(&samples),
            note: note.into(),
        });
        self.push_breakdown(label, &rows);
        Ok(())
    }

    async fn bench_paused(&mut self) -> Result<()> {
        self.step("wake from paused");
        let mut samples = vec![];
        for i in 0..=self.n.wake_runs {
            self.wait_state("cold", "paused", "paused").await?;
            let (_, total) = self.first_hit("cold").await?;
            if i > 0 {
                samples.push(total);
            }
        }
        self.report.wake.push(TimedRow {
            label: "wake from paused".into(),
            ms: summarize(&samples),
            note: "paused by the idle policy after 1 s; the GET unpauses it".into(),
        });
        Ok(())
    }

    /// Wake after the sandbox was paused or stopped behind sandboxd's back (`docker pause`,
    /// `docker stop -t 1`): sandboxd learns it from the engine's event stream, not from the API.
    async fn bench_outside(&mut self, user: &str, how: &str, runs: usize) -> Result<()> {
        self.step(&format!(
            "wake after an outside {how} ({user}, {runs} runs)"
        ));
        let mut samples = vec![];
        for i in 0..=runs {
            let id = self.container_of(user).await?;
            // The app is up, so the sample is the wake (and, after a stop, the app's start).
            http::wait_200(self.http, &self.host(user), "/", Duration::from_secs(60)).await?;
            let (args, want): (Vec<&str>, &str) = match how {
                "pause" => (vec!["pause", &id], "paused"),
                _ => (vec!["stop", "-t", "1", &id], "exited"),
            };
            let out = tokio::process::Command::new("docker")
                .args(&args)
                .output()
                .await?;
            if !out.status.success() {
                bail!(
                    "docker {args:?}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            self.wait_status(&id, want, Duration::from_secs(20)).await?;
            // No API call in between: the event stream is what tells sandboxd.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let _ = std::fs::remove_file(self.listen_file(user));
            let (_, total) = self.first_hit(user).await?;
            if i > 0 {
                samples.push(total);
            }
        }
        let note = match how {
            "pause" => "`docker pause` outside sandboxd (no idle policy); the GET unpauses it",
            _ => "`docker stop -t 1` outside sandboxd (no idle policy); the GET starts the same container again",
        };
        self.report.wake.push(TimedRow {
            label: format!("wake after an outside {how}"),
            ms: summarize(&samples),
            note: note.into(),
        });
        Ok(())
    }

    /// Wake from stopped for `user` (whose sandbox exists); `fast` = the comparison row of a
    /// sandbox without the CPU limit.
    async fn bench_stopped(&mut self, user: &str, runs: usize, fast: bool) -> Result<()> {
        self.step(&format!("wake from stopped ({user}, {runs} runs)"));
        let (mut samples, mut rows) = (vec![], vec![]);
        for i in 0..=runs {
            self.wait_state(user, "exited", "stopped").await?;
            let _ = std::fs::remove_file(self.listen_file(user));
            let (t0, total) = self.first_hit(user).await?;
            if i > 0 {
                samples.push(total);
                if let Some(b) = self.breakdown(user, t0, total, false).await {
                    rows.push(b);
                }
            }
        }
        let (label, note) = if fast {
            (
                "for comparison: wake from stopped, sandbox with 2 CPUs",
                "as above, for a sandbox created with `cpus = 2`: what the 0.5-CPU quota costs",
            )
        } else {
            (
                "wake from stopped",
                "stopped by the idle policy after 1 s; the GET starts the same container again",
            )
        };
        let row = TimedRow {
            label: label.into(),
            ms: summarize(&samples),
            note: note.into(),
        };
        if fast {
            self.report.wake.push(row);
        } else {
            // Listed before the paused row, the order of the targets.
            let at = self
                .report
                .wake
                .iter()
                .position(|r| r.label.starts_with("wake from paused"))
                .unwrap_or(self.report.wake.len());
            self.report.wake.insert(at, row);
        }
        self.push_breakdown(label, &rows);
        Ok(())
    }

    fn crowd_users(&self) -> Vec<String> {
        (1..=self.n.crowd).map(|i| format!("c{i:02}")).collect()
    }

    /// N known users without containers hit their previews at once. Returns the host's
    /// MemAvailable (KiB) from before the hits, for [`Ctx::paused_memory`].
    async fn bench_crowd(&mut self) -> Result<u64> {
        let n = self.n.crowd;
        self.step(&format!("{n} users' first hits at once"));
        let users = self.crowd_users();
        for u in &users {
            self.write_app(u, false)?;
        }
        let this: &Ctx = self;
        let api = this.api()?;
        let results: Vec<Result<()>> = stream::iter(users.iter())
            .map(|u| async move {
                api.post(u, "/sandbox/init", &json!({})).await?;
                http::wait_200(this.http, &this.host(u), "/", Duration::from_secs(120)).await?;
                api.post(u, "/sandbox/exit", &json!({})).await?;
                Ok(())
            })
            .buffer_unordered(4)
            .collect()
            .await;
        results.into_iter().collect::<Result<Vec<()>>>()?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mem_before = sys::meminfo_kib("MemAvailable");
        let t = Instant::now();
        let hosts: Vec<String> = users.iter().map(|u| self.host(u)).collect();
        let hits = futures_util::future::join_all(
            hosts
                .iter()
                .map(|h| http::timed_get(self.http, h, "/", Duration::from_secs(60))),
        )
        .await;
        let wall = t.elapsed().as_secs_f64() * 1e3;
        let mut samples = vec![];
        let mut failures: Vec<String> = vec![];
        for (u, h) in users.iter().zip(hits) {
            match h {
                Ok(t) if t.status == 200 => samples.push(t.head.as_secs_f64() * 1e3),
                Ok(t) => {
                    let code = serde_json::from_str::<serde_json::Value>(&t.body)
                        .ok()
                        .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
                        .unwrap_or_else(|| t.body.chars().take(80).collect());
                    failures.push(format!(
                        "{u}: {} `{code}` after {}",
                        t.status,
                        ms(t.head.as_secs_f64() * 1e3)
                    ));
                }
                Err(e) => failures.push(format!("{u}: {e:#}")),
            }
        }
        let ok = samples.len();
        let mut note = format!(
            "{n} known users without containers, one GET each, all sent together; {ok} of {n} answered 200 (percentiles over those), the last after {}",
            ms(wall)
        );
        if !failures.is_empty() {
            note.push_str(&format!(
                "; **{} failed**: {}",
                failures.len(),
                failures.join(", ")
            ));
            self.report.notes.push(format!(
                "{} of {n} concurrent first hits did not get a 200: {}",
                failures.len(),
                failures.join(", ")
            ));
        }
        self.report.wake.push(TimedRow {
            label: format!("{n} different users' first hits at once (per user)"),
            ms: summarize(&samples),
            note,
        });
        Ok(mem_before)
    }

    /// Host memory per idle paused sandbox: the crowd's sandboxes, once the idle policy paused
    /// them all, against the host's MemAvailable from before they were started.
    async fn paused_memory(&mut self, mem_before: u64) -> Result<()> {
        let users = self.crowd_users();
        let n = users.len();
        let mut ids = vec![];
        for u in &users {
            self.wait_state(u, "paused", "paused").await?;
            ids.push(self.container_of(u).await?);
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mem_after = sys::meminfo_kib("MemAvailable");
        let (mut usage, mut anon, mut shim) = (vec![], vec![], vec![]);
        for id in &ids {
            if let Some((u, a)) = sys::cgroup_memory(id) {
                usage.push(u as f64 / 1048576.0);
                anon.push(a as f64 / 1048576.0);
            }
            if let Some(p) = sys::shim_pss_kib(id) {
                shim.push(p as f64 / 1024.0);
            }
        }
        let delta = (mem_before as f64 - mem_after as f64) / 1024.0 / n as f64;
        let (cg, sh) = (median(&usage), median(&shim));
        self.report.footprint.push(Fact {
            label: "host memory per idle paused sandbox".into(),
            value: format!("{:.1} MiB", cg + sh),
            note: format!(
                "{n} sandboxes with the Node app listening, paused by the idle policy: median memory charged to the container's cgroup plus its containerd shim (next two rows)"
            ),
        });
        self.report.footprint.push(Fact {
            label: "… charged to the sandbox's cgroup".into(),
            value: format!("{cg:.1} MiB"),
            note: format!(
                "median memory usage of the {} containers' cgroups (processes: init, `sandboxd-init`, the app; anonymous memory {:.1} MiB, the rest page cache and kernel memory)",
                usage.len(),
                median(&anon)
            ),
        });
        self.report.footprint.push(Fact {
            label: "… the containerd shim".into(),
            value: format!("{sh:.1} MiB"),
            note: "median PSS of `containerd-shim-runc-v2` per container".into(),
        });
        self.report.footprint.push(Fact {
            label: "… cross-check: drop of the host's MemAvailable per sandbox".into(),
            value: format!("{delta:.1} MiB"),
            note: format!(
                "from before the {n} first hits to when all {n} were paused, divided by {n}; includes everything else the host did meanwhile, so only meaningful on an otherwise idle machine (load average at the end: {})",
                sys::loadavg()
            ),
        });
        Ok(())
    }

    // ---------------------------------------------------------------- phase C

    async fn phase_c(&mut self) -> Result<()> {
        let n = self.n.tracked;
        self.step(&format!("phase C: {n} tracked sandboxes"));
        self.stop_server().await;
        let old = self.containers(None).await?;
        self.remove_containers(old).await;
        let cfg = Config::load(None, self.env(&[]))?;
        self.engine.ensure_network(&cfg).await?;
        let t = Instant::now();
        let users: Vec<UserId> = (1..=n)
            .map(|i| UserId::parse(&format!("t{i:04}")))
            .collect::<Result<_, _>>()?;
        let this: &Ctx = self;
        let created: Vec<Result<()>> = stream::iter(users.iter())
            .map(|u| {
                let cfg = &cfg;
                async move {
                    let dir = this.ws.join(format!("user-{u}"));
                    sandboxd::sandbox::ensure_workspace_dir(&dir)?;
                    this.engine.create(cfg, u, &dir).await?;
                    Ok(())
                }
            })
            .buffer_unordered(4)
            .collect()
            .await;
        created.into_iter().collect::<Result<Vec<()>>>()?;
        let create_s = t.elapsed().as_secs_f64();
        let startup = self.start_server("c", &[]).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let pid = self.server_pid()?;
        let rss = sys::rss_kib(pid)?;
        let api = self.api()?;
        let t = Instant::now();
        let ok = stream::iter(users.iter())
            .map(|u| async move {
                matches!(api.call(u.as_str(), Method::GET, "/sandbox/status", None).await, Ok((s, _)) if s.is_success())
            })
            .buffer_unordered(8)
            .filter(|ok| std::future::ready(*ok))
            .count()
            .await;
        let status_s = t.elapsed().as_secs_f64();
        let rss2 = sys::rss_kib(pid)?;
        self.report.footprint.push(Fact {
            label: format!("sandboxd start-up with {n} tracked sandboxes"),
            value: format!("{:.1} s", startup.as_secs_f64()),
            note: format!(
                "from exec to `/healthz` 200: adopts {n} labelled containers (created, never started; made with sandboxd's own container spec in {create_s:.0} s), inspects each, records sessions and events in SQLite"
            ),
        });
        self.report.footprint.push(Fact {
            label: format!("sandboxd RSS with {n} tracked sandboxes"),
            value: format!("{:.1} MiB", mib(rss)),
            note: format!("after start-up: {n} users each with a slot and a (stopped) container in the manager's table"),
        });
        self.report.footprint.push(Fact {
            label: format!("… after each of the {n} users called `GET /sandbox/status`"),
            value: format!("{:.1} MiB", mib(rss2)),
            note: format!("{ok} of {n} answered 200 in {status_s:.1} s (8 at a time; each inspects the container)"),
        });
        self.stop_server().await;
        let t = Instant::now();
        let ids = self.containers(None).await?;
        let removed = self.remove_containers(ids).await;
        eprintln!(
            "[bench] removed {removed} tracked containers in {:.0} s",
            t.elapsed().as_secs_f64()
        );
        Ok(())
    }
}
