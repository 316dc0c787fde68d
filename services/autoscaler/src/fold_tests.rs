//! The pool fold driven like production: the scheduler's decisions and the autoscaler's
//! decisions are appended as events and folded back, with a clock.

use tributary_proto::events::{
    AgentConnected, AgentDisconnected, AgentRegistered, BuildQueued, BuildTriggered, JobFinished,
    JobPlan, JobStarted, Plan,
};
use tributary_scheduler::cluster::{decide_cluster, ClusterConfig, ClusterDecision};

use super::*;
use crate::config::{KindConfig, MICROS, SECOND_US};
use crate::events::payloads;
use crate::policy::{decide, Decision};

const S: i64 = SECOND_US;

struct World {
    state: PoolState,
    offset: u64,
    now: i64,
    config: Config,
}

impl World {
    fn new() -> World {
        World {
            state: PoolState::new(),
            offset: 0,
            now: 1_000 * S,
            config: Config {
                kinds: vec![KindConfig {
                    name: "small".into(),
                    labels: vec![],
                    capacity: 1,
                    price_per_hour_micros: MICROS,
                    billing_granularity_secs: 1,
                    max_agents: 4,
                    boot_us: S,
                }],
                grace_us: 30 * S,
                target_wait_us: 10 * S,
                default_job_us: 10 * S,
                queue_delay_us: 0,
                ..Config::default()
            },
        }
    }

    fn push(&mut self, build: &str, payload: Payload) {
        let env = Envelope {
            event_id: format!("e{}", self.offset),
            tenant: "t".into(),
            project: "p".into(),
            build_id: build.into(),
            time_us: self.now,
            payload: Some(payload),
        };
        self.state.apply(self.offset, &env);
        self.offset += 1;
    }

    fn autoscale(&mut self) -> Vec<Decision> {
        let ds = decide(
            &self.state.queue(&self.config, self.now),
            &self.state.pool(),
            self.now,
            &self.config,
        );
        for d in &ds {
            for p in payloads(d, "test") {
                self.push("", p);
            }
        }
        ds
    }

    /// Appends the scheduler's decisions; returns the assignments (job, agent).
    fn schedule(&mut self) -> Vec<(String, String)> {
        let mut assigned = Vec::new();
        let ds = decide_cluster(&self.state.cluster, self.now, &ClusterConfig::default());
        for d in ds {
            if let ClusterDecision::Assign { job, agent_id, .. } = &d {
                assigned.push((job.clone(), agent_id.clone()));
            }
            let build = d.build_id().to_owned();
            self.push(&build, d.payload());
        }
        assigned
    }

    fn agent_comes_up(&mut self, request_id: &str) {
        let agent_id = format!("agent-of-{request_id}");
        self.push(
            "",
            Payload::AgentRegistered(AgentRegistered {
                agent_id: agent_id.clone(),
                name: request_id.into(),
                capacity: 1,
                ..AgentRegistered::default()
            }),
        );
        self.push(
            "",
            Payload::AgentConnected(AgentConnected {
                agent_id,
                capacity: 1,
                session_id: "s".into(),
                ..AgentConnected::default()
            }),
        );
    }
}

fn job(id: &str) -> JobPlan {
    JobPlan {
        id: id.into(),
        name: id.into(),
        ..JobPlan::default()
    }
}

#[test]
fn the_fold_gives_the_queue_and_the_pool_through_a_scale_up_and_down() {
    let mut w = World::new();
    w.push("b1", Payload::BuildTriggered(BuildTriggered::default()));
    w.push(
        "b1",
        Payload::BuildQueued(BuildQueued {
            plan: Some(Plan {
                jobs: vec![job("a"), job("b"), job("c")],
            }),
        }),
    );
    w.schedule(); // queues the three jobs; no agent yet
                  // A job counts as waiting only once it has waited queue_delay: one that an agent takes at
                  // once never makes the pool grow.
    let mut delayed = w.config.clone();
    delayed.queue_delay_us = S;
    assert!(w.state.queue(&delayed, w.now + S / 2).waiting.is_empty());
    assert_eq!(w.state.queue(&delayed, w.now + S).waiting[0].jobs, 3);
    let q = w.state.queue(&w.config, w.now);
    assert_eq!(q.waiting.len(), 1);
    assert_eq!((q.waiting[0].jobs, q.waiting[0].work_us), (3, 30 * S));

    // 30 s of work, 10 s target: three agents.
    let ds = w.autoscale();
    assert!(
        matches!(&ds[..], [Decision::Acquire { ids, .. }] if ids.len() == 3),
        "{ds:?}"
    );
    let pool = w.state.pool();
    assert_eq!(pool.agents.len(), 3);
    assert!(pool.agents.iter().all(|a| a.phase == Phase::Starting));
    assert!(
        w.autoscale().is_empty(),
        "no second acquisition for the same demand"
    );

    w.now += 2 * S;
    for id in ["as-small-0", "as-small-1", "as-small-2"] {
        w.agent_comes_up(id);
    }
    let assigned = w.schedule();
    assert_eq!(assigned.len(), 3);
    let pool = w.state.pool();
    assert!(pool
        .agents
        .iter()
        .all(|a| a.phase == Phase::Busy && a.busy_slots == 1));
    assert!(w.state.queue(&w.config, w.now).waiting.is_empty());

    // The jobs run 20 s; the fold learns their duration.
    w.now += 20 * S;
    for (job, agent) in &assigned {
        w.push(
            "b1",
            Payload::JobStarted(JobStarted {
                job: job.clone(),
                attempt: 1,
                agent_id: agent.clone(),
                ..JobStarted::default()
            }),
        );
        w.push(
            "b1",
            Payload::JobFinished(JobFinished {
                job: job.clone(),
                attempt: 1,
                status: Status::Succeeded as i32,
                duration_us: 20_000_000,
                ..JobFinished::default()
            }),
        );
    }
    w.schedule();
    let pool = w.state.pool();
    assert!(pool
        .agents
        .iter()
        .all(|a| a.phase == Phase::Idle && a.idle_since_us == w.now));
    assert!(w.autoscale().is_empty(), "within grace");

    // After the grace period: drained (the scheduler assigns them nothing more), released.
    w.now += 31 * S;
    let ds = w.autoscale();
    assert_eq!(ds.len(), 3, "{ds:?}");
    assert!(w
        .state
        .cluster
        .agents
        .values()
        .all(|a| a.drain_requested && !a.is_available(w.now, &ClusterConfig::default())));
    w.push("b2", Payload::BuildTriggered(BuildTriggered::default()));
    w.push(
        "b2",
        Payload::BuildQueued(BuildQueued {
            plan: Some(Plan {
                jobs: vec![job("a")],
            }),
        }),
    );
    assert!(w.schedule().is_empty(), "a draining agent gets no work");
    // The new build's job waits with its learnt duration (20 s): one new agent, no flapping
    // of the draining ones.
    let q = w.state.queue(&w.config, w.now);
    assert_eq!(q.waiting[0].work_us, 20 * S);
    w.now += 2 * S;
    let ds = w.autoscale();
    let released = ds
        .iter()
        .filter(|d| matches!(d, Decision::Release { .. }))
        .count();
    assert_eq!(released, 3, "{ds:?}");
    assert!(ds
        .iter()
        .any(|d| matches!(d, Decision::Acquire { ids, .. } if ids == &["as-small-3".to_owned()])));
    let pool = w.state.pool();
    assert_eq!(pool.agents.len(), 1);
    assert_eq!(
        w.state.released_cost_micros,
        3 * (55 * MICROS).div_ceil(3600)
    );
}

#[test]
fn an_agent_that_disconnects_without_drain_is_gone() {
    let mut w = World::new();
    w.push(
        "",
        Payload::AgentRequested(tributary_proto::events::AgentRequested {
            request_id: "as-small-0".into(),
            kind: "small".into(),
            capacity: 1,
            ..Default::default()
        }),
    );
    w.agent_comes_up("as-small-0");
    assert_eq!(w.state.pool().agents[0].phase, Phase::Idle);
    w.now += S;
    w.push(
        "",
        Payload::AgentDisconnected(AgentDisconnected {
            agent_id: "agent-of-as-small-0".into(),
            session_id: "s".into(),
            reason: "crashed".into(),
        }),
    );
    let a = &w.state.pool().agents[0];
    assert_eq!((a.phase, a.since_us), (Phase::Gone, w.now));
}
