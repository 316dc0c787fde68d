//! The metering projector: log records of every events partition → the metering fold → one
//! transaction per batch (rows the batch changed + the next offset of every partition). The
//! whole state stays in memory (it is small: one row per job attempt, job-attempt month and
//! usage day); on restart it is loaded from the store and each partition is followed from its
//! stored offset, so nothing counts twice. Records at offsets already folded (re-deliveries
//! of a partition) are skipped by position; events appended twice (a retried append) by the
//! fold's own dedupe (tick seq, event id).

use std::collections::BTreeMap;
use std::ops::Range;

use tributary_eventlog::runtime::{Advance, Consumer, Fold, Order, Position};
use tributary_eventlog::{EventLog, Offset, Partition, Record, Subscription, Topic};
use tributary_proto::events::envelope::Payload;
use tributary_proto::events::Envelope;

use crate::fold::{Effect, MeteringState, Pos};
use crate::store::MeteringStore;
use crate::view::{view, View};
use crate::MeteringError;

/// The metering fold as the consumer runtime drives it: every record is read through [`view`]
/// (usage ticks borrowed from the record's bytes, the few other events metering folds decoded,
/// everything else skipped undecoded), so the runtime never decodes for it; the fold dedupes
/// what it reads itself (tick sequence numbers, invoice event ids). Each applied batch commits
/// the rows it changed with the fold's positions in one transaction (when it has a store: the
/// replay of `audit` has none).
pub struct MeteringFold {
    store: Option<MeteringStore>,
    pub state: MeteringState,
    /// What the records applied since the caller last looked decided (not `Nothing`/`Counted`).
    effects: Vec<Effect>,
    /// Records that could not be decoded and were skipped.
    malformed: u64,
    /// Events folded before (re-appended ticks or invoices) that changed nothing.
    duplicates: u64,
}

impl MeteringFold {
    /// A fold of `state`, committed to `store` batch by batch.
    pub fn stored(store: MeteringStore, state: MeteringState) -> Self {
        MeteringFold {
            store: Some(store),
            state,
            effects: Vec::new(),
            malformed: 0,
            duplicates: 0,
        }
    }

    /// A fold in memory only, from a fresh state (a replay).
    pub fn in_memory() -> Self {
        MeteringFold {
            store: None,
            state: MeteringState::default(),
            effects: Vec::new(),
            malformed: 0,
            duplicates: 0,
        }
    }

    fn fold_record(&mut self, record: &Record) {
        let at = Pos::new(record.partition, record.offset);
        match view(&record.data) {
            Ok(event) => {
                let effect = self.state.apply_view(at, &event);
                self.note(at, &record.key, &effect);
                if !matches!(effect, Effect::Nothing | Effect::Counted) {
                    self.effects.push(effect);
                }
            }
            Err(e) => {
                self.malformed += 1;
                // Served on /metrics like every consumer's skipped records. (Events of an
                // unknown type are skipped undecoded by `view`, as metering folds only ticks,
                // job ends and invoices: not counted.)
                tributary_eventlog::skipped::count(
                    "metering",
                    tributary_eventlog::skipped::Skip::Undecodable,
                );
                self.state.skip(at);
                tracing::error!(
                    partition = record.partition,
                    offset = record.offset,
                    key = %record.key,
                    error = %e,
                    malformed = self.malformed,
                    "skipping a malformed record"
                );
            }
        }
        for (at, effect) in self.state.take_decided() {
            self.note(at, "", &effect);
            self.effects.push(effect);
        }
    }

    fn note(&mut self, at: Pos, key: &str, effect: &Effect) {
        match effect {
            Effect::Nothing | Effect::Counted | Effect::Ended => {}
            Effect::Pending => {
                tracing::info!(%at, "invoice read; decided once every partition reaches its cut")
            }
            Effect::Duplicate => {
                self.duplicates += 1;
                tracing::debug!(%at, build_id = %key, "duplicate event ignored")
            }
            Effect::Accepted { tenant, period } => {
                tracing::info!(%at, %tenant, %period, "invoice issued")
            }
            Effect::Rejected {
                tenant,
                period,
                reason,
            } => {
                tracing::warn!(%at, %tenant, %period, %reason, "invoice not accepted")
            }
        }
    }
}

impl Fold for MeteringFold {
    type Error = MeteringError;

    fn name(&self) -> &'static str {
        "metering"
    }

    async fn start(
        &mut self,
        partitions: &[Partition],
    ) -> Result<Vec<(Partition, Offset)>, MeteringError> {
        Ok(partitions
            .iter()
            .map(|p| (*p, self.state.position(*p)))
            .collect())
    }

    async fn apply_record(
        &mut self,
        _at: Position,
        record: &Record,
    ) -> Result<bool, MeteringError> {
        self.fold_record(record);
        Ok(true)
    }

    async fn apply(&mut self, at: Position, env: Envelope) -> Result<(), MeteringError> {
        // Not reached: every record is read by `apply_record`.
        self.state.apply(Pos::new(at.partition, at.offset), &env);
        Ok(())
    }

    async fn commit(&mut self, _advances: &[Advance]) -> Result<(), MeteringError> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        let dirty = self.state.take_dirty();
        if let Err(e) = store.commit_batch(&self.state, &dirty).await {
            // The memory is ahead of the database now: reload it; the batch is applied again.
            self.state = store.load_all().await?;
            return Err(e);
        }
        Ok(())
    }
}

pub struct MeteringProjector {
    consumer: Consumer<MeteringFold>,
}

/// The partitions metering reads: the events topic's (log chunks are not metered).
pub fn partitions(log: &dyn EventLog) -> Range<Partition> {
    log.layout().topic_partitions(Topic::Events)
}

impl MeteringProjector {
    pub async fn open(store: MeteringStore) -> Result<Self, MeteringError> {
        let state = store.load_all().await?;
        let positions: Vec<(Partition, Offset)> = state.positions().collect();
        let mut consumer = Consumer::new(MeteringFold::stored(store, state));
        consumer.set_positions(&positions);
        Ok(MeteringProjector { consumer })
    }

    /// The next offset of partition 0 (the single-partition log's position).
    pub fn next_offset(&self) -> u64 {
        self.state().position(0)
    }

    /// `(partition, next offset)` of every partition in `partitions`.
    pub fn positions(&self, partitions: Range<Partition>) -> Vec<(Partition, u64)> {
        partitions.map(|p| (p, self.state().position(p))).collect()
    }

    pub fn state(&self) -> &MeteringState {
        &self.consumer.fold().state
    }

    pub fn store(&self) -> &MeteringStore {
        self.consumer
            .fold()
            .store
            .as_ref()
            .expect("a projector always has a store")
    }

    /// Records that could not be decoded and were skipped.
    pub fn malformed(&self) -> u64 {
        self.consumer.fold().malformed
    }

    /// Events folded before (re-appended ticks or invoices) that changed nothing.
    pub fn duplicates(&self) -> u64 {
        self.consumer.fold().duplicates
    }

    /// Applies every record of the events partitions up to their current ends, in the
    /// canonical order of [`Barriers`].
    pub async fn catch_up(&mut self, log: &dyn EventLog) -> Result<(), MeteringError> {
        let ends = crate::audit::events_ends(log).await?;
        self.consumer
            .catch_up_in(log, &ends, &mut Barriers::default())
            .await?;
        // Invoices found ahead are part of the state now.
        let fold = self.consumer.fold_mut();
        fold.effects.clear();
        let dirty = fold.state.take_dirty();
        if !dirty.is_empty() {
            if let Some(store) = &fold.store {
                store.commit_batch(&fold.state, &dirty).await?;
            }
        }
        Ok(())
    }

    /// A subscription to every events partition from the positions reached, for the service
    /// (hand each batch to [`Self::apply_batch`]).
    pub fn subscribe(&mut self, log: &dyn EventLog) -> Box<dyn Subscription> {
        self.consumer.subscribe(log, partitions(log))
    }

    /// The issuer's own invoice, just appended at `at`: decided now, at its cut (the fold's
    /// positions when it was priced), and committed before anything else is folded.
    pub async fn issued(&mut self, at: Pos, env: &Envelope) -> Result<Effect, MeteringError> {
        let fold = self.consumer.fold_mut();
        let effect = fold.state.expect_invoice(at, env);
        fold.note(at, "", &effect);
        for (at, effect) in fold.state.take_decided() {
            fold.note(at, "", &effect);
        }
        let dirty = fold.state.take_dirty();
        if let Some(store) = &fold.store {
            if let Err(e) = store.commit_batch(&fold.state, &dirty).await {
                fold.state = store.load_all().await?;
                return Err(e);
            }
        }
        Ok(effect)
    }

    /// Whether the fold has read every events partition up to `ends` (indexed by partition,
    /// as [`EventLog::end_offsets`] gives them).
    pub fn reached(&self, log: &dyn EventLog, ends: &[u64]) -> bool {
        partitions(log)
            .all(|p| self.state().position(p) >= ends.get(p as usize).copied().unwrap_or(0))
    }

    /// Folds `records` and commits the rows they changed with the new positions. Records
    /// before a partition's position (re-deliveries) are skipped.
    pub async fn apply_batch(&mut self, records: &[Record]) -> Result<Vec<Effect>, MeteringError> {
        self.consumer.apply(records).await?;
        Ok(std::mem::take(&mut self.consumer.fold_mut().effects))
    }

    /// Test hook: folds the batch but "crashes" before the commit.
    #[doc(hidden)]
    pub fn apply_batch_and_crash(mut self, records: &[Record]) {
        for record in records {
            self.consumer.fold_mut().fold_record(record);
        }
    }
}

/// The canonical order in which metering reads a partitioned log up to some ends, so that
/// every reader decides invoices alike: first scan the partitions for InvoiceIssued records
/// (queued in the fold as expected), then read the partitions in turn, never past the cut of
/// an invoice waiting at the head of its tenant's queue. Each invoice is so decided on
/// exactly the records before its cut, whatever the partitions' speeds. (On one partition
/// the log's order is already canonical: no scan.) If cuts cannot all be reached (cuts beyond
/// the ends, or rival cuts that block each other), the rest is read without barriers.
#[derive(Default)]
pub struct Barriers {
    free: bool,
}

const SCAN_PAGE: usize = 16_384;

impl Order<MeteringFold> for Barriers {
    async fn start(
        &mut self,
        log: &dyn EventLog,
        fold: &mut MeteringFold,
        _positions: &BTreeMap<Partition, Offset>,
        ends: &BTreeMap<Partition, Offset>,
    ) -> Result<(), MeteringError> {
        if ends.len() <= 1 {
            return Ok(());
        }
        for (&p, &end) in ends {
            let mut from = fold.state.position(p);
            while from < end {
                let records = log.read_partition(p, from, SCAN_PAGE).await?;
                let Some(last) = records.last() else { break };
                from = last.offset + 1;
                for r in records.iter().filter(|r| r.offset < end) {
                    if let Ok(View::Decoded(env)) = view(&r.data) {
                        if matches!(env.payload, Some(Payload::InvoiceIssued(_))) {
                            fold.state.expect_invoice(Pos::new(p, r.offset), &env);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn limit(&self, fold: &MeteringFold, partition: Partition) -> Option<Offset> {
        if self.free {
            return None;
        }
        fold.state.barriers().get(&partition).copied()
    }

    fn blocked(&mut self) -> bool {
        if self.free {
            return false;
        }
        tracing::warn!(
            "invoices wait for cuts this read cannot reach; reading on without barriers"
        );
        self.free = true;
        true
    }
}
