//! Projects: a name in a tenant and the repository its pipelines come from.

use tonic::{Request, Response, Status};
use tributary_proto::api::{projects_server::Projects, *};
use tributary_proto::events::{envelope::Payload, ProjectCreated};

use crate::admin::valid_name;
use crate::auth::authenticate;
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
        if self
            .state
            .directory(|d| d.project(&who.tenant, &req.name).is_some())?
        {
            return Err(Status::already_exists(format!(
                "project {} already exists",
                req.name
            )));
        }
        // Fail early on a repository that cannot be read, with git's own words.
        if let Err(e) = self.state.mirrors.sync(&req.repository).await {
            return Err(Status::failed_precondition(format!(
                "cannot read the repository: {e}"
            )));
        }
        let created = ProjectCreated {
            tenant: who.tenant.clone(),
            name: req.name.clone(),
            repository: req.repository.clone(),
            sealed_webhook_secret,
            max_concurrent_jobs: req.max_concurrent_jobs,
        };
        let events = [directory_event(
            &who.tenant,
            Payload::ProjectCreated(created),
        )];
        let offsets = self.state.append(&events).await?;
        self.state
            .wait_directory(&self.state.mark_after(&events, &offsets))
            .await?;
        let project = self
            .state
            .directory(|d| d.project(&who.tenant, &req.name).map(to_api))?;
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
