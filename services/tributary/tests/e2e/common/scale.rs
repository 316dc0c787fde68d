//! The scale-out harness: Tributary as separate processes on Apache Kafka and PostgreSQL.
//!
//! [`ScaleOut::start`] makes fresh topics (4 events partitions, 2 logs partitions) and a fresh
//! PostgreSQL database, then starts N `tributary serve api` (stateless, each on its own port,
//! the admin token registered once by the first), N `serve scheduler`, N `serve projector` and
//! N `tributary agent` processes (agent i dials API i mod N), every one with its stderr in
//! `ROOT/<name>.log`. Objects are in a directory all of them share. Helpers trigger through any
//! API replica, read the whole log (every events partition) incrementally, wait on events, kill
//! (`SIGKILL`) and restart a process, and run `tributary replay --check`.
//!
//! [`Broker`] is a single-node KRaft Kafka broker of a test's own (the jars of
//! `scripts/setup-brokers.sh`), on free ports with its own data directory, that a test can stop
//! and restart on the same port and data.
//!
//! Needs `scripts/setup-brokers.sh` (Kafka on 127.0.0.1:19092, PostgreSQL on 127.0.0.1:5432;
//! `TRIBUTARY_TEST_KAFKA` and `TRIBUTARY_TEST_DATABASE_URL` override them): fails saying so if
//! they are absent. The processes' logs are kept when a test fails, and always with
//! `TRIBUTARY_TEST_KEEP_LOGS=1`.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tributary_eventlog::kafka::{KafkaLog, KafkaOptions};
use tributary_eventlog::{EventLog, Offset, Partition, Topic};
use tributary_proto::events::envelope::Payload;
use tributary_proto::events::Envelope;

use crate::common::{bin, commit_all, free_port, git, http_get, wait_for_port, Proc};

/// How many of each process, and how they are configured.
#[derive(Clone, Debug)]
pub struct Options {
    pub apis: usize,
    pub schedulers: usize,
    pub projectors: usize,
    pub agents: usize,
    /// `tributary agent --capacity`.
    pub agent_capacity: u32,
    /// `serve scheduler --lease-ttl` (seconds).
    pub lease_ttl: f64,
    /// Brokers; `None`: the shared one of `scripts/setup-brokers.sh`.
    pub brokers: Option<String>,
    /// Objects in a fresh bucket on the test S3 server (MinIO of `scripts/setup-s3.sh`), given
    /// to the APIs and the agents (`--objects s3://…`); otherwise a shared directory for the
    /// APIs, and artifacts through the server for the agents.
    pub s3_objects: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            apis: 2,
            schedulers: 2,
            projectors: 2,
            agents: 2,
            agent_capacity: 2,
            lease_ttl: 10.0,
            brokers: None,
            s3_objects: false,
        }
    }
}

/// One process of the deployment: how it was started (to restart it alike), and its stderr.
pub struct Service {
    pub name: String,
    args: Vec<OsString>,
    /// Its stderr (appended to across restarts).
    pub log: PathBuf,
    proc: Option<Proc>,
    /// The API's listen address, or the health endpoint's (`host:port`).
    pub addr: String,
    /// Its environment beyond this process's (the S3 server's `AWS_*` variables).
    env: Vec<(String, String)>,
}

impl Service {
    fn new(
        name: &str,
        args: Vec<OsString>,
        root: &Path,
        addr: String,
        env: Vec<(String, String)>,
    ) -> Service {
        let mut service = Service {
            name: name.to_owned(),
            args,
            log: root.join(format!("{name}.log")),
            proc: None,
            addr,
            env,
        };
        service.spawn();
        service
    }

    fn spawn(&mut self) {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("service log file");
        let child = Command::new(bin())
            .args(&self.args)
            .env("TRIBUTARY_LOG", "info")
            .env_remove("TRIBUTARY_DATA")
            .env_remove("TRIBUTARY_ENGINE")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.name));
        self.proc = Some(Proc(child));
    }

    /// `kill -9`, and waits until it is gone.
    pub fn kill(&mut self) {
        let mut proc = self
            .proc
            .take()
            .unwrap_or_else(|| panic!("{} is not running", self.name));
        proc.signal(libc::SIGKILL);
        proc.wait_exit(Duration::from_secs(30));
    }

    /// Starts it again with the same flags (after [`Service::kill`]).
    pub fn restart(&mut self) {
        assert!(self.proc.is_none(), "{} is still running", self.name);
        self.spawn();
    }

    /// Whether the process still runs; panics with its log if it exited.
    pub fn assert_running(&mut self) {
        if let Some(proc) = &mut self.proc {
            if let Some(status) = proc.0.try_wait().expect("try_wait") {
                panic!(
                    "{} exited ({status}):\n{}",
                    self.name,
                    tail_of(&self.log_text(), 60)
                );
            }
        }
    }

    pub fn is_running(&self) -> bool {
        self.proc.is_some()
    }

    /// Its stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `http://ADDR` (API replicas).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `GET /metrics` of the API port or the health endpoint: the value of each sample whose
    /// line starts with `name` (labels included in the key).
    pub fn metrics(&self, name: &str) -> BTreeMap<String, f64> {
        let Some((200, body)) = http_get(&self.addr, "/metrics") else {
            panic!("{}: GET /metrics failed", self.name);
        };
        body.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| {
                let (key, value) = l.rsplit_once(' ')?;
                Some((key.to_owned(), value.parse().ok()?))
            })
            .collect()
    }
}

/// An event read back from the log, with where it is.
#[derive(Clone, Debug)]
pub struct Ev {
    pub partition: Partition,
    pub offset: Offset,
    pub env: Envelope,
}

/// The deployment; see the [module docs](self). Dropping it kills every process, deletes the
/// topics and drops the database.
pub struct ScaleOut {
    pub apis: Vec<Service>,
    pub schedulers: Vec<Service>,
    pub projectors: Vec<Service>,
    pub agents: Vec<Service>,
    pub brokers: String,
    pub prefix: String,
    /// The read models' database URL.
    pub database: String,
    db_name: String,
    pub token: String,
    pub root: PathBuf,
    /// `--objects` of the APIs (and of the agents, on S3): a directory or `s3://BUCKET`.
    pub objects: OsString,
    /// On S3: the bucket, and the environment every process gets.
    pub s3: Option<(tributary_testkit::TestS3, String)>,
    env: Vec<(String, String)>,
    /// The events read so far (every events partition, in each partition's order) and the
    /// next offset per partition; extended by [`ScaleOut::events`].
    seen: Vec<Ev>,
    next: BTreeMap<Partition, Offset>,
    /// Records that did not decode.
    pub undecodable: usize,
    pub log: Arc<KafkaLog>,
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

impl ScaleOut {
    /// Fresh topics and database, then every process (see [`Options`]).
    pub fn start(options: Options) -> ScaleOut {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let brokers = options
            .brokers
            .clone()
            .unwrap_or_else(tributary_testkit::kafka_brokers);
        let id = tributary_proto::new_id().replace('-', "");
        let prefix = format!("test-out-{id}");
        let mut kafka = KafkaOptions::new(brokers.clone());
        kafka.topic_prefix = prefix.clone();
        kafka.event_partitions = 4;
        kafka.log_partitions = 2;
        kafka.replication_factor = 1;
        let log = rt
            .block_on(KafkaLog::connect(kafka))
            .expect("connect to Kafka and create the topics");
        let (database, db_name) = rt.block_on(tributary_testkit::fresh_database());
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        std::fs::create_dir_all(root.join("objects")).expect("objects dir");
        let s3 = options.s3_objects.then(|| {
            let s3 = tributary_testkit::s3();
            let bucket = s3.fresh_bucket();
            (s3, bucket)
        });
        let (objects, env) = match &s3 {
            Some((s3, bucket)) => (
                OsString::from(format!("s3://{bucket}")),
                s3.env()
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v))
                    .collect(),
            ),
            None => (root.join("objects").into_os_string(), Vec::new()),
        };
        let mut out = ScaleOut {
            apis: Vec::new(),
            schedulers: Vec::new(),
            projectors: Vec::new(),
            agents: Vec::new(),
            brokers,
            prefix,
            database,
            db_name,
            token: String::new(),
            root,
            objects,
            s3,
            env,
            seen: Vec::new(),
            next: BTreeMap::new(),
            undecodable: 0,
            log: Arc::new(log),
            rt,
            _dir: dir,
        };
        for i in 0..options.apis {
            out.add_api(&format!("api-{i}"));
            if i == 0 {
                // The first replica creates the key and the token and registers the token;
                // the others find it on the log.
                let token_file = out.root.join("admin.token");
                crate::common::wait_until("the admin token", Duration::from_secs(120), || {
                    std::fs::read_to_string(&token_file).is_ok_and(|t| !t.trim().is_empty())
                });
                out.token = std::fs::read_to_string(&token_file)
                    .expect("token")
                    .trim()
                    .to_owned();
            }
        }
        for api in &out.apis {
            wait_for_port(&api.addr, &api.name);
        }
        for i in 0..options.schedulers {
            out.add_scheduler(&format!("scheduler-{i}"), options.lease_ttl);
        }
        for i in 0..options.projectors {
            out.add_projector(&format!("projector-{i}"));
        }
        for i in 0..options.agents {
            out.add_agent(&format!("agent-{i}"), i, options.agent_capacity);
        }
        for s in out.schedulers.iter().chain(&out.projectors) {
            wait_for_port(&s.addr, &s.name);
        }
        out
    }

    /// `--kafka … --database … --objects …` and the topic options every service gets.
    pub fn backend_flags(&self) -> Vec<OsString> {
        let mut flags: Vec<OsString> = [
            "--kafka",
            &self.brokers,
            "--kafka-topic-prefix",
            &self.prefix,
            "--kafka-event-partitions",
            "4",
            "--kafka-log-partitions",
            "2",
            "--kafka-session-timeout",
            "6",
            "--database",
            &self.database,
        ]
        .iter()
        .map(OsString::from)
        .collect();
        flags.push("--objects".into());
        flags.push(self.objects.clone());
        flags
    }

    fn service_args(&self, name: &str, serve: &[&str]) -> Vec<OsString> {
        let mut args: Vec<OsString> = serve.iter().map(OsString::from).collect();
        args.extend(self.backend_flags());
        args.push("--data".into());
        args.push(self.root.join(name).into_os_string());
        args
    }

    fn add_api(&mut self, name: &str) {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut args = self.service_args(name, &["serve", "api"]);
        for (flag, value) in [
            ("--listen", OsString::from(&addr)),
            (
                "--admin-token-file",
                self.root.join("admin.token").into_os_string(),
            ),
            (
                "--server-key-file",
                self.root.join("server.key").into_os_string(),
            ),
        ] {
            args.push(flag.into());
            args.push(value);
        }
        self.apis
            .push(Service::new(name, args, &self.root, addr, self.env.clone()));
    }

    fn add_scheduler(&mut self, name: &str, lease_ttl: f64) {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut args = self.service_args(name, &["serve", "scheduler"]);
        args.extend(
            [
                "--lease-ttl",
                &lease_ttl.to_string(),
                "--health-listen",
                &addr,
            ]
            .iter()
            .map(OsString::from),
        );
        self.schedulers
            .push(Service::new(name, args, &self.root, addr, self.env.clone()));
    }

    fn add_projector(&mut self, name: &str) {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut args = self.service_args(name, &["serve", "projector"]);
        args.extend(["--health-listen", &addr].iter().map(OsString::from));
        self.projectors
            .push(Service::new(name, args, &self.root, addr, self.env.clone()));
    }

    /// A `serve autoscaler` process on the deployment's backends, with `extra` flags (provider,
    /// configuration), agents joining API replica 0 with the admin token. The caller keeps it.
    pub fn autoscaler(&self, name: &str, extra: &[&str]) -> Service {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut args = self.service_args(name, &["serve", "autoscaler"]);
        args.extend(extra.iter().map(OsString::from));
        for (flag, value) in [
            ("--server", self.apis[0].url()),
            ("--token", self.token.clone()),
            ("--health-listen", addr.clone()),
        ] {
            args.push(flag.into());
            args.push(value.into());
        }
        Service::new(name, args, &self.root, addr, self.env.clone())
    }

    fn add_agent(&mut self, name: &str, i: usize, capacity: u32) {
        let api = &self.apis[i % self.apis.len()];
        let mut args: Vec<OsString> = vec![
            "agent".into(),
            "--server".into(),
            api.url().into(),
            "--token".into(),
            self.token.clone().into(),
            "--name".into(),
            name.into(),
            "--capacity".into(),
            capacity.to_string().into(),
            "--workdir".into(),
            self.root.join(name).into_os_string(),
        ];
        if self.s3.is_some() {
            args.push("--objects".into());
            args.push(self.objects.clone());
        }
        self.agents.push(Service::new(
            name,
            args,
            &self.root,
            String::new(),
            self.env.clone(),
        ));
    }

    /// The id of agent `i` once it has registered.
    pub fn agent_id(&self, i: usize) -> String {
        let path = self.root.join(&self.agents[i].name).join("agent.json");
        crate::common::wait_until("the agent to register", Duration::from_secs(120), || {
            std::fs::read_to_string(&path).is_ok_and(|t| {
                serde_json::from_str::<Value>(&t).is_ok_and(|v| v["agent_id"].is_string())
            })
        });
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("agent.json"))
            .expect("agent.json is JSON");
        v["agent_id"].as_str().expect("agent_id").to_owned()
    }

    /// Fails the test (with the process's log) if any process that should run has exited.
    pub fn assert_all_running(&mut self) {
        for s in self
            .apis
            .iter_mut()
            .chain(&mut self.schedulers)
            .chain(&mut self.projectors)
            .chain(&mut self.agents)
        {
            s.assert_running();
        }
    }

    /// The CLI against API replica `api` as the admin.
    pub fn cli(&self, api: usize, args: &[&str]) -> Output {
        Command::new(bin())
            .args(args)
            .env("TRIBUTARY_SERVER", self.apis[api].url())
            .env("TRIBUTARY_TOKEN", &self.token)
            .env_remove("TRIBUTARY_DATA")
            .output()
            .expect("run the CLI")
    }

    /// [`ScaleOut::cli`], which must succeed: its stdout.
    pub fn ok(&self, api: usize, args: &[&str]) -> String {
        let out = self.cli(api, args);
        assert!(
            out.status.success(),
            "{args:?} through {}: {}{}",
            self.apis[api].name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A git repository with `.tributary.yml` = `pipeline`, added as project `name` through API
    /// 0; returns once every API replica lists it.
    pub fn project(&self, name: &str, pipeline: &str) {
        let repo = self.root.join(format!("repo-{name}"));
        std::fs::create_dir_all(&repo).expect("repo dir");
        git(&repo, &["init", "-q", "-b", "main"]);
        std::fs::write(repo.join(".tributary.yml"), pipeline).expect("pipeline");
        commit_all(&repo, "init");
        self.ok(
            0,
            &[
                "project",
                "add",
                name,
                "--repo",
                repo.to_str().expect("utf-8"),
            ],
        );
        for api in 0..self.apis.len() {
            crate::common::wait_until(
                &format!("{} to know project {name}", self.apis[api].name),
                Duration::from_secs(120),
                || {
                    let out = self.cli(api, &["project", "list"]);
                    out.status.success() && String::from_utf8_lossy(&out.stdout).contains(name)
                },
            );
        }
    }

    /// Triggers a build of `project` through API replica `api`; its id.
    pub fn trigger(&self, api: usize, project: &str) -> String {
        self.ok(api, &["trigger", project])
            .lines()
            .next()
            .expect("the build id")
            .trim()
            .to_owned()
    }

    /// `get --json` of `build` through API replica `api`.
    pub fn get(&self, api: usize, build: &str) -> Value {
        serde_json::from_str(&self.ok(api, &["get", build, "--json"])).expect("get --json")
    }

    /// Every decodable state event on the log so far (every events partition), read
    /// incrementally from where the last call stopped.
    pub fn events(&mut self) -> &[Ev] {
        let log = self.log.clone();
        let ends = self
            .rt
            .block_on(log.end_offsets())
            .expect("end offsets of the log");
        for p in log.layout().topic_partitions(Topic::Events) {
            let end = ends[p as usize];
            loop {
                let from = self.next.get(&p).copied().unwrap_or(0);
                if from >= end {
                    break;
                }
                let records = self
                    .rt
                    .block_on(log.read_partition(p, from, 2000))
                    .expect("read the log");
                let Some(last) = records.last() else { break };
                self.next.insert(p, last.offset + 1);
                for r in &records {
                    match r.decode() {
                        Ok(env) => self.seen.push(Ev {
                            partition: p,
                            offset: r.offset,
                            env,
                        }),
                        Err(_) => self.undecodable += 1,
                    }
                }
            }
        }
        &self.seen
    }

    /// Waits until `done` holds for the log's events, re-reading new events every 250 ms;
    /// fails the test after `within` or as soon as a process exits.
    pub fn wait_events(&mut self, what: &str, within: Duration, done: impl FnMut(&[Ev]) -> bool) {
        self.wait_events_or(what, within, done, |_| String::new());
    }

    /// [`ScaleOut::wait_events`], whose failure after `within` also shows `explain(events)` and
    /// every service's log tail.
    pub fn wait_events_or(
        &mut self,
        what: &str,
        within: Duration,
        mut done: impl FnMut(&[Ev]) -> bool,
        explain: impl FnOnce(&[Ev]) -> String,
    ) {
        let deadline = Instant::now() + within;
        loop {
            if done(self.events()) {
                return;
            }
            self.assert_all_running();
            if Instant::now() >= deadline {
                let why = explain(self.events());
                panic!("timed out waiting for {what}\n{why}\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The status of every finished build (from `BuildFinished`).
    pub fn finished(&mut self) -> BTreeMap<String, String> {
        finished_of(self.events())
    }

    /// Waits until every build of `builds` has a `BuildFinished`. On a timeout, the failure
    /// shows each unfinished build's events and every service's log tail.
    pub fn wait_finished(&mut self, builds: &[String], within: Duration) {
        let unfinished = |events: &[Ev]| {
            let done = finished_of(events);
            builds
                .iter()
                .filter(|b| !done.contains_key(*b))
                .cloned()
                .collect::<Vec<String>>()
        };
        self.wait_events_or(
            &format!("{} builds to finish", builds.len()),
            within,
            |events| unfinished(events).is_empty(),
            |events| {
                unfinished(events)
                    .iter()
                    .map(|b| format!("unfinished build {b}:\n{}", story_of(events, b)))
                    .collect()
            },
        );
    }

    /// Waits until the read model's stored offsets reached the log's end of every partition
    /// (as it is when called).
    pub fn wait_projected(&mut self, within: Duration) {
        let log = self.log.clone();
        let ends = self.rt.block_on(log.end_offsets()).expect("end offsets");
        let store = self
            .rt
            .block_on(tributary_projections::BuildsStore::connect(&self.database))
            .expect("open the read models");
        let deadline = Instant::now() + within;
        loop {
            let stored = self.rt.block_on(store.next_offsets()).expect("offsets");
            let behind: Vec<_> = ends
                .iter()
                .enumerate()
                .filter(|(p, end)| stored.get(&(*p as u32)).copied().unwrap_or(0) < **end)
                .collect();
            if behind.is_empty() {
                break;
            }
            self.assert_all_running();
            assert!(
                Instant::now() < deadline,
                "the projectors did not catch up: stored {stored:?}, log ends {ends:?}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        self.rt.block_on(store.close());
    }

    /// `tributary replay --kafka … --database … [--check]`.
    pub fn replay(&self, check: bool) -> Output {
        let mut command = Command::new(bin());
        command
            .arg("replay")
            .args(self.backend_flags())
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        command.arg("--data").arg(self.root.join("replay"));
        if check {
            command.arg("--check");
        }
        command.output().expect("run tributary replay")
    }

    /// Appends `data` verbatim under `key` to the events topic (a malformed record).
    pub fn append_raw(&self, key: &str, data: Vec<u8>) -> Offset {
        let log = self.log.clone();
        self.rt
            .block_on(log.append_raw(key, data))
            .expect("append a raw record")
    }

    /// Appends events through the log API (not through a service).
    pub fn append(&self, events: &[Envelope]) {
        let log = self.log.clone();
        self.rt.block_on(log.append(events)).expect("append");
    }

    /// Every service's stderr, for failure messages.
    pub fn logs(&self) -> String {
        let mut all = String::new();
        for s in self
            .apis
            .iter()
            .chain(&self.schedulers)
            .chain(&self.projectors)
            .chain(&self.agents)
        {
            all.push_str(&format!(
                "==== {} ====\n{}\n",
                s.name,
                tail_of(&s.log_text(), 40)
            ));
        }
        all
    }
}

/// Whether a test's directories are kept for a post-mortem: when it fails, and always with
/// `TRIBUTARY_TEST_KEEP_LOGS`.
fn keep_logs() -> bool {
    std::thread::panicking() || std::env::var_os("TRIBUTARY_TEST_KEEP_LOGS").is_some()
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.proc.take();
        if keep_logs() {
            eprintln!(
                "the test broker's data and logs are in {}",
                self.dir.display()
            );
            if let Some(tmp) = self._tmp.take() {
                let _ = tmp.keep();
            }
        }
    }
}

impl Drop for ScaleOut {
    fn drop(&mut self) {
        for s in self
            .agents
            .iter_mut()
            .chain(&mut self.schedulers)
            .chain(&mut self.projectors)
            .chain(&mut self.apis)
        {
            s.proc.take();
        }
        if keep_logs() {
            eprintln!("scale-out processes' logs are in {}", self.root.display());
            // Keep the directory for a post-mortem.
            let dir = std::mem::replace(&mut self._dir, tempfile::tempdir().expect("tempdir"));
            let _ = dir.keep();
        }
        let log = self.log.clone();
        let db = self.db_name.clone();
        self.rt.block_on(async move {
            let _ = tokio::time::timeout(Duration::from_secs(30), log.delete_topics()).await;
            let _ = tokio::time::timeout(
                Duration::from_secs(30),
                tributary_testkit::drop_database(&db),
            )
            .await;
        });
    }
}

/// A job attempt: (build id, job id, attempt).
pub type Attempt = (String, String, u32);

/// Per (build, job, attempt): the distinct `JobAssigned` event ids (a retried append may store
/// one event twice; it is still one assignment).
pub fn assignments(events: &[Ev]) -> BTreeMap<Attempt, BTreeSet<String>> {
    let mut out: BTreeMap<Attempt, BTreeSet<String>> = BTreeMap::new();
    for e in events {
        if let Some(Payload::JobAssigned(a)) = &e.env.payload {
            out.entry((e.env.build_id.clone(), a.job.clone(), a.attempt))
                .or_default()
                .insert(e.env.event_id.clone());
        }
    }
    out
}

/// Build id → status of every `BuildFinished` in `events`.
pub fn finished_of(events: &[Ev]) -> BTreeMap<String, String> {
    use tributary_proto::events::envelope::Payload;
    events
        .iter()
        .filter_map(|e| match &e.env.payload {
            Some(Payload::BuildFinished(f)) => Some((
                e.env.build_id.clone(),
                tributary_proto::events::Status::try_from(f.status)
                    .map_or("unknown", |s| s.name())
                    .to_owned(),
            )),
            _ => None,
        })
        .collect()
}

/// One line per event of build `build`: where it is in the log, its type and job.
pub fn story_of(events: &[Ev], build: &str) -> String {
    events
        .iter()
        .filter(|e| e.env.build_id == build)
        .map(|e| {
            let what = e.env.payload.as_ref().map_or_else(
                || "(no payload)".to_owned(),
                |p| {
                    let text = format!("{p:?}");
                    text.chars().take(160).collect()
                },
            );
            format!("  {}@{} {what}\n", e.partition, e.offset)
        })
        .collect()
}

fn tail_of(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A single-node Apache Kafka broker (KRaft, broker and controller in one JVM) of a test's own,
/// on free loopback ports with its own data directory, from the jars that
/// `scripts/setup-brokers.sh` fetched. [`Broker::stop`]/[`Broker::kill`] then
/// [`Broker::start_again`] restart it on the same port and data. Killed when dropped; its
/// directory (data and logs) is kept when a test fails, and always with
/// `TRIBUTARY_TEST_KEEP_LOGS=1`.
pub struct Broker {
    pub addr: String,
    _tmp: Option<tempfile::TempDir>,
    dir: PathBuf,
    libs: PathBuf,
    proc: Option<Proc>,
    starts: usize,
}

impl Broker {
    /// Formats a data directory of its own and starts the broker; returns once it serves.
    pub fn start() -> Broker {
        let libs = kafka_libs();
        let port = free_port();
        let controller = free_port();
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let data = dir.join("data");
        std::fs::write(
            dir.join("server.properties"),
            format!(
                "process.roles=broker,controller\n\
                 node.id=1\n\
                 controller.quorum.voters=1@127.0.0.1:{controller}\n\
                 listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}\n\
                 advertised.listeners=PLAINTEXT://127.0.0.1:{port}\n\
                 controller.listener.names=CONTROLLER\n\
                 inter.broker.listener.name=PLAINTEXT\n\
                 listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
                 log.dirs={}\n\
                 num.partitions=1\n\
                 auto.create.topics.enable=false\n\
                 offsets.topic.replication.factor=1\n\
                 offsets.topic.num.partitions=4\n\
                 transaction.state.log.replication.factor=1\n\
                 transaction.state.log.min.isr=1\n\
                 group.initial.rebalance.delay.ms=0\n",
                data.display()
            ),
        )
        .expect("server.properties");
        std::fs::write(
            dir.join("log4j.properties"),
            format!(
                "log4j.rootLogger=INFO, file\n\
                 log4j.appender.file=org.apache.log4j.FileAppender\n\
                 log4j.appender.file.File={}\n\
                 log4j.appender.file.layout=org.apache.log4j.PatternLayout\n\
                 log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n\n",
                dir.join("server.log").display()
            ),
        )
        .expect("log4j.properties");
        let broker = Broker {
            addr: format!("127.0.0.1:{port}"),
            _tmp: Some(tmp),
            dir,
            libs,
            proc: None,
            starts: 0,
        };
        let cluster_id = broker.java_output(&["kafka.tools.StorageTool", "random-uuid"]);
        let properties = broker.dir.join("server.properties");
        broker.java_output(&[
            "kafka.tools.StorageTool",
            "format",
            "-t",
            cluster_id.trim(),
            "-c",
            properties.to_str().expect("utf-8"),
        ]);
        let mut broker = broker;
        broker.start_again();
        broker
    }

    fn java(&self) -> Command {
        let mut command = Command::new("java");
        command
            .args([
                "-Xms128m",
                "-Xmx384m",
                "-XX:+UseSerialGC",
                "-Djava.awt.headless=true",
            ])
            .arg(format!(
                "-Dlog4j.configuration=file:{}",
                self.dir.join("log4j.properties").display()
            ))
            .arg("-cp")
            .arg(format!("{}/*", self.libs.display()));
        command
    }

    fn java_output(&self, args: &[&str]) -> String {
        let out = self
            .java()
            .args(args)
            .output()
            .expect("run java (scripts/setup-brokers.sh installs it)");
        assert!(
            out.status.success(),
            "java {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts the broker (again) on its port and data directory; returns once it serves.
    pub fn start_again(&mut self) {
        assert!(self.proc.is_none(), "the broker is running");
        self.starts += 1;
        let log = self.dir.join("server.log");
        let _ = std::fs::write(&log, "");
        let stdout = std::fs::File::create(self.dir.join(format!("stdout-{}.log", self.starts)))
            .expect("broker stdout");
        let child = self
            .java()
            .arg("kafka.Kafka")
            .arg(self.dir.join("server.properties"))
            .stdout(stdout.try_clone().expect("clone"))
            .stderr(stdout)
            .spawn()
            .expect("start the Kafka broker (java)");
        let mut proc = Proc(child);
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            if let Some(status) = proc.0.try_wait().expect("try_wait") {
                panic!(
                    "the Kafka broker exited during start ({status}); see {}",
                    log.display()
                );
            }
            let started =
                std::fs::read_to_string(&log).is_ok_and(|t| t.contains("Kafka Server started"));
            if started && std::net::TcpStream::connect(&self.addr).is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the Kafka broker did not start within 180 s; see {}",
                log.display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        self.proc = Some(proc);
    }

    /// `SIGKILL`: the broker is gone at once, without a controlled shutdown.
    pub fn kill(&mut self) {
        let mut proc = self.proc.take().expect("the broker is running");
        proc.signal(libc::SIGKILL);
        proc.wait_exit(Duration::from_secs(30));
    }

    /// `SIGTERM`: a controlled shutdown.
    pub fn stop(&mut self) {
        let mut proc = self.proc.take().expect("the broker is running");
        proc.signal(libc::SIGTERM);
        proc.wait_exit(Duration::from_secs(120));
    }
}

/// The Kafka jars `scripts/setup-brokers.sh` fetched.
fn kafka_libs() -> PathBuf {
    let cache = std::env::var_os("TRIBUTARY_CACHE").map_or_else(
        || {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/tributary")
        },
        PathBuf::from,
    );
    let libs = cache.join("kafka-3.9.1/libs");
    assert!(
        libs.join(".complete").exists(),
        "no Kafka jars in {}: run scripts/setup-brokers.sh --kafka (it fetches them from Maven \
         Central)",
        libs.display()
    );
    libs
}
