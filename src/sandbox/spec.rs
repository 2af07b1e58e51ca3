//! The container spec: names, labels and every hardening setting, as a pure function of the
//! validated user and the configuration. Unit-tested here; asserted on a real container by
//! `tests/it/hardening.rs`.

use std::collections::HashMap;
use std::path::Path;

use bollard::container::{Config as ContainerConfig, NetworkingConfig};
use bollard::models::{
    EndpointSettings, HostConfig, HostConfigLogConfig, Mount, MountTypeEnum, ResourcesUlimits,
    RestartPolicy, RestartPolicyNameEnum,
};

use crate::config::Config;
use crate::user::UserId;

pub const LABEL_MANAGED: &str = "sandboxd.managed";
pub(super) const LABEL_USER: &str = "sandboxd.user";
pub(super) const LABEL_INSTANCE: &str = "sandboxd.instance";

/// uid:gid of the sandbox user inside the image.
pub(super) const SANDBOX_UID: u32 = 1000;
pub(super) const SANDBOX_GID: u32 = 1000;
pub const WORKSPACE: &str = "/workspace";

/// The private bridge network of an instance.
pub(super) fn network_name(instance: &str) -> String {
    format!("{instance}-net")
}

/// Swarm mode: the user's workspace volume on their node.
pub fn volume_name(instance: &str, user: &UserId) -> String {
    format!("{instance}-ws-{user}")
}

/// The environment variable that makes the sandbox's init wait for the network guard (swarm
/// mode: sandboxd installs the rules through an exec at every start, then writes [`GUARD_MARK`]).
pub const GUARD_ENV: &str = "SANDBOXD_NET_GUARD";
/// The marker the guard's exec writes (root-owned; /run is a root tmpfs of mode 0755).
pub const GUARD_MARK: &str = "/run/sandboxd-net-guard";

/// What is mounted at /workspace.
#[derive(Clone, Copy, Debug)]
pub enum Workspace<'a> {
    /// One host: the user's folder under `workspaces_dir`.
    Bind(&'a Path),
    /// Swarm mode: the named volume on the user's node.
    Volume(&'a str),
}

/// The network sandboxes join: the instance's bridge, or in swarm mode the overlay.
pub fn sandbox_network(cfg: &Config) -> String {
    match &cfg.swarm {
        Some(s) => s.network.clone(),
        None => network_name(&cfg.instance),
    }
}

/// A fresh container name: `<instance>-user-<id>-<8 hex>`. The suffix keeps names unique across
/// re-creations, so a slow removal of an old container never blocks the new one.
pub fn container_name(instance: &str, user: &UserId) -> String {
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
    format!("{instance}-user-{user}-{suffix}")
}

/// The hostname inside the sandbox (no instance, no suffix: what the user sees in the prompt).
pub fn hostname(user: &UserId) -> String {
    format!("sandbox-{user}")
}

pub fn labels(instance: &str, user: &UserId) -> HashMap<String, String> {
    HashMap::from([
        (LABEL_MANAGED.to_owned(), "true".to_owned()),
        (LABEL_USER.to_owned(), user.to_string()),
        (LABEL_INSTANCE.to_owned(), instance.to_owned()),
    ])
}

/// Docker list filters selecting this instance's containers.
pub(super) fn instance_filters(instance: &str) -> HashMap<String, Vec<String>> {
    HashMap::from([(
        "label".to_owned(),
        vec![
            format!("{LABEL_MANAGED}=true"),
            format!("{LABEL_INSTANCE}={instance}"),
        ],
    )])
}

/// Environment of the sandbox's main process (and so of the autostarted dev server).
pub fn env(cfg: &Config, user: &UserId) -> Vec<String> {
    let preview_host = format!("user-{user}.{}", cfg.preview_domain);
    let mut env = vec![
        "HOME=/home/sandbox".to_owned(),
        "TERM=xterm-256color".to_owned(),
        format!("SANDBOXD_USER={user}"),
        format!("SANDBOXD_PREVIEW_HOST={preview_host}"),
        format!("SANDBOXD_PREVIEW_PORT={}", crate::config::PREVIEW_PORT),
        // Vite answers 403 to Host names it does not know; this variable (read by Vite 5+) adds
        // the preview domain to `server.allowedHosts` without the user editing vite.config.
        // Rejected alternative: rewriting Host to localhost in the proxy, which breaks apps that
        // build absolute URLs from Host.
        format!(
            "__VITE_ADDITIONAL_SERVER_ALLOWED_HOSTS=.{}",
            cfg.preview_domain
        ),
    ];
    if !cfg.dev_command.is_empty() {
        env.push(format!("SANDBOXD_DEV_COMMAND={}", cfg.dev_command));
    }
    env
}

/// A fresh agent key: 32 random bytes as 64 hex characters.
pub fn new_agent_key() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

/// Gives a create request its agent key: in the environment (read by the agent, which removes
/// it from what it starts) and in a label (read back after the edge restarts).
pub(super) fn set_agent_key(c: &mut ContainerConfig<String>, key: &str) {
    use super::agent::{KEY_ENV, KEY_LABEL};
    c.env
        .get_or_insert_with(Vec::new)
        .push(format!("{KEY_ENV}={key}"));
    c.labels
        .get_or_insert_with(HashMap::new)
        .insert(KEY_LABEL.to_owned(), key.to_owned());
}

/// Label of swarm mode's one-shot network guard helpers (value: the instance): they are never
/// sandboxes (no `sandboxd.managed`), so recovery never adopts one.
pub const LABEL_GUARD: &str = "sandboxd.guard";

/// Swarm mode's network guard helper: the sandbox image running `cmd` as root in the network
/// namespace of `sandbox` only, with `NET_ADMIN` alone, no-new-privileges, read-only, small.
pub(super) fn guard_helper_config(
    sandbox: &str,
    image: &str,
    instance: &str,
    cmd: Vec<String>,
) -> ContainerConfig<String> {
    ContainerConfig {
        image: Some(image.to_owned()),
        user: Some("0:0".to_owned()),
        entrypoint: Some(vec![]),
        cmd: Some(cmd),
        labels: Some(HashMap::from([(
            LABEL_GUARD.to_owned(),
            instance.to_owned(),
        )])),
        host_config: Some(HostConfig {
            network_mode: Some(format!("container:{sandbox}")),
            cap_drop: Some(vec!["ALL".to_owned()]),
            cap_add: Some(vec!["NET_ADMIN".to_owned()]),
            security_opt: Some(vec!["no-new-privileges:true".to_owned()]),
            readonly_rootfs: Some(true),
            tmpfs: Some(HashMap::from([(
                "/run".to_owned(),
                "rw,nosuid,nodev,noexec,size=1048576,mode=0755".to_owned(),
            )])),
            memory: Some(64 << 20),
            pids_limit: Some(16),
            privileged: Some(false),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The full create request for a user's container with its folder bind-mounted (one host).
pub fn container_config(cfg: &Config, user: &UserId, workspace: &Path) -> ContainerConfig<String> {
    container_config_in(cfg, user, Workspace::Bind(workspace))
}

/// The full create request for a user's container.
pub fn container_config_in(
    cfg: &Config,
    user: &UserId,
    workspace: Workspace<'_>,
) -> ContainerConfig<String> {
    let l = &cfg.limits;
    let tmpfs = HashMap::from([
        (
            "/tmp".to_owned(),
            format!("rw,exec,nosuid,nodev,size={},mode=1777", l.tmp_size_bytes),
        ),
        (
            "/home/sandbox".to_owned(),
            format!(
                "rw,exec,nosuid,nodev,size={},uid={SANDBOX_UID},gid={SANDBOX_GID},mode=0755",
                l.home_size_bytes
            ),
        ),
        (
            "/run".to_owned(),
            "rw,nosuid,nodev,noexec,size=16777216,mode=0755".to_owned(),
        ),
    ]);
    let network = sandbox_network(cfg);
    let (binds, mounts) = match workspace {
        Workspace::Bind(path) => (
            Some(vec![format!("{}:{WORKSPACE}:rw", path.display())]),
            None,
        ),
        Workspace::Volume(name) => (
            None,
            Some(vec![Mount {
                target: Some(WORKSPACE.to_owned()),
                source: Some(name.to_owned()),
                typ: Some(MountTypeEnum::VOLUME),
                read_only: Some(false),
                ..Default::default()
            }]),
        ),
    };
    let mut env = env(cfg, user);
    if cfg.swarm.is_some() {
        env.push(format!("{GUARD_ENV}=1"));
    }
    let host_config = HostConfig {
        binds,
        mounts,
        network_mode: Some(network.clone()),
        // No port bindings at all: previews are reached over the private network.
        port_bindings: Some(HashMap::new()),
        publish_all_ports: Some(false),
        memory: Some(l.memory_bytes),
        // memory+swap equal to memory: no swap.
        memory_swap: Some(l.memory_bytes),
        // Created with the boot quota; the manager gives the configured one back once the app
        // listens (see `Manager::boot_boost`).
        nano_cpus: Some(l.boot_nano_cpus),
        pids_limit: Some(l.pids),
        ulimits: Some(vec![
            ResourcesUlimits {
                name: Some("nofile".to_owned()),
                soft: Some(l.nofile),
                hard: Some(l.nofile),
            },
            ResourcesUlimits {
                name: Some("fsize".to_owned()),
                soft: Some(l.fsize_bytes),
                hard: Some(l.fsize_bytes),
            },
            // No `nproc`: RLIMIT_NPROC counts every process of a uid on the whole host, and all
            // sandboxes run as uid 1000, so a few fork bombs would use up everyone's share. The
            // pids cgroup (pids_limit) bounds each sandbox on its own.
        ]),
        cap_drop: Some(vec!["ALL".to_owned()]),
        security_opt: Some(vec!["no-new-privileges:true".to_owned()]),
        readonly_rootfs: Some(true),
        tmpfs: Some(tmpfs),
        init: Some(true),
        privileged: Some(false),
        restart_policy: Some(RestartPolicy {
            name: Some(RestartPolicyNameEnum::NO),
            maximum_retry_count: None,
        }),
        log_config: Some(HostConfigLogConfig {
            typ: Some("json-file".to_owned()),
            config: Some(HashMap::from([
                ("max-size".to_owned(), "1m".to_owned()),
                ("max-file".to_owned(), "1".to_owned()),
            ])),
        }),
        ipc_mode: Some("private".to_owned()),
        runtime: cfg.runtime.clone(),
        ..Default::default()
    };
    ContainerConfig {
        image: Some(cfg.image.clone()),
        hostname: Some(hostname(user)),
        user: Some(format!("{SANDBOX_UID}:{SANDBOX_GID}")),
        working_dir: Some(WORKSPACE.to_owned()),
        env: Some(env),
        labels: Some(labels(&cfg.instance, user)),
        stop_timeout: Some(cfg.stop_timeout.as_secs() as i64),
        tty: Some(false),
        open_stdin: Some(false),
        attach_stdin: Some(false),
        attach_stdout: Some(false),
        attach_stderr: Some(false),
        host_config: Some(host_config),
        networking_config: Some(NetworkingConfig {
            endpoints_config: HashMap::from([(network, EndpointSettings::default())]),
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config::load(None, Vec::<(String, String)>::new()).unwrap()
    }

    #[test]
    fn names_come_from_the_validated_user_only() {
        let u = UserId::parse("42").unwrap();
        let n = container_name("sandboxd", &u);
        assert!(n.starts_with("sandboxd-user-42-"), "{n}");
        assert_eq!(n.len(), "sandboxd-user-42-".len() + 8);
        assert_ne!(n, container_name("sandboxd", &u));
    }

    #[test]
    fn hardening_is_complete() {
        let u = UserId::parse("7").unwrap();
        let c = container_config(&cfg(), &u, Path::new("/srv/ws/user-7"));
        let h = c.host_config.as_ref().unwrap();
        assert_eq!(h.cap_drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(h.cap_add, None);
        assert_eq!(
            h.security_opt,
            Some(vec!["no-new-privileges:true".to_owned()])
        );
        assert_eq!(h.readonly_rootfs, Some(true));
        assert_eq!(h.memory, Some(512 * 1024 * 1024));
        assert_eq!(h.memory_swap, h.memory);
        assert_eq!(h.nano_cpus, Some(cfg().limits.boot_nano_cpus));
        let mut off = cfg();
        off.limits.boot_nano_cpus = off.limits.nano_cpus;
        let c = container_config(&off, &u, Path::new("/srv/ws/user-7"));
        assert_eq!(c.host_config.unwrap().nano_cpus, Some(500_000_000));
        assert_eq!(h.pids_limit, Some(128));
        assert_eq!(h.init, Some(true));
        assert_eq!(h.privileged, Some(false));
        assert!(h.port_bindings.as_ref().unwrap().is_empty());
        assert_eq!(h.network_mode.as_deref(), Some("sandboxd-net"));
        assert_eq!(
            h.binds,
            Some(vec!["/srv/ws/user-7:/workspace:rw".to_owned()])
        );
        assert!(!h.binds.as_ref().unwrap()[0].contains("docker.sock"));
        let names: Vec<_> = h
            .ulimits
            .as_ref()
            .unwrap()
            .iter()
            .map(|u| u.name.clone().unwrap())
            .collect();
        assert!(names.contains(&"nofile".to_owned()) && names.contains(&"fsize".to_owned()));
        assert!(
            !names.contains(&"nproc".to_owned()),
            "nproc is per uid, host-wide"
        );
        assert_eq!(c.user.as_deref(), Some("1000:1000"));
        assert_eq!(c.stop_timeout, Some(2));
        assert_eq!(c.labels.as_ref().unwrap()[LABEL_USER], "7");
        assert!(c.exposed_ports.is_none());
        assert!(!c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .any(|e| e.starts_with(GUARD_ENV)));
    }

    #[test]
    fn the_guard_helper_holds_net_admin_only_in_the_sandbox_netns_and_is_never_a_sandbox() {
        let c = guard_helper_config("abc123", "img:1", "sandboxd", vec!["x".into()]);
        let h = c.host_config.as_ref().unwrap();
        assert_eq!(h.network_mode.as_deref(), Some("container:abc123"));
        assert_eq!(h.cap_drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(h.cap_add, Some(vec!["NET_ADMIN".to_owned()]));
        assert_eq!(h.privileged, Some(false));
        assert_eq!(h.readonly_rootfs, Some(true));
        assert_eq!(
            h.security_opt,
            Some(vec!["no-new-privileges:true".to_owned()])
        );
        assert!(
            h.binds.is_none() && h.mounts.is_none(),
            "no files of anyone"
        );
        let labels = c.labels.as_ref().unwrap();
        assert_eq!(
            labels.get(LABEL_GUARD).map(String::as_str),
            Some("sandboxd")
        );
        assert!(!labels.contains_key(LABEL_MANAGED) && !labels.contains_key(LABEL_USER));
        assert_eq!(c.entrypoint, Some(vec![]));
    }

    #[test]
    fn swarm_mode_uses_the_overlay_and_the_volume_and_keeps_the_hardening() {
        let mut cfg = cfg();
        cfg.swarm = Some(crate::config::SwarmConfig {
            managers: vec!["unix:///run/m.sock".into()],
            node_engine: "unix:///run/{hostname}.sock".into(),
            network: "sandboxd-overlay".into(),
            edge_cidr: "10.241.8.0/28".into(),
            node_labels: vec![],
            tls_dir: None,
        });
        let u = UserId::parse("7").unwrap();
        assert_eq!(volume_name("sandboxd", &u), "sandboxd-ws-7");
        let c = container_config_in(&cfg, &u, Workspace::Volume("sandboxd-ws-7"));
        let h = c.host_config.as_ref().unwrap();
        assert_eq!(h.binds, None);
        let m = &h.mounts.as_ref().unwrap()[0];
        assert_eq!(m.typ, Some(MountTypeEnum::VOLUME));
        assert_eq!(m.source.as_deref(), Some("sandboxd-ws-7"));
        assert_eq!(m.target.as_deref(), Some(WORKSPACE));
        assert_eq!(h.network_mode.as_deref(), Some("sandboxd-overlay"));
        assert!(c
            .networking_config
            .as_ref()
            .unwrap()
            .endpoints_config
            .contains_key("sandboxd-overlay"));
        assert_eq!(h.cap_drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(h.readonly_rootfs, Some(true));
        assert_eq!(h.privileged, Some(false));
        assert_eq!(
            h.security_opt,
            Some(vec!["no-new-privileges:true".to_owned()])
        );
        assert!(h.port_bindings.as_ref().unwrap().is_empty());
        assert!(c.env.as_ref().unwrap().contains(&format!("{GUARD_ENV}=1")));
    }
}
