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

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use prost::Message;
use sqlx::{AnyConnection, Connection, Row};
use tributary_eventlog::kafka::{KafkaLog, KafkaOptions};
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

fn metering(flags: &[String], stderr: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_tributary"))
        .args(["serve", "metering", "--close-after-hours", "0"])
        .args(flags)
        .env("TRIBUTARY_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(stderr).expect("stderr file"))
        .spawn()
        .expect("start tributary serve metering")
}

fn text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

async fn wait_until<F, Fut>(what: &str, within: Duration, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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
    let brokers = tributary_testkit::kafka_brokers();
    let prefix = format!("test-metering-{}", tributary_proto::new_id());
    let (database, db_name) = tributary_testkit::fresh_database().await;
    let mut options = KafkaOptions::new(brokers.clone());
    options.topic_prefix = prefix.clone();
    options.event_partitions = 4;
    options.log_partitions = 0;
    options.replication_factor = 1;
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
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
        l.local_addr().expect("addr").port()
    };
    let listen = format!("127.0.0.1:{port}");
    let mut api = Command::new(env!("CARGO_BIN_EXE_tributary"))
        .args(["serve", "api", "--listen", &listen, "--data"])
        .arg(dir.path().join("api"))
        .arg("--admin-token-file")
        .arg(&token_file)
        .args(&flags)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("api.log")).expect("api log"))
        .spawn()
        .expect("start tributary serve api");
    let token_wait = Instant::now() + Duration::from_secs(120);
    while text(&token_file).trim().is_empty() {
        assert!(
            Instant::now() < token_wait,
            "serve api never wrote its admin token"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let page = loop {
        let page = http_get_retry(
            &listen,
            "/ui/usage?period=2025-10",
            text(&token_file).trim(),
        );
        if page.starts_with("HTTP/1.1 200") {
            break page;
        }
        assert!(Instant::now() < token_wait, "the usage page failed: {page}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(page.contains("Metering is not running"), "{page}");

    let (err_a, err_b) = (dir.path().join("a.log"), dir.path().join("b.log"));
    let mut a = metering(&flags, &err_a);
    wait_until("replica a is active", Duration::from_secs(120), || async {
        text(&err_a).contains("active metering replica")
    })
    .await;
    let mut b = metering(&flags, &err_b);
    wait_until("replica b stands by", Duration::from_secs(120), || async {
        text(&err_b).contains("standing by")
    })
    .await;
    // October is over: a issues both tenants' October invoices (60 s -> 1 min per job).
    wait_until(
        "replica a issued October's invoices",
        Duration::from_secs(180),
        || async { issued(&database).await.len() == 2 },
    )
    .await;
    assert!(
        !text(&err_b).contains("active metering replica"),
        "the standby stayed passive: {}",
        text(&err_b)
    );
    a.kill().expect("kill -9 replica a");
    let _ = a.wait();

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

    wait_until("replica b took over", Duration::from_secs(120), || async {
        text(&err_b).contains("active metering replica")
    })
    .await;
    wait_until(
        "replica b issued November's adjustments",
        Duration::from_secs(180),
        || async { issued(&database).await.len() == 4 },
    )
    .await;
    let ends = log.end_offsets().await.expect("end offsets");
    let mut conn = AnyConnection::connect(&database).await.expect("connect");
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
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
            break;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting until replica b folded every partition: {stored:?} of {ends:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

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
    let audit = Command::new(env!("CARGO_BIN_EXE_tributary"))
        .arg("audit")
        .args(&flags)
        .output()
        .expect("run tributary audit");
    let out = String::from_utf8_lossy(&audit.stdout).to_string();
    assert!(
        audit.status.success(),
        "audit found a difference: {out}{}",
        String::from_utf8_lossy(&audit.stderr)
    );
    assert!(out.contains("4 issued invoices match"), "{out}");
    // And notices a tampered row.
    sqlx::query("UPDATE metering.usage_daily SET millis = millis + 1 WHERE tenant = 'globex'")
        .execute(&mut conn)
        .await
        .expect("tamper");
    let audit = Command::new(env!("CARGO_BIN_EXE_tributary"))
        .arg("audit")
        .args(&flags)
        .output()
        .expect("run tributary audit");
    let out = String::from_utf8_lossy(&audit.stdout).to_string();
    assert_eq!(audit.status.code(), Some(1), "{out}");
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
        Command::new(env!("CARGO_BIN_EXE_tributary"))
            .args([
                "invoice", "--server", &server, "--tenant", "default", "--period", period,
            ])
            .args(["--format", "json"])
            .env("TRIBUTARY_TOKEN", text(&token_file).trim())
            .output()
            .expect("run tributary invoice")
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let shown = loop {
        let out = invoice("2025-10");
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).to_string();
        }
        assert!(
            Instant::now() < deadline,
            "the API never showed the invoice: {}{}",
            String::from_utf8_lossy(&out.stderr),
            text(&dir.path().join("api.log"))
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let json: serde_json::Value = serde_json::from_str(&shown).expect("invoice JSON");
    assert_eq!(json["status"], "issued", "{shown}");
    assert_eq!(json["period"], "2025-10", "{shown}");
    assert_eq!(json["lines"][0]["jobs"], 8, "{shown}");
    assert_eq!(json["lines"][0]["billed_millis"], 8 * 60_000, "{shown}");

    // The web UI's usage page (the admin token's tenant is `default`) from the same tables.
    let page = http_get(
        &listen,
        "/ui/usage?period=2025-10",
        text(&token_file).trim(),
    );
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(!page.contains("behind the log"), "{page}");
    assert!(!page.contains("Metering is not running"), "{page}");
    assert!(
        page.contains("2025-11"),
        "the issued invoices are listed: {page}"
    );

    let _ = api.kill();
    let _ = api.wait();
    // SIGTERM stops the active replica cleanly.
    let pid = b.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let status = b.wait().expect("wait for replica b");
    assert!(
        status.success(),
        "replica b exits 0 on SIGTERM: {}",
        text(&err_b)
    );

    // `tributary replay` rebuilds the metering tables into a fresh schema and swaps it in;
    // the result still equals a fresh replay.
    let before = issued(&database).await;
    let replay = Command::new(env!("CARGO_BIN_EXE_tributary"))
        .arg("replay")
        .args(&flags)
        .output()
        .expect("run tributary replay");
    let out = String::from_utf8_lossy(&replay.stdout).to_string();
    assert!(
        replay.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    assert!(out.contains("rebuilt the metering read model"), "{out}");
    assert_eq!(
        issued(&database).await,
        before,
        "the same invoices after the rebuild"
    );
    let audit = Command::new(env!("CARGO_BIN_EXE_tributary"))
        .arg("audit")
        .args(&flags)
        .output()
        .expect("run tributary audit");
    let out = String::from_utf8_lossy(&audit.stdout).to_string();
    assert!(audit.status.success(), "{out}");
    drop(conn);
    tributary_testkit::drop_database(&db_name).await;
}

/// A plain HTTP/1.1 GET with a bearer token: the whole response as text.
fn http_get(addr: &str, path: &str, token: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the API");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Connection: close\r\n\r\n"
    )
    .expect("send");
    let mut out = String::new();
    let _ = stream.read_to_string(&mut out);
    out
}

/// [`http_get`], or the error as text when the API does not listen yet.
fn http_get_retry(addr: &str, path: &str, token: &str) -> String {
    match std::net::TcpStream::connect(addr) {
        Ok(_) => http_get(addr, path, token),
        Err(e) => format!("not listening: {e}"),
    }
}
