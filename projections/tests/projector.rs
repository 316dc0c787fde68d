//! The builds projection against a real SQLite log and a real SQLite read-model database.

mod common;

use std::sync::Arc;

use proptest::prelude::*;
use tributary_eventlog::{sqlite::SqliteLog, EventLog};
use tributary_projections::{replay, BuildsProjector, BuildsStore, Phase};

async fn setup(dir: &std::path::Path) -> (Arc<SqliteLog>, BuildsStore) {
    let log = SqliteLog::open(&dir.join("events.db"))
        .await
        .expect("open log");
    let store = BuildsStore::open(&dir.join("readmodels.db"))
        .await
        .expect("open store");
    (Arc::new(log), store)
}

async fn append_all(log: &SqliteLog, events: &[tributary_proto::events::Envelope]) {
    for chunk in events.chunks(100) {
        log.append(chunk).await.expect("append");
    }
}

#[tokio::test]
async fn projects_statuses_exit_codes_and_timings() {
    let dir = tempfile::tempdir().unwrap();
    let (log, store) = setup(dir.path()).await;
    append_all(&log, &common::build_history("b1", 3, false)).await;
    let mut p = BuildsProjector::open(store.clone()).await.unwrap();
    p.catch_up(log.as_ref()).await.unwrap();
    let b = store.load_build("b1").await.unwrap().expect("build stored");
    assert_eq!(b.phase, Phase::Failed);
    assert_eq!(b.commit, "abc123");
    let job0 = &b.jobs[0];
    assert_eq!(job0.phase, Phase::Failed);
    assert_eq!(job0.agent_id, "agent-1", "the first assignment wins");
    assert_eq!(job0.exit_code, Some(3));
    assert_eq!(job0.steps[1].lines[1].exit_code, Some(3));
    assert_eq!(job0.steps[1].lines[1].phase, Phase::Failed);
    assert_eq!(
        job0.steps[1].lines[2].phase,
        Phase::Pending,
        "lines after a failure never ran"
    );
    assert_eq!(
        job0.steps[0].lines[0].log_bytes,
        2 * "out 0 of 0.0.0\n".len() as u64
    );
    assert_eq!(job0.steps[0].lines[0].duration_us, Some(1000));
    assert_eq!(b.jobs[1].phase, Phase::Succeeded);
    assert!(b.finished_us.is_some() && b.started_us.is_some());
}

#[tokio::test]
async fn retry_resets_steps_and_lines() {
    let dir = tempfile::tempdir().unwrap();
    let (log, store) = setup(dir.path()).await;
    append_all(&log, &common::build_history("b1", 2, true)).await;
    let mut p = BuildsProjector::open(store.clone()).await.unwrap();
    p.catch_up(log.as_ref()).await.unwrap();
    let b = store.load_build("b1").await.unwrap().unwrap();
    assert_eq!(b.phase, Phase::Succeeded);
    assert_eq!(b.jobs[0].attempt, 2);
    assert_eq!(
        b.jobs[0].steps[1].lines[1].exit_code,
        Some(0),
        "attempt 2's result, not attempt 1's"
    );
}

#[tokio::test]
async fn crash_between_fold_and_commit_does_not_double_apply() {
    let dir = tempfile::tempdir().unwrap();
    let (log, store) = setup(dir.path()).await;
    let events = common::interleave(vec![
        common::build_history("b1", 3, true),
        common::build_history("b2", 2, false),
    ]);
    append_all(&log, &events).await;
    let records = log.read(0, 100_000).await.unwrap();
    let (first, rest) = records.split_at(records.len() / 3);
    let (second, _) = rest.split_at(rest.len() / 2);

    let mut p = BuildsProjector::open(store.clone()).await.unwrap();
    p.apply_batch(first).await.unwrap();
    let stored_at = store.next_offset().await.unwrap();
    // The process "dies" after folding the second batch, before its transaction commits.
    p.apply_batch_and_crash(second).await.unwrap();
    assert_eq!(
        store.next_offset().await.unwrap(),
        stored_at,
        "nothing of the crashed batch is stored"
    );

    // Restart: resume from the stored offset; the second batch is applied exactly once.
    let mut p = BuildsProjector::open(store.clone()).await.unwrap();
    assert_eq!(p.next_offset(), first.len() as u64);
    p.catch_up(log.as_ref()).await.unwrap();
    assert_eq!(replay::check(log.as_ref(), &store).await.unwrap(), None);
    let b = store.load_build("b1").await.unwrap().unwrap();
    // log_bytes is a counter: a double-applied LogChunk would show here.
    assert_eq!(
        b.jobs[1].steps[0].lines[0].log_bytes,
        2 * "out 0 of 1.0.0\n".len() as u64
    );
}

#[tokio::test]
async fn replay_check_detects_a_tampered_row_and_rebuild_repairs_it() {
    let dir = tempfile::tempdir().unwrap();
    let (log, store) = setup(dir.path()).await;
    append_all(&log, &common::build_history("b1", 2, false)).await;
    let mut p = BuildsProjector::open(store.clone()).await.unwrap();
    p.catch_up(log.as_ref()).await.unwrap();
    assert_eq!(replay::check(log.as_ref(), &store).await.unwrap(), None);

    sqlx::query("UPDATE lines SET exit_code = 0 WHERE build_id = 'b1' AND job_idx = 0 AND step_idx = 1 AND idx = 1")
        .execute(store.pool())
        .await
        .unwrap();
    let d = replay::check(log.as_ref(), &store)
        .await
        .unwrap()
        .expect("divergence found");
    assert_eq!(d.build_id, "b1");
    assert_eq!(d.path, "jobs[0].steps[1].lines[1].exit_code");
    assert_eq!((d.stored.as_str(), d.replayed.as_str()), ("0", "3"));
    assert!(d.offset.is_some());

    replay::rebuild(log.as_ref(), &store).await.unwrap();
    assert_eq!(replay::check(log.as_ref(), &store).await.unwrap(), None);
}

#[tokio::test]
async fn malformed_and_unknown_events_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let (log, store) = setup(dir.path()).await;
    let events = common::build_history("b1", 1, false);
    append_all(&log, &events[..5]).await;
    log.append_raw("b1", vec![0xff, 0xff, 0xff, 0x01])
        .await
        .unwrap();
    let mut unknown = events[5].clone();
    unknown.event_id = tributary_proto::new_id();
    unknown.payload = None; // a payload from a future schema decodes as None
    log.append(&[unknown]).await.unwrap();
    append_all(&log, &events[5..]).await;
    let mut p = BuildsProjector::open(store.clone()).await.unwrap();
    p.catch_up(log.as_ref()).await.unwrap();
    assert_eq!(
        p.malformed(),
        2,
        "the garbage and the unknown event, each counted"
    );
    let b = store.load_build("b1").await.unwrap().unwrap();
    // Every good event after the bad ones was applied: the build reached its end.
    assert_eq!(b.phase, Phase::Failed);
    assert_eq!(b.jobs[0].exit_code, Some(3));
    assert_eq!(replay::check(log.as_ref(), &store).await.unwrap(), None);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, ..ProptestConfig::default() })]
    /// Incremental projection in arbitrary batch sizes equals a replay from offset 0.
    #[test]
    fn incremental_equals_replay(batch_sizes in proptest::collection::vec(1usize..40, 1..30), builds in 1usize..4) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let (log, store) = setup(dir.path()).await;
            let events = common::interleave(
                (0..builds).map(|i| common::build_history(&format!("b{i}"), 2 + i, i % 2 == 0)).collect(),
            );
            append_all(&log, &events).await;
            let records = log.read(0, 100_000).await.unwrap();
            let mut p = BuildsProjector::open(store.clone()).await.unwrap();
            let mut at = 0;
            let mut sizes = batch_sizes.iter().cycle();
            while at < records.len() {
                let n = (*sizes.next().unwrap()).min(records.len() - at);
                p.apply_batch(&records[at..at + n]).await.unwrap();
                at += n;
            }
            let (replayed, _) = replay::fold_log(log.as_ref(), records.len() as u64).await.unwrap();
            let stored = store.load_all().await.unwrap();
            assert_eq!(replay::compare(&stored, &replayed), None);
            assert_eq!(stored, replayed);
        });
    }
}

/// Kafka may store a retried append twice: the copy (same event id, a later offset, possibly in
/// a later batch, possibly after a restart) is skipped, so log bytes are not counted twice.
#[tokio::test]
async fn a_redelivered_event_id_is_applied_once_even_after_a_restart() {
    use prost::Message;
    use tributary_eventlog::Record;
    let dir = tempfile::tempdir().unwrap();
    let (_log, store) = setup(dir.path()).await;
    let events = common::build_history("b1", 1, false);
    let record = |offset: u64, env: &tributary_proto::events::Envelope| Record {
        partition: 0,
        offset,
        key: env.build_id.clone(),
        data: env.encode_to_vec().into(),
    };
    // Up to the first log chunk, then that chunk again in the same batch.
    let chunk = events
        .iter()
        .position(|e| {
            matches!(
                e.payload,
                Some(tributary_proto::events::envelope::Payload::LogChunk(_))
            )
        })
        .expect("a log chunk");
    let mut records: Vec<Record> = events[..=chunk]
        .iter()
        .enumerate()
        .map(|(i, e)| record(i as u64, e))
        .collect();
    records.push(record(records.len() as u64, &events[chunk]));
    let mut p = BuildsProjector::open(store.clone()).await.unwrap();
    p.apply_batch(&records).await.unwrap();
    assert_eq!(p.duplicates(), 1);
    let bytes = |b: &tributary_projections::Build| b.jobs[0].log_bytes;
    let once = bytes(&store.load_build("b1").await.unwrap().unwrap());
    assert!(once > 0);

    // A restarted projector (ids come from the database) gets the chunk once more.
    let mut restarted = BuildsProjector::open(store.clone()).await.unwrap();
    let next = records.len() as u64;
    restarted
        .apply_batch(&[record(next, &events[chunk])])
        .await
        .unwrap();
    assert_eq!(
        restarted.duplicates(),
        1,
        "the stored event ids survive a restart"
    );
    assert_eq!(bytes(&store.load_build("b1").await.unwrap().unwrap()), once);
    assert_eq!(
        restarted.next_offset(),
        next + 1,
        "the offset still advances"
    );
}

/// Two projectors writing the same partition (one took it over while the other stalled): the
/// stored offset fences the late one, which reloads and applies only what is left, so nothing
/// is applied twice.
#[tokio::test]
async fn a_projector_that_lost_its_partition_is_fenced_and_applies_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let (log, store) = setup(dir.path()).await;
    let events = common::build_history("b1", 2, false);
    append_all(&log, &events).await;
    let records = log.read(0, usize::MAX).await.unwrap();
    let half = records.len() / 2;

    let mut stalled = BuildsProjector::open(store.clone()).await.unwrap();
    stalled.apply_batch(&records[..half]).await.unwrap();
    // Another projector takes over at the stored offset and applies everything.
    let mut owner = BuildsProjector::open(store.clone()).await.unwrap();
    assert_eq!(owner.next_offset(), half as u64);
    owner.apply_batch(&records[half..]).await.unwrap();
    let done = store.load_build("b1").await.unwrap().unwrap();

    // The stalled one wakes up with the second half in hand: fenced, it reloads, skips it all.
    stalled.apply_batch(&records[half..]).await.unwrap();
    assert_eq!(stalled.next_offset(), records.len() as u64);
    assert_eq!(store.load_build("b1").await.unwrap().unwrap(), done);
    assert_eq!(
        replay::check(log.as_ref(), &store).await.unwrap(),
        None,
        "applied once"
    );
}
