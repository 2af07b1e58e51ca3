//! Operator commands (`sandboxd ps`, `sandboxd events <user>`, `sandboxd stop <user>`): they
//! read and change the same store and engine as the server, directly, so they work whether or
//! not the server runs. Containers are found through this instance's labels and the store,
//! never by a string from the command line other than a validated user id.

use std::time::Duration;

use anyhow::{anyhow, bail, Context};

use crate::config::Config;
use crate::sandbox::inventory::{DockerState, Inventory, Managed};
use crate::store::{EventRow, Store};
use crate::user::UserId;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// The database URL without its password, for error messages.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}")
        }
        _ => url.to_owned(),
    }
}

/// Opens the server's store. A SQLite file that does not exist is an error here (the server
/// would create it; an operator command must not invent an empty store).
pub async fn open_store(cfg: &Config) -> anyhow::Result<Store> {
    let shown = redact_url(&cfg.database_url);
    if let Some(rest) = cfg.database_url.strip_prefix("sqlite:") {
        let path = rest.trim_start_matches("//");
        let path = path.split('?').next().unwrap_or_default();
        if path != ":memory:" && !std::path::Path::new(path).exists() {
            bail!("store unreachable ({shown}): no database file at {path}");
        }
    }
    // One direct connection first: a pool reports a refused connection only as a timeout.
    match tokio::time::timeout(CONNECT_TIMEOUT, Store::probe(&cfg.database_url)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => bail!("store unreachable ({shown}): {e:#}"),
        Err(_) => bail!("store unreachable ({shown}): no answer within 15s"),
    }
    match tokio::time::timeout(CONNECT_TIMEOUT, Store::connect(&cfg.database_url)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(e.context(format!("store unreachable ({shown})"))),
        Err(_) => Err(anyhow!("store unreachable ({shown}): no answer within 15s")),
    }
}

/// Connects to the engine the server uses (DOCKER_HOST, else the local socket; in swarm mode
/// the managers and every node's engine).
pub async fn open_inventory(cfg: &Config) -> anyhow::Result<Inventory> {
    if cfg.swarm.is_some() {
        return Inventory::connect_swarm(cfg).await;
    }
    Inventory::connect().await
}

/// One line of `sandboxd ps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PsRow {
    pub user: String,
    pub state: String,
    /// 12-character container id, or "-".
    pub container: String,
    /// Milliseconds since the epoch (UTC).
    pub created: i64,
    pub last_activity: Option<i64>,
    /// Bytes; `None` when the container is not live or the engine gave no figure.
    pub memory: Option<u64>,
}

fn state_name(s: DockerState) -> &'static str {
    match s {
        DockerState::Running => "running",
        DockerState::Paused => "paused",
        _ => "stopped",
    }
}

fn short(id: &str) -> String {
    id.chars().take(12).collect()
}

/// Every user the store or the engine knows for this instance, with the engine's state.
pub async fn ps(cfg: &Config, store: &Store, engine: &Inventory) -> anyhow::Result<Vec<PsRow>> {
    let sessions = store.sessions().await.context("store: reading sessions")?;
    let containers = engine
        .containers(&cfg.instance)
        .await
        .context("engine: listing containers")?;
    let mut rows = vec![];
    let mut live: Vec<(usize, &Managed)> = vec![];
    for s in &sessions {
        let c = s
            .container_id
            .as_deref()
            .and_then(|id| containers.iter().find(|m| m.id == id));
        let (state, container, created) = match (c, s.container_id.as_deref()) {
            (Some(m), _) => (state_name(m.state).to_owned(), short(&m.id), m.created),
            // The store names a container the engine does not have.
            (None, Some(id)) => ("missing".to_owned(), short(id), s.created_at),
            (None, None) => (s.state.clone(), "-".to_owned(), s.created_at),
        };
        if let Some(m) = c.filter(|m| matches!(m.state, DockerState::Running | DockerState::Paused))
        {
            live.push((rows.len(), m));
        }
        rows.push(PsRow {
            user: s.user_id.clone(),
            state,
            container,
            created,
            last_activity: Some(s.last_activity),
            memory: None,
        });
    }
    // Containers with this instance's labels that no session names (e.g. made while the
    // store was unreachable).
    for m in containers.iter().filter(|m| {
        !sessions
            .iter()
            .any(|s| s.container_id.as_deref() == Some(m.id.as_str()))
    }) {
        if matches!(m.state, DockerState::Running | DockerState::Paused) {
            live.push((rows.len(), m));
        }
        rows.push(PsRow {
            user: m.user.to_string(),
            state: state_name(m.state).to_owned(),
            container: short(&m.id),
            created: m.created,
            last_activity: None,
            memory: None,
        });
    }
    let mems = futures_util::future::join_all(
        live.iter()
            .map(|(_, m)| async move { engine.memory_in_use(m).await.ok().flatten() }),
    )
    .await;
    for ((i, _), mem) in live.iter().zip(mems) {
        rows[*i].memory = mem;
    }
    rows.sort_by(|a, b| a.user.cmp(&b.user).then(a.created.cmp(&b.created)));
    Ok(rows)
}

fn time_s(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%SZ").to_string())
        .unwrap_or_else(|| "-".into())
}

fn time_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_else(|| "-".into())
}

/// Bytes as `docker stats` shows them (binary units).
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b}B")
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

/// The `ps` table, one header line then one line per row, columns aligned.
pub fn render_ps(rows: &[PsRow]) -> String {
    let mut table = vec![[
        "USER".to_owned(),
        "STATE".to_owned(),
        "CONTAINER".to_owned(),
        "CREATED".to_owned(),
        "LAST ACTIVITY".to_owned(),
        "MEMORY".to_owned(),
    ]];
    for r in rows {
        table.push([
            r.user.clone(),
            r.state.clone(),
            r.container.clone(),
            time_s(r.created),
            r.last_activity.map(time_s).unwrap_or_else(|| "-".into()),
            r.memory.map(human_bytes).unwrap_or_else(|| "-".into()),
        ]);
    }
    let mut widths = [0usize; 6];
    for row in &table {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &table {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The user's events, oldest first (newest last), with UTC timestamps.
pub async fn events(store: &Store, user: &UserId, limit: i64) -> anyhow::Result<Vec<EventRow>> {
    let mut rows = store
        .events(user, limit)
        .await
        .context("store: reading events")?;
    rows.reverse();
    Ok(rows)
}

pub fn render_events(rows: &[EventRow]) -> String {
    let mut out = String::new();
    for e in rows {
        let cid = e.container_id.as_deref().map(short);
        let mut line = format!(
            "{}  {:<8}  {:<12}",
            time_ms(e.at),
            e.kind,
            cid.as_deref().unwrap_or("-")
        );
        if let Some(r) = e.reason.as_deref().filter(|r| !r.is_empty()) {
            // One event per line, whatever the reason holds.
            line.push_str("  ");
            line.push_str(&r.replace(['\n', '\r'], " "));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[derive(Debug, PartialEq, Eq)]
pub enum StopOutcome {
    Stopped(String),
    AlreadyStopped(String),
}

/// The user's container: the one the store names if the engine has it with this instance's
/// labels and this user, else the newest labelled one of the user.
fn pick<'a>(containers: &'a [Managed], user: &UserId, named: Option<&str>) -> Option<&'a Managed> {
    let mine: Vec<&Managed> = containers.iter().filter(|m| &m.user == user).collect();
    mine.iter()
        .find(|m| Some(m.id.as_str()) == named)
        .or_else(|| mine.iter().max_by_key(|m| m.created))
        .copied()
}

/// Stops the user's sandbox (the container stays for a wake, like the idle policy's stop) and
/// records the event. Safe beside a running server: the server checks the engine's state
/// before each transition and wakes a stopped sandbox on the next request.
pub async fn stop(
    cfg: &Config,
    store: &Store,
    engine: &Inventory,
    user: &UserId,
) -> anyhow::Result<StopOutcome> {
    let session = store
        .session(user)
        .await
        .context("store: reading the session")?;
    let containers = engine
        .containers(&cfg.instance)
        .await
        .context("engine: listing containers")?;
    let named = session.as_ref().and_then(|s| s.container_id.as_deref());
    let Some(c) = pick(&containers, user, named) else {
        bail!("user {user} has no sandbox");
    };
    if !matches!(c.state, DockerState::Running | DockerState::Paused) {
        return Ok(StopOutcome::AlreadyStopped(short(&c.id)));
    }
    engine.stop(c, cfg.stop_timeout.as_secs() as i64).await?;
    store
        .save_session(user, Some((&c.id, &c.name)), "stopped", None)
        .await
        .context("store: recording the state")?;
    store
        .add_event(
            user,
            Some(&c.id),
            "stopped",
            Some("operator: sandboxd stop"),
        )
        .await
        .context("store: recording the event")?;
    Ok(StopOutcome::Stopped(short(&c.id)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_password() {
        assert_eq!(
            redact_url("postgres://sandboxd:secret@127.0.0.1:5432/db"),
            "postgres://sandboxd:***@127.0.0.1:5432/db"
        );
        assert_eq!(redact_url("sqlite://data/x.db"), "sqlite://data/x.db");
        assert_eq!(
            redact_url("postgres://u@h/db"),
            "postgres://u@h/db",
            "no password, nothing to hide"
        );
    }

    #[test]
    fn ps_table_is_aligned() {
        let rows = vec![
            PsRow {
                user: "alice".into(),
                state: "running".into(),
                container: "0123456789ab".into(),
                created: 1_764_547_200_000,
                last_activity: Some(1_764_547_260_000),
                memory: Some(52_428_800),
            },
            PsRow {
                user: "b".into(),
                state: "removed".into(),
                container: "-".into(),
                created: 1_764_547_200_000,
                last_activity: None,
                memory: None,
            },
        ];
        let t = render_ps(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("USER   STATE    CONTAINER"), "{t}");
        assert_eq!(
            lines[1],
            "alice  running  0123456789ab  2025-12-01 00:00:00Z  2025-12-01 00:01:00Z  50.0MiB"
        );
        assert_eq!(
            lines[2],
            "b      removed  -             2025-12-01 00:00:00Z  -                     -"
        );
    }

    #[test]
    fn events_one_per_line() {
        let rows = vec![EventRow {
            id: 1,
            user_id: "alice".into(),
            container_id: Some("0123456789abcdef".into()),
            kind: "paused".into(),
            reason: Some("idle\nfor 5m".into()),
            at: 1_764_547_200_123,
        }];
        assert_eq!(
            render_events(&rows),
            "2025-12-01T00:00:00.123Z  paused    0123456789ab  idle for 5m\n"
        );
    }

    #[test]
    fn bytes() {
        assert_eq!(human_bytes(512), "512B");
        assert_eq!(human_bytes(1536), "1.5KiB");
        assert_eq!(human_bytes(3 << 30), "3.0GiB");
    }
}
