//! Configuration: `config/sandboxd.toml` (every key documented there) overlaid with
//! `SANDBOXD_<KEY>` environment variables, validated into [`Config`].
//!
//! The file and the environment share one flat namespace: the TOML key `max_containers` is the
//! variable `SANDBOXD_MAX_CONTAINERS`. Unknown keys (in the file or as `SANDBOXD_*` variables) and
//! invalid values stop start-up with a message naming the key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};

/// Environment variables with the prefix that are not configuration keys.
/// The container port a preview host without a port prefix goes to. It is fixed by the sandbox
/// image: its init starts the dev server on it (`sandbox-image/sandboxd-init.js`), so it is not a
/// configuration key.
pub const PREVIEW_PORT: u16 = 5173;

/// Keys that no longer exist, with the reason: a file that still sets one fails with it instead
/// of a bare "unknown key".
const REMOVED_KEYS: &[(&str, &str)] = &[(
    "preview_port",
    "the preview port is fixed at 5173 by the sandbox image's init",
)];

const ENV_NOT_KEYS: &[&str] = &["SANDBOXD_CONFIG", "SANDBOXD_LOG"];
/// Variables under these prefixes belong to the test suites, the browser test and the
/// benchmarks (e.g. `SANDBOXD_E2E_BASE`), never to the server: every command ignores them, so a
/// shell that exports them can still run `sandboxd token`. Other unknown `SANDBOXD_*` names
/// (typos of real keys) stay errors.
const ENV_RESERVED_PREFIXES: &[&str] = &["SANDBOXD_TEST_", "SANDBOXD_E2E_", "SANDBOXD_BENCH_"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Str,
    Int,
    Float,
    Bool,
    Duration,
    List,
}

/// Every key, its kind and its default (as TOML text). `config/sandboxd.toml` documents them;
/// a unit test checks that the file and this table agree.
const KEYS: &[(&str, Kind, &str)] = &[
    ("http_addr", Kind::Str, "\"127.0.0.1:8080\""),
    ("https_addr", Kind::Str, "\"\""),
    ("metrics_addr", Kind::Str, "\"127.0.0.1:9464\""),
    ("domain", Kind::Str, "\"localhost\""),
    ("preview_domain", Kind::Str, "\"preview.localhost\""),
    ("public_url", Kind::Str, "\"\""),
    ("preview_public_url", Kind::Str, "\"\""),
    ("database_url", Kind::Str, "\"sqlite://data/sandboxd.db\""),
    ("workspaces_dir", Kind::Str, "\"workspaces\""),
    ("instance", Kind::Str, "\"sandboxd\""),
    ("auth_secret", Kind::Str, "\"\""),
    ("auth_secret_file", Kind::Str, "\"data/auth-secret\""),
    ("image", Kind::Str, "\"sandboxd-sandbox:latest\""),
    ("max_containers", Kind::Int, "20"),
    ("certs_dir", Kind::Str, "\"certs\""),
    ("memory_mb", Kind::Int, "512"),
    ("cpus", Kind::Float, "0.5"),
    ("boot_cpus", Kind::Float, "2.0"),
    ("boot_window", Kind::Duration, "\"10s\""),
    ("pids_limit", Kind::Int, "128"),
    ("nofile_limit", Kind::Int, "1024"),
    ("fsize_limit_mb", Kind::Int, "1024"),
    ("tmp_size_mb", Kind::Int, "256"),
    ("home_size_mb", Kind::Int, "512"),
    ("stop_timeout", Kind::Duration, "\"2s\""),
    ("exec_timeout", Kind::Duration, "\"10s\""),
    ("exec_max_timeout", Kind::Duration, "\"60s\""),
    ("exec_max_output_bytes", Kind::Int, "1048576"),
    ("exec_max_code_bytes", Kind::Int, "8388608"),
    ("exec_per_user", Kind::Int, "4"),
    ("max_body_bytes", Kind::Int, "10485760"),
    ("files_max_bytes", Kind::Int, "67108864"),
    ("start_timeout", Kind::Duration, "\"30s\""),
    ("idle_pause_after", Kind::Duration, "\"5m\""),
    ("idle_stop_after", Kind::Duration, "\"30m\""),
    ("idle_check_every", Kind::Duration, "\"10s\""),
    ("header_read_timeout", Kind::Duration, "\"10s\""),
    ("tls_handshake_timeout", Kind::Duration, "\"10s\""),
    ("shutdown_grace", Kind::Duration, "\"10s\""),
    ("cert_reload_every", Kind::Duration, "\"5s\""),
    ("max_connections", Kind::Int, "10000"),
    ("edge_threads", Kind::Int, "0"),
    ("allowed_origins", Kind::List, "[]"),
    ("terminal_max_frame_bytes", Kind::Int, "1048576"),
    ("terminal_per_user", Kind::Int, "8"),
    ("preview_extra_ports", Kind::List, "[]"),
    ("preview_access", Kind::Str, "\"public\""),
    ("wake_timeout", Kind::Duration, "\"30s\""),
    ("upstream_head_timeout", Kind::Duration, "\"5s\""),
    ("preview_fast_path", Kind::Bool, "true"),
    ("dev_command", Kind::Str, "\"\""),
    ("sandbox_internet", Kind::Bool, "true"),
    (
        "sandbox_blocked_networks",
        Kind::List,
        "[\"169.254.0.0/16\", \"10.0.0.0/8\", \"172.16.0.0/12\", \"192.168.0.0/16\", \"100.64.0.0/10\"]",
    ),
    ("runtime", Kind::Str, "\"\""),
    ("http_redirect", Kind::Bool, "false"),
    ("console_dir", Kind::Str, "\"console/dist\""),
    ("log_format", Kind::Str, "\"text\""),
    ("engine", Kind::Str, "\"docker\""),
    ("swarm_managers", Kind::List, "[]"),
    ("swarm_node_engine", Kind::Str, "\"\""),
    ("swarm_network", Kind::Str, "\"sandboxd-overlay\""),
    ("swarm_edge_cidr", Kind::Str, "\"\""),
    ("swarm_node_labels", Kind::List, "[]"),
    ("swarm_tls_dir", Kind::Str, "\"\""),
];

/// Validated configuration. Built only through [`Config::load`] or [`Config::from_table`].
#[derive(Clone, Debug)]
pub struct Config {
    pub http_addr: Option<SocketAddr>,
    pub https_addr: Option<SocketAddr>,
    /// Prometheus metrics listener (`GET /metrics`); `None` when disabled.
    pub metrics_addr: Option<SocketAddr>,
    /// The main host (API, terminal, console), lowercase.
    pub domain: String,
    /// Previews live at `user-<id>.<preview_domain>`, lowercase.
    pub preview_domain: String,
    /// Base URL printed and returned to clients, e.g. `https://example.com`; derived when empty.
    pub public_url: String,
    /// Scheme and port of preview URLs as clients reach them (`preview_public_url`, else
    /// `public_url`); `None` = those of the listener each request came in on.
    pub preview_public: Option<PublicBase>,
    pub database_url: String,
    pub workspaces_dir: PathBuf,
    pub instance: String,
    pub auth_secret: Option<String>,
    pub auth_secret_file: PathBuf,
    pub image: String,
    pub max_containers: usize,
    pub certs_dir: PathBuf,
    pub limits: Limits,
    pub stop_timeout: Duration,
    pub exec_timeout: Duration,
    pub exec_max_timeout: Duration,
    pub exec_max_output_bytes: usize,
    pub exec_max_code_bytes: usize,
    pub exec_per_user: usize,
    pub max_body_bytes: usize,
    /// Largest file (PUT /sandbox/files) or archive (PUT /sandbox/files/archive) upload.
    pub files_max_bytes: usize,
    pub start_timeout: Duration,
    /// Longest a sandbox keeps its boot CPU quota when its app does not listen.
    pub boot_window: Duration,
    pub idle_pause_after: Duration,
    pub idle_stop_after: Duration,
    pub idle_check_every: Duration,
    pub header_read_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    pub shutdown_grace: Duration,
    pub cert_reload_every: Duration,
    pub max_connections: usize,
    /// Edge threads serving the HTTP and HTTPS listeners, each a runtime of its own with its
    /// own `SO_REUSEPORT` socket (edge/percore.rs); 0 = one per core.
    pub edge_threads: usize,
    pub allowed_origins: Vec<String>,
    pub terminal_max_frame_bytes: usize,
    pub terminal_per_user: usize,
    pub preview_extra_ports: Vec<u16>,
    pub preview_access: PreviewAccess,
    pub wake_timeout: Duration,
    /// How long the preview waits for the app's response head before re-checking the sandbox.
    pub upstream_head_timeout: Duration,
    /// HTTP/1.1 preview `GET`/`HEAD` requests (plain or TLS) to a running sandbox are served
    /// by the edge's HTTP/1.1 fast path (edge/fast.rs) instead of hyper's server.
    pub preview_fast_path: bool,
    pub dev_command: String,
    pub sandbox_internet: bool,
    /// IPv4 networks sandboxes may not reach even with internet access (metadata, LANs).
    pub sandbox_blocked_networks: Vec<String>,
    pub runtime: Option<String>,
    pub http_redirect: bool,
    /// The built web console (`scripts/ensure-console.sh` fills it), served at `/`.
    pub console_dir: PathBuf,
    /// `text` (human) or `json` (one object per line) log lines on stderr.
    pub log_format: LogFormat,
    /// `engine = "swarm"`: sandboxes on the nodes of a Docker Swarm (`None`: one host engine).
    pub swarm: Option<SwarmConfig>,
}

/// Swarm mode's settings (`engine = "swarm"`).
#[derive(Clone, Debug)]
pub struct SwarmConfig {
    /// Engine URLs of managers, tried in order, for the node inventory and the network.
    pub managers: Vec<String>,
    /// A node's engine URL with `{hostname}` and `{addr}` to fill in.
    pub node_engine: String,
    /// The attachable overlay network sandboxes join.
    pub network: String,
    /// Where the edges sit on the overlay: the only sources that may connect to a sandbox.
    pub edge_cidr: String,
    /// `key=value` node labels a node must carry to receive new sandboxes.
    pub node_labels: Vec<(String, String)>,
    /// TLS to `https://` (or `tcp://`) engines: `ca.pem`, `cert.pem`, `key.pem` (Docker's
    /// `--tlsverify` layout); loaded and checked at start-up (`swarm::endpoint`).
    pub tls_dir: Option<PathBuf>,
}

/// An engine URL sandboxd can reach: `unix:///path`, or `https://host:port` / `tcp://host:port`
/// with a TLS dir (`swarm::endpoint`); why not otherwise.
fn check_engine_url(s: &str, tls: bool) -> Result<(), String> {
    crate::sandbox::swarm::endpoint::Endpoint::parse(s, tls).map(drop)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreviewAccess {
    Public,
    Owner,
}

impl PreviewAccess {
    pub fn as_str(self) -> &'static str {
        match self {
            PreviewAccess::Public => "public",
            PreviewAccess::Owner => "owner",
        }
    }
}

/// Per-container resource limits.
#[derive(Clone, Debug)]
pub struct Limits {
    pub memory_bytes: i64,
    pub nano_cpus: i64,
    /// CPU quota while a sandbox boots (until its app listens or `boot_window` ends); equal to
    /// `nano_cpus` when the boost is off.
    pub boot_nano_cpus: i64,
    pub pids: i64,
    pub nofile: i64,
    pub fsize_bytes: i64,
    pub tmp_size_bytes: i64,
    pub home_size_bytes: i64,
}

/// The boot quota in nano-CPUs: `boot_cpus` capped at the host's cores (the engine refuses
/// more), never below the configured `cpus`; `boot_cpus = 0` turns the boost off.
fn boot_nano_cpus(cpus: f64, boot_cpus: f64, host_cpus: usize) -> i64 {
    let boot = boot_cpus.min(host_cpus.max(1) as f64);
    ((boot.max(cpus)) * 1e9) as i64
}

fn host_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl Config {
    /// Loads the file (if any) and overlays `SANDBOXD_*` variables from `env`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<Config> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading config file {}", path.display()))?;
                text.parse::<toml::Table>()
                    .with_context(|| format!("parsing config file {}", path.display()))?
            }
            None => toml::Table::new(),
        };
        for (name, value) in env {
            let Some(rest) = name.strip_prefix("SANDBOXD_") else {
                continue;
            };
            if ENV_NOT_KEYS.contains(&name.as_str())
                || ENV_RESERVED_PREFIXES.iter().any(|p| name.starts_with(p))
            {
                continue;
            }
            let key = rest.to_ascii_lowercase();
            let kind =
                kind_of(&key).ok_or_else(|| anyhow!("unknown configuration variable {name}"))?;
            let parsed = env_value(kind, &value)
                .with_context(|| format!("invalid value for {name}: {value:?}"))?;
            table.insert(key, parsed);
        }
        Self::from_table(table)
    }

    /// Validates a table of keys (file and environment already merged), filling defaults.
    pub fn from_table(mut table: toml::Table) -> anyhow::Result<Config> {
        for key in table.keys() {
            if let Some((_, why)) = REMOVED_KEYS.iter().find(|(k, _)| k == key) {
                bail!("configuration key {key} was removed: {why}");
            }
            if kind_of(key).is_none() {
                bail!("unknown configuration key {key}");
            }
        }
        for (key, _, default) in KEYS {
            if !table.contains_key(*key) {
                let v: toml::Table = format!("v = {default}").parse().expect("valid default");
                table.insert((*key).to_owned(), v["v"].clone());
            }
        }
        let t = Table(table);
        let opt_addr = |key: &str| -> anyhow::Result<Option<SocketAddr>> {
            let s = t.str(key)?;
            if s.is_empty() {
                return Ok(None);
            }
            s.parse().map(Some).map_err(|_| {
                anyhow!("invalid value for {key}: {s:?} is not an address like 127.0.0.1:8080")
            })
        };
        let host_key = |key: &str| -> anyhow::Result<String> {
            let s = t.str(key)?.trim_end_matches('.').to_ascii_lowercase();
            let ok = !s.is_empty()
                && s.len() <= 200
                && s.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                });
            if !ok {
                bail!("invalid value for {key}: {s:?} is not a host name");
            }
            Ok(s)
        };
        let mb = |key: &str, min: i64, max: i64| -> anyhow::Result<i64> {
            Ok(t.int_in(key, min, max)? * 1024 * 1024)
        };
        let cpus = t.float("cpus")?;
        if !(0.01..=64.0).contains(&cpus) {
            bail!("invalid value for cpus: {cpus} (0.01 to 64)");
        }
        let boot_cpus = t.float("boot_cpus")?;
        if !(boot_cpus == 0.0 || (0.01..=64.0).contains(&boot_cpus)) {
            bail!("invalid value for boot_cpus: {boot_cpus} (0 = off, or 0.01 to 64)");
        }
        let preview_access = match t.str("preview_access")?.as_str() {
            "public" => PreviewAccess::Public,
            "owner" => PreviewAccess::Owner,
            other => bail!("invalid value for preview_access: {other:?} (public or owner)"),
        };
        let instance = t.str("instance")?;
        let instance_ok = !instance.is_empty()
            && instance.len() <= 32
            && instance
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && instance.as_bytes()[0].is_ascii_lowercase();
        if !instance_ok {
            bail!("invalid value for instance: {instance:?} (1-32 of a-z0-9-, starting with a letter)");
        }
        let database_url = t.str("database_url")?;
        if !(database_url.starts_with("sqlite:")
            || database_url.starts_with("postgres://")
            || database_url.starts_with("postgresql://"))
        {
            bail!("invalid value for database_url: must start with sqlite: or postgres://");
        }
        let secret = t.str("auth_secret")?;
        if !secret.is_empty() && secret.len() < 16 {
            bail!("invalid value for auth_secret: at least 16 characters");
        }
        let ports = |key: &str| -> anyhow::Result<Vec<u16>> {
            t.list(key)?
                .iter()
                .map(|p| {
                    p.parse::<u16>()
                        .ok()
                        .filter(|p| *p > 0)
                        .ok_or_else(|| anyhow!("invalid value for {key}: {p:?} is not a port"))
                })
                .collect()
        };
        let runtime = t.str("runtime")?;
        let preview_domain = host_key("preview_domain")?;
        let public_url = t.str("public_url")?.trim_end_matches('/').to_owned();
        let preview_public = match t.str("preview_public_url")?.as_str() {
            "" if public_url.is_empty() => None,
            "" => Some(
                PublicBase::parse(&public_url, None)
                    .map_err(|e| anyhow!("invalid value for public_url: {e}"))?,
            ),
            s => Some(
                PublicBase::parse(s, Some(&preview_domain))
                    .map_err(|e| anyhow!("invalid value for preview_public_url: {e}"))?,
            ),
        };
        let swarm = match t.str("engine")?.as_str() {
            "docker" => None,
            "swarm" => Some(swarm_config(&t)?),
            other => bail!("invalid value for engine: {other:?} (docker or swarm)"),
        };
        let cfg = Config {
            swarm,
            http_addr: opt_addr("http_addr")?,
            https_addr: opt_addr("https_addr")?,
            metrics_addr: opt_addr("metrics_addr")?,
            domain: host_key("domain")?,
            preview_domain,
            public_url,
            preview_public,
            database_url,
            workspaces_dir: PathBuf::from(t.nonempty("workspaces_dir")?),
            instance,
            auth_secret: (!secret.is_empty()).then_some(secret),
            auth_secret_file: PathBuf::from(t.nonempty("auth_secret_file")?),
            image: t.nonempty("image")?,
            max_containers: t.int_in("max_containers", 1, 100_000)? as usize,
            certs_dir: PathBuf::from(t.nonempty("certs_dir")?),
            limits: Limits {
                memory_bytes: mb("memory_mb", 32, 1 << 20)?,
                nano_cpus: (cpus * 1e9) as i64,
                boot_nano_cpus: boot_nano_cpus(cpus, boot_cpus, host_cpus()),
                pids: t.int_in("pids_limit", 16, 1 << 22)?,
                nofile: t.int_in("nofile_limit", 64, 1 << 20)?,
                fsize_bytes: mb("fsize_limit_mb", 1, 1 << 24)?,
                tmp_size_bytes: mb("tmp_size_mb", 1, 1 << 20)?,
                home_size_bytes: mb("home_size_mb", 1, 1 << 20)?,
            },
            stop_timeout: t.duration_in("stop_timeout", 0, 300_000)?,
            exec_timeout: t.duration_in("exec_timeout", 1, 3_600_000)?,
            exec_max_timeout: t.duration_in("exec_max_timeout", 1, 3_600_000)?,
            exec_max_output_bytes: t.int_in("exec_max_output_bytes", 1024, 1 << 30)? as usize,
            exec_max_code_bytes: t.int_in("exec_max_code_bytes", 1024, 1 << 30)? as usize,
            exec_per_user: t.int_in("exec_per_user", 1, 1024)? as usize,
            max_body_bytes: t.int_in("max_body_bytes", 1024, 1 << 30)? as usize,
            files_max_bytes: t.int_in("files_max_bytes", 1, 1 << 34)? as usize,
            start_timeout: t.duration_in("start_timeout", 100, 600_000)?,
            boot_window: t.duration_in("boot_window", 0, 600_000)?,
            idle_pause_after: t.duration_in("idle_pause_after", 100, u32::MAX as u64)?,
            idle_stop_after: t.duration_in("idle_stop_after", 100, u32::MAX as u64)?,
            idle_check_every: t.duration_in("idle_check_every", 10, 3_600_000)?,
            header_read_timeout: t.duration_in("header_read_timeout", 100, 600_000)?,
            tls_handshake_timeout: t.duration_in("tls_handshake_timeout", 100, 600_000)?,
            shutdown_grace: t.duration_in("shutdown_grace", 0, 600_000)?,
            cert_reload_every: t.duration_in("cert_reload_every", 100, 3_600_000)?,
            max_connections: t.int_in("max_connections", 1, 1_000_000)? as usize,
            edge_threads: t.int_in("edge_threads", 0, 256)? as usize,
            allowed_origins: t
                .list("allowed_origins")?
                .into_iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
            terminal_max_frame_bytes: t.int_in("terminal_max_frame_bytes", 1024, 1 << 28)? as usize,
            terminal_per_user: t.int_in("terminal_per_user", 1, 1024)? as usize,
            preview_extra_ports: ports("preview_extra_ports")?,
            preview_access,
            wake_timeout: t.duration_in("wake_timeout", 100, 600_000)?,
            upstream_head_timeout: t.duration_in("upstream_head_timeout", 100, 3_600_000)?,
            preview_fast_path: t.bool("preview_fast_path")?,
            dev_command: t.str("dev_command")?,
            sandbox_internet: t.bool("sandbox_internet")?,
            sandbox_blocked_networks: t
                .list("sandbox_blocked_networks")?
                .into_iter()
                .map(|n| {
                    let n = n.trim().to_owned();
                    if crate::sandbox::firewall::valid_cidr(&n) {
                        Ok(n)
                    } else {
                        Err(anyhow!(
                            "invalid value for sandbox_blocked_networks: {n:?} is not an IPv4 network like 10.0.0.0/8"
                        ))
                    }
                })
                .collect::<anyhow::Result<_>>()?,
            runtime: (!runtime.is_empty()).then_some(runtime),
            http_redirect: t.bool("http_redirect")?,
            console_dir: PathBuf::from(t.nonempty("console_dir")?),
            log_format: match t.str("log_format")?.as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => bail!("invalid value for log_format: {other:?} (text or json)"),
            },
        };
        if cfg.http_addr.is_none() && cfg.https_addr.is_none() {
            bail!("invalid value for http_addr: http_addr and https_addr cannot both be empty");
        }
        if let Some(m) = cfg.metrics_addr {
            if m.port() != 0 && [cfg.http_addr, cfg.https_addr].contains(&Some(m)) {
                bail!(
                    "invalid value for metrics_addr: metrics are never served on an edge listener"
                );
            }
        }
        if cfg.exec_timeout > cfg.exec_max_timeout {
            bail!("invalid value for exec_timeout: larger than exec_max_timeout");
        }
        if cfg.idle_stop_after < cfg.idle_pause_after {
            bail!("invalid value for idle_stop_after: shorter than idle_pause_after");
        }
        if cfg.preview_domain == cfg.domain {
            bail!("invalid value for preview_domain: must differ from domain");
        }
        Ok(cfg)
    }

    /// The main host's origins accepted for browsers (terminal WebSocket), lowercase.
    pub fn origins(&self) -> Vec<String> {
        if !self.allowed_origins.is_empty() {
            return self.allowed_origins.clone();
        }
        let mut out = vec![];
        for (scheme, addr) in [("http", self.http_addr), ("https", self.https_addr)] {
            let Some(addr) = addr else { continue };
            let default_port = if scheme == "http" { 80 } else { 443 };
            let hosts: Vec<String> = if self.domain == "localhost" {
                vec!["localhost".into(), "127.0.0.1".into(), "[::1]".into()]
            } else {
                vec![self.domain.clone()]
            };
            for host in hosts {
                if addr.port() == default_port {
                    out.push(format!("{scheme}://{host}"));
                }
                out.push(format!("{scheme}://{host}:{}", addr.port()));
            }
        }
        if !self.public_url.is_empty() {
            out.push(self.public_url.to_ascii_lowercase());
        }
        out
    }

    /// Whether the domains are development ones, for which certificates are generated.
    pub fn is_dev_domain(&self) -> bool {
        let dev = |d: &str| {
            d == "localhost"
                || d.ends_with(".localhost")
                || d.ends_with(".test")
                || d.ends_with(".internal")
        };
        dev(&self.domain) && dev(&self.preview_domain)
    }
}

/// The `swarm_*` keys, validated (only read with `engine = "swarm"`).
fn swarm_config(t: &Table) -> anyhow::Result<SwarmConfig> {
    let tls_dir = Some(t.str("swarm_tls_dir")?.trim().to_owned())
        .filter(|d| !d.is_empty())
        .map(PathBuf::from);
    let tls = tls_dir.is_some();
    let managers = t.list("swarm_managers")?;
    if managers.is_empty() {
        bail!(
            "invalid value for swarm_managers: engine = \"swarm\" needs at least one manager URL"
        );
    }
    for m in &managers {
        check_engine_url(m, tls).map_err(|e| anyhow!("invalid value for swarm_managers: {e}"))?;
    }
    let node_engine = t.str("swarm_node_engine")?;
    let sample = node_engine
        .replace("{hostname}", "n1")
        .replace("{addr}", "10.0.0.1");
    if !(node_engine.contains("{hostname}") || node_engine.contains("{addr}")) {
        bail!("invalid value for swarm_node_engine: {node_engine:?} (an engine URL with {{hostname}} or {{addr}}, e.g. unix:///run/sbxlab/{{hostname}}.sock or https://{{addr}}:2376)");
    }
    check_engine_url(&sample, tls)
        .map_err(|e| anyhow!("invalid value for swarm_node_engine: {node_engine:?}: {e}"))?;
    let network = t.nonempty("swarm_network")?;
    let network_ok = network.len() <= 64
        && network
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !network_ok {
        bail!("invalid value for swarm_network: {network:?} is not a network name");
    }
    let edge_cidr = t.str("swarm_edge_cidr")?.trim().to_owned();
    if !crate::sandbox::firewall::valid_cidr(&edge_cidr) {
        bail!("invalid value for swarm_edge_cidr: {edge_cidr:?} (the edges' part of the overlay, e.g. 10.241.8.0/28; required in swarm mode)");
    }
    let node_labels = t
        .list("swarm_node_labels")?
        .into_iter()
        .map(|l| {
            let ok = |s: &str| {
                !s.is_empty()
                    && s.len() <= 128
                    && s.bytes().all(|b| {
                        b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/')
                    })
            };
            match l.split_once('=') {
                Some((k, v)) if ok(k) && ok(v) => Ok((k.to_owned(), v.to_owned())),
                _ => Err(anyhow!(
                    "invalid value for swarm_node_labels: {l:?} is not a label like sandboxd=true"
                )),
            }
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(SwarmConfig {
        managers,
        node_engine,
        network,
        edge_cidr,
        node_labels,
        tls_dir,
    })
}

/// The scheme and port of a public base URL (`preview_public_url`, `public_url`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PublicBase {
    pub https: bool,
    /// `None` = the scheme's default port.
    pub port: Option<u16>,
}

impl PublicBase {
    /// Parses `http(s)://host[:port][/...]`. With `host`, the URL's host must be that one and
    /// nothing may follow it but `/`.
    pub fn parse(s: &str, host: Option<&str>) -> Result<PublicBase, String> {
        let uri: hyper::Uri = s
            .parse()
            .map_err(|_| format!("{s:?} is not a URL like https://preview.example.com"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(format!("{s:?} must start with http:// or https://")),
        };
        let auth = uri
            .authority()
            .ok_or_else(|| format!("{s:?} has no host"))?;
        if auth.as_str().contains('@') {
            return Err(format!("{s:?} may not contain a user name"));
        }
        if let Some(want) = host {
            let got = auth.host().trim_end_matches('.').to_ascii_lowercase();
            if got != want {
                return Err(format!(
                    "the host of {s:?} must be the preview domain {want:?} \
                     (previews are user-<id>.<preview_domain>)"
                ));
            }
            if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
                return Err(format!("{s:?} may have no path or query"));
            }
        }
        let default = if https { 443 } else { 80 };
        Ok(PublicBase {
            https,
            port: auth.port_u16().filter(|p| *p != default),
        })
    }
}

fn kind_of(key: &str) -> Option<Kind> {
    KEYS.iter()
        .find(|(k, _, _)| *k == key)
        .map(|(_, kind, _)| *kind)
}

fn env_value(kind: Kind, raw: &str) -> anyhow::Result<toml::Value> {
    Ok(match kind {
        Kind::Str | Kind::Duration => toml::Value::String(raw.to_owned()),
        Kind::Int => toml::Value::Integer(raw.trim().parse()?),
        Kind::Float => toml::Value::Float(raw.trim().parse()?),
        Kind::Bool => toml::Value::Boolean(match raw.trim() {
            "true" | "1" | "yes" => true,
            "false" | "0" | "no" => false,
            _ => bail!("expected true or false"),
        }),
        Kind::List => toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_owned()))
                .collect(),
        ),
    })
}

/// Parses `500ms`, `30s`, `5m`, `2h`, `1d` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let ms = match unit {
        "ms" => n,
        "" | "s" => n.checked_mul(1000)?,
        "m" => n.checked_mul(60_000)?,
        "h" => n.checked_mul(3_600_000)?,
        "d" => n.checked_mul(86_400_000)?,
        _ => return None,
    };
    Some(Duration::from_millis(ms))
}

/// Typed access to the merged table, each error naming its key.
struct Table(toml::Table);

impl Table {
    fn get(&self, key: &str) -> &toml::Value {
        &self.0[key]
    }
    fn str(&self, key: &str) -> anyhow::Result<String> {
        self.get(key)
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("invalid value for {key}: expected a string"))
    }
    fn nonempty(&self, key: &str) -> anyhow::Result<String> {
        let s = self.str(key)?;
        if s.is_empty() {
            bail!("invalid value for {key}: must not be empty");
        }
        Ok(s)
    }
    fn int_in(&self, key: &str, min: i64, max: i64) -> anyhow::Result<i64> {
        let v = self
            .get(key)
            .as_integer()
            .ok_or_else(|| anyhow!("invalid value for {key}: expected an integer"))?;
        if v < min || v > max {
            bail!("invalid value for {key}: {v} is outside {min}..={max}");
        }
        Ok(v)
    }
    fn float(&self, key: &str) -> anyhow::Result<f64> {
        match self.get(key) {
            toml::Value::Float(f) => Ok(*f),
            toml::Value::Integer(i) => Ok(*i as f64),
            _ => bail!("invalid value for {key}: expected a number"),
        }
    }
    fn bool(&self, key: &str) -> anyhow::Result<bool> {
        self.get(key)
            .as_bool()
            .ok_or_else(|| anyhow!("invalid value for {key}: expected true or false"))
    }
    fn list(&self, key: &str) -> anyhow::Result<Vec<String>> {
        let arr = self
            .get(key)
            .as_array()
            .ok_or_else(|| anyhow!("invalid value for {key}: expected a list"))?;
        arr.iter()
            .map(|v| match v {
                toml::Value::String(s) => Ok(s.clone()),
                toml::Value::Integer(i) => Ok(i.to_string()),
                _ => bail!("invalid value for {key}: expected strings"),
            })
            .collect()
    }
    fn duration_in(&self, key: &str, min_ms: u64, max_ms: u64) -> anyhow::Result<Duration> {
        let s = self.str(key)?;
        let d = parse_duration(&s).ok_or_else(|| {
            anyhow!("invalid value for {key}: {s:?} is not a duration like 500ms, 30s, 5m")
        })?;
        let ms = d.as_millis() as u64;
        if ms < min_ms || ms > max_ms {
            bail!("invalid value for {key}: {s} is outside {min_ms}ms..={max_ms}ms");
        }
        Ok(d)
    }
}

/// All keys with their default TOML text, for documentation checks.
pub fn documented_keys() -> BTreeMap<&'static str, &'static str> {
    KEYS.iter().map(|(k, _, d)| (*k, *d)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::load(None, env(&[])).unwrap();
        assert_eq!(c.http_addr, Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(c.domain, "localhost");
        assert_eq!(c.preview_domain, "preview.localhost");
        assert_eq!(c.limits.memory_bytes, 512 * 1024 * 1024);
        assert_eq!(c.limits.nano_cpus, 500_000_000);
        assert_eq!(c.limits.pids, 128);
        assert_eq!(c.exec_timeout, Duration::from_secs(10));
        assert_eq!(c.instance, "sandboxd");
    }

    #[test]
    fn boot_quota_is_capped_by_the_host_and_never_below_the_limit() {
        assert_eq!(boot_nano_cpus(0.5, 2.0, 8), 2_000_000_000);
        assert_eq!(
            boot_nano_cpus(0.5, 2.0, 1),
            1_000_000_000,
            "the engine refuses more"
        );
        assert_eq!(boot_nano_cpus(0.5, 0.0, 8), 500_000_000, "0 = off");
        assert_eq!(
            boot_nano_cpus(4.0, 2.0, 8),
            4_000_000_000,
            "never below cpus"
        );
        let c = Config::load(None, env(&[("SANDBOXD_BOOT_CPUS", "0")])).unwrap();
        assert_eq!(c.limits.boot_nano_cpus, c.limits.nano_cpus);
        assert_eq!(c.boot_window, Duration::from_secs(10));
        assert!(Config::load(None, env(&[("SANDBOXD_BOOT_CPUS", "-1")])).is_err());
        assert!(Config::load(None, env(&[("SANDBOXD_BOOT_CPUS", "100")])).is_err());
    }

    #[test]
    fn metrics_listener_is_loopback_by_default_and_never_an_edge_one() {
        let c = Config::load(None, env(&[])).unwrap();
        assert_eq!(c.metrics_addr, Some("127.0.0.1:9464".parse().unwrap()));
        let c = Config::load(None, env(&[("SANDBOXD_METRICS_ADDR", "")])).unwrap();
        assert_eq!(c.metrics_addr, None);
        let err = Config::load(
            None,
            env(&[
                ("SANDBOXD_METRICS_ADDR", "127.0.0.1:8080"),
                ("SANDBOXD_HTTP_ADDR", "127.0.0.1:8080"),
            ]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("metrics_addr"), "{err}");
    }

    #[test]
    fn swarm_mode_needs_its_keys_and_single_host_stays_the_default() {
        assert!(Config::load(None, env(&[])).unwrap().swarm.is_none());
        let ok = [
            ("SANDBOXD_ENGINE", "swarm"),
            ("SANDBOXD_SWARM_MANAGERS", "unix:///run/sbxlab/n1.sock"),
            (
                "SANDBOXD_SWARM_NODE_ENGINE",
                "unix:///run/sbxlab/{hostname}.sock",
            ),
            ("SANDBOXD_SWARM_EDGE_CIDR", "10.241.8.0/28"),
            ("SANDBOXD_SWARM_NODE_LABELS", "sandboxd=true"),
        ];
        let c = Config::load(None, env(&ok)).unwrap();
        let s = c.swarm.unwrap();
        assert_eq!(s.managers, ["unix:///run/sbxlab/n1.sock"]);
        assert_eq!(s.network, "sandboxd-overlay");
        assert_eq!(s.node_labels, [("sandboxd".to_owned(), "true".to_owned())]);
        for (key, bad) in [
            ("SANDBOXD_ENGINE", "kubernetes"),
            ("SANDBOXD_SWARM_MANAGERS", ""),
            ("SANDBOXD_SWARM_MANAGERS", "tcp://10.0.0.1:2375"),
            ("SANDBOXD_SWARM_NODE_ENGINE", "unix:///run/fixed.sock"),
            ("SANDBOXD_SWARM_EDGE_CIDR", ""),
            ("SANDBOXD_SWARM_EDGE_CIDR", "10.241.8.0/28 -j ACCEPT"),
            ("SANDBOXD_SWARM_NODE_LABELS", "sandboxd"),
            ("SANDBOXD_SWARM_NETWORK", "a b"),
            ("SANDBOXD_SWARM_NODE_ENGINE", "https://{addr}:2376"),
            ("SANDBOXD_SWARM_NODE_ENGINE", "http://{addr}:2375"),
        ] {
            let mut vars = ok.to_vec();
            vars.retain(|(k, _)| *k != key);
            vars.push((key, bad));
            let err = Config::load(None, env(&vars)).unwrap_err();
            let name = key.trim_start_matches("SANDBOXD_").to_ascii_lowercase();
            assert!(format!("{err:#}").contains(&name), "{key}={bad}: {err:#}");
        }
    }

    #[test]
    fn swarm_engines_over_tls_need_the_tls_dir() {
        let base = [
            ("SANDBOXD_ENGINE", "swarm"),
            ("SANDBOXD_SWARM_EDGE_CIDR", "10.241.8.0/28"),
        ];
        let mut tls = base.to_vec();
        tls.extend([
            (
                "SANDBOXD_SWARM_MANAGERS",
                "https://10.97.0.11:2376, tcp://m2.example:2376",
            ),
            ("SANDBOXD_SWARM_NODE_ENGINE", "https://{addr}:2376"),
            ("SANDBOXD_SWARM_TLS_DIR", "/etc/sandboxd/engine-tls"),
        ]);
        let s = Config::load(None, env(&tls)).unwrap().swarm.unwrap();
        assert_eq!(
            s.tls_dir.as_deref(),
            Some(std::path::Path::new("/etc/sandboxd/engine-tls"))
        );
        assert_eq!(s.managers.len(), 2);
        // The same without the TLS dir: refused, naming the key that needs it.
        tls.retain(|(k, _)| *k != "SANDBOXD_SWARM_TLS_DIR");
        let err = format!("{:#}", Config::load(None, env(&tls)).unwrap_err());
        assert!(
            err.contains("swarm_managers") && err.contains("swarm_tls_dir"),
            "{err}"
        );
        // unix:// engines need no TLS dir; the key stays empty.
        let mut unix = base.to_vec();
        unix.extend([
            ("SANDBOXD_SWARM_MANAGERS", "unix:///run/docker.sock"),
            ("SANDBOXD_SWARM_NODE_ENGINE", "unix:///run/{hostname}.sock"),
        ]);
        let s = Config::load(None, env(&unix)).unwrap().swarm.unwrap();
        assert_eq!(s.tls_dir, None);
    }

    #[test]
    fn env_overrides_and_names_bad_keys() {
        let c = Config::load(
            None,
            env(&[
                ("SANDBOXD_MAX_CONTAINERS", "3"),
                ("SANDBOXD_PREVIEW_DOMAIN", "Preview.Example.Test."),
                ("SANDBOXD_IDLE_PAUSE_AFTER", "500ms"),
                ("SANDBOXD_ALLOWED_ORIGINS", "https://a.test, https://b.test"),
                ("SANDBOXD_TEST_ANYTHING", "ignored"),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(c.max_containers, 3);
        assert_eq!(c.preview_domain, "preview.example.test");
        assert_eq!(c.idle_pause_after, Duration::from_millis(500));
        assert_eq!(c.allowed_origins, vec!["https://a.test", "https://b.test"]);

        let err = Config::load(None, env(&[("SANDBOXD_NOPE", "1")])).unwrap_err();
        assert!(err.to_string().contains("SANDBOXD_NOPE"), "{err}");
        let err = Config::load(None, env(&[("SANDBOXD_MAX_CONTAINERS", "many")])).unwrap_err();
        assert!(
            format!("{err:#}").contains("SANDBOXD_MAX_CONTAINERS"),
            "{err:#}"
        );
        let err = Config::load(None, env(&[("SANDBOXD_MAX_CONTAINERS", "0")])).unwrap_err();
        assert!(err.to_string().contains("max_containers"), "{err}");
        let err = Config::load(None, env(&[("SANDBOXD_HTTP_ADDR", "nope")])).unwrap_err();
        assert!(err.to_string().contains("http_addr"), "{err}");
        let err = Config::load(None, env(&[("SANDBOXD_EXEC_TIMEOUT", "10 parsecs")])).unwrap_err();
        assert!(err.to_string().contains("exec_timeout"), "{err}");
        let err = Config::load(None, env(&[("SANDBOXD_DATABASE_URL", "mysql://x")])).unwrap_err();
        assert!(err.to_string().contains("database_url"), "{err}");
    }

    #[test]
    fn unknown_file_key_is_named() {
        let table: toml::Table = "max_contaners = 3".parse().unwrap();
        let err = Config::from_table(table).unwrap_err();
        assert!(err.to_string().contains("max_contaners"), "{err}");
        let table: toml::Table = "max_containers = \"3\"".parse().unwrap();
        let err = Config::from_table(table).unwrap_err();
        assert!(err.to_string().contains("max_containers"), "{err}");
        let table: toml::Table = "preview_port = 5173".parse().unwrap();
        let err = Config::from_table(table).unwrap_err();
        assert!(
            err.to_string().contains("preview_port was removed"),
            "{err}"
        );
    }

    #[test]
    fn shipped_config_file_documents_every_key_with_its_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/sandboxd.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let table: toml::Table = text.parse().unwrap();
        for (key, default) in documented_keys() {
            let v: toml::Table = format!("v = {default}").parse().unwrap();
            assert_eq!(table.get(key), Some(&v["v"]), "config/sandboxd.toml: {key}");
        }
        assert_eq!(table.len(), KEYS.len());
        Config::load(Some(&path), env(&[])).unwrap();
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_duration("-1s"), None);
        assert_eq!(parse_duration("1.5s"), None);
        assert_eq!(parse_duration("99999999999999999999d"), None);
    }

    #[test]
    fn origins_default_to_main_host() {
        let c = Config::load(None, env(&[])).unwrap();
        let o = c.origins();
        assert!(o.contains(&"http://localhost:8080".to_owned()));
        assert!(o.contains(&"http://127.0.0.1:8080".to_owned()));
        assert!(!o.iter().any(|x| x.contains("preview")));
    }

    #[test]
    fn variables_of_tests_tools_and_benchmarks_are_not_configuration() {
        let c = Config::load(
            None,
            env(&[
                ("SANDBOXD_E2E_BASE", "http://127.0.0.1:8080"),
                ("SANDBOXD_E2E_TOKEN", "x"),
                ("SANDBOXD_TEST_DATABASE_URL", "sqlite"),
                ("SANDBOXD_BENCH_USERS", "100"),
                ("SANDBOXD_LOG", "debug"),
            ]),
        )
        .unwrap();
        assert_eq!(c.max_containers, 20);
        // Typos of real keys and other unknown names still stop every command.
        for typo in ["SANDBOXD_E2E", "SANDBOXD_MAX_CONTAINER", "SANDBOXD_TESTS_X"] {
            let err = Config::load(None, env(&[(typo, "1")])).unwrap_err();
            assert!(err.to_string().contains(typo), "{err}");
        }
    }

    #[test]
    fn public_bases_for_previews() {
        let p = |s: &str| PublicBase::parse(s, Some("preview.example.com"));
        assert_eq!(
            p("https://preview.example.com"),
            Ok(PublicBase {
                https: true,
                port: None
            })
        );
        assert_eq!(
            p("https://Preview.Example.com:443/"),
            Ok(PublicBase {
                https: true,
                port: None
            })
        );
        assert_eq!(
            p("http://preview.example.com:8080"),
            Ok(PublicBase {
                https: false,
                port: Some(8080)
            })
        );
        assert_eq!(p("http://preview.example.com:443").unwrap().port, Some(443));
        for bad in [
            "preview.example.com",
            "ftp://preview.example.com",
            "https://other.example.com",
            "https://preview.example.com/x",
            "https://preview.example.com/?a=1",
            "https://u@preview.example.com",
            "https://",
        ] {
            assert!(p(bad).is_err(), "{bad}");
        }
        let load = |pairs: &[(&str, &str)]| Config::load(None, env(pairs));
        let c = load(&[
            ("SANDBOXD_PREVIEW_DOMAIN", "preview.example.com"),
            (
                "SANDBOXD_PREVIEW_PUBLIC_URL",
                "https://preview.example.com:8443",
            ),
        ])
        .unwrap();
        assert_eq!(
            c.preview_public,
            Some(PublicBase {
                https: true,
                port: Some(8443)
            })
        );
        let err =
            load(&[("SANDBOXD_PREVIEW_PUBLIC_URL", "https://preview.example.com")]).unwrap_err();
        assert!(err.to_string().contains("preview_public_url"), "{err}");
        // Without it, public_url gives the scheme and port; without both, the listener does.
        let c = load(&[("SANDBOXD_PUBLIC_URL", "https://example.com/")]).unwrap();
        assert_eq!(
            c.preview_public,
            Some(PublicBase {
                https: true,
                port: None
            })
        );
        assert_eq!(load(&[]).unwrap().preview_public, None);
        let err = load(&[("SANDBOXD_PUBLIC_URL", "example.com")]).unwrap_err();
        assert!(err.to_string().contains("public_url"), "{err}");
    }
}
