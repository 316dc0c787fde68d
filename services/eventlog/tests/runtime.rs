//! The consumer runtime's suite (`tributary_eventlog::runtime::suite`) on both logs: the
//! embedded SQLite log (one partition) and the real Kafka broker (3 events partitions and a
//! logs topic; the broker from `scripts/setup-brokers.sh`, topics of each test's own, deleted
//! at the end).

use std::sync::Arc;

use tributary_eventlog::kafka::{KafkaLog, KafkaOptions};
use tributary_eventlog::runtime::suite;
use tributary_eventlog::sqlite::SqliteLog;
use tributary_eventlog::EventLog;

macro_rules! suite_tests {
    ($($check:ident),* $(,)?) => {
        mod sqlite {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    let dir = tempfile::tempdir().expect("tempdir");
                    let log = SqliteLog::open(&dir.path().join("events.db")).await.expect("open");
                    suite::$check(Arc::new(log) as Arc<dyn EventLog>).await;
                }
            )*
        }
        mod kafka {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    let options: KafkaOptions = tributary_testkit::kafka_options("runtime", 3, 2);
                    let log = KafkaLog::connect(options.clone()).await.expect("connect to Kafka");
                    suite::$check(Arc::new(log) as Arc<dyn EventLog>).await;
                    if let Ok(log) = KafkaLog::connect(options).await {
                        let _ = log.delete_topics().await;
                    }
                }
            )*
        }
    };
}

suite_tests!(
    catch_up_applies_each_wanted_event_once,
    follow_publishes_what_it_applied,
    starts_from_the_store_and_reapplies_a_failed_batch,
    group_member_starts_from_its_store,
);
