//! The node engines over TLS with client certificates: the lab's engines listen on
//! `https://10.97.0.1N:2376` with `--tlsverify`, edge 2 reaches managers and nodes there (so the
//! whole suite through edge 2 runs over TLS, and this checks it really does), the endpoints
//! refuse a client without a certificate, and sandboxd refuses to start, with a message naming
//! the URL and the file, when its client certificate comes from another CA, when the engine's
//! does, or when a file of `swarm_tls_dir` is missing.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sandboxd_swarm_tests::{eventually, Lab};

const NODES: [&str; 3] = ["10.97.0.11", "10.97.0.12", "10.97.0.13"];
const TLS_PORT: u16 = 2376;

fn edge_pid(n: usize) -> String {
    let pid = std::fs::read_to_string(format!("/run/sbxlab/edge{n}.pid"))
        .unwrap_or_else(|e| panic!("edge {n}'s pid file: {e}"));
    pid.trim().to_owned()
}

/// The environment edge `n` runs with (`KEY=VALUE` lines), as the kernel has it.
fn edge_env(n: usize) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{}/environ", edge_pid(n)))
        .unwrap_or_else(|e| panic!("edge {n}'s environment: {e}"));
    raw.split(|b| *b == 0)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect()
}

/// The remote addresses of the ESTABLISHED TCP connections in edge `n`'s network namespace
/// (`/proc/<pid>/net/tcp` is that namespace's table).
fn established(n: usize) -> Vec<(std::net::Ipv4Addr, u16)> {
    let table = std::fs::read_to_string(format!("/proc/{}/net/tcp", edge_pid(n))).unwrap();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.get(3) != Some(&"01") {
                return None;
            }
            let (ip, port) = f.get(2)?.split_once(':')?;
            let ip = u32::from_str_radix(ip, 16).ok()?;
            let port = u16::from_str_radix(port, 16).ok()?;
            // The kernel prints the address as a little-endian word.
            Some((std::net::Ipv4Addr::from(ip.swap_bytes()), port))
        })
        .collect()
}

#[tokio::test]
async fn edge_2_reaches_managers_and_nodes_over_tls_and_edge_1_by_socket() {
    let lab = Lab::with_edges();
    let env2 = edge_env(2);
    for want in [
        "SANDBOXD_SWARM_MANAGERS=https://10.97.0.11:2376",
        "SANDBOXD_SWARM_NODE_ENGINE=https://{addr}:2376",
        "SANDBOXD_SWARM_TLS_DIR=/var/lib/sbxlab/tls/client",
    ] {
        assert!(env2.iter().any(|v| v == want), "edge 2 runs without {want}");
    }
    let env1 = edge_env(1);
    assert!(
        env1.iter()
            .any(|v| v == "SANDBOXD_SWARM_NODE_ENGINE=unix:///run/sbxlab/{hostname}.sock"),
        "edge 1 should reach the engines by their sockets"
    );
    // Edge 2 really talks to every node's TLS endpoint (it pings each engine every second).
    eventually(
        Duration::from_secs(10),
        "edge 2 connected to 10.97.0.11-13:2376",
        || async {
            let conns = established(2);
            NODES
                .iter()
                .all(|ip| conns.contains(&(ip.parse().unwrap(), TLS_PORT)))
                .then_some(())
        },
    )
    .await;
    assert!(
        !established(1).iter().any(|(_, p)| *p == TLS_PORT),
        "edge 1 uses TLS endpoints: {:?}",
        established(1)
    );
    // And it serves (the lab's other tests go through it too).
    let (s, body) = lab.get(1, "nobody", "/healthz").await;
    assert_eq!(s, 200, "{body}");
}

/// `curl` to a node's TLS endpoint (bounded), with the given extra arguments: whether it got
/// the engine's answer to `/_ping`.
fn curl_ping(url: &str, args: &[&str]) -> bool {
    Command::new("curl")
        .args(["-fsS", "--max-time", "5", "-o", "/dev/null"])
        .args(args)
        .arg(format!("{url}/_ping"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("curl is required")
        .success()
}

#[test]
fn the_engines_refuse_clients_without_a_certificate_of_the_lab_ca() {
    let tls = "/var/lib/sbxlab/tls/client";
    let ca = format!("{tls}/ca.pem");
    let (cert, key) = (format!("{tls}/cert.pem"), format!("{tls}/key.pem"));
    let rogue = Rogue::new();
    for ip in NODES {
        let url = format!("https://{ip}:{TLS_PORT}");
        assert!(
            curl_ping(&url, &["--cacert", &ca, "--cert", &cert, "--key", &key]),
            "{url} refused the lab's client certificate"
        );
        assert!(
            !curl_ping(&url, &["--cacert", &ca]),
            "{url} answered a client without a certificate"
        );
        let (rc, rk) = (rogue.path("cert.pem"), rogue.path("key.pem"));
        assert!(
            !curl_ping(&url, &["--cacert", &ca, "--cert", &rc, "--key", &rk]),
            "{url} answered a client certificate of another CA"
        );
    }
}

/// A CA of its own and a client certificate it signed, in a temporary folder.
struct Rogue {
    dir: tempfile::TempDir,
}

impl Rogue {
    fn new() -> Rogue {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "not the lab CA");
        let ca = (params.self_signed(&key).unwrap(), key);
        let ckey = rcgen::KeyPair::generate().unwrap();
        let mut cp = rcgen::CertificateParams::new(vec!["sandboxd".to_owned()]).unwrap();
        cp.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = cp.signed_by(&ckey, &ca.0, &ca.1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.0.pem()).unwrap();
        std::fs::write(dir.path().join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), ckey.serialize_pem()).unwrap();
        Rogue { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

/// Starts sandboxd (the edges' binary) from the host in swarm mode against n1's TLS endpoint
/// with `tls_dir`, on port 0 with its own SQLite store; it must exit non-zero within 60 s.
/// Returns its stderr.
fn start_fails(lab: &Lab, tls_dir: &Path) -> String {
    let bin = std::fs::read_to_string("/run/sbxlab/edge-bin")
        .expect("/run/sbxlab/edge-bin (the edges' binary, written by swarm-lab.sh)");
    let work = tempfile::tempdir().unwrap();
    let w = work.path().display().to_string();
    let mut child = Command::new(bin.trim())
        .arg("serve")
        .current_dir(work.path())
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("SANDBOXD_ENGINE", "swarm")
        .env("SANDBOXD_SWARM_MANAGERS", "https://10.97.0.11:2376")
        .env("SANDBOXD_SWARM_NODE_ENGINE", "https://{addr}:2376")
        .env("SANDBOXD_SWARM_TLS_DIR", tls_dir)
        .env("SANDBOXD_SWARM_NETWORK", &lab.overlay)
        .env("SANDBOXD_SWARM_EDGE_CIDR", &lab.edge_cidr)
        .env("SANDBOXD_INSTANCE", "sbxtlsprobe")
        .env("SANDBOXD_HTTP_ADDR", "127.0.0.1:0")
        .env("SANDBOXD_HTTPS_ADDR", "")
        .env("SANDBOXD_METRICS_ADDR", "")
        .env("SANDBOXD_DATABASE_URL", format!("sqlite://{w}/db.sqlite"))
        .env("SANDBOXD_AUTH_SECRET", "tls-probe-secret-0123456789abcdef")
        .env("SANDBOXD_WORKSPACES_DIR", format!("{w}/workspaces"))
        .env("SANDBOXD_CERTS_DIR", format!("{w}/certs"))
        .env("SANDBOXD_AUTH_SECRET_FILE", format!("{w}/auth-secret"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting sandboxd");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "sandboxd with swarm_tls_dir {} still runs after 60 s",
                tls_dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(
        !status.success(),
        "sandboxd started with {}: {err}",
        tls_dir.display()
    );
    err
}

#[test]
fn sandboxd_refuses_to_start_with_the_wrong_certificates_and_says_which() {
    let lab = Lab::with_edges();
    let lab_ca = std::fs::read("/var/lib/sbxlab/tls/client/ca.pem").unwrap();
    let rogue = Rogue::new();

    // A client certificate of another CA (the engine's is trusted): the engine refuses it.
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("ca.pem"), &lab_ca).unwrap();
    for f in ["cert.pem", "key.pem"] {
        std::fs::copy(rogue.path(f), d.path().join(f)).unwrap();
    }
    let err = start_fails(&lab, d.path());
    eprintln!("client certificate of another CA:\n{err}");
    assert!(
        err.contains("https://10.97.0.11:2376") && err.contains("cert.pem"),
        "the error names neither the URL nor the client certificate: {err}"
    );

    // The engine's certificate does not chain to ca.pem (another CA's): sandboxd refuses it.
    let err = start_fails(&lab, rogue.dir.path());
    eprintln!("engine certificate of another CA:\n{err}");
    assert!(
        err.contains("https://10.97.0.11:2376") && err.contains("ca.pem"),
        "the error names neither the URL nor ca.pem: {err}"
    );
    assert!(
        err.to_ascii_lowercase().contains("certificate"),
        "the error does not say the certificate was refused: {err}"
    );

    // A file missing: named, before any connection.
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("ca.pem"), &lab_ca).unwrap();
    std::fs::copy(rogue.path("cert.pem"), d.path().join("cert.pem")).unwrap();
    let err = start_fails(&lab, d.path());
    eprintln!("key.pem missing:\n{err}");
    assert!(
        err.contains("swarm_tls_dir") && err.contains("key.pem"),
        "the error does not name the missing key.pem: {err}"
    );
}
