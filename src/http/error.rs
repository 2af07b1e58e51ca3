//! The one place that maps errors to HTTP: a status, a stable snake_case code, a message.
//! Server-side failures are logged here, once, with their cause chain.

use hyper::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Response, StatusCode};

use crate::http::{full, Body};
use crate::sandbox::SandboxError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<u32>,
    pub allow: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
            allow: None,
        }
    }
    pub fn retry_after(mut self, secs: u32) -> Self {
        self.retry_after = Some(secs);
        self
    }
    pub fn unauthorized(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", msg)
    }
    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "no such route")
    }
    pub fn method_not_allowed(allow: &'static str) -> Self {
        let mut e = Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("this route accepts {allow}"),
        );
        e.allow = Some(allow);
        e
    }
    pub fn bad_json(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_json", msg)
    }
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", msg)
    }
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request body is larger than {limit} bytes"),
        )
    }
    /// 503 while the container engine is unreachable or restarting (sandbox/health.rs).
    pub fn engine_unavailable(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "engine_unavailable", msg)
            .retry_after(crate::sandbox::health::RETRY_AFTER_SECS)
    }
    /// 503 in swarm mode while the node holding the user's sandbox is down or unreachable.
    pub fn node_unavailable(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "node_unavailable", msg)
            .retry_after(crate::sandbox::health::RETRY_AFTER_SECS)
    }
    /// 503 when the in-sandbox agent did not answer and restarting it did not help.
    pub fn agent_unavailable(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "agent_unavailable", msg).retry_after(2)
    }
    /// 503 for a request an edge thread handed to the main runtime after that runtime began
    /// to shut down (edge/percore.rs).
    pub fn shutting_down() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down",
        )
    }
    pub fn internal(err: &anyhow::Error) -> Self {
        tracing::error!(error = format!("{err:#}"), "request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the server log",
        )
    }

    pub fn into_response(self) -> Response<Body> {
        let body = serde_json::json!({"error": {"code": self.code, "message": self.message}});
        let mut resp = Response::new(full(body.to_string()));
        *resp.status_mut() = self.status;
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(s) = self.retry_after {
            h.insert(RETRY_AFTER, HeaderValue::from(s));
        }
        if let Some(a) = self.allow {
            h.insert(hyper::header::ALLOW, HeaderValue::from_static(a));
        }
        resp
    }
}

impl From<SandboxError> for ApiError {
    fn from(e: SandboxError) -> Self {
        match e {
            SandboxError::NotFound => {
                Self::new(StatusCode::NOT_FOUND, "sandbox_not_found", e.to_string())
            }
            SandboxError::CapacityFull(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "capacity_exhausted",
                e.to_string(),
            )
            .retry_after(10),
            SandboxError::TooManyExecutions(_) => Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_executions",
                e.to_string(),
            )
            .retry_after(1),
            SandboxError::ImageMissing(_) => {
                tracing::error!(error = %e, "sandbox image missing");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "image_missing",
                    e.to_string(),
                )
            }
            SandboxError::Workspace(_) => {
                tracing::error!(error = %e, "workspace unusable");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "workspace_unusable",
                    e.to_string(),
                )
            }
            SandboxError::EngineUnavailable(msg) => Self::engine_unavailable(msg),
            SandboxError::NodeUnavailable(msg) => Self::node_unavailable(msg),
            SandboxError::AgentUnavailable(_) => {
                tracing::warn!(error = %e, "sandbox agent unavailable");
                Self::agent_unavailable(e.to_string())
            }
            SandboxError::Internal(err) => Self::internal(&err),
        }
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        Self::internal(&e)
    }
}
