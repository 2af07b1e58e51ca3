//! The edge's client of the in-sandbox agent (`sandboxd-agent`, see docs/agent-protocol.md):
//! one TCP connection per request to `<sandbox ip>:49983`, the version line, one JSON head
//! carrying the sandbox's key, an optional body of `DATA` frames ended by `END`, then the
//! agent's JSON head and, for streaming ops, frames until `END` or `ERROR`.
//!
//! Every read and write is bounded: 1 s to connect, a head timeout per op (counted from the end
//! of the body), 64 KiB per JSON line, 1 MiB per frame. Feature code reaches this only through
//! [`Door::agent_call`](super::shell::Door::agent_call), which knows the address and the key and
//! restarts the agent once when it does not answer; nothing here knows containers.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub mod app;
mod door;
pub mod files;
pub use door::{head_timeout, HELLO_TIMEOUT};

/// The agent's port inside every sandbox.
pub const AGENT_PORT: u16 = 49983;
/// The first line of every request.
pub const VERSION_LINE: &[u8] = b"SANDBOXD-AGENT/1\n";
/// Largest JSON line either side sends (head of a request or a response).
pub const MAX_HEAD: usize = 64 * 1024;
/// Largest frame payload either side sends.
pub const MAX_PAYLOAD: usize = 1024 * 1024;
/// Environment variable and container label that carry a sandbox's key.
pub const KEY_ENV: &str = "SANDBOXD_AGENT_KEY";
pub const KEY_LABEL: &str = "sandboxd.agent-key";

/// How long a connection may take to open.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long one write of the body may stall (the agent stopped reading).
const WRITE_STALL: Duration = Duration::from_secs(10);

/// Frame kinds on the wire.
pub mod kind {
    pub const END: u8 = 0;
    pub const STDOUT: u8 = 1;
    pub const STDERR: u8 = 2;
    pub const DATA: u8 = 3;
    pub const EVENT: u8 = 4;
    pub const EXIT: u8 = 5;
    pub const ERROR: u8 = 9;
}

/// One frame of a response stream (`END` and `ERROR` end the stream and are not frames).
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Stdout(Bytes),
    Stderr(Bytes),
    Data(Bytes),
    Event(Value),
    Exit(Value),
}

/// Why an agent request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AgentError {
    /// The agent answered and refused (an `ok:false` head or an `ERROR` frame).
    #[error("the agent refused: {code}: {message}")]
    Refused { code: String, message: String },
    /// Nobody answered properly before the head: connection refused, timed out, closed, or
    /// something that does not speak the protocol. Restarting the agent may help.
    #[error("the sandbox agent is unavailable: {0}")]
    Unavailable(String),
    /// The connection broke after an `ok:true` head.
    #[error("the connection to the sandbox agent was lost: {0}")]
    Lost(String),
}

impl From<AgentError> for super::SandboxError {
    /// `Unavailable` and `Lost` are the agent's failure (503 `agent_unavailable`); a refusal the
    /// caller did not map itself is an internal error.
    fn from(e: AgentError) -> Self {
        match e {
            AgentError::Unavailable(m) | AgentError::Lost(m) => {
                super::SandboxError::AgentUnavailable(m)
            }
            AgentError::Refused { code, message } => super::SandboxError::Internal(
                anyhow::anyhow!("the sandbox agent refused: {code}: {message}"),
            ),
        }
    }
}

impl AgentError {
    fn refused(v: &Value) -> AgentError {
        let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
        AgentError::Refused {
            code: match s("code") {
                c if c.is_empty() => "internal".to_owned(),
                c => c,
            },
            message: s("message"),
        }
    }
}

/// A request body: sent as `DATA` frames of at most [`MAX_PAYLOAD`] bytes, then `END`.
pub enum AgentBody {
    Bytes(Bytes),
    /// Chunks as they come (bounded by the channel's capacity); the body ends when the sender is
    /// dropped. An `Err` item aborts the request (the connection is closed without `END`).
    Stream(mpsc::Receiver<Result<Bytes, String>>),
}

impl std::fmt::Debug for AgentBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentBody::Bytes(b) => write!(f, "Bytes({})", b.len()),
            AgentBody::Stream(_) => f.write_str("Stream"),
        }
    }
}

/// Where an agent is and how to prove we are the edge.
#[derive(Clone)]
pub(crate) struct Endpoint {
    pub(crate) addr: SocketAddr,
    pub(crate) key: std::sync::Arc<str>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        write!(f, "Endpoint({})", self.addr)
    }
}

/// An answered request: the `ok:true` head, then the frames of a streaming op.
pub struct AgentCall {
    pub head: Value,
    reader: BufReader<OwnedReadHalf>,
    /// Kept open until the call is dropped: the agent takes a closed connection for a client
    /// that left (it ends a `watch`, kills a run).
    _writer: Option<OwnedWriteHalf>,
    sender: Option<JoinHandle<std::io::Result<OwnedWriteHalf>>>,
    done: bool,
}

impl std::fmt::Debug for AgentCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentCall")
            .field("head", &self.head)
            .finish()
    }
}

impl Drop for AgentCall {
    fn drop(&mut self) {
        if let Some(s) = self.sender.take() {
            s.abort();
        }
    }
}

impl AgentCall {
    /// The next frame; `None` once the stream ended with `END` (and ever after). An `ERROR`
    /// frame is [`AgentError::Refused`]; a broken connection or a bad frame is
    /// [`AgentError::Lost`]. No timeout: callers bound the wait themselves.
    pub async fn next(&mut self) -> Result<Option<Frame>, AgentError> {
        if self.done {
            return Ok(None);
        }
        let (k, payload) = read_frame(&mut self.reader)
            .await
            .map_err(|e| AgentError::Lost(e.to_string()))?;
        let json = |p: &Bytes| {
            serde_json::from_slice::<Value>(p)
                .map_err(|e| AgentError::Lost(format!("bad JSON in a frame: {e}")))
        };
        let frame = match k {
            kind::END => {
                self.done = true;
                return Ok(None);
            }
            kind::ERROR => {
                self.done = true;
                return Err(AgentError::refused(&json(&payload)?));
            }
            kind::STDOUT => Frame::Stdout(payload),
            kind::STDERR => Frame::Stderr(payload),
            kind::DATA => Frame::Data(payload),
            kind::EVENT => Frame::Event(json(&payload)?),
            kind::EXIT => Frame::Exit(json(&payload)?),
            other => return Err(AgentError::Lost(format!("unknown frame kind {other}"))),
        };
        Ok(Some(frame))
    }
}

/// The 5-byte header of a frame.
pub fn frame_header(kind: u8, len: usize) -> [u8; 5] {
    let n = (len as u32).to_be_bytes();
    [kind, n[0], n[1], n[2], n[3]]
}

/// Parses a frame header: its kind and payload length, refusing payloads over [`MAX_PAYLOAD`].
pub fn parse_header(h: [u8; 5]) -> std::io::Result<(u8, usize)> {
    let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes is over the {MAX_PAYLOAD}-byte bound"),
        ));
    }
    Ok((h[0], len))
}

/// Reads one frame.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<(u8, Bytes)> {
    let mut h = [0u8; 5];
    r.read_exact(&mut h).await?;
    let (k, len) = parse_header(h)?;
    let mut buf = BytesMut::zeroed(len);
    r.read_exact(&mut buf).await?;
    Ok((k, buf.freeze()))
}

/// Writes one frame (payloads over [`MAX_PAYLOAD`] are split into several frames of `kind`).
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    kind: u8,
    payload: &[u8],
) -> std::io::Result<()> {
    if payload.is_empty() {
        return w.write_all(&frame_header(kind, 0)).await;
    }
    for chunk in payload.chunks(MAX_PAYLOAD) {
        w.write_all(&frame_header(kind, chunk.len())).await?;
        w.write_all(chunk).await?;
    }
    Ok(())
}

/// Reads one `\n`-ended line of at most [`MAX_HEAD`] bytes (without the `\n`).
pub async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> std::io::Result<Vec<u8>> {
    let mut line = Vec::new();
    let n = (&mut *r)
        .take(MAX_HEAD as u64 + 1)
        .read_until(b'\n', &mut line)
        .await?;
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    if line.last() != Some(&b'\n') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            if line.len() > MAX_HEAD {
                "line over the 64 KiB bound"
            } else {
                "connection closed inside a line"
            },
        ));
    }
    line.pop();
    Ok(line)
}

/// The request's first bytes: the version line and the head with the key, as one buffer.
fn request_head(op: &Value, key: &str) -> Result<Vec<u8>, AgentError> {
    let mut head = match op {
        Value::Object(m) => m.clone(),
        _ => {
            return Err(AgentError::Unavailable(
                "an op must be a JSON object".into(),
            ))
        }
    };
    head.insert("key".into(), Value::String(key.to_owned()));
    let json = serde_json::to_vec(&Value::Object(head))
        .map_err(|e| AgentError::Unavailable(format!("encoding the head: {e}")))?;
    if json.len() > MAX_HEAD {
        return Err(AgentError::Refused {
            code: "bad_request".into(),
            message: "the request head is over 64 KiB".into(),
        });
    }
    let mut out = Vec::with_capacity(VERSION_LINE.len() + json.len() + 1);
    out.extend_from_slice(VERSION_LINE);
    out.extend_from_slice(&json);
    out.push(b'\n');
    Ok(out)
}

/// Parses a response head: `Ok(head)` for `ok:true`, `Refused` for `ok:false`, `Unavailable`
/// for anything that is not a head of this protocol.
fn parse_response_head(line: &[u8]) -> Result<Value, AgentError> {
    let v: Value = serde_json::from_slice(line)
        .map_err(|_| AgentError::Unavailable("the answer is not a protocol head".into()))?;
    match v.get("ok").and_then(Value::as_bool) {
        Some(true) => Ok(v),
        Some(false) => Err(AgentError::refused(&v)),
        None => Err(AgentError::Unavailable(
            "the answer is not a protocol head".into(),
        )),
    }
}

async fn send_body(mut w: OwnedWriteHalf, body: AgentBody) -> std::io::Result<OwnedWriteHalf> {
    async fn stalled<F: std::future::Future<Output = std::io::Result<()>>>(
        f: F,
    ) -> std::io::Result<()> {
        tokio::time::timeout(WRITE_STALL, f)
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
    }
    match body {
        AgentBody::Bytes(b) => {
            for chunk in b.chunks(MAX_PAYLOAD) {
                stalled(write_frame(&mut w, kind::DATA, chunk)).await?;
            }
        }
        AgentBody::Stream(mut rx) => {
            while let Some(item) = rx.recv().await {
                let chunk = item.map_err(std::io::Error::other)?;
                if !chunk.is_empty() {
                    stalled(write_frame(&mut w, kind::DATA, &chunk)).await?;
                }
            }
        }
    }
    stalled(write_frame(&mut w, kind::END, &[])).await?;
    stalled(w.flush()).await?;
    Ok(w)
}

/// One request on a fresh connection. `head_timeout` counts from the end of the body (or from
/// the request's head when there is none). On a failure before anything of the body was taken,
/// the body is handed back so the caller may retry.
pub(crate) async fn call(
    ep: &Endpoint,
    op: &Value,
    body: Option<AgentBody>,
    head_timeout: Duration,
) -> Result<AgentCall, (AgentError, Option<AgentBody>)> {
    let first = match request_head(op, &ep.key) {
        Ok(f) => f,
        Err(e) => return Err((e, body)),
    };
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(ep.addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err((AgentError::Unavailable(format!("connecting: {e}")), body)),
        Err(_) => return Err((AgentError::Unavailable("connecting timed out".into()), body)),
    };
    let _ = stream.set_nodelay(true);
    let (r, mut w) = stream.into_split();
    let wrote = tokio::time::timeout(WRITE_STALL, async {
        w.write_all(&first).await?;
        w.flush().await
    })
    .await;
    if !matches!(wrote, Ok(Ok(()))) {
        return Err((
            AgentError::Unavailable("writing the request head failed".into()),
            body,
        ));
    }
    let mut reader = BufReader::with_capacity(64 * 1024, r);
    // The body goes out beside the head read, so an early refusal is seen at once.
    let (mut sender, mut writer) = match body {
        Some(b) => (Some(tokio::spawn(send_body(w, b))), None),
        None => (None, Some(w)),
    };
    let mut deadline = sender
        .is_none()
        .then(|| tokio::time::Instant::now() + head_timeout);
    let head = {
        let read = read_line(&mut reader);
        tokio::pin!(read);
        loop {
            tokio::select! {
                line = &mut read => break line,
                sent = async { sender.as_mut().expect("guarded").await }, if sender.is_some() && deadline.is_none() => {
                    sender = None;
                    // Kept open: the agent takes a closed connection for a client that left
                    // (and kills a run).
                    if let Ok(Ok(w)) = sent {
                        writer = Some(w);
                    }
                    deadline = Some(tokio::time::Instant::now() + head_timeout);
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                    if let Some(s) = sender.take() { s.abort(); }
                    return Err((AgentError::Unavailable("no answer in time".into()), None));
                }
            }
        }
    };
    let head = match head {
        Ok(line) => parse_response_head(&line),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(AgentError::Unavailable(
            "the connection was closed without an answer".into(),
        )),
        Err(e) => Err(AgentError::Unavailable(format!("reading the answer: {e}"))),
    };
    match head {
        Ok(head) => Ok(AgentCall {
            head,
            reader,
            _writer: writer,
            // Done already for body ops (the head follows END); kept to abort on drop.
            sender,
            done: false,
        }),
        Err(e) => {
            if let Some(s) = sender.take() {
                s.abort();
            }
            Err((e, None))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn frames_round_trip_and_split_at_the_bound() {
        let (mut a, b) = tokio::io::duplex(4 * 1024 * 1024);
        let big = vec![7u8; MAX_PAYLOAD + 10];
        let w = tokio::spawn(async move {
            write_frame(&mut a, kind::STDOUT, b"hi").await.unwrap();
            write_frame(&mut a, kind::DATA, &big).await.unwrap();
            write_frame(&mut a, kind::END, &[]).await.unwrap();
        });
        let mut b = BufReader::new(b);
        assert_eq!(
            read_frame(&mut b).await.unwrap(),
            (kind::STDOUT, Bytes::from_static(b"hi"))
        );
        let (k, p) = read_frame(&mut b).await.unwrap();
        assert_eq!((k, p.len()), (kind::DATA, MAX_PAYLOAD));
        let (k, p) = read_frame(&mut b).await.unwrap();
        assert_eq!((k, p.len()), (kind::DATA, 10));
        assert_eq!(read_frame(&mut b).await.unwrap(), (kind::END, Bytes::new()));
        w.await.unwrap();
    }

    #[test]
    fn headers_are_big_endian_and_bounded() {
        assert_eq!(frame_header(5, 0x0102_0304), [5, 1, 2, 3, 4]);
        assert_eq!(
            parse_header(frame_header(1, MAX_PAYLOAD)).unwrap(),
            (1, MAX_PAYLOAD)
        );
        assert!(parse_header(frame_header(1, MAX_PAYLOAD + 1)).is_err());
        assert!(parse_header([3, 0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[tokio::test]
    async fn lines_are_bounded() {
        let mut ok = BufReader::new(&b"{\"ok\":true}\nrest"[..]);
        assert_eq!(read_line(&mut ok).await.unwrap(), b"{\"ok\":true}");
        let long = vec![b'x'; MAX_HEAD + 5];
        assert!(read_line(&mut BufReader::new(&long[..])).await.is_err());
        assert!(read_line(&mut BufReader::new(&b"no newline"[..]))
            .await
            .is_err());
        let eof = read_line(&mut BufReader::new(&b""[..])).await.unwrap_err();
        assert_eq!(eof.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn heads_carry_the_key_and_parse_answers() {
        let h = request_head(&json!({"op": "hello"}), "k3y").unwrap();
        let text = String::from_utf8(h).unwrap();
        let (first, rest) = text.split_once('\n').unwrap();
        assert_eq!(format!("{first}\n").as_bytes(), VERSION_LINE);
        let v: Value = serde_json::from_str(rest.trim_end()).unwrap();
        assert_eq!(v, json!({"op": "hello", "key": "k3y"}));
        assert!(request_head(&json!("x"), "k").is_err());
        assert!(parse_response_head(br#"{"ok":true,"pid":3}"#).is_ok());
        assert!(matches!(
            parse_response_head(br#"{"ok":false,"code":"busy","message":"m"}"#),
            Err(AgentError::Refused { code, .. }) if code == "busy"
        ));
        assert!(matches!(
            parse_response_head(b"HTTP/1.1 200 OK"),
            Err(AgentError::Unavailable(_))
        ));
        assert!(matches!(
            parse_response_head(br#"{"pid":3}"#),
            Err(AgentError::Unavailable(_))
        ));
    }

    async fn endpoint_of(l: &TcpListener) -> Endpoint {
        Endpoint {
            addr: l.local_addr().unwrap(),
            key: "k".into(),
        }
    }

    #[tokio::test]
    async fn a_silent_listener_times_out_and_a_closed_port_is_unavailable() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ep = endpoint_of(&l).await;
        let hold = tokio::spawn(async move {
            let (_s, _) = l.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let t = std::time::Instant::now();
        let r = call(
            &ep,
            &json!({"op":"hello"}),
            None,
            Duration::from_millis(200),
        )
        .await;
        assert!(matches!(r, Err((AgentError::Unavailable(_), _))));
        assert!(t.elapsed() < Duration::from_secs(2));
        hold.abort();
        // A port nobody listens on.
        let gone = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            endpoint_of(&l).await
        };
        let body = Some(AgentBody::Bytes(Bytes::from_static(b"x")));
        let r = call(&gone, &json!({"op":"run"}), body, Duration::from_secs(1)).await;
        assert!(matches!(
            r,
            Err((AgentError::Unavailable(_), Some(AgentBody::Bytes(_))))
        ));
    }

    #[tokio::test]
    async fn a_body_is_framed_and_the_stream_is_read() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ep = endpoint_of(&l).await;
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            assert_eq!(read_line(&mut r).await.unwrap(), b"SANDBOXD-AGENT/1");
            let head: Value = serde_json::from_slice(&read_line(&mut r).await.unwrap()).unwrap();
            assert_eq!(head["key"], "k");
            let mut body = vec![];
            loop {
                let (k, p) = read_frame(&mut r).await.unwrap();
                if k == kind::END {
                    break;
                }
                assert_eq!(k, kind::DATA);
                body.extend_from_slice(&p);
            }
            assert_eq!(body, b"print(1)");
            w.write_all(b"{\"ok\":true,\"mark\":\"ab\"}\n")
                .await
                .unwrap();
            write_frame(&mut w, kind::STDOUT, b"1\n").await.unwrap();
            write_frame(&mut w, kind::EXIT, br#"{"exitCode":0}"#)
                .await
                .unwrap();
            write_frame(&mut w, kind::END, &[]).await.unwrap();
        });
        let (tx, rx) = mpsc::channel(2);
        tx.send(Ok(Bytes::from_static(b"print"))).await.unwrap();
        tx.send(Ok(Bytes::from_static(b"(1)"))).await.unwrap();
        drop(tx);
        let mut c = call(
            &ep,
            &json!({"op":"run"}),
            Some(AgentBody::Stream(rx)),
            Duration::from_secs(2),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
        assert_eq!(c.head["mark"], "ab");
        assert_eq!(
            c.next().await.unwrap(),
            Some(Frame::Stdout(Bytes::from_static(b"1\n")))
        );
        assert_eq!(
            c.next().await.unwrap(),
            Some(Frame::Exit(json!({"exitCode":0})))
        );
        assert_eq!(c.next().await.unwrap(), None);
        assert_eq!(c.next().await.unwrap(), None);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn an_early_refusal_is_seen_while_the_body_is_sent() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ep = endpoint_of(&l).await;
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let (_r, mut w) = s.into_split();
            w.write_all(b"{\"ok\":false,\"code\":\"too_large\",\"message\":\"no\"}\n")
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_secs(3)).await;
        });
        // A body that never ends: the refusal must still come through.
        let (tx, rx) = mpsc::channel(1);
        let t = std::time::Instant::now();
        let r = call(
            &ep,
            &json!({"op":"write"}),
            Some(AgentBody::Stream(rx)),
            Duration::from_secs(5),
        )
        .await;
        assert!(
            matches!(r, Err((AgentError::Refused { ref code, .. }, _)) if code == "too_large"),
            "{:?}",
            r.map(|_| ()).map_err(|(e, _)| e)
        );
        assert!(t.elapsed() < Duration::from_secs(2));
        drop(tx);
        server.abort();
    }

    #[tokio::test]
    async fn an_error_frame_and_a_cut_stream_are_told_apart() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ep = endpoint_of(&l).await;
        let server = tokio::spawn(async move {
            for cut in [false, true] {
                let (s, _) = l.accept().await.unwrap();
                let (_r, mut w) = s.into_split();
                w.write_all(b"{\"ok\":true}\n").await.unwrap();
                if cut {
                    w.write_all(&frame_header(kind::DATA, 100)).await.unwrap();
                    w.write_all(b"short").await.unwrap();
                } else {
                    write_frame(&mut w, kind::ERROR, br#"{"code":"io_error","message":"m"}"#)
                        .await
                        .unwrap();
                }
            }
        });
        let mut c = call(&ep, &json!({"op":"tar"}), None, Duration::from_secs(2))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
        assert!(
            matches!(c.next().await, Err(AgentError::Refused { code, .. }) if code == "io_error")
        );
        let mut c = call(&ep, &json!({"op":"tar"}), None, Duration::from_secs(2))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
        assert!(matches!(c.next().await, Err(AgentError::Lost(_))));
        server.await.unwrap();
    }
}
