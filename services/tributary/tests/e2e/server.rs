//! End to end against a real `tributary up` process and real git repositories: trigger →
//! follow, failure, a tail that starts mid-build, cancel, tenant isolation, auth errors.

use crate::common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{wait_until, Server};

/// `tributary up --agents 2`; its admin token file is private.
fn start() -> Server {
    let s = common::start(2);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(s.data().join("admin.token"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "admin.token must be private");
    s
}

/// A repository whose jobs can `cat payload.txt` from their checkout.
fn repo(s: &Server, name: &str, pipeline: &str) -> std::path::PathBuf {
    s.repo(name, pipeline, &[("payload.txt", "from the repository\n")])
}

#[test]
fn trigger_follow_success_failure_and_isolation() {
    let s = start();
    let admin = s.token.clone();
    let good = repo(&s, "good", "jobs:\n  a:\n    steps:\n      - script:\n          - cat payload.txt\n  b:\n    needs: a\n    steps:\n      - run: echo second\n");
    let bad = repo(&s, "bad", "jobs:\n  a:\n    steps:\n      - script:\n          - echo before\n          - exit 4\n          - echo never\n");
    s.ok(
        &admin,
        &["project", "add", "good", "--repo", good.to_str().unwrap()],
    );
    s.ok(
        &admin,
        &["project", "add", "bad", "--repo", bad.to_str().unwrap()],
    );

    // Success: the job ran in a checkout of the commit (it read payload.txt from it).
    let out = s.cli(&admin, &["trigger", "good", "--follow"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("[a] from the repository"), "{stdout}");
    assert!(stdout.contains("[b] second"), "{stdout}");
    let build = stdout.lines().next().unwrap().trim().to_owned();
    let got = s.ok(&admin, &["get", &build, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&got).unwrap();
    assert_eq!(v["status"], "succeeded");
    assert_eq!(v["commit"].as_str().unwrap().len(), 40);

    // Failure: exit 1, the failing line's exit code in `get`, the line after it never ran.
    let out = s.cli(&admin, &["trigger", "bad", "--follow"]);
    assert_eq!(out.status.code(), Some(1));
    let build_bad = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap()
        .trim()
        .to_owned();
    let v: serde_json::Value =
        serde_json::from_str(&s.ok(&admin, &["get", &build_bad, "--json"])).unwrap();
    let lines = &v["jobs"][0]["steps"][0]["lines"];
    assert_eq!(lines[1]["exit_code"], 4);
    assert_eq!(lines[2]["status"], "pending");
    let logs = s.cli(&admin, &["logs", &build_bad, "--raw"]);
    assert_eq!(
        without_recreate(&String::from_utf8_lossy(&logs.stdout)),
        "before\n"
    );

    // An invalid pipeline fails the build at once, with file:line:column in get and logs.
    let broken = repo(&s, "broken", "jobs:\n  a:\n    stesp: []\n");
    s.ok(
        &admin,
        &[
            "project",
            "add",
            "broken",
            "--repo",
            broken.to_str().unwrap(),
        ],
    );
    let out = s.cli(&admin, &["trigger", "broken", "--follow"]);
    assert_eq!(out.status.code(), Some(1));
    let build_broken = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap()
        .trim()
        .to_owned();
    let v: serde_json::Value =
        serde_json::from_str(&s.ok(&admin, &["get", &build_broken, "--json"])).unwrap();
    assert_eq!(v["status"], "failed");
    assert!(
        v["reason"].as_str().unwrap().contains(".tributary.yml:3:5"),
        "{v}"
    );
    let logs =
        String::from_utf8_lossy(&s.cli(&admin, &["logs", &build_broken]).stdout).into_owned();
    assert!(
        logs.contains(".tributary.yml:3:5") && logs.contains("steps"),
        "{logs}"
    );

    // A second tenant sees nothing of the first's.
    s.ok(&admin, &["admin", "tenant-add", "other"]);
    let other = s
        .ok(&admin, &["admin", "token-create", "--tenant", "other"])
        .trim()
        .to_owned();
    let out = s.cli(&other, &["get", &build]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no build"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!s.cli(&other, &["logs", &build]).status.success());
    assert_eq!(s.ok(&other, &["project", "list"]), "");
    assert!(!s.cli(&other, &["trigger", "good"]).status.success());
    // A user token cannot administer.
    assert!(!s
        .cli(&other, &["admin", "tenant-add", "third"])
        .status
        .success());
    // A bad token is refused.
    let out = s.cli("trib_nope", &["project", "list"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown or revoked token"));
}

#[test]
fn tail_started_mid_build_sees_every_line_once_and_cancel_stops_it() {
    let s = start();
    let admin = s.token.clone();
    let repo = repo(&s,
        "slow",
        "jobs:\n  count:\n    steps:\n      - script:\n          - for i in $(seq 1 20); do echo line-$i; sleep 0.05; done\n  forever:\n    steps:\n      - run: sleep 60\n",
    );
    s.ok(
        &admin,
        &["project", "add", "slow", "--repo", repo.to_str().unwrap()],
    );
    let build = s.ok(&admin, &["trigger", "slow"]).trim().to_owned();
    // Start tailing once the job is printing.
    wait_until("output of job count", Duration::from_secs(20), || {
        let partial = s.cli(&admin, &["logs", &build, "--job", "count"]);
        String::from_utf8_lossy(&partial.stdout).contains("line-3")
    });
    let tail = Command::new(env!("CARGO_BIN_EXE_tributary"))
        .args(["logs", &build, "-f", "--job", "count"])
        .env("TRIBUTARY_SERVER", &s.addr)
        .env("TRIBUTARY_TOKEN", &admin)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Cancel once `count` is done; `forever` is still sleeping and must be stopped.
    let mut last = serde_json::Value::Null;
    wait_until("job count to finish", Duration::from_secs(30), || {
        last = serde_json::from_str(&s.ok(&admin, &["get", &build, "--json"])).unwrap();
        last["jobs"].as_array().is_some_and(|jobs| {
            jobs.iter()
                .any(|j| j["id"] == "count" && j["status"] == "succeeded")
        })
    });
    assert!(
        last["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["id"] == "forever" && j["status"] == "running"),
        "forever must still be running when the build is canceled: {last}"
    );
    let started = Instant::now();
    s.ok(&admin, &["cancel", &build]);
    let out = tail.wait_with_output().unwrap();
    let text = without_recreate(&String::from_utf8_lossy(&out.stdout));
    let expected: String = (1..=20).map(|i| format!("line-{i}\n")).collect();
    assert_eq!(text, expected, "every line exactly once, in order");
    assert_eq!(
        out.status.code(),
        Some(1),
        "a canceled build is not a success"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    let v: serde_json::Value =
        serde_json::from_str(&s.ok(&admin, &["get", &build, "--json"])).unwrap();
    assert_eq!(v["status"], "canceled");
    let forever = v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == "forever")
        .unwrap();
    assert_eq!(forever["status"], "canceled");
}

#[test]
fn rerun_failed_runs_only_the_jobs_that_did_not_succeed() {
    let s = start();
    let admin = s.token.clone();
    let flag = s.root.join("fixed");
    let pipeline = format!(
        "jobs:\n  ok:\n    steps:\n      - run: echo fine\n  flaky:\n    steps:\n      - run: test -f {}\n  after:\n    needs: flaky\n    steps:\n      - run: echo after\n",
        flag.display()
    );
    let repo = repo(&s, "rerun", &pipeline);
    s.ok(
        &admin,
        &["project", "add", "rerun", "--repo", repo.to_str().unwrap()],
    );
    let out = s.cli(&admin, &["trigger", "rerun", "--follow"]);
    assert_eq!(out.status.code(), Some(1));
    let first = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap()
        .trim()
        .to_owned();
    // Re-running a build that is not finished or succeeded is refused; this one failed.
    std::fs::write(&flag, "").unwrap();
    let second = s.ok(&admin, &["rerun", &first]).trim().to_owned();
    let v = s.finished_as(&admin, &second, Duration::from_secs(30));
    assert_eq!(v["status"], "succeeded", "{v}");
    let job = |id: &str| {
        v["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["id"] == id)
            .unwrap()
            .clone()
    };
    assert_eq!(job("ok")["status"], "succeeded");
    assert_eq!(job("ok")["attempt"], 0, "kept, not run again");
    assert!(job("ok")["reason"].as_str().unwrap().contains(&first));
    assert_eq!(job("flaky")["attempt"], 1);
    assert_eq!(job("after")["status"], "succeeded");
    // A succeeded build has nothing to re-run.
    let out = s.cli(&admin, &["rerun", &second]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to re-run"));
}

/// A job kept by `rerun` hands its artifacts to the re-run jobs that need it (as `reuse: commit`
/// does), also when the kept job was itself kept from an earlier build; `artifacts list` of the
/// re-run lists them.
#[test]
fn rerun_hands_kept_jobs_artifacts_to_rerun_jobs() {
    let s = start();
    let admin = s.token.clone();
    let flag = s.root.join("fixed");
    let pipeline = format!(
        "jobs:\n  a:\n    artifacts: [out]\n    steps:\n      - mkdir -p out && echo art-16 > out/f.txt\n  b:\n    needs: a\n    steps:\n      - cat out/f.txt\n      - test -f {}\n",
        flag.display()
    );
    let repo = repo(&s, "rerun-art", &pipeline);
    s.ok(
        &admin,
        &[
            "project",
            "add",
            "rerun-art",
            "--repo",
            repo.to_str().unwrap(),
        ],
    );
    let out = s.cli(&admin, &["trigger", "rerun-art", "--follow"]);
    assert_eq!(out.status.code(), Some(1));
    let first = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap()
        .trim()
        .to_owned();
    // Still failing: b is re-run (a is kept) and reads a's artifact, then fails again.
    let second = s.ok(&admin, &["rerun", &first]).trim().to_owned();
    let v = s.finished_as(&admin, &second, Duration::from_secs(30));
    assert_eq!(v["status"], "failed", "{v}");
    let logs = String::from_utf8_lossy(&s.cli(&admin, &["logs", &second, "--job", "b"]).stdout)
        .into_owned();
    assert!(logs.contains("art-16"), "{logs}");
    // Fixed: the re-run of the re-run gets a's artifact too, through the kept plan.
    std::fs::write(&flag, "").unwrap();
    let third = s.ok(&admin, &["rerun", &second]).trim().to_owned();
    let v = s.finished_as(&admin, &third, Duration::from_secs(30));
    assert_eq!(v["status"], "succeeded", "{v}");
    let listed = s.ok(&admin, &["artifacts", "list", &third]);
    assert!(listed.contains("out/f.txt"), "{listed}");
}

/// A second `up` on the data directory of a running one is refused at once, naming the
/// process that holds it; the first keeps serving. A token for a tenant that does not exist
/// says which command creates it.
#[test]
fn a_second_up_on_the_same_data_directory_is_refused() {
    let s = start();
    let pid = s.pid();
    let addr = format!("127.0.0.1:{}", common::free_port());
    let out = Command::new(env!("CARGO_BIN_EXE_tributary"))
        .args(["up", "--agents", "0", "--listen", &addr, "--data"])
        .arg(s.data())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("is in use by process {pid} (")) && stderr.contains(" up "),
        "{stderr}"
    );
    assert!(!s.log().contains("fenced"), "{}", s.log());
    s.ok(&s.token, &["project", "list"]);

    let out = s.cli(&s.token, &["admin", "token-create", "--tenant", "nosuch"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("tributary admin tenant-add nosuch"),
        "{stderr}"
    );
}

/// A job log without Tributary's own notes: the recreate commands every job log starts with
/// and the kept-workspace note of a failed job (both checked in tests/workspaces.rs).
fn without_recreate(log: &str) -> String {
    let mut out = String::new();
    let mut in_preamble = false;
    for line in log.split_inclusive('\n') {
        if line.starts_with("tributary: to recreate this job locally") {
            in_preamble = true;
            continue;
        }
        if in_preamble && line.starts_with("  ") {
            continue;
        }
        if line.starts_with("tributary: this job's workspace is kept") {
            continue;
        }
        in_preamble = false;
        out.push_str(line);
    }
    out
}
