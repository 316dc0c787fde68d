//! How far the builds read model has applied the log, as it moves — what a read that must see
//! its own write waits on, without polling the store per request.
//!
//! Three sources, one watch channel (`partition -> next offset`, events partitions only):
//! * **In process** (`tributary up`): the projector's own [`Applied`] watch
//!   ([`crate::BuildsProjector::applied`]), moved at each commit.
//! * **PostgreSQL** (`tributary serve api` beside `serve projector` processes): the projector
//!   sends `pg_notify(`[`NOTIFY_CHANNEL`]`, "p:o,p:o")` inside each commit's transaction
//!   (PostgreSQL delivers it at commit); one `LISTEN` connection per API process merges them.
//!   After (re)connecting it reads the stored offsets once, so nothing committed while it was
//!   away is missed.
//! * **SQLite written by another process** (`serve api --data` beside `serve projector
//!   --data`): SQLite has no notifications across processes, so one task per process reads the
//!   stored offsets every [`SQLITE_POLL`], and only while some read is waiting.
//!
//! Invariant: a position only moves forward here (a notification can arrive after a fresher
//! read of the offsets); a partition not heard of is at 0, so nothing is "reached" unread.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tributary_eventlog::runtime::Applied;
use tributary_eventlog::{Offset, Partition};

use crate::store::{BuildsStore, Engine};

/// The PostgreSQL notification channel the builds projector notifies its commits on.
pub const NOTIFY_CHANNEL: &str = "tributary_builds_applied";

/// How often a waiting read re-reads a SQLite store another process writes.
pub const SQLITE_POLL: Duration = Duration::from_millis(20);

/// A place every read must have reached: per partition, the offset just past what it must see.
pub type Ends = [(Partition, Offset)];

/// The read model's applied positions, as they move (cheap to clone).
#[derive(Clone)]
pub struct ReadModelPositions {
    at: watch::Receiver<Applied>,
    /// Reads waiting now (the SQLite poller only reads while this is above 0).
    waiting: Arc<AtomicUsize>,
    /// Which partitions the read model folds (the log's events partitions).
    partitions: std::ops::Range<Partition>,
}

/// A read waited longer than its deadline for the read model to apply its mark.
#[derive(Debug, thiserror::Error)]
#[error(
    "the builds read model has not applied the log up to {wanted} after {waited:?} (it is at \
     {at}); the projector is behind or down — retry, and check `tributary serve projector` (or \
     the server's log) if it persists"
)]
pub struct Lagging {
    pub wanted: String,
    pub at: String,
    pub waited: Duration,
}

impl ReadModelPositions {
    /// The positions of a projector running in this process.
    pub fn in_process(applied: watch::Receiver<Applied>, events: u32) -> Self {
        ReadModelPositions {
            at: applied,
            waiting: Arc::default(),
            partitions: 0..events,
        }
    }

    /// The positions of a projector in another process writing `store`: notified on
    /// PostgreSQL, read while reads wait on SQLite. Runs a task until the process ends.
    pub async fn of_store(
        store: &BuildsStore,
        events: u32,
    ) -> Result<Self, crate::ProjectionError> {
        let first = store.next_offsets().await?;
        let (tx, rx) = watch::channel(Applied { next: first });
        let waiting = Arc::new(AtomicUsize::new(0));
        match (store.engine(), store.url()) {
            (Engine::Postgres, Some(url)) => {
                let url = url.to_owned();
                let store = store.clone();
                tokio::spawn(async move { listen(url, store, tx).await });
            }
            _ => {
                let store = store.clone();
                let waiting = waiting.clone();
                tokio::spawn(async move { poll_while_waited(store, tx, waiting).await });
            }
        }
        Ok(ReadModelPositions {
            at: rx,
            waiting,
            partitions: 0..events,
        })
    }

    /// Where the read model is now: the next offset of each of its partitions (0 if none yet).
    pub fn now(&self) -> Vec<(Partition, Offset)> {
        let at = self.at.borrow();
        self.partitions
            .clone()
            .map(|p| (p, at.next.get(&p).copied().unwrap_or(0)))
            .collect()
    }

    /// Whether the read model has applied everything before `ends` in each events partition
    /// (other partitions, e.g. a logs topic's, are not the read model's and are ignored).
    pub fn reached(&self, ends: &Ends) -> bool {
        reached(&self.at.borrow().next, ends, &self.partitions)
    }

    /// Waits until the read model has applied everything before `ends`, at most `deadline`.
    pub async fn wait(&self, ends: &Ends, deadline: Duration) -> Result<(), Lagging> {
        if self.reached(ends) {
            return Ok(());
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _done = Decrement(self.waiting.clone());
        let mut rx = self.at.clone();
        let partitions = self.partitions.clone();
        let result = tokio::time::timeout(
            deadline,
            rx.wait_for(|at| reached(&at.next, ends, &partitions)),
        )
        .await;
        match result {
            Ok(Ok(_)) => Ok(()),
            _ => Err(Lagging {
                wanted: describe(ends.iter().copied()),
                at: describe(self.at.borrow().next.iter().map(|(p, o)| (*p, *o))),
                waited: deadline,
            }),
        }
    }
}

struct Decrement(Arc<AtomicUsize>);

impl Drop for Decrement {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Whether `at` (next offset per partition) is at or past `ends` in every partition of `ends`
/// inside `partitions`; a partition missing from `at` is at 0. Pure.
pub fn reached(
    at: &BTreeMap<Partition, Offset>,
    ends: &Ends,
    partitions: &std::ops::Range<Partition>,
) -> bool {
    ends.iter()
        .filter(|(p, _)| partitions.contains(p))
        .all(|(p, end)| at.get(p).copied().unwrap_or(0) >= *end)
}

/// `"p:o,p:o"`, the notification payload and how errors show positions.
pub fn describe(positions: impl Iterator<Item = (Partition, Offset)>) -> String {
    positions
        .map(|(p, o)| format!("{p}:{o}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses [`describe`]'s text; None if any part is not `p:o`. Pure.
pub fn parse(text: &str) -> Option<Vec<(Partition, Offset)>> {
    if text.trim().is_empty() {
        return Some(Vec::new());
    }
    text.split(',')
        .map(|part| {
            let (p, o) = part.trim().split_once(':')?;
            Some((p.parse().ok()?, o.parse().ok()?))
        })
        .collect()
}

/// Moves `at` forward to `positions` where they are ahead; whether anything moved. Pure.
pub fn merge(at: &mut Applied, positions: impl IntoIterator<Item = (Partition, Offset)>) -> bool {
    let mut moved = false;
    for (p, o) in positions {
        let next = at.next.entry(p).or_insert(0);
        if o > *next {
            *next = o;
            moved = true;
        }
    }
    moved
}

/// Keeps `tx` at the store's positions from notifications; reconnects (re-reading the stored
/// offsets) when the connection drops.
async fn listen(url: String, store: BuildsStore, tx: watch::Sender<Applied>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match listen_once(&url, &store, &tx).await {
            Ok(()) => return, // nobody reads the positions any more
            Err(e) => {
                tracing::warn!(error = %e, "read-model notifications lost; reconnecting");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn listen_once(
    url: &str,
    store: &BuildsStore,
    tx: &watch::Sender<Applied>,
) -> Result<(), crate::ProjectionError> {
    let mut listener = sqlx::postgres::PgListener::connect(url).await?;
    listener.listen(NOTIFY_CHANNEL).await?;
    // Listening now: whatever committed before is in the table.
    let stored = store.next_offsets().await?;
    tx.send_if_modified(|at| merge(at, stored));
    loop {
        if tx.is_closed() {
            return Ok(());
        }
        // None: the connection was lost (PgListener reconnects on the next call); notifications
        // sent meanwhile are lost, so the table is read again.
        match listener.try_recv().await? {
            Some(n) => match parse(n.payload()) {
                Some(positions) => {
                    tx.send_if_modified(|at| merge(at, positions));
                }
                None => tracing::warn!(payload = n.payload(), "bad read-model notification"),
            },
            None => {
                let stored = store.next_offsets().await?;
                tx.send_if_modified(|at| merge(at, stored));
            }
        }
    }
}

/// Reads the stored offsets every [`SQLITE_POLL`] while some read waits.
async fn poll_while_waited(
    store: BuildsStore,
    tx: watch::Sender<Applied>,
    waiting: Arc<AtomicUsize>,
) {
    while !tx.is_closed() {
        tokio::time::sleep(SQLITE_POLL).await;
        if waiting.load(Ordering::SeqCst) == 0 {
            continue;
        }
        match store.next_offsets().await {
            Ok(stored) => {
                tx.send_if_modified(|at| merge(at, stored));
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the read model's offsets"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_is_reached_only_in_the_read_models_partitions_and_missing_ones_are_at_zero() {
        let at: BTreeMap<Partition, Offset> = [(0, 5), (1, 2)].into_iter().collect();
        let events = 0..3;
        assert!(reached(&at, &[(0, 5), (1, 2)], &events));
        assert!(!reached(&at, &[(0, 6)], &events));
        // Partition 2 was never heard of: at 0.
        assert!(!reached(&at, &[(2, 1)], &events));
        assert!(reached(&at, &[(2, 0)], &events));
        // Partition 7 is a logs partition: not the read model's.
        assert!(reached(&at, &[(7, 100)], &events));
        assert!(reached(&at, &[], &events));
    }

    #[test]
    fn positions_round_trip_as_text_and_bad_text_is_refused() {
        let ps = vec![(0, 12), (3, 7)];
        assert_eq!(parse(&describe(ps.iter().copied())), Some(ps));
        assert_eq!(parse(""), Some(vec![]));
        assert_eq!(parse("0:1,x:2"), None);
        assert_eq!(parse("0-1"), None);
    }

    #[test]
    fn merging_only_moves_forward() {
        let mut at = Applied::default();
        assert!(merge(&mut at, [(0, 5), (1, 3)]));
        assert!(!merge(&mut at, [(0, 4)]));
        assert!(merge(&mut at, [(0, 6)]));
        assert_eq!(at.next.get(&0), Some(&6));
        assert_eq!(at.next.get(&1), Some(&3));
    }
}
