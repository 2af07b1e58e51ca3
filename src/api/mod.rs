//! The main host's HTTP API: a matchit table from path to endpoint, then method checks,
//! authentication and the handlers (`sandbox.rs`, `files.rs`, `projects.rs`, the terminal, the
//! console).
//! Every error leaves through `crate::http::error`.

mod files;
mod projects;
mod sandbox;

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response};

use crate::auth::Auth;
use crate::config::Config;
use crate::console::Console;
use crate::edge::listener::ConnInfo;
use crate::http::error::ApiError;
use crate::http::{full, Body};
use crate::projects::Projects;
use crate::sandbox::Manager;
use crate::terminal::Terminals;
use crate::user::UserId;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Endpoint {
    Health,
    Init,
    Execute,
    Status,
    Exit,
    Events,
    Terminal,
    Files,
    FilesStat,
    FilesMove,
    FilesMkdir,
    FilesArchive,
    FilesWatch,
    Projects,
    Job,
    PreviewLink,
    Console,
    ConsoleAsset,
    OpenApi,
}

/// The OpenAPI 3.1 description of this API (docs/openapi.json), served at `/openapi.json`.
/// A unit test checks that every route of the table below has an entry in it.
pub const OPENAPI: &str = include_str!("../../docs/openapi.json");

/// Path → endpoint, with the methods each accepts.
pub(crate) struct Table(matchit::Router<(Endpoint, &'static [Method], &'static str)>);

/// Every route: path, endpoint, accepted methods, and the `Allow` header for 405.
pub(crate) const ROUTES: &[(&str, Endpoint, &[Method], &str)] = &[
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
        "/sandbox/files",
        Endpoint::Files,
        &[Method::GET, Method::PUT, Method::DELETE],
        "GET, PUT, DELETE",
    ),
    (
        "/sandbox/files/stat",
        Endpoint::FilesStat,
        &[Method::GET],
        "GET",
    ),
    (
        "/sandbox/files/move",
        Endpoint::FilesMove,
        &[Method::POST],
        "POST",
    ),
    (
        "/sandbox/files/mkdir",
        Endpoint::FilesMkdir,
        &[Method::POST],
        "POST",
    ),
    (
        "/sandbox/files/archive",
        Endpoint::FilesArchive,
        &[Method::GET, Method::PUT],
        "GET, PUT",
    ),
    (
        "/sandbox/files/watch",
        Endpoint::FilesWatch,
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
    ("/openapi.json", Endpoint::OpenApi, &[Method::GET], "GET"),
];

impl Table {
    pub fn new() -> Table {
        let mut r = matchit::Router::new();
        for (path, ep, methods, allow) in ROUTES {
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

/// The main host's API: its route table, what its handlers read, and the features it leads to.
pub struct Api {
    table: Table,
    cfg: Arc<Config>,
    mgr: Arc<Manager>,
    auth: Auth,
    terminals: Terminals,
    files: files::Files,
    projects: Projects,
    console: Console,
}

impl Api {
    pub fn new(cfg: Arc<Config>, mgr: Arc<Manager>, auth: Auth) -> Api {
        Api {
            table: Table::new(),
            terminals: Terminals::new(cfg.clone(), mgr.clone(), auth.clone()),
            files: files::Files::default(),
            projects: Projects::new(mgr.clone()),
            console: Console::new(cfg.clone()),
            cfg,
            mgr,
            auth,
        }
    }

    pub async fn handle(&self, req: Request<Incoming>, conn: Arc<ConnInfo>) -> Response<Body> {
        self.dispatch(req, conn)
            .await
            .unwrap_or_else(ApiError::into_response)
    }

    /// The one dispatch: path and method, then the endpoint's handler. Every endpoint but the
    /// public ones (health, the OpenAPI document, the console) and the WebSockets (the terminal
    /// and the files watch, which read their token from a subprotocol too) authenticates first.
    async fn dispatch(
        &self,
        req: Request<Incoming>,
        conn: Arc<ConnInfo>,
    ) -> Result<Response<Body>, ApiError> {
        let path = req.uri().path().to_owned();
        let m = self.table.0.at(&path).map_err(|_| ApiError::not_found())?;
        let (endpoint, methods, allow) = *m.value;
        if !methods.contains(req.method()) {
            return Err(ApiError::method_not_allowed(allow));
        }
        let param = m.params.get("id").map(str::to_owned);
        match endpoint {
            Endpoint::Health => sandbox::health(&self.mgr).await,
            Endpoint::OpenApi => Ok(openapi()),
            Endpoint::Console | Endpoint::ConsoleAsset => {
                Ok(self.console.handle(&req, param.as_deref().or(Some(&path))))
            }
            Endpoint::Terminal => Ok(self.terminals.handle(req, conn).await),
            Endpoint::FilesWatch => Ok(files::watch(self, req, &conn).await),
            Endpoint::Files => {
                let user = self.authenticate(&req)?;
                match *req.method() {
                    Method::PUT => files::put(self, &user, req).await,
                    Method::DELETE => files::delete(self, &user, req).await,
                    _ => files::get(self, &user, req).await,
                }
            }
            Endpoint::FilesStat => {
                let user = self.authenticate(&req)?;
                files::stat(self, &user, req).await
            }
            Endpoint::FilesMove => {
                let user = self.authenticate(&req)?;
                files::rename(self, &user, req).await
            }
            Endpoint::FilesMkdir => {
                let user = self.authenticate(&req)?;
                files::mkdir(self, &user, req).await
            }
            Endpoint::FilesArchive => {
                let user = self.authenticate(&req)?;
                if req.method() == Method::PUT {
                    files::archive_put(self, &user, req).await
                } else {
                    files::archive_get(self, &user, req).await
                }
            }
            Endpoint::Init => sandbox::init(self, &self.authenticate(&req)?, &conn).await,
            Endpoint::Execute => {
                let user = self.authenticate(&req)?;
                sandbox::execute(self, &user, req).await
            }
            Endpoint::Status => sandbox::status(self, &self.authenticate(&req)?, &conn).await,
            Endpoint::Exit => sandbox::exit(self, &self.authenticate(&req)?).await,
            Endpoint::Events => sandbox::events(self, &self.authenticate(&req)?).await,
            Endpoint::Projects => {
                let user = self.authenticate(&req)?;
                projects::create(self, &user, req, &conn).await
            }
            Endpoint::Job => {
                let user = self.authenticate(&req)?;
                projects::job(self, &user, param.as_deref().unwrap_or(""))
            }
            Endpoint::PreviewLink => {
                let user = self.authenticate(&req)?;
                crate::preview::link(&self.auth, &self.cfg, &user, &conn)
            }
        }
    }

    /// The bearer token's user. An authenticated request is activity of that user's sandbox.
    fn authenticate(&self, req: &Request<Incoming>) -> Result<UserId, ApiError> {
        let user = self
            .auth
            .from_headers(req.headers())
            .map_err(|e| ApiError::unauthorized(e.to_string()))?;
        crate::access::note_user(user.as_str());
        self.mgr.touch(&user);
        Ok(user)
    }
}

/// Public and static: readable by API tools running on other origins (Swagger UI, editors).
fn openapi() -> Response<Body> {
    let mut resp = Response::new(full(OPENAPI));
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(
        hyper::header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
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

    /// Adding a route without documenting it (path and every method) fails here.
    #[test]
    fn openapi_documents_every_route() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("docs/openapi.json");
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.1."));
        let paths = doc["paths"].as_object().unwrap();
        for (path, ep, methods, _) in ROUTES {
            let entry = paths
                .get(*path)
                .unwrap_or_else(|| panic!("{path} ({ep:?}) is missing from docs/openapi.json"));
            for m in *methods {
                let op = &entry[m.as_str().to_ascii_lowercase()];
                assert!(
                    op["responses"].is_object(),
                    "{m} {path} is missing from docs/openapi.json"
                );
            }
            let documented = entry.as_object().unwrap().keys().filter(|k| {
                ["get", "head", "post", "put", "patch", "delete", "options"].contains(&k.as_str())
            });
            for m in documented {
                assert!(
                    methods.iter().any(|x| x.as_str().eq_ignore_ascii_case(m)),
                    "docs/openapi.json documents {m} {path}, which the server refuses"
                );
            }
        }
        assert_eq!(
            paths.len(),
            ROUTES.len(),
            "docs/openapi.json documents a route the table lacks"
        );
        // Every error code the document uses is in the enum; the enum has the stable codes.
        let codes: Vec<&str> = doc["components"]["schemas"]["ErrorCode"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        for c in [
            "not_found",
            "unauthorized",
            "invalid_request",
            "engine_unavailable",
            "bad_framing",
        ] {
            assert!(codes.contains(&c), "{c}");
        }
    }

    /// Every code the sources hand to `ApiError::new` (and the helpers) is in the enum.
    #[test]
    fn openapi_lists_every_error_code() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        let codes = doc["components"]["schemas"]["ErrorCode"]["enum"].clone();
        let mut missing = vec![];
        let mut found = std::collections::BTreeSet::new();
        for file in crate_sources(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/src"
        ))) {
            let text = std::fs::read_to_string(&file).unwrap();
            for (i, _) in text.match_indices("StatusCode::") {
                // `StatusCode::X,\n "code",` as ApiError::new and error_response take them.
                let rest = &text[i..];
                let Some(comma) = rest.find(',') else {
                    continue;
                };
                let after = rest[comma + 1..].trim_start();
                let Some(lit) = after.strip_prefix('"') else {
                    continue;
                };
                let Some(end) = lit.find('"') else { continue };
                let code = &lit[..end];
                if code.is_empty() || !code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
                    continue;
                }
                found.insert(code.to_owned());
                if !codes.as_array().unwrap().iter().any(|c| c == code) {
                    missing.push(format!("{code} ({})", file.display()));
                }
            }
        }
        for code in [
            "unauthorized",
            "not_found",
            "method_not_allowed",
            "invalid_json",
            "invalid_request",
            "body_too_large",
            "internal",
        ] {
            if !codes.as_array().unwrap().iter().any(|c| c == code) {
                missing.push(code.to_owned());
            }
        }
        assert!(
            missing.is_empty(),
            "error codes missing from docs/openapi.json: {missing:?}"
        );
        // The scan itself works: it sees the codes of the preview proxy and the terminal.
        for c in [
            "unknown_preview",
            "too_many_terminals",
            "misdirected_request",
        ] {
            assert!(found.contains(c), "scan found {found:?}");
        }
    }

    fn crate_sources(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut out = vec![];
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(crate_sources(&p));
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
        out
    }
}
