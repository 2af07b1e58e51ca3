//! The preview proxy: `user-<id>.<preview_domain>` → port 5173 (or an allowed extra port) of
//! that user's container, over the private network, by the IP the manager owns for that user.
//! No Host, path or header can steer it anywhere else (README, "Preview").
//!
//! - `upstream.rs`: the one cold path (wake, hold the request until the app listens).
//! - `forward.rs`: plain requests, over `pool.rs`: pooled HTTP/1.1 upstream connections driven
//!   inside the request's own task (idle timeout 4 s, under Node's 5 s keep-alive, so the pool
//!   never reuses a socket the app is closing).
//! - `tunnel.rs`: upgrades (Vite HMR) on a dedicated upstream connection.
//! - `access.rs`: `preview_access = "owner"`; `pages.rs`: the proxy's own answers.

mod access;
mod forward;
mod pages;
mod pool;
mod tunnel;
mod upstream;

use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};

pub use access::LINK_PARAM;

use crate::auth::Auth;
use crate::config::{Config, PreviewAccess};
use crate::edge::fast::FastHead;
use crate::edge::listener::ConnInfo;
use crate::http::error::ApiError;
use crate::http::Body;
use crate::sandbox::{Manager, Running, SandboxError};
use crate::user::UserId;

/// A fallback of the hot path, boxed (see [`Proxy::off_edge`]).
type OffEdge<T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, PreviewError>> + Send>>;

/// The preview feature and what it needs: the configuration, the manager (addresses, wakes,
/// activity), the token verifier (owner mode) and the upstream connection pool.
#[derive(Clone)]
pub struct Proxy {
    cfg: Arc<Config>,
    mgr: Arc<Manager>,
    auth: Auth,
    pool: pool::Pool,
    tunnels: Arc<tunnel::Tunnels>,
}

/// Why a preview request got no answer from the app. [`PreviewError::into_response`]
/// (`pages.rs`) renders it: a page for browsers, the JSON envelope for other clients.
#[derive(Debug)]
pub enum PreviewError {
    /// No sandbox exists for this preview host.
    UnknownPreview,
    /// The sandbox runs but nothing listens on the port, and no app is starting.
    NotListening { port: u16 },
    /// The container engine is down (sandbox/health.rs).
    EngineDown(String),
    /// The sandbox restarted under a request that is not safe to send again.
    Restarted,
    /// `preview_access = "owner"` and the request carries no valid owner token.
    Private,
    /// Every other failure: always the JSON envelope.
    Api(ApiError),
}

impl From<SandboxError> for PreviewError {
    fn from(e: SandboxError) -> Self {
        match e {
            SandboxError::EngineUnavailable(m) => PreviewError::EngineDown(m),
            e => PreviewError::Api(e.into()),
        }
    }
}

impl Proxy {
    pub fn new(cfg: Arc<Config>, mgr: Arc<Manager>, auth: Auth) -> Proxy {
        let pool = pool::Pool::new(Duration::from_secs(4), 64, Duration::from_secs(3));
        // Idle connections to a sandbox end before it stops (see `Manager::on_stopping`).
        mgr.on_stopping(pool.closer());
        // And so do its WebSocket tunnels.
        let tunnels = Arc::new(tunnel::Tunnels::default());
        mgr.on_stopping(tunnels.closer());
        Proxy {
            cfg,
            mgr,
            auth,
            pool,
            tunnels,
        }
    }

    /// One request for `user`'s preview on `port`; every failure is rendered here, once.
    /// `hot`: the running sandbox (address and slot) as [`Proxy::hot_ip`] just found it (the
    /// caller looked it up to choose the thread), so the hot path does not look it up again.
    pub async fn handle(
        &self,
        mut req: Request<Incoming>,
        conn: Arc<ConnInfo>,
        user: UserId,
        port: u16,
        hot: Option<Running>,
    ) -> Response<Body> {
        let wants_html = pages::wants_html(&req);
        // No inner `async` block for `?`: it would be one more level whose whole future (the
        // forward's, kilobytes) is built and then moved into this one.
        if self.cfg.preview_access == PreviewAccess::Owner {
            match self.check_owner(&req, &user, &conn) {
                Ok(Some(redirect)) => return redirect,
                Ok(None) => access::strip_preview_cookie(req.headers_mut()),
                Err(e) => return e.into_response(wants_html),
            }
        }
        // The hot path inline; the cold ones (wake, tunnel) boxed, so that the request's
        // future stays small (it is moved whole into its box and its span).
        let addr = match hot
            .as_ref()
            .map(Running::ip)
            .or_else(|| self.mgr.running_ip(&user))
        {
            Some(ip) => std::net::SocketAddr::new(ip, port),
            None => {
                let ready = self.off_edge(&user, move |p, u| async move {
                    p.ready_addr(&u, port, upstream::Via::Published).await
                });
                match ready.await {
                    Ok(addr) => addr,
                    Err(e) => return e.into_response(wants_html),
                }
            }
        };
        // `hot` is only ever found for a request that is not an upgrade (`hot_ip`).
        let answer = if hot.is_none() && forward::is_upgrade(req.headers()) {
            Box::pin(self.tunnel(req, &conn, user, addr)).await
        } else {
            self.forward(req, &conn, &user, addr, hot.as_ref()).await
        };
        answer.unwrap_or_else(|e| e.into_response(wants_html))
    }
}

impl Proxy {
    /// Whether the edge's fast path (`edge/fast.rs`) may serve previews: not owner-only ones,
    /// whose requests carry a token or a cookie to check.
    pub fn takes_fast_path(&self) -> bool {
        self.cfg.preview_access != PreviewAccess::Owner
    }

    /// The fast path's request to a running sandbox: its head as the app gets it (with
    /// `request_id`), made now, and whether its client wants a page for an error;
    /// [`Proxy::forward_fast`] sends it.
    pub fn fast_request(
        &self,
        head: &FastHead<'_>,
        conn: &ConnInfo,
        request_id: &hyper::header::HeaderValue,
    ) -> (bytes::Bytes, bool) {
        let wants_html =
            pages::wants_html_raw(head.header("sec-fetch-mode"), head.header("accept"));
        (
            forward::fast_wire(head, conn, request_id.as_bytes()),
            wants_html,
        )
    }

    /// Whether the request is the hot path, served start to end on the connection's edge
    /// thread: a plain (not upgrade) request to a sandbox that runs. Waking a sandbox and
    /// tunnels go to the main runtime (`app.rs`); when the hot path finds the app gone, its
    /// fallbacks go there too ([`Proxy::off_edge`]).
    /// `Some` running sandbox (its address, and its slot for the activity) when it is.
    pub fn hot_ip(&self, req: &Request<Incoming>, user: &UserId) -> Option<Running> {
        if forward::is_upgrade(req.headers()) {
            return None;
        }
        self.mgr.running(user)
    }

    /// Runs a fallback of the hot path (`f`, given a clone of the proxy and the user) on the
    /// main runtime: it asks the manager, which may talk to the engine and the store and start
    /// tasks, none of which may belong to an edge thread (see `edge::percore::on_main`).
    ///
    /// Boxed: a caller's future then holds a pointer at these (rare) await points instead of
    /// the fallback's whole future (the wake path is kilobytes), so the hot path's futures stay
    /// small and every move of them (into a box, a span, a task) copies less.
    fn off_edge<T, F, Fut>(&self, user: &UserId, f: F) -> OffEdge<T>
    where
        F: FnOnce(Proxy, UserId) -> Fut,
        Fut: std::future::Future<Output = Result<T, PreviewError>> + Send + 'static,
        T: Send + 'static,
    {
        let fut = f(self.clone(), user.clone());
        Box::pin(async move {
            crate::edge::percore::on_main(fut)
                .await
                .unwrap_or_else(|| Err(PreviewError::Api(ApiError::shutting_down())))
        })
    }
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
pub fn link(
    auth: &Auth,
    cfg: &Config,
    user: &UserId,
    conn: &ConnInfo,
) -> Result<Response<Body>, ApiError> {
    let ttl = Duration::from_secs(12 * 3600);
    let token = auth.issue_scoped(user, ttl, Some("preview"))?;
    let url = format!("{}?{LINK_PARAM}={token}", url(cfg, user, conn));
    Ok(crate::http::json(
        StatusCode::OK,
        &serde_json::json!({"url": url, "expiresInSeconds": ttl.as_secs()}),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
