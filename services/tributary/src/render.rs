//! Live rendering of a build from its events: a consumer of the log like any other.
//!
//! On a terminal, each running job gets a spinner showing its current line and the output
//! scrolls above; otherwise plain, prefixed lines (good for CI logs and pipes).

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use console::style;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tributary_eventlog::runtime::{Consumer, Fold, Position};
use tributary_eventlog::{EventLog, LogError};
use tributary_proto::events::{envelope::Payload, Envelope, Status};

pub struct Renderer {
    build_id: String,
    tty: bool,
    multi: MultiProgress,
    bars: HashMap<String, ProgressBar>,
    /// Incomplete output lines per (job, stream).
    partial: HashMap<(String, i32), Vec<u8>>,
    /// Agent id → the name it registered with, shown instead of the id when known.
    agents: HashMap<String, String>,
}

impl Renderer {
    pub fn new(build_id: &str, tty: bool) -> Renderer {
        Renderer {
            build_id: build_id.to_owned(),
            tty,
            multi: MultiProgress::new(),
            bars: HashMap::new(),
            partial: HashMap::new(),
            agents: HashMap::new(),
        }
    }

    /// Whether the name of agent `id` is known.
    pub fn knows_agent(&self, id: &str) -> bool {
        self.agents.contains_key(id)
    }

    /// Agents' names by id, shown instead of their ids.
    pub fn agent_names(&mut self, names: HashMap<String, String>) {
        self.agents.extend(names);
    }

    /// Why `job` waits (a queued job no agent takes yet).
    pub fn waiting(&self, job: &str, reason: &str) {
        let msg = format!("… waiting: {reason}");
        let msg = if self.tty {
            style(msg).yellow().to_string()
        } else {
            msg
        };
        self.print(format!("{} {msg}", self.prefix(job)));
    }

    /// Follows the build's events from `from` (on the one events partition of a local log)
    /// until BuildFinished, on the consumer runtime.
    pub async fn follow(self, log: std::sync::Arc<dyn EventLog>, from: u64) {
        let mut consumer = Consumer::new(Following {
            renderer: self,
            done: false,
        });
        consumer.set_positions(&[(0, from)]);
        let mut sub = consumer.subscribe(log.as_ref(), [0]);
        loop {
            let Ok(records) = sub.next_batch().await else {
                return;
            };
            if consumer.apply(&records).await.is_err() {
                return;
            }
            if consumer.fold().done {
                consumer.into_fold().renderer.finish();
                return;
            }
        }
    }

    fn print(&self, line: String) {
        if self.tty {
            let _ = self.multi.println(line);
        } else {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
        }
    }

    fn prefix(&self, job: &str) -> String {
        if self.tty {
            style(format!("[{job}]")).cyan().to_string()
        } else {
            format!("[{job}]")
        }
    }

    /// Renders one event; true at BuildFinished.
    pub fn event(&mut self, env: &Envelope) -> bool {
        let Some(payload) = &env.payload else {
            return false;
        };
        match payload {
            Payload::JobStarted(e) => {
                let attempt = if e.attempt > 1 {
                    format!(" (attempt {})", e.attempt)
                } else {
                    String::new()
                };
                let agent = match self.agents.get(&e.agent_id) {
                    Some(name) if !name.is_empty() => format!("agent {name}"),
                    _ => format!("agent {}", e.agent_id),
                };
                self.print(format!(
                    "{} started on {agent}{attempt}",
                    self.prefix(&e.job)
                ));
                if self.tty {
                    let bar = self.multi.add(ProgressBar::new_spinner());
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{spinner:.cyan} {prefix:.bold} {msg} {elapsed:.dim}",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                    );
                    bar.set_prefix(e.job.clone());
                    bar.enable_steady_tick(Duration::from_millis(100));
                    self.bars.insert(e.job.clone(), bar);
                }
            }
            Payload::StepStarted(e) => {
                self.print(format!("{} ▶ step {}", self.prefix(&e.job), e.name));
            }
            Payload::LineStarted(e) => {
                let text = first_line(&e.text);
                self.print(format!("{} $ {text}", self.prefix(&e.job)));
                if let Some(bar) = self.bars.get(&e.job) {
                    bar.set_message(text);
                }
            }
            Payload::LogChunk(e) => {
                let key = (e.job.clone(), e.stream);
                let mut buf = self.partial.remove(&key).unwrap_or_default();
                buf.extend_from_slice(&e.data);
                let mut start = 0;
                while let Some(pos) = buf[start..].iter().position(|&b| b == b'\n') {
                    let line = String::from_utf8_lossy(&buf[start..start + pos]).into_owned();
                    self.print(format!("{} {line}", self.prefix(&e.job)));
                    start += pos + 1;
                }
                buf.drain(..start);
                if !buf.is_empty() {
                    self.partial.insert(key, buf);
                }
            }
            Payload::LineExited(e) => {
                self.flush_partial(&e.job);
                if e.exit_code != 0 {
                    let msg = format!("✗ exit {} after {}", e.exit_code, secs(e.duration_us));
                    let msg = if self.tty {
                        style(msg).red().to_string()
                    } else {
                        msg
                    };
                    self.print(format!("{} {msg}", self.prefix(&e.job)));
                }
            }
            Payload::JobFinished(e) => {
                self.flush_partial(&e.job);
                if let Some(bar) = self.bars.remove(&e.job) {
                    bar.finish_and_clear();
                    self.multi.remove(&bar);
                }
                let status = Status::try_from(e.status).unwrap_or(Status::Failed);
                let mut msg = format!("{} {}", mark(status), status_words(status));
                if status == Status::Succeeded || status == Status::Failed {
                    msg.push_str(&format!(" in {}", secs(e.duration_us)));
                }
                if !e.reason.is_empty() {
                    msg.push_str(&format!(": {}", e.reason));
                }
                let msg = if self.tty { colour(status, msg) } else { msg };
                self.print(format!("{} {msg}", self.prefix(&e.job)));
            }
            Payload::JobReused(e) => {
                // `✓ reused from build 12 (ID), job build attempt 1`.
                let msg = format!(
                    "{} {}",
                    mark(Status::Succeeded),
                    tributary_scheduler::reused_reason(e)
                );
                let msg = if self.tty {
                    colour(Status::Succeeded, msg)
                } else {
                    msg
                };
                self.print(format!("{} {msg}", self.prefix(&e.job)));
            }
            Payload::CacheSaved(e) => {
                self.print(format!(
                    "{} cache {:?} saved ({} files, {} bytes)",
                    self.prefix(&e.job),
                    e.key,
                    e.files,
                    e.size
                ));
            }
            Payload::BuildCanceled(e) => {
                self.print(format!("build canceled by {}", e.who));
            }
            Payload::PipelineRejected(e) => {
                self.print(format!("{}:{}:{}: {}", e.file, e.line, e.column, e.message));
            }
            Payload::BuildFinished(e) => {
                let status = Status::try_from(e.status).unwrap_or(Status::Failed);
                let mut msg = format!("build {} {}", self.build_id, status_words(status));
                if !e.reason.is_empty() {
                    msg.push_str(&format!(": {}", e.reason));
                }
                let msg = if self.tty { colour(status, msg) } else { msg };
                self.print(msg);
                return true;
            }
            _ => {}
        }
        false
    }

    fn flush_partial(&mut self, job: &str) {
        let keys: Vec<_> = self
            .partial
            .keys()
            .filter(|(j, _)| j == job)
            .cloned()
            .collect();
        for key in keys {
            if let Some(buf) = self.partial.remove(&key) {
                self.print(format!(
                    "{} {}",
                    self.prefix(job),
                    String::from_utf8_lossy(&buf)
                ));
            }
        }
    }

    pub fn finish(&mut self) {
        for (_, bar) in self.bars.drain() {
            bar.finish_and_clear();
        }
        let _ = self.multi.clear();
    }
}

fn first_line(text: &str) -> String {
    let mut lines = text.lines();
    let first = lines.next().unwrap_or("").to_owned();
    if lines.next().is_some() {
        format!("{first} …")
    } else {
        first
    }
}

fn secs(us: u64) -> String {
    format!("{:.2}s", us as f64 / 1e6)
}

/// A status as a person writes it: `timed out`, not `timed_out`.
fn status_words(status: Status) -> String {
    status.name().replace('_', " ")
}

fn mark(status: Status) -> &'static str {
    match status {
        Status::Succeeded => "✓",
        Status::Skipped => "○",
        _ => "✗",
    }
}

fn colour(status: Status, msg: String) -> String {
    match status {
        Status::Succeeded => style(msg).green().to_string(),
        Status::Skipped | Status::Canceled => style(msg).yellow().to_string(),
        _ => style(msg).red().to_string(),
    }
}

/// A [`Renderer`] as a fold of the log: this build's events rendered until BuildFinished.
struct Following {
    renderer: Renderer,
    done: bool,
}

impl Fold for Following {
    type Error = LogError;

    fn name(&self) -> &'static str {
        "render"
    }

    async fn apply(&mut self, _at: Position, env: Envelope) -> Result<(), LogError> {
        if !self.done && env.build_id == self.renderer.build_id && self.renderer.event(&env) {
            self.done = true;
        }
        Ok(())
    }
}
