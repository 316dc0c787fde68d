//! Artifacts for agents that have no object storage of their own (`tributary agent` without
//! `--objects`): they upload and fetch through the server, authenticated by their agent token
//! and fenced by their current lease.
//!
//! * Upload: the server hashes the bytes it receives, refuses them when size or sha256 differ
//!   from what the agent computed, stores them under the lease's job key (tenant, project,
//!   build and job come from the lease, never from the agent) and returns the verified
//!   `ArtifactUploaded`.
//! * Fetch: only an artifact the lease needs (one of the needed jobs' recorded uploads), checked
//!   against its recorded sha256 before it is sent (see [`crate::artifacts::fetch_verified`]).

use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tonic::{Request, Status, Streaming};
use tributary_objects::{keys, ArtifactPath};
use tributary_projections::directory::TokenKind;
use tributary_proto::api::UploadArtifactChunk;
use tributary_proto::events::ArtifactUploaded;

use crate::auth::{authenticate, Principal};
use crate::state::ApiState;

/// The calling agent: a live agent token of an agent that is not revoked.
pub fn agent<T>(state: &ApiState, request: &Request<T>) -> Result<Principal, Status> {
    let who = state.directory(|d| authenticate(d, request))??;
    if who.kind != TokenKind::Agent {
        return Err(Status::permission_denied("this call needs an agent token"));
    }
    let revoked = state
        .cluster
        .read(|c| c.agents.get(&who.name).is_none_or(|a| a.revoked))?;
    if revoked {
        return Err(Status::permission_denied(
            "this agent is revoked or unknown",
        ));
    }
    Ok(who)
}

/// The job attempt a current lease of `who` is for.
struct LeasedJob {
    tenant: String,
    project: String,
    build: String,
    job: String,
    attempt: u32,
}

fn leased(state: &ApiState, who: &Principal, lease_id: &str) -> Result<LeasedJob, Status> {
    let found = state.cluster.read(|c| {
        c.lease(lease_id).and_then(|((build, job), l)| {
            let b = c.builds.builds.get(build)?;
            Some((
                l.agent_id.clone(),
                LeasedJob {
                    tenant: b.tenant.clone(),
                    project: b.project.clone(),
                    build: build.clone(),
                    job: job.clone(),
                    attempt: l.attempt,
                },
            ))
        })
    })?;
    match found {
        Some((agent, job)) if agent == who.name => Ok(job),
        _ => Err(Status::failed_precondition(format!(
            "lease {lease_id} is not a current lease of this agent (the job was requeued, \
             finished or canceled); stop it"
        ))),
    }
}

/// The artifact `object_key` if the lease needs it.
pub fn needed(
    state: &ApiState,
    who: &Principal,
    lease_id: &str,
    object_key: &str,
) -> Result<ArtifactUploaded, Status> {
    let job = leased(state, who, lease_id)?;
    let needed = state
        .cluster
        .read(|c| c.needed_artifacts(&job.build, &job.job))?;
    needed
        .into_iter()
        .find(|a| a.object_key == object_key)
        .ok_or_else(|| {
            Status::permission_denied(format!(
                "object {object_key} is not an artifact of a job that job {} needs",
                job.job
            ))
        })
}

/// Receives one upload (see the module doc).
pub async fn upload(
    state: &ApiState,
    who: &Principal,
    mut stream: Streaming<UploadArtifactChunk>,
) -> Result<ArtifactUploaded, Status> {
    let mut msg = stream
        .message()
        .await?
        .ok_or_else(|| Status::invalid_argument("an upload without any message"))?;
    let job = leased(state, who, &msg.lease_id)?;
    let path = ArtifactPath::parse(&msg.path)
        .map_err(|e| Status::invalid_argument(format!("artifact path: {e}")))?;
    let key = keys::artifact(&job.tenant, &job.project, &job.build, &job.job, &path)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    let objects = state.objects.as_ref().ok_or_else(|| {
        Status::failed_precondition("this server has no object storage configured")
    })?;
    let tmp = tempfile::NamedTempFile::new()
        .map_err(|e| Status::internal(format!("cannot create a temporary file: {e}")))?
        .into_temp_path();
    let mut file = tokio::fs::File::create(&tmp)
        .await
        .map_err(|e| Status::internal(format!("cannot write a temporary file: {e}")))?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let (claimed_size, claimed_sha) = loop {
        if !msg.data.is_empty() {
            hasher.update(&msg.data);
            size += msg.data.len() as u64;
            file.write_all(&msg.data)
                .await
                .map_err(|e| Status::internal(format!("cannot write a temporary file: {e}")))?;
        }
        if msg.last {
            break (msg.size, msg.sha256);
        }
        msg = stream.message().await?.ok_or_else(|| {
            Status::invalid_argument(format!(
                "the upload of {path} ended before its last message"
            ))
        })?;
    };
    file.flush()
        .await
        .map_err(|e| Status::internal(format!("cannot write a temporary file: {e}")))?;
    drop(file);
    let sha256 = hex::encode(hasher.finalize());
    if size != claimed_size || sha256 != claimed_sha {
        return Err(Status::data_loss(format!(
            "artifact {path}: the server received {size} bytes with sha256 {sha256}, the agent \
             sent {claimed_size} bytes with sha256 {claimed_sha}; upload it again"
        )));
    }
    let stored = objects
        .put_file(&key, &tmp)
        .await
        .map_err(|e| Status::unavailable(format!("cannot store artifact {path}: {e}")))?;
    if stored.sha256 != sha256 || stored.size != size {
        return Err(Status::data_loss(format!(
            "artifact {path} changed while it was stored; upload it again"
        )));
    }
    tracing::debug!(
        build_id = %job.build, job_id = %job.job, path = %path, size, "artifact received"
    );
    Ok(ArtifactUploaded {
        job: job.job,
        attempt: job.attempt,
        path: path.to_string(),
        size,
        sha256,
        object_key: key,
    })
}
