//! The swarm's node inventory as a manager reports it (`GET /nodes`): the typed subset sandboxd
//! uses, parsed from the engine's JSON, and the one small HTTP GET that fetches it over the
//! manager's unix socket or TLS endpoint ([`super::endpoint`]; bollard 0.18 has no nodes API;
//! this GET is ~50 lines, a bollard upgrade to 0.19 would be a breaking change across the engine
//! client).

use std::collections::BTreeMap;
use std::time::Duration;

use super::endpoint::{Endpoint, EngineTls};

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use serde::Deserialize;

/// Largest inventory answer read (a few KiB per node).
const MAX_ANSWER: usize = 4 << 20;

/// One node of the swarm.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// The swarm node ID (what the store records).
    pub id: String,
    pub hostname: String,
    /// The node's address in the swarm (`Status.Addr`).
    pub addr: String,
    /// `Status.State` is `ready`.
    pub ready: bool,
    /// `Status.State` as reported (`ready`, `down`, `unknown`, `disconnected`).
    pub state: String,
    /// `Spec.Availability`: `active`, `pause` or `drain`.
    pub availability: String,
    pub labels: BTreeMap<String, String>,
    pub memory_bytes: i64,
    pub nano_cpus: i64,
}

impl Node {
    /// May receive new sandboxes: ready and active (not paused, not drained).
    pub fn accepts_new(&self) -> bool {
        self.ready && self.availability == "active"
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct WireNode {
    #[serde(rename = "ID")]
    id: String,
    #[serde(default)]
    spec: WireSpec,
    #[serde(default)]
    description: WireDescription,
    #[serde(default)]
    status: WireStatus,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct WireSpec {
    #[serde(default)]
    availability: String,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct WireDescription {
    #[serde(default)]
    hostname: String,
    #[serde(default)]
    resources: WireResources,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct WireResources {
    #[serde(default, rename = "NanoCPUs")]
    nano_cpus: i64,
    #[serde(default)]
    memory_bytes: i64,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct WireStatus {
    #[serde(default)]
    state: String,
    #[serde(default)]
    addr: String,
}

/// Parses the answer of `GET /nodes`. Nodes without an ID or hostname are left out.
pub fn parse_nodes(json: &[u8]) -> anyhow::Result<Vec<Node>> {
    let wire: Vec<WireNode> = serde_json::from_slice(json).context("parsing GET /nodes")?;
    Ok(wire
        .into_iter()
        .filter(|n| !n.id.is_empty() && !n.description.hostname.is_empty())
        .map(|n| Node {
            ready: n.status.state == "ready",
            state: n.status.state,
            id: n.id,
            hostname: n.description.hostname,
            addr: n.status.addr,
            availability: n.spec.availability,
            labels: n.spec.labels.unwrap_or_default(),
            memory_bytes: n.description.resources.memory_bytes,
            nano_cpus: n.description.resources.nano_cpus,
        })
        .collect())
}

/// A node's engine URL from the `swarm_node_engine` template. Hostnames and addresses that
/// could change the URL's shape (anything but letters, digits, `-`, `.`, `_`, `:`) are refused.
pub fn engine_url(template: &str, node: &Node) -> anyhow::Result<String> {
    let safe = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':'))
    };
    if template.contains("{hostname}") && !safe(&node.hostname) {
        bail!(
            "node {} has an unusable hostname {:?}",
            node.id,
            node.hostname
        );
    }
    if template.contains("{addr}") && !safe(&node.addr) {
        bail!("node {} has an unusable address {:?}", node.id, node.addr);
    }
    Ok(template
        .replace("{hostname}", &node.hostname)
        .replace("{addr}", &node.addr))
}

/// `GET /v1.41/nodes` from a manager's engine URL (`unix:///path`, or `https://host:port` with
/// `tls`), bounded in time and size.
pub async fn fetch(
    url: &str,
    tls: Option<&EngineTls>,
    within: Duration,
) -> anyhow::Result<Vec<Node>> {
    let body = get(url, tls, "/v1.41/nodes", within).await?;
    parse_nodes(&body)
}

async fn get(
    url: &str,
    tls: Option<&EngineTls>,
    path: &str,
    within: Duration,
) -> anyhow::Result<Bytes> {
    let endpoint = Endpoint::parse(url, tls.is_some()).map_err(|e| anyhow!(e))?;
    let work = async {
        match (&endpoint, tls) {
            (Endpoint::Unix(sock), _) => {
                let stream = tokio::net::UnixStream::connect(sock)
                    .await
                    .with_context(|| format!("connecting to {url}"))?;
                ask(stream, "docker", path).await
            }
            (Endpoint::Tls { host, port }, Some(tls)) => {
                let authority = endpoint.https_base().unwrap_or_default();
                let authority = authority.trim_start_matches("https://");
                let asked = async { ask(tls.connect(host, *port).await?, authority, path).await };
                asked.await.with_context(|| tls.refused(host, *port))
            }
            (Endpoint::Tls { .. }, None) => bail!("{url} needs swarm_tls_dir"),
        }
    };
    tokio::time::timeout(within, work)
        .await
        .map_err(|_| anyhow!("{url} did not answer {path} within {within:?}"))?
}

/// One HTTP/1.1 GET on a connected stream.
async fn ask<S>(stream: S, host: &str, path: &str) -> anyhow::Result<Bytes>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    let conn = tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, host)
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await;
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            conn.abort();
            return Err(e.into());
        }
    };
    let status = resp.status();
    let body = Limited::new(resp.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| anyhow!("reading {path}: {e}"));
    conn.abort();
    let body = body?.to_bytes();
    if !status.is_success() {
        bail!(
            "{path} answered {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        );
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured from the lab (`curl --unix-socket /run/sbxlab/n1.sock /v1.41/nodes`), trimmed.
    const LAB: &str = include_str!("testdata/nodes.json");

    #[test]
    fn parses_the_lab_inventory() {
        let nodes = parse_nodes(LAB.as_bytes()).unwrap();
        assert_eq!(nodes.len(), 3);
        let n1 = nodes.iter().find(|n| n.hostname == "n1").unwrap();
        assert!(n1.ready && n1.accepts_new());
        assert!(n1.memory_bytes > 0 && n1.nano_cpus > 0);
        assert!(!n1.addr.is_empty());
        assert!(nodes.iter().all(|n| !n.id.is_empty()));
    }

    #[test]
    fn down_paused_and_drained_nodes_take_nothing_new() {
        let json = br#"[
          {"ID":"a","Spec":{"Availability":"active","Labels":{"sandboxd":"true"}},
           "Description":{"Hostname":"a","Resources":{"NanoCPUs":2000000000,"MemoryBytes":1024}},
           "Status":{"State":"down","Addr":"10.0.0.1"}},
          {"ID":"b","Spec":{"Availability":"drain"},"Description":{"Hostname":"b"},
           "Status":{"State":"ready","Addr":"10.0.0.2"}},
          {"ID":"c","Spec":{"Availability":"pause"},"Description":{"Hostname":"c"},
           "Status":{"State":"ready","Addr":"10.0.0.3"}},
          {"ID":"","Description":{"Hostname":"nameless"}},
          {"ID":"e","Status":{"State":"ready"}}
        ]"#;
        let nodes = parse_nodes(json).unwrap();
        assert_eq!(nodes.len(), 3);
        assert!(nodes.iter().all(|n| !n.accepts_new()));
        assert_eq!(nodes[0].labels["sandboxd"], "true");
        assert_eq!(nodes[0].state, "down");
        assert!(parse_nodes(b"{}").is_err());
    }

    #[test]
    fn engine_urls_come_from_the_template() {
        let n = parse_nodes(LAB.as_bytes()).unwrap().remove(0);
        let url = engine_url("unix:///run/sbxlab/{hostname}.sock", &n).unwrap();
        assert_eq!(url, format!("unix:///run/sbxlab/{}.sock", n.hostname));
        let by_addr = engine_url("https://{addr}:2376", &n).unwrap();
        assert_eq!(by_addr, format!("https://{}:2376", n.addr));
        let evil = Node {
            hostname: "../../etc/x".into(),
            ..n.clone()
        };
        assert!(engine_url("unix:///run/sbxlab/{hostname}.sock", &evil).is_err());
        let evil = Node {
            addr: "1.2.3.4/x?y".into(),
            ..n
        };
        assert!(engine_url("https://{addr}:2376", &evil).is_err());
    }
}
