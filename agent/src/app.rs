//! The `app` op: whether a preview app may still start listening, answered from the files the
//! image's init keeps (`/tmp/sandboxd-init.done` once its discovery is over, the dev server's
//! pid in `/tmp/sandboxd-dev.pid`) without the edge running a program in the sandbox. The same
//! test as src/sandbox/scripts/preview-app-may-come.sh, which older agents fall back to.

use std::path::PathBuf;

use serde_json::json;

use crate::proto::{Conn, Res};

fn path_from_env(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| default.into())
}

/// The pid in the dev server's pid file: decimal digits only, above 1.
pub fn parse_pid(text: &str) -> Option<i32> {
    let t = text.trim();
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    t.parse::<i32>().ok().filter(|&p| p > 1)
}

fn alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// `{"initDone": bool, "devPid": N|null, "devAlive": bool, "mayCome": bool}`: `mayCome` while
/// the init's discovery runs or its dev server lives.
pub fn app(c: &mut Conn) -> Res<()> {
    let done_file = path_from_env("SANDBOXD_INIT_DONE_FILE", "/tmp/sandboxd-init.done");
    let pid_file = path_from_env("SANDBOXD_DEV_PID_FILE", "/tmp/sandboxd-dev.pid");
    let init_done = done_file.exists();
    let pid = std::fs::read(&pid_file)
        .ok()
        .filter(|b| b.len() <= 32)
        .and_then(|b| parse_pid(&String::from_utf8_lossy(&b)));
    let dev_alive = pid.is_some_and(alive);
    let _ = c.head(json!({
        "initDone": init_done,
        "devPid": pid,
        "devAlive": dev_alive,
        "mayCome": !init_done || dev_alive,
    }));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_file_contents() {
        assert_eq!(parse_pid("42\n"), Some(42));
        assert_eq!(parse_pid(" 7 "), Some(7));
        for bad in ["", "1", "0", "-5", "12a", "4 2", "99999999999"] {
            assert_eq!(parse_pid(bad), None, "{bad:?}");
        }
    }
}
