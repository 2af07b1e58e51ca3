//! The one door into a sandbox: feature code runs the fixed bash programs named by [`Script`]
//! (files under `src/sandbox/scripts/`, compiled in) in the container of an authenticated
//! [`UserId`]. Data reaches a program only as arguments, environment or stdin, never inside its
//! text, and no container or exec id leaves this module.

use std::sync::Arc;

use super::docker::{ExecInfo, ExecOutput, ExecSpec};
use super::{Manager, SandboxError};
use crate::user::UserId;

/// A fixed bash program run inside a sandbox. Each one documents its arguments at its top.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Script {
    /// Restarts the sandbox's agent in place of whatever holds its port (no arguments; the key
    /// in the environment); see agent/door.rs.
    AgentStart,
    /// Kills the processes of one run or one terminal (`$1` mark variable, `$2` id, `$3` scope,
    /// `$4` pause between passes).
    Kill,
    /// The first process on a terminal's PTY; run by `script`, see [`Script::argv`].
    TermWrapper,
    /// Resizes a terminal's PTY (`$1` terminal id, `$2` cols, `$3` rows).
    TermResize,
    /// Whether `/workspace/$1` exists.
    ProjectExists,
    /// Scaffolds a Node project named `$1`.
    ProjectNode,
    /// Scaffolds a React + Vite project named `$1`.
    ProjectVite,
    /// Makes project `$1` the preview app and restarts the dev server.
    PreviewMark,
    /// Whether an app may still start listening.
    PreviewAppMayCome,
    /// Swarm mode's network guard: installs the rules of `$1` (run as root with NET_ADMIN in a
    /// helper container sharing the sandbox's network namespace; see swarm/rules.rs).
    NetGuard,
}

impl Script {
    /// The program's text.
    pub fn source(self) -> &'static str {
        match self {
            Script::AgentStart => include_str!("scripts/agent-start.sh"),
            Script::Kill => include_str!("scripts/kill.sh"),
            Script::TermWrapper => include_str!("scripts/term-wrapper.sh"),
            Script::TermResize => include_str!("scripts/term-resize.sh"),
            Script::ProjectExists => include_str!("scripts/project-exists.sh"),
            Script::ProjectNode => include_str!("scripts/project-node.sh"),
            Script::ProjectVite => include_str!("scripts/project-vite.sh"),
            Script::PreviewMark => include_str!("scripts/preview-mark.sh"),
            Script::PreviewAppMayCome => include_str!("scripts/preview-app-may-come.sh"),
            Script::NetGuard => include_str!("scripts/net-guard.sh"),
        }
    }

    /// `$0` of the program: what `ps` in the sandbox shows.
    fn name(self) -> &'static str {
        match self {
            Script::Kill => "sandboxd-kill",
            Script::AgentStart => "sandboxd-agent-start",
            Script::TermWrapper => "sandboxd-terminal",
            Script::TermResize => "sandboxd-term-resize",
            Script::ProjectExists
            | Script::ProjectNode
            | Script::ProjectVite
            | Script::PreviewMark => "sandboxd-project",
            Script::PreviewAppMayCome => "sandboxd-preview",
            Script::NetGuard => "sandboxd-net-guard",
        }
    }

    /// The exec's command line. The terminal wrapper runs under `script`, which makes the PTY
    /// (-q no banner, -f flush at once, -e the shell's status is ours, -c the command); it takes
    /// no arguments. Every other program runs as `bash -c <text> <name> <args…>`.
    pub(crate) fn argv(self, args: &[String]) -> Vec<String> {
        match self {
            Script::TermWrapper => vec![
                "script".into(),
                "-qfec".into(),
                self.source().into(),
                "/dev/null".into(),
            ],
            _ => ["bash", "-c", self.source(), self.name()]
                .into_iter()
                .map(str::to_owned)
                .chain(args.iter().cloned())
                .collect(),
        }
    }
}

/// How an attached program runs besides its arguments.
#[derive(Clone, Debug, Default)]
pub struct ExecOptions {
    /// `NAME=value` entries (server-made values only).
    pub env: Vec<String>,
    /// The working folder inside the container (`/workspace` when `None`).
    pub working_dir: Option<String>,
    /// Whether the caller writes to the program's stdin.
    pub stdin: bool,
}

/// The output of an attached program, stdout and stderr interleaved as they came.
pub type Output = super::docker::ExecStream;
/// The stdin of an attached program.
pub type Input = super::docker::ExecInput;
pub use super::docker::ExecOutput as OutputChunk;

/// A user's woken sandbox, bound to the container it had when entered: programs run through it
/// reach that container even if the user's sandbox is replaced meanwhile (a terminal's clean-up
/// must never land in a newer container).
#[derive(Clone)]
pub struct Door {
    pub(super) mgr: Arc<Manager>,
    pub(super) container: String,
    pub(super) slot: Arc<super::Slot>,
    /// The container's agent (`None` while it has no address).
    pub(super) agent: Option<super::agent::Endpoint>,
}

/// An attached program started through a [`Door`]; its streams are handed out beside it.
pub struct Exec {
    door: Door,
    exec_id: String,
}

/// Whether an exec still runs and how it ended.
#[derive(Clone, Copy, Debug)]
pub struct ExecStatus {
    pub running: bool,
    pub exit_code: Option<i64>,
}

impl From<ExecInfo> for ExecStatus {
    fn from(i: ExecInfo) -> Self {
        ExecStatus {
            running: i.running,
            exit_code: i.exit_code,
        }
    }
}

impl Manager {
    /// Wakes the user's sandbox (creating, starting or unpausing it, like
    /// [`Manager::ensure_running`]) and returns the door into it.
    pub async fn enter(self: &Arc<Self>, user: &UserId) -> Result<Door, SandboxError> {
        let sb = self.ensure_running(user).await?;
        Ok(Door {
            mgr: self.clone(),
            container: sb.container_id,
            slot: self.slot(user),
            agent: sb.agent,
        })
    }

    /// Runs `script` to completion in the user's sandbox as it is now, without waking it (a
    /// paused or stopped sandbox refuses the exec): `(exit code, first 64 KiB of output)`.
    pub async fn run_script(
        &self,
        user: &UserId,
        script: Script,
        args: &[String],
    ) -> Result<(i64, String), SandboxError> {
        let sb = self.status(user).await?;
        let _gate = self.exec_gate(user).await?; // replicas: no pause meanwhile
        Ok(self.engine.run(&sb.container_id, script.argv(args)).await?)
    }

    /// Asks the engine whether it answers (the health check).
    pub async fn engine_ping(&self) -> anyhow::Result<()> {
        Ok(self.engine.ping().await?)
    }
}

impl Door {
    /// Runs `script` to completion: `(exit code, first 64 KiB of output)`.
    pub async fn run_script(
        &self,
        script: Script,
        args: &[String],
    ) -> anyhow::Result<(i64, String)> {
        let _gate = self.mgr.exec_gate(&self.slot.user).await?; // replicas: no pause meanwhile
        Ok(self
            .mgr
            .engine
            .run(&self.container, script.argv(args))
            .await?)
    }

    /// Starts `script` attached: the handle for its status, its output and its stdin (closed
    /// at once unless [`ExecOptions::stdin`]).
    pub async fn open_exec(
        &self,
        script: Script,
        args: &[String],
        opts: ExecOptions,
    ) -> anyhow::Result<(Exec, Output, Input)> {
        let working_dir = opts
            .working_dir
            .as_deref()
            .unwrap_or(super::spec::WORKSPACE);
        let gate = self.mgr.exec_gate(&self.slot.user).await?; // replicas: no pause meanwhile
        let (exec_id, output, input) = self
            .mgr
            .engine
            .exec(
                &self.container,
                ExecSpec {
                    cmd: script.argv(args),
                    env: opts.env,
                    working_dir: Some(working_dir),
                    // See terminal/mod.rs: the engine's TTY would filter detach keys, so programs
                    // that need a PTY make their own.
                    tty: false,
                    stdin: opts.stdin,
                },
            )
            .await?;
        drop(gate);
        let exec = Exec {
            door: self.clone(),
            exec_id,
        };
        Ok((exec, output, input))
    }
}

impl Exec {
    /// Whether the program still runs and its exit code once it ended.
    pub async fn status(&self) -> anyhow::Result<ExecStatus> {
        Ok(self
            .door
            .mgr
            .engine
            .exec_info(&self.door.container, &self.exec_id)
            .await?
            .into())
    }

    /// The door the program was started through (to run helper scripts next to it).
    pub fn door(&self) -> &Door {
        &self.door
    }
}

/// Takes stdout and stderr alike.
pub fn bytes_of(chunk: OutputChunk) -> bytes::Bytes {
    match chunk {
        ExecOutput::Stdout(b) | ExecOutput::Stderr(b) => b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Script; 10] = [
        Script::AgentStart,
        Script::Kill,
        Script::TermWrapper,
        Script::TermResize,
        Script::ProjectExists,
        Script::ProjectNode,
        Script::ProjectVite,
        Script::PreviewMark,
        Script::PreviewAppMayCome,
        Script::NetGuard,
    ];

    #[test]
    fn scripts_are_bash_files_with_no_placeholders() {
        for s in ALL {
            let text = s.source();
            assert!(text.starts_with("#!/usr/bin/env bash\n"), "{s:?}");
            // Nothing is ever formatted into a program: no Rust-style placeholders.
            assert!(!text.contains("{name}") && !text.contains("{}"), "{s:?}");
        }
    }

    #[test]
    fn arguments_follow_the_text() {
        let argv = Script::ProjectExists.argv(&["x y".into()]);
        assert_eq!(argv[..2], ["bash", "-c"]);
        assert_eq!(argv[2], Script::ProjectExists.source());
        assert_eq!(argv[3], "sandboxd-project");
        assert_eq!(argv[4], "x y");
        let wrapper = Script::TermWrapper.argv(&["ignored".into()]);
        assert_eq!(
            wrapper,
            ["script", "-qfec", Script::TermWrapper.source(), "/dev/null"]
        );
    }

    #[test]
    fn ids_are_checked_before_use() {
        for s in [Script::Kill, Script::TermResize] {
            assert!(s.source().contains("*[!0-9a-f]*) exit 2"), "{s:?}");
        }
    }
}
