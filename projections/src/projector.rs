//! The projector: feeds log records to the builds fold and persists the result.
//!
//! Exactly-once effect: the rows a batch changes and the new consumer offset are committed in
//! one transaction; on restart the projector resumes from the stored offset. A batch that fails
//! to commit is forgotten (the cache is dropped) and re-applied from the log.

use std::collections::BTreeMap;

use tributary_eventlog::{EventLog, Record};
use tributary_proto::events::envelope::Payload;

use crate::builds::{touches, BuildsState, Touch};
use crate::store::BuildsStore;
use crate::ProjectionError;

/// Projects the log into the builds read model.
pub struct BuildsProjector {
    store: BuildsStore,
    /// Builds that may still change (not finished), as loaded or folded so far.
    cache: BuildsState,
    next_offset: u64,
    /// Records that could not be decoded and were skipped.
    pub malformed: u64,
}

impl BuildsProjector {
    pub async fn open(store: BuildsStore) -> Result<Self, ProjectionError> {
        let next_offset = store.next_offset().await?;
        Ok(BuildsProjector {
            store,
            cache: BuildsState::default(),
            next_offset,
            malformed: 0,
        })
    }

    /// The next log offset this projector will apply.
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    pub fn store(&self) -> &BuildsStore {
        &self.store
    }

    /// Applies every record up to the current end of the log, then returns the new position.
    pub async fn catch_up(&mut self, log: &dyn EventLog) -> Result<u64, ProjectionError> {
        loop {
            let records = log.read(self.next_offset, 4096).await?;
            if records.is_empty() {
                return Ok(self.next_offset);
            }
            self.apply_batch(&records).await?;
        }
    }

    /// Follows the log forever (until the log closes or an error).
    pub async fn follow(&mut self, log: &dyn EventLog) -> Result<(), ProjectionError> {
        let mut sub = log.subscribe(self.next_offset);
        loop {
            let records = sub.next_batch().await?;
            self.apply_batch(&records).await?;
        }
    }

    /// Folds `records` (which must start at [`Self::next_offset`]) and commits them.
    pub async fn apply_batch(&mut self, records: &[Record]) -> Result<(), ProjectionError> {
        let touched = self.fold_batch(records).await?;
        let Some(last) = records.last() else {
            return Ok(());
        };
        let next = last.offset + 1;
        if let Err(e) = self.store.commit_batch(&self.cache, &touched, next).await {
            // The cache is ahead of the database now: forget it, it reloads from the store.
            self.cache.builds.clear();
            return Err(e);
        }
        self.next_offset = next;
        // Finished builds rarely change again: keep the cache to the live ones.
        self.cache.builds.retain(|_, b| !b.phase.is_terminal());
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
            if record.offset < self.next_offset {
                continue; // already applied (a re-delivery)
            }
            let env = match record.decode() {
                Ok(env) => env,
                Err(e) => {
                    self.malformed += 1;
                    tracing::error!(offset = record.offset, error = %e, "skipping malformed event");
                    continue;
                }
            };
            let touch = touches(&env);
            if touch == Touch::Nothing {
                continue;
            }
            if !self.cache.builds.contains_key(&env.build_id)
                && !matches!(env.payload, Some(Payload::BuildTriggered(_)))
            {
                match self.store.load_build(&env.build_id).await? {
                    Some(build) => {
                        self.cache.builds.insert(env.build_id.clone(), build);
                    }
                    None => continue, // an event for a build we never saw: nothing to change
                }
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
