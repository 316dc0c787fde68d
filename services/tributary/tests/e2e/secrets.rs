//! Secrets end to end against a real `tributary up`: set, list and delete through the CLI, a
//! job that names a secret gets it as an environment variable, every occurrence in its output
//! (also one printed in two halves with a pause between, so they are two flushes) is `***` in
//! `tributary logs` and on the log, and the plain value is nowhere in the data directory.
//! Another tenant can neither set, list, delete nor use them.

use crate::common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{job, start, start_allowing_local_repos, Server};

const BUILD: Duration = Duration::from_secs(90);
/// 20 bytes, nothing a log would hold by chance.
const VALUE: &str = "tok-3f9a2c71e5-Qx8Lz";

/// The pipeline never contains the value (its text is on the log): the job checks it by its
/// sha256, prints it whole, and prints it in two halves one second apart.
const PIPELINE: &str = r#"jobs:
  show:
    secrets: [DEPLOY_TOKEN]
    steps:
      - echo "token is $DEPLOY_TOKEN."
      - printf '%s' "$DEPLOY_TOKEN" | sha256sum
      - printf '%s' "$DEPLOY_TOKEN" | head -c 9; sleep 1; printf '%s' "$DEPLOY_TOKEN" | tail -c +10; echo ' end'
      - echo "on stderr $DEPLOY_TOKEN" >&2
  plain:
    steps:
      - echo "plain=${DEPLOY_TOKEN:-unset}"
"#;

/// The CLI with `stdin` on its standard input.
fn with_stdin(s: &Server, token: &str, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tributary"))
        .args(args)
        .env("TRIBUTARY_SERVER", &s.addr)
        .env("TRIBUTARY_TOKEN", token)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every file under `dir` that contains `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                todo.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    found.push(path.display().to_string());
                }
            }
        }
    }
    found
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(data))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_job_gets_its_secret_masked_everywhere_and_the_log_never_holds_it() {
    let s = start(1);
    s.project("app", PIPELINE);

    // Set: the value comes from standard input (one trailing newline dropped).
    let out = with_stdin(
        &s,
        &s.token,
        &["secret", "set", "app", "DEPLOY_TOKEN"],
        &format!("{VALUE}\n"),
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("secrets: [DEPLOY_TOKEN]"),
        "{}",
        text(&out)
    );
    // Bad names and values that could not be masked are refused, saying why.
    let out = with_stdin(
        &s,
        &s.token,
        &["secret", "set", "app", "1BAD"],
        "long enough",
    );
    assert!(!out.status.success());
    assert!(text(&out).contains("invalid secret name"), "{}", text(&out));
    let out = with_stdin(&s, &s.token, &["secret", "set", "app", "SHORT"], "abc");
    assert!(!out.status.success());
    assert!(
        text(&out).contains("too short to be masked"),
        "{}",
        text(&out)
    );
    let out = with_stdin(
        &s,
        &s.token,
        &["secret", "set", "nope", "X_Y"],
        "long enough",
    );
    assert!(!out.status.success());
    assert!(text(&out).contains("no project nope"), "{}", text(&out));

    // List: names and when, never the value.
    let listed = s.ok(&s.token, &["secret", "list", "app"]);
    assert!(listed.contains("DEPLOY_TOKEN"), "{listed}");
    assert!(!listed.contains(VALUE), "{listed}");
    let json = s.ok(&s.token, &["secret", "list", "app", "--json"]);
    let row: serde_json::Value = serde_json::from_str(json.lines().next().unwrap()).unwrap();
    assert_eq!(row["name"], "DEPLOY_TOKEN");
    assert!(row["set_us"].as_i64().unwrap() > 0);

    let id = s.trigger("app");
    let b = s.finished(&id, BUILD);
    assert_eq!(b["status"], "succeeded", "{b}");

    let logs = s.ok(&s.token, &["logs", &id]);
    assert!(logs.contains("token is ***."), "{logs}");
    assert!(
        logs.contains("*** end"),
        "the split secret is masked: {logs}"
    );
    assert!(logs.contains("on stderr ***"), "{logs}");
    assert!(
        logs.contains("plain=unset"),
        "a job that names no secret gets none: {logs}"
    );
    // The job got exactly the value.
    assert!(logs.contains(&sha256_hex(VALUE.as_bytes())), "{logs}");
    assert!(
        !logs.contains(VALUE) && !logs.contains(&VALUE[..9]),
        "{logs}"
    );

    // The split line's chunks on the log: the first half was held back, not sent alone (each
    // plain-string step is its own step; `a_secret_split_across_flushes_is_masked` in the
    // executor's tests shows the halves are two flushes without masking).
    let events = s.ok(
        &s.token,
        &[
            "events",
            "--data",
            s.data().to_str().unwrap(),
            "--build",
            &id,
            "--json",
        ],
    );
    assert!(!events.contains(VALUE) && !events.contains(&VALUE[..9]));
    let split_line: Vec<String> = events
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["type"] == "log_chunk" && e["job"] == "show" && e["step"] == 2)
        .map(|e| e["data"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(split_line.concat(), "*** end\n", "{split_line:?}");

    // Nothing under the data directory (log, read models, objects) nor the server's own log
    // holds the value; the log has only its sealed form.
    let leaks = files_containing(&s.root, VALUE.as_bytes());
    assert!(leaks.is_empty(), "the plain value is in {leaks:?}");
    let all = s.ok(
        &s.token,
        &["events", "--data", s.data().to_str().unwrap(), "--json"],
    );
    let set: Vec<serde_json::Value> = all
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["type"] == "secret_set")
        .collect();
    assert_eq!(set.len(), 1, "{all}");
    assert_eq!(set[0]["name"], "DEPLOY_TOKEN");
    assert!(!set[0]["sealed_value"].as_array().unwrap().is_empty());

    // Deleted: gone from the list, and a job naming it fails saying what to do.
    s.ok(&s.token, &["secret", "delete", "app", "DEPLOY_TOKEN"]);
    let listed = s.ok(&s.token, &["secret", "list", "app"]);
    assert!(listed.contains("has no secrets"), "{listed}");
    let id = s.trigger("app");
    let b = s.finished(&id, BUILD);
    assert_eq!(b["status"], "failed", "{b}");
    let show = job(&b, "show");
    let reason = show["reason"].as_str().unwrap();
    assert!(
        reason.contains("DEPLOY_TOKEN") && reason.contains("tributary secret set app DEPLOY_TOKEN"),
        "{reason}"
    );
    assert_eq!(job(&b, "plain")["status"], "succeeded");
}

#[test]
fn another_tenant_can_neither_see_set_delete_nor_use_them() {
    let s = start_allowing_local_repos(1);
    let repo = s.project("app", PIPELINE);
    let out = with_stdin(
        &s,
        &s.token,
        &["secret", "set", "app", "DEPLOY_TOKEN"],
        VALUE,
    );
    assert!(out.status.success(), "{}", text(&out));

    s.ok(&s.token, &["admin", "tenant-add", "other"]);
    let other = s
        .ok(&s.token, &["admin", "token-create", "--tenant", "other"])
        .trim()
        .to_owned();
    for args in [
        &["secret", "list", "app"][..],
        &["secret", "delete", "app", "DEPLOY_TOKEN"][..],
    ] {
        let out = s.cli(&other, args);
        assert!(!out.status.success(), "{args:?}: {}", text(&out));
        assert!(text(&out).contains("no project app"), "{}", text(&out));
    }
    let out = with_stdin(
        &s,
        &other,
        &["secret", "set", "app", "DEPLOY_TOKEN"],
        "replaced!",
    );
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("no project app"), "{}", text(&out));
    // The owner's secret is unchanged.
    assert!(s
        .ok(&s.token, &["secret", "list", "app"])
        .contains("DEPLOY_TOKEN"));

    // The other tenant's own project of the same name, same repository and pipeline: its job
    // naming DEPLOY_TOKEN does not get the first tenant's secret.
    s.ok(
        &other,
        &["project", "add", "app", "--repo", repo.to_str().unwrap()],
    );
    assert!(s
        .ok(&other, &["secret", "list", "app"])
        .contains("has no secrets"));
    let id = s
        .ok(&other, &["trigger", "app"])
        .lines()
        .next()
        .unwrap()
        .trim()
        .to_owned();
    let b = s.finished_as(&other, &id, BUILD);
    assert_eq!(b["status"], "failed", "{b}");
    let reason = job(&b, "show")["reason"].as_str().unwrap().to_owned();
    assert!(reason.contains("does not have"), "{reason}");
    let leaks = files_containing(&s.root, VALUE.as_bytes());
    assert!(leaks.is_empty(), "the plain value is in {leaks:?}");
}
