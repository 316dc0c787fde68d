//! Locking a mirror: an async read/write lock per mirror path shared by the whole process, then
//! `flock(2)` on `<mirror>.lock` so that other processes using the same mirrors root are excluded
//! too. Writers (sync: clone, fetch, gc) are exclusive; readers (rev-parse, cat-file, copying into
//! a workspace) are shared, so they never see a pack that a concurrent gc is deleting.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};
use tokio::time::Instant;

use crate::error::RepoError;

/// What this process remembers about a mirror.
#[derive(Debug, Default)]
pub(crate) struct MirrorState {
    /// When the last successful sync *started*: a sync requested before that need not fetch again.
    pub last_sync_started: Option<Instant>,
    /// When the last lookup of the remote's default branch (HEAD) started.
    pub head_checked: Option<Instant>,
    /// The `remote.origin.url` this process last wrote into the mirror's config.
    pub origin_url: Option<String>,
    /// Fetches run by this process (automatic maintenance runs on some of them only).
    pub fetches: u64,
}

type Slot = Arc<RwLock<MirrorState>>;

fn slot(mirror: &Path) -> Slot {
    static SLOTS: OnceLock<Mutex<HashMap<PathBuf, Slot>>> = OnceLock::new();
    let mut slots = SLOTS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    // Drop entries nobody holds, so a long-lived agent does not grow the map forever.
    if slots.len() > 64 {
        slots.retain(|_, s| Arc::strong_count(s) > 1);
    }
    slots.entry(mirror.to_path_buf()).or_default().clone()
}

/// An exclusive hold on a mirror (in-process and across processes).
pub(crate) struct WriteLock {
    pub state: OwnedRwLockWriteGuard<MirrorState>,
    _file: File,
}

/// A shared hold on a mirror.
pub(crate) struct ReadLock {
    _state: OwnedRwLockReadGuard<MirrorState>,
    _file: File,
}

pub(crate) async fn write(
    mirror: &Path,
    repository: &str,
    max_wait: Duration,
) -> Result<WriteLock, RepoError> {
    let state = slot(mirror).write_owned().await;
    let file = flock(mirror, repository, libc::LOCK_EX, max_wait).await?;
    Ok(WriteLock { state, _file: file })
}

pub(crate) async fn read(
    mirror: &Path,
    repository: &str,
    max_wait: Duration,
) -> Result<ReadLock, RepoError> {
    let state = slot(mirror).read_owned().await;
    let file = flock(mirror, repository, libc::LOCK_SH, max_wait).await?;
    Ok(ReadLock {
        _state: state,
        _file: file,
    })
}

pub(crate) fn lock_path(mirror: &Path) -> PathBuf {
    let mut name = mirror.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    mirror.with_file_name(name)
}

/// Takes `flock(op)` on the mirror's lock file, polling without blocking a thread (so the future
/// can be dropped at any time); released when the returned file is closed, also if the process
/// dies.
async fn flock(
    mirror: &Path,
    repository: &str,
    op: libc::c_int,
    max_wait: Duration,
) -> Result<File, RepoError> {
    let path = lock_path(mirror);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| {
            RepoError::io(format!("cannot create the mirrors directory {parent:?}"), e)
        })?;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| RepoError::io(format!("cannot open the mirror lock file {path:?}"), e))?;
    let started = Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        // SAFETY: flock only operates on the descriptor, which `file` keeps open.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(file);
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EWOULDBLOCK) | Some(libc::EINTR) => {}
            _ => {
                return Err(RepoError::io(
                    format!("cannot lock the mirror lock file {path:?}"),
                    err,
                ))
            }
        }
        if started.elapsed() >= max_wait {
            return Err(RepoError::LockTimeout {
                repository: repository.to_owned(),
                lock: path,
                waited: started.elapsed(),
            });
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn flock_excludes_other_open_files() {
        let dir = tempfile::tempdir().unwrap();
        let mirror = dir.path().join("m");
        let short = Duration::from_millis(50);
        let held = flock(&mirror, "r", libc::LOCK_EX, short).await.unwrap();
        // A second open file description (as another process would have) cannot take it.
        let err = flock(&mirror, "r", libc::LOCK_SH, short).await.unwrap_err();
        assert!(matches!(err, RepoError::LockTimeout { .. }), "{err}");
        assert!(err.to_string().contains("m.lock"), "{err}");
        drop(held);
        let a = flock(&mirror, "r", libc::LOCK_SH, short).await.unwrap();
        let _b = flock(&mirror, "r", libc::LOCK_SH, short).await.unwrap();
        assert!(flock(&mirror, "r", libc::LOCK_EX, short).await.is_err());
        drop(a);
    }

    #[test]
    fn lock_file_sits_beside_the_mirror() {
        assert_eq!(
            lock_path(Path::new("/m/app-0123")),
            PathBuf::from("/m/app-0123.lock")
        );
    }
}
