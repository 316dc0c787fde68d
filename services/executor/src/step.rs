//! Runs one step: a fresh `sh` on the generated wrapper script (on the host, or `exec`ed in the
//! job's container: see [`crate::process::StepProcess`]), its two pipes merged into ordered line
//! events.
//!
//! # Merging the pipes
//!
//! Both pipes carry the same markers (see [`crate::marker`]). A [`Coordinator`] keeps one queue of
//! scanned items per pipe and at most one open line:
//!
//! * `Start(i)` on the first pipe that reaches it opens line `i` (LineStarted); on the other pipe it
//!   just confirms the line.
//! * Output is the open line's.
//! * `Exit(i, rc)` records the line's exit code.
//! * A pipe whose next item is `Start(j)` with `j` beyond the open line is at a boundary: it is not
//!   read further until the other pipe reaches the boundary too (or ends). Then the line is
//!   closed: its buffered output is flushed, LineExited is sent, and `Start(j)` opens the next one.
//!   So events are always LineStarted(i), chunks of i, LineExited(i), LineStarted(i+1), and output
//!   written between `Exit(i)` and `Start(i+1)` (by background processes) still counts as line i's.
//!
//! The wrapper writes each marker to both pipes before it runs anything else, so when one pipe is
//! at a boundary the other holds the matching marker or is about to; a pipe that still has
//! nothing to read after [`LAG_LIMIT`] (a line ran `exec >/dev/null` while a background process
//! keeps the pipe open) is given up on and the line closed without it.
//!
//! When the shell exits, the pipes are read until both end or for [`DRAIN_GRACE`] (a background
//! process may hold them open), then the process group is killed: background processes do not
//! outlive their step.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tributary_proto::events::envelope::Payload;
use tributary_proto::events::{
    LineExited, LineStarted, Status, StepFinished, StepPlan, StepStarted,
};

use crate::marker::{Item, MarkerScanner};
use crate::process::{HostProcess, StepProcess};
use crate::script;
use crate::sink::{Sink, STDERR, STDOUT};

/// How long after the shell exits its pipes are still read when something keeps them open.
const DRAIN_GRACE: Duration = Duration::from_millis(250);
/// How long one pipe may wait at a line boundary for the other pipe, while that one has nothing
/// to read, before the line is closed without it.
const LAG_LIMIT: Duration = Duration::from_secs(1);
/// ... and at most, even if the other pipe keeps bringing output (a background writer).
const LAG_HARD_LIMIT: Duration = Duration::from_secs(10);
/// Between SIGTERM and SIGKILL when a step is canceled or times out.
const KILL_GRACE: Duration = Duration::from_millis(500);
/// Size of one read from a pipe.
const READ_SIZE: usize = 64 * 1024;
/// Most bytes read from a pipe once the drain grace is over.
const FINAL_DRAIN_MAX: usize = 4 * 1024 * 1024;

/// Why the executor killed a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kill {
    Canceled,
    TimedOut,
}

/// Where a job's step shells run.
#[derive(Clone, Copy)]
pub(crate) enum Runner<'a> {
    Host,
    /// In the job's container, one `exec` per step.
    Container(&'a crate::container::JobContainer),
}

/// What the step's shell is given, shared by all steps of a job.
pub(crate) struct StepEnv<'a> {
    pub nonce: &'a str,
    /// Where the step's shell runs.
    pub runner: Runner<'a>,
    pub workdir: &'a Path,
    pub scratch_dir: &'a Path,
    /// Variables set on top of the inherited environment, in order (later wins).
    pub env: &'a [(String, String)],
    pub deadline: Option<Instant>,
    pub cancel: &'a CancellationToken,
}

#[derive(Debug)]
pub(crate) struct StepOutcome {
    pub status: Status,
    pub exit_code: i32,
    /// Why the step did not succeed (empty on success).
    pub reason: String,
}

pub(crate) async fn run_step(
    sink: &mut Sink,
    env: &StepEnv<'_>,
    index: u32,
    step: &StepPlan,
) -> StepOutcome {
    sink.step = index;
    let started = Instant::now();
    let (job, attempt) = (sink.job.clone(), sink.attempt);
    sink.send(Payload::StepStarted(StepStarted {
        job: job.clone(),
        attempt,
        step: index,
        name: step.name.clone(),
    }))
    .await;

    let outcome = match write_script(env, &job, index, step).await {
        Err(msg) => failed_to_start(sink, index, msg).await,
        Ok(script) => {
            let outcome = match env.runner {
                Runner::Host => match spawn_host(env, step, &script).await {
                    Ok(process) => supervise(sink, env, step, process).await,
                    Err(msg) => failed_to_start(sink, index, msg).await,
                },
                Runner::Container(container) => {
                    match container.spawn_step(env.env, step, &script).await {
                        Ok(process) => supervise(sink, env, step, process).await,
                        Err(msg) => failed_to_start(sink, index, msg).await,
                    }
                }
            };
            remove_script(&script).await;
            outcome
        }
    };

    sink.send(Payload::StepFinished(StepFinished {
        job,
        attempt,
        step: index,
        status: outcome.status as i32,
        exit_code: outcome.exit_code,
        duration_us: duration_us(started.elapsed()),
    }))
    .await;
    outcome
}

async fn remove_script(path: &Path) {
    if let Err(e) = tokio::fs::remove_file(path).await {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), "cannot remove wrapper script: {e}");
        }
    }
}

async fn failed_to_start(sink: &mut Sink, index: u32, msg: String) -> StepOutcome {
    tracing::error!(step = index, "{msg}");
    sink.system(0, &msg).await;
    StepOutcome {
        status: Status::Failed,
        exit_code: -1,
        reason: msg,
    }
}

/// Checks the environment and writes the wrapper script into the scratch directory. Errors are
/// complete sentences for the log.
async fn write_script(
    env: &StepEnv<'_>,
    job: &str,
    index: u32,
    step: &StepPlan,
) -> Result<PathBuf, String> {
    for (name, value) in env.env {
        if name.is_empty() || name.contains(['=', '\0']) || value.contains('\0') {
            return Err(format!(
                "cannot start step \"{}\": invalid environment variable {name:?}",
                step.name
            ));
        }
    }
    let text = script::wrapper(env.nonce, job, index as usize, step);
    let nonce_prefix = env.nonce.get(..12).unwrap_or(env.nonce);
    let path = env
        .scratch_dir
        .join(format!("step-{index}-{nonce_prefix}.sh"));
    write_private(&path, text.as_bytes()).await.map_err(|e| {
        format!(
            "cannot write the wrapper script for step \"{}\" to {}: {e}",
            step.name,
            path.display()
        )
    })?;
    Ok(path)
}

/// Starts `sh` on the wrapper script on the host, in its own process group.
async fn spawn_host(
    env: &StepEnv<'_>,
    step: &StepPlan,
    script: &Path,
) -> Result<HostProcess, String> {
    let mut cmd = Command::new("sh");
    cmd.arg(script)
        .current_dir(env.workdir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    for (name, value) in env.env {
        cmd.env(name, value);
    }
    cmd.spawn().map(HostProcess::new).map_err(|e| {
        format!(
            "cannot start sh for step \"{}\" in {}: {e}",
            step.name,
            env.workdir.display()
        )
    })
}

async fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await?;
    }
    let mut f = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .await?;
    f.write_all(data).await?;
    f.flush().await
}

enum Event {
    Cancel,
    Timeout,
    Escalate,
    Read(usize, std::io::Result<usize>),
    Exited(std::io::Result<i32>),
    DrainOver,
    Flush,
    Lag,
}

enum TryRead {
    Data(Vec<Item>),
    Ended(Vec<Item>),
    Nothing,
}

/// One output pipe of the shell and its marker scanner.
struct Pipe<R> {
    reader: Option<R>,
    scanner: MarkerScanner,
    buf: Vec<u8>,
}

impl<R: AsyncRead + Unpin> Pipe<R> {
    fn new(reader: Option<R>, nonce: &str) -> Self {
        Pipe {
            reader,
            scanner: MarkerScanner::new(nonce),
            buf: vec![0u8; READ_SIZE],
        }
    }

    /// Reads into `buf`; never completes once the pipe is closed.
    async fn read(&mut self) -> std::io::Result<usize> {
        match &mut self.reader {
            Some(r) => r.read(&mut self.buf).await,
            None => std::future::pending().await,
        }
    }

    /// Scans the first `n` bytes of `buf`.
    fn scan(&mut self, n: usize) -> Vec<Item> {
        self.scanner.feed(&self.buf[..n])
    }

    /// Closes the pipe: what the scanner held back is output.
    fn close(&mut self) -> Vec<Item> {
        self.reader = None;
        self.scanner.finish()
    }

    /// Reads once if data is there right now.
    async fn try_read(&mut self) -> TryRead {
        let Some(r) = &mut self.reader else {
            return TryRead::Nothing;
        };
        match tokio::time::timeout(Duration::ZERO, r.read(&mut self.buf)).await {
            Ok(Ok(n)) if n > 0 => TryRead::Data(self.scanner.feed(&self.buf[..n])),
            Ok(_) => TryRead::Ended(self.close()),
            Err(_) => TryRead::Nothing,
        }
    }

    /// Reads what is in the pipe right now (bounded: a background process may keep writing),
    /// then closes it.
    async fn drain_and_close(&mut self) -> Vec<Item> {
        let mut items = Vec::new();
        let mut total = 0;
        while total < FINAL_DRAIN_MAX {
            let Some(r) = &mut self.reader else { break };
            match tokio::time::timeout(Duration::from_millis(5), r.read(&mut self.buf)).await {
                Ok(Ok(n)) if n > 0 => {
                    items.extend(self.scanner.feed(&self.buf[..n]));
                    total += n;
                }
                _ => break,
            }
        }
        items.extend(self.close());
        items
    }
}

async fn sleep_opt(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Runs the spawned shell to its end, sending line events and output.
async fn supervise<P: StepProcess>(
    sink: &mut Sink,
    env: &StepEnv<'_>,
    step: &StepPlan,
    mut child: P,
) -> StepOutcome {
    let (out, err) = child.take_pipes();
    let mut stdout = Pipe::new(out, env.nonce);
    let mut stderr = Pipe::new(err, env.nonce);
    let mut co = Coordinator::new(step);
    co.streams[STDOUT].eof = stdout.reader.is_none();
    co.streams[STDERR].eof = stderr.reader.is_none();

    let mut exit_code: Option<i32> = None;
    let mut kill: Option<Kill> = None;
    let mut escalate_at: Option<Instant> = None;
    let mut drain_until: Option<Instant> = None;
    // Since when one pipe waits at a line boundary for the other.
    let mut lag_since: Option<Instant> = None;

    loop {
        co.pump(sink, exit_code).await;
        if exit_code.is_some() && co.done() {
            break;
        }
        let now = Instant::now();
        // Timers are also checked here, so a pipe that is always readable cannot starve them.
        if co.open.is_some() && sink.flush_at.is_some_and(|t| t <= now) {
            co.flush(sink).await;
        }
        if let Some(s) = co.lagging_pipe() {
            let since = *lag_since.get_or_insert(now);
            if now >= since + LAG_LIMIT {
                // Give the lagging pipe one more chance: anything in it right now is taken.
                let read = if now >= since + LAG_HARD_LIMIT {
                    TryRead::Nothing
                } else if s == STDOUT {
                    stdout.try_read().await
                } else {
                    stderr.try_read().await
                };
                match read {
                    TryRead::Data(items) => co.streams[s].queue.extend(items),
                    TryRead::Ended(items) => {
                        co.streams[s].queue.extend(items);
                        co.streams[s].eof = true;
                    }
                    TryRead::Nothing => {
                        tracing::warn!(
                            stream = s,
                            "an output pipe fell out of step with the shell; \
                             closing the line without it"
                        );
                        co.force_close = true;
                        lag_since = None;
                    }
                }
                continue;
            }
        } else {
            lag_since = None;
        }
        if drain_until.is_some_and(|t| t <= now) {
            drain_until = None;
            end_pipes(&mut co, &mut stdout, &mut stderr).await;
            continue;
        }

        let running = exit_code.is_none();
        let read_out = stdout.reader.is_some() && co.streams[STDOUT].queue.is_empty();
        let read_err = stderr.reader.is_some() && co.streams[STDERR].queue.is_empty();
        let flush_at = if co.open.is_some() {
            sink.flush_at
        } else {
            None
        };
        let event = tokio::select! {
            _ = env.cancel.cancelled(), if running && kill.is_none() => Event::Cancel,
            _ = sleep_opt(env.deadline), if running && kill.is_none() && env.deadline.is_some() => Event::Timeout,
            _ = sleep_opt(escalate_at), if running && escalate_at.is_some() => Event::Escalate,
            r = stdout.read(), if read_out => Event::Read(STDOUT, r),
            r = stderr.read(), if read_err => Event::Read(STDERR, r),
            r = child.wait(), if running => Event::Exited(r),
            _ = sleep_opt(drain_until), if drain_until.is_some() => Event::DrainOver,
            _ = sleep_opt(flush_at), if flush_at.is_some() => Event::Flush,
            _ = sleep_opt(lag_since.map(|t| t + LAG_LIMIT)), if lag_since.is_some() => Event::Lag,
        };

        match event {
            Event::Cancel | Event::Timeout => {
                let why = if matches!(event, Event::Cancel) {
                    Kill::Canceled
                } else {
                    Kill::TimedOut
                };
                tracing::info!(?why, "killing the step's process group");
                kill = Some(why);
                child.terminate();
                escalate_at = Some(Instant::now() + KILL_GRACE);
            }
            Event::Escalate => {
                escalate_at = None;
                child.kill();
            }
            Event::Read(s, Ok(n)) if n > 0 => {
                let items = if s == STDOUT {
                    stdout.scan(n)
                } else {
                    stderr.scan(n)
                };
                co.streams[s].queue.extend(items);
            }
            Event::Read(s, result) => {
                if let Err(e) = result {
                    tracing::warn!(stream = s, "reading the step's output failed: {e}");
                }
                let items = if s == STDOUT {
                    stdout.close()
                } else {
                    stderr.close()
                };
                co.streams[s].queue.extend(items);
                co.streams[s].eof = true;
            }
            Event::Exited(r) => {
                let code = match r {
                    Ok(code) => code,
                    Err(e) => {
                        tracing::error!("waiting for the step's shell failed: {e}");
                        -1
                    }
                };
                tracing::debug!(code, "step shell exited");
                exit_code = Some(code);
                escalate_at = None;
                drain_until = Some(Instant::now() + DRAIN_GRACE);
            }
            Event::DrainOver => {
                drain_until = None;
                end_pipes(&mut co, &mut stdout, &mut stderr).await;
            }
            Event::Flush => co.flush(sink).await,
            Event::Lag => {}
        }
    }
    // Background processes do not outlive their step.
    child.end();
    // Output no line claimed (the shell failed before the first marker), and whatever the
    // secret maskers still hold: the step's shell is gone.
    sink.end_line(co.current_line()).await;

    let shell_code = exit_code.unwrap_or(-1);
    if let Some(why) = kill {
        let exit_code = co.last_closed.map_or(shell_code, |(_, rc)| rc);
        let status = match why {
            Kill::Canceled => Status::Canceled,
            Kill::TimedOut => Status::TimedOut,
        };
        return StepOutcome {
            status,
            exit_code,
            reason: String::new(),
        };
    }
    if let Some((line, rc)) = co.first_failed {
        let text = step
            .lines
            .get(line as usize)
            .map(String::as_str)
            .unwrap_or("");
        return StepOutcome {
            status: Status::Failed,
            exit_code: rc,
            reason: format!(
                "line {} of step \"{}\" exited with {rc}: {}",
                line + 1,
                step.name,
                summarize(text)
            ),
        };
    }
    if shell_code != 0 {
        let reason = match co.last_closed {
            None => format!(
                "step \"{}\": sh exited with {shell_code} before running any line",
                step.name
            ),
            Some((line, _)) => format!(
                "step \"{}\": sh exited with {shell_code} after line {}",
                step.name,
                line + 1
            ),
        };
        return StepOutcome {
            status: Status::Failed,
            exit_code: shell_code,
            reason,
        };
    }
    StepOutcome {
        status: Status::Succeeded,
        exit_code: 0,
        reason: String::new(),
    }
}

/// Stops reading both pipes after taking what they hold right now; they count as ended.
async fn end_pipes<O: AsyncRead + Unpin, E: AsyncRead + Unpin>(
    co: &mut Coordinator<'_>,
    stdout: &mut Pipe<O>,
    stderr: &mut Pipe<E>,
) {
    if !co.streams[STDOUT].eof {
        co.streams[STDOUT]
            .queue
            .extend(stdout.drain_and_close().await);
        co.streams[STDOUT].eof = true;
    }
    if !co.streams[STDERR].eof {
        co.streams[STDERR]
            .queue
            .extend(stderr.drain_and_close().await);
        co.streams[STDERR].eof = true;
    }
}

/// The first line of `text`, at most 100 characters, with `...` when anything was left out.
fn summarize(text: &str) -> String {
    let first = text.lines().next().unwrap_or("");
    let mut s: String = first.chars().take(100).collect();
    if s.len() < text.trim_end().len() {
        s.push_str(" ...");
    }
    s
}

pub(crate) fn duration_us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[derive(Default)]
struct PipeState {
    /// Scanned items not yet turned into events.
    queue: VecDeque<Item>,
    /// No more items will be added.
    eof: bool,
}

struct OpenLine {
    line: u32,
    started: Instant,
    code: Option<i32>,
    exited_at: Option<Instant>,
}

/// Merges the two pipes' items into ordered line events. See the module docs.
struct Coordinator<'a> {
    step: &'a StepPlan,
    streams: [PipeState; 2],
    open: Option<OpenLine>,
    next_line: u32,
    /// Close the open line without waiting for a lagging pipe.
    force_close: bool,
    last_closed: Option<(u32, i32)>,
    first_failed: Option<(u32, i32)>,
}

impl<'a> Coordinator<'a> {
    fn new(step: &'a StepPlan) -> Self {
        Coordinator {
            step,
            streams: [PipeState::default(), PipeState::default()],
            open: None,
            next_line: 0,
            force_close: false,
            last_closed: None,
            first_failed: None,
        }
    }

    /// The line output is attributed to right now: the open one; between lines (which only
    /// happens when a pipe was given up on, or before the first line) the last or the first.
    fn current_line(&self) -> u32 {
        match (&self.open, self.last_closed) {
            (Some(open), _) => open.line,
            (None, Some((line, _))) => line,
            (None, None) => 0,
        }
    }

    /// Both pipes ended, everything they carried is processed and no line is open.
    fn done(&self) -> bool {
        self.open.is_none() && self.streams.iter().all(|s| s.eof && s.queue.is_empty())
    }

    /// `s` has nothing more for the open line.
    fn past_open_line(&self, s: usize) -> bool {
        let Some(open) = &self.open else { return true };
        let st = &self.streams[s];
        match st.queue.front() {
            None => st.eof,
            Some(Item::Start { line }) => *line > open.line,
            Some(_) => false,
        }
    }

    fn at_boundary(&self, s: usize) -> bool {
        self.open.is_some() && !self.streams[s].queue.is_empty() && self.past_open_line(s)
    }

    /// The pipe that has not reached a boundary the other pipe waits at.
    fn lagging_pipe(&self) -> Option<usize> {
        if self.at_boundary(STDOUT) && !self.past_open_line(STDERR) {
            Some(STDERR)
        } else if self.at_boundary(STDERR) && !self.past_open_line(STDOUT) {
            Some(STDOUT)
        } else {
            None
        }
    }

    async fn flush(&mut self, sink: &mut Sink) {
        sink.flush(self.current_line()).await;
    }

    /// Turns queued items into events as far as the ordering rules allow.
    async fn pump(&mut self, sink: &mut Sink, shell_exit: Option<i32>) {
        loop {
            let mut progressed = false;
            for s in [STDOUT, STDERR] {
                while let Some(item) = self.streams[s].queue.pop_front() {
                    match item {
                        Item::Output(data) => sink.output(self.current_line(), s, &data).await,
                        Item::Start { line } => match &self.open {
                            Some(open) if line > open.line => {
                                // At a boundary: wait for the other pipe.
                                self.streams[s].queue.push_front(item);
                                break;
                            }
                            // Confirms the open line, or a stale marker.
                            Some(_) => {}
                            None if line >= self.next_line
                                && (line as usize) < self.step.lines.len() =>
                            {
                                self.start_line(sink, line).await;
                            }
                            None => {
                                tracing::warn!(line, "ignoring an out-of-order line start marker")
                            }
                        },
                        Item::Exit { line, code } => {
                            if let Some(open) = self.open.as_mut().filter(|o| o.line == line) {
                                open.code.get_or_insert(code);
                                open.exited_at = Some(Instant::now());
                            }
                        }
                    }
                    progressed = true;
                }
            }
            if self.open.is_some() && self.can_close(shell_exit) {
                self.close_line(sink, shell_exit).await;
                progressed = true;
            }
            if !progressed {
                break;
            }
        }
    }

    fn can_close(&self, shell_exit: Option<i32>) -> bool {
        let Some(open) = &self.open else { return false };
        if self.force_close {
            return true;
        }
        if !(self.past_open_line(STDOUT) && self.past_open_line(STDERR)) {
            return false;
        }
        // Without an exit marker the code is the shell's: wait for it, unless the next line began.
        open.code.is_some()
            || shell_exit.is_some()
            || self.at_boundary(STDOUT)
            || self.at_boundary(STDERR)
    }

    async fn start_line(&mut self, sink: &mut Sink, line: u32) {
        sink.last_line = line;
        self.open = Some(OpenLine {
            line,
            started: Instant::now(),
            code: None,
            exited_at: None,
        });
        self.next_line = line + 1;
        let text = self
            .step
            .lines
            .get(line as usize)
            .cloned()
            .unwrap_or_default();
        tracing::debug!(line, "line started");
        sink.send(Payload::LineStarted(LineStarted {
            job: sink.job.clone(),
            attempt: sink.attempt,
            step: sink.step,
            line,
            text,
        }))
        .await;
    }

    async fn close_line(&mut self, sink: &mut Sink, shell_exit: Option<i32>) {
        let Some(open) = self.open.take() else { return };
        self.force_close = false;
        sink.end_line(open.line).await;
        let code = open.code.or(shell_exit).unwrap_or(-1);
        let ended = open.exited_at.unwrap_or_else(Instant::now);
        tracing::debug!(line = open.line, code, "line exited");
        sink.send(Payload::LineExited(LineExited {
            job: sink.job.clone(),
            attempt: sink.attempt,
            step: sink.step,
            line: open.line,
            exit_code: code,
            duration_us: duration_us(ended.saturating_duration_since(open.started)),
        }))
        .await;
        self.last_closed = Some((open.line, code));
        if code != 0 && self.first_failed.is_none() {
            self.first_failed = Some((open.line, code));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summarize_keeps_the_first_line() {
        assert_eq!(summarize("false"), "false");
        assert_eq!(summarize("a\nb"), "a ...");
        assert_eq!(summarize("x\n"), "x");
        assert_eq!(summarize(&"é".repeat(150)).chars().count(), 104);
    }
}
