//! The harness of the swarm lab's tests. The lab (`scripts/swarm-lab.sh up`) writes
//! /run/sbxlab/env: two sandboxd edges (`EDGE_1`, `EDGE_2`), the three node engines (`NODE_1..3`,
//! unix sockets), the token secret and the domains. Tests talk HTTP/WebSocket to the edges only
//! (the API on the lab's `DOMAIN`, previews on `user-<id>.<PREVIEW_DOMAIN>`, both names resolved
//! by the client to the edge's address) and read the nodes through their engines (the docker
//! CLI with `-H`). Nothing here sends a packet anywhere but the lab's own addresses.
//!
//! Every test makes its users with [`Users`], which removes their sandboxes when it drops, also
//! when the test panicked: `POST /sandbox/exit` through an edge, then the containers (by the
//! labels `sandboxd.instance` and `sandboxd.user`) and the workspace volume
//! (`<instance>-ws-<user>`) through every node engine.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use sandboxd::auth::Auth;
use sandboxd::user::UserId;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

pub use reqwest;
pub use serde_json::{json, Value};

/// Where `scripts/swarm-lab.sh up` writes the lab's addresses.
pub const ENV_FILE: &str = "/run/sbxlab/env";

/// A WebSocket to an edge.
pub type Ws = WebSocketStream<TcpStream>;

/// One sandboxd edge of the lab.
#[derive(Clone, Debug)]
pub struct Edge {
    /// As printed by the lab, e.g. `http://10.97.0.11:8080`.
    pub url: String,
    pub addr: SocketAddr,
}

/// The lab, as /run/sbxlab/env describes it.
#[derive(Clone)]
pub struct Lab {
    pub edges: Vec<Edge>,
    /// Engine URLs of the nodes n1, n2, n3 (`unix:///run/sbxlab/nN.sock`), in order.
    pub nodes: Vec<String>,
    pub domain: String,
    pub preview_domain: String,
    pub instance: String,
    pub image: String,
    pub overlay: String,
    pub edge_cidr: String,
    /// Whether `up` started the edges (only when the binary supports `engine = "swarm"`).
    pub edges_running: bool,
    auth: Auth,
}

impl Lab {
    /// Reads /run/sbxlab/env; fails loudly (never skips) when the lab is not there.
    pub fn load() -> Lab {
        let text = std::fs::read_to_string(ENV_FILE).unwrap_or_else(|e| {
            panic!(
                "the swarm lab is not up ({ENV_FILE}: {e}): run scripts/swarm-lab.sh up (as root) first"
            )
        });
        let vars: HashMap<&str, &str> = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim()))
            .collect();
        let var = |k: &str| -> String {
            vars.get(k).map(|v| v.to_string()).unwrap_or_else(|| {
                panic!("{ENV_FILE} has no {k}: run scripts/swarm-lab.sh down && scripts/swarm-lab.sh up")
            })
        };
        let edges = (1..=2)
            .map(|i| {
                let url = var(&format!("EDGE_{i}"));
                let hostport = url
                    .strip_prefix("http://")
                    .unwrap_or_else(|| panic!("EDGE_{i}={url} is not http://ADDR:PORT"));
                let addr = hostport
                    .parse()
                    .unwrap_or_else(|_| panic!("EDGE_{i}={url} is not http://ADDR:PORT"));
                Edge { url, addr }
            })
            .collect();
        let nodes = (1..=3).map(|i| var(&format!("NODE_{i}"))).collect();
        let secret = var("AUTH_SECRET");
        Lab {
            edges,
            nodes,
            domain: var("DOMAIN"),
            preview_domain: var("PREVIEW_DOMAIN"),
            instance: var("INSTANCE"),
            image: vars
                .get("IMAGE")
                .map_or_else(|| "sandboxd-sandbox:latest".to_owned(), |v| v.to_string()),
            overlay: var("OVERLAY"),
            edge_cidr: var("EDGE_CIDR"),
            edges_running: var("EDGES_RUNNING") == "1",
            auth: Auth::new(secret.as_bytes()),
        }
    }

    /// The lab with its edges running; fails loudly when they are not.
    pub fn with_edges() -> Lab {
        let lab = Lab::load();
        assert!(
            lab.edges_running,
            "the lab's sandboxd edges are not running (EDGES_RUNNING=0 in {ENV_FILE}): the sandboxd \
             binary lacks engine = \"swarm\", or the lab was built without edges. Build sandboxd, \
             then run scripts/swarm-lab.sh edges (or down + up; SBXLAB_EDGES=1 forces them and \
             shows the edge's log on failure)"
        );
        lab
    }

    /// A bearer token for `user`, signed with the lab's AUTH_SECRET (src/auth.rs's format).
    pub fn token(&self, user: &str) -> String {
        self.auth
            .issue(
                &UserId::parse(user).expect("a valid user id"),
                Duration::from_secs(3600),
            )
            .unwrap()
    }

    pub fn preview_host(&self, user: &str) -> String {
        format!("user-{user}.{}", self.preview_domain)
    }

    /// The API base URL of edge `e` (0 or 1): the lab's domain on the edge's port.
    pub fn api(&self, e: usize) -> String {
        format!("http://{}:{}", self.domain, self.edges[e].addr.port())
    }

    /// The preview URL of `user` through edge `e`.
    pub fn preview_url(&self, e: usize, user: &str, path: &str) -> String {
        format!(
            "http://{}:{}{path}",
            self.preview_host(user),
            self.edges[e].addr.port()
        )
    }

    /// A client that sends the lab's domain and the preview hosts of `users` to edge `e`.
    pub fn client(&self, e: usize, users: &[&str]) -> reqwest::Client {
        let addr = self.edges[e].addr;
        let mut b = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .resolve(&self.domain, addr);
        for u in users {
            b = b.resolve(&self.preview_host(u), addr);
        }
        b.build().unwrap()
    }

    /// `method path` with `body` as `user` through edge `e`: the status and the JSON body
    /// (`Value::Null` when the body is not JSON).
    pub async fn call(
        &self,
        e: usize,
        user: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self
            .client(e, &[])
            .request(method, format!("{}{path}", self.api(e)))
            .bearer_auth(self.token(user));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req
            .send()
            .await
            .unwrap_or_else(|err| panic!("edge {} {path}: {err}", e + 1));
        let status = r.status().as_u16();
        let bytes = r.bytes().await.unwrap_or_default();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// `method path` with `body` as `user` through edge `e`: the whole response.
    pub async fn raw(
        &self,
        e: usize,
        user: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> reqwest::Result<reqwest::Response> {
        let mut req = self
            .client(e, &[])
            .request(method, format!("{}{path}", self.api(e)))
            .timeout(Duration::from_secs(30))
            .bearer_auth(self.token(user));
        if let Some(b) = body {
            req = req.json(&b);
        }
        req.send().await
    }

    pub async fn post(&self, e: usize, user: &str, path: &str, body: Value) -> (u16, Value) {
        self.call(e, user, reqwest::Method::POST, path, Some(body))
            .await
    }

    pub async fn get(&self, e: usize, user: &str, path: &str) -> (u16, Value) {
        self.call(e, user, reqwest::Method::GET, path, None).await
    }

    /// `POST /sandbox/init` through edge `e`; asserts 200.
    pub async fn init(&self, e: usize, user: &str) -> Value {
        let (s, body) = self.post(e, user, "/sandbox/init", json!({})).await;
        assert_eq!(s, 200, "init {user} through edge {}: {body}", e + 1);
        body
    }

    /// `GET /sandbox/status` through edge `e`; asserts 200.
    pub async fn status(&self, e: usize, user: &str) -> Value {
        let (s, body) = self.get(e, user, "/sandbox/status").await;
        assert_eq!(s, 200, "status {user} through edge {}: {body}", e + 1);
        body
    }

    /// `POST /sandbox/execute` through edge `e`; asserts 200.
    pub async fn execute(&self, e: usize, user: &str, body: Value) -> Value {
        let (s, out) = self.post(e, user, "/sandbox/execute", body).await;
        assert_eq!(s, 200, "execute {user} through edge {}: {out}", e + 1);
        out
    }

    /// Runs JavaScript through edge `e` and returns its output (stdout); asserts exit code 0.
    pub async fn run_js(&self, e: usize, user: &str, code: &str) -> String {
        let out = self.execute(e, user, json!({ "code": code })).await;
        assert_eq!(out["exitCode"], 0, "{out}");
        out["output"].as_str().unwrap_or_default().to_owned()
    }

    /// Opens a WebSocket through edge `e` to `url` (whose host the edge routes: the domain or a
    /// preview host), with extra headers. The TCP connection goes to the edge's address.
    pub async fn ws(&self, e: usize, url: &str, headers: &[(&str, &str)]) -> Ws {
        let mut req = url.into_client_request().unwrap();
        for (k, v) in headers {
            req.headers_mut().append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let tcp = TcpStream::connect(self.edges[e].addr).await.unwrap();
        let handshake = tokio::time::timeout(
            Duration::from_secs(90),
            tokio_tungstenite::client_async(req, tcp),
        )
        .await;
        let Ok(handshake) = handshake else {
            panic!("WebSocket handshake with {url} within 90 s");
        };
        let (ws, resp) = match handshake {
            Ok(ok) => ok,
            Err(err) => panic!("WebSocket {url} through edge {}: {err}", e + 1),
        };
        assert_eq!(resp.status(), 101);
        ws
    }

    /// The terminal of `user` through edge `e`.
    pub async fn terminal(&self, e: usize, user: &str) -> Term {
        let url = format!(
            "ws://{}:{}/sandbox/terminal",
            self.domain,
            self.edges[e].addr.port()
        );
        let auth = format!("Bearer {}", self.token(user));
        Term {
            ws: self.ws(e, &url, &[("authorization", &auth)]).await,
            buf: String::new(),
        }
    }

    /// The docker CLI against node `n` (0, 1, 2).
    pub fn docker(&self, n: usize, args: &[&str]) -> Output {
        Command::new("docker")
            .arg("-H")
            .arg(&self.nodes[n])
            .args(args)
            .output()
            .expect("the docker CLI is required for the lab tests")
    }

    /// The docker CLI against node `n`; its stdout, asserting success.
    pub fn docker_ok(&self, n: usize, args: &[&str]) -> String {
        let out = self.docker(n, args);
        assert!(
            out.status.success(),
            "docker -H {} {args:?}: {}",
            self.nodes[n],
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Ids of the containers of `user` (this lab's instance) on node `n`, all states.
    pub fn containers_on(&self, n: usize, user: &str) -> Vec<String> {
        let out = self.docker(
            n,
            &[
                "ps",
                "-aq",
                "--no-trunc",
                "--filter",
                &format!("label=sandboxd.instance={}", self.instance),
                "--filter",
                &format!("label=sandboxd.user={user}"),
            ],
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Every (node index, container id) of `user` across the nodes.
    pub fn containers_of(&self, user: &str) -> Vec<(usize, String)> {
        (0..self.nodes.len())
            .flat_map(|n| {
                self.containers_on(n, user)
                    .into_iter()
                    .map(move |id| (n, id))
            })
            .collect()
    }

    /// Where `status` (through edge `e`) says the sandbox of `user` is: the node's hostname
    /// (the `"node"` field of swarm mode) and its index.
    pub async fn node_of(&self, e: usize, user: &str) -> (String, usize) {
        let st = self.status(e, user).await;
        let node = st["node"]
            .as_str()
            .unwrap_or_else(|| panic!("status of {user} has no \"node\" in swarm mode: {st}"))
            .to_owned();
        let i = Lab::node_index(&node);
        (node, i)
    }

    /// The one container of `user` in the lab and the node that holds it; asserts there is
    /// exactly one across all nodes.
    pub fn only_container(&self, user: &str) -> (usize, String) {
        let all = self.containers_of(user);
        assert_eq!(all.len(), 1, "containers of {user} on the nodes: {all:?}");
        all.into_iter().next().unwrap()
    }

    /// The node index (0-based) of a hostname `n1`, `n2`, `n3`.
    pub fn node_index(hostname: &str) -> usize {
        match hostname {
            "n1" => 0,
            "n2" => 1,
            "n3" => 2,
            other => panic!("{other:?} is not a lab node (n1, n2, n3)"),
        }
    }

    /// `docker inspect -f FORMAT id` on node `n`, trimmed.
    pub fn inspect(&self, n: usize, id: &str, format: &str) -> String {
        self.docker_ok(n, &["inspect", "-f", format, id])
            .trim()
            .to_owned()
    }

    /// Removes everything of `user` (see [`Users`]): exit through the first edge that answers,
    /// then containers and the workspace volume through every node engine. Best effort.
    pub fn remove_user(&self, user: &str) {
        if self.edges_running {
            for edge in &self.edges {
                let ok = Command::new("curl")
                    .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "15"])
                    .args(["-X", "POST", "--noproxy", "*"])
                    .arg("-H")
                    .arg(format!("Host: {}", self.domain))
                    .arg("-H")
                    .arg(format!("Authorization: Bearer {}", self.token(user)))
                    .arg(format!("{}/sandbox/exit", edge.url))
                    .output()
                    .is_ok_and(|o| o.stdout.starts_with(b"2"));
                if ok {
                    break;
                }
            }
        }
        for n in 0..self.nodes.len() {
            let ids = self.containers_on(n, user);
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f", "-v"];
                args.extend(ids.iter().map(String::as_str));
                let _ = self.docker(n, &args);
            }
            let _ = self.docker(
                n,
                &[
                    "volume",
                    "rm",
                    "-f",
                    &format!("{}-ws-{user}", self.instance),
                ],
            );
        }
    }
}

/// The lab script, for the fault tests that restart an edge.
pub const LAB_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/swarm-lab.sh");

/// Runs a command to the end, bounded by `timeout(1)`; whether it succeeded.
fn run_bounded(secs: u32, program: &str, args: &[&str]) -> bool {
    Command::new("timeout")
        .arg(secs.to_string())
        .arg(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Kills edge `n` (1 or 2) with SIGKILL now; starts it again (`swarm-lab.sh edges N`, the same
/// binary and environment) when this drops, also after a panic.
pub struct KilledEdge(usize);

impl KilledEdge {
    pub fn kill(n: usize) -> KilledEdge {
        let pid = std::fs::read_to_string(format!("/run/sbxlab/edge{n}.pid"))
            .unwrap_or_else(|e| panic!("edge {n}'s pid file: {e}"));
        let pid = pid.trim();
        assert!(
            !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()),
            "edge {n}'s pid file holds {pid:?}"
        );
        assert!(
            run_bounded(10, "kill", &["-KILL", pid]),
            "kill -KILL {pid} (edge {n})"
        );
        KilledEdge(n)
    }
}

impl Drop for KilledEdge {
    fn drop(&mut self) {
        let n = self.0.to_string();
        if !run_bounded(120, "bash", &[LAB_SCRIPT, "edges", &n]) {
            eprintln!("restarting edge {n} failed: run scripts/swarm-lab.sh edges {n}");
        }
    }
}

/// The log of edge `n` (1 or 2) from a point on: what the edge logged after [`EdgeLog::mark`].
pub struct EdgeLog {
    path: String,
    from: u64,
}

impl EdgeLog {
    pub fn mark(n: usize) -> EdgeLog {
        let path = format!("/var/lib/sbxlab/edge{n}/sandboxd.log");
        let from = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("edge {n}'s log {path}: {e}"))
            .len();
        EdgeLog { path, from }
    }

    /// The lines written since the mark (at most the last 4 MiB of them).
    pub fn since(&self) -> String {
        use std::io::{Read, Seek, SeekFrom};
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return String::new();
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let start = self.from.max(len.saturating_sub(4 << 20));
        let mut buf = Vec::new();
        if f.seek(SeekFrom::Start(start)).is_ok() {
            let _ = f.take(4 << 20).read_to_end(&mut buf);
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// Node availability `pause` for `hostnames` (no new tasks or sandboxes there) until this drops.
pub struct PausedNodes {
    lab: Lab,
    hostnames: Vec<String>,
}

impl PausedNodes {
    pub fn pause(lab: &Lab, hostnames: &[&str]) -> PausedNodes {
        for h in hostnames {
            lab.docker_ok(0, &["node", "update", "--availability", "pause", h]);
        }
        PausedNodes {
            lab: lab.clone(),
            hostnames: hostnames.iter().map(|h| h.to_string()).collect(),
        }
    }
}

impl Drop for PausedNodes {
    fn drop(&mut self) {
        for h in &self.hostnames {
            let _ = self
                .lab
                .docker(0, &["node", "update", "--availability", "active", h]);
        }
    }
}

/// Node `nN` cut off the lab's network (its link to the hub bridge down) until this drops; the
/// drop brings the link up and waits (at most 90 s) until the swarm reports the node Ready, so
/// the tests after this one find the lab whole. Its engine stays reachable by its unix socket
/// meanwhile, as a node's engine would be through a separate management network; the swarm and
/// the overlay lose it.
pub struct CutNode {
    lab: Lab,
    n: usize,
}

impl CutNode {
    pub fn cut(lab: &Lab, n: usize) -> CutNode {
        let link = format!("sbxv{n}");
        assert!(
            run_bounded(
                10,
                "ip",
                &["-n", "sbxlab-hub", "link", "set", &link, "down"]
            ),
            "ip -n sbxlab-hub link set {link} down"
        );
        CutNode {
            lab: lab.clone(),
            n,
        }
    }
}

impl Drop for CutNode {
    fn drop(&mut self) {
        let link = format!("sbxv{}", self.n);
        if !run_bounded(10, "ip", &["-n", "sbxlab-hub", "link", "set", &link, "up"]) {
            eprintln!("could not bring {link} up again: ip -n sbxlab-hub link set {link} up");
            return;
        }
        let want = format!("n{} Ready", self.n);
        let deadline = Instant::now() + Duration::from_secs(90);
        while Instant::now() < deadline {
            let ls = self
                .lab
                .docker(0, &["node", "ls", "--format", "{{.Hostname}} {{.Status}}"]);
            if String::from_utf8_lossy(&ls.stdout)
                .lines()
                .any(|l| l == want)
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        eprintln!("n{} is not Ready 90 s after its link came back", self.n);
    }
}

/// A test's users: unique ids, removed (sandboxes, containers, volumes) when this drops.
pub struct Users {
    lab: Lab,
    ids: Vec<String>,
}

impl Users {
    /// `count` fresh user ids, `sw<tag><random>` (lower-case letters and digits, ≤ 32).
    pub fn new(lab: &Lab, tag: &str, count: usize) -> Users {
        let ids = (0..count)
            .map(|_| {
                let mut id = format!("sw{tag}{}", uuid::Uuid::new_v4().simple());
                id.truncate(24);
                id
            })
            .collect();
        Users {
            lab: lab.clone(),
            ids,
        }
    }

    pub fn get(&self, i: usize) -> &str {
        &self.ids[i]
    }

    pub fn all(&self) -> Vec<&str> {
        self.ids.iter().map(String::as_str).collect()
    }
}

impl Drop for Users {
    fn drop(&mut self) {
        for u in &self.ids {
            self.lab.remove_user(u);
        }
    }
}

/// A terminal WebSocket: keystrokes out as binary frames, output read until a marker.
pub struct Term {
    pub ws: Ws,
    buf: String,
}

impl Term {
    pub async fn send(&mut self, input: &str) {
        self.ws
            .send(Message::Binary(input.as_bytes().to_vec()))
            .await
            .unwrap();
    }

    /// Reads output until `needle` appears (at most `within`); returns what came up to it.
    pub async fn until(&mut self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            if let Some(i) = self.buf.find(needle) {
                let rest = self.buf.split_off(i + needle.len());
                return std::mem::replace(&mut self.buf, rest);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.ws.next()).await {
                Err(_) => panic!("no {needle:?} within {within:?}; output: {:?}", self.buf),
                Ok(Some(Ok(Message::Binary(b)))) => self.buf.push_str(&String::from_utf8_lossy(&b)),
                Ok(Some(Ok(Message::Text(t)))) => self.buf.push_str(&t),
                Ok(Some(Ok(Message::Close(c)))) => {
                    panic!(
                        "closed ({c:?}) waiting for {needle:?}; output: {:?}",
                        self.buf
                    )
                }
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(err))) => panic!("{err} waiting for {needle:?}"),
                Ok(None) => panic!("stream ended waiting for {needle:?}"),
            }
        }
    }

    /// Waits (at most `within`) for the server to end the connection: a close frame, an error
    /// or the end of the stream; output on the way is ignored.
    pub async fn closed(mut self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.ws.next()).await {
                Err(_) => panic!("the terminal stayed open for {within:?}"),
                Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => return,
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.send(Message::Close(None)).await;
    }
}

/// The next text message of a WebSocket within `within`.
pub async fn next_text(ws: &mut Ws, within: Duration) -> String {
    loop {
        let m = tokio::time::timeout(within, ws.next())
            .await
            .unwrap_or_else(|_| panic!("a message within {within:?}"))
            .expect("the socket stays open")
            .expect("a well-formed message");
        match m {
            Message::Text(t) => return t,
            Message::Binary(b) => return String::from_utf8_lossy(&b).into_owned(),
            Message::Close(c) => panic!("closed: {c:?}"),
            _ => {}
        }
    }
}

/// JavaScript for execute that writes a Node app on port 5173 (`server_js`) with a `dev` script
/// and (re)starts it through the image's dev-server autostart, so every container start brings
/// it back (the same path as the single-host preview tests).
pub fn app_code(server_js: &str) -> String {
    format!(
        r#"
        const fs = require('fs');
        fs.writeFileSync('/workspace/package.json', JSON.stringify({{name: 'p', scripts: {{dev: 'node server.js'}}}}));
        fs.writeFileSync('/workspace/server.js', {server});
        console.log(require('child_process').execFileSync('sandboxd-init', ['--restart-dev']).toString());
    "#,
        server = serde_json::to_string(server_js).unwrap()
    )
}

/// A dependency-free Node app for the preview tests: `GET /` answers `hello from <hostname>`;
/// a WebSocket upgrade on any path gets a text frame `connected <hostname>`, then every text
/// frame the client sends (< 126 bytes) comes back prefixed with `echo `.
pub const ECHO_APP: &str = r#"
const http = require('http'), crypto = require('crypto'), os = require('os');
const host = os.hostname();
function frame(s) { const b = Buffer.from(s); return Buffer.concat([Buffer.from([0x81, b.length]), b]); }
const srv = http.createServer((req, res) => { res.end('hello from ' + host + ' ' + req.url); });
srv.on('upgrade', (req, sock) => {
  const key = req.headers['sec-websocket-key'] || '';
  const accept = crypto.createHash('sha1').update(key + '258EAFA5-E914-47DA-95CA-C5AB0DC85B11').digest('base64');
  sock.write('HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ' + accept + '\r\n\r\n');
  sock.write(frame('connected ' + host));
  let buf = Buffer.alloc(0);
  sock.on('data', (d) => {
    buf = Buffer.concat([buf, d]);
    while (buf.length >= 6) {
      const op = buf[0] & 0x0f, len = buf[1] & 0x7f;
      if (len >= 126 || buf.length < 6 + len) return;
      const mask = buf.subarray(2, 6), data = Buffer.from(buf.subarray(6, 6 + len));
      for (let i = 0; i < len; i++) data[i] ^= mask[i % 4];
      buf = buf.subarray(6 + len);
      if (op === 8) { sock.end(); return; }
      if (op === 1) sock.write(frame('echo ' + data.toString()));
    }
  });
  sock.on('error', () => {});
});
srv.listen(5173, '0.0.0.0');
"#;

/// Polls `f` every 250 ms until it returns `Some`, at most `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_are_valid() {
        let a = format!("swx{}", uuid::Uuid::new_v4().simple());
        assert!(UserId::parse(&a[..24]).is_ok());
        assert_eq!(Lab::node_index("n3"), 2);
    }

    #[test]
    fn app_code_embeds_the_server_as_a_js_string() {
        let code = app_code("console.log('a\\n`b`')");
        assert!(code.contains(r#"writeFileSync('/workspace/server.js', "console.log('a\\n`b`')")"#));
    }
}
