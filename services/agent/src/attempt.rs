//! Runs one leased job attempt: checkout (server workspaces), JobStarted, the executor's events,
//! JobFinished, all sent in order to one [`EventSink`].
//!
//! One pump per attempt sends the events: whatever queued up while the previous batch was in
//! flight goes into the next batch, so the sink sees the attempt's events exactly in the order
//! they were produced, and the executor is never held up by more than one batch in flight (plus
//! the channel's buffer).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tributary_executor::container::ContainerRuntime;
use tributary_executor::mask::Secrets;
use tributary_executor::{JobContext, LogLimits};
use tributary_proto::events::{
    envelope::Payload, ArtifactUploaded, Envelope, JobFinished, JobPlan, JobStarted, Status,
    UsageTick,
};

use crate::backoff::{Backoff, BackoffPolicy};
use crate::caches;
use crate::sink::{EventSink, SinkError};

/// Largest number of events the pump takes off the queue for one batch.
const MAX_BATCH: usize = 256;
/// Events waiting for the pump before the executor has to wait.
const QUEUE: usize = 1024;

/// Who the events belong to.
#[derive(Clone, Debug)]
pub struct BuildRef {
    pub tenant: String,
    pub project: String,
    pub build_id: String,
}

impl BuildRef {
    /// An envelope of this build with a fresh event id, stamped now.
    pub fn envelope(&self, payload: Payload) -> Envelope {
        Envelope::new(&self.tenant, &self.project, &self.build_id, payload)
    }
}

/// Where a build's code comes from.
#[derive(Clone, Debug)]
pub struct Source {
    pub repository: String,
    pub commit: String,
    /// The build's tenant: its mirror and recycled workspaces are the tenant's own.
    pub tenant: String,
}

/// Where jobs run.
#[derive(Clone)]
pub enum Workspaces {
    /// Every job in this directory (a local run: the pipeline's own directory).
    Fixed(PathBuf),
    /// Each job attempt in its own directory under `root` (`<root>/<build>/<job>-<attempt>`),
    /// with the build's commit checked out from a bare mirror (the server, a remote agent).
    Checkout {
        root: PathBuf,
        mirrors: tributary_repo::Mirrors,
    },
}

/// The workspace of one job attempt.
pub struct JobWorkspace {
    pub dir: PathBuf,
    checkout: Option<(tributary_repo::Mirrors, Source)>,
}

impl JobWorkspace {
    /// Whether the attempt checks out code into [`JobWorkspace::dir`] before it runs.
    pub fn checks_out(&self) -> bool {
        self.checkout.is_some()
    }
}

impl Workspaces {
    pub fn for_job(
        &self,
        source: Option<&Source>,
        build: &str,
        job: &str,
        attempt: u32,
    ) -> JobWorkspace {
        match self {
            Workspaces::Fixed(dir) => JobWorkspace {
                dir: dir.clone(),
                checkout: None,
            },
            Workspaces::Checkout { root, mirrors } => {
                let dir = root
                    .join(sanitize(build))
                    .join(format!("{}-{attempt}", sanitize(job)));
                if let Some(s) = source {
                    reuse_recycled(&recycled_pool(root, &s.tenant), &dir);
                }
                JobWorkspace {
                    dir,
                    checkout: source.cloned().map(|s| (mirrors.clone(), s)),
                }
            }
        }
    }

    /// The attempt that ran in `dir` has ended: keep the workspace for a later job (whose
    /// checkout then writes only what differs, see `tributary_repo::Mirrors::checkout`), or
    /// delete it when [`RECYCLED_MAX`] are kept already. Workspaces are recycled per
    /// `tenant` (the build's): a workspace's `.git` holds objects of its tenant's mirror, so
    /// only that tenant's later jobs get it. Blocking file work: call it on a blocking thread.
    pub fn release(&self, dir: &Path, tenant: &str) {
        let Workspaces::Checkout { root, .. } = self else {
            return;
        };
        let pool = recycled_pool(root, tenant);
        let kept = std::fs::read_dir(&pool).map_or(0, |d| d.count());
        let recycled = kept < RECYCLED_MAX
            && std::fs::create_dir_all(&pool).is_ok()
            && std::fs::rename(dir, pool.join(tributary_proto::new_id())).is_ok();
        if !recycled {
            if let Err(e) = std::fs::remove_dir_all(dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(error = %e, dir = %dir.display(), "cannot delete the workspace");
                }
            }
        }
        if let Some(build_dir) = dir.parent() {
            let _ = std::fs::remove_dir(build_dir); // only if no other attempt uses it
        }
    }
}

/// Where finished workspaces wait for reuse, under the workspaces root.
const RECYCLED: &str = ".recycled";
/// Finished workspaces kept for reuse (creating and deleting a workspace's files for every job
/// costs more than the job on a busy agent).
const RECYCLED_MAX: usize = 16;

/// Where `tenant`'s finished workspaces wait for reuse.
fn recycled_pool(root: &Path, tenant: &str) -> PathBuf {
    root.join(RECYCLED)
        .join("tenants")
        .join(tributary_repo::tenant_dir(tenant))
}

/// Moves a recycled workspace of `pool` to `dir`, if there is one (best effort: else `dir`
/// starts empty).
fn reuse_recycled(pool: &Path, dir: &Path) {
    let Ok(entries) = std::fs::read_dir(pool) else {
        return;
    };
    if dir.exists()
        || dir
            .parent()
            .is_none_or(|p| std::fs::create_dir_all(p).is_err())
    {
        return;
    }
    for entry in entries.flatten() {
        // Another task may take the same one first: then try the next.
        if std::fs::rename(entry.path(), dir).is_ok() {
            return;
        }
    }
}

/// The attempt an agent was given.
pub struct Lease {
    pub job: JobPlan,
    pub attempt: u32,
    pub agent_id: String,
    pub lease_id: String,
    /// Artifacts of the jobs this one needs, downloaded before it runs.
    pub inputs: Vec<ArtifactUploaded>,
    /// The project's cache index (folded from the log): what a restore trusts.
    pub caches: Vec<tributary_proto::api::CacheEntry>,
    /// The project's superseded archives (a later save of their key replaced them): a save
    /// deletes those past their grace.
    pub superseded_caches: Vec<tributary_proto::api::CacheEntry>,
    /// The project's cache size limit in bytes (0 = none): eviction after a save.
    pub cache_limit: u64,
    /// The secrets the job names (`secrets:`), opened by the server.
    pub secrets: JobSecrets,
}

/// The secrets of one job attempt: set as environment variables, masked in every event.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobSecrets {
    /// (name, value) of each secret the job names and its project has.
    pub values: Vec<(String, String)>,
    /// Names the job asks for that its project does not have: the job fails, naming them.
    pub missing: Vec<String>,
    /// The values come from the environment of `tributary run` (a local run), not from the
    /// project's secrets on a server: what a missing one's hint says.
    pub from_env: bool,
}

impl JobSecrets {
    /// Why the job cannot run (`None`: every named secret is there).
    pub fn missing_reason(&self, build: &BuildRef, job: &str) -> Option<String> {
        if self.missing.is_empty() {
            return None;
        }
        let names = self.missing.join(", ");
        let first = &self.missing[0];
        let project = &build.project;
        let s = if self.missing.len() == 1 { "" } else { "s" };
        let it = if self.missing.len() == 1 {
            "it"
        } else {
            "them"
        };
        if self.from_env {
            return Some(format!(
                "job {job} needs the secret{s} {names}, which the environment of `tributary run`                  does not have: a local run takes secrets from its environment, e.g.                  `{first}=… tributary run` (or `export {first}` first), or remove {it} from the                  job's `secrets:`"
            ));
        }
        Some(format!(
            "job {job} needs the secret{s} {names}, which project {project} does not have: set \
             {it} with `tributary secret set {project} {first}` (the value on standard input), \
             or remove {it} from the job's `secrets:`"
        ))
    }
}

/// Usage metering: UsageTick events while the attempt runs.
#[derive(Clone, Debug)]
pub struct UsageMeter {
    pub machine_class: String,
    /// A tick every `interval` while the job runs; the last one (`last = true`) right before
    /// JobFinished.
    pub interval: Duration,
}

/// How an attempt's events are delivered.
#[derive(Clone)]
pub struct AttemptOptions {
    /// Delays between re-sends of a batch the sink could not deliver for now.
    pub retry: BackoffPolicy,
    /// Cancelled: stop re-sending (drop what cannot be delivered) — a hard stop of the agent.
    pub abandon: CancellationToken,
    /// UsageTick events, if set.
    pub usage: Option<UsageMeter>,
    pub limits: LogLimits,
    /// Extra environment for the job (after the job's own).
    pub extra_env: Vec<(String, String)>,
    /// Where artifacts go (and come from); without it a job with artifacts fails, saying so.
    pub objects: Option<tributary_objects::Objects>,
    /// Without `objects`: artifacts go through the server (an agent that does not share the
    /// server's object storage).
    pub server_artifacts: Option<crate::client::ServerArtifacts>,
    /// How to run jobs with an `image`; `None`: this agent cannot (such a job fails, saying so).
    pub container: Option<ContainerRuntime>,
    /// Printed at the very top of the job's log (`tributary: NOTE`), e.g. that a generic agent
    /// stands in for the labels the job asked for. Empty = nothing.
    pub note: String,
    /// The pipeline file the recreate commands at the top of the log name (a local run's own
    /// file); `None`: `.tributary.yml` of the repository.
    pub pipeline_file: Option<String>,
    /// Keep the workspace of a failed (or timed-out) job this long, and say so in its log;
    /// `None` (or a workspace that is not the job's own checkout): nothing is kept.
    pub keep_failed_for: Option<Duration>,
}

impl Default for AttemptOptions {
    fn default() -> Self {
        AttemptOptions {
            retry: BackoffPolicy::default(),
            abandon: CancellationToken::new(),
            usage: None,
            limits: LogLimits::default(),
            extra_env: Vec::new(),
            objects: None,
            server_artifacts: None,
            container: None,
            pipeline_file: None,
            keep_failed_for: None,
            note: String::new(),
        }
    }
}

/// What became of an attempt.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AttemptReport {
    /// The status JobFinished reported (`None` if the attempt never got that far).
    pub status: Option<Status>,
    /// The sink said the lease is gone: the job was stopped and its later events dropped.
    pub fenced: bool,
    /// Events the sink accepted.
    pub delivered: usize,
    /// Events dropped (fenced, refused, or abandoned).
    pub dropped: usize,
    /// The log could not be written (its disk is full): why. The job was stopped.
    pub unwritable: Option<String>,
}

/// Runs the attempt to its end: checks the code out if the workspace says so, sends
/// JobStarted, runs the executor, sends JobFinished (CANCELED when `cancel` fired). Every event
/// goes to `sink`, in order. Delivery errors are logged (see [`SinkError`] for what each
/// kind does); the scheduler sees a job without JobFinished as lost.
pub async fn run_attempt(
    sink: Arc<dyn EventSink>,
    build: BuildRef,
    lease: Lease,
    workspace: JobWorkspace,
    scratch_dir: PathBuf,
    cancel: CancellationToken,
    options: AttemptOptions,
) -> AttemptReport {
    let span = tracing::info_span!(
        "job",
        build_id = %build.build_id,
        job_id = %lease.job.id,
        agent_id = %lease.agent_id,
        attempt = lease.attempt
    );
    run_attempt_inner(sink, build, lease, workspace, scratch_dir, cancel, options)
        .instrument(span)
        .await
}

async fn run_attempt_inner(
    sink: Arc<dyn EventSink>,
    build: BuildRef,
    lease: Lease,
    workspace: JobWorkspace,
    scratch_dir: PathBuf,
    cancel: CancellationToken,
    options: AttemptOptions,
) -> AttemptReport {
    let (tx, rx) = mpsc::channel(QUEUE);
    let pump = tokio::spawn(
        pump(
            sink,
            build.clone(),
            rx,
            PumpControl {
                fence: cancel.clone(),
                abandon: options.abandon.clone(),
                retry: options.retry,
            },
        )
        .in_current_span(),
    );
    let status = produce(
        &tx,
        &build,
        lease,
        workspace,
        scratch_dir,
        &cancel,
        &options,
    )
    .await;
    drop(tx);
    match pump.await {
        Ok(mut report) => {
            report.status = status;
            report
        }
        Err(e) => {
            tracing::error!(error = %e, "event pump failed");
            AttemptReport {
                status,
                ..AttemptReport::default()
            }
        }
    }
}

/// Produces the attempt's events on `tx`, in order. Returns the status sent in JobFinished.
async fn produce(
    tx: &mpsc::Sender<Payload>,
    build: &BuildRef,
    lease: Lease,
    workspace: JobWorkspace,
    scratch_dir: PathBuf,
    cancel: &CancellationToken,
    options: &AttemptOptions,
) -> Option<Status> {
    let started = Instant::now();
    let job_id = lease.job.id.clone();
    let lease_id = lease.lease_id.clone();
    let attempt = lease.attempt;
    let job_started = Payload::JobStarted(JobStarted {
        job: job_id.clone(),
        attempt,
        agent_id: lease.agent_id.clone(),
        lease_id: lease.lease_id.clone(),
        executor: executor_name(&lease.job),
    });
    if tx.send(job_started).await.is_err() {
        tracing::error!("event pump stopped before the job started");
        return None;
    }
    // Every secret value is masked wherever this attempt reports text: log chunks (the
    // executor) and the failure reason of JobFinished (here).
    let masks = Arc::new(Secrets::new(lease.secrets.values.iter().map(|(_, v)| v)));
    let finished = |status: Status, exit_code: i32, reason: String, duration: Duration| {
        Payload::JobFinished(JobFinished {
            job: job_id.clone(),
            attempt,
            status: status as i32,
            exit_code,
            duration_us: u64::try_from(duration.as_micros()).unwrap_or(u64::MAX),
            reason: masks.mask_str(&reason),
            no_retry: false,
        })
    };
    if let Some(reason) = lease.secrets.missing_reason(build, &job_id) {
        tracing::info!(%reason, "the job names secrets it does not have");
        // A configuration error: a retry would fail the same way.
        let mut payload = finished(Status::Failed, -1, reason, started.elapsed());
        if let Payload::JobFinished(f) = &mut payload {
            f.no_retry = true;
        }
        let _ = tx.send(payload).await;
        return Some(Status::Failed);
    }
    let mut meter = options
        .usage
        .clone()
        .map(|m| Meter::new(m, &job_id, attempt, &lease.agent_id));

    let workdir = workspace.dir.clone();
    let preamble = crate::recreate::recreate_commands(
        workspace.checkout.as_ref().map(|(_, s)| s),
        &lease.job,
        options.pipeline_file.as_deref(),
    );
    let workspace_is_local = workspace.checkout.is_none();
    let preamble = match options.note.as_str() {
        "" => preamble,
        note => format!("tributary: {note}\n{preamble}"),
    };
    let keep_for = options
        .keep_failed_for
        .filter(|d| !d.is_zero() && workspace.checkout.is_some());
    if let Some((mirrors, source)) = &workspace.checkout {
        let mirrors = mirrors.for_tenant(&source.tenant);
        let checkout = mirrors.checkout(
            &source.repository,
            &source.commit,
            &workdir,
            lease.job.submodules,
        );
        if let Err(e) = checkout.await {
            let reason = format!(
                "checkout of {} at {} failed: {e}",
                source.repository, source.commit
            );
            tracing::error!(%reason);
            if let Some(m) = meter.as_mut() {
                let _ = tx.send(m.tick(true)).await;
            }
            let _ = tx
                .send(finished(Status::Failed, -1, reason, started.elapsed()))
                .await;
            return Some(Status::Failed);
        }
    } else if let Err(e) = std::fs::create_dir_all(&workdir) {
        tracing::error!(error = %e, dir = %workdir.display(), "cannot create the workspace");
    }
    // The image's build context is read now, before artifacts and caches add files.
    let image = job_image(build, &lease.job, &workdir).await;

    if !lease.inputs.is_empty() {
        let downloaded = match artifact_store(options, &lease.lease_id) {
            None => Err(NO_OBJECTS.to_owned()),
            Some(store) => crate::artifacts::download(&store, &lease.inputs, &workdir).await,
        };
        if let Err(reason) = downloaded {
            tracing::error!(%reason, "cannot get the artifacts this job needs");
            if let Some(m) = meter.as_mut() {
                let _ = tx.send(m.tick(true)).await;
            }
            let _ = tx
                .send(finished(Status::Failed, -1, reason, started.elapsed()))
                .await;
            return Some(Status::Failed);
        }
    }
    let patterns = lease.job.artifacts.clone();

    let scratch = scratch_dir.join(format!(
        "{}-{}-{}",
        sanitize(&build.build_id),
        sanitize(&job_id),
        attempt
    ));
    let cache_scratch = scratch_dir.join(format!(
        "{}-{}-{}.caches",
        sanitize(&build.build_id),
        sanitize(&job_id),
        attempt
    ));
    let mut preamble = preamble;
    let restored = if lease.job.cache.is_empty() {
        caches::Restored::default()
    } else {
        caches::restore(
            options.objects.as_ref(),
            &lease.caches,
            &lease.job.cache,
            &job_id,
            attempt,
            &workdir,
            &cache_scratch,
        )
        .await
    };
    for event in restored.events {
        let _ = tx.send(event).await;
    }
    for line in &restored.log {
        preamble.push_str(line);
        preamble.push('\n');
    }
    if let Err(e) = std::fs::create_dir_all(&scratch) {
        tracing::error!(error = %e, dir = %scratch.display(), "cannot create scratch directory");
    }
    // A failed job of a local run (no checkout) ends with the command that runs it alone.
    let local_note = if workspace_is_local {
        crate::recreate::run_alone(&lease.job, options.pipeline_file.as_deref())
    } else {
        String::new()
    };
    let ctx_dir = workdir.clone();
    let ctx_workdir = workdir.clone();
    let lease_caches = lease.caches;
    let lease_superseded = lease.superseded_caches;
    let lease_cache_limit = lease.cache_limit;
    let ctx = JobContext {
        build_id: build.build_id.clone(),
        job: lease.job,
        attempt,
        workdir,
        scratch_dir: scratch.clone(),
        extra_env: options
            .extra_env
            .iter()
            .chain(&lease.secrets.values)
            .cloned()
            .collect(),
        limits: options.limits,
        container: options.container.clone(),
        preamble,
        failure_note: keep_for.map_or(local_note, |d| {
            format!(
                "tributary: this job's workspace is kept on agent {} ({}) at {} for {} \
                 (until {}), to look at what it left",
                lease.agent_id,
                crate::runtime::host_name(),
                ctx_workdir.display(),
                crate::kept::human(d),
                crate::kept::format_time(std::time::SystemTime::now() + d)
            )
        }),
        secrets: masks.clone(),
        image,
    };
    let job = tributary_executor::run_job(ctx, tx.clone(), cancel.clone());
    let outcome = match meter.as_mut() {
        None => job.await,
        Some(m) => {
            tokio::pin!(job);
            let mut ticks = tokio::time::interval_at(Instant::now() + m.interval, m.interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    outcome = &mut job => break outcome,
                    _ = ticks.tick() => {
                        let _ = tx.send(m.tick(false)).await;
                    }
                }
            }
        }
    };
    let _ = std::fs::remove_dir_all(&scratch);
    let mut outcome = outcome;
    if outcome.status == Status::Succeeded && !patterns.is_empty() {
        let uploaded = match artifact_store(options, &lease_id) {
            None => Err(NO_OBJECTS.to_owned()),
            Some(store) => {
                crate::artifacts::upload(&store, build, &job_id, attempt, &patterns, &ctx_dir).await
            }
        };
        match uploaded {
            Ok(artifacts) => {
                for a in artifacts {
                    let _ = tx.send(Payload::ArtifactUploaded(a)).await;
                }
            }
            Err(reason) => {
                tracing::error!(%reason, "artifact upload failed");
                outcome.status = Status::Failed;
                outcome.exit_code = -1;
                outcome.reason = reason;
            }
        }
    }
    if let (Status::Succeeded, Some(objects)) = (outcome.status, &options.objects) {
        let events = caches::save(
            objects,
            build,
            &lease_caches,
            &lease_superseded,
            lease_cache_limit,
            &restored.caches,
            &job_id,
            attempt,
            &ctx_dir,
            &cache_scratch,
        )
        .await;
        for event in events {
            let _ = tx.send(event).await;
        }
    }
    let _ = std::fs::remove_dir_all(&cache_scratch);
    if let (Some(d), Status::Failed | Status::TimedOut) = (keep_for, outcome.status) {
        let dir = &ctx_workdir;
        match crate::kept::keep(dir, std::time::SystemTime::now(), d) {
            Ok(_) => tracing::info!(dir = %dir.display(), "keeping the failed job's workspace"),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot mark the workspace as kept")
            }
        }
    }
    if let Some(m) = meter.as_mut() {
        let _ = tx.send(m.tick(true)).await;
    }
    let status = outcome.status;
    if tx
        .send(finished(
            outcome.status,
            outcome.exit_code,
            outcome.reason,
            outcome.duration,
        ))
        .await
        .is_err()
    {
        tracing::error!("event pump stopped before the job finished");
    }
    Some(status)
}

const NO_OBJECTS: &str = "this job has artifacts, but this agent has no object storage and no \
     server to send them through: start it with --objects URL (a directory or \
     s3://BUCKET/PREFIX shared with the server)";

/// Where this attempt's artifacts go: the shared object storage, else the server.
fn artifact_store<'a>(
    options: &'a AttemptOptions,
    lease_id: &'a str,
) -> Option<crate::artifacts::Store<'a>> {
    match (&options.objects, &options.server_artifacts) {
        (Some(objects), _) => Some(crate::artifacts::Store::Objects(objects)),
        (None, Some(client)) => Some(crate::artifacts::Store::Server { client, lease_id }),
        (None, None) => None,
    }
}
/// `JobStarted.executor`: `host`, `container:<image>`, or `container:built from <Dockerfile>`.
fn executor_name(job: &JobPlan) -> String {
    if job.runs_in_container() {
        format!("container:{}", job.image_description())
    } else {
        "host".to_owned()
    }
}

/// For a job with `image: {build: ...}`: its build context, read from the workspace (on a
/// blocking thread), and whose image it is.
async fn job_image(
    build: &BuildRef,
    job: &JobPlan,
    workdir: &Path,
) -> Option<tributary_executor::JobImage> {
    let spec = job.image_build.clone()?;
    let dir = workdir.to_path_buf();
    let context =
        tokio::task::spawn_blocking(move || tributary_executor::image::context::read(&dir, &spec))
            .await
            .unwrap_or_else(|e| Err(format!("reading the build context failed: {e}")))
            .map(Arc::new);
    Some(tributary_executor::JobImage {
        tenant: build.tenant.clone(),
        project: build.project.clone(),
        context,
    })
}

/// UsageTick state of one attempt.
struct Meter {
    usage: UsageMeter,
    interval: Duration,
    job: String,
    attempt: u32,
    agent_id: String,
    seq: u32,
    since: Instant,
    /// Wall-clock start of the interval the next tick covers (µs since the epoch).
    since_us: i64,
}

impl Meter {
    fn new(usage: UsageMeter, job: &str, attempt: u32, agent_id: &str) -> Self {
        Meter {
            interval: usage.interval.max(Duration::from_millis(100)),
            usage,
            job: job.to_owned(),
            attempt,
            agent_id: agent_id.to_owned(),
            seq: 0,
            since: Instant::now(),
            since_us: tributary_proto::now_us(),
        }
    }

    fn tick(&mut self, last: bool) -> Payload {
        let now = Instant::now();
        let millis = now.duration_since(self.since).as_millis();
        let millis = u64::try_from(millis).unwrap_or(u64::MAX);
        self.since = now;
        // The interval is placed on the wall clock but measured on the monotonic one: a clock
        // step never bills time that did not pass.
        let start_us = self.since_us;
        let end_us =
            start_us.saturating_add(i64::try_from(millis.saturating_mul(1000)).unwrap_or(i64::MAX));
        self.since_us = end_us;
        self.seq += 1;
        Payload::UsageTick(UsageTick {
            job: self.job.clone(),
            attempt: self.attempt,
            agent_id: self.agent_id.clone(),
            machine_class: self.usage.machine_class.clone(),
            millis,
            seq: self.seq,
            last,
            start_us,
            end_us,
        })
    }
}

/// What the pump does when the sink fails.
pub(crate) struct PumpControl {
    /// Cancelled when the sink says the lease is gone (stops the job).
    pub fence: CancellationToken,
    /// Cancelled: give up re-sending.
    pub abandon: CancellationToken,
    pub retry: BackoffPolicy,
}

/// Sends the queued events in order, in batches of whatever queued up while the previous batch
/// was in flight, until every sender is gone. Unavailable: the same batch again after a backoff
/// (until `abandon`). Fenced: cancel the job, drop everything from then on. Failed: drop the
/// batch, go on.
pub(crate) async fn pump(
    sink: Arc<dyn EventSink>,
    build: BuildRef,
    mut rx: mpsc::Receiver<Payload>,
    ctl: PumpControl,
) -> AttemptReport {
    let mut report = AttemptReport::default();
    let mut buf = Vec::with_capacity(MAX_BATCH);
    let mut dropping = false;
    while rx.recv_many(&mut buf, MAX_BATCH).await > 0 {
        if dropping || ctl.abandon.is_cancelled() {
            report.dropped += buf.len();
            buf.clear();
            continue;
        }
        let batch: Vec<Envelope> = buf.drain(..).map(|p| build.envelope(p)).collect();
        let mut backoff = Backoff::new(ctl.retry);
        loop {
            match sink.send(batch.clone()).await {
                Ok(()) => {
                    report.delivered += batch.len();
                    break;
                }
                Err(SinkError::Unavailable(reason)) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(%reason, events = batch.len(), retry_in = ?delay, "cannot send job events; retrying");
                    let abandoned = tokio::select! {
                        _ = tokio::time::sleep(delay) => false,
                        _ = ctl.abandon.cancelled() => true,
                    };
                    if abandoned {
                        tracing::warn!(events = batch.len(), "giving up sending job events");
                        report.dropped += batch.len();
                        break;
                    }
                }
                Err(SinkError::Fenced(reason)) => {
                    tracing::warn!(%reason, "the lease was taken away: stopping the job and dropping its events");
                    report.fenced = true;
                    report.dropped += batch.len();
                    dropping = true;
                    ctl.fence.cancel();
                    break;
                }
                Err(SinkError::Failed(reason)) => {
                    tracing::error!(%reason, events = batch.len(), "cannot send job events");
                    report.dropped += batch.len();
                    break;
                }
                Err(SinkError::Unwritable(reason)) => {
                    tracing::error!(%reason, "the log cannot be written: stopping the job");
                    report.dropped += batch.len();
                    report.unwritable.get_or_insert(reason);
                    dropping = true;
                    ctl.fence.cancel();
                    break;
                }
            }
        }
    }
    report
}

/// An id made safe for a directory name.
pub fn sanitize(id: &str) -> String {
    let s: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() {
        "_".to_owned()
    } else {
        s
    }
}

#[cfg(test)]
#[path = "attempt_tests.rs"]
mod tests;
