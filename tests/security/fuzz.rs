//! Bounded fuzzing (proptest, a fixed number of cases, no files written) of the pure functions
//! that see client bytes first: the Host/SNI router and the terminal's control-message and
//! query parsers. They must never panic, and what they accept must be what they claim.

use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};

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

proptest! {
    #![proptest_config(config(10_000))]

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
