//! "Why": a job's history as the decisions taken about it, with their reasons, read from the
//! build's own events (`tributary why`).
//!
//! [`explain`] walks the build's records through the projector's fold ([`crate::builds`]) and
//! reports each record that changed a job (so fenced events of a stale attempt, duplicates and
//! a second assignment are left out exactly as every fold leaves them out), in the words of
//! the decision: queued (its needs met), waiting (the scheduler's recorded reason,
//! `JobWaiting`), assigned to an agent (lease), started, requeued (lease expired, agent lost),
//! retried (exit N on attempt K), succeeded/failed/timed out, canceled (by whom), reused (from
//! build N), skipped (a need failed), kept (a re-run keeps a job that succeeded). Pure.

use std::collections::BTreeMap;

use serde::Serialize;
use tributary_proto::events::{envelope::Payload, Envelope, JobPlan, Status};

use crate::builds::{BuildsState, Job, Phase};

/// What kind of decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Planned, waiting for its needs.
    Pending,
    /// Kept from an earlier build (a re-run of failed jobs).
    Kept,
    Queued,
    Waiting,
    Assigned,
    Started,
    Requeued,
    Retried,
    Succeeded,
    Failed,
    TimedOut,
    Canceled,
    Skipped,
    Reused,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Pending => "pending",
            Kind::Kept => "kept",
            Kind::Queued => "queued",
            Kind::Waiting => "waiting",
            Kind::Assigned => "assigned",
            Kind::Started => "started",
            Kind::Requeued => "requeued",
            Kind::Retried => "retried",
            Kind::Succeeded => "succeeded",
            Kind::Failed => "failed",
            Kind::TimedOut => "timed_out",
            Kind::Canceled => "canceled",
            Kind::Skipped => "skipped",
            Kind::Reused => "reused",
        }
    }
}

/// One decision about a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// The record that carries it.
    pub offset: u64,
    pub time_us: i64,
    pub kind: Kind,
    pub attempt: u32,
    /// The decision and its reason, for people.
    pub text: String,
}

/// A job's decisions in log order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct JobHistory {
    pub job: String,
    pub decisions: Vec<Decision>,
}

/// Whether `job` (an id, or a name shared by matrix instances) names `candidate`.
pub fn job_matches(job: &str, candidate: &Job) -> bool {
    candidate.id == job || candidate.name == job
}

/// The history of every job of build `build_id` named by `job` (all jobs when None), in plan
/// order, from the build's records in offset order.
pub fn explain(build_id: &str, records: &[(u64, Envelope)], job: Option<&str>) -> Vec<JobHistory> {
    let mut state = BuildsState::default();
    let mut plans: BTreeMap<String, JobPlan> = BTreeMap::new();
    let mut histories: BTreeMap<String, Vec<Decision>> = BTreeMap::new();
    let mut retries: BTreeMap<String, u32> = BTreeMap::new();
    let mut canceled_by = String::new();
    for (offset, env) in records {
        if env.build_id != build_id {
            continue;
        }
        let Some(payload) = &env.payload else {
            continue;
        };
        let job_id = job_of(payload);
        let before = job_id.and_then(|j| find(&state, build_id, j));
        state.apply(*offset, env);
        let Some(build) = state.builds.get(build_id) else {
            continue;
        };
        let at = |kind, attempt, text: String| Decision {
            offset: *offset,
            time_us: env.time_us,
            kind,
            attempt,
            text,
        };
        if let Payload::BuildQueued(q) = payload {
            if !plans.is_empty() {
                continue;
            }
            for plan in q.plan.iter().flat_map(|p| &p.jobs) {
                plans.insert(plan.id.clone(), plan.clone());
                let d = if !plan.kept_from_build.is_empty() {
                    at(
                        Kind::Kept,
                        0,
                        format!(
                            "succeeded in build {}; this re-run keeps it",
                            plan.kept_from_build
                        ),
                    )
                } else if !plan.needs.is_empty() {
                    at(
                        Kind::Pending,
                        0,
                        format!("waits for its needs: {}", plan.needs.join(", ")),
                    )
                } else {
                    continue;
                };
                histories.entry(plan.id.clone()).or_default().push(d);
            }
            continue;
        }
        if let Payload::BuildCanceled(c) = payload {
            canceled_by = if c.reason.is_empty() {
                c.who.clone()
            } else {
                format!("{} ({})", c.who, c.reason)
            };
            continue;
        }
        let Some(job_id) = job_id else { continue };
        let Some(after) = build.jobs.iter().find(|j| j.id == job_id) else {
            continue;
        };
        let changed = before.as_ref() != Some(after);
        let plan = plans.get(job_id);
        let decision = match payload {
            Payload::JobWaiting(w) => {
                let last = histories.get(job_id).and_then(|h| h.last());
                let repeated = last.is_some_and(|d| {
                    d.kind == Kind::Waiting && d.attempt == w.attempt && d.text == w.reason
                });
                (w.attempt == after.attempt && after.phase == Phase::Queued && !repeated)
                    .then(|| at(Kind::Waiting, w.attempt, w.reason.clone()))
            }
            _ if !changed => None,
            Payload::JobQueued(e) => {
                let retried = retries.entry(job_id.to_owned()).or_default();
                let (kind, text) = queued(
                    build,
                    before.as_ref(),
                    e.attempt,
                    plan,
                    retried,
                    env.time_us,
                );
                Some(at(kind, e.attempt, text))
            }
            Payload::JobAssigned(e) => {
                let queued_for = after
                    .queued_us
                    .map(|q| format!(" after {} in the queue", duration(env.time_us - q)))
                    .unwrap_or_default();
                Some(at(
                    Kind::Assigned,
                    e.attempt,
                    format!(
                        "assigned to agent {}{queued_for} (lease {}, {} to renew)",
                        e.agent_id,
                        e.lease_id,
                        duration(e.deadline_us - env.time_us)
                    ),
                ))
            }
            Payload::JobStarted(e) => Some(at(
                Kind::Started,
                e.attempt,
                format!(
                    "started on agent {}{}",
                    e.agent_id,
                    if e.executor.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", e.executor)
                    }
                ),
            )),
            Payload::JobRequeued(e) => Some(at(
                Kind::Requeued,
                e.attempt,
                format!(
                    "attempt {} taken back from agent {}: {}",
                    e.attempt, e.agent_id, e.reason
                ),
            )),
            Payload::JobReused(e) => Some(at(Kind::Reused, e.attempt, after.reason.clone())),
            Payload::JobFinished(e) => {
                let (kind, text) = finished(after, e.status, &canceled_by);
                Some(at(kind, e.attempt, text))
            }
            _ => None,
        };
        if let Some(d) = decision {
            histories.entry(job_id.to_owned()).or_default().push(d);
        }
    }
    let Some(build) = state.builds.get(build_id) else {
        return Vec::new();
    };
    build
        .jobs
        .iter()
        .filter(|j| job.is_none_or(|name| job_matches(name, j)))
        .map(|j| JobHistory {
            job: j.id.clone(),
            decisions: histories.remove(&j.id).unwrap_or_default(),
        })
        .collect()
}

/// The job a job-level event is about.
fn job_of(payload: &Payload) -> Option<&str> {
    Some(match payload {
        Payload::JobQueued(e) => &e.job,
        Payload::JobWaiting(e) => &e.job,
        Payload::JobAssigned(e) => &e.job,
        Payload::JobStarted(e) => &e.job,
        Payload::JobRequeued(e) => &e.job,
        Payload::JobReused(e) => &e.job,
        Payload::JobFinished(e) => &e.job,
        _ => return None,
    })
}

fn find(state: &BuildsState, build: &str, job: &str) -> Option<Job> {
    state
        .builds
        .get(build)?
        .jobs
        .iter()
        .find(|j| j.id == job)
        .cloned()
}

/// A `JobQueued` that the fold took: a first attempt (needs met), a retry after a failure, or
/// the next attempt after a requeue.
fn queued(
    build: &crate::Build,
    before: Option<&Job>,
    attempt: u32,
    plan: Option<&JobPlan>,
    retried: &mut u32,
    now_us: i64,
) -> (Kind, String) {
    let Some(before) = before.filter(|_| attempt > 1) else {
        let needs = plan.map(|p| p.needs.as_slice()).unwrap_or_default();
        if needs.is_empty() {
            return (Kind::Queued, "queued: it needs no other job".into());
        }
        let met: Vec<String> = needs
            .iter()
            .map(|n| {
                let when = build
                    .jobs
                    .iter()
                    .find(|j| &j.id == n)
                    .and_then(|j| j.finished_us)
                    .map(|f| format!(" {} earlier", duration(now_us - f)))
                    .unwrap_or_default();
                format!("{n} succeeded{when}")
            })
            .collect();
        return (
            Kind::Queued,
            format!("queued: needs met ({})", met.join(", ")),
        );
    };
    if before.phase.is_terminal() {
        *retried += 1;
        let budget = plan.map_or(0, |p| p.retry);
        let exit = before
            .exit_code
            .map(|c| format!("exit {c}"))
            .unwrap_or_else(|| before.phase.name().to_owned());
        let why = if before.reason.is_empty() {
            String::new()
        } else {
            format!(": {}", before.reason)
        };
        return (
            Kind::Retried,
            format!(
                "retried after {exit} on attempt {}{why}; attempt {attempt} queued (retry {retried} \
                 of {budget})",
                before.attempt
            ),
        );
    }
    (
        Kind::Queued,
        format!(
            "queued again as attempt {attempt} after attempt {} was requeued",
            before.attempt
        ),
    )
}

fn finished(job: &Job, status: i32, canceled_by: &str) -> (Kind, String) {
    let reason = |what: &str| {
        if job.reason.is_empty() {
            what.to_owned()
        } else {
            format!("{what}: {}", job.reason)
        }
    };
    let exit = job
        .exit_code
        .filter(|c| *c >= 0)
        .map(|c| format!(" (exit {c})"))
        .unwrap_or_default();
    let took = match (job.started_us, job.finished_us) {
        (Some(s), Some(f)) => format!(" after running {}", duration(f - s)),
        _ => String::new(),
    };
    match Status::try_from(status) {
        Ok(Status::Succeeded) => (Kind::Succeeded, format!("succeeded{took}")),
        Ok(Status::Skipped) => (Kind::Skipped, reason("skipped")),
        Ok(Status::Canceled) => {
            let by = if canceled_by.is_empty() {
                String::new()
            } else {
                format!(" by {canceled_by}")
            };
            (Kind::Canceled, reason(&format!("canceled{by}")))
        }
        Ok(Status::TimedOut) => (Kind::TimedOut, reason(&format!("timed out{took}"))),
        _ => (Kind::Failed, reason(&format!("failed{exit}{took}"))),
    }
}

/// `850ms`, `4.2s`, `3m04s`, `1h02m`.
pub fn duration(us: i64) -> String {
    let us = us.max(0);
    let ms = us / 1000;
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{}.{}s", ms / 1000, (ms % 1000) / 100)
    } else if ms < 3_600_000 {
        format!("{}m{:02}s", ms / 60_000, (ms % 60_000) / 1000)
    } else {
        format!("{}h{:02}m", ms / 3_600_000, (ms % 3_600_000) / 60_000)
    }
}

#[cfg(test)]
mod tests;
