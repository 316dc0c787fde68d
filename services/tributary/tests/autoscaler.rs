//! The autoscaler end to end: a real `tributary up --autoscaler` with the `local` provider, which
//! starts and stops real `tributary agent` processes. A burst of 40 jobs scales the pool up and
//! drains; after the grace period the pool is back to zero; an agent is drained and released
//! while another runs a long job, which finishes successfully.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

struct Server {
    child: Option<Child>,
    addr: String,
    token: String,
    dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
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
        std::thread::sleep(Duration::from_millis(200));
    }
}

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

impl Server {
    /// `tributary up` with the autoscaler inside (local provider), or without one.
    fn start() -> Server {
        Self::start_with(true)
    }

    fn start_with(autoscaler: bool) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("pool.toml");
        std::fs::write(&config, POOL).unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new(bin());
        cmd.args(["up", "--agents", "0", "--lease-ttl", "5", "--listen", &addr]);
        if autoscaler {
            cmd.arg("--autoscaler").arg(&config);
        }
        let child = cmd
            .arg("--data")
            .arg(dir.path().join("data"))
            .env("TRIBUTARY_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("server.log")).unwrap())
            .spawn()
            .unwrap();
        wait_until("server", 60, || std::net::TcpStream::connect(&addr).is_ok());
        let token = std::fs::read_to_string(dir.path().join("data/admin.token"))
            .unwrap()
            .trim()
            .to_owned();
        Server {
            child: Some(child),
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

    fn project(&self, name: &str, pipeline: &str) {
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
        self.ok(&["project", "add", name, "--repo", repo.to_str().unwrap()]);
    }

    fn get(&self, build: &str) -> Value {
        serde_json::from_str(&self.ok(&["get", build, "--json"])).unwrap()
    }

    /// Every event on the log.
    fn events(&self) -> Vec<Value> {
        let out = Command::new(bin())
            .args(["events", "--json", "--data"])
            .arg(self.dir.path().join("data"))
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn of_type<'a>(events: &'a [Value], ty: &str) -> Vec<&'a Value> {
        events.iter().filter(|e| e["type"] == ty).collect()
    }

    /// Waits until every agent the autoscaler requested is released and its process gone.
    fn wait_for_empty_pool(&self, secs: u64) -> Vec<Value> {
        let mut events = Vec::new();
        wait_until("the pool to return to zero", secs, || {
            events = self.events();
            let requested = Self::of_type(&events, "agent_requested").len();
            let released = Self::of_type(&events, "agent_released").len();
            requested > 0 && requested == released && self.agent_processes() == 0
        });
        events
    }

    /// `tributary agent` processes started by this server's autoscaler.
    fn agent_processes(&self) -> usize {
        self.agent_processes_under(&self.dir.path().join("data/autoscaler"))
    }

    fn agent_processes_under(&self, root: &Path) -> usize {
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

    /// SIGTERM, and wait for a clean exit.
    fn stop(&mut self) {
        let mut child = self.child.take().unwrap();
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "server exited with {status}");
                return;
            }
            assert!(Instant::now() < deadline, "server did not stop");
            std::thread::sleep(Duration::from_millis(100));
        }
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

fn time(e: &Value) -> i64 {
    e["time_us"].as_i64().unwrap()
}

#[test]
fn a_burst_scales_the_pool_up_it_drains_and_returns_to_zero_without_killing_a_job() {
    let mut s = Server::start();
    assert_eq!(s.agent_processes(), 0);

    // A burst of 40 short jobs.
    let mut pipeline = String::from("jobs:\n");
    for i in 0..40 {
        pipeline.push_str(&format!("  j{i}:\n    steps:\n      - run: sleep 0.3\n"));
    }
    s.project("burst", &pipeline);
    let build = s.ok(&["trigger", "burst"]).trim().to_owned();
    wait_until("the burst to finish", 300, || {
        let b = s.get(&build);
        b["status"] != "running" && b["status"] != "queued"
    });
    let b = s.get(&build);
    assert_eq!(b["status"], "succeeded", "{b:#}");

    let events = s.wait_for_empty_pool(120);
    let requested = Server::of_type(&events, "agent_requested");
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
    let finished = Server::of_type(&events, "build_finished");
    let burst_end = time(finished.last().unwrap());
    for r in Server::of_type(&events, "agent_released") {
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
    let before = s.events().len();
    let build = s.ok(&["trigger", "long"]).trim().to_owned();
    wait_until("the long build to finish", 300, || {
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
    let logs = s.ok(&["logs", &build, "--job", "long"]);
    assert!(logs.contains("survived"), "{logs}");

    let events = s.wait_for_empty_pool(120);
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
    assert_eq!(s.agent_processes(), 0);
    s.stop();
}

/// `tributary serve autoscaler --provider command` in its own process, next to a `tributary up`
/// on the same data directory: the scripts start and stop `tributary agent` processes; the
/// server tells drained agents to drain down their work stream.
#[test]
fn serve_autoscaler_with_the_command_provider_scales_up_and_back_to_zero() {
    let s = Server::start_with(false);
    let root = s.dir.path().join("machines");
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
    let config = s.dir.path().join("command.toml");
    std::fs::write(
        &config,
        format!("{POOL}\n[command]\nacquire = '''{acquire}'''\nrelease = '''{release}'''\n"),
    )
    .unwrap();
    let log = std::fs::File::create(s.dir.path().join("autoscaler.log")).unwrap();
    let mut autoscaler = Command::new(bin())
        .args(["serve", "autoscaler", "--provider", "command", "--config"])
        .arg(&config)
        .arg("--data")
        .arg(s.dir.path().join("data"))
        .args(["--server", &s.addr])
        .env("TRIBUTARY_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();

    let mut pipeline = String::from("jobs:\n");
    for i in 0..8 {
        pipeline.push_str(&format!("  j{i}:\n    steps:\n      - run: sleep 0.5\n"));
    }
    s.project("cmd", &pipeline);
    let build = s.ok(&["trigger", "cmd"]).trim().to_owned();
    wait_until("the build to finish", 300, || {
        let b = s.get(&build);
        b["status"] != "running" && b["status"] != "queued"
    });
    assert_eq!(s.get(&build)["status"], "succeeded");

    let mut events = Vec::new();
    wait_until("the pool to return to zero", 120, || {
        events = s.events();
        let requested = Server::of_type(&events, "agent_requested").len();
        requested > 0
            && requested == Server::of_type(&events, "agent_released").len()
            && s.agent_processes_under(&root) == 0
    });
    let requested = Server::of_type(&events, "agent_requested");
    assert!(requested.len() >= 2, "{requested:?}");
    assert!(requested.iter().all(|r| r["provider"] == "command"));
    let provisioned = Server::of_type(&events, "agent_provisioned");
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
    let mut s = Server::start();
    s.project(
        "stop",
        "jobs:\n  a:\n    steps:\n      - run: sleep 4 && echo done-a\n",
    );
    let build = s.ok(&["trigger", "stop"]).trim().to_owned();
    wait_until("the job to run", 120, || {
        s.get(&build)["jobs"][0]["status"] == "running"
    });
    s.stop();
    let events = s.events();
    let finished: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "job_finished" && e["build_id"] == build.as_str())
        .collect();
    assert_eq!(finished.len(), 1, "the job reported its end");
    assert!(
        finished.iter().all(|e| e["status"] == "succeeded"),
        "{finished:?}"
    );
    let requested = Server::of_type(&events, "agent_requested");
    let released = Server::of_type(&events, "agent_released");
    assert!(!requested.is_empty());
    assert_eq!(released.len(), requested.len(), "{released:?}");
    assert!(released.iter().all(
        |r| r["reason"].as_str().unwrap().contains("autoscaler stopped")
            && r["cost_micros"].as_u64().unwrap() > 0
    ));
    assert_eq!(s.agent_processes(), 0);
}
