//! The application behind the edge: routes each request by Host to the API (and terminal and
//! console) on the main host, or to the preview proxy on a user's preview host.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::HOST;
use hyper::{Request, Response, StatusCode};

use crate::api::Api;
use crate::auth::Auth;
use crate::config::Config;
use crate::edge::fast::{FastAnswer, FastFuture, FastHead};
use crate::edge::listener::{ConnInfo, Handler};
use crate::edge::router::{normalized, request_host, RequestHost, Route, Router, RouterConfig};
use crate::http::error::ApiError;
use crate::http::Body;
use crate::preview::Proxy;
use crate::sandbox::Manager;

/// The application: the Host router and the two sides it dispatches to. `cfg` is what the
/// Host guards and the HTTPS redirect read; `mgr` counts preview requests in the metrics.
pub struct App {
    pub cfg: Arc<Config>,
    pub mgr: Arc<Manager>,
    /// The Host router, its configured hosts normalized once.
    routes: Router,
    pub api: Api,
    pub preview: Proxy,
}

impl App {
    pub fn new(cfg: Arc<Config>, mgr: Arc<Manager>, auth: Auth) -> Arc<App> {
        let mut main_hosts = vec![cfg.domain.clone()];
        if cfg.domain == "localhost" {
            main_hosts.extend(["127.0.0.1".to_owned(), "::1".to_owned()]);
        }
        let router = RouterConfig {
            main_hosts,
            preview_domain: cfg.preview_domain.clone(),
            extra_ports: cfg.preview_extra_ports.clone(),
        };
        Arc::new(App {
            routes: Router::new(&router),
            api: Api::new(cfg.clone(), mgr.clone(), auth.clone()),
            preview: Proxy::new(cfg.clone(), mgr.clone(), auth),
            cfg,
            mgr,
        })
    }

    /// Every request: a request id (kept from the client when sane, else new), a span that
    /// carries it through every log line of the request, the `X-Request-Id` header on the
    /// request (so the preview app gets it) and on the response, and one access line.
    /// `route` is the request's route, found once by the caller.
    async fn handle(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        conn: Arc<ConnInfo>,
        route: Route,
        hot: Option<crate::sandbox::Running>,
    ) -> Response<Body> {
        use crate::access::{Access, HostKind, X_REQUEST_ID};
        let host = match route {
            Route::Main => HostKind::Main,
            Route::Preview { .. } => HostKind::Preview,
            Route::NotFound => HostKind::Unknown,
        };
        let access =
            Access::for_request(req.headers(), req.method().clone(), req.uri().path(), host);
        // A kept client id is already the request's only `X-Request-Id`.
        if !access.kept_client_id() {
            req.headers_mut()
                .insert(X_REQUEST_ID, access.header_value());
        }
        // Without an access line or a span (a level above `info`) there is nothing to note the
        // user in and nothing to run the request inside: it runs as it is, with one future
        // less to build and move.
        // The request's own checks run here, once; what is left is a pointer to the boxed
        // future of the side that answers. The span's branch is boxed too: inline, it would
        // make this future (moved whole into its box) twice the size it needs without it.
        let user = match &route {
            Route::Preview { user, .. } if !access.is_off() => Some(user.clone()),
            _ => None,
        };
        let routed = self.route(req, conn, route, hot);
        let mgr = &self.mgr;
        let mut resp = if access.is_off() {
            routed.answer(mgr).await
        } else {
            let on = access.run(async move {
                if let Some(user) = &user {
                    crate::access::note_user(user.as_str());
                }
                routed.answer(mgr).await
            });
            Box::pin(on).await
        };
        resp.headers_mut()
            .insert(X_REQUEST_ID, access.header_value());
        access.log(resp.status());
        resp
    }

    /// `route` is the request's route (its host does not change below); `hot`, the preview's
    /// address when the request is the preview's hot path (`Proxy::hot_ip`). Not async: the
    /// answer is its own or the (boxed, not yet started) future of the side that gives it.
    fn route(
        &self,
        req: Request<Incoming>,
        conn: Arc<ConnInfo>,
        route: Route,
        hot: Option<crate::sandbox::Running>,
    ) -> Routed<'_> {
        // Header smuggling guards: one Host only, and an absolute-form URI must name the same
        // host as the Host header. (hyper already refuses CR/LF inside header values.)
        let mut hosts = req.headers().get_all(HOST).iter();
        let first_host = hosts.next();
        if hosts.next().is_some() {
            return Routed::Answer(
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_host",
                    "more than one Host header",
                )
                .into_response(),
            );
        }
        if let (Some(authority), Some(h)) = (req.uri().authority(), first_host) {
            let same = h
                .to_str()
                .ok()
                .and_then(normalized)
                .zip(normalized(authority.as_str()))
                .is_some_and(|(a, b)| a == b);
            if !same {
                return Routed::Answer(
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "bad_host",
                        "URI authority and Host differ",
                    )
                    .into_response(),
                );
            }
        }
        if self.cfg.http_redirect && !conn.tls {
            if let Some(resp) = self.https_redirect(&req) {
                return Routed::Answer(resp);
            }
        }
        // Each side's future is boxed: the API's is large, and a request future that held both
        // inline would be copied whole at every move (into its box, its span, its task).
        match route {
            Route::Main => Routed::Api(Box::pin(self.api.handle(req, conn))),
            Route::Preview { user, port } => {
                Routed::Preview(Box::pin(self.preview.handle(req, conn, user, port, hot)))
            }
            Route::NotFound => Routed::Answer(
                ApiError::new(StatusCode::NOT_FOUND, "unknown_host", "no such host")
                    .into_response(),
            ),
        }
    }
}

/// What [`App::route`] found for a request.
enum Routed<'a> {
    /// Its own answer (a refused Host, the HTTPS redirect, an unknown host).
    Answer(Response<Body>),
    /// The API's handling.
    Api(BoxedAnswer<'a>),
    /// The preview's handling (counted in the metrics).
    Preview(BoxedAnswer<'a>),
}

type BoxedAnswer<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Response<Body>> + Send + 'a>>;

impl Routed<'_> {
    async fn answer(self, mgr: &Manager) -> Response<Body> {
        match self {
            Routed::Answer(resp) => resp,
            Routed::Api(answer) => answer.await,
            Routed::Preview(answer) => {
                let t = std::time::Instant::now();
                let resp = answer.await;
                mgr.metrics().preview_request(resp.status(), t.elapsed());
                resp
            }
        }
    }
}

impl App {
    /// `http_redirect`: plain-HTTP requests for known hosts go to the same URL over HTTPS.
    fn https_redirect(&self, req: &Request<Incoming>) -> Option<Response<Body>> {
        let https = self.cfg.https_addr?;
        let host = request_host(req).and_then(normalized)?.into_owned();
        if self.routes.route(Some(&host)) == Route::NotFound {
            return None;
        }
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        let port = if https.port() == 443 {
            String::new()
        } else {
            format!(":{}", https.port())
        };
        let pq = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let location = format!("https://{host}{port}{pq}");
        let mut resp = Response::new(crate::http::empty());
        *resp.status_mut() = StatusCode::PERMANENT_REDIRECT;
        resp.headers_mut()
            .insert(hyper::header::LOCATION, location.parse().ok()?);
        Some(resp)
    }
}

/// Adapter: the listener holds an `Arc<dyn Handler>`.
///
/// On an edge thread (`edge/percore.rs`) only the preview's hot path runs in place; every other
/// request (the API, the terminal, wakes, tunnels) runs on the main runtime, where the manager,
/// the engine client and the store live, and its answer comes back to the connection.
pub struct AppHandler(pub Arc<App>);

impl Handler for AppHandler {
    fn handle(
        &self,
        req: Request<Incoming>,
        conn: Arc<ConnInfo>,
        host: Option<RequestHost>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response<Body>> + Send>> {
        let app = self.0.clone();
        let route = match &host {
            Some(host) => app.routes.route_host(host),
            None => app.routes.route(request_host(&req)),
        };
        let hot = match &route {
            Route::Preview { user, .. } => app.preview.hot_ip(&req, user),
            _ => None,
        };
        if hot.is_some() {
            return Box::pin(app.handle(req, conn, route, hot));
        }
        // Dropped with the connection's request, as the in-place future would be.
        Box::pin(async move {
            match crate::edge::percore::on_main(app.handle(req, conn, route, None)).await {
                Some(resp) => resp,
                None => ApiError::shutting_down().into_response(),
            }
        })
    }

    /// Only the preview's hot path, and only where hyper's path would do nothing more than
    /// forward: not with owner-only previews (a token and a cookie to check), nor with
    /// `http_redirect` (plain requests are redirected).
    fn has_fast_path(&self, tls: bool) -> bool {
        let cfg = &self.0.cfg;
        cfg.preview_fast_path
            && self.0.preview.takes_fast_path()
            && (tls || !(cfg.http_redirect && cfg.https_addr.is_some()))
    }

    /// A request for a preview whose sandbox runs, with the same request id, access line,
    /// activity and metrics as [`App::handle`] gives it on hyper's path.
    fn fast(&self, head: &FastHead<'_>, conn: &Arc<ConnInfo>) -> Option<FastFuture> {
        use crate::access::{Access, HostKind, X_REQUEST_ID};
        let app = &self.0;
        let host = std::str::from_utf8(head.host).ok()?;
        let Route::Preview { user, port } = app.routes.route(Some(host)) else {
            return None;
        };
        let hot = app.mgr.running(&user)?;
        let method = if head.is_head() {
            hyper::Method::HEAD
        } else {
            hyper::Method::GET
        };
        let access = Access::for_raw(
            head.values("x-request-id"),
            method,
            head.path(),
            HostKind::Preview,
        );
        let (wire, wants_html) = app.preview.fast_request(head, conn, &access.header_value());
        let head_only = head.is_head();
        let addr = std::net::SocketAddr::new(hot.ip(), port);
        let app = app.clone();
        Some(Box::pin(async move {
            let t = std::time::Instant::now();
            let forward = app
                .preview
                .forward_fast(wire, head_only, &user, addr, &hot, wants_html);
            let mut answer = if access.is_off() {
                forward.await
            } else {
                access
                    .run(async {
                        crate::access::note_user(user.as_str());
                        forward.await
                    })
                    .await
            };
            let status = match &mut answer {
                FastAnswer::Answer(resp) => {
                    resp.headers_mut()
                        .insert(X_REQUEST_ID, access.header_value());
                    resp.status()
                }
                FastAnswer::Lines(a) => {
                    a.request_id = Some(access.header_value());
                    a.status
                }
                // hyper's path serves it, and logs and counts it.
                FastAnswer::Fallback => return FastAnswer::Fallback,
            };
            let metrics = app.mgr.metrics();
            metrics.preview_request(status, t.elapsed());
            metrics.preview_fast_request();
            access.log(status);
            answer
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn future_size<A, B, C, D, E, R>(_: impl FnOnce(A, B, C, D, E) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// Every request's `App::handle` future is built and moved whole into its box: it holds
    /// pointers to the large, boxed parts (the API's and the preview's handling, the access
    /// span's branch), not the parts themselves (2,944 bytes with the span's branch and the
    /// checks inline, 1,136 without).
    #[test]
    fn the_request_future_stays_small() {
        let size = future_size(App::handle);
        assert!(size <= 2048, "App::handle's future is {size} bytes");
    }
}
