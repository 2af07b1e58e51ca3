//! Bounded fuzzing (proptest, a fixed number of cases, no files written) of the pure functions
//! that see client bytes first: the Host/SNI router, the edge's HTTP/1.1 fast path (checked
//! against the framing check) and the terminal's control-message and query parsers. They must
//! never panic, and what they accept must be what they claim.

use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};

use sandboxd::edge::fast::{check as fast_check, Checked};
use sandboxd::edge::framing::Tracker;
use sandboxd::edge::router::{normalize_host, route, sni_matches_host, Route, RouterConfig};
use sandboxd::terminal::{parse_control, parse_query, Control, MAX_DIM};

fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Off)),
        ..Config::default()
    }
}

fn router() -> RouterConfig {
    RouterConfig {
        main_hosts: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
        preview_domain: "preview.example.test".into(),
        extra_ports: vec![3000, 8080],
    }
}

/// Host-like text: pieces of real preview hosts glued with separators and junk, so the
/// interesting branches (ports, brackets, dots, user ids) are hit often.
fn host_like() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("user-".to_owned()),
        Just("preview".to_owned()),
        Just("example".to_owned()),
        Just("test".to_owned()),
        Just("localhost".to_owned()),
        Just("3000-".to_owned()),
        Just("05173-".to_owned()),
        Just("[::1]".to_owned()),
        Just("127.0.0.1".to_owned()),
        "[a-zA-Z0-9]{1,12}",
        "[.:\\-\\[\\]@%_ #/?\\\\]{1,3}",
        "[\\x00-\\x7f]{1,4}",
        any::<char>().prop_map(|c| c.to_string()),
        "[0-9]{1,6}",
    ];
    prop::collection::vec(piece, 0..12).prop_map(|v| v.concat())
}

/// Request heads built from the pieces that matter to the fast path (methods, targets,
/// versions, line ends, framing, hop-by-hop and duplicate headers, folded lines, the framing
/// check's marker), then whatever follows them (a body, another request, junk).
fn head_like() -> impl Strategy<Value = Vec<u8>> {
    let method = prop_oneof![
        Just("GET"),
        Just("HEAD"),
        Just("POST"),
        Just("get"),
        Just("PRI"),
        Just("CONNECT"),
        Just("OPTIONS"),
    ];
    let target = prop_oneof![
        Just("/".to_owned()),
        Just("/a?b=1&c=%20".to_owned()),
        Just("http://user-1.preview.example.test/".to_owned()),
        Just("*".to_owned()),
        Just("/a#b".to_owned()),
        Just("//x".to_owned()),
        "/[ -~]{0,12}",
    ];
    let version = prop_oneof![
        Just("HTTP/1.1"),
        Just("HTTP/1.0"),
        Just("HTTP/2.0"),
        Just("HTTP/1.1 ")
    ];
    let eol = prop_oneof![Just("\r\n"), Just("\n"), Just("\r")];
    let field = prop_oneof![
        Just("Host: user-1.preview.example.test".to_owned()),
        Just("host: other".to_owned()),
        Just("Host:".to_owned()),
        Just("Content-Length: 0".to_owned()),
        Just("content-length:  5 ".to_owned()),
        Just("Content-Length: 5, 5".to_owned()),
        Just("Transfer-Encoding: chunked".to_owned()),
        Just("transfer-encoding: gzip, chunked".to_owned()),
        Just("Connection: keep-alive".to_owned()),
        Just("Connection: close".to_owned()),
        Just("Connection: Upgrade".to_owned()),
        Just("Upgrade: websocket".to_owned()),
        Just("Expect: 100-continue".to_owned()),
        Just("TE: trailers".to_owned()),
        Just("X-Sandboxd-Bad-Framing: 1".to_owned()),
        Just(" X-Folded: 2".to_owned()),
        Just("Content-Length : 3".to_owned()),
        "[a-zA-Z-]{1,10}: [ -~]{0,16}",
    ];
    let tail = prop_oneof![
        Just(String::new()),
        Just("abc".to_owned()),
        Just("GET / HTTP/1.1\r\nHost: user-1.preview.example.test\r\n\r\n".to_owned()),
        Just("0\r\n\r\n".to_owned()),
        "[ -~]{0,20}",
    ];
    (
        method,
        target,
        version,
        eol,
        prop::collection::vec(field, 0..8),
        tail,
    )
        .prop_map(|(m, t, v, eol, fields, tail)| {
            let mut head = format!("{m} {t} {v}{eol}");
            for f in fields {
                head.push_str(&f);
                head.push_str(eol);
            }
            head.push_str(eol);
            head.push_str(&tail);
            head.into_bytes()
        })
}

/// The header lines of a whole head (the request line and the empty line left out).
fn header_lines(head: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(head)
        .split('\n')
        .skip(1)
        .map(|l| l.trim_end_matches('\r').to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

/// What the fast path took from `raw`, checked against what it claims and against the framing
/// check: the same bytes pass that check unchanged (no marker, nothing held back).
fn check_fast(raw: &[u8]) -> Result<(), TestCaseError> {
    let taken = fast_check(raw, 16 * 1024, |h| {
        (h.method, h.host.to_vec(), h.target.to_owned())
    });
    let Checked::Fast(len, (method, host, target)) = taken else {
        return Ok(());
    };
    prop_assert!(len <= raw.len());
    prop_assert!(method == "GET" || method == "HEAD");
    let line = format!("{method} {target} HTTP/1.1");
    prop_assert!(raw.starts_with(line.as_bytes()));
    prop_assert!(target.starts_with('/') && !target.contains(['#', ' ', '"', '\\']));
    let lines = header_lines(&raw[..len]);
    let named = |name: &str| {
        lines
            .iter()
            .filter(|l| {
                l.split_once(':')
                    .is_some_and(|(n, _)| n.eq_ignore_ascii_case(name))
            })
            .count()
    };
    prop_assert_eq!(named("host"), 1, "{:?}", lines);
    prop_assert!(!host.is_empty());
    for refused in [
        "content-length",
        "transfer-encoding",
        "upgrade",
        "expect",
        "te",
        "x-sandboxd-bad-framing",
    ] {
        prop_assert_eq!(named(refused), 0, "{} in {:?}", refused, lines);
    }
    let mut tracker = Tracker::new(16 * 1024);
    let mut out = Vec::new();
    tracker.feed(&raw[..len], &mut out);
    prop_assert!(!tracker.blocked());
    prop_assert_eq!(
        &out[..],
        &raw[..len],
        "the framing check changed a fast head"
    );
    Ok(())
}

proptest! {
    #![proptest_config(config(10_000))]

    #[test]
    fn the_fast_path_takes_only_heads_the_framing_check_passes_unchanged(raw in head_like()) {
        check_fast(&raw)?;
        // Every prefix is a partial head, a refused one, or the same whole head.
        for cut in [raw.len() / 3, raw.len() / 2, raw.len().saturating_sub(1)] {
            check_fast(&raw[..cut])?;
        }
    }

    #[test]
    fn any_bytes_are_a_fast_head_a_partial_one_or_hyper_s(raw in prop::collection::vec(any::<u8>(), 0..200)) {
        check_fast(&raw)?;
    }

    #[test]
    fn normalize_host_is_total_and_idempotent(raw in host_like()) {
        if let Some(n) = normalize_host(&raw) {
            prop_assert!(n.is_ascii() && !n.is_empty());
            prop_assert_eq!(n.to_ascii_lowercase(), n.clone());
            prop_assert!(!n.contains(['@', '/', '?', '#', ' ', '[', ']', '%']), "{n}");
            prop_assert_eq!(normalize_host(&n), Some(n.clone()));
        }
    }

    #[test]
    fn route_is_total_and_sends_only_exact_preview_hosts_to_a_user(raw in host_like()) {
        let cfg = router();
        match route(&cfg, Some(&raw)) {
            Route::Preview { user, port } => {
                let n = normalize_host(&raw).expect("a routed host normalizes");
                let expected = if port == 5173 {
                    format!("user-{user}.preview.example.test")
                } else {
                    prop_assert!(cfg.extra_ports.contains(&port));
                    format!("{port}-user-{user}.preview.example.test")
                };
                prop_assert_eq!(n, expected);
            }
            Route::Main => {
                let n = normalize_host(&raw).unwrap();
                prop_assert!(["localhost", "127.0.0.1", "::1"].contains(&n.as_str()), "{n}");
            }
            Route::NotFound => {}
        }
        prop_assert_eq!(route(&cfg, None), Route::NotFound);
    }

    #[test]
    fn sni_matching_is_total_and_symmetric(a in host_like(), b in host_like()) {
        let m = sni_matches_host(&a, &b);
        prop_assert_eq!(m, sni_matches_host(&b, &a));
        if m {
            prop_assert_eq!(normalize_host(&a), normalize_host(&b));
        }
        prop_assert_eq!(sni_matches_host(&a, &a), normalize_host(&a).is_some());
    }

    #[test]
    fn any_text_is_a_control_message_or_an_error(text in "\\PC{0,200}") {
        check_control(&text)?;
    }

    #[test]
    fn json_shaped_control_messages_clamp_sizes(
        kind in prop_oneof![Just("resize"), Just("input"), Just("ping"), Just("x"), Just("")],
        cols in prop_oneof![
            any::<i64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|f| format!("{f:e}")),
            "[0-9]{1,400}",
            Just("\"80\"".to_owned()), Just("null".to_owned()), Just("[]".to_owned()),
            Just("1e400".to_owned()), Just("-0".to_owned()),
        ],
        rows in any::<i64>(),
        data in "\\PC{0,20}",
    ) {
        let text = format!(
            r#"{{"type":"{kind}","cols":{cols},"rows":{rows},"data":{}}}"#,
            serde_json::to_string(&data).unwrap()
        );
        check_control(&text)?;
    }

    #[test]
    fn terminal_queries_are_total_and_bounded(q in "[a-z=&%0-9A-F+./\\-]{0,120}") {
        if let Ok(parsed) = parse_query(Some(&q)) {
            prop_assert!((1..=MAX_DIM).contains(&parsed.size.cols));
            prop_assert!((1..=MAX_DIM).contains(&parsed.size.rows));
            prop_assert!(parsed.cwd == "/workspace" || parsed.cwd.starts_with("/workspace/"));
            prop_assert!(!parsed.cwd.split('/').any(|p| p == ".." || p == "."), "{}", parsed.cwd);
        }
    }
}

fn check_control(text: &str) -> Result<(), TestCaseError> {
    match parse_control(text) {
        Ok(Control::Resize(s)) => {
            prop_assert!((1..=MAX_DIM).contains(&s.cols) && (1..=MAX_DIM).contains(&s.rows));
        }
        Ok(_) => {}
        Err(msg) => prop_assert!(msg.len() < 512, "error messages stay short: {}", msg.len()),
    }
    Ok(())
}

/// The fuzzed property above is not empty: the fast path does take plain heads, whole, and
/// leaves a framed one to hyper's path.
#[test]
fn the_fast_path_takes_a_plain_head_and_leaves_a_framed_one() {
    let plain = b"GET /a HTTP/1.1\r\nHost: user-1.preview.example.test\r\n\r\nGET /b";
    let head_len = plain.len() - b"GET /b".len();
    assert_eq!(
        fast_check(plain, 16 * 1024, |h| h.target.to_owned()),
        Checked::Fast(head_len, "/a".to_owned())
    );
    check_fast(plain).unwrap();
    assert_eq!(
        fast_check(&plain[..20], 16 * 1024, |_| ()),
        Checked::Partial
    );
    let framed = b"GET /a HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n";
    assert_eq!(fast_check(framed, 16 * 1024, |_| ()), Checked::NotFast);
}
