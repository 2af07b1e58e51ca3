//! Execute round trip (phase A): sandboxd's API against `docker exec`.

use std::time::Instant;

use anyhow::{bail, Result};
use serde_json::json;

use crate::report::TimedRow;
use crate::stats::summarize;

use super::*;

impl Ctx {
    pub(super) async fn bench_exec(&mut self, id: &str) -> Result<()> {
        self.step("execute: sandboxd vs docker exec");
        let code = json!({"code": "console.log(1)"});
        let (mut api_s, mut cli_s, mut eng_s) = (vec![], vec![], vec![]);
        let warm = 3;
        for i in 0..self.n.exec_runs + warm {
            let t = Instant::now();
            let v = self.api()?.post("p1", "/sandbox/execute", &code).await?;
            let d = t.elapsed().as_secs_f64() * 1e3;
            if v["output"] != "1\n" {
                bail!("execute answered {v}");
            }
            let t = Instant::now();
            let out = tokio::process::Command::new("docker")
                .args(["exec", id, "node", "-e", "console.log(1)"])
                .output()
                .await?;
            let c = t.elapsed().as_secs_f64() * 1e3;
            if out.stdout != b"1\n" {
                bail!(
                    "docker exec printed {:?}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let t = Instant::now();
            let (code_, outp) = self
                .engine
                .run(
                    id,
                    vec!["node".into(), "-e".into(), "console.log(1)".into()],
                )
                .await?;
            let e = t.elapsed().as_secs_f64() * 1e3;
            if code_ != 0 || outp != "1\n" {
                bail!("engine exec: {code_} {outp:?}");
            }
            if i >= warm {
                api_s.push(d);
                cli_s.push(c);
                eng_s.push(e);
            }
        }
        self.report.exec = vec![
            TimedRow {
                label: "sandboxd `POST /sandbox/execute`".into(),
                ms: summarize(&api_s),
                note: "HTTP API, code on the exec's stdin, `setsid` wrapper writes it to a file, `node` runs it as uid 1000".into(),
            },
            TimedRow {
                label: "`docker exec <id> node -e 'console.log(1)'` (CLI floor)".into(),
                ms: summarize(&cli_s),
                note: "the docker CLI process plus the engine's exec".into(),
            },
            TimedRow {
                label: "engine API exec of `node -e` (no CLI, no edge)".into(),
                ms: summarize(&eng_s),
                note: "create, start, read, inspect of one exec over the engine socket, the calls sandboxd makes".into(),
            },
        ];
        self.report.settings.push((
            "execute".into(),
            format!(
                "{} runs of each path after {warm} warm-up runs, interleaved, on a running sandbox",
                self.n.exec_runs
            ),
        ));
        Ok(())
    }
}
