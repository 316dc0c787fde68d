//! `tributary run` as a person uses it: Ctrl-C (SIGINT) of a running build cancels it (the
//! job's processes are gone, the log says canceled, the exit is not a success), and a job's
//! `secrets:` come from the environment of `tributary run`, masked in its output and never on
//! the log in clear.

use crate::common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{events_in, of_type, wait_secs, Proc};

fn tributary(dir: &Path) -> Command {
    let mut cmd = Command::new(common::bin());
    // The data directory at ./.tributary (the default is per repository under the state home).
    cmd.current_dir(dir)
        .env("TRIBUTARY_LOG", "warn")
        .env("TRIBUTARY_DATA", dir.join(".tributary"))
        .env_remove("TRIBUTARY_SERVER");
    cmd
}

/// Whether process `pid` is alive (and not a zombie).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

#[test]
fn ctrl_c_cancels_a_local_run_and_stops_its_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    std::fs::create_dir_all(&pids).unwrap();
    std::fs::write(
        dir.path().join(".tributary.yml"),
        format!(
            "jobs:\n  long:\n    steps:\n      - run: sleep 120 & echo $! > {p}/sleep; wait\n  other:\n    steps:\n      - run: echo $$ > {p}/other; sleep 120\n",
            p = pids.display()
        ),
    )
    .unwrap();
    let out = std::fs::File::create(dir.path().join("run.out")).unwrap();
    let mut run = Proc(
        tributary(dir.path())
            .args(["run", "--plain"])
            .stdout(out)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let sleep_pid = dir.path().join("pids/sleep");
    let other_pid = dir.path().join("pids/other");
    wait_secs("both jobs to run", 60, || {
        std::fs::read_to_string(&sleep_pid).is_ok_and(|p| !p.trim().is_empty())
            && std::fs::read_to_string(&other_pid).is_ok_and(|p| !p.trim().is_empty())
    });
    let pid = |path: &Path| -> i32 {
        std::fs::read_to_string(path)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let (sleep_pid, other_pid) = (pid(&sleep_pid), pid(&other_pid));
    assert!(alive(sleep_pid) && alive(other_pid));

    run.signal(libc::SIGINT);
    let started = std::time::Instant::now();
    let status = run.wait_exit(Duration::from_secs(30));
    println!("tributary run exited {:?} after Ctrl-C", started.elapsed());
    assert!(
        !status.success(),
        "a canceled run is not a success: {status:?}"
    );
    wait_secs("the jobs' processes to be gone", 30, || {
        !alive(sleep_pid) && !alive(other_pid)
    });

    let events = events_in(&dir.path().join(".tributary"), None);
    assert_eq!(of_type(&events, "build_canceled").len(), 1, "{events:?}");
    let finished = of_type(&events, "job_finished");
    assert_eq!(finished.len(), 2, "{events:?}");
    assert!(
        finished.iter().all(|f| f["status"] == "canceled"),
        "{finished:?}"
    );
    let build = of_type(&events, "build_finished");
    assert_eq!(build.len(), 1, "{events:?}");
    assert_eq!(build[0]["status"], "canceled");
}

#[test]
fn a_local_run_takes_secrets_from_its_environment_and_masks_them() {
    const VALUE: &str = "loc-7d1e93b2a4-Mz5Kq";
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(".tributary.yml"),
        "jobs:\n  show:\n    secrets: [API_KEY]\n    steps:\n      - echo \"key is $API_KEY.\"\n",
    )
    .unwrap();
    let out = tributary(dir.path())
        .args(["run", "--plain"])
        .env("API_KEY", VALUE)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains(VALUE), "the value in clear: {text}");
    assert!(text.contains("key is ***."), "{text}");
    let data = dir.path().join(".tributary");
    let events = events_in(&data, None);
    let all = serde_json::to_string(&events).unwrap();
    assert!(!all.contains(VALUE), "the value on the log");
    assert!(all.contains("key is ***."), "{all}");
    for entry in walk(&data) {
        let bytes = std::fs::read(&entry).unwrap();
        assert!(
            !bytes.windows(VALUE.len()).any(|w| w == VALUE.as_bytes()),
            "the value in {}",
            entry.display()
        );
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
