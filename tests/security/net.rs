//! Point 5: network isolation. Sandboxes reach neither the host (sandboxd's listeners, other
//! services, through the bridge gateway or any host address), nor each other (by IP, any port,
//! or by name), nor the metadata address; the internet stays reachable unless switched off.
//! Traffic goes only to this machine, the project's containers, a fake metadata server in a
//! network namespace made here, and the npm registry.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::preview::start_app;
use crate::common::*;
use crate::support::*;

const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// Tries TCP connections (and HTTP GETs) from inside the sandbox; each target answers
/// "connected"/"http <status>" or the error code.
const PROBE: &str = r#"
const net = require('net'), http = require('http'), dns = require('dns');
const tcp = (host, port) => new Promise(res => {
  const s = net.connect({ host, port, timeout: 3000 });
  s.on('connect', () => { s.destroy(); res('connected'); });
  s.on('timeout', () => { s.destroy(); res('timeout'); });
  s.on('error', e => res(e.code));
});
const get = (host, port) => new Promise(res => {
  const r = http.get({ host, port, path: '/', timeout: 3000 }, x => { x.resume(); res('http ' + x.statusCode); });
  r.on('timeout', () => { r.destroy(); res('timeout'); });
  r.on('error', e => res(e.code));
});
const lookup = name => new Promise(res => dns.lookup(name, { family: 4 }, (e, a) => res(e ? null : a)));
(async () => {
  const out = {};
  await Promise.all(TARGETS.map(async ([key, kind, host, port]) => {
    let h = host;
    if (kind === 'name') { h = await lookup(host); out[key + ':resolved'] = h; if (!h) { out[key] = 'unresolved'; return; } }
    out[key] = kind === 'http' ? await get(h, port) : await tcp(h, port);
  }));
  out.ipv6 = require('fs').readFileSync('/proc/net/if_inet6', 'utf8').trim();
  console.log(JSON.stringify(out));
})();
"#;

async fn probe(app: &TestApp, user: &str, targets: Value) -> Value {
    let code = PROBE.replace("TARGETS", &targets.to_string());
    js(app, user, &code).await
}

/// The server listens on 0.0.0.0; the test client talks to it as 127.0.0.1 (a main host).
fn talk_over_loopback(app: &mut TestApp, port: u16) {
    app.addr = SocketAddr::from(([127, 0, 0, 1], port));
    app.base = format!("http://{}", app.addr);
}

fn gateway(instance: &str) -> Ipv4Addr {
    let out = Command::new("docker")
        .args(["network", "inspect", &format!("{instance}-net")])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v[0]["IPAM"]["Config"][0]["Gateway"]
        .as_str()
        .expect("a gateway")
        .parse()
        .unwrap()
}

/// A TCP service on all host addresses that counts its connections: stands for any host
/// service a sandbox must not reach (a database, an agent).
struct HostService {
    port: u16,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl HostService {
    fn start() -> HostService {
        let l = TcpListener::bind("0.0.0.0:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (accepted.clone(), stop.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(300);
            while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
                match l.accept() {
                    Ok((mut c, _)) => {
                        a.fetch_add(1, Ordering::Relaxed);
                        let _ = c.write_all(b"HTTP/1.0 200 OK\r\n\r\nhost service");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        HostService {
            port,
            accepted,
            stop,
        }
    }
}

impl Drop for HostService {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A fake metadata server at 169.254.169.254:80, in a network namespace of its own behind a
/// veth pair, routed from the host: what a sandbox would hit on a cloud machine. Held under a
/// file lock (the address is machine-wide); removed on drop.
struct FakeMetadata {
    ns: String,
    veth: String,
    hits: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    _lock: std::fs::File,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("the ip command (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl FakeMetadata {
    fn start() -> FakeMetadata {
        use std::os::unix::io::AsRawFd;
        let lock = std::fs::File::create("/tmp/sandboxd-test-metadata.lock").unwrap();
        // SAFETY: flock on a file we own; blocks until other holders are done.
        assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
        let tag = format!("{:05}", std::process::id() % 100_000);
        let (ns, veth, peer) = (
            format!("sbxmd{tag}"),
            format!("sbxmh{tag}"),
            format!("sbxmn{tag}"),
        );
        // Leftovers of a run that died.
        let _ = Command::new("ip").args(["link", "del", &veth]).output();
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        ip(&["netns", "add", &ns]);
        ip(&["link", "add", &veth, "type", "veth", "peer", "name", &peer]);
        ip(&["link", "set", &peer, "netns", &ns]);
        ip(&["addr", "add", "169.254.169.1/32", "dev", &veth]);
        ip(&["link", "set", &veth, "up"]);
        ip(&[
            "route",
            "replace",
            "169.254.169.254/32",
            "dev",
            &veth,
            "src",
            "169.254.169.1",
        ]);
        for args in [
            vec!["addr", "add", "169.254.169.254/32", "dev", &peer],
            vec!["link", "set", &peer, "up"],
            vec!["link", "set", "lo", "up"],
            vec!["route", "add", "169.254.169.1/32", "dev", &peer],
            vec![
                "route",
                "add",
                "default",
                "via",
                "169.254.169.1",
                "dev",
                &peer,
            ],
        ] {
            let mut a = vec!["netns", "exec", &ns, "ip"];
            a.extend(args);
            ip(&a);
        }
        let hits = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (h, s, nsname) = (hits.clone(), stop.clone(), ns.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // This thread enters the namespace; its socket stays there.
            let f = std::fs::File::open(format!("/run/netns/{nsname}")).unwrap();
            // SAFETY: setns on this thread only, with a namespace fd we just opened.
            assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            let l = TcpListener::bind(SocketAddr::from((METADATA, 80))).unwrap();
            l.set_nonblocking(true).unwrap();
            tx.send(()).unwrap();
            let deadline = Instant::now() + Duration::from_secs(300);
            while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
                match l.accept() {
                    Ok((mut c, _)) => {
                        h.fetch_add(1, Ordering::Relaxed);
                        c.set_nonblocking(false).unwrap();
                        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                        let mut buf = [0u8; 1024];
                        let _ = c.read(&mut buf);
                        let _ =
                            c.write_all(b"HTTP/1.0 200 OK\r\ncontent-length: 8\r\n\r\nmetadata");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("metadata server up");
        FakeMetadata {
            ns,
            veth,
            hits,
            stop,
            _lock: lock,
        }
    }
}

impl Drop for FakeMetadata {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

#[tokio::test]
async fn sandboxes_reach_neither_the_host_nor_each_other_nor_metadata() {
    let metadata = FakeMetadata::start();
    let service = HostService::start();
    // sandboxd listens on every host address, as a production edge does.
    let mut app = spawn_app_with(|t| {
        t.insert("http_addr".into(), "0.0.0.0:0".into());
    })
    .await;
    let port = app.addr.port();
    talk_over_loopback(&mut app, port);
    let gw = gateway(&app.instance);
    app.init("na").await;
    start_app(&app, "nb", APP).await;
    let b = app.mgr().status(&uid("nb")).await.unwrap();
    let b_ip = b.ip.unwrap().to_string();
    // B listens on 5173 (the app) and 9000 (another port).
    let r = app
        .execute(
            "nb",
            json!({"code": "require('child_process').spawn('node', ['-e', \"require('net').createServer(s => s.end('b')).listen(9000)\"], { detached: true, stdio: 'ignore' }).unref()"}),
        )
        .await;
    assert_eq!(r["exitCode"], 0, "{r}");

    // Positive controls: from the host, all of these answer.
    let deadline = Instant::now() + Duration::from_secs(20);
    for target in [
        SocketAddr::from((gw, port)),
        SocketAddr::from((gw, service.port)),
        format!("{b_ip}:5173").parse().unwrap(),
        format!("{b_ip}:9000").parse().unwrap(),
        SocketAddr::from((METADATA, 80)),
    ] {
        while TcpStream::connect_timeout(&target, Duration::from_secs(2)).is_err() {
            assert!(
                Instant::now() < deadline,
                "{target} does not answer the host"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // The controls' connections have been counted before the sandbox tries.
    while service.accepted.load(Ordering::Relaxed) < 1 || metadata.hits.load(Ordering::Relaxed) < 1
    {
        assert!(Instant::now() < deadline, "controls not counted");
        std::thread::sleep(Duration::from_millis(20));
    }
    let service_before = service.accepted.load(Ordering::Relaxed);
    let metadata_before = metadata.hits.load(Ordering::Relaxed);

    let host_addrs: Vec<String> = host_ipv4_addrs();
    let mut targets = vec![
        json!(["gateway:sandboxd", "tcp", gw.to_string(), port]),
        json!(["gateway:sandboxd:http", "http", gw.to_string(), port]),
        json!(["gateway:service", "tcp", gw.to_string(), service.port]),
        json!(["gateway:ssh", "tcp", gw.to_string(), 22]),
        json!(["b:5173", "tcp", b_ip, 5173]),
        json!(["b:9000", "tcp", b_ip, 9000]),
        json!(["b:name", "name", b.container_name, 5173]),
        json!(["metadata", "http", METADATA.to_string(), 80]),
    ];
    for (i, a) in host_addrs.iter().enumerate() {
        targets.push(json!([format!("host{i}:sandboxd"), "tcp", a, port]));
        targets.push(json!([format!("host{i}:service"), "tcp", a, service.port]));
    }
    let v = probe(&app, "na", Value::Array(targets.clone())).await;
    eprintln!("from a sandbox: {v}");
    for t in &targets {
        let key = t[0].as_str().unwrap();
        let got = v[key].as_str().unwrap_or("");
        assert!(
            got != "connected" && !got.starts_with("http "),
            "{key} reachable from a sandbox: {v}"
        );
    }
    assert_eq!(v["ipv6"], "", "the sandbox has IPv6 addresses: {v}");
    assert_eq!(service.accepted.load(Ordering::Relaxed), service_before);
    assert_eq!(metadata.hits.load(Ordering::Relaxed), metadata_before);

    // The probe works: without the metadata block (another instance, own bridge and chains),
    // the same sandbox code reaches the fake metadata server.
    let open = spawn_app_with(|t| {
        t.insert(
            "sandbox_blocked_networks".into(),
            toml::Value::Array(vec![]),
        );
    })
    .await;
    let v = probe(
        &open,
        "nc",
        json!([["metadata", "http", METADATA.to_string(), 80]]),
    )
    .await;
    assert_eq!(v["metadata"], "http 200", "{v}");
    assert!(metadata.hits.load(Ordering::Relaxed) > metadata_before);
}

/// Every IPv4 address of the host (eth0, docker bridges…): all of them are the host.
fn host_ipv4_addrs() -> Vec<String> {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace().skip_while(|w| *w != "inet");
            w.next();
            w.next()
                .and_then(|a| a.split('/').next())
                .map(str::to_owned)
        })
        .collect()
}

const REGISTRY: &str = r#"
const https = require('https');
const get = (opts) => new Promise(res => {
  const r = https.get({ path: '/is-number', timeout: 8000, ...opts }, x => {
    let body = ''; x.on('data', d => body += d);
    x.on('end', () => { try { res('ok ' + JSON.parse(body).name); } catch (e) { res('status ' + x.statusCode); } });
  });
  r.on('timeout', () => { r.destroy(); res('timeout'); });
  r.on('error', e => res(e.code));
});
(async () => {
  const byName = await get({ host: 'registry.npmjs.org' });
  const byIp = IP ? await get({ host: IP, servername: 'registry.npmjs.org', headers: { host: 'registry.npmjs.org' } }) : null;
  console.log(JSON.stringify({ byName, byIp }));
})();
"#;

/// Outbound internet (the npm registry) works by default, and `sandbox_internet = false`
/// turns it off, by name and by address.
#[tokio::test]
async fn internet_is_reachable_by_default_and_off_when_configured() {
    let registry_ip = std::net::ToSocketAddrs::to_socket_addrs(&("registry.npmjs.org", 443))
        .ok()
        .and_then(|mut a| a.find(|a| a.is_ipv4()))
        .map(|a| a.ip().to_string());
    let ip = registry_ip
        .map(|i| format!("'{i}'"))
        .unwrap_or("null".into());
    let code = REGISTRY.replace("IP", &ip);

    let on = spawn_app().await;
    let v = js(&on, "i1", &code).await;
    assert_eq!(v["byName"], "ok is-number", "{v}");

    let off = spawn_app_with(|t| {
        t.insert("sandbox_internet".into(), false.into());
    })
    .await;
    let v = js(&off, "i2", &code).await;
    assert!(
        !v["byName"].as_str().unwrap().starts_with("ok"),
        "internet reachable with sandbox_internet = false: {v}"
    );
    if !v["byIp"].is_null() {
        assert!(!v["byIp"].as_str().unwrap().starts_with("ok"), "{v}");
    }
}

fn rules_of(instance: &str) -> String {
    let out = Command::new("iptables").args(["-S"]).output().unwrap();
    let (cin, cfw) = sandboxd::sandbox::firewall::chain_names(instance);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&cin) || l.contains(&cfw))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The rules are installed at start-up, replace stale copies (and stale hooks) on restart,
/// stay while sandboxes live on after a shutdown, and go at a shutdown with none live.
#[tokio::test]
async fn firewall_rules_are_replaced_at_start_up_and_removed_at_shutdown() {
    let mut app = spawn_app_with(|t| {
        t.insert("http_addr".into(), "0.0.0.0:0".into());
    })
    .await;
    let port = app.addr.port();
    talk_over_loopback(&mut app, port);
    let instance = app.instance.clone();
    let (cin, cfw) = sandboxd::sandbox::firewall::chain_names(&instance);
    let rules = rules_of(&instance);
    assert_eq!(rules.matches(&format!("-j {cin}")).count(), 1, "{rules}");
    assert_eq!(rules.matches(&format!("-j {cfw}")).count(), 1, "{rules}");
    app.init("fw").await;
    let cfg = (**app.running.as_ref().unwrap().config()).clone();

    // Shut down with a live sandbox: it keeps running, and stays confined.
    app.shutdown().await;
    assert_eq!(rules_of(&instance), rules, "rules changed at shutdown");

    // Stale state: a rule that would let everything through and a hook for an old bridge.
    for args in [
        vec!["-I", cin.as_str(), "1", "-j", "ACCEPT"],
        vec![
            "-I",
            "INPUT",
            "1",
            "-i",
            "br-000000000000",
            "-j",
            cin.as_str(),
        ],
        vec![
            "-I",
            "DOCKER-USER",
            "1",
            "-i",
            "br-000000000000",
            "-j",
            cfw.as_str(),
        ],
    ] {
        assert!(Command::new("iptables")
            .args(&args)
            .status()
            .unwrap()
            .success());
    }
    // Restart: the rules are exactly the fresh ones again.
    let mut cfg2 = cfg.clone();
    cfg2.http_addr = Some("0.0.0.0:0".parse().unwrap());
    let running = sandboxd::startup::build(cfg2).await.expect("restart");
    assert_eq!(rules_of(&instance), rules);
    let port = running.http_addr.unwrap().port();
    // And they work for the adopted sandbox.
    let gw = gateway(&instance);
    app.running = Some(running);
    talk_over_loopback(&mut app, port);
    let v = probe(&app, "fw", json!([["gw", "tcp", gw.to_string(), port]])).await;
    assert_ne!(v["gw"], "connected", "{v}");

    // No live sandbox left: shutdown removes the chains and their hooks.
    let r = app.post("fw", "/sandbox/exit", json!({})).await;
    assert_eq!(r.status(), 200);
    app.shutdown().await;
    assert_eq!(rules_of(&instance), "", "rules left after shutdown");
}
