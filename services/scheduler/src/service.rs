//! The scheduler service: the thin shell that drives [`decide_cluster`] with real I/O.
//!
//! It folds the log from offset 0 into a [`ClusterState`], and whenever it has folded its own
//! last appends (and at least every `tick`, so leases expire on time) asks
//! [`decide_cluster`] what to do at the current time and appends the decisions. Decisions are
//! events, so a restarted scheduler — or another replica — picks up exactly where the log is.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tributary_eventlog::{EventLog, LogError};
use tributary_proto::events::{envelope::Payload, Envelope};

use crate::cluster::{decide_cluster, ClusterConfig, ClusterDecision, ClusterState};

/// Runs until `stop` is cancelled or the log closes.
pub async fn run(
    log: Arc<dyn EventLog>,
    config: ClusterConfig,
    tick: Duration,
    stop: CancellationToken,
) -> Result<(), LogError> {
    let mut state = ClusterState::new();
    let mut sub = log.subscribe(0);
    let mut awaiting: Option<u64> = None;
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            batch = sub.next_batch() => {
                for record in batch? {
                    match record.decode() {
                        Ok(env) => state.apply(record.offset, &env),
                        Err(e) => tracing::error!(offset = record.offset, error = %e, "skipping malformed event"),
                    }
                }
            }
            _ = ticker.tick() => {}
            _ = stop.cancelled() => return Ok(()),
        }
        if awaiting.is_some_and(|a| sub.position() <= a) {
            continue; // our last decisions are not folded yet
        }
        let now = tributary_proto::now_us();
        let decisions = decide_cluster(&state, now, &config);
        if decisions.is_empty() {
            continue;
        }
        let events: Vec<Envelope> = decisions
            .iter()
            .filter_map(|d| envelope(&state, d, now, &config))
            .collect();
        if events.is_empty() {
            continue;
        }
        for d in &decisions {
            tracing::debug!(build_id = %d.build_id(), job_id = ?d.job_id(), decision = ?d, "decided");
        }
        let offsets = log.append(&events).await?;
        awaiting = offsets.last().copied();
    }
}

/// The event recording `decision`, in its build's tenant and project. Assignments get a fresh
/// lease id and a deadline one lease TTL from now.
fn envelope(
    state: &ClusterState,
    decision: &ClusterDecision,
    now_us: i64,
    config: &ClusterConfig,
) -> Option<Envelope> {
    let build_id = decision.build_id();
    let build = state.builds.builds.get(build_id)?;
    let mut payload = decision.payload();
    if let Payload::JobAssigned(a) = &mut payload {
        a.lease_id = tributary_proto::new_id();
        a.deadline_us = now_us + config.lease_ttl_us;
        tracing::info!(build_id, job_id = %a.job, agent_id = %a.agent_id, attempt = a.attempt, "job assigned");
    }
    Some(Envelope::new(
        &build.tenant,
        &build.project,
        build_id,
        payload,
    ))
}
