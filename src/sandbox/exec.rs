//! Code execution: the code travels as bytes on the exec's stdin (never inside a shell string
//! or an argument, so there is no size limit and no quoting), is written to a file under
//! /workspace/.sandboxd/exec by `cat`, and runs with `node` in a session of its own. On timeout
//! the whole session is killed (descendants that ignore SIGTERM or fork included); stdout and
//! stderr are each capped while the rest is drained and dropped, so memory stays flat.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use super::docker::{Engine, ExecOutput, ExecSpec};
use super::shell::Script;
use crate::config::Config;

/// Marks every process of one run (value: the run id). Inherited through fork and exec, so it
/// finds descendants that left the run's session (`setsid`, `detached: true`).
pub const MARK_VAR: &str = "SANDBOXD_EXEC";

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

pub(super) async fn run_code(
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
                // `setsid -w` makes bash the leader of a new session, the one the killer takes.
                cmd: ["setsid".into(), "-w".into()]
                    .into_iter()
                    .chain(Script::ExecRun.argv(std::slice::from_ref(&run_id)))
                    .collect(),
                env: vec![format!("{MARK_VAR}={run_id}")],
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
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(None) => break,
            Err(_) => {
                res.timed_out = true;
                break;
            }
        }
    }
    if res.timed_out {
        // From the host first: it works even when the run filled the pids limit (a fork
        // bomb), where no exec can start in the container. The execs below then sweep again
        // and remove the run's files (or do the whole job when the host cannot see the
        // container's processes).
        let (cid, rid) = (container.to_owned(), run_id.clone());
        match tokio::task::spawn_blocking(move || kill_run_from_host(&cid, &rid)).await {
            Ok(Some(n)) => tracing::debug!(killed = n, "timed-out run killed from the host"),
            Ok(None) => tracing::debug!("the container's processes are not visible here"),
            Err(e) => tracing::warn!(error = %e, "host-side kill task"),
        }
        // The run's own session and every process marked with its id (see kill.sh).
        let kill = [MARK_VAR.into(), run_id.clone(), "led".into(), "0.05".into()];
        let killed = engine.run(container, Script::Kill.argv(&kill)).await;
        let killed = match killed {
            Ok(_) => {
                engine
                    .run(container, Script::ExecForget.argv(&[run_id]))
                    .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = killed {
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

/// The host's list of a container's processes (cgroup v1 pids controller, or v2).
fn container_procs_file(container_id: &str) -> Option<std::path::PathBuf> {
    [
        format!("/sys/fs/cgroup/pids/docker/{container_id}/cgroup.procs"),
        format!("/sys/fs/cgroup/system.slice/docker-{container_id}.scope/cgroup.procs"),
        format!("/sys/fs/cgroup/docker/{container_id}/cgroup.procs"),
    ]
    .into_iter()
    .map(std::path::PathBuf::from)
    .find(|p| p.exists())
}

/// `(ppid, session id)` of a host pid, from /proc/<pid>/stat.
fn proc_stat(pid: i32) -> Option<(i32, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain anything, ')' included: fields start after the last one.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some((f.get(1)?.parse().ok()?, f.get(3)?.parse().ok()?))
}

fn carries(pid: i32, mark: &[u8]) -> bool {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|env| env.split(|b| *b == 0).any(|e| e == mark))
        .unwrap_or(false)
}

/// Kills one run's processes from the host: those in the container's cgroup that carry the
/// run's mark, the sessions they lead and every descendant. Targets are stopped (SIGSTOP) as
/// they are found, so none can fork or be re-parented while the set grows, then all are
/// killed. `None` when the container's processes are not visible from here.
pub(super) fn kill_run_from_host(container_id: &str, run_id: &str) -> Option<usize> {
    use std::collections::{HashMap, HashSet};
    let procs = container_procs_file(container_id)?;
    let mark = format!("{MARK_VAR}={run_id}").into_bytes();
    let in_container = |pid: i32| {
        // The pid is ours to signal only if /proc (this pid namespace) shows it in the cgroup.
        std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .is_ok_and(|c| c.contains(container_id))
    };
    let mut taken: HashSet<i32> = HashSet::new();
    for _round in 0..64 {
        let text = std::fs::read_to_string(&procs).ok()?;
        let mut table: HashMap<i32, (i32, i32)> = HashMap::new();
        for pid in text.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            if let Some(ps) = proc_stat(pid) {
                table.insert(pid, ps);
            }
        }
        let mut found: HashSet<i32> = taken.clone();
        for &pid in table.keys() {
            if carries(pid, &mark) {
                found.insert(pid);
            }
        }
        // Sessions led by a marked process (the runner's own, and any a child made).
        let leaders: HashSet<i32> = found
            .iter()
            .copied()
            .filter(|p| table.get(p).is_some_and(|(_, sid)| sid == p))
            .collect();
        for (&pid, &(_, sid)) in &table {
            if leaders.contains(&sid) {
                found.insert(pid);
            }
        }
        loop {
            let before = found.len();
            for (&pid, &(ppid, _)) in &table {
                if found.contains(&ppid) {
                    found.insert(pid);
                }
            }
            if found.len() == before {
                break;
            }
        }
        let new: Vec<i32> = found
            .difference(&taken)
            .copied()
            .filter(|p| *p > 1 && in_container(*p))
            .collect();
        if new.is_empty() {
            break;
        }
        for &pid in &new {
            // SAFETY: kill(2) with a pid read from the container's cgroup and checked above.
            unsafe { libc::kill(pid, libc::SIGSTOP) };
        }
        taken.extend(new);
    }
    for &pid in &taken {
        // SAFETY: as above; stopped processes die on SIGKILL.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    Some(taken.len())
}

/// The container cgroup's OOM-kill counter, read from the host (cgroup v1 or v2); `None` when
/// the cgroup cannot be found (e.g. sandboxd runs in a container of its own).
pub(super) fn oom_kills(container_id: &str) -> Option<u64> {
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
        // The run id reaches the scripts only as "$1"/"$2"; nothing is formatted into them.
        assert!(!Script::ExecRun.source().contains('{'));
        assert!(Script::Kill
            .source()
            .contains("case \"$id\" in '' | *[!0-9a-f]*) exit 2"));
    }
}
