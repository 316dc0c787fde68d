//! `follow_build` on a partitioned Apache Kafka log (4 events partitions, 2 logs partitions):
//! a build's chunks are in another partition than its state events, so a tail must not end at
//! `BuildFinished` before it has delivered the chunks appended before it, and must skip a chunk
//! stored twice (same event id).
//!
//! The broker comes from `scripts/setup-brokers.sh` (127.0.0.1:19092); set
//! `TRIBUTARY_TEST_KAFKA` to use another.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use tokio::sync::mpsc;
use tributary_api::follow::{follow_build, BuildPartitions, Cursor, Step};
use tributary_eventlog::kafka::KafkaLog;
use tributary_eventlog::{
    Capabilities, EventLog, Layout, LogError, Offset, Partition, Record, Subscription, Topic,
};
use tributary_proto::events::{
    envelope::Payload, BuildFinished, BuildTriggered, Envelope, LogChunk, Status,
};

fn event(build: &str, payload: Payload) -> Envelope {
    Envelope::new("t", "p", build, payload)
}

fn chunk(build: &str, i: usize) -> Envelope {
    event(
        build,
        Payload::LogChunk(LogChunk {
            job: "j".into(),
            attempt: 1,
            data: format!("line-{i}\n").into_bytes(),
            ..LogChunk::default()
        }),
    )
}

/// The real Kafka log, whose subscriptions hand out log-chunk records only after the next
/// state event: the worst order Kafka may deliver two partitions in, made certain. `subscribed`
/// is notified when a subscription is made (the tail's replay is over).
struct ChunksLate(Arc<KafkaLog>, Arc<tokio::sync::Notify>);

struct LateSubscription {
    inner: Box<dyn Subscription>,
    layout: Layout,
    held: Vec<Record>,
    ready: Vec<Record>,
}

#[async_trait]
impl Subscription for LateSubscription {
    async fn next_batch(&mut self) -> Result<Vec<Record>, LogError> {
        if !self.ready.is_empty() {
            return Ok(std::mem::take(&mut self.ready));
        }
        loop {
            let batch = self.inner.next_batch().await?;
            let (events, logs): (Vec<Record>, Vec<Record>) = batch.into_iter().partition(|r| {
                self.layout.locate(r.partition).map(|(t, _)| t) == Some(Topic::Events)
            });
            self.held.extend(logs);
            if !events.is_empty() {
                self.ready = std::mem::take(&mut self.held);
                return Ok(events);
            }
        }
    }

    fn position(&self) -> Offset {
        self.inner.position()
    }

    fn positions(&self) -> Vec<(Partition, Offset)> {
        self.inner.positions()
    }
}

#[async_trait]
impl EventLog for ChunksLate {
    fn layout(&self) -> Layout {
        self.0.layout()
    }
    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }
    async fn append(&self, events: &[Envelope]) -> Result<Vec<Offset>, LogError> {
        self.0.append(events).await
    }
    async fn read_partition(
        &self,
        partition: Partition,
        from: Offset,
        max: usize,
    ) -> Result<Vec<Record>, LogError> {
        self.0.read_partition(partition, from, max).await
    }
    async fn read_key_in(
        &self,
        topic: Topic,
        key: &str,
        from: Offset,
        max: usize,
    ) -> Result<Vec<Record>, LogError> {
        self.0.read_key_in(topic, key, from, max).await
    }
    async fn end_offsets(&self) -> Result<Vec<Offset>, LogError> {
        self.0.end_offsets().await
    }
    fn subscribe_partitions(&self, from: &[(Partition, Offset)]) -> Box<dyn Subscription> {
        self.1.notify_one();
        Box::new(LateSubscription {
            inner: self.0.subscribe_partitions(from),
            layout: self.0.layout(),
            held: Vec::new(),
            ready: Vec::new(),
        })
    }
    async fn commit_partitions(
        &self,
        group: &str,
        positions: &[(Partition, Offset)],
    ) -> Result<(), LogError> {
        self.0.commit_partitions(group, positions).await
    }
    async fn committed_partitions(
        &self,
        group: &str,
    ) -> Result<BTreeMap<Partition, Offset>, LogError> {
        self.0.committed_partitions(group).await
    }
}

/// Runs a tail of `build` to its end; returns what it sent (chunk text, then "END").
async fn tail(log: Arc<dyn EventLog>, build: String, follow: bool) -> Vec<String> {
    let (tx, mut rx) = mpsc::channel(64);
    let task = tokio::spawn(async move {
        follow_build(
            log.as_ref(),
            &build,
            Cursor::at(0),
            follow,
            &tx,
            |_, env, _| match &env.payload {
                Some(Payload::LogChunk(c)) => {
                    Step::Send(String::from_utf8_lossy(&c.data).into_owned())
                }
                Some(Payload::BuildFinished(_)) => Step::Last("END".to_owned()),
                _ => Step::Skip,
            },
        )
        .await;
    });
    let mut got = Vec::new();
    while let Some(item) = tokio::time::timeout(Duration::from_secs(120), rx.recv())
        .await
        .expect("the tail ends")
    {
        got.push(item.expect("no log error"));
    }
    task.await.expect("tail task");
    got
}

fn expected(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("line-{i}\n"))
        .chain(["END".to_owned()])
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tail_ends_after_every_chunk_appended_before_build_finished_exactly_once() {
    tributary_testkit::require!(Kafka);
    let options = tributary_testkit::kafka_options("follow", 4, 2);
    let log = Arc::new(KafkaLog::connect(options).await.expect("connect"));
    let build = tributary_proto::new_id();
    assert!(!BuildPartitions::of(log.layout(), &build).shared());
    let triggered = event(&build, Payload::BuildTriggered(BuildTriggered::default()));
    log.append(&[triggered]).await.expect("append");

    // Tails that start before any output and follow; one sees every chunk only after
    // BuildFinished.
    let live = tokio::spawn(tail(log.clone(), build.clone(), true));
    let subscribed = Arc::new(tokio::sync::Notify::new());
    let late = tokio::spawn(tail(
        Arc::new(ChunksLate(log.clone(), subscribed.clone())),
        build.clone(),
        true,
    ));
    tokio::time::timeout(Duration::from_secs(120), subscribed.notified())
        .await
        .expect("the tail subscribes after its replay");
    let chunks: Vec<Envelope> = (0..600).map(|i| chunk(&build, i)).collect();
    for batch in chunks.chunks(100) {
        log.append(batch).await.expect("append chunks");
    }
    // A producer retry stored one chunk twice.
    log.append(&chunks[10..11]).await.expect("append again");
    let finished = event(
        &build,
        Payload::BuildFinished(BuildFinished {
            status: Status::Succeeded as i32,
            ..BuildFinished::default()
        }),
    );
    log.append(&[finished]).await.expect("append");

    assert_eq!(live.await.expect("live tail"), expected(600));
    assert_eq!(late.await.expect("late-chunks tail"), expected(600));
    // Replays of the finished build: the state events are read first, so BuildFinished is seen
    // before any chunk; the tail still delivers them all before its end.
    assert_eq!(tail(log.clone(), build.clone(), true).await, expected(600));
    assert_eq!(tail(log.clone(), build.clone(), false).await, expected(600));
    let _ = log.delete_topics().await;
}
