//! `POST /sandbox/execute` in every language, through the in-sandbox agent: output and exit
//! codes, timeouts that kill a child tree, the output cap, OOM, fresh processes per run (no
//! global survives a run; users never share a runtime), modules from the workspace, and
//! recovery when the user kills the agent or puts something else on its port.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::{json, Value};

async fn run(app: &TestApp, user: &str, lang: &str, code: &str) -> Value {
    app.execute(user, json!({"code": code, "language": lang}))
        .await
}

/// `docker exec` as the sandbox user, as a terminal would do it.
fn docker_exec(cid: &str, detach: bool, argv: &[&str]) -> String {
    let mut c = Command::new("docker");
    c.args(["exec", "-u", "1000:1000"]);
    if detach {
        c.arg("-d");
    }
    let out = c.arg(cid).args(argv).output().expect("docker exec");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn every_language_prints_and_exits_with_its_code() {
    let app = spawn_app().await;
    app.init("lang1").await;
    let cases = [
        (
            "javascript",
            "console.log('out', 6 * 7); console.error('err'); process.exitCode = 3;",
        ),
        (
            "typescript",
            "const n: number = 6 * 7;\ninterface P { a: string }\nconst p: P = { a: 'out' };\nconsole.log(p.a, n); console.error('err'); process.exitCode = 3;",
        ),
        (
            "python",
            "import sys\nprint('out', 6 * 7)\nprint('err', file=sys.stderr)\nsys.exit(3)",
        ),
        ("bash", "echo out $((6 * 7)); echo err >&2; exit 3"),
    ];
    for (lang, code) in cases {
        let r = run(&app, "lang1", lang, code).await;
        assert_eq!(r["output"], "out 42\n", "{lang}: {r}");
        assert_eq!(r["error"], "err\n", "{lang}: {r}");
        assert_eq!(r["exitCode"], 3, "{lang}: {r}");
        assert_eq!(r["timedOut"], false, "{lang}: {r}");
        assert_eq!(r["truncated"], false, "{lang}: {r}");
        assert_eq!(r["oomKilled"], false, "{lang}: {r}");
    }
    // Python's main module and a TypeScript type error that is only a type error (stripped).
    let r = run(&app, "lang1", "python", "print(__name__)").await;
    assert_eq!(r["output"], "__main__\n", "{r}");
    let r = run(
        &app,
        "lang1",
        "typescript",
        "let s: number = 'x' as any; console.log(s)",
    )
    .await;
    assert_eq!(r["output"], "x\n", "{r}");
    // Code is bytes, never a shell string: quotes and `$(...)` reach bash as text.
    let r = run(&app, "lang1", "bash", "printf '%s\\n' \"it's \\$(id)\"").await;
    assert_eq!(r["output"], "it's $(id)\n", "{r}");
    // Unknown languages are refused before anything runs.
    let bad = app
        .post(
            "lang1",
            "/sandbox/execute",
            json!({"code": "1", "language": "ruby"}),
        )
        .await;
    assert_eq!(bad.status(), 422);
    let e: Value = bad.json().await.unwrap();
    assert_eq!(e["error"]["code"], "invalid_request");
}

#[tokio::test]
async fn a_timeout_kills_the_whole_child_tree_in_every_language() {
    let app = spawn_app().await;
    app.init("lang2").await;
    // Each run starts a tree that leaves its session and ignores SIGTERM, then waits.
    let tree = "trap '' TERM; setsid sleep 313 & sleep 314 & wait";
    let codes = [
        (
            "javascript",
            format!("require('child_process').spawn('bash', ['-c', {tree:?}], {{detached: true, stdio: 'ignore'}}); setInterval(() => {{}}, 1000);"),
        ),
        (
            "typescript",
            format!("const cp: any = require('child_process'); cp.spawn('bash', ['-c', {tree:?}], {{detached: true, stdio: 'ignore'}}); setInterval((): void => {{}}, 1000);"),
        ),
        (
            "python",
            format!("import subprocess, time\nsubprocess.Popen(['bash', '-c', {tree:?}], start_new_session=True)\ntime.sleep(100)"),
        ),
        ("bash", format!("bash -c {tree:?} & wait")),
    ];
    for (lang, code) in codes {
        let t = Instant::now();
        let r = app
            .execute(
                "lang2",
                json!({"code": code, "language": lang, "timeoutMs": 1500}),
            )
            .await;
        assert_eq!(r["timedOut"], true, "{lang}: {r}");
        assert!(r["exitCode"].is_null(), "{lang}: {r}");
        assert!(
            t.elapsed() < Duration::from_secs(8),
            "{lang}: {:?}",
            t.elapsed()
        );
        let left = run(&app, "lang2", "bash", "pgrep -fc 'sleep 31[34]' || true").await;
        assert_eq!(left["output"], "0\n", "{lang}: processes left: {left}");
    }
}

#[tokio::test]
async fn output_is_capped_in_every_language() {
    let app = spawn_app_with(|t| {
        t.insert("exec_max_output_bytes".into(), 2048.into());
    })
    .await;
    app.init("lang3").await;
    let codes = [
        (
            "javascript",
            "process.stdout.write('x'.repeat(100000)); console.log('done')",
        ),
        (
            "typescript",
            "const s: string = 'x'.repeat(100000); process.stdout.write(s);",
        ),
        ("python", "import sys\nsys.stdout.write('x' * 100000)"),
        ("bash", "head -c 100000 /dev/zero | tr '\\0' x"),
    ];
    for (lang, code) in codes {
        let r = run(&app, "lang3", lang, code).await;
        assert_eq!(r["truncated"], true, "{lang}: {r}");
        assert_eq!(r["output"].as_str().unwrap().len(), 2048, "{lang}");
        assert_eq!(r["exitCode"], 0, "{lang}: {r}");
    }
}

#[tokio::test]
async fn memory_bombs_are_oom_killed_in_every_language() {
    let app = spawn_app_with(|t| {
        t.insert("memory_mb".into(), 192.into());
    })
    .await;
    app.init("lang4").await;
    let codes = [
        (
            "javascript",
            "const a = []; for (;;) a.push(Buffer.alloc(8 << 20, 1));",
        ),
        (
            "typescript",
            "const a: Buffer[] = []; for (;;) a.push(Buffer.alloc(8 << 20, 1));",
        ),
        (
            "python",
            "a = []\nwhile True:\n    a.append(b'\\x01' * (8 << 20))",
        ),
        (
            "bash",
            "x=$(head -c 600000000 /dev/zero | tr '\\0' a); echo ${#x}",
        ),
    ];
    for (lang, code) in codes {
        let r = app
            .post(
                "lang4",
                "/sandbox/execute",
                json!({"code": code, "language": lang, "timeoutMs": 30000}),
            )
            .await;
        let status = r.status();
        let r: Value = r.json().await.unwrap();
        assert_eq!(status, 200, "{lang}: {r}");
        assert_eq!(r["oomKilled"], true, "{lang}: {r}");
        assert_eq!(r["timedOut"], false, "{lang}: {r}");
        assert_ne!(r["exitCode"], 0, "{lang}: {r}");
        // The sandbox (and its agent, restarted if the kernel took it) still works.
        let r = run(&app, "lang4", lang, alive(lang)).await;
        assert_eq!(r["output"], "alive\n", "{lang}: {r}");
        assert_eq!(r["oomKilled"], false, "{lang}: {r}");
    }
}

fn alive(lang: &str) -> &'static str {
    match lang {
        "python" => "print('alive')",
        "bash" => "echo alive",
        _ => "console.log('alive')",
    }
}

#[tokio::test]
async fn each_run_is_a_fresh_process_and_users_share_nothing() {
    let app = spawn_app().await;
    app.init("lang5a").await;
    app.init("lang5b").await;
    for _ in 0..2 {
        let r = run(
            &app,
            "lang5a",
            "javascript",
            "console.log(typeof globalThis.leak); globalThis.leak = 1; console.log(process.pid)",
        )
        .await;
        assert!(
            r["output"].as_str().unwrap().starts_with("undefined\n"),
            "{r}"
        );
        let r = run(
            &app,
            "lang5a",
            "typescript",
            "console.log(typeof (globalThis as any).leak); (globalThis as any).leak = 1;",
        )
        .await;
        assert_eq!(r["output"], "undefined\n", "{r}");
        let r = run(
            &app,
            "lang5a",
            "python",
            "import builtins\nprint(hasattr(builtins, 'leak'))\nbuiltins.leak = 1",
        )
        .await;
        assert_eq!(r["output"], "False\n", "{r}");
        let r = run(
            &app,
            "lang5a",
            "bash",
            "echo \"[${LEAK:-}]\"; export LEAK=1",
        )
        .await;
        assert_eq!(r["output"], "[]\n", "{r}");
    }
    // Each user's code runs in that user's sandbox: its own hostname and user.
    for user in ["lang5a", "lang5b"] {
        for lang in ["javascript", "python"] {
            let code = if lang == "python" {
                "import os, socket\nprint(os.environ['SANDBOXD_USER'], socket.gethostname())"
            } else {
                "console.log(process.env.SANDBOXD_USER, require('os').hostname())"
            };
            let r = run(&app, user, lang, code).await;
            let out = r["output"].as_str().unwrap();
            assert!(out.starts_with(&format!("{user} ")), "{user} {lang}: {r}");
        }
        // The key of the agent is not in the environment of executed code.
        let r = run(
            &app,
            user,
            "bash",
            "env | grep -c SANDBOXD_AGENT_KEY || true",
        )
        .await;
        assert_eq!(r["output"], "0\n", "{r}");
    }
}

#[tokio::test]
async fn modules_resolve_from_the_workspace() {
    let app = spawn_app().await;
    app.init("lang6").await;
    let r = run(
        &app,
        "lang6",
        "bash",
        "mkdir -p node_modules/answer && echo 'module.exports = 41;' > node_modules/answer/index.js && echo 'VALUE = 7' > mymod.py && mkdir -p pkg && : > pkg/__init__.py && echo 'X = 5' > pkg/sub.py",
    )
    .await;
    assert_eq!(r["exitCode"], 0, "{r}");
    let r = run(
        &app,
        "lang6",
        "javascript",
        "console.log(require('answer') + 1)",
    )
    .await;
    assert_eq!(r["output"], "42\n", "{r}");
    let r = run(
        &app,
        "lang6",
        "typescript",
        "import answer = require('answer');\nconst n: number = answer + 1;\nconsole.log(n);",
    )
    .await;
    assert_eq!(r["output"], "42\n", "{r}");
    let r = run(
        &app,
        "lang6",
        "python",
        "import mymod\nfrom pkg.sub import X\nprint(mymod.VALUE + X)",
    )
    .await;
    assert_eq!(r["output"], "12\n", "{r}");
}

/// Runs `print` in a loop until it answers 200 with the right output; every answer before must
/// be a 503 `agent_unavailable`, and each must come within `bound`.
async fn answers_again(app: &TestApp, user: &str, bound: Duration) {
    let t = Instant::now();
    loop {
        let one = Instant::now();
        let r = app
            .post(
                user,
                "/sandbox/execute",
                json!({"code": "print('back')", "language": "python"}),
            )
            .await;
        assert!(one.elapsed() < bound, "an answer took {:?}", one.elapsed());
        let status = r.status();
        let retry = r.headers().get("retry-after").cloned();
        let body: Value = r.json().await.unwrap();
        if status == 200 {
            assert_eq!(body["output"], "back\n", "{body}");
            return;
        }
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"]["code"], "agent_unavailable", "{body}");
        assert!(retry.is_some());
        assert!(t.elapsed() < bound * 3, "the agent did not come back");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn the_edge_recovers_when_the_user_kills_or_replaces_the_agent() {
    let app = spawn_app().await;
    let cid = app.init("lang7").await["containerId"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = run(&app, "lang7", "javascript", "console.log(1)").await;
    assert_eq!(r["output"], "1\n", "{r}");
    let bound = Duration::from_secs(15);

    // Killed (as from a terminal).
    docker_exec(&cid, false, &["pkill", "-KILL", "-x", "sandboxd-agent"]);
    answers_again(&app, "lang7", bound).await;

    // Killed from code run by the agent itself: that run may fail, then all works again.
    let r = app
        .post(
            "lang7",
            "/sandbox/execute",
            json!({"code": "pkill -KILL -x sandboxd-agent; sleep 1; echo after", "language": "bash"}),
        )
        .await;
    assert!(matches!(r.status().as_u16(), 200 | 503), "{}", r.status());
    answers_again(&app, "lang7", bound).await;

    // Replaced by a listener that accepts and says nothing, then by one that answers garbage.
    for reply in ["b''", "b'HTTP/1.1 200 OK\\r\\n\\r\\n{\"ok\": tru'"] {
        let squatter = format!(
            "import socket, time\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
             for _ in range(100):\n    try:\n        s.bind(('0.0.0.0', 49983)); break\n    except OSError:\n        time.sleep(0.05)\n\
             s.listen(64)\nheld = []\nwhile True:\n    c, _ = s.accept(); c.sendall({reply}); held.append(c)\n"
        );
        docker_exec(
            &cid,
            true,
            &[
                "bash",
                "-c",
                "pkill -KILL -x sandboxd-agent; exec python3 -c \"$1\"",
                "squat",
                &squatter,
            ],
        );
        // Wait until the squatter holds the port.
        let t = Instant::now();
        while !docker_exec(&cid, false, &["pgrep", "-f", "import socket"])
            .contains(char::is_numeric)
        {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the squatter did not start"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        answers_again(&app, "lang7", bound).await;
        let left = docker_exec(&cid, false, &["pgrep", "-fc", "import socket"]);
        assert_eq!(left.trim(), "0", "the squatter was removed");
    }
}
