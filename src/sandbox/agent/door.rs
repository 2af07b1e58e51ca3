//! [`Door::agent_call`]: one agent request in the door's container, with recovery. When the
//! agent does not answer properly (connection refused, closed, garbled, or no head in time),
//! the edge restarts it once with `agent-start.sh` (which also removes anything else holding
//! its port), waits until `hello` answers, and retries; if that fails too the request is
//! [`AgentError::Unavailable`] (503 `agent_unavailable` for clients).

use std::time::Duration;

use serde_json::{json, Value};

use super::{call, AgentBody, AgentCall, AgentError, Endpoint, KEY_ENV};
use crate::sandbox::shell::{Door, Script};

/// How long `hello` may take before the agent counts as not answering.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a restarted agent may take to answer `hello`.
const RESTART_WAIT: Duration = Duration::from_secs(4);

/// The head timeout of an op (counted from the end of its body): how long the agent may take
/// before its answer starts.
pub fn head_timeout(op: &Value) -> Duration {
    match op.get("op").and_then(Value::as_str) {
        Some("hello") => HELLO_TIMEOUT,
        // The head comes once the process started.
        Some("run") => Duration::from_secs(5),
        // The head comes after the whole body was written or extracted.
        Some("write") | Some("untar") => Duration::from_secs(60),
        _ => Duration::from_secs(10),
    }
}

/// Asks `hello` once.
async fn hello(ep: &Endpoint, within: Duration) -> Result<Value, AgentError> {
    call(ep, &json!({"op": "hello"}), None, within)
        .await
        .map(|c| c.head.clone())
        .map_err(|(e, _)| e)
}

impl Door {
    /// One agent request: `op` is the JSON head without the key (`{"op": "stat", "path": …}`);
    /// `body` (for `run`, `write`, `untar`) goes out as `DATA` frames then `END`. Restarts the
    /// agent once and retries when it does not answer (a streamed body already partly sent is
    /// not retried: the request is `Unavailable`).
    pub async fn agent_call(
        &self,
        op: Value,
        body: Option<AgentBody>,
    ) -> Result<AgentCall, AgentError> {
        let timeout = head_timeout(&op);
        self.agent_call_within(op, body, timeout).await
    }

    /// [`Door::agent_call`] with an explicit head timeout.
    pub async fn agent_call_within(
        &self,
        op: Value,
        body: Option<AgentBody>,
        head_timeout: Duration,
    ) -> Result<AgentCall, AgentError> {
        let ep = self
            .agent
            .clone()
            .ok_or_else(|| AgentError::Unavailable("the sandbox has no address".into()))?;
        let again = match &body {
            Some(AgentBody::Bytes(b)) => Some(b.clone()),
            _ => None,
        };
        let streamed = matches!(body, Some(AgentBody::Stream(_)));
        let why = match call(&ep, &op, body, head_timeout).await {
            Ok(c) => return Ok(c),
            Err((AgentError::Unavailable(why), back)) => {
                let body = match again {
                    Some(b) => Some(AgentBody::Bytes(b)),
                    None => back,
                };
                self.restart_agent(&ep, &why).await?;
                if streamed && body.is_none() {
                    return Err(AgentError::Unavailable(format!(
                        "{why} (the agent was restarted; send the body again)"
                    )));
                }
                return call(&ep, &op, body, head_timeout)
                    .await
                    .map_err(|(e, _)| e);
            }
            Err((e, _)) => e,
        };
        Err(why)
    }

    /// Makes sure an agent with our key answers `hello`, restarting it if needed (single-flight
    /// per user: concurrent requests that found it dead wait for one restart).
    async fn restart_agent(&self, ep: &Endpoint, why: &str) -> Result<(), AgentError> {
        let _one = self.slot.agent_restart.lock().await;
        // Someone else may have restarted it while we waited.
        if hello(ep, Duration::from_millis(500)).await.is_ok() {
            return Ok(());
        }
        tracing::warn!(user = %self.slot.user, reason = why, "restarting the sandbox agent");
        self.mgr
            .engine
            .exec_detached(
                &self.container,
                Script::AgentStart.argv(&[]),
                vec![format!("{KEY_ENV}={}", ep.key)],
            )
            .await
            .map_err(|e| AgentError::Unavailable(format!("{why}; restarting it failed: {e}")))?;
        let until = tokio::time::Instant::now() + RESTART_WAIT;
        loop {
            tokio::time::sleep(Duration::from_millis(40)).await;
            match hello(ep, Duration::from_millis(800)).await {
                Ok(_) => return Ok(()),
                Err(e) if tokio::time::Instant::now() >= until => {
                    return Err(AgentError::Unavailable(format!(
                        "{why}; after a restart: {e}"
                    )))
                }
                Err(_) => {}
            }
        }
    }

    /// Whether the agent answers `hello` now (no restart).
    pub async fn agent_hello(&self) -> Result<Value, AgentError> {
        let ep = self
            .agent
            .clone()
            .ok_or_else(|| AgentError::Unavailable("the sandbox has no address".into()))?;
        hello(&ep, HELLO_TIMEOUT).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_has_a_bounded_head_timeout() {
        for op in ["hello", "run", "stat", "write", "untar", "watch", "x"] {
            let t = head_timeout(&json!({ "op": op }));
            assert!(t >= Duration::from_secs(2) && t <= Duration::from_secs(60));
        }
        assert_eq!(head_timeout(&json!({"op": "hello"})), HELLO_TIMEOUT);
    }
}
