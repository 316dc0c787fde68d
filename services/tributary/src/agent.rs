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
    workdir: PathBuf,
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
