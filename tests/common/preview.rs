//! Preview clients (the preview host names do not exist in DNS: the client resolves them to the
//! server) and the small apps the preview tests serve.

use std::path::Path;

use super::TestApp;

/// The preview domain of the tests that give one (a name no resolver knows).
pub const PREVIEW_DOMAIN: &str = "preview.example.test";

pub fn preview_host(user: &str) -> String {
    format!("user-{user}.{PREVIEW_DOMAIN}")
}

/// The plain-HTTP preview URL of `user` on the server's HTTP listener.
pub fn preview_url(app: &TestApp, user: &str, path: &str) -> String {
    format!("http://{}:{}{path}", preview_host(user), app.addr.port())
}

/// A client builder that resolves the preview hosts of `users` to the server's HTTP listener
/// (and its HTTPS one, when it has one), trusting the development CA when given; each test
/// adds its own timeout and redirect policy.
pub fn preview_client_builder(
    app: &TestApp,
    users: &[&str],
    ca: Option<&Path>,
) -> reqwest::ClientBuilder {
    let mut b = reqwest::Client::builder();
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
    b
}

/// JavaScript for execute that writes an app (`server_js`, listening on 5173) with a `dev`
/// script and starts it through the image's dev-server autostart, the path every container
/// start takes, so every start brings it back.
pub fn app_code(server_js: &str) -> String {
    format!(
        r#"
        const fs = require('fs');
        fs.writeFileSync('/workspace/package.json', JSON.stringify({{name: 'p', scripts: {{dev: 'node server.js'}}}}));
        fs.writeFileSync('/workspace/server.js', `{server_js}`);
        console.log(require('child_process').execFileSync('sandboxd-init', ['--restart-dev']).toString());
    "#
    )
}

/// Starts the app `server_js` in the sandbox of `user` (see `app_code`).
pub async fn start_app(app: &TestApp, user: &str, server_js: &str) {
    let r = app
        .execute(user, serde_json::json!({"code": app_code(server_js)}))
        .await;
    assert_eq!(r["exitCode"], 0, "{r}");
}
