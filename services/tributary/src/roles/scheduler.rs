//! The scheduler role: folds every events partition into the cluster state and appends the
//! decisions for the partitions it owns (`tributary_scheduler::service`).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tributary_eventlog::EventLog;
use tributary_scheduler::cluster::ClusterConfig;
use tributary_scheduler::service;

/// Which partitions this scheduler decides for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ownership {
    /// Every partition: the only scheduler of the log (`tributary up`).
    Every,
    /// The partitions consumer group `scheduler` gives it (`serve scheduler`, replicas).
    Group,
}

pub struct Options {
    pub config: ClusterConfig,
    pub ownership: Ownership,
}

/// The scheduler's configuration for `--lease-ttl SECS` (a lease and an agent are lost after
/// that long without a heartbeat); the one check of the flag, for `up` and `serve scheduler`.
pub fn config(lease_ttl_secs: f64) -> anyhow::Result<ClusterConfig> {
    if !(lease_ttl_secs.is_finite() && lease_ttl_secs > 0.0) {
        anyhow::bail!("--lease-ttl must be a positive number of seconds, not {lease_ttl_secs}");
    }
    let ttl_us = (lease_ttl_secs * 1e6).min(i64::MAX as f64) as i64;
    Ok(ClusterConfig {
        lease_ttl_us: ttl_us.max(1),
        agent_ttl_us: ttl_us.max(1),
        ..ClusterConfig::default()
    })
}

/// Runs until `shutdown` (then stops deciding and returns) or a failure.
pub async fn run(
    log: Arc<dyn EventLog>,
    options: Options,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let round = Duration::from_millis(250);
    match options.ownership {
        Ownership::Every => {
            let partitions = service::Partitions::every(log.layout());
            service::run(log, options.config, round, partitions, shutdown).await?;
            Ok(())
        }
        Ownership::Group => {
            let stop = shutdown.child_token();
            let (assigned_tx, assigned_rx) = tokio::sync::watch::channel(BTreeSet::new());
            let (partitions, deciding_rx) = service::Partitions::new(assigned_rx);
            let mut owner = tokio::spawn(service::own_by_group(
                log.clone(),
                "scheduler",
                assigned_tx,
                deciding_rx,
                stop.clone(),
            ));
            let mut decider = tokio::spawn(service::run(
                log.clone(),
                options.config,
                round,
                partitions,
                stop.clone(),
            ));
            let first = tokio::select! {
                () = shutdown.cancelled() => None,
                r = &mut owner => Some(("group membership", r)),
                r = &mut decider => Some(("scheduling", r)),
            };
            stop.cancel();
            let failed = match first {
                Some((what, Ok(Err(e)))) => Some(format!("{what} stopped: {e}")),
                Some((what, Err(e))) => Some(format!("{what} panicked: {e}")),
                Some((_, Ok(Ok(())))) | None => None,
            };
            if let Some(failed) = failed {
                anyhow::bail!("the scheduler stopped: {failed}");
            }
            for (what, task) in [("group membership", owner), ("scheduling", decider)] {
                if task.is_finished() {
                    continue;
                }
                match task.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::error!(error = %e, "{what} stopped with an error"),
                    Err(e) => tracing::error!(error = %e, "{what} panicked"),
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_ttl_is_checked_once_for_every_role() {
        let c = config(2.5).unwrap();
        assert_eq!(c.lease_ttl_us, 2_500_000);
        assert_eq!(c.agent_ttl_us, 2_500_000);
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let e = config(bad).unwrap_err().to_string();
            assert!(e.contains("--lease-ttl"), "{e}");
        }
    }
}
