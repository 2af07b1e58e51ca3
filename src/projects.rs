//! Project templates (placeholder until the templates API lands).
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};

use crate::api::error::ApiError;
use crate::app::App;
use crate::http::Body;
use crate::user::UserId;

#[derive(Default)]
pub struct Jobs;

pub async fn create(
    _app: &Arc<App>,
    _user: &UserId,
    _req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    Err(ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        "not_implemented",
        "templates not built yet",
    ))
}

pub async fn job(_app: &Arc<App>, _user: &UserId, _id: &str) -> Result<Response<Body>, ApiError> {
    Err(ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        "not_implemented",
        "templates not built yet",
    ))
}
