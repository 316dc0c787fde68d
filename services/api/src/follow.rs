//! Following one build's events: replay what is on the log, then follow it live, with no gap
//! and no duplicate. `TailLogs` (gRPC) and the web UI's live stream (SSE) both go through
//! [`follow_build`], each mapping events to its own messages.
//!
//! A build lives in two partitions: its state events in `partition_for(Events, build)`, its log
//! chunks in `partition_for(Logs, build)` — the same partition on a log without a separate logs
//! topic (SQLite), two on Kafka. The replay reads the build's records by key from each (state
//! events first), then one subscription follows both right after the last record read, so a
//! record appended in between is seen once. Records re-delivered under the same event id are
//! skipped.
//!
//! # What a tail guarantees
//!
//! * Every state event and every chunk of the build from the start position, exactly once.
//! * State events in log order; the chunks of one job attempt in log order (its agent appends
//!   them in order), so each line's output is in order. On a partitioned log the order of
//!   chunks relative to state events is not kept: each chunk names its job, attempt, step and
//!   line, and readers place it by those.
//! * The stream ends (the mapper's [`Step::Last`], for `BuildFinished`) only after every chunk
//!   of the build appended before `BuildFinished` is delivered. The API appends an agent's
//!   chunks before the state events of the same batch (`SendEvents`), and the scheduler appends
//!   `BuildFinished` after folding every `JobFinished`, so these are all of the build's chunks.
//!   The tail waits for its logs partition to reach the end it had when `BuildFinished` was
//!   seen (on a shared partition: `BuildFinished`'s own offset).
//! * Resumable after any item: the cursor handed to the mapper with each item (the web UI's
//!   SSE id) is where to start again to get exactly the items after it, the end included.
//!   While the end is held for chunks still to come, the cursor's events position stays at
//!   `BuildFinished`, so a resume after one of those chunks reads it again.

use tokio::sync::mpsc;
use tonic::Status;
use tributary_eventlog::{EventLog, Layout, Offset, Partition, Record, Subscription, Topic};
use tributary_proto::events::Envelope;
use tributary_scheduler::seen::SeenIds;

/// What a mapper says about one event.
pub enum Step<T> {
    /// Not for this reader.
    Skip,
    /// Send it and go on.
    Send(T),
    /// Send it last: the stream is complete (the build finished) once the build's chunks are
    /// all delivered.
    Last(T),
}

/// The two partitions of a build: its state events and its log chunks (equal on a log where
/// chunks share the events partitions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BuildPartitions {
    pub events: Partition,
    pub logs: Partition,
}

impl BuildPartitions {
    pub fn of(layout: Layout, build_id: &str) -> Self {
        BuildPartitions {
            events: layout.partition_for(Topic::Events, build_id),
            logs: layout.partition_for(Topic::Logs, build_id),
        }
    }

    /// One partition holds both.
    pub fn shared(&self) -> bool {
        self.events == self.logs
    }
}

/// Where a tail is: the next offset to read in the build's events and logs partitions (equal
/// when they are one partition).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    pub events: Offset,
    pub logs: Offset,
}

impl Cursor {
    /// Both partitions from `offset` (a start on a one-partition log, or 0).
    pub fn at(offset: Offset) -> Cursor {
        Cursor {
            events: offset,
            logs: offset,
        }
    }

    /// Each partition's offset, at least `floor`'s (a resume position never before the
    /// build's start).
    pub fn at_least(self, floor: Cursor) -> Cursor {
        Cursor {
            events: self.events.max(floor.events),
            logs: self.logs.max(floor.logs),
        }
    }

    /// Past `record` of its partition.
    fn advance(&mut self, parts: BuildPartitions, record: &Record) {
        if record.partition == parts.events {
            self.events = self.events.max(record.offset + 1);
        }
        if record.partition == parts.logs {
            self.logs = self.logs.max(record.offset + 1);
        }
    }

    /// A resume token for this position (an SSE id): on a shared partition the last offset
    /// delivered (`N`, as the one-partition log always had), else `E.L`, the next offsets of
    /// both partitions.
    pub fn token(&self, parts: BuildPartitions) -> String {
        if parts.shared() {
            self.events.saturating_sub(1).to_string()
        } else {
            format!("{}.{}", self.events, self.logs)
        }
    }

    /// The position to resume at after the event whose token is `token`; None if it is not one.
    pub fn resume_after(token: &str) -> Option<Cursor> {
        match token.trim().split_once('.') {
            Some((e, l)) => Some(Cursor {
                events: e.parse().ok()?,
                logs: l.parse().ok()?,
            }),
            None => token.trim().parse::<u64>().ok().map(|n| Cursor::at(n + 1)),
        }
    }
}

/// Replays the events of `build_id` from `from`, then (if `follow`) follows the log, sending
/// what `map` returns into `tx`; `map` also gets the cursor just past the event. Returns after
/// the [`Step::Last`] item is sent (see the module docs for when), when the client goes away
/// (`tx` closed), or when the log fails (the error is sent first). Without `follow`, a `Last`
/// item seen in the replay is sent at its end.
pub async fn follow_build<T: Send + 'static>(
    log: &dyn EventLog,
    build_id: &str,
    from: Cursor,
    follow: bool,
    tx: &mpsc::Sender<Result<T, Status>>,
    mut map: impl FnMut(&Record, &Envelope, &Cursor) -> Step<T> + Send,
) {
    let parts = BuildPartitions::of(log.layout(), build_id);
    let mut tail = Tail {
        parts,
        cursor: from,
        seen: SeenIds::new(16_384),
        last: None,
        logs_target: None,
        held_at: None,
    };
    let topics: &[Topic] = if parts.shared() {
        &[Topic::Events]
    } else {
        &[Topic::Events, Topic::Logs]
    };
    for &topic in topics {
        loop {
            let at = match topic {
                Topic::Events => tail.cursor.events,
                Topic::Logs => tail.cursor.logs,
            };
            let records = match log.read_key_in(topic, build_id, at, 4096).await {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.send(Err(Status::unavailable(e.to_string()))).await;
                    return;
                }
            };
            if records.is_empty() {
                break;
            }
            for record in &records {
                if !tail.deliver(log, record, tx, &mut map).await {
                    return;
                }
            }
        }
    }
    if tail.finish_if_complete(tx).await || !follow {
        if let Some(last) = tail.last.take() {
            let _ = tx.send(Ok(last)).await;
        }
        return;
    }
    let mut start = vec![(parts.events, tail.cursor.events)];
    if !parts.shared() {
        start.push((parts.logs, tail.cursor.logs));
    }
    let mut sub = log.subscribe_partitions(&start);
    loop {
        let Some(records) = next_batch(sub.as_mut(), tx).await else {
            return;
        };
        for record in &records {
            if record.key != build_id {
                tail.cursor.advance(parts, record);
                continue;
            }
            if !tail.deliver(log, record, tx, &mut map).await {
                return;
            }
        }
        if tail.finish_if_complete(tx).await {
            return;
        }
    }
}

/// A tail's state between records.
struct Tail<T> {
    parts: BuildPartitions,
    cursor: Cursor,
    seen: SeenIds,
    /// The `Last` item, held until the chunks are all delivered.
    last: Option<T>,
    /// The logs partition's offset to reach before sending `last`.
    logs_target: Option<Offset>,
    /// While `last` is held on a build with two partitions: the offset of its event. The
    /// positions handed to the mapper stay there in the events partition, so a reader resuming
    /// after a chunk delivered meanwhile reads that event again and still gets its end.
    held_at: Option<Offset>,
}

impl<T> Tail<T> {
    /// Maps one record of the build and sends it; false = stop (client gone, log failed).
    async fn deliver(
        &mut self,
        log: &dyn EventLog,
        record: &Record,
        tx: &mpsc::Sender<Result<T, Status>>,
        map: &mut (impl FnMut(&Record, &Envelope, &Cursor) -> Step<T> + Send),
    ) -> bool {
        self.cursor.advance(self.parts, record);
        let Ok(env) = record.decode() else {
            tracing::error!(
                partition = record.partition,
                offset = record.offset,
                "skipping malformed event"
            );
            return true;
        };
        if !self.seen.first_time(&env.event_id) {
            return true;
        }
        let mut cursor = self.cursor;
        if let Some(at) = self.held_at {
            cursor.events = cursor.events.min(at);
        }
        match map(record, &env, &cursor) {
            Step::Skip => true,
            Step::Send(item) => tx.send(Ok(item)).await.is_ok(),
            Step::Last(item) => {
                if self.last.is_some() {
                    return true;
                }
                let target = if self.parts.shared() {
                    record.offset + 1
                } else {
                    match log.end_offsets().await {
                        Ok(ends) => ends.get(self.parts.logs as usize).copied().unwrap_or(0),
                        Err(e) => {
                            let _ = tx.send(Err(Status::unavailable(e.to_string()))).await;
                            return false;
                        }
                    }
                };
                self.last = Some(item);
                self.logs_target = Some(target);
                if !self.parts.shared() {
                    self.held_at = Some(record.offset);
                }
                true
            }
        }
    }

    /// Sends the `Last` item if every chunk before it is delivered; true if it did.
    async fn finish_if_complete(&mut self, tx: &mpsc::Sender<Result<T, Status>>) -> bool {
        let complete = self
            .logs_target
            .is_some_and(|target| self.cursor.logs >= target);
        if !complete {
            return false;
        }
        if let Some(last) = self.last.take() {
            let _ = tx.send(Ok(last)).await;
        }
        true
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_resume_right_after_the_event() {
        let shared = BuildPartitions { events: 0, logs: 0 };
        let split = BuildPartitions { events: 1, logs: 5 };
        let c = Cursor { events: 8, logs: 8 };
        assert_eq!(c.token(shared), "7");
        assert_eq!(Cursor::resume_after("7"), Some(Cursor::at(8)));
        let c = Cursor {
            events: 3,
            logs: 11,
        };
        assert_eq!(c.token(split), "3.11");
        assert_eq!(Cursor::resume_after("3.11"), Some(c));
        assert_eq!(Cursor::resume_after("x"), None);
        assert_eq!(Cursor::resume_after("1.x"), None);
    }
}
