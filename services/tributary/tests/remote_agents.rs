//! Remote agents against a real `tributary up` (no in-process agents) and real, separate
//! `tributary agent` processes: label routing with a generic fallback, a job waiting with a
//! reason, `kill -9` of an agent mid-job (requeued, finished elsewhere, late events fenced
//! off), timeout and retry.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tributary_proto::api::{agents_client::AgentsClient, SendEventsRequest};
use tributary_proto::events::{envelope::Payload, Envelope, LineStarted};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Cluster {
    _server: Proc,
    addr: String,
    token: String,
    dir: tempfile::TempDir,
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tributary")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Cluster {
    fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let server = Command::new(bin())
            .args([
                "up",
                "--agents",
                "0",
                "--lease-ttl",
                "2",
                "--listen",
                &addr,
                "--data",
            ])
            .arg(dir.path().join("data"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_until("server", 30, || std::net::TcpStream::connect(&addr).is_ok());
        let token = std::fs::read_to_string(dir.path().join("data/admin.token"))
            .unwrap()
            .trim()
            .to_owned();
        Cluster {
            _server: Proc(server),
            addr: format!("http://{addr}"),
            token,
            dir,
        }
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .args(args)
            .env("TRIBUTARY_SERVER", &self.addr)
            .env("TRIBUTARY_TOKEN", &self.token)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn agent(&self, name: &str, labels: &str) -> Proc {
        let mut cmd = Command::new(bin());
        cmd.args([
            "agent",
            "--server",
            &self.addr,
            "--token",
            &self.token,
            "--name",
            name,
        ])
        .arg("--workdir")
        .arg(self.workdir(name))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        if !labels.is_empty() {
            cmd.args(["--labels", labels]);
        }
        Proc(cmd.spawn().unwrap())
    }

    fn workdir(&self, name: &str) -> PathBuf {
        self.dir.path().join("agents").join(name)
    }

    fn agent_id(&self, name: &str) -> String {
        let path = self.workdir(name).join("agent.json");
        wait_until("agent registration", 30, || path.exists());
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        v["agent_id"].as_str().unwrap().to_owned()
    }

    fn project(&self, name: &str, pipeline: &str) {
        self.project_with(name, pipeline, &[]);
    }

    fn project_with(&self, name: &str, pipeline: &str, flags: &[&str]) {
        let repo = self.dir.path().join(name);
        std::fs::create_dir_all(&repo).unwrap();
        git(&repo, &["init", "-q", "-b", "main"]);
        std::fs::write(repo.join(".tributary.yml"), pipeline).unwrap();
        git(&repo, &["add", "."]);
        git(
            &repo,
            &[
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "commit",
                "-qm",
                "init",
            ],
        );
        let mut args = vec!["project", "add", name, "--repo", repo.to_str().unwrap()];
        args.extend_from_slice(flags);
        self.ok(&args);
    }

    fn get(&self, build: &str) -> Value {
        serde_json::from_str(&self.ok(&["get", build, "--json"])).unwrap()
    }

    fn events(&self, build: &str) -> Vec<Value> {
        let data = self.dir.path().join("data");
        let out = Command::new(bin())
            .args(["events", "--json", "--build", build, "--data"])
            .arg(&data)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn git(dir: &Path, args: &[&str]) {
    assert!(Command::new("git")
        .args(args)
        .current_dir(dir)
        .status()
        .unwrap()
        .success());
}

fn job<'a>(build: &'a Value, id: &str) -> &'a Value {
    build["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == id)
        .unwrap()
}

#[test]
fn labels_route_to_their_agent_with_a_generic_fallback_and_waiting_says_why() {
    let c = Cluster::start();
    let _gpu = c.agent("gpu-box", "gpu");
    let gpu = c.agent_id("gpu-box");
    c.project(
        "routing",
        "jobs:\n  train:\n    runs-on: gpu\n    steps:\n      - run: echo train\n  \
         lint:\n    steps:\n      - run: echo lint\n  arm:\n    runs-on: arm\n    steps:\n      - run: echo arm\n",
    );
    let build = c.ok(&["trigger", "routing"]).trim().to_owned();
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
    let _generic = c.agent("generic", "");
    let generic = c.agent_id("generic");
    wait_until("build to finish", 30, || {
        c.get(&build)["status"] == "succeeded"
    });
    let b = c.get(&build);
    assert_eq!(job(&b, "arm")["agent_id"], generic.as_str());
    assert_eq!(job(&b, "train")["agent_id"], gpu.as_str());

    // The admin sees both agents, lists builds remotely, and revokes one.
    let agents = c.ok(&["agents"]);
    assert!(
        agents.contains("gpu-box") && agents.contains("generic"),
        "{agents}"
    );
    assert!(c.ok(&["builds", "--project", "routing"]).contains(&build));
    assert!(
        c.ok(&["builds", "--project", "nope"]).lines().count() == 1,
        "header only"
    );
    c.ok(&["agents", "--revoke", &generic]);
    let agents = c.ok(&["agents"]);
    let line = agents.lines().find(|l| l.contains(&generic)).unwrap();
    assert!(line.contains("revoked"), "{agents}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_agent_job_is_requeued_elsewhere_and_its_late_events_are_refused() {
    let c = Cluster::start();
    let first = c.agent("first", "");
    let first_id = c.agent_id("first");
    c.project(
        "lost",
        "jobs:\n  work:\n    steps:\n      - script:\n          - echo attempt $TRIBUTARY_ATTEMPT\n          \
         - if [ \"$TRIBUTARY_ATTEMPT\" = 1 ]; then sleep 60; fi\n",
    );
    let build = c.ok(&["trigger", "lost"]).trim().to_owned();
    wait_until("the job to start", 30, || {
        job(&c.get(&build), "work")["status"] == "running"
    });
    let identity: Value = serde_json::from_str(
        &std::fs::read_to_string(c.workdir("first").join("agent.json")).unwrap(),
    )
    .unwrap();
    // kill -9: no drain, no goodbye.
    let mut first = first;
    first.0.kill().unwrap();
    let _ = first.0.wait();
    let _second = c.agent("second", "");
    let second_id = c.agent_id("second");
    wait_until("the build to finish", 60, || {
        c.get(&build)["status"] == "succeeded"
    });
    let b = c.get(&build);
    assert_eq!(job(&b, "work")["attempt"], 2);
    assert_eq!(job(&b, "work")["agent_id"], second_id.as_str());

    // The log proves it: one requeue naming the dead agent, no attempt assigned twice.
    let ev = c.events(&build);
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
    let c = Cluster::start();
    let _agent = c.agent("worker", "");
    c.project(
        "limits",
        "jobs:\n  slow:\n    timeout: 1s\n    steps:\n      - run: sleep 30\n  \
         flaky:\n    retry: 1\n    steps:\n      - run: test \"$TRIBUTARY_ATTEMPT\" = 2\n",
    );
    let started = Instant::now();
    let build = c.ok(&["trigger", "limits"]).trim().to_owned();
    wait_until("the build to finish", 30, || {
        let s = c.get(&build)["status"].clone();
        s == "failed" || s == "succeeded"
    });
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the timeout must stop `sleep 30`"
    );
    let b = c.get(&build);
    assert_eq!(job(&b, "slow")["status"], "timed_out");
    let flaky = job(&b, "flaky");
    assert_eq!(flaky["status"], "succeeded");
    assert_eq!(flaky["attempt"], 2);
}

#[test]
fn cancel_reaches_a_remote_agent_within_a_second() {
    let c = Cluster::start();
    let _agent = c.agent("worker", "");
    c.project(
        "cancel",
        "jobs:\n  long:\n    steps:\n      - run: sleep 60\n",
    );
    let build = c.ok(&["trigger", "cancel"]).trim().to_owned();
    wait_until("the job to run", 30, || {
        job(&c.get(&build), "long")["status"] == "running"
    });
    let started = Instant::now();
    c.ok(&["cancel", &build]);
    wait_until("the cancel", 10, || c.get(&build)["status"] == "canceled");
    let took = started.elapsed();
    assert!(took < Duration::from_millis(1500), "cancel took {took:?}");
    assert_eq!(job(&c.get(&build), "long")["status"], "canceled");
}

#[test]
fn a_project_concurrency_limit_holds_even_with_free_agent_slots() {
    let c = Cluster::start();
    let mut cmd = Command::new(bin());
    cmd.args([
        "agent",
        "--server",
        &c.addr,
        "--token",
        &c.token,
        "--name",
        "wide",
        "--capacity",
        "3",
    ])
    .arg("--workdir")
    .arg(c.workdir("wide"))
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let _agent = Proc(cmd.spawn().unwrap());
    c.project_with(
        "limited",
        "jobs:\n  a:\n    steps:\n      - run: sleep 0.3\n  b:\n    steps:\n      - run: sleep 0.3\n  \
         c:\n    steps:\n      - run: sleep 0.3\n",
        &["--max-concurrent-jobs", "1"],
    );
    let build = c.ok(&["trigger", "limited"]).trim().to_owned();
    wait_until("the build to finish", 30, || {
        c.get(&build)["status"] == "succeeded"
    });
    // The log proves the limit: at no offset do two jobs of the project run at once.
    let mut running = 0;
    let mut most = 0;
    for e in c.events(&build) {
        match e["type"].as_str() {
            Some("job_started") => running += 1,
            Some("job_finished") => running -= 1,
            _ => {}
        }
        most = most.max(running);
    }
    assert_eq!(most, 1, "max_concurrent_jobs 1 was exceeded");
}
