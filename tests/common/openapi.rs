//! The API contract as the tests see it: every JSON answer the tests receive is validated
//! against docs/openapi.json (the document the server serves at /openapi.json) with a JSON
//! Schema 2020-12 validator, so the document cannot drift from the code. An undocumented route,
//! method or status, a JSON body where none is documented (or the reverse), and a body that
//! does not match its schema all fail the test.

use std::sync::OnceLock;

use serde_json::{json, Value};

pub fn doc() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(|| {
        serde_json::from_str(sandboxd::api::OPENAPI).expect("docs/openapi.json is JSON")
    })
}

/// The documented template a concrete path (query allowed) belongs to, e.g.
/// `/sandbox/jobs/abc?x=1` → `/sandbox/jobs/{id}`.
pub fn template_of(path: &str) -> Option<&'static str> {
    let path = path.split(['?', '#']).next().unwrap_or("");
    let segs: Vec<&str> = path.split('/').collect();
    doc()["paths"]
        .as_object()
        .unwrap()
        .keys()
        .find(|t| {
            let ts: Vec<&str> = t.split('/').collect();
            ts.len() == segs.len()
                && ts.iter().zip(&segs).all(|(t, s)| {
                    if t.starts_with('{') && t.ends_with('}') {
                        !s.is_empty()
                    } else {
                        t == s
                    }
                })
        })
        .map(String::as_str)
}

/// Follows a `$ref` into the document (`#/components/...`).
fn deref(v: &'static Value) -> &'static Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let ptr = r.strip_prefix('#').expect("local $ref");
            deref(
                doc()
                    .pointer(ptr)
                    .unwrap_or_else(|| panic!("dangling $ref {r}")),
            )
        }
        None => v,
    }
}

/// The documented response object of `method path_template` for `status`; panics when any of
/// them is not documented.
pub fn response(method: &str, template: &str, status: u16) -> &'static Value {
    let path = doc()["paths"]
        .get(template)
        .unwrap_or_else(|| panic!("{template} is not documented in docs/openapi.json"));
    let op = path
        .get(method.to_ascii_lowercase())
        .unwrap_or_else(|| panic!("{method} {template} is not documented in docs/openapi.json"));
    let r = op["responses"].get(status.to_string()).unwrap_or_else(|| {
        panic!("{method} {template} → {status} is not documented in docs/openapi.json")
    });
    deref(r)
}

/// A JSON Schema that embeds the document's components, so `#/components/schemas/…` resolves.
fn validate(schema: &Value, body: &Value, what: &str) {
    let wrapper = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "components": doc()["components"],
        "allOf": [schema],
    });
    let v = jsonschema::draft202012::new(&wrapper)
        .unwrap_or_else(|e| panic!("schema of {what} does not compile: {e}"));
    let errors: Vec<String> = v
        .iter_errors(body)
        .map(|e| format!("{e} (at \"{}\")", e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{what}: the answer does not match docs/openapi.json:\n  {}\nbody: {body}",
        errors.join("\n  ")
    );
}

/// Checks a JSON answer of `method path_template` with `status` against the document.
pub fn check(method: &str, template: &str, status: u16, body: &Value) {
    let r = response(method, template, status);
    let what = format!("{method} {template} → {status}");
    let schema = r
        .pointer("/content/application~1json/schema")
        .unwrap_or_else(|| panic!("{what} is documented without a JSON body, but one came"));
    validate(schema, body, &what);
}

/// Checks an error answer against the error envelope (and its stable codes) alone: for preview
/// hosts, whose paths belong to the user's app.
pub fn check_error(body: &Value) {
    validate(
        &json!({"$ref": "#/components/schemas/Error"}),
        body,
        "error answer",
    );
}

/// What the shared request helpers call for every answer on the main host: documented route,
/// method and status; a JSON body exactly when one is documented, matching its schema. A path
/// that is no route must be answered 404 `not_found`, a method a route does not take 405.
pub fn check_answer(method: &str, path: &str, status: u16, content_type: &str, body: &[u8]) {
    let is_json = content_type.starts_with("application/json");
    let Some(template) = template_of(path) else {
        assert_eq!(
            status, 404,
            "{method} {path}: not a documented route, yet {status}"
        );
        let v: Value = serde_json::from_slice(body).expect("404 answer is JSON");
        check_error(&v);
        assert_eq!(v["error"]["code"], "not_found", "{v}");
        return;
    };
    if doc()["paths"][template]
        .get(method.to_ascii_lowercase())
        .is_none()
    {
        // A method the route does not take: the documented 405 of the route.
        assert_eq!(
            status, 405,
            "{method} {path}: not a documented method, yet {status}"
        );
        let v: Value = serde_json::from_slice(body).expect("405 answer is JSON");
        check_error(&v);
        assert_eq!(v["error"]["code"], "method_not_allowed", "{v}");
        return;
    }
    let r = response(method, template, status);
    let documented_json = r.pointer("/content/application~1json").is_some();
    if method.eq_ignore_ascii_case("HEAD") || status == 304 || status == 101 {
        return;
    }
    // A route that also answers raw bytes (a file of the files API, whose `.json` files come
    // as `application/json; charset=utf-8`): only a bare `application/json` is the API's own
    // JSON; anything else is the file's bytes, not validated.
    let raw_bytes = r["content"]
        .as_object()
        .is_some_and(|c| c.keys().any(|k| !k.starts_with("application/json")));
    let is_json = if raw_bytes {
        content_type == "application/json"
    } else {
        is_json
    };
    if raw_bytes && !is_json {
        return;
    }
    assert_eq!(
        is_json,
        documented_json,
        "{method} {template} → {status}: Content-Type {content_type:?}, the document says {}",
        if documented_json { "JSON" } else { "not JSON" }
    );
    if is_json {
        let v: Value = serde_json::from_slice(body).unwrap_or_else(|e| {
            panic!(
                "{method} {path} → {status}: Content-Type JSON but the body is not: {e}: {}",
                String::from_utf8_lossy(body)
            )
        });
        check(method, template, status, &v);
    }
}

/// Sends through `reqwest`, checks the answer with [`check_answer`] and hands back an
/// equivalent response (status, headers and the same bytes).
pub async fn checked(method: &str, path: &str, resp: reqwest::Response) -> reqwest::Response {
    let status = resp.status();
    let version = resp.version();
    let headers = resp.headers().clone();
    let bytes = resp.bytes().await.expect("reading the answer");
    let ct = headers
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    check_answer(method, path, status.as_u16(), ct, &bytes);
    let mut b = http::Response::builder().status(status).version(version);
    *b.headers_mut().unwrap() = headers;
    reqwest::Response::from(b.body(bytes).unwrap())
}

/// Checks a response as [`checked`] does and returns its status and JSON body.
pub async fn json_of(method: &str, path: &str, resp: reqwest::Response) -> (u16, Value) {
    let r = checked(method, path, resp).await;
    let status = r.status().as_u16();
    (status, r.json().await.expect("a JSON answer"))
}
