//! WebSocket (or any HTTP/1.1 upgrade, e.g. Vite HMR): a dedicated upstream connection, the
//! handshake forwarded, then bytes both ways with `hyper::upgrade::on` on both sides. Client
//! traffic on a tunnel counts as activity and wakes a paused sandbox.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::forward::{forwarded_headers, strip_hop_by_hop, upgrade_matches};
use super::upstream::Via;
use super::{PreviewError, Proxy};
use crate::edge::listener::ConnInfo;
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
        tokio::spawn(async move {
            let _open = open;
            let (Ok(client), Ok(upstream)) = (client_upgrade.await, upstream_upgrade.await) else {
                return;
            };
            pump(mgr, user, TokioIo::new(client), TokioIo::new(upstream)).await;
        });
        let (rp, _) = up_resp.into_parts();
        Ok(Response::from_parts(rp, crate::http::empty()))
    }
}

/// Copies both ways until either side closes. Client traffic counts as activity and wakes a
/// paused sandbox (its kernel buffers the bytes meanwhile).
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
                mgr.touch(&user);
                if mgr.running_ip(&user).is_none() {
                    let (mgr, user) = (mgr.clone(), user.clone());
                    tokio::spawn(async move {
                        let _ = mgr.ensure_running(&user).await;
                    });
                }
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
    tokio::join!(inbound, outbound);
}
