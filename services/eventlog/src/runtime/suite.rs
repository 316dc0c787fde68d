//! The runtime's suite: what [`Consumer`] does on every backend, run by the SQLite tests and
//! against the real Kafka broker (`services/eventlog/tests/runtime.rs`), like the log's own
//! [`conformance`](crate::conformance) suite. Each check takes a fresh, empty log and panics
//! saying what broke.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tributary_proto::events::envelope::Payload;
use tributary_proto::events::Envelope;

use super::{wait_applied, Advance, Consumer, Fold, Interest, Position, SeenIds};
use crate::conformance::{state_event, test_event};
use crate::{EventLog, LogError, Offset, Partition, Topic};

/// How long a wait for the consumer may take before a check fails as stalled.
const STALL: Duration = Duration::from_secs(60);

/// `JobQueued`'s payload field number: what the suite's fold wants.
const JOB_QUEUED: u32 = 13;

/// What a [`Recorder`] keeps, shared with the check (its "database").
#[derive(Default)]
pub struct Book {
    /// Every event committed: its position and id, in the order applied.
    pub committed: Vec<(Position, String)>,
    /// Applied but not committed yet.
    pending: Vec<(Position, String)>,
    /// The next offsets stored with the rows.
    pub stored: BTreeMap<Partition, Offset>,
    /// Fail the next commit (a database that went away).
    pub fail_next_commit: bool,
    /// Non-`JobQueued` payloads applied (the interest must keep them away).
    pub unwanted: usize,
}

/// A fold that records what it applies and stores its positions with it.
#[derive(Clone, Default)]
pub struct Recorder(pub Arc<Mutex<Book>>);

impl Recorder {
    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        match self.0.lock() {
            Ok(book) => book,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

impl Fold for Recorder {
    type Error = LogError;

    fn name(&self) -> &'static str {
        "runtime-suite"
    }

    fn interest(&self) -> Interest {
        Interest::of(&[JOB_QUEUED])
    }

    async fn start(
        &mut self,
        partitions: &[Partition],
    ) -> Result<Vec<(Partition, Offset)>, LogError> {
        let book = self.book();
        Ok(partitions
            .iter()
            .filter_map(|p| book.stored.get(p).map(|o| (*p, *o)))
            .collect())
    }

    async fn apply(&mut self, at: Position, env: Envelope) -> Result<(), LogError> {
        let mut book = self.book();
        if !matches!(env.payload, Some(Payload::JobQueued(_))) {
            book.unwanted += 1;
        }
        book.pending.push((at, env.event_id));
        Ok(())
    }

    async fn commit(&mut self, advances: &[Advance]) -> Result<(), LogError> {
        let mut book = self.book();
        if std::mem::take(&mut book.fail_next_commit) {
            book.pending.clear();
            return Err(LogError::Invalid(
                "the suite's database failed a commit".into(),
            ));
        }
        for a in advances {
            let stored = book.stored.get(&a.partition).copied().unwrap_or(0);
            assert_eq!(
                stored, a.from,
                "partition {}: a batch advanced from {} but the store is at {stored}",
                a.partition, a.from
            );
            book.stored.insert(a.partition, a.to);
        }
        let pending = std::mem::take(&mut book.pending);
        book.committed.extend(pending);
        Ok(())
    }
}

/// Runs every check, each on a fresh log from `make`.
pub async fn run_all<M, Fut>(make: M)
where
    M: Fn() -> Fut,
    Fut: std::future::Future<Output = Arc<dyn EventLog>>,
{
    catch_up_applies_each_wanted_event_once(make().await).await;
    follow_publishes_what_it_applied(make().await).await;
    starts_from_the_store_and_reapplies_a_failed_batch(make().await).await;
    group_member_starts_from_its_store(make().await).await;
}

fn events_partitions(log: &dyn EventLog) -> Vec<Partition> {
    log.layout().topic_partitions(Topic::Events).collect()
}

/// Appends `n` state events over 7 builds and the same number of log chunks; returns the
/// state events.
async fn append_mixed(log: &dyn EventLog, tag: &str, n: u64) -> Vec<Envelope> {
    let state: Vec<Envelope> = (0..n)
        .map(|i| state_event(&format!("{tag}-{}", i % 7), i))
        .collect();
    let chunks: Vec<Envelope> = (0..n)
        .map(|i| test_event(&format!("{tag}-{}", i % 7), i))
        .collect();
    let mut all = Vec::new();
    for (s, c) in state.iter().zip(&chunks) {
        all.push(s.clone());
        all.push(c.clone());
    }
    log.append(&all).await.expect("append");
    state
}

fn ids(events: &[Envelope]) -> BTreeSet<String> {
    events.iter().map(|e| e.event_id.clone()).collect()
}

/// Asserts `committed` holds each of `want` exactly once, and each partition in offset order.
fn assert_once(committed: &[(Position, String)], want: &BTreeSet<String>, what: &str) {
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
    let mut last: BTreeMap<Partition, Offset> = BTreeMap::new();
    for (at, id) in committed {
        *count.entry(id.as_str()).or_default() += 1;
        if let Some(before) = last.insert(at.partition, at.offset) {
            assert!(
                before < at.offset,
                "{what}: partition {} applied offset {} after {before}",
                at.partition,
                at.offset
            );
        }
    }
    let twice: Vec<_> = count.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "{what}: applied more than once: {twice:?}"
    );
    let got: BTreeSet<String> = count.keys().map(|id| (*id).to_owned()).collect();
    let missing: Vec<_> = want.difference(&got).collect();
    assert!(missing.is_empty(), "{what}: never applied: {missing:?}");
    let extra: Vec<_> = got.difference(want).collect();
    assert!(
        extra.is_empty(),
        "{what}: applied events it should not have: {extra:?}"
    );
}

/// Waits until `consumer`'s watch says every events partition reached its end now.
async fn wait_for_ends(
    log: &dyn EventLog,
    applied: &mut tokio::sync::watch::Receiver<super::Applied>,
    what: &str,
) {
    let ends = log.end_offsets().await.expect("end offsets");
    for p in events_partitions(log) {
        let end = ends.get(p as usize).copied().unwrap_or(0);
        if end == 0 {
            continue;
        }
        let at = Position {
            partition: p,
            offset: end - 1,
        };
        if let Err(e) = wait_applied(applied, at, STALL).await {
            panic!("{what}: {e}");
        }
    }
}

/// A catch-up (replay's way: from 0, every id remembered) applies every wanted event once, in
/// each partition's order: re-appended events (stored twice where the log does not dedupe)
/// once, log chunks not at all (not wanted), a garbage record skipped and counted; its watch
/// ends at the log's ends.
pub async fn catch_up_applies_each_wanted_event_once(log: Arc<dyn EventLog>) {
    let state = append_mixed(&*log, "c", 40).await;
    log.append(&state[..5]).await.expect("re-append");
    let garbage = match log.append_raw("c-0", vec![0xff, 0xff, 0xff]).await {
        Ok(_) => 1,
        Err(LogError::Unsupported(_)) => 0,
        Err(e) => panic!("append_raw: {e}"),
    };
    let book = Recorder::default();
    let mut consumer = Consumer::with_seen(book.clone(), SeenIds::unbounded()).page(16);
    consumer
        .catch_up(&*log, events_partitions(&*log))
        .await
        .expect("catch up");
    {
        let b = book.book();
        assert_once(&b.committed, &ids(&state), "catch-up");
        assert_eq!(b.unwanted, 0, "events the fold did not want were applied");
    }
    let skipped = consumer.skipped();
    assert_eq!(skipped.malformed, garbage, "the garbage record is skipped");
    let duplicates = if log.capabilities().dedupes_event_ids {
        0
    } else {
        5
    };
    assert_eq!(skipped.duplicates, duplicates, "re-appended events skipped");
    let ends = log.end_offsets().await.expect("ends");
    let applied = consumer.applied().borrow().clone();
    for p in events_partitions(&*log) {
        assert_eq!(
            applied.next.get(&p).copied(),
            Some(ends[p as usize]),
            "partition {p}: the watch must end at the partition's end"
        );
    }
    assert!(applied.reached_ends(&ends));
}

/// Following: a write is applied and the watch says so (the wait returns); a position never
/// written is not, and the wait's error says how far the consumer got.
pub async fn follow_publishes_what_it_applied(log: Arc<dyn EventLog>) {
    let before = append_mixed(&*log, "f", 10).await;
    let book = Recorder::default();
    let mut consumer = Consumer::new(book.clone());
    let mut applied = consumer.applied();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let follower = {
        let log = log.clone();
        tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            consumer.follow(&*log, Topic::Events, shutdown).await
        })
    };
    let after = append_mixed(&*log, "f", 10).await;
    let one = state_event("f-own", 99);
    let at = log
        .append(std::slice::from_ref(&one))
        .await
        .expect("append")[0];
    let own = Position {
        partition: log.layout().partition_of(&one),
        offset: at,
    };
    if let Err(e) = wait_applied(&mut applied, own, STALL).await {
        panic!("follow: its own write was not applied: {e}");
    }
    assert!(
        book.book()
            .committed
            .iter()
            .any(|(p, id)| *p == own && *id == one.event_id),
        "the watch said applied before the fold had it"
    );
    let never = Position {
        partition: own.partition,
        offset: at + 1_000,
    };
    let e = wait_applied(&mut applied, never, Duration::from_millis(200))
        .await
        .expect_err("a position never written is never applied");
    assert!(
        e.to_string().contains("retry in a moment"),
        "the error explains: {e}"
    );
    wait_for_ends(&*log, &mut applied, "follow").await;
    let _ = stop.send(());
    follower
        .await
        .expect("the follower task")
        .expect("follow ends cleanly at shutdown");
    let mut want = ids(&before);
    want.extend(ids(&after));
    want.insert(one.event_id.clone());
    assert_once(&book.book().committed, &want, "follow");
}

/// A consumer starts each partition where its store says; a batch whose commit fails moves
/// nothing and is applied again (not skipped as a duplicate) on the next try.
pub async fn starts_from_the_store_and_reapplies_a_failed_batch(log: Arc<dyn EventLog>) {
    append_mixed(&*log, "s", 20).await;
    let middle = log.end_offsets().await.expect("ends");
    let late = append_mixed(&*log, "s", 20).await;
    let book = Recorder::default();
    let partitions = events_partitions(&*log);
    book.book().stored = partitions
        .iter()
        .map(|p| (*p, middle[*p as usize]))
        .collect();
    let mut consumer = Consumer::new(book.clone());
    consumer.start(&partitions).await.expect("start");
    consumer
        .catch_up(&*log, partitions.clone())
        .await
        .expect("catch up");
    assert_once(
        &book.book().committed,
        &ids(&late),
        "from the stored positions",
    );

    let third = append_mixed(&*log, "s", 5).await;
    book.book().fail_next_commit = true;
    let before = consumer.positions().clone();
    consumer
        .catch_up(&*log, partitions.clone())
        .await
        .expect_err("the commit failed");
    assert_eq!(
        consumer.positions(),
        &before,
        "a failed commit must not move the positions"
    );
    consumer.catch_up(&*log, partitions).await.expect("retry");
    let mut want = ids(&late);
    want.extend(ids(&third));
    assert_once(
        &book.book().committed,
        &want,
        "a failed batch applied again",
    );
}

/// A group member applies its partitions and leaves; the next member starts where the
/// consumer's store says, not where the group committed: here the store was reset to 0, so
/// it applies everything again.
pub async fn group_member_starts_from_its_store(log: Arc<dyn EventLog>) {
    let first = append_mixed(&*log, "g", 20).await;
    let book = Recorder::default();
    let run = |book: Recorder| {
        let log = log.clone();
        let mut consumer = Consumer::new(book);
        let applied = consumer.applied();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            consumer
                .run_group(&*log, "runtime-suite", Topic::Events, shutdown)
                .await
        });
        (applied, stop, task)
    };
    let (mut applied, stop, task) = run(book.clone());
    wait_for_ends(&*log, &mut applied, "first member").await;
    let _ = stop.send(());
    task.await.expect("task").expect("first member");
    assert_once(&book.book().committed, &ids(&first), "first member");

    let second = append_mixed(&*log, "g", 10).await;
    let again = Recorder::default();
    let (mut applied, stop, task) = run(again.clone());
    wait_for_ends(&*log, &mut applied, "second member").await;
    let _ = stop.send(());
    task.await.expect("task").expect("second member");
    let mut all = ids(&first);
    all.extend(ids(&second));
    assert_once(
        &again.book().committed,
        &all,
        "a member with an empty store reads from 0",
    );
}
