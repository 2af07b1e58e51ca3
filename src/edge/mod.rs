//! The edge: everything between a TCP socket and a routed HTTP request.
//!
//! - `listener` accepts connections (plain or TLS), applies the transport limits and serves
//!   HTTP/1.1 and HTTP/2 (with upgrades) to a [`listener::Handler`];
//! - `tls` owns the certificates: loading, SNI resolution, development certs and reload;
//! - `router` maps a Host header to a [`router::Route`], as a pure function.
//!
//! Nothing here knows about Docker, the store or the API: those sit behind the `Handler`.

pub mod listener;
pub mod router;
pub mod tls;
