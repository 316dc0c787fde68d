//! Metering end to end: a real `tributary up`, real `tributary agent` processes, real SQLite:
//! ticks from in-process and remote agents, an agent killed mid-job billed to its last tick,
//! invoices over gRPC with tenant isolation, usage in `get`, and `audit` clean on the real run
//! and failing on a tampered read-model row.

use crate::common;

use std::process::Command;
use std::time::Duration;

use common::{bin, wait_secs as wait_until, Server};
use serde_json::Value;

fn usage_ticks(s: &Server, build: &str) -> Vec<Value> {
    s.events(Some(build))
        .into_iter()
        .filter(|e| e["type"] == "usage_tick")
        .collect()
}

fn invoice_json(s: &Server, token: &str, extra: &[&str]) -> Value {
    let mut args = vec!["invoice", "--format", "json"];
    args.extend_from_slice(extra);
    let out = s.cli(token, &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn audit(s: &Server, extra: &[&str]) -> (bool, String) {
    let out = Command::new(bin())
        .args(["audit", "--data"])
        .arg(s.data())
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn sql(s: &Server, db: &str, statement: &str) {
    common::sql(&s.data().join(db), statement);
}

fn millis(v: &Value) -> u64 {
    v["millis"].as_u64().unwrap_or(0)
}

fn current_period() -> String {
    let out = Command::new("date")
        .args(["-u", "+%Y-%m"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn in_process_agents_tick_with_their_machine_class_and_invoices_are_tenant_isolated() {
    let s = common::start_with(&[
        "--agents",
        "1",
        "--agent-machine-class",
        "embedded-test",
        "--usage-interval",
        "0.2",
    ]);
    s.project(
        "sleepy",
        "jobs:\n  nap:\n    steps:\n      - run: sleep 1\n",
    );
    let build = s.admin(&["trigger", "sleepy"]).trim().to_owned();
    wait_until("the build to finish", 120, || {
        s.events(Some(&build))
            .iter()
            .any(|e| e["type"] == "build_finished")
    });
    let ticks = usage_ticks(&s, &build);
    assert!(ticks.len() >= 3, "{ticks:?}");
    assert!(ticks.iter().all(|t| t["machine_class"] == "embedded-test"));
    assert!(
        ticks.last().unwrap()["last"] == true,
        "a final partial tick"
    );
    let total: u64 = ticks.iter().map(millis).sum();
    assert!(total >= 1000, "{total} ms for a 1 s job");

    let period = current_period();
    let inv = invoice_json(&s, &s.token, &["--period", &period]);
    assert_eq!(inv["status"], "live");
    assert_eq!(inv["tenant"], "default");
    let lines = inv["lines"].as_array().unwrap();
    let line = lines
        .iter()
        .find(|l| l["machine_class"] == "embedded-test")
        .unwrap_or_else(|| panic!("{inv}"));
    assert_eq!(line["project"], "sleepy");
    assert_eq!(millis(line), total);
    // One job attempt (more only if a loaded machine made the lease expire): each attempt's
    // time is rounded up to a minute on its own.
    let attempts = line["jobs"].as_u64().unwrap();
    assert!(attempts >= 1, "{inv}");
    assert_eq!(
        line["billed_millis"].as_u64(),
        Some(60_000 * attempts),
        "{inv}"
    );

    // `get` shows the build's usage.
    let got = s.admin(&["get", &build]);
    assert!(got.contains("usage: attempt 1 on embedded-test"), "{got}");

    // Tenant isolation: another tenant's user token sees its own (empty) invoice, and may not
    // name the default tenant; the admin may name any tenant.
    s.admin(&["admin", "tenant-add", "other"]);
    let other = s
        .admin(&[
            "admin",
            "token-create",
            "--tenant",
            "other",
            "--kind",
            "user",
        ])
        .trim()
        .to_owned();
    let mine = invoice_json(&s, &other, &["--period", &period]);
    assert_eq!(mine["tenant"], "other");
    assert!(
        mine["lines"].as_array().is_none_or(|l| l.is_empty()),
        "{mine}"
    );
    let denied = s.cli(
        &other,
        &["invoice", "--tenant", "default", "--period", &period],
    );
    assert!(!denied.status.success());
    assert!(String::from_utf8_lossy(&denied.stderr).contains("admin token"));
    let by_admin = invoice_json(&s, &s.token, &["--tenant", "other", "--period", &period]);
    assert_eq!(by_admin["tenant"], "other");
    // Table and CSV render the same invoice.
    let table = s.admin(&["invoice", "--period", &period]);
    assert!(
        table.contains("embedded-test") && table.contains("TOTAL"),
        "{table}"
    );
    let csv = s.admin(&["invoice", "--period", &period, "--format", "csv"]);
    assert!(csv
        .lines()
        .next()
        .unwrap()
        .starts_with("tenant,period,status,kind"));
    assert!(csv.contains(",usage,") && csv.contains(",total,"), "{csv}");
}

#[test]
fn an_agent_killed_mid_job_is_billed_to_its_last_tick_and_audit_checks_the_run() {
    let mut s = common::start_with(&["--agents", "0", "--lease-ttl", "6"]);
    s.project(
        "long",
        "jobs:\n  work:\n    steps:\n      - run: sleep 120\n",
    );
    let mut agent = s.agent(
        "doomed",
        &["--machine-class", "doomed-2cpu", "--usage-interval", "0.2"],
    );
    let build = s.admin(&["trigger", "long"]).trim().to_owned();
    wait_until("five usage ticks", 120, || {
        usage_ticks(&s, &build).len() >= 5
    });
    // kill -9: no drain, no final tick.
    agent.0.kill().unwrap();
    agent.0.wait().unwrap();
    wait_until("the job to be requeued", 60, || {
        s.events(Some(&build))
            .iter()
            .any(|e| e["type"] == "job_requeued")
    });
    let ticks = usage_ticks(&s, &build);
    assert!(
        ticks.iter().all(|t| t["last"] == false),
        "no final tick from a killed agent"
    );
    let on_log: u64 = ticks.iter().map(millis).sum();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        usage_ticks(&s, &build).len(),
        ticks.len(),
        "a dead agent stops ticking"
    );

    let inv = invoice_json(&s, &s.token, &["--period", &current_period()]);
    let line = inv["lines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["machine_class"] == "doomed-2cpu")
        .unwrap_or_else(|| panic!("{inv}"));
    assert_eq!(
        millis(line),
        on_log,
        "billed exactly to the last tick on the log"
    );
    let got = s.admin(&["get", &build]);
    assert!(got.contains("billed to the last tick"), "{got}");

    // Audit: clean on the real run (server stopped so nothing moves), then a tampered row in
    // each read model is found, with its offset, and fails the audit.
    s.stop();
    let (ok, out) = audit(&s, &[]);
    assert!(ok, "{out}");
    assert!(out.contains("audit: OK"), "{out}");
    let (ok, out) = audit(&s, &["--tenant", "default"]);
    assert!(ok, "{out}");

    sql(
        &s,
        "metering.db",
        "UPDATE usage_daily SET millis = millis + 60000 WHERE machine_class = 'doomed-2cpu'",
    );
    let (ok, out) = audit(&s, &[]);
    assert!(!ok, "{out}");
    assert!(out.contains("usage default/long/doomed-2cpu/"), "{out}");
    assert!(out.contains("first divergence starts at offset"), "{out}");
    let (ok, _) = audit(&s, &["--tenant", "someone-else"]);
    assert!(ok, "another tenant's rows are not compared");
    sql(
        &s,
        "metering.db",
        "UPDATE usage_daily SET millis = millis - 60000 WHERE machine_class = 'doomed-2cpu'",
    );
    assert!(audit(&s, &[]).0, "restored");

    sql(&s, "readmodels.db", "UPDATE jobs SET reason = 'forged'");
    let (ok, out) = audit(&s, &[]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("builds read model") && out.contains("forged"),
        "{out}"
    );
}
