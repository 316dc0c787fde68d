//! The builds projector on the Kafka event log (a real broker, from `scripts/setup-brokers.sh`;
//! `TRIBUTARY_TEST_KAFKA` overrides 127.0.0.1:19092), on the single-partition layout today's
//! projector reads: garbage bytes and an event of an unknown type on the topic are skipped with
//! an error log and a counter, every good event around them is applied, and a restarted
//! projector does not trip over them again.

#[allow(dead_code)] // shared helpers, not all used here
mod common;

use tributary_eventlog::kafka::KafkaLog;
use tributary_eventlog::{EventLog, Layout};
use tributary_projections::{replay, BuildsProjector, BuildsStore, Phase};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_topic_is_skipped_and_counted() {
    tributary_testkit::require!(Kafka);
    let options = tributary_testkit::kafka_options("projector", 1, 0);
    let log = KafkaLog::connect(options).await.expect("connect to Kafka");
    assert_eq!(log.layout(), Layout::SINGLE);

    let events = common::build_history("b1", 1, false);
    log.append(&events[..5]).await.expect("append");
    log.append_raw("b1", vec![0xff, 0xff, 0xff, 0x01])
        .await
        .expect("append garbage");
    let mut unknown = events[5].clone();
    unknown.event_id = tributary_proto::new_id();
    unknown.payload = None; // a payload from a future schema decodes as None
    log.append(&[unknown]).await.expect("append unknown");
    log.append(&events[5..]).await.expect("append");

    let dir = tempfile::tempdir().expect("tempdir");
    let store = BuildsStore::open(&dir.path().join("readmodels.db"))
        .await
        .expect("open store");
    let mut projector = BuildsProjector::open(store.clone())
        .await
        .expect("projector");
    let end = projector.catch_up(&log).await.expect("catch up");
    assert_eq!(end, events.len() as u64 + 2, "every record was consumed");
    assert_eq!(
        projector.malformed(),
        2,
        "the garbage record and the event of an unknown type are counted"
    );
    let build = store.load_build("b1").await.expect("load").expect("stored");
    assert_eq!(
        build.phase,
        Phase::Failed,
        "the good events after it were applied"
    );
    assert_eq!(build.jobs[0].exit_code, Some(3));
    assert_eq!(replay::check(&log, &store).await.expect("check"), None);

    // A restarted projector resumes after the garbage: no crash loop, nothing re-applied.
    let mut restarted = BuildsProjector::open(store.clone()).await.expect("reopen");
    assert_eq!(restarted.catch_up(&log).await.expect("catch up"), end);
    assert_eq!(
        restarted.malformed(),
        0,
        "the garbage is behind the stored offset"
    );
    log.delete_topics().await.expect("delete topics");
}
