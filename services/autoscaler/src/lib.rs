//! The autoscaler: sizes the agent pool from the work queue, and pays nothing when idle.
//!
//! * [`policy::decide`]: the policy, a pure function of the queue, the pool, the time and the
//!   [`Config`]; it returns [`Decision`]s (acquire N agents of a kind, drain one, release one),
//!   each with a reason and a cost.
//! * [`fold::PoolState`]: the queue and the pool as a pure fold of the log (the scheduler's
//!   cluster fold plus the autoscaler's own events).
//! * [`events`]: decisions as events (`AgentRequested`, `AgentDraining`, `AgentReleased`).
//! * [`sim`]: a simulated cluster on a simulated clock, for the benchmark and property tests;
//!   [`trace`]: job-arrival traces (a synthetic day generator, a CSV format).
//! * [`provider`]: the interpreters of decisions (`local` processes, `command` scripts,
//!   `kubernetes` Pods);
//!   [`service`]: the async shell that folds, decides, appends and calls the provider.

pub mod config;
pub mod durations;
pub mod events;
pub mod fold;
pub mod policy;
pub mod provider;
pub mod service;
pub mod sim;
pub mod trace;

pub use config::{Config, KindConfig};
pub use policy::{decide, Decision, Demand, Phase, Pool, PoolAgent, Queue};

/// A configuration that cannot be used; the message says where and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Invalid(String),
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
}
