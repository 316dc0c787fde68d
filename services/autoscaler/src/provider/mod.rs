//! Providers: each interprets the policy's decisions on real machines, behind one trait.
//!
//! * [`local::LocalProvider`]: `tributary agent` processes on this machine (SIGTERM drains).
//! * [`command::CommandProvider`]: user scripts that acquire and release a machine (any cloud
//!   CLI).
//! * [`kubernetes::KubernetesProvider`]: agent Pods made from a template (kube-rs); at start it
//!   deletes the Pods labelled as its own that the log does not know ([`Provider::recover`]).
//!
//! Whatever the provider, the agent it starts registers with the request id as its name
//! (`tributary agent --name <id>`): that ties the server's agent to the autoscaler's request.
//! Drain also reaches the agent through the server: the scheduler stops assigning to an agent
//! once `AgentDraining` is on the log.

pub mod command;
pub mod kubernetes;
pub mod local;

use std::collections::BTreeSet;

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
    #[error("{what}: {message}")]
    Kubernetes {
        what: String,
        message: String,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    Template(#[from] kubernetes::pod::TemplateError),
}

/// What [`Provider::recover`] did at start with the machines it found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Machines the log knows as live: kept. (request id, machine)
    pub adopted: Vec<(String, String)>,
    /// Machines labelled as this autoscaler's that the log does not know (a crash between the
    /// release decision and the provider's call, or a log that was reset): stopped.
    /// (request id, machine)
    pub deleted: Vec<(String, String)>,
}

#[async_trait]
pub trait Provider: Send + Sync {
    /// `local`, `command`, `kubernetes`: recorded in AgentRequested.
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
    /// At start, once the log is folded: `live` holds the requests the log has not released.
    /// A provider that can list its machines keeps (adopts) those and stops the others it
    /// owns. The default knows no machines.
    async fn recover(&self, _live: &BTreeSet<String>) -> Result<Recovery, ProviderError> {
        Ok(Recovery::default())
    }
}
