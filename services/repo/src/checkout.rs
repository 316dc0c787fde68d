//! Checking out one exact commit from a mirror into a job's workspace.
//!
//! A new workspace is a `git clone --local --no-checkout` of the mirror (objects hard-linked, so
//! it is quick even for a large repository), marked with `tributary.repository` in its config. A
//! workspace that carries the mark of the same repository is updated in place instead: the commit
//! is fetched from the mirror if missing, then `checkout --force --detach` and `clean -ffdx` make
//! the tree exactly the commit's. If updating in place fails for any reason, or the directory holds
//! anything else, its contents are deleted and it is cloned anew.
//!
//! Without submodules, a new workspace of a commit that was checked out before is a copy of that
//! first checkout instead (see `template.rs`): no git process at all.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use crate::error::RepoError;
use crate::git::{Git, Kind};
use crate::source::Source;
use crate::{lock, template, Mirrors};

/// The config key marking a workspace as ours, holding the repository's public location.
const MARK: &str = "tributary.repository";

pub(crate) async fn checkout(
    mirrors: &Mirrors,
    source: &Source,
    sha: &str,
    workspace: &Path,
    submodules: bool,
) -> Result<(), RepoError> {
    let mirror = mirrors.path_of(source)?;
    let ws = prepare_dir(workspace, &mirrors.base)?;
    let git = mirrors.git(source);
    // Between the mirror and the workspace git reads a local path: only `file` is needed.
    let ws_git = Git {
        allow: "file",
        ..git
    };

    // Without submodules a checkout is the same for every job of the commit: make the workspace
    // the commit's template when there is one (a fresh or a reused workspace alike).
    let template = (!submodules).then(|| template::path(mirrors.root(), source, sha));
    if let Some(t) = &template {
        match template::restore(t.clone(), ws.clone()).await {
            Ok(true) => {
                tracing::debug!(repository = %source.display, workspace = %ws.display(),
                    sha, "checked out from the commit's template");
                return Ok(());
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(repository = %source.display, template = %t.display(),
                    "cannot copy the commit's template, checking out with git: {e}");
                wipe(&ws)?;
            }
        }
    }

    let mut updated = false;
    if is_our_workspace(&git, &ws).await {
        match update(mirrors, &ws_git, &mirror, &ws, sha).await {
            Ok(()) => updated = true,
            Err(e) => tracing::warn!(
                repository = %source.display, workspace = %ws.display(),
                "cannot update the workspace in place, re-creating it: {e}"
            ),
        }
    }
    if !updated {
        wipe(&ws)?;
        fresh(mirrors, &ws_git, &mirror, &ws, sha).await?;
        // The first fresh checkout of a commit becomes its template.
        if let Some(t) = template {
            verify_head(&git, &ws, sha).await?;
            if let Err(e) = template::save(ws.clone(), t.clone()).await {
                tracing::warn!(repository = %source.display, template = %t.display(),
                    "cannot save the commit's template (later jobs check out with git): {e}");
            }
            return Ok(());
        }
    }

    let dir = Some(ws.as_path());
    if submodules {
        crate::submodules::update(mirrors.access(), &git, &ws, source.local).await?;
    } else if ws.join(".git").join("modules").exists() {
        // Submodules populated by an earlier checkout with submodules: empty them again.
        git.run(
            Kind::Network,
            dir,
            &["submodule", "deinit", "--all", "--force", "--quiet"],
        )
        .await?;
    }

    verify_head(&git, &ws, sha).await?;
    tracing::debug!(repository = %source.display, workspace = %ws.display(), sha, "checked out");
    Ok(())
}

async fn verify_head(git: &Git<'_>, ws: &Path, sha: &str) -> Result<(), RepoError> {
    let head = git
        .run(Kind::Local, Some(ws), &["rev-parse", "--verify", "HEAD"])
        .await?;
    let head = String::from_utf8_lossy(&head).trim().to_owned();
    if head != sha {
        return Err(RepoError::Git {
            repository: git.source.display.clone(),
            command: "git rev-parse --verify HEAD".to_owned(),
            status: "unexpected result".to_owned(),
            stderr: format!("HEAD in {} is {head}, not {sha}", ws.display()),
            hint: "delete the workspace directory and check out again".to_owned(),
        });
    }
    Ok(())
}

/// Creates the workspace and returns its canonical path, refusing directories whose wiping would
/// destroy the mirrors.
fn prepare_dir(workspace: &Path, mirrors_root: &Path) -> Result<PathBuf, RepoError> {
    std::fs::create_dir_all(workspace).map_err(|e| {
        RepoError::io(
            format!("cannot create the workspace directory {workspace:?}"),
            e,
        )
    })?;
    let ws = std::fs::canonicalize(workspace)
        .map_err(|e| RepoError::io(format!("cannot open the workspace {workspace:?}"), e))?;
    let root = std::fs::canonicalize(mirrors_root)
        .or_else(|_| std::path::absolute(mirrors_root))
        .unwrap_or_else(|_| mirrors_root.to_path_buf());
    if ws.parent().is_none() || root.starts_with(&ws) || ws.starts_with(&root) {
        return Err(RepoError::invalid(
            "workspace",
            &workspace.display().to_string(),
            format!(
                "it is, contains or is inside the mirrors root {root:?}, and a checkout deletes \
                 what the workspace holds; use a separate directory"
            ),
        ));
    }
    Ok(ws)
}

async fn is_our_workspace(git: &Git<'_>, ws: &Path) -> bool {
    let git_dir = ws.join(".git");
    if !git_dir.is_dir() {
        return false;
    }
    let mut arg = OsString::from("--git-dir=");
    arg.push(&git_dir);
    let args: [&OsStr; 4] = [&arg, "config".as_ref(), "--get".as_ref(), MARK.as_ref()];
    match git.output(Kind::Local, Some(ws), &args).await {
        Ok(out) => out.status.success() && out.stdout_str() == git.source.public,
        Err(_) => false,
    }
}

async fn update(
    mirrors: &Mirrors,
    git: &Git<'_>,
    mirror: &Path,
    ws: &Path,
    sha: &str,
) -> Result<(), RepoError> {
    if !has_commit(git, ws, sha).await? {
        let _lock = lock::read(mirror, &git.source.display, mirrors.lock_wait()).await?;
        fetch_from_mirror(git, mirror, ws, sha).await?;
    }
    git.run(
        Kind::Local,
        Some(ws),
        &["remote", "set-url", "origin", &git.source.public],
    )
    .await?;
    checkout_exact(git, ws, sha).await
}

async fn fresh(
    mirrors: &Mirrors,
    git: &Git<'_>,
    mirror: &Path,
    ws: &Path,
    sha: &str,
) -> Result<(), RepoError> {
    {
        let _lock = lock::read(mirror, &git.source.display, mirrors.lock_wait()).await?;
        let args: [&OsStr; 7] = [
            "clone".as_ref(),
            "--local".as_ref(),
            "--no-checkout".as_ref(),
            "--quiet".as_ref(),
            "--".as_ref(),
            mirror.as_os_str(),
            ws.as_os_str(),
        ];
        git.run(Kind::Network, None, &args).await?;
        if !has_commit(git, ws, sha).await? {
            fetch_from_mirror(git, mirror, ws, sha).await?;
        }
    }
    let dir = Some(ws);
    git.run(
        Kind::Local,
        dir,
        &["remote", "set-url", "origin", &git.source.public],
    )
    .await?;
    checkout_exact(git, ws, sha).await?;
    // Marked last: a workspace whose first checkout failed halfway is not reused.
    git.run(Kind::Local, dir, &["config", MARK, &git.source.public])
        .await?;
    Ok(())
}

async fn has_commit(git: &Git<'_>, ws: &Path, sha: &str) -> Result<bool, RepoError> {
    let spec = format!("{sha}^{{commit}}");
    let out = git
        .output(Kind::Local, Some(ws), &["cat-file", "-e", &spec])
        .await?;
    Ok(out.status.success())
}

/// Fetches just `sha` (and its history) from the mirror, also if no ref points at it.
async fn fetch_from_mirror(
    git: &Git<'_>,
    mirror: &Path,
    ws: &Path,
    sha: &str,
) -> Result<(), RepoError> {
    let args: [&OsStr; 9] = [
        "-c".as_ref(),
        "uploadpack.allowAnySHA1InWant=true".as_ref(),
        "fetch".as_ref(),
        "--quiet".as_ref(),
        "--no-tags".as_ref(),
        "--no-write-fetch-head".as_ref(),
        "--".as_ref(),
        mirror.as_os_str(),
        sha.as_ref(),
    ];
    git.run(Kind::Network, Some(ws), &args).await?;
    Ok(())
}

async fn checkout_exact(git: &Git<'_>, ws: &Path, sha: &str) -> Result<(), RepoError> {
    let dir = Some(ws);
    git.run(
        Kind::Network,
        dir,
        &["checkout", "--force", "--detach", "--quiet", sha],
    )
    .await?;
    git.run(Kind::Network, dir, &["clean", "-ffdxq"]).await?;
    Ok(())
}

/// Deletes everything inside `ws` (not `ws` itself, which may be a mount point). Symbolic links
/// are removed, never followed.
fn wipe(ws: &Path) -> Result<(), RepoError> {
    let entries = std::fs::read_dir(ws)
        .map_err(|e| RepoError::io(format!("cannot list the workspace {ws:?}"), e))?;
    for entry in entries {
        let entry =
            entry.map_err(|e| RepoError::io(format!("cannot list the workspace {ws:?}"), e))?;
        crate::remove_path(&entry.path())?;
    }
    Ok(())
}
