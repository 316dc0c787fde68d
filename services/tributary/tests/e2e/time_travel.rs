//! Time travel and "why" against a real `tributary up` and real agents: `get --at` shows a
//! finished build as it stood mid-run (a running line, a pending job), by offset and by time;
//! `why` explains a job that waited for a label (the scheduler's recorded reason), was requeued
//! after its agent was killed (`kill -9`), and was retried after a failure.

use crate::common;

use std::time::Duration;

use common::{job, wait_secs, Server};
use serde_json::Value;

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// The first event of the build of `ty` matching `pred`.
fn find<'a>(events: &'a [Value], ty: &str, pred: impl Fn(&Value) -> bool) -> &'a Value {
    events
        .iter()
        .find(|e| e["type"] == ty && pred(e))
        .unwrap_or_else(|| panic!("no {ty} event in {events:#?}"))
}

fn line(build: &Value, job_id: &str, step: usize, line: usize) -> Value {
    job(build, job_id)["steps"][step]["lines"][line].clone()
}

#[test]
fn get_at_shows_a_finished_build_as_it_was_mid_run() {
    let s = common::start(1);
    s.project(
        "tt",
        "jobs:\n  slow:\n    steps:\n      - script:\n          - sleep 1\n          - echo done\n  \
         after:\n    needs: slow\n    steps:\n      - run: echo after\n",
    );
    let build = s.trigger("tt");
    let now = s.finished(&build, Duration::from_secs(60));
    assert_eq!(now["status"], "succeeded", "{now}");

    let events = s.events(Some(&build));
    let started = find(&events, "line_started", |e| {
        e["job"] == "slow" && e["line"] == 0
    });
    let offset = started["offset"].as_u64().unwrap();
    let past = json(&s.admin(&["get", &build, "--at", &offset.to_string(), "--json"]));
    assert_eq!(past["status"], "running", "{past}");
    assert_eq!(past["as_of_offset"], offset);
    assert_eq!(job(&past, "slow")["status"], "running");
    assert_eq!(line(&past, "slow", 0, 0)["status"], "running");
    assert_eq!(line(&past, "slow", 0, 1)["status"], "pending");
    assert_eq!(job(&past, "after")["status"], "pending");
    assert_eq!(past["finished_us"], 0);

    // The same moment by time (+µs after the trigger), and printed like `get`.
    let triggered = find(&events, "build_triggered", |_| true)["time_us"]
        .as_i64()
        .unwrap();
    let after = started["time_us"].as_i64().unwrap() - triggered;
    let by_time = json(&s.admin(&["get", &build, "--at", &format!("+{after}us"), "--json"]));
    assert_eq!(by_time["jobs"], past["jobs"]);
    let text = s.admin(&["get", &build, "--at", &offset.to_string()]);
    assert!(text.contains(&format!("as of offset {offset}")), "{text}");
    let slow_line = text.lines().find(|l| l.contains("job slow")).unwrap();
    assert!(slow_line.contains("running"), "{text}");

    // Every later event moves it on: the line's exit, then the job's end.
    let exited = find(&events, "line_exited", |e| {
        e["job"] == "slow" && e["line"] == 0
    });
    let later = json(&s.admin(&[
        "get",
        &build,
        "--at",
        &exited["offset"].as_u64().unwrap().to_string(),
        "--json",
    ]));
    assert_eq!(line(&later, "slow", 0, 0)["status"], "succeeded");
    assert_eq!(line(&later, "slow", 0, 0)["exit_code"], 0);
    let end = events.last().unwrap()["offset"].as_u64().unwrap();
    let last = json(&s.admin(&["get", &build, "--at", &end.to_string(), "--json"]));
    assert_eq!(
        last["jobs"], now["jobs"],
        "at its last event, the build is as `get` shows it"
    );

    // Before the build, and a build that is not there, are errors that say so.
    let first = events[0]["offset"].as_u64().unwrap();
    if first > 0 {
        let out = s.cli(&s.token, &["get", &build, "--at", &(first - 1).to_string()]);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("did not exist yet"));
    }
    let out = s.cli(&s.token, &["get", &build, "--at", "soon"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("neither an offset"));
    // Another tenant sees nothing of it.
    let other = s.tenant("other");
    let out = s.cli(&other, &["get", &build, "--at", &offset.to_string()]);
    assert!(!out.status.success());
    let out = s.cli(&other, &["why", &build]);
    assert!(!out.status.success());
}

/// `tributary up` without in-process agents, leases lost after 2 s without a heartbeat.
fn start_remote() -> Server {
    common::start_with(&["--agents", "0", "--lease-ttl", "6"])
}

fn why(s: &Server, build: &str, job: &str) -> Vec<Value> {
    let v = json(&s.admin(&["why", build, job, "--json"]));
    v["jobs"][0]["decisions"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn why_explains_a_label_wait_a_requeue_after_a_kill_and_a_retry() {
    let s = start_remote();
    s.project(
        "why",
        "jobs:\n  work:\n    runs-on: gpu\n    retry: 1\n    steps:\n      - script:\n          \
         - echo attempt $TRIBUTARY_ATTEMPT\n          \
         - if [ \"$TRIBUTARY_ATTEMPT\" = 1 ]; then sleep 60; fi\n          \
         - if [ \"$TRIBUTARY_ATTEMPT\" = 2 ]; then exit 5; fi\n",
    );
    let build = s.trigger("why");
    // No agent: the scheduler records why the job waits, once.
    wait_secs("the waiting reason on the log", 30, || {
        why(&s, &build, "work")
            .iter()
            .any(|d| d["kind"] == "waiting")
    });
    let events = s.events(Some(&build));
    let waiting = common::of_type(&events, "job_waiting");
    assert_eq!(
        waiting.len(),
        1,
        "one event per change, not per round: {waiting:#?}"
    );
    let reason = waiting[0]["reason"].as_str().unwrap();
    assert!(reason.contains("labels [gpu]"), "{reason}");
    // `get --at` that moment shows it as the job's waiting reason then.
    let at = waiting[0]["offset"].as_u64().unwrap().to_string();
    let past = json(&s.admin(&["get", &build, "--at", &at, "--json"]));
    assert_eq!(job(&past, "work")["waiting_for"], reason);

    let mut first = s.agent("first", &["--labels", "gpu"]);
    let first_id = s.agent_id("first");
    wait_secs("attempt 1 to run", 30, || {
        job(&s.get(&build), "work")["status"] == "running"
    });
    first.0.kill().unwrap(); // kill -9: no goodbye
    let _ = first.0.wait();
    let _second = s.agent("second", &["--labels", "gpu"]);
    let second_id = s.agent_id("second");
    let done = s.finished(&build, Duration::from_secs(90));
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(job(&done, "work")["attempt"], 3);

    let decisions = why(&s, &build, "work");
    let kinds: Vec<(&str, u64)> = decisions
        .iter()
        .map(|d| (d["kind"].as_str().unwrap(), d["attempt"].as_u64().unwrap()))
        .collect();
    // In this order (more waiting reasons may come between, e.g. while no agent was there).
    let expected = [
        ("queued", 1),
        ("waiting", 1),
        ("assigned", 1),
        ("started", 1),
        ("requeued", 1),
        ("queued", 2),
        ("assigned", 2),
        ("started", 2),
        ("failed", 2),
        ("retried", 3),
        ("assigned", 3),
        ("started", 3),
        ("succeeded", 3),
    ];
    let mut rest = kinds.iter();
    for want in expected {
        assert!(
            rest.any(|k| *k == want),
            "{want:?} missing or out of order in {kinds:?}"
        );
    }
    let text = |kind: &str, attempt: u64| -> String {
        decisions
            .iter()
            .find(|d| d["kind"] == kind && d["attempt"] == attempt)
            .and_then(|d| d["text"].as_str())
            .unwrap()
            .to_owned()
    };
    assert!(
        text("assigned", 1).contains(&first_id),
        "{}",
        text("assigned", 1)
    );
    let requeued = text("requeued", 1);
    assert!(requeued.contains(&first_id), "{requeued}");
    assert!(
        requeued.contains("lease expired")
            || requeued.contains("disconnected")
            || requeued.contains("lost"),
        "{requeued}"
    );
    assert!(text("assigned", 2).contains(&second_id));
    assert!(
        text("retried", 3).contains("exit 5 on attempt 2"),
        "{}",
        text("retried", 3)
    );

    // The text form: one line per decision, with times and the time since the previous one.
    let out = s.admin(&["why", &build, "work"]);
    assert!(out.starts_with("job work\n"), "{out}");
    assert!(
        out.contains("waiting") && out.contains("labels [gpu]"),
        "{out}"
    );
    assert!(out.contains("retried after exit 5 on attempt 2"), "{out}");
    assert!(out.lines().skip(2).all(|l| l.contains("  +")), "{out}");
    // Without a job: every job; an unknown job names the ones there are.
    assert!(s.admin(&["why", &build]).contains("job work"));
    let out = s.cli(&s.token, &["why", &build, "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("its jobs: work"));
}

// ------------------------------------------------------------------ on Kafka

use std::sync::Arc;

use tributary_eventlog::kafka::KafkaLog;
use tributary_eventlog::{EventLog, Topic};
use tributary_projections::history::{self, Moment};
use tributary_proto::api::{self, builds_client::BuildsClient, get_build_request::At};
use tributary_proto::events::{envelope::Payload, *};

fn ev(build: &str, payload: Payload) -> Envelope {
    Envelope::new("default", "web", build, payload)
}

/// A build of one job (one step of two lines) that waited, ran and succeeded.
fn history_of(build: &str) -> Vec<Envelope> {
    let plan = Plan {
        jobs: vec![JobPlan {
            id: "a".into(),
            name: "a".into(),
            steps: vec![StepPlan {
                name: "s".into(),
                lines: vec!["echo one".into(), "echo two".into()],
            }],
            ..JobPlan::default()
        }],
    };
    let (job, attempt) = ("a".to_owned(), 1);
    let line = |line| {
        vec![
            ev(
                build,
                Payload::LineStarted(LineStarted {
                    job: job.clone(),
                    attempt,
                    step: 0,
                    line,
                    text: String::new(),
                }),
            ),
            ev(
                build,
                Payload::LineExited(LineExited {
                    job: job.clone(),
                    attempt,
                    step: 0,
                    line,
                    exit_code: 0,
                    duration_us: 5,
                }),
            ),
        ]
    };
    let mut events = vec![
        ev(
            build,
            Payload::BuildTriggered(BuildTriggered {
                who: "ann".into(),
                number: 1,
                ..Default::default()
            }),
        ),
        ev(
            build,
            Payload::BuildQueued(BuildQueued { plan: Some(plan) }),
        ),
        ev(
            build,
            Payload::JobQueued(JobQueued {
                job: job.clone(),
                attempt,
            }),
        ),
        ev(
            build,
            Payload::JobWaiting(JobWaiting {
                job: job.clone(),
                attempt,
                reason: "no agent connected".into(),
            }),
        ),
        ev(
            build,
            Payload::JobAssigned(JobAssigned {
                job: job.clone(),
                attempt,
                agent_id: "x".into(),
                lease_id: "l".into(),
                deadline_us: 0,
            }),
        ),
        ev(
            build,
            Payload::JobStarted(JobStarted {
                job: job.clone(),
                attempt,
                agent_id: "x".into(),
                lease_id: "l".into(),
                executor: "host".into(),
            }),
        ),
        ev(
            build,
            Payload::StepStarted(StepStarted {
                job: job.clone(),
                attempt,
                step: 0,
                name: "s".into(),
            }),
        ),
    ];
    events.extend(line(0));
    events.extend(line(1));
    events.push(ev(
        build,
        Payload::StepFinished(StepFinished {
            job: job.clone(),
            attempt,
            step: 0,
            status: Status::Succeeded as i32,
            exit_code: 0,
            duration_us: 10,
        }),
    ));
    events.push(ev(
        build,
        Payload::JobFinished(JobFinished {
            job: job.clone(),
            attempt,
            status: Status::Succeeded as i32,
            ..Default::default()
        }),
    ));
    events.push(ev(
        build,
        Payload::BuildFinished(BuildFinished {
            status: Status::Succeeded as i32,
            ..Default::default()
        }),
    ));
    events
}

/// On a partitioned log an offset is one of the build's events partition: `get --at` there is
/// the fold of the build's records up to it (a re-delivered copy counted once), and `why`
/// reads the same records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kafka_an_offset_is_one_of_the_builds_events_partition() {
    let options = tributary_testkit::kafka_options("timetravel", 4, 2);
    let kafka = Arc::new(KafkaLog::connect(options).await.expect("connect to Kafka"));
    let log: Arc<dyn EventLog> = kafka.clone();
    let (token, sha256) = tributary_api::auth::new_token();
    log.append(&tributary_testkit::tenant_with_admin_token(
        "default", sha256,
    ))
    .await
    .expect("append the tenant");
    let (build, other) = (tributary_proto::new_id(), tributary_proto::new_id());
    let (mine, theirs) = (history_of(&build), history_of(&other));
    // Interleaved with another build, one event at a time; one event stored twice (as a
    // retried Kafka append may).
    for (i, e) in mine.iter().enumerate() {
        log.append(std::slice::from_ref(e)).await.expect("append");
        log.append(&[theirs[i].clone()]).await.expect("append");
        if i == 8 {
            log.append(std::slice::from_ref(e))
                .await
                .expect("append a copy");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let store = tributary_projections::BuildsStore::open(&dir.path().join("readmodels.db"))
        .await
        .expect("store");
    let stop = tokio_util::sync::CancellationToken::new();
    let (addr, api_task) = common::serve_api(log.clone(), store, dir.path(), &stop).await;

    let records: Vec<(u64, Envelope)> = log
        .read_key_in(Topic::Events, &build, 0, 10_000)
        .await
        .expect("read")
        .iter()
        .map(|r| (r.offset, r.decode().expect("decodes")))
        .collect();
    assert_eq!(records.len(), mine.len() + 1, "the copy is on the log");
    let mut first_copies = Vec::new();
    for (o, e) in &records {
        if !first_copies
            .iter()
            .any(|(_, f): &(u64, Envelope)| f.event_id == e.event_id)
        {
            first_copies.push((*o, e.clone()));
        }
    }
    let channel = tonic::transport::Endpoint::from_shared(addr.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    let mut client = BuildsClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert("authorization", bearer.clone());
        Ok(req)
    });
    for (offset, _) in &records {
        let got = common::wait_for_async(
            "the API to know the build",
            Duration::from_secs(30),
            async || {
                client
                    .get_build(api::GetBuildRequest {
                        build_id: build.clone(),
                        at: Some(At::AtOffset(*offset)),
                    })
                    .await
                    .map(|r| r.into_inner())
                    .map_err(|e| e.message().to_owned())
            },
        )
        .await;
        let want =
            history::build_at(&build, &first_copies, Moment::Offset(*offset)).expect("exists");
        assert_eq!(got.as_of_offset, want.offset, "a copy is not folded twice");
        assert_eq!(got.status, want.build.phase.name(), "at {offset}");
        assert_eq!(got.jobs.len(), want.build.jobs.len(), "at {offset}");
        let Some((g, w)) = got.jobs.first().zip(want.build.jobs.first()) else {
            continue; // triggered, not planned yet
        };
        assert_eq!(g.status, w.phase.name(), "at {offset}");
        assert_eq!(
            g.waiting_for,
            want.waiting.get("a").cloned().unwrap_or_default()
        );
        let got_lines: Vec<&str> = g.steps[0].lines.iter().map(|l| l.status.as_str()).collect();
        let want_lines: Vec<&str> = w.steps[0].lines.iter().map(|l| l.phase.name()).collect();
        assert_eq!(got_lines, want_lines, "at {offset}");
    }
    // A mid-build moment really is mid-build: the first line running, the second pending.
    let running = first_copies
        .iter()
        .find(|(_, e)| matches!(&e.payload, Some(Payload::LineStarted(l)) if l.line == 0))
        .unwrap()
        .0;
    let mid = client
        .get_build(api::GetBuildRequest {
            build_id: build.clone(),
            at: Some(At::AtOffset(running)),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mid.jobs[0].steps[0].lines[0].status, "running");
    assert_eq!(mid.jobs[0].steps[0].lines[1].status, "pending");
    // Offsets are the build's partition's: the other build's are elsewhere or interleaved.
    let partition = log.layout().partition_for(Topic::Events, &build);
    assert!(partition < 4);

    let why = client
        .explain_build(api::ExplainBuildRequest {
            build_id: build.clone(),
            job: "a".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let kinds: Vec<&str> = why.jobs[0]
        .decisions
        .iter()
        .map(|d| d.kind.as_str())
        .collect();
    assert_eq!(
        kinds,
        ["queued", "waiting", "assigned", "started", "succeeded"]
    );

    stop.cancel();
    api_task.abort();
    kafka.delete_topics().await.expect("delete the test topics");
}
