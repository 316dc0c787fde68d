//! Read models: pure folds over the event log, persisted with their consumer offset.
//!
//! Each read model is three pieces:
//! * a **fold** `apply(&mut State, offset, &Envelope)` — pure, deterministic, total;
//! * a **store** that persists the state's rows and the projection's next offset in one
//!   transaction;
//! * the **projector** that feeds log records to the fold and the store.
//!
//! Read models today:
//! * [`builds`]: builds → jobs → steps → lines.
//! * [`directory`]: tenants, API tokens (by sha256) and projects, in memory.
//!
//! [`replay`] rebuilds a read model from offset 0 and compares it with the stored one.
//! [`history`] folds one build up to any moment of its life (time travel) and [`why`]
//! explains each of its jobs' decisions, both from the build's own events.

pub mod builds;
pub mod chunks;
pub mod directory;
pub mod history;
pub mod positions;
pub mod projector;
pub mod replay;
pub mod store;
pub mod why;

pub use builds::{apply, Build, BuildsState, Job, Line, Phase, Step, Touch};
pub use positions::ReadModelPositions;
pub use projector::{BuildsProjector, ChunkCounter};
pub use store::BuildsStore;

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error("read-model database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migrating the read-model database failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("event log error: {0}")]
    Log(#[from] tributary_eventlog::LogError),
    #[error("read-model row is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("read-model database is corrupt: {0}")]
    Corrupt(String),
    #[error("read-model database: {0}")]
    Store(#[from] tributary_sqlstore::SqlStoreError),
    /// Another projector advanced this partition since this one read its offset.
    #[error(
        "partition {partition}: the stored offset is no longer {expected}; another projector \
         wrote it (this one reloads and carries on)"
    )]
    Fenced { partition: u32, expected: u64 },
}
