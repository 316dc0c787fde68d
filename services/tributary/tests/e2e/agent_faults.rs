//! Agent faults against the real server: a real `tributary up` (no in-process agents) and
//! real `tributary agent` processes, each fault made for real:
//! * the server crashes (SIGKILL) and restarts while a job runs: the agent reconnects, the
//!   job's events sent while the server was away arrive, the agent takes new work;
//! * an agent frozen (SIGSTOP) past its lease: the server requeues its job to another agent;
//!   thawed (SIGCONT), its late events are refused (fenced), it stops that attempt and goes on
//!   taking work;
//! * a connected agent revoked mid-job: its job is requeued elsewhere and the agent exits with
//!   the documented error (delete agent.json and register again).
//!
//! A cancel delivered by heartbeat on the real server is `remote_agents.rs`'s
//! `cancel_reaches_a_remote_agent_at_its_next_heartbeat`. The fake server of
//! `services/agent/tests/runtime.rs` stays for what the real one cannot be made to do on cue
//! (a server that refuses registration with a given code, a drain instruction at a chosen
//! moment, a server that answers nothing at all during registration).

use crate::common;

use std::time::Duration;

use common::{job, of_type, start_with, wait_secs, Proc, Server};
use serde_json::Value;

/// The `get --json` of `build`, waited on until `done` holds; fails with the last one seen.
fn wait_build(
    s: &Server,
    build: &str,
    what: &str,
    secs: u64,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let mut last = Value::Null;
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Ok(v) = serde_json::from_str::<Value>(&String::from_utf8_lossy(
            &s.cli(&s.token, &["get", build, "--json"]).stdout,
        )) {
            if done(&v) {
                return v;
            }
            last = v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}; last seen: {last}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A job that waits (at most 2 minutes) for the file `flag`, then prints `done`.
fn waits_for(flag: &std::path::Path, labels: &str) -> String {
    format!(
        "jobs:\n  work:\n    runs-on: [{labels}]\n    steps:\n      - run: for i in $(seq 1 1200); do [ -f {} ] && break; sleep 0.1; done; echo \"done on attempt $TRIBUTARY_ATTEMPT\"\n",
        flag.display()
    )
}

/// What every test here starts from: a `tributary up` with no in-process agent, one agent
/// process, and a build of project `p` whose job `work` runs on it until `flag` exists.
struct Running {
    s: Server,
    agent: Proc,
    agent_id: String,
    flag: std::path::PathBuf,
    build: String,
}

/// Starts the server with leases of `lease_ttl` seconds and the agent `name` with `labels`;
/// triggers the job (`runs-on: [runs_on]`) and waits until it runs on that agent.
fn a_job_running(lease_ttl: &str, name: &str, labels: &str, runs_on: &str) -> Running {
    let s = start_with(&["--agents", "0", "--lease-ttl", lease_ttl]);
    let agent = s.agent(name, &["--labels", labels]);
    let agent_id = s.agent_id(name);
    let flag = s.root.join("go");
    s.project("p", &waits_for(&flag, runs_on));
    let build = s.trigger("p");
    let b = wait_build(&s, &build, "the job to run", 60, |b| {
        job(b, "work")["status"] == "running"
    });
    assert_eq!(job(&b, "work")["agent_id"], agent_id.as_str(), "{b}");
    Running {
        s,
        agent,
        agent_id,
        flag,
        build,
    }
}

#[test]
fn an_agent_reconnects_after_the_server_crashes_and_its_job_s_events_arrive() {
    // Leases outlive the restart (the server is down a few seconds).
    let Running {
        mut s,
        agent: _agent,
        agent_id,
        flag,
        build,
    } = a_job_running("60", "box", "box", "box");

    s.crash_and_restart();
    // The job finishes while the agent is (re)connecting.
    std::fs::write(&flag, "").unwrap();
    let b = s.finished(&build, Duration::from_secs(120));
    assert_eq!(b["status"], "succeeded", "{b}\n{}", s.log());
    let work = job(&b, "work");
    assert_eq!(work["attempt"], 1, "the same attempt, not a requeue: {b}");
    assert_eq!(work["agent_id"], agent_id.as_str());
    let events = s.events(Some(&build));
    assert!(of_type(&events, "job_requeued").is_empty(), "{events:?}");
    assert_eq!(of_type(&events, "job_started").len(), 1);
    assert!(s
        .ok(&s.token, &["logs", &build])
        .contains("done on attempt 1"));

    // The reconnected agent takes new work.
    std::fs::write(&flag, "").unwrap();
    let again = s.trigger("p");
    let b = s.finished(&again, Duration::from_secs(60));
    assert_eq!(b["status"], "succeeded", "{b}");
    assert_eq!(job(&b, "work")["agent_id"], agent_id.as_str());
}

#[test]
fn a_frozen_agent_loses_its_lease_and_its_late_events_are_refused() {
    // Agents beat every 2 s: three beats per lease, so only the frozen agent loses its own
    // (a lease of 2 s expired between two punctual beats on a loaded machine).
    let Running {
        s,
        agent: mut frozen,
        agent_id: frozen_id,
        flag,
        build,
    } = a_job_running("6", "frozen", "shared,f1", "shared");

    frozen.signal(libc::SIGSTOP);
    let _other = s.agent("other", &["--labels", "shared"]);
    let other_id = s.agent_id("other");
    // Lease lost after 6 s without a heartbeat: attempt 2 goes to the other agent.
    let b = wait_build(&s, &build, "attempt 2 on the other agent", 60, |b| {
        job(b, "work")["attempt"] == 2 && job(b, "work")["status"] == "running"
    });
    assert_eq!(job(&b, "work")["agent_id"], other_id.as_str(), "{b}");

    // Both attempts may now end; the frozen one thaws and reports attempt 1 late.
    std::fs::write(&flag, "").unwrap();
    frozen.signal(libc::SIGCONT);
    let b = s.finished(&build, Duration::from_secs(60));
    assert_eq!(b["status"], "succeeded", "{b}");
    assert_eq!(job(&b, "work")["attempt"], 2);
    assert_eq!(job(&b, "work")["agent_id"], other_id.as_str());

    let events = s.events(Some(&build));
    let requeued = of_type(&events, "job_requeued");
    assert_eq!(requeued.len(), 1, "{events:?}");
    assert_eq!(requeued[0]["agent_id"], frozen_id.as_str());
    // Nothing of attempt 1 after its requeue made it onto the log.
    let at = events
        .iter()
        .position(|e| e["type"] == "job_requeued")
        .unwrap();
    let late: Vec<&Value> = events[at + 1..]
        .iter()
        .filter(|e| e["attempt"] == 1 && e["type"] != "usage_tick")
        .collect();
    assert!(
        late.is_empty(),
        "late events of the fenced attempt: {late:?}"
    );
    // The thawed agent ends its stale attempt, stays up and takes work again.
    wait_secs("the thawed agent to end its stale attempt", 60, || {
        std::fs::read_to_string(s.root.join("agent-frozen.log"))
            .unwrap_or_default()
            .contains("job ended")
    });
    assert!(frozen.0.try_wait().unwrap().is_none(), "the agent exited");
    s.project(
        "q",
        "jobs:\n  mine:\n    runs-on: [f1]\n    steps:\n      - run: echo thawed\n",
    );
    let next = s.trigger("q");
    let b = s.finished(&next, Duration::from_secs(60));
    assert_eq!(b["status"], "succeeded", "{b}");
    assert_eq!(job(&b, "mine")["agent_id"], frozen_id.as_str());
}

#[test]
fn a_revoked_agent_loses_its_job_and_exits_saying_how_to_register_again() {
    // Leases outlive the test's waits: only the revoke can take the job back in time.
    let Running {
        s,
        agent: mut doomed,
        agent_id: doomed_id,
        flag,
        build,
    } = a_job_running("120", "doomed", "shared", "shared");

    s.admin(&["agents", "--revoke", &doomed_id]);
    let status = doomed.wait_exit(Duration::from_secs(60));
    assert!(!status.success(), "a revoked agent exits with an error");
    let log = std::fs::read_to_string(s.root.join("agent-doomed.log")).unwrap();
    // The server's own words reach the agent: revoked, and how to register again.
    assert!(
        log.contains(&format!("agent {doomed_id} is revoked")),
        "{log}"
    );
    assert!(log.contains("delete agent.json"), "{log}");
    assert!(log.contains("--token"), "{log}");

    // Its job runs again elsewhere.
    std::fs::write(&flag, "").unwrap();
    let _other = s.agent("other", &["--labels", "shared"]);
    let other_id = s.agent_id("other");
    let b = s.finished(&build, Duration::from_secs(60));
    assert_eq!(b["status"], "succeeded", "{b}");
    let events = s.events(Some(&build));
    assert_eq!(job(&b, "work")["attempt"], 2, "{b}\n{events:?}");
    assert_eq!(job(&b, "work")["agent_id"], other_id.as_str(), "{b}");
    let requeued = of_type(&events, "job_requeued");
    assert_eq!(requeued.len(), 1, "{events:?}");
    assert_eq!(requeued[0]["agent_id"], doomed_id.as_str());
    assert_eq!(requeued[0]["attempt"], 1, "{events:?}");
    assert!(
        requeued[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("revoked")),
        "{events:?}"
    );
    // Nothing of the revoked agent's attempt after its requeue made it onto the log.
    let at = events
        .iter()
        .position(|e| e["type"] == "job_requeued")
        .unwrap();
    let late: Vec<&Value> = events[at + 1..]
        .iter()
        .filter(|e| e["attempt"] == 1 && e["type"] != "usage_tick")
        .collect();
    assert!(
        late.is_empty(),
        "late events of the revoked attempt: {late:?}"
    );
    let agents = s.admin(&["agents"]);
    let line = agents.lines().find(|l| l.contains(&doomed_id)).unwrap();
    assert!(line.contains("revoked"), "{agents}");
}
