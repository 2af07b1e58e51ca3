//! Wiring, in numbered steps. `build` binds the listeners first (port 0 works, which is how the
//! tests run the real server) and returns a [`Running`] server that knows its addresses.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::app::{App, AppHandler};
use crate::auth::{self, Auth};
use crate::config::Config;
use crate::edge::listener::{self, ListenerConfig};
use crate::edge::percore;
use crate::sandbox::{events, firewall, idle, replicas, Manager};
use crate::store::Store;

pub struct Running {
    pub http_addr: Option<SocketAddr>,
    pub https_addr: Option<SocketAddr>,
    /// The Prometheus metrics listener (`metrics_addr`), when enabled.
    pub metrics_addr: Option<SocketAddr>,
    app: Arc<App>,
    /// Where the generated development CA lives, when one was generated or found.
    pub dev_ca: Option<std::path::PathBuf>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Running {
    /// The sandbox manager: what the operator commands, tests and the bench see of the sandboxes.
    pub fn manager(&self) -> &Arc<Manager> {
        &self.app.mgr
    }

    /// The validated configuration this instance runs with.
    pub fn config(&self) -> &Arc<Config> {
        &self.app.cfg
    }
}

pub async fn build(mut cfg: Config) -> anyhow::Result<Running> {
    // 1. Listeners first, so the configuration knows the real ports (port 0 in tests). The
    //    edge listeners are one socket per edge thread, on one port (edge/percore.rs).
    let threads = percore::thread_count(cfg.edge_threads);
    let http = match cfg.http_addr {
        Some(a) => Some(percore::bind(a, threads).context("binding http_addr")?),
        None => None,
    };
    let https = match cfg.https_addr {
        Some(a) => Some(percore::bind(a, threads).context("binding https_addr")?),
        None => None,
    };
    let metrics = match cfg.metrics_addr {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .with_context(|| format!("binding metrics_addr {a}"))?,
        ),
        None => None,
    };
    cfg.metrics_addr = metrics.as_ref().map(|l| l.local_addr()).transpose()?;
    cfg.http_addr = http.as_ref().map(|l| l[0].local_addr()).transpose()?;
    cfg.https_addr = https.as_ref().map(|l| l[0].local_addr()).transpose()?;
    let cfg = Arc::new(cfg);

    // 2. Store (migrations run here), engine, manager (rebuilds state from Docker's labels).
    let store = Store::connect(&cfg.database_url).await?;
    //     The manager connects to the engine and installs the packet filter around the
    //     sandbox network before any sandbox is adopted or made (sandbox/firewall.rs).
    let mgr = Manager::start(cfg.clone(), store).await?;
    let auth = Auth::new(&auth::load_secret(&cfg)?);
    let app = App::new(cfg.clone(), mgr.clone(), auth);

    // 3. Background tasks: idle policy, certificate reload.
    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let idle = idle::spawn(mgr.clone(), shutdown_rx.clone());
    tasks.spawn(async move {
        let _ = idle.await;
    });
    if let Some(l) = metrics {
        let (m, rx) = (mgr.metrics().clone(), shutdown_rx.clone());
        tasks.spawn(crate::metrics::serve(l, m, mgr.clone(), rx));
    }
    // Containers changed behind sandboxd's back (events.rs).
    let follower = events::spawn(mgr.clone(), shutdown_rx.clone());
    tasks.spawn(async move {
        let _ = follower.await;
    });

    // Several replicas sharing PostgreSQL: leader election and the other replicas' changes
    // (sandbox/replicas.rs; nothing to do with SQLite).
    tasks.spawn(replicas::run(mgr.clone(), shutdown_rx.clone()));

    // 4. TLS, when an HTTPS listener is configured.
    let (tls, dev_ca) = match &https {
        Some(_) => {
            let (acceptor, ca) = crate::edge::tls_setup(&cfg, shutdown_rx.clone())?;
            (Some(acceptor), ca)
        }
        None => (None, None),
    };

    // 5. Serve.
    let lcfg = ListenerConfig {
        tls_handshake_timeout: cfg.tls_handshake_timeout,
        header_read_timeout: cfg.header_read_timeout,
        max_header_bytes: 64 * 1024,
        max_connections: cfg.max_connections,
    };
    let handler: Arc<dyn listener::Handler> = Arc::new(AppHandler(app.clone()));
    for (listeners, tls, name) in [(http, None, "http"), (https, tls, "https")] {
        let Some(l) = listeners else { continue };
        let (h, c, rx, g) = (
            handler.clone(),
            lcfg.clone(),
            shutdown_rx.clone(),
            cfg.shutdown_grace,
        );
        tasks.spawn(percore::serve(l, tls, h, c, rx, g, name)?);
    }
    Ok(Running {
        http_addr: cfg.http_addr,
        https_addr: cfg.https_addr,
        metrics_addr: cfg.metrics_addr,
        app,
        dev_ca,
        shutdown,
        tasks,
    })
}

impl Running {
    /// Graceful shutdown: stop accepting, let in-flight requests finish within
    /// `shutdown_grace`, flush activity. Sandboxes keep running.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        while self.tasks.join_next().await.is_some() {}
        self.app.mgr.flush_activity().await;
        // The rules confine sandboxes that keep running while sandboxd is down: they go only
        // when no sandbox of this instance is live (start-up replaces stale ones anyway).
        // With replicas: only the last one, when no sandbox of any replica is live.
        if !self.app.mgr.swarm_mode()
            && self.app.mgr.live_count() == 0
            && self.app.mgr.replicas().last_one(self.app.mgr.store()).await
        {
            let instance = self.app.cfg.instance.clone();
            match tokio::task::spawn_blocking(move || firewall::remove(&instance)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = format!("{e:#}"), "removing the firewall"),
                Err(e) => tracing::warn!(error = %e, "removing the firewall"),
            }
        }
        self.app.mgr.replicas().close().await;
        self.app.mgr.store().close().await;
    }

    /// Runs until SIGINT or SIGTERM, then shuts down gracefully.
    pub async fn run_until_signal(self) -> anyhow::Result<()> {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        self.shutdown().await;
        Ok(())
    }
}
