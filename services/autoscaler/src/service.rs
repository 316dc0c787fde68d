//! The autoscaler service: the thin shell that drives [`decide`] with real I/O.
//!
//! It folds every events partition of the log from offset 0 into a [`PoolState`] through the
//! consumer runtime ([`Consumer`]); while it is the active replica, whenever it has folded its
//! own last appends (and at least every tick) it asks the policy what to do now, appends the
//! decisions as events, and hands each to the provider: acquire (then `AgentProvisioned`, or
//! `AgentReleased` with the provider's error), drain, release. Decisions are events first, so
//! a restarted autoscaler — or the standby that takes over — picks up where the log is, and
//! nothing is decided twice.
//!
//! One active replica ([`Replicas`]): with [`Replicas::Group`], replicas join a consumer group
//! on the events topic and the one that owns its partition 0 is active; it becomes active only
//! once it has folded the log up to the ends it had when it gained the partition (so it sees
//! every request of the replica before it), and on a revoke it stops deciding before the
//! partition is handed over. When it becomes active the provider adopts the machines the log
//! still has and stops the others it owns
//! ([`Provider::recover`](crate::provider::Provider::recover)). When it stops, the agents its
//! provider stopped (the local provider's processes, drained first) are recorded as released.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tributary_eventlog::runtime::{Consumer, Interest, Sequenced, JOB_OUTPUT};
use tributary_eventlog::{EventLog, LogError, Offset, Partition, Topic};
use tributary_proto::events::{envelope::Payload, AgentProvisioned, AgentReleased, Envelope};

use crate::config::{billed_secs, cost_micros, format_money, Config};
use crate::events::{envelopes, POOL_TENANT};
use crate::fold::PoolState;
use crate::policy::{decide, Decision};
use crate::provider::{AgentHandle, AgentRequest, Provider};

/// The consumer group of autoscaler replicas ([`Replicas::Group`]).
pub const GROUP: &str = "autoscaler";

/// How replicas of the autoscaler share a log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Replicas {
    /// This is the only one (the embedded log: one process per data directory).
    Alone,
    /// Members of this consumer group: the owner of events partition 0 is the active one.
    Group(String),
}

/// [`PoolState`] as the runtime drives it: events folded in the order read.
pub type PoolFold = Sequenced<PoolState>;

/// A fresh [`PoolFold`].
pub fn pool_fold() -> PoolFold {
    Sequenced::new(
        "autoscaler",
        Interest::except(&JOB_OUTPUT),
        PoolState::default(),
    )
}

/// Runs until `stop` is cancelled (then the provider drains what it runs) or the log closes.
pub async fn run(
    log: Arc<dyn EventLog>,
    config: Config,
    provider: Arc<dyn Provider>,
    replicas: Replicas,
    stop: CancellationToken,
) -> Result<(), LogError> {
    let mut consumer = Consumer::new(pool_fold());
    let result = drive(
        log.clone(),
        &config,
        provider.clone(),
        replicas,
        stop,
        &mut consumer,
    )
    .await;
    let stopped = provider.shutdown().await;
    if stopped.is_empty() {
        return result;
    }
    // Catch up, so that the releases below see every request and what it cost.
    consumer
        .catch_up(log.as_ref(), log.layout().topic_partitions(Topic::Events))
        .await?;
    let now = tributary_proto::now_us();
    let state = &consumer.fold().state;
    let releases: Vec<Envelope> = state
        .pool()
        .agents
        .iter()
        .filter(|a| stopped.contains(&a.id))
        .flat_map(|a| {
            let billed_secs = billed_secs(a.started_us, now, a.billing_granularity_secs);
            let decision = Decision::Release {
                id: a.id.clone(),
                agent_id: a.agent_id.clone(),
                reason: "the autoscaler stopped: its provider drained and stopped the agent".into(),
                billed_secs,
                cost_micros: cost_micros(billed_secs, a.price_per_hour_micros),
            };
            envelopes(&decision, provider.name(), now)
        })
        .collect();
    if !releases.is_empty() {
        log.append(&releases).await?;
    }
    result
}

/// When it becomes active: the provider adopts the machines of the requests the log still
/// has and stops the ones it owns that the log does not know. An adopted machine whose
/// AgentProvisioned never made it to the log (a crash right after the provider's call) gets it
/// now.
async fn recover(
    log: &dyn EventLog,
    provider: &dyn Provider,
    state: &PoolState,
) -> Result<(), LogError> {
    let live: BTreeSet<String> = state.requests.keys().cloned().collect();
    let recovery = match provider.recover(&live).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(provider = provider.name(), error = %e, "cannot look for machines left by an earlier run");
            return Ok(());
        }
    };
    let provisioned: Vec<Envelope> = recovery
        .adopted
        .iter()
        .filter(|(id, _)| state.requests.get(id).is_some_and(|r| r.machine.is_empty()))
        .map(|(id, machine)| {
            Envelope::new(
                POOL_TENANT,
                "",
                "",
                Payload::AgentProvisioned(AgentProvisioned {
                    request_id: id.clone(),
                    machine: machine.clone(),
                }),
            )
        })
        .collect();
    if !provisioned.is_empty() {
        log.append(&provisioned).await?;
    }
    if !recovery.adopted.is_empty() || !recovery.deleted.is_empty() {
        tracing::info!(
            adopted = recovery.adopted.len(),
            deleted = recovery.deleted.len(),
            "machines left by an earlier run: adopted those the log knows, stopped the others"
        );
    }
    Ok(())
}

/// Whether this replica decides, and what it waits for before it does.
enum Activity {
    Standby,
    /// Gained partition 0: folding up to these ends (indexed by partition) first.
    CatchingUp(Vec<Offset>),
    Active,
}

async fn drive(
    log: Arc<dyn EventLog>,
    config: &Config,
    provider: Arc<dyn Provider>,
    replicas: Replicas,
    stop: CancellationToken,
    consumer: &mut Consumer<PoolFold>,
) -> Result<(), LogError> {
    let partitions: Vec<Partition> = log.layout().topic_partitions(Topic::Events).collect();
    // Ownership: partition 0 of the events topic makes the active replica.
    let (assigned_tx, mut assigned) = watch::channel(BTreeSet::<Partition>::new());
    let (deciding_tx, deciding_rx) = watch::channel(BTreeSet::<Partition>::new());
    let owner_stop = stop.child_token();
    let mut owner = match &replicas {
        Replicas::Alone => {
            assigned_tx.send_replace(BTreeSet::from([0]));
            None
        }
        Replicas::Group(group) => {
            let (log, group, stop) = (log.clone(), group.clone(), owner_stop.clone());
            Some(tokio::spawn(async move {
                tributary_scheduler::service::own_by_group(
                    log,
                    &group,
                    assigned_tx,
                    deciding_rx,
                    stop,
                )
                .await
            }))
        }
    };
    let _stop_owner = owner_stop.drop_guard();
    tokio::select! {
        r = consumer.catch_up(log.as_ref(), partitions.iter().copied()) => r?,
        () = stop.cancelled() => return Ok(()),
    }
    let mut sub = consumer.subscribe(log.as_ref(), partitions.iter().copied());
    let mut activity = Activity::Standby;
    let mut assignment_open = true;
    let mut reassigned = true;
    // Per partition, the offset of our last append there not folded yet.
    let mut awaiting: BTreeMap<Partition, Offset> = BTreeMap::new();
    let tick = Duration::from_micros(config.tick_us.max(10_000) as u64);
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut calls = tokio::task::JoinSet::new();
    tracing::info!(provider = provider.name(), kinds = config.kinds.len(), budget_per_hour = %format_money(config.budget_per_hour_micros), ?replicas, "autoscaler started");
    loop {
        tokio::select! {
            batch = sub.next_batch() => consumer.apply(&batch?).await?,
            changed = assigned.changed(), if assignment_open => {
                match changed {
                    Ok(()) => reassigned = true,
                    Err(_) => {
                        // The group membership ended: at stop, or on an error of the log.
                        assignment_open = false;
                        if let Some(owner) = owner.take() {
                            if !stop.is_cancelled() {
                                match owner.await {
                                    Ok(Ok(())) => {}
                                    Ok(Err(e)) => return Err(e),
                                    Err(e) => return Err(LogError::Invalid(format!(
                                        "the autoscaler's group membership failed: {e}"
                                    ))),
                                }
                            }
                        }
                    }
                }
            }
            _ = ticker.tick() => {}
            Some(_) = calls.join_next(), if !calls.is_empty() => {}
            _ = stop.cancelled() => {
                while calls.join_next().await.is_some() {}
                return Ok(());
            }
        }
        if reassigned {
            reassigned = false;
            let leads = assigned.borrow_and_update().contains(&0);
            match (&activity, leads) {
                (Activity::Standby, true) => {
                    let ends = log.end_offsets().await?;
                    tracing::info!(?ends, "partition 0 gained: catching up before deciding");
                    activity = Activity::CatchingUp(ends);
                }
                (Activity::CatchingUp(_) | Activity::Active, false) => {
                    tracing::info!("partition 0 lost: standing by");
                    activity = Activity::Standby;
                    awaiting.clear();
                    deciding_tx.send_replace(BTreeSet::new());
                }
                _ => {}
            }
        }
        if let Activity::CatchingUp(ends) = &activity {
            if !consumer.applied_sender().borrow().reached_ends(ends) {
                continue;
            }
            recover(log.as_ref(), provider.as_ref(), &consumer.fold().state).await?;
            tracing::info!("active autoscaler replica: deciding");
            activity = Activity::Active;
            deciding_tx.send_replace(BTreeSet::from([0]));
        }
        if !matches!(activity, Activity::Active) {
            continue;
        }
        awaiting.retain(|p, offset| consumer.position(*p) <= *offset);
        if !awaiting.is_empty() {
            continue; // our last decisions are not folded yet
        }
        let state = &consumer.fold().state;
        let now = tributary_proto::now_us();
        let decisions = decide(&state.queue(config, now), &state.pool(), now, config);
        if decisions.is_empty() {
            continue;
        }
        let events: Vec<Envelope> = decisions
            .iter()
            .flat_map(|d| envelopes(d, provider.name(), now))
            .collect();
        let offsets = log.append(&events).await?;
        let layout = log.layout();
        for (event, offset) in events.iter().zip(offsets) {
            let entry = awaiting.entry(layout.partition_of(event)).or_insert(offset);
            *entry = (*entry).max(offset);
        }
        for d in decisions {
            log_decision(&d);
            let provider = provider.clone();
            let log = log.clone();
            let machine = |id: &str| {
                state
                    .requests
                    .get(id)
                    .map(|r| r.machine.clone())
                    .unwrap_or_default()
            };
            match d {
                Decision::Acquire {
                    kind,
                    ids,
                    labels,
                    capacity,
                    ..
                } => {
                    for id in ids {
                        let request = AgentRequest {
                            id,
                            kind: kind.clone(),
                            labels: labels.clone(),
                            capacity,
                        };
                        let provider = provider.clone();
                        let log = log.clone();
                        calls.spawn(async move { acquire(provider, log, request).await });
                    }
                }
                Decision::Drain { id, agent_id, .. } => {
                    let handle = handle(state, &id, agent_id, machine(&id));
                    calls.spawn(async move {
                        if let Err(e) = provider.drain(&handle).await {
                            tracing::error!(request_id = %handle.id, error = %e, "the provider could not drain the agent");
                        }
                    });
                }
                Decision::Release { id, agent_id, .. } => {
                    let handle = handle(state, &id, agent_id, machine(&id));
                    calls.spawn(async move {
                        if let Err(e) = provider.release(&handle).await {
                            tracing::error!(request_id = %handle.id, machine = %handle.machine, error = %e, "the provider could not release the machine: release it by hand");
                        }
                    });
                }
            }
        }
    }
}

fn handle(state: &PoolState, id: &str, agent_id: String, machine: String) -> AgentHandle {
    AgentHandle {
        id: id.to_owned(),
        agent_id,
        kind: state
            .requests
            .get(id)
            .map(|r| r.kind.clone())
            .unwrap_or_default(),
        machine,
    }
}

async fn acquire(provider: Arc<dyn Provider>, log: Arc<dyn EventLog>, request: AgentRequest) {
    let payload = match provider.acquire(&request).await {
        Ok(machine) => Payload::AgentProvisioned(AgentProvisioned {
            request_id: request.id.clone(),
            machine,
        }),
        Err(e) => {
            tracing::error!(request_id = %request.id, error = %e, "the provider could not acquire the agent");
            Payload::AgentReleased(AgentReleased {
                request_id: request.id.clone(),
                agent_id: String::new(),
                reason: format!("the provider could not acquire it: {e}"),
                billed_secs: 0,
                cost_micros: 0,
            })
        }
    };
    if let Err(e) = log
        .append(&[Envelope::new(POOL_TENANT, "", "", payload)])
        .await
    {
        tracing::error!(request_id = %request.id, error = %e, "cannot record the provider's answer");
    }
}

fn log_decision(d: &Decision) {
    match d {
        Decision::Acquire {
            kind, ids, reason, ..
        } => tracing::info!(kind, count = ids.len(), reason, "acquire"),
        Decision::Drain {
            id,
            agent_id,
            reason,
        } => tracing::info!(request_id = %id, agent_id, reason, "drain"),
        Decision::Release {
            id,
            agent_id,
            reason,
            cost_micros,
            ..
        } => {
            tracing::info!(request_id = %id, agent_id, reason, cost = %format_money(*cost_micros), "release")
        }
    }
}
