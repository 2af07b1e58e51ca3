//! Files API throughput (phase A): `PUT`/`GET /sandbox/files` of a 1 MiB and a 16 MiB file
//! (MiB/s) and of 4 KiB files (operations per second), beside `docker cp` (write) and
//! `docker exec cat` (read) on the same sandbox in the same run.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use hyper::Method;

use crate::report::Fact;

use super::*;

/// What one measured path did: seconds per operation, sorted (median = p50).
fn median(mut s: Vec<f64>) -> f64 {
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied().unwrap_or(f64::NAN)
}

fn rate(bytes: usize, secs: f64) -> String {
    format!("{:.0} MiB/s", bytes as f64 / (1 << 20) as f64 / secs)
}

fn ops(secs: f64) -> String {
    format!("{:.0} ops/s", 1.0 / secs)
}

impl Ctx {
    pub(super) async fn bench_files(&mut self, id: &str) -> Result<()> {
        self.step("files API: write and read throughput vs docker cp / docker exec cat");
        let api = self.api()?;
        let scratch = self.opts.work.join("files-bench");
        std::fs::create_dir_all(&scratch)?;
        let mut rows = vec![];
        for (label, size, runs) in [
            ("1 MiB", 1usize << 20, if self.opts.quick { 5 } else { 20 }),
            ("16 MiB", 16 << 20, if self.opts.quick { 3 } else { 8 }),
            ("4 KiB", 4 << 10, if self.opts.quick { 50 } else { 300 }),
        ] {
            let data: Bytes = (0..size)
                .map(|i| (i * 31 % 251) as u8)
                .collect::<Vec<u8>>()
                .into();
            let path = format!("/sandbox/files?path=bench/f-{size}");
            let local = scratch.join(format!("f-{size}"));
            std::fs::write(&local, &data)?;
            let (mut w, mut r, mut cp, mut cat) = (vec![], vec![], vec![], vec![]);
            // The CLI paths cost a process each: fewer of them for small files.
            let cli_runs = runs.min(if self.opts.quick { 5 } else { 20 });
            for i in 0..runs + 1 {
                let t = Instant::now();
                let (s, _) = api
                    .raw(self.user_files(), Method::PUT, &path, data.clone())
                    .await?;
                let dw = t.elapsed().as_secs_f64();
                if !s.is_success() {
                    bail!("PUT {path}: {s}");
                }
                let t = Instant::now();
                let (s, got) = api
                    .raw(self.user_files(), Method::GET, &path, Bytes::new())
                    .await?;
                let dr = t.elapsed().as_secs_f64();
                if !s.is_success() || got.len() != size {
                    bail!("GET {path}: {s}, {} bytes", got.len());
                }
                // The first round warms the paths up.
                if i > 0 {
                    w.push(dw);
                    r.push(dr);
                }
                if i > 0 && i <= cli_runs {
                    let t = Instant::now();
                    let out = tokio::process::Command::new("docker")
                        .arg("cp")
                        .arg(&local)
                        .arg(format!("{id}:/workspace/bench/cp-{size}"))
                        .output()
                        .await?;
                    cp.push(t.elapsed().as_secs_f64());
                    if !out.status.success() {
                        bail!("docker cp: {}", String::from_utf8_lossy(&out.stderr));
                    }
                    let t = Instant::now();
                    let out = tokio::process::Command::new("docker")
                        .args(["exec", id, "cat", &format!("/workspace/bench/f-{size}")])
                        .output()
                        .await?;
                    cat.push(t.elapsed().as_secs_f64());
                    if out.stdout.len() != size {
                        bail!("docker exec cat printed {} bytes", out.stdout.len());
                    }
                }
            }
            let (w, r, cp, cat) = (median(w), median(r), median(cp), median(cat));
            let fmt = |secs: f64| {
                if size < (1 << 20) {
                    format!("{} ({})", ops(secs), crate::report::ms(secs * 1e3))
                } else {
                    format!("{} ({})", rate(size, secs), crate::report::ms(secs * 1e3))
                }
            };
            rows.push(Fact {
                label: format!("{label} write: `PUT /sandbox/files`"),
                value: fmt(w),
                note: format!(
                    "median of {runs}; `docker cp` {} ({:.1}× the API's time)",
                    fmt(cp),
                    cp / w
                ),
            });
            rows.push(Fact {
                label: format!("{label} read: `GET /sandbox/files`"),
                value: fmt(r),
                note: format!(
                    "median of {runs}; `docker exec cat` {} ({:.1}× the API's time)",
                    fmt(cat),
                    cat / r
                ),
            });
        }
        std::fs::remove_dir_all(&scratch).context("removing the scratch files")?;
        self.report.files = rows;
        self.report.settings.push((
            "files".into(),
            "sequential requests on one keep-alive connection to a running sandbox; the CLI baselines run on the same sandbox, interleaved".into(),
        ));
        Ok(())
    }

    fn user_files(&self) -> &'static str {
        "p1"
    }
}
