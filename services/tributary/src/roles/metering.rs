//! The metering role: usage ticks and job ends folded into usage and invoices, the one active
//! replica appending `InvoiceIssued` when a month is over (`tributary_metering::service`).

use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tributary_eventlog::EventLog;
use tributary_metering::service::ServiceConfig;
use tributary_metering::MeteringStore;

/// Runs until `shutdown` or a failure. `store` stays open (`tributary up`'s API reads it).
pub async fn run(
    log: Arc<dyn EventLog>,
    store: MeteringStore,
    config: ServiceConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    tributary_metering::service::run(log, store, config, shutdown)
        .await
        .context("the metering service stopped")
}
