//! `--replace`: find and kill whatever process of ours listens on the agent's port (and any
//! other sandboxd-agent of the same workspace), then run on as a daemon once bound.

use std::collections::HashSet;
use std::fs;
use std::os::fd::RawFd;
use std::thread;
use std::time::{Duration, Instant};

use crate::{die, LOG_FILE, LOG_MAX};

fn port_of(listen: &str) -> Option<u16> {
    listen.rsplit(':').next()?.parse().ok()
}

/// Socket inodes listening on `port` (IPv4 and IPv6).
fn listening_inodes(port: u16) -> HashSet<String> {
    let mut out = HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != "0A" {
                continue;
            }
            let p = f[1]
                .rsplit(':')
                .next()
                .and_then(|h| u16::from_str_radix(h, 16).ok());
            if p == Some(port) && f[9] != "0" {
                out.insert(format!("socket:[{}]", f[9]));
            }
        }
    }
    out
}

fn uid_of(pid: i32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn env_value(pid: i32, name: &str) -> Option<Vec<u8>> {
    let env = fs::read(format!("/proc/{pid}/environ")).ok()?;
    let prefix = format!("{name}=");
    env.split(|&b| b == 0)
        .find(|e| e.starts_with(prefix.as_bytes()))
        .map(|e| e[prefix.len()..].to_vec())
}

fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s.rfind(')').and_then(|i| s.get(i + 2..i + 3)).unwrap_or("");
            state != "Z" && state != "X"
        }
        Err(_) => false,
    }
}

pub fn kill_others(listen: &str) {
    let Some(port) = port_of(listen) else {
        die(&format!("bad listen address {listen:?}"))
    };
    // SAFETY: no preconditions.
    let (me, uid) = unsafe { (libc::getpid(), libc::getuid()) };
    let my_root = std::env::var_os("SANDBOXD_AGENT_ROOT").map(|v| v.into_encoded_bytes());
    let inodes = listening_inodes(port);
    let mut victims = Vec::new();
    for d in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = d.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid <= 1 || pid == me || uid_of(pid) != Some(uid) {
            continue;
        }
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let other_agent =
            comm.trim_end() == "sandboxd-agent" && env_value(pid, "SANDBOXD_AGENT_ROOT") == my_root;
        let listens = !inodes.is_empty()
            && fs::read_dir(format!("/proc/{pid}/fd"))
                .into_iter()
                .flatten()
                .flatten()
                .any(|fd| {
                    fs::read_link(fd.path())
                        .map(|l| inodes.contains(l.to_string_lossy().as_ref()))
                        .unwrap_or(false)
                });
        if other_agent || listens {
            victims.push(pid);
        }
    }
    for &p in &victims {
        // SAFETY: a signal to a pid of our uid.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    let until = Instant::now() + Duration::from_secs(3);
    while victims.iter().any(|&p| alive(p)) && Instant::now() < until {
        thread::sleep(Duration::from_millis(10));
    }
}

/// Forks: the parent waits until the child reports ready (then prints `listening on` and
/// exits 0) or fails (exits 1); the child leaves the session and sends its output to the log.
/// Returns the child's end of the ready pipe.
pub fn daemonize(addr: &str) -> RawFd {
    let mut fds = [0; 2];
    // SAFETY: a pipe into our array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        die("pipe failed");
    }
    // SAFETY: single-threaded here (no thread started yet).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        die("fork failed");
    }
    if pid > 0 {
        // SAFETY: closing our copy of the write end; reading into our byte.
        unsafe { libc::close(fds[1]) };
        let mut b = 0u8;
        let n = unsafe { libc::read(fds[0], (&mut b as *mut u8).cast(), 1) };
        if n == 1 && b == b'1' {
            println!("listening on {addr}");
            std::process::exit(0);
        }
        eprintln!("sandboxd-agent: the daemon failed to start (see {LOG_FILE})");
        std::process::exit(1);
    }
    // SAFETY: child side: plain syscalls on our own descriptors.
    unsafe {
        libc::close(fds[0]);
        libc::setsid();
        let _ = libc::chdir(c"/".as_ptr());
        let big = fs::metadata(LOG_FILE)
            .map(|m| m.len() > LOG_MAX)
            .unwrap_or(false);
        let mut flags = libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND | libc::O_CLOEXEC;
        if big {
            flags |= libc::O_TRUNC;
        }
        let log = libc::open(c"/tmp/sandboxd-agent.log".as_ptr(), flags, 0o600);
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            libc::dup2(null, 0);
        }
        let out = if log >= 0 { log } else { null };
        if out >= 0 {
            libc::dup2(out, 1);
            libc::dup2(out, 2);
        }
    }
    fds[1]
}

pub fn signal_ready(fd: RawFd) {
    // SAFETY: writing one byte to our pipe end, then closing it.
    unsafe {
        libc::write(fd, b"1".as_ptr().cast(), 1);
        libc::close(fd);
    }
}

/// Removes the runtime folders of agents that are gone.
pub fn clean_runtime_dirs() {
    let tmp = std::env::temp_dir();
    for d in fs::read_dir(&tmp).into_iter().flatten().flatten() {
        let name = d.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("sandboxd-agent."))
        else {
            continue;
        };
        let Ok(pid) = pid.parse::<i32>() else {
            continue;
        };
        if !alive(pid) {
            let _ = fs::remove_dir_all(d.path());
        }
    }
}
