//! Engine endpoints of swarm mode: the URL forms sandboxd accepts for a manager's or a node's
//! engine, and the TLS client material of `swarm_tls_dir` (Docker's own `--tlsverify` layout:
//! `ca.pem`, `cert.pem`, `key.pem`).
//!
//! - `unix:///path`: the engine's socket (one machine, the lab's edge 1).
//! - `https://host[:port]`, or `tcp://host[:port]` (as Docker writes it), only with
//!   `swarm_tls_dir`: TLS to the engine, whose certificate must chain to `ca.pem` and name the
//!   host (a DNS name or IP address SAN); sandboxd presents `cert.pem`/`key.pem`, which the
//!   engine checks against its own `--tlscacert`. Only `ca.pem` is trusted (no system roots).
//!   The port defaults to 2376, Docker's TLS port.
//!
//! Plain TCP (`tcp://` without a TLS dir, `http://`) is refused: whoever reaches an engine API
//! without TLS owns the node.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Docker's TLS port (`dockerd -H tcp://0.0.0.0:2376 --tlsverify`).
pub const DEFAULT_TLS_PORT: u16 = 2376;
/// Bound on a TCP connect to an engine (a cut-off node must not hold a caller longer).
pub const CONNECT_WITHIN: Duration = Duration::from_secs(5);
/// Largest PEM file read from the TLS dir.
const MAX_PEM: u64 = 1 << 20;

/// Where an engine is reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A unix socket path.
    Unix(String),
    /// TLS with client certificates; `host` is an IP address (IPv6 without brackets) or a DNS
    /// name.
    Tls { host: String, port: u16 },
}

impl Endpoint {
    /// Parses an engine URL; `tls` says whether a TLS dir is configured (TCP URLs need one).
    pub fn parse(url: &str, tls: bool) -> Result<Endpoint, String> {
        if let Some(path) = url.strip_prefix("unix://") {
            if !path.starts_with('/') || path.contains(char::is_whitespace) {
                return Err(format!(
                    "{url:?} is not an engine URL like unix:///run/docker.sock"
                ));
            }
            return Ok(Endpoint::Unix(path.to_owned()));
        }
        let rest = match url.split_once("://") {
            Some(("https" | "tcp", rest)) => rest,
            Some(("http", _)) => {
                return Err(format!(
                    "{url:?}: plain HTTP to an engine is refused (use https:// with swarm_tls_dir)"
                ))
            }
            _ => {
                return Err(format!(
                    "{url:?} is not an engine URL (unix:///path, or https://host:2376 with swarm_tls_dir)"
                ))
            }
        };
        if !tls {
            return Err(format!(
                "{url:?} needs swarm_tls_dir (ca.pem, cert.pem, key.pem): engines are reached over TCP only with TLS and a client certificate"
            ));
        }
        let hostport = rest.strip_suffix('/').unwrap_or(rest);
        if hostport.is_empty()
            || hostport
                .bytes()
                .any(|b| matches!(b, b'/' | b'?' | b'#' | b'@') || b.is_ascii_whitespace())
        {
            return Err(format!(
                "{url:?} is not an engine URL like https://host:2376 (no path, query or user)"
            ));
        }
        let (host, port) = split_host_port(hostport)
            .ok_or_else(|| format!("{url:?} is not an engine URL like https://host:2376"))?;
        Ok(Endpoint::Tls { host, port })
    }

    /// The base URL of a TLS endpoint (`https://host:port`, IPv6 in brackets).
    pub fn https_base(&self) -> Option<String> {
        match self {
            Endpoint::Unix(_) => None,
            Endpoint::Tls { host, port } if host.contains(':') => {
                Some(format!("https://[{host}]:{port}"))
            }
            Endpoint::Tls { host, port } => Some(format!("https://{host}:{port}")),
        }
    }
}

/// `host[:port]` / `[v6][:port]` → (host, port); the host must be an IP address or a DNS name.
fn split_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = if let Some(v6) = s.strip_prefix('[') {
        let (h, after) = v6.split_once(']')?;
        h.parse::<std::net::Ipv6Addr>().ok()?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?),
        };
        (h, port)
    } else {
        match s.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    let port = match port {
        None => DEFAULT_TLS_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => return None,
        },
    };
    let ok = host.parse::<IpAddr>().is_ok()
        || (host.len() <= 253
            && host.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && !l.starts_with('-')
                    && !l.ends_with('-')
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            }));
    ok.then(|| (host.to_ascii_lowercase(), port))
}

/// The TLS client material of `swarm_tls_dir`, loaded and checked once at start-up.
pub struct EngineTls {
    dir: PathBuf,
    config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for EngineTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineTls").field("dir", &self.dir).finish()
    }
}

impl EngineTls {
    /// Reads `ca.pem` (the CA the engines' certificates chain to; the only trusted root),
    /// `cert.pem` (sandboxd's client certificate, then any intermediates) and `key.pem` (its
    /// private key). Every error names the file.
    pub fn load(dir: &Path) -> anyhow::Result<EngineTls> {
        let file = |name: &str| -> anyhow::Result<(PathBuf, Vec<u8>)> {
            use std::io::Read;
            let path = dir.join(name);
            let f = std::fs::File::open(&path)
                .with_context(|| format!("swarm_tls_dir: cannot read {}", path.display()))?;
            let mut buf = Vec::new();
            f.take(MAX_PEM + 1)
                .read_to_end(&mut buf)
                .with_context(|| format!("swarm_tls_dir: cannot read {}", path.display()))?;
            if buf.len() as u64 > MAX_PEM {
                bail!(
                    "swarm_tls_dir: {} is larger than {MAX_PEM} bytes",
                    path.display()
                );
            }
            Ok((path, buf))
        };
        let certs = |path: &Path, pem: &[u8]| -> anyhow::Result<Vec<CertificateDer<'static>>> {
            let list = rustls_pemfile::certs(&mut &pem[..])
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("swarm_tls_dir: {} is not valid PEM", path.display()))?;
            if list.is_empty() {
                bail!(
                    "swarm_tls_dir: {} holds no certificate (-----BEGIN CERTIFICATE-----)",
                    path.display()
                );
            }
            Ok(list)
        };
        let (ca_path, ca_pem) = file("ca.pem")?;
        let mut roots = rustls::RootCertStore::empty();
        for c in certs(&ca_path, &ca_pem)? {
            roots.add(c).with_context(|| {
                format!(
                    "swarm_tls_dir: {} holds a certificate that is not a usable CA",
                    ca_path.display()
                )
            })?;
        }
        let (cert_path, cert_pem) = file("cert.pem")?;
        let chain = certs(&cert_path, &cert_pem)?;
        let (key_path, key_pem) = file("key.pem")?;
        let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &key_pem[..])
            .with_context(|| format!("swarm_tls_dir: {} is not valid PEM", key_path.display()))?
            .ok_or_else(|| {
                anyhow!(
                    "swarm_tls_dir: {} holds no private key (PKCS#8, PKCS#1 or SEC1 PEM)",
                    key_path.display()
                )
            })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let signing = provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| anyhow!("swarm_tls_dir: {}: {e}", key_path.display()))?;
        let certified = rustls::sign::CertifiedKey::new(chain.clone(), signing);
        certified.keys_match().map_err(|e| {
            anyhow!(
                "swarm_tls_dir: {} is not the key of {} ({e})",
                key_path.display(),
                cert_path.display()
            )
        })?;
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| anyhow!("TLS versions: {e}"))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| {
                anyhow!(
                    "swarm_tls_dir: {} with {}: {e}",
                    cert_path.display(),
                    key_path.display()
                )
            })?;
        Ok(EngineTls {
            dir: dir.to_owned(),
            config: Arc::new(config),
        })
    }

    /// The folder the material came from (named in errors).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The client configuration: only `ca.pem` trusted, the client certificate presented.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.config.clone()
    }

    /// A TLS connection to `host:port` (TCP connect bounded by [`CONNECT_WITHIN`]), the
    /// engine's certificate verified for `host`.
    pub async fn connect(&self, host: &str, port: u16) -> anyhow::Result<TlsStream<TcpStream>> {
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| anyhow!("{host:?} is not a TLS server name: {e}"))?;
        let tcp = tokio::time::timeout(CONNECT_WITHIN, TcpStream::connect((host, port)))
            .await
            .map_err(|_| {
                anyhow!("connecting to {host}:{port}: no answer within {CONNECT_WITHIN:?}")
            })?
            .with_context(|| format!("connecting to {host}:{port}"))?;
        tcp.set_nodelay(true).ok();
        tokio_rustls::TlsConnector::from(self.client_config())
            .connect(name, tcp)
            .await
            .with_context(|| format!("TLS handshake with {host}:{port}"))
    }

    /// Connects and asks `GET /_ping`, reading the first bytes of the answer: when an engine
    /// refuses the client certificate (TLS 1.3 says so after the handshake, at the first read)
    /// this names the TLS alert, where an HTTP client only sees a closed connection. Bounded.
    pub async fn probe(&self, host: &str, port: u16) -> anyhow::Result<()> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let work = async {
            let mut s = self.connect(host, port).await?;
            s.write_all(
                format!("GET /_ping HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).await?;
            if n == 0 {
                bail!("the engine closed the connection without an answer");
            }
            anyhow::Ok(())
        };
        tokio::time::timeout(CONNECT_WITHIN * 2, work)
            .await
            .map_err(|_| anyhow!("no answer within {:?}", CONNECT_WITHIN * 2))?
    }

    /// What a failed handshake means, naming the files involved.
    pub fn refused(&self, host: &str, port: u16) -> String {
        format!(
            "TLS with the engine at {host}:{port} failed (its certificate must chain to {ca} and name {host}; it must accept the client certificate {cert})",
            ca = self.dir.join("ca.pem").display(),
            cert = self.dir.join("cert.pem").display(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls(host: &str, port: u16) -> Endpoint {
        Endpoint::Tls {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn engine_urls_parse() {
        assert_eq!(
            Endpoint::parse("unix:///run/docker.sock", false),
            Ok(Endpoint::Unix("/run/docker.sock".into()))
        );
        let ok = [
            ("https://10.97.0.11:2376", tls("10.97.0.11", 2376)),
            ("https://10.97.0.11:2376/", tls("10.97.0.11", 2376)),
            ("tcp://10.97.0.11:2376", tls("10.97.0.11", 2376)),
            (
                "https://node-1.example.com",
                tls("node-1.example.com", 2376),
            ),
            (
                "https://Node1.Example.COM:12376",
                tls("node1.example.com", 12376),
            ),
            ("https://[fd00::1]:2376", tls("fd00::1", 2376)),
            ("https://[fd00::1]", tls("fd00::1", 2376)),
        ];
        for (url, want) in ok {
            assert_eq!(Endpoint::parse(url, true), Ok(want.clone()), "{url}");
        }
        assert_eq!(
            tls("fd00::1", 2376).https_base().unwrap(),
            "https://[fd00::1]:2376"
        );
        assert_eq!(
            tls("10.0.0.1", 1).https_base().unwrap(),
            "https://10.0.0.1:1"
        );
        for bad in [
            "unix://run/docker.sock",
            "unix:///run/a b.sock",
            "http://10.0.0.1:2375",
            "ssh://root@10.0.0.1",
            "10.0.0.1:2376",
            "https://",
            "https://10.0.0.1:2376/v1.41",
            "https://10.0.0.1:2376?x=1",
            "https://user@10.0.0.1:2376",
            "https://10.0.0.1:0",
            "https://10.0.0.1:99999",
            "https://10.0.0.1:+1",
            "https://10.0.0.1:",
            "https://[fd00::1",
            "https://[nothost]:2376",
            "https://-bad.example:2376",
            "https://a..b:2376",
            "https://a_b:2376",
            "https://a b:2376",
        ] {
            assert!(Endpoint::parse(bad, true).is_err(), "{bad} was accepted");
        }
        // Without a TLS dir: TCP URLs are refused, naming the key.
        for url in ["tcp://10.0.0.1:2376", "https://10.0.0.1:2376"] {
            let err = Endpoint::parse(url, false).unwrap_err();
            assert!(err.contains("swarm_tls_dir"), "{err}");
        }
    }

    /// A CA, and a certificate it signed for `names` (client or server).
    fn issue(ca: &(rcgen::Certificate, rcgen::KeyPair), names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &ca.0, &ca.1).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn new_ca(name: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        (cert, key)
    }

    fn write(dir: &Path, files: &[(&str, &str)]) {
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap();
        }
    }

    #[test]
    fn tls_dir_loads_and_names_the_file_at_fault() {
        let ca = new_ca("engines");
        let (cert, key) = issue(&ca, &["sandboxd"]);
        let (_, other_key) = issue(&ca, &["other"]);
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let err = |d: &Path| format!("{:#}", EngineTls::load(d).unwrap_err());

        // Missing files, one at a time, each named.
        let e = err(d);
        assert!(e.contains("ca.pem") && e.contains("cannot read"), "{e}");
        write(d, &[("ca.pem", &ca.0.pem())]);
        let e = err(d);
        assert!(e.contains("cert.pem") && e.contains("cannot read"), "{e}");
        write(d, &[("cert.pem", &cert)]);
        let e = err(d);
        assert!(e.contains("key.pem") && e.contains("cannot read"), "{e}");
        write(d, &[("key.pem", &key)]);
        let tls = EngineTls::load(d).unwrap();
        assert_eq!(tls.dir(), d);
        assert!(format!("{tls:?}").contains("EngineTls"));

        // Files that hold the wrong thing.
        write(d, &[("ca.pem", "not pem")]);
        let e = err(d);
        assert!(e.contains("ca.pem") && e.contains("no certificate"), "{e}");
        write(d, &[("ca.pem", &ca.0.pem()), ("cert.pem", &key)]);
        let e = err(d);
        assert!(
            e.contains("cert.pem") && e.contains("no certificate"),
            "{e}"
        );
        write(d, &[("cert.pem", &cert), ("key.pem", &cert)]);
        let e = err(d);
        assert!(e.contains("key.pem") && e.contains("no private key"), "{e}");
        write(d, &[("key.pem", &other_key)]);
        let e = err(d);
        assert!(
            e.contains("key.pem") && e.contains("is not the key of") && e.contains("cert.pem"),
            "{e}"
        );
        // Unreadable: a folder where the file should be.
        std::fs::remove_file(d.join("key.pem")).unwrap();
        std::fs::create_dir(d.join("key.pem")).unwrap();
        let e = err(d);
        assert!(e.contains("key.pem"), "{e}");
    }

    /// A real handshake on loopback: an engine-like TLS server that requires a client
    /// certificate from its CA accepts sandboxd's, and refuses one from another CA; sandboxd
    /// refuses a server whose certificate another CA signed.
    #[tokio::test]
    async fn handshakes_need_both_certificates_from_the_ca() {
        let ca = new_ca("engines");
        let (srv_cert, srv_key) = issue(&ca, &["127.0.0.1"]);
        let (cli_cert, cli_key) = issue(&ca, &["sandboxd"]);
        let rogue = new_ca("another");
        let (rogue_cert, rogue_key) = issue(&rogue, &["sandboxd"]);
        let (rogue_srv_cert, rogue_srv_key) = issue(&rogue, &["127.0.0.1"]);

        let server = |cert: String, key: String| {
            let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap();
            let key = rustls_pemfile::private_key(&mut key.as_bytes())
                .unwrap()
                .unwrap();
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(CertificateDer::from(ca.0.der().to_vec()))
                .unwrap();
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider.clone(),
            )
            .build()
            .unwrap();
            let cfg = rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain, key)
                .unwrap();
            tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
        };
        // Serves one byte to every client it accepts.
        let serve = |acceptor: tokio_rustls::TlsAcceptor| async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            tokio::spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        use tokio::io::AsyncWriteExt;
                        if let Ok(mut s) = acceptor.accept(tcp).await {
                            let _ = s.write_all(b"!").await;
                            let _ = s.shutdown().await;
                        }
                    });
                }
            });
            port
        };
        let good = serve(server(srv_cert, srv_key)).await;
        let impostor = serve(server(rogue_srv_cert, rogue_srv_key)).await;

        let client = |cert: &str, key: &str| {
            let dir = tempfile::tempdir().unwrap();
            write(
                dir.path(),
                &[
                    ("ca.pem", &ca.0.pem()),
                    ("cert.pem", cert),
                    ("key.pem", key),
                ],
            );
            let tls = EngineTls::load(dir.path()).unwrap();
            (dir, tls)
        };
        // With TLS 1.3 a refused client certificate shows at the first read: the probe reads.
        let probe = |tls: &EngineTls, port: u16| {
            let tls = EngineTls {
                dir: tls.dir.clone(),
                config: tls.config.clone(),
            };
            async move { tls.probe("127.0.0.1", port).await }
        };
        let within = Duration::from_secs(10);
        let (_d1, ours) = client(&cli_cert, &cli_key);
        let got = tokio::time::timeout(within, probe(&ours, good)).await;
        got.unwrap().unwrap();

        let (_d2, theirs) = client(&rogue_cert, &rogue_key);
        let got = tokio::time::timeout(within, probe(&theirs, good)).await;
        let e = format!("{:#}", got.unwrap().unwrap_err());
        assert!(
            e.contains("alert"),
            "a client certificate of another CA: {e}"
        );

        let got = tokio::time::timeout(within, probe(&ours, impostor)).await;
        let e = format!("{:#}", got.unwrap().unwrap_err());
        assert!(
            e.contains("UnknownIssuer"),
            "an engine certificate of another CA: {e}"
        );
        let why = ours.refused("127.0.0.1", impostor);
        assert!(why.contains("ca.pem") && why.contains("cert.pem"), "{why}");
    }
}
