//! Proxy cost per request (`--only proxy-cost`, phase A): what one small proxied request costs
//! sandboxd and nginx in the same run, with the same upstream, measured in a way that holds on a
//! shared machine. wrk (1 thread, 32 keep-alive connections) drives each path for a few
//! seconds; the cost is the proxy's CPU time (user + system, from /proc) per request and, with
//! `BENCH_CALLGRIND=1`, the instructions it executed per request as counted by valgrind's
//! callgrind (sandboxd and a single-process nginx then run under callgrind; the counters are
//! dumped and zeroed before and after each load run with `callgrind_control -d`). Instruction
//! counts do not depend on what else runs on the machine; they leave out the kernel's share
//! (the syscalls), which the CPU time includes.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::http;
use crate::peers;
use crate::report::Fact;
use crate::sys;
use crate::wrk::Wrk;

use super::*;

const CONNS: u32 = 32;

/// `BENCH_CALLGRIND=1`: sandboxd (phase A) and nginx run under callgrind.
pub(super) fn callgrind() -> bool {
    std::env::var("BENCH_CALLGRIND").is_ok_and(|v| v == "1")
}

/// Where callgrind writes a process's dumps (`<dir>/callgrind.<name>.<pid>[.<n>]`).
pub(crate) fn callgrind_args(logs: &Path, name: &str) -> Vec<String> {
    vec![
        "--tool=callgrind".into(),
        format!(
            "--callgrind-out-file={}/callgrind.{name}.%p",
            logs.display()
        ),
    ]
}

/// How a process's cost is read.
enum Meter {
    /// CPU time (user + system) of the process and its children, ms.
    Cpu(u32),
    /// Instructions since the last dump, from a callgrind dump of the process.
    Callgrind { pid: u32, logs: PathBuf },
}

impl Meter {
    /// CPU: the running total (µs). Callgrind: the instructions since the previous mark (the
    /// dump zeroes the counters).
    async fn mark(&self) -> Result<f64> {
        match self {
            Meter::Cpu(pid) => Ok(sys::tree_cpu_ms(*pid) * 1000.0),
            Meter::Callgrind { pid, logs } => {
                let before = dumps(logs, *pid);
                let out = tokio::time::timeout(
                    Duration::from_secs(60),
                    tokio::process::Command::new("callgrind_control")
                        .arg("-d")
                        .arg(pid.to_string())
                        .output(),
                )
                .await
                .context("callgrind_control did not finish")??;
                if !out.status.success() {
                    bail!(
                        "callgrind_control -d {pid}: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                // The dump is written by the process itself; wait for the new file.
                for _ in 0..200 {
                    let now = dumps(logs, *pid);
                    if let Some(new) = now.iter().find(|p| !before.contains(p)) {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        let text = std::fs::read_to_string(new)?;
                        return totals(&text).with_context(|| format!("{}", new.display()));
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                bail!("no callgrind dump of {pid} appeared");
            }
        }
    }

    fn per_request(&self, before: f64, after: f64, requests: u64) -> f64 {
        let n = requests.max(1) as f64;
        match self {
            Meter::Cpu(_) => (after - before) / n,
            Meter::Callgrind { .. } => after / n,
        }
    }
}

fn dumps(logs: &Path, pid: u32) -> Vec<PathBuf> {
    let suffix = format!(".{pid}");
    let mut v: Vec<PathBuf> = std::fs::read_dir(logs)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("callgrind.") && n.contains(&suffix))
        })
        .collect();
    v.sort();
    v
}

/// The `totals:` (or `summary:`) line of a callgrind dump: instructions (the first event).
fn totals(text: &str) -> Result<f64> {
    text.lines()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no totals in the callgrind dump")
}

impl Ctx {
    pub(super) async fn bench_proxy_cost(&mut self, ip: IpAddr) -> Result<()> {
        let cg = callgrind();
        self.step(&format!(
            "proxy cost: {} per small request, sandboxd vs nginx",
            if cg {
                "instructions (callgrind)"
            } else {
                "CPU time"
            }
        ));
        let upstream = SocketAddr::new(ip, 5173);
        let (nh, ns) = (free_port()?, free_port()?);
        let certs = self.opts.work.join("certs");
        let logs = self.opts.work.join("logs");
        let nginx = peers::start_nginx_with(
            &self.opts.work,
            &self.pids,
            upstream,
            nh,
            ns,
            &certs.join("dev.crt"),
            &certs.join("dev.key"),
            cg.then_some(logs.as_path()),
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
        let sandboxd = self.server_pid()?;
        let meter = |pid: u32| {
            if cg {
                Meter::Callgrind {
                    pid,
                    logs: logs.clone(),
                }
            } else {
                Meter::Cpu(pid)
            }
        };
        let paths = [
            (
                "sandboxd, HTTP",
                format!("http://{name}:{}/", self.http.port()),
                sandboxd,
            ),
            (
                "nginx, HTTP",
                format!("http://{name}:{}/", nh.port()),
                nginx.pid(),
            ),
            (
                "sandboxd, HTTPS",
                format!("https://{name}:{}/", self.https.port()),
                sandboxd,
            ),
            (
                "nginx, HTTPS",
                format!("https://{name}:{}/", ns.port()),
                nginx.pid(),
            ),
        ];
        for (_, url, _) in &paths {
            let t = http::timed_get(
                SocketAddr::from(([127, 0, 0, 1], url_port(url))),
                &name,
                "/",
                Duration::from_secs(60),
            )
            .await;
            if url.starts_with("http:") && !matches!(&t, Ok(t) if t.status == 200) {
                bail!("{url}: no 200 before the cost runs");
            }
        }
        // Under callgrind everything is ~50× slower: longer runs keep the request counts up.
        let (warm, secs) = if cg { (3.0, 10.0) } else { (1.0, 4.0) };
        let rounds = if self.opts.quick { 1 } else { 3 };
        let mut results: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
        let mut counts: Vec<u64> = vec![0; paths.len()];
        let mut errors: Vec<u64> = vec![0; paths.len()];
        for _ in 0..rounds {
            for (i, (label, url, pid)) in paths.iter().enumerate() {
                wrk.run(url, CONNS, warm).await?;
                let m = meter(*pid);
                let before = m.mark().await?;
                let r = wrk.run(url, CONNS, secs).await?;
                let after = m.mark().await?;
                // A few timeouts happen under callgrind on a busy machine; many mean a broken path.
                if r.errors * 10 > r.requests {
                    bail!("{label}: {} errors in {} requests", r.errors, r.requests);
                }
                errors[i] += r.errors;
                results[i].push(m.per_request(before, after, r.requests));
                counts[i] += r.requests;
            }
        }
        let unit = if cg { "instructions" } else { "CPU µs" };
        let med: Vec<f64> = results.iter().map(|v| crate::stats::median(v)).collect();
        for (i, (label, _, _)) in paths.iter().enumerate() {
            let value = if cg {
                format!("{:.0} instructions", med[i])
            } else {
                format!("{:.1} µs CPU", med[i])
            };
            eprintln!("[bench] proxy cost {label}: {value} per request");
            self.report.proxy_cost.push(Fact {
                label: (*label).into(),
                value,
                note: format!(
                    "median of {rounds} run(s) of {secs:.0} s, {} requests in all ({} errors), wrk -t1 -c{CONNS}",
                    counts[i], errors[i]
                ),
            });
        }
        for (proto, s, n) in [("HTTP", 0, 1), ("HTTPS", 2, 3)] {
            self.report.proxy_cost.push(Fact {
                label: format!("sandboxd / nginx, {proto}"),
                value: format!("{:.2}×", med[s] / med[n]),
                note: format!("{unit} per request"),
            });
        }
        nginx.stop(libc::SIGTERM, Duration::from_secs(20)).await;
        Ok(())
    }
}

fn url_port(url: &str) -> u16 {
    url.trim_end_matches('/')
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_callgrind_totals() {
        let dump = "version: 1\ncmd: x\nevents: Ir\nfn=main\n1 5\nsummary: 1234\ntotals: 1234\n";
        assert_eq!(totals(dump).unwrap(), 1234.0);
        assert!(totals("events: Ir\n").is_err());
        assert_eq!(url_port("http://user-p1.preview.localhost:8080/"), 8080);
    }
}
