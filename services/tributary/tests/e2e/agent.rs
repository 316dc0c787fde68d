//! `tributary agent` as a real process against a real `tributary up` (without in-process
//! agents): enrollment on first start and the identity kept for restarts, builds run by the
//! agent, drain on SIGTERM (the running job finishes, exit 0), and a second signal stopping at
//! once (exit 130).

use crate::common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{bin, job, wait_secs as wait_until, Proc, Server};
use serde_json::Value;

/// `tributary up` without in-process agents.
fn start() -> Server {
    common::start_with(&["--agents", "0"])
}

fn job_status(server: &Server, build: &str, id: &str) -> String {
    job(&server.get(build), id)["status"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// The agent's --workdir (relative to the server's root, where the agent runs).
fn workdir(server: &Server) -> PathBuf {
    server.root.join("agent")
}

/// `tributary agent` with `token` (None: without one, as on a restart).
fn spawn_agent(server: &Server, token: Option<&str>) -> Agent {
    let log = server
        .root
        .join(format!("agent-{}.log", tributary_proto::new_id()));
    let mut cmd = Command::new(bin());
    // A relative --workdir: jobs run in their own directories, so the agent must make it
    // absolute.
    cmd.args([
        "agent",
        "--server",
        &server.addr,
        "--name",
        "box",
        "--capacity",
        "1",
    ])
    .args(["--workdir", "agent"])
    .current_dir(&server.root)
    .env_remove("TRIBUTARY_ENROLLMENT_TOKEN")
    .env("TRIBUTARY_LOG", "info")
    .stdout(Stdio::piped())
    .stderr(std::fs::File::create(&log).unwrap());
    if let Some(token) = token {
        cmd.args(["--token", token]);
    }
    let mut child = cmd.spawn().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let proc = Proc(child);
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    Agent {
        proc,
        first_line: line,
        stdout,
        log,
    }
}

struct Agent {
    proc: Proc,
    first_line: String,
    stdout: BufReader<ChildStdout>,
    log: PathBuf,
}

impl Agent {
    fn id(&self) -> String {
        // "tributary agent <id> (<name>) on <server>: ..."
        self.first_line
            .strip_prefix("tributary agent ")
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected startup line {:?}", self.first_line))
            .to_owned()
    }

    fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &self.proc.0.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    fn wait_exit(&mut self, secs: u64) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(status) = self.proc.0.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not exit; its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Everything printed on stdout after the startup line.
    fn rest_of_stdout(&mut self) -> String {
        let mut rest = String::new();
        let mut line = String::new();
        while self.stdout.read_line(&mut line).unwrap_or(0) > 0 {
            rest.push_str(&line);
            line.clear();
        }
        rest
    }
}

const PIPELINE: &str =
    "jobs:\n  work:\n    steps:\n      - run: sleep 2\n      - run: echo done-by-agent\n";

#[test]
fn an_enrolled_agent_runs_builds_keeps_its_identity_and_drains_on_sigterm() {
    let server = start();
    let enrollment = server
        .admin(&[
            "admin",
            "token-create",
            "--tenant",
            "default",
            "--kind",
            "enrollment",
        ])
        .trim()
        .to_owned();
    server.project("app", PIPELINE);

    let mut agent = spawn_agent(&server, Some(&enrollment));
    let id = agent.id();
    assert!(
        agent.first_line.contains("(box)") && agent.first_line.contains(&server.addr),
        "{}",
        agent.first_line
    );
    let identity: Value = serde_json::from_str(
        &std::fs::read_to_string(workdir(&server).join("agent.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(identity["agent_id"], id.as_str());
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(workdir(&server).join("agent.json"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "agent.json must be private");

    // A build runs on the agent; SIGTERM while it runs drains: the job still finishes.
    let build = server.admin(&["trigger", "app"]).trim().to_owned();
    wait_until("the job to run", 30, || {
        job_status(&server, &build, "work") == "running"
    });
    agent.signal("TERM");
    let status = agent.wait_exit(30);
    assert!(status.success(), "{status:?}; log:\n{}", agent.log());
    assert_eq!(agent.rest_of_stdout(), "", "one line on stdout, no more");
    wait_until("the build to finish", 30, || {
        server.get(&build)["status"] != "running" && server.get(&build)["status"] != "queued"
    });
    let b = server.get(&build);
    assert_eq!(b["status"], "succeeded", "{b}\nagent log:\n{}", agent.log());
    assert_eq!(b["jobs"][0]["agent_id"], id.as_str());
    let logs = server.admin(&["logs", &build]);
    assert!(logs.contains("done-by-agent"), "{logs}");
    // The attempt's workspace left its place (kept under .recycled for a later job); the
    // mirror is kept for the next build.
    let work = workdir(&server).join("work");
    let left = || -> Vec<std::ffi::OsString> {
        std::fs::read_dir(&work)
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default()
    };
    wait_until("the workspace to be recycled", 10, || {
        left() == [".recycled"]
    });
    assert!(workdir(&server).join("mirrors").is_dir());

    // A restart without a token is the same agent.
    let again = spawn_agent(&server, None);
    assert_eq!(again.id(), id);
    let build = server.admin(&["trigger", "app"]).trim().to_owned();
    wait_until("the second build", 30, || {
        server.get(&build)["status"] == "succeeded"
    });
    assert_eq!(server.get(&build)["jobs"][0]["agent_id"], id.as_str());
}

#[test]
fn without_a_token_or_identity_the_agent_says_what_to_do() {
    let server = start();
    let out = Command::new(bin())
        .args(["agent", "--server", &server.addr, "--workdir"])
        .arg(workdir(&server))
        .env_remove("TRIBUTARY_ENROLLMENT_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--token"), "{err}");

    let out = Command::new(bin())
        .args([
            "agent",
            "--server",
            &server.addr,
            "--token",
            "nope",
            "--workdir",
        ])
        .arg(workdir(&server))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refused to register"), "{err}");
    assert!(!workdir(&server).join("agent.json").exists());
}

#[test]
fn a_second_signal_stops_at_once() {
    let server = start();
    server.project(
        "slow",
        "jobs:\n  work:\n    steps:\n      - run: sleep 60\n",
    );
    let mut agent = spawn_agent(&server, Some(&server.token));
    let build = server.admin(&["trigger", "slow"]).trim().to_owned();
    wait_until("the job to run", 30, || {
        job_status(&server, &build, "work") == "running"
    });
    agent.signal("TERM");
    wait_until("the agent to start draining", 30, || {
        agent.log().contains("draining")
    });
    assert!(
        agent.proc.0.try_wait().unwrap().is_none(),
        "draining waits for the job; log:\n{}",
        agent.log()
    );
    assert_eq!(
        job_status(&server, &build, "work"),
        "running",
        "the job goes on while the agent drains"
    );
    let started = Instant::now();
    agent.signal("INT");
    let status = agent.wait_exit(10);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(status.code(), Some(130), "log:\n{}", agent.log());
}
