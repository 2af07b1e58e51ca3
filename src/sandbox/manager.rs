//! The manager's lifecycle: waking (create, start, unpause) single-flight per user, the boot
//! quota, capacity and eviction, syncing with the engine, pausing, stopping and removing, and
//! running code.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};

use crate::config::Config;
use crate::metrics::{Metrics, Op};
use crate::store::{now_ms, Store};
use crate::user::UserId;
use docker::{DockerState, Engine, EngineFailure, ErrorKind};

use super::slot::{Container, RunGuard, Running};
use super::{
    agent, docker, exec, firewall, health, spec, swarm, Manager, Sandbox, SandboxError, Slot,
    State, TerminalGuard,
};

/// How often the boot watcher looks for the app's port.
const PROBE_EVERY: Duration = Duration::from_millis(20);

/// Numbers each boot whose quota is watched.
static BOOT_GEN: AtomicU64 = AtomicU64::new(0);

impl Manager {
    /// Connects to the engine, prepares the network (with the packet filter around it, before
    /// any sandbox is adopted or made) and the workspace root, then rebuilds state from Docker's
    /// labels and reconciles the store.
    pub async fn start(cfg: Arc<Config>, store: Store) -> anyhow::Result<Arc<Self>> {
        // replicas: counted as alive before the packet filter is installed, so an exiting
        // replica never removes it from under this one (sandbox/replicas.rs).
        let replicas = super::replicas::Replicas::new(&cfg, &store).await?;
        // Swarm mode: the manager(s), the overlay and the node inventory (swarm/); one host:
        // the engine and the packet filter around the instance's bridge.
        let (engine, network, swarm) = match &cfg.swarm {
            None => {
                let engine = Engine::connect().await?;
                let network = firewall::install_around(&cfg, &engine).await?;
                (engine, network, None)
            }
            Some(sc) => {
                let (engine, swarm) = swarm::Swarm::open(&cfg).await?;
                (engine, sc.network.clone(), Some(Arc::new(swarm)))
            }
        };
        std::fs::create_dir_all(&cfg.workspaces_dir)
            .with_context(|| format!("creating workspaces_dir {}", cfg.workspaces_dir.display()))?;
        let workspaces = cfg.workspaces_dir.canonicalize().with_context(|| {
            format!("resolving workspaces_dir {}", cfg.workspaces_dir.display())
        })?;
        let mgr = Arc::new(Manager {
            capacity: Arc::new(Semaphore::new(cfg.max_containers)),
            health: health::Health::monitored(engine.clone()),
            replicas,
            cfg,
            engine,
            store,
            network,
            workspaces,
            slots: StdMutex::new(HashMap::default()),
            metrics: Arc::new(Metrics::new()),
            swarm,
            stopping_hooks: StdMutex::new(Vec::new()),
        });
        mgr.recover().await?;
        mgr.follow_health();
        mgr.follow_swarm();
        Ok(mgr)
    }

    pub fn health_tracker(&self) -> &health::Health {
        &self.health
    }

    /// Runs engine work for a request: refused at once while the engine is down, abandoned
    /// (the caller gets its answer) when the engine goes down mid-way, and a transport failure
    /// marks the engine down. Engine answers such as 404 pass through unchanged.
    pub(super) async fn engine_bound<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, SandboxError>>,
    ) -> Result<T, SandboxError> {
        let rx = self.health.subscribe();
        if !self.health.is_up() {
            return Err(SandboxError::EngineUnavailable(self.health.down_message()));
        }
        tokio::select! {
            r = work => match r.map_err(SandboxError::sorted) {
                Err(SandboxError::Internal(e)) if self.health.note_error(&e).await => {
                    Err(SandboxError::EngineUnavailable(self.health.down_message()))
                }
                r => r,
            },
            _ = health::wait_down(rx) => {
                Err(SandboxError::EngineUnavailable(self.health.down_message()))
            }
        }
    }

    /// Like [`Self::engine_bound`] but never abandons `work`, for work that must not stop
    /// half-way.
    pub(super) async fn engine_checked<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, SandboxError>>,
    ) -> Result<T, SandboxError> {
        if !self.health.is_up() {
            return Err(SandboxError::EngineUnavailable(self.health.down_message()));
        }
        match work.await.map_err(SandboxError::sorted) {
            Err(SandboxError::Internal(e)) if self.health.note_error(&e).await => {
                Err(SandboxError::EngineUnavailable(self.health.down_message()))
            }
            r => r,
        }
    }

    /// [`Self::engine_bound`] for a plain engine call.
    pub async fn engine_call<T>(
        &self,
        call: impl std::future::Future<Output = anyhow::Result<T>>,
    ) -> Result<T, SandboxError> {
        self.engine_bound(async { call.await.map_err(SandboxError::Internal) })
            .await
    }

    /// Takes every sandbox off the preview's fast path while the engine is down, and re-reads
    /// each one from the engine when it is back (a restart stops containers; the next request
    /// then starts them through the usual wake path).
    pub(super) fn follow_health(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let mut rx = self.health.subscribe();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let up = rx.borrow_and_update().is_up();
                let Some(mgr) = weak.upgrade() else { break };
                for slot in mgr.all_slots() {
                    slot.hide();
                }
                if up {
                    for slot in mgr.all_slots() {
                        let _ = mgr.status_inner(&slot.user).await;
                    }
                }
            }
        });
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }
    pub fn store(&self) -> &Store {
        &self.store
    }
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }
    /// Counts an engine error for the metrics ("not found" is an answer, not an error).
    pub(super) fn engine_failed(&self, e: &impl EngineFailure) {
        if e.engine_kind() != Some(ErrorKind::NotFound) {
            self.metrics.engine_error();
        }
    }

    pub fn slot(&self, user: &UserId) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots
            .entry(user.clone())
            .or_insert_with(|| {
                Arc::new(Slot {
                    user: user.clone(),
                    inner: Mutex::new(None),
                    last_activity: AtomicI64::new(now_ms()),
                    flushed_activity: AtomicI64::new(0),
                    exec_permits: Arc::new(Semaphore::new(self.cfg.exec_per_user)),
                    terminals: AtomicUsize::new(0),
                    runs: AtomicUsize::new(0),
                    fast: StdMutex::new(None),
                    agent_restart: Mutex::new(()),
                    node_down: Default::default(),
                })
            })
            .clone()
    }

    pub(super) fn existing_slot(&self, user: &UserId) -> Option<Arc<Slot>> {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(user)
            .cloned()
    }

    pub fn all_slots(&self) -> Vec<Arc<Slot>> {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub fn workspace_path(&self, user: &UserId) -> PathBuf {
        self.workspaces.join(format!("user-{user}"))
    }

    /// The user's workspace folder on this host (`None` in swarm mode: a volume on a node).
    pub fn host_workspace(&self, user: &UserId) -> Option<PathBuf> {
        self.swarm.is_none().then(|| self.workspace_path(user))
    }

    /// Records activity for the idle policy (in memory; the idle task flushes it to the store).
    pub fn touch(&self, user: &UserId) {
        if let Some(slot) = self.existing_slot(user) {
            slot.touch();
        }
    }

    /// Counts a preview request waiting for the app as busy until the guard drops.
    pub fn request_held(&self, user: &UserId) -> RunGuard {
        let slot = self.slot(user);
        slot.touch();
        RunGuard::new(slot)
    }

    /// Counts an open terminal until the guard drops.
    pub fn terminal_opened(&self, user: &UserId) -> TerminalGuard {
        let slot = self.slot(user);
        slot.terminals.fetch_add(1, Ordering::Relaxed);
        slot.touch();
        TerminalGuard(slot)
    }

    /// Whether the store knows this user (the preview wakes only known users).
    pub async fn is_known(&self, user: &UserId) -> anyhow::Result<bool> {
        if self.existing_slot(user).is_some() {
            return Ok(true);
        }
        let session = self.store.session(user).await;
        Ok(session
            .inspect_err(|_| self.metrics.store_error())?
            .is_some())
    }

    /// The running container's IP without touching Docker (the preview's hot path).
    pub fn running_ip(&self, user: &UserId) -> Option<IpAddr> {
        self.running(user).map(|r| r.ip())
    }

    /// [`Manager::running_ip`] with a handle to record the request's later activity on
    /// ([`Running::touch`]) without a second lookup. Records activity now, too.
    pub fn running(&self, user: &UserId) -> Option<Running> {
        if !self.health.is_up() {
            return None;
        }
        let slot = self.existing_slot(user)?;
        if slot.node_down.load(Ordering::Relaxed) {
            return None;
        }
        let fast = *slot.fast.lock().unwrap_or_else(|p| p.into_inner());
        match fast {
            Some((State::Running, Some(ip))) => {
                slot.touch();
                Some(Running::new(ip, slot))
            }
            _ => None,
        }
    }

    /// Creates, starts or unpauses the user's sandbox, single-flight. Runs as its own task so a
    /// caller that goes away (a dropped request) cannot leave a half-made container behind.
    pub async fn ensure_running(self: &Arc<Self>, user: &UserId) -> Result<Sandbox, SandboxError> {
        let this = self.clone();
        let user = user.clone();
        self.engine_bound(async move {
            // In the caller's span: the transition's log lines carry its request id.
            let task = async move { this.ensure_running_inner(&user).await };
            tokio::spawn(tracing::Instrument::in_current_span(task))
                .await
                .map_err(|e| SandboxError::Internal(anyhow!("start task failed: {e}")))?
        })
        .await
    }

    pub(super) async fn ensure_running_inner(
        &self,
        user: &UserId,
    ) -> Result<Sandbox, SandboxError> {
        let asked = Instant::now();
        let slot = self.slot(user);
        slot.touch();
        let mut guard = self.lock_user(&slot).await?; // replicas: the user's lock across replicas
        let result = self.bring_up(&slot, &mut guard, asked).await;
        slot.publish(&guard);
        if result.is_err() {
            self.wake_failed(user).await; // replicas: its reservation under the cap goes
        }
        result
    }

    pub(super) async fn bring_up(
        &self,
        slot: &Slot,
        guard: &mut Option<Container>,
        asked: Instant,
    ) -> Result<Sandbox, SandboxError> {
        let user = &slot.user;
        // Swarm mode: a container on the user's node that the table does not hold is adopted.
        self.adopt_from_node(slot, guard).await?;
        // The idle policy's pause is the common wake: unpause at once, one engine call. The
        // engine refuses when the container is no longer paused (changed behind our back), and
        // then its state is checked against Docker like any other wake's, below.
        if let Some(c) = guard
            .as_mut()
            .filter(|c| c.state == State::Paused && c.ip.is_some())
        {
            let t = Instant::now();
            if self.engine.unpause(&c.id).await.is_ok() {
                self.resumed(user, guard, t, asked).await?;
                return Ok(self.snapshot(slot, guard).expect("a container is present"));
            }
        }
        // Never trust the cached state: check it against Docker. A container may have been
        // paused, stopped, killed or removed behind our back (events.rs usually got there first).
        if let Err(e) = self.sync_locked(slot, guard, None).await {
            self.engine_failed(&e);
            return Err(e.into());
        }
        match guard.as_mut() {
            Some(c) if c.state == State::Running && c.ip.is_some() => {}
            Some(c) if c.state == State::Paused => {
                let t = Instant::now();
                let r = self.engine.unpause(&c.id).await;
                r.inspect_err(|e| self.engine_failed(e))?;
                self.resumed(user, guard, t, asked).await?;
            }
            Some(c) => {
                // Stopped (or running without an address): start it again.
                if c.permit.is_none() {
                    c.permit = Some(self.acquire_capacity(user).await?);
                }
                let id = c.id.clone();
                let t = Instant::now();
                // The boot quota goes in beside the start: before it, the engine keeps it for
                // the start; after it, it updates the running cgroup. Either way the app boots
                // with it, and the wake does not wait for one more engine call.
                let boost = self.boost_enabled();
                let (started, boosted) = tokio::join!(self.start_container(c), async {
                    if !boost {
                        return false;
                    }
                    match self
                        .engine
                        .set_cpus(&id, self.cfg.limits.boot_nano_cpus)
                        .await
                    {
                        Ok(()) => true,
                        Err(e) => {
                            tracing::warn!(user = %user, error = format!("{e:#}"), "raising the CPU quota for the boot");
                            false
                        }
                    }
                });
                c.boosted |= boosted;
                if let Err(e) = started {
                    self.engine_failed(&e);
                    c.permit = None;
                    self.event(user, Some(&id), "failed", Some(&format!("{e:#}")))
                        .await;
                    return Err(e.into());
                }
                self.metrics.transition(Op::Start, t.elapsed());
                self.metrics.wake(State::Stopped, asked.elapsed());
                self.watch_boot(user, c);
                self.event(user, Some(&id), "started", None).await;
                self.save(user, guard, Some(now_ms())).await?;
            }
            None => {
                let permit = self.acquire_capacity(user).await?;
                // Swarm mode: the node that holds (or will hold) the user's workspace volume.
                let node = self.place(user).await?;
                let workspace = match node {
                    None => self.prepare_workspace(user)?,
                    Some(_) => PathBuf::new(),
                };
                let t = Instant::now();
                let agent_key = spec::new_agent_key();
                let created = self
                    .engine
                    .create(&self.cfg, user, &workspace, &agent_key, node.as_deref())
                    .await;
                // The image is looked up only when the create failed for something missing
                // (one engine call less on every cold start).
                let (id, name) = match created {
                    Ok(v) => v,
                    Err(e)
                        if e.kind() == ErrorKind::NotFound
                            && !self
                                .engine
                                .image_exists(node.as_deref(), &self.cfg.image)
                                .await? =>
                    {
                        return Err(SandboxError::ImageMissing(self.cfg.image.clone()));
                    }
                    Err(e) => {
                        self.engine_failed(&e);
                        return Err(e.into());
                    }
                };
                if let Some(node) = &node {
                    self.record_node(user, node).await?;
                }
                self.detach_for_start(user, &id).await;
                self.metrics.transition(Op::Create, t.elapsed());
                let mut c = Container {
                    id: id.clone(),
                    name,
                    state: State::Stopped,
                    ip: None,
                    created_at: now_ms(),
                    permit: Some(permit),
                    // Created with the boot quota (spec.rs).
                    boosted: self.boost_enabled(),
                    boot_gen: 0,
                    agent_key: agent_key.into(),
                };
                let t = Instant::now();
                // The history's write goes beside the start, not before it.
                let (started, ()) = tokio::join!(
                    self.start_container(&mut c),
                    self.event(user, Some(&id), "created", None)
                );
                if let Err(e) = started {
                    self.engine_failed(&e);
                    // A container that never started is of no use: remove it, keep the story.
                    let _ = self.engine.remove(&id).await;
                    self.event(user, Some(&id), "failed", Some(&format!("{e:#}")))
                        .await;
                    return Err(e.into());
                }
                self.metrics.transition(Op::Start, t.elapsed());
                self.watch_boot(user, &mut c);
                self.event(user, Some(&id), "started", None).await;
                *guard = Some(c);
                self.save(user, guard, Some(now_ms())).await?;
            }
        }
        Ok(self.snapshot(slot, guard).expect("a container is present"))
    }

    /// After an unpause: the metrics, the history and the table say so (the two writes side
    /// by side).
    async fn resumed(
        &self,
        user: &UserId,
        guard: &mut Option<Container>,
        unpause: Instant,
        asked: Instant,
    ) -> Result<(), SandboxError> {
        self.metrics.transition(Op::Unpause, unpause.elapsed());
        self.metrics.wake(State::Paused, asked.elapsed());
        let c = guard.as_mut().expect("a container is present");
        c.state = State::Running;
        let id = c.id.clone();
        let (saved, ()) = tokio::join!(
            self.save(user, guard, None),
            self.event(user, Some(&id), "resumed", None)
        );
        Ok(saved?)
    }

    pub(super) async fn start_container(&self, c: &mut Container) -> anyhow::Result<()> {
        tokio::time::timeout(self.cfg.start_timeout, async {
            self.engine.start(&c.id).await?;
            // Swarm mode: the network guard goes in before the init starts anything.
            self.guard_network(&c.id).await?;
            let mut i = self.engine.inspect(&c.id, &self.network).await?;
            if i.state != DockerState::Running {
                bail!("container is {:?} right after start", i.state);
            }
            if i.ip.is_none() && self.swarm.is_none() {
                // Started off its network (see `detach_for_start`): attached now, while the
                // init and the app boot.
                self.engine.attach(&c.id, &self.network).await?;
                i = self.engine.inspect(&c.id, &self.network).await?;
            }
            c.ip =
                Some(i.ip.ok_or_else(|| anyhow!("container has no address on {}", self.network))?);
            c.state = State::Running;
            Ok(())
        })
        .await
        .map_err(|_| anyhow!("starting the container took longer than start_timeout"))?
    }

    /// One host: takes a created or stopped container off the sandbox network, so its next
    /// start does not wait for the engine's network setup (endpoint, address, DNS resolver:
    /// about a third of the engine's start); [`Self::start_container`] attaches it right after
    /// the start, while the init and the app boot (the app listens on every address, so it
    /// answers on the new one). Until then the sandbox has loopback only. A failure here only
    /// loses that overlap: the start then attaches it as usual.
    pub(super) async fn detach_for_start(&self, user: &UserId, id: &str) {
        if self.swarm.is_some() {
            return;
        }
        if let Err(e) = self.engine.detach(id, &self.network).await {
            tracing::warn!(user = %user, error = format!("{e:#}"), "taking a sandbox off its network before its start");
        }
    }

    pub(super) fn boost_enabled(&self) -> bool {
        self.cfg.limits.boot_nano_cpus != self.cfg.limits.nano_cpus
    }

    /// After a boosted start: gives the configured CPU quota back once the app listens on the
    /// preview port, or when `boot_window` ends (a sandbox without an app), whichever is first.
    /// Pausing or stopping the sandbox gives it back at once ([`Self::unboost`]); a newer wake
    /// takes over from this watcher.
    pub(super) fn watch_boot(&self, user: &UserId, c: &mut Container) {
        if !c.boosted {
            return;
        }
        let gen = BOOT_GEN.fetch_add(1, Ordering::Relaxed) + 1;
        c.boot_gen = gen;
        let slot = self.slot(user);
        let engine = self.engine.clone();
        let id = c.id.clone();
        let nano = self.cfg.limits.nano_cpus;
        // Without an address (never after a successful start) only the window ends the boost.
        let addr =
            c.ip.map(|ip| SocketAddr::new(ip, crate::config::PREVIEW_PORT));
        let deadline = tokio::time::Instant::now() + self.cfg.boot_window;
        tokio::spawn(async move {
            let listening = loop {
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    break false;
                }
                let probe = (deadline - now).min(Duration::from_millis(250));
                if let Some(addr) = addr {
                    if let Ok(Ok(_)) =
                        tokio::time::timeout(probe, tokio::net::TcpStream::connect(addr)).await
                    {
                        break true;
                    }
                }
                tokio::time::sleep_until((tokio::time::Instant::now() + PROBE_EVERY).min(deadline))
                    .await;
            };
            let mut guard = slot.inner.lock().await;
            let Some(c) = guard.as_mut() else { return };
            if c.id != id || c.boot_gen != gen || !c.boosted {
                return;
            }
            match engine.set_cpus(&id, nano).await {
                Ok(()) => {
                    c.boosted = false;
                    tracing::debug!(user = %slot.user, listening, "boot over: configured CPU quota back");
                }
                // Kept marked: the next pause or stop, or an adoption at start-up, retries.
                Err(e) => {
                    tracing::warn!(user = %slot.user, error = format!("{e:#}"), "restoring the CPU quota after the boot")
                }
            }
        });
    }

    /// Gives the configured CPU quota back to a boosted container (paused or stopped before its
    /// boot was over).
    pub(super) async fn unboost(&self, user: &UserId, c: &mut Container) {
        if !c.boosted {
            return;
        }
        match self.engine.set_cpus(&c.id, self.cfg.limits.nano_cpus).await {
            Ok(()) => c.boosted = false,
            Err(e) => {
                tracing::warn!(user = %user, error = format!("{e:#}"), "restoring the CPU quota")
            }
        }
    }

    /// Takes a slot under the global cap, evicting the least recently active paused sandbox of
    /// another user when full. Paused means idle by policy, so nobody loses a live session.
    pub(super) async fn acquire_capacity(
        &self,
        user: &UserId,
    ) -> Result<OwnedSemaphorePermit, SandboxError> {
        // replicas: the cap counts every replica's sandboxes (sandbox/replicas.rs).
        if self.replicas.is_shared() {
            return self.acquire_shared_capacity(user).await;
        }
        for _ in 0..3 {
            if let Ok(p) = self.capacity.clone().try_acquire_owned() {
                return Ok(p);
            }
            let candidates = eviction_order(self.all_slots().into_iter().map(|s| {
                let seen = Evictable {
                    other_user: &s.user != user,
                    busy: s.busy(),
                    paused: self.fast_state(&s) == Some(State::Paused),
                    last_activity: s.last_activity(),
                };
                (s, seen)
            }));
            let mut evicted = false;
            for victim in candidates {
                // try_lock: never wait on another user's transition while holding ours.
                let Ok(mut g) = victim.inner.try_lock() else {
                    continue;
                };
                if matches!(g.as_ref(), Some(c) if c.state == State::Paused) {
                    self.stop_locked(&victim, &mut g, "evicted for capacity")
                        .await?;
                    evicted = true;
                    break;
                }
            }
            if !evicted {
                break;
            }
        }
        self.capacity
            .clone()
            .try_acquire_owned()
            .map_err(|_| SandboxError::CapacityFull(self.cfg.max_containers))
    }

    pub(super) fn snapshot(&self, slot: &Slot, c: &Option<Container>) -> Option<Sandbox> {
        c.as_ref().map(|c| Sandbox {
            user: slot.user.clone(),
            container_id: c.id.clone(),
            container_name: c.name.clone(),
            state: c.state,
            ip: c.ip,
            created_at: c.created_at,
            last_activity: slot.last_activity(),
            node: self.node_name(&c.id),
            agent: c.ip.map(|ip| agent::Endpoint {
                addr: std::net::SocketAddr::new(ip, agent::AGENT_PORT),
                key: c.agent_key.clone(),
            }),
        })
    }

    pub(super) async fn save(
        &self,
        user: &UserId,
        c: &Option<Container>,
        started_at: Option<i64>,
    ) -> anyhow::Result<()> {
        let r = match c {
            Some(c) => {
                self.store
                    .save_session(user, Some((&c.id, &c.name)), c.state.as_str(), started_at)
                    .await
            }
            None => self.store.save_session(user, None, "removed", None).await,
        };
        if r.is_ok() {
            // replicas: the others drop their cached state (sandbox/replicas.rs).
            let state = c.as_ref().map_or("removed", |c| c.state.as_str());
            self.announce(user, state).await;
        }
        r.inspect_err(|_| self.metrics.store_error())
    }

    /// Appends to the history. A failing store must not undo a container operation that
    /// already happened, so this logs instead of failing the caller.
    pub(super) async fn event(
        &self,
        user: &UserId,
        cid: Option<&str>,
        kind: &str,
        reason: Option<&str>,
    ) {
        tracing::info!(user = %user, container = cid.unwrap_or("-"), kind, reason = reason.unwrap_or(""), "sandbox event");
        if let Err(e) = self.store.add_event(user, cid, kind, reason).await {
            self.metrics.store_error();
            tracing::error!(user = %user, error = format!("{e:#}"), "recording event failed");
        }
    }

    /// The user's sandbox as it is now, without starting anything.
    pub async fn status(&self, user: &UserId) -> Result<Sandbox, SandboxError> {
        self.engine_bound(self.status_inner(user)).await
    }

    pub(super) async fn status_inner(&self, user: &UserId) -> Result<Sandbox, SandboxError> {
        let Some(slot) = self.slot_anywhere(user).await? else {
            // Swarm mode: not in the table because its node is away (503, not 404).
            return Err(self.absent(user).await);
        };
        let mut guard = self.lock_user(&slot).await?; // replicas
        let synced = self.sync_locked(&slot, &mut guard, None).await;
        slot.publish(&guard);
        synced?;
        self.snapshot(&slot, &guard).ok_or(SandboxError::NotFound)
    }

    /// Brings the cached container in line with what the engine says it is now. sandboxd holds
    /// the user's lock during its own transitions, so by the time anyone else looks, its own
    /// change is already in the table; any difference found here happened behind its back and
    /// is recorded as an event whose reason starts with `external:` (`cause` says what the
    /// engine reported, e.g. `die (exit 137)`; without it the inspected state is described).
    pub(super) async fn sync_locked(
        &self,
        slot: &Slot,
        guard: &mut Option<Container>,
        cause: Option<&str>,
    ) -> anyhow::Result<()> {
        let user = &slot.user;
        let Some(c) = guard.as_mut() else {
            return Ok(());
        };
        let i = match self.engine.inspect(&c.id, &self.network).await {
            Ok(i) => i,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                let id = c.id.clone();
                *guard = None;
                let reason = format!("external: {}", cause.unwrap_or("container is gone"));
                self.metrics.outside_change("removed");
                self.event(user, Some(&id), "removed", Some(&reason)).await;
                return self.save(user, guard, None).await;
            }
            Err(e) => return Err(e.into()),
        };
        let now = State::of_engine(i.state);
        if i.ip.is_some() {
            c.ip = i.ip;
        } else if now == State::Running {
            // Running off its network (started outside sandboxd while detached, see
            // `detach_for_start`): no address to send to until a wake attaches it.
            c.ip = None;
        }
        if now == c.state {
            return Ok(());
        }
        let kind = match (c.state, now) {
            (State::Paused, State::Running) => "resumed",
            (_, State::Running) => "started",
            (_, State::Paused) => "paused",
            (_, State::Stopped) => "stopped",
        };
        let mut reason = match cause {
            Some(cause) => format!("external: {cause}"),
            None => match (now, i.exit_code) {
                (State::Stopped, Some(code)) => format!("external: found exited (exit {code})"),
                _ => format!("external: found {}", now.as_str()),
            },
        };
        if now == State::Stopped && i.oom_killed && !reason.contains("oom") {
            reason.push_str(", oom-killed");
        }
        c.state = now;
        if now == State::Stopped {
            c.permit = None;
        } else if c.permit.is_none() {
            // Started behind our back: it counts against the cap like any live sandbox.
            c.permit = self.capacity.clone().try_acquire_owned().ok();
            if c.permit.is_none() {
                tracing::warn!(user = %user, "a sandbox started outside sandboxd puts it over max_containers");
            }
        }
        self.metrics.outside_change(kind);
        if kind == "started" {
            // Swarm mode: started behind our back, its network guard is not in (its init waits
            // for it, and stops after 10 s without).
            if let Err(e) = self.guard_network(&c.id).await {
                tracing::warn!(user = %user, error = format!("{e:#}"), "guarding a sandbox started outside sandboxd");
            }
        }
        let id = c.id.clone();
        self.event(user, Some(&id), kind, Some(&reason)).await;
        self.save(user, guard, None).await
    }

    /// Applies what the engine reported about `container_id` (events.rs). Events about a
    /// container that is not the user's current one (one sandboxd is removing, a failed
    /// create) are ignored.
    pub async fn observe(&self, user: &UserId, container_id: &str, cause: &str) {
        let Some(slot) = self.existing_slot(user) else {
            return;
        };
        // replicas: under the user's lock across replicas, reloaded from the store, so a change
        // another replica made (and recorded) is not recorded again.
        let mut guard = match self.lock_user(&slot).await {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(user = %user, error = format!("{e:#}"), "applying an engine event");
                return;
            }
        };
        if guard.as_ref().map(|c| c.id.as_str()) != Some(container_id) {
            return;
        }
        if let Err(e) = self.sync_locked(&slot, &mut guard, Some(cause)).await {
            tracing::warn!(user = %user, error = format!("{e:#}"), "applying an engine event");
        }
        slot.publish(&guard);
    }

    /// Re-inspects every known container and applies what changed. Run when the event stream
    /// (re)connects, so whatever happened while it was down (an engine restart stops every
    /// container) is in the table and the store before the next request. Returns how many
    /// containers could not be inspected.
    pub(super) async fn resync(&self, cause: &str) -> usize {
        let mut failed = 0;
        for slot in self.all_slots() {
            let mut guard = match self.lock_user(&slot).await {
                Ok(g) => g, // replicas
                Err(e) => {
                    tracing::warn!(user = %slot.user, error = format!("{e:#}"), "re-checking a sandbox");
                    failed += 1;
                    continue;
                }
            };
            if let Err(e) = self.sync_locked(&slot, &mut guard, Some(cause)).await {
                tracing::warn!(user = %slot.user, error = format!("{e:#}"), "re-checking a sandbox");
                failed += 1;
            }
            slot.publish(&guard);
        }
        failed
    }

    /// Re-inspects the user's container now (the preview's backstop when an answer is late)
    /// and returns its state; `None` when the user has no container.
    pub async fn refresh(&self, user: &UserId) -> anyhow::Result<Option<State>> {
        let Some(slot) = self.slot_anywhere(user).await? else {
            return Ok(None);
        };
        let mut guard = self.lock_user(&slot).await?; // replicas
        let synced = self.sync_locked(&slot, &mut guard, None).await;
        slot.publish(&guard);
        synced?;
        Ok(guard.as_ref().map(|c| c.state))
    }

    /// Stops and removes the user's container; the workspace and the history stay.
    pub async fn exit(&self, user: &UserId) -> Result<bool, SandboxError> {
        // Not abandoned mid-way (it takes the container out of the table first); each of its
        // calls fails fast when the engine goes away and is bounded by the client's timeout.
        self.engine_checked(self.exit_inner(user)).await
    }

    pub(super) async fn exit_inner(&self, user: &UserId) -> Result<bool, SandboxError> {
        let Some(slot) = self.slot_anywhere(user).await? else {
            return Ok(false);
        };
        let mut guard = self.lock_user(&slot).await?; // replicas
        let Some(c) = guard.take() else {
            return Ok(false);
        };
        slot.publish(&guard);
        self.stopping(&c);
        let t = Instant::now();
        // Stop first so the init gets its short grace period, then force-remove.
        if let Err(e) = self
            .engine
            .stop(&c.id, self.cfg.stop_timeout.as_secs() as i64)
            .await
        {
            if e.kind() != ErrorKind::NotFound {
                tracing::warn!(user = %user, error = format!("{e:#}"), "stop before remove failed");
            }
        }
        if let Err(e) = self.engine.remove(&c.id).await {
            self.engine_failed(&e);
            *guard = Some(c);
            slot.publish(&guard);
            return Err(e.into());
        }
        self.metrics.transition(Op::Remove, t.elapsed());
        self.event(user, Some(&c.id), "removed", Some("exit requested"))
            .await;
        self.save(user, &guard, None).await?;
        Ok(true)
    }

    /// Registers `hook`, called with a sandbox's address just before its container is stopped
    /// or removed, while its network still answers. The preview closes its idle connections to
    /// the app then: closed after the container is gone, their FINs are retransmitted to an
    /// address nobody holds, the host's neighbour entry for it goes INCOMPLETE, and when the
    /// same container starts again (same address) every SYN to it waits for the next ARP
    /// solicitation, up to a second later.
    pub fn on_stopping(&self, hook: impl Fn(IpAddr) + Send + Sync + 'static) {
        let mut hooks = self
            .stopping_hooks
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        hooks.push(Box::new(hook));
    }

    /// Runs the [`on_stopping`](Self::on_stopping) hooks for `c`'s address.
    fn stopping(&self, c: &Container) {
        let Some(ip) = c.ip else { return };
        let hooks = self
            .stopping_hooks
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for hook in hooks.iter() {
            hook(ip);
        }
    }

    /// Pauses the user's sandbox if it is running.
    pub async fn pause(&self, user: &UserId, reason: &str) -> anyhow::Result<()> {
        self.pause_if_idle(user, 0, reason).await
    }

    /// Pauses the user's sandbox if it is running and has been idle for `min_idle_ms`, checked
    /// under the user's lock so a request that just touched it is never frozen mid-flight.
    pub(super) async fn pause_if_idle(
        &self,
        user: &UserId,
        min_idle_ms: i64,
        reason: &str,
    ) -> anyhow::Result<()> {
        let Some(slot) = self.slot_anywhere(user).await? else {
            return Ok(());
        };
        let mut guard = self.lock_user(&slot).await?; // replicas
        if !slot.idle_for(min_idle_ms) {
            return Ok(());
        }
        if let Some(c) = guard.as_mut() {
            if c.state == State::Running {
                // Take the sandbox off the preview's fast path before freezing it, so no request
                // is sent to a container that is being paused: they wait on our lock instead.
                slot.hide();
                let _no_exec_starting = self.pause_gate(user).await?; // replicas
                let t = Instant::now();
                if let Err(e) = self.engine.pause(&c.id).await {
                    self.engine_failed(&e);
                    slot.publish(&guard);
                    return Err(e.into());
                }
                self.metrics.transition(Op::Pause, t.elapsed());
                c.state = State::Paused;
                self.unboost(user, c).await;
                self.event(user, Some(&c.id), "paused", Some(reason)).await;
                self.save(user, &guard, None).await?;
            }
        }
        slot.publish(&guard);
        Ok(())
    }

    /// Stops the user's sandbox if it is live; the container stays for a wake.
    pub async fn stop(&self, user: &UserId, reason: &str) -> anyhow::Result<()> {
        self.stop_if_idle(user, 0, reason).await
    }

    /// Stops the user's sandbox if it has been idle for `min_idle_ms` (checked under the lock).
    pub(super) async fn stop_if_idle(
        &self,
        user: &UserId,
        min_idle_ms: i64,
        reason: &str,
    ) -> anyhow::Result<()> {
        let Some(slot) = self.slot_anywhere(user).await? else {
            return Ok(());
        };
        let mut guard = self.lock_user(&slot).await?; // replicas
        if !slot.idle_for(min_idle_ms) {
            return Ok(());
        }
        self.stop_locked(&slot, &mut guard, reason).await
    }

    pub(super) async fn stop_locked(
        &self,
        slot: &Slot,
        guard: &mut Option<Container>,
        reason: &str,
    ) -> anyhow::Result<()> {
        let user = &slot.user;
        if let Some(c) = guard.as_mut() {
            if c.state != State::Stopped {
                if c.state == State::Paused {
                    // A paused container cannot receive the stop signal; resume it first.
                    if let Err(e) = self.engine.unpause(&c.id).await {
                        tracing::warn!(user = %user, error = format!("{e:#}"), "unpause before stop");
                    }
                }
                slot.hide();
                self.stopping(c);
                let t = Instant::now();
                let stopped = self
                    .engine
                    .stop(&c.id, self.cfg.stop_timeout.as_secs() as i64)
                    .await;
                if let Err(e) = stopped {
                    self.engine_failed(&e);
                    slot.publish(guard);
                    return Err(e.into());
                }
                self.metrics.transition(Op::Stop, t.elapsed());
                c.state = State::Stopped;
                c.permit = None;
                let id = c.id.clone();
                tokio::join!(self.unboost(user, c), self.detach_for_start(user, &id));
                self.event(user, Some(&c.id), "stopped", Some(reason)).await;
                self.save(user, guard, None).await?;
            }
        }
        slot.publish(guard);
        Ok(())
    }

    /// Runs code for the user, creating or waking the sandbox first.
    pub async fn execute(
        self: &Arc<Self>,
        user: &UserId,
        req: exec::ExecRequest,
    ) -> Result<exec::ExecResult, SandboxError> {
        let slot = self.slot(user);
        let _permit = slot
            .exec_permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| SandboxError::TooManyExecutions(self.cfg.exec_per_user))?;
        let _running = RunGuard::new(slot.clone());
        let t = Instant::now();
        let res = async {
            let door = self.enter(user).await?;
            slot.touch();
            let retry = req.clone();
            let mut res = exec::run_code(&door, req, &self.cfg).await;
            let gone = matches!(&res, Err(SandboxError::AgentUnavailable(_)))
                && self.status(user).await.map(|s| s.state).ok() != Some(State::Running);
            if gone {
                // Paused, stopped or removed behind our back between the wake and the run:
                // wake through the normal path and run it once more.
                let door = self.enter(user).await?;
                res = exec::run_code(&door, retry, &self.cfg).await;
            }
            slot.touch();
            res
        }
        .await;
        self.metrics
            .execution(crate::metrics::Outcome::of(&res), t.elapsed());
        res
    }

    /// Writes in-memory activity to the store for slots whose activity moved.
    pub async fn flush_activity(&self) {
        for slot in self.all_slots() {
            let last = slot.last_activity();
            if slot.flushed_activity.swap(last, Ordering::Relaxed) != last {
                if let Err(e) = self.store.touch(&slot.user, last).await {
                    self.metrics.store_error();
                    tracing::warn!(user = %slot.user, error = format!("{e:#}"), "flushing activity");
                }
            }
        }
    }

    /// Current state per user (for the idle policy), read without waiting on transitions.
    pub fn fast_state(&self, slot: &Slot) -> Option<State> {
        slot.fast
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|(s, _)| s)
    }

    pub fn live_count(&self) -> usize {
        self.cfg.max_containers - self.capacity.available_permits()
    }
}

/// What eviction looks at in a slot.
#[derive(Clone, Copy, Debug)]
pub(super) struct Evictable {
    /// Not the user asking for a slot.
    pub(super) other_user: bool,
    /// An open terminal or a run in flight.
    pub(super) busy: bool,
    /// Paused (idle by policy, so nobody loses a live session).
    pub(super) paused: bool,
    pub(super) last_activity: i64,
}

/// The sandboxes that may be evicted to make room, least recently active first: another user's,
/// paused and not busy.
pub(super) fn eviction_order<T>(slots: impl IntoIterator<Item = (T, Evictable)>) -> Vec<T> {
    let mut take: Vec<(T, Evictable)> = slots
        .into_iter()
        .filter(|(_, e)| e.other_user && !e.busy && e.paused)
        .collect();
    take.sort_by_key(|(_, e)| e.last_activity);
    take.into_iter().map(|(t, _)| t).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(other_user: bool, busy: bool, paused: bool, last_activity: i64) -> Evictable {
        Evictable {
            other_user,
            busy,
            paused,
            last_activity,
        }
    }

    #[test]
    fn evicts_idle_paused_sandboxes_of_others_oldest_first() {
        let order = eviction_order([
            ("recent", seen(true, false, true, 300)),
            ("oldest", seen(true, false, true, 100)),
            ("mine", seen(false, false, true, 0)),
            ("busy", seen(true, true, true, 0)),
            ("running", seen(true, false, false, 0)),
            ("middle", seen(true, false, true, 200)),
        ]);
        assert_eq!(order, ["oldest", "middle", "recent"]);
    }
}
