//! The autoscaler as the `tributary` binary runs it: `tributary serve autoscaler` (its own
//! process on a server's data directory) and inside `tributary up --autoscaler FILE`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tributary_autoscaler::provider::command::CommandProvider;
use tributary_autoscaler::provider::kubernetes::KubernetesProvider;
use tributary_autoscaler::provider::local::LocalProvider;
use tributary_autoscaler::provider::Provider;
use tributary_autoscaler::service::Replicas;
use tributary_autoscaler::Config;
use tributary_eventlog::EventLog;

use crate::cli::{AutoscalerArgs, ProviderKind};

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

/// Starts the service; stop it with `stop` and await the handle (the provider drains what it
/// started before it returns).
pub fn spawn(
    log: Arc<dyn EventLog>,
    config: Config,
    provider: Arc<dyn Provider>,
    replicas: Replicas,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Result<(), tributary_eventlog::LogError>> {
    tokio::spawn(tributary_autoscaler::service::run(
        log, config, provider, replicas, stop,
    ))
}

/// `tributary serve autoscaler`.
pub async fn serve(args: AutoscalerArgs) -> anyhow::Result<ExitCode> {
    let config = load_config(&args.config)?;
    let backends = args.backends.resolve()?;
    let data = &backends.data;
    let on_kafka = backends.kafka.is_some();
    if !on_kafka && !data.join("events.db").exists() {
        anyhow::bail!(
            "{} holds no event log: point --data at the data directory of a `tributary up`, \
             or --kafka at the brokers of a scale-out deployment",
            data.display()
        );
    }
    let token = match args.token.filter(|t| !t.trim().is_empty()) {
        Some(t) => t.trim().to_owned(),
        None => {
            let path = data.join("admin.token");
            std::fs::read_to_string(&path)
                .with_context(|| {
                    format!(
                        "no --token (TRIBUTARY_ENROLLMENT_TOKEN) and cannot read {}: agents need \
                         an enrollment token (`tributary admin token-create --kind enrollment`)",
                        path.display()
                    )
                })?
                .trim()
                .to_owned()
        }
    };
    let log = backends.open_log().await?;
    let _health = crate::health::start_with_log(&args.health, "autoscaler", log.clone()).await?;
    let provider = provider(
        args.provider,
        &config,
        &args.config,
        args.server.clone(),
        token,
        data.join("autoscaler"),
    )
    .await?;
    // On Kafka, replicas share the log: one active at a time. The embedded log is one process's.
    let replicas = if on_kafka {
        Replicas::Group(tributary_autoscaler::service::GROUP.to_owned())
    } else {
        Replicas::Alone
    };
    println!(
        "tributary autoscaler: log {}, provider {}, {} kind(s), budget {}/h, agents join {}{}",
        backends.log_location(),
        provider.name(),
        config.kinds.len(),
        tributary_autoscaler::config::format_money(config.budget_per_hour_micros),
        args.server,
        if on_kafka {
            ", member of consumer group `autoscaler` (one active replica)"
        } else {
            ""
        }
    );
    let _ = std::io::Write::flush(&mut std::io::stdout());
    let stop = CancellationToken::new();
    let mut service = spawn(log.clone(), config, provider, replicas, stop.clone());
    let early = tokio::select! {
        () = crate::server::wait_for_signal() => None,
        r = &mut service => Some(r),
    };
    let result = match early {
        Some(r) => r,
        None => {
            tracing::info!("stopping: draining the agents this autoscaler started");
            stop.cancel();
            service.await
        }
    };
    match result {
        Ok(Ok(())) => Ok(ExitCode::SUCCESS),
        Ok(Err(e)) => Err(anyhow::Error::new(e).context("the autoscaler stopped")),
        Err(e) => Err(anyhow::anyhow!("the autoscaler task failed: {e}")),
    }
}
