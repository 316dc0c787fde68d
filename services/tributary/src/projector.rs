//! `tributary serve projector`: the builds projector as its own process, one member of the
//! consumer group `projector` (events topic) and, on a log with a logs topic, one member of
//! `projector-logs` counting log bytes (see `tributary_projections::projector`).

use std::process::ExitCode;

use tokio::sync::watch;
use tributary_projections::{BuildsProjector, ChunkCounter};

use crate::cli::ServeProjectorArgs;

/// Resolves when `stop` turns true (or its sender is gone).
async fn stopped(mut stop: watch::Receiver<bool>) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

pub async fn serve(args: ServeProjectorArgs) -> anyhow::Result<ExitCode> {
    let backends = args.backends.resolve()?;
    let _lock = backends.lock_data()?;
    let log = backends.open_log().await?;
    let store = backends.open_store().await?;
    let _health = crate::health::start_with_log(&args.health, "projector", log.clone()).await?;
    let mut projector = BuildsProjector::open(store.clone()).await?;
    let layout = log.layout();
    tracing::info!(
        log = %backends.log_location(),
        ?layout,
        "builds projector starting"
    );
    let (stop, stop_rx) = watch::channel(false);
    let mut counter = ChunkCounter::new(store);
    {
        let builds = projector.run(log.as_ref(), stopped(stop_rx.clone()));
        let counts = async {
            if layout.logs > 0 {
                counter.run(log.as_ref(), stopped(stop_rx)).await
            } else {
                Ok(())
            }
        };
        // Ends at the first error of either member, or when both left after a signal.
        let work = async { tokio::try_join!(builds, counts) };
        tokio::pin!(work);
        tokio::select! {
            result = &mut work => { result?; }
            () = crate::server::wait_for_signal() => {
                let _ = stop.send(true);
                work.await?;
            }
        }
    }
    tracing::info!(
        malformed = projector.malformed() + counter.malformed(),
        duplicates = projector.duplicates() + counter.duplicates(),
        "builds projector stopped"
    );
    Ok(ExitCode::SUCCESS)
}
