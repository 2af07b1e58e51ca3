//! The preview proxy: `user-<id>.<preview_domain>` → port 5173 (or an allowed extra port) of
//! that user's container, over the private network, by the IP the manager owns for that user.
//! No Host, path or header can steer it anywhere else.
//!
//! - Hot path: the manager's lock-free state gives the IP; the request streams through a pooled
//!   HTTP/1.1 client (idle timeout 4 s, under Node's 5 s keep-alive, so the pool never reuses a
//!   socket the app is closing).
//! - Cold path: the sandbox is created or woken through the manager's single-flight (its own
//!   task), and the request is held while the port is probed every 25 ms, up to `wake_timeout`.
//!   If nothing listens and no dev server is starting, browsers get a small page that retries by
//!   itself; other clients get 503 JSON with `Retry-After`.
//! - WebSocket upgrades (Vite HMR) get a dedicated upstream connection and are tunneled with
//!   `hyper::upgrade::on` on both sides; client traffic on a tunnel counts as activity and wakes
//!   a paused sandbox.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::app::App;
use crate::config::{Config, PreviewAccess};
use crate::edge::listener::ConnInfo;
use crate::http::error::ApiError;
use crate::http::{full, Body};
use crate::sandbox::{SandboxError, State};
use crate::user::UserId;

/// Cookie that carries the owner's preview token (`preview_access = "owner"`).
pub const PREVIEW_COOKIE: &str = "sandboxd_preview";
/// Its name over HTTPS. Browsers accept a `__Host-` cookie only with `Secure`, `Path=/` and no
/// `Domain`, so a sibling preview host cannot toss one onto this host (cookie tossing).
pub const PREVIEW_COOKIE_TLS: &str = "__Host-sandboxd_preview";
/// Query parameter of the signed link that sets the cookie.
pub const LINK_PARAM: &str = "sandboxd_token";
const PROBE_EVERY: Duration = Duration::from_millis(25);
/// Per direction of a tunnel. Idle HMR sockets are the common case and there can be thousands:
/// 4 KiB keeps an idle tunnel's memory small (16 KiB buffers cost ~28 KiB per tunnel in the
/// density benchmark) while WebSocket messages, small as they are, still move in one read.
const TUNNEL_BUF: usize = 4 * 1024;
/// How long a refused port is retried before asking whether a dev server is starting at all.
const NO_APP_GRACE: Duration = Duration::from_millis(1500);

pub struct Proxy {
    client: Client<HttpConnector, Body>,
}

impl Proxy {
    pub fn new(_cfg: &Config) -> Proxy {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(3)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(4))
            .pool_max_idle_per_host(64)
            .pool_timer(TokioTimer::new())
            .build(connector);
        Proxy { client }
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus those named in `Connection`.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
    ] {
        h.remove(n);
    }
    h.remove("keep-alive");
    h.remove("proxy-connection");
}

fn is_upgrade<B>(req: &Request<B>) -> bool {
    let conn_upgrade = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        });
    conn_upgrade && req.headers().contains_key(header::UPGRADE)
}

fn wants_html<B>(req: &Request<B>) -> bool {
    let h = req.headers();
    h.get("sec-fetch-mode").and_then(|v| v.to_str().ok()) == Some("navigate")
        || h.get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("text/html"))
}

fn html(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn page(title: &str, body: &str, refresh: bool) -> String {
    let meta = if refresh {
        r#"<meta http-equiv="refresh" content="2">"#
    } else {
        ""
    };
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">{meta}<title>{t}</title>\
         <style>body{{font:16px/1.5 system-ui,sans-serif;max-width:40em;margin:4em auto;padding:0 1em;color:#222}}\
         code{{background:#eee;padding:.1em .3em;border-radius:3px}}</style></head>\
         <body><h1>{t}</h1>{body}</body></html>",
        t = escape(title)
    )
}

fn not_listening<B>(req: &Request<B>, port: u16) -> Response<Body> {
    if wants_html(req) {
        let body = format!(
            "<p>The sandbox is running, but nothing listens on port {port} yet.</p>\
             <p>Start your app in the terminal, for example:</p>\
             <p><code>npm run dev -- --host 0.0.0.0 --port {port}</code></p>\
             <p>This page retries by itself every 2 seconds.</p>"
        );
        return html(
            StatusCode::SERVICE_UNAVAILABLE,
            page("Nothing here yet", &body, true),
        );
    }
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "preview_not_listening",
        format!("nothing listens on port {port} in the sandbox"),
    )
    .retry_after(2)
    .into_response()
}

/// The answer while the container engine is down (sandbox/health.rs): browsers get a page that
/// retries by itself, other clients 503 `engine_unavailable` with `Retry-After`.
fn engine_down<B>(req: &Request<B>, message: String) -> Response<Body> {
    if wants_html(req) {
        let body = "<p>The sandbox engine is restarting or unreachable; your sandbox will be \
                    back as soon as it answers.</p>\
                    <p>This page retries by itself every 2 seconds.</p>";
        let mut r = html(
            StatusCode::SERVICE_UNAVAILABLE,
            page("Waiting for the sandbox engine", body, true),
        );
        r.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(crate::sandbox::health::RETRY_AFTER_SECS),
        );
        return r;
    }
    ApiError::engine_unavailable(message).into_response()
}

/// Maps a manager error to the preview's answer.
fn sandbox_error<B>(req: &Request<B>, e: SandboxError) -> Response<Body> {
    match e {
        SandboxError::EngineUnavailable(m) => engine_down(req, m),
        e => ApiError::from(e).into_response(),
    }
}

pub async fn handle(
    app: &Arc<App>,
    mut req: Request<Incoming>,
    conn: Arc<ConnInfo>,
    user: UserId,
    port: u16,
) -> Response<Body> {
    if app.cfg.preview_access == PreviewAccess::Owner {
        match check_owner(app, &req, &user, &conn) {
            Access::Allowed => {}
            Access::Redirect(resp) | Access::Denied(resp) => return resp,
        }
        strip_preview_cookie(req.headers_mut());
    }
    // Fast path: a running container, no Docker call.
    let ip = match app.mgr.running_ip(&user) {
        Some(ip) => ip,
        None => match wake(app, &req, &user).await {
            Ok(ip) => ip,
            Err(resp) => return resp,
        },
    };
    let addr = SocketAddr::new(ip, port);
    if is_upgrade(&req) {
        return tunnel(app, req, conn, user, addr).await;
    }
    forward(app, req, &conn, &user, addr).await
}

/// Creates or wakes the sandbox (single-flight), within `wake_timeout`.
async fn wake(
    app: &Arc<App>,
    req: &Request<Incoming>,
    user: &UserId,
) -> Result<IpAddr, Response<Body>> {
    match app.mgr.is_known(user).await {
        Ok(true) => {}
        Ok(false) => {
            let msg = "No sandbox exists for this preview address.";
            return Err(if wants_html(req) {
                html(
                    StatusCode::NOT_FOUND,
                    page("No such preview", &format!("<p>{msg}</p>"), false),
                )
            } else {
                ApiError::new(StatusCode::NOT_FOUND, "unknown_preview", msg).into_response()
            });
        }
        Err(e) => return Err(ApiError::internal(&e).into_response()),
    }
    match tokio::time::timeout(app.cfg.wake_timeout, app.mgr.ensure_running(user)).await {
        Ok(Ok(sb)) => sb.ip.ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "no_address",
                "sandbox has no address",
            )
            .into_response()
        }),
        Ok(Err(e)) => Err(sandbox_error(req, e)),
        Err(_) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "wake_timeout",
            "the sandbox did not start in time",
        )
        .retry_after(2)
        .into_response()),
    }
}

/// Connects to the app, retrying a refused port every 25 ms up to `wake_timeout`. After a short
/// grace, and then every second, it asks the sandbox whether an app can still come: the init's
/// discovery is still running (a slow start under load) or a dev server process is alive. If
/// not, it gives up early so the client gets the "nothing listens" answer instead of a hang.
async fn connect_app(app: &Arc<App>, user: &UserId, addr: SocketAddr) -> Option<TcpStream> {
    let start = tokio::time::Instant::now();
    let deadline = start + app.cfg.wake_timeout;
    let mut next_check = start + NO_APP_GRACE;
    loop {
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await
        {
            let _ = s.set_nodelay(true);
            return Some(s);
        }
        // A held request is activity: the idle policy must not pause a sandbox mid-start.
        app.mgr.touch(user);
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return None;
        }
        if now >= next_check {
            next_check = now + Duration::from_secs(1);
            if !app_may_come(app, user).await {
                return None;
            }
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

/// Whether an app may still start listening: the init has not finished discovery yet, or the
/// dev server it started (its pid file) is alive.
async fn app_may_come(app: &Arc<App>, user: &UserId) -> bool {
    let Ok(sb) = app.mgr.status(user).await else {
        return false;
    };
    let cmd = vec![
        "bash".to_owned(),
        "-c".to_owned(),
        r#"[ ! -e /tmp/sandboxd-init.done ] && exit 0
p=$(cat /tmp/sandboxd-dev.pid 2>/dev/null) && [ -n "$p" ] && kill -0 "$p" 2>/dev/null"#
            .to_owned(),
    ];
    matches!(
        app.mgr.engine().run(&sb.container_id, cmd).await,
        Ok((0, _))
    )
}

fn forwarded_headers(h: &mut HeaderMap, conn: &ConnInfo, host: Option<&str>) {
    let peer = conn.peer.ip().to_string();
    let xff = match h.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        // Clients can send anything: keep their chain, append what we saw.
        Some(prev) if prev.len() < 1024 => format!("{prev}, {peer}"),
        _ => peer,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        h.insert("x-forwarded-for", v);
    }
    h.insert(
        "x-forwarded-proto",
        HeaderValue::from_static(if conn.tls { "https" } else { "http" }),
    );
    if let Some(v) = host.and_then(|h| HeaderValue::from_str(h).ok()) {
        h.insert("x-forwarded-host", v);
    }
}

fn upstream_uri(addr: SocketAddr, uri: &Uri) -> Uri {
    let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    format!("http://{addr}{pq}")
        .parse()
        .unwrap_or_else(|_| Uri::from_static("/"))
}

async fn forward(
    app: &Arc<App>,
    req: Request<Incoming>,
    conn: &ConnInfo,
    user: &UserId,
    addr: SocketAddr,
) -> Response<Body> {
    let (mut parts, body) = req.into_parts();
    let host = host_of(&parts).map(str::to_owned);
    strip_hop_by_hop(&mut parts.headers);
    forwarded_headers(&mut parts.headers, conn, host.as_deref());
    // HTTP/2 clients send :authority, not Host; the app sees the preview host either way.
    if let Some(h) = host.as_deref().and_then(|h| HeaderValue::from_str(h).ok()) {
        parts.headers.insert(header::HOST, h);
    }
    parts.uri = upstream_uri(addr, &parts.uri);
    parts.version = hyper::Version::HTTP_11;
    let mut body = Some(body);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let b: Body = match body.take() {
            Some(b) => b.map_err(Into::into).boxed(),
            None => crate::http::empty(),
        };
        let up = Request::from_parts(clone_parts(&parts), b);
        let sent = app.preview.client.request(up);
        tokio::pin!(sent);
        // Backstop: an answer whose head is late may be a request sent to a container that
        // was paused or stopped behind our back. Re-check the sandbox instead of waiting
        // forever; a sandbox that runs normally just has a slow app, and we keep waiting.
        let result = match tokio::time::timeout(app.cfg.upstream_head_timeout, &mut sent).await {
            Ok(r) => r,
            Err(_) => match late_answer(app, user).await {
                Late::KeepWaiting => sent.await,
                Late::Restarted(ip) if attempt == 1 && is_idempotent(&parts) => {
                    let addr = SocketAddr::new(ip, addr.port());
                    parts.uri = upstream_uri(addr, &parts.uri);
                    match connect_app(app, user, addr).await {
                        Some(_) => continue,
                        None => {
                            return not_listening(
                                &Request::from_parts(clone_parts(&parts), ()),
                                addr.port(),
                            )
                        }
                    }
                }
                Late::Restarted(_) => {
                    return restarted(&Request::from_parts(clone_parts(&parts), ()));
                }
                Late::Failed(resp) => return resp,
            },
        };
        match result {
            Ok(resp) => {
                app.mgr.touch(user);
                let (mut rp, rb) = resp.into_parts();
                strip_hop_by_hop(&mut rp.headers);
                return Response::from_parts(rp, rb.map_err(Into::into).boxed());
            }
            Err(e) if e.is_connect() && attempt == 1 => {
                // Nothing listening: the app may be starting, or the container died or was
                // restarted behind our back (its address can change). Refresh through the
                // manager, then hold the request while the app comes up. A body that was
                // already streamed is not replayed.
                let sb = match app.mgr.ensure_running(user).await {
                    Ok(sb) => sb,
                    Err(e) => {
                        return sandbox_error(&Request::from_parts(clone_parts(&parts), ()), e)
                    }
                };
                let Some(ip) = sb.ip else {
                    return not_listening(
                        &Request::from_parts(clone_parts(&parts), ()),
                        addr.port(),
                    );
                };
                let addr = SocketAddr::new(ip, addr.port());
                parts.uri = upstream_uri(addr, &parts.uri);
                match connect_app(app, user, addr).await {
                    Some(_) if is_bodyless(&parts) => continue,
                    Some(_) => {
                        return ApiError::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "preview_starting",
                            "the app just started; retry",
                        )
                        .retry_after(1)
                        .into_response()
                    }
                    None => {
                        return not_listening(
                            &Request::from_parts(clone_parts(&parts), ()),
                            addr.port(),
                        )
                    }
                }
            }
            Err(e) => {
                tracing::warn!(user = %user, error = format!("{e:#}"), "preview upstream error");
                if e.is_connect() {
                    return not_listening(
                        &Request::from_parts(clone_parts(&parts), ()),
                        addr.port(),
                    );
                }
                return ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "upstream_error",
                    "the app in the sandbox failed to answer",
                )
                .into_response();
            }
        }
    }
}

enum Late {
    /// The sandbox runs (or was just resumed, which lets the request go on): keep waiting.
    KeepWaiting,
    /// The container had stopped or vanished and was started again at this address: the
    /// request in flight is lost.
    Restarted(IpAddr),
    Failed(Response<Body>),
}

/// The upstream head is late: look at the sandbox as the engine sees it, and wake it if it
/// was paused, stopped or removed behind our back.
async fn late_answer(app: &Arc<App>, user: &UserId) -> Late {
    let state = match app.mgr.refresh(user).await {
        Ok(s) => s,
        Err(e) => return Late::Failed(ApiError::internal(&e).into_response()),
    };
    if state == Some(State::Running) {
        return Late::KeepWaiting;
    }
    tracing::info!(user = %user, state = ?state, "late preview answer: the sandbox was not running");
    match app.mgr.ensure_running(user).await {
        // A paused container keeps its connections: once resumed, the answer comes.
        Ok(_) if state == Some(State::Paused) => Late::KeepWaiting,
        Ok(sb) => match sb.ip {
            Some(ip) => Late::Restarted(ip),
            None => Late::Failed(
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "no_address",
                    "sandbox has no address",
                )
                .into_response(),
            ),
        },
        Err(e) => Late::Failed(ApiError::from(e).into_response()),
    }
}

/// The answer to a request that was lost because the sandbox restarted under it and that is
/// not safe to send again.
fn restarted<B>(req: &Request<B>) -> Response<Body> {
    if wants_html(req) {
        return html(
            StatusCode::SERVICE_UNAVAILABLE,
            page(
                "Restarting",
                "<p>The sandbox was restarted. This page retries by itself every 2 seconds.</p>",
                true,
            ),
        );
    }
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "preview_restarted",
        "the sandbox was restarted while this request was in flight; retry",
    )
    .retry_after(1)
    .into_response()
}

/// Safe to send again (RFC 9110 §9.2.2) and nothing in the body that was already consumed.
fn is_idempotent(p: &hyper::http::request::Parts) -> bool {
    matches!(
        p.method,
        hyper::Method::GET | hyper::Method::HEAD | hyper::Method::OPTIONS
    ) && is_bodyless(p)
}

fn is_bodyless(p: &hyper::http::request::Parts) -> bool {
    let len0 = p
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v.trim() == "0");
    len0 && !p.headers.contains_key(header::TRANSFER_ENCODING)
}

fn clone_parts(p: &hyper::http::request::Parts) -> hyper::http::request::Parts {
    let mut b = Request::builder()
        .method(p.method.clone())
        .uri(p.uri.clone())
        .version(p.version);
    if let Some(h) = b.headers_mut() {
        *h = p.headers.clone();
    }
    b.body(())
        .map(|r| r.into_parts().0)
        .unwrap_or_else(|_| Request::new(()).into_parts().0)
}

/// WebSocket (or any HTTP/1.1 upgrade): a dedicated upstream connection, then bytes both ways.
async fn tunnel(
    app: &Arc<App>,
    mut req: Request<Incoming>,
    conn: Arc<ConnInfo>,
    user: UserId,
    addr: SocketAddr,
) -> Response<Body> {
    // Bounded: an address that went away with its container would otherwise hang for the
    // kernel's connect timeout.
    let connected = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await;
    let stream = match connected {
        Ok(Ok(s)) => s,
        _ => {
            let ip = match app.mgr.ensure_running(&user).await {
                Ok(sb) => sb.ip,
                Err(e) => return ApiError::from(e).into_response(),
            };
            let Some(ip) = ip else {
                return not_listening(&req, addr.port());
            };
            match connect_app(app, &user, SocketAddr::new(ip, addr.port())).await {
                Some(s) => s,
                None => return not_listening(&req, addr.port()),
            }
        }
    };
    let (mut sender, connection) =
        match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(user = %user, error = %e, "preview upgrade handshake");
                return ApiError::new(StatusCode::BAD_GATEWAY, "upstream_error", "upgrade failed")
                    .into_response();
            }
        };
    tokio::spawn(async move {
        let _ = connection.with_upgrades().await;
    });
    let client_upgrade = hyper::upgrade::on(&mut req);
    let host = crate::edge::router::request_host(&req).map(str::to_owned);
    let (mut parts, _body) = req.into_parts();
    // Keep Connection/Upgrade for the handshake; drop the other hop-by-hop headers.
    let upgrade = parts.headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(u) = upgrade {
        parts.headers.insert(header::UPGRADE, u);
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    forwarded_headers(&mut parts.headers, &conn, host.as_deref());
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
            return ApiError::new(StatusCode::BAD_GATEWAY, "upstream_error", "upgrade failed")
                .into_response();
        }
    };
    app.mgr.touch(&user);
    if up_resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let (rp, rb) = up_resp.into_parts();
        return Response::from_parts(rp, rb.map_err(Into::into).boxed());
    }
    let upstream_upgrade = hyper::upgrade::on(&mut up_resp);
    let app2 = app.clone();
    let open = app.mgr.metrics().tunnel_opened();
    tokio::spawn(async move {
        let _open = open;
        let (Ok(client), Ok(upstream)) = (client_upgrade.await, upstream_upgrade.await) else {
            return;
        };
        pump(app2, user, TokioIo::new(client), TokioIo::new(upstream)).await;
    });
    let (rp, _) = up_resp.into_parts();
    Response::from_parts(rp, crate::http::empty())
}

/// Copies both ways until either side closes. Client traffic counts as activity and wakes a
/// paused sandbox (its kernel buffers the bytes meanwhile).
async fn pump<C, U>(app: Arc<App>, user: UserId, client: C, upstream: U)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let app_in = app.clone();
    let user_in = user.clone();
    let inbound = async move {
        let mut buf = vec![0u8; TUNNEL_BUF];
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            app_in.mgr.touch(&user_in);
            if app_in.mgr.running_ip(&user_in).is_none() {
                let (a, u) = (app_in.clone(), user_in.clone());
                tokio::spawn(async move {
                    let _ = a.mgr.ensure_running(&u).await;
                });
            }
            if uw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = uw.shutdown().await;
    };
    let outbound = async move {
        let mut buf = vec![0u8; TUNNEL_BUF];
        loop {
            let n = match ur.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            app.mgr.touch(&user);
            if cw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = cw.shutdown().await;
    };
    tokio::join!(inbound, outbound);
}

enum Access {
    Allowed,
    Redirect(Response<Body>),
    Denied(Response<Body>),
}

/// Every value of the cookie `name` (a browser sends several when other hosts tossed some).
fn cookie_values<'a>(h: &'a HeaderMap, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .filter(move |(k, _)| *k == name)
        .map(|(_, v)| v)
}

#[cfg(test)]
fn cookie_value<'a>(h: &'a HeaderMap, name: &'a str) -> Option<&'a str> {
    cookie_values(h, name).next()
}

fn strip_preview_cookie(h: &mut HeaderMap) {
    let kept: Vec<String> = h
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|c| {
            !c.is_empty()
                && !c.starts_with(&format!("{PREVIEW_COOKIE}="))
                && !c.starts_with(&format!("{PREVIEW_COOKIE_TLS}="))
        })
        .map(str::to_owned)
        .collect();
    h.remove(header::COOKIE);
    if !kept.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&kept.join("; ")) {
            h.insert(header::COOKIE, v);
        }
    }
}

/// The cookie a valid preview link sets. Always host-only (no `Domain`): it goes back to this
/// preview host only.
///
/// The console shows the preview in an iframe, and the preview domain is (and should be, see
/// the README) another site than the console, so the cookie must be `SameSite=None` to be set
/// and sent there; `Partitioned` (CHIPS) keys it to the top-level site that opened the link (the
/// console, or the preview itself in its own tab), so other sites that frame the preview do not
/// get it. Both need `Secure`:
/// - over HTTPS: `__Host-sandboxd_preview`, `Secure`, `SameSite=None`, `Partitioned` (the
///   `__Host-` prefix makes browsers refuse it from a sibling host);
/// - over plain HTTP on a `localhost` preview domain (the development set-up): browsers treat
///   `*.localhost` as a secure context and accept `Secure` cookies from it, so the same
///   attributes under the name `sandboxd_preview` (`__Host-` is reserved for HTTPS);
/// - over plain HTTP elsewhere: `sandboxd_preview` with `SameSite=Lax`, as `Secure` cookies
///   are refused there; the preview then opens in its own tab, not inside a console on another
///   site.
fn owner_cookie(token: &str, tls: bool, preview_domain: &str) -> String {
    const BASE: &str = "Path=/; HttpOnly; Max-Age=43200";
    let local = preview_domain == "localhost" || preview_domain.ends_with(".localhost");
    if tls {
        format!("{PREVIEW_COOKIE_TLS}={token}; {BASE}; Secure; SameSite=None; Partitioned")
    } else if local {
        format!("{PREVIEW_COOKIE}={token}; {BASE}; Secure; SameSite=None; Partitioned")
    } else {
        format!("{PREVIEW_COOKIE}={token}; {BASE}; SameSite=Lax")
    }
}

/// `preview_access = "owner"`: the owner's preview token, from the signed link (then set as a
/// host-only cookie and redirected away from the URL) or from the cookie. Another user's token
/// or cookie does not open it.
fn check_owner(app: &Arc<App>, req: &Request<Incoming>, user: &UserId, conn: &ConnInfo) -> Access {
    let verify = |t: &str| app.auth.verify_scoped(t, Some("preview")).ok().as_ref() == Some(user);
    let query = req.uri().query().unwrap_or("");
    let link_token = query
        .split('&')
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| *k == LINK_PARAM)
        .map(|(_, v)| v);
    if let Some(t) = link_token {
        if verify(t) {
            let rest: Vec<&str> = query
                .split('&')
                .filter(|p| !p.starts_with(&format!("{LINK_PARAM}=")) && !p.is_empty())
                .collect();
            let mut loc = req.uri().path().to_owned();
            if !rest.is_empty() {
                loc.push('?');
                loc.push_str(&rest.join("&"));
            }
            let cookie = owner_cookie(t, conn.tls, &app.cfg.preview_domain);
            let mut r = Response::new(crate::http::empty());
            *r.status_mut() = StatusCode::SEE_OTHER;
            if let (Ok(l), Ok(c)) = (HeaderValue::from_str(&loc), HeaderValue::from_str(&cookie)) {
                r.headers_mut().insert(header::LOCATION, l);
                r.headers_mut().insert(header::SET_COOKIE, c);
            }
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            return Access::Redirect(r);
        }
    }
    // Any of the values may be the owner's: a tossed cookie in front must not lock them out.
    let name = if conn.tls {
        PREVIEW_COOKIE_TLS
    } else {
        PREVIEW_COOKIE
    };
    if cookie_values(req.headers(), name).any(verify) {
        return Access::Allowed;
    }
    let msg = "This preview is private. Open it through the link from the sandbox API (POST /sandbox/preview-link).";
    Access::Denied(if wants_html(req) {
        html(
            StatusCode::UNAUTHORIZED,
            page("Private preview", &format!("<p>{}</p>", escape(msg)), false),
        )
    } else {
        ApiError::new(StatusCode::UNAUTHORIZED, "preview_unauthorized", msg).into_response()
    })
}

/// The URL of `user`'s preview as the client of `conn` reaches it: the scheme and port of the
/// configured public base (`preview_public_url`, else `public_url`), else those of the
/// listener the request came in on, so a console over HTTP embeds an HTTP preview and one over
/// HTTPS an HTTPS preview. Default ports (80, 443) are left out.
pub fn url(cfg: &Config, user: &UserId, conn: &ConnInfo) -> String {
    url_via(cfg, user, conn.tls, conn.local.port())
}

fn url_via(cfg: &Config, user: &UserId, tls: bool, listener_port: u16) -> String {
    let (https, port) = match cfg.preview_public {
        Some(b) => (b.https, b.port),
        None => (tls, Some(listener_port)),
    };
    let default = if https { 443 } else { 80 };
    let port = port
        .filter(|p| *p != default)
        .map(|p| format!(":{p}"))
        .unwrap_or_default();
    let scheme = if https { "https" } else { "http" };
    format!("{scheme}://user-{user}.{}{port}/", cfg.preview_domain)
}

/// `POST /sandbox/preview-link`: a short-lived signed link that opens the caller's preview.
pub async fn link(
    app: &Arc<App>,
    user: &UserId,
    conn: &ConnInfo,
) -> Result<Response<Body>, ApiError> {
    let ttl = Duration::from_secs(12 * 3600);
    let token = app.auth.issue_scoped(user, ttl, Some("preview"))?;
    let url = format!("{}?{LINK_PARAM}={token}", url(&app.cfg, user, conn));
    Ok(crate::http::json(
        StatusCode::OK,
        &serde_json::json!({"url": url, "expiresInSeconds": ttl.as_secs()}),
    ))
}

/// The request's host as the client sent it (URI authority first, as `router::request_host`).
fn host_of(p: &hyper::http::request::Parts) -> Option<&str> {
    p.uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| p.headers.get(header::HOST).and_then(|v| v.to_str().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(header::ACCEPT, "*/*".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::ACCEPT));
    }

    #[test]
    fn upstream_uri_keeps_only_path_and_query() {
        let addr: SocketAddr = "172.20.0.5:5173".parse().unwrap();
        let u = upstream_uri(addr, &"http://evil.example/x?y=1".parse().unwrap());
        assert_eq!(u.to_string(), "http://172.20.0.5:5173/x?y=1");
        let u = upstream_uri(addr, &"/a/b".parse().unwrap());
        assert_eq!(u.to_string(), "http://172.20.0.5:5173/a/b");
    }

    #[test]
    fn preview_cookie_is_stripped_others_kept() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            "a=1; sandboxd_preview=tok; b=2".parse().unwrap(),
        );
        assert_eq!(cookie_value(&h, PREVIEW_COOKIE), Some("tok"));
        strip_preview_cookie(&mut h);
        assert_eq!(h[header::COOKIE], "a=1; b=2");
    }

    #[test]
    fn preview_urls_follow_the_listener_unless_a_public_base_is_set() {
        let load = |pairs: &[(&str, &str)]| {
            Config::load(
                None,
                pairs
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
            )
            .unwrap()
        };
        let user = UserId::parse("42").unwrap();
        let cfg = load(&[("SANDBOXD_HTTPS_ADDR", "127.0.0.1:8443")]);
        assert_eq!(
            url_via(&cfg, &user, false, 8080),
            "http://user-42.preview.localhost:8080/"
        );
        assert_eq!(
            url_via(&cfg, &user, true, 8443),
            "https://user-42.preview.localhost:8443/"
        );
        assert_eq!(
            url_via(&cfg, &user, false, 80),
            "http://user-42.preview.localhost/"
        );
        assert_eq!(
            url_via(&cfg, &user, true, 443),
            "https://user-42.preview.localhost/"
        );
        // A default port of the other scheme is kept.
        assert_eq!(
            url_via(&cfg, &user, true, 80),
            "https://user-42.preview.localhost:80/"
        );
        let cfg = load(&[
            ("SANDBOXD_PREVIEW_DOMAIN", "preview.example.com"),
            ("SANDBOXD_PREVIEW_PUBLIC_URL", "https://preview.example.com"),
        ]);
        assert_eq!(
            url_via(&cfg, &user, false, 8080),
            "https://user-42.preview.example.com/"
        );
        let cfg = load(&[
            ("SANDBOXD_PREVIEW_DOMAIN", "preview.example.com"),
            (
                "SANDBOXD_PREVIEW_PUBLIC_URL",
                "http://preview.example.com:9000/",
            ),
        ]);
        assert_eq!(
            url_via(&cfg, &user, true, 8443),
            "http://user-42.preview.example.com:9000/"
        );
        let cfg = load(&[("SANDBOXD_PUBLIC_URL", "https://localhost:8443")]);
        assert_eq!(
            url_via(&cfg, &user, false, 8080),
            "https://user-42.preview.localhost:8443/"
        );
    }

    #[test]
    fn owner_cookies_are_host_only_and_secure_where_browsers_allow_it() {
        let c = owner_cookie("t", true, "preview.example.com");
        assert_eq!(
            c,
            "__Host-sandboxd_preview=t; Path=/; HttpOnly; Max-Age=43200; Secure; SameSite=None; Partitioned"
        );
        let c = owner_cookie("t", false, "preview.localhost");
        assert!(c.starts_with("sandboxd_preview=t;"), "{c}");
        assert!(c.contains("; Secure; SameSite=None; Partitioned"), "{c}");
        let c = owner_cookie("t", false, "preview.example.com");
        assert_eq!(
            c,
            "sandboxd_preview=t; Path=/; HttpOnly; Max-Age=43200; SameSite=Lax"
        );
        for c in [
            owner_cookie("t", true, "preview.localhost"),
            owner_cookie("t", false, "x.test"),
        ] {
            assert!(!c.to_ascii_lowercase().contains("domain"), "{c}");
        }
    }

    #[test]
    fn only_bodyless_safe_methods_are_sent_again() {
        let parts = |m: &str, h: &[(&str, &str)]| {
            let mut b = Request::builder().method(m).uri("/");
            for (k, v) in h {
                b = b.header(*k, *v);
            }
            b.body(()).unwrap().into_parts().0
        };
        assert!(is_idempotent(&parts("GET", &[])));
        assert!(is_idempotent(&parts("HEAD", &[("content-length", "0")])));
        assert!(!is_idempotent(&parts("GET", &[("content-length", "5")])));
        assert!(!is_idempotent(&parts(
            "GET",
            &[("transfer-encoding", "chunked")]
        )));
        assert!(!is_idempotent(&parts("POST", &[])));
        assert!(!is_idempotent(&parts("DELETE", &[])));
    }

    #[test]
    fn page_escapes() {
        assert!(!page("<x>", "", false).contains("<x>"));
    }
}
