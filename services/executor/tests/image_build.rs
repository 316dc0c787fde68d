//! Jobs whose image is built from the repository (`image: {build: ...}`), against a real
//! engine: Podman's Docker API socket (`scripts/setup-containers.sh` starts it and builds
//! `localhost/ci-busybox`), or whatever `DOCKER_HOST` points at. No registry is involved:
//! every Dockerfile starts `FROM localhost/ci-busybox`.

use std::path::Path;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tributary_executor::container::{engine_from_env, ContainerLimits, ContainerRuntime, Engine};
use tributary_executor::image::{context, key};
use tributary_executor::{run_job, JobContext, JobImage, JobOutcome, LogLimits};
use tributary_proto::events::envelope::Payload;
use tributary_proto::events::{ImageBuild, JobPlan, Status, StepPlan, Stream};

const BASE: &str = "localhost/ci-busybox";

async fn engine() -> Engine {
    let address = engine_from_env();
    Engine::connect(&address).await.unwrap_or_else(|e| {
        panic!(
            "these tests need a container engine with the {BASE} image: run \
             `sudo scripts/setup-containers.sh` (or set DOCKER_HOST): {e}"
        )
    })
}

/// A test's own project (so its tags and prunes touch nothing else), removed at the end.
struct Project {
    engine: Engine,
    tenant: String,
    name: String,
    keep: u32,
}

impl Project {
    async fn new(keep: u32) -> Project {
        Project {
            engine: engine().await,
            tenant: "test".into(),
            name: format!("img-{}", tributary_proto::new_id()),
            keep,
        }
    }

    /// Runs `steps` (after the image step) in the image built from `repo`'s `ci/Dockerfile`.
    async fn run(&self, repo: &Path, steps: &[&str]) -> (JobOutcome, Vec<Payload>) {
        let spec = ImageBuild {
            dockerfile: "ci/Dockerfile".into(),
            context: "ci".into(),
        };
        let mut plan_steps = vec![StepPlan {
            name: "image".into(),
            lines: vec!["build ci/Dockerfile (context ci)".into()],
        }];
        plan_steps.extend(steps.iter().map(|s| StepPlan {
            name: (*s).into(),
            lines: vec![(*s).into()],
        }));
        let job = JobPlan {
            id: "t".into(),
            name: "t".into(),
            steps: plan_steps,
            image_build: Some(spec.clone()),
            ..Default::default()
        };
        let scratch = tempfile::tempdir().unwrap();
        let ctx = JobContext {
            build_id: tributary_proto::new_id(),
            job,
            attempt: 1,
            workdir: repo.to_path_buf(),
            scratch_dir: scratch.path().join("scripts"),
            extra_env: Vec::new(),
            limits: LogLimits::default(),
            container: Some(ContainerRuntime {
                engine: self.engine.clone(),
                limits: ContainerLimits {
                    image_keep: self.keep,
                    ..ContainerLimits::default()
                },
                owner: format!("test-{}", tributary_proto::new_id()),
                hidden: Vec::new(),
            }),
            preamble: String::new(),
            failure_note: String::new(),
            secrets: Default::default(),
            image: Some(JobImage {
                tenant: self.tenant.clone(),
                project: self.name.clone(),
                context: context::read(repo, &spec).map(Arc::new),
            }),
        };
        let (tx, mut rx) = mpsc::channel(64);
        let handle = tokio::spawn(run_job(ctx, tx, CancellationToken::new()));
        let mut events = Vec::new();
        while let Some(p) = rx.recv().await {
            events.push(p);
        }
        (handle.await.unwrap(), events)
    }

    async fn has(&self, key: &str) -> bool {
        let tag = key::tag(&self.tenant, &self.name, key);
        self.engine.find_image(&tag).await.unwrap().is_some()
    }

    async fn remove_all(&self) {
        for image in self
            .engine
            .project_images(&self.tenant, &self.name)
            .await
            .unwrap_or_default()
        {
            let _ = self.engine.remove_image(&image.tag).await;
        }
    }
}

/// A repository-like directory: `ci/Dockerfile` writing `tool` into the image, and `README`.
fn repo(tool: &str, readme: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("ci")).unwrap();
    std::fs::write(
        dir.path().join("ci/Dockerfile"),
        format!("FROM {BASE}\nCOPY tool /tool-version\n"),
    )
    .unwrap();
    std::fs::write(dir.path().join("ci/tool"), tool).unwrap();
    std::fs::write(dir.path().join("README"), readme).unwrap();
    dir
}

fn output(events: &[Payload], step: u32, stream: Stream) -> String {
    let bytes: Vec<u8> = events
        .iter()
        .filter_map(|e| match e {
            Payload::LogChunk(c) if c.step == step && c.stream == stream as i32 => {
                Some(c.data.clone())
            }
            _ => None,
        })
        .flatten()
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// (type, key) of the image events.
fn image_events(events: &[Payload]) -> Vec<(&'static str, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            Payload::ImageBuilt(b) => Some(("built", b.key.clone())),
            Payload::ImageReused(r) => Some(("reused", r.key.clone())),
            Payload::ImagePruned(p) => Some(("pruned", p.key.clone())),
            _ => None,
        })
        .collect()
}

fn step_names(events: &[Payload]) -> Vec<(u32, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            Payload::StepStarted(s) => Some((s.step, s.name.clone())),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn built_once_reused_at_another_commit_rebuilt_when_the_context_changes() {
    let project = Project::new(5).await;
    let first = repo("tool-v1\n", "one\n");
    let (outcome, events) = project.run(first.path(), &["cat /tool-version"]).await;
    assert_eq!(outcome.status, Status::Succeeded, "{}", outcome.reason);
    let key1 = match image_events(&events).as_slice() {
        [("built", key)] => key.clone(),
        other => panic!("expected one image_built, got {other:?}"),
    };
    assert_eq!(
        step_names(&events),
        [(0, "image".into()), (1, "cat /tool-version".into())]
    );
    // The builder's output is the image step's output; the job ran in the built image.
    let builder = output(&events, 0, Stream::Stdout);
    assert!(builder.contains("COPY tool /tool-version"), "{builder}");
    assert_eq!(output(&events, 1, Stream::Stdout), "tool-v1\n");
    let Some(Payload::ImageBuilt(built)) =
        events.iter().find(|e| matches!(e, Payload::ImageBuilt(_)))
    else {
        unreachable!()
    };
    assert_eq!(built.image, key::tag("test", &project.name, &key1));
    assert!(built.image_id.len() >= 12 && built.bytes > 0, "{built:?}");
    assert!(project.has(&key1).await);

    // Another commit: a file outside the context changed. Same key, nothing built.
    let second = repo("tool-v1\n", "two\n");
    let (outcome, events) = project.run(second.path(), &["cat /tool-version"]).await;
    assert_eq!(outcome.status, Status::Succeeded, "{}", outcome.reason);
    assert_eq!(image_events(&events), [("reused", key1.clone())]);
    assert_eq!(
        output(&events, 0, Stream::Stdout),
        "",
        "no builder output on reuse"
    );
    assert!(output(&events, 0, Stream::System).contains("reused"));
    assert_eq!(output(&events, 1, Stream::Stdout), "tool-v1\n");

    // A file of the context changed: a new key, built.
    let third = repo("tool-v2\n", "two\n");
    let (outcome, events) = project.run(third.path(), &["cat /tool-version"]).await;
    assert_eq!(outcome.status, Status::Succeeded, "{}", outcome.reason);
    let events_of_images = image_events(&events);
    assert_eq!(events_of_images.len(), 1, "{events_of_images:?}");
    assert_eq!(events_of_images[0].0, "built");
    assert_ne!(events_of_images[0].1, key1);
    assert_eq!(output(&events, 1, Stream::Stdout), "tool-v2\n");
    project.remove_all().await;
}

#[tokio::test]
async fn a_dockerfile_error_fails_the_job_with_the_builders_message_and_line() {
    let project = Project::new(5).await;
    let dir = repo("x\n", "r\n");
    std::fs::write(
        dir.path().join("ci/Dockerfile"),
        format!("FROM {BASE}\n# a comment\nRUN echo before\nRUN exit 3\nRUN echo after\n"),
    )
    .unwrap();
    let (outcome, events) = project.run(dir.path(), &["echo never"]).await;
    assert_eq!(outcome.status, Status::Failed);
    assert!(
        outcome
            .reason
            .starts_with("image build failed at ci/Dockerfile:4 (RUN exit 3): "),
        "{}",
        outcome.reason
    );
    // The job's own steps never ran; the image step failed with the reason in its log.
    assert_eq!(step_names(&events), [(0, "image".into())]);
    assert!(output(&events, 0, Stream::System).contains("ci/Dockerfile:4"));
    assert!(image_events(&events).is_empty());

    // An unknown instruction: the same, with the builder's words.
    std::fs::write(
        dir.path().join("ci/Dockerfile"),
        format!("FROM {BASE}\nFROBNICATE now\n"),
    )
    .unwrap();
    let (outcome, _) = project.run(dir.path(), &["echo never"]).await;
    assert_eq!(outcome.status, Status::Failed);
    assert!(
        outcome
            .reason
            .starts_with("image build failed at ci/Dockerfile:2 (FROBNICATE now): "),
        "{}",
        outcome.reason
    );
    assert!(
        outcome.reason.to_lowercase().contains("frobnicate"),
        "{}",
        outcome.reason
    );

    // A Dockerfile that is not there.
    std::fs::remove_file(dir.path().join("ci/Dockerfile")).unwrap();
    let (outcome, _) = project.run(dir.path(), &["echo never"]).await;
    assert_eq!(outcome.status, Status::Failed);
    assert!(
        outcome
            .reason
            .contains("the Dockerfile ci/Dockerfile is not in the repository"),
        "{}",
        outcome.reason
    );
    project.remove_all().await;
}

#[tokio::test]
async fn concurrent_jobs_of_one_key_build_it_once() {
    let project = Arc::new(Project::new(5).await);
    let a = repo("same\n", "a\n");
    let b = repo("same\n", "b\n");
    let (ra, rb) = tokio::join!(
        project.run(a.path(), &["cat /tool-version"]),
        project.run(b.path(), &["cat /tool-version"])
    );
    let mut kinds: Vec<&str> = image_events(&ra.1)
        .into_iter()
        .chain(image_events(&rb.1))
        .map(|(kind, _)| kind)
        .collect();
    kinds.sort();
    assert_eq!(kinds, ["built", "reused"]);
    assert_eq!(ra.0.status, Status::Succeeded, "{}", ra.0.reason);
    assert_eq!(rb.0.status, Status::Succeeded, "{}", rb.0.reason);
    project.remove_all().await;
}

#[tokio::test]
async fn images_beyond_the_newest_keys_are_pruned_with_events() {
    let project = Project::new(2).await;
    let mut keys = Vec::new();
    for version in ["p1", "p2", "p3"] {
        let dir = repo(version, "r\n");
        let (outcome, events) = project.run(dir.path(), &["cat /tool-version"]).await;
        assert_eq!(outcome.status, Status::Succeeded, "{}", outcome.reason);
        let built: Vec<String> = image_events(&events)
            .into_iter()
            .filter(|(k, _)| *k == "built")
            .map(|(_, key)| key)
            .collect();
        assert_eq!(built.len(), 1);
        keys.push(built[0].clone());
        if version == "p3" {
            // Keeping 2: the oldest goes, recorded as an event.
            assert!(
                image_events(&events).contains(&("pruned", keys[0].clone())),
                "{:?}\n{}",
                image_events(&events),
                output(&events, 0, Stream::System)
            );
        } else {
            assert!(!image_events(&events).iter().any(|(k, _)| *k == "pruned"));
        }
    }
    assert!(!project.has(&keys[0]).await);
    assert!(project.has(&keys[1]).await && project.has(&keys[2]).await);
    project.remove_all().await;
}

/// The figures of docs/PERFORMANCE.md: a one-line job whose image is built (a two-instruction
/// Dockerfile), then the same job with the image reused. Prints them; run with
/// `cargo test -p tributary-executor --test image_build -- --nocapture job_time`.
#[tokio::test]
async fn job_time_with_and_without_reuse() {
    let project = Project::new(5).await;
    let dir = repo("timed\n", "r\n");
    std::fs::write(
        dir.path().join("ci/Dockerfile"),
        format!("FROM {BASE}\nCOPY tool /tool-version\nRUN seq 1 100000 > /numbers\n"),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let (outcome, events) = project.run(dir.path(), &["cat /tool-version"]).await;
    let built = started.elapsed();
    assert_eq!(outcome.status, Status::Succeeded, "{}", outcome.reason);
    assert_eq!(image_events(&events)[0].0, "built");
    let mut reused = Vec::new();
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let (outcome, events) = project.run(dir.path(), &["cat /tool-version"]).await;
        reused.push(started.elapsed());
        assert_eq!(outcome.status, Status::Succeeded, "{}", outcome.reason);
        assert_eq!(image_events(&events)[0].0, "reused");
    }
    reused.sort();
    let median = reused[1];
    println!(
        "image job: {:.2}s with the image built, {:.2}s with it reused (median of 3; \
         min {:.2}s, max {:.2}s)",
        built.as_secs_f64(),
        median.as_secs_f64(),
        reused[0].as_secs_f64(),
        reused[2].as_secs_f64()
    );
    assert!(
        median < built,
        "reusing ({median:?}) is not faster than building ({built:?})"
    );
    project.remove_all().await;
}
