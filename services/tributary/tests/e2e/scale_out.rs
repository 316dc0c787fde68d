//! End to end with separate processes on Apache Kafka and PostgreSQL (issue 4): 2 `serve api`,
//! 2 `serve scheduler`, 2 `serve projector` and 2 `tributary agent` processes run 50 builds of
//! pipelines with `needs` DAGs and a matrix (one project's builds fail on purpose). During the
//! run one agent, one scheduler and one projector are killed with SIGKILL while they hold work,
//! and a garbage record and an event of an unknown type are appended to the events topic.
//!
//! Then: every build finishes with exactly the expected build and job outcomes, read through
//! both API replicas; the log has exactly one `JobAssigned` per (build, job, attempt) and one
//! per queued attempt (the killed agent's attempts were requeued as new attempts); every
//! service skipped the two bad records with an error log and counted them; the projectors'
//! PostgreSQL read models equal a fresh replay (`tributary replay --check`). Last, `tributary
//! bench server --server` runs against the processes.
//!
//! Needs `scripts/setup-brokers.sh` (Kafka on 127.0.0.1:19092, PostgreSQL on 127.0.0.1:5432).

use crate::common;
use crate::scale;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use prost::Message as _;
use scale::{assignments, Attempt, Ev, Options, ScaleOut};
use tributary_proto::events::envelope::Payload;
use tributary_proto::events::Envelope;

/// Generous bound for waits on a loaded 2-core machine.
const PATIENCE: Duration = Duration::from_secs(600);

/// A DAG with a matrix: compile[n=1], compile[n=2] → test → package ← lint. Each compile runs
/// `CHECK` last: see [`pipeline`].
const DAG: &str = r#"
jobs:
  compile:
    matrix:
      n: ["1", "2"]
    steps:
      - script:
          - echo compile-${{ matrix.n }}
          - sleep 0.5
          - CHECK
  lint:
    steps:
      - echo lint
  test:
    needs: compile
    steps:
      - script:
          - echo test
  package:
    needs: [test, lint]
    steps:
      - echo package
"#;

/// The pipeline of project `green` (every job succeeds) or `red` (compile[n=2] fails, so test
/// and package are skipped; lint succeeds).
fn pipeline(project: &str) -> String {
    let check = if project == "green" {
        "test ${{ matrix.n }} -ge 1"
    } else {
        "test ${{ matrix.n }} = 1"
    };
    DAG.replace("CHECK", check)
}

const JOBS: [&str; 5] = ["compile[n=1]", "compile[n=2]", "lint", "test", "package"];

/// (build status, job → status) expected of a build of `project`.
fn expected(project: &str) -> (&'static str, BTreeMap<&'static str, &'static str>) {
    if project == "green" {
        (
            "succeeded",
            JOBS.iter().map(|j| (*j, "succeeded")).collect(),
        )
    } else {
        (
            "failed",
            [
                ("compile[n=1]", "succeeded"),
                ("compile[n=2]", "failed"),
                ("lint", "succeeded"),
                ("test", "skipped"),
                ("package", "skipped"),
            ]
            .into_iter()
            .collect(),
        )
    }
}

/// The (build, job, attempt) of every `JobQueued`.
fn queued(events: &[Ev]) -> BTreeSet<Attempt> {
    events
        .iter()
        .filter_map(|e| match &e.env.payload {
            Some(Payload::JobQueued(q)) => Some((e.env.build_id.clone(), q.job.clone(), q.attempt)),
            _ => None,
        })
        .collect()
}

/// Attempts assigned to `agent` that have no `JobFinished`/`JobRequeued` yet.
fn running_on(events: &[Ev], agent: &str) -> usize {
    let mut open: BTreeSet<Attempt> = BTreeSet::new();
    for e in events {
        match &e.env.payload {
            Some(Payload::JobAssigned(a)) if a.agent_id == agent => {
                open.insert((e.env.build_id.clone(), a.job.clone(), a.attempt));
            }
            Some(Payload::JobFinished(f)) => {
                open.remove(&(e.env.build_id.clone(), f.job.clone(), f.attempt));
            }
            Some(Payload::JobRequeued(r)) => {
                open.remove(&(e.env.build_id.clone(), r.job.clone(), r.attempt));
            }
            _ => {}
        }
    }
    open.len()
}

/// An envelope whose payload is field 1999, which no event of this version uses.
fn unknown_event(build_id: &str) -> Vec<u8> {
    let mut bytes = Envelope {
        event_id: tributary_proto::new_id(),
        tenant: "default".into(),
        project: "green".into(),
        build_id: build_id.into(),
        time_us: tributary_proto::now_us(),
        payload: None,
    }
    .encode_to_vec();
    // Key of field 1999, wire type 2 (length-delimited): varint 15994; then 2 bytes of body.
    bytes.extend_from_slice(&[0xfa, 0x7c, 2, 0x08, 0x01]);
    bytes
}

fn trigger_many(out: &ScaleOut, builds: &mut Vec<(String, String)>, n: usize) {
    for _ in 0..n {
        let i = builds.len();
        let project = if i % 5 == 4 { "red" } else { "green" };
        let id = out.trigger(i % out.apis.len(), project);
        builds.push((id, project.to_owned()));
    }
}

fn skipped_total(metrics: &BTreeMap<String, f64>, consumer: &str, kind: &str) -> f64 {
    metrics
        .iter()
        .filter(|(k, _)| {
            k.contains(&format!("consumer=\"{consumer}\""))
                && k.contains(&format!("kind=\"{kind}\""))
        })
        .map(|(_, v)| *v)
        .sum()
}

#[test]
fn fifty_builds_survive_kill_9_of_an_agent_a_scheduler_and_a_projector() {
    tributary_testkit::require!(Kafka, Postgres);
    let mut out = ScaleOut::start(Options::default());
    out.project("green", &pipeline("green"));
    out.project("red", &pipeline("red"));
    let agent0 = out.agent_id(0);
    out.agent_id(1);
    for s in out.schedulers.iter().chain(&out.projectors) {
        let what = format!("{} to own partitions", s.name);
        common::wait_until(&what, PATIENCE, || {
            let log = s.log_text();
            log.contains("deciding for the partition") || log.contains("partitions assigned")
        });
    }

    let mut builds: Vec<(String, String)> = Vec::new();
    trigger_many(&out, &mut builds, 20);

    // kill -9 of agent-0 while it runs work; its attempts are requeued as new attempts.
    out.wait_events("agent-0 to hold work", PATIENCE, |events| {
        running_on(events, &agent0) > 0
    });
    out.agents[0].kill();
    out.wait_events("agent-0's work to be requeued", PATIENCE, |events| {
        events.iter().any(
            |e| matches!(&e.env.payload, Some(Payload::JobRequeued(r)) if r.agent_id == agent0),
        )
    });
    out.agents[0].restart();

    // kill -9 of scheduler-0 while builds in its partitions are running.
    trigger_many(&out, &mut builds, 10);
    out.wait_events("some builds to finish", PATIENCE, |events| {
        scale::finished_of(events).len() >= 5
    });
    let decided = out.schedulers[0].log_text();
    assert!(
        decided.contains("job assigned") && decided.contains("deciding for the partition"),
        "scheduler-0 decides for partitions of its own before it is killed:\n{decided}"
    );
    out.schedulers[0].kill();

    // kill -9 of projector-0 once it wrote some builds; projector-1 takes over every partition.
    trigger_many(&out, &mut builds, 10);
    out.wait_events("more builds to finish", PATIENCE, |events| {
        scale::finished_of(events).len() >= 15
    });
    let projected = out.projectors[0].log_text();
    assert!(
        projected.contains("partitions assigned"),
        "projector-0 owns partitions before it is killed:\n{projected}"
    );
    out.projectors[0].kill();
    out.wait_projected(PATIENCE);

    // Malformed records mid-run: garbage bytes and an event of an unknown type.
    let (victim, _) = builds[builds.len() - 1].clone();
    out.append_raw(&victim, vec![0xff, 0xff, 0xff, 0x01, 0x02]);
    out.append_raw(&victim, unknown_event(&victim));
    trigger_many(&out, &mut builds, 10);

    let ids: Vec<String> = builds.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(ids.len(), 50);
    out.wait_finished(&ids, PATIENCE);
    out.assert_all_running();

    // Correct results, read through both API replicas (after the projector caught up).
    out.wait_projected(PATIENCE);
    for (id, project) in &builds {
        let (status, jobs) = expected(project);
        for api in 0..out.apis.len() {
            let b = out.get(api, id);
            assert_eq!(
                b["status"], status,
                "build {id} ({project}) through api-{api}: {b}"
            );
            let got: BTreeMap<String, String> = b["jobs"]
                .as_array()
                .expect("jobs")
                .iter()
                .map(|j| {
                    (
                        j["id"].as_str().expect("id").to_owned(),
                        j["status"].as_str().expect("status").to_owned(),
                    )
                })
                .collect();
            let want: BTreeMap<String, String> = jobs
                .iter()
                .map(|(j, s)| (j.to_string(), s.to_string()))
                .collect();
            assert_eq!(
                got, want,
                "jobs of build {id} ({project}) through api-{api}"
            );
        }
    }
    let finished = out.finished();
    for (id, project) in &builds {
        assert_eq!(finished[id], expected(project).0, "BuildFinished of {id}");
    }

    // The log: exactly one JobAssigned per (build, job, attempt), and one per queued attempt.
    let events = out.events().to_vec();
    let assigned = assignments(&events);
    let twice: Vec<_> = assigned.iter().filter(|(_, ids)| ids.len() > 1).collect();
    assert!(twice.is_empty(), "attempts assigned twice: {twice:?}");
    let queued = queued(&events);
    let assigned_keys: BTreeSet<Attempt> = assigned.keys().cloned().collect();
    assert_eq!(
        queued, assigned_keys,
        "every queued attempt was assigned once, and nothing else"
    );
    assert!(
        assigned_keys.iter().any(|(_, _, attempt)| *attempt > 1),
        "the killed agent's work was assigned again as a new attempt"
    );

    // The admin token was registered once, by the first API replica.
    let issued = events
        .iter()
        .filter(|e| matches!(&e.env.payload, Some(Payload::TokenIssued(t)) if t.kind == "admin"))
        .count();
    assert_eq!(issued, 1, "the admin token is registered once");
    let requeued = events
        .iter()
        .filter(|e| matches!(&e.env.payload, Some(Payload::JobRequeued(_))))
        .count();
    eprintln!(
        "{} events, {} job attempts assigned, {requeued} requeued",
        events.len(),
        assigned.len()
    );

    // The bad records: skipped with an error log and counted by every service that read them.
    assert_eq!(out.undecodable, 1, "the garbage record is on the log");
    for api in &out.apis {
        let m = api.metrics("tributary_skipped_records_total");
        for consumer in ["api-directory", "api-cluster"] {
            for kind in ["undecodable", "unknown_payload"] {
                assert_eq!(
                    skipped_total(&m, consumer, kind),
                    1.0,
                    "{} {consumer} {kind}: {m:?}",
                    api.name
                );
            }
        }
    }
    for s in [&out.schedulers[1], &out.projectors[1]] {
        let m = s.metrics("tributary_skipped_records_total");
        let consumer = if s.name.starts_with("scheduler") {
            "scheduler"
        } else {
            "projector"
        };
        for kind in ["undecodable", "unknown_payload"] {
            assert_eq!(
                skipped_total(&m, consumer, kind),
                1.0,
                "{} {kind}: {m:?}",
                s.name
            );
        }
        let log = s.log_text();
        assert!(
            log.contains("skipping malformed event"),
            "{}:\n{log}",
            s.name
        );
        assert!(
            log.contains("skipping an event of an unknown type"),
            "{}",
            s.name
        );
    }

    // The read models equal a fresh replay.
    let check = out.replay(true);
    assert!(
        check.status.success(),
        "replay --check: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    // `bench server` runs against these processes (figures are not judged here).
    let bench = std::process::Command::new(common::bin())
        .args([
            "bench",
            "server",
            "--builds",
            "4",
            "--concurrency",
            "2",
            "--server",
        ])
        .arg(out.apis[1].url())
        .args(["--token", &out.token])
        .output()
        .expect("run tributary bench server");
    let printed = String::from_utf8_lossy(&bench.stdout);
    assert!(
        bench.status.success() && printed.contains("sustained"),
        "bench server --server: {printed}{}",
        String::from_utf8_lossy(&bench.stderr)
    );
}
