//! The roles of the binary share their checks: `tributary up` (every role) and
//! `tributary serve scheduler` (one) refuse the same bad `--lease-ttl` with the same message,
//! before either opens the log.

use crate::common;

use std::process::Command;

#[test]
fn up_and_serve_scheduler_refuse_the_same_bad_lease_ttl_before_opening_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for bad in ["0", "-1", "NaN"] {
        let ttl = format!("--lease-ttl={bad}");
        for command in [
            &["up", "--listen", "127.0.0.1:0"][..],
            &["serve", "scheduler"][..],
        ] {
            let out = Command::new(common::bin())
                .args(command)
                .args([ttl.as_str(), "--data"])
                .arg(&data)
                .env_remove("TRIBUTARY_DATA")
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{command:?} {bad}: {stderr}");
            assert!(
                stderr.contains("--lease-ttl must be a positive number of seconds"),
                "{command:?} {bad}: {stderr}"
            );
            assert!(
                !data.join("events.db").exists(),
                "{command:?} {bad}: the log was not opened"
            );
        }
    }
}
