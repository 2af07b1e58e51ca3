//! Code execution through the sandbox's agent (see agent/ and docs/agent-protocol.md): the
//! code travels as the body of a `run` request (bytes, never inside a shell string or an
//! argument), the agent runs it in a fresh process of its own session (from a warm runtime for
//! JavaScript and Python) and streams its output. On timeout the agent kills every process of
//! the run; the edge also kills them from the host by the run's mark, and keeps its own
//! deadline (the timeout plus [`AGENT_GRACE`]) against an agent that stopped answering. stdout
//! and stderr are each capped by the agent and again here, so memory stays flat.

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};

use super::agent::{AgentBody, AgentError, Frame};
use super::shell::Door;
use super::SandboxError;
use crate::config::Config;

/// Marks every process of one run (value: the run's mark). Inherited through fork and exec, so
/// it finds descendants that left the run's session (`setsid`, `detached: true`).
pub const MARK_VAR: &str = "SANDBOXD_EXEC";

/// How long past a run's timeout the edge waits for the agent's answer before it kills the run
/// itself and answers it as timed out.
pub const AGENT_GRACE: Duration = Duration::from_secs(3);

/// The languages `POST /sandbox/execute` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Language {
    #[default]
    JavaScript,
    TypeScript,
    Python,
    Bash,
}

impl Language {
    pub const ALL: [Language; 4] = [
        Language::JavaScript,
        Language::TypeScript,
        Language::Python,
        Language::Bash,
    ];

    pub fn parse(s: &str) -> Option<Language> {
        Language::ALL.into_iter().find(|l| l.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Language::JavaScript => "javascript",
            Language::TypeScript => "typescript",
            Language::Python => "python",
            Language::Bash => "bash",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ExecRequest {
    pub code: Vec<u8>,
    pub timeout: Duration,
    pub language: Language,
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

/// Reads the agent's `EXIT` object into `res`: a process ended by a signal gets the shell's
/// code (128 + signal), as `docker exec` reported before; a timed-out run has no code.
fn apply_exit(res: &mut ExecResult, exit: &Value) {
    res.timed_out |= exit["timedOut"].as_bool().unwrap_or(false);
    res.truncated |= exit["truncated"].as_bool().unwrap_or(false);
    res.exit_code = if res.timed_out {
        None
    } else {
        exit["exitCode"]
            .as_i64()
            .or_else(|| exit["signal"].as_i64().map(|s| 128 + s))
    };
}

/// Whether `mark` is what the agent makes (32 hex characters): it reaches /proc matching only.
fn valid_mark(mark: &str) -> bool {
    mark.len() == 32 && mark.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Refusals of a run that come from the state of the user's own workspace.
const USER_CAUSED: [&str; 6] = [
    "io_error",
    "permission_denied",
    "invalid_path",
    "outside_workspace",
    "not_a_directory",
    "exists",
];

/// How a run's stream ended, besides its frames.
enum Ending {
    /// `END` after `EXIT`.
    Done,
    /// The connection broke after the head.
    Lost(String),
    /// No end by the edge's own deadline.
    Stuck,
    /// The agent could not start the program for a reason of the user's workspace.
    NotStarted(String),
}

pub(super) async fn run_code(
    door: &Door,
    req: ExecRequest,
    cfg: &Config,
) -> Result<ExecResult, SandboxError> {
    let container = door.container.clone();
    let oom_before = oom_kills(&container);
    let started = Instant::now();
    let cap = cfg.exec_max_output_bytes;
    let op = json!({
        "op": "run",
        "language": req.language.as_str(),
        "timeoutMs": req.timeout.as_millis() as u64,
        "maxOutput": cap,
    });
    let call = door
        .agent_call(op, Some(AgentBody::Bytes(Bytes::from(req.code))))
        .await;
    let mut call = match call {
        Ok(c) => c,
        // The workspace keeps the run from starting (a `.sandboxd` the user replaced by a link
        // or a file, a full disk): the user's to fix, answered like a program that could not
        // be executed (126), with the reason on stderr.
        Err(AgentError::Refused { code, message }) if USER_CAUSED.contains(&code.as_str()) => {
            return Ok(ExecResult {
                stderr: format!("sandboxd: the run could not start: {code}: {message}\n")
                    .into_bytes(),
                exit_code: Some(126),
                duration_ms: started.elapsed().as_millis() as u64,
                ..ExecResult::default()
            });
        }
        Err(AgentError::Refused { code, message }) if code == "busy" => {
            return Err(SandboxError::AgentUnavailable(message))
        }
        Err(AgentError::Refused { code, message }) => {
            return Err(SandboxError::Internal(anyhow::anyhow!(
                "the sandbox agent refused the run: {code}: {message}"
            )))
        }
        Err(e) => return Err(e.into()),
    };
    let mark = call.head["mark"].as_str().unwrap_or("").to_owned();
    let mut res = ExecResult::default();
    let deadline = tokio::time::Instant::now() + req.timeout + AGENT_GRACE;
    let mut exited = false;
    let ending = loop {
        match tokio::time::timeout_at(deadline, call.next()).await {
            Ok(Ok(Some(Frame::Stdout(b)))) => {
                res.truncated |= append_capped(&mut res.stdout, &b, cap);
            }
            Ok(Ok(Some(Frame::Stderr(b)))) => {
                res.truncated |= append_capped(&mut res.stderr, &b, cap);
            }
            Ok(Ok(Some(Frame::Exit(v)))) => {
                apply_exit(&mut res, &v);
                exited = true;
            }
            Ok(Ok(Some(_))) => {}
            Ok(Ok(None)) if exited => break Ending::Done,
            Ok(Ok(None)) => break Ending::Lost("the run ended without its exit".into()),
            Ok(Err(AgentError::Refused { code, message }))
                if !exited && USER_CAUSED.contains(&code.as_str()) =>
            {
                break Ending::NotStarted(format!("{code}: {message}"))
            }
            Ok(Err(AgentError::Refused { code, message })) => {
                break Ending::Lost(format!("the agent failed the run: {code}: {message}"))
            }
            Ok(Err(e)) => break Ending::Lost(e.to_string()),
            Err(_) => break Ending::Stuck,
        }
    };
    // Closing the connection makes the agent kill the run (if it still can).
    drop(call);
    let clean = matches!(ending, Ending::Done | Ending::NotStarted(_)) && !res.timed_out;
    if !clean && valid_mark(&mark) {
        // From the host too: it works even when the run filled the pids limit (a fork bomb) or
        // the agent is stuck or gone.
        let (cid, m) = (container.clone(), mark.clone());
        match tokio::task::spawn_blocking(move || kill_run_from_host(&cid, &m)).await {
            Ok(Some(n)) => tracing::debug!(killed = n, "run killed from the host"),
            Ok(None) => tracing::debug!("the container's processes are not visible here"),
            Err(e) => tracing::warn!(error = %e, "host-side kill task"),
        }
    }
    res.duration_ms = started.elapsed().as_millis() as u64;
    if let (Some(before), Some(after)) = (oom_before, oom_kills(&container)) {
        res.oom_killed = after > before;
    }
    match ending {
        Ending::Done => {}
        Ending::NotStarted(why) => {
            res.stderr.extend_from_slice(
                format!("sandboxd: the run could not start: {why}\n").as_bytes(),
            );
            res.exit_code = Some(126);
        }
        Ending::Stuck => {
            tracing::warn!("the agent did not end a run by its deadline; killed from the host");
            res.timed_out = true;
            res.exit_code = None;
        }
        // The memory limit took the run (or the agent with it): an answer, not an error.
        Ending::Lost(_) if res.oom_killed => res.exit_code = Some(137),
        Ending::Lost(why) => return Err(SandboxError::AgentUnavailable(why)),
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
    fn languages_parse_and_exits_read() {
        for l in Language::ALL {
            assert_eq!(Language::parse(l.as_str()), Some(l));
        }
        assert_eq!(Language::parse("JavaScript"), None);
        assert_eq!(Language::parse("ruby"), None);
        let mut r = ExecResult::default();
        apply_exit(
            &mut r,
            &json!({"exitCode": 3, "signal": null, "timedOut": false}),
        );
        assert_eq!(r.exit_code, Some(3));
        apply_exit(
            &mut r,
            &json!({"exitCode": null, "signal": 9, "timedOut": false}),
        );
        assert_eq!(r.exit_code, Some(137));
        apply_exit(
            &mut r,
            &json!({"exitCode": null, "timedOut": true, "truncated": true}),
        );
        assert_eq!((r.exit_code, r.timed_out, r.truncated), (None, true, true));
        assert!(valid_mark("0123456789abcdef0123456789abcdef"));
        assert!(!valid_mark("0123456789abcdef0123456789abcde'"));
        assert!(!valid_mark(""));
    }
}
