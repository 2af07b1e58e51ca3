//! The client side of an upgraded connection (a terminal or files-watch WebSocket, a preview
//! tunnel), for the task on the main runtime that serves it from then on.
//!
//! The connection was accepted on an edge thread (`percore.rs`), so its socket is registered
//! with that thread's reactor: each time the client sent something, the edge thread woke up
//! only to wake the serving task on the main runtime, two wake-ups per keystroke instead of
//! one, and both of them cross-thread on a loaded machine. A plain TCP socket is moved to the
//! calling runtime's reactor instead ([`rehome`]); a TLS one stays where it is (its state is
//! rustls's, bound to the stream it wraps) and is served through hyper's `Upgraded`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::framing::FramingCheck;

/// What an edge connection's IO is, as hyper was given it (`listener.rs`), for plain HTTP.
type PlainIo = TokioIo<FramingCheck<TcpStream>>;

/// A plain TCP side of an upgraded connection (the client's here, or a preview tunnel's
/// upstream): its socket and the bytes already read from it that belong to the new protocol.
pub struct Plain {
    pub stream: TcpStream,
    pub early: Vec<u8>,
}

/// Takes the plain TCP client connection out of `up` (else gives `up` back), registered with
/// the calling runtime's reactor. Must run inside a runtime.
pub fn plain(up: Upgraded) -> Result<io::Result<Plain>, Upgraded> {
    let parts = hyper_util::server::conn::auto::upgrade::downcast::<PlainIo>(up)?;
    let (stream, rest) = parts.io.into_inner().into_parts();
    let mut early = parts.read_buf.to_vec();
    early.extend_from_slice(&rest);
    Ok(rehome(stream).map(|stream| Plain { stream, early }))
}

/// `stream` registered with the calling runtime's reactor rather than the one it was made on
/// (the wakers it held go with the old registration).
fn rehome(stream: TcpStream) -> io::Result<TcpStream> {
    let std = stream.into_std()?;
    TcpStream::from_std(std)
}

/// The client connection of an upgraded request: plain TCP on the serving runtime's reactor
/// (with the bytes read ahead first), or hyper's `Upgraded` (TLS, or a connection that did
/// not come through an edge listener).
pub enum ClientIo {
    Plain {
        stream: TcpStream,
        early: Vec<u8>,
        /// How much of `early` has been read.
        pos: usize,
    },
    Upgraded(TokioIo<Upgraded>),
}

impl ClientIo {
    /// See [`plain`]. Must run inside a runtime.
    pub fn new(up: Upgraded) -> io::Result<ClientIo> {
        match plain(up) {
            Ok(p) => p.map(|p| ClientIo::Plain {
                stream: p.stream,
                early: p.early,
                pos: 0,
            }),
            Err(up) => Ok(ClientIo::Upgraded(TokioIo::new(up))),
        }
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain { stream, early, pos } => {
                if *pos < early.len() {
                    let n = (early.len() - *pos).min(buf.remaining());
                    buf.put_slice(&early[*pos..*pos + n]);
                    *pos += n;
                    if *pos == early.len() {
                        *early = Vec::new();
                        *pos = 0;
                    }
                    return Poll::Ready(Ok(()));
                }
                Pin::new(stream).poll_read(cx, buf)
            }
            ClientIo::Upgraded(up) => Pin::new(up).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientIo::Plain { stream, .. } => Pin::new(stream).poll_write(cx, buf),
            ClientIo::Upgraded(up) => Pin::new(up).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientIo::Plain { stream, .. } => Pin::new(stream).poll_write_vectored(cx, bufs),
            ClientIo::Upgraded(up) => Pin::new(up).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ClientIo::Plain { stream, .. } => stream.is_write_vectored(),
            ClientIo::Upgraded(up) => up.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain { stream, .. } => Pin::new(stream).poll_flush(cx),
            ClientIo::Upgraded(up) => Pin::new(up).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain { stream, .. } => Pin::new(stream).poll_shutdown(cx),
            ClientIo::Upgraded(up) => Pin::new(up).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A socket made on another runtime (an edge thread's) keeps working once that runtime is
    /// gone: it is driven by this one's reactor.
    #[tokio::test]
    async fn a_rehomed_socket_outlives_the_runtime_it_was_made_on() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let edge = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let made = std::thread::spawn(move || {
            let s = edge.block_on(TcpStream::connect(addr)).unwrap();
            // Registered with `edge`'s reactor, which ends with this thread.
            (s, edge)
        });
        let (ours, edge) = made.join().unwrap();
        let ours = rehome(ours).unwrap();
        std::thread::spawn(move || drop(edge)).join().unwrap();
        let (mut peer, _) = l.accept().unwrap();
        let mut io = ClientIo::Plain {
            stream: ours,
            early: Vec::new(),
            pos: 0,
        };
        std::io::Write::write_all(&mut peer, b"ping").unwrap();
        let mut got = [0u8; 4];
        tokio::time::timeout(std::time::Duration::from_secs(5), io.read_exact(&mut got))
            .await
            .expect("read within 5 s")
            .unwrap();
        assert_eq!(&got, b"ping");
    }

    #[tokio::test]
    async fn a_plain_client_reads_the_bytes_read_ahead_first_then_its_socket() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut peer = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (ours, _) = l.accept().await.unwrap();
        let mut io = ClientIo::Plain {
            stream: rehome(ours).unwrap(),
            early: b"early ".to_vec(),
            pos: 0,
        };
        peer.write_all(b"late").await.unwrap();
        peer.shutdown().await.unwrap();
        let mut got = Vec::new();
        // A small buffer: the read-ahead bytes come over several reads.
        let mut buf = [0u8; 4];
        loop {
            let n = io.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"early late");
        io.write_all(b"back").await.unwrap();
        io.shutdown().await.unwrap();
        let mut echoed = Vec::new();
        peer.read_to_end(&mut echoed).await.unwrap();
        assert_eq!(echoed, b"back");
    }
}
