//! Per-user slots: the single-flight lock around a user's container, the lock-free copy of its
//! state for the preview's hot path, and the guards that keep a busy sandbox from going idle.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex};

use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};

use crate::store::now_ms;
use crate::user::UserId;

use super::docker::Managed;
use super::State;

pub(super) struct Container {
    pub(super) id: String,
    pub(super) name: String,
    pub(super) state: State,
    pub(super) ip: Option<IpAddr>,
    pub(super) created_at: i64,
    /// Held while the container is live (running or paused): the global cap is the semaphore.
    pub(super) permit: Option<OwnedSemaphorePermit>,
    /// Runs with the boot CPU quota (`boot_cpus`) until its app listens; see [`Manager::watch_boot`].
    pub(super) boosted: bool,
    /// Which boot the quota watcher in flight belongs to (a newer wake takes over).
    pub(super) boot_gen: u64,
    /// The key of the container's agent (its label, or made here for an older container).
    pub(super) agent_key: Arc<str>,
}

impl Container {
    /// A container found on an engine rather than made here (start-up, a node's inventory, one a
    /// stopped replica left behind), in the `state` and at the `ip` its inspection gave. It never
    /// runs with the boot quota. One made before the agent had keys (no label, no `key` from the
    /// inspection) gets a key here: the first call finds the agent deaf to it and restarts it
    /// with this one (agent/door.rs).
    pub(super) fn found(
        m: Managed,
        state: State,
        ip: Option<IpAddr>,
        key: Option<String>,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Container {
        Container {
            id: m.id,
            name: m.name,
            state,
            ip,
            created_at: if m.created > 0 { m.created } else { now_ms() },
            permit,
            boosted: false,
            boot_gen: 0,
            agent_key: m
                .agent_key
                .or(key)
                .unwrap_or_else(super::spec::new_agent_key)
                .into(),
        }
    }
}

/// Per-user slot. The async mutex is the single-flight: every transition for a user runs
/// under it, so 20 concurrent inits create exactly one container.
pub struct Slot {
    pub(super) user: UserId,
    pub(super) inner: Mutex<Option<Container>>,
    pub(super) last_activity: AtomicI64,
    pub(super) flushed_activity: AtomicI64,
    pub(super) exec_permits: Arc<Semaphore>,
    pub(super) terminals: AtomicUsize,
    /// Executions in flight: like an open terminal, they keep the sandbox from being paused,
    /// stopped or evicted under a run that outlasts the idle timeout.
    pub(super) runs: AtomicUsize,
    /// Lock-free copy of the state and IP for the preview's hot path.
    pub(super) fast: StdMutex<Option<(State, Option<IpAddr>)>>,
    /// Single-flight for restarting the agent (see agent/door.rs).
    pub(super) agent_restart: Mutex<()>,
    /// Swarm mode: the sandbox's node is unusable (the preview's fast path is closed).
    pub(super) node_down: AtomicBool,
}

impl Slot {
    pub fn touch(&self) {
        self.last_activity.fetch_max(now_ms(), Ordering::Relaxed);
    }
    pub fn last_activity(&self) -> i64 {
        self.last_activity.load(Ordering::Relaxed)
    }
    /// Idle for at least `min_idle_ms` with no open terminal (always true for 0).
    pub(super) fn idle_for(&self, min_idle_ms: i64) -> bool {
        min_idle_ms == 0 || (now_ms() - self.last_activity() >= min_idle_ms && !self.busy())
    }
    pub fn open_terminals(&self) -> usize {
        self.terminals.load(Ordering::Relaxed)
    }
    /// An open terminal or an execution in flight: the idle policy leaves the sandbox alone.
    pub fn busy(&self) -> bool {
        self.open_terminals() > 0 || self.runs.load(Ordering::Relaxed) > 0
    }
    /// Marks the sandbox as not running for the fast path while a transition is under way.
    pub(super) fn hide(&self) {
        *self.fast.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
    pub(super) fn publish(&self, c: &Option<Container>) {
        *self.fast.lock().unwrap_or_else(|p| p.into_inner()) = c.as_ref().map(|c| (c.state, c.ip));
    }
}

/// A running sandbox as the preview's hot path found it ([`super::Manager::running`]): its
/// address, and its slot, so that the activity after the answer is recorded without looking
/// the user up again (slots are never taken out of the manager's map: this is the same slot a
/// lookup would find).
pub struct Running {
    ip: IpAddr,
    slot: Arc<Slot>,
}

impl Running {
    pub(super) fn new(ip: IpAddr, slot: Arc<Slot>) -> Self {
        Running { ip, slot }
    }
    pub fn ip(&self) -> IpAddr {
        self.ip
    }
    /// Records activity for the idle policy, as [`super::Manager::touch`] does.
    pub fn touch(&self) {
        self.slot.touch();
    }
}

/// Counts a run in flight for the idle policy until dropped: an execution, or a preview request
/// held while the app boots (the idle policy must not pause or stop a sandbox whose first
/// request waits for its app; the wait's own checks are execs that can outlast
/// `idle_pause_after` on a busy host).
pub struct RunGuard(Arc<Slot>);

impl RunGuard {
    pub(super) fn new(slot: Arc<Slot>) -> Self {
        slot.runs.fetch_add(1, Ordering::Relaxed);
        RunGuard(slot)
    }
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        self.0.runs.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// Counts an open terminal for the idle policy until dropped.
pub struct TerminalGuard(pub(super) Arc<Slot>);

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        self.0.terminals.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}
