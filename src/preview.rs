//! Preview proxy (placeholder until the preview lands).
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};

use crate::api::error::ApiError;
use crate::app::App;
use crate::config::Config;
use crate::edge::listener::ConnInfo;
use crate::http::Body;
use crate::user::UserId;

pub struct Proxy;

impl Proxy {
    pub fn new(_cfg: &Config) -> Proxy {
        Proxy
    }
}

pub async fn handle(
    _app: &Arc<App>,
    _req: Request<Incoming>,
    _conn: Arc<ConnInfo>,
    _user: UserId,
    _port: u16,
) -> Response<Body> {
    ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        "not_implemented",
        "preview not built yet",
    )
    .into_response()
}

pub async fn link(_app: &Arc<App>, _user: &UserId) -> Result<Response<Body>, ApiError> {
    Err(ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        "not_implemented",
        "preview not built yet",
    ))
}
