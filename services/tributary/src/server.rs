//! `tributary up`: the embedded all-in-one server — the gRPC API, the scheduler driver, the
//! builds projector and in-process agents, on the SQLite log in the data directory.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tributary_eventlog::EventLog;
use tributary_proto::events::{envelope::Payload, Envelope, TenantCreated, TokenIssued};

use crate::agent::Workspaces;
use crate::cli::UpArgs;
use crate::data_dir::DataDir;
use crate::local_run::{self, DriveConfig};

/// The tenant the admin token belongs to (and the default for its own projects).
pub const DEFAULT_TENANT: &str = "default";

pub async fn up(args: UpArgs) -> anyhow::Result<ExitCode> {
    let data = DataDir::open(&args.data.data).await?;
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
    let mirrors = tributary_repo::Mirrors::new(data.path.join("mirrors"));
    let stop = CancellationToken::new();

    let projector = {
        let store = data.store.clone();
        let log = log.clone();
        tokio::spawn(async move {
            let mut p = tributary_projections::BuildsProjector::open(store).await?;
            p.follow(log.as_ref()).await
        })
    };
    let state =
        tributary_api::ApiState::start(log.clone(), data.store.clone(), mirrors.clone()).await?;
    let driver = tokio::spawn(local_run::drive(
        DriveConfig {
            log: log.clone(),
            slots: args.agents.max(1) * args.agent_capacity.max(1),
            workspaces: Workspaces::Checkout {
                root: data.path.join("workspaces"),
                mirrors,
            },
            scratch_dir: data.path.join("scratch"),
            only_build: None,
        },
        0,
        CancellationToken::new(),
        stop.clone(),
    ));
    println!(
        "tributary is up: gRPC on http://{addr}, data in {}",
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
    let shutdown = {
        let stop = stop.clone();
        async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
            tracing::info!("shutting down");
            stop.cancel();
        }
    };
    tributary_api::serve(state, listener, shutdown).await?;
    match driver.await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "scheduler stopped with an error"),
        Err(e) => tracing::error!(error = %e, "scheduler task failed"),
    }
    projector.abort();
    data.log.close().await;
    Ok(ExitCode::SUCCESS)
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
    let tenant = Envelope::new(
        DEFAULT_TENANT,
        "",
        "",
        Payload::TenantCreated(TenantCreated {
            name: DEFAULT_TENANT.into(),
        }),
    );
    let issued = Envelope::new(
        DEFAULT_TENANT,
        "",
        "",
        Payload::TokenIssued(TokenIssued {
            token_id: tributary_proto::new_id(),
            tenant: DEFAULT_TENANT.into(),
            kind: "admin".into(),
            name: "admin".into(),
            sha256,
        }),
    );
    log.append(&[tenant, issued]).await?;
    writeln!(file, "{token}")?;
    file.sync_all()?;
    Ok(())
}
