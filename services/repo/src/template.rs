//! Pristine checkouts, one per (repository, commit), so that only the first job of a commit pays
//! for git: it checks the commit out with git as usual, then saves a copy of the fresh workspace
//! here; every later job of that commit gets a copy of the copy, made in-process (files copied
//! with their modes and times, symbolic links recreated, git's immutable object files
//! hard-linked) instead of the five or more git processes of a checkout. Into a reused workspace
//! (an agent recycles finished ones) only what differs is written (compared by content, never
//! trusted from size and time), so a steady stream of jobs
//! creates and deletes almost no files: on a busy agent, inode churn costs more than git.
//!
//! Layout: `<mirrors root>/.checkouts/<mirror name>/<sha>`. A template is written under a
//! temporary name and renamed into place, so a complete template is the only kind that exists
//! under its final name; the newest [`KEEP`] per repository are kept. A template removed while a
//! job copies it makes that copy fail, and the checkout falls back to git.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::source::Source;

/// Templates kept per repository (the newest ones).
const KEEP: usize = 8;
/// A temporary template older than this was left by a crash.
const STALE_TMP: Duration = Duration::from_secs(3600);

/// Where the template of `sha` of `source` lives.
pub(crate) fn path(root: &Path, source: &Source, sha: &str) -> PathBuf {
    root.join(".checkouts").join(source.mirror_name()).join(sha)
}

/// Makes `ws` identical to `template`: an empty directory gets a full copy; a reused one (an
/// earlier job's workspace) only what differs: entries the template lacks are removed, files whose
/// mode or bytes differ are copied again, the rest is left alone. Symbolic links in `ws` are never followed. `Ok(false)` when there is no
/// template.
pub(crate) async fn restore(template: PathBuf, ws: PathBuf) -> io::Result<bool> {
    blocking(move || {
        if !template.is_dir() {
            return Ok(false);
        }
        sync_tree(&template, &ws, false)?;
        Ok(true)
    })
    .await
}

/// Saves a copy of the freshly checked-out `ws` as `template`, then prunes old templates.
pub(crate) async fn save(ws: PathBuf, template: PathBuf) -> io::Result<()> {
    blocking(move || {
        if template.is_dir() {
            return Ok(());
        }
        let parent = template
            .parent()
            .ok_or_else(|| io::Error::other("template path has no parent"))?;
        std::fs::create_dir_all(parent)?;
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let mut name = template.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".tmp-{}-{nanos}", std::process::id()));
        let tmp = parent.join(name);
        std::fs::create_dir(&tmp)?;
        let saved = sync_tree(&ws, &tmp, false).and_then(|()| std::fs::rename(&tmp, &template));
        if saved.is_err() || tmp.exists() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        // Another job saving the same commit at the same time wins the rename: that is fine.
        if template.is_dir() {
            prune(parent);
            return Ok(());
        }
        saved
    })
    .await
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io::Error::other(format!("template task failed: {e}")))?
}

/// Makes the existing directory `to` hold exactly what `from` holds (see [`restore`]); into an
/// empty `to` that is a copy. Files under `.git/objects` are hard-linked (git never changes an
/// object file in place), other files copied with their permissions and modification time (so
/// git's index still matches them), symbolic links recreated as they are (never followed); git's
/// sample hooks and description are left out: nothing reads them.
fn sync_tree(from: &Path, to: &Path, in_objects: bool) -> io::Result<()> {
    // First remove what `from` does not have, or has as another kind of entry.
    for entry in std::fs::read_dir(to)? {
        let entry = entry?;
        let dst = entry.path();
        let src = from.join(entry.file_name());
        let keep = match (src.symlink_metadata(), entry.file_type()) {
            (Ok(s), Ok(d)) => {
                !is_git_clutter(from, &src)
                    && ((s.is_dir() && d.is_dir())
                        || (s.is_file() && d.is_file())
                        || (s.file_type().is_symlink() && d.is_symlink()))
            }
            _ => false,
        };
        if !keep {
            remove(&dst)?;
        }
    }
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let src = entry.path();
        if is_git_clutter(from, &src) {
            continue;
        }
        let dst = to.join(entry.file_name());
        let kind = entry.file_type()?;
        let existing = dst.symlink_metadata().ok();
        if kind.is_symlink() {
            let target = std::fs::read_link(&src)?;
            if existing.is_some() {
                if std::fs::read_link(&dst).ok().as_ref() == Some(&target) {
                    continue;
                }
                remove(&dst)?;
            }
            std::os::unix::fs::symlink(target, &dst)?;
        } else if kind.is_dir() {
            if existing.is_none() {
                std::fs::create_dir(&dst)?;
            }
            sync_tree(&src, &dst, in_objects || is_objects_dir(from, &src))?;
        } else {
            let meta = entry.metadata()?;
            if let Some(d) = existing {
                if same_file(&src, &meta, &dst, &d) {
                    continue;
                }
                remove(&dst)?;
            }
            copy_file(&src, &dst, in_objects)?;
        }
    }
    Ok(())
}

fn is_objects_dir(parent: &Path, dir: &Path) -> bool {
    parent.ends_with(".git") && dir.file_name() == Some(std::ffi::OsStr::new("objects"))
}

/// git's sample hooks and `description`: written by every clone, read by nothing.
fn is_git_clutter(parent: &Path, path: &Path) -> bool {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    (parent.ends_with(".git") && name == "description")
        || (parent.ends_with(".git/hooks") && name.ends_with(".sample"))
}

/// Whether `dst` holds exactly what `src` holds: the same hard-linked object file, or the same
/// mode and bytes. Contents are compared, not trusted from size and time: a job can restore a
/// file's time after changing it, and the next job (maybe another project's) must not see that.
fn same_file(src: &Path, s: &std::fs::Metadata, dst: &Path, d: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    if s.ino() == d.ino() && s.dev() == d.dev() {
        return true;
    }
    s.len() == d.len() && s.mode() == d.mode() && same_bytes(src, dst, s.len()).unwrap_or(false)
}

/// Files up to this size are compared whole (one read each); larger ones in chunks.
const WHOLE_FILE_COMPARE: u64 = 64 * 1024;

fn same_bytes(a: &Path, b: &Path, len: u64) -> io::Result<bool> {
    if len <= WHOLE_FILE_COMPARE {
        // Most files of a checkout (and all of `.git` but packs, which are hard-linked) are
        // small: two exact-size reads, not two zeroed 64 KiB buffers.
        return Ok(std::fs::read(a)? == std::fs::read(b)?);
    }
    let (mut a, mut b) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        let n = read_full(&mut a, &mut ba)?;
        let m = read_full(&mut b, &mut bb)?;
        if n != m || ba[..n] != bb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> io::Result<usize> {
    use std::io::Read;
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Hard-links an object file, copies anything else with its permissions and modification time.
fn copy_file(src: &Path, dst: &Path, in_objects: bool) -> io::Result<()> {
    if in_objects && std::fs::hard_link(src, dst).is_ok() {
        return Ok(());
    }
    std::fs::copy(src, dst)?;
    let modified = src.metadata()?.modified()?;
    // futimens needs ownership, not write permission: a read-only copy is fine.
    std::fs::File::open(dst)?.set_modified(modified)
}

fn remove(path: &Path) -> io::Result<()> {
    let meta = path.symlink_metadata()?;
    if meta.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    }
}

/// Keeps the newest [`KEEP`] templates in `dir` and removes temporaries left by crashes.
fn prune(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let now = SystemTime::now();
    let mut done: Vec<(SystemTime, PathBuf)> = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let modified = entry
            .metadata()
            .and_then(|m| m.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        if entry.file_name().to_string_lossy().contains(".tmp-") {
            if now.duration_since(modified).unwrap_or_default() > STALE_TMP {
                let _ = std::fs::remove_dir_all(&path);
            }
        } else {
            done.push((modified, path));
        }
    }
    done.sort_by_key(|d| std::cmp::Reverse(d.0));
    for (_, old) in done.into_iter().skip(KEEP) {
        let _ = std::fs::remove_dir_all(old);
    }
}
