//! The `app` op against the real agent binary: the init's done file and the dev server's pid
//! file (in the test's folder, through SANDBOXD_INIT_DONE_FILE / SANDBOXD_DEV_PID_FILE).

mod common;

use common::*;
use serde_json::json;

fn ask(a: &Agent) -> serde_json::Value {
    let r = a.call(json!({"op": "app"}), None);
    assert!(r.ok(), "{}", r.head);
    r.head
}

#[test]
fn app_may_come_while_the_init_runs_or_its_dev_server_lives() {
    let a = start();
    let done = a.dir.path().join("init.done");
    let pid_file = a.dir.path().join("dev.pid");

    // The init's discovery is not over: an app may come, whatever the pid file says.
    let h = ask(&a);
    assert_eq!(h["initDone"], false, "{h}");
    assert_eq!(h["devPid"], json!(null), "{h}");
    assert_eq!(h["mayCome"], true, "{h}");

    // Discovery over, no dev server: nothing can come.
    std::fs::write(&done, "done\n").unwrap();
    let h = ask(&a);
    assert_eq!(h["initDone"], true, "{h}");
    assert_eq!(h["mayCome"], false, "{h}");

    // A live dev server.
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    std::fs::write(&pid_file, format!("{}\n", child.id())).unwrap();
    let h = ask(&a);
    assert_eq!(h["devPid"], child.id(), "{h}");
    assert_eq!(h["devAlive"], true, "{h}");
    assert_eq!(h["mayCome"], true, "{h}");

    // It died (and was reaped): nothing can come.
    child.kill().unwrap();
    child.wait().unwrap();
    let h = ask(&a);
    assert_eq!(h["devAlive"], false, "{h}");
    assert_eq!(h["mayCome"], false, "{h}");

    // A pid file that holds no pid.
    std::fs::write(&pid_file, "not a pid").unwrap();
    let h = ask(&a);
    assert_eq!(h["devPid"], json!(null), "{h}");
    assert_eq!(h["mayCome"], false, "{h}");
}
