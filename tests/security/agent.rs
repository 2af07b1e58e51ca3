//! The in-sandbox agent (docs/agent-protocol.md, "Who can talk to it"): another user's sandbox
//! cannot reach its port, a request with a wrong key gets nothing, and the key is in neither a
//! terminal's nor executed code's environment. (Code of the same sandbox can read it from
//! `/proc/<agent pid>/environ`, same uid: it opens nothing but that sandbox, which the code
//! already controls; accepted and documented.)

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::ws::Term;
use crate::common::*;
use crate::support::*;

const PORT: u16 = 49983;

/// One request to an agent from the host: what came back before the agent closed (or 3 s).
fn ask(addr: SocketAddr, key: &str) -> Vec<u8> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let head = json!({"key": key, "op": "hello"}).to_string();
    s.write_all(format!("SANDBOXD-AGENT/1\n{head}\n").as_bytes())
        .unwrap();
    let mut got = vec![];
    let _ = s.read_to_end(&mut got);
    got
}

fn key_of(container: &str) -> String {
    docker_inspect(container)["Config"]["Labels"]["sandboxd.agent-key"]
        .as_str()
        .expect("the key label")
        .to_owned()
}

#[tokio::test]
async fn only_the_edge_with_the_key_talks_to_an_agent() {
    let app = spawn_app().await;
    app.init("ag1").await;
    let b = app.init("ag2").await;
    let b_cid = b["containerId"].as_str().unwrap().to_owned();
    let b_ip = app.mgr().status(&uid("ag2")).await.unwrap().ip.unwrap();
    let addr = SocketAddr::new(b_ip, PORT);
    let key = key_of(&b_cid);
    assert_eq!(key.len(), 64);
    assert!(key.bytes().all(|c| c.is_ascii_hexdigit()));

    // Positive control: from the host, with the key, the agent answers.
    let mut ok = ask(addr, &key);
    for _ in 0..50 {
        if !ok.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        ok = ask(addr, &key);
    }
    let line = ok.split(|b| *b == b'\n').next().unwrap();
    let v: Value = serde_json::from_slice(line).expect("a JSON head");
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["agent"], "sandboxd-agent", "{v}");

    // A wrong key (of the right shape), a near miss and no key: nothing at all.
    let mut near = key.clone().into_bytes();
    near[63] = if near[63] == b'0' { b'1' } else { b'0' };
    for bad in [
        "0".repeat(64),
        String::from_utf8(near).unwrap(),
        String::new(),
    ] {
        assert!(ask(addr, &bad).is_empty(), "answered a wrong key");
    }

    // From A's sandbox, B's agent port is out of reach (and so is A's own through B's address).
    let probe = format!(
        "const s = require('net').connect({{host: '{b_ip}', port: {PORT}, timeout: 3000}});\
         s.on('connect', () => {{ console.log('connected'); s.destroy(); }});\
         s.on('timeout', () => {{ console.log('timeout'); s.destroy(); }});\
         s.on('error', e => console.log(e.code));"
    );
    let r = app.execute("ag1", json!({ "code": probe })).await;
    let got = r["output"].as_str().unwrap_or("").trim().to_owned();
    assert_ne!(got, "connected", "another sandbox reached the agent: {r}");
    assert!(!got.is_empty(), "{r}");
}

#[tokio::test]
async fn the_key_is_not_in_the_environment_of_code_or_terminals() {
    let app = spawn_app().await;
    let cid = app.init("ag3").await["containerId"]
        .as_str()
        .unwrap()
        .to_owned();
    let key = key_of(&cid);
    let codes = [
        ("javascript", "console.log(JSON.stringify(process.env))"),
        ("typescript", "console.log(JSON.stringify(process.env))"),
        ("python", "import os\nprint(dict(os.environ))"),
        ("bash", "env; cat /proc/self/environ | tr '\\0' '\\n'"),
    ];
    for (lang, code) in codes {
        let r = app
            .execute("ag3", json!({"code": code, "language": lang}))
            .await;
        let out = r["output"].as_str().unwrap();
        assert!(
            out.contains("SANDBOXD_USER"),
            "{lang}: the probe works: {r}"
        );
        assert!(!out.contains("SANDBOXD_AGENT_KEY"), "{lang}: {r}");
        assert!(!out.contains(&key), "{lang}: the key leaked");
    }
    let mut t = Term::open(&app, "ag3", "").await.with_step(TERM_STEP);
    let out = t
        .output("env | grep -c SANDBOXD_AGENT_KEY; echo $SANDBOXD_USER")
        .await;
    assert_eq!(out, "0\nag3", "{out}");
}
