//! Points 7-11: hostile clients of the edge. Cross-user access, forged tokens, client-supplied
//! limits, malformed WebSocket frames, slow-loris heads, preview access control and Host
//! routing, all through the real listener.

use std::time::{Duration, Instant};

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::common::preview::{preview_host, preview_url, start_app, PREVIEW_DOMAIN};
use crate::common::ws::{term_url, ws_open, Term, Ws};
use crate::common::*;
use crate::support::*;

/// Sends raw bytes, returns everything the server answers until it closes or goes quiet.
async fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = vec![];
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => {
                out.extend_from_slice(&buf[..n]);
                // One response is enough: stop at the end of a small JSON body.
                if out.windows(4).any(|w| w == b"\r\n\r\n") && out.ends_with(b"}") {
                    break;
                }
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn status_line(resp: &str) -> &str {
    resp.lines().next().unwrap_or("")
}

fn hits(app: &TestApp, user: &str) -> usize {
    std::fs::read_to_string(app.workspaces.join(format!("user-{user}/hits.log")))
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// Point 7: user B's token never reaches user A's sandbox; container ids, prefixes and names
/// sent by a client are refused or ignored.
#[tokio::test]
async fn another_users_token_and_client_sent_container_ids_never_reach_a_sandbox() {
    let app = spawn_app_with(|t| {
        t.insert("preview_domain".into(), PREVIEW_DOMAIN.into());
    })
    .await;
    let a = app.init("ua").await;
    let a_cid = a["containerId"].as_str().unwrap().to_owned();
    let a_name = app.mgr().status(&uid("ua")).await.unwrap().container_name;
    js(
        &app,
        "ua",
        "require('fs').writeFileSync('/workspace/a-only', 'x'); console.log('{}')",
    )
    .await;

    // Status and exit of B, whatever names A's container: B has none.
    for q in [
        format!("?containerId={a_cid}"),
        format!("?containerId={}", &a_cid[..12]),
        format!("?container={a_name}"),
        "?user=ua&userId=ua".to_owned(),
    ] {
        let r = app.get("ub", &format!("/sandbox/status{q}")).await;
        assert_eq!(r.status(), 404, "{q}");
        let r = app
            .client
            .post(format!("{}/sandbox/exit{q}", app.base))
            .bearer_auth(app.token("ub"))
            .header("x-container-id", &a_cid)
            .header("x-user-id", "ua")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{q}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["userId"], "ub");
        assert_eq!(v["removed"], false, "{q}: {v}");
    }
    // JSON fields naming a container or a user are refused.
    for field in ["containerId", "container", "userId", "user", "name"] {
        let r = app
            .post("ub", "/sandbox/execute", json!({"code": "1", field: a_cid}))
            .await;
        assert_eq!(r.status(), 422, "{field}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "invalid_request");
    }
    // A job id of A is not B's.
    let r = app
        .post(
            "ua",
            "/sandbox/projects",
            json!({"template": "node", "name": "proj"}),
        )
        .await;
    assert_eq!(r.status(), 202);
    let job: Value = r.json().await.unwrap();
    let r = app
        .get(
            "ub",
            &format!("/sandbox/jobs/{}", job["id"].as_str().unwrap()),
        )
        .await;
    assert_eq!(r.status(), 404);
    // Events of B do not show A's.
    let ev: Value = app.get("ub", "/sandbox/events").await.json().await.unwrap();
    assert!(!ev.to_string().contains(&a_cid), "{ev}");

    // B's terminal, whatever the query names, is B's sandbox.
    let auth = format!("Bearer {}", app.token("ub"));
    let (ws, _) = ws_open(
        &term_url(&app, &format!("?containerId={a_cid}&user=ua")),
        &[("authorization", &auth), ("x-container-id", &a_cid)],
    )
    .await
    .unwrap();
    drop(ws);
    let mut t = Term::open(&app, "ub", "").await.with_step(TERM_STEP);
    assert_eq!(t.output("hostname").await, "sandbox-ub");
    assert_eq!(
        t.output("ls /workspace/a-only 2>/dev/null | wc -l").await,
        "0"
    );
    drop(t);
    let v = js(
        &app,
        "ub",
        "console.log(JSON.stringify({ user: process.env.SANDBOXD_USER, a: require('fs').existsSync('/workspace/a-only') }))",
    )
    .await;
    assert_eq!(v, json!({"user": "ub", "a": false}));
    // A's container was never touched.
    let i = docker_inspect(&a_cid);
    assert_eq!(i["State"]["Running"], true);
    let s: Value = app.get("ua", "/sandbox/status").await.json().await.unwrap();
    assert_eq!(s["containerId"], a_cid.as_str());
}

fn b64(v: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
}

fn sign(header: &Value, claims: &Value, secret: &[u8]) -> String {
    use hmac_sha256::sign_hs;
    let h = b64(header.to_string().as_bytes());
    let c = b64(claims.to_string().as_bytes());
    let sig = sign_hs(
        header["alg"].as_str().unwrap(),
        format!("{h}.{c}").as_bytes(),
        secret,
    );
    format!("{h}.{c}.{}", b64(&sig))
}

/// HMAC signing for hand-made tokens (HS256/HS384/HS512), through jsonwebtoken.
mod hmac_sha256 {
    pub fn sign_hs(alg: &str, msg: &[u8], secret: &[u8]) -> Vec<u8> {
        use jsonwebtoken::{Algorithm, EncodingKey};
        let alg = match alg {
            "HS384" => Algorithm::HS384,
            "HS512" => Algorithm::HS512,
            _ => Algorithm::HS256,
        };
        let sig = jsonwebtoken::crypto::sign(msg, &EncodingKey::from_secret(secret), alg).unwrap();
        base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, sig).unwrap()
    }
}

/// Point 8: forged, expired, `alg: none`, wrong-secret and otherwise bad tokens get 401 on the
/// API and on the terminal upgrade (header, query and subprotocol), before anything exists.
#[tokio::test]
async fn forged_and_expired_tokens_are_refused_before_any_sandbox_or_exec() {
    let app = spawn_app().await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let secret = SECRET.as_bytes();
    let hs = |alg: &str| json!({"alg": alg, "typ": "JWT"});
    let good_claims = json!({"sub": "v1", "iat": now, "exp": now + 600});
    // The control: a hand-made token with the right secret works.
    let control = sign(&hs("HS256"), &good_claims, secret);
    let bad = vec![
        (
            "wrong secret",
            sign(
                &hs("HS256"),
                &good_claims,
                b"another-secret-0123456789abcdef",
            ),
        ),
        (
            "expired",
            sign(
                &hs("HS256"),
                &json!({"sub": "v1", "iat": now - 7200, "exp": now - 3600}),
                secret,
            ),
        ),
        (
            "no exp",
            sign(&hs("HS256"), &json!({"sub": "v1", "iat": now}), secret),
        ),
        ("HS512", sign(&hs("HS512"), &good_claims, secret)),
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(br#"{"alg":"none","typ":"JWT"}"#),
                b64(good_claims.to_string().as_bytes())
            ),
        ),
        (
            "alg None",
            format!(
                "{}.{}.",
                b64(br#"{"alg":"None"}"#),
                b64(good_claims.to_string().as_bytes())
            ),
        ),
        (
            "bad sub",
            sign(
                &hs("HS256"),
                &json!({"sub": "../v1", "iat": now, "exp": now + 600}),
                secret,
            ),
        ),
        (
            "container sub",
            sign(
                &hs("HS256"),
                &json!({"sub": "V1", "iat": now, "exp": now + 600}),
                secret,
            ),
        ),
        (
            "preview scope",
            sign(
                &hs("HS256"),
                &json!({"sub": "v1", "iat": now, "exp": now + 600, "scope": "preview"}),
                secret,
            ),
        ),
        ("truncated", control[..control.len() - 3].to_owned()),
        ("garbage", "a.b.c".to_owned()),
        ("huge", "x".repeat(6000)),
    ];
    for (why, token) in &bad {
        let r = app
            .client
            .post(format!("{}/sandbox/init", app.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "API, {why}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "unauthorized", "{why}");
        let h = format!("Bearer {token}");
        assert_eq!(
            refused_status(ws_open(&term_url(&app, ""), &[("authorization", &h)]).await),
            401,
            "terminal header, {why}"
        );
        if token.len() < 4000 {
            assert_eq!(
                refused_status(ws_open(&term_url(&app, &format!("?token={token}")), &[]).await),
                401,
                "terminal query, {why}"
            );
            let proto = format!("bearer.{token}");
            assert_eq!(
                refused_status(
                    ws_open(&term_url(&app, ""), &[("sec-websocket-protocol", &proto)]).await
                ),
                401,
                "terminal subprotocol, {why}"
            );
        }
    }
    // Two Authorization headers: refused rather than guessed.
    let r = app
        .client
        .post(format!("{}/sandbox/init", app.base))
        .header("authorization", format!("Bearer {control}"))
        .header("authorization", "Bearer x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // A valid token from a foreign Origin: refused too.
    let h = format!("Bearer {control}");
    assert_eq!(
        refused_status(
            ws_open(
                &term_url(&app, ""),
                &[("authorization", &h), ("origin", "https://evil.example")]
            )
            .await
        ),
        403
    );
    assert!(
        app.containers().is_empty(),
        "a refused request created a sandbox"
    );
    // The control token works (so the refusals above are about the tokens).
    let r = app
        .client
        .post(format!("{}/sandbox/init", app.base))
        .bearer_auth(&control)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // With a sandbox present, refused upgrades add no exec to it.
    let cid = app.containers()[0].clone();
    let execs = || {
        docker_inspect(&cid)["ExecIDs"]
            .as_array()
            .map_or(0, |a| a.len())
    };
    let before = execs();
    for (_, token) in bad.iter().take(5) {
        let h = format!("Bearer {token}");
        assert_eq!(
            refused_status(ws_open(&term_url(&app, ""), &[("authorization", &h)]).await),
            401
        );
    }
    assert_eq!(execs(), before, "a refused upgrade made an exec");
}

/// Point 9: client-supplied limits: timeouts, resize values, body and head sizes, slow heads,
/// malformed and oversized WebSocket frames.
#[tokio::test]
async fn client_supplied_limits_are_rejected_or_clamped() {
    let app = spawn_app_with(|t| {
        t.insert("max_body_bytes".into(), 65536.into());
        t.insert("header_read_timeout".into(), "1s".into());
        t.insert("terminal_max_frame_bytes".into(), 4096.into());
    })
    .await;
    for t in [
        json!(0),
        json!(-1),
        json!(1e12),
        json!("100"),
        json!(1.5),
        json!(60001),
        json!([1]),
        json!({"ms": 1}),
    ] {
        let r = app
            .post(
                "l1",
                "/sandbox/execute",
                json!({"code": "1", "timeoutMs": t}),
            )
            .await;
        assert_eq!(r.status(), 422, "timeoutMs {t}");
    }
    // Bodies: over the limit by Content-Length, by a lying chunked stream, and code over its
    // own cap.
    let r = app
        .client
        .post(format!("{}/sandbox/execute", app.base))
        .bearer_auth(app.token("l1"))
        .body(vec![b' '; 70_000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    // Refused before its body was read: the answer closes the connection, so the client does
    // not reuse it for the next request (which the server would then drop).
    assert_eq!(r.headers()["connection"], "close");
    let chunks = futures_util::stream::iter(
        (0..40).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b' '; 4096]))),
    );
    let r = app
        .client
        .post(format!("{}/sandbox/execute", app.base))
        .bearer_auth(app.token("l1"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    // Refused before its body was read: the answer closes the connection, so the client does
    // not reuse it for the next request (which the server would then drop).
    assert_eq!(r.headers()["connection"], "close");
    // Heads: 431 past the head limit (64 KiB), and nothing sent after such a head is served;
    // a head just under the limit is served.
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n\
         GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let resp = {
        // Read to the close (the answer says `Connection: close`), so a second answer would show.
        let mut s = TcpStream::connect(app.addr).await.unwrap();
        let _ = s.write_all(big.as_bytes()).await;
        let mut out = vec![];
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        assert!(read.is_ok(), "the connection stayed open after the 431");
        String::from_utf8_lossy(&out).into_owned()
    };
    assert!(status_line(&resp).starts_with("HTTP/1.1 431"), "{resp:?}");
    assert!(resp.contains("\"code\":\"head_too_large\""), "{resp:?}");
    assert_eq!(resp.matches("HTTP/1.1 ").count(), 1, "{resp:?}");
    let near = format!(
        "GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n",
        "a".repeat(60 * 1024)
    );
    let resp = raw(app.addr, near.as_bytes()).await;
    assert!(status_line(&resp).starts_with("HTTP/1.1 200"), "{resp:?}");
    assert!(app.containers().is_empty());

    // Slow loris: heads trickled a byte at a time are cut at header_read_timeout (1 s) while
    // ordinary requests are served at once.
    let loris: Vec<_> = (0..20)
        .map(|_| {
            let addr = app.addr;
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                let t0 = Instant::now();
                let head = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
                for b in head.iter() {
                    if s.write_all(&[*b]).await.is_err() {
                        return t0.elapsed();
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    if t0.elapsed() > Duration::from_secs(15) {
                        break;
                    }
                }
                // Either the writes failed above, or the server closes now.
                let mut buf = [0u8; 256];
                let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
                t0.elapsed()
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..5 {
        let t0 = Instant::now();
        let r = app
            .client
            .get(format!("{}/healthz", app.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    }
    for l in loris {
        let took = l.await.unwrap();
        assert!(
            took < Duration::from_secs(6),
            "a slow head was held for {took:?}"
        );
    }

    // Terminal: absurd sizes are clamped (query and control message), bad ones answered with
    // an error frame; the terminal stays usable.
    let auth = format!("Bearer {}", app.token("l1"));
    let (ws, _) = ws_open(
        &term_url(&app, "?cols=99999999999999999999999999&rows=-7"),
        &[("authorization", &auth)],
    )
    .await
    .unwrap();
    let mut t = Term::from_ws(ws).with_step(TERM_STEP);
    assert_eq!(t.output("stty size").await, "1 1000");
    for bad in [
        json!({"type": "resize", "cols": 1e300, "rows": -1e12}),
        json!({"type": "resize", "cols": "80", "rows": 24}),
        json!({"type": "resize", "cols": 1.5, "rows": 24}),
        json!({"type": "nope"}),
        json!([1, 2]),
    ] {
        t.ws.send(Message::Text(bad.to_string())).await.unwrap();
    }
    assert_eq!(t.output("stty size").await, "1 1000");
    t.ws.send(Message::Text(
        json!({"type": "resize", "cols": 90, "rows": 30}).to_string(),
    ))
    .await
    .unwrap();
    assert_eq!(t.output("stty size").await, "30 90");

    // Malformed frames close with the right code: an unmasked client frame and a reserved
    // opcode are protocol errors (1002), invalid UTF-8 in a text frame is 1007, a frame over
    // terminal_max_frame_bytes is 1009.
    let cases: [(&str, Vec<u8>, u16); 4] = [
        ("unmasked", vec![0x82, 0x02, b'h', b'i'], 1002),
        ("reserved opcode", masked(0x83, b"hi"), 1002),
        ("invalid utf-8", masked(0x81, &[0xff, 0xfe, 0xfd]), 1007),
        ("oversized", masked(0x82, &vec![b'a'; 8192]), 1009),
    ];
    for (why, frame, code) in cases {
        let (mut ws, _) = ws_open(&term_url(&app, ""), &[("authorization", &auth)])
            .await
            .unwrap();
        match ws.get_mut() {
            tokio_tungstenite::MaybeTlsStream::Plain(s) => s.write_all(&frame).await.unwrap(),
            _ => unreachable!(),
        }
        let got = close_code(&mut ws).await;
        assert_eq!(got, Some(code), "{why}");
    }
}

/// A client frame: FIN + opcode, mask bit and a zero mask (payload unchanged).
fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![first];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n < 65536 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&[0, 0, 0, 0]);
    f.extend_from_slice(payload);
    f
}

/// The close code the server sends, skipping output.
async fn close_code(ws: &mut Ws) -> Option<u16> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ws.next()).await {
            Err(_) => panic!("no close frame within 20 s"),
            Ok(Some(Ok(Message::Close(c)))) => return c.map(|c| u16::from(c.code)),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_))) | Ok(None) => return None,
        }
    }
}

/// Point 10: `preview_access = "owner"`.
#[tokio::test]
async fn private_previews_open_only_for_their_owner_through_a_host_only_cookie() {
    let app = spawn_app_with(|t| {
        t.insert("preview_domain".into(), PREVIEW_DOMAIN.into());
        t.insert("https_addr".into(), "127.0.0.1:0".into());
        t.insert("preview_access".into(), "owner".into());
    })
    .await;
    start_app(&app, "pa", APP).await;
    start_app(&app, "pb", APP).await;
    let ca = app.certs.join("dev-ca.crt");
    let c = preview_client(&app, &["pa", "pb"], Some(&ca));
    let https = app.https_addr.unwrap().port();
    let surl = |u: &str, p: &str| format!("https://{}:{https}{p}", preview_host(u));

    // Unauthenticated, or with the owner's API token instead of a preview link: refused, and
    // the app never sees the request.
    let before = hits(&app, "pa");
    let r = c.get(surl("pa", "/")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .get(surl("pa", "/"))
        .bearer_auth(app.token("pa"))
        .header("cookie", format!("sandboxd_preview={}", app.token("pa")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // The owner's link: a redirect that sets a host-only, Secure, HttpOnly, partitioned
    // cookie (SameSite=None, so that the console can show it in its iframe) and drops the token
    // from the URL.
    let link = |user: &str| {
        let app = &app;
        let user = user.to_owned();
        async move {
            let r = app.post(&user, "/sandbox/preview-link", json!({})).await;
            assert_eq!(r.status(), 200);
            let v: Value = r.json().await.unwrap();
            let url = v["url"].as_str().unwrap().to_owned();
            let token = url.split("sandboxd_token=").nth(1).unwrap().to_owned();
            token
        }
    };
    let ta = link("pa").await;
    let tb = link("pb").await;
    let r = c
        .get(surl("pa", &format!("/page?x=1&sandboxd_token={ta}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/page?x=1");
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    let attrs: Vec<String> = cookie
        .split(';')
        .map(|a| a.trim().to_ascii_lowercase())
        .collect();
    for want in [
        "secure",
        "httponly",
        "samesite=none",
        "partitioned",
        "path=/",
    ] {
        assert!(attrs.iter().any(|a| a == want), "{want} missing: {cookie}");
    }
    assert!(
        !attrs.iter().any(|a| a.starts_with("domain")),
        "not host-only: {cookie}"
    );
    let (name, value) = cookie.split(';').next().unwrap().split_once('=').unwrap();
    assert!(name.starts_with("__Host-"), "{cookie}");
    assert_eq!(hits(&app, "pa"), before, "the app saw refused requests");

    // The owner gets in with the cookie; the app never sees it.
    let body = wait_owner(&c, &surl("pa", "/"), &format!("{name}={value}")).await;
    assert!(body.starts_with("app of pa"), "{body}");
    assert!(
        !body.contains(value),
        "the preview cookie reached the app: {body}"
    );

    // Another user's link, cookie or a tossed duplicate does not open it, nor does A's cookie
    // open B's preview.
    let r = c
        .get(surl("pa", &format!("/?sandboxd_token={tb}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    for cookie in [
        format!("{name}={tb}"),
        format!("sandboxd_preview={ta}"),
        format!("{name}=garbage"),
    ] {
        let r = c
            .get(surl("pa", "/"))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{cookie}");
    }
    let r = c
        .get(surl("pb", "/"))
        .header("cookie", format!("{name}={ta}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // A cookie tossed by a sibling host in front of the owner's does not lock the owner out.
    let r = c
        .get(surl("pa", "/"))
        .header("cookie", format!("{name}={tb}; {name}={ta}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Over plain HTTP the cookie cannot be Secure (nor __Host-); it is still host-only.
    let plain = preview_url(&app, "pa", &format!("/?sandboxd_token={ta}"));
    let r = c.get(plain).send().await.unwrap();
    assert_eq!(r.status(), 303);
    let cookie = r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(!cookie.contains("domain="), "{cookie}");
    assert!(
        cookie.contains("httponly") && cookie.contains("samesite=lax"),
        "{cookie}"
    );
}

async fn wait_owner(c: &reqwest::Client, url: &str, cookie: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = c.get(url).header("cookie", cookie).send().await.unwrap();
        let s = r.status();
        let body = r.text().await.unwrap();
        if s == 200 {
            return body;
        }
        assert!(s != 401 && Instant::now() < deadline, "{s}: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Point 11: only a valid preview host reaches a container; smuggling shapes are refused.
#[tokio::test]
async fn only_valid_preview_hosts_reach_a_container_and_injection_is_refused() {
    let app = spawn_app_with(|t| {
        t.insert("preview_domain".into(), PREVIEW_DOMAIN.into());
    })
    .await;
    start_app(&app, "ha", APP).await;
    let c = preview_client(&app, &["ha"], None);
    wait_preview(&c, &preview_url(&app, "ha", "/")).await;
    let before = hits(&app, "ha");
    let p = app.addr.port();
    let h = preview_host("ha");
    let bad_hosts = [
        "evil.example".to_owned(),
        format!("{h}.evil.example"),
        format!("x{h}"),
        format!("user-ha..{PREVIEW_DOMAIN}"),
        format!("user-ha_x.{PREVIEW_DOMAIN}"),
        format!("user-.{PREVIEW_DOMAIN}"),
        format!("a.user-ha.{PREVIEW_DOMAIN}"),
        format!("5173-user-ha.{PREVIEW_DOMAIN}"),
        format!("9999-user-ha.{PREVIEW_DOMAIN}"),
        format!("{h}@evil.example"),
        format!("evil.example#{h}"),
        format!("{h}:{p}:{p}"),
        format!("user-ha.{PREVIEW_DOMAIN}%00"),
        PREVIEW_DOMAIN.to_owned(),
        "user-ha.preview.example.tes".to_owned(),
        "172.17.0.1".to_owned(),
        format!("[::1]{h}"),
    ];
    for host in &bad_hosts {
        let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let resp = raw(app.addr, req.as_bytes()).await;
        let line = status_line(&resp);
        assert!(
            line.starts_with("HTTP/1.1 4"),
            "Host {host:?} answered {line:?}"
        );
    }
    // Smuggling shapes: two Host headers, an absolute-form URI naming another host, a bare CR
    // inside a header, an obs-folded header, a broken request line. (A bare LF ends a header
    // line, as RFC 9112 allows, and hyper drops Content-Length next to Transfer-Encoding; the
    // proxy re-frames what it forwards either way.)
    let injections = [
        format!("GET / HTTP/1.1\r\nHost: {h}\r\nHost: evil.example\r\n\r\n"),
        format!("GET / HTTP/1.1\r\nHost: localhost\r\nHost: {h}\r\n\r\n"),
        format!("GET http://evil.example/ HTTP/1.1\r\nHost: {h}\r\n\r\n"),
        format!("GET http://{h}/ HTTP/1.1\r\nHost: localhost\r\n\r\n"),
        format!("GET / HTTP/1.1\r\nHost: {h}\rX-Injected: 1\r\n\r\n"),
        format!("GET / HTTP/1.1\r\nHost: {h}\r\nX-A: 1\r\n X-Folded: 2\r\n\r\n"),
        format!("GET /\r\n HTTP/1.1\r\nHost: {h}\r\n\r\n"),
    ];
    for req in &injections {
        let resp = raw(app.addr, req.as_bytes()).await;
        let line = status_line(&resp);
        assert!(
            line.is_empty() || line.starts_with("HTTP/1.1 4"),
            "{req:?} answered {line:?}"
        );
    }
    // None of it reached the app (the control below does).
    assert_eq!(
        hits(&app, "ha"),
        before,
        "a refused request reached the container"
    );
    let r = c.get(preview_url(&app, "ha", "/ok")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(hits(&app, "ha"), before + 1);
    // The main host's routes never reach a container either, whatever the path.
    for path in [
        "/",
        "/sandbox/../",
        "//user-ha.preview.example.test/",
        "/@user-ha",
    ] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        let _ = raw(app.addr, req.as_bytes()).await;
    }
    assert_eq!(hits(&app, "ha"), before + 1);
}
