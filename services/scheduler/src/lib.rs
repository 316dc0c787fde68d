//! Scheduling as pure decisions over a folded state.
//!
//! * [`SchedulerState::apply`] folds log events into what the scheduler needs to know: each
//!   build's jobs, their `needs`, phase and attempt.
//! * [`decide`] looks at that state and returns [`Decision`]s: queue a job whose needs
//!   succeeded, skip one whose needs failed, re-queue a failed job that has retries left, hand
//!   queued jobs to free capacity, finish a build whose jobs are all done.
//!
//! Both are plain functions over plain data: no clock, no I/O. A driver (the local runner, the
//! scheduler service) appends the decisions as events and folds them back from the log before
//! deciding again, so a decision is never made twice.

use std::collections::BTreeMap;

use tributary_proto::events::{
    envelope::Payload, BuildFinished, Envelope, JobFinished, JobPlan, JobQueued, JobReused, Status,
};

pub use caches::{evict, superseded_to_delete, CacheIndex};
pub use reuse::{definition_hash, ReuseIndex, ReusedFrom};

/// Where a job is in its life, as far as the scheduler cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobPhase {
    /// Waiting for its needs.
    Waiting,
    Queued,
    Assigned,
    Running,
    /// The current attempt ended with this status.
    Done(Status),
}

#[derive(Clone, Debug, PartialEq)]
pub struct JobState {
    pub id: String,
    pub needs: Vec<String>,
    /// Re-runs allowed after a failure.
    pub retry: u32,
    pub phase: JobPhase,
    /// Current attempt (0 before the first queueing).
    pub attempt: u32,
    pub reason: String,
    /// `reuse: commit`: the job's definition hash, looked up before it is queued.
    pub reuse: Option<String>,
}

impl JobState {
    /// The job will not run again: it succeeded, or it ended otherwise with no retry left.
    pub fn is_final(&self) -> bool {
        match self.phase {
            JobPhase::Done(Status::Succeeded) => true,
            JobPhase::Done(s) if retryable(s) => self.attempt > self.retry,
            JobPhase::Done(_) => true,
            _ => false,
        }
    }

    fn final_status(&self) -> Option<Status> {
        match self.phase {
            JobPhase::Done(s) if self.is_final() => Some(s),
            _ => None,
        }
    }
}

/// Failed and timed-out attempts are retried; skipped and canceled ones are not.
fn retryable(status: Status) -> bool {
    matches!(status, Status::Failed | Status::TimedOut)
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct BuildRun {
    pub tenant: String,
    pub project: String,
    /// Log offset of BuildTriggered: builds are served first come, first served.
    pub triggered_offset: u64,
    /// The commit the build runs (empty: unknown, e.g. a local run outside git).
    pub commit: String,
    pub jobs: Vec<JobState>,
    pub planned: bool,
    pub canceled: bool,
    pub finished: bool,
}

/// The scheduler's read model: every unfinished build, plus what earlier builds left that
/// later ones use (successful runs to reuse, each project's caches).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SchedulerState {
    pub builds: BTreeMap<String, BuildRun>,
    /// Successful runs of `reuse: commit` jobs.
    pub reuse: ReuseIndex,
    /// Each project's cache archives.
    pub caches: CacheIndex,
}

impl SchedulerState {
    /// Folds one event. Pure; events for unknown builds or stale attempts change nothing.
    pub fn apply(&mut self, offset: u64, env: &Envelope) {
        self.apply_history(env);
        let Some(payload) = &env.payload else { return };
        if let Payload::BuildTriggered(t) = payload {
            self.builds
                .entry(env.build_id.clone())
                .or_insert_with(|| BuildRun {
                    tenant: env.tenant.clone(),
                    project: env.project.clone(),
                    triggered_offset: offset,
                    commit: t.commit.clone(),
                    ..BuildRun::default()
                });
            return;
        }
        let Some(build) = self.builds.get_mut(&env.build_id) else {
            return;
        };
        match payload {
            Payload::BuildQueued(q) if !build.planned => {
                build.planned = true;
                build.jobs = q.plan.iter().flat_map(|p| &p.jobs).map(job_state).collect();
            }
            Payload::BuildCanceled(_) => build.canceled = true,
            Payload::BuildFinished(_) => {
                // Nothing left to decide for it: forget it.
                self.builds.remove(&env.build_id);
            }
            Payload::JobQueued(e) => {
                if let Some(job) = job_mut(build, &e.job) {
                    if e.attempt > job.attempt {
                        job.attempt = e.attempt;
                        job.phase = JobPhase::Queued;
                    }
                }
            }
            Payload::JobAssigned(e) => {
                if let Some(job) = job_mut(build, &e.job) {
                    if e.attempt == job.attempt && job.phase == JobPhase::Queued {
                        job.phase = JobPhase::Assigned;
                    }
                }
            }
            Payload::JobStarted(e) => {
                if let Some(job) = job_mut(build, &e.job) {
                    if e.attempt == job.attempt
                        && matches!(job.phase, JobPhase::Queued | JobPhase::Assigned)
                    {
                        job.phase = JobPhase::Running;
                    }
                }
            }
            Payload::JobReused(e) => {
                if let Some(job) = job_mut(build, &e.job) {
                    if job.phase == JobPhase::Waiting && e.attempt > job.attempt {
                        job.attempt = e.attempt;
                        job.phase = JobPhase::Done(Status::Succeeded);
                        job.reason = reused_reason(e);
                    }
                }
            }
            Payload::JobFinished(e) => {
                if let Some(job) = job_mut(build, &e.job) {
                    let status = Status::try_from(e.status).unwrap_or(Status::Failed);
                    let skip = matches!(status, Status::Skipped | Status::Canceled)
                        && job.phase == JobPhase::Waiting;
                    let current =
                        e.attempt == job.attempt && !matches!(job.phase, JobPhase::Done(_));
                    if skip || current {
                        job.phase = JobPhase::Done(status);
                        job.reason = e.reason.clone();
                        if e.no_retry {
                            // A configuration error: no retry left.
                            job.retry = job.retry.min(job.attempt.saturating_sub(1));
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// Folds only what later builds use of an event (reuse and cache indexes): for a driver
    /// that schedules one build but must know the history (`tributary run`).
    pub fn apply_history(&mut self, env: &Envelope) {
        self.reuse.apply(env);
        self.caches.apply(env);
    }

    /// Jobs currently holding capacity (assigned or running), across all builds.
    pub fn busy(&self) -> usize {
        self.builds
            .values()
            .flat_map(|b| &b.jobs)
            .filter(|j| matches!(j.phase, JobPhase::Assigned | JobPhase::Running))
            .count()
    }
}

fn job_state(plan: &JobPlan) -> JobState {
    JobState {
        id: plan.id.clone(),
        needs: plan.needs.clone(),
        retry: plan.retry,
        phase: if plan.kept_from_build.is_empty() {
            JobPhase::Waiting
        } else {
            JobPhase::Done(Status::Succeeded)
        },
        attempt: 0,
        reason: String::new(),
        reuse: (plan.reuse == "commit" && plan.kept_from_build.is_empty())
            .then(|| definition_hash(plan)),
    }
}

/// `reused from build 12 (ID), job build attempt 1`.
pub fn reused_reason(e: &JobReused) -> String {
    let number = if e.from_number > 0 {
        format!("{} ({})", e.from_number, e.from_build)
    } else {
        e.from_build.clone()
    };
    format!(
        "reused from build {number}, job {} attempt {}",
        e.from_job, e.from_attempt
    )
}

fn job_mut<'a>(build: &'a mut BuildRun, id: &str) -> Option<&'a mut JobState> {
    build.jobs.iter_mut().find(|j| j.id == id)
}

/// What the scheduler wants done next.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Append JobQueued for this attempt.
    Queue {
        build: String,
        job: String,
        attempt: u32,
    },
    /// The job will not run: append JobFinished with this status (skipped or canceled), for
    /// its current attempt (0 for a job never queued) so every fold accepts it.
    Finish {
        build: String,
        job: String,
        attempt: u32,
        status: Status,
        reason: String,
    },
    /// Give the queued attempt to an agent (the driver picks the agent and appends JobAssigned).
    Assign {
        build: String,
        job: String,
        attempt: u32,
    },
    /// Every job is final: append BuildFinished.
    FinishBuild {
        build: String,
        status: Status,
        reason: String,
    },
    /// The job (`reuse: commit`) already succeeded at this commit: append JobReused instead
    /// of queueing it.
    Reuse {
        build: String,
        job: String,
        attempt: u32,
        definition: String,
        from: ReusedFrom,
    },
}

impl Decision {
    pub fn build_id(&self) -> &str {
        match self {
            Decision::Queue { build, .. }
            | Decision::Finish { build, .. }
            | Decision::Assign { build, .. }
            | Decision::Reuse { build, .. }
            | Decision::FinishBuild { build, .. } => build,
        }
    }

    /// The event that records this decision, for all but [`Decision::Assign`] (which needs
    /// the agent and lease the driver picks).
    pub fn payload(&self) -> Option<Payload> {
        Some(match self {
            Decision::Queue { job, attempt, .. } => Payload::JobQueued(JobQueued {
                job: job.clone(),
                attempt: *attempt,
            }),
            Decision::Finish {
                job,
                attempt,
                status,
                reason,
                ..
            } => Payload::JobFinished(JobFinished {
                job: job.clone(),
                attempt: *attempt,
                status: *status as i32,
                exit_code: -1,
                duration_us: 0,
                reason: reason.clone(),
                no_retry: false,
            }),
            Decision::FinishBuild { status, reason, .. } => Payload::BuildFinished(BuildFinished {
                status: *status as i32,
                duration_us: 0,
                reason: reason.clone(),
            }),
            Decision::Reuse {
                job,
                attempt,
                definition,
                from,
                ..
            } => reused_payload(job, *attempt, definition, from),
            Decision::Assign { .. } => return None,
        })
    }
}

/// The JobReused event for a reuse decision.
pub fn reused_payload(job: &str, attempt: u32, definition: &str, from: &ReusedFrom) -> Payload {
    Payload::JobReused(JobReused {
        job: job.to_owned(),
        attempt,
        from_build: from.build.clone(),
        from_job: from.job.clone(),
        from_attempt: from.attempt,
        from_number: from.number,
        definition: definition.to_owned(),
        artifacts: from.artifacts.clone(),
    })
}

/// Decides what to do next. `free_slots` is how many more jobs may be assigned now.
///
/// Builds are served in trigger order and jobs in plan order, so the result is deterministic.
pub fn decide(state: &SchedulerState, mut free_slots: usize) -> Vec<Decision> {
    let mut decisions = Vec::new();
    let mut builds: Vec<(&String, &BuildRun)> = state.builds.iter().collect();
    builds.sort_by_key(|(_, b)| b.triggered_offset);
    for (id, build) in builds {
        if !build.planned || build.finished {
            continue;
        }
        // Builds have a handful of jobs: a scan finds a need faster than a map built per round.
        let by_id = |need: &str| build.jobs.iter().find(|j| j.id == need);
        for job in &build.jobs {
            let build_id = || id.clone();
            match job.phase {
                JobPhase::Waiting if build.canceled => decisions.push(Decision::Finish {
                    build: build_id(),
                    job: job.id.clone(),
                    attempt: job.attempt,
                    status: Status::Canceled,
                    reason: "build canceled".into(),
                }),
                JobPhase::Waiting => {
                    let blocker = job.needs.iter().find_map(|n| {
                        let need = by_id(n)?;
                        match need.final_status() {
                            Some(Status::Succeeded) | None => None,
                            Some(s) => Some((n, s)),
                        }
                    });
                    if let Some((need, status)) = blocker {
                        decisions.push(Decision::Finish {
                            build: build_id(),
                            job: job.id.clone(),
                            attempt: job.attempt,
                            status: Status::Skipped,
                            reason: format!("needs {need}, which {}", outcome_words(status)),
                        });
                    } else if job
                        .needs
                        .iter()
                        .all(|n| by_id(n).and_then(|j| j.final_status()) == Some(Status::Succeeded))
                    {
                        let reusable = job.reuse.as_ref().and_then(|definition| {
                            let from = state.reuse.lookup(
                                &build.tenant,
                                &build.project,
                                &build.commit,
                                definition,
                            )?;
                            (from.build != *id).then(|| (definition.clone(), from.clone()))
                        });
                        decisions.push(match reusable {
                            Some((definition, from)) => Decision::Reuse {
                                build: build_id(),
                                job: job.id.clone(),
                                attempt: 1,
                                definition,
                                from,
                            },
                            None => Decision::Queue {
                                build: build_id(),
                                job: job.id.clone(),
                                attempt: 1,
                            },
                        });
                    }
                }
                JobPhase::Queued if build.canceled => decisions.push(Decision::Finish {
                    build: build_id(),
                    job: job.id.clone(),
                    attempt: job.attempt,
                    status: Status::Canceled,
                    reason: "build canceled".into(),
                }),
                JobPhase::Queued if free_slots > 0 => {
                    free_slots -= 1;
                    decisions.push(Decision::Assign {
                        build: build_id(),
                        job: job.id.clone(),
                        attempt: job.attempt,
                    });
                }
                JobPhase::Done(status) if !job.is_final() && !build.canceled => {
                    debug_assert!(retryable(status));
                    decisions.push(Decision::Queue {
                        build: build_id(),
                        job: job.id.clone(),
                        attempt: job.attempt + 1,
                    });
                }
                _ => {}
            }
        }
        let all_final = build
            .jobs
            .iter()
            .all(|j| j.is_final() || (build.canceled && matches!(j.phase, JobPhase::Done(_))));
        if all_final {
            let (status, reason) = build_outcome(build);
            decisions.push(Decision::FinishBuild {
                build: id.clone(),
                status,
                reason,
            });
        }
    }
    decisions
}

fn outcome_words(status: Status) -> &'static str {
    match status {
        Status::Failed => "failed",
        Status::TimedOut => "timed out",
        Status::Skipped => "was skipped",
        Status::Canceled => "was canceled",
        _ => "did not succeed",
    }
}

fn build_outcome(build: &BuildRun) -> (Status, String) {
    if build.canceled {
        return (Status::Canceled, "canceled".into());
    }
    match build.jobs.iter().find(
        |j| matches!(j.phase, JobPhase::Done(s) if s != Status::Succeeded && s != Status::Skipped),
    ) {
        Some(job) => (
            Status::Failed,
            format!("job {} failed: {}", job.id, job.reason),
        ),
        None if build
            .jobs
            .iter()
            .all(|j| j.phase == JobPhase::Done(Status::Succeeded)) =>
        {
            (Status::Succeeded, String::new())
        }
        None => (Status::Failed, "some jobs were skipped".into()),
    }
}

pub mod caches;
pub mod cluster;
pub mod ownership;
pub mod reuse;
pub mod seen;
pub mod service;
#[cfg(test)]
mod tests;
