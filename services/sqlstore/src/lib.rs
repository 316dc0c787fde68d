//! What every SQL store of Tributary shares (the builds read model in `tributary-projections`,
//! metering in `tributary-metering`): which engine a location names ([`Engine`],
//! [`Location`]), the `sqlite://` URL of a file whatever its path holds ([`sqlite_url`]),
//! opening a pool with the per-engine settings and migrations ([`open`]), and integer
//! conversions between Rust's unsigned numbers and SQL's `BIGINT` that fail instead of
//! inventing a value ([`int`]).
//!
//! The SQL itself stays with each store: they share sqlx's `Any` driver, `$n` parameters and
//! `ON CONFLICT` upserts, and each has its own migrations for both engines.
//!
//! *Does not know* any table: it opens databases and converts numbers.

pub mod int;
mod location;
mod open;

pub use int::{to_i64, to_u32, to_u64};
pub use location::{redact, sqlite_url, Engine, Location};
pub use open::{open, Migrations, Settings, Store, Synchronous};

use std::path::PathBuf;

/// Why a store could not be opened, or a number could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SqlStoreError {
    #[error(
        "unsupported {what} database URL {url:?}: use sqlite://PATH or \
         postgres://USER:PASSWORD@HOST:PORT/DATABASE"
    )]
    UnsupportedUrl { what: &'static str, url: String },
    #[error("the {what} database path {} is not UTF-8; choose another data directory", path.display())]
    NotUtf8 { what: &'static str, path: PathBuf },
    #[error("the {what} database path is empty; give a file name")]
    EmptyPath { what: &'static str },
    #[error("invalid PostgreSQL schema name {0:?}: use lowercase letters, digits and _")]
    Schema(String),
    #[error("{0}")]
    Db(#[from] sqlx::Error),
    #[error("migrating the database failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored number outside the range of the Rust type that reads it.
    #[error(
        "the database holds {value} as {what}, outside {range}: it was not written by this \
         version of Tributary or is damaged; rebuild it from the log with `tributary replay`"
    )]
    OutOfRange {
        what: &'static str,
        value: i64,
        range: &'static str,
    },
    /// A number too large for a SQL `BIGINT`.
    #[error(
        "{what} {value} does not fit a database integer (at most {}); nothing was written",
        i64::MAX
    )]
    TooLarge { what: &'static str, value: u64 },
}
