//! The sandbox API against the real engine: the whole flow, idempotency, single-flight, the
//! global cap, workspace persistence, bad input, and execute's semantics.

use crate::common::*;
use base64::Engine as _;
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
    let r = openapi::checked("POST", "/sandbox/init", r).await;
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
    let execute = "/sandbox/execute";
    let r = openapi::checked("POST", execute, send(vec![b'x'; 70_000]).await.unwrap()).await;
    assert_eq!(r.status(), 413);
    assert_eq!(code(&r.json().await.unwrap()), "body_too_large");
    let r = openapi::checked("POST", execute, send(b"{not json".to_vec()).await.unwrap()).await;
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
        let r = openapi::checked("POST", execute, r).await;
        assert_eq!(r.status(), 422, "{body}");
        assert_eq!(code(&r.json().await.unwrap()), "invalid_request");
    }
    // None of that created anything.
    assert!(app.containers().is_empty());
    // Health.
    let r = app.client.get(url("/healthz")).send().await.unwrap();
    let r = openapi::checked("GET", "/healthz", r).await;
    assert_eq!(r.status(), 200);
}

/// The README promises 422 for unknown fields on every JSON body, projects included.
#[tokio::test]
async fn project_bodies_with_unknown_fields_are_refused() {
    let app = spawn_app().await;
    for body in [
        serde_json::json!({"template": "node", "name": "x", "extra": 1}),
        serde_json::json!({"template": "node", "name": "x", "containerId": "abc"}),
    ] {
        let r = app.post("1", "/sandbox/projects", body.clone()).await;
        let r = openapi::checked("POST", "/sandbox/projects", r).await;
        assert_eq!(r.status(), 422, "{body}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "invalid_request", "{body}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("unknown field"),
            "{v}"
        );
    }
    // Refused before anything ran.
    assert!(app.containers().is_empty());
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

/// The OpenAPI document is served (README, "Using the API"), and every endpoint's answers (successes and
/// errors) match it. (Every answer through `app.get`/`app.post` is checked too.)
#[tokio::test]
async fn openapi_document_is_served_and_every_endpoint_answers_as_documented() {
    let app = spawn_app().await;
    let url = |p: &str| format!("{}{p}", app.base);
    let c = &app.client;
    let tok = app.token("31");

    // The document itself, without a token, byte for byte the committed file.
    let r = c.get(url("/openapi.json")).send().await.unwrap();
    assert_eq!(r.headers()["content-type"], "application/json");
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    let (s, doc) = openapi::json_of("GET", "/openapi.json", r).await;
    assert_eq!(s, 200);
    assert_eq!(&doc, openapi::doc());
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));

    // Health.
    let r = c.get(url("/healthz")).send().await.unwrap();
    assert_eq!(openapi::json_of("GET", "/healthz", r).await.0, 200);

    // Errors before a sandbox exists.
    let r = c.post(url("/sandbox/init")).send().await.unwrap();
    let (s, e) = openapi::json_of("POST", "/sandbox/init", r).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let r = c
        .get(url("/sandbox/status"))
        .bearer_auth(&tok)
        .send()
        .await
        .unwrap();
    let (s, e) = openapi::json_of("GET", "/sandbox/status", r).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (404, Some("sandbox_not_found"))
    );
    let r = c
        .delete(url("/sandbox/status"))
        .bearer_auth(&tok)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    let e: serde_json::Value = r.json().await.unwrap();
    openapi::check_error(&e);
    assert_eq!(e["error"]["code"], "method_not_allowed");
    let r = c
        .get(url("/sandbox/exit"))
        .bearer_auth(&tok)
        .send()
        .await
        .unwrap();
    let (s, e) = openapi::json_of("GET", "/sandbox/exit", r).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (405, Some("method_not_allowed"))
    );
    let r = c
        .get(url("/sandbox/jobs/nope"))
        .bearer_auth(&tok)
        .send()
        .await
        .unwrap();
    let (s, e) = openapi::json_of("GET", "/sandbox/jobs/nope", r).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (404, Some("job_not_found"))
    );
    let r = c
        .get(url("/sandbox/terminal"))
        .bearer_auth(&tok)
        .send()
        .await
        .unwrap();
    let (s, e) = openapi::json_of("GET", "/sandbox/terminal", r).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (400, Some("not_websocket"))
    );
    let r = c
        .get(url("/sandbox/status"))
        .header("host", "elsewhere.example")
        .send()
        .await
        .unwrap();
    let (s, e) = openapi::json_of("GET", "/sandbox/status", r).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (404, Some("unknown_host"))
    );
    for (body, status, code) in [
        (&b"{"[..], 400, "invalid_json"),
        (br#"{"code":"1","extra":1}"#, 422, "invalid_request"),
        (br#"{"code":"1","timeoutMs":0}"#, 422, "invalid_request"),
    ] {
        let r = c
            .post(url("/sandbox/execute"))
            .bearer_auth(&tok)
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        let (s, e) = openapi::json_of("POST", "/sandbox/execute", r).await;
        assert_eq!((s, e["error"]["code"].as_str()), (status, Some(code)));
    }
    let r = app
        .post(
            "31",
            "/sandbox/projects",
            json!({"template": "php", "name": "x"}),
        )
        .await;
    assert_eq!(r.status(), 422);
    assert!(app.containers().is_empty());

    // The whole life of a sandbox; each answer is checked by app.post/app.get, and here again
    // explicitly against its template.
    let init = app.init("31").await;
    openapi::check("POST", "/sandbox/init", 200, &init);
    let run = app.execute("31", json!({"code": "console.log(1)"})).await;
    openapi::check("POST", "/sandbox/execute", 200, &run);
    let timed = app
        .execute("31", json!({"code": "while(true){}", "timeoutMs": 300}))
        .await;
    assert_eq!(timed["timedOut"], true);
    openapi::check("POST", "/sandbox/execute", 200, &timed);
    for (path, status) in [("/sandbox/status", 200), ("/sandbox/events", 200)] {
        let r = app.get("31", path).await;
        let (s, v) = openapi::json_of("GET", path, r).await;
        assert_eq!(s, status, "{path}: {v}");
    }
    let r = app.post("31", "/sandbox/preview-link", json!({})).await;
    let (s, link) = openapi::json_of("POST", "/sandbox/preview-link", r).await;
    assert_eq!(s, 200);
    assert!(link["url"].as_str().unwrap().contains("sandboxd_token="));

    let r = app
        .post(
            "31",
            "/sandbox/projects",
            json!({"template": "node", "name": "app"}),
        )
        .await;
    let (s, job) = openapi::json_of("POST", "/sandbox/projects", r).await;
    assert_eq!(s, 202, "{job}");
    let id = job["id"].as_str().unwrap().to_owned();
    let r = app.get("31", &format!("/sandbox/jobs/{id}")).await;
    let (s, job) = openapi::json_of("GET", "/sandbox/jobs/{id}", r).await;
    assert_eq!(s, 200);
    assert_eq!(job["id"], id.as_str());

    let r = app.post("31", "/sandbox/exit", json!({})).await;
    let (s, _) = openapi::json_of("POST", "/sandbox/exit", r).await;
    assert_eq!(s, 200);
}

/// The checker itself refuses what the document does not say.
#[test]
fn openapi_check_refuses_undocumented_answers() {
    let refused = |f: fn()| std::panic::catch_unwind(f).is_err();
    // An undocumented status, route and method.
    assert!(refused(|| openapi::check(
        "GET",
        "/sandbox/status",
        418,
        &json!({"error": {"code": "internal", "message": ""}})
    )));
    assert!(refused(|| openapi::check(
        "GET",
        "/sandbox/nope",
        200,
        &json!({})
    )));
    assert!(refused(|| openapi::check(
        "PUT",
        "/sandbox/status",
        200,
        &json!({})
    )));
    // A body that drifted: a missing field, an extra field, a code outside the enum.
    let status = json!({"containerId": "c", "userId": "1", "state": "running",
        "createdAt": "2026-01-01T00:00:00.000Z", "lastActivity": "2026-01-01T00:00:00.000Z",
        "previewUrl": "http://user-1.preview.localhost:8080/",
        "limits": {"memoryBytes": 1, "cpus": 0.5, "pids": 128}});
    openapi::check("GET", "/sandbox/status", 200, &status);
    let mut missing = status.clone();
    missing.as_object_mut().unwrap().remove("state");
    let mut extra = status.clone();
    extra["surprise"] = json!(1);
    for bad in [missing, extra] {
        assert!(
            std::panic::catch_unwind(|| openapi::check("GET", "/sandbox/status", 200, &bad))
                .is_err()
        );
    }
    assert!(refused(|| openapi::check(
        "GET",
        "/sandbox/status",
        404,
        &json!({"error": {"code": "no_such_code", "message": "x"}})
    )));
    // /healthz's 503: the envelope, with what failed beside it; nothing else.
    openapi::check(
        "GET",
        "/healthz",
        503,
        &json!({"error": {"code": "unhealthy", "message": "x"}}),
    );
    openapi::check(
        "GET",
        "/healthz",
        503,
        &json!({"status": "unavailable", "engine": "unavailable", "store": "ok",
            "error": {"code": "engine_unavailable", "message": "x"}}),
    );
    assert!(refused(|| openapi::check(
        "GET",
        "/healthz",
        503,
        &json!({"error": {"code": "unhealthy", "message": "x"}, "extra": 1})
    )));
    // Concrete paths map to their templates.
    assert_eq!(
        openapi::template_of("/sandbox/jobs/abc?x=1"),
        Some("/sandbox/jobs/{id}")
    );
    assert_eq!(openapi::template_of("/sandbox/jobs/"), None);
}

/// Request ids (README, "Logs and request ids") are kept when sane, made otherwise, and returned on every answer.
#[tokio::test]
async fn request_ids_are_kept_or_made_and_returned() {
    let app = spawn_app().await;
    let url = format!("{}/healthz", app.base);
    let id_of = |r: &reqwest::Response| {
        r.headers()
            .get("x-request-id")
            .expect("X-Request-Id on the answer")
            .to_str()
            .unwrap()
            .to_owned()
    };
    let r = app
        .client
        .get(&url)
        .header("x-request-id", "client-id-42")
        .send()
        .await
        .unwrap();
    assert_eq!(id_of(&r), "client-id-42");
    let a = id_of(&app.client.get(&url).send().await.unwrap());
    let b = id_of(&app.client.get(&url).send().await.unwrap());
    assert_ne!(a, b);
    for made in [a, b] {
        assert_eq!(made.len(), 32, "{made}");
        assert!(made.bytes().all(|c| c.is_ascii_hexdigit()), "{made}");
    }
    for bad in ["has space".to_owned(), "x".repeat(129)] {
        let r = app
            .client
            .get(&url)
            .header("x-request-id", &bad)
            .send()
            .await
            .unwrap();
        let id = id_of(&r);
        assert_ne!(id, bad);
        assert_eq!(id.len(), 32);
    }
    // Error answers carry it too.
    let r = app
        .client
        .get(format!("{}/nope", app.base))
        .header("x-request-id", "err-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(id_of(&r), "err-1");
}

/// The real binary with `log_format = "json"`: one access line per request with its
/// fields and request id, the request id on the request's other lines (a sandbox's creation),
/// and no token in any line — neither from `Authorization` nor from `?token=`.
#[tokio::test]
async fn json_logs_have_one_access_line_per_request_and_never_a_token() {
    // Its server is no TestApp: it holds its place beside the others itself.
    let _gate = gate::shared().await;
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    require_docker();
    let dir = tempfile::tempdir().unwrap();
    let instance = instance_name();
    let db = sqlite_db();
    let mut table = test_table(&instance, dir.path(), &db.url);
    table.insert("log_format".into(), "json".into());
    table.insert("wake_timeout".into(), "5s".into());
    let cfg_path = dir.path().join("sandboxd.toml");
    std::fs::write(&cfg_path, toml::to_string(&table).unwrap()).unwrap();

    struct Guard(std::process::Child, String);
    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
            cleanup_instance(&self.1);
        }
    }
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sandboxd"));
    for (k, _) in std::env::vars() {
        if k.starts_with("SANDBOXD_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("SANDBOXD_LOG", "info")
        .arg("--config")
        .arg(&cfg_path)
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("sandboxd serve");
    let stderr = child.stderr.take().unwrap();
    let mut guard = Guard(child, instance.clone());
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines: Vec<String> = vec![];
    let next = |lines: &mut Vec<String>, until: std::time::Instant| -> Option<String> {
        let left = until.checked_duration_since(std::time::Instant::now())?;
        let l = rx.recv_timeout(left).ok()?;
        lines.push(l.clone());
        Some(l)
    };
    // Every line is one JSON object; the listener's address comes from the "listening" line.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let addr = loop {
        let l = next(&mut lines, until)
            .unwrap_or_else(|| panic!("no listening line; stderr so far: {lines:#?}"));
        let v: serde_json::Value =
            serde_json::from_str(&l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}"));
        if let Some(a) = v["message"]
            .as_str()
            .and_then(|m| m.strip_prefix("listening on http://"))
        {
            break a.to_owned();
        }
    };
    let base = format!("http://{addr}");
    let auth = sandboxd::auth::Auth::new(SECRET.as_bytes());
    let issue = |u: &str| {
        auth.issue(
            &sandboxd::user::UserId::parse(u).unwrap(),
            std::time::Duration::from_secs(600),
        )
        .unwrap()
    };
    let (header_token, query_token) = (issue("77"), issue("78"));
    let c = reqwest::Client::new();
    let send = |rb: reqwest::RequestBuilder, id: &'static str| async move {
        let r = rb.header("x-request-id", id).send().await.unwrap();
        assert_eq!(r.headers()["x-request-id"], id);
        r.status().as_u16()
    };
    assert_eq!(
        send(c.get(format!("{base}/healthz")), "log-health").await,
        200
    );
    assert_eq!(
        send(
            c.get(format!("{base}/sandbox/status"))
                .bearer_auth(&header_token),
            "log-status"
        )
        .await,
        404
    );
    assert_eq!(
        send(
            c.get(format!(
                "{base}/sandbox/terminal?token={query_token}&cols=80"
            )),
            "log-query"
        )
        .await,
        400
    );
    assert_eq!(
        send(
            c.get(format!("{base}/sandbox/status?token={query_token}")),
            "log-query-2"
        )
        .await,
        401
    );
    assert_eq!(
        send(
            c.post(format!("{base}/sandbox/init"))
                .bearer_auth(&header_token),
            "log-init"
        )
        .await,
        200
    );
    // A preview host: the owner is the line's user; the query (a link token) stays out.
    let port = addr.rsplit(':').next().unwrap();
    let r = c
        .get(format!("{base}/?sandboxd_token={query_token}"))
        .header("host", format!("user-77.preview.localhost:{port}"))
        .header("x-request-id", "log-preview")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503, "nothing listens in the sandbox");
    assert_eq!(r.headers()["x-request-id"], "log-preview");

    // Collect until the last access line is there.
    let parsed = |lines: &[String]| -> Vec<serde_json::Value> {
        lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    };
    let access = |all: &[serde_json::Value], id: &str| -> Vec<serde_json::Value> {
        all.iter()
            .filter(|v| v["target"] == "sandboxd::access" && v["request_id"] == id)
            .cloned()
            .collect()
    };
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while access(&parsed(&lines), "log-preview").is_empty() {
        if next(&mut lines, until).is_none() {
            panic!("no access line for log-preview: {lines:#?}");
        }
    }
    // Let any late line of these requests arrive too.
    let until = std::time::Instant::now() + std::time::Duration::from_millis(500);
    while next(&mut lines, until).is_some() {}
    let all = parsed(&lines);

    for (id, path, status, user) in [
        ("log-health", "/healthz", 200, None),
        ("log-status", "/sandbox/status", 404, Some("77")),
        ("log-query", "/sandbox/terminal", 400, None),
        ("log-query-2", "/sandbox/status", 401, None),
        ("log-init", "/sandbox/init", 200, Some("77")),
        ("log-preview", "/", 503, Some("77")),
    ] {
        let a = access(&all, id);
        assert_eq!(a.len(), 1, "one access line for {id}: {a:#?}");
        let a = &a[0];
        assert_eq!(a["level"], "INFO");
        assert_eq!(a["method"], if id == "log-init" { "POST" } else { "GET" });
        let host = if id == "log-preview" {
            "preview"
        } else {
            "main"
        };
        assert_eq!(a["host"], host, "{a}");
        assert_eq!(a["path"], path, "{a}");
        assert_eq!(a["status"], status, "{a}");
        assert!(a["duration_ms"].as_f64().is_some_and(|d| d >= 0.0), "{a}");
        assert_eq!(a["user"].as_str(), user, "{a}");
        assert_eq!(a["span"]["request_id"], id, "{a}");
    }
    // The sandbox's creation, logged by the manager's task, carries the request's id.
    assert!(
        all.iter().any(|v| v["message"] == "sandbox event"
            && v["span"]["request_id"] == "log-init"
            && v["span"]["user"] == "77"),
        "{all:#?}"
    );
    // No token, nor its signature, in any line.
    for t in [&header_token, &query_token] {
        let sig = t.rsplit('.').next().unwrap();
        for l in &lines {
            assert!(!l.contains(sig), "a token leaked into the log: {l}");
        }
    }
    guard.0.kill().unwrap();
    drop(guard);
}
