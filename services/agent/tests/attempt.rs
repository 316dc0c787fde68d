//! `run_attempt` with the real executor (and real git for checkouts), into a recording sink.

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;
use tributary_agent::{
    run_attempt, AttemptOptions, BuildRef, EventSink, Lease, SinkError, Source, UsageMeter,
    Workspaces,
};
use tributary_proto::events::{
    envelope::Payload, Envelope, JobFinished, JobPlan, Status, StepPlan,
};

/// Records what it accepts; refuses (fenced) any batch once `fence_on` matches an event.
#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<Envelope>>,
    fence_on: Option<fn(&Envelope) -> bool>,
    fenced: Mutex<bool>,
}

#[async_trait]
impl EventSink for Recorder {
    async fn send(&self, batch: Vec<Envelope>) -> Result<(), SinkError> {
        let mut fenced = self.fenced.lock().unwrap();
        if *fenced || self.fence_on.is_some_and(|f| batch.iter().any(f)) {
            *fenced = true;
            return Err(SinkError::Fenced("lease is not current".into()));
        }
        self.events.lock().unwrap().extend(batch);
        Ok(())
    }
}

impl Recorder {
    fn types(&self) -> Vec<&'static str> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .map(Envelope::type_name)
            .collect()
    }

    fn finished(&self) -> Option<JobFinished> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .find_map(|e| match &e.payload {
                Some(Payload::JobFinished(f)) => Some(f.clone()),
                _ => None,
            })
    }

    fn output(&self) -> String {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match &e.payload {
                Some(Payload::LogChunk(c)) => Some(String::from_utf8_lossy(&c.data).into_owned()),
                _ => None,
            })
            .collect()
    }
}

fn build() -> BuildRef {
    BuildRef {
        tenant: "acme".into(),
        project: "web".into(),
        build_id: "build-1".into(),
    }
}

fn lease(lines: &[&str]) -> Lease {
    Lease {
        job: JobPlan {
            id: "test[os=linux]".into(),
            name: "test".into(),
            steps: vec![StepPlan {
                name: "main".into(),
                lines: lines.iter().map(|l| (*l).to_owned()).collect(),
            }],
            ..Default::default()
        },
        inputs: Vec::new(),
        caches: Vec::new(),
        superseded_caches: Vec::new(),
        cache_limit: 0,
        secrets: Default::default(),
        attempt: 2,
        agent_id: "agent-7".into(),
        lease_id: "lease-9".into(),
    }
}

async fn run(
    sink: Arc<Recorder>,
    workspaces: &Workspaces,
    source: Option<&Source>,
    lines: &[&str],
    cancel: CancellationToken,
    options: AttemptOptions,
    scratch: &Path,
) -> tributary_agent::AttemptReport {
    let l = lease(lines);
    let ws = workspaces.for_job(source, "build-1", &l.job.id, l.attempt);
    run_attempt(sink, build(), l, ws, scratch.to_path_buf(), cancel, options).await
}

#[tokio::test]
async fn a_job_sends_started_steps_and_finished_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(Recorder::default());
    let report = run(
        sink.clone(),
        &Workspaces::Fixed(dir.path().to_path_buf()),
        None,
        &["echo hello", "pwd"],
        CancellationToken::new(),
        AttemptOptions::default(),
        &dir.path().join("scratch"),
    )
    .await;
    assert_eq!(report.status, Some(Status::Succeeded));
    assert!(!report.fenced);
    let types = sink.types();
    assert_eq!(types.first(), Some(&"job_started"));
    // A local job (no source to clone) starts with its first step: the recreate commands are
    // only for server builds.
    assert_eq!(types.get(1), Some(&"step_started"));
    assert!(!sink.output().contains("to recreate this job locally"));
    assert_eq!(types.last(), Some(&"job_finished"));
    assert_eq!(report.delivered, types.len());
    assert!(sink.output().contains("hello\n"));
    let events = sink.events.lock().unwrap().clone();
    let Some(Payload::JobStarted(started)) = &events[0].payload else {
        unreachable!()
    };
    assert_eq!(
        (
            started.job.as_str(),
            started.attempt,
            started.agent_id.as_str(),
            started.lease_id.as_str()
        ),
        ("test[os=linux]", 2, "agent-7", "lease-9")
    );
    for e in &events {
        assert_eq!(
            (e.tenant.as_str(), e.project.as_str(), e.build_id.as_str()),
            ("acme", "web", "build-1")
        );
        assert_eq!(e.event_id.len(), 36, "a UUID");
    }
    // The scratch directory of the attempt is gone.
    let left: Vec<_> = std::fs::read_dir(dir.path().join("scratch"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test]
async fn cancel_ends_the_job_with_canceled() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(Recorder::default());
    let cancel = CancellationToken::new();
    let started = Instant::now();
    let stopper = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            cancel.cancel();
        })
    };
    let report = run(
        sink.clone(),
        &Workspaces::Fixed(dir.path().to_path_buf()),
        None,
        &["sleep 30"],
        cancel,
        AttemptOptions::default(),
        &dir.path().join("scratch"),
    )
    .await;
    stopper.await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(report.status, Some(Status::Canceled));
    let finished = sink.finished().expect("JobFinished is sent");
    assert_eq!(finished.status, Status::Canceled as i32);
    assert_eq!(sink.types().last(), Some(&"job_finished"));
}

#[tokio::test]
async fn a_fenced_lease_stops_the_job_and_sends_nothing_more() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(Recorder {
        fence_on: Some(|e| matches!(e.payload, Some(Payload::LogChunk(_)))),
        ..Recorder::default()
    });
    let started = Instant::now();
    let report = run(
        sink.clone(),
        &Workspaces::Fixed(dir.path().to_path_buf()),
        None,
        &["echo output", "sleep 30"],
        CancellationToken::new(),
        AttemptOptions::default(),
        &dir.path().join("scratch"),
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the job was stopped"
    );
    assert!(report.fenced);
    assert_eq!(report.status, Some(Status::Canceled));
    assert!(sink.finished().is_none(), "nothing after the refusal");
    assert!(report.dropped > 0);
}

#[tokio::test]
async fn usage_ticks_while_running_and_a_last_one_before_job_finished() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(Recorder::default());
    let options = AttemptOptions {
        usage: Some(UsageMeter {
            machine_class: "small".into(),
            interval: Duration::from_millis(100),
        }),
        ..AttemptOptions::default()
    };
    let report = run(
        sink.clone(),
        &Workspaces::Fixed(dir.path().to_path_buf()),
        None,
        &["sleep 0.6"],
        CancellationToken::new(),
        options,
        &dir.path().join("scratch"),
    )
    .await;
    assert_eq!(report.status, Some(Status::Succeeded));
    let events = sink.events.lock().unwrap().clone();
    let ticks: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.payload {
            Some(Payload::UsageTick(t)) => Some(t.clone()),
            _ => None,
        })
        .collect();
    assert!(ticks.len() >= 3, "{ticks:?}");
    for (i, t) in ticks.iter().enumerate() {
        assert_eq!(t.seq as usize, i + 1);
        assert_eq!(t.machine_class, "small");
        assert_eq!(t.agent_id, "agent-7");
        assert_eq!(t.last, i + 1 == ticks.len());
        // Each tick covers [start_us, end_us), as long as it says, right after the previous.
        assert_eq!(t.end_us - t.start_us, t.millis as i64 * 1000, "{t:?}");
        if i > 0 {
            assert_eq!(t.start_us, ticks[i - 1].end_us, "{t:?}");
        }
    }
    let total: u64 = ticks.iter().map(|t| t.millis).sum();
    assert!((500..5000).contains(&total), "{total} ms");
    let n = events.len();
    assert_eq!(events[n - 2].type_name(), "usage_tick");
    assert_eq!(events[n - 1].type_name(), "job_finished");
}

#[tokio::test]
async fn without_a_meter_there_are_no_usage_ticks() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(Recorder::default());
    run(
        sink.clone(),
        &Workspaces::Fixed(dir.path().to_path_buf()),
        None,
        &["true"],
        CancellationToken::new(),
        AttemptOptions::default(),
        &dir.path().join("scratch"),
    )
    .await;
    assert!(!sink.types().contains(&"usage_tick"));
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@t"])
        .args(args)
        .current_dir(dir)
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .env_remove("GIT_INDEX_FILE")
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test]
async fn checkout_workspaces_get_the_exact_commit() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    std::fs::write(repo.join("hello.txt"), "first\n").unwrap();
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "one"]);
    let first = git(&repo, &["rev-parse", "HEAD"]);
    std::fs::write(repo.join("hello.txt"), "second\n").unwrap();
    git(&repo, &["commit", "-q", "-am", "two"]);

    let workspaces = Workspaces::Checkout {
        root: dir.path().join("work"),
        mirrors: tributary_repo::Mirrors::new(dir.path().join("mirrors")),
    };
    let source = Source {
        repository: repo.display().to_string(),
        commit: first.clone(),
        tenant: "acme".into(),
    };
    let ws = workspaces.for_job(Some(&source), "build-1", "test[os=linux]", 2);
    assert!(ws.checks_out());
    assert_eq!(ws.dir, dir.path().join("work/build-1/test_os_linux_-2"));
    let sink = Arc::new(Recorder::default());
    let report = run(
        sink.clone(),
        &workspaces,
        Some(&source),
        &["cat hello.txt", "git rev-parse HEAD"],
        CancellationToken::new(),
        AttemptOptions::default(),
        &dir.path().join("scratch"),
    )
    .await;
    assert_eq!(report.status, Some(Status::Succeeded), "{}", sink.output());
    let output = sink.output();
    assert!(output.contains("first\n"), "{output}");
    assert!(output.contains(&first), "{output}");
}

#[tokio::test]
async fn a_failed_checkout_fails_the_job_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let workspaces = Workspaces::Checkout {
        root: dir.path().join("work"),
        mirrors: tributary_repo::Mirrors::new(dir.path().join("mirrors")),
    };
    let source = Source {
        repository: dir.path().join("nope").display().to_string(),
        commit: "0123456789abcdef0123456789abcdef01234567".into(),
        tenant: "acme".into(),
    };
    let sink = Arc::new(Recorder::default());
    let report = run(
        sink.clone(),
        &workspaces,
        Some(&source),
        &["true"],
        CancellationToken::new(),
        AttemptOptions::default(),
        &dir.path().join("scratch"),
    )
    .await;
    assert_eq!(report.status, Some(Status::Failed));
    assert_eq!(sink.types(), vec!["job_started", "job_finished"]);
    let finished = sink.finished().unwrap();
    assert!(
        finished.reason.starts_with("checkout of "),
        "{}",
        finished.reason
    );
    assert_eq!(finished.exit_code, -1);
}

#[tokio::test]
async fn submodules_are_checked_out_when_the_job_asks() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    git(&sub, &["init", "-q", "-b", "main"]);
    std::fs::write(sub.join("inside.txt"), "from the submodule\n").unwrap();
    git(&sub, &["add", "."]);
    git(&sub, &["commit", "-q", "-m", "sub"]);
    let repo = dir.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    git(
        &repo,
        &[
            "-c",
            "protocol.file.allow=always",
            "submodule",
            "add",
            "-q",
            sub.to_str().unwrap(),
            "libs/sub",
        ],
    );
    git(&repo, &["commit", "-q", "-m", "with submodule"]);
    let commit = git(&repo, &["rev-parse", "HEAD"]);

    let workspaces = Workspaces::Checkout {
        root: dir.path().join("work"),
        mirrors: tributary_repo::Mirrors::new(dir.path().join("mirrors")),
    };
    let source = Source {
        repository: repo.display().to_string(),
        commit,
        tenant: "acme".into(),
    };
    for (attempt, submodules) in [(1, true), (2, false)] {
        let mut l = lease(&["cat libs/sub/inside.txt"]);
        l.job.submodules = submodules;
        l.attempt = attempt;
        let ws = workspaces.for_job(Some(&source), "build-1", &l.job.id, l.attempt);
        let sink = Arc::new(Recorder::default());
        let report = run_attempt(
            sink.clone(),
            build(),
            l,
            ws,
            dir.path().join("scratch"),
            CancellationToken::new(),
            AttemptOptions::default(),
        )
        .await;
        if submodules {
            assert_eq!(report.status, Some(Status::Succeeded), "{}", sink.output());
            assert!(sink.output().contains("from the submodule\n"));
        } else {
            // Without `submodules: true` the submodule's directory stays empty.
            assert_eq!(report.status, Some(Status::Failed), "{}", sink.output());
        }
    }
}

/// A finished workspace is recycled only for a later job of the same tenant: its `.git` holds
/// objects of that tenant's mirror.
#[test]
fn workspaces_are_recycled_only_within_a_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let workspaces = Workspaces::Checkout {
        root: dir.path().join("work"),
        mirrors: tributary_repo::Mirrors::new(dir.path().join("mirrors")),
    };
    let source = |tenant: &str| Source {
        repository: "https://example.com/shared.git".into(),
        commit: "0123456789abcdef0123456789abcdef01234567".into(),
        tenant: tenant.into(),
    };
    let acme = workspaces.for_job(Some(&source("acme")), "b1", "j", 1);
    std::fs::create_dir_all(acme.dir.join(".git")).unwrap();
    std::fs::write(acme.dir.join(".git/acme-objects"), "acme").unwrap();
    workspaces.release(&acme.dir, "acme");

    let evil = workspaces.for_job(Some(&source("evil")), "b2", "j", 1);
    assert!(
        !evil.dir.join(".git/acme-objects").exists(),
        "another tenant got acme's workspace"
    );
    let again = workspaces.for_job(Some(&source("acme")), "b3", "j", 1);
    assert!(
        again.dir.join(".git/acme-objects").exists(),
        "acme's next job reuses its workspace"
    );
}
