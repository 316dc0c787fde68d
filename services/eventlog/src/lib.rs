//! The event log: the single source of truth of Tributary.
//!
//! Every action is an [`Envelope`] appended to an [`EventLog`]. Consumers read it from an
//! offset or [`EventLog::subscribe`] to it ("catch up, then follow"), and keep their position
//! per consumer group with [`EventLog::commit`].
//!
//! Backends:
//! * [`sqlite::SqliteLog`]: the embedded default, one SQLite file in WAL mode.
//!
//! Every backend passes the same conformance suite, [`conformance`]; [`bench`](mod@bench) measures one.
//!
//! Invariants every backend keeps:
//! * Offsets are assigned at append, strictly increasing, starting at 0, and never reused.
//! * An append is atomic and durable when it returns: all of its events or none survive a crash.
//! * Events with the same key (the build id) are read in the order they were appended.
//! * A subscription yields every record from its start offset exactly once, in offset order,
//!   with no gap, whether the record was appended before or after the subscription began.
//! * Appending an envelope whose `event_id` is already on the log stores nothing and returns
//!   the offset it already has.

use async_trait::async_trait;
use bytes::Bytes;
use prost::Message;
use tributary_proto::events::Envelope;

pub mod bench;
pub mod conformance;
pub mod sqlite;

/// Position of a record in (a partition of) the log.
pub type Offset = u64;

/// One stored event: its position, its partition key and its encoded [`Envelope`].
///
/// The payload stays encoded so a consumer can skip a malformed record (garbage bytes written
/// by a broken producer) with an error log instead of failing the whole read.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// Partition the record lives in. The SQLite backend has a single partition, 0.
    pub partition: u32,
    pub offset: Offset,
    /// Partition key: the build id for build events.
    pub key: String,
    /// The protobuf-encoded [`Envelope`].
    pub data: Bytes,
}

impl Record {
    /// Decodes the envelope. An error means the record is malformed; callers log and skip it.
    pub fn decode(&self) -> Result<Envelope, prost::DecodeError> {
        Envelope::decode(self.data.as_ref())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("event log storage error: {0}")]
    Storage(#[from] sqlx::Error),
    #[error("event log I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("event log is closed")]
    Closed,
    #[error("{0}")]
    Invalid(String),
    /// The backend does not implement this operation.
    #[error("not supported by this event log backend: {0}")]
    Unsupported(&'static str),
}

/// The log trait every backend implements.
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Appends `events` atomically and durably, in order, each under its
    /// [`Envelope::partition_key`]. Returns their offsets, in the same order.
    ///
    /// Idempotent: an envelope whose `event_id` is already on the log (or earlier in the same
    /// batch) is not stored again and its existing offset is returned, so a producer can simply
    /// retry a batch after an ambiguous failure (timeout, crash, cancelled call).
    async fn append(&self, events: &[Envelope]) -> Result<Vec<Offset>, LogError>;

    /// Up to `max` records with `offset >= from`, in offset order. Empty when `from` is at the
    /// end.
    async fn read(&self, from: Offset, max: usize) -> Result<Vec<Record>, LogError>;

    /// Up to `max` records with partition key `key` and `offset >= from`, in offset order.
    async fn read_key(&self, key: &str, from: Offset, max: usize) -> Result<Vec<Record>, LogError>;

    /// The offset the next appended record will get (the number of records ever appended).
    async fn end_offset(&self) -> Result<Offset, LogError>;

    /// Catch up from `from`, then follow live appends.
    fn subscribe(&self, from: Offset) -> Box<dyn Subscription>;

    /// Stores `next` (the offset of the next record to process) as consumer group `group`'s
    /// position.
    async fn commit(&self, group: &str, next: Offset) -> Result<(), LogError>;

    /// The position last committed for `group`, if any.
    async fn committed(&self, group: &str) -> Result<Option<Offset>, LogError>;

    /// Appends `data` verbatim (not necessarily a valid [`Envelope`]) under `key`, bypassing
    /// encoding and de-duplication. Only for tests of readers against malformed records: every
    /// backend must store such a record and hand it back like any other, so that readers can
    /// skip it after [`Record::decode`] fails. The default returns [`LogError::Unsupported`].
    async fn append_raw(&self, key: &str, data: Vec<u8>) -> Result<Offset, LogError> {
        let _ = (key, data);
        Err(LogError::Unsupported("append_raw"))
    }
}

/// A live position in the log: yields every record from its start, then waits for new ones.
#[async_trait]
pub trait Subscription: Send {
    /// The next batch of records (never empty), waiting for new appends when caught up.
    /// Returns [`LogError::Closed`] when the log is shut down.
    async fn next_batch(&mut self) -> Result<Vec<Record>, LogError>;

    /// The offset of the next record this subscription will yield.
    fn position(&self) -> Offset;
}
