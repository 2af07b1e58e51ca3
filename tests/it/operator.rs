//! The operator commands (`sandboxd ps`, `events`, `stop`) as a shell runs them: the built
//! binary against the store and engine of a running test server, and against an unreachable
//! engine or store.

use std::path::Path;
use std::process::{Command, Output};

use crate::common::*;
use serde_json::json;

/// Runs the built binary with `args` and the configuration file, without any SANDBOXD_*
/// variable of the test's own environment.
fn sandboxd(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sandboxd"));
    for (k, _) in std::env::vars() {
        if k.starts_with("SANDBOXD_") {
            c.env_remove(k);
        }
    }
    c.arg("--config").arg(config).args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("running the sandboxd binary")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The one error line the binary prints (`sandboxd: ...`), asserting there is exactly one.
fn error_line(o: &Output) -> String {
    assert!(!o.status.success(), "expected a failure: {o:?}");
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let stderr = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("sandboxd: "))
        .collect();
    assert_eq!(lines.len(), 1, "one error line expected in:\n{stderr}");
    lines[0].to_owned()
}

fn write_config(dir: &Path, table: &toml::Table) -> std::path::PathBuf {
    let path = dir.join("sandboxd.toml");
    std::fs::write(&path, toml::to_string(table).unwrap()).unwrap();
    path
}

#[tokio::test]
async fn ps_events_and_stop_beside_a_running_server() {
    let mut table = None;
    let app = spawn_app_with(|t| table = Some(t.clone())).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &table.unwrap());

    let user = "opsa";
    app.init(user).await;
    let ids = app.containers();
    assert_eq!(ids.len(), 1);
    let short = &ids[0][..12];

    // ps: the header and the user's line with the engine's state and memory in use.
    let o = sandboxd(&config, &["ps"], &[]);
    assert!(o.status.success(), "{o:?}");
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("USER")
            && lines[0].contains("STATE")
            && lines[0].contains("CONTAINER")
            && lines[0].contains("CREATED")
            && lines[0].contains("LAST ACTIVITY")
            && lines[0].contains("MEMORY"),
        "{out}"
    );
    let row = lines
        .iter()
        .find(|l| l.starts_with("opsa "))
        .unwrap_or_else(|| panic!("no row for opsa in\n{out}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cols[1], "running", "{out}");
    assert_eq!(cols[2], short, "{out}");
    let mem = cols.last().unwrap();
    assert!(
        mem.ends_with("KiB") || mem.ends_with("MiB"),
        "memory in use should be a figure: {out}"
    );

    // events: oldest first, newest last, with timestamps.
    let o = sandboxd(&config, &["events", user], &[]);
    assert!(o.status.success(), "{o:?}");
    let out = stdout(&o);
    let kinds: Vec<&str> = out
        .lines()
        .map(|l| l.split_whitespace().nth(1).unwrap())
        .collect();
    assert_eq!(kinds, ["created", "started"], "{out}");
    assert!(out.lines().all(|l| l.starts_with("20") && l.contains('T')));

    // stop: through the store and the engine, with an event; the server is running meanwhile.
    let o = sandboxd(&config, &["stop", user], &[]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(stdout(&o), format!("stopped opsa (container {short})\n"));
    let state = docker_inspect(&ids[0]);
    assert_eq!(state["State"]["Running"], false, "{state}");
    let o = sandboxd(&config, &["events", user], &[]);
    let out = stdout(&o);
    let last = out.lines().last().unwrap();
    assert!(
        last.contains("stopped") && last.contains("operator: sandboxd stop"),
        "{out}"
    );
    let o = sandboxd(&config, &["ps"], &[]);
    assert!(
        stdout(&o).contains(&format!("opsa  stopped  {short}")),
        "{o:?}"
    );
    // Stopping again is not an error.
    let o = sandboxd(&config, &["stop", user], &[]);
    assert!(o.status.success(), "{o:?}");
    assert!(stdout(&o).contains("already stopped"), "{o:?}");

    // The server notices on the next request and wakes the same container.
    let r = app
        .execute(user, json!({"code": "console.log('back')"}))
        .await;
    assert_eq!(r["output"], "back\n", "{r}");
    assert_eq!(app.containers(), ids);

    // Bad input and unknown users: one clear line, exit 1.
    let e = error_line(&sandboxd(&config, &["stop", "nobody"], &[]));
    assert!(e.contains("nobody has no sandbox"), "{e}");
    let e = error_line(&sandboxd(&config, &["events", "Not/A/User"], &[]));
    assert!(e.contains("invalid user id"), "{e}");
}

#[tokio::test]
async fn clear_errors_when_the_engine_or_the_store_is_unreachable() {
    // Its server is no TestApp: it holds its place beside the others itself.
    let _gate = gate::shared().await;
    let dir = tempfile::tempdir().unwrap();
    let instance = instance_name();
    // A real store (made by the same code the server runs), no server needed.
    let db = test_db().await;
    sandboxd::store::Store::connect(&db.url)
        .await
        .unwrap()
        .close()
        .await;
    let table = test_table(&instance, dir.path(), &db.url);
    let config = write_config(dir.path(), &table);

    // The engine is unreachable: ps and stop name it; events needs only the store.
    let no_engine = [("DOCKER_HOST", "unix:///nonexistent/docker.sock")];
    let e = error_line(&sandboxd(&config, &["ps"], &no_engine));
    assert!(e.contains("engine unreachable"), "{e}");
    assert!(e.contains("/nonexistent/docker.sock"), "{e}");
    let e = error_line(&sandboxd(&config, &["stop", "someone"], &no_engine));
    assert!(e.contains("engine unreachable"), "{e}");
    let o = sandboxd(&config, &["events", "someone"], &no_engine);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(stdout(&o), "");

    // The store is unreachable: a refused PostgreSQL port, and a SQLite file that is not there.
    let mut t = table.clone();
    t.insert(
        "database_url".into(),
        "postgres://sandboxd:hunter2secret@127.0.0.1:1/nope".into(),
    );
    let config = write_config(dir.path(), &t);
    for args in [&["ps"][..], &["events", "someone"], &["stop", "someone"]] {
        let e = error_line(&sandboxd(&config, args, &[]));
        assert!(
            e.contains("store unreachable (postgres://sandboxd:***@127.0.0.1:1/nope)"),
            "{e}"
        );
        assert!(!e.contains("hunter2secret"), "the password leaked: {e}");
    }
    let missing = dir.path().join("no/such.db");
    t.insert(
        "database_url".into(),
        format!("sqlite://{}", missing.display()).into(),
    );
    let config = write_config(dir.path(), &t);
    let e = error_line(&sandboxd(&config, &["ps"], &[]));
    assert!(
        e.contains("store unreachable") && e.contains("no database file"),
        "{e}"
    );
    assert!(
        !missing.exists(),
        "an operator command must not create a store"
    );
}
