//! Proxy throughput and latency (phase A): wrk through sandboxd's preview host, nginx,
//! configurable-http-proxy and the container directly.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::http;
use crate::peers;
use crate::report::{Fact, ProxyRow};
use crate::stats::median;
use crate::sys;
use crate::wrk::{Wrk, WrkResult};

use super::*;

const BIG_BODY: usize = 1 << 20;
const LOAD_CONNS: u32 = 32;

impl Ctx {
    /// `id`: the sandbox's container, whose CPU time (its cgroup's) is read around each load
    /// run, to show whether the app, not the proxy, is what limits the requests/s.
    pub(super) async fn bench_proxy(&mut self, ip: IpAddr, id: &str) -> Result<()> {
        self.step("proxy: starting nginx and configurable-http-proxy");
        let upstream = SocketAddr::new(ip, 5173);
        let (nh, ns, ch, ca) = (free_port()?, free_port()?, free_port()?, free_port()?);
        let certs = self.opts.work.join("certs");
        let nginx = peers::start_nginx(
            &self.opts.work,
            &self.pids,
            upstream,
            nh,
            ns,
            &certs.join("dev.crt"),
            &certs.join("dev.key"),
        )
        .await?;
        let chp = peers::start_chp(
            &self.opts.chp,
            &self.opts.work,
            &self.pids,
            upstream,
            ch,
            ca,
        )
        .await?;
        let name = format!("user-p1.{PREVIEW_DOMAIN}");
        let hosts_file = self.opts.work.join("hosts");
        let mut hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
        hosts.push_str(&format!("\n127.0.0.1 {name}\n"));
        std::fs::write(&hosts_file, hosts)?;
        let wrk = Wrk {
            hosts_file,
            threads: 1,
        };
        let targets: Vec<(&'static str, String, String)> = vec![
            (
                "a",
                "a. direct to the container".into(),
                format!("http://{ip}:5173"),
            ),
            (
                "b_http",
                "b. sandboxd preview, HTTP".into(),
                format!("http://{name}:{}", self.http.port()),
            ),
            (
                "b_https",
                "b. sandboxd preview, HTTPS".into(),
                format!("https://{name}:{}", self.https.port()),
            ),
            (
                "c_http",
                "c. nginx, HTTP".into(),
                format!("http://{name}:{}", nh.port()),
            ),
            (
                "c_https",
                "c. nginx, HTTPS".into(),
                format!("https://{name}:{}", ns.port()),
            ),
            (
                "d",
                "d. configurable-http-proxy, HTTP".into(),
                format!("http://{name}:{}", ch.port()),
            ),
        ];
        let keys: Vec<&str> = targets.iter().map(|t| t.0).collect();
        if run_order(&keys, 0).len() != keys.len() {
            bail!("a proxy path is in no group of GROUPS ({keys:?})");
        }
        let sizes = [("small", "/", SMALL_BODY), ("1 MiB", "/1m", BIG_BODY)];
        // Every plain-HTTP path answers with the right body before anything is timed.
        for (key, _, base) in &targets {
            if key.ends_with("https") {
                continue;
            }
            let port: u16 = base
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            let addr = if *key == "a" {
                upstream
            } else {
                SocketAddr::from(([127, 0, 0, 1], port))
            };
            for (_, path, len) in sizes {
                let t = http::timed_get(addr, &name, path, Duration::from_secs(10)).await?;
                if t.status != 200 || t.body_len != len {
                    bail!("{key}{path}: status {} with {} bytes", t.status, t.body_len);
                }
            }
        }
        self.step("proxy: warm-up");
        for (_, _, base) in &targets {
            for (_, path, _) in sizes {
                wrk.run(&format!("{base}{path}"), LOAD_CONNS, self.n.warm_secs)
                    .await?;
            }
        }
        let mut load: HashMap<(usize, usize), Vec<WrkResult>> = HashMap::new();
        let mut single: HashMap<(usize, usize), Vec<WrkResult>> = HashMap::new();
        let mut cpu: HashMap<(usize, usize), Vec<f64>> = HashMap::new();
        let mut app: HashMap<(usize, usize), Vec<f64>> = HashMap::new();
        let sandboxd = self.server_pid()?;
        let proxy_pid: Vec<Option<u32>> = targets
            .iter()
            .map(|(key, _, _)| match *key {
                "b_http" | "b_https" => Some(sandboxd),
                "c_http" | "c_https" => Some(nginx.pid()),
                "d" => Some(chp.pid()),
                _ => None,
            })
            .collect();
        for round in 0..self.n.rounds {
            self.step(&format!("proxy: round {} of {}", round + 1, self.n.rounds));
            for (si, (_, path, _)) in sizes.iter().enumerate() {
                // sandboxd's run and nginx's for the same scheme run back to back, so that a
                // slow spell of the machine (it can halve a run's requests/s on a shared VM)
                // weighs on both; each round starts one group later and swaps who goes first
                // in each pair (a run inherits the app's garbage and the machine's state from
                // the one before it).
                for ti in run_order(&keys, round) {
                    let (_, _, base) = &targets[ti];
                    let url = format!("{base}{path}");
                    let pid = proxy_pid[ti];
                    let cpu0 = pid.map(sys::tree_cpu_ms);
                    let app0 = sys::cgroup_cpu(id).map(|(used, _)| (used, Instant::now()));
                    let l = wrk.run(&url, LOAD_CONNS, self.n.load_secs).await?;
                    if let (Some(pid), Some(c0)) = (pid, cpu0) {
                        let per = (sys::tree_cpu_ms(pid) - c0) * 1000.0 / l.requests.max(1) as f64;
                        cpu.entry((si, ti)).or_default().push(per);
                    }
                    if let (Some((u0, t0)), Some((u1, _))) = (app0, sys::cgroup_cpu(id)) {
                        let wall_ms = t0.elapsed().as_secs_f64() * 1000.0;
                        app.entry((si, ti)).or_default().push((u1 - u0) / wall_ms);
                    }
                    load.entry((si, ti)).or_default().push(l);
                }
                // One request at a time, in short runs that take turns across the paths: which
                // core serves the connection (and whether the proxy's thread shares one with
                // wrk's) changes from run to run and moves a run's p50 by hundreds of µs on a
                // small VM, so each path gets several runs, spread over the round, and their
                // median.
                for pass in 0..self.n.single_passes {
                    for ti in run_order(&keys, round * self.n.single_passes + pass) {
                        let (_, _, base) = &targets[ti];
                        let s = wrk
                            .run(&format!("{base}{path}"), 1, self.n.single_secs)
                            .await?;
                        single.entry((si, ti)).or_default().push(s);
                    }
                }
            }
        }
        // The spread behind the medians of the latency row, shown as it was measured.
        let runs = |ti: usize| {
            single[&(0, ti)]
                .iter()
                .map(|r| format!("{:.0}", r.p50_us))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let http: Vec<String> = targets
            .iter()
            .enumerate()
            .filter(|(_, (key, _, _))| matches!(*key, "a" | "b_http" | "c_http"))
            .map(|(ti, (_, label, _))| format!("{label}: {}", runs(ti)))
            .collect();
        self.report.notes.push(format!(
            "Proxy, small response, 1 connection: the p50 of each run in µs, in the order run ({}).",
            http.join("; ")
        ));
        for (si, (size, _, _)) in sizes.iter().enumerate() {
            for (ti, (key, label, _)) in targets.iter().enumerate() {
                self.report.proxy.push(ProxyRow {
                    size: (*size).into(),
                    key,
                    label: label.clone(),
                    load: med(&load[&(si, ti)]),
                    single: med(&single[&(si, ti)]),
                    cpu_us: cpu.get(&(si, ti)).map(|v| median(v)),
                    app_cores: app.get(&(si, ti)).map(|v| median(v)),
                    rounds: load[&(si, ti)].iter().map(|r| r.rps).collect(),
                });
            }
        }
        let pid = self.server_pid()?;
        self.report.footprint.push(Fact {
            label: "sandboxd peak RSS during the proxy load".into(),
            value: format!("{:.1} MiB", mib(sys::hwm_kib(pid)?)),
            note: format!(
                "VmHWM after {LOAD_CONNS} keep-alive connections pulling 1 MiB responses"
            ),
        });
        self.report.settings.push((
            "proxy".into(),
            format!(
                "wrk -t1, {LOAD_CONNS} connections for {} s (load) and 1 connection in runs of {} s ({} per path and round, taking turns across the paths after the round's load runs), {} round(s) interleaved across paths, sandboxd's and nginx's runs of a scheme back to back (who goes first alternates), each round starting one group later, medians; warm-up {} s per path; the sandbox unthrottled (2 CPUs) so that no CPU quota limits the app (its Node server is single-threaded: the app CPU column shows when it is the bottleneck); nginx: {} workers, upstream keepalive 64, proxy buffers in memory, the same headers to the app as sandboxd (Host, X-Forwarded-For/-Proto/-Host, X-Request-Id, the id also in the response); configurable-http-proxy: defaults (keep-alive agent), one Node process",
                self.n.load_secs,
                self.n.single_secs,
                self.n.single_passes,
                self.n.rounds,
                self.n.warm_secs,
                sys::nproc()
            ),
        ));
        nginx.stop(libc::SIGTERM, Duration::from_secs(5)).await;
        chp.stop(libc::SIGTERM, Duration::from_secs(5)).await;
        Ok(())
    }
}

fn med(v: &[WrkResult]) -> WrkResult {
    let pick = |f: fn(&WrkResult) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
    WrkResult {
        rps: pick(|r| r.rps),
        p50_us: pick(|r| r.p50_us),
        p99_us: pick(|r| r.p99_us),
        requests: v.iter().map(|r| r.requests).sum(),
        errors: v.iter().map(|r| r.errors).sum(),
    }
}

/// The paths (by key) in groups that run back to back: the direct path; sandboxd and nginx over
/// HTTP; the same over HTTPS; configurable-http-proxy.
const GROUPS: [&[&str]; 4] = [
    &["a"],
    &["b_http", "c_http"],
    &["b_https", "c_https"],
    &["d"],
];

/// The order of the paths' runs in turn `k`, as indices into `keys`: the groups starting at
/// `k % 4` and wrapping around, each pair in its order when `k` is even and swapped when odd.
/// A key in no group is left out.
fn run_order(keys: &[&str], k: usize) -> Vec<usize> {
    let swap = k % 2 == 1;
    (0..GROUPS.len())
        .flat_map(|i| {
            let g = GROUPS[(i + k) % GROUPS.len()];
            (0..g.len()).map(move |j| if swap { g[g.len() - 1 - j] } else { g[j] })
        })
        .filter_map(|key| keys.iter().position(|k| *k == key))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::run_order;

    const KEYS: [&str; 6] = ["a", "b_http", "b_https", "c_http", "c_https", "d"];

    #[test]
    fn compared_paths_run_back_to_back_and_take_turns_going_first() {
        assert_eq!(run_order(&KEYS, 0), [0, 1, 3, 2, 4, 5]);
        assert_eq!(run_order(&KEYS, 1), [3, 1, 4, 2, 5, 0]);
        assert_eq!(run_order(&KEYS, 2), [2, 4, 5, 0, 1, 3]);
        assert_eq!(run_order(&KEYS, 7), [5, 0, 3, 1, 4, 2]);
        for k in 0..12 {
            let mut o = run_order(&KEYS, k);
            // sandboxd's run and nginx's are neighbours in every turn.
            for (b, c) in [(1, 3), (2, 4)] {
                let (x, y) = (
                    o.iter().position(|&t| t == b).unwrap(),
                    o.iter().position(|&t| t == c).unwrap(),
                );
                assert_eq!(x.abs_diff(y), 1, "turn {k}: {o:?}");
            }
            // Every path runs once per turn.
            o.sort_unstable();
            assert_eq!(o, [0, 1, 2, 3, 4, 5]);
        }
    }
}
