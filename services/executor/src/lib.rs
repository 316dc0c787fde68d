//! Runs a job's lines in one shell session, emitting per-line events and batched log chunks.
//!
//! [`run_job`] runs the steps of a [`JobPlan`] on the host, in order. Each step is one fresh `sh`
//! process running a generated wrapper script, so `cd`, variables and functions carry over from
//! line to line of a step but not between steps. The wrapper prints a start and an exit marker
//! around every line on both stdout and stderr (see [`marker`]); the executor merges the two pipes
//! into the events StepStarted, LineStarted, LogChunk, LineExited and StepFinished, always in the
//! order LineStarted(i), chunks of i, LineExited(i), LineStarted(i+1).
//!
//! A step stops at its first failing line; a job stops at its first failing step. Background
//! processes a step leaves behind are killed when the step ends.
//!
//! A job with an `image` runs in a container of that image instead ([`container`]): the same
//! wrapper scripts, markers and events, one `exec` per step; [`JobContext::container`] says
//! which engine and limits to use.
//!
//! A job with `image: {build: ...}` first runs its image step (`steps[0]`, see [`image`]):
//! the image of its context's key is found on the engine or built there, then the job's own
//! steps run in a container of it.

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tributary_proto::events::envelope::Payload;
use tributary_proto::events::{JobPlan, Status};

pub mod container;
pub mod image;
mod image_step;
pub mod marker;
pub mod mask;
mod process;
mod script;
mod sink;
mod step;

/// Everything needed to run one attempt of one job.
#[derive(Debug, Clone)]
pub struct JobContext {
    pub build_id: String,
    pub job: JobPlan,
    /// 1-based attempt number.
    pub attempt: u32,
    /// Working directory the lines run in.
    pub workdir: PathBuf,
    /// A private directory for the generated wrapper scripts (never inside workdir). Created if
    /// missing.
    pub scratch_dir: PathBuf,
    /// Extra environment (after the job's env): e.g. TRIBUTARY_* vars from the caller.
    pub extra_env: Vec<(String, String)>,
    pub limits: LogLimits,
    /// How to run a job with an `image`; `None`: this agent cannot, and such a job fails with
    /// a reason saying so.
    pub container: Option<container::ContainerRuntime>,
    /// Printed (STREAM_SYSTEM) at the very start of the job's log, before its first step: e.g.
    /// how to recreate the job locally. Empty = nothing.
    pub preamble: String,
    /// Printed (STREAM_SYSTEM) at the end of the log when the job failed or timed out: e.g.
    /// where its workspace is kept. Empty = nothing.
    pub failure_note: String,
    /// Values masked as `***` in every `LogChunk` and in the outcome's reason (the job's
    /// secrets; see [`mask`]). Empty = nothing masked.
    pub secrets: std::sync::Arc<mask::Secrets>,
    /// For a job with `image: {build: ...}`: whose image it is and its build context, as read
    /// from the workspace before anything else was put there. `None` for other jobs.
    pub image: Option<JobImage>,
}

/// The image a job builds: the tenant and project its tag and labels name, and the build
/// context the agent read from the job's workspace (or why it could not).
#[derive(Debug, Clone)]
pub struct JobImage {
    pub tenant: String,
    pub project: String,
    pub context: Result<std::sync::Arc<image::context::BuildContext>, String>,
}

/// How output is batched into `LogChunk`s and how much of it a job may produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLimits {
    /// Buffered output is sent at most once per interval: at once when the previous chunk went
    /// out longer ago than this (sparse lines reach tails without delay), otherwise this long
    /// after the previous chunk (dense output is batched).
    pub flush_interval: Duration,
    /// Largest `LogChunk.data`; a full buffer is sent at once.
    pub flush_bytes: usize,
    /// Output (stdout + stderr) forwarded per job attempt; the rest is dropped, and one
    /// STREAM_SYSTEM chunk with `truncated = true` says so.
    pub max_job_log_bytes: u64,
}

impl Default for LogLimits {
    fn default() -> Self {
        LogLimits {
            flush_interval: Duration::from_millis(20),
            flush_bytes: 64 * 1024,
            max_job_log_bytes: 100 * 1024 * 1024,
        }
    }
}

/// How a job attempt ended. The caller turns it into JobFinished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobOutcome {
    /// SUCCEEDED, FAILED, CANCELED or TIMED_OUT.
    pub status: Status,
    /// Exit code of the failing (or killed) line; 0 on success; -1 when no process exit code.
    pub exit_code: i32,
    /// Empty on success, else e.g. `line 2 of step "test" exited with 3: false`.
    pub reason: String,
    pub duration: Duration,
}

/// Runs every step of ctx.job. Sends StepStarted, LineStarted, LogChunk, LineExited, StepFinished
/// payloads, in order, on `events`.
/// Does NOT send JobStarted/JobFinished: the caller does, from the returned outcome.
///
/// `job.timeout_secs > 0` bounds the whole job. On timeout or when `cancel` fires, the running
/// step's process group gets SIGTERM, then SIGKILL 500 ms later. The caller must keep receiving
/// `events`: a full channel holds the job up.
pub async fn run_job(
    ctx: JobContext,
    events: mpsc::Sender<Payload>,
    cancel: CancellationToken,
) -> JobOutcome {
    let span = tracing::info_span!(
        "job",
        build_id = %ctx.build_id,
        job_id = %ctx.job.id,
        attempt = ctx.attempt
    );
    run_job_inner(ctx, events, cancel).instrument(span).await
}

async fn run_job_inner(
    ctx: JobContext,
    events: mpsc::Sender<Payload>,
    cancel: CancellationToken,
) -> JobOutcome {
    let started = Instant::now();
    let timeout = ctx.job.timeout_secs;
    let deadline = if timeout > 0 {
        started.checked_add(Duration::from_secs(timeout))
    } else {
        None
    };
    let nonce = format!("{:032x}", rand::random::<u128>());
    let env = job_env(&ctx);
    let mut sink = sink::Sink::new(
        events,
        ctx.job.id.clone(),
        ctx.attempt,
        ctx.limits,
        ctx.secrets.clone(),
    );
    if !ctx.preamble.is_empty() {
        sink.system_text(0, &ctx.preamble).await;
    }
    // A job that builds its image: step 0 builds (or finds) it, the job's steps follow.
    let built = match &ctx.job.image_build {
        None => None,
        Some(_) => match image_step::run(&ctx, &mut sink, deadline, &cancel).await {
            Ok(tag) => Some(tag),
            Err(failed) => {
                tracing::info!(reason = %failed.reason, "the job's image step failed");
                if !ctx.failure_note.is_empty() && failed.status != Status::Canceled {
                    sink.system_text(0, &ctx.failure_note).await;
                }
                return JobOutcome {
                    status: failed.status,
                    exit_code: failed.exit_code,
                    reason: ctx.secrets.mask_str(&failed.reason),
                    duration: started.elapsed(),
                };
            }
        },
    };
    let first_step = usize::from(built.is_some());
    let container = match start_container(&ctx, built.as_deref()).await {
        Ok(container) => container,
        Err(reason) => {
            tracing::error!(%reason, "job failed before its first step");
            sink.system(0, &reason).await;
            if !ctx.failure_note.is_empty() {
                sink.system_text(0, &ctx.failure_note).await;
            }
            return JobOutcome {
                status: Status::Failed,
                exit_code: -1,
                reason: ctx.secrets.mask_str(&reason),
                duration: started.elapsed(),
            };
        }
    };
    let runner = match &container {
        Some(c) => step::Runner::Container(c),
        None => step::Runner::Host,
    };
    let step_env = step::StepEnv {
        nonce: &nonce,
        runner,
        workdir: &ctx.workdir,
        scratch_dir: &ctx.scratch_dir,
        env: &env,
        deadline,
        cancel: &cancel,
    };
    let mut outcome = run_steps(&ctx, &mut sink, &step_env, &cancel, started, first_step).await;
    outcome.reason = ctx.secrets.mask_str(&outcome.reason);
    if !ctx.failure_note.is_empty() && matches!(outcome.status, Status::Failed | Status::TimedOut) {
        sink.system_text(sink.last_line, &ctx.failure_note).await;
    }
    if let Some(container) = container {
        container.remove().await;
    }
    outcome
}

/// The job's container, when it names an image (or `built` one). Errors are reasons for
/// JobFinished.
async fn start_container(
    ctx: &JobContext,
    built: Option<&str>,
) -> Result<Option<container::JobContainer>, String> {
    let image = built.unwrap_or(ctx.job.image.trim());
    if image.is_empty() {
        return Ok(None);
    }
    let Some(runtime) = &ctx.container else {
        return Err(format!(
            "job {} runs in a container (image {image}) but this agent has no container engine; \
             run it on an agent started with --engine, or remove `image` to run on the host",
            ctx.job.id
        ));
    };
    let who = container::Ownership {
        owner: &runtime.owner,
        build_id: &ctx.build_id,
        job_id: &ctx.job.id,
        attempt: ctx.attempt,
    };
    if let Err(e) = std::fs::create_dir_all(&ctx.scratch_dir) {
        return Err(format!(
            "cannot create the scripts directory {}: {e}",
            ctx.scratch_dir.display()
        ));
    }
    container::JobContainer::start(
        runtime,
        image,
        &ctx.workdir,
        &ctx.scratch_dir,
        ctx.job.network,
        &who,
    )
    .await
    .map(Some)
}

async fn run_steps(
    ctx: &JobContext,
    sink: &mut sink::Sink,
    step_env: &step::StepEnv<'_>,
    cancel: &CancellationToken,
    started: Instant,
    first_step: usize,
) -> JobOutcome {
    let timeout = ctx.job.timeout_secs;
    let deadline = step_env.deadline;
    let timed_out = || format!("timed out after {timeout}s");
    let outcome = |status, exit_code, reason| JobOutcome {
        status,
        exit_code,
        reason,
        duration: started.elapsed(),
    };
    tracing::info!(steps = ctx.job.steps.len(), "job started");

    for (index, plan) in ctx.job.steps.iter().enumerate().skip(first_step) {
        if cancel.is_cancelled() {
            tracing::info!("job canceled");
            return outcome(Status::Canceled, -1, "canceled".to_owned());
        }
        if deadline.is_some_and(|d| d <= Instant::now()) {
            tracing::info!("job timed out");
            return outcome(Status::TimedOut, -1, timed_out());
        }
        let index = u32::try_from(index).unwrap_or(u32::MAX);
        let result = step::run_step(sink, step_env, index, plan)
            .instrument(tracing::info_span!("step", step = index, name = %plan.name))
            .await;
        match result.status {
            Status::Succeeded => {}
            Status::Canceled => {
                tracing::info!("job canceled");
                return outcome(Status::Canceled, result.exit_code, "canceled".to_owned());
            }
            Status::TimedOut => {
                tracing::info!("job timed out");
                return outcome(Status::TimedOut, result.exit_code, timed_out());
            }
            status => {
                tracing::info!(reason = %result.reason, "job failed");
                return outcome(status, result.exit_code, result.reason);
            }
        }
    }
    tracing::info!("job succeeded");
    outcome(Status::Succeeded, 0, String::new())
}

/// The variables set on top of the inherited environment, in order (later wins).
fn job_env(ctx: &JobContext) -> Vec<(String, String)> {
    let mut env = vec![
        ("CI".to_owned(), "true".to_owned()),
        ("TRIBUTARY".to_owned(), "true".to_owned()),
        ("TRIBUTARY_BUILD_ID".to_owned(), ctx.build_id.clone()),
        ("TRIBUTARY_JOB".to_owned(), ctx.job.id.clone()),
        ("TRIBUTARY_ATTEMPT".to_owned(), ctx.attempt.to_string()),
    ];
    env.extend(
        ctx.job
            .env
            .iter()
            .map(|v| (v.name.clone(), v.value.clone())),
    );
    env.extend(ctx.extra_env.iter().cloned());
    env
}
