//! Runs the real agent binary on 127.0.0.1 with a temporary workspace, and a small client of
//! docs/agent-protocol.md.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

pub const END: u8 = 0;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const DATA: u8 = 3;
pub const EVENT: u8 = 4;
pub const EXIT: u8 = 5;
pub const ERROR: u8 = 9;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_sandboxd-agent")
}

pub fn random_key() -> String {
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut b)
        .unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub struct Agent {
    pub child: Child,
    pub addr: String,
    pub key: String,
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn start() -> Agent {
    let dir = tempfile::Builder::new()
        .prefix("sbx-agent-test")
        .tempdir()
        .unwrap();
    let root = dir.path().join("ws");
    std::fs::create_dir(&root).unwrap();
    let root = std::fs::canonicalize(root).unwrap();
    let key = random_key();
    let mut child = Command::new(bin())
        .args(["--listen", "127.0.0.1:0"])
        .env("SANDBOXD_AGENT_KEY", &key)
        .env("SANDBOXD_AGENT_ROOT", &root)
        .env("SANDBOXD_INIT_DONE_FILE", dir.path().join("init.done"))
        .env("SANDBOXD_DEV_PID_FILE", dir.path().join("dev.pid"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .expect("listening line")
        .to_string();
    Agent {
        child,
        addr,
        key,
        dir,
        root,
    }
}

pub struct Reply {
    pub head: Value,
    pub frames: Vec<(u8, Vec<u8>)>,
}

impl Reply {
    pub fn ok(&self) -> bool {
        self.head["ok"] == json!(true)
    }
    pub fn code(&self) -> &str {
        self.head["code"].as_str().unwrap_or("")
    }
    pub fn bytes(&self, kind: u8) -> Vec<u8> {
        self.frames
            .iter()
            .filter(|f| f.0 == kind)
            .flat_map(|f| f.1.clone())
            .collect()
    }
    pub fn text(&self, kind: u8) -> String {
        String::from_utf8_lossy(&self.bytes(kind)).into_owned()
    }
    pub fn exit(&self) -> Value {
        let f = self
            .frames
            .iter()
            .find(|f| f.0 == EXIT)
            .expect("an EXIT frame");
        serde_json::from_slice(&f.1).unwrap()
    }
}

pub fn frame(kind: u8, data: &[u8]) -> Vec<u8> {
    let mut v = vec![kind];
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

pub fn read_frame(r: &mut impl Read) -> Option<(u8, Vec<u8>)> {
    let mut h = [0u8; 5];
    r.read_exact(&mut h).ok()?;
    let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
    let mut v = vec![0; len];
    r.read_exact(&mut v).ok()?;
    Some((h[0], v))
}

impl Agent {
    pub fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s
    }

    /// Sends one request; returns the stream positioned after the head.
    pub fn open(&self, mut head: Value, body: Option<&[u8]>) -> (Value, BufReader<TcpStream>) {
        head["key"] = json!(self.key);
        let mut s = self.connect();
        let mut req = b"SANDBOXD-AGENT/1\n".to_vec();
        req.extend_from_slice(&serde_json::to_vec(&head).unwrap());
        req.push(b'\n');
        if let Some(b) = body {
            for c in b.chunks(1 << 20) {
                req.extend_from_slice(&frame(DATA, c));
            }
            req.extend_from_slice(&frame(END, &[]));
        }
        let _ = s.write_all(&req);
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let head: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad head {line:?}: {e}"));
        (head, r)
    }

    pub fn call(&self, head: Value, body: Option<&[u8]>) -> Reply {
        let (head, mut r) = self.open(head, body);
        let mut frames = Vec::new();
        if head["ok"] == json!(true) {
            while let Some(f) = read_frame(&mut r) {
                let k = f.0;
                frames.push(f);
                if k == END || k == ERROR {
                    break;
                }
            }
        }
        Reply { head, frames }
    }

    pub fn run(&self, language: &str, code: &str, timeout_ms: u64) -> Reply {
        self.call(
            json!({"op": "run", "language": language, "timeoutMs": timeout_ms, "maxOutput": 1 << 20}),
            Some(code.as_bytes()),
        )
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }
}

/// Processes whose environment holds `SANDBOXD_EXEC=<mark>`.
pub fn marked(mark: &str) -> Vec<i32> {
    let needle = format!("SANDBOXD_EXEC={mark}").into_bytes();
    let mut out = Vec::new();
    for d in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = d.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.rsplit(") ").next().is_some_and(|r| r.starts_with('Z')) {
            continue;
        }
        if let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) {
            if env.split(|&b| b == 0).any(|e| e == needle) {
                out.push(pid);
            }
        }
    }
    out
}

pub fn exists(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}
