//! End to end: the real `tributary` binary runs real pipelines with real `sh` processes on
//! the embedded SQLite log; we check exit codes, the events on the log and the read model.

use crate::common;

use std::path::Path;
use std::process::{Command, Output};

use common::{of_type, sql};

use serde_json::Value;

fn tributary(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tributary"))
        .args(args)
        .current_dir(dir)
        .env("TRIBUTARY_LOG", "warn")
        // The default data directory (per repository, under the state home) stays in target/.
        .env("XDG_STATE_HOME", common::state_home())
        .output()
        .expect("spawn tributary")
}

fn events(dir: &Path) -> Vec<Value> {
    let out = tributary(dir, &["events", "--json"]);
    assert!(
        out.status.success(),
        "events failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

fn offset_of(events: &[Value], ty: &str, job: &str) -> u64 {
    events
        .iter()
        .find(|e| e["type"] == ty && e["job"] == job)
        .and_then(|e| e["offset"].as_u64())
        .unwrap_or_else(|| panic!("no {ty} for {job}"))
}

const PIPELINE: &str = r#"
jobs:
  a:
    steps:
      - name: first
        script:
          - echo a-start
          - sleep 0.6
          - echo a-done
  b:
    steps:
      - script:
          - sleep 0.6
          - echo b-done >&2
  m:
    needs: [a, b]
    matrix:
      x: ["1", "2"]
    steps:
      - script:
          - mkdir -p sub && cd sub
          - echo "m ${{ matrix.x }} in $(basename $PWD)"
  f:
    needs: a
    steps:
      - name: fails
        script:
          - echo before
          - exit 7
          - echo after > after.txt
  s:
    needs: f
    steps:
      - run: echo never > s.txt
"#;

#[test]
fn run_parallel_matrix_failure_and_skip() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(".tributary.yml"), PIPELINE).unwrap();
    let out = tributary(dir.path(), &["run", "--parallel", "2"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a failed build exits 1\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Live output shows lines and their output.
    assert!(stdout.contains("[a] $ echo a-start"), "{stdout}");
    assert!(stdout.contains("[a] a-start"), "{stdout}");
    assert!(stdout.contains("[m[x=2]] m 2 in sub"), "{stdout}");

    let ev = events(dir.path());
    // Offsets are contiguous from 0 and every event belongs to the one build.
    for (i, e) in ev.iter().enumerate() {
        assert_eq!(e["offset"].as_u64(), Some(i as u64));
    }
    let build_id = ev[0]["build_id"].as_str().unwrap().to_owned();
    assert_eq!(ev[0]["type"], "build_triggered");
    assert!(ev.iter().all(|e| e["build_id"] == build_id.as_str()));

    // a and b ran in parallel: b started before a finished.
    assert!(offset_of(&ev, "job_started", "b") < offset_of(&ev, "job_finished", "a"));
    // m waited for both; its matrix instances both ran and succeeded.
    for m in ["m[x=1]", "m[x=2]"] {
        assert!(offset_of(&ev, "job_started", m) > offset_of(&ev, "job_finished", "a"));
        assert!(offset_of(&ev, "job_started", m) > offset_of(&ev, "job_finished", "b"));
        let fin = ev
            .iter()
            .find(|e| e["type"] == "job_finished" && e["job"] == m)
            .unwrap();
        assert_eq!(fin["status"], "succeeded");
    }
    // f's failing line: exit code 7, the line after it never started, its file not created.
    let exits: Vec<_> = of_type(&ev, "line_exited")
        .into_iter()
        .filter(|e| e["job"] == "f")
        .collect();
    assert_eq!(exits.len(), 2);
    assert_eq!(exits[1]["line"], 1);
    assert_eq!(exits[1]["exit_code"], 7);
    assert!(!of_type(&ev, "line_started")
        .iter()
        .any(|e| e["job"] == "f" && e["line"] == 2));
    assert!(!dir.path().join("after.txt").exists());
    let f_fin = ev
        .iter()
        .find(|e| e["type"] == "job_finished" && e["job"] == "f")
        .unwrap();
    assert_eq!(f_fin["status"], "failed");
    assert_eq!(f_fin["exit_code"], 7);
    // s is skipped, never started, and says why.
    let s_fin = ev
        .iter()
        .find(|e| e["type"] == "job_finished" && e["job"] == "s")
        .unwrap();
    assert_eq!(s_fin["status"], "skipped");
    assert_eq!(s_fin["reason"], "needs f, which failed");
    assert!(!of_type(&ev, "job_started").iter().any(|e| e["job"] == "s"));
    assert!(!dir.path().join("s.txt").exists());
    // stderr output is attributed to the right line and stream.
    assert!(of_type(&ev, "log_chunk").iter().any(|e| e["job"] == "b"
        && e["line"] == 1
        && e["stream"] == "stderr"
        && e["data"] == "b-done\n"));
    let finished = of_type(&ev, "build_finished");
    assert_eq!(finished.len(), 1);
    assert_eq!(finished[0]["status"], "failed");

    // The read model agrees.
    let out = tributary(dir.path(), &["builds", "--json"]);
    assert!(out.status.success());
    let builds: Value = serde_json::from_slice(&out.stdout).unwrap();
    let b = &builds[0];
    assert_eq!(b["id"], build_id.as_str());
    assert_eq!(b["phase"], "failed");
    let job = |id: &str| {
        b["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["id"] == id)
            .unwrap()
            .clone()
    };
    assert_eq!(job("a")["phase"], "succeeded");
    assert_eq!(job("s")["phase"], "skipped");
    let f = job("f");
    assert_eq!(f["phase"], "failed");
    assert_eq!(f["steps"][0]["lines"][1]["exit_code"], 7);
    assert_eq!(f["steps"][0]["lines"][2]["phase"], "pending");
    assert_eq!(job("m[x=1]")["matrix"], serde_json::json!([["x", "1"]]));

    // Human table lists it; replay from offset 0 rebuilds the same read model.
    let out = tributary(dir.path(), &["builds"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&build_id));
    let out = tributary(dir.path(), &["replay", "--check"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn successful_run_exits_zero_and_events_filter_by_build() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ci.yml");
    std::fs::write(&file, "jobs:\n  one:\n    steps:\n      - run: echo ok\n").unwrap();
    for _ in 0..2 {
        let out = tributary(dir.path(), &["run", "-f", "ci.yml", "--data", "state"]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let all = tributary(dir.path(), &["events", "--data", "state", "--json"]);
    let all: Vec<Value> = String::from_utf8_lossy(&all.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let second = all.last().unwrap()["build_id"].as_str().unwrap().to_owned();
    let one = tributary(
        dir.path(),
        &["events", "--data", "state", "--json", "--build", &second],
    );
    let one: Vec<Value> = String::from_utf8_lossy(&one.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(one.len() < all.len());
    assert!(one.iter().all(|e| e["build_id"] == second.as_str()));
    assert_eq!(one.last().unwrap()["type"], "build_finished");
    assert_eq!(one.last().unwrap()["status"], "succeeded");
}

/// A `run: |` block stops at its first failing command (as GitHub Actions runs it, `sh -e`):
/// the job fails and nothing after the command runs.
#[test]
fn a_run_block_fails_at_its_first_failing_command() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(".tributary.yml"),
        "jobs:\n  blk:\n    steps:\n      - run: |\n          echo before-false\n          false\n          echo after-false\n",
    )
    .unwrap();
    let out = tributary(dir.path(), &["run"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("before-false"), "{stdout}");
    assert!(!stdout.contains("after-false"), "{stdout}");
    let ev = events(dir.path());
    let finished = ev.iter().find(|e| e["type"] == "job_finished").unwrap();
    assert_eq!(finished["status"], "failed", "{finished}");
}

#[test]
fn invalid_pipeline_exits_two_with_location_and_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(".tributary.yml"),
        "jobs:\n  a:\n    needs: nope\n    steps:\n      - run: echo\n",
    )
    .unwrap();
    let out = tributary(dir.path(), &["run"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(".tributary.yml:3:12"), "{stderr}");
    assert!(stderr.contains("nope"), "{stderr}");
    let ev = events(dir.path());
    let types: Vec<&str> = ev.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        ["build_triggered", "pipeline_rejected", "build_finished"]
    );
    assert_eq!(ev[1]["line"], 3);
    assert_eq!(ev[2]["status"], "failed");
}

#[test]
fn missing_pipeline_file_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let out = tributary(dir.path(), &["run"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a usage error, like an invalid pipeline"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot read pipeline file .tributary.yml"),
        "{stderr}"
    );
    assert!(stderr.contains("-f FILE"), "{stderr}");
}

/// A local run meters its jobs like an agent (UsageTick events, tenant `local`), so `invoice`
/// and `audit` work on its data directory; `replay` rebuilds metering.db too and `replay
/// --check` compares it.
#[test]
fn a_local_run_is_metered_and_replay_rebuilds_metering() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("ci.yml"),
        "jobs:\n  slow:\n    steps:\n      - run: sleep 1.5\n  quick:\n    steps:\n      - run: echo hi\n",
    )
    .unwrap();
    let out = tributary(
        dir.path(),
        &[
            "run",
            "-f",
            "ci.yml",
            "--data",
            "state",
            "--plain",
            "--machine-class",
            "laptop-1cpu",
            "--usage-interval",
            "0.5",
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let all = tributary(dir.path(), &["events", "--data", "state", "--json"]);
    let all: Vec<Value> = String::from_utf8_lossy(&all.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ticks = of_type(&all, "usage_tick");
    for job in ["slow", "quick"] {
        let mine: Vec<&&Value> = ticks.iter().filter(|t| t["job"] == job).collect();
        assert!(
            mine.last().is_some_and(|t| t["last"] == true),
            "{job} ends with a last tick: {mine:?}"
        );
        assert!(mine.iter().all(|t| t["machine_class"] == "laptop-1cpu"
            && t["tenant"] == "local"
            && t["agent_id"] == "local"));
        assert!(
            offset_of(&all, "job_finished", job) > mine.last().unwrap()["offset"].as_u64().unwrap()
        );
    }
    let slow: Vec<&&Value> = ticks.iter().filter(|t| t["job"] == "slow").collect();
    assert!(
        slow.len() >= 3,
        "a tick every 0.5 s of a 1.5 s job: {slow:?}"
    );
    let total: u64 = ticks.iter().map(|t| t["millis"].as_u64().unwrap()).sum();
    assert!(total >= 1500, "{total} ms");

    // The invoice of the local data directory bills exactly the ticks.
    let period = String::from_utf8_lossy(
        &Command::new("date")
            .args(["-u", "+%Y-%m"])
            .output()
            .unwrap()
            .stdout,
    )
    .trim()
    .to_owned();
    let invoice = |dir: &Path| -> Value {
        let out = tributary(
            dir,
            &[
                "invoice", "--data", "state", "--period", &period, "--format", "json",
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let inv = invoice(dir.path());
    let billed: u64 = inv["lines"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["machine_class"] == "laptop-1cpu")
        .map(|l| l["millis"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(billed, total, "{inv}");
    let audit = tributary(dir.path(), &["audit", "--data", "state"]);
    let text = String::from_utf8_lossy(&audit.stdout);
    assert!(
        audit.status.success() && text.contains("audit: OK"),
        "{text}"
    );

    // replay --check compares metering.db too: a tampered row is found, `replay` repairs it.
    let check = |dir: &Path| {
        let out = tributary(dir, &["replay", "--data", "state", "--check"]);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, text) = check(dir.path());
    assert!(ok && text.contains("metering read model matches"), "{text}");
    sql(
        &dir.path().join("state/metering.db"),
        "UPDATE usage_daily SET millis = millis + 60000",
    );
    let (ok, text) = check(dir.path());
    assert!(!ok, "{text}");
    assert!(
        text.contains("MISMATCH in the metering read model") && text.contains("usage local/"),
        "{text}"
    );
    let rebuilt = tributary(dir.path(), &["replay", "--data", "state"]);
    let text = String::from_utf8_lossy(&rebuilt.stdout);
    assert!(
        rebuilt.status.success() && text.contains("rebuilt the metering read model"),
        "{text}"
    );
    let (ok, text) = check(dir.path());
    assert!(ok, "{text}");
    assert_eq!(invoice(dir.path()), inv, "the rebuilt model bills the same");
}

/// A local run takes a job's secrets from its environment: a missing one fails the job once
/// (a configuration error is not retried) with a hint for the local run, not for a server.
#[test]
fn a_missing_secret_in_a_local_run_says_how_to_give_it_and_is_not_retried() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(".tributary.yml"),
        "jobs:\n  deploy:\n    retry: 2\n    secrets: [TRIB_TEST_SECRET]\n    steps:\n      - test -n \"$TRIB_TEST_SECRET\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tributary"))
        .arg("run")
        .current_dir(dir.path())
        .env("XDG_STATE_HOME", common::state_home())
        .env_remove("TRIB_TEST_SECRET")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("TRIB_TEST_SECRET=… tributary run"), "{text}");
    assert!(!text.contains("secret set"), "{text}");
    let ev = events(dir.path());
    assert_eq!(of_type(&ev, "job_queued").len(), 1, "not retried: {ev:?}");
    // Given in the environment, the job gets it.
    let out = Command::new(env!("CARGO_BIN_EXE_tributary"))
        .arg("run")
        .current_dir(dir.path())
        .env("XDG_STATE_HOME", common::state_home())
        .env("TRIB_TEST_SECRET", "s3cret-value")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// `audit --data` on a directory with no log fails and does not create it.
#[test]
fn audit_of_a_missing_data_directory_fails_without_creating_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = tributary(dir.path(), &["audit", "--data", "typo"]);
    assert_ne!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no event log in typo"), "{stderr}");
    assert!(!dir.path().join("typo").exists());
}

/// The invoice of a month that is over is not "live", in every format.
#[test]
fn the_invoice_of_an_ended_month_is_not_live() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(".tributary.yml"),
        "jobs:\n  a:\n    steps:\n      - echo ok\n",
    )
    .unwrap();
    assert_eq!(tributary(dir.path(), &["run"]).status.code(), Some(0));
    let out = tributary(dir.path(), &["invoice", "--period", "2020-01"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(!stdout.contains("live"), "{stdout}");
    assert!(
        stdout.contains("not issued yet: the month is over"),
        "{stdout}"
    );
    // JSON and CSV say the same as the table.
    let out = tributary(
        dir.path(),
        &["invoice", "--period", "2020-01", "--format", "json"],
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["status"], "not_issued", "{json}");
    let out = tributary(
        dir.path(),
        &["invoice", "--period", "2020-01", "--format", "csv"],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("local,2020-01,not_issued,total"),
        "{stdout}"
    );
    let out = tributary(dir.path(), &["invoice"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("live: the month so far"), "{stdout}");
    let out = tributary(dir.path(), &["invoice", "--format", "json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["status"], "live", "{json}");
}

/// One process writes a data directory at a time: a second run on a directory in use is
/// refused, naming the process holding it; the lock goes with its holder.
#[test]
fn a_second_writer_of_a_data_directory_is_refused_naming_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(".tributary.yml"),
        "jobs:\n  a:\n    steps:\n      - echo ok\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("slow.yml"),
        "jobs:\n  a:\n    steps:\n      - touch started && sleep 30\n",
    )
    .unwrap();
    let mut first = common::Proc(
        Command::new(env!("CARGO_BIN_EXE_tributary"))
            .args(["run", "-f", "slow.yml"])
            .current_dir(dir.path())
            .env("XDG_STATE_HOME", common::state_home())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    common::wait_until(
        "the first run to start its job",
        std::time::Duration::from_secs(30),
        || dir.path().join("started").exists(),
    );
    let pid = first.0.id();
    let out = tributary(dir.path(), &["run"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("in use by process {pid} (")),
        "{stderr}"
    );
    assert!(stderr.contains("run -f slow.yml"), "{stderr}");
    // A reader is not a writer.
    assert!(tributary(dir.path(), &["events"]).status.success());
    // Killed (no clean exit), the first run's lock goes with it.
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let out = tributary(dir.path(), &["run"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
