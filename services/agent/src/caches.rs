//! A job's caches (`cache:` entries): restored into the workspace before the job (after
//! checkout and artifacts), saved after it succeeded when their key was missed, each as one
//! gzip-compressed tar archive per (tenant, project, key) in object storage.
//!
//! * The key's `${{ hashFiles(...) }}` are evaluated in the workspace first
//!   ([`tributary_pipeline::cache`]).
//! * A restore trusts only the project's cache index the lease carries (folded from the log):
//!   the archive is downloaded, its size and sha256 checked against the index, then unpacked.
//!   Anything wrong (not in the index, missing, corrupt, unreadable) is a miss with a warning
//!   in the job's log, never a failed job.
//! * Paths are normalised like artifacts: archive entries are regular files and directories
//!   under normalised relative paths, never written through a symbolic link; symbolic links
//!   in the workspace are not cached (links leaving the workspace are refused at collection).
//! * After a save the agent decides eviction with [`tributary_scheduler::evict`] over the index
//!   plus the new archive and the lease's per-project limit, appends CacheEvicted for each
//!   archive it deletes, then deletes it.
//! * Every save is an archive of its own (`keys::cache` takes a fresh id), so a restore reads
//!   exactly what the index names even while another job saves the same key. An archive a
//!   later save superseded is deleted (CacheEvicted) by a later save of the project once its
//!   grace is over ([`tributary_scheduler::superseded_to_delete`]).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tributary_objects::{keys, ArtifactPath, Objects, ObjectsError, Stored};
use tributary_proto::api::CacheEntry;
use tributary_proto::events::{
    envelope::Payload, CacheEvicted, CacheRestored, CacheSaved, CacheSpec,
};

use crate::attempt::BuildRef;

/// Most files one cache archive may hold.
const MAX_FILES: usize = 1_000_000;

/// A cache entry of the job, with its key evaluated.
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    pub index: u32,
    pub key: String,
    pub paths: Vec<String>,
    /// The key was found and restored: nothing to save.
    pub hit: bool,
}

/// What restoring gave: events, lines for the job's log, and the caches to save on success.
#[derive(Default)]
pub(crate) struct Restored {
    pub events: Vec<Payload>,
    pub log: Vec<String>,
    pub caches: Vec<Resolved>,
}

/// Restores every cache of the job into `workdir`.
pub(crate) async fn restore(
    objects: Option<&Objects>,
    index: &[CacheEntry],
    specs: &[CacheSpec],
    job: &str,
    attempt: u32,
    workdir: &Path,
    scratch: &Path,
) -> Restored {
    let mut out = Restored::default();
    for (i, spec) in specs.iter().enumerate() {
        let n = i as u32;
        let key = match evaluate_key(&spec.key, workdir).await {
            Ok(key) => key,
            Err(e) => {
                out.log.push(format!(
                    "tributary: warning: cache {:?}: cannot evaluate its key: {e}; not restored \
                     nor saved",
                    spec.key
                ));
                continue;
            }
        };
        let mut event = CacheRestored {
            job: job.to_owned(),
            attempt,
            index: n,
            key: key.clone(),
            ..CacheRestored::default()
        };
        let found = index.iter().find(|e| e.key == key);
        match (objects, found) {
            (None, _) => {
                event.warning = "this agent has no object storage (--objects)".into();
            }
            (Some(_), None) => {}
            (Some(objects), Some(entry)) => {
                match download_and_unpack(objects, entry, workdir, scratch).await {
                    Ok(files) => {
                        event.hit = true;
                        event.size = entry.size;
                        event.files = files;
                        event.sha256 = entry.sha256.clone();
                        event.object_key = entry.object_key.clone();
                    }
                    Err(e) => {
                        event.warning = e;
                        event.object_key = entry.object_key.clone();
                    }
                }
            }
        }
        out.log.push(if event.hit {
            format!(
                "tributary: cache {key:?} restored: {} files, {} archived",
                event.files,
                human_bytes(event.size)
            )
        } else if event.warning.is_empty() {
            format!("tributary: cache {key:?} not found; it is saved if the job succeeds")
        } else {
            format!(
                "tributary: warning: cache {key:?} not restored: {}; treated as a miss (saved \
                 again if the job succeeds)",
                event.warning
            )
        });
        out.caches.push(Resolved {
            index: n,
            key,
            paths: spec.paths.clone(),
            hit: event.hit,
        });
        out.events.push(Payload::CacheRestored(event));
    }
    out
}

/// Saves every missed cache of a job that succeeded, then evicts what the project's limit
/// requires, and, when it saved one, deletes the superseded archives past their grace.
/// Problems are warnings (tracing): the job succeeded.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn save(
    objects: &Objects,
    build: &BuildRef,
    index: &[CacheEntry],
    superseded: &[CacheEntry],
    limit: u64,
    caches: &[Resolved],
    job: &str,
    attempt: u32,
    workdir: &Path,
    scratch: &Path,
) -> Vec<Payload> {
    let mut events = Vec::new();
    let mut entries: Vec<CacheEntry> = index.to_vec();
    for cache in caches.iter().filter(|c| !c.hit) {
        let saved = save_one(objects, build, cache, workdir, scratch).await;
        let (stored, files, object_key) = match saved {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(key = %cache.key, error = %e, "cannot save the cache");
                continue;
            }
        };
        tracing::info!(key = %cache.key, size = stored.size, files, "cache saved");
        let now = tributary_proto::now_us();
        entries.retain(|e| e.key != cache.key);
        entries.push(CacheEntry {
            key: cache.key.clone(),
            object_key: object_key.clone(),
            size: stored.size,
            sha256: stored.sha256.clone(),
            last_used_us: now,
        });
        events.push(Payload::CacheSaved(CacheSaved {
            job: job.to_owned(),
            attempt,
            index: cache.index,
            key: cache.key.clone(),
            size: stored.size,
            files,
            sha256: stored.sha256,
            object_key,
        }));
        for gone in tributary_scheduler::evict(&entries, limit, &cache.key) {
            let total: u64 = entries.iter().map(|e| e.size).sum();
            events.push(Payload::CacheEvicted(CacheEvicted {
                key: gone.key.clone(),
                object_key: gone.object_key.clone(),
                size: gone.size,
                last_used_us: gone.last_used_us,
                reason: format!(
                    "the project's caches took {} with the limit at {}; least recently used",
                    human_bytes(total),
                    human_bytes(limit)
                ),
                job: job.to_owned(),
                attempt,
            }));
            entries.retain(|e| e.key != gone.key);
            if let Err(e) = objects.delete(&gone.object_key).await {
                tracing::warn!(key = %gone.key, error = %e, "cannot delete an evicted cache");
            }
        }
    }
    let saved_one = events.iter().any(|e| matches!(e, Payload::CacheSaved(_)));
    if saved_one {
        let now = tributary_proto::now_us();
        for gone in tributary_scheduler::superseded_to_delete(superseded, now) {
            if let Err(e) = objects.delete(&gone.object_key).await {
                tracing::warn!(key = %gone.key, error = %e, "cannot delete a superseded cache");
                continue;
            }
            events.push(Payload::CacheEvicted(CacheEvicted {
                key: gone.key.clone(),
                object_key: gone.object_key.clone(),
                size: gone.size,
                last_used_us: gone.last_used_us,
                reason: format!(
                    "a later save of key {:?} superseded it more than {} ago",
                    gone.key,
                    human_duration(tributary_scheduler::caches::SUPERSEDED_GRACE_US)
                ),
                job: job.to_owned(),
                attempt,
            }));
        }
    }
    events
}

fn human_duration(us: i64) -> String {
    let secs = us / 1_000_000;
    if secs % 3600 == 0 {
        format!("{} h", secs / 3600)
    } else if secs % 60 == 0 {
        format!("{} min", secs / 60)
    } else {
        format!("{secs} s")
    }
}

async fn save_one(
    objects: &Objects,
    build: &BuildRef,
    cache: &Resolved,
    workdir: &Path,
    scratch: &Path,
) -> Result<(Stored, u64, String), String> {
    let save = tributary_proto::new_id();
    let object_key =
        keys::cache(&build.tenant, &build.project, &cache.key, &save).map_err(|e| e.to_string())?;
    let archive = scratch_file(scratch, "save")?;
    let root = workdir.to_path_buf();
    let patterns = cache.paths.clone();
    let file = archive.clone();
    let files = tokio::task::spawn_blocking(move || pack(&root, &patterns, &file))
        .await
        .map_err(|e| format!("packing the cache failed: {e}"))?;
    let result = match files {
        Ok(files) => objects
            .put_file(&object_key, &archive)
            .await
            .map(|stored| (stored, files, object_key))
            .map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    let _ = std::fs::remove_file(&archive);
    result
}

async fn download_and_unpack(
    objects: &Objects,
    entry: &CacheEntry,
    workdir: &Path,
    scratch: &Path,
) -> Result<u64, String> {
    let archive = scratch_file(scratch, "restore")?;
    let expected = Stored {
        size: entry.size,
        sha256: entry.sha256.clone(),
    };
    let result = match objects
        .get_verified(&entry.object_key, &expected, &archive)
        .await
    {
        Ok(()) => {
            let root = workdir.to_path_buf();
            let file = archive.clone();
            tokio::task::spawn_blocking(move || unpack(&file, &root))
                .await
                .map_err(|e| format!("unpacking failed: {e}"))
                .and_then(|r| r)
        }
        Err(ObjectsError::NotFound { .. }) => Err("its archive is missing".to_owned()),
        Err(e) => Err(e.to_string()),
    };
    let _ = std::fs::remove_file(&archive);
    result
}

fn scratch_file(scratch: &Path, what: &str) -> Result<PathBuf, String> {
    std::fs::create_dir_all(scratch)
        .map_err(|e| format!("cannot create {}: {e}", scratch.display()))?;
    Ok(scratch.join(format!("cache-{what}-{}.tar.gz", tributary_proto::new_id())))
}

/// The key with its `hashFiles` evaluated over the workspace.
pub(crate) async fn evaluate_key(key: &str, workdir: &Path) -> Result<String, String> {
    if !key.contains("${{") {
        return Ok(key.to_owned());
    }
    let key = key.to_owned();
    let root = workdir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        tributary_pipeline::cache::expand_key(&key, |patterns| hash_files(&root, patterns))
    })
    .await
    .map_err(|e| format!("hashing files failed: {e}"))?
}

/// GitHub's `hashFiles` over the workspace's files matching `patterns`.
fn hash_files(root: &Path, patterns: &[String]) -> Result<String, String> {
    let matcher = tributary_pipeline::artifacts::matcher(patterns)?;
    let files = crate::artifacts::collect(root, &matcher, MAX_FILES)?;
    let mut digests = Vec::with_capacity(files.len());
    for (path, file) in files {
        let mut f = std::fs::File::open(&file).map_err(|e| format!("cannot read {path}: {e}"))?;
        let mut hasher = Sha256::new();
        std::io::copy(&mut f, &mut hasher).map_err(|e| format!("cannot read {path}: {e}"))?;
        digests.push((path.to_string(), hasher.finalize().into()));
    }
    Ok(tributary_pipeline::cache::hash_files(&digests))
}

/// Archives the workspace's files matching `patterns` into `archive` (tar + gzip). Returns
/// how many files it holds.
fn pack(root: &Path, patterns: &[String], archive: &Path) -> Result<u64, String> {
    let matcher = tributary_pipeline::artifacts::matcher(patterns)?;
    let files = crate::artifacts::collect(root, &matcher, MAX_FILES)?;
    let out = std::fs::File::create(archive)
        .map_err(|e| format!("cannot create {}: {e}", archive.display()))?;
    let gz =
        flate2::write::GzEncoder::new(std::io::BufWriter::new(out), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    tar.follow_symlinks(true);
    let mut count = 0;
    for (path, file) in &files {
        tar.append_path_with_name(file, path.as_str())
            .map_err(|e| format!("cannot archive {path}: {e}"))?;
        count += 1;
    }
    let gz = tar
        .into_inner()
        .map_err(|e| format!("cannot write the archive: {e}"))?;
    let mut buf = gz
        .finish()
        .map_err(|e| format!("cannot write the archive: {e}"))?;
    buf.flush()
        .map_err(|e| format!("cannot write the archive: {e}"))?;
    Ok(count)
}

/// Unpacks `archive` into `root`: regular files and directories only, under normalised
/// relative paths, never through a symbolic link. Returns how many files it wrote.
fn unpack(archive: &Path, root: &Path) -> Result<u64, String> {
    let file = std::fs::File::open(archive).map_err(|e| format!("cannot read the archive: {e}"))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)));
    let mut count = 0;
    let entries = tar
        .entries()
        .map_err(|e| format!("the archive is unreadable: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("the archive is unreadable: {e}"))?;
        let raw = entry
            .path()
            .map_err(|e| format!("the archive is unreadable: {e}"))?
            .to_string_lossy()
            .into_owned();
        let path = ArtifactPath::parse(&raw).map_err(|e| format!("the archive holds {e}"))?;
        let dest = root.join(path.as_str());
        if let Some(link) = crate::artifacts::symlink_on_the_way(root, &dest) {
            return Err(format!(
                "{path} would be written through the symbolic link {}",
                link.display()
            ));
        }
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            std::fs::create_dir_all(&dest)
                .map_err(|e| format!("cannot create {}: {e}", dest.display()))?;
            continue;
        }
        if !kind.is_file() {
            continue; // links and devices are never restored
        }
        if let Some(dir) = dest.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        if dest
            .symlink_metadata()
            .is_ok_and(|m| m.file_type().is_symlink())
        {
            std::fs::remove_file(&dest)
                .map_err(|e| format!("cannot replace {}: {e}", dest.display()))?;
        }
        let mut out = std::fs::File::create(&dest)
            .map_err(|e| format!("cannot write {}: {e}", dest.display()))?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = entry
                .read(&mut buf)
                .map_err(|e| format!("the archive is unreadable: {e}"))?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n])
                .map_err(|e| format!("cannot write {}: {e}", dest.display()))?;
        }
        if let Ok(mode) = entry.header().mode() {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode & 0o777));
        }
        count += 1;
    }
    Ok(count)
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_then_unpack_round_trips_files_and_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let ws = tmp.path().join("ws");
        std::fs::create_dir_all(ws.join("target/debug")).unwrap();
        std::fs::write(ws.join("target/debug/app"), "binary").unwrap();
        std::fs::write(ws.join("target/x.d"), "dep").unwrap();
        std::fs::write(ws.join("src.rs"), "not cached").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            ws.join("target/debug/app"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let archive = tmp.path().join("a.tar.gz");
        assert_eq!(pack(&ws, &["target".into()], &archive).unwrap(), 2);
        let out = tmp.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        assert_eq!(unpack(&archive, &out).unwrap(), 2);
        assert_eq!(
            std::fs::read_to_string(out.join("target/debug/app")).unwrap(),
            "binary"
        );
        assert!(!out.join("src.rs").exists());
        let mode = std::fs::metadata(out.join("target/debug/app"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
    }

    #[test]
    fn unpacking_never_leaves_the_workspace() {
        let tmp = tempfile::tempdir().unwrap();
        // An archive whose entry climbs out (built by hand: tar::Builder refuses `..`).
        let archive = tmp.path().join("evil.tar.gz");
        {
            let f = std::fs::File::create(&archive).unwrap();
            let gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
            let mut b = tar::Builder::new(gz);
            let mut h = tar::Header::new_gnu();
            let data = b"evil";
            h.set_size(data.len() as u64);
            h.set_entry_type(tar::EntryType::Regular);
            h.as_gnu_mut().unwrap().name[..9].copy_from_slice(b"../escape");
            h.set_cksum();
            b.append(&h, &data[..]).unwrap();
            b.into_inner().unwrap().finish().unwrap();
        }
        let ws = tmp.path().join("ws");
        std::fs::create_dir_all(&ws).unwrap();
        let e = unpack(&archive, &ws).unwrap_err();
        assert!(e.contains("`..`"), "{e}");
        assert!(!tmp.path().join("escape").exists());

        // A symbolic link in the workspace is never written through.
        let ok = tmp.path().join("ok.tar.gz");
        let src = tmp.path().join("src");
        std::fs::create_dir_all(src.join("out")).unwrap();
        std::fs::write(src.join("out/f"), "x").unwrap();
        pack(&src, &["out".into()], &ok).unwrap();
        std::fs::create_dir_all(tmp.path().join("elsewhere")).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("elsewhere"), ws.join("out")).unwrap();
        let e = unpack(&ok, &ws).unwrap_err();
        assert!(e.contains("symbolic link"), "{e}");
        assert!(!tmp.path().join("elsewhere/f").exists());
    }

    #[test]
    fn hash_files_keys_follow_the_files() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("Cargo.lock"), "v1").unwrap();
        let key = |k: &str| {
            tributary_pipeline::cache::expand_key(k, |p| hash_files(tmp.path(), p)).unwrap()
        };
        let k1 = key("cargo-${{ hashFiles('Cargo.lock') }}");
        assert_eq!(k1.len(), "cargo-".len() + 64);
        assert_eq!(key("n-${{ hashFiles('nothing/*') }}"), "n-");
        std::fs::write(tmp.path().join("Cargo.lock"), "v2").unwrap();
        assert_ne!(key("cargo-${{ hashFiles('Cargo.lock') }}"), k1);
    }
}
