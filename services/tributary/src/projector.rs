//! `tributary serve projector`: the builds projector as its own process, one member of the
//! consumer group `projector` (see `tributary_projections::projector`).

use std::process::ExitCode;

use tributary_projections::BuildsProjector;

use crate::cli::ServeProjectorArgs;

pub async fn serve(args: ServeProjectorArgs) -> anyhow::Result<ExitCode> {
    let backends = args.backends.resolve()?;
    let log = backends.open_log().await?;
    let store = backends.open_store().await?;
    let mut projector = BuildsProjector::open(store).await?;
    tracing::info!(
        log = %backends.log_location(),
        layout = ?log.layout(),
        "builds projector starting"
    );
    projector
        .run(log.as_ref(), async {
            crate::server::wait_for_signal().await;
        })
        .await?;
    tracing::info!(
        malformed = projector.malformed,
        duplicates = projector.duplicates,
        "builds projector stopped"
    );
    Ok(ExitCode::SUCCESS)
}
