//! The conformance suite: the behaviour every [`EventLog`] backend must have.
//!
//! A backend's tests call [`run_all`] with a factory returning a fresh, empty log (or call the
//! individual checks, one test each), plus [`reopen_keeps_events_and_offsets`] with a factory that
//! reopens the same storage. Every check panics with a message saying which invariant broke.
//!
//! Requirements on the factory: each call returns a new, empty log, and the returned `Arc` is the
//! only handle to it ([`subscription_closed_when_log_dropped`] drops it and expects subscriptions
//! to end). The checks spawn tokio tasks, so they need a tokio runtime; a multi-threaded one
//! exercises more interleavings.
//!
//! Randomised checks print their seed on failure; set `EVENTLOG_CONFORMANCE_SEED` to replay one.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tributary_proto::events::envelope::Payload;
use tributary_proto::events::{Envelope, LogChunk, Stream};

use crate::{EventLog, LogError, Offset, Record, Subscription};

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
    subscribe_from_zero_sees_all(make().await).await;
    subscribe_mid_stream_catches_up_then_follows(make().await).await;
    subscriber_waits_for_appends(make().await).await;
    concurrent_appenders_and_subscribers(make().await).await;
    committed_offsets_are_per_group(make().await).await;
    idempotent_reappend(make().await).await;
    malformed_record_is_readable(make().await).await;
    subscription_closed_when_log_dropped(make().await).await;
}

/// A recognisable event: a log chunk of build `key` whose byte offset field is `seq`.
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

/// Offsets are contiguous from 0 in append order; what is read back is what was appended.
pub async fn append_then_read(log: Arc<dyn EventLog>) {
    let mut appended = Vec::new();
    for (batch, size) in [3u64, 1, 5].into_iter().enumerate() {
        let events: Vec<Envelope> = (0..size)
            .map(|i| test_event(&format!("build-{}", i % 2), i))
            .collect();
        let next = appended.len() as Offset;
        let offsets = log.append(&events).await.expect("append");
        assert_eq!(
            offsets,
            (next..next + size).collect::<Vec<_>>(),
            "batch {batch} must get the next contiguous offsets, in order"
        );
        appended.extend(events);
    }
    assert_eq!(
        log.end_offset().await.expect("end_offset"),
        9,
        "end offset after 9 events"
    );

    let records = log.read(0, 100).await.expect("read");
    assert_records_are(&records, 0, &appended, "read(0, 100)");

    let records = log.read(0, 4).await.expect("read");
    assert_records_are(&records, 0, &appended[..4], "read(0, 4) must stop at max");

    // Paging through in small reads gives the same thing.
    let mut paged = Vec::new();
    loop {
        let page = log.read(paged.len() as Offset, 2).await.expect("read");
        assert!(
            page.len() <= 2,
            "read(_, 2) returned {} records",
            page.len()
        );
        if page.is_empty() {
            break;
        }
        paged.extend(page);
    }
    assert_records_are(&paged, 0, &appended, "paged reads");
}

/// Appending nothing returns nothing and changes nothing.
pub async fn empty_append_is_a_no_op(log: Arc<dyn EventLog>) {
    assert_eq!(
        log.end_offset().await.expect("end_offset"),
        0,
        "a fresh log must be empty"
    );
    assert!(
        log.append(&[]).await.expect("empty append").is_empty(),
        "empty append"
    );
    assert_eq!(
        log.end_offset().await.expect("end_offset"),
        0,
        "empty append moved the end"
    );
    let offsets = log.append(&[test_event("b", 0)]).await.expect("append");
    assert_eq!(
        offsets,
        vec![0],
        "first event after an empty append must get offset 0"
    );
}

/// Reads from the middle return the rest; reads at or past the end return nothing.
pub async fn read_from_middle_and_past_end(log: Arc<dyn EventLog>) {
    let events: Vec<Envelope> = (0..10).map(|i| test_event("b", i)).collect();
    log.append(&events).await.expect("append");

    let records = log.read(4, 3).await.expect("read");
    assert_records_are(&records, 4, &events[4..7], "read(4, 3)");
    let records = log.read(7, 100).await.expect("read");
    assert_records_are(&records, 7, &events[7..], "read(7, 100)");
    for from in [10, 11, 1000, Offset::MAX] {
        let records = log.read(from, 5).await.expect("read past the end");
        assert!(
            records.is_empty(),
            "read({from}, 5) past the end returned {records:?}"
        );
    }
    let records = log.read(0, 0).await.expect("read(0, 0)");
    assert!(
        records.is_empty(),
        "read(0, 0) must return no record, got {}",
        records.len()
    );
}

/// `read_key` returns only that key's records, in offset order, honouring `from` and `max`.
pub async fn read_key_returns_only_that_key_in_order(log: Arc<dyn EventLog>) {
    let keys = ["build-a", "build-b", "build-c"];
    let events: Vec<Envelope> = (0..30).map(|i| test_event(keys[i % 3], i as u64)).collect();
    for batch in events.chunks(7) {
        log.append(batch).await.expect("append");
    }
    let b_events: Vec<(Offset, &Envelope)> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| e.build_id == "build-b")
        .map(|(i, e)| (i as Offset, e))
        .collect();

    let check = |records: &[Record], expected: &[(Offset, &Envelope)], what: &str| {
        assert_eq!(records.len(), expected.len(), "{what}: number of records");
        for (record, (offset, event)) in records.iter().zip(expected) {
            assert_eq!(record.key, "build-b", "{what}: record of another key");
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
    let records = log.read_key("build-b", 0, 100).await.expect("read_key");
    check(&records, &b_events, "read_key(b, 0, 100)");
    let from = b_events[4].0;
    let records = log.read_key("build-b", from, 100).await.expect("read_key");
    check(&records, &b_events[4..], "read_key(b, middle, 100)");
    let records = log
        .read_key("build-b", from - 1, 100)
        .await
        .expect("read_key");
    check(
        &records,
        &b_events[4..],
        "read_key(b, between two b records, 100)",
    );
    let records = log.read_key("build-b", 0, 3).await.expect("read_key");
    check(&records, &b_events[..3], "read_key(b, 0, 3)");
    let records = log.read_key("build-b", 30, 10).await.expect("read_key");
    check(&records, &[], "read_key(b, end, 10)");
    let records = log
        .read_key("no-such-build", 0, 10)
        .await
        .expect("read_key");
    assert!(
        records.is_empty(),
        "read_key of an unknown key returned records"
    );
}

/// A subscription from 0 yields everything, then follows new appends; one made on an empty log
/// too.
pub async fn subscribe_from_zero_sees_all(log: Arc<dyn EventLog>) {
    let mut early = log.subscribe(0);
    assert_eq!(early.position(), 0, "position of a new subscription");
    let mut events = Vec::new();
    for batch in 0..5u64 {
        let batch: Vec<Envelope> = (0..5).map(|i| test_event("b", batch * 5 + i)).collect();
        log.append(&batch).await.expect("append");
        events.extend(batch);
    }
    for (name, sub) in [
        ("made before the appends", &mut early),
        ("made after", &mut log.subscribe(0)),
    ] {
        let records = collect_until(sub.as_mut(), 25, name).await;
        assert_records_are(&records, 0, &events, &format!("subscription {name}"));
        assert_eq!(sub.position(), 25, "position after catching up ({name})");
    }
    let mut sub = log.subscribe(0);
    collect_until(sub.as_mut(), 25, "second catch-up").await;
    let more: Vec<Envelope> = (25..30).map(|i| test_event("b", i)).collect();
    log.append(&more).await.expect("append");
    let records = collect_until(sub.as_mut(), 30, "following").await;
    assert_records_are(&records, 25, &more, "live records after catching up");
}

/// A subscriber starting mid-stream while appends go on sees each record from its start once:
/// no gap between catching up and following, no duplicate.
pub async fn subscribe_mid_stream_catches_up_then_follows(log: Arc<dyn EventLog>) {
    let events: Vec<Envelope> = (0..100).map(|i| test_event("b", i)).collect();
    log.append(&events[..40]).await.expect("append");
    let mut sub = log.subscribe(15);
    assert_eq!(sub.position(), 15, "position of a new subscription");
    let appender = {
        let log = log.clone();
        let rest = events[40..].to_vec();
        tokio::spawn(async move {
            for batch in rest.chunks(3) {
                log.append(batch).await.expect("append");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let records = collect_until(sub.as_mut(), 100, "mid-stream subscriber").await;
    appender.await.expect("appender task");
    assert_records_are(&records, 15, &events[15..], "mid-stream subscription");
}

/// A caught-up subscriber waits, and wakes up for the next append.
pub async fn subscriber_waits_for_appends(log: Arc<dyn EventLog>) {
    let events: Vec<Envelope> = (0..4).map(|i| test_event("b", i)).collect();
    log.append(&events[..3]).await.expect("append");
    let mut sub = log.subscribe(3);
    let waiter = tokio::spawn(async move {
        let batch = sub.next_batch().await;
        (batch, sub.position())
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        !waiter.is_finished(),
        "a caught-up subscription returned without a new append"
    );
    log.append(&events[3..]).await.expect("append");
    let (batch, position) = tokio::time::timeout(STALL, waiter)
        .await
        .expect("a waiting subscriber did not wake up after an append")
        .expect("subscriber task");
    let batch = batch.expect("next_batch");
    assert_records_are(&batch, 3, &events[3..], "record that woke the subscriber");
    assert_eq!(position, 4, "position after the woken batch");
}

/// Many appenders and many subscribers at once: every subscriber, started at a random moment
/// and offset, sees every record from its start exactly once in offset order; each appender's
/// events appear in its own order, at the offsets its appends returned.
pub async fn concurrent_appenders_and_subscribers(log: Arc<dyn EventLog>) {
    const APPENDERS: u64 = 6;
    const BATCHES: usize = 25;
    const SUBSCRIBERS: usize = 6;
    let (mut rng, seed) = Rng::from_env();
    let sizes: Vec<Vec<u64>> = (0..APPENDERS)
        .map(|_| (0..BATCHES).map(|_| 1 + rng.below(12)).collect())
        .collect();
    let total: Offset = sizes.iter().flatten().sum();

    let mut appenders = Vec::new();
    for (a, sizes) in sizes.into_iter().enumerate() {
        let log = log.clone();
        let pause = rng.below(3);
        appenders.push(tokio::spawn(async move {
            let key = format!("appender-{a}");
            let mut seq = 0;
            let mut appended = Vec::new();
            for size in sizes {
                let batch: Vec<Envelope> = (seq..seq + size).map(|s| test_event(&key, s)).collect();
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
        let pick = rng.next();
        subscribers.push(tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let end = log.end_offset().await.expect("end_offset");
            let start = pick % (end + 1);
            let mut sub = log.subscribe(start);
            let what = format!("subscriber {s} from {start} (seed {seed})");
            let records = collect_until(sub.as_mut(), total, &what).await;
            (start, records)
        }));
    }

    let mut appended = Vec::new();
    for task in appenders {
        appended.push(task.await.expect("appender task"));
    }
    let all = log.read(0, usize::MAX).await.expect("read all");
    assert_eq!(
        all.len() as Offset,
        total,
        "records in the log (seed {seed})"
    );
    for (i, record) in all.iter().enumerate() {
        assert_eq!(
            record.offset, i as Offset,
            "offsets must be contiguous (seed {seed})"
        );
    }
    let mut ids = HashSet::new();
    for record in &all {
        let event = record.decode().expect("decode");
        assert!(
            ids.insert(event.event_id),
            "event stored twice at {} (seed {seed})",
            record.offset
        );
    }
    for (a, events) in appended.iter().enumerate() {
        let mut last = None;
        for (seq, (event, offset)) in events.iter().enumerate() {
            let record = &all[*offset as usize];
            assert_eq!(
                &record.decode().expect("decode"),
                event,
                "appender {a} event {seq}: the record at its returned offset {offset} is \
                 another event (seed {seed})"
            );
            assert!(
                last < Some(*offset),
                "appender {a}: event {seq} at offset {offset} is not after its previous event \
                 ({last:?}) (seed {seed})"
            );
            last = Some(*offset);
        }
    }
    for task in subscribers {
        let (start, records) = task.await.expect("subscriber task");
        assert_eq!(
            records.as_slice(),
            &all[start as usize..],
            "a subscriber from {start} must see exactly the records after it (seed {seed})"
        );
    }
}

/// Committed positions are per consumer group and can be overwritten.
pub async fn committed_offsets_are_per_group(log: Arc<dyn EventLog>) {
    assert_eq!(
        log.committed("projector").await.expect("committed"),
        None,
        "never committed"
    );
    log.commit("projector", 10).await.expect("commit");
    log.commit("mailer", 3).await.expect("commit");
    assert_eq!(
        log.committed("projector").await.expect("committed"),
        Some(10),
        "projector"
    );
    assert_eq!(
        log.committed("mailer").await.expect("committed"),
        Some(3),
        "mailer"
    );
    log.commit("projector", 12).await.expect("commit");
    assert_eq!(
        log.committed("projector").await.expect("committed"),
        Some(12),
        "overwritten"
    );
    assert_eq!(
        log.committed("mailer").await.expect("committed"),
        Some(3),
        "other group kept"
    );
    assert_eq!(
        log.committed("other").await.expect("committed"),
        None,
        "unknown group"
    );
}

/// Re-appending an envelope already on the log (same `event_id`) stores nothing and returns its
/// offset, also within one batch and mixed with new events.
pub async fn idempotent_reappend(log: Arc<dyn EventLog>) {
    let e: Vec<Envelope> = (0..7).map(|i| test_event("b", i)).collect();
    assert_eq!(
        log.append(&e[0..3]).await.expect("append"),
        vec![0, 1, 2],
        "first append"
    );
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
    assert_eq!(
        log.end_offset().await.expect("end_offset"),
        7,
        "duplicates were stored"
    );
    let records = log.read(0, 100).await.expect("read");
    assert_records_are(&records, 0, &e, "log after re-appends");
}

/// A record that is not a valid envelope is stored and read back verbatim (its decode fails),
/// and the records around it are intact, whether read or subscribed to.
pub async fn malformed_record_is_readable(log: Arc<dyn EventLog>) {
    let garbage = b"\xff\xff\xff\xff\xff garbage, not protobuf".to_vec();
    assert!(
        Envelope::decode(garbage.as_slice()).is_err(),
        "test bytes must not decode"
    );
    let good: Vec<Envelope> = (0..2).map(|i| test_event("b", i)).collect();
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
        log.append(&good[1..]).await.expect("append"),
        vec![2],
        "good record after"
    );

    let check = |records: &[Record], what: &str| {
        assert_eq!(records.len(), 3, "{what}: all three records");
        assert_eq!(
            records[0].decode().expect("decode"),
            good[0],
            "{what}: record before"
        );
        assert_eq!(records[1].offset, 1, "{what}: malformed record offset");
        assert_eq!(records[1].key, "b", "{what}: malformed record key");
        assert_eq!(
            records[1].data.as_ref(),
            garbage.as_slice(),
            "{what}: bytes changed"
        );
        assert!(records[1].decode().is_err(), "{what}: garbage decoded");
        assert_eq!(
            records[2].decode().expect("decode"),
            good[1],
            "{what}: record after"
        );
    };
    check(&log.read(0, 10).await.expect("read"), "read");
    check(
        &log.read_key("b", 0, 10).await.expect("read_key"),
        "read_key",
    );
    check(
        &collect_until(log.subscribe(0).as_mut(), 3, "malformed").await,
        "subscription",
    );
}

/// Dropping the log ends its subscriptions with [`LogError::Closed`].
pub async fn subscription_closed_when_log_dropped(log: Arc<dyn EventLog>) {
    log.append(&[test_event("b", 0)]).await.expect("append");
    let mut sub = log.subscribe(0);
    collect_until(sub.as_mut(), 1, "before drop").await;
    let mut other = log.subscribe(1);
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
/// committed positions and the de-duplication of event ids; offsets continue after the last.
pub async fn reopen_keeps_events_and_offsets<F, Fut>(open: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn EventLog>>,
{
    let events: Vec<Envelope> = (0..6).map(|i| test_event("b", i)).collect();
    let log = open().await;
    log.append(&events[..5]).await.expect("append");
    log.commit("projector", 4).await.expect("commit");
    log.commit("mailer", 2).await.expect("commit");
    drop(log);

    let log = open().await;
    assert_eq!(
        log.end_offset().await.expect("end_offset"),
        5,
        "end offset after reopen"
    );
    let records = log.read(0, 100).await.expect("read");
    assert_records_are(&records, 0, &events[..5], "records after reopen");
    assert_eq!(
        log.committed("projector").await.expect("committed"),
        Some(4),
        "projector"
    );
    assert_eq!(
        log.committed("mailer").await.expect("committed"),
        Some(2),
        "mailer"
    );
    assert_eq!(
        log.append(&events[2..4]).await.expect("re-append"),
        vec![2, 3],
        "dedupe"
    );
    assert_eq!(
        log.append(&events[5..]).await.expect("append"),
        vec![5],
        "next offset"
    );
    let records = collect_until(log.subscribe(0).as_mut(), 6, "after reopen").await;
    assert_records_are(&records, 0, &events, "subscription after reopen");
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

/// Checks that `records` are `events`, at offsets `first, first + 1, ...`.
fn assert_records_are(records: &[Record], first: Offset, events: &[Envelope], what: &str) {
    assert_eq!(records.len(), events.len(), "{what}: number of records");
    for (i, (record, event)) in records.iter().zip(events).enumerate() {
        let offset = first + i as Offset;
        assert_eq!(record.offset, offset, "{what}: offset of record {i}");
        assert_eq!(
            record.key,
            event.partition_key(),
            "{what}: key of offset {offset}"
        );
        match record.decode() {
            Ok(decoded) => assert_eq!(&decoded, event, "{what}: event at offset {offset}"),
            Err(error) => panic!("{what}: record at offset {offset} does not decode: {error}"),
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
