//! Helpers shared by the security tests: running JavaScript that answers in JSON, a small
//! terminal client, preview clients for a fake domain.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Error as WsError;

use crate::common::preview::preview_client_builder;
use crate::common::ws::Ws;
use crate::common::TestApp;

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

pub fn uid(user: &str) -> sandboxd::user::UserId {
    sandboxd::user::UserId::parse(user).unwrap()
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

/// A client for the preview hosts of `users` (see `preview_client_builder`), without redirects.
pub fn preview_client(
    app: &TestApp,
    users: &[&str],
    ca: Option<&std::path::Path>,
) -> reqwest::Client {
    preview_client_builder(app, users, ca)
        .timeout(Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// The app the security tests serve on 5173 (`common::preview::start_app` starts it): it answers
/// with the user id and the cookies it got, and counts requests in /workspace/hits.log.
pub const APP: &str = r#"
            require('http').createServer((q, s) => {
              require('fs').appendFileSync('/workspace/hits.log', q.method + ' ' + q.url + ' ' + q.headers.host + '\\n');
              s.setHeader('content-type', 'text/plain');
              s.end('app of ' + process.env.SANDBOXD_USER + ' cookie=' + (q.headers.cookie || ''));
            }).listen(5173, '0.0.0.0');
        "#;

/// How long a security test's terminal waits for each expected output.
pub const TERM_STEP: Duration = Duration::from_secs(30);

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
