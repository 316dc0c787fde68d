//! The metering projector: log records of every events partition → the metering fold → one
//! transaction per batch (rows the batch changed + the next offset of every partition). The
//! whole state stays in memory (it is small: one row per job attempt, job-attempt month and
//! usage day); on restart it is loaded from the store and each partition is followed from its
//! stored offset, so nothing counts twice. Records at offsets already folded (re-deliveries
//! of a partition) are skipped by position; events appended twice (a retried append) by the
//! fold's own dedupe (tick seq, event id).

use std::collections::BTreeMap;
use std::ops::Range;

use tributary_eventlog::{EventLog, Partition, Record, Topic};
use tributary_proto::events::envelope::Payload;

use crate::fold::{Effect, MeteringState, Pos};
use crate::store::MeteringStore;
use crate::view::{view, View};
use crate::MeteringError;

pub struct MeteringProjector {
    store: MeteringStore,
    state: MeteringState,
    /// Records that could not be decoded and were skipped.
    pub malformed: u64,
    /// Events folded before (re-appended ticks or invoices) that changed nothing.
    pub duplicates: u64,
}

/// The partitions metering reads: the events topic's (log chunks are not metered).
pub fn partitions(log: &dyn EventLog) -> Range<Partition> {
    log.layout().topic_partitions(Topic::Events)
}

impl MeteringProjector {
    pub async fn open(store: MeteringStore) -> Result<Self, MeteringError> {
        let state = store.load_all().await?;
        Ok(MeteringProjector {
            store,
            state,
            malformed: 0,
            duplicates: 0,
        })
    }

    /// The next offset of partition 0 (the single-partition log's position).
    pub fn next_offset(&self) -> u64 {
        self.state.position(0)
    }

    /// `(partition, next offset)` of every partition in `partitions`.
    pub fn positions(&self, partitions: Range<Partition>) -> Vec<(Partition, u64)> {
        partitions.map(|p| (p, self.state.position(p))).collect()
    }

    pub fn state(&self) -> &MeteringState {
        &self.state
    }

    pub fn store(&self) -> &MeteringStore {
        &self.store
    }

    /// Applies every record of the events partitions up to their current ends, in the
    /// canonical order of [`Barriers`].
    pub async fn catch_up(&mut self, log: &dyn EventLog) -> Result<(), MeteringError> {
        let ends = crate::audit::events_ends(log).await?;
        let mut barriers = Barriers::start(log, &mut self.state, ends).await?;
        while let Some(records) = barriers.next(log, &self.state).await? {
            self.apply_batch(&records).await?;
        }
        // Invoices found ahead are part of the state now.
        let dirty = self.state.take_dirty();
        if !dirty.is_empty() {
            self.store.commit_batch(&self.state, &dirty).await?;
        }
        Ok(())
    }

    /// The issuer's own invoice, just appended at `at`: decided now, at its cut (the fold's
    /// positions when it was priced), and committed before anything else is folded.
    pub async fn issued(
        &mut self,
        at: Pos,
        env: &tributary_proto::events::Envelope,
    ) -> Result<Effect, MeteringError> {
        let effect = self.state.expect_invoice(at, env);
        self.note(at, "", &effect);
        for (at, effect) in self.state.take_decided() {
            self.note(at, "", &effect);
        }
        let dirty = self.state.take_dirty();
        if let Err(e) = self.store.commit_batch(&self.state, &dirty).await {
            self.state = self.store.load_all().await?;
            return Err(e);
        }
        Ok(effect)
    }

    /// Whether the fold has read every events partition up to `ends` (indexed by partition,
    /// as [`EventLog::end_offsets`] gives them).
    pub fn reached(&self, log: &dyn EventLog, ends: &[u64]) -> bool {
        partitions(log)
            .all(|p| self.state.position(p) >= ends.get(p as usize).copied().unwrap_or(0))
    }

    /// Folds `records` and commits the rows they changed with the new positions. Records
    /// before a partition's position (re-deliveries) are skipped.
    pub async fn apply_batch(&mut self, records: &[Record]) -> Result<Vec<Effect>, MeteringError> {
        let mut effects = Vec::new();
        let mut applied = false;
        for record in records {
            if record.offset < self.state.position(record.partition) {
                continue;
            }
            applied = true;
            let at = Pos::new(record.partition, record.offset);
            match view(&record.data) {
                Ok(event) => {
                    let effect = self.state.apply_view(at, &event);
                    self.note(at, &record.key, &effect);
                    if !matches!(effect, Effect::Nothing | Effect::Counted) {
                        effects.push(effect);
                    }
                }
                Err(e) => {
                    self.malformed += 1;
                    // Served on /metrics like every consumer's skipped records. (Events of an
                    // unknown type are skipped undecoded by `view`, as metering folds only
                    // ticks, job ends and invoices: not counted.)
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
                effects.push(effect);
            }
        }
        if !applied {
            return Ok(effects);
        }
        let dirty = self.state.take_dirty();
        if let Err(e) = self.store.commit_batch(&self.state, &dirty).await {
            // The memory is ahead of the database now: reload it, the batch is re-applied.
            self.state = self.store.load_all().await?;
            return Err(e);
        }
        Ok(effects)
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

    /// Test hook: folds the batch but "crashes" before the commit.
    #[doc(hidden)]
    pub fn apply_batch_and_crash(mut self, records: &[Record]) {
        for record in records {
            if let Ok(env) = record.decode() {
                self.state
                    .apply(Pos::new(record.partition, record.offset), &env);
            }
        }
    }
}

/// The canonical order in which metering reads a partitioned log up to some ends, so that
/// every reader decides invoices alike: first scan the partitions for InvoiceIssued records
/// (queued in the fold as expected), then read the partitions in turn, never past the cut of
/// an invoice waiting at the head of its tenant's queue. Each invoice is so decided on
/// exactly the records before its cut, whatever the partitions' speeds. (On one partition
/// the log's order is already canonical: no scan.) If cuts cannot all be reached (cuts beyond
/// `ends`, or rival cuts that block each other), the rest is read without barriers.
pub struct Barriers {
    ends: BTreeMap<Partition, u64>,
    free: bool,
}

const BATCH: usize = 16_384;

impl Barriers {
    pub async fn start(
        log: &dyn EventLog,
        state: &mut MeteringState,
        ends: BTreeMap<Partition, u64>,
    ) -> Result<Barriers, MeteringError> {
        if ends.len() > 1 {
            for (&p, &end) in &ends {
                let mut from = state.position(p);
                while from < end {
                    let records = log.read_partition(p, from, BATCH).await?;
                    let Some(last) = records.last() else { break };
                    from = last.offset + 1;
                    for r in records.iter().filter(|r| r.offset < end) {
                        if let Ok(View::Decoded(env)) = view(&r.data) {
                            if matches!(env.payload, Some(Payload::InvoiceIssued(_))) {
                                state.expect_invoice(Pos::new(p, r.offset), &env);
                            }
                        }
                    }
                }
            }
        }
        Ok(Barriers { ends, free: false })
    }

    /// The next records to fold (one partition's, in order), or None when every partition
    /// reached its end.
    pub async fn next(
        &mut self,
        log: &dyn EventLog,
        state: &MeteringState,
    ) -> Result<Option<Vec<Record>>, MeteringError> {
        loop {
            let barriers = if self.free {
                BTreeMap::new()
            } else {
                state.barriers()
            };
            for (&p, &end) in &self.ends {
                let limit = barriers.get(&p).map_or(end, |b| (*b).min(end));
                let from = state.position(p);
                if from >= limit {
                    continue;
                }
                let want = usize::try_from(limit - from).unwrap_or(BATCH).min(BATCH);
                let mut records = log.read_partition(p, from, want).await?;
                records.retain(|r| r.offset < limit);
                if !records.is_empty() {
                    return Ok(Some(records));
                }
            }
            if self.free {
                return Ok(None);
            }
            let done = self.ends.iter().all(|(&p, &end)| state.position(p) >= end);
            if done {
                return Ok(None);
            }
            tracing::warn!(
                "invoices wait for cuts this read cannot reach; reading on without barriers"
            );
            self.free = true;
        }
    }
}
