//! The security suite (README, "Security model"): the sandbox holds against hostile code and hostile clients. One test binary (one
//! link step) with a module per area; every test runs the real server against the real engine
//! and is written so that it fails when the protection it names is taken away (several carry a
//! positive control that shows the probe itself works).
//!
//! - `inside`: identity and privileges, read-only root, resources, execute limits (points 1-4)
//! - `net`: network isolation and the packet filter (point 5)
//! - `files`: planted symlinks and hardlinks (point 6)
//! - `files_api`: the files API against planted symlinks, `..`, NUL and absolute paths (point 6)
//! - `edge`: cross-user, auth, client-supplied limits, preview access, Host routing (7-11)
//! - `fuzz`: bounded property tests of the Host/SNI router and the terminal's parsers

#[path = "../common/mod.rs"]
mod common;

mod agent;
mod edge;
mod files;
mod files_api;
mod fuzz;
mod inside;
mod net;
mod support;
