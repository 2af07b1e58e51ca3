//! sandboxd: one hardened Docker sandbox per user behind one Rust edge (API, terminal, preview).
//!
//! # Layout
//!
//! The modules in reading order, from the socket down to the engine and the store
//! (ARCHITECTURE.md has a paragraph on each and the rules between them):
//!
//! - `startup`, `config`: wiring in numbered steps; the validated configuration.
//! - `edge`: listener, TLS, framing check, Host router. Knows nothing of Docker or features.
//! - `app`, `access`: dispatch by Host and route; request ids and the access line.
//! - `api`, `terminal`, `preview`, `console`, `projects`: the features, each a struct owning
//!   what it needs.
//! - `operator`, `metrics`: the operator commands; Prometheus metrics.
//! - `http`, `auth`, `user`: the shared vocabulary (body, error envelope, tokens, `UserId`).
//! - `sandbox`: the only door to containers, keyed by `UserId`; the engine client is private.
//! - `store`: sessions and events, the only SQL.
//!
//! The features, `app`, `access`, `http` and `metrics` are private to the crate. The public
//! surface is what `main`, the integration tests and the bench use: `startup` (`build`,
//! `Running`), `config`, `auth`, `user`, `store`, `operator`, `sandbox` (the manager and a
//! `#[doc(hidden)]` testing façade), `edge::router` and the terminal's parsers (fuzzed), and
//! `api::OPENAPI`.

pub mod config;
pub mod startup;

pub mod edge;

pub(crate) mod access;
pub(crate) mod app;

pub mod api;
pub(crate) mod console;
pub(crate) mod preview;
pub(crate) mod projects;
pub mod terminal;

pub(crate) mod metrics;
pub mod operator;

pub mod auth;
pub(crate) mod http;
pub mod user;

pub mod sandbox;
pub mod store;
