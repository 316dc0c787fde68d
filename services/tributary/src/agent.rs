//! Agents, as the `tributary` binary uses them.
//!
//! * The in-process agent of `tributary run` and `tributary up`: [`run_attempt`] runs one
//!   leased job attempt with the host executor and appends its events (JobStarted, the
//!   executor's step/line/log events, JobFinished) to the log, through one ordered writer.
//! * `tributary agent`: a remote agent that takes its jobs from a server ([`command`]).
//!
//! Both are thin layers over the `tributary-agent` crate.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tributary_agent::{
    AgentConfig, AgentError, ContainerLimits, ContainerSettings, Engine, LogSink,
};
use tributary_eventlog::EventLog;

pub use tributary_agent::{AttemptOptions, BuildRef, JobWorkspace, Lease, Workspaces};

use crate::cli::{AgentArgs, ContainerArgs};

/// Runs the attempt to its end, appending its events to `log` in order. Errors appending to
/// the log are logged; the scheduler sees a job without JobFinished as lost.
pub async fn run_attempt(
    log: Arc<dyn EventLog>,
    build: BuildRef,
    lease: Lease,
    workspace: JobWorkspace,
    scratch_dir: PathBuf,
    cancel: CancellationToken,
    options: AttemptOptions,
) -> tributary_agent::AttemptReport {
    tributary_agent::run_attempt(
        Arc::new(LogSink::new(log)),
        build,
        lease,
        workspace,
        scratch_dir,
        cancel,
        options,
    )
    .await
}

/// The machine class of `--machine-class`: the host's by default, none (no usage ticks) when
/// empty.
pub fn machine_class(flag: Option<String>) -> Option<String> {
    match flag {
        None => Some(tributary_agent::default_machine_class()),
        Some(c) if c.trim().is_empty() => None,
        Some(c) => Some(c.trim().to_owned()),
    }
}

/// The container limits the flags ask for.
pub fn container_limits(args: &ContainerArgs) -> anyhow::Result<ContainerLimits> {
    if !(args.cpus >= 0.0 && args.cpus.is_finite()) {
        anyhow::bail!(
            "--cpus must be 0 (no limit) or a positive number, not {}",
            args.cpus
        );
    }
    Ok(ContainerLimits {
        cpus: args.cpus,
        memory_bytes: args.memory,
        pids: args.pids_limit,
        image_keep: args.image_keep,
    })
}

/// Connects to the engine at `address` and says so on stdout.
pub async fn connect_engine(address: &str) -> anyhow::Result<Engine> {
    let engine = Engine::connect(address).await?;
    println!("container engine: {} at {address}", engine.description());
    Ok(engine)
}

/// Container settings of an agent: only with `--engine` (then the engine must answer).
pub async fn container_settings(args: &ContainerArgs) -> anyhow::Result<Option<ContainerSettings>> {
    let Some(address) = args.engine.as_deref().filter(|a| !a.trim().is_empty()) else {
        return Ok(None);
    };
    Ok(Some(ContainerSettings {
        engine: connect_engine(address.trim()).await?,
        limits: container_limits(args)?,
    }))
}

/// `tributary agent`: registers (first start), then takes jobs from the server until a signal.
/// The first SIGINT/SIGTERM drains (no new jobs, running ones finish, exit 0); a second one
/// cancels the running jobs and exits at once (status 130).
pub async fn command(args: AgentArgs) -> anyhow::Result<ExitCode> {
    let repo_access = args.repos.access(&args.workdir)?;
    let mut config = AgentConfig::new(args.server, args.workdir);
    config.repo_access = repo_access;
    config.enrollment_token = args.token.filter(|t| !t.trim().is_empty());
    if let Some(name) = args.name {
        config.name = name;
    }
    config.labels = args
        .labels
        .iter()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect();
    config.capacity = args.capacity;
    config.machine_class = machine_class(args.machine_class);
    config.usage_interval = secs(args.usage_interval, "--usage-interval")?;
    if let Some(url) = args.objects.as_deref().filter(|u| !u.is_empty()) {
        config.objects = Some(tributary_objects::Objects::open(url)?);
    }
    config.containers = container_settings(&args.containers).await?;
    config.keep_failed_for = args.keep_failed;
    config.kept_sweep_interval = args.kept_sweep_interval;

    let drain = CancellationToken::new();
    let abort = CancellationToken::new();
    let signals = tokio::spawn(signals(drain.clone(), abort.clone()));

    let identity = match tributary_agent::identify(&config, &drain).await {
        Ok(identity) => identity,
        Err(_) if drain.is_cancelled() => return Ok(ExitCode::SUCCESS),
        Err(e) => return Err(e.into()),
    };
    println!(
        "tributary agent {} ({}) on {}: labels [{}], capacity {}, work directory {}",
        identity.agent_id,
        if identity.name.is_empty() {
            &config.name
        } else {
            &identity.name
        },
        config.server,
        config.labels.join(","),
        config.capacity,
        config.workdir.display()
    );
    let result = tributary_agent::run_as(config, identity, drain, abort).await;
    signals.abort();
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(AgentError::Aborted(n)) => {
            tracing::warn!(canceled = n, "stopped at once");
            Ok(ExitCode::from(130))
        }
        Err(e) => Err(e.into()),
    }
}

/// A positive number of seconds from a flag.
pub fn secs(value: f64, flag: &str) -> anyhow::Result<std::time::Duration> {
    if value.is_finite() && value > 0.0 {
        Ok(std::time::Duration::from_secs_f64(value))
    } else {
        anyhow::bail!("{flag} must be a positive number of seconds, not {value}")
    }
}

/// First SIGINT or SIGTERM: drain. Second: abort.
async fn signals(drain: CancellationToken, abort: CancellationToken) {
    let mut term = signal(SignalKind::terminate()).ok();
    next_signal(&mut term).await;
    tracing::warn!(
        "draining: taking no new jobs, waiting for the running ones (signal again to stop at once)"
    );
    drain.cancel();
    next_signal(&mut term).await;
    tracing::warn!("stopping at once: canceling the running jobs");
    abort.cancel();
}

/// The next SIGINT (Ctrl-C) or SIGTERM.
async fn next_signal(term: &mut Option<Signal>) {
    let terminated = async {
        match term.as_mut() {
            Some(t) => {
                t.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminated => {}
    }
}
