//! Plain requests: the request goes to the app through the pool (`pool.rs`) with its hop-by-hop
//! headers removed and `X-Forwarded-*` set; the answer streams back the same way. The header
//! operations are small functions, one per job, each with its own tests.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Request, Response, StatusCode, Uri};

use super::upstream::{no_address, Via};
use super::{PreviewError, Proxy};
use crate::edge::fast::{FastAnswer, FastHead};
use crate::edge::listener::ConnInfo;
use crate::http::error::ApiError;
use crate::http::Body;
use crate::sandbox::State;
use crate::user::UserId;

/// Hop-by-hop headers (RFC 9110 §7.6.1, plus the unofficial `Keep-Alive` and
/// `Proxy-Connection`): they describe one connection and never cross the proxy.
pub(super) static HOP_HEADERS: [HeaderName; 9] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// Removes the headers that any `Connection` header names. Every `Connection` header is read,
/// not only the first: a client may split the list over several lines.
#[cfg(test)]
fn remove_connection_listed(h: &mut HeaderMap) {
    remove_listed(h, false);
}

/// [`remove_connection_listed`]; with `skip_fixed`, names of [`HOP_HEADERS`] are left to the
/// caller, which removes those anyway (`Connection: keep-alive` then costs no lookup here).
fn remove_listed(h: &mut HeaderMap, skip_fixed: bool) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|n| {
            !(skip_fixed
                && HOP_HEADERS
                    .iter()
                    .any(|hop| hop.as_str().eq_ignore_ascii_case(n)))
        })
        .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
}

/// Removes the fixed hop-by-hop headers.
#[cfg(test)]
fn remove_hop_headers(h: &mut HeaderMap) {
    for (n, there) in HOP_HEADERS.iter().zip(hop_headers_present(h)) {
        if there {
            h.remove(n);
        }
    }
}

/// Which of [`HOP_HEADERS`] `h` carries, in one pass over its names: most messages carry none
/// or two (`Connection` and `Keep-Alive` from Node), and a hashed removal of each of the nine
/// cost more than the pass.
fn hop_headers_present(h: &HeaderMap) -> [bool; HOP_HEADERS.len()] {
    let mut present = [false; HOP_HEADERS.len()];
    for k in h.keys() {
        if let Some(i) = hop_index(k) {
            present[i] = true;
        }
    }
    present
}

/// The index of `k` in [`HOP_HEADERS`]: one `match` on the name (a jump on its length, then
/// one comparison) instead of nine comparisons of header names.
fn hop_index(k: &HeaderName) -> Option<usize> {
    match k.as_str() {
        "connection" => Some(0),
        "te" => Some(1),
        "trailer" => Some(2),
        "transfer-encoding" => Some(3),
        "upgrade" => Some(4),
        "proxy-authorization" => Some(5),
        "proxy-authenticate" => Some(6),
        "keep-alive" => Some(7),
        "proxy-connection" => Some(8),
        _ => None,
    }
}

/// Whether some `Connection` token names a header other than the fixed hop-by-hop ones (which
/// are removed anyway): the usual `Connection: keep-alive` (or `close`, `upgrade`) lists none
/// worth a lookup. `close` is not a hop header, so it still counts (as before, a header named
/// `close` is removed).
fn lists_other_headers(h: &HeaderMap) -> bool {
    h.get_all(header::CONNECTION).iter().any(|v| {
        v.as_bytes().split(|&b| b == b',').any(|t| {
            let t = t.trim_ascii();
            !t.is_empty()
                && !HOP_HEADERS
                    .iter()
                    .any(|hop| hop.as_str().as_bytes().eq_ignore_ascii_case(t))
        })
    })
}

/// Both of the above, in the order that still sees the `Connection` list.
pub(super) fn strip_hop_by_hop(h: &mut HeaderMap) {
    let present = hop_headers_present(h);
    // HOP_HEADERS[0] is `Connection`: without it, nothing is listed.
    if present[0] && lists_other_headers(h) {
        remove_listed(h, true);
    }
    for (n, there) in HOP_HEADERS.iter().zip(present) {
        if there {
            h.remove(n);
        }
    }
}

/// An HTTP/1.1 upgrade request: `Connection` lists `upgrade` and an `Upgrade` header is there.
pub(super) fn is_upgrade(h: &HeaderMap) -> bool {
    let conn_upgrade = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        });
    conn_upgrade && h.contains_key(header::UPGRADE)
}

/// The upstream switched to a protocol the client asked for (RFC 9110 §7.8): its one
/// `Upgrade` token is among the client's, compared without case.
pub(super) fn upgrade_matches(asked: Option<&HeaderValue>, answered: Option<&HeaderValue>) -> bool {
    let (Some(asked), Some(answered)) = (
        asked.and_then(|v| v.to_str().ok()),
        answered.and_then(|v| v.to_str().ok()),
    ) else {
        return false;
    };
    let answered = answered.trim();
    !answered.is_empty()
        && asked
            .split(',')
            .any(|p| p.trim().eq_ignore_ascii_case(answered))
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// `X-Forwarded-For` (the client's chain plus the peer we saw), `-Proto` and `-Host`.
pub(super) fn forwarded_headers(h: &mut HeaderMap, conn: &ConnInfo, host: Option<&str>) {
    forwarded_headers_value(h, conn, host.and_then(|h| HeaderValue::from_str(h).ok()));
}

/// [`forwarded_headers`] with the host already a header value.
fn forwarded_headers_value(h: &mut HeaderMap, conn: &ConnInfo, host: Option<HeaderValue>) {
    let mut ip = IpText::new();
    let peer = ip.of(conn.peer.ip());
    let xff = match h.get(&X_FORWARDED_FOR).map(HeaderValue::as_bytes) {
        // Clients can send anything: keep their chain, append what we saw.
        Some(prev) if prev.len() < super::pool::MAX_CHAIN => {
            let mut v = Vec::with_capacity(prev.len() + 2 + peer.len());
            v.extend_from_slice(prev);
            v.extend_from_slice(b", ");
            v.extend_from_slice(peer);
            HeaderValue::from_maybe_shared(bytes::Bytes::from(v))
        }
        _ => HeaderValue::from_bytes(peer),
    };
    if let Ok(v) = xff {
        h.insert(X_FORWARDED_FOR.clone(), v);
    }
    h.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(if conn.tls { "https" } else { "http" }),
    );
    if let Some(v) = host {
        h.insert(X_FORWARDED_HOST.clone(), v);
    }
}

/// An IP address as text without `fmt` (IPv4 by hand, the common case; IPv6 through
/// `Display`): the formatting machinery cost more than the rest of the forwarded headers.
struct IpText {
    buf: [u8; 45],
}

impl IpText {
    fn new() -> IpText {
        IpText { buf: [0; 45] }
    }

    fn of(&mut self, ip: IpAddr) -> &[u8] {
        use std::io::Write;
        let v4 = match ip {
            IpAddr::V4(v4) => v4,
            IpAddr::V6(v6) => {
                let mut w = &mut self.buf[..];
                // 45 bytes hold the longest IPv6 text.
                let _ = write!(w, "{v6}");
                let n = 45 - w.len();
                return &self.buf[..n];
            }
        };
        let mut n = 0;
        for (i, octet) in v4.octets().into_iter().enumerate() {
            if i > 0 {
                self.buf[n] = b'.';
                n += 1;
            }
            if octet >= 100 {
                self.buf[n] = b'0' + octet / 100;
                n += 1;
            }
            if octet >= 10 {
                self.buf[n] = b'0' + octet / 10 % 10;
                n += 1;
            }
            self.buf[n] = b'0' + octet % 10;
            n += 1;
        }
        &self.buf[..n]
    }
}

/// The upstream request target: only the path and query of the request, in origin form, so no
/// absolute-form URI can steer the proxy elsewhere (the connection is to the sandbox's address).
fn upstream_uri(uri: &Uri) -> Uri {
    // Origin form already (the usual HTTP/1 case): a shared copy, no parse.
    if uri.scheme().is_none() && uri.authority().is_none() {
        return uri.clone();
    }
    uri.path_and_query()
        .map(|pq| Uri::from(pq.clone()))
        .unwrap_or_else(|| Uri::from_static("/"))
}

/// The request's host as a header value: the URI authority when there is one (HTTP/2's
/// `:authority`, HTTP/1 absolute-form), else the Host header as it came (no copy), as
/// `router::request_host`.
fn host_value(p: &Parts) -> Option<HeaderValue> {
    match p.uri.authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).ok(),
        None => p.headers.get(header::HOST).cloned(),
    }
}

/// Safe to send again (RFC 9110 §9.2.2) and nothing in the body that was already consumed.
fn is_idempotent(p: &Parts) -> bool {
    matches!(
        p.method,
        hyper::Method::GET | hyper::Method::HEAD | hyper::Method::OPTIONS
    ) && is_bodyless(p)
}

fn is_bodyless(p: &Parts) -> bool {
    let len0 = p
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v.trim() == "0");
    len0 && !p.headers.contains_key(header::TRANSFER_ENCODING)
}

enum Late {
    /// The sandbox runs (or was just resumed, which lets the request go on): keep waiting.
    KeepWaiting,
    /// The container had stopped or vanished and was started again at this address: the
    /// request in flight is lost.
    Restarted(IpAddr),
    Failed(PreviewError),
}

impl Proxy {
    pub(super) async fn forward(
        &self,
        req: Request<Incoming>,
        conn: &ConnInfo,
        user: &UserId,
        mut addr: SocketAddr,
        hot: Option<&crate::sandbox::Running>,
    ) -> Result<Response<Body>, PreviewError> {
        let (mut parts, body) = req.into_parts();
        let host = host_value(&parts);
        strip_hop_by_hop(&mut parts.headers);
        let mut ip = IpText::new();
        // HTTP/2 clients send :authority, not Host; the app sees the preview host either way.
        // Without an authority, `host` is the request's own (single: `App::route` refuses
        // several) Host header, already in place.
        if let Some(h) = host.clone().filter(|_| parts.uri.authority().is_some()) {
            parts.headers.insert(header::HOST, h);
        }
        let fwd = super::pool::Forwarded {
            peer: ip.of(conn.peer.ip()),
            https: conn.tls,
            host: host.as_ref().map(HeaderValue::as_bytes),
        };
        parts.uri = upstream_uri(&parts.uri);
        parts.version = hyper::Version::HTTP_11;
        let port = addr.port();
        let mut body = Some(body);
        let mut attempt = 0;
        // When the request began to be held for an app that is not up yet.
        let mut held: Option<tokio::time::Instant> = None;
        let pool = self.pool.here();
        loop {
            attempt += 1;
            let b: Body = match body.take() {
                Some(b) => b.map_err(Into::into).boxed(),
                None => crate::http::empty(),
            };
            let sent = pool.send_head(addr, &parts, Some(&fwd), b);
            tokio::pin!(sent);
            // Backstop: an answer whose head is late may be a request sent to a container that
            // was paused or stopped behind our back. Re-check the sandbox instead of waiting
            // forever; a sandbox that runs normally just has a slow app, and we keep waiting.
            let result = match crate::edge::coarse::within(
                self.cfg.upstream_head_timeout,
                &mut sent,
            )
            .await
            {
                Ok(r) => r,
                Err(_) => match self.late(user).await {
                    Late::KeepWaiting => sent.await,
                    Late::Restarted(ip) if attempt == 1 && is_idempotent(&parts) => {
                        addr = SocketAddr::new(ip, port);
                        let up = self.off_edge(user, move |p, u| async move {
                            Ok(p.connect_app(&u, addr).await.is_some())
                        });
                        match up.await? {
                            true => continue,
                            false => return Err(PreviewError::NotListening { port }),
                        }
                    }
                    Late::Restarted(_) => return Err(PreviewError::Restarted),
                    Late::Failed(e) => return Err(e),
                },
            };
            match result {
                Ok(resp) => {
                    hot.map_or_else(|| self.mgr.touch(user), |r| r.touch());
                    // The pool's parser (pool/h1.rs) already left out the hop-by-hop headers.
                    let (rp, rb) = resp.into_parts();
                    return Ok(Response::from_parts(rp, rb.map_err(Into::into).boxed()));
                }
                // Nothing listening (or, for a request that may be sent twice, a new connection
                // dropped unanswered): the app may be starting, or the container died or was
                // restarted behind our back. Ask the manager again and hold the request while
                // the app comes up, a bounded number of times within `wake_timeout`.
                Err(e)
                    if (e.is_connect() || (e.is_dropped() && is_idempotent(&parts)))
                        && is_bodyless(&parts)
                        && attempt < MAX_SENDS
                        && held.get_or_insert_with(tokio::time::Instant::now).elapsed()
                            < self.cfg.wake_timeout =>
                {
                    let pause = if e.is_dropped() {
                        dropped_pause(attempt)
                    } else {
                        Duration::ZERO
                    };
                    addr = self
                        .off_edge(user, move |p, u| async move {
                            tokio::time::sleep(pause).await;
                            p.ready_addr(&u, port, Via::Manager).await
                        })
                        .await?;
                    continue;
                }
                Err(e) if e.is_connect() && attempt == 1 => {
                    // A body that was already streamed is not replayed: hold the request while
                    // the app comes up, then ask the client to send it again.
                    self.off_edge(user, move |p, u| async move {
                        p.ready_addr(&u, port, Via::Manager).await
                    })
                    .await?;
                    return Err(PreviewError::Api(
                        ApiError::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "preview_starting",
                            "the app just started; retry",
                        )
                        .retry_after(1),
                    ));
                }
                Err(e) => return Err(upstream_failed(user, port, &e)),
            }
        }
    }

    /// The edge's fast path (`edge/fast.rs`) of a request to `user`'s running sandbox (`hot`,
    /// at `addr`): `wire` is its head as the app gets it ([`fast_wire`]). What the fast path
    /// cannot finish as [`Proxy::forward`] would (nothing listening yet, a sandbox restarted
    /// under the request) goes back to hyper's path, which sends the request again: it is a
    /// bodyless `GET` or `HEAD`.
    pub(crate) async fn forward_fast(
        &self,
        wire: bytes::Bytes,
        head_only: bool,
        user: &UserId,
        addr: SocketAddr,
        hot: &crate::sandbox::Running,
        wants_html: bool,
    ) -> FastAnswer {
        let pool = self.pool.here();
        let sent = pool.send_bodyless(addr, wire, head_only);
        tokio::pin!(sent);
        // The late-answer backstop, as in `forward`.
        let result =
            match crate::edge::coarse::within(self.cfg.upstream_head_timeout, &mut sent).await {
                Ok(r) => r,
                Err(_) => match self.late(user).await {
                    Late::KeepWaiting => sent.await,
                    Late::Restarted(_) => return FastAnswer::Fallback,
                    Late::Failed(e) => return FastAnswer::Answer(e.into_response(wants_html)),
                },
            };
        match result {
            Ok(resp) => {
                hot.touch();
                FastAnswer::Lines(crate::edge::fast::LinesAnswer {
                    status: resp.status,
                    lines: resp.lines.bytes,
                    length: resp.lines.length,
                    has_date: resp.lines.has_date,
                    request_id: None,
                    body: resp.body.map_err(Into::into).boxed(),
                })
            }
            // Nothing listening, or a new connection dropped unanswered (an app starting):
            // hyper's path waits for the app (or says why not).
            Err(e) if e.is_connect() || e.is_dropped() => FastAnswer::Fallback,
            Err(e) => {
                FastAnswer::Answer(upstream_failed(user, addr.port(), &e).into_response(wants_html))
            }
        }
    }

    /// [`Proxy::late_answer`], on the main runtime.
    async fn late(&self, user: &UserId) -> Late {
        self.off_edge(user, |p, u| async move { Ok(p.late_answer(&u).await) })
            .await
            .unwrap_or_else(Late::Failed)
    }

    /// The upstream head is late: look at the sandbox as the engine sees it, and wake it if it
    /// was paused, stopped or removed behind our back.
    async fn late_answer(&self, user: &UserId) -> Late {
        let state = match self.mgr.refresh(user).await {
            Ok(s) => s,
            Err(e) => return Late::Failed(PreviewError::Api(ApiError::internal(&e))),
        };
        if state == Some(State::Running) {
            return Late::KeepWaiting;
        }
        tracing::info!(user = %user, state = ?state, "late preview answer: the sandbox was not running");
        match self.mgr.ensure_running(user).await {
            // A paused container keeps its connections: once resumed, the answer comes.
            Ok(_) if state == Some(State::Paused) => Late::KeepWaiting,
            Ok(sb) => match sb.ip {
                Some(ip) => Late::Restarted(ip),
                None => Late::Failed(no_address()),
            },
            Err(e) => Late::Failed(PreviewError::Api(ApiError::from(e))),
        }
    }
}

/// How many times at most a request goes to an app that is coming up (see [`Proxy::forward`]).
const MAX_SENDS: u32 = 8;

/// The pause before sending a request again after the `attempt`th went to an app that dropped
/// a new connection unanswered: 25 ms doubling up to 400 ms (about 1.6 s over [`MAX_SENDS`]),
/// since such an app accepts the probe of [`Proxy::ready_addr`] at once.
fn dropped_pause(attempt: u32) -> Duration {
    Duration::from_millis(25u64 << attempt.saturating_sub(1).min(4))
}

/// The head of a fast-path request (`edge/fast.rs`) as the app gets it: the client's headers
/// with `X-Forwarded-*` and `request_id` (see `h1::encode_fast_head`).
pub(crate) fn fast_wire(head: &FastHead<'_>, conn: &ConnInfo, request_id: &[u8]) -> bytes::Bytes {
    let mut ip = IpText::new();
    let fwd = super::pool::Forwarded {
        peer: ip.of(conn.peer.ip()),
        https: conn.tls,
        host: Some(head.host),
    };
    let mut wire = Vec::with_capacity(512);
    super::pool::encode_fast_head(
        head.method,
        head.target,
        head.headers,
        &fwd,
        request_id,
        &mut wire,
    );
    bytes::Bytes::from(wire)
}

/// The error of a failed exchange with the app.
fn upstream_failed(user: &UserId, port: u16, e: &super::pool::UpstreamError) -> PreviewError {
    tracing::warn!(user = %user, error = %e, "preview upstream error");
    if e.is_connect() {
        return PreviewError::NotListening { port };
    }
    PreviewError::Api(ApiError::new(
        StatusCode::BAD_GATEWAY,
        "upstream_error",
        "the app in the sandbox failed to answer",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = headers(&[
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("accept", "*/*"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::ACCEPT));
    }

    #[test]
    fn a_connection_list_of_hop_headers_only_needs_no_lookup() {
        let only_hop = |v: &str| !lists_other_headers(&headers(&[("connection", v)]));
        assert!(only_hop("keep-alive"));
        assert!(only_hop(" Keep-Alive , UPGRADE,,te"));
        assert!(!only_hop("close"), "`close` could name a header");
        assert!(!only_hop("keep-alive, x-secret"));
        assert!(!lists_other_headers(&HeaderMap::new()));
        assert!(lists_other_headers(&headers(&[
            ("connection", "keep-alive"),
            ("connection", "x-two"),
        ])));
        // Whichever way it goes, the result is the one of the full removal.
        for v in [
            "keep-alive",
            "close",
            "Keep-Alive, X-Secret",
            "upgrade, te",
            " , ",
        ] {
            let pairs = [
                ("connection", v),
                ("keep-alive", "timeout=5"),
                ("x-secret", "1"),
                ("close", "1"),
                ("accept", "*/*"),
            ];
            let mut fast = headers(&pairs);
            strip_hop_by_hop(&mut fast);
            let mut full = headers(&pairs);
            remove_connection_listed(&mut full);
            remove_hop_headers(&mut full);
            assert_eq!(fast, full, "{v:?}");
        }
    }

    #[test]
    fn every_connection_header_is_read() {
        let mut h = headers(&[
            ("connection", "x-one"),
            ("connection", "x-two"),
            ("x-one", "1"),
            ("x-two", "2"),
            ("x-three", "3"),
        ]);
        remove_connection_listed(&mut h);
        assert!(!h.contains_key("x-one") && !h.contains_key("x-two"));
        assert!(h.contains_key("x-three"));
    }

    #[test]
    fn connection_names_are_trimmed_and_case_blind() {
        let mut h = headers(&[("connection", " X-Secret ,,"), ("x-secret", "1")]);
        remove_connection_listed(&mut h);
        assert!(!h.contains_key("x-secret"));
    }

    #[test]
    fn invalid_connection_names_are_ignored() {
        let mut h = headers(&[
            ("connection", "bad name, x-ok"),
            ("x-ok", "1"),
            ("accept", "*/*"),
        ]);
        remove_connection_listed(&mut h);
        assert!(!h.contains_key("x-ok"));
        assert!(h.contains_key(header::ACCEPT));
    }

    #[test]
    fn hop_index_names_the_hop_headers_in_order() {
        for (i, n) in HOP_HEADERS.iter().enumerate() {
            assert_eq!(hop_index(n), Some(i), "{n}");
        }
        for n in [
            "host",
            "accept",
            "cookie",
            "x-forwarded-for",
            "connectionx",
            "t",
        ] {
            assert_eq!(hop_index(&HeaderName::from_static(n)), None, "{n}");
        }
    }

    #[test]
    fn every_fixed_hop_header_is_removed() {
        let mut h = HeaderMap::new();
        for n in &HOP_HEADERS {
            h.insert(n.clone(), "x".parse().unwrap());
        }
        h.insert(header::COOKIE, "a=1".parse().unwrap());
        remove_hop_headers(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::COOKIE));
    }

    #[test]
    fn an_upgrade_needs_both_headers() {
        assert!(is_upgrade(&headers(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket")
        ])));
        assert!(is_upgrade(&headers(&[
            ("connection", "keep-alive, upgrade"),
            ("upgrade", "websocket")
        ])));
        assert!(is_upgrade(&headers(&[
            ("connection", "keep-alive"),
            ("connection", "upgrade"),
            ("upgrade", "websocket")
        ])));
        assert!(!is_upgrade(&headers(&[("upgrade", "websocket")])));
        assert!(!is_upgrade(&headers(&[("connection", "upgrade")])));
    }

    #[test]
    fn the_upstream_must_switch_to_what_the_client_asked() {
        let v = |s: &str| HeaderValue::from_str(s).unwrap();
        assert!(upgrade_matches(
            Some(&v("websocket")),
            Some(&v("websocket"))
        ));
        assert!(upgrade_matches(
            Some(&v("WebSocket")),
            Some(&v("websocket"))
        ));
        assert!(upgrade_matches(
            Some(&v("h2c, websocket")),
            Some(&v("websocket"))
        ));
        assert!(!upgrade_matches(Some(&v("websocket")), Some(&v("h2c"))));
        assert!(!upgrade_matches(Some(&v("websocket")), None));
        assert!(!upgrade_matches(None, Some(&v("websocket"))));
        assert!(!upgrade_matches(Some(&v("websocket")), Some(&v(""))));
    }

    #[test]
    fn forwarded_headers_append_to_the_chain() {
        let conn = ConnInfo {
            peer: "10.0.0.9:1234".parse().unwrap(),
            local: "127.0.0.1:8080".parse().unwrap(),
            tls: false,
            sni: None,
            alpn_h2: false,
        };
        let mut h = headers(&[("x-forwarded-for", "1.2.3.4")]);
        forwarded_headers(&mut h, &conn, Some("user-1.preview.localhost"));
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 10.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "user-1.preview.localhost");
    }

    #[test]
    fn ip_text_matches_display() {
        let mut t = IpText::new();
        for ip in [
            "0.0.0.0",
            "10.0.0.9",
            "127.0.0.1",
            "172.20.100.255",
            "255.255.255.255",
            "::1",
            "fe80::1:2:3:4",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        ] {
            let addr: IpAddr = ip.parse().unwrap();
            assert_eq!(t.of(addr), ip.as_bytes());
        }
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(t.of(mapped), mapped.to_string().as_bytes());
    }

    #[test]
    fn upstream_uri_keeps_only_path_and_query() {
        let u = upstream_uri(&"http://evil.example/x?y=1".parse().unwrap());
        assert_eq!(u.to_string(), "/x?y=1");
        assert!(u.authority().is_none() && u.scheme().is_none());
        let u = upstream_uri(&"/a/b?c".parse().unwrap());
        assert_eq!(u.to_string(), "/a/b?c");
        let u = upstream_uri(&"http://evil.example".parse().unwrap());
        assert_eq!(u.to_string(), "/");
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
}
