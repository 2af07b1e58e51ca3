//! A created container carries every hardening setting, no published port, no Docker socket.

use crate::common::*;
use serde_json::json;

#[tokio::test]
async fn created_container_is_hardened() {
    let app = spawn_app().await;
    let init = app.init("11").await;
    let id = init["containerId"].as_str().unwrap();
    let c = docker_inspect(id);
    let h = &c["HostConfig"];
    assert_eq!(h["CapDrop"], json!(["ALL"]));
    assert!(h["CapAdd"].is_null() || h["CapAdd"] == json!([]));
    assert_eq!(h["Privileged"], false);
    assert_eq!(h["SecurityOpt"], json!(["no-new-privileges:true"]));
    assert_eq!(h["ReadonlyRootfs"], true);
    assert_eq!(h["Memory"], 512 * 1024 * 1024);
    assert_eq!(h["MemorySwap"], 512 * 1024 * 1024, "no swap beyond memory");
    assert_eq!(h["NanoCpus"], 500_000_000);
    assert_eq!(h["PidsLimit"], 128);
    assert_eq!(h["Init"], true);
    assert_eq!(h["RestartPolicy"]["Name"], "no");
    assert_eq!(h["LogConfig"]["Config"]["max-size"], "1m");
    assert_eq!(h["NetworkMode"], format!("{}-net", app.instance));
    assert_eq!(h["PublishAllPorts"], false);
    assert!(
        h["PortBindings"].as_object().is_none_or(|m| m.is_empty()),
        "{}",
        h["PortBindings"]
    );
    let ulimits: Vec<(String, i64)> = h["Ulimits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            (
                u["Name"].as_str().unwrap().to_owned(),
                u["Hard"].as_i64().unwrap(),
            )
        })
        .collect();
    assert!(ulimits.contains(&("nofile".into(), 1024)), "{ulimits:?}");
    assert!(
        ulimits.contains(&("fsize".into(), 1024 * 1024 * 1024)),
        "{ulimits:?}"
    );
    for tmp in ["/tmp", "/home/sandbox", "/run"] {
        assert!(
            h["Tmpfs"][tmp].as_str().unwrap().contains("size="),
            "{tmp} bounded"
        );
    }
    assert_eq!(c["Config"]["User"], "1000:1000");
    assert_eq!(c["Config"]["Labels"]["sandboxd.managed"], "true");
    assert_eq!(c["Config"]["Labels"]["sandboxd.user"], "11");
    assert_eq!(
        c["Config"]["Labels"]["sandboxd.instance"],
        app.instance.as_str()
    );
    assert!(c["Name"]
        .as_str()
        .unwrap()
        .starts_with(&format!("/{}-user-11-", app.instance)));

    // No published ports at all.
    let ports = &c["NetworkSettings"]["Ports"];
    if let Some(m) = ports.as_object() {
        for (p, b) in m {
            assert!(b.is_null(), "port {p} is published: {b}");
        }
    }
    // Exactly one mount: the user's workspace; never the Docker socket.
    let mounts = c["Mounts"].as_array().unwrap();
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    assert_eq!(mounts[0]["Destination"], "/workspace");
    assert!(mounts[0]["Source"].as_str().unwrap().ends_with("/user-11"));
    assert!(!c.to_string().contains("docker.sock"));

    // The private network has inter-container traffic disabled.
    let out = std::process::Command::new("docker")
        .args(["network", "inspect", &format!("{}-net", app.instance)])
        .output()
        .unwrap();
    let net: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        net[0]["Options"]["com.docker.network.bridge.enable_icc"],
        "false"
    );

    // From inside: uid 1000, no socket, read-only root, writable workspace.
    let r = app
        .execute(
            "11",
            json!({"code": r#"
                const fs = require('fs');
                const out = { uid: process.getuid(), gid: process.getgid() };
                out.sock = ['/var/run/docker.sock', '/run/docker.sock'].some(p => fs.existsSync(p));
                try { fs.writeFileSync('/etc/x', '1'); out.root = 'writable'; } catch (e) { out.root = e.code; }
                fs.writeFileSync('/workspace/ok', '1'); out.ws = 'ok';
                console.log(JSON.stringify(out));
            "#}),
        )
        .await;
    let v: serde_json::Value = serde_json::from_str(r["output"].as_str().unwrap().trim()).unwrap();
    assert_eq!(
        v,
        json!({"uid": 1000, "gid": 1000, "sock": false, "root": "EROFS", "ws": "ok"})
    );
}
