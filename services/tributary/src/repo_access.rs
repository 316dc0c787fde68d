//! `--allow-local-repos` and `--allow-protocols`: the operator's rules for repositories
//! (issue 22), shared by `up`, `serve api` and `agent`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use tributary_repo::Access;

#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Repositories (what projects may build from)")]
pub struct RepoAccessArgs {
    /// Allow local repositories (paths, file:// URLs) only inside these folders, for every
    /// token, the admin's too, compared after resolving symbolic links and `..`. Without it,
    /// tenant users get no local repository and the admin token any outside the data
    /// directory. The data directory is never allowed.
    #[arg(
        long,
        value_name = "DIR[,DIR]",
        value_delimiter = ',',
        env = "TRIBUTARY_ALLOW_LOCAL_REPOS"
    )]
    pub allow_local_repos: Vec<PathBuf>,
    /// Protocols repository URLs may use, enforced for every git process of the server and
    /// its agents (submodules too): some of https, ssh, http, git. Remote helpers (ext::)
    /// never.
    #[arg(
        long,
        value_name = "LIST",
        default_value = "https,ssh",
        env = "TRIBUTARY_ALLOW_PROTOCOLS"
    )]
    pub allow_protocols: String,
}

impl RepoAccessArgs {
    /// The rules, never allowing a repository inside `data` (the data directory or an agent's
    /// work directory).
    pub fn access(&self, data: &Path) -> anyhow::Result<Access> {
        let protocols = tributary_repo::access::parse_protocols(&self.allow_protocols)
            .map_err(anyhow::Error::msg)?;
        let mut access = Access {
            protocols,
            ..Access::default()
        };
        let dirs: Vec<PathBuf> = self
            .allow_local_repos
            .iter()
            .filter(|d| !d.as_os_str().is_empty())
            .cloned()
            .collect();
        if !dirs.is_empty() {
            access = access
                .local_under(&dirs)
                .context("cannot use --allow-local-repos")?;
        }
        Ok(access.forbid(data))
    }
}
