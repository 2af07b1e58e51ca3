//! The store passes the same tests on SQLite and PostgreSQL. PostgreSQL is required: without
//! SANDBOXD_TEST_POSTGRES_URL (set by scripts/test) this fails, it does not skip.

use crate::common;

use sandboxd::store::Store;
use sandboxd::user::UserId;

async fn exercise(url: &str) {
    let store = Store::connect(url).await.unwrap();
    // Migrations are idempotent.
    let store2 = Store::connect(url).await.unwrap();
    store2.ping().await.unwrap();
    let u = UserId::parse("42").unwrap();
    assert!(store.session(&u).await.unwrap().is_none());
    store
        .save_session(&u, Some(("cid1", "name1")), "running", Some(1000))
        .await
        .unwrap();
    let s = store.session(&u).await.unwrap().unwrap();
    assert_eq!(s.container_id.as_deref(), Some("cid1"));
    assert_eq!(s.state, "running");
    assert_eq!(s.started_at, Some(1000));
    let created = s.created_at;
    // Update keeps created_at and started_at (COALESCE), replaces the container.
    store.save_session(&u, None, "removed", None).await.unwrap();
    let s = store.session(&u).await.unwrap().unwrap();
    assert_eq!(s.container_id, None);
    assert_eq!(s.state, "removed");
    assert_eq!(s.created_at, created);
    assert_eq!(s.started_at, Some(1000));
    // Activity only moves forward.
    store.touch(&u, s.last_activity + 5000).await.unwrap();
    store.touch(&u, 1).await.unwrap();
    assert_eq!(
        store.session(&u).await.unwrap().unwrap().last_activity,
        s.last_activity + 5000
    );
    // Events are append-only and come back newest first.
    for (k, r) in [
        ("created", None),
        ("started", None),
        ("stopped", Some("idle")),
    ] {
        store.add_event(&u, Some("cid1"), k, r).await.unwrap();
    }
    let ev = store.events(&u, 10).await.unwrap();
    assert_eq!(
        ev.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
        ["stopped", "started", "created"]
    );
    assert_eq!(ev[0].reason.as_deref(), Some("idle"));
    assert!(ev[0].at > 1_600_000_000_000, "UTC milliseconds");
    assert_eq!(store.sessions().await.unwrap().len(), 1);
    assert_eq!(store.count_sessions().await.unwrap(), 1);

    // Swarm mode's node column (migration 0002): none on one host, kept across saves.
    assert_eq!(store.session_node(&u).await.unwrap(), None);
    store.set_session_node(&u, "node-a").await.unwrap();
    store
        .save_session(&u, Some(("c2", "n2")), "running", None)
        .await
        .unwrap();
    assert_eq!(
        store.session_node(&u).await.unwrap().as_deref(),
        Some("node-a")
    );
    let fresh = UserId::parse("4242").unwrap();
    store.set_session_node(&fresh, "node-b").await.unwrap();
    assert_eq!(
        store.session_node(&fresh).await.unwrap().as_deref(),
        Some("node-b")
    );
    assert_eq!(
        store.session(&fresh).await.unwrap().unwrap().state,
        "removed"
    );
}

#[tokio::test]
async fn sqlite_store() {
    let db = common::sqlite_db();
    exercise(&db.url).await;
}

#[tokio::test]
async fn postgres_store() {
    let url = std::env::var("SANDBOXD_TEST_POSTGRES_URL")
        .expect("SANDBOXD_TEST_POSTGRES_URL must point at PostgreSQL (scripts/test sets it)");
    let db = common::postgres_db(&url).await;
    exercise(&db.url).await;
}
