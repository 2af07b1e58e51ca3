//! The files API: the user's own /workspace over HTTP (`/sandbox/files…`) and its watch
//! WebSocket, on top of the in-sandbox agent's files ops (`sandbox::agent::files`).
//!
//! The edge validates every path with the agent's own rules (relative, no `..`, no NUL, at most
//! 4096 bytes and 255 per component) and never touches the workspace's host folder: the agent
//! resolves paths inside the sandbox and refuses symlinks that lead out of /workspace. Bodies
//! stream both ways without being held whole: an upload goes to the agent as `DATA` frames
//! while it arrives, counted against `files_max_bytes`; a read or an archive goes to the client
//! as the agent's `DATA` frames arrive, pulled only as fast as the client takes them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{
    HeaderMap, HeaderValue, ACCEPT_RANGES, CONTENT_DISPOSITION, CONTENT_LENGTH, CONTENT_RANGE,
    CONTENT_TYPE, LAST_MODIFIED, RANGE,
};
use hyper::{Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::sandbox::rfc3339;
use super::Api;
use crate::edge::listener::ConnInfo;
use crate::edge::upgraded::ClientIo;
use crate::http::body::read_json;
use crate::http::error::ApiError;
use crate::http::upgrade::{self, accept_key, authenticate, check_origin, percent_decode};
use crate::http::{json, Body, BoxError};
use crate::sandbox::agent::files::{Entry, Stream};
use crate::sandbox::agent::{AgentBody, AgentError};
use crate::sandbox::shell::Door;
use crate::sandbox::RunGuard;
use crate::user::UserId;

type Result<T> = std::result::Result<T, ApiError>;

/// Longest path the agent accepts, and longest component.
pub const MAX_PATH: usize = 4096;
pub const MAX_COMPONENT: usize = 255;
/// A JSON body (move, mkdir) is two paths at most.
const MAX_JSON_BODY: usize = 16 * 1024;
/// Upload chunks are cut to this size before they become frames.
const CHUNK: usize = 256 * 1024;
/// Chunks of an upload in flight between the client and the agent.
const UPLOAD_QUEUE: usize = 4;
/// Longest the agent may take to send the next chunk of a read or an archive.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(30);
/// Watch sockets one user may hold open at once.
pub const WATCHES_PER_USER: usize = 8;
/// Events read ahead from the agent while the client's socket is busy.
const WATCH_QUEUE: usize = 64;
/// Watch pings and the silence after which the client counts as gone (as the terminal's).
const PING_EVERY: Duration = Duration::from_secs(20);
const SILENCE_LIMIT: Duration = Duration::from_secs(60);
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(10);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The files feature's own state: open watches per user.
#[derive(Default)]
pub(crate) struct Files {
    watches: Arc<Mutex<HashMap<UserId, usize>>>,
}

struct WatchGuard {
    map: Arc<Mutex<HashMap<UserId, usize>>>,
    user: UserId,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.user);
            }
        }
    }
}

impl Files {
    fn watch_opened(&self, user: &UserId) -> Result<WatchGuard> {
        let mut m = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(user.clone()).or_insert(0);
        if *n >= WATCHES_PER_USER {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_watches",
                format!("at most {WATCHES_PER_USER} file watches per user are open at once"),
            )
            .retry_after(1));
        }
        *n += 1;
        Ok(WatchGuard {
            map: self.watches.clone(),
            user: user.clone(),
        })
    }
}

// ---- paths, queries, ranges (pure) ---------------------------------------------------------

fn invalid_path(msg: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_path", msg)
}

/// A client's path made canonical by the agent's rules: relative to /workspace, `/`-separated,
/// empty and `.` components skipped (`""` is the root); `..`, a leading `/`, NUL, more than
/// 4096 bytes or a component over 255 bytes is refused.
pub fn validate_path(p: &str) -> std::result::Result<String, String> {
    if p.len() > MAX_PATH {
        return Err(format!("the path is longer than {MAX_PATH} bytes"));
    }
    if p.contains('\0') {
        return Err("the path contains a NUL byte".into());
    }
    if p.starts_with('/') {
        return Err("the path must be relative to the workspace (no leading /)".into());
    }
    let mut out = String::with_capacity(p.len());
    for part in p.split('/') {
        match part {
            "" | "." => continue,
            ".." => return Err("the path may not contain ..".into()),
            _ if part.len() > MAX_COMPONENT => {
                return Err(format!(
                    "a path component is longer than {MAX_COMPONENT} bytes"
                ))
            }
            _ => {}
        }
        if !out.is_empty() {
            out.push('/');
        }
        out.push_str(part);
    }
    Ok(out)
}

fn path_of(p: &str) -> Result<String> {
    validate_path(p).map_err(invalid_path)
}

/// A path that must not be the workspace root (write, remove, move).
fn not_root(p: &str, what: &str) -> Result<String> {
    let p = path_of(p)?;
    if p.is_empty() {
        return Err(invalid_path(format!("the workspace root cannot be {what}")));
    }
    Ok(p)
}

/// The query of a files route: `path`, `recursive`, `token` (watch).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FilesQuery {
    pub path: String,
    pub recursive: bool,
    pub token: Option<String>,
}

/// Parses the query (percent-decoded; a repeated key is refused). The path is validated
/// (400 `invalid_path`); other mistakes are 422.
pub fn parse_query(q: Option<&str>) -> Result<FilesQuery> {
    let (mut path, mut recursive, mut token) = (None, None, None);
    for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_decode(k).map_err(ApiError::invalid)?;
        let slot = match k.as_str() {
            "path" => &mut path,
            "recursive" => &mut recursive,
            "token" => &mut token,
            _ => continue,
        };
        if slot.is_some() {
            return Err(ApiError::invalid(format!(
                "query parameter {k} is given more than once"
            )));
        }
        let v = percent_decode(v).map_err(|e| match k.as_str() {
            "path" => invalid_path(e),
            _ => ApiError::invalid(e),
        })?;
        *slot = Some(v);
    }
    let recursive = match recursive.as_deref() {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") | Some("") => true,
        Some(_) => return Err(ApiError::invalid("recursive must be true or false")),
    };
    Ok(FilesQuery {
        path: path_of(path.as_deref().unwrap_or(""))?,
        recursive,
        token: token.filter(|t| !t.is_empty()),
    })
}

/// One `bytes=` range as the client wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ByteRange {
    /// `a-b` (b inclusive) or `a-`.
    From(u64, Option<u64>),
    /// `-n`: the last n bytes.
    Suffix(u64),
}

/// Parses a `Range` header. `None` for anything but one syntactically valid byte range
/// (absent, another unit, several ranges, garbage): RFC 9110 lets a server ignore those and
/// answer 200 with the whole file.
pub fn parse_range(h: &str) -> Option<ByteRange> {
    let spec = h.trim().strip_prefix("bytes=")?.trim();
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    let num = |s: &str| -> Option<u64> {
        if s.is_empty() || s.len() > 19 || !s.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    match (a.is_empty(), b.is_empty()) {
        (true, true) => None,
        (true, false) => Some(ByteRange::Suffix(num(b)?)),
        (false, true) => Some(ByteRange::From(num(a)?, None)),
        (false, false) => {
            let (a, b) = (num(a)?, num(b)?);
            (b >= a).then_some(ByteRange::From(a, Some(b)))
        }
    }
}

/// The range within a file of `size` bytes: `Some((offset, length))`, or `None` when it is not
/// satisfiable (416).
pub fn resolve_range(r: ByteRange, size: u64) -> Option<(u64, u64)> {
    match r {
        ByteRange::From(a, _) if a >= size => None,
        ByteRange::From(a, b) => {
            let end = b.map_or(size - 1, |b| b.min(size - 1));
            Some((a, end - a + 1))
        }
        ByteRange::Suffix(0) => None,
        ByteRange::Suffix(_) if size == 0 => None,
        ByteRange::Suffix(n) => {
            let n = n.min(size);
            Some((size - n, n))
        }
    }
}

/// `Content-Type` by extension: text types carry `charset=utf-8`; unknown is binary.
pub fn content_type(name: &str) -> &'static str {
    let ext = name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "js" | "mjs" | "cjs" | "jsx" => "text/javascript; charset=utf-8",
        "ts" | "tsx" | "mts" | "cts" => "text/x-typescript; charset=utf-8",
        "json" | "map" => "application/json; charset=utf-8",
        "md" | "markdown" => "text/markdown; charset=utf-8",
        "txt" | "log" | "lock" | "gitignore" | "env" | "ini" | "cfg" | "conf" => {
            "text/plain; charset=utf-8"
        }
        "py" => "text/x-python; charset=utf-8",
        "sh" | "bash" => "text/x-shellscript; charset=utf-8",
        "rs" | "go" | "c" | "h" | "cpp" | "java" | "rb" | "php" | "sql" | "vue" | "svelte" => {
            "text/plain; charset=utf-8"
        }
        "xml" => "application/xml; charset=utf-8",
        "svg" => "image/svg+xml; charset=utf-8",
        "csv" => "text/csv; charset=utf-8",
        "yaml" | "yml" => "text/yaml; charset=utf-8",
        "toml" => "application/toml; charset=utf-8",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "ico" => "image/x-icon",
        "pdf" => "application/pdf",
        "wasm" => "application/wasm",
        "zip" => "application/zip",
        "gz" | "tgz" => "application/gzip",
        "tar" => "application/x-tar",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        "mp3" => "audio/mpeg",
        "mp4" => "video/mp4",
        _ => "application/octet-stream",
    }
}

/// `Last-Modified` (IMF-fixdate) of milliseconds since the epoch.
fn http_date(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string()
}

/// A download's file name: the path's last component (`workspace` for the root), reduced to
/// characters that are safe in a quoted header parameter.
pub fn archive_name(path: &str) -> String {
    let last = path
        .rsplit('/')
        .next()
        .filter(|s| !s.is_empty())
        .unwrap_or("workspace");
    let clean: String = last
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-+".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(100)
        .collect();
    format!("{clean}.tar.gz")
}

/// An agent refusal or failure as the API tells it.
pub fn agent_error(e: AgentError) -> ApiError {
    match e {
        AgentError::Refused { code, message } => {
            let (status, code) = match code.as_str() {
                "invalid_path" => (StatusCode::BAD_REQUEST, "invalid_path"),
                "outside_workspace" => (StatusCode::FORBIDDEN, "outside_workspace"),
                "permission_denied" => (StatusCode::FORBIDDEN, "permission_denied"),
                "not_found" => (StatusCode::NOT_FOUND, "file_not_found"),
                "not_a_directory" => (StatusCode::CONFLICT, "not_a_directory"),
                "is_a_directory" => (StatusCode::CONFLICT, "is_a_directory"),
                "exists" => (StatusCode::CONFLICT, "file_exists"),
                "not_empty" => (StatusCode::CONFLICT, "not_empty"),
                "too_large" => (StatusCode::PAYLOAD_TOO_LARGE, "file_too_large"),
                "busy" => {
                    return ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "agent_busy",
                        "the sandbox agent is busy; retry",
                    )
                    .retry_after(1)
                }
                "io_error" => (StatusCode::INTERNAL_SERVER_ERROR, "io_error"),
                _ => {
                    tracing::warn!(code, message, "the sandbox agent failed");
                    return ApiError::new(
                        StatusCode::BAD_GATEWAY,
                        "agent_error",
                        format!("the sandbox agent failed: {code}: {message}"),
                    );
                }
            };
            ApiError::new(status, code, message)
        }
        AgentError::Unavailable(m) | AgentError::Lost(m) => {
            ApiError::agent_unavailable(format!("the sandbox agent did not answer: {m}"))
        }
    }
}

fn too_large(max: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "file_too_large",
        format!("the upload is larger than {max} bytes (files_max_bytes)"),
    )
}

// ---- wire shapes ---------------------------------------------------------------------------

#[derive(Serialize)]
struct EntryDto {
    name: String,
    path: String,
    #[serde(rename = "type")]
    kind: String,
    size: u64,
    mode: u32,
    modified: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<String>,
}

impl From<Entry> for EntryDto {
    fn from(e: Entry) -> Self {
        EntryDto {
            name: e.name,
            path: e.path,
            kind: e.kind,
            size: e.size,
            mode: e.mode,
            modified: rfc3339(e.modified),
            target: e.target,
        }
    }
}

fn entry_response(status: StatusCode, e: Entry) -> Response<Body> {
    json(status, &serde_json::json!({ "entry": EntryDto::from(e) }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MoveBody {
    from: String,
    to: String,
    #[serde(default)]
    overwrite: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MkdirBody {
    path: String,
    #[serde(default = "yes")]
    parents: bool,
}

fn yes() -> bool {
    true
}

// ---- handlers ------------------------------------------------------------------------------

/// A response body fed by an agent stream: at most `length` bytes (exactly, or the body fails
/// so the client sees a truncated transfer rather than a short file), each chunk awaited at
/// most [`CHUNK_TIMEOUT`]. Pulled only as fast as the client reads. `held` keeps the sandbox
/// awake until the body ends (a download may outlast `idle_pause_after`).
fn streamed(stream: Stream, length: Option<u64>, held: RunGuard) -> Body {
    type Item = std::result::Result<Frame<Bytes>, BoxError>;
    type State = (Option<Stream>, Option<u64>);
    let s = futures_util::stream::unfold((Some(stream), length), |(stream, left)| async move {
        let mut stream = stream?;
        if left == Some(0) {
            return None;
        }
        let fail = |m: String| -> Option<(Item, State)> { Some((Err(m.into()), (None, None))) };
        match tokio::time::timeout(CHUNK_TIMEOUT, stream.chunk()).await {
            Err(_) => fail("the sandbox agent stalled".into()),
            Ok(Err(e)) => fail(format!("{e}")),
            Ok(Ok(None)) => match left {
                None => None,
                Some(n) => fail(format!("the file ended {n} bytes early")),
            },
            Ok(Ok(Some(mut b))) => {
                let left = left.map(|n| {
                    if b.len() as u64 > n {
                        b.truncate(n as usize);
                    }
                    n - b.len() as u64
                });
                Some((Ok(Frame::data(b)), (Some(stream), left)))
            }
        }
    });
    let s = s.map(move |item| {
        let _held = &held;
        item
    });
    BodyExt::boxed(StreamBody::new(s))
}

/// Wakes the user's sandbox for a files call and keeps it awake until the guard drops: the
/// idle policy counts the call as a run in flight, so it cannot pause the sandbox between the
/// wake and the agent's answer (an upload slower than `idle_pause_after` froze the agent
/// mid-request, and the edge's attempt to restart it failed with 409 "is not running"). The
/// guard is taken before the wake: a pause already under way finishes first (under the user's
/// lock) and the wake undoes it.
async fn enter(api: &Api, user: &UserId) -> Result<(Door, RunGuard)> {
    let held = api.mgr.request_held(user);
    let door = api.mgr.enter(user).await?;
    Ok((door, held))
}

/// The body of a request, pumped into a bounded channel for the agent: chunks of at most
/// [`CHUNK`] bytes; beyond `max` bytes it sends one byte more than `max` (so the agent refuses
/// with `too_large` and writes nothing) and stops. Returns whether the body was too large. A
/// client that fails mid-body aborts the agent's request (no `END`: nothing is written).
async fn pump(
    body: Incoming,
    tx: mpsc::Sender<std::result::Result<Bytes, String>>,
    max: u64,
) -> bool {
    let mut body = body;
    let mut total: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                let _ = tx.send(Err(format!("the client's body failed: {e}"))).await;
                return false;
            }
        };
        let Ok(mut data) = frame.into_data() else {
            continue;
        };
        while !data.is_empty() {
            let room = max + 1 - total;
            let mut piece = data.split_to(data.len().min(CHUNK));
            let over = piece.len() as u64 >= room;
            if over {
                piece.truncate(room as usize);
            }
            total += piece.len() as u64;
            if tx.send(Ok(piece)).await.is_err() {
                return over;
            }
            if over {
                return true;
            }
        }
    }
    false
}

fn content_length(headers: &HeaderMap) -> Result<Option<u64>> {
    match headers.get(CONTENT_LENGTH) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Some)
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "invalid Content-Length",
                )
            }),
    }
}

/// `GET /sandbox/files`: a folder's listing or a file's bytes (with one `Range`).
pub(super) async fn get(
    api: &Api,
    user: &UserId,
    req: Request<Incoming>,
) -> Result<Response<Body>> {
    let q = parse_query(req.uri().query())?;
    let range = req
        .headers()
        .get(RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_range);
    let (door, held) = enter(api, user).await?;
    let (offset, length) = match range {
        None => (0, None),
        Some(r) => {
            let e = door.file_stat(&q.path).await.map_err(agent_error)?;
            if e.kind == "dir" {
                return list(api, user, &door, &q.path).await;
            }
            match resolve_range(r, e.size) {
                Some((o, l)) => (o, Some(l)),
                None => {
                    let mut resp = ApiError::new(
                        StatusCode::RANGE_NOT_SATISFIABLE,
                        "range_not_satisfiable",
                        format!("the file has {} bytes", e.size),
                    )
                    .into_response();
                    if let Ok(v) = HeaderValue::from_str(&format!("bytes */{}", e.size)) {
                        resp.headers_mut().insert(CONTENT_RANGE, v);
                    }
                    return Ok(resp);
                }
            }
        }
    };
    let read = match door.file_read(&q.path, offset, length).await {
        Ok(r) => r,
        Err(AgentError::Refused { code, .. }) if code == "is_a_directory" && range.is_none() => {
            return list(api, user, &door, &q.path).await
        }
        Err(e) => return Err(agent_error(e)),
    };
    let (status, length) = match length {
        // The file may have shrunk since the stat.
        Some(l) if offset < read.size => (StatusCode::PARTIAL_CONTENT, l.min(read.size - offset)),
        Some(_) => (StatusCode::PARTIAL_CONTENT, 0),
        None => (StatusCode::OK, read.size),
    };
    let name = q.path.rsplit('/').next().unwrap_or("");
    let mut resp = Response::new(streamed(read.stream, Some(length), held));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type(name)));
    h.insert(CONTENT_LENGTH, HeaderValue::from(length));
    h.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(&http_date(read.modified)) {
        h.insert(LAST_MODIFIED, v);
    }
    // The workspace's files are the user's, not the edge's: never run as a page of this origin.
    h.insert(
        hyper::header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; sandbox"),
    );
    h.insert(
        hyper::header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if status == StatusCode::PARTIAL_CONTENT && length > 0 {
        let v = format!("bytes {}-{}/{}", offset, offset + length - 1, read.size);
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(CONTENT_RANGE, v);
        }
    }
    api.mgr.touch(user);
    Ok(resp)
}

async fn list(
    api: &Api,
    user: &UserId,
    door: &crate::sandbox::shell::Door,
    path: &str,
) -> Result<Response<Body>> {
    let l = door.file_list(path).await.map_err(agent_error)?;
    api.mgr.touch(user);
    let entries: Vec<EntryDto> = l.entries.into_iter().map(EntryDto::from).collect();
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"path": path, "entries": entries, "truncated": l.truncated}),
    ))
}

/// `GET /sandbox/files/stat`.
pub(super) async fn stat(
    api: &Api,
    user: &UserId,
    req: Request<Incoming>,
) -> Result<Response<Body>> {
    let q = parse_query(req.uri().query())?;
    let (door, _held) = enter(api, user).await?;
    let e = door.file_stat(&q.path).await.map_err(agent_error)?;
    Ok(entry_response(StatusCode::OK, e))
}

/// Streams the request body into an agent op taking a body (`write`, `untar`), bounded by
/// `files_max_bytes`.
async fn upload<T, F, Fut>(api: &Api, req: Request<Incoming>, op: F) -> Result<T>
where
    F: FnOnce(u64, AgentBody) -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, AgentError>>,
{
    let max = api.cfg.files_max_bytes;
    if content_length(req.headers())?.is_some_and(|n| n > max as u64) {
        return Err(too_large(max));
    }
    let (tx, rx) = mpsc::channel(UPLOAD_QUEUE);
    let (over, result) = tokio::join!(
        pump(req.into_body(), tx, max as u64),
        op(max as u64, AgentBody::Stream(rx))
    );
    if over {
        return Err(too_large(max));
    }
    result.map_err(agent_error)
}

/// `PUT /sandbox/files`: the body becomes the file (parents created, replaced atomically).
pub(super) async fn put(
    api: &Api,
    user: &UserId,
    req: Request<Incoming>,
) -> Result<Response<Body>> {
    let q = parse_query(req.uri().query())?;
    let path = not_root(&q.path, "written as a file")?;
    let (door, _held) = enter(api, user).await?;
    let e = upload(api, req, |max, body| door.file_write(&path, max, body)).await?;
    api.mgr.touch(user);
    Ok(entry_response(StatusCode::OK, e))
}

/// `DELETE /sandbox/files`.
pub(super) async fn delete(
    api: &Api,
    user: &UserId,
    req: Request<Incoming>,
) -> Result<Response<Body>> {
    let q = parse_query(req.uri().query())?;
    let path = not_root(&q.path, "removed")?;
    let (door, _held) = enter(api, user).await?;
    door.file_remove(&path, q.recursive)
        .await
        .map_err(agent_error)?;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "removed": path }),
    ))
}

/// `POST /sandbox/files/move`.
pub(super) async fn rename(
    api: &Api,
    user: &UserId,
    req: Request<Incoming>,
) -> Result<Response<Body>> {
    let b: MoveBody = read_json(req, MAX_JSON_BODY).await?;
    let from = not_root(&b.from, "moved")?;
    let to = not_root(&b.to, "replaced")?;
    let (door, _held) = enter(api, user).await?;
    let e = door
        .file_move(&from, &to, b.overwrite)
        .await
        .map_err(agent_error)?;
    Ok(entry_response(StatusCode::OK, e))
}

/// `POST /sandbox/files/mkdir`.
pub(super) async fn mkdir(
    api: &Api,
    user: &UserId,
    req: Request<Incoming>,
) -> Result<Response<Body>> {
    let b: MkdirBody = read_json(req, MAX_JSON_BODY).await?;
    let path = not_root(&b.path, "created")?;
    let (door, _held) = enter(api, user).await?;
    let e = door
        .file_mkdir(&path, b.parents)
        .await
        .map_err(agent_error)?;
    Ok(entry_response(StatusCode::CREATED, e))
}

/// `GET /sandbox/files/archive`: a `.tar.gz` of a folder (or a file), streamed.
pub(super) async fn archive_get(
    api: &Api,
    user: &UserId,
    req: Request<Incoming>,
) -> Result<Response<Body>> {
    let q = parse_query(req.uri().query())?;
    let (door, held) = enter(api, user).await?;
    let stream = door.file_tar(&q.path).await.map_err(agent_error)?;
    api.mgr.touch(user);
    let mut resp = Response::new(streamed(stream, None, held));
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/gzip"));
    let disp = format!("attachment; filename=\"{}\"", archive_name(&q.path));
    if let Ok(v) = HeaderValue::from_str(&disp) {
        h.insert(CONTENT_DISPOSITION, v);
    }
    h.insert(
        hyper::header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    Ok(resp)
}

/// `PUT /sandbox/files/archive`: a `.tar.gz` body extracted into the folder `path`.
pub(super) async fn archive_put(
    api: &Api,
    user: &UserId,
    req: Request<Incoming>,
) -> Result<Response<Body>> {
    let q = parse_query(req.uri().query())?;
    let (door, _held) = enter(api, user).await?;
    let path = q.path.clone();
    let n = upload(api, req, |max, body| door.file_untar(&path, max, body)).await?;
    api.mgr.touch(user);
    Ok(json(StatusCode::OK, &serde_json::json!({ "files": n })))
}

// ---- watch ---------------------------------------------------------------------------------

fn watch_ws_config() -> WebSocketConfig {
    WebSocketConfig {
        // Clients send nothing but pings and closes.
        max_frame_size: Some(64 * 1024),
        max_message_size: Some(64 * 1024),
        write_buffer_size: 64 * 1024,
        max_write_buffer_size: 512 * 1024,
        ..WebSocketConfig::default()
    }
}

/// `GET /sandbox/files/watch`: a WebSocket of file events, authenticated and Origin-checked as
/// the terminal is.
pub(super) async fn watch(
    api: &Api,
    mut req: Request<Incoming>,
    conn: &ConnInfo,
) -> Response<Body> {
    watch_open(api, &mut req, conn)
        .await
        .unwrap_or_else(upgrade::refusal)
}

async fn watch_open(
    api: &Api,
    req: &mut Request<Incoming>,
    conn: &ConnInfo,
) -> Result<Response<Body>> {
    let headers = req.headers();
    check_origin(headers, conn.tls, &api.cfg.origins(), "a files watch")?;
    let accept = accept_key(req.version(), headers)?;
    let q = parse_query(req.uri().query())?;
    let (user, protocol) = authenticate(headers, &api.auth, q.token.as_deref())?;
    api.mgr.touch(&user);
    let guard = api.files.watch_opened(&user)?;
    let door = api.mgr.enter(&user).await?;
    let mut events = door
        .file_watch(&q.path, q.recursive)
        .await
        .map_err(agent_error)?;

    let on_upgrade = hyper::upgrade::on(&mut *req);
    tracing::info!(user = %user, path = %q.path, "files watch opened");
    tokio::spawn(tracing::Instrument::in_current_span(async move {
        let _guard = guard;
        let upgraded = match tokio::time::timeout(UPGRADE_TIMEOUT, on_upgrade).await {
            Ok(Ok(u)) => u,
            _ => return,
        };
        let Ok(io) = ClientIo::new(upgraded) else {
            return;
        };
        let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(watch_ws_config())).await;
        // The agent's frames are read by their own task (a frame read is not cancel-safe),
        // WATCH_QUEUE ahead at most: a slow client holds back the agent, which then reports
        // `overflow` instead of growing anything.
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        let reader = tokio::spawn(async move {
            loop {
                let item = events.event().await;
                let end = !matches!(item, Ok(Some(_)));
                if tx.send(item).await.is_err() || end {
                    return;
                }
            }
        });
        let outcome = watch_session(ws, rx).await;
        reader.abort();
        tracing::info!(user = %user, outcome, "files watch closed");
    }));
    Ok(upgrade::switching_protocols(&accept, protocol.as_deref()))
}

type Ws = WebSocketStream<ClientIo>;
type EventRx = mpsc::Receiver<std::result::Result<Option<serde_json::Value>, AgentError>>;

/// Forwards events as text messages until either side ends; pings the client and drops it
/// after [`SILENCE_LIMIT`] without a frame.
async fn watch_session(ws: Ws, mut rx: EventRx) -> &'static str {
    let (mut sink, mut stream) = ws.split();
    let start = Instant::now();
    let mut last_seen = Duration::ZERO;
    let mut ticker = tokio::time::interval(PING_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    let close = |code: u16, reason: &str| {
        Message::Close(Some(CloseFrame {
            code: CloseCode::from(code),
            reason: reason.to_owned().into(),
        }))
    };
    let (outcome, frame) = loop {
        tokio::select! {
            ev = rx.recv() => match ev {
                Some(Ok(Some(v))) => {
                    if sink.send(Message::Text(v.to_string())).await.is_err() {
                        break ("client gone", None);
                    }
                }
                Some(Ok(None)) | None => break ("watch ended", Some(close(1000, "watch ended"))),
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "files watch failed");
                    break ("agent failed", Some(close(1011, "watch failed")));
                }
            },
            msg = stream.next() => {
                last_seen = start.elapsed();
                match msg {
                    None | Some(Err(_)) => break ("client gone", None),
                    Some(Ok(Message::Close(_))) => {
                        // tungstenite queued the reply; flush it.
                        let _ = tokio::time::timeout(CLOSE_TIMEOUT, sink.close()).await;
                        break ("client closed", None);
                    }
                    Some(Ok(Message::Text(t))) if t.contains("\"ping\"") => {
                        let _ = sink.send(Message::Text(r#"{"type":"pong"}"#.into())).await;
                    }
                    Some(Ok(_)) => {}
                }
            }
            _ = ticker.tick() => {
                if start.elapsed().saturating_sub(last_seen) > SILENCE_LIMIT {
                    break ("client silent", None);
                }
                if sink.send(Message::Ping(Vec::new())).await.is_err() {
                    break ("client gone", None);
                }
            }
        }
    };
    if let Some(f) = frame {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            if sink.send(f).await.is_ok() {
                while let Some(Ok(m)) = stream.next().await {
                    if m.is_close() {
                        break;
                    }
                }
            }
        })
        .await;
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn paths() {
        for (raw, clean) in [
            ("", ""),
            (".", ""),
            ("./", ""),
            ("a", "a"),
            ("a//b/./c/", "a/b/c"),
            ("a..b/..c/c..", "a..b/..c/c.."),
            ("ünï cødé/ x", "ünï cødé/ x"),
        ] {
            assert_eq!(validate_path(raw).as_deref(), Ok(clean), "{raw:?}");
        }
        let long_part = "x".repeat(256);
        let long = "a/".repeat(2049);
        for bad in [
            "..",
            "a/../../x",
            "a/..",
            "../a",
            "/etc/passwd",
            "/",
            "a\0b",
            long_part.as_str(),
            long.as_str(),
        ] {
            assert!(validate_path(bad).is_err(), "{bad:?}");
        }
        assert!(validate_path(&"x".repeat(255)).is_ok());
    }

    #[test]
    fn queries() {
        let q = parse_query(Some("path=src%2Fmain.rs&recursive=true&x=1")).unwrap();
        assert_eq!(q.path, "src/main.rs");
        assert!(q.recursive);
        assert_eq!(parse_query(None).unwrap(), FilesQuery::default());
        assert_eq!(parse_query(Some("path=.")).unwrap().path, "");
        for (bad, status) in [
            ("path=%2e%2e", 400),
            ("path=a%2F..%2F..%2Fx", 400),
            ("path=%2Fetc", 400),
            ("path=a%00b", 400),
            ("path=%zz", 400),
            ("path=a&path=b", 422),
            ("recursive=maybe", 422),
        ] {
            let e = parse_query(Some(bad)).unwrap_err();
            assert_eq!(e.status.as_u16(), status, "{bad}");
        }
        assert_eq!(
            parse_query(Some("path=%2e%2e")).unwrap_err().code,
            "invalid_path"
        );
    }

    #[test]
    fn ranges() {
        assert_eq!(
            parse_range("bytes=0-99"),
            Some(ByteRange::From(0, Some(99)))
        );
        assert_eq!(parse_range("bytes=5-"), Some(ByteRange::From(5, None)));
        assert_eq!(parse_range("bytes=-10"), Some(ByteRange::Suffix(10)));
        assert_eq!(
            parse_range(" bytes= 1 - 2 "),
            Some(ByteRange::From(1, Some(2)))
        );
        for ignored in [
            "",
            "bytes=",
            "bytes=-",
            "bytes=a-b",
            "bytes=5-1",
            "bytes=0-1,3-4",
            "items=0-1",
            "bytes=+1-2",
            "bytes=99999999999999999999-",
        ] {
            assert_eq!(parse_range(ignored), None, "{ignored:?}");
        }
        assert_eq!(
            resolve_range(ByteRange::From(0, Some(99)), 10),
            Some((0, 10))
        );
        assert_eq!(resolve_range(ByteRange::From(2, Some(4)), 10), Some((2, 3)));
        assert_eq!(resolve_range(ByteRange::From(9, None), 10), Some((9, 1)));
        assert_eq!(resolve_range(ByteRange::From(10, None), 10), None);
        assert_eq!(resolve_range(ByteRange::From(0, None), 0), None);
        assert_eq!(resolve_range(ByteRange::Suffix(3), 10), Some((7, 3)));
        assert_eq!(resolve_range(ByteRange::Suffix(30), 10), Some((0, 10)));
        assert_eq!(resolve_range(ByteRange::Suffix(0), 10), None);
        assert_eq!(resolve_range(ByteRange::Suffix(5), 0), None);
    }

    #[test]
    fn types_names_and_errors() {
        assert_eq!(content_type("a/index.HTML"), "text/html; charset=utf-8");
        assert_eq!(content_type("x.png"), "image/png");
        assert_eq!(content_type("Makefile"), "application/octet-stream");
        assert_eq!(archive_name(""), "workspace.tar.gz");
        assert_eq!(archive_name("a/my app\"x"), "my_app_x.tar.gz");
        assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        let refused = |c: &str| {
            agent_error(AgentError::Refused {
                code: c.into(),
                message: "m".into(),
            })
        };
        assert_eq!(refused("not_found").code, "file_not_found");
        assert_eq!(refused("not_found").status, StatusCode::NOT_FOUND);
        assert_eq!(refused("exists").code, "file_exists");
        assert_eq!(refused("outside_workspace").status, StatusCode::FORBIDDEN);
        assert_eq!(refused("too_large").status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(refused("weird").status, StatusCode::BAD_GATEWAY);
        let e = agent_error(AgentError::Unavailable("x".into()));
        assert_eq!((e.code, e.retry_after), ("agent_unavailable", Some(2)));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// Whatever the input, an accepted path is canonical, relative, within the limits and
        /// free of `..`; validating it again changes nothing.
        #[test]
        fn accepted_paths_stay_inside(p in "[a./\\\\\\x00é%-]{0,40}") {
            if let Ok(clean) = validate_path(&p) {
                prop_assert!(!clean.starts_with('/'));
                prop_assert!(!clean.contains('\0'));
                prop_assert!(clean.split('/').all(|c| c != ".." && c != "." ));
                prop_assert!(clean.is_empty() || clean.split('/').all(|c| !c.is_empty()));
                prop_assert_eq!(validate_path(&clean), Ok(clean.clone()));
            }
        }
    }
}
