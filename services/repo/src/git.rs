//! Running the `git` CLI: never through a shell, with prompts disabled, a clean git environment,
//! in its own session and process group, and killed (the whole group) on timeout or when the
//! caller stops waiting.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use crate::error::{hint_for, RepoError};
use crate::source::Source;

/// How long git commands may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Commands that transfer or write a lot: clone, fetch, ls-remote, and populating a
    /// workspace (clone from the mirror, checkout, submodules). Default 10 minutes.
    pub network: Duration,
    /// Quick local queries: rev-parse, cat-file, config. Default 30 seconds.
    pub local: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            network: Duration::from_secs(600),
            local: Duration::from_secs(30),
        }
    }
}

/// Environment variables that would point git at another repository than the one we name.
const CLEARED_ENV: &[&str] = &[
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_COMMON_DIR",
    "GIT_NAMESPACE",
    "GIT_PREFIX",
    "GIT_QUARANTINE_PATH",
];

/// What a git command printed and how it ended.
pub(crate) struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Output {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).trim().to_owned()
    }
}

/// Runs git for one repository (named in errors).
#[derive(Clone, Copy)]
pub(crate) struct Git<'a> {
    pub source: &'a Source,
    pub timeouts: Timeouts,
    /// `GIT_ALLOW_PROTOCOL`: the only protocols git may use, for the repository itself and for
    /// submodules (colon-separated, e.g. `https:ssh`).
    pub allow: &'a str,
}

/// Which timeout applies.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Kind {
    Network,
    Local,
}

impl Git<'_> {
    /// Runs `git <args>` in `dir`; Ok even when git exits non-zero (see [`Git::run`]).
    pub async fn output<S: AsRef<OsStr>>(
        &self,
        kind: Kind,
        dir: Option<&Path>,
        args: &[S],
    ) -> Result<Output, RepoError> {
        let timeout = match kind {
            Kind::Network => self.timeouts.network,
            Kind::Local => self.timeouts.local,
        };
        let mut cmd = tokio::process::Command::new("git");
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GCM_INTERACTIVE", "never")
            .env("LC_ALL", "C")
            .env("LANGUAGE", "C")
            .env("GIT_ALLOW_PROTOCOL", self.allow)
            .kill_on_drop(true);
        for var in CLEARED_ENV {
            cmd.env_remove(var);
        }
        if let Some(dir) = dir {
            cmd.current_dir(dir);
        }
        // git and all its children form one process group (pgid = git's pid) that killpg can
        // end at once. `process_group` (not a `pre_exec` hook) lets std spawn with
        // posix_spawn instead of forking the whole multi-threaded server for every git call.
        // Nothing may stop to ask on a terminal: GIT_TERMINAL_PROMPT above, and ssh in batch
        // mode unless the user configured their own ssh command.
        cmd.process_group(0);
        if std::env::var_os("GIT_SSH_COMMAND").is_none() && std::env::var_os("GIT_SSH").is_none() {
            cmd.env("GIT_SSH_COMMAND", "ssh -o BatchMode=yes");
        }

        let command = self.describe(args);
        let child = cmd.spawn().map_err(|e| {
            let context = if e.kind() == std::io::ErrorKind::NotFound {
                format!("cannot run `{command}`: is git installed and on PATH?")
            } else {
                format!("cannot run `{command}` for {}", self.source.display)
            };
            RepoError::io(context, e)
        })?;
        let mut group = GroupGuard(child.id().and_then(|pid| i32::try_from(pid).ok()));
        tracing::debug!(repository = %self.source.display, %command, "git");

        match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Ok(Ok(out)) => {
                group.0 = None;
                let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
                Ok(Output {
                    status: out.status,
                    stdout: out.stdout,
                    stderr,
                })
            }
            Ok(Err(e)) => Err(RepoError::io(
                format!("waiting for `{command}` for {}", self.source.display),
                e,
            )),
            // The guard kills the whole group as it drops.
            Err(_elapsed) => Err(RepoError::Timeout {
                repository: self.source.display.clone(),
                command,
                timeout,
                hint: match kind {
                    Kind::Network => {
                        "the remote may be slow or unreachable, or the repository very large: \
                         check the network, or raise Timeouts::network"
                    }
                    Kind::Local => {
                        "the disk may be very slow or the repository huge: raise Timeouts::local"
                    }
                }
                .to_owned(),
            }),
        }
    }

    /// Runs `git <args>` and returns its stdout, or [`RepoError::Git`] with its stderr.
    pub async fn run<S: AsRef<OsStr>>(
        &self,
        kind: Kind,
        dir: Option<&Path>,
        args: &[S],
    ) -> Result<Vec<u8>, RepoError> {
        let out = self.output(kind, dir, args).await?;
        if out.status.success() {
            Ok(out.stdout)
        } else {
            Err(self.failed(args, &out))
        }
    }

    /// The [`RepoError::Git`] for a command that exited unsuccessfully.
    pub fn failed<S: AsRef<OsStr>>(&self, args: &[S], out: &Output) -> RepoError {
        let stderr = redact(&out.stderr, self.source);
        let stderr = tail(&stderr, 4000);
        RepoError::Git {
            repository: self.source.display.clone(),
            command: self.describe(args),
            status: out.status.to_string(),
            hint: hint_for(&stderr).to_owned(),
            stderr: if stderr.is_empty() {
                "(git printed nothing on stderr)".to_owned()
            } else {
                stderr
            },
        }
    }

    /// `git a b c` for messages, with the repository's credentials redacted.
    fn describe<S: AsRef<OsStr>>(&self, args: &[S]) -> String {
        let mut s = String::from("git");
        for a in args {
            s.push(' ');
            s.push_str(&redact(&a.as_ref().to_string_lossy(), self.source));
        }
        s
    }
}

fn redact(text: &str, source: &Source) -> String {
    if source.location != source.display {
        text.replace(&source.location, &source.display)
    } else {
        text.to_owned()
    }
}

/// The last `max` bytes of `s` (on a char boundary), marked as cut.
fn tail(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &s[start..])
}

/// Kills git's process group unless disarmed (set to None once git has exited by itself).
struct GroupGuard(Option<i32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.0.filter(|&p| p > 1) {
            // SAFETY: killpg only sends a signal. pgid is git's pid, which process_group(0) made the id of
            // its own process group; git has not been reaped yet (we stopped waiting for it before
            // it exited), so the id cannot have been reused.
            unsafe {
                libc::killpg(pgid, libc::SIGKILL);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn source() -> Source {
        Source::parse(env!("CARGO_MANIFEST_DIR")).unwrap()
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        let source = source();
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("survived");
        let git = Git {
            source: &source,
            allow: "https",
            timeouts: Timeouts {
                network: Duration::from_secs(600),
                local: Duration::from_millis(300),
            },
        };
        // A git alias runs a shell child; it must die with git.
        let alias = format!("alias.hang=!sleep 2; touch '{}'", marker.display());
        let started = Instant::now();
        let err = git
            .output(Kind::Local, Some(dir.path()), &["-c", &alias, "hang"])
            .await
            .err()
            .expect("must time out");
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(matches!(err, RepoError::Timeout { .. }), "{err}");
        assert!(err.to_string().contains("git -c alias.hang"), "{err}");
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(!marker.exists(), "the alias' shell outlived the timeout");
    }

    #[tokio::test]
    async fn failures_carry_stderr_and_a_hint() {
        let source = source();
        let git = Git {
            source: &source,
            allow: "https",
            timeouts: Timeouts::default(),
        };
        let err = git
            .run(
                Kind::Local,
                None,
                &["rev-parse", "--verify", "no-such-ref-xyz"],
            )
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("git rev-parse --verify no-such-ref-xyz"),
            "{msg}"
        );
        assert!(msg.contains("fatal"), "{msg}");
        assert!(msg.contains("hint:"), "{msg}");
    }

    #[tokio::test]
    async fn git_uses_only_the_allowed_protocols() {
        let source = source();
        let dir = tempfile::tempdir().unwrap();
        let init = std::process::Command::new("git")
            .args(["init", "-q"])
            .current_dir(dir.path())
            .status()
            .unwrap();
        assert!(init.success());
        let repo = dir.path().to_str().unwrap();
        let git = |allow| Git {
            source: &source,
            allow,
            timeouts: Timeouts::default(),
        };
        // git itself allows local paths; GIT_ALLOW_PROTOCOL without `file` refuses them.
        let err = git("https:ssh")
            .run(Kind::Local, None, &["ls-remote", "--", repo, "HEAD"])
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("transport 'file' not allowed"), "{msg}");
        assert!(msg.contains("--allow-protocols"), "{msg}");
        git("file")
            .run(Kind::Local, None, &["ls-remote", "--", repo, "HEAD"])
            .await
            .unwrap();
    }

    #[test]
    fn tail_cuts_on_char_boundaries() {
        assert_eq!(tail("abc", 10), "abc");
        assert_eq!(tail("aéé", 3), "...é");
    }
}
