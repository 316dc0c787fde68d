//! The builds read model: builds → jobs → steps → lines, with status, exit codes and timings.
//!
//! [`apply`] is a pure fold: no clock, no randomness, no I/O. Time comes from the events, so a
//! replay from offset 0 rebuilds exactly the same state.
//!
//! Invariants the fold keeps (and the projector relies on):
//! * An event only changes the build named by its `build_id`, so a partial state holding just
//!   the builds a batch touches folds exactly like the full state.
//! * Inconsistent events (unknown build, unknown job, a stale attempt) change nothing.
//! * Per (job, attempt), the first `JobAssigned` in log order wins; later ones are ignored.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tributary_proto::events::{envelope::Payload, Envelope, Status};

/// Lifecycle of a build, job, step or line as the read model shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Known but not started (a job waiting for its needs, a line not reached yet).
    #[default]
    Pending,
    /// A job whose needs are met, waiting for an agent.
    Queued,
    /// A job leased to an agent that has not started it yet.
    Assigned,
    Running,
    Succeeded,
    Failed,
    Skipped,
    Canceled,
    TimedOut,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Pending => "pending",
            Phase::Queued => "queued",
            Phase::Assigned => "assigned",
            Phase::Running => "running",
            Phase::Succeeded => "succeeded",
            Phase::Failed => "failed",
            Phase::Skipped => "skipped",
            Phase::Canceled => "canceled",
            Phase::TimedOut => "timed_out",
        }
    }

    pub fn parse(s: &str) -> Option<Phase> {
        Some(match s {
            "pending" => Phase::Pending,
            "queued" => Phase::Queued,
            "assigned" => Phase::Assigned,
            "running" => Phase::Running,
            "succeeded" => Phase::Succeeded,
            "failed" => Phase::Failed,
            "skipped" => Phase::Skipped,
            "canceled" => Phase::Canceled,
            "timed_out" => Phase::TimedOut,
            _ => return None,
        })
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Phase::Succeeded | Phase::Failed | Phase::Skipped | Phase::Canceled | Phase::TimedOut
        )
    }

    fn from_status(status: i32) -> Phase {
        match Status::try_from(status) {
            Ok(Status::Succeeded) => Phase::Succeeded,
            Ok(Status::Failed) => Phase::Failed,
            Ok(Status::Skipped) => Phase::Skipped,
            Ok(Status::Canceled) => Phase::Canceled,
            Ok(Status::TimedOut) => Phase::TimedOut,
            // An unknown status from a newer writer: terminal, but we can't say more.
            _ => Phase::Failed,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Build {
    pub id: String,
    pub tenant: String,
    pub project: String,
    pub number: u64,
    pub phase: Phase,
    pub who: String,
    pub source: String,
    pub repository: String,
    pub git_ref: String,
    pub commit: String,
    pub pipeline_path: String,
    pub triggered_us: i64,
    pub started_us: Option<i64>,
    pub finished_us: Option<i64>,
    /// Why the build did not succeed (pipeline error, failed job, cancel), empty otherwise.
    pub reason: String,
    /// Offset of the last event that changed this build (audit aid for `replay --check`).
    pub last_offset: u64,
    /// Jobs in plan order.
    pub jobs: Vec<Job>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub name: String,
    /// `name=value` pairs of the matrix instance, in axis order.
    pub matrix: Vec<(String, String)>,
    pub needs: Vec<String>,
    pub phase: Phase,
    /// Current attempt, 0 before the first JobQueued.
    pub attempt: u32,
    pub agent_id: String,
    pub lease_id: String,
    pub queued_us: Option<i64>,
    pub started_us: Option<i64>,
    pub finished_us: Option<i64>,
    pub exit_code: Option<i32>,
    pub reason: String,
    pub log_bytes: u64,
    pub steps: Vec<Step>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub name: String,
    pub phase: Phase,
    pub started_us: Option<i64>,
    pub duration_us: Option<u64>,
    pub exit_code: Option<i32>,
    pub lines: Vec<Line>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Line {
    pub text: String,
    pub phase: Phase,
    pub started_us: Option<i64>,
    pub duration_us: Option<u64>,
    pub exit_code: Option<i32>,
    pub log_bytes: u64,
}

/// The whole read model: every build by id.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BuildsState {
    pub builds: BTreeMap<String, Build>,
}

/// What part of the read model an event can change; the store rewrites exactly that.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Touch {
    Nothing,
    /// The build row only.
    Build,
    /// The build row and one job with all its steps and lines.
    Job(String),
    /// The build row, a job row, one step row and one line row.
    Line {
        job: String,
        step: u32,
        line: u32,
    },
    /// Everything of the build.
    WholeBuild,
}

/// What `env` can change, without looking at the state. Pure.
pub fn touches(env: &Envelope) -> Touch {
    let Some(payload) = &env.payload else {
        return Touch::Nothing;
    };
    match payload {
        Payload::BuildTriggered(_) | Payload::BuildQueued(_) => Touch::WholeBuild,
        Payload::PipelineRejected(_) | Payload::BuildFinished(_) | Payload::BuildCanceled(_) => {
            Touch::Build
        }
        Payload::JobQueued(e) => Touch::Job(e.job.clone()),
        Payload::JobAssigned(e) => Touch::Job(e.job.clone()),
        Payload::JobStarted(e) => Touch::Job(e.job.clone()),
        Payload::JobFinished(e) => Touch::Job(e.job.clone()),
        Payload::JobRequeued(e) => Touch::Job(e.job.clone()),
        Payload::JobReused(e) => Touch::Job(e.job.clone()),
        Payload::StepStarted(e) => Touch::Job(e.job.clone()),
        Payload::StepFinished(e) => Touch::Job(e.job.clone()),
        Payload::LineStarted(e) => Touch::Line {
            job: e.job.clone(),
            step: e.step,
            line: e.line,
        },
        Payload::LogChunk(e) => Touch::Line {
            job: e.job.clone(),
            step: e.step,
            line: e.line,
        },
        Payload::LineExited(e) => Touch::Line {
            job: e.job.clone(),
            step: e.step,
            line: e.line,
        },
        // Usage, directory and agent events belong to other read models.
        _ => Touch::Nothing,
    }
}

impl BuildsState {
    /// Folds one event at `offset` into the state.
    pub fn apply(&mut self, offset: u64, env: &Envelope) {
        apply(self, offset, env)
    }
}

/// The fold: `state + event -> state`.
pub fn apply(state: &mut BuildsState, offset: u64, env: &Envelope) {
    let Some(payload) = &env.payload else { return };
    if let Payload::BuildTriggered(t) = payload {
        if state.builds.contains_key(&env.build_id) {
            return; // a build is triggered once; a duplicate trigger changes nothing
        }
        state.builds.insert(
            env.build_id.clone(),
            Build {
                id: env.build_id.clone(),
                tenant: env.tenant.clone(),
                project: env.project.clone(),
                number: t.number,
                phase: Phase::Pending,
                who: t.who.clone(),
                source: t.source.clone(),
                repository: t.repository.clone(),
                git_ref: t.git_ref.clone(),
                commit: t.commit.clone(),
                pipeline_path: t.pipeline_path.clone(),
                triggered_us: env.time_us,
                last_offset: offset,
                ..Build::default()
            },
        );
        return;
    }
    let Some(build) = state.builds.get_mut(&env.build_id) else {
        return;
    };
    if apply_to_build(build, env.time_us, payload) {
        build.last_offset = offset;
    }
}

/// Applies a payload to its build; returns whether anything changed.
fn apply_to_build(build: &mut Build, time_us: i64, payload: &Payload) -> bool {
    match payload {
        Payload::BuildTriggered(_) => false,
        Payload::BuildQueued(q) => {
            if !build.jobs.is_empty() || build.phase.is_terminal() {
                return false;
            }
            let Some(plan) = &q.plan else { return false };
            build.phase = Phase::Queued;
            build.jobs = plan
                .jobs
                .iter()
                .map(|j| Job {
                    id: j.id.clone(),
                    name: j.name.clone(),
                    phase: if j.kept_from_build.is_empty() {
                        Phase::Pending
                    } else {
                        Phase::Succeeded
                    },
                    reason: if j.kept_from_build.is_empty() {
                        String::new()
                    } else {
                        format!("succeeded in build {}; not re-run", j.kept_from_build)
                    },
                    matrix: j
                        .matrix
                        .iter()
                        .map(|m| (m.name.clone(), m.value.clone()))
                        .collect(),
                    needs: j.needs.clone(),
                    steps: j
                        .steps
                        .iter()
                        .map(|s| Step {
                            name: s.name.clone(),
                            lines: s
                                .lines
                                .iter()
                                .map(|l| Line {
                                    text: l.clone(),
                                    ..Line::default()
                                })
                                .collect(),
                            ..Step::default()
                        })
                        .collect(),
                    ..Job::default()
                })
                .collect();
            true
        }
        Payload::PipelineRejected(r) => {
            build.reason = format!("{}:{}:{}: {}", r.file, r.line, r.column, r.message);
            true
        }
        Payload::BuildCanceled(c) => {
            if build.phase.is_terminal() {
                return false;
            }
            build.reason = if c.reason.is_empty() {
                format!("canceled by {}", c.who)
            } else {
                format!("canceled by {}: {}", c.who, c.reason)
            };
            true
        }
        Payload::BuildFinished(f) => {
            if build.phase.is_terminal() {
                return false;
            }
            build.phase = Phase::from_status(f.status);
            build.finished_us = Some(time_us);
            if !f.reason.is_empty() {
                build.reason = f.reason.clone();
            }
            true
        }
        Payload::JobQueued(e) => {
            let Some(job) = job_mut(build, &e.job) else {
                return false;
            };
            if e.attempt <= job.attempt {
                return false;
            }
            job.attempt = e.attempt;
            job.phase = Phase::Queued;
            job.queued_us = Some(time_us);
            job.agent_id.clear();
            job.lease_id.clear();
            job.started_us = None;
            job.finished_us = None;
            job.exit_code = None;
            job.reason.clear();
            job.log_bytes = 0;
            for step in &mut job.steps {
                reset_step(step);
            }
            true
        }
        Payload::JobAssigned(e) => {
            let Some(job) = job_mut(build, &e.job) else {
                return false;
            };
            // First assignment of the current attempt wins.
            if e.attempt != job.attempt || job.phase != Phase::Queued {
                return false;
            }
            job.phase = Phase::Assigned;
            job.agent_id = e.agent_id.clone();
            job.lease_id = e.lease_id.clone();
            true
        }
        Payload::JobStarted(e) => {
            let Some(job) = current_attempt(build, &e.job, e.attempt) else {
                return false;
            };
            if job.phase != Phase::Assigned && job.phase != Phase::Queued {
                return false;
            }
            job.phase = Phase::Running;
            job.started_us = Some(time_us);
            if build.started_us.is_none() {
                build.started_us = Some(time_us);
            }
            if build.phase == Phase::Queued || build.phase == Phase::Pending {
                build.phase = Phase::Running;
            }
            true
        }
        Payload::StepStarted(e) => {
            let Some(step) = step_mut(build, &e.job, e.attempt, e.step) else {
                return false;
            };
            step.phase = Phase::Running;
            step.started_us = Some(time_us);
            true
        }
        Payload::LineStarted(e) => {
            let Some(line) = line_mut(build, &e.job, e.attempt, e.step, e.line) else {
                return false;
            };
            line.phase = Phase::Running;
            line.started_us = Some(time_us);
            true
        }
        Payload::LogChunk(e) => {
            let n = e.data.len() as u64;
            let Some(job) = current_attempt(build, &e.job, e.attempt) else {
                return false;
            };
            job.log_bytes += n;
            if let Some(line) = job
                .steps
                .get_mut(e.step as usize)
                .and_then(|s| s.lines.get_mut(e.line as usize))
            {
                line.log_bytes += n;
            }
            true
        }
        Payload::LineExited(e) => {
            let Some(line) = line_mut(build, &e.job, e.attempt, e.step, e.line) else {
                return false;
            };
            line.phase = if e.exit_code == 0 {
                Phase::Succeeded
            } else {
                Phase::Failed
            };
            line.exit_code = Some(e.exit_code);
            line.duration_us = Some(e.duration_us);
            true
        }
        Payload::StepFinished(e) => {
            let Some(step) = step_mut(build, &e.job, e.attempt, e.step) else {
                return false;
            };
            step.phase = Phase::from_status(e.status);
            step.exit_code = Some(e.exit_code);
            step.duration_us = Some(e.duration_us);
            true
        }
        Payload::JobFinished(e) => {
            let Some(job) = job_mut(build, &e.job) else {
                return false;
            };
            // A skipped job never got an attempt; anything else must match the current one.
            let skipped = e.status == Status::Skipped as i32;
            if job.phase.is_terminal() || (!skipped && e.attempt != job.attempt) {
                return false;
            }
            job.phase = Phase::from_status(e.status);
            job.finished_us = Some(time_us);
            job.exit_code = Some(e.exit_code);
            job.reason = e.reason.clone();
            true
        }
        Payload::JobReused(e) => {
            let Some(job) = job_mut(build, &e.job) else {
                return false;
            };
            if job.phase.is_terminal() || e.attempt <= job.attempt {
                return false;
            }
            // Not run: it counts as succeeded, from the earlier run it reuses.
            job.attempt = e.attempt;
            job.phase = Phase::Succeeded;
            job.queued_us = Some(time_us);
            job.finished_us = Some(time_us);
            job.exit_code = Some(0);
            let number = if e.from_number > 0 {
                format!("{} ({})", e.from_number, e.from_build)
            } else {
                e.from_build.clone()
            };
            job.reason = format!(
                "reused from build {number}, job {} attempt {}",
                e.from_job, e.from_attempt
            );
            true
        }
        Payload::JobRequeued(e) => {
            let Some(job) = current_attempt(build, &e.job, e.attempt) else {
                return false;
            };
            job.phase = Phase::Queued;
            job.reason = format!("attempt {} requeued: {}", e.attempt, e.reason);
            true
        }
        _ => false,
    }
}

fn reset_step(step: &mut Step) {
    step.phase = Phase::Pending;
    step.started_us = None;
    step.duration_us = None;
    step.exit_code = None;
    for line in &mut step.lines {
        *line = Line {
            text: std::mem::take(&mut line.text),
            ..Line::default()
        };
    }
}

fn job_mut<'a>(build: &'a mut Build, job: &str) -> Option<&'a mut Job> {
    build.jobs.iter_mut().find(|j| j.id == job)
}

/// The job, only if `attempt` is its current attempt (events of stale attempts are fenced off).
fn current_attempt<'a>(build: &'a mut Build, job: &str, attempt: u32) -> Option<&'a mut Job> {
    job_mut(build, job).filter(|j| j.attempt == attempt && !j.phase.is_terminal())
}

fn step_mut<'a>(build: &'a mut Build, job: &str, attempt: u32, step: u32) -> Option<&'a mut Step> {
    current_attempt(build, job, attempt)?
        .steps
        .get_mut(step as usize)
}

fn line_mut<'a>(
    build: &'a mut Build,
    job: &str,
    attempt: u32,
    step: u32,
    line: u32,
) -> Option<&'a mut Line> {
    step_mut(build, job, attempt, step)?
        .lines
        .get_mut(line as usize)
}
