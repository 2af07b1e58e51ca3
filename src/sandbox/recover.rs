//! Start-up reconciliation: the table is rebuilt from Docker's labels and the store is brought
//! in line with it.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use crate::user::UserId;
use docker::{DockerState, ErrorKind};

use super::slot::Container;
use super::{docker, Manager, State};

impl Manager {
    /// Rebuilds the table from Docker's labels and reconciles the store: adopted containers are
    /// recorded, sessions whose container is gone are marked removed, duplicates are removed.
    pub(super) async fn recover(&self) -> anyhow::Result<()> {
        // Swarm mode: network guard helpers of a previous run are of no use.
        let helpers = self.engine.remove_guard_helpers(&self.cfg.instance).await?;
        if helpers > 0 {
            tracing::info!(helpers, "removed network guard helpers left behind");
        }
        let (found, bad) = self.engine.list_managed(&self.cfg.instance).await?;
        for id in bad {
            tracing::warn!(container = %id, "removing a labelled container with an invalid user");
            self.engine.remove(&id).await?;
        }
        let mut by_user: HashMap<UserId, Vec<docker::Managed>> = HashMap::new();
        for m in found {
            by_user.entry(m.user.clone()).or_default().push(m);
        }
        let mut sessions: HashMap<String, crate::store::SessionRow> = self
            .store
            .sessions()
            .await?
            .into_iter()
            .map(|s| (s.user_id.clone(), s))
            .collect();
        // Most recently active first, so that if the cap shrank the busiest keep their slot.
        let mut users: Vec<_> = by_user.into_iter().collect();
        users.sort_by_key(|(u, _)| {
            std::cmp::Reverse(
                sessions
                    .get(u.as_str())
                    .map(|s| s.last_activity)
                    .unwrap_or(0),
            )
        });
        for (user, list) in users {
            // replicas: under the user's lock across replicas, with the session as it is now
            // (another replica may be serving this user meanwhile).
            let held = self.hold_user(&user).await?;
            if held.is_some() {
                if let Some(row) = self.store.session(&user).await? {
                    sessions.insert(row.user_id.clone(), row);
                }
            }
            let named = sessions
                .get(user.as_str())
                .and_then(|s| s.container_id.as_deref());
            let (keep, list) = keep_one(list, named);
            for dup in list {
                tracing::warn!(user = %user, container = %dup.id, "removing a duplicate container");
                self.engine.remove(&dup.id).await?;
                self.event(
                    &user,
                    Some(&dup.id),
                    "removed",
                    Some("duplicate found at start-up"),
                )
                .await;
            }
            let i = match self.engine.inspect(&keep.id, &self.network).await {
                Ok(i) => i,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            };
            let mut state = State::of_engine(i.state);
            // A boot quota left behind by a previous run (or a changed `cpus`): the configured
            // quota, whatever the state.
            if i.nano_cpus.is_some_and(|n| n != self.cfg.limits.nano_cpus) {
                if let Err(e) = self
                    .engine
                    .set_cpus(&keep.id, self.cfg.limits.nano_cpus)
                    .await
                {
                    tracing::warn!(user = %user, error = format!("{e:#}"), "restoring the CPU quota at start-up");
                }
            }
            let mut permit = None;
            if state != State::Stopped {
                permit = self.capacity.clone().try_acquire_owned().ok();
                if permit.is_none() {
                    tracing::warn!(user = %user, "over max_containers at start-up: stopping");
                    if state == State::Paused {
                        self.engine.unpause(&keep.id).await?;
                    }
                    self.engine
                        .stop(&keep.id, self.cfg.stop_timeout.as_secs() as i64)
                        .await?;
                    state = State::Stopped;
                }
            }
            let session = sessions.get(user.as_str());
            let slot = self.slot(&user);
            if let Some(s) = session {
                slot.last_activity.store(s.last_activity, Ordering::Relaxed);
                slot.flushed_activity
                    .store(s.last_activity, Ordering::Relaxed);
            }
            let c = Container::found(keep.clone(), state, i.ip, None, permit);
            let mut g = slot.inner.lock().await;
            *g = Some(c);
            slot.publish(&g);
            if let Some((node, _)) = self.engine.node_of(&keep.id) {
                self.record_node(&user, &node).await?;
            }
            let changed = session.map(|s| {
                s.container_id.as_deref() != Some(keep.id.as_str()) || s.state != state.as_str()
            });
            if changed != Some(false) {
                self.event(&user, Some(&keep.id), "adopted", Some("found at start-up"))
                    .await;
            }
            self.save(&user, &g, None).await?;
        }
        // Sessions that name a container Docker no longer has.
        for (uid, s) in &sessions {
            let Ok(user) = UserId::parse(uid) else {
                continue;
            };
            let present = self.existing_slot(&user).is_some();
            // Swarm mode: a container on a node that is away now is not missing.
            if !present && self.node_unusable(self.store.session_node(&user).await?.as_deref()) {
                continue;
            }
            // replicas: unless another replica made one meanwhile.
            if !present && s.container_id.is_some() && !self.still_there(&user).await? {
                self.event(
                    &user,
                    s.container_id.as_deref(),
                    "removed",
                    Some("container missing at start-up"),
                )
                .await;
                self.store
                    .save_session(&user, None, "removed", None)
                    .await?;
            }
        }
        Ok(())
    }
}

/// Of one user's containers found at start-up, the one to keep and the duplicates to remove:
/// keep the one the store names, else a live one, else the newest. `list` is never empty.
pub(super) fn keep_one(
    mut list: Vec<docker::Managed>,
    named: Option<&str>,
) -> (docker::Managed, Vec<docker::Managed>) {
    list.sort_by_key(|m| {
        let is_named = named == Some(m.id.as_str());
        let live = matches!(m.state, DockerState::Running | DockerState::Paused);
        std::cmp::Reverse((is_named, live, m.created))
    });
    let keep = list.remove(0);
    (keep, list)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(id: &str, state: DockerState, created: i64) -> docker::Managed {
        docker::Managed {
            id: id.into(),
            name: format!("sbx-{id}"),
            user: UserId::parse("42").unwrap(),
            state,
            created,
            agent_key: None,
        }
    }

    fn kept(list: Vec<docker::Managed>, named: Option<&str>) -> (String, Vec<String>) {
        let (keep, dups) = keep_one(list, named);
        (keep.id, dups.into_iter().map(|m| m.id).collect())
    }

    #[test]
    fn keeps_the_named_then_a_live_then_the_newest() {
        let list = || {
            vec![
                found("old-exited", DockerState::Exited, 1),
                found("paused", DockerState::Paused, 2),
                found("new-exited", DockerState::Exited, 3),
            ]
        };
        // The store's container wins even when stopped and older.
        let (keep, dups) = kept(list(), Some("old-exited"));
        assert_eq!(keep, "old-exited");
        assert_eq!(dups.len(), 2);
        // A name the engine does not have: a live one beats a newer stopped one.
        assert_eq!(kept(list(), Some("gone")).0, "paused");
        assert_eq!(kept(list(), None).0, "paused");
        // None live: the newest.
        let stopped = vec![
            found("a", DockerState::Exited, 5),
            found("b", DockerState::Exited, 9),
        ];
        assert_eq!(kept(stopped, None), ("b".to_owned(), vec!["a".to_owned()]));
    }

    #[test]
    fn engine_states_map_to_client_states() {
        assert_eq!(State::of_engine(DockerState::Running), State::Running);
        assert_eq!(State::of_engine(DockerState::Paused), State::Paused);
        for other in [
            DockerState::Created,
            DockerState::Exited,
            DockerState::Other,
        ] {
            assert_eq!(State::of_engine(other), State::Stopped);
        }
    }
}
