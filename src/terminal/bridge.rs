//! The bridge between a WebSocket and an exec: input one way, output the other, control
//! messages, pings and backpressure.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{FutureExt, Sink, SinkExt, Stream, StreamExt};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::error::{Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::Message;

use super::protocol::{error_frame, parse_control, Control, Outcome, Size, PONG_FRAME};

/// The server pings this often; browsers and tungstenite clients answer on their own.
const PING_EVERY: Duration = Duration::from_secs(20);
/// A client silent for this long (no frame, no pong) is gone: a network drop without a FIN.
const SILENCE_LIMIT: Duration = Duration::from_secs(60);
/// Output is sent in frames of at most this size, which keeps tungstenite's write buffer
/// (bounded below) from ever refusing a frame.
const OUT_FRAME_MAX: usize = 64 * 1024;

/// The exec side of the bridge.
pub(super) trait Pty: Send + Sync {
    /// Applies a size; the bridge awaits it before forwarding later input, so a program run
    /// right after a resize sees the new size.
    fn resize(&self, size: Size) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
    /// Called on every client input (activity for the idle policy).
    fn input_seen(&self);
}

/// Bridge timing (the defaults in production, short values in tests).
#[derive(Clone, Copy, Debug)]
pub(super) struct Timing {
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
pub(super) async fn bridge<Si, St, O, I>(
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::io::AsyncReadExt;
    use tokio_tungstenite::tungstenite::error::CapacityError;

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
}
