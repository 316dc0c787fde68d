//! Pristine checkouts, one per (repository, commit), so that only the first job of a commit pays
//! for git: it checks the commit out with git as usual, then saves a copy of the fresh workspace
//! here; every later job of that commit gets a copy of the copy, made in-process (files copied
//! with their modes and times, symbolic links recreated, git's immutable object files
//! hard-linked) instead of the five or more git processes of a checkout. Into a reused workspace
//! (an agent recycles finished ones) only what differs is written (compared by content, never
//! trusted from size and time), so a steady stream of jobs
//! creates and deletes almost no files: on a busy agent, inode churn costs more than git. Each
//! template's tree, with the bytes of its small files, is read once per process and kept in
//! memory (`Index`): a restore walks only the workspace.
//!
//! Layout: `<mirrors root>/.checkouts/<mirror name>/<sha>`. A template is written under a
//! temporary name and renamed into place, so a complete template is the only kind that exists
//! under its final name; the newest [`KEEP`] per repository are kept. A template removed while a
//! job copies it makes that copy fail, and the checkout falls back to git.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
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
/// mode or bytes differ are copied again, the rest is left alone. Symbolic links in `ws` are never
/// followed. `Ok(false)` when there is no template.
///
/// The template's tree (and the bytes of its small files) is read once and kept in memory
/// ([`Index`]), so a restore walks only the workspace.
pub(crate) async fn restore(template: PathBuf, ws: PathBuf) -> io::Result<bool> {
    blocking(move || {
        let Some(index) = Index::cached(&template)? else {
            return Ok(false);
        };
        index.sync(&template, &ws)?;
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
        // Nothing to keep in memory: the index only guides this one copy.
        let saved = Index::read(&ws, INDEX_BYTES)
            .and_then(|index| index.sync(&ws, &tmp))
            .and_then(|()| std::fs::rename(&tmp, &template));
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

/// Templates whose [`Index`] is kept in memory (the process's, all repositories).
const CACHED_TEMPLATES: usize = 16;
/// Bytes of small files an [`Index`] keeps; past that, files are compared with the template's.
const INDEX_BYTES: usize = 2 << 20;
/// Files up to this size are compared whole (one read each); larger ones in chunks.
const WHOLE_FILE_COMPARE: u64 = 64 * 1024;

/// A tree read once: what each directory holds, each file's size, mode and inode, and the bytes
/// of small files (within [`INDEX_BYTES`]). git's sample hooks and `description` are left out:
/// nothing reads them.
///
/// Invariant: an index describes the directory it was read from as long as that directory is
/// the same one, which `id` (device, inode, change time of the root) tells: a template is never
/// changed once renamed into place, and one pruned and saved again is another directory.
struct Index {
    id: RootId,
    root: Dir,
}

type RootId = (u64, u64, i64, i64);

#[derive(Default)]
struct Dir {
    entries: BTreeMap<OsString, Node>,
}

enum Node {
    Dir(Dir),
    File {
        len: u64,
        mode: u32,
        dev: u64,
        ino: u64,
        bytes: Option<Vec<u8>>,
    },
    Symlink(PathBuf),
}

impl Index {
    /// The index of `template`, read now or kept from an earlier call; `None` if there is no
    /// template.
    fn cached(template: &Path) -> io::Result<Option<Arc<Index>>> {
        static CACHE: Mutex<Vec<(PathBuf, Arc<Index>)>> = Mutex::new(Vec::new());
        let meta = match template.symlink_metadata() {
            Ok(m) if m.is_dir() => m,
            _ => return Ok(None),
        };
        let id = (meta.dev(), meta.ino(), meta.ctime(), meta.ctime_nsec());
        let lock = || CACHE.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, index)) = lock().iter().find(|(p, i)| p == template && i.id == id) {
            return Ok(Some(index.clone()));
        }
        let index = Arc::new(Index::read(template, 0).map(|mut i| {
            i.id = id;
            i
        })?);
        let mut cache = lock();
        cache.retain(|(p, _)| p != template);
        if cache.len() >= CACHED_TEMPLATES {
            cache.remove(0);
        }
        cache.push((template.to_owned(), index.clone()));
        Ok(Some(index))
    }

    /// Reads the tree under `root` (`budget_used`: bytes of file contents already kept).
    fn read(root: &Path, budget_used: usize) -> io::Result<Index> {
        let mut used = budget_used;
        Ok(Index {
            id: (0, 0, 0, 0),
            root: read_dir(root, false, &mut used)?,
        })
    }

    /// Makes the existing directory `to` hold exactly what `from` (the directory this index was
    /// read from) holds; into an empty `to` that is a copy. Files under `.git/objects` are
    /// hard-linked (git never changes an object file in place), other files copied with their
    /// permissions and modification time (so git's index still matches them), symbolic links
    /// recreated as they are (never followed).
    fn sync(&self, from: &Path, to: &Path) -> io::Result<()> {
        sync_dir(&self.root, from, to, false)
    }
}

/// `in_objects`: `dir` is under `.git/objects`, whose files are hard-linked and compared by inode,
/// so their bytes are not kept.
fn read_dir(dir: &Path, in_objects: bool, used: &mut usize) -> io::Result<Dir> {
    let mut out = Dir::default();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if is_git_clutter(dir, &path) {
            continue;
        }
        let kind = entry.file_type()?;
        let node = if kind.is_symlink() {
            Node::Symlink(std::fs::read_link(&path)?)
        } else if kind.is_dir() {
            Node::Dir(read_dir(
                &path,
                in_objects || is_objects_dir(dir, &path),
                used,
            )?)
        } else {
            let meta = entry.metadata()?;
            let small = !in_objects
                && meta.len() <= WHOLE_FILE_COMPARE
                && *used + meta.len() as usize <= INDEX_BYTES;
            let bytes = if small {
                let bytes = std::fs::read(&path)?;
                *used += bytes.len();
                Some(bytes)
            } else {
                None
            };
            Node::File {
                len: meta.len(),
                mode: meta.mode(),
                dev: meta.dev(),
                ino: meta.ino(),
                bytes,
            }
        };
        out.entries.insert(entry.file_name(), node);
    }
    Ok(out)
}

fn sync_dir(dir: &Dir, from: &Path, to: &Path, in_objects: bool) -> io::Result<()> {
    // First remove what `from` does not have, or has as another kind of entry; remember what
    // stays.
    let mut kept: BTreeMap<OsString, std::fs::Metadata> = BTreeMap::new();
    for entry in std::fs::read_dir(to)? {
        let entry = entry?;
        let name = entry.file_name();
        let meta = entry.metadata()?;
        let keep = match dir.entries.get(&name) {
            Some(Node::Dir(_)) => meta.is_dir(),
            Some(Node::File { .. }) => meta.is_file(),
            Some(Node::Symlink(_)) => meta.is_symlink(),
            None => false,
        };
        if keep {
            kept.insert(name, meta);
        } else {
            remove(&entry.path())?;
        }
    }
    for (name, node) in &dir.entries {
        let src = from.join(name);
        let dst = to.join(name);
        let existing = kept.get(name);
        match node {
            Node::Symlink(target) => {
                if existing.is_some() {
                    if std::fs::read_link(&dst).ok().as_ref() == Some(target) {
                        continue;
                    }
                    remove(&dst)?;
                }
                std::os::unix::fs::symlink(target, &dst)?;
            }
            Node::Dir(sub) => {
                if existing.is_none() {
                    std::fs::create_dir(&dst)?;
                }
                sync_dir(sub, &src, &dst, in_objects || is_objects_dir(from, &src))?;
            }
            Node::File {
                len,
                mode,
                dev,
                ino,
                bytes,
            } => {
                if let Some(d) = existing {
                    let same = (d.ino() == *ino && d.dev() == *dev)
                        || (d.len() == *len
                            && d.mode() == *mode
                            && match bytes {
                                Some(bytes) => std::fs::read(&dst).is_ok_and(|b| &b == bytes),
                                None => same_bytes(&src, &dst, *len).unwrap_or(false),
                            });
                    if same {
                        continue;
                    }
                    remove(&dst)?;
                }
                copy_file(&src, &dst, in_objects)?;
            }
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

/// Whether `b` holds the `len` bytes `a` holds. Contents are compared, not trusted from size and
/// time: a job can restore a file's time after changing it, and the next job (maybe another
/// project's) must not see that.
fn same_bytes(a: &Path, b: &Path, len: u64) -> io::Result<bool> {
    if len <= WHOLE_FILE_COMPARE {
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
