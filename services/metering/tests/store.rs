//! The metering store's conformance: the projection, service and audit against a real SQLite
//! log and a real read-model database, each test run on SQLite and on PostgreSQL (a fresh
//! database per test on the server `scripts/setup-brokers.sh` starts, 127.0.0.1:5432;
//! `TRIBUTARY_TEST_DATABASE_URL` overrides it). Without PostgreSQL the `_postgres` tests fail
//! saying which script starts it.

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio_util::sync::CancellationToken;
use tributary_eventlog::{sqlite::SqliteLog, EventLog, Record};
use tributary_metering::audit;
use tributary_metering::calendar::{Day, Period};
use tributary_metering::invoice::ADJUSTMENT;
use tributary_metering::service::{self, ServiceConfig};
use tributary_metering::{MeteringProjector, MeteringStore, PricePlan};
use tributary_proto::events::{envelope::Payload, Envelope, LogPosition, UsageTick};

fn tick(tenant: &str, build: &str, seq: u32, start_us: i64, millis: u64, last: bool) -> Envelope {
    let mut env = Envelope::new(
        tenant,
        "web",
        build,
        Payload::UsageTick(UsageTick {
            job: "build".into(),
            attempt: 1,
            agent_id: "agent".into(),
            machine_class: "small".into(),
            millis,
            seq,
            last,
            start_us,
            end_us: start_us + millis as i64 * 1000,
        }),
    );
    env.time_us = start_us + millis as i64 * 1000;
    env
}

fn day(d: &str) -> i64 {
    Day::parse(d).unwrap().start_us()
}

#[derive(Clone, Copy, Debug)]
enum Engine {
    Sqlite,
    Postgres,
}

/// The log, the store, and on PostgreSQL the database's guard (dropped with the test).
async fn setup(
    dir: &std::path::Path,
    engine: Engine,
) -> (
    Arc<SqliteLog>,
    MeteringStore,
    Option<tributary_testkit::TestDatabase>,
) {
    let log = SqliteLog::open(&dir.join("events.db")).await.unwrap();
    let (store, db) = match engine {
        Engine::Sqlite => (
            MeteringStore::open(&dir.join("metering.db")).await.unwrap(),
            None,
        ),
        Engine::Postgres => {
            let db = tributary_testkit::TestDatabase::create().await;
            (MeteringStore::connect(&db.url).await.unwrap(), Some(db))
        }
    };
    (Arc::new(log), store, db)
}

/// Each test of the suite, once per engine.
macro_rules! both_engines {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name(super::Engine::Sqlite).await
            })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                tributary_testkit::require!(Postgres);
                super::$name(super::Engine::Postgres).await
            })*
        }
    };
}

both_engines!(
    projector_persists_restarts_and_never_double_counts,
    audit_finds_a_tampered_row_and_names_its_offset,
    the_service_issues_closed_months_and_late_ticks_go_to_the_next_invoice,
    positions_and_pending_invoices_of_partitions_survive_a_restart,
    a_standby_writer_waits_until_the_active_one_is_gone,
);

/// Three builds of two tenants, their ticks interleaved (as partitions deliver them).
fn interleaved() -> Vec<Envelope> {
    let mut out = Vec::new();
    for seq in 1..=5u32 {
        for (tenant, build) in [("acme", "b1"), ("globex", "b2"), ("acme", "b3")] {
            let start = day("2025-10-20") + i64::from(seq) * 10_000_000;
            out.push(tick(tenant, build, seq, start, 10_000, seq == 5));
        }
    }
    out.reverse(); // out of order within each build, too
    out
}

async fn projector_persists_restarts_and_never_double_counts(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let (log, store, _db) = setup(dir.path(), engine).await;
    let events = interleaved();
    log.append(&events).await.unwrap();
    // A re-delivered tick: the same bytes again at a new offset (at-least-once delivery).
    log.append_raw("b1", events[0].encode_to_vec())
        .await
        .unwrap();

    // A projector that crashes before its commit leaves nothing behind.
    let crashing = MeteringProjector::open(store.clone()).await.unwrap();
    let records = log.read(0, 100).await.unwrap();
    crashing.apply_batch_and_crash(&records);
    assert_eq!(store.next_offset().await.unwrap(), 0);

    let mut p = MeteringProjector::open(store.clone()).await.unwrap();
    // Two batches, the second overlapping the first (a re-delivery of offsets 5..10).
    p.apply_batch(&records[..10]).await.unwrap();
    p.apply_batch(&records[5..]).await.unwrap();
    assert_eq!(p.next_offset(), 16);
    let acme = store.usage_records("acme").await.unwrap();
    assert_eq!(acme.len(), 1);
    assert_eq!(
        acme[0].1,
        2 * 5 * 10_000,
        "two builds x 5 ticks x 10 s, once each"
    );
    let b1 = store.build_usage("b1").await.unwrap();
    assert_eq!(b1.len(), 1);
    assert_eq!(
        (b1[0].1.millis, b1[0].1.ticks, b1[0].1.complete),
        (50_000, 5, true)
    );

    // Restart: the loaded state is the replayed state.
    drop(p);
    let reopened = MeteringProjector::open(store.clone()).await.unwrap();
    let replayed = audit::replay(log.clone(), 16).await.unwrap();
    assert_eq!(audit::compare(reopened.state(), &replayed, None), vec![]);
}

async fn audit_finds_a_tampered_row_and_names_its_offset(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let (log, store, _db) = setup(dir.path(), engine).await;
    log.append(&interleaved()).await.unwrap();
    let mut p = MeteringProjector::open(store.clone()).await.unwrap();
    p.catch_up(log.as_ref()).await.unwrap();
    let stored = store.load_all().await.unwrap();
    let replayed = audit::replay(log.clone(), stored.position(0))
        .await
        .unwrap();
    assert!(audit::compare(&stored, &replayed, None).is_empty());

    sqlx::query("UPDATE usage_daily SET millis = millis - 1000 WHERE tenant = 'globex'")
        .execute(store.pool())
        .await
        .unwrap();
    let stored = store.load_all().await.unwrap();
    let diffs = audit::compare(&stored, &replayed, None);
    assert_eq!(diffs.len(), 1, "{diffs:?}");
    assert!(
        diffs[0]
            .row
            .starts_with("usage globex/web/small/2025-10-20"),
        "{}",
        diffs[0]
    );
    assert_eq!(diffs[0].stored, "49000 ms");
    assert_eq!(diffs[0].replayed, "50000 ms");
    // The last globex tick in log order.
    let records = log.read(0, 100).await.unwrap();
    let last_globex = records
        .iter()
        .filter(|r| r.decode().unwrap().tenant == "globex")
        .map(|r| r.offset)
        .max()
        .unwrap();
    assert_eq!(diffs[0].at.offset, last_globex);
    assert!(audit::compare(&stored, &replayed, Some("acme")).is_empty());
}

/// Waits until the store's invoices satisfy `f`.
async fn wait_for<F: Fn(&tributary_metering::MeteringState) -> bool>(
    store: &MeteringStore,
    what: &str,
    f: F,
) -> tributary_metering::MeteringState {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let state = store.load_all().await.unwrap();
        if f(&state) {
            return state;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn the_service_issues_closed_months_and_late_ticks_go_to_the_next_invoice(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let (log, store, _db) = setup(dir.path(), engine).await;
    let plan = PricePlan::parse(
        "version = \"t\"\nfree_minutes_per_month = 0\nround_up_secs = 60\n[prices]\nsmall = \"0.5\"\n",
        "plan",
    )
    .unwrap();
    // 90 s in October 2025 (long over: due at once).
    log.append(&[tick("acme", "b1", 1, day("2025-10-31"), 90_000, false)])
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let svc = tokio::spawn(service::run(
        log.clone(),
        store.clone(),
        ServiceConfig {
            plan,
            close_after: Duration::from_secs(3600),
            check_every: Duration::from_millis(50),
        },
        stop.clone(),
    ));
    let oct = Period::parse("2025-10").unwrap();
    let nov = Period::parse("2025-11").unwrap();
    let state = wait_for(&store, "October's invoice", |s| s.is_issued("acme", oct)).await;
    let october = state.issued[&("acme".to_string(), oct)].clone();
    assert_eq!(october.invoice.total_micros, 1_000_000, "2 min x 0.5");

    // The agent's last tick arrives late: 40 s more of October (130 s -> 3 min).
    log.append(&[tick(
        "acme",
        "b1",
        2,
        day("2025-10-31") + 90_000_000,
        40_000,
        true,
    )])
    .await
    .unwrap();
    let state = wait_for(&store, "November's invoice", |s| s.is_issued("acme", nov)).await;
    assert_eq!(
        state.issued[&("acme".to_string(), oct)],
        october,
        "October unchanged"
    );
    let november = &state.issued[&("acme".to_string(), nov)].invoice;
    assert_eq!(november.lines.len(), 1);
    assert_eq!(november.lines[0].kind, ADJUSTMENT);
    assert_eq!(november.lines[0].period, "2025-10");
    assert_eq!(november.total_micros, 500_000, "1 more minute");
    stop.cancel();
    svc.await.unwrap().unwrap();

    // The audit agrees with every issued invoice.
    let stored = store.load_all().await.unwrap();
    let replayed = audit::replay(log.clone(), stored.position(0))
        .await
        .unwrap();
    assert!(audit::compare(&stored, &replayed, None).is_empty());
    assert_eq!(replayed.issued.len(), 2);
}

/// Records of a 4-partition log, built by hand (the store does not care where they come
/// from): ticks on partitions 1 and 2, an invoice on partition 3 whose cut is beyond what was
/// read of partition 2, so it waits.
fn partitioned_records() -> Vec<Record> {
    let plan = PricePlan::builtin();
    let oct = day("2025-10-20");
    let t1 = tick("acme", "b1", 1, oct, 30_000, false);
    let t2 = tick("acme", "b2", 1, oct, 45_000, true);
    let t1b = tick("acme", "b1", 2, oct + 30_000_000, 30_000, true);
    // The invoice the issuer priced after reading b1's two ticks and b2's one.
    let mut state = tributary_metering::MeteringState::default();
    for (i, t) in [&t1, &t2, &t1b].into_iter().enumerate() {
        state.apply(tributary_metering::Pos::new(1, i as u64), t);
    }
    let priced =
        tributary_metering::price(&state, "acme", Period::parse("2025-10").unwrap(), &plan)
            .unwrap();
    let cut = vec![
        LogPosition {
            partition: 1,
            next_offset: 2,
        },
        LogPosition {
            partition: 2,
            next_offset: 1,
        },
    ];
    let invoice = Envelope::new(
        "acme",
        "",
        "",
        Payload::InvoiceIssued(priced.invoice.to_event(&plan, cut)),
    );
    let rec = |partition: u32, offset: u64, env: &Envelope| Record {
        partition,
        offset,
        key: env.partition_key(),
        data: env.encode_to_vec().into(),
    };
    vec![
        rec(1, 0, &t1),
        rec(3, 0, &invoice),
        rec(1, 1, &t1b),
        rec(2, 0, &t2),
    ]
}

async fn positions_and_pending_invoices_of_partitions_survive_a_restart(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let (_log, store, _db) = setup(dir.path(), engine).await;
    let records = partitioned_records();
    let mut p = MeteringProjector::open(store.clone()).await.unwrap();
    // The invoice arrives before partition 2 reached its cut: it waits, stored as pending.
    p.apply_batch(&records[..3]).await.unwrap();
    let stored = store.load_all().await.unwrap();
    assert_eq!(
        stored,
        *p.state(),
        "stored = folded, pending invoice included"
    );
    assert_eq!(stored.pending.len(), 1, "{:?}", stored.pending);
    assert!(stored.issued.is_empty());
    assert_eq!(
        store
            .positions()
            .await
            .unwrap()
            .into_iter()
            .collect::<Vec<_>>(),
        vec![(0, 0), (1, 2), (2, 0), (3, 1)]
    );
    // A restarted projector decides it once partition 2 is read.
    drop(p);
    let mut p = MeteringProjector::open(store.clone()).await.unwrap();
    // Re-delivered records (before the stored positions) change nothing.
    p.apply_batch(&records[..3]).await.unwrap();
    p.apply_batch(&records[3..]).await.unwrap();
    let stored = store.load_all().await.unwrap();
    assert!(stored.pending.is_empty());
    let oct = Period::parse("2025-10").unwrap();
    let issued = &stored.issued[&("acme".to_string(), oct)];
    assert_eq!(issued.at, tributary_metering::Pos::new(3, 0));
    assert_eq!(
        store.issued("acme", oct).await.unwrap().as_ref(),
        Some(issued)
    );
    assert_eq!(stored.rejected, 0);
    // The same records in another interleaving (each partition in order) decide the same way.
    let mut other = tributary_metering::MeteringState::default();
    for r in [&records[3], &records[1], &records[0], &records[2]] {
        let env = r.decode().unwrap();
        other.apply(tributary_metering::Pos::new(r.partition, r.offset), &env);
    }
    assert_eq!(audit::compare(&stored, &other, None), vec![]);
}

async fn a_standby_writer_waits_until_the_active_one_is_gone(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let (_log, store, _db) = setup(dir.path(), engine).await;
    let stop = CancellationToken::new();
    let active = store.lock_writer(&stop).await.unwrap().expect("the lock");
    let state = {
        let mut s = tributary_metering::MeteringState::tracking();
        s.apply(0, &tick("acme", "b1", 1, day("2025-10-20"), 1_000, true));
        s
    };
    let dirty = state.clone().take_dirty();
    active.commit_batch(&state, &dirty).await.unwrap();
    match engine {
        Engine::Sqlite => {
            // One process per data directory: the lock is the store itself.
            let again = store.lock_writer(&stop).await.unwrap();
            assert!(again.is_some());
        }
        Engine::Postgres => {
            let standby = {
                let store = store.clone();
                let stop = stop.clone();
                tokio::spawn(async move { store.lock_writer(&stop).await })
            };
            tokio::time::sleep(Duration::from_millis(1500)).await;
            assert!(
                !standby.is_finished(),
                "the standby waits while the active one lives"
            );
            active.release_writer().await;
            let standby = tokio::time::timeout(Duration::from_secs(60), standby)
                .await
                .expect("the standby takes over once the lock is free")
                .unwrap()
                .unwrap()
                .expect("locked");
            standby.commit_batch(&state, &dirty).await.unwrap();
            // The old writer's connection is gone: it cannot commit any more.
            assert!(active.commit_batch(&state, &dirty).await.is_err());
            standby.close().await;
        }
    }
}
