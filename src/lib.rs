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

pub mod config;
pub mod startup;

pub mod edge;

pub mod access;
pub mod app;

pub mod api;
pub mod console;
pub mod preview;
pub mod projects;
pub mod terminal;

pub mod metrics;
pub mod operator;

pub mod auth;
pub mod http;
pub mod user;

pub mod sandbox;
pub mod store;
