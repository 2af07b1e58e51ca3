//! Code execution: the code travels as bytes on the exec's stdin (never inside a shell string
//! or an argument, so there is no size limit and no quoting), is written to a file under
//! /workspace/.sandboxd/exec by `cat`, and runs with `node` in a session of its own. On timeout
//! the whole session is killed (descendants that ignore SIGTERM or fork included); stdout and
//! stderr are each capped while the rest is drained and dropped, so memory stays flat.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use crate::config::Config;
use crate::sandbox::docker::{Engine, ExecOutput, ExecSpec};

/// Constant script; `$1` is a server-generated run id (a UUID), never client data. `setsid -w`
/// makes bash the leader of a new session, so `$$` is the session id the killer targets.
const RUNNER: &str = r#"d=/workspace/.sandboxd/exec
mkdir -p "$d" && echo $$ > "$d/$1.pid" || exit 125
cat > "$d/$1.js" || exit 125
node "$d/$1.js"
rc=$?
rm -f "$d/$1.js" "$d/$1.pid"
exit $rc
"#;

/// Kills every process of the run's session, then removes its files.
const KILLER: &str = r#"d=/workspace/.sandboxd/exec
p=$(cat "$d/$1.pid" 2>/dev/null)
case "$p" in ''|*[!0-9]*) exit 0 ;; esac
[ "$p" -gt 1 ] || exit 0
pkill -KILL -s "$p"
rm -f "$d/$1.js" "$d/$1.pid"
"#;

#[derive(Debug, Clone)]
pub struct ExecRequest {
    pub code: Vec<u8>,
    pub timeout: Duration,
}

#[derive(Debug, Clone, Default)]
pub struct ExecResult {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit_code: Option<i64>,
    pub timed_out: bool,
    pub truncated: bool,
    pub oom_killed: bool,
    pub duration_ms: u64,
}

/// Appends `chunk` to `buf` up to `cap` bytes; returns whether anything was dropped.
fn append_capped(buf: &mut Vec<u8>, chunk: &[u8], cap: usize) -> bool {
    let room = cap.saturating_sub(buf.len());
    let take = room.min(chunk.len());
    buf.extend_from_slice(&chunk[..take]);
    take < chunk.len()
}

pub async fn run_code(
    engine: &Engine,
    container: &str,
    req: ExecRequest,
    cfg: &Config,
) -> anyhow::Result<ExecResult> {
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let oom_before = oom_kills(container);
    let started = Instant::now();
    let (exec_id, mut output, mut input) = engine
        .exec(
            container,
            ExecSpec {
                cmd: vec![
                    "setsid".into(),
                    "-w".into(),
                    "bash".into(),
                    "-c".into(),
                    RUNNER.into(),
                    "sandboxd-exec".into(),
                    run_id.clone(),
                ],
                env: vec![],
                working_dir: Some(super::spec::WORKSPACE),
                tty: false,
                stdin: true,
            },
        )
        .await?;
    // Write the code in its own task so a program that prints before stdin is drained can
    // never deadlock against us.
    let code = req.code;
    let writer = tokio::spawn(async move {
        let r = input.write_all(&code).await;
        let _ = input.shutdown().await;
        r
    });

    let cap = cfg.exec_max_output_bytes;
    let mut res = ExecResult::default();
    let deadline = tokio::time::Instant::now() + req.timeout;
    loop {
        match tokio::time::timeout_at(deadline, output.next()).await {
            Ok(Some(Ok(ExecOutput::Stdout(b)))) => {
                res.truncated |= append_capped(&mut res.stdout, &b, cap);
            }
            Ok(Some(Ok(ExecOutput::Stderr(b)))) => {
                res.truncated |= append_capped(&mut res.stderr, &b, cap);
            }
            Ok(Some(Err(e))) => return Err(e),
            Ok(None) => break,
            Err(_) => {
                res.timed_out = true;
                break;
            }
        }
    }
    if res.timed_out {
        if let Err(e) = engine
            .run(
                container,
                vec![
                    "bash".into(),
                    "-c".into(),
                    KILLER.into(),
                    "sandboxd-kill".into(),
                    run_id,
                ],
            )
            .await
        {
            tracing::warn!(error = format!("{e:#}"), "killing a timed-out execution");
        }
        // Drain what is left, bounded: the session is dead, the stream ends promptly.
        let _ = tokio::time::timeout(Duration::from_secs(3), async {
            while let Some(Ok(chunk)) = output.next().await {
                let (ExecOutput::Stdout(b) | ExecOutput::Stderr(b)) = chunk;
                let _ = b;
            }
        })
        .await;
    }
    writer.abort();
    res.duration_ms = started.elapsed().as_millis() as u64;
    let info = engine.exec_info(&exec_id).await?;
    res.exit_code = if res.timed_out { None } else { info.exit_code };
    if let (Some(before), Some(after)) = (oom_before, oom_kills(container)) {
        res.oom_killed = after > before;
    }
    Ok(res)
}

/// The container cgroup's OOM-kill counter, read from the host (cgroup v1 or v2); `None` when
/// the cgroup cannot be found (e.g. sandboxd runs in a container of its own).
pub fn oom_kills(container_id: &str) -> Option<u64> {
    let candidates = [
        format!("/sys/fs/cgroup/memory/docker/{container_id}/memory.oom_control"),
        format!("/sys/fs/cgroup/system.slice/docker-{container_id}.scope/memory.events"),
        format!("/sys/fs/cgroup/docker/{container_id}/memory.events"),
    ];
    candidates.iter().find_map(|p| {
        let text = std::fs::read_to_string(p).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capping_keeps_prefix_and_reports() {
        let mut buf = vec![];
        assert!(!append_capped(&mut buf, b"hello", 8));
        assert!(append_capped(&mut buf, b"world", 8));
        assert_eq!(buf, b"hellowor");
        assert!(append_capped(&mut buf, b"x", 8));
        assert_eq!(buf.len(), 8);
    }

    #[test]
    fn scripts_take_no_interpolated_data() {
        // The run id reaches the scripts only as "$1"; nothing is formatted into them.
        assert!(!RUNNER.contains('{') && !KILLER.contains('{'));
    }
}
