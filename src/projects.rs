//! Project jobs: scaffold a project from a template inside the sandbox, mark it as the preview
//! app and start its dev server, step by step through the door, keeping each job's progress
//! (step, status, the tail of the log) for its user. The HTTP side is `api/projects.rs`. The
//! name is validated and reaches the sandbox only as an argument of constant scripts, never
//! inside a shell string.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use serde::Serialize;

use crate::sandbox::shell::{self, ExecOptions, Script};
use crate::sandbox::{Manager, SandboxError};
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
struct Jobs {
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

/// Why a job did not start.
#[derive(Debug)]
pub enum StartError {
    /// Two jobs of this user are already running.
    Busy,
    /// `/workspace/<name>` already exists.
    Exists,
    /// The sandbox could not be entered.
    Sandbox(SandboxError),
    /// The check for an existing folder could not run in the sandbox.
    CheckFailed(anyhow::Error),
}

/// The project jobs of every user, and the sandboxes they run in.
pub struct Projects {
    mgr: Arc<Manager>,
    jobs: Jobs,
}

impl Projects {
    pub fn new(mgr: Arc<Manager>) -> Projects {
        Projects {
            mgr,
            jobs: Jobs::default(),
        }
    }

    /// Starts a job that scaffolds `name` from `template` (both validated by the caller) and
    /// returns its first snapshot; `preview_url` is where the user will see the app.
    pub async fn start(
        &self,
        user: &UserId,
        template: String,
        name: String,
        preview_url: String,
    ) -> Result<Job, StartError> {
        if self.jobs.running(user) >= 2 {
            return Err(StartError::Busy);
        }
        // The name reaches the constant scripts only as their argument "$1".
        let door = self.mgr.enter(user).await.map_err(StartError::Sandbox)?;
        let (code, _) = door
            .run_script(Script::ProjectExists, std::slice::from_ref(&name))
            .await
            .map_err(StartError::CheckFailed)?;
        if code == 0 {
            return Err(StartError::Exists);
        }
        let job = self.jobs.add(
            user,
            Job {
                id: uuid::Uuid::new_v4().simple().to_string(),
                template: template.clone(),
                project: name.clone(),
                status: JobStatus::Running,
                step: "queued".into(),
                log: String::new(),
                error: None,
                preview_url,
            },
        );
        let snapshot = job.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let (mgr, user2) = (self.mgr.clone(), user.clone());
        tokio::spawn(tracing::Instrument::in_current_span(async move {
            let result = run_job(&mgr, &user2, &job, &template, &name).await;
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
        Ok(snapshot)
    }

    /// A snapshot of one of the user's jobs.
    pub fn job(&self, user: &UserId, id: &str) -> Option<Job> {
        self.jobs.get(user, id)
    }
}

async fn run_job(
    mgr: &Arc<Manager>,
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
        let door = mgr.enter(user).await?;
        let opts = ExecOptions {
            env: vec!["CI=1".into(), "npm_config_yes=true".into()],
            working_dir: Some("/workspace".into()),
            stdin: false,
        };
        let (exec, mut out, _input) = door.open_exec(script, &[name.to_owned()], opts).await?;
        let read = async {
            while let Some(chunk) = out.next().await {
                let b = shell::bytes_of(chunk?);
                mgr.touch(user);
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
