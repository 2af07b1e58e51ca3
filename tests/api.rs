//! The sandbox API against the real engine: the whole flow, idempotency, single-flight, the
//! global cap, workspace persistence, bad input, and execute's semantics.

mod common;

use base64::Engine as _;
use common::*;
use serde_json::json;
use sha2::Digest;

#[tokio::test]
async fn whole_flow_init_execute_status_exit_and_workspace_persists() {
    let app = spawn_app().await;
    let a = app.init("42").await;
    assert_eq!(a["userId"], "42");
    assert_eq!(a["state"], "running");
    let cid = a["containerId"].as_str().unwrap().to_owned();
    assert!(a["previewUrl"]
        .as_str()
        .unwrap()
        .starts_with("http://user-42.preview.localhost:"));

    // Idempotent: the same running sandbox.
    let b = app.init("42").await;
    assert_eq!(b["containerId"], cid.as_str());
    assert_eq!(app.containers().len(), 1);

    let r = app.execute("42", json!({"code": "console.log(6*7)"})).await;
    assert_eq!(r["output"], "42\n");
    assert_eq!(r["error"], "");
    assert_eq!(r["exitCode"], 0);
    assert_eq!(r["timedOut"], false);
    assert_eq!(r["truncated"], false);

    let s = app.get("42", "/sandbox/status").await;
    assert_eq!(s.status(), 200);
    let s: serde_json::Value = s.json().await.unwrap();
    assert_eq!(s["containerId"], cid.as_str());
    assert_eq!(s["state"], "running");
    assert!(s["createdAt"].as_str().unwrap().ends_with('Z'));
    assert!(s["lastActivity"].as_str().unwrap().ends_with('Z'));

    // A file in the workspace survives exit and re-init.
    let r = app
        .execute(
            "42",
            json!({"code": "require('fs').writeFileSync('/workspace/keep.txt', 'kept')"}),
        )
        .await;
    assert_eq!(r["exitCode"], 0, "{r}");
    let x = app.post("42", "/sandbox/exit", json!({})).await;
    assert_eq!(x.status(), 200);
    assert!(app.containers().is_empty(), "container removed on exit");
    assert!(
        app.workspaces.join("user-42/keep.txt").exists(),
        "workspace stays on the host"
    );
    let s = app.get("42", "/sandbox/status").await;
    assert_eq!(s.status(), 404);
    let e: serde_json::Value = s.json().await.unwrap();
    assert_eq!(e["error"]["code"], "sandbox_not_found");

    let c = app.init("42").await;
    assert_ne!(c["containerId"], cid.as_str());
    let r = app
        .execute("42", json!({"code": "process.stdout.write(require('fs').readFileSync('/workspace/keep.txt'))"}))
        .await;
    assert_eq!(r["output"], "kept");

    // History: created, started, removed, created again.
    let ev: serde_json::Value = app.get("42", "/sandbox/events").await.json().await.unwrap();
    let kinds: Vec<&str> = ev["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    for k in ["created", "started", "removed"] {
        assert!(kinds.contains(&k), "{kinds:?}");
    }
}

#[tokio::test]
async fn twenty_concurrent_inits_make_one_container() {
    let app = spawn_app().await;
    let mut tasks = vec![];
    for _ in 0..20 {
        let client = app.client.clone();
        let url = format!("{}/sandbox/init", app.base);
        let token = app.token("7");
        tasks.push(tokio::spawn(async move {
            let r = client.post(url).bearer_auth(token).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<serde_json::Value>().await.unwrap()["containerId"]
                .as_str()
                .unwrap()
                .to_owned()
        }));
    }
    let mut ids = vec![];
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(app.containers().len(), 1);
}

#[tokio::test]
async fn global_cap_refuses_with_a_clear_code_then_frees_on_exit() {
    let app = spawn_app_with(|t| {
        t.insert("max_containers".into(), 2.into());
    })
    .await;
    app.init("1").await;
    app.init("2").await;
    let r = app.post("3", "/sandbox/init", json!({})).await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().get("retry-after").is_some());
    let e: serde_json::Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "capacity_exhausted");
    // The users already in are unaffected.
    assert_eq!(
        app.execute("1", json!({"code": "console.log(1)"})).await["output"],
        "1\n"
    );
    assert_eq!(
        app.post("2", "/sandbox/exit", json!({})).await.status(),
        200
    );
    app.init("3").await;
    assert_eq!(app.containers().len(), 2);
}

#[tokio::test]
async fn bad_input_gets_json_errors_with_stable_codes() {
    let app = spawn_app_with(|t| {
        t.insert("max_body_bytes".into(), 65536.into());
    })
    .await;
    let url = |p: &str| format!("{}{p}", app.base);
    let code = |v: &serde_json::Value| v["error"]["code"].as_str().unwrap_or("").to_owned();

    // Authentication.
    let r = app.client.post(url("/sandbox/init")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(code(&r.json().await.unwrap()), "unauthorized");
    for bad in ["nope", "a.b.c", &format!("{}x", app.token("1"))] {
        let r = app
            .client
            .post(url("/sandbox/init"))
            .bearer_auth(bad)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{bad}");
    }

    // Routing.
    let r = app.get("1", "/sandbox/nope").await;
    assert_eq!(r.status(), 404);
    assert_eq!(code(&r.json().await.unwrap()), "not_found");
    let r = app.get("1", "/sandbox/init").await;
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "POST");
    assert_eq!(code(&r.json().await.unwrap()), "method_not_allowed");

    // Bodies.
    let send = |body: Vec<u8>| {
        app.client
            .post(url("/sandbox/execute"))
            .bearer_auth(app.token("1"))
            .body(body)
            .send()
    };
    let r = send(vec![b'x'; 70_000]).await.unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(code(&r.json().await.unwrap()), "body_too_large");
    let r = send(b"{not json".to_vec()).await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(code(&r.json().await.unwrap()), "invalid_json");
    for body in [
        r#"{"code": 5}"#,
        r#"{"code": "1", "timeoutMs": 0}"#,
        r#"{"code": "1", "timeoutMs": -1}"#,
        r#"{"code": "1", "timeoutMs": 1e12}"#,
        r#"{"code": "1", "timeoutMs": "10"}"#,
        r#"{"code": "1", "timeoutMs": 60001}"#,
        r#"[]"#,
    ] {
        let r = send(body.as_bytes().to_vec()).await.unwrap();
        assert_eq!(r.status(), 422, "{body}");
        assert_eq!(code(&r.json().await.unwrap()), "invalid_request");
    }
    // None of that created anything.
    assert!(app.containers().is_empty());
    // Health.
    let r = app.client.get(url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn execute_timeout_kills_every_descendant() {
    let app = spawn_app().await;
    // A child that ignores SIGTERM and forks, then a busy loop.
    let code = r#"
        const { spawn } = require('child_process');
        spawn('bash', ['-c', 'trap "" TERM; sleep 1000 & sleep 1001 & wait'], { stdio: 'ignore' });
        console.log('started');
        while (true) {}
    "#;
    let r = app
        .execute("5", json!({"code": code, "timeoutMs": 1500}))
        .await;
    assert_eq!(r["timedOut"], true, "{r}");
    assert_eq!(r["output"], "started\n");
    assert!(r["durationMs"].as_u64().unwrap() >= 1500);
    let ps = app
        .execute("5", json!({"code": "console.log(require('child_process').execSync('ps -eo args').toString())"}))
        .await;
    let out = ps["output"].as_str().unwrap();
    assert!(!out.contains("sleep 100"), "leftovers: {out}");
    assert!(!out.contains("while"), "leftovers: {out}");
}

#[tokio::test]
async fn execute_caps_output_and_reports_exit_codes() {
    let app = spawn_app_with(|t| {
        t.insert("exec_max_output_bytes".into(), 65536.into());
    })
    .await;
    let r = app
        .execute("6", json!({"code": "process.stdout.write('y'.repeat(1<<20)); process.stderr.write('e'.repeat(1<<20))"}))
        .await;
    assert_eq!(r["truncated"], true);
    assert_eq!(r["output"].as_str().unwrap().len(), 65536);
    assert_eq!(r["error"].as_str().unwrap().len(), 65536);
    assert_eq!(r["exitCode"], 0);

    let r = app
        .execute(
            "6",
            json!({"code": "console.error('bad'); process.exit(3)"}),
        )
        .await;
    assert_eq!(r["exitCode"], 3);
    assert_eq!(r["error"], "bad\n");
    let r = app
        .execute("6", json!({"code": "throw new Error('boom')"}))
        .await;
    assert_eq!(r["exitCode"], 1);
    assert!(r["error"].as_str().unwrap().contains("boom"));
}

#[tokio::test]
async fn execute_runs_content_byte_exact_and_large() {
    let app = spawn_app().await;
    let hash_self = "console.log(require('crypto').createHash('sha256').update(require('fs').readFileSync(__filename)).digest('hex'))";
    // Quotes, $(…), backticks, a NUL byte, a non-UTF-8 byte (in a comment): base64 carries it.
    let mut code = format!("// '\"$(rm -rf /)`id` \u{0}\n{hash_self}\n").into_bytes();
    code.extend_from_slice(b"// \xff\xfe\n");
    let expected = hex::encode(sha2::Sha256::digest(&code));
    let b64 = base64::engine::general_purpose::STANDARD.encode(&code);
    let r = app
        .execute("8", json!({"code": b64, "encoding": "base64"}))
        .await;
    assert_eq!(r["output"].as_str().unwrap().trim(), expected, "{r}");

    // The same through plain JSON text (quotes, $( ), backticks, NUL).
    let text = format!(
        "const s = '\"$(echo hi)`id`\\'\u{0}';\nconsole.log(JSON.stringify(s));\n{hash_self}\n"
    );
    let r = app.execute("8", json!({"code": text})).await;
    let lines: Vec<&str> = r["output"].as_str().unwrap().lines().collect();
    assert_eq!(lines[0], r#""\"$(echo hi)`id`'\u0000""#);
    assert_eq!(lines[1], hex::encode(sha2::Sha256::digest(text.as_bytes())));

    // Several MiB of code: no argument-size limit.
    let big = format!("/*{}*/ console.log('big ok')", "x".repeat(5 << 20));
    let r = app.execute("8", json!({"code": big})).await;
    assert_eq!(r["output"], "big ok\n", "{}", r["error"]);
}

/// The idle policy never freezes a sandbox under a run that outlasts the idle timeout: an
/// execution in flight counts as activity, like an open terminal.
#[tokio::test]
async fn a_long_execution_is_not_paused_by_the_idle_policy() {
    let app = spawn_app_with(|t| {
        t.insert("idle_pause_after".into(), "1s".into());
        t.insert("idle_stop_after".into(), "2s".into());
        t.insert("idle_check_every".into(), "100ms".into());
    })
    .await;
    app.init("31").await;
    let r = app
        .execute(
            "31",
            json!({"code": "setTimeout(() => console.log('still here'), 3500)", "timeoutMs": 10000}),
        )
        .await;
    assert_eq!(r["output"], "still here\n", "{r}");
    assert_eq!(r["exitCode"], 0, "{r}");
    let ev: serde_json::Value = app.get("31", "/sandbox/events").await.json().await.unwrap();
    let text = ev.to_string();
    assert!(!text.contains("\"paused\""), "paused during a run: {ev}");
    assert!(!text.contains("\"stopped\""), "stopped during a run: {ev}");
}
