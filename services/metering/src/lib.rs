//! Metering: machine time billed from the same log that runs the builds.
//!
//! * [`calendar`]: UTC days and months, splitting a tick's interval at midnight. Pure.
//! * [`plan`]: the TOML price plan, exact integer money (micro-units). Pure.
//! * [`fold`]: UsageTick / job / InvoiceIssued events → usage per tenant, project, machine
//!   class and day, machine time per job attempt and month, issued invoices. Pure.
//! * [`invoice`]: pricing (per-job rounding, free minutes, adjustments for late usage) and
//!   which invoices are due. Pure.
//! * [`store`] + [`projector`]: the read model in SQLite or PostgreSQL with its consumer offsets
//!   (one per events partition), written in
//!   one transaction per batch.
//! * [`service`]: the shell: follows the log, appends InvoiceIssued when a month is over.
//! * [`audit`]: replays the log into a fresh state and compares it with the stored one;
//!   rebuilds `metering.db` (`tributary replay`).
//! * [`view`]: reads what metering needs of an encoded event without decoding all of it
//!   (borrowed usage ticks: the replay's hot path).

pub mod audit;
pub mod calendar;
pub mod fold;
pub mod invoice;
pub mod plan;
pub mod projector;
pub mod service;
pub mod status;
pub mod store;
pub mod view;

pub use calendar::{Day, Period};
pub use fold::{Effect, MeteringState, Pos};
pub use invoice::{price, Invoice};
pub use plan::PricePlan;
pub use projector::MeteringProjector;
pub use status::InvoiceStatus;
pub use store::MeteringStore;

#[derive(Debug, thiserror::Error)]
pub enum MeteringError {
    #[error("metering database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("metering database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("event log error: {0}")]
    Log(#[from] tributary_eventlog::LogError),
    #[error("metering row is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{0}")]
    Corrupt(String),
    #[error("metering database: {0}")]
    Store(#[from] tributary_sqlstore::SqlStoreError),
}
