//! Providers: each interprets the policy's decisions on real machines, behind one trait.
//!
//! * [`local::LocalProvider`]: `tributary agent` processes on this machine (SIGTERM drains).
//! * [`command::CommandProvider`]: user scripts that acquire and release a machine (any cloud
//!   CLI).
//!
//! Whatever the provider, the agent it starts registers with the request id as its name
//! (`tributary agent --name <id>`): that ties the server's agent to the autoscaler's request.
//! Drain also reaches the agent through the server: the scheduler stops assigning to an agent
//! once `AgentDraining` is on the log.

pub mod command;
pub mod local;

use async_trait::async_trait;

/// An agent to start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentRequest {
    /// The request id: the agent's name.
    pub id: String,
    pub kind: String,
    pub labels: Vec<String>,
    pub capacity: u32,
}

/// An agent the provider started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentHandle {
    pub id: String,
    /// The server's agent id (empty if it never registered).
    pub agent_id: String,
    pub kind: String,
    /// What [`Provider::acquire`] returned.
    pub machine: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("{0}")]
    Failed(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

#[async_trait]
pub trait Provider: Send + Sync {
    /// `local`, `command`: recorded in AgentRequested.
    fn name(&self) -> &'static str;
    /// Starts a machine whose agent registers with `request.id` as its name; returns the
    /// machine's handle (recorded in AgentProvisioned).
    async fn acquire(&self, request: &AgentRequest) -> Result<String, ProviderError>;
    /// Tells the agent to take no new work and finish what it runs.
    async fn drain(&self, agent: &AgentHandle) -> Result<(), ProviderError>;
    /// Stops the machine. The policy calls it only for an agent that runs nothing.
    async fn release(&self, agent: &AgentHandle) -> Result<(), ProviderError>;
    /// The service stops: drain and stop what must not outlive it (the local provider's
    /// processes). Returns the request ids of the agents it stopped, which the service records
    /// as released; machines of other providers keep running and are picked up again from the
    /// log by the next start.
    async fn shutdown(&self) -> Vec<String> {
        Vec::new()
    }
}
