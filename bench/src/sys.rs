//! The machine and its processes: child processes with pid files (so `bench/run` can end them
//! if the bench dies), memory figures from /proc and the cgroup tree, version strings.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// Raises the open-files limit (soft, up to the hard limit) for this process and its children.
pub fn raise_nofile(want: u64) -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        let target = want.min(r.rlim_max);
        if r.rlim_cur < target {
            r.rlim_cur = target;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        }
    }
    r.rlim_cur
}

fn proc_status_kib(pid: u32, field: &str) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    kib_field(&text, field).with_context(|| format!("{field} in /proc/{pid}/status"))
}

fn kib_field(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .and_then(|l| l[field.len() + 1..].split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Resident set size of a process, KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    proc_status_kib(pid, "VmRSS")
}

/// Peak resident set size of a process, KiB.
pub fn hwm_kib(pid: u32) -> Result<u64> {
    proc_status_kib(pid, "VmHWM")
}

/// Number of open file descriptors of a process.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

pub fn meminfo_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| kib_field(&t, field))
        .unwrap_or(0)
}

pub fn nproc() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

pub fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The first non-empty line a command prints (stdout, else stderr), or "n/a".
pub fn first_line(cmd: &str, args: &[&str]) -> String {
    let Ok(out) = std::process::Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
    else {
        return "n/a".into();
    };
    let pick = |b: &[u8]| {
        String::from_utf8_lossy(b)
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(str::to_owned)
    };
    pick(&out.stdout)
        .or_else(|| pick(&out.stderr))
        .unwrap_or_else(|| "n/a".into())
}

/// A child process of the bench. Its pid is written to `<pids>/<name>.pid` while it runs, and
/// it is killed when dropped.
pub struct Proc {
    pub name: String,
    child: tokio::process::Child,
    pid: u32,
    pidfile: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut tokio::process::Command, pids: &Path) -> Result<Proc> {
        cmd.kill_on_drop(true).stdin(Stdio::null());
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        let pid = child.id().context("child has no pid")?;
        std::fs::create_dir_all(pids)?;
        let pidfile = pids.join(format!("{name}.pid"));
        std::fs::write(&pidfile, format!("{pid}\n"))?;
        Ok(Proc {
            name: name.to_owned(),
            child,
            pid,
            pidfile,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Fails when the process has already exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!("{} exited early: {st}", self.name);
        }
        Ok(())
    }

    /// Sends `sig`, waits up to `grace`, then SIGKILL.
    pub async fn stop(mut self, sig: i32, grace: Duration) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: signalling our own child by its pid.
            unsafe {
                libc::kill(self.pid as i32, sig);
            }
            if tokio::time::timeout(grace, self.child.wait())
                .await
                .is_err()
            {
                let _ = self.child.start_kill();
                let _ = self.child.wait().await;
            }
        }
        let _ = std::fs::remove_file(&self.pidfile);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_file(&self.pidfile);
    }
}

/// CPU time (user + system) of a process and its direct children, ms.
pub fn tree_cpu_ms(root: u32) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let stat = |pid: &str| -> Option<(u32, f64)> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name, which may contain spaces: state is field 3.
        let rest = &text[text.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ppid = f.get(1)?.parse().ok()?;
        let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
        Some((ppid, ticks * 1000.0 / tck))
    };
    let mut total = stat(&root.to_string()).map_or(0.0, |(_, t)| t);
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let name = e.file_name();
            let Some(pid) = name
                .to_str()
                .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            if let Some((ppid, t)) = stat(pid) {
                if ppid == root {
                    total += t;
                }
            }
        }
    }
    total
}

/// Memory charged to a container's cgroup: (usage incl. page cache, anonymous), bytes.
pub fn cgroup_memory(id: &str) -> Option<(u64, u64)> {
    let read = |p: String| std::fs::read_to_string(p).ok();
    let stat_field = |text: &str, name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    };
    // cgroup v1 (cgroupfs driver, as dockerd runs here without systemd).
    for base in [
        format!("/sys/fs/cgroup/memory/docker/{id}"),
        format!("/sys/fs/cgroup/memory/system.slice/docker-{id}.scope"),
    ] {
        if let (Some(u), Some(s)) = (
            read(format!("{base}/memory.usage_in_bytes")),
            read(format!("{base}/memory.stat")),
        ) {
            let usage = u.trim().parse().ok()?;
            let anon = stat_field(&s, "total_rss").or_else(|| stat_field(&s, "rss"))?;
            return Some((usage, anon));
        }
    }
    // cgroup v2.
    for base in [
        format!("/sys/fs/cgroup/system.slice/docker-{id}.scope"),
        format!("/sys/fs/cgroup/docker/{id}"),
    ] {
        if let (Some(u), Some(s)) = (
            read(format!("{base}/memory.current")),
            read(format!("{base}/memory.stat")),
        ) {
            return Some((u.trim().parse().ok()?, stat_field(&s, "anon")?));
        }
    }
    None
}

/// CPU time a container used since it started and how long its CPU quota held it back:
/// (usage ms, throttled ms).
pub fn cgroup_cpu(id: &str) -> Option<(f64, f64)> {
    let read = |p: String| std::fs::read_to_string(p).ok();
    let field = |text: &str, name: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    };
    // cgroup v1: cpuacct.usage (ns) and cpu.stat throttled_time (ns).
    for (cpu, acct) in [
        (
            format!("/sys/fs/cgroup/cpu/docker/{id}"),
            format!("/sys/fs/cgroup/cpuacct/docker/{id}"),
        ),
        (
            format!("/sys/fs/cgroup/cpu,cpuacct/docker/{id}"),
            format!("/sys/fs/cgroup/cpu,cpuacct/docker/{id}"),
        ),
    ] {
        if let (Some(stat), Some(usage)) = (
            read(format!("{cpu}/cpu.stat")),
            read(format!("{acct}/cpuacct.usage")),
        ) {
            let usage: f64 = usage.trim().parse().ok()?;
            return Some((usage / 1e6, field(&stat, "throttled_time")? / 1e6));
        }
    }
    // cgroup v2: cpu.stat usage_usec and throttled_usec.
    for base in [
        format!("/sys/fs/cgroup/system.slice/docker-{id}.scope"),
        format!("/sys/fs/cgroup/docker/{id}"),
    ] {
        if let Some(stat) = read(format!("{base}/cpu.stat")) {
            return Some((
                field(&stat, "usage_usec")? / 1e3,
                field(&stat, "throttled_usec")? / 1e3,
            ));
        }
    }
    None
}

/// Proportional set size of the containerd shim that runs a container, KiB.
pub fn shim_pss_kib(id: &str) -> Option<u64> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("containerd-shim") && cmd.contains(id) {
            let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
            return kib_field(&text, "Pss");
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kib_fields() {
        let t = "VmPeak:\t  100 kB\nVmRSS:\t   2048 kB\nRss: 3 kB\n";
        assert_eq!(kib_field(t, "VmRSS"), Some(2048));
        assert_eq!(kib_field(t, "Rss"), Some(3));
        assert_eq!(kib_field(t, "VmHWM"), None);
    }
}
