//! The `watch` op: inotify on a folder (and its subfolders when recursive, at most 8192, not
//! inside `node_modules`, `.git` or the agent's own `.sandboxd/exec`), streamed as EVENT
//! frames until the client closes. A move inside the tree is one `rename` event with `from`;
//! a move out of it is `remove`, into it `create`.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::paths::{parse, rel, show, Root};
use crate::proto::{opt_bool, str_field, Conn, Fail, Res, EVENT};

const MAX_WATCHES: usize = 8192;
const MASK: u32 = libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_MODIFY
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF
    | libc::IN_ONLYDIR
    | libc::IN_DONT_FOLLOW;

struct Inotify {
    fd: i32,
}

impl Drop for Inotify {
    fn drop(&mut self) {
        // SAFETY: our own descriptor, closed once.
        unsafe { libc::close(self.fd) };
    }
}

struct Watcher {
    ino: Inotify,
    /// wd → the folder's path relative to the workspace root.
    dirs: HashMap<i32, String>,
    real_root: PathBuf,
    recursive: bool,
    overflowed: bool,
}

fn skipped(rel: &str) -> bool {
    let name = rel.rsplit('/').next().unwrap_or("");
    name == "node_modules" || name == ".git" || rel == ".sandboxd/exec"
}

impl Watcher {
    fn add(&mut self, abs: &Path, rel: &str, events: &mut Vec<Value>) {
        if self.dirs.len() >= MAX_WATCHES {
            if !self.overflowed {
                self.overflowed = true;
                events.push(json!({"type": "overflow"}));
            }
            return;
        }
        let Ok(c) = CString::new(abs.as_os_str().as_bytes()) else {
            return;
        };
        // SAFETY: a valid C string and our inotify descriptor.
        let wd = unsafe { libc::inotify_add_watch(self.ino.fd, c.as_ptr(), MASK) };
        if wd < 0 {
            // Out of inotify watches (fs.inotify.max_user_watches, shared by uid 1000 on the
            // host): changes below here will be missed.
            if io::Error::last_os_error().raw_os_error() == Some(libc::ENOSPC) && !self.overflowed {
                self.overflowed = true;
                events.push(json!({"type": "overflow"}));
            }
            return;
        }
        self.dirs.insert(wd, rel.to_string());
    }

    /// Watches `abs` and (when recursive) its subfolders; with `report`, every entry found
    /// below it becomes a `create` event (they may have appeared before the watch did).
    fn add_tree(&mut self, abs: &Path, rel: &str, report: bool, events: &mut Vec<Value>) {
        self.add(abs, rel, events);
        if !self.recursive && !report {
            return;
        }
        let Ok(rd) = fs::read_dir(abs) else { return };
        for d in rd.flatten() {
            let name = d.file_name().to_string_lossy().into_owned();
            let r = join(rel, &name);
            let Ok(t) = d.file_type() else { continue };
            if report {
                events.push(json!({"type": "create", "path": r, "isDir": t.is_dir()}));
            }
            if self.recursive && t.is_dir() && !skipped(&r) {
                self.add_tree(&d.path(), &r, report, events);
            }
        }
    }

    fn forget_under(&mut self, rel: &str) {
        let prefix = format!("{rel}/");
        let gone: Vec<i32> = self
            .dirs
            .iter()
            .filter(|(_, r)| r.as_str() == rel || r.starts_with(&prefix))
            .map(|(&wd, _)| wd)
            .collect();
        for wd in gone {
            // SAFETY: our descriptor and a watch it returned.
            unsafe { libc::inotify_rm_watch(self.ino.fd, wd) };
            self.dirs.remove(&wd);
        }
    }
}

fn join(a: &str, b: &str) -> String {
    if a.is_empty() {
        b.to_string()
    } else {
        format!("{a}/{b}")
    }
}

pub fn watch(root: &Root, h: &Value, c: &mut Conn) -> Res<()> {
    let comps = parse(str_field(h, "path")?)?;
    let recursive = opt_bool(h, "recursive", false)?;
    let shown = rel(&comps);
    let real = root.resolve(&comps)?;
    if !real.is_dir() {
        return Err(Fail::new(
            "not_a_directory",
            format!("{} is not a folder", show(&shown)),
        ));
    }
    // SAFETY: no pointers.
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EMFILE) {
            // fs.inotify.max_user_instances (per uid on the host, 128 by default).
            return Err(Fail::new(
                "busy",
                "no inotify instance left (fs.inotify.max_user_instances)",
            ));
        }
        return Err(Fail::io(&e, "starting inotify"));
    }
    let mut w = Watcher {
        ino: Inotify { fd },
        dirs: HashMap::new(),
        real_root: real.clone(),
        recursive,
        overflowed: false,
    };
    let base = root.rel_of(&real);
    let mut events = Vec::new();
    w.add_tree(&real, &base, false, &mut events);
    if w.dirs.is_empty() {
        return Err(Fail::io(
            &io::Error::last_os_error(),
            &format!("watching {}", show(&shown)),
        ));
    }
    if c.head(json!({})).is_err() {
        return Ok(());
    }
    let sock = c.s.as_raw_fd();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        for e in events.drain(..) {
            if c.json_frame(EVENT, &e, false).is_err() {
                return Ok(());
            }
        }
        let mut fds = [
            libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: sock,
                events: libc::POLLIN | libc::POLLRDHUP,
                revents: 0,
            },
        ];
        // SAFETY: two pollfds we own.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 30_000) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Ok(());
        }
        if fds[1].revents != 0 && c.peer_closed() {
            return Ok(());
        }
        if fds[1].revents & (libc::POLLIN) != 0 {
            // Anything the client sends is ignored; drain it.
            let mut sink = [0u8; 1024];
            // SAFETY: our buffer, non-blocking.
            unsafe {
                libc::recv(
                    sock,
                    sink.as_mut_ptr().cast(),
                    sink.len(),
                    libc::MSG_DONTWAIT,
                )
            };
        }
        if fds[0].revents & libc::POLLIN == 0 {
            continue;
        }
        // SAFETY: reading into our buffer.
        let got = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if got <= 0 {
            continue;
        }
        let done = handle(&mut w, &buf[..got as usize], &mut events);
        if done {
            for e in events.drain(..) {
                let _ = c.json_frame(EVENT, &e, false);
            }
            let _ = c.end();
            return Ok(());
        }
    }
}

/// Turns one read of inotify events into protocol events; true when the watched folder
/// itself is gone.
fn handle(w: &mut Watcher, mut b: &[u8], events: &mut Vec<Value>) -> bool {
    let hdr = std::mem::size_of::<libc::inotify_event>();
    let mut moved_from: Vec<(u32, String, bool)> = Vec::new();
    let mut last_modify: Option<String> = None;
    let mut root_gone = false;
    while b.len() >= hdr {
        // SAFETY: the kernel writes whole events; read_unaligned copes with alignment.
        let ev: libc::inotify_event = unsafe { std::ptr::read_unaligned(b.as_ptr().cast()) };
        let len = ev.len as usize;
        let name_bytes = &b[hdr..(hdr + len).min(b.len())];
        b = &b[(hdr + len).min(b.len())..];
        let name = String::from_utf8_lossy(name_bytes.split(|&x| x == 0).next().unwrap_or(&[]))
            .into_owned();
        if ev.mask & libc::IN_Q_OVERFLOW != 0 {
            events.push(json!({"type": "overflow"}));
            continue;
        }
        let Some(dir_rel) = w.dirs.get(&ev.wd).cloned() else {
            continue;
        };
        let is_dir = ev.mask & libc::IN_ISDIR != 0;
        if ev.mask & (libc::IN_DELETE_SELF | libc::IN_MOVE_SELF) != 0 {
            // Watch 1 is the watched folder itself (watch descriptors count from 1).
            if ev.wd == 1 {
                events.push(json!({"type": "remove", "path": dir_rel, "isDir": true}));
                root_gone = true;
            }
            continue;
        }
        if ev.mask & libc::IN_IGNORED != 0 {
            w.dirs.remove(&ev.wd);
            continue;
        }
        if name.is_empty() {
            continue;
        }
        let r = join(&dir_rel, &name);
        if ev.mask & libc::IN_CREATE != 0 {
            events.push(json!({"type": "create", "path": r, "isDir": is_dir}));
            if is_dir && w.recursive && !skipped(&r) {
                let abs = w.real_root.join(relative_to(&r, &w.dirs, ev.wd, &name));
                w.add_tree(&abs, &r, true, events);
            }
        } else if ev.mask & libc::IN_MODIFY != 0 {
            if last_modify.as_deref() != Some(r.as_str()) {
                events.push(json!({"type": "modify", "path": r, "isDir": is_dir}));
                last_modify = Some(r);
            }
            continue;
        } else if ev.mask & libc::IN_DELETE != 0 {
            events.push(json!({"type": "remove", "path": r, "isDir": is_dir}));
        } else if ev.mask & libc::IN_MOVED_FROM != 0 {
            if is_dir {
                w.forget_under(&r);
            }
            moved_from.push((ev.cookie, r, is_dir));
        } else if ev.mask & libc::IN_MOVED_TO != 0 {
            let from = moved_from.iter().position(|(ck, _, _)| *ck == ev.cookie);
            match from {
                Some(i) => {
                    let (_, old, _) = moved_from.remove(i);
                    events.push(json!({"type": "rename", "path": r, "from": old, "isDir": is_dir}));
                }
                None => events.push(json!({"type": "create", "path": r, "isDir": is_dir})),
            }
            if is_dir && w.recursive && !skipped(&r) {
                let abs = w.real_root.join(relative_to(&r, &w.dirs, ev.wd, &name));
                w.add_tree(&abs, &r, false, events);
            }
        }
        last_modify = None;
    }
    for (_, old, is_dir) in moved_from {
        events.push(json!({"type": "remove", "path": old, "isDir": is_dir}));
    }
    root_gone
}

/// The path of `name` inside watch `wd`, relative to the watched (real) folder.
fn relative_to(_r: &str, dirs: &HashMap<i32, String>, wd: i32, name: &str) -> PathBuf {
    let base = dirs.get(&1).cloned().unwrap_or_default();
    let dir = dirs.get(&wd).cloned().unwrap_or_default();
    let sub = dir
        .strip_prefix(&base)
        .unwrap_or("")
        .trim_start_matches('/');
    Path::new(sub).join(name)
}
