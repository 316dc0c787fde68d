//! The event log: the single source of truth of Tributary.
//!
//! Every action is an [`Envelope`] appended to an [`EventLog`]. The log is split into
//! [`Partition`]s (see [`layout`]): all events of one build are in one partition, in append order.
//! Consumers read a partition from an offset, or subscribe to a set of partitions ("catch up,
//! then follow"), and keep their positions per consumer group.
//!
//! Backends:
//! * [`sqlite::SqliteLog`]: the embedded default, one SQLite file in WAL mode, one partition.
//! * [`kafka::KafkaLog`]: Apache Kafka through rdkafka, a topic for state events and one for log
//!   chunks, each with several partitions.
//!
//! Every backend passes the same conformance suite, [`conformance`]; [`bench`](mod@bench)
//! measures one.
//!
//! # Single-partition methods
//!
//! [`EventLog::read`], [`EventLog::end_offset`], [`EventLog::subscribe`], [`EventLog::commit`]
//! and [`EventLog::committed`] treat the log as one sequence of offsets. They work on a log with a
//! single partition (SQLite; Kafka configured with one partition and no separate logs topic) and
//! fail with [`LogError::MultiPartition`] otherwise: a consumer of a partitioned log says which
//! partitions it reads ([`EventLog::read_partition`], [`EventLog::subscribe_partitions`],
//! [`EventLog::commit_partitions`]).
//!
//! Invariants every backend keeps:
//! * Offsets are per partition, assigned at append, strictly increasing, starting at 0, and never
//!   reused. (Contiguous too, as long as no record was deleted by retention.)
//! * An append is durable when it returns. It is atomic (all of its events or none survive a
//!   crash) where [`Capabilities::atomic_append`] says so.
//! * Events with the same key (the build id) and [`Topic`] are read in the order they were
//!   appended.
//! * A subscription yields every record of its partitions from its start offsets exactly once,
//!   each partition in offset order, with no gap, whether the record was appended before or after
//!   the subscription began.
//! * Where [`Capabilities::dedupes_event_ids`]: appending an envelope whose `event_id` is already
//!   on the log stores nothing and returns the offset it already has. Elsewhere a retried append
//!   may store an event twice, and consumers skip the event ids they have applied.

use std::collections::BTreeMap;

use async_trait::async_trait;
use bytes::Bytes;
use prost::Message;
use tributary_proto::events::Envelope;

pub mod bench;
pub mod conformance;
pub mod group;
pub mod kafka;
pub mod layout;
pub mod runtime;
pub mod skipped;
pub mod sqlite;

pub use group::{GroupEvent, GroupSubscription};
pub use layout::{Layout, Partition, Topic};

/// Position of a record in (a partition of) the log.
pub type Offset = u64;

/// One stored event: its position, its partition key and its encoded [`Envelope`].
///
/// The payload stays encoded so a consumer can skip a malformed record (garbage bytes written
/// by a broken producer) with an error log instead of failing the whole read.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// Partition the record lives in (see [`Layout`]). The SQLite backend has a single
    /// partition, 0.
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
    /// A single-partition method was called on a log with several partitions.
    #[error(
        "`{method}` reads the log as one partition, but this log has {partitions} partitions: \
         use `{instead}` with the partitions to read (see `EventLog::layout`)"
    )]
    MultiPartition {
        method: &'static str,
        instead: &'static str,
        partitions: u32,
    },
    /// The Kafka client or broker failed.
    #[error("Kafka: {0}")]
    Kafka(String),
    /// The embedded log cannot write its file (disk full, I/O error): nothing of the failed
    /// append was stored, and the log carries on once the cause is fixed.
    #[error(
        "cannot write the event log {path}: {cause}; free space on that filesystem (or fix the \
         disk) and appends resume by themselves: nothing stored before is lost"
    )]
    Unwritable { path: String, cause: String },
}

/// What a backend guarantees beyond the invariants every backend keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// [`EventLog::append`] stores an `event_id` at most once: re-appending an event returns the
    /// offset it already has. Without it, a retried append may store an event again (at a new
    /// offset) and consumers must skip event ids they have already applied.
    pub dedupes_event_ids: bool,
    /// An append is all or nothing, even across partitions. Without it, a failed append may
    /// have stored some of its events; retrying it is safe only because consumers dedupe.
    pub atomic_append: bool,
}

/// The log trait every backend implements.
///
/// The partition-aware methods are the core. The single-partition ones have default
/// implementations over them for a log of one partition; see the [crate docs](crate).
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// The log's partitions: how many, and which carry log chunks.
    fn layout(&self) -> Layout {
        Layout::SINGLE
    }

    /// What this backend guarantees on append.
    fn capabilities(&self) -> Capabilities;

    /// Appends `events` durably, in order, each to partition
    /// [`layout().partition_of(event)`](Layout::partition_of). Returns the offset each got in its
    /// partition, in the same order.
    ///
    /// Where [`Capabilities::dedupes_event_ids`], idempotent: an envelope whose `event_id` is
    /// already on the log (or earlier in the same batch) is not stored again and its existing
    /// offset is returned, so a producer can simply retry a batch after an ambiguous failure
    /// (timeout, crash, cancelled call). Elsewhere retrying is still safe, but stores duplicates
    /// that consumers skip by event id.
    async fn append(&self, events: &[Envelope]) -> Result<Vec<Offset>, LogError>;

    /// Up to `max` records of `partition` with `offset >= from`, in offset order. Empty when
    /// `from` is at the end; an error if there is no such partition.
    async fn read_partition(
        &self,
        partition: Partition,
        from: Offset,
        max: usize,
    ) -> Result<Vec<Record>, LogError>;

    /// Up to `max` records of `topic` with partition key `key` and `offset >= from` (an offset
    /// of `layout().partition_for(topic, key)`), in offset order.
    async fn read_key_in(
        &self,
        topic: Topic,
        key: &str,
        from: Offset,
        max: usize,
    ) -> Result<Vec<Record>, LogError>;

    /// The offset the next record appended to each partition will get, indexed by partition.
    async fn end_offsets(&self) -> Result<Vec<Offset>, LogError>;

    /// Catch up on each `(partition, offset)` of `from`, then follow live appends to them.
    /// Partitions not listed are not read. An invalid partition makes `next_batch` fail.
    fn subscribe_partitions(&self, from: &[(Partition, Offset)]) -> Box<dyn Subscription>;

    /// Stores `positions` (for each partition listed, the offset of the next record to process)
    /// as consumer group `group`'s positions. Partitions not listed keep theirs.
    async fn commit_partitions(
        &self,
        group: &str,
        positions: &[(Partition, Offset)],
    ) -> Result<(), LogError>;

    /// The positions last committed for `group`, for the partitions that have one.
    async fn committed_partitions(
        &self,
        group: &str,
    ) -> Result<BTreeMap<Partition, Offset>, LogError>;

    /// Appends `data` verbatim (not necessarily a valid [`Envelope`]) under `key`, to the events
    /// topic, bypassing encoding and de-duplication; returns its offset in
    /// `layout().partition_for(Topic::Events, key)`. Only for tests of readers against malformed
    /// records: every backend must store such a record and hand it back like any other, so that
    /// readers can skip it after [`Record::decode`] fails. The default returns
    /// [`LogError::Unsupported`].
    async fn append_raw(&self, key: &str, data: Vec<u8>) -> Result<Offset, LogError> {
        let _ = (key, data);
        Err(LogError::Unsupported("append_raw"))
    }

    /// Whether the log's storage answers now, within `within`: for health endpoints, which
    /// report an outage (a Kafka broker down) while services wait for it to come back. The
    /// default (an embedded log) is always reachable.
    async fn probe(&self, within: std::time::Duration) -> Result<(), LogError> {
        let _ = within;
        Ok(())
    }

    /// Joins consumer group `group` as a new member reading `topics`: the group's members split
    /// the topics' partitions between them (see [`group`]). The default returns
    /// [`LogError::Unsupported`].
    async fn join_group(
        &self,
        group: &str,
        topics: &[Topic],
    ) -> Result<Box<dyn GroupSubscription>, LogError> {
        let _ = (group, topics);
        Err(LogError::Unsupported("join_group"))
    }

    // ---- Single-partition methods (see the crate docs) ----

    /// Up to `max` records with `offset >= from` of a single-partition log.
    async fn read(&self, from: Offset, max: usize) -> Result<Vec<Record>, LogError> {
        single(self.layout(), "read", "read_partition")?;
        self.read_partition(0, from, max).await
    }

    /// Up to `max` records with partition key `key` and `offset >= from`, in offset order, from
    /// the partition holding `key`'s state events (and, on a log without a separate logs topic,
    /// its log chunks): [`read_key_in(Topic::Events, ..)`](EventLog::read_key_in).
    async fn read_key(&self, key: &str, from: Offset, max: usize) -> Result<Vec<Record>, LogError> {
        self.read_key_in(Topic::Events, key, from, max).await
    }

    /// The offset the next appended record will get, on a single-partition log.
    async fn end_offset(&self) -> Result<Offset, LogError> {
        single(self.layout(), "end_offset", "end_offsets")?;
        let ends = self.end_offsets().await?;
        ends.first()
            .copied()
            .ok_or_else(|| LogError::Invalid("the log reported no partition".into()))
    }

    /// Catch up from `from`, then follow live appends, on a single-partition log. On another,
    /// the subscription's `next_batch` fails with [`LogError::MultiPartition`].
    fn subscribe(&self, from: Offset) -> Box<dyn Subscription> {
        match single(self.layout(), "subscribe", "subscribe_partitions") {
            Ok(()) => self.subscribe_partitions(&[(0, from)]),
            Err(error) => Box::new(FailedSubscription::new(error, &[(0, from)])),
        }
    }

    /// Stores `next` (the offset of the next record to process) as consumer group `group`'s
    /// position on a single-partition log.
    async fn commit(&self, group: &str, next: Offset) -> Result<(), LogError> {
        single(self.layout(), "commit", "commit_partitions")?;
        self.commit_partitions(group, &[(0, next)]).await
    }

    /// The position last committed for `group` on a single-partition log, if any.
    async fn committed(&self, group: &str) -> Result<Option<Offset>, LogError> {
        single(self.layout(), "committed", "committed_partitions")?;
        Ok(self.committed_partitions(group).await?.get(&0).copied())
    }
}

/// `Ok` if `layout` has one partition, else the [`LogError::MultiPartition`] of `method`.
fn single(layout: Layout, method: &'static str, instead: &'static str) -> Result<(), LogError> {
    match layout.partitions() {
        1 => Ok(()),
        partitions => Err(LogError::MultiPartition {
            method,
            instead,
            partitions,
        }),
    }
}

/// A live position in some partitions of the log: yields every record from its start, then waits
/// for new ones.
#[async_trait]
pub trait Subscription: Send {
    /// The next batch of records (never empty), waiting for new appends when caught up. Records
    /// of one partition come in offset order; a batch may hold records of several partitions.
    /// Returns [`LogError::Closed`] when the log is shut down.
    async fn next_batch(&mut self) -> Result<Vec<Record>, LogError>;

    /// The offset of the next record this subscription will yield from its first partition (its
    /// only one, for a subscription of a single-partition log).
    fn position(&self) -> Offset;

    /// For each partition of the subscription, the offset of the next record it will yield.
    fn positions(&self) -> Vec<(Partition, Offset)>;
}

/// A subscription that could not be made: every `next_batch` returns the error it was made with.
pub struct FailedSubscription {
    error: String,
    multi: Option<LogError>,
    positions: Vec<(Partition, Offset)>,
}

impl FailedSubscription {
    pub fn new(error: LogError, positions: &[(Partition, Offset)]) -> Self {
        FailedSubscription {
            error: error.to_string(),
            multi: match error {
                e @ LogError::MultiPartition { .. } => Some(e),
                _ => None,
            },
            positions: positions.to_vec(),
        }
    }
}

#[async_trait]
impl Subscription for FailedSubscription {
    async fn next_batch(&mut self) -> Result<Vec<Record>, LogError> {
        Err(match &self.multi {
            Some(LogError::MultiPartition {
                method,
                instead,
                partitions,
            }) => LogError::MultiPartition {
                method,
                instead,
                partitions: *partitions,
            },
            _ => LogError::Invalid(self.error.clone()),
        })
    }

    fn position(&self) -> Offset {
        self.positions.first().map_or(0, |(_, offset)| *offset)
    }

    fn positions(&self) -> Vec<(Partition, Offset)> {
        self.positions.clone()
    }
}
