//! Phase C: many tracked sandboxes adopted at start-up.

use std::time::{Duration, Instant};

use anyhow::Result;
use futures_util::{stream, StreamExt};
use hyper::Method;
use sandboxd::config::Config;
use sandboxd::user::UserId;

use crate::report::Fact;
use crate::sys;

use super::*;

impl Ctx {
    // ---------------------------------------------------------------- phase C

    pub(super) async fn phase_c(&mut self) -> Result<()> {
        let n = self.n.tracked;
        self.step(&format!("phase C: {n} tracked sandboxes"));
        self.stop_server().await;
        let old = self.containers(None).await?;
        self.remove_containers(old).await;
        let cfg = Config::load(None, self.env(&[]))?;
        self.engine.ensure_network(&cfg).await?;
        let t = Instant::now();
        let users: Vec<UserId> = (1..=n)
            .map(|i| UserId::parse(&format!("t{i:04}")))
            .collect::<Result<_, _>>()?;
        let this: &Ctx = self;
        let created: Vec<Result<()>> = stream::iter(users.iter())
            .map(|u| {
                let cfg = &cfg;
                async move {
                    let dir = this.ws.join(format!("user-{u}"));
                    sandboxd::sandbox::ensure_workspace_dir(&dir)?;
                    this.engine
                        .create(
                            cfg,
                            u,
                            &dir,
                            &sandboxd::sandbox::spec::new_agent_key(),
                            None,
                        )
                        .await?;
                    Ok(())
                }
            })
            .buffer_unordered(4)
            .collect()
            .await;
        created.into_iter().collect::<Result<Vec<()>>>()?;
        let create_s = t.elapsed().as_secs_f64();
        let startup = self.start_server("c", &[]).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let pid = self.server_pid()?;
        let rss = sys::rss_kib(pid)?;
        let api = self.api()?;
        let t = Instant::now();
        let ok = stream::iter(users.iter())
            .map(|u| async move {
                matches!(api.call(u.as_str(), Method::GET, "/sandbox/status", None).await, Ok((s, _)) if s.is_success())
            })
            .buffer_unordered(8)
            .filter(|ok| std::future::ready(*ok))
            .count()
            .await;
        let status_s = t.elapsed().as_secs_f64();
        let rss2 = sys::rss_kib(pid)?;
        self.report.footprint.push(Fact {
            label: format!("sandboxd start-up with {n} tracked sandboxes"),
            value: format!("{:.1} s", startup.as_secs_f64()),
            note: format!(
                "from exec to `/healthz` 200: adopts {n} labelled containers (created, never started; made with sandboxd's own container spec in {create_s:.0} s), inspects each, records sessions and events in SQLite"
            ),
        });
        self.report.footprint.push(Fact {
            label: format!("sandboxd RSS with {n} tracked sandboxes"),
            value: format!("{:.1} MiB", mib(rss)),
            note: format!("after start-up: {n} users each with a slot and a (stopped) container in the manager's table"),
        });
        self.report.footprint.push(Fact {
            label: format!("… after each of the {n} users called `GET /sandbox/status`"),
            value: format!("{:.1} MiB", mib(rss2)),
            note: format!("{ok} of {n} answered 200 in {status_s:.1} s (8 at a time; each inspects the container)"),
        });
        self.stop_server().await;
        let t = Instant::now();
        let ids = self.containers(None).await?;
        let removed = self.remove_containers(ids).await;
        eprintln!(
            "[bench] removed {removed} tracked containers in {:.0} s",
            t.elapsed().as_secs_f64()
        );
        Ok(())
    }
}
