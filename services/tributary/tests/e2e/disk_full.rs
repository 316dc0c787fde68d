//! A full disk under the embedded log (issue 17): `tributary run` on a data directory whose
//! filesystem fills mid-job ends at once with exit code 1 and a message naming the file, the
//! cause and what to do (it used to hang forever, the SQLite writer wedged inside a failed
//! transaction). Once space is freed the same data directory takes the next run, and the read
//! models still equal a replay of the log.

use crate::common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs the CLI; a run that does not end within two minutes (the old wedged writer) is killed
/// and fails the test.
fn tributary(dir: &Path, args: &[&str]) -> Output {
    // Files, not pipes: the big job prints more than a pipe holds, and nobody reads it here
    // until the process ends.
    let files = tempfile::tempdir().expect("tempdir");
    let (out_path, err_path) = (files.path().join("out"), files.path().join("err"));
    let mut child = Command::new(common::bin())
        .args(args)
        .current_dir(dir)
        .env("TRIBUTARY_LOG", "warn")
        .stdout(Stdio::from(std::fs::File::create(&out_path).expect("out")))
        .stderr(Stdio::from(std::fs::File::create(&err_path).expect("err")))
        .spawn()
        .expect("spawn tributary");
    let read = |p: &Path| std::fs::read(p).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`tributary {}` did not end within 2 minutes; stderr: {}",
                args.join(" "),
                String::from_utf8_lossy(&read(&err_path))
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Output {
        status: child.wait().expect("wait"),
        stdout: read(&out_path),
        stderr: read(&err_path),
    }
}

#[test]
fn a_run_that_fills_the_disk_fails_with_the_reason_and_the_next_one_succeeds() {
    tributary_testkit::require!(SmallFs);
    let fs = tributary_testkit::SmallFs::mount(24).expect("mount a small tmpfs");
    // Something else on the disk, deleted later to free space (what an operator would do).
    let ballast = fs.path().join("ballast");
    std::fs::write(&ballast, vec![0u8; 10 << 20]).expect("ballast");
    let data = fs.path().join("data");
    let data_arg = data.display().to_string();

    let repo = tempfile::tempdir().expect("tempdir");
    common::git(repo.path(), &["init", "-q", "-b", "main"]);
    // 40 MB of output: more than the disk holds.
    std::fs::write(
        repo.path().join("big.yml"),
        "jobs:\n  big:\n    steps:\n      - run: head -c 41943040 /dev/zero | tr '\\0' 'x' | fold -w 100\n",
    )
    .expect("pipeline");
    std::fs::write(
        repo.path().join("small.yml"),
        "jobs:\n  small:\n    steps:\n      - run: echo fits\n",
    )
    .expect("pipeline");
    common::commit_all(repo.path(), "pipelines");

    let started = Instant::now();
    let out = tributary(repo.path(), &["run", "-f", "big.yml", "--data", &data_arg]);
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit code; stderr: {stderr}");
    assert!(
        stderr.contains("the disk is full")
            && stderr.contains(&data.join("events.db").display().to_string())
            && stderr.contains("free space"),
        "the message names the file, the cause and what to do: {stderr}"
    );
    println!("the run that filled the disk ended in {took:?}");
    assert!(took < Duration::from_secs(60), "it ended, in {took:?}");

    // Space freed: the same data directory takes the next run.
    std::fs::remove_file(&ballast).expect("free space");
    let out = tributary(
        repo.path(),
        &["run", "-f", "small.yml", "--data", &data_arg],
    );
    assert!(
        out.status.success(),
        "the run after freeing space: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("fits"));
    // Nothing committed was damaged: the read models equal a replay of the log.
    let out = tributary(repo.path(), &["replay", "--check", "--data", &data_arg]);
    assert!(
        out.status.success(),
        "replay --check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
