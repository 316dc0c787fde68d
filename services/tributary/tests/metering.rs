//! Metering end to end: a real `tributary up`, real `tributary agent` processes, real SQLite:
//! ticks from in-process and remote agents, an agent killed mid-job billed to its last tick,
//! invoices over gRPC with tenant isolation, usage in `get`, and `audit` clean on the real run
//! and failing on a tampered read-model row.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tributary")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn git(dir: &Path, args: &[&str]) {
    assert!(Command::new("git")
        .args(args)
        .current_dir(dir)
        .status()
        .unwrap()
        .success());
}

struct Server {
    proc: Option<Proc>,
    addr: String,
    token: String,
    dir: tempfile::TempDir,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let server = Command::new(bin())
            .args(["up", "--listen", &addr, "--data"])
            .arg(dir.path().join("data"))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_until("server", 60, || std::net::TcpStream::connect(&addr).is_ok());
        let token = std::fs::read_to_string(dir.path().join("data/admin.token"))
            .unwrap()
            .trim()
            .to_owned();
        Server {
            proc: Some(Proc(server)),
            addr: format!("http://{addr}"),
            token,
            dir,
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// SIGTERM, then wait for the server to exit.
    fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            unsafe_kill_term(p.0.id());
            let deadline = Instant::now() + Duration::from_secs(60);
            while p.0.try_wait().unwrap().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    fn cli_as(&self, token: &str, args: &[&str]) -> Output {
        Command::new(bin())
            .args(args)
            .env("TRIBUTARY_SERVER", &self.addr)
            .env("TRIBUTARY_TOKEN", token)
            .env_remove("TRIBUTARY_DATA")
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cli_as(&self.token, args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn project(&self, name: &str, pipeline: &str) {
        let repo = self.dir.path().join(name);
        std::fs::create_dir_all(&repo).unwrap();
        git(&repo, &["init", "-q", "-b", "main"]);
        std::fs::write(repo.join(".tributary.yml"), pipeline).unwrap();
        git(&repo, &["add", "."]);
        git(
            &repo,
            &[
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "commit",
                "-qm",
                "init",
            ],
        );
        self.ok(&["project", "add", name, "--repo", repo.to_str().unwrap()]);
    }

    fn events(&self, build: &str) -> Vec<Value> {
        let out = Command::new(bin())
            .args(["events", "--json", "--build", build, "--data"])
            .arg(self.data())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn ticks(&self, build: &str) -> Vec<Value> {
        self.events(build)
            .into_iter()
            .filter(|e| e["type"] == "usage_tick")
            .collect()
    }

    fn invoice_json(&self, token: &str, extra: &[&str]) -> Value {
        let mut args = vec!["invoice", "--format", "json"];
        args.extend_from_slice(extra);
        let out = self.cli_as(token, &args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn audit(&self, extra: &[&str]) -> (bool, String) {
        let out = Command::new(bin())
            .args(["audit", "--data"])
            .arg(self.data())
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }

    fn sql(&self, db: &str, statement: &str) {
        let path = self.data().join(db);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let opts = sqlx::sqlite::SqliteConnectOptions::new().filename(&path);
            let pool = sqlx::SqlitePool::connect_with(opts).await.unwrap();
            let done = sqlx::query(statement).execute(&pool).await.unwrap();
            assert!(done.rows_affected() > 0, "{statement} changed nothing");
            pool.close().await;
        });
    }
}

fn unsafe_kill_term(pid: u32) {
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
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
    let s = Server::start(&[
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
    let build = s.ok(&["trigger", "sleepy"]).trim().to_owned();
    wait_until("the build to finish", 120, || {
        s.events(&build)
            .iter()
            .any(|e| e["type"] == "build_finished")
    });
    let ticks = s.ticks(&build);
    assert!(ticks.len() >= 3, "{ticks:?}");
    assert!(ticks.iter().all(|t| t["machine_class"] == "embedded-test"));
    assert!(
        ticks.last().unwrap()["last"] == true,
        "a final partial tick"
    );
    let total: u64 = ticks.iter().map(millis).sum();
    assert!(total >= 1000, "{total} ms for a 1 s job");

    let period = current_period();
    let inv = s.invoice_json(&s.token, &["--period", &period]);
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
    let got = s.ok(&["get", &build]);
    assert!(got.contains("usage: attempt 1 on embedded-test"), "{got}");

    // Tenant isolation: another tenant's user token sees its own (empty) invoice, and may not
    // name the default tenant; the admin may name any tenant.
    s.ok(&["admin", "tenant-add", "other"]);
    let other = s
        .ok(&[
            "admin",
            "token-create",
            "--tenant",
            "other",
            "--kind",
            "user",
        ])
        .trim()
        .to_owned();
    let mine = s.invoice_json(&other, &["--period", &period]);
    assert_eq!(mine["tenant"], "other");
    assert!(
        mine["lines"].as_array().is_none_or(|l| l.is_empty()),
        "{mine}"
    );
    let denied = s.cli_as(
        &other,
        &["invoice", "--tenant", "default", "--period", &period],
    );
    assert!(!denied.status.success());
    assert!(String::from_utf8_lossy(&denied.stderr).contains("admin token"));
    let by_admin = s.invoice_json(&s.token, &["--tenant", "other", "--period", &period]);
    assert_eq!(by_admin["tenant"], "other");
    // Table and CSV render the same invoice.
    let table = s.ok(&["invoice", "--period", &period]);
    assert!(
        table.contains("embedded-test") && table.contains("TOTAL"),
        "{table}"
    );
    let csv = s.ok(&["invoice", "--period", &period, "--format", "csv"]);
    assert!(csv
        .lines()
        .next()
        .unwrap()
        .starts_with("tenant,period,status,kind"));
    assert!(csv.contains(",usage,") && csv.contains(",total,"), "{csv}");
}

#[test]
fn an_agent_killed_mid_job_is_billed_to_its_last_tick_and_audit_checks_the_run() {
    let mut s = Server::start(&["--agents", "0", "--lease-ttl", "2"]);
    s.project(
        "long",
        "jobs:\n  work:\n    steps:\n      - run: sleep 120\n",
    );
    let workdir = s.dir.path().join("agent");
    let mut agent = Proc(
        Command::new(bin())
            .args([
                "agent",
                "--server",
                &s.addr,
                "--token",
                &s.token,
                "--machine-class",
                "doomed-2cpu",
                "--usage-interval",
                "0.2",
                "--workdir",
            ])
            .arg(&workdir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let build = s.ok(&["trigger", "long"]).trim().to_owned();
    wait_until("five usage ticks", 120, || s.ticks(&build).len() >= 5);
    // kill -9: no drain, no final tick.
    agent.0.kill().unwrap();
    agent.0.wait().unwrap();
    wait_until("the job to be requeued", 60, || {
        s.events(&build).iter().any(|e| e["type"] == "job_requeued")
    });
    let ticks = s.ticks(&build);
    assert!(
        ticks.iter().all(|t| t["last"] == false),
        "no final tick from a killed agent"
    );
    let on_log: u64 = ticks.iter().map(millis).sum();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        s.ticks(&build).len(),
        ticks.len(),
        "a dead agent stops ticking"
    );

    let inv = s.invoice_json(&s.token, &["--period", &current_period()]);
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
    let got = s.ok(&["get", &build]);
    assert!(got.contains("billed to the last tick"), "{got}");

    // Audit: clean on the real run (server stopped so nothing moves), then a tampered row in
    // each read model is found, with its offset, and fails the audit.
    s.stop();
    let (ok, out) = s.audit(&[]);
    assert!(ok, "{out}");
    assert!(out.contains("audit: OK"), "{out}");
    let (ok, out) = s.audit(&["--tenant", "default"]);
    assert!(ok, "{out}");

    s.sql(
        "metering.db",
        "UPDATE usage_daily SET millis = millis + 60000 WHERE machine_class = 'doomed-2cpu'",
    );
    let (ok, out) = s.audit(&[]);
    assert!(!ok, "{out}");
    assert!(out.contains("usage default/long/doomed-2cpu/"), "{out}");
    assert!(out.contains("first divergence starts at offset"), "{out}");
    let (ok, _) = s.audit(&["--tenant", "someone-else"]);
    assert!(ok, "another tenant's rows are not compared");
    s.sql(
        "metering.db",
        "UPDATE usage_daily SET millis = millis - 60000 WHERE machine_class = 'doomed-2cpu'",
    );
    assert!(s.audit(&[]).0, "restored");

    s.sql("readmodels.db", "UPDATE jobs SET reason = 'forged'");
    let (ok, out) = s.audit(&[]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("builds read model") && out.contains("forged"),
        "{out}"
    );
}
