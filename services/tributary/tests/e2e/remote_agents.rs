//! Remote agents against a real `tributary up` (no in-process agents) and real, separate
//! `tributary agent` processes: label routing with a generic fallback, a job waiting with a
//! reason, `kill -9` of an agent mid-job (requeued, finished elsewhere, late events fenced
//! off), timeout and retry.

use crate::common;

use std::time::{Duration, Instant};

use common::{job, wait_secs as wait_until, Server};
use serde_json::Value;
use tributary_proto::api::{agents_client::AgentsClient, SendEventsRequest};
use tributary_proto::events::{envelope::Payload, Envelope, LineStarted};

/// `tributary up` without in-process agents, leases lost after 6 s without a heartbeat: three
/// of an agent's 2 s beats (a lease of 2 s expired between two punctual beats on a loaded
/// machine, and a requeue made `flaky` run a third attempt).
fn start() -> Server {
    common::start_with(&["--agents", "0", "--lease-ttl", "6"])
}

/// A `tributary agent` carrying `labels` (comma-separated; empty = a generic agent).
fn agent(c: &Server, name: &str, labels: &str) -> common::Proc {
    if labels.is_empty() {
        c.agent(name, &[])
    } else {
        c.agent(name, &["--labels", labels])
    }
}

#[test]
fn labels_route_to_their_agent_with_a_generic_fallback_and_waiting_says_why() {
    let c = start();
    let _gpu = agent(&c, "gpu-box", "gpu");
    let gpu = c.agent_id("gpu-box");
    c.project(
        "routing",
        "jobs:\n  train:\n    runs-on: gpu\n    steps:\n      - run: echo train\n  \
         lint:\n    steps:\n      - run: echo lint\n  arm:\n    runs-on: arm\n    steps:\n      - run: echo arm\n",
    );
    let build = c.admin(&["trigger", "routing"]).trim().to_owned();
    // Only the gpu agent is connected: `train` runs there; `arm` has neither a matching nor a
    // generic agent and waits, and `get` says why. `lint` (no labels, no generic agent) may
    // run on any agent.
    wait_until("train to finish", 30, || {
        job(&c.get(&build), "train")["status"] == "succeeded"
    });
    let b = c.get(&build);
    assert_eq!(job(&b, "train")["agent_id"], gpu.as_str());
    let arm = job(&b, "arm");
    assert_eq!(arm["status"], "queued");
    let why = arm["waiting_for"].as_str().unwrap();
    assert!(why.contains("arm") && why.contains("generic"), "{why}");

    // A generic agent arrives: `arm` falls back to it.
    let _generic = agent(&c, "generic", "");
    let generic = c.agent_id("generic");
    wait_until("build to finish", 30, || {
        c.get(&build)["status"] == "succeeded"
    });
    let b = c.get(&build);
    assert_eq!(job(&b, "arm")["agent_id"], generic.as_str());
    assert_eq!(job(&b, "train")["agent_id"], gpu.as_str());

    // The admin sees both agents, lists builds remotely, and revokes one.
    let agents = c.admin(&["agents"]);
    assert!(
        agents.contains("gpu-box") && agents.contains("generic"),
        "{agents}"
    );
    assert!(c
        .admin(&["builds", "--project", "routing"])
        .contains(&build));
    assert!(
        c.admin(&["builds", "--project", "nope"]).lines().count() == 1,
        "header only"
    );
    c.admin(&["agents", "--revoke", &generic]);
    let agents = c.admin(&["agents"]);
    let line = agents.lines().find(|l| l.contains(&generic)).unwrap();
    assert!(line.contains("revoked"), "{agents}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_agent_job_is_requeued_elsewhere_and_its_late_events_are_refused() {
    let c = start();
    let first = agent(&c, "first", "");
    let first_id = c.agent_id("first");
    c.project(
        "lost",
        "jobs:\n  work:\n    steps:\n      - script:\n          - echo attempt $TRIBUTARY_ATTEMPT\n          \
         - if [ \"$TRIBUTARY_ATTEMPT\" = 1 ]; then sleep 60; fi\n",
    );
    let build = c.admin(&["trigger", "lost"]).trim().to_owned();
    wait_until("the job to start", 30, || {
        job(&c.get(&build), "work")["status"] == "running"
    });
    let identity: Value = serde_json::from_str(
        &std::fs::read_to_string(c.agent_workdir("first").join("agent.json")).unwrap(),
    )
    .unwrap();
    // kill -9: no drain, no goodbye.
    let mut first = first;
    first.0.kill().unwrap();
    let _ = first.0.wait();
    let _second = agent(&c, "second", "");
    let second_id = c.agent_id("second");
    wait_until("the build to finish", 60, || {
        c.get(&build)["status"] == "succeeded"
    });
    let b = c.get(&build);
    assert_eq!(job(&b, "work")["attempt"], 2);
    assert_eq!(job(&b, "work")["agent_id"], second_id.as_str());

    // The log proves it: one requeue naming the dead agent, no attempt assigned twice.
    let ev = c.events(Some(&build));
    let requeues: Vec<&Value> = ev.iter().filter(|e| e["type"] == "job_requeued").collect();
    assert_eq!(requeues.len(), 1);
    assert_eq!(requeues[0]["agent_id"], first_id.as_str());
    let mut assigned: Vec<u64> = ev
        .iter()
        .filter(|e| e["type"] == "job_assigned")
        .map(|e| e["attempt"].as_u64().unwrap())
        .collect();
    assigned.sort();
    assert_eq!(assigned, vec![1, 2]);
    let old_lease = ev
        .iter()
        .find(|e| e["type"] == "job_assigned" && e["attempt"] == 1)
        .and_then(|e| e["lease_id"].as_str())
        .unwrap()
        .to_owned();

    // The dead agent's late events for its old lease are refused (fencing).
    let token = identity["agent_token"].as_str().unwrap().to_owned();
    let channel = tonic::transport::Endpoint::from_shared(c.addr.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = AgentsClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        Ok(req)
    });
    let late = Envelope::new(
        "",
        "",
        &build,
        Payload::LineStarted(LineStarted {
            job: "work".into(),
            attempt: 1,
            step: 0,
            line: 1,
            text: "late".into(),
        }),
    );
    let err = client
        .send_events(SendEventsRequest {
            lease_id: old_lease,
            events: vec![late],
        })
        .await
        .expect_err("late events of a requeued lease must be refused");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
}

#[test]
fn timeout_kills_the_job_and_retry_reruns_a_failure() {
    let c = start();
    let _agent = agent(&c, "worker", "");
    c.project(
        "limits",
        "jobs:\n  slow:\n    timeout: 1s\n    steps:\n      - run: sleep 30\n  \
         flaky:\n    retry: 1\n    steps:\n      - run: test \"$TRIBUTARY_ATTEMPT\" = 2\n",
    );
    let started = Instant::now();
    let build = c.admin(&["trigger", "limits"]).trim().to_owned();
    wait_until("the build to finish", 30, || {
        let s = c.get(&build)["status"].clone();
        s == "failed" || s == "succeeded"
    });
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the timeout must stop `sleep 30`"
    );
    let b = c.get(&build);
    assert_eq!(job(&b, "slow")["status"], "timed_out", "{b}");
    let flaky = job(&b, "flaky");
    assert_eq!(flaky["status"], "succeeded", "{b}");
    assert_eq!(flaky["attempt"], 2, "{b}");
}

/// A cancel reaches a remote agent at its next heartbeat (about a second): measured on the
/// log, from the `BuildCanceled` the server appended to the agent's `JobFinished(canceled)`,
/// so the time the CLI processes take does not count. The bound is generous (the heartbeat is
/// the feature, a loaded runner only slows the processes); the figure is printed.
#[test]
fn cancel_reaches_a_remote_agent_at_its_next_heartbeat() {
    let c = start();
    let _agent = agent(&c, "worker", "");
    c.project(
        "cancel",
        "jobs:\n  long:\n    steps:\n      - run: sleep 60\n",
    );
    let build = c.admin(&["trigger", "cancel"]).trim().to_owned();
    wait_until("the job to run", 30, || {
        job(&c.get(&build), "long")["status"] == "running"
    });
    c.admin(&["cancel", &build]);
    let b = c.finished(&build, Duration::from_secs(30));
    assert_eq!(b["status"], "canceled", "{b}");
    assert_eq!(job(&b, "long")["status"], "canceled", "{b}");
    let events = c.events(Some(&build));
    let time_of = |ty: &str| {
        events
            .iter()
            .find(|e| e["type"] == ty)
            .and_then(|e| e["time_us"].as_i64())
            .unwrap_or_else(|| panic!("no {ty} with a time in {events:?}"))
    };
    let took =
        Duration::from_micros((time_of("job_finished") - time_of("build_canceled")).max(0) as u64);
    println!("the cancel reached the agent and stopped its job in {took:?}");
    assert!(took < Duration::from_secs(10), "cancel took {took:?}");
}

#[test]
fn a_project_concurrency_limit_holds_even_with_free_agent_slots() {
    let c = start();
    let _agent = c.agent("wide", &["--capacity", "3"]);
    c.project_with(
        "limited",
        "jobs:\n  a:\n    steps:\n      - run: sleep 0.3\n  b:\n    steps:\n      - run: sleep 0.3\n  \
         c:\n    steps:\n      - run: sleep 0.3\n",
        &["--max-concurrent-jobs", "1"],
    );
    let build = c.admin(&["trigger", "limited"]).trim().to_owned();
    wait_until("the build to finish", 30, || {
        c.get(&build)["status"] == "succeeded"
    });
    // The log proves the limit: at no offset do two jobs of the project run at once.
    let mut running = 0;
    let mut most = 0;
    for e in c.events(Some(&build)) {
        match e["type"].as_str() {
            Some("job_started") => running += 1,
            Some("job_finished") => running -= 1,
            _ => {}
        }
        most = most.max(running);
    }
    assert_eq!(most, 1, "max_concurrent_jobs 1 was exceeded");
}
