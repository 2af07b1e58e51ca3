//! The main host's HTTP API: a matchit table from path to endpoint, then method checks,
//! authentication and the handlers in `sandbox.rs`. Every error leaves through `error.rs`.

pub mod auth;
pub mod error;
pub mod sandbox;

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;

use crate::app::App;
use crate::edge::listener::ConnInfo;
use crate::http::{full, Body};
use error::ApiError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Health,
    Init,
    Execute,
    Status,
    Exit,
    Events,
    Terminal,
    Projects,
    Job,
    PreviewLink,
    Console,
    ConsoleAsset,
}

/// Path → endpoint, with the methods each accepts.
pub struct Table(matchit::Router<(Endpoint, &'static [Method], &'static str)>);

impl Table {
    pub fn new() -> Table {
        let mut r = matchit::Router::new();
        let routes: &[(&str, Endpoint, &'static [Method], &'static str)] = &[
            (
                "/healthz",
                Endpoint::Health,
                &[Method::GET, Method::HEAD],
                "GET, HEAD",
            ),
            ("/sandbox/init", Endpoint::Init, &[Method::POST], "POST"),
            (
                "/sandbox/execute",
                Endpoint::Execute,
                &[Method::POST],
                "POST",
            ),
            ("/sandbox/status", Endpoint::Status, &[Method::GET], "GET"),
            ("/sandbox/exit", Endpoint::Exit, &[Method::POST], "POST"),
            ("/sandbox/events", Endpoint::Events, &[Method::GET], "GET"),
            (
                "/sandbox/terminal",
                Endpoint::Terminal,
                &[Method::GET],
                "GET",
            ),
            (
                "/sandbox/projects",
                Endpoint::Projects,
                &[Method::POST],
                "POST",
            ),
            ("/sandbox/jobs/{id}", Endpoint::Job, &[Method::GET], "GET"),
            (
                "/sandbox/preview-link",
                Endpoint::PreviewLink,
                &[Method::POST],
                "POST",
            ),
            (
                "/",
                Endpoint::Console,
                &[Method::GET, Method::HEAD],
                "GET, HEAD",
            ),
            (
                "/console/{file}",
                Endpoint::ConsoleAsset,
                &[Method::GET, Method::HEAD],
                "GET, HEAD",
            ),
        ];
        for (path, ep, methods, allow) in routes {
            r.insert(*path, (*ep, *methods, *allow))
                .expect("static routes do not overlap");
        }
        Table(r)
    }
}

impl Default for Table {
    fn default() -> Self {
        Self::new()
    }
}

pub async fn handle(app: &Arc<App>, req: Request<Incoming>, conn: Arc<ConnInfo>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let (endpoint, param) = match app.api.0.at(&path) {
        Ok(m) => {
            let (ep, methods, allow) = *m.value;
            if !methods.contains(req.method()) {
                return ApiError::method_not_allowed(allow).into_response();
            }
            (ep, m.params.get("id").map(str::to_owned))
        }
        Err(_) => return ApiError::not_found().into_response(),
    };
    let result = match endpoint {
        Endpoint::Health => sandbox::health(app).await,
        Endpoint::Terminal => return crate::terminal::handle(app, req, conn).await,
        Endpoint::Console | Endpoint::ConsoleAsset => {
            return crate::console::handle(app, &req, param.as_deref().or(Some(&path)))
        }
        _ => {
            let user = match app.auth.from_headers(req.headers()) {
                Ok(u) => u,
                Err(e) => return ApiError::unauthorized(e.to_string()).into_response(),
            };
            sandbox::dispatch(app, endpoint, &user, req, param, &conn).await
        }
    };
    result.unwrap_or_else(ApiError::into_response)
}

/// Reads a body up to `limit` bytes: 413 beyond (checked on Content-Length first, then while
/// reading, so a lying or chunked client cannot push more).
pub async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, ApiError> {
    if let Some(len) = req.headers().get(CONTENT_LENGTH) {
        let len: u64 = len
            .to_str()
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "invalid Content-Length",
                )
            })?;
        if len > limit as u64 {
            return Err(ApiError::too_large(limit));
        }
    }
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::too_large(limit)),
        Err(e) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("reading the body failed: {e}"),
        )),
    }
}

pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_matches() {
        let t = Table::new();
        assert_eq!(t.0.at("/sandbox/init").unwrap().value.0, Endpoint::Init);
        assert_eq!(
            t.0.at("/sandbox/jobs/abc").unwrap().params.get("id"),
            Some("abc")
        );
        assert!(t.0.at("/sandbox/nope").is_err());
        assert!(t.0.at("/sandbox/init/x").is_err());
    }
}
