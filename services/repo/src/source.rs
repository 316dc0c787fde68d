//! Parsing the `repository` argument: a git URL (`https://`, `ssh://`, `git@host:path`,
//! `file://`, ...) or a local path to a repository, bare or not.

use std::path::{Path, PathBuf};

use crate::error::RepoError;

/// A repository as git is given it, plus the forms used for messages, mirror names and the
/// workspace's `origin`.
#[derive(Debug, Clone)]
pub(crate) struct Source {
    /// What git is given: the URL as written, or a local path made absolute and canonical.
    pub location: String,
    /// For messages: the location with any password or token replaced by `***`.
    pub display: String,
    /// For the workspace's `origin` remote (visible to jobs) and the mirror's identity: the
    /// location without any password or token.
    pub public: String,
    /// A local path or a `file://` URL (its submodules may then be local too).
    pub local: bool,
    /// `GIT_ALLOW_PROTOCOL` for git processes that talk to this repository: the allowed
    /// protocols (see `access.rs`), plus `file` for a local repository.
    pub allow: String,
}

impl Source {
    /// Refuses what git must never be given as a repository: empty, option-like, control
    /// characters.
    pub fn validate(repository: &str) -> Result<(), RepoError> {
        let what = "repository";
        if repository.trim().is_empty() {
            return Err(RepoError::invalid(what, repository, "it is empty"));
        }
        if repository.starts_with('-') {
            return Err(RepoError::invalid(
                what,
                repository,
                "it starts with '-' and could be taken for a git option",
            ));
        }
        if repository.chars().any(char::is_control) {
            return Err(RepoError::invalid(
                what,
                repository,
                "it contains control characters",
            ));
        }
        Ok(())
    }

    pub fn parse(repository: &str) -> Result<Source, RepoError> {
        let what = "repository";
        Source::validate(repository)?;
        if let Some((scheme, rest)) = repository.split_once("://") {
            let (display, public) = redact_url(scheme, rest);
            return Ok(Source {
                location: repository.to_owned(),
                display,
                public,
                local: scheme.eq_ignore_ascii_case("file"),
                allow: String::new(),
            }
            .with_default_allow());
        }
        if is_scp_like(repository) {
            return Ok(Source {
                location: repository.to_owned(),
                display: repository.to_owned(),
                public: repository.to_owned(),
                local: false,
                allow: String::new(),
            }
            .with_default_allow());
        }
        let path = Path::new(repository);
        let canonical = std::fs::canonicalize(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                RepoError::RepositoryNotFound {
                    repository: repository.to_owned(),
                }
            } else {
                RepoError::io(format!("cannot open repository {repository:?}"), e)
            }
        })?;
        let location = canonical.to_str().map(str::to_owned).ok_or_else(|| {
            RepoError::invalid(what, repository, "its absolute path is not valid UTF-8")
        })?;
        Ok(Source {
            display: location.clone(),
            public: location.clone(),
            location,
            local: true,
            allow: String::new(),
        }
        .with_default_allow())
    }

    /// The allowed protocols of `Access::default()`.
    fn with_default_allow(mut self) -> Source {
        self.allow = crate::access::Access::default().git_allow_protocol(self.local);
        self
    }

    /// `repository` as shown in messages: any password or token in a URL replaced by `***`.
    pub fn redacted(repository: &str) -> String {
        match repository.split_once("://") {
            Some((scheme, rest)) => redact_url(scheme, rest).0,
            None => repository.to_owned(),
        }
    }

    /// The mirror's directory name: readable part from the location, plus a hash of it, so two
    /// repositories never share a mirror and the name is always one safe path component.
    pub fn mirror_name(&self) -> String {
        let mut s = self.public.as_str();
        if let Some((_, rest)) = s.split_once("://") {
            s = rest;
        }
        // Drop the user part of `user@host...`, if any, before the first '/'.
        if let Some(at) = s.find('@') {
            if !s[..at].contains('/') {
                s = &s[at + 1..];
            }
        }
        let s = s.trim_end_matches('/');
        let s = s.strip_suffix(".git").unwrap_or(s);
        let mut readable = String::new();
        for c in s.chars() {
            let c = if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            };
            if !(c == '_' && readable.ends_with('_')) {
                readable.push(c);
            }
        }
        // Keep the end (the repository's own name), at most 48 characters.
        let start = readable.len().saturating_sub(48);
        let readable = readable[start..].trim_start_matches(['.', '_', '-']);
        let readable = if readable.is_empty() {
            "repo"
        } else {
            readable
        };
        format!(
            "{readable}-{:016x}",
            fnv1a64(self.public.trim_end_matches('/'))
        )
    }
}

/// `[user@]host:path` (git's scp-like ssh syntax): a ':' before any '/'.
pub(crate) fn is_scp_like(s: &str) -> bool {
    match (s.find(':'), s.find('/')) {
        (Some(colon), Some(slash)) => colon < slash && colon > 0,
        (Some(colon), None) => colon > 0,
        _ => false,
    }
}

/// (display, public) forms of `scheme://rest`.
fn redact_url(scheme: &str, rest: &str) -> (String, String) {
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        let s = format!("{scheme}://{rest}");
        return (s.clone(), s);
    };
    let userinfo = &rest[..at];
    let host_and_path = &rest[at + 1..];
    match userinfo.split_once(':') {
        Some((user, _password)) => (
            format!("{scheme}://{user}:***@{host_and_path}"),
            format!("{scheme}://{user}@{host_and_path}"),
        ),
        // Over HTTP(S) a bare user part is often a token.
        None if scheme.to_ascii_lowercase().starts_with("http") => (
            format!("{scheme}://***@{host_and_path}"),
            format!("{scheme}://{host_and_path}"),
        ),
        None => {
            let s = format!("{scheme}://{rest}");
            (s.clone(), s)
        }
    }
}

/// FNV-1a, 64 bits: small, stable across versions and platforms (mirror names must not change).
fn fnv1a64(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Where the mirror of `source` lives under `root`.
pub(crate) fn mirror_path(root: &Path, source: &Source) -> PathBuf {
    root.join(source.mirror_name())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Source {
        Source::parse(s).unwrap()
    }

    #[test]
    fn urls_are_kept_and_credentials_redacted() {
        let s = url("https://user:s3cret@example.com/org/app.git");
        assert_eq!(s.location, "https://user:s3cret@example.com/org/app.git");
        assert_eq!(s.display, "https://user:***@example.com/org/app.git");
        assert_eq!(s.public, "https://user@example.com/org/app.git");
        assert!(!s.local);

        let s = url("https://ghp_token@example.com/org/app.git");
        assert_eq!(s.display, "https://***@example.com/org/app.git");
        assert_eq!(s.public, "https://example.com/org/app.git");

        let s = url("ssh://git@example.com/org/app.git");
        assert_eq!(s.display, "ssh://git@example.com/org/app.git");

        let s = url("git@example.com:org/app.git");
        assert_eq!(s.location, "git@example.com:org/app.git");
        assert!(!s.local);

        assert!(url("file:///srv/git/app.git").local);
    }

    #[test]
    fn mirror_names_are_safe_distinct_and_stable() {
        let a = url("https://example.com/org/app.git").mirror_name();
        assert_eq!(a, url("https://example.com/org/app.git/").mirror_name());
        assert!(a.starts_with("example.com_org_app-"), "{a}");
        assert_eq!(a.len(), "example.com_org_app-".len() + 16);
        // Token rotation keeps the same mirror.
        assert_eq!(
            a,
            url("https://tok@example.com/org/app.git").mirror_name(),
            "a token must not change the mirror"
        );
        let b = url("https://example.com/org/app2.git").mirror_name();
        assert_ne!(a, b);
        for s in [
            "git@example.com:../../etc/passwd",
            "ssh://h/~user/..",
            "https://example.com/",
            "file:///",
        ] {
            let n = url(s).mirror_name();
            assert!(!n.starts_with('.'), "{n}");
            assert!(!n.contains('/'), "{n}");
            assert!(n.len() <= 48 + 17, "{n}");
        }
        // A fixed value: mirror names must stay the same across releases.
        assert_eq!(fnv1a64(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64("a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn bad_repositories_are_refused() {
        assert!(matches!(
            Source::parse("--upload-pack=evil"),
            Err(RepoError::InvalidInput { .. })
        ));
        assert!(matches!(
            Source::parse(""),
            Err(RepoError::InvalidInput { .. })
        ));
        let err = Source::parse("/nonexistent/tributary/repo").unwrap_err();
        assert!(matches!(err, RepoError::RepositoryNotFound { .. }));
        assert!(err.to_string().contains("/nonexistent/tributary/repo"));
    }
}
