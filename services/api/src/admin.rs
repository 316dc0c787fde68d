//! Admin: tenants and tokens. Only the admin token may call these.

use tonic::{Request, Response, Status};
use tributary_proto::api::{admin_server::Admin, *};
use tributary_proto::events::{envelope::Payload, AgentRevoked, TenantCreated, TokenIssued};

use crate::auth::{authenticate, new_token};
use crate::state::{directory_event, ApiState};

pub struct AdminApi {
    state: ApiState,
}

impl AdminApi {
    pub fn new(state: ApiState) -> Self {
        AdminApi { state }
    }
}

pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[tonic::async_trait]
impl Admin for AdminApi {
    async fn create_tenant(
        &self,
        request: Request<CreateTenantRequest>,
    ) -> Result<Response<Tenant>, Status> {
        self.state
            .directory(|d| authenticate(d, &request))??
            .require_admin()?;
        let name = request.into_inner().name;
        if !valid_name(&name) {
            return Err(Status::invalid_argument(
                "tenant names are 1-64 characters of letters, digits, '-', '_' and '.'",
            ));
        }
        if self.state.directory(|d| d.tenants.contains_key(&name))? {
            return Err(Status::already_exists(format!(
                "tenant {name} already exists"
            )));
        }
        let events = [directory_event(
            &name,
            Payload::TenantCreated(TenantCreated { name: name.clone() }),
        )];
        let offsets = self.state.append(&events).await?;
        self.state
            .wait_directory(&self.state.mark_after(&events, &offsets))
            .await?;
        Ok(Response::new(Tenant { name }))
    }

    async fn create_token(
        &self,
        request: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        self.state
            .directory(|d| authenticate(d, &request))??
            .require_admin()?;
        let req = request.into_inner();
        if !matches!(req.kind.as_str(), "user" | "enrollment") {
            return Err(Status::invalid_argument(
                "token kind must be `user` or `enrollment`",
            ));
        }
        if !self
            .state
            .directory(|d| d.tenants.contains_key(&req.tenant))?
        {
            return Err(Status::not_found(format!(
                "no tenant {}; create it first (`tributary admin tenant-add {}`)",
                req.tenant, req.tenant
            )));
        }
        let (token, sha256) = new_token();
        let token_id = tributary_proto::new_id();
        let issued = TokenIssued {
            token_id: token_id.clone(),
            tenant: req.tenant.clone(),
            kind: req.kind,
            name: if req.name.is_empty() {
                token_id.clone()
            } else {
                req.name
            },
            sha256,
        };
        let events = [directory_event(&req.tenant, Payload::TokenIssued(issued))];
        let offsets = self.state.append(&events).await?;
        self.state
            .wait_directory(&self.state.mark_after(&events, &offsets))
            .await?;
        Ok(Response::new(CreateTokenResponse { token, token_id }))
    }

    async fn list_agents(
        &self,
        request: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        self.state
            .directory(|d| authenticate(d, &request))??
            .require_admin()?;
        let end = self.state.log_end().await?;
        self.state.cluster.wait(&end).await?;
        let agents = self.state.cluster.read(|c| {
            c.agents
                .iter()
                .filter(|(_, a)| a.registered)
                .map(|(id, a)| Agent {
                    id: id.clone(),
                    name: a.name.clone(),
                    labels: a.labels.clone(),
                    capacity: a.capacity,
                    connected: a.connected,
                    revoked: a.revoked,
                    last_heartbeat_us: a.last_seen_us,
                    running: c
                        .agent_leases(id)
                        .map(|((build, job), _)| format!("{build}/{job}"))
                        .collect(),
                })
                .collect()
        })?;
        Ok(Response::new(ListAgentsResponse { agents }))
    }

    async fn revoke_agent(
        &self,
        request: Request<RevokeAgentRequest>,
    ) -> Result<Response<RevokeAgentResponse>, Status> {
        self.state
            .directory(|d| authenticate(d, &request))??
            .require_admin()?;
        let agent_id = request.into_inner().agent_id;
        let known = self
            .state
            .cluster
            .read(|c| c.agents.get(&agent_id).map(|a| a.tenant.clone()))?;
        let Some(tenant) = known else {
            return Err(Status::not_found(format!("no agent {agent_id}")));
        };
        let revoked = Payload::AgentRevoked(AgentRevoked { agent_id });
        let events = [directory_event(&tenant, revoked)];
        let offsets = self.state.append(&events).await?;
        self.state
            .wait_directory(&self.state.mark_after(&events, &offsets))
            .await?;
        Ok(Response::new(RevokeAgentResponse {}))
    }
}
