//! Cutting a node off: the users whose workspace lives there get 503 `node_unavailable` with
//! `Retry-After` (through either edge) once sandboxd learns it, no second sandbox is made on
//! another node meanwhile, and after the heal the same sandbox serves again. A test binary of its
//! own: no other lab test runs while a node is cut off.

use std::time::{Duration, Instant};

use sandboxd_swarm_tests::{eventually, json, CutNode, EdgeLog, Lab, PausedNodes, Users, Value};

#[tokio::test]
async fn a_cut_off_node_gives_its_users_503_and_heals_without_a_duplicate() {
    let lab = Lab::with_edges();
    let users = Users::new(&lab, "nc", 1);
    let u = users.get(0);
    {
        // n1 and n2 take no new sandboxes for a moment: the user lands on n3.
        let log = EdgeLog::mark(1);
        let _paused = PausedNodes::pause(&lab, &["n1", "n2"]);
        // sandboxd reads the node inventory every second and logs what changed: wait until
        // edge 1 has seen both pauses.
        eventually(
            Duration::from_secs(15),
            "edge 1 sees n1, n2 paused",
            || async {
                let new = log.since();
                ["n1", "n2"]
                    .iter()
                    .all(|n| {
                        new.lines().any(|l| {
                            l.contains("swarm node")
                                && l.contains(&format!("node={n} "))
                                && l.contains("availability=pause")
                        })
                    })
                    .then_some(())
            },
        )
        .await;
        lab.init(0, u).await;
    }
    let (node, n3) = lab.node_of(0, u).await;
    assert_eq!(node, "n3", "placement ignored the paused nodes n1, n2");
    lab.run_js(
        0,
        u,
        "require('fs').writeFileSync('/workspace/before-cut.txt', 'kept')",
    )
    .await;

    {
        let _cut = CutNode::cut(&lab, 3);
        let t0 = Instant::now();
        // The swarm marks a silent node down after ~15 s; sandboxd then answers within 2 s.
        let (status, retry, code) =
            eventually(Duration::from_secs(60), "503 node_unavailable", || async {
                let r = lab
                    .raw(
                        0,
                        u,
                        reqwest::Method::POST,
                        "/sandbox/execute",
                        Some(json!({"code": "1"})),
                    )
                    .await
                    .ok()?;
                let status = r.status().as_u16();
                let retry = r
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let body: Value = r.json().await.unwrap_or_default();
                let code = body["error"]["code"].as_str().unwrap_or("").to_owned();
                (code == "node_unavailable").then_some((status, retry, code))
            })
            .await;
        eprintln!("node_unavailable {:?} after the cut", t0.elapsed());
        assert_eq!(status, 503, "{code}");
        assert!(retry.is_some(), "503 node_unavailable without Retry-After");
        // The other edge says the same.
        let (s, body) = lab.get(1, u, "/sandbox/status").await;
        assert!(
            s == 503 && body["error"]["code"] == "node_unavailable" || body["node"] == "n3",
            "status through edge 2 while n3 is cut off: {s} {body}"
        );
        // An init does not move the user: no sandbox on n1 or n2.
        let (s, body) = lab.post(1, u, "/sandbox/init", json!({})).await;
        assert_eq!(s, 503, "init while the workspace's node is cut off: {body}");
        assert!(lab.containers_on(0, u).is_empty() && lab.containers_on(1, u).is_empty());
    } // the link comes back here

    eventually(Duration::from_secs(90), "n3 Ready again", || async {
        let ls = lab.docker_ok(0, &["node", "ls", "--format", "{{.Hostname}} {{.Status}}"]);
        ls.lines().any(|l| l == "n3 Ready").then_some(())
    })
    .await;
    let out = eventually(Duration::from_secs(90), "the user served again", || async {
        let out = lab
            .post(1, u, "/sandbox/execute", json!({"code": "console.log(require('fs').readFileSync('/workspace/before-cut.txt', 'utf8'))"}))
            .await;
        (out.0 == 200).then_some(out.1)
    })
    .await;
    assert_eq!(out["output"].as_str().map(str::trim), Some("kept"), "{out}");
    assert_eq!(lab.only_container(u).0, n3);
}
