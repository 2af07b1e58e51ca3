//! Project templates: `POST /sandbox/projects {"template":"node"|"react-vite","name":"my-app"}`
//! scaffolds a project inside the sandbox, marks it as the preview app and starts its dev
//! server. It answers 202 with a job; `GET /sandbox/jobs/{id}` shows the progress (step, status,
//! the tail of the log). The name is validated and reaches the sandbox only as an argument of
//! constant scripts, never inside a shell string.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::{Deserialize, Serialize};

use crate::app::App;
use crate::http::body::read_json;
use crate::http::error::ApiError;
use crate::http::json;
use crate::http::Body;
use crate::sandbox::shell::{self, ExecOptions, Script};
use crate::user::UserId;

/// Log bytes kept per job (the tail).
const LOG_CAP: usize = 64 * 1024;
/// Jobs kept per user (oldest finished ones are dropped).
const JOBS_PER_USER: usize = 16;
const STEP_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Running,
    Succeeded,
    Failed,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Job {
    pub id: String,
    pub template: String,
    pub project: String,
    pub status: JobStatus,
    pub step: String,
    pub log: String,
    pub error: Option<String>,
    pub preview_url: String,
}

#[derive(Default)]
pub struct Jobs {
    by_user: Mutex<HashMap<UserId, Vec<Arc<Mutex<Job>>>>>,
}

impl Jobs {
    fn add(&self, user: &UserId, job: Job) -> Arc<Mutex<Job>> {
        let job = Arc::new(Mutex::new(job));
        let mut m = self.by_user.lock().unwrap_or_else(|p| p.into_inner());
        let list = m.entry(user.clone()).or_default();
        if list.len() >= JOBS_PER_USER {
            if let Some(i) = list.iter().position(|j| {
                j.lock().unwrap_or_else(|p| p.into_inner()).status != JobStatus::Running
            }) {
                list.remove(i);
            }
        }
        list.push(job.clone());
        job
    }

    fn get(&self, user: &UserId, id: &str) -> Option<Job> {
        let m = self.by_user.lock().unwrap_or_else(|p| p.into_inner());
        m.get(user)?
            .iter()
            .map(|j| j.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .find(|j| j.id == id)
    }

    fn running(&self, user: &UserId) -> usize {
        let m = self.by_user.lock().unwrap_or_else(|p| p.into_inner());
        m.get(user).map_or(0, |l| {
            l.iter()
                .filter(|j| {
                    j.lock().unwrap_or_else(|p| p.into_inner()).status == JobStatus::Running
                })
                .count()
        })
    }
}

pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'_')
}

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

pub async fn create(
    app: &Arc<App>,
    user: &UserId,
    req: Request<Incoming>,
    conn: &crate::edge::listener::ConnInfo,
) -> Result<Response<Body>, ApiError> {
    let NewProject { template, name } =
        read_json::<CreateBody>(req, 64 * 1024).await?.try_into()?;
    if app.jobs.running(user) >= 2 {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_jobs",
            "two project jobs are already running",
        )
        .retry_after(5));
    }
    // The name reaches the constant scripts only as their argument "$1".
    let door = app.mgr.enter(user).await?;
    let (code, _) = door
        .run_script(Script::ProjectExists, std::slice::from_ref(&name))
        .await?;
    if code == 0 {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "project_exists",
            format!("/workspace/{name} already exists"),
        ));
    }
    let job = app.jobs.add(
        user,
        Job {
            id: uuid::Uuid::new_v4().simple().to_string(),
            template: template.clone(),
            project: name.clone(),
            status: JobStatus::Running,
            step: "queued".into(),
            log: String::new(),
            error: None,
            preview_url: crate::preview::url(&app.cfg, user, conn),
        },
    );
    let snapshot = job.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let (app2, user2) = (app.clone(), user.clone());
    tokio::spawn(tracing::Instrument::in_current_span(async move {
        let result = run_job(&app2, &user2, &job, &template, &name).await;
        let mut j = job.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(()) => {
                j.status = JobStatus::Succeeded;
                j.step = "done".into();
            }
            Err(e) => {
                tracing::warn!(user = %user2, error = format!("{e:#}"), "project job failed");
                j.status = JobStatus::Failed;
                j.error = Some(format!("{e:#}"));
            }
        }
    }));
    let mut resp = json(StatusCode::ACCEPTED, &snapshot);
    if let Ok(v) = format!("/sandbox/jobs/{}", snapshot.id).parse() {
        resp.headers_mut().insert(hyper::header::LOCATION, v);
    }
    Ok(resp)
}

pub async fn job(app: &Arc<App>, user: &UserId, id: &str) -> Result<Response<Body>, ApiError> {
    app.jobs
        .get(user, id)
        .map(|j| json(StatusCode::OK, &j))
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "job_not_found", "no such job"))
}

async fn run_job(
    app: &Arc<App>,
    user: &UserId,
    job: &Mutex<Job>,
    template: &str,
    name: &str,
) -> anyhow::Result<()> {
    let steps: [(&str, Script); 2] = [
        (
            "scaffold",
            if template == "node" {
                Script::ProjectNode
            } else {
                Script::ProjectVite
            },
        ),
        ("start dev server", Script::PreviewMark),
    ];
    for (step, script) in steps {
        job.lock().unwrap_or_else(|p| p.into_inner()).step = step.into();
        let door = app.mgr.enter(user).await?;
        let opts = ExecOptions {
            env: vec!["CI=1".into(), "npm_config_yes=true".into()],
            working_dir: Some("/workspace".into()),
            stdin: false,
        };
        let (exec, mut out, _input) = door.open_exec(script, &[name.to_owned()], opts).await?;
        let read = async {
            while let Some(chunk) = out.next().await {
                let b = shell::bytes_of(chunk?);
                app.mgr.touch(user);
                let mut j = job.lock().unwrap_or_else(|p| p.into_inner());
                j.log.push_str(&String::from_utf8_lossy(&b));
                if j.log.len() > LOG_CAP {
                    let cut = j.log.len() - LOG_CAP;
                    let cut = (cut..j.log.len())
                        .find(|i| j.log.is_char_boundary(*i))
                        .unwrap_or(0);
                    j.log.drain(..cut);
                }
            }
            anyhow::Ok(())
        };
        tokio::time::timeout(STEP_TIMEOUT, read)
            .await
            .map_err(|_| anyhow::anyhow!("step {step:?} timed out"))??;
        let info = exec.status().await?;
        if info.exit_code != Some(0) {
            anyhow::bail!("step {step:?} exited with {:?}", info.exit_code);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["my-app", "a", "0x", "a_b-c", &"a".repeat(64)] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "_a",
            "A",
            "a b",
            "../x",
            "a/b",
            "a.b",
            &"a".repeat(65),
            "$(id)",
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn scripts_are_constant() {
        assert_eq!(Script::ProjectExists.argv(&["x".into()])[4], "x");
        let (node, vite) = (Script::ProjectNode.source(), Script::ProjectVite.source());
        assert!(!node.contains("{name}") && !vite.contains("{name}"));
    }
}
