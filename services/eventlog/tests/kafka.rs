//! The Kafka backend against a real Apache Kafka broker: the conformance suite on a log with
//! several partitions and a separate logs topic, and on a single-partition one; garbage bytes
//! written to the topic by another producer; a subscribed partition that stops being fetched.
//!
//! The broker comes from `scripts/setup-brokers.sh` (127.0.0.1:19092); set
//! `TRIBUTARY_TEST_KAFKA` to use another. Every test works on topics of its own (a random
//! prefix) and deletes them at the end.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tributary_eventlog::conformance::{self, state_event};
use tributary_eventlog::kafka::{KafkaLog, KafkaOptions};
use tributary_eventlog::{EventLog, Layout, Partition, Record, Topic};

fn options(events: u32, logs: u32) -> KafkaOptions {
    tributary_testkit::kafka_options("log", events, logs)
}

async fn connect(options: &KafkaOptions) -> KafkaLog {
    KafkaLog::connect(options.clone())
        .await
        .expect("connect to Kafka and create the topics")
}

/// Topics of every log a test made, deleted at the end.
#[derive(Default, Clone)]
struct Cleanup(Arc<Mutex<Vec<KafkaOptions>>>);

impl Cleanup {
    fn add(&self, options: &KafkaOptions) {
        self.0.lock().expect("lock").push(options.clone());
    }

    async fn run(self) {
        let all = self.0.lock().expect("lock").clone();
        for options in all {
            if let Ok(log) = KafkaLog::connect(options).await {
                let _ = log.delete_topics().await;
            }
        }
    }
}

/// One test per conformance check, each on fresh topics: 3 event partitions, 2 log partitions.
macro_rules! conformance_tests {
    ($($check:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                tributary_testkit::require!(Kafka);
                let options = options(3, 2);
                let log = connect(&options).await;
                assert_eq!(log.layout(), Layout { events: 3, logs: 2 });
                conformance::$check(Arc::new(log)).await;
                let cleanup = Cleanup::default();
                cleanup.add(&options);
                cleanup.run().await;
            }
        )*
    };
}

conformance_tests!(
    append_then_read,
    empty_append_is_a_no_op,
    read_from_middle_and_past_end,
    read_key_returns_only_that_key_in_order,
    topics_route_by_payload,
    subscribe_from_zero_sees_all,
    subscribe_mid_stream_catches_up_then_follows,
    subscriber_waits_for_appends,
    concurrent_appenders_and_subscribers,
    committed_offsets_are_per_group,
    idempotent_reappend,
    malformed_record_is_readable,
    single_partition_methods,
    subscription_closed_when_log_dropped,
    group_member_commits_and_resumes,
    group_members_split_and_hand_over,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopen_keeps_events_and_offsets() {
    tributary_testkit::require!(Kafka);
    let options = options(3, 2);
    conformance::reopen_keeps_events_and_offsets(|| async {
        Arc::new(connect(&options).await) as Arc<dyn EventLog>
    })
    .await;
    let cleanup = Cleanup::default();
    cleanup.add(&options);
    cleanup.run().await;
}

/// The whole suite on a single-partition Kafka log (one events partition, chunks in the same
/// topic): the layout every current single-partition consumer can run on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_all_on_a_single_partition_log() {
    tributary_testkit::require!(Kafka);
    let cleanup = Cleanup::default();
    conformance::run_all(|| {
        let cleanup = cleanup.clone();
        async move {
            let options = options(1, 0);
            cleanup.add(&options);
            let log = connect(&options).await;
            assert_eq!(log.layout(), Layout::SINGLE);
            Arc::new(log) as Arc<dyn EventLog>
        }
    })
    .await;
    cleanup.run().await;
}

/// Garbage bytes written to the events topic by some other producer (not through Tributary)
/// are handed back like any record, between the good events, to readers and subscribers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_another_producer_is_handed_back() {
    tributary_testkit::require!(Kafka);
    let options = options(2, 1);
    let log = Arc::new(connect(&options).await);
    let key = "build-g";
    let partition = log.layout().partition_for(Topic::Events, key);
    let good: Vec<_> = (0..2).map(|i| state_event(key, i)).collect();
    log.append(&good[..1]).await.expect("append");

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &options.brokers)
        .create()
        .expect("a plain producer");
    producer
        .send(
            FutureRecord::to(&options.events_topic())
                .partition(partition as i32)
                .key(key)
                .payload(&b"\x08\x96\x01 not an envelope \xff\xff"[..]),
            Duration::from_secs(30),
        )
        .await
        .expect("produce garbage");
    log.append(&good[1..]).await.expect("append");

    let mut sub = log.subscribe_partitions(&[(partition, 0)]);
    let records = conformance::collect_until(sub.as_mut(), 3, "garbage").await;
    let decoded: Vec<_> = records.iter().map(|r| r.decode().ok()).collect();
    assert_eq!(decoded[0].as_ref(), Some(&good[0]), "the event before");
    assert!(decoded[1].is_none(), "the garbage must not decode");
    assert_eq!(records[1].key, key);
    assert_eq!(decoded[2].as_ref(), Some(&good[1]), "the event after");
    drop(sub);
    log.delete_topics().await.expect("delete topics");
}

/// Reconnecting to existing topics keeps their partition counts, even if the options ask for
/// others (moving builds between partitions would break their order), and applies the
/// configured retention.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_topics_keep_their_partitions() {
    tributary_testkit::require!(Kafka);
    let mut options = options(2, 1);
    let first = connect(&options).await;
    assert_eq!(first.layout(), Layout { events: 2, logs: 1 });
    options.event_partitions = 5;
    options.log_partitions = 4;
    options.logs_retention = Duration::from_secs(3600);
    let second = connect(&options).await;
    assert_eq!(
        second.layout(),
        Layout { events: 2, logs: 1 },
        "the existing topics' partition counts win"
    );
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &options.brokers)
        .create()
        .expect("admin client");
    let logs_topic = options.logs_topic();
    let described = admin
        .describe_configs(
            &[ResourceSpecifier::Topic(&logs_topic)],
            &AdminOptions::new(),
        )
        .await
        .expect("describe configs");
    let config = described
        .into_iter()
        .next()
        .expect("one resource")
        .expect("the logs topic's config");
    assert_eq!(
        config.get("retention.ms").and_then(|e| e.value.as_deref()),
        Some("3600000"),
        "the logs topic's retention follows the options"
    );
    second.delete_topics().await.expect("delete topics");
}

/// A key of each events partition.
fn key_per_partition(layout: Layout) -> Vec<String> {
    (0..layout.events)
        .map(|p| {
            (0..)
                .map(|i| format!("build-{i}"))
                .find(|k| layout.partition_for(Topic::Events, k) == p)
                .expect("a key")
        })
        .collect()
}

/// Appends three events of each key (round `round`).
async fn append_round(log: &KafkaLog, keys: &[String], round: u64) {
    let events: Vec<_> = (0..3)
        .flat_map(|i| keys.iter().map(move |k| state_event(k, round * 10 + i)))
        .collect();
    log.append(&events).await.expect("append");
}

/// Each partition's records once, in order from offset 0, of the partition's key.
fn assert_whole(got: &BTreeMap<Partition, Vec<Record>>, keys: &[String], count: u64) {
    assert_eq!(got.len(), keys.len(), "every partition: {got:?}");
    for (p, records) in got {
        let offsets: Vec<u64> = records.iter().map(|r| r.offset).collect();
        assert_eq!(
            offsets,
            (0..count).collect::<Vec<_>>(),
            "partition {p}: once each, in order"
        );
        assert!(records.iter().all(|r| r.key == keys[*p as usize]));
    }
}

/// What hands records over: a subscription or a group member.
trait Source {
    async fn records(&mut self) -> Vec<Record>;
    fn stall_for_test(&self, partition: Partition);
}

impl Source for tributary_eventlog::kafka::KafkaSubscription {
    async fn records(&mut self) -> Vec<Record> {
        use tributary_eventlog::Subscription;
        self.next_batch().await.expect("next_batch")
    }

    fn stall_for_test(&self, partition: Partition) {
        self.stall_for_test(partition);
    }
}

impl Source for tributary_eventlog::kafka::KafkaGroupMember {
    /// The member's next records (assignment changes are acknowledged and skipped).
    async fn records(&mut self) -> Vec<Record> {
        use tributary_eventlog::{GroupEvent, GroupSubscription};
        loop {
            if let GroupEvent::Records(records) = self.next().await.expect("next") {
                return records;
            }
        }
    }

    fn stall_for_test(&self, partition: Partition) {
        self.stall_for_test(partition);
    }
}

/// Reads records from `source` into `got` until every one of `partitions` has `want`; fails
/// after `within` with the counts it got.
async fn read_until(
    source: &mut impl Source,
    got: &mut BTreeMap<Partition, Vec<Record>>,
    partitions: usize,
    want: usize,
    within: Duration,
) {
    let deadline = tokio::time::Instant::now() + within;
    while got.len() < partitions || got.values().any(|r| r.len() < want) {
        match tokio::time::timeout_at(deadline, source.records()).await {
            Ok(records) => {
                for r in records {
                    got.entry(r.partition).or_default().push(r);
                }
            }
            Err(_) => panic!(
                "timed out after {within:?} waiting for {want} records in each of {partitions} \
                 partitions; got {:?} (records per partition)",
                counts(got)
            ),
        }
    }
}

/// Reads records from `source` into `got` until `partition` has `want`; fails after `within`
/// with the counts it got.
async fn read_until_in(
    source: &mut impl Source,
    got: &mut BTreeMap<Partition, Vec<Record>>,
    partition: Partition,
    want: usize,
    within: Duration,
) {
    let deadline = tokio::time::Instant::now() + within;
    while got.get(&partition).map_or(0, Vec::len) < want {
        match tokio::time::timeout_at(deadline, source.records()).await {
            Ok(records) => {
                for r in records {
                    got.entry(r.partition).or_default().push(r);
                }
            }
            Err(_) => panic!(
                "timed out after {within:?} waiting for {want} records in partition \
                 {partition}; got {:?} (records per partition)",
                counts(got)
            ),
        }
    }
}

/// Whatever `source` hands over during `window` (for a reader expected to get nothing more).
async fn read_during(
    source: &mut impl Source,
    got: &mut BTreeMap<Partition, Vec<Record>>,
    window: Duration,
) {
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(records) = tokio::time::timeout_at(deadline, source.records()).await {
        for r in records {
            got.entry(r.partition).or_default().push(r);
        }
    }
}

fn counts(got: &BTreeMap<Partition, Vec<Record>>) -> BTreeMap<Partition, usize> {
    got.iter().map(|(p, r)| (*p, r.len())).collect()
}

/// Two connections to fresh topics (2 events partitions): one whose readers check for stalls
/// every 300 ms, one whose readers never do; and a key of each partition.
async fn stall_logs() -> (KafkaLog, KafkaLog, Vec<String>) {
    let mut options = options(2, 1);
    options.stall_check = Duration::from_millis(300);
    let log = connect(&options).await;
    let mut blind = options.clone();
    blind.stall_check = Duration::from_secs(3600);
    let blind_log = connect(&blind).await;
    let keys = key_per_partition(log.layout());
    (log, blind_log, keys)
}

/// Both readers get three records of each partition; then partition 0 stalls in both (paused,
/// as librdkafka leaves it) and three more are appended to each partition: `stuck`, which never
/// checks, gets only the other partition's; `reader` gets all six of both, once each, in order.
/// Returns what `reader` got.
async fn stall_partition_0(
    log: &KafkaLog,
    keys: &[String],
    reader: &mut impl Source,
    stuck: &mut impl Source,
) -> BTreeMap<Partition, Vec<Record>> {
    append_round(log, keys, 0).await;
    let (mut got, mut stuck_got) = (BTreeMap::new(), BTreeMap::new());
    let minute = Duration::from_secs(60);
    read_until(reader, &mut got, 2, 3, minute).await;
    read_until(stuck, &mut stuck_got, 2, 3, minute).await;
    assert_whole(&got, keys, 3);

    reader.stall_for_test(0);
    stuck.stall_for_test(0);
    tokio::time::sleep(Duration::from_millis(200)).await;
    append_round(log, keys, 1).await;
    // The other partition flows; the paused one stays stuck without the check (given a few
    // seconds more after the other partition's records arrived, in case it were only late).
    read_until_in(stuck, &mut stuck_got, 1, 6, minute).await;
    read_during(stuck, &mut stuck_got, Duration::from_secs(3)).await;
    assert_eq!(stuck_got[&1].len(), 6, "the other partition flows");
    assert_eq!(
        stuck_got[&0].len(),
        3,
        "the paused partition is stuck without the check: {:?}",
        counts(&stuck_got)
    );

    read_until(reader, &mut got, 2, 6, minute).await;
    assert_whole(&got, keys, 6);
    got
}

/// A subscribed partition librdkafka stops fetching (as it sometimes does after a broker
/// restart; simulated by pausing it) is noticed and fetched again by a new consumer, from where
/// the subscription was: every record once, in order. A subscription that never checks stays
/// stuck on it, which shows the pause is a real stall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_partition_gets_a_new_consumer_and_loses_nothing() {
    tributary_testkit::require!(Kafka);
    let (log, blind_log, keys) = stall_logs().await;
    let from = [(0, 0), (1, 0)];
    let mut sub = log.start_subscription(&from).expect("subscribe");
    let mut stuck = blind_log.start_subscription(&from).expect("subscribe");
    let mut got = stall_partition_0(&log, &keys, &mut sub, &mut stuck).await;
    // And it goes on fetching with its new consumer.
    append_round(&log, &keys, 2).await;
    read_until(&mut sub, &mut got, 2, 9, Duration::from_secs(60)).await;
    assert_whole(&got, &keys, 9);
    drop((sub, stuck));
    log.delete_topics().await.expect("delete topics");
}

/// The same stall on a consumer-group member: the member keeps its partitions and gets every
/// record once, in order (the partition is fetched again from the offset after the last record
/// handed over); a member that never checks stays stuck.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_partition_of_a_group_member_is_fetched_again() {
    tributary_testkit::require!(Kafka);
    use tributary_eventlog::GroupSubscription;

    let (log, blind_log, keys) = stall_logs().await;
    let mut member = log
        .join_kafka_group("stall", &[Topic::Events])
        .expect("join");
    let mut stuck = blind_log
        .join_kafka_group("stall-blind", &[Topic::Events])
        .expect("join");
    stall_partition_0(&log, &keys, &mut member, &mut stuck).await;
    assert_eq!(
        member.assigned(),
        vec![0, 1],
        "still the member's partitions"
    );
    Box::new(member).leave().await.expect("leave");
    Box::new(stuck).leave().await.expect("leave");
    log.delete_topics().await.expect("delete topics");
}
