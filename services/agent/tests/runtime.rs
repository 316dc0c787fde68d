//! The agent runtime against a fake Agents server (tonic, on loopback, in its own runtime so it
//! can really go away): registration and identity, leases, heartbeats and cancels, fencing,
//! reconnects, capacity, drain and hard stop.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tributary_agent::{AgentConfig, AgentError, BackoffPolicy, Identity};
use tributary_proto::api::agents_server::{Agents, AgentsServer};
use tributary_proto::api::*;
use tributary_proto::events::{envelope::Payload, Envelope, JobPlan, StepPlan};

const ENROLL: &str = "enroll-1";
const AGENT_TOKEN: &str = "agent-token-1";
const AGENT_ID: &str = "agent-1";

#[derive(Default)]
struct State {
    registers: Vec<RegisterAgentRequest>,
    pulls: Vec<PullWorkRequest>,
    streams: Vec<mpsc::Sender<Result<Lease, Status>>>,
    /// (lease, event), deduplicated by event id like the log.
    events: Vec<(String, Envelope)>,
    seen: HashSet<String>,
    heartbeats: Vec<HeartbeatRequest>,
    /// Returned (once) by the next heartbeat.
    cancel: Vec<String>,
    /// SendEvents for these leases: FAILED_PRECONDITION.
    fenced: HashSet<String>,
    revoked: bool,
}

#[derive(Clone, Default)]
struct Shared(Arc<Mutex<State>>);

impl Shared {
    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.0.lock().unwrap())
    }

    fn authorize<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let ok = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            == Some(&format!("Bearer {AGENT_TOKEN}"));
        if !ok || self.with(|s| s.revoked) {
            return Err(Status::unauthenticated("unknown or revoked agent token"));
        }
        Ok(())
    }

    /// Pushes a lease on the newest open work stream.
    async fn push(&self, lease: Lease) {
        let tx = self
            .with(|s| s.streams.iter().rev().find(|t| !t.is_closed()).cloned())
            .expect("an open work stream");
        tx.send(Ok(lease)).await.unwrap();
    }

    fn types(&self, lease: &str) -> Vec<&'static str> {
        self.with(|s| {
            s.events
                .iter()
                .filter(|(l, _)| l == lease)
                .map(|(_, e)| e.type_name())
                .collect()
        })
    }

    fn has(&self, lease: &str, ty: &str) -> bool {
        self.types(lease).contains(&ty)
    }

    fn output(&self, lease: &str) -> String {
        self.with(|s| {
            s.events
                .iter()
                .filter(|(l, _)| l == lease)
                .filter_map(|(_, e)| match &e.payload {
                    Some(Payload::LogChunk(c)) => {
                        Some(String::from_utf8_lossy(&c.data).into_owned())
                    }
                    _ => None,
                })
                .collect()
        })
    }

    fn open_streams(&self) -> usize {
        self.with(|s| s.streams.iter().filter(|t| !t.is_closed()).count())
    }
}

#[tonic::async_trait]
impl Agents for Shared {
    async fn register(
        &self,
        request: Request<RegisterAgentRequest>,
    ) -> Result<Response<RegisterAgentResponse>, Status> {
        let req = request.into_inner();
        if req.enrollment_token != ENROLL {
            return Err(Status::unauthenticated("not a live enrollment token"));
        }
        self.with(|s| s.registers.push(req));
        Ok(Response::new(RegisterAgentResponse {
            agent_id: AGENT_ID.into(),
            agent_token: AGENT_TOKEN.into(),
        }))
    }

    type PullWorkStream = ReceiverStream<Result<Lease, Status>>;

    async fn pull_work(
        &self,
        request: Request<PullWorkRequest>,
    ) -> Result<Response<Self::PullWorkStream>, Status> {
        self.authorize(&request)?;
        let (tx, rx) = mpsc::channel(16);
        self.with(|s| {
            s.pulls.push(request.into_inner());
            s.streams.push(tx);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        self.authorize(&request)?;
        let cancel_lease_ids = self.with(|s| {
            s.heartbeats.push(request.into_inner());
            std::mem::take(&mut s.cancel)
        });
        Ok(Response::new(HeartbeatResponse { cancel_lease_ids }))
    }

    async fn send_events(
        &self,
        request: Request<SendEventsRequest>,
    ) -> Result<Response<SendEventsResponse>, Status> {
        self.authorize(&request)?;
        let req = request.into_inner();
        self.with(|s| {
            if s.fenced.contains(&req.lease_id) {
                return Err(Status::failed_precondition("the lease is not current"));
            }
            for e in req.events {
                if s.seen.insert(e.event_id.clone()) {
                    s.events.push((req.lease_id.clone(), e));
                }
            }
            Ok(Response::new(SendEventsResponse::default()))
        })
    }
}

/// A fake server in its own thread and runtime: stopping it drops every connection.
struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(addr: SocketAddr, shared: Shared) -> Server {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let deadline = Instant::now() + Duration::from_secs(10);
                let listener = loop {
                    match tokio::net::TcpListener::bind(addr).await {
                        Ok(l) => break l,
                        Err(e) if Instant::now() < deadline => {
                            let _ = e;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) => panic!("cannot bind {addr}: {e}"),
                    }
                };
                ready_tx.send(listener.local_addr().unwrap()).unwrap();
                let serve = tonic::transport::Server::builder()
                    .add_service(AgentsServer::new(shared))
                    .serve_with_incoming(TcpListenerStream::new(listener));
                tokio::select! {
                    _ = serve => {}
                    _ = stop_rx => {}
                }
            });
            rt.shutdown_background();
        });
        let addr = ready_rx.recv().unwrap();
        Server {
            addr,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn config(server: &str, workdir: &Path) -> AgentConfig {
    let mut c = AgentConfig::new(server, workdir);
    c.enrollment_token = Some(ENROLL.into());
    c.name = "test-box".into();
    c.labels = vec!["linux".into()];
    c.capacity = 2;
    c.heartbeat_interval = Duration::from_millis(100);
    c.reconnect = BackoffPolicy {
        min: Duration::from_millis(20),
        max: Duration::from_millis(200),
    };
    c
}

/// A running agent.
struct Agent {
    drain: CancellationToken,
    abort: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), AgentError>>,
}

/// Logs on the test's output with TEST_LOG=debug (for example).
fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TEST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
        )
        .try_init();
}

fn start_agent(config: AgentConfig) -> Agent {
    init_logs();
    let drain = CancellationToken::new();
    let abort = CancellationToken::new();
    let task = tokio::spawn(tributary_agent::run_until(
        config,
        drain.clone(),
        abort.clone(),
    ));
    Agent { drain, abort, task }
}

impl Agent {
    async fn stop(self) -> Result<(), AgentError> {
        self.drain.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("the agent stops")
            .unwrap()
    }
}

async fn wait_until(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn lease(id: &str, lines: &[&str], source: Option<(&str, &str)>) -> Lease {
    Lease {
        lease_id: id.into(),
        tenant: "acme".into(),
        project: "web".into(),
        build_id: format!("build-{id}"),
        job: Some(JobPlan {
            id: "test".into(),
            name: "test".into(),
            steps: vec![StepPlan {
                name: "main".into(),
                lines: lines.iter().map(|l| (*l).to_owned()).collect(),
            }],
            ..Default::default()
        }),
        attempt: 1,
        repository: source.map(|s| s.0.to_owned()).unwrap_or_default(),
        commit: source.map(|s| s.1.to_owned()).unwrap_or_default(),
        cancel: false,
        artifacts: Vec::new(),
        caches: Vec::new(),
        cache_limit_bytes: 0,
        drain: false,
        ..Lease::default()
    }
}

/// A git repository with one commit holding hello.txt; returns (path, commit).
fn repo(dir: &Path) -> (PathBuf, String) {
    let repo = dir.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .args(["-c", "user.name=t", "-c", "user.email=t@t"])
            .args(args)
            .current_dir(&repo)
            .env_remove("GIT_DIR")
            .env_remove("GIT_WORK_TREE")
            .env_remove("GIT_INDEX_FILE")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    git(&["init", "-q", "-b", "main"]);
    std::fs::write(repo.join("hello.txt"), "hello from the repo\n").unwrap();
    git(&["add", "."]);
    git(&["commit", "-q", "-m", "one"]);
    let commit = git(&["rev-parse", "HEAD"]);
    (repo, commit)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_once_keeps_the_identity_and_reuses_it() {
    let shared = Shared::default();
    let server = Server::start(any_port(), shared.clone());
    let dir = tempfile::tempdir().unwrap();
    let workdir = dir.path().join("agent");

    let agent = start_agent(config(&server.url(), &workdir));
    wait_until("the work stream", 10, || shared.open_streams() == 1).await;
    let reg = shared.with(|s| s.registers.clone());
    assert_eq!(reg.len(), 1);
    assert_eq!(reg[0].name, "test-box");
    assert_eq!(reg[0].labels, vec!["linux".to_owned()]);
    assert_eq!(reg[0].capacity, 2);
    let pull = shared.with(|s| s.pulls[0].clone());
    assert_eq!(
        (pull.agent_id.as_str(), pull.labels.clone(), pull.capacity),
        (AGENT_ID, vec!["linux".to_owned()], 2)
    );
    let identity = Identity::load(&workdir).unwrap().unwrap();
    assert_eq!(identity.agent_id, AGENT_ID);
    assert_eq!(identity.agent_token, AGENT_TOKEN);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(workdir.join("agent.json"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    wait_until("heartbeats", 10, || {
        shared.with(|s| s.heartbeats.len() >= 2)
    })
    .await;
    agent.stop().await.unwrap();
    wait_until("the stream to close", 10, || shared.open_streams() == 0).await;

    // A restart without a token is the same agent: no second Register.
    let mut again = config(&server.url(), &workdir);
    again.enrollment_token = None;
    let agent = start_agent(again);
    wait_until("the work stream again", 10, || shared.open_streams() == 1).await;
    assert_eq!(shared.with(|s| s.registers.len()), 1);
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_identity_or_token_it_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config("http://127.0.0.1:1", dir.path());
    c.enrollment_token = None;
    let err = tokio::time::timeout(Duration::from_secs(10), start_agent(c).task)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, AgentError::Config(_)), "{err}");
    assert!(err.to_string().contains("--token"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_enrollment_token_is_an_error_and_nothing_is_saved() {
    let server = Server::start(any_port(), Shared::default());
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&server.url(), dir.path());
    c.enrollment_token = Some("wrong".into());
    let agent = start_agent(c);
    let err = tokio::time::timeout(Duration::from_secs(10), agent.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, AgentError::Rejected(_)), "{err}");
    assert!(!dir.path().join("agent.json").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_waits_for_a_server_that_is_not_up_yet() {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(config(&format!("http://{addr}"), dir.path()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let shared = Shared::default();
    let _server = Server::start(addr, shared.clone());
    wait_until("the work stream", 15, || shared.open_streams() == 1).await;
    assert_eq!(shared.with(|s| s.registers.len()), 1);
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_agent_stops_with_an_error() {
    let shared = Shared::default();
    shared.with(|s| s.revoked = true);
    let server = Server::start(any_port(), shared.clone());
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(config(&server.url(), dir.path()));
    let err = tokio::time::timeout(Duration::from_secs(10), agent.task)
        .await
        .expect("a refused agent stops by itself")
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, AgentError::Rejected(_)), "{err}");
    assert!(err.to_string().contains("agent.json"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_a_lease_in_a_checked_out_workspace_and_sends_its_events() {
    let shared = Shared::default();
    let server = Server::start(any_port(), shared.clone());
    let dir = tempfile::tempdir().unwrap();
    let (repo, commit) = repo(dir.path());
    let workdir = dir.path().join("agent");
    let agent = start_agent(config(&server.url(), &workdir));
    wait_until("the work stream", 10, || shared.open_streams() == 1).await;

    let repository = repo.display().to_string();
    shared
        .push(lease(
            "L1",
            &["cat hello.txt", "pwd", "sleep 0.5"],
            Some((&repository, &commit)),
        ))
        .await;
    wait_until("JobFinished", 30, || shared.has("L1", "job_finished")).await;
    let types = shared.types("L1");
    assert_eq!(types.first(), Some(&"job_started"), "{types:?}");
    assert_eq!(types.last(), Some(&"job_finished"), "{types:?}");
    let output = shared.output("L1");
    assert!(output.contains("hello from the repo"), "{output}");
    let expected_dir = workdir.join("work/build-L1/test-1");
    assert!(
        output.contains(&expected_dir.display().to_string()),
        "{output}"
    );
    shared.with(|s| {
        for (_, e) in &s.events {
            assert_eq!(
                (e.tenant.as_str(), e.project.as_str(), e.build_id.as_str()),
                ("acme", "web", "build-L1")
            );
        }
        let Some(Payload::JobStarted(started)) = &s.events[0].1.payload else {
            unreachable!()
        };
        assert_eq!(started.agent_id, AGENT_ID);
        assert_eq!(started.lease_id, "L1");
        let Some(Payload::JobFinished(f)) = &s.events.last().unwrap().1.payload else {
            unreachable!()
        };
        assert_eq!(f.status, tributary_proto::events::Status::Succeeded as i32);
        assert!(
            s.heartbeats
                .iter()
                .any(|h| h.lease_ids == vec!["L1".to_owned()]),
            "heartbeats name the running lease"
        );
    });
    // The workspace leaves its place once the attempt ended, kept for reuse by a later job; the
    // mirror stays.
    wait_until("the workspace to go", 10, || !expected_dir.exists()).await;
    assert!(!workdir.join("work/build-L1").exists());
    // Recycled for the build's tenant only (its `.git` holds the tenant's objects).
    let recycled = std::fs::read_dir(workdir.join("work/.recycled/tenants/acme"))
        .unwrap()
        .count();
    assert_eq!(recycled, 1);
    assert!(workdir.join("mirrors/tenants/acme").is_dir());
    wait_until("a heartbeat without the lease", 10, || {
        shared.with(|s| s.heartbeats.last().is_some_and(|h| h.lease_ids.is_empty()))
    })
    .await;
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_cancels_a_job_through_the_heartbeat() {
    let shared = Shared::default();
    let server = Server::start(any_port(), shared.clone());
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(config(&server.url(), dir.path()));
    wait_until("the work stream", 10, || shared.open_streams() == 1).await;
    shared.push(lease("L1", &["sleep 30"], None)).await;
    wait_until("JobStarted", 10, || shared.has("L1", "job_started")).await;
    let started = Instant::now();
    shared.with(|s| s.cancel.push("L1".into()));
    wait_until("JobFinished", 10, || shared.has("L1", "job_finished")).await;
    assert!(started.elapsed() < Duration::from_secs(10));
    shared.with(|s| {
        let Some(Payload::JobFinished(f)) = &s.events.last().unwrap().1.payload else {
            unreachable!()
        };
        assert_eq!(f.status, tributary_proto::events::Status::Canceled as i32);
    });
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_lease_stops_its_job_and_sends_no_more() {
    let shared = Shared::default();
    let server = Server::start(any_port(), shared.clone());
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(config(&server.url(), dir.path()));
    wait_until("the work stream", 10, || shared.open_streams() == 1).await;
    shared
        .push(lease("L1", &["sleep 0.5", "echo after", "sleep 30"], None))
        .await;
    wait_until("JobStarted", 10, || shared.has("L1", "job_started")).await;
    let beats = shared.with(|s| {
        s.fenced.insert("L1".into());
        s.heartbeats.len()
    });
    // The job ends (its lease leaves the heartbeats) without a JobFinished, long before its
    // `sleep 30` would have.
    wait_until("the job to stop", 15, || {
        shared.with(|s| s.heartbeats[beats..].iter().any(|h| h.lease_ids.is_empty()))
    })
    .await;
    assert!(!shared.has("L1", "job_finished"));
    // Fenced is per lease: the agent still takes work.
    shared.push(lease("L2", &["true"], None)).await;
    wait_until("L2 to finish", 10, || shared.has("L2", "job_finished")).await;
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_keep_running_while_the_server_is_away_and_their_events_arrive_later() {
    let shared = Shared::default();
    let mut server = Server::start(any_port(), shared.clone());
    let addr = server.addr;
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(config(&server.url(), dir.path()));
    wait_until("the work stream", 10, || shared.open_streams() == 1).await;
    shared
        .push(lease("L1", &["sleep 1", "echo done while away"], None))
        .await;
    wait_until("JobStarted", 10, || shared.has("L1", "job_started")).await;

    server.stop();
    let streams_before = shared.with(|s| s.pulls.len());
    tokio::time::sleep(Duration::from_secs(2)).await; // the job finishes meanwhile
    assert!(!shared.has("L1", "job_finished"));
    let _server = Server::start(addr, shared.clone());

    wait_until("the events sent while away", 20, || {
        shared.has("L1", "job_finished")
    })
    .await;
    assert!(shared.output("L1").contains("done while away"));
    let types = shared.types("L1");
    assert_eq!(types.iter().filter(|t| **t == "job_started").count(), 1);
    assert_eq!(types.last(), Some(&"job_finished"));
    wait_until("a new work stream", 20, || {
        shared.with(|s| s.pulls.len()) > streams_before && shared.open_streams() == 1
    })
    .await;
    // The new stream delivers work.
    shared.push(lease("L2", &["true"], None)).await;
    wait_until("L2 to finish", 10, || shared.has("L2", "job_finished")).await;
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_more_leases_than_the_capacity() {
    let shared = Shared::default();
    let server = Server::start(any_port(), shared.clone());
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&server.url(), dir.path());
    c.capacity = 1;
    let agent = start_agent(c);
    wait_until("the work stream", 10, || shared.open_streams() == 1).await;
    shared.push(lease("L1", &["sleep 1"], None)).await;
    shared.push(lease("L2", &["true"], None)).await;
    wait_until("L1 to finish", 15, || shared.has("L1", "job_finished")).await;
    // A lease pushed while the only slot is taken waits for it (the server frees a slot when
    // it sees JobFinished, a moment before the agent's task ends) instead of being dropped.
    assert!(
        !shared.has("L2", "job_started") || shared.has("L1", "job_finished"),
        "L2 never runs beside L1"
    );
    wait_until("L2 to run once L1 is done", 15, || {
        shared.has("L2", "job_finished")
    })
    .await;
    assert_eq!(
        shared
            .types("L2")
            .iter()
            .filter(|t| **t == "job_started")
            .count(),
        1
    );
    assert!(shared.with(|s| s.heartbeats.iter().all(|h| h.lease_ids.len() <= 1)));
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_stops_pulling_lets_running_jobs_finish_then_returns() {
    let shared = Shared::default();
    let server = Server::start(any_port(), shared.clone());
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(config(&server.url(), dir.path()));
    wait_until("the work stream", 10, || shared.open_streams() == 1).await;
    shared
        .push(lease("L1", &["sleep 1.5", "echo finished"], None))
        .await;
    wait_until("JobStarted", 10, || shared.has("L1", "job_started")).await;

    agent.drain.cancel();
    wait_until("a draining heartbeat with the running lease", 10, || {
        shared.with(|s| {
            s.heartbeats
                .iter()
                .any(|h| h.draining && h.lease_ids == vec!["L1".to_owned()])
        })
    })
    .await;
    assert!(!agent.task.is_finished(), "still running its job");
    // The stream stays open while the job runs (a closed one means a lost agent to the
    // server), but what it pushes now is not started.
    assert_eq!(shared.open_streams(), 1);
    shared.push(lease("L2", &["true"], None)).await;
    let result = tokio::time::timeout(Duration::from_secs(15), agent.task)
        .await
        .unwrap()
        .unwrap();
    result.unwrap();
    assert!(shared.types("L2").is_empty(), "no new work while draining");
    wait_until("the work stream to close", 10, || {
        shared.open_streams() == 0
    })
    .await;
    assert!(shared.output("L1").contains("finished"));
    assert_eq!(shared.types("L1").last(), Some(&"job_finished"));
    let last = shared.with(|s| s.heartbeats.last().cloned()).unwrap();
    assert!(
        last.draining && last.lease_ids.is_empty(),
        "a last heartbeat says it is done: {last:?}"
    );
    assert_eq!(
        shared.with(|s| s.pulls.len()),
        1,
        "no new stream while draining"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_instruction_from_the_server_drains_like_sigterm() {
    let shared = Shared::default();
    let server = Server::start(any_port(), shared.clone());
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(config(&server.url(), dir.path()));
    wait_until("the work stream", 10, || shared.open_streams() == 1).await;
    shared
        .push(lease("L1", &["sleep 1.5", "echo finished"], None))
        .await;
    wait_until("JobStarted", 10, || shared.has("L1", "job_started")).await;

    // The autoscaler lets this agent go: the server pushes a drain instruction.
    shared
        .push(Lease {
            drain: true,
            ..Lease::default()
        })
        .await;
    wait_until("a draining heartbeat with the running lease", 10, || {
        shared.with(|s| {
            s.heartbeats
                .iter()
                .any(|h| h.draining && h.lease_ids == vec!["L1".to_owned()])
        })
    })
    .await;
    shared.push(lease("L2", &["true"], None)).await;
    let result = tokio::time::timeout(Duration::from_secs(15), agent.task)
        .await
        .unwrap()
        .unwrap();
    result.unwrap();
    assert!(shared.types("L2").is_empty(), "no new work while draining");
    assert!(
        shared.output("L1").contains("finished"),
        "the running job finished"
    );
    assert_eq!(shared.types("L1").last(), Some(&"job_finished"));
    assert!(
        !agent.drain.is_cancelled(),
        "it drained on the server's word alone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_stop_cancels_running_jobs_and_returns_at_once() {
    let shared = Shared::default();
    let server = Server::start(any_port(), shared.clone());
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(config(&server.url(), dir.path()));
    wait_until("the work stream", 10, || shared.open_streams() == 1).await;
    shared.push(lease("L1", &["sleep 30"], None)).await;
    wait_until("JobStarted", 10, || shared.has("L1", "job_started")).await;
    agent.drain.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    agent.abort.cancel();
    let result = tokio::time::timeout(Duration::from_secs(10), agent.task)
        .await
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(matches!(result, Err(AgentError::Aborted(1))), "{result:?}");
}
