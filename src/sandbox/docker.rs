//! The only module that talks to the Docker engine (bollard). Everything above it deals in
//! container ids that the manager obtained from Docker itself, never in client strings.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex as StdMutex, RwLock as StdRwLock};

use anyhow::Context;
use bollard::container::{
    CreateContainerOptions, InspectContainerOptions, ListContainersOptions, LogOutput,
    RemoveContainerOptions, StartContainerOptions, StopContainerOptions,
};
use bollard::errors::Error as BollardError;
use bollard::exec::{CreateExecOptions, ResizeExecOptions, StartExecOptions, StartExecResults};
use bollard::network::{CreateNetworkOptions, InspectNetworkOptions};
use bollard::system::EventsOptions;
use bollard::Docker;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio::io::AsyncWrite;
use tokio::sync::RwLock;

use crate::config::Config;
use crate::sandbox::spec;
use crate::sandbox::swarm::endpoint::{self, Endpoint, EngineTls};
use crate::user::UserId;

/// Bound on the engine's answer (its response head) to any call; streams such as an exec's
/// output are not bounded by it. Requests do not wait this long for a dead engine: the health
/// tracker (health.rs) answers them first.
pub const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Clone)]
pub struct Engine {
    /// The host's engine; in swarm mode the manager (inventory, network, ping).
    docker: Docker,
    /// Swarm mode: the node engines and which node holds which container.
    fleet: Option<Arc<Fleet>>,
    /// Per container: an exec being started holds its gate shared, a pause holds it exclusively.
    /// On this engine (20.10, cgroup v1) a container frozen while `runc exec` joins it gets
    /// stuck for good (`unpause` and `rm -f` hang), and the exec API answers before the process
    /// exists, so the gate is held until the engine reports the exec's pid (or its end).
    gates: Arc<StdMutex<HashMap<String, Arc<RwLock<()>>>>>,
}

/// Swarm mode: one engine client per node, and the node of every container sandboxd knows
/// (created or adopted through that node's engine). Calls about a container go to its node;
/// a node that is down or unreachable answers [`ErrorKind::NodeUnavailable`] at once.
#[derive(Default)]
pub(super) struct Fleet {
    nodes: StdRwLock<HashMap<String, FleetNode>>,
    /// container id → node id.
    owner: StdMutex<HashMap<String, String>>,
    /// Bumped when a node becomes usable or unusable.
    generation: tokio::sync::watch::Sender<u64>,
    /// `swarm_tls_dir`, for `https://` engines.
    tls: Option<Arc<EngineTls>>,
}

#[derive(Clone)]
struct FleetNode {
    docker: Docker,
    url: String,
    hostname: String,
    /// `None`: usable; else why not (down in the inventory, engine not answering).
    down: Option<String>,
}

/// How long an exec start may keep a pause waiting for the process to appear.
const EXEC_SETTLE: std::time::Duration = std::time::Duration::from_millis(500);

/// What Docker says about a container's life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DockerState {
    Created,
    Running,
    Paused,
    Exited,
    Other,
}

impl DockerState {
    fn parse(s: &str) -> Self {
        match s {
            "created" => Self::Created,
            "running" | "restarting" => Self::Running,
            "paused" => Self::Paused,
            "exited" | "dead" => Self::Exited,
            _ => Self::Other,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Managed {
    pub id: String,
    pub name: String,
    pub user: UserId,
    pub state: DockerState,
    pub created: i64,
    /// The agent key of its label (absent on containers made before the agent existed).
    pub agent_key: Option<String>,
}

#[derive(Clone, Debug)]
pub struct Inspected {
    pub state: DockerState,
    pub ip: Option<IpAddr>,
    pub oom_killed: bool,
    pub pid: Option<i64>,
    pub exit_code: Option<i64>,
    /// The CPU quota the engine holds for the container (`HostConfig.NanoCpus`).
    pub nano_cpus: Option<i64>,
    /// The agent's key from the container's label (replicas.rs: a replica that did not make
    /// the container learns it here).
    pub agent_key: Option<String>,
}

/// Swarm mode: what start-up checks of the overlay network.
#[derive(Clone, Debug)]
pub struct Overlay {
    pub driver: String,
    pub attachable: bool,
    pub subnets: Vec<String>,
}

/// A container event from the engine's event stream (this instance's containers only).
#[derive(Clone, Debug)]
pub struct EngineEvent {
    /// `start`, `die`, `kill`, `oom`, `pause`, `unpause`, `stop` or `destroy`.
    pub action: String,
    pub container_id: String,
    pub user: UserId,
    /// `exitCode` of a `die`.
    pub exit_code: Option<i64>,
    /// `signal` of a `kill`.
    pub signal: Option<String>,
}

/// The container actions the manager follows.
pub const FOLLOWED_ACTIONS: [&str; 8] = [
    "start", "die", "kill", "oom", "pause", "unpause", "stop", "destroy",
];

pub type EventStream = Pin<Box<dyn Stream<Item = Result<EngineEvent, EngineError>> + Send>>;

/// One chunk of an exec's output.
pub enum ExecOutput {
    Stdout(Bytes),
    Stderr(Bytes),
}

pub type ExecStream = Pin<Box<dyn Stream<Item = Result<ExecOutput, EngineError>> + Send>>;
pub type ExecInput = Pin<Box<dyn AsyncWrite + Send>>;

/// What to run in an exec. Argument vectors only: nothing here is ever a shell string built
/// from client input.
pub struct ExecSpec<'a> {
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: Option<&'a str>,
    pub tty: bool,
    pub stdin: bool,
}

pub struct ExecInfo {
    pub running: bool,
    pub exit_code: Option<i64>,
    pub pid: Option<i64>,
}

/// What kind of failure an engine call met; callers decide on this, never on message text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The engine answered 404: no such container, exec, network or image.
    NotFound,
    /// The engine answered 409: e.g. the container is paused or already in that state.
    Conflict,
    /// The engine could not be reached or did not answer in time.
    Unavailable,
    /// Anything else: another answer from the engine, or a reply sandboxd cannot use.
    Other,
    /// Swarm mode: the container's node is down or its engine does not answer.
    NodeUnavailable,
}

/// A failed engine call: what sandboxd was doing, the kind of failure and the cause.
#[derive(Debug, thiserror::Error)]
#[error("{doing}")]
pub struct EngineError {
    kind: ErrorKind,
    /// The HTTP status when the engine answered with one.
    status: Option<u16>,
    doing: &'static str,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

/// The one exec call whose refusal means the program never ran (see [`EngineError::refused_exec`]).
const CREATING_EXEC: &str = "creating an exec";

impl EngineError {
    fn new(doing: &'static str, e: BollardError) -> Self {
        let (kind, status) = classify(&e);
        EngineError {
            kind,
            status,
            doing,
            source: Box::new(e),
        }
    }

    /// A reply sandboxd cannot use (the engine answered, but not as expected).
    fn other(doing: &'static str, msg: String) -> Self {
        EngineError {
            kind: ErrorKind::Other,
            status: None,
            doing,
            source: msg.into(),
        }
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Swarm mode: the node is down or unreachable (why, for the client).
    fn node_down(hostname: &str, why: &str) -> Self {
        EngineError {
            kind: ErrorKind::NodeUnavailable,
            status: None,
            doing: "reaching the sandbox's node",
            source: format!("node {hostname} is unavailable: {why}").into(),
        }
    }

    /// The message of a node failure (what clients see with 503 `node_unavailable`).
    pub fn node_message(&self) -> Option<String> {
        (self.kind == ErrorKind::NodeUnavailable).then(|| self.source.to_string())
    }

    /// The engine itself answered the call (with an error status): it is up.
    pub fn answered(&self) -> bool {
        self.status.is_some()
    }

    /// The engine refused to create an exec because the container is paused, stopped or gone:
    /// nothing ran in it.
    pub fn refused_exec(&self) -> bool {
        self.doing == CREATING_EXEC
            && matches!(self.kind, ErrorKind::NotFound | ErrorKind::Conflict)
    }
}

/// bollard's error → the kind callers act on, and the status when the engine answered.
fn classify(e: &BollardError) -> (ErrorKind, Option<u16>) {
    match e {
        BollardError::DockerResponseServerError { status_code, .. } => {
            let kind = match status_code {
                404 => ErrorKind::NotFound,
                409 => ErrorKind::Conflict,
                _ => ErrorKind::Other,
            };
            (kind, Some(*status_code))
        }
        BollardError::RequestTimeoutError
        | BollardError::IOError { .. }
        | BollardError::HyperResponseError { .. }
        | BollardError::HyperLegacyError { .. }
        | BollardError::HttpClientError { .. }
        | BollardError::SocketNotFoundError(_) => (ErrorKind::Unavailable, None),
        _ => (ErrorKind::Other, None),
    }
}

/// Pauses tried when the freezer could not freeze every task, and the wait between them.
const PAUSE_ATTEMPTS: u32 = 3;
const PAUSE_RETRY_AFTER: std::time::Duration = std::time::Duration::from_millis(50);

/// Wraps bollard's error with what sandboxd was doing.
fn failed(doing: &'static str) -> impl FnOnce(BollardError) -> EngineError {
    move |e| EngineError::new(doing, e)
}

/// Maps "not found" to success: removing what is already gone is done.
fn ok_if_not_found(res: Result<(), BollardError>, what: &'static str) -> Result<(), EngineError> {
    match res.map_err(failed(what)) {
        Err(e) if e.kind == ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

impl Fleet {
    fn read_node(&self, id: &str) -> Option<FleetNode> {
        self.nodes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }
}

/// A client for an engine URL (`unix:///path`, or `https://host:port` with the TLS material of
/// `swarm_tls_dir`), not yet asked anything; API version 1.41 (Debian's engine, the oldest
/// sandboxd supports).
fn lazy_url(url: &str, tls: Option<&Arc<EngineTls>>) -> anyhow::Result<Docker> {
    let v141 = bollard::ClientVersion {
        major_version: 1,
        minor_version: 41,
    };
    let endpoint = Endpoint::parse(url, tls.is_some()).map_err(|e| anyhow::anyhow!(e))?;
    let docker = match (&endpoint, tls) {
        (Endpoint::Unix(path), _) => Docker::connect_with_unix(path, CALL_TIMEOUT.as_secs(), &v141)
            .with_context(|| format!("engine URL {url}"))?,
        (Endpoint::Tls { .. }, Some(tls)) => {
            let base = endpoint.https_base().unwrap_or_default();
            tls_client(&base, tls, &v141).with_context(|| format!("engine URL {url}"))?
        }
        (Endpoint::Tls { .. }, None) => anyhow::bail!("engine URL {url} needs swarm_tls_dir"),
    };
    Ok(docker.with_timeout(CALL_TIMEOUT))
}

/// bollard over our own TLS (bollard 0.18's `connect_with_ssl` would also trust the system's
/// roots, read the key at every handshake and keep no connection alive): a pooled hyper client
/// whose connector speaks only HTTPS, trusts only `ca.pem` and presents the client certificate.
fn tls_client(
    base: &str,
    tls: &EngineTls,
    version: &bollard::ClientVersion,
) -> Result<Docker, BollardError> {
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(endpoint::CONNECT_WITHIN));
    http.set_keepalive(Some(std::time::Duration::from_secs(30)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*tls.client_config()).clone())
        .https_only()
        .enable_http1()
        .wrap_connector(http);
    let client = Arc::new(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(std::time::Duration::from_secs(30))
            .pool_max_idle_per_host(8)
            .build(https),
    );
    Docker::connect_with_custom_transport(
        move |req: bollard::BollardRequest| {
            let client = client.clone();
            Box::pin(async move { client.request(req).await.map_err(BollardError::from) })
        },
        Some(base),
        CALL_TIMEOUT.as_secs(),
        version,
    )
}

/// A client for an engine URL, with the API version negotiated (the engine must answer).
async fn connect_url(url: &str, tls: Option<&Arc<EngineTls>>) -> anyhow::Result<Docker> {
    let docker = lazy_url(url, tls)?;
    match docker.negotiate_version().await {
        Ok(d) => Ok(d),
        Err(e) => {
            let e = anyhow::Error::new(e);
            Err(match (Endpoint::parse(url, true), tls) {
                // The TLS alert (a refused client certificate) is in the probe's answer.
                (Ok(Endpoint::Tls { host, port }), Some(tls)) => match tls.probe(&host, port).await
                {
                    Err(why) => why,
                    Ok(()) => e,
                }
                .context(tls.refused(&host, port)),
                _ => e,
            }
            .context(format!("the engine at {url} did not answer")))
        }
    }
}

/// The kind of the engine failure behind an error that went through `anyhow`, if any.
pub fn kind_of(err: &anyhow::Error) -> Option<ErrorKind> {
    engine_error(err).map(EngineError::kind)
}

/// The kind of engine failure behind an error of either type (`None`: not the engine's).
pub trait EngineFailure {
    fn engine_kind(&self) -> Option<ErrorKind>;
}

impl EngineFailure for EngineError {
    fn engine_kind(&self) -> Option<ErrorKind> {
        Some(self.kind)
    }
}

impl EngineFailure for anyhow::Error {
    fn engine_kind(&self) -> Option<ErrorKind> {
        kind_of(self)
    }
}

/// The engine failure behind an error that went through `anyhow`, if any.
pub fn engine_error(err: &anyhow::Error) -> Option<&EngineError> {
    err.chain().find_map(|e| e.downcast_ref::<EngineError>())
}

/// True when a call failed because the engine could not be reached or did not answer in time
/// (as opposed to an answer such as 404 or 409): an engine error of that kind, or a timeout or
/// broken connection met around an engine call.
pub fn is_unavailable(err: &anyhow::Error) -> bool {
    if let Some(e) = engine_error(err) {
        return e.kind == ErrorKind::Unavailable;
    }
    err.chain().any(|e| {
        e.is::<tokio::time::error::Elapsed>()
            || e.downcast_ref::<std::io::Error>().is_some_and(|io| {
                use std::io::ErrorKind::*;
                matches!(
                    io.kind(),
                    ConnectionRefused
                        | ConnectionReset
                        | ConnectionAborted
                        | BrokenPipe
                        | NotFound
                        | TimedOut
                        | UnexpectedEof
                )
            })
    })
}

impl Engine {
    /// Connects through the local socket and negotiates the API version (Debian's engine
    /// speaks 1.41, older than bollard's default).
    pub async fn connect() -> anyhow::Result<Engine> {
        let docker = Docker::connect_with_local_defaults()
            .context("connecting to the Docker engine")?
            .with_timeout(CALL_TIMEOUT)
            .negotiate_version()
            .await
            .context("the Docker engine did not answer (is dockerd running?)")?;
        Ok(Engine {
            docker,
            fleet: None,
            gates: Arc::default(),
        })
    }

    /// Swarm mode: connects to the first manager that answers; node engines are added by
    /// [`Engine::set_node`] as the inventory finds them.
    pub async fn connect_swarm(
        managers: &[String],
        tls: Option<Arc<EngineTls>>,
    ) -> anyhow::Result<Engine> {
        let mut last = anyhow::anyhow!("no swarm manager configured");
        for url in managers {
            match connect_url(url, tls.as_ref()).await {
                Ok(docker) => {
                    return Ok(Engine {
                        docker,
                        fleet: Some(Arc::new(Fleet {
                            tls,
                            ..Fleet::default()
                        })),
                        gates: Arc::default(),
                    })
                }
                Err(e) => last = e.context(format!("swarm manager {url}")),
            }
        }
        Err(last)
    }

    pub fn is_swarm(&self) -> bool {
        self.fleet.is_some()
    }

    /// Swarm mode: records a node of the inventory (connecting to its engine when new or moved)
    /// and whether it is usable.
    pub async fn set_node(
        &self,
        id: &str,
        hostname: &str,
        url: &str,
        down: Option<String>,
    ) -> anyhow::Result<()> {
        let Some(fleet) = &self.fleet else {
            return Ok(());
        };
        let known = fleet.read_node(id).filter(|n| n.url == url);
        let docker = match known {
            Some(n) => n.docker,
            None => lazy_url(url, fleet.tls.as_ref())?,
        };
        let mut nodes = fleet.nodes.write().unwrap_or_else(|p| p.into_inner());
        let was_up = nodes.get(id).map(|n| n.down.is_none());
        let up = down.is_none();
        nodes.insert(
            id.to_owned(),
            FleetNode {
                docker,
                url: url.to_owned(),
                hostname: hostname.to_owned(),
                down,
            },
        );
        drop(nodes);
        if was_up != Some(up) {
            fleet.generation.send_modify(|g| *g += 1);
        }
        Ok(())
    }

    /// Swarm mode: marks a node unusable (or usable again with `None`).
    pub fn mark_node(&self, id: &str, down: Option<String>) {
        if let Some(fleet) = &self.fleet {
            let mut nodes = fleet.nodes.write().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = nodes.get_mut(id) {
                let changed = n.down.is_none() != down.is_none();
                n.down = down;
                drop(nodes);
                if changed {
                    fleet.generation.send_modify(|g| *g += 1);
                }
            }
        }
    }

    /// Swarm mode: pings one node's engine.
    pub async fn ping_node(&self, id: &str) -> Result<(), EngineError> {
        let docker = self.node_client(id)?.0;
        docker
            .ping()
            .await
            .map_err(failed("pinging the node's engine"))?;
        Ok(())
    }

    /// Swarm mode: the node holding a container (id, hostname), when known.
    pub fn node_of(&self, container: &str) -> Option<(String, String)> {
        let fleet = self.fleet.as_ref()?;
        let id = fleet
            .owner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(container)
            .cloned()?;
        let hostname = fleet.read_node(&id).map(|n| n.hostname).unwrap_or_default();
        Some((id, hostname))
    }

    /// Swarm mode: whether a node is known and usable (`Err`: why not).
    pub fn node_usable(&self, id: &str) -> Result<(), String> {
        match self.fleet.as_ref().and_then(|f| f.read_node(id)) {
            Some(FleetNode { down: None, .. }) => Ok(()),
            Some(FleetNode {
                down: Some(why),
                hostname,
                ..
            }) => Err(format!("node {hostname} is unavailable: {why}")),
            None => Err(format!("node {id} is not in the swarm's inventory")),
        }
    }

    /// The engine client of a node (usable or not) and its hostname.
    fn node_client(&self, id: &str) -> Result<(Docker, String), EngineError> {
        match self.fleet.as_ref().and_then(|f| f.read_node(id)) {
            Some(n) => Ok((n.docker, n.hostname)),
            None => Err(EngineError::node_down(id, "not in the swarm's inventory")),
        }
    }

    /// The engine to ask about a container: the host's, or in swarm mode its node's (an error
    /// at once when that node is down). The node id comes back for [`Engine::on_node`].
    fn client(&self, container: &str) -> Result<(Docker, Option<String>), EngineError> {
        let Some(fleet) = &self.fleet else {
            return Ok((self.docker.clone(), None));
        };
        let owner = fleet
            .owner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(container)
            .cloned();
        let Some(node) = owner else {
            // Never NotFound: that would tell the manager the container is gone.
            return Err(EngineError::node_down(
                "?",
                "the container's node is not known",
            ));
        };
        match fleet.read_node(&node) {
            Some(FleetNode {
                docker, down: None, ..
            }) => Ok((docker, Some(node))),
            Some(FleetNode {
                down: Some(why),
                hostname,
                ..
            }) => Err(EngineError::node_down(&hostname, &why)),
            None => Err(EngineError::node_down(
                &node,
                "not in the swarm's inventory",
            )),
        }
    }

    /// Swarm mode: a node engine that cannot be reached makes its node unusable at once (the
    /// inventory's next pass decides when it is back) and the failure a node failure.
    fn on_node(&self, node: &Option<String>, e: EngineError) -> EngineError {
        let (Some(fleet), Some(node)) = (&self.fleet, node) else {
            return e;
        };
        if e.kind != ErrorKind::Unavailable {
            return e;
        }
        let why = format!("its engine does not answer ({e:#})");
        let hostname = fleet
            .read_node(node)
            .map(|n| n.hostname)
            .unwrap_or_default();
        self.mark_node(node, Some(why.clone()));
        EngineError::node_down(&hostname, &why)
    }

    /// Swarm mode: records which node holds a container (a container another replica made is
    /// learnt from the node the store recorded for its user).
    pub fn own(&self, container: &str, node: &str) {
        if let Some(fleet) = &self.fleet {
            fleet
                .owner
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(container.to_owned(), node.to_owned());
        }
    }

    fn gate(&self, container: &str) -> Arc<RwLock<()>> {
        let mut gates = self.gates.lock().unwrap_or_else(|p| p.into_inner());
        gates.entry(container.to_owned()).or_default().clone()
    }

    /// Waits (bounded) until the engine reports the exec's process started (a pid) or done.
    async fn exec_settled(&self, container: &str, exec_id: &str) {
        let deadline = tokio::time::Instant::now() + EXEC_SETTLE;
        let mut pause = std::time::Duration::from_millis(1);
        loop {
            match self.exec_info(container, exec_id).await {
                // Not `Running`: the engine sets it before it asks containerd to start the
                // process; the pid is known only once `runc exec` is done.
                Ok(i) if i.exit_code.is_some() || i.pid.is_some_and(|p| p > 0) => return,
                Ok(_) if tokio::time::Instant::now() < deadline => {}
                _ => return,
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(std::time::Duration::from_millis(20));
        }
    }

    pub async fn ping(&self) -> Result<(), EngineError> {
        self.docker
            .ping()
            .await
            .map_err(failed("pinging the Docker engine"))?;
        Ok(())
    }

    /// Whether the image is present (in swarm mode on `node`).
    pub async fn image_exists(&self, node: Option<&str>, image: &str) -> Result<bool, EngineError> {
        let docker = match node {
            Some(n) => self.node_client(n)?.0,
            None => self.docker.clone(),
        };
        match docker
            .inspect_image(image)
            .await
            .map_err(failed("inspecting the sandbox image"))
        {
            Ok(_) => Ok(true),
            Err(e) if e.kind == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Creates the instance's private bridge network when missing: inter-container traffic
    /// disabled (icc=false), no masquerade to the outside when internet access is off.
    pub async fn ensure_network(&self, cfg: &Config) -> Result<String, EngineError> {
        let name = spec::network_name(&cfg.instance);
        match self
            .docker
            .inspect_network(&name, None::<InspectNetworkOptions<String>>)
            .await
            .map_err(failed("inspecting the sandbox network"))
        {
            Ok(_) => return Ok(name),
            Err(e) if e.kind == ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut options = HashMap::from([(
            "com.docker.network.bridge.enable_icc".to_owned(),
            "false".to_owned(),
        )]);
        if !cfg.sandbox_internet {
            options.insert(
                "com.docker.network.bridge.enable_ip_masquerade".to_owned(),
                "false".to_owned(),
            );
        }
        let labels = HashMap::from([
            (spec::LABEL_MANAGED.to_owned(), "true".to_owned()),
            (spec::LABEL_INSTANCE.to_owned(), cfg.instance.clone()),
        ]);
        let res = self
            .docker
            .create_network(CreateNetworkOptions {
                name: name.clone(),
                check_duplicate: true,
                driver: "bridge".to_owned(),
                internal: !cfg.sandbox_internet,
                options,
                labels,
                ..Default::default()
            })
            .await
            .map_err(failed("creating the sandbox network"));
        match res {
            Ok(_) => Ok(name),
            // Another instance of the same name raced us to it: fine.
            Err(e) if e.kind == ErrorKind::Conflict => Ok(name),
            Err(e) => Err(e),
        }
    }

    /// The Linux bridge interface behind a bridge network (`br-<first 12 of its id>` unless
    /// the network names its own) and whether the network is internal (no route out).
    pub async fn bridge_interface(&self, network: &str) -> Result<(String, bool), EngineError> {
        let n = self
            .docker
            .inspect_network(network, None::<InspectNetworkOptions<String>>)
            .await
            .map_err(failed("inspecting the sandbox network"))?;
        let named = n
            .options
            .as_ref()
            .and_then(|o| o.get("com.docker.network.bridge.name"))
            .filter(|s| !s.is_empty())
            .cloned();
        let id = n.id.unwrap_or_default();
        let bridge = match named {
            Some(b) => b,
            None if id.len() >= 12 => format!("br-{}", &id[..12]),
            None => {
                let msg = format!("network {network} has no id");
                return Err(EngineError::other("inspecting the sandbox network", msg));
            }
        };
        let ok = bridge.len() <= 15
            && bridge
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
        if !ok {
            let msg = format!("unexpected bridge interface name {bridge:?}");
            return Err(EngineError::other("inspecting the sandbox network", msg));
        }
        Ok((bridge, n.internal.unwrap_or(false)))
    }

    /// Swarm mode: the overlay network as the manager sees it (start-up refuses a missing or
    /// not attachable one).
    pub async fn inspect_overlay(&self, name: &str) -> Result<Overlay, EngineError> {
        let n = self
            .docker
            .inspect_network(name, None::<InspectNetworkOptions<String>>)
            .await
            .map_err(failed("inspecting the swarm network"))?;
        Ok(Overlay {
            driver: n.driver.unwrap_or_default(),
            attachable: n.attachable.unwrap_or(false),
            subnets: n
                .ipam
                .and_then(|i| i.config)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|c| c.subnet)
                .collect(),
        })
    }

    /// Swarm mode: the subnets of a node's `docker_gwbridge` (the bridge through which its
    /// containers reach the node itself and the outside).
    pub async fn node_bridge_subnets(&self, node: &str) -> Result<Vec<String>, EngineError> {
        let docker = self.node_client(node)?.0;
        let n = docker
            .inspect_network("docker_gwbridge", None::<InspectNetworkOptions<String>>)
            .await
            .map_err(failed("inspecting the node's docker_gwbridge"))?;
        Ok(n.ipam
            .and_then(|i| i.config)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|c| c.subnet)
            .collect())
    }

    /// Swarm mode's network guard: runs a fixed program in a one-shot helper container on the
    /// sandbox's node that shares only the sandbox's network namespace, as root with the one
    /// capability `NET_ADMIN` (everything else dropped, no-new-privileges, read-only), to its
    /// end, then removes it: `(exit code, the end of its output)`. A privileged exec into the
    /// sandbox would need every capability of the host's bounding set (refused on hosts that
    /// lack one, e.g. these VMs without CAP_SYS_RESOURCE), and a plain root exec has none of the
    /// sandbox's (dropped) capabilities.
    pub async fn run_beside(
        &self,
        container: &str,
        image: &str,
        instance: &str,
        cmd: Vec<String>,
    ) -> Result<(i64, String), EngineError> {
        let (docker, node) = self.client(container)?;
        let config = spec::guard_helper_config(container, image, instance, cmd);
        let created = docker
            .create_container(None::<CreateContainerOptions<String>>, config)
            .await
            .map_err(failed("creating the network guard helper"))
            .map_err(|e| self.on_node(&node, e))?;
        let helper = created.id;
        let ran = async {
            docker
                .start_container(&helper, None::<StartContainerOptions<String>>)
                .await
                .map_err(failed("starting the network guard helper"))?;
            let mut wait = docker.wait_container(
                &helper,
                None::<bollard::container::WaitContainerOptions<String>>,
            );
            let code = match wait.next().await {
                Some(Ok(r)) => r.status_code,
                Some(Err(BollardError::DockerContainerWaitError { code, .. })) => code,
                Some(Err(e)) => {
                    return Err(EngineError::new("waiting for the network guard helper", e))
                }
                None => -1,
            };
            let mut said = String::new();
            if code != 0 {
                let mut logs = docker.logs(
                    &helper,
                    Some(bollard::container::LogsOptions::<String> {
                        stdout: true,
                        stderr: true,
                        tail: "20".to_owned(),
                        ..Default::default()
                    }),
                );
                while let Some(Ok(line)) = logs.next().await {
                    if said.len() < 4096 {
                        said.push_str(&line.to_string());
                    }
                }
            }
            Ok((code, said))
        }
        .await;
        // Removed off the start's path (it has ended, or is killed by the force).
        tokio::spawn(async move {
            let removed = docker
                .remove_container(
                    &helper,
                    Some(RemoveContainerOptions {
                        force: true,
                        ..Default::default()
                    }),
                )
                .await;
            if let Err(e) = removed {
                tracing::warn!(helper, error = %e, "removing the network guard helper");
            }
        });
        ran.map_err(|e| self.on_node(&node, e))
    }

    /// Runs a fixed program as root (the container's own, dropped, capabilities: none), to its
    /// end: the exit code. Swarm mode's network guard marker only.
    pub async fn run_as_root(&self, container: &str, cmd: Vec<String>) -> Result<i64, EngineError> {
        let (id, mut out, _input) = self
            .exec_as(
                container,
                ExecSpec {
                    cmd,
                    env: vec![],
                    working_dir: Some("/"),
                    tty: false,
                    stdin: false,
                },
                true,
            )
            .await?;
        while let Some(chunk) = out.next().await {
            chunk?;
        }
        Ok(self
            .exec_info(container, &id)
            .await?
            .exit_code
            .unwrap_or(-1))
    }

    /// Removes the instance's network (tests clean up with this); ignores a missing one.
    pub async fn remove_network(&self, instance: &str) -> Result<(), EngineError> {
        let res = self
            .docker
            .remove_network(&spec::network_name(instance))
            .await;
        ok_if_not_found(res, "removing the sandbox network")
    }

    /// This instance's containers, from their labels. Containers whose user label is not a
    /// valid user id are reported separately so the caller can remove them.
    pub async fn list_managed(
        &self,
        instance: &str,
    ) -> Result<(Vec<Managed>, Vec<String>), EngineError> {
        let Some(fleet) = &self.fleet else {
            return list_on(&self.docker, instance).await;
        };
        // Swarm mode: every usable node's, each recorded as that node's.
        let nodes: Vec<(String, FleetNode)> = fleet
            .nodes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, n)| n.down.is_none())
            .map(|(id, n)| (id.clone(), n.clone()))
            .collect();
        let (mut good, mut bad) = (vec![], vec![]);
        for (id, n) in nodes {
            let (g, b) = list_on(&n.docker, instance)
                .await
                .map_err(|e| self.on_node(&Some(id.clone()), e))?;
            for c in g.iter().map(|m| &m.id).chain(&b) {
                self.own(c, &id);
            }
            good.extend(g);
            bad.extend(b);
        }
        Ok((good, bad))
    }

    /// Swarm mode: removes network guard helpers left behind (sandboxd stopped while one ran)
    /// on every usable node; returns how many.
    pub async fn remove_guard_helpers(&self, instance: &str) -> Result<usize, EngineError> {
        let Some(fleet) = &self.fleet else {
            return Ok(0);
        };
        let nodes: Vec<Docker> = fleet
            .nodes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|n| n.down.is_none())
            .map(|n| n.docker.clone())
            .collect();
        let mut removed = 0;
        for docker in nodes {
            let list = docker
                .list_containers(Some(ListContainersOptions::<String> {
                    all: true,
                    filters: HashMap::from([(
                        "label".to_owned(),
                        vec![format!("{}={instance}", spec::LABEL_GUARD)],
                    )]),
                    ..Default::default()
                }))
                .await
                .map_err(failed("listing network guard helpers"))?;
            for c in list {
                let Some(id) = c.id else { continue };
                let labels = c.labels.unwrap_or_default();
                if labels.get(spec::LABEL_GUARD).map(String::as_str) != Some(instance) {
                    continue;
                }
                let res = docker
                    .remove_container(
                        &id,
                        Some(RemoveContainerOptions {
                            force: true,
                            ..Default::default()
                        }),
                    )
                    .await;
                ok_if_not_found(res, "removing a network guard helper")?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Swarm mode: the user's containers on one node (recorded as that node's).
    pub async fn list_user_on(
        &self,
        node: &str,
        instance: &str,
        user: &UserId,
    ) -> Result<Vec<Managed>, EngineError> {
        let docker = self.node_client(node)?.0;
        let (good, _) = list_on(&docker, instance)
            .await
            .map_err(|e| self.on_node(&Some(node.to_owned()), e))?;
        let mine: Vec<Managed> = good.into_iter().filter(|m| &m.user == user).collect();
        for m in &mine {
            self.own(&m.id, node);
        }
        Ok(mine)
    }

    /// Swarm mode: changes whenever a node becomes usable or unusable (the event stream
    /// resubscribes).
    fn fleet_changed(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.fleet.as_ref().map(|f| f.generation.subscribe())
    }
}

/// The instance's containers on one engine (see [`Engine::list_managed`]).
async fn list_on(
    docker: &Docker,
    instance: &str,
) -> Result<(Vec<Managed>, Vec<String>), EngineError> {
    {
        let list = docker
            .list_containers(Some(ListContainersOptions::<String> {
                all: true,
                filters: spec::instance_filters(instance),
                ..Default::default()
            }))
            .await
            .map_err(failed("listing containers"))?;
        let mut good = vec![];
        let mut bad = vec![];
        for c in list {
            let Some(id) = c.id else { continue };
            let labels = c.labels.unwrap_or_default();
            // The filter already selected our instance; check again rather than trust it.
            if labels.get(spec::LABEL_INSTANCE).map(String::as_str) != Some(instance) {
                continue;
            }
            match labels.get(spec::LABEL_USER).map(|u| UserId::parse(u)) {
                Some(Ok(user)) => good.push(Managed {
                    id,
                    name: c
                        .names
                        .and_then(|n| n.into_iter().next())
                        .unwrap_or_default()
                        .trim_start_matches('/')
                        .to_owned(),
                    user,
                    state: DockerState::parse(c.state.as_deref().unwrap_or("")),
                    created: c.created.unwrap_or(0) * 1000,
                    agent_key: labels
                        .get(super::agent::KEY_LABEL)
                        .filter(|k| k.len() == 64 && k.bytes().all(|b| b.is_ascii_hexdigit()))
                        .cloned(),
                }),
                _ => bad.push(id),
            }
        }
        Ok((good, bad))
    }
}

impl Engine {
    /// The engine's event stream, filtered by the engine to this instance's containers and the
    /// actions the manager follows; each event's labels are checked again here. Ends or yields
    /// an error when the connection to the engine breaks.
    pub fn events(&self, instance: &str) -> EventStream {
        let Some(fleet) = &self.fleet else {
            return events_on(&self.docker, instance);
        };
        // Swarm mode: every usable node's stream, merged; it ends when a node comes or goes,
        // and the follower subscribes again (and re-inspects).
        let streams: Vec<EventStream> = fleet
            .nodes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|n| n.down.is_none())
            .map(|n| events_on(&n.docker, instance))
            .collect();
        let mut changed = self.fleet_changed().expect("swarm mode");
        changed.borrow_and_update();
        let until = async move {
            let _ = changed.changed().await;
        };
        Box::pin(futures_util::stream::select_all(streams).take_until(Box::pin(until)))
    }
}

/// One engine's event stream (see [`Engine::events`]).
fn events_on(docker: &Docker, instance: &str) -> EventStream {
    {
        let mut filters = spec::instance_filters(instance);
        filters.insert("type".to_owned(), vec!["container".to_owned()]);
        filters.insert(
            "event".to_owned(),
            FOLLOWED_ACTIONS.iter().map(|a| (*a).to_owned()).collect(),
        );
        let instance = instance.to_owned();
        let stream = docker
            .events(Some(EventsOptions::<String> {
                filters,
                ..Default::default()
            }))
            .filter_map(move |item| {
                let instance = instance.clone();
                async move {
                    let m = match item {
                        Ok(m) => m,
                        Err(e) => return Some(Err(EngineError::new("reading engine events", e))),
                    };
                    let actor = m.actor?;
                    let attrs = actor.attributes.unwrap_or_default();
                    if attrs.get(spec::LABEL_INSTANCE).map(String::as_str) != Some(&instance) {
                        return None;
                    }
                    let user = UserId::parse(attrs.get(spec::LABEL_USER)?).ok()?;
                    Some(Ok(EngineEvent {
                        action: m.action?,
                        container_id: actor.id?,
                        user,
                        exit_code: attrs.get("exitCode").and_then(|c| c.parse().ok()),
                        signal: attrs.get("signal").cloned(),
                    }))
                }
            });
        Box::pin(stream)
    }
}

impl Engine {
    pub async fn create(
        &self,
        cfg: &Config,
        user: &UserId,
        workspace: &Path,
        agent_key: &str,
        node: Option<&str>,
    ) -> Result<(String, String), EngineError> {
        let name = spec::container_name(&cfg.instance, user);
        let (docker, mut config) = match node {
            None => (
                self.docker.clone(),
                spec::container_config(cfg, user, workspace),
            ),
            Some(node) => {
                let docker = self.node_client(node)?.0;
                let volume = spec::volume_name(&cfg.instance, user);
                self.ensure_volume(&docker, cfg, user, &volume).await?;
                let ws = spec::Workspace::Volume(&volume);
                (docker, spec::container_config_in(cfg, user, ws))
            }
        };
        spec::set_agent_key(&mut config, agent_key);
        let res = docker
            .create_container(
                Some(CreateContainerOptions {
                    name: name.clone(),
                    platform: None,
                }),
                config,
            )
            .await
            .map_err(failed("creating the container"))?;
        if let Some(node) = node {
            self.own(&res.id, node);
        }
        Ok((res.id, name))
    }

    /// Swarm mode: the user's workspace volume on the node, created when missing (empty: the
    /// engine copies the image's /workspace into it, owner included, at the first mount).
    async fn ensure_volume(
        &self,
        docker: &Docker,
        cfg: &Config,
        user: &UserId,
        name: &str,
    ) -> Result<(), EngineError> {
        match docker.inspect_volume(name).await {
            Ok(_) => return Ok(()),
            Err(e) => {
                let e = EngineError::new("inspecting the workspace volume", e);
                if e.kind != ErrorKind::NotFound {
                    return Err(e);
                }
            }
        }
        docker
            .create_volume(bollard::volume::CreateVolumeOptions {
                name: name.to_owned(),
                driver: "local".to_owned(),
                driver_opts: HashMap::new(),
                labels: spec::labels(&cfg.instance, user),
            })
            .await
            .map_err(failed("creating the workspace volume"))?;
        Ok(())
    }

    pub async fn start(&self, id: &str) -> Result<(), EngineError> {
        let (docker, node) = self.client(id)?;
        match docker
            .start_container(id, None::<StartContainerOptions<String>>)
            .await
        {
            Ok(()) => Ok(()),
            // 304: already running.
            Err(BollardError::DockerResponseServerError {
                status_code: 304, ..
            }) => Ok(()),
            Err(e) => Err(self.on_node(&node, EngineError::new("starting the container", e))),
        }
    }

    pub async fn stop(&self, id: &str, timeout_secs: i64) -> Result<(), EngineError> {
        // The engine answers a stop only after the grace period: bound it beyond that.
        let grace = std::time::Duration::from_secs(timeout_secs.max(0) as u64);
        let (docker, node) = self.client(id)?;
        match docker
            .with_timeout(CALL_TIMEOUT + grace)
            .stop_container(id, Some(StopContainerOptions { t: timeout_secs }))
            .await
        {
            Ok(()) => Ok(()),
            Err(BollardError::DockerResponseServerError {
                status_code: 304, ..
            }) => Ok(()),
            Err(e) => Err(self.on_node(&node, EngineError::new("stopping the container", e))),
        }
    }

    /// Force-removes a container; a missing one is not an error.
    pub async fn remove(&self, id: &str) -> Result<(), EngineError> {
        self.gates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        let (docker, node) = self.client(id)?;
        let res = docker
            .remove_container(
                id,
                Some(RemoveContainerOptions {
                    force: true,
                    v: true,
                    ..Default::default()
                }),
            )
            .await;
        let res =
            ok_if_not_found(res, "removing the container").map_err(|e| self.on_node(&node, e));
        if res.is_ok() {
            if let Some(fleet) = &self.fleet {
                fleet
                    .owner
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(id);
            }
        }
        res
    }

    pub async fn pause(&self, id: &str) -> Result<(), EngineError> {
        let gate = self.gate(id);
        let _no_exec_starting = gate.write().await;
        let (docker, node) = self.client(id)?;
        // With cgroup v1's freezer a task caught mid-`vfork` cannot be frozen: runc gives up
        // with "unable to freeze" and leaves the container thawed and running. A moment later
        // the task has moved on, so the pause is tried again a few times.
        let mut attempt = 1;
        loop {
            match docker.pause_container(id).await {
                Err(e)
                    if attempt < PAUSE_ATTEMPTS && e.to_string().contains("unable to freeze") =>
                {
                    tracing::debug!(
                        container = id,
                        attempt,
                        "the freezer could not freeze every task; pausing again"
                    );
                    attempt += 1;
                    tokio::time::sleep(PAUSE_RETRY_AFTER).await;
                }
                r => {
                    return r
                        .map_err(failed("pausing the container"))
                        .map_err(|e| self.on_node(&node, e))
                }
            }
        }
    }

    pub async fn unpause(&self, id: &str) -> Result<(), EngineError> {
        let (docker, node) = self.client(id)?;
        docker
            .unpause_container(id)
            .await
            .map_err(failed("unpausing the container"))
            .map_err(|e| self.on_node(&node, e))
    }

    /// Sets the container's CPU quota (running, paused or stopped: the engine applies it to the
    /// cgroup now, or at the next start).
    pub async fn set_cpus(&self, id: &str, nano_cpus: i64) -> Result<(), EngineError> {
        let (docker, node) = self.client(id)?;
        docker
            .update_container(
                id,
                bollard::container::UpdateContainerOptions::<String> {
                    nano_cpus: Some(nano_cpus),
                    ..Default::default()
                },
            )
            .await
            .map_err(failed("updating the container's CPU quota"))
            .map_err(|e| self.on_node(&node, e))
    }

    /// Takes a created or stopped container off `network`, so its next start makes no endpoint
    /// (it starts with loopback only, and [`Self::attach`] attaches it while it boots).
    pub async fn detach(&self, id: &str, network: &str) -> Result<(), EngineError> {
        let (docker, node) = self.client(id)?;
        docker
            .disconnect_network(
                network,
                bollard::network::DisconnectNetworkOptions {
                    container: id,
                    force: false,
                },
            )
            .await
            .map_err(failed("taking the container off its network"))
            .map_err(|e| self.on_node(&node, e))
    }

    /// Attaches a running container to `network` (the engine makes its endpoint, address and
    /// DNS resolver now).
    pub async fn attach(&self, id: &str, network: &str) -> Result<(), EngineError> {
        let (docker, node) = self.client(id)?;
        docker
            .connect_network(
                network,
                bollard::network::ConnectNetworkOptions {
                    container: id,
                    endpoint_config: Default::default(),
                },
            )
            .await
            .map_err(failed("attaching the container to its network"))
            .map_err(|e| self.on_node(&node, e))
    }

    pub async fn inspect(&self, id: &str, network: &str) -> Result<Inspected, EngineError> {
        let (docker, node) = self.client(id)?;
        let c = docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
            .map_err(failed("inspecting the container"))
            .map_err(|e| self.on_node(&node, e))?;
        let st = c.state.unwrap_or_default();
        let state = match (st.paused, st.running, st.status) {
            (Some(true), _, _) => DockerState::Paused,
            (_, Some(true), _) => DockerState::Running,
            (_, _, Some(s)) => DockerState::parse(s.as_ref()),
            _ => DockerState::Other,
        };
        let ip = c
            .network_settings
            .and_then(|n| n.networks)
            .and_then(|mut n| n.remove(network))
            .and_then(|e| e.ip_address)
            .and_then(|ip| ip.parse().ok());
        let agent_key = c
            .config
            .and_then(|c| c.labels)
            .and_then(|mut l| l.remove(super::agent::KEY_LABEL))
            .filter(|k| k.len() == 64 && k.bytes().all(|b| b.is_ascii_hexdigit()));
        Ok(Inspected {
            state,
            ip,
            oom_killed: st.oom_killed.unwrap_or(false),
            pid: st.pid.filter(|p| *p > 0),
            exit_code: st.exit_code,
            nano_cpus: c.host_config.and_then(|h| h.nano_cpus),
            agent_key,
        })
    }

    /// Creates and starts an attached exec.
    pub async fn exec(
        &self,
        container: &str,
        spec: ExecSpec<'_>,
    ) -> Result<(String, ExecStream, ExecInput), EngineError> {
        self.exec_as(container, spec, false).await
    }

    /// [`Engine::exec`], or with `root` an exec as uid 0 without capabilities (swarm mode's
    /// network guard marker only: a fixed program, never client input).
    async fn exec_as(
        &self,
        container: &str,
        spec: ExecSpec<'_>,
        root: bool,
    ) -> Result<(String, ExecStream, ExecInput), EngineError> {
        let gate = self.gate(container);
        let _starting = gate.read().await;
        let (docker, node) = self.client(container)?;
        let user = if root {
            "0:0".to_owned()
        } else {
            format!("{}:{}", spec::SANDBOX_UID, spec::SANDBOX_GID)
        };
        // Never privileged: a root exec keeps the container's (dropped) capabilities.
        let created = docker
            .create_exec(
                container,
                CreateExecOptions::<String> {
                    cmd: Some(spec.cmd),
                    env: Some(spec.env),
                    working_dir: spec.working_dir.map(str::to_owned),
                    attach_stdin: Some(spec.stdin),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    tty: Some(spec.tty),
                    user: Some(user),
                    privileged: Some(false),
                    // Only meaningful with a TTY, where Docker always watches for a detach sequence (empty
                    // means the default); the terminal therefore runs without a Docker TTY and makes
                    // its PTY inside the container (see terminal/mod.rs).
                    detach_keys: Some(String::new()),
                },
            )
            .await
            .map_err(failed(CREATING_EXEC))
            .map_err(|e| self.on_node(&node, e))?;
        let started = docker
            .start_exec(
                &created.id,
                Some(StartExecOptions {
                    detach: false,
                    tty: spec.tty,
                    output_capacity: Some(64 * 1024),
                }),
            )
            .await
            .map_err(failed("starting an exec"))
            .map_err(|e| self.on_node(&node, e))?;
        match started {
            StartExecResults::Attached { output, input } => {
                self.exec_settled(container, &created.id).await;
                let output = output.filter_map(|item| async move {
                    match item {
                        Ok(LogOutput::StdOut { message }) | Ok(LogOutput::Console { message }) => {
                            Some(Ok(ExecOutput::Stdout(message)))
                        }
                        Ok(LogOutput::StdErr { message }) => Some(Ok(ExecOutput::Stderr(message))),
                        Ok(LogOutput::StdIn { .. }) => None,
                        Err(e) => Some(Err(EngineError::new("reading exec output", e))),
                    }
                });
                Ok((created.id, Box::pin(output), input))
            }
            StartExecResults::Detached => Err(EngineError::other(
                "starting an exec",
                "exec started detached".into(),
            )),
        }
    }

    /// Runs a command to completion, discarding output beyond 64 KiB; returns its exit code.
    pub async fn run(
        &self,
        container: &str,
        cmd: Vec<String>,
    ) -> Result<(i64, String), EngineError> {
        let (id, mut out, _input) = self
            .exec(
                container,
                ExecSpec {
                    cmd,
                    env: vec![],
                    working_dir: None,
                    tty: false,
                    stdin: false,
                },
            )
            .await?;
        let mut text = Vec::new();
        while let Some(chunk) = out.next().await {
            let (ExecOutput::Stdout(b) | ExecOutput::Stderr(b)) = chunk?;
            if text.len() < 64 * 1024 {
                text.extend_from_slice(&b);
            }
        }
        let info = self.exec_info(container, &id).await?;
        Ok((
            info.exit_code.unwrap_or(-1),
            String::from_utf8_lossy(&text).into_owned(),
        ))
    }

    pub async fn resize_exec(
        &self,
        container: &str,
        exec_id: &str,
        cols: u16,
        rows: u16,
    ) -> Result<(), EngineError> {
        self.client(container)?
            .0
            .resize_exec(
                exec_id,
                ResizeExecOptions {
                    height: rows,
                    width: cols,
                },
            )
            .await
            .map_err(failed("resizing the terminal"))
    }

    pub async fn exec_info(&self, container: &str, exec_id: &str) -> Result<ExecInfo, EngineError> {
        let (docker, node) = self.client(container)?;
        let i = docker
            .inspect_exec(exec_id)
            .await
            .map_err(failed("inspecting an exec"))
            .map_err(|e| self.on_node(&node, e))?;
        Ok(ExecInfo {
            running: i.running.unwrap_or(false),
            exit_code: i.exit_code,
            pid: i.pid,
        })
    }

    /// Memory in use by a container as `docker stats` counts it (usage less inactive page
    /// cache), from one stats sample (`stream: false, one_shot: true`). `None` when the engine
    /// reports none (a stopped container).
    pub async fn memory_in_use(&self, id: &str) -> Result<Option<u64>, EngineError> {
        use bollard::container::{MemoryStatsStats, StatsOptions};
        let docker = self.client(id)?.0;
        let mut s = docker.stats(
            id,
            Some(StatsOptions {
                stream: false,
                one_shot: true,
            }),
        );
        let Some(stats) = s.next().await else {
            return Ok(None);
        };
        let m = stats
            .map_err(failed("reading container stats"))?
            .memory_stats;
        let inactive = match m.stats {
            Some(MemoryStatsStats::V1(v1)) => v1.total_inactive_file,
            Some(MemoryStatsStats::V2(v2)) => v2.inactive_file,
            None => 0,
        };
        Ok(m.usage
            .filter(|u| *u > 0)
            .map(|u| u.saturating_sub(inactive)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    fn status(code: u16) -> BollardError {
        BollardError::DockerResponseServerError {
            status_code: code,
            message: "engine says no".into(),
        }
    }

    #[test]
    fn bollard_errors_map_to_kinds() {
        assert_eq!(classify(&status(404)), (ErrorKind::NotFound, Some(404)));
        assert_eq!(classify(&status(409)), (ErrorKind::Conflict, Some(409)));
        assert_eq!(classify(&status(500)), (ErrorKind::Other, Some(500)));
        for transport in [
            BollardError::RequestTimeoutError,
            BollardError::IOError {
                err: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
            },
            BollardError::SocketNotFoundError("/var/run/docker.sock".into()),
        ] {
            assert_eq!(classify(&transport), (ErrorKind::Unavailable, None));
        }
        let odd = BollardError::JsonDataError {
            message: "x".into(),
            column: 0,
        };
        assert_eq!(classify(&odd), (ErrorKind::Other, None));
    }

    #[test]
    fn kinds_survive_anyhow_and_context() {
        let e = anyhow::Error::from(EngineError::new("inspecting the container", status(404)))
            .context("syncing");
        assert_eq!(kind_of(&e), Some(ErrorKind::NotFound));
        assert_eq!(e.engine_kind(), Some(ErrorKind::NotFound));
        assert_eq!(kind_of(&anyhow::anyhow!("store down")), None);
        // The message keeps what was being done, then the engine's own words.
        let shown = format!(
            "{:#}",
            anyhow::Error::from(EngineError::new("pausing", status(409)))
        );
        assert!(shown.starts_with("pausing: "), "{shown}");
        assert!(shown.contains("engine says no"), "{shown}");
    }

    #[test]
    fn only_a_refused_creation_means_nothing_ran() {
        for code in [404, 409] {
            assert!(EngineError::new(CREATING_EXEC, status(code)).refused_exec());
            assert!(!EngineError::new("starting an exec", status(code)).refused_exec());
        }
        assert!(!EngineError::new(CREATING_EXEC, status(500)).refused_exec());
        assert!(!EngineError::new(CREATING_EXEC, BollardError::RequestTimeoutError).refused_exec());
    }

    #[test]
    fn classifies_transport_failures_only() {
        let refused = anyhow::Error::from(EngineError::new(
            "starting the container",
            BollardError::IOError {
                err: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
            },
        ));
        assert!(is_unavailable(&refused));
        assert!(is_unavailable(&anyhow::Error::from(EngineError::new(
            "pinging",
            BollardError::RequestTimeoutError
        ))));
        let answered =
            anyhow::Error::from(EngineError::new("inspecting the container", status(404)));
        assert!(!is_unavailable(&answered));
        assert!(engine_error(&answered).is_some_and(EngineError::answered));
        assert!(!engine_error(&refused).is_some_and(EngineError::answered));
        let io: anyhow::Result<()> =
            Err(std::io::Error::from(std::io::ErrorKind::ConnectionReset)).context("reading");
        assert!(is_unavailable(&io.unwrap_err()));
        assert!(!is_unavailable(&anyhow::anyhow!("container is Exited")));
    }
}
