//! The autoscaler end to end: a real `tributary up --autoscaler` with the `local` provider, which
//! starts and stops real `tributary agent` processes. A burst of 40 jobs scales the pool up and
//! drains; after the grace period the pool is back to zero; an agent is drained and released
//! while another runs a long job, which finishes successfully.

use crate::common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::{bin, of_type, wait_secs, Server};
use serde_json::Value;

/// Small, quick pool: agents billed by the second, a 3 s grace period.
const POOL: &str = r#"
budget_per_hour = 100.0
grace_secs = 3
renewal_margin_secs = 1
target_wait_secs = 4
default_job_secs = 2
startup_timeout_secs = 120
drain_settle_secs = 0.5
tick_secs = 0.2

[[kind]]
name = "local"
capacity = 1
price_per_hour = 3.60
billing = "second"
max_agents = 4
"#;

/// `tributary up` with the autoscaler inside (local provider); the pool's configuration lives
/// as long as the returned directory.
fn start() -> (Server, tempfile::TempDir) {
    let config = tempfile::tempdir().unwrap();
    let path = config.path().join("pool.toml");
    std::fs::write(&path, POOL).unwrap();
    let s = common::start_with(&[
        "--agents",
        "0",
        "--lease-ttl",
        "5",
        "--autoscaler",
        path.to_str().unwrap(),
    ]);
    (s, config)
}

/// Waits until every agent the autoscaler requested is released and its process gone.
fn wait_for_empty_pool(s: &Server, secs: u64) -> Vec<Value> {
    let mut events = Vec::new();
    wait_secs("the pool to return to zero", secs, || {
        events = s.events(None);
        let requested = of_type(&events, "agent_requested").len();
        let released = of_type(&events, "agent_released").len();
        requested > 0 && requested == released && agent_processes(s) == 0
    });
    events
}

/// `tributary agent` processes started by this server's autoscaler.
fn agent_processes(s: &Server) -> usize {
    agent_processes_under(&s.data().join("autoscaler"))
}

fn agent_processes_under(root: &Path) -> usize {
    let root = root.to_string_lossy();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|cmd| {
            let cmd = String::from_utf8_lossy(cmd);
            cmd.contains("\0agent\0") && cmd.contains(root.as_ref())
        })
        .count()
}

/// SIGTERM, and a clean exit.
fn stop(s: &mut Server) {
    let status = s.stop();
    assert!(status.success(), "server exited with {status}");
}

fn time(e: &Value) -> i64 {
    e["time_us"].as_i64().unwrap()
}

#[test]
fn a_burst_scales_the_pool_up_it_drains_and_returns_to_zero_without_killing_a_job() {
    let (mut s, _pool) = start();
    assert_eq!(agent_processes(&s), 0);

    // A burst of 40 short jobs.
    let mut pipeline = String::from("jobs:\n");
    for i in 0..40 {
        pipeline.push_str(&format!("  j{i}:\n    steps:\n      - run: sleep 0.3\n"));
    }
    s.project("burst", &pipeline);
    let build = s.admin(&["trigger", "burst"]).trim().to_owned();
    wait_secs("the burst to finish", 300, || {
        let b = s.get(&build);
        b["status"] != "running" && b["status"] != "queued"
    });
    let b = s.get(&build);
    assert_eq!(b["status"], "succeeded", "{b:#}");

    let events = wait_for_empty_pool(&s, 120);
    let requested = of_type(&events, "agent_requested");
    assert!(
        requested.len() >= 2,
        "the burst should need more than one agent: {requested:?}"
    );
    assert!(requested.len() <= 40);
    let first = requested[0];
    assert!(first["reason"].as_str().unwrap().contains("job(s) wait"));
    assert_eq!(first["provider"], "local");
    // The pool reached several agents at once: count connections of distinct agents.
    let agents_used: std::collections::BTreeSet<&str> = b["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["agent_id"].as_str().unwrap())
        .collect();
    assert!(agents_used.len() >= 2, "{agents_used:?}");
    // Every release came after a drain, with a cost; and after the grace period.
    let finished = of_type(&events, "build_finished");
    let burst_end = time(finished.last().unwrap());
    for r in of_type(&events, "agent_released") {
        let id = r["request_id"].as_str().unwrap();
        let drained = events
            .iter()
            .find(|e| e["type"] == "agent_draining" && e["request_id"] == id)
            .unwrap_or_else(|| panic!("{id} released without a drain"));
        assert!(time(drained) <= time(r));
        assert!(r["cost_micros"].as_u64().unwrap() > 0, "{r}");
        assert!(
            time(r) >= burst_end + 2_900_000,
            "released within the grace period: {r}"
        );
    }

    // Scale-down during a running job: two quick jobs and a long one. The quick jobs' agents
    // go idle, are drained and released while the long job runs on its own agent.
    s.project(
        "long",
        "jobs:\n  quick-a:\n    steps:\n      - run: sleep 0.2\n  quick-b:\n    steps:\n      \
         - run: sleep 0.2\n  long:\n    steps:\n      - run: sleep 12 && echo survived\n",
    );
    let before = s.events(None).len();
    let build = s.admin(&["trigger", "long"]).trim().to_owned();
    wait_secs("the long build to finish", 300, || {
        let b = s.get(&build);
        b["status"] != "running" && b["status"] != "queued"
    });
    let b = s.get(&build);
    assert_eq!(b["status"], "succeeded", "{b:#}");
    let long = b["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == "long")
        .unwrap();
    assert_eq!(long["status"], "succeeded");
    assert_eq!(long["attempt"], 1, "the long job was never interrupted");
    let long_agent = long["agent_id"].as_str().unwrap().to_owned();
    let logs = s.admin(&["logs", &build, "--job", "long"]);
    assert!(logs.contains("survived"), "{logs}");

    let events = wait_for_empty_pool(&s, 120);
    let new = &events[before..];
    let started = new
        .iter()
        .find(|e| e["type"] == "job_started" && e["job"] == "long")
        .unwrap();
    let ended = new
        .iter()
        .find(|e| e["type"] == "job_finished" && e["job"] == "long")
        .unwrap();
    let released_meanwhile: Vec<&Value> = new
        .iter()
        .filter(|e| {
            e["type"] == "agent_released"
                && time(e) > time(started)
                && time(e) < time(ended)
                && e["agent_id"] != long_agent.as_str()
        })
        .collect();
    assert!(
        !released_meanwhile.is_empty(),
        "an agent should have been released while the long job ran"
    );
    // The long job's agent was drained only after its job ended.
    let drained = new
        .iter()
        .find(|e| e["type"] == "agent_draining" && e["agent_id"] == long_agent.as_str())
        .expect("the long job's agent is drained at last");
    assert!(time(drained) > time(ended));
    assert_eq!(agent_processes(&s), 0);
    stop(&mut s);
}

/// `tributary serve autoscaler --provider command` in its own process, next to a `tributary up`
/// on the same data directory: the scripts start and stop `tributary agent` processes; the
/// server tells drained agents to drain down their work stream.
#[test]
fn serve_autoscaler_with_the_command_provider_scales_up_and_back_to_zero() {
    let s = common::start_with(&["--agents", "0", "--lease-ttl", "5"]);
    let root = s.root.join("machines");
    std::fs::create_dir_all(&root).unwrap();
    let acquire = format!(
        "TRIBUTARY_LOG=info nohup {bin} agent --server \"$TRIBUTARY_SERVER\" \
         --token \"$TRIBUTARY_ENROLLMENT_TOKEN\" --name \"$TRIBUTARY_REQUEST_ID\" \
         --capacity \"$TRIBUTARY_AGENT_CAPACITY\" --workdir {root}/$TRIBUTARY_REQUEST_ID \
         > {root}/$TRIBUTARY_REQUEST_ID.log 2>&1 < /dev/null & echo \"$!\"",
        bin = bin(),
        root = root.display()
    );
    let release = format!(
        "kill \"$TRIBUTARY_MACHINE\" 2>/dev/null; \
         echo \"$TRIBUTARY_REQUEST_ID $TRIBUTARY_AGENT_ID\" >> {}/released",
        root.display()
    );
    let config = s.root.join("command.toml");
    std::fs::write(
        &config,
        format!("{POOL}\n[command]\nacquire = '''{acquire}'''\nrelease = '''{release}'''\n"),
    )
    .unwrap();
    let log = std::fs::File::create(s.root.join("autoscaler.log")).unwrap();
    let health = format!("127.0.0.1:{}", common::free_port());
    let mut autoscaler = Command::new(bin())
        .args(["serve", "autoscaler", "--provider", "command", "--config"])
        .arg(&config)
        .arg("--data")
        .arg(s.root.join("data"))
        .args(["--server", &s.addr, "--health-listen", &health])
        .env("TRIBUTARY_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();

    // Its liveness endpoint answers while it runs.
    wait_secs("the health endpoint", 60, || {
        common::http_get(&health, "/healthz")
            .is_some_and(|(status, body)| status == 200 && body == "ok\n")
    });

    let mut pipeline = String::from("jobs:\n");
    for i in 0..8 {
        pipeline.push_str(&format!("  j{i}:\n    steps:\n      - run: sleep 0.5\n"));
    }
    s.project("cmd", &pipeline);
    let build = s.admin(&["trigger", "cmd"]).trim().to_owned();
    wait_secs("the build to finish", 300, || {
        let b = s.get(&build);
        b["status"] != "running" && b["status"] != "queued"
    });
    assert_eq!(s.get(&build)["status"], "succeeded");

    let mut events = Vec::new();
    // `agent_released` is appended before the provider's release script runs (the decision
    // first): wait for the scripts too, not only for the events.
    let released_lines = || {
        std::fs::read_to_string(root.join("released"))
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    wait_secs("the pool to return to zero", 120, || {
        events = s.events(None);
        let requested = of_type(&events, "agent_requested").len();
        requested > 0
            && requested == of_type(&events, "agent_released").len()
            && released_lines() == requested
            && agent_processes_under(&root) == 0
    });
    let requested = of_type(&events, "agent_requested");
    assert!(requested.len() >= 2, "{requested:?}");
    assert!(requested.iter().all(|r| r["provider"] == "command"));
    let provisioned = of_type(&events, "agent_provisioned");
    assert_eq!(provisioned.len(), requested.len());
    let released = std::fs::read_to_string(root.join("released")).unwrap();
    assert_eq!(released.lines().count(), requested.len(), "{released}");
    // Each agent heard the drain from the server (the release script only runs after).
    for r in &requested {
        let id = r["request_id"].as_str().unwrap();
        let agent_log = std::fs::read_to_string(root.join(format!("{id}.log"))).unwrap();
        assert!(
            agent_log.contains("the server drains this agent"),
            "{id}: {agent_log}"
        );
    }
    unsafe {
        libc::kill(autoscaler.id() as libc::pid_t, libc::SIGTERM);
    }
    let status = autoscaler.wait().unwrap();
    assert!(status.success(), "{status}");
}

/// SIGTERM to `tributary up` while autoscaled agents run jobs: the jobs finish, the agents
/// drain and stop, and each is recorded as released (with its cost) before the server exits.
#[test]
fn stopping_up_drains_the_autoscaled_agents_and_records_their_release() {
    let (mut s, _pool) = start();
    s.project(
        "stop",
        "jobs:\n  a:\n    steps:\n      - run: sleep 4 && echo done-a\n",
    );
    let build = s.admin(&["trigger", "stop"]).trim().to_owned();
    wait_secs("the job to run", 120, || {
        s.get(&build)["jobs"][0]["status"] == "running"
    });
    stop(&mut s);
    let events = s.events(None);
    let finished: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "job_finished" && e["build_id"] == build.as_str())
        .collect();
    assert_eq!(finished.len(), 1, "the job reported its end");
    assert!(
        finished.iter().all(|e| e["status"] == "succeeded"),
        "{finished:?}"
    );
    let requested = of_type(&events, "agent_requested");
    let released = of_type(&events, "agent_released");
    assert!(!requested.is_empty());
    assert_eq!(released.len(), requested.len(), "{released:?}");
    assert!(released.iter().all(
        |r| r["reason"].as_str().unwrap().contains("autoscaler stopped")
            && r["cost_micros"].as_u64().unwrap() > 0
    ));
    assert_eq!(agent_processes(&s), 0);
}
