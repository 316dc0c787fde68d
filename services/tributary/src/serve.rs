//! `tributary serve api`: the API as its own process on the shared backends (Kafka or the
//! embedded log, PostgreSQL or SQLite read models, S3 or local objects). Replicas are
//! stateless: each folds the directory and the cluster from the log, serves gRPC, webhooks and
//! the web UI on one port, and pushes leases to the agents connected to it. The builds read
//! model is written by `serve projector`, assignments by `serve scheduler`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use tokio_util::sync::CancellationToken;
use tributary_eventlog::EventLog;
use tributary_proto::events::{envelope::Payload, Envelope, TenantCreated, TokenIssued};

use crate::server::DEFAULT_TENANT;

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
    let server_key = crate::server::load_or_create_key(&key_path)?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {}; pick another --listen ADDR",
                args.listen
            )
        })?;
    let addr = listener.local_addr()?;
    let access = args.repos.access(&backends.data)?;
    let mirrors = tributary_repo::Mirrors::new(backends.data.join("mirrors")).with_access(access);
    let state =
        tributary_api::ApiState::start(log.clone(), store, mirrors, Some(server_key)).await?;
    let state = state.with_objects(objects);

    let token_path = args
        .admin_token_file
        .clone()
        .unwrap_or_else(|| backends.data.join("admin.token"));
    let token = read_or_create_token(&token_path)?;
    let sha256 = tributary_api::auth::sha256_hex(&token);
    let known = state
        .directory(|d| d.token(&sha256).is_some())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let has_tenant = state
        .directory(|d| d.tenants.contains_key(DEFAULT_TENANT))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if !known {
        register_admin_token(log.as_ref(), &sha256, !has_tenant).await?;
        tracing::info!(file = %token_path.display(), "admin token registered on the log");
    }

    // Metering: invoices, usage and the web UI's usage page from the tables `serve metering`
    // writes (the `metering` schema of --database, or DIR/metering.db).
    let plan = crate::metering::load_plan(args.price_plan.as_deref())?;
    let metering_store = backends.open_metering().await?;
    let metering = tributary_api::metering::MeteringApi::new(
        state.clone(),
        tributary_api::metering::MeteringReader::new(metering_store, plan),
    );
    let stop = CancellationToken::new();
    let mut server = {
        let stop = stop.clone();
        tokio::spawn(tributary_api::serve_with_metering(
            state,
            Some(metering),
            listener,
            async move { stop.cancelled().await },
        ))
    };
    println!(
        "tributary api: gRPC and HTTP on http://{addr} (web UI /ui/), log {}",
        backends.log_location()
    );
    let _ = std::io::stdout().flush();
    let result = tokio::select! {
        () = crate::server::wait_for_signal() => {
            stop.cancel();
            server.await
        }
        r = &mut server => r,
    };
    match result {
        Ok(Ok(())) => Ok(ExitCode::SUCCESS),
        Ok(Err(e)) => Err(anyhow::anyhow!("the API server stopped: {e}")),
        Err(e) => Err(anyhow::anyhow!("the API server panicked: {e}")),
    }
}

/// The token in `path`, or a new one written there (mode 0600).
fn read_or_create_token(path: &Path) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_owned()),
        Ok(_) => anyhow::bail!("{} is empty: put the admin token in it", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    let (token, _) = tributary_api::auth::new_token();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    writeln!(file, "{token}")?;
    file.sync_all()?;
    println!("admin token written to {} (mode 0600)", path.display());
    Ok(token)
}

/// Puts the admin token's sha256 (and, first, the default tenant) on the log.
pub(crate) async fn register_admin_token(
    log: &dyn EventLog,
    sha256: &str,
    with_tenant: bool,
) -> anyhow::Result<()> {
    let mut events = Vec::new();
    if with_tenant {
        events.push(Envelope::new(
            DEFAULT_TENANT,
            "",
            "",
            Payload::TenantCreated(TenantCreated {
                name: DEFAULT_TENANT.into(),
            }),
        ));
    }
    events.push(Envelope::new(
        DEFAULT_TENANT,
        "",
        "",
        Payload::TokenIssued(TokenIssued {
            token_id: tributary_proto::new_id(),
            tenant: DEFAULT_TENANT.into(),
            kind: "admin".into(),
            name: "admin".into(),
            sha256: sha256.to_owned(),
        }),
    ));
    log.append(&events).await?;
    Ok(())
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
    use std::collections::BTreeSet;
    use tributary_scheduler::service;

    let backends = args.backends.resolve()?;
    let log = backends.open_log().await?;
    let _health = crate::health::start_with_log(&args.health, "scheduler", log.clone()).await?;
    if !(args.lease_ttl.is_finite() && args.lease_ttl > 0.0) {
        anyhow::bail!("--lease-ttl must be a positive number of seconds");
    }
    let ttl_us = (args.lease_ttl * 1e6) as i64;
    let config = tributary_scheduler::cluster::ClusterConfig {
        lease_ttl_us: ttl_us,
        agent_ttl_us: ttl_us,
        ..Default::default()
    };
    let stop = CancellationToken::new();
    let (assigned_tx, assigned_rx) = tokio::sync::watch::channel(BTreeSet::new());
    let (partitions, deciding_rx) = service::Partitions::new(assigned_rx);
    let mut owner = tokio::spawn(service::own_by_group(
        log.clone(),
        "scheduler",
        assigned_tx,
        deciding_rx,
        stop.clone(),
    ));
    let mut decider = tokio::spawn(service::run(
        log.clone(),
        config,
        std::time::Duration::from_millis(250),
        partitions,
        stop.clone(),
    ));
    println!(
        "tributary scheduler: log {}, member of consumer group `scheduler`",
        backends.log_location()
    );
    let _ = std::io::stdout().flush();
    let first = tokio::select! {
        () = crate::server::wait_for_signal() => None,
        r = &mut owner => Some(("group membership", r)),
        r = &mut decider => Some(("scheduling", r)),
    };
    stop.cancel();
    let failed = match first {
        Some((what, Ok(Err(e)))) => Some(format!("{what} stopped: {e}")),
        Some((what, Err(e))) => Some(format!("{what} panicked: {e}")),
        Some((_, Ok(Ok(())))) | None => None,
    };
    if let Some(failed) = failed {
        anyhow::bail!("the scheduler stopped: {failed}");
    }
    for (what, task) in [("group membership", owner), ("scheduling", decider)] {
        if task.is_finished() {
            continue;
        }
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "{what} stopped with an error"),
            Err(e) => tracing::error!(error = %e, "{what} panicked"),
        }
    }
    Ok(ExitCode::SUCCESS)
}
