//! Time travel is exact: for every prefix of a build's events on a real log, the build
//! `history::build_at` folds from the build's own records equals what the projector had
//! stored right after that prefix (the read model `get` showed at that moment).

mod common;

use proptest::prelude::*;
use tributary_eventlog::{sqlite::SqliteLog, EventLog};
use tributary_projections::history::{self, Moment};
use tributary_projections::{BuildsProjector, BuildsStore};
use tributary_proto::events::envelope::Payload;
use tributary_proto::events::JobWaiting;

/// Build `b`'s history with scheduler waiting reasons inserted at `waits` (positions, modulo
/// the history's length), interleaved with `others` other builds.
fn events(
    jobs: usize,
    retry: bool,
    waits: &[usize],
    others: usize,
) -> Vec<tributary_proto::events::Envelope> {
    let mut mine = common::build_history("b", jobs, retry);
    for (i, at) in waits.iter().enumerate() {
        let at = 2 + at % (mine.len() - 2);
        let time_us = mine[at - 1].time_us;
        mine.insert(
            at,
            common::env(
                "b",
                time_us,
                Payload::JobWaiting(JobWaiting {
                    job: "job0".into(),
                    attempt: 1,
                    reason: format!("reason {i}"),
                }),
            ),
        );
    }
    let mut all = vec![mine];
    all.extend((0..others).map(|i| common::build_history(&format!("o{i}"), 1 + i, i % 2 == 1)));
    common::interleave(all)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]
    #[test]
    fn at_every_offset_the_fold_of_the_prefix_equals_the_projected_state(
        jobs in 1usize..4,
        retry in any::<bool>(),
        waits in proptest::collection::vec(0usize..200, 0..4),
        others in 0usize..3,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let log = SqliteLog::open(&dir.path().join("events.db")).await.expect("open log");
            let store = BuildsStore::open(&dir.path().join("readmodels.db")).await.expect("open store");
            let events = events(jobs, retry, &waits, others);
            for chunk in events.chunks(100) {
                log.append(chunk).await.expect("append");
            }
            let records = log.read(0, 100_000).await.unwrap();
            // The build's own records, as `get --at` reads them: by partition key.
            let mine: Vec<_> = log
                .read_key("b", 0, 100_000)
                .await
                .unwrap()
                .iter()
                .map(|r| (r.offset, r.decode().expect("decodes")))
                .collect();
            let mut projector = BuildsProjector::open(store.clone()).await.unwrap();
            let mut checked = 0;
            for (i, record) in records.iter().enumerate() {
                projector.apply_batch(&records[i..=i]).await.unwrap();
                if record.key != "b" {
                    continue;
                }
                let stored = store.load_build("b").await.unwrap().expect("stored");
                let at = history::build_at("b", &mine, Moment::Offset(record.offset)).expect("exists");
                assert_eq!(at.build, stored, "at offset {}", record.offset);
                assert_eq!(at.offset, record.offset);
                // The same moment by time (each build's clock only moves forward here).
                let by_time = history::build_at("b", &mine, Moment::Time(at.time_us)).expect("exists");
                assert_eq!(by_time.build, stored, "at time {}", at.time_us);
                checked += 1;
            }
            assert_eq!(checked, mine.len());
        });
    }
}
