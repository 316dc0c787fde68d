use super::*;
use proptest::prelude::*;
use tributary_proto::events::{
    BuildCanceled, BuildQueued, BuildTriggered, JobAssigned, JobStarted, Plan, StepPlan,
};

const B: &str = "build-1";

fn env(payload: Payload) -> Envelope {
    Envelope {
        event_id: String::new(),
        tenant: "t".into(),
        project: "p".into(),
        build_id: B.into(),
        time_us: 0,
        payload: Some(payload),
    }
}

fn plan(jobs: &[(&str, &[&str], u32)]) -> Plan {
    Plan {
        jobs: jobs
            .iter()
            .map(|(id, needs, retry)| JobPlan {
                id: id.to_string(),
                name: id.to_string(),
                needs: needs.iter().map(|s| s.to_string()).collect(),
                retry: *retry,
                steps: vec![StepPlan {
                    name: "s".into(),
                    lines: vec!["true".into()],
                }],
                ..JobPlan::default()
            })
            .collect(),
    }
}

/// A tiny driver: folds every decision back as events, runs assigned jobs "instantly" with
/// the outcome `outcome(job, attempt)` gives. Returns the event log it produced.
struct Sim {
    state: SchedulerState,
    log: Vec<Envelope>,
    max_busy: usize,
}

impl Sim {
    fn new(plan: Plan) -> Sim {
        let mut sim = Sim {
            state: SchedulerState::default(),
            log: Vec::new(),
            max_busy: 0,
        };
        sim.push(Payload::BuildTriggered(BuildTriggered::default()));
        sim.push(Payload::BuildQueued(BuildQueued { plan: Some(plan) }));
        sim
    }

    fn push(&mut self, payload: Payload) {
        let e = env(payload);
        self.state.apply(self.log.len() as u64, &e);
        self.log.push(e);
        self.max_busy = self.max_busy.max(self.state.busy());
    }

    /// One decide round with `slots` total capacity; running jobs finish when `finish_now`.
    fn round(&mut self, slots: usize, outcome: &dyn Fn(&str, u32) -> Status) -> bool {
        let free = slots.saturating_sub(self.state.busy());
        let decisions = decide(&self.state, free);
        if decisions.is_empty() {
            return false;
        }
        let mut started = Vec::new();
        for d in decisions {
            match &d {
                Decision::Assign { job, attempt, .. } => {
                    self.push(Payload::JobAssigned(JobAssigned {
                        job: job.clone(),
                        attempt: *attempt,
                        agent_id: "a".into(),
                        lease_id: "l".into(),
                        deadline_us: 0,
                    }));
                    self.push(Payload::JobStarted(JobStarted {
                        job: job.clone(),
                        attempt: *attempt,
                        ..JobStarted::default()
                    }));
                    started.push((job.clone(), *attempt));
                }
                other => self.push(other.payload().expect("payload")),
            }
        }
        for (job, attempt) in started {
            let status = outcome(&job, attempt);
            self.push(Payload::JobFinished(JobFinished {
                job,
                attempt,
                status: status as i32,
                ..JobFinished::default()
            }));
        }
        true
    }

    fn run(&mut self, slots: usize, outcome: &dyn Fn(&str, u32) -> Status) {
        for _ in 0..1000 {
            if !self.round(slots, outcome) {
                return;
            }
        }
        panic!("scheduler did not converge");
    }

    fn finished(&self) -> Option<(Status, String)> {
        self.log.iter().find_map(|e| match &e.payload {
            Some(Payload::BuildFinished(f)) => Some((
                Status::try_from(f.status).unwrap_or(Status::Unspecified),
                f.reason.clone(),
            )),
            _ => None,
        })
    }

    fn final_status(&self, job: &str) -> Option<Status> {
        self.log.iter().rev().find_map(|e| match &e.payload {
            Some(Payload::JobFinished(f)) if f.job == job => Status::try_from(f.status).ok(),
            _ => None,
        })
    }

    fn count(&self, pred: impl Fn(&Payload) -> bool) -> usize {
        self.log
            .iter()
            .filter(|e| e.payload.as_ref().is_some_and(&pred))
            .count()
    }
}

fn ok(_: &str, _: u32) -> Status {
    Status::Succeeded
}

#[test]
fn independent_jobs_run_in_parallel_up_to_the_limit() {
    let mut sim = Sim::new(plan(&[("a", &[], 0), ("b", &[], 0), ("c", &[], 0)]));
    let free = decide(&sim.state, 10);
    assert_eq!(free.len(), 3, "all three queue at once: {free:?}");
    sim.run(2, &ok);
    assert_eq!(sim.max_busy, 2);
    assert_eq!(sim.finished().map(|f| f.0), Some(Status::Succeeded));
}

#[test]
fn needs_wait_for_success() {
    let mut sim = Sim::new(plan(&[("build", &[], 0), ("test", &["build"], 0)]));
    sim.round(4, &|_, _| Status::Succeeded); // queue build
    let d = decide(&sim.state, 4);
    assert_eq!(
        d,
        vec![Decision::Assign {
            build: B.into(),
            job: "build".into(),
            attempt: 1
        }]
    );
    sim.run(4, &ok);
    let order: Vec<&str> = sim
        .log
        .iter()
        .filter_map(|e| match &e.payload {
            Some(Payload::JobStarted(s)) => Some(s.job.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(order, vec!["build", "test"]);
}

#[test]
fn dependants_of_a_failed_job_are_skipped_transitively() {
    let mut sim = Sim::new(plan(&[
        ("a", &[], 0),
        ("b", &["a"], 0),
        ("c", &["b"], 0),
        ("d", &[], 0),
    ]));
    sim.run(4, &|job, _| {
        if job == "a" {
            Status::Failed
        } else {
            Status::Succeeded
        }
    });
    assert_eq!(sim.final_status("b"), Some(Status::Skipped));
    assert_eq!(sim.final_status("c"), Some(Status::Skipped));
    assert_eq!(sim.final_status("d"), Some(Status::Succeeded));
    let (status, reason) = sim.finished().expect("finished");
    assert_eq!(status, Status::Failed);
    assert!(reason.contains("job a failed"), "{reason}");
    let skipped_reason = sim.log.iter().find_map(|e| match &e.payload {
        Some(Payload::JobFinished(f)) if f.job == "b" => Some(f.reason.clone()),
        _ => None,
    });
    assert_eq!(skipped_reason.as_deref(), Some("needs a, which failed"));
}

#[test]
fn retry_requeues_with_the_next_attempt_and_dependants_wait() {
    let mut sim = Sim::new(plan(&[("flaky", &[], 2), ("after", &["flaky"], 0)]));
    sim.run(1, &|job, attempt| {
        if job == "flaky" && attempt < 3 {
            Status::Failed
        } else {
            Status::Succeeded
        }
    });
    let attempts: Vec<u32> = sim
        .log
        .iter()
        .filter_map(|e| match &e.payload {
            Some(Payload::JobQueued(q)) if q.job == "flaky" => Some(q.attempt),
            _ => None,
        })
        .collect();
    assert_eq!(attempts, vec![1, 2, 3]);
    assert_eq!(sim.final_status("after"), Some(Status::Succeeded));
    assert_eq!(sim.finished().map(|f| f.0), Some(Status::Succeeded));
}

#[test]
fn retries_are_bounded() {
    let mut sim = Sim::new(plan(&[("bad", &[], 1)]));
    sim.run(1, &|_, _| Status::Failed);
    assert_eq!(sim.count(|p| matches!(p, Payload::JobQueued(_))), 2);
    assert_eq!(sim.finished().map(|f| f.0), Some(Status::Failed));
}

#[test]
fn a_configuration_error_is_not_retried() {
    let mut sim = Sim::new(plan(&[("deploy", &[], 2)]));
    for d in decide(&sim.state, 1) {
        sim.push(d.payload().expect("queue"));
    }
    sim.push(Payload::JobAssigned(JobAssigned {
        job: "deploy".into(),
        attempt: 1,
        agent_id: "a".into(),
        lease_id: "l".into(),
        deadline_us: 0,
    }));
    sim.push(Payload::JobFinished(JobFinished {
        job: "deploy".into(),
        attempt: 1,
        status: Status::Failed as i32,
        reason: "job deploy needs the secret TOKEN".into(),
        no_retry: true,
        ..JobFinished::default()
    }));
    sim.run(1, &|_, _| Status::Succeeded);
    assert_eq!(sim.count(|p| matches!(p, Payload::JobQueued(_))), 1);
    assert_eq!(sim.finished().map(|f| f.0), Some(Status::Failed));
}

#[test]
fn cancel_finishes_waiting_jobs_and_the_build() {
    let mut sim = Sim::new(plan(&[("a", &[], 0), ("b", &["a"], 0)]));
    sim.push(Payload::BuildCanceled(BuildCanceled {
        who: "me".into(),
        reason: String::new(),
    }));
    sim.run(1, &ok);
    assert_eq!(sim.count(|p| matches!(p, Payload::JobStarted(_))), 0);
    assert_eq!(sim.final_status("b"), Some(Status::Canceled));
    assert_eq!(sim.finished().map(|f| f.0), Some(Status::Canceled));
}

#[test]
fn second_assignment_of_an_attempt_is_ignored() {
    let mut state = SchedulerState::default();
    let events = [
        Payload::BuildTriggered(BuildTriggered::default()),
        Payload::BuildQueued(BuildQueued {
            plan: Some(plan(&[("a", &[], 0)])),
        }),
        Payload::JobQueued(JobQueued {
            job: "a".into(),
            attempt: 1,
        }),
        Payload::JobAssigned(JobAssigned {
            job: "a".into(),
            attempt: 1,
            ..Default::default()
        }),
        Payload::JobAssigned(JobAssigned {
            job: "a".into(),
            attempt: 1,
            ..Default::default()
        }),
    ];
    for (i, p) in events.into_iter().enumerate() {
        state.apply(i as u64, &env(p));
    }
    assert_eq!(state.busy(), 1);
    assert!(decide(&state, 5).is_empty());
}

#[test]
fn unknown_payloads_and_builds_are_ignored() {
    let mut state = SchedulerState::default();
    let mut e = env(Payload::JobQueued(JobQueued {
        job: "a".into(),
        attempt: 1,
    }));
    state.apply(0, &e);
    e.payload = None;
    state.apply(1, &e);
    assert_eq!(state, SchedulerState::default());
}

fn arb_dag() -> impl Strategy<Value = Vec<(String, Vec<String>, u32)>> {
    (1usize..12).prop_flat_map(|n| {
        proptest::collection::vec((proptest::collection::vec(any::<bool>(), n), 0u32..3), n)
            .prop_map(move |rows| {
                rows.into_iter()
                    .enumerate()
                    .map(|(i, (edges, retry))| {
                        // Only edges to earlier jobs: acyclic by construction.
                        let needs = (0..i)
                            .filter(|&j| edges[j])
                            .map(|j| format!("j{j}"))
                            .collect();
                        (format!("j{i}"), needs, retry)
                    })
                    .collect()
            })
    })
}

proptest! {
    #[test]
    fn every_job_ends_once_and_capacity_holds(
        dag in arb_dag(),
        slots in 1usize..4,
        fail_mask in any::<u64>(),
    ) {
        let owned: Vec<(&str, Vec<&str>, u32)> = dag
            .iter()
            .map(|(id, needs, r)| (id.as_str(), needs.iter().map(|s| s.as_str()).collect(), *r))
            .collect();
        let refs: Vec<(&str, &[&str], u32)> =
            owned.iter().map(|(id, n, r)| (*id, n.as_slice(), *r)).collect();
        let mut sim = Sim::new(plan(&refs));
        let outcome = |job: &str, attempt: u32| {
            let i: u32 = job[1..].parse().unwrap_or(0);
            // Bit i says "this job fails on its first attempt"; bit i+32 "on every attempt".
            let fails = fail_mask >> i & 1 == 1 && (attempt == 1 || fail_mask >> (i + 32) & 1 == 1);
            if fails { Status::Failed } else { Status::Succeeded }
        };
        sim.run(slots, &outcome);
        prop_assert!(sim.max_busy <= slots);
        let (build_status, _) = sim.finished().expect("build finished");
        let mut all_ok = true;
        for (id, needs, _) in &dag {
            let status = sim.final_status(id).expect("every job finished");
            let need_ok = needs.iter().all(|n| sim.final_status(n) == Some(Status::Succeeded));
            if need_ok {
                prop_assert_ne!(status, Status::Skipped, "{} ran although...", id);
            } else {
                prop_assert_eq!(status, Status::Skipped);
            }
            all_ok &= status == Status::Succeeded;
            // No attempt started twice.
            let starts: Vec<u32> = sim.log.iter().filter_map(|e| match &e.payload {
                Some(Payload::JobStarted(s)) if &s.job == id => Some(s.attempt),
                _ => None,
            }).collect();
            let mut dedup = starts.clone();
            dedup.dedup();
            prop_assert_eq!(starts, dedup);
        }
        prop_assert_eq!(build_status == Status::Succeeded, all_ok);
        prop_assert_eq!(sim.count(|p| matches!(p, Payload::BuildFinished(_))), 1);
    }
}

#[test]
fn cancel_finishes_queued_jobs_waiting_for_capacity_once() {
    let mut sim = Sim::new(plan(&[("a", &[], 0), ("b", &[], 0), ("c", &[], 0)]));
    // Queue all three, assign one (capacity 1): b and c stay queued.
    sim.round(1, &|_, _| Status::Succeeded);
    let d = decide(&sim.state, 1);
    let assigned = d
        .iter()
        .filter(|d| matches!(d, Decision::Assign { .. }))
        .count();
    assert_eq!(assigned, 1);
    sim.push(Payload::BuildCanceled(BuildCanceled {
        who: "me".into(),
        reason: String::new(),
    }));
    sim.run(1, &ok);
    assert_eq!(sim.final_status("b"), Some(Status::Canceled));
    assert_eq!(sim.final_status("c"), Some(Status::Canceled));
    // Each queued job got exactly one JobFinished: the fold accepted the first one.
    for job in ["b", "c"] {
        let n = sim.count(|p| matches!(p, Payload::JobFinished(f) if f.job == job));
        assert_eq!(n, 1, "{job} finished {n} times");
    }
    assert_eq!(sim.finished().map(|f| f.0), Some(Status::Canceled));
}
