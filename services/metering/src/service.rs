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
use tributary_proto::events::{envelope::Payload, Envelope, LogPosition};

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

/// Runs until `stop`: becomes the only active metering replica (see
/// [`MeteringStore::lock_writer`]; standby replicas wait there), then follows every events
/// partition into `store` and issues due invoices. It issues only when its fold has reached the
/// end every partition had a moment before, so an invoice's cut covers everything appended
/// before its month closed.
pub async fn run(
    log: Arc<dyn EventLog>,
    store: MeteringStore,
    config: ServiceConfig,
    stop: CancellationToken,
) -> Result<(), MeteringError> {
    let Some(store) = store.lock_writer(&stop).await? else {
        return Ok(());
    };
    tracing::info!("active metering replica: folding the log and issuing invoices");
    let result = follow(log, &store, config, stop).await;
    store.release_writer().await;
    result
}

async fn follow(
    log: Arc<dyn EventLog>,
    store: &MeteringStore,
    config: ServiceConfig,
    stop: CancellationToken,
) -> Result<(), MeteringError> {
    let mut projector = MeteringProjector::open(store.clone()).await?;
    // Catch up in the canonical order (invoices other replicas issued are decided at their
    // cuts), then follow.
    projector.catch_up(log.as_ref()).await?;
    let parts = crate::projector::partitions(log.as_ref());
    let mut sub = projector.subscribe(log.as_ref());
    let mut ticker = tokio::time::interval(config.check_every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Invoices appended and not yet read back: (tenant, period) -> (partition, offset).
    let mut in_flight: BTreeMap<(String, Period), (u32, u64)> = BTreeMap::new();
    loop {
        tokio::select! {
            batch = sub.next_batch() => {
                projector.apply_batch(&batch?).await?;
                continue;
            }
            _ = ticker.tick() => {}
            _ = stop.cancelled() => return Ok(()),
        }
        in_flight.retain(|_, (p, offset)| *offset >= projector.state().position(*p));
        let close_after_us = i64::try_from(config.close_after.as_micros()).unwrap_or(i64::MAX);
        let now = tributary_proto::now_us();
        let due: Vec<_> = due(projector.state(), &config.plan, now, close_after_us)
            .into_iter()
            .filter(|k| !in_flight.contains_key(k))
            .collect();
        if due.is_empty() {
            continue;
        }
        // Issue only when caught up with what was on the log a moment ago.
        let ends = log.end_offsets().await?;
        if !projector.reached(log.as_ref(), &ends) {
            continue;
        }
        // And only while this replica still holds the writer's lock.
        store.check_writer().await?;
        let cut: Vec<LogPosition> = projector
            .positions(parts.clone())
            .into_iter()
            .map(|(partition, next_offset)| LogPosition {
                partition,
                next_offset,
            })
            .collect();
        for (tenant, period) in due {
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
                Payload::InvoiceIssued(priced.invoice.to_event(&config.plan, cut.clone())),
            );
            let partition = log.layout().partition_of(&event);
            let offsets = log.append(std::slice::from_ref(&event)).await?;
            if let Some(offset) = offsets.first() {
                tracing::info!(%tenant, %period, partition, offset, total_micros = priced.invoice.total_micros, "issuing invoice");
                in_flight.insert((tenant, period), (partition, *offset));
                // On a partitioned log: decided at its cut now, as every reader decides it
                // (see `Barriers`); read back later, it is a duplicate. On one partition the
                // log's order is the canonical one: it is decided where it is read.
                if log.layout().partitions() > 1 {
                    projector
                        .issued(crate::fold::Pos::new(partition, *offset), &event)
                        .await?;
                }
            }
        }
    }
}
