//! Handlers of the sandbox API. DTOs (the JSON shapes) live here, at the edge.

use std::time::Duration;

use base64::Engine as _;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::{Deserialize, Serialize};

use super::Api;
use crate::edge::listener::ConnInfo;
use crate::http::body::{parse_json, read_body};
use crate::http::error::ApiError;
use crate::http::json;
use crate::http::Body;
use crate::sandbox::exec::{ExecRequest, ExecResult, Language};
use crate::sandbox::{Manager, Sandbox};
use crate::user::UserId;

type Result<T> = std::result::Result<T, ApiError>;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct InitResponse {
    container_id: String,
    user_id: String,
    state: &'static str,
    preview_url: String,
    /// `public` or `owner` (then open the preview through `POST /sandbox/preview-link`).
    preview_access: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusResponse {
    container_id: String,
    user_id: String,
    state: &'static str,
    created_at: String,
    last_activity: String,
    preview_url: String,
    preview_access: &'static str,
    limits: LimitsDto,
    /// Swarm mode: the hostname of the node that holds the sandbox (absent on one host).
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LimitsDto {
    memory_bytes: i64,
    cpus: f64,
    pids: i64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ExecuteResponse {
    output: String,
    error: String,
    exit_code: Option<i64>,
    timed_out: bool,
    truncated: bool,
    oom_killed: bool,
    duration_ms: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EventDto {
    kind: String,
    reason: Option<String>,
    container_id: Option<String>,
    at: String,
}

pub(super) fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// `GET /healthz`: 200 when the engine and the store answer; 503 naming what does not. While
/// the health tracker knows the engine is down it answers at once, without asking it.
pub(super) async fn health(mgr: &Manager) -> Result<Response<Body>> {
    use crate::sandbox::health::{PING_TIMEOUT, RETRY_AFTER_SECS};
    let tracker = mgr.health_tracker();
    let engine = if tracker.is_up() {
        match tokio::time::timeout(PING_TIMEOUT, mgr.engine_ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                tracker.note_error(&e).await;
                Err(format!(
                    "the container engine (Docker) is unavailable: {e:#}"
                ))
            }
            Err(_) => Err(format!(
                "the container engine (Docker) did not answer within {PING_TIMEOUT:?}"
            )),
        }
    } else {
        Err(tracker.down_message())
    };
    let store = match tokio::time::timeout(Duration::from_secs(1), mgr.store().ping()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("the store is unavailable: {e:#}")),
        Err(_) => Err("the store did not answer within 1s".to_owned()),
    };
    let word = |r: &std::result::Result<(), String>| if r.is_ok() { "ok" } else { "unavailable" };
    if engine.is_ok() && store.is_ok() {
        return Ok(json(
            StatusCode::OK,
            &serde_json::json!({"status": "ok", "engine": "ok", "store": "ok"}),
        ));
    }
    let (code, message) = match (&engine, &store) {
        (Err(m), _) => ("engine_unavailable", m.clone()),
        (_, Err(m)) => ("store_unavailable", m.clone()),
        _ => unreachable!("one of them failed"),
    };
    tracing::warn!(error = %message, "health check failed");
    let mut resp = json(
        StatusCode::SERVICE_UNAVAILABLE,
        &serde_json::json!({
            "status": "unavailable",
            "engine": word(&engine),
            "store": word(&store),
            "error": {"code": code, "message": message},
        }),
    );
    resp.headers_mut().insert(
        hyper::header::RETRY_AFTER,
        hyper::header::HeaderValue::from(RETRY_AFTER_SECS),
    );
    Ok(resp)
}

fn init_response(api: &Api, sb: &Sandbox, conn: &ConnInfo) -> InitResponse {
    InitResponse {
        container_id: sb.container_id.clone(),
        user_id: sb.user.to_string(),
        state: sb.state.as_str(),
        preview_url: crate::preview::url(&api.cfg, &sb.user, conn),
        preview_access: api.cfg.preview_access.as_str(),
    }
}

pub(super) async fn init(api: &Api, user: &UserId, conn: &ConnInfo) -> Result<Response<Body>> {
    let sb = api.mgr.ensure_running(user).await?;
    Ok(json(StatusCode::OK, &init_response(api, &sb, conn)))
}

pub(super) async fn status(api: &Api, user: &UserId, conn: &ConnInfo) -> Result<Response<Body>> {
    let sb = api.mgr.status(user).await?;
    let l = &api.cfg.limits;
    Ok(json(
        StatusCode::OK,
        &StatusResponse {
            container_id: sb.container_id.clone(),
            user_id: user.to_string(),
            state: sb.state.as_str(),
            created_at: rfc3339(sb.created_at),
            last_activity: rfc3339(sb.last_activity),
            preview_url: crate::preview::url(&api.cfg, user, conn),
            preview_access: api.cfg.preview_access.as_str(),
            node: sb.node.clone(),
            limits: LimitsDto {
                memory_bytes: l.memory_bytes,
                cpus: l.nano_cpus as f64 / 1e9,
                pids: l.pids,
            },
        },
    ))
}

pub(super) async fn exit(api: &Api, user: &UserId) -> Result<Response<Body>> {
    let removed = api.mgr.exit(user).await?;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"userId": user.as_str(), "removed": removed, "state": "removed"}),
    ))
}

pub(super) async fn events(api: &Api, user: &UserId) -> Result<Response<Body>> {
    let rows = api.mgr.store().events(user, 100).await?;
    let list: Vec<EventDto> = rows
        .into_iter()
        .map(|e| EventDto {
            kind: e.kind,
            reason: e.reason,
            container_id: e.container_id,
            at: rfc3339(e.at),
        })
        .collect();
    Ok(json(StatusCode::OK, &serde_json::json!({ "events": list })))
}

/// The wire shape of `POST /sandbox/execute`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ExecuteBody {
    code: String,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    encoding: Encoding,
    /// `javascript` (default), `typescript`, `python` or `bash`.
    #[serde(default)]
    language: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
enum Encoding {
    #[default]
    #[serde(rename = "utf8", alias = "utf-8")]
    Utf8,
    #[serde(rename = "base64")]
    Base64,
}

/// The limits an execute request is checked against (from the configuration).
pub(super) struct ExecLimits {
    pub default_timeout: Duration,
    pub max_timeout: Duration,
    pub max_code: usize,
}

impl TryFrom<(ExecuteBody, &ExecLimits)> for ExecRequest {
    type Error = ApiError;

    fn try_from((body, limits): (ExecuteBody, &ExecLimits)) -> Result<ExecRequest> {
        let code = match body.encoding {
            Encoding::Utf8 => body.code.into_bytes(),
            Encoding::Base64 => base64::engine::general_purpose::STANDARD
                .decode(body.code)
                .map_err(|_| ApiError::invalid("field \"code\" is not valid base64"))?,
        };
        let max_code = limits.max_code;
        if code.len() > max_code {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "code_too_large",
                format!("code is larger than {max_code} bytes"),
            ));
        }
        let max_ms = limits.max_timeout.as_millis() as u64;
        let timeout = match body.timeout_ms {
            None => limits.default_timeout,
            Some(ms) if (1..=max_ms).contains(&ms) => Duration::from_millis(ms),
            Some(_) => {
                return Err(ApiError::invalid(format!(
                    "field \"timeoutMs\" must be an integer from 1 to {max_ms}"
                )))
            }
        };
        let language = match body.language.as_deref() {
            None => Language::default(),
            Some(l) => Language::parse(l).ok_or_else(|| {
                ApiError::invalid(
                    "field \"language\" must be one of javascript, typescript, python, bash",
                )
            })?,
        };
        Ok(ExecRequest {
            code,
            timeout,
            language,
        })
    }
}

/// Parses and validates an execute request body.
pub(super) fn parse_execute(body: &[u8], limits: &ExecLimits) -> Result<ExecRequest> {
    let wire: ExecuteBody = parse_json(body)?;
    ExecRequest::try_from((wire, limits))
}

pub(super) async fn execute(
    api: &Api,
    user: &UserId,
    req: Request<Incoming>,
) -> Result<Response<Body>> {
    let body = read_body(req, api.cfg.max_body_bytes).await?;
    let limits = ExecLimits {
        default_timeout: api.cfg.exec_timeout,
        max_timeout: api.cfg.exec_max_timeout,
        max_code: api.cfg.exec_max_code_bytes,
    };
    let er = parse_execute(&body, &limits)?;
    let r: ExecResult = api.mgr.execute(user, er).await?;
    Ok(json(
        StatusCode::OK,
        &ExecuteResponse {
            output: String::from_utf8_lossy(&r.stdout).into_owned(),
            error: String::from_utf8_lossy(&r.stderr).into_owned(),
            exit_code: r.exit_code,
            timed_out: r.timed_out,
            truncated: r.truncated,
            oom_killed: r.oom_killed,
            duration_ms: r.duration_ms,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<ExecRequest> {
        parse_execute(
            body.as_bytes(),
            &ExecLimits {
                default_timeout: Duration::from_secs(10),
                max_timeout: Duration::from_secs(60),
                max_code: 1 << 20,
            },
        )
    }

    #[test]
    fn execute_validation() {
        assert_eq!(
            parse(r#"{"code":"1"}"#).unwrap().timeout,
            Duration::from_secs(10)
        );
        assert_eq!(
            parse(r#"{"code":"1","timeoutMs":250}"#).unwrap().timeout,
            Duration::from_millis(250)
        );
        assert_eq!(parse("{").unwrap_err().status, StatusCode::BAD_REQUEST);
        for bad in [
            r#"[]"#,
            r#"{}"#,
            r#"{"code":1}"#,
            r#"{"code":"1","timeoutMs":0}"#,
            r#"{"code":"1","timeoutMs":-5}"#,
            r#"{"code":"1","timeoutMs":1e12}"#,
            r#"{"code":"1","timeoutMs":60001}"#,
            r#"{"code":"1","timeoutMs":"100"}"#,
            r#"{"code":"1","timeoutMs":1.5}"#,
            r#"{"code":"1","extra":true}"#,
            r#"{"code":"!!","encoding":"base64"}"#,
            r#"{"code":"1","encoding":"rot13"}"#,
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
        }
        for (l, want) in [
            ("javascript", Language::JavaScript),
            ("typescript", Language::TypeScript),
            ("python", Language::Python),
            ("bash", Language::Bash),
        ] {
            let body = format!(r#"{{"code":"1","language":"{l}"}}"#);
            assert_eq!(parse(&body).unwrap().language, want);
        }
        assert_eq!(
            parse(r#"{"code":"1"}"#).unwrap().language,
            Language::JavaScript
        );
        for bad in [
            r#"{"code":"1","language":"ruby"}"#,
            r#"{"code":"1","language":"Python"}"#,
            r#"{"code":"1","language":""}"#,
            r#"{"code":"1","language":3}"#,
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
        }
        let r = parse(r#"{"code":"/w==","encoding":"base64"}"#).unwrap();
        assert_eq!(r.code, vec![0xff]);
        let big = format!(r#"{{"code":"{}"}}"#, "x".repeat((1 << 20) + 1));
        assert_eq!(
            parse(&big).unwrap_err().status,
            StatusCode::PAYLOAD_TOO_LARGE
        );
    }
}
