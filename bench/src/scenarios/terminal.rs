//! Terminal keystroke echo (phase A) over the WebSocket.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use futures_util::{SinkExt, StreamExt};
use sandboxd::sandbox::testing::{ExecOutput, ExecSpec};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::report::TimedRow;
use crate::stats::summarize;

use super::*;

impl Ctx {
    pub(super) async fn bench_terminal(&mut self, id: &str) -> Result<()> {
        self.step("terminal: keystroke echo");
        let mut req = format!("ws://{}/sandbox/terminal", self.http).into_client_request()?;
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {}", self.api()?.token("p1")?).parse()?,
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(req).await?;
        // Let the login shell print its prompt.
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(15) {
            match tokio::time::timeout(Duration::from_millis(700), ws.next()).await {
                Err(_) => break,
                Ok(Some(Ok(_))) => continue,
                Ok(other) => bail!("terminal ended while starting: {other:?}"),
            }
        }
        async fn until<S>(ws: &mut S, byte: u8) -> Result<()>
        where
            S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
                + Unpin,
        {
            loop {
                match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
                    Err(_) => bail!("no echo within 5 s"),
                    Ok(Some(Ok(Message::Binary(b)))) if b.contains(&byte) => return Ok(()),
                    Ok(Some(Ok(Message::Close(c)))) => bail!("terminal closed: {c:?}"),
                    Ok(Some(Ok(_))) => {}
                    Ok(Some(Err(e))) => bail!("terminal: {e}"),
                    Ok(None) => bail!("terminal stream ended"),
                }
            }
        }
        let warm = 5;
        let mut samples = vec![];
        for i in 0..self.n.keys + warm {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let t = Instant::now();
            ws.send(Message::Binary(b"x".to_vec())).await?;
            until(&mut ws, b'x').await?;
            if i >= warm {
                samples.push(t.elapsed().as_secs_f64() * 1e3);
            }
            ws.send(Message::Binary(vec![0x7f])).await?;
            until(&mut ws, 0x08).await?;
        }
        let _ = ws.send(Message::Binary(b"exit\r".to_vec())).await;
        let _ = ws.close(None).await;
        self.report.terminal.push(TimedRow {
            label: "sandboxd terminal WebSocket".into(),
            ms: summarize(&samples),
            note: "binary frame with one key → first binary frame carrying its echo (bash readline in the sandbox's PTY)".into(),
        });

        // Floor: the same PTY wrapper through the engine directly, no edge, no WebSocket.
        let (_exec, mut out, mut input) = self
            .engine
            .exec(
                id,
                ExecSpec {
                    cmd: vec![
                        "script".into(),
                        "-qfec".into(),
                        sandboxd::sandbox::shell::Script::TermWrapper
                            .source()
                            .into(),
                        "/dev/null".into(),
                    ],
                    env: vec![
                        "TERM=xterm-256color".into(),
                        "SHELL=/bin/bash".into(),
                        "SANDBOXD_TERMINAL_COLS=80".into(),
                        "SANDBOXD_TERMINAL_ROWS=24".into(),
                    ],
                    working_dir: Some("/workspace"),
                    tty: false,
                    stdin: true,
                },
            )
            .await?;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(15) {
            match tokio::time::timeout(Duration::from_millis(700), out.next()).await {
                Err(_) => break,
                Ok(Some(Ok(_))) => continue,
                Ok(_) => bail!("direct exec ended while starting"),
            }
        }
        async fn until_exec(
            out: &mut sandboxd::sandbox::testing::ExecStream,
            byte: u8,
        ) -> Result<()> {
            loop {
                match tokio::time::timeout(Duration::from_secs(5), out.next()).await {
                    Err(_) => bail!("no echo within 5 s"),
                    Ok(Some(Ok(ExecOutput::Stdout(b) | ExecOutput::Stderr(b))))
                        if b.contains(&byte) =>
                    {
                        return Ok(())
                    }
                    Ok(Some(Ok(_))) => {}
                    Ok(Some(Err(e))) => bail!("direct exec: {e:#}"),
                    Ok(None) => bail!("direct exec ended"),
                }
            }
        }
        let mut floor = vec![];
        for i in 0..self.n.keys + warm {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let t = Instant::now();
            input.write_all(b"x").await?;
            input.flush().await?;
            until_exec(&mut out, b'x').await?;
            if i >= warm {
                floor.push(t.elapsed().as_secs_f64() * 1e3);
            }
            input.write_all(&[0x7f]).await?;
            input.flush().await?;
            until_exec(&mut out, 0x08).await?;
        }
        let _ = input.write_all(b"exit\r").await;
        self.report.terminal.push(TimedRow {
            label: "engine exec attach, same PTY wrapper (floor)".into(),
            ms: summarize(&floor),
            note: "the exec sandboxd's terminal uses, driven over the engine socket by the bench: no edge, no WebSocket".into(),
        });
        self.report.settings.push((
            "terminal".into(),
            format!("{} keystrokes after {warm} warm-up ones, 20 ms apart, each erased again (DEL) before the next", self.n.keys),
        ));
        Ok(())
    }
}
