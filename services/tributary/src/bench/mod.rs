//! `tributary bench ...`: benchmarks that print figures (recorded in docs/PERFORMANCE.md). This
//! module dispatches the subcommands and holds `bench log` and `bench run`; each other benchmark
//! is a module of its own. Nothing outside `bench` depends on it but the command's dispatch.

mod artifacts;
mod autoscale;
mod exec;
mod history;
mod metering;
mod server;
mod ui;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tributary_eventlog::EventLog;
use tributary_proto::events::Status;

use crate::agent::BuildRef;
use crate::cli::BenchCommand;
use crate::data_dir::DataDir;
use crate::local_run::{self, LocalRun};

pub async fn bench(cmd: BenchCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCommand::Log {
            events,
            batch,
            kafka: Some(brokers),
            partitions,
            ..
        } => bench_log_kafka(brokers, partitions, events, batch).await,
        BenchCommand::Log {
            events,
            batch,
            data,
            kafka: None,
            ..
        } => {
            let tmp = tempfile::tempdir()?;
            let dir = data.unwrap_or_else(|| tmp.path().to_path_buf());
            std::fs::create_dir_all(&dir)?;
            let log =
                tributary_eventlog::sqlite::SqliteLog::open(&dir.join("bench-events.db")).await?;
            println!(
                "bench log: {events} events in batches of {batch} (sqlite, {})",
                dir.display()
            );
            let report = tributary_eventlog::bench::bench_log(Arc::new(log), events, batch).await;
            println!("{report}");
            Ok(if report.error.is_some() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        BenchCommand::Run { jobs, parallel } => bench_run(jobs, parallel).await,
        BenchCommand::Autoscale {
            trace,
            config,
            generate,
            seed,
        } => crate::bench::autoscale::bench_autoscale(crate::bench::autoscale::Options {
            trace,
            config,
            generate,
            seed,
        }),
        BenchCommand::Metering {
            ticks,
            tenants,
            ticks_per_job,
            data,
        } => crate::bench::metering::bench(ticks, tenants, ticks_per_job, data).await,
        BenchCommand::Exec {
            runs,
            image,
            engine,
        } => {
            crate::bench::exec::bench_exec(crate::bench::exec::Options {
                runs,
                image,
                engine: engine.unwrap_or_else(tributary_executor::container::engine_from_env),
            })
            .await
        }
        BenchCommand::Server {
            builds,
            concurrency,
            agents,
            agent_capacity,
            server,
            token,
            by_branch,
            in_flight,
            latency_builds,
        } => {
            crate::bench::server::bench_server(crate::bench::server::Options {
                builds,
                concurrency,
                agents,
                agent_capacity,
                server,
                token,
                by_branch,
                in_flight,
                latency_builds,
            })
            .await
        }
        BenchCommand::History { builds, live } => {
            crate::bench::history::bench_history(crate::bench::history::Options { builds, live })
                .await
        }
        BenchCommand::Ui {
            viewers,
            lines,
            interval_ms,
        } => {
            crate::bench::ui::bench_ui(crate::bench::ui::Options {
                viewers,
                lines,
                interval_ms,
            })
            .await
        }
    }
}

async fn bench_log_kafka(
    brokers: String,
    partitions: u32,
    events: u64,
    batch: usize,
) -> anyhow::Result<ExitCode> {
    use tributary_eventlog::kafka::{KafkaLog, KafkaOptions};
    let mut options = KafkaOptions::new(brokers);
    options.topic_prefix = format!("bench-{}", tributary_proto::new_id());
    options.event_partitions = partitions;
    options.log_partitions = partitions;
    let log = Arc::new(KafkaLog::connect(options.clone()).await?);
    println!(
        "bench log: {events} events in batches of {batch} (kafka at {}, topics {} and {}, {} \
         partitions each)",
        options.brokers,
        options.events_topic(),
        options.logs_topic(),
        partitions
    );
    let report = tributary_eventlog::bench::bench_log(log.clone(), events, batch).await;
    println!("{report}");
    if let Err(error) = log.delete_topics().await {
        eprintln!("bench log: could not delete the benchmark's topics: {error}");
    }
    Ok(if report.error.is_some() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

async fn bench_run(jobs: usize, parallel: usize) -> anyhow::Result<ExitCode> {
    let tmp = tempfile::tempdir()?;
    let mut text = String::from("jobs:\n");
    for i in 0..jobs {
        text.push_str(&format!("  j{i}:\n    steps:\n      - run: \"true\"\n"));
    }
    // Baseline: the same work as bare processes, `sh -c true` one after another.
    let baseline = {
        let start = Instant::now();
        for _ in 0..jobs {
            tokio::process::Command::new("sh")
                .args(["-c", "true"])
                .status()
                .await?;
        }
        start.elapsed()
    };
    let data = DataDir::open(&tmp.path().join("data")).await?;
    let log: Arc<dyn EventLog> = data.log.clone();
    let run = LocalRun {
        pipeline_file: tmp.path().join(".tributary.yml"),
        pipeline_text: text,
        workdir: tmp.path().to_path_buf(),
        parallel,
        scratch_dir: tmp.path().join("scratch"),
        only_job: None,
    };
    let build = BuildRef {
        tenant: "bench".into(),
        project: "bench".into(),
        build_id: tributary_proto::new_id(),
    };
    let start = Instant::now();
    let from = log.end_offset().await?;
    match local_run::trigger(log.as_ref(), &build, &run).await? {
        Ok(_) => {}
        Err(e) => anyhow::bail!("benchmark pipeline invalid: {e}"),
    }
    let cfg = local_run::DriveConfig {
        log: log.clone(),
        build: build.clone(),
        slots: parallel,
        workdir: run.workdir.clone(),
        scratch_dir: run.scratch_dir.clone(),
        objects: None,
        container: None,
        pipeline_file: None,
        cache_limit: 0,
        // The per-job overhead measured here is scheduling and execution, as recorded in
        // docs/PERFORMANCE.md since the first figures: no usage ticks.
        usage: None,
    };
    let (status, reason) = local_run::drive(cfg, from, CancellationToken::new()).await?;
    let elapsed = start.elapsed();
    anyhow::ensure!(
        status == Status::Succeeded,
        "benchmark build failed: {reason}"
    );
    let events = log.end_offset().await? - from;
    let per_job = |d: Duration| d.as_secs_f64() * 1e3 / jobs as f64;
    println!("bench run: {jobs} jobs of `true`, --parallel {parallel}");
    println!(
        "  tributary run : {:>8.1} ms total, {:>6.3} ms/job, {events} events",
        elapsed.as_secs_f64() * 1e3,
        per_job(elapsed)
    );
    println!(
        "  bare sh -c    : {:>8.1} ms total, {:>6.3} ms/job",
        baseline.as_secs_f64() * 1e3,
        per_job(baseline)
    );
    println!(
        "  overhead      : {:>6.3} ms/job",
        per_job(elapsed) - per_job(baseline)
    );
    Ok(ExitCode::SUCCESS)
}
