//! The HTTP/1.1 fast path of plain and TLS connections (TLS when the client did not choose
//! HTTP/2): the requests that make up nearly all preview traffic (a bodyless `GET` or `HEAD` of
//! an app that runs) are read, answered and written here, without hyper's server, whose
//! connection state machine, header map and buffered writer cost about as many instructions per
//! request as everything else sandboxd does for it.
//!
//! A connection starts here. Each request head is parsed (`httparse`, as hyper does) and kept
//! here only when it is plainly safe to: `GET` or `HEAD`, HTTP/1.1, an origin-form target of
//! ordinary characters, exactly one `Host`, no header that frames a body (`Content-Length`,
//! `Transfer-Encoding`), asks for something (`Expect`, `Upgrade`, `TE`) or is hop-by-hop (but
//! `Connection: keep-alive`), no header named like the framing check's marker, at most
//! [`MAX_HEADERS`] headers and [`MAX_HEAD`] bytes; and when the handler takes it
//! ([`Handler::fast`]). Anything else (a body, an upgrade, HTTP/2's preface, HTTP/1.0, a bad or
//! long head, a host the handler does not serve this way, over TLS a host other than the
//! server name) goes to hyper with the connection and every byte read so far
//! ([`Outcome::Fallback`]), through the framing check as always, and the connection stays
//! there. Nothing is answered here that hyper's path would refuse: a request
//! either fits the rules above or is hyper's.
//!
//! The same limits hold as on hyper's path: a head must come within the header-read timeout,
//! counted from the end of the previous answer (it is also the keep-alive idle timeout), and
//! the listener's drain closes an idle connection at once and a busy one after its answer
//! (`Connection: close`). Answers are written with their own framing: the handler's
//! `Content-Length`, else the body's exact size, else chunked; none for `HEAD`, 1xx, 204 and
//! 304. A handler may give an answer's headers as the wire's lines ([`LinesAnswer`]): the
//! preview passes the app's head through that way, without a `HeaderMap`. The body is read
//! ahead of a slow client up to 512 KiB, as on hyper's path, and a small answer goes out with
//! its head in one vectored write. An answer whose body fails or does not match its length ends
//! the connection.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use hyper::body::Body as _;
use hyper::header::{self, HeaderName};
use hyper::{Response, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::listener::{ConnInfo, Handler};
use crate::http::wire::WriteQueue;
use crate::http::Body;

/// The most headers a fast-path head may carry (hyper's path allows 100).
pub const MAX_HEADERS: usize = 64;
/// The longest head the fast path reads; a longer one goes to hyper's path, which has the
/// listener's own limit (and its 431).
pub const MAX_HEAD: usize = 16 * 1024;
/// Room made in the read buffer before each read.
const READ_ROOM: usize = 4 * 1024;
/// Answer bytes read ahead of a client slower than the app (hyper's path: its 512 KiB write
/// buffer; nginx: its proxy buffers).
const QUEUE_MAX: usize = 512 * 1024;

/// A request head the fast path took, as the handler sees it.
pub struct FastHead<'a> {
    /// `GET` or `HEAD`.
    pub method: &'static str,
    /// The origin-form target (path and query), as sent.
    pub target: &'a str,
    /// The one `Host` header's value.
    pub host: &'a [u8],
    /// Every header, as sent (names in the client's case).
    pub headers: &'a [httparse::Header<'a>],
}

impl FastHead<'_> {
    pub fn is_head(&self) -> bool {
        self.method == "HEAD"
    }

    /// The target's path (without the query).
    pub fn path(&self) -> &str {
        self.target
            .split_once('?')
            .map_or(self.target, |(path, _)| path)
    }

    /// The first value of header `name` (ASCII case ignored).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }

    /// Every value of header `name` (ASCII case ignored).
    pub fn values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s [u8]> + 's {
        self.headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }
}

/// How the handler's fast answer ended.
pub enum FastAnswer {
    /// The answer to write.
    Answer(Response<Body>),
    /// The answer to write, its headers as lines (a proxy's pass-through).
    Lines(LinesAnswer),
    /// Not answered, and nothing done that sending the request again could not repeat: the
    /// request (and the connection) go to hyper's path.
    Fallback,
}

/// An answer whose headers are the wire's lines already, checked by whoever parsed them: what a
/// proxy passes through without making a `HeaderMap` of the upstream's head.
pub struct LinesAnswer {
    pub status: StatusCode,
    /// `name: value\r\n` lines: no hop-by-hop header (`Connection` included), no
    /// `Content-Length` (that is `length`), no `X-Request-Id` (that is `request_id`).
    pub lines: Bytes,
    /// The `Content-Length` to say (a `HEAD`'s, 204's or 304's answer may say one too).
    pub length: Option<u64>,
    /// A `Date` is among the lines (else one is added, as for any answer).
    pub has_date: bool,
    /// Written as `X-Request-Id`.
    pub request_id: Option<header::HeaderValue>,
    pub body: Body,
}

/// The handler's fast answer: owned, so the head it came from can be dropped.
pub type FastFuture = Pin<Box<dyn Future<Output = FastAnswer> + Send>>;

/// How a connection's fast path ended.
pub(super) enum Outcome {
    /// The connection is over (closed by the client, timed out, drained, or failed).
    Closed,
    /// The rest of the connection is hyper's, starting with these bytes already read.
    Fallback(BytesMut),
}

/// Serves `io` until a request is not for the fast path, or the connection ends.
/// `draining`: whether the listener is draining (it registers the task's waker to be woken
/// when it starts).
pub(super) async fn serve<S>(
    io: &mut S,
    conn: &Arc<ConnInfo>,
    handler: &dyn Handler,
    header_read_timeout: Duration,
    max_head: usize,
    mut draining: impl FnMut(&std::task::Context<'_>) -> bool,
) -> Outcome
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let max_head = MAX_HEAD.min(max_head);
    let mut buf = BytesMut::with_capacity(READ_ROOM);
    let mut out = Vec::new();
    loop {
        // The next head, within the header-read timeout from the end of the last answer.
        let next = async {
            loop {
                if !buf.is_empty() {
                    match take(&buf, max_head, conn, handler) {
                        Taken::Fast(len, head_only, answer) => {
                            return Next::Request(len, head_only, answer)
                        }
                        Taken::Partial => {}
                        Taken::NotFast => return Next::Fallback,
                    }
                }
                let idle = buf.is_empty();
                buf.reserve(READ_ROOM);
                let read = io.read_buf(&mut buf);
                tokio::pin!(read);
                let got = poll_fn(|cx| {
                    if idle && draining(cx) {
                        return Poll::Ready(None);
                    }
                    read.as_mut().poll(cx).map(Some)
                })
                .await;
                match got {
                    Some(Ok(n)) if n > 0 => {}
                    // Closed (or drained while idle, or failed): a partial head is dropped,
                    // as hyper drops it.
                    _ => return Next::Closed,
                }
            }
        };
        let (len, head_only, answer) = match super::coarse::within(header_read_timeout, next).await
        {
            Ok(Next::Request(len, head_only, answer)) => (len, head_only, answer),
            Ok(Next::Fallback) => return Outcome::Fallback(buf),
            Ok(Next::Closed) | Err(_) => return Outcome::Closed,
        };
        let (status, headers, body) = match guarded(answer, conn).await {
            FastAnswer::Answer(resp) => {
                let (parts, body) = resp.into_parts();
                (parts.status, Headers::Map(parts.headers), body)
            }
            FastAnswer::Lines(a) => {
                let headers = Headers::Lines {
                    lines: a.lines,
                    length: a.length,
                    has_date: a.has_date,
                    request_id: a.request_id,
                };
                (a.status, headers, a.body)
            }
            FastAnswer::Fallback => return Outcome::Fallback(buf),
        };
        buf.advance(len);
        let close = poll_fn(|cx| Poll::Ready(draining(cx))).await;
        match write_answer(io, status, headers, body, head_only, close, &mut out).await {
            Ok(true) => {}
            Ok(false) | Err(_) => return Outcome::Closed,
        }
        // Buffers grown past the usual (a long head, a large answer gathered) are not kept by a
        // connection waiting for its next request.
        if buf.is_empty() && buf.capacity() > 2 * READ_ROOM {
            buf = BytesMut::with_capacity(READ_ROOM);
        }
        if out.capacity() > READ_ROOM {
            out = Vec::new();
        }
    }
}

enum Next {
    Request(usize, bool, FastFuture),
    Fallback,
    Closed,
}

enum Taken {
    /// A whole head of this length (and whether it is a HEAD), and its answer.
    Fast(usize, bool, FastFuture),
    /// Not a whole head yet.
    Partial,
    /// Not for the fast path: hyper's.
    NotFast,
}

/// Parses the head at the start of `buf` and, when it is for the fast path, asks the handler.
fn take(buf: &[u8], max_head: usize, conn: &Arc<ConnInfo>, handler: &dyn Handler) -> Taken {
    match check(buf, max_head, |head| {
        // A Host other than the TLS server name is hyper's path's (its 421).
        if misdirected(head.host, conn) {
            return None;
        }
        handler
            .fast(head, conn)
            .map(|answer| (head.is_head(), answer))
    }) {
        Checked::Fast(len, Some((head_only, answer))) => Taken::Fast(len, head_only, answer),
        Checked::Partial => Taken::Partial,
        Checked::Fast(_, None) | Checked::NotFast => Taken::NotFast,
    }
}

/// Whether `host` is not the host the TLS connection's server name (SNI) names.
fn misdirected(host: &[u8], conn: &ConnInfo) -> bool {
    conn.sni.as_deref().is_some_and(|sni| {
        !std::str::from_utf8(host).is_ok_and(|h| super::router::sni_matches_host(sni, h))
    })
}

/// What [`check`] found at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Checked<R> {
    /// A whole head of this length that the fast path takes, and what `f` made of it.
    Fast(usize, R),
    /// Not a whole head yet (and shorter than the limit).
    Partial,
    /// A head (or bytes) for hyper's path.
    NotFast,
}

/// The fast path's reading of the bytes at the start of `buf` (see the module's doc for what
/// it takes): a pure function, so that it can be checked against the framing check on any
/// input (tests/security/fuzz.rs).
pub fn check<R>(buf: &[u8], max_head: usize, f: impl FnOnce(&FastHead<'_>) -> R) -> Checked<R> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) if len <= max_head => len,
        Ok(httparse::Status::Partial) if buf.len() < max_head => return Checked::Partial,
        // Too long, too many headers, or not HTTP/1.x as httparse reads it: hyper's path
        // answers (or speaks HTTP/2).
        _ => return Checked::NotFast,
    };
    match fast_head(&req) {
        Some(head) => Checked::Fast(len, f(&head)),
        None => Checked::NotFast,
    }
}

/// The head as the fast path takes it, or `None` when it is hyper's (see the module's doc).
fn fast_head<'a>(req: &'a httparse::Request<'a, 'a>) -> Option<FastHead<'a>> {
    let method = match req.method? {
        "GET" => "GET",
        "HEAD" => "HEAD",
        _ => return None,
    };
    if req.version? != 1 {
        return None;
    }
    let target = req.path?;
    if !plain_target(target) {
        return None;
    }
    let mut host = None;
    for h in req.headers.iter() {
        match classify(h.name) {
            Field::Host if host.is_none() => host = Some(h.value),
            Field::Host => return None,
            Field::Connection if is_keep_alive(h.value) => {}
            Field::Refused | Field::Connection => return None,
            Field::Other => {}
        }
    }
    Some(FastHead {
        method,
        target,
        host: host.filter(|h| !h.is_empty())?,
        headers: req.headers,
    })
}

enum Field {
    Host,
    Connection,
    /// A header the fast path leaves to hyper's path.
    Refused,
    Other,
}

/// What header `name` means to the fast path.
fn classify(name: &str) -> Field {
    const REFUSED: [&str; 11] = [
        "content-length",
        "transfer-encoding",
        "expect",
        "upgrade",
        "te",
        "trailer",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "http2-settings",
    ];
    if name.eq_ignore_ascii_case("host") {
        Field::Host
    } else if name.eq_ignore_ascii_case("connection") {
        Field::Connection
    } else if name.eq_ignore_ascii_case(super::framing::MARKER)
        || REFUSED.iter().any(|r| name.eq_ignore_ascii_case(r))
    {
        Field::Refused
    } else {
        Field::Other
    }
}

/// `Connection: keep-alive`, the only `Connection` header the fast path takes (HTTP/1.1
/// keeps the connection anyway; anything else, `close` included, is hyper's).
fn is_keep_alive(v: &[u8]) -> bool {
    v.trim_ascii().eq_ignore_ascii_case(b"keep-alive")
}

/// An origin-form target of characters that need no interpretation: `/` first, then letters,
/// digits, `-._~!$&'()*+,;=:@/?%`. A target with anything else (a fragment, quotes, braces,
/// backslashes, obs-text) is left to hyper's path, which decides whether to refuse it.
fn plain_target(t: &str) -> bool {
    t.starts_with('/')
        && t.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b'.'
                        | b'_'
                        | b'~'
                        | b'!'
                        | b'$'
                        | b'&'
                        | b'\''
                        | b'('
                        | b')'
                        | b'*'
                        | b'+'
                        | b','
                        | b';'
                        | b'='
                        | b':'
                        | b'@'
                        | b'/'
                        | b'?'
                        | b'%'
                )
        })
}

/// Runs the handler's answer; a panic in it costs the request a 500, not the connection's task
/// (as `listener::guarded` does on hyper's path).
async fn guarded(mut answer: FastFuture, conn: &ConnInfo) -> FastAnswer {
    poll_fn(|cx| {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| answer.as_mut().poll(cx))) {
            Ok(p) => p,
            Err(_) => {
                tracing::error!(peer = %conn.peer, "fast-path handler panicked");
                Poll::Ready(FastAnswer::Answer(
                    crate::http::error::ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "internal",
                        "internal error",
                    )
                    .into_response(),
                ))
            }
        }
    })
    .await
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body on the wire.
    None,
    Length(u64),
    Chunked,
}

/// An answer's headers, as the handler gave them.
enum Headers {
    Map(header::HeaderMap),
    /// [`LinesAnswer`]'s, but its body.
    Lines {
        lines: Bytes,
        length: Option<u64>,
        has_date: bool,
        request_id: Option<header::HeaderValue>,
    },
}

/// Writes the answer (`status`, `headers`, `body`) to a request (`head_only`: to a HEAD); with
/// `close`, says `Connection: close`. `Ok(true)` when the connection can take another request.
async fn write_answer<S>(
    io: &mut S,
    status: StatusCode,
    headers: Headers,
    mut body: Body,
    head_only: bool,
    mut close: bool,
    out: &mut Vec<u8>,
) -> io::Result<bool>
where
    S: AsyncWrite + Unpin,
{
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    // As hyper's server does: an answer without a date gets one (the app's carry theirs).
    let has_date = match &headers {
        Headers::Map(h) => h.contains_key(header::DATE),
        Headers::Lines { has_date, .. } => *has_date,
    };
    if !has_date {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let mut length = None;
    match headers {
        Headers::Lines {
            lines,
            length: n,
            request_id,
            ..
        } => {
            out.extend_from_slice(&lines);
            if let Some(id) = request_id {
                out.extend_from_slice(b"x-request-id: ");
                out.extend_from_slice(id.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            if let Some(n) = n {
                write_length(out, n);
                length = Some(n);
            }
        }
        Headers::Map(headers) => {
            for (name, value) in &headers {
                if *name == header::CONTENT_LENGTH {
                    let n = value
                        .to_str()
                        .ok()
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .filter(|n| length.is_none_or(|l| l == *n))
                        .ok_or_else(|| {
                            io::Error::new(io::ErrorKind::InvalidData, "bad content-length")
                        })?;
                    length = Some(n);
                } else if *name == header::CONNECTION {
                    // The handler's own `Connection: close` is honoured; the header is ours.
                    close |= value
                        .as_bytes()
                        .split(|&b| b == b',')
                        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
                    continue;
                } else if is_hop(name) {
                    continue;
                }
                out.extend_from_slice(name.as_str().as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(value.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
        }
    }
    let no_body = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    // A HEAD's answer says what a GET's would carry (its length, when known), and has no body.
    let framing = if no_body {
        Framing::None
    } else if let Some(n) = length {
        Framing::Length(n)
    } else if let Some(n) = body.size_hint().exact() {
        write_length(out, n);
        Framing::Length(n)
    } else if head_only {
        Framing::None
    } else {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        Framing::Chunked
    };
    let framing = if head_only { Framing::None } else { framing };
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if framing == Framing::None {
        drop(body);
        io.write_all(out).await?;
        io.flush().await?;
        return Ok(!close);
    }
    // The body is read ahead of a slower client, up to [`QUEUE_MAX`] (as hyper's write buffer on
    // the other path), and written with the head: one vectored write for a small answer whose
    // bytes came with its head, and the head alone at once when they did not.
    let mut queue = WriteQueue::default();
    queue.push(Bytes::copy_from_slice(out));
    let mut sent: u64 = 0;
    let mut body_done = false;
    let ended = poll_fn(|cx| loop {
        let mut progressed = false;
        while !body_done && queue.len() < QUEUE_MAX {
            match Pin::new(&mut body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    progressed = true;
                    // Trailers are not forwarded; empty frames carry nothing.
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if data.is_empty() {
                        continue;
                    }
                    sent += data.len() as u64;
                    match framing {
                        Framing::Length(n) if sent > n => return Poll::Ready(Ok(false)),
                        Framing::Chunked => queue.push_chunk(data),
                        _ => queue.push(data),
                    }
                }
                Poll::Ready(None) => {
                    body_done = true;
                    if framing == Framing::Chunked {
                        queue.push_last_chunk();
                    }
                }
                Poll::Ready(Some(Err(_))) => return Poll::Ready(Ok(false)),
                Poll::Pending => break,
            }
        }
        let queued = queue.len();
        // Once the queue is written, the stream's own buffer too (TLS records; nothing for
        // TCP): an answer's last bytes, or a streamed body's latest, go out without waiting.
        let flushed = match queue.poll_flush(&mut *io, cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut *io).poll_flush(cx),
            other => other,
        };
        if let Poll::Ready(Err(e)) = flushed {
            return Poll::Ready(Err::<bool, io::Error>(e));
        }
        progressed |= queue.len() < queued;
        if body_done && flushed.is_ready() {
            return Poll::Ready(Ok(true));
        }
        if !progressed {
            return Poll::Pending;
        }
    })
    .await?;
    if !ended {
        return Ok(false);
    }
    match framing {
        Framing::Length(n) if sent != n => Ok(false),
        _ => Ok(!close),
    }
}

/// Writes `content-length: n` (in decimal, without an allocation).
fn write_length(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(b"content-length: ");
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
    out.extend_from_slice(b"\r\n");
}

/// Hop-by-hop answer headers that never leave the edge (`Connection` is handled apart).
fn is_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "keep-alive"
            | "transfer-encoding"
            | "upgrade"
            | "te"
            | "trailer"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::listener::{serve, ListenerConfig};
    use http_body_util::BodyExt;
    use hyper::body::{Frame, Incoming};
    use hyper::Request;
    use std::net::SocketAddr;
    use std::time::Instant;
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::watch;

    fn takes(raw: &str) -> bool {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(raw.as_bytes()) {
            Ok(httparse::Status::Complete(_)) => fast_head(&req).is_some(),
            other => panic!("{raw:?} did not parse: {other:?}"),
        }
    }

    #[test]
    fn heads_the_fast_path_takes_and_leaves_to_hyper() {
        let taken = [
            "GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            "HEAD /x?y=1&z=%20 HTTP/1.1\r\nhost: a\r\nAccept: */*\r\n\r\n",
            "GET /a/b;c=d@e:f HTTP/1.1\r\nHOST: a\r\nConnection:  Keep-Alive \r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.2.3.4\r\nX-Request-Id: r\r\n\r\n",
        ];
        for raw in taken {
            assert!(takes(raw), "{raw:?}");
        }
        let left = [
            // Methods, versions and targets.
            "POST / HTTP/1.1\r\nHost: a\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
            "get / HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.0\r\nHost: a\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /a#b HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /a\"b HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /a{b} HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /a\\b HTTP/1.1\r\nHost: a\r\n\r\n",
            // Hosts.
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: \r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            // Framing, expectations, upgrades and hop-by-hop headers.
            "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, x-secret\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nTE: trailers\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nKeep-Alive: timeout=5\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nProxy-Authorization: x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX-Sandboxd-Bad-Framing: 1\r\n\r\n",
        ];
        for raw in left {
            assert!(!takes(raw), "{raw:?}");
        }
    }

    /// Serves `fast.test` on the fast path (but `/fallback`, which gives the request back,
    /// `/panic`, and `/chunked`, an answer of unknown size); hyper's path answers the rest,
    /// saying so.
    struct Both;

    impl Handler for Both {
        fn handle(
            &self,
            req: Request<Incoming>,
            _conn: Arc<ConnInfo>,
            _host: Option<super::super::router::RequestHost>,
        ) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>> {
            Box::pin(async move {
                let line = format!("hyper {} {}", req.method(), req.uri());
                let body = req.into_body().collect().await.map(|b| b.to_bytes().len());
                crate::http::full(format!("{line} body={}", body.unwrap_or(0))).pipe_response()
            })
        }

        fn has_fast_path(&self, _tls: bool) -> bool {
            true
        }

        fn fast(&self, head: &FastHead<'_>, _conn: &Arc<ConnInfo>) -> Option<FastFuture> {
            if head.host != b"fast.test" {
                return None;
            }
            let line = format!("fast {} {}", head.method, head.target);
            Some(match head.target {
                "/fallback" => Box::pin(async { FastAnswer::Fallback }),
                "/panic" => Box::pin(async { panic!("a handler bug") }),
                "/big" => Box::pin(async {
                    // 1 MiB in 64 KiB frames, of a known size.
                    let frames = futures_util::stream::iter((0..16u8).map(|i| {
                        Ok::<_, crate::http::BoxError>(Frame::data(Bytes::from(vec![i; 64 << 10])))
                    }));
                    let mut resp = Response::new(http_body_util::StreamBody::new(frames).boxed());
                    resp.headers_mut().insert(
                        header::CONTENT_LENGTH,
                        hyper::header::HeaderValue::from_static("1048576"),
                    );
                    FastAnswer::Answer(resp)
                }),
                "/lines" => Box::pin(async {
                    FastAnswer::Lines(LinesAnswer {
                        status: StatusCode::CREATED,
                        lines: Bytes::from_static(
                            b"X-App: a\r\nDate: Thu, 03 Dec 2026 10:00:00 GMT\r\n",
                        ),
                        length: Some(5),
                        has_date: true,
                        request_id: Some(header::HeaderValue::from_static("rid-1")),
                        body: crate::http::full("lines"),
                    })
                }),
                "/lines-unsized" => Box::pin(async {
                    let frames = futures_util::stream::iter([
                        Ok::<_, crate::http::BoxError>(Frame::data(Bytes::from("un"))),
                        Ok(Frame::data(Bytes::from("sized"))),
                    ]);
                    FastAnswer::Lines(LinesAnswer {
                        status: StatusCode::OK,
                        lines: Bytes::from_static(b"x-app: b\r\n"),
                        length: None,
                        has_date: false,
                        request_id: None,
                        body: http_body_util::StreamBody::new(frames).boxed(),
                    })
                }),
                // One frame now, the rest never: what a streamed answer (events, a long
                // poll) looks like between its frames.
                "/stream" => Box::pin(async {
                    use futures_util::StreamExt;
                    let frames = futures_util::stream::iter([Ok::<_, crate::http::BoxError>(
                        Frame::data(Bytes::from("first")),
                    )])
                    .chain(futures_util::stream::pending());
                    let body = BodyExt::boxed(http_body_util::StreamBody::new(frames));
                    FastAnswer::Answer(Response::new(body))
                }),
                "/chunked" => Box::pin(async {
                    let frames = futures_util::stream::iter([
                        Ok::<_, crate::http::BoxError>(Frame::data(Bytes::from("hello "))),
                        Ok(Frame::data(Bytes::from("world"))),
                    ]);
                    let body = http_body_util::StreamBody::new(frames).boxed();
                    FastAnswer::Answer(Response::new(body))
                }),
                _ => {
                    Box::pin(
                        async move { FastAnswer::Answer(crate::http::full(line).pipe_response()) },
                    )
                }
            })
        }
    }

    trait PipeResponse {
        fn pipe_response(self) -> Response<Body>;
    }

    impl PipeResponse for Body {
        fn pipe_response(self) -> Response<Body> {
            let mut resp = Response::new(self);
            resp.headers_mut()
                .insert("x-test", hyper::header::HeaderValue::from_static("1"));
            resp
        }
    }

    struct Server {
        addr: SocketAddr,
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<anyhow::Result<()>>,
    }

    async fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, rx) = watch::channel(false);
        let cfg = ListenerConfig {
            header_read_timeout: Duration::from_secs(1),
            ..ListenerConfig::default()
        };
        let task = tokio::spawn(serve(
            listener,
            None,
            Arc::new(Both),
            cfg,
            rx,
            Duration::from_secs(2),
        ));
        Server { addr, stop, task }
    }

    /// One answer off `s`: its head (lowercased) and its body (de-chunked), reading whole
    /// answers only; `None` when the connection closed first.
    /// Sends `req` on `s` and reads its answer.
    async fn ask(
        s: &mut TcpStream,
        rest: &mut Vec<u8>,
        req: &str,
        head_req: bool,
    ) -> (String, Vec<u8>) {
        s.write_all(req.as_bytes()).await.expect("write");
        answer(s, rest, head_req).await.expect("answer")
    }

    async fn answer(
        s: &mut TcpStream,
        rest: &mut Vec<u8>,
        head_req: bool,
    ) -> Option<(String, Vec<u8>)> {
        async fn fill(s: &mut TcpStream, rest: &mut Vec<u8>) -> Option<()> {
            let mut b = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
                .await
                .expect("an answer in time")
                .ok()?;
            (n > 0).then(|| rest.extend_from_slice(&b[..n]))
        }
        let end = loop {
            if let Some(p) = rest.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            fill(s, rest).await?;
        };
        let head = String::from_utf8_lossy(&rest[..end]).to_lowercase();
        rest.drain(..end);
        let field = |name: &str| {
            head.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}: ")).map(str::to_owned))
        };
        let mut body = Vec::new();
        if head_req {
        } else if let Some(n) = field("content-length") {
            let n: usize = n.parse().expect("length");
            while rest.len() < n {
                fill(s, rest).await?;
            }
            body = rest.drain(..n).collect();
        } else if field("transfer-encoding").as_deref() == Some("chunked") {
            loop {
                let line_end = loop {
                    if let Some(p) = rest.windows(2).position(|w| w == b"\r\n") {
                        break p;
                    }
                    fill(s, rest).await?;
                };
                let size = usize::from_str_radix(
                    std::str::from_utf8(&rest[..line_end]).expect("size"),
                    16,
                )
                .expect("hex size");
                while rest.len() < line_end + 2 + size + 2 {
                    fill(s, rest).await?;
                }
                body.extend_from_slice(&rest[line_end + 2..line_end + 2 + size]);
                rest.drain(..line_end + 2 + size + 2);
                if size == 0 {
                    break;
                }
            }
        }
        Some((head, body))
    }

    fn get(path: &str, host: &str) -> String {
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n")
    }

    async fn closed(s: &mut TcpStream, within: Duration) -> bool {
        let mut b = [0u8; 1024];
        let started = Instant::now();
        while started.elapsed() < within {
            match tokio::time::timeout(within, s.read(&mut b)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
                Err(_) => return false,
            }
        }
        false
    }

    #[tokio::test]
    async fn keep_alive_requests_stay_fast_until_one_is_hyper_s() {
        let server = start().await;
        let mut s = TcpStream::connect(server.addr).await.expect("connect");
        let mut rest = Vec::new();
        for path in ["/a", "/b?c=1"] {
            let (head, body) = ask(&mut s, &mut rest, &get(path, "fast.test"), false).await;
            assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
            assert!(head.contains("x-test: 1\r\n"), "{head}");
            assert!(head.contains("\r\ndate: "), "{head}");
            assert_eq!(body, format!("fast GET {path}").as_bytes());
        }
        s.write_all(b"HEAD /h HTTP/1.1\r\nHost: fast.test\r\n\r\n")
            .await
            .expect("write");
        let (head, body) = answer(&mut s, &mut rest, true).await.expect("answer");
        assert!(head.contains("content-length: 12\r\n"), "{head}");
        assert!(body.is_empty());
        // A body: hyper's, and the connection stays with hyper.
        s.write_all(b"POST /p HTTP/1.1\r\nHost: fast.test\r\nContent-Length: 3\r\n\r\nabc")
            .await
            .expect("write");
        let (_, body) = answer(&mut s, &mut rest, false).await.expect("answer");
        assert_eq!(body, b"hyper POST /p body=3");
        let (_, body) = ask(&mut s, &mut rest, &get("/after", "fast.test"), false).await;
        assert_eq!(body, b"hyper GET /after body=0");
        let _ = server.stop.send(true);
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order_across_the_hand_over() {
        let server = start().await;
        let mut s = TcpStream::connect(server.addr).await.expect("connect");
        let all = [
            get("/1", "fast.test"),
            get("/2", "fast.test"),
            get("/3", "other.test"),
            get("/4", "fast.test"),
        ]
        .concat();
        s.write_all(all.as_bytes()).await.expect("write");
        let mut rest = Vec::new();
        let mut bodies = Vec::new();
        for _ in 0..4 {
            let (_, body) = answer(&mut s, &mut rest, false).await.expect("answer");
            bodies.push(String::from_utf8(body).expect("text"));
        }
        assert_eq!(
            bodies,
            [
                "fast GET /1",
                "fast GET /2",
                "hyper GET /3 body=0",
                "hyper GET /4 body=0"
            ]
        );
        let _ = server.stop.send(true);
    }

    #[tokio::test]
    async fn ambiguous_framing_is_refused_as_on_hyper_s_path() {
        let server = start().await;
        let mut s = TcpStream::connect(server.addr).await.expect("connect");
        let mut rest = Vec::new();
        s.write_all(get("/a", "fast.test").as_bytes())
            .await
            .expect("write");
        answer(&mut s, &mut rest, false).await.expect("answer");
        let smuggled = "GET / HTTP/1.1\r\nHost: fast.test\r\nContent-Length: 4\r\n\
                        Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\
                        Host: fast.test\r\n\r\n";
        s.write_all(smuggled.as_bytes()).await.expect("write");
        let (head, body) = answer(&mut s, &mut rest, false).await.expect("answer");
        assert!(head.starts_with("http/1.1 400"), "{head}");
        assert!(String::from_utf8_lossy(&body).contains("bad_framing"));
        // Nothing after it is answered.
        assert!(answer(&mut s, &mut rest, false).await.is_none());
        let _ = server.stop.send(true);
    }

    #[tokio::test]
    async fn given_back_panicking_and_unsized_answers() {
        let server = start().await;
        let mut s = TcpStream::connect(server.addr).await.expect("connect");
        let mut rest = Vec::new();
        let (_, body) = ask(&mut s, &mut rest, &get("/fallback", "fast.test"), false).await;
        assert_eq!(body, b"hyper GET /fallback body=0");

        let mut s = TcpStream::connect(server.addr).await.expect("connect");
        let mut rest = Vec::new();
        let (head, body) = ask(&mut s, &mut rest, &get("/panic", "fast.test"), false).await;
        assert!(head.starts_with("http/1.1 500"), "{head}");
        assert!(String::from_utf8_lossy(&body).contains("\"internal\""));
        let (head, body) = ask(&mut s, &mut rest, &get("/chunked", "fast.test"), false).await;
        assert!(head.contains("transfer-encoding: chunked\r\n"), "{head}");
        assert_eq!(body, b"hello world");
        let (_, body) = ask(&mut s, &mut rest, &get("/still", "fast.test"), false).await;
        assert_eq!(body, b"fast GET /still");
        let _ = server.stop.send(true);
    }

    #[tokio::test]
    async fn answers_given_as_lines_are_written_as_they_are() {
        let server = start().await;
        let mut s = TcpStream::connect(server.addr).await.expect("connect");
        let mut rest = Vec::new();
        let (head, body) = ask(&mut s, &mut rest, &get("/lines", "fast.test"), false).await;
        assert_eq!(
            head,
            "http/1.1 201 created\r\nx-app: a\r\ndate: thu, 03 dec 2026 10:00:00 gmt\r\n\
             x-request-id: rid-1\r\ncontent-length: 5\r\n\r\n"
        );
        assert_eq!(body, b"lines");
        // A HEAD's answer says the length and carries no body.
        s.write_all(
            get("/lines", "fast.test")
                .replacen("GET", "HEAD", 1)
                .as_bytes(),
        )
        .await
        .expect("write");
        let (head, body) = answer(&mut s, &mut rest, true).await.expect("answer");
        assert!(head.contains("content-length: 5\r\n"), "{head}");
        assert!(body.is_empty());
        // No length and no date: chunked, with a date added; the connection goes on.
        let (head, body) = ask(
            &mut s,
            &mut rest,
            &get("/lines-unsized", "fast.test"),
            false,
        )
        .await;
        assert!(head.starts_with("http/1.1 200 ok\r\ndate: "), "{head}");
        assert!(
            head.contains("\r\nx-app: b\r\ntransfer-encoding: chunked\r\n"),
            "{head}"
        );
        assert_eq!(body, b"unsized");
        let (_, body) = ask(&mut s, &mut rest, &get("/still", "fast.test"), false).await;
        assert_eq!(body, b"fast GET /still");
        let _ = server.stop.send(true);
    }

    #[test]
    fn lengths_are_written_in_decimal() {
        for n in [0u64, 7, 10, 1_048_576, u64::MAX] {
            let mut out = Vec::new();
            write_length(&mut out, n);
            assert_eq!(out, format!("content-length: {n}\r\n").as_bytes());
        }
    }

    #[tokio::test]
    async fn large_answers_stream_whole_to_a_slow_reader() {
        let server = start().await;
        let mut s = TcpStream::connect(server.addr).await.expect("connect");
        let mut rest = Vec::new();
        for _ in 0..2 {
            s.write_all(get("/big", "fast.test").as_bytes())
                .await
                .expect("write");
            // Read slowly at first: the edge queues ahead, then the sockets hold the rest.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let (head, body) = answer(&mut s, &mut rest, false).await.expect("answer");
            assert!(head.contains("content-length: 1048576\r\n"), "{head}");
            assert_eq!(body.len(), 1 << 20);
            for (i, chunk) in body.chunks(64 << 10).enumerate() {
                assert!(chunk.iter().all(|&b| usize::from(b) == i), "frame {i}");
            }
        }
        let _ = server.stop.send(true);
    }

    #[tokio::test]
    async fn slow_heads_are_cut_off_and_drain_closes_idle_connections() {
        let server = start().await;
        let mut slow = TcpStream::connect(server.addr).await.expect("connect");
        slow.write_all(b"GET / HTTP/1.1\r\nHost: fa")
            .await
            .expect("write");
        let started = Instant::now();
        assert!(
            closed(&mut slow, Duration::from_secs(4)).await,
            "slow head kept"
        );
        let took = started.elapsed();
        assert!(took < Duration::from_millis(2500), "{took:?}");

        let mut idle = TcpStream::connect(server.addr).await.expect("connect");
        let mut rest = Vec::new();
        idle.write_all(get("/a", "fast.test").as_bytes())
            .await
            .expect("write");
        answer(&mut idle, &mut rest, false).await.expect("answer");
        let _ = server.stop.send(true);
        let started = Instant::now();
        assert!(closed(&mut idle, Duration::from_secs(2)).await, "idle kept");
        assert!(started.elapsed() < Duration::from_millis(900));
        tokio::time::timeout(Duration::from_secs(3), server.task)
            .await
            .expect("the listener ended")
            .expect("task")
            .expect("served");
    }

    #[tokio::test]
    async fn http2_prior_knowledge_goes_to_hyper() {
        let server = start().await;
        let stream = TcpStream::connect(server.addr).await.expect("connect");
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .expect("h2 handshake");
        tokio::spawn(conn);
        let req = Request::get("http://fast.test/x")
            .body(http_body_util::Empty::<Bytes>::new())
            .expect("request");
        let resp = sender.send_request(req).await.expect("response");
        assert_eq!(resp.version(), hyper::Version::HTTP_2);
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(body, "hyper GET http://fast.test/x body=0");
        let _ = server.stop.send(true);
    }

    /// A connection's facts: TLS with server name `sni`, or plain without one.
    fn conn_with(sni: Option<&str>) -> ConnInfo {
        ConnInfo {
            peer: "127.0.0.1:1".parse().unwrap(),
            local: "127.0.0.1:2".parse().unwrap(),
            tls: sni.is_some(),
            sni: sni.map(str::to_owned),
            alpn_h2: false,
        }
    }

    #[test]
    fn a_host_other_than_the_server_name_is_misdirected() {
        let tls = conn_with(Some("user-1.preview.test"));
        assert!(!misdirected(b"user-1.preview.test", &tls));
        assert!(!misdirected(b"USER-1.preview.test:8443", &tls));
        assert!(misdirected(b"user-2.preview.test", &tls));
        assert!(misdirected(b"\xff", &tls));
        // Without a server name (plain, or TLS without SNI) there is nothing to differ from.
        assert!(!misdirected(b"anything", &conn_with(None)));
    }

    /// A stream that holds what is written until it is flushed, as a TLS stream holds records.
    struct HoldsUntilFlushed {
        inner: tokio::io::DuplexStream,
        held: Vec<u8>,
    }

    impl AsyncRead for HoldsUntilFlushed {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for HoldsUntilFlushed {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.get_mut().held.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(
            self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            while !this.held.is_empty() {
                let n = std::task::ready!(Pin::new(&mut this.inner).poll_write(cx, &this.held))?;
                this.held.drain(..n);
            }
            Pin::new(&mut this.inner).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> Poll<io::Result<()>> {
            std::task::ready!(self.as_mut().poll_flush(cx))?;
            Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
        }
    }

    /// Over a stream that buffers (TLS), an answer's bytes go out when they are ready: the
    /// first frame of a streamed body arrives while the rest is still to come, and a whole
    /// answer arrives without the client sending anything more.
    #[tokio::test]
    async fn answers_are_flushed_through_a_buffering_stream() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let conn = Arc::new(conn_with(Some("fast.test")));
        let serving = tokio::spawn(async move {
            let mut io = HoldsUntilFlushed {
                inner: server,
                held: Vec::new(),
            };
            super::serve(
                &mut io,
                &conn,
                &Both,
                Duration::from_secs(5),
                16 * 1024,
                |_| false,
            )
            .await;
        });
        let mut client = client;
        let mut seen = Vec::new();
        let mut read_until = async |client: &mut tokio::io::DuplexStream, want: &str| {
            let mut b = [0u8; 4096];
            while !String::from_utf8_lossy(&seen).contains(want) {
                let n = tokio::time::timeout(Duration::from_secs(2), client.read(&mut b))
                    .await
                    .unwrap_or_else(|_| panic!("{want:?} not out: {seen:?}"))
                    .expect("read");
                assert!(n > 0, "closed before {want:?}");
                seen.extend_from_slice(&b[..n]);
            }
        };
        client
            .write_all(get("/a", "fast.test").as_bytes())
            .await
            .expect("write");
        read_until(&mut client, "fast GET /a").await;
        client
            .write_all(get("/stream", "fast.test").as_bytes())
            .await
            .expect("write");
        read_until(&mut client, "first").await;
        serving.abort();
    }
}
