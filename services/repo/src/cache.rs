//! Facts about mirrors that never change once learnt, remembered in memory so that a busy server
//! or agent does not run git to learn them again: "this full commit sha is in this mirror" and
//! "this file at this commit has these contents (or does not exist)".
//!
//! Both are immutable: a commit, once fetched, stays in its mirror (fetch only adds objects; only
//! a gc long after a force-push could remove an unreachable one, and then the checkout that needs
//! it fails with a clear error), and a commit's tree never changes. The cache is shared by every
//! [`Mirrors`](crate::Mirrors) value of the process (keyed by mirror path, like the locks) and
//! bounded: by entries for commits, by entries and bytes for files, oldest entry evicted first.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};

const MAX_COMMITS: usize = 65_536;
const MAX_FILES: usize = 1_024;
const MAX_FILE_BYTES: usize = 32 * 1024 * 1024;

/// What a file is at a commit, as far as [`read_file`](crate::read_file) is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FileAt {
    Text(String),
    Missing,
}

type FileKey = (PathBuf, String, String);

#[derive(Default)]
struct Cache {
    commits: HashSet<(PathBuf, String)>,
    files: HashMap<FileKey, FileAt>,
    order: VecDeque<FileKey>,
    file_bytes: usize,
}

fn cache() -> MutexGuard<'static, Cache> {
    static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
    CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// Whether `sha` (a full sha as git prints it) is known to be in `mirror`.
pub(crate) fn commit_known(mirror: &Path, sha: &str) -> bool {
    cache()
        .commits
        .contains(&(mirror.to_path_buf(), sha.to_owned()))
}

/// Remembers that `sha` (a full sha as git printed it) is in `mirror`.
pub(crate) fn remember_commit(mirror: &Path, sha: &str) {
    let mut c = cache();
    if c.commits.len() >= MAX_COMMITS {
        c.commits.clear();
    }
    c.commits.insert((mirror.to_path_buf(), sha.to_owned()));
}

pub(crate) fn file(mirror: &Path, sha: &str, path: &str) -> Option<FileAt> {
    let key = (mirror.to_path_buf(), sha.to_owned(), path.to_owned());
    cache().files.get(&key).cloned()
}

pub(crate) fn remember_file(mirror: &Path, sha: &str, path: &str, file: FileAt) {
    let size = match &file {
        FileAt::Text(t) => t.len(),
        FileAt::Missing => 0,
    };
    if size > MAX_FILE_BYTES / 8 {
        return;
    }
    let key = (mirror.to_path_buf(), sha.to_owned(), path.to_owned());
    let mut c = cache();
    if c.files.contains_key(&key) {
        return;
    }
    while !c.order.is_empty()
        && (c.order.len() >= MAX_FILES || c.file_bytes + size > MAX_FILE_BYTES)
    {
        if let Some(old) = c.order.pop_front() {
            if let Some(FileAt::Text(t)) = c.files.remove(&old) {
                c.file_bytes -= t.len();
            }
        }
    }
    c.file_bytes += size;
    c.order.push_back(key.clone());
    c.files.insert(key, file);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_bounded_and_evicted_oldest_first() {
        let mirror = Path::new("/nonexistent/cache-test-mirror");
        for i in 0..(MAX_FILES + 10) {
            remember_file(
                mirror,
                &format!("{i:040x}"),
                "f",
                FileAt::Text(i.to_string()),
            );
        }
        assert_eq!(file(mirror, &format!("{:040x}", 0), "f"), None);
        let last = MAX_FILES + 9;
        assert_eq!(
            file(mirror, &format!("{last:040x}"), "f"),
            Some(FileAt::Text(last.to_string()))
        );
        let c = cache();
        assert!(c.files.len() <= MAX_FILES);
        assert_eq!(c.files.len(), c.order.len());
        let bytes: usize = c
            .files
            .values()
            .map(|f| match f {
                FileAt::Text(t) => t.len(),
                FileAt::Missing => 0,
            })
            .sum();
        assert_eq!(bytes, c.file_bytes);
    }

    #[test]
    fn commits_are_per_mirror() {
        let a = Path::new("/nonexistent/cache-test-a");
        let b = Path::new("/nonexistent/cache-test-b");
        let sha = "0123456789abcdef0123456789abcdef01234567";
        remember_commit(a, sha);
        assert!(commit_known(a, sha));
        assert!(!commit_known(b, sha));
    }
}
