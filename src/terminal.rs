//! Terminal WebSocket (placeholder until the terminal lands).
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};

use crate::api::error::ApiError;
use crate::app::App;
use crate::edge::listener::ConnInfo;
use crate::http::Body;

pub async fn handle(
    _app: &Arc<App>,
    _req: Request<Incoming>,
    _conn: Arc<ConnInfo>,
) -> Response<Body> {
    ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        "not_implemented",
        "terminal not built yet",
    )
    .into_response()
}
