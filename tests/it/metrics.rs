//! Metrics end to end: a real Prometheus server (Debian's `prometheus`, started here with a
//! generated configuration and its own storage, stopped when the test ends) scrapes sandboxd's
//! metrics listener every second; the test pauses a sandbox through the manager (the idle
//! policy's path), wakes it with a preview request, stops it and wakes it with an execution,
//! then reads both wakes back through Prometheus's query API.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use sandboxd::user::UserId;
use serde_json::json;

/// The Prometheus server of one test; killed (and its storage removed) on drop.
struct Prometheus {
    child: Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn prometheus_binary() -> String {
    let out = Command::new("sh")
        .args(["-c", "command -v prometheus"])
        .output()
        .unwrap();
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        out.status.success() && !path.is_empty(),
        "the prometheus binary is required for this test: run scripts/ensure-prometheus.sh \
         (Debian package `prometheus`)"
    );
    path
}

async fn start_prometheus(target: SocketAddr) -> Prometheus {
    let bin = prometheus_binary();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: sandboxd\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let port = free_port();
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let child = Command::new(bin)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("starting prometheus");
    let p = Prometheus {
        child,
        base: format!("http://127.0.0.1:{port}"),
        _dir: dir,
    };
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = client
            .get(format!("{}/-/ready", p.base))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        if ready {
            break;
        }
        let log = std::fs::read_to_string(p._dir.path().join("prometheus.log")).unwrap_or_default();
        assert!(
            Instant::now() < deadline,
            "prometheus did not become ready within 60 s:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    p
}

impl Prometheus {
    /// The value of an instant query's first sample, if any.
    async fn query(&self, q: &str) -> Option<f64> {
        let r = reqwest::Client::new()
            .get(format!("{}/api/v1/query", self.base))
            .query(&[("query", q)])
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
        let v: serde_json::Value = r.json().await.ok()?;
        assert_eq!(v["status"], "success", "query {q}: {v}");
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }

    /// Polls `q` until `ok(value)` holds, within `limit`.
    async fn wait_for(&self, q: &str, limit: Duration, ok: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + limit;
        loop {
            let v = self.query(q).await;
            if let Some(v) = v.filter(|v| ok(*v)) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus query {q} gave {v:?} after {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// The scrape as sandboxd serves it (no Prometheus involved).
async fn scrape(addr: SocketAddr) -> String {
    let r = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    r.text().await.unwrap()
}

#[tokio::test]
async fn prometheus_scrapes_sandboxd_and_sees_wakes() {
    let app = spawn_app().await;
    let metrics = app
        .running
        .as_ref()
        .unwrap()
        .metrics_addr
        .expect("metrics listener");
    assert!(metrics.ip().is_loopback());
    assert_ne!(metrics.port(), app.addr.port());

    // Never on the edge: the public listener answers 404 for /metrics.
    let r = app
        .client
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let text = r.text().await.unwrap();
    assert!(!text.contains("sandboxd_"), "{text}");

    let prom = start_prometheus(metrics).await;
    prom.wait_for("up{job=\"sandboxd\"}", Duration::from_secs(30), |v| {
        v == 1.0
    })
    .await;

    let user = "metrics1";
    app.init(user).await;
    let mgr = app.mgr().clone();
    let uid = UserId::parse(user).unwrap();

    // Pause through the manager (the idle policy's path), then a preview request wakes it.
    mgr.pause(&uid, "test").await.unwrap();
    assert!(scrape(metrics)
        .await
        .contains("sandboxd_sandboxes{state=\"paused\"} 1"));
    let host = format!("user-{user}.preview.localhost");
    let client = reqwest::Client::builder()
        .resolve(&host, app.addr)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let r = client
        .get(format!("http://{host}:{}/", app.addr.port()))
        .send()
        .await
        .unwrap();
    // No app listens in a fresh sandbox: the wake happened, the answer says so.
    assert!(
        r.status().is_success() || r.status() == 503,
        "{}",
        r.status()
    );

    // Stop it, then an execution wakes it from stopped.
    mgr.stop(&uid, "test").await.unwrap();
    let out = app
        .execute(user, json!({"code": "console.log(6 * 7)"}))
        .await;
    assert_eq!(out["output"], "42\n", "{out}");

    // sandboxd's own exposition has every family.
    let text = scrape(metrics).await;
    for needle in [
        "sandboxd_sandboxes{state=\"running\"} 1",
        "sandboxd_capacity_in_use 1",
        "sandboxd_capacity 20",
        "sandboxd_transitions_total{op=\"create\"} 1",
        "sandboxd_transitions_total{op=\"pause\"} 1",
        "sandboxd_transitions_total{op=\"unpause\"} 1",
        "sandboxd_transitions_total{op=\"stop\"} 1",
        "sandboxd_wake_duration_seconds_count{from=\"paused\"} 1",
        "sandboxd_wake_duration_seconds_count{from=\"stopped\"} 1",
        "sandboxd_executions_total{outcome=\"ok\"} 1",
        "sandboxd_terminals_open 0",
        "sandboxd_preview_tunnels_open 0",
        "sandboxd_engine_errors_total 0",
        "sandboxd_store_errors_total 0",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    // 2 (create + wake from stopped) starts.
    assert!(
        text.contains("sandboxd_transitions_total{op=\"start\"} 2"),
        "{text}"
    );

    // And Prometheus has read the wakes.
    let limit = Duration::from_secs(30);
    let paused = prom
        .wait_for(
            "sandboxd_wake_duration_seconds_count{job=\"sandboxd\",from=\"paused\"}",
            limit,
            |v| v >= 1.0,
        )
        .await;
    assert_eq!(paused, 1.0);
    let stopped = prom
        .wait_for(
            "sandboxd_wake_duration_seconds_count{job=\"sandboxd\",from=\"stopped\"}",
            limit,
            |v| v >= 1.0,
        )
        .await;
    assert_eq!(stopped, 1.0);
    // The wake from paused took a real, bounded time (a functional bound, not a benchmark).
    let took = prom
        .wait_for(
            "sandboxd_wake_duration_seconds_sum{job=\"sandboxd\",from=\"paused\"}",
            limit,
            |v| v > 0.0,
        )
        .await;
    assert!(took < 30.0, "wake from paused took {took} s");
    let took_stopped = prom
        .query("sandboxd_wake_duration_seconds_sum{job=\"sandboxd\",from=\"stopped\"}")
        .await
        .unwrap_or_default();
    eprintln!("wake from paused: {took:.3} s, from stopped: {took_stopped:.3} s (as Prometheus read them)");
    let previews = prom
        .wait_for(
            "sum(sandboxd_preview_requests_total{job=\"sandboxd\"})",
            limit,
            |v| v >= 1.0,
        )
        .await;
    assert_eq!(previews, 1.0);
}
