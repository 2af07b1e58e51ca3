//! Bytes queued for a socket and written with vectored writes: a message head, body pieces
//! and chunked framing as shared `Bytes`, never copied into one buffer. The preview pool writes
//! requests to apps with it, the edge's fast path answers to clients.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::AsyncWrite;

/// The most pieces one write takes.
const SLICES: usize = 8;

#[derive(Default)]
pub struct WriteQueue {
    parts: VecDeque<Bytes>,
    /// Bytes queued.
    len: usize,
}

impl WriteQueue {
    pub fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.len += b.len();
            self.parts.push_back(b);
        }
    }

    /// `data` as one chunk of a chunked body (its size line, itself, CRLF).
    pub fn push_chunk(&mut self, data: Bytes) {
        self.push(Bytes::from(format!("{:x}\r\n", data.len())));
        self.push(data);
        self.push(Bytes::from_static(b"\r\n"));
    }

    /// The last chunk of a chunked body (no trailers).
    pub fn push_last_chunk(&mut self) {
        self.push(Bytes::from_static(b"0\r\n\r\n"));
    }

    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// Bytes queued.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Writes to `io` until the queue is empty (`Ready(Ok)`) or `io` would block (`Pending`).
    pub fn poll_flush<W: AsyncWrite + Unpin + ?Sized>(
        &mut self,
        io: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        while !self.is_empty() {
            let mut slices = [io::IoSlice::new(&[]); SLICES];
            let mut n = 0;
            for (slot, b) in slices.iter_mut().zip(self.parts.iter()) {
                *slot = io::IoSlice::new(b);
                n += 1;
            }
            let wrote =
                std::task::ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices[..n]))?;
            if wrote == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.advance(wrote);
        }
        Poll::Ready(Ok(()))
    }

    fn advance(&mut self, mut n: usize) {
        self.len -= n.min(self.len);
        while n > 0 {
            let Some(front) = self.parts.front_mut() else {
                return;
            };
            if n >= front.len() {
                n -= front.len();
                self.parts.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pieces_and_chunks_reach_the_socket_in_order_across_short_writes() {
        let (mut a, mut b) = tokio::io::duplex(7);
        let mut q = WriteQueue::default();
        q.push(Bytes::from_static(b"head\r\n"));
        q.push(Bytes::new());
        q.push_chunk(Bytes::from_static(b"hello"));
        q.push_last_chunk();
        assert_eq!(q.len(), 6 + 3 + 5 + 2 + 5);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut b, &mut got)
                .await
                .map(|_| got)
        });
        std::future::poll_fn(|cx| q.poll_flush(&mut a, cx))
            .await
            .expect("written");
        assert!(q.is_empty());
        assert_eq!(q.len(), 0);
        drop(a);
        let got = reader.await.expect("task").expect("read");
        assert_eq!(got, b"head\r\n5\r\nhello\r\n0\r\n\r\n");
    }
}
