//! sandboxd-bench: runs every benchmark of bench/README.md against a real sandboxd (release build),
//! real sandboxes and the peers (nginx, configurable-http-proxy), and writes the results as
//! markdown. `bench/run` installs the tools, builds, calls this and cleans up; see
//! bench/README.md for what is measured and how.
//!
//! Traffic goes only to loopback and to this instance's own containers (the direct path is
//! the container's address on the instance's private bridge network).

mod http;
mod peers;
mod report;
mod scenarios;
mod stats;
mod sys;
mod wrk;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Parser;

#[derive(Parser, Clone, Debug)]
#[command(about = "Benchmarks sandboxd against direct paths and peers (bench/README.md)")]
pub struct Opts {
    /// Scratch folder (workspaces, database, certificates, logs, pid files).
    #[arg(long)]
    pub work: PathBuf,
    /// The sandboxd binary to run (a release build).
    #[arg(long)]
    pub sandboxd: PathBuf,
    /// configurable-http-proxy's executable.
    #[arg(long)]
    pub chp: PathBuf,
    /// Where the markdown goes.
    #[arg(long)]
    pub out: PathBuf,
    /// The checkout (for the git revision).
    #[arg(long, default_value = ".")]
    pub repo: PathBuf,
    /// Instance name (container prefix and label); `bench/run` removes its containers.
    #[arg(long)]
    pub instance: String,
    /// Short runs for development (fewer rounds, samples and connections).
    #[arg(long)]
    pub quick: bool,
    /// Only these groups (comma-separated: proxy,proxy-cost,exec,files,terminal,idle,wake,tracked,
    /// swarm). Without it: every group but swarm, which runs only with `BENCH_SWARM=1` (it needs
    /// the swarm lab: root, PostgreSQL, a few minutes).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Seconds `bench/run` spent before the benchmarks (tools, image, build), for the report.
    #[arg(long)]
    pub setup_secs: Option<f64>,
    /// The command line to print in the report.
    #[arg(long, default_value = "bench/run")]
    pub command: String,
}

impl Opts {
    pub fn wants(&self, group: &str) -> bool {
        if self.only.is_empty() {
            group != "swarm" || std::env::var("BENCH_SWARM").is_ok_and(|v| v == "1")
        } else {
            self.only.iter().any(|g| g == group)
        }
    }
}

fn main() -> std::process::ExitCode {
    let mut opts = Opts::parse();
    // sandboxd runs with the scratch folder as its working directory.
    for p in [
        &mut opts.work,
        &mut opts.sandboxd,
        &mut opts.chp,
        &mut opts.repo,
    ] {
        if let Ok(abs) = std::fs::canonicalize(&*p) {
            *p = abs;
        }
    }
    let nofile = sys::raise_nofile(65536);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sandboxd-bench: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(opts, nofile)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sandboxd-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(opts: Opts, nofile: u64) -> Result<()> {
    let t = Instant::now();
    let mut ctx = scenarios::Ctx::new(opts.clone(), nofile).await?;
    let result = ctx.run_all().await;
    ctx.cleanup().await;
    if let Err(e) = &result {
        ctx.report.errors.push(format!("run aborted: {e:#}"));
    }
    ctx.report.duration_s = t.elapsed().as_secs_f64();
    // The report this run replaces: its targets stay beside the new figures.
    let previous = std::fs::read_to_string(&opts.out)
        .ok()
        .and_then(|t| report::Previous::parse(&t));
    let text = ctx.report.render(previous.as_ref());
    if let Some(dir) = opts.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&opts.out, &text)?;
    eprintln!(
        "sandboxd-bench: wrote {} ({:.0} s)",
        opts.out.display(),
        ctx.report.duration_s
    );
    for t in ctx.report.targets() {
        eprintln!(
            "  {:<70} {:<28} {}",
            t.what,
            t.measured,
            match t.pass {
                Some(true) => "pass",
                Some(false) => "MISS",
                None => "-",
            }
        );
    }
    result?;
    if !ctx.report.errors.is_empty() {
        anyhow::bail!("{} benchmark(s) failed", ctx.report.errors.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swarm_runs_when_named_or_with_bench_swarm() {
        let opts = |only: &[&str]| {
            Opts::parse_from(
                [
                    "sandboxd-bench",
                    "--work",
                    "w",
                    "--sandboxd",
                    "s",
                    "--chp",
                    "c",
                ]
                .into_iter()
                .chain(["--out", "o", "--instance", "i"])
                .chain(only.iter().copied()),
            )
        };
        assert!(opts(&["--only", "swarm"]).wants("swarm"));
        assert!(!opts(&["--only", "wake"]).wants("swarm"));
        assert!(opts(&[]).wants("wake"));
        // Without --only: only with BENCH_SWARM=1 (not set by the test command).
        if std::env::var("BENCH_SWARM").is_err() {
            assert!(!opts(&[]).wants("swarm"));
        }
    }
}
