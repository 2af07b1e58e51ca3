//! Follows the engine's event stream for this instance's containers, so that a container
//! paused, stopped, killed, OOM-killed or removed behind sandboxd's back (an operator's
//! command, the kernel, an engine restart) is in the manager's table and in the store within a
//! moment, and the next request wakes or re-creates it as after sandboxd's own transitions.
//!
//! Each event only says *that* something happened to a container; the manager then inspects
//! it under the user's lock and applies what the engine says now. sandboxd's own transitions
//! hold that lock, so the echo of its own pause or stop finds the table already in step and
//! records nothing; only a real difference becomes an `external: …` event in the history.
//!
//! When the stream breaks (the engine restarts or is unreachable), it reconnects with backoff
//! and re-inspects every known container ([`Manager::resync`]) so that nothing that happened
//! in between is missed.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{watch, Semaphore};

use super::docker::EngineEvent;
use super::Manager;

/// First and last wait between reconnection attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Events applied at once (each inspects one container under its user's lock); the stream is
/// read no faster than that.
const CONCURRENT: usize = 32;

/// What the history says about an event (after `external: `).
pub fn describe(ev: &EngineEvent) -> String {
    match (ev.action.as_str(), ev.exit_code, ev.signal.as_deref()) {
        ("die", Some(code), _) => format!("die (exit {code})"),
        ("kill", _, Some(sig)) => format!("kill (signal {sig})"),
        (action, _, _) => action.to_owned(),
    }
}

/// A `kill` only sends a signal (the `die` that may follow is the change); a `stop` follows
/// its `die`. Following them as well would only name the change after the wrong event.
pub(super) fn changes_state(action: &str) -> bool {
    !matches!(action, "kill" | "stop")
}

/// Next wait after a failed or broken subscription.
pub(super) fn next_backoff(current: Duration) -> Duration {
    (current * 2).clamp(BACKOFF_MIN, BACKOFF_MAX)
}

/// Runs until `shutdown` turns true.
pub fn spawn(
    mgr: Arc<Manager>,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let instance = mgr.config().instance.clone();
        let permits = Arc::new(Semaphore::new(CONCURRENT));
        let mut backoff = BACKOFF_MIN;
        let mut first = true;
        loop {
            if *shutdown.borrow() {
                break;
            }
            if !first {
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => break,
                }
                backoff = next_backoff(backoff);
                // Subscribing to an engine that is down fails only when the stream is first
                // read; a ping tells at once.
                if tokio::time::timeout(Duration::from_secs(2), mgr.engine.ping())
                    .await
                    .map_or(true, |r| r.is_err())
                {
                    continue;
                }
            }
            let mut stream = mgr.engine.events(&instance);
            // The stream sends its request when first polled; re-inspect right after, in
            // parallel, so changes made while no stream was open are applied too. Events that
            // arrive meanwhile are applied again harmlessly (the manager compares states).
            let m = mgr.clone();
            let cause = if first {
                "seen when sandboxd began following the engine"
            } else {
                "seen after reconnecting to the engine"
            };
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                m.resync(cause).await;
            });
            if !first {
                tracing::info!("following the engine's events again");
            }
            first = false;
            loop {
                let item = tokio::select! {
                    item = stream.next() => item,
                    _ = shutdown.changed() => return,
                };
                match item {
                    Some(Ok(ev)) => {
                        backoff = BACKOFF_MIN;
                        if !changes_state(&ev.action) {
                            continue;
                        }
                        let Ok(permit) = permits.clone().acquire_owned().await else {
                            return;
                        };
                        let m = mgr.clone();
                        tokio::spawn(async move {
                            let cause = describe(&ev);
                            tracing::debug!(user = %ev.user, container = %ev.container_id, cause, "engine event");
                            m.observe(&ev.user, &ev.container_id, &cause).await;
                            drop(permit);
                        });
                    }
                    Some(Err(e)) => {
                        tracing::warn!(
                            error = format!("{e:#}"),
                            "engine event stream broke; reconnecting"
                        );
                        break;
                    }
                    None => {
                        tracing::warn!("engine event stream ended; reconnecting");
                        break;
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::user::UserId;

    fn ev(action: &str, exit: Option<i64>, signal: Option<&str>) -> EngineEvent {
        EngineEvent {
            action: action.to_owned(),
            container_id: "c".to_owned(),
            user: UserId::parse("1").unwrap(),
            exit_code: exit,
            signal: signal.map(str::to_owned),
        }
    }

    #[test]
    fn events_are_described_for_the_history() {
        assert_eq!(describe(&ev("die", Some(137), None)), "die (exit 137)");
        assert_eq!(describe(&ev("kill", None, Some("9"))), "kill (signal 9)");
        assert_eq!(describe(&ev("pause", None, None)), "pause");
        assert_eq!(describe(&ev("die", None, None)), "die");
    }

    #[test]
    fn signals_are_not_changes() {
        assert!(!changes_state("kill") && !changes_state("stop"));
        for a in ["start", "die", "oom", "pause", "unpause", "destroy"] {
            assert!(changes_state(a), "{a}");
        }
    }

    #[test]
    fn backoff_doubles_up_to_a_bound() {
        let mut b = BACKOFF_MIN;
        let mut seen = vec![];
        for _ in 0..8 {
            b = next_backoff(b);
            seen.push(b);
        }
        assert_eq!(seen[0], Duration::from_millis(200));
        assert!(seen.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*seen.last().unwrap(), BACKOFF_MAX);
    }
}
