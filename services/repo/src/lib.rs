//! Everything Tributary does with git repositories, through the `git` CLI.
//!
//! - The server, when a build is triggered: [`resolve`] a ref to a commit, then [`read_file`]
//!   `.tributary.yml` at that commit.
//! - An agent: keep a bare mirror per repository ([`Mirrors::sync`]) and check out the exact
//!   commit of a job into its workspace ([`Mirrors::checkout`]).
//!
//! `repository` is anything git can clone: a URL (`https://`, `ssh://`, `git@host:path`,
//! `file://`) or a local path to a repository, bare or not (relative paths are resolved against
//! the working directory).
//!
//! # Mirrors
//!
//! Each repository gets one bare mirror (`git clone --mirror`) under the mirrors root, in a
//! directory named after the repository plus a hash of its location (`example.com_org_app-<16
//! hex>`), so names are readable, one path component, and never shared by two repositories. A
//! password or token in the URL is left out of the name and out of every message.
//!
//! Resolving and reading never need a working tree: they run `git rev-parse` and `git cat-file`
//! in the mirror. [`resolve`] fetches first, so a ref pushed a moment ago is seen; [`read_file`]
//! and [`Mirrors::checkout`] fetch only when the commit is not in the mirror yet.
//!
//! # What is remembered
//!
//! Facts that never change once learnt are kept in memory for the process (`cache.rs`): that a
//! full sha is in a mirror, and a file's contents at a commit. A trigger at a known commit and a
//! pipeline read at it then run no git at all. Each commit's first fresh checkout is saved as a
//! template (`template.rs`) that later workspaces of the commit are copied from. A sync fetches
//! with automatic maintenance on every 16th fetch only, and looks up the remote's default branch
//! when HEAD is asked for or at most once a minute otherwise.
//!
//! # Locking
//!
//! Every mirror has a read/write lock, taken first in-process (an async `RwLock` shared by all
//! [`Mirrors`] values of the process, keyed by the mirror's path) and then across processes
//! (`flock(2)` on `<mirror>.lock` beside it). Syncing (clone, fetch with its automatic gc, moving
//! HEAD) is exclusive; reading (rev-parse, cat-file, copying objects into a workspace) is shared.
//! A new mirror is cloned into `<mirror>.tmp` and renamed into place, so a crash never leaves a
//! half-cloned mirror where a complete one is expected. Syncs that wait for one another coalesce:
//! one that finds that a sync *started after it was requested* has just succeeded returns at once.
//!
//! # Running git
//!
//! git is run directly (never through a shell), with `GIT_TERMINAL_PROMPT=0`, in a new session
//! with no controlling terminal (so nothing can stop to ask for a password), without inherited
//! `GIT_DIR`-style variables, and with a timeout ([`Timeouts`]: 10 minutes for clone, fetch and
//! checkout, 30 seconds for local queries) after which git's whole process group is killed.
//! Refs and paths that could be taken for options (a leading `-`), paths that leave the
//! repository (`..`, absolute), and commits that are not hex are refused before git runs.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

pub mod access;
mod cache;
mod checkout;
mod error;
mod git;
mod lock;
mod source;
mod submodules;
mod template;

pub use access::{Access, Caller, LocalRepos};
pub use error::RepoError;
pub use git::Timeouts;

use git::{Git, Kind};
use source::Source;

/// How often a sync that does not need HEAD still follows the remote's default branch.
const HEAD_CHECK_INTERVAL: Duration = Duration::from_secs(60);
/// Fetches of a mirror between two runs of git's automatic maintenance (gc).
const MAINTENANCE_EVERY: u64 = 16;

/// Bare mirrors of repositories, one directory per repository under a root directory; with
/// [`Mirrors::for_tenant`], one root per tenant, so two tenants never share a mirror, a
/// template or a checkout's objects, even for the same URL.
///
/// Every repository is checked against the [`Access`] rules (with [`Caller::Admin`]: callers
/// check tenant users first) before git runs, and every git process gets
/// `GIT_ALLOW_PROTOCOL` from them. Nothing under the mirrors root is ever a repository.
#[derive(Debug, Clone)]
pub struct Mirrors {
    /// This tenant's mirrors (the base root without a tenant).
    root: PathBuf,
    /// The root given to [`Mirrors::new`].
    base: PathBuf,
    timeouts: Timeouts,
    access: Arc<Access>,
}

/// Resolves `git_ref` to a full commit sha (40 hex digits; 64 in a SHA-256 repository).
///
/// `git_ref` is a branch, a tag (annotated tags are peeled), a full ref (`refs/...`), a full or
/// abbreviated sha, or `""` for the remote's HEAD (its default branch). The mirror is fetched
/// first, so a ref pushed just now is seen; a full sha that is already in the mirror is returned
/// without fetching.
pub async fn resolve(
    repository: &str,
    git_ref: &str,
    mirrors: &Mirrors,
) -> Result<String, RepoError> {
    validate_ref(git_ref)?;
    let source = mirrors.source(repository)?;
    let mirror = mirrors.path_of(&source)?;
    let git = mirrors.git(&source);

    if is_full_sha(git_ref) && cache::commit_known(&mirror, git_ref) {
        return Ok(git_ref.to_owned());
    }
    if is_full_sha(git_ref) && is_mirror(&mirror) {
        let _lock = lock::read(&mirror, &source.display, mirrors.lock_wait()).await?;
        if let Some(sha) = commit_in(&git, &mirror, git_ref).await? {
            cache::remember_commit(&mirror, &sha);
            return Ok(sha);
        }
    }

    mirrors.sync_source(&source, git_ref.is_empty()).await?;
    let _lock = lock::read(&mirror, &source.display, mirrors.lock_wait()).await?;
    let spec = if git_ref.is_empty() { "HEAD" } else { git_ref };
    let sha = commit_in(&git, &mirror, spec).await?;
    if let Some(sha) = &sha {
        cache::remember_commit(&mirror, sha);
    }
    sha.ok_or_else(|| RepoError::UnknownRef {
        repository: source.display.clone(),
        git_ref: if git_ref.is_empty() {
            "HEAD (the default branch)".to_owned()
        } else {
            git_ref.to_owned()
        },
    })
}

/// The contents of `path` (relative to the repository's root, e.g. `.tributary.yml`) at
/// `commit` (hex, full or abbreviated), read from the mirror; the mirror is fetched first only if
/// the commit is not in it yet.
///
/// A missing file is [`RepoError::NotFound`]; a directory, submodule or symbolic link at `path`
/// is [`RepoError::NotAFile`]; a file that is not UTF-8 is [`RepoError::NotUtf8`].
pub async fn read_file(
    repository: &str,
    commit: &str,
    path: &str,
    mirrors: &Mirrors,
) -> Result<String, RepoError> {
    validate_commit(commit)?;
    let path = validate_path(path)?;
    let source = mirrors.source(repository)?;
    let sha = mirrors.ensure_commit(&source, commit).await?;
    let mirror = mirrors.path_of(&source)?;
    let not_found = || RepoError::NotFound {
        repository: source.display.clone(),
        commit: sha.clone(),
        path: path.to_owned(),
    };
    match cache::file(&mirror, &sha, path) {
        Some(cache::FileAt::Text(text)) => return Ok(text),
        Some(cache::FileAt::Missing) => return Err(not_found()),
        None => {}
    }
    let git = mirrors.git(&source);
    let _lock = lock::read(&mirror, &source.display, mirrors.lock_wait()).await?;

    let args = [
        "--literal-pathspecs",
        "ls-tree",
        "-z",
        "--full-tree",
        &sha,
        "--",
        path,
    ];
    let listing = git.run(Kind::Local, Some(&mirror), &args).await?;
    // `<mode> SP <type> SP <object> TAB <path> NUL`, for exactly our path if it exists.
    let entry = listing
        .split(|&b| b == 0)
        .filter_map(|e| std::str::from_utf8(e).ok())
        .filter_map(|e| e.split_once('\t'))
        .find(|(_, p)| *p == path)
        .map(|(meta, _)| meta.split(' ').collect::<Vec<_>>());
    let not_a_file = |kind: &str| RepoError::NotAFile {
        repository: source.display.clone(),
        commit: sha.clone(),
        path: path.to_owned(),
        kind: kind.to_owned(),
    };
    let oid = match entry.as_deref() {
        None => {
            cache::remember_file(&mirror, &sha, path, cache::FileAt::Missing);
            return Err(not_found());
        }
        Some(["120000", "blob", _]) => return Err(not_a_file("symbolic link")),
        Some([_, "blob", oid]) => oid.to_string(),
        Some([_, "tree", _]) => return Err(not_a_file("directory")),
        Some([_, "commit", _]) => return Err(not_a_file("submodule")),
        Some(other) => return Err(not_a_file(&other.join(" "))),
    };
    let bytes = git
        .run(Kind::Local, Some(&mirror), &["cat-file", "blob", &oid])
        .await?;
    let text = String::from_utf8(bytes).map_err(|_| RepoError::NotUtf8 {
        repository: source.display.clone(),
        commit: sha.clone(),
        path: path.to_owned(),
    })?;
    cache::remember_file(&mirror, &sha, path, cache::FileAt::Text(text.clone()));
    Ok(text)
}

impl Mirrors {
    /// Mirrors under `root` (created when first needed), with the default [`Timeouts`].
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        Mirrors {
            access: Arc::new(Access::default().forbid(&root)),
            base: root.clone(),
            root,
            timeouts: Timeouts::default(),
        }
    }

    /// The same mirrors under the operator's rules `access` (the mirrors root stays forbidden).
    pub fn with_access(mut self, access: Access) -> Self {
        self.access = Arc::new(access.forbid(&self.base));
        self
    }

    /// The rules repositories are checked against.
    pub fn access(&self) -> &Access {
        &self.access
    }

    /// The mirrors of `tenant`: their own directory under the root (`tenants/<tenant>`).
    pub fn for_tenant(&self, tenant: &str) -> Self {
        Mirrors {
            root: self.base.join("tenants").join(tenant_dir(tenant)),
            ..self.clone()
        }
    }

    /// `repository` parsed, after the checks of [`Access::check`] (as the admin: callers check
    /// tenant users themselves).
    fn source(&self, repository: &str) -> Result<Source, RepoError> {
        let mut source = Source::parse(repository)?;
        self.access.check(repository, Caller::Admin)?;
        source.allow = self.access.git_allow_protocol(source.local);
        Ok(source)
    }

    /// The same mirrors with other timeouts for git commands.
    pub fn with_timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// Where the mirror of `repository` is (or will be), without touching it.
    pub fn mirror_path(&self, repository: &str) -> Result<PathBuf, RepoError> {
        self.path_of(&Source::parse(repository)?)
    }

    /// Creates (`git clone --mirror`) or updates (`git fetch --prune`, and HEAD follows the
    /// remote's default branch) the bare mirror of `repository`, and returns its path.
    ///
    /// Safe to call concurrently, from any number of tasks and processes: see the crate docs.
    pub async fn sync(&self, repository: &str) -> Result<PathBuf, RepoError> {
        let source = self.source(repository)?;
        self.sync_source(&source, true).await
    }

    /// Checks out exactly `commit` (hex, full or abbreviated) into `workspace`, detached, with
    /// no other files: the directory is created if missing; a workspace this repository was
    /// checked out into before is updated in place (fetching only what is new, then
    /// `checkout --force` and `clean -ffdx`); anything else in it is deleted first. The commit
    /// comes from the mirror, which is fetched if the commit is not in it yet.
    ///
    /// With `submodules`, submodules are initialised and checked out recursively (from their own
    /// URLs, relative ones resolved against `repository`); without, none is checked out. The
    /// workspace's `origin` remote is `repository` (without any password).
    pub async fn checkout(
        &self,
        repository: &str,
        commit: &str,
        workspace: &Path,
        submodules: bool,
    ) -> Result<(), RepoError> {
        validate_commit(commit)?;
        let source = self.source(repository)?;
        let sha = self.ensure_commit(&source, commit).await?;
        checkout::checkout(self, &source, &sha, workspace, submodules).await
    }

    fn git<'a>(&self, source: &'a Source) -> Git<'a> {
        Git {
            source,
            timeouts: self.timeouts,
            allow: &source.allow,
        }
    }

    fn path_of(&self, source: &Source) -> Result<PathBuf, RepoError> {
        let root = std::path::absolute(&self.root).map_err(|e| {
            RepoError::io(
                format!("cannot make the mirrors root {:?} absolute", self.root),
                e,
            )
        })?;
        Ok(source::mirror_path(&root, source))
    }

    /// How long to wait for another holder of a mirror's lock: it may be running a few network
    /// commands, each bounded by the network timeout.
    fn lock_wait(&self) -> Duration {
        self.timeouts.network * 3 + Duration::from_secs(60)
    }

    /// Fetches (or clones) the mirror. `need_head`: the caller is about to read HEAD, so the
    /// remote's default branch is looked up now; otherwise at most once per
    /// [`HEAD_CHECK_INTERVAL`] (it rarely changes and costs two processes).
    async fn sync_source(&self, source: &Source, need_head: bool) -> Result<PathBuf, RepoError> {
        let requested = Instant::now();
        let mirror = self.path_of(source)?;
        let mut lock = lock::write(&mirror, &source.display, self.lock_wait()).await?;
        if lock.state.last_sync_started.is_some_and(|t| t >= requested)
            && is_mirror(&mirror)
            && (!need_head || lock.state.head_checked.is_some_and(|t| t >= requested))
        {
            return Ok(mirror);
        }
        let started = Instant::now();
        let git = self.git(source);
        if is_mirror(&mirror) {
            if lock.state.origin_url.as_deref() != Some(source.location.as_str()) {
                git.run(
                    Kind::Local,
                    Some(&mirror),
                    &["config", "remote.origin.url", &source.location],
                )
                .await?;
                lock.state.origin_url = Some(source.location.clone());
            }
            // Automatic maintenance is a process per fetch; let it run every few fetches only.
            lock.state.fetches += 1;
            let auto = if lock.state.fetches % MAINTENANCE_EVERY == 1 {
                "maintenance.auto=true"
            } else {
                "maintenance.auto=false"
            };
            let fetched = git
                .run(
                    Kind::Network,
                    Some(&mirror),
                    &[
                        "-c",
                        "gc.autoDetach=false",
                        "-c",
                        "maintenance.autoDetach=false",
                        "-c",
                        auto,
                        "fetch",
                        "--prune",
                        "--quiet",
                        "origin",
                    ],
                )
                .await;
            if fetched.is_err() {
                // Another process may have written other credentials: write ours next time.
                lock.state.origin_url = None;
            }
            fetched?;
        } else {
            self.clone_mirror(&git, &mirror).await?;
            lock.state.origin_url = Some(source.location.clone());
        }
        let head_due = lock
            .state
            .head_checked
            .is_none_or(|t| need_head || t.elapsed() >= HEAD_CHECK_INTERVAL);
        if head_due {
            follow_remote_head(&git, &mirror).await;
            lock.state.head_checked = Some(started);
        }
        lock.state.last_sync_started = Some(started);
        tracing::debug!(repository = %source.display, mirror = %mirror.display(), "mirror synced");
        Ok(mirror)
    }

    /// Clones into `<mirror>.tmp`, then renames into place. Called with the write lock held.
    async fn clone_mirror(&self, git: &Git<'_>, mirror: &Path) -> Result<(), RepoError> {
        let mut tmp_name = mirror.file_name().unwrap_or_default().to_os_string();
        tmp_name.push(".tmp");
        let tmp = mirror.with_file_name(tmp_name);
        for stale in [&tmp, &mirror.to_path_buf()] {
            if stale.symlink_metadata().is_ok() {
                remove_path(stale)?;
            }
        }
        let parent = mirror.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(parent).map_err(|e| {
            RepoError::io(format!("cannot create the mirrors directory {parent:?}"), e)
        })?;
        let cloned = async {
            let args: [&OsStr; 6] = [
                "clone".as_ref(),
                "--mirror".as_ref(),
                "--quiet".as_ref(),
                "--".as_ref(),
                git.source.location.as_ref(),
                tmp.as_os_str(),
            ];
            git.run(Kind::Network, Some(parent), &args).await?;
            // gc must finish before fetch returns, i.e. while the write lock is held.
            for key in ["gc.autoDetach", "maintenance.autoDetach"] {
                git.run(Kind::Local, Some(&tmp), &["config", key, "false"])
                    .await?;
            }
            std::fs::rename(&tmp, mirror).map_err(|e| {
                RepoError::io(format!("cannot move the new mirror {tmp:?} into place"), e)
            })
        }
        .await;
        if cloned.is_err() && tmp.exists() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        cloned
    }

    /// The full sha of `commit`, syncing the mirror first if it is missing or lacks the commit.
    async fn ensure_commit(&self, source: &Source, commit: &str) -> Result<String, RepoError> {
        let mirror = self.path_of(source)?;
        if is_full_sha(commit) && cache::commit_known(&mirror, commit) {
            return Ok(commit.to_owned());
        }
        let git = self.git(source);
        if is_mirror(&mirror) {
            let _lock = lock::read(&mirror, &source.display, self.lock_wait()).await?;
            if let Some(sha) = commit_in(&git, &mirror, commit).await? {
                cache::remember_commit(&mirror, &sha);
                return Ok(sha);
            }
        }
        self.sync_source(source, false).await?;
        let _lock = lock::read(&mirror, &source.display, self.lock_wait()).await?;
        let sha = commit_in(&git, &mirror, commit).await?;
        if let Some(sha) = &sha {
            cache::remember_commit(&mirror, sha);
        }
        sha.ok_or_else(|| RepoError::UnknownCommit {
            repository: source.display.clone(),
            commit: commit.to_owned(),
        })
    }
}

/// The full sha of the commit `spec` names in `repo`, None if it names none; an ambiguous
/// abbreviation is an error.
async fn commit_in(git: &Git<'_>, repo: &Path, spec: &str) -> Result<Option<String>, RepoError> {
    let peeled = format!("{spec}^{{commit}}");
    let args = ["rev-parse", "--verify", "--end-of-options", &peeled];
    let out = git.output(Kind::Local, Some(repo), &args).await?;
    if out.status.success() {
        let sha = out.stdout_str();
        if is_full_sha(&sha) {
            return Ok(Some(sha));
        }
        return Err(git.failed(&args, &out));
    }
    if out.stderr.contains("ambiguous") {
        return Err(RepoError::invalid(
            "ref",
            spec,
            format!(
                "it is ambiguous in {}: use a longer sha, or a full ref name (refs/heads/..., \
                 refs/tags/...); git said: {}",
                git.source.display, out.stderr
            ),
        ));
    }
    Ok(None)
}

/// Points the mirror's HEAD at the remote's current default branch (`fetch` does not move it).
/// Best effort: on failure HEAD stays where the clone or an earlier sync put it.
async fn follow_remote_head(git: &Git<'_>, mirror: &Path) {
    let out = match git
        .output(
            Kind::Network,
            Some(mirror),
            &["ls-remote", "--symref", "origin", "HEAD"],
        )
        .await
    {
        Ok(out) if out.status.success() => out,
        Ok(out) => {
            tracing::warn!(repository = %git.source.display, stderr = %out.stderr,
                "cannot read the remote's HEAD; the mirror's HEAD may be stale");
            return;
        }
        Err(e) => {
            tracing::warn!(repository = %git.source.display, "cannot read the remote's HEAD: {e}");
            return;
        }
    };
    let text = out.stdout_str();
    let mut symref = None;
    let mut sha = None;
    for line in text.lines() {
        match line.split_once('\t') {
            Some((target, "HEAD")) => match target.strip_prefix("ref: ") {
                Some(r) => symref = Some(r.to_owned()),
                None => sha = Some(target.to_owned()),
            },
            _ => continue,
        }
    }
    let result = match (symref, sha) {
        (Some(r), _) if r.starts_with("refs/") => {
            let current = git
                .output(Kind::Local, Some(mirror), &["symbolic-ref", "-q", "HEAD"])
                .await
                .map(|o| o.stdout_str());
            if current.as_deref().ok() == Some(r.as_str()) {
                return;
            }
            git.run(Kind::Local, Some(mirror), &["symbolic-ref", "HEAD", &r])
                .await
        }
        (None, Some(sha)) if is_full_sha(&sha) => {
            git.run(
                Kind::Local,
                Some(mirror),
                &["update-ref", "--no-deref", "HEAD", &sha],
            )
            .await
        }
        _ => return,
    };
    if let Err(e) = result {
        tracing::warn!(repository = %git.source.display, "cannot move the mirror's HEAD: {e}");
    }
}

/// A tenant's directory name: the name itself when it is a plain one, else a hex encoding (never
/// `.`, `..`, a '/' or empty). Mirrors and agents' recycled workspaces are kept per tenant in
/// directories of this name.
pub fn tenant_dir(tenant: &str) -> String {
    let plain = !tenant.is_empty()
        && !tenant.starts_with('.')
        && tenant.len() <= 64
        && tenant
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if plain {
        tenant.to_owned()
    } else {
        let hex: String = tenant.bytes().map(|b| format!("{b:02x}")).collect();
        format!("~{hex}")
    }
}

fn is_mirror(path: &Path) -> bool {
    path.join("HEAD").is_file() && path.join("objects").is_dir() && path.join("refs").is_dir()
}

fn remove_path(path: &Path) -> Result<(), RepoError> {
    let meta = path
        .symlink_metadata()
        .map_err(|e| RepoError::io(format!("cannot inspect {path:?}"), e))?;
    let result = if meta.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    result.map_err(|e| RepoError::io(format!("cannot remove {path:?}"), e))
}

fn is_hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_full_sha(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && is_hex(s)
}

fn validate_commit(commit: &str) -> Result<(), RepoError> {
    if commit.len() < 4 || commit.len() > 64 || !is_hex(commit) {
        return Err(RepoError::invalid(
            "commit",
            commit,
            "a commit must be a sha: 4 to 64 hex digits (use resolve() for branch and tag names)",
        ));
    }
    Ok(())
}

fn validate_ref(git_ref: &str) -> Result<(), RepoError> {
    let reason = if git_ref.starts_with('-') {
        "it starts with '-' and could be taken for a git option"
    } else if git_ref.chars().any(|c| c.is_control() || c.is_whitespace()) {
        "it contains whitespace or control characters"
    } else if git_ref.contains("..") {
        "it contains '..' (a range, not a single ref)"
    } else {
        return Ok(());
    };
    Err(RepoError::invalid("ref", git_ref, reason))
}

/// Checks a path inside the repository and returns it without a leading `./`.
fn validate_path(path: &str) -> Result<&str, RepoError> {
    let p = path.strip_prefix("./").unwrap_or(path);
    let reason = if p.is_empty() {
        "it is empty"
    } else if p.starts_with('-') {
        "it starts with '-' and could be taken for a git option"
    } else if p.starts_with('/') {
        "it is absolute; give a path relative to the repository's root"
    } else if p.chars().any(char::is_control) {
        "it contains control characters"
    } else if p.split('/').any(|c| c == "..") {
        "it contains '..' and could leave the repository"
    } else if p.split('/').any(|c| c.is_empty() || c == ".") {
        "it is not a normalised path (empty or '.' components, or a trailing '/')"
    } else {
        return Ok(p);
    };
    Err(RepoError::invalid("path", path, reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refs_that_look_like_options_or_ranges_are_refused() {
        for bad in ["-x", "--upload-pack=evil", "a..b", "main branch", "a\nb"] {
            assert!(validate_ref(bad).is_err(), "{bad:?}");
        }
        for good in [
            "",
            "main",
            "v1.0",
            "refs/heads/feature/x",
            "abc123",
            "HEAD~1",
        ] {
            assert!(validate_ref(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn paths_must_stay_in_the_repository() {
        for bad in [
            "",
            "-p",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "a/",
            "a/./b",
        ] {
            assert!(validate_path(bad).is_err(), "{bad:?}");
        }
        assert_eq!(validate_path("./.tributary.yml").unwrap(), ".tributary.yml");
        assert_eq!(validate_path("ci/a..b.yml").unwrap(), "ci/a..b.yml");
    }

    #[test]
    fn tenant_directories_are_one_safe_component() {
        assert_eq!(tenant_dir("acme"), "acme");
        assert_eq!(tenant_dir("a.b-c_d"), "a.b-c_d");
        for odd in ["", ".", "..", "a/b", ".hidden", "é"] {
            let d = tenant_dir(odd);
            assert!(d.starts_with('~'), "{odd:?} -> {d}");
            assert!(!d.contains('/') && d != "." && d != "..", "{odd:?} -> {d}");
        }
        assert_ne!(tenant_dir("ab"), tenant_dir("~6162"));
        let m = Mirrors::new("/m");
        assert_eq!(m.for_tenant("acme").root(), Path::new("/m/tenants/acme"));
        assert_eq!(
            m.for_tenant("acme").for_tenant("evil").root(),
            Path::new("/m/tenants/evil")
        );
    }

    #[test]
    fn commits_must_be_hex() {
        for bad in ["", "abc", "main", "-abcdef", "abcdefg", &"a".repeat(65)] {
            assert!(validate_commit(bad).is_err(), "{bad:?}");
        }
        for good in ["abcd", "0123456789abcdef0123456789abcdef01234567"] {
            assert!(validate_commit(good).is_ok(), "{good:?}");
        }
    }
}
