//! `reuse: commit` through the pure folds: a driver that appends every decision and plays the
//! agent, over several builds of the same project. The lookup is the same for the local run
//! (`SchedulerState` + `decide`) and the server (`ClusterState` + `decide_cluster`).

use tributary_proto::events::{
    envelope::Payload, ArtifactUploaded, BuildQueued, BuildTriggered, Envelope, JobFinished,
    JobPlan, JobStarted, Plan, Status, StepPlan,
};
use tributary_scheduler::{decide, Decision, JobPhase, SchedulerState};

fn plan(reuse: bool, line: &str) -> Vec<JobPlan> {
    let job = |id: &str, needs: &[&str], reuse: bool| JobPlan {
        id: id.into(),
        name: id.into(),
        needs: needs.iter().map(|s| s.to_string()).collect(),
        steps: vec![StepPlan {
            name: "s".into(),
            lines: vec![line.into()],
        }],
        reuse: if reuse {
            "commit".into()
        } else {
            String::new()
        },
        ..JobPlan::default()
    };
    vec![job("build", &[], reuse), job("test", &["build"], false)]
}

struct Driver {
    state: SchedulerState,
    log: Vec<Envelope>,
}

impl Driver {
    fn append(&mut self, build: &str, project: &str, payload: Payload) {
        let mut env = Envelope::new("acme", project, build, payload);
        env.time_us = self.log.len() as i64;
        self.state.apply(self.log.len() as u64, &env);
        self.log.push(env);
    }

    /// Triggers a build and runs it to its end; every assigned job succeeds and `build`
    /// uploads one artifact. Returns the events of this build.
    fn run(
        &mut self,
        build: &str,
        project: &str,
        commit: &str,
        jobs: Vec<JobPlan>,
    ) -> Vec<Payload> {
        let from = self.log.len();
        self.append(
            build,
            project,
            Payload::BuildTriggered(BuildTriggered {
                commit: commit.into(),
                number: (from as u64) + 1,
                ..BuildTriggered::default()
            }),
        );
        self.append(
            build,
            project,
            Payload::BuildQueued(BuildQueued {
                plan: Some(Plan { jobs }),
            }),
        );
        for _ in 0..50 {
            let decisions = decide(&self.state, 1);
            if decisions.is_empty() {
                break;
            }
            for d in decisions {
                match d {
                    Decision::Assign {
                        build: b,
                        job,
                        attempt,
                    } => {
                        self.append(
                            &b,
                            project,
                            Payload::JobStarted(JobStarted {
                                job: job.clone(),
                                attempt,
                                ..JobStarted::default()
                            }),
                        );
                        if job == "build" {
                            self.append(
                                &b,
                                project,
                                Payload::ArtifactUploaded(ArtifactUploaded {
                                    job: job.clone(),
                                    attempt,
                                    path: "dist/app".into(),
                                    size: 3,
                                    sha256: format!("sha-of-{b}"),
                                    object_key: format!(
                                        "artifacts/acme/{project}/{b}/build/dist/app"
                                    ),
                                }),
                            );
                        }
                        self.append(
                            &b,
                            project,
                            Payload::JobFinished(JobFinished {
                                job,
                                attempt,
                                status: Status::Succeeded as i32,
                                ..JobFinished::default()
                            }),
                        );
                    }
                    other => {
                        let payload = other.payload().expect("not an assignment");
                        self.append(other.build_id(), project, payload);
                    }
                }
            }
        }
        self.log[from..]
            .iter()
            .filter_map(|e| e.payload.clone())
            .collect()
    }
}

fn started(events: &[Payload], job: &str) -> bool {
    events
        .iter()
        .any(|p| matches!(p, Payload::JobStarted(s) if s.job == job))
}

fn reused(events: &[Payload], job: &str) -> Option<tributary_proto::events::JobReused> {
    events.iter().find_map(|p| match p {
        Payload::JobReused(r) if r.job == job => Some(r.clone()),
        _ => None,
    })
}

fn finished_ok(events: &[Payload]) -> bool {
    events
        .iter()
        .any(|p| matches!(p, Payload::BuildFinished(f) if f.status == Status::Succeeded as i32))
}

#[test]
fn a_second_build_of_the_same_commit_reuses_the_job_and_its_artifacts() {
    let mut d = Driver {
        state: SchedulerState::default(),
        log: Vec::new(),
    };
    let first = d.run("b1", "web", "c0ffee", plan(true, "make"));
    assert!(started(&first, "build") && reused(&first, "build").is_none());
    assert!(finished_ok(&first));

    let second = d.run("b2", "web", "c0ffee", plan(true, "make"));
    assert!(!started(&second, "build"), "{second:?}");
    let r = reused(&second, "build").expect("JobReused");
    assert_eq!(
        (r.from_build.as_str(), r.from_job.as_str(), r.from_attempt),
        ("b1", "build", 1)
    );
    assert_eq!(r.artifacts.len(), 1);
    assert_eq!(r.artifacts[0].sha256, "sha-of-b1");
    // The dependent job ran, and the build succeeded.
    assert!(started(&second, "test"));
    assert!(finished_ok(&second));

    // A third build reuses the run that did the work, not the reuse.
    let third = d.run("b3", "web", "c0ffee", plan(true, "make"));
    assert_eq!(reused(&third, "build").unwrap().from_build, "b1");
}

#[test]
fn another_commit_project_or_definition_runs_again() {
    let mut d = Driver {
        state: SchedulerState::default(),
        log: Vec::new(),
    };
    d.run("b1", "web", "c0ffee", plan(true, "make"));
    for (build, project, commit, line) in [
        ("b2", "web", "beef", "make"),
        ("b3", "api", "c0ffee", "make"),
        ("b4", "web", "c0ffee", "make all"),
    ] {
        let events = d.run(build, project, commit, plan(true, line));
        assert!(started(&events, "build"), "{build} should run");
        assert!(reused(&events, "build").is_none());
    }
    // Without `reuse: commit` a job always runs.
    let events = d.run("b5", "web", "c0ffee", plan(false, "make"));
    assert!(started(&events, "build"));
    // No commit (a local run outside git): never reused.
    d.run("b6", "web", "", plan(true, "make"));
    let events = d.run("b7", "web", "", plan(true, "make"));
    assert!(started(&events, "build"));
}

#[test]
fn a_failed_run_is_not_reused_and_reused_jobs_count_as_succeeded() {
    let mut state = SchedulerState::default();
    let env = |build: &str, p: Payload| Envelope::new("acme", "web", build, p);
    state.apply(
        0,
        &env(
            "b1",
            Payload::BuildTriggered(BuildTriggered {
                commit: "c".into(),
                ..BuildTriggered::default()
            }),
        ),
    );
    state.apply(
        1,
        &env(
            "b1",
            Payload::BuildQueued(BuildQueued {
                plan: Some(Plan {
                    jobs: plan(true, "make"),
                }),
            }),
        ),
    );
    state.apply(
        2,
        &env(
            "b1",
            Payload::JobFinished(JobFinished {
                job: "build".into(),
                attempt: 1,
                status: Status::Failed as i32,
                ..JobFinished::default()
            }),
        ),
    );
    let def = tributary_scheduler::definition_hash(&plan(true, "make")[0]);
    assert!(state.reuse.lookup("acme", "web", "c", &def).is_none());
    // A stale attempt's success does not count either.
    state.apply(
        3,
        &env(
            "b1",
            Payload::JobFinished(JobFinished {
                job: "build".into(),
                attempt: 7,
                status: Status::Succeeded as i32,
                ..JobFinished::default()
            }),
        ),
    );
    assert!(state.reuse.lookup("acme", "web", "c", &def).is_none());
    let job = &state.builds["b1"].jobs[0];
    assert_eq!(job.phase, JobPhase::Waiting);
}

#[test]
fn the_server_fold_decides_the_same_and_dependents_get_the_earlier_artifacts() {
    use tributary_scheduler::cluster::{
        decide_cluster, ClusterConfig, ClusterDecision, ClusterState,
    };
    // The history: a local driver's log of one build is a log like any other.
    let mut d = Driver {
        state: SchedulerState::default(),
        log: Vec::new(),
    };
    d.run("b1", "web", "c0ffee", plan(true, "make"));
    let mut cluster = ClusterState::new();
    for (offset, env) in d.log.iter().enumerate() {
        cluster.apply(offset as u64, env);
    }
    let mut offset = d.log.len() as u64;
    let mut apply = |cluster: &mut ClusterState, p: Payload| {
        cluster.apply(offset, &Envelope::new("acme", "web", "b2", p));
        offset += 1;
    };
    apply(
        &mut cluster,
        Payload::BuildTriggered(BuildTriggered {
            commit: "c0ffee".into(),
            ..BuildTriggered::default()
        }),
    );
    apply(
        &mut cluster,
        Payload::BuildQueued(BuildQueued {
            plan: Some(Plan {
                jobs: plan(true, "make"),
            }),
        }),
    );
    let decisions = decide_cluster(&cluster, 0, &ClusterConfig::default());
    let reuse = decisions
        .iter()
        .find(|d| matches!(d, ClusterDecision::Reuse { .. }))
        .expect("a Reuse decision");
    assert!(!decisions
        .iter()
        .any(|d| matches!(d, ClusterDecision::Queue { job, .. } if job == "build")));
    apply(&mut cluster, reuse.payload());
    let inputs = cluster.needed_artifacts("b2", "test");
    assert_eq!(inputs.len(), 1);
    assert_eq!(inputs[0].object_key, "artifacts/acme/web/b1/build/dist/app");
    // Next: `test` is queued (its need counts as succeeded).
    let decisions = decide_cluster(&cluster, 0, &ClusterConfig::default());
    assert!(decisions
        .iter()
        .any(|d| matches!(d, ClusterDecision::Queue { job, .. } if job == "test")));
}
