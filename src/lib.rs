pub mod edge;
pub mod http;
pub mod user;
