//! The terminal's part of the opening handshake: the query (size, `cwd`, token) and the
//! working folder. Origin, the RFC 6455 headers and the token are `crate::http::upgrade`'s,
//! shared with the files watch. Pure functions: every refusal happens before the sandbox is
//! touched.

use super::protocol::{clamp_dim, Size, DEFAULT_SIZE, MAX_DIM};
use crate::http::upgrade::percent_decode;
use crate::sandbox::spec::WORKSPACE;

/// What the query string may carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    pub size: Size,
    pub cwd: String,
    pub token: Option<String>,
}

/// Parses `cols`, `rows`, `cwd` and `token`; other keys are ignored, a repeated key is an
/// error (which of two values a proxy or a server would pick is a classic ambiguity).
pub fn parse_query(q: Option<&str>) -> Result<Query, String> {
    let mut out = Query {
        size: DEFAULT_SIZE,
        cwd: WORKSPACE.to_owned(),
        token: None,
    };
    let (mut cols, mut rows, mut cwd, mut token) = (None, None, None, None);
    for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_decode(k)?;
        let slot = match k.as_str() {
            "cols" => &mut cols,
            "rows" => &mut rows,
            "cwd" => &mut cwd,
            "token" => &mut token,
            _ => continue,
        };
        if slot.is_some() {
            return Err(format!("query parameter {k} is given more than once"));
        }
        *slot = Some(percent_decode(v)?);
    }
    let dim = |name: &str, v: &str| -> Result<u16, String> {
        let v = v.trim();
        let ok = !v.is_empty()
            && v.len() <= 40
            && v.strip_prefix('-')
                .unwrap_or(v)
                .bytes()
                .all(|b| b.is_ascii_digit());
        if !ok {
            return Err(format!("{name} must be an integer"));
        }
        // More digits than i128 holds still clamps: only the sign matters then.
        Ok(v.parse::<i128>()
            .map(clamp_dim)
            .unwrap_or(if v.starts_with('-') { 1 } else { MAX_DIM }))
    };
    if let Some(c) = cols {
        out.size.cols = dim("cols", &c)?;
    }
    if let Some(r) = rows {
        out.size.rows = dim("rows", &r)?;
    }
    if let Some(c) = cwd {
        out.cwd = validate_cwd(&c)?;
    }
    out.token = token.filter(|t| !t.is_empty());
    Ok(out)
}

/// `/workspace` or an absolute path below it, without `.`/`..` components or control
/// characters; returned without a trailing slash.
pub(super) fn validate_cwd(p: &str) -> Result<String, String> {
    let err = || format!("cwd must be {WORKSPACE} or a path inside it, without . or .. parts");
    if p.len() > 4096 || p.chars().any(char::is_control) {
        return Err(err());
    }
    let rest = p.strip_prefix(WORKSPACE).ok_or_else(err)?;
    if !(rest.is_empty() || rest.starts_with('/')) {
        return Err(err());
    }
    let mut clean = WORKSPACE.to_owned();
    for part in rest.split('/').filter(|s| !s.is_empty()) {
        if part == "." || part == ".." {
            return Err(err());
        }
        clean.push('/');
        clean.push_str(part);
    }
    Ok(clean)
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum DirState {
    Dir,
    Missing,
    /// A symlink on the way (resolved only inside the container) or an unreadable part.
    Unknown,
}

/// Whether a validated `cwd` (`/workspace/...`) is a folder, looked up in the workspace's host
/// folder, which is what the container mounts on /workspace. Symlinks are never followed on
/// the host (they point into the container's file system); the engine decides about those.
pub(super) fn host_dir_state(workspace: &std::path::Path, cwd: &str) -> DirState {
    let rel = cwd.strip_prefix(WORKSPACE).unwrap_or(cwd);
    let mut path = workspace.to_path_buf();
    for part in rel.split('/').filter(|p| !p.is_empty()) {
        path.push(part);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => return DirState::Unknown,
            Ok(m) if m.is_dir() => {}
            Ok(_) => return DirState::Missing,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return DirState::Missing,
            Err(_) => return DirState::Unknown,
        }
    }
    DirState::Dir
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parsing() {
        let q = parse_query(None).unwrap();
        assert_eq!(q.size, DEFAULT_SIZE);
        assert_eq!(q.cwd, "/workspace");
        assert_eq!(q.token, None);
        let q = parse_query(Some(
            "cols=132&rows=0&cwd=%2Fworkspace%2Fmy+app%2F&token=a.b.c&x=1",
        ))
        .unwrap();
        assert_eq!(q.size, Size { cols: 132, rows: 1 });
        assert_eq!(q.cwd, "/workspace/my app");
        assert_eq!(q.token.as_deref(), Some("a.b.c"));
        let q = parse_query(Some("cols=99999999999999999999999999999999999999&rows=-7")).unwrap();
        assert_eq!(
            q.size,
            Size {
                cols: 1000,
                rows: 1
            }
        );
        for bad in [
            "cols=abc",
            "cols=",
            "rows=1.5",
            "cols=1&cols=2",
            "cwd=/etc",
            "cwd=/workspace/../etc",
            "cwd=/workspacex",
            "cwd=workspace",
            "cwd=/workspace/a%00b",
            "cwd=%zz",
            "token=%ff",
        ] {
            assert!(parse_query(Some(bad)).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn cwd_rules() {
        assert_eq!(validate_cwd("/workspace").unwrap(), "/workspace");
        assert_eq!(validate_cwd("/workspace/").unwrap(), "/workspace");
        assert_eq!(validate_cwd("/workspace//a/b/").unwrap(), "/workspace/a/b");
        assert_eq!(validate_cwd("/workspace/a..b").unwrap(), "/workspace/a..b");
        for bad in [
            "",
            "/",
            "/work",
            "/workspace/..",
            "/workspace/./a",
            "/workspace/a/../..",
            "/workspace\n",
        ] {
            assert!(validate_cwd(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cwd_lookup_on_the_host_never_follows_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path();
        std::fs::create_dir_all(ws.join("a/b")).unwrap();
        std::fs::write(ws.join("f"), "x").unwrap();
        std::os::unix::fs::symlink("/etc", ws.join("link")).unwrap();
        assert_eq!(host_dir_state(ws, "/workspace"), DirState::Dir);
        assert_eq!(host_dir_state(ws, "/workspace/a/b"), DirState::Dir);
        assert_eq!(host_dir_state(ws, "/workspace/a/c"), DirState::Missing);
        assert_eq!(host_dir_state(ws, "/workspace/f"), DirState::Missing);
        assert_eq!(host_dir_state(ws, "/workspace/link"), DirState::Unknown);
        assert_eq!(host_dir_state(ws, "/workspace/link/ssl"), DirState::Unknown);
    }
}
