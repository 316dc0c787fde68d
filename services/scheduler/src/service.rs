//! The scheduler service: the thin shell that drives [`decide_cluster`] with real I/O.
//!
//! It folds every events partition of the log from offset 0 into one [`ClusterState`] (agents
//! and leases are shared by all builds, and agent events are spread over all partitions), and
//! whenever it has folded its own last appends (and at least every `tick`, so leases expire on
//! time) asks [`decide_cluster_noting_waits`] what to do at the current time (with why queued
//! jobs wait, when that changed) and appends the decisions —
//! only those for builds in the partitions it owns ([`Partitions`]). Decisions are events, so a
//! restarted scheduler — or another replica — picks up exactly where the log is.
//!
//! Ownership: a partition gained is caught up first (folded to the end it had when gained, so
//! every `JobAssigned` of the previous owner is seen); a partition lost is dropped before the
//! next decision, and [`Partitions::deciding`] says so once no append of its decisions is in
//! flight. Two schedulers whose deciding sets are disjoint never decide for the same build.
//! The fold is driven by the consumer runtime ([`Consumer`]), which also skips re-delivered
//! events (Kafka is at least once) by event id.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tributary_eventlog::runtime::{Consumer, Interest, Sequenced, JOB_OUTPUT};
use tributary_eventlog::{EventLog, Layout, LogError, Offset, Partition, Topic};
use tributary_proto::events::{envelope::Payload, Envelope};

use crate::cluster::{decide_cluster_noting_waits, ClusterConfig, ClusterDecision, ClusterState};
use crate::ownership::Ownership;

/// Which partitions a scheduler service owns, in and out.
pub struct Partitions {
    /// The partitions to own, as the consumer group assigns them (changes at a rebalance).
    pub assigned: watch::Receiver<BTreeSet<Partition>>,
    /// What the service decides for now: a gained partition appears once caught up; a lost one
    /// disappears as soon as no append of its decisions is in flight (a revoke can wait on it).
    pub deciding: watch::Sender<BTreeSet<Partition>>,
}

impl Partitions {
    /// Owns `assigned`; the receiver of what it decides for is returned beside it.
    pub fn new(
        assigned: watch::Receiver<BTreeSet<Partition>>,
    ) -> (Partitions, watch::Receiver<BTreeSet<Partition>>) {
        let (deciding, deciding_rx) = watch::channel(BTreeSet::new());
        (Partitions { assigned, deciding }, deciding_rx)
    }

    /// Every events partition of `layout`, forever: the only scheduler of a log (`tributary up`:
    /// `{0}`).
    pub fn every(layout: Layout) -> Partitions {
        let (_tx, assigned) = watch::channel(layout.topic_partitions(Topic::Events).collect());
        Partitions::new(assigned).0
    }
}

/// [`ClusterState`] as the consumer runtime drives it: each event with its place in the fold's
/// order (first come, first served). A job's output (chunks, steps, lines, ticks) is not
/// read by the cluster fold: skipped undecoded.
pub type ClusterFold = Sequenced<ClusterState>;

/// A fresh [`ClusterFold`].
pub fn cluster_fold() -> ClusterFold {
    Sequenced::new(
        "scheduler",
        Interest::except(&JOB_OUTPUT),
        ClusterState::default(),
    )
}

/// Runs until `stop` is cancelled or the log closes.
pub async fn run(
    log: Arc<dyn EventLog>,
    config: ClusterConfig,
    tick: Duration,
    mut partitions: Partitions,
    stop: CancellationToken,
) -> Result<(), LogError> {
    let layout = log.layout();
    // Announced on the log, so `get` explains waiting jobs with the TTLs this scheduler uses.
    let started = [Envelope::new(
        "",
        "",
        "",
        Payload::SchedulerStarted(config.started()),
    )];
    if retry_transient(&stop, "announcing the scheduler's configuration", || {
        log.append(&started)
    })
    .await?
    .is_none()
    {
        return Ok(());
    }
    let mut consumer = Consumer::new(cluster_fold());
    let mut sub = consumer.subscribe(log.as_ref(), layout.topic_partitions(Topic::Events));
    let mut ownership = Ownership::new();
    let mut assignment_open = true;
    let mut reassigned = true;
    // Per partition, the offset of our last append there not folded yet.
    let mut awaiting: BTreeMap<Partition, Offset> = BTreeMap::new();
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            batch = sub.next_batch() => consumer.apply(&batch?).await?,
            changed = partitions.assigned.changed(), if assignment_open => {
                match changed {
                    Ok(()) => reassigned = true,
                    Err(_) => assignment_open = false, // no more changes: keep the last set
                }
            }
            _ = ticker.tick() => {}
            _ = stop.cancelled() => return Ok(()),
        }
        if reassigned || partitions.assigned.has_changed().unwrap_or(false) {
            reassigned = false;
            let wanted = partitions.assigned.borrow_and_update().clone();
            let gained = ownership.want(&wanted);
            if !gained.is_empty() {
                let Some(ends) =
                    retry_transient(&stop, "reading the log's end offsets", || log.end_offsets())
                        .await?
                else {
                    return Ok(());
                };
                for p in gained {
                    let end = ends.get(p as usize).copied().unwrap_or(0);
                    tracing::info!(partition = p, catch_up_to = end, "partition gained");
                    ownership.caught_up_at(p, end);
                }
            }
        }
        let positions: Vec<(Partition, Offset)> =
            consumer.positions().iter().map(|(p, o)| (*p, *o)).collect();
        for p in ownership.folded(&positions) {
            tracing::info!(partition = p, "caught up: deciding for the partition");
        }
        partitions.deciding.send_if_modified(|d| {
            let changed = d != ownership.deciding();
            if changed {
                *d = ownership.deciding().clone();
            }
            changed
        });
        awaiting.retain(|p, offset| consumer.position(*p) <= *offset);
        if !awaiting.is_empty() {
            continue; // our last decisions are not folded yet
        }
        let state = &consumer.fold().state;
        let now = tributary_proto::now_us();
        let decisions: Vec<ClusterDecision> = decide_cluster_noting_waits(state, now, &config)
            .into_iter()
            .filter(|d| ownership.decides(layout.partition_for(Topic::Events, d.build_id())))
            .collect();
        if decisions.is_empty() {
            continue;
        }
        let events: Vec<Envelope> = decisions
            .iter()
            .filter_map(|d| envelope(state, d, now, &config))
            .collect();
        if events.is_empty() {
            continue;
        }
        for d in &decisions {
            tracing::debug!(build_id = %d.build_id(), job_id = ?d.job_id(), decision = ?d, "decided");
        }
        // The same events (same ids) until they are stored: a retried append may store some
        // twice, which every consumer skips by event id; deciding again would not be the same.
        let Some(offsets) =
            retry_transient(&stop, "appending decisions", || log.append(&events)).await?
        else {
            return Ok(());
        };
        for (event, offset) in events.iter().zip(offsets) {
            let p = layout.partition_of(event);
            let entry = awaiting.entry(p).or_insert(offset);
            *entry = (*entry).max(offset);
        }
    }
}

/// Runs `op` until it succeeds, retrying (1 s apart, with a warning) while the log's backend
/// is unreachable (a Kafka broker restarting): the scheduler waits for it rather than exiting.
/// Other errors are returned; `None` if `stop` fires while waiting.
async fn retry_transient<T, F, Fut>(
    stop: &CancellationToken,
    what: &str,
    mut op: F,
) -> Result<Option<T>, LogError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, LogError>>,
{
    let mut failures = 0u32;
    loop {
        match op().await {
            Ok(value) => {
                if failures > 0 {
                    tracing::info!(failures, "{what}: the log answers again");
                }
                return Ok(Some(value));
            }
            Err(e) if is_transient(&e) => {
                failures += 1;
                tracing::warn!(error = %e, failures, "{what} failed; retrying in 1 s");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = stop.cancelled() => return Ok(None),
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Errors of an unreachable backend, which pass when it is back (a Kafka broker restarting, a
/// full disk under the embedded log that someone frees).
fn is_transient(error: &LogError) -> bool {
    matches!(
        error,
        LogError::Kafka(_) | LogError::Io(_) | LogError::Unwritable { .. }
    )
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

/// Ownership from a consumer group: joins `group` on the events topic and keeps
/// `assigned` equal to the member's partitions. On a revoke it waits until the scheduler no
/// longer decides for the revoked partitions (`deciding`) before acknowledging, so the next
/// owner never decides beside this one. Records the member receives are not needed (the
/// scheduler reads every partition itself) and are dropped. Leaves the group when `stop` fires.
pub async fn own_by_group(
    log: Arc<dyn EventLog>,
    group: &str,
    assigned: watch::Sender<BTreeSet<Partition>>,
    mut deciding: watch::Receiver<BTreeSet<Partition>>,
    stop: CancellationToken,
) -> Result<(), LogError> {
    let mut member = log.join_group(group, &[Topic::Events]).await?;
    loop {
        let event = tokio::select! {
            event = member.next() => event?,
            () = stop.cancelled() => break,
        };
        match event {
            tributary_eventlog::GroupEvent::Assigned(gained) => {
                tracing::info!(?gained, "scheduler: partitions assigned");
                assigned.send_modify(|a| a.extend(gained.iter().copied()));
            }
            tributary_eventlog::GroupEvent::Revoked(lost) => {
                tracing::info!(?lost, "scheduler: partitions revoked");
                assigned.send_modify(|a| a.retain(|p| !lost.contains(p)));
                let released = deciding.wait_for(|d| lost.iter().all(|p| !d.contains(p)));
                tokio::select! {
                    r = released => { r.map_err(|_| LogError::Closed)?; }
                    () = stop.cancelled() => break,
                }
            }
            tributary_eventlog::GroupEvent::Records(_) => {}
        }
    }
    assigned.send_modify(BTreeSet::clear);
    member.leave().await
}

#[cfg(test)]
mod retry_tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn an_unreachable_log_is_retried_until_it_answers_other_errors_end_the_service() {
        let stop = CancellationToken::new();
        let calls = AtomicU32::new(0);
        let got = retry_transient(&stop, "test", || async {
            match calls.fetch_add(1, Ordering::SeqCst) {
                0 => Err(LogError::Kafka("broker down".into())),
                _ => Ok(7),
            }
        })
        .await
        .expect("retried");
        assert_eq!(got, Some(7));
        assert_eq!(calls.load(Ordering::SeqCst), 2);

        let fatal: Result<Option<()>, _> = retry_transient(&stop, "test", || async {
            Err(LogError::Invalid("bad".into()))
        })
        .await;
        assert!(fatal.is_err(), "not a transient error");

        stop.cancel();
        let stopped: Option<()> = retry_transient(&stop, "test", || async {
            Err(LogError::Kafka("still down".into()))
        })
        .await
        .expect("no error");
        assert_eq!(stopped, None, "stop ends the wait");
    }
}
