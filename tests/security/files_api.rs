//! Point 6, the files API: symlinks planted in a workspace (to `/etc/shadow`, to `/`, to
//! another user's workspace by its host path and by a path relative to the mount), `..` in
//! every spelling, NUL and absolute paths never give a client any content from outside its
//! workspace, and never make sandboxd write anything outside it (the host's files are compared
//! before and after).

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use crate::common::*;
use crate::files::{snapshot, victim};
use crate::support::*;

const SECRET_B: &str = "SECRET-OF-USER-B-7f3a";

async fn call(
    app: &TestApp,
    method: &str,
    user: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> (u16, Vec<u8>) {
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut b = app
        .client
        .request(m, format!("{}{path}", app.base))
        .bearer_auth(app.token(user));
    if let Some(body) = body {
        b = b.body(body);
    }
    let r = openapi::checked(method, path, b.send().await.unwrap()).await;
    (r.status().as_u16(), r.bytes().await.unwrap().to_vec())
}

/// Percent-encodes a query value.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn code(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// The decompressed bytes of a `.tar.gz` (empty when it is not one).
fn gunzip(tgz: &[u8]) -> Vec<u8> {
    let mut child = Command::new("gzip")
        .arg("-dc")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = tgz.to_vec();
    let w = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    w.join().unwrap();
    out.stdout
}

fn leaked(body: &[u8]) -> Option<&'static str> {
    let text = String::from_utf8_lossy(body);
    [SECRET_B, "root:", "daemon:", "do not touch"]
        .into_iter()
        .find(|n| text.contains(n))
}

#[tokio::test]
async fn the_files_api_never_leaves_the_workspace() {
    let app = spawn_app().await;
    let (a, b) = ("fsa", "fsb");
    app.init(a).await;
    app.init(b).await;
    let (s, _) = call(
        &app,
        "PUT",
        b,
        "/sandbox/files?path=secret.txt",
        Some(SECRET_B.into()),
    )
    .await;
    assert_eq!(s, 200);

    let outside = tempfile::tempdir().unwrap();
    let victim = victim(outside.path());
    let ws_b = app.workspaces.join(format!("user-{b}"));
    let ws_a = app.workspaces.join(format!("user-{a}"));
    let host_shadow = std::fs::read("/etc/shadow").ok();
    let before_b = snapshot(&ws_b);
    let before_victim = snapshot(outside.path());

    // The attacker plants links from inside the sandbox, as its code would.
    let planted = js(
        &app,
        a,
        &format!(
            r#"const fs = require('fs');
            const ln = (t, p) => {{ try {{ fs.symlinkSync(t, '/workspace/' + p); return 'ok'; }} catch (e) {{ return e.code; }} }};
            fs.mkdirSync('/workspace/d', {{recursive: true}});
            console.log(JSON.stringify([
              ln('/etc/shadow', 'shadow'), ln('/', 'root'), ln('/etc', 'etc'),
              ln({hostb:?}, 'hostb'), ln({victim:?}, 'victim'),
              ln('../user-{b}', 'relb'), ln('/workspace/../user-{b}', 'inb'),
              ln('../../../../etc/passwd', 'd/up'), ln('d/../..', 'dots'),
            ]));"#,
            hostb = ws_b.display().to_string(),
            victim = victim.display().to_string(),
        ),
    )
    .await;
    assert!(
        planted.as_array().unwrap().iter().all(|v| v == "ok"),
        "{planted}"
    );
    // A host-side link too (the workspace is a bind mount; the host must never follow it).
    std::os::unix::fs::symlink(&ws_b, ws_a.join("hostlink")).unwrap();

    let links = [
        "shadow", "root", "etc", "hostb", "victim", "relb", "inb", "d/up", "dots", "hostlink",
    ];
    let mut probes: Vec<String> = vec![];
    for l in links {
        for tail in [
            "",
            "/secret.txt",
            "/passwd",
            "/shadow",
            "/etc/shadow",
            "/secret",
        ] {
            probes.push(format!("{l}{tail}"));
        }
    }
    for p in &probes {
        let q = enc(p);
        for route in [
            "/sandbox/files",
            "/sandbox/files/stat",
            "/sandbox/files/archive",
        ] {
            let (s, body) = call(&app, "GET", a, &format!("{route}?path={q}"), None).await;
            let body = if route.ends_with("archive") && s == 200 {
                gunzip(&body)
            } else {
                body
            };
            assert!(
                leaked(&body).is_none(),
                "GET {route}?path={p} → {s} leaked {:?}",
                leaked(&body)
            );
            assert!(
                [403, 404, 409].contains(&s),
                "GET {route}?path={p} → {s}: {}",
                String::from_utf8_lossy(&body[..body.len().min(300)])
            );
        }
        // Writes through the link: refused, nothing lands outside.
        let (s, body) = call(
            &app,
            "PUT",
            a,
            &format!("/sandbox/files?path={q}/x"),
            Some(b"pwned".to_vec()),
        )
        .await;
        assert!(
            [403, 404, 409].contains(&s),
            "PUT {p}/x → {s} {}",
            code(&body)
        );
        let (s, _) = call(
            &app,
            "PUT",
            a,
            &format!("/sandbox/files/archive?path={q}"),
            Some(tiny_tgz()),
        )
        .await;
        assert!([403, 404, 409].contains(&s), "PUT archive {p} → {s}");
        let (s, body) = crate::files_api::json_call(
            &app,
            a,
            "/sandbox/files/mkdir",
            json!({"path": format!("{p}/newdir")}),
        )
        .await;
        assert!(
            [403, 404, 409].contains(&s),
            "mkdir {p}/newdir → {s} {body}"
        );
    }
    // The links themselves are the workspace's: the symlink entry is described, not followed.
    let (s, body) = call(&app, "GET", a, "/sandbox/files", None).await;
    assert_eq!(s, 200);
    let listing: Value = serde_json::from_slice(&body).unwrap();
    let shadow = listing["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "shadow")
        .unwrap();
    assert_eq!(shadow["type"], "symlink", "{shadow}");
    // Moving a file onto a link's folder or a link elsewhere stays inside.
    let (s, _) = call(
        &app,
        "PUT",
        a,
        "/sandbox/files?path=mine.txt",
        Some(b"m".to_vec()),
    )
    .await;
    assert_eq!(s, 200);
    for to in [
        "hostb/stolen.txt",
        "root/tmp/stolen.txt",
        "etc/stolen",
        "relb/stolen.txt",
    ] {
        let (s, body) = crate::files_api::json_call(
            &app,
            a,
            "/sandbox/files/move",
            json!({"from": "mine.txt", "to": to}),
        )
        .await;
        assert!([403, 404, 409].contains(&s), "move to {to} → {s} {body}");
    }
    // Removing a link removes the link, never its target.
    for l in ["shadow", "root", "hostb", "hostlink"] {
        let (s, _) = call(&app, "DELETE", a, &format!("/sandbox/files?path={l}"), None).await;
        assert_eq!(s, 200, "DELETE {l}");
    }
    let (s, _) = call(
        &app,
        "DELETE",
        a,
        "/sandbox/files?path=relb&recursive=true",
        None,
    )
    .await;
    assert_eq!(s, 200);

    // A whole-workspace archive stores links as links: no outside content in it.
    let (s, tgz) = call(&app, "GET", a, "/sandbox/files/archive", None).await;
    assert_eq!(s, 200);
    let tar = gunzip(&tgz);
    assert!(!tar.is_empty(), "the archive is a .tar.gz");
    assert!(
        leaked(&tar).is_none(),
        "the archive leaked {:?}",
        leaked(&tar)
    );

    // An archive that tries to climb out: `../`, absolute names, a symlink then a write
    // through it. Whatever tar makes of it stays in the sandbox; the host is untouched.
    let evil = evil_tgz(&ws_b);
    let (s, body) = call(
        &app,
        "PUT",
        a,
        "/sandbox/files/archive?path=unpack",
        Some(evil),
    )
    .await;
    assert!(s < 500 || s == 502, "evil archive → {s} {}", code(&body));

    assert_eq!(snapshot(&ws_b), before_b, "user b's workspace changed");
    assert_eq!(
        snapshot(outside.path()),
        before_victim,
        "the host folder changed"
    );
    assert_eq!(std::fs::read("/etc/shadow").ok(), host_shadow);
    assert_eq!(
        std::fs::read(ws_b.join("secret.txt")).unwrap(),
        SECRET_B.as_bytes()
    );
    for name in ["escape.txt", "abs.txt", "pwned"] {
        assert!(!app.workspaces.join(name).exists(), "{name} escaped");
        assert!(!ws_b.join(name).exists(), "{name} landed in b's workspace");
    }
}

/// `..` in every spelling, NUL, absolute paths, over-long names: 400 `invalid_path` at the
/// edge, in the query and in JSON bodies alike; routes with encoded slashes are no routes.
#[tokio::test]
async fn dot_dot_nul_and_absolute_paths_are_refused() {
    let app = spawn_app().await;
    let u = "fsdots";
    app.init(u).await;
    let before = snapshot(&app.workspaces);
    let long = "a".repeat(256);
    let longer = "ab/".repeat(1400);
    for raw in [
        "..",
        "../x",
        "a/../../x",
        "a/..",
        "%2e%2e",
        "%2E%2E%2Fetc%2Fpasswd",
        ".%2e/x",
        "%2e./x",
        "a%2F..%2F..%2Fetc",
        "..%2F..%2F..%2Fetc%2Fshadow",
        "%2Fetc%2Fshadow",
        "/etc/shadow",
        "//etc",
        "a%00b",
        "%00",
        long.as_str(),
        longer.as_str(),
    ] {
        for (method, route) in [
            ("GET", "/sandbox/files"),
            ("GET", "/sandbox/files/stat"),
            ("GET", "/sandbox/files/archive"),
            ("PUT", "/sandbox/files"),
            ("PUT", "/sandbox/files/archive"),
            ("DELETE", "/sandbox/files"),
        ] {
            let body = (method == "PUT").then(|| b"x".to_vec());
            let (s, b) = call(&app, method, u, &format!("{route}?path={raw}"), body).await;
            assert_eq!(
                (s, code(&b).as_str()),
                (400, "invalid_path"),
                "{method} {route}?path={raw}"
            );
        }
    }
    for bad in [
        "..",
        "../x",
        "a/../../x",
        "/etc/passwd",
        "a\u{0}b",
        long.as_str(),
    ] {
        for (route, body) in [
            ("/sandbox/files/mkdir", json!({"path": bad})),
            ("/sandbox/files/move", json!({"from": bad, "to": "ok"})),
            ("/sandbox/files/move", json!({"from": "ok", "to": bad})),
        ] {
            let (s, v) = crate::files_api::json_call(&app, u, route, body).await;
            assert_eq!(
                (s, v["error"]["code"].as_str()),
                (400, Some("invalid_path")),
                "{route} {bad:?}"
            );
        }
    }
    // An encoded slash or dot in the route itself is no route.
    for route in [
        "/sandbox/files%2F..%2F..",
        "/sandbox/%2e%2e/files",
        "/sandbox/files/%2e%2e",
    ] {
        let (s, _) = call(&app, "GET", u, route, None).await;
        assert_eq!(s, 404, "{route}");
    }
    assert_eq!(snapshot(&app.workspaces), before, "something was written");
}

pub async fn json_call(app: &TestApp, user: &str, path: &str, body: Value) -> (u16, Value) {
    let r = app.post(user, path, body).await;
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

/// A .tar.gz with one small file.
fn tiny_tgz() -> Vec<u8> {
    python_tgz("f('hello.txt', b'hi')")
}

/// `../escape.txt`, `/abs.txt`, and a symlink `ln -> <b's host workspace>` then `ln/pwned`.
fn evil_tgz(ws_b: &std::path::Path) -> Vec<u8> {
    python_tgz(&format!(
        r#"f('../escape.txt', b'x'); f('../../escape.txt', b'x'); f('/abs.txt', b'x')
for n, target in [('ln', {host:?}), ('up', '../..'), ('etc', '/etc')]:
    i=tarfile.TarInfo(n); i.type=tarfile.SYMTYPE; i.linkname=target; t.addfile(i)
f('ln/pwned', b'x'); f('up/pwned', b'x'); f('etc/pwned', b'x')
i=tarfile.TarInfo('hard'); i.type=tarfile.LNKTYPE; i.linkname='/etc/shadow'; t.addfile(i)"#,
        host = ws_b.display().to_string()
    ))
}

/// A .tar.gz made by Python's tarfile, which takes names as given (`..` and `/` included):
/// `body` calls `f(name, bytes)` and uses `t`.
fn python_tgz(body: &str) -> Vec<u8> {
    let script = format!(
        "import io,sys,tarfile\nb=io.BytesIO()\nt=tarfile.open(fileobj=b,mode='w:gz')\n\
         def f(n, d):\n    i=tarfile.TarInfo(n); i.size=len(d); t.addfile(i, io.BytesIO(d))\n\
         {body}\nt.close()\nsys.stdout.buffer.write(b.getvalue())\n"
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}
