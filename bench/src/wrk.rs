//! Runs wrk (keep-alive HTTP/1.1 load, `--latency` percentiles) and parses its report. Host
//! names resolve to 127.0.0.1 through a private mount namespace in which /etc/hosts is the
//! bench's own file, so TLS SNI and Host are the real preview names and the machine's
//! /etc/hosts is never touched.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};

#[derive(Clone, Debug, Default)]
pub struct WrkResult {
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub requests: u64,
    pub errors: u64,
}

pub struct Wrk {
    pub hosts_file: PathBuf,
    pub threads: u32,
}

impl Wrk {
    pub async fn run(&self, url: &str, conns: u32, secs: f64) -> Result<WrkResult> {
        let mut cmd = tokio::process::Command::new("unshare");
        cmd.args([
            "-m",
            "sh",
            "-c",
            r#"mount --bind "$0" /etc/hosts && exec "$@""#,
        ])
        .arg(&self.hosts_file)
        .arg("wrk")
        .arg(format!("-t{}", self.threads.min(conns)))
        .arg(format!("-c{conns}"))
        // wrk takes whole seconds.
        .arg(format!("-d{}s", secs.round().max(1.0) as u64))
        .args(["--latency", "--timeout", "5s", url])
        .kill_on_drop(true);
        let limit = Duration::from_secs_f64(secs + 30.0);
        let out = tokio::time::timeout(limit, cmd.output())
            .await
            .context("wrk did not finish")?
            .context("running wrk")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "wrk {url} failed: {}{}",
                text,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        parse(&text).with_context(|| format!("parsing wrk output for {url}:\n{text}"))
    }
}

/// A wrk duration ("62.00us", "1.23ms", "1.00s", "1.00m") in microseconds.
fn duration_us(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e6)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60e6)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|v| v * mult)
}

pub fn parse(text: &str) -> Result<WrkResult> {
    let mut r = WrkResult::default();
    let mut have = (false, false, false);
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", v] => {
                r.p50_us = duration_us(v).context("p50")?;
                have.0 = true;
            }
            ["99%", v] => {
                r.p99_us = duration_us(v).context("p99")?;
                have.1 = true;
            }
            ["Requests/sec:", v] => {
                r.rps = v.parse().context("Requests/sec")?;
                have.2 = true;
            }
            [n, "requests", "in", ..] => r.requests = n.parse().unwrap_or(0),
            ["Non-2xx", "or", "3xx", "responses:", n] => r.errors += n.parse::<u64>().unwrap_or(0),
            ["Socket", "errors:", rest @ ..] => {
                r.errors += rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            _ => {}
        }
    }
    if have != (true, true, true) {
        bail!("missing percentiles or Requests/sec");
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_report() {
        let text = "Running 2s test @ http://x/\n  1 threads and 32 connections\n  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency     1.10ms  200.00us   5.00ms   90.00%\n  Latency Distribution\n     50%  850.00us\n     75%    1.00ms\n     90%    1.20ms\n     99%    2.50ms\n  40000 requests in 2.00s, 5.00MB read\n  Non-2xx or 3xx responses: 3\n  Socket errors: connect 0, read 2, write 0, timeout 1\nRequests/sec:  20000.50\nTransfer/sec:      2.50MB\n";
        let r = parse(text).unwrap();
        assert_eq!(r.p50_us, 850.0);
        assert_eq!(r.p99_us, 2500.0);
        assert_eq!(r.rps, 20000.5);
        assert_eq!(r.requests, 40000);
        assert_eq!(r.errors, 6);
        assert!(parse("nothing").is_err());
        assert_eq!(duration_us("1.50s"), Some(1.5e6));
    }
}
