//! `tributary serve X`: one role (`crate::roles`) in its own process, on the backends its flags
//! name (Kafka or the embedded log, PostgreSQL or SQLite read models, S3 or local objects),
//! until SIGINT/SIGTERM. `serve api` replicas are stateless: each folds the directory and the
//! cluster from the log, serves gRPC, webhooks and the web UI on one port, and pushes leases to
//! the agents connected to it. The builds read model is written by `serve projector`,
//! assignments by `serve scheduler`, invoices by `serve metering`, agents sized by
//! `serve autoscaler`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use crate::roles;

#[derive(Debug, Args)]
pub struct ServeApiArgs {
    #[command(flatten)]
    pub backends: crate::backends::BackendArgs,
    #[command(flatten)]
    pub repos: crate::repo_access::RepoAccessArgs,
    /// Address of gRPC, webhooks, the web UI, /healthz and /metrics (one port).
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "127.0.0.1:7700",
        env = "TRIBUTARY_LISTEN"
    )]
    pub listen: String,
    /// The default tenant's admin token: registered on the log if it is not yet (idempotent, so
    /// every replica may be given the same file); created (mode 0600) if the file does not
    /// exist. Default: DIR/admin.token.
    #[arg(long, value_name = "FILE", env = "TRIBUTARY_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// 32 bytes that seal project and webhook secrets at rest; every replica needs the same
    /// key (created if missing: back it up). Default: DIR/server.key.
    #[arg(long, value_name = "FILE", env = "TRIBUTARY_SERVER_KEY_FILE")]
    pub server_key_file: Option<PathBuf>,
    /// The price plan live invoices are priced with (give `serve metering` the same file;
    /// issued invoices carry their own). Default: the built-in plan.
    #[arg(long, value_name = "FILE", env = "TRIBUTARY_PRICE_PLAN")]
    pub price_plan: Option<PathBuf>,
}

pub async fn api(args: ServeApiArgs) -> anyhow::Result<ExitCode> {
    let backends = args.backends.resolve()?;
    let log = backends.open_log().await?;
    let store = backends.open_store().await?;
    let objects = backends.open_objects()?;
    std::fs::create_dir_all(&backends.data)
        .with_context(|| format!("cannot create {}", backends.data.display()))?;
    let key_path = args
        .server_key_file
        .clone()
        .unwrap_or_else(|| backends.data.join("server.key"));
    let server_key = roles::load_or_create_key(&key_path)?;
    let listener = roles::bind(&args.listen).await?;
    let addr = listener.local_addr()?;
    let access = args.repos.access(&backends.data)?;
    // Metering: invoices, usage and the web UI's usage page from the tables `serve metering`
    // writes (the `metering` schema of --database, or DIR/metering.db).
    let plan = crate::metering::load_plan(args.price_plan.as_deref())?;
    let metering = backends.open_metering().await?;
    let token_path = args
        .admin_token_file
        .clone()
        .unwrap_or_else(|| backends.data.join("admin.token"));
    let shutdown = roles::shutdown_on_signal();
    let role = tokio::spawn(roles::api::run(
        roles::api::Backends {
            log,
            store,
            metering,
            objects,
            data: backends.data.clone(),
        },
        roles::api::Options {
            listener,
            server_key,
            access,
            plan,
            cache_limit: 0,
            read_model: None,
            admin_token: Some(token_path),
        },
        shutdown,
    ));
    println!(
        "tributary api: gRPC and HTTP on http://{addr} (web UI /ui/), log {}",
        backends.log_location()
    );
    let _ = std::io::stdout().flush();
    finish("the API server", role.await)
}

/// A role's end as the command's: success, its error, or its panic.
fn finish(
    what: &str,
    joined: Result<anyhow::Result<()>, tokio::task::JoinError>,
) -> anyhow::Result<ExitCode> {
    match joined {
        Ok(Ok(())) => Ok(ExitCode::SUCCESS),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(anyhow::anyhow!("{what} panicked: {e}")),
    }
}

#[derive(Debug, Args)]
pub struct ServeSchedulerArgs {
    #[command(flatten)]
    pub backends: crate::backends::BackendArgs,
    /// Seconds without a heartbeat after which an agent is lost and its jobs are requeued.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub lease_ttl: f64,
    #[command(flatten)]
    pub health: crate::health::HealthArgs,
}

/// `tributary serve scheduler`: a member of consumer group `scheduler` on the events topic;
/// it folds every partition and decides for the builds of the partitions the group gives it.
pub async fn scheduler(args: ServeSchedulerArgs) -> anyhow::Result<ExitCode> {
    let config = roles::scheduler::config(args.lease_ttl)?;
    let backends = args.backends.resolve()?;
    let log = backends.open_log().await?;
    let _health = crate::health::start_with_log(&args.health, "scheduler", log.clone()).await?;
    let shutdown = roles::shutdown_on_signal();
    let role = tokio::spawn(roles::scheduler::run(
        log,
        roles::scheduler::Options {
            config,
            ownership: roles::scheduler::Ownership::Group,
        },
        shutdown,
    ));
    println!(
        "tributary scheduler: log {}, member of consumer group `scheduler`",
        backends.log_location()
    );
    let _ = std::io::stdout().flush();
    finish("the scheduler", role.await)
}

/// `tributary serve projector`: the builds projector as its own process.
pub async fn projector(args: crate::cli::ServeProjectorArgs) -> anyhow::Result<ExitCode> {
    let backends = args.backends.resolve()?;
    let _lock = backends.lock_data()?;
    let log = backends.open_log().await?;
    let store = backends.open_store().await?;
    let _health = crate::health::start_with_log(&args.health, "projector", log.clone()).await?;
    let projector = tributary_projections::BuildsProjector::open(store).await?;
    tracing::info!(
        log = %backends.log_location(),
        layout = ?log.layout(),
        "builds projector starting"
    );
    let shutdown = roles::shutdown_on_signal();
    let role = tokio::spawn(roles::projector::run(log, projector, shutdown));
    finish("the builds projector", role.await)
}

/// `tributary serve metering`: the embedded data directory or the scale-out backends.
pub async fn metering(args: crate::cli::ServeMeteringArgs) -> anyhow::Result<ExitCode> {
    let config = crate::metering::service_config(&args.metering)?;
    let backends = args.backends.resolve()?;
    let _lock = backends.lock_data()?;
    let log = backends.open_log().await?;
    let store = backends.open_metering().await?;
    let _health = crate::health::start_with_log(&args.health, "metering", log.clone()).await?;
    println!(
        "metering: following {} into {} (plan {}, invoices {:.1} h after each month)",
        backends.log_location(),
        backends.metering_location(),
        config.plan.version,
        config.close_after.as_secs_f64() / 3600.0
    );
    let _ = std::io::stdout().flush();
    let shutdown = roles::shutdown_on_signal();
    let role = tokio::spawn(roles::metering::run(log, store.clone(), config, shutdown));
    let joined = role.await;
    store.close().await;
    finish("the metering service", joined)
}

/// `tributary serve autoscaler`: on a `tributary up` data directory, or on Kafka as one of
/// the replicas of consumer group `autoscaler` (one active at a time).
pub async fn autoscaler(args: crate::cli::AutoscalerArgs) -> anyhow::Result<ExitCode> {
    use tributary_autoscaler::service::Replicas;

    let config = crate::autoscaler::load_config(&args.config)?;
    let backends = args.backends.resolve()?;
    let data = &backends.data;
    let on_kafka = backends.kafka.is_some();
    if !on_kafka && !data.join("events.db").exists() {
        anyhow::bail!(
            "{} holds no event log: point --data at the data directory of a `tributary up`, \
             or --kafka at the brokers of a scale-out deployment",
            data.display()
        );
    }
    let token = match args.token.filter(|t| !t.trim().is_empty()) {
        Some(t) => t.trim().to_owned(),
        None => {
            let path = data.join("admin.token");
            std::fs::read_to_string(&path)
                .with_context(|| {
                    format!(
                        "no --token (TRIBUTARY_ENROLLMENT_TOKEN) and cannot read {}: agents need \
                         an enrollment token (`tributary admin token-create --kind enrollment`)",
                        path.display()
                    )
                })?
                .trim()
                .to_owned()
        }
    };
    let log = backends.open_log().await?;
    let _health = crate::health::start_with_log(&args.health, "autoscaler", log.clone()).await?;
    let provider = crate::autoscaler::provider(
        args.provider,
        &config,
        &args.config,
        args.server.clone(),
        token,
        data.join("autoscaler"),
    )
    .await?;
    // On Kafka, replicas share the log: one active at a time. The embedded log is one process's.
    let replicas = if on_kafka {
        Replicas::Group(tributary_autoscaler::service::GROUP.to_owned())
    } else {
        Replicas::Alone
    };
    println!(
        "tributary autoscaler: log {}, provider {}, {} kind(s), budget {}/h, agents join {}{}",
        backends.log_location(),
        provider.name(),
        config.kinds.len(),
        tributary_autoscaler::config::format_money(config.budget_per_hour_micros),
        args.server,
        if on_kafka {
            ", member of consumer group `autoscaler` (one active replica)"
        } else {
            ""
        }
    );
    let _ = std::io::stdout().flush();
    let shutdown = roles::shutdown_on_signal();
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            tracing::info!("stopping: draining the agents this autoscaler started");
        });
    }
    let role = tokio::spawn(roles::autoscaler::run(
        log,
        roles::autoscaler::Options {
            config,
            provider,
            replicas,
        },
        shutdown,
    ));
    finish("the autoscaler", role.await)
}
