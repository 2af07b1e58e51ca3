//! The files ops: stat, list, read, write (atomic), remove, move, mkdir, tar and untar.

use std::ffi::CString;
use std::fs::{self, Metadata, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;

use serde_json::{json, Value};

use crate::paths::{parse, rel, show, Root};
use crate::proto::{opt_bool, opt_u64, str_field, Conn, Fail, Res, DATA};

const CHUNK: usize = 256 * 1024;
const LIST_MAX: u64 = 10_000;
const WRITE_MAX: u64 = 4 << 30;

fn kind(m: &Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_symlink() {
        "symlink"
    } else if t.is_dir() {
        "dir"
    } else if t.is_file() {
        "file"
    } else {
        "other"
    }
}

fn mtime_ms(m: &Metadata) -> i64 {
    m.mtime() * 1000 + m.mtime_nsec() / 1_000_000
}

pub fn entry(name: &str, rel: &str, m: &Metadata, target: Option<String>) -> Value {
    let mut v = json!({
        "name": name,
        "path": rel,
        "type": kind(m),
        "size": m.len(),
        "mode": m.mode() & 0o7777,
        "modified": mtime_ms(m),
    });
    if let Some(t) = target {
        v["target"] = Value::String(t);
    }
    v
}

fn link_target(p: &Path) -> Option<String> {
    fs::read_link(p)
        .ok()
        .map(|t| t.to_string_lossy().into_owned())
}

/// The entry of an existing non-root path, following a final symlink (which must stay
/// inside): the type, size, mode and time are the target's, `target` the link's text.
fn stat_entry(root: &Root, comps: &[String]) -> Res<Value> {
    if comps.is_empty() {
        let m = fs::metadata(&root.path).map_err(|e| Fail::io(&e, "\".\""))?;
        return Ok(entry("", "", &m, None));
    }
    let shown = rel(comps);
    let (dir, name) = root.parent(comps, false)?;
    let p = dir.join(&name);
    let lm = fs::symlink_metadata(&p).map_err(|e| Fail::io(&e, &show(&shown)))?;
    if lm.file_type().is_symlink() {
        let real = root.resolve(comps)?;
        let m = fs::metadata(&real).map_err(|e| Fail::io(&e, &show(&shown)))?;
        return Ok(entry(&name, &shown, &m, link_target(&p)));
    }
    Ok(entry(&name, &shown, &lm, None))
}

pub fn stat(root: &Root, h: &Value, c: &mut Conn) -> Res<()> {
    let comps = parse(str_field(h, "path")?)?;
    let e = stat_entry(root, &comps)?;
    let _ = c.head(json!({ "entry": e }));
    Ok(())
}

pub fn list(root: &Root, h: &Value, c: &mut Conn) -> Res<()> {
    let comps = parse(str_field(h, "path")?)?;
    let limit = opt_u64(h, "limit")?.unwrap_or(LIST_MAX).min(LIST_MAX) as usize;
    let shown = rel(&comps);
    let dir = root.resolve(&comps)?;
    if !dir.is_dir() {
        return Err(Fail::new(
            "not_a_directory",
            format!("{} is not a folder", show(&shown)),
        ));
    }
    let rd = fs::read_dir(&dir).map_err(|e| Fail::io(&e, &show(&shown)))?;
    let mut names = Vec::new();
    for d in rd {
        let d = d.map_err(|e| Fail::io(&e, &show(&shown)))?;
        names.push(d.file_name());
    }
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    let truncated = names.len() > limit;
    let mut entries = Vec::with_capacity(names.len().min(limit));
    for n in names.into_iter().take(limit) {
        let p = dir.join(&n);
        let Ok(m) = fs::symlink_metadata(&p) else {
            continue;
        };
        let name = n.to_string_lossy().into_owned();
        let r = if shown.is_empty() {
            name.clone()
        } else {
            format!("{shown}/{name}")
        };
        let t = if m.file_type().is_symlink() {
            link_target(&p)
        } else {
            None
        };
        entries.push(entry(&name, &r, &m, t));
    }
    let _ = c.head(json!({ "entries": entries, "truncated": truncated }));
    Ok(())
}

pub fn read(root: &Root, h: &Value, c: &mut Conn) -> Res<()> {
    let comps = parse(str_field(h, "path")?)?;
    let offset = opt_u64(h, "offset")?.unwrap_or(0);
    let length = opt_u64(h, "length")?;
    let shown = rel(&comps);
    let real = root.resolve(&comps)?;
    let m = fs::metadata(&real).map_err(|e| Fail::io(&e, &show(&shown)))?;
    if m.is_dir() {
        return Err(Fail::new(
            "is_a_directory",
            format!("{} is a folder", show(&shown)),
        ));
    }
    if !m.is_file() {
        return Err(Fail::new(
            "io_error",
            format!("{} is not a regular file", show(&shown)),
        ));
    }
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&real)
        .map_err(|e| Fail::io(&e, &show(&shown)))?;
    let m = f.metadata().map_err(|e| Fail::io(&e, &show(&shown)))?;
    let size = m.len();
    let start = offset.min(size);
    let mut left = (size - start).min(length.unwrap_or(u64::MAX));
    if c.head(json!({"size": size, "modified": mtime_ms(&m), "mode": m.mode() & 0o7777}))
        .is_err()
    {
        return Ok(());
    }
    f.seek(SeekFrom::Start(start))
        .map_err(|e| Fail::io(&e, &show(&shown)))?;
    let mut buf = vec![0u8; CHUNK];
    while left > 0 {
        let want = (left as usize).min(CHUNK);
        let n = match f.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Fail::io(&e, &show(&shown))),
        };
        if c.frame(DATA, &buf[..n]).is_err() {
            return Ok(());
        }
        left -= n as u64;
    }
    let _ = c.end();
    Ok(())
}

pub fn write(root: &Root, h: &Value, c: &mut Conn) -> Res<()> {
    let comps = parse(str_field(h, "path")?)?;
    let max = opt_u64(h, "maxBytes")?.unwrap_or(64 << 20).min(WRITE_MAX);
    let mode = opt_u64(h, "mode")?.unwrap_or(0o644) as u32 & 0o777;
    let shown = rel(&comps);
    if comps.is_empty() {
        return Err(Fail::new("invalid_path", "cannot write the workspace root"));
    }
    let (dir, name) = root.parent(&comps, true)?;
    let link = dir.join(&name);
    let mut target = link.clone();
    let mut via_link = false;
    match fs::symlink_metadata(&target) {
        Ok(m) if m.file_type().is_symlink() => match fs::canonicalize(&target) {
            Ok(_) => {
                target = root.resolve(&comps)?;
                via_link = true;
            }
            // A dangling link is replaced by the file.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Fail::io(&e, &show(&shown))),
        },
        _ => {}
    }
    if target.is_dir() {
        return Err(Fail::new(
            "is_a_directory",
            format!("{} is a folder", show(&shown)),
        ));
    }
    let tdir = target.parent().map(Path::to_path_buf).unwrap_or(dir);
    let tmp = tdir.join(format!(
        ".sandboxd-write-{}.tmp",
        crate::proto::random_hex(8)
    ));
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)
        .map_err(|e| Fail::io(&e, &format!("writing {}", show(&shown))))?;
    let res = (|| -> Res<()> {
        let mut total = 0u64;
        while let Some(chunk) = c.read_body_frame()? {
            total += chunk.len() as u64;
            if total > max {
                return Err(Fail::new(
                    "too_large",
                    format!("the content is over {max} bytes"),
                ));
            }
            f.write_all(&chunk)
                .map_err(|e| Fail::io(&e, &format!("writing {}", show(&shown))))?;
        }
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| Fail::io(&e, &format!("writing {}", show(&shown))))?;
        drop(f);
        fs::rename(&tmp, &target).map_err(|e| Fail::io(&e, &format!("writing {}", show(&shown))))
    })();
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    let m = fs::metadata(&target).map_err(|e| Fail::io(&e, &show(&shown)))?;
    let t = if via_link { link_target(&link) } else { None };
    let _ = c.head(json!({ "entry": entry(&name, &shown, &m, t) }));
    Ok(())
}

pub fn remove(root: &Root, h: &Value, c: &mut Conn) -> Res<()> {
    let comps = parse(str_field(h, "path")?)?;
    let recursive = opt_bool(h, "recursive", false)?;
    let shown = rel(&comps);
    if comps.is_empty() {
        return Err(Fail::new(
            "invalid_path",
            "the workspace root cannot be removed",
        ));
    }
    let (dir, name) = root.parent(&comps, false)?;
    let p = dir.join(&name);
    let m = fs::symlink_metadata(&p).map_err(|e| Fail::io(&e, &show(&shown)))?;
    let r = if m.is_dir() {
        if recursive {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_dir(&p)
        }
    } else {
        fs::remove_file(&p)
    };
    match r {
        Ok(()) => {}
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY) | Some(libc::EEXIST)) => {
            return Err(Fail::new(
                "not_empty",
                format!("{} is not empty", show(&shown)),
            ))
        }
        Err(e) => return Err(Fail::io(&e, &format!("removing {}", show(&shown)))),
    }
    let _ = c.head(json!({}));
    Ok(())
}

fn renameat2_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let f = CString::new(from.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput)?;
    let t = CString::new(to.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: two valid C strings; renameat2 only reads them.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

pub fn rename(root: &Root, h: &Value, c: &mut Conn) -> Res<()> {
    let from = parse(str_field(h, "from")?)?;
    let to = parse(str_field(h, "to")?)?;
    let overwrite = opt_bool(h, "overwrite", false)?;
    let (fs_, ts_) = (rel(&from), rel(&to));
    if from.is_empty() || to.is_empty() {
        return Err(Fail::new(
            "invalid_path",
            "the workspace root cannot be moved",
        ));
    }
    let (fdir, fname) = root.parent(&from, false)?;
    let src = fdir.join(&fname);
    fs::symlink_metadata(&src).map_err(|e| Fail::io(&e, &show(&fs_)))?;
    let (tdir, tname) = root.parent(&to, true)?;
    let dst = tdir.join(&tname);
    let what = format!("moving {} to {}", show(&fs_), show(&ts_));
    let r = if overwrite {
        fs::rename(&src, &dst)
    } else {
        match renameat2_noreplace(&src, &dst) {
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS))
                    && fs::symlink_metadata(&dst).is_err() =>
            {
                // Not supported here (or a move into itself: rename says which).
                fs::rename(&src, &dst)
            }
            r => r,
        }
    };
    match r {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            return Err(Fail::new("exists", format!("{} exists", show(&ts_))))
        }
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            return Err(Fail::new(
                "invalid_path",
                format!("{what}: a folder cannot move into itself"),
            ))
        }
        Err(e) => return Err(Fail::io(&e, &what)),
    }
    let m = fs::symlink_metadata(&dst).map_err(|e| Fail::io(&e, &show(&ts_)))?;
    let t = if m.file_type().is_symlink() {
        link_target(&dst)
    } else {
        None
    };
    let _ = c.head(json!({ "entry": entry(&tname, &ts_, &m, t) }));
    Ok(())
}

pub fn mkdir(root: &Root, h: &Value, c: &mut Conn) -> Res<()> {
    let comps = parse(str_field(h, "path")?)?;
    let parents = opt_bool(h, "parents", true)?;
    let shown = rel(&comps);
    if comps.is_empty() {
        if !parents {
            return Err(Fail::new("exists", "the workspace root exists"));
        }
        let m = fs::metadata(&root.path).map_err(|e| Fail::io(&e, "\".\""))?;
        let _ = c.head(json!({ "entry": entry("", "", &m, None) }));
        return Ok(());
    }
    let (dir, name) = root.parent(&comps, parents)?;
    let p = dir.join(&name);
    match fs::create_dir(&p) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let is_dir = parents && root.resolve(&comps).map(|r| r.is_dir()).unwrap_or(false);
            if !is_dir {
                return Err(Fail::new("exists", format!("{} exists", show(&shown))));
            }
        }
        Err(e) => return Err(Fail::io(&e, &format!("creating {}", show(&shown)))),
    }
    let e = stat_entry(root, &comps)?;
    let _ = c.head(json!({ "entry": e }));
    Ok(())
}

// ---- tar / untar ------------------------------------------------------------------------------

/// Reads at most `cap` bytes of a child's pipe in a thread (the rest is drained).
pub(crate) fn capture(
    mut r: impl Read + Send + 'static,
    cap: usize,
) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut out = Vec::new();
        let mut buf = [0u8; 8192];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            let room = cap.saturating_sub(out.len());
            out.extend_from_slice(&buf[..n.min(room)]);
        }
        out
    })
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

pub fn tar(root: &Root, h: &Value, c: &mut Conn) -> Res<()> {
    let comps = parse(str_field(h, "path")?)?;
    let shown = rel(&comps);
    let real = root.resolve(&comps)?;
    let m = fs::metadata(&real).map_err(|e| Fail::io(&e, &show(&shown)))?;
    let (dir, what) = if m.is_dir() {
        (real.clone(), ".".to_string())
    } else {
        let parent = real
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| root.path.clone());
        let name = real
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        (parent, format!("./{name}"))
    };
    let mut child = Command::new("tar")
        .arg("--warning=no-file-changed")
        .arg("-czf")
        .arg("-")
        .arg("-C")
        .arg(&dir)
        .arg(&what)
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Fail::io(&e, "starting tar"))?;
    let err = capture(child.stderr.take().expect("piped"), 4096);
    let mut out = child.stdout.take().expect("piped");
    if c.head(json!({})).is_err() {
        kill(&mut child);
        return Ok(());
    }
    let mut buf = vec![0u8; CHUNK];
    loop {
        match out.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if c.frame(DATA, &buf[..n]).is_err() {
                    kill(&mut child);
                    return Ok(());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                kill(&mut child);
                return Err(Fail::io(&e, "reading tar's output"));
            }
        }
    }
    let status = child.wait().map_err(|e| Fail::io(&e, "waiting for tar"))?;
    let err = err.join().unwrap_or_default();
    // 1: some files changed while being read; the archive is still whole.
    if !matches!(status.code(), Some(0) | Some(1)) {
        return Err(Fail::new(
            "io_error",
            format!(
                "tar failed ({status}): {}",
                String::from_utf8_lossy(&err).trim()
            ),
        ));
    }
    let _ = c.end();
    Ok(())
}

/// untar: the body (a .tar.gz, at most `maxBytes`) goes through `gzip -dc` (the unpacked
/// stream is capped at 4 × maxBytes) into `tar -x` in the target folder.
pub fn untar(root: &Root, h: &Value, c: &mut Conn) -> Res<()> {
    let comps = parse(str_field(h, "path")?)?;
    let max = opt_u64(h, "maxBytes")?.unwrap_or(64 << 20).min(WRITE_MAX);
    let unpacked_max = max.saturating_mul(4);
    let dir = root.dir(&comps, true)?;
    let mut gz = Command::new("gzip")
        .arg("-dc")
        .current_dir(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Fail::io(&e, "starting gzip"))?;
    let mut tar = match Command::new("tar")
        .args([
            "-x",
            "-v",
            "-f",
            "-",
            "--no-same-owner",
            "--no-same-permissions",
        ])
        .arg("-C")
        .arg(&dir)
        .current_dir(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(t) => t,
        Err(e) => {
            kill(&mut gz);
            return Err(Fail::io(&e, "starting tar"));
        }
    };
    let gz_err = capture(gz.stderr.take().expect("piped"), 2048);
    let tar_err = capture(tar.stderr.take().expect("piped"), 2048);
    let mut listing = tar.stdout.take().expect("piped");
    let counter = thread::spawn(move || {
        // One line per extracted entry; folders end with '/'.
        let (mut n, mut len, mut last) = (0u64, 0usize, 0u8);
        let mut buf = [0u8; 8192];
        while let Ok(k) = listing.read(&mut buf) {
            if k == 0 {
                break;
            }
            for &b in &buf[..k] {
                if b == b'\n' {
                    if len > 0 && last != b'/' {
                        n += 1;
                    }
                    len = 0;
                } else {
                    len += 1;
                    last = b;
                }
            }
        }
        n
    });
    let mut gz_out = gz.stdout.take().expect("piped");
    let mut tar_in = tar.stdin.take().expect("piped");
    let pump = thread::spawn(move || -> bool {
        let mut total = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match gz_out.read(&mut buf) {
                Ok(0) => return true,
                Ok(n) => {
                    total += n as u64;
                    if total > unpacked_max {
                        return false;
                    }
                    if tar_in.write_all(&buf[..n]).is_err() {
                        return true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return true,
            }
        }
    });
    let mut gz_in = gz.stdin.take().expect("piped");
    let mut total = 0u64;
    let mut fail = None;
    let mut broken = false;
    loop {
        match c.read_body_frame() {
            Ok(Some(chunk)) => {
                total += chunk.len() as u64;
                if total > max {
                    fail = Some(Fail::new(
                        "too_large",
                        format!("the archive is over {max} bytes"),
                    ));
                    break;
                }
                if !broken && gz_in.write_all(&chunk).is_err() {
                    broken = true; // gzip gave up: keep reading to END, then report
                }
            }
            Ok(None) => break,
            Err(e) => {
                fail = Some(e);
                break;
            }
        }
    }
    drop(gz_in);
    if fail.is_some() {
        let _ = gz.kill();
        let _ = tar.kill();
    }
    let within = pump.join().unwrap_or(false);
    if !within {
        let _ = gz.kill();
        let _ = tar.kill();
    }
    let gs = gz.wait();
    let ts = tar.wait();
    let files = counter.join().unwrap_or(0);
    let gz_err = gz_err.join().unwrap_or_default();
    let tar_err = tar_err.join().unwrap_or_default();
    if let Some(f) = fail {
        return Err(f);
    }
    if !within {
        return Err(Fail::new(
            "too_large",
            format!("the archive unpacks to more than {unpacked_max} bytes"),
        ));
    }
    let gz_ok = gs.map(|s| s.success()).unwrap_or(false);
    let tar_ok = ts.map(|s| s.success()).unwrap_or(false);
    if !gz_ok || !tar_ok {
        let msg = if !gz_ok { gz_err } else { tar_err };
        return Err(Fail::new(
            "bad_request",
            format!(
                "not a valid .tar.gz: {}",
                String::from_utf8_lossy(&msg).trim()
            ),
        ));
    }
    let _ = c.head(json!({ "files": files }));
    Ok(())
}
