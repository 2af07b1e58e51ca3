//! Request bodies: read with a size cap, then parsed into a serde wire type. Wire types refuse
//! unknown fields (`#[serde(deny_unknown_fields)]`) and are turned into domain types with
//! `TryFrom`, so every JSON endpoint answers the same way: 400 `invalid_json` for a body that is
//! not JSON, 422 `invalid_request` for JSON of the wrong shape, 413 beyond the cap.

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::CONTENT_LENGTH;
use hyper::{Request, StatusCode};
use serde::de::DeserializeOwned;

use super::error::ApiError;

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

/// Reads a JSON object of at most `limit` bytes into the wire type `T`.
pub async fn read_json<T: DeserializeOwned>(
    req: Request<Incoming>,
    limit: usize,
) -> Result<T, ApiError> {
    parse_json(&read_body(req, limit).await?)
}

/// Parses a JSON object into the wire type `T`. The body is read as a JSON value first, so a
/// syntax error (400) is told apart from a wrong shape (422), and an array is refused even
/// though serde would fill a struct from one by position.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_json(format!("body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::invalid("body must be a JSON object"));
    }
    serde_json::from_value(value).map_err(|e| ApiError::invalid(format!("invalid body: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Wire {
        name: String,
    }

    #[test]
    fn syntax_errors_are_400_shape_errors_422() {
        assert_eq!(parse_json::<Wire>(b"{").unwrap_err().code, "invalid_json");
        for bad in [
            &br#"["x"]"#[..],
            br#""x""#,
            br#"{}"#,
            br#"{"name":5}"#,
            br#"{"name":"x","extra":1}"#,
        ] {
            let e = parse_json::<Wire>(bad).unwrap_err();
            assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY, "{e:?}");
            assert_eq!(e.code, "invalid_request");
        }
        let e = parse_json::<Wire>(br#"{"name":"x","extra":1}"#).unwrap_err();
        assert!(e.message.contains("unknown field `extra`"), "{}", e.message);
        assert_eq!(parse_json::<Wire>(br#"{"name":"x"}"#).unwrap().name, "x");
    }
}
