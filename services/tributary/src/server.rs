//! `tributary up`: the embedded all-in-one server — every role of `crate::roles` (the API, the
//! scheduler, the builds projector, metering, optionally the autoscaler) in one process on the
//! data directory's SQLite log and read models, plus in-process agents. The listener, signal,
//! server key, admin token and scheduler configuration are the roles' shared code, the same as
//! `tributary serve X` uses.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tributary_agent::AgentConfig;
use tributary_eventlog::EventLog;

use crate::cli::UpArgs;
use crate::data_dir::DataDir;
use crate::roles::{self, wait_for_signal};

pub async fn up(args: UpArgs) -> anyhow::Result<ExitCode> {
    // First: a second `up` on this directory stops here, before it touches anything.
    let _lock = crate::dir_lock::lock(&args.data.dir())?;
    let autoscaler_config = match &args.autoscaler {
        Some(path) => Some((crate::autoscaler::load_config(path)?, path.clone())),
        None => None,
    };
    let metering_config = crate::metering::service_config(&args.metering)?;
    let scheduler_config = roles::scheduler::config(args.lease_ttl)?;
    let data = DataDir::open(&args.data.dir()).await?;
    let log: Arc<dyn EventLog> = data.log.clone();
    let token_path = data.path.join("admin.token");
    let first_start = !token_path.exists();
    if first_start {
        roles::create_admin_token(log.as_ref(), &token_path).await?;
    }
    let listener = roles::bind(&args.listen).await?;
    let addr = listener.local_addr()?;
    let access = args.repos.access(&data.path)?;
    // The builds projector runs here: reads that must see a write wait on its position watch.
    let builds_projector = tributary_projections::BuildsProjector::open(data.store.clone())
        .await
        .context("cannot open the builds read model")?;
    let read_model = tributary_projections::ReadModelPositions::in_process(
        builds_projector.applied(),
        log.layout().events,
    );
    let projector_stop = CancellationToken::new();
    let projector = tokio::spawn(roles::projector::run(
        log.clone(),
        builds_projector,
        projector_stop.clone(),
    ));
    let server_key = roles::load_or_create_key(&data.path.join("server.key"))?;
    let objects = match args.objects.as_deref().filter(|u| !u.trim().is_empty()) {
        Some(url) => tributary_objects::Objects::open(url.trim())
            .with_context(|| format!("cannot open the object storage {url} (--objects)"))?,
        None => data.objects()?,
    };

    // The API (gRPC + HTTP on one port).
    let api_stop = CancellationToken::new();
    let api = tokio::spawn(roles::api::run(
        roles::api::Backends {
            log: log.clone(),
            store: data.store.clone(),
            metering: data.metering.clone(),
            objects: objects.clone(),
            data: data.path.clone(),
        },
        roles::api::Options {
            listener,
            server_key,
            access: access.clone(),
            plan: metering_config.plan.clone(),
            cache_limit: args.cache_limit,
            read_model: Some(read_model),
            admin_token: None,
        },
        api_stop.clone(),
    ));
    crate::memory::trim_periodically();

    // Scheduler: folds the log, assigns leases to connected agents, requeues lost ones.
    let scheduler_stop = CancellationToken::new();
    let scheduler = tokio::spawn(roles::scheduler::run(
        log.clone(),
        roles::scheduler::Options {
            config: scheduler_config,
            ownership: roles::scheduler::Ownership::Every,
        },
        scheduler_stop.clone(),
    ));

    // Metering: usage ticks -> usage and invoices (metering.db); issues closed months.
    let metering_stop = CancellationToken::new();
    let metering = tokio::spawn(roles::metering::run(
        log.clone(),
        data.metering.clone(),
        metering_config,
        metering_stop.clone(),
    ));

    // In-process agents: the same agent runtime as `tributary agent`, over loopback gRPC,
    // enrolled with the admin token as shared agents.
    let admin_token = std::fs::read_to_string(&token_path)
        .with_context(|| format!("cannot read {}", token_path.display()))?;
    let machine_class = args
        .agent_machine_class
        .clone()
        .filter(|c| !c.trim().is_empty())
        .unwrap_or_else(tributary_agent::default_machine_class);
    let usage_interval = crate::agent::secs(args.usage_interval, "--usage-interval")?;
    let containers = crate::agent::container_settings(&args.containers).await?;
    let drain = CancellationToken::new();
    let mut agents = tokio::task::JoinSet::new();
    for i in 0..args.agents {
        let mut config = AgentConfig::new(
            format!("http://{addr}"),
            data.path.join("agents").join(format!("embedded-{i}")),
        );
        config.enrollment_token = Some(admin_token.trim().to_owned());
        config.name = format!("embedded-{i}");
        config.capacity = args.agent_capacity.max(1) as u32;
        config.objects = Some(objects.clone());
        config.machine_class = Some(machine_class.clone());
        config.usage_interval = usage_interval;
        config.containers = containers.clone();
        config.keep_failed_for = args.keep_failed;
        config.repo_access = access.clone();
        agents.spawn(tributary_agent::run(config, drain.clone()));
    }

    // The autoscaler: agents sized from the queue, enrolled with the admin token.
    let autoscaler_stop = CancellationToken::new();
    let autoscaler = match autoscaler_config {
        Some((config, path)) => {
            let provider = crate::autoscaler::provider(
                args.autoscaler_provider,
                &config,
                &path,
                format!("http://{addr}"),
                admin_token.trim().to_owned(),
                data.path.join("autoscaler"),
            )
            .await?;
            Some(tokio::spawn(roles::autoscaler::run(
                log.clone(),
                roles::autoscaler::Options {
                    config,
                    provider,
                    replicas: tributary_autoscaler::service::Replicas::Alone,
                },
                autoscaler_stop.clone(),
            )))
        }
        None => None,
    };

    println!(
        "tributary is up: gRPC and HTTP on http://{addr} (web UI: http://{addr}/ui/), data in {}",
        data.path.display()
    );
    if first_start {
        println!(
            "admin token written to {} (mode 0600); use it with:\n  export TRIBUTARY_SERVER=http://{addr} TRIBUTARY_TOKEN=$(cat {})",
            token_path.display(),
            token_path.display()
        );
    }
    let _ = std::io::stdout().flush();

    wait_for_signal().await;
    // Drain: agents take no new work and finish what they run, while the API stays up to take
    // their events. A second signal stops at once.
    tracing::info!("draining agents");
    drain.cancel();
    autoscaler_stop.cancel();
    tokio::select! {
        _ = async {
            while agents.join_next().await.is_some() {}
            // The autoscaler's provider drains the agents it started.
            if let Some(autoscaler) = autoscaler {
                stopped("autoscaler", autoscaler).await;
            }
        } => {}
        _ = wait_for_signal() => tracing::warn!("second signal: stopping without waiting for jobs"),
    }
    // Then the roles, the API last but the projector (it applies what the others appended).
    for (what, stop, task) in [
        ("scheduler", scheduler_stop, scheduler),
        ("metering", metering_stop, metering),
        ("API server", api_stop, api),
        ("builds projector", projector_stop, projector),
    ] {
        stop.cancel();
        stopped(what, task).await;
    }
    data.log.close().await;
    Ok(ExitCode::SUCCESS)
}

/// Waits for a stopped role, logging how it failed if it did.
async fn stopped(what: &str, task: JoinHandle<anyhow::Result<()>>) {
    match task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = format!("{e:#}"), "{what} stopped with an error"),
        Err(e) => tracing::error!(error = %e, "{what} panicked"),
    }
}
