//! The terminal WebSocket against the real engine, with a real WebSocket client: round trips,
//! resizes, independent shells, exit and close semantics, clean-up of everything a terminal
//! started, the refusals (and that they create no exec), frame limits, backpressure under a
//! flood, the three ways to pass a token, and bytes that detach keys would swallow.

use std::time::{Duration, Instant};

use crate::common::ws::{term_url, ws_open, Term, STEP};
use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

fn container_of(app: &TestApp) -> String {
    let ids = app.containers();
    assert_eq!(ids.len(), 1, "exactly one container: {ids:?}");
    ids[0].clone()
}

/// `ps` in the container, as the engine sees it (not through the code under test).
fn ps(container: &str) -> String {
    let out = std::process::Command::new("docker")
        .args(["exec", container, "ps", "-eo", "pid,sid,args"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "docker exec ps: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits up to 5 s for `ps` to show none of `needles`; returns the last listing.
async fn wait_gone(container: &str, needles: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let list = ps(container);
        if !needles.iter().any(|n| list.contains(n)) || Instant::now() > deadline {
            return list;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn exec_ids(container: &str) -> usize {
    docker_inspect(container)["ExecIDs"]
        .as_array()
        .map_or(0, Vec::len)
}

#[tokio::test]
async fn echo_round_trip_size_resize_and_a_proper_login_shell() {
    let app = spawn_app().await;
    let mut t = Term::open(&app, "7", "?cols=100&rows=30").await;
    assert_eq!(t.run("echo hello").await, "hello");
    // The initial size from the query, then resizes (clamped to 1..=1000).
    assert_eq!(
        t.run("tput cols; tput lines").await,
        "100\n30".replace('\n', "\r\n")
    );
    t.control(serde_json::json!({"type": "resize", "cols": 132, "rows": 43}))
        .await;
    assert_eq!(t.run("tput cols").await, "132");
    assert_eq!(t.run("stty size").await, "43 132");
    t.control(serde_json::json!({"type": "resize", "cols": 5000, "rows": 0}))
        .await;
    assert_eq!(t.run("stty size").await, "1 1000");
    t.control(serde_json::json!({"type": "resize", "cols": 80, "rows": 24}))
        .await;
    // uid 1000, /workspace, TERM, a login shell, and job control on a real controlling TTY.
    assert_eq!(t.run("id -u").await, "1000");
    assert_eq!(t.run("pwd").await, "/workspace");
    assert_eq!(t.run("echo $TERM").await, "xterm-256color");
    assert_eq!(t.run("shopt -q login_shell && echo login").await, "login");
    assert_eq!(
        t.run("echo ${-//[^m]/}").await,
        "m",
        "job control (set -m) is on"
    );
    assert!(t.run("tty").await.starts_with("/dev/pts/"));
    // The shell leads its session and owns the terminal: `ps` in the foreground group is
    // the terminal's foreground process group.
    let ids = t.run("ps -o sid=,tpgid= -p $$").await;
    let ids: Vec<&str> = ids.split_whitespace().collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert_ne!(ids[1], "-1", "the shell has a controlling terminal");
    t.send("sleep 30\r").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    t.send("\x03").await; // Ctrl-C interrupts the foreground job, not the shell.
    assert_eq!(t.run("echo still-here").await, "still-here");
}

#[tokio::test]
async fn cwd_from_the_query() {
    let app = spawn_app().await;
    let mut t = Term::open(&app, "8", "").await;
    t.run("mkdir -p '/workspace/my app/src'").await;
    let mut t2 = Term::open(&app, "8", "?cwd=%2Fworkspace%2Fmy+app%2Fsrc").await;
    assert_eq!(t2.run("pwd").await, "/workspace/my app/src");
    let cid = container_of(&app);
    let before = exec_ids(&cid);
    for (q, status) in [
        ("?cwd=/etc", 422),
        ("?cwd=/workspace/../etc", 422),
        ("?cols=wide", 422),
        ("?cwd=/workspace/missing", 422),
    ] {
        let auth = format!("Bearer {}", app.token("8"));
        match ws_open(&term_url(&app, q), &[("authorization", &auth)]).await {
            Err(WsError::Http(r)) => assert_eq!(r.status(), status, "{q}"),
            other => panic!(
                "{q}: expected {status}, got {:?}",
                other.map(|(_, r)| r.status())
            ),
        }
    }
    assert!(
        exec_ids(&cid) <= before,
        "a refused upgrade created an exec"
    );
}

#[tokio::test]
async fn two_terminals_are_independent_and_exit_ends_only_one() {
    let app = spawn_app().await;
    let mut a = Term::open(&app, "9", "").await;
    let mut b = Term::open(&app, "9", "").await;
    let tty_a = a.run("tty").await;
    let tty_b = b.run("tty").await;
    assert_ne!(tty_a, tty_b, "each terminal has its own PTY");
    assert_ne!(a.run("echo $$").await, b.run("echo $$").await);
    let cid = container_of(&app);

    // A background job must not keep the terminal open after its shell exits, nor survive it.
    // (on the terminal itself, so it holds the PTY open).
    a.send("sleep 311 &\r").await;
    assert_eq!(a.run("echo started").await, "started");
    a.send("exit 3\r").await;
    let frame = a.closed().await.expect("a close frame");
    assert_eq!(u16::from(frame.code), 1000);
    assert_eq!(frame.reason, "exit 3");

    assert_eq!(b.run("echo alive").await, "alive");
    assert_eq!(docker_inspect(&cid)["State"]["Running"], true);
    let list = wait_gone(&cid, &["sleep 311"]).await;
    assert!(!list.contains("sleep 311"), "left behind:\n{list}");

    // Ctrl-D ends a shell too, with status 0.
    b.send("\x04").await;
    let frame = b.closed().await.expect("a close frame");
    assert_eq!(
        (u16::from(frame.code), frame.reason.as_ref()),
        (1000, "exit 0")
    );
    assert_eq!(docker_inspect(&cid)["State"]["Running"], true);
    let mut c = Term::open(&app, "9", "").await;
    assert_eq!(c.run("echo again").await, "again");
}

#[tokio::test]
async fn closing_or_dropping_the_socket_leaves_no_process_behind() {
    let app = spawn_app().await;
    let mut keep = Term::open(&app, "10", "").await;
    keep.run("sleep 320 >/dev/null 2>&1 & echo ok").await;
    let cid = container_of(&app);
    // Background jobs, a nohup'd one, a new session, a double fork and an `env -i` child that
    // stays in the session.
    let spawn = "sleep 321 >/dev/null 2>&1 & nohup sleep 322 >/dev/null 2>&1 & \
                 setsid sleep 323 >/dev/null 2>&1 & (sleep 324 >/dev/null 2>&1 &) ; \
                 env -i /bin/sleep 325 >/dev/null 2>&1 & echo spawned";

    let mut t = Term::open(&app, "10", "").await;
    assert_eq!(t.run(spawn).await, "spawned");
    t.send("sleep 326\r").await; // a foreground job too
    tokio::time::sleep(Duration::from_millis(300)).await;
    let names = [
        "sleep 321",
        "sleep 322",
        "sleep 323",
        "sleep 324",
        "sleep 325",
        "sleep 326",
    ];
    let list = ps(&cid);
    for n in names {
        assert!(list.contains(n), "{n} should run:\n{list}");
    }
    t.ws.close(None).await.unwrap();
    let list = wait_gone(&cid, &names).await;
    for n in names {
        assert!(!list.contains(n), "{n} left behind after close:\n{list}");
    }

    // A network drop: the TCP connection goes away without a close frame.
    let mut t = Term::open(&app, "10", "").await;
    assert_eq!(
        t.run("sleep 331 >/dev/null 2>&1 & setsid sleep 332 >/dev/null 2>&1 & echo spawned")
            .await,
        "spawned"
    );
    drop(t);
    let list = wait_gone(&cid, &["sleep 331", "sleep 332"]).await;
    assert!(
        !list.contains("sleep 33"),
        "left behind after a drop:\n{list}"
    );
    // The other terminal and its job are untouched; only its own login shell remains.
    assert!(list.contains("sleep 320"), "{list}");
    let shells = list
        .lines()
        .filter(|l| l.trim_end().ends_with(" bash -l"))
        .count();
    assert_eq!(shells, 1, "{list}");
    assert_eq!(keep.run("echo fine").await, "fine");
}

#[tokio::test]
async fn refusals_happen_before_any_exec_and_users_stay_apart() {
    let app = spawn_app().await;
    let u = term_url(&app, "");
    let status = |r: Result<_, WsError>| match r {
        Err(WsError::Http(resp)) => {
            let body: serde_json::Value =
                serde_json::from_slice(resp.body().as_deref().unwrap_or(b"{}")).unwrap_or_default();
            // Every refusal is a documented answer of the terminal route (docs/openapi.json).
            openapi::check("GET", "/sandbox/terminal", resp.status().as_u16(), &body);
            (
                resp.status().as_u16(),
                body["error"]["code"].as_str().unwrap_or("").to_owned(),
            )
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("the upgrade should have been refused"),
    };
    let good = format!("Bearer {}", app.token("21"));
    let other_secret = sandboxd::auth::Auth::new(b"some-other-secret-0123456789abcd");
    let forged = other_secret
        .issue(
            &sandboxd::user::UserId::parse("21").unwrap(),
            Duration::from_secs(60),
        )
        .unwrap();

    assert_eq!(status(ws_open(&u, &[]).await), (401, "unauthorized".into()));
    let forged_h = format!("Bearer {forged}");
    assert_eq!(
        status(ws_open(&u, &[("authorization", &forged_h)]).await).0,
        401
    );
    assert_eq!(
        status(ws_open(&term_url(&app, &format!("?token={forged}")), &[]).await).0,
        401
    );
    assert_eq!(
        status(
            ws_open(
                &u,
                &[("authorization", &good), ("origin", "https://evil.example")]
            )
            .await
        ),
        (403, "origin_not_allowed".into())
    );
    assert_eq!(
        status(ws_open(&u, &[("authorization", &good), ("origin", "null")]).await).0,
        403
    );
    // Nothing was created for any of them: no container at all.
    assert!(
        app.containers().is_empty(),
        "a refused upgrade created a container"
    );

    // Not an upgrade at all: 400; a wrong WebSocket version: 426.
    let r = app.get("21", "/sandbox/terminal").await;
    assert_eq!(r.status(), 400);
    let r = app
        .client
        .get(format!("{}/sandbox/terminal", app.base))
        .bearer_auth(app.token("21"))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "8")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 426);
    assert_eq!(r.headers()["sec-websocket-version"], "13");
    assert!(app.containers().is_empty());

    // With a running sandbox, refusals add no exec to it.
    app.init("21").await;
    let cid = container_of(&app);
    let before = exec_ids(&cid);
    assert_eq!(status(ws_open(&u, &[]).await).0, 401);
    assert_eq!(
        status(ws_open(&u, &[("authorization", &forged_h)]).await).0,
        401
    );
    assert_eq!(
        status(
            ws_open(
                &u,
                &[
                    ("authorization", &good),
                    ("origin", "http://localhost.evil:1")
                ]
            )
            .await
        )
        .0,
        403
    );
    assert_eq!(exec_ids(&cid), before, "a refused upgrade created an exec");

    // The page's own origin is accepted (same scheme, host and port as the request).
    let own = format!("http://{}", app.addr);
    let (mut ws, _) = ws_open(&u, &[("authorization", &good), ("origin", &own)])
        .await
        .unwrap();
    ws.close(None).await.unwrap();

    // Another user's token reaches that user's own sandbox only.
    let mut b = Term::open(&app, "22", "").await;
    assert_eq!(b.run("hostname").await, "sandbox-22");
    let mut a = Term::open(&app, "21", "").await;
    assert_eq!(a.run("hostname").await, "sandbox-21");
    assert_eq!(app.containers().len(), 2);
}

#[tokio::test]
async fn too_many_terminals_is_429() {
    let app = spawn_app_with(|t| {
        t.insert("terminal_per_user".into(), 2.into());
    })
    .await;
    let mut a = Term::open(&app, "23", "").await;
    let _b = Term::open(&app, "23", "").await;
    let auth = format!("Bearer {}", app.token("23"));
    match ws_open(&term_url(&app, ""), &[("authorization", &auth)]).await {
        Err(WsError::Http(r)) => assert_eq!(r.status(), 429),
        other => panic!("expected 429, got {:?}", other.map(|(_, r)| r.status())),
    }
    // Another user is not affected, and a closed terminal frees its place.
    let _c = Term::open(&app, "24", "").await;
    a.send("exit\r").await;
    a.closed().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match ws_open(&term_url(&app, ""), &[("authorization", &auth)]).await {
            Ok(_) => break,
            Err(WsError::Http(r)) if r.status() == 429 && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("reopening failed: {e}"),
        }
    }
}

#[tokio::test]
async fn an_oversized_frame_closes_with_1009() {
    let app = spawn_app().await;
    let mut t = Term::open(&app, "25", "").await;
    assert_eq!(t.run("echo up").await, "up");
    // Just under the 1 MiB limit is fine.
    let pad = "x".repeat(1024 * 1024 - 40);
    t.ws.send(Message::Text(format!(
        "{{\"type\":\"ping\",\"pad\":\"{pad}\"}}"
    )))
    .await
    .unwrap();
    let deadline = Instant::now() + STEP;
    loop {
        match tokio::time::timeout_at(deadline.into(), t.ws.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Text(s))) => {
                assert_eq!(s, r#"{"type":"pong"}"#);
                break;
            }
            Some(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    }
    t.ws.send(Message::Binary(vec![b'a'; 2 * 1024 * 1024]))
        .await
        .unwrap();
    let frame = t.closed().await.expect("a close frame");
    assert_eq!(u16::from(frame.code), 1009, "{frame:?}");
    let cid = container_of(&app);
    let list = wait_gone(&cid, &["bash -l"]).await;
    assert!(!list.contains("bash -l"), "{list}");
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test]
async fn a_flood_to_a_slow_reader_keeps_server_memory_bounded() {
    // Alone: the RSS measured is the whole process's, where other tests run their servers.
    let alone = gate::alone().await;
    let app = spawn_app_alone(&alone, |_| {}).await;
    let mut t = Term::open(&app, "26", "").await;
    assert_eq!(t.run("echo up").await, "up");
    let before = rss_kib();
    t.send("yes 0123456789012345678901234567890123456789012345678901234567890123456789\r")
        .await;
    // Read slowly for 6 s: one frame every 20 ms.
    let until = Instant::now() + Duration::from_secs(6);
    let mut got = 0usize;
    let mut peak = before;
    while Instant::now() < until {
        match tokio::time::timeout(STEP, t.ws.next())
            .await
            .expect("output keeps coming")
        {
            Some(Ok(Message::Binary(b))) => got += b.len(),
            Some(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
        peak = peak.max(rss_kib());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(got > 100_000, "the flood should flow (got {got} bytes)");
    let growth_mib = (peak.saturating_sub(before)) / 1024;
    eprintln!("flood: read {got} bytes slowly; RSS {before} KiB before, peak {peak} KiB");
    assert!(
        growth_mib < 64,
        "RSS grew by {growth_mib} MiB while a client read slowly"
    );
    // Ctrl-C still gets through during the flood, and the shell answers afterwards.
    t.send("\x03").await;
    t.send("echo \"<$((6*7))>done\"\r").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "no prompt after Ctrl-C");
        match tokio::time::timeout(STEP, t.ws.next())
            .await
            .expect("output")
        {
            Some(Ok(Message::Binary(b))) => {
                t.buf.push_str(&String::from_utf8_lossy(&b));
                if t.buf.contains("<42>done") {
                    break;
                }
                let keep = t.buf.len().saturating_sub(64);
                t.buf.drain(..keep);
            }
            Some(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn token_in_the_query_or_the_subprotocol() {
    let app = spawn_app().await;
    let (ws, _) = ws_open(&term_url(&app, &format!("?token={}", app.token("27"))), &[])
        .await
        .unwrap();
    let mut t = Term::from_ws(ws);
    assert_eq!(t.run("hostname").await, "sandbox-27");

    let proto = format!("bearer.{}", app.token("28"));
    let (ws, resp) = ws_open(&term_url(&app, ""), &[("sec-websocket-protocol", &proto)])
        .await
        .unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], proto.as_str());
    let mut t = Term::from_ws(ws);
    assert_eq!(t.run("hostname").await, "sandbox-28");
}

#[tokio::test]
async fn every_byte_reaches_the_shell_and_control_messages_work() {
    let app = spawn_app().await;
    let mut t = Term::open(&app, "29", "").await;
    assert_eq!(t.run("echo up").await, "up");
    // Ctrl-P Ctrl-Q (Docker's default detach keys) and other bytes a filter could take, as raw
    // binary input and then as a control message; the PTY is raw, so `od` shows each byte.
    t.send("stty raw -echo; head -c 8 | od -An -tx1; stty sane\r")
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    t.ws.send(Message::Binary(
        b"\x10\x11\x03\x04\x00\x1c\x1b\xff".to_vec(),
    ))
    .await
    .unwrap();
    t.until("10 11 03 04 00 1c 1b ff").await;
    assert_eq!(t.run("echo after").await, "after");
    t.send("stty raw -echo; head -c 4 | od -An -tx1; stty sane\r")
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    t.control(serde_json::json!({"type": "input", "data": "\u{10}\u{11}P\u{10}"}))
        .await;
    t.until("10 11 50 10").await;
    assert_eq!(t.run("echo after").await, "after");

    // ping → pong; invalid control → an error frame, and the session carries on.
    t.control(serde_json::json!({"type": "ping"})).await;
    t.ws.send(Message::Text("{not json".into())).await.unwrap();
    t.control(serde_json::json!({"type": "launch"})).await;
    let mut texts = vec![];
    let deadline = Instant::now() + STEP;
    while texts.len() < 3 {
        match tokio::time::timeout_at(deadline.into(), t.ws.next())
            .await
            .expect("control answers")
        {
            Some(Ok(Message::Text(s))) => {
                texts.push(serde_json::from_str::<serde_json::Value>(&s).unwrap())
            }
            Some(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(texts[0], serde_json::json!({"type": "pong"}));
    for e in &texts[1..] {
        assert_eq!(e["type"], "error");
        assert_eq!(e["code"], "invalid_control");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    assert_eq!(t.run("echo still").await, "still");
}
