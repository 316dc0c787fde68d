//! The scale-out backend: Apache Kafka through rdkafka (librdkafka).
//!
//! # Topics
//!
//! Two topics, created and configured by [`KafkaLog::connect`] itself, idempotently:
//! * `<prefix>.events`: every event but log chunks; kept forever by default (it is the source of
//!   truth: read models are rebuilt from it);
//! * `<prefix>.logs`: [`LogChunk`](tributary_proto::events::LogChunk)s, large and only needed
//!   until the output is archived, with a retention of their own (7 days by default). With
//!   [`KafkaOptions::log_partitions`] 0 there is no logs topic: chunks go to the events topic.
//!
//! A topic that already exists keeps its partition count (changing it would move builds to other
//! partitions mid-flight): [`KafkaLog::layout`](EventLog::layout) reports what the broker has.
//! Its retention is set to the configured one if it differs (AlterConfigs: the managed settings,
//! `cleanup.policy` and `retention.ms`, are written together).
//!
//! # Partitions and keys
//!
//! Tributary picks each record's partition itself ([`Layout::partition_of`]: murmur2 of the build
//! id, like Kafka's Java clients), so every replica and every reader knows where a build's events
//! are without asking the broker. The record key is the partition key, the value the encoded
//! [`Envelope`].
//!
//! # Appends
//!
//! One idempotent producer (`enable.idempotence`, `acks=all`): librdkafka's own retries never
//! duplicate nor reorder a partition's records. Records are enqueued in the order of the batch
//! and the append returns when every one is acknowledged by all in-sync replicas. A batch is not
//! atomic across partitions, and a retried append stores its events again:
//! [`Capabilities`] says so and consumers dedupe by event id.
//!
//! # Reads, subscriptions, consumer groups
//!
//! Reads use a small pool of plain (group-less) consumers: assign the partition at the offset,
//! poll up to the high watermark read first. A subscription is a consumer of its own, assigned to
//! its partitions at its offsets, polled on a thread of its own that hands batches to
//! [`Subscription::next_batch`] through a bounded channel (back pressure: it stops fetching when
//! the reader lags). Undecodable records are handed back like any other. The thread also checks
//! that librdkafka keeps fetching every partition (it can stop after a broker restart) and
//! replaces its consumer when one stalls (`kafka/stall.rs`).
//!
//! Commits store offsets in Kafka's consumer-group offsets under the group id
//! `<prefix>.<group>`, through a group-less "simple consumer" commit: this works while no member
//! of that group uses Kafka's group membership. Members of a group
//! ([`EventLog::join_group`]: a consumer `subscribe()`d with the cooperative-sticky assignor, see
//! `kafka/group.rs`) commit through their own consumer ([`GroupSubscription::commit`]).
//!
//! Dropping the [`KafkaLog`] ends its subscriptions with [`LogError::Closed`].

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use prost::Message as _;
use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{Offset as KafkaOffset, TopicPartitionList};
use tokio::sync::{mpsc, watch};
use tributary_proto::events::Envelope;

use crate::{
    Capabilities, EventLog, FailedSubscription, GroupSubscription, Layout, LogError, Offset,
    Partition, Record, Subscription, Topic,
};

mod group;
mod stall;
pub use group::KafkaGroupMember;

/// How to reach the broker and how to lay out the topics.
#[derive(Clone, Debug)]
pub struct KafkaOptions {
    /// `bootstrap.servers`: `host:port[,host:port...]`.
    pub brokers: String,
    /// Topics are `<prefix>.events` and `<prefix>.logs`; consumer groups `<prefix>.<group>`.
    pub topic_prefix: String,
    /// Partitions of the events topic when Tributary creates it.
    pub event_partitions: u32,
    /// Partitions of the logs topic when Tributary creates it; 0: no logs topic, chunks go to
    /// the events topic.
    pub log_partitions: u32,
    /// Replication factor of the topics Tributary creates; -1: the broker's default.
    pub replication_factor: i32,
    /// Retention of the events topic; `None`: forever.
    pub events_retention: Option<Duration>,
    /// Retention of the logs topic.
    pub logs_retention: Duration,
    /// `linger.ms` of the producer: how long it waits to batch records.
    pub linger: Duration,
    /// Records a subscription hands over at most at once.
    pub subscription_batch: usize,
    /// Deadline of each broker request Tributary waits on (metadata, admin, a read, a commit).
    pub timeout: Duration,
    /// `session.timeout.ms` of consumer-group members: how long after a member dies (without
    /// leaving) the group hands its partitions to the others.
    pub session_timeout: Duration,
    /// How often a subscription or a group member checks that each of its partitions is fetched
    /// (see `kafka/stall.rs`): a partition left behind its high watermark for two checks is
    /// fetched again (a subscription gets a new consumer, a member seeks the partition).
    pub stall_check: Duration,
}

impl KafkaOptions {
    /// The defaults for `brokers`: topics `tributary.events` (12 partitions, kept forever) and
    /// `tributary.logs` (12 partitions, 7 days).
    pub fn new(brokers: impl Into<String>) -> Self {
        KafkaOptions {
            brokers: brokers.into(),
            topic_prefix: "tributary".into(),
            event_partitions: 12,
            log_partitions: 12,
            replication_factor: -1,
            events_retention: None,
            logs_retention: Duration::from_secs(7 * 24 * 3600),
            linger: Duration::from_millis(5),
            subscription_batch: 4096,
            timeout: Duration::from_secs(30),
            session_timeout: Duration::from_secs(10),
            stall_check: Duration::from_secs(5),
        }
    }

    /// The name of the events topic.
    pub fn events_topic(&self) -> String {
        format!("{}.events", self.topic_prefix)
    }

    /// The name of the logs topic.
    pub fn logs_topic(&self) -> String {
        format!("{}.logs", self.topic_prefix)
    }

    /// The Kafka group id of Tributary consumer group `group`.
    pub fn group_id(&self, group: &str) -> String {
        format!("{}.{group}", self.topic_prefix)
    }

    fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("client.id", "tributary")
            .set("socket.keepalive.enable", "true");
        config
    }
}

/// A topic as Tributary wants it: pure data, compared with what the broker has.
#[derive(Clone, Debug, PartialEq)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: u32,
    /// The topic settings Tributary manages.
    pub config: Vec<(&'static str, String)>,
}

/// The topics `options` asks for: events, then logs unless `log_partitions` is 0.
pub fn topic_specs(options: &KafkaOptions) -> Vec<TopicSpec> {
    let retention = |r: Option<Duration>| r.map_or("-1".to_owned(), |d| d.as_millis().to_string());
    let mut specs = vec![TopicSpec {
        name: options.events_topic(),
        partitions: options.event_partitions,
        config: vec![
            ("cleanup.policy", "delete".into()),
            ("retention.ms", retention(options.events_retention)),
        ],
    }];
    if options.log_partitions > 0 {
        specs.push(TopicSpec {
            name: options.logs_topic(),
            partitions: options.log_partitions,
            config: vec![
                ("cleanup.policy", "delete".into()),
                ("retention.ms", retention(Some(options.logs_retention))),
            ],
        });
    }
    specs
}

/// The event log on Kafka; see the [module docs](self).
pub struct KafkaLog {
    options: KafkaOptions,
    layout: Layout,
    events_topic: String,
    logs_topic: String,
    producer: FutureProducer,
    readers: Arc<Mutex<Vec<BaseConsumer>>>,
    groups: Mutex<HashMap<String, Arc<BaseConsumer>>>,
    /// Dropped with the log: subscriptions see it and end.
    closed: watch::Sender<()>,
    /// Records handed out by reads (`read_partition`, `read_key_in`'s scans); see
    /// [`KafkaLog::records_read`].
    records_read: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for KafkaLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaLog")
            .field("brokers", &self.options.brokers)
            .field("events_topic", &self.events_topic)
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

/// Readers kept for reuse.
const READER_POOL: usize = 4;

/// The largest page `read_key_in` reads at once.
const KEY_SCAN_PAGE: usize = 4096;

impl KafkaLog {
    /// Connects to the brokers, creates or reconfigures the topics (idempotent: every replica
    /// does this at start), and learns their partitions.
    pub async fn connect(options: KafkaOptions) -> Result<Self, LogError> {
        if options.event_partitions == 0 {
            return Err(LogError::Invalid(
                "the events topic needs at least one partition (event_partitions = 0)".into(),
            ));
        }
        let specs = topic_specs(&options);
        ensure_topics(&options, &specs).await?;

        let readers = Arc::new(Mutex::new(Vec::new()));
        let reader = new_reader(&options)?;
        let timeout = options.timeout;
        let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
        let (reader, counts) = tokio::task::spawn_blocking(move || {
            let counts = names
                .iter()
                .map(|name| partition_count(&reader, name, timeout))
                .collect::<Result<Vec<u32>, LogError>>();
            (reader, counts)
        })
        .await
        .map_err(join_error)?;
        let counts = counts?;
        readers
            .lock()
            .map_err(|_| LogError::Invalid("reader pool poisoned".into()))?
            .push(reader);
        for (spec, count) in specs.iter().zip(&counts) {
            if *count != spec.partitions {
                tracing::warn!(
                    topic = %spec.name,
                    has = count,
                    configured = spec.partitions,
                    "the topic exists with another partition count; using the topic's"
                );
            }
        }
        let layout = Layout {
            events: counts[0],
            logs: counts.get(1).copied().unwrap_or(0),
        };

        let producer: FutureProducer = options
            .client_config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", options.linger.as_millis().to_string())
            .set("compression.type", "lz4")
            .set(
                "message.timeout.ms",
                options.timeout.as_millis().max(1).to_string(),
            )
            .create()
            .map_err(|e| kafka("creating the producer", e))?;
        tracing::info!(brokers = %options.brokers, ?layout, "connected to the Kafka event log");
        let (closed, _) = watch::channel(());
        Ok(KafkaLog {
            events_topic: options.events_topic(),
            logs_topic: options.logs_topic(),
            options,
            layout,
            producer,
            readers,
            groups: Mutex::new(HashMap::new()),
            closed,
            records_read: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// How many records reads have fetched so far (`read_partition`, and the pages
    /// `read_key_in` scans, other keys' records included; not subscriptions). A measure of
    /// what reading a key costs on a log without an index by key, for tests and benchmarks.
    pub fn records_read(&self) -> u64 {
        self.records_read.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The options the log was opened with.
    pub fn options(&self) -> &KafkaOptions {
        &self.options
    }

    /// Deletes this log's topics (tests clean up after themselves with it).
    pub async fn delete_topics(&self) -> Result<(), LogError> {
        let admin = admin_client(&self.options)?;
        let mut names = vec![self.events_topic.as_str()];
        if self.layout.logs > 0 {
            names.push(self.logs_topic.as_str());
        }
        let results = admin
            .delete_topics(&names, &admin_options(&self.options))
            .await
            .map_err(|e| kafka("deleting topics", e))?;
        for result in results {
            if let Err((name, code)) = result {
                return Err(LogError::Kafka(format!("deleting topic {name}: {code}")));
            }
        }
        Ok(())
    }

    /// The Kafka topic and partition index of `partition`.
    fn locate(&self, partition: Partition) -> Result<(&str, i32), LogError> {
        match self.layout.locate(partition) {
            Some((Topic::Events, index)) => Ok((&self.events_topic, index as i32)),
            Some((Topic::Logs, index)) => Ok((&self.logs_topic, index as i32)),
            None => Err(LogError::Invalid(format!(
                "there is no partition {partition}: the log has {} (events topic {}: {}, logs \
                 topic {}: {})",
                self.layout.partitions(),
                self.events_topic,
                self.layout.events,
                self.logs_topic,
                self.layout.logs
            ))),
        }
    }

    /// Enqueues one record, waiting while the producer's queue is full; returns its delivery.
    async fn enqueue(
        &self,
        partition: Partition,
        key: &str,
        payload: &[u8],
    ) -> Result<DeliveryFuture, LogError> {
        let (topic, index) = self.locate(partition)?;
        loop {
            let record = FutureRecord::to(topic)
                .partition(index)
                .key(key)
                .payload(payload);
            match self.producer.send_result(record) {
                Ok(delivery) => return Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err((error, _)) => return Err(kafka("enqueueing a record", error)),
            }
        }
    }

    /// Runs `f` with a pooled reader on a blocking thread.
    async fn with_reader<T: Send + 'static>(
        &self,
        f: impl FnOnce(&BaseConsumer) -> Result<T, LogError> + Send + 'static,
    ) -> Result<T, LogError> {
        let pooled = self
            .readers
            .lock()
            .map_err(|_| LogError::Invalid("reader pool poisoned".into()))?
            .pop();
        let reader = match pooled {
            Some(reader) => reader,
            None => new_reader(&self.options)?,
        };
        let (reader, result) = tokio::task::spawn_blocking(move || {
            let result = f(&reader);
            (reader, result)
        })
        .await
        .map_err(join_error)?;
        if let Ok(mut pool) = self.readers.lock() {
            if pool.len() < READER_POOL {
                pool.push(reader);
            }
        }
        result
    }

    /// The committer consumer of `group` (created once per group).
    fn group_consumer(&self, group: &str) -> Result<Arc<BaseConsumer>, LogError> {
        let mut groups = self
            .groups
            .lock()
            .map_err(|_| LogError::Invalid("group map poisoned".into()))?;
        if let Some(consumer) = groups.get(group) {
            return Ok(consumer.clone());
        }
        let consumer: BaseConsumer = self
            .options
            .client_config()
            .set("group.id", self.options.group_id(group))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .create()
            .map_err(|e| kafka("creating a committing consumer", e))?;
        let consumer = Arc::new(consumer);
        groups.insert(group.to_owned(), consumer.clone());
        Ok(consumer)
    }
}

#[async_trait]
impl EventLog for KafkaLog {
    fn layout(&self) -> Layout {
        self.layout
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            dedupes_event_ids: false,
            atomic_append: false,
        }
    }

    async fn append(&self, events: &[Envelope]) -> Result<Vec<Offset>, LogError> {
        let mut deliveries = Vec::with_capacity(events.len());
        for event in events {
            let partition = self.layout.partition_of(event);
            let payload = event.encode_to_vec();
            deliveries.push(
                self.enqueue(partition, &event.partition_key(), &payload)
                    .await?,
            );
        }
        let mut offsets = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            offsets.push(delivered(delivery.await)?);
        }
        Ok(offsets)
    }

    async fn read_partition(
        &self,
        partition: Partition,
        from: Offset,
        max: usize,
    ) -> Result<Vec<Record>, LogError> {
        let (topic, index) = self.locate(partition)?;
        if max == 0 {
            return Ok(Vec::new());
        }
        let topic = topic.to_owned();
        let timeout = self.options.timeout;
        let records = self
            .with_reader(move |reader| {
                read_blocking(reader, &topic, index, partition, from, max, timeout)
            })
            .await?;
        self.records_read
            .fetch_add(records.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(records)
    }

    async fn read_key_in(
        &self,
        topic: Topic,
        key: &str,
        from: Offset,
        max: usize,
    ) -> Result<Vec<Record>, LogError> {
        // Kafka has no index by key: scan the key's partition from `from` (callers start at
        // the key's first record they know of). Pages grow from `max` records, so a read of
        // one record at its offset fetches one, and a long scan pages by 4096.
        let partition = self.layout.partition_for(topic, key);
        let mut found = Vec::new();
        let mut next = from;
        let mut page_size = max.clamp(1, KEY_SCAN_PAGE);
        while found.len() < max {
            let page = self.read_partition(partition, next, page_size).await?;
            let Some(last) = page.last() else { break };
            next = last.offset + 1;
            found.extend(page.into_iter().filter(|r| r.key == key));
            page_size = (page_size * 2).min(KEY_SCAN_PAGE);
        }
        found.truncate(max);
        Ok(found)
    }

    async fn end_offsets(&self) -> Result<Vec<Offset>, LogError> {
        let targets: Vec<(String, i32)> = self
            .layout
            .all()
            .map(|p| {
                self.locate(p)
                    .map(|(topic, index)| (topic.to_owned(), index))
            })
            .collect::<Result<_, _>>()?;
        let timeout = self.options.timeout;
        self.with_reader(move |reader| {
            targets
                .iter()
                .map(|(topic, index)| {
                    let (_, high) =
                        retrying(timeout, || reader.fetch_watermarks(topic, *index, timeout))
                            .map_err(|e| kafka(&format!("end offset of {topic}[{index}]"), e))?;
                    Ok(high.max(0) as Offset)
                })
                .collect()
        })
        .await
    }

    async fn probe(&self, within: Duration) -> Result<(), LogError> {
        let topic = self.events_topic.clone();
        let brokers = self.options.brokers.clone();
        self.with_reader(move |reader| {
            reader
                .fetch_metadata(Some(&topic), within)
                .map(|_| ())
                .map_err(|e| kafka(&format!("Kafka brokers {brokers} unreachable"), e))
        })
        .await
    }

    fn subscribe_partitions(&self, from: &[(Partition, Offset)]) -> Box<dyn Subscription> {
        match self.start_subscription(from) {
            Ok(subscription) => Box::new(subscription),
            Err(error) => Box::new(FailedSubscription::new(error, from)),
        }
    }

    async fn commit_partitions(
        &self,
        group: &str,
        positions: &[(Partition, Offset)],
    ) -> Result<(), LogError> {
        if positions.is_empty() {
            return Ok(());
        }
        let mut list = TopicPartitionList::new();
        for (partition, next) in positions {
            let (topic, index) = self.locate(*partition)?;
            let next = i64::try_from(*next)
                .map_err(|_| LogError::Invalid(format!("offset {next} is out of range")))?;
            list.add_partition_offset(topic, index, KafkaOffset::Offset(next))
                .map_err(|e| kafka("building the commit", e))?;
        }
        let consumer = self.group_consumer(group)?;
        let group = group.to_owned();
        let timeout = self.options.timeout;
        tokio::task::spawn_blocking(move || {
            retrying(timeout, || consumer.commit(&list, CommitMode::Sync))
                .map_err(|e| kafka(&format!("committing offsets of group {group}"), e))
        })
        .await
        .map_err(join_error)?
    }

    async fn committed_partitions(
        &self,
        group: &str,
    ) -> Result<BTreeMap<Partition, Offset>, LogError> {
        let mut list = TopicPartitionList::new();
        let mut flat = HashMap::new();
        for partition in self.layout.all() {
            let (topic, index) = self.locate(partition)?;
            list.add_partition(topic, index);
            flat.insert((topic.to_owned(), index), partition);
        }
        let consumer = self.group_consumer(group)?;
        let timeout = self.options.timeout;
        let group = group.to_owned();
        tokio::task::spawn_blocking(move || {
            // The list librdkafka returns must be dropped before the consumer is (a live one
            // makes the consumer's drop hang): it lives only inside this closure.
            let committed = retrying(timeout, || {
                consumer.committed_offsets(list.clone(), timeout)
            })
            .map_err(|e| kafka(&format!("reading committed offsets of group {group}"), e))?;
            let mut positions = BTreeMap::new();
            for element in committed.elements() {
                if let KafkaOffset::Offset(next) = element.offset() {
                    let key = (element.topic().to_owned(), element.partition());
                    if let (Some(partition), Ok(next)) = (flat.get(&key), Offset::try_from(next)) {
                        positions.insert(*partition, next);
                    }
                }
            }
            drop(committed);
            Ok(positions)
        })
        .await
        .map_err(join_error)?
    }

    async fn join_group(
        &self,
        group: &str,
        topics: &[Topic],
    ) -> Result<Box<dyn GroupSubscription>, LogError> {
        Ok(Box::new(self.join_kafka_group(group, topics)?))
    }

    async fn append_raw(&self, key: &str, data: Vec<u8>) -> Result<Offset, LogError> {
        let partition = self.layout.partition_for(Topic::Events, key);
        let delivery = self.enqueue(partition, key, &data).await?;
        delivered(delivery.await)
    }
}

impl KafkaLog {
    /// [`EventLog::join_group`], as the Kafka group member it is.
    pub fn join_kafka_group(
        &self,
        group: &str,
        topics: &[Topic],
    ) -> Result<KafkaGroupMember, LogError> {
        let mut map = group::PartitionMap { topics: Vec::new() };
        for topic in topics {
            let range = self.layout.topic_partitions(*topic);
            let name = match topic {
                Topic::Logs if self.layout.logs > 0 => &self.logs_topic,
                _ => &self.events_topic,
            };
            if !map.topics.iter().any(|(n, _, _)| n == name) {
                map.topics
                    .push((name.clone(), range.start, range.end - range.start));
            }
        }
        if map.topics.is_empty() {
            return Err(LogError::Invalid(
                "a group member needs at least one topic".into(),
            ));
        }
        group::join(&self.options, group, map)
    }

    /// [`EventLog::subscribe_partitions`], as the Kafka subscription it is.
    pub fn start_subscription(
        &self,
        from: &[(Partition, Offset)],
    ) -> Result<KafkaSubscription, LogError> {
        if from.is_empty() {
            return Err(LogError::Invalid(
                "a subscription needs at least one partition".into(),
            ));
        }
        let mut routes = Vec::with_capacity(from.len());
        for (partition, offset) in from {
            let (topic, index) = self.locate(*partition)?;
            if routes.iter().any(|r: &Route| r.partition == *partition) {
                return Err(LogError::Invalid(format!(
                    "partition {partition} is listed twice in a subscription"
                )));
            }
            routes.push(Route {
                topic: topic.to_owned(),
                index,
                partition: *partition,
                next: *offset,
            });
        }
        let consumer = assigned_reader(&self.options, &routes)?;
        let (tx, rx) = mpsc::channel(4);
        let (control, controls) = std::sync::mpsc::channel();
        let closed = self.closed.subscribe();
        let positions = routes.iter().map(|r| (r.partition, r.next)).collect();
        let follower = Follower {
            consumer,
            routes,
            tx,
            closed: closed.clone(),
            controls,
            options: self.options.clone(),
        };
        std::thread::Builder::new()
            .name("eventlog-kafka-sub".into())
            .spawn(move || follower.run())?;
        Ok(KafkaSubscription {
            rx,
            closed,
            positions,
            control,
        })
    }
}

/// A subscription to a [`KafkaLog`]; see the [module docs](self).
pub struct KafkaSubscription {
    rx: mpsc::Receiver<Vec<Record>>,
    closed: watch::Receiver<()>,
    positions: Vec<(Partition, Offset)>,
    control: std::sync::mpsc::Sender<Control>,
}

/// Orders to a subscription's thread.
enum Control {
    /// Stop fetching `partition` (librdkafka's pause), as a stalled fetch would.
    Pause(Partition),
}

impl KafkaSubscription {
    /// For tests of the stall recovery: makes the consumer stop fetching `partition`, as
    /// librdkafka sometimes does by itself after a broker restart. The subscription must notice
    /// and recover (`kafka/stall.rs`).
    #[doc(hidden)]
    pub fn stall_for_test(&self, partition: Partition) {
        let _ = self.control.send(Control::Pause(partition));
    }
}

#[async_trait]
impl Subscription for KafkaSubscription {
    async fn next_batch(&mut self) -> Result<Vec<Record>, LogError> {
        if self.closed.has_changed().is_err() {
            return Err(LogError::Closed);
        }
        let batch = tokio::select! {
            batch = self.rx.recv() => batch,
            _ = closed(&mut self.closed) => None,
        };
        let Some(batch) = batch else {
            return Err(LogError::Closed);
        };
        for record in &batch {
            if let Some((_, next)) = self
                .positions
                .iter_mut()
                .find(|(p, _)| *p == record.partition)
            {
                *next = record.offset + 1;
            }
        }
        Ok(batch)
    }

    fn position(&self) -> Offset {
        self.positions.first().map_or(0, |(_, next)| *next)
    }

    fn positions(&self) -> Vec<(Partition, Offset)> {
        self.positions.clone()
    }
}

/// Resolves when the log is dropped.
async fn closed(rx: &mut watch::Receiver<()>) {
    while rx.changed().await.is_ok() {}
}

/// Where a subscribed Kafka partition's records go, and the next offset it expects.
struct Route {
    topic: String,
    index: i32,
    partition: Partition,
    next: Offset,
}

/// A subscription's thread: polls its consumer and hands batches to `tx` until the subscription
/// or the log is dropped; replaces the consumer when a partition stalls (`kafka/stall.rs`).
struct Follower {
    consumer: BaseConsumer,
    routes: Vec<Route>,
    tx: mpsc::Sender<Vec<Record>>,
    closed: watch::Receiver<()>,
    controls: std::sync::mpsc::Receiver<Control>,
    options: KafkaOptions,
}

impl Follower {
    fn run(mut self) {
        let max_batch = self.options.subscription_batch.max(1);
        let mut last_error: Option<Instant> = None;
        let mut stalls =
            stall::StallWatch::new(self.options.stall_check, Instant::now(), &self.nexts());
        loop {
            if self.closed.has_changed().is_err() || self.tx.is_closed() {
                return;
            }
            while let Ok(control) = self.controls.try_recv() {
                self.obey(control);
            }
            let mut batch = Vec::new();
            let mut next = self.consumer.poll(Duration::from_millis(100));
            while let Some(polled) = next.take() {
                match polled {
                    Ok(message) => {
                        if let Some(record) = route(&mut self.routes, &message) {
                            batch.push(record);
                        }
                    }
                    Err(error) => {
                        // librdkafka reconnects by itself; say so at most once a second.
                        if last_error.is_none_or(|at| at.elapsed() > Duration::from_secs(1)) {
                            tracing::warn!(%error, "Kafka subscription: fetch error, retrying");
                            last_error = Some(Instant::now());
                        }
                    }
                }
                if batch.len() < max_batch {
                    next = self.consumer.poll(Duration::ZERO);
                }
            }
            if !batch.is_empty() {
                let sent = Instant::now();
                if self.tx.blocking_send(batch).is_err() {
                    return;
                }
                if sent.elapsed() > stalls.period() / 2 {
                    // The reader held us back: not fetching was not the consumer's doing.
                    stalls.reset(Instant::now(), &self.nexts());
                }
            }
            let now = Instant::now();
            if stalls.due(now) {
                let nexts = self.nexts();
                let wait = self.options.timeout.min(WATERMARK_WAIT);
                let stalled = stalls.check(now, &nexts, |i| {
                    let route = &self.routes[i];
                    high_watermark(&self.consumer, &route.topic, route.index, wait)
                });
                if !stalled.is_empty() {
                    self.replace_consumer(&stalled);
                }
            }
        }
    }

    fn nexts(&self) -> Vec<Offset> {
        self.routes.iter().map(|r| r.next).collect()
    }

    /// A new consumer, assigned to every route at the offset it expects next (records already
    /// handed over are not fetched again).
    fn replace_consumer(&mut self, stalled: &[usize]) {
        for &i in stalled {
            let route = &self.routes[i];
            tracing::warn!(
                partition = route.partition,
                next = route.next,
                "Kafka subscription: the partition has records to fetch but its consumer has \
                 not fetched any for {:?}; replacing the consumer",
                self.options.stall_check
            );
        }
        match assigned_reader(&self.options, &self.routes) {
            Ok(consumer) => {
                // Closing the stalled consumer may wait on its requests: not on this thread.
                let stalled = std::mem::replace(&mut self.consumer, consumer);
                let _ = std::thread::Builder::new()
                    .name("eventlog-kafka-close".into())
                    .spawn(move || drop(stalled));
            }
            Err(error) => {
                tracing::error!(%error, "Kafka subscription: cannot replace the stalled consumer")
            }
        }
    }

    fn obey(&mut self, control: Control) {
        match control {
            Control::Pause(partition) => {
                let Some(route) = self.routes.iter().find(|r| r.partition == partition) else {
                    return;
                };
                if let Err(error) = self
                    .consumer
                    .pause(&one_partition(&route.topic, route.index))
                {
                    tracing::error!(%error, partition, "Kafka subscription: pausing failed");
                }
            }
        }
    }
}

/// A reader assigned to every route at the offset it expects next.
fn assigned_reader(options: &KafkaOptions, routes: &[Route]) -> Result<BaseConsumer, LogError> {
    let mut list = TopicPartitionList::new();
    for r in routes {
        let start = i64::try_from(r.next).unwrap_or(i64::MAX);
        list.add_partition_offset(&r.topic, r.index, KafkaOffset::Offset(start))
            .map_err(|e| kafka("building the assignment", e))?;
    }
    let consumer = new_reader(options)?;
    consumer
        .assign(&list)
        .map_err(|e| kafka("assigning the subscription's partitions", e))?;
    Ok(consumer)
}

/// The list of one partition (to pause, resume or seek it).
fn one_partition(topic: &str, index: i32) -> TopicPartitionList {
    let mut list = TopicPartitionList::new();
    list.add_partition(topic, index);
    list
}

/// How long a stall check waits for a partition's high watermark.
const WATERMARK_WAIT: Duration = Duration::from_secs(2);

/// The high watermark of `topic[index]`; `None` if the broker does not answer within `wait`.
fn high_watermark<C: rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    index: i32,
    wait: Duration,
) -> Option<Offset> {
    consumer
        .fetch_watermarks(topic, index, wait)
        .ok()
        .map(|(_, high)| high.max(0) as Offset)
}

/// The record of `message` if it belongs to a route at or after its next offset (a reset to the
/// partition's start may re-deliver offsets before a subscription's start: they are skipped).
fn route(routes: &mut [Route], message: &BorrowedMessage<'_>) -> Option<Record> {
    let route = routes
        .iter_mut()
        .find(|r| r.index == message.partition() && r.topic == message.topic())?;
    let offset = Offset::try_from(message.offset()).ok()?;
    if offset < route.next {
        return None;
    }
    route.next = offset + 1;
    Some(to_record(route.partition, message))
}

fn to_record(partition: Partition, message: &BorrowedMessage<'_>) -> Record {
    Record {
        partition,
        offset: message.offset().max(0) as Offset,
        key: String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned(),
        data: Bytes::copy_from_slice(message.payload().unwrap_or_default()),
    }
}

/// Reads up to `max` records of `topic[index]` from `from`, stopping at the high watermark seen
/// when the read began.
fn read_blocking(
    reader: &BaseConsumer,
    topic: &str,
    index: i32,
    partition: Partition,
    from: Offset,
    max: usize,
    timeout: Duration,
) -> Result<Vec<Record>, LogError> {
    let (low, high) = retrying(timeout, || reader.fetch_watermarks(topic, index, timeout))
        .map_err(|e| kafka(&format!("watermarks of {topic}[{index}]"), e))?;
    let (low, high) = (low.max(0) as Offset, high.max(0) as Offset);
    let start = from.max(low);
    if start >= high {
        return Ok(Vec::new());
    }
    let want = usize::try_from(high - start).unwrap_or(usize::MAX).min(max);
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(topic, index, KafkaOffset::Offset(start as i64))
        .map_err(|e| kafka("building the assignment", e))?;
    reader
        .assign(&list)
        .map_err(|e| kafka(&format!("assigning {topic}[{index}]"), e))?;
    let deadline = Instant::now() + timeout;
    let mut records = Vec::with_capacity(want.min(4096));
    let mut next = start;
    let result = loop {
        if records.len() >= want || next >= high {
            break Ok(());
        }
        if Instant::now() > deadline {
            break Err(LogError::Kafka(format!(
                "reading {topic}[{index}] from offset {start}: no progress at {next} within \
                 {timeout:?} (high watermark {high})"
            )));
        }
        match reader.poll(Duration::from_millis(100)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(_))) => break Ok(()),
            Some(Err(error)) => {
                tracing::debug!(%error, topic, index, "Kafka read: fetch error, retrying");
            }
            Some(Ok(message)) => {
                if message.partition() != index || message.topic() != topic {
                    continue;
                }
                let offset = message.offset().max(0) as Offset;
                if offset < next || offset >= high {
                    continue;
                }
                next = offset + 1;
                records.push(to_record(partition, &message));
            }
        }
    };
    if let Err(error) = reader.unassign() {
        tracing::debug!(%error, "unassigning a Kafka reader failed");
    }
    result.map(|()| records)
}

/// A consumer for reads and subscriptions. It only ever `assign`s partitions: it never joins
/// its group (librdkafka wants a `group.id` to assign at all) nor commits.
fn new_reader(options: &KafkaOptions) -> Result<BaseConsumer, LogError> {
    options
        .client_config()
        .set("group.id", options.group_id("__reader"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "100")
        .create()
        .map_err(|e| kafka("creating a consumer", e))
}

fn admin_client(options: &KafkaOptions) -> Result<AdminClient<DefaultClientContext>, LogError> {
    options
        .client_config()
        .create()
        .map_err(|e| kafka("creating the admin client", e))
}

fn admin_options(options: &KafkaOptions) -> AdminOptions {
    AdminOptions::new()
        .request_timeout(Some(options.timeout))
        .operation_timeout(Some(options.timeout))
}

/// Creates the topics that are missing and sets the managed settings of those that differ.
async fn ensure_topics(options: &KafkaOptions, specs: &[TopicSpec]) -> Result<(), LogError> {
    let admin = admin_client(options)?;
    let admin_options = admin_options(options);
    let new_topics: Vec<NewTopic<'_>> = specs
        .iter()
        .map(|spec| {
            let mut topic = NewTopic::new(
                &spec.name,
                spec.partitions as i32,
                TopicReplication::Fixed(options.replication_factor),
            );
            for (key, value) in &spec.config {
                topic = topic.set(key, value);
            }
            topic
        })
        .collect();
    let results = admin
        .create_topics(&new_topics, &admin_options)
        .await
        .map_err(|e| {
            kafka(
                &format!(
                    "creating topics at {} (is a broker running there? \
                     scripts/setup-brokers.sh starts one on 127.0.0.1:19092)",
                    options.brokers
                ),
                e,
            )
        })?;
    let mut existing = Vec::new();
    for result in results {
        match result {
            Ok(name) => tracing::info!(topic = %name, "created Kafka topic"),
            Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => existing.push(name),
            Err((name, code)) => {
                return Err(LogError::Kafka(format!("creating topic {name}: {code}")));
            }
        }
    }
    for spec in specs.iter().filter(|s| existing.contains(&s.name)) {
        let described = admin
            .describe_configs(&[ResourceSpecifier::Topic(&spec.name)], &admin_options)
            .await
            .map_err(|e| kafka(&format!("describing topic {}", spec.name), e))?;
        let current = match described.into_iter().next() {
            Some(Ok(resource)) => resource,
            Some(Err(code)) => {
                return Err(LogError::Kafka(format!(
                    "describing topic {}: {code}",
                    spec.name
                )));
            }
            None => continue,
        };
        let differs = spec.config.iter().any(|(key, value)| {
            current.get(key).and_then(|e| e.value.as_deref()) != Some(value.as_str())
        });
        if differs {
            let mut alter = AlterConfig::new(ResourceSpecifier::Topic(&spec.name));
            for (key, value) in &spec.config {
                alter = alter.set(key, value);
            }
            let altered = admin
                .alter_configs(&[alter], &admin_options)
                .await
                .map_err(|e| kafka(&format!("configuring topic {}", spec.name), e))?;
            if let Some(Err((_, code))) = altered.into_iter().next() {
                return Err(LogError::Kafka(format!(
                    "configuring topic {}: {code}",
                    spec.name
                )));
            }
            tracing::info!(topic = %spec.name, config = ?spec.config, "reconfigured Kafka topic");
        }
    }
    Ok(())
}

/// The partition count of `topic`, waiting (up to `timeout`) until every partition has a leader:
/// right after creation the metadata may not show them yet.
fn partition_count(reader: &BaseConsumer, topic: &str, timeout: Duration) -> Result<u32, LogError> {
    let deadline = Instant::now() + timeout;
    loop {
        let metadata = reader
            .fetch_metadata(Some(topic), timeout)
            .map_err(|e| kafka(&format!("metadata of topic {topic}"), e))?;
        let ready = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .filter(|t| t.error().is_none())
            .map(|t| t.partitions())
            .filter(|ps| {
                !ps.is_empty() && ps.iter().all(|p| p.leader() >= 0 && p.error().is_none())
            })
            .map(|ps| ps.len() as u32);
        if let Some(count) = ready {
            return Ok(count);
        }
        if Instant::now() > deadline {
            return Err(LogError::Kafka(format!(
                "topic {topic} has no leader for all of its partitions after {timeout:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `op` until it succeeds or `within` has passed, 100 ms apart: right after a topic is
/// created, or while a broker restarts or moves a leader, requests fail for a moment
/// (`NotLeaderForPartition`, `CoordinatorLoadInProgress`, transport errors). Only for operations
/// that are safe to repeat. Returns the last error.
fn retrying<T>(within: Duration, mut op: impl FnMut() -> KafkaResult<T>) -> KafkaResult<T> {
    let deadline = Instant::now() + within;
    loop {
        match op() {
            Ok(value) => return Ok(value),
            Err(error) if Instant::now() < deadline => {
                tracing::debug!(%error, "Kafka request failed; retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(error) => return Err(error),
        }
    }
}

fn delivered(
    result: Result<
        rdkafka::producer::future_producer::OwnedDeliveryResult,
        futures::channel::oneshot::Canceled,
    >,
) -> Result<Offset, LogError> {
    match result {
        Ok(Ok(delivery)) => Ok(delivery.offset.max(0) as Offset),
        Ok(Err((error, _))) => Err(kafka("appending", error)),
        Err(_) => Err(LogError::Closed),
    }
}

fn kafka(context: &str, error: KafkaError) -> LogError {
    LogError::Kafka(format!("{context}: {error}"))
}

fn join_error(error: tokio::task::JoinError) -> LogError {
    LogError::Invalid(format!("a Kafka client task failed: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_specs_follow_the_options() {
        let mut options = KafkaOptions::new("127.0.0.1:19092");
        options.topic_prefix = "ci".into();
        options.logs_retention = Duration::from_secs(3600);
        let specs = topic_specs(&options);
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[0].name, "ci.events");
        assert!(specs[0].config.contains(&("retention.ms", "-1".into())));
        assert_eq!(specs[1].name, "ci.logs");
        assert!(specs[1]
            .config
            .contains(&("retention.ms", "3600000".into())));
        options.log_partitions = 0;
        assert_eq!(topic_specs(&options).len(), 1, "no logs topic");
        assert_eq!(options.group_id("projector"), "ci.projector");
    }
}
