//! The preview edge against real containers: plain HTTP and HTTPS with a preview domain that is
//! not *.localhost, lazy create and wake (stopped, paused), 100 concurrent first hits, cross-user
//! isolation, the cap with eviction, the idle policy, and a real Vite app with HMR.

use std::time::{Duration, Instant};

use crate::common::preview::{
    preview_client_builder, preview_host, preview_url, start_app, PREVIEW_DOMAIN,
};
use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use sandboxd::user::UserId;
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// A client for the preview hosts of `users` (see `preview_client_builder`), without redirects.
fn client_for(app: &TestApp, users: &[&str], ca: Option<&std::path::Path>) -> reqwest::Client {
    preview_client_builder(app, users, ca)
        .timeout(Duration::from_secs(90))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// A tiny app that answers with the user id and the Host it saw. Its WebSockets echo and,
/// as Node allows, keep their side open after the client ended its own.
const APP: &str = r#"
            require('http').createServer((q, s) => {
              if (q.url === '/slow') return setTimeout(() => s.end('slow done'), 800);
              if (q.url === '/headers') return s.end(JSON.stringify(q.headers));
              s.setHeader('content-type', 'text/plain');
              s.end('hello from ' + process.env.SANDBOXD_USER + ' host=' + q.headers.host + ' xfp=' + q.headers['x-forwarded-proto']);
            }).listen(5173, '0.0.0.0').on('upgrade', (q, sock) => {
              sock.write(['HTTP/1.1 101 Switching Protocols', 'Upgrade: websocket', 'Connection: Upgrade', '', ''].join(String.fromCharCode(13, 10)));
              sock.on('data', (d) => sock.write(d));
              sock.on('end', () => {});
              sock.on('error', () => {});
            });
        "#;

async fn get_text(c: &reqwest::Client, url: &str) -> (u16, String) {
    let r = c.get(url).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn preview_over_http_and_https_with_wake_from_stopped_and_paused() {
    let app = spawn_app_with(|t| {
        t.insert("preview_domain".into(), PREVIEW_DOMAIN.into());
        t.insert("https_addr".into(), "127.0.0.1:0".into());
    })
    .await;
    app.init("1").await;
    start_app(&app, "1", APP).await;
    let ca = app.certs.join("dev-ca.crt");
    assert!(ca.exists(), "development CA generated");
    let c = client_for(&app, &["1", "2"], Some(&ca));

    // Plain HTTP; the first request may wait for the app to listen.
    let (s, body) = get_text(&c, &preview_url(&app, "1", "/")).await;
    assert_eq!(s, 200, "{body}");
    assert!(
        body.starts_with("hello from 1 host=user-1.preview.example.test"),
        "{body}"
    );
    assert!(body.ends_with("xfp=http"), "{body}");

    // Request ids reach the app: the client's, or one the edge made (README, "Logs and request ids").
    let r = c
        .get(preview_url(&app, "1", "/headers"))
        .header("x-request-id", "preview-rid-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "preview-rid-1");
    let seen: serde_json::Value = r.json().await.unwrap();
    assert_eq!(seen["x-request-id"], "preview-rid-1", "{seen}");
    let r = c
        .get(preview_url(&app, "1", "/headers"))
        .send()
        .await
        .unwrap();
    let made = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    let seen: serde_json::Value = r.json().await.unwrap();
    assert_eq!(seen["x-request-id"], made.as_str(), "{seen}");
    assert_eq!(made.len(), 32);

    // HTTPS, trusting the generated CA, SNI = the preview host.
    let https = app.https_addr.unwrap();
    let (s, body) = get_text(
        &c,
        &format!("https://{}:{}/", preview_host("1"), https.port()),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert!(body.ends_with("xfp=https"), "{body}");

    // A WebSocket the client ends while the app keeps its side open is closed after the
    // tunnel's 5 s grace, over HTTP and HTTPS.
    let tcp = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    half_open_tunnel_is_closed(tcp, app.addr.port()).await;
    let tls = tokio_rustls::TlsConnector::from(tls_client(&ca))
        .connect(
            preview_host("1").try_into().unwrap(),
            tokio::net::TcpStream::connect(https).await.unwrap(),
        )
        .await
        .unwrap();
    half_open_tunnel_is_closed(tls, https.port()).await;

    // Stopped: the request is held and answered by the autostarted app.
    app.mgr()
        .stop(&UserId::parse("1").unwrap(), "test")
        .await
        .unwrap();
    let t = Instant::now();
    let (s, body) = get_text(&c, &preview_url(&app, "1", "/")).await;
    assert_eq!(s, 200, "{body}");
    eprintln!("wake from stopped: {:?}", t.elapsed());

    // Paused: woken in milliseconds.
    app.mgr()
        .pause(&UserId::parse("1").unwrap(), "test")
        .await
        .unwrap();
    let st: serde_json::Value = app.get("1", "/sandbox/status").await.json().await.unwrap();
    assert_eq!(st["state"], "paused");
    let t = Instant::now();
    let (s, _) = get_text(&c, &preview_url(&app, "1", "/")).await;
    assert_eq!(s, 200);
    eprintln!("wake from paused: {:?}", t.elapsed());

    // Unknown users and unknown hosts get 404; nothing is created for them.
    let (s, _) = get_text(&c, &preview_url(&app, "2", "/")).await;
    assert_eq!(s, 404);
    let r = app
        .client
        .get(format!("http://{}/", app.addr))
        .header("host", "user-1.preview.elsewhere.test")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(app.containers().len(), 1);

    // Streaming a slow response works, and a graceful shutdown lets it finish.
    let slow = tokio::spawn({
        let c = c.clone();
        let u = preview_url(&app, "1", "/slow");
        async move { get_text(&c, &u).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut app = app;
    app.shutdown().await;
    let (s, body) = slow.await.unwrap();
    assert_eq!((s, body.as_str()), (200, "slow done"));
    // The sandbox survives the server's shutdown.
    let id = app.containers()[0].clone();
    assert_eq!(docker_inspect(&id)["State"]["Running"], true);
}

/// A TLS client trusting the development CA only.
fn tls_client(ca: &std::path::Path) -> std::sync::Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).unwrap();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    std::sync::Arc::new(cfg)
}

/// Opens a WebSocket to user 1's app (see [`APP`]) on `s`, checks the echo, ends the client's
/// side and expects the edge to close the tunnel within its grace (5 s) plus a margin, but not
/// at once: the app keeps its side open, so only the grace can end it.
async fn half_open_tunnel_is_closed<S>(s: S, port: u16)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = open_echo_tunnel(s, "1", port).await;
    s.shutdown().await.unwrap();
    let t = Instant::now();
    let mut rest = [0u8; 64];
    let ended = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match s.read(&mut rest).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    let took = t.elapsed();
    assert!(
        ended.is_ok(),
        "the half-open tunnel is still open after {took:?}"
    );
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(9),
        "closed after {took:?}, expected the tunnel's 5 s grace"
    );
}

/// Opens a WebSocket to `user`'s app (see [`APP`]: it echoes, and keeps its side open after the
/// client's end) through the edge on `s`, and checks the echo.
async fn open_echo_tunnel<S>(mut s: S, user: &str, port: u16) -> S
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {}:{port}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        preview_host(user)
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 4096 {
        let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut byte))
            .await
            .expect("the head in time")
            .unwrap();
        assert_eq!(
            n,
            1,
            "closed during the head: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
        .await
        .expect("the echo in time")
        .unwrap();
    assert_eq!(&back, b"ping");
    s
}

#[tokio::test]
async fn hundred_concurrent_first_hits_make_one_container() {
    let app = spawn_app_with(|t| {
        t.insert("preview_domain".into(), PREVIEW_DOMAIN.into());
    })
    .await;
    app.init("3").await;
    start_app(&app, "3", APP).await;
    // Exit removes the container; the user stays known, the workspace keeps the app.
    assert_eq!(
        app.post("3", "/sandbox/exit", json!({})).await.status(),
        200
    );
    assert!(app.containers().is_empty());
    let c = client_for(&app, &["3"], None);
    let mut tasks = vec![];
    for _ in 0..100 {
        let (c, u) = (c.clone(), preview_url(&app, "3", "/"));
        tasks.push(tokio::spawn(async move { get_text(&c, &u).await }));
    }
    for t in tasks {
        let (s, body) = t.await.unwrap();
        assert_eq!(s, 200, "{body}");
        assert!(body.starts_with("hello from 3"), "{body}");
    }
    assert_eq!(app.containers().len(), 1);
}

#[tokio::test]
async fn many_users_first_hits_at_once_are_all_held_until_their_apps_answer() {
    let app = spawn_app_with(|t| {
        t.insert("preview_domain".into(), PREVIEW_DOMAIN.into());
    })
    .await;
    let users: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    for u in &users {
        app.init(u).await;
        start_app(&app, u, APP).await;
        assert_eq!(app.post(u, "/sandbox/exit", json!({})).await.status(), 200);
    }
    // All ten start at once on a small machine: slow app starts must be waited for, not
    // answered with "nothing listens".
    let refs: Vec<&str> = users.iter().map(String::as_str).collect();
    let c = client_for(&app, &refs, None);
    let mut tasks = vec![];
    for u in &users {
        let (c, url, u) = (c.clone(), preview_url(&app, u, "/"), u.clone());
        tasks.push(tokio::spawn(async move { (u, get_text(&c, &url).await) }));
    }
    for t in tasks {
        let (u, (s, body)) = t.await.unwrap();
        assert_eq!(s, 200, "{u}: {body}");
        assert!(body.starts_with(&format!("hello from {u}")), "{body}");
    }
    assert_eq!(app.containers().len(), 10);
}

#[tokio::test]
async fn previews_are_isolated_between_users() {
    let app = spawn_app_with(|t| {
        t.insert("preview_domain".into(), PREVIEW_DOMAIN.into());
    })
    .await;
    app.init("4").await;
    app.init("5").await;
    start_app(&app, "4", APP).await;
    start_app(&app, "5", APP).await;
    let c = client_for(&app, &["4", "5"], None);
    let (_, a) = get_text(&c, &preview_url(&app, "4", "/")).await;
    let (_, b) = get_text(&c, &preview_url(&app, "5", "/")).await;
    assert!(a.starts_with("hello from 4"), "{a}");
    assert!(b.starts_with("hello from 5"), "{b}");
    // No header, path or absolute URI steers a request to another user's container.
    let direct = |host: &'static str| {
        app.client
            .get(format!("http://{}/", app.addr))
            .header("host", host)
    };
    let r = direct("user-4.preview.example.test")
        .header("x-forwarded-host", "user-5.preview.example.test")
        .header("authorization", format!("Bearer {}", app.token("5")))
        .send()
        .await
        .unwrap();
    assert!(r.text().await.unwrap().starts_with("hello from 4"));
    // Absolute-form URI naming another host than Host: refused.
    let mut s = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(
        b"GET http://user-5.preview.example.test/ HTTP/1.1\r\nHost: user-4.preview.example.test\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(!resp.contains("hello from"));
    // Two Host headers: refused.
    let mut s = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: user-4.preview.example.test\r\nHost: user-5.preview.example.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    // A port outside the allow-list is not routed.
    let r = direct("22-user-4.preview.example.test")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn nothing_listening_gives_a_retrying_page_or_503() {
    let app = spawn_app_with(|t| {
        t.insert("preview_domain".into(), PREVIEW_DOMAIN.into());
    })
    .await;
    app.init("6").await;
    let c = client_for(&app, &["6"], None);
    let r = c
        .get(preview_url(&app, "6", "/"))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let body = r.text().await.unwrap();
    assert!(body.contains("http-equiv=\"refresh\""), "{body}");
    assert!(body.contains("npm run dev"), "{body}");
    let r = c.get(preview_url(&app, "6", "/")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().get("retry-after").is_some());
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "preview_not_listening");
    openapi::check_error(&v);
}

/// The commands of the engine's `exec_create` events for this instance's containers between
/// `since` and now (unix seconds).
fn execs_since(app: &TestApp, since: f64) -> Vec<String> {
    let now = unix_now();
    let out = std::process::Command::new("docker")
        .args([
            "events",
            "--since",
            &format!("{since:.3}"),
            "--until",
            &format!("{:.3}", now + 0.5),
            "--filter",
            &format!("label=sandboxd.instance={}", app.instance),
            "--filter",
            "event=exec_create",
            "--format",
            "{{.Action}}",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "docker events: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("exec_create"))
        .map(str::to_owned)
        .collect()
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[tokio::test]
async fn held_first_hits_ask_the_agent_not_an_exec_whether_an_app_may_come() {
    let app = spawn_app_with(|t| {
        t.insert("preview_domain".into(), PREVIEW_DOMAIN.into());
    })
    .await;
    let c = client_for(&app, &["ac"], None);
    // The first question is asked 1.5 s into the wait, well before `wake_timeout` (30 s) ends
    // it; an agent that did not answer would count as "may come" for 5 s and then be replaced
    // by the exec, which the engine's events show. The bound leaves room for a loaded host (and
    // the second case's container start).
    let not_listening = |took: Duration, r: serde_json::Value| {
        assert_eq!(r["error"]["code"], "preview_not_listening", "{r}");
        assert!(took < Duration::from_secs(15), "answered after {took:?}");
    };

    // The init's discovery is over and found no app: "nothing listens" comes early.
    app.init("ac").await;
    let since = unix_now();
    let t = Instant::now();
    let r = c.get(preview_url(&app, "ac", "/")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    not_listening(t.elapsed(), r.json().await.unwrap());
    let execs = execs_since(&app, since);
    assert!(execs.is_empty(), "{execs:?}");

    // A dev server that dies at once, on a fresh start from a first hit: the same. (Files and
    // the exit go around the API client's pooled connection, which may sit idle past the
    // server's keep-alive bound by now.)
    let ws = app.workspaces.join("user-ac");
    std::fs::write(
        ws.join("package.json"),
        r#"{"name": "p", "scripts": {"dev": "exit 3"}}"#,
    )
    .unwrap();
    let r = reqwest::Client::new()
        .post(format!("{}/sandbox/exit", app.base))
        .bearer_auth(app.token("ac"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(app.containers().is_empty());
    let since = unix_now();
    let t = Instant::now();
    let r = c.get(preview_url(&app, "ac", "/")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    not_listening(t.elapsed(), r.json().await.unwrap());
    let execs = execs_since(&app, since);
    assert!(execs.is_empty(), "{execs:?}");
    let log = std::fs::read_to_string(ws.join(".sandboxd/dev.log")).unwrap();
    assert!(
        log.contains("starting dev server") && log.contains("exit 3"),
        "{log}"
    );
}

#[tokio::test]
async fn cap_evicts_the_least_recently_active_paused_sandbox() {
    let app = spawn_app_with(|t| {
        t.insert("max_containers".into(), 2.into());
    })
    .await;
    app.init("7").await;
    app.init("8").await;
    // Nobody idle: refused.
    let r = app.post("9", "/sandbox/init", json!({})).await;
    assert_eq!(r.status(), 503);
    // 7 paused (idle), then 8 paused later: 7 is the least recently active and goes.
    app.mgr()
        .pause(&UserId::parse("7").unwrap(), "test")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    app.get("8", "/sandbox/status").await;
    app.mgr()
        .pause(&UserId::parse("8").unwrap(), "test")
        .await
        .unwrap();
    app.init("9").await;
    let s7: serde_json::Value = app.get("7", "/sandbox/status").await.json().await.unwrap();
    let s8: serde_json::Value = app.get("8", "/sandbox/status").await.json().await.unwrap();
    assert_eq!(s7["state"], "stopped", "{s7}");
    assert_eq!(s8["state"], "paused", "{s8}");
    let ev: serde_json::Value = app.get("7", "/sandbox/events").await.json().await.unwrap();
    assert!(ev.to_string().contains("evicted for capacity"), "{ev}");
}

#[tokio::test]
async fn idle_sandboxes_are_paused_then_stopped_and_wake_on_use() {
    let app = spawn_app_with(|t| {
        t.insert("idle_pause_after".into(), "1s".into());
        t.insert("idle_stop_after".into(), "3s".into());
        t.insert("idle_check_every".into(), "200ms".into());
    })
    .await;
    app.init("10").await;
    let state = |app: &TestApp| {
        let m = app.mgr().clone();
        async move {
            m.status(&UserId::parse("10").unwrap())
                .await
                .unwrap()
                .state
                .as_str()
        }
    };
    let mut seen = vec![];
    for _ in 0..100 {
        let s = state(&app).await;
        if seen.last() != Some(&s) {
            seen.push(s);
        }
        if s == "stopped" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seen, ["running", "paused", "stopped"]);
    let r = app
        .execute("10", json!({"code": "console.log('awake')"}))
        .await;
    assert_eq!(r["output"], "awake\n");
}

#[tokio::test]
async fn react_vite_template_serves_through_the_preview_with_hmr() {
    let app = spawn_app_with(|t| {
        t.insert("preview_domain".into(), PREVIEW_DOMAIN.into());
        t.insert("memory_mb".into(), 1024.into());
        t.insert("cpus".into(), 1.0.into());
    })
    .await;
    // Bad names and templates are refused before anything runs.
    let r = app
        .post(
            "12",
            "/sandbox/projects",
            json!({"template": "react-vite", "name": "../x"}),
        )
        .await;
    assert_eq!(r.status(), 422);
    let r = app
        .post(
            "12",
            "/sandbox/projects",
            json!({"template": "php", "name": "x"}),
        )
        .await;
    assert_eq!(r.status(), 422);

    let r = app
        .post(
            "12",
            "/sandbox/projects",
            json!({"template": "react-vite", "name": "my-app"}),
        )
        .await;
    assert_eq!(r.status(), 202);
    let job: serde_json::Value = r.json().await.unwrap();
    let id = job["id"].as_str().unwrap().to_owned();
    let mut last = json!(null);
    for _ in 0..600 {
        last = app
            .get("12", &format!("/sandbox/jobs/{id}"))
            .await
            .json()
            .await
            .unwrap();
        if last["status"] != "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(last["status"], "succeeded", "{last}");
    // The same name again: 409.
    let r = app
        .post(
            "12",
            "/sandbox/projects",
            json!({"template": "node", "name": "my-app"}),
        )
        .await;
    assert_eq!(r.status(), 409);
    // Another user cannot see the job.
    assert_eq!(
        app.get("13", &format!("/sandbox/jobs/{id}")).await.status(),
        404
    );

    let c = client_for(&app, &["12"], None);
    let (s, body) = get_text(&c, &preview_url(&app, "12", "/")).await;
    // On a failure, the dev server's own log says why.
    let dev_log = || {
        std::fs::read_to_string(app.workspaces.join("user-12/.sandboxd/dev.log"))
            .unwrap_or_else(|e| format!("(no dev.log: {e})"))
    };
    assert_eq!(s, 200, "{body}\ndev.log:\n{}", dev_log());
    assert!(body.contains("/@vite/client"), "{body}");

    // HMR WebSocket through the preview.
    let mut req = format!("ws://{}:{}/", preview_host("12"), app.addr.port())
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", "vite-hmr".parse().unwrap());
    let tcp = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
    assert_eq!(resp.status(), 101);
    let first = next_text(&mut ws).await;
    assert!(first.contains("connected"), "{first}");

    // Load the modules as a browser would, so they are in Vite's module graph.
    for path in ["/src/main.jsx", "/src/App.jsx"] {
        let (s, body) = get_text(&c, &preview_url(&app, "12", path)).await;
        assert_eq!(s, 200, "{path}: {body}");
    }
    // Edit a source file through execute: an HMR update arrives on the socket.
    let r = app
        .execute(
            "12",
            json!({"code": "const f='/workspace/my-app/src/App.jsx'; const fs=require('fs'); fs.appendFileSync(f, '\\n// edited through sandboxd ' + Date.now() + '\\n'); console.log(fs.readFileSync(f,'utf8').slice(-60))"}),
        )
        .await;
    assert_eq!(r["exitCode"], 0, "{r}");
    let mut got = String::new();
    for _ in 0..20 {
        got = next_text(&mut ws).await;
        eprintln!("hmr: {got}");
        if got.contains("update") || got.contains("full-reload") {
            break;
        }
    }
    assert!(
        got.contains("update") || got.contains("full-reload"),
        "{got}"
    );
    let _ = ws.send(Message::Close(None)).await;
}

async fn next_text<S>(ws: &mut S) -> String
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        let m = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("a message within 30 s")
            .expect("socket open")
            .unwrap();
        match m {
            Message::Text(t) => return t.to_string(),
            Message::Close(c) => panic!("closed: {c:?}"),
            _ => continue,
        }
    }
}

/// The host's TCP sockets to `ip:port` (`/proc/net/tcp`, the test runs in the server's network
/// namespace): each one's local address and hex state code, e.g. `01` ESTABLISHED, `08`
/// CLOSE_WAIT.
fn sockets_to(ip: std::net::IpAddr, port: u16) -> Vec<(String, String)> {
    let std::net::IpAddr::V4(v4) = ip else {
        panic!("sandbox address {ip} is not IPv4")
    };
    let rem = format!("{:08X}:{:04X}", u32::from_le_bytes(v4.octets()), port);
    let table = std::fs::read_to_string("/proc/net/tcp").expect("reading /proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&rem.as_str())).then(|| (f[1].to_owned(), f[3].to_owned()))
        })
        .collect()
}

/// The states of the sockets to `ip:port` now, leaving out those that were already closing in
/// `before` (taken while the sandbox still ran). Docker gives a removed container's address to
/// a later one: an earlier test's sandbox with this address can have left a socket
/// retransmitting its FIN there (LAST_ACK), which is not this stop's doing.
fn states_since(ip: std::net::IpAddr, port: u16, before: &[(String, String)]) -> Vec<String> {
    sockets_to(ip, port)
        .into_iter()
        .filter(|(local, _)| !before.iter().any(|(l, st)| l == local && st != "01"))
        .map(|(_, st)| st)
        .collect()
}

#[tokio::test]
async fn stopping_a_sandbox_first_closes_the_previews_idle_connections_to_it() {
    // An idle upstream connection closed only after the container is gone leaves a socket
    // retransmitting its FIN to the sandbox's address; the host's neighbour entry for it goes
    // INCOMPLETE and the next wake's SYNs wait up to a second for ARP (Manager::on_stopping).
    let app = spawn_app_with(|t| {
        t.insert("preview_domain".into(), PREVIEW_DOMAIN.into());
    })
    .await;
    app.init("30").await;
    start_app(&app, "30", APP).await;
    let user = UserId::parse("30").unwrap();
    let c = client_for(&app, &["30"], None);
    let (s, body) = get_text(&c, &preview_url(&app, "30", "/")).await;
    assert_eq!(s, 200, "{body}");
    let ip = app
        .mgr()
        .running_ip(&user)
        .expect("running sandbox has an address");
    let open = sockets_to(ip, 5173);
    assert!(
        open.iter().any(|(_, st)| st == "01"),
        "the preview keeps an idle connection to the app: {open:?}"
    );
    app.mgr().stop(&user, "test").await.unwrap();
    // Closed while the app could answer: our side finished its close (TIME_WAIT, or FIN_WAIT2
    // until the app's FIN); nothing is left open, half-closed or retransmitting a FIN.
    let left = states_since(ip, 5173, &open);
    assert!(
        left.iter().all(|st| st == "06" || st == "05"),
        "sockets to the stopped sandbox's app (hex TCP states): {left:?}"
    );
    // The same for the next stop, after a wake through the preview, with a WebSocket tunnel
    // open to the app (an HMR socket): closed at the stop too, not when the client leaves.
    let (s, body) = get_text(&c, &preview_url(&app, "30", "/")).await;
    assert_eq!(s, 200, "{body}");
    let tcp = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let mut ws = open_echo_tunnel(tcp, "30", app.addr.port()).await;
    let open = sockets_to(ip, 5173);
    app.mgr().exit(&user).await.unwrap();
    let mut rest = [0u8; 64];
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        use tokio::io::AsyncReadExt;
        while let Ok(1..) = ws.read(&mut rest).await {}
    })
    .await;
    assert!(ended.is_ok(), "the tunnel outlived its sandbox");
    let left = states_since(ip, 5173, &open);
    assert!(
        left.iter().all(|st| st == "06" || st == "05"),
        "sockets to the removed sandbox's app (hex TCP states): {left:?}"
    );
}

/// One answer read off a raw connection: its head (lowercased) and its body (by its length;
/// none for a HEAD).
async fn raw_answer(
    s: &mut (impl tokio::io::AsyncRead + Unpin),
    rest: &mut Vec<u8>,
    head_req: bool,
) -> (String, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    async fn fill(s: &mut (impl tokio::io::AsyncRead + Unpin), rest: &mut Vec<u8>) {
        let mut b = [0u8; 8192];
        let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut b))
            .await
            .expect("an answer in time")
            .expect("read");
        assert!(
            n > 0,
            "closed before the whole answer: {:?}",
            String::from_utf8_lossy(rest)
        );
        rest.extend_from_slice(&b[..n]);
    }
    let end = loop {
        if let Some(p) = rest.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        fill(s, rest).await;
    };
    let head = String::from_utf8_lossy(&rest[..end]).to_lowercase();
    rest.drain(..end);
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map(|n| n.trim().parse::<usize>().unwrap())
        .filter(|_| !head_req)
        .unwrap_or(0);
    assert!(
        head_req || !head.contains("transfer-encoding"),
        "the app's answers carry a length: {head}"
    );
    while rest.len() < len {
        fill(s, rest).await;
    }
    (head, rest.drain(..len).collect())
}

/// The edge's fast path (plain HTTP/1.1 `GET`/`HEAD` to a running sandbox, edge/fast.rs)
/// forwards what hyper's path forwards, keeps the connection across requests and pipelines, and
/// hands the connection to hyper at the first request it does not take.
#[tokio::test]
async fn the_fast_path_forwards_what_hyper_s_path_does_and_hands_over_at_a_body() {
    use tokio::io::AsyncWriteExt;
    let app = spawn_app_with(|t| {
        t.insert("preview_domain".into(), PREVIEW_DOMAIN.into());
        t.insert("https_addr".into(), "127.0.0.1:0".into());
    })
    .await;
    app.init("21").await;
    start_app(&app, "21", APP).await;
    let ca = app.certs.join("dev-ca.crt");
    let c = client_for(&app, &["21"], Some(&ca));
    let (s, body) = get_text(&c, &preview_url(&app, "21", "/")).await;
    assert_eq!(s, 200, "{body}");
    let host = preview_host("21");
    let sent = [
        ("x-forwarded-for", "10.1.2.3"),
        ("x-forwarded-proto", "gopher"),
        ("x-forwarded-host", "evil.example"),
        ("x-request-id", "fast-rid-1"),
        ("x-custom", "a b\tc"),
        ("accept", "application/json"),
    ];

    // Over HTTPS: hyper's path.
    let mut req = c.get(format!(
        "https://{host}:{}/headers",
        app.https_addr.unwrap().port()
    ));
    for (k, v) in sent {
        req = req.header(k, v);
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), 200);
    let by_hyper: serde_json::Value = r.json().await.unwrap();

    // Over plain HTTP: the fast path, on one kept connection.
    let counted_before = preview_counts(&app).await;
    let mut s = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let mut rest = Vec::new();
    // The Host the HTTPS request carried (the app echoes it, and the router ignores the port).
    let https_host = format!("{host}:{}", app.https_addr.unwrap().port());
    let mut head =
        format!("GET /headers HTTP/1.1\r\nHost: {https_host}\r\nConnection: keep-alive\r\n");
    for (k, v) in sent {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let (answer, body) = raw_answer(&mut s, &mut rest, false).await;
    assert!(answer.starts_with("http/1.1 200 ok\r\n"), "{answer}");
    assert!(
        answer.contains("\r\nx-request-id: fast-rid-1\r\n"),
        "{answer}"
    );
    assert!(answer.contains("\r\ndate: "), "{answer}");
    assert!(
        !answer.contains("keep-alive"),
        "hop-by-hop header kept: {answer}"
    );
    // The app saw the same request as over hyper's path (its /headers echo in `body`), with
    // X-Forwarded-Proto `scheme`; reqwest adds accept-encoding and user-agent itself.
    let same_as_hyper = |body: &[u8], scheme: &str| -> serde_json::Value {
        let seen: serde_json::Value = serde_json::from_slice(body).unwrap();
        let mut expected = by_hyper.as_object().unwrap().clone();
        expected.insert("x-forwarded-proto".into(), json!(scheme));
        for k in ["accept-encoding", "user-agent"] {
            expected.remove(k);
        }
        let mut got = seen.as_object().unwrap().clone();
        got.remove("user-agent");
        assert_eq!(got, expected, "fast {seen}\nhyper {by_hyper}");
        seen
    };
    let fast = same_as_hyper(&body, "http");
    assert_eq!(fast["x-forwarded-for"], "10.1.2.3, 127.0.0.1");
    assert_eq!(fast["x-forwarded-host"], https_host.as_str());
    assert!(fast.get("connection").is_none(), "{fast}");

    // HEAD and two pipelined GETs on the same connection.
    let pipelined = format!(
        "HEAD / HTTP/1.1\r\nHost: {host}\r\n\r\nGET /a HTTP/1.1\r\nHost: {host}\r\n\r\n\
         GET /headers HTTP/1.1\r\nHost: {host}\r\n\r\n"
    );
    s.write_all(pipelined.as_bytes()).await.unwrap();
    let (answer, body) = raw_answer(&mut s, &mut rest, true).await;
    assert!(answer.starts_with("http/1.1 200"), "{answer}");
    assert!(answer.contains("content-length: "), "{answer}");
    assert!(body.is_empty());
    let (_, body) = raw_answer(&mut s, &mut rest, false).await;
    assert!(body.starts_with(b"hello from 21 host="), "{body:?}");
    let (answer, body) = raw_answer(&mut s, &mut rest, false).await;
    let made: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let id = made["x-request-id"].as_str().unwrap();
    assert_eq!(id.len(), 32, "{made}");
    assert!(
        answer.contains(&format!("x-request-id: {id}\r\n")),
        "{answer}"
    );

    // A body: hyper's path takes the request, and the connection, from here on.
    s.write_all(
        format!("POST /headers HTTP/1.1\r\nHost: {host}\r\nContent-Length: 3\r\n\r\nabc")
            .as_bytes(),
    )
    .await
    .unwrap();
    let (answer, body) = raw_answer(&mut s, &mut rest, false).await;
    assert!(answer.starts_with("http/1.1 200"), "{answer}");
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["content-length"], "3", "{seen}");
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (answer, body) = raw_answer(&mut s, &mut rest, false).await;
    assert!(answer.starts_with("http/1.1 200"), "{answer}");
    assert!(body.starts_with(b"hello from 21"), "{body:?}");

    // Counted as hyper's path counts them: six answers, the first four by the fast path.
    let counted = preview_counts(&app).await;
    assert_eq!(counted.0, counted_before.0 + 6);
    assert_eq!(counted.1, counted_before.1 + 4);

    // HTTPS over HTTP/1.1 (no ALPN): the fast path too, the same request as hyper's path saw
    // over HTTP/2, on one kept connection; a Host other than the server name is hyper's 421.
    let mut tls = tokio_rustls::TlsConnector::from(tls_client(&ca))
        .connect(
            host.clone().try_into().unwrap(),
            tokio::net::TcpStream::connect(app.https_addr.unwrap())
                .await
                .unwrap(),
        )
        .await
        .unwrap();
    let mut rest = Vec::new();
    for _ in 0..2 {
        tls.write_all(head.as_bytes()).await.unwrap();
        let (answer, body) = raw_answer(&mut tls, &mut rest, false).await;
        assert!(answer.starts_with("http/1.1 200 ok\r\n"), "{answer}");
        assert!(
            answer.contains("\r\nx-request-id: fast-rid-1\r\n"),
            "{answer}"
        );
        same_as_hyper(&body, "https");
    }
    let other = format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", preview_host("22"));
    tls.write_all(other.as_bytes()).await.unwrap();
    let (answer, _) = raw_answer(&mut tls, &mut rest, false).await;
    assert!(answer.starts_with("http/1.1 421"), "{answer}");
    let after_tls = preview_counts(&app).await;
    assert_eq!(after_tls.1, counted.1 + 2, "two fast answers over TLS");
}

/// `sandboxd_preview_requests_total{class="2xx"}` and
/// `sandboxd_preview_fast_path_requests_total` as the metrics listener serves them.
async fn preview_counts(app: &TestApp) -> (u64, u64) {
    let addr = app
        .running
        .as_ref()
        .unwrap()
        .metrics_addr
        .expect("metrics listener");
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |prefix: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in {text}"))
            .trim()
            .parse()
            .unwrap()
    };
    (
        value("sandboxd_preview_requests_total{class=\"2xx\"} "),
        value("sandboxd_preview_fast_path_requests_total "),
    )
}

/// An app that starts as Vite does: it listens once (to check its port), closes, and listens for
/// good a moment later, so a connection made in between is dropped unanswered and one after is
/// refused. Requests held while it starts still get its answer, over the fast path (plain HTTP)
/// and over hyper's path (HTTPS): a new connection dropped before any answer byte is the app
/// coming up, and a GET is sent again (the react-vite test met this on CI).
#[tokio::test]
async fn held_requests_get_the_answer_of_an_app_that_drops_connections_while_it_starts() {
    const FLAPPING: &str = r#"
            const net = require('net');
            let dropped = 0;
            const check = net.createServer((s) => { dropped++; s.destroy(); });
            check.listen(5173, '0.0.0.0', () => setTimeout(() => check.close(() => setTimeout(() => {
              require('http').createServer((q, s) => s.end('up, dropped=' + dropped)).listen(5173, '0.0.0.0');
            }, 150)), 300));
        "#;
    let app = spawn_app_with(|t| {
        t.insert("preview_domain".into(), PREVIEW_DOMAIN.into());
        t.insert("https_addr".into(), "127.0.0.1:0".into());
    })
    .await;
    app.init("22").await;
    let ca = app.certs.join("dev-ca.crt");
    let c = client_for(&app, &["22"], Some(&ca));
    let host = preview_host("22");
    let https = format!("https://{host}:{}/", app.https_addr.unwrap().port());
    let plain = preview_url(&app, "22", "/");
    for round in 0..2 {
        // The app's start and the requests race: the requests are sent as soon as the dev server
        // is spawned, before it listens at all.
        start_app(&app, "22", FLAPPING).await;
        let (a, b) = tokio::join!(get_text(&c, &plain), get_text(&c, &https));
        for (via, (s, body)) in [("http", a), ("https", b)] {
            assert_eq!(s, 200, "round {round} over {via}: {body}");
            assert!(body.starts_with("up, dropped="), "{body}");
            let dropped: u32 = body["up, dropped=".len()..].parse().unwrap();
            assert!(
                dropped >= 1,
                "round {round}: the app dropped nothing: {body}"
            );
        }
    }
}
