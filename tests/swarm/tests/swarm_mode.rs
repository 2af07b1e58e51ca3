//! sandboxd in swarm mode, through the lab's two edges (EDGE_1 runs in an anchor on n1, EDGE_2
//! on n2): placement across nodes (the status JSON's `"node"`), single-flight across replicas,
//! cross-node preview over HTTP and WebSocket, terminal and execute through either edge, and
//! wake from paused and stopped (a container paused or stopped through its node's engine,
//! behind sandboxd's back). Needs the edges: `Lab::with_edges` fails loudly without them.

use std::collections::BTreeSet;
use std::time::Duration;

use futures_util::SinkExt;
use sandboxd_swarm_tests::{app_code, eventually, json, next_text, Lab, Users, ECHO_APP};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn placement_spreads_users_over_nodes_and_status_names_the_node() {
    let lab = Lab::with_edges();
    let users = Users::new(&lab, "pl", 4);
    let mut nodes = Vec::new();
    for (k, u) in users.all().into_iter().enumerate() {
        // Alternate the edges: placement is shared state, not an edge's own.
        lab.init(k % 2, u).await;
        let (node, i) = lab.node_of(k % 2, u).await;
        let (holder, id) = lab.only_container(u);
        assert_eq!(
            holder,
            i,
            "{u}: status says {node}, the container {id} is on n{}",
            holder + 1
        );
        assert_eq!(lab.inspect(holder, &id, "{{.State.Status}}"), "running");
        // On the overlay, at an address outside the edges' range.
        let ip = lab.inspect(
            holder,
            &id,
            &format!(
                "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
                lab.overlay
            ),
        );
        assert!(
            ip.starts_with("10.241.10.") || ip.starts_with("10.241.11."),
            "{u}: overlay address {ip} is not in the sandboxes' ip-range 10.241.10.0/23"
        );
        nodes.push(node);
    }
    let distinct: BTreeSet<_> = nodes.iter().collect();
    assert!(
        distinct.len() >= 2,
        "4 new users all landed on {distinct:?}: placement does not spread"
    );
    // The other edge reports the same node for every user (state shared through the store).
    for (k, u) in users.all().into_iter().enumerate() {
        assert_eq!(
            lab.node_of((k + 1) % 2, u).await.0,
            nodes[k],
            "{u}: the edges disagree on the node"
        );
    }
}

#[tokio::test]
async fn concurrent_inits_through_both_edges_make_one_container() {
    let lab = Lab::with_edges();
    let users = Users::new(&lab, "sf", 1);
    let u = users.get(0).to_owned();
    let mut tasks = Vec::new();
    for k in 0..20 {
        let (lab, u) = (lab.clone(), u.clone());
        tasks.push(tokio::spawn(async move {
            let (s, body) = lab.post(k % 2, &u, "/sandbox/init", json!({})).await;
            (s, body["containerId"].as_str().map(str::to_owned))
        }));
    }
    let mut ids = BTreeSet::new();
    for t in tasks {
        let (s, id) = t.await.unwrap();
        assert_eq!(s, 200, "one of 20 concurrent inits");
        ids.insert(id.expect("init returns containerId"));
    }
    assert_eq!(ids.len(), 1, "20 inits over two edges answered {ids:?}");
    lab.only_container(&u);
}

#[tokio::test]
async fn execute_and_terminal_through_either_edge() {
    let lab = Lab::with_edges();
    let users = Users::new(&lab, "ex", 1);
    let u = users.get(0);
    lab.init(0, u).await;
    let (node, _) = lab.node_of(0, u).await;

    // Written through edge 1, read through edge 2: one sandbox, one workspace.
    let out = lab
        .run_js(
            0,
            u,
            "require('fs').writeFileSync('/workspace/mark.txt', 'written via edge 1'); console.log(require('os').hostname())",
        )
        .await;
    assert!(!out.trim().is_empty());
    let out = lab
        .run_js(
            1,
            u,
            "console.log(require('fs').readFileSync('/workspace/mark.txt', 'utf8'))",
        )
        .await;
    assert_eq!(out.trim(), "written via edge 1");
    let py = lab
        .execute(1, u, json!({"language": "python", "code": "print(6*7)"}))
        .await;
    assert_eq!(py["output"].as_str().map(str::trim), Some("42"), "{py}");

    // A terminal through each edge sees the same file.
    for e in 0..2 {
        let mut term = lab.terminal(e, u).await;
        term.send("cat /workspace/mark.txt; echo END-$((40+2))\r")
            .await;
        let seen = term.until("END-42", Duration::from_secs(30)).await;
        assert!(
            seen.contains("written via edge 1"),
            "terminal through edge {} (sandbox on {node}): {seen:?}",
            e + 1
        );
        term.close().await;
    }
    lab.only_container(u);
}

#[tokio::test]
async fn preview_http_and_websocket_across_nodes() {
    let lab = Lab::with_edges();
    let users = Users::new(&lab, "pv", 1);
    let u = users.get(0);
    lab.init(0, u).await;
    let (node, holder) = lab.node_of(0, u).await;
    let out = lab
        .execute(0, u, json!({ "code": app_code(ECHO_APP) }))
        .await;
    assert_eq!(out["exitCode"], 0, "{out}");

    // Edge 1 is on n1 and edge 2 on n2: whichever node holds the sandbox, at least one edge
    // reaches it across nodes over the overlay. Both must serve it.
    for e in 0..2 {
        let client = lab.client(e, &[u]);
        let url = lab.preview_url(e, u, "/hi");
        let body = eventually(Duration::from_secs(60), "the preview app answers", || {
            let (client, url) = (client.clone(), url.clone());
            async move {
                let r = client.get(&url).send().await.ok()?;
                if r.status() != 200 {
                    return None;
                }
                let t = r.text().await.ok()?;
                t.starts_with("hello from").then_some(t)
            }
        })
        .await;
        assert!(
            body.ends_with(" /hi"),
            "through edge {} (sandbox on {node}): {body:?}",
            e + 1
        );

        let ws_url = format!(
            "ws://{}:{}/hmr",
            lab.preview_host(u),
            lab.edges[e].addr.port()
        );
        let mut ws = lab.ws(e, &ws_url, &[]).await;
        let hello = next_text(&mut ws, Duration::from_secs(30)).await;
        assert!(hello.starts_with("connected "), "{hello}");
        ws.send(Message::Text(format!("ping through edge {}", e + 1)))
            .await
            .unwrap();
        let echo = next_text(&mut ws, Duration::from_secs(30)).await;
        assert_eq!(echo, format!("echo ping through edge {}", e + 1));
        let _ = ws.send(Message::Close(None)).await;
    }
    assert_eq!(lab.only_container(u).0, holder);
}

#[tokio::test]
async fn wake_from_paused_and_stopped_behind_sandboxds_back() {
    let lab = Lab::with_edges();
    let users = Users::new(&lab, "wk", 1);
    let u = users.get(0);
    lab.init(0, u).await;
    lab.run_js(
        0,
        u,
        "require('fs').writeFileSync('/workspace/keep.txt', 'kept')",
    )
    .await;
    let (n, id) = lab.only_container(u);

    // Paused through the node's engine: a request through the other edge wakes it.
    lab.docker_ok(n, &["pause", &id]);
    assert_eq!(lab.inspect(n, &id, "{{.State.Status}}"), "paused");
    let out = lab
        .run_js(
            1,
            u,
            "console.log(require('fs').readFileSync('/workspace/keep.txt', 'utf8'))",
        )
        .await;
    assert_eq!(out.trim(), "kept");
    assert_eq!(lab.inspect(n, &id, "{{.State.Status}}"), "running");

    // Stopped through the node's engine: the next request wakes it on the same node, with the
    // workspace (a volume on that node) intact.
    lab.docker_ok(n, &["stop", "-t", "1", &id]);
    let out = lab
        .run_js(
            0,
            u,
            "console.log(require('fs').readFileSync('/workspace/keep.txt', 'utf8'))",
        )
        .await;
    assert_eq!(out.trim(), "kept");
    let (n2, id2) = lab.only_container(u);
    assert_eq!(n2, n, "the sandbox moved from n{} to n{}", n + 1, n2 + 1);
    assert_eq!(lab.inspect(n2, &id2, "{{.State.Status}}"), "running");
    let st = lab.status(1, u).await;
    assert_eq!(st["state"], "running", "{st}");
}
