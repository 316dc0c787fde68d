//! [`RepoError`]: every way a git operation can fail, each message naming the repository, the
//! ref/commit/path involved, what git said, and what to do about it.

use std::path::PathBuf;
use std::time::Duration;

/// An error from resolving, reading, mirroring or checking out a repository.
///
/// Repositories are shown with any password or token in the URL replaced by `***`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RepoError {
    /// A caller-supplied string was refused before running git (it could be parsed as an option,
    /// escapes the repository, is not hex, ...).
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidInput {
        what: &'static str,
        value: String,
        reason: String,
    },

    /// `repository` is a local path that does not exist.
    #[error(
        "repository {repository:?} does not exist (no such file or directory); check the path \
         (relative paths are resolved against the working directory) or give a git URL"
    )]
    RepositoryNotFound { repository: String },

    /// The ref names no branch, tag or commit, even after fetching.
    #[error(
        "no branch, tag or commit named {git_ref:?} in {repository} (after fetching it); check \
         the spelling, or push the ref first"
    )]
    UnknownRef { repository: String, git_ref: String },

    /// The commit is not in the repository, even after fetching.
    #[error(
        "commit {commit} is not in {repository} (after fetching it); it may belong to another \
         repository, or have been force-pushed away and garbage-collected"
    )]
    UnknownCommit { repository: String, commit: String },

    /// The commit exists but has no file at `path`.
    #[error("no {path} at commit {commit} in {repository}")]
    NotFound {
        repository: String,
        commit: String,
        path: String,
    },

    /// `path` exists at the commit but is a directory or a submodule, not a file.
    #[error("{path} at commit {commit} in {repository} is a {kind}, not a file")]
    NotAFile {
        repository: String,
        commit: String,
        path: String,
        kind: String,
    },

    /// The file exists but is not UTF-8 text.
    #[error("{path} at commit {commit} in {repository} is not UTF-8 text")]
    NotUtf8 {
        repository: String,
        commit: String,
        path: String,
    },

    /// A git command exited unsuccessfully.
    #[error("`{command}` failed for {repository} ({status}): {stderr}\nhint: {hint}")]
    Git {
        repository: String,
        command: String,
        status: String,
        /// What git printed on stderr (trimmed; the last few KiB at most).
        stderr: String,
        hint: String,
    },

    /// A git command ran longer than its timeout and was killed (with its whole process group).
    #[error("`{command}` for {repository} did not finish within {timeout:?} and was killed\nhint: {hint}")]
    Timeout {
        repository: String,
        command: String,
        timeout: Duration,
        hint: String,
    },

    /// Another process held the mirror's lock file for too long.
    #[error(
        "gave up after {waited:?} waiting for the lock file {lock:?} of the mirror of \
         {repository}: another process is syncing or reading it; if that process is stuck, stop \
         it (the lock is released when it exits)"
    )]
    LockTimeout {
        repository: String,
        lock: PathBuf,
        waited: Duration,
    },

    /// The operator's rules refuse the repository (a protocol not allowed, a local repository
    /// for a tenant user or outside the allowed folders, the server's own data directory).
    #[error(transparent)]
    Refused(#[from] crate::access::Refusal),

    /// A filesystem operation or spawning git failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl RepoError {
    /// True for [`RepoError::NotFound`]: the commit exists but has no such file.
    pub fn is_not_found(&self) -> bool {
        matches!(self, RepoError::NotFound { .. })
    }

    /// True for [`RepoError::Refused`]: the operator's rules refuse the repository.
    pub fn is_refused(&self) -> bool {
        matches!(self, RepoError::Refused(_))
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        RepoError::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn invalid(what: &'static str, value: &str, reason: impl Into<String>) -> Self {
        RepoError::InvalidInput {
            what,
            value: value.to_owned(),
            reason: reason.into(),
        }
    }
}

/// Advice for a failed git command, from what it printed on stderr.
pub(crate) fn hint_for(stderr: &str) -> &'static str {
    let s = stderr.to_ascii_lowercase();
    let any = |needles: &[&str]| needles.iter().any(|n| s.contains(n));
    if any(&[
        "terminal prompts disabled",
        "could not read username",
        "could not read password",
        "authentication failed",
        "permission denied (publickey",
        "host key verification failed",
        "the requested url returned error: 401",
        "the requested url returned error: 403",
    ]) {
        "the repository needs credentials that this process does not have: configure a git \
         credential helper or a token for HTTPS, or an SSH key and known_hosts entry for SSH, for \
         the user running Tributary (git is run with prompts disabled)"
    } else if any(&[
        "could not resolve host",
        "connection refused",
        "connection timed out",
        "network is unreachable",
        "couldn't connect",
        "failed to connect",
    ]) {
        "check the network connection and the host name in the repository URL"
    } else if s.contains("transport '") && s.contains("not allowed") {
        "the repository or one of its submodules uses a protocol this server does not allow \
         (default: https and ssh): use an allowed URL, or ask the operator to allow the protocol \
         with --allow-protocols"
    } else if any(&["no space left on device", "disk quota exceeded"]) {
        "free disk space under the mirrors root or the workspace"
    } else if any(&[".lock': file exists", "unable to create", "cannot lock ref"]) {
        "another git process is working in the same repository, or a crashed one left a stale \
         `.lock` file; if no git is running there, remove the lock file it names"
    } else if any(&[
        "does not exist",
        "not found",
        "does not appear to be a git repository",
        "not a git repository",
        "could not read from remote repository",
    ]) {
        "check that the repository URL or path is right and that this user may read it"
    } else if any(&["corrupt", "bad object", "loose object"]) {
        "the repository or mirror looks damaged: delete the mirror directory (it is re-cloned on \
         the next use) and retry"
    } else {
        "run the same git command by hand, in the same directory, to see more"
    }
}
