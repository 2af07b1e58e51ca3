//! The files API against the real server, the real engine and the image's agent: every
//! endpoint, ranges, uploads bounded by `files_max_bytes`, invalid and missing paths, the watch
//! WebSocket seeing files made by execute and by a terminal, and sandboxes woken by a files
//! call. Every answer is checked against docs/openapi.json.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::common::ws::{ws_open, Term};
use crate::common::*;

/// One request with `user`'s token, checked against the document.
pub async fn call(
    app: &TestApp,
    method: &str,
    user: &str,
    path: &str,
    body: Option<reqwest::Body>,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut b = app
        .client
        .request(m, format!("{}{path}", app.base))
        .bearer_auth(app.token(user));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    if let Some(body) = body {
        b = b.body(body);
    }
    openapi::checked(method, path, b.send().await.unwrap()).await
}

pub async fn put(app: &TestApp, user: &str, path: &str, bytes: Vec<u8>) -> (u16, Value) {
    let r = call(
        app,
        "PUT",
        user,
        &format!("/sandbox/files?path={}", enc(path)),
        Some(bytes.into()),
        &[],
    )
    .await;
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

pub async fn read(app: &TestApp, user: &str, path: &str) -> (u16, Vec<u8>) {
    let r = call(
        app,
        "GET",
        user,
        &format!("/sandbox/files?path={}", enc(path)),
        None,
        &[],
    )
    .await;
    (r.status().as_u16(), r.bytes().await.unwrap().to_vec())
}

pub async fn json_call(
    app: &TestApp,
    method: &str,
    user: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let body = body.map(|b| reqwest::Body::from(b.to_string()));
    let r = call(
        app,
        method,
        user,
        path,
        body,
        &[("content-type", "application/json")],
    )
    .await;
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// Percent-encodes a query value (everything but unreserved characters).
pub fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The status of a refused upgrade (its body checked against the document).
pub fn refused<T>(r: Result<T, tokio_tungstenite::tungstenite::Error>) -> u16 {
    match r {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let status = resp.status().as_u16();
            let ct = resp
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let body = resp.body().as_deref().unwrap_or(&[]);
            openapi::check_answer("GET", "/sandbox/files/watch", status, ct, body);
            status
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("the upgrade should have been refused"),
    }
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test]
async fn files_api_round_trip() {
    let app = spawn_app_with(|t| {
        t.insert("files_max_bytes".into(), (4 * 1024 * 1024).into());
    })
    .await;
    let u = "files1";
    app.init(u).await;

    // Write creating parents; read back with its headers.
    let (s, v) = put(&app, u, "src/deep/hello.txt", b"hello, world".to_vec()).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["entry"]["path"], "src/deep/hello.txt");
    assert_eq!(v["entry"]["type"], "file");
    assert_eq!(v["entry"]["size"], 12);
    let r = call(
        &app,
        "GET",
        u,
        "/sandbox/files?path=src/deep/hello.txt",
        None,
        &[],
    )
    .await;
    assert_eq!(r.status(), 200);
    let h = r.headers().clone();
    assert_eq!(h["content-type"], "text/plain; charset=utf-8");
    assert_eq!(h["content-length"], "12");
    assert_eq!(h["accept-ranges"], "bytes");
    assert!(h["last-modified"].to_str().unwrap().ends_with(" GMT"));
    assert_eq!(r.bytes().await.unwrap(), &b"hello, world"[..]);
    // The file is on the host, owned by the sandbox's user.
    let host = app.workspaces.join(format!("user-{u}/src/deep/hello.txt"));
    assert_eq!(std::fs::read(&host).unwrap(), b"hello, world");

    // Ranges.
    for (range, status, body, content_range) in [
        ("bytes=0-4", 206, &b"hello"[..], Some("bytes 0-4/12")),
        ("bytes=7-", 206, b"world", Some("bytes 7-11/12")),
        ("bytes=-5", 206, b"world", Some("bytes 7-11/12")),
        ("bytes=7-100", 206, b"world", Some("bytes 7-11/12")),
        ("bytes=0-1,3-4", 200, b"hello, world", None),
        ("bytes=12-", 416, b"", Some("bytes */12")),
    ] {
        let r = call(
            &app,
            "GET",
            u,
            "/sandbox/files?path=src/deep/hello.txt",
            None,
            &[("range", range)],
        )
        .await;
        assert_eq!(r.status(), status, "{range}");
        assert_eq!(
            r.headers()
                .get("content-range")
                .map(|v| v.to_str().unwrap().to_owned())
                .as_deref(),
            content_range,
            "{range}"
        );
        let bytes = r.bytes().await.unwrap();
        if status == 416 {
            let v: Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(code(&v), "range_not_satisfiable");
        } else {
            assert_eq!(&bytes[..], body, "{range}");
        }
    }

    // Binary content and a larger file survive the trip byte for byte; replace is whole.
    let big: Vec<u8> = (0..3 * 1024 * 1024u32)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    assert_eq!(put(&app, u, "bin/big.dat", big.clone()).await.0, 200);
    let (s, got) = read(&app, u, "bin/big.dat").await;
    assert_eq!(s, 200);
    assert!(got == big, "3 MiB read back differs");
    assert_eq!(put(&app, u, "bin/big.dat", b"small".to_vec()).await.0, 200);
    assert_eq!(read(&app, u, "bin/big.dat").await.1, b"small");
    // Atomic replace: no temporary file is left beside the target.
    let names: Vec<String> = std::fs::read_dir(app.workspaces.join(format!("user-{u}/bin")))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["big.dat"]);

    // Stat and list.
    let (s, v) = json_call(&app, "GET", u, "/sandbox/files/stat?path=src", None).await;
    assert_eq!((s, v["entry"]["type"].as_str()), (200, Some("dir")), "{v}");
    let (s, v) = json_call(&app, "GET", u, "/sandbox/files?path=src/deep", None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["path"], "src/deep");
    assert_eq!(v["truncated"], false);
    assert_eq!(v["entries"][0]["name"], "hello.txt");
    assert!(v["entries"][0]["modified"].as_str().unwrap().ends_with('Z'));
    let (s, v) = json_call(&app, "GET", u, "/sandbox/files", None).await;
    assert_eq!(s, 200);
    let names: Vec<&str> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"src") && names.contains(&"bin"),
        "{names:?}"
    );

    // mkdir, move.
    let (s, v) = json_call(
        &app,
        "POST",
        u,
        "/sandbox/files/mkdir",
        Some(json!({"path": "m/n"})),
    )
    .await;
    assert_eq!((s, v["entry"]["type"].as_str()), (201, Some("dir")), "{v}");
    let (s, v) = json_call(
        &app,
        "POST",
        u,
        "/sandbox/files/mkdir",
        Some(json!({"path": "m/n", "parents": false})),
    )
    .await;
    assert_eq!((s, code(&v)), (409, "file_exists"), "{v}");
    let mv = |from: &str, to: &str, overwrite: bool| json!({"from": from, "to": to, "overwrite": overwrite});
    let (s, v) = json_call(
        &app,
        "POST",
        u,
        "/sandbox/files/move",
        Some(mv("src/deep/hello.txt", "m/n/hi.txt", false)),
    )
    .await;
    assert_eq!(
        (s, v["entry"]["path"].as_str()),
        (200, Some("m/n/hi.txt")),
        "{v}"
    );
    assert_eq!(put(&app, u, "m/other.txt", b"o".to_vec()).await.0, 200);
    let (s, v) = json_call(
        &app,
        "POST",
        u,
        "/sandbox/files/move",
        Some(mv("m/other.txt", "m/n/hi.txt", false)),
    )
    .await;
    assert_eq!((s, code(&v)), (409, "file_exists"), "{v}");
    let (s, _) = json_call(
        &app,
        "POST",
        u,
        "/sandbox/files/move",
        Some(mv("m/other.txt", "m/n/hi.txt", true)),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(read(&app, u, "m/n/hi.txt").await.1, b"o");

    // Delete: file, non-empty folder, recursive, root, missing.
    let (s, v) = json_call(&app, "DELETE", u, "/sandbox/files?path=m/n/hi.txt", None).await;
    assert_eq!((s, v["removed"].as_str()), (200, Some("m/n/hi.txt")));
    assert_eq!(put(&app, u, "m/n/x", b"x".to_vec()).await.0, 200);
    let (s, v) = json_call(&app, "DELETE", u, "/sandbox/files?path=m", None).await;
    assert_eq!((s, code(&v)), (409, "not_empty"), "{v}");
    let (s, _) = json_call(
        &app,
        "DELETE",
        u,
        "/sandbox/files?path=m&recursive=true",
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert!(!app.workspaces.join(format!("user-{u}/m")).exists());
    for root in ["", ".", "./"] {
        let (s, v) = json_call(
            &app,
            "DELETE",
            u,
            &format!("/sandbox/files?path={}", enc(root)),
            None,
        )
        .await;
        assert_eq!((s, code(&v)), (400, "invalid_path"), "{root:?} {v}");
    }
    for missing in ["nope.txt", "src/nope/deeper"] {
        let (s, v) = read(&app, u, missing).await;
        let v: Value = serde_json::from_slice(&v).unwrap();
        assert_eq!((s, code(&v)), (404, "file_not_found"), "{missing}");
    }
    let (s, v) = json_call(&app, "DELETE", u, "/sandbox/files?path=nope", None).await;
    assert_eq!((s, code(&v)), (404, "file_not_found"));
    let (s, v) = json_call(&app, "GET", u, "/sandbox/files/stat?path=nope", None).await;
    assert_eq!((s, code(&v)), (404, "file_not_found"));

    // Invalid names: 400 invalid_path, nothing created.
    for bad in ["../x", "a/../../x", "/etc/passwd", "a\0b", &"n".repeat(256)] {
        let (s, v) = put(&app, u, bad, b"x".to_vec()).await;
        assert_eq!((s, code(&v)), (400, "invalid_path"), "{bad:?} {v}");
    }
    for raw in ["%2e%2e", "%2e%2e%2fx", "a%2F..%2F..%2Fx", "%2Fetc"] {
        let (s, v) = json_call(&app, "GET", u, &format!("/sandbox/files?path={raw}"), None).await;
        assert_eq!((s, code(&v)), (400, "invalid_path"), "{raw} {v}");
    }

    // Sizes: over files_max_bytes is 413, by Content-Length and by a chunked body alike, and
    // nothing is written.
    let over = vec![b'z'; 4 * 1024 * 1024 + 1];
    let (s, v) = put(&app, u, "too/big.bin", over.clone()).await;
    assert_eq!((s, code(&v)), (413, "file_too_large"), "{v}");
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        over.chunks(64 * 1024).map(|c| Ok(c.to_vec())).collect();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let r = call(
        &app,
        "PUT",
        u,
        "/sandbox/files?path=too/big.bin",
        Some(body),
        &[],
    )
    .await;
    assert_eq!(r.status(), 413);
    assert!(!app
        .workspaces
        .join(format!("user-{u}/too/big.bin"))
        .exists());
    let exact = vec![b'e'; 4 * 1024 * 1024];
    assert_eq!(put(&app, u, "exact.bin", exact).await.0, 200);

    // Archives: download a folder, read it with tar; upload one into a new folder.
    assert_eq!(put(&app, u, "proj/a.txt", b"A".to_vec()).await.0, 200);
    assert_eq!(put(&app, u, "proj/sub/b.txt", b"BB".to_vec()).await.0, 200);
    let r = call(
        &app,
        "GET",
        u,
        "/sandbox/files/archive?path=proj",
        None,
        &[],
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/gzip");
    assert_eq!(
        r.headers()["content-disposition"],
        "attachment; filename=\"proj.tar.gz\""
    );
    let tgz = r.bytes().await.unwrap().to_vec();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.tar.gz"), &tgz).unwrap();
    let out = std::process::Command::new("tar")
        .args(["-xzf", "p.tar.gz"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(dir.path().join("a.txt")).unwrap(), b"A");
    assert_eq!(std::fs::read(dir.path().join("sub/b.txt")).unwrap(), b"BB");
    let r = call(
        &app,
        "PUT",
        u,
        "/sandbox/files/archive?path=copy/here",
        Some(tgz.into()),
        &[("content-type", "application/gzip")],
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(v["files"].as_u64().unwrap() >= 2, "{v}");
    assert_eq!(read(&app, u, "copy/here/sub/b.txt").await.1, b"BB");
    let (s, v) = json_call(&app, "PUT", u, "/sandbox/files/archive?path=x", None).await;
    assert!(s == 400 || s == 500 || s == 502, "empty archive: {s} {v}");
    let _ = v;

    // Other users' files are not visible (each user has their own /workspace).
    let (s, _) = read(&app, "files1other", "proj/a.txt").await;
    assert_eq!(s, 404);
}

/// Reads watch events until one matches `pred` (or fails after 20 s).
async fn expect_event(ws: &mut crate::common::ws::Ws, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let m = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("the event within 20 s")
            .expect("the socket stays open")
            .expect("a frame");
        if let Message::Text(t) = m {
            let v: Value = serde_json::from_str(&t).unwrap();
            assert!(v["type"].is_string(), "{v}");
            if pred(&v) {
                return v;
            }
        }
    }
}

#[tokio::test]
async fn files_watch_sees_execute_and_terminal() {
    let app = spawn_app().await;
    let u = "fwatch";
    app.init(u).await;
    let url = format!("ws://{}/sandbox/files/watch?recursive=true", app.addr);
    let proto = format!("bearer.{}", app.token(u));

    // Refusals before anything opens: no token, a foreign Origin, a bad path.
    let r = ws_open(&url, &[]).await;
    assert_eq!(refused(r), 401);
    let r = ws_open(
        &url,
        &[
            ("sec-websocket-protocol", &proto),
            ("origin", "https://evil.example"),
        ],
    )
    .await;
    assert_eq!(refused(r), 403);
    let r = ws_open(
        &format!("ws://{}/sandbox/files/watch?path=..", app.addr),
        &[("sec-websocket-protocol", &proto)],
    )
    .await;
    assert_eq!(refused(r), 400);

    let (mut ws, resp) = ws_open(&url, &[("sec-websocket-protocol", &proto)])
        .await
        .expect("watch opens");
    assert_eq!(resp.status(), 101);
    assert_eq!(resp.headers()["sec-websocket-protocol"], proto.as_str());

    let r = app
        .execute(
            u,
            json!({"code": "require('fs').mkdirSync('/workspace/w', {recursive: true}); require('fs').writeFileSync('/workspace/w/from-exec.txt', 'x')"}),
        )
        .await;
    assert_eq!(r["exitCode"], 0, "{r}");
    let ev = expect_event(&mut ws, |v| v["path"] == "w/from-exec.txt").await;
    assert!(
        ["create", "modify"].contains(&ev["type"].as_str().unwrap()),
        "{ev}"
    );
    assert_eq!(ev["isDir"], false);

    let mut term = Term::open(&app, u, "").await;
    term.send("touch /workspace/w/from-term.txt\r").await;
    expect_event(&mut ws, |v| v["path"] == "w/from-term.txt").await;
    drop(term);

    // A files write is seen too, and the client's close ends the watch cleanly.
    assert_eq!(put(&app, u, "w/from-api.txt", b"1".to_vec()).await.0, 200);
    expect_event(&mut ws, |v| v["path"] == "w/from-api.txt").await;
    use futures_util::SinkExt;
    ws.send(Message::Close(None)).await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(m)) = ws.next().await {
            if m.is_close() {
                return true;
            }
        }
        true
    })
    .await;
    assert_eq!(end, Ok(true), "the server answers the close");
}

#[tokio::test]
async fn files_calls_wake_paused_and_stopped_sandboxes() {
    let app = spawn_app().await;
    let u = "fwake";
    app.init(u).await;
    assert_eq!(put(&app, u, "keep.txt", b"kept".to_vec()).await.0, 200);
    let user = sandboxd::user::UserId::parse(u).unwrap();

    app.mgr().pause(&user, "test").await.unwrap();
    let (s, body) = read(&app, u, "keep.txt").await;
    assert_eq!((s, body.as_slice()), (200, &b"kept"[..]));
    let st = app.mgr().status(&user).await.unwrap();
    assert_eq!(st.state.as_str(), "running");

    app.mgr().stop(&user, "test").await.unwrap();
    let (s, v) = put(&app, u, "after-stop.txt", b"woken".to_vec()).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(read(&app, u, "after-stop.txt").await.1, b"woken");
    let (s, v) = json_call(&app, "GET", u, "/sandbox/files", None).await;
    assert_eq!(s, 200, "{v}");
}

/// A files call is a run in flight for the idle policy: an upload whose body trickles in for
/// longer than `idle_pause_after` is not frozen under it (the agent would never answer, and
/// restarting it in a paused container fails with 409), and a sandbox the idle policy paused
/// afterwards is woken by the next upload.
#[tokio::test]
async fn a_slow_upload_is_not_paused_by_the_idle_policy() {
    let app = spawn_app_with(|t| {
        t.insert("idle_pause_after".into(), "1s".into());
        t.insert("idle_stop_after".into(), "30s".into());
        t.insert("idle_check_every".into(), "100ms".into());
    })
    .await;
    let u = "fslow";
    app.init(u).await;
    let user = sandboxd::user::UserId::parse(u).unwrap();

    // The second part comes 2.5 s after the first: well past the idle timeout.
    let parts = futures_util::stream::iter(0..2).then(|i| async move {
        if i == 1 {
            tokio::time::sleep(Duration::from_millis(2500)).await;
        }
        Ok::<_, std::io::Error>(format!("part {i}\n"))
    });
    let r = tokio::time::timeout(
        Duration::from_secs(30),
        call(
            &app,
            "PUT",
            u,
            "/sandbox/files?path=slow.txt",
            Some(reqwest::Body::wrap_stream(parts)),
            &[],
        ),
    )
    .await
    .expect("the upload is answered");
    let s = r.status().as_u16();
    assert_eq!(s, 200, "{}", r.text().await.unwrap_or_default());
    assert_eq!(read(&app, u, "slow.txt").await.1, b"part 0\npart 1\n");

    // Left alone, it is paused by the idle policy; the next upload wakes it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let st = app.mgr().status(&user).await.unwrap();
        if st.state.as_str() == "paused" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never paused: {}",
            st.state.as_str()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (s, v) = put(&app, u, "after-pause.txt", b"woken".to_vec()).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(read(&app, u, "after-pause.txt").await.1, b"woken");
}
