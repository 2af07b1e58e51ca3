//! Proxy throughput and latency (phase A): wrk through sandboxd's preview host, nginx,
//! configurable-http-proxy and the container directly.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

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
    pub(super) async fn bench_proxy(&mut self, ip: IpAddr) -> Result<()> {
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
                // Each round starts the load runs one path later: a path's run is not always
                // the one after the same other path (a run inherits the app's garbage and the
                // machine's state from the one before it).
                for ti in rotated(targets.len(), round) {
                    let (_, _, base) = &targets[ti];
                    let url = format!("{base}{path}");
                    let pid = proxy_pid[ti];
                    let cpu0 = pid.map(sys::tree_cpu_ms);
                    let l = wrk.run(&url, LOAD_CONNS, self.n.load_secs).await?;
                    if let (Some(pid), Some(c0)) = (pid, cpu0) {
                        let per = (sys::tree_cpu_ms(pid) - c0) * 1000.0 / l.requests.max(1) as f64;
                        cpu.entry((si, ti)).or_default().push(per);
                    }
                    load.entry((si, ti)).or_default().push(l);
                }
                // One request at a time, in short runs that take turns across the paths: which
                // core serves the connection (and whether the proxy's thread shares one with
                // wrk's) changes from run to run and moves a run's p50 by hundreds of µs on a
                // small VM, so each path gets several runs, spread over the round, and their
                // median.
                for pass in 0..self.n.single_passes {
                    for ti in rotated(targets.len(), round * self.n.single_passes + pass) {
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
                "wrk -t1, {LOAD_CONNS} connections for {} s (load) and 1 connection in runs of {} s ({} per path and round, taking turns across the paths after the round's load runs), {} round(s) interleaved across paths, each starting one path later, medians; warm-up {} s per path; the sandbox unthrottled (2 CPUs) so that the app is not the bottleneck; nginx: {} workers, upstream keepalive 64, proxy buffers in memory, the same headers to the app as sandboxd (Host, X-Forwarded-For/-Proto/-Host, X-Request-Id, the id also in the response); configurable-http-proxy: defaults (keep-alive agent), one Node process",
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

/// The indices `0..n`, starting at `k % n` and wrapping around (none when `n` is 0).
fn rotated(n: usize, k: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |i| (i + k) % n)
}

#[cfg(test)]
mod tests {
    use super::rotated;

    #[test]
    fn every_round_visits_every_path_once_starting_one_later() {
        assert_eq!(rotated(6, 0).collect::<Vec<_>>(), [0, 1, 2, 3, 4, 5]);
        assert_eq!(rotated(6, 1).collect::<Vec<_>>(), [1, 2, 3, 4, 5, 0]);
        assert_eq!(rotated(6, 8).collect::<Vec<_>>(), [2, 3, 4, 5, 0, 1]);
        assert_eq!(rotated(0, 3).count(), 0);
    }
}
