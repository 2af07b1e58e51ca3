//! The `run` op: code in JavaScript, TypeScript (esbuild, then JavaScript), Python or bash,
//! each run a fresh process in a session of its own, marked `SANDBOXD_EXEC=<mark>`.
//!
//! For Node and Python one runtime process is kept started ahead ("warm"): booted and blocked
//! reading the path of its code file on stdin. A run takes it, writes the code file, hands it
//! the path and closes stdin; the agent starts the next one after the run. Warm processes are
//! spawned by one long-lived thread (PR_SET_PDEATHSIG is tied to the spawning thread) and die
//! with the agent.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::proto::{opt_u64, random_hex, Conn, Fail, Res, EXIT, STDERR, STDOUT};

pub const MARK_VAR: &str = "SANDBOXD_EXEC";
const MAX_CODE: usize = 32 << 20;
const MAX_TIMEOUT_MS: u64 = 3_600_000;
const MAX_OUTPUT: u64 = 64 << 20;

/// Runs the code file named on stdin as `node <file>` would (CommonJS main module, ESM for
/// .mjs, `require` resolving from the file's folder upwards). Before it waits, it warms what
/// nearly every run uses and a fresh node builds lazily (about 50 ms of CPU at the sandbox's
/// quota): the stdout/stderr streams, their write path (empty writes: nothing reaches the
/// pipes) and util's formatting behind console.log.
///
/// It also ends the process the way `process.exit()` does once the `exit` event has been
/// emitted, skipping node's environment teardown (about a quarter of a short run's CPU): the
/// output is already written (stdout and stderr are synchronous for pipes and files) and the
/// event loop is empty. Not after an uncaught exception: node emits `exit` before it prints
/// the error, so that path stays node's own.
const NODE_LOADER: &str = "'use strict';\n\
{\n\
  let fatal = false;\n\
  process.on('uncaughtExceptionMonitor', () => { fatal = true; });\n\
  const emit = process.emit;\n\
  process.emit = function (ev, code) {\n\
    const r = emit.apply(this, arguments);\n\
    if (ev === 'exit' && !fatal) process.reallyExit(process.exitCode ?? code ?? 0);\n\
    return r;\n\
  };\n\
}\n\
process.stdout.write('');\n\
process.stderr.write('');\n\
{ const u = require('util'); u.format('%s %d %j', 'a', 1, {}); u.inspect({ a: [1, 'x'], b: new Map() }); }\n\
process.argv[1] = require('fs').readFileSync(0, 'utf8');\n\
require('module').runMain();\n";

/// Runs the code file named on stdin as `python <file>` would, with the workspace (argv[1])
/// first on sys.path (in place of the loader's folder); tracebacks leave this loader out.
const PY_LOADER: &str = r#"import sys
import types
def _sandboxd_run():
    p = sys.stdin.buffer.read().decode('utf-8', 'surrogateescape')
    sys.path[0] = sys.argv[1]
    sys.argv = [p]
    m = types.ModuleType('__main__')
    m.__file__ = p
    m.__cached__ = None
    m.__builtins__ = __builtins__
    sys.modules['__main__'] = m
    try:
        with open(p, 'rb') as f:
            code = compile(f.read(), p, 'exec')
    except (SyntaxError, ValueError) as e:
        sys.excepthook(type(e), e, None)
        sys.exit(1)
    del f
    try:
        exec(code, m.__dict__)
    except SystemExit:
        raise
    except BaseException as e:
        t = e.__traceback__
        t = t.tb_next if t is not None else None
        sys.excepthook(type(e), e.with_traceback(t), t)
        sys.exit(1)
_sandboxd_run()
"#;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Rt {
    Node,
    Python,
}

/// A started process of one run (or a warm one waiting for its run).
struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: ChildStdout,
    stderr: ChildStderr,
    mark: String,
    interp: PathBuf,
}

pub struct Runner {
    root: PathBuf,
    node_loader: PathBuf,
    py_loader: PathBuf,
    agent_pid: i32,
    warm: Mutex<HashMap<Rt, Proc>>,
    refill: Mutex<Sender<Rt>>,
}

impl Runner {
    /// `runtime_dir`: a private folder for the Node loader file.
    pub fn new(root: PathBuf, runtime_dir: &Path) -> io::Result<&'static Runner> {
        fs::create_dir_all(runtime_dir)?;
        let write = |name: &str, text: &str| -> io::Result<PathBuf> {
            let path = runtime_dir.join(name);
            let tmp = runtime_dir.join(format!(".{name}.{}", random_hex(4)));
            fs::write(&tmp, text)?;
            fs::rename(&tmp, &path)?;
            Ok(path)
        };
        let node_loader = write("node-loader.js", NODE_LOADER)?;
        let py_loader = write("py-loader.py", PY_LOADER)?;
        let (tx, rx) = mpsc::channel::<Rt>();
        // SAFETY: getpid has no preconditions.
        let agent_pid = unsafe { libc::getpid() };
        let r: &'static Runner = Box::leak(Box::new(Runner {
            root,
            node_loader,
            py_loader,
            agent_pid,
            warm: Mutex::new(HashMap::new()),
            refill: Mutex::new(tx),
        }));
        thread::Builder::new()
            .name("warm-spawner".into())
            .spawn(move || {
                // Lives as long as the agent: the warm processes' parent-death signal follows it.
                while let Ok(rt) = rx.recv() {
                    if r.warm.lock().unwrap().contains_key(&rt) {
                        continue;
                    }
                    match r.spawn_runtime(rt) {
                        Ok(p) => {
                            let old = r.warm.lock().unwrap().insert(rt, p);
                            if let Some(old) = old {
                                discard(old);
                            }
                        }
                        Err(e) => crate::log(&format!("starting a warm {rt:?} runtime: {e}")),
                    }
                }
            })?;
        Ok(r)
    }

    fn python(&self) -> PathBuf {
        let venv = self.root.join(".venv/bin/python");
        if venv.exists() {
            venv
        } else {
            PathBuf::from("python3")
        }
    }

    fn command(&self, program: &Path, mark: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(&self.root).env(MARK_VAR, mark);
        let parent = self.agent_pid;
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                libc::setsid();
                libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                );
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        cmd
    }

    fn spawn_runtime(&self, rt: Rt) -> io::Result<Proc> {
        let mark = random_hex(16);
        let (interp, mut cmd) = match rt {
            Rt::Node => {
                let p = PathBuf::from("node");
                let mut c = self.command(&p, &mark);
                c.arg(&self.node_loader);
                (p, c)
            }
            Rt::Python => {
                let p = self.python();
                let mut c = self.command(&p, &mark);
                c.arg(&self.py_loader).arg(&self.root);
                (p, c)
            }
        };
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        Ok(Proc {
            stdin: child.stdin.take(),
            stdout: child.stdout.take().expect("piped"),
            stderr: child.stderr.take().expect("piped"),
            child,
            mark,
            interp,
        })
    }

    /// The warm process of `rt` when it is usable (`true`), else a fresh one (`false`).
    fn take(&self, rt: Rt) -> io::Result<(Proc, bool)> {
        let warm = self.warm.lock().unwrap().remove(&rt);
        if let Some(mut p) = warm {
            let alive = matches!(p.child.try_wait(), Ok(None));
            if alive && (rt != Rt::Python || p.interp == self.python()) {
                return Ok((p, true));
            }
            discard(p);
        }
        Ok((self.spawn_runtime(rt)?, false))
    }

    /// Gives an unused runtime back (a failed TypeScript compile), or drops it.
    fn give_back(&self, rt: Rt, p: Proc) {
        let mut w = self.warm.lock().unwrap();
        match w.entry(rt) {
            std::collections::hash_map::Entry::Occupied(_) => {
                drop(w);
                discard(p);
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(p);
            }
        }
    }

    fn refill(&self, rt: Rt) {
        let _ = self.refill.lock().unwrap().send(rt);
    }

    pub fn run(&self, h: &Value, c: &mut Conn) -> Res<()> {
        let lang = match h.get("language") {
            None | Some(Value::Null) => "javascript",
            Some(Value::String(s)) => s.as_str(),
            Some(_) => return Err(Fail::bad("\"language\" must be a string")),
        };
        let timeout = opt_u64(h, "timeoutMs")?
            .unwrap_or(10_000)
            .clamp(1, MAX_TIMEOUT_MS);
        let max_out = opt_u64(h, "maxOutput")?.unwrap_or(1 << 20).min(MAX_OUTPUT) as usize;
        match lang {
            "javascript" | "python" | "bash" => {}
            "typescript" => {
                if find_in_path("esbuild").is_none() {
                    return Err(Fail::new(
                        "unsupported_language",
                        "typescript needs esbuild, which is not installed here",
                    ));
                }
            }
            other => {
                return Err(Fail::new(
                    "unsupported_language",
                    format!("unknown language {other:?} (javascript, typescript, python, bash)"),
                ))
            }
        }
        c.body_done = false;
        let code = c.read_body(MAX_CODE)?;
        let start = Instant::now();
        let deadline = start + Duration::from_millis(timeout);
        let dir = self.root.join(".sandboxd/exec");
        fs::create_dir_all(&dir).map_err(|e| Fail::io(&e, "creating .sandboxd/exec"))?;

        let (rt, (mut proc, warm)) = match lang {
            "javascript" | "typescript" => (
                Some(Rt::Node),
                self.take(Rt::Node)
                    .map_err(|e| Fail::io(&e, "starting node"))?,
            ),
            "python" => (
                Some(Rt::Python),
                self.take(Rt::Python)
                    .map_err(|e| Fail::io(&e, "starting python"))?,
            ),
            _ => {
                let mark = random_hex(16);
                let file = dir.join(format!("{mark}.sh"));
                fs::write(&file, &code).map_err(|e| Fail::io(&e, "writing the code file"))?;
                let mut child = self
                    .command(Path::new("bash"), &mark)
                    .arg(&file)
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .map_err(|e| {
                        let _ = fs::remove_file(&file);
                        Fail::io(&e, "starting bash")
                    })?;
                let p = Proc {
                    stdin: None,
                    stdout: child.stdout.take().expect("piped"),
                    stderr: child.stderr.take().expect("piped"),
                    child,
                    mark,
                    interp: PathBuf::from("bash"),
                };
                (None, (p, false))
            }
        };
        let mark = proc.mark.clone();
        if c.head(json!({ "mark": mark, "warm": warm })).is_err() {
            // The client is gone: nothing to run for.
            match rt {
                Some(rt) if proc.stdin.is_some() => self.give_back(rt, proc),
                _ => {
                    kill_run(proc.child.id() as i32, &mark);
                    discard(proc);
                }
            }
            let _ = fs::remove_file(dir.join(format!("{mark}.sh")));
            return Ok(());
        }

        let mut file = dir.join(format!("{mark}.sh"));
        if let Some(rt) = rt {
            let (body, ext) = if lang == "typescript" {
                let tc = Instant::now();
                let compiled = self.esbuild(&code, &mark, deadline);
                crate::debug(|| format!("compiled in {:?}", tc.elapsed()));
                match compiled {
                    Compiled::Js(js, ext) => (js, ext),
                    Compiled::Failed(msg) => {
                        self.give_back(rt, proc);
                        let mut msg = msg;
                        let truncated = msg.len() > max_out;
                        msg.truncate(max_out);
                        if !msg.is_empty() {
                            let _ = c.frame(STDERR, &msg);
                        }
                        let exit = json!({"exitCode": 1, "signal": null, "timedOut": false,
                            "truncated": truncated, "durationMs": start.elapsed().as_millis() as u64});
                        let _ = c.json_frame(EXIT, &exit, true);
                        self.refill(rt);
                        return Ok(());
                    }
                    Compiled::TimedOut => {
                        self.give_back(rt, proc);
                        let exit = json!({"exitCode": null, "signal": null, "timedOut": true,
                            "truncated": false, "durationMs": start.elapsed().as_millis() as u64});
                        let _ = c.json_frame(EXIT, &exit, true);
                        return Ok(());
                    }
                }
            } else {
                let ext = if rt == Rt::Python { "py" } else { "js" };
                (code, ext)
            };
            file = dir.join(format!("{mark}.{ext}"));
            let given = fs::write(&file, &body).and_then(|()| {
                let mut stdin = proc.stdin.take().ok_or(io::ErrorKind::BrokenPipe)?;
                stdin.write_all(file.as_os_str().as_encoded_bytes())
            });
            if let Err(e) = given {
                kill_run(proc.child.id() as i32, &mark);
                discard(proc);
                let _ = fs::remove_file(&file);
                self.refill(rt);
                return Err(Fail::io(&e, "handing the code to the runtime"));
            }
        }

        crate::debug(|| format!("run {mark}: {lang} handed over after {:?}", start.elapsed()));
        let ooms = oom_kills();
        let out = stream(c, proc, deadline, max_out);
        let oom_killed = match (ooms, oom_kills()) {
            (Some(a), Some(b)) => b > a,
            _ => false,
        };
        let _ = fs::remove_file(&file);
        let exit = json!({
            "exitCode": if out.timed_out { None } else { out.status.and_then(|s| s.code()) },
            "signal": out.status.and_then(|s| s.signal()),
            "timedOut": out.timed_out,
            "truncated": out.truncated,
            "oomKilled": oom_killed,
            "durationMs": start.elapsed().as_millis() as u64,
        });
        if !out.client_gone {
            let _ = c.json_frame(EXIT, &exit, true);
        }
        crate::debug(|| format!("run {mark}: {exit}"));
        if let Some(rt) = rt {
            self.refill(rt);
        }
        Ok(())
    }

    fn esbuild(&self, code: &[u8], mark: &str, deadline: Instant) -> Compiled {
        let mut last_err = Vec::new();
        for format in ["cjs", "esm"] {
            let res = self.esbuild_once(code, mark, format, deadline);
            match res {
                Ok((true, js, _)) => {
                    return Compiled::Js(js, if format == "cjs" { "cjs" } else { "mjs" })
                }
                Ok((false, _, err)) => {
                    let text = String::from_utf8_lossy(&err);
                    let tla = text.contains("Top-level await") && text.contains("cjs");
                    last_err = err;
                    if !(format == "cjs" && tla) {
                        break;
                    }
                }
                Err(None) => return Compiled::TimedOut,
                Err(Some(e)) => return Compiled::Failed(format!("esbuild: {e}\n").into_bytes()),
            }
        }
        Compiled::Failed(last_err)
    }

    /// Ok((success, stdout, stderr)); Err(None) on timeout.
    #[allow(clippy::type_complexity)]
    fn esbuild_once(
        &self,
        code: &[u8],
        mark: &str,
        format: &str,
        deadline: Instant,
    ) -> Result<(bool, Vec<u8>, Vec<u8>), Option<io::Error>> {
        let t0 = Instant::now();
        let mut child = self
            .command(Path::new("esbuild"), mark)
            .args([
                "--loader=ts",
                "--platform=node",
                "--target=node20",
                "--log-level=error",
            ])
            .arg(format!("--format={format}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(Some)?;
        let mut stdin = child.stdin.take().expect("piped");
        let code = code.to_vec();
        let writer = thread::spawn(move || {
            let _ = stdin.write_all(&code);
        });
        let out = crate::files::capture(child.stdout.take().expect("piped"), MAX_CODE * 2);
        let err = crate::files::capture(child.stderr.take().expect("piped"), 64 * 1024);
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    crate::debug(|| format!("esbuild {format} took {:?}", t0.elapsed()));
                    let _ = writer.join();
                    let out = out.join().unwrap_or_default();
                    let err = err.join().unwrap_or_default();
                    return Ok((status.success(), out, err));
                }
                Ok(None) if Instant::now() >= deadline => {
                    kill_run(child.id() as i32, mark);
                    let _ = child.wait();
                    return Err(None);
                }
                Ok(None) => thread::sleep(Duration::from_millis(1)),
                Err(e) => return Err(Some(e)),
            }
        }
    }
}

enum Compiled {
    Js(Vec<u8>, &'static str),
    Failed(Vec<u8>),
    TimedOut,
}

/// Ends a process that will not be used: killed, reaped in the background.
fn discard(mut p: Proc) {
    let _ = p.child.kill();
    thread::spawn(move || {
        let _ = p.child.wait();
    });
}

pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

struct Outcome {
    status: Option<ExitStatus>,
    timed_out: bool,
    truncated: bool,
    client_gone: bool,
}

enum Msg {
    Out(u8, Vec<u8>),
    Eof,
    Exit(ExitStatus),
}

fn pipe_reader(mut r: impl Read + Send + 'static, kind: u8, tx: Sender<Msg>) {
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if tx.send(Msg::Out(kind, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let _ = tx.send(Msg::Eof);
    });
}

/// Forwards the run's output (each stream capped at `max_out`, the rest drained) until the
/// process exited and both pipes are closed, or the deadline passes (then everything of the
/// run is killed).
fn stream(c: &mut Conn, p: Proc, deadline: Instant, max_out: usize) -> Outcome {
    let Proc {
        mut child,
        stdout,
        stderr,
        mark,
        ..
    } = p;
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    pipe_reader(stdout, STDOUT, tx.clone());
    pipe_reader(stderr, STDERR, tx.clone());
    thread::spawn(move || {
        if let Ok(s) = child.wait() {
            let _ = tx.send(Msg::Exit(s));
        }
    });
    let mut o = Outcome {
        status: None,
        timed_out: false,
        truncated: false,
        client_gone: false,
    };
    let mut sent = [0usize; 3];
    let mut eofs = 0;
    let mut forward = |o: &mut Outcome, c: &mut Conn, kind: u8, data: &[u8]| {
        let room = max_out.saturating_sub(sent[kind as usize]);
        let n = data.len().min(room);
        if n < data.len() {
            o.truncated = true;
        }
        if n > 0 && !o.client_gone {
            sent[kind as usize] += n;
            if c.frame(kind, &data[..n]).is_err() {
                o.client_gone = true;
            }
        }
    };
    while !(o.client_gone || o.status.is_some() && eofs == 2) {
        let now = Instant::now();
        if now >= deadline {
            o.timed_out = true;
            break;
        }
        match rx.recv_timeout((deadline - now).min(Duration::from_millis(250))) {
            Ok(Msg::Out(k, d)) => forward(&mut o, c, k, &d),
            Ok(Msg::Eof) => eofs += 1,
            Ok(Msg::Exit(s)) => o.status = Some(s),
            Err(RecvTimeoutError::Timeout) => {
                if c.peer_closed() {
                    o.client_gone = true;
                }
            }
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    if o.timed_out || o.client_gone {
        kill_run(pid, &mark);
        // What the run wrote before it died, and its status.
        let until = Instant::now() + Duration::from_secs(2);
        while !(o.status.is_some() && eofs == 2) {
            let left = until.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Msg::Out(k, d)) => forward(&mut o, c, k, &d),
                Ok(Msg::Eof) => eofs += 1,
                Ok(Msg::Exit(s)) => o.status = Some(s),
                Err(_) => break,
            }
        }
    }
    o
}

/// The sandbox's count of processes killed by the kernel's OOM killer (cgroup v2
/// memory.events, else v1 memory.oom_control), when readable.
fn oom_kills() -> Option<u64> {
    for (file, key) in [
        ("/sys/fs/cgroup/memory.events", "oom_kill "),
        ("/sys/fs/cgroup/memory/memory.oom_control", "oom_kill "),
    ] {
        if let Ok(text) = fs::read_to_string(file) {
            if let Some(n) = text.lines().find_map(|l| l.strip_prefix(key)) {
                return n.trim().parse().ok();
            }
        }
    }
    None
}

/// One process as /proc shows it.
struct ProcInfo {
    ppid: i32,
    sid: i32,
    zombie: bool,
}

fn proc_info(pid: i32) -> Option<ProcInfo> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    Some(ProcInfo {
        zombie: matches!(f.first(), Some(&"Z") | Some(&"X")),
        ppid: f.get(1)?.parse().ok()?,
        sid: f.get(3)?.parse().ok()?,
    })
}

fn marked(pid: i32, needle: &[u8]) -> bool {
    let Ok(env) = fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    env.split(|&b| b == 0).any(|e| e == needle)
}

fn all_pids() -> Vec<i32> {
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|d| d.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Stops and kills the run's session (`sid`, led by the run's first process), every process
/// carrying the mark, the sessions those lead, and all their descendants; passes repeat
/// until one finds nothing left alive.
pub fn kill_run(sid: i32, mark: &str) {
    let needle = format!("{MARK_VAR}={mark}").into_bytes();
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    for _ in 0..100 {
        let mut info = HashMap::new();
        for pid in all_pids() {
            if pid > 1 && pid != me {
                if let Some(i) = proc_info(pid) {
                    info.insert(pid, i);
                }
            }
        }
        let mut sessions: HashSet<i32> = HashSet::from([sid]);
        let mut take: HashSet<i32> = HashSet::new();
        for (&pid, i) in &info {
            if !i.zombie && marked(pid, &needle) {
                take.insert(pid);
                if i.sid == pid {
                    sessions.insert(pid);
                }
            }
        }
        for (&pid, i) in &info {
            if sessions.contains(&i.sid) {
                take.insert(pid);
            }
        }
        loop {
            let before = take.len();
            for (&pid, i) in &info {
                if take.contains(&i.ppid) {
                    take.insert(pid);
                }
            }
            if take.len() == before {
                break;
            }
        }
        take.retain(|p| info.get(p).is_some_and(|i| !i.zombie));
        if take.is_empty() {
            return;
        }
        for &p in &take {
            // SAFETY: plain signals to pids read from /proc.
            unsafe { libc::kill(p, libc::SIGSTOP) };
        }
        for &p in &take {
            // SAFETY: as above.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        thread::sleep(Duration::from_millis(5));
    }
}
