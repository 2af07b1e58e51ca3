//! Which tests of one test binary may run at the same time. The integration tests share one
//! process (tests/it), where `cargo test` runs them side by side; most of them may share the
//! machine, a few may not: a browser aborts its requests when another test's server adds a
//! network interface, a memory or CPU measurement counts what the other tests do, a second
//! engine or `scripts/up` loads the machine and adds interfaces of its own. Those take
//! [`alone`]; every other test holds [`shared`] for as long as it runs (a [`TestApp`] holds
//! one), so an `alone` test waits until no other test runs and then runs by itself.
//!
//! The lock is fair: once an `alone` test waits, new shared guards wait behind it. So a test
//! holds one guard at a time; a second `TestApp` started while the first still lives would wait
//! for an `alone` test that waits for the first (no test of tests/it does that today; the
//! security suite, which starts two apps in a test, never takes `alone`).
//!
//! [`TestApp`]: super::TestApp

use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

static GATE: RwLock<()> = RwLock::const_new(());

/// Held by a test that may run beside others.
pub type Shared = RwLockReadGuard<'static, ()>;

/// Held by a test that runs by itself; it starts its servers with `spawn_app_alone`, since a
/// shared guard would wait for its own `Alone` for ever.
pub type Alone = RwLockWriteGuard<'static, ()>;

pub async fn shared() -> Shared {
    GATE.read().await
}

pub async fn alone() -> Alone {
    GATE.write().await
}
