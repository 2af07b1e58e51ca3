//! The host folders bind-mounted as each sandbox's /workspace.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use crate::user::UserId;

use super::{spec, Manager, SandboxError};

impl Manager {
    pub(super) fn prepare_workspace(&self, user: &UserId) -> Result<PathBuf, SandboxError> {
        let path = self.workspace_path(user);
        ensure_workspace_dir(&path).map_err(|e| SandboxError::Workspace(format!("{e:#}")))?;
        Ok(path)
    }
}

/// Creates `path` as a real directory owned by the sandbox user. Refuses a symlink or anything
/// that is not a directory, so nothing planted there can redirect the bind mount or the chown.
pub fn ensure_workspace_dir(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => bail!("{} is a symlink", path.display()),
        Ok(m) if !m.is_dir() => bail!("{} is not a directory", path.display()),
        Ok(m) => {
            if m.uid() != spec::SANDBOX_UID || m.gid() != spec::SANDBOX_GID {
                std::os::unix::fs::lchown(path, Some(spec::SANDBOX_UID), Some(spec::SANDBOX_GID))
                    .with_context(|| format!("chown {}", path.display()))?;
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir(path).with_context(|| format!("mkdir {}", path.display()))?;
            std::os::unix::fs::lchown(path, Some(spec::SANDBOX_UID), Some(spec::SANDBOX_GID))
                .with_context(|| format!("chown {}", path.display()))?;
        }
        Err(e) => return Err(e).with_context(|| format!("stat {}", path.display())),
    }
    Ok(())
}
