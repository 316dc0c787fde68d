//! Where a job's events go: batching of output into `LogChunk`s, per-stream offsets and the job's
//! log byte limit.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tributary_proto::events::envelope::Payload;
use tributary_proto::events::{LogChunk, Stream};

use crate::mask::{Masker, Secrets};
use crate::LogLimits;

/// Index of a job output stream in the per-stream arrays.
pub(crate) const STDOUT: usize = 0;
pub(crate) const STDERR: usize = 1;
const SYSTEM: usize = 2;

fn stream_of(index: usize) -> Stream {
    match index {
        STDOUT => Stream::Stdout,
        STDERR => Stream::Stderr,
        _ => Stream::System,
    }
}

pub(crate) struct Sink {
    tx: mpsc::Sender<Payload>,
    pub(crate) job: String,
    pub(crate) attempt: u32,
    limits: LogLimits,
    /// Next byte offset per stream (stdout, stderr, system), over the whole attempt.
    offsets: [u64; 3],
    /// Job output bytes forwarded so far (stdout + stderr), bounded by `max_job_log_bytes`.
    forwarded: u64,
    truncated: bool,
    receiver_gone: bool,
    /// Step the buffered output belongs to.
    pub(crate) step: u32,
    /// Output not yet sent, per stream; each shorter than `flush_bytes`.
    buf: [Vec<u8>; 2],
    /// When the oldest buffered byte must be sent.
    pub(crate) flush_at: Option<Instant>,
    /// When buffered output was last sent: output arriving after a quiet spell of at least
    /// `flush_interval` is sent at once, so sparse lines reach tails without waiting while dense
    /// output is still batched to one chunk per interval.
    last_flush: Option<Instant>,
    /// Line of the last chunk sent (with `step`: where a closing note belongs).
    pub(crate) last_line: u32,
    /// Secrets masked in every chunk: streaming per output stream (a secret split across two
    /// flushes is still masked), whole for system messages.
    secrets: Arc<Secrets>,
    maskers: [Masker; 2],
}

impl Sink {
    pub(crate) fn new(
        tx: mpsc::Sender<Payload>,
        job: String,
        attempt: u32,
        limits: LogLimits,
        secrets: Arc<Secrets>,
    ) -> Self {
        Sink {
            maskers: [Masker::new(secrets.clone()), Masker::new(secrets.clone())],
            secrets,
            tx,
            job,
            attempt,
            limits,
            offsets: [0; 3],
            forwarded: 0,
            truncated: false,
            receiver_gone: false,
            step: 0,
            buf: [Vec::new(), Vec::new()],
            flush_at: None,
            last_flush: None,
            last_line: 0,
        }
    }

    /// Sends one event. A dropped receiver is logged once; the job still runs to its end.
    pub(crate) async fn send(&mut self, payload: Payload) {
        if self.tx.send(payload).await.is_err() && !self.receiver_gone {
            self.receiver_gone = true;
            tracing::warn!("event receiver dropped; further events of this job are lost");
        }
    }

    fn flush_bytes(&self) -> usize {
        self.limits.flush_bytes.max(1)
    }

    /// Job output of `stream` (STDOUT or STDERR) for `line`. Sent in chunks of at most
    /// `flush_bytes`; the rest waits for [`Sink::flush`].
    pub(crate) async fn output(&mut self, line: u32, stream: usize, data: &[u8]) {
        if self.truncated || data.is_empty() {
            return;
        }
        let room = self.limits.max_job_log_bytes.saturating_sub(self.forwarded);
        let take = usize::try_from(room).unwrap_or(usize::MAX).min(data.len());
        let fb = self.flush_bytes();
        let mut rest = &data[..take];
        while !rest.is_empty() {
            if self.buf[stream].is_empty() && self.flush_at.is_none() {
                let now = Instant::now();
                let due = self
                    .last_flush
                    .map_or(now, |t| (t + self.limits.flush_interval).max(now));
                self.flush_at = Some(due);
            }
            let n = (fb - self.buf[stream].len()).min(rest.len());
            self.buf[stream].extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            if self.buf[stream].len() >= fb {
                self.flush_stream(line, stream).await;
            }
        }
        self.forwarded += take as u64;
        if take < data.len() {
            self.end_line(line).await;
            self.truncated = true;
            let msg = format!(
                "tributary: log truncated: this job's output exceeded {} bytes; the rest is not \
                 kept (the job keeps running)\n",
                self.limits.max_job_log_bytes
            );
            self.system_chunk(line, msg.into_bytes(), true).await;
        }
    }

    /// Sends all buffered output as `line`'s.
    pub(crate) async fn flush(&mut self, line: u32) {
        if self.buf.iter().any(|b| !b.is_empty()) {
            self.last_flush = Some(Instant::now());
        }
        self.flush_stream(line, STDOUT).await;
        self.flush_stream(line, STDERR).await;
        self.flush_at = None;
    }

    async fn flush_stream(&mut self, line: u32, stream: usize) {
        if self.buf[stream].is_empty() {
            return;
        }
        let data = std::mem::take(&mut self.buf[stream]);
        // What may be the start of a secret waits for the next output of the line.
        let data = self.maskers[stream].push(&data);
        if !data.is_empty() {
            self.send_chunk(line, stream, data, false).await;
        }
    }

    /// The end of `line`'s output: everything buffered or held back by the maskers is sent as
    /// the line's (a secret cannot continue into another line's output).
    pub(crate) async fn end_line(&mut self, line: u32) {
        self.flush(line).await;
        for stream in [STDOUT, STDERR] {
            let rest = self.maskers[stream].finish();
            if !rest.is_empty() {
                self.send_chunk(line, stream, rest, false).await;
            }
        }
    }

    /// Text from Tributary itself, on STREAM_SYSTEM, as given (a newline added if missing).
    pub(crate) async fn system_text(&mut self, line: u32, text: &str) {
        let mut data = text.as_bytes().to_vec();
        if data.last() != Some(&b'\n') {
            data.push(b'\n');
        }
        self.system_chunk(line, data, false).await;
    }

    /// A message from Tributary itself, on STREAM_SYSTEM (not counted against the limit).
    pub(crate) async fn system(&mut self, line: u32, msg: &str) {
        let mut data = format!("tributary: {msg}").into_bytes();
        if data.last() != Some(&b'\n') {
            data.push(b'\n');
        }
        self.system_chunk(line, data, false).await;
    }

    async fn system_chunk(&mut self, line: u32, data: Vec<u8>, truncated: bool) {
        let data = self.secrets.mask(&data);
        self.send_chunk(line, SYSTEM, data, truncated).await;
    }

    async fn send_chunk(&mut self, line: u32, stream: usize, data: Vec<u8>, truncated: bool) {
        self.last_line = line;
        let offset = self.offsets[stream];
        self.offsets[stream] += data.len() as u64;
        let chunk = LogChunk {
            job: self.job.clone(),
            attempt: self.attempt,
            step: self.step,
            line,
            stream: stream_of(stream) as i32,
            data,
            offset,
            truncated,
        };
        self.send(Payload::LogChunk(chunk)).await;
    }
}
