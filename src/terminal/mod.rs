//! The terminal: `GET /sandbox/terminal` upgraded to a WebSocket and bridged to a `docker exec`
//! running a login bash on a PTY in the user's sandbox.
//!
//! One WebSocket is one exec (its own PTY and session), never an attach to the container's PID
//! 1: `exit` ends that terminal only. Every refusal (403 Origin, 400/426 handshake, 401 token,
//! 422 query or missing `cwd`, 429 too many terminals) happens before the sandbox is touched or
//! an exec exists.
//!
//! The PTY is made inside the container by util-linux `script`, run in a non-TTY exec; the
//! engine's own TTY is not used. Rejected alternative: `create_exec` with `tty: true` plus
//! `resize_exec`. On a TTY attach dockerd always filters stdin for a detach sequence (an empty
//! `DetachKeys` means the default Ctrl-P Ctrl-Q, not none), so some input would never reach the
//! shell and typing it would cut the terminal off. A non-TTY attach copies stdin verbatim.
//! `script` makes the shell a session leader with the PTY as its controlling terminal (job
//! control works); sizes are applied to that PTY with `stty` (term-wrapper.sh and term-resize.sh
//! under src/sandbox/scripts/).
//!
//! Protocol (documented in the README):
//! - server → client: binary frames carrying raw terminal output;
//! - client → server: binary frames are raw input; text frames are JSON control messages,
//!   parsed by [`parse_control`]: `{"type":"input","data":"…"}`, `{"type":"resize","cols":N,
//!   "rows":M}`, `{"type":"ping"}` (answered with `{"type":"pong"}`). A bad one is answered with
//!   `{"type":"error","code":"invalid_control","message":"…"}` and otherwise ignored;
//! - close codes: 1000 with reason `exit <status>` when the shell ended, 1009 for a frame or
//!   message over `terminal_max_frame_bytes`, 1002/1007 for protocol errors and invalid UTF-8,
//!   1011 when the engine failed.
//!
//! Clean-up: each terminal's processes carry `SANDBOXD_TERMINAL=<server-generated id>` in their
//! environment. When the socket ends for any reason, kill.sh (a constant script taking the id as
//! an argument, scope `joined`) kills the processes carrying it, the sessions they belong to (so
//! `env -i` children that stayed in the terminal's session go too) and all their descendants.
//! Rejected alternative: a pid file written by a wrapper and `pkill -s` on it; a pid that was
//! reused after the shell exited would make that kill another terminal's session, and a `setsid`
//! child would escape it. Only a process that both leaves the session and clears its environment
//! (a deliberate `setsid env -i …` daemon) is not found.
//!
//! Backpressure: the bridge polls the exec's output only after the previous frame was flushed
//! into the socket, and tungstenite's write buffer is bounded, so a client that reads slowly
//! holds back the shell (through the PTY) instead of growing the server's memory.

use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use crate::auth::Auth;
use crate::config::Config;
use crate::edge::listener::ConnInfo;
use crate::edge::upgraded::ClientIo;
use crate::http::error::ApiError;
use crate::http::Body;
use crate::sandbox::shell::{ExecOptions, Script};
use crate::sandbox::Manager;

mod bridge;
mod handshake;
mod protocol;
mod pty;

use crate::http::upgrade::{accept_key, authenticate, check_origin, switching_protocols};
use handshake::{host_dir_state, DirState};
use protocol::ws_config;
use pty::{session, ExecPty, KillOnDrop, COLS_VAR, MARK_VAR, ROWS_VAR};

pub use handshake::{parse_query, Query};
pub use protocol::{parse_control, Control, Size, MAX_DIM};

/// The client has this long to finish the HTTP upgrade after our 101.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(10);

/// The terminal feature: what opening a terminal reads (limits, origins, tokens, the sandbox).
pub(crate) struct Terminals {
    cfg: Arc<Config>,
    mgr: Arc<Manager>,
    auth: Auth,
}

impl Terminals {
    pub(crate) fn new(cfg: Arc<Config>, mgr: Arc<Manager>, auth: Auth) -> Terminals {
        Terminals { cfg, mgr, auth }
    }

    /// `GET /sandbox/terminal`.
    pub(crate) async fn handle(
        &self,
        mut req: Request<Incoming>,
        conn: Arc<ConnInfo>,
    ) -> Response<Body> {
        self.open(&mut req, &conn)
            .await
            .unwrap_or_else(crate::http::upgrade::refusal)
    }

    async fn open(
        &self,
        req: &mut Request<Incoming>,
        conn: &ConnInfo,
    ) -> Result<Response<Body>, ApiError> {
        let headers = req.headers();
        // 1. Origin: browsers always send it; other clients may leave it out.
        check_origin(headers, conn.tls, &self.cfg.origins(), "a terminal")?;
        // 2. The handshake itself.
        let accept = accept_key(req.version(), headers)?;
        // 3. Who: header, then subprotocol, then query.
        let query = parse_query(req.uri().query()).map_err(ApiError::invalid)?;
        let (user, protocol) = authenticate(headers, &self.auth, query.token.as_deref())?;
        // 4. How many: count first, then check, so two racing opens can never both slip under.
        let guard = self.mgr.terminal_opened(&user);
        if self.mgr.slot(&user).open_terminals() > self.cfg.terminal_per_user {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_terminals",
                format!(
                    "at most {} terminals per user are open at once",
                    self.cfg.terminal_per_user
                ),
            )
            .retry_after(1));
        }

        // Swarm mode has no host folder (the workspace is a volume on the user's node): the
        // shell finds out itself.
        let host_ws = self.mgr.host_workspace(&user);
        if host_ws.is_some_and(|ws| host_dir_state(&ws, &query.cwd) == DirState::Missing) {
            return Err(ApiError::invalid(format!(
                "cwd {} is not a folder in the workspace",
                query.cwd
            )));
        }

        // 5. The sandbox and the shell.
        let door = self.mgr.enter(&user).await?;
        let id = uuid::Uuid::new_v4().simple().to_string();
        // Armed before the exec exists: a handler cancelled mid-creation still cleans up.
        let reaper = KillOnDrop {
            door: door.clone(),
            id: id.clone(),
            armed: true,
        };
        let (exec, output, input) = self
            .mgr
            .engine_call(door.open_exec(
                Script::TermWrapper,
                &[],
                ExecOptions {
                    env: vec![
                        "TERM=xterm-256color".into(),
                        "SHELL=/bin/bash".into(),
                        format!("{MARK_VAR}={id}"),
                        format!("{COLS_VAR}={}", query.size.cols),
                        format!("{ROWS_VAR}={}", query.size.rows),
                    ],
                    working_dir: Some(query.cwd.clone()),
                    stdin: true,
                },
            ))
            .await?;
        let pty = ExecPty {
            mgr: self.mgr.clone(),
            user: user.clone(),
            id: id.clone(),
            exec,
        };

        let on_upgrade = hyper::upgrade::on(&mut *req);
        let max_frame = self.cfg.terminal_max_frame_bytes;
        tracing::info!(user = %user, terminal = %id, "terminal opened");
        // In the request's span: the session's log lines carry its request id.
        tokio::spawn(tracing::Instrument::in_current_span(async move {
            let _guard = guard;
            let upgraded = match tokio::time::timeout(UPGRADE_TIMEOUT, on_upgrade).await {
                Ok(Ok(u)) => u,
                Ok(Err(e)) => {
                    tracing::debug!(terminal = %id, error = %e, "terminal upgrade failed");
                    reaper.kill().await;
                    return;
                }
                Err(_) => {
                    tracing::debug!(terminal = %id, "terminal upgrade timed out");
                    reaper.kill().await;
                    return;
                }
            };
            let io = match ClientIo::new(upgraded) {
                Ok(io) => io,
                Err(e) => {
                    tracing::debug!(terminal = %id, error = %e, "terminal socket");
                    reaper.kill().await;
                    return;
                }
            };
            let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(ws_config(max_frame)))
                .await;
            let outcome = session(ws, output, input, &pty).await;
            reaper.kill().await;
            tracing::info!(user = %user, terminal = %id, outcome = ?outcome, "terminal closed");
        }));

        Ok(switching_protocols(&accept, protocol.as_deref()))
    }
}
