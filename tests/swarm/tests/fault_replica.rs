//! Killing one edge replica: the other keeps serving the same user (API and a new terminal);
//! the killed edge's terminal closes. The edge is started again when the test ends (also after a
//! failure), by `scripts/swarm-lab.sh edges 2`. A test binary of its own: test binaries run one
//! after another, so no other lab test sees the missing edge.

use std::time::Duration;

use sandboxd_swarm_tests::{KilledEdge, Lab, Users};

#[tokio::test]
async fn killing_one_edge_leaves_the_other_serving_and_terminals_reconnect() {
    let lab = Lab::with_edges();
    let users = Users::new(&lab, "rk", 1);
    let u = users.get(0);
    lab.init(0, u).await;

    let mut term = lab.terminal(1, u).await;
    term.send("echo BEFORE-$((1+1))\r").await;
    term.until("BEFORE-2", Duration::from_secs(30)).await;

    {
        let _edge2 = KilledEdge::kill(2);
        // The killed edge's terminal ends (the kernel closes its sockets).
        term.closed(Duration::from_secs(10)).await;
        // The other edge serves the same sandbox: execute, status, and a new terminal.
        let out = lab.run_js(0, u, "console.log('still ' + (20 + 22))").await;
        assert_eq!(out.trim(), "still 42");
        assert_eq!(lab.status(0, u).await["state"], "running");
        let mut again = lab.terminal(0, u).await;
        again.send("echo AFTER-$((2+2))\r").await;
        again.until("AFTER-4", Duration::from_secs(30)).await;
        again.close().await;
        lab.only_container(u);
    } // edge 2 starts again here

    // Back: edge 2 serves the same user again.
    let out = lab.run_js(1, u, "console.log('edge 2 is back')").await;
    assert_eq!(out.trim(), "edge 2 is back");
    lab.only_container(u);
}
