//! The HTTP/1.1 wire format of the pool's upstream exchanges, without I/O: the request head
//! written to the app, the response head read from it (`httparse`) and the response body's
//! framing (Content-Length, chunked, or up to the close). The app is untrusted code: every
//! length is bounded and anything ambiguous (two framings, differing lengths, a transfer coding
//! other than chunked, obs-fold, a bad chunk size) is an error, after which the connection is
//! never reused. The answer's hop-by-hop headers (and those its `Connection` names) are read
//! for the framing and dropped here, before any `HeaderName` is made for them.

use std::io;

use bytes::{Buf, Bytes, BytesMut};
use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_LENGTH};
use hyper::http::request::Parts;
use hyper::{Method, Response, StatusCode, Version};

/// The largest response head (status line and headers, interim 1xx heads included). hyper's
/// client allowed up to its read buffer's limit (~400 KiB); 64 KiB is far above what apps send.
pub(super) const MAX_HEAD: usize = 64 * 1024;
/// The most headers a response head may carry: hyper's default (100).
const MAX_HEADERS: usize = 100;
/// The longest chunk-size line (size and extensions).
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// The most bytes of trailers after the last chunk (dropped, not forwarded).
const MAX_TRAILERS: usize = 16 * 1024;

pub(super) fn invalid(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// How the request body is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ReqFraming {
    /// No body at all.
    Empty,
    /// Exactly this many bytes (the client's `Content-Length`, or the body's exact size).
    Length(u64),
    Chunked,
}

/// The `X-Forwarded-*` headers of a proxied request, written with its head instead of being
/// inserted into its header map (three hashed inserts, and the map's growth, cost more than
/// encoding the rest of a small head). The request's own `X-Forwarded-Proto` and `-Host` are
/// replaced; its first `X-Forwarded-For` is kept as the start of the chain when it is short.
pub(in crate::preview) struct Forwarded<'a> {
    /// The client's address as text.
    pub peer: &'a [u8],
    pub https: bool,
    /// The host the client asked for (a header value: visible ASCII, spaces, obs-text).
    pub host: Option<&'a [u8]>,
}

/// A client `X-Forwarded-For` chain this long or longer is not kept (the peer alone is sent):
/// the pooled path here and the tunnel's (forward.rs) alike.
pub(in crate::preview) const MAX_CHAIN: usize = 1024;

impl Forwarded<'_> {
    /// Writes the three headers: `X-Forwarded-For` continues `chain` (the client's first
    /// `X-Forwarded-For`) when it is shorter than [`MAX_CHAIN`].
    fn encode(&self, chain: Option<&[u8]>, out: &mut Vec<u8>) {
        out.extend_from_slice(b"x-forwarded-for: ");
        if let Some(prev) = chain.filter(|v| v.len() < MAX_CHAIN) {
            out.extend_from_slice(prev);
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(self.peer);
        out.extend_from_slice(if self.https {
            b"\r\nx-forwarded-proto: https\r\n"
        } else {
            b"\r\nx-forwarded-proto: http\r\n"
        });
        if let Some(h) = self.host {
            out.extend_from_slice(b"x-forwarded-host: ");
            out.extend_from_slice(h);
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// [`encode_head`] for a request of the edge's fast path (`edge/fast.rs`): a bodyless GET or
/// HEAD whose head the edge parsed and checked (no framing or hop-by-hop header but
/// `Connection: keep-alive`, which is dropped). The client's headers go out as they came, but
/// its `X-Forwarded-*` (the first `-For` continues the chain, as above) and `X-Request-Id`,
/// which `request_id` replaces.
pub(in crate::preview) fn encode_fast_head(
    method: &str,
    target: &str,
    headers: &[httparse::Header<'_>],
    fwd: &Forwarded<'_>,
    request_id: &[u8],
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut chain: Option<&[u8]> = None;
    for h in headers {
        let name = h.name.as_bytes();
        if name.len() > 12 && name[..12].eq_ignore_ascii_case(b"x-forwarded-") {
            let rest = &name[12..];
            if rest.eq_ignore_ascii_case(b"for") {
                chain.get_or_insert(h.value);
                continue;
            }
            if rest.eq_ignore_ascii_case(b"proto") || rest.eq_ignore_ascii_case(b"host") {
                continue;
            }
        }
        if name.eq_ignore_ascii_case(b"x-request-id") || name.eq_ignore_ascii_case(b"connection") {
            continue;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    fwd.encode(chain, out);
    out.extend_from_slice(b"x-request-id: ");
    out.extend_from_slice(request_id);
    out.extend_from_slice(b"\r\n\r\n");
}

/// Which `X-Forwarded-*` header `name` is: 0 `-For`, 1 `-Proto`, 2 `-Host`.
fn forwarded_index(name: &HeaderName) -> Option<u8> {
    match name.as_str().strip_prefix("x-forwarded-")? {
        "for" => Some(0),
        "proto" => Some(1),
        "host" => Some(2),
        _ => None,
    }
}

/// Writes the request head `req` (origin-form target, its headers as they are, `fwd`'s
/// headers, plus the framing header the body needs) into `out`. `body_empty`: the body is
/// known to have no data.
pub(super) fn encode_head(
    req: &Parts,
    fwd: Option<&Forwarded<'_>>,
    body_empty: bool,
    exact_len: Option<u64>,
    out: &mut Vec<u8>,
) -> io::Result<ReqFraming> {
    let target = req
        .uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/");
    out.extend_from_slice(req.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut has_length = None;
    let mut chain: Option<&HeaderValue> = None;
    for (name, value) in &req.headers {
        if fwd.is_some() {
            match forwarded_index(name) {
                Some(0) => {
                    chain.get_or_insert(value);
                    continue;
                }
                Some(_) => continue,
                None => {}
            }
        }
        if *name == CONTENT_LENGTH {
            let len = value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| invalid("bad request content-length"))?;
            if has_length.is_some_and(|l| l != len) {
                return Err(invalid("differing request content-lengths"));
            }
            has_length = Some(len);
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(f) = fwd {
        f.encode(chain.map(HeaderValue::as_bytes), out);
    }
    let framing = match has_length {
        Some(n) => ReqFraming::Length(n),
        None if body_empty => {
            // A request that usually has a body says it has none.
            if matches!(req.method, Method::POST | Method::PUT | Method::PATCH) {
                out.extend_from_slice(b"content-length: 0\r\n");
            }
            ReqFraming::Empty
        }
        None => match exact_len {
            Some(n) => {
                out.extend_from_slice(b"content-length: ");
                out.extend_from_slice(n.to_string().as_bytes());
                out.extend_from_slice(b"\r\n");
                ReqFraming::Length(n)
            }
            None => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                ReqFraming::Chunked
            }
        },
    };
    out.extend_from_slice(b"\r\n");
    Ok(framing)
}

/// A response head read off the connection.
pub(super) struct Head {
    /// The status, version and (unless `lines`) headers.
    pub(super) response: Response<()>,
    /// With [`HeadAs::Lines`]: the headers as lines (`response`'s map stays empty).
    pub(super) lines: Option<Lines>,
    pub(super) framing: Decoder,
    /// The app lets the connection stay open after this response.
    pub(super) keep_alive: bool,
}

/// How [`parse_head`] gives the headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum HeadAs {
    /// In the response's `HeaderMap` (hyper's path).
    Map,
    /// As the wire's lines, copied once (the edge's fast path writes them as they are).
    Lines,
}

/// The headers of a response head as the client gets them from a proxy: the app's lines
/// (`name: value\r\n`, its own spelling) without the hop-by-hop ones, those its `Connection`
/// names, `Content-Length` (given as `length`) and `X-Request-Id` (the edge writes its own).
pub(in crate::preview) struct Lines {
    pub(in crate::preview) bytes: Bytes,
    /// The app's `Content-Length` (on a HEAD's, 204's or 304's answer too).
    pub(in crate::preview) length: Option<u64>,
    /// A `Date` is among the lines.
    pub(in crate::preview) has_date: bool,
}

pub(super) enum Parsed {
    /// More bytes are needed.
    Partial,
    /// An interim 1xx response of this many bytes, to skip.
    Interim(usize),
    Done(Head),
}

/// Parses the response head at the start of `buf`; when complete, its bytes are taken out of
/// `buf` (header values share them, no copy). `head_req`: the request was a HEAD. httparse has
/// checked every name (a token) and value (no control byte but tab) as `HeaderName` and
/// `HeaderValue` would, so [`HeadAs::Lines`] passes the same heads as [`HeadAs::Map`].
pub(super) fn parse_head(buf: &mut BytesMut, head_req: bool, out: HeadAs) -> io::Result<Parsed> {
    // Offsets of each header's name and value in `buf`, taken while httparse borrows it.
    let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
    let (len, status, version, reason, count) = {
        // Left uninitialized: httparse writes those it parses (filling 100 cost more than the
        // parse of a small head).
        let mut headers = [std::mem::MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut resp,
            buf,
            &mut headers,
        );
        let len = match parsed {
            Ok(httparse::Status::Complete(n)) if n <= MAX_HEAD => n,
            Ok(httparse::Status::Complete(_)) => return Err(invalid("response head too large")),
            Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
                return Err(invalid("response head too large"))
            }
            Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(invalid("too many response headers"))
            }
            Err(_) => return Err(invalid("invalid response head")),
        };
        let code = resp.code.unwrap_or(0);
        let status = StatusCode::from_u16(code).map_err(|_| invalid("invalid status code"))?;
        if status.is_informational() {
            if status == StatusCode::SWITCHING_PROTOCOLS {
                // No upgrade is ever asked for on a pooled connection (tunnel.rs has its own).
                return Err(invalid("unrequested 101 response"));
            }
            return Ok(Parsed::Interim(len));
        }
        let version = match resp.version {
            Some(1) => Version::HTTP_11,
            Some(0) => Version::HTTP_10,
            _ => return Err(invalid("not an HTTP/1.x response")),
        };
        let base = buf.as_ptr() as usize;
        let span = |s: &[u8]| ((s.as_ptr() as usize - base) as u32, s.len() as u32);
        let reason = resp
            .reason
            .filter(|r| Some(*r) != status.canonical_reason())
            .map(|r| span(r.as_bytes()));
        let count = resp.headers.len();
        for (h, slot) in resp.headers.iter().zip(spans.iter_mut()) {
            let (n, nl) = span(h.name.as_bytes());
            let (v, vl) = span(h.value);
            *slot = (n, nl, v, vl);
        }
        (len, status, version, reason, count)
    };
    let head = buf.split_to(len).freeze();
    let at = |off: u32, len: u32| head.slice(off as usize..(off + len) as usize);

    let mut headers = match out {
        HeadAs::Map => HeaderMap::with_capacity(count),
        HeadAs::Lines => HeaderMap::new(),
    };
    let mut length: Option<u64> = None;
    let mut te = false;
    let mut chunked = false;
    let mut close = false;
    let mut keep_alive = false;
    // Other headers the app's `Connection` names: hop-by-hop too (rare).
    let mut listed: Vec<&[u8]> = Vec::new();
    // With `HeadAs::Lines`, the headers that may pass (bit i: the i-th), as this loop finds them.
    let mut pass: u128 = 0;
    const _: () = assert!(MAX_HEADERS <= 128);
    for (i, &(n, nl, v, vl)) in spans[..count].iter().enumerate() {
        let raw = &head[n as usize..(n + nl) as usize];
        let raw_value = &head[v as usize..(v + vl) as usize];
        // Hop-by-hop headers are read here and never reach the response (forward.rs would
        // strip them): no name or value is made for them.
        match hop(raw) {
            Some(Hop::TransferEncoding) => {
                te = true;
                for coding in raw_value.split(|&b| b == b',').map(trim) {
                    if coding.is_empty() {
                        continue;
                    }
                    // Only `chunked`, once: another coding (before or after it) is not decoded.
                    if chunked || !coding.eq_ignore_ascii_case(b"chunked") {
                        return Err(invalid("unsupported transfer-encoding"));
                    }
                    chunked = true;
                }
                continue;
            }
            Some(Hop::Connection) => {
                for token in raw_value.split(|&b| b == b',').map(trim) {
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                        // A header of that name is listed too (RFC 9110 §7.6.1).
                        listed.push(token);
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        keep_alive = true;
                    } else if hop(token).is_none() && !token.is_empty() {
                        listed.push(token);
                    }
                }
                continue;
            }
            Some(Hop::Other) => continue,
            None => {}
        }
        if is_content_length(raw) {
            for part in raw_value.split(|&b| b == b',') {
                let l = parse_length(trim(part)).ok_or_else(|| invalid("bad content-length"))?;
                if length.is_some_and(|x| x != l) {
                    return Err(invalid("differing content-lengths"));
                }
                length = Some(l);
            }
        } else if out == HeadAs::Lines && !raw.eq_ignore_ascii_case(b"x-request-id") {
            pass |= 1 << i;
        }
        if out == HeadAs::Map {
            let name = HeaderName::from_bytes(raw).map_err(|_| invalid("invalid header name"))?;
            let value = HeaderValue::from_maybe_shared(at(v, vl))
                .map_err(|_| invalid("invalid header value"))?;
            headers.append(name, value);
        }
    }
    if out == HeadAs::Map {
        for token in &listed {
            // Content-Length framed the body: it stays.
            match HeaderName::from_bytes(token) {
                Ok(name) if name != CONTENT_LENGTH => drop(headers.remove(name)),
                _ => {}
            }
        }
    }
    if te && (!chunked || length.is_some() || version == Version::HTTP_10) {
        return Err(invalid("ambiguous response framing"));
    }
    let lines = (out == HeadAs::Lines).then(|| {
        let mut bytes = BytesMut::with_capacity(head.len());
        let mut has_date = false;
        for (i, &(n, nl, v, vl)) in spans[..count].iter().enumerate() {
            let name = &head[n as usize..(n + nl) as usize];
            let keep = pass & (1 << i) != 0
                && (listed.is_empty() || !listed.iter().any(|t| t.eq_ignore_ascii_case(name)));
            if keep {
                has_date |= name.eq_ignore_ascii_case(b"date");
                bytes.extend_from_slice(name);
                bytes.extend_from_slice(b": ");
                bytes.extend_from_slice(&head[v as usize..(v + vl) as usize]);
                bytes.extend_from_slice(b"\r\n");
            }
        }
        Lines {
            bytes: bytes.freeze(),
            length,
            has_date,
        }
    });
    let bodyless =
        head_req || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let framing = match (bodyless, chunked, length) {
        (true, _, _) | (false, false, Some(0)) => Decoder::Done,
        (false, true, _) => Decoder::Chunked(Chunk::Size),
        (false, false, Some(n)) => Decoder::Length(n),
        (false, false, None) => Decoder::Close,
    };
    let keep_alive =
        !close && (version == Version::HTTP_11 || keep_alive) && !matches!(framing, Decoder::Close);

    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.version_mut() = version;
    *response.headers_mut() = headers;
    if let Some((off, len)) = reason.filter(|_| out == HeadAs::Map) {
        if let Ok(r) = hyper::ext::ReasonPhrase::try_from(at(off, len)) {
            response.extensions_mut().insert(r);
        }
    }
    Ok(Parsed::Done(Head {
        response,
        lines,
        framing,
        keep_alive,
    }))
}

fn is_content_length(name: &[u8]) -> bool {
    name.len() == 14 && name.eq_ignore_ascii_case(b"content-length")
}

enum Hop {
    Connection,
    TransferEncoding,
    Other,
}

/// Whether a header name is hop-by-hop (RFC 9110 §7.6.1, plus the unofficial `Keep-Alive` and
/// `Proxy-Connection`: forward.rs's list), and which.
fn hop(name: &[u8]) -> Option<Hop> {
    let is = |s: &[u8]| name.eq_ignore_ascii_case(s);
    match name.len() {
        10 if is(b"connection") => Some(Hop::Connection),
        17 if is(b"transfer-encoding") => Some(Hop::TransferEncoding),
        2 if is(b"te") => Some(Hop::Other),
        7 if is(b"trailer") || is(b"upgrade") => Some(Hop::Other),
        10 if is(b"keep-alive") => Some(Hop::Other),
        16 if is(b"proxy-connection") => Some(Hop::Other),
        18 if is(b"proxy-authenticate") => Some(Hop::Other),
        19 if is(b"proxy-authorization") => Some(Hop::Other),
        _ => None,
    }
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Decimal digits only, no sign, no overflow.
fn parse_length(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 {
        return None;
    }
    let mut n: u64 = 0;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n * 10 + u64::from(b - b'0');
    }
    Some(n)
}

/// Where the response body's decoding stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Decoder {
    /// This many bytes are still to come.
    Length(u64),
    Chunked(Chunk),
    /// Everything up to the app's close.
    Close,
    /// The body has ended.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Chunk {
    /// A chunk-size line is next.
    Size,
    /// This many bytes of the chunk are still to come.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Trailer lines (dropped) after the last chunk; the bytes read of them so far.
    Trailers(usize),
}

impl Decoder {
    pub(super) fn is_done(&self) -> bool {
        *self == Decoder::Done
    }

    /// The body's length when it is known.
    pub(super) fn remaining(&self) -> Option<u64> {
        match self {
            Decoder::Length(n) => Some(*n),
            Decoder::Done => Some(0),
            _ => None,
        }
    }

    /// Takes the next body bytes out of `buf`: `None` when more input is needed first (or the
    /// body has ended: see [`is_done`](Self::is_done)). Consumes framing bytes as it goes.
    pub(super) fn decode(&mut self, buf: &mut BytesMut) -> io::Result<Option<Bytes>> {
        loop {
            match self {
                Decoder::Done => return Ok(None),
                Decoder::Close => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    return Ok(Some(buf.split().freeze()));
                }
                Decoder::Length(n) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let take = (*n).min(buf.len() as u64) as usize;
                    *n -= take as u64;
                    if *n == 0 {
                        *self = Decoder::Done;
                    }
                    return Ok(Some(buf.split_to(take).freeze()));
                }
                Decoder::Chunked(Chunk::Data(n)) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let take = (*n).min(buf.len() as u64) as usize;
                    *n -= take as u64;
                    if *n == 0 {
                        *self = Decoder::Chunked(Chunk::DataEnd);
                    }
                    return Ok(Some(buf.split_to(take).freeze()));
                }
                Decoder::Chunked(Chunk::DataEnd) => {
                    if buf.len() < 2 {
                        return Ok(None);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(invalid("missing CRLF after chunk"));
                    }
                    buf.advance(2);
                    *self = Decoder::Chunked(Chunk::Size);
                }
                Decoder::Chunked(Chunk::Size) => {
                    let Some(line) = take_line(buf, MAX_CHUNK_LINE)? else {
                        return Ok(None);
                    };
                    let size = parse_chunk_size(&line)?;
                    *self = Decoder::Chunked(if size == 0 {
                        Chunk::Trailers(0)
                    } else {
                        Chunk::Data(size)
                    });
                }
                Decoder::Chunked(Chunk::Trailers(seen)) => {
                    let Some(line) = take_line(buf, MAX_TRAILERS - *seen)? else {
                        return Ok(None);
                    };
                    if line.is_empty() {
                        *self = Decoder::Done;
                    } else {
                        *seen += line.len() + 2;
                    }
                }
            }
        }
    }

    /// The app closed the connection: the end of a close-delimited body, else an error.
    pub(super) fn eof(&mut self) -> io::Result<()> {
        match self {
            Decoder::Close | Decoder::Done => {
                *self = Decoder::Done;
                Ok(())
            }
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the app closed the connection mid-body",
            )),
        }
    }
}

/// Takes a CRLF-terminated line (without its CRLF) out of `buf`; `None` when it is not all
/// there yet. A line longer than `max` (CRLF included), or ending in a bare LF, is an error.
fn take_line(buf: &mut BytesMut, max: usize) -> io::Result<Option<BytesMut>> {
    let window = &buf[..buf.len().min(max)];
    match window.iter().position(|&b| b == b'\n') {
        Some(lf) => {
            if lf == 0 || buf[lf - 1] != b'\r' {
                return Err(invalid("bare LF in chunked framing"));
            }
            let mut line = buf.split_to(lf + 1);
            line.truncate(lf - 1);
            Ok(Some(line))
        }
        None if buf.len() >= max => Err(invalid("chunked framing line too long")),
        None => Ok(None),
    }
}

/// `1*HEXDIG [ BWS ";" ext ]`, at most 16 digits (no overflow).
fn parse_chunk_size(line: &[u8]) -> io::Result<u64> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err(invalid("bad chunk size"));
    }
    let mut n: u64 = 0;
    for &b in &line[..digits] {
        let d = (b as char).to_digit(16).unwrap_or(0);
        n = (n << 4) | u64::from(d);
    }
    let rest = trim(&line[digits..]);
    let ext_ok = rest.is_empty()
        || (rest[0] == b';' && rest.iter().all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f)));
    if !ext_ok {
        return Err(invalid("bad chunk size"));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::Request;

    fn parse(raw: &str, head_req: bool) -> io::Result<Parsed> {
        parse_head(&mut BytesMut::from(raw.as_bytes()), head_req, HeadAs::Map)
    }

    fn head(raw: &str) -> Head {
        match parse(raw, false) {
            Ok(Parsed::Done(h)) => h,
            Ok(_) => panic!("not complete: {raw:?}"),
            Err(e) => panic!("{e}: {raw:?}"),
        }
    }

    fn rejected(raw: &str) -> bool {
        parse(raw, false).is_err()
    }

    #[test]
    fn heads_give_framing_and_keep_alive() {
        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello");
        assert_eq!(h.framing, Decoder::Length(5));
        assert!(h.keep_alive);
        assert_eq!(h.response.headers()["x-a"], "b");
        assert!(h
            .response
            .extensions()
            .get::<hyper::ext::ReasonPhrase>()
            .is_none());
        let h = head("HTTP/1.1 200 Fine\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(h.framing, Decoder::Chunked(Chunk::Size));
        let reason = h.response.extensions().get::<hyper::ext::ReasonPhrase>();
        assert_eq!(reason.unwrap().as_bytes(), b"Fine");
        let h = head("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(h.framing, Decoder::Close);
        assert!(!h.keep_alive);
        let h = head("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n");
        assert!(!h.keep_alive);
        let h = head("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n");
        assert!(!h.keep_alive);
        let h = head("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n");
        assert!(h.keep_alive);
        for raw in [
            "HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n",
            "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\n",
        ] {
            let h = head(raw);
            let want = if raw.contains("3, 3") {
                Decoder::Length(3)
            } else {
                Decoder::Done
            };
            assert_eq!(h.framing, want, "{raw:?}");
        }
        match parse("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true) {
            Ok(Parsed::Done(h)) => assert_eq!(h.framing, Decoder::Done),
            _ => panic!("a HEAD answer"),
        }
    }

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let h = head(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Gone, Upgrade\r\nKeep-Alive: timeout=5\r\n\
             X-Gone: 1\r\nX-Kept: 2\r\nTransfer-Encoding: chunked\r\nProxy-Authenticate: b\r\n\
             Trailer: t\r\nUpgrade: h2c\r\nTE: x\r\nProxy-Connection: y\r\n\r\n",
        );
        let names: Vec<&str> = h.response.headers().keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
        assert_eq!(h.framing, Decoder::Chunked(Chunk::Size));
        assert!(h.keep_alive);
    }

    #[test]
    fn the_hop_by_hop_list_is_the_forwarders() {
        // The request side (forward.rs) and this parser drop the same fixed names.
        for name in &crate::preview::forward::HOP_HEADERS {
            assert!(hop(name.as_str().as_bytes()).is_some(), "{name}");
            assert!(
                hop(name.as_str().to_ascii_uppercase().as_bytes()).is_some(),
                "{name}"
            );
        }
        let fixed = crate::preview::forward::HOP_HEADERS.len();
        let known = [
            "connection",
            "transfer-encoding",
            "te",
            "trailer",
            "upgrade",
            "keep-alive",
            "proxy-connection",
            "proxy-authenticate",
            "proxy-authorization",
        ];
        assert_eq!(known.len(), fixed);
        // Every name `hop` knows is one of the forwarder's.
        for k in known {
            assert!(hop(k.as_bytes()).is_some(), "{k}");
            assert!(
                crate::preview::forward::HOP_HEADERS.iter().any(|n| n == k),
                "{k}"
            );
        }
        for other in ["close", "content-length", "x-kept", "connectio", "host", ""] {
            assert!(hop(other.as_bytes()).is_none(), "{other}");
        }
        // And a header named by a `close` token goes, as any other listed one; a listed
        // Content-Length stays, it framed the body.
        let h = head(
            "HTTP/1.1 200 OK\r\nClose: x\r\nContent-Length: 2\r\n\
             Connection: close, content-length\r\n\r\n",
        );
        let names: Vec<&str> = h.response.headers().keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["content-length"]);
        assert!(!h.keep_alive);
    }

    /// The head parsed both ways: the map's headers but `Content-Length` and `X-Request-Id`
    /// (name lowercased, value) and the lines' (the same), with the lines' length and date.
    #[allow(clippy::type_complexity)]
    fn both_ways(
        raw: &str,
    ) -> (
        Vec<(String, Vec<u8>)>,
        Vec<(String, Vec<u8>)>,
        Option<u64>,
        bool,
    ) {
        let map = head(raw);
        let Ok(Parsed::Done(lined)) =
            parse_head(&mut BytesMut::from(raw.as_bytes()), false, HeadAs::Lines)
        else {
            panic!("lines: {raw:?}");
        };
        assert_eq!(lined.framing, map.framing, "{raw:?}");
        assert_eq!(lined.keep_alive, map.keep_alive, "{raw:?}");
        assert_eq!(lined.response.status(), map.response.status());
        assert!(lined.response.headers().is_empty());
        let from_map = map
            .response
            .headers()
            .iter()
            .filter(|(n, _)| *n != CONTENT_LENGTH && n.as_str() != "x-request-id")
            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect();
        let lines = lined.lines.expect("lines");
        let text = lines.bytes.to_vec();
        assert!(text.is_empty() || text.ends_with(b"\r\n"), "{raw:?}");
        let from_lines = text
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| {
                let l = l.strip_suffix(b"\r").expect("CRLF");
                let colon = l.iter().position(|&b| b == b':').expect("colon");
                let name = String::from_utf8(l[..colon].to_ascii_lowercase()).unwrap();
                let value = l[colon + 1..].strip_prefix(b" ").expect("space").to_vec();
                (name, value)
            })
            .collect();
        let map_length = map
            .response
            .headers()
            .get(CONTENT_LENGTH)
            .map(|v| trim(v.as_bytes().split(|&b| b == b',').next().unwrap()).to_vec())
            .map(|v| String::from_utf8(v).unwrap().parse().unwrap());
        assert_eq!(lines.length, map_length, "{raw:?}");
        (from_map, from_lines, lines.length, lines.has_date)
    }

    #[test]
    fn lines_say_what_the_map_says() {
        for raw in [
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nDate: Thu, 03 Dec 2026 10:00:00 GMT\r\n\
             Connection: keep-alive\r\nKeep-Alive: timeout=5\r\nContent-Length: 5\r\n\r\n",
            "HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Gone, Upgrade\r\nKeep-Alive: timeout=5\r\n\
             X-Gone: 1\r\nX-Kept: 2\r\nTransfer-Encoding: chunked\r\nProxy-Authenticate: b\r\n\
             Trailer: t\r\nUpgrade: h2c\r\nTE: x\r\nProxy-Connection: y\r\n\r\n",
            "HTTP/1.1 200 OK\r\nClose: x\r\nContent-Length: 2\r\nConnection: close, content-length\r\n\r\n",
            "HTTP/1.1 404 Not Found\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\nX-Request-Id: app\r\n\
             X-Odd:  spaced\t \r\nX-Obs: café\r\nX-Empty:\r\nContent-Length: 3, 3\r\n\r\n",
            "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n",
            "HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\nContent-Length: 9\r\n\r\n",
            "HTTP/1.1 200 OK\r\n\r\n",
        ] {
            let (from_map, from_lines, _, _) = both_ways(raw);
            assert_eq!(from_map, from_lines, "{raw:?}");
        }
        let (_, _, length, has_date) = both_ways(
            "HTTP/1.1 200 OK\r\nDATE: Thu, 03 Dec 2026 10:00:00 GMT\r\nContent-Length: 4\r\n\r\n",
        );
        assert_eq!((length, has_date), (Some(4), true));
        let (_, _, length, has_date) = both_ways("HTTP/1.1 200 OK\r\nX-Date: no\r\n\r\n");
        assert_eq!((length, has_date), (None, false));
        // What one way refuses, the other does too.
        for raw in [
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 3, 4\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX-A: b\r\n c\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX-A: b\x7f\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX A: b\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX-A: \x01\r\n\r\n",
        ] {
            assert!(rejected(raw), "{raw:?}");
            assert!(
                parse_head(&mut BytesMut::from(raw.as_bytes()), false, HeadAs::Lines).is_err(),
                "{raw:?}"
            );
        }
    }

    #[test]
    fn interim_and_partial_heads() {
        assert!(matches!(
            parse("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200", false),
            Ok(Parsed::Interim(25))
        ));
        assert!(matches!(
            parse("HTTP/1.1 200 OK\r\nContent-Le", false),
            Ok(Parsed::Partial)
        ));
        assert!(rejected("HTTP/1.1 101 Switching Protocols\r\n\r\n"));
    }

    #[test]
    fn ambiguous_or_bad_heads_are_rejected() {
        for raw in [
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 3, 4\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -3\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: +3\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\n",
            "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX-A: b\r\n c\r\n\r\n",
            "HTTP/2.0 200 OK\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTP/1.1 099 OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
            "SSH-2.0-OpenSSH\r\n\r\n",
        ] {
            assert!(rejected(raw), "{raw:?}");
        }
        let many: String = (0..101).map(|i| format!("x-{i}: v\r\n")).collect();
        assert!(rejected(&format!("HTTP/1.1 200 OK\r\n{many}\r\n")));
        let big = format!("HTTP/1.1 200 OK\r\nx: {}\r\n", "a".repeat(MAX_HEAD));
        assert!(rejected(&big), "an oversized partial head");
    }

    /// Feeds `wire` to a chunked decoder `step` bytes at a time; the body, or the error.
    fn dechunk(wire: &[u8], step: usize) -> io::Result<Vec<u8>> {
        let mut d = Decoder::Chunked(Chunk::Size);
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        for piece in wire.chunks(step) {
            buf.extend_from_slice(piece);
            while let Some(b) = d.decode(&mut buf)? {
                body.extend_from_slice(&b);
            }
        }
        if !d.is_done() {
            return Err(invalid("unfinished"));
        }
        assert!(buf.is_empty(), "nothing left over");
        Ok(body)
    }

    #[test]
    fn chunked_bodies_decode_across_reads() {
        let wire = b"5\r\nhello\r\na;ext=1\r\n, world!!!\r\n0\r\nX-Trailer: t\r\n\r\n";
        for step in [1, 2, 3, 7, wire.len()] {
            assert_eq!(dechunk(wire, step).unwrap(), b"hello, world!!!", "{step}");
        }
        assert_eq!(dechunk(b"0\r\n\r\n", 1).unwrap(), b"");
        assert_eq!(
            dechunk(b"A \r\n0123456789\r\n0\r\n\r\n", 4).unwrap(),
            b"0123456789"
        );
    }

    #[test]
    fn bad_chunked_framing_is_an_error() {
        for wire in [
            &b"x\r\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhelloXX0\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"-5\r\nhello\r\n0\r\n\r\n",
            b"11111111111111111\r\n",
            b"5 x\r\nhello\r\n0\r\n\r\n",
        ] {
            assert!(dechunk(wire, 3).is_err(), "{wire:?}");
        }
        let long_line = format!("5;{}\r\nhello\r\n0\r\n\r\n", "e".repeat(MAX_CHUNK_LINE));
        assert!(dechunk(long_line.as_bytes(), 100).is_err());
        let trailers = format!("0\r\nx: {}\r\n\r\n", "t".repeat(MAX_TRAILERS));
        assert!(dechunk(trailers.as_bytes(), 100).is_err());
    }

    #[test]
    fn length_and_close_bodies() {
        let mut d = Decoder::Length(5);
        let mut buf = BytesMut::from(&b"hel"[..]);
        assert_eq!(d.decode(&mut buf).unwrap().unwrap(), "hel");
        assert_eq!(d.decode(&mut buf).unwrap(), None);
        assert!(d.eof().is_err(), "a short body");
        buf.extend_from_slice(b"loEXTRA");
        assert_eq!(d.decode(&mut buf).unwrap().unwrap(), "lo");
        assert!(d.is_done());
        assert_eq!(&buf[..], b"EXTRA", "bytes past the body stay");
        let mut d = Decoder::Close;
        let mut buf = BytesMut::from(&b"abc"[..]);
        assert_eq!(d.decode(&mut buf).unwrap().unwrap(), "abc");
        d.eof().unwrap();
        assert!(d.is_done());
    }

    #[test]
    fn request_heads_carry_the_forwarded_headers() {
        let host = HeaderValue::from_static("user-1.preview.localhost");
        let fwd = Forwarded {
            peer: b"10.0.0.9",
            https: true,
            host: Some(host.as_bytes()),
        };
        let encode = |headers: &[(&str, &str)]| {
            let mut b = Request::get("/");
            for (k, v) in headers {
                b = b.header(*k, *v);
            }
            let req = b.body(()).unwrap().into_parts().0;
            let mut out = Vec::new();
            encode_head(&req, Some(&fwd), true, Some(0), &mut out).unwrap();
            String::from_utf8(out).unwrap()
        };
        assert_eq!(
            encode(&[("host", "h")]),
            "GET / HTTP/1.1\r\nhost: h\r\nx-forwarded-for: 10.0.0.9\r\n\
             x-forwarded-proto: https\r\nx-forwarded-host: user-1.preview.localhost\r\n\r\n"
        );
        // The client's chain (its first header) is kept; its proto and host are replaced;
        // other x-forwarded- names pass.
        assert_eq!(
            encode(&[
                ("x-forwarded-for", "1.2.3.4"),
                ("x-forwarded-for", "5.6.7.8"),
                ("x-forwarded-proto", "gopher"),
                ("x-forwarded-host", "evil.example"),
                ("x-forwarded-port", "1"),
            ]),
            "GET / HTTP/1.1\r\nx-forwarded-port: 1\r\nx-forwarded-for: 1.2.3.4, 10.0.0.9\r\n\
             x-forwarded-proto: https\r\nx-forwarded-host: user-1.preview.localhost\r\n\r\n"
        );
        // A chain too long to keep: the peer alone.
        let long = "1.1.1.1, ".repeat(120);
        assert!(encode(&[("x-forwarded-for", &long)]).contains("\r\nx-forwarded-for: 10.0.0.9\r\n"));
    }

    #[test]
    fn request_heads_carry_the_framing() {
        let req = Request::get("/a?b=1")
            .header("host", "app")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let mut out = Vec::new();
        assert_eq!(
            encode_head(&req, None, true, Some(0), &mut out).unwrap(),
            ReqFraming::Empty
        );
        assert_eq!(out, b"GET /a?b=1 HTTP/1.1\r\nhost: app\r\n\r\n");
        let req = Request::post("/").body(()).unwrap().into_parts().0;
        let mut out = Vec::new();
        assert_eq!(
            encode_head(&req, None, false, None, &mut out).unwrap(),
            ReqFraming::Chunked
        );
        assert_eq!(
            out,
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        let mut out = Vec::new();
        assert_eq!(
            encode_head(&req, None, false, Some(7), &mut out).unwrap(),
            ReqFraming::Length(7)
        );
        assert_eq!(out, b"POST / HTTP/1.1\r\ncontent-length: 7\r\n\r\n");
        let req = Request::post("/")
            .header("content-length", "3")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let mut out = Vec::new();
        assert_eq!(
            encode_head(&req, None, false, None, &mut out).unwrap(),
            ReqFraming::Length(3)
        );
    }
}
