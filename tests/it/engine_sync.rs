//! Containers changed behind sandboxd's back, against the real engine: `docker pause`,
//! `docker stop`, `docker kill`, `docker rm -f` and an OOM kill of PID 1, each while a client
//! polls the preview and a terminal is open. After each, the store records the outside event
//! (an `external: …` reason) and the next preview request, execution, API call and new
//! terminal succeed, as after sandboxd's own transitions. sandboxd's own pause and stop leave
//! no `external:` event. Request framing (CL + TE, several lengths) is refused at the edge on
//! the main host and on a preview host, over keep-alive too.
//!
//! Measured times are printed (`--nocapture`); the bounds asserted are generous functional
//! deadlines, not performance checks (bench/ measures those).

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::preview::{
    preview_client_builder, preview_host, preview_url, start_app, PREVIEW_DOMAIN,
};
use crate::common::ws::Ws;
use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use sandboxd::user::UserId;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

/// Generous bound for "the next request succeeds" (the budget is about a second).
const NEXT_REQUEST: Duration = Duration::from_secs(10);
/// Generous bound for "the store records the outside event" (the aim is under a second).
const EVENT_SEEN: Duration = Duration::from_secs(5);

/// A client for the preview host of `user` (see `preview_client_builder`).
fn client_for(app: &TestApp, user: &str) -> reqwest::Client {
    preview_client_builder(app, &[user], None)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

async fn spawn(memory_mb: Option<i64>) -> TestApp {
    spawn_app_with(|t| {
        t.insert("preview_domain".into(), PREVIEW_DOMAIN.into());
        t.insert("upstream_head_timeout".into(), "1s".into());
        if let Some(m) = memory_mb {
            t.insert("memory_mb".into(), m.into());
        }
    })
    .await
}

/// A small app (started through the image's dev-server autostart, so every container start
/// brings it back) that answers with the user id and remembers the paths it was asked for.
const APP: &str = r#"
            const seen = [];
            require('http').createServer((q, s) => {
              seen.push(q.url); if (seen.length > 200) seen.shift();
              if (q.url === '/seen') return s.end(JSON.stringify(seen));
              if (q.url === '/slow') return setTimeout(() => s.end('slow done'), 1500);
              s.end('hello from ' + process.env.SANDBOXD_USER);
            }).listen(5173, '0.0.0.0');
        "#;

async fn get_preview(c: &reqwest::Client, url: &str) -> (u16, String) {
    let r = c.get(url).send().await.expect("preview request");
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

/// The user's history, newest first.
async fn events(app: &TestApp, user: &str) -> Vec<Value> {
    let v: Value = app.get(user, "/sandbox/events").await.json().await.unwrap();
    v["events"].as_array().cloned().unwrap_or_default()
}

/// Waits for a new event of `kind` whose reason starts with `external:` and contains `has`;
/// returns it and how long it took.
async fn wait_external(
    app: &TestApp,
    user: &str,
    before: usize,
    kind: &str,
    has: &str,
) -> (Value, Duration) {
    let t = Instant::now();
    loop {
        let list = events(app, user).await;
        let fresh = &list[..list.len().saturating_sub(before)];
        if let Some(e) = fresh.iter().find(|e| {
            let reason = e["reason"].as_str().unwrap_or("");
            e["kind"] == kind && reason.starts_with("external:") && reason.contains(has)
        }) {
            return (e.clone(), t.elapsed());
        }
        assert!(
            t.elapsed() < EVENT_SEEN,
            "no external {kind} event ({has}) within {EVENT_SEEN:?}; new events: {fresh:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn docker(args: &[&str]) {
    let out = Command::new("docker").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn container_id(app: &TestApp, user: &str) -> String {
    let st: Value = app.get(user, "/sandbox/status").await.json().await.unwrap();
    st["containerId"].as_str().expect("a container").to_owned()
}

async fn open_terminal(app: &TestApp, user: &str) -> Ws {
    let mut req = format!("ws://{}/sandbox/terminal", app.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {}", app.token(user))).unwrap(),
    );
    let (ws, resp) = tokio::time::timeout(NEXT_REQUEST, tokio_tungstenite::connect_async(req))
        .await
        .expect("terminal handshake in time")
        .expect("terminal opens");
    assert_eq!(resp.status(), 101);
    ws
}

/// Types a command into the terminal and waits for its output.
async fn terminal_echo(ws: &mut Ws, tag: &str) -> Result<(), String> {
    let cmd = format!("echo {tag}-$((6*7))\n");
    ws.send(Message::Binary(cmd.into_bytes()))
        .await
        .map_err(|e| format!("send: {e}"))?;
    let want = format!("{tag}-42");
    let mut seen = String::new();
    let deadline = Instant::now() + NEXT_REQUEST;
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(500), ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => {
                seen.push_str(&String::from_utf8_lossy(&b));
                if seen.contains(&want) {
                    return Ok(());
                }
            }
            Ok(Some(Ok(Message::Close(f)))) => return Err(format!("closed: {f:?}")),
            Ok(Some(Ok(_))) | Err(_) => {}
            Ok(Some(Err(e))) => return Err(format!("read: {e}")),
            Ok(None) => return Err("ended".into()),
        }
    }
    Err(format!("no {want} within {NEXT_REQUEST:?}; saw {seen:?}"))
}

/// Polls the preview every 100 ms until stopped; every request must finish (no hang).
struct Poller {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<(u16, Duration)>>,
}

impl Poller {
    fn start(c: &reqwest::Client, url: String) -> Poller {
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (c.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut seen = vec![];
            while !s.load(Ordering::Relaxed) && seen.len() < 2000 {
                let t = Instant::now();
                let r = tokio::time::timeout(Duration::from_secs(20), c.get(&url).send()).await;
                let status = match r {
                    Ok(Ok(r)) => r.status().as_u16(),
                    Ok(Err(_)) => 0,
                    Err(_) => panic!("a preview request hung for 20 s"),
                };
                seen.push((status, t.elapsed()));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            seen
        });
        Poller { stop, task }
    }

    async fn finish(self) -> Vec<(u16, Duration)> {
        self.stop.store(true, Ordering::Relaxed);
        let seen = self.task.await.expect("poller");
        assert!(!seen.is_empty());
        // In flight while a container dies, a request may be lost (502/503); it never hangs,
        // and the poller ends on a success.
        assert!(
            seen.iter().all(|(s, _)| [200, 502, 503].contains(s)),
            "{seen:?}"
        );
        assert_eq!(seen.last().unwrap().0, 200, "{seen:?}");
        seen
    }
}

/// Times recorded for the report.
static TIMES: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn record(what: &str, event: Duration, next: Duration) {
    let line =
        format!("{what}: external event recorded after {event:?}, next request took {next:?}");
    eprintln!("{line}");
    TIMES.lock().unwrap().push(line);
}

/// One outside change while the preview is polled and a terminal is open. Returns the new
/// event; asserts the next preview request succeeds in time and a new terminal works.
#[allow(clippy::too_many_arguments)]
async fn outside_change(
    app: &TestApp,
    c: &reqwest::Client,
    user: &str,
    what: &str,
    change: impl FnOnce(&str),
    kind: &str,
    has: &str,
) -> Value {
    let url = preview_url(app, user, "/");
    let (s, body) = get_preview(c, &url).await;
    assert_eq!(
        (s, body.as_str()),
        (200, format!("hello from {user}").as_str())
    );
    let id = container_id(app, user).await;
    let before = events(app, user).await.len();
    let mut term = open_terminal(app, user).await;
    terminal_echo(&mut term, "before").await.unwrap();
    let poller = Poller::start(c, url.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;

    change(&id);
    let (ev, event_after) = wait_external(app, user, before, kind, has).await;
    let t = Instant::now();
    let (s, body) = tokio::time::timeout(NEXT_REQUEST, get_preview(c, &url))
        .await
        .unwrap_or_else(|_| panic!("{what}: the next preview request hung"));
    let next = t.elapsed();
    assert_eq!(s, 200, "{what}: {body}");
    assert_eq!(body, format!("hello from {user}"), "{what}");
    assert!(next < NEXT_REQUEST, "{what}: {next:?}");
    record(what, event_after, next);

    let polled = poller.finish().await;
    eprintln!(
        "{what}: poller made {} requests, {} not 200, slowest {:?}",
        polled.len(),
        polled.iter().filter(|(s, _)| *s != 200).count(),
        polled.iter().map(|(_, d)| *d).max().unwrap()
    );
    // A new terminal works; the one open during a pause carries on once resumed.
    let mut fresh = open_terminal(app, user).await;
    terminal_echo(&mut fresh, "after").await.unwrap();
    if kind == "paused" {
        terminal_echo(&mut term, "resumed").await.unwrap();
    }
    // Close both and let sandboxd's clean-up exec for each finish before the next change: this
    // engine (20.10, cgroup v1) wedges the container for good when `docker pause` freezes it
    // while an exec is starting in it.
    let _ = term.close(None).await;
    let _ = fresh.close(None).await;
    drop((term, fresh));
    tokio::time::sleep(Duration::from_secs(2)).await;
    ev
}

/// Unpauses the instance's containers before the app's own clean-up removes them: this engine
/// (20.10, cgroup v1) can hang forever on `docker rm -f` of a frozen container.
struct Thaw(String);

impl Drop for Thaw {
    fn drop(&mut self) {
        for id in containers_of(&self.0) {
            let _ = Command::new("docker").args(["unpause", &id]).output();
        }
    }
}

#[tokio::test]
async fn outside_pause_and_stop_wake_on_the_next_request_and_own_transitions_stay_internal() {
    let app = spawn(None).await;
    let _thaw = Thaw(app.instance.clone());
    let user = "p";
    app.init(user).await;
    start_app(&app, user, APP).await;
    let c = client_for(&app, user);

    let ev = outside_change(
        &app,
        &c,
        user,
        "docker pause",
        |id| docker(&["pause", id]),
        "paused",
        "pause",
    )
    .await;
    assert_eq!(ev["reason"], "external: pause");

    // Backstop: a slow answer (over upstream_head_timeout) from a running app is waited for;
    // a request in flight when the container is paused behind our back, with no other
    // request to wake it, is answered once the late head makes sandboxd re-check and resume.
    let slow = preview_url(&app, user, "/slow");
    assert_eq!(get_preview(&c, &slow).await, (200, "slow done".to_owned()));
    let id = container_id(&app, user).await;
    let in_flight = tokio::spawn({
        let (c, slow) = (c.clone(), slow.clone());
        async move {
            let t = Instant::now();
            (get_preview(&c, &slow).await, t.elapsed())
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    docker(&["pause", &id]);
    let (answer, took) = tokio::time::timeout(NEXT_REQUEST, in_flight)
        .await
        .expect("the request in flight during an outside pause never hangs")
        .unwrap();
    assert_eq!(answer, (200, "slow done".to_owned()));
    eprintln!("request in flight during an outside pause answered after {took:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The API sees it too, and execute wakes it.
    let id = container_id(&app, user).await;
    let before = events(&app, user).await.len();
    docker(&["pause", &id]);
    wait_external(&app, user, before, "paused", "pause").await;
    let st: Value = app.get(user, "/sandbox/status").await.json().await.unwrap();
    assert_eq!(st["state"], "paused");
    let t = Instant::now();
    let r = app.execute(user, json!({"code": "console.log(6*7)"})).await;
    assert_eq!(r["output"], "42\n", "{r}");
    eprintln!("execute after an outside pause: {:?}", t.elapsed());

    let ev = outside_change(
        &app,
        &c,
        user,
        "docker stop",
        |id| docker(&["stop", "-t", "1", id]),
        "stopped",
        "",
    )
    .await;
    eprintln!("docker stop recorded as {ev}");

    // init after an outside stop starts it again.
    let id = container_id(&app, user).await;
    let before = events(&app, user).await.len();
    docker(&["stop", "-t", "1", &id]);
    wait_external(&app, user, before, "stopped", "").await;
    let t = Instant::now();
    let init = app.init(user).await;
    assert_eq!(init["state"], "running");
    eprintln!("init after an outside stop: {:?}", t.elapsed());

    // sandboxd's own pause and stop: recorded with their own reasons, never as external.
    let u = UserId::parse(user).unwrap();
    let before = events(&app, user).await.len();
    let url = preview_url(&app, user, "/");
    // The app is up (the wakes below measure the sandbox, not the app's start).
    assert_eq!(get_preview(&c, &url).await.0, 200);
    app.mgr().pause(&u, "test pause").await.unwrap();
    let t = Instant::now();
    assert_eq!(get_preview(&c, &url).await.0, 200);
    eprintln!("wake after sandboxd's own pause: {:?}", t.elapsed());
    app.mgr().stop(&u, "test stop").await.unwrap();
    let t = Instant::now();
    assert_eq!(get_preview(&c, &url).await.0, 200);
    eprintln!("wake after sandboxd's own stop: {:?}", t.elapsed());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let list = events(&app, user).await;
    let fresh = &list[..list.len() - before];
    assert!(
        fresh.iter().any(|e| e["reason"] == "test pause")
            && fresh.iter().any(|e| e["reason"] == "test stop"),
        "{fresh:?}"
    );
    assert!(
        !fresh
            .iter()
            .any(|e| e["reason"].as_str().unwrap_or("").starts_with("external:")),
        "own transitions recorded as external: {fresh:?}"
    );

    // sandboxd's own stop takes the container off its network (its next start overlaps the
    // network setup with the boot). Started outside sandboxd, it runs with loopback only: it
    // is not sent to by an old address, and the next request attaches it and is answered.
    app.mgr().stop(&u, "test stop").await.unwrap();
    let id = container_id(&app, user).await;
    let before = events(&app, user).await.len();
    docker(&["start", &id]);
    wait_external(&app, user, before, "started", "start").await;
    let t = Instant::now();
    assert_eq!(
        get_preview(&c, &url).await,
        (200, format!("hello from {user}"))
    );
    eprintln!(
        "preview after an outside start of a detached sandbox: {:?}",
        t.elapsed()
    );
    let st: Value = app.get(user, "/sandbox/status").await.json().await.unwrap();
    assert_eq!(st["state"], "running", "{st}");

    framing_is_refused_on_both_hosts(&app, user).await;
}

#[tokio::test]
async fn outside_kill_and_removal_start_or_recreate_on_the_next_request() {
    let app = spawn(None).await;
    let _thaw = Thaw(app.instance.clone());
    let user = "k";
    app.init(user).await;
    start_app(&app, user, APP).await;
    let c = client_for(&app, user);

    let ev = outside_change(
        &app,
        &c,
        user,
        "docker kill",
        |id| docker(&["kill", id]),
        "stopped",
        "",
    )
    .await;
    assert_eq!(ev["reason"], "external: die (exit 137)");

    // Removed: created again, on the same workspace (the app comes back by itself).
    let old = container_id(&app, user).await;
    let ev = outside_change(
        &app,
        &c,
        user,
        "docker rm -f",
        |id| docker(&["rm", "-f", id]),
        "removed",
        "",
    )
    .await;
    assert_eq!(ev["containerId"], old.as_str());
    let now = container_id(&app, user).await;
    assert_ne!(now, old);
    assert_eq!(app.containers(), vec![now.clone()]);

    // execute after an outside kill starts the sandbox again.
    let before = events(&app, user).await.len();
    docker(&["kill", &now]);
    wait_external(&app, user, before, "stopped", "").await;
    let t = Instant::now();
    let r = app
        .execute(user, json!({"code": "console.log('back')"}))
        .await;
    assert_eq!(r["output"], "back\n", "{r}");
    eprintln!("execute after an outside kill: {:?}", t.elapsed());
}

#[tokio::test]
async fn oom_kill_of_pid_1_starts_again_on_the_next_request() {
    // A small memory limit; the kernel's OOM killer is made to pick PID 1 (the container's
    // init) by raising its oom_score_adj, then a process allocates past the limit.
    let app = spawn(Some(192)).await;
    let _thaw = Thaw(app.instance.clone());
    let user = "o";
    app.init(user).await;
    start_app(&app, user, APP).await;
    let c = client_for(&app, user);
    let ev = outside_change(
        &app,
        &c,
        user,
        "OOM kill of PID 1",
        |id| {
            // Exits non-zero when the container dies under it: the exit status is not the point.
            let _ = Command::new("docker")
                .args([
                    "exec",
                    id,
                    "sh",
                    "-c",
                    "echo 1000 > /proc/1/oom_score_adj && \
                     node -e 'const a=[]; for(;;) a.push(Buffer.alloc(8<<20, 1))'",
                ])
                .output()
                .unwrap();
        },
        "stopped",
        "oom",
    )
    .await;
    eprintln!("OOM recorded as {ev}");
    let id = container_id(&app, user).await;
    assert_eq!(docker_inspect(&id)["State"]["Running"], true);
}

/// Raw HTTP/1.1 bytes to the server; returns everything it answered until it closed.
async fn raw(app: &TestApp, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(app.addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = vec![];
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    assert!(
        read.is_ok(),
        "the server kept the connection open: {:?}",
        String::from_utf8_lossy(&out)
    );
    String::from_utf8_lossy(&out).into_owned()
}

async fn framing_is_refused_on_both_hosts(app: &TestApp, user: &str) {
    let main = format!("127.0.0.1:{}", app.addr.port());
    let preview = format!("{}:{}", preview_host(user), app.addr.port());
    let token = app.token(user);
    // Main host: CL + TE on an API call, which must not run.
    let req = format!(
        "POST /sandbox/execute HTTP/1.1\r\nHost: {main}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: 30\r\nTransfer-Encoding: chunked\r\n\r\n\
         1e\r\n{{\"code\":\"console.log(1)\"}}  \r\n0\r\n\r\n"
    );
    let resp = raw(app, req.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(resp.contains("\"bad_framing\""), "{resp}");
    assert_eq!(resp.matches("HTTP/1.1 ").count(), 1, "{resp}");

    // Preview host, keep-alive: a good request, then TE + CL carrying a smuggled request in
    // its "body", then a conflicting pair of lengths on a new connection.
    let smuggled = format!("GET /smuggled HTTP/1.1\r\nHost: {preview}\r\n\r\n");
    let req = format!(
        "GET /first HTTP/1.1\r\nHost: {preview}\r\n\r\n\
         POST /second HTTP/1.1\r\nHost: {preview}\r\nTransfer-Encoding: chunked\r\nContent-Length: {}\r\n\r\n\
         0\r\n\r\n{smuggled}",
        5 + smuggled.len()
    );
    let resp = raw(app, req.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains(&format!("hello from {user}")), "{resp}");
    assert_eq!(resp.matches("HTTP/1.1 ").count(), 2, "{resp}");
    assert!(resp.contains("HTTP/1.1 400"), "{resp}");
    assert!(resp.contains("\"bad_framing\""), "{resp}");

    let req = format!(
        "POST /third HTTP/1.1\r\nHost: {preview}\r\nContent-Length: 5\r\nContent-Length: 45\r\n\r\nhello"
    );
    let resp = raw(app, req.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(resp.contains("\"bad_framing\""), "{resp}");

    // The app saw the good request only.
    let c = client_for(app, user);
    let (s, seen) = get_preview(&c, &preview_url(app, user, "/seen")).await;
    assert_eq!(s, 200);
    assert!(seen.contains("/first"), "{seen}");
    for bad in ["/second", "/smuggled", "/third"] {
        assert!(!seen.contains(bad), "{bad} reached the app: {seen}");
    }
}

/// sandboxd's own pause never lands while an exec is being started in the container (on this
/// engine a container frozen while `runc exec` joins it hangs for good: `unpause` and `rm -f`
/// never return). Executions race the manager's pause many times; every call must come back.
#[tokio::test]
async fn own_pauses_racing_exec_starts_never_wedge_the_container() {
    let app = spawn(None).await;
    app.init("61").await;
    let user = UserId::parse("61").unwrap();
    let m = app.mgr().clone();
    for round in 0..12 {
        let runs = {
            let app_base = app.base.clone();
            let token = app.token("61");
            tokio::spawn(async move {
                let c = reqwest::Client::new();
                c.post(format!("{app_base}/sandbox/execute"))
                    .bearer_auth(token)
                    .json(&json!({"code": "console.log(1)"}))
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            })
        };
        tokio::time::sleep(Duration::from_millis(round * 7 % 40)).await;
        let paused = tokio::time::timeout(Duration::from_secs(20), m.pause(&user, "race"))
            .await
            .unwrap_or_else(|_| panic!("round {round}: pause hung"));
        paused.unwrap_or_else(|e| panic!("round {round}: pause failed: {e:#}"));
        // Wake it at once (a run frozen by the pause then goes on), then the run must finish.
        let sb = tokio::time::timeout(Duration::from_secs(20), m.ensure_running(&user))
            .await
            .unwrap_or_else(|_| panic!("round {round}: wake hung"))
            .unwrap();
        assert_eq!(sb.state.as_str(), "running");
        let status = tokio::time::timeout(Duration::from_secs(20), runs)
            .await
            .unwrap_or_else(|_| panic!("round {round}: execute hung"))
            .unwrap()
            .unwrap();
        assert_eq!(status, 200, "round {round}");
    }
}
