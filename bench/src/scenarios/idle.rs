//! Idle connections (phase A): many open keep-alive and WebSocket connections, and what they
//! cost sandboxd.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures_util::{stream, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::http;
use crate::report::Fact;
use crate::sys;

use super::*;

/// What sandboxd's RSS should be back under within 30 s of the idle tunnels closing.
pub(crate) const CLOSED_BOUND_MIB: f64 = 32.0;

impl Ctx {
    pub(super) async fn bench_idle(&mut self) -> Result<()> {
        let n = self.n.idle_conns;
        let pid = self.server_pid()?;
        let host = self.host("p1");
        let addr = self.http;
        tokio::time::sleep(Duration::from_secs(1)).await;

        self.step(&format!("idle: {n} preview WebSocket tunnels"));
        let before = sys::rss_kib(pid)?;
        let t = Instant::now();
        let tunnels: Vec<Result<TcpStream>> = stream::iter(0..n)
            .map(|i| {
                let host = host.clone();
                async move {
                    let mut s = TcpStream::connect(addr).await?;
                    s.write_all(
                        format!(
                            "GET /ws/{i} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
                        )
                        .as_bytes(),
                    )
                    .await?;
                    let (status, _, _) = read_head(&mut s).await?;
                    if status != 101 {
                        bail!("status {status}");
                    }
                    Ok(s)
                }
            })
            .buffer_unordered(200)
            .collect()
            .await;
        let opened = t.elapsed();
        let failed = tunnels.iter().filter(|c| c.is_err()).count();
        let first_err = tunnels
            .iter()
            .find_map(|c| c.as_ref().err().map(|e| format!("{e:#}")));
        let tunnels: Vec<TcpStream> = tunnels.into_iter().filter_map(Result::ok).collect();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = sys::rss_kib(pid)?;
        let fds = sys::open_fds(pid);
        let open = count_open(&tunnels);
        self.report.footprint.push(Fact {
            label: format!("sandboxd RSS with {n} idle WebSockets"),
            value: format!("{:.1} MiB", mib(after)),
            note: format!(
                "preview WebSocket tunnels (HTTP/1.1 upgrade, as Vite's HMR socket) to one sandbox's app, idle after the handshake; each is a client socket and an upstream socket in sandboxd ({fds} fds open); {open} of {n} open when measured ({failed} failed{}; opened in {:.1} s, 200 at a time); {:.1} MiB before, {:.1} KiB per tunnel",
                first_err.map(|e| format!(": {e}")).unwrap_or_default(),
                opened.as_secs_f64(),
                mib(before),
                (after as f64 - before as f64) / n as f64
            ),
        });
        drop(tunnels);
        // The RSS once the clients closed them, each second for 30 s: when it is first back
        // under the bound, or what it is after 30 s.
        let closed_at = Instant::now();
        let (closed, took) = loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let rss = sys::rss_kib(pid)?;
            let took = closed_at.elapsed();
            if mib(rss) < CLOSED_BOUND_MIB || took >= Duration::from_secs(30) {
                break (rss, took);
            }
        };
        self.report.footprint.push(Fact {
            label: "… after those tunnels closed".into(),
            value: format!("{:.1} MiB", mib(closed)),
            note: format!(
                "{:.0} s after the clients closed them (measured each second until under {CLOSED_BOUND_MIB} MiB, for at most 30 s)",
                took.as_secs_f64()
            ),
        });

        // A fresh process, so that the keep-alive figure does not include what the tunnels left.
        self.start_server("a2", PHASE_A_ENV).await?;
        let pid = self.server_pid()?;
        http::wait_200(self.http, &host, "/", Duration::from_secs(30)).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        self.step(&format!("idle: {n} keep-alive connections"));
        let before = sys::rss_kib(pid)?;
        let t = Instant::now();
        let conns: Vec<Result<TcpStream>> = stream::iter(0..n)
            .map(|_| {
                let host = host.clone();
                async move {
                    let mut s = TcpStream::connect(addr).await?;
                    s.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
                        .await?;
                    let (status, len, have) = read_head(&mut s).await?;
                    if status != 200 {
                        bail!("status {status}");
                    }
                    let mut rest = vec![0u8; len.saturating_sub(have)];
                    s.read_exact(&mut rest).await?;
                    Ok(s)
                }
            })
            .buffer_unordered(200)
            .collect()
            .await;
        let opened = t.elapsed();
        let failed = conns.iter().filter(|c| c.is_err()).count();
        let conns: Vec<TcpStream> = conns.into_iter().filter_map(Result::ok).collect();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = sys::rss_kib(pid)?;
        let open = count_open(&conns);
        // How long the edge keeps an idle keep-alive connection.
        let hold = Duration::from_secs(12);
        tokio::time::sleep(hold.saturating_sub(t.elapsed())).await;
        let open_later = count_open(&conns);
        self.report.footprint.push(Fact {
            label: format!("sandboxd RSS with {n} idle keep-alive HTTP connections"),
            value: format!("{:.1} MiB", mib(after)),
            note: format!(
                "each connection made one proxied GET to the preview and stayed open; {open} of {n} open when measured ({failed} failed to open, all opened in {:.1} s), {open_later} still open {} s after opening{}; {:.1} MiB before, {:.1} KiB per connection",
                opened.as_secs_f64(),
                hold.as_secs(),
                if open_later < open {
                    " (the edge closes idle keep-alive connections after `header_read_timeout`, 10 s)"
                } else {
                    ""
                },
                mib(before),
                (after as f64 - before as f64) / n as f64
            ),
        });
        drop(conns);
        tokio::time::sleep(Duration::from_secs(2)).await;
        self.report.settings.push((
            "idle connections".into(),
            format!(
                "open files limit of the bench and sandboxd: {}",
                self.nofile
            ),
        ));
        Ok(())
    }
}

/// Reads a response head; (status, content-length, bytes after the head).
async fn read_head(s: &mut TcpStream) -> Result<(u16, usize, usize)> {
    let mut buf = Vec::with_capacity(1024);
    let mut tmp = [0u8; 4096];
    loop {
        let n = s.read(&mut tmp).await?;
        if n == 0 {
            bail!("connection closed before the response head");
        }
        buf.extend_from_slice(&tmp[..n]);
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .context("status line")?;
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            return Ok((status, len, buf.len() - i - 4));
        }
        if buf.len() > 64 * 1024 {
            bail!("response head too large");
        }
    }
}

/// How many of the connections are still open (no EOF or error seen).
fn count_open(conns: &[TcpStream]) -> usize {
    conns
        .iter()
        .filter(|s| {
            let mut b = [0u8; 1];
            matches!(s.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        })
        .count()
}
