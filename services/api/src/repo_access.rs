//! The operator's repository rules applied to callers and projects (issue 22): who a
//! repository is checked as, and the statuses a refusal becomes.

use tonic::Status;
use tributary_projections::directory::{Project, TokenKind};
use tributary_repo::{Caller, RepoError};

use crate::auth::Principal;
use crate::state::ApiState;

/// The admin token is checked as the admin; every other token as a tenant user.
pub fn caller_of(who: &Principal) -> Caller {
    if who.kind == TokenKind::Admin {
        Caller::Admin
    } else {
        Caller::Tenant
    }
}

/// A project's repository is checked as whoever set it.
pub fn project_caller(project: &Project) -> Caller {
    if project.by_admin {
        Caller::Admin
    } else {
        Caller::Tenant
    }
}

/// Why the rules refuse `repository` for `caller` now (`None`: allowed). Errors other than a
/// refusal (a path that vanished, ...) are left to git, which names them.
pub fn refusal(state: &ApiState, repository: &str, caller: Caller) -> Option<String> {
    match state.mirrors.access().check(repository, caller) {
        Err(e @ RepoError::Refused(_)) | Err(e @ RepoError::InvalidInput { .. }) => {
            Some(e.to_string())
        }
        _ => None,
    }
}

/// Checks the repository a build of `project` would use (its own, or a re-run's recorded one):
/// a project whose repository the rules refuse (e.g. created before they existed) gets no new
/// builds until it is fixed. A repository other than the project's current one (a re-run of a
/// build from before a change) is checked as a tenant user's.
pub fn check_build(state: &ApiState, project: &Project, repository: &str) -> Result<(), Status> {
    let caller = if repository == project.repository {
        project_caller(project)
    } else {
        Caller::Tenant
    };
    match refusal(state, repository, caller) {
        None => Ok(()),
        Some(reason) => Err(Status::failed_precondition(format!(
            "project {} cannot build: {reason}\nTo fix it, set an allowed repository with \
             `tributary project add {} --repo URL` (this replaces a refused repository; a local \
             one needs the admin token or an --allow-local-repos folder)",
            project.name, project.name
        ))),
    }
}
