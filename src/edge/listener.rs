//! The accept loop: TCP (optionally TLS) → HTTP/1.1 or HTTP/2 → [`Handler`].
//!
//! Everything that protects the process from clients that never finish saying hello lives here,
//! each with its own bound:
//! - the TLS handshake runs inside the connection's task under `tls_handshake_timeout`, so a
//!   stalled handshake never blocks the accept loop;
//! - the first request must arrive within `header_read_timeout` (this also covers the protocol
//!   sniffing of hyper-util's auto builder and HTTP/2 clients that open and never send a request,
//!   which hyper's own HTTP/1 header timer does not see);
//! - on HTTP/1, hyper's `header_read_timeout` then bounds every later request head and every idle
//!   keep-alive gap, and [`framing::FramingCheck`] bounds the head's size (431 past it);
//! - on HTTP/2, `max_header_list_size` bounds headers and keep-alive pings drop dead peers;
//! - a semaphore caps concurrent connections.
//!
//! When the shutdown signal flips, the loop stops accepting, asks every live connection to finish
//! (HTTP/1: after the response in flight; HTTP/2: GOAWAY, then the open streams), waits up to the
//! grace period and drops what is left. Upgraded connections (WebSockets) have left hyper by then
//! and belong to whoever called `hyper::upgrade::on`; they are neither counted nor waited for.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use super::fast::{self, FastFuture, FastHead};
use super::framing::{self, FramingCheck};
use super::router::{sni_matches, RequestHost};
use crate::http::error::ApiError;
use crate::http::Body;

/// What the handler may want to know about the connection a request came on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub tls: bool,
    /// The TLS server name the client asked for (lowercase, as rustls reports it).
    pub sni: Option<String>,
    /// Whether ALPN settled on `h2`. A plain-text HTTP/2 (prior knowledge) connection reports
    /// `false`; look at `Request::version()` for the protocol actually spoken.
    pub alpn_h2: bool,
}

/// The application behind the edge. Answers every request; errors are responses too.
pub trait Handler: Send + Sync + 'static {
    /// `host`: the request's host as the listener normalized it for its own check (the 421 of
    /// TLS connections with an SNI), so the handler need not do it again; `None` when the
    /// listener did not look.
    fn handle(
        &self,
        req: Request<Incoming>,
        conn: Arc<ConnInfo>,
        host: Option<RequestHost>,
    ) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>>;

    /// Whether HTTP/1 connections (plain, or TLS when `tls`) start on the fast path
    /// (`edge/fast.rs`), which asks [`Handler::fast`] for each request it could serve; without
    /// it they go to hyper at once. A TLS connection that chose HTTP/2 (ALPN) always does.
    fn has_fast_path(&self, _tls: bool) -> bool {
        false
    }

    /// The fast path's request `head` on `conn`: `Some` answer when the handler serves it
    /// there, `None` to send it (and the connection) to hyper's path and [`Handler::handle`].
    fn fast(&self, _head: &FastHead<'_>, _conn: &Arc<ConnInfo>) -> Option<FastFuture> {
        None
    }
}

/// Any `Fn(Request, Arc<ConnInfo>) -> impl Future<Output = Response>` is a handler, which keeps
/// tests and small adapters free of boilerplate.
impl<F, Fut> Handler for F
where
    F: Fn(Request<Incoming>, Arc<ConnInfo>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    fn handle(
        &self,
        req: Request<Incoming>,
        conn: Arc<ConnInfo>,
        _host: Option<RequestHost>,
    ) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>> {
        Box::pin(self(req, conn))
    }
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub tls_handshake_timeout: Duration,
    /// Time allowed for a request head, measured from the connection's start for the first
    /// request and from the end of the previous response for later ones (so it is also the
    /// HTTP/1 keep-alive idle timeout).
    pub header_read_timeout: Duration,
    /// Largest request head accepted. HTTP/1 answers 431 `head_too_large` beyond it (HTTP/2:
    /// the header list).
    pub max_header_bytes: usize,
    /// Connections served at once. When all slots are taken the loop stops accepting, so new
    /// clients wait in the kernel's backlog until a slot frees up (see `serve`).
    pub max_connections: usize,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        Self {
            tls_handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            // Below the common 1024 open-files soft limit would be too tight for a proxy that
            // needs an upstream socket per connection; start-up should raise RLIMIT_NOFILE to
            // match.
            max_connections: 4096,
        }
    }
}

/// hyper's HTTP/1 buffer limit. It bounds two things: the read buffer (request heads are
/// bounded before it, by [`framing::FramingCheck`] at `max_header_bytes`, so here it only
/// limits how much of a body is read in one go) and the queue of answer bytes hyper holds for a
/// client that reads slower than the app answers. The queue is what matters: at 64 KiB
/// sandboxd read a 1 MiB answer from the app in small steps behind the client and moved ~5 %
/// fewer such answers per second than nginx (which reads up to 1 GiB ahead, to disk); at
/// 512 KiB it keeps pace. The cost is bounded: at most this much per connection that is
/// being answered, and only while its client reads slowly.
const HTTP1_BUF: usize = 512 * 1024;
/// Pause after a failed `accept`: errors like EMFILE repeat immediately, and spinning on them
/// would starve the connections that could free descriptors.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);
/// How long a TLS connection the fast path ended may take to say so (close_notify).
const TLS_CLOSE_WITHIN: Duration = Duration::from_secs(1);
/// HTTP/2 pings find peers that vanished without a FIN (laptops closing, NAT timeouts).
const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Serves `listener` until `shutdown` becomes true (or its sender is dropped), then drains.
///
/// Connection cap: a connection slot is taken *before* `accept`, so at the cap the loop simply
/// stops accepting and the kernel backlog absorbs the burst; clients see latency, not resets.
/// The rejected alternative, accept-then-close, turns a burst into errors for legitimate clients
/// while doing nothing against the slow clients that hold the slots (those are cut by the
/// timeouts above, which is what frees slots).
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    handler: Arc<dyn Handler>,
    cfg: ListenerConfig,
    shutdown: watch::Receiver<bool>,
    grace: Duration,
) -> anyhow::Result<()> {
    let slots = connection_slots(&cfg);
    serve_shared(listener, tls, handler, cfg, slots, shutdown, grace).await
}

/// The connection cap of `cfg` as a semaphore, for loops that share it ([`serve_shared`]).
pub fn connection_slots(cfg: &ListenerConfig) -> Arc<Semaphore> {
    Arc::new(Semaphore::new(cfg.max_connections.max(1)))
}

/// [`serve`] with the connection slots given: several accept loops on one address (one per
/// edge thread, `edge/percore.rs`) share one cap.
pub async fn serve_shared(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    handler: Arc<dyn Handler>,
    cfg: ListenerConfig,
    slots: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) -> anyhow::Result<()> {
    let builder = Arc::new(http_builder(&cfg));
    let drain = Arc::new(Drain::default());
    let mut tasks = JoinSet::new();
    let local_addr = listener.local_addr()?;
    tracing::info!(addr = %local_addr, tls = tls.is_some(), "listening");

    loop {
        if *shutdown.borrow_and_update() {
            break;
        }
        tokio::select! {
            changed = shutdown.changed() => {
                // A dropped sender can never say "stop" again; treat it as "stop now" rather than
                // spinning on the error.
                if changed.is_err() {
                    break;
                }
            }
            // Reap finished connection tasks so the set does not grow with the connection count.
            Some(done) = tasks.join_next() => log_join(done),
            accepted = accept_with_slot(&listener, &slots) => {
                let (stream, peer, permit) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                        continue;
                    }
                };
                let conn = Conn {
                    peer,
                    tls: tls.clone(),
                    handler: handler.clone(),
                    builder: builder.clone(),
                    handshake_timeout: cfg.tls_handshake_timeout,
                    first_request_timeout: cfg.header_read_timeout,
                    max_header_bytes: cfg.max_header_bytes,
                    // Taken here, in the loop, so that a shutdown signalled while this
                    // connection is still in its TLS handshake is seen by it too.
                    drain: DrainWatch::new(drain.clone()),
                    _permit: permit,
                };
                tasks.spawn(conn.run(stream));
            }
        }
    }

    // Closing the socket first makes new clients fail fast instead of queueing in a backlog
    // nobody will read.
    drop(listener);
    let live = tasks.len();
    tracing::info!(live, ?grace, "shutting down listener");
    let drained = tokio::time::timeout(grace, async {
        drain.start();
        while let Some(done) = tasks.join_next().await {
            log_join(done);
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            remaining = tasks.len(),
            "grace period over; closing remaining connections"
        );
        tasks.shutdown().await;
    }
    tracing::info!(addr = %local_addr, "listener stopped");
    Ok(())
}

fn http_builder(cfg: &ListenerConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        // The header-read timer of every request head: coarse, in the edge thread's watch.
        .timer(super::coarse::EdgeTimer)
        .header_read_timeout(cfg.header_read_timeout)
        .max_buf_size(HTTP1_BUF.max(cfg.max_header_bytes.saturating_mul(2)))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(cfg.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(H2_KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT);
    builder
}

async fn accept_with_slot(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
) -> std::io::Result<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
    let permit = slots
        .clone()
        .acquire_owned()
        .await
        // The semaphore lives as long as `serve` and is never closed.
        .map_err(std::io::Error::other)?;
    let (stream, peer) = listener.accept().await?;
    Ok((stream, peer, permit))
}

fn log_join(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        if e.is_panic() {
            tracing::error!(error = %e, "connection task panicked");
        }
    }
}

/// One accepted connection and what it needs, moved into its task.
struct Conn {
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    handler: Arc<dyn Handler>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    handshake_timeout: Duration,
    first_request_timeout: Duration,
    max_header_bytes: usize,
    drain: DrainWatch,
    /// Held for the connection's lifetime: dropping it frees the slot.
    _permit: OwnedSemaphorePermit,
}

impl Conn {
    async fn run(self, stream: TcpStream) {
        // Interactive traffic (terminal keystrokes, HMR updates) is latency-bound; Nagle would
        // hold small writes back.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(peer = %self.peer, error = %e, "set_nodelay failed");
        }
        let local = match stream.local_addr() {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(peer = %self.peer, error = %e, "no local address; dropping");
                return;
            }
        };
        let Some(acceptor) = self.tls.clone() else {
            let info = ConnInfo {
                peer: self.peer,
                local,
                tls: false,
                sni: None,
                alpn_h2: false,
            };
            let max = self.max_header_bytes;
            let info = Arc::new(info);
            if !self.handler.has_fast_path(false) {
                return self.serve_http(FramingCheck::new(stream, max), info).await;
            }
            return self.serve_fast_first(stream, info).await;
        };
        let stream =
            match tokio::time::timeout(self.handshake_timeout, acceptor.accept(stream)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(peer = %self.peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(peer = %self.peer, "TLS handshake timed out");
                    return;
                }
            };
        let (_, tls_conn) = stream.get_ref();
        let info = ConnInfo {
            peer: self.peer,
            local,
            tls: true,
            sni: tls_conn.server_name().map(str::to_owned),
            alpn_h2: tls_conn.alpn_protocol() == Some(b"h2".as_slice()),
        };
        let max = self.max_header_bytes;
        if info.alpn_h2 || !self.handler.has_fast_path(true) {
            return self
                .serve_http(FramingCheck::new(stream, max), Arc::new(info))
                .await;
        }
        self.serve_fast_first(stream, Arc::new(info)).await
    }

    /// An HTTP/1 connection (plain or TLS) on the fast path until a request is not for it;
    /// then hyper's, with the bytes read so far.
    async fn serve_fast_first<S>(mut self, mut stream: S, info: Arc<ConnInfo>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let max = self.max_header_bytes;
        let drain = &mut self.drain;
        let outcome = fast::serve(
            &mut stream,
            &info,
            &*self.handler,
            self.first_request_timeout,
            max,
            |cx| drain.poll_draining(cx),
        )
        .await;
        match outcome {
            // A TLS connection says it ends (close_notify), as hyper's path does; bounded, as a
            // client that stopped reading would otherwise hold the task.
            fast::Outcome::Closed if info.tls => {
                let _ = tokio::time::timeout(TLS_CLOSE_WITHIN, stream.shutdown()).await;
            }
            fast::Outcome::Closed => {}
            fast::Outcome::Fallback(read) => {
                let io = FramingCheck::with_prefix(stream, &read, max);
                self.serve_http(io, info).await
            }
        }
    }

    async fn serve_http<S>(self, stream: S, info: Arc<ConnInfo>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let peer = info.peer;
        let got_request = Arc::new(AtomicBool::new(false));
        let service = {
            let handler = self.handler.clone();
            let got_request = got_request.clone();
            hyper::service::service_fn(move |req: Request<Incoming>| {
                got_request.store(true, Ordering::Relaxed);
                let info = info.clone();
                // HTTP/2 has no `Connection` header (and ends a refused stream by itself).
                let close_on_error =
                    req.version() < hyper::Version::HTTP_2 && carries_body(req.headers());
                // Looked at once, here, for the 421 check, and handed on for the routing.
                let host = info.sni.is_some().then(|| RequestHost::of(&req));
                let refused = bad_framing(&req).or_else(|| misdirected(host.as_ref(), &info));
                let response: ResponseFuture = match refused {
                    Some(resp) => Box::pin(std::future::ready(resp)),
                    None => handler.handle(req, info, host),
                };
                guarded(response, peer, close_on_error)
            })
        };
        let conn = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service);
        tokio::pin!(conn);
        let mut conn = Drained {
            conn,
            watch: self.drain,
            asked: false,
        };

        // hyper's header timer starts only once HTTP/1 has been chosen; this deadline covers the
        // protocol sniffing before it and HTTP/2 connections that never send a request. Once a
        // request has arrived the deadline has nothing left to cut, so it is dropped then rather
        // than polled (and its timer kept) beside every later request of the connection.
        let first = {
            let deadline = tokio::time::sleep(self.first_request_timeout);
            tokio::pin!(deadline);
            std::future::poll_fn(|cx| {
                if let Poll::Ready(res) = conn.poll(cx) {
                    return Poll::Ready(First::Ended(res));
                }
                if got_request.load(Ordering::Relaxed) {
                    return Poll::Ready(First::Requested);
                }
                deadline.as_mut().poll(cx).map(|()| First::TimedOut)
            })
            .await
        };
        let res = match first {
            First::Ended(res) => res,
            First::TimedOut => {
                tracing::debug!(%peer, "no request before the header timeout; closing");
                return;
            }
            First::Requested => std::future::poll_fn(|cx| conn.poll(cx)).await,
        };
        if let Err(e) = res {
            // Client-side disconnects and timeouts are routine at an edge; not worth a warning.
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
    }
}

type ResponseFuture = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;

/// The listener's "finish up" signal to its connections (HTTP/1: after the response in flight;
/// HTTP/2: GOAWAY). It does the job of hyper-util's `GracefulShutdown`, whose watch channel
/// registers anew at every poll of every connection (several per request); here a poll costs
/// an atomic load and a waker comparison, and a connection registers its waker only when it
/// changes. The listener waits for the connections themselves (their tasks).
#[derive(Default)]
struct Drain {
    draining: AtomicBool,
    /// The wakers of the connections to wake when draining starts, by connection.
    wakers: Mutex<std::collections::HashMap<u64, Waker>>,
    next_id: AtomicU64,
}

impl Drain {
    /// Asks every connection, live or yet to be polled, to finish.
    fn start(&self) {
        self.draining.store(true, Ordering::SeqCst);
        let wakers = std::mem::take(&mut *self.wakers.lock().unwrap_or_else(|e| e.into_inner()));
        for w in wakers.into_values() {
            w.wake();
        }
    }
}

/// One connection's view of [`Drain`].
struct DrainWatch {
    drain: Arc<Drain>,
    id: u64,
    /// The waker registered last (`None`: not registered yet).
    waker: Option<Waker>,
}

impl DrainWatch {
    fn new(drain: Arc<Drain>) -> DrainWatch {
        let id = drain.next_id.fetch_add(1, Ordering::Relaxed);
        DrainWatch {
            drain,
            id,
            waker: None,
        }
    }

    /// Whether draining has started; if not, the task of `cx` is woken when it does.
    fn poll_draining(&mut self, cx: &Context<'_>) -> bool {
        if self.drain.draining.load(Ordering::SeqCst) {
            return true;
        }
        if !self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            let waker = cx.waker().clone();
            self.drain
                .wakers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(self.id, waker.clone());
            self.waker = Some(waker);
            // `start` may have taken the wakers just before this one went in.
            return self.drain.draining.load(Ordering::SeqCst);
        }
        false
    }
}

impl Drop for DrainWatch {
    fn drop(&mut self) {
        if self.waker.is_some() {
            self.drain
                .wakers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&self.id);
        }
    }
}

/// A connection that starts its graceful shutdown once its [`DrainWatch`] says so.
struct Drained<'a, C> {
    conn: Pin<&'a mut C>,
    watch: DrainWatch,
    asked: bool,
}

impl<C: GracefulConnection> Drained<'_, C> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<C::Output> {
        if !self.asked && self.watch.poll_draining(cx) {
            self.asked = true;
            self.conn.as_mut().graceful_shutdown();
        }
        self.conn.as_mut().poll(cx)
    }
}

/// How a connection's wait for its first request ended (`Conn::serve_http`).
enum First<R> {
    /// The connection ended (with this result) before or while serving it.
    Ended(R),
    /// A request arrived; the connection goes on without the first-request deadline.
    Requested,
    /// No request before the deadline.
    TimedOut,
}

/// A panicking handler costs its request a 500, not the whole connection (on HTTP/1 the handler
/// runs inside the connection's task).
fn guarded(response: ResponseFuture, peer: SocketAddr, close_on_error: bool) -> Guarded {
    Guarded {
        response,
        peer,
        close_on_error,
    }
}

/// Whether a request says a body follows its head. An error answered to such a request closes
/// the connection (`Connection: close`, see [`Guarded`]): the answer may come before the body
/// was read (a 413, a 401, an app that answered early), and hyper decides whether to keep the
/// connection only after it has written the head, by what is left unread at that moment.
/// Without the header a client could be told "keep-alive", reuse the connection for its next
/// request, and lose that request when the server then closes it. Said up front, the client
/// never reuses it, and the connection lingers ([`FramingCheck`]) so the answer is read before
/// the close.
fn carries_body(headers: &hyper::HeaderMap) -> bool {
    headers.contains_key(hyper::header::TRANSFER_ENCODING)
        || headers
            .get(hyper::header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
}

/// The future [`guarded`] returns: a named type, so hyper holds it as it is, with no box of its
/// own around the handler's (one allocation and one dynamic poll less per request).
struct Guarded {
    response: ResponseFuture,
    peer: SocketAddr,
    /// An error answer closes the connection ([`carries_body`]).
    close_on_error: bool,
}

impl Future for Guarded {
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let mut resp =
            match std::panic::catch_unwind(AssertUnwindSafe(|| this.response.as_mut().poll(cx))) {
                Ok(Poll::Ready(resp)) => resp,
                Ok(Poll::Pending) => return Poll::Pending,
                Err(_) => {
                    tracing::error!(peer = %this.peer, "handler panicked");
                    ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "internal",
                        "internal error",
                    )
                    .into_response()
                }
            };
        if this.close_on_error && resp.status().as_u16() >= 400 {
            resp.headers_mut().insert(
                hyper::header::CONNECTION,
                hyper::header::HeaderValue::from_static("close"),
            );
        }
        Poll::Ready(Ok(resp))
    }
}

/// 400 `bad_framing` for a request whose framing headers [`FramingCheck`] found ambiguous
/// (both `Content-Length` and `Transfer-Encoding`, or several lengths), on every host and
/// before any handler; the connection closes after it, so nothing sent behind it is read.
fn bad_framing(req: &Request<Incoming>) -> Option<Response<Body>> {
    let marker = req.headers().get(&framing::MARKER_NAME)?;
    let mut resp = if marker.as_bytes() == framing::HEAD_TOO_LARGE.as_bytes() {
        ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "head_too_large",
            "the request line and headers together are longer than the edge accepts",
        )
    } else {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_framing",
            "a request may carry either Content-Length (once) or Transfer-Encoding, not both",
        )
    }
    .into_response();
    let h = resp.headers_mut();
    h.insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("close"),
    );
    Some(resp)
}

/// 421 when a TLS client's Host is not the name it did the handshake for. Without this, a
/// browser that coalesced two hosts under one wildcard certificate onto one HTTP/2 connection
/// would have its request for host B answered on the connection set up for host A; 421 tells it
/// to open a proper connection. Requests without SNI (IP literals) or without a Host are left
/// to the router. `host` is the request's, [`RequestHost::of`] (there whenever there is an SNI).
fn misdirected(host: Option<&RequestHost>, info: &ConnInfo) -> Option<Response<Body>> {
    let sni = info.sni.as_deref()?;
    let matches = match host? {
        RequestHost::Missing => return None,
        RequestHost::Invalid => false,
        RequestHost::Name(name) => sni_matches(sni, name),
    };
    if matches {
        return None;
    }
    Some(
        ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            "misdirected_request",
            "the Host of this request does not match the TLS server name of the connection",
        )
        .into_response(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty};
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::task::JoinHandle;

    struct Server {
        addr: SocketAddr,
        stop: watch::Sender<bool>,
        task: JoinHandle<anyhow::Result<()>>,
    }

    async fn start(handler: Arc<dyn Handler>, cfg: ListenerConfig, grace: Duration) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(serve(listener, None, handler, cfg, rx, grace));
        Server { addr, stop, task }
    }

    fn cfg() -> ListenerConfig {
        ListenerConfig {
            tls_handshake_timeout: Duration::from_secs(2),
            header_read_timeout: Duration::from_secs(1),
            max_header_bytes: 16 * 1024,
            max_connections: 64,
        }
    }

    /// Echoes what the handler saw; `/sleep` waits 500 ms, `/long` 10 s, `/panic` panics, and
    /// `Upgrade: echo` switches protocols and echoes bytes.
    fn echo_handler() -> Arc<dyn Handler> {
        Arc::new(
            |mut req: Request<Incoming>, conn: Arc<ConnInfo>| async move {
                match req.uri().path() {
                    "/sleep" => tokio::time::sleep(Duration::from_millis(500)).await,
                    "/long" => tokio::time::sleep(Duration::from_secs(10)).await,
                    "/panic" => panic!("test handler panic"),
                    _ => {}
                }
                if req.headers().get("upgrade").map(|v| v.as_bytes()) == Some(b"echo") {
                    let on_upgrade = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        let Ok(upgraded) = on_upgrade.await else {
                            return;
                        };
                        let mut io = TokioIo::new(upgraded);
                        let mut buf = [0u8; 64];
                        // Bounded: echoes until the client closes or 10 rounds.
                        for _ in 0..10 {
                            match io.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    if io.write_all(&buf[..n]).await.is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                    });
                    let mut resp = Response::new(crate::http::empty());
                    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                    resp.headers_mut().insert(
                        "connection",
                        hyper::header::HeaderValue::from_static("upgrade"),
                    );
                    resp.headers_mut()
                        .insert("upgrade", hyper::header::HeaderValue::from_static("echo"));
                    return resp;
                }
                let body = format!(
                    "{} {:?} tls={} peer_is_loopback={} local={}",
                    req.uri().path(),
                    req.version(),
                    conn.tls,
                    conn.peer.ip().is_loopback(),
                    conn.local
                );
                Response::new(crate::http::full(body))
            },
        )
    }

    async fn http1_get(addr: SocketAddr, path: &str) -> anyhow::Result<(StatusCode, String)> {
        let stream = TcpStream::connect(addr).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = Request::get(path)
            .header("host", "localhost")
            .body(Empty::<bytes::Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// Reads until EOF or error (or `limit`), returning what arrived and when the stream ended.
    async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return (got, true),
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                Err(_) => return (got, false),
            }
        }
    }

    async fn stop(server: Server) {
        let _ = server.stop.send(true);
        let res = tokio::time::timeout(Duration::from_secs(5), server.task)
            .await
            .expect("serve returns after shutdown")
            .expect("serve task did not panic");
        res.expect("serve returns Ok");
    }

    /// A waker that counts its wakes.
    struct CountWake(std::sync::atomic::AtomicUsize);
    impl std::task::Wake for CountWake {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn drain_wakes_registered_connections_once_and_is_seen_by_later_ones() {
        let drain = Arc::new(Drain::default());
        let count = Arc::new(CountWake(Default::default()));
        let waker = Waker::from(count.clone());
        let cx = Context::from_waker(&waker);
        let mut a = DrainWatch::new(drain.clone());
        let mut b = DrainWatch::new(drain.clone());
        assert!(!a.poll_draining(&cx) && !b.poll_draining(&cx));
        // Polled again with the same waker: nothing registered anew.
        assert!(!a.poll_draining(&cx));
        assert_eq!(drain.wakers.lock().unwrap().len(), 2);
        drop(b);
        assert_eq!(
            drain.wakers.lock().unwrap().len(),
            1,
            "a dropped watch leaves"
        );
        drain.start();
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "the live one was woken");
        assert!(a.poll_draining(&cx));
        // A connection accepted during the drain sees it at its first poll.
        let mut late = DrainWatch::new(drain.clone());
        assert!(late.poll_draining(&cx));
        drop((a, late));
        assert!(drain.wakers.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn plain_http1_request() {
        let server = start(echo_handler(), cfg(), Duration::from_secs(1)).await;
        let (status, body) = http1_get(server.addr, "/hello").await.expect("request");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            format!(
                "/hello HTTP/1.1 tls=false peer_is_loopback=true local={}",
                server.addr
            )
        );
        stop(server).await;
    }

    #[tokio::test]
    async fn http2_prior_knowledge() {
        let server = start(echo_handler(), cfg(), Duration::from_secs(1)).await;
        let stream = TcpStream::connect(server.addr).await.expect("connect");
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .expect("h2 handshake");
        tokio::spawn(conn);
        // Two streams on one connection, to show it is really multiplexed HTTP/2.
        for path in ["/a", "/b"] {
            let req = Request::get(format!("http://localhost{path}"))
                .body(Empty::<bytes::Bytes>::new())
                .expect("request");
            let resp = sender.send_request(req).await.expect("response");
            assert_eq!(resp.version(), hyper::Version::HTTP_2);
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            assert!(
                body.starts_with(format!("{path} HTTP/2.0 tls=false").as_bytes()),
                "{body:?}"
            );
        }
        stop(server).await;
    }

    #[tokio::test]
    async fn slow_loris_is_cut_off_while_others_are_served() {
        let server = start(echo_handler(), cfg(), Duration::from_secs(1)).await;
        let started = Instant::now();
        let mut loris = TcpStream::connect(server.addr).await.expect("connect");
        loris
            .write_all(b"GET / HTTP/1.1\r\nHo")
            .await
            .expect("write");
        let (mut reader, mut writer) = loris.into_split();
        // One byte a second, for at most 8 seconds; stops as soon as a write fails.
        let trickle = tokio::spawn(async move {
            for b in b"st: localhost\r\n\r\n".iter().take(8) {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if writer.write_all(&[*b]).await.is_err() {
                    return;
                }
            }
        });

        // Meanwhile a well-behaved client is served at once.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (status, _) = http1_get(server.addr, "/ok").await.expect("normal client");
        assert_eq!(status, StatusCode::OK);
        // ... while the slow one is still connected: it did not have to wait for it.
        let mut probe = [0u8; 1];
        assert!(
            matches!(reader.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "slow client was already gone when the normal one was served"
        );

        let mut buf = [0u8; 1024];
        let closed = tokio::time::timeout(Duration::from_secs(4), async {
            loop {
                match reader.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    // hyper may answer 408 before closing; keep reading until the close.
                    Ok(_) => {}
                }
            }
        })
        .await;
        let elapsed = started.elapsed();
        trickle.abort();
        assert!(
            closed.is_ok(),
            "slow client still connected after {elapsed:?}"
        );
        assert!(
            elapsed >= Duration::from_millis(900) && elapsed < Duration::from_millis(2500),
            "closed after {elapsed:?}, expected about the 1 s header timeout"
        );
        stop(server).await;
    }

    #[tokio::test]
    async fn slow_second_request_on_keep_alive_is_cut_off() {
        // After a first request the connection-level deadline is over; hyper's HTTP/1 header
        // timer is what bounds the next head (and idle keep-alive).
        let server = start(echo_handler(), cfg(), Duration::from_secs(1)).await;
        let mut stream = TcpStream::connect(server.addr).await.expect("connect");
        stream
            .write_all(b"GET /first HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf))
            .await
            .expect("first response in time")
            .expect("read");
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        // Well past the connection-level deadline, then a trickled second head.
        tokio::time::sleep(Duration::from_millis(700)).await;
        let started = Instant::now();
        let _ = stream.write_all(b"GET /second HTTP/1.1\r\nHo").await;
        let mut closed = false;
        for b in b"st: localhost\r\n\r\n".iter().take(5) {
            let (got, eof) = read_until_closed(&mut stream, Duration::from_millis(500)).await;
            assert!(
                !got.starts_with(b"HTTP/1.1 200"),
                "second request was served"
            );
            if eof || stream.write_all(&[*b]).await.is_err() {
                closed = true;
                break;
            }
        }
        assert!(
            closed,
            "slow second request still open after {:?}",
            started.elapsed()
        );
        // The timer runs from the end of the first response, so it fires at most ~1 s after it.
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "{:?}",
            started.elapsed()
        );
        stop(server).await;
    }

    #[tokio::test]
    async fn silent_and_h2_preface_trickling_clients_are_cut_off() {
        let server = start(echo_handler(), cfg(), Duration::from_secs(1)).await;
        let started = Instant::now();
        let mut silent = TcpStream::connect(server.addr).await.expect("connect");
        // A prefix of the HTTP/2 preface keeps hyper-util's protocol sniffing waiting.
        let mut sniffing = TcpStream::connect(server.addr).await.expect("connect");
        sniffing.write_all(b"PRI * HTTP/2").await.expect("write");
        let (a, b) = tokio::join!(
            read_until_closed(&mut silent, Duration::from_secs(4)),
            read_until_closed(&mut sniffing, Duration::from_secs(4)),
        );
        assert!(a.1 && b.1, "both closed");
        assert!(started.elapsed() < Duration::from_millis(2500));
        // An HTTP/2 client that finishes the preface but never sends a request.
        let idle = TcpStream::connect(server.addr).await.expect("connect");
        let (_sender, conn) = hyper::client::conn::http2::handshake::<_, _, Empty<bytes::Bytes>>(
            TokioExecutor::new(),
            TokioIo::new(idle),
        )
        .await
        .expect("h2 handshake");
        let started = Instant::now();
        let ended = tokio::time::timeout(Duration::from_secs(4), conn).await;
        assert!(
            ended.is_ok(),
            "idle HTTP/2 connection was closed by the server"
        );
        assert!(started.elapsed() < Duration::from_millis(2500));
        stop(server).await;
    }

    #[tokio::test]
    async fn oversized_headers_get_431() {
        let server = start(echo_handler(), cfg(), Duration::from_secs(1)).await;
        let mut stream = TcpStream::connect(server.addr).await.expect("connect");
        let big = "a".repeat(32 * 1024);
        let req = format!("GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: {big}\r\n\r\n");
        // The server may close before reading everything; a failed write is fine.
        let _ = stream.write_all(req.as_bytes()).await;
        let (got, closed) = read_until_closed(&mut stream, Duration::from_secs(3)).await;
        assert!(closed);
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 431"), "{text:?}");
        stop(server).await;
    }

    #[tokio::test]
    async fn panicking_handler_gets_500() {
        let server = start(echo_handler(), cfg(), Duration::from_secs(1)).await;
        let (status, body) = http1_get(server.addr, "/panic").await.expect("request");
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(body.contains("\"code\":\"internal\""), "{body}");
        let (status, _) = http1_get(server.addr, "/after").await.expect("request");
        assert_eq!(status, StatusCode::OK, "server still serving");
        stop(server).await;
    }

    #[tokio::test]
    async fn http1_upgrade_round_trip() {
        let server = start(echo_handler(), cfg(), Duration::from_secs(1)).await;
        let mut stream = TcpStream::connect(server.addr).await.expect("connect");
        stream
            .write_all(b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n")
            .await
            .expect("write");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        // Read exactly the response head, byte by byte, so no echoed data is swallowed.
        while !head.ends_with(b"\r\n\r\n") && head.len() < 4096 {
            let n = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut byte))
                .await
                .expect("head in time")
                .expect("read");
            assert_eq!(n, 1, "connection closed during the head");
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head);
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        for msg in [&b"ping"[..], b"second message"] {
            stream.write_all(msg).await.expect("write");
            let mut back = vec![0u8; msg.len()];
            tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut back))
                .await
                .expect("echo in time")
                .expect("read");
            assert_eq!(back, msg);
        }
        stop(server).await;
    }

    #[tokio::test]
    async fn graceful_shutdown_finishes_in_flight_requests() {
        let server = start(echo_handler(), cfg(), Duration::from_secs(3)).await;
        let addr = server.addr;
        let in_flight = tokio::spawn(async move { http1_get(addr, "/sleep").await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = Instant::now();
        stop(server).await;
        let elapsed = started.elapsed();
        let (status, body) = in_flight
            .await
            .expect("client task")
            .expect("in-flight request completed");
        assert_eq!(status, StatusCode::OK);
        assert!(body.starts_with("/sleep"), "{body}");
        assert!(
            elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(2),
            "serve waited for the request, then returned: {elapsed:?}"
        );
        // The listening socket is closed.
        assert!(TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn grace_period_bounds_shutdown() {
        let server = start(echo_handler(), cfg(), Duration::from_millis(300)).await;
        let addr = server.addr;
        let in_flight = tokio::spawn(async move { http1_get(addr, "/long").await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = Instant::now();
        stop(server).await;
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        let res = tokio::time::timeout(Duration::from_secs(2), in_flight)
            .await
            .expect("client saw the connection close")
            .expect("client task");
        assert!(res.is_err(), "the 10 s request was cut off");
    }

    #[tokio::test]
    async fn connections_over_the_cap_wait_for_a_slot() {
        let cfg = ListenerConfig {
            max_connections: 1,
            header_read_timeout: Duration::from_secs(5),
            ..cfg()
        };
        let server = start(echo_handler(), cfg, Duration::from_secs(1)).await;
        // The first connection takes the only slot and stays open (keep-alive).
        let first = TcpStream::connect(server.addr).await.expect("connect");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(first))
            .await
            .expect("handshake");
        let first_conn = tokio::spawn(conn);
        let req = Request::get("/one")
            .header("host", "localhost")
            .body(Empty::<bytes::Bytes>::new())
            .expect("request");
        let resp = sender.send_request(req).await.expect("first response");
        assert_eq!(resp.status(), StatusCode::OK);
        let _ = resp.into_body().collect().await;

        // The second connects (kernel backlog) but is not served while the first holds the slot.
        let addr = server.addr;
        let mut second = tokio::spawn(async move { http1_get(addr, "/two").await });
        let waited = tokio::time::timeout(Duration::from_millis(400), &mut second).await;
        assert!(waited.is_err(), "second connection was served over the cap");

        // Closing the first frees the slot.
        drop(sender);
        first_conn.abort();
        let (status, _) = tokio::time::timeout(Duration::from_secs(2), second)
            .await
            .expect("served once the slot freed")
            .expect("client task")
            .expect("request");
        assert_eq!(status, StatusCode::OK);
        stop(server).await;
    }

    #[tokio::test]
    async fn dropped_shutdown_sender_stops_the_listener() {
        let server = start(echo_handler(), cfg(), Duration::from_secs(1)).await;
        drop(server.stop);
        let res = tokio::time::timeout(Duration::from_secs(2), server.task).await;
        assert!(matches!(res, Ok(Ok(Ok(())))));
    }

    /// A request whose body the answer refuses unread (a 413 before the upload is in): the
    /// connection is closed after the answer, but the client, still sending, must be able to
    /// read that answer. Closing with its unread bytes in our buffer would reset the connection
    /// and could destroy the answer before the client read it; the close lingers instead.
    #[tokio::test]
    async fn an_answer_to_a_refused_upload_reaches_the_client_still_sending() {
        let handler: Arc<dyn Handler> =
            Arc::new(|_req: Request<Incoming>, _c: Arc<ConnInfo>| async {
                let mut resp = Response::new(crate::http::full("too large"));
                *resp.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
                resp
            });
        let server = start(handler, cfg(), Duration::from_secs(5)).await;
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        s.write_all(b"POST /up HTTP/1.1\r\nhost: x\r\ncontent-length: 50000000\r\n\r\n")
            .await
            .unwrap();
        // More than the server reads before it gives up on the body, sent while it answers.
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..8 {
            s.write_all(&chunk).await.expect("the upload is reset");
        }
        // The answer and the close have happened by now; the client sends a bit more still, as
        // a client that only reads once its upload is out does. Without lingering, the first of
        // these writes draws a reset and the next fails (and such clients lose the answer).
        tokio::time::sleep(Duration::from_millis(300)).await;
        for _ in 0..2 {
            s.write_all(&chunk).await.expect("the upload is reset");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
                Ok(Ok(0)) => break,
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                Ok(Err(e)) => panic!(
                    "reading the answer: {e} (after {:?})",
                    String::from_utf8_lossy(&got)
                ),
                Err(_) => panic!("no end of the answer within 5 s"),
            }
        }
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 413"), "{text}");
        let _ = server.stop.send(true);
    }

    #[test]
    fn a_body_is_said_by_its_length_or_a_transfer_coding() {
        let with = |pairs: &[(&'static str, &'static str)]| {
            let mut h = hyper::HeaderMap::new();
            for (k, v) in pairs {
                h.append(*k, hyper::header::HeaderValue::from_static(v));
            }
            carries_body(&h)
        };
        assert!(!with(&[]));
        assert!(!with(&[("content-length", "0")]));
        assert!(with(&[("content-length", "70000")]));
        assert!(with(&[("transfer-encoding", "chunked")]));
        assert!(with(&[
            ("content-length", "0"),
            ("transfer-encoding", "chunked")
        ]));
    }
}
