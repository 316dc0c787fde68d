//! End to end, what a new user meets on a server (issue 24): `--follow` says why a job waits
//! and Ctrl-C leaves the build running; `runs-on` labels required strictly, or a generic agent
//! standing in and saying so; `logs` rendered like `--follow`; build id prefixes.

use crate::common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{bin, job, wait_until, Proc};

/// A child's stdout, read as it comes.
fn collect(mut from: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let sink = text.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    text
}

#[test]
fn follow_says_why_a_job_waits_and_ctrl_c_leaves_the_build_running() {
    let s = common::start(1);
    s.project(
        "strict",
        "jobs:\n  gpu:\n    runs-on: {labels: [gpu], fallback: false}\n    steps:\n      - echo on-gpu\n",
    );
    let mut child = Command::new(bin())
        .args(["trigger", "strict", "--follow"])
        .env("TRIBUTARY_SERVER", &s.addr)
        .env("TRIBUTARY_TOKEN", &s.token)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = collect(child.stdout.take().unwrap());
    let err = collect(child.stderr.take().unwrap());
    let mut follower = Proc(child);
    // The generic agent of `up` does not take it (`fallback: false`), and --follow says so.
    wait_until(
        "--follow to say why the job waits",
        Duration::from_secs(30),
        || {
            out.lock()
                .unwrap()
                .contains("[gpu] … waiting: no connected agent has labels [gpu]")
        },
    );
    let text = out.lock().unwrap().clone();
    assert!(text.contains("fallback: false"), "{text}");
    assert_eq!(
        text.matches("waiting:").count(),
        1,
        "said once while it does not change: {text}"
    );
    let build = text.lines().next().unwrap().trim().to_owned();

    // Ctrl-C: the follower stops, saying the build goes on and how to cancel it.
    follower.signal(libc::SIGINT);
    let status = follower.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(130));
    wait_until("the note on stderr", Duration::from_secs(5), || {
        err.lock().unwrap().contains("keeps running")
    });
    let note = err.lock().unwrap().clone();
    assert!(
        note.contains(&format!("tributary cancel {build}")),
        "{note}"
    );
    assert_eq!(s.status(&s.token, &build), "queued");

    // An agent with the label takes it; `--follow` names agents, not their ids.
    let _gpu = s.agent("gpu-box", &["--labels", "gpu"]);
    let v = s.finished(&build, Duration::from_secs(60));
    assert_eq!(v["status"], "succeeded", "{v}");
    assert_eq!(job(&v, "gpu")["agent_name"], "gpu-box");
    let logs = s.admin(&["logs", &build]);
    assert!(logs.contains("[gpu] started on agent gpu-box"), "{logs}");
}

#[test]
fn a_generic_agent_standing_in_for_runs_on_labels_says_so() {
    let s = common::start(1);
    s.project(
        "fallback",
        "jobs:\n  a:\n    runs-on: [gpu, arm]\n    steps:\n      - echo ran\n",
    );
    let id = s.trigger("fallback");
    let v = s.finished(&id, Duration::from_secs(60));
    assert_eq!(v["status"], "succeeded", "{v}");
    let agent = job(&v, "a")["agent_name"].as_str().unwrap().to_owned();
    let note = format!("no agent has gpu,arm; ran on generic agent {agent}");
    let got = s.admin(&["get", &id]);
    assert!(got.contains(&format!("runs-on: {note}")), "{got}");
    assert!(got.contains("fallback: false"), "{got}");
    let log = s.admin(&["logs", &id, "--job", "a"]);
    assert!(log.starts_with(&format!("tributary: {note}")), "{log}");
}

#[test]
fn logs_renders_like_follow_and_build_id_prefixes_are_accepted() {
    let s = common::start(1);
    s.project(
        "two",
        "jobs:\n  a:\n    steps:\n      - name: hello\n        run: echo from-a\n  b:\n    needs: a\n    steps:\n      - echo from-b\n",
    );
    let out = s.cli(&s.token, &["trigger", "two", "--follow"]);
    assert_eq!(out.status.code(), Some(0));
    let follow = String::from_utf8_lossy(&out.stdout).into_owned();
    let id = follow.lines().next().unwrap().trim().to_owned();

    // `logs` of the finished build (by the 13-character prefix tables print) renders what
    // `--follow` rendered, line for line.
    let short = &id[..13];
    let logs = s.cli(&s.token, &["logs", short]);
    assert_eq!(logs.status.code(), Some(0));
    let logs = String::from_utf8_lossy(&logs.stdout).into_owned();
    let rendered: Vec<&str> = follow.lines().skip(1).collect();
    assert_eq!(logs.lines().collect::<Vec<_>>(), rendered);
    for needle in [
        "[a] ▶ step hello",
        "[a] $ echo from-a",
        "[a] from-a",
        "[b] from-b",
        &format!("build {id} succeeded"),
    ] {
        assert!(logs.contains(needle), "{needle:?} in {logs}");
    }
    // --raw: the jobs' output only.
    let raw = s.admin(&["logs", &id, "--raw"]);
    assert!(raw.contains("from-a\n") && !raw.contains("[a]"), "{raw}");

    // Prefixes everywhere a build id goes; none or several matching say so.
    assert_eq!(s.status(&s.token, short), "succeeded");
    assert!(s
        .cli(&s.token, &["artifacts", "list", short])
        .status
        .success());
    let out = s.cli(&s.token, &["get", "ffffffff"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("no build ffffffff"), "{stderr}");
    let second = s.trigger("two");
    s.finished(&second, Duration::from_secs(60));
    let common_prefix: String = id
        .chars()
        .zip(second.chars())
        .take_while(|(x, y)| x == y)
        .map(|(x, _)| x)
        .collect();
    let out = s.cli(&s.token, &["get", &common_prefix]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("ambiguous") && stderr.contains(&id) && stderr.contains(&second),
        "{stderr}"
    );
    // The local `events --build` takes the prefix too.
    let events = s.admin(&[
        "events",
        "--data",
        s.data().to_str().unwrap(),
        "--build",
        short,
    ]);
    assert!(events.contains("build_finished"), "{events}");
    assert!(
        events.lines().all(|l| l.contains(short)),
        "only that build: {events}"
    );
}
