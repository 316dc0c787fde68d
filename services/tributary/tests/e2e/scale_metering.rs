//! Scale-out metering: two `tributary serve metering` processes on a 4-partition Kafka events
//! topic and PostgreSQL. One is active, the other stands by. The ticks of many builds of two
//! tenants land on every partition, with re-appended duplicates and a garbage record. The
//! active replica issues October's invoices and is killed with SIGKILL; the standby takes
//! over, folds the rest (late October ticks) and issues November's adjustments. At the end
//! the tables equal a fresh replay (`tributary audit --kafka --database`), every tick counted
//! once, each invoice was appended once, and `serve api` on the same database shows them
//! (`tributary invoice --server`, the web UI's usage page, which said "not running" before any
//! replica ran). `tributary replay` then rebuilds the metering schema, still equal to a replay.
//!
//! Needs the broker and PostgreSQL of `scripts/setup-brokers.sh` (`TRIBUTARY_TEST_KAFKA`,
//! `TRIBUTARY_TEST_DATABASE_URL` override them); fails with that message if they are absent.

use crate::common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{bin, free_port, http_get_as, wait_for_async, wait_until_async, Proc};

use prost::Message;
use sqlx::{AnyConnection, Connection, Row};
use tributary_eventlog::kafka::KafkaLog;
use tributary_eventlog::EventLog;
use tributary_proto::events::{envelope::Payload, Envelope, JobFinished, UsageTick};

fn flags(brokers: &str, prefix: &str, database: &str) -> Vec<String> {
    [
        "--kafka",
        brokers,
        "--kafka-topic-prefix",
        prefix,
        "--kafka-event-partitions",
        "4",
        "--kafka-log-partitions",
        "0",
        "--database",
        database,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn metering(flags: &[String], stderr: &Path) -> Proc {
    let child = Command::new(bin())
        .args(["serve", "metering", "--close-after-hours", "0"])
        .args(flags)
        .env("TRIBUTARY_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(stderr).expect("stderr file"))
        .spawn()
        .expect("start tributary serve metering");
    Proc(child)
}

/// `tributary COMMAND FLAGS` (`audit`, `replay`), which must exit with `code`: its stdout.
fn run(command: &str, flags: &[String], code: i32) -> String {
    let output = Command::new(bin())
        .arg(command)
        .args(flags)
        .output()
        .unwrap_or_else(|e| panic!("run tributary {command}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert_eq!(
        output.status.code(),
        Some(code),
        "tributary {command}: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

const OCTOBER_20: i64 = 1_760_918_400_000_000; // 2025-10-20T00:00:00Z in µs

fn tick(tenant: &str, build: &str, seq: u32) -> Envelope {
    let start = OCTOBER_20 + i64::from(seq) * 20_000_000;
    let mut env = Envelope::new(
        tenant,
        "web",
        build,
        Payload::UsageTick(UsageTick {
            job: "build".into(),
            attempt: 1,
            agent_id: "agent".into(),
            machine_class: "linux-2cpu-4gb".into(),
            millis: 20_000,
            seq,
            last: seq == 6,
            start_us: start,
            end_us: start + 20_000_000,
        }),
    );
    env.time_us = start + 20_000_000;
    env
}

/// (tenant, period) of every issued invoice in the live tables.
async fn issued(db: &str) -> Vec<(String, String, i64)> {
    let mut conn = AnyConnection::connect(db).await.expect("connect");
    let rows =
        sqlx::query("SELECT tenant, period, body FROM metering.invoices ORDER BY tenant, period")
            .fetch_all(&mut conn)
            .await
            .unwrap_or_default();
    rows.iter()
        .map(|r| {
            let body: Vec<u8> = r.get("body");
            let inv = tributary_proto::events::InvoiceIssued::decode(body.as_slice())
                .expect("invoice body");
            (r.get("tenant"), r.get("period"), inv.total_micros)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_and_standby_metering_on_kafka_and_postgres_equal_a_fresh_replay() {
    tributary_testkit::require!(Kafka, Postgres);
    let db = tributary_testkit::TestDatabase::create().await;
    let database = db.url.clone();
    let options = tributary_testkit::kafka_options("metering", 4, 0);
    let (brokers, prefix) = (options.brokers.clone(), options.topic_prefix.clone());
    let log = KafkaLog::connect(options).await.expect("connect to Kafka");
    assert_eq!(log.layout().partitions(), 4);
    let dir = tempfile::tempdir().expect("tempdir");
    let flags = flags(&brokers, &prefix, &database);

    // 16 builds of two tenants over the 4 partitions: ticks 1..3 (60 s of October each).
    let builds: Vec<(String, String)> = (0..16)
        .map(|i| {
            let tenant = if i % 2 == 0 { "default" } else { "globex" };
            (tenant.to_owned(), tributary_proto::new_id())
        })
        .collect();
    let used: std::collections::BTreeSet<u32> = builds
        .iter()
        .map(|(_, b)| {
            log.layout()
                .partition_for(tributary_eventlog::Topic::Events, b)
        })
        .collect();
    assert!(
        used.len() >= 3,
        "the builds spread over the partitions: {used:?}"
    );
    let phase = |seqs: std::ops::RangeInclusive<u32>| {
        let mut events = Vec::new();
        for seq in seqs {
            for (tenant, build) in &builds {
                events.push(tick(tenant, build, seq));
            }
        }
        events
    };
    let first = phase(1..=3);
    log.append(&first).await.expect("append ticks");
    // Duplicates (a producer retry stores an event twice) and a garbage record.
    for event in first.iter().step_by(5) {
        log.append_raw(&event.build_id, event.encode_to_vec())
            .await
            .expect("append a duplicate");
    }
    log.append_raw("garbage", vec![0xff, 0xff, 0xff, 0x01])
        .await
        .expect("append garbage");

    // `serve api` on the same database: before any metering replica ran, its usage page says
    // metering is not running.
    let token_file = dir.path().join("admin.token");
    let listen = format!("127.0.0.1:{}", free_port());
    let api = Proc(
        Command::new(bin())
            .args(["serve", "api", "--listen", &listen, "--data"])
            .arg(dir.path().join("api"))
            .arg("--admin-token-file")
            .arg(&token_file)
            .args(&flags)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("api.log")).expect("api log"))
            .spawn()
            .expect("start tributary serve api"),
    );
    wait_until_async(
        "serve api to write its admin token",
        Duration::from_secs(120),
        async || !text(&token_file).trim().is_empty(),
    )
    .await;
    let token = text(&token_file).trim().to_owned();
    let usage_page = || http_get_as(&listen, "/ui/usage?period=2025-10", Some(&token));
    let page = wait_for_async(
        "the usage page",
        Duration::from_secs(120),
        async || match usage_page() {
            Some(reply) if reply.status == 200 => Ok(reply.text()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
    assert!(page.contains("Metering is not running"), "{page}");

    let (err_a, err_b) = (dir.path().join("a.log"), dir.path().join("b.log"));
    let mut a = metering(&flags, &err_a);
    wait_until_async(
        "replica a to become active",
        Duration::from_secs(120),
        async || text(&err_a).contains("active metering replica"),
    )
    .await;
    let mut b = metering(&flags, &err_b);
    wait_until_async(
        "replica b to stand by",
        Duration::from_secs(120),
        async || text(&err_b).contains("standing by"),
    )
    .await;
    // October is over: a issues both tenants' October invoices (60 s -> 1 min per job).
    wait_until_async(
        "replica a to issue October's invoices",
        Duration::from_secs(180),
        async || issued(&database).await.len() == 2,
    )
    .await;
    assert!(
        !text(&err_b).contains("active metering replica"),
        "the standby stayed passive: {}",
        text(&err_b)
    );
    a.signal(libc::SIGKILL);
    a.wait_exit(Duration::from_secs(60));

    // The rest of the jobs: ticks 4..6 of October (late now: adjustments on November's
    // invoice, 120 s -> 2 min, one more minute per job), job ends, more duplicates.
    let second = phase(4..=6);
    log.append(&second).await.expect("append ticks");
    let ends: Vec<Envelope> = builds
        .iter()
        .map(|(tenant, build)| {
            Envelope::new(
                tenant,
                "web",
                build,
                Payload::JobFinished(JobFinished {
                    job: "build".into(),
                    attempt: 1,
                    ..JobFinished::default()
                }),
            )
        })
        .collect();
    log.append(&ends).await.expect("append job ends");
    log.append(&second[..8]).await.expect("append duplicates");

    wait_until_async(
        "replica b to take over",
        Duration::from_secs(120),
        async || text(&err_b).contains("active metering replica"),
    )
    .await;
    wait_until_async(
        "replica b to issue November's adjustments",
        Duration::from_secs(180),
        async || issued(&database).await.len() == 4,
    )
    .await;
    let ends = log.end_offsets().await.expect("end offsets");
    let mut conn = AnyConnection::connect(&database).await.expect("connect");
    wait_for_async(
        "replica b to fold every partition",
        Duration::from_secs(180),
        async || {
            let rows = sqlx::query("SELECT partition, next_offset FROM metering.metering_offsets")
                .fetch_all(&mut conn)
                .await
                .expect("offsets");
            let stored: BTreeMap<i64, i64> = rows
                .iter()
                .map(|r| (r.get::<i64, _>(0), r.get::<i64, _>(1)))
                .collect();
            if ends
                .iter()
                .enumerate()
                .all(|(p, end)| stored.get(&(p as i64)).copied().unwrap_or(0) >= *end as i64)
            {
                Ok(())
            } else {
                Err(format!("{stored:?} of {ends:?}"))
            }
        },
    )
    .await;

    // Every tick once: 8 builds x 6 ticks x 20 s per tenant.
    for tenant in ["default", "globex"] {
        let total: i64 = sqlx::query_scalar(
            "SELECT CAST(SUM(millis) AS BIGINT) FROM metering.usage_daily WHERE tenant = $1",
        )
        .bind(tenant)
        .fetch_one(&mut conn)
        .await
        .expect("usage");
        assert_eq!(
            total,
            8 * 6 * 20_000,
            "{tenant}'s usage counts each tick once"
        );
    }
    // Built-in plan: $0.008/min, 2000 free minutes: both invoices are free but exist.
    let invoices = issued(&database).await;
    let periods: Vec<(&str, &str)> = invoices
        .iter()
        .map(|(t, p, _)| (t.as_str(), p.as_str()))
        .collect();
    assert_eq!(
        periods,
        vec![
            ("default", "2025-10"),
            ("default", "2025-11"),
            ("globex", "2025-10"),
            ("globex", "2025-11")
        ]
    );
    // The malformed record was skipped with an error log (by whichever replica read it).
    let logs = text(&err_a) + &text(&err_b);
    assert!(logs.contains("skipping a malformed record"), "{logs}");

    // Each invoice was appended once: no replica issued one twice.
    let mut appended: BTreeMap<(String, String), usize> = BTreeMap::new();
    for p in 0..4 {
        let mut from = 0;
        loop {
            let records = log.read_partition(p, from, 1000).await.expect("read");
            let Some(last) = records.last() else { break };
            from = last.offset + 1;
            for r in &records {
                if let Ok(Envelope {
                    payload: Some(Payload::InvoiceIssued(inv)),
                    ..
                }) = r.decode()
                {
                    *appended.entry((inv.tenant, inv.period)).or_default() += 1;
                }
            }
        }
    }
    assert_eq!(appended.len(), 4, "{appended:?}");
    assert!(
        appended.values().all(|n| *n == 1),
        "issued twice: {appended:?}"
    );

    // A fresh replay of every partition equals the live tables and every invoice.
    let out = run("audit", &flags, 0);
    assert!(out.contains("4 issued invoices match"), "{out}");
    // And notices a tampered row.
    sqlx::query("UPDATE metering.usage_daily SET millis = millis + 1 WHERE tenant = 'globex'")
        .execute(&mut conn)
        .await
        .expect("tamper");
    let out = run("audit", &flags, 1);
    assert!(
        out.contains("usage globex/web/linux-2cpu-4gb/2025-10-20"),
        "{out}"
    );
    sqlx::query("UPDATE metering.usage_daily SET millis = millis - 1 WHERE tenant = 'globex'")
        .execute(&mut conn)
        .await
        .expect("restore");

    let server = format!("http://{listen}");
    let invoice = |period: &str| {
        Command::new(bin())
            .args([
                "invoice", "--server", &server, "--tenant", "default", "--period", period,
            ])
            .args(["--format", "json"])
            .env("TRIBUTARY_TOKEN", &token)
            .output()
            .expect("run tributary invoice")
    };
    let shown = wait_for_async(
        "the API to show the invoice",
        Duration::from_secs(120),
        async || {
            let out = invoice("2025-10");
            if out.status.success() {
                Ok(String::from_utf8_lossy(&out.stdout).to_string())
            } else {
                Err(format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stderr),
                    text(&dir.path().join("api.log"))
                ))
            }
        },
    )
    .await;
    let json: serde_json::Value = serde_json::from_str(&shown).expect("invoice JSON");
    assert_eq!(json["status"], "issued", "{shown}");
    assert_eq!(json["period"], "2025-10", "{shown}");
    assert_eq!(json["lines"][0]["jobs"], 8, "{shown}");
    assert_eq!(json["lines"][0]["billed_millis"], 8 * 60_000, "{shown}");

    // The web UI's usage page (the admin token's tenant is `default`) from the same tables.
    let reply = usage_page().expect("GET /ui/usage from serve api");
    let page = reply.text();
    assert_eq!(reply.status, 200, "{page}");
    assert!(!page.contains("behind the log"), "{page}");
    assert!(!page.contains("Metering is not running"), "{page}");
    assert!(
        page.contains("2025-11"),
        "the issued invoices are listed: {page}"
    );

    drop(api);
    // SIGTERM stops the active replica cleanly.
    b.signal(libc::SIGTERM);
    let status = b.wait_exit(Duration::from_secs(120));
    assert!(
        status.success(),
        "replica b exits 0 on SIGTERM: {}",
        text(&err_b)
    );

    // `tributary replay` rebuilds the metering tables into a fresh schema and swaps it in;
    // the result still equals a fresh replay.
    let before = issued(&database).await;
    let out = run("replay", &flags, 0);
    assert!(out.contains("rebuilt the metering read model"), "{out}");
    assert_eq!(
        issued(&database).await,
        before,
        "the same invoices after the rebuild"
    );
    run("audit", &flags, 0);
    drop(conn);
}
