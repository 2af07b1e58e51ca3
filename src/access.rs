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
#[cfg(test)]
pub fn request_id(headers: &HeaderMap) -> String {
    let (id, _) = request_id_value(headers);
    // Only visible ASCII (see `request_id_value`): `to_str` cannot fail.
    id.to_str().unwrap_or_default().to_owned()
}

/// [`request_id`] as a header value, and whether it is the client's own (then the value is a
/// shared copy of the request's header, and the request already carries exactly it).
fn request_id_value(headers: &HeaderMap) -> (HeaderValue, bool) {
    let mut values = headers.get_all(&X_REQUEST_ID).iter();
    if let (Some(v), None) = (values.next(), values.next()) {
        if sane_id(v.as_bytes()) {
            return (v.clone(), true);
        }
    }
    (new_request_id(), false)
}

/// A client id worth keeping: 1..=128 visible ASCII characters.
fn sane_id(b: &[u8]) -> bool {
    !b.is_empty() && b.len() <= MAX_REQUEST_ID && b.iter().all(|c| (0x21..=0x7e).contains(c))
}

/// A new id, 32 hex digits: the thread's 64-bit prefix, drawn at random once per thread, then
/// the thread's count of ids (from a random start). Unique across threads, processes and
/// replicas sharing a database as long as no two threads draw the same prefix (a chance of
/// about n²/2⁶⁵ for n threads ever started); no random draw or system call per request. Ids
/// name requests; they are not secrets (a client may send its own).
fn new_request_id() -> HeaderValue {
    thread_local! {
        /// (prefix, next count).
        static NEXT: std::cell::Cell<(u64, u64)> = std::cell::Cell::new(rand::random());
    }
    let (prefix, n) = NEXT.with(|c| {
        let (prefix, n) = c.get();
        c.set((prefix, n.wrapping_add(1)));
        (prefix, n)
    });
    let mut buf = [0u8; 32];
    hex16(&mut buf, (u128::from(prefix) << 64) | u128::from(n));
    HeaderValue::from_bytes(&buf).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// `v` as 32 lowercase hex digits, most significant first.
fn hex16(buf: &mut [u8; 32], v: u128) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in buf.iter_mut().enumerate() {
        *b = DIGITS[((v >> (124 - 4 * i)) & 0xf) as usize];
    }
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
///
/// When the access line is off (a log level above `info` for `sandboxd::access`, as in
/// production setups that log warnings only), the request still gets its id (kept or new, on
/// the request and the response), but nothing is kept for a line that will not be written:
/// no copy of the path, no user slot, and the request runs without the task-local scope (its
/// span is disabled too at such a level).
pub struct Access {
    /// The id as a header value, made (or shared from the request) once for the request and
    /// the response.
    header: HeaderValue,
    /// Whether `header` is the client's own id, which the request already carries.
    kept: bool,
    method: Method,
    path: String,
    host: HostKind,
    /// When the handling started (only read by the access line: `None` when it is off).
    start: Option<Instant>,
    /// `None` when the access line was off at the start of the request.
    user: Option<Arc<OnceLock<String>>>,
    span: tracing::Span,
}

impl Access {
    /// `path` must be the path alone (`uri.path()`), never the query.
    #[cfg(test)]
    pub fn start(id: String, method: Method, path: &str, host: HostKind) -> Access {
        let header =
            HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static("invalid"));
        Access::with_id(header, false, method, path, host)
    }

    /// [`Access::start`] with the id from the request's headers ([`request_id`]).
    pub fn for_request(headers: &HeaderMap, method: Method, path: &str, host: HostKind) -> Access {
        let (header, kept) = request_id_value(headers);
        Access::with_id(header, kept, method, path, host)
    }

    /// [`Access::for_request`] of a head the edge parsed itself (`edge/fast.rs`): `ids` are
    /// the values of its `X-Request-Id` headers. A kept id is the client's only one; else the
    /// new id replaces all of them.
    pub fn for_raw<'a>(
        mut ids: impl Iterator<Item = &'a [u8]>,
        method: Method,
        path: &str,
        host: HostKind,
    ) -> Access {
        let kept = match (ids.next(), ids.next()) {
            (Some(v), None) if sane_id(v) => HeaderValue::from_bytes(v).ok(),
            _ => None,
        };
        match kept {
            Some(v) => Access::with_id(v, true, method, path, host),
            None => Access::with_id(new_request_id(), false, method, path, host),
        }
    }

    fn with_id(
        header: HeaderValue,
        kept: bool,
        method: Method,
        path: &str,
        host: HostKind,
    ) -> Access {
        let span = tracing::info_span!(
            "request",
            request_id = %header.to_str().unwrap_or("invalid"),
            user = tracing::field::Empty
        );
        let line = tracing::enabled!(target: "sandboxd::access", tracing::Level::INFO);
        Access {
            header,
            kept,
            method,
            // Bounded: hyper already bounds the request line; this keeps a log line short.
            path: if line {
                path.chars().take(512).collect()
            } else {
                String::new()
            },
            host,
            start: line.then(Instant::now),
            user: line.then(|| Arc::new(OnceLock::new())),
            span,
        }
    }

    /// The request id.
    pub fn id(&self) -> &str {
        // Visible ASCII only (`request_id_value`), or the "invalid" placeholder.
        self.header.to_str().unwrap_or("invalid")
    }

    /// Whether the id is the client's own `X-Request-Id`, which the request already carries as
    /// its only value (so it need not be set on the request again).
    pub fn kept_client_id(&self) -> bool {
        self.kept
    }

    /// Whether neither the access line nor the request's span is on: [`Access::run`] and
    /// [`note_user`] would then do nothing but run the handling.
    pub fn is_off(&self) -> bool {
        self.user.is_none() && self.span.is_disabled()
    }

    /// Runs the request's handling with the user slot set and inside the request's span.
    pub async fn run<F: std::future::Future>(&self, fut: F) -> F::Output {
        use tracing::Instrument;
        match &self.user {
            Some(user) => {
                REQUEST_USER
                    .scope(user.clone(), fut.instrument(self.span.clone()))
                    .await
            }
            None if self.span.is_disabled() => fut.await,
            None => fut.instrument(self.span.clone()).await,
        }
    }

    /// Writes the access line (inside the request's span), unless it was off at the start.
    pub fn log(&self, status: StatusCode) {
        let (Some(user), Some(start)) = (&self.user, self.start) else {
            return;
        };
        let duration_ms = start.elapsed().as_secs_f64() * 1000.0;
        let duration_ms = (duration_ms * 1000.0).round() / 1000.0;
        let user = user.get().map(tracing::field::display);
        self.span.in_scope(|| {
            tracing::info!(
                target: "sandboxd::access",
                request_id = %self.id(),
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

    /// New ids are 32 lowercase hex digits and distinct, within a thread and across threads
    /// (each thread has its own random prefix and counts on from its own start).
    #[test]
    fn new_ids_are_well_formed_and_unique_across_threads() {
        let ids: Vec<String> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        (0..2_000)
                            .map(|_| request_id(&HeaderMap::new()))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            threads
                .into_iter()
                .flat_map(|t| t.join().unwrap())
                .collect()
        });
        for id in &ids {
            assert_eq!(id.len(), 32, "{id}");
            assert!(
                id.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                "{id}"
            );
        }
        let distinct: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
        // Threads differ in their prefix (the first 16 digits).
        let prefixes: std::collections::HashSet<&str> = ids.iter().map(|i| &i[..16]).collect();
        assert_eq!(prefixes.len(), 4);
    }

    #[test]
    fn hex16_writes_32_digits_most_significant_first() {
        let mut buf = [0u8; 32];
        hex16(&mut buf, 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210);
        assert_eq!(&buf, b"0123456789abcdeffedcba9876543210");
        hex16(&mut buf, 0);
        assert_eq!(&buf, &[b'0'; 32]);
    }

    /// A subscriber at `level` for the current thread (the test's runtime is current-thread).
    fn logging_at(level: tracing::Level) -> tracing::subscriber::DefaultGuard {
        tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .with_max_level(level)
                .with_test_writer()
                .finish(),
        )
    }

    #[tokio::test]
    async fn the_user_slot_is_per_request() {
        let _log = logging_at(tracing::Level::INFO);
        let a = Access::start("1".into(), Method::GET, "/x", HostKind::Main);
        a.run(async { note_user("42") }).await;
        let slot = |a: &Access| a.user.as_ref().and_then(|u| u.get().cloned());
        assert_eq!(slot(&a).as_deref(), Some("42"));
        assert_eq!(a.path, "/x");
        assert!(!a.is_off());
        let b = Access::start("2".into(), Method::GET, "/x", HostKind::Main);
        b.run(async {}).await;
        assert_eq!(slot(&b), None);
        // Outside a request: no panic, nothing recorded.
        note_user("7");
    }

    #[tokio::test]
    async fn with_the_access_line_off_the_id_is_still_made_and_nothing_else_kept() {
        let _log = logging_at(tracing::Level::WARN);
        let a = Access::for_request(&HeaderMap::new(), Method::GET, "/x", HostKind::Preview);
        assert_eq!(a.id().len(), 32);
        assert!(a.id().bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(!a.kept_client_id());
        assert_eq!(a.header_value(), a.id());
        assert!(a.user.is_none() && a.path.is_empty());
        assert!(a.is_off());
        // The handling runs (without a user slot) and `note_user` is harmless.
        assert_eq!(a.run(async { note_user("42") }).await, ());
        a.log(StatusCode::OK);
        let kept = Access::for_request(&with(&[b"abc-1"]), Method::GET, "/x", HostKind::Main);
        assert_eq!(kept.id(), "abc-1");
        assert!(kept.kept_client_id());
        let two = Access::for_request(&with(&[b"a", b"b"]), Method::GET, "/x", HostKind::Main);
        assert!(!two.kept_client_id());
        assert_eq!(two.id().len(), 32);
    }
}
