//! `tributary up`: the embedded all-in-one server — the gRPC API, the scheduler driver, the
//! builds projector, the metering service and in-process agents, on the SQLite log in the
//! data directory.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::process::ExitCode;
use std::sync::Arc;

use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tributary_agent::AgentConfig;
use tributary_eventlog::EventLog;
use tributary_scheduler::cluster::ClusterConfig;

use crate::cli::UpArgs;
use crate::data_dir::DataDir;

/// The tenant the admin token belongs to (and the default for its own projects).
pub const DEFAULT_TENANT: &str = "default";

pub async fn up(args: UpArgs) -> anyhow::Result<ExitCode> {
    // First: a second `up` on this directory stops here, before it touches anything.
    let _lock = crate::dir_lock::lock(&args.data.dir())?;
    let autoscaler_config = match &args.autoscaler {
        Some(path) => Some((crate::autoscaler::load_config(path)?, path.clone())),
        None => None,
    };
    let metering_config = crate::metering::service_config(&args.metering)?;
    let data = DataDir::open(&args.data.dir()).await?;
    let log: Arc<dyn EventLog> = data.log.clone();
    let token_path = data.path.join("admin.token");
    let first_start = !token_path.exists();
    if first_start {
        create_admin_token(log.as_ref(), &token_path).await?;
    }
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {}; pick another --listen ADDR",
                args.listen
            )
        })?;
    let addr = listener.local_addr()?;
    let access = args.repos.access(&data.path)?;
    let mirrors =
        tributary_repo::Mirrors::new(data.path.join("mirrors")).with_access(access.clone());
    // The builds projector runs here: reads that must see a write wait on its position watch.
    let mut builds_projector = tributary_projections::BuildsProjector::open(data.store.clone())
        .await
        .context("cannot open the builds read model")?;
    let read_model = tributary_projections::ReadModelPositions::in_process(
        builds_projector.applied(),
        log.layout().events,
    );
    let projector = {
        let log = log.clone();
        tokio::spawn(async move { builds_projector.follow(log.as_ref()).await })
    };
    let server_key = load_or_create_key(&data.path.join("server.key"))?;
    let objects = match args.objects.as_deref().filter(|u| !u.trim().is_empty()) {
        Some(url) => tributary_objects::Objects::open(url.trim())
            .with_context(|| format!("cannot open the object storage {url} (--objects)"))?,
        None => data.objects()?,
    };
    let state = tributary_api::ApiState::start(
        log.clone(),
        data.store.clone(),
        mirrors.clone(),
        Some(server_key),
    )
    .await?
    .with_read_model(read_model)
    .with_objects(objects.clone())
    .with_cache_limit(args.cache_limit);
    crate::memory::trim_periodically();

    // Scheduler service: folds the log, assigns leases to connected agents, requeues lost ones.
    let ttl_us = (args.lease_ttl * 1e6) as i64;
    let config = ClusterConfig {
        lease_ttl_us: ttl_us,
        agent_ttl_us: ttl_us,
        ..ClusterConfig::default()
    };
    let scheduler_stop = CancellationToken::new();
    let scheduler = tokio::spawn(tributary_scheduler::service::run(
        log.clone(),
        config,
        Duration::from_millis(250),
        tributary_scheduler::service::Partitions::every(log.layout()),
        scheduler_stop.clone(),
    ));

    // Metering: usage ticks -> usage and invoices (metering.db); issues closed months.
    let metering_stop = CancellationToken::new();
    let metering = tokio::spawn(tributary_metering::service::run(
        log.clone(),
        data.metering.clone(),
        metering_config.clone(),
        metering_stop.clone(),
    ));
    let metering_api = tributary_api::metering::MeteringApi::new(
        state.clone(),
        tributary_api::metering::MeteringReader::new(
            data.metering.clone(),
            metering_config.plan.clone(),
        ),
    );

    // The API (gRPC + HTTP on one port).
    let server_stop = CancellationToken::new();
    let server = {
        let stop = server_stop.clone();
        tokio::spawn(tributary_api::serve_with_metering(
            state,
            Some(metering_api),
            listener,
            async move { stop.cancelled().await },
        ))
    };

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
            Some(crate::autoscaler::spawn(
                log.clone(),
                config,
                provider,
                tributary_autoscaler::service::Replicas::Alone,
                autoscaler_stop.clone(),
            ))
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
                if let Ok(Err(e)) = autoscaler.await {
                    tracing::error!(error = %e, "autoscaler stopped with an error");
                }
            }
        } => {}
        _ = wait_for_signal() => tracing::warn!("second signal: stopping without waiting for jobs"),
    }
    scheduler_stop.cancel();
    if let Ok(Err(e)) = scheduler.await {
        tracing::error!(error = %e, "scheduler stopped with an error");
    }
    metering_stop.cancel();
    if let Ok(Err(e)) = metering.await {
        tracing::error!(error = %e, "metering stopped with an error");
    }
    server_stop.cancel();
    if let Ok(Err(e)) = server.await {
        tracing::error!(error = %e, "API server stopped with an error");
    }
    projector.abort();
    data.log.close().await;
    Ok(ExitCode::SUCCESS)
}

pub async fn wait_for_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match term.as_mut() {
                Some(t) => { t.recv().await; }
                None => std::future::pending::<()>().await,
            }
        } => {}
    }
}

/// The key that seals secrets at rest: 32 random bytes in `path` (0600), made on first start.
pub(crate) fn load_or_create_key(
    path: &std::path::Path,
) -> anyhow::Result<tributary_api::seal::ServerKey> {
    if let Ok(bytes) = std::fs::read(path) {
        let key: [u8; 32] = bytes.try_into().map_err(|_| {
            anyhow::anyhow!(
                "{} is not a 32-byte key; restore it from backup",
                path.display()
            )
        })?;
        return Ok(tributary_api::seal::ServerKey::new(key));
    }
    let key = tributary_api::seal::ServerKey::generate();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(key.bytes())?;
    file.sync_all()?;
    Ok(key)
}

/// First start: the default tenant and an admin token, whose sha256 goes on the log and whose
/// text goes to `path` (readable by the owner only).
async fn create_admin_token(log: &dyn EventLog, path: &std::path::Path) -> anyhow::Result<()> {
    let (token, sha256) = tributary_api::auth::new_token();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    crate::serve::register_admin_token(log, &sha256, true).await?;
    writeln!(file, "{token}")?;
    file.sync_all()?;
    Ok(())
}
