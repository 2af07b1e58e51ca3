//! Whether the container engine answers, known without asking it on every request.
//!
//! A monitor pings the engine every 500 ms with a 750 ms timeout: a refused connection marks it
//! down at once, silence only after two unanswered pings in a row (one slow answer on a busy
//! machine is not an outage), so a frozen engine is known as down within about 2 s. An engine call that fails without an answer from the engine (a
//! refused or reset connection, a timeout, a stream cut mid-way) asks the engine once more and,
//! when that ping fails too, marks it down at once instead of waiting for the monitor.
//!
//! While the engine is down, requests that need it are answered at once with 503
//! `engine_unavailable` and `Retry-After` instead of waiting on a socket nobody serves; work
//! already waiting on the engine is abandoned when it goes down (see [`wait_down`]). The next
//! successful ping marks it up again, and the manager re-reads its containers (an engine restart
//! stops them all when live-restore is off).

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::watch;

use super::docker::{self, Engine};

/// How often the monitor pings the engine.
pub const PING_EVERY: Duration = Duration::from_millis(500);
/// How long a ping may take before it counts as unanswered. With [`SILENT_PINGS`] a frozen
/// engine is known as down within about 2 s.
pub const PING_TIMEOUT: Duration = Duration::from_millis(750);
/// Unanswered pings in a row before a silent (not refusing) engine counts as down.
pub(super) const SILENT_PINGS: u32 = 2;
/// The `Retry-After` (seconds) sent while the engine is down.
pub const RETRY_AFTER_SECS: u32 = 2;

/// The engine's availability as last seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EngineStatus {
    Up,
    /// Down since (ms since the epoch), with the error that said so.
    Down {
        since: i64,
        error: String,
    },
}

impl EngineStatus {
    pub fn is_up(&self) -> bool {
        matches!(self, EngineStatus::Up)
    }
}

pub struct Health {
    tx: watch::Sender<EngineStatus>,
    /// Asked once more before a failed call marks the engine down (None in unit tests).
    engine: Option<Engine>,
}

impl Default for Health {
    fn default() -> Self {
        Health::new()
    }
}

impl Health {
    /// Starts as up: the manager only starts after the engine answered.
    pub fn new() -> Health {
        Health {
            tx: watch::Sender::new(EngineStatus::Up),
            engine: None,
        }
    }

    /// A tracker with its monitor task, which ends when the tracker is dropped.
    pub(super) fn monitored(engine: Engine) -> Arc<Health> {
        let h = Arc::new(Health {
            engine: Some(engine.clone()),
            ..Health::new()
        });
        spawn_monitor(Arc::downgrade(&h), engine, PING_EVERY, PING_TIMEOUT);
        h
    }

    pub fn is_up(&self) -> bool {
        self.tx.borrow().is_up()
    }

    pub fn status(&self) -> EngineStatus {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<EngineStatus> {
        self.tx.subscribe()
    }

    /// Records that the engine answered.
    pub(super) fn mark_up(&self) {
        self.tx.send_if_modified(|s| {
            if s.is_up() {
                return false;
            }
            tracing::info!("the container engine answers again");
            *s = EngineStatus::Up;
            true
        });
    }

    /// Records that the engine did not answer; keeps the first error of an outage.
    pub(super) fn mark_down(&self, error: &str) {
        self.tx.send_if_modified(|s| {
            if !s.is_up() {
                return false;
            }
            tracing::warn!(error, "the container engine is unavailable");
            *s = EngineStatus::Down {
                since: crate::store::now_ms(),
                error: error.to_owned(),
            };
            true
        });
    }

    /// After an engine call failed: whether the engine is down, marking it so. A ping decides
    /// (a refused connection fails it at once, a silent engine within [`PING_TIMEOUT`]), so one
    /// broken stream never turns a healthy engine "down", and a failure that does not look like
    /// a transport error (a stream cut mid-way) still counts when the engine is gone. Without an
    /// engine to ask (unit tests) the error's kind decides.
    pub async fn note_error(&self, err: &anyhow::Error) -> bool {
        if !self.is_up() {
            return true;
        }
        if docker::engine_error(err).is_some_and(docker::EngineError::answered) {
            return false;
        }
        match &self.engine {
            Some(engine) => {
                if let Ok(Ok(())) = tokio::time::timeout(PING_TIMEOUT, engine.ping()).await {
                    return false;
                }
            }
            None if !docker::is_unavailable(err) => return false,
            None => {}
        }
        self.mark_down(&format!("{err:#}"));
        true
    }

    /// The message clients see while the engine is down.
    pub fn down_message(&self) -> String {
        match self.status() {
            EngineStatus::Up => "the container engine (Docker) is unavailable".to_owned(),
            EngineStatus::Down { error, .. } => {
                format!("the container engine (Docker) is unavailable: {error}")
            }
        }
    }
}

/// Resolves when the engine is (or goes) down; never while it stays up.
pub async fn wait_down(mut rx: watch::Receiver<EngineStatus>) {
    // An error means the tracker is gone: then nobody will say "down" any more.
    if rx.wait_for(|s| !s.is_up()).await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn spawn_monitor(health: Weak<Health>, engine: Engine, every: Duration, timeout: Duration) {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A refused connection is certain; one slow ping on a busy machine is not: silence
        // counts only when two pings in a row go unanswered.
        let mut silent = 0;
        loop {
            ticker.tick().await;
            let result = tokio::time::timeout(timeout, engine.ping()).await;
            let Some(h) = health.upgrade() else { break };
            match result {
                Ok(Ok(())) => {
                    silent = 0;
                    h.mark_up();
                }
                Ok(Err(e)) => h.mark_down(&format!("{e:#}")),
                Err(_) => {
                    silent += 1;
                    if silent >= SILENT_PINGS {
                        h.mark_down(&format!("no answer to {silent} pings of {timeout:?}"));
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn down_and_up_are_published_once_each() {
        let h = Health::new();
        assert!(h.is_up());
        assert!(
            !h.note_error(&anyhow::anyhow!("an answer, not a transport error"))
                .await
        );
        assert!(h.is_up());
        let mut rx = h.subscribe();
        h.mark_down("refused");
        h.mark_down("refused again");
        assert!(rx.has_changed().unwrap());
        let s = rx.borrow_and_update().clone();
        assert!(matches!(s, EngineStatus::Down { ref error, .. } if error == "refused"));
        assert!(h.down_message().contains("refused"));
        // wait_down resolves at once while down.
        tokio::time::timeout(Duration::from_millis(100), wait_down(h.subscribe()))
            .await
            .expect("resolves while down");
        h.mark_up();
        h.mark_up();
        assert!(rx.has_changed().unwrap());
        assert!(rx.borrow_and_update().is_up());
        assert!(!rx.has_changed().unwrap());
        // ... and stays pending while up.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), wait_down(h.subscribe()))
                .await
                .is_err()
        );
    }
}
