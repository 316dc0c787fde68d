//! Submodules, level by level, each URL checked before git fetches it.
//!
//! git resolves a level's URLs (relative ones against the superproject's `origin`) into
//! `.git/config` (`submodule init` and `sync`); each is then checked ([`check_url`]): a remote
//! URL's protocol must be allowed, and a local path is allowed only in a local superproject
//! (git itself refuses local submodules of remote repositories, CVE-2022-39253) and under the
//! same rules as a local repository. Only then does `submodule update` run for that level, with
//! `GIT_ALLOW_PROTOCOL` listing the allowed protocols (and `file` only when a checked local URL
//! needs it), and the next level is walked inside each submodule.

use std::collections::BTreeMap;
use std::path::Path;

use crate::access::{classify, Access, Caller, Location, Refusal};
use crate::error::RepoError;
use crate::git::{Git, Kind};

/// Deeper nesting than this is refused (a cycle of submodules would never end).
const MAX_DEPTH: usize = 8;

/// Initialises and checks out the submodules of the workspace `dir`, recursively.
/// `local`: the repository checked out in `dir` is a local one.
pub(crate) async fn update(
    access: &Access,
    git: &Git<'_>,
    dir: &Path,
    local: bool,
) -> Result<(), RepoError> {
    let mut pending = vec![(dir.to_path_buf(), local, 0usize)];
    while let Some((dir, local, depth)) = pending.pop() {
        if !dir.join(".gitmodules").is_file() {
            continue;
        }
        if depth >= MAX_DEPTH {
            return Err(RepoError::invalid(
                "submodules",
                &dir.display().to_string(),
                format!("they nest deeper than {MAX_DEPTH} levels (a cycle?)"),
            ));
        }
        let at = Some(dir.as_path());
        git.run(Kind::Local, at, &["submodule", "init", "--quiet"])
            .await?;
        git.run(Kind::Local, at, &["submodule", "sync", "--quiet"])
            .await?;
        let urls = config(git, &dir, &[], "url").await?;
        let mut needs_file = false;
        let mut local_names = Vec::new();
        for (name, url) in &urls {
            let is_local = check_url(access, url, local).map_err(|refusal| {
                RepoError::invalid("submodule", name, refusal_reason(url, &refusal))
            })?;
            needs_file |= is_local;
            if is_local {
                local_names.push(name.clone());
            }
        }
        let allow = access.git_allow_protocol(needs_file);
        let sub = Git {
            allow: &allow,
            ..*git
        };
        sub.run(
            Kind::Network,
            at,
            &[
                "submodule",
                "update",
                "--init",
                "--force",
                "--checkout",
                "--quiet",
            ],
        )
        .await?;
        // A fixed command of ours (foreach runs it through sh), never a caller's string.
        sub.run(
            Kind::Network,
            at,
            &["submodule", "foreach", "--quiet", "git clean -ffdxq"],
        )
        .await?;
        let paths = config(git, &dir, &["-f", ".gitmodules"], "path").await?;
        for (name, path) in paths {
            let inner = dir.join(&path);
            if urls.contains_key(&name) && inner.join(".git").exists() {
                pending.push((inner, local_names.contains(&name), depth + 1));
            }
        }
    }
    Ok(())
}

/// Whether a submodule's (resolved) `url` may be fetched, in a superproject that is local
/// (`parent_local`) or not; `Ok(true)` for an allowed local one.
pub(crate) fn check_url(access: &Access, url: &str, parent_local: bool) -> Result<bool, Refusal> {
    match classify(url)? {
        location @ Location::Remote { .. } => {
            access.check_location(url, &location, None, Caller::Admin)?;
            Ok(false)
        }
        Location::Local { .. } if !parent_local => Err(Refusal::LocalForTenant {
            repository: url.to_owned(),
        }),
        Location::Local { .. } => match access.check(url, Caller::Admin) {
            Ok(_) => Ok(true),
            Err(RepoError::Refused(r)) => Err(r),
            Err(e) => Err(Refusal::Unreadable {
                repository: url.to_owned(),
                reason: e.to_string(),
            }),
        },
    }
}

fn refusal_reason(url: &str, refusal: &Refusal) -> String {
    match refusal {
        Refusal::LocalForTenant { .. } => format!(
            "its URL {url} is a path on the local disk, and the submodules of a remote \
             repository must be remote too (an https:// or ssh URL): change it in .gitmodules"
        ),
        other => format!("its URL is refused: {other}"),
    }
}

/// `submodule.<name>.<key>` values of the repository's config (or of `.gitmodules` with
/// `-f .gitmodules`), by submodule name.
async fn config(
    git: &Git<'_>,
    dir: &Path,
    file: &[&str],
    key: &str,
) -> Result<BTreeMap<String, String>, RepoError> {
    let pattern = format!("^submodule\\..*\\.{key}$");
    let mut args: Vec<&str> = vec!["config"];
    args.extend_from_slice(file);
    args.extend(["-z", "--get-regexp", &pattern]);
    let out = git.output(Kind::Local, Some(dir), &args).await?;
    if !out.status.success() {
        // Exit status 1: no such key.
        return if out.status.code() == Some(1) {
            Ok(BTreeMap::new())
        } else {
            Err(git.failed(&args, &out))
        };
    }
    let suffix = format!(".{key}");
    Ok(out
        .stdout
        .split(|&b| b == 0)
        .filter_map(|entry| std::str::from_utf8(entry).ok())
        .filter_map(|entry| entry.split_once('\n'))
        .filter_map(|(k, v)| {
            let name = k.strip_prefix("submodule.")?.strip_suffix(&suffix)?;
            Some((name.to_owned(), v.to_owned()))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn submodules_of_remote_repositories_are_remote() {
        let access = Access::default();
        assert_eq!(check_url(&access, "https://h/lib.git", false), Ok(false));
        assert_eq!(check_url(&access, "git@h:lib.git", false), Ok(false));
        assert!(matches!(
            check_url(&access, "/srv/lib", false),
            Err(Refusal::LocalForTenant { .. })
        ));
        assert!(matches!(
            check_url(&access, "file:///srv/lib", false),
            Err(Refusal::LocalForTenant { .. })
        ));
        assert!(matches!(
            check_url(&access, "git://h/lib.git", true),
            Err(Refusal::Protocol { .. })
        ));
        assert!(matches!(
            check_url(&access, "ext::sh -c id", true),
            Err(Refusal::Helper { .. })
        ));
    }

    #[test]
    fn local_submodules_of_local_repositories_follow_the_local_rules() {
        let dir = tempfile::tempdir().unwrap();
        let allowed = dir.path().join("allowed");
        let data = dir.path().join("data");
        std::fs::create_dir_all(allowed.join("lib")).unwrap();
        std::fs::create_dir_all(data.join("mirrors")).unwrap();
        let access = Access::default()
            .local_under(std::slice::from_ref(&allowed))
            .unwrap()
            .forbid(&data);
        let lib = allowed.join("lib");
        assert_eq!(check_url(&access, lib.to_str().unwrap(), true), Ok(true));
        let mirrors = data.join("mirrors");
        assert!(matches!(
            check_url(&access, mirrors.to_str().unwrap(), true),
            Err(Refusal::Forbidden { .. })
        ));
        assert!(matches!(
            check_url(&access, dir.path().to_str().unwrap(), true),
            Err(Refusal::OutsideAllowed { .. })
        ));
    }
}
