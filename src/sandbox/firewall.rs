//! The packet filter around the instance's bridge network.
//!
//! Docker's bridge with `enable_icc=false` stops container-to-container traffic, but a container
//! can still open connections to the host itself through the bridge's gateway address (any
//! service listening on 0.0.0.0: sandboxd's own listeners, a database, an agent), to the
//! cloud metadata service (169.254.169.254) and to the private networks around the host. At
//! start-up sandboxd therefore installs two chains of its own, one hooked from `INPUT` (traffic
//! to the host) and one from `DOCKER-USER` (traffic forwarded elsewhere), both for packets that
//! come in on the instance's bridge interface only:
//!
//! - `SANDBOXD-IN-<id>`: replies to connections the host opened (the preview proxy) and DNS to
//!   the host's resolvers pass; everything else from a sandbox to the host is refused.
//! - `SANDBOXD-FW-<id>`: established traffic and DNS to the host's resolvers pass; traffic
//!   between sandboxes is dropped (again, beyond icc=false); `sandbox_blocked_networks`
//!   (link-local, RFC 1918 and CGNAT ranges by default) are refused; with
//!   `sandbox_internet = false` every new forwarded connection is refused.
//!
//! Both chains are written in one `iptables-restore --noflush` transaction that also replaces
//! any stale copy and its hooks, so a restart never leaves a window without rules. iptables is
//! run with argument vectors and a restore file on stdin, never through a shell.
//!
//! The rules stay while sandboxes of the instance run (they keep running while sandboxd is
//! down or restarting, and must stay confined); [`remove`] takes them away when none is left.
//! IPv6 needs no rules: the bridge network has no IPv6, and Docker disables IPv6 inside
//! containers on such a network (tests/security asserts that the sandbox has no IPv6 address).

use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context};
use sha2::Digest;

use super::docker::Engine;
use crate::config::Config;

/// iptables limits chain names to 28 characters.
const MAX_CHAIN: usize = 28;

/// The two chain names of an instance: `SANDBOXD-IN-<id>` and `SANDBOXD-FW-<id>`, where `<id>`
/// is the instance name, or a prefix of it plus a hash when it is too long.
pub fn chain_names(instance: &str) -> (String, String) {
    let room = MAX_CHAIN - "SANDBOXD-IN-".len();
    let id = if instance.len() <= room {
        instance.to_owned()
    } else {
        let hash = hex::encode(sha2::Sha256::digest(instance.as_bytes()));
        format!("{}-{}", &instance[..room - 9], &hash[..8])
    };
    (format!("SANDBOXD-IN-{id}"), format!("SANDBOXD-FW-{id}"))
}

/// What the rules are made of.
#[derive(Clone, Debug)]
pub struct Policy {
    /// The bridge interface, e.g. `br-0123456789ab`.
    pub bridge: String,
    /// Whether new connections to the internet are allowed.
    pub internet: bool,
    /// Resolvers sandboxes may query (port 53) even when they sit in a blocked network.
    pub resolvers: Vec<Ipv4Addr>,
    /// Destinations refused when the internet is allowed (CIDR text, validated by config).
    pub blocked: Vec<String>,
}

/// The `iptables-restore --noflush` input that (re)creates both chains and their hooks.
/// `stale` are the existing hook rules (`-A …` lines from `iptables -S`) to delete first.
/// Pure, so it is unit-tested.
pub(super) fn restore_script(instance: &str, p: &Policy, stale: &[String]) -> String {
    let (cin, cfw) = chain_names(instance);
    let br = &p.bridge;
    let mut s = String::from("*filter\n");
    // Declaring an existing chain in a --noflush restore flushes it.
    s += &format!(":{cin} - [0:0]\n:{cfw} - [0:0]\n");
    for rule in stale {
        if let Some(rest) = rule.strip_prefix("-A ") {
            s += &format!("-D {rest}\n");
        }
    }
    let est = "-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN";
    s += &format!("-A {cin} {est}\n");
    s += &format!("-A {cfw} {est}\n");
    for ns in &p.resolvers {
        for proto in ["udp", "tcp"] {
            s += &format!("-A {cin} -d {ns}/32 -p {proto} -m {proto} --dport 53 -j RETURN\n");
            if p.internet {
                s += &format!("-A {cfw} -d {ns}/32 -p {proto} -m {proto} --dport 53 -j RETURN\n");
            }
        }
    }
    // To the host: a TCP reset, so a client fails at once instead of hanging.
    s += &format!("-A {cin} -p tcp -j REJECT --reject-with tcp-reset\n");
    s += &format!("-A {cin} -j DROP\n");
    // Between sandboxes: dropped (Docker's icc=false does the same further down FORWARD).
    s += &format!("-A {cfw} -o {br} -j DROP\n");
    let refuse = "-j REJECT --reject-with icmp-admin-prohibited";
    if p.internet {
        for net in &p.blocked {
            s += &format!("-A {cfw} -d {net} {refuse}\n");
        }
    } else {
        s += &format!("-A {cfw} {refuse}\n");
    }
    s += &format!("-I INPUT 1 -i {br} -j {cin}\n");
    s += &format!("-I {} 1 -i {br} -j {cfw}\n", forward_hook());
    s += "COMMIT\n";
    s
}

/// Docker's chain for user rules on forwarded traffic; FORWARD itself when Docker does not
/// manage iptables (then there is no DOCKER-USER).
fn forward_hook() -> &'static str {
    static HOOK: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();
    HOOK.get_or_init(|| {
        if iptables(&["-S", "DOCKER-USER"]).is_ok() {
            "DOCKER-USER"
        } else {
            "FORWARD"
        }
    })
}

fn iptables(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("iptables")
        .arg("-w")
        .arg("10")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                anyhow!("iptables is not installed; sandboxd needs it to keep sandboxes away from the host (scripts/ensure-docker.sh installs it)")
            } else {
                anyhow!(e).context("running iptables")
            }
        })?;
    if !out.status.success() {
        bail!(
            "iptables {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn restore(script: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut child = Command::new("iptables-restore")
        .args(["-w", "10", "--noflush"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                anyhow!("iptables-restore is not installed (scripts/ensure-docker.sh installs iptables)")
            } else {
                anyhow!(e).context("running iptables-restore")
            }
        })?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(script.as_bytes())
        .context("writing to iptables-restore")?;
    let out = child
        .wait_with_output()
        .context("waiting for iptables-restore")?;
    if !out.status.success() {
        bail!(
            "iptables-restore failed: {}\n{script}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The rules in the hook chains that jump to this instance's chains (`-A …` lines).
fn hooks(instance: &str) -> anyhow::Result<Vec<String>> {
    let (cin, cfw) = chain_names(instance);
    let mut found = vec![];
    for chain in ["INPUT", "FORWARD", "DOCKER-USER"] {
        let Ok(text) = iptables(&["-S", chain]) else {
            continue;
        };
        for line in text.lines() {
            let mut words = line.split_whitespace().skip_while(|w| *w != "-j");
            if let (Some(_), Some(target)) = (words.next(), words.next()) {
                if target == cin || target == cfw {
                    found.push(line.to_owned());
                }
            }
        }
    }
    Ok(found)
}

fn chain_exists(chain: &str) -> bool {
    iptables(&["-S", chain]).is_ok()
}

/// Installs (or replaces) the instance's rules for `policy.bridge`, atomically.
pub fn install(instance: &str, policy: &Policy) -> anyhow::Result<()> {
    iptables(&["--version"])?;
    if !std::path::Path::new("/sys/class/net")
        .join(&policy.bridge)
        .exists()
    {
        bail!(
            "the sandbox network's bridge interface {} does not exist on this host",
            policy.bridge
        );
    }
    let stale = hooks(instance)?;
    restore(&restore_script(instance, policy, &stale)).context("installing the sandbox firewall")
}

/// Removes the instance's chains and their hooks; missing ones are not an error.
pub fn remove(instance: &str) -> anyhow::Result<()> {
    let (cin, cfw) = chain_names(instance);
    let mut s = String::from("*filter\n");
    for rule in hooks(instance)? {
        if let Some(rest) = rule.strip_prefix("-A ") {
            s += &format!("-D {rest}\n");
        }
    }
    for c in [&cin, &cfw] {
        if chain_exists(c) {
            s += &format!("-F {c}\n-X {c}\n");
        }
    }
    s += "COMMIT\n";
    restore(&s).context("removing the sandbox firewall")
}

/// The IPv4 resolvers Docker's embedded DNS forwards to: those of /etc/resolv.conf, or of
/// systemd-resolved's upstream file when the first lists only loopback addresses (Docker skips
/// loopback resolvers, which are unreachable from a container anyway).
pub(super) fn host_resolvers() -> Vec<Ipv4Addr> {
    let parse = |path: &str| -> Vec<Ipv4Addr> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().strip_prefix("nameserver"))
            .filter_map(|a| a.trim().parse::<IpAddr>().ok())
            .filter_map(|a| match a {
                IpAddr::V4(v4) if !v4.is_loopback() => Some(v4),
                _ => None,
            })
            .collect()
    };
    let found = parse("/etc/resolv.conf");
    if found.is_empty() {
        parse("/run/systemd/resolve/resolv.conf")
    } else {
        found
    }
}

/// Validates one `a.b.c.d/n` network (IPv4: the sandbox network has no IPv6).
pub fn valid_cidr(s: &str) -> bool {
    let Some((addr, len)) = s.split_once('/') else {
        return false;
    };
    addr.parse::<Ipv4Addr>().is_ok()
        && len.len() <= 2
        && len.bytes().all(|b| b.is_ascii_digit())
        && len.parse::<u8>().is_ok_and(|n| n <= 32)
}

/// Creates the sandbox network if needed and installs (or replaces) the instance's rules for its
/// bridge; returns the network's name. Fails start-up when iptables is missing or refuses:
/// sandboxes must never run without.
pub(super) async fn install_around(cfg: &Config, engine: &Engine) -> anyhow::Result<String> {
    let network = engine.ensure_network(cfg).await?;
    let (bridge, internal) = engine.bridge_interface(&network).await?;
    if internal == cfg.sandbox_internet {
        // The network keeps the setting it was created with; the firewall enforces the
        // configured one either way.
        tracing::warn!(
            network,
            internal,
            sandbox_internet = cfg.sandbox_internet,
            "the sandbox network was created with another internet setting"
        );
    }
    let policy = Policy {
        bridge,
        internet: cfg.sandbox_internet,
        resolvers: host_resolvers(),
        blocked: cfg.sandbox_blocked_networks.clone(),
    };
    let instance = cfg.instance.clone();
    tokio::task::spawn_blocking(move || install(&instance, &policy))
        .await
        .context("firewall task")??;
    Ok(network)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names_fit_iptables() {
        let (i, f) = chain_names("sandboxd");
        assert_eq!(
            (i.as_str(), f.as_str()),
            ("SANDBOXD-IN-sandboxd", "SANDBOXD-FW-sandboxd")
        );
        let long = "a".repeat(32);
        let (i, f) = chain_names(&long);
        assert_eq!(i.len(), MAX_CHAIN);
        assert_eq!(f.len(), MAX_CHAIN);
        assert_ne!(
            chain_names(&format!("{long}x")).0,
            chain_names(&format!("{long}y")).0
        );
    }

    #[test]
    fn script_replaces_stale_hooks_and_orders_rules() {
        let p = Policy {
            bridge: "br-0123456789ab".into(),
            internet: true,
            resolvers: vec![Ipv4Addr::new(10, 0, 0, 2)],
            blocked: vec!["169.254.0.0/16".into(), "10.0.0.0/8".into()],
        };
        let stale = vec!["-A INPUT -i br-old -j SANDBOXD-IN-x".to_owned()];
        let s = restore_script("x", &p, &stale);
        assert!(s.starts_with("*filter\n:SANDBOXD-IN-x - [0:0]\n:SANDBOXD-FW-x - [0:0]\n"));
        assert!(s.contains("-D INPUT -i br-old -j SANDBOXD-IN-x\n"));
        assert!(s.contains("-I INPUT 1 -i br-0123456789ab -j SANDBOXD-IN-x\n"));
        assert!(s.ends_with("COMMIT\n"));
        // DNS to the resolver comes before the blocked networks that contain it.
        let dns = s.find("-A SANDBOXD-FW-x -d 10.0.0.2/32 -p udp").unwrap();
        let block = s.find("-A SANDBOXD-FW-x -d 10.0.0.0/8").unwrap();
        assert!(dns < block);
        assert!(s.contains("-A SANDBOXD-FW-x -o br-0123456789ab -j DROP\n"));
        assert!(s.contains("-A SANDBOXD-IN-x -j DROP\n"));

        let off = restore_script(
            "x",
            &Policy {
                internet: false,
                ..p
            },
            &[],
        );
        assert!(off.contains("-A SANDBOXD-FW-x -j REJECT"));
        assert!(
            !off.contains("-A SANDBOXD-FW-x -d 10.0.0.2/32"),
            "no DNS out when offline"
        );
        assert!(!off.contains("-D "));
    }

    #[test]
    fn cidrs() {
        for ok in ["169.254.0.0/16", "10.0.0.0/8", "1.2.3.4/32", "0.0.0.0/0"] {
            assert!(valid_cidr(ok), "{ok}");
        }
        for bad in [
            "",
            "10.0.0.0",
            "10.0.0.0/33",
            "10.0.0/8",
            "fc00::/7",
            "10.0.0.0/8 -j ACCEPT",
            "a/8",
        ] {
            assert!(!valid_cidr(bad), "{bad}");
        }
    }
}
