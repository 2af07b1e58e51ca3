//! The preview's own answers: small HTML pages for browsers, the JSON envelope for everyone
//! else. [`PreviewError::into_response`] is the one place that picks between them.

use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};

use super::PreviewError;
use crate::http::error::ApiError;
use crate::http::{full, Body};

/// A browser navigation or a client that takes HTML gets a page; API clients get JSON.
pub(super) fn wants_html<B>(req: &Request<B>) -> bool {
    static SEC_FETCH_MODE: header::HeaderName = header::HeaderName::from_static("sec-fetch-mode");
    let h = req.headers();
    wants_html_raw(
        h.get(&SEC_FETCH_MODE).map(|v| v.as_bytes()),
        h.get(header::ACCEPT).map(|v| v.as_bytes()),
    )
}

/// [`wants_html`] of the first `Sec-Fetch-Mode` and `Accept` values.
pub(super) fn wants_html_raw(sec_fetch_mode: Option<&[u8]>, accept: Option<&[u8]>) -> bool {
    sec_fetch_mode == Some(b"navigate".as_slice())
        || accept.is_some_and(|a| a.windows(9).any(|w| w == b"text/html"))
}

impl PreviewError {
    /// The answer to the client: a page when it `wants_html`, else the JSON envelope.
    pub(super) fn into_response(self, wants_html: bool) -> Response<Body> {
        match self {
            PreviewError::UnknownPreview => {
                let msg = "No sandbox exists for this preview address.";
                if wants_html {
                    return html(
                        StatusCode::NOT_FOUND,
                        page("No such preview", &format!("<p>{msg}</p>"), false),
                    );
                }
                ApiError::new(StatusCode::NOT_FOUND, "unknown_preview", msg).into_response()
            }
            PreviewError::NotListening { port } => {
                if wants_html {
                    let body = format!(
                        "<p>The sandbox is running, but nothing listens on port {port} yet.</p>\
                         <p>Start your app in the terminal, for example:</p>\
                         <p><code>npm run dev -- --host 0.0.0.0 --port {port}</code></p>\
                         <p>This page retries by itself every 2 seconds.</p>"
                    );
                    return html(
                        StatusCode::SERVICE_UNAVAILABLE,
                        page("Nothing here yet", &body, true),
                    );
                }
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "preview_not_listening",
                    format!("nothing listens on port {port} in the sandbox"),
                )
                .retry_after(2)
                .into_response()
            }
            // The container engine is down (sandbox/health.rs): browsers get a page that
            // retries by itself, other clients 503 `engine_unavailable` with `Retry-After`.
            PreviewError::EngineDown(message) => {
                if wants_html {
                    let body = "<p>The sandbox engine is restarting or unreachable; your sandbox \
                                will be back as soon as it answers.</p>\
                                <p>This page retries by itself every 2 seconds.</p>";
                    let mut r = html(
                        StatusCode::SERVICE_UNAVAILABLE,
                        page("Waiting for the sandbox engine", body, true),
                    );
                    r.headers_mut().insert(
                        header::RETRY_AFTER,
                        HeaderValue::from(crate::sandbox::health::RETRY_AFTER_SECS),
                    );
                    return r;
                }
                ApiError::engine_unavailable(message).into_response()
            }
            PreviewError::Restarted => {
                if wants_html {
                    return html(
                        StatusCode::SERVICE_UNAVAILABLE,
                        page(
                            "Restarting",
                            "<p>The sandbox was restarted. This page retries by itself every 2 \
                             seconds.</p>",
                            true,
                        ),
                    );
                }
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "preview_restarted",
                    "the sandbox was restarted while this request was in flight; retry",
                )
                .retry_after(1)
                .into_response()
            }
            PreviewError::Private => {
                let msg = "This preview is private. Open it through the link from the sandbox \
                           API (POST /sandbox/preview-link).";
                if wants_html {
                    return html(
                        StatusCode::UNAUTHORIZED,
                        page("Private preview", &format!("<p>{}</p>", escape(msg)), false),
                    );
                }
                ApiError::new(StatusCode::UNAUTHORIZED, "preview_unauthorized", msg).into_response()
            }
            PreviewError::Api(e) => e.into_response(),
        }
    }
}

fn html(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn page(title: &str, body: &str, refresh: bool) -> String {
    let meta = if refresh {
        r#"<meta http-equiv="refresh" content="2">"#
    } else {
        ""
    };
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">{meta}<title>{t}</title>\
         <style>body{{font:16px/1.5 system-ui,sans-serif;max-width:40em;margin:4em auto;padding:0 1em;color:#222}}\
         code{{background:#eee;padding:.1em .3em;border-radius:3px}}</style></head>\
         <body><h1>{t}</h1>{body}</body></html>",
        t = escape(title)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_escapes() {
        assert!(!page("<x>", "", false).contains("<x>"));
    }

    #[test]
    fn browsers_get_pages_and_api_clients_json() {
        let ct = |r: &Response<Body>| {
            r.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .to_owned()
        };
        let r = PreviewError::NotListening { port: 5173 }.into_response(true);
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(ct(&r).starts_with("text/html"));
        let r = PreviewError::NotListening { port: 5173 }.into_response(false);
        assert_eq!(ct(&r), "application/json");
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        let r = PreviewError::EngineDown("down".into()).into_response(true);
        assert!(r.headers().contains_key(header::RETRY_AFTER));
        let r = PreviewError::Private.into_response(false);
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }
}
