//! One function per subcommand: parse nothing, decide little, print results.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tributary_eventlog::EventLog;
use tributary_projections::{replay, Build};
use tributary_proto::events::{envelope::Payload, Envelope, Status};

use crate::agent::BuildRef;
use crate::cli::{BuildsArgs, Command, EventsArgs, ReplayArgs, RunArgs};
use crate::data_dir::DataDir;
use crate::local_run::{self, LocalRun};
use crate::render::Renderer;

pub async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run(args) => run(args).await,
        Command::Events(args) => events(args).await,
        Command::Builds(args) => builds(args).await,
        Command::Replay(args) => replay_cmd(args).await,
        Command::Bench(cmd) => crate::bench::bench(cmd).await,
        Command::Up(args) => crate::server::up(args).await,
        Command::Serve(crate::cli::ServeCommand::Autoscaler(args)) => {
            crate::serve::autoscaler(args).await
        }
        Command::Project(cmd) => crate::client::project(cmd).await,
        Command::Trigger(args) => crate::client::trigger(args).await,
        Command::Logs(args) => crate::client::logs(args).await,
        Command::Get(args) if args.at.is_some() => crate::history::get_at(args).await,
        Command::Get(args) => crate::client::get(args.get).await,
        Command::Why(args) => crate::history::why(args).await,
        Command::Cancel(args) => crate::client::cancel(args).await,
        Command::Rerun(args) => crate::client::rerun(args).await,
        Command::Watch(args) => crate::client::watch(args).await,
        Command::Artifacts(cmd) => crate::artifacts::command(cmd).await,
        Command::Secret(cmd) => crate::secrets::command(cmd).await,
        Command::Admin(cmd) => crate::client::admin(cmd).await,
        Command::Agents(args) => crate::client::agents(args).await,
        Command::Agent(args) => crate::agent::command(args).await,
        Command::Serve(crate::cli::ServeCommand::Projector(args)) => {
            crate::serve::projector(args).await
        }
        Command::Serve(crate::cli::ServeCommand::Api(args)) => crate::serve::api(args).await,
        Command::Serve(crate::cli::ServeCommand::Scheduler(args)) => {
            crate::serve::scheduler(args).await
        }
        Command::Serve(crate::cli::ServeCommand::Metering(args)) => {
            crate::serve::metering(args).await
        }
        Command::Invoice(args) => crate::metering::invoice(args).await,
        Command::Init(args) => crate::init::command(args),
        Command::Completions(args) => {
            let mut cli = <crate::cli::Cli as clap::CommandFactory>::command();
            clap_complete::generate(args.shell, &mut cli, "tributary", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit(args) => crate::metering::audit(args).await,
    }
}

async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    // A missing or unreadable pipeline file is a usage error, like an invalid one: exit 2.
    let text = match local_run::read_pipeline(&args.file) {
        Ok(text) => text,
        Err(e) => {
            eprintln!("error: {e:#}");
            return Ok(ExitCode::from(2));
        }
    };
    let usage = match crate::agent::machine_class(args.machine_class.clone()) {
        Some(machine_class) => Some(tributary_agent::UsageMeter {
            machine_class,
            interval: crate::agent::secs(args.usage_interval, "--usage-interval")?,
        }),
        None => None,
    };
    let workdir = args
        .file
        .canonicalize()
        .ok()
        .and_then(|p| p.parent().map(|p| p.to_path_buf()))
        .unwrap_or_else(|| std::path::PathBuf::from("."));
    let dir = args.data.dir();
    let fresh = !dir.exists();
    let _lock = crate::dir_lock::lock(&dir)?;
    if fresh {
        // The data directory is not part of the repository: git ignores it from the start.
        let ignore = dir.join(".gitignore");
        if let Err(e) = std::fs::write(&ignore, "*\n") {
            eprintln!("warning: cannot write {}: {e}", ignore.display());
        }
    }
    let data = DataDir::open(&dir).await?;
    let log: Arc<dyn EventLog> = data.log.clone();
    let project = workdir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "local".into());
    let build = BuildRef {
        tenant: "local".into(),
        project,
        build_id: tributary_proto::new_id(),
    };
    let run = LocalRun {
        pipeline_file: args.file.clone(),
        pipeline_text: text,
        workdir,
        parallel: args.parallel,
        scratch_dir: data.path.join("scratch"),
        only_job: args.job.clone(),
    };
    let tty = !args.plain && std::io::stdout().is_terminal();
    let from = log.end_offset().await?;
    let jobs = match local_run::trigger(log.as_ref(), &build, &run).await? {
        Ok(jobs) => jobs,
        Err(err) => {
            eprintln!("error: invalid pipeline\n  {err}");
            data.catch_up().await?;
            return Ok(ExitCode::from(2));
        }
    };
    println!(
        "build {} ({} job{}), log in {}",
        build.build_id,
        jobs.len(),
        if jobs.len() == 1 { "" } else { "s" },
        data.path.display()
    );
    // A data directory inside the repository (an explicit --data there): container jobs see
    // an empty read-only directory in its place; host jobs cannot be kept from it.
    let hidden: Vec<std::path::PathBuf> = data
        .path
        .starts_with(&run.workdir)
        .then(|| data.path.clone())
        .into_iter()
        .collect();
    if !hidden.is_empty() && jobs.iter().any(|j| j.image.trim().is_empty()) {
        eprintln!(
            "note: the data directory {} is inside {}, where the jobs run: host jobs see the \
             log there (container jobs get an empty directory in its place); leave --data out \
             (or point it outside) to keep it out of their way",
            data.path.display(),
            run.workdir.display()
        );
    }
    let container = local_container(&args.containers, &build.build_id, &jobs, hidden).await;
    let renderer = tokio::spawn(Renderer::new(&build.build_id, tty).follow(log.clone(), from));
    let cancel = CancellationToken::new();
    let ctrl_c = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                cancel.cancel();
            }
        })
    };
    let projector = {
        let store = data.store.clone();
        let log = log.clone();
        tokio::spawn(async move {
            let mut p = tributary_projections::BuildsProjector::open(store).await?;
            p.follow(log.as_ref()).await
        })
    };
    let cfg = local_run::DriveConfig {
        log: log.clone(),
        build: build.clone(),
        slots: run.parallel,
        workdir: run.workdir.clone(),
        scratch_dir: run.scratch_dir.clone(),
        objects: Some(data.objects()?),
        container,
        pipeline_file: Some(
            args.file
                .canonicalize()
                .unwrap_or_else(|_| args.file.clone())
                .display()
                .to_string(),
        ),
        cache_limit: args.cache_limit,
        usage,
    };
    let (status, _reason) = local_run::drive(cfg, from, cancel).await?;
    ctrl_c.abort();
    let _ = renderer.await;
    projector.abort();
    data.catch_up().await?;
    Ok(if status == Status::Succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The container runtime of a local run, when a job has an `image`: the engine of --engine,
/// DOCKER_HOST or Podman's default socket. Unreachable: said on stderr, and those jobs fail.
async fn local_container(
    args: &crate::cli::ContainerArgs,
    build_id: &str,
    jobs: &[tributary_proto::events::JobPlan],
    hidden: Vec<std::path::PathBuf>,
) -> Option<tributary_agent::ContainerRuntime> {
    let first = jobs.iter().find(|j| j.runs_in_container())?;
    let address = args
        .engine
        .clone()
        .filter(|a| !a.trim().is_empty())
        .unwrap_or_else(tributary_executor::container::engine_from_env);
    let settings = async {
        let engine = crate::agent::connect_engine(address.trim()).await?;
        anyhow::Ok((engine, crate::agent::container_limits(args)?))
    };
    match settings.await {
        Ok((engine, limits)) => Some(tributary_agent::ContainerRuntime {
            engine,
            limits,
            // Unique per run: concurrent local runs never touch each other's containers.
            owner: format!("local-{build_id}"),
            hidden,
        }),
        Err(e) => {
            eprintln!(
                "error: job {} runs in a container (image {}), but {e:#}",
                first.id,
                first.image_description()
            );
            None
        }
    }
}

async fn events(args: EventsArgs) -> anyhow::Result<ExitCode> {
    let data = DataDir::open(&args.data.dir()).await?;
    // A unique prefix of a build id will do (the table prints 13 characters).
    let build = match &args.build {
        Some(id) => Some(local_build_id(&data, id).await?),
        None => None,
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut from = args.from;
    loop {
        let records = match &build {
            Some(build) => data.log.read_key(build, from, 4096).await?,
            None => data.log.read(from, 4096).await?,
        };
        let Some(last) = records.last() else { break };
        from = last.offset + 1;
        for record in &records {
            let env = match record.decode() {
                Ok(env) => env,
                Err(e) => {
                    writeln!(out, "{:>8}  (malformed event: {e})", record.offset)?;
                    continue;
                }
            };
            if args.json {
                writeln!(
                    out,
                    "{}",
                    tributary_proto::json::event_json(record.offset, &env)
                )?;
            } else {
                writeln!(out, "{}", human_event(record.offset, &env))?;
            }
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// The full id of the data directory's build `id` names: itself or a unique prefix of it.
async fn local_build_id(data: &DataDir, id: &str) -> anyhow::Result<String> {
    if id.len() >= 36 {
        return Ok(id.to_owned());
    }
    // The read model as the last run (or the running server) left it: a reader does not fold.
    let ids = data.store.build_ids_with_prefix(None, id, 6).await?;
    tributary_api::builds::pick_id(id, ids).map_err(|e| match e {
        tributary_api::builds::IdError::None(m) | tributary_api::builds::IdError::Several(m) => {
            anyhow::anyhow!(m)
        }
    })
}

fn human_event(offset: u64, env: &Envelope) -> String {
    let detail = match &env.payload {
        Some(Payload::BuildTriggered(e)) => {
            format!("by {} from {} ({})", e.who, e.source, e.pipeline_path)
        }
        Some(Payload::BuildQueued(e)) => {
            format!("{} jobs", e.plan.as_ref().map_or(0, |p| p.jobs.len()))
        }
        Some(Payload::PipelineRejected(e)) => {
            format!("{}:{}:{}: {}", e.file, e.line, e.column, e.message)
        }
        Some(Payload::JobQueued(e)) => format!("{} attempt {}", e.job, e.attempt),
        Some(Payload::JobAssigned(e)) => {
            format!("{} attempt {} -> {}", e.job, e.attempt, e.agent_id)
        }
        Some(Payload::JobStarted(e)) => {
            format!("{} attempt {} on {}", e.job, e.attempt, e.agent_id)
        }
        Some(Payload::StepStarted(e)) => format!("{} step {} {}", e.job, e.step, e.name),
        Some(Payload::LineStarted(e)) => {
            format!(
                "{} {}.{} $ {}",
                e.job,
                e.step,
                e.line,
                e.text.lines().next().unwrap_or("")
            )
        }
        Some(Payload::LogChunk(e)) => format!(
            "{} {}.{} {} {:?}",
            e.job,
            e.step,
            e.line,
            tributary_proto::events::Stream::try_from(e.stream).map_or("?", |s| s.name()),
            String::from_utf8_lossy(&e.data)
        ),
        Some(Payload::LineExited(e)) => {
            format!(
                "{} {}.{} exit {} ({}us)",
                e.job, e.step, e.line, e.exit_code, e.duration_us
            )
        }
        Some(Payload::StepFinished(e)) => format!("{} step {} {}", e.job, e.step, status(e.status)),
        Some(Payload::ArtifactUploaded(e)) => {
            format!("{} {} {} bytes sha256 {}", e.job, e.path, e.size, e.sha256)
        }
        Some(Payload::JobFinished(e)) => format!(
            "{} attempt {} {} {}",
            e.job,
            e.attempt,
            status(e.status),
            e.reason
        ),
        Some(Payload::BuildFinished(e)) => format!("{} {}", status(e.status), e.reason),
        Some(Payload::BuildCanceled(e)) => format!("by {} {}", e.who, e.reason),
        Some(Payload::UsageTick(e)) => format!(
            "{} {} {}ms seq {}{}",
            e.job,
            e.machine_class,
            e.millis,
            e.seq,
            if e.last { " last" } else { "" }
        ),
        Some(Payload::InvoiceIssued(e)) => format!(
            "{} {} {} lines total {} {}",
            e.tenant,
            e.period,
            e.lines.len(),
            tributary_metering::plan::format_money(e.total_micros, 2),
            e.currency
        ),
        Some(Payload::JobRequeued(e)) => format!(
            "{} attempt {} from {}: {}",
            e.job, e.attempt, e.agent_id, e.reason
        ),
        Some(Payload::AgentConnected(e)) => format!("{} labels {:?}", e.agent_id, e.labels),
        Some(Payload::AgentDisconnected(e)) => format!("{} {}", e.agent_id, e.reason),
        Some(Payload::ProjectCreated(e)) => format!("{}/{} {}", e.tenant, e.name, e.repository),
        Some(Payload::ProjectRepositoryChanged(e)) => {
            format!(
                "{}/{} {} (was {})",
                e.tenant, e.name, e.repository, e.previous
            )
        }
        Some(Payload::CacheRestored(e)) => {
            let what = if e.hit {
                format!("hit, {} files, {} bytes", e.files, e.size)
            } else {
                "miss".to_owned()
            };
            let warning = if e.warning.is_empty() {
                String::new()
            } else {
                format!(": {}", e.warning)
            };
            format!("{} cache {:?} {what}{warning}", e.job, e.key)
        }
        Some(Payload::CacheSaved(e)) => format!(
            "{} cache {:?} saved, {} files, {} bytes",
            e.job, e.key, e.files, e.size
        ),
        Some(Payload::CacheEvicted(e)) => {
            format!("cache {:?} evicted ({} bytes): {}", e.key, e.size, e.reason)
        }
        Some(Payload::JobReused(e)) => {
            format!("{} {}", e.job, tributary_scheduler::reused_reason(e))
        }
        Some(_) | None => String::new(),
    };
    format!(
        "{offset:>8}  {}  {:<18} {detail}",
        short(&env.build_id),
        env.type_name()
    )
}

fn status(s: i32) -> &'static str {
    Status::try_from(s).map_or("unknown", Status::name)
}

fn short(id: &str) -> &str {
    id.get(..13).unwrap_or(id)
}

async fn builds(args: BuildsArgs) -> anyhow::Result<ExitCode> {
    if let Some(server) = args.server.clone() {
        return crate::client::builds_list(args, server).await;
    }
    let data = DataDir::open(&args.data.dir()).await?;
    data.catch_up().await?;
    let list = data.store.list_builds(args.limit).await?;
    if args.json {
        let mut full: Vec<Build> = Vec::new();
        for b in &list {
            if let Some(b) = data.store.load_build(&b.id).await? {
                full.push(b);
            }
        }
        println!("{}", serde_json::to_string_pretty(&full)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<36}  {:<10}  {:<16}  {:<12}  {:>9}  REASON",
        "BUILD", "STATUS", "PROJECT", "COMMIT", "DURATION"
    )?;
    for b in &list {
        let duration = match (b.started_us.or(Some(b.triggered_us)), b.finished_us) {
            (Some(s), Some(f)) => format!("{:.2}s", (f - s) as f64 / 1e6),
            _ => "-".into(),
        };
        let commit = if b.commit.is_empty() {
            "-"
        } else {
            b.commit.get(..12).unwrap_or(&b.commit)
        };
        writeln!(
            out,
            "{:<36}  {:<10}  {:<16}  {:<12}  {:>9}  {}",
            b.id,
            b.phase.name(),
            b.project,
            commit,
            duration,
            b.reason.lines().next().unwrap_or("")
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn replay_cmd(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let backends = args.backends.resolve()?;
    // A rebuild writes the read models; a check only reads them.
    let _lock = match args.check {
        true => None,
        false => backends.lock_data()?,
    };
    let log = backends.open_log().await?;
    let store = backends.open_store().await?;
    // Metering: every events partition, into DIR/metering.db or the database's `metering`
    // schema.
    let metering = Some(backends.open_metering().await?);
    if args.check {
        let mut same = true;
        match replay::check(log.as_ref(), &store).await? {
            None => {
                let offsets = store.next_offsets().await?;
                if log.layout().partitions() == 1 {
                    let at = offsets.get(&0).copied().unwrap_or(0);
                    println!("builds read model matches a replay of the log up to offset {at}");
                } else {
                    println!(
                        "builds read model matches a replay of the log up to these offsets \
                         (partition: next offset): {offsets:?}"
                    );
                }
            }
            Some(divergence) => {
                println!("MISMATCH in the builds read model: {divergence}");
                same = false;
            }
        }
        if let Some(metering) = &metering {
            let (diffs, at, _) = tributary_metering::audit::check(log.clone(), metering, None)
                .await
                .context("cannot replay the log into a metering state")?;
            match diffs.first() {
                None => {
                    if log.layout().partitions() == 1 {
                        let at = at.get(&0).copied().unwrap_or(0);
                        println!(
                            "metering read model matches a replay of the log up to offset {at}"
                        )
                    } else {
                        println!(
                            "metering read model matches a replay of the log up to these \
                             offsets (partition: next offset): {at:?}"
                        )
                    }
                }
                Some(first) => {
                    println!(
                        "MISMATCH in the metering read model ({} rows differ), the first: {first}",
                        diffs.len()
                    );
                    same = false;
                }
            }
        }
        return Ok(if same {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        });
    }
    if let (Some(url), tributary_projections::store::Engine::Postgres) =
        (&backends.database, store.engine())
    {
        let offsets = replay::rebuild_fresh(log.as_ref(), url, &store)
            .await
            .context("replay failed; the stored read models are unchanged")?;
        println!(
            "rebuilt the builds read model into fresh tables and swapped them in \
             (partition: next offset): {offsets:?}"
        );
    } else {
        let end = replay::rebuild(log.as_ref(), &store)
            .await
            .context("replay failed; the stored read models are unchanged")?;
        if log.layout().partitions() == 1 {
            println!("rebuilt the builds read model from offsets 0..{end}");
        } else {
            let offsets = store.next_offsets().await?;
            println!("rebuilt the builds read model from every events partition: {offsets:?}");
        }
    }
    if let Some(metering) = &metering {
        let ends = match (&backends.database, metering.engine()) {
            (Some(url), tributary_metering::store::Engine::Postgres) => {
                tributary_metering::audit::rebuild_fresh(log.clone(), url, metering)
                    .await
                    .context("replaying metering failed; the metering tables are unchanged")?
            }
            _ => tributary_metering::audit::rebuild(log.clone(), metering)
                .await
                .context("replaying metering failed; metering.db is unchanged")?,
        };
        if log.layout().partitions() == 1 {
            let end = ends.get(&0).copied().unwrap_or(0);
            println!("rebuilt the metering read model (metering.db) from offsets 0..{end}");
        } else {
            println!(
                "rebuilt the metering read model ({}) from every events partition: {ends:?}",
                backends.metering_location()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
