//! The pump: order, batching, re-sends, fencing, giving up.

use std::collections::VecDeque;
use std::sync::Mutex;

use async_trait::async_trait;
use tokio::sync::oneshot;
use tributary_proto::events::LogChunk;

use super::*;

/// Records every call; answers from a script (then `Ok`, or `otherwise`).
#[derive(Default)]
struct Fake {
    calls: Mutex<Vec<Vec<Envelope>>>,
    script: Mutex<VecDeque<Result<(), SinkError>>>,
    otherwise: Option<SinkError>,
    /// The first call waits for this.
    hold_first: Mutex<Option<oneshot::Receiver<()>>>,
}

impl Fake {
    fn scripted(script: Vec<Result<(), SinkError>>) -> Arc<Self> {
        Arc::new(Fake {
            script: Mutex::new(script.into()),
            ..Fake::default()
        })
    }

    fn calls(&self) -> Vec<Vec<Envelope>> {
        self.calls.lock().unwrap().clone()
    }
}

#[async_trait]
impl EventSink for Fake {
    async fn send(&self, batch: Vec<Envelope>) -> Result<(), SinkError> {
        let hold = self.hold_first.lock().unwrap().take();
        if let Some(rx) = hold {
            let _ = rx.await;
        }
        self.calls.lock().unwrap().push(batch);
        if let Some(r) = self.script.lock().unwrap().pop_front() {
            return r;
        }
        match &self.otherwise {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }
}

fn build() -> BuildRef {
    BuildRef {
        tenant: "acme".into(),
        project: "web".into(),
        build_id: "b1".into(),
    }
}

fn payload(i: usize) -> Payload {
    Payload::LogChunk(LogChunk {
        job: "j".into(),
        offset: i as u64,
        data: format!("line {i}\n").into_bytes(),
        ..Default::default()
    })
}

fn index(e: &Envelope) -> u64 {
    match &e.payload {
        Some(Payload::LogChunk(c)) => c.offset,
        other => panic!("unexpected {other:?}"),
    }
}

fn control() -> PumpControl {
    PumpControl {
        fence: CancellationToken::new(),
        abandon: CancellationToken::new(),
        retry: BackoffPolicy {
            min: Duration::from_millis(1),
            max: Duration::from_millis(4),
        },
    }
}

/// A channel holding `n` events already (so the first batch takes them all, up to MAX_BATCH).
async fn queued(n: usize) -> (mpsc::Sender<Payload>, mpsc::Receiver<Payload>) {
    let (tx, rx) = mpsc::channel(QUEUE);
    for i in 0..n {
        tx.send(payload(i)).await.unwrap();
    }
    (tx, rx)
}

#[tokio::test]
async fn events_arrive_in_order_and_queue_up_while_a_send_is_in_flight() {
    let (release, held) = oneshot::channel();
    let sink = Arc::new(Fake {
        hold_first: Mutex::new(Some(held)),
        ..Fake::default()
    });
    let (tx, rx) = mpsc::channel(QUEUE);
    let pump = tokio::spawn(pump(sink.clone(), build(), rx, control()));
    tx.send(payload(0)).await.unwrap();
    // Let the pump take event 0 and block in the first send, then queue 500 more.
    while sink.hold_first.lock().unwrap().is_some() {
        tokio::task::yield_now().await;
    }
    for i in 1..=500 {
        tx.send(payload(i)).await.unwrap();
    }
    release.send(()).unwrap();
    drop(tx);
    let report = pump.await.unwrap();

    let calls = sink.calls();
    assert_eq!(
        calls[0].len(),
        1,
        "the first send carries what was queued then"
    );
    assert_eq!(
        calls[1].len(),
        MAX_BATCH,
        "what queued up during a send goes out together"
    );
    let all: Vec<u64> = calls.iter().flatten().map(index).collect();
    assert_eq!(
        all,
        (0..=500).collect::<Vec<u64>>(),
        "in order, none lost or repeated"
    );
    for e in calls.iter().flatten() {
        assert_eq!(
            (e.tenant.as_str(), e.project.as_str(), e.build_id.as_str()),
            ("acme", "web", "b1")
        );
    }
    let mut ids: Vec<&str> = calls
        .iter()
        .flatten()
        .map(|e| e.event_id.as_str())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 501, "every event has its own id");
    assert_eq!(
        report,
        AttemptReport {
            delivered: 501,
            ..AttemptReport::default()
        }
    );
}

#[tokio::test]
async fn unavailable_batches_are_resent_unchanged_then_the_rest_follows() {
    let sink = Fake::scripted(vec![
        Err(SinkError::Unavailable("down".into())),
        Err(SinkError::Unavailable("still down".into())),
    ]);
    let (tx, rx) = queued(MAX_BATCH + 3).await;
    drop(tx);
    let report = pump(sink.clone(), build(), rx, control()).await;
    let calls = sink.calls();
    assert_eq!(calls.len(), 4);
    assert_eq!(calls[0], calls[1], "same envelopes, same ids");
    assert_eq!(calls[1], calls[2]);
    assert_eq!(calls[2].len(), MAX_BATCH);
    assert_eq!(calls[3].len(), 3);
    assert_eq!(index(&calls[3][0]), MAX_BATCH as u64);
    assert_eq!(report.delivered, MAX_BATCH + 3);
    assert_eq!(report.dropped, 0);
    assert!(!report.fenced);
}

#[tokio::test]
async fn fenced_stops_the_job_and_drops_everything_after() {
    let sink = Fake::scripted(vec![Ok(()), Err(SinkError::Fenced("lease gone".into()))]);
    let ctl = control();
    let fence = ctl.fence.clone();
    let (tx, rx) = queued(MAX_BATCH + 10).await;
    let pump = tokio::spawn(pump(sink.clone(), build(), rx, ctl));
    fence.cancelled().await;
    // The executor keeps producing until it notices; nothing more is sent.
    for i in 0..2000 {
        tx.send(payload(i)).await.unwrap();
    }
    drop(tx);
    let report = pump.await.unwrap();
    assert_eq!(sink.calls().len(), 2);
    assert!(report.fenced);
    assert_eq!(report.delivered, MAX_BATCH);
    assert_eq!(report.dropped, 10 + 2000);
}

#[tokio::test]
async fn a_refused_batch_is_dropped_and_later_ones_still_go() {
    let sink = Fake::scripted(vec![Err(SinkError::Failed("bad".into()))]);
    let (tx, rx) = queued(MAX_BATCH + 5).await;
    drop(tx);
    let report = pump(sink.clone(), build(), rx, control()).await;
    assert_eq!(sink.calls().len(), 2);
    assert_eq!(report.dropped, MAX_BATCH);
    assert_eq!(report.delivered, 5);
    assert!(!report.fenced);
}

#[tokio::test]
async fn abandon_stops_resending() {
    let sink = Arc::new(Fake {
        otherwise: Some(SinkError::Unavailable("gone".into())),
        ..Fake::default()
    });
    let ctl = control();
    let abandon = ctl.abandon.clone();
    let (tx, rx) = queued(MAX_BATCH + 1).await;
    let pump = tokio::spawn(pump(sink.clone(), build(), rx, ctl));
    tokio::time::sleep(Duration::from_millis(50)).await;
    abandon.cancel();
    tx.send(payload(9999)).await.unwrap();
    drop(tx);
    let report = tokio::time::timeout(Duration::from_secs(5), pump)
        .await
        .expect("the pump must end once abandoned")
        .unwrap();
    assert!(sink.calls().len() > 2, "it kept re-sending until abandoned");
    assert_eq!(report.delivered, 0);
    assert_eq!(report.dropped, MAX_BATCH + 2);
}

#[test]
fn sanitize_makes_one_safe_path_component() {
    assert_eq!(sanitize("test[os=linux]"), "test_os_linux_");
    assert_eq!(sanitize("../.."), "_____");
    assert_eq!(sanitize(""), "_");
    assert_eq!(sanitize("0190-abc_D"), "0190-abc_D");
}
