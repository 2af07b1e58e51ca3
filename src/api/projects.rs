//! Project templates over HTTP: `POST /sandbox/projects {"template":"node"|"react-vite",
//! "name":"my-app"}` starts a job (see `crate::projects`) and answers 202 with it;
//! `GET /sandbox/jobs/{id}` shows its progress.

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;

use super::Api;
use crate::edge::listener::ConnInfo;
use crate::http::body::read_json;
use crate::http::error::ApiError;
use crate::http::json;
use crate::http::Body;
use crate::projects::{valid_name, StartError};
use crate::user::UserId;

/// The wire shape of `POST /sandbox/projects`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    template: String,
    name: String,
}

/// A validated project request.
struct NewProject {
    template: String,
    name: String,
}

impl TryFrom<CreateBody> for NewProject {
    type Error = ApiError;

    fn try_from(body: CreateBody) -> Result<NewProject, ApiError> {
        if !matches!(body.template.as_str(), "node" | "react-vite") {
            return Err(ApiError::invalid(
                "field \"template\" must be \"node\" or \"react-vite\"",
            ));
        }
        if !valid_name(&body.name) {
            return Err(ApiError::invalid(
                "field \"name\" must match [a-z0-9][a-z0-9-_]{0,63}",
            ));
        }
        Ok(NewProject {
            template: body.template,
            name: body.name,
        })
    }
}

pub(super) async fn create(
    api: &Api,
    user: &UserId,
    req: Request<Incoming>,
    conn: &ConnInfo,
) -> Result<Response<Body>, ApiError> {
    let NewProject { template, name } =
        read_json::<CreateBody>(req, 64 * 1024).await?.try_into()?;
    let preview_url = crate::preview::url(&api.cfg, user, conn);
    let snapshot = match api
        .projects
        .start(user, template, name.clone(), preview_url)
        .await
    {
        Ok(job) => job,
        Err(StartError::Busy) => {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_jobs",
                "two project jobs are already running",
            )
            .retry_after(5))
        }
        Err(StartError::Exists) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "project_exists",
                format!("/workspace/{name} already exists"),
            ))
        }
        Err(StartError::Sandbox(e)) => return Err(e.into()),
        Err(StartError::CheckFailed(e)) => return Err(e.into()),
    };
    let mut resp = json(StatusCode::ACCEPTED, &snapshot);
    if let Ok(v) = format!("/sandbox/jobs/{}", snapshot.id).parse() {
        resp.headers_mut().insert(hyper::header::LOCATION, v);
    }
    Ok(resp)
}

pub(super) fn job(api: &Api, user: &UserId, id: &str) -> Result<Response<Body>, ApiError> {
    api.projects
        .job(user, id)
        .map(|j| json(StatusCode::OK, &j))
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "job_not_found", "no such job"))
}
