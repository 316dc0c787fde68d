//! Projects: a name in a tenant and the repository its pipelines come from.

use tonic::{Request, Response, Status};
use tributary_proto::api::{projects_server::Projects, *};
use tributary_proto::events::{envelope::Payload, ProjectCreated, ProjectRepositoryChanged};
use tributary_repo::RepoError;

use crate::admin::valid_name;
use crate::auth::authenticate;
use crate::repo_access::{caller_of, project_caller, refusal};
use crate::state::{directory_event, ApiState};

pub struct ProjectsApi {
    state: ApiState,
}

impl ProjectsApi {
    pub fn new(state: ApiState) -> Self {
        ProjectsApi { state }
    }
}

fn to_api(p: &tributary_projections::directory::Project) -> Project {
    Project {
        name: p.name.clone(),
        repository: p.repository.clone(),
        tenant: p.tenant.clone(),
        max_concurrent_jobs: p.max_concurrent_jobs,
    }
}

#[tonic::async_trait]
impl Projects for ProjectsApi {
    async fn create_project(
        &self,
        request: Request<CreateProjectRequest>,
    ) -> Result<Response<Project>, Status> {
        let who = self.state.directory(|d| authenticate(d, &request))??;
        who.require_user()?;
        let req = request.into_inner();
        if !valid_name(&req.name) {
            return Err(Status::invalid_argument(
                "project names are 1-64 characters of letters, digits, '-', '_' and '.'",
            ));
        }
        if req.repository.trim().is_empty() {
            return Err(Status::invalid_argument(
                "a project needs a repository: a git URL or a local path",
            ));
        }
        let sealed_webhook_secret = if req.webhook_secret.is_empty() {
            Vec::new()
        } else {
            let key = self.state.server_key.as_ref().ok_or_else(|| {
                Status::failed_precondition("this server has no key to seal webhook secrets")
            })?;
            key.seal(req.webhook_secret.as_bytes())
        };
        // The admin may add (or fix) a project of another tenant.
        let tenant = if req.tenant.is_empty() || req.tenant == who.tenant {
            who.tenant.clone()
        } else {
            who.require_admin().map_err(|_| {
                Status::permission_denied(
                    "only the admin token may name another tenant's project; leave out --tenant",
                )
            })?;
            if !self
                .state
                .directory(|d| d.tenants.contains_key(&req.tenant))?
            {
                return Err(Status::not_found(format!(
                    "no tenant {}; create it with `tributary admin tenant-add {}`",
                    req.tenant, req.tenant
                )));
            }
            req.tenant.clone()
        };
        // The operator's rules first: nothing is read from a refused repository.
        let caller = caller_of(&who);
        match self.state.mirrors.access().check(&req.repository, caller) {
            Err(e @ RepoError::Refused(_)) | Err(e @ RepoError::InvalidInput { .. }) => {
                return Err(Status::permission_denied(e.to_string()));
            }
            _ => {}
        }
        let existing = self
            .state
            .directory(|d| d.project(&tenant, &req.name).cloned())?;
        // An existing project is replaced only when the rules refuse its repository (the fix
        // for projects from before the rules): its repository changes, nothing else.
        let replaced = match &existing {
            None => None,
            Some(p) => match refusal(&self.state, &p.repository, project_caller(p)) {
                Some(reason) => Some((p.repository.clone(), reason)),
                None => {
                    return Err(Status::already_exists(format!(
                        "project {} already exists",
                        req.name
                    )))
                }
            },
        };
        // Fail early on a repository that cannot be read, with git's own words.
        if let Err(e) = self
            .state
            .mirrors
            .for_tenant(&tenant)
            .sync(&req.repository)
            .await
        {
            return Err(Status::failed_precondition(format!(
                "cannot read the repository: {e}"
            )));
        }
        let by_admin = caller == tributary_repo::Caller::Admin;
        let payload = match replaced {
            None => Payload::ProjectCreated(ProjectCreated {
                tenant: tenant.clone(),
                name: req.name.clone(),
                repository: req.repository.clone(),
                sealed_webhook_secret,
                max_concurrent_jobs: req.max_concurrent_jobs,
                by_admin,
            }),
            Some((previous, reason)) => {
                tracing::info!(project = %req.name, tenant = %tenant,
                    "replacing a repository the rules refuse: {reason}");
                Payload::ProjectRepositoryChanged(ProjectRepositoryChanged {
                    tenant: tenant.clone(),
                    name: req.name.clone(),
                    repository: req.repository.clone(),
                    by_admin,
                    who: who.name.clone(),
                    previous,
                    reason,
                })
            }
        };
        let events = [directory_event(&tenant, payload)];
        let offsets = self.state.append(&events).await?;
        self.state
            .wait_directory(&self.state.mark_after(&events, &offsets))
            .await?;
        let project = self
            .state
            .directory(|d| d.project(&tenant, &req.name).map(to_api))?;
        project
            .map(Response::new)
            .ok_or_else(|| Status::internal("project vanished"))
    }

    async fn list_projects(
        &self,
        request: Request<ListProjectsRequest>,
    ) -> Result<Response<ListProjectsResponse>, Status> {
        let who = self.state.directory(|d| authenticate(d, &request))??;
        who.require_user()?;
        let projects = self
            .state
            .directory(|d| d.projects_of(&who.tenant).map(to_api).collect())?;
        Ok(Response::new(ListProjectsResponse { projects }))
    }
}
