//! One step's shell inside the job's container: an `exec` whose multiplexed output stream is
//! split back into a stdout and a stderr pipe, so the step supervisor reads it exactly like a
//! host shell's two pipes.

use std::time::Duration;

use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::Docker;
use futures::StreamExt;
use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::process::StepProcess;

/// Buffer of each in-memory pipe between the exec stream and the supervisor.
const PIPE_BUFFER: usize = 256 * 1024;
/// How often the exec's state is polled while its output stream stays open (a background
/// process may hold it open after the shell exited).
const EXIT_POLL: Duration = Duration::from_millis(500);
/// After the output stream ended, how long to wait for the engine to report the exit code.
const EXIT_WAIT: Duration = Duration::from_secs(10);

pub(crate) struct ExecProcess {
    docker: Docker,
    container: String,
    stdout: Option<DuplexStream>,
    stderr: Option<DuplexStream>,
    exit: oneshot::Receiver<std::io::Result<i32>>,
    pump: JoinHandle<()>,
    killed: bool,
}

impl ExecProcess {
    /// Creates and starts `sh SCRIPT` (a path inside the container) with `env` in the
    /// container's workspace.
    pub(crate) async fn start(
        docker: &Docker,
        container: &str,
        env: Vec<String>,
        script: String,
    ) -> Result<ExecProcess, bollard::errors::Error> {
        let options = CreateExecOptions {
            attach_stdin: Some(false),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(false),
            env: Some(env),
            cmd: Some(vec!["sh".to_owned(), script]),
            working_dir: Some(super::spec::WORKSPACE.to_owned()),
            ..CreateExecOptions::default()
        };
        let exec = docker.create_exec(container, options).await?;
        let start = StartExecOptions {
            detach: false,
            tty: false,
            output_capacity: Some(64 * 1024),
        };
        let (output, input) = match docker.start_exec(&exec.id, Some(start)).await? {
            StartExecResults::Attached { output, input } => (output, input),
            StartExecResults::Detached => {
                return Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 500,
                    message: "the engine started the step detached".into(),
                })
            }
        };
        let (stdout, stdout_w) = tokio::io::duplex(PIPE_BUFFER);
        let (stderr, stderr_w) = tokio::io::duplex(PIPE_BUFFER);
        let (exit_tx, exit) = oneshot::channel();
        let pump = tokio::spawn(pump(
            docker.clone(),
            exec.id,
            output,
            input,
            [Some(stdout_w), Some(stderr_w)],
            exit_tx,
        ));
        Ok(ExecProcess {
            docker: docker.clone(),
            container: container.to_owned(),
            stdout: Some(stdout),
            stderr: Some(stderr),
            exit,
            pump,
            killed: false,
        })
    }

    fn kill_container(&mut self) {
        if std::mem::replace(&mut self.killed, true) {
            return;
        }
        let docker = self.docker.clone();
        let id = self.container.clone();
        tokio::spawn(async move { super::kill(&docker, &id).await });
    }
}

impl Drop for ExecProcess {
    fn drop(&mut self) {
        self.pump.abort();
    }
}

impl StepProcess for ExecProcess {
    type Stdout = DuplexStream;
    type Stderr = DuplexStream;

    fn take_pipes(&mut self) -> (Option<DuplexStream>, Option<DuplexStream>) {
        (self.stdout.take(), self.stderr.take())
    }

    async fn wait(&mut self) -> std::io::Result<i32> {
        match (&mut self.exit).await {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::other("the exec's output pump ended early")),
        }
    }

    /// A container step cannot be signalled on its own through the API: a canceled or timed
    /// out job's container is killed as a whole (the job ends anyway).
    fn terminate(&mut self) {
        self.kill_container();
    }

    fn kill(&mut self) {
        self.kill_container();
    }

    /// Background processes live until the job's container is removed.
    fn end(&mut self) {}
}

type Output = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>,
>;
type Input = std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>;

/// Copies the exec's output into the two pipes until it ends, then reports the exit code. While
/// the stream stays open, the exec's state is polled so that an exited shell whose pipes a
/// background process holds is still noticed.
async fn pump(
    docker: Docker,
    exec_id: String,
    mut output: Output,
    input: Input,
    mut pipes: [Option<DuplexStream>; 2],
    exit_tx: oneshot::Sender<std::io::Result<i32>>,
) {
    // Closing stdin may end the attach session on some engines: keep it until the end.
    let _input = input;
    let mut exit_tx = Some(exit_tx);
    let mut poll = tokio::time::interval_at(tokio::time::Instant::now() + EXIT_POLL, EXIT_POLL);
    loop {
        tokio::select! {
            item = output.next() => match item {
                Some(Ok(LogOutput::StdOut { message } | LogOutput::Console { message })) => {
                    write(&mut pipes[0], &message).await;
                }
                Some(Ok(LogOutput::StdErr { message })) => write(&mut pipes[1], &message).await,
                Some(Ok(LogOutput::StdIn { .. })) => {}
                Some(Err(e)) => {
                    tracing::warn!("reading the step's output from the container failed: {e}");
                    break;
                }
                None => break,
            },
            _ = poll.tick(), if exit_tx.is_some() => {
                if let Some(code) = exited(&docker, &exec_id).await {
                    if let Some(tx) = exit_tx.take() {
                        let _ = tx.send(Ok(code));
                    }
                }
            }
        }
    }
    // End of output: the pipes read EOF.
    pipes = [None, None];
    drop(pipes);
    if let Some(tx) = exit_tx.take() {
        let deadline = tokio::time::Instant::now() + EXIT_WAIT;
        let code = loop {
            if let Some(code) = exited(&docker, &exec_id).await {
                break Ok(code);
            }
            if tokio::time::Instant::now() >= deadline {
                break Err(std::io::Error::other(
                    "the container engine did not report the step's exit code",
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let _ = tx.send(code);
    }
}

/// Writes to a pipe whose reader may be gone (then the output is dropped).
async fn write(pipe: &mut Option<DuplexStream>, data: &[u8]) {
    if let Some(w) = pipe {
        if w.write_all(data).await.is_err() {
            *pipe = None;
        }
    }
}

/// The exec's exit code once it is no longer running; -1 when the engine knows no code (the
/// container was killed), `None` while it runs.
async fn exited(docker: &Docker, exec_id: &str) -> Option<i32> {
    match docker.inspect_exec(exec_id).await {
        Ok(info) if info.running == Some(false) => Some(
            info.exit_code
                .and_then(|c| i32::try_from(c).ok())
                .unwrap_or(-1),
        ),
        Ok(_) => None,
        // The exec (or its container) is gone: it is not running any more.
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Some(-1),
        Err(e) => {
            tracing::debug!("inspecting the step's exec failed: {e}");
            None
        }
    }
}
