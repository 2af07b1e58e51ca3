//! "May an app still come?" for a preview request held while a sandbox boots, answered by the
//! agent's `app` op (docs/agent-protocol.md) instead of a `docker exec`: with twenty sandboxes
//! booting at once on a small host, each exec (engine and runc work) competed with the boots.
//! The exec of `preview-app-may-come.sh` stays as the fallback for an agent from before the op,
//! and for one that cannot be reached once the sandbox is no longer young.

use std::time::Duration;

use serde_json::{json, Value};

use super::{call, AgentError, Endpoint};
use crate::sandbox::shell::Script;
use crate::sandbox::Manager;
use crate::user::UserId;

/// How long the agent may take to answer `app` (counted after the connect, itself bounded by
/// [`super::CONNECT_TIMEOUT`]).
const APP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long after the wait began an agent that cannot be reached still means "an app may
/// come": the image's init starts the agent right after the app, before its discovery is
/// over, so only a host too busy to run it yet (or an agent killed by the sandbox's own code)
/// leaves it unreachable. Past this the exec decides.
pub const AGENT_GRACE: Duration = Duration::from_secs(5);

/// How the question was answered (for logs and tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppAnswerBy {
    /// The agent's `app` op.
    Agent,
    /// Not reachable while the sandbox is young: taken as "may come".
    Young,
    /// The exec of `preview-app-may-come.sh`.
    Exec,
}

/// Asks the agent once, without restarting it: `Ok(may come)`, `Err(Refused)` from an agent
/// that does not know the op, `Err(Unavailable | Lost)` when it cannot be reached.
pub(crate) async fn ask(ep: &Endpoint) -> Result<bool, AgentError> {
    let c = call(ep, &json!({"op": "app"}), None, APP_TIMEOUT)
        .await
        .map_err(|(e, _)| e)?;
    c.head
        .get("mayCome")
        .and_then(Value::as_bool)
        .ok_or_else(|| AgentError::Refused {
            code: "bad_request".into(),
            message: "the answer to `app` has no `mayCome`".into(),
        })
}

impl Manager {
    /// Whether an app may still start listening in `user`'s sandbox: its init has not finished
    /// discovery yet, or the dev server it started is alive. `agent` is the sandbox's agent as
    /// the wake returned it (`None`: ask with the exec); `waited` is how long the request has
    /// been held since the sandbox was running (see [`AGENT_GRACE`]).
    pub(crate) async fn app_may_come(
        &self,
        user: &UserId,
        agent: Option<&Endpoint>,
        waited: Duration,
    ) -> (bool, AppAnswerBy) {
        if let Some(ep) = agent {
            match ask(ep).await {
                Ok(may) => return (may, AppAnswerBy::Agent),
                Err(AgentError::Refused { code, message }) => {
                    tracing::debug!(user = %user, code, message, "the agent has no `app` op; asking with an exec");
                }
                Err(e) if waited < AGENT_GRACE => {
                    tracing::debug!(user = %user, error = %e, "the agent does not answer yet; an app may come");
                    return (true, AppAnswerBy::Young);
                }
                Err(e) => {
                    tracing::info!(user = %user, error = %e, "the agent does not answer; asking with an exec");
                }
            }
        }
        let asked = self.run_script(user, Script::PreviewAppMayCome, &[]).await;
        (matches!(asked, Ok((0, _))), AppAnswerBy::Exec)
    }
}
