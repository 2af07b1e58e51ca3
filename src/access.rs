//! Request ids and the access log. Every request gets an id (the client's `X-Request-Id` when it
//! is sane, otherwise a new one) that is carried by a tracing span around its handling (so every
//! log line of the request has it), returned in the response and forwarded to the preview app.
//! One access line per request (target `sandboxd::access`) names the method, the kind of host,
//! the path WITHOUT its query (tokens can travel there), the status, the duration until the
//! response head and the user when known. Headers are never logged.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, StatusCode};

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Longest client-supplied id that is kept.
pub const MAX_REQUEST_ID: usize = 128;

tokio::task_local! {
    /// The user of the request being handled, once known (see [`note_user`]).
    static REQUEST_USER: Arc<OnceLock<String>>;
}

/// The client's id when it is one value of 1..=128 visible ASCII characters; else a new one.
pub fn request_id(headers: &HeaderMap) -> String {
    let mut values = headers.get_all(&X_REQUEST_ID).iter();
    if let (Some(v), None) = (values.next(), values.next()) {
        let b = v.as_bytes();
        if !b.is_empty() && b.len() <= MAX_REQUEST_ID && b.iter().all(|c| (0x21..=0x7e).contains(c))
        {
            // Only visible ASCII: valid UTF-8.
            return String::from_utf8_lossy(b).into_owned();
        }
    }
    new_request_id()
}

/// A new random (v4) id, 32 hex digits, from the thread's generator (no system call per
/// request, unlike `Uuid::new_v4`).
fn new_request_id() -> String {
    let id = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
    let mut buf = [0u8; uuid::fmt::Simple::LENGTH];
    id.simple().encode_lower(&mut buf).to_owned()
}

/// Records the request's user (the authenticated user on the main host, the preview's owner on
/// a preview host) for the access line and for the request's later log lines.
pub fn note_user(user: &str) {
    let _ = REQUEST_USER.try_with(|u| u.set(user.to_owned()));
    tracing::Span::current().record("user", tracing::field::display(user));
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostKind {
    Main,
    Preview,
    Unknown,
}

impl HostKind {
    pub fn as_str(self) -> &'static str {
        match self {
            HostKind::Main => "main",
            HostKind::Preview => "preview",
            HostKind::Unknown => "unknown",
        }
    }
}

/// What the access line needs from the request, taken before the request is handed on.
pub struct Access {
    pub id: String,
    method: Method,
    path: String,
    host: HostKind,
    start: Instant,
    user: Arc<OnceLock<String>>,
    span: tracing::Span,
    /// `id` as a header value, made once for the request and the response.
    header: HeaderValue,
}

impl Access {
    /// `path` must be the path alone (`uri.path()`), never the query.
    pub fn start(id: String, method: Method, path: &str, host: HostKind) -> Access {
        let span = tracing::info_span!("request", request_id = %id, user = tracing::field::Empty);
        let header =
            HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static("invalid"));
        Access {
            header,
            id,
            method,
            // Bounded: hyper already bounds the request line; this keeps a log line short.
            path: path.chars().take(512).collect(),
            host,
            start: Instant::now(),
            user: Arc::new(OnceLock::new()),
            span,
        }
    }

    /// Runs the request's handling with the user slot set and inside the request's span.
    pub async fn run<F: std::future::Future>(&self, fut: F) -> F::Output {
        use tracing::Instrument;
        REQUEST_USER
            .scope(self.user.clone(), fut.instrument(self.span.clone()))
            .await
    }

    /// Writes the access line (inside the request's span).
    pub fn log(&self, status: StatusCode) {
        let duration_ms = self.start.elapsed().as_secs_f64() * 1000.0;
        let duration_ms = (duration_ms * 1000.0).round() / 1000.0;
        let user = self.user.get().map(tracing::field::display);
        self.span.in_scope(|| {
            tracing::info!(
                target: "sandboxd::access",
                request_id = %self.id,
                method = %self.method,
                host = %self.host.as_str(),
                path = %self.path,
                status = status.as_u16(),
                duration_ms,
                user,
                "request"
            )
        });
    }

    pub fn header_value(&self) -> HeaderValue {
        self.header.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(values: &[&[u8]]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(&X_REQUEST_ID, HeaderValue::from_bytes(v).unwrap());
        }
        h
    }

    #[test]
    fn sane_ids_are_kept_and_others_replaced() {
        assert_eq!(request_id(&with(&[b"abc-123_X.y"])), "abc-123_X.y");
        let long = "a".repeat(MAX_REQUEST_ID);
        assert_eq!(request_id(&with(&[long.as_bytes()])), long);
        for bad in [
            &b""[..],
            b"has space",
            b"tab\there",
            "caf\u{e9}".as_bytes(),
            "a".repeat(MAX_REQUEST_ID + 1).as_bytes(),
        ] {
            let id = request_id(&with(&[bad]));
            assert_eq!(id.len(), 32, "{bad:?} replaced by a new id");
            assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        }
        // Two values: ambiguous, replaced.
        assert_eq!(request_id(&with(&[b"a", b"b"])).len(), 32);
        let (a, b) = (request_id(&HeaderMap::new()), request_id(&HeaderMap::new()));
        assert_ne!(a, b);
    }

    #[tokio::test]
    async fn the_user_slot_is_per_request() {
        let a = Access::start("1".into(), Method::GET, "/x", HostKind::Main);
        a.run(async { note_user("42") }).await;
        assert_eq!(a.user.get().map(String::as_str), Some("42"));
        let b = Access::start("2".into(), Method::GET, "/x", HostKind::Main);
        b.run(async {}).await;
        assert_eq!(b.user.get(), None);
        // Outside a request: no panic, nothing recorded.
        note_user("7");
    }
}
