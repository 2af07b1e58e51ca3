//! Execute round trip (phase A): sandboxd's API in every language, back to back and spaced,
//! against `docker exec`.

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
        let mut rows = vec![
            TimedRow {
                label: "sandboxd `POST /sandbox/execute` javascript, back to back".into(),
                ms: summarize(&api_s),
                note: "HTTP API, the `run` op of the in-sandbox agent over the private network (a warm node takes the code)".into(),
            },
            TimedRow {
                label: "`docker exec <id> node -e 'console.log(1)'` (CLI floor)".into(),
                ms: summarize(&cli_s),
                note: "the docker CLI process plus the engine's exec".into(),
            },
            TimedRow {
                label: "engine API exec of `node -e` (no CLI, no edge)".into(),
                ms: summarize(&eng_s),
                note: "create, start, read, inspect of one exec over the engine socket (the old execute path's floor)".into(),
            },
        ];
        // Every language through the API, back to back and spaced 0.5 s apart (an interactive
        // user or an agent loop), beside `docker exec` of the same runtime spaced alike.
        let langs: [(&str, &str, &[&str]); 4] = [
            (
                "javascript",
                "console.log(1)",
                &["node", "-e", "console.log(1)"],
            ),
            ("typescript", "const x: number = 1; console.log(x)", &[]),
            ("python", "print(1)", &["python3", "-c", "print(1)"]),
            ("bash", "echo 1", &["bash", "-c", "echo 1"]),
        ];
        for spaced in [false, true] {
            for (lang, src, cli) in langs {
                if !spaced && lang == "javascript" {
                    continue; // measured above, interleaved with the floors
                }
                let body = json!({"code": src, "language": lang});
                let (mut a, mut c) = (vec![], vec![]);
                for i in 0..self.n.exec_runs + warm {
                    if spaced {
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    }
                    let t = Instant::now();
                    let v = self.api()?.post("p1", "/sandbox/execute", &body).await?;
                    let d = t.elapsed().as_secs_f64() * 1e3;
                    if v["output"] != "1\n" {
                        bail!("execute {lang} answered {v}");
                    }
                    if i >= warm {
                        a.push(d);
                    }
                    if spaced && !cli.is_empty() {
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                        let t = Instant::now();
                        let out = tokio::process::Command::new("docker")
                            .arg("exec")
                            .arg(id)
                            .args(cli)
                            .output()
                            .await?;
                        let e = t.elapsed().as_secs_f64() * 1e3;
                        if out.stdout != b"1\n" {
                            bail!(
                                "docker exec {lang}: {:?}",
                                String::from_utf8_lossy(&out.stderr)
                            );
                        }
                        if i >= warm {
                            c.push(e);
                        }
                    }
                }
                let how = if spaced {
                    "spaced 0.5 s"
                } else {
                    "back to back"
                };
                rows.push(TimedRow {
                    label: format!("sandboxd `POST /sandbox/execute` {lang}, {how}"),
                    ms: summarize(&a),
                    note: format!("`{src}`"),
                });
                if !c.is_empty() {
                    rows.push(TimedRow {
                        label: format!("`docker exec <id> {}`, {how}", cli.join(" ")),
                        ms: summarize(&c),
                        note: "the same runtime started by the docker CLI, for comparison".into(),
                    });
                }
            }
        }
        self.report.exec = rows;
        self.report.settings.push((
            "execute".into(),
            format!(
                "{} runs of each path after {warm} warm-up runs on a running sandbox; back to back (javascript interleaved with the floors) and spaced 0.5 s apart",
                self.n.exec_runs
            ),
        ));
        Ok(())
    }
}
