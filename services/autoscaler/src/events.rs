//! Decisions as events: what the autoscaler appends, so that the pool's cost is auditable by
//! replaying the log (next to billed usage).

use tributary_proto::events::{
    envelope::Payload, AgentDraining, AgentReleased, AgentRequested, Envelope,
};

use crate::policy::Decision;

/// The tenant of pool events: the pool is the server's, shared by every tenant.
pub const POOL_TENANT: &str = "";

/// The events that record `decision`: one AgentRequested per acquired agent, one
/// AgentDraining, or one AgentReleased. `provider` names the interpreter.
pub fn payloads(decision: &Decision, provider: &str) -> Vec<Payload> {
    match decision {
        Decision::Acquire {
            kind,
            ids,
            labels,
            capacity,
            price_per_hour_micros,
            billing_granularity_secs,
            reason,
            cost_micros,
        } => ids
            .iter()
            .map(|id| {
                Payload::AgentRequested(AgentRequested {
                    request_id: id.clone(),
                    kind: kind.clone(),
                    labels: labels.clone(),
                    capacity: *capacity,
                    price_per_hour_micros: *price_per_hour_micros,
                    billing_granularity_secs: *billing_granularity_secs,
                    provider: provider.to_owned(),
                    reason: reason.clone(),
                    cost_micros: *cost_micros,
                })
            })
            .collect(),
        Decision::Drain {
            id,
            agent_id,
            reason,
        } => vec![Payload::AgentDraining(AgentDraining {
            request_id: id.clone(),
            agent_id: agent_id.clone(),
            reason: reason.clone(),
        })],
        Decision::Release {
            id,
            agent_id,
            reason,
            billed_secs,
            cost_micros,
        } => vec![Payload::AgentReleased(AgentReleased {
            request_id: id.clone(),
            agent_id: agent_id.clone(),
            reason: reason.clone(),
            billed_secs: *billed_secs,
            cost_micros: *cost_micros,
        })],
    }
}

/// [`payloads`] in envelopes stamped `time_us`.
pub fn envelopes(decision: &Decision, provider: &str, time_us: i64) -> Vec<Envelope> {
    payloads(decision, provider)
        .into_iter()
        .map(|p| {
            let mut env = Envelope::new(POOL_TENANT, "", "", p);
            env.time_us = time_us;
            env
        })
        .collect()
}
