//! The web console: how its files are served (types, caching, CSP, the allow-list), and the whole
//! flow (terminal, file tree and editor, projects, preview, run code) in Debian's Chromium
//! driven by playwright-core (`tests/e2e/console.mjs`) against a real sandboxd with the
//! default preview domain `preview.localhost`, which Chromium resolves to
//! loopback by itself. Screenshots land in `tests/artifacts/console/`.
//!
//! Needs `scripts/ensure-console.sh` (the built console) and, for the browser,
//! `scripts/ensure-browser.sh`; without them the tests fail and say so (they never skip).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::*;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn console_dist() -> PathBuf {
    let dist = root().join("console/dist");
    assert!(
        dist.join("index.html").is_file()
            && dist.join("xterm.mjs").is_file()
            && dist.join("editor.js").is_file(),
        "the web console is not built ({} is missing files): run scripts/ensure-console.sh",
        dist.display()
    );
    dist
}

async fn spawn_console_app() -> TestApp {
    let dist = console_dist();
    spawn_app_with(|t| {
        t.insert("console_dir".into(), dist.display().to_string().into());
    })
    .await
}

#[tokio::test]
async fn console_files_are_served_with_types_caching_and_a_strict_csp() {
    let app = spawn_console_app().await;
    let c = reqwest::Client::new();
    for (path, ty) in [
        ("/", "text/html; charset=utf-8"),
        ("/console/index.html", "text/html; charset=utf-8"),
        ("/console/app.js", "text/javascript; charset=utf-8"),
        ("/console/files.js", "text/javascript; charset=utf-8"),
        ("/console/editor.js", "text/javascript; charset=utf-8"),
        ("/console/xterm.mjs", "text/javascript; charset=utf-8"),
        ("/console/addon-fit.mjs", "text/javascript; charset=utf-8"),
        ("/console/app.css", "text/css; charset=utf-8"),
        ("/console/xterm.css", "text/css; charset=utf-8"),
        ("/console/favicon.svg", "image/svg+xml"),
    ] {
        let r = c.get(format!("{}{path}", app.base)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let h = r.headers().clone();
        assert_eq!(h["content-type"], ty, "{path}");
        assert_eq!(h["cache-control"], "no-cache", "{path}");
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        let csp = h["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("default-src 'none'"), "{csp}");
        assert!(csp.contains("script-src 'self';"), "{csp}");
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        assert!(
            csp.contains("frame-src http://*.preview.localhost:* https://*.preview.localhost:*"),
            "{csp}"
        );
        assert!(
            csp.contains(&format!("ws://{}", app.addr)),
            "the WebSocket source is the own host: {csp}"
        );
        let etag = h["etag"].to_str().unwrap().to_owned();
        let body = r.bytes().await.unwrap();
        assert_eq!(h["content-length"], body.len().to_string().as_str());
        // Revalidation: 304 with the same ETag, no body.
        let r = c
            .get(format!("{}{path}", app.base))
            .header("if-none-match", &etag)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 304, "{path}");
        assert!(r.bytes().await.unwrap().is_empty());
    }
    // The page loads no inline script: every <script> has a src on this origin.
    let html = c
        .get(format!("{}/", app.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for tag in html.split("<script").skip(1) {
        let tag = &tag[..tag.find('>').unwrap()];
        assert!(tag.contains("src=\"/console/"), "inline script: {tag}");
    }
    // No inline event handler attributes (onclick=…), which the CSP would block anyway.
    let lower = html.to_ascii_lowercase();
    for (i, _) in lower.match_indices(" on") {
        let attr: String = lower[i + 1..]
            .chars()
            .take_while(|c| c.is_ascii_alphabetic())
            .collect();
        let next = lower[i + 1 + attr.len()..].chars().next();
        assert!(
            next != Some('=') || attr.len() < 3,
            "inline event handler attribute {attr} in index.html"
        );
    }
    // HEAD: headers and no body.
    let r = c.head(format!("{}/", app.base)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("content-security-policy"));
    // Only GET and HEAD.
    let r = c.post(format!("{}/", app.base)).send().await.unwrap();
    assert_eq!(r.status(), 405);
}

#[tokio::test]
async fn console_paths_outside_the_allow_list_are_404() {
    let app = spawn_console_app().await;
    // A file that exists next to the console but is not on the list.
    std::fs::write(console_dist().join("secret.txt"), "no").ok();
    let mut stream_paths = vec![];
    for path in [
        "/console/secret.txt",
        "/console/..%2F..%2FCargo.toml",
        "/console/%2e%2e%2fCargo.toml",
        "/console/..%5c..%5cCargo.toml",
        "/console/.build-stamp",
        "/console/xterm.mjs.map",
        "/console/APP.JS",
        "/console/app.js%00.css",
        "/console/",
        "/console",
        "/index.html",
        "/console/app.js/x",
    ] {
        let r = app
            .client
            .get(format!("{}{path}", app.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{path}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "not_found", "{path}");
        openapi::check_error(&body);
        stream_paths.push(path);
    }
    // Raw dot segments, which HTTP clients normalise away: sent by hand on a socket.
    for raw in ["/console/../Cargo.toml", "/console/../../etc/passwd"] {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        s.write_all(
            format!("GET {raw} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 404"), "{raw}: {out}");
        assert!(
            !out.contains("[package]") && !out.contains("root:"),
            "{raw}"
        );
    }
    let _ = std::fs::remove_file(console_dist().join("secret.txt"));
}

#[tokio::test]
async fn a_missing_console_build_is_named() {
    let missing = tempfile::tempdir().unwrap();
    let dir = missing.path().join("dist");
    let app = spawn_app_with(|t| {
        t.insert("console_dir".into(), dir.display().to_string().into());
    })
    .await;
    let r = app
        .client
        .get(format!("{}/", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "console_not_built");
    openapi::check("GET", "/", 503, &body);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("scripts/ensure-console.sh"),
        "{body}"
    );
}

fn require_browser() {
    let chromium = Path::new("/usr/bin/chromium");
    let playwright = root().join("tests/e2e/node_modules/playwright-core/package.json");
    let state = |p: &Path| if p.exists() { "ok" } else { "missing" };
    assert!(
        chromium.exists() && playwright.exists(),
        "the browser test needs Debian's Chromium ({}: {}) and playwright-core ({}: {}): \
         run scripts/ensure-browser.sh",
        chromium.display(),
        state(chromium),
        playwright.display(),
        state(&playwright),
    );
}

/// Runs `tests/e2e/console.mjs` against `base` and asserts that it passed and left a
/// screenshot of each of `steps` in `tests/artifacts/<artifacts>`.
async fn run_browser(
    app: &TestApp,
    base: &str,
    artifacts: &str,
    env: &[(&str, &str)],
    steps: &[&str],
) {
    let artifacts = root().join("tests/artifacts").join(artifacts);
    let _ = std::fs::remove_dir_all(&artifacts);
    let started = Instant::now();
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(root().join("tests/e2e/console.mjs"))
        .env("SANDBOXD_E2E_BASE", base)
        .env("SANDBOXD_E2E_TOKEN", app.token("1"))
        .env("SANDBOXD_E2E_ARTIFACTS", &artifacts)
        .env("SANDBOXD_E2E_DEADLINE_S", "480")
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .expect("node is required for the browser test: run scripts/ensure-browser.sh");
    let status = tokio::time::timeout(Duration::from_secs(540), child.wait())
        .await
        .expect("the browser test ran longer than 9 minutes")
        .unwrap();
    eprintln!(
        "browser test {base}: {status} in {:.1} s; screenshots in {}",
        started.elapsed().as_secs_f64(),
        artifacts.display()
    );
    assert!(
        status.success(),
        "tests/e2e/console.mjs failed ({status}); see its output above and the screenshots in {}",
        artifacts.display()
    );
    for step in steps {
        let found = std::fs::read_dir(&artifacts)
            .unwrap()
            .filter_map(Result::ok)
            .any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .ends_with(&format!("-{step}.png"))
            });
        assert!(
            found,
            "screenshot of step {step} in {}",
            artifacts.display()
        );
    }
}

/// The whole flow in a real browser over plain HTTP (about 40 s, most of it `npm create vite`
/// and `npm install` inside the sandbox): terminal, the file tree following the terminal, a
/// React + Vite project whose `src/App.jsx` is edited and saved in the editor until the preview
/// frame shows the new text (HMR), run code in JavaScript and Python.
#[tokio::test]
async fn console_end_to_end_in_chromium() {
    // Alone: every server start creates a Docker network, and Chromium aborts requests in
    // flight (ERR_NETWORK_CHANGED) when an interface appears.
    let alone = gate::alone().await;
    require_browser();
    let dist = console_dist();
    let app = spawn_app_alone(&alone, |t| {
        t.insert("console_dir".into(), dist.display().to_string().into());
    })
    .await;
    run_browser(
        &app,
        &app.base,
        "console",
        &[],
        &[
            "signin",
            "started",
            "terminal",
            "project-progress",
            "preview",
            "editor",
            "run-code",
            "run-python",
        ],
    )
    .await;
}

/// The same console over HTTPS (development certificate): wss terminal and file watch, API,
/// the React + Vite project edited in the editor with its hot update over the preview's wss
/// tunnel, run code.
#[tokio::test]
async fn console_over_https_in_chromium() {
    // Alone: every server start creates a Docker network, and Chromium aborts requests in
    // flight (ERR_NETWORK_CHANGED) when an interface appears.
    let alone = gate::alone().await;
    require_browser();
    let dist = console_dist();
    let app = spawn_app_alone(&alone, |t| {
        t.insert("console_dir".into(), dist.display().to_string().into());
        t.insert("https_addr".into(), "127.0.0.1:0".into());
    })
    .await;
    let base = format!("https://localhost:{}", app.https_addr.unwrap().port());
    run_browser(
        &app,
        &base,
        "console-https",
        &[("SANDBOXD_E2E_IGNORE_TLS", "1")],
        &[
            "signin",
            "started",
            "terminal",
            "preview",
            "editor",
            "run-code",
            "run-python",
        ],
    )
    .await;
}

/// The preview URL follows the listener a request came in on, with the HTTPS listener on as
/// `scripts/up` runs it: over HTTP an `http://…:<http port>/` URL (which a browser on the HTTP
/// console can open), over HTTPS an `https://…:<https port>/` one; the same for preview links.
#[tokio::test]
async fn preview_urls_follow_the_listener_of_the_request() {
    let app = spawn_app_with(|t| {
        t.insert("https_addr".into(), "127.0.0.1:0".into());
    })
    .await;
    let (http, https) = (app.addr.port(), app.https_addr.unwrap().port());
    let pem = std::fs::read(app.certs.join("dev-ca.crt")).unwrap();
    let tls = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .resolve("localhost", app.https_addr.unwrap())
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let over_https = |method: reqwest::Method, path: &str| {
        tls.request(method, format!("https://localhost:{https}{path}"))
            .bearer_auth(app.token("7"))
            .json(&serde_json::json!({}))
    };
    let http_url = format!("http://user-7.preview.localhost:{http}/");
    let https_url = format!("https://user-7.preview.localhost:{https}/");

    let a = app.init("7").await;
    assert_eq!(a["previewUrl"], http_url.as_str());
    assert_eq!(a["previewAccess"], "public");
    let s: serde_json::Value = app.get("7", "/sandbox/status").await.json().await.unwrap();
    assert_eq!(s["previewUrl"], http_url.as_str());

    let r = over_https(reqwest::Method::POST, "/sandbox/init")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let a: serde_json::Value = r.json().await.unwrap();
    assert_eq!(a["previewUrl"], https_url.as_str());
    let r = over_https(reqwest::Method::GET, "/sandbox/status")
        .send()
        .await
        .unwrap();
    let s: serde_json::Value = r.json().await.unwrap();
    assert_eq!(s["previewUrl"], https_url.as_str());

    // Preview links the same way.
    let l: serde_json::Value = app
        .post("7", "/sandbox/preview-link", serde_json::json!({}))
        .await
        .json()
        .await
        .unwrap();
    assert!(
        l["url"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{http_url}?sandboxd_token=")),
        "{l}"
    );
    let r = over_https(reqwest::Method::POST, "/sandbox/preview-link")
        .send()
        .await
        .unwrap();
    let l: serde_json::Value = r.json().await.unwrap();
    assert!(
        l["url"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{https_url}?sandboxd_token=")),
        "{l}"
    );
}

/// A configured public base wins over the listener (deployments behind a load balancer).
#[tokio::test]
async fn a_configured_preview_public_url_overrides_the_listener() {
    let app = spawn_app_with(|t| {
        t.insert(
            "preview_public_url".into(),
            "https://preview.localhost".into(),
        );
    })
    .await;
    let a = app.init("8").await;
    assert_eq!(a["previewUrl"], "https://user-8.preview.localhost/");
}

/// `scripts/up`'s default configuration: the console over HTTP with the HTTPS listener on (both
/// addresses set, development certificates). The console shows the HTTP preview URL and the
/// Node project's page appears inside its preview frame (not the browser's certificate error).
#[tokio::test]
async fn console_as_scripts_up_runs_it_shows_the_preview_in_chromium() {
    // Alone: every server start creates a Docker network, and Chromium aborts requests in
    // flight (ERR_NETWORK_CHANGED) when an interface appears.
    let alone = gate::alone().await;
    require_browser();
    let dist = console_dist();
    let app = spawn_app_alone(&alone, |t| {
        t.insert("console_dir".into(), dist.display().to_string().into());
        t.insert("https_addr".into(), "127.0.0.1:0".into());
    })
    .await;
    assert!(app.https_addr.is_some() && app.certs.join("dev-ca.crt").is_file());
    let expect = format!("http://user-1.preview.localhost:{}/", app.addr.port());
    run_browser(
        &app,
        &app.base,
        "console-up",
        &[
            ("SANDBOXD_E2E_PROJECT", "node"),
            ("SANDBOXD_E2E_PREVIEW_URL", &expect),
        ],
        &["signin", "started", "preview", "run-code", "run-python"],
    )
    .await;
}

/// `preview_access = "owner"` in the same set-up: the console asks for a preview link, the frame
/// opens it (the link sets the preview's cookie and redirects to the page without the token)
/// and shows the app.
#[tokio::test]
async fn console_opens_an_owner_only_preview_through_a_link_in_chromium() {
    // Alone: every server start creates a Docker network, and Chromium aborts requests in
    // flight (ERR_NETWORK_CHANGED) when an interface appears.
    let alone = gate::alone().await;
    require_browser();
    let dist = console_dist();
    let app = spawn_app_alone(&alone, |t| {
        t.insert("console_dir".into(), dist.display().to_string().into());
        t.insert("https_addr".into(), "127.0.0.1:0".into());
        t.insert("preview_access".into(), "owner".into());
    })
    .await;
    let expect = format!("http://user-1.preview.localhost:{}/", app.addr.port());
    run_browser(
        &app,
        &app.base,
        "console-owner",
        &[
            ("SANDBOXD_E2E_PROJECT", "node"),
            ("SANDBOXD_E2E_PREVIEW_URL", &expect),
            ("SANDBOXD_E2E_PREVIEW_ACCESS", "owner"),
        ],
        &["signin", "started", "preview"],
    )
    .await;
}
