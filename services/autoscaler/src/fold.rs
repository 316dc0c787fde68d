//! The queue and the pool as a pure fold of the log.
//!
//! [`PoolState::apply`] folds every event into the scheduler's [`ClusterState`] (builds, jobs,
//! agents, leases) and keeps what the policy needs beyond it: the agents the autoscaler
//! requested (`AgentRequested` … `AgentReleased`), which server agent each became (the agent
//! registers with the request id as its name), when each was last busy, and the durations of
//! past jobs. [`PoolState::observe`] turns it into the policy's [`Queue`] and [`Pool`] at a
//! given time. Time comes only from `Envelope::time_us`.

use std::collections::BTreeMap;

use tributary_proto::events::{envelope::Payload, Envelope, Status};
use tributary_scheduler::cluster::ClusterState;
use tributary_scheduler::JobPhase;

use crate::config::Config;
use crate::durations::Durations;
use crate::policy::{Demand, Phase, Pool, PoolAgent, Queue};

/// An agent the autoscaler requested and has not released.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Requested {
    pub kind: String,
    pub labels: Vec<String>,
    pub capacity: u32,
    pub price_per_hour_micros: u64,
    pub billing_granularity_secs: u64,
    pub requested_us: i64,
    /// The server's agent id, once an agent registered with the request id as its name.
    pub agent_id: String,
    /// The provider's handle (AgentProvisioned).
    pub machine: String,
    pub draining_since_us: Option<i64>,
}

#[derive(Clone, Debug, Default)]
pub struct PoolState {
    pub cluster: ClusterState,
    /// Live requests by request id.
    pub requests: BTreeMap<String, Requested>,
    agent_request: BTreeMap<String, String>,
    connected_us: BTreeMap<String, i64>,
    disconnected_us: BTreeMap<String, i64>,
    last_active_us: BTreeMap<String, i64>,
    durations: Durations,
    requested: u64,
    last_acquired_us: BTreeMap<String, i64>,
    /// When each (build, job) was last queued or requeued.
    queued_us: BTreeMap<(String, String), i64>,
    /// Cost of every released agent, summed (AgentReleased.cost_micros).
    pub released_cost_micros: u64,
    /// The offset after the last event folded.
    pub next_offset: u64,
}

fn duration_key(env: &Envelope, job: &str) -> String {
    format!("{}/{}/{job}", env.tenant, env.project)
}

impl tributary_eventlog::runtime::Sequential for PoolState {
    fn apply(&mut self, sequence: u64, env: &Envelope) {
        PoolState::apply(self, sequence, env);
    }
}

impl PoolState {
    pub fn new() -> Self {
        Self::default()
    }

    /// Folds one event.
    pub fn apply(&mut self, offset: u64, env: &Envelope) {
        self.next_offset = self.next_offset.max(offset + 1);
        let Some(payload) = &env.payload else { return };
        let t = env.time_us;
        // The agent whose job ends: looked up before the cluster fold drops the lease.
        if let Payload::JobFinished(e) = payload {
            let key = (env.build_id.clone(), e.job.clone());
            if let Some(lease) = self.cluster.leases.get(&key) {
                if lease.attempt == e.attempt {
                    self.last_active_us.insert(lease.agent_id.clone(), t);
                }
            }
            let ran = e.status == Status::Succeeded as i32 || e.status == Status::Failed as i32;
            if ran && e.duration_us > 0 {
                self.durations.record(
                    &duration_key(env, &e.job),
                    i64::try_from(e.duration_us).unwrap_or(i64::MAX),
                );
            }
        }
        if let Payload::JobRequeued(e) = payload {
            self.last_active_us.insert(e.agent_id.clone(), t);
        }
        if let Payload::JobAssigned(e) = payload {
            self.queued_us
                .remove(&(env.build_id.clone(), e.job.clone()));
        }
        self.cluster.apply(offset, env);
        match payload {
            Payload::JobQueued(e) => {
                self.queued_us
                    .insert((env.build_id.clone(), e.job.clone()), t);
            }
            Payload::JobRequeued(e) => {
                self.queued_us
                    .insert((env.build_id.clone(), e.job.clone()), t);
            }
            Payload::BuildFinished(_) => {
                let build = env.build_id.clone();
                self.queued_us.retain(|(b, _), _| *b != build);
            }
            Payload::JobAssigned(e) => {
                self.last_active_us.insert(e.agent_id.clone(), t);
            }
            Payload::AgentRegistered(e) => {
                if let Some(r) = self.requests.get_mut(&e.name) {
                    if r.agent_id.is_empty() {
                        r.agent_id = e.agent_id.clone();
                        self.agent_request
                            .insert(e.agent_id.clone(), e.name.clone());
                    }
                }
            }
            Payload::AgentConnected(e) => {
                self.connected_us.insert(e.agent_id.clone(), t);
                self.disconnected_us.remove(&e.agent_id);
            }
            Payload::AgentDisconnected(e) => {
                let gone = self
                    .cluster
                    .agents
                    .get(&e.agent_id)
                    .is_some_and(|a| !a.connected);
                if gone {
                    self.disconnected_us.insert(e.agent_id.clone(), t);
                }
            }
            Payload::AgentRequested(e) => {
                self.requested += 1;
                self.last_acquired_us.insert(e.kind.clone(), t);
                self.requests.insert(
                    e.request_id.clone(),
                    Requested {
                        kind: e.kind.clone(),
                        labels: e.labels.clone(),
                        capacity: e.capacity,
                        price_per_hour_micros: e.price_per_hour_micros,
                        billing_granularity_secs: e.billing_granularity_secs,
                        requested_us: t,
                        ..Requested::default()
                    },
                );
            }
            Payload::AgentProvisioned(e) => {
                if let Some(r) = self.requests.get_mut(&e.request_id) {
                    r.machine = e.machine.clone();
                }
            }
            Payload::AgentDraining(e) => {
                if let Some(r) = self.requests.get_mut(&e.request_id) {
                    r.draining_since_us.get_or_insert(t);
                }
            }
            Payload::AgentReleased(e) => {
                if let Some(r) = self.requests.remove(&e.request_id) {
                    self.agent_request.remove(&r.agent_id);
                    self.released_cost_micros += e.cost_micros;
                }
            }
            _ => {}
        }
    }

    /// The jobs waiting at `now_us` (for `config.queue_delay_us` at least), per label set,
    /// with their expected work.
    pub fn queue(&self, config: &Config, now_us: i64) -> Queue {
        let mut groups: BTreeMap<Vec<String>, Demand> = BTreeMap::new();
        for (build_id, run) in &self.cluster.builds.builds {
            if run.canceled {
                continue;
            }
            for job in &run.jobs {
                let leased = self
                    .cluster
                    .leases
                    .contains_key(&(build_id.clone(), job.id.clone()));
                // Queued, or requeued (its next attempt is about to be queued).
                let waiting = matches!(
                    job.phase,
                    JobPhase::Queued | JobPhase::Assigned | JobPhase::Running
                ) && !leased;
                let key = (build_id.clone(), job.id.clone());
                let since = self.queued_us.get(&key).copied().unwrap_or(i64::MIN);
                if !waiting || now_us.saturating_sub(since) < config.queue_delay_us {
                    continue;
                }
                let mut labels = self
                    .cluster
                    .job_plan(build_id, &job.id)
                    .map(|p| p.runs_on.clone())
                    .unwrap_or_default();
                labels.sort();
                labels.dedup();
                let key = format!("{}/{}/{}", run.tenant, run.project, job.id);
                let d = groups.entry(labels.clone()).or_insert_with(|| Demand {
                    labels,
                    ..Demand::default()
                });
                d.jobs += 1;
                d.work_us += self.durations.expected(&key, config.default_job_us);
            }
        }
        Queue {
            waiting: groups.into_values().collect(),
        }
    }

    /// The autoscaler's agents as the policy sees them.
    pub fn pool(&self) -> Pool {
        let agents = self
            .requests
            .iter()
            .map(|(id, r)| {
                let agent = (!r.agent_id.is_empty())
                    .then(|| self.cluster.agents.get(&r.agent_id))
                    .flatten();
                let connected_us = self.connected_us.get(&r.agent_id).copied();
                let busy_slots = if r.agent_id.is_empty() {
                    0
                } else {
                    self.cluster.busy_slots(&r.agent_id) as u32
                };
                let idle_since_us = connected_us
                    .unwrap_or(r.requested_us)
                    .max(self.last_active_us.get(&r.agent_id).copied().unwrap_or(0));
                let (phase, since_us) = match (r.draining_since_us, agent, connected_us) {
                    (Some(since), _, _) => (Phase::Draining, since),
                    (None, None, _) | (None, Some(_), None) => (Phase::Starting, r.requested_us),
                    (None, Some(a), Some(c)) => {
                        if a.revoked || !a.connected {
                            let since = self.disconnected_us.get(&r.agent_id).copied();
                            (Phase::Gone, since.unwrap_or(c))
                        } else if a.draining {
                            (Phase::Draining, a.last_seen_us)
                        } else if busy_slots > 0 {
                            (Phase::Busy, c)
                        } else {
                            (Phase::Idle, c)
                        }
                    }
                };
                PoolAgent {
                    id: id.clone(),
                    agent_id: r.agent_id.clone(),
                    kind: r.kind.clone(),
                    capacity: r.capacity,
                    phase,
                    busy_slots,
                    started_us: r.requested_us,
                    idle_since_us,
                    since_us,
                    price_per_hour_micros: r.price_per_hour_micros,
                    billing_granularity_secs: r.billing_granularity_secs,
                }
            })
            .collect();
        Pool {
            agents,
            requested: self.requested,
            last_acquired_us: self.last_acquired_us.clone(),
        }
    }
}

#[cfg(test)]
#[path = "fold_tests.rs"]
mod tests;
