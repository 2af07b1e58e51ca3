//! Workspace paths: parsing the client's relative paths and resolving them inside the sandbox
//! with `realpath`, refusing whatever resolves outside the workspace root.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::proto::{Fail, Res};

const MAX_PATH: usize = 4096;
const MAX_NAME: usize = 255;

/// Splits a client path into its components: `""`/`"."` is the root, empty and `.` components
/// are skipped; `..`, a leading `/`, NUL and over-long paths or names are `invalid_path`.
pub fn parse(p: &str) -> Res<Vec<String>> {
    if p.len() > MAX_PATH {
        return Err(Fail::new("invalid_path", "the path is over 4096 bytes"));
    }
    if p.contains('\0') {
        return Err(Fail::new("invalid_path", "the path contains a NUL byte"));
    }
    if p.starts_with('/') {
        return Err(Fail::new(
            "invalid_path",
            "the path must be relative to the workspace",
        ));
    }
    let mut out = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(Fail::new("invalid_path", "the path contains \"..\"")),
            c if c.len() > MAX_NAME => {
                return Err(Fail::new(
                    "invalid_path",
                    "a path component is over 255 bytes",
                ))
            }
            c => out.push(c.to_string()),
        }
    }
    Ok(out)
}

pub fn rel(comps: &[String]) -> String {
    comps.join("/")
}

/// The workspace root, canonical.
pub struct Root {
    pub path: PathBuf,
}

impl Root {
    pub fn new(p: &Path) -> io::Result<Root> {
        Ok(Root {
            path: fs::canonicalize(p)?,
        })
    }

    pub fn inside(&self, p: &Path) -> bool {
        p.starts_with(&self.path)
    }

    fn check(&self, real: PathBuf, shown: &str) -> Res<PathBuf> {
        if self.inside(&real) {
            Ok(real)
        } else {
            Err(Fail::new(
                "outside_workspace",
                format!("{} leads outside the workspace", show(shown)),
            ))
        }
    }

    /// realpath of the whole path, which must exist and stay inside the root.
    pub fn resolve(&self, comps: &[String]) -> Res<PathBuf> {
        let shown = rel(comps);
        let mut p = self.path.clone();
        p.extend(comps);
        let real = fs::canonicalize(&p).map_err(|e| Fail::io(&e, &show(&shown)))?;
        self.check(real, &shown)
    }

    /// The resolved parent of a non-root path and the final component's name.
    pub fn parent(&self, comps: &[String], create: bool) -> Res<(PathBuf, String)> {
        let Some((name, parent)) = comps.split_last() else {
            return Err(Fail::new("invalid_path", "the workspace root itself"));
        };
        let dir = self.dir(parent, create)?;
        Ok((dir, name.clone()))
    }

    /// Resolves a folder, creating missing components when `create`: every step is resolved
    /// with realpath and checked before anything is created in it.
    pub fn dir(&self, comps: &[String], create: bool) -> Res<PathBuf> {
        let mut cur = self.path.clone();
        for (i, c) in comps.iter().enumerate() {
            let shown = rel(&comps[..=i]);
            let next = cur.join(c);
            match fs::symlink_metadata(&next) {
                Ok(_) => {}
                Err(e) if create && e.kind() == io::ErrorKind::NotFound => {
                    match fs::create_dir(&next) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                        Err(e) => return Err(Fail::io(&e, &format!("creating {}", show(&shown)))),
                    }
                }
                Err(e) => return Err(Fail::io(&e, &show(&shown))),
            }
            let real = fs::canonicalize(&next).map_err(|e| Fail::io(&e, &show(&shown)))?;
            cur = self.check(real, &shown)?;
            if !cur.is_dir() {
                return Err(Fail::new(
                    "not_a_directory",
                    format!("{} is not a folder", show(&shown)),
                ));
            }
        }
        Ok(cur)
    }

    /// The path of `real` (inside the root) relative to the root.
    pub fn rel_of(&self, real: &Path) -> String {
        real.strip_prefix(&self.path)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// A relative path for messages (`"."` for the root).
pub fn show(rel: &str) -> String {
    if rel.is_empty() {
        "\".\"".into()
    } else {
        format!("\"{rel}\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_rules() {
        assert_eq!(parse("").unwrap(), Vec::<String>::new());
        assert_eq!(parse(".").unwrap(), Vec::<String>::new());
        assert_eq!(parse("a//./b/").unwrap(), vec!["a", "b"]);
        for bad in ["..", "a/../b", "/etc", "a\0b"] {
            assert_eq!(parse(bad).unwrap_err().code, "invalid_path", "{bad:?}");
        }
        assert_eq!(parse(&"a".repeat(256)).unwrap_err().code, "invalid_path");
        assert_eq!(parse(&"a/".repeat(2049)).unwrap_err().code, "invalid_path");
        assert!(parse("..a/b..").is_ok());
    }
}
