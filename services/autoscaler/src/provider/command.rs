//! The `command` provider: user scripts acquire and release machines (any cloud CLI).
//!
//! Each script runs with `sh -c` and these variables:
//!
//! | variable | acquire | drain | release |
//! |---|---|---|---|
//! | `TRIBUTARY_REQUEST_ID` (start the agent with `--name` set to it) | ✓ | ✓ | ✓ |
//! | `TRIBUTARY_AGENT_KIND`, `TRIBUTARY_AGENT_LABELS` (comma-separated), `TRIBUTARY_AGENT_CAPACITY` | ✓ | ✓ | ✓ |
//! | `TRIBUTARY_SERVER`, `TRIBUTARY_ENROLLMENT_TOKEN` | ✓ | | |
//! | `TRIBUTARY_MACHINE` (the last line acquire printed), `TRIBUTARY_AGENT_ID` | | ✓ | ✓ |
//!
//! Acquire prints the machine's id on its last line of output; a non-zero exit is a failure
//! whose stderr is reported.

use async_trait::async_trait;
use tokio::process::Command;

use super::{AgentHandle, AgentRequest, Provider, ProviderError};
use crate::config::CommandConfig;

pub struct CommandProvider {
    pub scripts: CommandConfig,
    pub server: String,
    pub token: String,
}

async fn run(script: &str, what: &str, vars: &[(&str, String)]) -> Result<String, ProviderError> {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(script).stdin(std::process::Stdio::null());
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let out = cmd.output().await.map_err(|source| ProviderError::Io {
        what: format!("cannot run the {what} script"),
        source,
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(ProviderError::Failed(format!(
            "the {what} script `{script}` exited with {}: {}",
            out.status,
            tail.join(" / ")
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or_default()
        .to_owned())
}

#[async_trait]
impl Provider for CommandProvider {
    fn name(&self) -> &'static str {
        "command"
    }

    async fn acquire(&self, request: &AgentRequest) -> Result<String, ProviderError> {
        let vars = [
            ("TRIBUTARY_REQUEST_ID", request.id.clone()),
            ("TRIBUTARY_AGENT_KIND", request.kind.clone()),
            ("TRIBUTARY_AGENT_LABELS", request.labels.join(",")),
            ("TRIBUTARY_AGENT_CAPACITY", request.capacity.to_string()),
            ("TRIBUTARY_SERVER", self.server.clone()),
            ("TRIBUTARY_ENROLLMENT_TOKEN", self.token.clone()),
        ];
        run(&self.scripts.acquire, "acquire", &vars).await
    }

    async fn drain(&self, agent: &AgentHandle) -> Result<(), ProviderError> {
        let Some(script) = &self.scripts.drain else {
            return Ok(()); // the server stops assigning to it anyway
        };
        run(script, "drain", &handle_vars(agent)).await.map(|_| ())
    }

    async fn release(&self, agent: &AgentHandle) -> Result<(), ProviderError> {
        run(&self.scripts.release, "release", &handle_vars(agent))
            .await
            .map(|_| ())
    }
}

fn handle_vars(agent: &AgentHandle) -> Vec<(&'static str, String)> {
    vec![
        ("TRIBUTARY_REQUEST_ID", agent.id.clone()),
        ("TRIBUTARY_AGENT_KIND", agent.kind.clone()),
        ("TRIBUTARY_AGENT_ID", agent.agent_id.clone()),
        ("TRIBUTARY_MACHINE", agent.machine.clone()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(dir: &std::path::Path, acquire: &str) -> CommandProvider {
        let log = dir.join("calls");
        CommandProvider {
            scripts: CommandConfig {
                acquire: acquire.to_owned(),
                release: format!(
                    "echo release $TRIBUTARY_REQUEST_ID $TRIBUTARY_MACHINE >> {}",
                    log.display()
                ),
                drain: None,
            },
            server: "http://s".into(),
            token: "t0k".into(),
        }
    }

    #[tokio::test]
    async fn scripts_get_the_request_and_the_machine() {
        let dir = tempfile::tempdir().unwrap();
        let p = provider(
            dir.path(),
            "echo starting >&2; echo noise; echo vm-$TRIBUTARY_REQUEST_ID-$TRIBUTARY_AGENT_LABELS-$TRIBUTARY_ENROLLMENT_TOKEN",
        );
        let req = AgentRequest {
            id: "as-gpu-3".into(),
            kind: "gpu".into(),
            labels: vec!["gpu".into(), "large".into()],
            capacity: 2,
        };
        let machine = p.acquire(&req).await.unwrap();
        assert_eq!(machine, "vm-as-gpu-3-gpu,large-t0k");
        let handle = AgentHandle {
            id: req.id.clone(),
            agent_id: "a1".into(),
            kind: "gpu".into(),
            machine,
        };
        p.drain(&handle).await.unwrap();
        p.release(&handle).await.unwrap();
        let calls = std::fs::read_to_string(dir.path().join("calls")).unwrap();
        assert_eq!(calls, "release as-gpu-3 vm-as-gpu-3-gpu,large-t0k\n");
    }

    #[tokio::test]
    async fn a_failing_script_reports_its_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let p = provider(dir.path(), "echo quota exceeded >&2; exit 3");
        let req = AgentRequest {
            id: "as-x-0".into(),
            kind: "x".into(),
            labels: vec![],
            capacity: 1,
        };
        let e = p.acquire(&req).await.unwrap_err().to_string();
        assert!(e.contains("acquire script"), "{e}");
        assert!(e.contains("quota exceeded"), "{e}");
    }
}
