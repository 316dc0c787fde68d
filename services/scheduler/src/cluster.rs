//! The scheduler service's logic for a cluster of agents, as pure functions over plain data.
//!
//! * [`ClusterState::apply`] folds the log: the build DAGs (through the existing
//!   [`SchedulerState`] fold), the agents and their sessions, the leases of job attempts, and
//!   the per-project concurrency limits. Time comes only from `Envelope::time_us`.
//! * [`decide_cluster`] looks at that state at a given `now_us` and returns
//!   [`ClusterDecision`]s: everything [`decide`] returns (queue, skip/cancel, finish a build),
//!   with assignments routed to a concrete agent, plus requeues of leases whose agent went away,
//!   failures of jobs that lost their agent too often, and a server-side timeout backstop.
//! * [`waiting_reason`] says why a job is not running (for `get`), using the same routing.
//! * [`decide_cluster_noting_waits`] is [`decide_cluster`] plus [`ClusterDecision::Wait`]: the
//!   reason a queued attempt was not assigned, whenever it differs from the last one recorded
//!   on the log (`JobWaiting`), so history can say why a job waited (`tributary why`).
//! * [`leases_to_cancel`] is what a heartbeat response tells an agent to stop.
//!
//! No clock, no I/O. A driver appends each decision's [`ClusterDecision::payload`] as an event,
//! folds it back and decides again; a decision disappears once its event is folded, so the
//! driver never has to dedupe (every decision is one event; nothing is "advisory").
//!
//! # Routing (as implemented)
//!
//! An agent is *available* when it is registered, connected, not revoked, not draining (by its
//! heartbeat or by the autoscaler's `AgentDraining`) and not
//! lost (heard from within `agent_ttl_us`), and *serves* a build when it was registered for the
//! build's tenant or is shared (registered with an empty tenant). A job with an `image` only
//! considers the agents that can run containers (`containers` in AgentRegistered /
//! AgentConnected); when none is available it waits, saying so. Among the available agents
//! serving the build's tenant (and, for an `image` job, able to run containers):
//!
//! * a job with `runs_on` labels may go to the agents whose labels contain **all** of them; if
//!   there is no such agent, to the *generic* agents (no labels at all);
//! * a job without `runs_on` may go to the generic agents; if there is none, to any agent.
//!
//! The candidate set is chosen by who is available, not by who has room: when a matching
//! labelled agent is available but full, the job waits for it rather than spilling over to a
//! generic agent. Among the candidates with a free slot (capacity minus leases held) the one
//! with the most free slots wins, ties going to the smallest agent id. A project's
//! `max_concurrent_jobs` (0 = unlimited) caps its leases across all agents. Queued jobs are
//! served first come, first served: builds in trigger order, jobs in plan order.
//!
//! # Leases
//!
//! `JobAssigned` opens the lease of (build, job, attempt); the first assignment of an attempt
//! wins, as in [`SchedulerState::apply`]. Its deadline is the larger of the event's
//! `deadline_us` and the last renewal + `lease_ttl_us`; an `AgentHeartbeat` of the agent's
//! current session listing the lease id renews it. `JobFinished`, `JobRequeued` (and a newer
//! `JobQueued` or `BuildFinished`) end it.
//!
//! A lease is taken back ([`ClusterDecision::Requeue`]) when its agent is revoked, disconnected,
//! lost, unknown, or the lease deadline passed; after `max_requeues` requeues of a job the next
//! loss fails the attempt instead ([`ClusterDecision::FailJob`]). A lease not yet started on a
//! draining agent is requeued too, while requeues remain (a draining agent otherwise finishes
//! what it runs). Requeues do not use up the job's `retry` budget: the fold grants one extra
//! attempt per requeue. A job failed by `FailJob` is retried like any failure if its plan allows.
//!
//! Events of a requeued attempt (a late `JobStarted`/`JobFinished` from the agent it was taken
//! from) are ignored, except a `JobFinished(CANCELED)` of a canceled build.
//!
//! # Cancel
//!
//! Telling an agent to stop is not an event, so it is not a decision: the heartbeat response
//! asks [`leases_to_cancel`], which lists the agent's leases of canceled builds (and leases it
//! reports that are no longer its own). The agent then reports `JobFinished(CANCELED)`. Decide
//! finishes a canceled build's lease itself when the job had not started, when its agent is
//! gone, or when the agent has not reported the end `timeout_grace_us` after the cancel.

use std::collections::{BTreeMap, BTreeSet};

use tributary_proto::events::{
    envelope::Payload, ArtifactUploaded, BuildFinished, Envelope, JobAssigned, JobFinished,
    JobPlan, JobQueued, JobRequeued, JobWaiting, Status,
};

use crate::{decide, BuildRun, Decision, JobPhase, JobState, SchedulerState};

const SECOND_US: i64 = 1_000_000;

/// Timing and limits of the cluster scheduler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterConfig {
    /// A lease not renewed by a heartbeat for this long expires (and is requeued).
    pub lease_ttl_us: i64,
    /// A connected agent not heard from for this long is considered lost.
    pub agent_ttl_us: i64,
    /// Requeues (lost agent, expired lease) allowed per job; the next loss fails the job.
    pub max_requeues: u32,
    /// Server-side backstop: a started job is timed out this long after its own timeout, and a
    /// job of a canceled build is given up this long after the cancel.
    pub timeout_grace_us: i64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            lease_ttl_us: 10 * SECOND_US,
            agent_ttl_us: 10 * SECOND_US,
            max_requeues: 3,
            timeout_grace_us: 30 * SECOND_US,
        }
    }
}

impl ClusterConfig {
    /// The event a scheduler appends when it starts with this configuration.
    pub fn started(&self) -> tributary_proto::events::SchedulerStarted {
        tributary_proto::events::SchedulerStarted {
            lease_ttl_us: self.lease_ttl_us,
            agent_ttl_us: self.agent_ttl_us,
            max_requeues: self.max_requeues,
            timeout_grace_us: self.timeout_grace_us,
        }
    }

    /// The configuration a `SchedulerStarted` announces.
    pub fn from_event(e: &tributary_proto::events::SchedulerStarted) -> Self {
        ClusterConfig {
            lease_ttl_us: e.lease_ttl_us,
            agent_ttl_us: e.agent_ttl_us,
            max_requeues: e.max_requeues,
            timeout_grace_us: e.timeout_grace_us,
        }
    }
}

/// An agent as the log describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentState {
    pub name: String,
    pub labels: Vec<String>,
    pub capacity: u32,
    /// Tenant it works for; empty = shared agent (takes any tenant's jobs).
    pub tenant: String,
    /// An `AgentRegistered` was seen. Agents that only connected never get work.
    pub registered: bool,
    /// The current connection; heartbeats and disconnects of other sessions are ignored.
    pub session_id: String,
    pub connected: bool,
    /// Time of the last connect or heartbeat of the current session.
    pub last_seen_us: i64,
    pub draining: bool,
    /// The autoscaler drains it (`AgentDraining`): it gets no new work, whatever its
    /// heartbeats say, until it is gone.
    pub drain_requested: bool,
    /// Revoked agents never get work again.
    pub revoked: bool,
    pub disconnect_reason: String,
    /// It can run container jobs (`image:`), as it said when it registered or last connected.
    pub containers: bool,
    /// Its container engine, for people.
    pub engine: String,
}

impl AgentState {
    /// A generic agent carries no labels.
    pub fn is_generic(&self) -> bool {
        self.labels.is_empty()
    }

    /// Carries every one of `wanted`.
    pub fn has_labels(&self, wanted: &[String]) -> bool {
        wanted.iter().all(|w| self.labels.contains(w))
    }

    /// Shared agents serve every tenant; the others only their own.
    pub fn serves(&self, tenant: &str) -> bool {
        self.tenant.is_empty() || self.tenant == tenant
    }

    /// Connected but not heard from for longer than `agent_ttl_us`.
    pub fn is_lost(&self, now_us: i64, config: &ClusterConfig) -> bool {
        self.connected && now_us - self.last_seen_us > config.agent_ttl_us
    }

    /// May be given new work now.
    pub fn is_available(&self, now_us: i64, config: &ClusterConfig) -> bool {
        self.registered
            && self.connected
            && !self.revoked
            && !self.draining
            && !self.drain_requested
            && !self.is_lost(now_us, config)
    }
}

/// A job attempt leased to an agent. Keyed by (build, job) in [`ClusterState::leases`]: a job
/// has at most one live lease, for its current attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseState {
    pub attempt: u32,
    pub agent_id: String,
    pub lease_id: String,
    pub assigned_us: i64,
    /// Deadline set by the assignment.
    pub deadline_us: i64,
    /// Last heartbeat that listed this lease.
    pub renewed_us: Option<i64>,
    /// When the agent started the attempt.
    pub started_us: Option<i64>,
}

impl LeaseState {
    /// The lease is valid until then: the assignment's deadline, pushed forward by heartbeats.
    pub fn deadline(&self, config: &ClusterConfig) -> i64 {
        let renewed = self
            .renewed_us
            .map_or(i64::MIN, |r| r + config.lease_ttl_us);
        self.deadline_us.max(renewed)
    }

    fn last_contact_us(&self) -> i64 {
        self.renewed_us.unwrap_or(self.assigned_us)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProjectLimits {
    /// 0 = unlimited.
    pub max_concurrent_jobs: u32,
}

/// What the cluster keeps per build beyond the DAG state.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BuildInfo {
    /// Time of the first `BuildCanceled`.
    pub canceled_us: Option<i64>,
    pub jobs: BTreeMap<String, JobInfo>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct JobInfo {
    /// The job as planned (steps, `runs_on`, `timeout_secs`...): what a lease hands out.
    pub plan: JobPlan,
    /// `JobRequeued` events folded for this job, over all its attempts.
    pub requeues: u32,
    /// The attempt taken back by the last `JobRequeued`, while it is still the current one: its
    /// events are fenced off and the next attempt is to be queued.
    pub requeued_attempt: Option<u32>,
    pub last_requeue_reason: String,
    /// The last waiting reason recorded on the log (`JobWaiting`): (attempt, reason).
    pub waiting: Option<(u32, String)>,
    /// Artifacts uploaded by the job's current attempt (one per path): what a lease of a job
    /// that needs this one downloads.
    pub artifacts: Vec<ArtifactUploaded>,
}

/// The scheduler service's read model.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterState {
    /// The build DAGs, folded by the local scheduler's fold.
    pub builds: SchedulerState,
    pub agents: BTreeMap<String, AgentState>,
    /// Live leases by (build, job).
    pub leases: BTreeMap<(String, String), LeaseState>,
    /// Limits by (tenant, project).
    pub projects: BTreeMap<(String, String), ProjectLimits>,
    /// Plans, requeue counts and cancel times of unfinished builds.
    pub build_info: BTreeMap<String, BuildInfo>,
    /// Lease id -> (build, job) of the live leases.
    lease_ids: BTreeMap<String, (String, String)>,
    /// The configuration the latest scheduler started with (`SchedulerStarted`), if any.
    pub config: Option<ClusterConfig>,
}

type Key = (String, String);

impl tributary_eventlog::runtime::Sequential for ClusterState {
    fn apply(&mut self, sequence: u64, env: &Envelope) {
        ClusterState::apply(self, sequence, env);
    }
}

impl ClusterState {
    pub fn new() -> Self {
        Self::default()
    }

    /// Folds one event. Pure and deterministic: time is `env.time_us`.
    pub fn apply(&mut self, offset: u64, env: &Envelope) {
        let Some(payload) = &env.payload else { return };
        let t = env.time_us;
        let build_id = &env.build_id;
        match payload {
            Payload::SchedulerStarted(e) => {
                self.config = Some(ClusterConfig::from_event(e));
            }
            Payload::AgentRegistered(e) => {
                let agent = self.agents.entry(e.agent_id.clone()).or_default();
                agent.registered = true;
                agent.name = e.name.clone();
                agent.labels = e.labels.clone();
                agent.capacity = e.capacity;
                agent.tenant = e.tenant.clone();
                agent.containers = e.containers;
                agent.engine = e.engine.clone();
            }
            Payload::AgentConnected(e) => {
                let agent = self.agents.entry(e.agent_id.clone()).or_default();
                agent.session_id = e.session_id.clone();
                agent.connected = true;
                agent.last_seen_us = agent.last_seen_us.max(t);
                agent.draining = false;
                agent.disconnect_reason.clear();
                // The agent says what it offers when it connects (capacity 0 = not said).
                if e.capacity > 0 {
                    agent.labels = e.labels.clone();
                    agent.capacity = e.capacity;
                    agent.containers = e.containers;
                    agent.engine = e.engine.clone();
                }
            }
            Payload::AgentHeartbeat(e) => {
                let Some(agent) = self.agents.get_mut(&e.agent_id) else {
                    return;
                };
                if !agent.connected || agent.session_id != e.session_id {
                    return;
                }
                agent.last_seen_us = agent.last_seen_us.max(t);
                agent.draining = e.draining;
                for id in &e.lease_ids {
                    let Some(key) = self.lease_ids.get(id) else {
                        continue;
                    };
                    if let Some(lease) = self.leases.get_mut(key) {
                        if lease.agent_id == e.agent_id {
                            lease.renewed_us = Some(lease.renewed_us.map_or(t, |r| r.max(t)));
                        }
                    }
                }
            }
            Payload::AgentDisconnected(e) => {
                if let Some(agent) = self.agents.get_mut(&e.agent_id) {
                    if agent.connected && agent.session_id == e.session_id {
                        agent.connected = false;
                        agent.draining = false;
                        agent.disconnect_reason = e.reason.clone();
                    }
                }
            }
            Payload::AgentRevoked(e) => {
                self.agents.entry(e.agent_id.clone()).or_default().revoked = true;
            }
            Payload::AgentDraining(e) => {
                if let Some(agent) = self.agents.get_mut(&e.agent_id) {
                    agent.drain_requested = true;
                }
            }
            Payload::ProjectCreated(e) => {
                let tenant = if e.tenant.is_empty() {
                    env.tenant.clone()
                } else {
                    e.tenant.clone()
                };
                self.projects.insert(
                    (tenant, e.name.clone()),
                    ProjectLimits {
                        max_concurrent_jobs: e.max_concurrent_jobs,
                    },
                );
            }
            Payload::BuildQueued(q) => {
                let fresh = self.builds.builds.get(build_id).is_some_and(|b| !b.planned);
                self.builds.apply(offset, env);
                if fresh {
                    let info = self.build_info.entry(build_id.clone()).or_default();
                    for plan in q.plan.iter().flat_map(|p| &p.jobs) {
                        // A kept job (re-run of failed jobs) hands on its kept run's artifacts.
                        info.jobs.entry(plan.id.clone()).or_insert_with(|| JobInfo {
                            plan: plan.clone(),
                            artifacts: plan.kept_artifacts.clone(),
                            ..JobInfo::default()
                        });
                    }
                }
            }
            Payload::BuildCanceled(_) => {
                if self.builds.builds.contains_key(build_id) {
                    let info = self.build_info.entry(build_id.clone()).or_default();
                    info.canceled_us.get_or_insert(t);
                }
                self.builds.apply(offset, env);
            }
            Payload::BuildFinished(_) => {
                self.builds.apply(offset, env);
                if !self.builds.builds.contains_key(build_id) {
                    self.build_info.remove(build_id);
                    let gone: Vec<Key> = self
                        .leases
                        .keys()
                        .filter(|(b, _)| b == build_id)
                        .cloned()
                        .collect();
                    for key in gone {
                        self.remove_lease(&key);
                    }
                }
            }
            Payload::JobQueued(e) => {
                self.builds.apply(offset, env);
                self.reconcile(build_id, &e.job);
            }
            Payload::JobAssigned(e) => {
                // The same rule as the build fold: the first assignment of the current, queued
                // attempt wins.
                let accepted = self
                    .job(build_id, &e.job)
                    .is_some_and(|j| j.attempt == e.attempt && j.phase == JobPhase::Queued);
                self.builds.apply(offset, env);
                if accepted {
                    let key = (build_id.clone(), e.job.clone());
                    self.remove_lease(&key);
                    self.insert_lease(
                        key,
                        LeaseState {
                            attempt: e.attempt,
                            agent_id: e.agent_id.clone(),
                            lease_id: e.lease_id.clone(),
                            assigned_us: t,
                            deadline_us: e.deadline_us,
                            renewed_us: None,
                            started_us: None,
                        },
                    );
                }
            }
            Payload::JobStarted(e) => {
                if self.fenced(build_id, &e.job, e.attempt) {
                    return;
                }
                let before = self.job(build_id, &e.job).map(|j| (j.attempt, j.phase));
                self.builds.apply(offset, env);
                let after = self.job(build_id, &e.job).map(|j| (j.attempt, j.phase));
                let started = before != after && after == Some((e.attempt, JobPhase::Running));
                if !started {
                    return;
                }
                let key = (build_id.clone(), e.job.clone());
                match self.leases.get_mut(&key) {
                    Some(lease) if lease.attempt == e.attempt => lease.started_us = Some(t),
                    _ => {
                        // Started without an assignment: adopt it, so it is watched like any
                        // lease (and taken back if its agent goes away).
                        self.remove_lease(&key);
                        self.insert_lease(
                            key,
                            LeaseState {
                                attempt: e.attempt,
                                agent_id: e.agent_id.clone(),
                                lease_id: e.lease_id.clone(),
                                assigned_us: t,
                                deadline_us: t,
                                renewed_us: Some(t),
                                started_us: Some(t),
                            },
                        );
                    }
                }
            }
            Payload::JobFinished(e) => {
                let canceled_build = self.builds.builds.get(build_id).is_some_and(|b| b.canceled);
                let cancel_ack = e.status == Status::Canceled as i32 && canceled_build;
                if self.fenced(build_id, &e.job, e.attempt) && !cancel_ack {
                    return;
                }
                self.builds.apply(offset, env);
                self.reconcile(build_id, &e.job);
            }
            Payload::ArtifactUploaded(e) => {
                let current = self
                    .job(build_id, &e.job)
                    .is_some_and(|j| j.attempt == e.attempt);
                if !current || self.fenced(build_id, &e.job, e.attempt) {
                    return;
                }
                self.builds.apply(offset, env); // the reuse index keeps them too
                let info = self
                    .build_info
                    .get_mut(build_id)
                    .and_then(|b| b.jobs.get_mut(&e.job));
                if let Some(info) = info {
                    info.artifacts
                        .retain(|a| a.attempt == e.attempt && a.path != e.path);
                    info.artifacts.push(e.clone());
                }
            }
            Payload::JobReused(e) => {
                let before = self.job(build_id, &e.job).map(|j| j.phase);
                self.builds.apply(offset, env);
                let after = self.job(build_id, &e.job).map(|j| j.phase);
                if before == Some(JobPhase::Waiting) && after != before {
                    // Jobs that need it get the artifacts of the run it reuses.
                    let info = self
                        .build_info
                        .get_mut(build_id)
                        .and_then(|b| b.jobs.get_mut(&e.job));
                    if let Some(info) = info {
                        info.artifacts = e.artifacts.clone();
                    }
                }
            }
            Payload::JobWaiting(e) => self.note_waiting(build_id, &e.job, e.attempt, &e.reason),
            Payload::JobRequeued(e) => {
                let current = self.job(build_id, &e.job).is_some_and(|j| {
                    j.attempt == e.attempt
                        && matches!(j.phase, JobPhase::Assigned | JobPhase::Running)
                });
                let info = self
                    .build_info
                    .get_mut(build_id)
                    .and_then(|b| b.jobs.get_mut(&e.job));
                let Some(info) = info.filter(|_| current) else {
                    return;
                };
                if info.requeued_attempt == Some(e.attempt) {
                    return;
                }
                info.requeues += 1;
                info.requeued_attempt = Some(e.attempt);
                info.last_requeue_reason = e.reason.clone();
                // A lost agent is not the job's failure: it does not use up a retry.
                if let Some(job) = self.job_mut(build_id, &e.job) {
                    job.retry = job.retry.saturating_add(1);
                }
                self.remove_lease(&(build_id.clone(), e.job.clone()));
            }
            _ => self.builds.apply(offset, env),
        }
    }

    /// Live leases held by an agent (its busy slots).
    pub fn busy_slots(&self, agent_id: &str) -> usize {
        self.leases
            .values()
            .filter(|l| l.agent_id == agent_id)
            .count()
    }

    /// The live lease with this id, and its (build, job).
    pub fn lease(&self, lease_id: &str) -> Option<(&Key, &LeaseState)> {
        let key = self.lease_ids.get(lease_id)?;
        self.leases.get_key_value(key)
    }

    /// Live leases of an agent, as ((build, job), lease), in key order: what it should run.
    pub fn agent_leases<'a>(
        &'a self,
        agent_id: &'a str,
    ) -> impl Iterator<Item = (&'a Key, &'a LeaseState)> + 'a {
        self.leases
            .iter()
            .filter(move |(_, l)| l.agent_id == agent_id)
    }

    /// The plan of a job of an unfinished build.
    pub fn job_plan(&self, build: &str, job: &str) -> Option<&JobPlan> {
        Some(&self.build_info.get(build)?.jobs.get(job)?.plan)
    }

    /// The cache index of the build's project (what a lease carries).
    pub fn cache_entries(&self, build: &str) -> Vec<tributary_proto::api::CacheEntry> {
        match self.builds.builds.get(build) {
            Some(run) => self.builds.caches.entries(&run.tenant, &run.project),
            None => Vec::new(),
        }
    }

    /// The superseded cache archives of the build's project, still to delete.
    pub fn superseded_caches(&self, build: &str) -> Vec<tributary_proto::api::CacheEntry> {
        match self.builds.builds.get(build) {
            Some(run) => self.builds.caches.superseded(&run.tenant, &run.project),
            None => Vec::new(),
        }
    }

    /// The artifacts of the jobs `job` needs (their current attempts'), in `needs` order.
    pub fn needed_artifacts(&self, build: &str, job: &str) -> Vec<ArtifactUploaded> {
        let Some(info) = self.build_info.get(build) else {
            return Vec::new();
        };
        let Some(plan) = info.jobs.get(job).map(|j| &j.plan) else {
            return Vec::new();
        };
        plan.needs
            .iter()
            .filter_map(|need| info.jobs.get(need))
            .flat_map(|j| j.artifacts.iter().cloned())
            .collect()
    }

    fn job(&self, build: &str, job: &str) -> Option<&JobState> {
        self.builds
            .builds
            .get(build)?
            .jobs
            .iter()
            .find(|j| j.id == job)
    }

    fn job_mut(&mut self, build: &str, job: &str) -> Option<&mut JobState> {
        self.builds
            .builds
            .get_mut(build)?
            .jobs
            .iter_mut()
            .find(|j| j.id == job)
    }

    fn job_info(&self, build: &str, job: &str) -> Option<&JobInfo> {
        self.build_info.get(build)?.jobs.get(job)
    }

    /// The attempt was requeued and is still the job's current one: its events are ignored.
    fn fenced(&self, build: &str, job: &str, attempt: u32) -> bool {
        let requeued = self.job_info(build, job).and_then(|i| i.requeued_attempt);
        requeued == Some(attempt) && self.job(build, job).is_some_and(|j| j.attempt == attempt)
    }

    /// Requeued and waiting for its next attempt to be queued.
    fn requeued(&self, build: &str, job: &JobState) -> bool {
        matches!(job.phase, JobPhase::Assigned | JobPhase::Running)
            && self.fenced(build, &job.id, job.attempt)
    }

    /// After a job event: a lease lives only while its attempt is the job's current, assigned
    /// or running one and was not requeued; the requeue mark only while it applies.
    fn reconcile(&mut self, build: &str, job_id: &str) {
        let job = self.job(build, job_id).map(|j| (j.attempt, j.phase));
        let live_attempt = match job {
            Some((attempt, JobPhase::Assigned | JobPhase::Running)) => Some(attempt),
            _ => None,
        };
        if let Some(info) = self
            .build_info
            .get_mut(build)
            .and_then(|b| b.jobs.get_mut(job_id))
        {
            if info.requeued_attempt.is_some() && info.requeued_attempt != live_attempt {
                info.requeued_attempt = None;
            }
        }
        let requeued = self
            .job_info(build, job_id)
            .and_then(|i| i.requeued_attempt);
        let key = (build.to_owned(), job_id.to_owned());
        if let Some(lease) = self.leases.get(&key) {
            if live_attempt != Some(lease.attempt) || requeued == Some(lease.attempt) {
                self.remove_lease(&key);
            }
        }
    }

    /// Folds a `JobWaiting`: the reason last recorded for the job. Nothing else changes.
    fn note_waiting(&mut self, build: &str, job: &str, attempt: u32, reason: &str) {
        let info = self
            .build_info
            .get_mut(build)
            .and_then(|b| b.jobs.get_mut(job));
        if let Some(info) = info {
            info.waiting = Some((attempt, reason.to_owned()));
        }
    }

    /// Whether `reason` is what the log last recorded for this attempt of the job.
    fn waiting_recorded(&self, build: &str, job: &str, attempt: u32, reason: &str) -> bool {
        self.job_info(build, job)
            .and_then(|i| i.waiting.as_ref())
            .is_some_and(|(a, r)| *a == attempt && r == reason)
    }

    fn insert_lease(&mut self, key: Key, lease: LeaseState) {
        if !lease.lease_id.is_empty() {
            self.lease_ids.insert(lease.lease_id.clone(), key.clone());
        }
        self.leases.insert(key, lease);
    }

    fn remove_lease(&mut self, key: &Key) {
        if let Some(lease) = self.leases.remove(key) {
            if self.lease_ids.get(&lease.lease_id) == Some(key) {
                self.lease_ids.remove(&lease.lease_id);
            }
        }
    }
}

/// What the scheduler service wants done next. Every decision is one event
/// ([`ClusterDecision::payload`]) of the build [`ClusterDecision::build_id`].
#[derive(Clone, Debug, PartialEq)]
pub enum ClusterDecision {
    /// Append JobQueued for this attempt (first attempt, a retry, or after a requeue).
    Queue {
        build: String,
        job: String,
        attempt: u32,
    },
    /// The job will not run (further): JobFinished with this status (skipped or canceled).
    Finish {
        build: String,
        job: String,
        attempt: u32,
        status: Status,
        reason: String,
    },
    /// Every job is final: BuildFinished.
    FinishBuild {
        build: String,
        status: Status,
        reason: String,
    },
    /// Lease the queued attempt to `agent_id`: JobAssigned. `lease_id` is derived from
    /// (build, job, attempt) so that deciding stays pure; a driver may replace it (e.g. with a
    /// UUID) before appending — the fold takes the lease id from the event.
    Assign {
        build: String,
        job: String,
        attempt: u32,
        agent_id: String,
        lease_id: String,
        deadline_us: i64,
    },
    /// Take the attempt back from its agent: JobRequeued. The next decide queues attempt + 1.
    Requeue {
        build: String,
        job: String,
        attempt: u32,
        agent_id: String,
        lease_id: String,
        reason: String,
    },
    /// The job lost its agent once more than `max_requeues` allows: JobFinished(FAILED).
    FailJob {
        build: String,
        job: String,
        attempt: u32,
        agent_id: String,
        lease_id: String,
        reason: String,
    },
    /// The job (`reuse: commit`) already succeeded at this commit in this project: JobReused
    /// instead of JobQueued.
    Reuse {
        build: String,
        job: String,
        attempt: u32,
        definition: String,
        from: crate::ReusedFrom,
    },
    /// Why the queued attempt was not assigned this round, when that differs from the reason
    /// last recorded on the log: JobWaiting (history only; no state changes).
    Wait {
        build: String,
        job: String,
        attempt: u32,
        reason: String,
    },
    /// Server-side backstop: the started attempt ran past its timeout + grace and its agent did
    /// not end it: JobFinished(TIMED_OUT).
    TimeOut {
        build: String,
        job: String,
        attempt: u32,
        agent_id: String,
        lease_id: String,
        duration_us: u64,
        reason: String,
    },
}

impl ClusterDecision {
    pub fn build_id(&self) -> &str {
        match self {
            ClusterDecision::Queue { build, .. }
            | ClusterDecision::Finish { build, .. }
            | ClusterDecision::FinishBuild { build, .. }
            | ClusterDecision::Assign { build, .. }
            | ClusterDecision::Requeue { build, .. }
            | ClusterDecision::FailJob { build, .. }
            | ClusterDecision::Reuse { build, .. }
            | ClusterDecision::Wait { build, .. }
            | ClusterDecision::TimeOut { build, .. } => build,
        }
    }

    /// The job the decision is about (None for FinishBuild).
    pub fn job_id(&self) -> Option<&str> {
        match self {
            ClusterDecision::Queue { job, .. }
            | ClusterDecision::Finish { job, .. }
            | ClusterDecision::Assign { job, .. }
            | ClusterDecision::Requeue { job, .. }
            | ClusterDecision::FailJob { job, .. }
            | ClusterDecision::Reuse { job, .. }
            | ClusterDecision::Wait { job, .. }
            | ClusterDecision::TimeOut { job, .. } => Some(job),
            ClusterDecision::FinishBuild { .. } => None,
        }
    }

    /// The event that records this decision.
    pub fn payload(&self) -> Payload {
        let finished = |job: &str, attempt: u32, status: Status, duration_us, reason: &str| {
            Payload::JobFinished(JobFinished {
                job: job.to_owned(),
                attempt,
                status: status as i32,
                exit_code: -1,
                duration_us,
                reason: reason.to_owned(),
                no_retry: false,
            })
        };
        match self {
            ClusterDecision::Queue { job, attempt, .. } => Payload::JobQueued(JobQueued {
                job: job.clone(),
                attempt: *attempt,
            }),
            ClusterDecision::Finish {
                job,
                attempt,
                status,
                reason,
                ..
            } => finished(job, *attempt, *status, 0, reason),
            ClusterDecision::FinishBuild { status, reason, .. } => {
                Payload::BuildFinished(BuildFinished {
                    status: *status as i32,
                    duration_us: 0,
                    reason: reason.clone(),
                })
            }
            ClusterDecision::Assign {
                job,
                attempt,
                agent_id,
                lease_id,
                deadline_us,
                ..
            } => Payload::JobAssigned(JobAssigned {
                job: job.clone(),
                attempt: *attempt,
                agent_id: agent_id.clone(),
                lease_id: lease_id.clone(),
                deadline_us: *deadline_us,
            }),
            ClusterDecision::Requeue {
                job,
                attempt,
                agent_id,
                lease_id,
                reason,
                ..
            } => Payload::JobRequeued(JobRequeued {
                job: job.clone(),
                attempt: *attempt,
                agent_id: agent_id.clone(),
                lease_id: lease_id.clone(),
                reason: reason.clone(),
            }),
            ClusterDecision::FailJob {
                job,
                attempt,
                reason,
                ..
            } => finished(job, *attempt, Status::Failed, 0, reason),
            ClusterDecision::TimeOut {
                job,
                attempt,
                duration_us,
                reason,
                ..
            } => finished(job, *attempt, Status::TimedOut, *duration_us, reason),
            ClusterDecision::Reuse {
                job,
                attempt,
                definition,
                from,
                ..
            } => crate::reused_payload(job, *attempt, definition, from),
            ClusterDecision::Wait {
                job,
                attempt,
                reason,
                ..
            } => Payload::JobWaiting(JobWaiting {
                job: job.clone(),
                attempt: *attempt,
                reason: reason.clone(),
            }),
        }
    }
}

/// The lease id [`decide_cluster`] proposes for an attempt.
pub fn lease_id_for(build: &str, job: &str, attempt: u32) -> String {
    format!("{build}/{job}/{attempt}")
}

/// Decides what to do next at time `now_us`. Deterministic: builds in trigger order, jobs in
/// plan order, each build's FinishBuild after its jobs' decisions.
pub fn decide_cluster(
    state: &ClusterState,
    now_us: i64,
    config: &ClusterConfig,
) -> Vec<ClusterDecision> {
    plan_round(state, now_us, config, false, false).decisions
}

/// [`decide_cluster`], plus a [`ClusterDecision::Wait`] for each queued attempt left unassigned
/// whose reason is not the one last recorded on the log for it: one event per change, never
/// one per round. What the scheduler service appends. The reasons of jobs waiting with every
/// slot taken are worked out once per kind of job (project, labels, image) per round, so a
/// long queue costs a lookup per job.
pub fn decide_cluster_noting_waits(
    state: &ClusterState,
    now_us: i64,
    config: &ClusterConfig,
) -> Vec<ClusterDecision> {
    plan_round(state, now_us, config, false, true).decisions
}

/// Why a job is not running, for `get`; `None` when nothing holds it back (it is running, done,
/// or about to be assigned). Uses the same routing as [`decide_cluster`] at `now_us`, so a job
/// waiting behind earlier jobs for a full agent says so.
pub fn waiting_reason(
    state: &ClusterState,
    build: &str,
    job: &str,
    now_us: i64,
    config: &ClusterConfig,
) -> Option<String> {
    waiting_reasons(state, build, now_us, config).remove(job)
}

/// [`waiting_reason`] of every job of a build that has one, by job id (one routing pass).
pub fn waiting_reasons(
    state: &ClusterState,
    build: &str,
    now_us: i64,
    config: &ClusterConfig,
) -> BTreeMap<String, String> {
    let mut reasons = BTreeMap::new();
    let Some(run) = state.builds.builds.get(build).filter(|b| !b.canceled) else {
        return reasons;
    };
    let mut round = None;
    for job in &run.jobs {
        let reason = match job.phase {
            JobPhase::Waiting => {
                let pending: Vec<&str> = job
                    .needs
                    .iter()
                    .filter(|n| {
                        run.jobs
                            .iter()
                            .find(|j| &&j.id == n)
                            .is_some_and(|j| j.phase != JobPhase::Done(Status::Succeeded))
                    })
                    .map(String::as_str)
                    .collect();
                (!pending.is_empty()).then(|| format!("waiting for {}", pending.join(", ")))
            }
            JobPhase::Queued => round
                .get_or_insert_with(|| plan_round(state, now_us, config, true, false))
                .waiting
                .remove(&(build.to_owned(), job.id.clone())),
            JobPhase::Assigned | JobPhase::Running if state.requeued(build, job) => {
                let why = state
                    .job_info(build, &job.id)
                    .map(|i| i.last_requeue_reason.as_str())
                    .unwrap_or_default();
                Some(format!(
                    "attempt {} was requeued ({why}); attempt {} is about to be queued",
                    job.attempt,
                    job.attempt + 1
                ))
            }
            JobPhase::Assigned => state
                .leases
                .get(&(build.to_owned(), job.id.clone()))
                .map(|l| format!("assigned to agent {}, not started yet", l.agent_id)),
            JobPhase::Running | JobPhase::Done(_) => None,
        };
        if let Some(reason) = reason {
            reasons.insert(job.id.clone(), reason);
        }
    }
    reasons
}

/// Lease ids a heartbeat response tells `agent_id` to stop: its live leases of canceled builds,
/// and every lease it reports (`reported`) that is not live and its own any more (requeued,
/// finished, or unknown). Fold a `JobAssigned` before pushing its lease to the agent, or the
/// agent's next heartbeat may report a lease the state does not know yet.
pub fn leases_to_cancel(state: &ClusterState, agent_id: &str, reported: &[String]) -> Vec<String> {
    let mut stop = BTreeSet::new();
    for ((build, _), lease) in state.agent_leases(agent_id) {
        if state.builds.builds.get(build).is_some_and(|b| b.canceled) {
            stop.insert(lease.lease_id.clone());
        }
    }
    for id in reported {
        if state.lease(id).is_none_or(|(_, l)| l.agent_id != agent_id) {
            stop.insert(id.clone());
        }
    }
    stop.into_iter().collect()
}

/// A job's `runs-on`: its labels and whether a generic agent may stand in.
#[derive(Clone, Copy, Debug, Default)]
struct Labels<'a> {
    wanted: &'a [String],
    /// `fallback: false`.
    strict: bool,
}

struct Round {
    decisions: Vec<ClusterDecision>,
    /// Why each queued job that was not assigned waits.
    waiting: BTreeMap<Key, String>,
}

/// One round of decisions; with `explain`, also why each queued job that is not assigned waits
/// (`get` wants that; the scheduler does not, and skips that work when every slot is taken:
/// with a long queue it is most of a round). With `note_waits`, a `Wait` decision for each
/// queued job left unassigned whose reason changed since the log last recorded one.
fn plan_round(
    state: &ClusterState,
    now_us: i64,
    config: &ClusterConfig,
    explain: bool,
    note_waits: bool,
) -> Round {
    let mut round = Round {
        decisions: Vec::new(),
        waiting: BTreeMap::new(),
    };
    let mut pool = Pool::new(state, now_us, config, explain);
    // With no free slot, no queued job can be assigned this round: do not propose any.
    let assignable = if pool.exhausted() { 0 } else { usize::MAX };
    let mut per_job: BTreeMap<(&str, &str), Vec<Decision>> = BTreeMap::new();
    let mut finish_build: BTreeMap<String, Decision> = BTreeMap::new();
    for d in decide(&state.builds, assignable) {
        match &d {
            Decision::FinishBuild { build, .. } => {
                finish_build.insert(build.clone(), d);
            }
            Decision::Queue { build, job, .. }
            | Decision::Finish { build, job, .. }
            | Decision::Reuse { build, job, .. }
            | Decision::Assign { build, job, .. } => {
                let key = state
                    .builds
                    .builds
                    .get_key_value(build)
                    .and_then(|(b, run)| {
                        let j = run.jobs.iter().find(|j| &j.id == job)?;
                        Some((b.as_str(), j.id.as_str()))
                    });
                if let Some(key) = key {
                    per_job.entry(key).or_default().push(d);
                }
            }
        }
    }

    let mut builds: Vec<(&String, &BuildRun)> = state.builds.builds.iter().collect();
    builds.sort_by_key(|(_, b)| b.triggered_offset);
    for (build_id, build) in builds {
        for job_state in &build.jobs {
            // Only an assigned or running attempt holds a lease (`reconcile`).
            let leased = matches!(job_state.phase, JobPhase::Assigned | JobPhase::Running)
                .then(|| state.leases.get(&(build_id.clone(), job_state.id.clone())))
                .flatten();
            if let Some(lease) = leased {
                if let Some(d) =
                    check_lease(state, build_id, build, job_state, lease, now_us, config)
                {
                    round.decisions.push(d);
                }
            } else if state.requeued(build_id, job_state) {
                round.decisions.push(if build.canceled {
                    ClusterDecision::Finish {
                        build: build_id.clone(),
                        job: job_state.id.clone(),
                        attempt: job_state.attempt,
                        status: Status::Canceled,
                        reason: "build canceled".into(),
                    }
                } else {
                    ClusterDecision::Queue {
                        build: build_id.clone(),
                        job: job_state.id.clone(),
                        attempt: job_state.attempt + 1,
                    }
                });
                if !build.canceled {
                    let (build, job) = (build_id.clone(), job_state.id.clone());
                    // Assigned at once: see `Decision::Queue` below.
                    if let Ok(d) = pool.assign(build, job, job_state.attempt + 1) {
                        round.decisions.push(d);
                    }
                }
            }
            // This round's outcome for a queued job: assigned, or why not ("" = not worked out).
            let mut assigned = false;
            let mut unassigned: Option<String> = None;
            for d in per_job
                .remove(&(build_id.as_str(), job_state.id.as_str()))
                .unwrap_or_default()
            {
                match d {
                    Decision::Queue {
                        build,
                        job,
                        attempt,
                    } => {
                        round.decisions.push(ClusterDecision::Queue {
                            build: build.clone(),
                            job: job.clone(),
                            attempt,
                        });
                        // With a free agent, the JobAssigned goes in the same append as the
                        // JobQueued (the fold takes them in order): a ready job does not wait
                        // for a round trip through the log before it is leased.
                        if let Ok(d) = pool.assign(build, job, attempt) {
                            round.decisions.push(d);
                        }
                    }
                    Decision::Finish {
                        build,
                        job,
                        status,
                        reason,
                        ..
                    } => round.decisions.push(ClusterDecision::Finish {
                        build,
                        job,
                        // The current attempt, so the fold takes it (0 for a job never queued).
                        attempt: job_state.attempt,
                        status,
                        reason,
                    }),
                    Decision::Assign {
                        build,
                        job,
                        attempt,
                    } => match pool.assign(build, job, attempt) {
                        Ok(d) => {
                            assigned = true;
                            round.decisions.push(d);
                        }
                        Err((key, reason)) => {
                            if note_waits {
                                unassigned = Some(reason.clone());
                            }
                            if explain {
                                round.waiting.insert(key, reason);
                            }
                        }
                    },
                    Decision::Reuse {
                        build,
                        job,
                        attempt,
                        definition,
                        from,
                    } => round.decisions.push(ClusterDecision::Reuse {
                        build,
                        job,
                        attempt,
                        definition,
                        from,
                    }),
                    Decision::FinishBuild { .. } => {}
                }
            }
            let waits = note_waits
                && !assigned
                && !build.canceled
                && job_state.phase == JobPhase::Queued
                && !state.requeued(build_id, job_state);
            if waits {
                let reason = unassigned
                    .filter(|r| !r.is_empty())
                    .or_else(|| pool.why_waiting(build_id, &job_state.id));
                let wait = reason.filter(|r| {
                    !state.waiting_recorded(build_id, &job_state.id, job_state.attempt, r)
                });
                if let Some(reason) = wait {
                    round.decisions.push(ClusterDecision::Wait {
                        build: build_id.clone(),
                        job: job_state.id.clone(),
                        attempt: job_state.attempt,
                        reason,
                    });
                }
            }
        }
        if let Some(Decision::FinishBuild {
            build,
            status,
            reason,
        }) = finish_build.remove(build_id)
        {
            round.decisions.push(ClusterDecision::FinishBuild {
                build,
                status,
                reason,
            });
        }
    }
    round
}

/// (tenant, project) of a build.
fn project_of(state: &ClusterState, build: &str) -> (String, String) {
    state
        .builds
        .builds
        .get(build)
        .map(|b| (b.tenant.clone(), b.project.clone()))
        .unwrap_or_default()
}

/// What to do about a live lease, if anything.
fn check_lease(
    state: &ClusterState,
    build_id: &str,
    build: &BuildRun,
    job: &JobState,
    lease: &LeaseState,
    now_us: i64,
    config: &ClusterConfig,
) -> Option<ClusterDecision> {
    let info = state.job_info(build_id, &job.id);
    let agent_name = &lease.agent_id;
    let base = || (build_id.to_owned(), job.id.clone(), lease.attempt);

    // The job overran its own timeout and its agent did not end it.
    let timeout_secs = info.map_or(0, |i| i.plan.timeout_secs);
    if let Some(started) = lease.started_us {
        let limit = i64::try_from(timeout_secs)
            .unwrap_or(i64::MAX / SECOND_US)
            .saturating_mul(SECOND_US)
            .saturating_add(config.timeout_grace_us);
        if timeout_secs > 0 && now_us - started > limit {
            let (build, job, attempt) = base();
            return Some(ClusterDecision::TimeOut {
                build,
                job,
                attempt,
                agent_id: lease.agent_id.clone(),
                lease_id: lease.lease_id.clone(),
                duration_us: u64::try_from(now_us - started).unwrap_or(0),
                reason: format!(
                    "timed out after {timeout_secs}s (agent {agent_name} did not stop the job \
                     within {}s; ended by the server)",
                    secs(config.timeout_grace_us)
                ),
            });
        }
    }

    let requeues = info.map_or(0, |i| i.requeues);
    if let Some(trouble) = lease_trouble(state, lease, now_us, config) {
        let (build, job, attempt) = base();
        let agent_id = lease.agent_id.clone();
        let lease_id = lease.lease_id.clone();
        return Some(if build_canceled(build_id, state) {
            ClusterDecision::Finish {
                build,
                job,
                attempt,
                status: Status::Canceled,
                reason: format!("build canceled; {trouble}"),
            }
        } else if requeues >= config.max_requeues {
            ClusterDecision::FailJob {
                build,
                job,
                attempt,
                agent_id,
                lease_id,
                reason: format!(
                    "agent lost {} times (requeued {requeues} times, the limit); last: {trouble}",
                    requeues + 1
                ),
            }
        } else {
            ClusterDecision::Requeue {
                build,
                job,
                attempt,
                agent_id,
                lease_id,
                reason: trouble,
            }
        });
    }

    if build.canceled {
        let (build, job, attempt) = base();
        let canceled_us = state.build_info.get(build_id).and_then(|b| b.canceled_us);
        let reason = if lease.started_us.is_none() {
            // Nothing runs yet: no need to wait for the agent (a late start is fenced off).
            "build canceled before the job started".to_owned()
        } else if canceled_us.is_some_and(|c| now_us - c > config.timeout_grace_us) {
            // The agent was told to stop (heartbeat response) but did not report the end.
            format!(
                "build canceled; agent {agent_name} did not stop the job within {}s",
                secs(config.timeout_grace_us)
            )
        } else {
            return None;
        };
        return Some(ClusterDecision::Finish {
            build,
            job,
            attempt,
            status: Status::Canceled,
            reason,
        });
    }

    // A draining agent finishes what it runs; what it has not started moves elsewhere.
    let draining = state
        .agents
        .get(&lease.agent_id)
        .is_some_and(|a| a.draining);
    if draining && lease.started_us.is_none() && requeues < config.max_requeues {
        let (build, job, attempt) = base();
        return Some(ClusterDecision::Requeue {
            build,
            job,
            attempt,
            agent_id: lease.agent_id.clone(),
            lease_id: lease.lease_id.clone(),
            reason: format!("agent {agent_name} is draining and had not started the job"),
        });
    }
    None
}

fn build_canceled(build_id: &str, state: &ClusterState) -> bool {
    state
        .builds
        .builds
        .get(build_id)
        .is_some_and(|b| b.canceled)
}

/// Why a lease's agent can no longer be trusted with it.
fn lease_trouble(
    state: &ClusterState,
    lease: &LeaseState,
    now_us: i64,
    config: &ClusterConfig,
) -> Option<String> {
    let id = &lease.agent_id;
    let Some(agent) = state.agents.get(id).filter(|a| a.registered) else {
        return Some(format!("agent {id} is not registered"));
    };
    if agent.revoked {
        return Some(format!("agent {id} was revoked"));
    }
    if !agent.connected {
        return Some(if agent.disconnect_reason.is_empty() {
            format!("agent {id} disconnected")
        } else {
            format!("agent {id} disconnected: {}", agent.disconnect_reason)
        });
    }
    if agent.is_lost(now_us, config) {
        return Some(format!(
            "agent {id} lost: no heartbeat for {}s",
            secs(now_us - agent.last_seen_us)
        ));
    }
    if now_us > lease.deadline(config) {
        let silent = now_us - lease.last_contact_us();
        return Some(if agent.last_seen_us > lease.last_contact_us() {
            format!(
                "lease expired: agent {id} has not reported it for {}s",
                secs(silent)
            )
        } else {
            format!(
                "lease expired: no heartbeat from agent {id} for {}s",
                secs(silent)
            )
        });
    }
    None
}

fn secs(us: i64) -> i64 {
    us / SECOND_US
}

fn label_list(labels: &[String]) -> String {
    format!("[{}]", labels.join(", "))
}

/// What routes a job: (tenant, project, runs_on, image).
type JobKind<'a> = (&'a str, &'a str, &'a [String], &'a str);

/// The agents that may take work in this round, with their free slots, and the projects'
/// running jobs; both count down as jobs are assigned.
struct Pool<'a> {
    config: &'a ClusterConfig,
    state: &'a ClusterState,
    now_us: i64,
    /// Available agents by id: (agent, free slots).
    free: BTreeMap<&'a str, (&'a AgentState, u32)>,
    used: BTreeMap<&'a str, u32>,
    project_busy: BTreeMap<(String, String), u32>,
    /// Free slots of all available agents together.
    free_total: u32,
    /// Say why a job cannot be assigned (else an empty reason, and no routing when no slot is
    /// free).
    explain: bool,
    /// With no free slot left, why a job of (tenant, project, runs_on, image) waits: the same
    /// for every such job until the round ends.
    full: BTreeMap<JobKind<'a>, String>,
}

impl<'a> Pool<'a> {
    fn new(state: &'a ClusterState, now_us: i64, config: &'a ClusterConfig, explain: bool) -> Self {
        let mut used: BTreeMap<&str, u32> = BTreeMap::new();
        let mut project_busy: BTreeMap<(String, String), u32> = BTreeMap::new();
        for ((build, _), lease) in &state.leases {
            *used.entry(lease.agent_id.as_str()).or_default() += 1;
            if let Some(run) = state.builds.builds.get(build) {
                *project_busy
                    .entry((run.tenant.clone(), run.project.clone()))
                    .or_default() += 1;
            }
        }
        let free = state
            .agents
            .iter()
            .filter(|(_, a)| a.is_available(now_us, config))
            .map(|(id, a)| {
                let held = used.get(id.as_str()).copied().unwrap_or(0);
                (id.as_str(), (a, a.capacity.saturating_sub(held)))
            })
            .collect::<BTreeMap<_, _>>();
        let free_total = free.values().map(|(_, f)| *f).sum();
        Pool {
            config,
            state,
            now_us,
            free,
            used,
            project_busy,
            free_total,
            explain,
            full: BTreeMap::new(),
        }
    }

    /// Why a queued job the round did not route waits, once no slot is free for anyone (the
    /// reason is then the same for every job of its kind, so it is worked out once per kind).
    /// None while a slot is free (the round routes every queued job then).
    fn why_waiting(&mut self, build: &str, job: &str) -> Option<String> {
        if self.free_total > 0 {
            return None;
        }
        let state = self.state;
        let run = state.builds.builds.get(build)?;
        let (runs_on, strict, image) = state
            .job_info(build, job)
            .map(|i| {
                let image = if i.plan.image_build.is_some() {
                    "built image"
                } else {
                    i.plan.image.trim()
                };
                (i.plan.runs_on.as_slice(), i.plan.runs_on_strict, image)
            })
            .unwrap_or_default();
        let key = (run.tenant.as_str(), run.project.as_str(), runs_on, image);
        if let Some(reason) = self.full.get(&key) {
            return Some(reason.clone());
        }
        let labels = Labels {
            wanted: runs_on,
            strict,
        };
        // No slot anywhere: `take` cannot succeed, so it changes nothing and says why.
        let reason = self
            .take(&(run.tenant.clone(), run.project.clone()), labels, image)
            .err()?;
        self.full.insert(key, reason.clone());
        Some(reason)
    }

    /// No slot left for anyone, and no need to say why.
    fn exhausted(&self) -> bool {
        self.free_total == 0 && !self.explain
    }

    /// Leases `attempt` of `job` to the agent [`Pool::take`] picks; else the job's key and why
    /// it waits.
    fn assign(
        &mut self,
        build: String,
        job: String,
        attempt: u32,
    ) -> Result<ClusterDecision, (Key, String)> {
        if self.exhausted() {
            return Err(((build, job), String::new()));
        }
        let state = self.state;
        let (runs_on, image) = state
            .job_info(&build, &job)
            .map(|i| {
                let labels = Labels {
                    wanted: i.plan.runs_on.as_slice(),
                    strict: i.plan.runs_on_strict,
                };
                (labels, i.plan.image_description())
            })
            .unwrap_or_default();
        match self.take(&project_of(state, &build), runs_on, &image) {
            Ok(agent_id) => {
                let lease_id = lease_id_for(&build, &job, attempt);
                Ok(ClusterDecision::Assign {
                    build,
                    job,
                    attempt,
                    agent_id,
                    lease_id,
                    deadline_us: self.now_us.saturating_add(self.config.lease_ttl_us),
                })
            }
            Err(reason) => Err(((build, job), reason)),
        }
    }

    /// Picks an agent for a job of `(tenant, project)` with `runs_on` (and `image`: only agents
    /// that can run containers), or says why none.
    fn take(
        &mut self,
        project: &(String, String),
        labels: Labels<'_>,
        image: &str,
    ) -> Result<String, String> {
        let runs_on = labels.wanted;
        let tenant = &project.0;
        let mut serving: Vec<(&'a str, &'a AgentState)> = self
            .free
            .iter()
            .filter(|(_, (a, _))| a.serves(tenant))
            .map(|(id, (a, _))| (*id, *a))
            .collect();
        if !image.is_empty() {
            let any = !serving.is_empty();
            serving.retain(|(_, a)| a.containers);
            if serving.is_empty() {
                return Err(format!(
                    "needs an agent that can run containers (image {image}); {}{}",
                    if any {
                        "no connected agent has a container engine: start one with \
                         `tributary agent --engine unix:///run/podman/podman.sock`"
                    } else {
                        "no agent connected"
                    },
                    self.unavailable_note(tenant)
                ));
            }
        }
        let with = |pred: &dyn Fn(&AgentState) -> bool| -> Vec<&'a str> {
            serving
                .iter()
                .filter(|(_, a)| pred(a))
                .map(|(id, _)| *id)
                .collect()
        };
        let generic = with(&|a| a.is_generic());
        let (candidates, what) = if !runs_on.is_empty() {
            let labelled = with(&|a| a.has_labels(runs_on));
            if !labelled.is_empty() {
                (
                    labelled,
                    format!("all agents with labels {}", label_list(runs_on)),
                )
            } else if labels.strict {
                return Err(format!(
                    "no connected agent has labels {} (the job's `runs-on` says `fallback: \
                     false`: generic agents do not take it){}",
                    label_list(runs_on),
                    self.unavailable_note(tenant)
                ));
            } else if !generic.is_empty() {
                (
                    generic,
                    format!(
                        "no connected agent has labels {}; all generic agents",
                        label_list(runs_on)
                    ),
                )
            } else {
                return Err(format!(
                    "no connected agent has labels {}; no generic agent connected{}",
                    label_list(runs_on),
                    self.unavailable_note(tenant)
                ));
            }
        } else if !generic.is_empty() {
            (generic, "all generic agents".to_owned())
        } else if !serving.is_empty() {
            let all = with(&|_| true);
            (all, "all agents".to_owned())
        } else {
            return Err(format!(
                "no agent connected{}",
                self.unavailable_note(tenant)
            ));
        };

        if let Some(limits) = self.state.projects.get(project) {
            let busy = self.project_busy.get(project).copied().unwrap_or(0);
            if limits.max_concurrent_jobs > 0 && busy >= limits.max_concurrent_jobs {
                return Err(format!(
                    "project {} is at its limit of {} concurrent jobs",
                    project.1, limits.max_concurrent_jobs
                ));
            }
        }

        let what = if image.is_empty() {
            what
        } else {
            format!("{what} that can run containers")
        };

        // Most free slots first, ties to the smallest id (candidates are in id order).
        let mut best: Option<(&str, u32)> = None;
        for id in &candidates {
            let free = self.free[id].1;
            if free > 0 && best.is_none_or(|(_, f)| free > f) {
                best = Some((id, free));
            }
        }
        let Some((id, _)) = best else {
            let (used, cap) = candidates.iter().fold((0, 0), |(u, c), id| {
                let agent = self.free[id].0;
                (
                    u + self.used.get(id).copied().unwrap_or(0),
                    c + agent.capacity,
                )
            });
            return Err(format!("{what} are busy ({used}/{cap} slots in use)"));
        };
        if let Some(slot) = self.free.get_mut(id) {
            slot.1 -= 1;
            self.free_total -= 1;
        }
        *self.used.entry(id).or_default() += 1;
        *self.project_busy.entry(project.clone()).or_default() += 1;
        Ok(id.to_owned())
    }

    /// Connected agents serving the tenant that cannot take work right now.
    fn unavailable_note(&self, tenant: &str) -> String {
        let (mut draining, mut silent) = (0usize, 0usize);
        for a in self.state.agents.values() {
            if !a.registered || !a.connected || a.revoked || !a.serves(tenant) {
                continue;
            }
            if a.is_lost(self.now_us, self.config) {
                silent += 1;
            } else if a.draining || a.drain_requested {
                draining += 1;
            }
        }
        let count = |n: usize, what: &str| match n {
            0 => None,
            1 => Some(format!("1 agent {what}")),
            n => Some(format!("{n} agents {what}")),
        };
        let parts: Vec<String> = [count(draining, "draining"), count(silent, "not responding")]
            .into_iter()
            .flatten()
            .collect();
        if parts.is_empty() {
            String::new()
        } else {
            format!(" ({})", parts.join(", "))
        }
    }
}

#[cfg(test)]
mod tests;
