//! `tributary run`: the local simulator. The same scheduler decisions, executor and events as
//! the server, with the log in the local data directory and one in-process agent.
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
    envelope::Payload, BuildCanceled, BuildFinished, BuildQueued, BuildTriggered, JobAssigned,
    JobPlan, PipelineRejected, Status,
};
use tributary_scheduler::{decide, Decision, SchedulerState};

use crate::agent::{self, BuildRef, Lease};

pub const LOCAL_AGENT: &str = "local";

/// What to run and where.
pub struct LocalRun {
    pub pipeline_file: PathBuf,
    pub pipeline_text: String,
    /// Directory the jobs run in (the pipeline file's directory).
    pub workdir: PathBuf,
    pub parallel: usize,
    pub scratch_dir: PathBuf,
}

/// Records the trigger, then either the rejection or the plan. Returns the build and, when
/// the pipeline is valid, the plan's jobs.
pub async fn trigger(
    log: &dyn EventLog,
    build: &BuildRef,
    run: &LocalRun,
) -> anyhow::Result<Result<Vec<JobPlan>, tributary_pipeline::PipelineError>> {
    let file = run.pipeline_file.display().to_string();
    let triggered = Payload::BuildTriggered(BuildTriggered {
        who: std::env::var("USER").unwrap_or_else(|_| "local".into()),
        source: "cli".into(),
        repository: run.workdir.display().to_string(),
        git_ref: git(&run.workdir, &["rev-parse", "--abbrev-ref", "HEAD"]),
        commit: git(&run.workdir, &["rev-parse", "HEAD"]),
        pipeline_path: file.clone(),
        pipeline_text: run.pipeline_text.clone(),
        number: 0,
    });
    match tributary_pipeline::load(&file, &run.pipeline_text) {
        Ok(plan) => {
            let jobs = plan.jobs.clone();
            let queued = Payload::BuildQueued(BuildQueued { plan: Some(plan) });
            log.append(&[build.envelope(triggered), build.envelope(queued)])
                .await?;
            Ok(Ok(jobs))
        }
        Err(err) => {
            let rejected = Payload::PipelineRejected(PipelineRejected {
                file: err.file.clone(),
                line: err.line,
                column: err.column,
                message: err.message.clone(),
            });
            let finished = Payload::BuildFinished(BuildFinished {
                status: Status::Failed as i32,
                duration_us: 0,
                reason: format!("invalid pipeline: {err}"),
            });
            log.append(&[
                build.envelope(triggered),
                build.envelope(rejected),
                build.envelope(finished),
            ])
            .await?;
            Ok(Err(err))
        }
    }
}

/// Drives one build to its end. `from` is the log offset to fold from (at or before the
/// build's trigger). `cancel` asks for a cancel (Ctrl-C).
pub async fn drive(
    log: Arc<dyn EventLog>,
    build: BuildRef,
    jobs: Vec<JobPlan>,
    from: u64,
    run: &LocalRun,
    cancel: CancellationToken,
) -> anyhow::Result<(Status, String)> {
    let plans: HashMap<String, JobPlan> = jobs.into_iter().map(|j| (j.id.clone(), j)).collect();
    let mut state = SchedulerState::default();
    let mut sub = log.subscribe(from);
    let mut awaiting: Option<u64> = None;
    let mut running: HashMap<(String, u32), CancellationToken> = HashMap::new();
    let mut tasks = tokio::task::JoinSet::new();
    let mut cancel_sent = false;
    loop {
        let records = tokio::select! {
            r = sub.next_batch() => r?,
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
                continue;
            }
            state.apply(record.offset, &env);
            match &env.payload {
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
        let free = run.parallel.max(1).saturating_sub(state.busy());
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
            };
            tasks.spawn(agent::run_attempt(
                log.clone(),
                build.clone(),
                lease,
                run.workdir.clone(),
                run.scratch_dir.clone(),
                token,
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
            "cannot read pipeline file {}: create it (see README.md, \"Pipeline syntax\") or \
             pass another file with -f FILE",
            file.display()
        )
    })
}
