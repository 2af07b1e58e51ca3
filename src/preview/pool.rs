//! The upstream HTTP/1.1 connection pool of plain preview requests, driven inside the request.
//!
//! hyper-util's legacy client runs every upstream connection as a task of its own: each request
//! crossed to that task (the pool's hand-off, a channel), and its answer and every body chunk
//! crossed back, each crossing a wake-up of another task, often on the other worker thread.
//! Here an upstream connection (hyper's `client::conn::http1`) has no task: whoever holds it
//! polls its driver, the request's future while the head is awaited and then the response
//! body ([`PooledBody`]) while the client's connection streams it, so one task does the whole
//! exchange. Once the body has ended the connection goes back to the pool; a connection the
//! app closed while it sat idle is found out at the next checkout (its driver ends) and dropped.
//! Idle connections expire after `idle_timeout` (under Node's 5 s keep-alive, so the pool never
//! reuses a socket the app is closing), at most `max_idle_per_host` are kept per address, and a
//! sweeper task drops expired ones while no request comes. Those to a sandbox that is about to
//! stop are closed at once ([`Pool::closer`]), while the app can still answer their FIN.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::http::Body;

type Driver = Pin<Box<http1::Connection<TokioIo<TcpStream>, Body>>>;

/// Why no answer came from the upstream.
#[derive(Debug)]
pub(super) enum UpstreamError {
    /// No connection could be made (refused, unreachable, timed out): nothing was sent.
    Connect(std::io::Error),
    /// The exchange failed after the request was handed to a connection.
    Http(hyper::Error),
}

impl UpstreamError {
    pub(super) fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Connect(_))
    }
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::Connect(e) => write!(f, "connecting to the app: {e}"),
            UpstreamError::Http(e) => write!(f, "upstream exchange: {e}"),
        }
    }
}

/// One upstream connection: the handle requests are sent on and the driver that does its I/O.
pub(super) struct Conn {
    sender: http1::SendRequest<Body>,
    /// `None` once it has returned: the connection is closed (or failed). It is dropped then,
    /// which is what hands a request it had not taken back to its sender, and fails the one
    /// in flight, instead of leaving them waiting.
    driver: Option<Driver>,
    addr: SocketAddr,
    /// Taken from the pool rather than made for this request.
    reused: bool,
}

impl Conn {
    /// Polls the driver unless it has ended; its result only matters through the sender and
    /// the response, which report the failure themselves.
    fn drive(&mut self, cx: &mut Context<'_>) {
        poll_driver(&mut self.driver, cx);
    }

    fn ended(&self) -> bool {
        self.driver.is_none()
    }

    /// Waits until the connection can take a request; `false` when it closed.
    async fn ready(&mut self) -> bool {
        poll_fn(|cx| {
            self.drive(cx);
            match self.sender.poll_ready(cx) {
                Poll::Ready(r) => Poll::Ready(r.is_ok()),
                Poll::Pending if self.ended() => Poll::Ready(false),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }

    /// Sends `req` and waits for the response head, driving the connection meanwhile. On
    /// failure, the request comes back when it was not sent at all.
    async fn send(
        &mut self,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, (hyper::Error, Option<Request<Body>>)> {
        let mut answer = std::pin::pin!(self.sender.try_send_request(req));
        let driver = &mut self.driver;
        poll_fn(|cx| {
            poll_driver(driver, cx);
            answer.as_mut().poll(cx)
        })
        .await
        .map_err(|mut e| {
            let req = e.take_message();
            (e.into_error(), req)
        })
    }
}

/// Polls `driver` and drops it once it has returned (see [`Conn::driver`]).
fn poll_driver(driver: &mut Option<Driver>, cx: &mut Context<'_>) {
    if let Some(d) = driver {
        if d.as_mut().poll(cx).is_ready() {
            *driver = None;
        }
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
    idle: Mutex<HashMap<SocketAddr, Vec<Idle>>>,
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
            idle: Mutex::new(HashMap::new()),
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

    /// Sends `req` to `addr` on an idle connection, or a new one. A request that a reused
    /// connection did not take (the app had closed it) is sent again on another one; any
    /// other failure is returned. The response's body keeps the connection until it ends.
    pub(super) async fn send(
        &self,
        addr: SocketAddr,
        mut req: Request<Body>,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        loop {
            let mut conn = match self.checkout(addr).await {
                Some(c) => c,
                // Boxed: a new connection is the rare case, and its future (connect, handshake)
                // would otherwise make every request's future larger.
                None => Box::pin(self.connect(addr)).await?,
            };
            match conn.send(req).await {
                Ok(resp) => {
                    let (parts, body) = resp.into_parts();
                    let mut body = PooledBody {
                        inner: body,
                        conn: Some(conn),
                        pool: Arc::downgrade(&self.0),
                    };
                    // No body to stream (HEAD, 204, 304, `Content-Length: 0`): the connection
                    // is free already.
                    if body.inner.is_end_stream() {
                        body.release();
                    }
                    return Ok(Response::from_parts(parts, body));
                }
                // Not sent: the idle connection had been closed by the app meanwhile.
                Err((_, Some(back))) if conn.reused => req = back,
                Err((e, _)) => return Err(UpstreamError::Http(e)),
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
                if list.is_empty() {
                    idle.remove(&addr);
                }
                found?
            };
            if conn.ready().await {
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
        let (sender, driver) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(UpstreamError::Http)?;
        self.start_sweeper();
        Ok(Conn {
            sender,
            driver: Some(Box::pin(driver)),
            addr,
            reused: false,
        })
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
        if conn.ended() {
            return;
        }
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

/// A response body from the pool: it drives its connection while it streams and gives it
/// back once it has ended (a body dropped before its end closes the connection).
pub(super) struct PooledBody {
    inner: Incoming,
    conn: Option<Conn>,
    pool: Weak<Inner>,
}

impl PooledBody {
    fn release(&mut self) {
        if let (Some(conn), Some(pool)) = (self.conn.take(), self.pool.upgrade()) {
            pool.checkin(conn);
        }
    }
}

impl hyper::body::Body for PooledBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let mut polled = Pin::new(&mut this.inner).poll_frame(cx);
        if polled.is_pending() {
            if let Some(conn) = this.conn.as_mut() {
                // The driver moves the next bytes into the body's channel.
                conn.drive(cx);
                polled = Pin::new(&mut this.inner).poll_frame(cx);
            }
        }
        match &polled {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.release(),
            Poll::Ready(Some(Err(_))) => this.conn = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // Read to its end (hyper may not poll a body it knows is empty): reusable.
        if self.inner.is_end_stream() {
            self.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
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
        let (addr, accepted) = app("hello", usize::MAX).await;
        let pool = pool();
        let resp = pool.send(addr, get()).await.unwrap();
        drop(resp);
        assert_eq!(pool.idle_count(), 0);
        let resp = pool.send(addr, get()).await.unwrap();
        assert_eq!(text(resp).await, "hello");
        assert_eq!(*accepted.lock().unwrap(), 2);
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
}
