//! The autoscaler role: the queue and the pool folded from the log, decisions appended and
//! handed to a provider that starts and stops agents (`tributary_autoscaler::service`).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tributary_autoscaler::provider::Provider;
use tributary_autoscaler::service::Replicas;
use tributary_autoscaler::Config;
use tributary_eventlog::EventLog;

pub struct Options {
    pub config: Config,
    pub provider: Arc<dyn Provider>,
    /// `Alone` on the embedded log; a consumer group on Kafka (one active replica).
    pub replicas: Replicas,
}

/// Runs until `shutdown` (the provider drains the agents it started before this returns) or a
/// failure.
pub async fn run(
    log: Arc<dyn EventLog>,
    options: Options,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    tributary_autoscaler::service::run(
        log,
        options.config,
        options.provider,
        options.replicas,
        shutdown,
    )
    .await
    .map_err(|e| anyhow::Error::new(e).context("the autoscaler stopped"))
}
