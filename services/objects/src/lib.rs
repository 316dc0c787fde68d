//! Object storage for Tributary: job logs, artifacts and caches, on the local file system (the
//! embedded default) or in S3 and S3-compatible servers (scale-out), through `object_store`.
//!
//! Invariants kept here:
//! * Every upload returns the sha256 and size of exactly the bytes stored ([`Stored`]); they go
//!   into the event that records the object (ArtifactUploaded, CacheSaved).
//! * A download is verified before it becomes visible: [`Objects::get_verified`] writes to a
//!   temporary file beside the destination, compares size and sha256, and only then renames it
//!   into place; a mismatch is [`ObjectsError::Corrupt`] and leaves nothing.
//! * Artifact paths are normalised and can never leave a workspace ([`ArtifactPath`]); keys are
//!   built from validated components only ([`keys`]).

mod path;
mod store;

pub mod keys;

pub use path::{key_component, ArtifactPath, PathError, MAX_PATH_BYTES};
pub use store::{Listed, Objects, S3Settings, Stored};

#[derive(Debug, thiserror::Error)]
pub enum ObjectsError {
    #[error("bad object storage location {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("object {key} is not in {location}")]
    NotFound { key: String, location: String },
    #[error(
        "object {key} in {location} is corrupt: expected {expected_size} bytes with sha256 \
         {expected_sha256}, got {actual_size} bytes with sha256 {actual_sha256}; it was changed \
         or damaged after upload, so it is not used (re-run the job that produced it)"
    )]
    Corrupt {
        key: String,
        location: String,
        expected_sha256: String,
        expected_size: u64,
        actual_sha256: String,
        actual_size: u64,
    },
    #[error("object storage error on {key} in {location}: {source}")]
    Store {
        key: String,
        location: String,
        #[source]
        source: Box<object_store::Error>,
    },
    /// A write found no bucket (S3 answers 404 to a PUT only when the bucket is missing).
    #[error(
        "cannot store {key} in {location}: the bucket is not there (deleted, or never \
         created); create it again or point --objects at one that exists ({detail})"
    )]
    NoBucket {
        key: String,
        location: String,
        /// The store's own words, without the response body.
        detail: String,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Path(#[from] PathError),
}
