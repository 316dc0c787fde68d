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
//! Re-deliveries: Kafka may store a retried append twice. The projector skips an event whose id
//! is among the last [`RECENT_IDS`] it applied to that build (kept with the build's rows, in the
//! same transaction), so a duplicate is applied once.
//!
//! Log chunks in a separate logs topic (Kafka) are not folded into builds (their order relative
//! to the build's state events is not kept): [`ChunkCounter`]s, members of group
//! [`LOGS_GROUP`] on the logs topic, add their bytes to per-line counters
//! ([`crate::chunks`]), which the store overlays on the build when it is read. On a log without
//! a logs topic (SQLite, or Kafka with `log_partitions` 0) chunks are in the build's partition
//! and the fold counts them itself.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;

use tributary_eventlog::{EventLog, GroupEvent, Layout, Partition, Record, Topic};
use tributary_proto::events::envelope::Payload;

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

/// Projects the log into the builds read model.
pub struct BuildsProjector {
    store: BuildsStore,
    /// Builds that may still change (not finished), as loaded or folded so far.
    cache: BuildsState,
    /// Recent event ids of the cached builds.
    recent: EventIds,
    /// Next offset to apply, per partition this projector reads.
    positions: BTreeMap<Partition, u64>,
    /// Records skipped: undecodable, or of an unknown event type (also counted per process in
    /// `tributary_eventlog::skipped`).
    pub malformed: u64,
    /// Re-delivered events (an event id already applied to its build) that were skipped.
    pub duplicates: u64,
}

impl BuildsProjector {
    pub async fn open(store: BuildsStore) -> Result<Self, ProjectionError> {
        let positions = store.next_offsets().await?;
        Ok(BuildsProjector {
            store,
            cache: BuildsState::default(),
            recent: EventIds::new(),
            positions,
            malformed: 0,
            duplicates: 0,
        })
    }

    /// The next offset of partition 0 this projector will apply (single-partition logs).
    pub fn next_offset(&self) -> u64 {
        self.positions.get(&0).copied().unwrap_or(0)
    }

    /// The next offset to apply of each partition the projector has read.
    pub fn positions(&self) -> &BTreeMap<Partition, u64> {
        &self.positions
    }

    pub fn store(&self) -> &BuildsStore {
        &self.store
    }

    /// Applies every record up to the current end of the log (every events partition), then
    /// returns the new position of partition 0.
    pub async fn catch_up(&mut self, log: &dyn EventLog) -> Result<u64, ProjectionError> {
        for partition in log.layout().topic_partitions(Topic::Events) {
            loop {
                let from = self.positions.get(&partition).copied().unwrap_or(0);
                let records = log.read_partition(partition, from, 4096).await?;
                if records.is_empty() {
                    break;
                }
                self.apply_batch(&records).await?;
            }
        }
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
        run_member(self, log, shutdown).await
    }

    /// Drops the cached builds and positions of `partitions` (another member owns them now).
    fn forget(&mut self, layout: Layout, partitions: &[Partition]) {
        let mine = |id: &String| !partitions.contains(&layout.partition_for(Topic::Events, id));
        self.cache.builds.retain(|id, _| mine(id));
        self.recent.retain(|id, _| mine(id));
        for p in partitions {
            self.positions.remove(p);
        }
    }

    /// Folds `records` and commits them with the next offset of every partition they are of.
    /// Records before a partition's position (re-deliveries) are skipped. If another projector
    /// advanced one of the partitions meanwhile (fenced), it reloads the stored offsets and
    /// applies what is left of the batch.
    pub async fn apply_batch(&mut self, records: &[Record]) -> Result<(), ProjectionError> {
        apply_fenced(self, records).await
    }

    async fn try_apply_batch(&mut self, records: &[Record]) -> Result<(), ProjectionError> {
        let touched = self.fold_batch(records).await?;
        let mut advances: BTreeMap<Partition, Advance> = BTreeMap::new();
        for record in records {
            let from = self.positions.get(&record.partition).copied().unwrap_or(0);
            if record.offset >= from {
                advances
                    .entry(record.partition)
                    .or_insert(Advance {
                        partition: record.partition,
                        from,
                        to: from,
                    })
                    .to = record.offset + 1;
            }
        }
        if advances.is_empty() {
            return Ok(());
        }
        let advances: Vec<Advance> = advances.into_values().collect();
        if let Err(e) = self
            .store
            .commit_batch_at(&self.cache, &touched, &advances, &self.recent)
            .await
        {
            // The cache is ahead of the database now: forget it, it reloads from the store.
            self.cache.builds.clear();
            self.recent.clear();
            return Err(e);
        }
        self.positions
            .extend(advances.iter().map(|a| (a.partition, a.to)));
        // Finished builds rarely change again: keep the cache to the live ones.
        self.cache.builds.retain(|_, b| !b.phase.is_terminal());
        let cache = &self.cache;
        self.recent.retain(|id, _| cache.builds.contains_key(id));
        Ok(())
    }

    /// Test hook: folds the batch like [`Self::apply_batch`] but "crashes" before the commit
    /// (the transaction never happens), leaving the store as a real crash would.
    #[doc(hidden)]
    pub async fn apply_batch_and_crash(
        mut self,
        records: &[Record],
    ) -> Result<(), ProjectionError> {
        self.fold_batch(records).await?;
        Ok(())
    }

    async fn fold_batch(
        &mut self,
        records: &[Record],
    ) -> Result<Vec<(String, Touch)>, ProjectionError> {
        let mut touched: BTreeMap<(String, Touch), ()> = BTreeMap::new();
        for record in records {
            let position = self.positions.get(&record.partition).copied().unwrap_or(0);
            if record.offset < position {
                continue; // already applied (a re-delivery)
            }
            let Some(env) = record.envelope_for("projector") else {
                self.malformed += 1; // logged and counted per process
                continue;
            };
            let touch = touches(&env);
            if touch == Touch::Nothing {
                continue;
            }
            if !self.cache.builds.contains_key(&env.build_id) {
                match self.store.load_build(&env.build_id).await? {
                    Some(build) => {
                        self.cache.builds.insert(env.build_id.clone(), build);
                        let ids = self.store.load_event_ids(&env.build_id).await?;
                        self.recent.insert(env.build_id.clone(), ids);
                    }
                    None if matches!(env.payload, Some(Payload::BuildTriggered(_))) => {}
                    None => continue, // an event for a build we never saw: nothing to change
                }
            }
            let recent = self.recent.entry(env.build_id.clone()).or_default();
            if !env.event_id.is_empty() {
                if recent.contains(&env.event_id) {
                    self.duplicates += 1;
                    tracing::debug!(
                        build_id = %env.build_id,
                        event_id = %env.event_id,
                        "skipping a re-delivered event"
                    );
                    continue;
                }
                remember(recent, &env.event_id);
            }
            self.cache.apply(record.offset, &env);
            touched.insert((env.build_id.clone(), touch), ());
        }
        // A whole-build touch subsumes the finer ones of the same build.
        let whole: Vec<String> = touched
            .keys()
            .filter(|(_, t)| *t == Touch::WholeBuild)
            .map(|(b, _)| b.clone())
            .collect();
        Ok(touched
            .into_keys()
            .filter(|(b, t)| *t == Touch::WholeBuild || !whole.contains(b))
            .collect())
    }
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
    store: BuildsStore,
    recent: EventIds,
    positions: BTreeMap<Partition, u64>,
    /// Records skipped: undecodable, or of an unknown event type (also counted per process in
    /// `tributary_eventlog::skipped`).
    pub malformed: u64,
    /// Re-delivered chunks that were skipped.
    pub duplicates: u64,
}

/// Builds whose recent chunk ids a counter keeps in memory at most; past it, it forgets them
/// (they are reloaded from the database when needed).
const RECENT_BUILDS: usize = 10_000;

impl ChunkCounter {
    pub fn new(store: BuildsStore) -> Self {
        ChunkCounter {
            store,
            recent: EventIds::new(),
            positions: BTreeMap::new(),
            malformed: 0,
            duplicates: 0,
        }
    }

    /// Runs as a member of group [`LOGS_GROUP`] on the logs topic until `shutdown` resolves
    /// (then commits and leaves), the log closes, or an error.
    pub async fn run(
        &mut self,
        log: &dyn EventLog,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ProjectionError> {
        run_member(self, log, shutdown).await
    }

    /// Counts `records` (skipping re-deliveries) and commits them with the next offsets;
    /// fenced like [`BuildsProjector::apply_batch`].
    pub async fn apply_batch(&mut self, records: &[Record]) -> Result<(), ProjectionError> {
        apply_fenced(self, records).await
    }

    async fn try_apply_batch(&mut self, records: &[Record]) -> Result<(), ProjectionError> {
        let mut increments = ChunkCounts::new();
        let mut advances: BTreeMap<Partition, Advance> = BTreeMap::new();
        for record in records {
            let from = self.positions.get(&record.partition).copied().unwrap_or(0);
            if record.offset < from {
                continue;
            }
            advances
                .entry(record.partition)
                .or_insert(Advance {
                    partition: record.partition,
                    from,
                    to: from,
                })
                .to = record.offset + 1;
            let Some(env) = record.envelope_for("projector-logs") else {
                self.malformed += 1; // logged and counted per process
                continue;
            };
            if chunks::chunk_of(&env).is_none() {
                continue;
            }
            if !self.recent.contains_key(&env.build_id) {
                let ids = self.store.load_chunk_event_ids(&env.build_id).await?;
                self.recent.insert(env.build_id.clone(), ids);
            }
            let recent = self.recent.entry(env.build_id.clone()).or_default();
            if recent.contains(&env.event_id) {
                self.duplicates += 1;
                continue;
            }
            remember(recent, &env.event_id);
            chunks::add(&mut increments, &env);
        }
        if advances.is_empty() {
            return Ok(());
        }
        let advances: Vec<Advance> = advances.into_values().collect();
        if let Err(e) = self
            .store
            .commit_chunks(&increments, &self.recent, &advances)
            .await
        {
            self.recent.clear();
            return Err(e);
        }
        self.positions
            .extend(advances.iter().map(|a| (a.partition, a.to)));
        if self.recent.len() > RECENT_BUILDS {
            self.recent.clear();
        }
        Ok(())
    }
}

/// A consumer-group member of the projections: the builds projector or a chunk counter.
/// [`run_member`] drives either through the group's assignments; [`apply_fenced`] retries a
/// batch after another member advanced a partition.
trait Member {
    /// The group it joins and the topic it reads.
    const GROUP: &'static str;
    const TOPIC: Topic;
    /// Its name in logs.
    const NAME: &'static str;
    fn store(&self) -> &BuildsStore;
    /// Next offset to apply, per owned partition.
    fn positions(&mut self) -> &mut BTreeMap<Partition, u64>;
    /// Drops what it keeps of `partitions` (another member owns them now), positions included.
    fn forget(&mut self, layout: Layout, partitions: &[Partition]);
    /// Applies `records` and commits them with the partitions' next offsets, in one
    /// transaction; [`ProjectionError::Fenced`] if a partition's stored offset moved.
    async fn try_apply_batch(&mut self, records: &[Record]) -> Result<(), ProjectionError>;
}

impl Member for BuildsProjector {
    const GROUP: &'static str = GROUP;
    const TOPIC: Topic = Topic::Events;
    const NAME: &'static str = "projector";
    fn store(&self) -> &BuildsStore {
        &self.store
    }
    fn positions(&mut self) -> &mut BTreeMap<Partition, u64> {
        &mut self.positions
    }
    fn forget(&mut self, layout: Layout, partitions: &[Partition]) {
        BuildsProjector::forget(self, layout, partitions)
    }
    async fn try_apply_batch(&mut self, records: &[Record]) -> Result<(), ProjectionError> {
        BuildsProjector::try_apply_batch(self, records).await
    }
}

impl Member for ChunkCounter {
    const GROUP: &'static str = LOGS_GROUP;
    const TOPIC: Topic = Topic::Logs;
    const NAME: &'static str = "chunk counter";
    fn store(&self) -> &BuildsStore {
        &self.store
    }
    fn positions(&mut self) -> &mut BTreeMap<Partition, u64> {
        &mut self.positions
    }
    fn forget(&mut self, layout: Layout, partitions: &[Partition]) {
        self.recent
            .retain(|id, _| !partitions.contains(&layout.partition_for(Topic::Logs, id)));
        for p in partitions {
            self.positions.remove(p);
        }
    }
    async fn try_apply_batch(&mut self, records: &[Record]) -> Result<(), ProjectionError> {
        ChunkCounter::try_apply_batch(self, records).await
    }
}

/// Runs `m` as a member of its group until `shutdown` resolves (then it commits and leaves the
/// group, so its partitions go to the other members at once), the log closes, or an error.
async fn run_member<M: Member>(
    m: &mut M,
    log: &dyn EventLog,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ProjectionError> {
    let layout = log.layout();
    let mut member = log.join_group(M::GROUP, &[M::TOPIC]).await?;
    let positions_of = |m: &mut M, partitions: &[Partition]| -> Vec<(Partition, u64)> {
        let positions = m.positions();
        partitions
            .iter()
            .filter_map(|p| positions.get(p).map(|o| (*p, *o)))
            .collect()
    };
    tokio::pin!(shutdown);
    loop {
        let event = tokio::select! {
            biased;
            () = &mut shutdown => {
                let owned = member.assigned();
                member.commit(&positions_of(m, &owned)).await?;
                member.leave().await?;
                tracing::info!(partitions = ?owned, "{} left its group", M::NAME);
                return Ok(());
            }
            event = member.next() => event?,
        };
        match event {
            GroupEvent::Assigned(partitions) => {
                // The database is the truth: reload the offsets stored with the rows.
                let stored = m.store().next_offsets().await?;
                let start: Vec<(Partition, u64)> = partitions
                    .iter()
                    .map(|p| (*p, stored.get(p).copied().unwrap_or(0)))
                    .collect();
                m.positions().extend(start.iter().copied());
                member.start_at(&start);
                tracing::info!(?start, "{}: partitions assigned", M::NAME);
            }
            GroupEvent::Revoked(partitions) => {
                // Every applied batch is committed already; tell the group for lag metrics.
                member.commit(&positions_of(m, &partitions)).await?;
                m.forget(layout, &partitions);
                tracing::info!(?partitions, "{}: partitions revoked", M::NAME);
            }
            GroupEvent::Records(records) => apply_fenced(m, &records).await?,
        }
    }
}

/// Applies `records`; when fenced (another member wrote one of the partitions), reloads the
/// stored offsets and applies what is left of the batch.
async fn apply_fenced<M: Member>(m: &mut M, records: &[Record]) -> Result<(), ProjectionError> {
    loop {
        match m.try_apply_batch(records).await {
            Err(ProjectionError::Fenced {
                partition,
                expected,
            }) => {
                tracing::warn!(
                    partition,
                    expected,
                    "{} fenced: another member wrote this partition; reloading",
                    M::NAME
                );
                let stored = m.store().next_offsets().await?;
                for (p, position) in m.positions().iter_mut() {
                    *position = stored.get(p).copied().unwrap_or(0);
                }
            }
            other => return other,
        }
    }
}
