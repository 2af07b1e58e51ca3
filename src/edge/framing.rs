//! Request framing at the edge (HTTP/1). A request with both `Content-Length` and
//! `Transfer-Encoding`, or with more than one `Content-Length` value, is the raw material of
//! request smuggling: two parsers that disagree on where its body ends see different requests.
//! sandboxd refuses them with 400 `bad_framing` on every host, before anything is forwarded.
//!
//! hyper cannot be asked after the fact: its parser drops `Content-Length` when
//! `Transfer-Encoding` is present and answers conflicting lengths itself, without a code. So
//! the check runs on the raw bytes, in the connection's read path: [`FramingCheck`] follows
//! the HTTP/1 message boundaries (heads, `Content-Length` bodies, chunked bodies), and when a
//! head is bad it renames its framing headers to [`MARKER`] (so hyper sees a request without
//! a body) and hands hyper nothing after it. The service answers a request carrying the
//! marker with 400 and `Connection: close`, so the bytes that followed (a smuggled second
//! request) never reach anyone. Upgrades, `CONNECT` and HTTP/2 (its preface) switch the check
//! off for the rest of the connection: their bytes are not HTTP/1 messages.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Header that replaces the framing headers of a refused request.
pub const MARKER: &str = "x-sandboxd-bad-framing";
/// [`MARKER`]'s value on the stand-in for a head longer than the limit (answered with 431).
pub const HEAD_TOO_LARGE: &str = "head-too-large";
/// [`MARKER`] as a header name, made once (a lookup by `&str` parses the name every time).
pub static MARKER_NAME: hyper::header::HeaderName = hyper::header::HeaderName::from_static(MARKER);
/// Longest chunk-size or trailer line followed before giving up (hyper refuses such input).
const MAX_LINE: usize = 4096;
const READ_CHUNK: usize = 8192;
/// Largest head buffer kept between requests.
const KEEP_BUF: usize = 4096;
/// Lingering close (see [`FramingCheck`]'s `poll_shutdown`): the most bytes read and dropped
/// after our side of the connection is shut, and for how long at most.
const LINGER_BYTES: usize = 1 << 20;
const LINGER_TIME: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Debug, PartialEq, Eq)]
enum Mode {
    Head,
    Body(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkDataEnd,
    Trailer,
    /// Not HTTP/1 messages any more (or not understood): bytes go through untouched.
    Passthrough,
    /// A bad head was handed over; nothing after it is.
    Blocked,
}

/// Follows HTTP/1 message boundaries in the client's bytes.
#[derive(Debug)]
pub struct Tracker {
    mode: Mode,
    buf: Vec<u8>,
    max_head: usize,
}

impl Tracker {
    pub fn new(max_head: usize) -> Tracker {
        Tracker {
            mode: Mode::Head,
            buf: Vec::new(),
            max_head,
        }
    }

    pub fn blocked(&self) -> bool {
        self.mode == Mode::Blocked
    }

    fn passthrough(&self) -> bool {
        self.mode == Mode::Passthrough
    }

    /// Feeds bytes read from the client and appends what the HTTP parser should see to `out`.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        while !input.is_empty() {
            match self.mode {
                Mode::Passthrough => {
                    out.extend_from_slice(input);
                    return;
                }
                Mode::Blocked => return,
                Mode::Body(n) => {
                    let k = (n.min(input.len() as u64)) as usize;
                    out.extend_from_slice(&input[..k]);
                    input = &input[k..];
                    self.mode = if n - k as u64 == 0 {
                        Mode::Head
                    } else {
                        Mode::Body(n - k as u64)
                    };
                }
                Mode::ChunkData(n) => {
                    let k = (n.min(input.len() as u64)) as usize;
                    out.extend_from_slice(&input[..k]);
                    input = &input[k..];
                    self.mode = if n - k as u64 == 0 {
                        Mode::ChunkDataEnd
                    } else {
                        Mode::ChunkData(n - k as u64)
                    };
                }
                Mode::ChunkSize | Mode::ChunkDataEnd | Mode::Trailer => {
                    // Line-based parts of a chunked body: pass through, act at each line end.
                    let (line_end, k) = match input.iter().position(|&b| b == b'\n') {
                        Some(i) => (true, i + 1),
                        None => (false, input.len()),
                    };
                    out.extend_from_slice(&input[..k]);
                    self.buf.extend_from_slice(&input[..k]);
                    input = &input[k..];
                    if !line_end {
                        if self.buf.len() > MAX_LINE {
                            self.mode = Mode::Passthrough;
                        }
                        continue;
                    }
                    let line = std::mem::take(&mut self.buf);
                    let line = trim_eol(&line);
                    self.mode = match self.mode {
                        Mode::ChunkSize => match chunk_size(line) {
                            Some(0) => Mode::Trailer,
                            Some(n) => Mode::ChunkData(n),
                            None => Mode::Passthrough,
                        },
                        Mode::ChunkDataEnd if line.is_empty() => Mode::ChunkSize,
                        Mode::Trailer if line.is_empty() => Mode::Head,
                        Mode::Trailer => Mode::Trailer,
                        _ => Mode::Passthrough,
                    };
                }
                Mode::Head => {
                    // Empty lines before a request line are allowed (and skipped by hyper).
                    if self.buf.is_empty() && (input[0] == b'\r' || input[0] == b'\n') {
                        out.push(input[0]);
                        input = &input[1..];
                        continue;
                    }
                    // The common case, a whole head in one read: looked at where it is.
                    if self.buf.is_empty() {
                        if let Some(end) = head_end(input, 0) {
                            let (head, rest) = input.split_at(end);
                            self.on_head(head, out);
                            input = rest;
                            continue;
                        }
                    }
                    let start = self.buf.len();
                    self.buf.extend_from_slice(input);
                    let from = start.saturating_sub(3);
                    match head_end(&self.buf, from) {
                        Some(end) => {
                            input = &input[end - start..];
                            self.buf.truncate(end);
                            let mut head = std::mem::take(&mut self.buf);
                            self.on_head(&head, out);
                            // Kept for the next head unless it grew large (idle keep-alive
                            // connections should not hold big buffers).
                            if head.capacity() <= KEEP_BUF {
                                head.clear();
                                self.buf = head;
                            }
                        }
                        None => {
                            if self.buf.len() > self.max_head {
                                self.refuse_head(out);
                            }
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Hands over what is held back (a partial head) when the client stops sending.
    pub fn flush(&mut self, out: &mut Vec<u8>) {
        if self.mode == Mode::Head {
            out.append(&mut self.buf);
        }
    }

    /// The head is longer than `max_head`: the parser gets a stand-in head carrying
    /// [`MARKER`]` = `[`HEAD_TOO_LARGE`] (answered with 431 and `Connection: close`) and nothing
    /// after it. Done here rather than by hyper's buffer limit, which also bounds how much of
    /// an answer hyper queues for a slow client and is kept larger for that.
    fn refuse_head(&mut self, out: &mut Vec<u8>) {
        self.buf = Vec::new();
        out.extend_from_slice(b"GET / HTTP/1.1\r\n");
        out.extend_from_slice(MARKER.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(HEAD_TOO_LARGE.as_bytes());
        out.extend_from_slice(b"\r\n\r\n");
        self.mode = Mode::Blocked;
    }

    fn on_head(&mut self, head: &[u8], out: &mut Vec<u8>) {
        if head.len() > self.max_head {
            return self.refuse_head(out);
        }
        let mut lines = lines(head).map(trim_eol);
        let request_line = lines.next().unwrap_or_default();
        let method = request_line
            .split(|&b| b == b' ')
            .next()
            .unwrap_or_default();
        let mut lengths = 0usize;
        let mut length: Option<&[u8]> = None;
        let mut te = false;
        let mut chunked_last = false;
        let mut conn_upgrade = false;
        let mut upgrade = false;
        for line in lines {
            if !may_frame(line) {
                continue;
            }
            let Some(colon) = memchr::memchr(b':', line) else {
                continue;
            };
            let name = trim(&line[..colon]);
            let value = trim(&line[colon + 1..]);
            if name.eq_ignore_ascii_case(b"content-length") {
                for v in value.split(|&b| b == b',') {
                    lengths += 1;
                    length = Some(trim(v));
                }
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                te = true;
                chunked_last = value
                    .split(|&b| b == b',')
                    .next_back()
                    .is_some_and(|t| trim(t).eq_ignore_ascii_case(b"chunked"));
            } else if name.eq_ignore_ascii_case(b"connection") {
                conn_upgrade |= value
                    .split(|&b| b == b',')
                    .any(|t| trim(t).eq_ignore_ascii_case(b"upgrade"));
            } else if name.eq_ignore_ascii_case(b"upgrade") {
                upgrade = true;
            }
        }
        if method == b"PRI" {
            // The HTTP/2 preface: not HTTP/1 from here on.
            out.extend_from_slice(head);
            self.mode = Mode::Passthrough;
            return;
        }
        if (te && lengths > 0) || lengths > 1 {
            out.extend_from_slice(&rewrite(head));
            self.mode = Mode::Blocked;
            return;
        }
        out.extend_from_slice(head);
        self.mode = if method == b"CONNECT" || (conn_upgrade && upgrade) {
            Mode::Passthrough
        } else if te {
            if chunked_last {
                Mode::ChunkSize
            } else {
                Mode::Passthrough
            }
        } else {
            match length.map(parse_len) {
                None | Some(Some(0)) => Mode::Head,
                Some(Some(n)) => Mode::Body(n),
                Some(None) => Mode::Passthrough,
            }
        };
    }
}

/// The head with every `Content-Length` and `Transfer-Encoding` line renamed to [`MARKER`].
fn rewrite(head: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(head.len() + 64);
    let mut lines = head.split(|&b| b == b'\n').map(trim_eol);
    out.extend_from_slice(lines.next().unwrap_or_default());
    out.extend_from_slice(b"\r\n");
    for line in lines {
        if line.is_empty() {
            continue;
        }
        let name = line
            .iter()
            .position(|&b| b == b':')
            .map(|c| trim(&line[..c]))
            .unwrap_or_default();
        if name.eq_ignore_ascii_case(b"content-length")
            || name.eq_ignore_ascii_case(b"transfer-encoding")
        {
            out.extend_from_slice(MARKER.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(&name.to_ascii_lowercase());
        } else {
            out.extend_from_slice(line);
        }
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// End (exclusive) of the head: the first empty line at or after `from`.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    memchr::memchr_iter(b'\n', &buf[from.min(buf.len())..])
        .map(|i| from + i)
        .find_map(|i| match &buf[i + 1..] {
            [b'\n', ..] => Some(i + 2),
            [b'\r', b'\n', ..] => Some(i + 3),
            _ => None,
        })
}

/// The pieces of `head` between `\n`s, as `head.split(|&b| b == b'\n')` gives them.
fn lines(head: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(head);
    std::iter::from_fn(move || {
        let r = rest?;
        match memchr::memchr(b'\n', r) {
            Some(i) => {
                rest = Some(&r[i + 1..]);
                Some(&r[..i])
            }
            None => {
                rest = None;
                Some(r)
            }
        }
    })
}

/// Whether a head line can name a header [`Tracker::on_head`] looks at (`Content-Length`,
/// `Transfer-Encoding`, `Connection`, `Upgrade`), by its first byte: a line that starts with
/// anything else is skipped without looking for its colon. Whitespace is kept too (`trim`
/// drops it before the name is compared).
fn may_frame(line: &[u8]) -> bool {
    matches!(
        line.first(),
        Some(b'c' | b'C' | b't' | b'T' | b'u' | b'U' | b' ' | b'\t' | b'\r' | b'\n' | 0x0c)
    )
}

fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &v[start..end]
}

fn parse_len(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

fn chunk_size(line: &[u8]) -> Option<u64> {
    let end = line
        .iter()
        .position(|&b| b == b';' || b == b' ' || b == b'\t')
        .unwrap_or(line.len());
    let hex = &line[..end];
    if hex.is_empty() || hex.len() > 15 {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
}

/// The connection's stream with the framing check on its read side, and a lingering close.
pub struct FramingCheck<S> {
    inner: S,
    tracker: Tracker,
    out: Vec<u8>,
    pos: usize,
    /// Our side is shut; what the client still sends is being read and dropped until this
    /// deadline (with the bytes dropped so far).
    linger: Option<(Pin<Box<tokio::time::Sleep>>, usize)>,
}

impl<S> FramingCheck<S> {
    pub fn new(inner: S, max_head: usize) -> Self {
        FramingCheck {
            inner,
            tracker: Tracker::new(max_head),
            out: Vec::new(),
            pos: 0,
            linger: None,
        }
    }

    /// [`FramingCheck::new`] for a connection whose first bytes, `read`, were already read from
    /// it (by the fast path, `edge/fast.rs`): they are checked and handed out first.
    pub fn with_prefix(inner: S, read: &[u8], max_head: usize) -> Self {
        let mut check = FramingCheck::new(inner, max_head);
        check.tracker.feed(read, &mut check.out);
        check
    }

    /// The connection and the bytes read from it that the parser has not taken yet (after an
    /// upgrade, they belong to the new protocol).
    pub fn into_parts(self) -> (S, Vec<u8>) {
        let FramingCheck {
            inner, out, pos, ..
        } = self;
        let rest = out.get(pos..).map(<[u8]>::to_vec).unwrap_or_default();
        (inner, rest)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FramingCheck<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.pos < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.pos);
                buf.put_slice(&this.out[this.pos..this.pos + n]);
                this.pos += n;
                if this.pos == this.out.len() {
                    this.out.clear();
                    this.pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.tracker.blocked() {
                // The refused request is answered with `Connection: close`; nothing after it
                // is read.
                return Poll::Pending;
            }
            if this.tracker.passthrough() {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            // Not zeroed: the reader only writes into it, and only what it filled is read.
            let mut tmp = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK];
            let mut rb = ReadBuf::uninit(&mut tmp);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
            if rb.filled().is_empty() {
                this.tracker.flush(&mut this.out);
                if this.out.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            this.tracker.feed(rb.filled(), &mut this.out);
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for FramingCheck<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    /// Shuts our side, then lingers: what the client still sends (the rest of an upload the
    /// answer refused unread, e.g. a 413) is read and dropped until it closes too, for at most
    /// [`LINGER_TIME`] and [`LINGER_BYTES`]. Closing with unread bytes would make the kernel
    /// reset the connection, and a client still sending would then lose the answer it has not
    /// read yet (nginx's `lingering_close`, for the same reason).
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.linger.is_none() {
            std::task::ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
            this.linger = Some((Box::pin(tokio::time::sleep(LINGER_TIME)), 0));
        }
        let Some((deadline, dropped)) = this.linger.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let mut tmp = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK];
        loop {
            if *dropped >= LINGER_BYTES {
                return Poll::Ready(Ok(()));
            }
            let mut rb = ReadBuf::uninit(&mut tmp);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                // The client closed (or the connection failed): nothing left to protect.
                Poll::Ready(Ok(())) if rb.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => *dropped += rb.filled().len(),
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => {
                    return std::future::Future::poll(deadline.as_mut(), cx).map(|()| Ok(()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_ends_and_lines_match_a_byte_by_byte_scan() {
        fn head_end_ref(buf: &[u8], from: usize) -> Option<usize> {
            (from..buf.len()).find_map(|i| {
                (buf[i] == b'\n')
                    .then(|| match &buf[i + 1..] {
                        [b'\n', ..] => Some(i + 2),
                        [b'\r', b'\n', ..] => Some(i + 3),
                        _ => None,
                    })
                    .flatten()
            })
        }
        // Bytes drawn from the ones that matter, by a fixed generator: bounded and repeatable.
        let alphabet = b"\r\n:aC ";
        let mut x: u32 = 12345;
        for len in 0..40 {
            for _ in 0..200 {
                let buf: Vec<u8> = (0..len)
                    .map(|_| {
                        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                        alphabet[(x >> 16) as usize % alphabet.len()]
                    })
                    .collect();
                for from in 0..=len {
                    assert_eq!(
                        head_end(&buf, from),
                        head_end_ref(&buf, from),
                        "{buf:?} {from}"
                    );
                }
                let split: Vec<&[u8]> = buf.split(|&b| b == b'\n').collect();
                assert_eq!(lines(&buf).collect::<Vec<_>>(), split);
            }
        }
    }

    /// Feeds `input` in pieces of `step` bytes; returns what the parser would see.
    fn run(input: &[u8], step: usize) -> (Vec<u8>, Tracker) {
        let mut t = Tracker::new(64 * 1024);
        let mut out = vec![];
        for piece in input.chunks(step) {
            t.feed(piece, &mut out);
        }
        (out, t)
    }

    fn every_split(input: &[u8], check: impl Fn(&[u8], &Tracker)) {
        for step in [1, 2, 3, 7, 64, input.len().max(1)] {
            let (out, t) = run(input, step);
            check(&out, &t);
        }
    }

    #[test]
    fn good_requests_pass_unchanged_across_keep_alive() {
        let input = b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n\
            POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
            POST /y HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
            5;ext=1\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n\
            GET /z HTTP/1.1\r\nHost: a\r\n\r\n";
        every_split(input, |out, t| {
            assert_eq!(out, input.as_slice());
            assert_eq!(t.mode, Mode::Head);
        });
    }

    #[test]
    fn content_length_with_transfer_encoding_is_marked_and_cut() {
        let input = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n\
            0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
        every_split(input, |out, t| {
            let s = String::from_utf8_lossy(out);
            assert!(t.blocked());
            assert!(s.starts_with("POST / HTTP/1.1\r\nHost: a\r\n"), "{s}");
            assert!(
                s.contains("x-sandboxd-bad-framing: content-length\r\n"),
                "{s}"
            );
            assert!(
                s.contains("x-sandboxd-bad-framing: transfer-encoding\r\n"),
                "{s}"
            );
            assert!(!s.to_ascii_lowercase().contains("content-length:"), "{s}");
            assert!(!s.contains("smuggled"), "{s}");
            assert!(s.ends_with("\r\n\r\n"));
        });
    }

    #[test]
    fn duplicate_or_conflicting_lengths_are_marked() {
        for head in [
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 5, 6\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n",
        ] {
            let (out, t) = run(head.as_bytes(), 5);
            assert!(t.blocked(), "{head}");
            assert!(String::from_utf8_lossy(&out).contains(MARKER), "{head}");
        }
    }

    #[test]
    fn a_bad_second_request_is_found_after_a_body() {
        let input = b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc\
            POST /b HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        every_split(input, |out, t| {
            assert!(t.blocked());
            let s = String::from_utf8_lossy(out);
            assert!(s.starts_with("POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcPOST /b"));
            assert!(s.contains(MARKER));
        });
    }

    #[test]
    fn header_lookalikes_in_bodies_are_not_heads() {
        let body = b"Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut input =
            format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
        input.extend_from_slice(body);
        every_split(&input, |out, t| {
            assert_eq!(out, input.as_slice());
            assert_eq!(t.mode, Mode::Head);
        });
    }

    #[test]
    fn upgrades_and_http2_switch_the_check_off() {
        let (_, t) = run(
            b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            4,
        );
        assert!(t.passthrough());
        let (out, t) = run(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00", 3);
        assert!(t.passthrough());
        assert_eq!(out, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00");
    }

    #[test]
    fn oversized_heads_become_a_marked_stand_in_and_nothing_follows() {
        let stand_in = format!("GET / HTTP/1.1\r\n{MARKER}: {HEAD_TOO_LARGE}\r\n\r\n");
        // Unfinished and past the limit, in pieces.
        let mut t = Tracker::new(100);
        let mut out = vec![];
        t.feed(b"GET / HTTP/1.1\r\nX: ", &mut out);
        t.feed(&[b'a'; 300], &mut out);
        t.feed(b"\r\n\r\nGET /next HTTP/1.1\r\n\r\n", &mut out);
        assert!(t.blocked());
        assert_eq!(String::from_utf8_lossy(&out), stand_in);
        // Whole, in one read, past the limit; a good request before it passes unchanged.
        let good = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n";
        let mut input = good.to_vec();
        input.extend_from_slice(
            format!("GET /b HTTP/1.1\r\nX: {}\r\n\r\n", "b".repeat(120)).as_bytes(),
        );
        let mut t = Tracker::new(100);
        let mut out = vec![];
        t.feed(&input, &mut out);
        assert!(t.blocked());
        assert_eq!(out, [good.as_slice(), stand_in.as_bytes()].concat());
        // At the limit exactly: passed on.
        let head = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "c".repeat(100 - 23));
        assert_eq!(head.len(), 100);
        for step in [1, 7, 100] {
            let mut t = Tracker::new(100);
            let mut out = vec![];
            for piece in head.as_bytes().chunks(step) {
                t.feed(piece, &mut out);
            }
            assert_eq!(out, head.as_bytes(), "{step}");
            assert_eq!(t.mode, Mode::Head);
        }
    }
}
