//! The store's side of several replicas sharing one PostgreSQL database (the policy is
//! `sandbox/replicas.rs`): session-level advisory locks, each held by a connection of a
//! dedicated pool (a replica that dies loses its connections, and PostgreSQL releases their
//! locks at once), the leader's lock on a connection of its own, `LISTEN`/`NOTIFY` on one
//! channel through the postgres driver (sqlx's `Any` has no listener), and the capacity
//! queries over every replica's sessions. SQLite has one replica: none of this is used.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sha2::{Digest, Sha256};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions};
use sqlx::{Connection, Postgres, Row};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{Backend, Store};
use crate::user::UserId;

/// The one notification channel; payloads name the instance (see [`Change`]).
pub const CHANNEL: &str = "sandboxd_sessions";

/// Connections of one replica's lock pool: one per user lock held or waited for (at most
/// [`WAITERS`]), the listener's, and room for eviction's tries, which never wait for one.
const LOCK_CONNECTIONS: u32 = 24;
const WAITERS: usize = 18;
/// How long an eviction's try waits for a free connection before it passes.
const TRY_ACQUIRE: Duration = Duration::from_secs(1);

/// The advisory-lock key of `(instance, kind, name)`: the first 8 bytes of a SHA-256, so keys
/// of different instances or kinds sharing a database do not meet.
pub fn lock_key(instance: &str, kind: &str, name: &str) -> i64 {
    let mut h = Sha256::new();
    for part in [instance, kind, name] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    let d = h.finalize();
    i64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
}

/// A session change as announced to the other replicas: `instance \t replica \t user \t state`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub instance: String,
    pub replica: String,
    pub user: UserId,
    pub state: String,
}

impl Change {
    pub fn payload(&self) -> String {
        format!(
            "{}\t{}\t{}\t{}",
            self.instance, self.replica, self.user, self.state
        )
    }

    /// `None` for anything that is not a well-formed change (a stranger on the channel).
    pub fn parse(payload: &str) -> Option<Change> {
        let mut it = payload.splitn(4, '\t');
        let (instance, replica, user, state) = (it.next()?, it.next()?, it.next()?, it.next()?);
        Some(Change {
            instance: instance.to_owned(),
            replica: replica.to_owned(),
            user: UserId::parse(user).ok()?,
            state: state.to_owned(),
        })
    }
}

/// The dedicated connections of one replica.
pub struct Shared {
    pool: PgPool,
    opts: PgConnectOptions,
    /// Keeps waiting lockers below the pool's size, so a try (eviction) or the listener is
    /// never starved by holders that wait for it.
    waiters: Arc<Semaphore>,
    wait: Duration,
}

impl Shared {
    /// Connections are opened on demand; a lock wait gives up after `wait` (PostgreSQL's
    /// `lock_timeout`, so the server itself abandons the wait).
    pub fn new(url: &str, wait: Duration) -> anyhow::Result<Shared> {
        let opts = PgConnectOptions::from_str(url).context("parsing database_url")?;
        let ms = wait.as_millis().max(1) as u64;
        let pool = PgPoolOptions::new()
            .max_connections(LOCK_CONNECTIONS)
            .min_connections(0)
            .acquire_timeout(wait)
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    sqlx::query(&format!("SET lock_timeout = {ms}"))
                        .execute(&mut *conn)
                        .await?;
                    Ok(())
                })
            })
            .connect_lazy_with(opts.clone());
        Ok(Shared {
            pool,
            opts,
            waiters: Arc::new(Semaphore::new(WAITERS)),
            wait,
        })
    }

    /// Waits for the lock (bounded by `lock_timeout`); held until [`Held`] drops.
    pub async fn lock(&self, key: i64) -> anyhow::Result<Held> {
        self.lock_as(key, false).await
    }

    /// Waits for the lock in shared mode: any number of shared holders, no exclusive one.
    pub async fn lock_shared(&self, key: i64) -> anyhow::Result<Held> {
        self.lock_as(key, true).await
    }

    async fn lock_as(&self, key: i64, shared: bool) -> anyhow::Result<Held> {
        let permit = tokio::time::timeout(self.wait, self.waiters.clone().acquire_owned())
            .await
            .map_err(|_| anyhow::anyhow!("too many locks waited for at once"))?
            .expect("never closed");
        let mut conn = self.pool.acquire().await.context("a lock connection")?;
        let sql = if shared {
            "SELECT pg_advisory_lock_shared($1)"
        } else {
            "SELECT pg_advisory_lock($1)"
        };
        let r = sqlx::query(sql).bind(key).execute(&mut *conn).await;
        match r {
            Ok(_) => Ok(Held {
                conn: Some(conn),
                key,
                shared,
                _permit: Some(permit),
            }),
            Err(e) => {
                // Whatever state the wait left the connection in, it goes.
                drop(conn.detach());
                Err(anyhow::Error::new(e).context("waiting for another replica's lock"))
            }
        }
    }

    /// Takes the lock only if nobody holds it.
    pub async fn try_lock(&self, key: i64) -> anyhow::Result<Option<Held>> {
        let Ok(conn) = tokio::time::timeout(TRY_ACQUIRE, self.pool.acquire()).await else {
            return Ok(None);
        };
        let mut conn = conn.context("a lock connection")?;
        let got: bool = sqlx::query("SELECT pg_try_advisory_lock($1)")
            .bind(key)
            .fetch_one(&mut *conn)
            .await?
            .try_get(0)?;
        Ok(got.then_some(Held {
            conn: Some(conn),
            key,
            shared: false,
            _permit: None,
        }))
    }

    /// A connection of its own, outside the pool (the leader's lock lives as long as it).
    pub async fn connection(&self) -> anyhow::Result<PgConnection> {
        Ok(PgConnection::connect_with(&self.opts).await?)
    }

    /// Listens on [`CHANNEL`].
    pub async fn listener(&self) -> anyhow::Result<PgListener> {
        let mut l = PgListener::connect_with(&self.pool).await?;
        l.listen(CHANNEL).await?;
        Ok(l)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// A connection holding the shared lock `key` for as long as it lives: a replica's "I run".
pub struct Alive {
    conn: PgConnection,
    key: i64,
}

impl Shared {
    /// Takes the shared lock `key` on a connection of its own, waiting (at most `lock_timeout`)
    /// while an exiting replica holds it exclusively.
    pub async fn join(&self, key: i64) -> anyhow::Result<Alive> {
        let mut conn = self.connection().await?;
        sqlx::query(&format!(
            "SET lock_timeout = {}",
            self.wait.as_millis().max(1)
        ))
        .execute(&mut conn)
        .await?;
        sqlx::query("SELECT pg_advisory_lock_shared($1)")
            .bind(key)
            .execute(&mut conn)
            .await?;
        Ok(Alive { conn, key })
    }
}

impl Alive {
    /// Whether the connection (and so the hold) is still there.
    pub async fn holds(&mut self) -> bool {
        matches!(
            tokio::time::timeout(Duration::from_secs(2), alive(&mut self.conn)).await,
            Ok(Ok(()))
        )
    }

    /// Gives up the shared hold and takes the lock exclusively if nobody else holds it: true
    /// when this was the last holder (the lock is then held until this drops).
    pub async fn last_holder(&mut self) -> anyhow::Result<bool> {
        sqlx::query("SELECT pg_advisory_unlock_shared($1)")
            .bind(self.key)
            .execute(&mut self.conn)
            .await?;
        try_hold(&mut self.conn, self.key).await
    }
}

/// Tries the session-level lock `key` on `conn`: true when this connection holds it (again).
pub async fn try_hold(conn: &mut PgConnection, key: i64) -> anyhow::Result<bool> {
    Ok(sqlx::query("SELECT pg_try_advisory_lock($1)")
        .bind(key)
        .fetch_one(&mut *conn)
        .await?
        .try_get(0)?)
}

/// Whether the connection still answers.
pub async fn alive(conn: &mut PgConnection) -> anyhow::Result<()> {
    sqlx::query("SELECT 1").execute(&mut *conn).await?;
    Ok(())
}

/// A held advisory lock. Dropping it unlocks (in a task) and gives the connection back; when
/// that fails the connection is closed, which releases the lock too.
pub struct Held {
    conn: Option<PoolConnection<Postgres>>,
    key: i64,
    shared: bool,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Drop for Held {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        let key = self.key;
        let sql = if self.shared {
            "SELECT pg_advisory_unlock_shared($1)"
        } else {
            "SELECT pg_advisory_unlock($1)"
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    let unlock = sqlx::query(sql).bind(key).execute(&mut *conn);
                    if !matches!(
                        tokio::time::timeout(Duration::from_secs(5), unlock).await,
                        Ok(Ok(_))
                    ) {
                        drop(conn.detach());
                    }
                });
            }
            Err(_) => drop(conn.detach()),
        }
    }
}

/// A user another replica may evict: paused, least recently active first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Paused {
    pub user_id: String,
    pub last_activity: i64,
}

impl Store {
    /// Under the transaction-level advisory lock `key` (released at commit, or when the
    /// connection dies): counts every replica's live sandboxes but the user's (running or
    /// paused, or reserved after `reserved_after`) and, below `max`, reserves the user's slot
    /// (cleared by the next save). True when reserved.
    pub async fn reserve_under_cap(
        &self,
        key: i64,
        user: &UserId,
        max: i64,
        reserved_after: i64,
    ) -> anyhow::Result<bool> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(key)
            .execute(&mut *tx)
            .await?;
        let live: i64 = sqlx::query(
            "SELECT COUNT(*) AS n FROM sessions WHERE user_id <> $1 AND \
             ((container_id IS NOT NULL AND state IN ('running', 'paused')) OR reserved_at > $2)",
        )
        .bind(user.as_str())
        .bind(reserved_after)
        .fetch_one(&mut *tx)
        .await?
        .try_get("n")?;
        if live >= max {
            tx.rollback().await?;
            return Ok(false);
        }
        let at = super::now_ms();
        sqlx::query(
            "INSERT INTO sessions (user_id, container_id, container_name, state, created_at, \
             started_at, last_activity, updated_at, reserved_at) \
             VALUES ($1, NULL, NULL, 'removed', $2, NULL, $3, $4, $5) \
             ON CONFLICT (user_id) DO UPDATE SET reserved_at = excluded.reserved_at",
        )
        .bind(user.as_str())
        .bind(at)
        .bind(at)
        .bind(at)
        .bind(at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// When the user's slot under the cap was reserved and not yet saved (a create or start
    /// under way, or one whose replica died).
    pub async fn reserved_at(&self, user: &UserId) -> anyhow::Result<Option<i64>> {
        let row = sqlx::query("SELECT reserved_at FROM sessions WHERE user_id = $1")
            .bind(user.as_str())
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(r) => r.try_get("reserved_at")?,
            None => None,
        })
    }

    /// Gives up the user's reservation (a create or start that failed).
    pub async fn unreserve(&self, user: &UserId) -> anyhow::Result<()> {
        sqlx::query("UPDATE sessions SET reserved_at = NULL WHERE user_id = $1")
            .bind(user.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Live sandboxes (running or paused) of every replica.
    pub async fn count_live(&self) -> anyhow::Result<i64> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM sessions WHERE container_id IS NOT NULL AND \
             state IN ('running', 'paused')",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("n")?)
    }

    /// Paused sandboxes of other users, least recently active first (eviction's candidates).
    pub async fn paused_except(&self, user: &UserId, limit: i64) -> anyhow::Result<Vec<Paused>> {
        let rows = sqlx::query(
            "SELECT user_id, last_activity FROM sessions WHERE user_id <> $1 AND \
             container_id IS NOT NULL AND state = 'paused' ORDER BY last_activity LIMIT $2",
        )
        .bind(user.as_str())
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Paused {
                    user_id: r.try_get("user_id")?,
                    last_activity: r.try_get("last_activity")?,
                })
            })
            .collect()
    }

    /// Tells the other replicas (PostgreSQL `NOTIFY`; nothing to tell with SQLite).
    pub async fn notify(&self, change: &Change) -> anyhow::Result<()> {
        if self.backend != Backend::Postgres {
            return Ok(());
        }
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(change.payload())
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_keys_differ_by_instance_kind_and_name() {
        let k = lock_key("a", "user", "1");
        assert_eq!(k, lock_key("a", "user", "1"));
        assert_ne!(k, lock_key("b", "user", "1"));
        assert_ne!(k, lock_key("a", "leader", "1"));
        assert_ne!(k, lock_key("a", "user", "2"));
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(lock_key("ab", "c", ""), lock_key("a", "bc", ""));
    }

    #[test]
    fn changes_round_trip_and_strangers_are_refused() {
        let c = Change {
            instance: "sbx".into(),
            replica: "r1".into(),
            user: UserId::parse("42").unwrap(),
            state: "paused".into(),
        };
        assert_eq!(Change::parse(&c.payload()), Some(c));
        assert_eq!(Change::parse("hello"), None);
        assert_eq!(Change::parse("sbx\tr1\t../x\tpaused"), None);
    }
}
