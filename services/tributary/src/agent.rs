//! The in-process agent: runs one leased job attempt with the host executor and records it on
//! the log (JobStarted, the executor's step/line/log events, JobFinished).
//!
//! Events of one attempt are appended by one writer in order, so the log keeps them ordered.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tributary_eventlog::EventLog;
use tributary_executor::{JobContext, LogLimits};
use tributary_proto::events::{envelope::Payload, Envelope, JobFinished, JobPlan, JobStarted};

/// Who the events belong to.
#[derive(Clone, Debug)]
pub struct BuildRef {
    pub tenant: String,
    pub project: String,
    pub build_id: String,
}

impl BuildRef {
    pub fn envelope(&self, payload: Payload) -> Envelope {
        Envelope::new(&self.tenant, &self.project, &self.build_id, payload)
    }
}

/// Where a build's code comes from.
#[derive(Clone, Debug)]
pub struct Source {
    pub repository: String,
    pub commit: String,
}

/// Where jobs run.
#[derive(Clone)]
pub enum Workspaces {
    /// Every job in this directory (a local run: the pipeline's own directory).
    Fixed(PathBuf),
    /// Each job attempt in its own directory under `root`, with the build's commit checked out
    /// from a bare mirror (the server).
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
            Workspaces::Checkout { root, mirrors } => JobWorkspace {
                dir: root
                    .join(build)
                    .join(format!("{}-{attempt}", sanitize(job))),
                checkout: source.cloned().map(|s| (mirrors.clone(), s)),
            },
        }
    }
}

pub struct Lease {
    pub job: JobPlan,
    pub attempt: u32,
    pub agent_id: String,
    pub lease_id: String,
}

/// Runs the attempt to its end. Errors appending to the log are logged; the scheduler sees a
/// job without JobFinished as lost.
pub async fn run_attempt(
    log: Arc<dyn EventLog>,
    build: BuildRef,
    lease: Lease,
    workspace: JobWorkspace,
    scratch_dir: PathBuf,
    cancel: CancellationToken,
) {
    let span = tracing::info_span!(
        "job",
        build_id = %build.build_id,
        job_id = %lease.job.id,
        agent_id = %lease.agent_id,
        attempt = lease.attempt
    );
    async move {
        let started = Payload::JobStarted(JobStarted {
            job: lease.job.id.clone(),
            attempt: lease.attempt,
            agent_id: lease.agent_id.clone(),
            lease_id: lease.lease_id.clone(),
            executor: "host".into(),
        });
        // One writer appends every event of the attempt, in order: JobStarted, the executor's
        // events, JobFinished. Whatever queued up during an append goes into the next one.
        let (tx, rx) = mpsc::channel(1024);
        let writer = tokio::spawn(write_events(log.clone(), build.clone(), rx));
        let finish_tx = tx.clone();
        if tx.send(started).await.is_err() {
            tracing::error!("event writer stopped before the job started");
            return;
        }
        let job_id = lease.job.id.clone();
        let scratch = scratch_dir.join(format!("{}-{}-{}", build.build_id, sanitize(&job_id), lease.attempt));
        if let Err(e) = std::fs::create_dir_all(&scratch) {
            tracing::error!(error = %e, dir = %scratch.display(), "cannot create scratch directory");
        }
        let workdir = workspace.dir.clone();
        if let Some((mirrors, source)) = &workspace.checkout {
            if let Err(e) = mirrors.checkout(&source.repository, &source.commit, &workdir, false).await {
                let reason = format!("checkout of {} at {} failed: {e}", source.repository, source.commit);
                tracing::error!(%reason);
                let failed = Payload::JobFinished(JobFinished {
                    job: lease.job.id.clone(),
                    attempt: lease.attempt,
                    status: tributary_proto::events::Status::Failed as i32,
                    exit_code: -1,
                    duration_us: 0,
                    reason,
                });
                let _ = finish_tx.send(failed).await;
                drop((tx, finish_tx));
                let _ = writer.await;
                return;
            }
        }
        let ctx = JobContext {
            build_id: build.build_id.clone(),
            job: lease.job,
            attempt: lease.attempt,
            workdir,
            scratch_dir: scratch.clone(),
            extra_env: Vec::new(),
            limits: LogLimits::default(),
        };
        let outcome = tributary_executor::run_job(ctx, tx, cancel).await;
        let _ = std::fs::remove_dir_all(&scratch);
        let finished = Payload::JobFinished(JobFinished {
            job: job_id,
            attempt: lease.attempt,
            status: outcome.status as i32,
            exit_code: outcome.exit_code,
            duration_us: outcome.duration.as_micros() as u64,
            reason: outcome.reason,
        });
        if finish_tx.send(finished).await.is_err() {
            tracing::error!("event writer stopped before the job finished");
        }
        drop(finish_tx);
        if writer.await.is_err() {
            tracing::error!("event writer panicked");
        }
    }
    .instrument(span)
    .await
}

/// Appends the executor's events in batches, in order, until the executor drops its sender.
async fn write_events(log: Arc<dyn EventLog>, build: BuildRef, mut rx: mpsc::Receiver<Payload>) {
    let mut buf = Vec::with_capacity(256);
    while rx.recv_many(&mut buf, 256).await > 0 {
        let batch: Vec<Envelope> = buf.drain(..).map(|p| build.envelope(p)).collect();
        if let Err(e) = log.append(&batch).await {
            tracing::error!(error = %e, events = batch.len(), "cannot append job events");
        }
    }
}

/// A job id made safe for a directory name.
fn sanitize(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}
