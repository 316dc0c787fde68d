//! `tributary bench exec`: what running a job in a container costs over running it on the host.
//!
//! Each run is one job of one step with one line (`true`), through the executor exactly as an
//! agent runs it, alternating host and container runs so that machine load hits both alike.
//! Figures: from the executor's start to the first LineStarted event ("start to first line":
//! for a container job that includes creating and starting the container and the first `exec`),
//! and the whole job (for a container job including its removal). First it prints artifact
//! upload/download throughput with hashing ([`crate::bench::artifacts`]).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tributary_executor::container::{ContainerLimits, ContainerRuntime, Engine};
use tributary_executor::{run_job, JobContext, LogLimits};
use tributary_proto::events::{envelope::Payload, JobPlan, Status, StepPlan};

pub struct Options {
    pub runs: usize,
    pub image: String,
    pub engine: String,
}

pub async fn bench_exec(opts: Options) -> anyhow::Result<ExitCode> {
    let scratch = tempfile::tempdir()?;
    crate::bench::artifacts::bench_artifacts(scratch.path()).await?;
    drop(scratch);
    let engine = Engine::connect(&opts.engine).await?;
    let runtime = ContainerRuntime {
        engine: engine.clone(),
        limits: ContainerLimits {
            cpus: 1.0,
            memory_bytes: 256 << 20,
            pids: 1024,
            image_keep: 0,
        },
        owner: format!("bench-{}", tributary_proto::new_id()),
        hidden: Vec::new(),
    };
    println!(
        "bench exec: {} runs each of a one-line job (`true`) on the host and in {} on {} at {}",
        opts.runs,
        opts.image,
        engine.description(),
        engine.address()
    );
    let tmp = tempfile::tempdir()?;
    // One warm-up run of each (page cache, image layers, first connection).
    run_once(tmp.path(), None, &opts.image).await?;
    run_once(tmp.path(), Some(&runtime), &opts.image).await?;
    let (mut host, mut boxed) = (Sample::default(), Sample::default());
    for _ in 0..opts.runs.max(1) {
        host.push(run_once(tmp.path(), None, &opts.image).await?);
        boxed.push(run_once(tmp.path(), Some(&runtime), &opts.image).await?);
    }
    let left = engine.owned_containers(&runtime.owner).await?;
    println!(
        "{:<28} {:>10} {:>10} {:>10}",
        "ms (p50 / p90 / max)", "host", "container", "overhead"
    );
    let row = |name: &str, pick: fn(&(Duration, Duration)) -> Duration| {
        let h = host.stats(pick);
        let c = boxed.stats(pick);
        for (label, i) in [("p50", 0), ("p90", 1), ("max", 2)] {
            println!(
                "{:<28} {:>10.1} {:>10.1} {:>10.1}",
                format!("{name} {label}"),
                ms(h[i]),
                ms(c[i]),
                ms(c[i]) - ms(h[i])
            );
        }
    };
    row("start -> first line", |r| r.0);
    row("whole job", |r| r.1);
    println!("containers left behind: {}", left.len());
    Ok(if left.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[derive(Default)]
struct Sample(Vec<(Duration, Duration)>);

impl Sample {
    fn push(&mut self, r: (Duration, Duration)) {
        self.0.push(r);
    }

    /// p50, p90, max of one figure.
    fn stats(&self, pick: fn(&(Duration, Duration)) -> Duration) -> [Duration; 3] {
        let mut v: Vec<Duration> = self.0.iter().map(pick).collect();
        v.sort();
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        [at(0.5), at(0.9), at(1.0)]
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One job; returns (start -> first LineStarted, whole job).
async fn run_once(
    dir: &std::path::Path,
    container: Option<&ContainerRuntime>,
    image: &str,
) -> anyhow::Result<(Duration, Duration)> {
    let job = JobPlan {
        id: "bench".into(),
        name: "bench".into(),
        image: if container.is_some() {
            image.to_owned()
        } else {
            String::new()
        },
        steps: vec![StepPlan {
            name: "true".into(),
            lines: vec!["true".into()],
        }],
        ..JobPlan::default()
    };
    let workdir = dir.join("work");
    std::fs::create_dir_all(&workdir)?;
    let ctx = JobContext {
        build_id: tributary_proto::new_id(),
        job,
        attempt: 1,
        workdir,
        scratch_dir: dir.join(format!("scratch-{}", tributary_proto::new_id())),
        extra_env: Vec::new(),
        limits: LogLimits::default(),
        container: container.cloned(),
        preamble: String::new(),
        failure_note: String::new(),
        secrets: Default::default(),
        image: None,
    };
    let (tx, mut rx) = mpsc::channel(64);
    let started = Instant::now();
    let handle = tokio::spawn(run_job(ctx, tx, CancellationToken::new()));
    let mut first_line = None;
    while let Some(p) = rx.recv().await {
        if matches!(p, Payload::LineStarted(_)) && first_line.is_none() {
            first_line = Some(started.elapsed());
        }
    }
    let outcome = handle.await?;
    let whole = started.elapsed();
    anyhow::ensure!(
        outcome.status == Status::Succeeded,
        "benchmark job failed: {}",
        outcome.reason
    );
    Ok((first_line.unwrap_or(whole), whole))
}
