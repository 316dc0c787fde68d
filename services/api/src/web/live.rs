//! Live streams (Server-Sent Events) and the raw log.
//!
//! [`build`]: one build's log and status changes. It replays the build's events from `from`
//! (0, or the offset after the `Last-Event-ID` a reconnecting browser sends), then follows the
//! log, through the same [`follow_build`] as the gRPC `TailLogs`: no gap, no duplicate. Every
//! event carries its log offset as its SSE id, so a reader can resume exactly where it left.
//! With `tail=BYTES` (and no resume) a long log starts near its end ([`super::tail`]): a first
//! `skip` event says how many bytes and, per job, how many lines were left out.
//!
//! | event     | when                      | data (JSON)                                  |
//! |-----------|---------------------------|----------------------------------------------|
//! | `log`     | `LogChunk`, `PipelineRejected` | `j` job, `a` attempt, `s` step, `l` line, `e` stream (1 out, 2 err, 3 system), `t` text |
//! | `cmd`     | `LineStarted`             | `j`, `a`, `s`, `l`, `t` the line's command    |
//! | `exit`    | `LineExited`              | `j`, `a`, `s`, `l`, `c` exit code, `d` µs     |
//! | `step`    | `StepStarted`             | `j`, `a`, `s`, `n` name                       |
//! | `attempt` | `JobStarted`              | `j`, `a`                                      |
//! | `changed` | any other event of the build | `{}`: re-fetch the summary `?after=<id>`  |
//! | `end`     | `BuildFinished` (then the stream closes) | `status`                       |
//! | `skip`    | first, with `tail=` on a long log | `bytes`, `lines` {job: count}         |
//!
//! [`project`]: a `changed` event whenever a build of the project moves (not for log lines),
//! from `from` (the position the page's table was read at, so nothing in between is missed),
//! or right after the `Last-Event-ID` of a reconnecting browser; on a partitioned log both
//! are positions in every events partition ([`super::resume`]).
//!
//! Output chunks name the attempt, step and line they belong to (`a`, `s`, `l`): the page
//! places them by that, since on a partitioned log chunks and line events arrive in no fixed
//! relative order.

use std::collections::HashMap;
use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tributary_eventlog::Record;
use tributary_proto::events::{envelope::Payload, Envelope};

use super::format::utf8_chunk;
use super::tail::{tail_start, Chunk};
use super::{api_session, WebError};
use crate::builds::authorize_on_log;
use crate::follow::{follow_build, next_batch, BuildPartitions, Cursor, Step};
use crate::state::{ApiState, TailGuard};

/// Events buffered per viewer before the stream task waits for the client to read.
const BUFFER: usize = 256;

#[derive(Deserialize)]
pub struct From {
    /// An offset (a one-partition log), or a resume token `E.L` (an SSE id on a partitioned
    /// log: the next offsets of the build's events and logs partitions).
    from: Option<String>,
    /// Start near the end: skip the oldest log chunks so about this many bytes remain
    /// (ignored when resuming).
    tail: Option<u64>,
}

/// Where a build's stream starts: after the `Last-Event-ID` of a reconnecting browser (an SSE
/// id, see [`Cursor::token`]), else at `from` (an offset, or a token `E.L`), else at 0.
pub fn start_cursor(headers: &HeaderMap, from: Option<&str>) -> Cursor {
    if let Some(cursor) = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(Cursor::resume_after)
    {
        return cursor;
    }
    match from.map(str::trim) {
        Some(f) if f.contains('.') => Cursor::resume_after(f).unwrap_or_default(),
        Some(f) => Cursor::at(f.parse().unwrap_or(0)),
        None => Cursor::default(),
    }
}

fn to_sse(
    rx: mpsc::Receiver<Result<Event, Status>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let stream = ReceiverStream::new(rx).map(|item| {
        Ok(item.unwrap_or_else(|status| Event::default().event("error").data(status.message())))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// Maps a build's events to SSE events; keeps partial UTF-8 characters between chunks.
#[derive(Default)]
pub struct BuildEvents {
    carry: HashMap<(String, u32, u32, u32, i32), Vec<u8>>,
}

impl BuildEvents {
    /// `record` mapped; `id` is the SSE id (the resume token just past it).
    pub fn map(&mut self, record: &Record, env: &Envelope, id: String) -> Step<Event> {
        let _ = record;
        let event = |name: &str, data: serde_json::Value| {
            Event::default()
                .id(id.clone())
                .event(name)
                .data(data.to_string())
        };
        let Some(payload) = &env.payload else {
            return Step::Skip;
        };
        Step::Send(match payload {
            Payload::LogChunk(c) => {
                let key = (c.job.clone(), c.attempt, c.step, c.line, c.stream);
                let text = utf8_chunk(self.carry.entry(key).or_default(), &c.data);
                event(
                    "log",
                    json!({"j": c.job, "a": c.attempt, "s": c.step, "l": c.line, "e": c.stream, "t": text}),
                )
            }
            Payload::PipelineRejected(r) => event(
                "log",
                json!({"j": "", "a": 0, "s": 0, "l": 0, "e": 3,
                       "t": format!("{}:{}:{}: {}\n", r.file, r.line, r.column, r.message)}),
            ),
            Payload::LineStarted(l) => event(
                "cmd",
                json!({"j": l.job, "a": l.attempt, "s": l.step, "l": l.line, "t": l.text}),
            ),
            Payload::LineExited(l) => {
                // A line's last chunks may still come after its exit (another partition):
                // keep a held partial character.
                self.carry.retain(|k, held| {
                    let this_line =
                        k.0 == l.job && k.1 == l.attempt && k.2 == l.step && k.3 == l.line;
                    !(this_line && held.is_empty())
                });
                event(
                    "exit",
                    json!({"j": l.job, "a": l.attempt, "s": l.step, "l": l.line,
                           "c": l.exit_code, "d": l.duration_us}),
                )
            }
            Payload::StepStarted(s) => event(
                "step",
                json!({"j": s.job, "a": s.attempt, "s": s.step, "n": s.name}),
            ),
            Payload::JobStarted(j) => event("attempt", json!({"j": j.job, "a": j.attempt})),
            Payload::BuildFinished(f) => {
                let status = tributary_proto::events::Status::try_from(f.status)
                    .map_or("unknown", |s| s.name());
                return Step::Last(event("end", json!({ "status": status })));
            }
            _ => event("changed", json!({})),
        })
    }
}

/// `GET /ui/builds/{id}/events[?from=OFFSET]`: the build's log and changes, live.
pub async fn build(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<From>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    let session = api_session(&state, &headers)?;
    let start = authorize_on_log(&state, &session.who, &id).await?;
    let resume = start_cursor(&headers, q.from.as_deref());
    let (tx, rx) = mpsc::channel(BUFFER);
    let log = state.log.clone();
    let parts = BuildPartitions::of(log.layout(), &id);
    let guard = TailGuard::new(&state);
    let tail = q.tail.filter(|&t| t > 0 && resume == Cursor::default());
    // Never before the build's first records: the log before them holds none of its events.
    let mut from = resume.at_least(start.cursor(parts));
    tokio::spawn(async move {
        let _guard = guard;
        if let Some(tail) = tail {
            let skipped = match scan_chunks(log.as_ref(), &id, from.logs).await {
                Ok(chunks) => tail_start(&chunks, tail),
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            if skipped.from > 0 {
                // Skipped chunks are in the logs partition; on a shared partition the state
                // events before them are skipped too.
                from.logs = skipped.from;
                if parts.shared() {
                    from.events = skipped.from;
                }
                let event = Event::default()
                    .event("skip")
                    .data(json!({"bytes": skipped.bytes, "lines": skipped.lines}).to_string());
                if tx.send(Ok(event)).await.is_err() {
                    return;
                }
            }
        }
        let mut events = BuildEvents::default();
        follow_build(log.as_ref(), &id, from, true, &tx, |r, e, c| {
            events.map(r, e, c.token(parts))
        })
        .await;
    });
    Ok(([("x-accel-buffering", "no")], to_sse(rx)).into_response())
}

/// Every `LogChunk` of the build now on the log from `from` (where its chunks start at the
/// earliest): offset, job, size and newlines.
async fn scan_chunks(
    log: &dyn tributary_eventlog::EventLog,
    build_id: &str,
    from: u64,
) -> Result<Vec<Chunk>, Status> {
    let mut chunks = Vec::new();
    let mut next = from;
    loop {
        let records = log
            .read_key_in(tributary_eventlog::Topic::Logs, build_id, next, 4096)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let Some(last) = records.last() else {
            return Ok(chunks);
        };
        next = last.offset + 1;
        for record in &records {
            if let Ok(Envelope {
                payload: Some(Payload::LogChunk(c)),
                ..
            }) = record.decode()
            {
                chunks.push(Chunk {
                    offset: record.offset,
                    bytes: c.data.len() as u64,
                    lines: c.data.iter().filter(|&&b| b == b'\n').count() as u64,
                    job: c.job,
                });
            }
        }
    }
}

/// Whether an event moves a build in a way the builds table shows (not log lines).
fn moves_build(env: &Envelope) -> bool {
    !matches!(
        env.payload,
        None | Some(
            Payload::LogChunk(_)
                | Payload::LineStarted(_)
                | Payload::LineExited(_)
                | Payload::StepStarted(_)
                | Payload::StepFinished(_)
        )
    )
}

/// `GET /ui/projects/{project}/live`: a `changed` event (id = offset) whenever a build of the
/// project moves; at most one per batch of the log.
pub async fn project(
    State(state): State<ApiState>,
    Path(project): Path<String>,
    Query(q): Query<From>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    let session = api_session(&state, &headers)?;
    let tenant = session.who.tenant.clone();
    if !state.directory(|d| d.project(&tenant, &project).is_some())? {
        return Err(WebError::NotFound(format!("no project {project}")));
    }
    // Every events partition from where the browser left (Last-Event-ID), else from where the
    // page was rendered (nothing between is missed), else from its end now; never beyond it.
    let ends = events_ends(&state).await?;
    let last_event_id = headers.get("last-event-id").and_then(|v| v.to_str().ok());
    let start = super::resume::start(&ends, q.from.as_deref(), last_event_id);
    let mut sub = state.log.subscribe_partitions(&start);
    let (tx, rx) = mpsc::channel(BUFFER);
    let guard = TailGuard::new(&state);
    tokio::spawn(async move {
        let _guard = guard;
        loop {
            let Some(records) = next_batch(sub.as_mut(), &tx).await else {
                return;
            };
            let moved = records.iter().any(|r| {
                r.decode().is_ok_and(|env| {
                    env.tenant == tenant && env.project == project && moves_build(&env)
                })
            });
            if moved {
                // The id resumes after the whole batch: its other records move nothing.
                let event = Event::default()
                    .id(super::resume::token(&sub.positions()))
                    .event("changed")
                    .data("{}");
                if tx.send(Ok(event)).await.is_err() {
                    return;
                }
            }
        }
    });
    Ok(([("x-accel-buffering", "no")], to_sse(rx)).into_response())
}

/// The end now of every events partition, in partition order.
pub async fn events_ends(state: &ApiState) -> Result<Vec<(u32, u64)>, Status> {
    let events = state
        .log
        .layout()
        .topic_partitions(tributary_eventlog::Topic::Events);
    Ok(state
        .log_end()
        .await?
        .0
        .into_iter()
        .filter(|(p, _)| events.contains(p))
        .collect())
}

#[derive(Deserialize)]
pub struct JobQuery {
    #[serde(default)]
    job: String,
}

/// `GET /ui/builds/{id}/log.txt[?job=JOB]`: the log as it is now, streamed as plain text
/// (every attempt, in order; all jobs when `job` is empty).
pub async fn log_txt(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<JobQuery>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    let session = api_session(&state, &headers)?;
    let start = authorize_on_log(&state, &session.who, &id).await?;
    let (tx, rx) = mpsc::channel::<Result<Bytes, Status>>(BUFFER);
    let log = state.log.clone();
    let from = start.cursor(BuildPartitions::of(log.layout(), &id));
    tokio::spawn(async move {
        follow_build(
            log.as_ref(),
            &id,
            from,
            false,
            &tx,
            |_, env, _| match &env.payload {
                Some(Payload::LogChunk(c)) if q.job.is_empty() || c.job == q.job => {
                    Step::Send(Bytes::from(c.data.clone()))
                }
                _ => Step::Skip,
            },
        )
        .await;
    });
    let body = Body::from_stream(ReceiverStream::new(rx));
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response())
}
