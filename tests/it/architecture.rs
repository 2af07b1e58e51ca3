//! The architecture's invariants that can be read off the source, checked (ARCHITECTURE.md,
//! "Invariants"): a change that breaks one fails here with the file and line, instead of living
//! on by convention. Pure file reads, no engine or database.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file under `dir` (relative to the repository root), sorted.
fn rust_files(dir: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|x| x == "rs") {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&root().join(dir), &mut out);
    assert!(!out.is_empty(), "no Rust files under {dir}");
    out
}

fn rel(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap_or(path)
        .to_string_lossy()
        .into_owned()
}

/// The code lines of a file (line comments and doc comments left out, so that prose may name
/// what the code must not use).
fn code_lines(path: &Path) -> Vec<(usize, String)> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim_start().starts_with("//"))
        .map(|(i, l)| (i + 1, l.to_owned()))
        .collect()
}

/// Every code line under `dir` that mentions `needle`, outside the files `allowed` (paths
/// relative to the repository root, or folder prefixes ending in `/`).
fn offenders(dir: &str, needle: &str, allowed: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for file in rust_files(dir) {
        let name = rel(&file);
        if allowed
            .iter()
            .any(|a| name == *a || (a.ends_with('/') && name.starts_with(a)))
        {
            continue;
        }
        for (n, line) in code_lines(&file) {
            if line.contains(needle) {
                found.push(format!("{name}:{n}: {}", line.trim()));
            }
        }
    }
    found
}

/// Whether `line` holds `name` as a whole identifier.
fn has_identifier(line: &str, name: &str) -> bool {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    line.match_indices(name).any(|(i, _)| {
        let before = line[..i].chars().next_back();
        let after = line[i + name.len()..].chars().next();
        !before.is_some_and(ident) && !after.is_some_and(ident)
    })
}

#[test]
fn only_the_engine_module_uses_bollard() {
    let found = offenders(
        "src",
        "bollard",
        &["src/sandbox/docker.rs", "src/sandbox/spec.rs"],
    );
    assert!(
        found.is_empty(),
        "bollard outside sandbox/docker.rs and spec.rs:\n{}",
        found.join("\n")
    );
}

#[test]
fn only_the_store_runs_sql() {
    let found = offenders("src", "sqlx", &["src/store/"]);
    assert!(
        found.is_empty(),
        "sqlx outside store/:\n{}",
        found.join("\n")
    );
}

#[test]
fn no_engine_handle_outside_the_sandbox_layer() {
    let mut found = offenders("src", "docker::", &["src/sandbox/"]);
    found.extend(offenders("src", ".engine()", &["src/sandbox/"]));
    // The engine client's types by name (base64's `Engine` trait is another thing).
    for name in ["Engine", "EngineError", "ExecSpec", "ExecInfo"] {
        found.extend(
            offenders("src", name, &["src/sandbox/"])
                .into_iter()
                .filter(|line| has_identifier(line, name) && !line.contains("base64::Engine")),
        );
    }
    // The testing façade re-exports the engine client for the bench and tests only.
    found.extend(offenders("src", "sandbox::testing", &[]));
    assert!(
        found.is_empty(),
        "the engine reached outside sandbox/:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_edge_knows_nothing_of_docker_the_store_or_the_features() {
    let mut found = Vec::new();
    for needle in [
        "crate::sandbox",
        "crate::store",
        "bollard",
        "sqlx",
        "crate::api",
        "crate::app",
        "crate::preview",
        "crate::terminal",
        "crate::console",
    ] {
        found.extend(offenders("src/edge", needle, &[]));
    }
    assert!(
        found.is_empty(),
        "edge/ reaches up or into Docker/SQL:\n{}",
        found.join("\n")
    );
}

#[test]
fn no_feature_imports_the_app() {
    let found = offenders("src", "crate::app", &["src/startup.rs", "src/app.rs"]);
    assert!(
        found.is_empty(),
        "a module imports app.rs:\n{}",
        found.join("\n")
    );
}

#[test]
fn no_bash_program_lives_in_a_rust_string() {
    // The programs run in a sandbox are files under src/sandbox/scripts/ (shellchecked by
    // scripts/test); Rust code names them through `sandbox::shell::Script`.
    let found = offenders("src", "\"-c\"", &["src/sandbox/shell.rs"]);
    assert!(
        found.is_empty(),
        "bash -c outside sandbox/shell.rs:\n{}",
        found.join("\n")
    );
}

#[test]
fn every_module_says_what_it_is() {
    let missing: Vec<String> = rust_files("src")
        .into_iter()
        .filter(|f| {
            !std::fs::read_to_string(f)
                .unwrap()
                .trim_start()
                .starts_with("//!")
        })
        .map(|f| rel(&f))
        .collect();
    assert!(
        missing.is_empty(),
        "modules without a //! doc:\n{}",
        missing.join("\n")
    );
}

#[test]
fn the_code_map_names_every_module() {
    let doc = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    let mut missing = Vec::new();
    for entry in std::fs::read_dir(root().join("src")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let shown = if path.is_dir() {
            format!("`src/{name}/`")
        } else {
            format!("`src/{name}`")
        };
        if !doc.contains(&shown) {
            missing.push(shown);
        }
    }
    missing.sort();
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md's code map misses: {}",
        missing.join(", ")
    );
    // And it names nothing that is gone.
    let mut stale = Vec::new();
    for piece in doc.split('`').skip(1).step_by(2) {
        if let Some(path) = piece.strip_prefix("src/") {
            let path = path.trim_end_matches('/');
            if !path.contains(['*', '{', ' ']) && !root().join("src").join(path).exists() {
                stale.push(format!("src/{path}"));
            }
        }
    }
    assert!(
        stale.is_empty(),
        "ARCHITECTURE.md names paths that do not exist: {}",
        stale.join(", ")
    );
}

#[test]
fn code_and_docs_point_to_sections_not_to_tracker_numbers() {
    let mut found = Vec::new();
    let mut files: Vec<PathBuf> = ["src", "tests", "bench/src"]
        .iter()
        .flat_map(|d| rust_files(d))
        .collect();
    for f in [
        "README.md",
        "ARCHITECTURE.md",
        "bench/README.md",
        "Cargo.toml",
        "bench/run",
    ] {
        files.push(root().join(f));
    }
    let pattern = ["issue ", "Issue ", "issues "];
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for (n, line) in text.lines().enumerate() {
            for p in pattern {
                if let Some(i) = line.find(p) {
                    let rest = &line[i + p.len()..];
                    if rest.starts_with(|c: char| c.is_ascii_digit()) {
                        found.push(format!("{}:{}: {}", rel(&file), n + 1, line.trim()));
                    }
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "tracker numbers instead of README sections:\n{}",
        found.join("\n")
    );
}
