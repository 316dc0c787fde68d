//! The autoscaler service: the thin shell that drives [`decide`] with real I/O.
//!
//! It folds the log from offset 0 into a [`PoolState`]; whenever it has folded its own last
//! appends (and at least every tick) it asks the policy what to do now, appends the decisions
//! as events, and hands each to the provider: acquire (then `AgentProvisioned`, or
//! `AgentReleased` with the provider's error), drain, release. Decisions are events first, so
//! a restarted autoscaler picks up where the log is, and nothing is decided twice; at start the
//! provider adopts the machines the log still has and stops the others it owns
//! ([`Provider::recover`](crate::provider::Provider::recover)). When it
//! stops, the agents its provider stopped (the local provider's processes, drained first) are
//! recorded as released.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tributary_eventlog::{EventLog, LogError};
use tributary_proto::events::{envelope::Payload, AgentProvisioned, AgentReleased, Envelope};

use crate::config::{billed_secs, cost_micros, format_money, Config};
use crate::events::{envelopes, POOL_TENANT};
use crate::fold::PoolState;
use crate::policy::{decide, Decision};
use crate::provider::{AgentHandle, AgentRequest, Provider};

/// Runs until `stop` is cancelled (then the provider drains what it runs) or the log closes.
pub async fn run(
    log: Arc<dyn EventLog>,
    config: Config,
    provider: Arc<dyn Provider>,
    stop: CancellationToken,
) -> Result<(), LogError> {
    let mut state = PoolState::new();
    let result = drive(log.clone(), &config, provider.clone(), stop, &mut state).await;
    let stopped = provider.shutdown().await;
    // Catch up, so that the releases below see every request and what it cost.
    catch_up(log.as_ref(), &mut state).await?;
    let now = tributary_proto::now_us();
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

/// Folds the log up to its end.
async fn catch_up(log: &dyn EventLog, state: &mut PoolState) -> Result<(), LogError> {
    loop {
        let records = log.read(state.next_offset, 10_000).await?;
        if records.is_empty() {
            return Ok(());
        }
        for record in records {
            match record.decode() {
                Ok(env) => state.apply(record.offset, &env),
                Err(_) => state.next_offset = state.next_offset.max(record.offset + 1),
            }
        }
    }
}

/// At start: the provider adopts the machines of the requests the log still has and stops
/// the ones it owns that the log does not know. An adopted machine whose AgentProvisioned
/// never made it to the log (a crash right after the provider's call) gets it now.
async fn recover(
    log: &dyn EventLog,
    provider: &dyn Provider,
    state: &mut PoolState,
) -> Result<(), LogError> {
    catch_up(log, state).await?;
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

async fn drive(
    log: Arc<dyn EventLog>,
    config: &Config,
    provider: Arc<dyn Provider>,
    stop: CancellationToken,
    state: &mut PoolState,
) -> Result<(), LogError> {
    recover(log.as_ref(), provider.as_ref(), state).await?;
    let mut sub = log.subscribe(state.next_offset);
    let mut awaiting: Option<u64> = None;
    let tick = Duration::from_micros(config.tick_us.max(10_000) as u64);
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut calls = tokio::task::JoinSet::new();
    tracing::info!(provider = provider.name(), kinds = config.kinds.len(), budget_per_hour = %format_money(config.budget_per_hour_micros), "autoscaler started");
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
            Some(_) = calls.join_next(), if !calls.is_empty() => {}
            _ = stop.cancelled() => {
                while calls.join_next().await.is_some() {}
                return Ok(());
            }
        }
        if awaiting.is_some_and(|a| sub.position() <= a) {
            continue; // our last decisions are not folded yet
        }
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
        awaiting = offsets.last().copied();
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
