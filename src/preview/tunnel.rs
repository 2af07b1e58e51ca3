//! WebSocket (or any HTTP/1.1 upgrade, e.g. Vite HMR): a dedicated upstream connection, the
//! handshake forwarded, then bytes both ways with `hyper::upgrade::on` on both sides. Client
//! traffic on a tunnel counts as activity and wakes a paused sandbox.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Waker};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::forward::{forwarded_headers, strip_hop_by_hop, upgrade_matches};
use super::upstream::Via;
use super::{PreviewError, Proxy};
use crate::edge::listener::ConnInfo;
use crate::edge::upgraded::Plain;
use crate::http::error::ApiError;
use crate::http::Body;
use crate::sandbox::Manager;
use crate::user::UserId;

/// Per direction of a tunnel. Idle HMR sockets are the common case and there can be thousands:
/// 4 KiB keeps an idle tunnel's memory small (16 KiB buffers cost ~28 KiB per tunnel in the
/// density benchmark) while WebSocket messages, small as they are, still move in one read.
const TUNNEL_BUF: usize = 4 * 1024;

fn upgrade_failed() -> PreviewError {
    PreviewError::Api(ApiError::new(
        StatusCode::BAD_GATEWAY,
        "upstream_error",
        "upgrade failed",
    ))
}

/// Bounded: an address that went away with its container would otherwise hang for the
/// kernel's connect timeout.
async fn connect(addr: SocketAddr) -> Option<TcpStream> {
    let s = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    let _ = s.set_nodelay(true);
    Some(s)
}

/// The open tunnels by sandbox address. A sandbox about to stop has its tunnels closed while
/// its app can still answer their FIN, like the pool's idle connections (see
/// `Manager::on_stopping`): closed only once the app is gone, our FIN is retransmitted to an
/// address nobody holds, and the next wake of that sandbox waits on ARP.
#[derive(Default)]
pub(super) struct Tunnels(Mutex<HashMap<IpAddr, Weak<Notify>>>);

impl Tunnels {
    /// The signal the tunnels to `ip` wait on: one per address while any of them is open.
    fn watch(&self, ip: IpAddr) -> Arc<Notify> {
        let mut by_ip = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = by_ip.get(&ip).and_then(Weak::upgrade) {
            return n;
        }
        // A new address: forget those whose tunnels all ended (as many as sandboxes).
        by_ip.retain(|_, n| n.strong_count() > 0);
        let n = Arc::new(Notify::new());
        by_ip.insert(ip, Arc::downgrade(&n));
        n
    }

    /// A `Manager::on_stopping` hook: ends every tunnel to the address.
    pub(super) fn closer(self: &Arc<Self>) -> impl Fn(IpAddr) + Send + Sync + 'static {
        let tunnels = Arc::downgrade(self);
        move |ip| {
            let Some(tunnels) = tunnels.upgrade() else {
                return;
            };
            let n = tunnels
                .0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&ip);
            if let Some(n) = n.and_then(|n| n.upgrade()) {
                n.notify_waiters();
            }
        }
    }
}

impl Proxy {
    pub(super) async fn tunnel(
        &self,
        mut req: Request<Incoming>,
        conn: &ConnInfo,
        user: UserId,
        addr: SocketAddr,
    ) -> Result<Response<Body>, PreviewError> {
        let stream = match connect(addr).await {
            Some(s) => s,
            None => {
                let addr = self.ready_addr(&user, addr.port(), Via::Manager).await?;
                connect(addr)
                    .await
                    .ok_or(PreviewError::NotListening { port: addr.port() })?
            }
        };
        let (mut sender, connection) =
            match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(user = %user, error = %e, "preview upgrade handshake");
                    return Err(upgrade_failed());
                }
            };
        tokio::spawn(async move {
            let _ = connection.with_upgrades().await;
        });
        let client_upgrade = hyper::upgrade::on(&mut req);
        let host = crate::edge::router::request_host(&req).map(str::to_owned);
        let (mut parts, _body) = req.into_parts();
        // Keep Connection/Upgrade for the handshake; drop the other hop-by-hop headers.
        let asked = parts.headers.get(header::UPGRADE).cloned();
        strip_hop_by_hop(&mut parts.headers);
        if let Some(u) = asked.clone() {
            parts.headers.insert(header::UPGRADE, u);
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        forwarded_headers(&mut parts.headers, conn, host.as_deref());
        if let Some(h) = host.as_deref().and_then(|h| HeaderValue::from_str(h).ok()) {
            parts.headers.insert(header::HOST, h);
        }
        parts.uri = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .parse()
            .unwrap_or_else(|_| Uri::from_static("/"));
        parts.version = hyper::Version::HTTP_11;
        let up_req = Request::from_parts(parts, crate::http::empty());
        let mut up_resp = match sender.send_request(up_req).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(user = %user, error = %e, "preview upgrade request");
                return Err(upgrade_failed());
            }
        };
        self.mgr.touch(&user);
        if up_resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            let (rp, rb) = up_resp.into_parts();
            return Ok(Response::from_parts(rp, rb.map_err(Into::into).boxed()));
        }
        // A 101 to another protocol than the client asked for would hand it a byte stream it
        // cannot speak.
        if !upgrade_matches(asked.as_ref(), up_resp.headers().get(header::UPGRADE)) {
            tracing::warn!(user = %user, "preview upgrade: the app switched to another protocol");
            return Err(upgrade_failed());
        }
        let upstream_upgrade = hyper::upgrade::on(&mut up_resp);
        let mgr = self.mgr.clone();
        let open = self.mgr.metrics().tunnel_opened();
        let stopping = self.tunnels.watch(addr.ip());
        tokio::spawn(async move {
            let _open = open;
            let tunnel = async move {
                let (Ok(client), Ok(upstream)) = (client_upgrade.await, upstream_upgrade.await)
                else {
                    return;
                };
                // Our own upstream connection is plain TCP; the client's is too unless it
                // came over TLS. Plain on both sides relays without buffers; otherwise copy
                // with buffers. The buffered copies are boxed: a task is as large as its
                // largest state, and every idle tunnel's task would otherwise carry theirs too.
                let upstream = match plain_upstream(upstream) {
                    Ok(p) => p,
                    Err(upstream) => {
                        let (client, upstream) = (TokioIo::new(client), TokioIo::new(upstream));
                        return Box::pin(pump(mgr, user, client, upstream)).await;
                    }
                };
                // Moved to this runtime's reactor (`edge/upgraded.rs`): the relay then waits on
                // both sockets without a cross-thread wake-up.
                match crate::edge::upgraded::plain(client) {
                    Ok(Ok(client)) => relay(mgr, user, client, upstream).await,
                    Ok(Err(e)) => tracing::debug!(error = %e, "preview tunnel: client socket"),
                    Err(client) => Box::pin(tls_pump(mgr, user, client, upstream)).await,
                }
            };
            // The sandbox is about to stop: both sockets close now (dropped with the tunnel).
            tokio::select! {
                () = tunnel => {}
                () = stopping.notified() => {}
            }
        });
        let (rp, _) = up_resp.into_parts();
        Ok(Response::from_parts(rp, crate::http::empty()))
    }
}

/// The upstream side (always plain TCP on the private network).
fn plain_upstream(up: hyper::upgrade::Upgraded) -> Result<Plain, hyper::upgrade::Upgraded> {
    let parts = up.downcast::<TokioIo<TcpStream>>()?;
    let stream = parts.io.into_inner();
    forget_wakers(&stream);
    Ok(Plain {
        stream,
        early: parts.read_buf.to_vec(),
    })
}

/// Replaces the wakers a socket still holds from the HTTP connection that read and wrote it
/// (its task has ended) by a no-op one. The relay waits with `readable()`, which does not
/// replace them, and a task's waker keeps the whole task allocated: an idle tunnel kept its
/// client connection's ended task (~7 KiB, hyper's connection and the TLS and HTTP/2 states
/// of `Conn::run`) until its next byte, 35 MiB with 5,000 idle tunnels.
fn forget_wakers(stream: &TcpStream) {
    let mut cx = Context::from_waker(Waker::noop());
    // Only a socket that is not ready stores the waker; a ready one already gave the old
    // waker up when it became ready.
    let _ = stream.poll_read_ready(&mut cx);
    let _ = stream.poll_write_ready(&mut cx);
}

/// Bytes moved per readiness event, from a buffer on the stack: an idle tunnel holds no buffer
/// at all (thousands of idle HMR sockets are the common case).
const RELAY_CHUNK: usize = 16 * 1024;

enum Moved {
    /// Something was moved (and maybe more is pending: the bytes the writer did not take).
    Some(Option<Vec<u8>>),
    /// Nothing was there after all (a spurious wake-up).
    Nothing,
    /// The reader reached its end or failed, or the writer failed.
    Closed,
}

/// Moves what the socket has now, without waiting: reads into a stack buffer and writes as much
/// as the other socket takes; what it does not take is returned to be written with a wait.
fn move_ready(from: &OwnedReadHalf, to: &OwnedWriteHalf) -> Moved {
    let mut buf = [0u8; RELAY_CHUNK];
    let n = match from.try_read(&mut buf) {
        Ok(0) => return Moved::Closed,
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Moved::Nothing,
        Err(_) => return Moved::Closed,
    };
    match to.try_write(&buf[..n]) {
        Ok(m) if m == n => Moved::Some(None),
        Ok(m) => Moved::Some(Some(buf[m..n].to_vec())),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            Moved::Some(Some(buf[..n].to_vec()))
        }
        Err(_) => Moved::Closed,
    }
}

/// One direction of a plain tunnel: waits for readability holding nothing, then moves the bytes.
async fn one_way(early: Vec<u8>, from: OwnedReadHalf, mut to: OwnedWriteHalf, on_data: impl Fn()) {
    if !early.is_empty() {
        on_data();
        if to.write_all(&early).await.is_err() {
            return;
        }
    }
    drop(early);
    loop {
        if from.readable().await.is_err() {
            break;
        }
        match move_ready(&from, &to) {
            Moved::Nothing => continue,
            Moved::Closed => break,
            Moved::Some(rest) => {
                on_data();
                if let Some(rest) = rest {
                    if to.write_all(&rest).await.is_err() {
                        break;
                    }
                }
            }
        }
    }
    let _ = to.shutdown().await;
}

/// Copies both ways between two plain sockets until either side closes, with no buffer held
/// while idle. Client traffic counts as activity and wakes a paused sandbox (its kernel buffers
/// the bytes meanwhile).
async fn relay(mgr: Arc<Manager>, user: UserId, client: Plain, upstream: Plain) {
    let (client_read, client_write) = client.stream.into_split();
    let (upstream_read, upstream_write) = upstream.stream.into_split();
    let inbound = {
        let (mgr, user) = (mgr.clone(), user.clone());
        one_way(client.early, client_read, upstream_write, move || {
            client_activity(&mgr, &user)
        })
    };
    let outbound = one_way(upstream.early, upstream_read, client_write, move || {
        mgr.touch(&user)
    });
    tokio::pin!(inbound, outbound);
    both_ways(inbound, outbound).await
}

/// Runs both directions of a tunnel. Once one side is done (its end was passed on as a
/// half-close), the other gets `CLOSE_GRACE` to finish: an app that keeps its socket open after
/// the client left (Node's HTTP server allows half-open upgraded sockets) would otherwise hold
/// the tunnel, its two sockets and its task forever.
///
/// The directions are pinned by the caller: moved in by value, they would take the caller's
/// task twice their size (the moved-from locals keep their room), which every idle tunnel pays.
async fn both_ways<I, O>(mut inbound: Pin<&mut I>, mut outbound: Pin<&mut O>)
where
    I: Future<Output = ()>,
    O: Future<Output = ()>,
{
    let client_done = tokio::select! {
        () = inbound.as_mut() => true,
        () = outbound.as_mut() => false,
    };
    if client_done {
        let _ = tokio::time::timeout(CLOSE_GRACE, outbound).await;
    } else {
        let _ = tokio::time::timeout(CLOSE_GRACE, inbound).await;
    }
}

/// How long the other side of a tunnel may take to finish once one side is done.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Client bytes on a tunnel: activity, and a wake-up if the sandbox is not running.
fn client_activity(mgr: &Arc<Manager>, user: &UserId) {
    mgr.touch(user);
    if mgr.running_ip(user).is_none() {
        let (mgr, user) = (mgr.clone(), user.clone());
        tokio::spawn(async move {
            let _ = mgr.ensure_running(&user).await;
        });
    }
}

/// A client over TLS to a plain upstream: what the app sent right after its 101 goes first, then
/// [`pump`].
async fn tls_pump(
    mgr: Arc<Manager>,
    user: UserId,
    client: hyper::upgrade::Upgraded,
    upstream: Plain,
) {
    let mut client = TokioIo::new(client);
    if client.write_all(&upstream.early).await.is_err() {
        return;
    }
    drop(upstream.early);
    pump(mgr, user, client, upstream.stream).await
}

/// Copies both ways until either side closes (see [`both_ways`]). Client traffic counts as
/// activity and wakes a paused sandbox (its kernel buffers the bytes meanwhile).
async fn pump<C, U>(mgr: Arc<Manager>, user: UserId, client: C, upstream: U)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut upstream_read, mut upstream_write) = tokio::io::split(upstream);
    let inbound = {
        let (mgr, user) = (mgr.clone(), user.clone());
        async move {
            let mut buf = vec![0u8; TUNNEL_BUF];
            loop {
                let n = match client_read.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                client_activity(&mgr, &user);
                if upstream_write.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = upstream_write.shutdown().await;
        }
    };
    let outbound = async move {
        let mut buf = vec![0u8; TUNNEL_BUF];
        loop {
            let n = match upstream_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            mgr.touch(&user);
            if client_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = client_write.shutdown().await;
    };
    tokio::pin!(inbound, outbound);
    both_ways(inbound, outbound).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A waker that counts as a task's allocation: alive as long as a clone of it is.
    struct Task;
    impl std::task::Wake for Task {
        fn wake(self: Arc<Self>) {}
    }

    #[tokio::test]
    async fn a_tunnel_socket_lets_go_of_the_ended_connection_task() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (_server, _) = listener.accept().await.unwrap();
        // The connection's task polled the socket last and found nothing to read.
        let task = Arc::new(Task);
        let waker = Waker::from(task.clone());
        assert!(client
            .poll_read_ready(&mut Context::from_waker(&waker))
            .is_pending());
        drop(waker);
        assert_eq!(Arc::strong_count(&task), 2, "the socket holds its waker");
        forget_wakers(&client);
        assert_eq!(Arc::strong_count(&task), 1, "the socket let go of it");
    }

    #[tokio::test]
    async fn the_closer_ends_the_tunnels_to_one_address_only() {
        let tunnels = Arc::new(Tunnels::default());
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.2".parse().unwrap(), "10.0.0.3".parse().unwrap());
        let (to_a, to_a_too, to_b) = (tunnels.watch(a), tunnels.watch(a), tunnels.watch(b));
        assert!(Arc::ptr_eq(&to_a, &to_a_too), "one signal per address");
        {
            let (ended_a, ended_b) = (to_a.notified(), to_b.notified());
            tokio::pin!(ended_a, ended_b);
            // Registered, as a tunnel's task is once it has been polled.
            ended_a.as_mut().enable();
            ended_b.as_mut().enable();
            tunnels.closer()(a);
            tokio::time::timeout(Duration::from_secs(1), ended_a)
                .await
                .expect("the tunnels to the stopping address end");
            assert!(
                futures_now(ended_b.as_mut()).is_none(),
                "another address's tunnels stay"
            );
        }
        // A later tunnel to the same address (a new start) gets a new signal.
        assert!(!Arc::ptr_eq(&tunnels.watch(a), &to_a));
        // Addresses whose tunnels all ended are forgotten when a new one comes.
        drop((to_a, to_a_too));
        let _c = tunnels.watch("10.0.0.4".parse().unwrap());
        assert_eq!(tunnels.0.lock().unwrap().len(), 2, "b and the new address");
    }

    /// Polls `f` once.
    fn futures_now<F: Future>(f: Pin<&mut F>) -> Option<F::Output> {
        let mut cx = Context::from_waker(Waker::noop());
        match f.poll(&mut cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }
}
