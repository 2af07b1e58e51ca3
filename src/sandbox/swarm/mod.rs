//! Swarm mode (`engine = "swarm"`): sandboxes on the nodes of a Docker Swarm.
//!
//! The swarm provides membership, the node inventory and an attachable overlay network; each
//! sandbox stays a standalone container with today's lifecycle and hardening, created through
//! the engine of the node chosen for its user ([`placement`]) and reached by its overlay address.
//! A user's workspace is a named volume on that node, so the user stays there (the store records
//! the node). The inventory (`GET /nodes` from a manager, [`nodes`]) is read every
//! [`REFRESH_EVERY`], and each node's engine is pinged: a node the swarm reports down, or whose
//! engine does not answer, is unusable, and its users get 503 `node_unavailable` at once (never
//! a new sandbox elsewhere while their workspace lives there); when it is back its sandboxes are
//! re-read and a user's container found there is adopted, not made twice. Isolation on the
//! shared overlay is [`rules`], installed in each sandbox at every start by a one-shot helper
//! container in its network namespace (`NET_ADMIN` only), then confirmed to the sandbox's init
//! by a root-owned marker.

pub mod endpoint;
pub mod nodes;
pub mod placement;
pub mod rules;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};

use super::docker::{Engine, ErrorKind, Managed};
use super::slot::Container;
use super::{shell::Script, spec, Manager, SandboxError, Slot, State};
use crate::config::{Config, SwarmConfig};
use crate::user::UserId;
use nodes::Node;

/// How often the inventory is read and the node engines pinged: a node that goes down is known
/// within this (plus a ping timeout) of the swarm reporting it, or of its engine going silent.
pub const REFRESH_EVERY: Duration = Duration::from_secs(1);
/// Bound on one `GET /nodes` and on one node engine's ping.
const ASK_WITHIN: Duration = Duration::from_millis(1500);
/// Bound on installing the network guard in a starting sandbox.
const GUARD_WITHIN: Duration = Duration::from_secs(8);

/// The swarm as sandboxd last saw it.
pub struct Swarm {
    cfg: SwarmConfig,
    /// `swarm_tls_dir`'s material, for `https://` managers and nodes.
    tls: Option<Arc<endpoint::EngineTls>>,
    /// The overlay's subnets (checked IPv4 networks).
    overlay: Vec<String>,
    nodes: StdMutex<Vec<Node>>,
    /// Per node: the subnets of its docker_gwbridge (asked once).
    bridges: StdMutex<HashMap<String, Vec<String>>>,
    /// One inventory pass at a time.
    refreshing: tokio::sync::Mutex<()>,
}

impl Swarm {
    /// Connects to a manager, checks the overlay network and reads the inventory once;
    /// start-up fails clearly when any of it is missing.
    pub(super) async fn open(cfg: &Config) -> anyhow::Result<(Engine, Swarm)> {
        let sc = cfg
            .swarm
            .clone()
            .ok_or_else(|| anyhow!("engine is not swarm"))?;
        let tls = match &sc.tls_dir {
            Some(dir) => Some(Arc::new(endpoint::EngineTls::load(dir)?)),
            None => None,
        };
        let engine = Engine::connect_swarm(&sc.managers, tls.clone()).await?;
        let overlay = match engine.inspect_overlay(&sc.network).await {
            Ok(o) => o,
            Err(e) if e.kind() == ErrorKind::NotFound => bail!(
                "swarm_network {:?} does not exist; create it on a manager: docker network create -d overlay --attachable {}",
                sc.network,
                sc.network
            ),
            Err(e) => return Err(e.into()),
        };
        if overlay.driver != "overlay" || !overlay.attachable {
            bail!(
                "swarm_network {:?} must be an attachable overlay network (driver {:?}, attachable {})",
                sc.network,
                overlay.driver,
                overlay.attachable
            );
        }
        let subnets: Vec<String> = overlay
            .subnets
            .into_iter()
            .filter(|s| rules::usable_cidr(s))
            .collect();
        if subnets.is_empty() {
            bail!("swarm_network {:?} has no IPv4 subnet", sc.network);
        }
        let swarm = Swarm {
            cfg: sc,
            tls,
            overlay: subnets,
            nodes: StdMutex::default(),
            bridges: StdMutex::default(),
            refreshing: tokio::sync::Mutex::new(()),
        };
        swarm.refresh(&engine).await?;
        Ok((engine, swarm))
    }

    /// The nodes as last read.
    pub fn nodes(&self) -> Vec<Node> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reads the inventory from the first manager that answers, pings every ready node's engine
    /// (in parallel) and tells the engine client which nodes are usable.
    async fn refresh(&self, engine: &Engine) -> anyhow::Result<()> {
        let _one = self.refreshing.lock().await;
        let mut last = anyhow!("no swarm manager configured");
        let mut found = None;
        for url in &self.cfg.managers {
            match nodes::fetch(url, self.tls.as_deref(), ASK_WITHIN).await {
                Ok(n) => {
                    found = Some(n);
                    break;
                }
                Err(e) => last = e.context(format!("swarm manager {url}")),
            }
        }
        let list = found.ok_or(last).context("reading the swarm's nodes")?;
        let checks = list.iter().map(|n| async move {
            // A URL the template cannot make, or not a usable engine URL (e.g. a hostname that
            // is no TLS server name): the node is left out, never a failed inventory pass.
            let url = match nodes::engine_url(&self.cfg.node_engine, n).and_then(|u| {
                endpoint::Endpoint::parse(&u, self.tls.is_some())
                    .map(|_| u)
                    .map_err(|e| anyhow!("node {}: {e}", n.hostname))
            }) {
                Ok(u) => u,
                Err(e) => return (n, String::new(), Some(format!("{e:#}"))),
            };
            if !n.ready {
                let why = format!("the swarm reports it {}", n.state);
                return (n, url, Some(why));
            }
            (n, url, None)
        });
        let checked = futures_util::future::join_all(checks).await;
        for (n, url, down) in &checked {
            if url.is_empty() {
                continue;
            }
            engine
                .set_node(&n.id, &n.hostname, url, down.clone())
                .await?;
        }
        // Ping the ready ones through their (now known) clients.
        let pings = checked
            .iter()
            .filter(|(_, u, d)| !u.is_empty() && d.is_none())
            .map(|(n, _, _)| async move {
                let r = tokio::time::timeout(ASK_WITHIN, engine.ping_node(&n.id)).await;
                let down = match r {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(format!("its engine does not answer ({e:#})")),
                    Err(_) => Some(format!("its engine does not answer within {ASK_WITHIN:?}")),
                };
                (n.id.clone(), down)
            });
        for (id, down) in futures_util::future::join_all(pings).await {
            engine.mark_node(&id, down);
        }
        let now: HashSet<&str> = list.iter().map(|n| n.id.as_str()).collect();
        let before = self.nodes();
        for gone in before.iter().filter(|n| !now.contains(n.id.as_str())) {
            engine.mark_node(&gone.id, Some("no longer in the swarm".into()));
        }
        // What placement will act on from now: a node new, or its state or availability changed.
        for n in &list {
            let was = before.iter().find(|b| b.id == n.id);
            if was.is_none_or(|b| (&b.state, &b.availability) != (&n.state, &n.availability)) {
                tracing::info!(node = %n.hostname, state = %n.state, availability = %n.availability, "swarm node");
            }
        }
        *self.nodes.lock().unwrap_or_else(|p| p.into_inner()) = list;
        Ok(())
    }
}

impl Manager {
    /// Swarm mode: reads the inventory every [`REFRESH_EVERY`]; takes the sandboxes of a node
    /// that became unusable off the preview's fast path (their users get `node_unavailable`),
    /// and re-reads those of a node that is back.
    pub(super) fn follow_swarm(self: &Arc<Self>) {
        if self.swarm.is_none() {
            return;
        }
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(REFRESH_EVERY);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                let Some(mgr) = weak.upgrade() else { break };
                let Some(swarm) = mgr.swarm.clone() else {
                    break;
                };
                if let Err(e) = swarm.refresh(&mgr.engine).await {
                    tracing::warn!(error = format!("{e:#}"), "reading the swarm's inventory");
                    continue;
                }
                mgr.apply_node_health().await;
            }
        });
    }

    /// Marks each slot whose container is on an unusable node (the preview's fast path asks
    /// the flag), and re-reads a sandbox whose node is usable again.
    async fn apply_node_health(&self) {
        for slot in self.all_slots() {
            let id = match slot.inner.try_lock() {
                Ok(g) => g.as_ref().map(|c| c.id.clone()),
                // In a transition: that transition meets the node's state itself.
                Err(_) => continue,
            };
            let Some(id) = id else {
                slot.node_down.store(false, Ordering::Relaxed);
                continue;
            };
            let usable = match self.engine.node_of(&id) {
                Some((node, _)) => self.engine.node_usable(&node).is_ok(),
                None => false,
            };
            let was_down = slot.node_down.swap(!usable, Ordering::Relaxed);
            if !usable && !was_down {
                tracing::warn!(user = %slot.user, "the sandbox's node is unavailable");
            }
            if usable && was_down {
                tracing::info!(user = %slot.user, "the sandbox's node is back; re-reading it");
                let _ = self.status_inner(&slot.user).await;
            }
        }
    }

    /// Swarm mode: the node for the user's new container — the one that holds their workspace
    /// (when it is unusable: 503 `node_unavailable`, never a sandbox elsewhere), else the one
    /// [`placement::choose`] picks. `None` on one host.
    pub(super) async fn place(&self, user: &UserId) -> Result<Option<String>, SandboxError> {
        let Some(swarm) = &self.swarm else {
            return Ok(None);
        };
        if let Some(node) = self.recorded_node(user).await? {
            self.engine
                .node_usable(&node)
                .map_err(|why| SandboxError::NodeUnavailable(workspace_there(&why)))?;
            return Ok(Some(node));
        }
        let mut live: HashMap<String, usize> = HashMap::new();
        for slot in self.all_slots() {
            let Ok(g) = slot.inner.try_lock() else {
                continue;
            };
            if let Some(c) = g.as_ref().filter(|c| c.state != State::Stopped) {
                if let Some((node, _)) = self.engine.node_of(&c.id) {
                    *live.entry(node).or_default() += 1;
                }
            }
        }
        let nodes = swarm.nodes();
        let chosen = placement::choose(
            &nodes,
            |n| self.engine.node_usable(&n.id).is_ok(),
            &live,
            &swarm.cfg.node_labels,
            self.cfg.limits.memory_bytes,
        )
        .ok_or_else(|| {
            SandboxError::NodeUnavailable(
                "no swarm node takes new sandboxes now (ready, active, with the required labels, engine answering)"
                    .into(),
            )
        })?;
        tracing::info!(user = %user, node = %chosen.hostname, "placing a new sandbox");
        Ok(Some(chosen.id.clone()))
    }

    async fn recorded_node(&self, user: &UserId) -> anyhow::Result<Option<String>> {
        self.store
            .session_node(user)
            .await
            .inspect_err(|_| self.metrics.store_error())
    }

    /// Whether sandboxes live on the nodes of a swarm (no host packet filter then).
    pub fn swarm_mode(&self) -> bool {
        self.swarm.is_some()
    }

    /// Swarm mode: before asking about a container this replica did not make or list (another
    /// replica made it), learns its node from the store, so the call goes to that node's engine.
    pub(super) async fn learn_home(&self, user: &UserId, container: &str) -> anyhow::Result<()> {
        if self.swarm.is_none() || self.engine.node_of(container).is_some() {
            return Ok(());
        }
        if let Some(node) = self.recorded_node(user).await? {
            self.engine.own(container, &node);
        }
        Ok(())
    }

    /// Why a user has no slot: in swarm mode, a known sandbox on a node that is away is
    /// [`SandboxError::NodeUnavailable`]; otherwise [`SandboxError::NotFound`].
    pub(super) async fn absent(&self, user: &UserId) -> SandboxError {
        if self.swarm.is_none() {
            return SandboxError::NotFound;
        }
        match self.store.session(user).await {
            Ok(Some(s)) if s.container_id.is_some() => {}
            _ => return SandboxError::NotFound,
        }
        match self.recorded_node(user).await {
            Ok(Some(node)) => match self.engine.node_usable(&node) {
                Err(why) => SandboxError::NodeUnavailable(workspace_there(&why)),
                Ok(()) => SandboxError::NotFound,
            },
            _ => SandboxError::NotFound,
        }
    }

    /// Swarm mode: records the node that now holds the user's workspace.
    pub(super) async fn record_node(&self, user: &UserId, node: &str) -> anyhow::Result<()> {
        self.store
            .set_session_node(user, node)
            .await
            .inspect_err(|_| self.metrics.store_error())
    }

    /// Swarm mode, a user without a container in the table: adopts the one on the node that
    /// holds their workspace if there is one (sandboxd restarted while that node was away, or
    /// the node is back after a cut), so a heal never makes a second container. The newest is
    /// kept; others are removed.
    pub(super) async fn adopt_from_node(
        &self,
        slot: &Slot,
        guard: &mut Option<Container>,
    ) -> Result<(), SandboxError> {
        if self.swarm.is_none() || guard.is_some() {
            return Ok(());
        }
        let user = &slot.user;
        let Some(node) = self.recorded_node(user).await? else {
            return Ok(());
        };
        self.engine
            .node_usable(&node)
            .map_err(|why| SandboxError::NodeUnavailable(workspace_there(&why)))?;
        let mut mine: Vec<Managed> = self
            .engine
            .list_user_on(&node, &self.cfg.instance, user)
            .await?;
        if mine.is_empty() {
            return Ok(());
        }
        mine.sort_by_key(|m| std::cmp::Reverse(m.created));
        let keep = mine.remove(0);
        for dup in mine {
            tracing::warn!(user = %user, container = %dup.id, "removing a duplicate container");
            self.engine.remove(&dup.id).await?;
        }
        let i = self.engine.inspect(&keep.id, &self.network).await?;
        let state = State::of_engine(i.state);
        let permit = if state == State::Stopped {
            None
        } else {
            self.capacity.clone().try_acquire_owned().ok()
        };
        *guard = Some(Container::found(keep.clone(), state, i.ip, None, permit));
        self.event(user, Some(&keep.id), "adopted", Some("found on its node"))
            .await;
        self.save(user, guard, None).await?;
        Ok(())
    }

    /// Swarm mode: installs the network guard in a container that just started (its network
    /// namespace is new), then writes the marker its init waits for. On one host: nothing.
    pub(super) async fn guard_network(&self, container: &str) -> anyhow::Result<()> {
        let Some(swarm) = &self.swarm else {
            return Ok(());
        };
        let t = std::time::Instant::now();
        let (node, _) = self
            .engine
            .node_of(container)
            .ok_or_else(|| anyhow!("the container's node is not known"))?;
        let bridge = self.bridge_subnets(swarm, &node).await?;
        let policy = rules::GuardPolicy {
            edge_cidr: swarm.cfg.edge_cidr.clone(),
            overlay: swarm.overlay.clone(),
            node_addrs: swarm
                .nodes()
                .iter()
                .filter_map(|n| n.addr.parse().ok())
                .collect(),
            bridge,
            internet: self.cfg.sandbox_internet,
            blocked: self.cfg.sandbox_blocked_networks.clone(),
        };
        let text = rules::guard_rules(&policy);
        let work = async {
            let (code, said) = self
                .engine
                .run_beside(
                    container,
                    &self.cfg.image,
                    &self.cfg.instance,
                    Script::NetGuard.argv(&[text]),
                )
                .await?;
            if code != 0 {
                bail!(
                    "installing the network guard failed ({code}): {}",
                    said.trim()
                );
            }
            let mark = vec!["touch".to_owned(), spec::GUARD_MARK.to_owned()];
            match self.engine.run_as_root(container, mark).await? {
                0 => Ok(()),
                code => bail!("writing the network guard's marker failed ({code})"),
            }
        };
        tokio::time::timeout(GUARD_WITHIN, work)
            .await
            .map_err(|_| {
                anyhow!("installing the network guard took longer than {GUARD_WITHIN:?}")
            })??;
        tracing::debug!(
            container,
            ms = t.elapsed().as_millis() as u64,
            "network guard installed"
        );
        Ok(())
    }

    async fn bridge_subnets(&self, swarm: &Swarm, node: &str) -> anyhow::Result<Vec<String>> {
        if let Some(b) = swarm
            .bridges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
        {
            return Ok(b.clone());
        }
        let found: Vec<String> = self
            .engine
            .node_bridge_subnets(node)
            .await?
            .into_iter()
            .filter(|s| rules::usable_cidr(s))
            .collect();
        swarm
            .bridges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node.to_owned(), found.clone());
        Ok(found)
    }

    /// Swarm mode: the hostname of the node holding the container (`None` on one host).
    pub(super) fn node_name(&self, container: &str) -> Option<String> {
        self.engine.node_of(container).map(|(_, h)| h)
    }

    /// Swarm mode: whether a stored session's node is usable (recovery keeps the session of an
    /// unusable node as it is instead of marking its container missing).
    pub(super) fn node_unusable(&self, node: Option<&str>) -> bool {
        self.swarm.is_some() && node.is_some_and(|n| self.engine.node_usable(n).is_err())
    }
}

/// The message of a user whose workspace lives on an unusable node.
fn workspace_there(why: &str) -> String {
    format!("{why}; this sandbox's workspace lives there, so it waits for that node to come back")
}
