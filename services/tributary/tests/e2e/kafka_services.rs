//! The API and scheduler services on a partitioned Apache Kafka log (4 events partitions, 2
//! logs partitions), with real agents (the agent runtime in-process over loopback gRPC, as
//! `tributary up` runs them) and a SQLite builds store.
//!
//! * builds with a DAG and a matrix finish; a `TailLogs` started mid-build sees every line
//!   exactly once and ends after the last one; `WatchEvents` across partitions, resumed from
//!   `(partition, offset)` positions; exactly one `JobAssigned` per (job, attempt);
//! * two scheduler services with disjoint partition sets run 30 builds, and one partition moves
//!   from one to the other mid-run: every build finishes, one `JobAssigned` per (job, attempt).
//!
//! The broker comes from `scripts/setup-brokers.sh` (127.0.0.1:19092); set
//! `TRIBUTARY_TEST_KAFKA` to use another. Every test has topics of its own, deleted at the end.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use common::{commit_all, git};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tributary_eventlog::kafka::KafkaLog;
use tributary_eventlog::{EventLog, Partition, Topic};
use tributary_proto::api::{
    builds_client::BuildsClient, projects_client::ProjectsClient, CreateProjectRequest, Position,
    TailLogsRequest, TriggerBuildRequest, WatchEventsRequest,
};
use tributary_proto::events::{envelope::Payload, Envelope};
use tributary_scheduler::cluster::ClusterConfig;
use tributary_scheduler::service::{self, Partitions};

/// Generous bound for anything that waits on builds (the machine may be loaded).
const PATIENCE: Duration = Duration::from_secs(300);

async fn kafka_log() -> Arc<KafkaLog> {
    let options = tributary_testkit::kafka_options("svc", 4, 2);
    Arc::new(
        KafkaLog::connect(options)
            .await
            .expect("connect to Kafka and create the topics"),
    )
}

/// The API on a free loopback port, over `log`, with an admin token; agents; schedulers.
struct Stack {
    kafka: Arc<KafkaLog>,
    log: Arc<dyn EventLog>,
    addr: String,
    token: String,
    dir: tempfile::TempDir,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Stack {
    async fn start() -> Stack {
        let kafka = kafka_log().await;
        let log: Arc<dyn EventLog> = kafka.clone();
        let dir = tempfile::tempdir().expect("temp dir");
        let (token, sha256) = tributary_api::auth::new_token();
        log.append(&tributary_testkit::tenant_with_admin_token(
            "default", sha256,
        ))
        .await
        .expect("append admin");
        let store = tributary_projections::BuildsStore::open(&dir.path().join("readmodels.db"))
            .await
            .expect("builds store");
        let stop = CancellationToken::new();
        let (addr, api) = common::serve_api(log.clone(), store, dir.path(), &stop).await;
        Stack {
            kafka,
            log,
            addr,
            token,
            dir,
            stop,
            tasks: vec![api],
        }
    }

    /// A scheduler service owning what `assigned` says; returns what it decides for.
    fn scheduler(
        &mut self,
        assigned: watch::Receiver<BTreeSet<Partition>>,
    ) -> watch::Receiver<BTreeSet<Partition>> {
        let (partitions, deciding) = Partitions::new(assigned);
        let config = ClusterConfig {
            lease_ttl_us: 30_000_000,
            agent_ttl_us: 30_000_000,
            ..ClusterConfig::default()
        };
        let log = self.log.clone();
        let stop = self.stop.clone();
        self.tasks.push(tokio::spawn(async move {
            if let Err(e) =
                service::run(log, config, Duration::from_millis(250), partitions, stop).await
            {
                panic!("scheduler failed: {e}");
            }
        }));
        deciding
    }

    /// `n` agents of capacity 2, the same runtime as `tributary agent`.
    fn agents(&mut self, n: usize) {
        for i in 0..n {
            let mut config = tributary_agent::AgentConfig::new(
                self.addr.clone(),
                self.dir.path().join(format!("agent-{i}")),
            );
            config.enrollment_token = Some(self.token.clone());
            config.name = format!("agent-{i}");
            config.capacity = 2;
            let stop = self.stop.clone();
            self.tasks.push(tokio::spawn(async move {
                let _ = tributary_agent::run(config, stop).await;
            }));
        }
    }

    async fn builds(&self) -> BuildsClient<Channel> {
        BuildsClient::connect(self.addr.clone())
            .await
            .expect("connect")
    }

    fn authed<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        let value = format!("Bearer {}", self.token).parse().expect("header");
        request.metadata_mut().insert("authorization", value);
        request
    }

    /// A git repository whose `.tributary.yml` is `pipeline`, added as project `name`.
    async fn project(&self, name: &str, pipeline: &str) {
        let repo = self.dir.path().join(format!("repo-{name}"));
        std::fs::create_dir_all(&repo).expect("repo dir");
        git(&repo, &["init", "-q", "-b", "main"]);
        std::fs::write(repo.join(".tributary.yml"), pipeline).expect("pipeline");
        commit_all(&repo, "init");
        let mut client = ProjectsClient::connect(self.addr.clone())
            .await
            .expect("connect");
        client
            .create_project(self.authed(CreateProjectRequest {
                name: name.into(),
                repository: repo.display().to_string(),
                ..Default::default()
            }))
            .await
            .expect("create project");
    }

    /// Triggers a build; returns its id and where to watch it from.
    async fn trigger(&self, project: &str) -> (String, Vec<Position>) {
        let resp = self
            .builds()
            .await
            .trigger_build(self.authed(TriggerBuildRequest {
                project: project.into(),
                ..Default::default()
            }))
            .await
            .expect("trigger")
            .into_inner();
        (resp.build_id, resp.from)
    }

    /// Waits (through WatchEvents) for the build's BuildFinished; returns its status name.
    async fn finished(&self, build_id: &str, from: Vec<Position>) -> String {
        let mut stream = self
            .builds()
            .await
            .watch_events(self.authed(WatchEventsRequest {
                build_id: build_id.into(),
                from,
                types: vec!["build_finished".into()],
                ..Default::default()
            }))
            .await
            .expect("watch")
            .into_inner();
        let event = tokio::time::timeout(PATIENCE, stream.message())
            .await
            .unwrap_or_else(|_| panic!("build {build_id} did not finish"))
            .expect("watch stream")
            .expect("a BuildFinished");
        match event.event.and_then(|e| e.payload) {
            Some(Payload::BuildFinished(f)) => tributary_proto::events::Status::try_from(f.status)
                .map_or("unknown", |s| s.name())
                .to_owned(),
            other => panic!("expected BuildFinished, got {other:?}"),
        }
    }

    /// Every decodable state event on the log, with its partition.
    async fn events(&self) -> Vec<(Partition, Envelope)> {
        let ends = self.log.end_offsets().await.expect("ends");
        let mut all = Vec::new();
        for p in self.log.layout().topic_partitions(Topic::Events) {
            let mut next = 0;
            while next < ends[p as usize] {
                let records = self.log.read_partition(p, next, 1000).await.expect("read");
                let Some(last) = records.last() else { break };
                next = last.offset + 1;
                all.extend(
                    records
                        .iter()
                        .filter_map(|r| r.decode().ok().map(|e| (p, e))),
                );
            }
        }
        all
    }

    /// Stops everything and deletes the topics.
    async fn shutdown(self) {
        self.stop.cancel();
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
        }
        let _ = self.kafka.delete_topics().await;
    }
}

/// Per (build, job, attempt), how many JobAssigned the log has.
fn assignments(events: &[(Partition, Envelope)]) -> BTreeMap<(String, String, u32), usize> {
    let mut count = BTreeMap::new();
    for (_, env) in events {
        if let Some(Payload::JobAssigned(a)) = &env.payload {
            *count
                .entry((env.build_id.clone(), a.job.clone(), a.attempt))
                .or_default() += 1;
        }
    }
    count
}

const DAG: &str = r#"
jobs:
  first:
    steps:
      - script:
          - for i in $(seq 1 40); do echo "first-$i"; done
  slow:
    needs: first
    matrix:
      n: ["1", "2"]
    steps:
      - name: count
        script:
          - for i in $(seq 1 60); do echo "slow-${{ matrix.n }}-$i"; sleep 0.02; done
      - name: more
        script:
          - echo "slow-${{ matrix.n }}-done"
  last:
    needs: slow
    steps:
      - script:
          - echo last-1
          - echo last-2 >&2
"#;

/// Output of a finished tail: bytes per job, and the build status of its last message.
async fn tail(
    stack: &Stack,
    build_id: &str,
    follow: bool,
) -> (BTreeMap<String, String>, String, usize) {
    let mut stream = stack
        .builds()
        .await
        .tail_logs(stack.authed(TailLogsRequest {
            build_id: build_id.into(),
            follow,
            ..Default::default()
        }))
        .await
        .expect("tail")
        .into_inner();
    let mut per_job: BTreeMap<String, String> = BTreeMap::new();
    let mut status = String::new();
    let mut after_end = 0;
    loop {
        let message = tokio::time::timeout(PATIENCE, stream.message())
            .await
            .expect("the tail ends")
            .expect("tail stream");
        let Some(line) = message else { break };
        if !status.is_empty() {
            after_end += 1;
        }
        if !line.build_status.is_empty() {
            status = line.build_status.clone();
            continue;
        }
        per_job
            .entry(line.job.clone())
            .or_default()
            .push_str(&String::from_utf8_lossy(&line.data));
    }
    (per_job, status, after_end)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dag_and_matrix_builds_finish_with_exact_tails_and_watches_across_partitions() {
    tributary_testkit::require!(Kafka);
    let mut stack = Stack::start().await;
    let (_tx, assigned) = watch::channel((0..4).collect::<BTreeSet<Partition>>());
    stack.scheduler(assigned);
    stack.agents(2);
    stack.project("dag", DAG).await;

    // Builds land on several partitions; each finishes.
    let mut builds = Vec::new();
    let mut partitions = BTreeSet::new();
    while builds.len() < 4 || partitions.len() < 2 {
        let (id, from) = stack.trigger("dag").await;
        partitions.insert(stack.log.layout().partition_for(Topic::Events, &id));
        builds.push((id, from));
        assert!(builds.len() < 20, "20 builds all on one partition");
    }

    // A tail opened mid-build (its first job has started) sees every line exactly once and
    // ends after the last chunk.
    let (id, from) = &builds[0];
    let mut watch = stack
        .builds()
        .await
        .watch_events(stack.authed(WatchEventsRequest {
            build_id: id.clone(),
            from: from.clone(),
            types: vec!["job_started".into(), "build_finished".into()],
            ..Default::default()
        }))
        .await
        .expect("watch")
        .into_inner();
    let started = tokio::time::timeout(PATIENCE, watch.message())
        .await
        .expect("a job starts")
        .expect("watch")
        .expect("an event");
    assert!(
        matches!(
            started.event.and_then(|e| e.payload),
            Some(Payload::JobStarted(_))
        ),
        "the build finished before a tail could start mid-build"
    );
    let (live, status, after_end) = tail(&stack, id, true).await;
    assert_eq!(status, "succeeded");
    assert_eq!(after_end, 0, "nothing after the final message");
    let expected_lines = |job: &str| -> Vec<String> {
        match job {
            "first" => (1..=40).map(|i| format!("first-{i}")).collect(),
            "last" => vec!["last-1".into(), "last-2".into()],
            slow => {
                // `slow[n=1]`
                let n = slow
                    .trim_end_matches(']')
                    .rsplit('=')
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                (1..=60)
                    .map(|i| format!("slow-{n}-{i}"))
                    .chain([format!("slow-{n}-done")])
                    .collect()
            }
        }
    };
    assert_eq!(live.len(), 4, "four jobs logged: {:?}", live.keys());
    for (job, text) in &live {
        for want in expected_lines(job) {
            let times = text.lines().filter(|l| *l == want).count();
            assert_eq!(times, 1, "{want} seen {times} times in job {job}:\n{text}");
        }
    }
    // The same as a replay of the finished build.
    let (replayed, replay_status, _) = tail(&stack, id, false).await;
    assert_eq!(replayed, live);
    assert_eq!(replay_status, "succeeded");

    for (id, from) in &builds {
        assert_eq!(stack.finished(id, from.clone()).await, "succeeded", "{id}");
    }

    // WatchEvents over every partition: each build's BuildFinished once, on its partition;
    // resumed from the positions seen, nothing old comes again.
    let mut all = stack
        .builds()
        .await
        .watch_events(stack.authed(WatchEventsRequest {
            types: vec!["build_finished".into(), "build_triggered".into()],
            ..Default::default()
        }))
        .await
        .expect("watch")
        .into_inner();
    let mut finished = BTreeMap::new();
    let mut next: BTreeMap<u32, u64> = BTreeMap::new();
    while finished.len() < builds.len() {
        let e = tokio::time::timeout(PATIENCE, all.message())
            .await
            .expect("every BuildFinished")
            .expect("watch")
            .expect("event");
        let env = e.event.expect("envelope");
        assert_eq!(
            e.partition,
            stack
                .log
                .layout()
                .partition_for(Topic::Events, &env.build_id)
        );
        next.insert(e.partition, e.offset + 1);
        if matches!(env.payload, Some(Payload::BuildFinished(_))) {
            *finished.entry(env.build_id).or_insert(0) += 1;
        }
    }
    for (id, _) in &builds {
        assert_eq!(finished.get(id), Some(&1), "{id}");
    }
    let (fresh, fresh_from) = stack.trigger("dag").await;
    let mut resumed = stack
        .builds()
        .await
        .watch_events(
            stack.authed(WatchEventsRequest {
                types: vec!["build_triggered".into()],
                from: next
                    .iter()
                    .map(|(p, o)| Position {
                        partition: *p,
                        offset: *o,
                    })
                    .collect(),
                ..Default::default()
            }),
        )
        .await
        .expect("watch")
        .into_inner();
    let first = tokio::time::timeout(PATIENCE, resumed.message())
        .await
        .expect("the new build's trigger")
        .expect("watch")
        .expect("event");
    assert_eq!(first.event.expect("envelope").build_id, fresh);
    assert_eq!(stack.finished(&fresh, fresh_from).await, "succeeded");

    // A single offset cannot start a watch of a partitioned log.
    let refused = stack
        .builds()
        .await
        .watch_events(stack.authed(WatchEventsRequest {
            from_offset: 3,
            ..Default::default()
        }))
        .await;
    assert_eq!(
        refused.err().map(|s| s.code()),
        Some(tonic::Code::InvalidArgument)
    );

    let counts = assignments(&stack.events().await);
    assert!(!counts.is_empty());
    for (key, n) in &counts {
        assert_eq!(*n, 1, "{key:?} assigned {n} times");
    }
    stack.shutdown().await;
}

const SMALL: &str = r#"
jobs:
  a:
    steps:
      - script:
          - echo a
  b:
    needs: a
    matrix:
      n: ["1", "2"]
    steps:
      - script:
          - echo b-${{ matrix.n }}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_schedulers_with_disjoint_partitions_assign_each_job_once_and_hand_over_cleanly() {
    tributary_testkit::require!(Kafka);
    let mut stack = Stack::start().await;
    let (to_a, assigned_a) = watch::channel(BTreeSet::from([0, 1]));
    let (to_b, assigned_b) = watch::channel(BTreeSet::from([2, 3]));
    let mut deciding_a = stack.scheduler(assigned_a);
    let mut deciding_b = stack.scheduler(assigned_b);
    stack.agents(3);
    stack.project("small", SMALL).await;

    let mut builds = Vec::new();
    for _ in 0..15 {
        builds.push(stack.trigger("small").await);
    }
    // Mid-run, partition 1 moves from A to B: A lets go (and says so once nothing of it is in
    // flight), then B takes it and catches up before deciding for it.
    to_a.send(BTreeSet::from([0])).expect("A listens");
    tokio::time::timeout(PATIENCE, deciding_a.wait_for(|d| !d.contains(&1)))
        .await
        .expect("A lets partition 1 go")
        .expect("A runs");
    to_b.send(BTreeSet::from([1, 2, 3])).expect("B listens");
    for _ in 0..15 {
        builds.push(stack.trigger("small").await);
    }
    tokio::time::timeout(
        PATIENCE,
        deciding_b.wait_for(|d| d == &BTreeSet::from([1, 2, 3])),
    )
    .await
    .expect("B decides for partition 1 once caught up")
    .expect("B runs");
    assert_eq!(*deciding_a.borrow(), BTreeSet::from([0]));

    let used: BTreeSet<Partition> = builds
        .iter()
        .map(|(id, _)| stack.log.layout().partition_for(Topic::Events, id))
        .collect();
    assert!(used.len() >= 3, "30 builds on partitions {used:?} only");
    for (id, from) in &builds {
        assert_eq!(stack.finished(id, from.clone()).await, "succeeded", "{id}");
    }
    let counts = assignments(&stack.events().await);
    let built: BTreeSet<&String> = builds.iter().map(|(id, _)| id).collect();
    assert_eq!(
        counts.keys().filter(|(b, _, _)| built.contains(b)).count(),
        30 * 3,
        "every job of the 30 builds assigned"
    );
    for (key, n) in &counts {
        assert_eq!(*n, 1, "{key:?} assigned {n} times");
    }
    stack.shutdown().await;
}
