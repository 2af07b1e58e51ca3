//! Several replicas, one service. Replicas with the same `instance`, `auth_secret` and
//! PostgreSQL database behave as one sandboxd:
//!
//! - **One transition per user at a time, across replicas.** Every change of a user's sandbox
//!   (and every look that may record one) runs under the user's local lock *and* a PostgreSQL
//!   advisory lock held by a connection of this replica (`Manager::lock_user`); the wait is
//!   bounded (`start_timeout` + 30 s) and a replica that dies loses its connection and so its
//!   locks. Right after taking it, the slot is reloaded from the store (the truth about what
//!   any replica did), so a container another replica made, paused or removed is this
//!   replica's too, and a difference with the engine found under the lock is really external:
//!   it is recorded once, by whichever replica finds it first (events are not doubled).
//! - **One global cap.** Under a capacity lock, `max_containers` is compared with every
//!   replica's live sessions in the store plus slots reserved by creates under way
//!   (`Manager::acquire_shared_capacity`); eviction stops the least recently active paused
//!   sandbox of any replica.
//! - **What must run once runs on the leader**: the idle sweep. The leader holds an advisory
//!   lock on a connection of its own; the others try it every second, so a dead leader is
//!   replaced within about a second after PostgreSQL drops its connection. Every replica
//!   flushes its activity (busy sandboxes touched) every second, and the leader decides from
//!   the store's activity, re-checked under the user's lock.
//! - **No pause while an exec starts**, on any replica: exec starts (shell.rs) hold a shared
//!   advisory lock that a pause takes exclusively (`Manager::pause_gate`), as the engine
//!   client's gate does within one process.
//! - **The packet filter outlives every replica but the last**: each holds a shared "alive"
//!   lock from before it installs the rules; at shutdown the rules go only when this replica
//!   was the last holder and no sandbox is live in the store (`Replicas::last_one`).
//! - **Changes visible within a second.** Every saved change is announced with `NOTIFY`; the
//!   other replicas drop that user's fast path (address and state), so their next request
//!   takes the locked path and reloads.
//!
//! With SQLite there is one replica: the locks are the local ones, the replica leads from the
//! start, nothing is announced.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use tokio::sync::{watch, MutexGuard, OwnedSemaphorePermit, Semaphore};

use crate::config::Config;
use crate::store::replicas::{alive, lock_key, try_hold, Alive, Change, Held, Shared};
use crate::store::{now_ms, Backend, SessionRow, Store};
use crate::user::UserId;

use super::docker::ErrorKind;
use super::slot::Container;
use super::{spec, Manager, SandboxError, Slot, State};

/// How often a replica tries to become the leader (and the leader checks it still is).
pub const LEADER_EVERY: Duration = Duration::from_secs(1);
/// Rounds of eviction when the cap is reached, and the wait between rounds whose candidates
/// were all locked.
const EVICTION_ROUNDS: usize = 5;
const EVICTION_RETRY: Duration = Duration::from_millis(100);
/// How long a pause waits for exec starts of other replicas to end.
pub const PAUSE_GATE_WAIT: Duration = Duration::from_secs(5);
/// With replicas, activity reaches the store at least this often.
pub const ACTIVITY_EVERY: Duration = Duration::from_secs(1);

/// This replica's place among the others.
pub struct Replicas {
    id: String,
    shared: Option<Arc<Shared>>,
    leader: watch::Sender<bool>,
    last_sweep: StdMutex<Option<Instant>>,
    /// Holds the instance's "alive" lock in shared mode while this replica runs (exclusively
    /// at exit when it is the last one, until the packet filter is gone).
    alive: tokio::sync::Mutex<Option<Alive>>,
}

impl Replicas {
    /// With PostgreSQL, waits until no replica is removing the instance's packet filter on its
    /// way out, and counts this one as alive.
    pub(super) async fn new(cfg: &Config, store: &Store) -> anyhow::Result<Replicas> {
        let shared = match store.backend() {
            Backend::Postgres => Some(Arc::new(Shared::new(&cfg.database_url, lock_wait(cfg))?)),
            Backend::Sqlite => None,
        };
        let alive = match &shared {
            Some(s) => Some(
                s.join(lock_key(&cfg.instance, "alive", ""))
                    .await
                    .map_err(|e| e.context("joining the other replicas"))?,
            ),
            None => None,
        };
        // The one replica of a SQLite store leads from the start.
        let (leader, _) = watch::channel(shared.is_none());
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        Ok(Replicas {
            id,
            shared,
            leader,
            last_sweep: StdMutex::new(None),
            alive: tokio::sync::Mutex::new(alive),
        })
    }

    /// At shutdown: whether this replica may remove the instance's packet filter, i.e. it is
    /// the last replica running and the store has no live sandbox. When true, no replica can
    /// start until [`Self::close`] (it waits for the filter to be gone, then installs its own).
    pub(crate) async fn last_one(&self, store: &Store) -> bool {
        let mut alive = self.alive.lock().await;
        let Some(alive) = alive.as_mut() else {
            return self.shared.is_none();
        };
        let key_free = match alive.last_holder().await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "asking whether other replicas run"
                );
                false
            }
        };
        key_free && store.count_live().await.is_ok_and(|n| n == 0)
    }

    /// Whether other replicas may share the store (PostgreSQL).
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// Whether this replica runs what must run once (the idle sweep).
    pub fn is_leader(&self) -> bool {
        *self.leader.borrow()
    }

    /// Follows leadership changes.
    pub fn leadership(&self) -> watch::Receiver<bool> {
        self.leader.subscribe()
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub(crate) async fn close(&self) {
        self.alive.lock().await.take();
        if let Some(s) = &self.shared {
            s.close().await;
        }
    }
}

/// How long a replica waits for another's lock on a user: longer than any transition.
pub fn lock_wait(cfg: &Config) -> Duration {
    cfg.start_timeout + Duration::from_secs(30)
}

/// A reservation under the cap older than this belongs to a replica that died mid-way.
fn reservation_ttl(cfg: &Config) -> Duration {
    lock_wait(cfg) + Duration::from_secs(30)
}

/// The idle task's tick: at least every [`ACTIVITY_EVERY`] with replicas.
pub(super) fn tick(mgr: &Manager, every: Duration) -> Duration {
    if mgr.replicas.is_shared() {
        every.min(ACTIVITY_EVERY)
    } else {
        every
    }
}

/// A user's lock: the local one, and the replicas' one while the store is shared.
pub(super) struct UserLock<'a> {
    guard: MutexGuard<'a, Option<Container>>,
    _held: Option<Held>,
}

impl Deref for UserLock<'_> {
    type Target = Option<Container>;
    fn deref(&self) -> &Option<Container> {
        &self.guard
    }
}

impl DerefMut for UserLock<'_> {
    fn deref_mut(&mut self) -> &mut Option<Container> {
        &mut self.guard
    }
}

/// The store's state of a session as a client state (`removed` and unknown: stopped).
pub(super) fn parse_state(s: &str) -> State {
    match s {
        "running" => State::Running,
        "paused" => State::Paused,
        _ => State::Stopped,
    }
}

/// What the idle policy does to a sandbox idle for `idle_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum IdleAction {
    Pause,
    Stop,
}

pub(super) fn idle_action(
    state: State,
    idle_ms: i64,
    pause_after: i64,
    stop_after: i64,
) -> Option<IdleAction> {
    match state {
        State::Running | State::Paused if idle_ms >= stop_after => Some(IdleAction::Stop),
        State::Running if idle_ms >= pause_after => Some(IdleAction::Pause),
        _ => None,
    }
}

/// A live session's state (a container, running or paused).
fn live_state(s: &SessionRow) -> Option<State> {
    let state = parse_state(&s.state);
    (s.container_id.is_some() && state != State::Stopped).then_some(state)
}

impl Manager {
    pub fn replicas(&self) -> &Replicas {
        &self.replicas
    }

    fn user_key(&self, user: &UserId) -> i64 {
        lock_key(&self.cfg.instance, "user", user.as_str())
    }

    /// Takes the user's lock (local, then across replicas) and reloads the slot from the store.
    pub(super) async fn lock_user<'a>(&self, slot: &'a Slot) -> anyhow::Result<UserLock<'a>> {
        let mut guard = slot.inner.lock().await;
        let Some(shared) = &self.replicas.shared else {
            return Ok(UserLock { guard, _held: None });
        };
        let held = shared.lock(self.user_key(&slot.user)).await?;
        self.reload(slot, &mut guard).await?;
        Ok(UserLock {
            guard,
            _held: Some(held),
        })
    }

    /// [`Self::lock_user`] without waiting: `None` when anyone holds it.
    pub(super) async fn try_lock_user<'a>(
        &self,
        slot: &'a Slot,
    ) -> anyhow::Result<Option<UserLock<'a>>> {
        let Ok(mut guard) = slot.inner.try_lock() else {
            return Ok(None);
        };
        let Some(shared) = &self.replicas.shared else {
            return Ok(Some(UserLock { guard, _held: None }));
        };
        let Some(held) = shared.try_lock(self.user_key(&slot.user)).await? else {
            return Ok(None);
        };
        self.reload(slot, &mut guard).await?;
        Ok(Some(UserLock {
            guard,
            _held: Some(held),
        }))
    }

    /// The replicas' lock on a user alone (start-up, before the slot is filled).
    pub(super) async fn hold_user(&self, user: &UserId) -> anyhow::Result<Option<Held>> {
        match &self.replicas.shared {
            Some(shared) => Ok(Some(shared.lock(self.user_key(user)).await?)),
            None => Ok(None),
        }
    }

    /// Held while this replica starts an exec in the user's sandbox (shell.rs): another
    /// replica's pause waits for it ([`Self::pause_gate`]), as the engine client's own gate
    /// does within one replica (a container frozen while an exec joins it hangs for good).
    pub(super) async fn exec_gate(&self, user: &UserId) -> anyhow::Result<Option<Held>> {
        match &self.replicas.shared {
            Some(shared) => Ok(Some(
                shared
                    .lock_shared(lock_key(&self.cfg.instance, "exec", user.as_str()))
                    .await?,
            )),
            None => Ok(None),
        }
    }

    /// Held around a pause: no replica is starting an exec in the sandbox meanwhile. Tried
    /// for [`PAUSE_GATE_WAIT`] (a script may hold it for as long as it runs, and the user's
    /// lock is held meanwhile), then the pause fails; the idle policy tries again next round.
    pub(super) async fn pause_gate(&self, user: &UserId) -> anyhow::Result<Option<Held>> {
        let Some(shared) = &self.replicas.shared else {
            return Ok(None);
        };
        let key = lock_key(&self.cfg.instance, "exec", user.as_str());
        let until = Instant::now() + PAUSE_GATE_WAIT;
        loop {
            if let Some(held) = shared.try_lock(key).await? {
                return Ok(Some(held));
            }
            if Instant::now() >= until {
                anyhow::bail!("an exec is being started in the sandbox by another replica");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Brings the cached container in line with the store (under the replicas' lock): what
    /// another replica made, changed or removed; the engine is asked only about a container
    /// this replica did not know or one that went live (its address may have changed).
    async fn reload(&self, slot: &Slot, guard: &mut Option<Container>) -> anyhow::Result<()> {
        let Some(row) = self.store.session(&slot.user).await? else {
            return Ok(());
        };
        slot.last_activity
            .fetch_max(row.last_activity, Ordering::Relaxed);
        let Some(id) = row.container_id else {
            *guard = None;
            // A reservation nobody saved, seen under the user's lock: its replica died between
            // reserving and saving, and may have left a container behind.
            if self.store.reserved_at(&slot.user).await?.is_some() {
                self.adopt_left_behind(slot, guard).await?;
            }
            return Ok(());
        };
        let state = parse_state(&row.state);
        self.learn_home(&slot.user, &id).await?; // swarm: a container another replica made
        let known = guard.as_ref().is_some_and(|c| c.id == id);
        if known {
            let c = guard.as_mut().expect("known");
            if c.state == state {
                return Ok(());
            }
            let was = c.state;
            c.state = state;
            if was == State::Stopped && state != State::Stopped {
                c.ip = self
                    .engine
                    .inspect(&id, &self.network)
                    .await
                    .ok()
                    .and_then(|i| i.ip);
            }
            self.fix_permit(c);
            return Ok(());
        }
        let (ip, key) = match self.engine.inspect(&id, &self.network).await {
            Ok(i) => (i.ip, i.agent_key),
            Err(e) if e.kind() == ErrorKind::NotFound => (None, None),
            Err(e) => return Err(e.into()),
        };
        let mut c = Container {
            id,
            name: row.container_name.unwrap_or_default(),
            state,
            ip,
            created_at: row.created_at,
            permit: None,
            boosted: false,
            boot_gen: 0,
            agent_key: key.unwrap_or_else(spec::new_agent_key).into(),
        };
        self.fix_permit(&mut c);
        *guard = Some(c);
        Ok(())
    }

    /// Adopts the container a dead replica made for the user and never saved (the newest live
    /// one; any other is removed), so the next wake does not make a second one.
    async fn adopt_left_behind(
        &self,
        slot: &Slot,
        guard: &mut Option<Container>,
    ) -> anyhow::Result<()> {
        let user = &slot.user;
        let (found, _) = self.engine.list_managed(&self.cfg.instance).await?;
        let mine: Vec<_> = found.into_iter().filter(|m| &m.user == user).collect();
        if mine.is_empty() {
            self.store.unreserve(user).await?;
            return Ok(());
        }
        let (keep, dups) = super::recover::keep_one(mine, None);
        for dup in dups {
            self.engine.remove(&dup.id).await?;
            self.event(
                user,
                Some(&dup.id),
                "removed",
                Some("duplicate left by a replica that stopped"),
            )
            .await;
        }
        let i = self.engine.inspect(&keep.id, &self.network).await?;
        let keep_id = keep.id.clone();
        let mut c = Container::found(keep, State::of_engine(i.state), i.ip, i.agent_key, None);
        self.fix_permit(&mut c);
        *guard = Some(c);
        self.event(
            user,
            Some(&keep_id),
            "adopted",
            Some("left by a replica that stopped"),
        )
        .await;
        self.save(user, guard, None).await
    }

    /// A live container holds a local permit when one is free (the store's count is the cap).
    fn fix_permit(&self, c: &mut Container) {
        if c.state == State::Stopped {
            c.permit = None;
        } else if c.permit.is_none() {
            c.permit = self.capacity.clone().try_acquire_owned().ok();
        }
    }

    /// A user's slot as the store last saw it (the leader's sweep, eviction): a slot made here
    /// starts with the store's activity, not with "now".
    fn slot_as_stored(&self, user: &UserId, last_activity: i64) -> Arc<Slot> {
        if let Some(s) = self.existing_slot(user) {
            return s;
        }
        let s = self.slot(user);
        s.last_activity.store(last_activity, Ordering::Relaxed);
        s.flushed_activity.store(last_activity, Ordering::Relaxed);
        s
    }

    /// The user's slot if this replica knows the user, or (replicas) if the store has a
    /// container for them that another replica made.
    pub(super) async fn slot_anywhere(&self, user: &UserId) -> anyhow::Result<Option<Arc<Slot>>> {
        if let Some(s) = self.existing_slot(user) {
            return Ok(Some(s));
        }
        if !self.replicas.is_shared() {
            return Ok(None);
        }
        let row = self.store.session(user).await?;
        Ok(row.filter(|r| r.container_id.is_some()).map(|r| {
            let slot = self.slot_as_stored(user, r.last_activity);
            // A request's first look at this user on this replica is activity too (the
            // request's own touch found no slot).
            slot.touch();
            slot
        }))
    }

    /// Tells the other replicas that the user's session changed.
    pub(super) async fn announce(&self, user: &UserId, state: &str) {
        if !self.replicas.is_shared() {
            return;
        }
        let change = Change {
            instance: self.cfg.instance.clone(),
            replica: self.replicas.id.clone(),
            user: user.clone(),
            state: state.to_owned(),
        };
        if let Err(e) = self.store.notify(&change).await {
            self.metrics.store_error();
            tracing::warn!(user = %user, error = format!("{e:#}"), "announcing a change to the other replicas");
        }
    }

    /// Another replica changed a session: this replica's fast path for it goes (the next
    /// request takes the locked path, which reloads).
    fn apply_change(&self, payload: &str) {
        let Some(change) = Change::parse(payload) else {
            return;
        };
        if change.instance != self.cfg.instance || change.replica == self.replicas.id {
            return;
        }
        if let Some(slot) = self.existing_slot(&change.user) {
            slot.hide();
            tracing::debug!(user = %change.user, state = change.state, "changed by another replica");
        }
    }

    /// The global cap with replicas: every replica's live sandboxes (the store) under the
    /// capacity lock; when full, the least recently active paused sandbox of another user,
    /// whichever replica made it, is stopped.
    pub(super) async fn acquire_shared_capacity(
        &self,
        user: &UserId,
    ) -> Result<OwnedSemaphorePermit, SandboxError> {
        let max = self.cfg.max_containers as i64;
        let key = lock_key(&self.cfg.instance, "capacity", "");
        for _ in 0..EVICTION_ROUNDS {
            let cutoff = now_ms() - reservation_ttl(&self.cfg).as_millis() as i64;
            if self.store.reserve_under_cap(key, user, max, cutoff).await? {
                return Ok(self.local_permit());
            }
            let victims = self.store.paused_except(user, 8).await?;
            let (mut evicted, mut contended) = (false, false);
            for v in victims {
                let Ok(vu) = UserId::parse(&v.user_id) else {
                    continue;
                };
                let slot = self.slot_as_stored(&vu, v.last_activity);
                // Never wait on another user's transition while holding ours.
                let Some(mut g) = self.try_lock_user(&slot).await? else {
                    contended = true;
                    continue;
                };
                if slot.busy() || !matches!(g.as_ref(), Some(c) if c.state == State::Paused) {
                    continue;
                }
                self.stop_locked(&slot, &mut g, "evicted for capacity")
                    .await?;
                evicted = true;
                break;
            }
            if !evicted && !contended {
                break;
            }
            if !evicted {
                // A candidate was in a transition (or its lock not yet given back, which
                // happens a moment after the transition): look again shortly.
                tokio::time::sleep(EVICTION_RETRY).await;
            }
        }
        Err(SandboxError::CapacityFull(self.cfg.max_containers))
    }

    /// After a wake that failed: the user's reservation under the cap goes at once (rather
    /// than when it expires).
    pub(super) async fn wake_failed(&self, user: &UserId) {
        if !self.replicas.is_shared() {
            return;
        }
        if let Err(e) = self.store.unreserve(user).await {
            self.metrics.store_error();
            tracing::warn!(user = %user, error = format!("{e:#}"), "giving up a reservation");
        }
    }

    fn local_permit(&self) -> OwnedSemaphorePermit {
        self.capacity
            .clone()
            .try_acquire_owned()
            .unwrap_or_else(|_| {
                // This replica still counts sandboxes the others have stopped since; the store's
                // count, just taken, is the cap.
                Arc::new(Semaphore::new(1))
                    .try_acquire_owned()
                    .expect("a fresh permit")
            })
    }

    /// At start-up, a session whose container this replica did not list: true when, under the
    /// user's lock, the store names another container or the engine still has it (another
    /// replica made it meanwhile).
    pub(super) async fn still_there(&self, user: &UserId) -> anyhow::Result<bool> {
        if !self.replicas.is_shared() {
            return Ok(false);
        }
        let _held = self.hold_user(user).await?;
        let Some(row) = self.store.session(user).await? else {
            return Ok(true);
        };
        let Some(id) = row.container_id else {
            return Ok(true);
        };
        self.learn_home(user, &id).await?; // swarm: a container another replica made
        match self.engine.inspect(&id, &self.network).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

/// One round of the idle task with replicas. Every replica counts its busy sandboxes as
/// active and flushes its activity; the leader, every `idle_check_every`, pauses and stops
/// from the store's sessions and activity (all replicas'), each re-checked under the user's
/// lock.
pub(super) async fn sweep_shared(mgr: &Arc<Manager>) {
    for slot in mgr.all_slots() {
        if slot.busy() {
            slot.touch();
        }
    }
    mgr.flush_activity().await;
    if !mgr.replicas.is_leader() || !mgr.health_tracker().is_up() {
        return;
    }
    {
        let mut last = mgr
            .replicas
            .last_sweep
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < mgr.config().idle_check_every) {
            return;
        }
        *last = Some(Instant::now());
    }
    let pause_after = mgr.config().idle_pause_after.as_millis() as i64;
    let stop_after = mgr.config().idle_stop_after.as_millis() as i64;
    let sessions = match mgr.store.sessions().await {
        Ok(s) => s,
        Err(e) => {
            mgr.metrics.store_error();
            tracing::warn!(
                error = format!("{e:#}"),
                "idle policy: reading the sessions"
            );
            return;
        }
    };
    let now = now_ms();
    for s in sessions {
        let Some(state) = live_state(&s) else {
            continue;
        };
        let Ok(user) = UserId::parse(&s.user_id) else {
            continue;
        };
        let slot = mgr.slot_as_stored(&user, s.last_activity);
        if slot.busy() {
            continue;
        }
        let idle = now - slot.last_activity().max(s.last_activity);
        let reason = format!("idle for {:?}", Duration::from_millis(idle.max(0) as u64));
        let result = match idle_action(state, idle, pause_after, stop_after) {
            Some(IdleAction::Stop) => mgr.stop_if_idle(&user, stop_after, &reason).await,
            Some(IdleAction::Pause) => mgr.pause_if_idle(&user, pause_after, &reason).await,
            None => Ok(()),
        };
        if let Err(e) = result {
            tracing::warn!(user = %user, error = format!("{e:#}"), "idle policy");
        }
    }
}

/// Clears the leader flag however the coordination task ends (shutdown, abort, panic).
struct NotLeaderOnDrop<'a>(&'a watch::Sender<bool>);

impl Drop for NotLeaderOnDrop<'_> {
    fn drop(&mut self) {
        self.0.send_replace(false);
    }
}

/// The replica's coordination task (PostgreSQL only): leader election and the listener.
pub async fn run(mgr: Arc<Manager>, mut shutdown: watch::Receiver<bool>) {
    let Some(shared) = mgr.replicas.shared.clone() else {
        return;
    };
    let _flag = NotLeaderOnDrop(&mgr.replicas.leader);
    tokio::select! {
        _ = lead(&mgr, &shared) => {}
        _ = listen(&mgr, &shared) => {}
        _ = shutdown.changed() => {}
    }
}

async fn lead(mgr: &Manager, shared: &Shared) {
    let key = lock_key(&mgr.cfg.instance, "leader", "");
    let mut conn = None;
    loop {
        keep_alive(mgr, shared).await;
        let leading = mgr.replicas.is_leader();
        let step = async {
            if conn.is_none() {
                conn = Some(shared.connection().await?);
            }
            let c = conn.as_mut().expect("connected");
            if leading {
                alive(c).await.map(|()| true)
            } else {
                try_hold(c, key).await
            }
        };
        let now_leading = match tokio::time::timeout(LEADER_EVERY * 2, step).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                tracing::warn!(error = format!("{e:#}"), "leader election: the database");
                conn = None;
                false
            }
            Err(_) => {
                tracing::warn!("leader election: the database is not answering");
                conn = None;
                false
            }
        };
        if now_leading != leading {
            tracing::info!(
                replica = mgr.replicas.id,
                leader = now_leading,
                "leadership changed"
            );
            mgr.replicas.leader.send_replace(now_leading);
        }
        tokio::time::sleep(LEADER_EVERY).await;
    }
}

/// Keeps this replica counted as alive: when the connection holding the "alive" lock is gone
/// (the database restarted), joins again and installs the packet filter again, since a replica
/// that exited meanwhile may have removed it believing it was the last.
async fn keep_alive(mgr: &Manager, shared: &Shared) {
    let mut alive = mgr.replicas.alive.lock().await;
    if let Some(a) = alive.as_mut() {
        if a.holds().await {
            return;
        }
    }
    *alive = None;
    match shared.join(lock_key(&mgr.cfg.instance, "alive", "")).await {
        Ok(a) => {
            *alive = Some(a);
            tracing::warn!("the replicas' alive lock was lost; joined again");
            // One host only: in swarm mode each sandbox carries its own rules (swarm/rules.rs).
            if mgr.swarm.is_some() {
                return;
            }
            if let Err(e) = super::firewall::install_around(&mgr.cfg, &mgr.engine).await {
                tracing::error!(
                    error = format!("{e:#}"),
                    "installing the packet filter again"
                );
            }
        }
        Err(e) => tracing::warn!(error = format!("{e:#}"), "joining the other replicas again"),
    }
}

async fn listen(mgr: &Manager, shared: &Shared) {
    let mut first = true;
    loop {
        let mut l = match shared.listener().await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = format!("{e:#}"), "listening for the other replicas");
                tokio::time::sleep(LEADER_EVERY).await;
                continue;
            }
        };
        if !first {
            // Whatever changed while nobody listened: every fast path goes.
            forget_all(mgr);
        }
        first = false;
        loop {
            match l.try_recv().await {
                Ok(Some(n)) => mgr.apply_change(n.payload()),
                // The connection was lost (the next call reconnects): changes may be missed.
                Ok(None) => forget_all(mgr),
                Err(e) => {
                    tracing::warn!(error = format!("{e:#}"), "listening for the other replicas");
                    break;
                }
            }
        }
        tokio::time::sleep(LEADER_EVERY).await;
    }
}

fn forget_all(mgr: &Manager) {
    for slot in mgr.all_slots() {
        slot.hide();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_policy_decisions() {
        let (p, s) = (1_000, 10_000);
        assert_eq!(idle_action(State::Running, 999, p, s), None);
        assert_eq!(
            idle_action(State::Running, 1_000, p, s),
            Some(IdleAction::Pause)
        );
        assert_eq!(idle_action(State::Paused, 5_000, p, s), None);
        assert_eq!(
            idle_action(State::Paused, 10_000, p, s),
            Some(IdleAction::Stop)
        );
        assert_eq!(
            idle_action(State::Running, 20_000, p, s),
            Some(IdleAction::Stop)
        );
        assert_eq!(idle_action(State::Stopped, 99_999, p, s), None);
    }

    #[test]
    fn stored_states() {
        assert_eq!(parse_state("running"), State::Running);
        assert_eq!(parse_state("paused"), State::Paused);
        assert_eq!(parse_state("stopped"), State::Stopped);
        assert_eq!(parse_state("removed"), State::Stopped);
        let row = |cid: Option<&str>, state: &str| SessionRow {
            user_id: "1".into(),
            container_id: cid.map(str::to_owned),
            container_name: None,
            state: state.into(),
            created_at: 0,
            started_at: None,
            last_activity: 0,
        };
        assert_eq!(live_state(&row(Some("c"), "paused")), Some(State::Paused));
        assert_eq!(live_state(&row(Some("c"), "stopped")), None);
        assert_eq!(live_state(&row(None, "removed")), None);
    }
}
