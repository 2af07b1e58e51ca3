//! Helpers shared by the security tests: running JavaScript that answers in JSON, a small
//! terminal client, preview clients for a fake domain.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::common::TestApp;

pub const PREVIEW_DOMAIN: &str = "preview.example.test";

/// Held by the tests that saturate the CPU (fork bombs) or measure CPU throttling, so that
/// they never run at the same time in this binary.
pub static CPU_HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs `code` through execute; its last stdout line must be JSON, which is returned.
pub async fn js(app: &TestApp, user: &str, code: &str) -> Value {
    let r = app
        .execute(user, json!({"code": code, "timeoutMs": 30000}))
        .await;
    let out = r["output"].as_str().unwrap_or("");
    let last = out.lines().last().unwrap_or("");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("no JSON from the sandbox ({e}): {r}"))
}

pub fn mgr(app: &TestApp) -> &std::sync::Arc<sandboxd::sandbox::Manager> {
    &app.running.as_ref().unwrap().app.mgr
}

pub fn uid(user: &str) -> sandboxd::user::UserId {
    sandboxd::user::UserId::parse(user).unwrap()
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub fn term_url(app: &TestApp, query: &str) -> String {
    format!("ws://{}/sandbox/terminal{query}", app.addr)
}

/// Opens a WebSocket with extra headers.
pub async fn ws_open(
    url: &str,
    headers: &[(&str, &str)],
) -> Result<
    (
        Ws,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    WsError,
> {
    let mut req = url.into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().append(
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    tokio::time::timeout(
        Duration::from_secs(90),
        tokio_tungstenite::connect_async(req),
    )
    .await
    .expect("handshake within 90 s")
}

/// The HTTP status of a refused terminal upgrade, whose answer is checked against
/// docs/openapi.json.
pub fn refused_status(r: Result<(Ws, impl Sized), WsError>) -> u16 {
    match r {
        Err(WsError::Http(resp)) => {
            let status = resp.status().as_u16();
            let ct = resp
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let body = resp.body().as_deref().unwrap_or(&[]);
            crate::common::openapi::check_answer("GET", "/sandbox/terminal", status, ct, body);
            status
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("the upgrade should have been refused"),
    }
}

pub struct Term {
    pub ws: Ws,
    buf: String,
}

const STEP: Duration = Duration::from_secs(30);

impl Term {
    pub fn from_ws(ws: Ws) -> Term {
        Term {
            ws,
            buf: String::new(),
        }
    }

    pub async fn open(app: &TestApp, user: &str) -> Term {
        let auth = format!("Bearer {}", app.token(user));
        let (ws, resp) = ws_open(&term_url(app, ""), &[("authorization", &auth)])
            .await
            .expect("terminal opens");
        assert_eq!(resp.status(), 101);
        Term {
            ws,
            buf: String::new(),
        }
    }

    pub async fn send(&mut self, input: &str) {
        self.ws
            .send(Message::Binary(input.as_bytes().to_vec()))
            .await
            .unwrap();
    }

    async fn until(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + STEP;
        loop {
            if let Some(i) = self.buf.find(needle) {
                let rest = self.buf.split_off(i + needle.len());
                return std::mem::replace(&mut self.buf, rest);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.ws.next()).await {
                Err(_) => panic!("no {needle:?} within {STEP:?}; output: {:?}", self.buf),
                Ok(Some(Ok(Message::Binary(b)))) => self.buf.push_str(&String::from_utf8_lossy(&b)),
                Ok(Some(Ok(Message::Close(c)))) => panic!("closed ({c:?}); output: {:?}", self.buf),
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => panic!("error {e} waiting for {needle:?}"),
                Ok(None) => panic!("stream ended waiting for {needle:?}"),
            }
        }
    }

    /// Runs a shell command; returns its output (stdout and stderr), trimmed, CR removed.
    pub async fn run(&mut self, cmd: &str) -> String {
        self.send(&format!("echo \"<$((6*7))>$({cmd} 2>&1)</$((6*7))>\"\r"))
            .await;
        let out = self.until("</42>").await;
        let start = out.rfind("<42>").expect("start marker") + 4;
        out[start..out.len() - 5]
            .replace('\r', "")
            .trim()
            .to_owned()
    }
}

pub fn preview_host(user: &str) -> String {
    format!("user-{user}.{PREVIEW_DOMAIN}")
}

/// A client resolving the preview hosts of `users` to the server, without redirects.
pub fn preview_client(
    app: &TestApp,
    users: &[&str],
    ca: Option<&std::path::Path>,
) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none());
    for u in users {
        b = b.resolve(&preview_host(u), app.addr);
        if let Some(https) = app.https_addr {
            b = b.resolve(&preview_host(u), https);
        }
    }
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).unwrap();
        b = b.add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap());
    }
    b.build().unwrap()
}

pub fn preview_url(app: &TestApp, user: &str, path: &str) -> String {
    format!("http://{}:{}{path}", preview_host(user), app.addr.port())
}

/// Starts a small app on port 5173 (through the image's dev-server autostart) that answers
/// with the user id and counts requests in /workspace/hits.log.
pub async fn start_app(app: &TestApp, user: &str) {
    let code = r#"
        const fs = require('fs');
        fs.writeFileSync('/workspace/package.json', JSON.stringify({name: 'p', scripts: {dev: 'node server.js'}}));
        fs.writeFileSync('/workspace/server.js', `
            require('http').createServer((q, s) => {
              require('fs').appendFileSync('/workspace/hits.log', q.method + ' ' + q.url + ' ' + q.headers.host + '\\n');
              s.setHeader('content-type', 'text/plain');
              s.end('app of ' + process.env.SANDBOXD_USER + ' cookie=' + (q.headers.cookie || ''));
            }).listen(5173, '0.0.0.0');
        `);
        console.log(require('child_process').execFileSync('sandboxd-init', ['--restart-dev']).toString());
    "#;
    let r = app.execute(user, json!({"code": code})).await;
    assert_eq!(r["exitCode"], 0, "{r}");
}

/// Waits until the preview of `user` answers 200 (the app may still be starting).
pub async fn wait_preview(c: &reqwest::Client, url: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = c.get(url).send().await {
            if r.status() == 200 {
                return r.text().await.unwrap();
            }
        }
        assert!(
            Instant::now() < deadline,
            "preview {url} never answered 200"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The host's cgroup v1 (or v2) file of a container's controller.
pub fn cgroup_file(container: &str, controller: &str, file: &str) -> Option<String> {
    [
        format!("/sys/fs/cgroup/{controller}/docker/{container}/{file}"),
        format!("/sys/fs/cgroup/system.slice/docker-{container}.scope/{file}"),
        format!("/sys/fs/cgroup/docker/{container}/{file}"),
    ]
    .into_iter()
    .find_map(|p| std::fs::read_to_string(p).ok())
}

/// VmRSS of this process (the server runs in it), KiB.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}
