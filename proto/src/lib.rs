//! Tributary's wire schema.
//!
//! * [`events`]: the events on the log. Every action is an [`events::Envelope`] carrying one
//!   payload variant. See `docs/events.md` for what each event means and who emits it.
//! * [`api`]: the gRPC API (tonic clients and servers): projects, builds, agents, admin.
//!
//! Invariant: the schema only grows. A reader that meets an unknown payload variant decodes the
//! envelope with `payload == None` and skips it.

/// Generated code, laid out like the protobuf packages so cross-package references resolve.
pub mod tributary {
    pub mod events {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/tributary.events.v1.rs"));
        }
    }
    pub mod api {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/tributary.api.v1.rs"));
        }
    }
}

pub use tributary::api::v1 as api;
pub use tributary::events::v1 as events;

/// The encoded file descriptor set of every Tributary proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tributary_descriptor.bin"));

pub mod json;

/// gRPC metadata key under which agents send their [`api::AgentCapabilities`] (protobuf bytes)
/// with `Register` and `PullWork`.
pub const CAPABILITIES_METADATA: &str = "tributary-capabilities-bin";

use events::envelope::Payload;
use events::Envelope;

/// Microseconds since the Unix epoch, now. Only edges (services, CLI) call this; folds read time
/// from the events.
pub use uuid::Uuid;

pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// A new UUID v7 in canonical text form (time-ordered, globally unique).
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

impl Envelope {
    /// A new event with a fresh UUID v7 id, stamped with the current time.
    pub fn new(tenant: &str, project: &str, build_id: &str, payload: Payload) -> Self {
        Envelope {
            event_id: new_id(),
            tenant: tenant.to_owned(),
            project: project.to_owned(),
            build_id: build_id.to_owned(),
            time_us: now_us(),
            payload: Some(payload),
        }
    }

    /// The key that orders this event on the log: the build id, so all events of a build keep
    /// their order whichever backend or partition count is used. Events that belong to no
    /// build are keyed by their agent (`agent:<id>`) or their tenant (`tenant:<name>`).
    pub fn partition_key(&self) -> String {
        if !self.build_id.is_empty() {
            return self.build_id.clone();
        }
        let agent = match &self.payload {
            Some(Payload::AgentRegistered(e)) => Some(&e.agent_id),
            Some(Payload::AgentConnected(e)) => Some(&e.agent_id),
            Some(Payload::AgentHeartbeat(e)) => Some(&e.agent_id),
            Some(Payload::AgentDisconnected(e)) => Some(&e.agent_id),
            Some(Payload::AgentRevoked(e)) => Some(&e.agent_id),
            _ => None,
        };
        let pool = match &self.payload {
            Some(Payload::AgentRequested(e)) => Some(&e.request_id),
            Some(Payload::AgentDraining(e)) => Some(&e.request_id),
            Some(Payload::AgentReleased(e)) => Some(&e.request_id),
            Some(Payload::AgentProvisioned(e)) => Some(&e.request_id),
            _ => None,
        };
        if let Some(id) = pool {
            return format!("pool:{id}");
        }
        match agent {
            Some(id) => format!("agent:{id}"),
            None => format!("tenant:{}", self.tenant),
        }
    }

    /// snake_case name of the payload variant (`line_exited`), or `unknown` for a variant this
    /// reader does not know.
    pub fn type_name(&self) -> &'static str {
        self.payload.as_ref().map_or("unknown", Payload::type_name)
    }
}

impl Payload {
    /// snake_case name of the variant, as used by `tributary events --json` and docs/events.md.
    pub fn type_name(&self) -> &'static str {
        match self {
            Payload::BuildTriggered(_) => "build_triggered",
            Payload::BuildQueued(_) => "build_queued",
            Payload::PipelineRejected(_) => "pipeline_rejected",
            Payload::JobQueued(_) => "job_queued",
            Payload::JobAssigned(_) => "job_assigned",
            Payload::JobStarted(_) => "job_started",
            Payload::StepStarted(_) => "step_started",
            Payload::LineStarted(_) => "line_started",
            Payload::LogChunk(_) => "log_chunk",
            Payload::LineExited(_) => "line_exited",
            Payload::StepFinished(_) => "step_finished",
            Payload::ArtifactUploaded(_) => "artifact_uploaded",
            Payload::JobFinished(_) => "job_finished",
            Payload::BuildFinished(_) => "build_finished",
            Payload::BuildCanceled(_) => "build_canceled",
            Payload::UsageTick(_) => "usage_tick",
            Payload::JobRequeued(_) => "job_requeued",
            Payload::CacheRestored(_) => "cache_restored",
            Payload::CacheSaved(_) => "cache_saved",
            Payload::CacheEvicted(_) => "cache_evicted",
            Payload::JobReused(_) => "job_reused",
            Payload::InvoiceIssued(_) => "invoice_issued",
            Payload::TenantCreated(_) => "tenant_created",
            Payload::TokenIssued(_) => "token_issued",
            Payload::TokenRevoked(_) => "token_revoked",
            Payload::ProjectCreated(_) => "project_created",
            Payload::ProjectRepositoryChanged(_) => "project_repository_changed",
            Payload::SchedulerStarted(_) => "scheduler_started",
            Payload::AgentRegistered(_) => "agent_registered",
            Payload::AgentConnected(_) => "agent_connected",
            Payload::AgentHeartbeat(_) => "agent_heartbeat",
            Payload::AgentDisconnected(_) => "agent_disconnected",
            Payload::AgentRevoked(_) => "agent_revoked",
            Payload::AgentRequested(_) => "agent_requested",
            Payload::AgentDraining(_) => "agent_draining",
            Payload::AgentReleased(_) => "agent_released",
            Payload::AgentProvisioned(_) => "agent_provisioned",
            Payload::SecretSet(_) => "secret_set",
            Payload::SecretDeleted(_) => "secret_deleted",
            Payload::JobWaiting(_) => "job_waiting",
            Payload::ImageBuilt(_) => "image_built",
            Payload::ImageReused(_) => "image_reused",
            Payload::ImagePruned(_) => "image_pruned",
        }
    }
}

impl events::JobPlan {
    /// Whether the job runs in a container: `image:` names an image, or `image: {build: ...}`
    /// builds one.
    pub fn runs_in_container(&self) -> bool {
        !self.image.trim().is_empty() || self.image_build.is_some()
    }

    /// What the job's container is, for people: the image's name, or `built from
    /// ci/Dockerfile`; empty for a job on the host.
    pub fn image_description(&self) -> String {
        match (&self.image_build, self.image.trim()) {
            (Some(b), _) => format!("built from {}", b.dockerfile),
            (None, image) => image.to_owned(),
        }
    }
}

impl events::Status {
    /// Lower-case name: `succeeded`, `failed`, `skipped`, `canceled`, `timed_out`.
    pub fn name(self) -> &'static str {
        match self {
            events::Status::Unspecified => "unspecified",
            events::Status::Succeeded => "succeeded",
            events::Status::Failed => "failed",
            events::Status::Skipped => "skipped",
            events::Status::Canceled => "canceled",
            events::Status::TimedOut => "timed_out",
        }
    }
}

impl events::Stream {
    /// Lower-case name: `stdout`, `stderr`, `system`.
    pub fn name(self) -> &'static str {
        match self {
            events::Stream::Unspecified => "unspecified",
            events::Stream::Stdout => "stdout",
            events::Stream::Stderr => "stderr",
            events::Stream::System => "system",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::events::*;
    use prost::Message;

    #[test]
    fn unknown_payload_decodes_as_none() {
        // Field 999 is a payload variant from a future schema: an old reader must skip it.
        let mut env = Envelope::new(
            "t",
            "p",
            "b",
            envelope::Payload::JobQueued(JobQueued {
                job: "a".into(),
                attempt: 1,
            }),
        );
        env.payload = None;
        let mut bytes = env.encode_to_vec();
        // tag 999, wire type 2 (length-delimited), length 3, bytes.
        bytes.extend_from_slice(&[0xba, 0x3e, 3, 1, 2, 3]);
        let decoded = Envelope::decode(bytes.as_slice()).expect("decodes");
        assert!(decoded.payload.is_none());
        assert_eq!(decoded.type_name(), "unknown");
        assert_eq!(decoded.event_id, env.event_id);
    }

    #[test]
    fn event_ids_are_uuid_v7() {
        let id = super::new_id();
        let parsed = uuid::Uuid::parse_str(&id).expect("uuid");
        assert_eq!(parsed.get_version_num(), 7);
    }
}
