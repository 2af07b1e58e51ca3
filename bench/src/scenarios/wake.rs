//! Phase B: cold first hits, wakes from paused and stopped (by sandboxd and from outside), the
//! floors without sandboxd, 20 users at once, memory per paused sandbox.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bollard::container::{CreateContainerOptions, StartContainerOptions, StopContainerOptions};
use futures_util::{stream, StreamExt};
use hyper::Method;
use sandboxd::config::Config;
use sandboxd::user::UserId;
use serde_json::json;

use crate::http;
use crate::report::{ms, Breakdown, Fact, TimedRow, CROWD, FLOOR_COLD, FLOOR_CROWD, FLOOR_WAKE};
use crate::stats::{median, summarize};
use crate::sys;

use super::*;

impl Ctx {
    // ---------------------------------------------------------------- phase B

    pub(super) async fn phase_b(&mut self) -> Result<()> {
        // B1: no idle policy in the way (a start that takes longer than `idle_pause_after`
        // would be paused by the reaper while the request waits; see the notes).
        self.step("phase B1: default sandbox limits, no idle policy");
        self.start_server("b1", &[]).await?;
        let r = self.bench_cold("cold", false, self.n.wake_runs).await;
        self.note_err("cold first hit", r);
        let r = self.bench_floors(self.n.wake_runs).await;
        self.note_err("floors without sandboxd", r);
        let r = self.bench_outside("cold", "pause", self.n.wake_runs).await;
        self.note_err("wake after an outside pause", r);
        let r = self.bench_outside("cold", "stop", self.n.wake_runs).await;
        self.note_err("wake after an outside stop", r);
        let r = self.bench_cold("npm", true, self.n.npm_runs).await;
        self.note_err("cold first hit (npm run dev)", r);
        let crowd = self.bench_crowd().await;
        let mem_before = match crowd {
            Ok(m) => Some(m),
            Err(e) => {
                self.note_err("20 users at once", Err(e));
                None
            }
        };
        let r = self.bench_crowd_floor().await;
        self.note_err("floor of the users at once", r);
        // B2: paused by the idle policy after 1 s.
        self.step("phase B2: idle pause after 1 s");
        self.start_server(
            "b2",
            &[
                ("SANDBOXD_IDLE_PAUSE_AFTER", "1s"),
                ("SANDBOXD_IDLE_STOP_AFTER", "1h"),
                ("SANDBOXD_IDLE_CHECK_EVERY", "100ms"),
            ],
        )
        .await?;
        if let Some(before) = mem_before {
            let r = self.paused_memory(before).await;
            self.note_err("memory per paused sandbox", r);
        }
        let r = self.bench_paused().await;
        self.note_err("wake from paused", r);
        self.stop_server().await;
        // Only the "cold" user's sandbox goes on to B3.
        let mut others = self.containers(None).await?;
        let keep = self.container_of("cold").await.ok();
        others.retain(|id| Some(id) != keep.as_ref());
        self.remove_containers(others).await;

        // B3: stopped by the idle policy after 1 s.
        self.step("phase B3: idle stop after 1 s");
        self.start_server(
            "b3",
            &[
                ("SANDBOXD_IDLE_PAUSE_AFTER", "1s"),
                ("SANDBOXD_IDLE_STOP_AFTER", "1s"),
                ("SANDBOXD_IDLE_CHECK_EVERY", "100ms"),
            ],
        )
        .await?;
        let r = self.bench_stopped("cold", self.n.wake_runs, false).await;
        self.note_err("wake from stopped", r);
        self.stop_server().await;

        // B4: the same with a sandbox that has no CPU quota to speak of (comparison only).
        self.step("phase B4: wake from stopped with 2 CPUs");
        self.start_server(
            "b4",
            &[
                ("SANDBOXD_CPUS", "2"),
                ("SANDBOXD_IDLE_PAUSE_AFTER", "1s"),
                ("SANDBOXD_IDLE_STOP_AFTER", "1s"),
                ("SANDBOXD_IDLE_CHECK_EVERY", "100ms"),
            ],
        )
        .await?;
        let r = async {
            self.write_app("fast", false)?;
            self.api()?
                .post("fast", "/sandbox/init", &json!({}))
                .await?;
            http::wait_200(self.http, &self.host("fast"), "/", Duration::from_secs(60)).await?;
            self.bench_stopped("fast", self.n.npm_runs, true).await
        }
        .await;
        self.note_err("wake from stopped (2 CPUs)", r);
        // The outside rows (measured in B1, where no idle policy interferes) go beside
        // sandboxd's own paused and stopped wakes.
        let (outside, mut rows): (Vec<_>, Vec<_>) = std::mem::take(&mut self.report.wake)
            .into_iter()
            .partition(|r| r.label.starts_with("wake after an outside"));
        let at = rows
            .iter()
            .rposition(|r| r.label.starts_with("wake from paused"))
            .map_or(rows.len(), |i| i + 1);
        rows.splice(at..at, outside);
        self.report.wake = rows;
        self.report.settings.push((
            "cold start and wake".into(),
            format!(
                "{} timed runs each after one untimed run (npm variant: {}); cold = `POST /sandbox/exit` (container removed, user and workspace kept) then the timed GET, with no idle policy; paused and stopped = by sandboxd's idle policy (`idle_pause_after` 1 s; `idle_stop_after` 1 s for the stopped runs; checked every 100 ms), waited for through the engine and then `GET /sandbox/status` (which returns once sandboxd has recorded the transition) before the timed GET",
                self.n.wake_runs, self.n.npm_runs
            ),
        ));
        Ok(())
    }

    /// The floors of the cold first hit and of the wake from stopped, without sandboxd: the same
    /// image, limits and hardening (`spec::container_config` at the configured CPU quota, no
    /// boot boost), the same app started directly as the container's command
    /// (`node server.js`, no init of the image), timed from the engine call to the app's first
    /// 200 on the container's address (polled every 5 ms). Cold = create + start + the app's
    /// boot; wake = start of the same, stopped container + the app's boot.
    async fn bench_floors(&mut self, runs: usize) -> Result<()> {
        self.step(&format!("floors without sandboxd ({runs} runs)"));
        let user = "floor";
        self.write_app(user, false)?;
        let mut cfg = Config::load(None, self.env(&[]))?;
        cfg.limits.boot_nano_cpus = cfg.limits.nano_cpus;
        let uid = UserId::parse(user).map_err(|e| anyhow!("{e}"))?;
        let mut spec = sandboxd::sandbox::spec::container_config(
            &cfg,
            &uid,
            &self.ws.join(format!("user-{user}")),
        );
        spec.cmd = Some(vec!["node".into(), "server.js".into()]);
        // Not sandboxd's (it never adopts it); the instance label lets the cleanup find it.
        if let Some(l) = spec.labels.as_mut() {
            l.remove(sandboxd::sandbox::spec::LABEL_MANAGED);
        }
        let (mut cold, mut wake, mut cold_rows, mut wake_rows) = (vec![], vec![], vec![], vec![]);
        for i in 0..=runs {
            let name = format!("{}-floor-{i}", self.opts.instance);
            let _ = std::fs::remove_file(self.listen_file(user));
            let (t0, t) = (now_ms(), Instant::now());
            let id = self
                .docker
                .create_container(
                    Some(CreateContainerOptions {
                        name: name.as_str(),
                        platform: None,
                    }),
                    spec.clone(),
                )
                .await?
                .id;
            let measured = async {
                self.docker
                    .start_container(&id, None::<StartContainerOptions<String>>)
                    .await?;
                self.until_200(&id).await?;
                let total = t.elapsed().as_secs_f64() * 1e3;
                let cold_b = self.breakdown(user, t0, total, true).await;
                self.docker
                    .stop_container(&id, Some(StopContainerOptions { t: 1 }))
                    .await?;
                self.wait_status(&id, "exited", Duration::from_secs(20))
                    .await?;
                let _ = std::fs::remove_file(self.listen_file(user));
                let (w0, w) = (now_ms(), Instant::now());
                self.docker
                    .start_container(&id, None::<StartContainerOptions<String>>)
                    .await?;
                self.until_200(&id).await?;
                let wtotal = w.elapsed().as_secs_f64() * 1e3;
                let wake_b = self.breakdown(user, w0, wtotal, false).await;
                Ok::<_, anyhow::Error>((total, cold_b, wtotal, wake_b))
            }
            .await;
            self.remove_containers(vec![id]).await;
            let (total, cold_b, wtotal, wake_b) = measured?;
            if i > 0 {
                cold.push(total);
                wake.push(wtotal);
                cold_rows.extend(cold_b);
                wake_rows.extend(wake_b);
            }
        }
        self.report.wake.push(TimedRow {
            label: FLOOR_WAKE.into(),
            ms: summarize(&wake),
            note: "no sandboxd: `docker start` of a stopped container with the sandbox's image, limits (0.5 CPU) and hardening, whose command is the app itself (`node server.js`), until its first 200 on the container's address".into(),
        });
        self.report.wake.push(TimedRow {
            label: FLOOR_COLD.into(),
            ms: summarize(&cold),
            note: "no sandboxd: create + start of such a container until the app's first 200"
                .into(),
        });
        self.push_breakdown(FLOOR_WAKE, &wake_rows);
        self.push_breakdown(FLOOR_COLD, &cold_rows);
        Ok(())
    }

    /// Polls the app on the container's address every 5 ms until it answers 200 (60 s at most).
    async fn until_200(&self, id: &str) -> Result<()> {
        let ip = self.inspect(id).await?.ip.context("container address")?;
        let addr = SocketAddr::new(ip, 5173);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(t) = http::timed_get(addr, "floor", "/", Duration::from_secs(5)).await {
                if t.status == 200 {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("the floor container's app did not answer 200 within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until the engine reports `docker_state` and sandboxd's status says `state`.
    async fn wait_state(&self, user: &str, docker_state: &str, state: &str) -> Result<()> {
        let id = self.container_of(user).await?;
        self.wait_status(&id, docker_state, Duration::from_secs(20))
            .await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (s, v) = self
                .api()?
                .call(user, Method::GET, "/sandbox/status", None)
                .await?;
            if s.is_success() && v["state"] == state {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("sandboxd says {v} for {user}, not {state}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// One timed first hit on a fresh connection; must answer 200.
    async fn first_hit(&self, user: &str) -> Result<(f64, f64)> {
        let t0 = now_ms();
        let t = http::timed_get(self.http, &self.host(user), "/", Duration::from_secs(60)).await?;
        if t.status != 200 || t.body_len != SMALL_BODY {
            bail!(
                "first hit for {user}: status {} after {:.0} ms: {}",
                t.status,
                t.head.as_secs_f64() * 1e3,
                t.body
            );
        }
        Ok((t0, t.head.as_secs_f64() * 1e3))
    }

    async fn breakdown(&self, user: &str, t0: f64, total: f64, cold: bool) -> Option<Breakdown> {
        let id = self.container_of(user).await.ok()?;
        let i = self.inspect(&id).await.ok()?;
        let (origin, listen) = self.read_listen(user)?;
        Some(Breakdown {
            label: String::new(),
            created: cold.then_some(i.created_ms - t0),
            running: i.started_ms - t0,
            app_process: origin - t0,
            listening: listen - t0,
            first_byte: total,
            cpu: sys::cgroup_cpu(&id),
        })
    }

    fn push_breakdown(&mut self, label: &str, rows: &[Breakdown]) {
        if rows.is_empty() {
            return;
        }
        let m = |f: fn(&Breakdown) -> f64| median(&rows.iter().map(f).collect::<Vec<_>>());
        let created = rows.iter().filter_map(|b| b.created).collect::<Vec<_>>();
        let cpu = rows.iter().filter_map(|b| b.cpu).collect::<Vec<_>>();
        self.report.breakdown.push(Breakdown {
            label: label.into(),
            created: (!created.is_empty()).then(|| median(&created)),
            running: m(|b| b.running),
            app_process: m(|b| b.app_process),
            listening: m(|b| b.listening),
            first_byte: m(|b| b.first_byte),
            cpu: (!cpu.is_empty()).then(|| {
                (
                    median(&cpu.iter().map(|c| c.0).collect::<Vec<_>>()),
                    median(&cpu.iter().map(|c| c.1).collect::<Vec<_>>()),
                )
            }),
        });
    }

    async fn bench_cold(&mut self, user: &str, npm: bool, runs: usize) -> Result<()> {
        self.step(&format!("cold first hits ({user}, {runs} runs)"));
        self.write_app(user, npm)?;
        self.api()?.post(user, "/sandbox/init", &json!({})).await?;
        http::wait_200(self.http, &self.host(user), "/", Duration::from_secs(120)).await?;
        let (mut samples, mut rows) = (vec![], vec![]);
        for i in 0..=runs {
            self.api()?.post(user, "/sandbox/exit", &json!({})).await?;
            let _ = std::fs::remove_file(self.listen_file(user));
            tokio::time::sleep(Duration::from_millis(300)).await;
            let (t0, total) = self.first_hit(user).await?;
            if i > 0 {
                samples.push(total);
                if let Some(b) = self.breakdown(user, t0, total, true).await {
                    rows.push(b);
                }
            }
        }
        let (label, note) = if npm {
            (
                "cold first hit, app started by `npm run dev` (default command)",
                "as above, without `preview.json`: `sandboxd-init` runs the default `npm run dev -- --host 0.0.0.0 --port 5173`, whose script is `node server.js`",
            )
        } else {
            (
                "cold first hit (user known, no container)",
                "`POST /sandbox/exit` removed the container; the GET creates and starts one; `.sandboxd/preview.json` runs `node server.js`",
            )
        };
        self.report.wake.push(TimedRow {
            label: label.into(),
            ms: summarize(&samples),
            note: note.into(),
        });
        self.push_breakdown(label, &rows);
        Ok(())
    }

    async fn bench_paused(&mut self) -> Result<()> {
        self.step("wake from paused");
        let mut samples = vec![];
        for i in 0..=self.n.wake_runs {
            self.wait_state("cold", "paused", "paused").await?;
            let (_, total) = self.first_hit("cold").await?;
            if i > 0 {
                samples.push(total);
            }
        }
        self.report.wake.push(TimedRow {
            label: "wake from paused".into(),
            ms: summarize(&samples),
            note: "paused by the idle policy after 1 s; the GET unpauses it".into(),
        });
        Ok(())
    }

    /// Wake after the sandbox was paused or stopped behind sandboxd's back (`docker pause`,
    /// `docker stop -t 1`): sandboxd learns it from the engine's event stream, not from the API.
    async fn bench_outside(&mut self, user: &str, how: &str, runs: usize) -> Result<()> {
        self.step(&format!(
            "wake after an outside {how} ({user}, {runs} runs)"
        ));
        let mut samples = vec![];
        for i in 0..=runs {
            let id = self.container_of(user).await?;
            // The app is up, so the sample is the wake (and, after a stop, the app's start).
            http::wait_200(self.http, &self.host(user), "/", Duration::from_secs(60)).await?;
            let (args, want): (Vec<&str>, &str) = match how {
                "pause" => (vec!["pause", &id], "paused"),
                _ => (vec!["stop", "-t", "1", &id], "exited"),
            };
            let out = tokio::process::Command::new("docker")
                .args(&args)
                .output()
                .await?;
            if !out.status.success() {
                bail!(
                    "docker {args:?}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            self.wait_status(&id, want, Duration::from_secs(20)).await?;
            // No API call in between: the event stream is what tells sandboxd.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let _ = std::fs::remove_file(self.listen_file(user));
            let (_, total) = self.first_hit(user).await?;
            if i > 0 {
                samples.push(total);
            }
        }
        let note = match how {
            "pause" => "`docker pause` outside sandboxd (no idle policy); the GET unpauses it",
            _ => "`docker stop -t 1` outside sandboxd (no idle policy); the GET starts the same container again",
        };
        self.report.wake.push(TimedRow {
            label: format!("wake after an outside {how}"),
            ms: summarize(&samples),
            note: note.into(),
        });
        Ok(())
    }

    /// Wake from stopped for `user` (whose sandbox exists); `fast` = the comparison row of a
    /// sandbox without the CPU limit.
    async fn bench_stopped(&mut self, user: &str, runs: usize, fast: bool) -> Result<()> {
        self.step(&format!("wake from stopped ({user}, {runs} runs)"));
        let (mut samples, mut rows) = (vec![], vec![]);
        for i in 0..=runs {
            self.wait_state(user, "exited", "stopped").await?;
            let _ = std::fs::remove_file(self.listen_file(user));
            let (t0, total) = self.first_hit(user).await?;
            if i > 0 {
                samples.push(total);
                if let Some(b) = self.breakdown(user, t0, total, false).await {
                    rows.push(b);
                }
            }
        }
        let (label, note) = if fast {
            (
                "for comparison: wake from stopped, sandbox with 2 CPUs",
                "as above, for a sandbox created with `cpus = 2`: what the 0.5-CPU quota costs",
            )
        } else {
            (
                "wake from stopped",
                "stopped by the idle policy after 1 s; the GET starts the same container again",
            )
        };
        let row = TimedRow {
            label: label.into(),
            ms: summarize(&samples),
            note: note.into(),
        };
        if fast {
            self.report.wake.push(row);
        } else {
            // Listed before the paused row, the order of the targets.
            let at = self
                .report
                .wake
                .iter()
                .position(|r| r.label.starts_with("wake from paused"))
                .unwrap_or(self.report.wake.len());
            self.report.wake.insert(at, row);
        }
        self.push_breakdown(label, &rows);
        Ok(())
    }

    fn crowd_users(&self) -> Vec<String> {
        (1..=self.n.crowd).map(|i| format!("c{i:02}")).collect()
    }

    /// N known users without containers hit their previews at once. Returns the host's
    /// MemAvailable (KiB) from before the hits, for [`Ctx::paused_memory`].
    async fn bench_crowd(&mut self) -> Result<u64> {
        let n = self.n.crowd;
        self.step(&format!("{n} users' first hits at once"));
        let users = self.crowd_users();
        for u in &users {
            self.write_app(u, false)?;
        }
        let this: &Ctx = self;
        let api = this.api()?;
        let results: Vec<Result<()>> = stream::iter(users.iter())
            .map(|u| async move {
                api.post(u, "/sandbox/init", &json!({})).await?;
                http::wait_200(this.http, &this.host(u), "/", Duration::from_secs(120)).await?;
                api.post(u, "/sandbox/exit", &json!({})).await?;
                Ok(())
            })
            .buffer_unordered(4)
            .collect()
            .await;
        results.into_iter().collect::<Result<Vec<()>>>()?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mem_before = sys::meminfo_kib("MemAvailable");
        let t = Instant::now();
        let hosts: Vec<String> = users.iter().map(|u| self.host(u)).collect();
        let hits = futures_util::future::join_all(
            hosts
                .iter()
                .map(|h| http::timed_get(self.http, h, "/", Duration::from_secs(60))),
        )
        .await;
        let wall = t.elapsed().as_secs_f64() * 1e3;
        let mut samples = vec![];
        let mut failures: Vec<String> = vec![];
        for (u, h) in users.iter().zip(hits) {
            match h {
                Ok(t) if t.status == 200 => samples.push(t.head.as_secs_f64() * 1e3),
                Ok(t) => {
                    let code = serde_json::from_str::<serde_json::Value>(&t.body)
                        .ok()
                        .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
                        .unwrap_or_else(|| t.body.chars().take(80).collect());
                    failures.push(format!(
                        "{u}: {} `{code}` after {}",
                        t.status,
                        ms(t.head.as_secs_f64() * 1e3)
                    ));
                }
                Err(e) => failures.push(format!("{u}: {e:#}")),
            }
        }
        let ok = samples.len();
        let mut note = format!(
            "{n} known users without containers, one GET each, all sent together; {ok} of {n} answered 200 (percentiles over those), the last after {}",
            ms(wall)
        );
        if !failures.is_empty() {
            note.push_str(&format!(
                "; **{} failed**: {}",
                failures.len(),
                failures.join(", ")
            ));
            self.report.notes.push(format!(
                "{} of {n} concurrent first hits did not get a 200: {}",
                failures.len(),
                failures.join(", ")
            ));
        }
        self.report.wake.push(TimedRow {
            label: format!("{n} {CROWD} (per user)"),
            ms: summarize(&samples),
            note,
        });
        Ok(mem_before)
    }

    /// The floor of the N first hits at once, without sandboxd: N containers made from the same
    /// spec as the cold floor (the sandbox's image, limits at the configured CPU quota without
    /// the boot boost, hardening, network; the app itself as the command), each created and
    /// started at the same moment, each timed until its app's first 200 on the container's
    /// address (polled every 5 ms). Same N, same phase as the crowd of sandboxd users.
    async fn bench_crowd_floor(&mut self) -> Result<()> {
        let n = self.n.crowd;
        self.step(&format!("floor: {n} starts at once without sandboxd"));
        let mut cfg = Config::load(None, self.env(&[]))?;
        cfg.limits.boot_nano_cpus = cfg.limits.nano_cpus;
        let mut specs = vec![];
        for i in 1..=n {
            let user = format!("cf{i:02}");
            self.write_app(&user, false)?;
            let uid = UserId::parse(&user).map_err(|e| anyhow!("{e}"))?;
            let mut spec = sandboxd::sandbox::spec::container_config(
                &cfg,
                &uid,
                &self.ws.join(format!("user-{user}")),
            );
            spec.cmd = Some(vec!["node".into(), "server.js".into()]);
            // Not sandboxd's (it never adopts it); the instance label lets the cleanup find it.
            if let Some(l) = spec.labels.as_mut() {
                l.remove(sandboxd::sandbox::spec::LABEL_MANAGED);
            }
            specs.push((format!("{}-crowd-floor-{i}", self.opts.instance), spec));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let t = Instant::now();
        let this: &Ctx = self;
        // Each start: (the container, if created; the time to its app's first 200).
        let runs: Vec<(Option<String>, Result<f64>)> =
            futures_util::future::join_all(specs.into_iter().map(|(name, spec)| async move {
                let id = match this
                    .docker
                    .create_container(
                        Some(CreateContainerOptions {
                            name: name.as_str(),
                            platform: None,
                        }),
                        spec,
                    )
                    .await
                {
                    Ok(c) => c.id,
                    Err(e) => return (None, Err(e.into())),
                };
                let timed = async {
                    this.docker
                        .start_container(&id, None::<StartContainerOptions<String>>)
                        .await?;
                    this.until_200(&id).await?;
                    Ok(t.elapsed().as_secs_f64() * 1e3)
                }
                .await;
                (Some(id), timed)
            }))
            .await;
        let wall = t.elapsed().as_secs_f64() * 1e3;
        let ids: Vec<String> = runs.iter().filter_map(|(id, _)| id.clone()).collect();
        self.remove_containers(ids).await;
        let mut samples = vec![];
        for (_, r) in runs {
            samples.push(r?);
        }
        self.report.wake.push(TimedRow {
            label: FLOOR_CROWD.into(),
            ms: summarize(&samples),
            note: format!(
                "no sandboxd: {n} containers like the cold floor's (image, limits at 0.5 CPU, hardening, the app as the command), created and started all at once, each until its app's first 200; the last after {}",
                ms(wall)
            ),
        });
        Ok(())
    }

    /// Host memory per idle paused sandbox: the crowd's sandboxes, once the idle policy paused
    /// them all, against the host's MemAvailable from before they were started.
    async fn paused_memory(&mut self, mem_before: u64) -> Result<()> {
        let users = self.crowd_users();
        let n = users.len();
        let mut ids = vec![];
        for u in &users {
            self.wait_state(u, "paused", "paused").await?;
            ids.push(self.container_of(u).await?);
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mem_after = sys::meminfo_kib("MemAvailable");
        let (mut usage, mut anon, mut shim) = (vec![], vec![], vec![]);
        for id in &ids {
            if let Some((u, a)) = sys::cgroup_memory(id) {
                usage.push(u as f64 / 1048576.0);
                anon.push(a as f64 / 1048576.0);
            }
            if let Some(p) = sys::shim_pss_kib(id) {
                shim.push(p as f64 / 1024.0);
            }
        }
        let delta = (mem_before as f64 - mem_after as f64) / 1024.0 / n as f64;
        let (cg, sh) = (median(&usage), median(&shim));
        self.report.footprint.push(Fact {
            label: "host memory per idle paused sandbox".into(),
            value: format!("{:.1} MiB", cg + sh),
            note: format!(
                "{n} sandboxes with the Node app listening, paused by the idle policy: median memory charged to the container's cgroup plus its containerd shim (next two rows)"
            ),
        });
        self.report.footprint.push(Fact {
            label: "… charged to the sandbox's cgroup".into(),
            value: format!("{cg:.1} MiB"),
            note: format!(
                "median memory usage of the {} containers' cgroups (processes: init, `sandboxd-init`, the app; anonymous memory {:.1} MiB, the rest page cache and kernel memory)",
                usage.len(),
                median(&anon)
            ),
        });
        self.report.footprint.push(Fact {
            label: "… the containerd shim".into(),
            value: format!("{sh:.1} MiB"),
            note: "median PSS of `containerd-shim-runc-v2` per container".into(),
        });
        self.report.footprint.push(Fact {
            label: "… cross-check: drop of the host's MemAvailable per sandbox".into(),
            value: format!("{delta:.1} MiB"),
            note: format!(
                "from before the {n} first hits to when all {n} were paused, divided by {n}; includes everything else the host did meanwhile, so only meaningful on an otherwise idle machine (load average at the end: {})",
                sys::loadavg()
            ),
        });
        Ok(())
    }
}
