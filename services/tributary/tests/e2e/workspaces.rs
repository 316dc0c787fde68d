//! Server job logs start with the commands that recreate the job locally; a failed local job's
//! log ends with the command that runs it alone (and it works);
//! a failed job's workspace is kept for the configured time, its log says where, and it is
//! deleted once that time is up.

use crate::common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{bin, events_in, job, wait_secs as wait_until, Server};
use serde_json::Value;

/// The system-stream text of a job's log, in order.
fn system_text(events: &[Value], job: &str) -> String {
    events
        .iter()
        .filter(|e| e["type"] == "log_chunk" && e["job"] == job && e["stream"] == "system")
        .map(|e| e["data"].as_str().unwrap().to_owned())
        .collect()
}

/// The first log chunk of a job.
fn first_chunk<'a>(events: &'a [Value], job: &str) -> &'a Value {
    events
        .iter()
        .find(|e| e["type"] == "log_chunk" && e["job"] == job)
        .expect("the job has a log")
}

fn build_id(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("build "))
        .and_then(|l| l.split_whitespace().next())
        .expect("build id")
        .to_owned()
}

fn run_in(dir: &Path, data: &Path, args: &[&str]) -> std::process::Output {
    Command::new(bin())
        .args(args)
        .arg("--plain")
        .arg("--data")
        .arg(data)
        .current_dir(dir)
        .output()
        .unwrap()
}

#[test]
fn a_failed_local_job_ends_with_the_command_that_runs_it_alone_and_it_works() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(".tributary.yml"),
        "jobs:\n  first:\n    steps: [echo first]\n  test:\n    needs: first\n    matrix:\n      os: [linux, bsd]\n    steps: [\"echo test ${{ matrix.os }}\", \"test ${{ matrix.os }} = linux || test -f fixed\"]\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let out = run_in(dir.path(), &data, &["run"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let build = build_id(&String::from_utf8_lossy(&out.stdout));
    let all = events_in(&data, Some(&build));
    // A local run's logs do not start with the command the user just ran.
    for job in ["first", "test[os=linux]", "test[os=bsd]"] {
        assert!(
            !system_text(&all, job).contains("to recreate"),
            "{job}: {}",
            system_text(&all, job)
        );
        assert_ne!(first_chunk(&all, job)["stream"], "system", "{job}");
    }
    assert!(!system_text(&all, "test[os=linux]").contains("run only this job"));
    // The failed one ends with how to run it alone.
    let notes = system_text(&all, "test[os=bsd]");
    let line = notes
        .lines()
        .find(|l| l.starts_with("tributary: to run only this job again: "))
        .unwrap_or_else(|| panic!("no note in {notes:?}"));
    let command = line
        .trim_start_matches("tributary: to run only this job again: ")
        .trim();
    assert!(command.starts_with("tributary run -f /"), "{command}");
    assert!(command.ends_with("--job 'test[os=bsd]'"), "{command}");

    // The command works: only that job runs (its needs are taken as done).
    std::fs::write(dir.path().join("fixed"), "").unwrap();
    let script = format!(
        "{} --plain --data {}",
        command.replacen("tributary", bin(), 1),
        data.display()
    );
    let out = Command::new("sh")
        .args(["-c", &script])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again = build_id(&String::from_utf8_lossy(&out.stdout));
    let ran: Vec<String> = events_in(&data, Some(&again))
        .iter()
        .filter(|e| e["type"] == "job_started")
        .map(|e| e["job"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ran, vec!["test[os=bsd]".to_owned()]);

    // A name selects every matrix instance; an unknown one says which jobs there are.
    let out = run_in(dir.path(), &data, &["run", "--job", "test"]);
    assert!(out.status.success());
    let out = run_in(dir.path(), &data, &["run", "--job", "nope"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no job \"nope\"") && err.contains("first, test[os=linux], test[os=bsd]"),
        "{err}"
    );
}

#[test]
fn a_failed_jobs_workspace_is_kept_then_deleted_and_its_log_says_where() {
    let c = cluster();
    let keep = ["--keep-failed", "4s"];
    let agent = c.agent("keeper", &keep);
    let agent_id = c.agent_id("keeper");
    c.project(
        "kept",
        "jobs:\n  broken:\n    steps:\n      - echo evidence > left-behind.txt\n      - exit 4\n  fine:\n    steps:\n      - echo ok > made.txt\n",
    );
    let build = c.admin(&["trigger", "kept"]).trim().to_owned();
    wait_until("the build", 120, || c.get(&build)["status"] == "failed");
    let b = c.get(&build);
    assert_eq!(job(&b, "fine")["status"], "succeeded");
    let all = c.events(Some(&build));

    // Server jobs' logs start with how to clone the exact commit and run the job.
    let first = first_chunk(&all, "fine")["data"]
        .as_str()
        .unwrap()
        .to_owned();
    let commit = b["commit"].as_str().unwrap();
    assert!(
        first.contains("git clone ") && first.contains(commit),
        "{first}"
    );
    assert!(
        first.contains("tributary run -f .tributary.yml --job fine"),
        "{first}"
    );

    let notes = system_text(&all, "broken");
    let line = notes
        .lines()
        .find(|l| l.contains("workspace is kept"))
        .unwrap_or_else(|| panic!("no note in {notes}"));
    assert!(
        line.contains(&agent_id) && line.contains("for 4s"),
        "{line}"
    );
    let path = line
        .split(" at ")
        .nth(1)
        .and_then(|rest| rest.split(" for ").next())
        .expect("a path");
    let kept = Path::new(path);
    assert!(kept.starts_with(c.agent_workdir("keeper")), "{path}");
    assert_eq!(
        std::fs::read_to_string(kept.join("left-behind.txt")).unwrap(),
        "evidence\n"
    );
    assert!(!system_text(&all, "fine").contains("workspace is kept"));
    // The successful job's workspace is gone once the agent freed its slot.
    let fine_ws = kept.with_file_name("fine-1");
    wait_until("the successful workspace to go", 60, || !fine_ws.exists());

    // Kept workspaces whose time is up are deleted when the agent (re)starts.
    drop(agent);
    std::thread::sleep(Duration::from_secs(5));
    assert!(kept.exists(), "nothing deletes it while no agent runs");
    let _agent = c.agent("keeper", &keep);
    wait_until("the kept workspace to be deleted", 60, || !kept.exists());
}

/// While the agent runs, its periodic sweep (every 10 minutes; 1 s here) deletes a kept
/// workspace once its time is up, with no restart and no new job.
#[test]
fn a_running_agent_sweeps_kept_workspaces_whose_time_is_up() {
    let c = cluster();
    let _agent = c.agent(
        "sweeper",
        &["--keep-failed", "3s", "--kept-sweep-interval", "1s"],
    );
    c.agent_id("sweeper");
    c.project(
        "swept",
        "jobs:\n  broken:\n    steps:\n      - echo evidence > left-behind.txt\n      - exit 4\n",
    );
    let build = c.admin(&["trigger", "swept"]).trim().to_owned();
    wait_until("the build", 120, || c.get(&build)["status"] == "failed");
    let notes = system_text(&c.events(Some(&build)), "broken");
    let line = notes
        .lines()
        .find(|l| l.contains("workspace is kept"))
        .unwrap_or_else(|| panic!("no note in {notes}"));
    let kept = Path::new(
        line.split(" at ")
            .nth(1)
            .and_then(|rest| rest.split(" for ").next())
            .expect("a path"),
    )
    .to_path_buf();
    let noted = std::time::Instant::now();
    assert!(kept.join("left-behind.txt").exists(), "{line}");
    wait_until("the sweep to delete the kept workspace", 60, || {
        !kept.exists()
    });
    println!(
        "kept workspace deleted {:?} after the test read its note (kept for 3 s, swept every 1 s)",
        noted.elapsed()
    );
}

/// `tributary up` without in-process agents; leases lost after 3 s without a heartbeat.
fn cluster() -> Server {
    common::start_with(&["--agents", "0", "--lease-ttl", "6"])
}
