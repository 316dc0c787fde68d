//! The builds store and projector against both read-model databases: SQLite (a temporary file)
//! and PostgreSQL (a fresh database per test on the server `scripts/setup-brokers.sh` starts;
//! `TRIBUTARY_TEST_DATABASE_URL` overrides
//! `postgres://tributary:tributary@127.0.0.1:5432/tributary_test`). Same SQL, same migrations
//! run at open, the same exactly-once offset in the rows' transaction.

#[allow(dead_code)] // shared helpers, not all used here
mod common;

use std::future::Future;
use std::sync::Arc;

use tributary_eventlog::{sqlite::SqliteLog, EventLog};
use tributary_projections::store::Engine;
use tributary_projections::{replay, BuildsProjector, BuildsStore, Phase};

/// Runs `scenario` with a fresh SQLite log and a store URL of each engine.
async fn on_both<F, Fut>(scenario: F)
where
    F: Fn(Arc<SqliteLog>, String) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Arc::new(
        SqliteLog::open(&dir.path().join("events.db"))
            .await
            .expect("open log"),
    );
    let sqlite = format!("sqlite://{}?mode=rwc", dir.path().join("rm.db").display());
    scenario(log.clone(), sqlite).await;
    // The PostgreSQL half: skipped (visibly) without the test database, unless engines are
    // required (TRIBUTARY_REQUIRE_ENGINES=1).
    if !tributary_testkit::engine_or_skip(tributary_testkit::Engine::Postgres) {
        return;
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let log = Arc::new(
        SqliteLog::open(&dir.path().join("events.db"))
            .await
            .expect("open log"),
    );
    let db = tributary_testkit::TestDatabase::create().await;
    scenario(log, db.url.clone()).await;
}

async fn append_all(log: &SqliteLog, events: &[tributary_proto::events::Envelope]) {
    for chunk in events.chunks(100) {
        log.append(chunk).await.expect("append");
    }
}

#[tokio::test]
async fn projects_lists_and_replays_on_both_databases() {
    on_both(|log, url| async move {
        let store = BuildsStore::connect(&url).await.expect("connect");
        let engine = store.engine();
        append_all(
            &log,
            &common::interleave(vec![
                common::build_history("b1", 3, false),
                common::build_history("b2", 2, true),
            ]),
        )
        .await;
        let mut p = BuildsProjector::open(store.clone())
            .await
            .expect("projector");
        p.catch_up(log.as_ref()).await.expect("catch up");
        let b1 = store.load_build("b1").await.expect("load").expect("b1");
        assert_eq!(b1.phase, Phase::Failed, "{engine:?}");
        assert_eq!(b1.jobs[0].exit_code, Some(3), "{engine:?}");
        let b2 = store.load_build("b2").await.expect("load").expect("b2");
        assert_eq!(b2.phase, Phase::Succeeded, "{engine:?}");
        assert_eq!(b2.jobs[0].attempt, 2, "{engine:?}");
        let all = store.list_builds(10).await.expect("list");
        assert_eq!(all.len(), 2, "{engine:?}");
        let failed = store
            .list_builds_for(&b1.tenant, Some(&b1.project), Some("failed"), 10)
            .await
            .expect("list_for");
        assert_eq!(
            failed.iter().map(|b| b.id.as_str()).collect::<Vec<_>>(),
            ["b1"],
            "{engine:?}: filter by project and phase"
        );
        let any = store
            .list_builds_for(&b1.tenant, None, None, 10)
            .await
            .expect("list_for");
        assert_eq!(any.len(), 2, "{engine:?}: no filter");
        assert_eq!(
            replay::check(log.as_ref(), &store).await.expect("check"),
            None,
            "{engine:?}"
        );
        assert_eq!(
            store.load_all().await.expect("load_all"),
            replay::fold_log(log.as_ref(), log.end_offset().await.expect("end"))
                .await
                .expect("fold")
                .0,
            "{engine:?}: stored equals replayed"
        );
        store.close().await;
    })
    .await;
}

#[tokio::test]
async fn a_crash_before_commit_applies_nothing_and_reopen_resumes_on_both_databases() {
    on_both(|log, url| async move {
        let store = BuildsStore::connect(&url).await.expect("connect");
        let engine = store.engine();
        let events = common::interleave(vec![
            common::build_history("b1", 3, true),
            common::build_history("b2", 2, false),
        ]);
        append_all(&log, &events).await;
        let records = log.read(0, 100_000).await.expect("read");
        let (first, rest) = records.split_at(records.len() / 3);
        let (second, _) = rest.split_at(rest.len() / 2);
        let mut p = BuildsProjector::open(store.clone())
            .await
            .expect("projector");
        p.apply_batch(first).await.expect("apply");
        p.apply_batch_and_crash(second).await.expect("crash");
        store.close().await;

        // Reopen (the migrations run again, idempotently) and resume from the stored offset.
        let store = BuildsStore::connect(&url).await.expect("reconnect");
        assert_eq!(
            store.next_offset().await.expect("next_offset"),
            first.len() as u64,
            "{engine:?}: nothing of the crashed batch is stored"
        );
        let mut p = BuildsProjector::open(store.clone())
            .await
            .expect("projector");
        p.catch_up(log.as_ref()).await.expect("catch up");
        let b = store.load_build("b1").await.expect("load").expect("b1");
        assert_eq!(
            b.jobs[1].steps[0].lines[0].log_bytes,
            2 * "out 0 of 1.0.0\n".len() as u64,
            "{engine:?}: a double-applied LogChunk would show in this counter"
        );
        assert_eq!(
            replay::check(log.as_ref(), &store).await.expect("check"),
            None,
            "{engine:?}"
        );
        store.close().await;
    })
    .await;
}

#[tokio::test]
async fn replay_check_finds_a_tampered_row_and_rebuild_repairs_it_on_both_databases() {
    on_both(|log, url| async move {
        let store = BuildsStore::connect(&url).await.expect("connect");
        let engine = store.engine();
        append_all(&log, &common::build_history("b1", 2, false)).await;
        let mut p = BuildsProjector::open(store.clone())
            .await
            .expect("projector");
        p.catch_up(log.as_ref()).await.expect("catch up");
        sqlx::query(
            "UPDATE lines SET exit_code = 0 WHERE build_id = 'b1' AND job_idx = 0 \
             AND step_idx = 1 AND idx = 1",
        )
        .execute(store.pool())
        .await
        .expect("tamper");
        let d = replay::check(log.as_ref(), &store)
            .await
            .expect("check")
            .expect("divergence found");
        assert_eq!(d.path, "jobs[0].steps[1].lines[1].exit_code", "{engine:?}");
        replay::rebuild(log.as_ref(), &store)
            .await
            .expect("rebuild");
        assert_eq!(
            replay::check(log.as_ref(), &store).await.expect("check"),
            None,
            "{engine:?}"
        );
        if engine == Engine::Postgres {
            let pg: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations")
                .fetch_one(store.pool())
                .await
                .expect("migrations table");
            assert_eq!(pg, 3, "every migration applied");
        }
        store.close().await;
    })
    .await;
}

/// A read that must see a write waits on the read model's positions as another process's
/// projector commits them: notified through PostgreSQL's LISTEN, read while waited on SQLite.
/// The reader has its own connection pool and never runs the projector.
#[tokio::test]
async fn a_reader_in_another_process_waits_for_the_projectors_commits_on_both_databases() {
    use std::time::{Duration, Instant};
    use tributary_projections::ReadModelPositions;

    on_both(|log, url| async move {
        let reader_store = BuildsStore::connect(&url).await.expect("connect reader");
        let engine = reader_store.engine();
        let positions = ReadModelPositions::of_store(&reader_store, 1)
            .await
            .expect("positions");
        assert_eq!(positions.now(), vec![(0, 0)], "{engine:?}: a fresh store");
        append_all(&log, &common::build_history("b1", 2, true)).await;
        let end = log.end_offset().await.expect("end");
        assert!(!positions.reached(&[(0, end)]), "{engine:?}");

        // The projector: its own pool, as `serve projector` in another process would have.
        let writer_store = BuildsStore::connect(&url).await.expect("connect writer");
        let follower = {
            let log = log.clone();
            tokio::spawn(async move {
                let mut p = BuildsProjector::open(writer_store)
                    .await
                    .expect("projector");
                p.follow(log.as_ref()).await
            })
        };
        let started = Instant::now();
        positions
            .wait(&[(0, end)], Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("{engine:?}: {e}"));
        println!(
            "{engine:?}: the reader saw offset {end} applied {:?} after the projector started",
            started.elapsed()
        );
        // What the positions say is in the store.
        let b1 = reader_store
            .load_build("b1")
            .await
            .expect("load")
            .expect("b1");
        assert_eq!(b1.phase, Phase::Succeeded, "{engine:?}");

        // More appended later: the same reader sees it applied too.
        append_all(&log, &common::build_history("b2", 1, false)).await;
        let end2 = log.end_offset().await.expect("end");
        positions
            .wait(&[(0, end2)], Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("{engine:?}: {e}"));
        assert!(
            reader_store.load_build("b2").await.expect("load").is_some(),
            "{engine:?}"
        );

        // A position nobody will write: a clear error at the deadline, not a hang.
        let err = positions
            .wait(&[(0, end2 + 1000)], Duration::from_millis(300))
            .await
            .expect_err("nothing is appended there");
        let text = err.to_string();
        assert!(
            text.contains(&format!("0:{}", end2 + 1000)) && text.contains("retry"),
            "{engine:?}: {text}"
        );
        follower.abort();
        reader_store.close().await;
    })
    .await;
}
