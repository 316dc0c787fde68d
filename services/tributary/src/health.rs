//! `--health-listen ADDR`: an HTTP liveness endpoint for the services that have no API port
//! (`serve scheduler`, `serve projector`, `serve metering`, `serve autoscaler`), for container
//! health checks and Kubernetes probes. `GET /healthz` answers `ok` while the service runs; the
//! endpoint stops with the service. `GET /metrics` counts the log records the service skipped
//! (undecodable, or of an unknown event type), per consumer and kind. `GET /readyz` (scheduler,
//! projector) answers 503 while the event log does not (a Kafka outage): the service keeps
//! running and carries on when the brokers are back.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use clap::Args;
use tokio_util::sync::CancellationToken;
use tributary_eventlog::EventLog;

#[derive(Debug, Args)]
pub struct HealthArgs {
    /// Serve `GET /healthz` (200 "ok" while the service runs), `GET /readyz` (503 while the
    /// event log does not answer, e.g. Kafka is down) and `GET /metrics` (records skipped as
    /// malformed, Prometheus text) on this address, for health checks and Kubernetes probes,
    /// e.g. 0.0.0.0:7800. Off by default.
    #[arg(long, value_name = "ADDR", env = "TRIBUTARY_HEALTH_LISTEN")]
    pub health_listen: Option<String>,
}

/// Starts the endpoint when asked for (it stops when the returned token is dropped or
/// cancelled), with `GET /readyz` reporting whether `log` answers (200, or 503 saying what is
/// unreachable: the service keeps running and reconnects by itself).
pub async fn start_with_log(
    args: &HealthArgs,
    service: &'static str,
    log: Arc<dyn EventLog>,
) -> anyhow::Result<Health> {
    let ready = axum::Router::new().route(
        "/readyz",
        axum::routing::get(move || {
            let log = log.clone();
            async move { readiness(log.as_ref()).await }
        }),
    );
    serve(args, service, ready).await
}

/// 200 "ok" when the log answers within 2 s, else 503 with the reason.
pub async fn readiness(log: &dyn EventLog) -> (StatusCode, String) {
    match log.probe(Duration::from_secs(2)).await {
        Ok(()) => (StatusCode::OK, "ok\n".into()),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the event log does not answer: {e}\n"),
        ),
    }
}

async fn serve(
    args: &HealthArgs,
    service: &'static str,
    extra: axum::Router,
) -> anyhow::Result<Health> {
    let stop = CancellationToken::new();
    let Some(addr) = &args.health_listen else {
        return Ok(Health { stop });
    };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!("cannot listen on {addr} for --health-listen: {e}; pick another address")
    })?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route("/metrics", axum::routing::get(metrics))
        .merge(extra);
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

/// Prometheus text: the records this process skipped (`tributary_skipped_records_total`).
async fn metrics() -> impl axum::response::IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        tributary_eventlog::skipped::prometheus(),
    )
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
