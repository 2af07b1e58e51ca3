//! The store: the truth about sessions and history. The only module that runs SQL.
//!
//! One code path serves SQLite and PostgreSQL through sqlx's `Any` driver: the queries use
//! `$N` placeholders (both dialects accept them) and plain types (TEXT, BIGINT). Times are UTC
//! milliseconds since the Unix epoch, so no time zone can creep in. The dialects differ only in
//! their migrations (`migrations/sqlite`, `migrations/postgres`).

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, Row};

use crate::user::UserId;

pub mod replicas;

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("migrations/postgres");

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRow {
    pub user_id: String,
    pub container_id: Option<String>,
    pub container_name: Option<String>,
    pub state: String,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub last_activity: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventRow {
    pub id: i64,
    pub user_id: String,
    pub container_id: Option<String>,
    pub kind: String,
    pub reason: Option<String>,
    pub at: i64,
}

/// Milliseconds since the Unix epoch, UTC.
///
/// Read straight from the system clock (no calendar maths: the preview's hot path calls this
/// for every request it records as activity). A clock set before 1970 reads as negative, as
/// chrono's `timestamp_millis` would.
pub fn now_ms() -> i64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64 * 1000 + i64::from(d.subsec_millis()),
        Err(e) => {
            let d = e.duration();
            -(d.as_secs() as i64 * 1000 + i64::from(d.subsec_millis()))
        }
    }
}

const SESSION_COLUMNS: &str =
    "user_id, container_id, container_name, state, created_at, started_at, last_activity";

impl Store {
    /// Connects (creating a SQLite file and its folder if needed) and runs the migrations.
    pub async fn connect(url: &str) -> anyhow::Result<Store> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else {
            Backend::Postgres
        };
        let mut url = url.to_owned();
        if backend == Backend::Sqlite {
            let path = url
                .trim_start_matches("sqlite://")
                .trim_start_matches("sqlite:");
            let path = path.split('?').next().unwrap_or_default();
            if path != ":memory:" && !path.is_empty() {
                if let Some(parent) = std::path::Path::new(path).parent() {
                    if !parent.as_os_str().is_empty() {
                        std::fs::create_dir_all(parent).with_context(|| {
                            format!("creating the database folder {}", parent.display())
                        })?;
                    }
                }
            }
            if !url.contains("mode=") {
                url.push_str(if url.contains('?') {
                    "&mode=rwc"
                } else {
                    "?mode=rwc"
                });
            }
        }
        let opts = AnyConnectOptions::from_str(&url).context("parsing database_url")?;
        let pool = AnyPoolOptions::new()
            .max_connections(if backend == Backend::Sqlite { 4 } else { 10 })
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL lets readers run beside the writer; busy_timeout makes writers
                        // wait for each other instead of failing with SQLITE_BUSY.
                        sqlx::query("PRAGMA journal_mode = WAL")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA busy_timeout = 10000")
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect_with(opts)
            .await
            .context("connecting to the database")?;
        let migrator = match backend {
            Backend::Sqlite => &SQLITE_MIGRATIONS,
            Backend::Postgres => &POSTGRES_MIGRATIONS,
        };
        migrator.run(&pool).await.context("running migrations")?;
        Ok(Store { pool, backend })
    }

    /// One direct connection to a PostgreSQL store, closed at once: reports why it cannot be
    /// reached (a pool reports a refused connection only as a timeout). SQLite: nothing to do.
    pub async fn probe(url: &str) -> anyhow::Result<()> {
        use sqlx::Connection;
        if url.starts_with("sqlite:") {
            return Ok(());
        }
        sqlx::any::install_default_drivers();
        let opts = AnyConnectOptions::from_str(url).context("parsing database_url")?;
        sqlx::AnyConnection::connect_with(&opts)
            .await?
            .close()
            .await?;
        Ok(())
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub async fn ping(&self) -> anyhow::Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    pub async fn session(&self, user: &UserId) -> anyhow::Result<Option<SessionRow>> {
        let sql = format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE user_id = $1");
        let row = sqlx::query(&sql)
            .bind(user.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| session_from_row(&r)).transpose()
    }

    pub async fn sessions(&self) -> anyhow::Result<Vec<SessionRow>> {
        let sql = format!("SELECT {SESSION_COLUMNS} FROM sessions ORDER BY user_id");
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        rows.iter().map(session_from_row).collect()
    }

    /// Records the user's container and state, creating the session on first use.
    pub async fn save_session(
        &self,
        user: &UserId,
        container: Option<(&str, &str)>,
        state: &str,
        started_at: Option<i64>,
    ) -> anyhow::Result<()> {
        let now = now_ms();
        let (cid, cname) = match container {
            Some((id, name)) => (Some(id), Some(name)),
            None => (None, None),
        };
        sqlx::query(
            "INSERT INTO sessions (user_id, container_id, container_name, state, created_at, \
             started_at, last_activity, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (user_id) DO UPDATE SET container_id = excluded.container_id, \
             container_name = excluded.container_name, state = excluded.state, \
             started_at = COALESCE(excluded.started_at, sessions.started_at), \
             updated_at = excluded.updated_at, reserved_at = NULL",
        )
        .bind(user.as_str())
        .bind(cid)
        .bind(cname)
        .bind(state)
        .bind(now)
        .bind(started_at)
        .bind(now)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Moves `last_activity` forward (never back).
    pub async fn touch(&self, user: &UserId, at: i64) -> anyhow::Result<()> {
        sqlx::query(
            "UPDATE sessions SET last_activity = $1 WHERE user_id = $2 AND last_activity < $3",
        )
        .bind(at)
        .bind(user.as_str())
        .bind(at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn add_event(
        &self,
        user: &UserId,
        container_id: Option<&str>,
        kind: &str,
        reason: Option<&str>,
    ) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO events (user_id, container_id, kind, reason, at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(user.as_str())
        .bind(container_id)
        .bind(kind)
        .bind(reason)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The user's newest events, newest first.
    pub async fn events(&self, user: &UserId, limit: i64) -> anyhow::Result<Vec<EventRow>> {
        let rows = sqlx::query(
            "SELECT id, user_id, container_id, kind, reason, at FROM events WHERE user_id = $1 \
             ORDER BY id DESC LIMIT $2",
        )
        .bind(user.as_str())
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(EventRow {
                    id: r.try_get("id")?,
                    user_id: r.try_get("user_id")?,
                    container_id: r.try_get("container_id")?,
                    kind: r.try_get("kind")?,
                    reason: r.try_get("reason")?,
                    at: r.try_get("at")?,
                })
            })
            .collect()
    }

    /// Swarm mode: the node that holds the user's workspace (`None`: none recorded yet).
    pub async fn session_node(&self, user: &UserId) -> anyhow::Result<Option<String>> {
        let row = sqlx::query("SELECT node FROM sessions WHERE user_id = $1")
            .bind(user.as_str())
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(r) => r.try_get("node")?,
            None => None,
        })
    }

    /// Swarm mode: records the node that holds the user's workspace, creating the session
    /// (state `removed` until the container is saved) on first use.
    pub async fn set_session_node(&self, user: &UserId, node: &str) -> anyhow::Result<()> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO sessions (user_id, state, created_at, last_activity, updated_at, node) \
             VALUES ($1, 'removed', $2, $3, $4, $5) \
             ON CONFLICT (user_id) DO UPDATE SET node = excluded.node",
        )
        .bind(user.as_str())
        .bind(now)
        .bind(now)
        .bind(now)
        .bind(node)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn count_sessions(&self) -> anyhow::Result<i64> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM sessions")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("n")?)
    }
}

fn session_from_row(r: &sqlx::any::AnyRow) -> anyhow::Result<SessionRow> {
    Ok(SessionRow {
        user_id: r.try_get("user_id")?,
        container_id: r.try_get("container_id")?,
        container_name: r.try_get("container_name")?,
        state: r.try_get("state")?,
        created_at: r.try_get("created_at")?,
        started_at: r.try_get("started_at")?,
        last_activity: r.try_get("last_activity")?,
    })
}

#[cfg(test)]
mod now_ms_tests {
    /// The cheap clock reads what chrono's UTC clock reads (milliseconds since the epoch), and
    /// successive reads do not go backwards (the idle policy compares them with activity).
    #[test]
    fn now_ms_is_the_epoch_clock_in_milliseconds() {
        let before = chrono::Utc::now().timestamp_millis();
        let mut last = super::now_ms();
        let after = chrono::Utc::now().timestamp_millis();
        assert!(
            before <= last && last <= after,
            "{before} <= {last} <= {after}"
        );
        for _ in 0..10_000 {
            let now = super::now_ms();
            assert!(now >= last, "{now} < {last}");
            last = now;
        }
    }
}
