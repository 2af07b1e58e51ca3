//! TLS material: loading certificate/key pairs from a directory, choosing one by SNI, generating
//! development certificates, and reloading when the files change.
//!
//! Invariant: once a certificate has been served, a broken file on disk never takes it away. A
//! reload that cannot parse a pair keeps that pair's previous version (certbot and editors write
//! files non-atomically, and a half-written key must not turn into a TLS outage), and a reload
//! that finds nothing usable keeps everything as it was.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{bail, Context};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;

use super::router::normalize_host;

/// The file stem of the development CA; pairs with this stem are never served.
pub const DEV_CA_STEM: &str = "dev-ca";
/// The file stem of the development server certificate.
pub const DEV_CERT_STEM: &str = "dev";

/// Certificate and key files larger than this are not certificates; refusing them early keeps a
/// stray large file in the directory from being read into memory on every reload.
const MAX_PEM_BYTES: u64 = 1024 * 1024;
/// The reloader never polls faster than this, whatever it is asked (and `interval` panics on 0).
const MIN_RELOAD_EVERY: Duration = Duration::from_millis(100);
/// Development CA lifetime: long, because the user trusts it by hand once.
const DEV_CA_DAYS: i64 = 3650;
/// Development server certificate lifetime: under Apple's 825-day cap for TLS server
/// certificates, which applies even to locally trusted roots.
const DEV_CERT_DAYS: i64 = 800;

/// One servable certificate.
#[derive(Debug, Clone)]
struct Entry {
    /// The file stem (`<stem>.crt` + `<stem>.key`), the identity of this entry across reloads.
    stem: String,
    /// Lowercase DNS names from the leaf's subjectAltName; `*.x.y` for wildcards.
    names: Vec<String>,
    key: Arc<CertifiedKey>,
}

/// The server's certificates, resolved by SNI. Cheap to read on every handshake: a read lock
/// around an `Arc` that a reload swaps whole.
#[derive(Debug, Default)]
pub struct CertStore {
    entries: RwLock<Arc<Vec<Entry>>>,
}

impl CertStore {
    /// Loads every `<name>.crt` + `<name>.key` pair in `dir`. Fails if none is usable.
    pub fn load_from_dir(dir: &Path) -> anyhow::Result<Self> {
        let store = Self::default();
        store.reload_from_dir(dir)?;
        Ok(store)
    }

    /// Re-reads `dir` and swaps in the result; returns how many certificates are now served.
    ///
    /// A pair that fails to load keeps its previously loaded version, if any; a pair whose files
    /// are gone is dropped. When nothing usable remains, returns an error and changes nothing.
    pub fn reload_from_dir(&self, dir: &Path) -> anyhow::Result<usize> {
        let previous = self.snapshot();
        let mut next = Vec::new();
        for (stem, loaded) in scan_dir(dir)? {
            match loaded {
                Ok(Some(entry)) => next.push(entry),
                // A CA certificate (the development CA, or a chain file): not for serving.
                Ok(None) => {}
                Err(e) => match previous.iter().find(|p| p.stem == stem) {
                    Some(old) => {
                        tracing::warn!(dir = %dir.display(), %stem, error = format!("{e:#}"),
                            "certificate pair failed to load; keeping the previous one");
                        next.push(old.clone());
                    }
                    None => {
                        tracing::warn!(dir = %dir.display(), %stem, error = format!("{e:#}"),
                            "certificate pair failed to load; skipped");
                    }
                },
            }
        }
        if next.is_empty() {
            bail!("no usable certificate/key pair in {}", dir.display());
        }
        let count = next.len();
        *self
            .entries
            .write()
            // A panic while holding the lock cannot leave the Arc half-written; carry on.
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(next);
        Ok(count)
    }

    /// All names served, for the start-up log.
    pub fn names(&self) -> Vec<String> {
        self.snapshot()
            .iter()
            .flat_map(|e| e.names.iter().cloned())
            .collect()
    }

    /// The certificate for an SNI value: an exact name first, then a one-label wildcard
    /// (`*.preview.localhost` matches `user-1.preview.localhost`, not `a.user-1.preview…` nor
    /// `preview.localhost`). Without SNI (clients connecting to an IP address) the first pair in
    /// file-name order is served. An SNI nothing matches gets no certificate, which aborts the
    /// handshake: serving some other name's certificate would only move the error to the client
    /// and advertise which names this server has.
    pub fn resolve_name(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let entries = self.snapshot();
        let Some(sni) = sni else {
            return entries.first().map(|e| e.key.clone());
        };
        let name = sni.to_ascii_lowercase();
        let name = name.strip_suffix('.').unwrap_or(&name);
        if let Some(e) = entries.iter().find(|e| e.names.iter().any(|n| n == name)) {
            return Some(e.key.clone());
        }
        let (_, parent) = name.split_once('.')?;
        let wildcard = format!("*.{parent}");
        entries
            .iter()
            .find(|e| e.names.contains(&wildcard))
            .map(|e| e.key.clone())
    }

    fn snapshot(&self) -> Arc<Vec<Entry>> {
        self.entries
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.resolve_name(client_hello.server_name())
    }
}

/// The process's TLS server configuration: certificates from `store`, ALPN `h2` then
/// `http/1.1`, ring as the crypto provider (named explicitly so that another crate enabling
/// aws-lc-rs cannot make the default provider ambiguous), and session tickets so reconnecting
/// browsers skip a full handshake.
pub fn server_config(store: Arc<CertStore>) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_cert_resolver(store);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    cfg.ticketer = rustls::crypto::ring::Ticketer::new().context("TLS session ticketer")?;
    Ok(Arc::new(cfg))
}

fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// Every `*.crt` in `dir` (sorted by stem, which fixes the no-SNI fallback) with the result of
/// loading it and its `.key`. `Ok(None)` marks a CA certificate.
fn scan_dir(dir: &Path) -> anyhow::Result<Vec<(String, anyhow::Result<Option<Entry>>)>> {
    let mut stems = Vec::new();
    for item in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = item
            .with_context(|| format!("reading {}", dir.display()))?
            .path();
        if path.extension().and_then(|e| e.to_str()) != Some("crt") {
            continue;
        }
        if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
            stems.push(stem.to_owned());
        }
    }
    stems.sort();
    Ok(stems
        .into_iter()
        .map(|stem| {
            let loaded = load_pair(dir, &stem);
            (stem, loaded)
        })
        .collect())
}

fn load_pair(dir: &Path, stem: &str) -> anyhow::Result<Option<Entry>> {
    let crt_path = dir.join(format!("{stem}.crt"));
    let key_path = dir.join(format!("{stem}.key"));
    let crt_pem = read_small(&crt_path)?;
    let chain = rustls_pemfile::certs(&mut crt_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", crt_path.display()))?;
    let Some(leaf) = chain.first() else {
        bail!("no certificate in {}", crt_path.display());
    };
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| anyhow::anyhow!("parsing {}: {e}", crt_path.display()))?;
    if parsed.is_ca() {
        tracing::debug!(path = %crt_path.display(), "CA certificate; not served");
        return Ok(None);
    }
    let names = san_names(&parsed).with_context(|| format!("reading {}", crt_path.display()))?;
    if !parsed.validity().is_valid() {
        // Still served: a client then reports "expired", which points at the fix, whereas a
        // missing certificate looks like a network problem.
        tracing::warn!(path = %crt_path.display(), "certificate is expired or not yet valid");
    }

    let key_pem = read_small(&key_path)?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .with_context(|| format!("parsing {}", key_path.display()))?
        .with_context(|| format!("no private key in {}", key_path.display()))?;
    // `from_der` also checks that the key belongs to the leaf, so a renewal caught between
    // writing the new certificate and the new key keeps the old pair instead of serving a
    // certificate nobody can complete a handshake with.
    let key = CertifiedKey::from_der(chain, key, &provider()).with_context(|| {
        format!(
            "{} does not match {}",
            key_path.display(),
            crt_path.display()
        )
    })?;
    Ok(Some(Entry {
        stem: stem.to_owned(),
        names,
        key: Arc::new(key),
    }))
}

fn read_small(path: &Path) -> anyhow::Result<Vec<u8>> {
    let len = fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    if len > MAX_PEM_BYTES {
        bail!(
            "{} is {len} bytes; too large for a PEM file",
            path.display()
        );
    }
    fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// DNS names from subjectAltName, lowercased, each a valid host name or `*.` + one. The
/// subject CN is ignored, as browsers do. A certificate with only IP addresses is still loaded
/// (it can serve SNI-less clients); one with neither is refused.
fn san_names(cert: &x509_parser::certificate::X509Certificate<'_>) -> anyhow::Result<Vec<String>> {
    use x509_parser::extensions::GeneralName;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| anyhow::anyhow!("subjectAltName: {e}"))?
        .context("certificate has no subjectAltName")?;
    let mut names = Vec::new();
    let mut has_ip = false;
    for general_name in &san.value.general_names {
        match general_name {
            GeneralName::DNSName(raw) => {
                let lower = raw.to_ascii_lowercase();
                let (wild, base) = match lower.strip_prefix("*.") {
                    Some(base) => (true, base),
                    None => (false, lower.as_str()),
                };
                match normalize_host(base) {
                    Some(n) if n.parse::<IpAddr>().is_err() => {
                        names.push(if wild { format!("*.{n}") } else { n })
                    }
                    _ => tracing::warn!(name = %raw, "ignoring unusable DNS name in certificate"),
                }
            }
            GeneralName::IPAddress(_) => has_ip = true,
            _ => {}
        }
    }
    if names.is_empty() && !has_ip {
        bail!("certificate has no DNS name or IP address in subjectAltName");
    }
    Ok(names)
}

/// Makes sure `dir` holds something to serve in development.
///
/// If `dir` has no server certificate (`*.crt` other than `dev-ca.crt`), writes `dev.crt` +
/// `dev.key` for `names` (`localhost`, `*.preview.localhost`, `127.0.0.1` … — IP addresses
/// become IP SANs), signed by a local CA `dev-ca.crt` + `dev-ca.key`. An existing development CA
/// is reused, so deleting `dev.crt`/`dev.key` to change the names does not make the user trust a
/// new CA. Returns the CA certificate's path whenever the directory holds one (generated now or
/// earlier), so the caller can print how to trust it; `None` means the directory only has
/// operator-provided certificates.
///
/// Only touches files directly inside `dir`. Files are created with `create_new`, which never
/// follows a symlink and never overwrites: a leftover half of a pair is an error to resolve by
/// hand, not something to clobber. Keys are written with mode 0600.
///
/// Rejected alternative: name constraints on the CA (limiting what a leaked dev CA key could
/// sign). They would make the reused CA refuse a later, different set of names, and the key
/// stays on the developer's own disk next to the server key anyway.
pub fn ensure_dev_certs(dir: &Path, names: &[String]) -> anyhow::Result<Option<PathBuf>> {
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let ca_crt = dir.join(format!("{DEV_CA_STEM}.crt"));
    let ca_key = dir.join(format!("{DEV_CA_STEM}.key"));
    let has_server_cert = scan_crt_stems(dir)?.iter().any(|s| s != DEV_CA_STEM);
    if has_server_cert {
        return Ok(ca_crt.is_file().then_some(ca_crt));
    }
    if names.is_empty() {
        bail!("no names given for the development certificate");
    }
    for n in names {
        let base = n.strip_prefix("*.").unwrap_or(n);
        if normalize_host(base).is_none() {
            bail!("{n:?} is not a valid name for a development certificate");
        }
    }

    let (ca_cert, ca_keypair) = match (exists_nofollow(&ca_crt), exists_nofollow(&ca_key)) {
        (true, true) => load_dev_ca(&ca_crt, &ca_key)?,
        (false, false) => {
            let (cert, key) = new_dev_ca()?;
            write_new(&ca_key, key.serialize_pem().as_bytes(), 0o600)?;
            write_new(&ca_crt, cert.pem().as_bytes(), 0o644)?;
            tracing::info!(path = %ca_crt.display(), "generated a development CA");
            (cert, key)
        }
        _ => bail!(
            "{} and {} must both exist or both be absent; remove the one that is left",
            ca_crt.display(),
            ca_key.display()
        ),
    };

    let leaf_key = rcgen::KeyPair::generate().context("generating a key")?;
    let mut params =
        rcgen::CertificateParams::new(names.to_vec()).context("development certificate names")?;
    let cn = names
        .iter()
        .find(|n| !n.starts_with("*."))
        .or(names.first())
        .context("no names given for the development certificate")?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn.as_str());
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, DEV_CERT_DAYS);
    let leaf = params
        .signed_by(&leaf_key, &ca_cert, &ca_keypair)
        .context("signing the development certificate")?;
    write_new(
        &dir.join(format!("{DEV_CERT_STEM}.key")),
        leaf_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    // The leaf alone: clients that trust the CA have it already, and sending a root in the
    // chain only costs bytes on every handshake.
    write_new(
        &dir.join(format!("{DEV_CERT_STEM}.crt")),
        leaf.pem().as_bytes(),
        0o644,
    )?;
    tracing::info!(dir = %dir.display(), ?names, "generated a development certificate");
    Ok(Some(ca_crt))
}

fn scan_crt_stems(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut stems = Vec::new();
    for item in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = item
            .with_context(|| format!("reading {}", dir.display()))?
            .path();
        if path.extension().and_then(|e| e.to_str()) == Some("crt") {
            if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                stems.push(stem.to_owned());
            }
        }
    }
    Ok(stems)
}

/// True also for a dangling symlink, which `Path::exists` would call absent.
fn exists_nofollow(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

fn new_dev_ca() -> anyhow::Result<(rcgen::Certificate, rcgen::KeyPair)> {
    let key = rcgen::KeyPair::generate().context("generating the CA key")?;
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "sandboxd development CA");
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "sandboxd");
    // Path length 0: this CA signs server certificates, never another CA.
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, DEV_CA_DAYS);
    let cert = params
        .self_signed(&key)
        .context("self-signing the development CA")?;
    Ok((cert, key))
}

/// An existing development CA, as an rcgen issuer. Re-self-signing its parameters yields an
/// equivalent certificate object whose subject and key identifier match the file, which is all
/// `signed_by` uses.
fn load_dev_ca(crt: &Path, key: &Path) -> anyhow::Result<(rcgen::Certificate, rcgen::KeyPair)> {
    let crt_pem = String::from_utf8(read_small(crt)?)
        .with_context(|| format!("{} is not PEM", crt.display()))?;
    let key_pem = String::from_utf8(read_small(key)?)
        .with_context(|| format!("{} is not PEM", key.display()))?;
    let keypair =
        rcgen::KeyPair::from_pem(&key_pem).with_context(|| format!("parsing {}", key.display()))?;
    let der = rustls_pemfile::certs(&mut crt_pem.as_bytes())
        .next()
        .with_context(|| format!("no certificate in {}", crt.display()))?
        .with_context(|| format!("parsing {}", crt.display()))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| anyhow::anyhow!("parsing {}: {e}", crt.display()))?;
    if parsed.public_key().raw != keypair.public_key_der().as_slice() {
        bail!("{} does not match {}", key.display(), crt.display());
    }
    let params = rcgen::CertificateParams::from_ca_cert_pem(&crt_pem)
        .with_context(|| format!("parsing {}", crt.display()))?;
    let cert = params
        .self_signed(&keypair)
        .with_context(|| format!("re-reading {}", crt.display()))?;
    Ok((cert, keypair))
}

fn set_validity(params: &mut rcgen::CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    // Backdated a day so a client whose clock runs a little behind still accepts it.
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(days);
    // Random serials: browsers reject a second certificate with the same issuer and serial,
    // which regenerating `dev.crt` under a reused CA would otherwise produce.
    let mut serial = [0u8; 16];
    rand::Rng::fill(&mut rand::thread_rng(), &mut serial);
    serial[0] &= 0x7f; // positive, as DER integers for serials must be
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
}

fn write_new(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

/// What the reloader compares between polls: name, size, mtime and inode of every `.crt` and
/// `.key` (following symlinks, so a certbot `live/` link that moves to a new target counts).
type Fingerprint = BTreeMap<String, (u64, i64, i64, u64)>;

fn fingerprint(dir: &Path) -> std::io::Result<Fingerprint> {
    let mut fp = BTreeMap::new();
    for item in fs::read_dir(dir)? {
        let path = item?.path();
        let ext = path.extension().and_then(|e| e.to_str());
        if !matches!(ext, Some("crt" | "key")) {
            continue;
        }
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        // A file that vanished or a dangling link still belongs in the picture, as "absent".
        let entry = match fs::metadata(&path) {
            Ok(m) => (m.len(), m.mtime(), m.mtime_nsec(), m.ino()),
            Err(_) => (0, 0, 0, 0),
        };
        fp.insert(name.to_owned(), entry);
    }
    Ok(fp)
}

/// Polls `dir` every `every` (at least 100 ms) and reloads `store` when a `.crt` or `.key`
/// changed. A failed reload keeps the last good certificates (see `reload_from_dir`) and is
/// retried at the next change. Stops when `shutdown` becomes true or its sender is dropped.
///
/// Polling, not inotify: it works the same on every filesystem and through symlinks, and a
/// certificate change is not latency-sensitive.
pub fn spawn_reloader(
    store: Arc<CertStore>,
    dir: PathBuf,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // The baseline is taken now, on the assumption that the caller has just loaded `store`
        // from `dir`.
        let mut last = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || fingerprint(&dir).ok())
                .await
                .ok()
                .flatten()
        };
        let mut tick = tokio::time::interval(every.max(MIN_RELOAD_EVERY));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate
        loop {
            if *shutdown.borrow_and_update() {
                return;
            }
            tokio::select! {
                _ = tick.tick() => {}
                changed = shutdown.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    continue;
                }
            }
            let (store, d) = (store.clone(), dir.clone());
            let prev = last.clone();
            let polled = tokio::task::spawn_blocking(move || {
                let now = fingerprint(&d);
                match &now {
                    Ok(fp) if Some(fp) == prev.as_ref() => {}
                    Ok(_) => match store.reload_from_dir(&d) {
                        Ok(n) => tracing::info!(dir = %d.display(), certificates = n,
                            "TLS certificates reloaded"),
                        Err(e) => tracing::warn!(dir = %d.display(), error = format!("{e:#}"),
                            "TLS reload failed; keeping the previous certificates"),
                    },
                    Err(e) => tracing::warn!(dir = %d.display(), error = %e,
                        "cannot read the certificate directory; keeping the previous certificates"),
                }
                now.ok()
            })
            .await;
            match polled {
                // An unreadable directory leaves the baseline as it was, so the reload happens
                // once it is readable again with different files.
                Ok(Some(fp)) => last = Some(fp),
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "TLS reload task failed"),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::listener::{self, ConnInfo, Handler, ListenerConfig};
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Incoming;
    use hyper::{Request, Response, StatusCode};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use std::os::unix::fs::PermissionsExt;
    use tokio::net::{TcpListener, TcpStream};

    fn dev_names() -> Vec<String> {
        ["localhost", "*.preview.localhost", "127.0.0.1", "::1"]
            .map(String::from)
            .to_vec()
    }

    fn dev_dir() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("certs");
        let ca = ensure_dev_certs(&dir, &dev_names())
            .expect("dev certs")
            .expect("CA path");
        assert_eq!(ca, dir.join("dev-ca.crt"));
        (tmp, dir)
    }

    fn served(store: &CertStore, sni: Option<&str>) -> Option<Vec<u8>> {
        store
            .resolve_name(sni)
            .map(|k| k.cert.first().map(|c| c.to_vec()).unwrap_or_default())
    }

    fn ca_der(dir: &Path) -> CertificateDer<'static> {
        let pem = fs::read(dir.join("dev-ca.crt")).expect("read CA");
        let der = rustls_pemfile::certs(&mut pem.as_slice())
            .next()
            .expect("a cert")
            .expect("valid PEM");
        der
    }

    fn roots(dir: &Path) -> Arc<rustls::RootCertStore> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_der(dir)).expect("add CA");
        Arc::new(roots)
    }

    /// Verifies what the store serves for `sni` as a browser trusting the dev CA would, for
    /// the name the client connects to.
    fn verify(dir: &Path, store: &CertStore, sni: Option<&str>, name: &str) -> anyhow::Result<()> {
        let key = store.resolve_name(sni).context("no certificate")?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots(dir),
            Arc::new(provider()),
        )
        .build()?;
        let server_name = ServerName::try_from(name.to_owned())?;
        verifier.verify_server_cert(
            &key.cert[0],
            &key.cert[1..],
            &server_name,
            &[],
            UnixTime::now(),
        )?;
        Ok(())
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("metadata").permissions().mode() & 0o777
    }

    #[test]
    fn dev_certs_are_generated_loaded_and_resolved() {
        let (_tmp, dir) = dev_dir();
        for f in ["dev-ca.crt", "dev-ca.key", "dev.crt", "dev.key"] {
            assert!(dir.join(f).is_file(), "{f}");
        }
        assert_eq!(mode(&dir.join("dev-ca.key")), 0o600);
        assert_eq!(mode(&dir.join("dev.key")), 0o600);

        let store = CertStore::load_from_dir(&dir).expect("load");
        assert_eq!(store.names(), vec!["localhost", "*.preview.localhost"]);
        let dev = served(&store, Some("localhost")).expect("exact name");
        assert_eq!(served(&store, Some("LOCALHOST.")), Some(dev.clone()));
        assert_eq!(
            served(&store, Some("user-1.preview.localhost")),
            Some(dev.clone())
        );
        assert_eq!(
            served(&store, None),
            Some(dev),
            "no SNI falls back to the first cert"
        );
        for unknown in [
            "preview.localhost",
            "a.user-1.preview.localhost",
            "example.com",
            "localhost.evil",
            "",
        ] {
            assert!(served(&store, Some(unknown)).is_none(), "{unknown:?}");
        }

        // What a client trusting dev-ca.crt would accept.
        verify(&dir, &store, Some("localhost"), "localhost").expect("localhost");
        verify(
            &dir,
            &store,
            Some("user-7.preview.localhost"),
            "user-7.preview.localhost",
        )
        .expect("wildcard");
        verify(&dir, &store, None, "127.0.0.1").expect("IPv4 SAN");
        verify(&dir, &store, None, "::1").expect("IPv6 SAN");
        assert!(verify(&dir, &store, None, "127.0.0.2").is_err());
    }

    #[test]
    fn dev_certs_are_not_regenerated_and_the_ca_is_reused() {
        let (_tmp, dir) = dev_dir();
        let ca_before = fs::read(dir.join("dev-ca.crt")).expect("read");
        let dev_before = fs::read(dir.join("dev.crt")).expect("read");
        // Second start: nothing is rewritten.
        let again = ensure_dev_certs(&dir, &dev_names()).expect("ensure");
        assert_eq!(again, Some(dir.join("dev-ca.crt")));
        assert_eq!(fs::read(dir.join("dev.crt")).expect("read"), dev_before);

        // Deleting the server pair to change names keeps the CA the user already trusts.
        fs::remove_file(dir.join("dev.crt")).expect("rm");
        fs::remove_file(dir.join("dev.key")).expect("rm");
        let names = vec!["localhost".to_owned(), "*.preview.dev.test".to_owned()];
        ensure_dev_certs(&dir, &names).expect("regenerate");
        assert_eq!(fs::read(dir.join("dev-ca.crt")).expect("read"), ca_before);
        assert_ne!(fs::read(dir.join("dev.crt")).expect("read"), dev_before);
        let store = CertStore::load_from_dir(&dir).expect("load");
        verify(
            &dir,
            &store,
            Some("user-1.preview.dev.test"),
            "user-1.preview.dev.test",
        )
        .expect("new leaf chains to the reused CA");
    }

    #[test]
    fn operator_certs_suppress_dev_certs() {
        let (_tmp, dir) = dev_dir();
        // Pretend an operator put their own pair in an otherwise empty directory.
        let other = tempfile::tempdir().expect("tempdir");
        fs::rename(dir.join("dev.crt"), other.path().join("api.crt")).expect("mv");
        fs::rename(dir.join("dev.key"), other.path().join("api.key")).expect("mv");
        assert_eq!(
            ensure_dev_certs(other.path(), &dev_names()).expect("ensure"),
            None
        );
        assert!(!other.path().join("dev.crt").exists());
        assert!(!other.path().join("dev-ca.crt").exists());
    }

    #[test]
    fn dev_certs_never_write_through_symlinks_or_over_leftovers() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("certs");
        fs::create_dir(&dir).expect("mkdir");
        let outside = tmp.path().join("outside.key");
        // A dangling link where the CA key would go.
        std::os::unix::fs::symlink(&outside, dir.join("dev-ca.key")).expect("symlink");
        assert!(ensure_dev_certs(&dir, &dev_names()).is_err());
        assert!(!outside.exists(), "nothing written through the link");

        // With a valid CA, a dangling link where the server key goes.
        fs::remove_file(dir.join("dev-ca.key")).expect("rm");
        let (_tmp2, good) = dev_dir();
        for f in ["dev-ca.crt", "dev-ca.key"] {
            fs::copy(good.join(f), dir.join(f)).expect("cp");
        }
        std::os::unix::fs::symlink(&outside, dir.join("dev.key")).expect("symlink");
        assert!(ensure_dev_certs(&dir, &dev_names()).is_err());
        assert!(!outside.exists(), "nothing written through the link");
        assert!(!dir.join("dev.crt").exists());
    }

    #[test]
    fn dev_certs_reject_bad_input() {
        let tmp = tempfile::tempdir().expect("tempdir");
        assert!(ensure_dev_certs(tmp.path(), &[]).is_err());
        assert!(ensure_dev_certs(tmp.path(), &["bad name".to_owned()]).is_err());
        // Half a CA pair is for a human to sort out.
        let (_t, good) = dev_dir();
        fs::copy(good.join("dev-ca.crt"), tmp.path().join("dev-ca.crt")).expect("cp");
        let err = ensure_dev_certs(tmp.path(), &dev_names()).expect_err("half pair");
        assert!(format!("{err:#}").contains("both"), "{err:#}");
        // A CA key that is not the CA certificate's.
        fs::copy(good.join("dev.key"), tmp.path().join("dev-ca.key")).expect("cp");
        let err = ensure_dev_certs(tmp.path(), &dev_names()).expect_err("mismatched CA");
        assert!(format!("{err:#}").contains("does not match"), "{err:#}");
    }

    #[test]
    fn loading_skips_bad_pairs_and_ca_certs() {
        let (_tmp, dir) = dev_dir();
        fs::write(dir.join("broken.crt"), "not a certificate").expect("write");
        fs::write(dir.join("broken.key"), "not a key").expect("write");
        fs::copy(dir.join("dev.crt"), dir.join("nokey.crt")).expect("cp");
        let store = CertStore::load_from_dir(&dir).expect("dev pair still loads");
        assert_eq!(store.names(), vec!["localhost", "*.preview.localhost"]);

        // Only the CA left: nothing servable.
        for f in [
            "dev.crt",
            "dev.key",
            "broken.crt",
            "broken.key",
            "nokey.crt",
        ] {
            fs::remove_file(dir.join(f)).expect("rm");
        }
        assert!(CertStore::load_from_dir(&dir).is_err());
        assert!(CertStore::load_from_dir(&dir.join("missing")).is_err());
    }

    /// A second, independent dev pair, to rotate in.
    fn other_pair() -> (tempfile::TempDir, PathBuf) {
        dev_dir()
    }

    #[test]
    fn reload_keeps_the_last_good_certificate() {
        let (_tmp, dir) = dev_dir();
        let store = CertStore::load_from_dir(&dir).expect("load");
        let old = served(&store, Some("localhost")).expect("served");

        // Garbage on disk: the old certificate stays.
        fs::write(dir.join("dev.crt"), "garbage").expect("write");
        fs::write(dir.join("dev.key"), "garbage").expect("write");
        assert_eq!(store.reload_from_dir(&dir).expect("kept"), 1);
        assert_eq!(served(&store, Some("localhost")), Some(old.clone()));

        // A new certificate with the old key (renewal half-written): still the old pair.
        let (_t2, new) = other_pair();
        fs::copy(new.join("dev.crt"), dir.join("dev.crt")).expect("cp");
        let (_t3, third) = other_pair();
        fs::copy(third.join("dev.key"), dir.join("dev.key")).expect("cp");
        store.reload_from_dir(&dir).expect("kept");
        assert_eq!(served(&store, Some("localhost")), Some(old.clone()));

        // A complete new pair: served.
        fs::copy(new.join("dev.key"), dir.join("dev.key")).expect("cp");
        store.reload_from_dir(&dir).expect("reload");
        let now = served(&store, Some("localhost")).expect("served");
        assert_ne!(now, old);
        let pem = fs::read(new.join("dev.crt")).expect("read");
        let want = rustls_pemfile::certs(&mut pem.as_slice())
            .next()
            .expect("cert")
            .expect("pem");
        assert_eq!(now, want.to_vec());

        // Everything gone: an error, and the store is unchanged.
        for f in ["dev.crt", "dev.key"] {
            fs::remove_file(dir.join(f)).expect("rm");
        }
        assert!(store.reload_from_dir(&dir).is_err());
        assert_eq!(served(&store, Some("localhost")), Some(now));
    }

    #[tokio::test]
    async fn reloader_picks_up_changes_and_survives_garbage() {
        let (_tmp, dir) = dev_dir();
        let store = Arc::new(CertStore::load_from_dir(&dir).expect("load"));
        let old = served(&store, Some("localhost")).expect("served");
        let (stop, rx) = watch::channel(false);
        let task = spawn_reloader(store.clone(), dir.clone(), Duration::from_millis(100), rx);

        // Garbage: kept through several polls.
        fs::write(dir.join("dev.crt"), "garbage").expect("write");
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(served(&store, Some("localhost")), Some(old.clone()));

        // A valid new pair (key first, as a careful renewal would): picked up within a few polls.
        let (_t2, new) = other_pair();
        fs::copy(new.join("dev.key"), dir.join("dev.key")).expect("cp");
        fs::copy(new.join("dev.crt"), dir.join("dev.crt")).expect("cp");
        let mut changed = false;
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if served(&store, Some("localhost")) != Some(old.clone()) {
                changed = true;
                break;
            }
        }
        assert!(changed, "new certificate not picked up within 3 s");

        stop.send(true).expect("send");
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("reloader stops")
            .expect("no panic");
    }

    fn sni_handler() -> Arc<dyn Handler> {
        Arc::new(|req: Request<Incoming>, conn: Arc<ConnInfo>| async move {
            let body = format!(
                "{:?} tls={} sni={} h2={}",
                req.version(),
                conn.tls,
                conn.sni.as_deref().unwrap_or("-"),
                conn.alpn_h2
            );
            Response::new(crate::http::full(body))
        })
    }

    async fn connect_tls(
        addr: std::net::SocketAddr,
        dir: &Path,
        name: &str,
        alpn: &[&[u8]],
    ) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots(dir))
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        let tcp = TcpStream::connect(addr).await?;
        Ok(connector
            .connect(ServerName::try_from(name.to_owned())?, tcp)
            .await?)
    }

    async fn body_of(resp: Response<Incoming>) -> String {
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[tokio::test]
    async fn tls_handshake_sni_alpn_and_misdirected_requests() {
        let (_tmp, dir) = dev_dir();
        let store = Arc::new(CertStore::load_from_dir(&dir).expect("load"));
        let acceptor = tokio_rustls::TlsAcceptor::from(server_config(store).expect("config"));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, rx) = watch::channel(false);
        let cfg = ListenerConfig {
            tls_handshake_timeout: Duration::from_millis(500),
            header_read_timeout: Duration::from_secs(2),
            ..ListenerConfig::default()
        };
        let server = tokio::spawn(listener::serve(
            listener,
            Some(acceptor),
            sni_handler(),
            cfg,
            rx,
            Duration::from_secs(1),
        ));

        // HTTP/2 over TLS, chosen by ALPN, to a wildcard name.
        let tls = connect_tls(
            addr,
            &dir,
            "user-7.preview.localhost",
            &[b"h2", b"http/1.1"],
        )
        .await
        .expect("handshake");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (mut h2, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .expect("h2");
        tokio::spawn(conn);
        let req = Request::get("https://user-7.preview.localhost/")
            .body(Empty::<bytes::Bytes>::new())
            .expect("request");
        let resp = h2.send_request(req).await.expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            body_of(resp).await,
            "HTTP/2.0 tls=true sni=user-7.preview.localhost h2=true"
        );
        // Same connection, another host under the same wildcard: 421.
        let req = Request::get("https://user-8.preview.localhost/")
            .body(Empty::<bytes::Bytes>::new())
            .expect("request");
        let resp = h2.send_request(req).await.expect("response");
        assert_eq!(resp.status(), StatusCode::MISDIRECTED_REQUEST);

        // HTTP/1.1 over TLS; Host with a port still matches the SNI.
        let tls = connect_tls(addr, &dir, "localhost", &[b"http/1.1"])
            .await
            .expect("handshake");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .expect("h1");
        tokio::spawn(conn);
        let req = Request::get("/")
            .header("host", format!("LocalHost:{}", addr.port()))
            .body(Empty::<bytes::Bytes>::new())
            .expect("request");
        let resp = h1.send_request(req).await.expect("response");
        assert_eq!(
            body_of(resp).await,
            "HTTP/1.1 tls=true sni=localhost h2=false"
        );

        // By IP address: no SNI, the fallback certificate carries the IP SAN.
        let tls = connect_tls(addr, &dir, "127.0.0.1", &[])
            .await
            .expect("handshake by IP");
        let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .expect("h1");
        tokio::spawn(conn);
        let req = Request::get("/")
            .header("host", "127.0.0.1")
            .body(Empty::<bytes::Bytes>::new())
            .expect("request");
        let resp = h1.send_request(req).await.expect("response");
        assert_eq!(body_of(resp).await, "HTTP/1.1 tls=true sni=- h2=false");

        // A name we have no certificate for: the handshake fails.
        assert!(connect_tls(addr, &dir, "example.com", &[]).await.is_err());

        // A client that never starts the handshake is dropped after the handshake timeout.
        let mut idle = TcpStream::connect(addr).await.expect("connect");
        let mut buf = [0u8; 16];
        let closed = tokio::time::timeout(Duration::from_secs(2), async {
            use tokio::io::AsyncReadExt;
            idle.read(&mut buf).await
        })
        .await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");

        stop.send(true).expect("stop");
        tokio::time::timeout(Duration::from_secs(3), server)
            .await
            .expect("serve returns")
            .expect("no panic")
            .expect("ok");
    }
}
