//! The projector role: the builds read model written from the log, one member of consumer
//! group `projector` (events topic) and, on a log with a logs topic, one member of
//! `projector-logs` counting log bytes (see `tributary_projections::projector`).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tributary_eventlog::EventLog;
use tributary_projections::{BuildsProjector, ChunkCounter};

/// Runs `projector` (opened by the caller, who may watch its applied positions first) until
/// `shutdown` (both members commit and leave their groups) or the first error of either.
pub async fn run(
    log: Arc<dyn EventLog>,
    mut projector: BuildsProjector,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let layout = log.layout();
    let mut counter = ChunkCounter::new(projector.store().clone());
    {
        let builds = projector.run(log.as_ref(), shutdown.cancelled());
        let counts = async {
            if layout.logs > 0 {
                counter.run(log.as_ref(), shutdown.cancelled()).await
            } else {
                Ok(())
            }
        };
        tokio::try_join!(builds, counts)?;
    }
    tracing::info!(
        malformed = projector.malformed() + counter.malformed(),
        duplicates = projector.duplicates() + counter.duplicates(),
        "builds projector stopped"
    );
    Ok(())
}
