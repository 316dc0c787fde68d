//! [`Objects`]: one object store (a local directory or an S3 bucket and prefix) with sha256 taken
//! on the way in and checked on the way out.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::buffered::BufWriter;
use object_store::local::LocalFileSystem;
use object_store::path::Path as Key;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::ObjectsError;

/// What was stored: its size and the hex sha256 of its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub size: u64,
    pub sha256: String,
}

/// An object's key, size and last modification (Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub key: String,
    pub size: u64,
    pub modified_unix: i64,
}

/// S3 settings given explicitly rather than through the `AWS_*` environment variables: each
/// one set overrides the environment's.
#[derive(Clone, Default)]
pub struct S3Settings {
    /// An S3-compatible server, e.g. `http://127.0.0.1:9000` (MinIO); path-style requests.
    pub endpoint: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub region: Option<String>,
    /// Allow a plain `http://` endpoint.
    pub allow_http: bool,
}

impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "***"),
            )
            .field("region", &self.region)
            .field("allow_http", &self.allow_http)
            .finish()
    }
}

impl S3Settings {
    fn apply(&self, mut builder: AmazonS3Builder) -> AmazonS3Builder {
        if let Some(endpoint) = &self.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(key) = &self.access_key_id {
            builder = builder.with_access_key_id(key);
        }
        if let Some(secret) = &self.secret_access_key {
            builder = builder.with_secret_access_key(secret);
        }
        if let Some(region) = &self.region {
            builder = builder.with_region(region);
        }
        if self.allow_http {
            builder = builder.with_allow_http(true);
        }
        builder
    }
}

/// Where Tributary keeps logs, artifacts and caches.
#[derive(Clone)]
pub struct Objects {
    store: Arc<dyn ObjectStore>,
    /// Where, for messages (never a credential: those come from the environment).
    location: String,
}

impl std::fmt::Debug for Objects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Objects")
            .field("location", &self.location)
            .finish()
    }
}

const CHUNK: usize = 1024 * 1024;

impl Objects {
    /// Opens the store named by `url`:
    /// * `s3://BUCKET[/PREFIX]`: S3 or an S3-compatible server, configured by the usual AWS
    ///   environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
    ///   `AWS_ENDPOINT` for a custom endpoint such as MinIO, `AWS_ALLOW_HTTP=true` for plain HTTP);
    /// * `file:///DIR` or a plain path: a directory on the local file system (created if
    ///   missing).
    pub fn open(url: &str) -> Result<Objects, ObjectsError> {
        Objects::open_with(url, &S3Settings::default())
    }

    /// [`Objects::open`] with S3 settings given explicitly: each one set in `s3` overrides the
    /// environment's (tests pass the test server's this way, never through the process's
    /// environment). Ignored for a local directory.
    pub fn open_with(url: &str, s3: &S3Settings) -> Result<Objects, ObjectsError> {
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(ObjectsError::BadUrl {
                    url: url.to_owned(),
                    reason: "no bucket: write s3://BUCKET or s3://BUCKET/PREFIX".into(),
                });
            }
            let s3 = s3
                .apply(AmazonS3Builder::from_env())
                .with_bucket_name(bucket)
                .build()
                .map_err(|e| ObjectsError::BadUrl {
                    url: url.to_owned(),
                    reason: format!(
                        "{e}; set AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION (and \
                         AWS_ENDPOINT for an S3-compatible server)"
                    ),
                })?;
            let prefix = prefix.trim_matches('/');
            let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
                Arc::new(s3)
            } else {
                Arc::new(PrefixStore::new(s3, prefix))
            };
            return Ok(Objects {
                store,
                location: url.to_owned(),
            });
        }
        if url.contains("://") && !url.starts_with("file://") {
            return Err(ObjectsError::BadUrl {
                url: url.to_owned(),
                reason: "use s3://BUCKET/PREFIX, file:///DIR or a directory path".into(),
            });
        }
        let dir = PathBuf::from(url.strip_prefix("file://").unwrap_or(url));
        Objects::local(&dir)
    }

    /// A directory on the local file system (created if missing).
    pub fn local(dir: &Path) -> Result<Objects, ObjectsError> {
        std::fs::create_dir_all(dir).map_err(|e| ObjectsError::Io {
            what: format!("cannot create the objects directory {}", dir.display()),
            source: e,
        })?;
        let store = LocalFileSystem::new_with_prefix(dir).map_err(|e| ObjectsError::BadUrl {
            url: dir.display().to_string(),
            reason: e.to_string(),
        })?;
        Ok(Objects {
            store: Arc::new(store),
            location: dir.display().to_string(),
        })
    }

    pub fn location(&self) -> &str {
        &self.location
    }

    /// Uploads the file at `file` under `key`, streaming (multipart for large files), and
    /// returns its size and sha256.
    pub async fn put_file(&self, key: &str, file: &Path) -> Result<Stored, ObjectsError> {
        let io = |e| ObjectsError::Io {
            what: format!("cannot read {}", file.display()),
            source: e,
        };
        let mut src = tokio::fs::File::open(file).await.map_err(io)?;
        let mut out = BufWriter::new(self.store.clone(), Key::from(key));
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = src.read(&mut buf).await.map_err(io)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            size += n as u64;
            if let Err(e) = out.write_all(&buf[..n]).await {
                let _ = out.abort().await;
                return Err(self.io_error(key, e));
            }
        }
        out.shutdown().await.map_err(|e| self.io_error(key, e))?;
        Ok(Stored {
            size,
            sha256: hex::encode(hasher.finalize()),
        })
    }

    /// Stores `bytes` under `key` in one request.
    pub async fn put_bytes(&self, key: &str, bytes: Bytes) -> Result<Stored, ObjectsError> {
        let stored = Stored {
            size: bytes.len() as u64,
            sha256: hex::encode(Sha256::digest(&bytes)),
        };
        self.store
            .put(&Key::from(key), PutPayload::from_bytes(bytes))
            .await
            .map_err(|e| match e {
                object_store::Error::NotFound { .. } => self.no_bucket(key, &e.to_string()),
                e => self.store_error(key, e),
            })?;
        Ok(stored)
    }

    /// Downloads `key` into `dest` (its directory is created), checking that its size and
    /// sha256 are `expected`'s before it appears under `dest`: a mismatch is
    /// [`ObjectsError::Corrupt`] and leaves nothing behind.
    pub async fn get_verified(
        &self,
        key: &str,
        expected: &Stored,
        dest: &Path,
    ) -> Result<(), ObjectsError> {
        let io = |what: String| move |e| ObjectsError::Io { what, source: e };
        if let Some(dir) = dest.parent() {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(io(format!("cannot create {}", dir.display())))?;
        }
        let mut name = dest.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".tributary-{}", uuid::Uuid::now_v7()));
        let tmp = dest.with_file_name(name);
        let result = async {
            let mut out = tokio::fs::File::create(&tmp)
                .await
                .map_err(io(format!("cannot create {}", tmp.display())))?;
            let mut stream = self.stream(key).await?;
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                hasher.update(&chunk);
                size += chunk.len() as u64;
                out.write_all(&chunk)
                    .await
                    .map_err(io(format!("cannot write {}", tmp.display())))?;
            }
            out.flush()
                .await
                .map_err(io(format!("cannot write {}", tmp.display())))?;
            let actual = Stored {
                size,
                sha256: hex::encode(hasher.finalize()),
            };
            if actual != *expected {
                return Err(ObjectsError::Corrupt {
                    key: key.to_owned(),
                    location: self.location.clone(),
                    expected_sha256: expected.sha256.clone(),
                    expected_size: expected.size,
                    actual_sha256: actual.sha256,
                    actual_size: actual.size,
                });
            }
            tokio::fs::rename(&tmp, dest)
                .await
                .map_err(io(format!("cannot move into {}", dest.display())))
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }

    /// The bytes of `key` as a stream (an HTTP download). Not verified: the caller serves them
    /// with the recorded sha256 so the client can check.
    pub async fn stream(
        &self,
        key: &str,
    ) -> Result<BoxStream<'static, Result<Bytes, ObjectsError>>, ObjectsError> {
        let got = self
            .store
            .get(&Key::from(key))
            .await
            .map_err(|e| self.store_error(key, e))?;
        let this = self.clone();
        let key = key.to_owned();
        Ok(got
            .into_stream()
            .map_err(move |e| this.store_error(&key, e))
            .boxed())
    }

    /// The size of `key`, or None if there is no such object.
    pub async fn size(&self, key: &str) -> Result<Option<u64>, ObjectsError> {
        match self.store.head(&Key::from(key)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.store_error(key, e)),
        }
    }

    /// Every object under `prefix`.
    pub async fn list(&self, prefix: &str) -> Result<Vec<Listed>, ObjectsError> {
        let prefix = Key::from(prefix);
        self.store
            .list(Some(&prefix))
            .map_ok(|m| Listed {
                key: m.location.to_string(),
                size: m.size,
                modified_unix: m.last_modified.timestamp(),
            })
            .try_collect()
            .await
            .map_err(|e| self.store_error(prefix.as_ref(), e))
    }

    pub async fn delete(&self, key: &str) -> Result<(), ObjectsError> {
        match self.store.delete(&Key::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.store_error(key, e)),
        }
    }

    fn no_bucket(&self, key: &str, detail: &str) -> ObjectsError {
        ObjectsError::NoBucket {
            key: key.to_owned(),
            location: self.location.clone(),
            detail: short_detail(detail),
        }
    }

    fn store_error(&self, key: &str, e: object_store::Error) -> ObjectsError {
        match e {
            object_store::Error::NotFound { .. } => ObjectsError::NotFound {
                key: key.to_owned(),
                location: self.location.clone(),
            },
            e => ObjectsError::Store {
                key: key.to_owned(),
                location: self.location.clone(),
                source: Box::new(e),
            },
        }
    }

    /// An upload's error; a "not found" on a write means the bucket is gone.
    fn io_error(&self, key: &str, e: std::io::Error) -> ObjectsError {
        if e.kind() == std::io::ErrorKind::NotFound {
            return self.no_bucket(key, &e.to_string());
        }
        ObjectsError::Io {
            what: format!("cannot upload {key} to {}", self.location),
            source: e,
        }
    }
}

/// The store's message up to the response body it may quote (S3's XML), on one line and
/// bounded.
fn short_detail(message: &str) -> String {
    let head = message.split("<?xml").next().unwrap_or_default();
    let line: String = head.split_whitespace().collect::<Vec<_>>().join(" ");
    let line = line.trim_end_matches([':', ' ']);
    match line.char_indices().nth(300) {
        Some((at, _)) => format!("{}…", &line[..at]),
        None => line.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::short_detail;

    #[test]
    fn a_store_message_is_cut_before_the_body_it_quotes() {
        let s3 = "Object at location a/b not found: Error performing PUT http://h/b/a/b in 2ms - \
                  Server returned non-2xx status code: 404 Not Found: <?xml version=\"1.0\"?>\n\
                  <Error><Code>NoSuchBucket</Code></Error>";
        assert_eq!(
            short_detail(s3),
            "Object at location a/b not found: Error performing PUT http://h/b/a/b in 2ms - \
             Server returned non-2xx status code: 404 Not Found"
        );
        let long = "x".repeat(400);
        assert_eq!(short_detail(&long).chars().count(), 301);
    }
}
