//! The `local` provider: each agent is a `tributary agent` process on this machine.
//!
//! Acquire spawns `tributary agent --name <id> --workdir <root>/<id> ...` (its output goes to
//! `<root>/<id>.log`); drain sends SIGTERM, on which the agent takes no new jobs, finishes the
//! running ones and exits; release waits for the process to exit (SIGTERM first if it was not
//! drained) and deletes its work directory. Release is only decided for an agent that runs
//! nothing, so the SIGKILL after `exit_timeout` never kills a job.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

use super::{AgentHandle, AgentRequest, Provider, ProviderError};

pub struct LocalProvider {
    /// The `tributary` executable.
    pub exe: PathBuf,
    pub server: String,
    /// Enrollment (or admin) token the agents register with.
    pub token: String,
    /// Work directories and logs of the agents.
    pub root: PathBuf,
    /// How long release waits for an agent to exit before SIGKILL.
    pub exit_timeout: Duration,
    children: Mutex<HashMap<String, Child>>,
}

impl LocalProvider {
    pub fn new(exe: PathBuf, server: String, token: String, root: PathBuf) -> Self {
        LocalProvider {
            exe,
            server,
            token,
            root,
            exit_timeout: Duration::from_secs(30),
            children: Mutex::new(HashMap::new()),
        }
    }

    /// Agent processes still running.
    pub async fn running(&self) -> usize {
        let mut children = self.children.lock().await;
        children.retain(|_, c| matches!(c.try_wait(), Ok(None)));
        children.len()
    }
}

fn sigterm(child: &Child) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) with a pid of our own child and a valid signal number.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
}

#[async_trait]
impl Provider for LocalProvider {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn acquire(&self, request: &AgentRequest) -> Result<String, ProviderError> {
        let workdir = self.root.join(&request.id);
        std::fs::create_dir_all(&self.root).map_err(|source| ProviderError::Io {
            what: format!("cannot create {}", self.root.display()),
            source,
        })?;
        let log_path = self.root.join(format!("{}.log", request.id));
        let log = std::fs::File::create(&log_path).map_err(|source| ProviderError::Io {
            what: format!("cannot create {}", log_path.display()),
            source,
        })?;
        let err = log.try_clone().map_err(|source| ProviderError::Io {
            what: format!("cannot open {}", log_path.display()),
            source,
        })?;
        let mut cmd = Command::new(&self.exe);
        cmd.arg("agent")
            .arg("--server")
            .arg(&self.server)
            .arg("--name")
            .arg(&request.id)
            .arg("--capacity")
            .arg(request.capacity.max(1).to_string())
            .arg("--workdir")
            .arg(&workdir)
            .env("TRIBUTARY_ENROLLMENT_TOKEN", &self.token)
            .env_remove("TRIBUTARY_AGENT_DIR")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            // Its own process group: a Ctrl-C at the terminal reaches the server, which
            // drains the agents itself.
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; it only sets this child's parent-death signal.
        // If this process dies without draining its agents (SIGKILL), they drain themselves.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        if !request.labels.is_empty() {
            cmd.arg("--labels").arg(request.labels.join(","));
        }
        let child = cmd.spawn().map_err(|source| ProviderError::Io {
            what: format!("cannot start {} agent", self.exe.display()),
            source,
        })?;
        let pid = child.id().unwrap_or_default();
        tracing::info!(request_id = %request.id, pid, log = %log_path.display(), "agent process started");
        self.children.lock().await.insert(request.id.clone(), child);
        Ok(format!("pid:{pid}"))
    }

    async fn drain(&self, agent: &AgentHandle) -> Result<(), ProviderError> {
        let children = self.children.lock().await;
        match children.get(&agent.id) {
            Some(child) => {
                sigterm(child);
                tracing::info!(request_id = %agent.id, agent_id = %agent.agent_id, "SIGTERM sent: draining");
            }
            None => {
                tracing::warn!(request_id = %agent.id, "no such agent process (started by an earlier run?)")
            }
        }
        Ok(())
    }

    async fn release(&self, agent: &AgentHandle) -> Result<(), ProviderError> {
        let child = self.children.lock().await.remove(&agent.id);
        if let Some(mut child) = child {
            if matches!(child.try_wait(), Ok(None)) {
                sigterm(&child);
                match tokio::time::timeout(self.exit_timeout, child.wait()).await {
                    Ok(_) => {}
                    Err(_) => {
                        tracing::warn!(request_id = %agent.id, "agent did not exit after SIGTERM; killing it");
                        let _ = child.kill().await;
                    }
                }
            }
        }
        let dir = self.root.join(&agent.id);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(error = %e, dir = %dir.display(), "cannot delete the agent's directory");
            }
        }
        tracing::info!(request_id = %agent.id, agent_id = %agent.agent_id, "agent released");
        Ok(())
    }

    async fn shutdown(&self) -> Vec<String> {
        let mut children = std::mem::take(&mut *self.children.lock().await);
        for child in children.values() {
            sigterm(child);
        }
        for (id, child) in children.iter_mut() {
            if tokio::time::timeout(self.exit_timeout, child.wait())
                .await
                .is_err()
            {
                tracing::warn!(request_id = %id, "agent did not drain in time; killing it");
                let _ = child.kill().await;
            }
        }
        children.into_keys().collect()
    }
}
