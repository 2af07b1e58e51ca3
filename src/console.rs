//! Web console (placeholder until the console lands).
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, Response};

use crate::api::error::ApiError;
use crate::app::App;
use crate::http::Body;

pub fn handle(_app: &Arc<App>, _req: &Request<Incoming>, _file: Option<&str>) -> Response<Body> {
    ApiError::not_found().into_response()
}
