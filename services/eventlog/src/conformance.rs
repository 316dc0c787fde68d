//! The conformance suite: the behaviour every [`EventLog`] backend must have.
//!
//! A backend's tests call [`run_all`] with a factory returning a fresh, empty log (or call the
//! individual checks, one test each), plus [`reopen_keeps_events_and_offsets`] with a factory that
//! reopens the same storage. Every check panics with a message saying which invariant broke.
//!
//! The checks are written against the partitioned API and a model of the log (which events each
//! partition should hold, from [`Layout::partition_of`]), so they hold for one partition (SQLite)
//! and for many (Kafka: an events topic and a logs topic, several partitions each). Where the
//! backends' semantics truly differ, the check branches on [`Capabilities`] and says so:
//! [`idempotent_reappend`] and [`reopen_keeps_events_and_offsets`] (append-side de-duplication).
//! [`single_partition_methods`] checks that the single-partition methods equal partition 0 on a
//! one-partition log and refuse to run on a partitioned one.
//!
//! Requirements on the factory: each call returns a new, empty log, and the returned `Arc` is the
//! only handle to it ([`subscription_closed_when_log_dropped`] drops it and expects subscriptions
//! to end). The checks spawn tokio tasks, so they need a tokio runtime; a multi-threaded one
//! exercises more interleavings.
//!
//! Randomised checks print their seed on failure; set `EVENTLOG_CONFORMANCE_SEED` to replay one.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tributary_proto::events::envelope::Payload;
use tributary_proto::events::{Envelope, JobQueued, LogChunk, Stream};

use crate::{EventLog, Layout, LogError, Offset, Partition, Record, Subscription, Topic};

pub mod groups;
pub use groups::{group_member_commits_and_resumes, group_members_split_and_hand_over};

/// How long any single wait for the log may take before a check fails as stalled.
const STALL: Duration = Duration::from_secs(30);

/// Runs every check, each on a fresh log from `make`.
pub async fn run_all<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn EventLog>>,
{
    append_then_read(make().await).await;
    empty_append_is_a_no_op(make().await).await;
    read_from_middle_and_past_end(make().await).await;
    read_key_returns_only_that_key_in_order(make().await).await;
    topics_route_by_payload(make().await).await;
    subscribe_from_zero_sees_all(make().await).await;
    subscribe_mid_stream_catches_up_then_follows(make().await).await;
    subscriber_waits_for_appends(make().await).await;
    concurrent_appenders_and_subscribers(make().await).await;
    committed_offsets_are_per_group(make().await).await;
    idempotent_reappend(make().await).await;
    malformed_record_is_readable(make().await).await;
    single_partition_methods(make().await).await;
    subscription_closed_when_log_dropped(make().await).await;
    group_member_commits_and_resumes(make().await).await;
    group_members_split_and_hand_over(make().await).await;
}

/// A recognisable log chunk of build `key` whose byte offset field is `seq` (the logs topic).
pub fn test_event(key: &str, seq: u64) -> Envelope {
    Envelope::new(
        "conformance",
        "suite",
        key,
        Payload::LogChunk(LogChunk {
            job: "job".into(),
            attempt: 1,
            step: 0,
            line: 0,
            stream: Stream::Stdout as i32,
            data: format!("{key} line {seq}\n").into_bytes(),
            offset: seq,
            truncated: false,
        }),
    )
}

/// A recognisable state event of build `key` (the events topic): job `job-<seq>` queued.
pub fn state_event(key: &str, seq: u64) -> Envelope {
    Envelope::new(
        "conformance",
        "suite",
        key,
        Payload::JobQueued(JobQueued {
            job: format!("job-{seq}"),
            attempt: 1,
        }),
    )
}

/// [`test_event`] for even `seq`, [`state_event`] for odd: both topics.
pub fn mixed_event(key: &str, seq: u64) -> Envelope {
    if seq % 2 == 1 {
        state_event(key, seq)
    } else {
        test_event(key, seq)
    }
}

/// What the log should hold: per partition, the events appended to it, in order.
#[derive(Clone, Debug)]
pub struct Model {
    pub layout: Layout,
    pub partitions: Vec<Vec<Envelope>>,
}

impl Model {
    pub fn new(layout: Layout) -> Self {
        Model {
            layout,
            partitions: vec![Vec::new(); layout.partitions() as usize],
        }
    }

    /// Records an append of `events` (fresh ones) and returns the offsets they must get.
    pub fn append(&mut self, events: &[Envelope]) -> Vec<Offset> {
        events
            .iter()
            .map(|event| {
                let part = &mut self.partitions[self.layout.partition_of(event) as usize];
                part.push(event.clone());
                part.len() as Offset - 1
            })
            .collect()
    }

    /// The end offset of every partition.
    pub fn ends(&self) -> Vec<Offset> {
        self.partitions.iter().map(|p| p.len() as Offset).collect()
    }
}

/// Every partition of `log` at offset 0.
pub fn from_zero(layout: Layout) -> Vec<(Partition, Offset)> {
    layout.all().map(|p| (p, 0)).collect()
}

/// Reads a whole partition, in pages of `page`.
pub async fn read_all(log: &dyn EventLog, partition: Partition, page: usize) -> Vec<Record> {
    let mut records: Vec<Record> = Vec::new();
    loop {
        let from = records.last().map_or(0, |r| r.offset + 1);
        let batch = log
            .read_partition(partition, from, page)
            .await
            .expect("read_partition");
        assert!(
            batch.len() <= page,
            "read_partition(_, _, {page}) returned {} records",
            batch.len()
        );
        if batch.is_empty() {
            return records;
        }
        records.extend(batch);
    }
}

/// Checks every partition of `log` against `model`, with full and paged reads and end offsets.
async fn assert_log_is(log: &dyn EventLog, model: &Model, what: &str) {
    assert_eq!(
        log.end_offsets().await.expect("end_offsets"),
        model.ends(),
        "{what}: end offsets"
    );
    for partition in model.layout.all() {
        let expected = &model.partitions[partition as usize];
        let records = read_all(log, partition, usize::MAX).await;
        assert_records_are(&records, partition, 0, expected, &format!("{what}, read"));
        let paged = read_all(log, partition, 2).await;
        assert_records_are(&paged, partition, 0, expected, &format!("{what}, paged"));
    }
}

/// Offsets are contiguous from 0 per partition in append order; what is read back is what was
/// appended, in the partition its topic and key say.
pub async fn append_then_read(log: Arc<dyn EventLog>) {
    let mut model = Model::new(log.layout());
    let mut seq = 0;
    for (batch, size) in [3u64, 1, 5, 12].into_iter().enumerate() {
        let events: Vec<Envelope> = (0..size)
            .map(|i| {
                seq += 1;
                mixed_event(&format!("build-{}", i % 4), seq)
            })
            .collect();
        let expected = model.append(&events);
        let offsets = log.append(&events).await.expect("append");
        assert_eq!(
            offsets, expected,
            "batch {batch} must get the next offsets of each event's partition, in order"
        );
    }
    assert_log_is(log.as_ref(), &model, "after 4 batches").await;
    if let Some(partition) = model.partitions.iter().position(|p| p.len() >= 4) {
        let records = log
            .read_partition(partition as Partition, 0, 4)
            .await
            .expect("read");
        assert_records_are(
            &records,
            partition as Partition,
            0,
            &model.partitions[partition][..4],
            "read_partition(_, 0, 4) must stop at max",
        );
    }
}

/// Appending nothing returns nothing and changes nothing.
pub async fn empty_append_is_a_no_op(log: Arc<dyn EventLog>) {
    let layout = log.layout();
    let zeros = vec![0; layout.partitions() as usize];
    assert_eq!(
        log.end_offsets().await.expect("end_offsets"),
        zeros,
        "a fresh log must be empty"
    );
    assert!(
        log.append(&[]).await.expect("empty append").is_empty(),
        "empty append"
    );
    assert_eq!(
        log.end_offsets().await.expect("end_offsets"),
        zeros,
        "empty append moved the end"
    );
    let offsets = log.append(&[state_event("b", 0)]).await.expect("append");
    assert_eq!(
        offsets,
        vec![0],
        "first event after an empty append must get offset 0"
    );
}

/// Reads from the middle of a partition return the rest; reads at or past the end return
/// nothing; a partition that does not exist is an error.
pub async fn read_from_middle_and_past_end(log: Arc<dyn EventLog>) {
    let layout = log.layout();
    let events: Vec<Envelope> = (0..10).map(|i| state_event("b", i)).collect();
    let p = layout.partition_for(Topic::Events, "b");
    log.append(&events).await.expect("append");

    let records = log.read_partition(p, 4, 3).await.expect("read");
    assert_records_are(&records, p, 4, &events[4..7], "read(4, 3)");
    let records = log.read_partition(p, 7, 100).await.expect("read");
    assert_records_are(&records, p, 7, &events[7..], "read(7, 100)");
    for from in [10, 11, 1000, Offset::MAX] {
        let records = log
            .read_partition(p, from, 5)
            .await
            .expect("read past the end");
        assert!(
            records.is_empty(),
            "read({from}, 5) past the end returned {records:?}"
        );
    }
    let records = log.read_partition(p, 0, 0).await.expect("read(0, 0)");
    assert!(
        records.is_empty(),
        "read(0, 0) must return no record, got {}",
        records.len()
    );
    assert!(
        log.read_partition(layout.partitions(), 0, 5).await.is_err(),
        "reading partition {} of a log with {} must fail",
        layout.partitions(),
        layout.partitions()
    );
}

/// `read_key_in` returns only that key's records of its partition, in offset order, honouring
/// `from` and `max`.
pub async fn read_key_returns_only_that_key_in_order(log: Arc<dyn EventLog>) {
    let layout = log.layout();
    let keys = ["build-a", "build-b", "build-c"];
    let events: Vec<Envelope> = (0..40)
        .map(|i| mixed_event(keys[i % 3], i as u64))
        .collect();
    let mut model = Model::new(layout);
    for batch in events.chunks(7) {
        model.append(batch);
        log.append(batch).await.expect("append");
    }
    for topic in [Topic::Events, Topic::Logs] {
        let p = layout.partition_for(topic, "build-b");
        let expected: Vec<(Offset, &Envelope)> = model.partitions[p as usize]
            .iter()
            .enumerate()
            .filter(|(_, e)| e.build_id == "build-b")
            .map(|(i, e)| (i as Offset, e))
            .collect();
        assert!(expected.len() >= 6, "the test needs several b events");
        let check = |records: &[Record], expected: &[(Offset, &Envelope)], what: &str| {
            let what = format!("{topic:?}: {what}");
            assert_eq!(records.len(), expected.len(), "{what}: number of records");
            for (record, (offset, event)) in records.iter().zip(expected) {
                assert_eq!(record.key, "build-b", "{what}: record of another key");
                assert_eq!(record.partition, p, "{what}: partition");
                assert_eq!(
                    record.offset, *offset,
                    "{what}: offsets out of order or wrong"
                );
                assert_eq!(
                    &record.decode().expect("decode"),
                    *event,
                    "{what}: wrong event"
                );
            }
        };
        let read = |from, max| {
            let log = log.clone();
            async move {
                log.read_key_in(topic, "build-b", from, max)
                    .await
                    .expect("read_key_in")
            }
        };
        check(&read(0, 100).await, &expected, "read_key(b, 0, 100)");
        let from = expected[4].0;
        check(
            &read(from, 100).await,
            &expected[4..],
            "read_key(b, middle, 100)",
        );
        check(
            &read(expected[3].0 + 1, 100).await,
            &expected[4..],
            "read_key(b, between two b records, 100)",
        );
        check(&read(0, 3).await, &expected[..3], "read_key(b, 0, 3)");
        check(&read(1000, 10).await, &[], "read_key(b, end, 10)");
        let records = log
            .read_key_in(topic, "no-such-build", 0, 10)
            .await
            .expect("read_key_in");
        assert!(
            records.is_empty(),
            "read_key of an unknown key returned records"
        );
    }
}

/// Log chunks go to the logs topic's partitions, other events to the events topic's; a build's
/// events of one topic share a partition.
pub async fn topics_route_by_payload(log: Arc<dyn EventLog>) {
    let layout = log.layout();
    let chunk = test_event("build-r", 0);
    let state = state_event("build-r", 1);
    log.append(&[chunk.clone(), state.clone()])
        .await
        .expect("append");
    let chunk_p = layout.partition_for(Topic::Logs, "build-r");
    let state_p = layout.partition_for(Topic::Events, "build-r");
    assert!(layout.topic_partitions(Topic::Logs).contains(&chunk_p));
    assert!(layout.topic_partitions(Topic::Events).contains(&state_p));
    if layout.logs > 0 {
        assert_ne!(chunk_p, state_p, "a split layout keeps chunks apart");
    }
    let find = |records: Vec<Record>, event: &Envelope| {
        records
            .iter()
            .any(|r| r.decode().ok().as_ref() == Some(event))
    };
    assert!(
        find(read_all(log.as_ref(), chunk_p, 100).await, &chunk),
        "the chunk is not in partition {chunk_p} ({layout:?})"
    );
    assert!(
        find(read_all(log.as_ref(), state_p, 100).await, &state),
        "the state event is not in partition {state_p} ({layout:?})"
    );
}

/// A subscription to every partition from 0 yields everything, then follows new appends; one
/// made on an empty log too.
pub async fn subscribe_from_zero_sees_all(log: Arc<dyn EventLog>) {
    let layout = log.layout();
    let mut early = log.subscribe_partitions(&from_zero(layout));
    assert_eq!(
        early.positions(),
        from_zero(layout),
        "positions of a new subscription"
    );
    let mut model = Model::new(layout);
    for batch in 0..5u64 {
        let batch: Vec<Envelope> = (0..6)
            .map(|i| mixed_event(&format!("b{}", i % 3), batch * 6 + i))
            .collect();
        model.append(&batch);
        log.append(&batch).await.expect("append");
    }
    for (name, sub) in [
        ("made before the appends", &mut early),
        (
            "made after",
            &mut log.subscribe_partitions(&from_zero(layout)),
        ),
    ] {
        let records = collect_partitions(sub.as_mut(), &model.ends(), name).await;
        assert_subscribed(&records, &model, &from_zero(layout), name);
    }
    let mut sub = log.subscribe_partitions(&from_zero(layout));
    collect_partitions(sub.as_mut(), &model.ends(), "second catch-up").await;
    let before = model.ends();
    let more: Vec<Envelope> = (30..36).map(|i| mixed_event("b1", i)).collect();
    model.append(&more);
    log.append(&more).await.expect("append");
    let records = collect_partitions(sub.as_mut(), &model.ends(), "following").await;
    let starts: Vec<(Partition, Offset)> = layout.all().zip(before).collect();
    assert_subscribed(&records, &model, &starts, "live records after catching up");
}

/// A subscriber starting mid-stream while appends go on sees each record from its start once:
/// no gap between catching up and following, no duplicate.
pub async fn subscribe_mid_stream_catches_up_then_follows(log: Arc<dyn EventLog>) {
    let layout = log.layout();
    let events: Vec<Envelope> = (0..120)
        .map(|i| mixed_event(&format!("b{}", i % 4), i))
        .collect();
    let mut model = Model::new(layout);
    model.append(&events[..50]);
    log.append(&events[..50]).await.expect("append");
    let starts: Vec<(Partition, Offset)> = layout
        .all()
        .map(|p| (p, (model.partitions[p as usize].len() as Offset) / 2))
        .collect();
    let mut sub = log.subscribe_partitions(&starts);
    assert_eq!(sub.positions(), starts, "positions of a new subscription");
    let appender = {
        let log = log.clone();
        let rest = events[50..].to_vec();
        tokio::spawn(async move {
            for batch in rest.chunks(3) {
                log.append(batch).await.expect("append");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    model.append(&events[50..]);
    let records = collect_partitions(sub.as_mut(), &model.ends(), "mid-stream subscriber").await;
    appender.await.expect("appender task");
    assert_subscribed(&records, &model, &starts, "mid-stream subscription");
}

/// A caught-up subscriber waits, and wakes up for the next append.
pub async fn subscriber_waits_for_appends(log: Arc<dyn EventLog>) {
    let layout = log.layout();
    let p = layout.partition_for(Topic::Events, "b");
    let events: Vec<Envelope> = (0..4).map(|i| state_event("b", i)).collect();
    log.append(&events[..3]).await.expect("append");
    let mut sub = log.subscribe_partitions(&[(p, 3)]);
    let waiter = tokio::spawn(async move {
        let batch = sub.next_batch().await;
        (batch, sub.positions())
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        !waiter.is_finished(),
        "a caught-up subscription returned without a new append"
    );
    log.append(&events[3..]).await.expect("append");
    let (batch, positions) = tokio::time::timeout(STALL, waiter)
        .await
        .expect("a waiting subscriber did not wake up after an append")
        .expect("subscriber task");
    let batch = batch.expect("next_batch");
    assert_records_are(
        &batch,
        p,
        3,
        &events[3..],
        "record that woke the subscriber",
    );
    assert_eq!(positions, vec![(p, 4)], "position after the woken batch");
}

/// Many appenders and many subscribers at once: every subscriber, started at a random moment
/// and offsets, sees every record from its start exactly once in offset order per partition;
/// each appender's events appear in its own order, at the offsets its appends returned.
pub async fn concurrent_appenders_and_subscribers(log: Arc<dyn EventLog>) {
    const APPENDERS: u64 = 6;
    const BATCHES: usize = 25;
    const SUBSCRIBERS: usize = 6;
    let layout = log.layout();
    let (mut rng, seed) = Rng::from_env();
    let sizes: Vec<Vec<u64>> = (0..APPENDERS)
        .map(|_| (0..BATCHES).map(|_| 1 + rng.below(12)).collect())
        .collect();
    // Each appender has its own key: its events are in one partition per topic.
    let mut totals = vec![0 as Offset; layout.partitions() as usize];
    for (a, sizes) in sizes.iter().enumerate() {
        let key = format!("appender-{a}");
        for seq in 0..sizes.iter().sum::<u64>() {
            totals[layout.partition_of(&mixed_event(&key, seq)) as usize] += 1;
        }
    }

    let mut appenders = Vec::new();
    for (a, sizes) in sizes.into_iter().enumerate() {
        let log = log.clone();
        let pause = rng.below(3);
        appenders.push(tokio::spawn(async move {
            let key = format!("appender-{a}");
            let mut seq = 0;
            let mut appended = Vec::new();
            for size in sizes {
                let batch: Vec<Envelope> =
                    (seq..seq + size).map(|s| mixed_event(&key, s)).collect();
                seq += size;
                let offsets = log.append(&batch).await.expect("concurrent append");
                assert_eq!(
                    offsets.len(),
                    batch.len(),
                    "one offset per event (seed {seed})"
                );
                appended.extend(batch.into_iter().zip(offsets));
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            appended
        }));
    }
    let mut subscribers = Vec::new();
    for s in 0..SUBSCRIBERS {
        let log = log.clone();
        let delay = Duration::from_millis(rng.below(40));
        let picks: Vec<u64> = layout.all().map(|_| rng.next()).collect();
        let totals = totals.clone();
        subscribers.push(tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let ends = log.end_offsets().await.expect("end_offsets");
            let starts: Vec<(Partition, Offset)> = layout
                .all()
                .zip(ends)
                .zip(picks)
                .map(|((p, end), pick)| (p, pick % (end + 1)))
                .collect();
            let mut sub = log.subscribe_partitions(&starts);
            let what = format!("subscriber {s} from {starts:?} (seed {seed})");
            let records = collect_partitions(sub.as_mut(), &totals, &what).await;
            (starts, records)
        }));
    }

    let mut appended = Vec::new();
    for task in appenders {
        appended.push(task.await.expect("appender task"));
    }
    let mut all = Vec::new();
    let mut ids = HashSet::new();
    for p in layout.all() {
        let records = read_all(log.as_ref(), p, usize::MAX).await;
        assert_eq!(
            records.len() as Offset,
            totals[p as usize],
            "records in partition {p} (seed {seed})"
        );
        for (i, record) in records.iter().enumerate() {
            assert_eq!(
                record.offset, i as Offset,
                "offsets of partition {p} must be contiguous (seed {seed})"
            );
            let event = record.decode().expect("decode");
            assert!(
                ids.insert(event.event_id),
                "event stored twice at {p}:{} (seed {seed})",
                record.offset
            );
        }
        all.push(records);
    }
    for (a, events) in appended.iter().enumerate() {
        let mut last: BTreeMap<Partition, Offset> = BTreeMap::new();
        for (seq, (event, offset)) in events.iter().enumerate() {
            let p = layout.partition_of(event);
            let record = &all[p as usize][*offset as usize];
            assert_eq!(
                &record.decode().expect("decode"),
                event,
                "appender {a} event {seq}: the record at its returned offset {p}:{offset} is \
                 another event (seed {seed})"
            );
            if let Some(previous) = last.insert(p, *offset) {
                assert!(
                    previous < *offset,
                    "appender {a}: event {seq} at {p}:{offset} is not after its previous event \
                     in that partition ({previous}) (seed {seed})"
                );
            }
        }
    }
    for task in subscribers {
        let (starts, records) = task.await.expect("subscriber task");
        for (p, start) in starts {
            assert_eq!(
                records.get(&p).map_or(&[][..], |r| r.as_slice()),
                &all[p as usize][start as usize..],
                "a subscriber from {p}:{start} must see exactly the records after it (seed {seed})"
            );
        }
    }
}

/// Committed positions are per consumer group and per partition, and can be overwritten.
pub async fn committed_offsets_are_per_group(log: Arc<dyn EventLog>) {
    let last = log.layout().partitions() - 1;
    let committed = |group: &'static str| {
        let log = log.clone();
        async move { log.committed_partitions(group).await.expect("committed") }
    };
    assert!(committed("projector").await.is_empty(), "never committed");
    log.commit_partitions("projector", &[(0, 10)])
        .await
        .expect("commit");
    log.commit_partitions("mailer", &[(last, 3)])
        .await
        .expect("commit");
    assert_eq!(
        committed("projector").await,
        BTreeMap::from([(0, 10)]),
        "projector"
    );
    assert_eq!(
        committed("mailer").await,
        BTreeMap::from([(last, 3)]),
        "mailer"
    );
    log.commit_partitions("projector", &[(0, 12)])
        .await
        .expect("commit");
    assert_eq!(
        committed("projector").await,
        BTreeMap::from([(0, 12)]),
        "overwritten"
    );
    if last > 0 {
        log.commit_partitions("projector", &[(last, 5)])
            .await
            .expect("commit");
        assert_eq!(
            committed("projector").await,
            BTreeMap::from([(0, 12), (last, 5)]),
            "another partition added, the first kept"
        );
    }
    assert_eq!(
        committed("mailer").await,
        BTreeMap::from([(last, 3)]),
        "other group kept"
    );
    assert!(committed("other").await.is_empty(), "unknown group");
    assert!(
        log.commit_partitions("projector", &[(last + 1, 1)])
            .await
            .is_err(),
        "committing a partition that does not exist must fail"
    );
}

/// Re-appending an envelope already on the log (same `event_id`): where the backend dedupes,
/// nothing is stored and its offset is returned, also within one batch and mixed with new
/// events. Where it does not, the event is stored again after the others, and its `event_id` is
/// what lets consumers skip it.
pub async fn idempotent_reappend(log: Arc<dyn EventLog>) {
    let p = log.layout().partition_for(Topic::Events, "b");
    let e: Vec<Envelope> = (0..7).map(|i| state_event("b", i)).collect();
    assert_eq!(
        log.append(&e[0..3]).await.expect("append"),
        vec![0, 1, 2],
        "first append"
    );
    if log.capabilities().dedupes_event_ids {
        assert_eq!(
            log.append(&e[1..2]).await.expect("re-append"),
            vec![1],
            "retried event"
        );
        let mixed = [e[3].clone(), e[0].clone(), e[4].clone()];
        assert_eq!(
            log.append(&mixed).await.expect("append"),
            vec![3, 0, 4],
            "new, old, new"
        );
        let twice = [e[5].clone(), e[5].clone(), e[6].clone()];
        assert_eq!(
            log.append(&twice).await.expect("append"),
            vec![5, 5, 6],
            "same event twice"
        );
        assert_eq!(
            log.append(&e).await.expect("append"),
            (0..7).collect::<Vec<_>>(),
            "all again"
        );
        let records = read_all(log.as_ref(), p, 100).await;
        assert_records_are(&records, p, 0, &e, "log after re-appends");
    } else {
        // Without append-side de-duplication a retry is a new record.
        assert_eq!(
            log.append(&e[1..2]).await.expect("re-append"),
            vec![3],
            "a retried event is stored again, at the next offset"
        );
        let mixed = [e[3].clone(), e[0].clone()];
        assert_eq!(
            log.append(&mixed).await.expect("append"),
            vec![4, 5],
            "new, old"
        );
        let expected = [
            e[0].clone(),
            e[1].clone(),
            e[2].clone(),
            e[1].clone(),
            e[3].clone(),
            e[0].clone(),
        ];
        let records = read_all(log.as_ref(), p, 100).await;
        assert_records_are(&records, p, 0, &expected, "log after re-appends");
        let mut seen = HashSet::new();
        let unique: Vec<Envelope> = records
            .iter()
            .map(|r| r.decode().expect("decode"))
            .filter(|event| seen.insert(event.event_id.clone()))
            .collect();
        assert_eq!(unique, e[..4], "deduping by event id gives each event once");
    }
}

/// A record that is not a valid envelope is stored and read back verbatim (its decode fails), a
/// valid envelope of an event type this build does not know decodes without a payload, and the
/// records around them are intact, whether read or subscribed to.
pub async fn malformed_record_is_readable(log: Arc<dyn EventLog>) {
    let p = log.layout().partition_for(Topic::Events, "b");
    let garbage = b"\xff\xff\xff\xff\xff garbage, not protobuf".to_vec();
    assert!(
        Envelope::decode(garbage.as_slice()).is_err(),
        "test bytes must not decode"
    );
    // An envelope whose payload is field 99 (an event type from a newer build).
    let mut unknown = state_event("b", 9);
    unknown.payload = None;
    let mut unknown_bytes = unknown.encode_to_vec();
    unknown_bytes.extend_from_slice(&[0x9a, 0x06, 0x02, 0x08, 0x01]);
    let good: Vec<Envelope> = (0..2).map(|i| state_event("b", i)).collect();
    assert_eq!(
        log.append(&good[..1]).await.expect("append"),
        vec![0],
        "good record before"
    );
    let offset = log
        .append_raw("b", garbage.clone())
        .await
        .expect("append_raw");
    assert_eq!(offset, 1, "offset of the malformed record");
    assert_eq!(
        log.append_raw("b", unknown_bytes.clone())
            .await
            .expect("append_raw"),
        2,
        "offset of the unknown event"
    );
    assert_eq!(
        log.append(&good[1..]).await.expect("append"),
        vec![3],
        "good record after"
    );

    let check = |records: &[Record], what: &str| {
        assert_eq!(records.len(), 4, "{what}: all four records");
        assert_eq!(
            records[0].decode().expect("decode"),
            good[0],
            "{what}: record before"
        );
        assert_eq!(records[1].offset, 1, "{what}: malformed record offset");
        assert_eq!(
            records[1].partition, p,
            "{what}: malformed record partition"
        );
        assert_eq!(records[1].key, "b", "{what}: malformed record key");
        assert_eq!(
            records[1].data.as_ref(),
            garbage.as_slice(),
            "{what}: bytes changed"
        );
        assert!(records[1].decode().is_err(), "{what}: garbage decoded");
        let decoded = records[2].decode().expect("an unknown event type decodes");
        assert_eq!(decoded.payload, None, "{what}: unknown payload");
        assert_eq!(
            decoded.event_id, unknown.event_id,
            "{what}: unknown event's id"
        );
        assert_eq!(
            records[3].decode().expect("decode"),
            good[1],
            "{what}: record after"
        );
    };
    check(&read_all(log.as_ref(), p, 10).await, "read");
    check(
        &log.read_key_in(Topic::Events, "b", 0, 10)
            .await
            .expect("read_key"),
        "read_key",
    );
    let mut sub = log.subscribe_partitions(&[(p, 0)]);
    check(
        &collect_until(sub.as_mut(), 4, "malformed").await,
        "subscription",
    );
}

/// The single-partition methods (`read`, `end_offset`, `subscribe`, `commit`, `committed`) are
/// partition 0's on a one-partition log, and fail with [`LogError::MultiPartition`] on another.
pub async fn single_partition_methods(log: Arc<dyn EventLog>) {
    let events: Vec<Envelope> = (0..5).map(|i| mixed_event("b", i)).collect();
    log.append(&events).await.expect("append");
    if log.layout().partitions() == 1 {
        assert_eq!(log.end_offset().await.expect("end_offset"), 5, "end_offset");
        let records = log.read(1, 3).await.expect("read");
        assert_records_are(&records, 0, 1, &events[1..4], "read(1, 3)");
        let records = collect_until(log.subscribe(2).as_mut(), 5, "subscribe(2)").await;
        assert_records_are(&records, 0, 2, &events[2..], "subscribe(2)");
        log.commit("g", 4).await.expect("commit");
        assert_eq!(log.committed("g").await.expect("committed"), Some(4));
        assert_eq!(
            log.committed_partitions("g").await.expect("committed"),
            BTreeMap::from([(0, 4)])
        );
        assert_eq!(log.committed("other").await.expect("committed"), None);
    } else {
        let multi = |result: Result<(), LogError>, what: &str| match result {
            Err(LogError::MultiPartition { .. }) => {}
            other => panic!("{what} on a partitioned log must fail with MultiPartition: {other:?}"),
        };
        multi(log.read(0, 10).await.map(drop), "read");
        multi(log.end_offset().await.map(drop), "end_offset");
        multi(log.commit("g", 1).await, "commit");
        multi(log.committed("g").await.map(drop), "committed");
        let mut sub = log.subscribe(0);
        multi(
            tokio::time::timeout(STALL, sub.next_batch())
                .await
                .expect("subscribe's next_batch must fail at once")
                .map(drop),
            "subscribe",
        );
    }
}

/// Dropping the log ends its subscriptions with [`LogError::Closed`].
pub async fn subscription_closed_when_log_dropped(log: Arc<dyn EventLog>) {
    let p = log.layout().partition_for(Topic::Events, "b");
    log.append(&[state_event("b", 0)]).await.expect("append");
    let mut sub = log.subscribe_partitions(&[(p, 0)]);
    collect_until(sub.as_mut(), 1, "before drop").await;
    let mut other = log.subscribe_partitions(&[(p, 1)]);
    drop(log);
    for (name, sub) in [("caught up", &mut sub), ("never polled", &mut other)] {
        match tokio::time::timeout(STALL, sub.next_batch()).await {
            Ok(Err(LogError::Closed)) => {}
            Ok(other) => panic!("{name} subscription of a dropped log returned {other:?}"),
            Err(_) => panic!("{name} subscription of a dropped log did not end"),
        }
    }
}

/// Reopening the same storage (each call of `open`) keeps the events, their offsets, the
/// committed positions and, where the backend dedupes, the de-duplication of event ids; offsets
/// continue after the last.
pub async fn reopen_keeps_events_and_offsets<F, Fut>(open: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn EventLog>>,
{
    let events: Vec<Envelope> = (0..12)
        .map(|i| mixed_event(&format!("b{}", i % 3), i))
        .collect();
    let log = open().await;
    let layout = log.layout();
    let last = layout.partitions() - 1;
    let mut model = Model::new(layout);
    model.append(&events[..10]);
    log.append(&events[..10]).await.expect("append");
    log.commit_partitions("projector", &[(0, 4)])
        .await
        .expect("commit");
    log.commit_partitions("mailer", &[(last, 2)])
        .await
        .expect("commit");
    drop(log);

    let log = open().await;
    assert_eq!(log.layout(), layout, "layout after reopen");
    assert_log_is(log.as_ref(), &model, "after reopen").await;
    assert_eq!(
        log.committed_partitions("projector")
            .await
            .expect("committed"),
        BTreeMap::from([(0, 4)]),
        "projector"
    );
    assert_eq!(
        log.committed_partitions("mailer").await.expect("committed"),
        BTreeMap::from([(last, 2)]),
        "mailer"
    );
    if log.capabilities().dedupes_event_ids {
        let again = log.append(&events[2..4]).await.expect("re-append");
        let expected: Vec<Offset> = events[2..4]
            .iter()
            .map(|e| {
                let p = layout.partition_of(e) as usize;
                model.partitions[p]
                    .iter()
                    .position(|x| x == e)
                    .expect("in model") as Offset
            })
            .collect();
        assert_eq!(again, expected, "dedupe after reopen");
    }
    let expected = model.append(&events[10..]);
    assert_eq!(
        log.append(&events[10..]).await.expect("append"),
        expected,
        "next offsets"
    );
    let mut sub = log.subscribe_partitions(&from_zero(layout));
    let records = collect_partitions(sub.as_mut(), &model.ends(), "after reopen").await;
    assert_subscribed(
        &records,
        &model,
        &from_zero(layout),
        "subscription after reopen",
    );
}

/// Pulls batches until the subscription's position in every partition `p` it reads reaches
/// `ends[p]`, checking that it never skips nor repeats an offset of a partition. Returns the
/// records by partition. Panics (naming `what`) if the log stalls or fails.
pub async fn collect_partitions(
    sub: &mut dyn Subscription,
    ends: &[Offset],
    what: &str,
) -> BTreeMap<Partition, Vec<Record>> {
    let starts: BTreeMap<Partition, Offset> = sub.positions().into_iter().collect();
    let mut next = starts.clone();
    let mut records: BTreeMap<Partition, Vec<Record>> = BTreeMap::new();
    let behind = |next: &BTreeMap<Partition, Offset>| {
        next.iter()
            .any(|(p, n)| *n < ends.get(*p as usize).copied().unwrap_or(0))
    };
    while behind(&next) {
        let batch = match tokio::time::timeout(STALL, sub.next_batch()).await {
            Ok(Ok(batch)) => batch,
            Ok(Err(error)) => panic!("{what}: next_batch failed at {next:?}: {error}"),
            Err(_) => panic!("{what}: stalled at {next:?} waiting for {ends:?}"),
        };
        assert!(
            !batch.is_empty(),
            "{what}: next_batch returned an empty batch"
        );
        for record in batch {
            let Some(expected) = next.get_mut(&record.partition) else {
                panic!(
                    "{what}: record of partition {} which it does not subscribe to",
                    record.partition
                );
            };
            assert_eq!(
                record.offset, *expected,
                "{what}: got {}:{} where offset {expected} was due (gap or duplicate)",
                record.partition, record.offset
            );
            *expected += 1;
            records.entry(record.partition).or_default().push(record);
        }
        let positions: BTreeMap<Partition, Offset> = sub.positions().into_iter().collect();
        assert_eq!(
            positions, next,
            "{what}: positions() are not the offsets after the last records yielded"
        );
    }
    records
}

/// Checks that a subscription from `starts` yielded exactly the model's records after them.
fn assert_subscribed(
    records: &BTreeMap<Partition, Vec<Record>>,
    model: &Model,
    starts: &[(Partition, Offset)],
    what: &str,
) {
    for (p, start) in starts {
        let got = records.get(p).map_or(&[][..], |r| r.as_slice());
        assert_records_are(
            got,
            *p,
            *start,
            &model.partitions[*p as usize][*start as usize..],
            what,
        );
    }
}

/// Pulls batches until the subscription's position reaches `until`, checking that it never
/// skips nor repeats an offset. Panics (naming `what`) if the log stalls or fails.
pub async fn collect_until(sub: &mut dyn Subscription, until: Offset, what: &str) -> Vec<Record> {
    let start = sub.position();
    let mut records: Vec<Record> = Vec::new();
    while sub.position() < until {
        let batch = match tokio::time::timeout(STALL, sub.next_batch()).await {
            Ok(Ok(batch)) => batch,
            Ok(Err(error)) => panic!("{what}: next_batch failed at {}: {error}", sub.position()),
            Err(_) => panic!(
                "{what}: stalled at {} waiting for offset {until}",
                sub.position()
            ),
        };
        assert!(
            !batch.is_empty(),
            "{what}: next_batch returned an empty batch"
        );
        for record in batch {
            let expected = start + records.len() as Offset;
            assert_eq!(
                record.offset, expected,
                "{what}: got offset {} where {expected} was due (gap or duplicate)",
                record.offset
            );
            records.push(record);
        }
        assert_eq!(
            sub.position(),
            start + records.len() as Offset,
            "{what}: position() is not the offset after the last record yielded"
        );
    }
    records
}

/// Checks that `records` are `events`, in `partition` at offsets `first, first + 1, ...`.
fn assert_records_are(
    records: &[Record],
    partition: Partition,
    first: Offset,
    events: &[Envelope],
    what: &str,
) {
    assert_eq!(
        records.len(),
        events.len(),
        "{what}: number of records in partition {partition}"
    );
    for (i, (record, event)) in records.iter().zip(events).enumerate() {
        let offset = first + i as Offset;
        assert_eq!(
            record.partition, partition,
            "{what}: partition of record {i}"
        );
        assert_eq!(
            record.offset, offset,
            "{what}: offset of record {i} in partition {partition}"
        );
        assert_eq!(
            record.key,
            event.partition_key(),
            "{what}: key of {partition}:{offset}"
        );
        match record.decode() {
            Ok(decoded) => assert_eq!(&decoded, event, "{what}: event at {partition}:{offset}"),
            Err(error) => panic!("{what}: record at {partition}:{offset} does not decode: {error}"),
        }
    }
}

/// A small deterministic generator (SplitMix64), so the suite needs no `rand`.
struct Rng(u64);

impl Rng {
    /// Seeded from `EVENTLOG_CONFORMANCE_SEED` if set, else from the clock. Returns the seed.
    fn from_env() -> (Rng, u64) {
        let seed = std::env::var("EVENTLOG_CONFORMANCE_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64)
            });
        (Rng(seed), seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform-ish in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
