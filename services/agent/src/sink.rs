//! Where the events of a job attempt go: an [`EventSink`].
//!
//! * [`LogSink`] appends to an [`EventLog`] directly: the in-process agent of `tributary run` and
//!   of the embedded server.
//! * [`ApiSink`] sends them to the server with `Agents.SendEvents` under the attempt's lease: a
//!   remote agent.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use prost::Message;
use tonic::Code;
use tributary_eventlog::EventLog;
use tributary_proto::api::SendEventsRequest;
use tributary_proto::events::Envelope;

use crate::client::AgentsApi;

/// Why a batch was not delivered. The attempt runner decides from the kind what happens next.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    /// The destination cannot be reached right now (transport error, server restarting,
    /// timeout). The same batch is sent again after a backoff: the log drops events whose id it
    /// already has, so a batch that did arrive is not stored twice.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The lease is not this agent's any more (the job was requeued elsewhere, or the agent was
    /// revoked): the attempt is stopped and its remaining events are dropped.
    #[error("lease no longer held: {0}")]
    Fenced(String),
    /// Anything else: the batch is dropped, later events are still sent.
    #[error("{0}")]
    Failed(String),
    /// The log cannot store anything now (the embedded log's disk is full): the attempt is
    /// stopped, its remaining events are dropped, and the reason is reported to whoever runs it
    /// (`tributary run` exits with it).
    #[error("{0}")]
    Unwritable(String),
}

/// Receives the events of one job attempt, in order, batch after batch. A batch is only sent
/// after the previous one succeeded (or was given up).
#[async_trait]
pub trait EventSink: Send + Sync + 'static {
    async fn send(&self, batch: Vec<Envelope>) -> Result<(), SinkError>;
}

/// Appends batches to an event log. Append errors are [`SinkError::Failed`]: the batch is not
/// retried (a job without JobFinished is seen as lost by the scheduler); a log that cannot be
/// written at all is [`SinkError::Unwritable`].
#[derive(Clone)]
pub struct LogSink {
    log: Arc<dyn EventLog>,
}

impl LogSink {
    pub fn new(log: Arc<dyn EventLog>) -> Self {
        LogSink { log }
    }
}

#[async_trait]
impl EventSink for LogSink {
    async fn send(&self, batch: Vec<Envelope>) -> Result<(), SinkError> {
        self.log
            .append(&batch)
            .await
            .map(|_| ())
            .map_err(|e| match e {
                tributary_eventlog::LogError::Unwritable { .. } => {
                    SinkError::Unwritable(e.to_string())
                }
                e => SinkError::Failed(format!("cannot append to the log: {e}")),
            })
    }
}

/// Largest `SendEvents` request the sink builds (the server accepts 4 MiB by default); a larger
/// batch goes out as several requests, in order.
pub const MAX_REQUEST_BYTES: usize = 2 * 1024 * 1024;

/// How long one `SendEvents` call may take before it counts as unavailable.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// Sends batches with `Agents.SendEvents` under one lease.
#[derive(Clone)]
pub struct ApiSink {
    client: AgentsApi,
    lease_id: String,
}

impl ApiSink {
    pub fn new(client: AgentsApi, lease_id: impl Into<String>) -> Self {
        ApiSink {
            client,
            lease_id: lease_id.into(),
        }
    }
}

#[async_trait]
impl EventSink for ApiSink {
    async fn send(&self, batch: Vec<Envelope>) -> Result<(), SinkError> {
        for events in split_by_size(batch, MAX_REQUEST_BYTES) {
            let mut client = self.client.clone();
            let mut request = tonic::Request::new(SendEventsRequest {
                lease_id: self.lease_id.clone(),
                events,
            });
            request.set_timeout(SEND_TIMEOUT);
            match tokio::time::timeout(SEND_TIMEOUT, client.send_events(request)).await {
                Ok(Ok(_)) => {}
                Ok(Err(status)) => return Err(classify(&status)),
                Err(_) => {
                    return Err(SinkError::Unavailable(format!(
                        "SendEvents timed out after {SEND_TIMEOUT:?}"
                    )))
                }
            }
        }
        Ok(())
    }
}

/// What a gRPC error means for a batch of events.
///
/// * Transient (re-send): UNAVAILABLE (transport errors, server restarting or overloaded),
///   DEADLINE_EXCEEDED, ABORTED, CANCELLED, RESOURCE_EXHAUSTED, UNKNOWN (a connection reset
///   mid-call), INTERNAL (e.g. the server could not append; its log may come back).
/// * Fenced (stop the job): FAILED_PRECONDITION (the lease is not current), NOT_FOUND (no such
///   lease), PERMISSION_DENIED and UNAUTHENTICATED (the agent was revoked).
/// * Anything else (INVALID_ARGUMENT, UNIMPLEMENTED, ...): the batch is dropped.
pub fn classify(status: &tonic::Status) -> SinkError {
    let message = format!("{} ({:?})", status.message(), status.code());
    match status.code() {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::Cancelled
        | Code::ResourceExhausted
        | Code::Unknown
        | Code::Internal => SinkError::Unavailable(message),
        Code::FailedPrecondition
        | Code::NotFound
        | Code::PermissionDenied
        | Code::Unauthenticated => SinkError::Fenced(message),
        _ => SinkError::Failed(message),
    }
}

/// Splits `batch`, in order, into runs whose encoded size stays under `max_bytes` (a single
/// larger envelope goes alone).
pub(crate) fn split_by_size(batch: Vec<Envelope>, max_bytes: usize) -> Vec<Vec<Envelope>> {
    let mut out: Vec<Vec<Envelope>> = Vec::new();
    let mut current = Vec::new();
    let mut size = 0;
    for env in batch {
        // Field tag + length prefix of the repeated message: at most 1 + 10 bytes.
        let len = env.encoded_len() + 11;
        if !current.is_empty() && size + len > max_bytes {
            out.push(std::mem::take(&mut current));
            size = 0;
        }
        size += len;
        current.push(env);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tributary_proto::events::{envelope::Payload, LogChunk};

    fn chunk(bytes: usize) -> Envelope {
        Envelope::new(
            "t",
            "p",
            "b",
            Payload::LogChunk(LogChunk {
                data: vec![b'x'; bytes],
                ..Default::default()
            }),
        )
    }

    #[test]
    fn classification_of_grpc_errors() {
        use tonic::Status;
        for s in [
            Status::unavailable("tcp connect error"),
            Status::deadline_exceeded("slow"),
            Status::unknown("h2 protocol error"),
            Status::cancelled("reset"),
            Status::internal("cannot append"),
            Status::resource_exhausted("busy"),
            Status::aborted("conflict"),
        ] {
            assert!(
                matches!(classify(&s), SinkError::Unavailable(_)),
                "{s:?} must be retried"
            );
        }
        for s in [
            Status::failed_precondition("lease is not current"),
            Status::not_found("no such lease"),
            Status::unauthenticated("revoked"),
            Status::permission_denied("not yours"),
        ] {
            assert!(
                matches!(classify(&s), SinkError::Fenced(_)),
                "{s:?} must stop the job"
            );
        }
        for s in [
            Status::invalid_argument("agents may not send build_finished"),
            Status::unimplemented("no Agents service"),
        ] {
            assert!(
                matches!(classify(&s), SinkError::Failed(_)),
                "{s:?} must drop the batch"
            );
        }
        let SinkError::Fenced(m) = classify(&Status::failed_precondition("lease L1 is gone"))
        else {
            unreachable!()
        };
        assert!(m.contains("lease L1 is gone") && m.contains("FailedPrecondition"));
    }

    #[test]
    fn split_keeps_order_and_bounds_requests() {
        let batch: Vec<Envelope> = (0..50).map(|_| chunk(100_000)).collect();
        let ids: Vec<String> = batch.iter().map(|e| e.event_id.clone()).collect();
        let parts = split_by_size(batch, MAX_REQUEST_BYTES);
        assert!(parts.len() > 1);
        for part in &parts {
            let size: usize = part.iter().map(|e| e.encoded_len() + 11).sum();
            assert!(size <= MAX_REQUEST_BYTES, "{size}");
            assert!(!part.is_empty());
        }
        let joined: Vec<String> = parts.into_iter().flatten().map(|e| e.event_id).collect();
        assert_eq!(joined, ids);
    }

    #[test]
    fn split_sends_an_oversized_event_alone() {
        let parts = split_by_size(vec![chunk(10), chunk(5000), chunk(10)], 1000);
        let lens: Vec<usize> = parts.iter().map(Vec::len).collect();
        assert_eq!(lens, vec![1, 1, 1]);
        assert!(split_by_size(Vec::new(), 1000).is_empty());
        assert_eq!(split_by_size(vec![chunk(1), chunk(1)], 1000).len(), 1);
    }
}
