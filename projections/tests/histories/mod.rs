//! A generator of build histories for the replay property (`tests/replay_explored.rs`): several
//! builds whose events are interleaved in a random order (each build's own order kept, and the
//! events of a build's jobs interleaved too, as concurrent agents produce them), with retries
//! after failures, requeues after lost agents (and the lost agent's late events of its fenced
//! attempt), late second assignments, cancels, reused and skipped jobs, re-delivered events
//! (the same event id again, shortly after), events of an unknown type and undecodable records.
//!
//! [`History`] is what proptest generates and shrinks (plain data); [`History::records`] turns
//! it into what is appended to the log.

use proptest::prelude::*;
use prost::Message;
use tributary_proto::events::envelope::Payload;
use tributary_proto::events::*;

/// How one attempt of a job ends.
#[derive(Debug, Clone)]
pub enum Attempt {
    /// Every line exits 0.
    Succeeds,
    /// The line at this index (over all the job's lines, modulo their count) exits non-zero.
    Fails(usize),
    /// The agent is lost after this many of the attempt's events (modulo their count): the
    /// scheduler requeues the attempt; `late` of the lost agent's events arrive afterwards.
    Lost { after: usize, late: usize },
    /// The job's timeout: the running line is cut and the job ends timed out.
    TimesOut(usize),
}

/// One job: its lines per step and its attempts (only the last may succeed; a job whose
/// attempts all fail has failed).
#[derive(Debug, Clone)]
pub enum JobSpec {
    Runs {
        lines_per_step: Vec<u32>,
        attempts: Vec<Attempt>,
        /// A second scheduler's late assignment of the first attempt (to be ignored).
        late_assignment: bool,
        chunks_per_line: u32,
    },
    /// `reuse: commit`: taken from an earlier build, never run.
    Reused,
    /// Never run (a job it needs failed).
    Skipped,
}

/// One build: its jobs, how their events interleave, and whether (after how many of its events)
/// it is canceled.
#[derive(Debug, Clone)]
pub struct BuildSpec {
    pub jobs: Vec<JobSpec>,
    /// Which job's next event comes next (indices modulo the jobs still going).
    pub job_order: Vec<usize>,
    pub cancel_after: Option<usize>,
    /// Rejected by the pipeline check: no plan, no jobs.
    pub rejected: bool,
}

/// Something to append to the log, or to inject between its events.
#[derive(Debug, Clone)]
pub enum Noise {
    /// The event at this index (modulo) again, with the same event id, this many records later.
    Duplicate { of: usize, later: usize },
    /// An event of a type this version does not know (a payload that decodes to None).
    Unknown(usize),
    /// Bytes that are not an envelope.
    Garbage(usize, Vec<u8>),
}

/// Several builds, the order their events interleave in, and the noise among them.
#[derive(Debug, Clone)]
pub struct History {
    pub builds: Vec<BuildSpec>,
    /// Which build's next event comes next (indices modulo the builds still going).
    pub order: Vec<usize>,
    pub noise: Vec<Noise>,
}

/// A record for the log: an event (appended normally) or raw bytes (appended as they are, so
/// the log's own duplicate check does not drop a re-delivery).
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // test data: one Envelope per item, moved not copied
pub enum Item {
    Event(Envelope),
    Raw { key: String, data: Vec<u8> },
}

fn attempt() -> impl Strategy<Value = Attempt> {
    prop_oneof![
        4 => Just(Attempt::Succeeds),
        2 => (0usize..20).prop_map(Attempt::Fails),
        2 => (0usize..30, 0usize..4).prop_map(|(after, late)| Attempt::Lost { after, late }),
        1 => (0usize..20).prop_map(Attempt::TimesOut),
    ]
}

fn job() -> impl Strategy<Value = JobSpec> {
    prop_oneof![
        8 => (
            proptest::collection::vec(1u32..4, 1..4),
            proptest::collection::vec(attempt(), 1..4),
            any::<bool>(),
            0u32..3,
        )
            .prop_map(|(lines_per_step, attempts, late_assignment, chunks_per_line)| {
                JobSpec::Runs {
                    lines_per_step,
                    attempts,
                    late_assignment,
                    chunks_per_line,
                }
            }),
        1 => Just(JobSpec::Reused),
        1 => Just(JobSpec::Skipped),
    ]
}

fn build() -> impl Strategy<Value = BuildSpec> {
    (
        proptest::collection::vec(job(), 1..4),
        proptest::collection::vec(0usize..8, 0..200),
        proptest::option::weighted(0.25, 0usize..80),
        proptest::bool::weighted(0.05),
    )
        .prop_map(|(jobs, job_order, cancel_after, rejected)| BuildSpec {
            jobs,
            job_order,
            cancel_after,
            rejected,
        })
}

fn noise() -> impl Strategy<Value = Noise> {
    prop_oneof![
        4 => (any::<usize>(), 1usize..40).prop_map(|(of, later)| Noise::Duplicate { of, later }),
        1 => any::<usize>().prop_map(Noise::Unknown),
        1 => (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..12))
            .prop_map(|(at, bytes)| Noise::Garbage(at, bytes)),
    ]
}

/// Histories of 1 to 5 builds.
pub fn history() -> impl Strategy<Value = History> {
    (
        proptest::collection::vec(build(), 1..6),
        proptest::collection::vec(0usize..8, 0..400),
        proptest::collection::vec(noise(), 0..12),
    )
        .prop_map(|(builds, order, noise)| History {
            builds,
            order,
            noise,
        })
}

/// Merges `streams` keeping each one's order: the next item comes from the stream
/// `order[i] % (streams still going)`, round-robin once `order` is used up.
fn merge<T>(streams: Vec<Vec<T>>, order: &[usize]) -> Vec<(usize, T)> {
    let mut going: Vec<(usize, std::vec::IntoIter<T>)> = streams
        .into_iter()
        .map(Vec::into_iter)
        .enumerate()
        .collect();
    let mut out = Vec::new();
    let mut choices = order.iter().copied();
    let mut round_robin = 0;
    while !going.is_empty() {
        let pick = match choices.next() {
            Some(c) => c % going.len(),
            None => {
                round_robin += 1;
                round_robin % going.len()
            }
        };
        match going[pick].1.next() {
            Some(item) => out.push((going[pick].0, item)),
            None => {
                going.remove(pick);
            }
        }
    }
    out
}

struct Clock(i64);

impl Clock {
    fn tick(&mut self) -> i64 {
        self.0 += 1000;
        self.0
    }
}

fn event(build: &str, time_us: i64, payload: Payload) -> Envelope {
    Envelope {
        event_id: tributary_proto::new_id(),
        tenant: "acme".into(),
        project: "web".into(),
        build_id: build.into(),
        time_us,
        payload: Some(payload),
    }
}

/// The events of one job's run (every attempt), in the job's own order; the bool says whether
/// the event is the job's final `JobFinished`.
fn job_events(build: &str, j: usize, spec: &JobSpec) -> Vec<(Payload, bool)> {
    let job = format!("job{j}");
    let (lines_per_step, attempts, late_assignment, chunks_per_line) = match spec {
        JobSpec::Reused => {
            return vec![(
                Payload::JobReused(JobReused {
                    job,
                    attempt: 1,
                    from_build: format!("{build}-earlier"),
                    from_job: format!("job{j}"),
                    from_attempt: 1,
                    from_number: 1,
                    definition: "d".into(),
                    artifacts: vec![],
                }),
                true,
            )];
        }
        JobSpec::Skipped => {
            return vec![(
                Payload::JobFinished(JobFinished {
                    job,
                    attempt: 0,
                    status: Status::Skipped as i32,
                    reason: "a job it needs failed".into(),
                    ..Default::default()
                }),
                true,
            )];
        }
        JobSpec::Runs {
            lines_per_step,
            attempts,
            late_assignment,
            chunks_per_line,
        } => (lines_per_step, attempts, late_assignment, chunks_per_line),
    };
    let total_lines: usize = lines_per_step.iter().map(|&n| n as usize).sum();
    let mut out = Vec::new();
    let mut late: Vec<Payload> = Vec::new();
    for (a, outcome) in attempts.iter().enumerate() {
        let attempt = a as u32 + 1;
        let last = a + 1 == attempts.len();
        out.push((
            Payload::JobQueued(JobQueued {
                job: job.clone(),
                attempt,
            }),
            false,
        ));
        // The lost agent's late events arrive once the next attempt is queued: fenced off.
        out.extend(late.drain(..).map(|p| (p, false)));
        let agent = format!("agent-{}", a % 3);
        let lease = format!("lease-{build}-{j}-{attempt}");
        out.push((
            Payload::JobAssigned(JobAssigned {
                job: job.clone(),
                attempt,
                agent_id: agent.clone(),
                lease_id: lease.clone(),
                deadline_us: 0,
            }),
            false,
        ));
        if *late_assignment && a == 0 {
            out.push((
                Payload::JobAssigned(JobAssigned {
                    job: job.clone(),
                    attempt,
                    agent_id: "agent-late".into(),
                    lease_id: "late".into(),
                    deadline_us: 0,
                }),
                false,
            ));
        }
        // The attempt's run, then how it ends.
        let mut run = vec![Payload::JobStarted(JobStarted {
            job: job.clone(),
            attempt,
            agent_id: agent.clone(),
            ..Default::default()
        })];
        let failing_line = match outcome {
            Attempt::Fails(at) | Attempt::TimesOut(at) => Some(at % total_lines),
            _ => None,
        };
        let mut index = 0;
        let mut ended = false;
        for (s, &lines) in lines_per_step.iter().enumerate() {
            let step = s as u32;
            run.push(Payload::StepStarted(StepStarted {
                job: job.clone(),
                attempt,
                step,
                name: format!("s{s}"),
            }));
            for line in 0..lines {
                run.push(Payload::LineStarted(LineStarted {
                    job: job.clone(),
                    attempt,
                    step,
                    line,
                    text: format!("echo {j}.{s}.{line}"),
                }));
                for c in 0..*chunks_per_line {
                    run.push(Payload::LogChunk(LogChunk {
                        job: job.clone(),
                        attempt,
                        step,
                        line,
                        stream: Stream::Stdout as i32,
                        data: format!("out {c} of {j}.{s}.{line} attempt {attempt}\n").into_bytes(),
                        ..Default::default()
                    }));
                }
                let fails = failing_line == Some(index);
                index += 1;
                if fails && matches!(outcome, Attempt::TimesOut(_)) {
                    ended = true;
                    break;
                }
                let exit_code = if fails { 2 } else { 0 };
                run.push(Payload::LineExited(LineExited {
                    job: job.clone(),
                    attempt,
                    step,
                    line,
                    exit_code,
                    duration_us: 1000 + u64::from(line),
                }));
                if fails {
                    ended = true;
                    break;
                }
            }
            let status = if ended {
                Status::Failed
            } else {
                Status::Succeeded
            };
            run.push(Payload::StepFinished(StepFinished {
                job: job.clone(),
                attempt,
                step,
                status: status as i32,
                exit_code: if ended { 2 } else { 0 },
                duration_us: 3000,
            }));
            if ended {
                break;
            }
        }
        match outcome {
            Attempt::Lost { after, late: n } => {
                let cut = after % run.len() + 1;
                late = run.split_off(cut).into_iter().take(*n).collect();
                out.extend(run.into_iter().map(|p| (p, false)));
                out.push((
                    Payload::JobRequeued(JobRequeued {
                        job: job.clone(),
                        attempt,
                        agent_id: agent,
                        lease_id: lease,
                        reason: format!("agent-{} lost", a % 3),
                    }),
                    false,
                ));
                if last {
                    // Requeued and never run again before the build ended: it ends canceled.
                    out.push((
                        Payload::JobFinished(JobFinished {
                            job: job.clone(),
                            attempt,
                            status: Status::Canceled as i32,
                            reason: "no agent came back".into(),
                            ..Default::default()
                        }),
                        true,
                    ));
                }
            }
            _ => {
                out.extend(run.into_iter().map(|p| (p, false)));
                let (status, exit_code, reason) = match outcome {
                    Attempt::Succeeds => (Status::Succeeded, 0, String::new()),
                    Attempt::TimesOut(_) => (Status::TimedOut, -1, "timed out after 1s".into()),
                    _ => (Status::Failed, 2, "a line exited with 2".into()),
                };
                let succeeded = matches!(outcome, Attempt::Succeeds);
                out.push((
                    Payload::JobFinished(JobFinished {
                        job: job.clone(),
                        attempt,
                        status: status as i32,
                        exit_code,
                        duration_us: 10_000,
                        reason,
                        no_retry: false,
                    }),
                    last || succeeded,
                ));
                if succeeded {
                    break;
                }
            }
        }
    }
    // Late events of a last lost attempt come after its end.
    out.extend(late.into_iter().map(|p| (p, false)));
    out
}

/// Whether a job's final `JobFinished` (or reuse) is a success.
fn succeeded(p: &Payload) -> bool {
    match p {
        Payload::JobReused(_) => true,
        Payload::JobFinished(f) => f.status == Status::Succeeded as i32,
        _ => false,
    }
}

fn plan(spec: &BuildSpec) -> Plan {
    Plan {
        jobs: spec
            .jobs
            .iter()
            .enumerate()
            .map(|(j, job)| {
                let (lines, retry) = match job {
                    JobSpec::Runs {
                        lines_per_step,
                        attempts,
                        ..
                    } => (lines_per_step.clone(), attempts.len() as u32 - 1),
                    _ => (vec![1], 0),
                };
                JobPlan {
                    id: format!("job{j}"),
                    name: format!("job{j}"),
                    retry,
                    steps: lines
                        .iter()
                        .enumerate()
                        .map(|(s, &n)| StepPlan {
                            name: format!("s{s}"),
                            lines: (0..n).map(|l| format!("echo {j}.{s}.{l}")).collect(),
                        })
                        .collect(),
                    ..JobPlan::default()
                }
            })
            .collect(),
    }
}

/// The events of one build, in its own order.
fn build_events(b: usize, spec: &BuildSpec, clock: &mut Clock) -> Vec<Envelope> {
    let build = format!("b{b}");
    let mut out = vec![event(
        &build,
        clock.tick(),
        Payload::BuildTriggered(BuildTriggered {
            who: "ann".into(),
            source: "cli".into(),
            commit: format!("c{b}"),
            pipeline_path: ".tributary.yml".into(),
            ..Default::default()
        }),
    )];
    if spec.rejected {
        out.push(event(
            &build,
            clock.tick(),
            Payload::PipelineRejected(PipelineRejected {
                file: ".tributary.yml".into(),
                line: 3,
                column: 7,
                message: "unknown key `stpes`".into(),
            }),
        ));
        out.push(event(
            &build,
            clock.tick(),
            Payload::BuildFinished(BuildFinished {
                status: Status::Failed as i32,
                duration_us: 1,
                reason: "the pipeline is invalid".into(),
            }),
        ));
        return out;
    }
    out.push(event(
        &build,
        clock.tick(),
        Payload::BuildQueued(BuildQueued {
            plan: Some(plan(spec)),
        }),
    ));
    let jobs: Vec<Vec<(Payload, bool)>> = spec
        .jobs
        .iter()
        .enumerate()
        .map(|(j, job)| job_events(&build, j, job))
        .collect();
    let merged = merge(jobs, &spec.job_order);
    let cut = spec
        .cancel_after
        .map_or(merged.len(), |c| c.min(merged.len()));
    let mut finished = vec![None; spec.jobs.len()];
    let mut current_attempt = vec![0u32; spec.jobs.len()];
    for (j, (payload, last)) in merged.into_iter().take(cut) {
        if let Payload::JobQueued(q) = &payload {
            current_attempt[j] = q.attempt;
        }
        if last {
            finished[j] = Some(succeeded(&payload));
        }
        out.push(event(&build, clock.tick(), payload));
    }
    let canceled = cut < merged_len(spec);
    if canceled {
        out.push(event(
            &build,
            clock.tick(),
            Payload::BuildCanceled(BuildCanceled {
                who: "bob".into(),
                reason: "not needed".into(),
            }),
        ));
        for (j, done) in finished.iter().enumerate() {
            if done.is_none() {
                out.push(event(
                    &build,
                    clock.tick(),
                    Payload::JobFinished(JobFinished {
                        job: format!("job{j}"),
                        attempt: current_attempt[j],
                        status: Status::Canceled as i32,
                        exit_code: -1,
                        duration_us: 5,
                        reason: "canceled by bob".into(),
                        no_retry: false,
                    }),
                ));
            }
        }
    }
    let status = if canceled {
        Status::Canceled
    } else if finished.iter().all(|f| *f == Some(true)) {
        Status::Succeeded
    } else {
        Status::Failed
    };
    out.push(event(
        &build,
        clock.tick(),
        Payload::BuildFinished(BuildFinished {
            status: status as i32,
            duration_us: 99,
            reason: String::new(),
        }),
    ));
    out
}

/// How many events a build's jobs produce (to tell whether a cancel cut any).
fn merged_len(spec: &BuildSpec) -> usize {
    spec.jobs
        .iter()
        .enumerate()
        .map(|(j, job)| job_events("x", j, job).len())
        .sum()
}

impl History {
    /// What goes on the log, in order.
    pub fn items(&self) -> Vec<Item> {
        let mut clock = Clock(1_700_000_000_000_000);
        let builds: Vec<Vec<Envelope>> = self
            .builds
            .iter()
            .enumerate()
            .map(|(b, spec)| build_events(b, spec, &mut clock))
            .collect();
        let mut items: Vec<Item> = merge(builds, &self.order)
            .into_iter()
            .map(|(_, e)| Item::Event(e))
            .collect();
        for noise in &self.noise {
            match noise {
                Noise::Duplicate { of, later } => {
                    let at = of % items.len();
                    if let Item::Event(e) = &items[at] {
                        let raw = Item::Raw {
                            key: e.build_id.clone(),
                            data: e.encode_to_vec(),
                        };
                        items.insert((at + later).min(items.len()), raw);
                    }
                }
                Noise::Unknown(at) => {
                    let at = at % (items.len() + 1);
                    let mut unknown = event("b0", 0, Payload::BuildTriggered(Default::default()));
                    unknown.payload = None;
                    items.insert(at, Item::Event(unknown));
                }
                Noise::Garbage(at, bytes) => {
                    let at = at % (items.len() + 1);
                    items.insert(
                        at,
                        Item::Raw {
                            key: "b0".into(),
                            data: bytes.clone(),
                        },
                    );
                }
            }
        }
        items
    }
}
