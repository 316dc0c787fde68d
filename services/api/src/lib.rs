//! The API service: tonic gRPC services over the event log and the read models.
//!
//! The API never keeps state of its own: writes are appends to the log, reads come from read
//! models (the builds store, the in-memory [`Directory`]) or from the log itself (tails and
//! watches are log subscriptions). Every call is authenticated by a bearer token
//! ([`auth`]) and confined to the token's tenant.
//!
//! * [`projects`]: create and list projects.
//! * [`builds`]: trigger (ref → commit → `.tributary.yml` from the repository), get, list,
//!   cancel, tail logs, watch events.
//! * [`agents`]: agents register, pull leases, heartbeat and send their events (fenced).
//! * [`admin`]: tenants and tokens.
//! * [`secrets`]: per-project secrets (sealed on the log, opened only into leases).
//! * [`metering`]: invoices (issued or live) and per-build usage from the metering read model.
//! * [`history`]: a build at any moment (`get --at`) and its jobs' decisions (`why`), folded
//!   from the build's own records.
//! * [`starts`]: where each build starts on the log (readers of one build start there).
//! * [`web`]: the web UI under `/ui/` (same port), from the same read models and log.

pub mod admin;
pub mod agent_artifacts;
pub mod agents;
pub mod artifacts;
pub mod auth;
pub mod builds;
pub mod follow;
pub mod history;
pub mod http;
pub mod metering;
pub mod projects;
pub mod repo_access;
pub mod seal;
pub mod secrets;
pub mod starts;
pub mod state;
pub mod web;

use std::net::SocketAddr;

use tributary_proto::api::{
    admin_server::AdminServer, agents_server::AgentsServer, artifacts_server::ArtifactsServer,
    builds_server::BuildsServer, metering_server::MeteringServer, projects_server::ProjectsServer,
    secrets_server::SecretsServer,
};

pub use state::ApiState;

/// Serves the gRPC API (with health and reflection) and the HTTP routes ([`http`]) on
/// `listener` until `shutdown` resolves. gRPC and HTTP share the port: requests are routed by
/// path (`/tributary.api.v1.Builds/...` vs `/hooks/...`).
pub async fn serve(
    state: ApiState,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with_metering(state, None, listener, shutdown).await
}

/// [`serve`], plus the `Metering` service (invoices, usage) and the web UI's usage page when
/// `metering` is given.
pub async fn serve_with_metering(
    state: ApiState,
    metering: Option<metering::MeteringApi>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<BuildsServer<builds::BuildsApi>>()
        .await;
    let mut routes = tonic::service::Routes::new(health)
        .add_service(ProjectsServer::new(projects::ProjectsApi::new(
            state.clone(),
        )))
        .add_service(BuildsServer::new(builds::BuildsApi::new(state.clone())))
        .add_service(AgentsServer::new(agents::AgentsApi::new(state.clone())))
        .add_service(AdminServer::new(admin::AdminApi::new(state.clone())))
        .add_service(ArtifactsServer::new(artifacts::ArtifactsApi::new(
            state.clone(),
        )))
        .add_service(SecretsServer::new(secrets::SecretsApi::new(state.clone())));
    let reader = metering.as_ref().map(|m| m.reader().clone());
    if let Some(metering) = metering {
        routes = routes.add_service(MeteringServer::new(metering));
    }
    if let Ok(reflection) = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tributary_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
    {
        routes = routes.add_service(reflection);
    }
    let app = routes
        .prepare()
        .into_axum_router()
        .merge(http::router(state.clone()))
        .merge(web::router(state, reader));
    // No Nagle: leases on PullWork and events on WatchEvents/TailLogs are small writes on
    // long-lived streams; with Nagle each waits for the peer's delayed ACK (≈ 40 ms on Linux).
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY on a connection");
        }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// The address a listener is bound to, for messages.
pub fn local_addr(listener: &tokio::net::TcpListener) -> Option<SocketAddr> {
    listener.local_addr().ok()
}
