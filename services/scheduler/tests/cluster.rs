//! Simulations of the cluster scheduler through its public API: a driver that appends every
//! decision as an event, and agents that connect, heartbeat, drain, vanish, get revoked, run
//! their leases and report (sometimes too late) — while the clock moves on.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use tributary_proto::events::{
    envelope::Payload, AgentConnected, AgentDisconnected, AgentHeartbeat, AgentRegistered,
    AgentRevoked, BuildCanceled, BuildQueued, BuildTriggered, Envelope, JobFinished, JobPlan,
    JobStarted, Plan, ProjectCreated, Status,
};
use tributary_scheduler::cluster::{
    decide_cluster_noting_waits, leases_to_cancel, waiting_reason, ClusterConfig, ClusterDecision,
    ClusterState,
};
use tributary_scheduler::JobPhase;

const S: i64 = 1_000_000;
const TENANTS: [&str; 2] = ["acme", "globex"];

#[derive(Clone, Debug)]
struct AgentSpec {
    tenant: &'static str,
    labels: Vec<String>,
    capacity: u32,
}

#[derive(Clone, Debug)]
struct JobSpec {
    needs: Vec<usize>,
    runs_on: Vec<String>,
    timeout_secs: u64,
    retry: u32,
    /// Ticks of work per attempt.
    ticks: u32,
    fails_first: bool,
    /// The first attempt never ends by itself (only with a timeout).
    hangs_first: bool,
}

#[derive(Clone, Debug)]
struct BuildSpec {
    tenant: &'static str,
    project: &'static str,
    jobs: Vec<JobSpec>,
    cancel_at: Option<usize>,
}

#[derive(Clone, Debug)]
enum Action {
    Connect(usize),
    Disconnect(usize),
    Heartbeat(usize),
    Drain(usize),
    Revoke(usize),
    Work(usize),
    Advance(i64),
}

struct Run {
    build: String,
    job: String,
    attempt: u32,
    ticks_left: u32,
    hangs: bool,
    fails: bool,
}

struct SimAgent {
    id: String,
    session: u32,
    connected: bool,
    draining: bool,
    revoked: bool,
    /// What the agent process runs, by lease id (it may not know a lease was taken away).
    running: BTreeMap<String, Run>,
}

struct Sim {
    state: ClusterState,
    log: Vec<Envelope>,
    now: i64,
    config: ClusterConfig,
    agents: Vec<SimAgent>,
    builds: Vec<(String, BuildSpec)>,
    limits: BTreeMap<(String, String), u32>,
    assigned: BTreeSet<(String, String, u32)>,
}

fn plan(spec: &BuildSpec) -> Plan {
    Plan {
        jobs: spec
            .jobs
            .iter()
            .enumerate()
            .map(|(i, j)| JobPlan {
                id: format!("j{i}"),
                name: format!("j{i}"),
                needs: j.needs.iter().map(|n| format!("j{n}")).collect(),
                runs_on: j.runs_on.clone(),
                timeout_secs: j.timeout_secs,
                retry: j.retry,
                ..JobPlan::default()
            })
            .collect(),
    }
}

impl Sim {
    fn new(agents: Vec<AgentSpec>, builds: Vec<BuildSpec>, limits: &[(usize, u32)]) -> Sim {
        let mut sim = Sim {
            state: ClusterState::new(),
            log: Vec::new(),
            now: 1_000 * S,
            config: ClusterConfig {
                timeout_grace_us: 5 * S,
                ..ClusterConfig::default()
            },
            agents: Vec::new(),
            builds: Vec::new(),
            limits: BTreeMap::new(),
            assigned: BTreeSet::new(),
        };
        for &(project, max) in limits {
            let key = ("acme".to_string(), format!("p{project}"));
            sim.push(
                &key.0.clone(),
                "",
                "",
                Payload::ProjectCreated(ProjectCreated {
                    tenant: key.0.clone(),
                    name: key.1.clone(),
                    max_concurrent_jobs: max,
                    ..ProjectCreated::default()
                }),
            );
            sim.limits.insert(key, max);
        }
        for (i, spec) in agents.into_iter().enumerate() {
            sim.add_agent(format!("a{i}"), spec);
        }
        for (i, spec) in builds.into_iter().enumerate() {
            let id = format!("b{i}");
            sim.push(
                spec.tenant,
                spec.project,
                &id,
                Payload::BuildTriggered(BuildTriggered::default()),
            );
            sim.push(
                spec.tenant,
                spec.project,
                &id,
                Payload::BuildQueued(BuildQueued {
                    plan: Some(plan(&spec)),
                }),
            );
            sim.builds.push((id, spec));
        }
        sim
    }

    fn add_agent(&mut self, id: String, spec: AgentSpec) {
        self.push(
            "",
            "",
            "",
            Payload::AgentRegistered(AgentRegistered {
                agent_id: id.clone(),
                name: id.clone(),
                labels: spec.labels.clone(),
                capacity: spec.capacity,
                tenant: spec.tenant.into(),
                token_sha256: String::new(),
                ..AgentRegistered::default()
            }),
        );
        self.agents.push(SimAgent {
            id,
            session: 0,
            connected: false,
            draining: false,
            revoked: false,
            running: BTreeMap::new(),
        });
    }

    fn push(&mut self, tenant: &str, project: &str, build: &str, payload: Payload) {
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

    fn push_build(&mut self, build: &str, payload: Payload) {
        let spec = &self
            .builds
            .iter()
            .find(|(id, _)| id == build)
            .expect("build")
            .1;
        let (tenant, project) = (spec.tenant, spec.project);
        self.push(tenant, project, build, payload);
    }

    fn session(&self, i: usize) -> String {
        format!("{}-s{}", self.agents[i].id, self.agents[i].session)
    }

    fn act(&mut self, action: &Action) -> Result<(), TestCaseError> {
        let n = self.agents.len();
        match *action {
            Action::Connect(i) => {
                let i = i % n;
                if self.agents[i].revoked {
                    return Ok(());
                }
                let agent = &mut self.agents[i];
                if agent.connected {
                    // A restart: the new process runs nothing.
                    agent.running.clear();
                }
                agent.session += 1;
                agent.connected = true;
                agent.draining = false;
                let (id, session) = (agent.id.clone(), self.session(i));
                self.push(
                    "",
                    "",
                    "",
                    Payload::AgentConnected(AgentConnected {
                        agent_id: id,
                        session_id: session,
                        ..AgentConnected::default()
                    }),
                );
            }
            Action::Disconnect(i) => {
                let i = i % n;
                if !self.agents[i].connected {
                    return Ok(());
                }
                // A network blip: the process keeps its jobs and may come back.
                self.agents[i].connected = false;
                let (id, session) = (self.agents[i].id.clone(), self.session(i));
                self.push(
                    "",
                    "",
                    "",
                    Payload::AgentDisconnected(AgentDisconnected {
                        agent_id: id,
                        session_id: session,
                        reason: "blip".into(),
                    }),
                );
            }
            Action::Heartbeat(i) => self.heartbeat(i % n),
            Action::Drain(i) => {
                let i = i % n;
                if self.agents[i].connected {
                    self.agents[i].draining = true;
                    self.heartbeat(i);
                }
            }
            Action::Revoke(i) => {
                let i = i % n;
                let agent = &mut self.agents[i];
                agent.revoked = true;
                agent.connected = false;
                agent.running.clear();
                let id = agent.id.clone();
                self.push(
                    "",
                    "",
                    "",
                    Payload::AgentRevoked(AgentRevoked { agent_id: id }),
                );
            }
            Action::Work(i) => self.work(i % n)?,
            Action::Advance(secs) => self.now += secs * S,
        }
        self.decide_and_append()
    }

    fn heartbeat(&mut self, i: usize) {
        if !self.agents[i].connected {
            return;
        }
        let agent = &self.agents[i];
        let leases: Vec<String> = agent.running.keys().cloned().collect();
        let payload = Payload::AgentHeartbeat(AgentHeartbeat {
            agent_id: agent.id.clone(),
            lease_ids: leases.clone(),
            draining: agent.draining,
            session_id: self.session(i),
        });
        self.push("", "", "", payload);
        // The heartbeat response: stop what is canceled or no longer ours.
        for lease in leases_to_cancel(&self.state, &self.agents[i].id, &leases) {
            if let Some(run) = self.agents[i].running.remove(&lease) {
                if self.state.lease(&lease).is_some() {
                    self.push_build(
                        &run.build.clone(),
                        Payload::JobFinished(JobFinished {
                            job: run.job,
                            attempt: run.attempt,
                            status: Status::Canceled as i32,
                            exit_code: -1,
                            duration_us: 0,
                            reason: "canceled".into(),
                            no_retry: false,
                        }),
                    );
                }
            }
        }
    }

    /// The agent picks up its new leases (pull), starts them, and advances what it runs.
    fn work(&mut self, i: usize) -> Result<(), TestCaseError> {
        if !self.agents[i].connected {
            return Ok(());
        }
        let id = self.agents[i].id.clone();
        let new: Vec<(String, String, String, u32)> = self
            .state
            .agent_leases(&id)
            .filter(|(_, l)| !self.agents[i].running.contains_key(&l.lease_id))
            .filter(|(_, l)| l.started_us.is_none())
            .map(|((b, j), l)| (l.lease_id.clone(), b.clone(), j.clone(), l.attempt))
            .collect();
        for (lease_id, build, job, attempt) in new {
            if self.agents[i].draining {
                break;
            }
            let spec = self.job_spec(&build, &job);
            self.agents[i].running.insert(
                lease_id.clone(),
                Run {
                    build: build.clone(),
                    job: job.clone(),
                    attempt,
                    ticks_left: spec.ticks,
                    hangs: spec.hangs_first && attempt == 1 && spec.timeout_secs > 0,
                    fails: spec.fails_first && attempt == 1,
                },
            );
            self.report(
                &build,
                &lease_id,
                &id,
                Payload::JobStarted(JobStarted {
                    job,
                    attempt,
                    agent_id: id.clone(),
                    lease_id: lease_id.clone(),
                    executor: "host".into(),
                }),
            )?;
        }
        let mut done = Vec::new();
        for (lease_id, run) in self.agents[i].running.iter_mut() {
            if run.hangs {
                continue;
            }
            run.ticks_left = run.ticks_left.saturating_sub(1);
            if run.ticks_left == 0 {
                done.push(lease_id.clone());
            }
        }
        for lease_id in done {
            let run = self.agents[i].running.remove(&lease_id).expect("run");
            let status = if run.fails {
                Status::Failed
            } else {
                Status::Succeeded
            };
            self.report(
                &run.build,
                &lease_id,
                &id,
                Payload::JobFinished(JobFinished {
                    job: run.job.clone(),
                    attempt: run.attempt,
                    status: status as i32,
                    exit_code: if run.fails { 1 } else { 0 },
                    duration_us: 1,
                    reason: String::new(),
                    no_retry: false,
                }),
            )?;
        }
        Ok(())
    }

    /// Appends an agent's event. The server would refuse events of a lease that is not the
    /// agent's any more; appending them anyway checks that the fold fences them off.
    fn report(
        &mut self,
        build: &str,
        lease_id: &str,
        agent: &str,
        payload: Payload,
    ) -> Result<(), TestCaseError> {
        let live = self
            .state
            .lease(lease_id)
            .is_some_and(|(_, l)| l.agent_id == agent);
        let job = match &payload {
            Payload::JobStarted(e) => e.job.clone(),
            Payload::JobFinished(e) => e.job.clone(),
            _ => unreachable!(),
        };
        let before = self.job_phase(build, &job);
        self.push_build(build, payload);
        if !live {
            prop_assert_eq!(
                before,
                self.job_phase(build, &job),
                "a fenced-off event changed {}/{}",
                build,
                job
            );
        }
        Ok(())
    }

    fn job_phase(&self, build: &str, job: &str) -> Option<(u32, JobPhase)> {
        let run = self.state.builds.builds.get(build)?;
        run.jobs
            .iter()
            .find(|j| j.id == job)
            .map(|j| (j.attempt, j.phase))
    }

    fn job_spec(&self, build: &str, job: &str) -> JobSpec {
        let spec = &self
            .builds
            .iter()
            .find(|(id, _)| id == build)
            .expect("build")
            .1;
        let i: usize = job[1..].parse().expect("job index");
        spec.jobs[i].clone()
    }

    /// One round of the scheduler service: decide, check, append.
    fn decide_and_append(&mut self) -> Result<(), TestCaseError> {
        let decisions = decide_cluster_noting_waits(&self.state, self.now, &self.config);
        for d in decisions {
            if let ClusterDecision::Assign {
                build,
                job,
                attempt,
                agent_id,
                ..
            } = &d
            {
                self.check_assignment(build, job, *attempt, agent_id)?;
            }
            let build = d.build_id().to_owned();
            self.push_build(&build, d.payload());
            if let ClusterDecision::Assign {
                build, agent_id, ..
            } = &d
            {
                let agent = &self.state.agents[agent_id];
                prop_assert!(
                    self.state.busy_slots(agent_id) <= agent.capacity as usize,
                    "agent {} over capacity",
                    agent_id
                );
                let spec = &self.builds.iter().find(|(id, _)| id == build).unwrap().1;
                let key = (spec.tenant.to_string(), spec.project.to_string());
                if let Some(&max) = self.limits.get(&key).filter(|m| **m > 0) {
                    let running = self
                        .state
                        .leases
                        .keys()
                        .filter(|(b, _)| {
                            self.builds
                                .iter()
                                .any(|(id, s)| id == b && s.tenant == key.0 && s.project == key.1)
                        })
                        .count();
                    prop_assert!(running <= max as usize, "project {:?} over its limit", key);
                }
            }
        }
        Ok(())
    }

    fn check_assignment(
        &mut self,
        build: &str,
        job: &str,
        attempt: u32,
        agent_id: &str,
    ) -> Result<(), TestCaseError> {
        prop_assert!(
            self.assigned
                .insert((build.to_owned(), job.to_owned(), attempt)),
            "{}/{} attempt {} assigned twice",
            build,
            job,
            attempt
        );
        let sim_agent = self.agents.iter().find(|a| a.id == agent_id);
        if let Some(a) = sim_agent {
            prop_assert!(a.connected, "{} assigned to disconnected {}", job, agent_id);
            prop_assert!(!a.revoked, "{} assigned to revoked {}", job, agent_id);
            prop_assert!(!a.draining, "{} assigned to draining {}", job, agent_id);
        }
        let agent = &self.state.agents[agent_id];
        let spec = self.job_spec(build, job);
        let tenant = self
            .builds
            .iter()
            .find(|(id, _)| id == build)
            .unwrap()
            .1
            .tenant;
        prop_assert!(
            agent.tenant.is_empty() || agent.tenant == tenant,
            "{} of tenant {} ran on {} of tenant {}",
            job,
            tenant,
            agent_id,
            agent.tenant
        );
        // Routing: labelled agents first, then generic ones.
        let available: Vec<_> = self
            .state
            .agents
            .values()
            .filter(|a| a.is_available(self.now, &self.config) && a.serves(tenant))
            .collect();
        if spec.runs_on.is_empty() {
            prop_assert!(agent.is_generic() || available.iter().all(|a| !a.is_generic()));
        } else {
            let labelled = available.iter().any(|a| a.has_labels(&spec.runs_on));
            prop_assert!(
                agent.has_labels(&spec.runs_on) || (!labelled && agent.is_generic()),
                "{} with runs-on {:?} went to {} {:?}",
                job,
                spec.runs_on,
                agent_id,
                agent.labels
            );
        }
        Ok(())
    }

    fn finished(&self, build: &str) -> Option<Status> {
        self.log.iter().find_map(|e| match &e.payload {
            Some(Payload::BuildFinished(f)) if e.build_id == build => {
                Status::try_from(f.status).ok()
            }
            _ => None,
        })
    }

    /// Everyone behaves from now on; a shared generic agent joins. Every build must finish.
    fn settle(&mut self) -> Result<(), TestCaseError> {
        self.add_agent(
            "rescue".into(),
            AgentSpec {
                tenant: "",
                labels: Vec::new(),
                capacity: 3,
            },
        );
        let rescue = self.agents.len() - 1;
        self.act(&Action::Connect(rescue))?;
        for _ in 0..2_000 {
            if self
                .builds
                .iter()
                .all(|(id, _)| self.finished(id).is_some())
            {
                return Ok(());
            }
            self.act(&Action::Advance(2))?;
            for i in 0..self.agents.len() {
                if self.agents[i].connected {
                    self.act(&Action::Heartbeat(i))?;
                    self.act(&Action::Work(i))?;
                }
            }
        }
        let stuck: Vec<_> = self
            .state
            .builds
            .builds
            .keys()
            .map(|b| {
                let jobs: Vec<_> = self.state.builds.builds[b]
                    .jobs
                    .iter()
                    .map(|j| {
                        (
                            j.id.clone(),
                            j.phase,
                            waiting_reason(&self.state, b, &j.id, self.now, &self.config),
                        )
                    })
                    .collect();
                (b.clone(), jobs)
            })
            .collect();
        prop_assert!(false, "builds did not finish: {:?}", stuck);
        Ok(())
    }
}

fn arb_labels() -> impl Strategy<Value = Vec<String>> {
    prop_oneof![
        3 => Just(vec![]),
        1 => Just(vec!["gpu".to_string()]),
        1 => Just(vec!["arm".to_string()]),
        1 => Just(vec!["gpu".to_string(), "arm".to_string()]),
    ]
}

fn arb_agent() -> impl Strategy<Value = AgentSpec> {
    (
        prop_oneof![Just(""), Just(TENANTS[0]), Just(TENANTS[1])],
        arb_labels(),
        1u32..4,
    )
        .prop_map(|(tenant, labels, capacity)| AgentSpec {
            tenant,
            labels,
            capacity,
        })
}

fn arb_build() -> impl Strategy<Value = BuildSpec> {
    let job = (
        proptest::collection::vec(any::<bool>(), 5),
        arb_labels(),
        prop_oneof![3 => Just(0u64), 1 => Just(20u64)],
        0u32..2,
        1u32..4,
        any::<bool>(),
        any::<bool>(),
    );
    (
        prop_oneof![Just(TENANTS[0]), Just(TENANTS[1])],
        prop_oneof![Just("p0"), Just("p1")],
        proptest::collection::vec(job, 1..5),
        proptest::option::weighted(0.15, 0usize..60),
    )
        .prop_map(|(tenant, project, jobs, cancel_at)| BuildSpec {
            tenant,
            project,
            jobs: jobs
                .into_iter()
                .enumerate()
                .map(
                    |(i, (edges, runs_on, timeout_secs, retry, ticks, fails, hangs))| JobSpec {
                        needs: (0..i).filter(|&n| edges[n]).collect(),
                        runs_on,
                        timeout_secs,
                        retry,
                        ticks,
                        fails_first: fails && ticks == 1,
                        hangs_first: hangs,
                    },
                )
                .collect(),
            cancel_at,
        })
}

fn arb_action() -> impl Strategy<Value = Action> {
    prop_oneof![
        3 => (0usize..8).prop_map(Action::Connect),
        1 => (0usize..8).prop_map(Action::Disconnect),
        4 => (0usize..8).prop_map(Action::Heartbeat),
        1 => (0usize..8).prop_map(Action::Drain),
        1 => (0usize..40).prop_map(Action::Revoke), // rarely hits an agent
        5 => (0usize..8).prop_map(Action::Work),
        3 => (1i64..15).prop_map(Action::Advance),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

    #[test]
    fn every_build_finishes_and_the_rules_hold(
        agents in proptest::collection::vec(arb_agent(), 1..5),
        builds in proptest::collection::vec(arb_build(), 1..4),
        limits in proptest::collection::vec((0usize..2, 0u32..3), 0..2),
        actions in proptest::collection::vec(arb_action(), 0..80),
    ) {
        let mut sim = Sim::new(agents, builds, &limits);
        sim.decide_and_append()?;
        for (step, action) in actions.iter().enumerate() {
            if let Action::Revoke(i) = action {
                if *i >= sim.agents.len() {
                    continue;
                }
            }
            sim.act(action)?;
            let cancels: Vec<String> = sim
                .builds
                .iter()
                .filter(|(_, s)| s.cancel_at == Some(step))
                .map(|(id, _)| id.clone())
                .collect();
            for id in cancels {
                sim.push_build(&id, Payload::BuildCanceled(BuildCanceled::default()));
                sim.decide_and_append()?;
            }
        }
        sim.settle()?;
        if std::env::var("SIM_STATS").is_ok() {
            let mut kinds = BTreeMap::new();
            for e in &sim.log {
                let k = match &e.payload {
                    Some(Payload::JobRequeued(_)) => "requeued",
                    Some(Payload::JobAssigned(_)) => "assigned",
                    Some(Payload::JobFinished(f)) => match Status::try_from(f.status) {
                        Ok(Status::TimedOut) => "timed_out",
                        Ok(Status::Failed) if f.reason.starts_with("agent lost") => "lost_fail",
                        Ok(Status::Canceled) => "canceled",
                        _ => "finished",
                    },
                    _ => continue,
                };
                *kinds.entry(k).or_insert(0) += 1;
            }
            eprintln!("{kinds:?}");
        }
        for (id, spec) in &sim.builds {
            let status = sim.finished(id);
            prop_assert!(status.is_some());
            if spec.cancel_at.is_none() && status == Some(Status::Canceled) {
                prop_assert!(false, "{} canceled without a cancel", id);
            }
        }
        prop_assert!(sim.state.leases.is_empty());
        prop_assert!(sim.state.builds.builds.is_empty());
    }
}

/// A hand-written scenario of the issue: labelled work, a generic fallback, an agent lost in
/// the middle of a job, the job run again elsewhere, the late report of the lost agent ignored.
#[test]
fn a_lost_agent_s_job_runs_again_elsewhere() {
    let agents = vec![
        AgentSpec {
            tenant: "acme",
            labels: vec!["gpu".into()],
            capacity: 1,
        },
        AgentSpec {
            tenant: "",
            labels: vec![],
            capacity: 2,
        },
    ];
    let job = |needs: Vec<usize>, runs_on: &[&str]| JobSpec {
        needs,
        runs_on: runs_on.iter().map(|s| s.to_string()).collect(),
        timeout_secs: 0,
        retry: 0,
        ticks: 3,
        fails_first: false,
        hangs_first: false,
    };
    let build = BuildSpec {
        tenant: "acme",
        project: "p0",
        jobs: vec![
            job(vec![], &["gpu"]),
            job(vec![], &[]),
            job(vec![0, 1], &["gpu"]),
        ],
        cancel_at: None,
    };
    let mut sim = Sim::new(agents, vec![build], &[]);
    sim.act(&Action::Connect(0)).unwrap();
    sim.act(&Action::Connect(1)).unwrap();
    let lease_agent = |sim: &Sim, job: &str| {
        sim.state
            .leases
            .get(&("b0".to_string(), job.to_string()))
            .map(|l| (l.agent_id.clone(), l.attempt))
    };
    assert_eq!(lease_agent(&sim, "j0"), Some(("a0".into(), 1)));
    assert_eq!(lease_agent(&sim, "j1"), Some(("a1".into(), 1)));
    sim.act(&Action::Work(0)).unwrap();
    sim.act(&Action::Work(1)).unwrap();
    // a0 goes silent; a1 keeps heartbeating.
    for _ in 0..7 {
        sim.act(&Action::Advance(2)).unwrap();
        sim.act(&Action::Heartbeat(1)).unwrap();
    }
    // j0 was requeued and, with the gpu agent lost, went to the generic agent.
    assert_eq!(lease_agent(&sim, "j0"), Some(("a1".into(), 2)));
    let requeued = sim.log.iter().any(|e| {
        matches!(&e.payload, Some(Payload::JobRequeued(r))
            if r.job == "j0" && r.reason.starts_with("agent a0 lost"))
    });
    assert!(requeued);
    // a0 comes back and reports attempt 1 done: fenced off, and told to stop.
    for _ in 0..3 {
        sim.act(&Action::Work(0)).unwrap();
    }
    assert!(sim.agents[0].running.is_empty(), "a0 reported j0 attempt 1");
    assert_eq!(sim.job_phase("b0", "j0"), Some((2, JobPhase::Assigned)));
    sim.settle().unwrap();
    assert_eq!(sim.finished("b0"), Some(Status::Succeeded));
}
