//! Several replicas sharing PostgreSQL behave as one sandboxd (src/sandbox/replicas.rs):
//! single-flight per user, one cap, the idle policy once (on the leader, with failover), changes
//! visible within a second, events recorded once. PostgreSQL only: SANDBOXD_TEST_POSTGRES_URL
//! must be set (tests/common/replicas.rs fails loudly otherwise).

use std::time::{Duration, Instant};

use crate::common::replicas::{spawn_replicas, Replicas};

/// Polls `check` every 50 ms until it holds or `within` ends; returns how long it took.
async fn within<F, Fut>(within: Duration, mut check: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t = Instant::now();
    loop {
        if check().await {
            return Some(t.elapsed());
        }
        if t.elapsed() >= within {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn docker(args: &[&str]) {
    let out = std::process::Command::new("docker")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn init(r: &Replicas, base: &str, user: &str) -> serde_json::Value {
    let resp = r.post(base, user, "/sandbox/init").await;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(status, 200, "init {user} through {base}: {body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_inits_over_two_replicas_make_one_container() {
    let r = spawn_replicas(2, |_| {}).await;
    let mut calls = vec![];
    for i in 0..20 {
        let (base, client, token) = (r.bases[i % 2].clone(), r.client.clone(), r.token("7001"));
        calls.push(tokio::spawn(async move {
            let resp = client
                .post(format!("{base}/sandbox/init"))
                .bearer_auth(token)
                .json(&serde_json::json!({}))
                .send()
                .await
                .unwrap();
            let status = resp.status();
            let body: serde_json::Value = resp.json().await.unwrap();
            assert_eq!(status, 200, "{body}");
            body["containerId"].as_str().unwrap().to_owned()
        }));
    }
    let mut ids = vec![];
    for c in calls {
        ids.push(c.await.unwrap());
    }
    ids.dedup();
    assert_eq!(
        ids.len(),
        1,
        "every init answers the same container: {ids:?}"
    );
    assert_eq!(r.containers().len(), 1, "one container for the user");
    assert_eq!(r.count_events("7001", "created").await, 1);
    // Both replicas serve it: status and execution through either.
    for base in &r.bases {
        assert_eq!(r.state(base, "7001").await.as_deref(), Some("running"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cap_counts_the_sandboxes_of_every_replica() {
    let r = spawn_replicas(2, |t| {
        t.insert("max_containers".into(), 2.into());
    })
    .await;
    let (a, b) = (r.bases[0].clone(), r.bases[1].clone());
    init(&r, &a, "7101").await;
    init(&r, &b, "7102").await;
    // Full: each replica made one, neither may make a third.
    for base in [&a, &b] {
        let resp = r.post(base, "7103", "/sandbox/init").await;
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"]["code"], "capacity_exhausted");
    }
    assert_eq!(r.containers().len(), 2);
    // A paused sandbox made by replica A is evicted by replica B for a new user.
    r.mgr(0)
        .pause(&sandboxd::user::UserId::parse("7101").unwrap(), "test")
        .await
        .unwrap();
    init(&r, &b, "7103").await;
    assert_eq!(r.state(&a, "7101").await.as_deref(), Some("stopped"));
    let ev = r.events("7101").await;
    assert!(
        ev.iter()
            .any(|e| e.kind == "stopped" && e.reason.as_deref() == Some("evicted for capacity")),
        "{ev:?}"
    );
    let live = r
        .containers()
        .iter()
        .filter(|id| {
            let s = crate::common::docker_inspect(id);
            s["State"]["Running"] == true
        })
        .count();
    assert_eq!(live, 2, "never more live sandboxes than max_containers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_change_on_one_replica_is_seen_by_the_other_within_a_second_and_recorded_once() {
    let r = spawn_replicas(2, |_| {}).await;
    let (a, b) = (r.bases[0].clone(), r.bases[1].clone());
    let user = sandboxd::user::UserId::parse("7201").unwrap();
    init(&r, &a, "7201").await;
    // B learns the sandbox A made, and takes it on its fast path.
    assert_eq!(r.state(&b, "7201").await.as_deref(), Some("running"));
    assert!(r.mgr(1).running_ip(&user).is_some());

    r.mgr(0).pause(&user, "test").await.unwrap();
    let took = within(Duration::from_secs(1), || async {
        r.mgr(1).running_ip(&user).is_none()
    })
    .await;
    assert!(
        took.is_some(),
        "B still sends traffic to a paused sandbox after 1 s"
    );
    eprintln!("B dropped its fast path {took:?} after A's pause");
    assert_eq!(r.state(&b, "7201").await.as_deref(), Some("paused"));

    // An external change, seen by both replicas' event followers, is recorded once.
    let id = r.containers().pop().unwrap();
    docker(&["unpause", &id]);
    let mut seen = None;
    for base in [&a, &b] {
        seen = within(Duration::from_secs(5), || async {
            r.state(base, "7201").await.as_deref() == Some("running")
        })
        .await;
    }
    assert!(seen.is_some(), "the unpause is not seen");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(r.count_events("7201", "paused").await, 1);
    let resumed: Vec<_> = r
        .events("7201")
        .await
        .into_iter()
        .filter(|e| e.kind == "resumed")
        .collect();
    assert_eq!(
        resumed.len(),
        1,
        "one record of the external unpause: {resumed:?}"
    );
    assert!(
        resumed[0]
            .reason
            .as_deref()
            .is_some_and(|r| r.starts_with("external:")),
        "{resumed:?}"
    );
    // Removed through B: A sees it gone.
    assert_eq!(r.post(&b, "7201", "/sandbox/exit").await.status(), 200);
    assert_eq!(r.state(&a, "7201").await, None);
    assert!(r.containers().is_empty());
    assert_eq!(r.count_events("7201", "removed").await, 1);
}

fn idle_fast(t: &mut toml::Table) {
    t.insert("idle_pause_after".into(), "2s".into());
    t.insert("idle_stop_after".into(), "1h".into());
    t.insert("idle_check_every".into(), "200ms".into());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leader_pauses_once_and_spares_a_user_active_on_the_other_replica() {
    let r = spawn_replicas(2, idle_fast).await;
    let leader = r
        .leader(Duration::from_secs(5))
        .await
        .expect("a leader within 5 s");
    let other = r.bases[1 - leader].clone();
    // Both made through the replica that does not lead; one stays busy there.
    init(&r, &other, "7301").await;
    init(&r, &other, "7302").await;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        assert_eq!(r.state(&other, "7302").await.as_deref(), Some("running"));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(r.stored_state("7301").await.as_deref(), Some("paused"));
    assert_eq!(r.count_events("7301", "paused").await, 1, "paused once");
    assert_eq!(
        r.count_events("7302", "paused").await,
        0,
        "an active user is never paused"
    );
    let ev = r.events("7301").await;
    let paused = ev.iter().find(|e| e.kind == "paused").unwrap();
    assert!(
        paused
            .reason
            .as_deref()
            .unwrap_or("")
            .starts_with("idle for"),
        "{paused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_replica_takes_over_when_the_leader_is_dropped() {
    let mut r = spawn_replicas(2, idle_fast).await;
    let leader = r
        .leader(Duration::from_secs(5))
        .await
        .expect("a leader within 5 s");
    let survivor = 1 - leader;
    init(&r, &r.bases[survivor].clone(), "7401").await;
    r.kill(leader);
    let took = within(Duration::from_secs(3), || async {
        r.mgr(survivor).replicas().is_leader()
    })
    .await;
    assert!(took.is_some(), "no new leader within 3 s");
    eprintln!("leadership passed {took:?} after the leader was dropped");
    let paused = within(Duration::from_secs(6), || async {
        r.stored_state("7401").await.as_deref() == Some("paused")
    })
    .await;
    assert!(
        paused.is_some(),
        "the new leader does not apply the idle policy"
    );
    assert_eq!(r.count_events("7401", "paused").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sigkilled_leader_is_replaced_and_the_other_replica_keeps_serving() {
    let mut r = spawn_replicas(0, idle_fast).await;
    let mut p = r.spawn_process();
    let led = p.wait_for(Duration::from_secs(10), |v| {
        (v["message"] == "leadership changed" && v["leader"] == true).then_some(())
    });
    assert!(
        led.is_some(),
        "the process replica does not lead: {:#?}",
        p.seen
    );
    let b = r.add().await;
    assert!(!r.mgr(b).replicas().is_leader());
    let base_b = r.bases[b].clone();
    // A sandbox made through the process replica, served by both.
    init(&r, &p.base, "7501").await;
    assert_eq!(r.state(&base_b, "7501").await.as_deref(), Some("running"));
    let killed = Instant::now();
    p.sigkill();
    let took = within(Duration::from_secs(5), || async {
        r.mgr(b).replicas().is_leader()
    })
    .await
    .expect("no new leader within 5 s of the SIGKILL");
    eprintln!("leadership passed {took:?} after the SIGKILL");
    assert!(killed.elapsed() < Duration::from_secs(5));
    // B keeps serving the user (its lock was the dead replica's connection's, now gone).
    let exec = r
        .client
        .post(format!("{base_b}/sandbox/execute"))
        .bearer_auth(r.token("7501"))
        .json(&serde_json::json!({"language": "python", "code": "print(6*7)"}))
        .send()
        .await
        .unwrap();
    let status = exec.status();
    let body: serde_json::Value = exec.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["output"].as_str().unwrap().trim(), "42");
    // And applies the idle policy the dead leader no longer does.
    let paused = within(Duration::from_secs(8), || async {
        r.stored_state("7501").await.as_deref() == Some("paused")
    })
    .await;
    assert!(
        paused.is_some(),
        "the new leader does not pause the idle sandbox"
    );
    assert_eq!(r.count_events("7501", "paused").await, 1);
    assert_eq!(r.containers().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_on_both_replicas_never_pass_the_cap() {
    let r = spawn_replicas(2, |t| {
        t.insert("max_containers".into(), 3.into());
    })
    .await;
    let mut calls = vec![];
    for i in 0..8 {
        let (base, client, token) = (
            r.bases[i % 2].clone(),
            r.client.clone(),
            r.token(&format!("76{i:02}")),
        );
        calls.push(tokio::spawn(async move {
            client
                .post(format!("{base}/sandbox/init"))
                .bearer_auth(token)
                .json(&serde_json::json!({}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    let mut statuses = vec![];
    for c in calls {
        statuses.push(c.await.unwrap());
    }
    statuses.sort();
    assert_eq!(statuses, [200, 200, 200, 503, 503, 503, 503, 503]);
    assert_eq!(r.containers().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_terminal_open_on_one_replica_keeps_the_leader_from_pausing() {
    use crate::common::ws::{ws_open, Term};
    let r = spawn_replicas(2, idle_fast).await;
    let leader = r
        .leader(Duration::from_secs(5))
        .await
        .expect("a leader within 5 s");
    let other = 1 - leader;
    let base = r.bases[other].clone();
    init(&r, &base, "7701").await;
    let url = format!("{}/sandbox/terminal", base.replace("http://", "ws://"));
    let auth = format!("Bearer {}", r.token("7701"));
    let (ws, resp) = ws_open(&url, &[("authorization", &auth)])
        .await
        .expect("terminal opens");
    assert_eq!(resp.status(), 101);
    let mut term = Term::from_ws(ws);
    assert_eq!(term.output("echo ready").await, "ready");
    // Silent for longer than idle_pause_after (2 s): the open terminal is activity.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(r.stored_state("7701").await.as_deref(), Some("running"));
    assert_eq!(r.count_events("7701", "paused").await, 0);
    assert_eq!(term.output("echo still").await, "still");
    drop(term);
    // Closed: the leader pauses it once it has been idle long enough.
    let paused = within(Duration::from_secs(8), || async {
        r.stored_state("7701").await.as_deref() == Some("paused")
    })
    .await;
    assert!(paused.is_some(), "not paused after the terminal closed");
    assert_eq!(r.count_events("7701", "paused").await, 1);
}

/// The instance's packet-filter rules (src/sandbox/firewall.rs), as iptables lists them.
fn rules_of(instance: &str) -> String {
    let out = std::process::Command::new("iptables")
        .arg("-S")
        .output()
        .expect("iptables");
    let (cin, cfw) = sandboxd::sandbox::firewall::chain_names(instance);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&cin) || l.contains(&cfw))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_packet_filter_stays_until_the_last_replica_leaves() {
    let mut r = spawn_replicas(2, |_| {}).await;
    let rules = rules_of(&r.instance);
    assert!(!rules.is_empty());
    // No sandbox anywhere, but another replica runs: its future sandboxes need the rules.
    r.apps[0].take().unwrap().shutdown().await;
    assert_eq!(
        rules_of(&r.instance),
        rules,
        "rules removed under a running replica"
    );
    init(&r, &r.bases[1].clone(), "7801").await;
    assert_eq!(
        r.post(&r.bases[1].clone(), "7801", "/sandbox/exit")
            .await
            .status(),
        200
    );
    // The last one leaves with no sandbox live: the rules go.
    r.apps[1].take().unwrap().shutdown().await;
    assert_eq!(
        rules_of(&r.instance),
        "",
        "rules left after the last replica"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_container_left_by_a_replica_that_died_mid_create_is_adopted_not_doubled() {
    let r = spawn_replicas(2, |_| {}).await;
    let user = sandboxd::user::UserId::parse("7901").unwrap();
    // What a replica leaves when it dies between reserving the slot and saving the container:
    // the reservation, and a container the store does not name.
    let store = r.mgr(0).store().clone();
    assert!(store.reserve_under_cap(1, &user, 100, 0).await.unwrap());
    let ws = r.mgr(0).workspace_path(&user);
    sandboxd::sandbox::ensure_workspace_dir(&ws).unwrap();
    let cfg = sandboxd::config::Config::from_table(r.table.clone()).unwrap();
    let engine = sandboxd::sandbox::testing::Engine::connect().await.unwrap();
    let (left, _) = engine
        .create(&cfg, &user, &ws, &"ab".repeat(32), None)
        .await
        .unwrap();
    // The next init, through the other replica, takes that container.
    let body = init(&r, &r.bases[1].clone(), "7901").await;
    assert_eq!(body["containerId"], left.as_str());
    assert_eq!(r.containers(), std::slice::from_ref(&left));
    let ev = r.events("7901").await;
    assert!(
        ev.iter().any(|e| e.kind == "adopted"
            && e.reason.as_deref() == Some("left by a replica that stopped")),
        "{ev:?}"
    );
    assert_eq!(store.reserved_at(&user).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_replicas_recover_when_the_database_drops_every_connection() {
    use sqlx::Connection;
    let mut r = spawn_replicas(2, |_| {}).await;
    let (a, b) = (r.bases[0].clone(), r.bases[1].clone());
    // Made (and later removed) through B, so A holds no sandbox when it leaves.
    init(&r, &b, "7951").await;
    r.leader(Duration::from_secs(5)).await.expect("a leader");
    let rules = rules_of(&r.instance);
    let url = r.table["database_url"].as_str().unwrap().to_owned();
    let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .execute(&mut admin)
    .await
    .unwrap();
    // Leadership, the alive locks and the listeners come back; both replicas serve.
    let leader = r.leader(Duration::from_secs(10)).await;
    assert!(
        leader.is_some(),
        "no leader after the database dropped the connections"
    );
    let served = within(Duration::from_secs(10), || async {
        r.get(&b, "7951", "/sandbox/status").await.status() == 200
            && r.get(&a, "7951", "/sandbox/status").await.status() == 200
    })
    .await;
    assert!(served.is_some(), "the replicas do not serve again");
    // Give the replicas a round to hold their alive lock again (and reinstall the packet
    // filter), then one leaves: the filter stays for the other.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(r.post(&b, "7951", "/sandbox/exit").await.status(), 200);
    r.apps[0].take().unwrap().shutdown().await;
    assert_eq!(
        rules_of(&r.instance),
        rules,
        "rules removed under a running replica"
    );
}
