//! The projector: feeds log records to the builds fold and persists the result.
//!
//! Exactly-once effect: the rows a batch changes and the next offset of each partition it read
//! are committed in one transaction; on restart (or when a partition is assigned to it) the
//! projector resumes from the stored offsets. A batch that fails to commit is forgotten (the
//! cache is dropped) and re-applied from the log.
//!
//! One code path for every log: the projector is a member of consumer group [`GROUP`]
//! ([`BuildsProjector::run`]). On the embedded SQLite log it is the group's only member and owns
//! partition 0; on Kafka the members split the events topic's partitions. Every event changes
//! only its build, and a build's state events are in one partition, so partitions fold
//! independently.
//!
//! Both are folds driven by the consumer runtime ([`Consumer`]): it owns the partitions
//! (group membership), reads them, skips undecodable records and re-delivered event ids, and
//! hands each batch's positions to the fold's commit.
//!
//! Re-deliveries: Kafka may store a retried append twice. The runtime skips an event id it has
//! seen in this process; across a restart, the projector also skips an event whose id is among
//! the last [`RECENT_IDS`] it applied to that build (kept with the build's rows, in the same
//! transaction), so a duplicate is applied once.
//!
//! Log chunks in a separate logs topic (Kafka) are not folded into builds (their order relative
//! to the build's state events is not kept): [`ChunkCounter`]s, members of group
//! [`LOGS_GROUP`] on the logs topic, add their bytes to per-line counters
//! ([`crate::chunks`]), which the store overlays on the build when it is read. On a log without
//! a logs topic (SQLite, or Kafka with `log_partitions` 0) chunks are in the build's partition
//! and the fold counts them itself.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;

use tributary_eventlog::runtime::{Consumer, Fold, Interest, Position};
use tributary_eventlog::{EventLog, Layout, Offset, Partition, Record, Topic};
use tributary_proto::events::{envelope::Payload, Envelope};

use crate::builds::{touches, BuildsState, Touch};
use crate::chunks::{self, ChunkCounts};
use crate::store::{Advance, BuildsStore, EventIds};
use crate::ProjectionError;

/// The consumer group of builds projectors.
pub const GROUP: &str = "projector";

/// The consumer group of the chunk counters (the logs topic).
pub const LOGS_GROUP: &str = "projector-logs";

/// Event ids remembered per build to skip re-deliveries.
pub const RECENT_IDS: usize = 512;

/// `LogChunk`'s payload field number (events.proto): all a chunk counter reads.
const LOG_CHUNK: u32 = 18;

/// Projects the log into the builds read model.
pub struct BuildsProjector {
    consumer: Consumer<BuildsFold>,
}

/// The builds fold with its store, as the runtime drives it.
pub struct BuildsFold {
    store: BuildsStore,
    layout: Layout,
    /// Builds that may still change (not finished), as loaded or folded so far.
    cache: BuildsState,
    /// Recent event ids of the cached builds.
    recent: EventIds,
    /// What the batch being applied changed.
    touched: BTreeMap<(String, Touch), ()>,
    /// Re-deliveries found by the stored ids (after a restart).
    duplicates: u64,
}

impl BuildsProjector {
    pub async fn open(store: BuildsStore) -> Result<Self, ProjectionError> {
        let positions = store.next_offsets().await?;
        let mut consumer = Consumer::new(BuildsFold {
            store,
            layout: Layout::SINGLE,
            cache: BuildsState::default(),
            recent: EventIds::new(),
            touched: BTreeMap::new(),
            duplicates: 0,
        });
        let positions: Vec<(Partition, Offset)> = positions.into_iter().collect();
        consumer.set_positions(&positions);
        Ok(BuildsProjector { consumer })
    }

    /// The next offset of partition 0 this projector will apply (single-partition logs).
    pub fn next_offset(&self) -> u64 {
        self.consumer.position(0)
    }

    /// The next offset to apply of each partition the projector has read.
    pub fn positions(&self) -> &BTreeMap<Partition, u64> {
        self.consumer.positions()
    }

    /// The positions applied, as they move (read-your-writes of an in-process projector).
    pub fn applied(&self) -> tokio::sync::watch::Receiver<tributary_eventlog::runtime::Applied> {
        self.consumer.applied()
    }

    pub fn store(&self) -> &BuildsStore {
        &self.consumer.fold().store
    }

    /// Records skipped: undecodable, or of an unknown event type (also counted per process in
    /// `tributary_eventlog::skipped`).
    pub fn malformed(&self) -> u64 {
        self.consumer.skipped().malformed
    }

    /// Re-delivered events (an event id already applied to its build) that were skipped.
    pub fn duplicates(&self) -> u64 {
        self.consumer.skipped().duplicates + self.consumer.fold().duplicates
    }

    /// Applies every record up to the current end of the log (every events partition), then
    /// returns the new position of partition 0.
    pub async fn catch_up(&mut self, log: &dyn EventLog) -> Result<u64, ProjectionError> {
        self.consumer.fold_mut().layout = log.layout();
        self.consumer
            .catch_up(log, log.layout().topic_partitions(Topic::Events))
            .await?;
        Ok(self.next_offset())
    }

    /// Follows the log as a member of group [`GROUP`] until the log closes or an error.
    pub async fn follow(&mut self, log: &dyn EventLog) -> Result<(), ProjectionError> {
        self.run(log, std::future::pending()).await
    }

    /// Runs as a member of group [`GROUP`] on the events topic until `shutdown` resolves (then
    /// it commits and leaves the group, so its partitions go to the other members at once), the
    /// log closes, or an error.
    pub async fn run(
        &mut self,
        log: &dyn EventLog,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ProjectionError> {
        self.consumer.fold_mut().layout = log.layout();
        self.consumer
            .run_group(log, GROUP, Topic::Events, shutdown)
            .await
    }

    /// Folds `records` and commits them with the next offset of every partition they are of.
    /// Records before a partition's position (re-deliveries) are skipped. If another projector
    /// advanced one of the partitions meanwhile (fenced), it reloads the stored offsets and
    /// applies what is left of the batch.
    pub async fn apply_batch(&mut self, records: &[Record]) -> Result<(), ProjectionError> {
        self.consumer.apply(records).await
    }

    /// Test hook: folds the batch like [`Self::apply_batch`] but "crashes" before the commit
    /// (the transaction never happens), leaving the store as a real crash would.
    #[doc(hidden)]
    pub async fn apply_batch_and_crash(
        mut self,
        records: &[Record],
    ) -> Result<(), ProjectionError> {
        let fold = self.consumer.fold_mut();
        for record in records {
            if let Some(env) = record.envelope_for("projector") {
                let at = Position {
                    partition: record.partition,
                    offset: record.offset,
                };
                fold.apply(at, env).await?;
            }
        }
        Ok(())
    }
}

impl Fold for BuildsFold {
    type Error = ProjectionError;

    fn name(&self) -> &'static str {
        "projector"
    }

    /// The database is the truth: the offsets stored with the rows.
    async fn start(
        &mut self,
        partitions: &[Partition],
    ) -> Result<Vec<(Partition, Offset)>, ProjectionError> {
        stored_starts(&self.store, partitions).await
    }

    async fn apply(&mut self, at: Position, env: Envelope) -> Result<(), ProjectionError> {
        let touch = touches(&env);
        if touch == Touch::Nothing {
            return Ok(());
        }
        if !self.cache.builds.contains_key(&env.build_id) {
            match self.store.load_build(&env.build_id).await? {
                Some(build) => {
                    self.cache.builds.insert(env.build_id.clone(), build);
                    let ids = self.store.load_event_ids(&env.build_id).await?;
                    self.recent.insert(env.build_id.clone(), ids);
                }
                None if matches!(env.payload, Some(Payload::BuildTriggered(_))) => {}
                None => return Ok(()), // an event for a build we never saw: nothing to change
            }
        }
        let recent = self.recent.entry(env.build_id.clone()).or_default();
        if !env.event_id.is_empty() {
            if recent.contains(&env.event_id) {
                self.duplicates += 1;
                tracing::debug!(
                    build_id = %env.build_id,
                    event_id = %env.event_id,
                    "skipping a re-delivered event (an id stored with its build)"
                );
                return Ok(());
            }
            remember(recent, &env.event_id);
        }
        self.cache.apply(at.offset, &env);
        self.touched.insert((env.build_id, touch), ());
        Ok(())
    }

    async fn commit(&mut self, advances: &[Advance]) -> Result<(), ProjectionError> {
        let touched = std::mem::take(&mut self.touched);
        // A whole-build touch subsumes the finer ones of the same build.
        let whole: Vec<&String> = touched
            .keys()
            .filter(|(_, t)| *t == Touch::WholeBuild)
            .map(|(b, _)| b)
            .collect();
        let touched: Vec<(String, Touch)> = touched
            .keys()
            .filter(|(b, t)| *t == Touch::WholeBuild || !whole.contains(&b))
            .cloned()
            .collect();
        if let Err(e) = self
            .store
            .commit_batch_at(&self.cache, &touched, advances, &self.recent)
            .await
        {
            // The cache is ahead of the database now: forget it, it reloads from the store.
            self.cache.builds.clear();
            self.recent.clear();
            return Err(e);
        }
        // Finished builds rarely change again: keep the cache to the live ones.
        self.cache.builds.retain(|_, b| !b.phase.is_terminal());
        let cache = &self.cache;
        self.recent.retain(|id, _| cache.builds.contains_key(id));
        Ok(())
    }

    async fn retry(
        &mut self,
        error: &ProjectionError,
    ) -> Result<Option<Vec<(Partition, Offset)>>, ProjectionError> {
        self.touched.clear();
        fenced(&self.store, error).await
    }

    /// Drops the cached builds of `partitions` (another member owns them now).
    fn revoked(&mut self, partitions: &[Partition]) {
        let layout = self.layout;
        let mine = |id: &String| !partitions.contains(&layout.partition_for(Topic::Events, id));
        self.cache.builds.retain(|id, _| mine(id));
        self.recent.retain(|id, _| mine(id));
    }
}

/// After a failed batch: when another member wrote a partition (fenced), the offsets stored
/// now, to apply what is left of the batch from; `None` for any other error.
async fn fenced(
    store: &BuildsStore,
    error: &ProjectionError,
) -> Result<Option<Vec<(Partition, Offset)>>, ProjectionError> {
    let ProjectionError::Fenced {
        partition,
        expected,
    } = error
    else {
        return Ok(None);
    };
    tracing::warn!(
        partition,
        expected,
        "fenced: another member wrote this partition; reloading"
    );
    Ok(Some(store.next_offsets().await?.into_iter().collect()))
}

fn remember(recent: &mut VecDeque<String>, id: &str) {
    if recent.len() >= RECENT_IDS {
        recent.pop_front();
    }
    recent.push_back(id.to_owned());
}

/// Counts the log bytes of the logs topic's chunks per (build, job, attempt, step, line); see
/// the [module docs](self). Exactly once like the projector: counters, recent chunk ids and
/// the logs partitions' next offsets are committed in one transaction.
pub struct ChunkCounter {
    consumer: Consumer<ChunkFold>,
}

/// The chunk counter's fold, as the runtime drives it.
pub struct ChunkFold {
    store: BuildsStore,
    layout: Layout,
    recent: EventIds,
    /// The batch being applied.
    increments: ChunkCounts,
    /// Re-deliveries found by the stored ids (after a restart).
    duplicates: u64,
}

/// Builds whose recent chunk ids a counter keeps in memory at most; past it, it forgets them
/// (they are reloaded from the database when needed).
const RECENT_BUILDS: usize = 10_000;

impl ChunkCounter {
    pub fn new(store: BuildsStore) -> Self {
        ChunkCounter {
            consumer: Consumer::new(ChunkFold {
                store,
                layout: Layout::SINGLE,
                recent: EventIds::new(),
                increments: ChunkCounts::new(),
                duplicates: 0,
            }),
        }
    }

    /// Records skipped: undecodable, or of an unknown event type.
    pub fn malformed(&self) -> u64 {
        self.consumer.skipped().malformed
    }

    /// Re-delivered chunks that were skipped.
    pub fn duplicates(&self) -> u64 {
        self.consumer.skipped().duplicates + self.consumer.fold().duplicates
    }

    /// Counts every chunk of the logs topic up to its current end (a rebuild).
    pub async fn catch_up(&mut self, log: &dyn EventLog) -> Result<(), ProjectionError> {
        self.consumer.fold_mut().layout = log.layout();
        self.consumer
            .catch_up(log, log.layout().topic_partitions(Topic::Logs))
            .await
    }

    /// Runs as a member of group [`LOGS_GROUP`] on the logs topic until `shutdown` resolves
    /// (then commits and leaves), the log closes, or an error.
    pub async fn run(
        &mut self,
        log: &dyn EventLog,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ProjectionError> {
        self.consumer.fold_mut().layout = log.layout();
        self.consumer
            .run_group(log, LOGS_GROUP, Topic::Logs, shutdown)
            .await
    }

    /// Counts `records` (skipping re-deliveries) and commits them with the next offsets;
    /// fenced like [`BuildsProjector::apply_batch`].
    pub async fn apply_batch(&mut self, records: &[Record]) -> Result<(), ProjectionError> {
        self.consumer.apply(records).await
    }
}

impl Fold for ChunkFold {
    type Error = ProjectionError;

    fn name(&self) -> &'static str {
        "projector-logs"
    }

    fn interest(&self) -> Interest {
        Interest::of(&[LOG_CHUNK])
    }

    async fn start(
        &mut self,
        partitions: &[Partition],
    ) -> Result<Vec<(Partition, Offset)>, ProjectionError> {
        stored_starts(&self.store, partitions).await
    }

    async fn apply(&mut self, _at: Position, env: Envelope) -> Result<(), ProjectionError> {
        if chunks::chunk_of(&env).is_none() {
            return Ok(());
        }
        if !self.recent.contains_key(&env.build_id) {
            let ids = self.store.load_chunk_event_ids(&env.build_id).await?;
            self.recent.insert(env.build_id.clone(), ids);
        }
        let recent = self.recent.entry(env.build_id.clone()).or_default();
        if recent.contains(&env.event_id) {
            self.duplicates += 1;
            return Ok(());
        }
        remember(recent, &env.event_id);
        chunks::add(&mut self.increments, &env);
        Ok(())
    }

    async fn commit(&mut self, advances: &[Advance]) -> Result<(), ProjectionError> {
        let increments = std::mem::take(&mut self.increments);
        if let Err(e) = self
            .store
            .commit_chunks(&increments, &self.recent, advances)
            .await
        {
            self.recent.clear();
            return Err(e);
        }
        if self.recent.len() > RECENT_BUILDS {
            self.recent.clear();
        }
        Ok(())
    }

    async fn retry(
        &mut self,
        error: &ProjectionError,
    ) -> Result<Option<Vec<(Partition, Offset)>>, ProjectionError> {
        self.increments.clear();
        self.recent.clear();
        fenced(&self.store, error).await
    }

    fn revoked(&mut self, partitions: &[Partition]) {
        let layout = self.layout;
        self.recent
            .retain(|id, _| !partitions.contains(&layout.partition_for(Topic::Logs, id)));
    }
}

/// Where each of `partitions` starts: the next offset stored with the rows (0 when none). The
/// database is the truth for the projector and the chunk counter alike.
async fn stored_starts(
    store: &BuildsStore,
    partitions: &[Partition],
) -> Result<Vec<(Partition, Offset)>, ProjectionError> {
    let stored = store.next_offsets().await?;
    Ok(partitions
        .iter()
        .map(|p| (*p, stored.get(p).copied().unwrap_or(0)))
        .collect())
}
