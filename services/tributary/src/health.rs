//! `--health-listen ADDR`: an HTTP liveness endpoint for the services that have no API port
//! (`serve scheduler`, `serve projector`, `serve metering`, `serve autoscaler`), for container
//! health checks and Kubernetes probes. `GET /healthz` answers `ok` while the service runs; the
//! endpoint stops with the service.

use clap::Args;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Args)]
pub struct HealthArgs {
    /// Serve `GET /healthz` (200 "ok" while the service runs) on this address, for health
    /// checks and Kubernetes probes, e.g. 0.0.0.0:7800. Off by default.
    #[arg(long, value_name = "ADDR", env = "TRIBUTARY_HEALTH_LISTEN")]
    pub health_listen: Option<String>,
}

/// Starts the endpoint when asked for; it stops when the returned token is dropped or
/// cancelled.
pub async fn start(args: &HealthArgs, service: &'static str) -> anyhow::Result<Health> {
    let stop = CancellationToken::new();
    let Some(addr) = &args.health_listen else {
        return Ok(Health { stop });
    };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!("cannot listen on {addr} for --health-listen: {e}; pick another address")
    })?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new().route("/healthz", axum::routing::get(|| async { "ok\n" }));
    let until = stop.clone();
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { until.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(service, error = %e, "health endpoint stopped");
        }
    });
    tracing::info!(service, addr = %bound, "health endpoint: GET /healthz");
    Ok(Health { stop })
}

/// A running health endpoint (or none); dropping it stops the endpoint.
pub struct Health {
    stop: CancellationToken,
}

impl Drop for Health {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
