//! The autoscaler's provider and configuration from the flags of `tributary serve autoscaler`
//! and `tributary up --autoscaler FILE` (the role itself: `crate::roles::autoscaler`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use tributary_autoscaler::provider::command::CommandProvider;
use tributary_autoscaler::provider::kubernetes::KubernetesProvider;
use tributary_autoscaler::provider::local::LocalProvider;
use tributary_autoscaler::provider::Provider;
use tributary_autoscaler::Config;

use crate::cli::ProviderKind;

/// The provider that interprets the decisions. `server` and `token` are what the agents it
/// starts connect and enroll with; `root` holds the local agents' directories and logs.
pub async fn provider(
    kind: ProviderKind,
    config: &Config,
    config_path: &Path,
    server: String,
    token: String,
    root: PathBuf,
) -> anyhow::Result<Arc<dyn Provider>> {
    Ok(match kind {
        ProviderKind::Local => {
            let exe = std::env::current_exe()
                .context("cannot find this executable to start local agents with")?;
            Arc::new(LocalProvider::new(exe, server, token, root))
        }
        ProviderKind::Command => {
            let Some(scripts) = config.command.clone() else {
                anyhow::bail!(
                    "{}: the command provider needs a [command] section with `acquire` and \
                     `release` scripts (and optionally `drain`)",
                    config_path.display()
                );
            };
            Arc::new(CommandProvider {
                scripts,
                server,
                token,
            })
        }
        ProviderKind::Kubernetes => {
            let Some(kubernetes) = &config.kubernetes else {
                anyhow::bail!(
                    "{}: the kubernetes provider needs a [kubernetes] section with `template` \
                     (a YAML Pod whose container runs `tributary agent`) and optionally \
                     `namespace`, `kubeconfig`, `context`, `server`, `termination_grace_secs`, \
                     `owner`",
                    config_path.display()
                );
            };
            let dir = config_path.parent().unwrap_or(Path::new("."));
            let provider = KubernetesProvider::connect(kubernetes, dir, server, token)
                .await
                .with_context(|| {
                    format!(
                        "{}: cannot start the kubernetes provider",
                        config_path.display()
                    )
                })?;
            Arc::new(provider)
        }
    })
}

/// Loads the configuration, naming the file in errors.
pub fn load_config(path: &Path) -> anyhow::Result<Config> {
    Ok(Config::load(path)?)
}
