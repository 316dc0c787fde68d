//! The embedded data directory: `events.db` (the log), `readmodels.db` (the builds read
//! model) and `metering.db` (the metering read model).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use tributary_eventlog::sqlite::SqliteLog;
use tributary_projections::BuildsStore;

pub struct DataDir {
    pub path: PathBuf,
    pub log: Arc<SqliteLog>,
    pub store: BuildsStore,
    /// The metering read model (`metering.db`).
    pub metering: tributary_metering::MeteringStore,
}

impl DataDir {
    pub async fn open(path: &Path) -> anyhow::Result<DataDir> {
        std::fs::create_dir_all(path)
            .with_context(|| format!("cannot create data directory {}", path.display()))?;
        let log = SqliteLog::open(&path.join("events.db"))
            .await
            .with_context(|| format!("cannot open the event log in {}", path.display()))?;
        let store = BuildsStore::open(&path.join("readmodels.db"))
            .await
            .with_context(|| format!("cannot open the read models in {}", path.display()))?;
        let metering = tributary_metering::MeteringStore::open(&path.join("metering.db"))
            .await
            .with_context(|| format!("cannot open the metering database in {}", path.display()))?;
        Ok(DataDir {
            path: path.to_path_buf(),
            log: Arc::new(log),
            store,
            metering,
        })
    }

    /// The object storage of the embedded default: `objects/` in the data directory.
    pub fn objects(&self) -> anyhow::Result<tributary_objects::Objects> {
        Ok(tributary_objects::Objects::local(
            &self.path.join("objects"),
        )?)
    }

    /// Brings the builds read model up to the end of the log.
    pub async fn catch_up(&self) -> anyhow::Result<()> {
        let mut projector =
            tributary_projections::BuildsProjector::open(self.store.clone()).await?;
        projector.catch_up(self.log.as_ref()).await?;
        Ok(())
    }
}
