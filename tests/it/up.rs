//! `scripts/up`, the README's run command, as a newcomer runs it (with the binary this test
//! run built instead of a release build, through `UP_BIN`): every step prints its progress and
//! how long it took, the server is ready only once it answers `/healthz`, the token and URLs
//! follow, a second run is ready again, and a TERM stops the server. Variables meant for tests
//! and tools (`SANDBOXD_E2E_*`, `SANDBOXD_TEST_*`) are in the environment on purpose: they must
//! not break the script's `sandboxd token`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::common::*;

struct Up {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Up {
    fn start(config: &std::path::Path, http: u16, https: u16) -> Up {
        let mut cmd = Command::new("bash");
        for (k, _) in std::env::vars() {
            if k.starts_with("SANDBOXD_") {
                cmd.env_remove(k);
            }
        }
        cmd.arg("scripts/up")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("UP_BIN", env!("CARGO_BIN_EXE_sandboxd"))
            .env("SANDBOXD_CONFIG", config)
            .env("SANDBOXD_HTTP_ADDR", format!("127.0.0.1:{http}"))
            .env("SANDBOXD_HTTPS_ADDR", format!("127.0.0.1:{https}"))
            .env("SANDBOXD_E2E_BASE", "http://127.0.0.1:1")
            .env("SANDBOXD_TEST_SOMETHING", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("bash scripts/up");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                println!("[up] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Up {
            child,
            lines,
            seen: vec![],
        }
    }

    /// Reads lines until one satisfies `f`, for at most `within`.
    fn until(&mut self, what: &str, within: Duration, f: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + within;
        loop {
            let left = end
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("no {what} within {within:?}: {:#?}", self.seen));
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if f(&l) {
                        return l;
                    }
                }
                Err(_) => panic!("no {what} within {within:?}: {:#?}", self.seen),
            }
        }
    }

    /// TERM to the script, which stops the server gracefully and exits.
    fn stop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(30);
        while Instant::now() < end {
            if self.child.try_wait().unwrap().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        panic!("scripts/up did not stop within 30 s of a TERM");
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            std::thread::sleep(Duration::from_secs(2));
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

struct Cleanup(String);
impl Drop for Cleanup {
    fn drop(&mut self) {
        cleanup_instance(&self.0);
    }
}

#[tokio::test]
async fn scripts_up_shows_each_step_then_is_ready_with_a_token_and_stops_on_term() {
    // Alone: the script ensures the engine, the image and the console build the other tests
    // use, and its server adds a network interface.
    let _alone = gate::alone().await;
    require_docker();
    let dir = tempfile::tempdir().unwrap();
    let instance = instance_name();
    let _cleanup = Cleanup(instance.clone());
    let db = format!("sqlite://{}/up.db", dir.path().display());
    let mut table = test_table(&instance, dir.path(), &db);
    table.remove("http_addr");
    table.insert("metrics_addr".into(), "".into());
    let config = dir.path().join("sandboxd.toml");
    std::fs::write(&config, toml::to_string(&table).unwrap()).unwrap();

    for run in 1..=2 {
        let (http, https) = (free_port(), free_port());
        let started = Instant::now();
        let mut up = Up::start(&config, http, https);
        for step in [
            "ensure the Docker engine",
            "ensure the sandbox image",
            "build the web console",
        ] {
            let header = format!("== {step}");
            up.until(&header, Duration::from_secs(600), |l| l == header);
            let took = format!("== {step} (took ");
            up.until(&took, Duration::from_secs(600), |l| l.starts_with(&took));
        }
        up.until("the skipped build", Duration::from_secs(30), |l| {
            l.starts_with("== build sandboxd: skipped, using UP_BIN=")
        });
        up.until("start", Duration::from_secs(30), |l| {
            l == "== start sandboxd"
        });
        up.until("start's duration", Duration::from_secs(90), |l| {
            l.starts_with("== start sandboxd (took ")
        });
        up.until("the ready line", Duration::from_secs(30), |l| {
            l.starts_with("sandboxd is ready (")
        });
        let ready = started.elapsed();
        println!("run {run}: ready after {ready:?}");
        // Ready means answering: the health check, the console URL and a token that works.
        let base = format!("http://127.0.0.1:{http}");
        let r = reqwest::get(format!("{base}/healthz")).await.unwrap();
        assert_eq!(r.status(), 200);
        up.until("the console URL", Duration::from_secs(10), |l| {
            l.contains(&format!("open http://localhost:{http}/"))
        });
        up.until("the preview URL", Duration::from_secs(10), |l| {
            l.contains(&format!("http://user-1.preview.localhost:{http}/"))
        });
        up.until("the token header", Duration::from_secs(10), |l| {
            l.trim_start().starts_with("token for user 1")
        });
        let token = up.until("the token", Duration::from_secs(10), |l| {
            !l.trim().is_empty()
        });
        let r = reqwest::Client::new()
            .get(format!("{base}/sandbox/events"))
            .bearer_auth(token.trim())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "the printed token is accepted");
        up.stop();
        // The server is gone with the script.
        let gone = reqwest::Client::new()
            .get(format!("{base}/healthz"))
            .timeout(Duration::from_secs(2))
            .send()
            .await;
        assert!(
            gone.is_err(),
            "sandboxd still answers after a TERM to scripts/up"
        );
    }
}
