//! WebSocket upgrades on the main host, shared by the terminal and the files watch: the Origin
//! rule, the RFC 6455 opening handshake, the bearer token (header, `bearer.<token>` subprotocol
//! or `?token=`) and the 101 answer. Pure functions but [`authenticate`], which verifies the
//! token; every refusal happens before a sandbox is touched.

use base64::Engine as _;
use hyper::header::{
    HeaderMap, HeaderValue, CONNECTION, HOST, ORIGIN, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY,
    SEC_WEBSOCKET_PROTOCOL, SEC_WEBSOCKET_VERSION, UPGRADE,
};
use hyper::{Response, StatusCode, Version};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use super::error::ApiError;
use super::{empty, Body};
use crate::auth::{bearer, Auth};
use crate::user::UserId;

/// The subprotocol prefix that carries a token (`bearer.<token>`).
pub const BEARER_PROTOCOL_PREFIX: &str = "bearer.";

/// Refuses a browser `Origin` that may not open `what` (see [`origin_allowed`]); a request
/// without Origin (not a browser) passes. `tls`: whether the request came over HTTPS.
pub fn check_origin(
    headers: &HeaderMap,
    tls: bool,
    allowed: &[String],
    what: &str,
) -> Result<(), ApiError> {
    let mut origins = headers.get_all(ORIGIN).iter();
    let Some(origin) = origins.next() else {
        return Ok(());
    };
    let own = headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .map(|h| format!("{}://{}", if tls { "https" } else { "http" }, h.trim()));
    let ok = origins.next().is_none()
        && origin
            .to_str()
            .is_ok_and(|o| origin_allowed(o, allowed, own.as_deref()));
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            format!("this Origin may not open {what}"),
        ))
    }
}

/// Who opens the socket: the `Authorization` header, then a `bearer.<token>` subprotocol, then
/// the query's token. Returns the user and the subprotocol to echo in the 101.
pub fn authenticate(
    headers: &HeaderMap,
    auth: &Auth,
    query_token: Option<&str>,
) -> Result<(UserId, Option<String>), ApiError> {
    let protocol = bearer_protocol(headers).map(str::to_owned);
    let token = bearer(headers)
        .map(str::to_owned)
        .or_else(|| {
            protocol
                .as_deref()
                .map(|p| p[BEARER_PROTOCOL_PREFIX.len()..].to_owned())
        })
        .or_else(|| query_token.map(str::to_owned))
        .ok_or_else(|| ApiError::unauthorized("missing bearer token"))?;
    let user = auth
        .verify(&token)
        .map_err(|e| ApiError::unauthorized(e.to_string()))?;
    crate::access::note_user(user.as_str());
    Ok((user, protocol))
}

/// The 101 answer: `accept` from [`accept_key`], the token's subprotocol echoed when offered.
pub fn switching_protocols(accept: &str, protocol: Option<&str>) -> Response<Body> {
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(accept) {
        h.insert(SEC_WEBSOCKET_ACCEPT, v);
    }
    if let Some(v) = protocol.and_then(|p| HeaderValue::from_str(p).ok()) {
        // It came from a header value, so it is one.
        h.insert(SEC_WEBSOCKET_PROTOCOL, v);
    }
    resp
}

/// An upgrade refused: the error envelope, plus the `Sec-WebSocket-Version: 13` header RFC
/// 6455 asks for on 426.
pub fn refusal(e: ApiError) -> Response<Body> {
    let version_refused = e.status == StatusCode::UPGRADE_REQUIRED;
    let mut resp = e.into_response();
    if version_refused {
        resp.headers_mut()
            .insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
    }
    resp
}

/// `%XX` and `+` decoding of one query component; the result must be UTF-8.
pub fn percent_decode(s: &str) -> Result<String, String> {
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
pub fn bearer_protocol(headers: &HeaderMap) -> Option<&str> {
    header_tokens(headers, &SEC_WEBSOCKET_PROTOCOL)
        .into_iter()
        .find(|p| p.starts_with(BEARER_PROTOCOL_PREFIX) && p.len() > BEARER_PROTOCOL_PREFIX.len())
}

/// Checks an RFC 6455 opening handshake; returns the `Sec-WebSocket-Accept` value.
pub fn accept_key(version: Version, headers: &HeaderMap) -> Result<String, ApiError> {
    let bad = |m: &str| ApiError::new(StatusCode::BAD_REQUEST, "not_websocket", m);
    if version != Version::HTTP_11 {
        return Err(bad("this route needs a WebSocket upgrade over HTTP/1.1"));
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
        // `refusal` adds the `Sec-WebSocket-Version: 13` header RFC 6455 asks for.
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

/// Whether a browser `Origin` may open a WebSocket: one of the configured (or default) origins,
/// or the request's own origin (`scheme://Host`). The second rule is what browsers enforce
/// for same-origin pages and is safe here because the router only sends the main host's names
/// to this handler (a DNS-rebinding page arrives with a foreign Host and never gets here).
pub fn origin_allowed(origin: &str, allowed: &[String], own: Option<&str>) -> bool {
    let o = origin.trim().trim_end_matches('/').to_ascii_lowercase();
    if o.is_empty() || o == "null" {
        return false;
    }
    allowed
        .iter()
        .any(|a| a.trim_end_matches('/').eq_ignore_ascii_case(&o))
        || own.is_some_and(|own| own.eq_ignore_ascii_case(&o))
}

#[cfg(test)]
mod tests {
    use super::*;

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
