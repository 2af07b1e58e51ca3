//! The benchmarks themselves, in phases that each run their own sandboxd:
//! A (proxy, execute, files API, terminal, idle connections; sandboxes unthrottled so the app is not the
//! bottleneck), B1 (cold first hits, wake from paused, 20 users at once, memory per paused
//! sandbox; idle pause after 1 s), B2 (wake from stopped; idle stop after 1 s), C (1,000
//! tracked sandboxes adopted at start-up), and the swarm group (`--only swarm`: its own
//! single-host sandboxd, then the swarm lab, which it brings up and down itself).

mod exec;
mod files;
pub(crate) mod idle;
mod proxy;
mod proxy_cost;
mod swarm;
mod terminal;
mod tracked;
mod wake;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::chown;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use bollard::container::{InspectContainerOptions, ListContainersOptions, RemoveContainerOptions};
use bollard::Docker;
use futures_util::{stream, StreamExt};
use sandboxd::sandbox::testing::Engine;
use serde_json::json;

use crate::http::{self, Api};
use crate::report::{Fact, Report};
use crate::sys::{self, Proc};
use crate::Opts;

pub(crate) use proxy_cost::callgrind_args;

const PREVIEW_DOMAIN: &str = "preview.localhost";
const LISTEN_FILE: &str = ".bench-listen";
const SMALL_BODY: usize = 6;
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
    /// Passes of 1-connection runs over all the paths per round (see `bench_proxy`).
    single_passes: usize,
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
                single_passes: 1,
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
                // As many rounds as the proxy has paths: each path opens one round (proxy.rs).
                rounds: 6,
                load_secs: 3.0,
                single_secs: 1.0,
                single_passes: 2,
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
        if ["proxy", "proxy-cost", "exec", "files", "terminal", "idle"]
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
        if self.opts.wants("swarm") {
            let r = self.phase_swarm().await;
            self.note_err("swarm mode (single host beside the swarm lab)", r);
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
        // `BENCH_SANDBOXD_ENV="SANDBOXD_X=1 SANDBOXD_Y=2"`: settings to compare (sandboxd's own
        // environment is not passed on), before the scenario's own.
        let asked = std::env::var("BENCH_SANDBOXD_ENV").unwrap_or_default();
        for pair in asked.split_whitespace() {
            if let Some((k, v)) = pair
                .split_once('=')
                .filter(|(k, _)| k.starts_with("SANDBOXD_"))
            {
                env.retain(|(x, _)| x != k);
                env.push((k.to_owned(), v.to_owned()));
            }
        }
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
        // `BENCH_CALLGRIND=1`: phase A's sandboxd runs under callgrind (proxy_cost.rs).
        let mut cmd = if tag == "a" && proxy_cost::callgrind() {
            let mut c = tokio::process::Command::new("valgrind");
            c.args(callgrind_args(&self.opts.work.join("logs"), "sandboxd"))
                .arg(&self.opts.sandboxd);
            c
        } else {
            tokio::process::Command::new(&self.opts.sandboxd)
        };
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
            let r = self.bench_proxy(ip, &id).await;
            self.note_err("proxy throughput", r);
        }
        if self.opts.wants("proxy-cost") {
            let r = self.bench_proxy_cost(ip).await;
            self.note_err("proxy cost per request", r);
        }
        if self.opts.wants("exec") {
            let r = self.bench_exec(&id).await;
            self.note_err("execute round trip", r);
        }
        if self.opts.wants("files") {
            let r = self.bench_files(&id).await;
            self.note_err("files API throughput", r);
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
}
