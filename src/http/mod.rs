//! The HTTP vocabulary shared by the edge and every feature: the one body type, small response
//! helpers, the one error envelope ([`error::ApiError`]), bounded request bodies ([`body`]) and
//! the write queue of HTTP/1 messages ([`wire`]). Nothing here knows a route.

pub mod body;
pub mod error;
pub mod upgrade;
pub mod wire;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use serde::Serialize;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The one response body type of the edge: streaming, boxed.
pub type Body = BoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A JSON response with `status`.
pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}
