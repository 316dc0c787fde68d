//! The embedded data directory: `events.db` (the log), `readmodels.db` (the builds read
//! model) and `metering.db` (the metering read model).
//!
//! Its default ([`default_dir`]) is outside the repository, so the jobs of a local run, which
//! run in the repository itself, never see (or change) the log: a directory per repository
//! under `$XDG_STATE_HOME/tributary` (`~/.local/state/tributary`). [`DataDir::open`] makes the
//! path absolute, so it reaches a container engine as an absolute bind mount.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use tributary_eventlog::sqlite::SqliteLog;
use tributary_projections::BuildsStore;

pub struct DataDir {
    pub path: PathBuf,
    pub log: Arc<SqliteLog>,
    pub store: BuildsStore,
    /// The metering read model (`metering.db`).
    pub metering: tributary_metering::MeteringStore,
}

impl DataDir {
    pub async fn open(path: &Path) -> anyhow::Result<DataDir> {
        std::fs::create_dir_all(path)
            .with_context(|| format!("cannot create data directory {}", path.display()))?;
        // Absolute from here on: scratch directories under it are bind-mounted into job
        // containers, and an engine resolves a relative source against its own directory.
        let path = &path
            .canonicalize()
            .with_context(|| format!("cannot resolve data directory {}", path.display()))?;
        let log = SqliteLog::open(&path.join("events.db"))
            .await
            .with_context(|| format!("cannot open the event log in {}", path.display()))?;
        let store = BuildsStore::open(&path.join("readmodels.db"))
            .await
            .with_context(|| format!("cannot open the read models in {}", path.display()))?;
        let metering = tributary_metering::MeteringStore::open(&path.join("metering.db"))
            .await
            .with_context(|| format!("cannot open the metering database in {}", path.display()))?;
        Ok(DataDir {
            path: path.to_path_buf(),
            log: Arc::new(log),
            store,
            metering,
        })
    }

    /// The object storage of the embedded default: `objects/` in the data directory.
    pub fn objects(&self) -> anyhow::Result<tributary_objects::Objects> {
        Ok(tributary_objects::Objects::local(
            &self.path.join("objects"),
        )?)
    }

    /// Brings the builds read model up to the end of the log.
    pub async fn catch_up(&self) -> anyhow::Result<()> {
        let mut projector =
            tributary_projections::BuildsProjector::open(self.store.clone()).await?;
        projector.catch_up(self.log.as_ref()).await?;
        Ok(())
    }
}

/// The data directory when neither `--data` nor `TRIBUTARY_DATA` (nor a `--config` file) names
/// one: `<state>/tributary/<name>-<hash>`, where `<state>` is `$XDG_STATE_HOME` or
/// `~/.local/state`, and `<name>`/`<hash>` are the base name and a hash of the path of the
/// repository holding the current directory (its git top level; the directory itself outside a
/// repository). Every command run anywhere in one repository finds the same log, and no job of
/// a local run sees it. Without a home directory: `./.tributary`.
pub fn default_dir() -> PathBuf {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let root = git_toplevel(&cwd).unwrap_or(cwd);
    let root = root.canonicalize().unwrap_or(root);
    match state_home(
        std::env::var_os("XDG_STATE_HOME").map(PathBuf::from),
        std::env::var_os("HOME").map(PathBuf::from),
    ) {
        Some(state) => state.join("tributary").join(repo_key(&root)),
        None => PathBuf::from(crate::backends::DEFAULT_DATA),
    }
}

/// `$XDG_STATE_HOME` when absolute (the XDG rule), else `$HOME/.local/state`. Pure.
pub fn state_home(xdg_state_home: Option<PathBuf>, home: Option<PathBuf>) -> Option<PathBuf> {
    xdg_state_home.filter(|p| p.is_absolute()).or_else(|| {
        home.filter(|h| h.is_absolute())
            .map(|h| h.join(".local").join("state"))
    })
}

/// `<name>-<12 hex digits of the sha256 of the path>`: readable, and distinct for two
/// repositories of the same name. Pure.
pub fn repo_key(root: &Path) -> String {
    use sha2::Digest;
    let name: String = root
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "root".into())
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    let digest = sha2::Sha256::digest(root.as_os_str().as_encoded_bytes());
    format!("{name}-{}", &hex::encode(digest)[..12])
}

/// The top level of the git work tree holding `dir`, if any.
fn git_toplevel(dir: &Path) -> Option<PathBuf> {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "--show-toplevel"])
        .current_dir(dir)
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let text = String::from_utf8(out.stdout).ok()?;
    let top = text.trim();
    (!top.is_empty()).then(|| PathBuf::from(top))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_home_follows_xdg_then_home() {
        let some = |p: &str| Some(PathBuf::from(p));
        assert_eq!(
            state_home(some("/x/state"), some("/home/me")),
            some("/x/state")
        );
        // A relative XDG_STATE_HOME is ignored, as the XDG rules say.
        assert_eq!(
            state_home(some("rel"), some("/home/me")),
            some("/home/me/.local/state")
        );
        assert_eq!(
            state_home(None, some("/home/me")),
            some("/home/me/.local/state")
        );
        assert_eq!(state_home(None, None), None);
        assert_eq!(state_home(None, some("")), None);
    }

    #[test]
    fn repo_keys_are_readable_and_distinct() {
        let a = repo_key(Path::new("/src/web"));
        let b = repo_key(Path::new("/other/web"));
        assert!(a.starts_with("web-") && b.starts_with("web-"), "{a} {b}");
        assert_eq!(a.len(), "web-".len() + 12);
        assert_ne!(a, b);
        assert_eq!(a, repo_key(Path::new("/src/web")), "stable");
        assert!(repo_key(Path::new("/src/my repo")).starts_with("my_repo-"));
        assert!(repo_key(Path::new("/")).starts_with("root-"));
    }
}
