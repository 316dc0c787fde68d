use super::*;
use proptest::prelude::*;
use tributary_proto::events::{
    AgentConnected, AgentDisconnected, AgentHeartbeat, AgentRegistered, AgentRevoked,
    BuildCanceled, BuildQueued, BuildTriggered, JobStarted, Plan, ProjectCreated,
};

const S: i64 = SECOND_US;

/// A log with a clock: folds what it appends, applies decisions like a driver would.
struct World {
    state: ClusterState,
    log: Vec<Envelope>,
    now: i64,
    config: ClusterConfig,
}

fn job(id: &str) -> JobPlan {
    JobPlan {
        id: id.into(),
        name: id.into(),
        ..JobPlan::default()
    }
}

fn boxed(id: &str, image: &str) -> JobPlan {
    JobPlan {
        image: image.into(),
        ..job(id)
    }
}

fn on(id: &str, labels: &[&str]) -> JobPlan {
    JobPlan {
        runs_on: labels.iter().map(|l| l.to_string()).collect(),
        ..job(id)
    }
}

impl World {
    fn new() -> World {
        World {
            state: ClusterState::new(),
            log: Vec::new(),
            now: 1_000 * S,
            config: ClusterConfig::default(),
        }
    }

    fn push_in(&mut self, tenant: &str, project: &str, build: &str, payload: Payload) {
        let env = Envelope {
            event_id: format!("e{}", self.log.len()),
            tenant: tenant.into(),
            project: project.into(),
            build_id: build.into(),
            time_us: self.now,
            payload: Some(payload),
        };
        self.state.apply(self.log.len() as u64, &env);
        self.log.push(env);
    }

    fn push(&mut self, build: &str, payload: Payload) {
        let (tenant, project) = self
            .state
            .builds
            .builds
            .get(build)
            .map(|b| (b.tenant.clone(), b.project.clone()))
            .unwrap_or(("t".into(), "p".into()));
        self.push_in(&tenant, &project, build, payload);
    }

    fn agent(&mut self, id: &str, labels: &[&str], capacity: u32, tenant: &str) {
        self.agent_with(id, labels, capacity, tenant, false);
    }

    /// An agent that can (or cannot) run container jobs.
    fn agent_with(
        &mut self,
        id: &str,
        labels: &[&str],
        capacity: u32,
        tenant: &str,
        containers: bool,
    ) {
        self.push(
            "",
            Payload::AgentRegistered(AgentRegistered {
                agent_id: id.into(),
                name: id.into(),
                labels: labels.iter().map(|l| l.to_string()).collect(),
                capacity,
                tenant: tenant.into(),
                token_sha256: String::new(),
                containers,
                engine: if containers {
                    "podman 4.3.1 (API 1.41)".into()
                } else {
                    String::new()
                },
            }),
        );
        self.connect(id, "s1");
    }

    fn connect(&mut self, id: &str, session: &str) {
        self.push(
            "",
            Payload::AgentConnected(AgentConnected {
                agent_id: id.into(),
                session_id: session.into(),
                ..AgentConnected::default()
            }),
        );
    }

    fn heartbeat(&mut self, id: &str, session: &str, leases: &[&str], draining: bool) {
        self.push(
            "",
            Payload::AgentHeartbeat(AgentHeartbeat {
                agent_id: id.into(),
                lease_ids: leases.iter().map(|l| l.to_string()).collect(),
                draining,
                session_id: session.into(),
            }),
        );
    }

    fn build_in(&mut self, tenant: &str, project: &str, id: &str, jobs: Vec<JobPlan>) {
        self.push_in(
            tenant,
            project,
            id,
            Payload::BuildTriggered(BuildTriggered::default()),
        );
        self.push(
            id,
            Payload::BuildQueued(BuildQueued {
                plan: Some(Plan { jobs }),
            }),
        );
    }

    fn build(&mut self, id: &str, jobs: Vec<JobPlan>) {
        self.build_in("t", "p", id, jobs);
    }

    fn decide(&self) -> Vec<ClusterDecision> {
        decide_cluster(&self.state, self.now, &self.config)
    }

    /// Decides once and appends every decision; returns them.
    fn step(&mut self) -> Vec<ClusterDecision> {
        let decisions = self.decide();
        for d in &decisions {
            self.push(d.build_id(), d.payload());
        }
        decisions
    }

    /// Decides once as the scheduler service does (with waiting reasons) and appends.
    fn step_noting(&mut self) -> Vec<ClusterDecision> {
        let decisions = decide_cluster_noting_waits(&self.state, self.now, &self.config);
        for d in &decisions {
            self.push(d.build_id(), d.payload());
        }
        decisions
    }

    /// Steps until nothing is left to decide; returns the assignments made.
    fn settle(&mut self) -> Vec<(String, u32, String)> {
        let mut assigned = Vec::new();
        for _ in 0..50 {
            let decisions = self.step();
            if decisions.is_empty() {
                return assigned;
            }
            for d in decisions {
                if let ClusterDecision::Assign {
                    job,
                    attempt,
                    agent_id,
                    ..
                } = d
                {
                    assigned.push((job, attempt, agent_id));
                }
            }
        }
        panic!("did not settle");
    }

    fn start(&mut self, build: &str, job: &str, attempt: u32, agent: &str) {
        self.push(
            build,
            Payload::JobStarted(JobStarted {
                job: job.into(),
                attempt,
                agent_id: agent.into(),
                lease_id: lease_id_for(build, job, attempt),
                executor: "host".into(),
            }),
        );
    }

    fn finish(&mut self, build: &str, job: &str, attempt: u32, status: Status) {
        self.push(
            build,
            Payload::JobFinished(JobFinished {
                job: job.into(),
                attempt,
                status: status as i32,
                ..JobFinished::default()
            }),
        );
    }

    fn phase(&self, build: &str, job: &str) -> Option<(u32, JobPhase)> {
        self.state.job(build, job).map(|j| (j.attempt, j.phase))
    }

    fn reason(&self, build: &str, job: &str) -> Option<String> {
        waiting_reason(&self.state, build, job, self.now, &self.config)
    }

    fn build_finished(&self, build: &str) -> Option<Status> {
        self.log.iter().find_map(|e| match &e.payload {
            Some(Payload::BuildFinished(f)) if e.build_id == build => {
                Status::try_from(f.status).ok()
            }
            _ => None,
        })
    }
}

fn who(assigned: &[(String, u32, String)], job: &str) -> Option<String> {
    assigned
        .iter()
        .find(|(j, _, _)| j == job)
        .map(|(_, _, a)| a.clone())
}

#[test]
fn a_ready_job_is_queued_and_leased_in_one_round_when_an_agent_is_free() {
    let mut w = World::new();
    w.agent("a", &[], 1, "");
    w.build("x", vec![job("j"), job("k")]);
    // One append carries both events of `j` (queued, then leased: the fold takes them in
    // order); `k` finds the only slot taken and is queued alone.
    let d = w.step();
    assert!(
        matches!(&d[..], [
            ClusterDecision::Queue { job: j1, attempt: 1, .. },
            ClusterDecision::Assign { job: j2, attempt: 1, agent_id, .. },
            ClusterDecision::Queue { job: k, attempt: 1, .. },
        ] if j1 == "j" && j2 == "j" && agent_id == "a" && k == "k"),
        "{d:?}"
    );
    assert_eq!(w.phase("x", "j"), Some((1, JobPhase::Assigned)));
    assert_eq!(w.phase("x", "k"), Some((1, JobPhase::Queued)));
    assert!(w.step().is_empty(), "nothing more until a slot frees");
    assert_eq!(
        w.reason("x", "k").as_deref(),
        Some("all generic agents are busy (1/1 slots in use)")
    );
}

#[test]
fn labelled_agent_is_preferred_and_generic_takes_the_rest() {
    let mut w = World::new();
    w.agent("generic", &[], 4, "");
    w.agent("gpu", &["gpu", "linux"], 1, "");
    w.build(
        "b",
        vec![
            on("train", &["gpu"]),
            job("lint"),
            on("both", &["linux", "gpu"]),
        ],
    );
    let assigned = w.settle();
    assert_eq!(who(&assigned, "train").as_deref(), Some("gpu"));
    assert_eq!(who(&assigned, "lint").as_deref(), Some("generic"));
    // The gpu agent is full: `both` waits for it rather than spilling to the generic agent.
    assert_eq!(who(&assigned, "both"), None);
    assert_eq!(
        w.reason("b", "both").as_deref(),
        Some("all agents with labels [linux, gpu] are busy (1/1 slots in use)")
    );
}

#[test]
fn labels_fall_back_to_a_generic_agent() {
    let mut w = World::new();
    w.agent("g", &[], 1, "");
    w.agent("arm", &["arm"], 1, "");
    w.build("b", vec![on("cuda", &["gpu"])]);
    let assigned = w.settle();
    assert_eq!(assigned, vec![("cuda".into(), 1, "g".into())]);
}

#[test]
fn strict_labels_never_fall_back_to_a_generic_agent() {
    let mut w = World::new();
    w.agent("g", &[], 1, "");
    let strict = JobPlan {
        runs_on_strict: true,
        ..on("cuda", &["gpu"])
    };
    w.build("b", vec![strict]);
    assert!(w.settle().is_empty());
    assert_eq!(
        w.reason("b", "cuda").as_deref(),
        Some(
            "no connected agent has labels [gpu] (the job's `runs-on` says `fallback: false`: \
             generic agents do not take it)"
        )
    );
    w.agent("gpu", &["gpu"], 1, "");
    assert_eq!(w.settle(), vec![("cuda".into(), 1, "gpu".into())]);
}

#[test]
fn with_neither_labelled_nor_generic_agent_the_job_waits_and_says_why() {
    let mut w = World::new();
    w.agent("arm", &["arm"], 2, "");
    w.build("b", vec![on("cuda", &["gpu"]), job("plain")]);
    let assigned = w.settle();
    // A job without runs-on takes any agent when there is no generic one.
    assert_eq!(assigned, vec![("plain".into(), 1, "arm".into())]);
    assert_eq!(w.phase("b", "cuda"), Some((1, JobPhase::Queued)));
    assert_eq!(
        w.reason("b", "cuda").as_deref(),
        Some("no connected agent has labels [gpu]; no generic agent connected")
    );
    // A draining generic agent is mentioned, and still gets nothing.
    w.agent("g", &[], 1, "");
    w.heartbeat("g", "s1", &[], true);
    assert!(w.decide().is_empty());
    assert_eq!(
        w.reason("b", "cuda").as_deref(),
        Some("no connected agent has labels [gpu]; no generic agent connected (1 agent draining)")
    );
    // When a generic agent comes, the job goes there.
    w.agent("g2", &[], 1, "");
    assert_eq!(w.settle(), vec![("cuda".into(), 1, "g2".into())]);
    assert_eq!(
        w.reason("b", "cuda").as_deref(),
        Some("assigned to agent g2, not started yet")
    );
}

#[test]
fn plain_jobs_prefer_generic_agents_and_spread_by_free_slots() {
    let mut w = World::new();
    w.agent("a", &[], 2, "");
    w.agent("b", &[], 3, "");
    w.agent("gpu", &["gpu"], 8, "");
    w.build("x", (0..5).map(|i| job(&format!("j{i}"))).collect());
    let assigned = w.settle();
    let agents: Vec<&str> = assigned.iter().map(|(_, _, a)| a.as_str()).collect();
    // b (3 free), then a and b tie at 2 -> a, then b, then a and b tie at 1 -> a.
    assert_eq!(agents, vec!["b", "a", "b", "a", "b"]);
}

#[test]
fn capacity_is_never_exceeded() {
    let mut w = World::new();
    w.agent("a", &[], 2, "");
    w.build("x", (0..4).map(|i| job(&format!("j{i}"))).collect());
    assert_eq!(w.settle().len(), 2);
    assert_eq!(w.state.busy_slots("a"), 2);
    assert_eq!(
        w.reason("x", "j2").as_deref(),
        Some("all generic agents are busy (2/2 slots in use)")
    );
    w.start("x", "j0", 1, "a");
    w.finish("x", "j0", 1, Status::Succeeded);
    assert_eq!(w.settle(), vec![("j2".into(), 1, "a".into())]);
    assert_eq!(w.state.busy_slots("a"), 2);
}

#[test]
fn project_concurrency_is_capped_across_agents_and_builds() {
    let mut w = World::new();
    w.push_in(
        "t",
        "",
        "",
        Payload::ProjectCreated(ProjectCreated {
            tenant: "t".into(),
            name: "p".into(),
            max_concurrent_jobs: 2,
            ..ProjectCreated::default()
        }),
    );
    w.agent("a", &[], 4, "");
    w.agent("b", &[], 4, "");
    w.build("x", vec![job("j0"), job("j1")]);
    w.build("y", vec![job("j0")]);
    w.build_in("t", "other", "z", vec![job("j0")]);
    let assigned = w.settle();
    assert_eq!(assigned.len(), 3, "{assigned:?}");
    assert_eq!(w.phase("y", "j0"), Some((1, JobPhase::Queued)));
    assert_eq!(w.phase("z", "j0"), Some((1, JobPhase::Assigned)));
    assert_eq!(
        w.reason("y", "j0").as_deref(),
        Some("project p is at its limit of 2 concurrent jobs")
    );
}

#[test]
fn draining_revoked_disconnected_and_unregistered_agents_get_nothing() {
    let mut w = World::new();
    w.agent("drain", &[], 4, "");
    w.agent("revoked", &[], 4, "");
    w.push(
        "",
        Payload::AgentRevoked(AgentRevoked {
            agent_id: "revoked".into(),
        }),
    );
    w.agent("gone", &[], 4, "");
    w.push(
        "",
        Payload::AgentDisconnected(AgentDisconnected {
            agent_id: "gone".into(),
            session_id: "s1".into(),
            reason: "eof".into(),
        }),
    );
    w.connect("stranger", "s1"); // connected, never registered
    w.agent("silent", &[], 4, "");
    w.now += 11 * S; // no heartbeat since connecting: lost
    w.heartbeat("drain", "s1", &[], true);
    w.heartbeat("stranger", "s1", &[], false);
    w.build("x", vec![job("j")]);
    assert!(w.settle().is_empty());
    assert_eq!(
        w.reason("x", "j").as_deref(),
        Some("no agent connected (1 agent draining, 1 agent not responding)")
    );
    // A revoked agent stays revoked whatever it does.
    w.connect("revoked", "s2");
    w.heartbeat("revoked", "s2", &[], false);
    assert!(w.settle().is_empty());
    // Reconnecting ends draining (a new agent process).
    w.connect("drain", "s2");
    assert_eq!(w.settle(), vec![("j".into(), 1, "drain".into())]);
}

#[test]
fn an_agent_the_autoscaler_drains_gets_nothing_whatever_its_heartbeats_say() {
    let mut w = World::new();
    w.agent("pool-1", &[], 2, "");
    w.push(
        "",
        Payload::AgentDraining(tributary_proto::events::AgentDraining {
            request_id: "as-small-0".into(),
            agent_id: "pool-1".into(),
            reason: "idle".into(),
        }),
    );
    // Its heartbeats do not know yet, and it even reconnects: it still gets no work.
    w.heartbeat("pool-1", "s1", &[], false);
    w.connect("pool-1", "s2");
    w.build("x", vec![job("j")]);
    assert!(w.settle().is_empty());
    assert_eq!(
        w.reason("x", "j").as_deref(),
        Some("no agent connected (1 agent draining)")
    );
    // Another agent takes the job.
    w.agent("other", &[], 1, "");
    assert_eq!(w.settle(), vec![("j".into(), 1, "other".into())]);
}

#[test]
fn a_stale_disconnect_or_heartbeat_does_not_touch_the_new_session() {
    let mut w = World::new();
    w.agent("a", &[], 1, "");
    w.connect("a", "s2");
    w.push(
        "",
        Payload::AgentDisconnected(AgentDisconnected {
            agent_id: "a".into(),
            session_id: "s1".into(),
            reason: String::new(),
        }),
    );
    w.heartbeat("a", "s1", &[], true); // old session: ignored
    let agent = &w.state.agents["a"];
    assert!(agent.connected && !agent.draining);
    w.build("x", vec![job("j")]);
    assert_eq!(w.settle().len(), 1);
}

#[test]
fn connecting_agents_report_labels_and_capacity() {
    let mut w = World::new();
    w.agent("a", &[], 1, "");
    w.push(
        "",
        Payload::AgentConnected(AgentConnected {
            agent_id: "a".into(),
            labels: vec!["gpu".into()],
            capacity: 3,
            session_id: "s2".into(),
            containers: true,
            engine: "docker 27.0 (API 1.46)".into(),
        }),
    );
    let agent = &w.state.agents["a"];
    assert_eq!(
        (agent.labels.clone(), agent.capacity, agent.containers),
        (vec!["gpu".to_string()], 3, true)
    );
    assert_eq!(agent.engine, "docker 27.0 (API 1.46)");
    // A reconnect without a container engine takes the capability away.
    w.push(
        "",
        Payload::AgentConnected(AgentConnected {
            agent_id: "a".into(),
            capacity: 3,
            session_id: "s3".into(),
            ..AgentConnected::default()
        }),
    );
    assert!(!w.state.agents["a"].containers);
}

#[test]
fn image_jobs_go_only_to_agents_that_run_containers() {
    let mut w = World::new();
    w.agent("host", &[], 4, "");
    w.agent_with("box", &[], 1, "", true);
    w.build(
        "b",
        vec![
            boxed("img1", "localhost/ci-busybox"),
            job("plain"),
            boxed("img2", "localhost/ci-busybox"),
        ],
    );
    let assigned = w.settle();
    assert_eq!(who(&assigned, "img1").as_deref(), Some("box"));
    assert_eq!(who(&assigned, "plain").as_deref(), Some("host"));
    // The only container agent is full: img2 waits for it, not for the host agent's free slots.
    assert_eq!(who(&assigned, "img2"), None);
    assert_eq!(
        w.reason("b", "img2").as_deref(),
        Some("all generic agents that can run containers are busy (1/1 slots in use)")
    );
}

#[test]
fn an_image_job_waits_until_an_agent_can_run_containers() {
    let mut w = World::new();
    w.agent("host", &[], 2, "");
    w.build(
        "b",
        vec![boxed("img", "localhost/ci-busybox"), job("plain")],
    );
    assert_eq!(w.settle(), vec![("plain".into(), 1, "host".into())]);
    assert_eq!(w.phase("b", "img"), Some((1, JobPhase::Queued)));
    assert_eq!(
        w.reason("b", "img").as_deref(),
        Some(
            "needs an agent that can run containers (image localhost/ci-busybox); no connected \
             agent has a container engine: start one with `tributary agent --engine \
             unix:///run/podman/podman.sock`"
        )
    );
    // Labels do not make a host agent eligible either.
    w.agent("gpu", &["gpu"], 2, "");
    assert!(w.settle().is_empty());
    w.agent_with("box", &["gpu"], 1, "", true);
    assert_eq!(w.settle(), vec![("img".into(), 1, "box".into())]);
}

#[test]
fn heartbeats_keep_a_lease_alive_and_silence_expires_it() {
    let mut w = World::new();
    w.config.agent_ttl_us = 60 * S; // isolate lease expiry from agent loss
    w.agent("a", &[], 1, "");
    w.agent("b", &[], 1, "");
    w.build("x", vec![job("j")]);
    assert_eq!(w.settle(), vec![("j".into(), 1, "a".into())]);
    let lease = lease_id_for("x", "j", 1);
    w.start("x", "j", 1, "a");
    for _ in 0..10 {
        w.now += 5 * S;
        w.heartbeat("a", "s1", &[&lease], false);
        w.heartbeat("b", "s1", &[], false);
        assert!(w.decide().is_empty());
    }
    // Heartbeats of another session or agent do not renew it.
    w.now += 6 * S;
    w.heartbeat("b", "s1", &[&lease], false);
    w.heartbeat("a", "old", &[&lease], false);
    w.now += 5 * S;
    w.heartbeat("b", "s1", &[], false);
    assert_eq!(
        w.decide(),
        vec![ClusterDecision::Requeue {
            build: "x".into(),
            job: "j".into(),
            attempt: 1,
            agent_id: "a".into(),
            lease_id: lease.clone(),
            reason: "lease expired: no heartbeat from agent a for 11s".into(),
        }]
    );
    // The agent heartbeats but without the lease.
    let mut w2 = World::new();
    w2.agent("a", &[], 1, "");
    w2.build("x", vec![job("j")]);
    w2.settle();
    w2.now += 6 * S;
    w2.heartbeat("a", "s1", &[], false);
    w2.now += 6 * S;
    w2.heartbeat("a", "s1", &[], false);
    let d = w2.decide();
    assert!(
        matches!(&d[..], [ClusterDecision::Requeue { reason, .. }]
            if reason == "lease expired: agent a has not reported it for 12s"),
        "{d:?}"
    );
}

#[test]
fn an_expired_lease_is_requeued_and_the_old_attempt_is_fenced_off() {
    let mut w = World::new();
    w.agent("a", &[], 1, "");
    w.build(
        "x",
        vec![
            job("j"),
            JobPlan {
                needs: vec!["j".into()],
                ..job("after")
            },
        ],
    );
    assert_eq!(w.settle(), vec![("j".into(), 1, "a".into())]);
    w.start("x", "j", 1, "a");
    w.now += 11 * S;
    w.agent("b", &[], 1, "");
    let d = w.step();
    assert!(
        matches!(&d[..], [ClusterDecision::Requeue { attempt: 1, reason, .. }]
            if reason == "agent a lost: no heartbeat for 11s"),
        "{d:?}"
    );
    assert!(w.state.leases.is_empty());
    // The old agent reports late, before the next attempt is even queued: ignored.
    w.start("x", "j", 1, "a");
    w.finish("x", "j", 1, Status::Succeeded);
    assert_eq!(w.phase("x", "j"), Some((1, JobPhase::Running)));
    assert!(w
        .reason("x", "j")
        .unwrap()
        .contains("attempt 2 is about to be queued"));
    // Queued and, with agent b free, leased in the same round (one append).
    let d = w.step();
    assert!(
        matches!(&d[..], [
            ClusterDecision::Queue { job, attempt: 2, .. },
            ClusterDecision::Assign { job: assigned, attempt: 2, agent_id, .. },
        ] if job == "j" && assigned == "j" && agent_id == "b"),
        "{d:?}"
    );
    // ...and after it: still ignored.
    w.finish("x", "j", 1, Status::Succeeded);
    assert_eq!(w.phase("x", "j"), Some((2, JobPhase::Assigned)));
    assert_eq!(
        w.state.leases[&("x".to_string(), "j".to_string())].agent_id,
        "b"
    );
    w.start("x", "j", 2, "b");
    w.finish("x", "j", 2, Status::Succeeded);
    assert_eq!(w.settle(), vec![("after".into(), 1, "b".into())]);
    assert_eq!(w.state.build_info["x"].jobs["j"].requeues, 1);
}

#[test]
fn duplicate_and_stale_requeues_are_ignored() {
    let mut w = World::new();
    w.agent("a", &[], 1, "");
    w.build("x", vec![job("j")]);
    w.settle();
    let requeue = |attempt| {
        Payload::JobRequeued(JobRequeued {
            job: "j".into(),
            attempt,
            agent_id: "a".into(),
            lease_id: String::new(),
            reason: "r".into(),
        })
    };
    w.push("x", requeue(2));
    assert_eq!(w.state.leases.len(), 1);
    w.push("x", requeue(1));
    w.push("x", requeue(1));
    assert_eq!(w.state.build_info["x"].jobs["j"].requeues, 1);
    // A second assignment of the requeued attempt is ignored like any second assignment.
    w.push(
        "x",
        Payload::JobAssigned(JobAssigned {
            job: "j".into(),
            attempt: 1,
            agent_id: "a".into(),
            lease_id: "l2".into(),
            deadline_us: w.now + 10 * S,
        }),
    );
    assert!(w.state.leases.is_empty());
}

#[test]
fn revoked_and_disconnected_agents_lose_their_leases() {
    let mut w = World::new();
    w.agent("a", &[], 1, "");
    w.agent("b", &[], 1, "");
    w.build("x", vec![job("j0"), job("j1")]);
    w.settle();
    w.push(
        "",
        Payload::AgentRevoked(AgentRevoked {
            agent_id: "a".into(),
        }),
    );
    w.push(
        "",
        Payload::AgentDisconnected(AgentDisconnected {
            agent_id: "b".into(),
            session_id: "s1".into(),
            reason: "connection reset".into(),
        }),
    );
    let reasons: Vec<String> = w
        .step()
        .into_iter()
        .filter_map(|d| match d {
            ClusterDecision::Requeue { reason, .. } => Some(reason),
            _ => None,
        })
        .collect();
    assert_eq!(
        reasons,
        vec![
            "agent a was revoked",
            "agent b disconnected: connection reset"
        ]
    );
}

#[test]
fn a_draining_agent_keeps_running_jobs_and_gives_back_unstarted_ones() {
    let mut w = World::new();
    w.agent("a", &[], 2, "");
    w.build("x", vec![job("run"), job("wait")]);
    w.settle();
    w.start("x", "run", 1, "a");
    w.heartbeat("a", "s1", &[], true);
    let d = w.step();
    assert!(
        matches!(&d[..], [ClusterDecision::Requeue { job, reason, .. }]
            if job == "wait" && reason == "agent a is draining and had not started the job"),
        "{d:?}"
    );
    // Requeued: it waits for another agent now.
    assert_eq!(w.step().len(), 1); // Queue attempt 2
    assert!(w.decide().is_empty());
    assert_eq!(w.phase("x", "run"), Some((1, JobPhase::Running)));
}

#[test]
fn too_many_lost_agents_fail_the_job() {
    let mut w = World::new();
    w.config.max_requeues = 2;
    w.agent("a", &[], 1, "");
    w.build("x", vec![job("j")]);
    let mut last = Vec::new();
    for round in 0..3 {
        let assigned = w.settle();
        assert_eq!(assigned, vec![("j".into(), round + 1, "a".into())]);
        w.now += 11 * S;
        w.connect("a", &format!("s{round}"));
        last = w.step();
    }
    assert_eq!(
        last,
        vec![ClusterDecision::FailJob {
            build: "x".into(),
            job: "j".into(),
            attempt: 3,
            agent_id: "a".into(),
            lease_id: lease_id_for("x", "j", 3),
            // The agent reconnected (a new process) without the lease.
            reason: "agent lost 3 times (requeued 2 times, the limit); last: lease expired: \
                     agent a has not reported it for 11s"
                .into(),
        }]
    );
    w.settle();
    assert_eq!(w.build_finished("x"), Some(Status::Failed));
}

#[test]
fn requeues_do_not_use_up_retries() {
    let mut w = World::new();
    w.agent("a", &[], 1, "");
    w.build(
        "x",
        vec![JobPlan {
            retry: 1,
            ..job("j")
        }],
    );
    w.settle();
    w.now += 11 * S;
    w.connect("a", "s2");
    w.settle(); // requeue, queue 2, assign 2
    w.start("x", "j", 2, "a");
    w.finish("x", "j", 2, Status::Failed);
    assert_eq!(w.settle(), vec![("j".into(), 3, "a".into())]);
    w.start("x", "j", 3, "a");
    w.finish("x", "j", 3, Status::Failed);
    assert!(w.settle().is_empty());
    assert_eq!(w.build_finished("x"), Some(Status::Failed));
}

#[test]
fn the_server_times_out_a_job_its_agent_did_not_stop() {
    let mut w = World::new();
    w.agent("a", &[], 1, "");
    w.build(
        "x",
        vec![
            JobPlan {
                timeout_secs: 60,
                ..job("j")
            },
            job("other"),
        ],
    );
    w.settle();
    w.start("x", "j", 1, "a");
    let lease = lease_id_for("x", "j", 1);
    let started = w.now;
    while w.now < started + 90 * S {
        w.now += 5 * S;
        w.heartbeat("a", "s1", &[&lease], false);
        assert!(w.decide().is_empty(), "at {}s", (w.now - started) / S);
    }
    w.now += S;
    let d = w.decide();
    assert_eq!(
        d,
        vec![ClusterDecision::TimeOut {
            build: "x".into(),
            job: "j".into(),
            attempt: 1,
            agent_id: "a".into(),
            lease_id: lease,
            duration_us: 91_000_000,
            reason: "timed out after 60s (agent a did not stop the job within 30s; ended by the \
                     server)"
                .into(),
        }]
    );
    assert!(matches!(
        d[0].payload(),
        Payload::JobFinished(JobFinished { status, .. }) if status == Status::TimedOut as i32
    ));
    w.step();
    // The slot is free again: the other job runs.
    assert_eq!(w.settle(), vec![("other".into(), 1, "a".into())]);
}

#[test]
fn canceling_a_build_tells_the_agent_and_finishes_it() {
    let mut w = World::new();
    w.agent("a", &[], 1, "");
    w.build(
        "x",
        vec![
            job("run"),
            job("queued"),
            JobPlan {
                needs: vec!["run".into()],
                ..job("later")
            },
        ],
    );
    w.settle();
    w.start("x", "run", 1, "a");
    assert_eq!(w.phase("x", "queued"), Some((1, JobPhase::Queued)));
    let lease = lease_id_for("x", "run", 1);
    assert!(leases_to_cancel(&w.state, "a", std::slice::from_ref(&lease)).is_empty());
    w.push(
        "x",
        Payload::BuildCanceled(BuildCanceled {
            who: "me".into(),
            reason: String::new(),
        }),
    );
    assert_eq!(
        leases_to_cancel(&w.state, "a", std::slice::from_ref(&lease)),
        vec![lease.clone()]
    );
    assert!(leases_to_cancel(&w.state, "b", &[]).is_empty());
    let d = w.step();
    // Queued and waiting jobs are canceled with their own attempt, so the fold takes them.
    assert_eq!(
        d.iter()
            .map(|d| d.job_id().unwrap_or_default())
            .collect::<Vec<_>>(),
        vec!["queued", "later"]
    );
    assert_eq!(
        w.phase("x", "queued"),
        Some((1, JobPhase::Done(Status::Canceled)))
    );
    assert!(w.decide().is_empty());
    // The agent stops the job.
    w.finish("x", "run", 1, Status::Canceled);
    w.settle();
    assert_eq!(w.build_finished("x"), Some(Status::Canceled));
    assert!(w.state.leases.is_empty() && w.state.build_info.is_empty());
}

#[test]
fn a_canceled_job_whose_agent_does_not_stop_is_given_up() {
    let mut w = World::new();
    w.agent("a", &[], 1, "");
    w.agent("b", &[], 1, "");
    w.build("x", vec![job("j0"), job("j1")]);
    w.settle();
    w.start("x", "j0", 1, "a");
    w.start("x", "j1", 1, "b");
    w.push("x", Payload::BuildCanceled(BuildCanceled::default()));
    // b vanishes: its job is finished as canceled, not requeued.
    w.push(
        "",
        Payload::AgentDisconnected(AgentDisconnected {
            agent_id: "b".into(),
            session_id: "s1".into(),
            reason: String::new(),
        }),
    );
    let d = w.step();
    assert!(
        matches!(&d[..], [ClusterDecision::Finish { job, status: Status::Canceled, attempt: 1, .. }] if job == "j1"),
        "{d:?}"
    );
    let lease = lease_id_for("x", "j0", 1);
    w.now += 20 * S;
    w.heartbeat("a", "s1", &[&lease], false);
    assert!(w.decide().is_empty());
    w.now += 11 * S;
    w.heartbeat("a", "s1", &[&lease], false);
    let d = w.settle();
    assert!(d.is_empty());
    assert_eq!(w.build_finished("x"), Some(Status::Canceled));
    let reason = w.log.iter().find_map(|e| match &e.payload {
        Some(Payload::JobFinished(f)) if f.job == "j0" => Some(f.reason.clone()),
        _ => None,
    });
    assert_eq!(
        reason.as_deref(),
        Some("build canceled; agent a did not stop the job within 30s")
    );
}

#[test]
fn an_unstarted_job_of_a_canceled_build_is_finished_at_once() {
    let mut w = World::new();
    w.agent("a", &[], 1, "");
    w.build("x", vec![job("j")]);
    w.settle();
    w.push("x", Payload::BuildCanceled(BuildCanceled::default()));
    let d = w.step();
    assert!(
        matches!(&d[..], [ClusterDecision::Finish { attempt: 1, status: Status::Canceled, reason, .. }]
            if reason == "build canceled before the job started"),
        "{d:?}"
    );
    // A start that crossed the cancel is ignored; the agent is told to stop.
    w.start("x", "j", 1, "a");
    let lease = lease_id_for("x", "j", 1);
    assert_eq!(
        leases_to_cancel(&w.state, "a", std::slice::from_ref(&lease)),
        vec![lease]
    );
    w.settle();
    assert_eq!(w.build_finished("x"), Some(Status::Canceled));
}

#[test]
fn a_requeued_job_of_a_canceled_build_is_finished() {
    let mut w = World::new();
    w.agent("a", &[], 1, "");
    w.build("x", vec![job("j")]);
    w.settle();
    w.push(
        "x",
        Payload::JobRequeued(JobRequeued {
            job: "j".into(),
            attempt: 1,
            agent_id: "a".into(),
            lease_id: lease_id_for("x", "j", 1),
            reason: "test".into(),
        }),
    );
    w.push("x", Payload::BuildCanceled(BuildCanceled::default()));
    w.settle();
    assert_eq!(w.build_finished("x"), Some(Status::Canceled));
}

#[test]
fn agents_are_told_to_stop_leases_that_are_not_theirs_any_more() {
    let mut w = World::new();
    w.agent("a", &[], 1, "");
    w.build("x", vec![job("j")]);
    w.settle();
    let lease = lease_id_for("x", "j", 1);
    assert!(leases_to_cancel(&w.state, "a", std::slice::from_ref(&lease)).is_empty());
    assert_eq!(
        leases_to_cancel(&w.state, "intruder", std::slice::from_ref(&lease)),
        vec![lease.clone()]
    );
    assert_eq!(
        leases_to_cancel(&w.state, "a", &["nope".into()]),
        vec!["nope".to_string()]
    );
    let (key, l) = w.state.lease(&lease).expect("live lease");
    assert_eq!((key.1.as_str(), l.agent_id.as_str()), ("j", "a"));
    assert_eq!(w.state.agent_leases("a").count(), 1);
    assert_eq!(w.state.job_plan("x", "j").map(|p| p.id.as_str()), Some("j"));
}

#[test]
fn tenants_are_isolated() {
    let mut w = World::new();
    w.agent("mine", &[], 1, "acme");
    w.build_in("other", "p", "x", vec![job("j")]);
    assert!(w.settle().is_empty());
    assert_eq!(w.reason("x", "j").as_deref(), Some("no agent connected"));
    w.build_in("acme", "p", "y", vec![job("j")]);
    assert_eq!(w.settle(), vec![("j".into(), 1, "mine".into())]);
    w.agent("shared", &[], 1, "");
    assert_eq!(w.settle(), vec![("j".into(), 1, "shared".into())]);
    assert_eq!(w.phase("x", "j"), Some((1, JobPhase::Assigned)));
}

#[test]
fn a_job_started_without_assignment_is_watched_too() {
    let mut w = World::new();
    w.agent("a", &[], 1, "");
    w.build("x", vec![job("j")]);
    w.step(); // queue only
    w.start("x", "j", 1, "a");
    assert_eq!(w.state.busy_slots("a"), 1);
    w.now += 11 * S;
    assert!(matches!(&w.decide()[..], [ClusterDecision::Requeue { .. }]));
}

#[test]
fn waiting_jobs_name_their_needs() {
    let mut w = World::new();
    w.build(
        "x",
        vec![
            job("a"),
            JobPlan {
                needs: vec!["a".into()],
                ..job("b")
            },
        ],
    );
    w.settle();
    assert_eq!(w.reason("x", "b").as_deref(), Some("waiting for a"));
    assert_eq!(w.reason("x", "a").as_deref(), Some("no agent connected"));
    assert_eq!(w.reason("x", "nope"), None);
    assert_eq!(w.reason("nope", "a"), None);
    let all = waiting_reasons(&w.state, "x", w.now, &w.config);
    assert_eq!(all.len(), 2);
}

#[test]
fn builds_are_served_in_trigger_order() {
    let mut w = World::new();
    w.build("z-first", vec![job("j")]);
    w.build("a-second", vec![job("j")]);
    w.step();
    w.agent("a", &[], 1, "");
    let d = w.decide();
    assert!(
        matches!(&d[..], [ClusterDecision::Assign { build, .. }] if build == "z-first"),
        "{d:?}"
    );
    assert_eq!(
        w.reason("a-second", "j").as_deref(),
        Some("all generic agents are busy (1/1 slots in use)")
    );
}

#[test]
fn a_long_queue_with_every_slot_taken_proposes_nothing_and_still_says_why() {
    let mut w = World::new();
    w.agent("a", &[], 2, "");
    let builds: Vec<String> = (0..50).map(|i| format!("b{i:02}")).collect();
    for b in &builds {
        w.build(b, vec![job("j")]);
    }
    w.step(); // queues all 50, leases two
    let leased: Vec<&String> = builds
        .iter()
        .filter(|b| w.phase(b, "j") == Some((1, JobPhase::Assigned)))
        .collect();
    assert_eq!(
        leased,
        [&builds[0], &builds[1]],
        "the first two in trigger order"
    );
    assert!(
        w.decide().is_empty(),
        "every slot is taken: nothing to decide"
    );
    assert_eq!(
        w.reason("b49", "j").as_deref(),
        Some("all generic agents are busy (2/2 slots in use)"),
        "get still explains (the scheduler's round skips that work)"
    );
    // A slot frees: the next build in trigger order gets it.
    w.start("b00", "j", 1, "a");
    w.finish("b00", "j", 1, Status::Succeeded);
    let d = w.decide();
    assert!(
        d.iter()
            .any(|d| matches!(d, ClusterDecision::Assign { build, .. } if build == "b02")),
        "{d:?}"
    );
}

fn waits(decisions: &[ClusterDecision]) -> Vec<(String, String)> {
    decisions
        .iter()
        .filter_map(|d| match d {
            ClusterDecision::Wait { job, reason, .. } => Some((job.clone(), reason.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn waiting_reasons_go_on_the_log_once_per_change_not_once_per_round() {
    let mut w = World::new();
    w.build("b", vec![on("g", &["gpu"]), job("plain")]);
    let first = w.step_noting();
    assert!(
        waits(&first).is_empty(),
        "queued this round: recorded next round"
    );
    assert_eq!(
        waits(&w.step_noting()),
        [
            (
                "g".to_owned(),
                "no connected agent has labels [gpu]; no generic agent connected".to_owned()
            ),
            ("plain".to_owned(), "no agent connected".to_owned())
        ]
    );
    for _ in 0..10 {
        assert!(
            w.step_noting().is_empty(),
            "the same reasons: nothing to append"
        );
        w.now += S;
    }
    // The scheduler's fold remembers them; a replay of the log too.
    let mut replay = ClusterState::new();
    for (i, e) in w.log.iter().enumerate() {
        replay.apply(i as u64, e);
    }
    assert_eq!(replay, w.state);

    // An agent with one slot: the labelled job falls back to it, the other waits for the slot.
    w.agent("a", &[], 1, "");
    let d = w.step_noting();
    assert!(d.iter().any(
        |d| matches!(d, ClusterDecision::Assign { job, agent_id, .. } if job == "g" && agent_id == "a")
    ));
    assert_eq!(
        waits(&d),
        [(
            "plain".to_owned(),
            "all generic agents are busy (1/1 slots in use)".to_owned()
        )]
    );
    assert!(w.step_noting().is_empty());
    assert!(
        w.decide().is_empty(),
        "decide_cluster never proposes a Wait"
    );

    // The slot frees: the waiting job is assigned, and says nothing more.
    w.start("b", "g", 1, "a");
    w.finish("b", "g", 1, Status::Succeeded);
    let d = w.step_noting();
    assert!(waits(&d).is_empty(), "{d:?}");
    assert!(d
        .iter()
        .any(|d| matches!(d, ClusterDecision::Assign { job, .. } if job == "plain")));
}

#[test]
fn a_long_queue_with_every_slot_taken_records_each_jobs_reason_once() {
    let mut w = World::new();
    w.agent("a", &[], 2, "");
    for i in 0..50 {
        w.build(&format!("b{i:02}"), vec![job("j")]);
    }
    w.step_noting(); // queues all 50, leases two
    let d = w.step_noting();
    let recorded = waits(&d);
    assert_eq!(recorded.len(), 48, "{d:?}");
    assert!(recorded
        .iter()
        .all(|(_, r)| r == "all generic agents are busy (2/2 slots in use)"));
    assert_eq!(d.len(), 48, "nothing but the reasons");
    for _ in 0..5 {
        assert!(w.step_noting().is_empty());
    }
    // A second agent: capacity changes the reason of those still waiting, once.
    w.agent("c", &[], 1, "");
    let d = w.step_noting();
    assert_eq!(waits(&d).len(), 47, "{d:?}");
    assert!(waits(&d)
        .iter()
        .all(|(_, r)| r == "all generic agents are busy (3/3 slots in use)"));
    assert!(w.step_noting().is_empty());
    // The log holds one JobWaiting per job and change.
    let on_log = w
        .log
        .iter()
        .filter(|e| matches!(e.payload, Some(Payload::JobWaiting(_))))
        .count();
    assert_eq!(on_log, 48 + 47);
}

proptest! {
    /// Deciding is a pure function of the folded log, and every decision is one event: once
    /// folded, deciding again at the same time never repeats it.
    #[test]
    fn decisions_are_deterministic_and_never_repeat(
        caps in proptest::collection::vec(0u32..3, 0..4),
        jobs in 1usize..6,
        gpu_mask in any::<u8>(),
        container_mask in any::<u8>(),
        image_mask in any::<u8>(),
        silent_secs in 0i64..25,
    ) {
        let mut w = World::new();
        for (i, cap) in caps.iter().enumerate() {
            let labels: &[&str] = if i % 2 == 1 { &["gpu"] } else { &[] };
            w.agent_with(&format!("a{i}"), labels, *cap, "", container_mask >> i & 1 == 1);
        }
        let plan: Vec<JobPlan> = (0..jobs)
            .map(|i| {
                let mut j = if gpu_mask >> i & 1 == 1 { on(&format!("j{i}"), &["gpu"]) } else { job(&format!("j{i}")) };
                if image_mask >> i & 1 == 1 {
                    j.image = "localhost/ci-busybox".into();
                }
                j
            })
            .collect();
        let images: std::collections::BTreeSet<String> =
            plan.iter().filter(|j| !j.image.is_empty()).map(|j| j.id.clone()).collect();
        w.build("x", plan);
        let assigned = w.settle();
        // Container jobs only ever go to agents that can run containers.
        for (job, _, agent) in &assigned {
            if images.contains(job) {
                prop_assert!(w.state.agents[agent].containers, "{} went to {}", job, agent);
            }
        }
        w.now += silent_secs * S;
        for _ in 0..20 {
            let first = w.decide();
            prop_assert_eq!(&first, &w.decide());
            let mut replay = ClusterState::new();
            for (i, e) in w.log.iter().enumerate() {
                replay.apply(i as u64, e);
            }
            prop_assert_eq!(&replay, &w.state);
            if first.is_empty() {
                break;
            }
            w.step();
            for d in w.decide() {
                prop_assert!(!first.contains(&d), "{:?} repeated", d);
            }
        }
        for (id, agent) in &w.state.agents {
            prop_assert!(w.state.busy_slots(id) <= agent.capacity as usize);
        }
    }
}

fn uploaded(job: &str, attempt: u32, path: &str, sha: &str) -> Payload {
    Payload::ArtifactUploaded(ArtifactUploaded {
        job: job.into(),
        attempt,
        path: path.into(),
        size: 1,
        sha256: sha.into(),
        object_key: format!("artifacts/t/p/b/{job}/{path}"),
    })
}

/// A lease of `test` carries the artifacts of the attempt of `build` that succeeded: a failed
/// attempt's uploads are replaced by the retry's, the same path twice counts once.
#[test]
fn needed_artifacts_are_the_current_attempts() {
    let mut w = World::new();
    w.agent("a", &[], 4, "");
    let mut build = job("build");
    build.retry = 1;
    let mut test = job("test");
    test.needs = vec!["build".into()];
    w.build("b", vec![build, test]);
    w.settle();
    w.start("b", "build", 1, "a");
    w.push("b", uploaded("build", 1, "app.tar", "old"));
    w.finish("b", "build", 1, Status::Failed);
    w.settle();
    assert_eq!(w.phase("b", "build").map(|p| p.0), Some(2));
    w.start("b", "build", 2, "a");
    // A late upload of the failed attempt is not taken.
    w.push("b", uploaded("build", 1, "late.tar", "x"));
    w.push("b", uploaded("build", 2, "app.tar", "first"));
    w.push("b", uploaded("build", 2, "app.tar", "new"));
    w.push("b", uploaded("build", 2, "lib/x.so", "so"));
    w.finish("b", "build", 2, Status::Succeeded);
    w.settle();
    let got: Vec<(String, String)> = w
        .state
        .needed_artifacts("b", "test")
        .into_iter()
        .map(|a| (a.path, a.sha256))
        .collect();
    assert_eq!(
        got,
        [
            ("app.tar".to_owned(), "new".to_owned()),
            ("lib/x.so".to_owned(), "so".to_owned())
        ]
    );
    assert!(w.state.needed_artifacts("b", "build").is_empty());
}
