//! The boot CPU quota (README, "Sandboxes", boot quota): a sandbox boots with `boot_cpus` and gets its configured quota
//! back once its app listens, or after `boot_window` without an app; pausing or stopping it
//! mid-boot gives the quota back at once, and an adopted container never keeps a boot quota.
//! Read from the engine (`HostConfig.NanoCpus`) and from the cgroup (`cpu.cfs_quota_us`).

use std::os::unix::fs::chown;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::*;
use sandboxd::user::UserId;

const CONFIGURED: i64 = 500_000_000;

fn nano_cpus(id: &str) -> i64 {
    docker_inspect(id)["HostConfig"]["NanoCpus"]
        .as_i64()
        .expect("NanoCpus")
}

/// The cgroup's quota in CPUs (cgroup v1 or v2 layouts), for a running container.
fn cgroup_cpus(id: &str) -> f64 {
    let v1 = |f: &str| {
        [
            format!("/sys/fs/cgroup/cpu/docker/{id}/{f}"),
            format!("/sys/fs/cgroup/cpu,cpuacct/docker/{id}/{f}"),
        ]
        .into_iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
    };
    if let (Some(q), Some(p)) = (v1("cpu.cfs_quota_us"), v1("cpu.cfs_period_us")) {
        return q.trim().parse::<f64>().unwrap() / p.trim().parse::<f64>().unwrap();
    }
    let v2 = [
        format!("/sys/fs/cgroup/system.slice/docker-{id}.scope/cpu.max"),
        format!("/sys/fs/cgroup/docker/{id}/cpu.max"),
    ]
    .into_iter()
    .find_map(|p| std::fs::read_to_string(p).ok())
    .unwrap_or_else(|| panic!("no CPU cgroup found for container {id}"));
    let mut it = v2.split_whitespace();
    let q: f64 = it.next().unwrap().parse().unwrap();
    let p: f64 = it.next().unwrap().parse().unwrap();
    q / p
}

fn container_ip(app: &TestApp, id: &str) -> String {
    docker_inspect(id)["NetworkSettings"]["Networks"][format!("{}-net", app.instance)]["IPAddress"]
        .as_str()
        .expect("address on the instance network")
        .to_owned()
}

fn boot_nano(app: &TestApp) -> i64 {
    app.running.as_ref().unwrap().config().limits.boot_nano_cpus
}

/// An app that listens on 5173 only after `delay_s` seconds (so the boot is long enough to be
/// seen), started by the image's init from `.sandboxd/preview.json`.
fn write_app(app: &TestApp, user: &str, delay_s: u32) {
    let dir = app.workspaces.join(format!("user-{user}"));
    std::fs::create_dir_all(dir.join(".sandboxd")).unwrap();
    std::fs::write(
        dir.join("server.js"),
        "require('http').createServer((q, s) => s.end('up\\n')).listen(5173, '0.0.0.0');\n",
    )
    .unwrap();
    std::fs::write(
        dir.join(".sandboxd/preview.json"),
        format!(r#"{{"command": "sleep {delay_s}; exec node server.js"}}"#),
    )
    .unwrap();
    for p in [
        dir.clone(),
        dir.join(".sandboxd"),
        dir.join("server.js"),
        dir.join(".sandboxd/preview.json"),
    ] {
        chown(Path::new(&p), Some(1000), Some(1000)).unwrap();
    }
}

/// Waits (bounded) until the app answers a TCP connect on 5173.
async fn wait_listening(ip: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if tokio::net::TcpStream::connect(format!("{ip}:5173"))
            .await
            .is_ok()
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the app never listened on {ip}:5173"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (bounded by `within`) until the engine and the cgroup both hold the configured quota.
async fn wait_configured(id: &str, within: Duration, running: bool) -> Duration {
    let t = Instant::now();
    loop {
        let n = nano_cpus(id);
        if n == CONFIGURED && (!running || (cgroup_cpus(id) - 0.5).abs() < 1e-9) {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < within,
            "quota still NanoCpus={n} after {within:?} (configured {CONFIGURED})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn assert_boosted(app: &TestApp, id: &str) {
    let boot = boot_nano(app);
    assert!(
        boot > CONFIGURED,
        "boot quota {boot} is no boost on this host"
    );
    assert_eq!(nano_cpus(id), boot, "the engine holds the boot quota");
    let cg = cgroup_cpus(id);
    assert!(
        (cg - boot as f64 / 1e9).abs() < 1e-9,
        "cgroup quota {cg} CPUs, boot quota {boot}"
    );
}

#[tokio::test]
async fn boot_quota_is_given_back_once_the_app_listens_and_on_pause_or_stop() {
    // Alone: the boosted quota must still hold while the app boots, and be given back within
    // bounds, which another test's load could upset.
    let alone = gate::alone().await;
    let app = spawn_app_alone(&alone, |t| {
        t.insert("boot_cpus".into(), 2.0.into());
        t.insert("boot_window".into(), "120s".into());
    })
    .await;
    let user = "41";
    write_app(&app, user, 3);
    let init = app.init(user).await;
    let id = init["containerId"].as_str().unwrap().to_owned();
    // Booting (the app sleeps 3 s before it listens): the raised quota.
    assert_boosted(&app, &id);
    let ip = container_ip(&app, &id);
    wait_listening(&ip).await;
    // Listening: the configured quota, long before the 120 s window ends.
    wait_configured(&id, Duration::from_secs(10), true).await;

    // Stopped mid-boot: the stopped container does not keep the boost.
    let u = UserId::parse(user).unwrap();
    app.mgr().stop(&u, "test").await.unwrap();
    assert_eq!(
        nano_cpus(&id),
        CONFIGURED,
        "a stopped sandbox keeps no boost"
    );
    app.init(user).await; // wake from stopped: boosted again
    assert_boosted(&app, &id);
    app.mgr().stop(&u, "test").await.unwrap();
    assert_eq!(
        nano_cpus(&id),
        CONFIGURED,
        "stopped during its boot: no boost kept"
    );

    // Paused mid-boot: the configured quota at once.
    app.init(user).await;
    assert_boosted(&app, &id);
    app.mgr().pause(&u, "test").await.unwrap();
    assert_eq!(
        nano_cpus(&id),
        CONFIGURED,
        "a paused sandbox keeps no boost"
    );
    assert!((cgroup_cpus(&id) - 0.5).abs() < 1e-9);

    // And a full wake from stopped ends with the configured quota once the app listens.
    app.mgr().stop(&u, "test").await.unwrap();
    app.init(user).await;
    assert_boosted(&app, &id);
    wait_listening(&container_ip(&app, &id)).await;
    wait_configured(&id, Duration::from_secs(10), true).await;
}

#[tokio::test]
async fn a_sandbox_without_an_app_gets_its_quota_back_after_the_window() {
    // Alone: the boosted quota must still hold while the app boots, and be given back within
    // bounds, which another test's load could upset.
    let alone = gate::alone().await;
    let app = spawn_app_alone(&alone, |t| {
        t.insert("boot_cpus".into(), 2.0.into());
        t.insert("boot_window".into(), "4s".into());
    })
    .await;
    let init = app.init("42").await;
    let id = init["containerId"].as_str().unwrap().to_owned();
    assert_boosted(&app, &id);
    let took = wait_configured(&id, Duration::from_secs(30), true).await;
    assert!(
        took >= Duration::from_secs(1),
        "given back after {took:?}, before the window (nothing listens)"
    );
}

#[tokio::test]
async fn a_restarted_server_gives_back_a_boot_quota_left_behind() {
    let mut app = spawn_app().await; // boost off (tests/common)
    let init = app.init("43").await;
    let id = init["containerId"].as_str().unwrap().to_owned();
    assert_eq!(nano_cpus(&id), CONFIGURED);
    app.shutdown().await;
    // What a crash mid-boot leaves behind: a running container with the boot quota.
    let out = std::process::Command::new("docker")
        .args(["update", "--cpus", "1", &id])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(nano_cpus(&id), 1_000_000_000);
    let dir = app.workspaces.parent().unwrap().to_owned();
    let table = test_table(&app.instance, &dir, &app.db.url);
    let cfg = sandboxd::config::Config::from_table(table).unwrap();
    app.running = Some(
        sandboxd::startup::build(cfg)
            .await
            .expect("server starts again"),
    );
    // Adopted at start-up: the configured quota before the server serves anything.
    assert_eq!(nano_cpus(&id), CONFIGURED);
    assert!((cgroup_cpus(&id) - 0.5).abs() < 1e-9);
}
