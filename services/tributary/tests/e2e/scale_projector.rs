//! Scale-out projectors: two `tributary serve projector` processes on a 4-partition Kafka
//! events topic (with and without a logs topic) and a PostgreSQL read model, while this test appends the events of many builds
//! through the log API (with duplicates and a garbage record). One projector is killed with
//! SIGKILL mid-run; the other takes over its partitions. At the end the read model equals a
//! fresh replay (`tributary replay --check`) and the fold of the histories without duplicates
//! (every duplicate applied once), and SIGTERM makes the survivor leave its group and exit 0.
//!
//! Needs the broker and PostgreSQL of `scripts/setup-brokers.sh` (`TRIBUTARY_TEST_KAFKA`,
//! `TRIBUTARY_TEST_DATABASE_URL` override them); fails with that message if they are absent.

use crate::common;
use crate::history;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{bin, wait_until_async, Proc};
use tributary_eventlog::kafka::KafkaLog;
use tributary_eventlog::EventLog;
use tributary_projections::{replay, BuildsState, BuildsStore};

fn backend_flags(brokers: &str, prefix: &str, database: &str) -> Vec<String> {
    [
        "--kafka",
        brokers,
        "--kafka-topic-prefix",
        prefix,
        "--database",
        database,
        "--kafka-session-timeout",
        "6",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn projector(flags: &[String], stderr: &Path) -> Proc {
    let child = Command::new(bin())
        .args(["serve", "projector"])
        .args(flags)
        .env("TRIBUTARY_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(stderr).expect("stderr file"))
        .spawn()
        .expect("start tributary serve projector");
    Proc(child)
}

fn replay_cli(flags: &[String], check: bool) -> std::process::Output {
    let mut command = Command::new(bin());
    command.arg("replay").args(flags);
    if check {
        command.arg("--check");
    }
    command.output().expect("run tributary replay")
}

async fn stored_ids_first(store: &BuildsStore) -> (String, usize) {
    let all = store.load_all().await.expect("load");
    let first = all.builds.keys().next().expect("a build").clone();
    (first, all.builds.len())
}

fn log_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Log chunks in the events topic, in their build's partition: the fold counts their bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_projectors_one_killed_equal_a_fresh_replay_with_duplicates_applied_once() {
    tributary_testkit::require!(Kafka, Postgres);
    scenario(0).await;
}

/// Log chunks in a logs topic of their own (the default layout): chunk counters, members of
/// `projector-logs`, count their bytes whatever the interleaving with the state events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_logs_topic_byte_counts_come_from_the_chunk_counters() {
    tributary_testkit::require!(Kafka, Postgres);
    scenario(2).await;
}

async fn scenario(log_partitions: u32) {
    let db = tributary_testkit::TestDatabase::create().await;
    let database = db.url.clone();
    let options = tributary_testkit::kafka_options("scale", 4, log_partitions);
    let (brokers, prefix) = (options.brokers.clone(), options.topic_prefix.clone());
    let log = KafkaLog::connect(options).await.expect("connect to Kafka");
    assert_eq!(log.layout().partitions(), 4 + log_partitions);

    let dir = tempfile::tempdir().expect("tempdir");
    let flags = backend_flags(&brokers, &prefix, &database);
    let (err_a, err_b) = (dir.path().join("a.log"), dir.path().join("b.log"));
    let mut a = projector(&flags, &err_a);
    let mut b = projector(&flags, &err_b);

    // Many builds, interleaved; the first half now, then the kill, then the rest.
    let histories: Vec<_> = (0..40)
        .map(|i| history::build_history(&tributary_proto::new_id(), 2, i % 3 == 0))
        .collect();
    let mut expected = BuildsState::default();
    let events = history::interleave(histories);
    for (offset, event) in events.iter().enumerate() {
        expected.apply(offset as u64, event);
    }
    let half = events.len() / 2;
    let mut appended = 0usize;
    let mut append = |upto: usize| {
        let slice = events[appended..upto].to_vec();
        appended = upto;
        slice
    };
    for chunk in append(half).chunks(50) {
        log.append(chunk).await.expect("append");
        // Duplicates: a producer retry stores an event twice.
        log.append(&chunk[..3]).await.expect("append duplicates");
    }
    log.append_raw("garbage", vec![0xff, 0xff, 0xff, 0x01])
        .await
        .expect("append garbage");

    wait_until_async(
        "both projectors to own partitions",
        Duration::from_secs(120),
        async || {
            log_text(&err_a).contains("partitions assigned")
                && log_text(&err_b).contains("partitions assigned")
        },
    )
    .await;
    let store = BuildsStore::connect(&database)
        .await
        .expect("open the store");
    wait_until_async(
        "the projectors to write some builds",
        Duration::from_secs(120),
        async || !store.list_builds(1).await.expect("list").is_empty(),
    )
    .await;
    a.signal(libc::SIGKILL);
    a.wait_exit(Duration::from_secs(60));

    for chunk in append(events.len()).chunks(50) {
        log.append(chunk).await.expect("append");
        log.append(&chunk[chunk.len() - 2..])
            .await
            .expect("append duplicates");
    }

    let ends = log.end_offsets().await.expect("end offsets");
    wait_until_async(
        "the surviving projector to catch up with every partition",
        Duration::from_secs(180),
        async || {
            let stored = store.next_offsets().await.expect("offsets");
            ends.iter()
                .enumerate()
                .all(|(p, end)| stored.get(&(p as u32)).copied().unwrap_or(0) == *end)
        },
    )
    .await;

    // Equal to a fresh replay, through the CLI ...
    let check = Command::new(bin())
        .arg("replay")
        .args(&flags)
        .arg("--check")
        .output()
        .expect("run tributary replay --check");
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success(),
        "replay --check found a difference: {stdout}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(stdout.contains("match"), "{stdout}");
    // ... and to the histories folded without their duplicates: each applied once.
    let stored = store.load_all().await.expect("load");
    assert_eq!(stored.builds.len(), 40, "every build is in the read model");
    // `last_offset` is an offset in the build's partition on the log, not in `events`.
    let strip = |mut state: BuildsState| {
        for build in state.builds.values_mut() {
            build.last_offset = 0;
        }
        state
    };
    assert_eq!(
        replay::compare(&strip(stored), &strip(expected)),
        None,
        "the read model is the fold of the builds' events, each applied once"
    );
    let logs = log_text(&err_a) + &log_text(&err_b);
    assert!(
        logs.contains("skipping malformed event"),
        "the garbage record was skipped with an error log:\n{logs}"
    );

    // SIGTERM: the survivor leaves its group and exits 0.
    b.signal(libc::SIGTERM);
    let status = b.wait_exit(Duration::from_secs(60));
    assert!(
        status.success(),
        "projector b: {status}\n{}",
        log_text(&err_b)
    );
    assert!(log_text(&err_b).contains("left the group"));

    // Replay at scale: a damaged row is found by --check, and a rebuild (into fresh tables,
    // then swapped in) repairs it.
    let (first_id, _) = stored_ids_first(&store).await;
    sqlx::query("UPDATE builds SET reason = 'tampered' WHERE id = $1")
        .bind(&first_id)
        .execute(store.pool())
        .await
        .expect("tamper");
    let check = replay_cli(&flags, true);
    assert_eq!(
        check.status.code(),
        Some(1),
        "--check must notice the damaged row"
    );
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(out.contains(&first_id) && out.contains("reason"), "{out}");
    let rebuild = replay_cli(&flags, false);
    assert!(
        rebuild.status.success(),
        "replay: {}{}",
        String::from_utf8_lossy(&rebuild.stdout),
        String::from_utf8_lossy(&rebuild.stderr)
    );
    assert!(String::from_utf8_lossy(&rebuild.stdout).contains("fresh tables"));
    let check = replay_cli(&flags, true);
    assert!(
        check.status.success(),
        "after the rebuild: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    let store = BuildsStore::connect(&database)
        .await
        .expect("reopen the store");
    assert_eq!(store.load_all().await.expect("load").builds.len(), 40);

    store.close().await;
    let _ = log.delete_topics().await;
}
