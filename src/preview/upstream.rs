//! Where a preview request goes: the one cold path. A running sandbox answers from the
//! manager's published state (no Docker call); otherwise the sandbox is created or woken
//! through the manager's single-flight and the request is held while the app's port is probed,
//! until it listens or no app can come. Plain requests and WebSocket tunnels both come here.

use std::net::SocketAddr;
use std::time::Duration;

use hyper::StatusCode;
use tokio::net::TcpStream;

use super::{PreviewError, Proxy};
use crate::http::error::ApiError;
use crate::sandbox::agent::Endpoint;
use crate::user::UserId;

/// How often a refused port is tried again while the app boots: often at first (the time
/// between the app listening and the held request going out is this interval at most), then
/// less often for an app that takes long (a refused connect costs both sides a little).
const PROBE_EVERY: Duration = Duration::from_millis(5);
const PROBE_EVERY_LATER: Duration = Duration::from_millis(25);
/// How long the frequent probing lasts.
const PROBE_FAST_FOR: Duration = Duration::from_secs(3);
/// How long one probe's connect may take while probing is frequent. A SYN sent while a woken
/// container's network is still coming up is lost, not refused, and the kernel sends it again
/// only after a second: a probe that waited for that held the request ~0.3–0.5 s past the
/// moment the app listened (measured on wakes from stopped). A connect to a listening app on
/// the private network completes in well under a millisecond (the kernel answers, not the
/// throttled app), so a probe that has no answer by then is dropped and a fresh SYN sent.
const PROBE_CONNECT_FAST: Duration = Duration::from_millis(50);
/// The same bound later on (a host under heavy load).
const PROBE_CONNECT_LATER: Duration = Duration::from_secs(2);
/// How long a refused port is retried before asking whether a dev server is starting at all.
const NO_APP_GRACE: Duration = Duration::from_millis(1500);
/// The gaps between the next such questions: each is a request to the sandbox's agent (or, for
/// an older image, an exec: engine and runtime work that a busy host, many sandboxes booting at
/// once, can least afford), so they grow from the first to the last.
const NO_APP_CHECK_FIRST: Duration = Duration::from_secs(1);
const NO_APP_CHECK_LAST: Duration = Duration::from_secs(4);

/// Whether the published address may be used as it is.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Via {
    /// The hot path: the manager's published address, without any probe.
    Published,
    /// The published address refused the connection: the container may have died or been
    /// restarted behind our back (its address can change), so ask the manager again.
    Manager,
}

impl Proxy {
    /// The address of `user`'s app on `port`, ready to take a connection. See the module doc.
    pub(super) async fn ready_addr(
        &self,
        user: &UserId,
        port: u16,
        via: Via,
    ) -> Result<SocketAddr, PreviewError> {
        if via == Via::Published {
            if let Some(ip) = self.mgr.running_ip(user) {
                return Ok(SocketAddr::new(ip, port));
            }
        }
        match self.mgr.is_known(user).await {
            Ok(true) => {}
            Ok(false) => return Err(PreviewError::UnknownPreview),
            Err(e) => return Err(PreviewError::Api(ApiError::internal(&e))),
        }
        let sandbox = tokio::time::timeout(self.cfg.wake_timeout, self.mgr.ensure_running(user))
            .await
            .map_err(|_| {
                PreviewError::Api(
                    ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "wake_timeout",
                        "the sandbox did not start in time",
                    )
                    .retry_after(2),
                )
            })??;
        let ip = sandbox.ip.ok_or_else(no_address)?;
        let addr = SocketAddr::new(ip, port);
        match self
            .connect_app_asking(user, addr, sandbox.agent.as_ref())
            .await
        {
            Some(_) => Ok(addr),
            None => Err(PreviewError::NotListening { port }),
        }
    }

    /// Connects to the app, retrying a refused port every 5 ms (every 25 ms after the first
    /// 3 s) up to `wake_timeout`. After a short grace, and then after 1, 2, 4, 4 … s, it asks
    /// the sandbox whether an app can still come: the init's discovery is still running (a slow
    /// start under load) or a dev server process is alive. If not, it gives up early so the
    /// client gets the "nothing listens" answer instead of a hang.
    pub(super) async fn connect_app(&self, user: &UserId, addr: SocketAddr) -> Option<TcpStream> {
        self.connect_app_asking(user, addr, None).await
    }

    /// [`Proxy::connect_app`], asking `agent` (the sandbox's agent, as the wake returned it)
    /// whether an app may still come; without it, or from an agent without the op, the question
    /// is an exec (see `Manager::app_may_come`).
    async fn connect_app_asking(
        &self,
        user: &UserId,
        addr: SocketAddr,
        agent: Option<&Endpoint>,
    ) -> Option<TcpStream> {
        let start = tokio::time::Instant::now();
        let deadline = start + self.cfg.wake_timeout;
        let mut next_check = start + NO_APP_GRACE;
        let mut check_gap = NO_APP_CHECK_FIRST;
        // A held request is activity: the idle policy must not pause a sandbox mid-start.
        let _held = self.mgr.request_held(user);
        loop {
            let (bound, every) = if start.elapsed() < PROBE_FAST_FOR {
                (PROBE_CONNECT_FAST, PROBE_EVERY)
            } else {
                (PROBE_CONNECT_LATER, PROBE_EVERY_LATER)
            };
            if let Ok(Ok(s)) = tokio::time::timeout(bound, TcpStream::connect(addr)).await {
                let _ = s.set_nodelay(true);
                return Some(s);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return None;
            }
            if now >= next_check {
                next_check = now + check_gap;
                check_gap = (check_gap * 2).min(NO_APP_CHECK_LAST);
                let (may, by) = self.mgr.app_may_come(user, agent, start.elapsed()).await;
                tracing::debug!(user = %user, may, ?by, waited_ms = start.elapsed().as_millis() as u64, "may an app still come");
                if !may {
                    return None;
                }
            }
            tokio::time::sleep(every).await;
        }
    }
}

/// A running sandbox without an address on the private network.
pub(super) fn no_address() -> PreviewError {
    PreviewError::Api(ApiError::new(
        StatusCode::BAD_GATEWAY,
        "no_address",
        "sandbox has no address",
    ))
}
