//! The API role: gRPC, webhooks, the web UI, `/healthz` and `/metrics` on one port, over the
//! directory and cluster folds of the log, the builds read model and the metering tables.

use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tributary_api::seal::ServerKey;
use tributary_eventlog::EventLog;
use tributary_metering::{MeteringStore, PricePlan};
use tributary_projections::{BuildsStore, ReadModelPositions};
use tributary_repo::access::Access;

use super::DEFAULT_TENANT;

/// What the API reads and writes.
pub struct Backends {
    pub log: Arc<dyn EventLog>,
    pub store: BuildsStore,
    /// The metering tables (invoices, usage, the web UI's usage page).
    pub metering: MeteringStore,
    pub objects: tributary_objects::Objects,
    /// Where the repository mirrors live (`mirrors/` in it).
    pub data: PathBuf,
}

pub struct Options {
    /// The one port (see [`super::bind`]).
    pub listener: tokio::net::TcpListener,
    pub server_key: ServerKey,
    pub access: Access,
    /// The plan live invoices are priced with.
    pub plan: PricePlan,
    /// Per-project cache size limit in bytes (0: none).
    pub cache_limit: u64,
    /// How reads wait for the read model to apply a write: the in-process projector's watch
    /// (`tributary up`), else the store's own (PostgreSQL notifications).
    pub read_model: Option<ReadModelPositions>,
    /// `serve api`: the admin token file, read (or created) and registered on the log if the
    /// log does not know it yet. `tributary up` makes its token before it listens.
    pub admin_token: Option<PathBuf>,
}

/// Serves until `shutdown` (then drains the connections and returns) or a failure.
pub async fn run(
    backends: Backends,
    options: Options,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mirrors =
        tributary_repo::Mirrors::new(backends.data.join("mirrors")).with_access(options.access);
    let mut state = tributary_api::ApiState::start(
        backends.log.clone(),
        backends.store,
        mirrors,
        Some(options.server_key),
    )
    .await?;
    if let Some(model) = options.read_model {
        state = state.with_read_model(model);
    }
    let state = state
        .with_objects(backends.objects)
        .with_cache_limit(options.cache_limit);
    if let Some(path) = &options.admin_token {
        let token = super::read_or_create_token(path)?;
        let sha256 = tributary_api::auth::sha256_hex(&token);
        let known = state
            .directory(|d| d.token(&sha256).is_some())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let has_tenant = state
            .directory(|d| d.tenants.contains_key(DEFAULT_TENANT))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if !known {
            super::register_admin_token(backends.log.as_ref(), &sha256, !has_tenant).await?;
            tracing::info!(file = %path.display(), "admin token registered on the log");
        }
    }
    let metering = tributary_api::metering::MeteringApi::new(
        state.clone(),
        tributary_api::metering::MeteringReader::new(backends.metering, options.plan),
    );
    tributary_api::serve_with_metering(state, Some(metering), options.listener, async move {
        shutdown.cancelled().await
    })
    .await
    .map_err(|e| anyhow::anyhow!("the API server stopped: {e}"))
}
