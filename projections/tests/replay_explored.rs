//! Replay explored widely: generated build histories (`histories/mod.rs`: several builds
//! interleaved in a random order, retries, requeues after lost agents and their late events,
//! cancels, reused and skipped jobs, re-deliveries, unknown and undecodable records) on a real
//! SQLite log, and the property that the builds read model is the same
//! * projected incrementally, in batches of any sizes,
//! * replayed from offset 0 (`replay::fold_log`), and
//! * projected up to a point, "crashed" with a batch folded but not committed, and caught up
//!   by a restarted projector (`BuildsProjector::open` on the same store), which `replay::check`
//!   also finds equal to the log.
//!
//! 256 cases in CI. To explore more locally:
//! `TRIBUTARY_REPLAY_CASES=10000 cargo test -p tributary-projections --test replay_explored`
//! (a failure prints the shrunk history; proptest keeps its seed in
//! `projections/tests/replay_explored.proptest-regressions`).

mod histories;

use std::sync::Arc;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use tributary_eventlog::sqlite::{SqliteLog, SqliteLogOptions, SqliteSynchronous};
use tributary_eventlog::{EventLog, Record};
use tributary_projections::{replay, BuildsProjector, BuildsStore};

use histories::{history, History, Item};

/// The cases CI runs, or `TRIBUTARY_REPLAY_CASES`.
fn config() -> ProptestConfig {
    let mut config = ProptestConfig {
        cases: 256,
        ..ProptestConfig::default()
    };
    if let Some(cases) = std::env::var("TRIBUTARY_REPLAY_CASES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
    {
        config.cases = cases;
    }
    config
}

/// The log (no fsync: nothing here survives the test) with `items` appended in order.
async fn log_of(dir: &std::path::Path, items: &[Item]) -> Arc<SqliteLog> {
    let options = SqliteLogOptions {
        synchronous: SqliteSynchronous::Off,
        ..SqliteLogOptions::default()
    };
    let log = SqliteLog::open_with(&dir.join("events.db"), options)
        .await
        .expect("open the log");
    let mut events = Vec::new();
    for item in items {
        match item {
            Item::Event(e) => events.push(e.clone()),
            Item::Raw { key, data } => {
                if !events.is_empty() {
                    log.append(&std::mem::take(&mut events))
                        .await
                        .expect("append");
                }
                log.append_raw(key, data.clone()).await.expect("append raw");
            }
        }
    }
    if !events.is_empty() {
        log.append(&events).await.expect("append");
    }
    Arc::new(log)
}

async fn store(dir: &std::path::Path, name: &str) -> BuildsStore {
    BuildsStore::open(&dir.join(name))
        .await
        .expect("open a read-model store")
}

/// Applies `records` in batches whose sizes cycle through `sizes`.
async fn apply_in_batches(p: &mut BuildsProjector, records: &[Record], sizes: &[usize]) {
    let mut at = 0;
    let mut sizes = sizes.iter().cycle();
    while at < records.len() {
        let n = (*sizes.next().expect("sizes")).min(records.len() - at);
        p.apply_batch(&records[at..at + n]).await.expect("apply");
        at += n;
    }
}

async fn check(history: History, sizes: Vec<usize>, restart_at: usize, crash: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let items = history.items();
    let log = log_of(dir.path(), &items).await;
    let records = log.read(0, usize::MAX).await.expect("read the log");
    assert_eq!(records.len(), items.len());
    let end = records.len() as u64;

    // Replay from 0.
    let (replayed, undecodable) = replay::fold_log(log.as_ref(), end).await.expect("replay");
    let unreadable = records.iter().filter(|r| r.decode().is_err()).count() as u64;
    let unknown = records
        .iter()
        .filter(|r| r.decode().is_ok_and(|e| e.payload.is_none()))
        .count() as u64;
    // Replay runs on the consumer runtime, which counts what it skips as every consumer does.
    assert_eq!(
        undecodable,
        unreadable + unknown,
        "replay skips (and counts) the undecodable records and unknown events"
    );

    // Incremental, in batches of the generated sizes.
    let incremental = store(dir.path(), "incremental.db").await;
    let mut p = BuildsProjector::open(incremental.clone())
        .await
        .expect("open");
    apply_in_batches(&mut p, &records, &sizes).await;
    assert_eq!(p.next_offset(), end);
    assert_eq!(
        p.malformed(),
        unreadable + unknown,
        "the projector skips (and counts) undecodable records and unknown events"
    );
    let stored = incremental.load_all().await.expect("load");
    assert_eq!(replay::compare(&stored, &replayed), None);
    assert_eq!(stored, replayed);

    // Up to a point, a batch folded but never committed (the process dies), then a restart
    // that catches up from the stored offset.
    let restarted = store(dir.path(), "restarted.db").await;
    let cut = restart_at % (records.len() + 1);
    let mut p = BuildsProjector::open(restarted.clone())
        .await
        .expect("open");
    apply_in_batches(&mut p, &records[..cut], &sizes).await;
    let lost = (cut + crash % 50).min(records.len());
    p.apply_batch_and_crash(&records[cut..lost])
        .await
        .expect("fold");
    assert_eq!(restarted.next_offset().await.expect("offset"), cut as u64);
    let mut p = BuildsProjector::open(restarted.clone())
        .await
        .expect("reopen");
    assert_eq!(p.next_offset(), cut as u64, "resumes where it committed");
    p.catch_up(log.as_ref()).await.expect("catch up");
    let after_restart = restarted.load_all().await.expect("load");
    assert_eq!(replay::compare(&after_restart, &replayed), None);
    assert_eq!(after_restart, replayed);
    assert_eq!(
        replay::check(log.as_ref(), &restarted)
            .await
            .expect("check"),
        None
    );
}

#[test]
fn incremental_equals_replay_equals_a_restart_on_generated_histories() {
    let mut runner = TestRunner::new(config());
    let strategy = (
        history(),
        proptest::collection::vec(1usize..60, 1..20),
        any::<usize>(),
        any::<usize>(),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let started = std::time::Instant::now();
    runner
        .run(&strategy, |(history, sizes, restart_at, crash)| {
            rt.block_on(check(history, sizes, restart_at, crash));
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    println!(
        "{} generated histories in {:?}",
        config().cases,
        started.elapsed()
    );
}

/// The generator makes what it promises: over a sample, every kind of event and noise occurs
/// (a generator that quietly stopped producing requeues would make the property vacuous).
#[test]
fn the_generator_covers_every_kind_of_history() {
    use std::collections::BTreeSet;
    use tributary_proto::events::envelope::Payload;
    use tributary_proto::events::Status;
    let mut runner = TestRunner::deterministic();
    let mut seen: BTreeSet<&'static str> = BTreeSet::new();
    for _ in 0..200 {
        let h = history()
            .new_tree(&mut runner)
            .expect("a history")
            .current();
        if h.builds.len() > 1 {
            seen.insert("several builds");
        }
        for item in h.items() {
            let kind = match item {
                Item::Raw { data, .. } => {
                    if prost::Message::decode(data.as_slice())
                        .map(|e: tributary_proto::events::Envelope| e.payload.is_some())
                        .unwrap_or(false)
                    {
                        "re-delivery"
                    } else {
                        "raw bytes"
                    }
                }
                Item::Event(e) => match e.payload {
                    None => "unknown",
                    Some(Payload::JobRequeued(_)) => "requeue",
                    Some(Payload::BuildCanceled(_)) => "cancel",
                    Some(Payload::JobReused(_)) => "reuse",
                    Some(Payload::PipelineRejected(_)) => "rejected",
                    Some(Payload::JobQueued(q)) if q.attempt > 1 => "retry",
                    Some(Payload::JobFinished(f)) if f.status == Status::TimedOut as i32 => {
                        "timeout"
                    }
                    _ => "other",
                },
            };
            seen.insert(kind);
        }
    }
    for kind in [
        "several builds",
        "re-delivery",
        "raw bytes",
        "unknown",
        "requeue",
        "cancel",
        "reuse",
        "rejected",
        "retry",
        "timeout",
    ] {
        assert!(seen.contains(kind), "no {kind} in 200 histories: {seen:?}");
    }
}
