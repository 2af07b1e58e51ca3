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

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use futures_util::{FutureExt, Sink, SinkExt, Stream, StreamExt};
use hyper::body::Incoming;
use hyper::header::{
    HeaderMap, HeaderValue, CONNECTION, HOST, ORIGIN, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY,
    SEC_WEBSOCKET_PROTOCOL, SEC_WEBSOCKET_VERSION, UPGRADE,
};
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::error::{Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::app::App;
use crate::auth::bearer;
use crate::edge::listener::ConnInfo;
use crate::http::error::ApiError;
use crate::http::{empty, Body};
use crate::sandbox::shell::{self, Door, Exec, ExecOptions, Script};
use crate::sandbox::spec::WORKSPACE;
use crate::sandbox::Manager;
use crate::user::UserId;

/// The environment variable that marks every process of one terminal (value: its id).
pub const MARK_VAR: &str = "SANDBOXD_TERMINAL";
/// The initial size, passed to the PTY wrapper (server-made numbers) and unset before the shell.
const COLS_VAR: &str = "SANDBOXD_TERMINAL_COLS";
const ROWS_VAR: &str = "SANDBOXD_TERMINAL_ROWS";

/// The subprotocol prefix that carries a token (`bearer.<token>`).
pub const BEARER_PROTOCOL_PREFIX: &str = "bearer.";

/// The server pings this often; browsers and tungstenite clients answer on their own.
const PING_EVERY: Duration = Duration::from_secs(20);
/// A client silent for this long (no frame, no pong) is gone: a network drop without a FIN.
const SILENCE_LIMIT: Duration = Duration::from_secs(60);
/// Output is sent in frames of at most this size, which keeps tungstenite's write buffer
/// (bounded below) from ever refusing a frame.
const OUT_FRAME_MAX: usize = 64 * 1024;
const WRITE_BUFFER: usize = 64 * 1024;
const MAX_WRITE_BUFFER: usize = 512 * 1024;
/// The client has this long to finish the HTTP upgrade after our 101.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(10);
/// The close reason when the engine went away under an open terminal.
pub const ENGINE_DOWN_REASON: &str = "engine unavailable";
/// Bound on each closing step (close handshake, draining after an error).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
const KILL_TIMEOUT: Duration = Duration::from_secs(15);
const RESIZE_TIMEOUT: Duration = Duration::from_secs(5);

pub const DEFAULT_SIZE: Size = Size { cols: 80, rows: 24 };
pub const MAX_DIM: u16 = 1000;

/// A terminal size in character cells, always within 1..=1000.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size {
    pub cols: u16,
    pub rows: u16,
}

/// Clamps any integer to 1..=1000.
pub fn clamp_dim(v: i128) -> u16 {
    v.clamp(1, MAX_DIM as i128) as u16
}

/// A client → server text frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Control {
    Input(String),
    Resize(Size),
    Ping,
}

/// Parses a control message. Pure (it is fuzzed): never panics, unknown fields are ignored,
/// sizes are clamped to 1..=1000; the error is a message for the client.
pub fn parse_control(text: &str) -> Result<Control, String> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("control message is not JSON: {e}"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| "control message must be a JSON object".to_owned())?;
    let kind = obj
        .get("type")
        .and_then(|t| t.as_str())
        .ok_or_else(|| "control message needs a string \"type\"".to_owned())?;
    match kind {
        "input" => match obj.get("data") {
            Some(serde_json::Value::String(s)) => Ok(Control::Input(s.clone())),
            _ => Err("input needs a string \"data\"".to_owned()),
        },
        "resize" => {
            let dim = |key: &str| -> Result<u16, String> {
                let n = obj
                    .get(key)
                    .ok_or_else(|| format!("resize needs \"{key}\""))?;
                // Integers of any size clamp; so do floats without a fraction (1e20).
                let n = n
                    .as_i64()
                    .map(i128::from)
                    .or_else(|| n.as_u64().map(i128::from))
                    .or_else(|| {
                        n.as_f64()
                            .filter(|f| f.is_finite() && f.fract() == 0.0)
                            .map(|f| f as i128)
                    })
                    .ok_or_else(|| format!("resize \"{key}\" must be an integer"))?;
                Ok(clamp_dim(n))
            };
            Ok(Control::Resize(Size {
                cols: dim("cols")?,
                rows: dim("rows")?,
            }))
        }
        "ping" => Ok(Control::Ping),
        other => Err(format!(
            "unknown control type {:?}; expected input, resize or ping",
            truncate(other, 64)
        )),
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// The longest prefix of at most `max` bytes that ends on a character boundary (a close
/// reason must fit a 125-byte control frame).
fn cut_bytes(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The text frame answering an invalid control message.
pub fn error_frame(message: &str) -> String {
    serde_json::json!({"type": "error", "code": "invalid_control", "message": message}).to_string()
}

pub const PONG_FRAME: &str = r#"{"type":"pong"}"#;

/// What the query string may carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    pub size: Size,
    pub cwd: String,
    pub token: Option<String>,
}

/// Parses `cols`, `rows`, `cwd` and `token`; other keys are ignored, a repeated key is an
/// error (which of two values a proxy or a server would pick is a classic ambiguity).
pub fn parse_query(q: Option<&str>) -> Result<Query, String> {
    let mut out = Query {
        size: DEFAULT_SIZE,
        cwd: WORKSPACE.to_owned(),
        token: None,
    };
    let (mut cols, mut rows, mut cwd, mut token) = (None, None, None, None);
    for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_decode(k)?;
        let slot = match k.as_str() {
            "cols" => &mut cols,
            "rows" => &mut rows,
            "cwd" => &mut cwd,
            "token" => &mut token,
            _ => continue,
        };
        if slot.is_some() {
            return Err(format!("query parameter {k} is given more than once"));
        }
        *slot = Some(percent_decode(v)?);
    }
    let dim = |name: &str, v: &str| -> Result<u16, String> {
        let v = v.trim();
        let ok = !v.is_empty()
            && v.len() <= 40
            && v.strip_prefix('-')
                .unwrap_or(v)
                .bytes()
                .all(|b| b.is_ascii_digit());
        if !ok {
            return Err(format!("{name} must be an integer"));
        }
        // More digits than i128 holds still clamps: only the sign matters then.
        Ok(v.parse::<i128>()
            .map(clamp_dim)
            .unwrap_or(if v.starts_with('-') { 1 } else { MAX_DIM }))
    };
    if let Some(c) = cols {
        out.size.cols = dim("cols", &c)?;
    }
    if let Some(r) = rows {
        out.size.rows = dim("rows", &r)?;
    }
    if let Some(c) = cwd {
        out.cwd = validate_cwd(&c)?;
    }
    out.token = token.filter(|t| !t.is_empty());
    Ok(out)
}

/// `/workspace` or an absolute path below it, without `.`/`..` components or control
/// characters; returned without a trailing slash.
pub fn validate_cwd(p: &str) -> Result<String, String> {
    let err = || format!("cwd must be {WORKSPACE} or a path inside it, without . or .. parts");
    if p.len() > 4096 || p.chars().any(char::is_control) {
        return Err(err());
    }
    let rest = p.strip_prefix(WORKSPACE).ok_or_else(err)?;
    if !(rest.is_empty() || rest.starts_with('/')) {
        return Err(err());
    }
    let mut clean = WORKSPACE.to_owned();
    for part in rest.split('/').filter(|s| !s.is_empty()) {
        if part == "." || part == ".." {
            return Err(err());
        }
        clean.push('/');
        clean.push_str(part);
    }
    Ok(clean)
}

/// `%XX` and `+` decoding of one query component; the result must be UTF-8.
pub fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| "invalid percent-encoding in the query".to_owned())?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| "the query is not UTF-8".to_owned())
}

/// Comma-separated tokens of every instance of a header, trimmed.
fn header_tokens<'a>(headers: &'a HeaderMap, name: &hyper::header::HeaderName) -> Vec<&'a str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect()
}

/// The first offered `bearer.<token>` subprotocol, which the response must echo exactly.
pub fn bearer_protocol(headers: &HeaderMap) -> Option<&str> {
    header_tokens(headers, &SEC_WEBSOCKET_PROTOCOL)
        .into_iter()
        .find(|p| p.starts_with(BEARER_PROTOCOL_PREFIX) && p.len() > BEARER_PROTOCOL_PREFIX.len())
}

/// Checks an RFC 6455 opening handshake; returns the `Sec-WebSocket-Accept` value.
pub fn accept_key(version: Version, headers: &HeaderMap) -> Result<String, ApiError> {
    let bad = |m: &str| ApiError::new(StatusCode::BAD_REQUEST, "not_websocket", m);
    if version != Version::HTTP_11 {
        return Err(bad("the terminal needs a WebSocket upgrade over HTTP/1.1"));
    }
    let has = |name, token: &str| {
        header_tokens(headers, name)
            .iter()
            .any(|t| t.eq_ignore_ascii_case(token))
    };
    if !has(&CONNECTION, "upgrade") || !has(&UPGRADE, "websocket") {
        return Err(bad(
            "expected a WebSocket upgrade (Connection: Upgrade, Upgrade: websocket)",
        ));
    }
    let versions = header_tokens(headers, &SEC_WEBSOCKET_VERSION);
    if versions != ["13"] {
        // `handle` adds the `Sec-WebSocket-Version: 13` header RFC 6455 asks for.
        return Err(ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "websocket_version",
            "only WebSocket version 13 is supported",
        ));
    }
    let mut keys = headers.get_all(SEC_WEBSOCKET_KEY).iter();
    let key = match (keys.next(), keys.next()) {
        (Some(k), None) => k.as_bytes(),
        _ => return Err(bad("exactly one Sec-WebSocket-Key is required")),
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(key)
        .map_err(|_| bad("Sec-WebSocket-Key is not base64"))?;
    if decoded.len() != 16 {
        return Err(bad("Sec-WebSocket-Key must encode 16 bytes"));
    }
    Ok(derive_accept_key(key))
}

/// Whether a browser `Origin` may open a terminal: one of the configured (or default) origins,
/// or the request's own origin (`scheme://Host`). The second rule is what browsers enforce
/// for same-origin pages and is safe here because the router only sends the main host's names
/// to this handler (a DNS-rebinding page arrives with a foreign Host and never gets here).
pub fn origin_allowed(origin: &str, allowed: &[String], own: Option<&str>) -> bool {
    let o = origin.trim().trim_end_matches('/').to_ascii_lowercase();
    if o.is_empty() || o == "null" {
        return false;
    }
    allowed
        .iter()
        .any(|a| a.trim_end_matches('/').eq_ignore_ascii_case(&o))
        || own.is_some_and(|own| own.eq_ignore_ascii_case(&o))
}

#[derive(Debug, PartialEq, Eq)]
pub enum DirState {
    Dir,
    Missing,
    /// A symlink on the way (resolved only inside the container) or an unreadable part.
    Unknown,
}

/// Whether a validated `cwd` (`/workspace/...`) is a folder, looked up in the workspace's host
/// folder, which is what the container mounts on /workspace. Symlinks are never followed on
/// the host (they point into the container's file system); the engine decides about those.
pub fn host_dir_state(workspace: &std::path::Path, cwd: &str) -> DirState {
    let rel = cwd.strip_prefix(WORKSPACE).unwrap_or(cwd);
    let mut path = workspace.to_path_buf();
    for part in rel.split('/').filter(|p| !p.is_empty()) {
        path.push(part);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => return DirState::Unknown,
            Ok(m) if m.is_dir() => {}
            Ok(_) => return DirState::Missing,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return DirState::Missing,
            Err(_) => return DirState::Unknown,
        }
    }
    DirState::Dir
}

/// The exec side of the bridge.
pub trait Pty: Send + Sync {
    /// Applies a size; the bridge awaits it before forwarding later input, so a program run
    /// right after a resize sees the new size.
    fn resize(&self, size: Size) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
    /// Called on every client input (activity for the idle policy).
    fn input_seen(&self);
}

/// How a bridged session ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The exec's output ended: the shell exited.
    ShellExited,
    /// The client sent a close frame.
    ClientClosed,
    /// The client went away without closing (transport error, silence past the limit).
    Gone,
    /// The client broke the protocol; the close code to send (1009, 1002, 1007).
    Refused(u16, String),
    /// The engine failed (reading output); close with 1011.
    EngineFailed(String),
    /// The engine went away (down or restarting, see sandbox/health.rs); close with 1011.
    EngineDown,
}

/// Bridge timing (the defaults in production, short values in tests).
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub ping_every: Duration,
    pub silence_limit: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            ping_every: PING_EVERY,
            silence_limit: SILENCE_LIMIT,
        }
    }
}

fn refusal(e: &WsError) -> Option<Outcome> {
    match e {
        WsError::Capacity(c) => Some(Outcome::Refused(1009, format!("frame too large: {c}"))),
        // A TCP close without a close frame is a drop, not a protocol violation worth a reply.
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
        WsError::Protocol(p) => Some(Outcome::Refused(1002, format!("protocol error: {p}"))),
        WsError::Utf8 => Some(Outcome::Refused(1007, "text frame is not UTF-8".into())),
        _ => None,
    }
}

/// Moves bytes between a WebSocket (`sink`/`stream`) and an exec (`output`/`input`) until one
/// side ends. Generic so unit tests can drive it with channels.
///
/// Two halves run concurrently: the reader forwards client frames to the exec (and so is never
/// stuck behind a slow output send: Ctrl-C still arrives during a flood); the writer sends
/// control answers, pings and output, and pulls the next output chunk only when the previous
/// frame was flushed into the socket.
pub async fn bridge<Si, St, O, I>(
    sink: &mut Si,
    stream: &mut St,
    output: O,
    input: I,
    pty: &dyn Pty,
    timing: Timing,
) -> Outcome
where
    Si: Sink<Message> + Unpin,
    St: Stream<Item = Result<Message, WsError>> + Unpin,
    O: Stream<Item = anyhow::Result<Bytes>>,
    I: AsyncWrite,
{
    let start = Instant::now();
    let last_seen = AtomicU64::new(0);
    let seen = || last_seen.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<Message>(8);

    let reader = async {
        tokio::pin!(input);
        // After the exec's input fails (the shell is exiting), input is dropped; the output
        // side reports the end.
        let mut input_ok = true;
        // A frame read ahead while collapsing a burst of resizes.
        let mut stash = None;
        loop {
            let next = match stash.take() {
                Some(item) => item,
                None => stream.next().await,
            };
            let msg = match next {
                None => return Outcome::Gone,
                Some(Err(e)) => return refusal(&e).unwrap_or(Outcome::Gone),
                Some(Ok(m)) => m,
            };
            seen();
            let data = match msg {
                Message::Binary(b) => b,
                Message::Text(t) => match parse_control(&t) {
                    Ok(Control::Input(s)) => s.into_bytes(),
                    Ok(Control::Resize(mut size)) => {
                        // A window drag sends many resizes; only the last one already here
                        // matters, and each costs an exec.
                        while let Some(item) = stream.next().now_or_never() {
                            match item {
                                Some(Ok(Message::Text(t))) => match parse_control(&t) {
                                    Ok(Control::Resize(s)) => size = s,
                                    _ => {
                                        stash = Some(Some(Ok(Message::Text(t))));
                                        break;
                                    }
                                },
                                other => {
                                    stash = Some(other);
                                    break;
                                }
                            }
                        }
                        pty.resize(size).await;
                        continue;
                    }
                    Ok(Control::Ping) => {
                        let _ = ctl_tx.send(Message::Text(PONG_FRAME.into())).await;
                        continue;
                    }
                    Err(m) => {
                        let _ = ctl_tx.send(Message::Text(error_frame(&m))).await;
                        continue;
                    }
                },
                Message::Close(_) => return Outcome::ClientClosed,
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            };
            pty.input_seen();
            if input_ok && !data.is_empty() {
                let r = async {
                    input.write_all(&data).await?;
                    input.flush().await
                };
                if let Err(e) = r.await {
                    tracing::debug!(error = %e, "terminal input closed");
                    input_ok = false;
                }
            }
        }
    };

    let writer = async {
        tokio::pin!(output);
        let mut ticker = tokio::time::interval(timing.ping_every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            tokio::select! {
                biased;
                Some(m) = ctl_rx.recv() => {
                    if sink.send(m).await.is_err() {
                        return Outcome::Gone;
                    }
                }
                _ = ticker.tick() => {
                    let silent = (start.elapsed().as_millis() as u64)
                        .saturating_sub(last_seen.load(Ordering::Relaxed));
                    if silent > timing.silence_limit.as_millis() as u64 {
                        return Outcome::Gone;
                    }
                    if sink.send(Message::Ping(Vec::new())).await.is_err() {
                        return Outcome::Gone;
                    }
                }
                chunk = output.next() => match chunk {
                    Some(Ok(bytes)) => {
                        for part in bytes.chunks(OUT_FRAME_MAX) {
                            if sink.send(Message::Binary(part.to_vec())).await.is_err() {
                                return Outcome::Gone;
                            }
                        }
                    }
                    Some(Err(e)) => return Outcome::EngineFailed(format!("{e:#}")),
                    None => return Outcome::ShellExited,
                },
            }
        }
    };

    tokio::select! {
        o = reader => o,
        o = writer => o,
    }
}

/// The close frame for an outcome. `exit` is the shell's status when it ended.
pub fn close_frame(outcome: &Outcome, exit: Option<i64>) -> Option<CloseFrame<'static>> {
    let (code, reason) = match outcome {
        Outcome::ShellExited => (
            1000,
            match exit {
                Some(c) => format!("exit {c}"),
                None => "exit".to_owned(),
            },
        ),
        Outcome::Refused(code, reason) => (*code, cut_bytes(reason, 120).to_owned()),
        Outcome::EngineFailed(_) => (1011, "terminal failed".to_owned()),
        Outcome::EngineDown => (1011, ENGINE_DOWN_REASON.to_owned()),
        Outcome::ClientClosed | Outcome::Gone => return None,
    };
    Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    })
}

fn ws_config(max_frame: usize) -> WebSocketConfig {
    WebSocketConfig {
        max_frame_size: Some(max_frame),
        max_message_size: Some(max_frame),
        write_buffer_size: WRITE_BUFFER,
        max_write_buffer_size: MAX_WRITE_BUFFER,
        ..WebSocketConfig::default()
    }
}

/// Kills a terminal's processes when dropped without [`Reaper::kill`] having run (a panic, a
/// cancelled handler), so no path leaves a shell behind.
struct Reaper {
    door: Door,
    id: String,
    armed: bool,
}

impl Reaper {
    fn job(&self) -> impl Future<Output = ()> + Send + 'static {
        let door = self.door.clone();
        let id = self.id.clone();
        async move {
            // Every session a marked process is in: see the module comment.
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

    async fn kill(mut self) {
        self.armed = false;
        self.job().await;
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        if self.armed {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(self.job());
            }
        }
    }
}

struct ExecPty {
    mgr: Arc<Manager>,
    user: UserId,
    id: String,
    exec: Exec,
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

/// `GET /sandbox/terminal`.
pub async fn handle(
    app: &Arc<App>,
    mut req: Request<Incoming>,
    conn: Arc<ConnInfo>,
) -> Response<Body> {
    match open(app, &mut req, &conn).await {
        Ok(resp) => resp,
        Err(e) => {
            let version_refused = e.status == StatusCode::UPGRADE_REQUIRED;
            let mut resp = e.into_response();
            if version_refused {
                resp.headers_mut()
                    .insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
            }
            resp
        }
    }
}

async fn open(
    app: &Arc<App>,
    req: &mut Request<Incoming>,
    conn: &ConnInfo,
) -> Result<Response<Body>, ApiError> {
    let headers = req.headers();
    // 1. Origin: browsers always send it; other clients may leave it out.
    let mut origins = headers.get_all(ORIGIN).iter();
    if let Some(origin) = origins.next() {
        let own = headers
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .map(|h| format!("{}://{}", if conn.tls { "https" } else { "http" }, h.trim()));
        let ok = origins.next().is_none()
            && origin
                .to_str()
                .is_ok_and(|o| origin_allowed(o, &app.cfg.origins(), own.as_deref()));
        if !ok {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "origin_not_allowed",
                "this Origin may not open a terminal",
            ));
        }
    }
    // 2. The handshake itself.
    let accept = accept_key(req.version(), headers)?;
    // 3. Who: header, then subprotocol, then query.
    let query = parse_query(req.uri().query()).map_err(ApiError::invalid)?;
    let protocol = bearer_protocol(headers).map(str::to_owned);
    let token = bearer(headers)
        .map(str::to_owned)
        .or_else(|| {
            protocol
                .as_deref()
                .map(|p| p[BEARER_PROTOCOL_PREFIX.len()..].to_owned())
        })
        .or_else(|| query.token.clone())
        .ok_or_else(|| ApiError::unauthorized("missing bearer token"))?;
    let user = app
        .auth
        .verify(&token)
        .map_err(|e| ApiError::unauthorized(e.to_string()))?;
    crate::access::note_user(user.as_str());
    // 4. How many: count first, then check, so two racing opens can never both slip under.
    let guard = app.mgr.terminal_opened(&user);
    if app.mgr.slot(&user).open_terminals() > app.cfg.terminal_per_user {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_terminals",
            format!(
                "at most {} terminals per user are open at once",
                app.cfg.terminal_per_user
            ),
        )
        .retry_after(1));
    }

    if host_dir_state(&app.mgr.workspace_path(&user), &query.cwd) == DirState::Missing {
        return Err(ApiError::invalid(format!(
            "cwd {} is not a folder in the workspace",
            query.cwd
        )));
    }

    // 5. The sandbox and the shell.
    let door = app.mgr.enter(&user).await?;
    let id = uuid::Uuid::new_v4().simple().to_string();
    // Armed before the exec exists: a handler cancelled mid-creation still cleans up.
    let reaper = Reaper {
        door: door.clone(),
        id: id.clone(),
        armed: true,
    };
    let (exec, output, input) = app
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
        mgr: app.mgr.clone(),
        user: user.clone(),
        id: id.clone(),
        exec,
    };

    let on_upgrade = hyper::upgrade::on(&mut *req);
    let max_frame = app.cfg.terminal_max_frame_bytes;
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
        let ws = WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            Some(ws_config(max_frame)),
        )
        .await;
        let outcome = session(ws, output, input, &pty).await;
        reaper.kill().await;
        tracing::info!(user = %user, terminal = %id, outcome = ?outcome, "terminal closed");
    }));

    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(
        SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
    );
    if let Some(p) = protocol {
        // It came from a header value, so it is one.
        if let Ok(v) = HeaderValue::from_str(&p) {
            h.insert(SEC_WEBSOCKET_PROTOCOL, v);
        }
    }
    Ok(resp)
}

type Ws = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// Runs the bridge, then ends the WebSocket properly for the outcome.
async fn session(ws: Ws, output: shell::Output, input: shell::Input, pty: &ExecPty) -> Outcome {
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
    use std::sync::Mutex;
    use tokio::io::AsyncReadExt;
    use tokio_tungstenite::tungstenite::error::CapacityError;

    #[test]
    fn control_messages() {
        assert_eq!(
            parse_control(r#"{"type":"input","data":"ls\r"}"#),
            Ok(Control::Input("ls\r".into()))
        );
        assert_eq!(
            parse_control(r#"{"type":"resize","cols":120,"rows":40,"extra":1}"#),
            Ok(Control::Resize(Size {
                cols: 120,
                rows: 40
            }))
        );
        assert_eq!(
            parse_control(r#"{"type":"resize","cols":0,"rows":1e300}"#),
            Ok(Control::Resize(Size {
                cols: 1,
                rows: 1000
            }))
        );
        assert_eq!(
            parse_control(r#"{"type":"resize","cols":-5,"rows":18446744073709551615}"#),
            Ok(Control::Resize(Size {
                cols: 1,
                rows: 1000
            }))
        );
        assert_eq!(
            parse_control(r#"{"type":"resize","cols":0,"rows":1001}"#),
            Ok(Control::Resize(Size {
                cols: 1,
                rows: 1000
            }))
        );
        assert_eq!(parse_control(r#"{"type":"ping"}"#), Ok(Control::Ping));
        for bad in [
            "",
            "not json",
            "[]",
            "42",
            r#"{"data":"x"}"#,
            r#"{"type":5}"#,
            r#"{"type":"input"}"#,
            r#"{"type":"input","data":5}"#,
            r#"{"type":"resize","cols":"80","rows":24}"#,
            r#"{"type":"resize","cols":80.5,"rows":24}"#,
            r#"{"type":"resize","rows":24}"#,
            r#"{"type":"exec","cmd":"rm -rf /"}"#,
        ] {
            assert!(parse_control(bad).is_err(), "{bad:?} should be refused");
        }
        // Long unknown types are cut in the message.
        let long = format!(r#"{{"type":"{}"}}"#, "é".repeat(500));
        assert!(parse_control(&long).unwrap_err().len() < 300);
        let e: serde_json::Value = serde_json::from_str(&error_frame("bad \"x\"")).unwrap();
        assert_eq!(e["type"], "error");
        assert_eq!(e["code"], "invalid_control");
        assert_eq!(e["message"], "bad \"x\"");
    }

    #[test]
    fn query_parsing() {
        let q = parse_query(None).unwrap();
        assert_eq!(q.size, DEFAULT_SIZE);
        assert_eq!(q.cwd, "/workspace");
        assert_eq!(q.token, None);
        let q = parse_query(Some(
            "cols=132&rows=0&cwd=%2Fworkspace%2Fmy+app%2F&token=a.b.c&x=1",
        ))
        .unwrap();
        assert_eq!(q.size, Size { cols: 132, rows: 1 });
        assert_eq!(q.cwd, "/workspace/my app");
        assert_eq!(q.token.as_deref(), Some("a.b.c"));
        let q = parse_query(Some("cols=99999999999999999999999999999999999999&rows=-7")).unwrap();
        assert_eq!(
            q.size,
            Size {
                cols: 1000,
                rows: 1
            }
        );
        for bad in [
            "cols=abc",
            "cols=",
            "rows=1.5",
            "cols=1&cols=2",
            "cwd=/etc",
            "cwd=/workspace/../etc",
            "cwd=/workspacex",
            "cwd=workspace",
            "cwd=/workspace/a%00b",
            "cwd=%zz",
            "token=%ff",
        ] {
            assert!(parse_query(Some(bad)).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn cwd_rules() {
        assert_eq!(validate_cwd("/workspace").unwrap(), "/workspace");
        assert_eq!(validate_cwd("/workspace/").unwrap(), "/workspace");
        assert_eq!(validate_cwd("/workspace//a/b/").unwrap(), "/workspace/a/b");
        assert_eq!(validate_cwd("/workspace/a..b").unwrap(), "/workspace/a..b");
        for bad in [
            "",
            "/",
            "/work",
            "/workspace/..",
            "/workspace/./a",
            "/workspace/a/../..",
            "/workspace\n",
        ] {
            assert!(validate_cwd(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cwd_lookup_on_the_host_never_follows_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path();
        std::fs::create_dir_all(ws.join("a/b")).unwrap();
        std::fs::write(ws.join("f"), "x").unwrap();
        std::os::unix::fs::symlink("/etc", ws.join("link")).unwrap();
        assert_eq!(host_dir_state(ws, "/workspace"), DirState::Dir);
        assert_eq!(host_dir_state(ws, "/workspace/a/b"), DirState::Dir);
        assert_eq!(host_dir_state(ws, "/workspace/a/c"), DirState::Missing);
        assert_eq!(host_dir_state(ws, "/workspace/f"), DirState::Missing);
        assert_eq!(host_dir_state(ws, "/workspace/link"), DirState::Unknown);
        assert_eq!(host_dir_state(ws, "/workspace/link/ssl"), DirState::Unknown);
    }

    #[test]
    fn origins() {
        let allowed = vec![
            "https://app.example.com".to_owned(),
            "http://localhost:8080".to_owned(),
        ];
        assert!(origin_allowed("https://app.example.com", &allowed, None));
        assert!(origin_allowed("HTTPS://App.Example.com/", &allowed, None));
        assert!(!origin_allowed(
            "https://app.example.com.evil.test",
            &allowed,
            None
        ));
        assert!(!origin_allowed("http://app.example.com", &allowed, None));
        assert!(!origin_allowed("null", &allowed, None));
        assert!(!origin_allowed("", &allowed, None));
        assert!(origin_allowed(
            "http://127.0.0.1:5555",
            &allowed,
            Some("http://127.0.0.1:5555")
        ));
        assert!(!origin_allowed(
            "http://evil.test",
            &allowed,
            Some("http://127.0.0.1:5555")
        ));
    }

    fn handshake_headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn handshake_checks() {
        let good = [
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ];
        // RFC 6455's own example.
        assert_eq!(
            accept_key(Version::HTTP_11, &handshake_headers(&good)).unwrap(),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(
            accept_key(Version::HTTP_2, &handshake_headers(&good))
                .unwrap_err()
                .status,
            StatusCode::BAD_REQUEST
        );
        let mut no_upgrade = good.to_vec();
        no_upgrade.remove(1);
        assert_eq!(
            accept_key(Version::HTTP_11, &handshake_headers(&no_upgrade))
                .unwrap_err()
                .status,
            StatusCode::BAD_REQUEST
        );
        let mut v8 = good.to_vec();
        v8[2] = ("sec-websocket-version", "8");
        assert_eq!(
            accept_key(Version::HTTP_11, &handshake_headers(&v8))
                .unwrap_err()
                .status,
            StatusCode::UPGRADE_REQUIRED
        );
        let mut short_key = good.to_vec();
        short_key[3] = ("sec-websocket-key", "c2hvcnQ=");
        assert_eq!(
            accept_key(Version::HTTP_11, &handshake_headers(&short_key))
                .unwrap_err()
                .status,
            StatusCode::BAD_REQUEST
        );
        let mut two_keys = good.to_vec();
        two_keys.push(("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(accept_key(Version::HTTP_11, &handshake_headers(&two_keys)).is_err());
    }

    #[test]
    fn bearer_subprotocol() {
        let h = handshake_headers(&[
            ("sec-websocket-protocol", "tty, bearer.abc.def"),
            ("sec-websocket-protocol", "bearer.zzz"),
        ]);
        assert_eq!(bearer_protocol(&h), Some("bearer.abc.def"));
        let h = handshake_headers(&[("sec-websocket-protocol", "bearer.")]);
        assert_eq!(bearer_protocol(&h), None);
        assert_eq!(bearer_protocol(&HeaderMap::new()), None);
    }

    #[test]
    fn close_frames() {
        let f = close_frame(&Outcome::ShellExited, Some(3)).unwrap();
        assert_eq!((u16::from(f.code), f.reason.as_ref()), (1000, "exit 3"));
        let f = close_frame(&Outcome::ShellExited, None).unwrap();
        assert_eq!((u16::from(f.code), f.reason.as_ref()), (1000, "exit"));
        let f = close_frame(&Outcome::Refused(1009, "x".repeat(500)), None).unwrap();
        assert_eq!(u16::from(f.code), 1009);
        assert!(
            f.reason.len() <= 123,
            "close reasons must fit a control frame"
        );
        let f = close_frame(&Outcome::Refused(1002, "é".repeat(100)), None).unwrap();
        assert_eq!(f.reason.len(), 120);
        assert_eq!(
            u16::from(
                close_frame(&Outcome::EngineFailed("e".into()), None)
                    .unwrap()
                    .code
            ),
            1011
        );
        let f = close_frame(&Outcome::EngineDown, None).unwrap();
        assert_eq!(u16::from(f.code), 1011);
        assert_eq!(f.reason, ENGINE_DOWN_REASON);
        assert!(close_frame(&Outcome::ClientClosed, None).is_none());
        assert!(close_frame(&Outcome::Gone, None).is_none());
    }

    // ---- bridge, driven by channels -------------------------------------------------------

    #[derive(Default)]
    struct FakePty {
        sizes: Mutex<Vec<Size>>,
        inputs: AtomicU64,
    }

    impl Pty for FakePty {
        fn resize(&self, size: Size) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
            self.sizes.lock().unwrap().push(size);
            Box::pin(async {})
        }
        fn input_seen(&self) {
            self.inputs.fetch_add(1, Ordering::Relaxed);
        }
    }

    type ClientTx = mpsc::Sender<Result<Message, WsError>>;
    type OutTx = mpsc::Sender<anyhow::Result<Bytes>>;

    struct Harness {
        client: ClientTx,
        /// What the bridge sent to the client.
        sent: mpsc::Receiver<Message>,
        exec_out: OutTx,
        /// What reached the exec's stdin.
        stdin: tokio::io::DuplexStream,
        pty: Arc<FakePty>,
        done: tokio::task::JoinHandle<Outcome>,
    }

    /// Starts a bridge whose WebSocket sink holds `sink_cap` frames and whose exec output
    /// channel holds `out_cap` chunks.
    fn harness(sink_cap: usize, out_cap: usize, timing: Timing) -> Harness {
        let (client, mut from_client) = mpsc::channel::<Result<Message, WsError>>(16);
        let (to_client, sent) = mpsc::channel::<Message>(sink_cap);
        let (exec_out, mut out_rx) = mpsc::channel::<anyhow::Result<Bytes>>(out_cap);
        let (stdin_w, stdin) = tokio::io::duplex(64 * 1024);
        let pty = Arc::new(FakePty::default());
        let p = pty.clone();
        let done = tokio::spawn(async move {
            let mut sink = Box::pin(futures_util::sink::unfold(
                to_client,
                |tx, m: Message| async move {
                    tx.send(m).await.map_err(|_| "client gone")?;
                    Ok::<_, &str>(tx)
                },
            ));
            let mut stream = futures_util::stream::poll_fn(move |cx| from_client.poll_recv(cx));
            let output = futures_util::stream::poll_fn(move |cx| out_rx.poll_recv(cx));
            bridge(&mut sink, &mut stream, output, stdin_w, &*p, timing).await
        });
        Harness {
            client,
            sent,
            exec_out,
            stdin,
            pty,
            done,
        }
    }

    const SLOW: Timing = Timing {
        ping_every: Duration::from_secs(3600),
        silence_limit: Duration::from_secs(7200),
    };

    async fn recv(rx: &mut mpsc::Receiver<Message>) -> Message {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("a frame within 5 s")
            .expect("bridge still sending")
    }

    #[tokio::test]
    async fn bridge_moves_bytes_both_ways_and_reports_the_shell_exit() {
        let mut h = harness(16, 16, SLOW);
        h.client
            .send(Ok(Message::Binary(b"echo hi\r".to_vec())))
            .await
            .unwrap();
        h.client
            .send(Ok(Message::Text(
                r#"{"type":"input","data":"\u0010\u0011"}"#.into(),
            )))
            .await
            .unwrap();
        let mut got = vec![0u8; 10];
        tokio::time::timeout(Duration::from_secs(5), h.stdin.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, b"echo hi\r\x10\x11");
        assert_eq!(h.pty.inputs.load(Ordering::Relaxed), 2);

        h.exec_out
            .send(Ok(Bytes::from_static(b"hi\r\n")))
            .await
            .unwrap();
        assert_eq!(recv(&mut h.sent).await, Message::Binary(b"hi\r\n".to_vec()));
        // A big chunk is split into bounded frames.
        h.exec_out
            .send(Ok(Bytes::from(vec![b'x'; OUT_FRAME_MAX * 2 + 1])))
            .await
            .unwrap();
        for len in [OUT_FRAME_MAX, OUT_FRAME_MAX, 1] {
            match recv(&mut h.sent).await {
                Message::Binary(b) => assert_eq!(b.len(), len),
                m => panic!("unexpected {m:?}"),
            }
        }
        drop(h.exec_out);
        assert_eq!(h.done.await.unwrap(), Outcome::ShellExited);
    }

    #[tokio::test]
    async fn bridge_answers_control_messages_and_keeps_going() {
        let mut h = harness(16, 16, SLOW);
        h.client
            .send(Ok(Message::Text(r#"{"type":"ping"}"#.into())))
            .await
            .unwrap();
        assert_eq!(recv(&mut h.sent).await, Message::Text(PONG_FRAME.into()));
        h.client
            .send(Ok(Message::Text("{oops".into())))
            .await
            .unwrap();
        match recv(&mut h.sent).await {
            Message::Text(t) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                assert_eq!(v["type"], "error");
                assert_eq!(v["code"], "invalid_control");
            }
            m => panic!("unexpected {m:?}"),
        }
        h.client
            .send(Ok(Message::Text(
                r#"{"type":"resize","cols":5000,"rows":50}"#.into(),
            )))
            .await
            .unwrap();
        // Input after a resize is forwarded only once the resize was applied.
        h.client
            .send(Ok(Message::Binary(b"z".to_vec())))
            .await
            .unwrap();
        let mut b = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(5), h.stdin.read_exact(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            *h.pty.sizes.lock().unwrap(),
            vec![Size {
                cols: 1000,
                rows: 50
            }]
        );
        h.client.send(Ok(Message::Close(None))).await.unwrap();
        assert_eq!(h.done.await.unwrap(), Outcome::ClientClosed);
    }

    #[tokio::test]
    async fn bridge_collapses_a_burst_of_resizes_and_keeps_what_follows() {
        let mut h = harness(16, 16, SLOW);
        // Queue the whole burst before the bridge gets to run.
        for cols in [10, 20, 30] {
            let m = format!(r#"{{"type":"resize","cols":{cols},"rows":5}}"#);
            h.client.send(Ok(Message::Text(m))).await.unwrap();
        }
        h.client
            .send(Ok(Message::Text(r#"{"type":"input","data":"q"}"#.into())))
            .await
            .unwrap();
        h.client
            .send(Ok(Message::Text(
                r#"{"type":"resize","cols":40,"rows":6}"#.into(),
            )))
            .await
            .unwrap();
        h.client
            .send(Ok(Message::Binary(b"w".to_vec())))
            .await
            .unwrap();
        let mut b = [0u8; 2];
        tokio::time::timeout(Duration::from_secs(5), h.stdin.read_exact(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&b, b"qw");
        let sizes = h.pty.sizes.lock().unwrap().clone();
        assert_eq!(sizes.last(), Some(&Size { cols: 40, rows: 6 }));
        assert!(sizes.contains(&Size { cols: 30, rows: 5 }), "{sizes:?}");
        assert!(
            !sizes.contains(&Size { cols: 10, rows: 5 }),
            "the burst was not collapsed: {sizes:?}"
        );
        drop(h.client);
        assert_eq!(h.done.await.unwrap(), Outcome::Gone);
    }

    #[tokio::test]
    async fn bridge_maps_oversized_and_broken_frames_to_close_codes() {
        let h = harness(16, 16, SLOW);
        let too_long = CapacityError::MessageTooLong {
            size: 2 << 20,
            max_size: 1 << 20,
        };
        h.client
            .send(Err(WsError::Capacity(too_long)))
            .await
            .unwrap();
        match h.done.await.unwrap() {
            Outcome::Refused(1009, _) => {}
            o => panic!("unexpected {o:?}"),
        }
        let h = harness(16, 16, SLOW);
        h.client
            .send(Err(WsError::Protocol(
                ProtocolError::UnmaskedFrameFromClient,
            )))
            .await
            .unwrap();
        assert!(matches!(h.done.await.unwrap(), Outcome::Refused(1002, _)));
        let h = harness(16, 16, SLOW);
        h.client
            .send(Err(WsError::Protocol(
                ProtocolError::ResetWithoutClosingHandshake,
            )))
            .await
            .unwrap();
        assert_eq!(h.done.await.unwrap(), Outcome::Gone);
        let h = harness(16, 16, SLOW);
        drop(h.client);
        assert_eq!(h.done.await.unwrap(), Outcome::Gone);
    }

    #[tokio::test]
    async fn bridge_pulls_output_only_as_fast_as_the_client_takes_it() {
        // The client takes one frame and then stops reading.
        let mut h = harness(1, 1, SLOW);
        let mut pushed = 0;
        for _ in 0..50 {
            match tokio::time::timeout(
                Duration::from_millis(50),
                h.exec_out.send(Ok(Bytes::from_static(b"y\n"))),
            )
            .await
            {
                Ok(Ok(())) => pushed += 1,
                _ => break,
            }
        }
        // 1 in the sink + 1 in flight in the bridge + 1 in the output channel (+1 slack).
        assert!(
            pushed <= 4,
            "the bridge pulled {pushed} chunks for a client that reads nothing"
        );
        // Input still flows while output is stuck.
        h.client
            .send(Ok(Message::Binary(b"\x03".to_vec())))
            .await
            .unwrap();
        let mut b = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(5), h.stdin.read_exact(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(b, [3]);
        // Reading resumes the flow.
        for _ in 0..pushed {
            recv(&mut h.sent).await;
        }
        h.exec_out
            .send(Ok(Bytes::from_static(b"more")))
            .await
            .unwrap();
        assert_eq!(recv(&mut h.sent).await, Message::Binary(b"more".to_vec()));
        h.done.abort();
    }

    #[tokio::test]
    async fn bridge_pings_and_drops_a_silent_client() {
        let timing = Timing {
            ping_every: Duration::from_millis(50),
            silence_limit: Duration::from_millis(300),
        };
        let mut h = harness(64, 16, timing);
        assert_eq!(recv(&mut h.sent).await, Message::Ping(vec![]));
        let outcome = tokio::time::timeout(Duration::from_secs(5), h.done)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(outcome, Outcome::Gone);
        drop(h.client);
    }

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
