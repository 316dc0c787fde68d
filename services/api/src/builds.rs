//! Builds: trigger, inspect, cancel, and follow them live.
//!
//! Tails and watches are log subscriptions: a tail first reads the build's events already on
//! the log (by partition key), then subscribes right after the last one it read, so it sees
//! every chunk exactly once whether it started before, during or after the build
//! ([`crate::follow`], shared with the web UI's live log).

use std::collections::BTreeMap;
use std::pin::Pin;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tributary_eventlog::Record;
use tributary_projections::{Build as ReadBuild, Phase};
use tributary_proto::api::{builds_server::Builds, *};
use tributary_proto::events::{
    envelope::Payload, ArtifactUploaded, BuildCanceled, BuildTriggered, Envelope,
};

use crate::auth::{authenticate, Principal};
use crate::follow::{follow_build, next_batch, BuildPartitions, Cursor, Step as Next};
use crate::starts::Start;
use crate::state::{internal, ApiState};

/// The pipeline file read from the repository at the build's commit.
pub const PIPELINE_PATH: &str = ".tributary.yml";

pub struct BuildsApi {
    state: ApiState,
}

impl BuildsApi {
    pub fn new(state: ApiState) -> Self {
        BuildsApi { state }
    }

    fn who<T>(&self, request: &Request<T>) -> Result<Principal, Status> {
        let who = self.state.directory(|d| authenticate(d, request))??;
        who.require_user()?;
        Ok(who)
    }
}

/// The build, if it exists in the caller's tenant, once the read model has applied every
/// record of it the API has seen on the log (the caller's own writes included; nobody else's
/// appends are waited for). Another tenant's build is NOT_FOUND, so its existence is not
/// revealed.
pub async fn build_of(state: &ApiState, who: &Principal, id: &str) -> Result<ReadBuild, Status> {
    let Some(start) = state.build_start(id).await? else {
        return Err(Status::not_found(format!("no build {id}")));
    };
    state.wait_builds(&start.seen()).await?;
    match state.store.load_build(id).await.map_err(internal)? {
        Some(b) if b.tenant == who.tenant => Ok(b),
        _ => Err(Status::not_found(format!("no build {id}"))),
    }
}

/// The full id of `who`'s build that `id` names: the id itself, or a unique prefix of one
/// (as git takes a commit's), e.g. the 13 characters tables print. None or several matches are
/// NOT_FOUND / INVALID_ARGUMENT saying so.
pub async fn resolve_id(state: &ApiState, who: &Principal, id: &str) -> Result<String, Status> {
    // A whole id (UUID) or nothing to resolve.
    if id.len() >= 36 || id.is_empty() {
        return Ok(id.to_owned());
    }
    let mut ids = state
        .store
        .build_ids_with_prefix(Some(&who.tenant), id, 6)
        .await
        .map_err(internal)?;
    if ids.is_empty() {
        // Maybe just triggered: once the read model holds every build of the tenant seen so far.
        state
            .wait_builds(&state.starts.newest_of(&who.tenant)?)
            .await?;
        ids = state
            .store
            .build_ids_with_prefix(Some(&who.tenant), id, 6)
            .await
            .map_err(internal)?;
    }
    pick_id(id, ids).map_err(|e| match e {
        IdError::None(m) => Status::not_found(m),
        IdError::Several(m) => Status::invalid_argument(m),
    })
}

/// Why a build id prefix names no single build.
#[derive(Debug, PartialEq, Eq)]
pub enum IdError {
    None(String),
    Several(String),
}

/// The one build `id` names among `ids` (the ids starting with it, in order, at most a few).
/// Pure; shared with the CLI's local commands.
pub fn pick_id(id: &str, mut ids: Vec<String>) -> Result<String, IdError> {
    if ids.iter().any(|i| i == id) {
        return Ok(id.to_owned());
    }
    match ids.len() {
        0 => Err(IdError::None(format!(
            "no build {id}: no build id starts with it (`tributary builds` lists them)"
        ))),
        1 => Ok(ids.remove(0)),
        _ => Err(IdError::Several(format!(
            "build id {id} is ambiguous: it starts {}{}; give more of it",
            ids.iter().take(5).cloned().collect::<Vec<_>>().join(", "),
            if ids.len() > 5 { ", ..." } else { "" }
        ))),
    }
}

/// Checks, from the log itself (no read model: the API's index of where builds start, folded
/// from the log), that build `id` exists in the caller's tenant: its first state event says
/// whose it is. Another tenant's build is NOT_FOUND. Returns where the build starts, where
/// readers of the build begin.
pub async fn authorize_on_log(
    state: &ApiState,
    who: &Principal,
    id: &str,
) -> Result<Start, Status> {
    match state.build_start(id).await? {
        Some(start) if start.tenant == who.tenant => Ok(start),
        _ => Err(Status::not_found(format!("no build {id}"))),
    }
}

/// The build's `BuildTriggered`, read at the build's start (not from the partition's
/// beginning); None if the build is not on the log.
pub async fn triggered_of(
    state: &ApiState,
    build_id: &str,
) -> Result<Option<(Envelope, BuildTriggered)>, Status> {
    let Some(start) = state.build_start(build_id).await? else {
        return Ok(None);
    };
    let first = state
        .log
        .read_key(build_id, start.events, 1)
        .await
        .map_err(internal)?;
    let Some(env) = first.into_iter().next().and_then(|r| r.decode().ok()) else {
        return Ok(None);
    };
    match &env.payload {
        Some(Payload::BuildTriggered(t)) => {
            let t = t.clone();
            Ok(Some((env, t)))
        }
        _ => Ok(None),
    }
}

/// The build's job plans (its `BuildQueued`, read near the build's start), by job id; empty if
/// it has none (a rejected pipeline).
pub async fn plans_of(
    state: &ApiState,
    build_id: &str,
) -> Result<BTreeMap<String, tributary_proto::events::JobPlan>, Status> {
    let Some(start) = state.build_start(build_id).await? else {
        return Ok(BTreeMap::new());
    };
    // BuildQueued follows BuildTriggered at once (one append), so a few records suffice.
    let records = state
        .log
        .read_key(build_id, start.events, 8)
        .await
        .map_err(internal)?;
    for record in records {
        if let Ok(Envelope {
            payload: Some(Payload::BuildQueued(q)),
            ..
        }) = record.decode()
        {
            return Ok(q
                .plan
                .into_iter()
                .flat_map(|p| p.jobs)
                .map(|j| (j.id.clone(), j))
                .collect());
        }
    }
    Ok(BTreeMap::new())
}

/// For each job of `build` that a generic agent ran in place of its `runs-on` labels (no
/// agent had them), the note saying so (`get`, the web UI's build page).
pub async fn runs_on_notes(
    state: &ApiState,
    build: &ReadBuild,
) -> Result<BTreeMap<String, String>, Status> {
    if build.jobs.iter().all(|j| j.agent_id.is_empty()) {
        return Ok(BTreeMap::new());
    }
    let plans = plans_of(state, &build.id).await?;
    state.cluster.read(|c| {
        let mut notes = BTreeMap::new();
        for job in &build.jobs {
            let (Some(agent), Some(plan)) = (c.agents.get(&job.agent_id), plans.get(&job.id))
            else {
                continue;
            };
            let name = if agent.name.is_empty() {
                &job.agent_id
            } else {
                &agent.name
            };
            if let Some(note) =
                tributary_pipeline::runs_on::fallback_note(&plan.runs_on, &agent.labels, name)
            {
                notes.insert(job.id.clone(), note);
            }
        }
        notes
    })
}

/// Cancels a build of the caller's tenant that has not finished: running jobs are stopped,
/// waiting ones canceled (by the scheduler, from the `BuildCanceled` event).
pub async fn cancel(
    state: &ApiState,
    who: &Principal,
    build_id: &str,
    reason: &str,
) -> Result<(), Status> {
    let build = build_of(state, who, build_id).await?;
    if build.phase.is_terminal() {
        return Err(Status::failed_precondition(format!(
            "build {} already {}",
            build.id,
            build.phase.name()
        )));
    }
    let canceled = Payload::BuildCanceled(BuildCanceled {
        who: who.name.clone(),
        reason: reason.to_owned(),
    });
    state
        .append(&[Envelope::new(
            &build.tenant,
            &build.project,
            &build.id,
            canceled,
        )])
        .await?;
    Ok(())
}

/// Re-runs the jobs of a finished, unsuccessful build that did not succeed, as a new build of
/// the same commit and pipeline; jobs that succeeded keep their result (`kept_from_build`).
pub async fn rerun_failed(
    state: &ApiState,
    who: &Principal,
    build_id: &str,
) -> Result<TriggerBuildResponse, Status> {
    let original = build_of(state, who, build_id).await?;
    if !original.phase.is_terminal() {
        return Err(Status::failed_precondition(format!(
            "build {} is still {}; re-run failed jobs once it has finished",
            original.id,
            original.phase.name()
        )));
    }
    if original.phase == Phase::Succeeded {
        return Err(Status::failed_precondition(format!(
            "build {} succeeded: nothing to re-run",
            original.id
        )));
    }
    // The original trigger, from the log: same commit, same pipeline text, same plan.
    let Some((_, mut triggered)) = triggered_of(state, &original.id).await? else {
        return Err(Status::internal(
            "the build's trigger is missing from the log",
        ));
    };
    // The same repository as the original, under today's rules and as its project's owner.
    let project = state
        .directory(|d| d.project(&original.tenant, &original.project).cloned())?
        .ok_or_else(|| Status::not_found(format!("no project {}", original.project)))?;
    crate::repo_access::check_build(state, &project, &triggered.repository)?;
    triggered.who = who.name.clone();
    triggered.source = format!("rerun:{}", original.id);
    let new_id = tributary_proto::new_id();
    // Before the build's first event: where to watch from, and where its chunks start.
    let from = state
        .log
        .end_offsets()
        .await
        .map_err(|e| Status::unavailable(format!("cannot read the log's end: {e}")))?;
    triggered.logs_from = logs_from(state, &new_id, &from);
    let (mut payloads, _) = tributary_pipeline::start_build(triggered);
    // Jobs that succeeded keep their result and their artifacts: marked in the plan, they are
    // not run again, and jobs that need them get those artifacts.
    let mut kept_artifacts: BTreeMap<String, Vec<ArtifactUploaded>> = BTreeMap::new();
    for a in crate::artifacts::list(state, who, &original.id).await? {
        kept_artifacts.entry(a.job.clone()).or_default().push(a);
    }
    for payload in &mut payloads {
        if let Payload::BuildQueued(queued) = payload {
            for job in queued.plan.iter_mut().flat_map(|p| p.jobs.iter_mut()) {
                let succeeded = original
                    .jobs
                    .iter()
                    .any(|j| j.id == job.id && j.phase == Phase::Succeeded);
                if succeeded {
                    job.kept_from_build = original.id.clone();
                    job.kept_artifacts = kept_artifacts.remove(&job.id).unwrap_or_default();
                }
            }
        }
    }
    let events: Vec<Envelope> = payloads
        .into_iter()
        .map(|p| Envelope::new(&original.tenant, &original.project, &new_id, p))
        .collect();
    let offsets = state.append(&events).await?;
    tracing::info!(build_id = %new_id, rerun_of = %original.id, "failed jobs re-run");
    Ok(TriggerBuildResponse {
        build_id: new_id,
        offset: offsets.first().copied().unwrap_or(0),
        from: positions(&from),
    })
}

/// Triggers a build of `project` at `wanted` (a ref or a commit; empty = default branch):
/// resolves it to a commit, reads the pipeline at that commit, appends the build's first
/// events. `git_ref` is what is recorded as the ref. Used by the API and by webhooks.
pub async fn trigger(
    state: &ApiState,
    tenant: &str,
    project: &str,
    git_ref: &str,
    wanted: &str,
    who: &str,
    source: &str,
) -> Result<TriggerBuildResponse, Status> {
    let project = state.directory(|d| d.project(tenant, project).cloned())?.ok_or_else(|| {
        Status::not_found(format!(
            "no project {project}; create it with `tributary project add {project} --repo PATH_OR_URL`"
        ))
    })?;
    crate::repo_access::check_build(state, &project, &project.repository)?;
    let mirrors = state.mirrors.for_tenant(tenant);
    let commit = tributary_repo::resolve(&project.repository, wanted, &mirrors)
        .await
        .map_err(|e| Status::failed_precondition(e.to_string()))?;
    let pipeline_text = match tributary_repo::read_file(
        &project.repository,
        &commit,
        PIPELINE_PATH,
        &mirrors,
    )
    .await
    {
        Ok(text) => text,
        Err(e) if e.is_not_found() => String::new(),
        Err(e) => return Err(Status::failed_precondition(e.to_string())),
    };
    let build_id = tributary_proto::new_id();
    // Before the build's first event: where to watch from to see all of it.
    let from = state
        .log
        .end_offsets()
        .await
        .map_err(|e| Status::unavailable(format!("cannot read the log's end: {e}")))?;
    let triggered = BuildTriggered {
        who: who.to_owned(),
        source: source.to_owned(),
        repository: project.repository.clone(),
        git_ref: git_ref.to_owned(),
        commit: commit.clone(),
        pipeline_path: PIPELINE_PATH.into(),
        pipeline_text,
        number: 0,
        logs_from: logs_from(state, &build_id, &from),
    };
    let (payloads, _) = tributary_pipeline::start_build(triggered);
    let events: Vec<Envelope> = payloads
        .into_iter()
        .map(|p| Envelope::new(tenant, &project.name, &build_id, p))
        .collect();
    let offsets = state.append(&events).await?;
    tracing::info!(build_id = %build_id, project = %project.name, commit = %commit, source, "build triggered");
    Ok(TriggerBuildResponse {
        build_id,
        offset: offsets.first().copied().unwrap_or(0),
        from: positions(&from),
    })
}

/// Where build `build_id`'s chunks start at the earliest: its logs partition's end in `ends`
/// (the log's ends just before the build's first event).
fn logs_from(state: &ApiState, build_id: &str, ends: &[u64]) -> u64 {
    let partition = state
        .log
        .layout()
        .partition_for(tributary_eventlog::Topic::Logs, build_id);
    ends.get(partition as usize).copied().unwrap_or(0)
}

/// End offsets (indexed by partition) as API positions.
fn positions(ends: &[u64]) -> Vec<Position> {
    ends.iter()
        .enumerate()
        .map(|(p, o)| Position {
            partition: p as u32,
            offset: *o,
        })
        .collect()
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Builds for BuildsApi {
    async fn trigger_build(
        &self,
        request: Request<TriggerBuildRequest>,
    ) -> Result<Response<TriggerBuildResponse>, Status> {
        let who = self.who(&request)?;
        let req = request.into_inner();
        let wanted = if req.commit.is_empty() {
            req.git_ref.clone()
        } else {
            req.commit.clone()
        };
        let resp = trigger(
            &self.state,
            &who.tenant,
            &req.project,
            &req.git_ref,
            &wanted,
            &who.name,
            "api",
        )
        .await?;
        Ok(Response::new(resp))
    }

    async fn get_build(
        &self,
        request: Request<GetBuildRequest>,
    ) -> Result<Response<Build>, Status> {
        let who = self.who(&request)?;
        let id = resolve_id(&self.state, &who, &request.get_ref().build_id).await?;
        if let Some(at) = &request.get_ref().at {
            let mut api = crate::history::get_at(&self.state, &who, &id, at).await?;
            // Agents by name, as `get` shows them (names never change).
            self.state.cluster.read(|c| {
                for job in &mut api.jobs {
                    if let Some(agent) = c.agents.get(&job.agent_id) {
                        job.agent_name = agent.name.clone();
                    }
                }
            })?;
            return Ok(Response::new(api));
        }
        let build = build_of(&self.state, &who, &id).await?;
        let mut api = to_api(&build);
        // Why queued jobs are not running, from the same routing rules the scheduler uses and
        // the configuration it announced (`SchedulerStarted`), once the cluster fold has seen
        // every record of the build the API has.
        if let Some(start) = self.state.build_start(&build.id).await? {
            self.state.cluster.wait(&start.seen()).await?;
        }
        let mut notes = runs_on_notes(&self.state, &build).await?;
        let reasons = self.state.cluster.read(|c| {
            let config = c.config.clone().unwrap_or_default();
            for job in &mut api.jobs {
                if let Some(agent) = c.agents.get(&job.agent_id) {
                    job.agent_name = agent.name.clone();
                }
                job.runs_on_note = notes.remove(&job.id).unwrap_or_default();
            }
            tributary_scheduler::cluster::waiting_reasons(
                c,
                &build.id,
                tributary_proto::now_us(),
                &config,
            )
        })?;
        for job in &mut api.jobs {
            if let Some(reason) = reasons.get(&job.id) {
                job.waiting_for = reason.clone();
            }
        }
        Ok(Response::new(api))
    }

    async fn explain_build(
        &self,
        request: Request<ExplainBuildRequest>,
    ) -> Result<Response<ExplainBuildResponse>, Status> {
        let who = self.who(&request)?;
        let req = request.into_inner();
        let answer = crate::history::explain(&self.state, &who, &req.build_id, &req.job).await?;
        Ok(Response::new(answer))
    }

    async fn list_builds(
        &self,
        request: Request<ListBuildsRequest>,
    ) -> Result<Response<ListBuildsResponse>, Status> {
        let who = self.who(&request)?;
        let req = request.into_inner();
        if !req.status.is_empty() && Phase::parse(&req.status).is_none() {
            return Err(Status::invalid_argument(format!(
                "unknown status {:?}; use one of pending, queued, running, succeeded, failed, \
                 canceled",
                req.status
            )));
        }
        // Every build of the tenant triggered so far is in the list.
        let newest = self.state.starts.newest_of(&who.tenant)?;
        self.state.wait_builds(&newest).await?;
        let limit = if req.limit == 0 {
            50
        } else {
            req.limit.min(1000)
        };
        let project = (!req.project.is_empty()).then_some(req.project.as_str());
        let status = (!req.status.is_empty()).then_some(req.status.as_str());
        let builds = self
            .state
            .store
            .list_builds_for(&who.tenant, project, status, limit)
            .await
            .map_err(internal)?;
        Ok(Response::new(ListBuildsResponse {
            builds: builds.iter().map(to_api).collect(),
        }))
    }

    async fn cancel_build(
        &self,
        request: Request<CancelBuildRequest>,
    ) -> Result<Response<CancelBuildResponse>, Status> {
        let who = self.who(&request)?;
        let req = request.into_inner();
        let id = resolve_id(&self.state, &who, &req.build_id).await?;
        cancel(&self.state, &who, &id, &req.reason).await?;
        Ok(Response::new(CancelBuildResponse {}))
    }

    async fn rerun_failed(
        &self,
        request: Request<RerunFailedRequest>,
    ) -> Result<Response<TriggerBuildResponse>, Status> {
        let who = self.who(&request)?;
        let id = resolve_id(&self.state, &who, &request.get_ref().build_id).await?;
        let resp = rerun_failed(&self.state, &who, &id).await?;
        Ok(Response::new(resp))
    }

    type TailLogsStream = BoxStream<LogLine>;

    async fn tail_logs(
        &self,
        request: Request<TailLogsRequest>,
    ) -> Result<Response<Self::TailLogsStream>, Status> {
        let who = self.who(&request)?;
        let mut req = request.into_inner();
        req.build_id = resolve_id(&self.state, &who, &req.build_id).await?;
        let start = authorize_on_log(&self.state, &who, &req.build_id).await?;
        let (tx, rx) = mpsc::channel(256);
        let log = self.state.log.clone();
        let from = start.cursor(BuildPartitions::of(log.layout(), &req.build_id));
        let guard = crate::state::TailGuard::new(&self.state);
        tokio::spawn(async move {
            let _guard = guard;
            let map = |record: &Record, env: &Envelope, _: &Cursor| -> Next<LogLine> {
                match &env.payload {
                    Some(Payload::LogChunk(c)) if req.job.is_empty() || c.job == req.job => {
                        Next::Send(LogLine {
                            offset: record.offset,
                            partition: record.partition,
                            job: c.job.clone(),
                            attempt: c.attempt,
                            step: c.step,
                            line: c.line,
                            stream: c.stream,
                            data: c.data.clone(),
                            build_status: String::new(),
                        })
                    }
                    // An invalid pipeline is part of the build's log, as the system's words.
                    Some(Payload::PipelineRejected(r)) if req.job.is_empty() => {
                        Next::Send(LogLine {
                            offset: record.offset,
                            partition: record.partition,
                            stream: tributary_proto::events::Stream::System as i32,
                            data: format!("{}:{}:{}: {}\n", r.file, r.line, r.column, r.message)
                                .into_bytes(),
                            ..LogLine::default()
                        })
                    }
                    Some(Payload::BuildFinished(f)) => Next::Last(LogLine {
                        offset: record.offset,
                        partition: record.partition,
                        build_status: tributary_proto::events::Status::try_from(f.status)
                            .map_or("unknown", |s| s.name())
                            .to_owned(),
                        ..LogLine::default()
                    }),
                    _ => Next::Skip,
                }
            };
            follow_build(log.as_ref(), &req.build_id, from, req.follow, &tx, map).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type WatchEventsStream = BoxStream<WatchedEvent>;

    async fn watch_events(
        &self,
        request: Request<WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let who = self.who(&request)?;
        let mut req = request.into_inner();
        req.build_id = resolve_id(&self.state, &who, &req.build_id).await?;
        let layout = self.state.log.layout();
        // A watch of one build reads its partitions from the build's start at the earliest.
        let begins = if req.build_id.is_empty() {
            None
        } else {
            self.state.build_start(&req.build_id).await?
        };
        let start = watch_start(layout, &req, begins.as_ref())?;
        // `until_end`: (partition, end) of every partition with records still to read.
        let mut to_read: Vec<(u32, u64)> = Vec::new();
        if req.until_end {
            let ends = self.state.log.end_offsets().await.map_err(internal)?;
            for &(p, from) in &start {
                let end = ends.get(p as usize).copied().unwrap_or(0);
                if from < end {
                    to_read.push((p, end));
                }
            }
        }
        let (tx, rx) = mpsc::channel(256);
        let mut sub = self.state.log.subscribe_partitions(&start);
        let guard = crate::state::TailGuard::new(&self.state);
        tokio::spawn(async move {
            let _guard = guard;
            let mut seen = tributary_scheduler::seen::SeenIds::default();
            loop {
                if req.until_end && to_read.is_empty() {
                    return;
                }
                let Some(records) = next_batch(sub.as_mut(), &tx).await else {
                    return;
                };
                for record in &records {
                    to_read.retain(|&(p, end)| p != record.partition || record.offset + 1 < end);
                    let Ok(env) = record.decode() else { continue };
                    let visible = env.tenant == who.tenant
                        && (req.build_id.is_empty() || env.build_id == req.build_id)
                        && (req.project.is_empty() || env.project == req.project)
                        && (req.types.is_empty() || req.types.iter().any(|t| t == env.type_name()));
                    if visible
                        && seen.first_time(&env.event_id)
                        && tx
                            .send(Ok(WatchedEvent {
                                offset: record.offset,
                                partition: record.partition,
                                event: Some(env),
                            }))
                            .await
                            .is_err()
                    {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Where a watch starts, per partition: the positions the request lists, and `from_offset`
/// for the others (only 0 on a partitioned log: offsets of different partitions are
/// unrelated). A watch of one build reads only the build's partitions, and not before
/// `begins` (where the build starts, when it is on the log): nothing of it is before.
pub fn watch_start(
    layout: tributary_eventlog::Layout,
    req: &WatchEventsRequest,
    begins: Option<&Start>,
) -> Result<Vec<(u32, u64)>, Status> {
    if layout.partitions() > 1 && req.from_offset > 0 {
        return Err(Status::invalid_argument(format!(
            "this log has {} partitions: give start positions per partition (`from`), not              from_offset {}",
            layout.partitions(),
            req.from_offset
        )));
    }
    if let Some(bad) = req.from.iter().find(|p| p.partition >= layout.partitions()) {
        return Err(Status::invalid_argument(format!(
            "no partition {} (the log has {})",
            bad.partition,
            layout.partitions()
        )));
    }
    let mut floor = Cursor::default();
    let partitions: Vec<u32> = if req.build_id.is_empty() {
        layout.all().collect()
    } else {
        let parts = BuildPartitions::of(layout, &req.build_id);
        if let Some(begins) = begins {
            floor = begins.cursor(parts);
        }
        let mut ps = vec![parts.events];
        if !parts.shared() {
            ps.push(parts.logs);
        }
        ps
    };
    let parts = BuildPartitions::of(layout, &req.build_id);
    Ok(partitions
        .into_iter()
        .map(|p| {
            let at = req
                .from
                .iter()
                .find(|pos| pos.partition == p)
                .map_or(req.from_offset, |pos| pos.offset);
            let floor = if req.build_id.is_empty() {
                0
            } else if p == parts.events {
                floor.events
            } else {
                floor.logs
            };
            (p, at.max(floor))
        })
        .collect())
}

pub(crate) fn to_api(b: &ReadBuild) -> Build {
    Build {
        id: b.id.clone(),
        tenant: b.tenant.clone(),
        project: b.project.clone(),
        number: b.number,
        status: b.phase.name().into(),
        who: b.who.clone(),
        git_ref: b.git_ref.clone(),
        commit: b.commit.clone(),
        triggered_us: b.triggered_us,
        started_us: b.started_us.unwrap_or(0),
        finished_us: b.finished_us.unwrap_or(0),
        reason: b.reason.clone(),
        as_of_offset: 0,
        as_of_us: 0,
        jobs: b
            .jobs
            .iter()
            .map(|j| Job {
                id: j.id.clone(),
                name: j.name.clone(),
                matrix: j
                    .matrix
                    .iter()
                    .map(|(n, v)| tributary_proto::events::MatrixValue {
                        name: n.clone(),
                        value: v.clone(),
                    })
                    .collect(),
                needs: j.needs.clone(),
                status: j.phase.name().into(),
                attempt: j.attempt,
                agent_id: j.agent_id.clone(),
                started_us: j.started_us.unwrap_or(0),
                finished_us: j.finished_us.unwrap_or(0),
                exit_code: j.exit_code.unwrap_or(0),
                reason: j.reason.clone(),
                steps: j
                    .steps
                    .iter()
                    .map(|s| Step {
                        name: s.name.clone(),
                        status: s.phase.name().into(),
                        exit_code: s.exit_code.unwrap_or(0),
                        duration_us: s.duration_us.unwrap_or(0),
                        lines: s
                            .lines
                            .iter()
                            .map(|l| Line {
                                text: l.text.clone(),
                                status: l.phase.name().into(),
                                exit_code: l.exit_code.unwrap_or(0),
                                duration_us: l.duration_us.unwrap_or(0),
                            })
                            .collect(),
                    })
                    .collect(),
                waiting_for: String::new(),
                agent_name: String::new(),
                runs_on_note: String::new(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tributary_eventlog::Layout;

    fn pos(partition: u32, offset: u64) -> Position {
        Position { partition, offset }
    }

    #[test]
    fn a_watch_starts_at_the_listed_positions_and_from_offset_elsewhere() {
        let req = WatchEventsRequest {
            from: vec![pos(2, 40)],
            ..Default::default()
        };
        let layout = Layout { events: 3, logs: 1 };
        assert_eq!(
            watch_start(layout, &req, None).unwrap(),
            vec![(0, 0), (1, 0), (2, 40), (3, 0)]
        );
        // One partition: from_offset as always.
        let old = WatchEventsRequest {
            from_offset: 17,
            ..Default::default()
        };
        assert_eq!(
            watch_start(Layout::SINGLE, &old, None).unwrap(),
            vec![(0, 17)]
        );
    }

    #[test]
    fn a_watch_of_one_build_reads_only_its_two_partitions() {
        let layout = Layout { events: 4, logs: 2 };
        let build = tributary_proto::new_id();
        let req = WatchEventsRequest {
            build_id: build.clone(),
            ..Default::default()
        };
        let parts = BuildPartitions::of(layout, &build);
        assert_eq!(
            watch_start(layout, &req, None).unwrap(),
            vec![(parts.events, 0), (parts.logs, 0)]
        );
    }

    #[test]
    fn a_watch_of_one_build_starts_where_the_build_does() {
        let layout = Layout { events: 4, logs: 2 };
        let build = tributary_proto::new_id();
        let parts = BuildPartitions::of(layout, &build);
        let begins = Start {
            tenant: "t".into(),
            events: 700,
            logs: 90,
            partition: parts.events,
            last: 700,
        };
        let mut req = WatchEventsRequest {
            build_id: build.clone(),
            ..Default::default()
        };
        assert_eq!(
            watch_start(layout, &req, Some(&begins)).unwrap(),
            vec![(parts.events, 700), (parts.logs, 90)]
        );
        // Positions past the start are kept.
        req.from = vec![pos(parts.logs, 120)];
        assert_eq!(
            watch_start(layout, &req, Some(&begins)).unwrap(),
            vec![(parts.events, 700), (parts.logs, 120)]
        );
        // One partition: the build's first record.
        let single = WatchEventsRequest {
            build_id: build,
            ..Default::default()
        };
        assert_eq!(
            watch_start(Layout::SINGLE, &single, Some(&begins)).unwrap(),
            vec![(0, 700)]
        );
    }

    #[test]
    fn a_single_offset_or_an_unknown_partition_is_refused_on_a_partitioned_log() {
        let layout = Layout { events: 4, logs: 2 };
        let offset = WatchEventsRequest {
            from_offset: 5,
            ..Default::default()
        };
        let err = watch_start(layout, &offset, None).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("6 partitions"), "{}", err.message());
        let unknown = WatchEventsRequest {
            from: vec![pos(6, 0)],
            ..Default::default()
        };
        assert_eq!(
            watch_start(layout, &unknown, None).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}
