//! Isolation across nodes, probed from inside a sandbox through execute: no other sandbox (on
//! any node; the app port and the agent's port), no node address (swarm control 2377, gossip
//! 7946, an engine's TCP ports 2375 and 2376, the TLS endpoint edge 2 uses), no edge on the
//! overlay and not the overlay's gateway. Only the edges reach a sandbox's ports (the preview
//! tests show that side).

use std::time::Duration;

use sandboxd_swarm_tests::{app_code, eventually, json, Lab, Users, Value, ECHO_APP};

/// JavaScript that opens a TCP connection to every `[host, port]` at once (1.5 s each) and prints
/// `{"host:port": "open" | "timeout" | <error code>}`.
fn probe_code(targets: &[(String, u16)]) -> String {
    let list = serde_json::to_string(
        &targets
            .iter()
            .map(|(h, p)| json!([h, p]))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    format!(
        r#"
const net = require('net');
const targets = {list};
function probe(h, p) {{
  return new Promise((done) => {{
    const s = net.connect({{host: h, port: p}});
    const t = setTimeout(() => {{ s.destroy(); done('timeout'); }}, 1500);
    s.on('connect', () => {{ clearTimeout(t); s.destroy(); done('open'); }});
    s.on('error', (e) => {{ clearTimeout(t); done(e.code || 'error'); }});
  }});
}}
Promise.all(targets.map(([h, p]) => probe(h, p).then((r) => [h + ':' + p, r])))
  .then((rs) => console.log(JSON.stringify(Object.fromEntries(rs))));
"#
    )
}

#[tokio::test]
async fn a_sandbox_reaches_no_other_sandbox_node_or_edge() {
    let lab = Lab::with_edges();
    let users = Users::new(&lab, "is", 3);
    for (k, u) in users.all().into_iter().enumerate() {
        lab.init(k % 2, u).await;
    }
    // Every other user's sandbox runs a server on 5173 (and the agent on 49983).
    for u in &users.all()[1..] {
        let out = lab
            .execute(0, u, json!({ "code": app_code(ECHO_APP) }))
            .await;
        assert_eq!(out["exitCode"], 0, "{out}");
    }
    let me = users.get(0);
    // The other users' overlay addresses, and any other sandbox of this lab's instance (other
    // tests' users) on every node: same node and other nodes.
    let mut targets: Vec<(String, u16)> = Vec::new();
    for n in 0..lab.nodes.len() {
        let ids = lab.docker_ok(
            n,
            &[
                "ps",
                "-q",
                "--filter",
                &format!("label=sandboxd.instance={}", lab.instance),
            ],
        );
        for id in ids.lines() {
            let user = lab.inspect(n, id, "{{index .Config.Labels \"sandboxd.user\"}}");
            if user == me {
                continue;
            }
            let ip = lab.inspect(
                n,
                id,
                &format!(
                    "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
                    lab.overlay
                ),
            );
            if !ip.is_empty() {
                targets.push((ip.clone(), 5173));
                targets.push((ip, 49983));
            }
        }
    }
    assert!(
        targets.len() >= 4,
        "the other two users' sandboxes are on the overlay: {targets:?}"
    );
    // The other users' apps answer the edges (so a closed port below is the guard, not a dead
    // app).
    for u in &users.all()[1..] {
        let client = lab.client(0, &[u]);
        let url = lab.preview_url(0, u, "/");
        eventually(
            Duration::from_secs(60),
            "the app answers its preview",
            || {
                let (client, url) = (client.clone(), url.clone());
                async move { (client.get(&url).send().await.ok()?.status() == 200).then_some(()) }
            },
        )
        .await;
    }
    for node in ["10.97.0.11", "10.97.0.12", "10.97.0.13"] {
        for port in [2375, 2376, 2377, 7946] {
            targets.push((node.to_owned(), port));
        }
    }
    targets.push(("10.97.0.1".to_owned(), 8080));
    targets.push(("10.241.8.1".to_owned(), 53));
    for edge in ["10.241.8.2", "10.241.8.3"] {
        targets.push((edge.to_owned(), 8080));
    }
    targets.sort();
    targets.dedup();

    let out = lab
        .execute(
            0,
            me,
            json!({ "code": probe_code(&targets), "timeoutMs": 20000 }),
        )
        .await;
    assert_eq!(out["exitCode"], 0, "{out}");
    let seen: Value = serde_json::from_str(out["output"].as_str().unwrap_or("").trim())
        .unwrap_or_else(|e| panic!("probe output: {e}: {out}"));
    eprintln!("probes from {me}: {seen}");
    let open: Vec<&String> = seen
        .as_object()
        .expect("an object")
        .iter()
        .filter(|(_, v)| *v == "open")
        .map(|(k, _)| k)
        .collect();
    assert!(
        open.is_empty(),
        "a sandbox reached {open:?} (all probes: {seen})"
    );
    assert_eq!(
        seen.as_object().unwrap().len(),
        targets.len(),
        "every target probed: {seen}"
    );
}
