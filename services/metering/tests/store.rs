//! The metering projection, service and audit against a real SQLite log and a real SQLite
//! read-model database.

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio_util::sync::CancellationToken;
use tributary_eventlog::{sqlite::SqliteLog, EventLog};
use tributary_metering::audit;
use tributary_metering::calendar::{Day, Period};
use tributary_metering::invoice::ADJUSTMENT;
use tributary_metering::service::{self, ServiceConfig};
use tributary_metering::{MeteringProjector, MeteringStore, PricePlan};
use tributary_proto::events::{envelope::Payload, Envelope, UsageTick};

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

async fn setup(dir: &std::path::Path) -> (Arc<SqliteLog>, MeteringStore) {
    let log = SqliteLog::open(&dir.join("events.db")).await.unwrap();
    let store = MeteringStore::open(&dir.join("metering.db")).await.unwrap();
    (Arc::new(log), store)
}

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

#[tokio::test]
async fn projector_persists_restarts_and_never_double_counts() {
    let dir = tempfile::tempdir().unwrap();
    let (log, store) = setup(dir.path()).await;
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

#[tokio::test]
async fn audit_finds_a_tampered_row_and_names_its_offset() {
    let dir = tempfile::tempdir().unwrap();
    let (log, store) = setup(dir.path()).await;
    log.append(&interleaved()).await.unwrap();
    let mut p = MeteringProjector::open(store.clone()).await.unwrap();
    p.catch_up(log.as_ref()).await.unwrap();
    let (stored, end) = store.load_all().await.unwrap();
    let replayed = audit::replay(log.clone(), end).await.unwrap();
    assert!(audit::compare(&stored, &replayed, None).is_empty());

    sqlx::query("UPDATE usage_daily SET millis = millis - 1000 WHERE tenant = 'globex'")
        .execute(store.pool())
        .await
        .unwrap();
    let (stored, end) = store.load_all().await.unwrap();
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
    assert_eq!(diffs[0].offset, last_globex);
    assert!(audit::compare(&stored, &replayed, Some("acme")).is_empty());
    let _ = end;
}

/// Waits until the store's invoices satisfy `f`.
async fn wait_for<F: Fn(&tributary_metering::MeteringState) -> bool>(
    store: &MeteringStore,
    what: &str,
    f: F,
) -> tributary_metering::MeteringState {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (state, _) = store.load_all().await.unwrap();
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

#[tokio::test]
async fn the_service_issues_closed_months_and_late_ticks_go_to_the_next_invoice() {
    let dir = tempfile::tempdir().unwrap();
    let (log, store) = setup(dir.path()).await;
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
    let (stored, end) = store.load_all().await.unwrap();
    let replayed = audit::replay(log.clone(), end).await.unwrap();
    assert!(audit::compare(&stored, &replayed, None).is_empty());
    assert_eq!(replayed.issued.len(), 2);
}
