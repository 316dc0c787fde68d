//! Following one build's events: replay what is on the log, then follow it live, with no gap
//! and no duplicate. `TailLogs` (gRPC) and the web UI's live stream (SSE) both go through
//! [`follow_build`], each mapping events to its own messages.
//!
//! The replay reads the build's records by partition key from `from`; the live part subscribes
//! right after the last record the replay returned. A record appended between the two is past
//! that position, so the subscription sees it: nothing is missed, nothing is sent twice.

use tokio::sync::mpsc;
use tonic::Status;
use tributary_eventlog::{EventLog, Record, Subscription};
use tributary_proto::events::Envelope;

/// What a mapper says about one event.
pub enum Step<T> {
    /// Not for this reader.
    Skip,
    /// Send it and go on.
    Send(T),
    /// Send it and stop: the stream is complete (the build finished).
    Last(T),
}

/// Replays the events of `build_id` from offset `from`, then (if `follow`) follows the log,
/// sending what `map` returns into `tx`. Returns when `map` says [`Step::Last`], when the
/// client goes away (`tx` closed), or when the log fails (the error is sent first).
pub async fn follow_build<T: Send + 'static>(
    log: &dyn EventLog,
    build_id: &str,
    from: u64,
    follow: bool,
    tx: &mpsc::Sender<Result<T, Status>>,
    mut map: impl FnMut(&Record, &Envelope) -> Step<T> + Send,
) {
    // Sends one mapped record; false = stop.
    async fn deliver<T>(tx: &mpsc::Sender<Result<T, Status>>, step: Step<T>) -> bool {
        match step {
            Step::Skip => true,
            Step::Send(item) => tx.send(Ok(item)).await.is_ok(),
            Step::Last(item) => {
                let _ = tx.send(Ok(item)).await;
                false
            }
        }
    }
    let mut next = from;
    loop {
        let records = match log.read_key(build_id, next, 4096).await {
            Ok(r) => r,
            Err(e) => {
                let _ = tx.send(Err(Status::unavailable(e.to_string()))).await;
                return;
            }
        };
        let Some(last) = records.last() else { break };
        next = last.offset + 1;
        for record in &records {
            let Ok(env) = record.decode() else { continue };
            if !deliver(tx, map(record, &env)).await {
                return;
            }
        }
    }
    if !follow {
        return;
    }
    let mut sub = log.subscribe(next);
    loop {
        let Some(records) = next_batch(sub.as_mut(), tx).await else {
            return;
        };
        for record in records.iter().filter(|r| r.key == build_id) {
            let Ok(env) = record.decode() else { continue };
            if !deliver(tx, map(record, &env)).await {
                return;
            }
        }
    }
}

/// The subscription's next batch, or None when the log closed or the client went away (so a
/// stream task never outlives its client).
pub async fn next_batch<T>(
    sub: &mut dyn Subscription,
    tx: &mpsc::Sender<Result<T, Status>>,
) -> Option<Vec<Record>> {
    tokio::select! {
        r = sub.next_batch() => r.ok(),
        _ = tx.closed() => None,
    }
}
