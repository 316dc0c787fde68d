//! The container executor: a job with `image:` runs in a container of that image, through the
//! Docker Engine API (Docker itself, or Podman's compatible socket).
//!
//! One container per job attempt, started before the first step and removed after the last one
//! (also after a failure, cancel or timeout; a crashed agent's leftovers are removed by
//! [`Engine::remove_orphans`] when it starts again — they carry its id in the
//! [`spec::LABEL_OWNER`] label). Its main process only keeps it alive ([`spec::KEEPALIVE`]);
//! each step is one `exec` of `sh` on the same wrapper script the host executor uses, mounted
//! read-only at [`spec::SCRIPTS`], so lines get exactly the same per-line events, markers and
//! exit codes as on the host. Files in the workspace (bind-mounted at [`spec::WORKSPACE`]) and
//! anything else in the container (installed packages, `/tmp`) carry over from step to step, as
//! in GitHub Actions' container jobs.
//!
//! Differences from the host executor: a canceled or timed-out container job is killed at once
//! (SIGKILL to the whole container, no SIGTERM grace), and processes a step leaves running in the
//! background live until the job's container is removed rather than until the step ends.
//!
//! Engine quirks handled here (Podman 4.3, bollard 0.21): the API version is negotiated; images
//! are not pulled when present (Podman needs fully qualified names such as
//! `localhost/ci-busybox`); AutoRemove is never used (Podman's wait then reports wrong exit
//! codes) — the executor removes the container itself.

mod exec;
pub mod image;
pub mod spec;

use std::path::Path;
use std::sync::Arc;

use bollard::errors::Error as ApiError;
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, KillContainerOptionsBuilder,
    ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
};
use bollard::Docker;
use futures::StreamExt;

pub(crate) use exec::ExecProcess;
pub use spec::{ContainerLimits, Ownership};

/// Where the engine is when neither `--engine` nor `DOCKER_HOST` says: Podman's rootful socket
/// as `scripts/setup-containers.sh` starts it.
pub const DEFAULT_ENGINE: &str = "unix:///run/podman/podman.sock";

/// The engine address to use: `DOCKER_HOST` if set, else [`DEFAULT_ENGINE`].
pub fn engine_from_env() -> String {
    std::env::var("DOCKER_HOST")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_ENGINE.to_owned())
}

/// Container states of the Docker API (Podman has more).
const DOCKER_STATES: &[&str] = &[
    "created",
    "restarting",
    "running",
    "removing",
    "paused",
    "exited",
    "dead",
];

/// Seconds one engine API request may take (not a running exec: its stream has no limit).
const API_TIMEOUT_SECS: u64 = 120;

/// Why the container engine could not be used.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(
        "cannot reach a container engine at {address}: {reason}; start one (on Debian: \
         `sudo scripts/setup-containers.sh` starts Podman's Docker API there) or point \
         --engine / DOCKER_HOST at yours"
    )]
    Unreachable { address: String, reason: String },
    #[error("the container engine at {address} failed: {source}")]
    Api {
        address: String,
        #[source]
        source: ApiError,
    },
}

/// A connection to a container engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    docker: Docker,
    address: Arc<str>,
    description: Arc<str>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("address", &self.address)
            .field("description", &self.description)
            .finish()
    }
}

impl Engine {
    /// Connects to `address` (`unix:///path`, a plain socket path, or `tcp://host:port` /
    /// `http://host:port`), negotiates the API version and checks that the engine answers.
    pub async fn connect(address: &str) -> Result<Engine, EngineError> {
        let unreachable = |reason: String| EngineError::Unreachable {
            address: address.to_owned(),
            reason,
        };
        let docker = if let Some(rest) = address
            .strip_prefix("tcp://")
            .or_else(|| address.strip_prefix("http://"))
        {
            Docker::connect_with_http(
                &format!("http://{rest}"),
                API_TIMEOUT_SECS,
                bollard::API_DEFAULT_VERSION,
            )
        } else {
            let path = address.strip_prefix("unix://").unwrap_or(address);
            Docker::connect_with_unix(path, API_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
        }
        .map_err(|e| unreachable(e.to_string()))?;
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let version = docker
            .version()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let product = version
            .components
            .iter()
            .flatten()
            .find(|c| c.name.to_lowercase().contains("podman"))
            .map_or("docker", |_| "podman");
        let description = format!(
            "{product} {} (API {})",
            version.version.as_deref().unwrap_or("?"),
            version.api_version.as_deref().unwrap_or("?")
        );
        Ok(Engine {
            docker,
            address: address.into(),
            description: description.into(),
        })
    }

    /// `podman 4.3.1 (API 1.41)`, for logs and for the server's agent list.
    pub fn description(&self) -> &str {
        &self.description
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// The raw API client (tests and benchmarks inspect containers with it).
    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    fn api(&self, source: ApiError) -> EngineError {
        EngineError::Api {
            address: self.address.to_string(),
            source,
        }
    }

    /// Ids of the containers (running or not) labelled as owned by `owner`.
    pub async fn owned_containers(&self, owner: &str) -> Result<Vec<String>, EngineError> {
        let label = format!("{}={owner}", spec::LABEL_OWNER);
        // Podman fails a listing now and then while a container is being removed: with a 500
        // (`no such container`), or with a state Docker does not have (`stopped`, which
        // bollard cannot decode). Both pass within moments: such a listing is retried.
        let mut attempt = 0;
        loop {
            match self.list(&label, None).await {
                Ok(ids) => return Ok(ids),
                Err(
                    ApiError::DockerResponseServerError {
                        status_code: 500, ..
                    }
                    | ApiError::JsonDataError { .. },
                ) if attempt < 6 => {
                    attempt += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(100 * attempt)).await;
                }
                // Still undecodable: list by the states Docker knows (leaves out containers
                // Podman calls `stopped`, which become `exited` soon after).
                Err(ApiError::JsonDataError { .. }) => {
                    return self
                        .list(&label, Some(DOCKER_STATES))
                        .await
                        .map_err(|e| self.api(e));
                }
                Err(e) => return Err(self.api(e)),
            }
        }
    }

    async fn list(&self, label: &str, states: Option<&[&str]>) -> Result<Vec<String>, ApiError> {
        let mut filters = std::collections::HashMap::from([("label", vec![label.to_owned()])]);
        if let Some(states) = states {
            filters.insert("status", states.iter().map(|s| (*s).to_owned()).collect());
        }
        let options = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        let list = self.docker.list_containers(Some(options)).await?;
        Ok(list.into_iter().filter_map(|c| c.id).collect())
    }

    /// Removes every container `owner` left behind (it crashed or was killed while jobs ran).
    /// Call it when the agent starts, before it runs anything. Returns how many were removed.
    pub async fn remove_orphans(&self, owner: &str) -> Result<usize, EngineError> {
        let ids = self.owned_containers(owner).await?;
        let mut removed = 0;
        for id in ids {
            match remove(&self.docker, &id).await {
                Ok(()) => removed += 1,
                Err(e) => {
                    tracing::warn!(container = %id, "cannot remove a leftover container: {e}")
                }
            }
        }
        Ok(removed)
    }

    /// Makes sure `image` is on the engine: present, or pulled now. Podman here has no registry,
    /// so a missing image is an error that says how to get it.
    async fn ensure_image(&self, image: &str) -> Result<(), String> {
        match self.docker.inspect_image(image).await {
            Ok(_) => return Ok(()),
            Err(ApiError::DockerResponseServerError {
                status_code: 404, ..
            }) => {}
            Err(e) => return Err(format!("cannot inspect image {image}: {e}")),
        }
        tracing::info!(%image, "pulling image");
        let options = CreateImageOptionsBuilder::new().from_image(image).build();
        let mut pull = self.docker.create_image(Some(options), None, None);
        while let Some(step) = pull.next().await {
            if let Err(e) = step {
                return Err(format!(
                    "image {image} is not on the container engine and cannot be pulled: {e}; \
                     build or pull it on the agent's machine first (with Podman, use a fully \
                     qualified name such as localhost/NAME)"
                ));
            }
        }
        Ok(())
    }
}

/// How an agent runs container jobs: the engine, the limits of every container, and the owner
/// label (the agent id) its containers carry.
#[derive(Clone, Debug)]
pub struct ContainerRuntime {
    pub engine: Engine,
    pub limits: ContainerLimits,
    /// The agent's id: a restarted agent removes the containers labelled with it.
    pub owner: String,
    /// Directories (absolute host paths) the job must not see when they lie in its workspace:
    /// a local run's data directory inside the repository. Each shows as an empty read-only
    /// directory in the container ([`spec::hide_paths`]).
    pub hidden: Vec<std::path::PathBuf>,
}

/// The running container of one job attempt. Removed by [`JobContainer::remove`], or, if the
/// job's future is dropped first, by a task spawned on drop.
pub(crate) struct JobContainer {
    docker: Docker,
    id: String,
    name: String,
    removed: bool,
}

impl JobContainer {
    /// Creates and starts the job's container. Errors are sentences for the job's log.
    pub(crate) async fn start(
        runtime: &ContainerRuntime,
        image: &str,
        workspace: &Path,
        scripts: &Path,
        network: bool,
        who: &Ownership<'_>,
    ) -> Result<JobContainer, String> {
        // Bind mounts are absolute: an engine resolves a relative source against its own
        // working directory, not ours.
        let absolute = |p: &Path| {
            std::path::absolute(p).map_err(|e| format!("cannot resolve {}: {e}", p.display()))
        };
        let (workspace, scripts) = (&absolute(workspace)?, &absolute(scripts)?);
        let engine = &runtime.engine;
        engine.ensure_image(image).await?;
        let mut body = spec::create_body(image, workspace, scripts, &runtime.limits, network, who);
        if runtime.hidden.iter().any(|h| h.starts_with(workspace)) {
            let empty = scripts.join("empty");
            std::fs::create_dir_all(&empty)
                .map_err(|e| format!("cannot create {}: {e}", empty.display()))?;
            spec::hide_paths(&mut body, workspace, &runtime.hidden, &empty);
        }
        let name = spec::container_name(who, rand::random());
        let options = CreateContainerOptionsBuilder::new().name(&name).build();
        let created = engine
            .docker
            .create_container(Some(options), body)
            .await
            .map_err(|e| format!("cannot create a container of image {image}: {e}"))?;
        let container = JobContainer {
            docker: engine.docker.clone(),
            id: created.id,
            name,
            removed: false,
        };
        engine
            .docker
            .start_container(&container.id, None)
            .await
            .map_err(|e| format!("cannot start the container of image {image}: {e}"))?;
        tracing::info!(container = %container.name, %image, "container started");
        Ok(container)
    }

    /// Starts one step: `sh` on the wrapper script (`script`, a host path in the mounted
    /// scripts directory) inside the container.
    pub(crate) async fn spawn_step(
        &self,
        env: &[(String, String)],
        step: &tributary_proto::events::StepPlan,
        script: &Path,
    ) -> Result<ExecProcess, String> {
        let file = script
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let inside = format!("{}/{file}", spec::SCRIPTS);
        ExecProcess::start(&self.docker, &self.id, spec::env_list(env), inside)
            .await
            .map_err(|e| {
                format!(
                    "cannot start sh for step \"{}\" in container {}: {e}",
                    step.name, self.name
                )
            })
    }

    /// Kills and removes the container.
    pub(crate) async fn remove(mut self) {
        self.removed = true;
        match remove(&self.docker, &self.id).await {
            Ok(()) => tracing::info!(container = %self.name, "container removed"),
            Err(e) => tracing::warn!(container = %self.name, "cannot remove the container: {e}"),
        }
    }
}

impl Drop for JobContainer {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        // The job's future was dropped (agent stopping): remove the container in the background.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let docker = self.docker.clone();
            let id = std::mem::take(&mut self.id);
            handle.spawn(async move {
                if let Err(e) = remove(&docker, &id).await {
                    tracing::warn!(container = %id, "cannot remove the container: {e}");
                }
            });
        }
    }
}

/// Sends SIGKILL to the container (every process in it).
pub(crate) async fn kill(docker: &Docker, id: &str) {
    let options = KillContainerOptionsBuilder::new().signal("SIGKILL").build();
    if let Err(e) = docker.kill_container(id, Some(options)).await {
        tracing::debug!(container = %id, "kill: {e}");
    }
}

/// Force-removes a container (killing it first if it runs). A container already gone is fine.
async fn remove(docker: &Docker, id: &str) -> Result<(), ApiError> {
    let options = RemoveContainerOptionsBuilder::new()
        .force(true)
        .v(true)
        .build();
    match docker.remove_container(id, Some(options)).await {
        Ok(()) => Ok(()),
        Err(ApiError::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(()),
        Err(e) => Err(e),
    }
}
