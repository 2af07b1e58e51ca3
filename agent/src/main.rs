//! sandboxd-agent: the small supervisor inside every sandbox (docs/agent-protocol.md). It runs
//! code with warm runtimes and serves the files API to the edge over TCP, one request per
//! connection, every request carrying the sandbox's key.
//!
//!   sandboxd-agent [--listen ADDR] [--replace]
//!   sandboxd-agent --version
//!
//! `--listen` defaults to 0.0.0.0:49983; once bound the agent prints `listening on <addr>`.
//! `--replace` first kills whatever process of ours listens on that port and any other
//! sandboxd-agent (of the same workspace), binds, then runs on as a daemon (own session,
//! output to /tmp/sandboxd-agent.log); the command exits 0 once the daemon is ready to accept.
//! Env: SANDBOXD_AGENT_KEY (required; removed from the environment of everything the agent
//! starts), SANDBOXD_AGENT_ROOT (default /workspace), SANDBOXD_AGENT_DEBUG (log run timings),
//! SANDBOXD_INIT_DONE_FILE and SANDBOXD_DEV_PID_FILE (the init's files the `app` op reads;
//! defaults /tmp/sandboxd-init.done and /tmp/sandboxd-dev.pid, overridden by the tests).

mod app;
mod files;
mod paths;
mod proto;
mod replace;
mod run;
mod watch;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use paths::Root;
use proto::{ct_eq, Conn, Fail, MAGIC, MAX_LINE};
use run::Runner;

const VERSION: &str = env!("CARGO_PKG_VERSION");
const DEFAULT_LISTEN: &str = "0.0.0.0:49983";
const MAX_CONNS: usize = 64;
const HEAD_TIME: Duration = Duration::from_secs(5);
const LOG_FILE: &str = "/tmp/sandboxd-agent.log";
const LOG_MAX: u64 = 1 << 20;

static LOG_LINES: AtomicUsize = AtomicUsize::new(0);

/// One line to stderr (the log file when daemonized), truncated when it grows over 1 MiB.
pub fn log(msg: &str) {
    if LOG_LINES.fetch_add(1, Ordering::Relaxed).is_multiple_of(64) {
        // SAFETY: fstat/ftruncate on fd 2 with a zeroed stat we own.
        unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstat(2, &mut st) == 0
                && (st.st_mode & libc::S_IFMT) == libc::S_IFREG
                && st.st_size as u64 > LOG_MAX
            {
                libc::ftruncate(2, 0);
            }
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let _ = writeln!(std::io::stderr(), "[sandboxd-agent {now}] {msg}");
}

/// A log line only when SANDBOXD_AGENT_DEBUG is set (timings of runs).
pub fn debug(msg: impl FnOnce() -> String) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("SANDBOXD_AGENT_DEBUG").is_some()) {
        log(&msg());
    }
}

struct Shared {
    key: Vec<u8>,
    root: Root,
    runner: &'static Runner,
    conns: AtomicUsize,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut listen = DEFAULT_LISTEN.to_string();
    let mut replace = false;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--version" | "-V" => {
                println!("sandboxd-agent {VERSION} (protocol 1)");
                return;
            }
            "--listen" if i + 1 < args.len() => {
                listen = args[i + 1].clone();
                i += 1;
            }
            "--replace" => replace = true,
            "-h" | "--help" => {
                println!("usage: sandboxd-agent [--listen ADDR] [--replace] | --version");
                return;
            }
            other => die(&format!("unknown argument {other:?}")),
        }
        i += 1;
    }
    let key = std::env::var("SANDBOXD_AGENT_KEY").unwrap_or_default();
    // Before any thread exists: nothing the agent starts inherits the key.
    std::env::remove_var("SANDBOXD_AGENT_KEY");
    if key.len() < 16 {
        die("SANDBOXD_AGENT_KEY is not set (at least 16 characters)");
    }
    let root_dir = std::env::var_os("SANDBOXD_AGENT_ROOT")
        .map(PathBuf::from)
        .unwrap_or("/workspace".into());
    let root = Root::new(&root_dir)
        .unwrap_or_else(|e| die(&format!("workspace {}: {e}", root_dir.display())));

    if replace {
        replace::kill_others(&listen);
    }
    let listener = bind(&listen, if replace { 40 } else { 1 });
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or(listen.clone());
    let ready = if replace {
        Some(replace::daemonize(&addr))
    } else {
        None
    };

    replace::clean_runtime_dirs();
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    let runtime_dir = std::env::temp_dir().join(format!("sandboxd-agent.{pid}"));
    let runner = Runner::new(root.path.clone(), &runtime_dir)
        .unwrap_or_else(|e| die(&format!("runtime folder {}: {e}", runtime_dir.display())));
    let shared = Arc::new(Shared {
        key: key.into_bytes(),
        root,
        runner,
        conns: AtomicUsize::new(0),
    });

    match ready {
        Some(fd) => replace::signal_ready(fd),
        None => {
            println!("listening on {addr}");
            let _ = std::io::stdout().flush();
        }
    }
    log(&format!(
        "listening on {addr}, workspace {}",
        shared.root.path.display()
    ));
    for s in listener.incoming() {
        let s = match s {
            Ok(s) => s,
            Err(e) => {
                log(&format!("accept: {e}"));
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if shared.conns.fetch_add(1, Ordering::SeqCst) >= MAX_CONNS {
            shared.conns.fetch_sub(1, Ordering::SeqCst);
            busy(s);
            continue;
        }
        let sh = shared.clone();
        let spawned = thread::Builder::new().stack_size(1 << 20).spawn(move || {
            let conn = Conn::new(s);
            serve(&sh, conn);
            sh.conns.fetch_sub(1, Ordering::SeqCst);
        });
        if let Err(e) = spawned {
            shared.conns.fetch_sub(1, Ordering::SeqCst);
            log(&format!("no thread for a connection: {e}"));
        }
    }
}

fn die(msg: &str) -> ! {
    eprintln!("sandboxd-agent: {msg}");
    std::process::exit(1);
}

fn bind(addr: &str, tries: u32) -> TcpListener {
    let mut last = None;
    for _ in 0..tries {
        match TcpListener::bind(addr) {
            Ok(l) => return l,
            Err(e) => {
                last = Some(e);
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
    die(&format!(
        "cannot listen on {addr}: {}",
        last.map(|e| e.to_string()).unwrap_or_default()
    ))
}

fn busy(mut s: TcpStream) {
    let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
    let _ = s.write_all(b"{\"ok\":false,\"code\":\"busy\",\"message\":\"too many connections\"}\n");
}

fn serve(sh: &Shared, mut c: Conn) {
    let deadline = Instant::now() + HEAD_TIME;
    let head = match read_head(&mut c, deadline) {
        Ok(h) => h,
        Err(f) => {
            c.report(&f);
            return;
        }
    };
    let given = head.get("key").and_then(Value::as_str).unwrap_or("");
    if !ct_eq(given.as_bytes(), &sh.key) {
        // unauthorized: no head, just close.
        return;
    }
    let op = head
        .get("op")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if matches!(op.as_str(), "run" | "write" | "untar") {
        c.body_done = false;
    }
    let r = match op.as_str() {
        "hello" => {
            // SAFETY: getpid has no preconditions.
            let pid = unsafe { libc::getpid() };
            let _ = c.head(json!({"agent": "sandboxd-agent", "version": 1, "pid": pid}));
            Ok(())
        }
        "app" => app::app(&mut c),
        "run" => sh.runner.run(&head, &mut c),
        "stat" => files::stat(&sh.root, &head, &mut c),
        "list" => files::list(&sh.root, &head, &mut c),
        "read" => files::read(&sh.root, &head, &mut c),
        "write" => files::write(&sh.root, &head, &mut c),
        "remove" => files::remove(&sh.root, &head, &mut c),
        "move" => files::rename(&sh.root, &head, &mut c),
        "mkdir" => files::mkdir(&sh.root, &head, &mut c),
        "tar" => files::tar(&sh.root, &head, &mut c),
        "untar" => files::untar(&sh.root, &head, &mut c),
        "watch" => watch::watch(&sh.root, &head, &mut c),
        "" => Err(Fail::bad("\"op\" is required")),
        other => Err(Fail::bad(format!("unknown op {other:?}"))),
    };
    if let Err(f) = r {
        c.report(&f);
        if !c.body_done {
            c.linger();
        }
    }
}

fn read_head(c: &mut Conn, deadline: Instant) -> Result<Value, Fail> {
    let magic = c.read_line(MAGIC.len(), deadline)?;
    if magic != MAGIC {
        return Err(Fail::bad("expected the line SANDBOXD-AGENT/1"));
    }
    let line = c.read_line(MAX_LINE, deadline)?;
    match serde_json::from_slice::<Value>(&line) {
        Ok(v @ Value::Object(_)) => Ok(v),
        _ => Err(Fail::bad("the request head must be one JSON object")),
    }
}
