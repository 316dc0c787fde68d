//! The agent's gRPC client: one lazily connected channel that reconnects by itself, with the
//! agent's bearer token on every call.

use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};
use tributary_proto::api::agents_client::AgentsClient;
use tributary_proto::api::artifacts_client::ArtifactsClient;

use crate::AgentError;

/// Adds `authorization: Bearer <token>` to every request.
#[derive(Clone)]
pub struct BearerAuth {
    value: Option<MetadataValue<Ascii>>,
}

impl BearerAuth {
    /// A token that cannot be sent (not visible ASCII) is refused.
    pub fn new(token: &str) -> Result<Self, AgentError> {
        let value = format!("Bearer {}", token.trim()).parse().map_err(|_| {
            AgentError::Config("the token contains characters that cannot be sent".into())
        })?;
        Ok(BearerAuth { value: Some(value) })
    }

    /// No authorization header (Register carries its enrollment token in the request).
    pub fn none() -> Self {
        BearerAuth { value: None }
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.value {
            req.metadata_mut().insert("authorization", value.clone());
        }
        Ok(req)
    }
}

/// The Agents client the runtime and [`crate::ApiSink`] use. Cheap to clone (clones share the
/// connection).
pub type AgentsApi = AgentsClient<InterceptedService<Channel, BearerAuth>>;

/// A channel to `server` that connects on first use and reconnects after the connection is
/// lost; HTTP/2 keepalives notice a server that went away while a stream is idle.
pub fn channel(server: &str) -> Result<Channel, AgentError> {
    let endpoint = Endpoint::from_shared(server.to_owned())
        .map_err(|e| AgentError::Config(format!("bad server address {server:?}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .tcp_keepalive(Some(Duration::from_secs(30)))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    Ok(endpoint.connect_lazy())
}

/// An Agents client on `channel` that sends `auth` with every call.
pub fn agents(channel: Channel, auth: BearerAuth) -> AgentsApi {
    AgentsClient::with_interceptor(channel, auth)
}

/// The Artifacts client of an agent without object storage of its own: its artifacts go
/// through the server (`UploadArtifact`, `FetchArtifact`), fenced by the lease.
pub type ServerArtifacts = ArtifactsClient<InterceptedService<Channel, BearerAuth>>;

/// A [`ServerArtifacts`] client on `channel` that sends `auth` with every call.
pub fn server_artifacts(channel: Channel, auth: BearerAuth) -> ServerArtifacts {
    ArtifactsClient::with_interceptor(channel, auth)
}
