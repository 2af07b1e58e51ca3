//! The engine restarts under sandboxd while requests are in flight (README, "Sandboxes", engine down).
//!
//! The test never touches the engine other tests use: it runs its own `containerd` and `dockerd`
//! (own data root, exec root, socket and pid file) in a network namespace it makes, loads the
//! sandbox image into that engine, and runs the real `sandboxd` binary inside the same namespace
//! (so it reaches the containers' addresses there). The test talks to sandboxd over a veth pair
//! between the host and the namespace (10.213.7.1/30 ↔ 10.213.7.2/30); nothing else is reached.
//! Everything it made is removed by a drop guard, also when an assertion fails: processes by
//! their pid, the namespace and the folders by their exact names.
//!
//! Then: a sandbox with a small app on port 5173, an open terminal, requests in flight; the
//! engine is killed (dockerd and containerd) and, after the outage was checked, started again
//! on the same data root, which stops every container (live-restore is off). Asserted: during
//! the outage `/healthz` is 503 naming the engine, API calls are 503 `engine_unavailable` with
//! `Retry-After` within 2 s, previews get the waiting page or 503 JSON, the open terminal closes
//! with 1011 and a reason; afterwards, without restarting sandboxd, everything works again, the
//! sandbox the restart stopped is started on the next request, and the store has neither lost
//! nor duplicated anything.

use crate::common;

use std::fs::{File, OpenOptions};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

const HOST_IP: &str = "10.213.7.1";
const NS_IP: &str = "10.213.7.2";
const PORT: u16 = 8080;
const DOMAIN: &str = "engine.test";
const PREVIEW_DOMAIN: &str = "preview.engine.test";
const USER: &str = "1";

/// The full path of a program, from PATH and the sbin folders; a missing one fails the test.
fn need(program: &str) -> String {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file());
    found
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| {
            panic!("{program} is required by the engine-restart test (apt-get install docker.io iproute2 util-linux)")
        })
}

/// Runs a program (argument vector, no shell) to completion within `limit`.
fn run(program: &str, args: &[&str], limit: Duration) -> Result<String, String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{program}: {e}"))?;
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{program} {args:?}: no end within {limit:?}"));
            }
        }
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "{program} {args:?}: {}: {}{}",
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn must(program: &str, args: &[&str], limit: Duration) -> String {
    run(program, args, limit).unwrap_or_else(|e| panic!("{e}"))
}

fn log_file(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// The lab's daemons die with the test's thread, so even a killed test run leaves no engine or
/// sandboxd running (scripts/clean-engine-lab.sh removes the rest: shims, folders, namespace).
fn die_with_test(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: only prctl, which is async-signal-safe, runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        })
    }
}

/// SIGTERM, then SIGKILL after `grace`; reaps the child.
fn stop_child(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Everything the test made; removed on drop.
struct Lab {
    ns: String,
    veth: String,
    lib: PathBuf,
    run: PathBuf,
    sock: String,
    docker: String,
    containerd: Option<Child>,
    dockerd: Option<Child>,
    sandboxd: Option<Child>,
}

impl Lab {
    fn new() -> Lab {
        let ip = need("ip");
        for p in ["nsenter", "dockerd", "containerd", "docker", "iptables"] {
            need(p);
        }
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "the engine-restart test needs root (network namespaces, its own dockerd)"
        );
        let id = &uuid::Uuid::new_v4().simple().to_string()[..6];
        let run = PathBuf::from(format!("/run/sbxe-{id}"));
        let lab = Lab {
            ns: format!("sbxe-{id}"),
            veth: format!("sbxe{id}h"),
            lib: PathBuf::from(format!("/var/lib/sbxe-{id}")),
            sock: format!("unix://{}/docker.sock", run.display()),
            run,
            docker: need("docker"),
            containerd: None,
            dockerd: None,
            sandboxd: None,
        };
        // The engine's data root lives in memory: removing 500 MB of image layers file by
        // file takes most of a minute on a busy disk, an unmount takes nothing.
        std::fs::create_dir_all(&lab.lib).unwrap();
        must(
            &need("mount"),
            &[
                "-t",
                "tmpfs",
                "-o",
                "size=6g,mode=0711",
                "sbxe-tmpfs",
                &lab.lib.display().to_string(),
            ],
            Duration::from_secs(10),
        );
        for d in [
            lab.lib.join("data"),
            lab.lib.join("containerd"),
            lab.lib.join("work"),
            lab.run.join("docker"),
            lab.run.join("containerd"),
        ] {
            std::fs::create_dir_all(&d).unwrap();
        }
        let t = Duration::from_secs(10);
        let (ns, veth, peer) = (&lab.ns, &lab.veth, format!("{}n", &lab.veth[..10]));
        must(&ip, &["netns", "add", ns], t);
        must(&ip, &["-n", ns, "link", "set", "lo", "up"], t);
        must(
            &ip,
            &["link", "add", veth, "type", "veth", "peer", "name", &peer],
            t,
        );
        must(&ip, &["link", "set", &peer, "netns", ns], t);
        must(
            &ip,
            &["addr", "add", &format!("{HOST_IP}/30"), "dev", veth],
            t,
        );
        must(&ip, &["link", "set", veth, "up"], t);
        must(
            &ip,
            &[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{NS_IP}/30"),
                "dev",
                &peer,
            ],
            t,
        );
        must(&ip, &["-n", ns, "link", "set", &peer, "up"], t);
        std::fs::write(
            lab.lib.join("containerd.toml"),
            format!(
                "version = 2\nroot = \"{lib}/containerd\"\nstate = \"{run}/containerd\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{run}/containerd/containerd.sock\"\n\
                 [ttrpc]\n  address = \"\"\n[debug]\n  address = \"\"\n[metrics]\n  address = \"\"\n",
                lib = lab.lib.display(),
                run = lab.run.display()
            ),
        )
        .unwrap();
        lab
    }

    fn netns_path(&self) -> String {
        format!("--net=/run/netns/{}", self.ns)
    }

    fn containerd_sock(&self) -> PathBuf {
        self.run.join("containerd/containerd.sock")
    }

    /// Starts containerd, then dockerd, both in the namespace, on this lab's folders only.
    /// nsenter changes the network namespace only: the engine shares the host's mounts, which
    /// containerd's shims need to see dockerd's overlay mounts.
    fn start_engine(&mut self) -> Duration {
        let t0 = Instant::now();
        let ctd = die_with_test(&mut Command::new(need("nsenter")))
            .args([&self.netns_path(), &need("containerd"), "--config"])
            .arg(self.lib.join("containerd.toml"))
            .stdin(Stdio::null())
            .stdout(log_file(&self.lib.join("containerd.log")))
            .stderr(log_file(&self.lib.join("containerd.log")))
            .spawn()
            .expect("containerd starts");
        self.containerd = Some(ctd);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.containerd_sock().exists() {
            assert!(
                Instant::now() < deadline,
                "containerd did not open its socket within 30 s:\n{}",
                tail(&self.lib.join("containerd.log"))
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let dd = die_with_test(&mut Command::new(need("nsenter")))
            .args([&self.netns_path(), &need("dockerd")])
            .arg("--containerd")
            .arg(self.containerd_sock())
            .arg("--data-root")
            .arg(self.lib.join("data"))
            .arg("--exec-root")
            .arg(self.run.join("docker"))
            .args(["-H", &self.sock, "--pidfile"])
            .arg(self.run.join("docker.pid"))
            .args(["--bip", "10.213.9.1/24", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log_file(&self.lib.join("dockerd.log")))
            .stderr(log_file(&self.lib.join("dockerd.log")))
            .spawn()
            .expect("dockerd starts");
        self.dockerd = Some(dd);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self
                .dk(&["version", "--format", "{{.Server.Version}}"], 5)
                .is_ok()
            {
                return t0.elapsed();
            }
            if let Some(Ok(Some(st))) = self.dockerd.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "the test's dockerd exited ({st}):\n{}",
                    tail(&self.lib.join("dockerd.log"))
                );
            }
            assert!(
                Instant::now() < deadline,
                "the test's dockerd did not answer within 60 s:\n{}",
                tail(&self.lib.join("dockerd.log"))
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) dockerd: an engine that accepts connections and
    /// never answers.
    fn freeze_engine(&self, frozen: bool) {
        let pid = self.dockerd.as_ref().expect("dockerd runs").id() as i32;
        let sig = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "signal to dockerd");
    }

    /// The engine dies the hard way: dockerd and containerd are killed (SIGKILL).
    fn kill_engine(&mut self) {
        for child in [self.dockerd.take(), self.containerd.take()]
            .into_iter()
            .flatten()
        {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The docker CLI against this lab's engine only.
    fn dk(&self, args: &[&str], limit_secs: u64) -> Result<String, String> {
        let mut all = vec!["-H", self.sock.as_str()];
        all.extend_from_slice(args);
        run(&self.docker, &all, Duration::from_secs(limit_secs))
    }

    /// Copies the sandbox image from the host's engine (read only: `docker save`).
    fn load_image(&self) -> Duration {
        let t0 = Instant::now();
        let image = common::image();
        let mut save = Command::new(&self.docker)
            .args(["save", &image])
            .stdout(Stdio::piped())
            .stderr(log_file(&self.lib.join("load.log")))
            .spawn()
            .expect("docker save starts");
        let load = Command::new(&self.docker)
            .args(["-H", &self.sock, "load", "-q"])
            .stdin(save.stdout.take().expect("piped"))
            .stdout(log_file(&self.lib.join("load.log")))
            .stderr(log_file(&self.lib.join("load.log")))
            .spawn();
        let mut load = match load {
            Ok(l) => l,
            Err(e) => {
                let _ = save.kill();
                let _ = save.wait();
                panic!("docker load: {e}");
            }
        };
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut in_time = true;
        while !(matches!(save.try_wait(), Ok(Some(_))) && matches!(load.try_wait(), Ok(Some(_)))) {
            if Instant::now() > deadline {
                in_time = false;
                let _ = save.kill();
                let _ = load.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let saved = save.wait().map(|s| s.success()).unwrap_or(false);
        let loaded = load.wait().map(|s| s.success()).unwrap_or(false);
        assert!(in_time, "loading the image took more than 600 s");
        assert!(
            saved && loaded,
            "docker save {image} | docker load failed (is the image built on the host?):\n{}",
            tail(&self.lib.join("load.log"))
        );
        self.dk(&["image", "inspect", &image], 10)
            .unwrap_or_else(|e| panic!("image not in the test's engine: {e}"));
        t0.elapsed()
    }

    /// The real binary, in the namespace, against the lab's engine.
    fn start_sandboxd(&mut self, instance: &str, db_url: &str) {
        let work = self.lib.join("work");
        // `ip netns exec` (unlike nsenter) also gives sandboxd the namespace's view of
        // /sys/class/net, where it checks the sandbox bridge before installing its rules.
        let mut cmd = Command::new(need("ip"));
        die_with_test(&mut cmd).args([
            "netns",
            "exec",
            &self.ns,
            env!("CARGO_BIN_EXE_sandboxd"),
            "serve",
        ]);
        for (k, _) in std::env::vars() {
            if k.starts_with("SANDBOXD_") || k == "DOCKER_HOST" {
                cmd.env_remove(k);
            }
        }
        cmd.current_dir(&work)
            .env("DOCKER_HOST", &self.sock)
            .env("SANDBOXD_LOG", "info")
            .env("SANDBOXD_HTTP_ADDR", format!("{NS_IP}:{PORT}"))
            .env("SANDBOXD_DOMAIN", DOMAIN)
            .env("SANDBOXD_PREVIEW_DOMAIN", PREVIEW_DOMAIN)
            .env("SANDBOXD_INSTANCE", instance)
            .env("SANDBOXD_DATABASE_URL", db_url)
            .env("SANDBOXD_WORKSPACES_DIR", work.join("workspaces"))
            .env("SANDBOXD_CERTS_DIR", work.join("certs"))
            .env("SANDBOXD_AUTH_SECRET", common::SECRET)
            .env("SANDBOXD_IMAGE", common::image())
            .env("SANDBOXD_STOP_TIMEOUT", "1s")
            .stdin(Stdio::null())
            .stdout(log_file(&self.lib.join("sandboxd.log")))
            .stderr(log_file(&self.lib.join("sandboxd.log")));
        self.sandboxd = Some(cmd.spawn().expect("sandboxd starts"));
    }

    fn sandboxd_log(&self) -> String {
        tail(&self.lib.join("sandboxd.log"))
    }

    /// Container ids the lab's engine ever had (from its data root, so this works while it is
    /// down).
    fn container_ids(&self) -> Vec<String> {
        std::fs::read_dir(self.lib.join("data/containers"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let t0 = Instant::now();
        if let Some(mut s) = self.sandboxd.take() {
            stop_child(&mut s, Duration::from_secs(5));
        }
        if self.dockerd.is_some() {
            if let Ok(ids) = self.dk(&["ps", "-aq"], 10) {
                let ids: Vec<&str> = ids.split_whitespace().collect();
                if !ids.is_empty() {
                    let mut args = vec!["rm", "-f"];
                    args.extend(ids);
                    let _ = self.dk(&args, 30);
                }
            }
        }
        if let Some(mut d) = self.dockerd.take() {
            stop_child(&mut d, Duration::from_secs(15));
        }
        eprintln!(
            "[engine_restart] cleanup: engine stopped after {:?}",
            t0.elapsed()
        );
        // Whatever still runs in the lab's containers (the engine may have been down), then
        // the shims of the lab's containerd: found by the lab's container ids and socket path.
        for id in self.container_ids() {
            for ctl in [
                "pids",
                "memory",
                "cpu,cpuacct",
                "freezer",
                "blkio",
                "devices",
            ] {
                let procs = format!("/sys/fs/cgroup/{ctl}/docker/{id}/cgroup.procs");
                if let Ok(list) = std::fs::read_to_string(&procs) {
                    for pid in list
                        .split_whitespace()
                        .filter_map(|p| p.parse::<i32>().ok())
                    {
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
        }
        let sock = self.containerd_sock().display().to_string();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for e in dir.flatten() {
                let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let is_shim = cmdline.split(|b| *b == 0).any(|arg| arg == sock.as_bytes());
                let ours = self.containerd.as_ref().map(|c| c.id() as i32) == Some(pid);
                if is_shim && !ours {
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        if let Some(mut c) = self.containerd.take() {
            stop_child(&mut c, Duration::from_secs(10));
        }
        eprintln!(
            "[engine_restart] cleanup: containerd stopped after {:?}",
            t0.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200));
        for id in self.container_ids() {
            if let Ok(ctls) = std::fs::read_dir("/sys/fs/cgroup") {
                for ctl in ctls.flatten() {
                    let _ = std::fs::remove_dir(ctl.path().join("docker").join(&id));
                }
            }
        }
        // Mounts below the lab's folders (overlay roots, namespace files), deepest first.
        let prefixes = [
            format!("{}/", self.lib.display()),
            format!("{}/", self.run.display()),
        ];
        let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
            .filter(|m| {
                prefixes.iter().any(|p| m.starts_with(p.as_str()))
                    || Path::new(m) == self.lib.as_path()
            })
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            if let Ok(c) = std::ffi::CString::new(m) {
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        eprintln!(
            "[engine_restart] cleanup: unmounted after {:?}",
            t0.elapsed()
        );
        let _ = std::fs::remove_dir_all(&self.run);
        let _ = std::fs::remove_dir_all(&self.lib);
        eprintln!(
            "[engine_restart] cleanup: folders removed after {:?}",
            t0.elapsed()
        );
        let ip = need("ip");
        let _ = run(&ip, &["netns", "del", &self.ns], Duration::from_secs(10));
        let _ = run(&ip, &["link", "del", &self.veth], Duration::from_secs(10));
        eprintln!("[engine_restart] lab removed in {:?}", t0.elapsed());
    }
}

/// The database URL as sandboxd in the namespace can use it. SQLite is a file; PostgreSQL at
/// 127.0.0.1 is the host's loopback, which the namespace cannot reach, so the test relays one
/// port on its side of the veth pair to it.
async fn reachable_from_lab(url: &str) -> String {
    if !url.starts_with("postgres") {
        return url.to_owned();
    }
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let (auth, hostpath) = match rest.rsplit_once('@') {
        Some((a, h)) => (format!("{a}@"), h),
        None => (String::new(), rest),
    };
    let (hostport, path) = hostpath.split_once('/').unwrap_or((hostpath, ""));
    let target = if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:5432")
    };
    let listener = tokio::net::TcpListener::bind((HOST_IP, 0)).await.unwrap();
    let relay = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                if let Ok(mut up) = tokio::net::TcpStream::connect(&target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut up).await;
                }
            });
        }
    });
    format!("{scheme}://{auth}{relay}/{path}")
}

fn token() -> String {
    sandboxd::auth::Auth::new(common::SECRET.as_bytes())
        .issue(
            &sandboxd::user::UserId::parse(USER).unwrap(),
            Duration::from_secs(3600),
        )
        .unwrap()
}

fn addr() -> SocketAddr {
    format!("{NS_IP}:{PORT}").parse().unwrap()
}

fn api(path: &str) -> String {
    format!("http://{DOMAIN}:{PORT}{path}")
}

fn preview(path: &str) -> String {
    format!("http://user-{USER}.{PREVIEW_DOMAIN}:{PORT}{path}")
}

fn client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .resolve(DOMAIN, addr())
        .resolve(&format!("user-{USER}.{PREVIEW_DOMAIN}"), addr())
        .timeout(timeout)
        .no_proxy()
        .build()
        .unwrap()
}

async fn call(
    c: &reqwest::Client,
    method: &str,
    path: &str,
    body: Value,
) -> (u16, Value, Duration) {
    let t0 = Instant::now();
    let req = match method {
        "GET" => c.get(api(path)),
        _ => c.post(api(path)).json(&body),
    };
    let r = req
        .bearer_auth(token())
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    (status, v, t0.elapsed())
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn open_terminal() -> Result<Ws, String> {
    let mut req = format!("ws://{DOMAIN}:{PORT}/sandbox/terminal")
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {}", token())).unwrap(),
    );
    let tcp = tokio::net::TcpStream::connect(addr())
        .await
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(
        Duration::from_secs(60),
        tokio_tungstenite::client_async(req, tcp),
    )
    .await
    {
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => {
            Err(format!("refused with {}", resp.status().as_u16()))
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no handshake within 60 s".into()),
    }
}

/// Sends a command and waits for its marked output.
async fn term_run(ws: &mut Ws, cmd: &str) -> String {
    ws.send(Message::Binary(
        format!("echo \"<$((6*7))>$({cmd})</$((6*7))>\"\r").into_bytes(),
    ))
    .await
    .unwrap();
    let mut buf = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let (Some(a), Some(b)) = (buf.rfind("<42>"), buf.rfind("</42>")) {
            if a < b {
                return buf[a + 4..b].to_owned();
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => buf.push_str(&String::from_utf8_lossy(&b)),
            Ok(Some(Ok(Message::Close(c)))) => panic!("terminal closed ({c:?}); output {buf:?}"),
            Ok(Some(Ok(_))) => {}
            other => panic!("terminal: {other:?}; output {buf:?}"),
        }
    }
}

/// The tiny app, started through the image's dev-server autostart (also on every start).
const APP: &str = r#"
  require('http').createServer((q, s) => {
    if (q.url === '/slow') return setTimeout(() => s.end('slow done'), 1500);
    s.end('hello from ' + process.env.SANDBOXD_USER);
  }).listen(5173, '0.0.0.0');
"#;

async fn events(c: &reqwest::Client) -> Vec<Value> {
    let (s, v, _) = call(c, "GET", "/sandbox/events", Value::Null).await;
    assert_eq!(s, 200, "events: {v}");
    v["events"].as_array().cloned().unwrap_or_default()
}

fn count(events: &[Value], kind: &str) -> usize {
    events.iter().filter(|e| e["kind"] == kind).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_restart_under_load_never_hangs_and_everything_resumes() {
    // Alone: a second engine, its image load and its veth pair load the machine and add
    // interfaces, and the outage's bounds are asserted in seconds.
    let _alone = common::gate::alone().await;
    let t_all = Instant::now();
    common::require_docker();
    let mut lab = Lab::new();
    let up = lab.start_engine();
    eprintln!("[engine_restart] private engine up in {up:?}");
    let load = lab.load_image();
    eprintln!("[engine_restart] image loaded into the private engine in {load:?}");
    let db = common::test_db().await;
    let instance = common::instance_name();
    let sandboxd_db = reachable_from_lab(&db.url).await;
    lab.start_sandboxd(&instance, &sandboxd_db);

    let c = client(Duration::from_secs(90));
    // sandboxd answers once it adopted state from the engine.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = c.get(api("/healthz")).send().await {
            if r.status() == 200 {
                break;
            }
        }
        if let Some(Ok(Some(st))) = lab.sandboxd.as_mut().map(|s| s.try_wait()) {
            panic!("sandboxd exited ({st}):\n{}", lab.sandboxd_log());
        }
        assert!(
            Instant::now() < deadline,
            "sandboxd did not answer /healthz within 60 s:\n{}",
            lab.sandboxd_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A sandbox with an app, a terminal, and the store's story so far.
    let (s, init, _) = call(&c, "POST", "/sandbox/init", json!({})).await;
    assert_eq!(s, 200, "init: {init}\n{}", lab.sandboxd_log());
    let cid = init["containerId"].as_str().unwrap().to_owned();
    let (s, r, _) = call(
        &c,
        "POST",
        "/sandbox/execute",
        json!({"code": common::preview::app_code(APP)}),
    )
    .await;
    assert_eq!(s, 200, "start the app: {r}");
    assert_eq!(r["exitCode"], 0, "start the app: {r}");
    let r = c.get(preview("/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), format!("hello from {USER}"));
    // A frozen engine (it accepts connections and never answers): requests waiting on it, and
    // new ones, get 503 engine_unavailable instead of hanging; it thaws, everything works.
    let quick = client(Duration::from_secs(10));
    lab.freeze_engine(true);
    let t0 = Instant::now();
    let (s, v, took) = call(&quick, "GET", "/sandbox/status", Value::Null).await;
    lab.freeze_engine(false);
    assert_eq!(s, 503, "status while the engine is frozen: {v}");
    assert_eq!(v["error"]["code"], "engine_unavailable", "{v}");
    assert!(took < Duration::from_secs(5), "answered after {took:?}");
    eprintln!(
        "[engine_restart] frozen engine: 503 after {:?}",
        t0.elapsed()
    );
    let t0 = Instant::now();
    loop {
        let (s, v, _) = call(&quick, "GET", "/sandbox/status", Value::Null).await;
        if s == 200 {
            assert_eq!(v["state"], "running", "{v}");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "status still {s} 10 s after the engine thawed: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut term = open_terminal().await.expect("terminal opens");
    assert_eq!(term_run(&mut term, "echo up").await, "up");
    let before = events(&c).await;
    assert_eq!(count(&before, "created"), 1, "{before:?}");

    // Requests in flight when the engine goes: an execution that would take 5 s, a slow
    // preview request, and a poller on the preview that must always get an answer quickly.
    let exec_in_flight = {
        let c = quick.clone();
        tokio::spawn(async move {
            call(
                &c,
                "POST",
                "/sandbox/execute",
                json!({"code": "setTimeout(() => console.log('late'), 5000)", "timeoutMs": 20000}),
            )
            .await
        })
    };
    let slow_in_flight = {
        let c = quick.clone();
        tokio::spawn(async move {
            let t0 = Instant::now();
            let r = c.get(preview("/slow")).send().await;
            (
                r.map(|r| r.status().as_u16()).map_err(|e| e.to_string()),
                t0.elapsed(),
            )
        })
    };
    let stop_polling = Arc::new(AtomicBool::new(false));
    let worst_ms = Arc::new(AtomicU64::new(0));
    let poller = {
        let (c, stop, worst) = (quick.clone(), stop_polling.clone(), worst_ms.clone());
        tokio::spawn(async move {
            let mut seen = std::collections::BTreeMap::<u16, usize>::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) && n < 2000 {
                n += 1;
                let t0 = Instant::now();
                let status = match c.get(preview("/")).send().await {
                    Ok(r) => r.status().as_u16(),
                    Err(e) => panic!("preview poll {n} failed: {e}"),
                };
                worst.fetch_max(t0.elapsed().as_millis() as u64, Ordering::Relaxed);
                *seen.entry(status).or_default() += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            seen
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The engine goes away.
    let t_kill = Instant::now();
    lab.kill_engine();

    // The open terminal closes with 1011 and a reason.
    let close = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match term.next().await {
                Some(Ok(Message::Close(f))) => return f,
                Some(Ok(_)) => {}
                other => panic!("terminal ended without a close frame: {other:?}"),
            }
        }
    })
    .await
    .expect("the open terminal is closed within 5 s of the engine going away")
    .expect("with a close frame");
    assert_eq!(u16::from(close.code), 1011, "{close:?}");
    assert_eq!(close.reason, "engine unavailable", "{close:?}");
    eprintln!(
        "[engine_restart] terminal closed {:?} after the kill",
        t_kill.elapsed()
    );

    // The execution in flight answers, never hangs: it runs through the in-sandbox agent, not
    // the engine, so it may well finish (the container outlives the engine's processes);
    // otherwise it is a 503 with a clear code.
    let (s, v, _) = tokio::time::timeout(Duration::from_secs(8), exec_in_flight)
        .await
        .expect("the execution in flight answers within 8 s of the engine going away")
        .unwrap();
    if s == 200 {
        assert_eq!(v["output"], "late\n", "{v}");
    } else {
        assert_eq!(s, 503, "{v}");
        let code = v["error"]["code"].as_str().unwrap_or("");
        assert!(
            code == "engine_unavailable" || code == "agent_unavailable",
            "{v}"
        );
    }

    // /healthz: 503 naming the engine.
    let t0 = Instant::now();
    let r = quick.get(api("/healthz")).send().await.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["engine"], "unavailable", "{v}");
    assert_eq!(v["store"], "ok", "{v}");
    assert_eq!(v["error"]["code"], "engine_unavailable", "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("engine"),
        "{v}"
    );

    // API calls: 503 engine_unavailable with Retry-After, within 2 s.
    for (method, path, body) in [
        ("GET", "/sandbox/status", Value::Null),
        ("POST", "/sandbox/init", json!({})),
        (
            "POST",
            "/sandbox/execute",
            json!({"code": "console.log(1)"}),
        ),
    ] {
        let t0 = Instant::now();
        let req = match method {
            "GET" => quick.get(api(path)),
            _ => quick.post(api(path)).json(&body),
        };
        let r = req.bearer_auth(token()).send().await.unwrap();
        let took = t0.elapsed();
        assert!(
            took < Duration::from_secs(2),
            "{method} {path} took {took:?}"
        );
        assert_eq!(r.status(), 503, "{method} {path}");
        let retry: u32 = r
            .headers()
            .get("retry-after")
            .unwrap_or_else(|| panic!("{method} {path}: no Retry-After"))
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=2).contains(&retry), "Retry-After {retry}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(
            v["error"]["code"], "engine_unavailable",
            "{method} {path}: {v}"
        );
    }
    // Store-only calls keep working.
    assert!(!events(&quick).await.is_empty());

    // Previews: the waiting page for browsers, 503 JSON for the rest.
    let t0 = Instant::now();
    let r = quick
        .get(preview("/"))
        .header("accept", "text/html,application/xhtml+xml")
        .send()
        .await
        .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert_eq!(r.status(), 503);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let page = r.text().await.unwrap();
    assert!(page.contains("http-equiv=\"refresh\""), "{page}");
    assert!(page.contains("engine"), "{page}");
    let r = quick.get(preview("/")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "engine_unavailable", "{v}");

    // A new terminal is refused with 503 at the handshake.
    let refused = open_terminal()
        .await
        .expect_err("no terminal while the engine is down");
    assert!(refused.contains("503"), "{refused}");

    let (slow, took) = tokio::time::timeout(Duration::from_secs(10), slow_in_flight)
        .await
        .expect("the slow preview request in flight answers")
        .unwrap();
    eprintln!("[engine_restart] slow preview request in flight: {slow:?} after {took:?}");

    // The poller never waited long, and saw the outage. It stops here, so that the first
    // request after the restart below is the one that starts the sandbox again.
    stop_polling.store(true, Ordering::Relaxed);
    let seen = poller.await.unwrap();
    let worst = Duration::from_millis(worst_ms.load(Ordering::Relaxed));
    eprintln!("[engine_restart] preview poller statuses {seen:?}, slowest answer {worst:?}");
    assert!(
        worst < Duration::from_secs(5),
        "a preview request took {worst:?}"
    );
    assert!(
        seen.contains_key(&503),
        "the poller saw the outage: {seen:?}"
    );

    // The engine comes back on the same data root; live-restore is off, so it stops the sandbox.
    let outage = t_kill.elapsed();
    let restart = lab.start_engine();
    eprintln!("[engine_restart] outage checks took {outage:?}; engine restarted in {restart:?}");
    let state = lab
        .dk(&["inspect", "--format", "{{.State.Running}}", &cid], 10)
        .unwrap();
    assert_eq!(
        state.trim(),
        "false",
        "the engine restart stopped the sandbox"
    );

    // Without restarting sandboxd: healthy again within a few pings.
    let t_back = Instant::now();
    loop {
        let r = quick.get(api("/healthz")).send().await.unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(
            t_back.elapsed() < Duration::from_secs(10),
            "/healthz still {} 10 s after the engine answered:\n{}",
            r.status(),
            lab.sandboxd_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "[engine_restart] /healthz 200 again {:?} after the engine answered",
        t_back.elapsed()
    );

    // The stopped sandbox is started again by the next request (a preview: the app is
    // autostarted), the same container, not a new one.
    assert_eq!(
        lab.dk(&["inspect", "--format", "{{.State.Running}}", &cid], 10)
            .unwrap()
            .trim(),
        "false",
        "nothing started the sandbox before the next request"
    );
    let t0 = Instant::now();
    let r = c.get(preview("/")).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", lab.sandboxd_log());
    assert_eq!(r.text().await.unwrap(), format!("hello from {USER}"));
    eprintln!(
        "[engine_restart] first preview after the restart answered in {:?}",
        t0.elapsed()
    );
    let (s, v, _) = call(&c, "GET", "/sandbox/status", Value::Null).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(v["containerId"], cid.as_str(), "{v}");
    let (s, v, _) = call(
        &c,
        "POST",
        "/sandbox/execute",
        json!({"code": "console.log('after')"}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["output"], "after\n", "{v}");
    let mut term = open_terminal().await.expect("a terminal opens again");
    assert_eq!(term_run(&mut term, "echo back").await, "back");
    let _ = term.close(None).await;

    // The store: one session naming the same container, nothing lost, nothing twice.
    let after = events(&c).await;
    for e in &before {
        assert!(after.contains(e), "event lost across the restart: {e}");
    }
    assert_eq!(count(&after, "created"), 1, "{after:?}");
    assert_eq!(
        count(&after, "started"),
        count(&before, "started") + 1,
        "{after:?}"
    );
    let ats: std::collections::HashSet<String> = after.iter().map(|e| e.to_string()).collect();
    assert_eq!(ats.len(), after.len(), "a duplicated event: {after:?}");
    {
        use sqlx::{Connection, Row};
        sqlx::any::install_default_drivers();
        let mut conn = sqlx::AnyConnection::connect(&db.url).await.unwrap();
        let rows = sqlx::query("SELECT user_id, container_id, state FROM sessions")
            .fetch_all(&mut conn)
            .await
            .unwrap();
        assert_eq!(rows.len(), 1, "one session row");
        let row = &rows[0];
        assert_eq!(row.get::<String, _>(0), USER);
        assert_eq!(
            row.get::<Option<String>, _>(1).as_deref(),
            Some(cid.as_str())
        );
        assert_eq!(row.get::<String, _>(2), "running");
        let n: i64 = sqlx::query("SELECT COUNT(*) FROM events WHERE kind = 'created'")
            .fetch_one(&mut conn)
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1);
        conn.close().await.unwrap();
    }
    // The lab's engine has exactly the one sandbox container.
    let ids = lab.dk(&["ps", "-aq", "--no-trunc"], 10).unwrap();
    assert_eq!(
        ids.split_whitespace().collect::<Vec<_>>(),
        vec![cid.as_str()]
    );

    drop(lab);
    eprintln!("[engine_restart] whole test {:?}", t_all.elapsed());
}
