//! The edge: everything between a TCP socket and a routed HTTP request.
//!
//! - `listener` accepts connections (plain or TLS), applies the transport limits and serves
//!   HTTP/1.1 and HTTP/2 (with upgrades) to a [`listener::Handler`];
//! - `fast` serves the plain HTTP/1.1 requests a handler takes without hyper (bodyless `GET`
//!   and `HEAD`, the preview's hot path), and hands every other connection to `listener`'s;
//! - `tls` owns the certificates: loading, SNI resolution, development certs and reload;
//! - `percore` runs the listeners on edge threads, one current-thread runtime and
//!   `SO_REUSEPORT` socket per core;
//! - `coarse` keeps the per-request timers of an edge thread (hyper's header timer, the
//!   preview's late-answer backstop) in one watch with one ticker;
//! - `router` maps a Host header to a [`router::Route`], as a pure function.
//!
//! Nothing here knows about Docker, the store or the API: those sit behind the `Handler`.

pub mod coarse;
pub mod fast;
pub mod framing;
pub mod listener;
pub mod percore;
pub mod router;
pub mod tls;
pub mod upgraded;

use std::path::PathBuf;
use std::sync::Arc;

/// Builds the TLS acceptor from `certs_dir` (generating development certificates for
/// development domains when none exist) and starts the reloader. Returns the development CA's
/// path when there is one, so start-up can print how to trust it.
pub fn tls_setup(
    cfg: &crate::config::Config,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<(tokio_rustls::TlsAcceptor, Option<PathBuf>)> {
    let dir = cfg.certs_dir.clone();
    std::fs::create_dir_all(&dir)?;
    let mut ca = None;
    if cfg.is_dev_domain() {
        let names = vec![
            cfg.domain.clone(),
            format!("*.{}", cfg.preview_domain),
            "127.0.0.1".to_owned(),
        ];
        ca = tls::ensure_dev_certs(&dir, &names)?;
    }
    let store = Arc::new(tls::CertStore::load_from_dir(&dir)?);
    tls::spawn_reloader(store.clone(), dir, cfg.cert_reload_every, shutdown);
    Ok((
        tokio_rustls::TlsAcceptor::from(tls::server_config(store)?),
        ca,
    ))
}
