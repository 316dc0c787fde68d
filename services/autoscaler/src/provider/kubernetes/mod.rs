//! The `kubernetes` provider: each agent is a Pod made from a template (kube-rs).
//!
//! * acquire creates the request's Pod ([`pod::agent_pod`]: the template, labelled with the
//!   owner and the request id, its agent started with `--name <request id>`, TRIBUTARY_SERVER
//!   and TRIBUTARY_ENROLLMENT_TOKEN in its env); the machine recorded in AgentProvisioned is
//!   `<namespace>/<pod>`. A Pod of the same request that already exists (an acquire retried
//!   after a crash) is taken as it is.
//! * drain does nothing here: `AgentDraining` already reaches the agent as a drain instruction
//!   on its `PullWork` stream, and the scheduler stops assigning to it.
//! * release deletes the Pod with the configured grace period: the kubelet sends SIGTERM, on
//!   which the agent finishes what it runs (release is decided only for an idle agent) and
//!   exits. A Pod already gone is released.
//! * recover (at start) lists the Pods carrying this autoscaler's owner label: those whose
//!   request the log still has are adopted, the others deleted.
//!
//! The cluster comes from the `[kubernetes]` table: an explicit kubeconfig and context, else
//! `KUBECONFIG` / `~/.kube/config`, else the in-cluster service account when running in a Pod.

pub mod pod;

use std::collections::BTreeSet;
use std::path::Path;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};

use self::pod::{PodSettings, Template};
use super::{AgentHandle, AgentRequest, Provider, ProviderError, Recovery};
use crate::config::KubernetesConfig;

/// The default `tributary.dev/owner` label value.
pub const DEFAULT_OWNER: &str = "tributary";

pub struct KubernetesProvider {
    pods: Api<Pod>,
    template: Template,
    settings: PodSettings,
}

fn kube_error(what: String, source: kube::Error) -> ProviderError {
    let message = match &source {
        kube::Error::Api(status) => format!(
            "{} ({}, HTTP {})",
            status.message, status.reason, status.code
        ),
        other => other.to_string(),
    };
    ProviderError::Kubernetes {
        what,
        message,
        source,
    }
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

impl KubernetesProvider {
    /// Reads the template and connects to the cluster. `config_dir` is the directory of the
    /// autoscaler's configuration (a relative template path is relative to it); `server` and
    /// `token` are what the agents join with unless the table or the template say otherwise.
    pub async fn connect(
        config: &KubernetesConfig,
        config_dir: &Path,
        server: String,
        token: String,
    ) -> Result<KubernetesProvider, ProviderError> {
        let template_path = config_dir.join(&config.template);
        let text = std::fs::read_to_string(&template_path).map_err(|source| ProviderError::Io {
            what: format!(
                "cannot read the Pod template {} ([kubernetes] template)",
                template_path.display()
            ),
            source,
        })?;
        let template = Template::parse(&text, &template_path.display().to_string())?;
        let owner = config.owner.clone().unwrap_or_else(|| DEFAULT_OWNER.into());
        if !pod::is_label_value(&owner) || owner.len() > 40 {
            return Err(ProviderError::Failed(format!(
                "[kubernetes] owner = {owner:?}: use at most 40 letters, digits, '-', '_' or \
                 '.', starting and ending with a letter or digit"
            )));
        }
        if let Some(grace) = config.termination_grace_secs {
            if grace < 0 {
                return Err(ProviderError::Failed(format!(
                    "[kubernetes] termination_grace_secs = {grace}: use 0 or more seconds"
                )));
            }
        }
        let (client, default_namespace) = cluster_client(config).await?;
        let namespace = config.namespace.clone().unwrap_or(default_namespace);
        if !pod::template_sets_token(&template) {
            tracing::warn!(
                template = %template_path.display(),
                "the Pod template does not set TRIBUTARY_ENROLLMENT_TOKEN: the token goes into \
                 each Pod's spec in clear; reference a Secret in the template instead \
                 (env: valueFrom.secretKeyRef)"
            );
        }
        tracing::info!(%namespace, %owner, template = %template_path.display(), "kubernetes provider ready");
        Ok(KubernetesProvider {
            pods: Api::namespaced(client, &namespace),
            template,
            settings: PodSettings {
                namespace,
                owner,
                server: config.server.clone().unwrap_or(server),
                token,
                termination_grace_secs: config.termination_grace_secs,
            },
        })
    }

    pub fn namespace(&self) -> &str {
        &self.settings.namespace
    }

    pub fn owner(&self) -> &str {
        &self.settings.owner
    }

    fn machine(&self, name: &str) -> String {
        format!("{}/{name}", self.settings.namespace)
    }

    /// The Pod name of a handle: the machine recorded at acquire, else the name the request
    /// would have.
    fn pod_of(&self, agent: &AgentHandle) -> String {
        match agent.machine.rsplit_once('/') {
            Some((_, name)) if !name.is_empty() => name.to_owned(),
            _ => pod::pod_name(&self.settings.owner, &agent.id),
        }
    }

    async fn delete(&self, name: &str, request_id: &str) -> Result<(), ProviderError> {
        let grace = self
            .settings
            .termination_grace_secs
            .map(|g| u32::try_from(g).unwrap_or(u32::MAX));
        let params = DeleteParams {
            grace_period_seconds: grace,
            ..DeleteParams::default()
        };
        match self.pods.delete(name, &params).await {
            Ok(_) => {
                tracing::info!(request_id, pod = name, namespace = %self.settings.namespace, "agent Pod deleted");
                Ok(())
            }
            Err(e) if is_status(&e, 404) => {
                tracing::info!(request_id, pod = name, "agent Pod already gone");
                Ok(())
            }
            Err(e) => Err(kube_error(
                format!(
                    "cannot delete Pod {}: delete it by hand (kubectl delete pod -n {} {name})",
                    self.machine(name),
                    self.settings.namespace
                ),
                e,
            )),
        }
    }
}

/// A client of the cluster `config`'s kubeconfig/context names (see the module docs), and the
/// namespace its context defaults to. Connects lazily: nothing is sent yet.
pub async fn cluster_client(config: &KubernetesConfig) -> Result<(Client, String), ProviderError> {
    // kube's TLS asks rustls for the process's crypto provider; with both ring and
    // aws-lc-rs compiled in (object_store brings the latter) there is none until one is
    // chosen. Already chosen elsewhere is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kube_config = kube_config(config).await?;
    let namespace = kube_config.default_namespace.clone();
    let cluster = kube_config.cluster_url.to_string();
    let client = Client::try_from(kube_config)
        .map_err(|e| kube_error(format!("cannot make a Kubernetes client for {cluster}"), e))?;
    tracing::info!(%cluster, default_namespace = %namespace, "kubernetes client");
    Ok((client, namespace))
}

async fn kube_config(config: &KubernetesConfig) -> Result<kube::Config, ProviderError> {
    let options = KubeConfigOptions {
        context: config.context.clone(),
        ..KubeConfigOptions::default()
    };
    let failed =
        |what: String, e: &dyn std::fmt::Display| ProviderError::Failed(format!("{what}: {e}"));
    match &config.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path).map_err(|e| {
                failed(
                    format!(
                        "cannot read the kubeconfig {} ([kubernetes] kubeconfig)",
                        path.display()
                    ),
                    &e,
                )
            })?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(|e| failed(format!("cannot use the kubeconfig {}", path.display()), &e))
        }
        None if config.context.is_some() => {
            kube::Config::from_kubeconfig(&options).await.map_err(|e| {
                failed(
                    "cannot use the kubeconfig (KUBECONFIG or ~/.kube/config) with the \
                     [kubernetes] context"
                        .into(),
                    &e,
                )
            })
        }
        None => kube::Config::infer().await.map_err(|e| {
            failed(
                "no Kubernetes configuration: set [kubernetes] kubeconfig, KUBECONFIG, or \
                 run in a Pod with a service account"
                    .into(),
                &e,
            )
        }),
    }
}

#[async_trait]
impl Provider for KubernetesProvider {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    async fn acquire(&self, request: &AgentRequest) -> Result<String, ProviderError> {
        let pod = pod::agent_pod(&self.template, request, &self.settings);
        let name = pod.metadata.name.clone().unwrap_or_default();
        match self.pods.create(&PostParams::default(), &pod).await {
            Ok(_) => {
                tracing::info!(request_id = %request.id, pod = %name, namespace = %self.settings.namespace, "agent Pod created");
                Ok(self.machine(&name))
            }
            Err(e) if is_status(&e, 409) => {
                // Created by an earlier try of this request (a crash before AgentProvisioned)?
                let existing = self.pods.get_opt(&name).await.map_err(|e| {
                    kube_error(format!("cannot read Pod {}", self.machine(&name)), e)
                })?;
                match existing
                    .as_ref()
                    .and_then(|p| pod::owned_request(p, &self.settings.owner))
                {
                    Some(id) if id == request.id => {
                        tracing::info!(request_id = %request.id, pod = %name, "agent Pod already exists: adopted");
                        Ok(self.machine(&name))
                    }
                    _ => Err(ProviderError::Failed(format!(
                        "Pod {} exists and is not this request's: delete it, or give this \
                         autoscaler its own [kubernetes] owner",
                        self.machine(&name)
                    ))),
                }
            }
            Err(e) => Err(kube_error(
                format!("cannot create Pod {}", self.machine(&name)),
                e,
            )),
        }
    }

    async fn drain(&self, agent: &AgentHandle) -> Result<(), ProviderError> {
        // The server's drain instruction (Lease.drain on PullWork) reaches the agent; the Pod
        // is deleted (SIGTERM, which drains too) at release.
        tracing::info!(request_id = %agent.id, agent_id = %agent.agent_id, pod = %self.pod_of(agent), "draining through the server");
        Ok(())
    }

    async fn release(&self, agent: &AgentHandle) -> Result<(), ProviderError> {
        self.delete(&self.pod_of(agent), &agent.id).await
    }

    async fn recover(&self, live: &BTreeSet<String>) -> Result<Recovery, ProviderError> {
        let selector = format!(
            "{}={},{}={}",
            pod::OWNER_LABEL,
            self.settings.owner,
            pod::MANAGED_BY_LABEL,
            pod::MANAGED_BY
        );
        let list = self
            .pods
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|e| {
                kube_error(
                    format!(
                        "cannot list the agent Pods in namespace {} ({selector})",
                        self.settings.namespace
                    ),
                    e,
                )
            })?;
        let ours: Vec<(String, String)> = list
            .items
            .iter()
            .filter_map(|p| {
                let request = pod::owned_request(p, &self.settings.owner)?;
                Some((p.metadata.name.clone()?, request))
            })
            .collect();
        let sorted = pod::sort_out(&ours, live);
        let mut recovery = Recovery::default();
        for (request, name) in sorted.adopt {
            tracing::info!(request_id = %request, pod = %name, "agent Pod adopted");
            recovery.adopted.push((request, self.machine(&name)));
        }
        for (request, name) in sorted.delete {
            tracing::info!(request_id = %request, pod = %name, "agent Pod unknown to the log: deleting it");
            self.delete(&name, &request).await?;
            recovery.deleted.push((request, self.machine(&name)));
        }
        Ok(recovery)
    }
}
