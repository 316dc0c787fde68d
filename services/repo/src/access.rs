//! Which repositories a caller may use: the protocols of remote URLs an operator allows, and
//! where local repositories (paths, `file://` URLs) may be.
//!
//! [`classify`] and [`Access::check_location`] are pure: they look at the text and at an already
//! canonical path. [`Access::check`] adds the one filesystem step (canonicalizing a local path,
//! so symbolic links and `..` are resolved before the path is compared).
//!
//! The rules:
//! - a remote URL's protocol (`https`, `ssh`, `http`, `git`, or a remote helper such as `ext::`)
//!   must be in the allowed list (default `https`, `ssh`);
//! - a local repository is never inside a forbidden directory (the server's data directory: the
//!   mirrors and workspaces of every tenant);
//! - with [`LocalRepos::Under`] (`--allow-local-repos DIR,...`), every caller's local
//!   repositories must be inside one of those folders;
//! - with [`LocalRepos::AdminAnywhere`] (the default), tenant users get no local repository at
//!   all, and the admin any outside the forbidden directories.

use std::path::{Path, PathBuf};

use crate::error::RepoError;

/// The protocols allowed when the operator names none.
pub const DEFAULT_PROTOCOLS: &[&str] = &["https", "ssh"];

/// Protocols `--allow-protocols` accepts. `file` is not one: local repositories have their own
/// rule (`--allow-local-repos`); `ext` and other remote helpers run commands and are never
/// allowed.
pub const KNOWN_PROTOCOLS: &[&str] = &["https", "ssh", "http", "git"];

/// Where a repository argument points, by its text alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A URL git fetches over the network with `protocol` (`https`, `ssh`, `git`, ..., or the
    /// name of a remote helper for `helper::address`).
    Remote { protocol: String },
    /// A path on the local disk (from a plain path or a `file://` URL), as written: relative
    /// paths are relative to the working directory.
    Local { path: PathBuf },
}

/// Who asks: the admin token, or a tenant's user token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    Admin,
    Tenant,
}

/// Where local repositories may be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalRepos {
    /// Tenant users: none. The admin: anywhere outside the forbidden directories.
    AdminAnywhere,
    /// Everyone, the admin included: only inside these folders (canonical paths).
    Under(Vec<PathBuf>),
}

/// An operator's rules for repositories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// Protocols remote URLs may use (lower case, from [`KNOWN_PROTOCOLS`]).
    pub protocols: Vec<String>,
    pub local: LocalRepos,
    /// Directories no repository may be in, whatever the caller (canonical paths).
    pub forbidden: Vec<PathBuf>,
}

impl Default for Access {
    fn default() -> Self {
        Access {
            protocols: DEFAULT_PROTOCOLS.iter().map(|p| (*p).to_owned()).collect(),
            local: LocalRepos::AdminAnywhere,
            forbidden: Vec::new(),
        }
    }
}

/// The ways a repository is refused. Each message says what to do instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "repository {repository} uses the {protocol} protocol, which this server does not allow \
         (allowed: {allowed}); use an https:// or ssh URL, or ask the operator to add \
         {protocol} with --allow-protocols"
    )]
    Protocol {
        repository: String,
        protocol: String,
        allowed: String,
    },
    #[error(
        "repository {repository} uses the remote helper {protocol}::, which runs commands on the \
         server and is never allowed; use an https:// or ssh URL"
    )]
    Helper {
        repository: String,
        protocol: String,
    },
    #[error(
        "repository {repository} is on the server's local disk, and local repositories (paths \
         and file:// URLs) are not allowed for tenant users; push it to a git host and use its \
         https:// or ssh URL, or ask the operator to allow a folder with \
         `tributary up --allow-local-repos DIR`"
    )]
    LocalForTenant { repository: String },
    #[error(
        "repository {repository} resolves to {resolved}, which is outside the folders this \
         server allows local repositories from ({allowed}); move the repository under one of \
         them, or use an https:// or ssh URL"
    )]
    OutsideAllowed {
        repository: String,
        resolved: String,
        allowed: String,
    },
    #[error(
        "repository {repository} resolves to {resolved}, inside {forbidden}, which holds the \
         server's own data (mirrors and workspaces of every tenant) and is never a repository; \
         use the repository's original location or its https:// or ssh URL"
    )]
    Forbidden {
        repository: String,
        resolved: String,
        forbidden: String,
    },
    #[error("repository {repository} cannot be checked: {reason}")]
    Unreadable { repository: String, reason: String },
    #[error(
        "repository {repository} is a file:// URL that is not a plain absolute path \
         (file:///absolute/path, no host, no %-escapes); write the path itself instead"
    )]
    FileUrl { repository: String },
}

/// What `repository` is, from its text: git's own rules (`transport.c`) in the order git
/// applies them. `helper::address` runs `git-remote-helper`; `scheme://` is a URL (`file` is
/// local); `[user@]host:path` with no '/' before the ':' is ssh; anything else is a path.
pub fn classify(repository: &str) -> Result<Location, Refusal> {
    if let Some(helper) = remote_helper(repository) {
        return Ok(Location::Remote {
            protocol: helper.to_ascii_lowercase(),
        });
    }
    if let Some((scheme, rest)) = repository.split_once("://") {
        let scheme = scheme.to_ascii_lowercase();
        if scheme == "file" {
            // git takes what follows `file://` as the path; only the plain absolute form is
            // accepted, so what is checked is what git opens.
            if !rest.starts_with('/') || rest.contains('%') {
                return Err(Refusal::FileUrl {
                    repository: repository.to_owned(),
                });
            }
            return Ok(Location::Local {
                path: PathBuf::from(rest),
            });
        }
        let protocol = match scheme.as_str() {
            "git+ssh" | "ssh+git" => "ssh".to_owned(),
            _ => scheme,
        };
        return Ok(Location::Remote { protocol });
    }
    if crate::source::is_scp_like(repository) {
        return Ok(Location::Remote {
            protocol: "ssh".to_owned(),
        });
    }
    Ok(Location::Local {
        path: PathBuf::from(repository),
    })
}

/// `helper` of `helper::address` (git's remote-helper syntax), if `repository` has that form.
fn remote_helper(repository: &str) -> Option<&str> {
    let end = repository
        .char_indices()
        .find(|&(i, c)| {
            !(c.is_ascii_alphabetic() || (i > 0 && (c.is_ascii_digit() || "+-.".contains(c))))
        })
        .map_or(repository.len(), |(i, _)| i);
    (end > 0 && repository[end..].starts_with("::")).then(|| &repository[..end])
}

/// Parses `--allow-protocols` (`https,ssh,http`): known protocols only, lower case.
pub fn parse_protocols(list: &str) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for p in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let p = p.to_ascii_lowercase();
        if !KNOWN_PROTOCOLS.contains(&p.as_str()) {
            return Err(format!(
                "unknown protocol {p:?} in --allow-protocols: use some of {} (local \
                 repositories are allowed with --allow-local-repos instead of `file`)",
                KNOWN_PROTOCOLS.join(", ")
            ));
        }
        if !out.contains(&p) {
            out.push(p);
        }
    }
    if out.is_empty() {
        return Err("--allow-protocols names no protocol: give e.g. https,ssh".to_owned());
    }
    Ok(out)
}

impl Access {
    /// The rules with local repositories only under `dirs` (canonicalized here: each must
    /// exist).
    pub fn local_under(mut self, dirs: &[PathBuf]) -> Result<Self, std::io::Error> {
        let mut roots = Vec::new();
        for d in dirs {
            let c = std::fs::canonicalize(d).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "--allow-local-repos {}: {e} (the folder must exist)",
                        d.display()
                    ),
                )
            })?;
            roots.push(c);
        }
        self.local = LocalRepos::Under(roots);
        Ok(self)
    }

    /// The same rules, also never reading inside `dir` (canonicalized when it exists).
    pub fn forbid(mut self, dir: &Path) -> Self {
        let dir = canonical_or_absolute(dir);
        if !self.forbidden.contains(&dir) {
            self.forbidden.push(dir);
        }
        self
    }

    /// Whether `protocol` may be fetched from.
    pub fn allows_protocol(&self, protocol: &str) -> bool {
        self.protocols.iter().any(|p| p == protocol)
    }

    /// The value of `GIT_ALLOW_PROTOCOL` for git processes: the allowed protocols, plus `file`
    /// when `local` (a local repository that passed [`Access::check`]).
    pub fn git_allow_protocol(&self, local: bool) -> String {
        let mut list = self.protocols.clone();
        if local {
            list.push("file".to_owned());
        }
        list.join(":")
    }

    /// Checks a repository whose local path (if any) is already canonical (`resolved`). Pure.
    pub fn check_location(
        &self,
        repository: &str,
        location: &Location,
        resolved: Option<&Path>,
        caller: Caller,
    ) -> Result<(), Refusal> {
        match location {
            Location::Remote { protocol } => {
                if self.allows_protocol(protocol) {
                    Ok(())
                } else if remote_helper(repository).is_some() {
                    Err(Refusal::Helper {
                        repository: repository.to_owned(),
                        protocol: protocol.clone(),
                    })
                } else {
                    Err(Refusal::Protocol {
                        repository: repository.to_owned(),
                        protocol: protocol.clone(),
                        allowed: self.protocols.join(", "),
                    })
                }
            }
            Location::Local { path } => {
                let resolved = resolved.unwrap_or(path);
                if let Some(f) = self.forbidden.iter().find(|f| resolved.starts_with(f)) {
                    return Err(Refusal::Forbidden {
                        repository: repository.to_owned(),
                        resolved: resolved.display().to_string(),
                        forbidden: f.display().to_string(),
                    });
                }
                match (&self.local, caller) {
                    (LocalRepos::AdminAnywhere, Caller::Admin) => Ok(()),
                    (LocalRepos::AdminAnywhere, Caller::Tenant) => Err(Refusal::LocalForTenant {
                        repository: repository.to_owned(),
                    }),
                    (LocalRepos::Under(roots), _) => {
                        if roots.iter().any(|r| resolved.starts_with(r)) {
                            Ok(())
                        } else {
                            Err(Refusal::OutsideAllowed {
                                repository: repository.to_owned(),
                                resolved: resolved.display().to_string(),
                                allowed: roots
                                    .iter()
                                    .map(|r| r.display().to_string())
                                    .collect::<Vec<_>>()
                                    .join(", "),
                            })
                        }
                    }
                }
            }
        }
    }

    /// Checks `repository` for `caller`: classifies it, canonicalizes a local path (symbolic
    /// links and `..` resolved), then [`Access::check_location`]. A local path that does not
    /// exist is [`RepoError::RepositoryNotFound`]. `repository` is named in errors as
    /// `display` (without credentials).
    pub fn check(&self, repository: &str, caller: Caller) -> Result<Location, RepoError> {
        crate::source::Source::validate(repository)?;
        let location = classify(repository).map_err(RepoError::Refused)?;
        let resolved = match &location {
            Location::Local { path } => Some(canonical(repository, path)?),
            Location::Remote { .. } => None,
        };
        let shown = crate::source::Source::redacted(repository);
        self.check_location(&shown, &location, resolved.as_deref(), caller)
            .map_err(RepoError::Refused)?;
        Ok(match (location, resolved) {
            (Location::Local { .. }, Some(path)) => Location::Local { path },
            (location, _) => location,
        })
    }
}

/// `dir` canonical when it exists; else its nearest existing ancestor canonical, the rest
/// appended (a directory created later then compares equal to its canonical path).
fn canonical_or_absolute(dir: &Path) -> PathBuf {
    let absolute = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mut rest = Vec::new();
    let mut at = absolute.as_path();
    loop {
        if let Ok(c) = std::fs::canonicalize(at) {
            return rest.iter().rev().fold(c, |p: PathBuf, r| p.join(r));
        }
        match (at.parent(), at.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                at = parent;
            }
            _ => return absolute,
        }
    }
}

/// `path` made absolute with symbolic links and `..` resolved.
pub(crate) fn canonical(repository: &str, path: &Path) -> Result<PathBuf, RepoError> {
    std::fs::canonicalize(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            RepoError::RepositoryNotFound {
                repository: repository.to_owned(),
            }
        } else {
            RepoError::io(format!("cannot open repository {repository:?}"), e)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(p: &str) -> Location {
        Location::Remote {
            protocol: p.to_owned(),
        }
    }

    fn local(p: &str) -> Location {
        Location::Local {
            path: PathBuf::from(p),
        }
    }

    #[test]
    fn classify_follows_gits_rules() {
        let cases = [
            ("https://example.com/a.git", remote("https")),
            ("HTTP://example.com/a.git", remote("http")),
            ("git://example.com/a.git", remote("git")),
            ("ssh://git@example.com/a.git", remote("ssh")),
            ("git+ssh://example.com/a.git", remote("ssh")),
            ("git@example.com:org/a.git", remote("ssh")),
            ("example.com:a", remote("ssh")),
            ("ext::sh -c touch% /tmp/pwned", remote("ext")),
            ("fd::17", remote("fd")),
            ("foo://x/y", remote("foo")),
            ("file:///srv/git/a.git", local("/srv/git/a.git")),
            ("/srv/git/a.git", local("/srv/git/a.git")),
            ("./a:b", local("./a:b")),
            ("../x", local("../x")),
            ("repo", local("repo")),
        ];
        for (text, want) in cases {
            assert_eq!(classify(text).unwrap(), want, "{text}");
        }
        for bad in ["file://host/x", "file://relative", "file:///a%2e%2e/x"] {
            assert!(
                matches!(classify(bad), Err(Refusal::FileUrl { .. })),
                "{bad}"
            );
        }
    }

    fn access(local: LocalRepos) -> Access {
        Access {
            protocols: vec!["https".into(), "ssh".into()],
            local,
            forbidden: vec![PathBuf::from("/var/lib/tributary")],
        }
    }

    fn check(
        a: &Access,
        repo: &str,
        resolved: Option<&str>,
        caller: Caller,
    ) -> Result<(), Refusal> {
        let location = classify(repo)?;
        a.check_location(repo, &location, resolved.map(Path::new), caller)
    }

    #[test]
    fn protocols_are_allowed_only_when_listed() {
        let a = access(LocalRepos::AdminAnywhere);
        for caller in [Caller::Admin, Caller::Tenant] {
            assert!(check(&a, "https://h/a.git", None, caller).is_ok());
            assert!(check(&a, "git@h:a.git", None, caller).is_ok());
            let err = check(&a, "git://h/a.git", None, caller).unwrap_err();
            assert!(matches!(err, Refusal::Protocol { .. }), "{err}");
            assert!(err.to_string().contains("--allow-protocols"), "{err}");
            assert!(check(&a, "http://h/a.git", None, caller).is_err());
            let err = check(&a, "ext::sh -c id", None, caller).unwrap_err();
            assert!(matches!(err, Refusal::Helper { .. }), "{err}");
            assert!(check(&a, "foo://h/a", None, caller).is_err());
        }
        let mut a = a;
        a.protocols = parse_protocols("https, ssh,HTTP,git").unwrap();
        assert!(check(&a, "http://h/a.git", None, Caller::Tenant).is_ok());
        assert!(check(&a, "git://h/a.git", None, Caller::Tenant).is_ok());
        assert!(check(&a, "ext::sh -c id", None, Caller::Admin).is_err());
        assert_eq!(a.git_allow_protocol(false), "https:ssh:http:git");
        assert_eq!(a.git_allow_protocol(true), "https:ssh:http:git:file");
    }

    #[test]
    fn protocol_lists_name_known_protocols_only() {
        assert_eq!(parse_protocols("https,ssh").unwrap(), ["https", "ssh"]);
        assert!(parse_protocols("https,file")
            .unwrap_err()
            .contains("--allow-local-repos"));
        assert!(parse_protocols("ext").is_err());
        assert!(parse_protocols(" , ").is_err());
    }

    #[test]
    fn local_repositories_by_default_only_for_the_admin_and_never_in_the_data_directory() {
        let a = access(LocalRepos::AdminAnywhere);
        assert!(check(&a, "/home/me/app", Some("/home/me/app"), Caller::Admin).is_ok());
        assert!(check(
            &a,
            "file:///home/me/app",
            Some("/home/me/app"),
            Caller::Admin
        )
        .is_ok());
        let err = check(&a, "/home/me/app", Some("/home/me/app"), Caller::Tenant).unwrap_err();
        assert!(matches!(err, Refusal::LocalForTenant { .. }), "{err}");
        assert!(err.to_string().contains("--allow-local-repos"), "{err}");
        assert!(check(
            &a,
            "file:///home/me/app",
            Some("/home/me/app"),
            Caller::Tenant
        )
        .is_err());
        // The resolved path is what counts: a link or `..` into the data directory.
        let err = check(
            &a,
            "/home/me/link",
            Some("/var/lib/tributary/mirrors/x"),
            Caller::Admin,
        )
        .unwrap_err();
        assert!(matches!(err, Refusal::Forbidden { .. }), "{err}");
        assert!(check(
            &a,
            "/var/lib/tributary",
            Some("/var/lib/tributary"),
            Caller::Admin
        )
        .is_err());
        // A sibling whose name only starts the same is not inside.
        assert!(check(
            &a,
            "/var/lib/tributary2",
            Some("/var/lib/tributary2"),
            Caller::Admin
        )
        .is_ok());
    }

    #[test]
    fn allowed_folders_limit_everyone() {
        let a = access(LocalRepos::Under(vec![PathBuf::from("/srv/git")]));
        for caller in [Caller::Admin, Caller::Tenant] {
            assert!(check(&a, "/srv/git/app", Some("/srv/git/app"), caller).is_ok());
            let err = check(&a, "/srv/git/../etc", Some("/srv/etc"), caller).unwrap_err();
            assert!(matches!(err, Refusal::OutsideAllowed { .. }), "{err}");
            assert!(err.to_string().contains("/srv/git"), "{err}");
            assert!(check(&a, "/srv/gitx/app", Some("/srv/gitx/app"), caller).is_err());
        }
        // The data directory stays out even when an allowed folder holds it.
        let mut a = a;
        a.forbidden = vec![PathBuf::from("/srv/git/data")];
        assert!(matches!(
            check(
                &a,
                "/srv/git/data/mirrors/x",
                Some("/srv/git/data/mirrors/x"),
                Caller::Admin
            ),
            Err(Refusal::Forbidden { .. })
        ));
    }

    #[test]
    fn check_resolves_symbolic_links_and_dot_dot() {
        let dir = tempfile::tempdir().unwrap();
        let allowed = dir.path().join("allowed");
        let data = dir.path().join("data");
        std::fs::create_dir_all(allowed.join("app")).unwrap();
        std::fs::create_dir_all(data.join("mirrors")).unwrap();
        std::os::unix::fs::symlink(data.join("mirrors"), allowed.join("link")).unwrap();
        let a = Access::default()
            .local_under(std::slice::from_ref(&allowed))
            .unwrap()
            .forbid(&data);
        let app = allowed.join("app");
        assert!(a.check(app.to_str().unwrap(), Caller::Tenant).is_ok());
        let url = format!("file://{}", app.display());
        assert!(a.check(&url, Caller::Tenant).is_ok());
        let link = allowed.join("link");
        let err = a.check(link.to_str().unwrap(), Caller::Admin).unwrap_err();
        assert!(err.to_string().contains("server's own data"), "{err}");
        let up = format!("{}/../data/mirrors", allowed.display());
        let err = a.check(&up, Caller::Admin).unwrap_err();
        assert!(err.to_string().contains("server's own data"), "{err}");
        let missing = allowed.join("nope");
        assert!(matches!(
            a.check(missing.to_str().unwrap(), Caller::Admin),
            Err(RepoError::RepositoryNotFound { .. })
        ));
    }
}
