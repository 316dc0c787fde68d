//! `tributary bench history`: what a long history costs the embedded server — its resident
//! memory and its restart-to-ready time after 1,000, 10,000, 50,000... finished builds.
//!
//! One real build of a one-line job runs first on a `tributary up` started here; its events
//! are the template. With the server stopped, copies of the template (fresh build, event and
//! lease ids, times shifted) are appended to its SQLite log until the log holds each wanted
//! number of finished builds; each time the server is started again and measured:
//! * **ready**: from the start of the process to its first answered `ListBuilds` (the API
//!   answers once its folds have caught up with the log);
//! * **caught up**: until the builds read model has the newest copied build;
//! * **RSS** once caught up and settled, and again after `--live` real builds ran on it.
//!
//! Targets (issue 14): RSS after the history ≤ 2 × the idle RSS of a fresh server, ready
//! ≤ 1 s, both flat in the number of builds.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use tributary_eventlog::sqlite::SqliteLog;
use tributary_eventlog::EventLog;
use tributary_proto::api::{self, builds_client::BuildsClient, projects_client::ProjectsClient};
use tributary_proto::events::{envelope::Payload, Envelope};

use crate::bench::server::{git, memory, ms, Spawned};

const PIPELINE: &str = "jobs:\n  hello:\n    steps:\n      - run: echo hello\n";
const TARGET_READY_MS: f64 = 1000.0;
const TARGET_RSS_FACTOR: f64 = 2.0;

pub struct Options {
    /// Finished builds in the log at each measurement, ascending.
    pub builds: Vec<u64>,
    /// Real builds run after each restart (RSS with work on top of the history).
    pub live: usize,
}

pub async fn bench_history(opts: Options) -> anyhow::Result<ExitCode> {
    let mut targets = opts.builds.clone();
    targets.sort_unstable();
    targets.dedup();
    anyhow::ensure!(
        targets.first().is_some_and(|n| *n >= 1),
        "--builds needs at least one count >= 1, e.g. --builds 1000,10000,50000"
    );
    let tmp = tempfile::tempdir()?;
    let repo = tmp.path().join("repo");
    make_repo(&repo)?;
    println!(
        "bench history: finished one-job builds in the embedded log (copies of a real build), \
         then `tributary up` restarted and measured; {} real builds on top each time",
        opts.live
    );

    // The template: one real build on a fresh server.
    let (server, url, token) = Spawned::start(tmp.path(), 1, 4).await?;
    let client = Client::connect(&url, &token).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = memory(server.pid()).map(|m| m.rss_mib);
    let mut projects = client.projects();
    projects
        .create_project(api::CreateProjectRequest {
            name: "history".into(),
            repository: repo.display().to_string(),
            ..Default::default()
        })
        .await
        .map_err(status)?;
    let template_id = client.run_builds(1).await?.remove(0);
    server.stop().await?;
    let log = SqliteLog::open(&tmp.path().join("data").join("events.db")).await?;
    let template = template_events(&log, &template_id).await?;
    match idle {
        Some(rss) => println!(
            "  template: build {template_id}, {} events; idle RSS of a fresh server {rss:.1} MiB",
            template.len()
        ),
        None => println!(
            "  template: build {template_id}, {} events; RSS unavailable (no /proc?)",
            template.len()
        ),
    }
    println!(
        "  {:>8} {:>9} {:>10} {:>11} {:>12} {:>14}",
        "builds", "events", "ready", "caught up", "RSS", "RSS after live"
    );

    let mut have: u64 = 1 + opts.live as u64;
    let mut met = true;
    for target in targets {
        let last = append_copies(&log, &template, target.saturating_sub(have)).await?;
        have = have.max(target);
        let events = log.end_offset().await?;
        let started = Instant::now();
        let (server, url, _) = Spawned::start(tmp.path(), 1, 4).await?;
        let client = Client::connect(&url, &token).await?;
        let ready = client.first_answer(started).await?;
        let caught_up = match &last {
            Some(id) => client.until_known(id, started).await?,
            None => ready,
        };
        // Settled: past the server's next allocator trim (crate::memory).
        tokio::time::sleep(crate::memory::TRIM_EVERY + Duration::from_secs(1)).await;
        let rss = memory(server.pid()).map(|m| m.rss_mib);
        client.run_builds(opts.live).await?;
        have += opts.live as u64;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss_live = memory(server.pid()).map(|m| m.rss_mib);
        server.stop().await?;
        let mib = |m: Option<f64>| m.map_or("n/a".to_owned(), |m| format!("{m:.1} MiB"));
        println!(
            "  {target:>8} {events:>9} {:>8.0} ms {:>8.0} ms {:>12} {:>14}",
            ms(ready),
            ms(caught_up),
            mib(rss),
            mib(rss_live)
        );
        met &= ms(ready) <= TARGET_READY_MS;
        if let (Some(idle), Some(rss)) = (idle, rss) {
            met &= rss <= TARGET_RSS_FACTOR * idle;
        }
    }
    println!(
        "  targets: ready <= {TARGET_READY_MS} ms and RSS <= {TARGET_RSS_FACTOR} x idle at every \
         size: {}",
        if met { "met" } else { "MISSED" }
    );
    Ok(ExitCode::SUCCESS)
}

/// Every event of build `id`, in log order.
async fn template_events(log: &SqliteLog, id: &str) -> anyhow::Result<Vec<Envelope>> {
    let mut out = Vec::new();
    let mut from = 0;
    loop {
        let records = log.read_key(id, from, 1000).await?;
        let Some(last) = records.last() else { break };
        from = last.offset + 1;
        for r in &records {
            out.push(r.decode().context("the template build has a bad record")?);
        }
    }
    anyhow::ensure!(
        out.iter()
            .any(|e| matches!(e.payload, Some(Payload::BuildFinished(_)))),
        "the template build {id} has no BuildFinished"
    );
    Ok(out)
}

/// Appends `n` copies of `template` (fresh build, event and lease ids; times moved so that the
/// copies follow each other); returns the last copy's build id.
async fn append_copies(
    log: &SqliteLog,
    template: &[Envelope],
    n: u64,
) -> anyhow::Result<Option<String>> {
    let Some(first) = template.first() else {
        return Ok(None);
    };
    let span = template.last().map_or(0, |l| l.time_us - first.time_us) + 1000;
    let lease = template.iter().find_map(|e| match &e.payload {
        Some(Payload::JobAssigned(a)) => Some(a.lease_id.clone()),
        _ => None,
    });
    let mut batch = Vec::with_capacity(4096);
    let mut last = None;
    let base = tributary_proto::now_us();
    for k in 0..n {
        let build = tributary_proto::new_id();
        let new_lease = tributary_proto::new_id();
        for e in template {
            let mut e = e.clone();
            e.build_id.clone_from(&build);
            e.event_id = tributary_proto::new_id();
            e.time_us = base + (k as i64) * span + (e.time_us - first.time_us);
            if let Some(old) = &lease {
                relabel_lease(&mut e, old, &new_lease);
            }
            batch.push(e);
        }
        last = Some(build);
        if batch.len() >= 4000 {
            log.append(&batch).await?;
            batch.clear();
        }
    }
    if !batch.is_empty() {
        log.append(&batch).await?;
    }
    Ok(last)
}

fn relabel_lease(e: &mut Envelope, old: &str, new: &str) {
    let field = match &mut e.payload {
        Some(Payload::JobAssigned(a)) => &mut a.lease_id,
        Some(Payload::JobStarted(a)) => &mut a.lease_id,
        Some(Payload::JobRequeued(a)) => &mut a.lease_id,
        _ => return,
    };
    if field == old {
        *field = new.to_owned();
    }
}

fn make_repo(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    git(dir, &["init", "-q", "-b", "main"])?;
    std::fs::write(dir.join(".tributary.yml"), PIPELINE)?;
    git(dir, &["add", ".tributary.yml"])?;
    git(dir, &["commit", "-qm", "bench: one trivial job"])?;
    Ok(())
}

fn status(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", e.message(), e.code())
}

/// The benchmark's gRPC client (admin token).
struct Client {
    channel: tonic::transport::Channel,
    bearer: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
}

/// Adds the bearer token to a call.
type Auth = Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;
type Svc = tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Auth>;

impl Client {
    async fn connect(url: &str, token: &str) -> anyhow::Result<Client> {
        let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
            .with_context(|| format!("bad server address {url}"))?
            .connect_lazy();
        let bearer = format!("Bearer {}", token.trim())
            .parse()
            .context("the token contains characters that cannot be sent")?;
        Ok(Client { channel, bearer })
    }

    fn interceptor(&self) -> Auth {
        let bearer = self.bearer.clone();
        Box::new(move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert("authorization", bearer.clone());
            Ok(req)
        })
    }

    fn builds(&self) -> BuildsClient<Svc> {
        BuildsClient::with_interceptor(self.channel.clone(), self.interceptor())
    }

    fn projects(&self) -> ProjectsClient<Svc> {
        ProjectsClient::with_interceptor(self.channel.clone(), self.interceptor())
    }

    /// The time from `started` to the first answered ListBuilds.
    async fn first_answer(&self, started: Instant) -> anyhow::Result<Duration> {
        until_ok(started, "the restarted server did not answer", 5, || {
            let mut builds = self.builds();
            async move {
                builds
                    .list_builds(api::ListBuildsRequest {
                        limit: 1,
                        ..Default::default()
                    })
                    .await
            }
        })
        .await
    }

    /// The time from `started` until build `id` is in the builds read model.
    async fn until_known(&self, id: &str, started: Instant) -> anyhow::Result<Duration> {
        let what = format!("build {id} was not in the read model");
        until_ok(started, &what, 20, || {
            let mut builds = self.builds();
            let build_id = id.to_owned();
            async move {
                builds
                    .get_build(api::GetBuildRequest {
                        build_id,
                        ..Default::default()
                    })
                    .await
            }
        })
        .await
    }

    /// Runs `n` builds of project `history` at `main`, 4 at a time; returns their ids once all
    /// finished (each must succeed).
    async fn run_builds(&self, n: usize) -> anyhow::Result<Vec<String>> {
        let mut ids = Vec::new();
        for chunk in (0..n).collect::<Vec<_>>().chunks(4) {
            let mut wave = Vec::new();
            for _ in chunk {
                let id = self
                    .builds()
                    .trigger_build(api::TriggerBuildRequest {
                        project: "history".into(),
                        git_ref: "main".into(),
                        ..Default::default()
                    })
                    .await
                    .map_err(status)?
                    .into_inner()
                    .build_id;
                wave.push(id);
            }
            for id in &wave {
                self.until_finished(id).await?;
            }
            ids.extend(wave);
        }
        Ok(ids)
    }

    async fn until_finished(&self, id: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut builds = self.builds();
        loop {
            let b = builds
                .get_build(api::GetBuildRequest {
                    build_id: id.to_owned(),
                    ..Default::default()
                })
                .await
                .map_err(status)?
                .into_inner();
            if b.status == "succeeded" {
                return Ok(());
            }
            anyhow::ensure!(
                b.status != "failed" && b.status != "canceled",
                "build {id} did not succeed (`tributary get {id}`)"
            );
            anyhow::ensure!(
                Instant::now() < deadline,
                "build {id} did not finish within 2 minutes"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Calls `call` every `every_ms` until it answers; the time from `started` then. Gives up after
/// 10 minutes saying `what` and the last error.
async fn until_ok<T, F, Fut>(
    started: Instant,
    what: &str,
    every_ms: u64,
    mut call: F,
) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    loop {
        let r = call().await;
        if r.is_ok() {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "{what} within 10 minutes: {:?}",
            r.err()
        );
        tokio::time::sleep(Duration::from_millis(every_ms)).await;
    }
}
