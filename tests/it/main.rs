//! The integration tests against the real engine, as one test binary (one link step) with a
//! module per area. Its tests run side by side in one process: the few that must have the
//! machine to themselves hold `common::gate::alone()`, the others a shared guard (see
//! tests/common/gate.rs). The security suite stays a binary of its own (`cargo test --test
//! security`).

#[path = "../common/mod.rs"]
mod common;

mod api;
mod architecture;
mod boot_quota;
mod console;
mod engine_restart;
mod engine_sync;
mod files;
mod hardening;
mod init;
mod languages;
mod metrics;
mod operator;
mod preview;
mod replicas;
mod restart;
mod store;
mod terminal;
mod up;
