//! Prometheus metrics (prometheus-client), served in the OpenMetrics text format on a listener
//! of their own (`metrics_addr`, loopback by default), never on the public edge listeners.
//!
//! One [`Metrics`] value is made with the manager and shared by `Arc`: the manager counts
//! transitions, wakes, executions and engine/store errors; the app counts preview requests
//! and tunnels; gauges that describe the present (sandboxes by state, capacity, open
//! terminals) are read from the manager when Prometheus scrapes. Every label takes values from
//! a small fixed set, so the number of series stays bounded whatever clients send.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::http::{full, Body};
use crate::sandbox::{Manager, State};

/// The content type of `encode`'s output (Prometheus negotiates it; 2.x and later read it).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A transition the manager makes (the `op` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Create,
    Start,
    Pause,
    Unpause,
    Stop,
    Remove,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Start => "start",
            Op::Pause => "pause",
            Op::Unpause => "unpause",
            Op::Stop => "stop",
            Op::Remove => "remove",
        }
    }
}

/// How an execution ended (the `outcome` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Exit code 0.
    Ok,
    /// The program ran and exited with another code.
    ErrorExit,
    /// Killed at its time limit.
    Timeout,
    /// The container's memory limit killed something during the run.
    Oom,
    /// The execution could not run (the sandbox did not start, the engine failed).
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::ErrorExit => "error_exit",
            Outcome::Timeout => "timeout",
            Outcome::Oom => "oom",
            Outcome::Failed => "failed",
        }
    }

    pub fn of(
        res: &Result<crate::sandbox::exec::ExecResult, crate::sandbox::SandboxError>,
    ) -> Self {
        match res {
            Err(_) => Outcome::Failed,
            Ok(r) if r.timed_out => Outcome::Timeout,
            Ok(r) if r.oom_killed => Outcome::Oom,
            Ok(r) if r.exit_code == Some(0) => Outcome::Ok,
            Ok(_) => Outcome::ErrorExit,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FromLabel {
    from: &'static str,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabel {
    class: &'static str,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn transition_buckets() -> Histogram {
    // 5 ms .. ~41 s
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}
fn preview_buckets() -> Histogram {
    // 1 ms .. ~33 s
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}
fn execution_buckets() -> Histogram {
    // 10 ms .. ~82 s
    Histogram::new(exponential_buckets(0.01, 2.0, 14))
}

pub struct Metrics {
    registry: Registry,
    sandboxes: Family<StateLabel, Gauge>,
    capacity_in_use: Gauge,
    capacity: Gauge,
    transitions: Family<OpLabel, Counter>,
    transition_seconds: Histograms<OpLabel>,
    outside_changes: Family<KindLabel, Counter>,
    wake_seconds: Histograms<FromLabel>,
    preview_requests: Family<ClassLabel, Counter>,
    preview_seconds: Histograms<ClassLabel>,
    /// Per status class (1xx..5xx), the members of the two families above, once used.
    preview_by_class: [OnceLock<(Counter, Histogram)>; 5],
    /// Of those, the ones the edge's fast path answered (edge/fast.rs).
    preview_fast: Counter,
    terminals_open: Gauge,
    tunnels_open: Gauge,
    executions: Family<OutcomeLabel, Counter>,
    execution_seconds: Histograms<OutcomeLabel>,
    engine_errors: Counter,
    store_errors: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix("sandboxd");
        let m = Metrics {
            sandboxes: Family::default(),
            capacity_in_use: Gauge::default(),
            capacity: Gauge::default(),
            transitions: Family::default(),
            transition_seconds: Family::new_with_constructor(transition_buckets),
            outside_changes: Family::default(),
            wake_seconds: Family::new_with_constructor(transition_buckets),
            preview_requests: Family::default(),
            preview_seconds: Family::new_with_constructor(preview_buckets),
            preview_by_class: Default::default(),
            preview_fast: Counter::default(),
            terminals_open: Gauge::default(),
            tunnels_open: Gauge::default(),
            executions: Family::default(),
            execution_seconds: Family::new_with_constructor(execution_buckets),
            engine_errors: Counter::default(),
            store_errors: Counter::default(),
            registry: Registry::default(),
        };
        r.register(
            "sandboxes",
            "Sandboxes (containers) by state",
            m.sandboxes.clone(),
        );
        r.register(
            "capacity_in_use",
            "Sandbox slots in use (running or paused containers)",
            m.capacity_in_use.clone(),
        );
        r.register(
            "capacity",
            "Sandbox slots in all (max_containers)",
            m.capacity.clone(),
        );
        r.register(
            "transitions",
            "Sandbox transitions made by sandboxd, by operation; op=\"outside\" counts changes made behind sandboxd's back",
            m.transitions.clone(),
        );
        r.register_with_unit(
            "transition_duration",
            "Time the engine took for a transition, by operation",
            Unit::Seconds,
            m.transition_seconds.clone(),
        );
        r.register(
            "outside_changes",
            "Container changes sandboxd did not make (seen in the engine's events), by kind",
            m.outside_changes.clone(),
        );
        r.register_with_unit(
            "wake_duration",
            "Time from a wake request reaching the manager to the container running, by the state it woke from",
            Unit::Seconds,
            m.wake_seconds.clone(),
        );
        r.register(
            "preview_requests",
            "Preview requests by status class of the response",
            m.preview_requests.clone(),
        );
        r.register(
            "preview_fast_path_requests",
            "Preview requests answered by the edge's HTTP/1.1 fast path (also in preview_requests)",
            m.preview_fast.clone(),
        );
        r.register_with_unit(
            "preview_request_duration",
            "Time to the response head of a preview request, by status class",
            Unit::Seconds,
            m.preview_seconds.clone(),
        );
        r.register(
            "terminals_open",
            "Open terminal sessions",
            m.terminals_open.clone(),
        );
        r.register(
            "preview_tunnels_open",
            "Open preview tunnels (WebSocket upgrades)",
            m.tunnels_open.clone(),
        );
        r.register(
            "executions",
            "Code executions by outcome",
            m.executions.clone(),
        );
        r.register_with_unit(
            "execution_duration",
            "Duration of code executions (waking the sandbox included), by outcome",
            Unit::Seconds,
            m.execution_seconds.clone(),
        );
        r.register(
            "engine_errors",
            "Errors from the container engine in sandbox transitions and executions",
            m.engine_errors.clone(),
        );
        r.register(
            "store_errors",
            "Errors from the store (database)",
            m.store_errors.clone(),
        );
        // Every known series starts at zero, so rates and increases work from the first scrape.
        for state in [State::Running, State::Paused, State::Stopped] {
            let _ = m.sandboxes.get_or_create(&StateLabel {
                state: state.as_str(),
            });
        }
        for op in [
            Op::Create,
            Op::Start,
            Op::Pause,
            Op::Unpause,
            Op::Stop,
            Op::Remove,
        ] {
            let l = OpLabel { op: op.as_str() };
            let _ = m.transitions.get_or_create(&l);
            let _ = m.transition_seconds.get_or_create(&l);
        }
        let _ = m.transitions.get_or_create(&OpLabel { op: "outside" });
        for from in [State::Paused, State::Stopped] {
            let _ = m.wake_seconds.get_or_create(&FromLabel {
                from: from.as_str(),
            });
        }
        for class in ["1xx", "2xx", "3xx", "4xx", "5xx"] {
            let _ = m.preview_requests.get_or_create(&ClassLabel { class });
            let _ = m.preview_seconds.get_or_create(&ClassLabel { class });
        }
        for o in [
            Outcome::Ok,
            Outcome::ErrorExit,
            Outcome::Timeout,
            Outcome::Oom,
            Outcome::Failed,
        ] {
            let l = OutcomeLabel {
                outcome: o.as_str(),
            };
            let _ = m.executions.get_or_create(&l);
            let _ = m.execution_seconds.get_or_create(&l);
        }
        Metrics { registry: r, ..m }
    }

    /// A transition sandboxd made, and how long the engine took.
    pub fn transition(&self, op: Op, took: Duration) {
        let l = OpLabel { op: op.as_str() };
        self.transitions.get_or_create(&l).inc();
        self.transition_seconds
            .get_or_create(&l)
            .observe(took.as_secs_f64());
    }

    /// A change sandboxd did not make (the engine's event follower calls this), e.g. "die",
    /// "pause", "destroy". Kinds outside `[a-z_]{1,24}` count as "other".
    pub fn outside_change(&self, kind: &str) {
        let ok = !kind.is_empty()
            && kind.len() <= 24
            && kind.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
        let kind = if ok { kind } else { "other" };
        self.transitions
            .get_or_create(&OpLabel { op: "outside" })
            .inc();
        self.outside_changes
            .get_or_create(&KindLabel {
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// A wake from `from` (paused or stopped) that took `took` until the container ran.
    pub fn wake(&self, from: State, took: Duration) {
        self.wake_seconds
            .get_or_create(&FromLabel {
                from: from.as_str(),
            })
            .observe(took.as_secs_f64());
    }

    /// A preview request the edge's fast path answered (counted by [`Metrics::preview_request`]
    /// too).
    pub fn preview_fast_request(&self) {
        self.preview_fast.inc();
    }

    /// One preview request answered with `status` after `took`.
    pub fn preview_request(&self, status: StatusCode, took: Duration) {
        // The hot path: the class's counter and histogram are looked up in their families once
        // (created on first use, as before), then used without the families' locks and hashing.
        let class = status_class(status);
        // 1xx..5xx → 0..4, as `status_class` (anything past 5xx counts as 5xx).
        let i = usize::from((status.as_u16() / 100).clamp(1, 5) - 1);
        let (count, seconds) = self.preview_by_class[i].get_or_init(|| {
            let l = ClassLabel { class };
            (
                self.preview_requests.get_or_create_owned(&l),
                self.preview_seconds.get_or_create_owned(&l),
            )
        });
        count.inc();
        seconds.observe(took.as_secs_f64());
    }

    /// Counts an open preview tunnel until the guard drops.
    pub fn tunnel_opened(self: &Arc<Self>) -> TunnelGuard {
        self.tunnels_open.inc();
        TunnelGuard(self.clone())
    }

    pub fn execution(&self, outcome: Outcome, took: Duration) {
        let l = OutcomeLabel {
            outcome: outcome.as_str(),
        };
        self.executions.get_or_create(&l).inc();
        self.execution_seconds
            .get_or_create(&l)
            .observe(took.as_secs_f64());
    }

    pub fn engine_error(&self) {
        self.engine_errors.inc();
    }

    pub fn store_error(&self) {
        self.store_errors.inc();
    }

    /// Sets the gauges that describe the present from the manager (called on each scrape).
    pub fn observe(&self, mgr: &Manager) {
        let (mut running, mut paused, mut stopped, mut terminals) = (0i64, 0i64, 0i64, 0i64);
        for slot in mgr.all_slots() {
            terminals += slot.open_terminals() as i64;
            match mgr.fast_state(&slot) {
                Some(State::Running) => running += 1,
                Some(State::Paused) => paused += 1,
                Some(State::Stopped) => stopped += 1,
                None => {}
            }
        }
        for (state, n) in [
            (State::Running, running),
            (State::Paused, paused),
            (State::Stopped, stopped),
        ] {
            self.sandboxes
                .get_or_create(&StateLabel {
                    state: state.as_str(),
                })
                .set(n);
        }
        self.terminals_open.set(terminals);
        self.capacity_in_use.set(mgr.live_count() as i64);
        self.capacity.set(mgr.config().max_containers as i64);
    }

    /// The exposition (OpenMetrics text, ends with `# EOF`).
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// `2xx`, `4xx`, ...
pub fn status_class(s: StatusCode) -> &'static str {
    match s.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Counts an open preview tunnel for as long as it lives.
pub struct TunnelGuard(Arc<Metrics>);

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        self.0.tunnels_open.dec();
    }
}

/// Serves `GET /metrics` (everything else is 404) on its own listener until shutdown. Small
/// and bounded: HTTP/1.1 only, a header read timeout, at most 32 connections at a time.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    mgr: Arc<Manager>,
    mut shutdown: watch::Receiver<bool>,
) {
    let conns = Arc::new(Semaphore::new(32));
    loop {
        let (stream, _peer): (_, SocketAddr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            continue; // over the limit: drop the connection
        };
        let (metrics, mgr) = (metrics.clone(), mgr.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req| {
                let (metrics, mgr) = (metrics.clone(), mgr.clone());
                async move { Ok::<_, Infallible>(answer(&metrics, &mgr, req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(Duration::from_secs(60), conn).await;
        });
    }
}

fn answer(metrics: &Metrics, mgr: &Manager, req: Request<Incoming>) -> Response<Body> {
    let mut resp = if req.uri().path() != "/metrics" {
        let mut r = Response::new(full("not found; see /metrics\n"));
        *r.status_mut() = StatusCode::NOT_FOUND;
        r
    } else if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = Response::new(full("method not allowed\n"));
        *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        r
    } else {
        metrics.observe(mgr);
        let mut r = Response::new(full(metrics.encode()));
        r.headers_mut()
            .insert(header::CONTENT_TYPE, CONTENT_TYPE.parse().expect("valid"));
        return r;
    };
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        "text/plain; charset=utf-8".parse().expect("valid"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_every_metric_by_convention() {
        let m = Metrics::new();
        m.transition(Op::Create, Duration::from_millis(120));
        m.transition(Op::Pause, Duration::from_millis(20));
        m.outside_change("die");
        m.outside_change("Weird Kind!");
        m.wake(State::Paused, Duration::from_millis(30));
        m.wake(State::Stopped, Duration::from_millis(900));
        m.preview_request(StatusCode::OK, Duration::from_millis(3));
        m.preview_request(StatusCode::BAD_GATEWAY, Duration::from_millis(3));
        m.execution(Outcome::Timeout, Duration::from_secs(2));
        m.engine_error();
        m.store_error();
        let g = Arc::new(Metrics::new());
        let t = g.tunnel_opened();
        assert!(g.encode().contains("sandboxd_preview_tunnels_open 1"));
        drop(t);
        assert!(g.encode().contains("sandboxd_preview_tunnels_open 0"));

        let text = m.encode();
        for needle in [
            "# TYPE sandboxd_sandboxes gauge",
            "sandboxd_sandboxes{state=\"paused\"} 0",
            "sandboxd_transitions_total{op=\"unpause\"} 0",
            "sandboxd_executions_total{outcome=\"oom\"} 0",
            "# TYPE sandboxd_capacity_in_use gauge",
            "# TYPE sandboxd_capacity gauge",
            "# TYPE sandboxd_transitions counter",
            "sandboxd_transitions_total{op=\"create\"} 1",
            "sandboxd_transitions_total{op=\"pause\"} 1",
            "sandboxd_transitions_total{op=\"outside\"} 2",
            "# TYPE sandboxd_transition_duration_seconds histogram",
            "sandboxd_transition_duration_seconds_count{op=\"create\"} 1",
            "sandboxd_outside_changes_total{kind=\"die\"} 1",
            "sandboxd_outside_changes_total{kind=\"other\"} 1",
            "sandboxd_wake_duration_seconds_count{from=\"paused\"} 1",
            "sandboxd_wake_duration_seconds_count{from=\"stopped\"} 1",
            "sandboxd_preview_requests_total{class=\"2xx\"} 1",
            "sandboxd_preview_requests_total{class=\"5xx\"} 1",
            "sandboxd_preview_request_duration_seconds_bucket{",
            "# TYPE sandboxd_terminals_open gauge",
            "# TYPE sandboxd_preview_tunnels_open gauge",
            "sandboxd_executions_total{outcome=\"timeout\"} 1",
            "sandboxd_execution_duration_seconds_count{outcome=\"timeout\"} 1",
            "sandboxd_engine_errors_total 1",
            "sandboxd_store_errors_total 1",
            "# EOF",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        // Base units: seconds, never milliseconds.
        assert!(!text.contains("_ms"), "{text}");
    }

    #[test]
    fn status_classes() {
        assert_eq!(status_class(StatusCode::SWITCHING_PROTOCOLS), "1xx");
        assert_eq!(status_class(StatusCode::NO_CONTENT), "2xx");
        assert_eq!(status_class(StatusCode::PERMANENT_REDIRECT), "3xx");
        assert_eq!(status_class(StatusCode::NOT_FOUND), "4xx");
        assert_eq!(status_class(StatusCode::SERVICE_UNAVAILABLE), "5xx");
    }

    #[test]
    fn outcomes() {
        use crate::sandbox::exec::ExecResult;
        let ok = ExecResult {
            exit_code: Some(0),
            ..Default::default()
        };
        assert_eq!(Outcome::of(&Ok(ok.clone())), Outcome::Ok);
        let bad = ExecResult {
            exit_code: Some(1),
            ..Default::default()
        };
        assert_eq!(Outcome::of(&Ok(bad)), Outcome::ErrorExit);
        let oom = ExecResult {
            exit_code: Some(137),
            oom_killed: true,
            ..Default::default()
        };
        assert_eq!(Outcome::of(&Ok(oom)), Outcome::Oom);
        let slow = ExecResult {
            timed_out: true,
            ..Default::default()
        };
        assert_eq!(Outcome::of(&Ok(slow)), Outcome::Timeout);
        assert_eq!(
            Outcome::of(&Err(crate::sandbox::SandboxError::NotFound)),
            Outcome::Failed
        );
    }
}
