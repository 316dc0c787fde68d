//! The data directory's writer lock: one process at a time folds into and appends to an
//! embedded data directory (`tributary up`, `run`, `replay`, `serve projector|metering` on it).
//!
//! An exclusive `flock` on `DIR/tributary.lock`, taken without waiting; the file says which
//! process holds it (pid and command line), so a refused start can name it. The kernel releases
//! the lock when the holder exits, crashed or not; the file's stale text is then overwritten.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::Path;

use anyhow::Context;

/// The lock file's name inside the data directory.
pub const LOCK_FILE: &str = "tributary.lock";

/// Held for as long as the process writes the data directory; dropping it releases the lock.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

/// Takes the writer lock of data directory `dir` (created if missing), or fails naming the
/// process that holds it.
pub fn lock(dir: &Path) -> anyhow::Result<DirLock> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create data directory {}", dir.display()))?;
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open the lock file {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            anyhow::bail!("{}", refusal(dir, &holder));
        }
        Err(TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
    let me = holder_text(std::process::id(), std::env::args());
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| file.write_all(me.as_bytes()))
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(DirLock { _file: file })
}

/// What the lock file says while `pid` holds it.
fn holder_text(pid: u32, args: impl Iterator<Item = String>) -> String {
    let command: Vec<String> = args.collect();
    format!("{pid}\n{}\n", command.join(" "))
}

/// The error of a refused start, from the holder's lock file text.
fn refusal(dir: &Path, holder: &str) -> String {
    let mut lines = holder.lines();
    let pid = lines.next().map(str::trim).filter(|p| !p.is_empty());
    let command = lines.next().map(str::trim).filter(|c| !c.is_empty());
    let who = match (pid, command) {
        (Some(pid), Some(command)) => format!("process {pid} ({command})"),
        (Some(pid), None) => format!("process {pid}"),
        _ => "another process".to_owned(),
    };
    format!(
        "data directory {} is in use by {who}: one tributary process writes a data directory \
         at a time. Stop that process first, use it (e.g. `--server` for a running `tributary \
         up`), or give this one another `--data DIR`",
        dir.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_naming_the_holder_and_freed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock(dir.path()).unwrap();
        let err = lock(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(&format!("in use by process {} (", std::process::id())),
            "{err}"
        );
        assert!(err.contains("--data DIR"), "{err}");
        drop(held);
        let again = lock(dir.path()).unwrap();
        drop(again);
    }

    #[test]
    fn refusal_names_what_it_knows() {
        let d = Path::new("/d");
        assert!(refusal(d, "12\ntributary up --data /d\n")
            .contains("in use by process 12 (tributary up --data /d)"));
        assert!(refusal(d, "12\n").contains("in use by process 12:"));
        assert!(refusal(d, "").contains("in use by another process:"));
        assert_eq!(
            holder_text(7, ["a".to_owned(), "b".to_owned()].into_iter()),
            "7\na b\n"
        );
    }
}
