//! `tributary bench server`: end-to-end figures of a server — one it starts here (`tributary
//! up` on a temporary data directory and a free port), or an existing one (--server).
//!
//! Every latency is measured by this client from the moment it sends the request to the
//! moment it receives the answer on a stream, so it includes the API, the git work of a
//! trigger, the log (group commits and `fsync`), the scheduler, the agent, the shell and the
//! delivery back to a client: what a user watching a build sees.
//!
//! * Builds: N builds of a one-line job, triggered by C concurrent triggerers; one
//!   `WatchEvents` stream (line_started, build_finished of the benchmark's project, opened
//!   before the first trigger) gives trigger → first line and trigger → finished per build.
//! * Tail: one build printing [`TAIL_LINES`] lines, each the wall-clock time in µs when it was
//!   printed, followed with `TailLogs(follow)`; latency = receive time − printed time (same
//!   machine, same clock; against a remote --server it includes the clock offset).
//! * RSS: VmRSS of the server process, idle (before the first trigger) and after the run; only
//!   for a server started here.
//! * Phases: afterwards, the same builds' events are read back and their timestamps split the
//!   trigger → first line latency into steps (not part of the timed run).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};
use tributary_proto::api::{
    self, admin_client::AdminClient, builds_client::BuildsClient, projects_client::ProjectsClient,
};
use tributary_proto::events::{envelope::Payload, Status as BuildStatus};
use tributary_proto::now_us;

/// The pipeline of the measured builds: one job, one trivial line.
const BUILD_PIPELINE: &str = "jobs:\n  hello:\n    steps:\n      - run: echo hello\n";
/// The branch whose pipeline prints timestamps, for the tail latency.
const TAIL_REF: &str = "bench-tail";
/// Lines the tail build prints (one every 10 ms, plus the time `date` takes).
const TAIL_LINES: usize = 200;
const TAIL_PIPELINE: &str = "jobs:\n  tail:\n    steps:\n      - run: 'for i in $(seq 200); do date +%s%6N; sleep 0.01; done'\n";

/// Targets shown next to the figures (docs/PERFORMANCE.md).
const TARGET_FIRST_LINE_P99_MS: f64 = 25.0;
const TARGET_BUILDS_PER_SEC: f64 = 300.0;
const TARGET_TAIL_P99_MS: f64 = 50.0;
const TARGET_IDLE_RSS_MB: f64 = 40.0;
/// Read-your-write: the build just triggered, read back (issue 14).
const TARGET_GET_AFTER_TRIGGER_P99_MS: f64 = 5.0;

pub struct Options {
    pub builds: usize,
    pub concurrency: usize,
    pub agents: usize,
    pub agent_capacity: usize,
    pub server: Option<String>,
    pub token: Option<String>,
    /// Trigger by branch name rather than at the branch's commit.
    pub by_branch: bool,
    /// At most this many builds in flight (triggered, not finished); `None`: no limit.
    pub in_flight: Option<usize>,
    /// Builds measured one at a time first, for the latency on an idle server.
    pub latency_builds: usize,
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
struct Bearer(MetadataValue<Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

type Svc = InterceptedService<Channel, Bearer>;

/// A gRPC error as a person reads it.
fn status(e: Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", e.message(), e.code())
}

pub async fn bench_server(opts: Options) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(opts.builds > 0, "--builds must be at least 1");
    let concurrency = opts.concurrency.clamp(1, opts.builds);
    let tmp = tempfile::tempdir()?;
    let repo = tmp.path().join("repo");
    let main_commit = make_repo(&repo)?;
    // What each build is triggered at: the branch, or its commit as a push webhook sends it.
    let at = if opts.by_branch {
        "main".to_owned()
    } else {
        main_commit
    };

    // The server: ours (started and stopped here) or the one given.
    let (mut spawned, url, token) = match &opts.server {
        Some(url) => {
            let token = match &opts.token {
                Some(t) => t.clone(),
                None => std::env::var("TRIBUTARY_TOKEN")
                    .context("--server needs --token (or TRIBUTARY_TOKEN)")?,
            };
            (None, url.clone(), token)
        }
        None => {
            let (server, url, token) =
                Spawned::start(tmp.path(), opts.agents, opts.agent_capacity).await?;
            (Some(server), url, token)
        }
    };
    let result = run(
        &opts,
        concurrency,
        &repo,
        &at,
        spawned.as_ref(),
        &url,
        &token,
    )
    .await;
    if let (Err(_), Some(server)) = (&result, &spawned) {
        eprintln!(
            "the server's last log lines:\n{}",
            last_lines(&server.log_path)
        );
    }
    if let Some(server) = spawned.take() {
        match server.stop().await {
            Ok(took) => println!("  server stopped (SIGTERM) in {:.0} ms", ms(took)),
            Err(e) => eprintln!("warning: stopping the server: {e:#}"),
        }
    }
    result
}

async fn run(
    opts: &Options,
    concurrency: usize,
    repo: &Path,
    at: &str,
    spawned: Option<&Spawned>,
    url: &str,
    token: &str,
) -> anyhow::Result<ExitCode> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .with_context(|| format!("bad server address {url}"))?
        .connect()
        .await
        .with_context(|| format!("cannot reach the server at {url}"))?;
    let bearer = Bearer(
        format!("Bearer {}", token.trim())
            .parse()
            .context("the token contains characters that cannot be sent")?,
    );
    let mut builds = BuildsClient::with_interceptor(channel.clone(), bearer.clone());
    let mut admin = AdminClient::with_interceptor(channel.clone(), bearer.clone());
    let mut projects = ProjectsClient::with_interceptor(channel, bearer);

    let id = tributary_proto::new_id();
    let project = format!("bench-{}", &id[id.len() - 12..]);
    projects
        .create_project(api::CreateProjectRequest {
            name: project.clone(),
            repository: repo.display().to_string(),
            ..Default::default()
        })
        .await
        .map_err(status)?;

    let what = match spawned {
        Some(s) => format!(
            "embedded server (`tributary up`, pid {}, {} agents x {} slots)",
            s.pid(),
            opts.agents,
            opts.agent_capacity
        ),
        None => format!("server {url}"),
    };
    if spawned.is_some() {
        wait_for_agents(&mut admin, opts.agents).await?;
        // Let the start settle (agents' first heartbeats, projector catch-up).
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let rss_idle = spawned.and_then(|s| memory(s.pid()));

    // Warm-up: the first build clones the mirror and the agents' checkouts. Its BuildFinished
    // offset is where the measured stream starts.
    let warm = builds
        .trigger_build(api::TriggerBuildRequest {
            project: project.clone(),
            git_ref: at.to_owned(),
            ..Default::default()
        })
        .await
        .map_err(status)?
        .into_inner();
    let mut stream = builds
        .watch_events(api::WatchEventsRequest {
            from: warm.from.clone(),
            build_id: warm.build_id.clone(),
            types: vec!["build_finished".into()],
            ..Default::default()
        })
        .await
        .map_err(status)?
        .into_inner();
    let ev = tokio::time::timeout(Duration::from_secs(60), stream.message())
        .await
        .context("the warm-up build did not finish within 60 s")?
        .map_err(status)?
        .context("the event stream ended before the warm-up build finished")?;
    drop(stream);
    if let Some(Payload::BuildFinished(f)) = ev.event.and_then(|e| e.payload) {
        anyhow::ensure!(
            f.status == BuildStatus::Succeeded as i32,
            "the warm-up build {} failed: {} (see `tributary get {}`)",
            warm.build_id,
            f.reason,
            warm.build_id
        );
    }
    // Positions per partition (any log: embedded or Kafka): where the warm-up build was
    // triggered, and right after its BuildFinished in its own partition.
    let mut from = warm.from.clone();
    match from.iter_mut().find(|p| p.partition == ev.partition) {
        Some(position) => position.offset = ev.offset + 1,
        None => from.push(api::Position {
            partition: ev.partition,
            offset: ev.offset + 1,
        }),
    }

    let by = if opts.by_branch {
        "by branch"
    } else {
        "at a commit"
    };
    println!("bench server: builds of one `echo` job triggered {by}; {what}");
    // Latency: one build at a time, on an otherwise idle server.
    let alone_n = opts.latency_builds.min(opts.builds);
    let alone = measure_builds(
        &builds,
        &project,
        at,
        Load {
            builds: alone_n,
            triggerers: 1,
            in_flight: Some(1),
        },
        &from,
        &HashSet::new(),
    )
    .await?;
    // Throughput: as many builds in flight as the triggerers (and --in-flight) allow.
    let measured = measure_builds(
        &builds,
        &project,
        at,
        Load {
            builds: opts.builds,
            triggerers: concurrency,
            in_flight: opts.in_flight,
        },
        &from,
        &alone.builds.keys().cloned().collect(),
    )
    .await?;
    let tail = measure_tail(&mut builds, &project).await?;
    let rss_after = spawned.and_then(|s| memory(s.pid()));

    // The report.
    let row = |label: &str, v: &[f64], target: &str| {
        println!(
            "    {label:<32} p50 {:>8.1} ms   p99 {:>8.1} ms{target}",
            pct(v, 50.0),
            pct(v, 99.0)
        );
    };
    if alone_n > 0 {
        println!(
            "  one build at a time ({alone_n} builds): the latency of a build on an idle server"
        );
        let first = alone.latencies(|b| b.first_line);
        let p99_first = pct(&first, 99.0);
        row(
            "trigger -> first line",
            &first,
            &format!(
                "   target p99 <= {TARGET_FIRST_LINE_P99_MS} ms: {}",
                verdict(p99_first <= TARGET_FIRST_LINE_P99_MS)
            ),
        );
        report_latencies(&alone, &row);
        if let Some(p) = phases(&mut builds, &project, &from, &alone).await {
            println!("    step by step (event timestamps):");
            for (name, v) in &p {
                row(&format!("  {name}"), v, "");
            }
        }
    }
    let limit = match opts.in_flight {
        Some(b) => format!("at most {b} builds in flight"),
        None => "no limit on builds in flight".to_owned(),
    };
    println!(
        "  under load ({} builds, {concurrency} concurrent triggerers, {limit}): the latencies include the queueing at that load",
        opts.builds
    );
    let ok = measured.ok().count();
    let wall = measured.wall();
    let rate = ok as f64 / wall.as_secs_f64().max(1e-9);
    println!(
        "    {:<32} {rate:.1} builds/s ({ok} builds, first trigger to last BuildFinished {:.2} s)   target >= {TARGET_BUILDS_PER_SEC}: {}",
        "sustained",
        wall.as_secs_f64(),
        verdict(rate >= TARGET_BUILDS_PER_SEC)
    );
    row(
        "trigger -> first line",
        &measured.latencies(|b| b.first_line),
        "",
    );
    report_latencies(&measured, &row);
    if let Some(p) = phases(&mut builds, &project, &from, &measured).await {
        println!("    step by step (event timestamps):");
        for (name, v) in &p {
            row(&format!("  {name}"), v, "");
        }
    }
    let failed = [&alone, &measured]
        .iter()
        .flat_map(|run| run.ok())
        .filter(|b| !matches!(b.finished, Some((_, s)) if s == BuildStatus::Succeeded as i32))
        .count();
    let p99_tail = pct(&tail.latencies, 99.0);
    println!(
        "  {:<34} p50 {:>8.1} ms   p99 {:>8.1} ms   target p99 <= {TARGET_TAIL_P99_MS} ms: {}",
        format!("log tail ({}/{TAIL_LINES} lines)", tail.latencies.len()),
        pct(&tail.latencies, 50.0),
        p99_tail,
        verdict(p99_tail <= TARGET_TAIL_P99_MS)
    );
    match (rss_idle, rss_after) {
        (Some(idle), Some(after)) => println!(
            "  {:<32} idle {:.1} MiB, after the run {:.1} MiB (peak {:.1} MiB)   target idle <= {TARGET_IDLE_RSS_MB} MB: {}",
            "server RSS",
            idle.rss_mib,
            after.rss_mib,
            after.peak_mib,
            verdict(idle.rss_mib <= TARGET_IDLE_RSS_MB)
        ),
        _ if spawned.is_some() => println!("  {:<32} unavailable (no /proc?)", "server RSS"),
        _ => println!(
            "  {:<32} not measured (--server: not our process)",
            "server RSS"
        ),
    }
    if let Some(s) = spawned {
        let text = strip_ansi(&std::fs::read_to_string(&s.log_path).unwrap_or_default());
        let noted: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .collect();
        match noted.first() {
            None => println!("  {:<32} no warnings", "server log"),
            Some(first) => println!(
                "  {:<32} {} warnings/errors, the first: {}",
                "server log",
                noted.len(),
                first
                    .split_once(' ')
                    .map_or(*first, |(_, rest)| rest.trim())
            ),
        }
    }
    let mut bad = false;
    let errors: Vec<&String> = alone.errors.iter().chain(&measured.errors).collect();
    if let Some(first) = errors.first() {
        bad = true;
        println!("  {} triggers failed, e.g.: {first}", errors.len());
    }
    if failed > 0 {
        bad = true;
        println!("  {failed} builds did not succeed");
    }
    if tail.status != "succeeded" || tail.latencies.len() != TAIL_LINES {
        bad = true;
        println!(
            "  tail build {}: {} with {} timestamp lines",
            tail.build_id,
            tail.status,
            tail.latencies.len()
        );
    }
    Ok(if bad {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// trigger -> finished and the TriggerBuild call of a run, as rows.
fn report_latencies(run: &BuildsRun, row: &impl Fn(&str, &[f64], &str)) {
    row(
        "trigger -> finished",
        &run.latencies(|b| b.finished.map(|(at, _)| at)),
        "",
    );
    let rpc: Vec<f64> = run.ok().map(|b| ms(b.rtt)).collect();
    row("TriggerBuild call", &rpc, "");
    let get: Vec<f64> = run.ok().filter_map(|b| b.get.map(ms)).collect();
    if !get.is_empty() {
        let p99 = pct(&get, 99.0);
        row(
            "GetBuild right after TriggerBuild",
            &get,
            &format!(
                "   target p99 <= {TARGET_GET_AFTER_TRIGGER_P99_MS} ms: {}",
                verdict(p99 <= TARGET_GET_AFTER_TRIGGER_P99_MS)
            ),
        );
    }
}

/// How [`measure_builds`] triggers.
#[derive(Clone, Copy)]
struct Load {
    builds: usize,
    /// Tasks calling TriggerBuild, each waiting for its call to return before the next.
    triggerers: usize,
    /// At most this many builds triggered and not finished; `None`: no limit.
    in_flight: Option<usize>,
}

/// One measured build.
struct Measured {
    sent: Instant,
    sent_us: i64,
    rtt: Duration,
    /// GetBuild sent as soon as the trigger returned, until its answer (under load only).
    get: Option<Duration>,
    first_line: Option<Instant>,
    finished: Option<(Instant, i32)>,
}

struct BuildsRun {
    builds: HashMap<String, Measured>,
    errors: Vec<String>,
}

impl BuildsRun {
    fn ok(&self) -> impl Iterator<Item = &Measured> {
        self.builds.values()
    }

    /// Milliseconds from sending the trigger to `at`, for the builds that have it.
    fn latencies(&self, at: impl Fn(&Measured) -> Option<Instant>) -> Vec<f64> {
        self.ok()
            .filter_map(|b| at(b).map(|t| ms(t.saturating_duration_since(b.sent))))
            .collect()
    }

    /// First trigger sent to last BuildFinished received.
    fn wall(&self) -> Duration {
        let start = self.ok().map(|b| b.sent).min();
        let end = self.ok().filter_map(|b| b.finished.map(|(t, _)| t)).max();
        match (start, end) {
            (Some(s), Some(e)) => e.saturating_duration_since(s),
            _ => Duration::ZERO,
        }
    }
}

/// What the stream showed of a build whose trigger call has not returned yet.
#[derive(Default)]
struct Arrivals {
    first_line: Option<Instant>,
    finished: Option<(Instant, i32)>,
}

enum Seen {
    Line,
    Finished(i32),
}

async fn measure_builds(
    client: &BuildsClient<Svc>,
    project: &str,
    at: &str,
    load: Load,
    from: &[api::Position],
    earlier: &HashSet<String>,
) -> anyhow::Result<BuildsRun> {
    let Load {
        builds: n,
        triggerers: concurrency,
        in_flight,
    } = load;
    if n == 0 {
        return Ok(BuildsRun {
            builds: HashMap::new(),
            errors: Vec::new(),
        });
    }
    // Slots of builds in flight: a triggerer takes one, the watcher gives it back when a build
    // of the (benchmark's own) project finishes.
    let slots = in_flight.map(|b| Arc::new(tokio::sync::Semaphore::new(b.max(1))));
    let freed = slots.clone();
    // One stream for every build, open before the first trigger.
    let mut stream = client
        .clone()
        .watch_events(api::WatchEventsRequest {
            from: from.to_vec(),
            project: project.to_owned(),
            types: vec!["line_started".into(), "build_finished".into()],
            ..Default::default()
        })
        .await
        .map_err(status)?
        .into_inner();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Seen, Instant)>();
    let earlier = earlier.clone();
    let watcher = tokio::spawn(async move {
        while let Ok(Some(ev)) = stream.message().await {
            let at = Instant::now();
            let Some(env) = ev.event else { continue };
            if earlier.contains(&env.build_id) {
                continue; // an earlier phase's build
            }
            let seen = match env.payload {
                Some(Payload::LineStarted(_)) => Seen::Line,
                Some(Payload::BuildFinished(f)) => {
                    if let Some(slots) = &freed {
                        slots.add_permits(1);
                    }
                    Seen::Finished(f.status)
                }
                _ => continue,
            };
            if tx.send((env.build_id, seen, at)).is_err() {
                return;
            }
        }
    });

    let next = Arc::new(AtomicUsize::new(0));
    let mut triggerers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let mut client = client.clone();
        let next = next.clone();
        let project = project.to_owned();
        let at = at.to_owned();
        let slots = slots.clone();
        triggerers.spawn(async move {
            let mut out = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < n {
                if let Some(slots) = &slots {
                    match slots.acquire().await {
                        Ok(slot) => slot.forget(), // given back by the watcher
                        Err(_) => break,
                    }
                }
                let sent = Instant::now();
                let sent_us = now_us();
                let r = client
                    .trigger_build(api::TriggerBuildRequest {
                        project: project.clone(),
                        git_ref: at.clone(),
                        ..Default::default()
                    })
                    .await;
                let rtt = sent.elapsed();
                if let (Err(_), Some(slots)) = (&r, &slots) {
                    slots.add_permits(1); // no build to finish
                }
                let r = r.map(|r| r.into_inner().build_id);
                // Read-your-write: GetBuild right after the trigger returned must show it.
                let get = match &r {
                    Ok(id) => {
                        let asked = Instant::now();
                        let got = client
                            .get_build(api::GetBuildRequest {
                                build_id: id.clone(),
                                ..Default::default()
                            })
                            .await;
                        Some(got.map(|_| asked.elapsed()).map_err(|e| {
                            format!(
                                "GetBuild right after TriggerBuild: {} ({:?})",
                                e.message(),
                                e.code()
                            )
                        }))
                    }
                    Err(_) => None,
                };
                out.push((sent, sent_us, rtt, get, r));
            }
            out
        });
    }

    let mut run = BuildsRun {
        builds: HashMap::new(),
        errors: Vec::new(),
    };
    // Events may arrive before their trigger call returns: keep them until it does.
    let mut early: HashMap<String, Arrivals> = HashMap::new();
    let deadline = tokio::time::Instant::now()
        + Duration::from_secs(60)
        + n as u32 * Duration::from_millis(500);
    loop {
        if triggerers.is_empty() && run.builds.values().all(|b| b.finished.is_some()) {
            break;
        }
        tokio::select! {
            Some(done) = triggerers.join_next(), if !triggerers.is_empty() => {
                for (sent, sent_us, rtt, get, r) in done? {
                    let get = match get {
                        Some(Err(e)) => {
                            run.errors.push(e);
                            None
                        }
                        Some(Ok(took)) => Some(took),
                        None => None,
                    };
                    match r {
                        Ok(id) => {
                            let Arrivals { first_line, finished } = early.remove(&id).unwrap_or_default();
                            run.builds.insert(id, Measured { sent, sent_us, rtt, get, first_line, finished });
                        }
                        Err(e) => run.errors.push(format!("{} ({:?})", e.message(), e.code())),
                    }
                }
            }
            seen = rx.recv() => {
                let Some((id, seen, at)) = seen else {
                    anyhow::bail!("the server closed the event stream during the run");
                };
                let (first_line, finished) = match run.builds.get_mut(&id) {
                    Some(b) => (&mut b.first_line, &mut b.finished),
                    None => {
                        let e = early.entry(id).or_default();
                        (&mut e.first_line, &mut e.finished)
                    }
                };
                match seen {
                    Seen::Line => { first_line.get_or_insert(at); }
                    Seen::Finished(s) => { finished.get_or_insert((at, s)); }
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                let finished = run.builds.values().filter(|b| b.finished.is_some()).count();
                anyhow::bail!(
                    "timed out: {finished} of {} triggered builds finished ({} triggers failed)",
                    run.builds.len(),
                    run.errors.len()
                );
            }
        }
    }
    watcher.abort();
    Ok(run)
}

struct Tail {
    build_id: String,
    status: String,
    latencies: Vec<f64>,
}

async fn measure_tail(client: &mut BuildsClient<Svc>, project: &str) -> anyhow::Result<Tail> {
    let resp = client
        .trigger_build(api::TriggerBuildRequest {
            project: project.to_owned(),
            git_ref: TAIL_REF.into(),
            ..Default::default()
        })
        .await
        .map_err(status)?
        .into_inner();
    let mut stream = client
        .tail_logs(api::TailLogsRequest {
            build_id: resp.build_id.clone(),
            job: String::new(),
            follow: true,
        })
        .await
        .map_err(status)?
        .into_inner();
    let mut tail = Tail {
        build_id: resp.build_id,
        status: "unfinished".into(),
        latencies: Vec::with_capacity(TAIL_LINES),
    };
    let mut buf: Vec<u8> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let msg = tokio::time::timeout_at(deadline, stream.message())
            .await
            .context("the tail build did not finish within 60 s")?
            .map_err(status)?;
        let received_us = now_us();
        let Some(line) = msg else { break };
        if !line.build_status.is_empty() {
            tail.status = line.build_status;
            break;
        }
        buf.extend_from_slice(&line.data);
        while let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let text: Vec<u8> = buf.drain(..=end).collect();
            if let Some(printed) = std::str::from_utf8(&text)
                .ok()
                .and_then(|t| t.trim().parse::<i64>().ok())
            {
                tail.latencies.push((received_us - printed) as f64 / 1e3);
            }
        }
    }
    Ok(tail)
}

/// Splits trigger → first line into steps, from the events' own timestamps (stamped by the API,
/// the scheduler and the agent; one machine, one clock), read back after the run. None if the
/// read does not complete.
async fn phases(
    client: &mut BuildsClient<Svc>,
    project: &str,
    from: &[api::Position],
    run: &BuildsRun,
) -> Option<Vec<(&'static str, Vec<f64>)>> {
    #[derive(Default)]
    struct Times {
        triggered: Option<i64>,
        assigned: Option<i64>,
        started: Option<i64>,
        line: Option<i64>,
    }
    let mut stream = client
        .watch_events(api::WatchEventsRequest {
            from: from.to_vec(),
            project: project.to_owned(),
            types: [
                "build_triggered",
                "job_assigned",
                "job_started",
                "line_started",
                "build_finished",
            ]
            .map(String::from)
            .to_vec(),
            ..Default::default()
        })
        .await
        .ok()?
        .into_inner();
    let mut times: HashMap<String, Times> = HashMap::new();
    let mut finished = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while finished < run.builds.len() {
        let ev = tokio::time::timeout_at(deadline, stream.message())
            .await
            .ok()?
            .ok()??;
        let Some(env) = ev.event else { continue };
        if !run.builds.contains_key(&env.build_id) {
            continue;
        }
        let t = times.entry(env.build_id).or_default();
        let at = Some(env.time_us);
        match env.payload {
            Some(Payload::BuildTriggered(_)) => t.triggered = t.triggered.or(at),
            Some(Payload::JobAssigned(_)) => t.assigned = t.assigned.or(at),
            Some(Payload::JobStarted(_)) => t.started = t.started.or(at),
            Some(Payload::LineStarted(_)) => t.line = t.line.or(at),
            Some(Payload::BuildFinished(_)) => finished += 1,
            _ => {}
        }
    }
    let mut steps: Vec<(&'static str, Vec<f64>)> = vec![
        ("sent -> BuildTriggered", vec![]),
        ("BuildTriggered -> JobAssigned", vec![]),
        ("JobAssigned -> JobStarted", vec![]),
        ("JobStarted -> LineStarted", vec![]),
        ("LineStarted -> received", vec![]),
    ];
    for (id, b) in &run.builds {
        let Some(t) = times.get(id) else { continue };
        // The receive time on the wall clock: sent_us plus the monotonic latency.
        let received = b
            .first_line
            .map(|at| b.sent_us + at.saturating_duration_since(b.sent).as_micros() as i64);
        let points = [
            Some(b.sent_us),
            t.triggered,
            t.assigned,
            t.started,
            t.line,
            received,
        ];
        for (i, pair) in points.windows(2).enumerate() {
            if let [Some(a), Some(z)] = pair {
                steps[i].1.push((z - a) as f64 / 1e3);
            }
        }
    }
    Some(steps)
}

/// `tributary up` started by the benchmark; killed if dropped without [`Spawned::stop`].
pub(crate) struct Spawned {
    child: std::process::Child,
    /// Its stderr.
    pub(crate) log_path: PathBuf,
}

impl Spawned {
    /// Starts the current executable as `tributary up` under `root` on a free port; returns
    /// once it accepts connections, with its URL and the admin token.
    pub(crate) async fn start(
        root: &Path,
        agents: usize,
        capacity: usize,
    ) -> anyhow::Result<(Spawned, String, String)> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr = format!("127.0.0.1:{port}");
        let data = root.join("data");
        let log_path = root.join("server.log");
        let exe = std::env::current_exe().context("cannot find the tributary executable")?;
        let child = std::process::Command::new(exe)
            .arg("up")
            .arg("--data")
            .arg(&data)
            .args(["--listen", &addr])
            .args(["--agents", &agents.to_string()])
            .args(["--agent-capacity", &capacity.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path)?)
            .spawn()
            .context("cannot start `tributary up`")?;
        let mut server = Spawned {
            child,
            log_path: log_path.clone(),
        };
        let token_path = data.join("admin.token");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = server.child.try_wait()? {
                anyhow::bail!(
                    "`tributary up` exited ({st}) during start:\n{}",
                    last_lines(&log_path)
                );
            }
            let token = std::fs::read_to_string(&token_path).unwrap_or_default();
            if !token.trim().is_empty() && tokio::net::TcpStream::connect(&addr).await.is_ok() {
                return Ok((server, format!("http://{addr}"), token.trim().to_owned()));
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "`tributary up` did not accept connections within 30 s:\n{}",
                last_lines(&log_path)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then waits for the exit (SIGKILL after 30 s); returns how long it took.
    pub(crate) async fn stop(mut self) -> anyhow::Result<Duration> {
        let start = Instant::now();
        let st = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .context("cannot run kill")?;
        anyhow::ensure!(st.success(), "kill -TERM {} failed", self.pid());
        while self.child.try_wait()?.is_none() {
            if start.elapsed() > Duration::from_secs(30) {
                self.child.kill()?;
                self.child.wait()?;
                anyhow::bail!("the server did not stop within 30 s of SIGTERM; killed it");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(start.elapsed())
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `text` without terminal colour sequences (`ESC [ ... m`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

pub(crate) fn last_lines(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Waits until at least `n` agents are connected.
async fn wait_for_agents(admin: &mut AdminClient<Svc>, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = admin
            .list_agents(api::ListAgentsRequest {})
            .await
            .map_err(status)?
            .into_inner();
        let connected = list.agents.iter().filter(|a| a.connected).count();
        if connected >= n {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {connected} of {n} agents connected within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A git repository whose default branch `main` runs [`BUILD_PIPELINE`] and whose branch
/// [`TAIL_REF`] runs [`TAIL_PIPELINE`]. Returns `main`'s commit.
fn make_repo(dir: &Path) -> anyhow::Result<String> {
    std::fs::create_dir_all(dir)?;
    git(dir, &["init", "-q", "-b", "main"])?;
    std::fs::write(dir.join(".tributary.yml"), BUILD_PIPELINE)?;
    git(dir, &["add", ".tributary.yml"])?;
    git(dir, &["commit", "-qm", "bench: one trivial job"])?;
    git(dir, &["checkout", "-q", "-b", TAIL_REF])?;
    std::fs::write(dir.join(".tributary.yml"), TAIL_PIPELINE)?;
    git(dir, &["commit", "-qam", "bench: print timestamps"])?;
    git(dir, &["checkout", "-q", "main"])?;
    let out = std::process::Command::new("git")
        .args(["rev-parse", "main"])
        .current_dir(dir)
        .output()
        .context("cannot run git rev-parse")?;
    let sha = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    anyhow::ensure!(sha.len() >= 40, "git rev-parse main printed {sha:?}");
    Ok(sha)
}

pub(crate) fn git(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("git")
        .args([
            "-c",
            "user.name=tributary bench",
            "-c",
            "user.email=bench@tributary.invalid",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .context("cannot run git (is it installed?)")?;
    anyhow::ensure!(
        out.status.success(),
        "git {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

pub(crate) struct Memory {
    pub(crate) rss_mib: f64,
    pub(crate) peak_mib: f64,
}

/// VmRSS and VmHWM of a process, from /proc/<pid>/status.
pub(crate) fn memory(pid: u32) -> Option<Memory> {
    let status = std::fs::read_to_string(PathBuf::from(format!("/proc/{pid}/status"))).ok()?;
    let field = |name: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb / 1024.0)
    };
    Some(Memory {
        rss_mib: field("VmRSS:")?,
        peak_mib: field("VmHWM:")?,
    })
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The `p`th percentile (nearest rank) of `values`; NaN if there are none.
pub(crate) fn pct(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}
