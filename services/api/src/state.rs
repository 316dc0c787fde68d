//! What every API handler shares: the log, the read models, the repository mirrors.
//!
//! Read-your-writes: a handler that appended at offset N and then reads a read model first
//! waits until that read model has folded past N ([`ApiState::wait_directory`],
//! [`ApiState::wait_builds`]).

use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;
use tonic::Status;
use tributary_eventlog::EventLog;
use tributary_projections::directory::Directory;
use tributary_projections::BuildsStore;
use tributary_proto::events::{envelope::Payload, Envelope};

#[derive(Clone)]
pub struct ApiState {
    pub log: Arc<dyn EventLog>,
    pub store: BuildsStore,
    pub mirrors: tributary_repo::Mirrors,
    directory: Arc<RwLock<Directory>>,
    /// Next offset the directory fold will apply.
    directory_at: watch::Receiver<u64>,
}

impl ApiState {
    /// Builds the directory from the log (offset 0) and keeps following it in a task.
    pub async fn start(
        log: Arc<dyn EventLog>,
        store: BuildsStore,
        mirrors: tributary_repo::Mirrors,
    ) -> Result<ApiState, tributary_eventlog::LogError> {
        let directory = Arc::new(RwLock::new(Directory::default()));
        let (tx, rx) = watch::channel(0u64);
        let mut sub = log.subscribe(0);
        let dir = directory.clone();
        tokio::spawn(async move {
            loop {
                let records = match sub.next_batch().await {
                    Ok(records) => records,
                    Err(e) => {
                        tracing::info!(error = %e, "directory fold stopped");
                        return;
                    }
                };
                if let Ok(mut d) = dir.write() {
                    for record in &records {
                        if let Ok(env) = record.decode() {
                            d.apply(&env);
                        }
                    }
                }
                let _ = tx.send(sub.position());
            }
        });
        let state = ApiState {
            log,
            store,
            mirrors,
            directory,
            directory_at: rx,
        };
        let end = state.log.end_offset().await?;
        let _ = state.wait_directory(end).await;
        Ok(state)
    }

    /// A consistent copy-free view of the directory.
    pub fn directory<R>(&self, f: impl FnOnce(&Directory) -> R) -> Result<R, Status> {
        let d = self
            .directory
            .read()
            .map_err(|_| Status::internal("directory lock poisoned"))?;
        Ok(f(&d))
    }

    /// Waits until the directory has folded every offset below `end`.
    pub async fn wait_directory(&self, end: u64) -> Result<(), Status> {
        let mut rx = self.directory_at.clone();
        let ok = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|at| *at >= end))
            .await
            .is_ok_and(|r| r.is_ok());
        if ok {
            Ok(())
        } else {
            Err(Status::unavailable(
                "the directory read model is lagging; retry",
            ))
        }
    }

    /// Waits (bounded) until the builds read model has folded every offset below `end`.
    pub async fn wait_builds(&self, end: u64) -> Result<(), Status> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let at = self.store.next_offset().await.map_err(internal)?;
            if at >= end {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(Status::unavailable(
                    "the builds read model is lagging; retry",
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Appends and returns the offsets; a storage failure is UNAVAILABLE (retry).
    pub async fn append(&self, events: &[Envelope]) -> Result<Vec<u64>, Status> {
        self.log
            .append(events)
            .await
            .map_err(|e| Status::unavailable(format!("cannot append to the log: {e}")))
    }
}

pub fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

/// A directory-level event (no build).
pub fn directory_event(tenant: &str, payload: Payload) -> Envelope {
    Envelope::new(tenant, "", "", payload)
}
