//! Edge threads: one current-thread tokio runtime per core, each with its own `SO_REUSEPORT`
//! listening socket on the same address.
//!
//! On the main (work-stealing) runtime a proxied request crossed threads several times: the
//! client connection's reads, the handler and the upstream connection's reads were woken on
//! whichever worker was free, each hop a futex wake-up and cold caches. Here the kernel spreads
//! new connections over the sockets (by the 4-tuple's hash), and a connection, its hyper state,
//! its request's handler and the upstream connection it takes from the thread's own pool
//! (`preview/pool.rs`) all live on one thread until it closes.
//!
//! The rest of the process (manager, engine client, store, idle policy, background tasks)
//! stays on the main runtime: [`main_runtime`] is set on edge threads, and the application
//! sends every request that is not the preview's hot path there (`app.rs`), so no engine
//! connection or long-lived task is ever owned by an edge thread.
//!
//! Shutdown: every loop sees the same shutdown signal and drains as [`listener::serve`] does,
//! under the same grace period; the connection cap is one semaphore shared by all loops.

use std::cell::RefCell;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, TcpSocket};
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use super::listener::{self, Handler, ListenerConfig};

/// Backlog of each listening socket (tokio's own default for `TcpListener::bind`).
const BACKLOG: u32 = 1024;

thread_local! {
    /// The main runtime, on edge threads only.
    static MAIN: RefCell<Option<Handle>> = const { RefCell::new(None) };
}

/// The main runtime when called on an edge thread, `None` elsewhere.
pub fn main_runtime() -> Option<Handle> {
    MAIN.with(|m| m.borrow().clone())
}

/// Whether the caller runs on an edge thread.
pub fn on_edge_thread() -> bool {
    MAIN.with(|m| m.borrow().is_some())
}

/// Runs `fut` on the main runtime when called on an edge thread (in place elsewhere) and
/// returns its output: whatever talks to the engine or the store, or spawns tasks that outlive
/// a request, must not be owned by an edge thread's runtime, which ends before the main one.
/// Dropping the returned future aborts the task. `None`: the task was cancelled (the main
/// runtime is shutting down). A panic in `fut` is raised again here.
pub async fn on_main<F>(fut: F) -> Option<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let Some(main) = main_runtime() else {
        return Some(fut.await);
    };
    match AbortOnDrop(main.spawn(fut)).await {
        Ok(v) => Some(v),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => None,
    }
}

/// A task handle that aborts its task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T> Future for AbortOnDrop<T> {
    type Output = Result<T, tokio::task::JoinError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx)
    }
}

/// The number of edge threads for a configured `edge_threads` (0 = one per core).
pub fn thread_count(configured: usize) -> usize {
    if configured > 0 {
        return configured;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Binds `n` listening sockets on `addr` with `SO_REUSEPORT`. Port 0: the first socket picks
/// the port and the others bind to it. Must run inside a tokio runtime.
///
/// A plain bind comes first and is closed at once: it fails while anything listens on the
/// address (another sandboxd included), which an `SO_REUSEPORT` group of the same user would
/// otherwise join silently, sharing the port.
pub fn bind(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<TcpListener>> {
    let probe = plain_socket(addr)
        .and_then(|s| s.bind(addr).map(|()| s))
        .with_context(|| format!("binding {addr}"))?;
    let addr = probe.local_addr()?;
    drop(probe);
    let first = bind_one(addr).with_context(|| format!("binding {addr}"))?;
    let addr = first.local_addr()?;
    let mut all = vec![first];
    for _ in 1..n.max(1) {
        all.push(bind_one(addr).with_context(|| format!("binding {addr} again (SO_REUSEPORT)"))?);
    }
    Ok(all)
}

/// A socket for `addr` with `SO_REUSEADDR`, as `TcpListener::bind` makes: a restart does not
/// wait for the last run's TIME_WAIT sockets (Linux still refuses it beside a listener).
fn plain_socket(addr: SocketAddr) -> std::io::Result<TcpSocket> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    Ok(socket)
}

fn bind_one(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = plain_socket(addr)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Serves each of `listeners` on an edge thread of its own (named `edge-<name>-<i>`), with one
/// connection cap for all. The returned future completes once every loop has drained after
/// `shutdown` (or failed). Must run inside the main runtime.
pub fn serve(
    listeners: Vec<TcpListener>,
    tls: Option<TlsAcceptor>,
    handler: Arc<dyn Handler>,
    cfg: ListenerConfig,
    shutdown: watch::Receiver<bool>,
    grace: Duration,
    name: &str,
) -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    let main = Handle::current();
    let slots = listener::connection_slots(&cfg);
    let mut done = Vec::with_capacity(listeners.len());
    for (i, l) in listeners.into_iter().enumerate() {
        // A tokio listener belongs to the runtime that registered it: hand the socket over bare.
        let l = l.into_std()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        done.push(rx);
        let (tls, handler, cfg, slots, shutdown, main) = (
            tls.clone(),
            handler.clone(),
            cfg.clone(),
            slots.clone(),
            shutdown.clone(),
            main.clone(),
        );
        let thread = format!("edge-{name}-{i}");
        std::thread::Builder::new()
            .name(thread.clone())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(%thread, error = %e, "edge runtime failed to start");
                        return;
                    }
                };
                MAIN.with(|m| *m.borrow_mut() = Some(main));
                let res = rt.block_on(async move {
                    let l = TcpListener::from_std(l)?;
                    listener::serve_shared(l, tls, handler, cfg, slots, shutdown, grace).await
                });
                if let Err(e) = res {
                    tracing::error!(%thread, error = format!("{e:#}"), "edge listener failed");
                }
                // What is left (a connection cut at the grace bound) goes with the runtime.
                rt.shutdown_timeout(Duration::from_secs(1));
                MAIN.with(|m| m.borrow_mut().take());
                let _ = tx.send(());
            })
            .context("starting an edge thread")?;
    }
    Ok(async move {
        for rx in done {
            // An error means the thread ended without saying so (it panicked): done as well.
            let _ = rx.await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::{Request, Response};
    use std::collections::HashSet;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// Answers with the name of the thread that served the request.
    fn thread_handler() -> Arc<dyn Handler> {
        Arc::new(|_req: Request<hyper::body::Incoming>, _conn| async move {
            let name = std::thread::current().name().unwrap_or("").to_owned();
            assert!(on_edge_thread(), "handler ran off the edge threads");
            Response::new(crate::http::full(name))
        })
    }

    async fn get(addr: SocketAddr) -> String {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
            .await
            .expect("answer in time")
            .expect("read");
        let text = String::from_utf8_lossy(&got).into_owned();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        text.rsplit("\r\n\r\n").next().unwrap_or("").to_owned()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn loops_share_the_port_and_all_stop_on_shutdown() {
        let listeners = bind("127.0.0.1:0".parse().unwrap(), 2).expect("bind");
        let addr = listeners[0].local_addr().unwrap();
        assert_ne!(addr.port(), 0);
        assert_eq!(listeners[1].local_addr().unwrap(), addr);
        let (stop, rx) = watch::channel(false);
        let cfg = ListenerConfig {
            header_read_timeout: Duration::from_secs(2),
            ..ListenerConfig::default()
        };
        let served = serve(
            listeners,
            None,
            thread_handler(),
            cfg,
            rx,
            Duration::from_secs(1),
            "test",
        )
        .expect("serve");
        let served = tokio::spawn(served);

        // The kernel spreads connections by their 4-tuple's hash: with 64 of them, both
        // sockets get some (all on one has probability 2^-63).
        let mut threads = HashSet::new();
        for _ in 0..64 {
            threads.insert(get(addr).await);
        }
        assert_eq!(
            threads,
            HashSet::from(["edge-test-0".to_owned(), "edge-test-1".to_owned()]),
            "every loop accepted connections"
        );

        stop.send(true).expect("signal");
        tokio::time::timeout(Duration::from_secs(3), served)
            .await
            .expect("every loop stopped")
            .expect("no panic");
        // Both sockets are closed: nothing accepts on the port any more.
        for _ in 0..8 {
            assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
        }
    }

    #[tokio::test]
    async fn an_address_in_use_is_refused_not_shared() {
        let first = bind("127.0.0.1:0".parse().unwrap(), 2).expect("bind");
        let addr = first[0].local_addr().unwrap();
        let err = bind(addr, 2).expect_err("a second group on a port in use");
        assert!(format!("{err:#}").contains("in use"), "{err:#}");
        drop(first);
        // Free again once the first group has closed.
        let again = bind(addr, 2).expect("rebind after close");
        assert_eq!(again[0].local_addr().unwrap(), addr);
    }

    #[test]
    fn thread_count_defaults_to_the_cores() {
        assert_eq!(thread_count(3), 3);
        assert!(thread_count(0) >= 1);
        assert!(!on_edge_thread());
    }
}
