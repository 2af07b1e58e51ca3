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
//!   keep-alive gap, and `max_buf_size` bounds the head's size (431 past it);
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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use super::router::{request_host, sni_matches_host};
use crate::http::{full, Body};

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
    fn handle(
        &self,
        req: Request<Incoming>,
        conn: Arc<ConnInfo>,
    ) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>>;
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
    /// Largest request head accepted. HTTP/1 answers 431 beyond it; hyper needs at least 8 KiB,
    /// smaller values are raised to that.
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

/// hyper refuses (panics on) a smaller HTTP/1 read buffer.
const MIN_HTTP1_BUF: usize = 8 * 1024;
/// Pause after a failed `accept`: errors like EMFILE repeat immediately, and spinning on them
/// would starve the connections that could free descriptors.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);
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
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) -> anyhow::Result<()> {
    let builder = Arc::new(http_builder(&cfg));
    let slots = Arc::new(Semaphore::new(cfg.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
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
                    // Taken here, in the loop, so that a shutdown signalled while this
                    // connection is still in its TLS handshake is seen by it too.
                    watcher: graceful.watcher(),
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
        graceful.shutdown().await;
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
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        .max_buf_size(cfg.max_header_bytes.max(MIN_HTTP1_BUF))
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
    watcher: Watcher,
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
            return self.serve_http(stream, info).await;
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
        self.serve_http(stream, info).await
    }

    async fn serve_http<S>(self, stream: S, info: ConnInfo)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let peer = info.peer;
        let info = Arc::new(info);
        let got_request = Arc::new(AtomicBool::new(false));
        let service = {
            let handler = self.handler.clone();
            let got_request = got_request.clone();
            hyper::service::service_fn(move |req: Request<Incoming>| {
                got_request.store(true, Ordering::Relaxed);
                let info = info.clone();
                let response: ResponseFuture = match misdirected(&req, &info) {
                    Some(resp) => Box::pin(std::future::ready(resp)),
                    None => handler.handle(req, info),
                };
                guarded(response, peer)
            })
        };
        let conn = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service);
        let conn = self.watcher.watch(conn);
        tokio::pin!(conn);

        // hyper's header timer starts only once HTTP/1 has been chosen; this deadline covers the
        // protocol sniffing before it and HTTP/2 connections that never send a request.
        let first = tokio::select! {
            res = &mut conn => Some(res),
            () = tokio::time::sleep(self.first_request_timeout) => None,
        };
        let res = match first {
            Some(res) => res,
            None if !got_request.load(Ordering::Relaxed) => {
                tracing::debug!(%peer, "no request before the header timeout; closing");
                return;
            }
            None => conn.await,
        };
        if let Err(e) = res {
            // Client-side disconnects and timeouts are routine at an edge; not worth a warning.
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
    }
}

type ResponseFuture = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;

/// A panicking handler costs its request a 500, not the whole connection (on HTTP/1 the handler
/// runs inside the connection's task).
fn guarded(
    response: ResponseFuture,
    peer: SocketAddr,
) -> Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>> {
    Box::pin(async move {
        match AssertUnwindSafe(response).catch_unwind().await {
            Ok(resp) => Ok(resp),
            Err(_) => {
                tracing::error!(%peer, "handler panicked");
                Ok(error_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error",
                ))
            }
        }
    })
}

/// 421 when a TLS client's Host is not the name it did the handshake for. Without this, a
/// browser that coalesced two hosts under one wildcard certificate onto one HTTP/2 connection
/// would have its request for host B answered on the connection set up for host A; 421 tells it
/// to open a proper connection. Requests without SNI (IP literals) or without a Host are left
/// to the router.
fn misdirected(req: &Request<Incoming>, info: &ConnInfo) -> Option<Response<Body>> {
    let sni = info.sni.as_deref()?;
    let host = request_host(req)?;
    if sni_matches_host(sni, host) {
        return None;
    }
    Some(error_response(
        StatusCode::MISDIRECTED_REQUEST,
        "misdirected_request",
        "the Host of this request does not match the TLS server name of the connection",
    ))
}

fn error_response(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({ "code": code, "message": message }).to_string();
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}
