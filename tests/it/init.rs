//! The image's init (sandbox-image/sandboxd-init): the bash boot path finds and starts
//! the preview app as the Node init did, hands what its JSON reader cannot tell to Node, keeps the
//! cwd inside the workspace, and leaves the management roles working.

use std::os::unix::fs::{chown, symlink};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::{json, Value};

fn ws(app: &TestApp, user: &str) -> PathBuf {
    let d = app.workspaces.join(format!("user-{user}"));
    std::fs::create_dir_all(d.join(".sandboxd")).unwrap();
    d
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// Gives the whole workspace to the sandbox user (as the templates API would have).
fn own(dir: &Path) {
    let out = std::process::Command::new("chown")
        .args(["-R", "-h", "1000:1000"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    chown(dir, Some(1000), Some(1000)).unwrap();
}

/// The JSON line the init printed at boot (the container's log), within 30 s.
async fn boot_line(id: &str) -> Value {
    let t = Instant::now();
    loop {
        let out = std::process::Command::new("docker")
            .args(["logs", id])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if let Some(l) = text.lines().find(|l| l.starts_with('{')) {
            return serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no boot line from the init: {text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn status(app: &TestApp, user: &str) -> Value {
    let r = app
        .execute(
            user,
            json!({"code": "process.stdout.write(require('child_process').execFileSync('sandboxd-init', ['--status']))"}),
        )
        .await;
    assert_eq!(r["exitCode"], 0, "{r}");
    serde_json::from_str(r["output"].as_str().unwrap().trim()).unwrap()
}

async fn boot(app: &TestApp, user: &str) -> Value {
    let init = app.init(user).await;
    boot_line(init["containerId"].as_str().unwrap()).await
}

const SERVER: &str =
    "require('http').createServer((q, s) => s.end('ok')).listen(5173, '0.0.0.0');\n";

#[tokio::test]
async fn the_boot_path_starts_the_app_like_the_node_init_did() {
    let app = spawn_app().await;

    // preview.json with a cwd and a command (read by bash): started there, own process group.
    let d = ws(&app, "51");
    write(&d.join("app/server.js"), SERVER);
    write(
        &d.join(".sandboxd/preview.json"),
        r#"{"cwd": "app", "command": "echo \"port=$PORT host=$HOST\"; exec node server.js", "other": [1, {"x": null}]}"#,
    );
    own(&d);
    let b = boot(&app, "51").await;
    assert_eq!(b["started"], true, "{b}");
    assert_eq!(b["cwd"], "/workspace/app", "{b}");
    assert_eq!(b["source"], "preview.json", "{b}");
    assert_eq!(
        b["command"],
        "echo \"port=$PORT host=$HOST\"; exec node server.js"
    );
    assert_eq!(b["log"], "/workspace/.sandboxd/dev.log");
    let s = status(&app, "51").await;
    assert_eq!(s["running"], true, "{s}");
    assert_eq!(s["pid"], b["pid"], "{s}");
    let r = app
        .execute(
            "51",
            json!({"code": "const p = require('fs').readFileSync('/tmp/sandboxd-dev.pid', 'utf8').trim(); console.log(require('fs').readFileSync(`/proc/${p}/stat`, 'utf8').split(') ')[1].split(' ')[2] === p)"}),
        )
        .await;
    assert_eq!(
        r["output"], "true\n",
        "the app leads its own process group: {r}"
    );
    let t = Instant::now();
    while !std::fs::read_to_string(d.join(".sandboxd/dev.log"))
        .unwrap_or_default()
        .contains("port=5173 host=0.0.0.0")
    {
        assert!(t.elapsed() < Duration::from_secs(20), "dev.log");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A command that is only words: exec'd as they are (no bash between the init and the app),
    // in its own session, without the agent's key, the agent started after it all the same.
    let d = ws(&app, "57");
    write(&d.join("server.js"), SERVER);
    write(
        &d.join(".sandboxd/preview.json"),
        r#"{"command": "node server.js"}"#,
    );
    own(&d);
    let b = boot(&app, "57").await;
    assert_eq!(b["started"], true, "{b}");
    assert_eq!(b["command"], "node server.js", "{b}");
    let r = app
        .execute(
            "57",
            json!({"code": "const fs = require('fs'); const p = fs.readFileSync('/tmp/sandboxd-dev.pid', 'utf8').trim(); const st = fs.readFileSync(`/proc/${p}/stat`, 'utf8').split(') ')[1].split(' '); console.log(JSON.stringify([fs.readFileSync(`/proc/${p}/cmdline`, 'utf8'), st[3] === p, fs.readFileSync(`/proc/${p}/environ`, 'utf8').includes('SANDBOXD_AGENT_KEY')]))"}),
        )
        .await;
    assert_eq!(r["exitCode"], 0, "{r}");
    assert_eq!(
        r["output"], "[\"node\\u0000server.js\\u0000\",true,false]\n",
        "the app is node itself, leads its session, has no agent key: {r}"
    );

    // A \u escape: the bash reader leaves it to Node, which decodes it and starts the app.
    let d = ws(&app, "52");
    write(&d.join("server.js"), SERVER);
    write(
        &d.join(".sandboxd/preview.json"),
        r#"{"command": "exec node \u0073erver.js"}"#,
    );
    own(&d);
    let b = boot(&app, "52").await;
    assert_eq!(b["started"], true, "{b}");
    assert_eq!(b["command"], "exec node server.js", "{b}");

    // A cwd that leaves the workspace, as written or through a symlink: nothing starts.
    let d = ws(&app, "53");
    write(
        &d.join(".sandboxd/preview.json"),
        r#"{"cwd": "../..", "command": "sleep 100"}"#,
    );
    own(&d);
    let b = boot(&app, "53").await;
    assert_eq!(b["started"], false, "{b}");
    assert!(
        b["reason"]
            .as_str()
            .unwrap()
            .contains("escapes the workspace"),
        "{b}"
    );
    let d = ws(&app, "54");
    symlink("/etc", d.join("out")).unwrap();
    write(
        &d.join(".sandboxd/preview.json"),
        r#"{"cwd": "out", "command": "sleep 100"}"#,
    );
    own(&d);
    let b = boot(&app, "54").await;
    assert_eq!(b["started"], false, "{b}");
    assert!(
        b["reason"]
            .as_str()
            .unwrap()
            .contains("escapes the workspace"),
        "{b}"
    );
    assert_eq!(status(&app, "54").await["running"], false);

    // No app at all.
    let b = boot(&app, "55").await;
    assert_eq!(b["started"], false, "{b}");
    assert_eq!(
        b["reason"],
        "no preview app (no .sandboxd/preview.json and no scripts.dev in package.json)"
    );

    // package.json with scripts.dev, no preview.json: the default command.
    let d = ws(&app, "56");
    write(&d.join("server.js"), SERVER);
    write(
        &d.join("package.json"),
        r#"{"name": "p", "scripts": {"build": "x", "dev": "node server.js"}, "dependencies": {"a": "^1"}}"#,
    );
    own(&d);
    let b = boot(&app, "56").await;
    assert_eq!(b["started"], true, "{b}");
    assert_eq!(b["source"], "package.json", "{b}");
    assert_eq!(b["command"], "npm run dev -- --host 0.0.0.0 --port 5173");
    // The management roles still work: stop, then restart.
    let r = app
        .execute(
            "56",
            json!({"code": "process.stdout.write(require('child_process').execFileSync('sandboxd-init', ['--stop-dev']))"}),
        )
        .await;
    let stop: Value = serde_json::from_str(r["output"].as_str().unwrap().trim()).unwrap();
    assert_eq!(stop["stopped"], true, "{r}");
    assert_eq!(status(&app, "56").await["running"], false);
}
