//! Swarm mode (`--only swarm`; in a full run only with `BENCH_SWARM=1`, since it needs the
//! lab): cold first hit, wake from paused and from stopped, single-host beside swarm mode through
//! an edge, and small preview requests through one edge vs both.
//!
//! The group brings the project's lab up itself (`scripts/swarm-lab.sh up`, the bench's sandboxd
//! binary as the edges' `SANDBOXD_BIN`) and down again at the end, also when a step failed
//! (`bench/run`'s trap downs it too when the bench was interrupted: the file
//! `<work>/swarm-lab.ours` says the lab is this run's). It refuses to touch a lab that was
//! already up. Every user it made is removed from the lab's nodes (containers and workspace
//! volumes) before `down`.
//!
//! Both sides are driven the same way: the app is written through `POST /sandbox/execute`
//! (swarm-mode workspaces are volumes on a node, out of the host's reach); *cold* =
//! `POST /sandbox/exit` (container removed, user and workspace kept) then the timed GET;
//! *paused* / *stopped* = `docker pause` / `docker stop -t 1` through the engine that holds the
//! container (the host's, or the node's), then the timed GET, which wakes it. The swarm-mode
//! edges log how long each network guard took (`network guard installed … ms=`, debug level of
//! `sandboxd::sandbox::swarm`): that is the guard's share of a start.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use hyper::Method;
use serde_json::json;

use crate::http::{self, Api};
use crate::report::{ms, Fact, SwarmLoad, SwarmWake};
use crate::stats::{median, summarize};
use crate::wrk::{self, WrkResult};

use super::*;

const LAB_SCRIPT: &str = "scripts/swarm-lab.sh";
const LAB_ENV: &str = "/run/sbxlab/env";
const LAB_RUN: &str = "/run/sbxlab";
/// The edges' logs, as the lab writes them (`$LIB/edgeN/sandboxd.log`).
const LAB_EDGE_LOG: &str = "/var/lib/sbxlab/edge{}/sandboxd.log";
/// The edges' log filter: info, plus the network guard's timing (debug).
const EDGE_LOG_FILTER: &str = "info,sandboxd::sandbox::swarm=debug";
const GUARD_LINE: &str = "network guard installed";

/// The app of the timed users: `SERVER_JS` (6-byte `GET /`) started by the image's init from
/// `.sandboxd/preview.json`, written through execute.
fn app_code() -> String {
    format!(
        r#"const fs = require('fs');
fs.mkdirSync('/workspace/.sandboxd', {{recursive: true}});
fs.writeFileSync('/workspace/package.json', JSON.stringify({{name: 'bench-app', private: true, scripts: {{dev: 'node server.js'}}}}));
fs.writeFileSync('/workspace/server.js', {server});
fs.writeFileSync('/workspace/.sandboxd/preview.json', JSON.stringify({{command: 'node server.js'}}));
console.log('ok');"#,
        server = serde_json::to_string(SERVER_JS).unwrap_or_default()
    )
}

/// One side of the comparison: a sandboxd (single host, or one edge of the lab) and the engines
/// that may hold its containers.
struct Side {
    name: String,
    api: Api,
    /// Where previews are requested (sandboxd's HTTP address, or the edge's).
    addr: SocketAddr,
    preview_domain: String,
    instance: String,
    /// `None`: the host's engine; else a node's engine URL (`docker -H`).
    engines: Vec<Option<String>>,
}

impl Side {
    fn host(&self, user: &str) -> String {
        format!("user-{user}.{}:{}", self.preview_domain, self.addr.port())
    }

    /// The docker CLI against engine `e`; its stdout (bounded: 60 s).
    async fn docker(&self, e: usize, args: &[&str]) -> Result<String> {
        docker_cli(self.engines[e].as_deref(), args).await
    }

    /// The container of `user` (any state) and the engine that holds it.
    async fn container(&self, user: &str) -> Result<(usize, String)> {
        for e in 0..self.engines.len() {
            let out = self
                .docker(
                    e,
                    &[
                        "ps",
                        "-aq",
                        "--no-trunc",
                        "--filter",
                        &format!("label=sandboxd.instance={}", self.instance),
                        "--filter",
                        &format!("label=sandboxd.user={user}"),
                    ],
                )
                .await?;
            if let Some(id) = out.lines().map(str::trim).find(|l| !l.is_empty()) {
                return Ok((e, id.to_owned()));
            }
        }
        bail!("{}: {user} has no container", self.name)
    }

    async fn wait_docker_state(&self, e: usize, id: &str, want: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self
                .docker(e, &["inspect", "-f", "{{.State.Status}}", id])
                .await?;
            if s.trim() == want {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{}: container stayed {}, not {want}", self.name, s.trim());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// One timed first hit on a fresh connection; must be the app's 200.
    async fn first_hit(&self, user: &str) -> Result<f64> {
        let t = http::timed_get(self.addr, &self.host(user), "/", Duration::from_secs(90)).await?;
        if t.status != 200 || t.body_len != SMALL_BODY {
            bail!(
                "{}: first hit for {user}: status {} after {:.0} ms: {}",
                self.name,
                t.status,
                t.head.as_secs_f64() * 1e3,
                t.body
            );
        }
        Ok(t.head.as_secs_f64() * 1e3)
    }

    /// A sandbox for `user` with the bench's app in its workspace; the container is removed
    /// again (`exit`), so the next GET is a cold first hit.
    async fn prepare(&self, user: &str) -> Result<()> {
        self.api.post(user, "/sandbox/init", &json!({})).await?;
        let out = self
            .api
            .post(user, "/sandbox/execute", &json!({"code": app_code()}))
            .await?;
        if out["exitCode"] != 0 {
            bail!("{}: writing the app for {user}: {out}", self.name);
        }
        self.api.post(user, "/sandbox/exit", &json!({})).await?;
        Ok(())
    }

    /// Cold, paused, stopped: `runs` timed samples each, after one untimed run.
    async fn wakes(&self, user: &str, runs: usize) -> Result<[Vec<f64>; 3]> {
        let mut cold = vec![];
        for i in 0..=runs {
            self.api.post(user, "/sandbox/exit", &json!({})).await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let t = self.first_hit(user).await?;
            if i > 0 {
                cold.push(t);
            }
        }
        let mut out = [cold, vec![], vec![]];
        for (k, (args, want)) in [
            (&["pause"][..], "paused"),
            (&["stop", "-t", "1"][..], "exited"),
        ]
        .into_iter()
        .enumerate()
        {
            for i in 0..=runs {
                // The app is up, so the sample is the wake (and, after a stop, the app's start).
                http::wait_200(self.addr, &self.host(user), "/", Duration::from_secs(60)).await?;
                let (e, id) = self.container(user).await?;
                let mut a = args.to_vec();
                a.push(&id);
                self.docker(e, &a).await?;
                self.wait_docker_state(e, &id, want).await?;
                // No API call in between: the engine's events tell sandboxd.
                tokio::time::sleep(Duration::from_millis(300)).await;
                let t = self.first_hit(user).await?;
                if i > 0 {
                    out[k + 1].push(t);
                }
            }
        }
        Ok(out)
    }
}

async fn docker_cli(engine: Option<&str>, args: &[&str]) -> Result<String> {
    let mut cmd = tokio::process::Command::new("docker");
    if let Some(h) = engine {
        cmd.arg("-H").arg(h);
    }
    cmd.args(args).kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .map_err(|_| anyhow!("docker {args:?} did not finish within 60 s"))??;
    if !out.status.success() {
        bail!(
            "docker {}{args:?}: {}",
            engine.map(|h| format!("-H {h} ")).unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// wrk against `addr` with the preview host in the Host header (the edges' addresses differ, the
/// preview name is the same: no hosts file can map it to both).
async fn wrk_host(addr: SocketAddr, host: &str, conns: u32, secs: f64) -> Result<WrkResult> {
    let mut cmd = tokio::process::Command::new("wrk");
    cmd.arg("-t1")
        .arg(format!("-c{conns}"))
        .arg(format!("-d{}s", secs.round().max(1.0) as u64))
        .args(["--latency", "--timeout", "5s", "-H"])
        .arg(format!("Host: {host}"))
        .arg(format!("http://{addr}/"))
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs_f64(secs + 30.0), cmd.output())
        .await
        .context("wrk did not finish")?
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "wrk {addr} failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    wrk::parse(&text).with_context(|| format!("parsing wrk output for {addr}:\n{text}"))
}

/// The lab as /run/sbxlab/env describes it.
struct Lab {
    edges: Vec<SocketAddr>,
    nodes: Vec<String>,
    secret: String,
    domain: String,
    preview_domain: String,
    instance: String,
}

impl Lab {
    fn load() -> Result<Lab> {
        let text =
            std::fs::read_to_string(LAB_ENV).with_context(|| format!("reading {LAB_ENV}"))?;
        let vars: HashMap<&str, &str> = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim()))
            .collect();
        let var = |k: &str| -> Result<String> {
            vars.get(k)
                .map(|v| v.to_string())
                .ok_or_else(|| anyhow!("{LAB_ENV} has no {k}"))
        };
        if var("EDGES_RUNNING")? != "1" {
            bail!("the lab's edges are not running (EDGES_RUNNING in {LAB_ENV})");
        }
        let mut edges = vec![];
        for i in 1..=2 {
            let url = var(&format!("EDGE_{i}"))?;
            edges.push(
                url.strip_prefix("http://")
                    .and_then(|a| a.parse().ok())
                    .ok_or_else(|| anyhow!("EDGE_{i}={url} is not http://ADDR:PORT"))?,
            );
        }
        let mut nodes = vec![];
        for i in 1.. {
            match vars.get(format!("NODE_{i}").as_str()) {
                Some(v) => nodes.push(v.to_string()),
                None => break,
            }
        }
        Ok(Lab {
            edges,
            nodes,
            secret: var("AUTH_SECRET")?,
            domain: var("DOMAIN")?,
            preview_domain: var("PREVIEW_DOMAIN")?,
            instance: var("INSTANCE")?,
        })
    }

    /// Edge `e` (0-based) as a side of the comparison.
    fn side(&self, e: usize) -> Side {
        let addr = self.edges[e];
        Side {
            name: format!("edge {}", e + 1),
            api: Api::new(addr, &self.secret).with_host(&format!(
                "{}:{}",
                self.domain,
                addr.port()
            )),
            addr,
            preview_domain: self.preview_domain.clone(),
            instance: self.instance.clone(),
            engines: self.nodes.iter().cloned().map(Some).collect(),
        }
    }
}

/// The guard times (ms) logged by the edges, per edge log, from line `from[i]` on.
fn guard_times(from: &[usize]) -> (Vec<usize>, Vec<f64>) {
    let mut counts = vec![];
    let mut times = vec![];
    for (i, skip) in from.iter().enumerate() {
        let text = std::fs::read_to_string(LAB_EDGE_LOG.replace("{}", &(i + 1).to_string()))
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        counts.push(lines.len());
        times.extend(lines.iter().skip(*skip).filter_map(|l| guard_ms(l)));
    }
    (counts, times)
}

/// The `ms=` of an edge's `network guard installed` log line (text format).
fn guard_ms(line: &str) -> Option<f64> {
    if !line.contains(GUARD_LINE) {
        return None;
    }
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("ms="))
        .and_then(|v| v.trim_matches(|c: char| !c.is_ascii_digit()).parse().ok())
}

fn fresh_user(tag: &str) -> String {
    format!("bsw{tag}{:08x}", rand::random::<u32>())
}

impl Ctx {
    fn swarm_marker(&self) -> PathBuf {
        self.opts.work.join("swarm-lab.ours")
    }

    /// Runs `scripts/swarm-lab.sh ARG` (bounded), its log (stderr) into
    /// `logs/swarm-lab-ARG.log`; stdout (`up` prints the token secret) is dropped, the lab's
    /// addresses are read from /run/sbxlab/env.
    async fn lab_script(&self, arg: &str, limit: Duration) -> Result<()> {
        let log = std::fs::File::create(self.opts.work.join(format!("logs/swarm-lab-{arg}.log")))?;
        let mut cmd = tokio::process::Command::new("bash");
        cmd.arg(self.opts.repo.join(LAB_SCRIPT))
            .arg(arg)
            .current_dir(&self.opts.repo)
            .env("SANDBOXD_BIN", &self.opts.sandboxd)
            .env("SBXLAB_EDGES", "1")
            .env("SBXLAB_LOG", EDGE_LOG_FILTER)
            .env_remove("SBXLAB_EDGE_ENV")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        if let Ok(img) = std::env::var("SANDBOXD_IMAGE") {
            if !img.is_empty() {
                cmd.env("SBXLAB_IMAGE", img);
            }
        }
        let st = tokio::time::timeout(limit, cmd.status())
            .await
            .map_err(|_| anyhow!("swarm-lab.sh {arg} took longer than {limit:?}"))??;
        if !st.success() {
            bail!(
                "swarm-lab.sh {arg} failed ({st}); see {}/logs/swarm-lab-{arg}.log",
                self.opts.work.display()
            );
        }
        Ok(())
    }

    /// The group: single host first (its own sandboxd on the host engine), then the lab.
    pub(super) async fn phase_swarm(&mut self) -> Result<()> {
        let runs = if self.opts.quick { 5 } else { 10 };
        self.step(&format!(
            "swarm: single-host side ({runs} runs each: cold, paused, stopped)"
        ));
        self.start_server("swarm-single", &[]).await?;
        let single = Side {
            name: "single host".into(),
            api: Api::new(self.http, &self.secret),
            addr: self.http,
            preview_domain: PREVIEW_DOMAIN.into(),
            instance: self.opts.instance.clone(),
            engines: vec![None],
        };
        let user = fresh_user("s");
        let single_r = async {
            single.prepare(&user).await?;
            single.wakes(&user, runs).await
        }
        .await;
        self.stop_server().await;
        let ids = self.containers(None).await.unwrap_or_default();
        self.remove_containers(ids).await;
        let single_r = single_r.context("single-host side")?;

        if Path::new(LAB_RUN).exists() {
            bail!(
                "a swarm lab is already up ({LAB_RUN} exists) and is not this run's: \
                 scripts/swarm-lab.sh down first"
            );
        }
        self.step("swarm: scripts/swarm-lab.sh up (3 nodes, 2 edges)");
        std::fs::write(self.swarm_marker(), b"")?;
        let t = Instant::now();
        let mut users = vec![];
        let r = async {
            self.lab_script("up", Duration::from_secs(600)).await?;
            let up_s = t.elapsed().as_secs_f64();
            let lab = Lab::load()?;
            self.report.swarm_facts.push(Fact {
                label: "lab up".into(),
                value: format!("{up_s:.0} s"),
                note: "`scripts/swarm-lab.sh up`: 3 engines, swarm, overlay, image into every node, PostgreSQL, 2 edges (not part of any figure)".into(),
            });
            self.swarm_measure(&lab, &single_r, runs, &mut users).await
        }
        .await;
        // Every user's containers and workspace volume off the nodes, then the lab down.
        if let Ok(lab) = Lab::load() {
            let side = lab.side(0);
            for u in &users {
                let _ = side.api.post(u, "/sandbox/exit", &json!({})).await;
                for _ in 0..5 {
                    let Ok((e, id)) = side.container(u).await else {
                        break;
                    };
                    let _ = side.docker(e, &["rm", "-f", "-v", &id]).await;
                }
                for n in &lab.nodes {
                    let _ = docker_cli(
                        Some(n),
                        &["volume", "rm", "-f", &format!("{}-ws-{u}", lab.instance)],
                    )
                    .await;
                }
            }
        }
        for i in 1..=2 {
            let _ = std::fs::copy(
                LAB_EDGE_LOG.replace("{}", &i.to_string()),
                self.opts.work.join(format!("logs/swarm-edge{i}.log")),
            );
        }
        self.step("swarm: scripts/swarm-lab.sh down");
        let down = self.lab_script("down", Duration::from_secs(300)).await;
        if down.is_ok() {
            let _ = std::fs::remove_file(self.swarm_marker());
        }
        r?;
        down
    }

    async fn swarm_measure(
        &mut self,
        lab: &Lab,
        single: &[Vec<f64>; 3],
        runs: usize,
        users: &mut Vec<String>,
    ) -> Result<()> {
        // Where the user lands decides the edge: the one on another node (edge N runs on nN).
        let user = fresh_user("w");
        users.push(user.clone());
        let probe = lab.side(0);
        probe.api.post(&user, "/sandbox/init", &json!({})).await?;
        let (s, st) = probe
            .api
            .call(&user, Method::GET, "/sandbox/status", None)
            .await?;
        let node = st["node"]
            .as_str()
            .filter(|_| s.is_success())
            .ok_or_else(|| anyhow!("status has no \"node\" in swarm mode: {s} {st}"))?
            .to_owned();
        let e = if node == "n1" { 1 } else { 0 };
        let side = lab.side(e);
        self.step(&format!(
            "swarm: {user} on {node}, through {} ({runs} runs each: cold, paused, stopped)",
            side.name
        ));
        side.prepare(&user).await?;
        let (from, _) = guard_times(&[0, 0]);
        let swarm = side.wakes(&user, runs).await?;
        let (_, guards) = guard_times(&from);

        let rows = [
            (
                "cold first hit (user known, no container)",
                "`POST /sandbox/exit` removed the container (user and workspace kept); the GET creates and starts one (swarm: on the node that holds the workspace volume, network guard included)",
            ),
            (
                "wake from paused",
                "`docker pause` through the engine that holds it (the host's or the node's), outside sandboxd; the GET unpauses it",
            ),
            (
                "wake from stopped",
                "`docker stop -t 1` likewise; the GET starts the same container again (swarm: network guard included)",
            ),
        ];
        for (k, (label, note)) in rows.iter().enumerate() {
            self.report.swarm_wake.push(SwarmWake {
                label: (*label).into(),
                single: summarize(&single[k]),
                swarm: summarize(&swarm[k]),
                note: (*note).into(),
            });
        }
        let g = summarize(&guards);
        self.report.swarm_facts.push(Fact {
            label: "network guard per start (swarm)".into(),
            value: format!("p50 {} (p95 {}, {} starts)", ms(g.p50), ms(g.p95), g.n),
            note: format!(
                "the edge's own timing (`network guard installed`, debug log) from after the engine's start to the root-owned marker: a helper container in the sandbox's network namespace runs `iptables-restore`, then `touch` as root; part of every swarm-mode cold hit and wake from stopped (p50 share of the cold hit: {}, of the wake from stopped: {})",
                pct(g.p50, median(&swarm[0])),
                pct(g.p50, median(&swarm[2]))
            ),
        });
        self.report.swarm_facts.push(Fact {
            label: "placement of the timed sandbox".into(),
            value: format!("{node}, requests through {}", side.name),
            note: "the edge on another node than the sandbox: previews cross the overlay".into(),
        });

        self.swarm_load(lab, &user, &node, e).await
    }

    /// Small preview GETs for `user` (app up), through edge `e` alone, then through both edges at
    /// once (half the connections each: the client spreads them like a round-robin balancer),
    /// interleaved rounds; plus one connection through each edge (same node vs across nodes).
    async fn swarm_load(&mut self, lab: &Lab, user: &str, node: &str, e: usize) -> Result<()> {
        let (rounds, secs) = if self.opts.quick { (1, 2.0) } else { (3, 4.0) };
        let conns = 32u32;
        self.step(&format!(
            "swarm: preview requests, one edge vs two ({rounds} round(s) of {secs} s)"
        ));
        let one = lab.side(e);
        let host = one.host(user);
        http::wait_200(one.addr, &host, "/", Duration::from_secs(60)).await?;
        for s in [lab.side(0), lab.side(1)] {
            http::wait_200(s.addr, &host, "/", Duration::from_secs(60)).await?;
        }
        wrk_host(one.addr, &host, conns, 1.0).await?;
        let (mut single_edge, mut both, mut each) = (vec![], vec![], vec![vec![], vec![]]);
        for _ in 0..rounds {
            single_edge.push(wrk_host(one.addr, &host, conns, secs).await?);
            let (a, b) = tokio::join!(
                wrk_host(lab.edges[0], &host, conns / 2, secs),
                wrk_host(lab.edges[1], &host, conns / 2, secs)
            );
            let (a, b) = (a?, b?);
            both.push(WrkResult {
                rps: a.rps + b.rps,
                // The two halves carry about the same requests: their mean.
                p50_us: (a.p50_us + b.p50_us) / 2.0,
                p99_us: a.p99_us.max(b.p99_us),
                requests: a.requests + b.requests,
                errors: a.errors + b.errors,
            });
            for (k, list) in each.iter_mut().enumerate() {
                list.push(wrk_host(lab.edges[k], &host, 1, secs / 2.0).await?);
            }
        }
        let med = |v: &[WrkResult]| WrkResult {
            rps: median(&v.iter().map(|r| r.rps).collect::<Vec<_>>()),
            p50_us: median(&v.iter().map(|r| r.p50_us).collect::<Vec<_>>()),
            p99_us: median(&v.iter().map(|r| r.p99_us).collect::<Vec<_>>()),
            requests: v.iter().map(|r| r.requests).sum(),
            errors: v.iter().map(|r| r.errors).sum(),
        };
        self.report.swarm_load.push(SwarmLoad {
            label: format!("one edge (edge {})", e + 1),
            conns,
            load: med(&single_edge),
            note: "one wrk (1 thread) against the edge on another node than the sandbox".into(),
        });
        self.report.swarm_load.push(SwarmLoad {
            label: "two edges, round-robin".into(),
            conns,
            load: med(&both),
            note: format!(
                "two wrk at once, {} connections to each edge's address: req/s summed, p50 the mean of the two, p99 the higher",
                conns / 2
            ),
        });
        for (k, list) in each.iter().enumerate() {
            self.report.swarm_load.push(SwarmLoad {
                label: format!("edge {} alone, 1 connection", k + 1),
                conns: 1,
                load: med(list),
                note: format!(
                    "per-request latency; edge {} runs on n{}, the sandbox on {node}: {}",
                    k + 1,
                    k + 1,
                    if node == format!("n{}", k + 1) {
                        "same node"
                    } else {
                        "across nodes (overlay)"
                    }
                ),
            });
        }
        self.report.settings.push((
            "swarm mode".into(),
            format!(
                "{} timed runs per wake scenario and side after one untimed run; requests: {rounds} round(s) of {secs} s per path, wrk 1 thread per process, {conns} connections in all; lab edges log at `{EDGE_LOG_FILTER}`",
                if self.opts.quick { 5 } else { 10 }
            ),
        ));
        Ok(())
    }
}

fn pct(part: f64, whole: f64) -> String {
    if part.is_finite() && whole.is_finite() && whole > 0.0 {
        format!("{:.0} %", 100.0 * part / whole)
    } else {
        "–".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_times_come_from_the_edges_debug_line() {
        let l = r#"2026-12-01T15:59:25.333863Z DEBUG request{request_id=07a9 user=bsww1}: sandboxd::sandbox::swarm: network guard installed container="afc2" ms=346"#;
        assert_eq!(guard_ms(l), Some(346.0));
        assert_eq!(guard_ms("INFO sandbox event ms=12"), None);
        assert_eq!(
            guard_ms("DEBUG network guard installed container=\"x\""),
            None
        );
    }

    #[test]
    fn users_are_valid_ids_and_the_app_is_embedded() {
        let u = fresh_user("w");
        assert!(sandboxd::user::UserId::parse(&u).is_ok(), "{u}");
        assert!(app_code().contains("preview.json"));
        assert!(app_code().contains("server.listen(5173"));
    }
}
