//! What reading one build costs on Kafka, which has no index by key: a late build's tail
//! (`TailLogs`), its raw log (`/ui/builds/{id}/log.txt`) and its live page stream with
//! `tail=` read only the build's own records, not the thousands of earlier records of its
//! partitions, because they start where the API's index says the build starts (its
//! `BuildTriggered` offset; for chunks `BuildTriggered.logs_from`). Counted with
//! `KafkaLog::records_read`, not timed.
//!
//! One events partition and one logs partition, so every build shares them (the worst case
//! for a scan). The broker comes from `scripts/setup-brokers.sh` (127.0.0.1:19092); set
//! `TRIBUTARY_TEST_KAFKA` to use another.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request as HttpRequest, StatusCode};
use futures::StreamExt;
use tower::ServiceExt;
use tributary_api::builds::BuildsApi;
use tributary_api::ApiState;
use tributary_eventlog::kafka::KafkaLog;
use tributary_eventlog::{EventLog, Topic};
use tributary_proto::api::builds_server::Builds;
use tributary_proto::api::TailLogsRequest;
use tributary_proto::events::{
    envelope::Payload, BuildFinished, BuildTriggered, Envelope, LogChunk, Status,
};

/// A build's events as the API and agents append them: trigger (with where its chunks start),
/// `chunks` chunks, finish.
fn build_events(tenant: &str, build: &str, logs_from: u64, chunks: usize) -> Vec<Envelope> {
    let e = |p| Envelope::new(tenant, "p", build, p);
    let mut events = vec![e(Payload::BuildTriggered(BuildTriggered {
        who: "t".into(),
        logs_from,
        ..BuildTriggered::default()
    }))];
    for i in 0..chunks {
        events.push(e(Payload::LogChunk(LogChunk {
            job: "j".into(),
            attempt: 1,
            data: format!("{build} line {i}\n").into_bytes(),
            ..LogChunk::default()
        })));
    }
    events.push(e(Payload::BuildFinished(BuildFinished {
        status: Status::Succeeded as i32,
        ..BuildFinished::default()
    })));
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_a_late_build_reads_only_its_own_records() {
    tributary_testkit::require!(Kafka);
    let options = tributary_testkit::kafka_options("tailcost", 1, 1);
    let kafka = Arc::new(KafkaLog::connect(options).await.expect("connect"));
    let log: Arc<dyn EventLog> = kafka.clone();
    let result = std::panic::AssertUnwindSafe(run(kafka.clone(), log));
    let outcome = futures::FutureExt::catch_unwind(result).await;
    kafka.delete_topics().await.expect("delete the test topics");
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn run(kafka: Arc<KafkaLog>, log: Arc<dyn EventLog>) {
    let (token, sha256) = tributary_api::auth::new_token();
    log.append(&tributary_testkit::tenant_with_admin_token("acme", sha256))
        .await
        .expect("append the tenant");
    // Earlier builds: 150 of them, 20 chunks each, all in the same two partitions.
    let mut earlier = Vec::new();
    for _ in 0..150 {
        earlier.extend(build_events("acme", &tributary_proto::new_id(), 0, 20));
    }
    log.append(&earlier).await.expect("append earlier builds");

    let dir = tempfile::tempdir().expect("temp dir");
    let store = tributary_projections::BuildsStore::open(&dir.path().join("rm.db"))
        .await
        .expect("store");
    let mirrors = tributary_repo::Mirrors::new(dir.path().join("mirrors"));
    let state = ApiState::start(log.clone(), store, mirrors, None)
        .await
        .expect("API state");

    // The late build, triggered as `builds::trigger` does: its chunks start at the logs
    // partition's end now.
    let late = tributary_proto::new_id();
    let logs = log.layout().partition_for(Topic::Logs, &late);
    let ends = log.end_offsets().await.expect("ends");
    let events = build_events("acme", &late, ends[logs as usize], 30);
    let own = events.len() as u64;
    log.append(&events).await.expect("append the late build");
    let total: u64 = log.end_offsets().await.expect("ends").iter().sum();
    assert!(total > 3000, "the partitions hold {total} records");

    // TailLogs, through the real handler.
    let before = kafka.records_read();
    let mut request = tonic::Request::new(TailLogsRequest {
        build_id: late.clone(),
        follow: true,
        ..TailLogsRequest::default()
    });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    let stream = BuildsApi::new(state.clone())
        .tail_logs(request)
        .await
        .expect("tail")
        .into_inner();
    let lines: Vec<_> = tokio::time::timeout(Duration::from_secs(120), stream.collect::<Vec<_>>())
        .await
        .expect("the tail ends");
    let lines: Vec<_> = lines.into_iter().map(|l| l.expect("no error")).collect();
    assert_eq!(lines.len(), 31, "30 chunks and the end");
    assert_eq!(
        lines.last().map(|l| l.build_status.as_str()),
        Some("succeeded")
    );
    for (i, line) in lines[..30].iter().enumerate() {
        assert_eq!(line.data, format!("{late} line {i}\n").into_bytes());
    }
    let read = kafka.records_read() - before;
    assert!(
        read <= own,
        "the tail read {read} records; the build has {own} (the partitions {total})"
    );

    // The raw log and the live stream with `tail=`, through the web router.
    let router = tributary_api::web::router(state.clone(), None);
    for uri in [
        format!("/ui/builds/{late}/log.txt"),
        format!("/ui/builds/{late}/events?tail=100"),
    ] {
        let before = kafka.records_read();
        let response = router
            .clone()
            .oneshot(
                HttpRequest::get(&uri)
                    .header("authorization", format!("Bearer {token}"))
                    .body(Body::empty())
                    .expect("request"),
            )
            .await
            .expect("response");
        assert_eq!(response.status(), StatusCode::OK, "{uri}");
        let body = tokio::time::timeout(
            Duration::from_secs(120),
            axum::body::to_bytes(response.into_body(), usize::MAX),
        )
        .await
        .expect("the body ends")
        .expect("body");
        let text = String::from_utf8_lossy(&body);
        assert!(text.contains(&format!("{late} line 29")), "{uri}: {text}");
        let read = kafka.records_read() - before;
        // `tail=` first scans the build's chunks, then replays from the tail's start.
        assert!(
            read <= 2 * own,
            "{uri} read {read} records; the build has {own} (the partitions {total})"
        );
    }
}
