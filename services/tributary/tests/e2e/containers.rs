//! Container jobs end to end, against the real Podman Docker API socket
//! (`scripts/setup-containers.sh`; or DOCKER_HOST): `tributary run` runs `image:` jobs in
//! containers; on a server, image jobs go only to agents started with `--engine`, a job waits
//! with a reason while there is none, and a restarted agent removes the containers its crash
//! left behind.

use crate::common;

use std::process::Command;

use common::{bin, events_in, job, wait_secs as wait_until, Server};
use serde_json::Value;
use tributary_executor::container::{engine_from_env, Engine};

const IMAGE: &str = "localhost/ci-busybox";

/// The engine, or a failure naming the script that starts it.
fn engine(rt: &tokio::runtime::Runtime) -> Engine {
    let address = engine_from_env();
    rt.block_on(Engine::connect(&address)).unwrap_or_else(|e| {
        panic!(
            "these tests need a container engine with the {IMAGE} image: run \
             `sudo scripts/setup-containers.sh` (or set DOCKER_HOST): {e}"
        )
    })
}

fn owned(rt: &tokio::runtime::Runtime, engine: &Engine, owner: &str) -> Vec<String> {
    rt.block_on(engine.owned_containers(owner))
        .expect("list containers")
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_owned()
}

/// stdout of line `line` of step 0 of `job`, from the events.
fn line_output(events: &[Value], job: &str, line: u64) -> String {
    events
        .iter()
        .filter(|e| {
            e["type"] == "log_chunk"
                && e["job"] == job
                && e["step"] == 0
                && e["line"] == line
                && e["stream"] == "stdout"
        })
        .map(|e| e["data"].as_str().unwrap().to_owned())
        .collect()
}

fn executor_of(events: &[Value], job: &str) -> String {
    events
        .iter()
        .rev()
        .find(|e| e["type"] == "job_started" && e["job"] == job)
        .map(|e| e["executor"].as_str().unwrap().to_owned())
        .unwrap_or_default()
}

#[test]
fn tributary_run_runs_image_jobs_in_containers() {
    tributary_testkit::require!(Containers);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let engine = engine(&rt);
    let dir = tempfile::tempdir().unwrap();
    let pipeline = dir.path().join(".tributary.yml");
    std::fs::write(
        &pipeline,
        format!(
            "jobs:\n  inside:\n    image: {IMAGE}\n    steps:\n      - script:\n          - hostname\n          \
             - test -f /bin/busybox && echo busybox\n          - echo $PWD > where.txt\n  \
             outside:\n    steps:\n      - script:\n          - hostname\n"
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    let out = Command::new(bin())
        .args(["run", "--plain", "-f"])
        .arg(&pipeline)
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let build = stdout
        .lines()
        .find_map(|l| l.strip_prefix("build "))
        .and_then(|l| l.split_whitespace().next())
        .expect("build id")
        .to_owned();
    let events = events_in(&data, Some(&build));
    assert_eq!(executor_of(&events, "inside"), format!("container:{IMAGE}"));
    assert_eq!(executor_of(&events, "outside"), "host");
    let inside = line_output(&events, "inside", 0);
    assert_eq!(line_output(&events, "outside", 0).trim(), host_name());
    assert_ne!(
        inside.trim(),
        host_name(),
        "the image job ran in a container"
    );
    assert_eq!(line_output(&events, "inside", 1), "busybox\n");
    // The pipeline's directory is the container's workspace.
    assert_eq!(
        std::fs::read_to_string(dir.path().join("where.txt")).unwrap(),
        "/workspace\n"
    );
    assert!(owned(&rt, &engine, &format!("local-{build}")).is_empty());
}

#[test]
fn image_jobs_wait_for_an_agent_with_an_engine_and_a_crashed_agent_cleans_up() {
    tributary_testkit::require!(Containers);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let engine = engine(&rt);
    let c = cluster();
    let _plain = c.agent("plain", &[]);
    let plain = c.agent_id("plain");
    c.project(
        "boxes",
        &format!(
            "jobs:\n  boxed:\n    image: {IMAGE}\n    steps:\n      - hostname\n  \
             host:\n    steps:\n      - hostname\n"
        ),
    );
    let build = c.admin(&["trigger", "boxes"]).trim().to_owned();
    // Only an agent without an engine: the host job runs, the image job waits and says why.
    wait_until("the host job", 60, || {
        job(&c.get(&build), "host")["status"] == "succeeded"
    });
    let b = c.get(&build);
    assert_eq!(job(&b, "host")["agent_id"], plain.as_str());
    let boxed = job(&b, "boxed");
    assert_eq!(boxed["status"], "queued");
    let why = boxed["waiting_for"].as_str().unwrap();
    assert!(why.contains("can run containers"), "{why}");

    // An agent with an engine arrives: the image job runs there, in a container.
    let address = engine.address().to_owned();
    let boxer_proc = c.agent(
        "boxer",
        &["--engine", &address, "--cpus", "1", "--memory", "128m"],
    );
    let boxer = c.agent_id("boxer");
    wait_until("the build", 120, || c.get(&build)["status"] == "succeeded");
    let b = c.get(&build);
    assert_eq!(job(&b, "boxed")["agent_id"], boxer.as_str());
    let events = c.events(Some(&build));
    assert_eq!(executor_of(&events, "boxed"), format!("container:{IMAGE}"));
    assert_ne!(line_output(&events, "boxed", 0).trim(), host_name());
    assert!(owned(&rt, &engine, &boxer).is_empty(), "container removed");

    // The container agent crashes mid-job: its container stays behind ...
    c.project(
        "sleepy",
        &format!("jobs:\n  nap:\n    image: {IMAGE}\n    steps:\n      - sleep 600\n"),
    );
    let sleepy = c.admin(&["trigger", "sleepy"]).trim().to_owned();
    wait_until("the nap to start", 120, || {
        c.events(Some(&sleepy))
            .iter()
            .any(|e| e["type"] == "line_started")
    });
    let mut boxer_proc = boxer_proc;
    boxer_proc.0.kill().unwrap();
    boxer_proc.0.wait().unwrap();
    let orphans = owned(&rt, &engine, &boxer);
    assert_eq!(orphans.len(), 1, "{orphans:?}");
    // ... until it starts again: then it removes it before taking work.
    let _boxer_again = c.agent(
        "boxer",
        &["--engine", &address, "--cpus", "1", "--memory", "128m"],
    );
    wait_until("the orphan to be removed", 120, || {
        !owned(&rt, &engine, &boxer).contains(&orphans[0])
    });
    c.admin(&["cancel", &sleepy]);
    wait_until("the canceled build", 120, || {
        c.get(&sleepy)["status"] == "canceled"
    });
    wait_until("no containers left", 60, || {
        owned(&rt, &engine, &boxer).is_empty()
    });
}

/// `tributary up` without in-process agents; leases lost after 3 s without a heartbeat.
fn cluster() -> Server {
    common::start_with(&["--agents", "0", "--lease-ttl", "6"])
}
