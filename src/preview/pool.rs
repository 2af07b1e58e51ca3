//! The upstream HTTP/1.1 connection pool of plain preview requests, driven inside the request.
//!
//! The client is our own and small (`pool/h1.rs` has the wire format): an upstream connection
//! is a socket and a read buffer, with no task, no channel and no driver. The request's future
//! writes the request head (and a small body) in one write and reads the answer's head; the
//! response body ([`PooledBody`]) then reads and decodes the rest as the client's connection
//! takes it, so one task does the whole exchange. hyper's client did the same work through a
//! dispatch channel, a state machine and a oneshot per request. Once the body has ended cleanly
//! (its framing complete, the app keeping the connection, the whole request sent, no byte
//! past the answer) the connection goes back to the pool; anything else closes it. A
//! connection the app closed while it sat idle is found out at the next checkout (it is
//! readable: end of file) and dropped. Idle connections expire after `idle_timeout` (under
//! Node's 5 s keep-alive, so the pool never reuses a socket the app is closing), at most
//! `max_idle_per_host` are kept per address, and a sweeper task drops expired ones while no
//! request comes. Those to a sandbox that is about to stop are closed at once
//! ([`Pool::closer`]), while the app can still answer their FIN.

use std::collections::HashMap;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use hyper::body::{Body as _, Frame, SizeHint};
use hyper::http::request::Parts;
use hyper::{Method, Response};
use tokio::net::TcpStream;

use crate::http::wire::WriteQueue;
use crate::http::Body;

mod h1;

pub(super) use h1::{encode_fast_head, Forwarded, Lines, MAX_CHAIN};

/// The first read buffer of an exchange; it doubles while reads fill it, up to [`READ_MAX`].
const READ_MIN: usize = 8 * 1024;
const READ_MAX: usize = 64 * 1024;

/// Why no answer came from the upstream.
#[derive(Debug)]
pub(super) enum UpstreamError {
    /// No connection could be made (refused, unreachable, timed out): nothing was sent.
    Connect(std::io::Error),
    /// The app closed or reset a connection made for this request before a byte of the answer
    /// came. A server that is starting does this: Vite, for one, listens once and closes again
    /// to check its port before it listens for good (a connection made in between is reset).
    Dropped(std::io::Error),
    /// The exchange failed after the request was handed to a connection (an I/O error, or an
    /// answer that is not valid HTTP/1.x: `InvalidData`).
    Http(std::io::Error),
}

impl UpstreamError {
    pub(super) fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Connect(_))
    }

    /// [`UpstreamError::Dropped`].
    pub(super) fn is_dropped(&self) -> bool {
        matches!(self, UpstreamError::Dropped(_))
    }
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::Connect(e) => write!(f, "connecting to the app: {e}"),
            UpstreamError::Dropped(e) => {
                write!(f, "the app dropped a new connection unanswered: {e}")
            }
            UpstreamError::Http(e) => write!(f, "upstream exchange: {e}"),
        }
    }
}

/// One upstream connection: its socket and the bytes read from it and not used yet (none while
/// it is idle: a connection is pooled only when its last answer ended exactly).
pub(super) struct Conn {
    io: TcpStream,
    rbuf: BytesMut,
    /// The next read's buffer size (see [`READ_MIN`]).
    read_size: usize,
    addr: SocketAddr,
    /// Taken from the pool rather than made for this request.
    reused: bool,
}

/// An answer to [`Pool::send_bodyless`]: its status, header lines and body.
pub(super) struct RawResponse {
    pub(super) status: hyper::StatusCode,
    pub(super) lines: Lines,
    pub(super) body: PooledBody,
}

/// A failed exchange; `retry` when nothing was sent (the app had closed the reused
/// connection), so the request can go on another one; `dropped` when the connection was made
/// for it and the app closed or reset it before a byte of the answer ([`UpstreamError::Dropped`]).
struct SendError {
    err: io::Error,
    retry: bool,
    dropped: bool,
}

/// What an exchange gives the response body.
struct Answer {
    head: h1::Head,
    /// The request went out whole (its body too): else the connection cannot be reused.
    sent_all: bool,
}

impl Conn {
    fn new(io: TcpStream, addr: SocketAddr) -> Conn {
        Conn {
            io,
            rbuf: BytesMut::new(),
            read_size: READ_MIN,
            addr,
            reused: false,
        }
    }

    /// Whether an idle connection is still open: the app has neither closed it nor sent
    /// anything unasked. Costs no system call while the socket is known not to be readable.
    fn alive(&mut self, cx: &mut Context<'_>) -> bool {
        match self.io.poll_read_ready(cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Reads what the socket has into `rbuf`; `Ok(0)` at the app's close.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.rbuf.capacity() - self.rbuf.len() < self.read_size / 2 {
            self.rbuf.reserve(self.read_size);
        }
        loop {
            // The read is tried first: `try_io` runs it only while the socket is known readable,
            // and the readiness (and the task's waker) is polled only once it is not.
            // A short read emptied the socket's receive queue: `try_io` is then told
            // `WouldBlock`, so it forgets the readiness it saw before the read, as after a read
            // that found nothing. An idle connection is so known clean without a system call
            // ([`Conn::alive`]). Bytes (or the app's close) that arrive after the read raise a
            // newer readiness, which this does not clear; a close seen with the bytes is kept
            // (tokio never clears a closed state).
            let fd = self.io.as_raw_fd();
            let spare = self.rbuf.spare_capacity_mut();
            let room = spare.len();
            let mut got = None;
            let res = self.io.try_io(tokio::io::Interest::READABLE, || {
                // SAFETY: `spare` is `room` writable bytes of `rbuf`'s allocation, borrowed
                // for the call; `recv` writes at most `room` bytes there.
                let n = unsafe { libc::recv(fd, spare.as_mut_ptr().cast(), room, 0) };
                let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
                got = Some(n);
                if n > 0 && n < room {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(n)
            });
            if let Some(n) = got {
                // SAFETY: `recv` initialized these `n` bytes just past the length.
                unsafe { self.rbuf.set_len(self.rbuf.len() + n) };
                if n == room && self.read_size < READ_MAX {
                    self.read_size *= 2;
                }
                return Poll::Ready(Ok(n));
            }
            match res {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.io.poll_read_ready(cx))?;
                }
                Err(e) => return Poll::Ready(Err(e)),
                Ok(n) => return Poll::Ready(Ok(n)),
            }
        }
    }

    /// Sends the request (its encoded `head`, then `body` as it comes, framed as `framing`
    /// says) and reads the response head meanwhile (`head_req`: the request is a HEAD, whose
    /// answer has no body). An answer that comes before the request body has all gone stops
    /// the sending (the connection is then not reused).
    async fn exchange(
        &mut self,
        head: Bytes,
        framing: h1::ReqFraming,
        head_req: bool,
        out_as: h1::HeadAs,
        body: &mut Body,
    ) -> Result<Answer, SendError> {
        let fail = |err| SendError {
            err,
            retry: false,
            dropped: false,
        };
        let body_empty = body.is_end_stream();
        let mut out = WriteQueue::default();
        out.push(head);
        // Request body bytes still owed (Length), or whether the body is still to be read.
        let mut body_open = !body_empty;
        let mut owed = match framing {
            h1::ReqFraming::Length(n) => n,
            _ => 0,
        };
        if !body_open && owed != 0 {
            return Err(fail(h1::invalid("request body shorter than its length")));
        }
        let mut body_touched = false;
        let mut wrote = false;
        let mut write_failed: Option<io::Error> = None;
        // Bytes came in that the head parser has not seen.
        let mut unparsed = !self.rbuf.is_empty();
        let mut answered = unparsed;
        let reused = self.reused;
        poll_fn(|cx| loop {
            // The request: write what is queued, then take the next body frame.
            if write_failed.is_none() {
                match out.poll_flush(&mut self.io, cx) {
                    Poll::Ready(Ok(())) => wrote = true,
                    Poll::Ready(Err(e)) if reused && !wrote && !body_touched => {
                        return Poll::Ready(Err(SendError {
                            err: e,
                            retry: true,
                            dropped: false,
                        }));
                    }
                    Poll::Ready(Err(e)) => write_failed = Some(e),
                    Poll::Pending => {}
                }
                if out.is_empty() && body_open && write_failed.is_none() {
                    match Pin::new(&mut *body).poll_frame(cx) {
                        Poll::Ready(Some(Ok(frame))) => {
                            body_touched = true;
                            if let Ok(data) = frame.into_data() {
                                if !data.is_empty() {
                                    match framing {
                                        h1::ReqFraming::Chunked => out.push_chunk(data),
                                        _ => {
                                            if data.len() as u64 > owed {
                                                return Poll::Ready(Err(fail(h1::invalid(
                                                    "request body longer than its length",
                                                ))));
                                            }
                                            owed -= data.len() as u64;
                                            out.push(data);
                                        }
                                    }
                                }
                            }
                            // Trailers are not forwarded.
                            continue;
                        }
                        Poll::Ready(None) => {
                            body_open = false;
                            if framing == h1::ReqFraming::Chunked {
                                out.push_last_chunk();
                            } else if owed != 0 {
                                return Poll::Ready(Err(fail(h1::invalid(
                                    "request body shorter than its length",
                                ))));
                            }
                            continue;
                        }
                        Poll::Ready(Some(Err(e))) => {
                            return Poll::Ready(Err(fail(io::Error::other(e))));
                        }
                        Poll::Pending => {}
                    }
                }
            }
            // The answer.
            while unparsed && !self.rbuf.is_empty() {
                match h1::parse_head(&mut self.rbuf, head_req, out_as).map_err(fail)? {
                    h1::Parsed::Partial => unparsed = false,
                    h1::Parsed::Interim(n) => {
                        let _ = self.rbuf.split_to(n);
                    }
                    h1::Parsed::Done(head) => {
                        let sent_all = write_failed.is_none() && !body_open && out.is_empty();
                        return Poll::Ready(Ok(Answer { head, sent_all }));
                    }
                }
            }
            let err = match self.poll_read(cx) {
                Poll::Ready(Ok(0)) => write_failed.take().unwrap_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the app closed the connection before answering",
                    )
                }),
                Poll::Ready(Ok(_)) => {
                    unparsed = true;
                    answered = true;
                    continue;
                }
                Poll::Ready(Err(err)) => err,
                Poll::Pending => return Poll::Pending,
            };
            // Dropped: nothing of an answer came on a connection made for this request.
            return Poll::Ready(Err(SendError {
                err,
                retry: false,
                dropped: !reused && !answered,
            }));
        })
        .await
    }
}

thread_local! {
    /// An edge thread's own pool (see [`Pool::here`]); dropped, with its idle connections,
    /// when the thread ends.
    static LOCAL: std::cell::OnceCell<Pool> = const { std::cell::OnceCell::new() };
}

struct Idle {
    conn: Conn,
    since: Instant,
}

struct Inner {
    /// Keyed by sandbox addresses the manager owns (never client input): a cheap hasher serves.
    idle: Mutex<HashMap<SocketAddr, Vec<Idle>, foldhash::fast::RandomState>>,
    idle_timeout: Duration,
    max_idle_per_host: usize,
    connect_timeout: Duration,
    /// A sweeper task runs (started with the first connection, inside a runtime).
    sweeping: std::sync::atomic::AtomicBool,
    /// The edge threads' own pools made from this one ([`Pool::here`]), which its
    /// [`closer`](Pool::closer) reaches too.
    threads: Mutex<Vec<std::sync::Weak<Inner>>>,
}

/// The pool (cheap to clone: one shared set of idle connections).
#[derive(Clone)]
pub(super) struct Pool(Arc<Inner>);

impl Pool {
    pub(super) fn new(
        idle_timeout: Duration,
        max_idle_per_host: usize,
        connect_timeout: Duration,
    ) -> Pool {
        Pool(Arc::new(Inner {
            idle: Mutex::new(HashMap::default()),
            idle_timeout,
            max_idle_per_host,
            connect_timeout,
            sweeping: std::sync::atomic::AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
        }))
    }

    /// The pool to use from the calling thread: on an edge thread (`edge/percore.rs`) that
    /// thread's own pool, with the same settings, so a request never takes a connection whose
    /// socket another thread's runtime drives; elsewhere this one.
    pub(super) fn here(&self) -> Pool {
        if !crate::edge::percore::on_edge_thread() {
            return self.clone();
        }
        LOCAL.with(|local| local.get_or_init(|| self.for_thread()).clone())
    }

    /// A new pool with this one's settings, which this one's [`closer`](Pool::closer) reaches.
    fn for_thread(&self) -> Pool {
        let own = Pool::new(
            self.0.idle_timeout,
            self.0.max_idle_per_host,
            self.0.connect_timeout,
        );
        let mut threads = self.0.threads.lock().unwrap_or_else(|e| e.into_inner());
        threads.retain(|t| t.strong_count() > 0);
        threads.push(Arc::downgrade(&own.0));
        own
    }

    /// Sends `req` to `addr` (see [`send_head`](Pool::send_head)).
    #[cfg(test)]
    pub(super) async fn send(
        &self,
        addr: SocketAddr,
        req: hyper::Request<Body>,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        let (head, body) = req.into_parts();
        self.send_head(addr, &head, None, body).await
    }

    /// Sends the request `head` with `body` to `addr` on an idle connection, or a new one (the
    /// head is only read: a caller that may send it again keeps it, no copy). A request that a
    /// reused connection did not take (the app had closed it) is sent again on another one;
    /// any other failure is returned. The response's body keeps the connection until it ends.
    pub(super) async fn send_head(
        &self,
        addr: SocketAddr,
        head: &Parts,
        fwd: Option<&Forwarded<'_>>,
        body: Body,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        let mut wire = Vec::with_capacity(256);
        let framing = h1::encode_head(
            head,
            fwd,
            body.is_end_stream(),
            body.size_hint().exact(),
            &mut wire,
        )
        .map_err(UpstreamError::Http)?;
        let head_req = head.method == Method::HEAD;
        let wire = Bytes::from(wire);
        self.send_encoded(addr, wire, framing, head_req, h1::HeadAs::Map, body)
            .await
            .map(|(resp, _)| resp)
    }

    /// [`send_head`](Pool::send_head) of a bodyless request whose head is already encoded
    /// (`h1::encode_fast_head`, the edge's fast path), answered with the app's header lines as
    /// they are (no `HeaderMap` is made, see [`Lines`]).
    pub(super) async fn send_bodyless(
        &self,
        addr: SocketAddr,
        wire: Bytes,
        head_req: bool,
    ) -> Result<RawResponse, UpstreamError> {
        let body = crate::http::empty();
        let framing = h1::ReqFraming::Empty;
        let (resp, lines) = self
            .send_encoded(addr, wire, framing, head_req, h1::HeadAs::Lines, body)
            .await?;
        let lines = lines.ok_or_else(|| UpstreamError::Http(h1::invalid("no header lines")))?;
        Ok(RawResponse {
            status: resp.status(),
            lines,
            body: resp.into_body(),
        })
    }

    async fn send_encoded(
        &self,
        addr: SocketAddr,
        wire: Bytes,
        framing: h1::ReqFraming,
        head_req: bool,
        out_as: h1::HeadAs,
        mut body: Body,
    ) -> Result<(Response<PooledBody>, Option<Lines>), UpstreamError> {
        loop {
            let mut conn = match self.checkout(addr).await {
                Some(c) => c,
                // Boxed: a new connection is the rare case, and its future (connect)
                // would otherwise make every request's future larger.
                None => Box::pin(self.connect(addr)).await?,
            };
            match conn
                .exchange(wire.clone(), framing, head_req, out_as, &mut body)
                .await
            {
                Ok(mut answer) => {
                    let lines = answer.head.lines.take();
                    return Ok((PooledBody::start(conn, answer, &self.0), lines));
                }
                // Not sent: the idle connection had been closed by the app meanwhile.
                Err(e) if e.retry => continue,
                Err(e) if e.dropped => return Err(UpstreamError::Dropped(e.err)),
                Err(e) => return Err(UpstreamError::Http(e.err)),
            }
        }
    }

    /// The freshest idle connection to `addr` that can still take a request.
    async fn checkout(&self, addr: SocketAddr) -> Option<Conn> {
        loop {
            let mut conn = {
                let mut idle = self.0.idle.lock().unwrap_or_else(|e| e.into_inner());
                let list = idle.get_mut(&addr)?;
                let now = Instant::now();
                let found = match list.pop() {
                    Some(i) if now.duration_since(i.since) < self.0.idle_timeout => Some(i.conn),
                    // Older ones lie below it and expired too.
                    Some(_) => {
                        list.clear();
                        None
                    }
                    None => None,
                };
                // An emptied list stays (with its room) for the checkin that usually follows
                // soon: one lookup and no allocation then. The sweeper drops empty lists.
                found?
            };
            if poll_fn(|cx| Poll::Ready(conn.alive(cx))).await {
                conn.reused = true;
                return Some(conn);
            }
        }
    }

    async fn connect(&self, addr: SocketAddr) -> Result<Conn, UpstreamError> {
        let stream = tokio::time::timeout(self.0.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                UpstreamError::Connect(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connect timed out",
                ))
            })?
            .map_err(UpstreamError::Connect)?;
        let _ = stream.set_nodelay(true);
        self.start_sweeper();
        Ok(Conn::new(stream, addr))
    }

    fn start_sweeper(&self) {
        use std::sync::atomic::Ordering;
        if self.0.sweeping.load(Ordering::Relaxed) || self.0.sweeping.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.0.sweeping.store(false, Ordering::Release);
            return;
        };
        let pool = Arc::downgrade(&self.0);
        let every = self.0.idle_timeout.max(Duration::from_millis(100));
        rt.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(inner) = pool.upgrade() else { return };
                // Dropped outside the lock: closing sockets is not free.
                let expired = inner.sweep(Instant::now());
                drop(inner);
                drop(expired);
            }
        });
    }

    /// A function that closes the idle connections to any port of an address (its sandbox is
    /// about to stop, see `Manager::on_stopping`), so that they end while the app can still
    /// answer: in this pool and in every edge thread's pool made from it. It does not keep the
    /// pools alive.
    pub(super) fn closer(&self) -> impl Fn(std::net::IpAddr) + Send + Sync + 'static {
        let pool = Arc::downgrade(&self.0);
        move |ip| {
            let Some(inner) = pool.upgrade() else { return };
            drop(inner.take_to(ip));
            let threads: Vec<Arc<Inner>> = {
                let threads = inner.threads.lock().unwrap_or_else(|e| e.into_inner());
                threads
                    .iter()
                    .filter_map(std::sync::Weak::upgrade)
                    .collect()
            };
            for t in threads {
                drop(t.take_to(ip));
            }
        }
    }

    /// Idle connections held now (tests and metrics).
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        let idle = self.0.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.values().map(Vec::len).sum()
    }
}

impl Inner {
    fn checkin(&self, conn: Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.entry(conn.addr).or_default();
        if list.len() < self.max_idle_per_host {
            list.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    /// Takes the idle connections to any port of `ip` out of the pool (closed by the caller,
    /// outside the lock).
    fn take_to(&self, ip: std::net::IpAddr) -> Vec<Idle> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let addrs: Vec<SocketAddr> = idle.keys().filter(|a| a.ip() == ip).copied().collect();
        addrs
            .iter()
            .filter_map(|a| idle.remove(a))
            .flatten()
            .collect()
    }

    fn sweep(&self, now: Instant) -> Vec<Idle> {
        let mut expired = Vec::new();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|_, list| {
            let keep = list
                .iter()
                .position(|i| now.duration_since(i.since) < self.idle_timeout)
                .unwrap_or(list.len());
            expired.extend(list.drain(..keep));
            !list.is_empty()
        });
        expired
    }
}

/// A response body from the pool: it reads and decodes its connection's bytes as the client's
/// connection takes them, and gives the connection back once the body has ended cleanly (a
/// body dropped before its end, or that failed, closes it).
pub(super) struct PooledBody {
    decoder: h1::Decoder,
    /// Body bytes that came with the head (often the whole body), or the error they made.
    first: Option<io::Result<Bytes>>,
    /// `None` once given back (or closed).
    conn: Option<Conn>,
    /// The connection may go back to the pool once the body has ended: the app keeps it open
    /// and the whole request went out.
    reusable: bool,
    pool: Weak<Inner>,
}

impl PooledBody {
    /// The response to an exchange on `conn`.
    fn start(mut conn: Conn, answer: Answer, pool: &Arc<Inner>) -> Response<PooledBody> {
        let (parts, ()) = answer.head.response.into_parts();
        let mut body = PooledBody {
            decoder: answer.head.framing,
            first: None,
            conn: None,
            reusable: answer.head.keep_alive && answer.sent_all,
            pool: Arc::downgrade(pool),
        };
        match body.decoder.decode(&mut conn.rbuf) {
            Ok(first) => {
                body.first = first.map(Ok);
                body.conn = Some(conn);
                // No body, or all of it came with the head: the connection is free already.
                if body.decoder.is_done() {
                    body.release();
                }
            }
            // Dropped with `conn`.
            Err(e) => body.first = Some(Err(e)),
        }
        Response::from_parts(parts, body)
    }

    fn release(&mut self) {
        let conn = self.conn.take();
        if let (Some(conn), true, Some(pool)) = (conn, self.reusable, self.pool.upgrade()) {
            // Bytes past the answer's end: the app is not speaking HTTP/1.1; never reused.
            if conn.rbuf.is_empty() {
                pool.checkin(conn);
            }
        }
    }
}

impl hyper::body::Body for PooledBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(first.map(Frame::data)));
        }
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match this.decoder.decode(&mut conn.rbuf) {
                Ok(Some(data)) => {
                    if this.decoder.is_done() {
                        this.release();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(None) if this.decoder.is_done() => {
                    this.release();
                    return Poll::Ready(None);
                }
                Ok(None) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            match conn.poll_read(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    // The end of a close-delimited body, else a truncated one.
                    this.conn = None;
                    return Poll::Ready(this.decoder.eof().err().map(Err));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        let first = match &self.first {
            Some(Ok(b)) => b.len() as u64,
            _ => 0,
        };
        match self.decoder.remaining() {
            Some(n) => SizeHint::with_exact(n + first),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use hyper::Request;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A tiny HTTP/1.1 app: answers every request on a connection with `body`, counting the
    /// connections it accepted; `close_after` requests, it closes the connection.
    async fn app(body: &'static str, close_after: usize) -> (SocketAddr, Arc<Mutex<usize>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(Mutex::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                *count.lock().unwrap() += 1;
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut served = 0;
                    let mut chunk = [0u8; 1024];
                    while served < close_after {
                        let n = match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let resp = format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                                body.len()
                            );
                            if s.write_all(resp.as_bytes()).await.is_err() {
                                return;
                            }
                            served += 1;
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn get() -> Request<Body> {
        Request::get("/")
            .header("host", "app")
            .body(crate::http::empty())
            .unwrap()
    }

    async fn text(resp: Response<PooledBody>) -> String {
        let b = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(b.to_vec()).unwrap()
    }

    fn pool() -> Pool {
        Pool::new(Duration::from_secs(4), 4, Duration::from_secs(1))
    }

    #[tokio::test]
    async fn connections_are_reused_after_the_body_ends() {
        let (addr, accepted) = app("hello", usize::MAX).await;
        let pool = pool();
        for _ in 0..5 {
            let resp = pool.send(addr, get()).await.unwrap();
            assert_eq!(text(resp).await, "hello");
            assert_eq!(pool.idle_count(), 1);
        }
        assert_eq!(*accepted.lock().unwrap(), 1);
    }

    #[tokio::test]
    async fn an_emptied_list_stays_for_the_checkin_and_the_sweep_drops_it() {
        // Larger than what comes with the head: the body holds its connection until read.
        let big: &'static str = Box::leak("x".repeat(300_000).into_boxed_str());
        let (addr, accepted) = app(big, usize::MAX).await;
        let pool = pool();
        let resp = pool.send(addr, get()).await.unwrap();
        assert_eq!(text(resp).await.len(), big.len());
        let lists = |p: &Pool| p.0.idle.lock().unwrap().len();
        assert_eq!((pool.idle_count(), lists(&pool)), (1, 1));
        // Checked out and held by the body: the address's list is empty but kept.
        let resp = pool.send(addr, get()).await.unwrap();
        assert_eq!((pool.idle_count(), lists(&pool)), (0, 1));
        // A sweep (nothing expired) drops the empty list and nothing else.
        assert!(pool.0.sweep(Instant::now()).is_empty());
        assert_eq!(lists(&pool), 0);
        assert_eq!(text(resp).await.len(), big.len());
        assert_eq!((pool.idle_count(), lists(&pool)), (1, 1));
        assert_eq!(*accepted.lock().unwrap(), 1);
    }

    #[tokio::test]
    async fn the_closer_drops_the_idle_connections_to_one_address_only() {
        let (addr, accepted) = app("hello", usize::MAX).await;
        let pool = pool();
        let resp = pool.send(addr, get()).await.unwrap();
        assert_eq!(text(resp).await, "hello");
        assert_eq!(pool.idle_count(), 1);
        let close = pool.closer();
        close("127.0.0.2".parse().unwrap());
        assert_eq!(pool.idle_count(), 1, "another address is left alone");
        close(addr.ip());
        assert_eq!(pool.idle_count(), 0);
        let resp = pool.send(addr, get()).await.unwrap();
        assert_eq!(text(resp).await, "hello");
        assert_eq!(
            *accepted.lock().unwrap(),
            2,
            "a new connection after the close"
        );
    }

    #[tokio::test]
    async fn the_closer_reaches_the_edge_threads_pools() {
        let (addr, accepted) = app("hello", usize::MAX).await;
        let pool = pool();
        let thread_pool = pool.for_thread();
        let resp = thread_pool.send(addr, get()).await.unwrap();
        assert_eq!(text(resp).await, "hello");
        assert_eq!(thread_pool.idle_count(), 1);
        pool.closer()(addr.ip());
        assert_eq!(thread_pool.idle_count(), 0, "closed in the thread's pool");
        let resp = thread_pool.send(addr, get()).await.unwrap();
        assert_eq!(text(resp).await, "hello");
        assert_eq!(*accepted.lock().unwrap(), 2);
    }

    #[tokio::test]
    async fn a_body_dropped_early_closes_its_connection() {
        // Larger than what comes with the head.
        let big: &'static str = Box::leak("x".repeat(300_000).into_boxed_str());
        let (addr, accepted) = app(big, usize::MAX).await;
        let pool = pool();
        let resp = pool.send(addr, get()).await.unwrap();
        assert_eq!(pool.idle_count(), 0, "held by the body");
        drop(resp);
        assert_eq!(pool.idle_count(), 0);
        let resp = pool.send(addr, get()).await.unwrap();
        assert_eq!(text(resp).await.len(), big.len());
        assert_eq!(*accepted.lock().unwrap(), 2);
        assert_eq!(pool.idle_count(), 1, "reused once read to its end");
    }

    #[tokio::test]
    async fn a_small_body_that_came_with_the_head_frees_its_connection_at_once() {
        let (addr, accepted) = app("hello", usize::MAX).await;
        let pool = pool();
        let resp = pool.send(addr, get()).await.unwrap();
        assert_eq!(pool.idle_count(), 1);
        assert_eq!(resp.body().size_hint().exact(), Some(5));
        drop(resp);
        let resp = pool.send(addr, get()).await.unwrap();
        assert_eq!(text(resp).await, "hello");
        assert_eq!(*accepted.lock().unwrap(), 1);
    }

    #[tokio::test]
    async fn an_idle_connection_left_clean_is_reused_without_a_read() {
        let (addr, accepted) = app("hello", usize::MAX).await;
        let pool = pool();
        for _ in 0..3 {
            let resp = pool.send(addr, get()).await.unwrap();
            assert_eq!(text(resp).await, "hello");
            // The answer's last read was short: the socket is known empty, so the checkout's
            // liveness check needs no read of its own.
            let mut idle = pool.0.idle.lock().unwrap();
            let conn = &mut idle.get_mut(&addr).unwrap().last_mut().unwrap().conn;
            let mut cx = Context::from_waker(std::task::Waker::noop());
            assert!(conn.io.poll_read_ready(&mut cx).is_pending());
        }
        assert_eq!(*accepted.lock().unwrap(), 1);
    }

    #[tokio::test]
    async fn a_connection_the_app_closed_is_replaced() {
        // One request per connection, then the app closes it.
        let (addr, accepted) = app("x", 1).await;
        let pool = pool();
        for _ in 0..3 {
            let resp = pool.send(addr, get()).await.unwrap();
            assert_eq!(text(resp).await, "x");
            // Let the close arrive.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(*accepted.lock().unwrap(), 3);
    }

    #[tokio::test]
    async fn an_app_that_closes_without_answering_fails_the_request_at_once() {
        // Accepts and closes at once; then (second connection on) after its first answer.
        for close_after in [0, 1] {
            let (addr, _) = app("x", close_after).await;
            let pool = pool();
            for _ in 0..3 {
                let sent = tokio::time::timeout(Duration::from_secs(5), pool.send(addr, get()))
                    .await
                    .expect("an answer or an error, not a hang");
                if let Ok(resp) = sent {
                    let body = tokio::time::timeout(Duration::from_secs(5), text(resp)).await;
                    assert_eq!(body.expect("the body ends"), "x");
                }
            }
        }
    }

    #[tokio::test]
    async fn nothing_listening_is_a_connect_error() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let Err(err) = pool().send(addr, get()).await else {
            panic!("a response from a closed port");
        };
        assert!(err.is_connect(), "{err}");
    }

    #[tokio::test]
    async fn idle_connections_expire() {
        let (addr, accepted) = app("hello", usize::MAX).await;
        let pool = Pool::new(Duration::from_millis(200), 4, Duration::from_secs(1));
        let resp = pool.send(addr, get()).await.unwrap();
        assert_eq!(text(resp).await, "hello");
        assert_eq!(pool.idle_count(), 1);
        // The sweeper runs every idle timeout: gone within two.
        tokio::time::sleep(Duration::from_millis(450)).await;
        assert_eq!(pool.idle_count(), 0);
        let resp = pool.send(addr, get()).await.unwrap();
        assert_eq!(text(resp).await, "hello");
        assert_eq!(*accepted.lock().unwrap(), 2);
    }

    /// What a scripted app answers to one request (its head and body): the pieces it writes, a
    /// pause between them so that they arrive in separate reads, and whether it then closes.
    type Script = Arc<dyn Fn(&str, &[u8]) -> (Vec<Vec<u8>>, bool) + Send + Sync>;

    type Seen = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

    /// An app that reads each request (head, and a Content-Length or chunked body), records it
    /// and answers as `script` says; it counts the connections it accepted.
    async fn scripted(script: Script) -> (SocketAddr, Arc<Mutex<usize>>, Seen) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(Mutex::new(0));
        let seen: Seen = Arc::default();
        let (count, log) = (accepted.clone(), seen.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                *count.lock().unwrap() += 1;
                let (script, log) = (script.clone(), log.clone());
                tokio::spawn(async move {
                    let mut buf = BytesMut::new();
                    while let Some((head, body)) = read_request(&mut s, &mut buf).await {
                        let (pieces, close) = script(&head, &body);
                        log.lock().unwrap().push((head, body));
                        for (i, p) in pieces.iter().enumerate() {
                            if i > 0 {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            if s.write_all(p).await.is_err() {
                                return;
                            }
                        }
                        if close {
                            return;
                        }
                    }
                });
            }
        });
        (addr, accepted, seen)
    }

    async fn fill(s: &mut TcpStream, buf: &mut BytesMut) -> Option<()> {
        buf.reserve(4096);
        match s.read_buf(buf).await {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(()),
        }
    }

    async fn read_request(s: &mut TcpStream, buf: &mut BytesMut) -> Option<(String, Vec<u8>)> {
        let end = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            fill(s, buf).await?;
        };
        let head = String::from_utf8(buf.split_to(end).to_vec()).unwrap();
        let lower = head.to_ascii_lowercase();
        let mut body = Vec::new();
        if lower.contains("x-answer-early") {
            // Answers before reading the body.
        } else if let Some(l) = lower.split("content-length: ").nth(1) {
            let n: usize = l.split("\r\n").next().unwrap().parse().unwrap();
            while buf.len() < n {
                fill(s, buf).await?;
            }
            body = buf.split_to(n).to_vec();
        } else if lower.contains("transfer-encoding: chunked") {
            let mut d = h1::Decoder::Chunked(h1::Chunk::Size);
            while !d.is_done() {
                match d.decode(buf).unwrap() {
                    Some(b) => body.extend_from_slice(&b),
                    None if d.is_done() => {}
                    None => fill(s, buf).await?,
                }
            }
        }
        Some((head, body))
    }

    fn answer(pieces: &[&str], close: bool) -> (Vec<Vec<u8>>, bool) {
        (
            pieces.iter().map(|p| p.as_bytes().to_vec()).collect(),
            close,
        )
    }

    fn request(method: &str, uri: &str, body: Body) -> Request<Body> {
        Request::builder()
            .method(method)
            .uri(uri)
            .header("host", "app")
            .body(body)
            .unwrap()
    }

    #[tokio::test]
    async fn chunked_answers_split_across_reads_are_decoded_and_the_connection_reused() {
        let (addr, accepted, _) = scripted(Arc::new(|_, _| {
            answer(
                &[
                    "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
                    "lo\r\n6;x=y\r\n world\r\n0\r\nX-T: 1\r\n",
                    "\r\n",
                ],
                false,
            )
        }))
        .await;
        let pool = pool();
        for _ in 0..2 {
            let resp = pool.send(addr, get()).await.unwrap();
            assert!(
                resp.headers().get("transfer-encoding").is_none(),
                "hop-by-hop"
            );
            assert_eq!(text(resp).await, "hello world");
            assert_eq!(pool.idle_count(), 1);
        }
        assert_eq!(*accepted.lock().unwrap(), 1);
    }

    #[tokio::test]
    async fn a_close_delimited_answer_ends_at_the_close_and_is_not_reused() {
        let (addr, accepted, _) = scripted(Arc::new(|_, _| {
            answer(&["HTTP/1.1 200 OK\r\n\r\nuntil", " the end"], true)
        }))
        .await;
        let pool = pool();
        for _ in 0..2 {
            let resp = pool.send(addr, get()).await.unwrap();
            assert_eq!(text(resp).await, "until the end");
            assert_eq!(pool.idle_count(), 0);
        }
        assert_eq!(*accepted.lock().unwrap(), 2);
    }

    #[tokio::test]
    async fn answers_without_a_body_keep_the_connection() {
        let (addr, accepted, _) = scripted(Arc::new(|head, _| {
            let r = match head.split(' ').take(2).collect::<Vec<_>>()[..] {
                ["HEAD", _] => "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
                [_, "/204"] => "HTTP/1.1 204 No Content\r\n\r\n",
                [_, "/304"] => "HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
                [_, "/100"] => {
                    "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
                }
                _ => "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            };
            answer(&[r], false)
        }))
        .await;
        let pool = pool();
        for (method, uri, status) in [
            ("HEAD", "/", 200),
            ("GET", "/204", 204),
            ("GET", "/304", 304),
            ("GET", "/", 200),
            ("GET", "/100", 200),
        ] {
            let resp = pool
                .send(addr, request(method, uri, crate::http::empty()))
                .await
                .unwrap();
            assert_eq!(resp.status().as_u16(), status, "{method} {uri}");
            assert!(resp.body().is_end_stream(), "{method} {uri}");
            assert_eq!(text(resp).await, "");
            assert_eq!(pool.idle_count(), 1, "{method} {uri}");
        }
        assert_eq!(*accepted.lock().unwrap(), 1);
    }

    #[tokio::test]
    async fn interim_answers_are_skipped() {
        let (addr, _, _) = scripted(Arc::new(|_, _| {
            answer(
                &[
                    "HTTP/1.1 100 Continue\r\n\r\n",
                    "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\n",
                    "Content-Length: 2\r\n\r\nok",
                ],
                false,
            )
        }))
        .await;
        let pool = pool();
        let resp = pool.send(addr, get()).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.headers().get("link").is_none());
        assert_eq!(text(resp).await, "ok");
        assert_eq!(pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn request_bodies_reach_the_app_with_their_framing() {
        let (addr, accepted, seen) = scripted(Arc::new(|_, body| {
            let mut r =
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
            r.extend_from_slice(body);
            (vec![r], false)
        }))
        .await;
        let pool = pool();
        let full = || crate::http::full(bytes::Bytes::from_static(b"abc"));
        let streamed = || {
            let frames = ["ab", "", "cdef"].map(|s| {
                Ok::<_, crate::http::BoxError>(Frame::data(Bytes::from_static(s.as_bytes())))
            });
            http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed()
        };
        let mut with_length = request("PUT", "/p", full());
        with_length
            .headers_mut()
            .insert("content-length", "3".parse().unwrap());
        for (req, want) in [
            (request("POST", "/p?q", full()), "abc"),
            (request("POST", "/p", streamed()), "abcdef"),
            (with_length, "abc"),
            (request("POST", "/p", crate::http::empty()), ""),
        ] {
            let resp = pool.send(addr, req).await.unwrap();
            assert_eq!(text(resp).await, want);
            assert_eq!(pool.idle_count(), 1);
        }
        assert_eq!(*accepted.lock().unwrap(), 1);
        let seen = seen.lock().unwrap();
        assert!(
            seen[0].0.starts_with("POST /p?q HTTP/1.1\r\n"),
            "{}",
            seen[0].0
        );
        assert!(seen[0].0.contains("content-length: 3\r\n"), "{}", seen[0].0);
        assert!(
            seen[1].0.contains("transfer-encoding: chunked\r\n"),
            "{}",
            seen[1].0
        );
        assert!(seen[2].0.contains("content-length: 3\r\n"), "{}", seen[2].0);
        assert!(seen[3].0.contains("content-length: 0\r\n"), "{}", seen[3].0);
    }

    #[tokio::test]
    async fn a_request_body_that_fails_drops_the_connection() {
        let (addr, _, _) = scripted(Arc::new(|_, _| {
            answer(&["HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"], false)
        }))
        .await;
        let pool = pool();
        let frames: [Result<Frame<Bytes>, crate::http::BoxError>; 2] = [
            Ok(Frame::data(Bytes::from_static(b"ab"))),
            Err("client went away".into()),
        ];
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed();
        let err = pool.send(addr, request("POST", "/", body)).await;
        assert!(matches!(err, Err(UpstreamError::Http(_))));
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn a_new_connection_closed_or_reset_before_any_answer_is_dropped() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // What the app does with each connection, after reading the request.
        for (how, dropped) in [("close", true), ("reset", true), ("partial", false)] {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            tokio::spawn(async move {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                match how {
                    "reset" => {
                        let _ = s.set_zero_linger();
                    }
                    "partial" => {
                        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Le").await;
                    }
                    _ => {}
                }
                drop(s);
            });
            let pool = pool();
            let sent = tokio::time::timeout(Duration::from_secs(5), pool.send(addr, get())).await;
            let Err(err) = sent.expect("no hang") else {
                panic!("an answer from {how}");
            };
            assert_eq!(err.is_dropped(), dropped, "{how}: {err}");
            assert!(!err.is_connect(), "{how}: {err}");
        }
    }

    #[tokio::test]
    async fn invalid_answers_are_errors_and_never_reused() {
        let big: &'static str = Box::leak(
            format!("HTTP/1.1 200 OK\r\nX-Big: {}\r\n\r\n", "a".repeat(70_000)).into_boxed_str(),
        );
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\nok",
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
            "HTTP/1.1 200 OK\r\nX: a\r\n folded\r\nContent-Length: 2\r\n\r\nok",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nok",
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
            "HTTP/2 200\r\n\r\n",
            "garbage\r\n\r\n",
            big,
        ] {
            let (addr, _, _) = scripted(Arc::new(move |_, _| answer(&[bad], false))).await;
            let pool = pool();
            let sent = tokio::time::timeout(Duration::from_secs(5), pool.send(addr, get())).await;
            let Err(err) = sent.expect("no hang") else {
                panic!("an answer to {:?}", &bad[..40.min(bad.len())]);
            };
            assert!(!err.is_connect() && !err.is_dropped(), "{err}");
            assert_eq!(pool.idle_count(), 0);
        }
        // Bad framing in the body, a short body, bytes past the answer's end.
        for (bad, fails) in [
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n",
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXY",
                true,
            ),
            ("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA", false),
        ] {
            let (addr, _, _) = scripted(Arc::new(move |_, _| answer(&[bad], false))).await;
            let pool = pool();
            let resp = pool.send(addr, get()).await.unwrap();
            let body = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect())
                .await
                .expect("no hang");
            assert_eq!(body.is_err(), fails, "{bad:?}");
            assert_eq!(pool.idle_count(), 0, "{bad:?}");
        }
        // The app closes in the middle of the body.
        let (addr, _, _) = scripted(Arc::new(|_, _| {
            answer(&["HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort"], true)
        }))
        .await;
        let pool = pool();
        let resp = pool.send(addr, get()).await.unwrap();
        assert!(resp.into_body().collect().await.is_err());
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn an_idle_connection_the_app_wrote_to_unasked_is_not_reused() {
        let (addr, accepted, _) = scripted(Arc::new(|_, _| {
            answer(
                &["HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", "junk"],
                false,
            )
        }))
        .await;
        let pool = pool();
        let resp = pool.send(addr, get()).await.unwrap();
        assert_eq!(text(resp).await, "ok");
        assert_eq!(pool.idle_count(), 1);
        // The junk arrives while the connection is idle.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let resp = pool.send(addr, get()).await.unwrap();
        assert_eq!(text(resp).await, "ok");
        assert_eq!(*accepted.lock().unwrap(), 2, "a new connection");
    }

    #[tokio::test]
    async fn an_answer_before_the_request_body_has_gone_is_not_reused() {
        let (addr, _, _) = scripted(Arc::new(|_, _| {
            answer(
                &["HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n"],
                false,
            )
        }))
        .await;
        let pool = pool();
        // A body that has not ended when the app answers after the head.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, crate::http::BoxError>>(1);
        tx.send(Ok(Frame::data(Bytes::from_static(b"part"))))
            .await
            .unwrap();
        let body = http_body_util::StreamBody::new(futures_util::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|f| (f, rx)) },
        ))
        .boxed();
        let mut req = request("POST", "/", body);
        req.headers_mut()
            .insert("x-answer-early", "1".parse().unwrap());
        let resp = tokio::time::timeout(Duration::from_secs(5), pool.send(addr, req))
            .await
            .expect("the early answer is taken")
            .unwrap();
        assert_eq!(resp.status(), 413);
        assert_eq!(text(resp).await, "");
        assert_eq!(pool.idle_count(), 0);
        drop(tx);
    }
}
