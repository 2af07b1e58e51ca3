//! Point 6: symlinks and hardlinks planted in a workspace (or in place of one) never make
//! sandboxd read or write outside that user's workspace: workspace creation, the ownership
//! fix, code upload (execute), templates, terminal cwd, exit and re-init.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde_json::json;

use crate::common::ws::{term_url, ws_open, Term};
use crate::common::*;
use crate::support::*;

/// Every file under `dir` with its owner and size, for before/after comparisons.
pub(crate) fn snapshot(dir: &Path) -> Vec<(String, u32, u64)> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            out.push((e.path().display().to_string(), m.uid(), m.len()));
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    out.sort();
    out
}

/// A host folder that stands for anything outside the workspaces: root-owned, with a file.
pub(crate) fn victim(root: &Path) -> std::path::PathBuf {
    let v = root.join("victim");
    std::fs::create_dir_all(&v).unwrap();
    std::fs::write(v.join("secret"), "do not touch").unwrap();
    std::os::unix::fs::chown(&v, Some(0), Some(0)).unwrap();
    v
}

#[tokio::test]
async fn a_workspace_that_is_a_symlink_or_a_file_is_refused_at_init() {
    let app = spawn_app().await;
    let outside = tempfile::tempdir().unwrap();
    let victim = victim(outside.path());
    let before = snapshot(outside.path());
    std::fs::create_dir_all(&app.workspaces).unwrap();
    // user-l1 -> a host folder; user-l2 -> another user's workspace; user-l3 a plain file.
    std::os::unix::fs::symlink(&victim, app.workspaces.join("user-l1")).unwrap();
    std::fs::create_dir_all(app.workspaces.join("user-l9")).unwrap();
    std::os::unix::fs::symlink(
        app.workspaces.join("user-l9"),
        app.workspaces.join("user-l2"),
    )
    .unwrap();
    std::fs::write(app.workspaces.join("user-l3"), "x").unwrap();
    for (user, why) in [
        ("l1", "symlink"),
        ("l2", "symlink"),
        ("l3", "not a directory"),
    ] {
        let r = app.post(user, "/sandbox/init", json!({})).await;
        assert_eq!(r.status(), 500, "{user}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "workspace_unusable", "{body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(why),
            "{body}"
        );
        // Execute and the terminal take the same path.
        let r = app
            .post(user, "/sandbox/execute", json!({"code": "1"}))
            .await;
        assert_eq!(r.status(), 500, "{user}");
    }
    assert!(app.containers().is_empty(), "a container was made");
    assert_eq!(snapshot(outside.path()), before, "the host folder changed");
    let l9 = std::fs::metadata(app.workspaces.join("user-l9")).unwrap();
    assert_eq!(
        l9.uid(),
        0,
        "another user's folder was chowned through the link"
    );
}

#[tokio::test]
async fn links_planted_inside_a_workspace_never_lead_sandboxd_outside_it() {
    let app = spawn_app().await;
    let outside = tempfile::tempdir().unwrap();
    let victim = victim(outside.path());
    // A workspace prepared on the host with a link to the victim, owned by root: the
    // ownership fix applies to the folder itself, never through what is inside.
    let ws = app.workspaces.join("user-f1");
    std::fs::create_dir_all(&ws).unwrap();
    std::os::unix::fs::symlink(victim.join("secret"), ws.join("evil")).unwrap();
    let other = app.workspaces.join("user-f2");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("mine"), "f2's").unwrap();
    let before_victim = snapshot(outside.path());
    let before_other = snapshot(&other);
    app.init("f1").await;
    assert_eq!(
        std::fs::metadata(&ws).unwrap().uid(),
        1000,
        "workspace chowned"
    );
    assert_eq!(std::fs::metadata(victim.join("secret")).unwrap().uid(), 0);

    // From inside: plant links to /etc/shadow, to /, to the host paths of the victim and of
    // another user's workspace, as the folders sandboxd's own runner writes to.
    let host_other = other.display().to_string();
    let host_victim = victim.display().to_string();
    let plant = format!(
        r#"
        const fs = require('fs'), cp = require('child_process');
        const out = {{}};
        const ln = (t, p) => {{ try {{ fs.symlinkSync(t, p); return 'ok'; }} catch (e) {{ return e.code; }} }};
        const hard = (t, p) => {{ try {{ fs.linkSync(t, p); return 'ok'; }} catch (e) {{ return e.code; }} }};
        out.shadow = ln('/etc/shadow', '/workspace/shadow');
        out.root = ln('/', '/workspace/root');
        out.other = ln('{host_other}', '/workspace/other');
        out.victim = ln('{host_victim}', '/workspace/victim');
        out.hardShadow = hard('/etc/shadow', '/workspace/hard-shadow');
        out.hardPasswd = hard('/etc/passwd', '/workspace/hard-passwd');
        fs.rmSync('/workspace/.sandboxd', {{ recursive: true, force: true }});
        out.dot = ln('{host_other}', '/workspace/.sandboxd');
        console.log(JSON.stringify(out));
        "#
    );
    let v = js(&app, "f1", &plant).await;
    assert_eq!(v["shadow"], "ok", "{v}");
    assert_eq!(v["dot"], "ok", "{v}");
    // Hardlinks to files outside the workspace's file system cannot even be made.
    assert_ne!(v["hardShadow"], "ok", "{v}");
    assert_ne!(v["hardPasswd"], "ok", "{v}");

    // Code upload with /workspace/.sandboxd pointing at the other workspace's host path: the
    // runner works inside the container's own file system (that path does not exist there),
    // and nothing reaches the host folder. Then .sandboxd/exec -> / and -> /etc: the writes
    // fail in the read-only root. (The links are planted through the terminal: a broken
    // runner folder stops execute for this user, which is theirs to fix.)
    let ran = app
        .post(
            "f1",
            "/sandbox/execute",
            json!({"code": "console.log('ran')"}),
        )
        .await;
    assert_eq!(ran.status(), 200);
    let mut t = Term::open(&app, "f1", "").await.with_step(TERM_STEP);
    for target in ["/", "/etc", &host_victim] {
        t.output(&format!(
            "rm -rf /workspace/.sandboxd; mkdir /workspace/.sandboxd && ln -s '{target}' /workspace/.sandboxd/exec && echo planted"
        ))
        .await;
        let r = app
            .post(
                "f1",
                "/sandbox/execute",
                json!({"code": "console.log('ran')"}),
            )
            .await;
        assert_eq!(r.status(), 200);
        let body: serde_json::Value = r.json().await.unwrap();
        assert_ne!(body["output"], "ran\n", "{target}: {body}");
    }
    assert_eq!(
        t.output("rm -rf /workspace/.sandboxd && echo clean").await,
        "clean"
    );
    let r = app
        .execute("f1", json!({"code": "console.log('ran')"}))
        .await;
    assert_eq!(r["output"], "ran\n");
    // A project name that is a planted link is refused (it exists), not followed.
    let r = app
        .post(
            "f1",
            "/sandbox/projects",
            json!({"template": "node", "name": "root"}),
        )
        .await;
    assert_eq!(r.status(), 409, "{}", r.text().await.unwrap());
    // The terminal's cwd through a link resolves inside the container, not on the host.
    assert!(!t
        .output("cat /workspace/victim/secret")
        .await
        .contains("do not touch"));
    let auth = format!("Bearer {}", app.token("f1"));
    if let Ok((mut ws2, _)) = ws_open(
        &term_url(&app, "?cwd=/workspace/victim"),
        &[("authorization", &auth)],
    )
    .await
    {
        let _ = futures_util::SinkExt::close(&mut ws2).await;
    }
    drop(t);

    // Exit (removes the container) and re-init: the links stay in the workspace, nothing is
    // removed or followed on the host.
    let r = app.post("f1", "/sandbox/exit", json!({})).await;
    assert_eq!(r.status(), 200);
    app.init("f1").await;
    assert!(std::fs::symlink_metadata(ws.join("shadow"))
        .unwrap()
        .file_type()
        .is_symlink());

    assert_eq!(
        snapshot(outside.path()),
        before_victim,
        "the host folder changed"
    );
    assert_eq!(
        snapshot(&other),
        before_other,
        "another user's workspace changed"
    );
    assert_eq!(
        std::fs::read_to_string(victim.join("secret")).unwrap(),
        "do not touch"
    );
    // Nothing appeared next to the workspaces either.
    let names: Vec<String> = std::fs::read_dir(&app.workspaces)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut names = names;
    names.sort();
    assert_eq!(names, ["user-f1", "user-f2"]);
}
