//! The lab itself (scripts/swarm-lab.sh up): three Ready nodes with their own engines and
//! hostnames, the guard route for overlay addresses, nodes without a default route, the overlay
//! and its address plan, the sandbox image on every node, the edge anchors at their static
//! addresses, and both edges answering /healthz from the host.

use std::process::Command;

use sandboxd_swarm_tests::{Lab, Value};

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("iproute2 is required");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn three_nodes_ready_with_their_own_engines() {
    let lab = Lab::load();
    let ls = lab.docker_ok(
        0,
        &[
            "node",
            "ls",
            "--format",
            "{{.Hostname}} {{.Status}} {{.Availability}} {{.ManagerStatus}}",
        ],
    );
    let mut rows: Vec<&str> = ls.lines().collect();
    rows.sort_unstable();
    assert_eq!(
        rows,
        [
            "n1 Ready Active Leader",
            "n2 Ready Active ",
            "n3 Ready Active "
        ],
        "node ls on n1:\n{ls}"
    );
    for (n, want) in ["n1", "n2", "n3"].iter().enumerate() {
        let info = lab.docker_ok(n, &["info", "-f", "{{.Name}} {{.Swarm.LocalNodeState}}"]);
        assert_eq!(info.trim(), format!("{want} active"), "{}", lab.nodes[n]);
        // The engine-wide --no-new-privileges (swarm services cannot set it in 20.10): `docker
        // info` does not show it, the engine's command line does.
        let pid = std::fs::read_to_string(format!("/run/sbxlab/{want}/dockerd.pid"))
            .unwrap_or_else(|e| panic!("{want}'s dockerd pid file: {e}"));
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", pid.trim())).unwrap();
        assert!(
            cmdline
                .split(|b| *b == 0)
                .any(|arg| arg == b"--no-new-privileges"),
            "{want}'s dockerd runs without --no-new-privileges: {}",
            String::from_utf8_lossy(&cmdline)
        );
        // Every node labelled for sandboxd.
        let labels = lab.docker_ok(0, &["node", "inspect", "-f", "{{json .Spec.Labels}}", want]);
        let labels: Value = serde_json::from_str(&labels).unwrap();
        assert_eq!(labels["sandboxd"], "true", "{want}: {labels}");
        assert_eq!(labels["sbxlab.node"], *want, "{want}: {labels}");
    }
}

#[test]
fn overlay_addresses_never_leave_the_machine() {
    let lab = Lab::load();
    // The swarm's whole address pool is a blackhole on the host.
    let route = ip(&["route", "show", "exact", "10.241.0.0/16"]);
    assert!(
        route.trim_start().starts_with("blackhole 10.241.0.0/16"),
        "the host route 'blackhole 10.241.0.0/16' is missing: {route:?}"
    );
    // The overlay's subnet is inside that pool.
    let subnet = lab.docker_ok(
        0,
        &[
            "network",
            "inspect",
            "-f",
            "{{range .IPAM.Config}}{{.Subnet}} {{.IPRange}}{{end}} {{.Driver}} {{.Attachable}}",
            &lab.overlay,
        ],
    );
    assert_eq!(
        subnet.trim(),
        "10.241.8.0/22 10.241.10.0/23 overlay true",
        "the overlay {}",
        lab.overlay
    );
    // Nodes have no default route: nothing they send can leave the lab's 10.97.0.0/24.
    for n in 1..=3 {
        let ns = format!("sbxlab-n{n}");
        let default = ip(&["-n", &ns, "route", "show", "default"]);
        assert!(
            default.trim().is_empty(),
            "{ns} has a default route: {default}"
        );
    }
}

#[test]
fn image_on_every_node_and_edge_anchors_at_static_addresses() {
    let lab = Lab::load();
    for n in 0..3 {
        lab.docker_ok(n, &["image", "inspect", "-f", "{{.Id}}", &lab.image]);
    }
    for (n, addr) in [(0, "10.241.8.2"), (1, "10.241.8.3")] {
        let name = format!("sbxlab-edge-{}", n + 1);
        let got = lab.inspect(
            n,
            &name,
            &format!(
                "{{{{.State.Status}}}} {{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}} {{{{.Config.User}}}}",
                lab.overlay
            ),
        );
        assert_eq!(got, format!("running {addr} 65534:65534"), "{name}");
        assert_eq!(lab.edge_cidr, "10.241.8.0/28");
    }
}

#[tokio::test]
async fn both_edges_answer_healthz_from_the_host() {
    let lab = Lab::with_edges();
    for e in 0..2 {
        let r = lab
            .client(e, &[])
            .get(format!("{}/healthz", lab.api(e)))
            .send()
            .await
            .unwrap_or_else(|err| panic!("edge {} ({}): {err}", e + 1, lab.edges[e].url));
        let status = r.status();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        assert_eq!(status, 200, "edge {}: {body}", e + 1);
        assert_eq!(body["status"], "ok", "edge {}: {body}", e + 1);
    }
}
