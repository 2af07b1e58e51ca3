//! The WebSocket client of the terminal tests: opening a terminal (or any upgrade) with extra
//! headers, and `Term`, a terminal that sends keystrokes and reads output until a marker.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::TestApp;

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long `Term` waits for the output or the close frame it expects, unless told otherwise.
pub const STEP: Duration = Duration::from_secs(20);

pub fn term_url(app: &TestApp, query: &str) -> String {
    format!("ws://{}/sandbox/terminal{query}", app.addr)
}

/// Opens a WebSocket with extra headers; the handshake's result as tungstenite reports it.
pub async fn ws_open(
    url: &str,
    headers: &[(&str, &str)],
) -> Result<
    (
        Ws,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    WsError,
> {
    let mut req = url.into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().append(
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    tokio::time::timeout(
        Duration::from_secs(90),
        tokio_tungstenite::connect_async(req),
    )
    .await
    .expect("handshake within 90 s")
}

pub struct Term {
    pub ws: Ws,
    /// Output seen so far and not yet consumed by `until`.
    pub buf: String,
    step: Duration,
}

impl Term {
    pub fn from_ws(ws: Ws) -> Term {
        Term {
            ws,
            buf: String::new(),
            step: STEP,
        }
    }

    /// Opens the terminal of `user` (`query` is the URL's query, "" or "?…").
    pub async fn open(app: &TestApp, user: &str, query: &str) -> Term {
        let auth = format!("Bearer {}", app.token(user));
        let (ws, resp) = ws_open(&term_url(app, query), &[("authorization", &auth)])
            .await
            .expect("terminal opens");
        assert_eq!(resp.status(), 101);
        Term::from_ws(ws)
    }

    /// Waits up to `step` (instead of `STEP`) for each expected output or close frame.
    pub fn with_step(mut self, step: Duration) -> Term {
        self.step = step;
        self
    }

    pub async fn send(&mut self, input: &str) {
        self.ws
            .send(Message::Binary(input.as_bytes().to_vec()))
            .await
            .unwrap();
    }

    pub async fn control(&mut self, json: serde_json::Value) {
        self.ws.send(Message::Text(json.to_string())).await.unwrap();
    }

    /// Reads output until `needle` appears; returns everything up to and including it.
    pub async fn until(&mut self, needle: &str) -> String {
        let step = self.step;
        let deadline = Instant::now() + step;
        loop {
            if let Some(i) = self.buf.find(needle) {
                let rest = self.buf.split_off(i + needle.len());
                return std::mem::replace(&mut self.buf, rest);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.ws.next()).await {
                Err(_) => panic!(
                    "no {needle:?} within {step:?}; output so far: {:?}",
                    self.buf
                ),
                Ok(Some(Ok(Message::Binary(b)))) => self.buf.push_str(&String::from_utf8_lossy(&b)),
                Ok(Some(Ok(Message::Close(c)))) => {
                    panic!(
                        "closed ({c:?}) while waiting for {needle:?}; output: {:?}",
                        self.buf
                    )
                }
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => panic!("error {e} while waiting for {needle:?}"),
                Ok(None) => panic!("stream ended while waiting for {needle:?}"),
            }
        }
    }

    /// Runs a command whose output is wrapped in markers the echoed command line cannot
    /// contain (`$((…))` is expanded only in the output); returns what is between them, as is.
    pub async fn run(&mut self, cmd: &str) -> String {
        self.send(&format!("echo \"<$((6*7))>$({cmd})</$((6*7))>\"\r"))
            .await;
        let out = self.until("</42>").await;
        let start = out.rfind("<42>").expect("start marker") + 4;
        out[start..out.len() - 5].to_owned()
    }

    /// Runs a shell command like `run`; returns its stdout and stderr, trimmed, CR removed.
    pub async fn output(&mut self, cmd: &str) -> String {
        self.send(&format!("echo \"<$((6*7))>$({cmd} 2>&1)</$((6*7))>\"\r"))
            .await;
        let out = self.until("</42>").await;
        let start = out.rfind("<42>").expect("start marker") + 4;
        out[start..out.len() - 5]
            .replace('\r', "")
            .trim()
            .to_owned()
    }

    /// Waits for the close frame (skipping output).
    pub async fn closed(&mut self) -> Option<CloseFrame<'static>> {
        let step = self.step;
        let deadline = Instant::now() + step;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.ws.next()).await {
                Err(_) => panic!("no close frame within {step:?}"),
                Ok(Some(Ok(Message::Close(c)))) => return c,
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => panic!("error {e} instead of a close frame"),
                Ok(None) => panic!("stream ended without a close frame"),
            }
        }
    }
}
