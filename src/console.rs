//! The web console: a few static files built from `console/` by `scripts/ensure-console.sh`
//! into `console_dir` (default `console/dist`) and served from there on the main host:
//! `GET /` is `index.html`, `GET /console/<file>` the rest.
//!
//! - Only the names in [`FILES`] are ever served: a request names an entry of that list or gets
//!   404, so no path (`..`, `%2F`, absolute, symlink tricks in the URL) reaches the file system.
//! - Every answer carries a strict `Content-Security-Policy` ([`csp`]): scripts only from the
//!   console's own origin (no inline script, no eval), connections only to the own origin and
//!   its WebSocket, frames only from the preview domain, nothing may frame the console.
//!   `style-src` allows inline styles (styles only): xterm.js's renderer writes `<style>`
//!   elements for its cell metrics and theme, and the CodeMirror editor (`editor.js`, bundled by
//!   esbuild) injects its theme as constructed style sheets or `<style>` elements and sets
//!   element styles. Neither can take a per-response nonce from a static page, and styles cannot
//!   run code; scripts stay strict (`'self'` only, no inline, no eval).
//! - `Cache-Control: no-cache` with an `ETag` (length and modification time): browsers
//!   revalidate and get 304, so a rebuilt console is picked up without a restart.
//! - Files are read per request (they are small and in the page cache); a missing build
//!   answers 503 `console_not_built` naming the script that builds it.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use hyper::body::Incoming;
use hyper::header::{
    HeaderMap, HeaderValue, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_SECURITY_POLICY, CONTENT_TYPE,
    ETAG, IF_NONE_MATCH, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use hyper::{Method, Request, Response, StatusCode};

use crate::config::Config;
use crate::edge::router::request_host;
use crate::http::error::ApiError;
use crate::http::{empty, full, Body};

/// The console's files: name in the built folder (and in the URL) and content type.
pub const FILES: &[(&str, &str)] = &[
    ("index.html", "text/html; charset=utf-8"),
    ("app.js", "text/javascript; charset=utf-8"),
    ("files.js", "text/javascript; charset=utf-8"),
    ("editor.js", "text/javascript; charset=utf-8"),
    ("app.css", "text/css; charset=utf-8"),
    ("xterm.mjs", "text/javascript; charset=utf-8"),
    ("addon-fit.mjs", "text/javascript; charset=utf-8"),
    ("xterm.css", "text/css; charset=utf-8"),
    ("favicon.svg", "image/svg+xml"),
];

/// The allow-list entry a request names: `/` (index), `/console/<name>`, or a bare `<name>`
/// (the route's parameter). Anything else, including every encoded or dotted variant, is None.
pub fn resolve(arg: &str) -> Option<(&'static str, &'static str)> {
    let name = match arg {
        "/" | "" => "index.html",
        a => a.strip_prefix("/console/").unwrap_or(a),
    };
    FILES.iter().copied().find(|(n, _)| *n == name)
}

/// The Content-Security-Policy of the console. `host` is the request's Host (already routed to
/// the main host); it is used for the WebSocket source only when it is a plain `name[:port]`.
pub fn csp(cfg: &Config, host: Option<&str>) -> String {
    let mut connect = "'self'".to_owned();
    if let Some(h) = host.filter(|h| plain_host(h)) {
        let h = h.to_ascii_lowercase();
        connect.push_str(&format!(" ws://{h} wss://{h}"));
    }
    let pd = &cfg.preview_domain;
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
         img-src 'self'; font-src 'self'; connect-src {connect}; \
         frame-src http://*.{pd}:* https://*.{pd}:*; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
}

/// `name[:port]` or `[v6]:port` made only of characters that cannot end a CSP source.
fn plain_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 260
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
}

/// The console feature: it reads only the configuration (`console_dir`, the preview domain).
pub struct Console {
    cfg: Arc<Config>,
}

impl Console {
    pub fn new(cfg: Arc<Config>) -> Console {
        Console { cfg }
    }

    pub fn handle(&self, req: &Request<Incoming>, file: Option<&str>) -> Response<Body> {
        serve(&self.cfg, req, file)
    }
}

fn serve(cfg: &Config, req: &Request<Incoming>, file: Option<&str>) -> Response<Body> {
    let Some((name, content_type)) = resolve(file.unwrap_or("/")) else {
        return ApiError::not_found().into_response();
    };
    let path = cfg.console_dir.join(name);
    let read = std::fs::metadata(&path).and_then(|m| Ok((m.clone(), std::fs::read(&path)?)));
    let (meta, bytes) = match read {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "console_not_built",
                format!(
                    "the web console is not built ({} is missing): run scripts/ensure-console.sh",
                    path.display()
                ),
            )
            .into_response();
        }
        Err(e) => {
            return ApiError::internal(
                &anyhow::Error::new(e).context(format!("reading {}", path.display())),
            )
            .into_response()
        }
    };
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let etag = format!("\"{:x}-{:x}\"", bytes.len(), mtime);
    let not_modified = req
        .headers()
        .get_all(IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim() == etag || t.trim() == "*");

    let mut resp = if not_modified {
        let mut r = Response::new(empty());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        let len = bytes.len();
        let mut r = Response::new(if req.method() == Method::HEAD {
            empty()
        } else {
            full(bytes)
        });
        r.headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from(len));
        r
    };
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(ETAG, v);
    }
    security_headers(h, &csp(cfg, request_host(req)));
    resp
}

fn security_headers(h: &mut HeaderMap, csp: &str) {
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(csp) {
        h.insert(CONTENT_SECURITY_POLICY, v);
    }
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        "cross-origin-resource-policy",
        HeaderValue::from_static("same-origin"),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listed_names_resolve() {
        assert_eq!(resolve("/").unwrap().0, "index.html");
        assert_eq!(
            resolve("/console/app.js").unwrap().1,
            "text/javascript; charset=utf-8"
        );
        assert_eq!(resolve("xterm.css").unwrap().1, "text/css; charset=utf-8");
        assert_eq!(resolve("/console/index.html").unwrap().0, "index.html");
        for bad in [
            "/console/",
            "/console/../Cargo.toml",
            "/console/..%2F..%2Fetc%2Fpasswd",
            "/console/%2e%2e/config",
            "/console/app.js/",
            "/console/app.js%00",
            "/console//etc/passwd",
            "/console/APP.JS",
            "/etc/passwd",
            "../app.js",
            "./app.js",
            "/console/xterm.js.map",
            "/index.html",
            "/console/app.js?x",
        ] {
            assert!(resolve(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn policy_is_strict_and_names_the_preview_domain() {
        let cfg = Config::from_table(toml::Table::new()).unwrap();
        let p = csp(&cfg, Some("localhost:8080"));
        assert!(p.contains("script-src 'self';"), "{p}");
        assert!(!p.contains("unsafe-eval"), "{p}");
        assert!(
            p.contains("connect-src 'self' ws://localhost:8080 wss://localhost:8080;"),
            "{p}"
        );
        assert!(
            p.contains("frame-src http://*.preview.localhost:* https://*.preview.localhost:*;"),
            "{p}"
        );
        assert!(p.contains("frame-ancestors 'none'"), "{p}");
        // A Host that could smuggle a directive is left out.
        let p = csp(&cfg, Some("localhost; script-src *"));
        assert!(p.contains("connect-src 'self';"), "{p}");
        assert!(!p.contains("script-src *"), "{p}");
    }
}
