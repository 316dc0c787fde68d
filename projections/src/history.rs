//! Time travel: a build as it stood at any moment, folded from its own events by the
//! projector's fold ([`crate::builds::apply`]), so the answer is exact, not reconstructed.
//!
//! A build's records are the records with its id as partition key in its events partition, in
//! offset order (on a one-partition log its log chunks are among them; on a log with a logs
//! topic they are not, which changes only the byte counters, never a phase or an exit code).
//! [`build_at`] folds the longest prefix of them that ends at the moment asked for:
//! * [`Moment::Offset`]: every record at or before that offset of the build's events partition;
//! * [`Moment::Time`]: every record up to the first one stamped after that time. Writers'
//!   clocks differ a little (agents, scheduler), so a record stamped earlier than one before
//!   it does not jump the queue: the answer is always a state the build really went through.
//!
//! [`waiting_at`] adds the scheduler's recorded waiting reasons (`JobWaiting`), which change no
//! state, and [`moments`] lists the records that change what the build page shows (a slider).
//! All pure.

use std::collections::BTreeMap;

use tributary_proto::events::{envelope::Payload, Envelope, Status};

use crate::builds::{Build, BuildsState};

/// A moment in a build's life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Moment {
    /// Up to and including the record at this offset of the build's events partition.
    Offset(u64),
    /// Up to the first record stamped after this time (µs since the epoch).
    Time(i64),
}

/// The build at a moment.
#[derive(Clone, Debug, PartialEq)]
pub struct BuildAt {
    pub build: Build,
    /// Offset and time of the last record folded.
    pub offset: u64,
    pub time_us: i64,
    /// Queued jobs' waiting reasons as the scheduler last recorded them (by job id).
    pub waiting: BTreeMap<String, String>,
}

/// The records of `records` (the build's, in offset order) that happened by `at`.
pub fn prefix(records: &[(u64, Envelope)], at: Moment) -> &[(u64, Envelope)] {
    let end = records
        .iter()
        .position(|(offset, env)| match at {
            Moment::Offset(o) => *offset > o,
            Moment::Time(t) => env.time_us > t,
        })
        .unwrap_or(records.len());
    &records[..end]
}

/// Build `build_id` folded from its records up to `at`; None if it did not exist yet.
pub fn build_at(build_id: &str, records: &[(u64, Envelope)], at: Moment) -> Option<BuildAt> {
    let records = prefix(records, at);
    let mut state = BuildsState::default();
    for (offset, env) in records {
        state.apply(*offset, env);
    }
    let build = state.builds.remove(build_id)?;
    let (offset, time_us) = records
        .last()
        .map(|(o, e)| (*o, e.time_us))
        .unwrap_or_default();
    let waiting = waiting_at(&build, records);
    Some(BuildAt {
        build,
        offset,
        time_us,
        waiting,
    })
}

/// The last waiting reason recorded for each job of `build` that is queued in it, for its
/// current attempt (a reason of an earlier attempt no longer holds).
pub fn waiting_at(build: &Build, records: &[(u64, Envelope)]) -> BTreeMap<String, String> {
    let mut last: BTreeMap<&str, (u32, &str)> = BTreeMap::new();
    for (_, env) in records {
        if env.build_id != build.id {
            continue;
        }
        if let Some(Payload::JobWaiting(w)) = &env.payload {
            last.insert(w.job.as_str(), (w.attempt, w.reason.as_str()));
        }
    }
    build
        .jobs
        .iter()
        .filter(|j| j.phase == crate::Phase::Queued)
        .filter_map(|j| {
            let (attempt, reason) = last.get(j.id.as_str())?;
            (*attempt == j.attempt).then(|| (j.id.clone(), (*reason).to_owned()))
        })
        .collect()
}

/// One step of a build's history: a record that changed what its page shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mark {
    pub offset: u64,
    pub time_us: i64,
    /// What happened, for people: `line 1 of step "test" of job a started`.
    pub label: String,
}

/// The records of build `build_id` that change its state (phases, exit codes, lines) or its
/// waiting reasons, in order: the positions of a time slider. Log chunks (bytes only) are
/// left out.
pub fn moments(build_id: &str, records: &[(u64, Envelope)]) -> Vec<Mark> {
    let mut state = BuildsState::default();
    let mut marks = Vec::new();
    for (offset, env) in records {
        if env.build_id != build_id {
            continue;
        }
        let before = state.builds.get(build_id).map(|b| b.last_offset);
        state.apply(*offset, env);
        let changed = state.builds.get(build_id).map(|b| b.last_offset) != before;
        let counts = match &env.payload {
            Some(Payload::LogChunk(_)) => false,
            Some(Payload::JobWaiting(_)) => true,
            _ => changed,
        };
        if counts {
            marks.push(Mark {
                offset: *offset,
                time_us: env.time_us,
                label: describe(env),
            });
        }
    }
    marks
}

/// One event in a few words.
pub fn describe(env: &Envelope) -> String {
    let Some(payload) = &env.payload else {
        return "an event of a newer version".into();
    };
    let status = |s: i32| Status::try_from(s).map_or("ended", Status::name);
    match payload {
        Payload::BuildTriggered(t) => format!("build {} triggered by {}", t.number, t.who),
        Payload::BuildQueued(q) => format!(
            "pipeline planned: {} jobs",
            q.plan.as_ref().map_or(0, |p| p.jobs.len())
        ),
        Payload::PipelineRejected(r) => format!("pipeline rejected: {}", r.message),
        Payload::BuildCanceled(c) => format!("build canceled by {}", c.who),
        Payload::BuildFinished(f) => format!("build {}", status(f.status)),
        Payload::JobQueued(e) => format!("job {} queued (attempt {})", e.job, e.attempt),
        Payload::JobWaiting(e) => format!("job {} waits: {}", e.job, e.reason),
        Payload::JobAssigned(e) => format!("job {} assigned to agent {}", e.job, e.agent_id),
        Payload::JobStarted(e) => format!("job {} started", e.job),
        Payload::JobRequeued(e) => format!("job {} requeued: {}", e.job, e.reason),
        Payload::JobReused(e) => format!("job {} reused from build {}", e.job, e.from_build),
        Payload::JobFinished(e) => format!("job {} {}", e.job, status(e.status)),
        Payload::StepStarted(e) => format!("step {:?} of job {} started", e.name, e.job),
        Payload::StepFinished(e) => {
            format!("step {} of job {} {}", e.step + 1, e.job, status(e.status))
        }
        Payload::LineStarted(e) => format!(
            "line {} of step {} of job {} started",
            e.line + 1,
            e.step + 1,
            e.job
        ),
        Payload::LineExited(e) => format!(
            "line {} of step {} of job {} exited with {}",
            e.line + 1,
            e.step + 1,
            e.job,
            e.exit_code
        ),
        other => other.type_name().replace('_', " "),
    }
}

#[cfg(test)]
mod tests;
