pub mod http;
pub mod user;
