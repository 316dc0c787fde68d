//! End-to-end tests of the `tributary` binary against real processes, repositories and engines.
//!
//! One test binary (one link, one file on disk) holds every scenario as a module: 31 binaries of
//! ~150 MB each filled the CI machine's disk. Run one scenario with
//! `cargo test -p tributary --test e2e server::` (the module name is the old file name).
//! `common` is the harness (a real `tributary up`, the CLI, agents, git repositories); `scale`
//! drives the Kafka/PostgreSQL scale-out processes; `history` is the projections' synthetic
//! build histories.

mod common;
#[allow(dead_code)]
#[path = "../../../../projections/tests/common/mod.rs"]
mod history;
#[path = "common/scale.rs"]
mod scale;

mod agent;
mod agent_faults;
mod artifacts;
mod artifacts_through_server;
mod autoscaler;
mod autoscaler_kubernetes;
mod caches;
mod containers;
mod deploy;
mod disk_full;
mod first_hour;
mod images;
mod kafka_services;
mod local_run;
mod metering;
mod new_user;
mod objects_s3;
mod odd_paths;
mod readme;
mod remote_agents;
mod repo_isolation;
mod roles;
mod run;
mod scale_autoscaler;
mod scale_metering;
mod scale_out;
mod scale_out_broker;
mod scale_out_s3;
mod scale_projector;
mod secrets;
mod server;
mod server_edges;
mod time_travel;
mod web_ui;
mod workspaces;
