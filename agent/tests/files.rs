//! The files ops over TCP against the real agent: every op, the path rules and the symlink
//! escapes (to /etc/shadow, to /, to a folder outside the workspace).

mod common;

use std::io::Read;
use std::os::unix::fs::symlink;
use std::time::Duration;

use common::*;
use serde_json::json;

#[test]
fn hello_and_wrong_key() {
    let a = start();
    let r = a.call(json!({"op": "hello"}), None);
    assert!(r.ok(), "{}", r.head);
    assert_eq!(r.head["agent"], "sandboxd-agent");
    assert_eq!(r.head["version"], 1);
    assert_eq!(r.head["pid"], a.child.id());

    // A wrong key: the connection is closed without a head.
    for key in ["", "00", &"0".repeat(64), &a.key[..63]] {
        let mut s = a.connect();
        let req = format!("SANDBOXD-AGENT/1\n{}\n", json!({"key": key, "op": "hello"}));
        std::io::Write::write_all(&mut s, req.as_bytes()).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        assert!(
            out.is_empty(),
            "answered a wrong key: {:?}",
            String::from_utf8_lossy(&out)
        );
    }
    // Not the protocol: bad_request.
    let mut s = a.connect();
    std::io::Write::write_all(&mut s, b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.contains("bad_request"), "{out}");
    // Unknown op.
    let r = a.call(json!({"op": "nope"}), None);
    assert_eq!(r.code(), "bad_request");
}

#[test]
fn head_must_arrive_in_time_and_connections_are_capped() {
    let a = start();
    // 64 idle connections hold every slot; the 65th is told busy.
    let idle: Vec<_> = (0..64).map(|_| a.connect()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut s = a.connect();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.contains("\"busy\""), "{out}");
    // After 5 s without a head the idle ones are closed and slots free again.
    std::thread::sleep(Duration::from_millis(5500));
    drop(idle);
    std::thread::sleep(Duration::from_millis(100));
    assert!(a.call(json!({"op": "hello"}), None).ok());
}

#[test]
fn write_read_stat_list_move_remove_mkdir() {
    let a = start();
    let r = a.call(
        json!({"op": "write", "path": "src/app/main.js", "maxBytes": 1000}),
        Some(b"hello"),
    );
    assert!(r.ok(), "{}", r.head);
    assert_eq!(r.head["entry"]["name"], "main.js");
    assert_eq!(r.head["entry"]["path"], "src/app/main.js");
    assert_eq!(r.head["entry"]["type"], "file");
    assert_eq!(r.head["entry"]["size"], 5);
    assert_eq!(r.head["entry"]["mode"], 0o644);
    assert_eq!(std::fs::read(a.path("src/app/main.js")).unwrap(), b"hello");

    // Replace, with a mode; no temporary file is left beside it.
    let big = vec![b'x'; 3 << 20];
    let r = a.call(
        json!({"op": "write", "path": "src/app/main.js", "maxBytes": 4 << 20, "mode": 0o600}),
        Some(&big),
    );
    assert!(r.ok(), "{}", r.head);
    assert_eq!(r.head["entry"]["mode"], 0o600);
    assert_eq!(
        std::fs::read(a.path("src/app/main.js")).unwrap().len(),
        3 << 20
    );
    assert_eq!(std::fs::read_dir(a.path("src/app")).unwrap().count(), 1);

    // Over maxBytes: too_large and nothing written.
    let r = a.call(
        json!({"op": "write", "path": "src/app/main.js", "maxBytes": 10}),
        Some(b"0123456789A"),
    );
    assert_eq!(r.code(), "too_large", "{}", r.head);
    assert_eq!(
        std::fs::read(a.path("src/app/main.js")).unwrap().len(),
        3 << 20
    );
    let r = a.call(
        json!({"op": "write", "path": "new.txt", "maxBytes": 4}),
        Some(&big),
    );
    assert_eq!(r.code(), "too_large");
    assert!(!exists(&a.path("new.txt")));
    assert_eq!(
        std::fs::read_dir(&a.root).unwrap().count(),
        1,
        "a temporary file was left"
    );

    // Write onto a folder.
    let r = a.call(
        json!({"op": "write", "path": "src", "maxBytes": 10}),
        Some(b"x"),
    );
    assert_eq!(r.code(), "is_a_directory");

    // stat
    let r = a.call(json!({"op": "stat", "path": "src"}), None);
    assert_eq!(r.head["entry"]["type"], "dir");
    let r = a.call(json!({"op": "stat", "path": "./src//app/main.js"}), None);
    assert_eq!(r.head["entry"]["path"], "src/app/main.js");
    assert!(r.head["entry"]["modified"].as_i64().unwrap() > 1_600_000_000_000);
    let r = a.call(json!({"op": "stat", "path": "nope"}), None);
    assert_eq!(r.code(), "not_found");
    let r = a.call(json!({"op": "stat", "path": ""}), None);
    assert_eq!(r.head["entry"]["type"], "dir");

    // read: whole, range, past the end, a folder.
    let r = a.call(
        json!({"op": "write", "path": "t.txt", "maxBytes": 100}),
        Some(b"0123456789"),
    );
    assert!(r.ok());
    let r = a.call(json!({"op": "read", "path": "t.txt"}), None);
    assert_eq!(r.head["size"], 10);
    assert_eq!(r.bytes(DATA), b"0123456789");
    assert_eq!(r.frames.last().unwrap().0, END);
    let r = a.call(
        json!({"op": "read", "path": "t.txt", "offset": 3, "length": 4}),
        None,
    );
    assert_eq!(r.bytes(DATA), b"3456");
    let r = a.call(json!({"op": "read", "path": "t.txt", "offset": 30}), None);
    assert!(r.ok());
    assert!(r.bytes(DATA).is_empty());
    let r = a.call(json!({"op": "read", "path": "src/app/main.js"}), None);
    assert_eq!(r.bytes(DATA).len(), 3 << 20);
    let r = a.call(json!({"op": "read", "path": "src"}), None);
    assert_eq!(r.code(), "is_a_directory");

    // list: sorted, types, symlinks with their target, limit.
    symlink("t.txt", a.path("link")).unwrap();
    let r = a.call(json!({"op": "list", "path": ""}), None);
    let names: Vec<_> = r.head["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["link", "src", "t.txt"]);
    assert_eq!(r.head["entries"][0]["type"], "symlink");
    assert_eq!(r.head["entries"][0]["target"], "t.txt");
    assert_eq!(r.head["truncated"], false);
    let r = a.call(json!({"op": "list", "path": "", "limit": 2}), None);
    assert_eq!(r.head["entries"].as_array().unwrap().len(), 2);
    assert_eq!(r.head["truncated"], true);
    let r = a.call(json!({"op": "list", "path": "src"}), None);
    assert_eq!(r.head["entries"][0]["path"], "src/app");
    let r = a.call(json!({"op": "list", "path": "t.txt"}), None);
    assert_eq!(r.code(), "not_a_directory");

    // mkdir
    let r = a.call(
        json!({"op": "mkdir", "path": "a/b/c", "parents": true}),
        None,
    );
    assert!(r.ok(), "{}", r.head);
    assert_eq!(r.head["entry"]["type"], "dir");
    let r = a.call(
        json!({"op": "mkdir", "path": "a/b/c", "parents": false}),
        None,
    );
    assert_eq!(r.code(), "exists");
    let r = a.call(
        json!({"op": "mkdir", "path": "a/b/c", "parents": true}),
        None,
    );
    assert!(r.ok());
    let r = a.call(
        json!({"op": "mkdir", "path": "x/y", "parents": false}),
        None,
    );
    assert_eq!(r.code(), "not_found");
    let r = a.call(
        json!({"op": "mkdir", "path": "t.txt/y", "parents": true}),
        None,
    );
    assert_eq!(r.code(), "not_a_directory");

    // move
    let r = a.call(
        json!({"op": "move", "from": "t.txt", "to": "a/t2.txt"}),
        None,
    );
    assert!(r.ok(), "{}", r.head);
    assert_eq!(r.head["entry"]["path"], "a/t2.txt");
    assert!(!exists(&a.path("t.txt")));
    let r = a.call(
        json!({"op": "write", "path": "u.txt", "maxBytes": 100}),
        Some(b"u"),
    );
    assert!(r.ok());
    let r = a.call(
        json!({"op": "move", "from": "u.txt", "to": "a/t2.txt"}),
        None,
    );
    assert_eq!(r.code(), "exists");
    let r = a.call(
        json!({"op": "move", "from": "u.txt", "to": "a/t2.txt", "overwrite": true}),
        None,
    );
    assert!(r.ok());
    assert_eq!(std::fs::read(a.path("a/t2.txt")).unwrap(), b"u");
    let r = a.call(json!({"op": "move", "from": "nope", "to": "x"}), None);
    assert_eq!(r.code(), "not_found");
    let r = a.call(json!({"op": "move", "from": "a", "to": "a/b/inside"}), None);
    assert_eq!(r.code(), "invalid_path", "{}", r.head);
    // The symlink itself moves (and keeps its text).
    let r = a.call(json!({"op": "move", "from": "link", "to": "link2"}), None);
    assert_eq!(r.head["entry"]["type"], "symlink");

    // remove
    let r = a.call(json!({"op": "remove", "path": "a"}), None);
    assert_eq!(r.code(), "not_empty");
    let r = a.call(
        json!({"op": "remove", "path": "a", "recursive": true}),
        None,
    );
    assert!(r.ok(), "{}", r.head);
    assert!(!exists(&a.path("a")));
    let r = a.call(json!({"op": "remove", "path": "a"}), None);
    assert_eq!(r.code(), "not_found");
    let r = a.call(json!({"op": "remove", "path": ""}), None);
    assert_eq!(r.code(), "invalid_path");
    let r = a.call(json!({"op": "remove", "path": "link2"}), None);
    assert!(r.ok());
}

#[test]
fn bad_paths_are_refused() {
    let a = start();
    for p in [
        "..",
        "a/../..",
        "/etc/passwd",
        "a\u{0}b",
        &"x".repeat(256),
        &"a/".repeat(3000),
    ] {
        for op in ["stat", "list", "read", "remove", "mkdir", "tar", "watch"] {
            let r = a.call(json!({"op": op, "path": p}), None);
            assert_eq!(r.code(), "invalid_path", "{op} {p:?}: {}", r.head);
        }
        let r = a.call(
            json!({"op": "write", "path": p, "maxBytes": 10}),
            Some(b"x"),
        );
        assert_eq!(r.code(), "invalid_path");
        let r = a.call(json!({"op": "move", "from": "x", "to": p}), None);
        assert_eq!(r.code(), "invalid_path");
    }
    let r = a.call(json!({"op": "stat"}), None);
    assert_eq!(r.code(), "bad_request");
    let r = a.call(json!({"op": "stat", "path": 5}), None);
    assert_eq!(r.code(), "bad_request");
}

#[test]
fn symlinks_out_of_the_workspace_are_refused() {
    let a = start();
    let outside = a.dir.path().join("other-user");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("secret.txt"), "secret").unwrap();
    symlink("/etc/shadow", a.path("shadow")).unwrap();
    symlink("/", a.path("rootfs")).unwrap();
    symlink(&outside, a.path("other")).unwrap();
    symlink("../other-user", a.path("rel-other")).unwrap();
    std::fs::create_dir(a.path("d")).unwrap();
    symlink("../../other-user/secret.txt", a.path("d/deep")).unwrap();

    for p in [
        "shadow",
        "rootfs",
        "rootfs/etc",
        "other",
        "other/secret.txt",
        "rel-other/secret.txt",
        "d/deep",
    ] {
        for op in ["stat", "list", "read", "tar", "watch"] {
            let r = a.call(json!({"op": op, "path": p}), None);
            assert_eq!(r.code(), "outside_workspace", "{op} {p}: {}", r.head);
        }
        let r = a.call(
            json!({"op": "untar", "path": p, "maxBytes": 1000}),
            Some(b"x"),
        );
        assert_eq!(r.code(), "outside_workspace", "untar {p}: {}", r.head);
    }
    // Writing through them: refused, nothing created or changed outside.
    for p in [
        "other/new.txt",
        "other/secret.txt",
        "other/sub/x",
        "rootfs/tmp/x",
        "d/deep",
    ] {
        let r = a.call(
            json!({"op": "write", "path": p, "maxBytes": 100}),
            Some(b"pwned"),
        );
        assert_eq!(r.code(), "outside_workspace", "write {p}: {}", r.head);
        let r = a.call(json!({"op": "mkdir", "path": format!("{p}/x")}), None);
        assert_eq!(r.code(), "outside_workspace", "mkdir {p}: {}", r.head);
        let r = a.call(
            json!({"op": "move", "from": "d", "to": format!("{p}/moved")}),
            None,
        );
        assert!(!r.ok(), "move into {p}");
    }
    assert_eq!(
        std::fs::read_to_string(outside.join("secret.txt")).unwrap(),
        "secret"
    );
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1);

    // remove and move act on the link itself.
    let r = a.call(json!({"op": "move", "from": "other", "to": "other2"}), None);
    assert!(r.ok(), "{}", r.head);
    assert_eq!(r.head["entry"]["type"], "symlink");
    let r = a.call(
        json!({"op": "remove", "path": "other2", "recursive": true}),
        None,
    );
    assert!(r.ok(), "{}", r.head);
    assert!(
        outside.join("secret.txt").exists(),
        "remove followed the link"
    );
    let r = a.call(json!({"op": "remove", "path": "shadow"}), None);
    assert!(r.ok());

    // A link inside the workspace is followed.
    std::fs::write(a.path("real.txt"), "inside").unwrap();
    symlink("real.txt", a.path("alias")).unwrap();
    let r = a.call(json!({"op": "read", "path": "alias"}), None);
    assert_eq!(r.bytes(DATA), b"inside");
    let r = a.call(json!({"op": "stat", "path": "alias"}), None);
    assert_eq!(r.head["entry"]["type"], "file");
    assert_eq!(r.head["entry"]["target"], "real.txt");
    let r = a.call(
        json!({"op": "write", "path": "alias", "maxBytes": 100}),
        Some(b"changed"),
    );
    assert!(r.ok());
    assert_eq!(
        std::fs::read_to_string(a.path("real.txt")).unwrap(),
        "changed"
    );
    assert!(std::fs::symlink_metadata(a.path("alias"))
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn tar_and_untar() {
    let a = start();
    std::fs::create_dir_all(a.path("proj/src")).unwrap();
    std::fs::write(a.path("proj/src/a.js"), "a").unwrap();
    std::fs::write(a.path("proj/-rf"), "dash").unwrap();
    let r = a.call(json!({"op": "tar", "path": "proj"}), None);
    assert!(r.ok(), "{}", r.head);
    assert_eq!(r.frames.last().unwrap().0, END);
    let gz = r.bytes(DATA);
    assert_eq!(&gz[..2], &[0x1f, 0x8b]);

    let r = a.call(
        json!({"op": "untar", "path": "copy/here", "maxBytes": 1 << 20}),
        Some(&gz),
    );
    assert!(r.ok(), "{}", r.head);
    assert_eq!(r.head["files"], 2);
    assert_eq!(
        std::fs::read_to_string(a.path("copy/here/src/a.js")).unwrap(),
        "a"
    );
    assert_eq!(
        std::fs::read_to_string(a.path("copy/here/-rf")).unwrap(),
        "dash"
    );

    // One file.
    let r = a.call(json!({"op": "tar", "path": "proj/-rf"}), None);
    assert!(r.ok(), "{}", r.head);
    let r = a.call(
        json!({"op": "untar", "path": "one", "maxBytes": 1 << 20}),
        Some(&r.bytes(DATA)),
    );
    assert_eq!(r.head["files"], 1, "{}", r.head);
    assert!(a.path("one/-rf").exists());

    // Over maxBytes, and garbage.
    let r = a.call(
        json!({"op": "untar", "path": "x", "maxBytes": 10}),
        Some(&gz),
    );
    assert_eq!(r.code(), "too_large", "{}", r.head);
    let r = a.call(
        json!({"op": "untar", "path": "x", "maxBytes": 1 << 20}),
        Some(b"not a tarball at all"),
    );
    assert_eq!(r.code(), "bad_request", "{}", r.head);

    // A gzip bomb is stopped at 4 x maxBytes unpacked.
    let zeros = std::process::Command::new("bash")
        .args([
            "-c",
            "cd \"$1\" && head -c 50000000 /dev/zero >zeros && tar -cz zeros && rm zeros",
            "-",
        ])
        .arg(a.dir.path())
        .output()
        .unwrap()
        .stdout;
    assert!(zeros.len() < 100_000);
    let r = a.call(
        json!({"op": "untar", "path": "bomb", "maxBytes": 200_000}),
        Some(&zeros),
    );
    assert_eq!(r.code(), "too_large", "{}", r.head);
}

#[test]
fn watch_reports_changes() {
    let a = start();
    std::fs::create_dir_all(a.path("w/sub")).unwrap();
    std::fs::create_dir_all(a.path("w/node_modules/pkg")).unwrap();
    let (head, mut r) = a.open(json!({"op": "watch", "path": "w", "recursive": true}), None);
    assert_eq!(head["ok"], true, "{head}");
    std::fs::write(a.path("w/sub/f.txt"), "1").unwrap();
    std::fs::write(a.path("w/node_modules/pkg/ignored.js"), "1").unwrap();
    std::fs::create_dir(a.path("w/sub/new")).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    std::fs::write(a.path("w/sub/new/inner.txt"), "1").unwrap();
    std::fs::rename(a.path("w/sub/f.txt"), a.path("w/g.txt")).unwrap();
    std::fs::remove_file(a.path("w/g.txt")).unwrap();
    let mut events = Vec::new();
    r.get_ref()
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    while let Some((k, body)) = read_frame(&mut r) {
        assert_eq!(k, EVENT);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let done = v["type"] == "remove" && v["path"] == "w/g.txt";
        events.push(v);
        if done {
            break;
        }
    }
    let has = |t: &str, p: &str| events.iter().any(|e| e["type"] == t && e["path"] == p);
    assert!(has("create", "w/sub/f.txt"), "{events:?}");
    assert!(has("modify", "w/sub/f.txt"), "{events:?}");
    assert!(has("create", "w/sub/new"), "{events:?}");
    assert!(has("create", "w/sub/new/inner.txt"), "{events:?}");
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "rename" && e["path"] == "w/g.txt" && e["from"] == "w/sub/f.txt"),
        "{events:?}"
    );
    assert!(has("remove", "w/g.txt"), "{events:?}");
    assert!(
        !events
            .iter()
            .any(|e| e["path"].as_str().unwrap_or("").contains("node_modules/")),
        "{events:?}"
    );

    // Removing the watched folder ends the stream.
    std::fs::remove_dir_all(a.path("w")).unwrap();
    let mut ended = false;
    while let Some((k, _)) = read_frame(&mut r) {
        if k == END {
            ended = true;
            break;
        }
    }
    assert!(ended);
}
