//! Consumer-group members on Kafka: a consumer `subscribe()`d to the topics with the
//! cooperative-sticky assignor, polled on a thread of its own.
//!
//! The rebalance callback runs on that thread, inside `poll`. It hands the member the change and
//! waits for its answer (the member's next call to [`GroupSubscription::next`]):
//! * assign: the member's answer carries where to start ([`GroupSubscription::start_at`]); those
//!   offsets go into the `incremental_assign`, the other partitions start at the group's
//!   committed offsets (or the beginning);
//! * revoke: records already polled are handed over first, then `Revoked`; the member's answer
//!   carries its final positions, committed synchronously before `incremental_unassign`. The
//!   polling thread drops records of partitions it does not own, so nothing of a revoked
//!   partition reaches the member after `Revoked`.
//!
//! Leaving (or dropping the member) closes the consumer: Kafka reassigns its partitions at once.
//!
//! Like a subscription's, the polling thread checks that librdkafka keeps fetching each owned
//! partition it has seen records of (`stall.rs`); a stalled one is resumed and seeked to the
//! offset after the last record handed over (the member keeps its place in the group).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::message::Message as _;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset as KafkaOffset, TopicPartitionList};
use tokio::sync::mpsc;

use super::{join_error, kafka, to_record, KafkaOptions};
use crate::{GroupEvent, GroupSubscription, LogError, Offset, Partition, Record};

/// How long the rebalance callback waits for the member to acknowledge a change. Past it the
/// hand-over goes on without the member (which is then likely stuck).
const HANDSHAKE: Duration = Duration::from_secs(120);

/// Maps Kafka (topic, partition index) to the log's flat partition numbers and back.
#[derive(Clone, Debug)]
pub(super) struct PartitionMap {
    /// (topic name, first flat partition, partition count)
    pub topics: Vec<(String, Partition, u32)>,
}

impl PartitionMap {
    fn flat(&self, topic: &str, index: i32) -> Option<Partition> {
        let index = u32::try_from(index).ok()?;
        self.topics
            .iter()
            .find(|(name, _, count)| name == topic && index < *count)
            .map(|(_, first, _)| first + index)
    }

    fn kafka(&self, partition: Partition) -> Option<(&str, i32)> {
        self.topics
            .iter()
            .find(|(_, first, count)| partition >= *first && partition < first + count)
            .map(|(name, first, _)| (name.as_str(), (partition - first) as i32))
    }

    fn flat_list(&self, tpl: &TopicPartitionList) -> Vec<Partition> {
        let mut partitions: Vec<Partition> = tpl
            .elements()
            .iter()
            .filter_map(|e| self.flat(e.topic(), e.partition()))
            .collect();
        partitions.sort_unstable();
        partitions
    }

    fn list(&self, positions: &[(Partition, Offset)]) -> Result<TopicPartitionList, LogError> {
        let mut list = TopicPartitionList::new();
        for (partition, next) in positions {
            let (topic, index) = self.kafka(*partition).ok_or_else(|| {
                LogError::Invalid(format!(
                    "partition {partition} is not in this group's topics"
                ))
            })?;
            let next = i64::try_from(*next)
                .map_err(|_| LogError::Invalid(format!("offset {next} is out of range")))?;
            list.add_partition_offset(topic, index, KafkaOffset::Offset(next))
                .map_err(|e| kafka("building the offsets", e))?;
        }
        Ok(list)
    }
}

/// The member's answer to a rebalance.
enum Answer {
    Assigned(Vec<(Partition, Offset)>),
    Revoked(Vec<(Partition, Offset)>),
}

/// State the rebalance callback shares with the polling thread.
pub(super) struct GroupContext {
    map: PartitionMap,
    events: mpsc::Sender<GroupEvent>,
    answers: Mutex<std_mpsc::Receiver<Answer>>,
    /// Flat partitions this member owns; the poller drops records of others.
    owned: Mutex<Vec<Partition>>,
    /// Records polled but not handed over yet: flushed before `Revoked`.
    pending: Mutex<Vec<Record>>,
    /// Set when the member leaves: rebalances then go on without it.
    leaving: AtomicBool,
    /// Per owned partition, the offset of the next record it should fetch: the start of its
    /// assignment (when the member gave one), then the offset after each record polled. Kept by
    /// the polling thread, which also runs the rebalance callback, so the two never interleave.
    nexts: Mutex<BTreeMap<Partition, Offset>>,
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let partitions = self.map.flat_list(tpl);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let mut list = tpl.clone();
                if !self.leaving.load(Ordering::SeqCst)
                    && self
                        .events
                        .blocking_send(GroupEvent::Assigned(partitions.clone()))
                        .is_ok()
                {
                    if let Some(Answer::Assigned(start)) = self.answer() {
                        match self.start_list(tpl, &start) {
                            Ok(with_offsets) => list = with_offsets,
                            Err(error) => {
                                tracing::error!(%error, "ignoring the member's start offsets")
                            }
                        }
                    }
                }
                lock(&self.owned).extend(&partitions);
                self.starting(&list);
                if let Err(error) = consumer.incremental_assign(&list) {
                    tracing::error!(%error, ?partitions, "Kafka group: assigning failed");
                }
                tracing::info!(?partitions, "Kafka group: partitions assigned");
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                lock(&self.owned).retain(|p| !partitions.contains(p));
                lock(&self.nexts).retain(|p, _| !partitions.contains(p));
                if !self.leaving.load(Ordering::SeqCst) {
                    let pending = std::mem::take(&mut *lock(&self.pending));
                    let handed = pending.is_empty()
                        || self
                            .events
                            .blocking_send(GroupEvent::Records(pending))
                            .is_ok();
                    if handed
                        && self
                            .events
                            .blocking_send(GroupEvent::Revoked(partitions.clone()))
                            .is_ok()
                    {
                        if let Some(Answer::Revoked(positions)) = self.answer() {
                            self.commit_on_revoke(consumer, &positions);
                        }
                    }
                }
                lock(&self.pending).retain(|r| !partitions.contains(&r.partition));
                if let Err(error) = consumer.incremental_unassign(tpl) {
                    tracing::error!(%error, ?partitions, "Kafka group: unassigning failed");
                }
                tracing::info!(?partitions, "Kafka group: partitions revoked");
            }
            other => {
                tracing::warn!(error = ?other, "Kafka group: rebalance error");
                // As librdkafka documents: on an error, drop the whole assignment.
                lock(&self.owned).clear();
                lock(&self.pending).clear();
                lock(&self.nexts).clear();
                if let Err(error) = consumer.unassign() {
                    tracing::error!(%error, "Kafka group: unassigning failed");
                }
            }
        }
    }
}

impl GroupContext {
    /// Where the partitions of an assignment start, as far as it says (an offset the member
    /// gave); a partition starting at the group's committed offset is known from its first
    /// record on.
    fn starting(&self, list: &TopicPartitionList) {
        let mut nexts = lock(&self.nexts);
        for element in list.elements() {
            let Some(partition) = self.map.flat(element.topic(), element.partition()) else {
                continue;
            };
            match element.offset() {
                KafkaOffset::Offset(start) => {
                    nexts.insert(partition, Offset::try_from(start).unwrap_or(0));
                }
                _ => {
                    nexts.remove(&partition);
                }
            }
        }
    }

    /// The partitions whose next offset is known, and those offsets, in partition order.
    fn known_nexts(&self) -> (Vec<Partition>, Vec<Offset>) {
        lock(&self.nexts).iter().map(|(p, o)| (*p, *o)).unzip()
    }

    fn answer(&self) -> Option<Answer> {
        lock(&self.answers).recv_timeout(HANDSHAKE).ok()
    }

    fn start_list(
        &self,
        tpl: &TopicPartitionList,
        start: &[(Partition, Offset)],
    ) -> Result<TopicPartitionList, LogError> {
        let mut list = TopicPartitionList::new();
        for element in tpl.elements() {
            let offset = self
                .map
                .flat(element.topic(), element.partition())
                .and_then(|p| start.iter().find(|(q, _)| *q == p))
                .and_then(|(_, next)| i64::try_from(*next).ok())
                .map_or(KafkaOffset::Invalid, KafkaOffset::Offset);
            list.add_partition_offset(element.topic(), element.partition(), offset)
                .map_err(|e| kafka("building the assignment", e))?;
        }
        Ok(list)
    }

    fn commit_on_revoke(&self, consumer: &BaseConsumer<Self>, positions: &[(Partition, Offset)]) {
        if positions.is_empty() {
            return;
        }
        let result = self.map.list(positions).and_then(|list| {
            consumer
                .commit(&list, CommitMode::Sync)
                .map_err(|e| kafka("committing on revoke", e))
        });
        if let Err(error) = result {
            tracing::error!(%error, ?positions, "Kafka group: commit on revoke failed");
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// What the member owes the group before its next event.
enum Owed {
    Nothing,
    Assigned(Vec<Partition>, Vec<(Partition, Offset)>),
    Revoked(Vec<(Partition, Offset)>),
}

/// A member of a Kafka consumer group; see the [module docs](self).
pub struct KafkaGroupMember {
    consumer: Option<Arc<BaseConsumer<GroupContext>>>,
    map: PartitionMap,
    events: mpsc::Receiver<GroupEvent>,
    answers: Option<std_mpsc::Sender<Answer>>,
    owed: Owed,
    assigned: Vec<Partition>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    timeout: Duration,
}

/// Creates the member's consumer, subscribes it to `topics` and starts its polling thread.
pub(super) fn join(
    options: &KafkaOptions,
    group: &str,
    map: PartitionMap,
) -> Result<KafkaGroupMember, LogError> {
    let (events_tx, events_rx) = mpsc::channel(4);
    let (answers_tx, answers_rx) = std_mpsc::channel();
    let context = GroupContext {
        map: map.clone(),
        events: events_tx,
        answers: Mutex::new(answers_rx),
        owned: Mutex::new(Vec::new()),
        pending: Mutex::new(Vec::new()),
        leaving: AtomicBool::new(false),
        nexts: Mutex::new(BTreeMap::new()),
    };
    let session = options.session_timeout.as_millis().max(1000);
    let consumer: BaseConsumer<GroupContext> = options
        .client_config()
        .set("group.id", options.group_id(group))
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "100")
        .set("session.timeout.ms", session.to_string())
        .set("heartbeat.interval.ms", (session / 3).to_string())
        .create_with_context(context)
        .map_err(|e| kafka("creating a group consumer", e))?;
    let topics: Vec<&str> = map
        .topics
        .iter()
        .map(|(name, _, _)| name.as_str())
        .collect();
    consumer
        .subscribe(&topics)
        .map_err(|e| kafka(&format!("subscribing group {group} to {topics:?}"), e))?;
    let consumer = Arc::new(consumer);
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let consumer = consumer.clone();
        let stop = stop.clone();
        let batch = options.subscription_batch.max(1);
        let stall_check = options.stall_check;
        std::thread::Builder::new()
            .name("eventlog-kafka-group".into())
            .spawn(move || poll(consumer, stop, batch, stall_check))?
    };
    Ok(KafkaGroupMember {
        consumer: Some(consumer),
        map,
        events: events_rx,
        answers: Some(answers_tx),
        owed: Owed::Nothing,
        assigned: Vec::new(),
        stop,
        thread: Some(thread),
        timeout: options.timeout,
    })
}

/// The polling thread: fetches records of owned partitions and hands them over in batches;
/// rebalance callbacks run inside `poll`.
fn poll(
    consumer: Arc<BaseConsumer<GroupContext>>,
    stop: Arc<AtomicBool>,
    max_batch: usize,
    stall_check: Duration,
) {
    let mut last_error: Option<Instant> = None;
    let mut stalls = Stalls::new(stall_check);
    while !stop.load(Ordering::SeqCst) {
        let mut polled = consumer.poll(Duration::from_millis(100));
        let mut count = 0;
        while let Some(result) = polled.take() {
            match result {
                Ok(message) => {
                    let context = consumer.context();
                    let partition = context.map.flat(message.topic(), message.partition());
                    if let Some(partition) = partition {
                        if lock(&context.owned).contains(&partition) {
                            lock(&context.pending).push(to_record(partition, &message));
                            count += 1;
                            if let Ok(offset) = Offset::try_from(message.offset()) {
                                lock(&context.nexts).insert(partition, offset + 1);
                            }
                        }
                    }
                }
                Err(error) => {
                    if last_error.is_none_or(|at| at.elapsed() > Duration::from_secs(1)) {
                        tracing::warn!(%error, "Kafka group member: fetch error, retrying");
                        last_error = Some(Instant::now());
                    }
                }
            }
            if count < max_batch && !stop.load(Ordering::SeqCst) {
                polled = consumer.poll(Duration::ZERO);
            }
        }
        let context = consumer.context();
        let batch = std::mem::take(&mut *lock(&context.pending));
        if !batch.is_empty() {
            let sent = Instant::now();
            if context
                .events
                .blocking_send(GroupEvent::Records(batch))
                .is_err()
            {
                break;
            }
            if sent.elapsed() > stall_check / 2 {
                stalls.held_back(context);
            }
        }
        stalls.check(&consumer);
    }
    consumer.context().leaving.store(true, Ordering::SeqCst);
    consumer.unsubscribe();
    // Dropping the last handle closes the consumer (leaving the group) on this thread.
}

/// The polling thread's stall check (see `stall.rs`) over the owned partitions whose next
/// offset it knows ([`GroupContext::nexts`]); starts over whenever that set changes.
struct Stalls {
    watch: super::stall::StallWatch,
    /// The partitions `watch` follows, in its order.
    watched: Vec<Partition>,
}

impl Stalls {
    fn new(period: Duration) -> Self {
        Stalls {
            watch: super::stall::StallWatch::new(period, Instant::now(), &[]),
            watched: Vec::new(),
        }
    }

    /// The member held the thread back: not fetching meanwhile proves nothing.
    fn held_back(&mut self, context: &GroupContext) {
        let (watched, nexts) = context.known_nexts();
        self.watched = watched;
        self.watch.reset(Instant::now(), &nexts);
    }

    fn check(&mut self, consumer: &BaseConsumer<GroupContext>) {
        let now = Instant::now();
        if !self.watch.due(now) {
            return;
        }
        let context = consumer.context();
        let (partitions, nexts) = context.known_nexts();
        if partitions != self.watched {
            self.watched = partitions;
            self.watch.reset(now, &nexts);
            return;
        }
        let map = &context.map;
        let stalled = self.watch.check(now, &nexts, |i| {
            let (topic, index) = map.kafka(self.watched[i])?;
            super::high_watermark(consumer, topic, index, super::WATERMARK_WAIT)
        });
        for i in stalled {
            let (partition, next) = (self.watched[i], nexts[i]);
            let Some((topic, index)) = map.kafka(partition) else {
                continue;
            };
            tracing::warn!(
                partition,
                next,
                "Kafka group member: the partition has records to fetch but none came for {:?}; \
                 fetching it again from the offset after the last record",
                self.watch.period()
            );
            let offset = i64::try_from(next).unwrap_or(i64::MAX);
            let refetch = consumer
                .resume(&super::one_partition(topic, index))
                .and_then(|()| {
                    consumer.seek(
                        topic,
                        index,
                        KafkaOffset::Offset(offset),
                        Duration::from_secs(5),
                    )
                });
            if let Err(error) = refetch {
                tracing::error!(%error, partition, "Kafka group member: fetching again failed");
            }
        }
    }
}

impl KafkaGroupMember {
    /// For tests of the stall recovery: makes the consumer stop fetching `partition`, as
    /// librdkafka sometimes does by itself after a broker restart.
    #[doc(hidden)]
    pub fn stall_for_test(&self, partition: Partition) {
        let Some(consumer) = &self.consumer else {
            return;
        };
        if let Some((topic, index)) = self.map.kafka(partition) {
            let _ = consumer.pause(&super::one_partition(topic, index));
        }
    }

    fn settle(&mut self) {
        let answer = match std::mem::replace(&mut self.owed, Owed::Nothing) {
            Owed::Nothing => return,
            Owed::Assigned(_, start) => Answer::Assigned(start),
            Owed::Revoked(commit) => Answer::Revoked(commit),
        };
        // The callback may have given up waiting; nothing to do then.
        if let Some(answers) = &self.answers {
            let _ = answers.send(answer);
        }
    }

    fn shut_down(&mut self) -> Option<JoinHandle<()>> {
        self.settle();
        self.stop.store(true, Ordering::SeqCst);
        if let Some(consumer) = &self.consumer {
            consumer.context().leaving.store(true, Ordering::SeqCst);
        }
        self.consumer = None;
        // A callback waiting for an answer, or the poller waiting to hand over, stop waiting.
        self.answers = None;
        self.events.close();
        self.thread.take()
    }
}

#[async_trait]
impl GroupSubscription for KafkaGroupMember {
    async fn next(&mut self) -> Result<GroupEvent, LogError> {
        self.settle();
        let event = self.events.recv().await.ok_or(LogError::Closed)?;
        match &event {
            GroupEvent::Assigned(partitions) => {
                self.assigned.extend(partitions);
                self.assigned.sort_unstable();
                self.assigned.dedup();
                self.owed = Owed::Assigned(partitions.clone(), Vec::new());
            }
            GroupEvent::Revoked(partitions) => {
                self.assigned.retain(|p| !partitions.contains(p));
                self.owed = Owed::Revoked(Vec::new());
            }
            GroupEvent::Records(_) => {}
        }
        Ok(event)
    }

    fn start_at(&mut self, positions: &[(Partition, Offset)]) {
        if let Owed::Assigned(partitions, start) = &mut self.owed {
            start.extend(positions.iter().filter(|(p, _)| partitions.contains(p)));
        }
    }

    async fn commit(&mut self, positions: &[(Partition, Offset)]) -> Result<(), LogError> {
        if positions.is_empty() {
            return Ok(());
        }
        if let Owed::Revoked(commit) = &mut self.owed {
            // Committed by the rebalance callback, as part of the hand-over.
            commit.extend_from_slice(positions);
            return Ok(());
        }
        let list = self.map.list(positions)?;
        let consumer = self.consumer.clone().ok_or(LogError::Closed)?;
        let timeout = self.timeout;
        tokio::task::spawn_blocking(move || {
            super::retrying(timeout, || consumer.commit(&list, CommitMode::Sync))
                .map_err(|e| kafka("committing the group's offsets", e))
        })
        .await
        .map_err(join_error)?
    }

    fn assigned(&self) -> Vec<Partition> {
        self.assigned.clone()
    }

    async fn leave(mut self: Box<Self>) -> Result<(), LogError> {
        if let Some(thread) = self.shut_down() {
            tokio::task::spawn_blocking(move || thread.join())
                .await
                .map_err(join_error)?
                .map_err(|_| LogError::Invalid("the Kafka group thread panicked".into()))?;
        }
        Ok(())
    }
}

impl Drop for KafkaGroupMember {
    fn drop(&mut self) {
        // The thread closes the consumer by itself; do not wait for it here.
        let _ = self.shut_down();
    }
}
