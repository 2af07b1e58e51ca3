//! The sandbox manager: one container per user, created, woken, paused, stopped and removed
//! through one transition function per change, single-flight per user.
//!
//! Docker is the truth about containers (found by their labels at start-up), the store is the
//! truth about sessions and history, and the table here is a cache of both. A container is only
//! ever found through the authenticated [`UserId`], never through a string a client sent.

pub mod agent;
mod docker;
pub(crate) mod events;
pub mod exec;
pub mod firewall;
pub mod health;
pub(crate) mod idle;
pub mod inventory;
mod manager;
mod recover;
pub mod replicas;
pub mod shell;
mod slot;
pub mod spec;
pub mod swarm;
mod workspace;

/// What the bench and the integration tests reach below the door: the engine client itself, to
/// measure floors and to stage containers behind sandboxd's back. Not for feature code.
#[doc(hidden)]
pub mod testing {
    pub use super::docker::{Engine, ExecOutput, ExecSpec, ExecStream};
}

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex as StdMutex};

use tokio::sync::Semaphore;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::user::UserId;
use docker::{Engine, EngineError};

pub use slot::{RunGuard, Running, Slot, TerminalGuard};
pub use workspace::ensure_workspace_dir;

/// A sandbox's state as clients see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Running,
    Paused,
    Stopped,
}

impl State {
    /// The engine's container state as clients see it: anything not running or paused
    /// (created, exited, dead, restarting…) is stopped.
    pub(crate) fn of_engine(s: docker::DockerState) -> State {
        match s {
            docker::DockerState::Running => State::Running,
            docker::DockerState::Paused => State::Paused,
            _ => State::Stopped,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Paused => "paused",
            State::Stopped => "stopped",
        }
    }
}

/// Errors callers tell apart (the API maps each to a status and a stable code).
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("no sandbox for this user")]
    NotFound,
    #[error("all {0} sandbox slots are in use and none is idle; retry later")]
    CapacityFull(usize),
    #[error("too many concurrent executions for this user (limit {0})")]
    TooManyExecutions(usize),
    #[error("the sandbox image {0} is missing; run `sandboxd image build`")]
    ImageMissing(String),
    #[error("the workspace folder is unusable: {0}")]
    Workspace(String),
    /// The in-sandbox agent did not answer and restarting it did not help.
    #[error("the sandbox's agent is not answering: {0}")]
    AgentUnavailable(String),
    /// The engine is unreachable or restarting (see health.rs).
    #[error("{0}")]
    EngineUnavailable(String),
    /// Swarm mode: the node holding the user's sandbox (and workspace) is down or unreachable,
    /// or no node takes new sandboxes (see swarm/).
    #[error("{0}")]
    NodeUnavailable(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<EngineError> for SandboxError {
    fn from(e: EngineError) -> Self {
        match e.node_message() {
            Some(m) => SandboxError::NodeUnavailable(m),
            None => SandboxError::Internal(e.into()),
        }
    }
}

impl SandboxError {
    /// An internal error that is a node failure underneath becomes [`SandboxError::NodeUnavailable`].
    pub(crate) fn sorted(self) -> Self {
        match self {
            SandboxError::Internal(e) => {
                match docker::engine_error(&e).and_then(EngineError::node_message) {
                    Some(m) => SandboxError::NodeUnavailable(m),
                    None => SandboxError::Internal(e),
                }
            }
            e => e,
        }
    }
}

/// A snapshot of one user's sandbox.
#[derive(Clone, Debug)]
pub struct Sandbox {
    pub user: UserId,
    pub container_id: String,
    pub container_name: String,
    pub state: State,
    pub ip: Option<IpAddr>,
    pub created_at: i64,
    pub last_activity: i64,
    /// Swarm mode: the hostname of the node that holds it (`None` on one host).
    pub node: Option<String>,
    /// Where its agent listens and its key (never shown; see agent/).
    pub(crate) agent: Option<agent::Endpoint>,
}

pub struct Manager {
    pub(super) cfg: Arc<Config>,
    pub(super) engine: Engine,
    pub(super) store: Store,
    pub(super) network: String,
    pub(super) workspaces: PathBuf,
    /// Keyed by validated user ids that the platform issued (a slot is made only for an
    /// authenticated or stored user), so a cheap keyed hasher serves: clients cannot fill the
    /// map with keys of their choosing.
    pub(super) slots: StdMutex<HashMap<UserId, Arc<Slot>, foldhash::fast::RandomState>>,
    pub(super) capacity: Arc<Semaphore>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) health: Arc<health::Health>,
    /// Several replicas sharing the store (replicas.rs).
    pub(super) replicas: replicas::Replicas,
    /// Swarm mode's inventory (`None` on one host).
    pub(super) swarm: Option<Arc<swarm::Swarm>>,
    /// Called with a sandbox's address just before its container is stopped or removed
    /// ([`Manager::on_stopping`]).
    pub(super) stopping_hooks: StdMutex<Vec<StoppingHook>>,
}

/// See [`Manager::on_stopping`].
pub(super) type StoppingHook = Box<dyn Fn(std::net::IpAddr) + Send + Sync>;
