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
    let mirrors = tributary_repo::Mirrors::new(backends.data.join("mirrors"));
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

    let stop = CancellationToken::new();
    let mut server = {
        let stop = stop.clone();
        tokio::spawn(tributary_api::serve_with_metering(
            state,
            None,
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
async fn register_admin_token(
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
