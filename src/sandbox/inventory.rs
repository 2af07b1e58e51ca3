//! What the operator commands (`sandboxd ps`, `sandboxd stop`) see of this instance's
//! containers: the engine's list, found by this instance's labels, and the few changes they make
//! to a listed container. They run outside the server, beside it or not.

use std::time::Duration;

use anyhow::{anyhow, Context};

pub use super::docker::{DockerState, Managed};
use super::docker::{Engine, ErrorKind};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// The engine, seen as the list of this instance's containers.
pub struct Inventory {
    engine: Engine,
}

impl Inventory {
    /// Connects to the engine the server uses (DOCKER_HOST, else the local socket).
    pub async fn connect() -> anyhow::Result<Inventory> {
        let shown = std::env::var("DOCKER_HOST").unwrap_or_else(|_| "local socket".into());
        match tokio::time::timeout(CONNECT_TIMEOUT, Engine::connect()).await {
            Ok(Ok(engine)) => Ok(Inventory { engine }),
            Ok(Err(e)) => Err(e.context(format!("engine unreachable ({shown})"))),
            Err(_) => Err(anyhow!(
                "engine unreachable ({shown}): no answer within 15s"
            )),
        }
    }

    /// Swarm mode: through the managers, every usable node's engine.
    pub async fn connect_swarm(cfg: &crate::config::Config) -> anyhow::Result<Inventory> {
        match tokio::time::timeout(CONNECT_TIMEOUT, super::swarm::Swarm::open(cfg)).await {
            Ok(Ok((engine, _))) => Ok(Inventory { engine }),
            Ok(Err(e)) => Err(e.context("swarm unreachable")),
            Err(_) => Err(anyhow!("swarm unreachable: no answer within 15s")),
        }
    }

    /// Every container with this instance's labels.
    pub async fn containers(&self, instance: &str) -> anyhow::Result<Vec<Managed>> {
        Ok(self.engine.list_managed(instance).await?.0)
    }

    /// Memory in use by a listed container (`None` when it is not live).
    pub async fn memory_in_use(&self, c: &Managed) -> anyhow::Result<Option<u64>> {
        Ok(self.engine.memory_in_use(&c.id).await?)
    }

    /// Stops a listed container, resuming it first when paused (a paused container cannot
    /// receive the stop signal). A container that is no longer paused is stopped all the same.
    pub async fn stop(&self, c: &Managed, timeout_secs: i64) -> anyhow::Result<()> {
        if c.state == DockerState::Paused {
            if let Err(e) = self.engine.unpause(&c.id).await {
                if e.kind() != ErrorKind::Conflict {
                    return Err(anyhow::Error::from(e).context("engine: unpausing before the stop"));
                }
            }
        }
        self.engine
            .stop(&c.id, timeout_secs)
            .await
            .context("engine: stopping the container")
    }
}
