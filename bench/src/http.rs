//! Small HTTP clients: the API (bearer tokens signed with the instance's secret) and timed
//! GETs on fresh connections, the way a browser's first request reaches a preview host.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sandboxd::auth::Auth;
use sandboxd::user::UserId;
use serde_json::Value;
use tokio::net::TcpStream;

pub struct Api {
    addr: SocketAddr,
    client: Client<HttpConnector, Full<Bytes>>,
    auth: Auth,
    /// The Host header of API calls, when it is not the address (an edge of the swarm lab
    /// serves its API on the lab's domain only).
    host: Option<String>,
}

impl Api {
    pub fn new(addr: SocketAddr, secret: &str) -> Api {
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        Api {
            addr,
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(3))
                .build(conn),
            auth: Auth::new(secret.as_bytes()),
            host: None,
        }
    }

    /// The same client, sending `host` as the Host header of every API call.
    pub fn with_host(mut self, host: &str) -> Api {
        self.host = Some(host.to_owned());
        self
    }

    fn request(&self, method: Method, path: &str) -> hyper::http::request::Builder {
        let b = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr));
        match &self.host {
            Some(h) => b.header(HOST, h.as_str()),
            None => b,
        }
    }

    pub fn token(&self, user: &str) -> Result<String> {
        let u = UserId::parse(user).map_err(|e| anyhow!("{user}: {e}"))?;
        self.auth.issue(&u, Duration::from_secs(6 * 3600))
    }

    /// One API call; the status and the JSON body (Null when the body is not JSON).
    pub async fn call(
        &self,
        user: &str,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Value)> {
        let req = self
            .request(method, path)
            .header(AUTHORIZATION, format!("Bearer {}", self.token(user)?))
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(
                body.map(|b| b.to_string()).unwrap_or_default(),
            )))?;
        let resp = self.client.request(req).await.context("API request")?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }

    /// One request with a raw body; the status and the raw answer.
    pub async fn raw(
        &self,
        user: &str,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes)> {
        let req = self
            .request(method, path)
            .header(AUTHORIZATION, format!("Bearer {}", self.token(user)?))
            .body(Full::new(body))?;
        let resp = self.client.request(req).await.context("API request")?;
        let status = resp.status();
        Ok((status, resp.into_body().collect().await?.to_bytes()))
    }

    /// POST that must succeed (2xx).
    pub async fn post(&self, user: &str, path: &str, body: &Value) -> Result<Value> {
        let (s, v) = self.call(user, Method::POST, path, Some(body)).await?;
        if !s.is_success() {
            bail!("POST {path} as {user}: {s} {v}");
        }
        Ok(v)
    }

    pub async fn healthz(&self) -> bool {
        let Ok(req) = self
            .request(Method::GET, "/healthz")
            .body(Full::new(Bytes::new()))
        else {
            return false;
        };
        matches!(self.client.request(req).await, Ok(r) if r.status() == StatusCode::OK)
    }
}

/// The outcome of one GET.
pub struct Timed {
    pub status: u16,
    /// Until the response head arrived.
    pub head: Duration,
    pub body_len: usize,
    /// The start of the body (for error messages).
    pub body: String,
}

/// One GET on a fresh connection to `addr` with the given Host; times until the response
/// head (the first byte), then drains the body.
pub async fn timed_get(addr: SocketAddr, host: &str, path: &str, limit: Duration) -> Result<Timed> {
    tokio::time::timeout(limit, async {
        let t = Instant::now();
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::get(path)
            .header(HOST, host)
            .body(Empty::<Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        let head = t.elapsed();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok(Timed {
            status,
            head,
            body_len: body.len(),
            body: String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned(),
        })
    })
    .await
    .map_err(|_| anyhow!("GET {host}{path}: no answer within {limit:?}"))?
}

/// Repeats GETs until one answers 200 (or the deadline passes).
pub async fn wait_200(addr: SocketAddr, host: &str, path: &str, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    let mut last = String::new();
    while Instant::now() < deadline {
        match timed_get(addr, host, path, Duration::from_secs(30)).await {
            Ok(t) if t.status == 200 => return Ok(()),
            Ok(t) => last = format!("status {}", t.status),
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{host}{path} did not answer 200 within {within:?} (last: {last})")
}
