//! The metering projector: log records → the metering fold → one SQLite transaction per
//! batch (rows the batch changed + the next offset). The whole state stays in memory (it is
//! small: one row per job attempt, job-attempt month and usage day); on restart it is loaded
//! from the store and the log is followed from the stored offset, so nothing counts twice.

use tributary_eventlog::{EventLog, Record};

use crate::fold::{Effect, MeteringState};
use crate::store::MeteringStore;
use crate::view::view;
use crate::MeteringError;

pub struct MeteringProjector {
    store: MeteringStore,
    state: MeteringState,
    next_offset: u64,
    /// Records that could not be decoded and were skipped.
    pub malformed: u64,
}

impl MeteringProjector {
    pub async fn open(store: MeteringStore) -> Result<Self, MeteringError> {
        let (state, next_offset) = store.load_all().await?;
        Ok(MeteringProjector {
            store,
            state,
            next_offset,
            malformed: 0,
        })
    }

    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    pub fn state(&self) -> &MeteringState {
        &self.state
    }

    pub fn store(&self) -> &MeteringStore {
        &self.store
    }

    /// Applies every record up to the current end of the log.
    pub async fn catch_up(&mut self, log: &dyn EventLog) -> Result<u64, MeteringError> {
        loop {
            let records = log.read(self.next_offset, 16_384).await?;
            if records.is_empty() {
                return Ok(self.next_offset);
            }
            self.apply_batch(&records).await?;
        }
    }

    /// Folds `records` and commits the rows they changed with the new offset. Records before
    /// [`Self::next_offset`] (re-deliveries) are skipped.
    pub async fn apply_batch(&mut self, records: &[Record]) -> Result<Vec<Effect>, MeteringError> {
        let mut effects = Vec::new();
        for record in records {
            if record.offset < self.next_offset {
                continue;
            }
            match view(&record.data) {
                Ok(event) => {
                    let effect = self.state.apply_view(record.offset, &event);
                    match &effect {
                        Effect::Nothing | Effect::Counted | Effect::Ended => {}
                        Effect::Duplicate => {
                            tracing::debug!(offset = record.offset, build_id = %record.key, "duplicate usage tick ignored")
                        }
                        Effect::Accepted { tenant, period } => {
                            tracing::info!(offset = record.offset, %tenant, %period, "invoice issued")
                        }
                        Effect::Rejected {
                            tenant,
                            period,
                            reason,
                        } => {
                            tracing::warn!(offset = record.offset, %tenant, %period, %reason, "invoice not accepted")
                        }
                    }
                    if !matches!(effect, Effect::Nothing | Effect::Counted) {
                        effects.push(effect);
                    }
                }
                Err(e) => {
                    self.malformed += 1;
                    tracing::error!(offset = record.offset, error = %e, "skipping malformed event");
                }
            }
        }
        let Some(last) = records.last() else {
            return Ok(effects);
        };
        let next = (last.offset + 1).max(self.next_offset);
        let dirty = self.state.take_dirty();
        if let Err(e) = self.store.commit_batch(&self.state, &dirty, next).await {
            // The memory is ahead of the database now: reload it, the batch is re-applied.
            let (state, offset) = self.store.load_all().await?;
            self.state = state;
            self.next_offset = offset;
            return Err(e);
        }
        self.next_offset = next;
        Ok(effects)
    }

    /// Test hook: folds the batch but "crashes" before the commit.
    #[doc(hidden)]
    pub fn apply_batch_and_crash(mut self, records: &[Record]) {
        for record in records {
            if let Ok(env) = record.decode() {
                self.state.apply(record.offset, &env);
            }
        }
    }
}
