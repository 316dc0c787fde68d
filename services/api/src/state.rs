//! What every API handler shares: the log, the read models, the repository mirrors.
//!
//! Read-your-writes: a handler that appended at offset N and then reads a read model first
//! waits until that read model has folded past N ([`ApiState::wait_directory`],
//! [`ApiState::wait_builds`]).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;
use tonic::Status;
use tributary_eventlog::runtime::{
    Applied, Consumer, Fold, Interest, Sequenced, Sequential, JOB_OUTPUT,
};
use tributary_eventlog::{EventLog, Layout, LogError, Offset, Partition, Record, Topic};
use tributary_projections::directory::Directory;
use tributary_projections::{BuildsStore, ReadModelPositions};
use tributary_proto::events::{envelope::Payload, Envelope};
use tributary_scheduler::cluster::ClusterState;

/// How far the log goes, or how far a reader must have read: for some partitions, the offset
/// just past the last record that matters. A reader "has folded past" a mark when its next
/// offset in each listed partition is at least the mark's. On a one-partition log it is one
/// offset, as before partitions existed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mark(pub Vec<(Partition, Offset)>);

impl Mark {
    /// Just past `offsets` (one per event of `events`, as [`EventLog::append`] returns them).
    pub fn after_append(layout: Layout, events: &[Envelope], offsets: &[Offset]) -> Mark {
        let mut ends: BTreeMap<Partition, Offset> = BTreeMap::new();
        for (event, offset) in events.iter().zip(offsets) {
            let end = ends.entry(layout.partition_of(event)).or_default();
            *end = (*end).max(offset + 1);
        }
        Mark(ends.into_iter().collect())
    }

    /// Just past `record`.
    pub fn after(record: &Record) -> Mark {
        Mark(vec![(record.partition, record.offset + 1)])
    }

    /// Whether `positions` (next offset per partition) are at or past this mark in every
    /// partition of the mark that `positions` follows.
    pub fn reached_by(&self, positions: &BTreeMap<Partition, Offset>) -> bool {
        self.0
            .iter()
            .all(|(p, end)| positions.get(p).is_none_or(|at| at >= end))
    }
}

/// A read model folded in memory from offset 0 of every events partition and kept following
/// the log by the consumer runtime ([`Consumer::follow`]): re-delivered events (same event id)
/// are folded once, records that do not decode or carry an unknown payload are skipped, logged
/// and counted as the consumer's.
pub struct Folded<S> {
    state: Arc<RwLock<S>>,
    /// What the fold has applied, per events partition.
    at: watch::Receiver<Applied>,
}

impl<S> Clone for Folded<S> {
    fn clone(&self) -> Self {
        Folded {
            state: self.state.clone(),
            at: self.at.clone(),
        }
    }
}

/// The shared state of a [`Folded`] read model, applied under its lock (each event with its
/// place in the fold's order, [`Sequenced`]).
struct Locked<S> {
    state: Arc<RwLock<S>>,
    apply: fn(&mut S, u64, &Envelope),
}

impl<S: Send + Sync> Sequential for Locked<S> {
    fn apply(&mut self, sequence: u64, env: &Envelope) {
        if let Ok(mut s) = self.state.write() {
            (self.apply)(&mut s, sequence, env);
        }
    }
}

impl<S: Default + Send + Sync + 'static> Folded<S> {
    /// Starts folding `log` into a fresh `S` with `apply`, which gets the events `interest`
    /// admits, each with its place in the fold's order. Skipped records are counted as
    /// `consumer`'s ([`tributary_eventlog::skipped`]).
    pub fn start(
        log: &Arc<dyn EventLog>,
        consumer: &'static str,
        interest: Interest,
        apply: fn(&mut S, u64, &Envelope),
    ) -> Self {
        let state = Arc::new(RwLock::new(S::default()));
        let fold = Sequenced::new(
            consumer,
            interest,
            Locked {
                state: state.clone(),
                apply,
            },
        );
        Folded::run(log, fold, state)
    }
}

impl<S: Send + Sync + 'static> Folded<S> {
    /// Runs `fold` (whose state `state` is) over every events partition from offset 0, then
    /// following the log, in a task of its own.
    pub fn run<F>(log: &Arc<dyn EventLog>, fold: F, state: Arc<RwLock<S>>) -> Self
    where
        F: Fold<Error = LogError> + 'static,
    {
        let mut consumer = Consumer::new(fold);
        // Every partition at 0 until the fold moves: nothing is reached before it is read.
        let start: Vec<(Partition, Offset)> = log
            .layout()
            .topic_partitions(Topic::Events)
            .map(|p| (p, 0))
            .collect();
        consumer.set_positions(&start);
        let at = consumer.applied();
        let log = log.clone();
        tokio::spawn(async move {
            let name = consumer.fold().name();
            if let Err(e) = consumer
                .follow(&*log, Topic::Events, std::future::pending())
                .await
            {
                tracing::info!(consumer = name, error = %e, "read-model fold stopped");
            }
        });
        Folded { state, at }
    }

    /// Reads the state.
    pub fn read<R>(&self, f: impl FnOnce(&S) -> R) -> Result<R, Status> {
        let s = self
            .state
            .read()
            .map_err(|_| Status::internal("read-model lock poisoned"))?;
        Ok(f(&s))
    }

    /// Waits until the fold has passed `mark` (partitions it does not follow, such as the logs
    /// topic's, are ignored).
    pub async fn wait(&self, mark: &Mark) -> Result<(), Status> {
        let mut rx = self.at.clone();
        let ok = tokio::time::timeout(
            Duration::from_secs(5),
            rx.wait_for(|at| mark.reached_by(&at.next)),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        if ok {
            Ok(())
        } else {
            Err(Status::unavailable(
                "a read model is lagging behind the log; retry",
            ))
        }
    }
}

#[derive(Clone)]
pub struct ApiState {
    pub log: Arc<dyn EventLog>,
    pub store: BuildsStore,
    pub mirrors: tributary_repo::Mirrors,
    pub directory: Folded<Directory>,
    pub cluster: Folded<ClusterState>,
    /// Where each build starts on the log (readers of one build start there).
    pub starts: crate::starts::Starts,
    /// Seals secrets at rest (webhook secrets); None = secrets refused.
    pub server_key: Option<crate::seal::ServerKey>,
    /// Open log tails and event watches (a metric).
    pub tail_subscribers: Arc<std::sync::atomic::AtomicUsize>,
    /// Where artifacts are (None: artifact downloads are refused).
    pub objects: Option<tributary_objects::Objects>,
    /// Each project's cache size limit in bytes (0 = none), handed to agents in leases.
    pub cache_limit_bytes: u64,
    /// How far the builds read model (`store`) has applied the log, as it moves.
    pub model: ReadModelPositions,
}

/// How long a read waits for the builds read model to apply what it must see.
pub const READ_MODEL_WAIT: Duration = Duration::from_secs(5);

/// Counts one open tail while alive.
pub struct TailGuard(Arc<std::sync::atomic::AtomicUsize>);

impl TailGuard {
    pub fn new(state: &ApiState) -> Self {
        state
            .tail_subscribers
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        TailGuard(state.tail_subscribers.clone())
    }
}

impl Drop for TailGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl ApiState {
    /// Folds the directory and the cluster state from the log (offset 0), keeps them
    /// following it, and returns once they have caught up.
    pub async fn start(
        log: Arc<dyn EventLog>,
        store: BuildsStore,
        mirrors: tributary_repo::Mirrors,
        server_key: Option<crate::seal::ServerKey>,
    ) -> Result<ApiState, tributary_eventlog::LogError> {
        // Neither fold reads a job's output (chunks, steps, lines, ticks): skipped undecoded.
        let directory = Folded::start(
            &log,
            "api-directory",
            Interest::except(&JOB_OUTPUT),
            |d: &mut Directory, _, env| d.apply(env),
        );
        let cluster = Folded::start(
            &log,
            "api-cluster",
            Interest::except(&JOB_OUTPUT),
            |c: &mut ClusterState, offset, env| c.apply(offset, env),
        );
        let starts = crate::starts::Starts::start(&log);
        let model = ReadModelPositions::of_store(&store, log.layout().events)
            .await
            .map_err(|e| {
                tributary_eventlog::LogError::Invalid(format!(
                    "cannot read how far the builds read model is: {e}"
                ))
            })?;
        let state = ApiState {
            log,
            store,
            mirrors,
            directory,
            cluster,
            starts,
            server_key,
            tail_subscribers: Arc::default(),
            objects: None,
            cache_limit_bytes: 0,
            model,
        };
        let end = Mark(
            state
                .log
                .end_offsets()
                .await?
                .into_iter()
                .enumerate()
                .map(|(p, o)| (p as Partition, o))
                .collect(),
        );
        let _ = state.directory.wait(&end).await;
        let _ = state.cluster.wait(&end).await;
        let _ = state.starts.wait(&end).await;
        Ok(state)
    }

    /// Where build `id` starts on the log, if it is there (see [`crate::starts`]).
    pub async fn build_start(&self, id: &str) -> Result<Option<crate::starts::Start>, Status> {
        if id.is_empty() {
            return Ok(None);
        }
        if let Some(start) = self.starts.lookup(id)? {
            return Ok(Some(start));
        }
        // Maybe appended but not folded yet: wait for the index to reach the log's end now.
        let end = self.log_end().await?;
        self.starts.wait(&end).await?;
        self.starts.lookup(id)
    }

    /// The same state serving artifacts from `objects`.
    pub fn with_objects(mut self, objects: tributary_objects::Objects) -> Self {
        self.objects = Some(objects);
        self
    }

    /// The same state with a per-project cache size limit (bytes, 0 = none).
    pub fn with_cache_limit(mut self, bytes: u64) -> Self {
        self.cache_limit_bytes = bytes;
        self
    }

    /// Reads the directory.
    pub fn directory<R>(&self, f: impl FnOnce(&Directory) -> R) -> Result<R, Status> {
        self.directory.read(f)
    }

    /// Waits until the directory has folded past `mark`.
    pub async fn wait_directory(&self, mark: &Mark) -> Result<(), Status> {
        self.directory.wait(mark).await
    }

    /// The end of every partition of the log now: a mark past everything appended so far.
    pub async fn log_end(&self) -> Result<Mark, Status> {
        let ends = self.log.end_offsets().await.map_err(internal)?;
        Ok(Mark(
            ends.into_iter()
                .enumerate()
                .map(|(p, o)| (p as Partition, o))
                .collect(),
        ))
    }

    /// Just past `events`, appended at `offsets`.
    pub fn mark_after(&self, events: &[Envelope], offsets: &[Offset]) -> Mark {
        Mark::after_append(self.log.layout(), events, offsets)
    }

    /// Waits (at most [`READ_MODEL_WAIT`]) until the builds read model has applied everything
    /// before `mark` in every events partition (a partition it has not applied is at 0), on its
    /// position watch ([`ReadModelPositions`]): no query per waiting request.
    pub async fn wait_builds(&self, mark: &Mark) -> Result<(), Status> {
        self.model
            .wait(&mark.0, READ_MODEL_WAIT)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))
    }

    /// The same state with the positions of the projector that writes its read model (in this
    /// process: `tributary up`). Default: read from the store ([`ReadModelPositions::of_store`]).
    pub fn with_read_model(mut self, model: ReadModelPositions) -> Self {
        self.model = model;
        self
    }

    /// Appends and returns the offsets; a storage failure is UNAVAILABLE (retry).
    pub async fn append(&self, events: &[Envelope]) -> Result<Vec<u64>, Status> {
        self.log
            .append(events)
            .await
            .map_err(|e| Status::unavailable(format!("cannot append to the log: {e}")))
    }
}

pub fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

/// A directory-level event (no build).
pub fn directory_event(tenant: &str, payload: Payload) -> Envelope {
    Envelope::new(tenant, "", "", payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tributary_proto::events::{JobQueued, LogChunk};

    #[test]
    fn a_mark_after_an_append_is_one_past_the_last_offset_of_each_partition() {
        let layout = Layout { events: 4, logs: 2 };
        let build = tributary_proto::new_id();
        let queued = |job: &str| {
            Envelope::new(
                "t",
                "p",
                &build,
                Payload::JobQueued(JobQueued {
                    job: job.into(),
                    attempt: 1,
                }),
            )
        };
        let chunk = Envelope::new("t", "p", &build, Payload::LogChunk(LogChunk::default()));
        let events = [queued("a"), chunk, queued("b")];
        let mark = Mark::after_append(layout, &events, &[7, 3, 9]);
        let e = layout.partition_for(Topic::Events, &build);
        let l = layout.partition_for(Topic::Logs, &build);
        assert_ne!(e, l);
        let mut want = vec![(e, 10), (l, 4)];
        want.sort();
        assert_eq!(mark, Mark(want));
        // On one partition: one offset past the last.
        let single = Mark::after_append(Layout::SINGLE, &events, &[7, 8, 9]);
        assert_eq!(single, Mark(vec![(0, 10)]));
    }

    #[test]
    fn a_mark_is_reached_in_every_followed_partition_and_ignores_the_others() {
        let mark = Mark(vec![(0, 5), (1, 2), (4, 100)]);
        let at = |ps: &[(Partition, Offset)]| ps.iter().copied().collect::<BTreeMap<_, _>>();
        assert!(mark.reached_by(&at(&[(0, 5), (1, 2)])));
        assert!(!mark.reached_by(&at(&[(0, 4), (1, 2)])));
        assert!(!mark.reached_by(&at(&[(0, 5), (1, 1)])));
        assert!(Mark::default().reached_by(&at(&[(0, 0)])));
    }
}
