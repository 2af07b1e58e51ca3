//! The exec behind a terminal: the PTY wrapper's process, its resize, its clean-up when the
//! socket ends, and the session that runs the bridge over the upgraded connection.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::bridge::{bridge, Pty, Timing};
use super::protocol::{close_frame, Outcome, Size};
use crate::sandbox::shell::{self, Door, Exec, Script};
use crate::sandbox::Manager;
use crate::user::UserId;

/// The environment variable that marks every process of one terminal (value: its id).
pub(super) const MARK_VAR: &str = "SANDBOXD_TERMINAL";
/// The initial size, passed to the PTY wrapper (server-made numbers) and unset before the shell.
pub(super) const COLS_VAR: &str = "SANDBOXD_TERMINAL_COLS";
pub(super) const ROWS_VAR: &str = "SANDBOXD_TERMINAL_ROWS";
/// Bound on each closing step (close handshake, draining after an error).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
const KILL_TIMEOUT: Duration = Duration::from_secs(15);
const RESIZE_TIMEOUT: Duration = Duration::from_secs(5);

/// Kills a terminal's processes when dropped without [`KillOnDrop::kill`] having run (a panic, a
/// cancelled handler), so no path leaves a shell behind.
pub(super) struct KillOnDrop {
    pub(super) door: Door,
    pub(super) id: String,
    pub(super) armed: bool,
}

impl KillOnDrop {
    fn job(&self) -> impl Future<Output = ()> + Send + 'static {
        let door = self.door.clone();
        let id = self.id.clone();
        async move {
            // Every session a marked process is in: see the comment of terminal/mod.rs.
            let args = [MARK_VAR.into(), id.clone(), "joined".into(), "0.1".into()];
            let run = door.run_script(Script::Kill, &args);
            match tokio::time::timeout(KILL_TIMEOUT, run).await {
                Ok(Ok((0, _))) => {}
                Ok(Ok((code, out))) => {
                    tracing::warn!(terminal = %id, code, output = %out.trim(), "terminal clean-up incomplete")
                }
                Ok(Err(e)) => {
                    tracing::debug!(terminal = %id, error = format!("{e:#}"), "terminal clean-up failed")
                }
                Err(_) => tracing::warn!(terminal = %id, "terminal clean-up timed out"),
            }
        }
    }

    pub(super) async fn kill(mut self) {
        self.armed = false;
        self.job().await;
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.armed {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(self.job());
            }
        }
    }
}

pub(super) struct ExecPty {
    pub(super) mgr: Arc<Manager>,
    pub(super) user: UserId,
    pub(super) id: String,
    pub(super) exec: Exec,
}

impl Pty for ExecPty {
    fn resize(&self, size: Size) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            let args = [
                self.id.clone(),
                size.cols.to_string(),
                size.rows.to_string(),
            ];
            let run = self.exec.door().run_script(Script::TermResize, &args);
            match tokio::time::timeout(RESIZE_TIMEOUT, run).await {
                Ok(Ok((0, _))) => {}
                Ok(Ok((code, out))) => {
                    tracing::debug!(terminal = %self.id, code, output = %out.trim(), "terminal resize failed")
                }
                Ok(Err(e)) => {
                    tracing::debug!(terminal = %self.id, error = format!("{e:#}"), "terminal resize failed")
                }
                Err(_) => tracing::debug!(terminal = %self.id, "terminal resize timed out"),
            }
        })
    }
    fn input_seen(&self) {
        self.mgr.touch(&self.user);
    }
}

type Ws = WebSocketStream<crate::edge::upgraded::ClientIo>;

/// Runs the bridge, then ends the WebSocket properly for the outcome.
pub(super) async fn session(
    ws: Ws,
    output: shell::Output,
    input: shell::Input,
    pty: &ExecPty,
) -> Outcome {
    let output = output.map(|item| item.map(shell::bytes_of).map_err(anyhow::Error::from));
    let (mut sink, mut stream) = ws.split();
    let health = pty.mgr.health_tracker();
    // The engine going down ends the session at once: its exec stream may neither end nor fail
    // while the engine is frozen.
    let mut outcome = tokio::select! {
        o = bridge(&mut sink, &mut stream, output, input, pty, Timing::default()) => o,
        _ = crate::sandbox::health::wait_down(health.subscribe()) => Outcome::EngineDown,
    };
    let exit = match outcome {
        Outcome::ShellExited => match exit_code(pty).await {
            Ok(code) => code,
            Err(()) => {
                outcome = Outcome::EngineDown;
                None
            }
        },
        Outcome::EngineFailed(_) if !health.is_up() => {
            outcome = Outcome::EngineDown;
            None
        }
        _ => None,
    };
    let Ok(mut ws) = sink.reunite(stream) else {
        return outcome;
    };
    let frame = close_frame(&outcome, exit);
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        match (&outcome, frame) {
            (Outcome::ClientClosed, _) => {
                // tungstenite queued the reply; flush it, then the server closes TCP first.
                let _ = ws.close(None).await;
            }
            (Outcome::Refused(..), Some(frame)) => {
                // The reader is stuck on the bad frame: send the close, then discard what the
                // client still sends (so our close is not lost to a TCP reset).
                let _ = ws.send(Message::Close(Some(frame))).await;
                let raw = ws.get_mut();
                let mut buf = vec![0u8; 16 * 1024];
                while matches!(raw.read(&mut buf).await, Ok(n) if n > 0) {}
            }
            (_, Some(frame)) => {
                // Close, then wait for the client's close so the frame is delivered.
                if ws.send(Message::Close(Some(frame))).await.is_ok() {
                    while let Some(Ok(m)) = ws.next().await {
                        if m.is_close() {
                            break;
                        }
                    }
                }
            }
            (_, None) => {}
        }
    })
    .await;
    outcome
}

/// The shell's exit status; Docker may report the exec as running for a moment after its
/// output ended. `Err` when the engine is gone (the output ended because it went away).
async fn exit_code(pty: &ExecPty) -> Result<Option<i64>, ()> {
    let health = pty.mgr.health_tracker();
    for _ in 0..40 {
        match pty.exec.status().await {
            Ok(i) if !i.running => return Ok(i.exit_code),
            Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) if health.note_error(&e).await => return Err(()),
            Err(_) => return Ok(None),
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn killer_matches_the_mark_and_checks_its_argument() {
        // The id reaches the constant script only as "$1", and is checked to be hex first.
        let (killer, resizer) = (Script::Kill.source(), Script::TermResize.source());
        let wrapper = Script::TermWrapper.source();
        assert!(killer.contains("var=$1 id=$2 scope=$3 pause=$4\n"));
        assert!(killer.contains(&format!("case \"$var\" in SANDBOXD_EXEC | {MARK_VAR}) ;;")));
        assert!(killer.contains("case \"$id\" in '' | *[!0-9a-f]*) exit 2 ;; esac\n"));
        assert!(killer.contains("mark=\"$var=$id\""));
        assert!(resizer.contains(&format!("mark=\"{MARK_VAR}=$id\"")));
        assert!(resizer.contains("case \"$cols\" in '' | *[!0-9]*) exit 2"));
        assert!(wrapper.contains(COLS_VAR) && wrapper.contains(ROWS_VAR));
    }
}
