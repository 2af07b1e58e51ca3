//! Swarm mode's network guard: the packet filter inside each sandbox's own network namespace.
//!
//! On the shared overlay every sandbox could otherwise reach every other one (any node, any
//! port), the nodes' engines and the swarm's control ports. The rules are an
//! `iptables-restore` file (filter table only: Docker's embedded DNS keeps its nat rules),
//! made here from the configuration and the inventory only (pure, unit-tested), installed at
//! every start (the namespace is new each start) by `scripts/net-guard.sh` in a one-shot helper
//! container that shares only the sandbox's network namespace, runs as root with `NET_ADMIN`
//! alone and is removed after (a privileged exec needs the host's whole capability bounding
//! set, which these VMs lack; a root exec in the sandbox has no capabilities). Then a root exec
//! in the sandbox writes the marker (root-owned, under the root tmpfs /run) that the sandbox's
//! init waits for before it starts the agent and the app (fail-closed after 10 s).
//!
//! - Inbound: loopback, replies, and new connections from `swarm_edge_cidr` only.
//! - Outbound new connections: refused to the overlay's subnets (other sandboxes, the edges'
//!   non-public ports), to every node's address (engines, swarm control ports), to the node's
//!   `docker_gwbridge` (the node itself); then `sandbox_blocked_networks`, or everything when
//!   `sandbox_internet = false`. DNS goes to Docker's resolver on 127.0.0.11 (loopback).
//! - Nothing is forwarded.

/// What the rules are made of.
#[derive(Clone, Debug)]
pub struct GuardPolicy {
    /// Sources that may open connections to the sandbox (the edges).
    pub edge_cidr: String,
    /// The overlay network's subnets.
    pub overlay: Vec<String>,
    /// Every node's swarm address.
    pub node_addrs: Vec<std::net::Ipv4Addr>,
    /// The subnets of the node's docker_gwbridge.
    pub bridge: Vec<String>,
    pub internet: bool,
    /// Refused destinations when the internet is allowed (CIDR text, validated by config).
    pub blocked: Vec<String>,
}

/// The `iptables-restore` input (a full replacement of the filter table).
pub fn guard_rules(p: &GuardPolicy) -> String {
    let refuse = "-j REJECT --reject-with icmp-admin-prohibited";
    let mut s =
        String::from("*filter\n:INPUT DROP [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    s += "-A INPUT -i lo -j ACCEPT\n";
    s += "-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n";
    s += &format!("-A INPUT -s {} -j ACCEPT\n", p.edge_cidr);
    s += "-A OUTPUT -o lo -j ACCEPT\n";
    s += "-A OUTPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n";
    for net in &p.overlay {
        s += &format!("-A OUTPUT -d {net} {refuse}\n");
    }
    for addr in &p.node_addrs {
        s += &format!("-A OUTPUT -d {addr}/32 {refuse}\n");
    }
    for net in &p.bridge {
        s += &format!("-A OUTPUT -d {net} {refuse}\n");
    }
    if p.internet {
        for net in &p.blocked {
            s += &format!("-A OUTPUT -d {net} {refuse}\n");
        }
    } else {
        s += &format!("-A OUTPUT {refuse}\n");
    }
    s += "COMMIT\n";
    s
}

/// Whether a text is an IPv4 network the rules may carry (`a.b.c.d/n`): what the engine
/// reports is checked before it goes into the file.
pub fn usable_cidr(s: &str) -> bool {
    crate::sandbox::firewall::valid_cidr(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(internet: bool) -> GuardPolicy {
        GuardPolicy {
            edge_cidr: "10.241.8.0/28".into(),
            overlay: vec!["10.241.8.0/22".into()],
            node_addrs: vec!["10.97.0.11".parse().unwrap(), "10.97.0.12".parse().unwrap()],
            bridge: vec!["172.18.0.0/16".into()],
            internet,
            blocked: vec!["169.254.0.0/16".into(), "10.0.0.0/8".into()],
        }
    }

    #[test]
    fn inbound_only_from_the_edges_outbound_never_to_the_swarm() {
        let s = guard_rules(&policy(true));
        assert!(s.starts_with(
            "*filter\n:INPUT DROP [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n"
        ));
        assert!(s.ends_with("COMMIT\n"));
        assert!(s.contains("-A INPUT -s 10.241.8.0/28 -j ACCEPT\n"));
        // The only INPUT accepts: loopback, replies, the edges.
        let accepts: Vec<_> = s.lines().filter(|l| l.starts_with("-A INPUT")).collect();
        assert_eq!(accepts.len(), 3, "{accepts:?}");
        // Replies pass before any refusal, the overlay is refused before the internet rules.
        let est = s.find("-A OUTPUT -m conntrack").unwrap();
        let overlay = s.find("-A OUTPUT -d 10.241.8.0/22 -j REJECT").unwrap();
        let node = s.find("-A OUTPUT -d 10.97.0.12/32 -j REJECT").unwrap();
        let bridge = s.find("-A OUTPUT -d 172.18.0.0/16 -j REJECT").unwrap();
        let blocked = s.find("-A OUTPUT -d 169.254.0.0/16 -j REJECT").unwrap();
        assert!(est < overlay && overlay < node && node < bridge && bridge < blocked);
        assert!(!s.contains("-A OUTPUT -j REJECT"));
        // Only the filter table: Docker's DNS rules (nat) stay.
        assert!(!s.contains("*nat"));
    }

    #[test]
    fn offline_refuses_every_new_outbound_connection() {
        let s = guard_rules(&policy(false));
        assert!(s.contains("-A OUTPUT -j REJECT --reject-with icmp-admin-prohibited\n"));
        assert!(!s.contains("169.254.0.0/16"));
        assert!(
            s.contains("-A OUTPUT -o lo -j ACCEPT\n"),
            "DNS via 127.0.0.11 stays"
        );
    }

    #[test]
    fn only_networks_go_into_the_file() {
        assert!(usable_cidr("10.241.8.0/22"));
        assert!(!usable_cidr("10.241.8.0/22 -j ACCEPT"));
        assert!(!usable_cidr("fd00::/64"));
    }
}
