//! Pristine checkouts, one per (repository, commit), so that only the first job of a commit pays
//! for git: it checks the commit out with git as usual, then saves a copy of the fresh workspace
//! here; every later job of that commit gets a copy of the copy, made in-process (files copied
//! with their modes, symbolic links recreated, git's immutable object files hard-linked) instead
//! of the five or more git processes of a checkout.
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

/// Copies `template` into the empty directory `ws`. `Ok(false)` when there is no template.
pub(crate) async fn restore(template: PathBuf, ws: PathBuf) -> io::Result<bool> {
    blocking(move || {
        if !template.is_dir() {
            return Ok(false);
        }
        copy_tree(&template, &ws, false)?;
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
        let saved = copy_tree(&ws, &tmp, false).and_then(|()| std::fs::rename(&tmp, &template));
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

/// Copies the contents of `from` into the existing directory `to`. Files under `.git/objects`
/// are hard-linked (git never changes an object file in place), other files copied with their
/// permissions, symbolic links recreated as they are (never followed).
fn copy_tree(from: &Path, to: &Path, in_objects: bool) -> io::Result<()> {
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let src = entry.path();
        let dst = to.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
        } else if kind.is_dir() {
            std::fs::create_dir(&dst)?;
            let objects = in_objects || (entry.file_name() == "objects" && from.ends_with(".git"));
            copy_tree(&src, &dst, objects)?;
        } else if in_objects {
            if std::fs::hard_link(&src, &dst).is_err() {
                std::fs::copy(&src, &dst)?;
            }
        } else {
            std::fs::copy(&src, &dst)?;
        }
    }
    Ok(())
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
