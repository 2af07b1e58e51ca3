//! Restart safety: SIGKILL the real binary, start it again, and every sandbox is still there
//! and reachable through the API; a container lost while the server was down is reconciled.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::common::*;
use serde_json::json;

struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(env: &[(String, String)]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sandboxd"))
        .arg("serve")
        .envs(env.iter().cloned())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("listening on http://").nth(1) {
                let _ = tx.send(rest.trim().to_owned());
            }
            eprintln!("[server] {line}");
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("server printed its address");
    Server {
        child,
        base: format!("http://{addr}"),
    }
}

#[tokio::test]
async fn sigkill_and_restart_keeps_every_sandbox() {
    // Its server is no TestApp: it holds its place beside the others itself.
    let _gate = gate::shared().await;
    require_docker();
    let dir = tempfile::tempdir().unwrap();
    let instance = instance_name();
    let db = test_db().await;
    let env: Vec<(String, String)> = [
        ("SANDBOXD_HTTP_ADDR", "127.0.0.1:0".to_owned()),
        ("SANDBOXD_METRICS_ADDR", "127.0.0.1:0".to_owned()),
        ("SANDBOXD_INSTANCE", instance.clone()),
        ("SANDBOXD_DATABASE_URL", db.url.clone()),
        (
            "SANDBOXD_WORKSPACES_DIR",
            dir.path().join("ws").display().to_string(),
        ),
        (
            "SANDBOXD_CERTS_DIR",
            dir.path().join("certs").display().to_string(),
        ),
        ("SANDBOXD_AUTH_SECRET", SECRET.to_owned()),
        ("SANDBOXD_IMAGE", image()),
        ("SANDBOXD_STOP_TIMEOUT", "1s".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            cleanup_instance(&self.0);
        }
    }
    let _cleanup = Cleanup(instance.clone());

    let auth = sandboxd::auth::Auth::new(SECRET.as_bytes());
    let tok = |u: &str| {
        auth.issue(
            &sandboxd::user::UserId::parse(u).unwrap(),
            Duration::from_secs(600),
        )
        .unwrap()
    };
    let client = reqwest::Client::new();
    let call = |base: String,
                method: &'static str,
                path: &'static str,
                user: &str,
                body: serde_json::Value| {
        let req = match method {
            "GET" => client.get(format!("{base}{path}")),
            _ => client.post(format!("{base}{path}")).json(&body),
        };
        req.bearer_auth(tok(user)).send()
    };

    let a = start(&env);
    let r = call(a.base.clone(), "POST", "/sandbox/init", "1", json!({}))
        .await
        .unwrap();
    let c1: serde_json::Value = r.json().await.unwrap();
    let r = call(a.base.clone(), "POST", "/sandbox/init", "2", json!({}))
        .await
        .unwrap();
    let c2: serde_json::Value = r.json().await.unwrap();
    let r = call(
        a.base.clone(),
        "POST",
        "/sandbox/execute",
        "1",
        json!({"code": "require('fs').writeFileSync('/workspace/a', 'x')"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    drop(a); // SIGKILL

    // While the server is down, user 2's container disappears.
    let id2 = c2["containerId"].as_str().unwrap();
    assert!(Command::new("docker")
        .args(["rm", "-f", id2])
        .status()
        .unwrap()
        .success());

    let b = start(&env);
    let s: serde_json::Value = call(b.base.clone(), "GET", "/sandbox/status", "1", json!(null))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(s["containerId"], c1["containerId"], "{s}");
    assert_eq!(s["state"], "running");
    let r: serde_json::Value = call(
        b.base.clone(),
        "POST",
        "/sandbox/execute",
        "1",
        json!({"code": "process.stdout.write(require('fs').readFileSync('/workspace/a'))"}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(r["output"], "x");
    let again: serde_json::Value = call(b.base.clone(), "POST", "/sandbox/init", "1", json!({}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(again["containerId"], c1["containerId"]);

    // User 2: reconciled as removed, then a fresh container on init.
    let r = call(b.base.clone(), "GET", "/sandbox/status", "2", json!(null))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let ev: serde_json::Value = call(b.base.clone(), "GET", "/sandbox/events", "2", json!(null))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        ev.to_string().contains("container missing at start-up"),
        "{ev}"
    );
    let n2: serde_json::Value = call(b.base.clone(), "POST", "/sandbox/init", "2", json!({}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_ne!(n2["containerId"], c2["containerId"]);
    // Nothing orphaned: exactly the two sandboxes exist.
    assert_eq!(containers_of(&instance).len(), 2);
}
