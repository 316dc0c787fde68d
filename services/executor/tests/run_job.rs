//! End-to-end tests of `run_job` with real `sh` processes.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tributary_executor::{run_job, JobContext, JobOutcome, LogLimits};
use tributary_proto::events::envelope::Payload;
use tributary_proto::events::{EnvVar, JobPlan, LogChunk, Status, StepPlan, Stream};

struct Fixture {
    ctx: JobContext,
    _workdir: tempfile::TempDir,
    _scratch: tempfile::TempDir,
}

fn fixture(steps: &[(&str, &[&str])]) -> Fixture {
    let workdir = tempfile::tempdir().expect("workdir");
    let scratch = tempfile::tempdir().expect("scratch");
    let job = JobPlan {
        id: "test[os=linux]".into(),
        name: "test".into(),
        steps: steps
            .iter()
            .map(|(name, lines)| StepPlan {
                name: (*name).to_owned(),
                lines: lines.iter().map(|l| (*l).to_owned()).collect(),
            })
            .collect(),
        ..Default::default()
    };
    let ctx = JobContext {
        build_id: "build-1".into(),
        job,
        attempt: 1,
        workdir: workdir.path().to_path_buf(),
        scratch_dir: scratch.path().join("scripts"),
        extra_env: Vec::new(),
        limits: LogLimits::default(),
        container: None,
        preamble: String::new(),
        failure_note: String::new(),
        secrets: Default::default(),
        image: None,
    };
    Fixture {
        ctx,
        _workdir: workdir,
        _scratch: scratch,
    }
}

/// An event and when it was received.
type Timed = (Instant, Payload);

async fn run_with(ctx: JobContext, cancel: CancellationToken) -> (JobOutcome, Vec<Timed>) {
    let (tx, mut rx) = mpsc::channel(16);
    let job = tokio::spawn(run_job(ctx, tx, cancel));
    let mut events = Vec::new();
    while let Some(p) = rx.recv().await {
        events.push((Instant::now(), p));
    }
    let outcome = job.await.expect("run_job does not panic");
    check_order(&events);
    (outcome, events)
}

async fn run(ctx: JobContext) -> (JobOutcome, Vec<Payload>) {
    let (outcome, events) = run_with(ctx, CancellationToken::new()).await;
    (outcome, events.into_iter().map(|(_, p)| p).collect())
}

/// Events are StepStarted, (LineStarted, chunks of that line, LineExited)*, StepFinished per step,
/// lines numbered from 0, and every stream's offsets are gap-free.
fn check_order(events: &[Timed]) {
    let mut step: Option<u32> = None;
    let mut next_step = 0;
    let mut line: Option<u32> = None;
    let mut next_line = 0;
    let mut offsets = [0u64; 4];
    for (_, e) in events {
        match e {
            Payload::StepStarted(s) => {
                assert_eq!(step, None, "StepStarted inside a step");
                assert_eq!(s.step, next_step);
                step = Some(s.step);
                next_step += 1;
                next_line = 0;
            }
            Payload::LineStarted(l) => {
                assert_eq!(step, Some(l.step));
                assert_eq!(line, None, "LineStarted inside a line");
                assert_eq!(l.line, next_line);
                line = Some(l.line);
                next_line += 1;
            }
            Payload::LogChunk(c) => {
                // Only Tributary's own notes (preamble, failure note) stand outside a step.
                if step.is_some() || c.stream != Stream::System as i32 {
                    assert_eq!(step, Some(c.step));
                }
                if c.stream != Stream::System as i32 {
                    assert_eq!(line, Some(c.line), "chunk outside its line: {c:?}");
                    assert!(!c.data.is_empty());
                }
                let s = c.stream as usize;
                assert_eq!(c.offset, offsets[s], "gap in stream {s}");
                offsets[s] += c.data.len() as u64;
            }
            Payload::LineExited(l) => {
                assert_eq!(step, Some(l.step));
                assert_eq!(line, Some(l.line), "LineExited of a line not open");
                line = None;
            }
            Payload::StepFinished(s) => {
                assert_eq!(step, Some(s.step));
                assert_eq!(line, None, "StepFinished with a line open");
                step = None;
            }
            other => panic!("unexpected event {other:?}"),
        }
    }
    assert_eq!(step, None, "a step never finished");
}

fn chunks(events: &[Payload]) -> impl Iterator<Item = &LogChunk> {
    events.iter().filter_map(|e| match e {
        Payload::LogChunk(c) => Some(c),
        _ => None,
    })
}

/// Everything `stream` got for (step, line).
fn output(events: &[Payload], step: u32, line: u32, stream: Stream) -> String {
    let bytes: Vec<u8> = chunks(events)
        .filter(|c| c.step == step && c.line == line && c.stream == stream as i32)
        .flat_map(|c| c.data.clone())
        .collect();
    String::from_utf8(bytes).expect("utf-8 output")
}

fn out(events: &[Payload], step: u32, line: u32) -> String {
    output(events, step, line, Stream::Stdout)
}

fn err(events: &[Payload], step: u32, line: u32) -> String {
    output(events, step, line, Stream::Stderr)
}

fn system(events: &[Payload]) -> String {
    chunks(events)
        .filter(|c| c.stream == Stream::System as i32)
        .map(|c| String::from_utf8_lossy(&c.data).into_owned())
        .collect()
}

/// (step, line) of every LineStarted.
fn started_lines(events: &[Payload]) -> Vec<(u32, u32)> {
    events
        .iter()
        .filter_map(|e| match e {
            Payload::LineStarted(l) => Some((l.step, l.line)),
            _ => None,
        })
        .collect()
}

/// (step, line, exit code) of every LineExited.
fn exits(events: &[Payload]) -> Vec<(u32, u32, i32)> {
    events
        .iter()
        .filter_map(|e| match e {
            Payload::LineExited(l) => Some((l.step, l.line, l.exit_code)),
            _ => None,
        })
        .collect()
}

/// (step, status, exit code) of every StepFinished.
fn step_results(events: &[Payload]) -> Vec<(u32, Status, i32)> {
    events
        .iter()
        .filter_map(|e| match e {
            Payload::StepFinished(s) => Some((s.step, s.status(), s.exit_code)),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn state_carries_over_between_lines_but_not_between_steps() {
    let f = fixture(&[
        ("setup", &["mkdir sub && cd sub", "X=42", "greet() { echo \"hi $1\"; }", "basename \"$PWD\"; echo \"x=$X\"; greet you"]),
        ("next", &["basename \"$PWD\"; echo \"x=${X:-unset}\"; greet you 2>/dev/null || echo no-function"]),
    ]);
    let workdir = f.ctx.workdir.clone();
    let (outcome, events) = run(f.ctx).await;
    assert_eq!(outcome.status, Status::Succeeded, "{outcome:?}");
    assert_eq!(outcome.exit_code, 0);
    assert_eq!(outcome.reason, "");
    assert_eq!(out(&events, 0, 3), "sub\nx=42\nhi you\n");
    let top = workdir.file_name().and_then(|n| n.to_str()).expect("name");
    assert_eq!(out(&events, 1, 0), format!("{top}\nx=unset\nno-function\n"));
    assert_eq!(
        started_lines(&events),
        vec![(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]
    );
    assert!(exits(&events).iter().all(|&(_, _, code)| code == 0));
    assert_eq!(
        step_results(&events),
        vec![(0, Status::Succeeded, 0), (1, Status::Succeeded, 0)]
    );
}

#[tokio::test]
async fn failing_line_stops_the_step_and_the_job() {
    let f = fixture(&[
        ("test", &["echo one", "sh -c 'exit 7'", "echo never"]),
        ("after", &["echo never"]),
    ]);
    let (outcome, events) = run(f.ctx).await;
    assert_eq!(outcome.status, Status::Failed);
    assert_eq!(outcome.exit_code, 7);
    assert_eq!(
        outcome.reason,
        "line 2 of step \"test\" exited with 7: sh -c 'exit 7'"
    );
    assert_eq!(started_lines(&events), vec![(0, 0), (0, 1)]);
    assert_eq!(exits(&events), vec![(0, 0, 0), (0, 1, 7)]);
    assert_eq!(step_results(&events), vec![(0, Status::Failed, 7)]);
    assert!(!events
        .iter()
        .any(|e| matches!(e, Payload::StepStarted(s) if s.step == 1)));
    assert_eq!(out(&events, 0, 0), "one\n");
}

#[tokio::test]
async fn stdout_and_stderr_are_attributed_to_their_line() {
    let f = fixture(&[(
        "s",
        &[
            "echo out0; echo err0 >&2; echo out0b",
            "printf 'no-newline-out'; printf 'no-newline-err' >&2",
            "echo out2 >&2; echo out2",
            "true",
        ],
    )]);
    let (outcome, events) = run(f.ctx).await;
    assert_eq!(outcome.status, Status::Succeeded);
    assert_eq!(out(&events, 0, 0), "out0\nout0b\n");
    assert_eq!(err(&events, 0, 0), "err0\n");
    assert_eq!(out(&events, 0, 1), "no-newline-out");
    assert_eq!(err(&events, 0, 1), "no-newline-err");
    assert_eq!(out(&events, 0, 2), "out2\n");
    assert_eq!(err(&events, 0, 2), "out2\n");
    assert_eq!(out(&events, 0, 3), "");
    assert_eq!(err(&events, 0, 3), "");
}

#[tokio::test]
async fn output_without_newline_before_a_failing_line() {
    let f = fixture(&[("plain", &["printf partial", "false", "echo never"])]);
    let (outcome, events) = run(f.ctx).await;
    assert_eq!(outcome.status, Status::Failed);
    assert_eq!(outcome.exit_code, 1);
    assert_eq!(
        outcome.reason,
        "line 2 of step \"plain\" exited with 1: false"
    );
    assert_eq!(out(&events, 0, 0), "partial");
    assert_eq!(out(&events, 0, 1), "");
    assert_eq!(exits(&events), vec![(0, 0, 0), (0, 1, 1)]);

    // The same from a background job of the line, and in the failing line itself.
    let f = fixture(&[(
        "bg",
        &[
            "printf bg-partial & wait",
            "printf 'err-partial' >&2 & wait; printf same-line; false",
        ],
    )]);
    let (outcome, events) = run(f.ctx).await;
    assert_eq!(outcome.exit_code, 1);
    assert_eq!(out(&events, 0, 0), "bg-partial");
    assert_eq!(out(&events, 0, 1), "same-line");
    assert_eq!(err(&events, 0, 1), "err-partial");
    assert_eq!(exits(&events), vec![(0, 0, 0), (0, 1, 1)]);
}

#[tokio::test]
async fn fake_markers_are_plain_output() {
    let f = fixture(&[(
        "s",
        &[
            r"printf '\036TRIB:0123456789abcdef0123456789abcdef:S:5\n'",
            r"printf '\036TRIB:x:E:1:0\n\036TRIB:' >&2",
            "echo done",
        ],
    )]);
    let (outcome, events) = run(f.ctx).await;
    assert_eq!(outcome.status, Status::Succeeded);
    assert_eq!(started_lines(&events), vec![(0, 0), (0, 1), (0, 2)]);
    assert_eq!(
        out(&events, 0, 0),
        "\x1eTRIB:0123456789abcdef0123456789abcdef:S:5\n"
    );
    assert_eq!(err(&events, 0, 1), "\x1eTRIB:x:E:1:0\n\x1eTRIB:");
    assert_eq!(out(&events, 0, 2), "done\n");
}

#[tokio::test]
async fn exit_inside_a_line_is_that_lines_exit_code() {
    let f = fixture(&[("s", &["echo before", "echo leaving; exit 3", "echo never"])]);
    let (outcome, events) = run(f.ctx).await;
    assert_eq!(outcome.status, Status::Failed);
    assert_eq!(outcome.exit_code, 3);
    assert_eq!(
        outcome.reason,
        "line 2 of step \"s\" exited with 3: echo leaving; exit 3"
    );
    assert_eq!(exits(&events), vec![(0, 0, 0), (0, 1, 3)]);
    assert_eq!(out(&events, 0, 1), "leaving\n");
    assert_eq!(step_results(&events), vec![(0, Status::Failed, 3)]);
}

#[tokio::test]
async fn syntax_error_fails_its_line() {
    let f = fixture(&[("s", &["echo ok", "if then fi", "echo never"])]);
    let (outcome, events) = run(f.ctx).await;
    assert_eq!(outcome.status, Status::Failed);
    assert_eq!(outcome.exit_code, 2);
    assert_eq!(exits(&events), vec![(0, 0, 0), (0, 1, 2)]);
    assert!(
        err(&events, 0, 1).contains("Syntax error"),
        "{:?}",
        err(&events, 0, 1)
    );
}

#[tokio::test]
async fn killed_by_a_signal_is_128_plus_signo() {
    let f = fixture(&[("s", &["kill -KILL $$"])]);
    let (outcome, events) = run(f.ctx).await;
    assert_eq!(outcome.status, Status::Failed);
    assert_eq!(outcome.exit_code, 137);
    assert_eq!(exits(&events), vec![(0, 0, 137)]);
}

#[tokio::test]
async fn multi_line_run_block_is_one_line() {
    let block =
        "for i in 1 2 3; do\n  echo \"n=$i\"\ndone\ncat <<EOF\nheredoc $i\nEOF\nY=after-block";
    let f = fixture(&[("s", &[block, "echo \"$Y\"", "echo continued \\"])]);
    let (outcome, events) = run(f.ctx).await;
    assert_eq!(outcome.status, Status::Succeeded, "{outcome:?}");
    assert_eq!(started_lines(&events), vec![(0, 0), (0, 1), (0, 2)]);
    let text = events.iter().find_map(|e| match e {
        Payload::LineStarted(l) if l.line == 0 => Some(l.text.clone()),
        _ => None,
    });
    assert_eq!(text.as_deref(), Some(block));
    assert_eq!(out(&events, 0, 0), "n=1\nn=2\nn=3\nheredoc 3\n");
    assert_eq!(out(&events, 0, 1), "after-block\n");
    assert_eq!(out(&events, 0, 2), "continued\n");
}

#[tokio::test]
async fn a_run_block_stops_at_its_first_failing_command() {
    // As GitHub Actions runs a `run: |` block (`sh -e`): `false` ends the block and the step.
    let block = "echo first\nfalse\necho after-false";
    let f = fixture(&[("s", &[block, "echo never"])]);
    let (outcome, events) = run(f.ctx).await;
    assert_eq!(outcome.status, Status::Failed, "{outcome:?}");
    assert_eq!(outcome.exit_code, 1);
    assert_eq!(out(&events, 0, 0), "first\n");
    assert_eq!(exits(&events), vec![(0, 0, 1)]);
    assert_eq!(
        outcome.reason,
        "line 1 of step \"s\" exited with 1: echo first ..."
    );
    // A command whose failure is handled does not end the block.
    let f = fixture(&[(
        "s",
        &["false || echo handled\nif false; then :; fi\necho end"],
    )]);
    let (outcome, events) = run(f.ctx).await;
    assert_eq!(outcome.status, Status::Succeeded, "{outcome:?}");
    assert_eq!(out(&events, 0, 0), "handled\nend\n");
}

#[tokio::test]
async fn big_output_is_chunked_and_complete() {
    let mut f = fixture(&[("s", &["i=0; while [ $i -lt 20000 ]; do echo \"line $i of the big output\"; i=$((i+1)); done >&2; echo end"])]);
    f.ctx.limits.flush_bytes = 16 * 1024;
    let (outcome, events) = run(f.ctx).await;
    assert_eq!(outcome.status, Status::Succeeded);
    let expected: String = (0..20000)
        .map(|i| format!("line {i} of the big output\n"))
        .collect();
    assert!(expected.len() > 500_000);
    let big: Vec<&LogChunk> = chunks(&events)
        .filter(|c| c.stream == Stream::Stderr as i32)
        .collect();
    assert!(
        big.len() >= expected.len() / (16 * 1024),
        "{} chunks",
        big.len()
    );
    assert!(big.iter().all(|c| c.data.len() <= 16 * 1024));
    assert_eq!(err(&events, 0, 0), expected);
    assert_eq!(out(&events, 0, 0), "end\n");
}

#[tokio::test]
async fn one_megabyte_line_is_chunked_and_nothing_is_lost() {
    let mut f = fixture(&[("s", &["cat data.bin", "cat data.bin >&2"])]);
    f.ctx.limits.flush_bytes = 64 * 1024;
    // Binary data, including marker lead bytes and marker-like text from another nonce.
    let mut data = Vec::with_capacity(1 << 20);
    let mut x: u32 = 12345;
    while data.len() < (1 << 20) {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        match x >> 28 {
            0 => data.extend_from_slice(b"\x1eTRIB:00000000000000000000000000000000:S:1\n"),
            1 => data.push(0x1e),
            _ => data.push((x >> 16) as u8),
        }
    }
    data.truncate(1 << 20);
    std::fs::write(f.ctx.workdir.join("data.bin"), &data).expect("write data");
    let (outcome, events) = run(f.ctx).await;
    assert_eq!(outcome.status, Status::Succeeded);
    for (line, stream) in [(0, Stream::Stdout), (1, Stream::Stderr)] {
        let got: Vec<&LogChunk> = chunks(&events)
            .filter(|c| c.line == line && c.stream == stream as i32)
            .collect();
        assert!(got.len() >= 16, "{} chunks", got.len());
        assert!(got.iter().all(|c| c.data.len() <= 64 * 1024));
        let joined: Vec<u8> = got.iter().flat_map(|c| c.data.iter().copied()).collect();
        assert!(
            joined == data,
            "line {line}: {} bytes differ from the {} written",
            joined.len(),
            data.len()
        );
    }
    assert_eq!(started_lines(&events), vec![(0, 0), (0, 1)]);
}

#[tokio::test]
async fn log_is_truncated_at_the_limit() {
    let mut f = fixture(&[
        (
            "s",
            &[
                "echo small",
                "yes hello | head -c 5000; echo more >&2",
                "echo after-limit",
            ],
        ),
        ("t", &["echo next-step; exit 4"]),
    ]);
    f.ctx.limits.max_job_log_bytes = 1000;
    let (outcome, events) = run(f.ctx).await;
    // The job still runs to its end: only the log is cut.
    assert_eq!(outcome.status, Status::Failed);
    assert_eq!(outcome.exit_code, 4);
    let job_bytes: usize = chunks(&events)
        .filter(|c| c.stream != Stream::System as i32)
        .map(|c| c.data.len())
        .sum();
    assert_eq!(job_bytes, 1000);
    let truncated: Vec<&LogChunk> = chunks(&events).filter(|c| c.truncated).collect();
    assert_eq!(truncated.len(), 1);
    assert_eq!(truncated[0].stream, Stream::System as i32);
    assert_eq!((truncated[0].step, truncated[0].line), (0, 1));
    assert!(system(&events).contains("truncated"));
    assert_eq!(out(&events, 0, 0), "small\n");
    assert!(out(&events, 0, 1).starts_with("hello\nhello\n"));
    assert_eq!(out(&events, 0, 2), "");
    assert_eq!(
        exits(&events),
        vec![(0, 0, 0), (0, 1, 0), (0, 2, 0), (1, 0, 4)]
    );
}

#[tokio::test]
async fn timeout_kills_the_job() {
    let mut f = fixture(&[
        ("s", &["echo start", "sleep 30", "echo never"]),
        ("t", &["echo never"]),
    ]);
    f.ctx.job.timeout_secs = 1;
    let begun = Instant::now();
    let (outcome, events) = run(f.ctx).await;
    let took = begun.elapsed();
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert_eq!(outcome.status, Status::TimedOut);
    assert_eq!(outcome.reason, "timed out after 1s");
    assert_eq!(outcome.exit_code, 128 + 15);
    assert_eq!(exits(&events), vec![(0, 0, 0), (0, 1, 143)]);
    assert_eq!(step_results(&events), vec![(0, Status::TimedOut, 143)]);
}

#[tokio::test]
async fn timeout_escalates_to_sigkill() {
    let mut f = fixture(&[("s", &["trap '' TERM; sleep 30 & wait; sleep 30"])]);
    f.ctx.job.timeout_secs = 1;
    let begun = Instant::now();
    let (outcome, _) = run(f.ctx).await;
    assert!(
        begun.elapsed() < Duration::from_secs(5),
        "took {:?}",
        begun.elapsed()
    );
    assert_eq!(outcome.status, Status::TimedOut);
}

#[tokio::test]
async fn cancel_kills_the_job_quickly() {
    let f = fixture(&[("s", &["echo running", "sleep 30"]), ("t", &["echo never"])]);
    let cancel = CancellationToken::new();
    let (tx, mut rx) = mpsc::channel(16);
    let job = tokio::spawn(run_job(f.ctx, tx, cancel.clone()));
    let mut events = Vec::new();
    let mut canceled_at = None;
    while let Some(p) = rx.recv().await {
        if matches!(&p, Payload::LineStarted(l) if l.line == 1) {
            cancel.cancel();
            canceled_at = Some(Instant::now());
        }
        events.push((Instant::now(), p));
    }
    let outcome = job.await.expect("no panic");
    let took = canceled_at.expect("line 1 started").elapsed();
    assert!(took < Duration::from_secs(2), "took {took:?}");
    check_order(&events);
    let events: Vec<Payload> = events.into_iter().map(|(_, p)| p).collect();
    assert_eq!(outcome.status, Status::Canceled);
    assert_eq!(outcome.reason, "canceled");
    assert_eq!(exits(&events), vec![(0, 0, 0), (0, 1, 143)]);
    assert_eq!(step_results(&events), vec![(0, Status::Canceled, 143)]);
}

#[tokio::test]
async fn canceled_before_start_runs_nothing() {
    let f = fixture(&[("s", &["echo never"])]);
    let cancel = CancellationToken::new();
    cancel.cancel();
    let (outcome, events) = run_with(f.ctx, cancel).await;
    assert_eq!(outcome.status, Status::Canceled);
    assert!(events.is_empty());
}

#[tokio::test]
async fn output_streams_live() {
    let f = fixture(&[("s", &["echo first; sleep 0.3; echo second"])]);
    let (outcome, events) = run_with(f.ctx, CancellationToken::new()).await;
    assert_eq!(outcome.status, Status::Succeeded);
    let data: Vec<(Instant, Vec<u8>)> = events
        .iter()
        .filter_map(|(t, e)| match e {
            Payload::LogChunk(c) => Some((*t, c.data.clone())),
            _ => None,
        })
        .collect();
    // The first print was sent on its own, before the second one existed.
    assert_eq!(data.len(), 2, "{data:?}");
    assert_eq!(data[0].1, b"first\n");
    assert_eq!(data[1].1, b"second\n");
    assert!(data[0].0 < data[1].0);
}

/// Dense output is batched: 200 lines printed as fast as the shell can go become far fewer
/// chunks than lines (at most one per flush interval after the first), and none is lost.
#[tokio::test]
async fn dense_output_is_batched_and_complete() {
    let mut f = fixture(&[(
        "s",
        &["i=0; while [ $i -lt 200 ]; do echo line$i; i=$((i+1)); done"],
    )]);
    f.ctx.limits.flush_interval = Duration::from_millis(200);
    let (outcome, events) = run(f.ctx).await;
    assert_eq!(outcome.status, Status::Succeeded);
    let expected: String = (0..200).map(|i| format!("line{i}\n")).collect();
    assert_eq!(out(&events, 0, 0), expected);
    let n = chunks(&events)
        .filter(|c| c.stream == Stream::Stdout as i32)
        .count();
    assert!(
        n < 20,
        "{n} chunks for 200 dense lines: output is not batched"
    );
}

/// A line printed after a quiet spell longer than the flush interval is sent at once, not one
/// interval later (which would be 0.35 s before the job ends instead of 0.6 s).
#[tokio::test]
async fn sparse_output_is_sent_without_waiting_for_the_interval() {
    let mut f = fixture(&[("s", &["echo first; sleep 0.3; echo second; sleep 0.6"])]);
    f.ctx.limits.flush_interval = Duration::from_millis(250);
    let started = Instant::now();
    let (outcome, events) = run_with(f.ctx, CancellationToken::new()).await;
    assert_eq!(outcome.status, Status::Succeeded);
    let data: Vec<(Instant, Vec<u8>)> = events
        .iter()
        .filter_map(|(t, e)| match e {
            Payload::LogChunk(c) => Some((*t, c.data.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(data.len(), 2, "{data:?}");
    assert_eq!(data[1].1, b"second\n");
    // "second" went out before the job's last sleep ended, i.e. without waiting for the end.
    let finished = events.last().map(|(t, _)| *t).unwrap_or(started);
    assert!(
        finished.duration_since(data[1].0) >= Duration::from_millis(450),
        "the second line was only sent {:?} before the job ended",
        finished.duration_since(data[1].0)
    );
}
#[tokio::test]
async fn environment_is_layered() {
    let mut f = fixture(&[(
        "env",
        &[
            "echo \"$CI $TRIBUTARY $TRIBUTARY_BUILD_ID $TRIBUTARY_JOB $TRIBUTARY_ATTEMPT\"",
            "echo \"$A $B $HOME_SET\"",
        ],
    )]);
    f.ctx.attempt = 2;
    f.ctx.job.env = vec![
        EnvVar {
            name: "A".into(),
            value: "job-a".into(),
        },
        EnvVar {
            name: "B".into(),
            value: "job-b".into(),
        },
        EnvVar {
            name: "CI".into(),
            value: "overridden".into(),
        },
    ];
    f.ctx.extra_env = vec![
        ("B".into(), "extra-b".into()),
        ("HOME_SET".into(), "yes".into()),
    ];
    let (outcome, events) = run(f.ctx).await;
    assert_eq!(outcome.status, Status::Succeeded);
    assert_eq!(
        out(&events, 0, 0),
        "overridden true build-1 test[os=linux] 2\n"
    );
    assert_eq!(out(&events, 0, 1), "job-a extra-b yes\n");
}

#[tokio::test]
async fn spawn_failure_is_a_failed_outcome_with_a_system_chunk() {
    let mut f = fixture(&[("build", &["echo never"])]);
    f.ctx.workdir = f.ctx.workdir.join("does-not-exist");
    let (outcome, events) = run(f.ctx).await;
    assert_eq!(outcome.status, Status::Failed);
    assert_eq!(outcome.exit_code, -1);
    assert!(
        outcome
            .reason
            .contains("cannot start sh for step \"build\""),
        "{}",
        outcome.reason
    );
    assert!(system(&events).contains("cannot start sh"));
    assert!(started_lines(&events).is_empty());
    assert_eq!(step_results(&events), vec![(0, Status::Failed, -1)]);
}

#[tokio::test]
async fn invalid_env_name_fails_clearly() {
    let mut f = fixture(&[("build", &["echo never"])]);
    f.ctx.extra_env = vec![("A=B".into(), "x".into())];
    let (outcome, events) = run(f.ctx).await;
    assert_eq!(outcome.status, Status::Failed);
    assert!(
        outcome.reason.contains("invalid environment variable"),
        "{}",
        outcome.reason
    );
    assert!(system(&events).contains("invalid environment variable"));
}

#[tokio::test]
async fn xtrace_shows_user_commands_only() {
    let f = fixture(&[("s", &["set -x", "true", "false"])]);
    let (outcome, events) = run(f.ctx).await;
    assert_eq!(outcome.exit_code, 1);
    assert_eq!(err(&events, 0, 1), "+ true\n");
    assert!(
        err(&events, 0, 2).starts_with("+ false\n"),
        "{:?}",
        err(&events, 0, 2)
    );
}

#[tokio::test]
async fn background_processes_do_not_hold_up_the_step() {
    let f = fixture(&[("s", &["sleep 20 &", "echo done"]), ("t", &["echo next"])]);
    let begun = Instant::now();
    let (outcome, events) = run(f.ctx).await;
    assert!(
        begun.elapsed() < Duration::from_secs(5),
        "took {:?}",
        begun.elapsed()
    );
    assert_eq!(outcome.status, Status::Succeeded);
    assert_eq!(out(&events, 0, 1), "done\n");
    assert_eq!(out(&events, 1, 0), "next\n");
}

#[tokio::test]
async fn closed_stdout_does_not_confuse_the_lines() {
    let f = fixture(&[(
        "s",
        &[
            "exec >/dev/null",
            "echo hidden",
            "echo visible >&2",
            "exit 5",
        ],
    )]);
    let (outcome, events) = run(f.ctx).await;
    assert_eq!(outcome.exit_code, 5);
    assert_eq!(started_lines(&events), vec![(0, 0), (0, 1), (0, 2), (0, 3)]);
    assert_eq!(err(&events, 0, 2), "visible\n");
    assert_eq!(
        exits(&events),
        vec![(0, 0, 0), (0, 1, 0), (0, 2, 0), (0, 3, 5)]
    );
}

#[tokio::test]
async fn empty_job_and_empty_step_succeed() {
    let f = fixture(&[]);
    let (outcome, events) = run(f.ctx).await;
    assert_eq!(outcome.status, Status::Succeeded);
    assert!(events.is_empty());

    let f = fixture(&[("empty", &[])]);
    let (outcome, events) = run(f.ctx).await;
    assert_eq!(outcome.status, Status::Succeeded);
    assert_eq!(step_results(&events), vec![(0, Status::Succeeded, 0)]);
}

#[tokio::test]
async fn wrapper_scripts_are_removed() {
    let f = fixture(&[("a", &["true"]), ("b", &["false"])]);
    let scratch = f.ctx.scratch_dir.clone();
    let (_, _) = run(f.ctx).await;
    let left: Vec<_> = std::fs::read_dir(&scratch)
        .expect("scratch exists")
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test]
async fn pipe_kept_open_without_markers_is_given_up_on() {
    // After `exec >/dev/null` stdout gets no more markers, but the background sleep keeps the
    // pipe open: each later line boundary waits for it at most about a second (while the shell
    // runs; once it exited, briefly).
    let f = fixture(&[(
        "s",
        &[
            "sleep 10 &",
            "exec >/dev/null",
            "echo visible >&2",
            "echo hidden; sleep 2",
        ],
    )]);
    let begun = Instant::now();
    let (outcome, events) = run(f.ctx).await;
    assert!(
        begun.elapsed() < Duration::from_secs(8),
        "took {:?}",
        begun.elapsed()
    );
    assert_eq!(outcome.status, Status::Succeeded);
    assert_eq!(started_lines(&events), vec![(0, 0), (0, 1), (0, 2), (0, 3)]);
    assert_eq!(err(&events, 0, 2), "visible\n");
    assert_eq!(
        exits(&events),
        vec![(0, 0, 0), (0, 1, 0), (0, 2, 0), (0, 3, 0)]
    );
}

#[tokio::test]
async fn preamble_first_and_failure_note_last_on_the_system_stream() {
    let mut f = fixture(&[
        ("one", &["echo hi"]),
        ("two", &["true", "false", "echo never"]),
    ]);
    f.ctx.preamble = "recreate: tributary run --job test".into();
    f.ctx.failure_note = "workspace kept at /x".into();
    let (outcome, events) = run(f.ctx.clone()).await;
    assert_eq!(outcome.status, Status::Failed);
    let Payload::LogChunk(first) = &events[0] else {
        panic!("the log starts with the preamble: {events:?}");
    };
    assert_eq!(first.stream, Stream::System as i32);
    assert_eq!(first.data, b"recreate: tributary run --job test\n");
    let Some(Payload::LogChunk(last)) = events.last() else {
        panic!("the log ends with the note: {events:?}");
    };
    assert_eq!(last.stream, Stream::System as i32);
    assert_eq!((last.step, last.line), (1, 1), "at the failing line");
    assert_eq!(last.data, b"workspace kept at /x\n");

    // No note when the job succeeds.
    let mut ok = fixture(&[("one", &["true"])]);
    ok.ctx.failure_note = "workspace kept at /x".into();
    let (outcome, events) = run(ok.ctx.clone()).await;
    assert_eq!(outcome.status, Status::Succeeded);
    assert!(!events.iter().any(|e| matches!(e, Payload::LogChunk(_))));
}

const SECRET: &str = "s3cr3t-VALUE-42";

fn with_secret(mut f: Fixture) -> Fixture {
    f.ctx.secrets = std::sync::Arc::new(tributary_executor::mask::Secrets::new([SECRET]));
    f.ctx.extra_env.push(("TOKEN".into(), SECRET.into()));
    f
}

fn no_chunk_holds_the_secret(events: &[Payload]) {
    for c in chunks(events) {
        let text = String::from_utf8_lossy(&c.data);
        assert!(!text.contains(SECRET), "a chunk holds the secret: {c:?}");
        // Not even its first or second half travels alone.
        assert!(
            !text.contains("s3cr3t-"),
            "a chunk holds half the secret: {c:?}"
        );
    }
}

#[tokio::test]
async fn secrets_are_masked_on_stdout_stderr_and_system() {
    let f = with_secret(fixture(&[(
        "print",
        &[
            "echo \"token=$TOKEN.\"",
            "echo \"$TOKEN\" >&2; echo \"two $TOKEN $TOKEN\"",
            "printf '%s' \"$TOKEN\"",
        ],
    )]));
    let mut f = f;
    f.ctx.preamble = format!("preamble {SECRET}");
    let (outcome, events) = run(f.ctx).await;
    assert_eq!(outcome.status, Status::Succeeded, "{outcome:?}");
    assert_eq!(out(&events, 0, 0), "token=***.\n");
    assert_eq!(err(&events, 0, 1), "***\n");
    assert_eq!(out(&events, 0, 1), "two *** ***\n");
    // Output without a newline at the end of a line is held back, then sent at the line's end.
    assert_eq!(out(&events, 0, 2), "***");
    assert!(
        system(&events).contains("preamble ***"),
        "{}",
        system(&events)
    );
    no_chunk_holds_the_secret(&events);
}

#[tokio::test]
async fn a_secret_split_across_flushes_is_masked() {
    let line = "printf 's3cr3t-'; sleep 0.6; printf 'VALUE-42 done\\n'";
    // Without the secret, the two halves are two chunks: the pause is longer than the flush
    // interval, so the sink sends the first half on its own.
    let plain = fixture(&[("slow", &[line])]);
    let (_, events) = run(plain.ctx).await;
    let halves: Vec<String> = chunks(&events)
        .filter(|c| c.stream == Stream::Stdout as i32)
        .map(|c| String::from_utf8_lossy(&c.data).into_owned())
        .collect();
    assert_eq!(
        halves,
        ["s3cr3t-", "VALUE-42 done\n"],
        "the halves are separate flushes"
    );

    let masked = with_secret(fixture(&[("slow", &[line])]));
    let (outcome, events) = run(masked.ctx).await;
    assert_eq!(outcome.status, Status::Succeeded, "{outcome:?}");
    assert_eq!(out(&events, 0, 0), "*** done\n");
    no_chunk_holds_the_secret(&events);
    // Offsets stay gap-free over the masked bytes (check_order ran in `run`).
}

#[tokio::test]
async fn failure_reasons_are_masked() {
    let f = with_secret(fixture(&[("fail", &["false s3cr3t-VALUE-42"])]));
    let (outcome, _) = run(f.ctx).await;
    assert_eq!(outcome.status, Status::Failed);
    assert!(!outcome.reason.contains(SECRET), "{}", outcome.reason);
    assert!(outcome.reason.contains("false ***"), "{}", outcome.reason);
}
