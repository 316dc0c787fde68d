//! A step's running shell, wherever it runs: on the host ([`HostProcess`]) or inside a job's
//! container ([`crate::container::ExecProcess`]). The step supervisor only needs the shell's two
//! output pipes, its exit code, and a way to stop it.

use std::future::Future;

use tokio::io::AsyncRead;

/// A running step shell, as the supervisor (`step.rs`) sees it.
pub(crate) trait StepProcess {
    type Stdout: AsyncRead + Unpin;
    type Stderr: AsyncRead + Unpin;

    /// The shell's stdout and stderr (each taken once).
    fn take_pipes(&mut self) -> (Option<Self::Stdout>, Option<Self::Stderr>);

    /// The shell's exit code as a shell reports it (the code, or 128 + signal number).
    /// Cancel-safe: the supervisor polls it in a `select!`.
    fn wait(&mut self) -> impl Future<Output = std::io::Result<i32>>;

    /// Asks everything the step runs to stop (cancel, timeout).
    fn terminate(&mut self);

    /// Stops everything the step runs, now (after the grace of [`StepProcess::terminate`]).
    fn kill(&mut self);

    /// The step is over: what it left running in the background must not outlive it where the
    /// executor can enforce that.
    fn end(&mut self);
}

/// A step's `sh` on the host, leader of its own process group.
pub(crate) struct HostProcess {
    child: tokio::process::Child,
    pgid: Option<i32>,
}

impl HostProcess {
    pub(crate) fn new(child: tokio::process::Child) -> Self {
        let pgid = child.id().and_then(|p| i32::try_from(p).ok());
        HostProcess { child, pgid }
    }

    /// Sends `sig` to the step's process group (or, without a group id, kills the shell alone).
    fn signal_group(&mut self, sig: libc::c_int) {
        match self.pgid {
            Some(pgid) if pgid > 1 => {
                // SAFETY: killpg has no memory-safety preconditions: it only sends a signal.
                // pgid is the step shell's pid, which `process_group(0)` made the id of its own
                // group.
                let rc = unsafe { libc::killpg(pgid, sig) };
                if rc != 0 {
                    let err = std::io::Error::last_os_error();
                    if err.raw_os_error() != Some(libc::ESRCH) {
                        tracing::warn!(pgid, sig, "killpg failed: {err}");
                    }
                }
            }
            _ => {
                let _ = self.child.start_kill();
            }
        }
    }
}

impl StepProcess for HostProcess {
    type Stdout = tokio::process::ChildStdout;
    type Stderr = tokio::process::ChildStderr;

    fn take_pipes(&mut self) -> (Option<Self::Stdout>, Option<Self::Stderr>) {
        (self.child.stdout.take(), self.child.stderr.take())
    }

    async fn wait(&mut self) -> std::io::Result<i32> {
        self.child.wait().await.map(exit_status_code)
    }

    fn terminate(&mut self) {
        self.signal_group(libc::SIGTERM);
    }

    fn kill(&mut self) {
        self.signal_group(libc::SIGKILL);
    }

    fn end(&mut self) {
        // Background processes do not outlive their step.
        self.signal_group(libc::SIGKILL);
    }
}

/// Exit code as a shell reports it: the code, or 128 + signal number.
fn exit_status_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}
