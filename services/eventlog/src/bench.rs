//! Throughput benchmark of an [`EventLog`] backend (the `tributary bench log` command).
//!
//! [`bench_log`] appends realistic build events (mostly ~100-byte log chunks, some line exits,
//! spread over a few builds) in batches from [`APPENDERS`] concurrent producers (like agents
//! streaming the logs of running jobs; concurrent batches share commits), then catches up on all
//! of them through a subscription from the first one, once without and once with decoding each
//! envelope. [`bench_log_with`] sets the number of producers. On a partitioned log (Kafka) the
//! subscription reads every partition at once, so the figures compare with the embedded log's.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tributary_proto::events::envelope::Payload;
use tributary_proto::events::{Envelope, LineExited, LogChunk, Stream};

use crate::{EventLog, LogError, Offset, Partition};

/// Concurrent producers during the append phase of [`bench_log`].
pub const APPENDERS: usize = 16;
/// Builds the events are spread over.
const BUILDS: u64 = 16;

/// What [`bench_log`] measured.
#[derive(Clone, Debug, Default)]
pub struct BenchReport {
    /// Events appended (and read back, unless `error` is set).
    pub events: u64,
    /// Events per append call.
    pub batch: usize,
    /// Concurrent producers.
    pub appenders: usize,
    /// Total size of the encoded envelopes (as read back).
    pub bytes: u64,
    pub append_secs: f64,
    pub append_events_per_sec: f64,
    /// Catch-up read through a subscription, records not decoded.
    pub read_secs: f64,
    pub read_events_per_sec: f64,
    /// Catch-up read through a subscription, every envelope decoded.
    pub read_decode_secs: f64,
    pub read_decode_events_per_sec: f64,
    /// Records that failed to decode in the decoding pass (0 unless the log holds garbage).
    pub malformed: u64,
    /// Set if the benchmark stopped on an error; the figures before it stay valid.
    pub error: Option<String>,
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = |secs: f64| {
            if secs > 0.0 {
                self.bytes as f64 / secs / (1024.0 * 1024.0)
            } else {
                0.0
            }
        };
        writeln!(
            f,
            "event log benchmark: {} events ({:.1} MiB encoded, {} B/event), batches of {}, {} appenders",
            self.events,
            self.bytes as f64 / (1024.0 * 1024.0),
            self.bytes.checked_div(self.events).unwrap_or(0),
            self.batch,
            self.appenders,
        )?;
        let rows = [
            ("append", self.append_events_per_sec, self.append_secs),
            ("catch-up read", self.read_events_per_sec, self.read_secs),
            (
                "read + decode",
                self.read_decode_events_per_sec,
                self.read_decode_secs,
            ),
        ];
        for (name, rate, secs) in rows {
            writeln!(
                f,
                "  {name:<14} {rate:>12.0} events/s {:>8.1} MiB/s {secs:>8.2} s",
                mib(secs)
            )?;
        }
        if self.malformed > 0 {
            writeln!(f, "  malformed records: {}", self.malformed)?;
        }
        if let Some(error) = &self.error {
            writeln!(f, "  stopped on error: {error}")?;
        }
        Ok(())
    }
}

/// Appends `events` events in batches of `batch` to `log` from [`APPENDERS`] concurrent
/// producers, then reads them back; see the [module docs](self). Errors do not panic: they end
/// the run and are reported in [`BenchReport::error`].
pub async fn bench_log(log: Arc<dyn EventLog>, events: u64, batch: usize) -> BenchReport {
    bench_log_with(log, events, batch, APPENDERS).await
}

/// [`bench_log`] with `appenders` concurrent producers.
pub async fn bench_log_with(
    log: Arc<dyn EventLog>,
    events: u64,
    batch: usize,
    appenders: usize,
) -> BenchReport {
    let batch = batch.max(1);
    let appenders = appenders.max(1);
    let mut report = BenchReport {
        events,
        batch,
        appenders,
        ..BenchReport::default()
    };
    if let Err(error) = run(&log, &mut report).await {
        report.error = Some(error.to_string());
    }
    report
}

async fn run(log: &Arc<dyn EventLog>, report: &mut BenchReport) -> Result<(), LogError> {
    let events = report.events;
    let batch = report.batch as u64;
    let layout = log.layout();
    let starts: Vec<(Partition, Offset)> = layout.all().zip(log.end_offsets().await?).collect();
    let builds: Arc<Vec<String>> =
        Arc::new((0..BUILDS).map(|_| tributary_proto::new_id()).collect());

    let next_batch = Arc::new(AtomicU64::new(0));
    let batches = events.div_ceil(batch);
    let began = Instant::now();
    let mut producers = Vec::new();
    for _ in 0..report.appenders {
        let log = log.clone();
        let next_batch = next_batch.clone();
        let builds = builds.clone();
        producers.push(tokio::spawn(async move {
            loop {
                let b = next_batch.fetch_add(1, Ordering::Relaxed);
                if b >= batches {
                    return Ok::<(), LogError>(());
                }
                let seqs = b * batch..((b + 1) * batch).min(events);
                // One clock reading and one random UUID v7 per batch: the ids of its events are
                // that UUID with the sequence number in its last 48 bits (still unique v7 ids),
                // so that making up events costs the benchmark little next to the log.
                let base = *uuid::Uuid::now_v7().as_bytes();
                let time_us = tributary_proto::now_us();
                let envelopes: Vec<Envelope> = seqs
                    .map(|seq| bench_event(&builds, seq, base, time_us))
                    .collect();
                log.append(&envelopes).await?;
            }
        }));
    }
    for producer in producers {
        producer
            .await
            .map_err(|e| LogError::Invalid(format!("benchmark producer panicked: {e}")))??;
    }
    report.append_secs = began.elapsed().as_secs_f64();
    report.append_events_per_sec = rate(events, report.append_secs);
    // Nobody else appends to a benchmark's log: its ends now are where the events stop.
    let ends = log.end_offsets().await?;

    let began = Instant::now();
    let mut bytes = 0;
    catch_up(log, &starts, &ends, |record| {
        bytes += record.data.len() as u64
    })
    .await?;
    report.bytes = bytes;
    report.read_secs = began.elapsed().as_secs_f64();
    report.read_events_per_sec = rate(events, report.read_secs);

    let began = Instant::now();
    let mut malformed = 0;
    catch_up(log, &starts, &ends, |record| match record.decode() {
        Ok(envelope) => {
            std::hint::black_box(envelope);
        }
        Err(_) => malformed += 1,
    })
    .await?;
    report.read_decode_secs = began.elapsed().as_secs_f64();
    report.read_decode_events_per_sec = rate(events, report.read_decode_secs);
    report.malformed = malformed;
    Ok(())
}

/// Reads every partition `p` from `starts[p]` up to `ends[p]` through one subscription, calling
/// `each` on every record.
async fn catch_up(
    log: &Arc<dyn EventLog>,
    starts: &[(Partition, Offset)],
    ends: &[Offset],
    mut each: impl FnMut(&crate::Record),
) -> Result<(), LogError> {
    let mut sub = log.subscribe_partitions(starts);
    let behind = |positions: Vec<(Partition, Offset)>| {
        positions
            .iter()
            .any(|(p, next)| *next < ends.get(*p as usize).copied().unwrap_or(0))
    };
    while behind(sub.positions()) {
        for record in sub.next_batch().await? {
            if record.offset < ends.get(record.partition as usize).copied().unwrap_or(0) {
                each(&record);
            }
        }
    }
    Ok(())
}

fn rate(events: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        events as f64 / secs
    } else {
        0.0
    }
}

/// Event `seq` of the benchmark: nine ~100-byte log chunks for every line exit.
fn bench_event(builds: &[String], seq: u64, id_base: [u8; 16], time_us: i64) -> Envelope {
    let build = &builds[(seq % BUILDS) as usize];
    let line = (seq / BUILDS) as u32;
    let payload = if seq % 10 == 9 {
        Payload::LineExited(LineExited {
            job: "test[os=linux]".into(),
            attempt: 1,
            step: 2,
            line,
            exit_code: 0,
            duration_us: 1_250_000 + seq % 1000,
        })
    } else {
        let text = format!(
            "   Compiling tributary-crate-{:04} v0.1.{} (/workspace/crates/tributary-crate-{:04})\n",
            seq % 10_000,
            seq % 100,
            seq % 10_000,
        );
        Payload::LogChunk(LogChunk {
            job: "test[os=linux]".into(),
            attempt: 1,
            step: 2,
            line,
            stream: Stream::Stdout as i32,
            data: text.into_bytes(),
            offset: seq * 100,
            truncated: false,
        })
    };
    let mut id = id_base;
    id[10..].copy_from_slice(&seq.to_be_bytes()[2..]);
    Envelope {
        event_id: uuid::Uuid::from_bytes(id).to_string(),
        tenant: "acme".into(),
        project: "widgets".into(),
        build_id: build.clone(),
        time_us,
        payload: Some(payload),
    }
}
