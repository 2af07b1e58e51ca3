//! The opening handshake: Origin, the RFC 6455 upgrade headers, the token's subprotocol and
//! the query (size, `cwd`, token). Pure functions: every refusal happens before the sandbox is
//! touched.

use base64::Engine as _;
use hyper::header::{
    HeaderMap, CONNECTION, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_PROTOCOL, SEC_WEBSOCKET_VERSION,
    UPGRADE,
};
use hyper::{StatusCode, Version};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use super::protocol::{clamp_dim, Size, DEFAULT_SIZE, MAX_DIM};
use crate::http::error::ApiError;
use crate::sandbox::spec::WORKSPACE;

/// The subprotocol prefix that carries a token (`bearer.<token>`).
pub(super) const BEARER_PROTOCOL_PREFIX: &str = "bearer.";

/// What the query string may carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    pub size: Size,
    pub cwd: String,
    pub token: Option<String>,
}

/// Parses `cols`, `rows`, `cwd` and `token`; other keys are ignored, a repeated key is an
/// error (which of two values a proxy or a server would pick is a classic ambiguity).
pub fn parse_query(q: Option<&str>) -> Result<Query, String> {
    let mut out = Query {
        size: DEFAULT_SIZE,
        cwd: WORKSPACE.to_owned(),
        token: None,
    };
    let (mut cols, mut rows, mut cwd, mut token) = (None, None, None, None);
    for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_decode(k)?;
        let slot = match k.as_str() {
            "cols" => &mut cols,
            "rows" => &mut rows,
            "cwd" => &mut cwd,
            "token" => &mut token,
            _ => continue,
        };
        if slot.is_some() {
            return Err(format!("query parameter {k} is given more than once"));
        }
        *slot = Some(percent_decode(v)?);
    }
    let dim = |name: &str, v: &str| -> Result<u16, String> {
        let v = v.trim();
        let ok = !v.is_empty()
            && v.len() <= 40
            && v.strip_prefix('-')
                .unwrap_or(v)
                .bytes()
                .all(|b| b.is_ascii_digit());
        if !ok {
            return Err(format!("{name} must be an integer"));
        }
        // More digits than i128 holds still clamps: only the sign matters then.
        Ok(v.parse::<i128>()
            .map(clamp_dim)
            .unwrap_or(if v.starts_with('-') { 1 } else { MAX_DIM }))
    };
    if let Some(c) = cols {
        out.size.cols = dim("cols", &c)?;
    }
    if let Some(r) = rows {
        out.size.rows = dim("rows", &r)?;
    }
    if let Some(c) = cwd {
        out.cwd = validate_cwd(&c)?;
    }
    out.token = token.filter(|t| !t.is_empty());
    Ok(out)
}

/// `/workspace` or an absolute path below it, without `.`/`..` components or control
/// characters; returned without a trailing slash.
pub(super) fn validate_cwd(p: &str) -> Result<String, String> {
    let err = || format!("cwd must be {WORKSPACE} or a path inside it, without . or .. parts");
    if p.len() > 4096 || p.chars().any(char::is_control) {
        return Err(err());
    }
    let rest = p.strip_prefix(WORKSPACE).ok_or_else(err)?;
    if !(rest.is_empty() || rest.starts_with('/')) {
        return Err(err());
    }
    let mut clean = WORKSPACE.to_owned();
    for part in rest.split('/').filter(|s| !s.is_empty()) {
        if part == "." || part == ".." {
            return Err(err());
        }
        clean.push('/');
        clean.push_str(part);
    }
    Ok(clean)
}

/// `%XX` and `+` decoding of one query component; the result must be UTF-8.
pub(super) fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| "invalid percent-encoding in the query".to_owned())?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| "the query is not UTF-8".to_owned())
}

/// Comma-separated tokens of every instance of a header, trimmed.
fn header_tokens<'a>(headers: &'a HeaderMap, name: &hyper::header::HeaderName) -> Vec<&'a str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect()
}

/// The first offered `bearer.<token>` subprotocol, which the response must echo exactly.
pub(super) fn bearer_protocol(headers: &HeaderMap) -> Option<&str> {
    header_tokens(headers, &SEC_WEBSOCKET_PROTOCOL)
        .into_iter()
        .find(|p| p.starts_with(BEARER_PROTOCOL_PREFIX) && p.len() > BEARER_PROTOCOL_PREFIX.len())
}

/// Checks an RFC 6455 opening handshake; returns the `Sec-WebSocket-Accept` value.
pub(super) fn accept_key(version: Version, headers: &HeaderMap) -> Result<String, ApiError> {
    let bad = |m: &str| ApiError::new(StatusCode::BAD_REQUEST, "not_websocket", m);
    if version != Version::HTTP_11 {
        return Err(bad("the terminal needs a WebSocket upgrade over HTTP/1.1"));
    }
    let has = |name, token: &str| {
        header_tokens(headers, name)
            .iter()
            .any(|t| t.eq_ignore_ascii_case(token))
    };
    if !has(&CONNECTION, "upgrade") || !has(&UPGRADE, "websocket") {
        return Err(bad(
            "expected a WebSocket upgrade (Connection: Upgrade, Upgrade: websocket)",
        ));
    }
    let versions = header_tokens(headers, &SEC_WEBSOCKET_VERSION);
    if versions != ["13"] {
        // `Terminals::handle` adds the `Sec-WebSocket-Version: 13` header RFC 6455 asks for.
        return Err(ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "websocket_version",
            "only WebSocket version 13 is supported",
        ));
    }
    let mut keys = headers.get_all(SEC_WEBSOCKET_KEY).iter();
    let key = match (keys.next(), keys.next()) {
        (Some(k), None) => k.as_bytes(),
        _ => return Err(bad("exactly one Sec-WebSocket-Key is required")),
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(key)
        .map_err(|_| bad("Sec-WebSocket-Key is not base64"))?;
    if decoded.len() != 16 {
        return Err(bad("Sec-WebSocket-Key must encode 16 bytes"));
    }
    Ok(derive_accept_key(key))
}

/// Whether a browser `Origin` may open a terminal: one of the configured (or default) origins,
/// or the request's own origin (`scheme://Host`). The second rule is what browsers enforce
/// for same-origin pages and is safe here because the router only sends the main host's names
/// to this handler (a DNS-rebinding page arrives with a foreign Host and never gets here).
pub(super) fn origin_allowed(origin: &str, allowed: &[String], own: Option<&str>) -> bool {
    let o = origin.trim().trim_end_matches('/').to_ascii_lowercase();
    if o.is_empty() || o == "null" {
        return false;
    }
    allowed
        .iter()
        .any(|a| a.trim_end_matches('/').eq_ignore_ascii_case(&o))
        || own.is_some_and(|own| own.eq_ignore_ascii_case(&o))
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum DirState {
    Dir,
    Missing,
    /// A symlink on the way (resolved only inside the container) or an unreadable part.
    Unknown,
}

/// Whether a validated `cwd` (`/workspace/...`) is a folder, looked up in the workspace's host
/// folder, which is what the container mounts on /workspace. Symlinks are never followed on
/// the host (they point into the container's file system); the engine decides about those.
pub(super) fn host_dir_state(workspace: &std::path::Path, cwd: &str) -> DirState {
    let rel = cwd.strip_prefix(WORKSPACE).unwrap_or(cwd);
    let mut path = workspace.to_path_buf();
    for part in rel.split('/').filter(|p| !p.is_empty()) {
        path.push(part);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => return DirState::Unknown,
            Ok(m) if m.is_dir() => {}
            Ok(_) => return DirState::Missing,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return DirState::Missing,
            Err(_) => return DirState::Unknown,
        }
    }
    DirState::Dir
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parsing() {
        let q = parse_query(None).unwrap();
        assert_eq!(q.size, DEFAULT_SIZE);
        assert_eq!(q.cwd, "/workspace");
        assert_eq!(q.token, None);
        let q = parse_query(Some(
            "cols=132&rows=0&cwd=%2Fworkspace%2Fmy+app%2F&token=a.b.c&x=1",
        ))
        .unwrap();
        assert_eq!(q.size, Size { cols: 132, rows: 1 });
        assert_eq!(q.cwd, "/workspace/my app");
        assert_eq!(q.token.as_deref(), Some("a.b.c"));
        let q = parse_query(Some("cols=99999999999999999999999999999999999999&rows=-7")).unwrap();
        assert_eq!(
            q.size,
            Size {
                cols: 1000,
                rows: 1
            }
        );
        for bad in [
            "cols=abc",
            "cols=",
            "rows=1.5",
            "cols=1&cols=2",
            "cwd=/etc",
            "cwd=/workspace/../etc",
            "cwd=/workspacex",
            "cwd=workspace",
            "cwd=/workspace/a%00b",
            "cwd=%zz",
            "token=%ff",
        ] {
            assert!(parse_query(Some(bad)).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn cwd_rules() {
        assert_eq!(validate_cwd("/workspace").unwrap(), "/workspace");
        assert_eq!(validate_cwd("/workspace/").unwrap(), "/workspace");
        assert_eq!(validate_cwd("/workspace//a/b/").unwrap(), "/workspace/a/b");
        assert_eq!(validate_cwd("/workspace/a..b").unwrap(), "/workspace/a..b");
        for bad in [
            "",
            "/",
            "/work",
            "/workspace/..",
            "/workspace/./a",
            "/workspace/a/../..",
            "/workspace\n",
        ] {
            assert!(validate_cwd(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cwd_lookup_on_the_host_never_follows_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path();
        std::fs::create_dir_all(ws.join("a/b")).unwrap();
        std::fs::write(ws.join("f"), "x").unwrap();
        std::os::unix::fs::symlink("/etc", ws.join("link")).unwrap();
        assert_eq!(host_dir_state(ws, "/workspace"), DirState::Dir);
        assert_eq!(host_dir_state(ws, "/workspace/a/b"), DirState::Dir);
        assert_eq!(host_dir_state(ws, "/workspace/a/c"), DirState::Missing);
        assert_eq!(host_dir_state(ws, "/workspace/f"), DirState::Missing);
        assert_eq!(host_dir_state(ws, "/workspace/link"), DirState::Unknown);
        assert_eq!(host_dir_state(ws, "/workspace/link/ssl"), DirState::Unknown);
    }

    #[test]
    fn origins() {
        let allowed = vec![
            "https://app.example.com".to_owned(),
            "http://localhost:8080".to_owned(),
        ];
        assert!(origin_allowed("https://app.example.com", &allowed, None));
        assert!(origin_allowed("HTTPS://App.Example.com/", &allowed, None));
        assert!(!origin_allowed(
            "https://app.example.com.evil.test",
            &allowed,
            None
        ));
        assert!(!origin_allowed("http://app.example.com", &allowed, None));
        assert!(!origin_allowed("null", &allowed, None));
        assert!(!origin_allowed("", &allowed, None));
        assert!(origin_allowed(
            "http://127.0.0.1:5555",
            &allowed,
            Some("http://127.0.0.1:5555")
        ));
        assert!(!origin_allowed(
            "http://evil.test",
            &allowed,
            Some("http://127.0.0.1:5555")
        ));
    }

    fn handshake_headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn handshake_checks() {
        let good = [
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ];
        // RFC 6455's own example.
        assert_eq!(
            accept_key(Version::HTTP_11, &handshake_headers(&good)).unwrap(),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(
            accept_key(Version::HTTP_2, &handshake_headers(&good))
                .unwrap_err()
                .status,
            StatusCode::BAD_REQUEST
        );
        let mut no_upgrade = good.to_vec();
        no_upgrade.remove(1);
        assert_eq!(
            accept_key(Version::HTTP_11, &handshake_headers(&no_upgrade))
                .unwrap_err()
                .status,
            StatusCode::BAD_REQUEST
        );
        let mut v8 = good.to_vec();
        v8[2] = ("sec-websocket-version", "8");
        assert_eq!(
            accept_key(Version::HTTP_11, &handshake_headers(&v8))
                .unwrap_err()
                .status,
            StatusCode::UPGRADE_REQUIRED
        );
        let mut short_key = good.to_vec();
        short_key[3] = ("sec-websocket-key", "c2hvcnQ=");
        assert_eq!(
            accept_key(Version::HTTP_11, &handshake_headers(&short_key))
                .unwrap_err()
                .status,
            StatusCode::BAD_REQUEST
        );
        let mut two_keys = good.to_vec();
        two_keys.push(("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(accept_key(Version::HTTP_11, &handshake_headers(&two_keys)).is_err());
    }

    #[test]
    fn bearer_subprotocol() {
        let h = handshake_headers(&[
            ("sec-websocket-protocol", "tty, bearer.abc.def"),
            ("sec-websocket-protocol", "bearer.zzz"),
        ]);
        assert_eq!(bearer_protocol(&h), Some("bearer.abc.def"));
        let h = handshake_headers(&[("sec-websocket-protocol", "bearer.")]);
        assert_eq!(bearer_protocol(&h), None);
        assert_eq!(bearer_protocol(&HeaderMap::new()), None);
    }
}
