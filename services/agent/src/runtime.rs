//! The remote agent runtime: register (once), pull leases, run them, heartbeat, reconnect, drain.
//!
//! Three loops share a [`Slots`] (the running leases and the draining flag):
//!
//! * the pull loop keeps one `PullWork` stream open (re-opening it with backoff) and hands each
//!   pushed lease to the main loop;
//! * the heartbeat loop sends `Heartbeat{running leases, draining}` every 2 s (and at once when
//!   draining starts) and cancels the leases the server names;
//! * the main loop admits leases (never more than `capacity`, none while draining), runs each in
//!   its own task with an [`ApiSink`], and ends when drained.
//!
//! Draining (on `drain`, or when the server pushes a drain instruction): heartbeats say
//! `draining` (the server then assigns nothing more, and moves leases
//! the agent has not started elsewhere), leases still pushed are not started, the running jobs
//! finish and send their events, then the work stream is closed and the runtime returns. The
//! stream stays open until then because the server takes a closed work stream for a lost agent
//! and requeues its jobs.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tracing::Instrument;
use tributary_proto::api;

use crate::attempt::{
    run_attempt, AttemptOptions, BuildRef, Lease, Source, UsageMeter, Workspaces,
};
use crate::backoff::{Backoff, BackoffPolicy};
use crate::client::{agents, channel, AgentsApi, BearerAuth};
use crate::identity::{identity_path, Identity};
use crate::sink::{classify, ApiSink, SinkError};
use crate::AgentError;
use tributary_executor::container::{ContainerLimits, ContainerRuntime, Engine};

/// How long one Register or Heartbeat call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// A work stream that stayed open this long resets the reconnect backoff.
const STABLE_STREAM: Duration = Duration::from_secs(10);
/// How long a hard stop waits for canceled jobs to report before abandoning them.
const ABORT_GRACE: Duration = Duration::from_secs(2);
/// How often kept workspaces of failed jobs are checked for expiry.
const KEPT_SWEEP_INTERVAL: Duration = Duration::from_secs(600);
/// Finished leases remembered so that a lease pushed again is not run twice.
const REMEMBER_FINISHED: usize = 1024;

/// Everything `tributary agent` is told.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The server's address (`http://host:7700`).
    pub server: String,
    /// Enrollment token (or the admin token), only used when `workdir` holds no identity yet.
    pub enrollment_token: Option<String>,
    /// Name shown by the server (registration only).
    pub name: String,
    pub labels: Vec<String>,
    /// Leases run at once.
    pub capacity: u32,
    /// Holds `agent.json`, `mirrors/`, `work/` and `scratch/`.
    pub workdir: PathBuf,
    /// With a machine class, running jobs report their machine time as UsageTick events.
    pub machine_class: Option<String>,
    pub usage_interval: Duration,
    pub heartbeat_interval: Duration,
    /// Delays between reconnects, registration attempts and re-sends of events.
    pub reconnect: BackoffPolicy,
    /// Clear each attempt's workspace when it ends (kept for reuse by a later job, or deleted).
    pub clean_workspaces: bool,
    /// Where artifacts are uploaded and downloaded: the server's object storage (a shared
    /// directory or S3). Without it, artifacts go through the server (hashed on both ends).
    pub objects: Option<tributary_objects::Objects>,
    /// Keep the workspace of a failed job this long (its log says where); 0 = delete at once.
    /// Expired ones are deleted when the agent starts and then every `kept_sweep_interval`.
    pub keep_failed_for: Duration,
    /// How often kept workspaces are checked for expiry while the agent runs (10 minutes).
    pub kept_sweep_interval: Duration,
    /// Run container jobs (`image:`) on this engine with these limits; `None`: host jobs only
    /// (the server then sends this agent no container jobs).
    pub containers: Option<ContainerSettings>,
    /// Which repositories jobs may check out: allowed protocols (`GIT_ALLOW_PROTOCOL` for every
    /// git process), local folders. The server checks who may use which first.
    pub repo_access: tributary_repo::Access,
}

/// How an agent runs container jobs.
#[derive(Clone, Debug)]
pub struct ContainerSettings {
    /// A connected engine ([`Engine::connect`]).
    pub engine: Engine,
    pub limits: ContainerLimits,
}

impl AgentConfig {
    /// What this agent tells the server it can run.
    pub fn capabilities(&self) -> api::AgentCapabilities {
        match &self.containers {
            Some(c) => api::AgentCapabilities {
                containers: true,
                engine: c.engine.description().to_owned(),
            },
            None => api::AgentCapabilities::default(),
        }
    }
}

/// A request carrying the agent's capabilities in its metadata.
pub(crate) fn with_capabilities<T>(message: T, caps: &api::AgentCapabilities) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let bytes = prost::Message::encode_to_vec(caps);
    request.metadata_mut().insert_bin(
        tributary_proto::CAPABILITIES_METADATA,
        tonic::metadata::MetadataValue::from_bytes(&bytes),
    );
    request
}

impl AgentConfig {
    /// Defaults: the host name as name, no labels, capacity 1, heartbeats every 2 s, backoff
    /// 100 ms → 10 s, workspaces deleted after each attempt, no usage metering.
    pub fn new(server: impl Into<String>, workdir: impl Into<PathBuf>) -> Self {
        AgentConfig {
            server: server.into(),
            enrollment_token: None,
            name: host_name(),
            labels: Vec::new(),
            capacity: 1,
            workdir: workdir.into(),
            machine_class: None,
            usage_interval: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(2),
            reconnect: BackoffPolicy::default(),
            clean_workspaces: true,
            objects: None,
            keep_failed_for: Duration::from_secs(24 * 3600),
            kept_sweep_interval: KEPT_SWEEP_INTERVAL,
            containers: None,
            repo_access: tributary_repo::Access::default(),
        }
    }
}

/// A machine class describing this host, `<os>-<cpus>cpu-<memory>gb` (e.g.
/// `linux-2cpu-24gb`): the default of `tributary agent --machine-class` and of the in-process
/// agents of `tributary up`.
pub fn default_machine_class() -> String {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mem_gb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| mem_total_gb(&text))
        .unwrap_or(0);
    format!("{}-{cpus}cpu-{mem_gb}gb", std::env::consts::OS)
}

/// `MemTotal:  24589236 kB` -> 24 (rounded to the nearest GiB).
fn mem_total_gb(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some((kb + 512 * 1024) / (1024 * 1024))
}

/// The machine's host name, or `agent`.
pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "agent".into())
}

/// Runs the agent until `shutdown` is cancelled, then drains: takes no new leases, lets the
/// running ones finish, and returns `Ok(())`.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    run_until(config, shutdown, CancellationToken::new()).await
}

/// [`run`] with a hard stop too: `abort` cancels the running jobs, gives them a moment to
/// report, and returns [`AgentError::Aborted`] (or `Ok` when nothing was running).
pub async fn run_until(
    config: AgentConfig,
    drain: CancellationToken,
    abort: CancellationToken,
) -> Result<(), AgentError> {
    let stop = CancellationToken::new();
    let identity = tokio::select! {
        biased;
        id = identify(&config, &stop) => id?,
        _ = drain.cancelled() => return Ok(()),
        _ = abort.cancelled() => return Ok(()),
    };
    run_as(config, identity, drain, abort).await
}

/// The stored identity, or a new one: `Register` with the enrollment token (retried with
/// backoff while the server cannot be reached), saved to `WORKDIR/agent.json` (mode 0600).
/// Gives up with [`AgentError::Config`] when `stop` is cancelled first.
pub async fn identify(
    config: &AgentConfig,
    stop: &CancellationToken,
) -> Result<Identity, AgentError> {
    validate(config)?;
    std::fs::create_dir_all(&config.workdir).map_err(|e| {
        AgentError::io(
            format!(
                "cannot create the work directory {}",
                config.workdir.display()
            ),
            e,
        )
    })?;
    if let Some(identity) = Identity::load(&config.workdir)? {
        if !identity.server.is_empty() && identity.server != config.server {
            tracing::warn!(
                agent_id = %identity.agent_id,
                registered_with = %identity.server,
                server = %config.server,
                "this agent registered with another server; its identity may be refused"
            );
        }
        return Ok(identity);
    }
    let Some(token) = config.enrollment_token.as_deref().map(str::trim) else {
        return Err(AgentError::Config(format!(
            "no agent identity in {}: pass --token with an enrollment token (`tributary admin \
             token-create --kind enrollment`) to register this agent",
            identity_path(&config.workdir).display()
        )));
    };
    let mut client = agents(channel(&config.server)?, BearerAuth::new(token)?);
    let request = api::RegisterAgentRequest {
        enrollment_token: token.to_owned(),
        name: config.name.clone(),
        labels: config.labels.clone(),
        capacity: config.capacity,
    };
    let mut backoff = Backoff::new(config.reconnect);
    loop {
        let call = tokio::time::timeout(
            CALL_TIMEOUT,
            client.register(with_capabilities(request.clone(), &config.capabilities())),
        );
        let result = tokio::select! {
            r = call => r,
            _ = stop.cancelled() => {
                return Err(AgentError::Config("stopped before the agent was registered".into()))
            }
        };
        let status = match result {
            Ok(Ok(response)) => {
                let response = response.into_inner();
                let identity = Identity {
                    agent_id: response.agent_id,
                    agent_token: response.agent_token,
                    server: config.server.clone(),
                    name: config.name.clone(),
                };
                identity.save(&config.workdir)?;
                tracing::info!(agent_id = %identity.agent_id, "registered");
                return Ok(identity);
            }
            Ok(Err(status)) => status,
            Err(_) => tonic::Status::deadline_exceeded("Register timed out"),
        };
        if !matches!(classify(&status), SinkError::Unavailable(_)) {
            let hint = match status.code() {
                Code::Unauthenticated | Code::PermissionDenied => {
                    "; check the enrollment token (`tributary admin token-create --kind enrollment`)"
                }
                _ => "",
            };
            return Err(AgentError::Rejected(format!(
                "the server at {} refused to register this agent: {} ({:?}){hint}",
                config.server,
                status.message(),
                status.code()
            )));
        }
        let delay = backoff.next_delay();
        tracing::warn!(server = %config.server, error = %status.message(), retry_in = ?delay, "cannot register; retrying");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => {
                return Err(AgentError::Config("stopped before the agent was registered".into()))
            }
        }
    }
}

fn validate(config: &AgentConfig) -> Result<(), AgentError> {
    if config.capacity == 0 {
        return Err(AgentError::Config("--capacity must be at least 1".into()));
    }
    if config.server.trim().is_empty() {
        return Err(AgentError::Config("no server address".into()));
    }
    Ok(())
}

/// Runs the agent with a known identity: see [`run_until`].
pub async fn run_as(
    config: AgentConfig,
    identity: Identity,
    drain: CancellationToken,
    abort: CancellationToken,
) -> Result<(), AgentError> {
    validate(&config)?;
    let span = tracing::info_span!("agent", agent_id = %identity.agent_id);
    if let Some(c) = &config.containers {
        // Containers of this agent that are still there were left by a crash: nothing runs yet.
        match c.engine.remove_orphans(&identity.agent_id).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::warn!(agent_id = %identity.agent_id, removed = n, "removed containers left over from an earlier run")
            }
            Err(e) => {
                tracing::error!(agent_id = %identity.agent_id, error = %e, "cannot remove containers left over from an earlier run")
            }
        }
    }
    Runtime::new(config, identity)?
        .run(drain, abort)
        .instrument(span)
        .await
}

/// What the pull loop hands the main loop.
enum Pulled {
    Lease(Box<api::Lease>),
    /// The server drains this agent (the autoscaler lets it go): as on SIGTERM.
    Drain,
    /// The server will not take this agent (revoked, unknown, no Agents API).
    Fatal(AgentError),
}

struct Runtime {
    config: AgentConfig,
    identity: Identity,
    client: AgentsApi,
    /// Artifacts through the server, for a config without `objects`.
    server_artifacts: crate::client::ServerArtifacts,
    workspaces: Workspaces,
    slots: Arc<Mutex<Slots>>,
    /// Cancelled on a hard stop: pumps stop re-sending.
    abandon: CancellationToken,
}

/// The attempt tasks, and the lease and workspace of each (so that even a task that panicked
/// frees its slot).
#[derive(Default)]
struct Tasks {
    set: JoinSet<()>,
    /// Per running attempt: its lease id, workspace and tenant.
    leases: HashMap<tokio::task::Id, (String, PathBuf, String)>,
    /// Leases pushed while every slot was still taken: the server frees a slot when it sees
    /// JobFinished, a moment before the attempt's task here has ended. They start as soon as
    /// a slot frees, instead of being dropped (and requeued only when their lease expires).
    pending: std::collections::VecDeque<api::Lease>,
}

impl Runtime {
    fn new(mut config: AgentConfig, identity: Identity) -> Result<Self, AgentError> {
        // Jobs run in their own directories: every path handed to them must be absolute.
        config.workdir = std::path::absolute(&config.workdir).map_err(|e| {
            AgentError::io(
                format!("cannot make {} absolute", config.workdir.display()),
                e,
            )
        })?;
        let ch = channel(&config.server)?;
        let auth = BearerAuth::new(&identity.agent_token)?;
        let client = agents(ch.clone(), auth.clone());
        let server_artifacts = crate::client::server_artifacts(ch, auth);
        let workspaces = Workspaces::Checkout {
            root: config.workdir.join("work"),
            // Never a repository inside the agent's own directory (other tenants' mirrors and
            // workspaces), and only the protocols and local folders the operator allows.
            mirrors: tributary_repo::Mirrors::new(config.workdir.join("mirrors"))
                .with_access(config.repo_access.clone().forbid(&config.workdir)),
        };
        let slots = Arc::new(Mutex::new(Slots::new(config.capacity as usize)));
        Ok(Runtime {
            config,
            identity,
            client,
            server_artifacts,
            workspaces,
            slots,
            abandon: CancellationToken::new(),
        })
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        lock(&self.slots)
    }

    async fn run(
        self,
        drain: CancellationToken,
        abort: CancellationToken,
    ) -> Result<(), AgentError> {
        let (pull_tx, mut pull_rx) = mpsc::channel(64);
        let pull_stop = CancellationToken::new();
        let pull = tokio::spawn(
            pull_loop(
                self.client.clone(),
                api::PullWorkRequest {
                    agent_id: self.identity.agent_id.clone(),
                    labels: self.config.labels.clone(),
                    capacity: self.config.capacity,
                },
                self.config.capabilities(),
                self.config.server.clone(),
                self.config.reconnect,
                pull_tx,
                pull_stop.clone(),
            )
            .in_current_span(),
        );
        let beat_now = Arc::new(Notify::new());
        let heartbeat_stop = CancellationToken::new();
        let heartbeat = tokio::spawn(
            heartbeat_loop(
                self.client.clone(),
                self.identity.agent_id.clone(),
                self.slots.clone(),
                self.config.heartbeat_interval,
                beat_now.clone(),
                heartbeat_stop.clone(),
            )
            .in_current_span(),
        );
        tracing::info!(
            server = %self.config.server,
            labels = ?self.config.labels,
            capacity = self.config.capacity,
            engine = self.config.containers.as_ref().map_or("none", |c| c.engine.description()),
            "agent started"
        );

        let mut tasks = Tasks::default();
        let mut fatal: Option<AgentError> = None;
        let mut pull_open = true;
        // Kept workspaces of failed jobs whose time is up: now, then every 10 minutes.
        let mut sweep = tokio::time::interval(
            self.config
                .kept_sweep_interval
                .max(Duration::from_millis(100)),
        );
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            let (drained, draining) = {
                let slots = self.slots();
                (slots.drained(), slots.draining())
            };
            if drained {
                break Ok(());
            }
            tokio::select! {
                biased;
                _ = abort.cancelled() => {
                    let n = self.abort(&mut tasks).await;
                    break if n == 0 { Ok(()) } else { Err(AgentError::Aborted(n)) };
                }
                _ = drain.cancelled(), if !draining => self.begin_drain(&beat_now, "stop requested"),
                Some(done) = tasks.set.join_next_with_id() => self.finished(&mut tasks, done),
                _ = sweep.tick() => {
                    let work = self.config.workdir.join("work");
                    let deleted = tokio::task::spawn_blocking(move || {
                        crate::kept::sweep(&work, std::time::SystemTime::now())
                    })
                    .await
                    .map(|d| d.len())
                    .unwrap_or(0);
                    if deleted > 0 {
                        tracing::info!(deleted, "deleted kept workspaces whose time was up");
                    }
                }
                pulled = pull_rx.recv(), if pull_open => match pulled {
                    Some(Pulled::Lease(lease)) => self.start(*lease, &mut tasks),
                    Some(Pulled::Drain) => {
                        if !draining {
                            self.begin_drain(&beat_now, "the server drains this agent");
                        }
                    }
                    Some(Pulled::Fatal(e)) => {
                        tracing::error!(error = %e, "the server refused this agent; stopping");
                        let canceled = {
                            let mut slots = self.slots();
                            slots.drain();
                            slots.cancel_all()
                        };
                        if canceled > 0 {
                            tracing::warn!(canceled, "canceled the running jobs");
                        }
                        fatal = Some(e);
                        pull_open = false;
                    }
                    None => pull_open = false,
                },
            }
        };
        drop(pull_rx);
        pull_stop.cancel();
        heartbeat_stop.cancel();
        if result.is_err() {
            heartbeat.abort();
        }
        let _ = heartbeat.await;
        let _ = pull.await;
        tracing::info!("agent stopped");
        match fatal {
            Some(e) => Err(e),
            None => result,
        }
    }

    /// No new leases from now on; the running ones finish, then the runtime returns. The work
    /// stream stays open until they are done: the server takes a closed stream for a lost
    /// agent and would requeue them.
    fn begin_drain(&self, beat_now: &Notify, why: &str) {
        let running = {
            let mut slots = self.slots();
            slots.drain();
            slots.running()
        };
        tracing::info!(
            running,
            why,
            "draining: no new leases; waiting for the running jobs"
        );
        beat_now.notify_one();
    }

    /// Admits a pushed lease and starts its attempt, or says why not.
    fn start(&self, lease: api::Lease, tasks: &mut Tasks) {
        if lease.cancel {
            tasks.pending.retain(|p| p.lease_id != lease.lease_id);
            if let Some(job) = self.slots().cancel(&lease.lease_id) {
                tracing::info!(lease_id = %lease.lease_id, build_id = %job.build_id, job_id = %job.job_id, "the server canceled the job");
            }
            return;
        }
        let original = lease.clone();
        let Some(job) = lease.job else {
            tracing::error!(lease_id = %lease.lease_id, "refusing a lease without a job");
            return;
        };
        let span = tracing::info_span!(
            "lease",
            lease_id = %lease.lease_id,
            build_id = %lease.build_id,
            job_id = %job.id,
            attempt = lease.attempt
        );
        let _entered = span.enter();
        if lease.lease_id.is_empty() || lease.build_id.is_empty() {
            tracing::error!("refusing a lease without a lease id or build id");
            return;
        }
        let cancel = CancellationToken::new();
        let admitted = self.slots().admit(
            &lease.lease_id,
            Running {
                cancel: cancel.clone(),
                build_id: lease.build_id.clone(),
                job_id: job.id.clone(),
            },
        );
        match admitted {
            Admit::Start => {}
            Admit::Duplicate => {
                tracing::debug!("lease pushed again; already running or done");
                return;
            }
            Admit::Full => {
                tracing::debug!(
                    capacity = self.config.capacity,
                    "every slot is taken: the lease starts when one frees"
                );
                if !tasks
                    .pending
                    .iter()
                    .any(|p| p.lease_id == original.lease_id)
                {
                    tasks.pending.push_back(original);
                }
                return;
            }
            Admit::Draining => {
                // The server moves a draining agent's unstarted leases elsewhere.
                tracing::info!("not starting a lease: draining");
                return;
            }
        }
        tracing::info!("starting job");
        let build = BuildRef {
            tenant: lease.tenant,
            project: lease.project,
            build_id: lease.build_id,
        };
        let source = Source {
            repository: lease.repository,
            commit: lease.commit,
            tenant: build.tenant.clone(),
        };
        // Without a repository (not sent by the server) the job runs in an empty workspace.
        let source = (!source.repository.is_empty()).then_some(source);
        let workspace =
            self.workspaces
                .for_job(source.as_ref(), &build.build_id, &job.id, lease.attempt);
        let dir = workspace.dir.clone();
        let sink = Arc::new(ApiSink::new(self.client.clone(), lease.lease_id.clone()));
        let options = AttemptOptions {
            retry: self.config.reconnect,
            abandon: self.abandon.clone(),
            usage: self
                .config
                .machine_class
                .clone()
                .map(|machine_class| UsageMeter {
                    machine_class,
                    interval: self.config.usage_interval,
                }),
            objects: self.config.objects.clone(),
            server_artifacts: Some(self.server_artifacts.clone()),
            keep_failed_for: Some(self.config.keep_failed_for),
            container: self.config.containers.as_ref().map(|c| ContainerRuntime {
                engine: c.engine.clone(),
                limits: c.limits,
                owner: self.identity.agent_id.clone(),
                hidden: Vec::new(),
            }),
            // A generic agent standing in for the labels the job asked for says so.
            note: tributary_pipeline::runs_on::fallback_note(
                &job.runs_on,
                &self.config.labels,
                &self.config.name,
            )
            .unwrap_or_default(),
            ..AttemptOptions::default()
        };
        let attempt = Lease {
            job,
            attempt: lease.attempt,
            agent_id: self.identity.agent_id.clone(),
            lease_id: lease.lease_id.clone(),
            inputs: lease.artifacts,
            caches: lease.caches,
            superseded_caches: lease.superseded_caches,
            cache_limit: lease.cache_limit_bytes,
            secrets: crate::JobSecrets {
                values: lease
                    .secrets
                    .into_iter()
                    .map(|v| (v.name, v.value))
                    .collect(),
                missing: lease.missing_secrets,
                from_env: false,
            },
        };
        let scratch = self.config.workdir.join("scratch");
        let lease_id = lease.lease_id;
        let tenant = build.tenant.clone();
        let handle = tasks.set.spawn(
            async move {
                let report =
                    run_attempt(sink, build, attempt, workspace, scratch, cancel, options).await;
                tracing::info!(
                    status = report.status.map_or("none", |s| s.name()),
                    fenced = report.fenced,
                    delivered = report.delivered,
                    dropped = report.dropped,
                    "job ended"
                );
            }
            .instrument(span.clone()),
        );
        tasks.leases.insert(handle.id(), (lease_id, dir, tenant));
    }

    /// An attempt task ended: free its slot, delete its workspace.
    fn finished(
        &self,
        tasks: &mut Tasks,
        done: Result<(tokio::task::Id, ()), tokio::task::JoinError>,
    ) {
        let id = match done {
            Ok((id, ())) => id,
            Err(e) => {
                if !e.is_cancelled() {
                    tracing::error!(error = %e, "job task failed");
                }
                e.id()
            }
        };
        let Some((lease_id, dir, tenant)) = tasks.leases.remove(&id) else {
            return;
        };
        self.slots().finish(&lease_id);
        if let Some(next) = tasks.pending.pop_front() {
            self.start(next, tasks);
        }
        // A failed job's kept workspace is neither reused nor deleted until its time is up.
        if self.config.clean_workspaces && !crate::kept::is_kept(&dir) {
            let workspaces = self.workspaces.clone();
            tokio::task::spawn_blocking(move || workspaces.release(&dir, &tenant));
        }
    }

    /// A hard stop: cancel every job, stop re-sending, wait a moment for the jobs to end.
    /// Returns how many jobs were running.
    async fn abort(&self, tasks: &mut Tasks) -> usize {
        let n = {
            let mut slots = self.slots();
            slots.drain();
            slots.cancel_all()
        };
        self.abandon.cancel();
        if n > 0 {
            tracing::warn!(running = n, "stopping at once: canceling the running jobs");
        }
        let deadline = Instant::now() + ABORT_GRACE;
        while !tasks.set.is_empty() {
            match tokio::time::timeout_at(deadline, tasks.set.join_next_with_id()).await {
                Ok(Some(done)) => self.finished(tasks, done),
                Ok(None) => break,
                Err(_) => {
                    tasks.set.abort_all();
                    while let Some(done) = tasks.set.join_next_with_id().await {
                        self.finished(tasks, done);
                    }
                    break;
                }
            }
        }
        n
    }
}

fn lock(slots: &Mutex<Slots>) -> std::sync::MutexGuard<'_, Slots> {
    slots
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Keeps a work stream open and hands every pushed lease on, until `stop`.
async fn pull_loop(
    client: AgentsApi,
    request: api::PullWorkRequest,
    caps: api::AgentCapabilities,
    server: String,
    policy: BackoffPolicy,
    tx: mpsc::Sender<Pulled>,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new(policy);
    loop {
        let mut client = client.clone();
        let opened = tokio::select! {
            r = client.pull_work(with_capabilities(request.clone(), &caps)) => r,
            _ = stop.cancelled() => return,
        };
        match opened {
            Ok(response) => {
                tracing::info!(%server, "work stream open");
                let opened_at = Instant::now();
                let mut stream = response.into_inner();
                loop {
                    let message = tokio::select! {
                        m = stream.message() => m,
                        _ = stop.cancelled() => {
                            tracing::info!("work stream closed");
                            return;
                        }
                    };
                    match message {
                        Ok(Some(lease)) => {
                            backoff.reset();
                            let pulled = if lease.drain {
                                Pulled::Drain
                            } else {
                                Pulled::Lease(Box::new(lease))
                            };
                            if tx.send(pulled).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => {
                            tracing::warn!(%server, "the server ended the work stream; reconnecting");
                            break;
                        }
                        Err(status) => {
                            if let Some(e) = refusal(&status, &server) {
                                let _ = tx.send(Pulled::Fatal(e)).await;
                                return;
                            }
                            tracing::warn!(%server, error = %status.message(), code = ?status.code(), "work stream lost; reconnecting");
                            break;
                        }
                    }
                }
                if opened_at.elapsed() >= STABLE_STREAM {
                    backoff.reset();
                }
            }
            Err(status) => {
                if let Some(e) = refusal(&status, &server) {
                    let _ = tx.send(Pulled::Fatal(e)).await;
                    return;
                }
                tracing::warn!(%server, error = %status.message(), code = ?status.code(), "cannot open the work stream");
            }
        }
        let delay = backoff.next_delay();
        tracing::debug!(retry_in = ?delay, "reconnecting");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// A PullWork error after which retrying is pointless.
fn refusal(status: &tonic::Status, server: &str) -> Option<AgentError> {
    match status.code() {
        Code::Unauthenticated | Code::PermissionDenied => {
            // A server that says how to register again (a revoke) is not repeated.
            let hint = if status.message().contains("agent.json") {
                ""
            } else {
                "; if the agent was revoked, delete agent.json in the work directory and \
                 register again with an enrollment token"
            };
            Some(AgentError::Rejected(format!(
                "the server at {server} refused this agent's identity: {} ({:?}){hint}",
                status.message(),
                status.code()
            )))
        }
        Code::Unimplemented => Some(AgentError::Rejected(format!(
            "the server at {server} does not serve agents (tributary.api.v1.Agents): {}",
            status.message()
        ))),
        _ => None,
    }
}

/// Heartbeats every `interval` (and when `now` is notified) until `stop`; a draining agent sends
/// one last heartbeat when it stops.
async fn heartbeat_loop(
    client: AgentsApi,
    agent_id: String,
    slots: Arc<Mutex<Slots>>,
    interval: Duration,
    now: Arc<Notify>,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval(interval.max(Duration::from_millis(10)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = now.notified() => {}
            _ = stop.cancelled() => break,
        }
        beat(&client, &agent_id, &slots).await;
    }
    if lock(&slots).draining() {
        beat(&client, &agent_id, &slots).await;
    }
}

/// One heartbeat; cancels the leases the server names.
async fn beat(client: &AgentsApi, agent_id: &str, slots: &Mutex<Slots>) {
    let (lease_ids, draining) = {
        let slots = lock(slots);
        (slots.lease_ids(), slots.draining())
    };
    let request = api::HeartbeatRequest {
        agent_id: agent_id.to_owned(),
        lease_ids,
        draining,
    };
    let mut client = client.clone();
    match tokio::time::timeout(CALL_TIMEOUT, client.heartbeat(request)).await {
        Ok(Ok(response)) => {
            let slots = lock(slots);
            for lease_id in response.into_inner().cancel_lease_ids {
                if let Some(job) = slots.cancel(&lease_id) {
                    tracing::info!(%lease_id, build_id = %job.build_id, job_id = %job.job_id, "the server canceled the job");
                }
            }
        }
        Ok(Err(status)) => {
            tracing::debug!(error = %status.message(), code = ?status.code(), "heartbeat failed")
        }
        Err(_) => tracing::debug!("heartbeat timed out"),
    }
}

/// A running lease.
pub(crate) struct Running {
    pub cancel: CancellationToken,
    pub build_id: String,
    pub job_id: String,
}

/// Whether a pushed lease may start.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admit {
    Start,
    /// Already running, or finished a moment ago (pushed again after a reconnect).
    Duplicate,
    /// At capacity.
    Full,
    Draining,
}

/// The running leases and the drain state: pure bookkeeping, shared by the loops.
pub(crate) struct Slots {
    capacity: usize,
    running: BTreeMap<String, Running>,
    finished: VecDeque<String>,
    finished_set: HashSet<String>,
    draining: bool,
}

impl Slots {
    pub(crate) fn new(capacity: usize) -> Self {
        Slots {
            capacity: capacity.max(1),
            running: BTreeMap::new(),
            finished: VecDeque::new(),
            finished_set: HashSet::new(),
            draining: false,
        }
    }

    /// Takes a slot for `lease_id` if it may start.
    pub(crate) fn admit(&mut self, lease_id: &str, job: Running) -> Admit {
        if self.running.contains_key(lease_id) || self.finished_set.contains(lease_id) {
            return Admit::Duplicate;
        }
        if self.draining {
            return Admit::Draining;
        }
        if self.running.len() >= self.capacity {
            return Admit::Full;
        }
        self.running.insert(lease_id.to_owned(), job);
        Admit::Start
    }

    /// Frees the slot of a lease whose attempt ended.
    pub(crate) fn finish(&mut self, lease_id: &str) -> Option<Running> {
        let job = self.running.remove(lease_id)?;
        if self.finished_set.insert(lease_id.to_owned()) {
            self.finished.push_back(lease_id.to_owned());
        }
        while self.finished.len() > REMEMBER_FINISHED {
            if let Some(old) = self.finished.pop_front() {
                self.finished_set.remove(&old);
            }
        }
        Some(job)
    }

    /// No new leases from now on.
    pub(crate) fn drain(&mut self) {
        self.draining = true;
    }

    pub(crate) fn draining(&self) -> bool {
        self.draining
    }

    pub(crate) fn running(&self) -> usize {
        self.running.len()
    }

    /// Draining and nothing left running: time to stop.
    pub(crate) fn drained(&self) -> bool {
        self.draining && self.running.is_empty()
    }

    pub(crate) fn lease_ids(&self) -> Vec<String> {
        self.running.keys().cloned().collect()
    }

    /// Cancels a running lease's job; `None` if it is not running here.
    pub(crate) fn cancel(&self, lease_id: &str) -> Option<&Running> {
        let job = self.running.get(lease_id)?;
        job.cancel.cancel();
        Some(job)
    }

    /// Cancels every running job; returns how many.
    pub(crate) fn cancel_all(&self) -> usize {
        for job in self.running.values() {
            job.cancel.cancel();
        }
        self.running.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str) -> Running {
        Running {
            cancel: CancellationToken::new(),
            build_id: "b".into(),
            job_id: id.into(),
        }
    }

    #[test]
    fn admits_up_to_capacity_and_refuses_duplicates() {
        let mut s = Slots::new(2);
        assert_eq!(s.admit("l1", job("a")), Admit::Start);
        assert_eq!(s.admit("l1", job("a")), Admit::Duplicate);
        assert_eq!(s.admit("l2", job("b")), Admit::Start);
        assert_eq!(s.admit("l3", job("c")), Admit::Full);
        assert_eq!(s.lease_ids(), vec!["l1".to_owned(), "l2".to_owned()]);
        assert!(s.finish("l1").is_some());
        assert!(s.finish("l1").is_none());
        // A finished lease pushed again (reconnect race) is not run twice.
        assert_eq!(s.admit("l1", job("a")), Admit::Duplicate);
        assert_eq!(s.admit("l3", job("c")), Admit::Start);
        assert_eq!(s.running(), 2);
    }

    #[test]
    fn capacity_zero_means_one() {
        let mut s = Slots::new(0);
        assert_eq!(s.admit("l1", job("a")), Admit::Start);
        assert_eq!(s.admit("l2", job("b")), Admit::Full);
    }

    #[test]
    fn drain_takes_no_new_leases_and_ends_when_the_last_job_ends() {
        let mut s = Slots::new(4);
        assert!(!s.drained());
        s.admit("l1", job("a"));
        s.admit("l2", job("b"));
        s.drain();
        assert!(s.draining());
        assert_eq!(s.admit("l3", job("c")), Admit::Draining);
        assert!(!s.drained());
        s.finish("l1");
        assert!(!s.drained());
        assert_eq!(s.lease_ids(), vec!["l2".to_owned()]);
        s.finish("l2");
        assert!(s.drained());
        assert!(s.lease_ids().is_empty());

        let mut idle = Slots::new(1);
        idle.drain();
        assert!(idle.drained(), "an idle agent stops at once");
    }

    #[test]
    fn cancel_reaches_the_job_token() {
        let mut s = Slots::new(2);
        let a = job("a");
        let token = a.cancel.clone();
        s.admit("l1", a);
        s.admit("l2", job("b"));
        assert!(s.cancel("nope").is_none());
        assert_eq!(s.cancel("l1").map(|j| j.job_id.clone()), Some("a".into()));
        assert!(token.is_cancelled());
        assert!(!s.running.get("l2").unwrap().cancel.is_cancelled());
        assert_eq!(s.cancel_all(), 2);
        assert!(s.running.get("l2").unwrap().cancel.is_cancelled());
    }

    #[test]
    fn finished_leases_are_forgotten_after_a_while() {
        let mut s = Slots::new(1);
        for i in 0..(REMEMBER_FINISHED + 10) {
            let id = format!("l{i}");
            assert_eq!(s.admit(&id, job("a")), Admit::Start);
            s.finish(&id);
        }
        assert_eq!(s.finished.len(), REMEMBER_FINISHED);
        assert_eq!(s.finished_set.len(), REMEMBER_FINISHED);
        assert_eq!(s.admit("l0", job("a")), Admit::Start);
    }

    #[test]
    fn refusals_that_stop_the_agent() {
        assert!(refusal(&tonic::Status::unauthenticated("revoked"), "s").is_some());
        assert!(refusal(&tonic::Status::permission_denied("no"), "s").is_some());
        assert!(refusal(&tonic::Status::unimplemented("no"), "s").is_some());
        assert!(refusal(&tonic::Status::unavailable("down"), "s").is_none());
        assert!(refusal(&tonic::Status::internal("oops"), "s").is_none());
        // Every refusal of identity says how to register again, once.
        for message in ["revoked", "revoked: delete agent.json and register again"] {
            let said = refusal(&tonic::Status::permission_denied(message), "s")
                .unwrap()
                .to_string();
            assert_eq!(said.matches("agent.json").count(), 1, "{said}");
        }
    }

    #[test]
    fn the_default_machine_class_describes_the_host() {
        assert_eq!(
            mem_total_gb("MemTotal:       24589236 kB\nMemFree: 1 kB\n"),
            Some(23)
        );
        assert_eq!(mem_total_gb("MemTotal: 4026532 kB"), Some(4));
        assert_eq!(mem_total_gb("nothing"), None);
        let class = default_machine_class();
        assert!(class.starts_with(std::env::consts::OS), "{class}");
        assert!(class.contains("cpu-") && class.ends_with("gb"), "{class}");
    }
}
