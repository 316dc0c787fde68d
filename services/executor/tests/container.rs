//! The container executor against a real engine: Podman's Docker API socket
//! (`scripts/setup-containers.sh` starts it and builds `localhost/ci-busybox`), or whatever
//! `DOCKER_HOST` points at.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tributary_executor::container::{
    engine_from_env, spec, ContainerLimits, ContainerRuntime, Engine,
};
use tributary_executor::{run_job, JobContext, JobOutcome, LogLimits};
use tributary_proto::events::envelope::Payload;
use tributary_proto::events::{JobPlan, Status, StepPlan, Stream};

const IMAGE: &str = "localhost/ci-busybox";

/// The engine the tests use; fails (never skips) with what to run when it is not there.
async fn engine() -> Engine {
    let address = engine_from_env();
    match Engine::connect(&address).await {
        Ok(engine) => engine,
        Err(e) => panic!(
            "these tests need a container engine with the {IMAGE} image: run \
             `sudo scripts/setup-containers.sh` (or set DOCKER_HOST): {e}"
        ),
    }
}

struct Fixture {
    ctx: JobContext,
    owner: String,
    engine: Engine,
    workdir: tempfile::TempDir,
    _scratch: tempfile::TempDir,
}

async fn fixture(steps: &[&[&str]]) -> Fixture {
    let engine = engine().await;
    let workdir = tempfile::tempdir().expect("workdir");
    let scratch = tempfile::tempdir().expect("scratch");
    // A unique owner per test: tests run in parallel and each checks only its own containers.
    let owner = format!("test-{}", tributary_proto::new_id());
    let job = JobPlan {
        id: "build[os=busybox]".into(),
        name: "build".into(),
        image: IMAGE.into(),
        steps: steps
            .iter()
            .enumerate()
            .map(|(i, lines)| StepPlan {
                name: format!("step{i}"),
                lines: lines.iter().map(|l| (*l).to_owned()).collect(),
            })
            .collect(),
        ..Default::default()
    };
    let ctx = JobContext {
        build_id: tributary_proto::new_id(),
        job,
        attempt: 1,
        workdir: workdir.path().to_path_buf(),
        scratch_dir: scratch.path().join("scripts"),
        extra_env: vec![("FROM_AGENT".into(), "yes".into())],
        limits: LogLimits::default(),
        container: Some(ContainerRuntime {
            engine: engine.clone(),
            limits: ContainerLimits {
                cpus: 0.5,
                memory_bytes: 64 << 20,
                pids: 256,
                image_keep: 0,
            },
            owner: owner.clone(),
            hidden: Vec::new(),
        }),
        preamble: String::new(),
        failure_note: String::new(),
        secrets: Default::default(),
        image: None,
    };
    Fixture {
        ctx,
        owner,
        engine,
        workdir,
        _scratch: scratch,
    }
}

/// Runs the job, handing every event to `on_event` as it comes.
async fn run_observed(
    ctx: JobContext,
    cancel: CancellationToken,
    mut on_event: impl FnMut(&Payload),
) -> (JobOutcome, Vec<Payload>) {
    let (tx, mut rx) = mpsc::channel(16);
    let job = tokio::spawn(run_job(ctx, tx, cancel));
    let mut events = Vec::new();
    while let Some(p) = rx.recv().await {
        on_event(&p);
        events.push(p);
    }
    (job.await.expect("run_job does not panic"), events)
}

async fn run(ctx: JobContext) -> (JobOutcome, Vec<Payload>) {
    run_observed(ctx, CancellationToken::new(), |_| {}).await
}

/// Output of (step, line) on `stream`, as text.
fn output(events: &[Payload], step: u32, line: u32, stream: Stream) -> String {
    let bytes: Vec<u8> = events
        .iter()
        .filter_map(|e| match e {
            Payload::LogChunk(c)
                if c.step == step && c.line == line && c.stream == stream as i32 =>
            {
                Some(c.data.clone())
            }
            _ => None,
        })
        .flatten()
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// (step, line, exit code) of every LineExited, in order.
fn exits(events: &[Payload]) -> Vec<(u32, u32, i32)> {
    events
        .iter()
        .filter_map(|e| match e {
            Payload::LineExited(l) => Some((l.step, l.line, l.exit_code)),
            _ => None,
        })
        .collect()
}

async fn assert_no_containers(f: &Fixture) {
    let left = f
        .engine
        .owned_containers(&f.owner)
        .await
        .expect("list containers");
    assert!(left.is_empty(), "containers left behind: {left:?}");
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("host name")
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_run_inside_the_container_with_per_line_events() {
    tributary_testkit::require!(Containers);
    let f = fixture(&[
        &[
            "hostname",
            "test -f /bin/busybox && echo busybox-inside",
            "cd /tmp && X=kept",
            "echo \"pwd=$(pwd) x=$X agent=$FROM_AGENT ci=$CI\"",
            "echo to-stderr >&2",
            "echo made-inside > /workspace/from-container.txt",
        ],
        &["pwd", "cat from-container.txt", "(exit 3)", "echo never"],
    ])
    .await;
    let (outcome, events) = run(f.ctx.clone()).await;

    let inside = output(&events, 0, 0, Stream::Stdout);
    assert!(!inside.trim().is_empty());
    assert_ne!(inside.trim(), host_name(), "hostname is the container's");
    assert_eq!(output(&events, 0, 1, Stream::Stdout), "busybox-inside\n");
    // Lines of a step share one shell: `cd` and variables carry over.
    assert_eq!(
        output(&events, 0, 3, Stream::Stdout),
        "pwd=/tmp x=kept agent=yes ci=true\n"
    );
    assert_eq!(output(&events, 0, 4, Stream::Stderr), "to-stderr\n");
    assert_eq!(output(&events, 0, 4, Stream::Stdout), "");
    // Each step starts in the workspace, which is the host's bind-mounted directory.
    assert_eq!(output(&events, 1, 0, Stream::Stdout), "/workspace\n");
    assert_eq!(output(&events, 1, 1, Stream::Stdout), "made-inside\n");
    assert_eq!(
        std::fs::read_to_string(f.workdir.path().join("from-container.txt")).expect("file"),
        "made-inside\n"
    );
    assert_eq!(
        exits(&events),
        vec![
            (0, 0, 0),
            (0, 1, 0),
            (0, 2, 0),
            (0, 3, 0),
            (0, 4, 0),
            (0, 5, 0),
            (1, 0, 0),
            (1, 1, 0),
            (1, 2, 3)
        ]
    );
    assert_eq!(outcome.status, Status::Failed);
    assert_eq!(outcome.exit_code, 3);
    assert_eq!(
        outcome.reason,
        "line 3 of step \"step1\" exited with 3: (exit 3)"
    );
    assert_no_containers(&f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successful_job_removes_its_container() {
    tributary_testkit::require!(Containers);
    let f = fixture(&[&["echo one"], &["echo two", "true"]]).await;
    let (outcome, events) = run(f.ctx.clone()).await;
    assert_eq!(outcome.status, Status::Succeeded, "{}", outcome.reason);
    assert_eq!(exits(&events), vec![(0, 0, 0), (1, 0, 0), (1, 1, 0)]);
    assert_eq!(output(&events, 1, 0, Stream::Stdout), "two\n");
    assert_no_containers(&f).await;
}

/// Waits on the job's events until line `line` of step `step` started, then runs `then`.
fn when_line_starts(
    step: u32,
    line: u32,
    then: impl FnOnce() + Send + 'static,
) -> impl FnMut(&Payload) {
    let mut then = Some(then);
    move |e| {
        if let Payload::LineStarted(l) = e {
            if l.step == step && l.line == line {
                if let Some(f) = then.take() {
                    f();
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_apply_and_cancel_removes_the_container() {
    tributary_testkit::require!(Containers);
    let f = fixture(&[&["echo started", "sleep 300"]]).await;
    let cancel = CancellationToken::new();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let job = tokio::spawn(run_observed(
        f.ctx.clone(),
        cancel.clone(),
        when_line_starts(0, 1, move || {
            let _ = started_tx.send(());
        }),
    ));
    tokio::time::timeout(Duration::from_secs(120), started_rx)
        .await
        .expect("the sleep line starts")
        .expect("job alive");

    // The running container carries the agent's limits, no network and its owner label.
    let ids = f.engine.owned_containers(&f.owner).await.expect("list");
    assert_eq!(ids.len(), 1, "one container per job: {ids:?}");
    let info = f
        .engine
        .docker()
        .inspect_container(&ids[0], None)
        .await
        .expect("inspect");
    let host = info.host_config.expect("host config");
    assert_eq!(host.nano_cpus, Some(500_000_000));
    assert_eq!(host.memory, Some(64 << 20));
    assert_eq!(host.pids_limit, Some(256));
    assert_eq!(host.network_mode.as_deref(), Some("none"));
    let labels = info.config.and_then(|c| c.labels).expect("labels");
    assert_eq!(labels[spec::LABEL_OWNER], f.owner);
    assert_eq!(labels[spec::LABEL_JOB], "build[os=busybox]");
    assert_eq!(info.state.and_then(|s| s.running), Some(true));

    cancel.cancel();
    let (outcome, events) = tokio::time::timeout(Duration::from_secs(120), job)
        .await
        .expect("the job ends after cancel")
        .expect("no panic");
    assert_eq!(outcome.status, Status::Canceled);
    assert_eq!(exits(&events).first(), Some(&(0, 0, 0)));
    assert_no_containers(&f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_network_unless_the_job_asks() {
    tributary_testkit::require!(Containers);
    let f = fixture(&[&["cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '"]]).await;
    let (outcome, events) = run(f.ctx.clone()).await;
    assert_eq!(outcome.status, Status::Succeeded, "{}", outcome.reason);
    // Only the loopback interface exists.
    assert_eq!(output(&events, 0, 0, Stream::Stdout), "lo\n");
    assert_no_containers(&f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_kills_and_removes_the_container() {
    tributary_testkit::require!(Containers);
    let mut f = fixture(&[&["echo before", "sleep 300", "echo never"]]).await;
    f.ctx.job.timeout_secs = 2;
    let (outcome, events) = run(f.ctx.clone()).await;
    assert_eq!(outcome.status, Status::TimedOut);
    assert_eq!(outcome.reason, "timed out after 2s");
    assert_eq!(exits(&events).first(), Some(&(0, 0, 0)));
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Payload::LineStarted(l) if l.line == 2)),
        "no line after the one that timed out"
    );
    assert_no_containers(&f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_removes_its_orphans() {
    tributary_testkit::require!(Containers);
    let f = fixture(&[&["true"]]).await;
    // What a crashed agent leaves: a running container labelled with its id.
    let who = spec::Ownership {
        owner: &f.owner,
        build_id: "crashed-build",
        job_id: "job",
        attempt: 1,
    };
    let body = spec::create_body(
        IMAGE,
        f.workdir.path(),
        f.workdir.path(),
        &ContainerLimits::default(),
        false,
        &who,
    );
    let docker = f.engine.docker();
    let created = docker
        .create_container(
            None::<bollard::query_parameters::CreateContainerOptions>,
            body,
        )
        .await
        .expect("create");
    docker
        .start_container(&created.id, None)
        .await
        .expect("start");
    // Another agent's container is not touched.
    let other = format!("{}-other", f.owner);
    let mut body = spec::create_body(
        IMAGE,
        f.workdir.path(),
        f.workdir.path(),
        &ContainerLimits::default(),
        false,
        &who,
    );
    body.labels
        .as_mut()
        .expect("labels")
        .insert(spec::LABEL_OWNER.into(), other.clone());
    let kept = docker
        .create_container(
            None::<bollard::query_parameters::CreateContainerOptions>,
            body,
        )
        .await
        .expect("create other");

    assert_eq!(f.engine.remove_orphans(&f.owner).await.expect("cleanup"), 1);
    assert_no_containers(&f).await;
    assert_eq!(
        f.engine.owned_containers(&other).await.expect("list"),
        vec![kept.id.clone()]
    );
    assert_eq!(f.engine.remove_orphans(&other).await.expect("cleanup"), 1);
}

#[tokio::test]
async fn an_image_job_without_an_engine_fails_with_a_reason() {
    let workdir = tempfile::tempdir().expect("workdir");
    let ctx = JobContext {
        build_id: "b".into(),
        job: JobPlan {
            id: "build".into(),
            image: IMAGE.into(),
            steps: vec![StepPlan {
                name: "s".into(),
                lines: vec!["true".into()],
            }],
            ..Default::default()
        },
        attempt: 1,
        workdir: workdir.path().to_path_buf(),
        scratch_dir: workdir.path().join("scratch"),
        extra_env: Vec::new(),
        limits: LogLimits::default(),
        container: None,
        preamble: String::new(),
        failure_note: String::new(),
        secrets: Default::default(),
        image: None,
    };
    let (outcome, events) = run(ctx).await;
    assert_eq!(outcome.status, Status::Failed);
    assert!(
        outcome.reason.contains("no container engine") && outcome.reason.contains("--engine"),
        "{}",
        outcome.reason
    );
    // No step ran; the reason is in the log too.
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(
        matches!(&events[0], Payload::LogChunk(c) if c.stream == Stream::System as i32
            && String::from_utf8_lossy(&c.data).contains("no container engine")),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_image_fails_the_job_with_a_reason() {
    tributary_testkit::require!(Containers);
    let mut f = fixture(&[&["true"]]).await;
    f.ctx.job.image = "localhost/tributary-no-such-image".into();
    let (outcome, _) = run(f.ctx.clone()).await;
    assert_eq!(outcome.status, Status::Failed);
    assert!(
        outcome.reason.contains("localhost/tributary-no-such-image")
            && outcome.reason.contains("cannot be pulled"),
        "{}",
        outcome.reason
    );
    assert_no_containers(&f).await;
}
