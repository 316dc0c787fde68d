//! The Tributary agent.
//!
//! * [`run_attempt`]: runs one leased job attempt — checkout of the build's commit (server
//!   workspaces), JobStarted, the executor's events, JobFinished — and sends every event, in
//!   order, to an [`EventSink`]. [`LogSink`] appends to an event log (the in-process agent of
//!   `tributary run` and `tributary up`); [`ApiSink`] sends to the server with
//!   `Agents.SendEvents` (a remote agent).
//! * [`run`] / [`run_until`]: the remote agent runtime behind `tributary agent`. It registers
//!   once with an enrollment token (the identity is kept in `WORKDIR/agent.json`), opens the
//!   `PullWork` stream, runs each pushed lease in `WORKDIR/work/<build>/<job>-<attempt>`,
//!   heartbeats every 2 s (running leases, draining flag; the server answers with leases to
//!   cancel), reconnects with backoff when the server goes away, and drains on shutdown (no
//!   new leases, running jobs finish, then the work stream is closed).
//!
//! Delivery of an attempt's events: a batch that cannot be delivered for now (server away) is
//! sent again, unchanged, after a backoff — the log drops events whose id it already has, so
//! re-sending is safe; a refusal because the lease is not current any more (the job was
//! requeued elsewhere) stops the job and drops its remaining events. See [`SinkError`].

mod artifacts;
mod attempt;
mod backoff;
mod caches;
mod client;
mod identity;
pub mod kept;
pub mod recreate;
mod runtime;
mod sink;

pub use attempt::{
    run_attempt, sanitize, AttemptOptions, AttemptReport, BuildRef, JobSecrets, JobWorkspace,
    Lease, Source, UsageMeter, Workspaces,
};
pub use backoff::{Backoff, BackoffPolicy};
pub use client::{agents, channel, AgentsApi, BearerAuth};
pub use identity::{identity_path, Identity, IDENTITY_FILE};
pub use runtime::{
    default_machine_class, identify, run, run_as, run_until, AgentConfig, ContainerSettings,
};
pub use sink::{classify, ApiSink, EventSink, LogSink, SinkError, MAX_REQUEST_BYTES};
pub use tributary_executor::container::{ContainerLimits, ContainerRuntime, Engine};

/// Why the agent runtime stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Bad configuration or a broken identity file; the message says what to do.
    #[error("{0}")]
    Config(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The server refused the agent's credentials or does not serve agents.
    #[error("{0}")]
    Rejected(String),
    /// Stopped at once (a hard stop) with jobs still running; they were canceled.
    #[error("stopped at once; {0} running job(s) were canceled")]
    Aborted(usize),
}

impl AgentError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        AgentError::Io {
            context: context.into(),
            source,
        }
    }
}
