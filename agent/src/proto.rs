//! The wire protocol of docs/agent-protocol.md: the request's head line and JSON head, frames,
//! the response head, and the error type every op returns (a stable code and a message).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const END: u8 = 0;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const DATA: u8 = 3;
pub const EVENT: u8 = 4;
pub const EXIT: u8 = 5;
pub const ERROR: u8 = 9;

/// Largest frame payload, either direction.
pub const MAX_FRAME: usize = 1 << 20;
/// Largest JSON line, either direction.
pub const MAX_LINE: usize = 64 * 1024;
/// The first line of every request.
pub const MAGIC: &[u8] = b"SANDBOXD-AGENT/1\n";
/// Time allowed between reads of a request body before the request fails.
pub const BODY_IDLE: Duration = Duration::from_secs(30);

/// A failed op: one of the protocol's error codes and a message for people.
#[derive(Debug)]
pub struct Fail {
    pub code: &'static str,
    pub message: String,
}

impl Fail {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Fail {
            code,
            message: message.into(),
        }
    }

    /// Maps an I/O error to the protocol's codes; `what` names the operation and the path
    /// (relative to the workspace, never an absolute host path).
    pub fn io(e: &io::Error, what: &str) -> Self {
        let code = match e.raw_os_error() {
            Some(libc::ENOENT) => "not_found",
            Some(libc::ENOTDIR) => "not_a_directory",
            Some(libc::EISDIR) => "is_a_directory",
            Some(libc::EEXIST) => "exists",
            Some(libc::ENOTEMPTY) => "not_empty",
            Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => "permission_denied",
            Some(libc::ENAMETOOLONG) | Some(libc::ELOOP) => "invalid_path",
            _ => "io_error",
        };
        let text = match e.raw_os_error() {
            Some(n) => std::io::Error::from_raw_os_error(n).to_string(),
            None => e.to_string(),
        };
        Fail::new(code, format!("{what}: {text}"))
    }

    pub fn bad(message: impl Into<String>) -> Self {
        Fail::new("bad_request", message)
    }
}

pub type Res<T> = Result<T, Fail>;

/// One accepted connection: a read buffer over the socket (the head and the frames share it)
/// and whether the response head has been sent.
pub struct Conn {
    pub s: TcpStream,
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    pub head_sent: bool,
    /// The request body was read to its END (or the op takes no body).
    pub body_done: bool,
}

impl Conn {
    pub fn new(s: TcpStream) -> Self {
        let _ = s.set_nodelay(true);
        let _ = s.set_write_timeout(Some(Duration::from_secs(30)));
        Conn {
            s,
            buf: vec![0; 64 * 1024],
            pos: 0,
            end: 0,
            head_sent: false,
            body_done: true,
        }
    }

    fn fill(&mut self) -> io::Result<usize> {
        if self.pos == self.end {
            self.pos = 0;
            self.end = 0;
        }
        let n = self.s.read(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n)
    }

    /// Reads one `\n`-terminated line of at most `max` bytes (newline included) before
    /// `deadline`.
    pub fn read_line(&mut self, max: usize, deadline: Instant) -> Res<Vec<u8>> {
        let mut line = Vec::new();
        loop {
            if let Some(i) = self.buf[self.pos..self.end]
                .iter()
                .position(|&b| b == b'\n')
            {
                if line.len() + i + 1 > max {
                    return Err(Fail::bad("request line too long"));
                }
                line.extend_from_slice(&self.buf[self.pos..self.pos + i + 1]);
                self.pos += i + 1;
                return Ok(line);
            }
            line.extend_from_slice(&self.buf[self.pos..self.end]);
            self.pos = self.end;
            if line.len() > max {
                return Err(Fail::bad("request line too long"));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Fail::bad("timed out reading the request head"));
            }
            let _ = self.s.set_read_timeout(Some(left));
            match self.fill() {
                Ok(0) => return Err(Fail::bad("connection closed in the request head")),
                Ok(_) => {}
                Err(e) if is_timeout(&e) => {
                    return Err(Fail::bad("timed out reading the request head"))
                }
                Err(e) => return Err(Fail::io(&e, "reading the request head")),
            }
        }
    }

    pub fn read_exact(&mut self, out: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < out.len() {
            if self.pos == self.end && self.fill()? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let n = (self.end - self.pos).min(out.len() - done);
            out[done..done + n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
            self.pos += n;
            done += n;
        }
        Ok(())
    }

    /// Reads one body frame: `Ok(Some(bytes))` for DATA, `Ok(None)` for END (and marks the
    /// body done); any other kind is a bad request.
    pub fn read_body_frame(&mut self) -> Res<Option<Vec<u8>>> {
        let _ = self.s.set_read_timeout(Some(BODY_IDLE));
        let mut h = [0u8; 5];
        self.read_exact(&mut h).map_err(|e| body_err(&e))?;
        let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
        if len > MAX_FRAME {
            return Err(Fail::bad("body frame over 1 MiB"));
        }
        match h[0] {
            DATA => {
                let mut v = vec![0; len];
                self.read_exact(&mut v).map_err(|e| body_err(&e))?;
                Ok(Some(v))
            }
            END if len == 0 => {
                self.body_done = true;
                Ok(None)
            }
            k => Err(Fail::bad(format!(
                "unexpected frame kind {k} in the request body"
            ))),
        }
    }

    /// Reads the whole body, at most `max` bytes (`too_large` beyond).
    pub fn read_body(&mut self, max: usize) -> Res<Vec<u8>> {
        let mut all = Vec::new();
        while let Some(chunk) = self.read_body_frame()? {
            if all.len() + chunk.len() > max {
                return Err(Fail::new(
                    "too_large",
                    format!("the body is over {max} bytes"),
                ));
            }
            all.extend_from_slice(&chunk);
        }
        Ok(all)
    }

    pub fn head(&mut self, mut v: Value) -> io::Result<()> {
        if let Value::Object(m) = &mut v {
            m.insert("ok".into(), Value::Bool(true));
        }
        self.send_head(&v)
    }

    pub fn send_head(&mut self, v: &Value) -> io::Result<()> {
        let mut line = serde_json::to_vec(v).unwrap_or_default();
        line.push(b'\n');
        self.head_sent = true;
        self.s.write_all(&line)
    }

    pub fn fail_head(&mut self, f: &Fail) -> io::Result<()> {
        self.send_head(&json!({"ok": false, "code": f.code, "message": f.message}))
    }

    pub fn frame(&mut self, kind: u8, data: &[u8]) -> io::Result<()> {
        for chunk in data
            .chunks(MAX_FRAME)
            .chain(data.is_empty().then_some(&[][..]))
        {
            let mut v = Vec::with_capacity(5 + chunk.len());
            v.push(kind);
            v.extend_from_slice(&(chunk.len() as u32).to_be_bytes());
            v.extend_from_slice(chunk);
            self.s.write_all(&v)?;
        }
        Ok(())
    }

    /// A JSON frame (EVENT, EXIT, ERROR), optionally followed by END in the same write.
    pub fn json_frame(&mut self, kind: u8, v: &Value, then_end: bool) -> io::Result<()> {
        let body = serde_json::to_vec(v).unwrap_or_default();
        let mut out = Vec::with_capacity(body.len() + 10);
        out.push(kind);
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        if then_end {
            out.extend_from_slice(&[END, 0, 0, 0, 0]);
        }
        self.s.write_all(&out)
    }

    pub fn end(&mut self) -> io::Result<()> {
        self.s.write_all(&[END, 0, 0, 0, 0])
    }

    /// Reports a failure: as the head when none was sent yet, else as an ERROR frame.
    pub fn report(&mut self, f: &Fail) {
        let _ = if self.head_sent {
            self.json_frame(ERROR, &json!({"code": f.code, "message": f.message}), false)
        } else {
            self.fail_head(f)
        };
    }

    /// After a refused request whose body was not read: stop writing, then read and drop
    /// what the client still sends (bounded in time and size), so closing does not reset the
    /// connection before the client has read the head.
    pub fn linger(&mut self) {
        let _ = self.s.flush();
        let _ = self.s.shutdown(Shutdown::Write);
        let until = Instant::now() + Duration::from_secs(2);
        let mut total = 0usize;
        let mut sink = [0u8; 16384];
        while total < (256 << 20) {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let _ = self.s.set_read_timeout(Some(left));
            match self.s.read(&mut sink) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    }

    /// True when the peer has closed its side (checked without blocking).
    pub fn peer_closed(&self) -> bool {
        let mut b = [0u8; 1];
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.s);
        // SAFETY: a 1-byte buffer we own; MSG_PEEK leaves the data in the socket.
        let n = unsafe {
            libc::recv(
                fd,
                b.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if n == 0 {
            return true;
        }
        if n < 0 {
            let e = io::Error::last_os_error().raw_os_error();
            return !matches!(e, Some(libc::EAGAIN) | Some(libc::EINTR));
        }
        false
    }
}

pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn body_err(e: &io::Error) -> Fail {
    if is_timeout(e) {
        Fail::bad("timed out reading the request body")
    } else {
        Fail::bad(format!("reading the request body: {e}"))
    }
}

/// Compares two byte strings in time that depends only on `expected`'s length.
pub fn ct_eq(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = u8::from(given.len() != expected.len());
    for (i, e) in expected.iter().enumerate() {
        diff |= given.get(i).copied().unwrap_or(0) ^ e;
    }
    diff == 0
}

/// `n` random bytes from /dev/urandom as lowercase hex.
pub fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok();
    if !ok {
        // SAFETY: getrandom into our own buffer.
        let got = unsafe { libc::getrandom(b.as_mut_ptr().cast(), n, 0) };
        assert!(got == n as isize, "no randomness available");
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

// ---- head fields ----------------------------------------------------------------------------

pub fn str_field<'a>(h: &'a Value, name: &str) -> Res<&'a str> {
    match h.get(name) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(Fail::bad(format!("\"{name}\" must be a string"))),
        None => Err(Fail::bad(format!("\"{name}\" is required"))),
    }
}

pub fn opt_bool(h: &Value, name: &str, default: bool) -> Res<bool> {
    match h.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(Fail::bad(format!("\"{name}\" must be a boolean"))),
    }
}

pub fn opt_u64(h: &Value, name: &str) -> Res<Option<u64>> {
    match h.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| Fail::bad(format!("\"{name}\" must be a non-negative integer"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_compare() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abd", b"abc"));
        assert!(!ct_eq(b"ab", b"abc"));
        assert!(!ct_eq(b"abcd", b"abc"));
        assert!(!ct_eq(b"", b"abc"));
    }

    #[test]
    fn random_hex_is_hex() {
        let h = random_hex(16);
        assert_eq!(h.len(), 32);
        assert!(h.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(h, random_hex(16));
    }
}
