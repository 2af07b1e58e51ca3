//! Points 1-4: what code inside a sandbox can and cannot do, through execute and the terminal.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::preview::{preview_url, start_app, PREVIEW_DOMAIN};
use crate::common::ws::Term;
use crate::common::*;
use crate::support::*;

/// Reads the identity, capability sets, no_new_privs and seccomp lines, and tries what an
/// unprivileged user must not manage: namespaces, mounts, raw and packet sockets, the Docker
/// socket, and raising privileges through a setuid-root binary.
const PROBE: &str = r#"
const fs = require('fs'), cp = require('child_process');
const st = fs.readFileSync('/proc/self/status', 'utf8');
const field = k => st.match(new RegExp('^' + k + ':\\s*(.*)$', 'm'))[1].trim();
const out = { uid: process.getuid(), euid: process.geteuid(), gid: process.getgid(), groups: process.getgroups() };
for (const k of ['CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb', 'NoNewPrivs', 'Seccomp']) out[k] = field(k);
const run = (cmd, args) => cp.spawnSync(cmd, args, { encoding: 'utf8', timeout: 10000 }).status;
out.unshareUser = run('unshare', ['-U', 'true']);
out.unshareMount = run('unshare', ['-m', 'true']);
out.unshareNet = run('unshare', ['-n', 'true']);
fs.mkdirSync('/tmp/mnt', { recursive: true });
out.mount = run('mount', ['-t', 'tmpfs', 'none', '/tmp/mnt']);
out.rawSocket = run('python3', ['-c', 'import socket; socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)']);
out.packetSocket = run('python3', ['-c', 'import socket; socket.socket(socket.AF_PACKET, socket.SOCK_RAW)']);
// Sockets anywhere on the file systems, and Docker-looking mounts or variables.
const socks = cp.spawnSync('find', ['/', '(', '-path', '/proc', '-o', '-path', '/sys', ')', '-prune', '-o', '-type', 's', '-print'], { encoding: 'utf8', timeout: 20000 });
out.sockets = socks.stdout.split('\n').filter(Boolean);
out.dockerMounts = fs.readFileSync('/proc/self/mountinfo', 'utf8').split('\n').filter(l => /docker\.sock|containerd/.test(l));
out.dockerEnv = Object.keys(process.env).filter(k => k.startsWith('DOCKER'));
// A setuid-root binary keeps our identity: su waits for a password while we look at it.
const su = cp.spawn('su', ['root'], { stdio: ['pipe', 'ignore', 'ignore'] });
const t0 = Date.now();
let suUid = null;
while (Date.now() - t0 < 3000) {
  try {
    const s = fs.readFileSync('/proc/' + su.pid + '/status', 'utf8');
    // Wait until su runs (exec done), not the forked node.
    if (/^Name:\s*su$/m.test(s)) { suUid = s.match(/^Uid:\s*(.*)$/m)[1].trim().split(/\s+/); break; }
  } catch (e) {}
  cp.spawnSync('sleep', ['0.05']);
}
su.kill('SIGKILL');
out.suUid = suUid;
// Reading a root-only file through that binary would need euid 0.
out.shadow = (() => { try { fs.readFileSync('/etc/shadow'); return 'read'; } catch (e) { return e.code; } })();
console.log(JSON.stringify(out));
"#;

#[tokio::test]
async fn identity_and_privileges_through_execute_and_the_terminal() {
    let app = spawn_app().await;
    let v = js(&app, "p1", PROBE).await;
    assert_eq!(v["uid"], 1000, "{v}");
    assert_eq!(v["euid"], 1000, "{v}");
    assert_eq!(v["gid"], 1000, "{v}");
    assert_eq!(v["groups"], json!([1000]), "{v}");
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(v[set], "0000000000000000", "{set}: {v}");
    }
    assert_eq!(v["NoNewPrivs"], "1", "{v}");
    assert_eq!(v["Seccomp"], "2", "seccomp filter mode: {v}");
    for denied in [
        "unshareUser",
        "unshareMount",
        "unshareNet",
        "mount",
        "rawSocket",
        "packetSocket",
    ] {
        assert!(
            v[denied].as_i64().is_some_and(|s| s != 0),
            "{denied} succeeded: {v}"
        );
    }
    assert_eq!(v["sockets"], json!([]), "{v}");
    assert_eq!(v["dockerMounts"], json!([]), "{v}");
    assert_eq!(v["dockerEnv"], json!([]), "{v}");
    // Real, effective, saved and file-system uid of the running setuid-root su: all 1000.
    assert_eq!(v["suUid"], json!(["1000", "1000", "1000", "1000"]), "{v}");
    assert_eq!(v["shadow"], "EACCES", "{v}");

    // The same through the terminal (a login shell in its own exec).
    let mut t = Term::open(&app, "p1", "").await.with_step(TERM_STEP);
    assert_eq!(t.output("id -u; id -g").await, "1000\n1000");
    let status = t
        .output("grep -E '^(CapPrm|CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status | tr -s '\\t ' ' '")
        .await;
    assert_eq!(
        status,
        "CapPrm: 0000000000000000\nCapEff: 0000000000000000\nCapBnd: 0000000000000000\nNoNewPrivs: 1\nSeccomp: 2",
    );
    assert!(t
        .output("unshare -U true || echo refused")
        .await
        .ends_with("refused"));
    assert!(t
        .output("mount -t tmpfs none /tmp/mnt || echo refused")
        .await
        .ends_with("refused"));
    assert!(t
        .output("python3 -c 'import socket; socket.socket(socket.AF_INET, socket.SOCK_RAW, 1)' || echo refused")
        .await
        .ends_with("refused"));
    assert!(t
        .output("sudo -n true || echo refused")
        .await
        .ends_with("refused"));
    assert_eq!(
        t.output("ls /var/run/docker.sock /run/docker.sock 2>/dev/null | wc -l")
            .await,
        "0"
    );
}

#[tokio::test]
async fn root_is_read_only_except_the_workspace_and_bounded_tmpfs() {
    let app = spawn_app().await;
    let v = js(
        &app,
        "p2",
        r#"
        const fs = require('fs');
        const out = {};
        for (const d of ['/', '/etc', '/usr/bin', '/usr/lib', '/var', '/opt', '/root', '/home', '/sbin', '/run']) {
          try { fs.writeFileSync(d + '/sandboxd-probe', 'x'); out[d] = 'written'; } catch (e) { out[d] = e.code; }
        }
        for (const d of ['/workspace', '/tmp', '/home/sandbox']) {
          try { fs.writeFileSync(d + '/probe', 'x'); fs.unlinkSync(d + '/probe'); out[d] = 'ok'; } catch (e) { out[d] = e.code; }
        }
        out.mounts = {};
        for (const l of fs.readFileSync('/proc/self/mountinfo', 'utf8').split('\n')) {
          const f = l.split(' ');
          if (['/', '/workspace', '/tmp', '/home/sandbox', '/run'].includes(f[4])) {
            const sep = f.indexOf('-');
            out.mounts[f[4]] = { opts: f[5], fstype: f[sep + 1], super: f[sep + 3] };
          }
        }
        console.log(JSON.stringify(out));
        "#,
    )
    .await;
    for d in ["/", "/etc", "/usr/bin", "/usr/lib", "/var", "/opt", "/sbin"] {
        assert_eq!(v[d], "EROFS", "{d}: {v}");
    }
    // Root-owned tmpfs or home folders: not writable either (EACCES before EROFS).
    for d in ["/root", "/home", "/run"] {
        assert!(v[d] == "EROFS" || v[d] == "EACCES", "{d}: {v}");
    }
    for d in ["/workspace", "/tmp", "/home/sandbox"] {
        assert_eq!(v[d], "ok", "{d}: {v}");
    }
    let m = &v["mounts"];
    assert!(m["/"]["opts"].as_str().unwrap().starts_with("ro"), "{m}");
    assert!(
        m["/workspace"]["opts"].as_str().unwrap().starts_with("rw"),
        "{m}"
    );
    for t in ["/tmp", "/home/sandbox", "/run"] {
        assert_eq!(m[t]["fstype"], "tmpfs", "{t}: {m}");
        let sup = m[t]["super"].as_str().unwrap();
        assert!(sup.contains("size="), "{t} is bounded: {m}");
        assert!(
            sup.contains("nosuid") || m[t]["opts"].as_str().unwrap().contains("nosuid"),
            "{t}: {m}"
        );
    }
    // Through the terminal too.
    let mut t = Term::open(&app, "p2", "").await.with_step(TERM_STEP);
    assert!(t
        .output("touch /etc/x")
        .await
        .contains("Read-only file system"));
    assert_eq!(t.output("touch /workspace/t && echo ok").await, "ok");
}

/// Memory, CPU, tmpfs, file size and open files, each with small limits so the test is quick.
#[tokio::test]
async fn resource_limits_hold_inside_the_sandbox() {
    let app = spawn_app_with(|t| {
        t.insert("memory_mb".into(), 192.into());
        t.insert("tmp_size_mb".into(), 8.into());
        t.insert("fsize_limit_mb".into(), 16.into());
        t.insert("nofile_limit".into(), 128.into());
    })
    .await;
    let user = "r1";
    let cid = app.init(user).await["containerId"]
        .as_str()
        .unwrap()
        .to_owned();

    // Memory bomb (outside V8's heap, so the kernel, not V8, has to stop it): OOM-killed in
    // its cgroup, and execute says so.
    let r = app
        .execute(
            user,
            json!({"code": "const a = []; for (;;) a.push(Buffer.alloc(8 << 20, 1));", "timeoutMs": 30000}),
        )
        .await;
    assert_eq!(r["oomKilled"], true, "{r}");
    assert_eq!(r["timedOut"], false, "{r}");
    assert_ne!(r["exitCode"], 0, "{r}");
    // The sandbox itself survived and works.
    let r = app
        .execute(user, json!({"code": "console.log('alive')"}))
        .await;
    assert_eq!(r["output"], "alive\n", "{r}");
    assert_eq!(r["oomKilled"], false, "{r}");

    // CPU burn: throttled to the quota (0.5 CPU): the cgroup reports throttled periods and the
    // process gets about half of the wall time. (A busy machine may keep the burn under its
    // quota, where no throttling shows: a few tries.)
    let quota = cgroup_file(&cid, "cpu", "cpu.cfs_quota_us").unwrap();
    let period = cgroup_file(&cid, "cpu", "cpu.cfs_period_us").unwrap();
    assert_eq!(
        quota.trim().parse::<f64>().unwrap() / period.trim().parse::<f64>().unwrap(),
        0.5
    );
    let cpu_lock = CPU_HEAVY.lock().await;
    let mut throttled = false;
    for _ in 0..3 {
        let before = cpu_throttled(&cid);
        let v = js(
            &app,
            user,
            r#"
            const t0 = Date.now(), c0 = process.cpuUsage();
            while (Date.now() - t0 < 1500) {}
            const c = process.cpuUsage(c0);
            console.log(JSON.stringify({ wall: Date.now() - t0, cpu: (c.user + c.system) / 1000 }));
            "#,
        )
        .await;
        let after = cpu_throttled(&cid);
        let ratio = v["cpu"].as_f64().unwrap() / v["wall"].as_f64().unwrap();
        assert!(ratio < 0.75, "cpu/wall = {ratio} ({v})");
        if after > before {
            throttled = true;
            break;
        }
    }
    drop(cpu_lock);
    assert!(throttled, "the burn was never throttled");

    // tmpfs: filling /tmp stops at its 8 MiB with ENOSPC.
    let v = js(
        &app,
        user,
        r#"
        const fs = require('fs');
        const fd = fs.openSync('/tmp/fill', 'w'); let n = 0, err = null;
        const chunk = Buffer.alloc(1 << 20, 1);
        try { for (let i = 0; i < 64; i++) { n += fs.writeSync(fd, chunk); } } catch (e) { err = e.code; }
        fs.closeSync(fd); fs.unlinkSync('/tmp/fill');
        console.log(JSON.stringify({ n, err }));
        "#,
    )
    .await;
    assert_eq!(v["err"], "ENOSPC", "{v}");
    assert!(v["n"].as_u64().unwrap() <= 8 << 20, "{v}");

    // A huge file stops at the 16 MiB file-size limit (SIGXFSZ / EFBIG), wherever it is written.
    let v = js(
        &app,
        user,
        r#"
        const cp = require('child_process');
        const r = cp.spawnSync('bash', ['-c', 'head -c 64M /dev/zero > /workspace/huge']);
        console.log(JSON.stringify({ status: r.status, signal: r.signal, size: require('fs').statSync('/workspace/huge').size }));
        "#,
    )
    .await;
    assert!(v["status"] != 0 || !v["signal"].is_null(), "{v}");
    assert_eq!(v["size"], 16 << 20, "{v}");
    let host_size = std::fs::metadata(app.workspaces.join(format!("user-{user}/huge")))
        .unwrap()
        .len();
    assert_eq!(host_size, 16 << 20);

    // Open-file bomb: EMFILE at nofile (128).
    let v = js(
        &app,
        user,
        r#"
        const fs = require('fs'); const fds = []; let err = null;
        try { for (let i = 0; i < 100000; i++) fds.push(fs.openSync('/dev/null', 'r')); } catch (e) { err = e.code; }
        for (const fd of fds) fs.closeSync(fd);
        console.log(JSON.stringify({ opened: fds.length, err }));
        "#,
    )
    .await;
    assert_eq!(v["err"], "EMFILE", "{v}");
    assert!(v["opened"].as_u64().unwrap() < 128, "{v}");

    // None of it touched the server: it still answers at once.
    let r = app
        .client
        .get(format!("{}/healthz", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

fn cpu_throttled(cid: &str) -> u64 {
    let stat = cgroup_file(cid, "cpu", "cpu.stat").expect("the container's cpu.stat");
    stat.lines()
        .find_map(|l| l.strip_prefix("nr_throttled "))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Fork bombs in four sandboxes at once stop at each one's pids limit; a fifth user can still
/// fork, run code, use a terminal and be previewed meanwhile (processes of all sandboxes run
/// as uid 1000, so a per-uid process limit would couple them: the bombs would take the
/// fifth user's share too). After the timeout the bombers' sandboxes work again.
#[tokio::test]
async fn fork_bombs_stop_at_the_pids_limit_and_leave_others_responsive() {
    let app = spawn_app_with(|t| {
        t.insert("pids_limit".into(), 96.into());
        t.insert("preview_domain".into(), PREVIEW_DOMAIN.into());
    })
    .await;
    let _cpu = CPU_HEAVY.lock().await;
    let bombers = ["fb1", "fb2", "fb3", "fb4"];
    let mut cids = vec![];
    for u in bombers {
        cids.push(
            app.init(u).await["containerId"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    start_app(&app, "calm", APP).await;
    let c = preview_client(&app, &["calm"], None);
    wait_preview(&c, &preview_url(&app, "calm", "/")).await;

    let bomb = r#"
        // Every process forks two and waits: the tree fills the pids limit and stays there.
        require('child_process').spawn('bash', ['-c', 'b() { b & b & wait; }; b'], { stdio: 'ignore' });
        setInterval(() => {}, 1000);
    "#;
    let bombs: Vec<_> = bombers
        .iter()
        .map(|u| app.execute(u, json!({"code": bomb, "timeoutMs": 8000})))
        .collect();
    let bombs = futures_util::future::join_all(bombs);
    let calm = async {
        // Let the bombs reach their limits.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let t0 = Instant::now();
        let v = js(
            &app,
            "calm",
            r#"
            const cp = require('child_process');
            const kids = []; let err = null;
            try { for (let i = 0; i < 10; i++) kids.push(cp.spawn('sleep', ['5'])); } catch (e) { err = e.code; }
            const r = cp.spawnSync('bash', ['-c', 'for i in $(seq 10); do /bin/true || exit 1; done; echo forked'], { encoding: 'utf8' });
            for (const k of kids) k.kill();
            console.log(JSON.stringify({ spawned: kids.length, err, forked: (r.stdout || '').trim(), stderr: r.stderr }));
            "#,
        )
        .await;
        let exec_time = t0.elapsed();
        let mut t = Term::open(&app, "calm", "").await.with_step(TERM_STEP);
        assert_eq!(t.output("echo still here").await, "still here");
        let page = wait_preview(&c, &preview_url(&app, "calm", "/")).await;
        (v, exec_time, page)
    };
    let (results, (v, exec_time, page)) = tokio::join!(bombs, calm);
    assert_eq!(v["forked"], "forked", "the calm user could not fork: {v}");
    assert!(v["err"].is_null(), "{v}");
    assert!(exec_time < Duration::from_secs(20), "{exec_time:?}");
    assert!(page.starts_with("app of calm"), "{page}");
    for (u, r) in bombers.iter().zip(&results) {
        assert_eq!(r["timedOut"], true, "{u}: {r}");
    }
    for cid in &cids {
        let events = cgroup_file(cid, "pids", "pids.events").unwrap_or_default();
        let hit: u64 = events
            .lines()
            .find_map(|l| l.strip_prefix("max "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        assert!(
            hit > 0,
            "the pids limit was never reached in {cid}: {events:?}"
        );
        let max = cgroup_file(cid, "pids", "pids.max").unwrap();
        assert_eq!(max.trim(), "96");
    }
    // The timeout killed every bomb process: the bombers' sandboxes answer again.
    for u in bombers {
        let r = app
            .execute(u, json!({"code": "console.log('recovered')"}))
            .await;
        assert_eq!(r["output"], "recovered\n", "{u}: {r}");
    }
    for cid in &cids {
        let cur: u64 = cgroup_file(cid, "pids", "pids.current")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(cur < 16, "{cid} still has {cur} tasks");
    }
}

/// Point 4: the timeout kills the whole run: a child that ignores SIGTERM and forks, and one
/// that left the run's session (setsid, as `detached: true` does) and cleared its environment.
#[tokio::test]
async fn execute_timeout_kills_every_descendant_even_detached_ones() {
    let app = spawn_app().await;
    let code = r#"
        const { spawn } = require('child_process');
        spawn('bash', ['-c', 'trap "" TERM; sleep 1001 & sleep 1002 & wait'], { stdio: 'ignore' });
        spawn('env', ['-i', 'bash', '-c', 'trap "" TERM HUP; sleep 1003 & while :; do sleep 1; done'], { stdio: 'ignore', detached: true }).unref();
        spawn('setsid', ['-f', 'sleep', '1004'], { stdio: 'ignore' });
        console.log('started');
        while (true) {}
    "#;
    let t0 = Instant::now();
    let r = app
        .execute("t1", json!({"code": code, "timeoutMs": 2000}))
        .await;
    assert_eq!(r["timedOut"], true, "{r}");
    assert_eq!(r["output"], "started\n", "{r}");
    assert!(r["exitCode"].is_null(), "{r}");
    assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
    let ps = app
        .execute(
            "t1",
            json!({"code": "console.log(require('child_process').execSync('ps -eo pid,sid,args').toString())"}),
        )
        .await;
    let out = ps["output"].as_str().unwrap();
    for left in [
        "sleep 1001",
        "sleep 1002",
        "sleep 1003",
        "sleep 1004",
        "while",
    ] {
        assert!(!out.contains(left), "{left} survived the timeout:\n{out}");
    }
}

/// Point 4: an output flood is cut at the cap, the rest drained and dropped: the server's
/// memory (this process) stays flat while 3 floods of 200 MiB go through.
#[tokio::test]
async fn output_flood_is_truncated_and_server_memory_stays_flat() {
    let app = spawn_app().await;
    app.init("o1").await;
    // Warm up (allocator, pools) before measuring.
    let r = app
        .execute(
            "o1",
            json!({"code": "process.stdout.write('w'.repeat(2 << 20))"}),
        )
        .await;
    assert_eq!(r["truncated"], true);
    let before = rss_kib();
    let flood = r#"
        const b = Buffer.alloc(1 << 20, 120);
        let n = 0;
        (function w() { while (n < 200) { n++; if (!process.stdout.write(b)) return process.stdout.once('drain', w); } })();
    "#;
    let mut peak = before;
    for _ in 0..3 {
        let r = app
            .execute("o1", json!({"code": flood, "timeoutMs": 60000}))
            .await;
        assert_eq!(r["truncated"], true, "{}", r["error"]);
        assert_eq!(r["output"].as_str().unwrap().len(), 1 << 20);
        assert_eq!(r["timedOut"], false);
        peak = peak.max(rss_kib());
    }
    // 600 MiB went through; the server grew by far less than one flood.
    assert!(
        peak < before + 64 * 1024,
        "RSS grew from {before} KiB to {peak} KiB"
    );
}

/// Point 4: 50 parallel executes for one user: at most `exec_per_user` run, the rest get 429
/// with Retry-After; nothing crashes and the user can run code afterwards.
#[tokio::test]
async fn fifty_parallel_executes_get_429_beyond_the_per_user_cap() {
    let app = spawn_app_with(|t| {
        t.insert("exec_per_user".into(), 3.into());
    })
    .await;
    app.init("c1").await;
    let reqs: Vec<_> = (0..50)
        .map(|_| async {
            let r = app
                .post(
                    "c1",
                    "/sandbox/execute",
                    json!({"code": "setTimeout(() => console.log('done'), 1500)"}),
                )
                .await;
            let status = r.status().as_u16();
            let retry = r.headers().get("retry-after").is_some();
            let body: Value = r.json().await.unwrap();
            (status, retry, body)
        })
        .collect();
    let results = futures_util::future::join_all(reqs).await;
    let ok = results.iter().filter(|(s, _, _)| *s == 200).count();
    let limited: Vec<_> = results.iter().filter(|(s, _, _)| *s == 429).collect();
    assert!((1..=3).contains(&ok), "{ok} ran at once (cap 3)");
    assert_eq!(ok + limited.len(), 50, "{results:?}");
    for (_, retry, body) in &limited {
        assert!(*retry, "429 without Retry-After");
        assert_eq!(body["error"]["code"], "too_many_executions");
    }
    for (s, _, body) in &results {
        if *s == 200 {
            assert_eq!(body["output"], "done\n", "{body}");
        }
    }
    // Another user is not limited by this one's cap, and this one runs again.
    let r = app.execute("c2", json!({"code": "console.log(2)"})).await;
    assert_eq!(r["output"], "2\n");
    let r = app.execute("c1", json!({"code": "console.log(1)"})).await;
    assert_eq!(r["output"], "1\n");
}
