//! The SQLite backend: the conformance suite, a property test of concurrent appenders and
//! subscribers, persistence, and crash safety (a child process killed with SIGKILL while it
//! appends).

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use tempfile::TempDir;
use tributary_eventlog::conformance::{self, collect_until, test_event};
use tributary_eventlog::sqlite::SqliteLog;
use tributary_eventlog::{EventLog, LogError, Offset};
use tributary_proto::events::envelope::Payload;
use tributary_proto::events::{Envelope, LogChunk, Stream};

async fn open(path: &Path) -> Arc<dyn EventLog> {
    Arc::new(SqliteLog::open(path).await.expect("open the log"))
}

fn db_path(dir: &TempDir) -> std::path::PathBuf {
    dir.path().join("events.db")
}

/// One test per conformance check, each on a fresh file.
macro_rules! conformance_tests {
    ($($check:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let dir = tempfile::tempdir().expect("tempdir");
                conformance::$check(open(&db_path(&dir)).await).await;
            }
        )*
    };
}

conformance_tests!(
    append_then_read,
    empty_append_is_a_no_op,
    read_from_middle_and_past_end,
    read_key_returns_only_that_key_in_order,
    topics_route_by_payload,
    subscribe_from_zero_sees_all,
    subscribe_mid_stream_catches_up_then_follows,
    subscriber_waits_for_appends,
    concurrent_appenders_and_subscribers,
    committed_offsets_are_per_group,
    idempotent_reappend,
    malformed_record_is_readable,
    single_partition_methods,
    subscription_closed_when_log_dropped,
    group_member_commits_and_resumes,
    group_members_split_and_hand_over,
);

/// `run_all` itself, as other backends will call it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_all_conformance_checks() {
    let dirs = Arc::new(Mutex::new(Vec::new()));
    conformance::run_all(|| {
        let dirs = dirs.clone();
        async move {
            let dir = tempfile::tempdir().expect("tempdir");
            let log = open(&db_path(&dir)).await;
            dirs.lock().expect("lock").push(dir);
            log
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopen_keeps_events_and_offsets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_path(&dir);
    conformance::reopen_keeps_events_and_offsets(|| open(&path)).await;
}

/// Thousands of events in many batches survive a reopen intact, and the file checks out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_events_persist_across_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_path(&dir);
    let events: Vec<Envelope> = (0..5000)
        .map(|i| test_event(&format!("b{}", i % 7), i))
        .collect();
    {
        let log = SqliteLog::open(&path).await.expect("open");
        for batch in events.chunks(333) {
            log.append(batch).await.expect("append");
        }
        log.close().await;
    }
    let log = SqliteLog::open(&path).await.expect("reopen");
    log.integrity_check().await.expect("integrity");
    assert_eq!(log.end_offset().await.expect("end"), 5000);
    let records = collect_until(log.subscribe(0).as_mut(), 5000, "after reopen").await;
    for (record, event) in records.iter().zip(&events) {
        assert_eq!(
            &record.decode().expect("decode"),
            event,
            "offset {}",
            record.offset
        );
    }
    let b3 = log.read_key("b3", 0, 10_000).await.expect("read_key");
    assert_eq!(
        b3.len(),
        events.iter().filter(|e| e.build_id == "b3").count()
    );
}

/// After `close`, appends, commits, reads and subscriptions report `Closed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_ends_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = SqliteLog::open(&db_path(&dir)).await.expect("open");
    log.append(&[test_event("b", 0)]).await.expect("append");
    let mut sub = log.subscribe(1);
    log.close().await;
    assert!(matches!(
        log.append(&[test_event("b", 1)]).await,
        Err(LogError::Closed)
    ));
    assert!(matches!(log.commit("g", 1).await, Err(LogError::Closed)));
    assert!(matches!(log.read(0, 10).await, Err(LogError::Closed)));
    let next = tokio::time::timeout(Duration::from_secs(10), sub.next_batch()).await;
    assert!(
        matches!(next, Ok(Err(LogError::Closed))),
        "subscription after close: {next:?}"
    );
}

/// A second `SqliteLog` on the same file (standing in for another process) sees the first
/// one's appends: its subscriptions get no watch notification, only the 100 ms poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_opener_follows_by_polling() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_path(&dir);
    let writer = SqliteLog::open(&path).await.expect("open");
    let reader = SqliteLog::open(&path).await.expect("open again");
    let events: Vec<Envelope> = (0..30).map(|i| test_event("b", i)).collect();
    writer.append(&events[..10]).await.expect("append");
    let mut sub = reader.subscribe(0);
    let appender = tokio::spawn(async move {
        for batch in events[10..].chunks(4) {
            tokio::time::sleep(Duration::from_millis(30)).await;
            writer.append(batch).await.expect("append");
        }
        writer
    });
    let records = collect_until(sub.as_mut(), 30, "second opener").await;
    assert_eq!(records.len(), 30);
    let writer = appender.await.expect("appender");
    assert_eq!(reader.end_offset().await.expect("end"), 30);
    assert_eq!(reader.read(25, 10).await.expect("read").len(), 5);
    drop(writer);
}

/// Two writers on one file, appending in turn: each one's subscribers (fed from memory at the
/// head of the log) still get every row in offset order, the other's rows included, and the same
/// bytes a read of the file gives. A retried append (the writer's one-by-one path) too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleaved_writers_and_retries_leave_no_gap_for_subscribers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_path(&dir);
    let a = SqliteLog::open(&path).await.expect("open");
    let b = SqliteLog::open(&path).await.expect("open again");
    let events: Vec<Envelope> = (0..12).map(|i| test_event("b", i)).collect();
    let mut sub = a.subscribe(0);
    a.append(&events[0..3]).await.expect("append");
    assert_eq!(collect_until(sub.as_mut(), 3, "first group").await.len(), 3);
    b.append(&events[3..5])
        .await
        .expect("append by the other writer");
    a.append(&events[5..8]).await.expect("append after it");
    // A retry of events already stored, with new ones: the one-by-one path.
    a.append(&events[6..10]).await.expect("retried append");
    a.append(&events[10..12]).await.expect("append");
    let mut got = collect_until(sub.as_mut(), 9, "the rest").await;
    let mut all = a.read(0, 100).await.expect("read");
    assert_eq!(all.len(), 12);
    let tail = all.split_off(3);
    got.truncate(tail.len());
    let offsets: Vec<Offset> = got.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, (3..12).collect::<Vec<_>>());
    for (seen, stored) in got.iter().zip(&tail) {
        assert_eq!(seen.offset, stored.offset);
        assert_eq!(seen.data, stored.data, "offset {}", seen.offset);
        assert_eq!(seen.key, stored.key);
    }
    // What `b`'s subscribers get (the file only, by polling) is the same.
    let mut sub_b = b.subscribe(0);
    let from_b = collect_until(sub_b.as_mut(), 12, "other opener").await;
    assert_eq!(
        from_b.iter().map(|r| &r.data).collect::<Vec<_>>(),
        a.read(0, 100)
            .await
            .expect("read")
            .iter()
            .map(|r| &r.data)
            .collect::<Vec<_>>()
    );
}

/// Event ids that are not UUIDs are de-duplicated by their text; empty ids are not at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_event_ids() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = SqliteLog::open(&db_path(&dir)).await.expect("open");
    let mut text = test_event("b", 0);
    text.event_id = "retry-me-7".into();
    let mut empty = test_event("b", 1);
    empty.event_id.clear();
    assert_eq!(
        log.append(&[text.clone(), empty.clone()])
            .await
            .expect("append"),
        vec![0, 1]
    );
    assert_eq!(
        log.append(&[text, empty]).await.expect("re-append"),
        vec![0, 2]
    );
    assert_eq!(log.end_offset().await.expect("end"), 3);
}

/// Retries mixed into concurrent fresh appends: the group with the duplicate falls back to
/// per-batch transactions, and every caller still gets the right offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_among_concurrent_appends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log: Arc<dyn EventLog> = open(&db_path(&dir)).await;
    let first: Vec<Envelope> = (0..20).map(|i| test_event("retried", i)).collect();
    assert_eq!(
        log.append(&first).await.expect("append"),
        (0..20).collect::<Vec<_>>()
    );
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let log = log.clone();
        let first = first.clone();
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for round in 0..10u64 {
                if (t + round) % 3 == 0 {
                    let retry = &first[(round as usize)..(round as usize + 5)];
                    let offsets = log.append(retry).await.expect("retry");
                    assert_eq!(
                        offsets,
                        (round..round + 5).collect::<Vec<_>>(),
                        "retried offsets"
                    );
                } else {
                    let batch: Vec<Envelope> = (0..5)
                        .map(|i| test_event(&format!("t{t}"), round * 5 + i))
                        .collect();
                    let offsets = log.append(&batch).await.expect("append");
                    seen.extend(batch.into_iter().zip(offsets));
                }
            }
            seen
        }));
    }
    let mut fresh = 0;
    for task in tasks {
        for (event, offset) in task.await.expect("task") {
            let record = log.read(offset, 1).await.expect("read");
            assert_eq!(
                record[0].decode().expect("decode"),
                event,
                "event at offset {offset}"
            );
            fresh += 1;
        }
    }
    assert_eq!(log.end_offset().await.expect("end"), 20 + fresh);
}

#[tokio::test]
async fn commit_rejects_offsets_beyond_sqlite_integers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = SqliteLog::open(&db_path(&dir)).await.expect("open");
    assert!(matches!(
        log.commit("g", u64::MAX).await,
        Err(LogError::Invalid(_))
    ));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// Random batch sizes from a few concurrent appenders, subscribers starting at random
    /// offsets: every subscriber sees each record from its start exactly once, in order, and
    /// each appender's events are in its own order.
    #[test]
    fn subscribers_see_everything_once_in_order(
        appenders in prop::collection::vec(prop::collection::vec(1usize..40, 1..6), 1..4),
        starts in prop::collection::vec(0.0f64..=1.0, 1..4),
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let dir = tempfile::tempdir().expect("tempdir");
            let log = open(&db_path(&dir)).await;
            let total: usize = appenders.iter().flatten().sum();
            let total = total as Offset;
            let mut subscribers = Vec::new();
            for fraction in starts {
                let start = (fraction * total as f64) as Offset;
                let mut sub = log.subscribe(start);
                subscribers.push(tokio::spawn(async move {
                    (start, collect_until(sub.as_mut(), total, "proptest subscriber").await)
                }));
            }
            let mut tasks = Vec::new();
            for (a, sizes) in appenders.into_iter().enumerate() {
                let log = log.clone();
                tasks.push(tokio::spawn(async move {
                    let key = format!("appender-{a}");
                    let mut seq = 0;
                    for size in sizes {
                        let batch: Vec<Envelope> =
                            (seq..seq + size as u64).map(|s| test_event(&key, s)).collect();
                        seq += size as u64;
                        log.append(&batch).await.expect("append");
                    }
                }));
            }
            for task in tasks {
                task.await.expect("appender");
            }
            let all = log.read(0, usize::MAX).await.expect("read");
            assert_eq!(all.len() as Offset, total);
            let mut next_seq = std::collections::HashMap::new();
            for record in &all {
                let event = record.decode().expect("decode");
                let Some(Payload::LogChunk(chunk)) = event.payload else { panic!("not a chunk") };
                let expected = next_seq.entry(event.build_id).or_insert(0);
                assert_eq!(chunk.offset, *expected, "appender order at offset {}", record.offset);
                *expected += 1;
            }
            for subscriber in subscribers {
                let (start, records) = subscriber.await.expect("subscriber");
                assert_eq!(records.as_slice(), &all[start as usize..], "subscriber from {start}");
            }
        });
    }
}

// ---- Crash safety ----------------------------------------------------------------------------

/// Set (to the database path) in the environment of the child process that appends until killed.
const CRASH_CHILD_DB: &str = "EVENTLOG_CRASH_CHILD_DB";
const CRASH_CHILD_ROUND: &str = "EVENTLOG_CRASH_CHILD_ROUND";
const CRASH_APPENDERS: u64 = 4;

/// The exact envelope appender `appender` of round `round` writes as its event `seq`, so the
/// parent can tell an intact record from a torn or mixed-up one.
fn crash_event(round: u64, appender: u64, seq: u64) -> Envelope {
    let len = 20 + (seq * 37 + appender * 11) % 400;
    let data = (0..len).map(|i| (seq + i * 7 + round * 3) as u8).collect();
    Envelope {
        event_id: format!("{:08x}-0000-7000-8000-{:012x}", round << 8 | appender, seq),
        tenant: "crash".into(),
        project: "test".into(),
        build_id: format!("crash-{round}-{appender}"),
        time_us: seq as i64,
        payload: Some(Payload::LogChunk(LogChunk {
            job: "job".into(),
            attempt: 1,
            step: 0,
            line: 0,
            stream: Stream::Stdout as i32,
            data,
            offset: seq,
            truncated: false,
        })),
    }
}

/// The child half of `crash_safety`, which runs it in a process of its own (this test binary,
/// `--ignored --exact crash_child`): appends batches from a few concurrent tasks until killed,
/// printing `committed <round> <appender> <seq> <offset>` for the last event of every batch
/// once `append` has returned. Not a test: ignored in a normal run, and it fails if started
/// without the parent's variables.
#[test]
#[ignore = "the child process of crash_safety, which starts it"]
fn crash_child() {
    let (Ok(path), Ok(round)) = (
        std::env::var(CRASH_CHILD_DB),
        std::env::var(CRASH_CHILD_ROUND),
    ) else {
        panic!(
            "crash_child is the child process of crash_safety: run crash_safety (it sets \
             {CRASH_CHILD_DB} and {CRASH_CHILD_ROUND})"
        );
    };
    let round: u64 = round.parse().expect("round");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let log = Arc::new(SqliteLog::open(Path::new(&path)).await.expect("child open"));
        let stdout = Arc::new(Mutex::new(std::io::stdout()));
        let mut tasks = Vec::new();
        for appender in 0..CRASH_APPENDERS {
            let log = log.clone();
            let stdout = stdout.clone();
            tasks.push(tokio::spawn(async move {
                let mut seq = 0;
                let started = std::time::Instant::now();
                // Bounded, in case the parent died without killing us.
                while started.elapsed() < Duration::from_secs(60) {
                    let size = 1 + (seq * 7 + appender * 3) % 25;
                    let batch: Vec<Envelope> = (seq..seq + size)
                        .map(|s| crash_event(round, appender, s))
                        .collect();
                    let offsets = log.append(&batch).await.expect("child append");
                    seq += size;
                    let last = offsets.last().copied().expect("offsets");
                    let mut out = stdout.lock().expect("stdout");
                    let line = format!("committed {round} {appender} {} {last}\n", seq - 1);
                    if out
                        .write_all(line.as_bytes())
                        .and_then(|()| out.flush())
                        .is_err()
                    {
                        std::process::exit(0);
                    }
                }
            }));
        }
        for task in tasks {
            task.await.expect("child appender");
        }
    });
}

/// A tiny deterministic generator for the kill timing.
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Kills a child process appending to the log with SIGKILL at random moments, several times on
/// the same file; after each kill, every append the child saw succeed is there, intact, and the
/// offsets are contiguous from 0 with nothing torn.
#[test]
fn crash_safety() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    let mut rng = XorShift(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_path(&dir);
    let exe = std::env::current_exe().expect("current_exe");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    let mut reported: Vec<(u64, u64, u64, Offset)> = Vec::new();
    for round in 0..6u64 {
        let mut child = Command::new(&exe)
            .args([
                "crash_child",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CRASH_CHILD_DB, &path)
            .env(CRASH_CHILD_ROUND, round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the crash child");
        let stdout = child.stdout.take().expect("child stdout");
        let (lines_tx, lines) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let parse = |line: &str| -> Option<(u64, u64, u64, Offset)> {
            let mut fields = line
                .strip_prefix("committed ")?
                .split(' ')
                .map(|f| f.parse().ok());
            Some((
                fields.next()??,
                fields.next()??,
                fields.next()??,
                fields.next()??,
            ))
        };
        let wanted = 100 + rng.below(300);
        let mut commits = 0;
        while commits < wanted {
            let line = lines
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| {
                    panic!("round {round}: the child stopped reporting (seed {seed})")
                });
            if let Some(commit) = parse(&line) {
                reported.push(commit);
                commits += 1;
            }
        }
        std::thread::sleep(Duration::from_micros(rng.below(5000)));
        child.kill().expect("SIGKILL the child");
        child.wait().expect("reap the child");
        // Whatever else the child reported before it died was committed too.
        let _ = reader.join();
        reported.extend(lines.try_iter().filter_map(|line| parse(&line)));

        runtime.block_on(verify_after_crash(&path, round, &reported, seed));
    }
}

async fn verify_after_crash(
    path: &Path,
    round: u64,
    reported: &[(u64, u64, u64, Offset)],
    seed: u64,
) {
    let log = SqliteLog::open(path).await.expect("reopen after the crash");
    log.integrity_check()
        .await
        .expect("integrity check after the crash");
    let end = log.end_offset().await.expect("end_offset");
    let records = log.read(0, usize::MAX).await.expect("read all");
    assert_eq!(
        records.len() as Offset,
        end,
        "round {round}: record count (seed {seed})"
    );
    let mut next_seq = std::collections::HashMap::new();
    for (i, record) in records.iter().enumerate() {
        assert_eq!(
            record.offset, i as Offset,
            "round {round}: offsets not contiguous"
        );
        let event = record
            .decode()
            .unwrap_or_else(|e| panic!("round {round}: torn record at {i}: {e} (seed {seed})"));
        let Some(Payload::LogChunk(chunk)) = &event.payload else {
            panic!("round {round}: record {i} is not a log chunk (seed {seed})")
        };
        let (r, a) = event
            .build_id
            .strip_prefix("crash-")
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(r, a)| Some((r.parse::<u64>().ok()?, a.parse::<u64>().ok()?)))
            .unwrap_or_else(|| panic!("round {round}: record {i} has key {:?}", event.build_id));
        assert_eq!(
            event,
            crash_event(r, a, chunk.offset),
            "round {round}: record {i} is not the event it claims to be (seed {seed})"
        );
        let expected = next_seq.entry((r, a)).or_insert(0);
        assert_eq!(
            chunk.offset, *expected,
            "round {round}: appender {r}/{a} lost or repeated an event at offset {i} (seed {seed})"
        );
        *expected += 1;
    }
    for &(r, a, seq, offset) in reported {
        let record = records.get(offset as usize).unwrap_or_else(|| {
            panic!("round {round}: committed offset {offset} is gone (end {end}, seed {seed})")
        });
        assert_eq!(
            record.decode().expect("decode"),
            crash_event(r, a, seq),
            "round {round}: committed event {r}/{a}/{seq} is not at offset {offset} (seed {seed})"
        );
    }
    log.close().await;
}

/// A disk that fills: the append that does not fit fails with an error naming the file and the
/// cause; the writer stays usable (a COMMIT that fails for want of space leaves SQLite's
/// transaction open: it is rolled back and the connection replaced), so once space is freed
/// appends carry on by themselves; nothing committed before is lost or damaged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_appends_clearly_and_the_log_carries_on_once_space_is_freed() {
    tributary_testkit::require!(SmallFs);
    let fs = tributary_testkit::SmallFs::mount(8).expect("mount a small tmpfs");
    let path = fs.path().join("events.db");
    let log = SqliteLog::open(&path).await.expect("open");
    // 4 MB of something else on the disk, deleted later to make room.
    let ballast = fs.path().join("ballast");
    std::fs::write(&ballast, vec![0u8; 4 << 20]).expect("ballast");
    let big = |i: usize| {
        Envelope::new(
            "t",
            "p",
            "b",
            Payload::LogChunk(LogChunk {
                job: "j".into(),
                attempt: 1,
                stream: Stream::Stdout as i32,
                data: vec![b'x' + (i % 3) as u8; 256 * 1024],
                ..LogChunk::default()
            }),
        )
    };
    // Fill the disk with the log itself until an append fails.
    let mut stored = Vec::new();
    let mut failure = None;
    for i in 0..200 {
        let e = big(i);
        match log.append(std::slice::from_ref(&e)).await {
            Ok(offsets) => stored.push((offsets[0], e)),
            Err(error) => {
                failure = Some(error);
                break;
            }
        }
    }
    let failure = failure.expect("an 8 MB disk cannot hold 50 MB of chunks");
    let probe = log.probe(Duration::from_secs(1)).await;
    assert!(
        probe
            .as_ref()
            .is_err_and(|e| e.to_string().contains("full")),
        "not ready while full (/readyz): {probe:?}"
    );
    let text = failure.to_string();
    assert!(
        text.contains("full") && text.contains(&path.display().to_string()),
        "the error names the file and the cause: {text}"
    );
    assert!(stored.len() > 3, "some appends fit first: {}", stored.len());
    // Another big one while full: fails again, and must not wedge the writer either.
    assert!(log.append(std::slice::from_ref(&big(7))).await.is_err());
    let small = test_event("b", 1);
    // Free space (the ballast an operator deletes): the log carries on by itself.
    std::fs::remove_file(&ballast).expect("remove the ballast");
    let after = log
        .append(std::slice::from_ref(&small))
        .await
        .expect("appends resume once there is space");
    assert!(after[0] >= stored.last().map_or(0, |(o, _)| *o + 1));
    log.probe(Duration::from_secs(1))
        .await
        .expect("ready again once an append went through");
    // Everything stored before is intact and readable.
    let records = log.read(0, 10_000).await.expect("read");
    for (offset, e) in &stored {
        let r = records
            .iter()
            .find(|r| r.offset == *offset)
            .unwrap_or_else(|| panic!("offset {offset} lost"));
        assert_eq!(r.decode().expect("decode").event_id, e.event_id);
    }
    log.integrity_check().await.expect("integrity");
}
