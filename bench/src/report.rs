//! The results of one run and their rendering as `docs/benchmarks.md`.

use std::fmt::Write as _;

use crate::stats::Summary;
use crate::wrk::WrkResult;

/// One proxy path measured with wrk: under load and over a single connection (medians of the
/// rounds).
#[derive(Clone, Debug)]
pub struct ProxyRow {
    pub size: String,
    pub key: &'static str,
    pub label: String,
    pub load: WrkResult,
    pub single: WrkResult,
    /// CPU time the proxy's processes used per request under load, µs.
    pub cpu_us: Option<f64>,
    /// CPU time the sandbox (its cgroup: the app and the image's init) used during the load
    /// runs, in cores (CPU seconds per second of the run), median of the rounds.
    pub app_cores: Option<f64>,
    /// Requests/s of each round's load run, in round order (the same index is the same round
    /// for every path).
    pub rounds: Vec<f64>,
}

/// From this share of a core up, the app (a single-threaded Node server) is taken to be what
/// limits the requests/s of a load run.
pub const APP_BOUND_CORES: f64 = 0.9;

/// Labels of the floors measured without sandboxd, in the wake table.
pub const FLOOR_WAKE: &str = "floor: wake from stopped without sandboxd";
pub const FLOOR_COLD: &str = "floor: cold first hit without sandboxd";
pub const FLOOR_CROWD: &str = "floor: the same starts at once without sandboxd (per container)";
/// The crowd row's label ends so (it begins with the number of users).
pub const CROWD: &str = "different users' first hits at once";

#[derive(Clone, Debug)]
pub struct TimedRow {
    pub label: String,
    pub ms: Summary,
    pub note: String,
}

/// Median phase times of a cold start or a wake, ms from the request.
#[derive(Clone, Debug, Default)]
pub struct Breakdown {
    pub label: String,
    pub created: Option<f64>,
    pub running: f64,
    pub app_process: f64,
    pub listening: f64,
    pub first_byte: f64,
    /// CPU time the sandbox used until the first byte, and how long its quota throttled it.
    pub cpu: Option<(f64, f64)>,
}

/// Swarm mode (`--only swarm`): one scenario timed single-host and in swarm mode through an
/// edge, in the same run.
#[derive(Clone, Debug)]
pub struct SwarmWake {
    pub label: String,
    pub single: Summary,
    pub swarm: Summary,
    pub note: String,
}

/// Swarm mode: small preview GETs through one edge or both (wrk, keep-alive).
#[derive(Clone, Debug)]
pub struct SwarmLoad {
    pub label: String,
    pub conns: u32,
    pub load: WrkResult,
    pub note: String,
}

#[derive(Clone, Debug)]
pub struct Fact {
    pub label: String,
    pub value: String,
    pub note: String,
}

#[derive(Clone, Debug)]
pub struct Target {
    pub what: String,
    pub target: String,
    pub measured: String,
    /// None: not measured in this run.
    pub pass: Option<bool>,
}

#[derive(Default)]
pub struct Report {
    pub date: String,
    pub command: String,
    pub duration_s: f64,
    pub setup_s: Option<f64>,
    pub machine: Vec<(String, String)>,
    pub versions: Vec<(String, String)>,
    pub settings: Vec<(String, String)>,
    pub proxy: Vec<ProxyRow>,
    /// `--only proxy-cost`: CPU time or instructions per small request, sandboxd vs nginx.
    pub proxy_cost: Vec<Fact>,
    pub wake: Vec<TimedRow>,
    pub breakdown: Vec<Breakdown>,
    pub exec: Vec<TimedRow>,
    pub files: Vec<Fact>,
    pub terminal: Vec<TimedRow>,
    pub footprint: Vec<Fact>,
    /// `--only swarm` (or a full run with `BENCH_SWARM=1`).
    pub swarm_wake: Vec<SwarmWake>,
    pub swarm_load: Vec<SwarmLoad>,
    pub swarm_facts: Vec<Fact>,
    pub notes: Vec<String>,
    pub errors: Vec<String>,
}

pub fn ms(v: f64) -> String {
    if !v.is_finite() {
        "–".into()
    } else if v >= 100.0 {
        format!("{v:.0} ms")
    } else if v >= 10.0 {
        format!("{v:.1} ms")
    } else {
        format!("{v:.2} ms")
    }
}

pub fn us(v: f64) -> String {
    if !v.is_finite() {
        "–".into()
    } else if v >= 10_000.0 {
        ms(v / 1000.0)
    } else {
        format!("{v:.0} µs")
    }
}

/// Microseconds with one decimal (CPU time per request).
pub fn us1(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.1} µs")
    } else {
        "–".into()
    }
}

pub fn ratio(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.2}×")
    } else {
        "–".into()
    }
}

fn mark(pass: Option<bool>) -> &'static str {
    match pass {
        Some(true) => "**pass**",
        Some(false) => "**miss**",
        None => "not measured",
    }
}

impl Report {
    pub fn proxy_row(&self, size: &str, key: &str) -> Option<&ProxyRow> {
        self.proxy.iter().find(|r| r.size == size && r.key == key)
    }

    fn proxy_ratio(&self, size: &str, a: &str, b: &str) -> f64 {
        match (self.proxy_row(size, a), self.proxy_row(size, b)) {
            (Some(x), Some(y)) if y.load.rps > 0.0 => x.load.rps / y.load.rps,
            _ => f64::NAN,
        }
    }

    /// `a`'s requests/s over `b`'s, round by round (the two runs of a round are back to back,
    /// so a slow spell of the machine weighs on both).
    fn round_ratios(&self, size: &str, a: &str, b: &str) -> Vec<f64> {
        match (self.proxy_row(size, a), self.proxy_row(size, b)) {
            (Some(x), Some(y)) => x
                .rounds
                .iter()
                .zip(&y.rounds)
                .filter(|(_, d)| **d > 0.0)
                .map(|(n, d)| n / d)
                .collect(),
            _ => vec![],
        }
    }

    /// The lowest and highest of [`Self::round_ratios`], as "0.93–1.08×" ("–" when none).
    fn round_range(&self, size: &str, a: &str, b: &str) -> String {
        let r = self.round_ratios(size, a, b);
        if r.is_empty() {
            return "–".into();
        }
        let lo = r.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = r.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{lo:.2}–{hi:.2}×")
    }

    /// The app's CPU (cores) in the load runs of `a` and `b` when both reached
    /// [`APP_BOUND_CORES`]: the app, not the proxies, set their requests/s.
    fn app_bound(&self, size: &str, a: &str, b: &str) -> Option<(f64, f64)> {
        let x = self.proxy_row(size, a)?.app_cores?;
        let y = self.proxy_row(size, b)?.app_cores?;
        (x >= APP_BOUND_CORES && y >= APP_BOUND_CORES).then_some((x, y))
    }

    fn added_p50(&self, size: &str, key: &str) -> f64 {
        match (self.proxy_row(size, key), self.proxy_row(size, "a")) {
            (Some(x), Some(d)) => x.single.p50_us - d.single.p50_us,
            _ => f64::NAN,
        }
    }

    fn wake_row(&self, prefix: &str) -> Option<&TimedRow> {
        self.wake.iter().find(|r| r.label.starts_with(prefix))
    }

    /// Every target (README, "Benchmarks") with its measured value.
    pub fn targets(&self) -> Vec<Target> {
        let mut t = vec![];
        let min_over = |f: &dyn Fn(&str) -> f64| {
            ["small", "1 MiB"]
                .iter()
                .map(|s| f(s))
                .fold(f64::NAN, f64::min)
        };
        let check = |v: f64, ok: &dyn Fn(f64) -> bool| v.is_finite().then(|| ok(v));
        for (what, a, b, goal) in [
            (
                "proxy throughput vs nginx, HTTP (b/c)",
                "b_http",
                "c_http",
                1.0,
            ),
            (
                "proxy throughput vs nginx, HTTPS (b/c)",
                "b_https",
                "c_https",
                1.0,
            ),
            (
                "proxy throughput vs configurable-http-proxy (b/d)",
                "b_http",
                "d",
                3.0,
            ),
        ] {
            let v = min_over(&|s| self.proxy_ratio(s, a, b));
            // Against nginx, each size says when both load runs were bound by the app, and how
            // far the rounds' own ratios spread: the verdict stays the medians' ratio.
            let size = |s: &str| {
                let r = ratio(self.proxy_ratio(s, a, b));
                if b == "d" {
                    return r;
                }
                match self.app_bound(s, a, b) {
                    Some((x, y)) => format!(
                        "{r} (app-bound: the app at {x:.2} / {y:.2} of a core; rounds {})",
                        self.round_range(s, a, b)
                    ),
                    None => format!("{r} (rounds {})", self.round_range(s, a, b)),
                }
            };
            t.push(Target {
                what: what.into(),
                target: format!("≥ {goal:.1}× (both sizes)"),
                measured: format!("small {} · 1 MiB {}", size("small"), size("1 MiB")),
                pass: check(v, &|v| v >= goal),
            });
        }
        let added = self.added_p50("small", "b_http");
        t.push(Target {
            what: "p50 latency added over direct, plain HTTP (small, 1 connection)".into(),
            target: "≤ 100 µs".into(),
            measured: us(added),
            pass: check(added, &|v| v <= 100.0),
        });
        // The proxy targets against nginx in the same run: the latency sandboxd adds over
        // the direct path is no more than nginx's, and so is its CPU time per small request.
        let nginx_added = self.added_p50("small", "c_http");
        // Compared as latencies, not through their ratio: a noisy run can give nginx a
        // negative figure (its p50 under the direct path's), and a negative ratio is no pass.
        let latency_ratio = if nginx_added > 0.0 {
            added / nginx_added
        } else {
            f64::NAN
        };
        t.push(Target {
            what: "p50 latency added over direct vs nginx's (small, 1 connection, HTTP)".into(),
            target: "≤ 1.0×".into(),
            measured: format!(
                "{} vs {} = {}",
                us(added),
                us(nginx_added),
                ratio(latency_ratio)
            ),
            pass: (added.is_finite() && nginx_added.is_finite()).then_some(added <= nginx_added),
        });
        let cpu = |key: &str| {
            self.proxy_row("small", key)
                .and_then(|r| r.cpu_us)
                .unwrap_or(f64::NAN)
        };
        let (http, https) = (
            cpu("b_http") / cpu("c_http"),
            cpu("b_https") / cpu("c_https"),
        );
        t.push(Target {
            what: "proxy CPU per small request vs nginx's (HTTP · HTTPS)".into(),
            target: "≤ 1.0× (both)".into(),
            measured: format!(
                "{} vs {} = {} · {} vs {} = {}",
                us1(cpu("b_http")),
                us1(cpu("c_http")),
                ratio(http),
                us1(cpu("b_https")),
                us1(cpu("c_https")),
                ratio(https)
            ),
            // NaN (a path not measured) stays NaN: `f64::max` would drop it.
            pass: check(
                if https.is_nan() {
                    f64::NAN
                } else {
                    http.max(https)
                },
                &|r| r <= 1.0,
            ),
        });
        for (prefix, what, goal) in [
            ("cold first hit", "cold first hit p50", 1000.0),
            ("wake from stopped", "wake from stopped p50", 600.0),
            ("wake from paused", "wake from paused p50", 30.0),
        ] {
            let v = self.wake_row(prefix).map_or(f64::NAN, |r| r.ms.p50);
            t.push(Target {
                what: what.into(),
                target: format!("≤ {}", ms(goal)),
                measured: ms(v),
                pass: check(v, &|v| v <= goal),
            });
        }
        // Each p50 against its floor without sandboxd, measured in the same run.
        for (prefix, floor, what) in [
            (
                "wake from stopped",
                FLOOR_WAKE,
                "wake from stopped p50 vs its floor",
            ),
            (
                "cold first hit (user",
                FLOOR_COLD,
                "cold first hit p50 vs its floor",
            ),
        ] {
            let v = self.wake_row(prefix).map_or(f64::NAN, |r| r.ms.p50);
            let f = self.wake_row(floor).map_or(f64::NAN, |r| r.ms.p50);
            t.push(Target {
                what: what.into(),
                target: "≤ 0.8×".into(),
                measured: format!("{} vs {} = {}", ms(v), ms(f), ratio(v / f)),
                pass: check(v / f, &|r| r <= 0.8),
            });
        }
        // The users at once against the same starts without sandboxd, in the same run.
        let crowd = self
            .wake
            .iter()
            .find(|r| r.label.contains(CROWD))
            .map_or(f64::NAN, |r| r.ms.p50);
        let floor = self.wake_row(FLOOR_CROWD).map_or(f64::NAN, |r| r.ms.p50);
        t.push(Target {
            what: "users' first hits at once, p50 per user, vs the same starts without sandboxd"
                .into(),
            target: "≤ 1.2×".into(),
            measured: format!("{} vs {} = {}", ms(crowd), ms(floor), ratio(crowd / floor)),
            pass: check(crowd / floor, &|r| r <= 1.2),
        });
        let exec = self.exec.first().map_or(f64::NAN, |r| r.ms.p50);
        let floor = self
            .exec
            .iter()
            .find(|r| r.label.contains("CLI"))
            .map_or(f64::NAN, |r| r.ms.p50);
        t.push(Target {
            what: "execute p50 vs `docker exec` CLI floor".into(),
            target: "≤ 1.5×".into(),
            measured: format!("{} vs {} = {}", ms(exec), ms(floor), ratio(exec / floor)),
            pass: check(exec / floor, &|v| v <= 1.5),
        });
        for (lang, limit) in [("javascript", 50.0), ("python", 60.0)] {
            let label = format!("execute` {lang}, spaced 0.5 s");
            if let Some(r) = self.exec.iter().find(|r| r.label.ends_with(&label)) {
                t.push(Target {
                    what: format!("execute {lang} p50, spaced 0.5 s"),
                    target: format!("≤ {limit} ms"),
                    measured: ms(r.ms.p50),
                    pass: check(r.ms.p50, &|v| v <= limit),
                });
            }
        }
        let echo = self.terminal.first().map_or(f64::NAN, |r| r.ms.p99);
        t.push(Target {
            what: "terminal echo p99".into(),
            target: "≤ 10 ms".into(),
            measured: ms(echo),
            pass: check(echo, &|v| v <= 10.0),
        });
        let ws = self
            .footprint
            .iter()
            .find(|f| f.label.contains("WebSocket"))
            .and_then(|f| f.value.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(f64::NAN);
        t.push(Target {
            what: "sandboxd RSS with 5,000 idle WebSockets".into(),
            target: "≤ 64 MiB".into(),
            measured: if ws.is_finite() {
                format!("{ws:.1} MiB")
            } else {
                "–".into()
            },
            pass: check(ws, &|v| v <= 64.0),
        });
        let closed = self
            .footprint
            .iter()
            .find(|f| f.label.contains("after those tunnels closed"));
        let closed_mib = closed
            .and_then(|f| f.value.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(f64::NAN);
        let bound = crate::scenarios::idle::CLOSED_BOUND_MIB;
        t.push(Target {
            what: "… back after they closed".into(),
            target: format!("< {bound:.0} MiB within 30 s"),
            measured: closed.map_or("–".into(), |f| {
                format!(
                    "{} ({})",
                    f.value,
                    f.note.split(" after").next().unwrap_or("")
                )
            }),
            pass: check(closed_mib, &|v| v < bound),
        });
        t
    }

    /// The report as markdown. `previous` is the report this one replaces (its targets are
    /// shown beside the new figures, so a change is visible).
    pub fn render(&self, previous: Option<&Previous>) -> String {
        let mut o = String::new();
        let w = &mut o;
        let _ = writeln!(w, "# Benchmarks\n");
        let _ = writeln!(
            w,
            "Produced by `{}` on {}: the benchmarks took {:.0} s{} (the numbers below are from \
             that run, nothing is edited by hand). Every figure is measured in the same run as \
             the peer or direct path it is compared with. What is measured and how: \
             [bench/README.md](../bench/README.md).\n",
            self.command,
            self.date,
            self.duration_s,
            self.setup_s
                .map(|s| format!(", after {s:.0} s of setup (tools, engine, image, release build)"))
                .unwrap_or_default()
        );
        if !self.errors.is_empty() {
            let _ = writeln!(w, "**Some benchmarks failed in this run:**\n");
            for e in &self.errors {
                let _ = writeln!(w, "- {}", e.replace('\n', " "));
            }
            let _ = writeln!(w);
        }

        let _ = writeln!(w, "## Targets\n");
        match previous {
            None => {
                let _ = writeln!(
                    w,
                    "| target | goal | measured | result |\n|---|---|---|---|"
                );
            }
            Some(p) => {
                let _ = writeln!(
                    w,
                    "| target | goal | measured | result | previous run ({}) |\n|---|---|---|---|---|",
                    p.label
                );
            }
        }
        for t in self.targets() {
            let _ = write!(
                w,
                "| {} | {} | {} | {} |",
                t.what,
                t.target,
                t.measured,
                mark(t.pass)
            );
            if let Some(p) = previous {
                let before = match p.rows.get(&t.what) {
                    Some((measured, result)) => format!(" {measured} ({result}) |"),
                    None => " – |".to_owned(),
                };
                w.push_str(&before);
            }
            w.push('\n');
        }
        let _ = writeln!(w);

        let _ = writeln!(w, "## Machine and versions\n");
        let _ = writeln!(w, "| | |\n|---|---|");
        for (k, v) in self.machine.iter().chain(&self.versions) {
            let _ = writeln!(w, "| {k} | {v} |");
        }
        let _ = writeln!(w);
        let _ = writeln!(w, "Settings of this run:\n");
        for (k, v) in &self.settings {
            let _ = writeln!(w, "- {k}: {v}");
        }
        let _ = writeln!(w);

        self.render_proxy(w);
        self.render_proxy_cost(w);
        self.render_wake(w);
        self.render_exec_terminal(w);
        self.render_files(w);
        self.render_footprint(w);
        self.render_swarm(w);
        if !self.notes.is_empty() {
            let _ = writeln!(w, "## Notes from this run\n");
            for n in &self.notes {
                let _ = writeln!(w, "- {n}");
            }
            let _ = writeln!(w);
        }
        o
    }

    fn render_proxy_cost(&self, w: &mut String) {
        if self.proxy_cost.is_empty() {
            return;
        }
        let _ = writeln!(w, "## Proxy cost per request (small response)\n");
        let _ = writeln!(w, "| path | per request | how |\n|---|---:|---|");
        for f in &self.proxy_cost {
            let _ = writeln!(w, "| {} | {} | {} |", f.label, f.value, f.note);
        }
        let _ = writeln!(w);
    }

    fn render_proxy(&self, w: &mut String) {
        if self.proxy.is_empty() {
            return;
        }
        let _ = writeln!(w, "## 1. Proxy throughput and latency\n");
        let _ = writeln!(
            w,
            "Keep-alive GETs through each path to the same Node server in a sandbox (port 5173). \
             *Load*: wrk, 1 thread, 32 connections; *1 conn*: wrk, 1 connection, one request at \
             a time (pure per-request latency). Medians of the rounds. *Proxy CPU per request*: \
             user + system CPU time of the proxy's processes (sandboxd; nginx's master and \
             workers; configurable-http-proxy's Node process) during the load run, divided by \
             the requests served: the cost that does not depend on what else runs on the \
             machine. *App CPU*: CPU time of the sandbox's cgroup (the Node server and the \
             image's init) during the load run over the run's length, in cores; the server is \
             single-threaded, so from {APP_BOUND_CORES} of a core up it is what limits the \
             requests/s.\n"
        );
        for size in ["small", "1 MiB"] {
            let rows: Vec<&ProxyRow> = self.proxy.iter().filter(|r| r.size == size).collect();
            if rows.is_empty() {
                continue;
            }
            let direct = self.proxy_row(size, "a");
            let _ = writeln!(w, "### {size} response\n");
            let _ = writeln!(
                w,
                "| path | req/s (load) | vs direct | p50 (load) | p99 (load) | proxy CPU per request | app CPU (load) | p50 (1 conn) | p99 (1 conn) | added p50 over direct (1 conn) | errors |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
            );
            for r in rows {
                let vs = direct.map_or(f64::NAN, |d| r.load.rps / d.load.rps);
                let added = direct.map_or(f64::NAN, |d| r.single.p50_us - d.single.p50_us);
                let _ = writeln!(
                    w,
                    "| {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    r.label,
                    r.load.rps,
                    ratio(vs),
                    us(r.load.p50_us),
                    us(r.load.p99_us),
                    r.cpu_us.map_or("–".into(), |c| format!("{c:.1} µs")),
                    r.app_cores.map_or("–".into(), |c| format!("{c:.2} core")),
                    us(r.single.p50_us),
                    us(r.single.p99_us),
                    if r.key == "a" {
                        "–".into()
                    } else {
                        us(added)
                    },
                    r.load.errors + r.single.errors
                );
            }
            let _ = writeln!(w);
        }
        let _ = writeln!(w, "Ratios of requests/s under load (b = sandboxd, a = direct, c = nginx, d = configurable-http-proxy):\n");
        let _ = writeln!(
            w,
            "| ratio | small | 1 MiB | small, lowest–highest round | 1 MiB, lowest–highest round |\n|---|---:|---:|---:|---:|"
        );
        for (label, a, b) in [
            ("b/a HTTP (sandboxd / direct)", "b_http", "a"),
            ("b/a HTTPS (sandboxd over TLS / direct)", "b_https", "a"),
            ("b/c HTTP (sandboxd / nginx)", "b_http", "c_http"),
            ("b/c HTTPS (sandboxd / nginx)", "b_https", "c_https"),
            (
                "b/d HTTP (sandboxd / configurable-http-proxy)",
                "b_http",
                "d",
            ),
        ] {
            let _ = writeln!(
                w,
                "| {label} | {} | {} | {} | {} |",
                ratio(self.proxy_ratio("small", a, b)),
                ratio(self.proxy_ratio("1 MiB", a, b)),
                self.round_range("small", a, b),
                self.round_range("1 MiB", a, b)
            );
        }
        let _ = writeln!(w);
        for (scheme, b, c) in [
            ("HTTP", "b_http", "c_http"),
            ("HTTPS", "b_https", "c_https"),
        ] {
            if let Some((x, y)) = self.app_bound("small", b, c) {
                let _ = writeln!(
                    w,
                    "Small responses over {scheme}: the app was the bottleneck of the load runs \
                     through both sandboxd and nginx (it used {x:.2} and {y:.2} of a core): each \
                     proxy delivered about what the app could serve, so their ratio tells more \
                     about how the machine shared its cores in that run than about the \
                     proxies, whose own cost is the CPU per request.\n"
                );
            }
        }
    }

    fn render_wake(&self, w: &mut String) {
        if self.wake.is_empty() {
            return;
        }
        let _ = writeln!(w, "## 2. Cold first hit and wake\n");
        let _ = writeln!(
            w,
            "Time from a new connection's request to the response head (first byte) of `GET /` on \
             the preview host, for a small Node app (`server.js`, started by the image's \
             `sandboxd-init`). Sandboxes have the default limits (0.5 CPU, 512 MiB).\n"
        );
        let _ = writeln!(
            w,
            "| scenario | runs | p50 | p95 | max | how |\n|---|---:|---:|---:|---:|---|"
        );
        for r in &self.wake {
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} | {} | {} |",
                r.label,
                r.ms.n,
                ms(r.ms.p50),
                ms(r.ms.p95),
                ms(r.ms.max),
                r.note
            );
        }
        let _ = writeln!(w);
        if !self.breakdown.is_empty() {
            let _ = writeln!(
                w,
                "Where the time goes (medians, ms since the request was sent; container times \
                 from the engine's `Created`/`State.StartedAt`, app times written by the app \
                 itself: Node's `performance.timeOrigin` and the `listen` callback):\n"
            );
            let _ = writeln!(
                w,
                "| scenario | container created | container running | app process started | app listening | first byte | sandbox CPU time until then | of it, throttled by the CPU quota |\n|---|---:|---:|---:|---:|---:|---:|---:|"
            );
            for b in &self.breakdown {
                let _ = writeln!(
                    w,
                    "| {} | {} | {} | {} | {} | {} | {} | {} |",
                    b.label,
                    b.created.map_or("–".into(), ms),
                    ms(b.running),
                    ms(b.app_process),
                    ms(b.listening),
                    ms(b.first_byte),
                    b.cpu.map_or("–".into(), |c| ms(c.0)),
                    b.cpu.map_or("–".into(), |c| ms(c.1)),
                );
            }
            let _ = writeln!(w);
        }
    }

    fn render_files(&self, w: &mut String) {
        if self.files.is_empty() {
            return;
        }
        let _ = writeln!(w, "## Files API throughput\n");
        let _ = writeln!(
            w,
            "| operation | rate (time per op) | baseline |\n|---|---:|---|"
        );
        for f in &self.files {
            let _ = writeln!(w, "| {} | {} | {} |", f.label, f.value, f.note);
        }
        let _ = writeln!(w);
    }

    fn render_exec_terminal(&self, w: &mut String) {
        if !self.exec.is_empty() {
            let _ = writeln!(w, "## 3. Execute round trip\n");
            let floor = self
                .exec
                .iter()
                .find(|r| r.label.contains("CLI"))
                .map_or(f64::NAN, |r| r.ms.p50);
            let _ = writeln!(
                w,
                "| path | runs | p50 | p95 | max | p50 vs CLI floor | what |\n|---|---:|---:|---:|---:|---:|---|"
            );
            for r in &self.exec {
                let _ = writeln!(
                    w,
                    "| {} | {} | {} | {} | {} | {} | {} |",
                    r.label,
                    r.ms.n,
                    ms(r.ms.p50),
                    ms(r.ms.p95),
                    ms(r.ms.max),
                    ratio(r.ms.p50 / floor),
                    r.note
                );
            }
            let _ = writeln!(w);
        }
        if !self.terminal.is_empty() {
            let _ = writeln!(w, "## 4. Terminal echo latency\n");
            let _ = writeln!(
                w,
                "| path | keystrokes | p50 | p99 | max | what |\n|---|---:|---:|---:|---:|---|"
            );
            for r in &self.terminal {
                let _ = writeln!(
                    w,
                    "| {} | {} | {} | {} | {} | {} |",
                    r.label,
                    r.ms.n,
                    ms(r.ms.p50),
                    ms(r.ms.p99),
                    ms(r.ms.max),
                    r.note
                );
            }
            let _ = writeln!(w);
        }
    }

    fn render_footprint(&self, w: &mut String) {
        if self.footprint.is_empty() {
            return;
        }
        let _ = writeln!(w, "## 5. Density and footprint\n");
        let _ = writeln!(w, "| what | value | how |\n|---|---:|---|");
        for f in &self.footprint {
            let _ = writeln!(w, "| {} | {} | {} |", f.label, f.value, f.note);
        }
        let _ = writeln!(w);
    }

    fn render_swarm(&self, w: &mut String) {
        if self.swarm_wake.is_empty() && self.swarm_load.is_empty() && self.swarm_facts.is_empty() {
            return;
        }
        let _ = writeln!(w, "## Swarm mode\n");
        let _ = writeln!(
            w,
            "`engine = \"swarm\"` on the project's lab (`scripts/swarm-lab.sh`: three Docker \
             engines in network namespaces of this machine, two sandboxd edges sharing \
             PostgreSQL), beside a single-host sandboxd on the host engine, same image, same \
             limits (0.5 CPU, 512 MiB), same app, same run. Swarm-mode requests go to the edge \
             on another node than the sandbox (edge 1 runs on n1, edge 2 on n2). Every engine \
             of the lab runs on the same two cores as the bench, so the lab's own cost is in \
             these figures.\n"
        );
        if !self.swarm_wake.is_empty() {
            let _ = writeln!(
                w,
                "| scenario | runs | single host p50 | p95 | swarm p50 | p95 | swarm − single (p50) | how |\n|---|---:|---:|---:|---:|---:|---:|---|"
            );
            for r in &self.swarm_wake {
                let _ = writeln!(
                    w,
                    "| {} | {} / {} | {} | {} | {} | {} | {} | {} |",
                    r.label,
                    r.single.n,
                    r.swarm.n,
                    ms(r.single.p50),
                    ms(r.single.p95),
                    ms(r.swarm.p50),
                    ms(r.swarm.p95),
                    ms(r.swarm.p50 - r.single.p50),
                    r.note
                );
            }
            let _ = writeln!(w);
        }
        if !self.swarm_load.is_empty() {
            let _ = writeln!(
                w,
                "Small preview responses (6 bytes) through the edges, wrk keep-alive GETs; \
                 medians of the rounds:\n"
            );
            let _ = writeln!(
                w,
                "| path | connections | req/s | p50 | p99 | errors | how |\n|---|---:|---:|---:|---:|---:|---|"
            );
            for r in &self.swarm_load {
                let _ = writeln!(
                    w,
                    "| {} | {} | {:.0} | {} | {} | {} | {} |",
                    r.label,
                    r.conns,
                    r.load.rps,
                    us(r.load.p50_us),
                    us(r.load.p99_us),
                    r.load.errors,
                    r.note
                );
            }
            let _ = writeln!(w);
        }
        if !self.swarm_facts.is_empty() {
            let _ = writeln!(w, "| what | value | how |\n|---|---:|---|");
            for f in &self.swarm_facts {
                let _ = writeln!(w, "| {} | {} | {} |", f.label, f.value, f.note);
            }
            let _ = writeln!(w);
        }
    }
}

/// The targets of the report a run replaces, parsed from its markdown.
#[derive(Debug, Default)]
pub struct Previous {
    /// "date, commit" of that run.
    pub label: String,
    /// target → (measured, result), as that report printed them.
    pub rows: std::collections::HashMap<String, (String, String)>,
}

impl Previous {
    /// `None` when `text` has no targets table (not a report of `bench/run`).
    pub fn parse(text: &str) -> Option<Previous> {
        let date = text
            .lines()
            .find(|l| l.starts_with("Produced by `"))
            .and_then(|l| l.split("` on ").nth(1))
            .and_then(|rest| rest.split(": ").next())
            .map(str::trim)
            .unwrap_or("date unknown");
        let commit = text
            .lines()
            .find_map(|l| l.strip_prefix("| sandboxd (git) | "))
            .map(|rest| rest.trim_end_matches('|').trim())
            .unwrap_or("commit unknown");
        let mut rows = std::collections::HashMap::new();
        let mut in_targets = false;
        for line in text.lines() {
            if line.starts_with("## ") {
                in_targets = line == "## Targets";
                continue;
            }
            let Some(inner) = line.strip_prefix("| ").and_then(|l| l.strip_suffix(" |")) else {
                continue;
            };
            if !in_targets || inner.starts_with("target |") {
                continue;
            }
            let cells: Vec<&str> = inner.split(" | ").collect();
            if cells.len() >= 4 {
                let result = cells[3].trim_matches('*').to_owned();
                rows.insert(cells[0].to_owned(), (cells[2].to_owned(), result));
            }
        }
        if rows.is_empty() {
            return None;
        }
        Some(Previous {
            label: format!("{date}, {commit}"),
            rows,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previous_targets_are_read_back_from_a_report() {
        let text = "# Benchmarks\n\nProduced by `bench/run` on 2026-12-01 12:27 UTC: the benchmarks took 743 s.\n\n\
            ## Targets\n\n| target | goal | measured | result | previous run (x, y) |\n|---|---|---|---|---|\n\
            | cold first hit p50 | ≤ 1000 ms | 702 ms | **pass** | 900 ms (pass) |\n\
            | wake from stopped p50 | ≤ 600 ms | 648 ms | **miss** | – |\n\n\
            ## Machine and versions\n\n| | |\n|---|---|\n| sandboxd (git) | 1b95346 |\n";
        let p = Previous::parse(text).expect("a report");
        assert_eq!(p.label, "2026-12-01 12:27 UTC, 1b95346");
        assert_eq!(p.rows.len(), 2);
        assert_eq!(
            p.rows["wake from stopped p50"],
            ("648 ms".to_owned(), "miss".to_owned())
        );
        assert!(Previous::parse("no report here").is_none());
    }

    fn row(key: &'static str, single_p50: f64, cpu: Option<f64>) -> ProxyRow {
        ProxyRow {
            size: "small".into(),
            key,
            label: key.into(),
            load: WrkResult {
                rps: 1000.0,
                ..Default::default()
            },
            single: WrkResult {
                p50_us: single_p50,
                ..Default::default()
            },
            cpu_us: cpu,
            app_cores: None,
            rounds: vec![],
        }
    }

    fn target<'a>(t: &'a [Target], what: &str) -> &'a Target {
        t.iter().find(|t| t.what.starts_with(what)).expect(what)
    }

    #[test]
    fn latency_and_cpu_targets_compare_with_nginx_in_the_same_run() {
        let mut r = Report {
            proxy: vec![
                row("a", 200.0, None),
                row("b_http", 300.0, Some(50.0)),
                row("b_https", 350.0, Some(70.0)),
                row("c_http", 320.0, Some(52.0)),
                row("c_https", 500.0, Some(72.0)),
            ],
            ..Default::default()
        };
        let t = r.targets();
        let latency = target(&t, "p50 latency added over direct vs nginx");
        assert_eq!(latency.pass, Some(true), "{latency:?}");
        assert!(latency.measured.ends_with("= 0.83×"), "{latency:?}");
        let cpu = target(&t, "proxy CPU per small request");
        assert_eq!(cpu.pass, Some(true), "{cpu:?}");
        // nginx under the direct path (noise): its added latency is negative; sandboxd's,
        // positive, is no pass.
        let mut noisy = Report {
            proxy: r.proxy.clone(),
            ..Default::default()
        };
        noisy.proxy[3] = row("c_http", 180.0, Some(52.0));
        let noisy = noisy.targets();
        let latency = target(&noisy, "p50 latency added over direct vs nginx");
        assert_eq!(latency.pass, Some(false), "{latency:?}");
        assert!(latency.measured.ends_with("= –"), "{latency:?}");
        // HTTPS over nginx's: the target misses even though HTTP passes.
        r.proxy[2].cpu_us = Some(80.0);
        assert_eq!(
            target(&r.targets(), "proxy CPU per small request").pass,
            Some(false)
        );
        // A path not measured leaves the target unmeasured, not passed.
        r.proxy[2].cpu_us = None;
        let cpu = &r.targets();
        let cpu = target(cpu, "proxy CPU per small request");
        assert_eq!(cpu.pass, None, "{cpu:?}");
        assert!(cpu.measured.contains("– vs 72.0 µs"), "{cpu:?}");
    }

    #[test]
    fn a_throughput_target_says_when_the_app_was_the_bottleneck_and_how_rounds_spread() {
        let with = |key: &'static str, rps: f64, app: f64, rounds: Vec<f64>| ProxyRow {
            load: WrkResult {
                rps,
                ..Default::default()
            },
            app_cores: Some(app),
            rounds,
            ..row(key, 100.0, Some(20.0))
        };
        let r = Report {
            proxy: vec![
                with("b_http", 990.0, 0.97, vec![900.0, 1100.0, 990.0]),
                with("c_http", 1000.0, 0.99, vec![1000.0, 1000.0, 1000.0]),
                with("b_https", 1100.0, 0.6, vec![1100.0]),
                with("c_https", 1000.0, 0.95, vec![1000.0]),
            ],
            ..Default::default()
        };
        let t = r.targets();
        let http = target(&t, "proxy throughput vs nginx, HTTP");
        assert_eq!(
            http.measured,
            "small 0.99× (app-bound: the app at 0.97 / 0.99 of a core; rounds 0.90–1.10×) \
             · 1 MiB – (rounds –)"
        );
        // The verdict is still the medians' ratio: 0.99× misses, app-bound or not.
        assert_eq!(http.pass, Some(false));
        // One side under the threshold: not called app-bound.
        let https = target(&t, "proxy throughput vs nginx, HTTPS");
        assert!(
            https
                .measured
                .starts_with("small 1.10× (rounds 1.10–1.10×)"),
            "{https:?}"
        );
        let page = r.render(None);
        assert!(page.contains("| 0.97 core |"), "{page}");
        assert!(page.contains("Small responses over HTTP: the app was the bottleneck"));
        assert!(!page.contains("Small responses over HTTPS: the app"));
    }
}
