//! A data directory whose name holds the characters a URL reads as something else
//! (`a#b?c%d`: a fragment, a query, an escape) works for `tributary up` and `tributary run`:
//! the log, the builds read model and metering all open their files there, and nowhere else.
//! (Every SQL store opens SQLite by path through `tributary-sqlstore`.)

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{bin, commit_all, free_port, git, wait_until, Proc};
use serde_json::Value;

const ODD: &str = "a#b?c%d";

/// The names directly under `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A repository at `dir` with `pipeline` committed on `main`.
fn repo(dir: &Path, pipeline: &str) {
    std::fs::create_dir_all(dir).unwrap();
    git(dir, &["init", "-q", "-b", "main"]);
    std::fs::write(dir.join(".tributary.yml"), pipeline).unwrap();
    commit_all(dir, "init");
}

fn succeeded(what: &str, out: &Output) -> String {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The data directory holds the log and both read models, and its parent holds nothing that
/// a truncated path (`a`, `a#b`, …) would have created.
fn assert_all_files_inside(root: &Path, data: &Path, besides: &[&str]) {
    for file in ["events.db", "readmodels.db", "metering.db"] {
        assert!(
            data.join(file).is_file(),
            "{file} in {}: {:?}",
            data.display(),
            names(data)
        );
    }
    let mut expected: Vec<String> = besides.iter().map(|s| s.to_string()).collect();
    expected.push(ODD.to_owned());
    expected.sort();
    assert_eq!(names(root), expected, "nothing created beside {ODD}");
}

#[test]
fn up_on_a_data_directory_named_like_a_url_builds_reads_and_invoices() {
    let root = tempfile::tempdir().unwrap();
    let data: PathBuf = root.path().join(ODD);
    let addr = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(root.path().join("up.log")).unwrap();
    let mut up = Proc(
        Command::new(bin())
            .args(["up", "--agents", "1", "--usage-interval", "0.2", "--data"])
            .arg(&data)
            .args(["--listen", &addr])
            .env("TRIBUTARY_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let token_file = data.join("admin.token");
    wait_until("the server to start", Duration::from_secs(60), || {
        let exited = up.0.try_wait().unwrap();
        assert!(
            exited.is_none(),
            "up exited ({exited:?}):\n{}",
            std::fs::read_to_string(root.path().join("up.log")).unwrap_or_default()
        );
        std::net::TcpStream::connect(&addr).is_ok() && token_file.exists()
    });
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_owned();
    let cli = |args: &[&str]| -> Output {
        Command::new(bin())
            .args(args)
            .env("TRIBUTARY_SERVER", format!("http://{addr}"))
            .env("TRIBUTARY_TOKEN", &token)
            .env_remove("TRIBUTARY_DATA")
            .output()
            .unwrap()
    };
    let repo_dir = root.path().join("repo");
    repo(
        &repo_dir,
        "jobs:\n  nap:\n    steps:\n      - run: sleep 1\n",
    );
    succeeded(
        "project add",
        &cli(&["project", "add", "p", "--repo", repo_dir.to_str().unwrap()]),
    );
    let build = succeeded("trigger", &cli(&["trigger", "p"]))
        .trim()
        .to_owned();
    // `get` reads the builds read model (readmodels.db in the odd directory).
    let mut last = Value::Null;
    wait_until("the build to succeed", Duration::from_secs(120), || {
        let out = cli(&["get", &build, "--json"]);
        last = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        last["status"] == "succeeded"
    });
    assert_eq!(last["project"], "p", "{last}");
    // The invoice reads metering (metering.db in the odd directory).
    let mut invoice = Value::Null;
    wait_until("metering to count the job", Duration::from_secs(60), || {
        let out = succeeded("invoice", &cli(&["invoice", "--format", "json"]));
        invoice = serde_json::from_str(&out).unwrap();
        invoice["lines"]
            .as_array()
            .is_some_and(|lines| lines.iter().any(|l| l["millis"].as_u64() >= Some(1000)))
    });
    assert_eq!(invoice["tenant"], "default", "{invoice}");
    up.signal(libc::SIGTERM);
    assert!(up.wait_exit(Duration::from_secs(60)).success());
    assert_all_files_inside(root.path(), &data, &["repo", "up.log"]);
    // The stopped server's read models check against its log, read at the same paths.
    let out = Command::new(bin())
        .args(["replay", "--check", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    succeeded("replay --check", &out);
}

#[test]
fn run_with_a_data_directory_named_like_a_url_keeps_everything_there() {
    let root = tempfile::tempdir().unwrap();
    let repo_dir = root.path().join("repo");
    repo(
        &repo_dir,
        "jobs:\n  hello:\n    steps:\n      - run: echo hello from an odd directory\n",
    );
    let data = root.path().join(ODD);
    let local = |args: &[&str]| -> Output {
        Command::new(bin())
            .args(args)
            .arg("--data")
            .arg(&data)
            .current_dir(&repo_dir)
            .env("TRIBUTARY_LOG", "warn")
            .env_remove("TRIBUTARY_SERVER")
            .env_remove("TRIBUTARY_DATA")
            .output()
            .unwrap()
    };
    let out = succeeded("run", &local(&["run", "--plain"]));
    assert!(out.contains("hello from an odd directory"), "{out}");
    let builds = succeeded("builds", &local(&["builds"]));
    assert!(builds.contains("succeeded"), "{builds}");
    let invoice = succeeded(
        "invoice",
        &local(&["invoice", "--tenant", "local", "--format", "json"]),
    );
    let invoice: Value = serde_json::from_str(&invoice).unwrap();
    assert_eq!(invoice["tenant"], "local", "{invoice}");
    assert!(
        invoice["lines"].as_array().is_some_and(|l| !l.is_empty()),
        "the local run's usage is metered: {invoice}"
    );
    succeeded("replay --check", &local(&["replay", "--check"]));
    assert_all_files_inside(root.path(), &data, &["repo"]);
}
