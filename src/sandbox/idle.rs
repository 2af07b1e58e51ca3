//! Idle policy: a running sandbox with no activity for `idle_pause_after` is paused (it wakes
//! in milliseconds on the next request); a sandbox idle for `idle_stop_after` is stopped (it
//! wakes in about a second; the workspace stays). Activity is any API call, execution,
//! proxied request or tunnel traffic; an open terminal counts as activity for as long as it is
//! open, because pausing would freeze a shell somebody may be looking at. An open but silent
//! preview tab (an HMR WebSocket with no traffic) does not keep a sandbox awake: the tunnel
//! survives the pause and the next request wakes the sandbox.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{Manager, State};
use crate::store::now_ms;

pub fn spawn(
    mgr: Arc<Manager>,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // replicas: with a shared store every replica ticks at least once a second and only the
        // leader pauses and stops (sandbox/replicas.rs).
        let every = super::replicas::tick(&mgr, mgr.config().idle_check_every);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.changed() => break,
            }
            if mgr.replicas().is_shared() {
                super::replicas::sweep_shared(&mgr).await;
                continue;
            }
            sweep(&mgr).await;
        }
        mgr.flush_activity().await;
    })
}

/// One pass of the idle policy.
pub(super) async fn sweep(mgr: &Arc<Manager>) {
    let pause_after = mgr.config().idle_pause_after.as_millis() as i64;
    let stop_after = mgr.config().idle_stop_after.as_millis() as i64;
    let now = now_ms();
    if !mgr.health_tracker().is_up() {
        // Nothing can be paused or stopped while the engine is away; try again next round.
        mgr.flush_activity().await;
        return;
    }
    for slot in mgr.all_slots() {
        if slot.busy() {
            slot.touch();
            continue;
        }
        let idle = now - slot.last_activity();
        let user = slot.user.clone();
        let result = match mgr.fast_state(&slot) {
            Some(State::Running | State::Paused) if idle >= stop_after => {
                mgr.stop_if_idle(&user, stop_after, &format!("idle for {}", human(idle)))
                    .await
            }
            Some(State::Running) if idle >= pause_after => {
                mgr.pause_if_idle(&user, pause_after, &format!("idle for {}", human(idle)))
                    .await
            }
            _ => Ok(()),
        };
        if let Err(e) = result {
            tracing::warn!(user = %user, error = format!("{e:#}"), "idle policy");
        }
    }
    mgr.flush_activity().await;
}

fn human(ms: i64) -> String {
    format!("{:?}", Duration::from_millis(ms.max(0) as u64))
}
