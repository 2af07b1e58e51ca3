//! [`Door::agent_call`]: one agent request in the door's container, with recovery. When the
//! agent does not answer properly (connection refused, closed, garbled, or no head in time),
//! the edge restarts it once with `agent-start.sh` (which also removes anything else holding
//! its port), waits until `hello` answers, and retries; if that fails too the request is
//! [`AgentError::Unavailable`] (503 `agent_unavailable` for clients).

use std::time::Duration;

use serde_json::{json, Value};

use super::{call, AgentBody, AgentCall, AgentError, Endpoint, KEY_ENV};
use futures_util::StreamExt;

use crate::sandbox::shell::{bytes_of, Door, ExecOptions, Script};

/// How long `hello` may take before the agent counts as not answering.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(2);
/// How long restarting the agent may take (the exec and the new agent's bind).
const RESTART_WAIT: Duration = Duration::from_secs(5);
/// How long a refused connection waits for an agent that is still starting before the edge
/// replaces it.
const BOOT_GRACE: Duration = Duration::from_millis(1000);

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
                return call(&ep, &op, body, head_timeout).await.map_err(|(e, _)| e);
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
        // A sandbox that just booted may not listen yet: give the agent its init started a
        // moment before replacing it.
        if why.starts_with("connecting") {
            let until = tokio::time::Instant::now() + BOOT_GRACE;
            while tokio::time::Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if hello(ep, Duration::from_millis(500)).await.is_ok() {
                    return Ok(());
                }
            }
        }
        tracing::warn!(user = %self.slot.user, reason = why, "restarting the sandbox agent");
        // Attached, to its end: `--replace` exits once the new agent accepts (so no later
        // start can kill an agent a retried request already talks to).
        let started = tokio::time::timeout(RESTART_WAIT, async {
            let (exec, mut out, _input) = self
                .open_exec(
                    Script::AgentStart,
                    &[],
                    ExecOptions {
                        env: vec![format!("{KEY_ENV}={}", ep.key)],
                        working_dir: None,
                        stdin: false,
                    },
                )
                .await?;
            let mut said = Vec::new();
            while let Some(chunk) = out.next().await {
                let b = bytes_of(chunk?);
                if said.len() < 4096 {
                    said.extend_from_slice(&b);
                }
            }
            let status = exec.status().await?;
            anyhow::Ok((
                status.exit_code,
                String::from_utf8_lossy(&said).into_owned(),
            ))
        })
        .await;
        match started {
            Ok(Ok((Some(0), _))) => {}
            Ok(Ok((code, said))) => {
                return Err(AgentError::Unavailable(format!(
                    "{why}; restarting it failed ({code:?}): {}",
                    said.trim()
                )))
            }
            Ok(Err(e)) => {
                return Err(AgentError::Unavailable(format!(
                    "{why}; restarting it failed: {e:#}"
                )))
            }
            Err(_) => {
                return Err(AgentError::Unavailable(format!(
                    "{why}; restarting it timed out"
                )))
            }
        }
        hello(ep, HELLO_TIMEOUT)
            .await
            .map(|_| ())
            .map_err(|e| AgentError::Unavailable(format!("{why}; after a restart: {e}")))
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
