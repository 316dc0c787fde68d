//! The embedded data directory: `events.db` (the log) and `readmodels.db` (the read models).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use tributary_eventlog::sqlite::SqliteLog;
use tributary_projections::BuildsStore;

pub struct DataDir {
    pub path: PathBuf,
    pub log: Arc<SqliteLog>,
    pub store: BuildsStore,
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
        Ok(DataDir {
            path: path.to_path_buf(),
            log: Arc::new(log),
            store,
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
