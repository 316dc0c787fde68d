//! The metering service: the thin shell around the fold and pricing. It follows the log with
//! a [`MeteringProjector`], and when a month is over for a tenant (`close_after` past its end,
//! by this machine's clock — the only clock in metering) it prices the tenant's month and
//! appends InvoiceIssued. The fold accepts the invoice only if nothing changed in between
//! (see [`crate::fold`]); otherwise the service simply issues it again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tributary_eventlog::EventLog;
use tributary_proto::events::{envelope::Payload, Envelope};

use crate::calendar::Period;
use crate::invoice::{due, price};
use crate::plan::PricePlan;
use crate::projector::MeteringProjector;
use crate::store::MeteringStore;
use crate::MeteringError;

#[derive(Clone, Debug)]
pub struct ServiceConfig {
    pub plan: PricePlan,
    /// How long after the end of a month its invoices are issued.
    pub close_after: Duration,
    /// How often due invoices are looked for.
    pub check_every: Duration,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            plan: PricePlan::builtin(),
            close_after: Duration::from_secs(3600),
            check_every: Duration::from_secs(5),
        }
    }
}

/// Runs until `stop`: follows the log into `store`, issues due invoices.
pub async fn run(
    log: Arc<dyn EventLog>,
    store: MeteringStore,
    config: ServiceConfig,
    stop: CancellationToken,
) -> Result<(), MeteringError> {
    let mut projector = MeteringProjector::open(store).await?;
    let mut sub = log.subscribe(projector.next_offset());
    let mut ticker = tokio::time::interval(config.check_every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Invoices appended and not yet folded: (tenant, period) -> offset.
    let mut in_flight: BTreeMap<(String, Period), u64> = BTreeMap::new();
    loop {
        tokio::select! {
            batch = sub.next_batch() => {
                projector.apply_batch(&batch?).await?;
                continue;
            }
            _ = ticker.tick() => {}
            _ = stop.cancelled() => return Ok(()),
        }
        let next = projector.next_offset();
        in_flight.retain(|_, offset| *offset >= next);
        let close_after_us = i64::try_from(config.close_after.as_micros()).unwrap_or(i64::MAX);
        let now = tributary_proto::now_us();
        for (tenant, period) in due(projector.state(), &config.plan, now, close_after_us) {
            if in_flight.contains_key(&(tenant.clone(), period)) {
                continue;
            }
            let priced = match price(projector.state(), &tenant, period, &config.plan) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(%tenant, %period, error = %e, "cannot price the invoice; fix the price plan");
                    continue;
                }
            };
            let event = Envelope::new(
                &tenant,
                "",
                "",
                Payload::InvoiceIssued(priced.invoice.to_event(&config.plan)),
            );
            let offsets = log.append(&[event]).await?;
            if let Some(offset) = offsets.first() {
                tracing::info!(%tenant, %period, offset, total_micros = priced.invoice.total_micros, "issuing invoice");
                in_flight.insert((tenant, period), *offset);
            }
        }
    }
}
