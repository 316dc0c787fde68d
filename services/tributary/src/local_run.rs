//! `tributary run`: the local simulator. The same scheduler decisions, executor and events as
//! the server, with the log in the local data directory and one in-process agent.
//!
//! Its in-process agent meters jobs exactly like `tributary agent` (UsageTick events from the
//! agent crate's attempt runner), so metering, `invoice` and `audit` work on a local data
//! directory too.
//!
//! The driver never keeps state on the side: it folds the log into a [`SchedulerState`],
//! asks [`decide`] what to do, appends the decisions, and waits until it has folded its own
//! appends back from the log before deciding again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tributary_eventlog::EventLog;
use tributary_proto::events::{
    envelope::Payload, BuildCanceled, BuildTriggered, JobAssigned, JobPlan, Status,
};
use tributary_scheduler::{decide, Decision, SchedulerState};

use crate::agent::{self, BuildRef, Lease, Workspaces};

pub const LOCAL_AGENT: &str = "local";

/// What to run and where.
pub struct LocalRun {
    pub pipeline_file: PathBuf,
    pub pipeline_text: String,
    /// Directory the jobs run in (the pipeline file's directory).
    pub workdir: PathBuf,
    pub parallel: usize,
    pub scratch_dir: PathBuf,
    /// Run only this job (an instance id, or a job name for all its matrix instances); its
    /// `needs` are taken as done.
    pub only_job: Option<String>,
}

/// Records the trigger, then either the rejection or the plan. Returns the build and, when
/// the pipeline is valid, the plan's jobs.
pub async fn trigger(
    log: &dyn EventLog,
    build: &BuildRef,
    run: &LocalRun,
) -> anyhow::Result<Result<Vec<JobPlan>, tributary_pipeline::PipelineError>> {
    let file = run.pipeline_file.display().to_string();
    let triggered = BuildTriggered {
        who: std::env::var("USER").unwrap_or_else(|_| "local".into()),
        source: "cli".into(),
        repository: run.workdir.display().to_string(),
        git_ref: git(&run.workdir, &["rev-parse", "--abbrev-ref", "HEAD"]),
        commit: git(&run.workdir, &["rev-parse", "HEAD"]),
        pipeline_path: file.clone(),
        pipeline_text: run.pipeline_text.clone(),
        number: 0,
        // The SQLite log finds a build's records through its key index.
        logs_from: 0,
    };
    let (mut payloads, loaded) = tributary_pipeline::start_build(triggered);
    let loaded = match (loaded, &run.only_job) {
        (Ok(plan), Some(only)) => {
            let jobs = only_job(&plan.jobs, only).with_context(|| {
                format!(
                    "no job {only:?} in {file}; its jobs are: {}",
                    plan.jobs
                        .iter()
                        .map(|j| j.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
            for p in payloads.iter_mut() {
                if let Payload::BuildQueued(q) = p {
                    q.plan = Some(tributary_proto::events::Plan { jobs: jobs.clone() });
                }
            }
            Ok(jobs)
        }
        (loaded, _) => loaded.map(|plan| plan.jobs),
    };
    let events: Vec<_> = payloads.into_iter().map(|p| build.envelope(p)).collect();
    log.append(&events).await?;
    Ok(loaded)
}

/// The jobs `only` names (an instance id, else every instance of a job name), without their
/// `needs`; `None` when it names none.
pub fn only_job(jobs: &[JobPlan], only: &str) -> Option<Vec<JobPlan>> {
    let by_id: Vec<JobPlan> = jobs.iter().filter(|j| j.id == only).cloned().collect();
    let chosen = if by_id.is_empty() {
        jobs.iter().filter(|j| j.name == only).cloned().collect()
    } else {
        by_id
    };
    (!chosen.is_empty()).then(|| {
        chosen
            .into_iter()
            .map(|mut j| {
                j.needs.clear();
                j
            })
            .collect()
    })
}

/// How the driver runs a build's jobs.
pub struct DriveConfig {
    pub log: Arc<dyn EventLog>,
    /// The build to drive (already triggered on the log).
    pub build: BuildRef,
    /// Jobs running at once (the in-process agent's capacity).
    pub slots: usize,
    /// Where every job runs (the pipeline file's directory).
    pub workdir: PathBuf,
    pub scratch_dir: PathBuf,
    /// Where jobs' artifacts are uploaded (the data directory's `objects/`).
    pub objects: Option<tributary_objects::Objects>,
    /// How `image:` jobs run; `None`: they fail, saying there is no container engine.
    pub container: Option<tributary_agent::ContainerRuntime>,
    /// The pipeline file, as the recreate commands at the top of each job log name it.
    pub pipeline_file: Option<String>,
    /// The project's cache size limit in bytes (0 = none).
    pub cache_limit: u64,
    /// UsageTick events while jobs run (the agents' own meter); `None`: no usage.
    pub usage: Option<tributary_agent::UsageMeter>,
}

/// Drives one build to its end: folds the log (other builds only for what they left: runs
/// to reuse, caches), decides, appends the decisions, runs assigned jobs with the in-process
/// agent, and returns the build's status and reason once BuildFinished is on the log.
/// `cancel` (Ctrl-C) appends BuildCanceled. The server drives builds with the scheduler
/// service and agents instead; both decide with the same [`decide`].
pub async fn drive(
    cfg: DriveConfig,
    _from: u64,
    cancel: CancellationToken,
) -> anyhow::Result<(Status, String)> {
    let log = cfg.log.clone();
    let build = &cfg.build;
    let workspaces = Workspaces::Fixed(cfg.workdir.clone());
    let mut state = SchedulerState::default();
    let mut plans: HashMap<String, JobPlan> = HashMap::new();
    // Artifacts of jobs reused from earlier builds: jobs that need them download them (the
    // others' files are in the shared directory already).
    let mut reused: HashMap<String, Vec<tributary_proto::events::ArtifactUploaded>> =
        HashMap::new();
    // From 0: earlier builds in this data directory may have runs to reuse and caches.
    let mut sub = log.subscribe(0);
    let mut awaiting: Option<u64> = None;
    let mut running: HashMap<(String, u32), CancellationToken> = HashMap::new();
    let mut tasks = tokio::task::JoinSet::new();
    let mut cancel_sent = false;
    loop {
        let records = tokio::select! {
            r = sub.next_batch() => r?,
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                // A job that could not write the log (its disk is full) cannot finish on it:
                // the run ends here, with the reason.
                if let Ok(tributary_agent::AttemptReport { unwritable: Some(reason), .. }) = done {
                    for token in running.values() {
                        token.cancel();
                    }
                    while tasks.join_next().await.is_some() {}
                    anyhow::bail!("{reason}");
                }
                continue;
            }
            _ = cancel.cancelled(), if !cancel_sent => {
                cancel_sent = true;
                let canceled = Payload::BuildCanceled(BuildCanceled {
                    who: "ctrl-c".into(),
                    reason: "interrupted".into(),
                });
                log.append(&[build.envelope(canceled)]).await?;
                continue;
            }
        };
        for record in &records {
            let Ok(env) = record.decode() else {
                tracing::error!(offset = record.offset, "skipping malformed event");
                continue;
            };
            if env.build_id != build.build_id {
                state.apply_history(&env);
                continue;
            }
            state.apply(record.offset, &env);
            match &env.payload {
                Some(Payload::JobReused(r)) => {
                    reused.insert(r.job.clone(), r.artifacts.clone());
                }
                Some(Payload::BuildQueued(q)) => {
                    let jobs = q.plan.iter().flat_map(|p| &p.jobs);
                    plans = jobs.map(|j| (j.id.clone(), j.clone())).collect();
                }
                Some(Payload::BuildCanceled(_)) => {
                    for token in running.values() {
                        token.cancel();
                    }
                }
                Some(Payload::JobFinished(f)) => {
                    running.remove(&(f.job.clone(), f.attempt));
                }
                Some(Payload::BuildFinished(f)) => {
                    while tasks.join_next().await.is_some() {}
                    let status = Status::try_from(f.status).unwrap_or(Status::Failed);
                    return Ok((status, f.reason.clone()));
                }
                _ => {}
            }
        }
        if awaiting.is_some_and(|a| sub.position() <= a) {
            continue; // our last decisions are not folded yet
        }
        let free = cfg.slots.max(1).saturating_sub(state.busy());
        let decisions = decide(&state, free);
        if decisions.is_empty() {
            continue;
        }
        let mut events = Vec::with_capacity(decisions.len());
        let mut leases = Vec::new();
        for decision in decisions {
            match decision {
                Decision::Assign { job, attempt, .. } => {
                    let lease_id = tributary_proto::new_id();
                    events.push(build.envelope(Payload::JobAssigned(JobAssigned {
                        job: job.clone(),
                        attempt,
                        agent_id: LOCAL_AGENT.into(),
                        lease_id: lease_id.clone(),
                        deadline_us: 0,
                    })));
                    leases.push((job, attempt, lease_id));
                }
                other => {
                    if let Some(payload) = other.payload() {
                        events.push(build.envelope(payload));
                    }
                }
            }
        }
        let offsets = log.append(&events).await?;
        awaiting = offsets.last().copied();
        for (job, attempt, lease_id) in leases {
            let Some(plan) = plans.get(&job) else {
                continue;
            };
            let token = CancellationToken::new();
            running.insert((job.clone(), attempt), token.clone());
            let lease = Lease {
                job: plan.clone(),
                attempt,
                agent_id: LOCAL_AGENT.into(),
                lease_id,
                // Every job of a local run shares the pipeline's directory: what a needed job
                // produced is already there, unless it was reused from an earlier build.
                inputs: plan
                    .needs
                    .iter()
                    .filter_map(|n| reused.get(n))
                    .flatten()
                    .cloned()
                    .collect(),
                caches: state.caches.entries(&build.tenant, &build.project),
                superseded_caches: state.caches.superseded(&build.tenant, &build.project),
                cache_limit: cfg.cache_limit,
                // A local run has no secret store: a job's secrets come from this process's
                // environment (masked all the same).
                secrets: local_secrets(&plan.secrets),
            };
            let workspace = workspaces.for_job(None, &build.build_id, &job, attempt);
            tasks.spawn(agent::run_attempt(
                log.clone(),
                build.clone(),
                lease,
                workspace,
                cfg.scratch_dir.clone(),
                token,
                agent::AttemptOptions {
                    objects: cfg.objects.clone(),
                    container: cfg.container.clone(),
                    pipeline_file: cfg.pipeline_file.clone(),
                    usage: cfg.usage.clone(),
                    ..agent::AttemptOptions::default()
                },
            ));
        }
    }
}

/// Output of a git command in `dir`, or empty when it is not a repository.
fn git(dir: &Path, args: &[&str]) -> String {
    std::process::Command::new("git")
        .args(args)
        .current_dir(dir)
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Reads the pipeline file with an error that says what to do.
pub fn read_pipeline(file: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(file).with_context(|| {
        format!(
            "cannot read pipeline file {}: create it (`tributary init` writes a starter \
             one; docs/PIPELINES.md has the syntax) or pass another file with -f FILE",
            file.display()
        )
    })
}

/// A local run's secrets: each name the job lists, from the environment of `tributary run`.
fn local_secrets(names: &[String]) -> tributary_agent::JobSecrets {
    let mut secrets = tributary_agent::JobSecrets {
        from_env: true,
        ..tributary_agent::JobSecrets::default()
    };
    for name in names {
        match std::env::var(name) {
            Ok(value) => secrets.values.push((name.clone(), value)),
            Err(_) => secrets.missing.push(name.clone()),
        }
    }
    secrets
}
