//! Artifacts of a build: listed from the log, served from object storage after their sha256 was
//! checked. Used by the gRPC `Artifacts` service and the HTTP download route (`http.rs`).

use std::collections::BTreeMap;
use std::pin::Pin;

use bytes::Bytes;
use futures::Stream;
use tokio::io::AsyncReadExt;
use tonic::{Request, Response, Status};
use tributary_objects::{ObjectsError, Stored};
use tributary_proto::api::{
    artifacts_server::Artifacts, ArtifactChunk, DownloadArtifactRequest, FetchArtifactRequest,
    ListArtifactsRequest, ListArtifactsResponse, UploadArtifactChunk,
};
use tributary_proto::events::{envelope::Payload, ArtifactUploaded};

use crate::auth::{authenticate, Principal};
use crate::state::{internal, ApiState};

/// Chunk size of a download.
const CHUNK: usize = 256 * 1024;

/// The artifacts of `build_id` if it is a build of `who`'s tenant (else NOT_FOUND): for each
/// job, the uploads of its latest attempt that uploaded any (only succeeded attempts upload),
/// or for a kept or reused job those of the run it stands for; sorted by job and path.
pub async fn list(
    state: &ApiState,
    who: &Principal,
    build_id: &str,
) -> Result<Vec<ArtifactUploaded>, Status> {
    let not_found = || Status::not_found(format!("no build {build_id}"));
    // From the build's first record (the API's index), not the partition's beginning.
    let Some(start) = state.build_start(build_id).await? else {
        return Err(not_found());
    };
    let mut from = start.events;
    let mut tenant_checked = false;
    let mut latest: BTreeMap<String, (u32, BTreeMap<String, ArtifactUploaded>)> = BTreeMap::new();
    let mut handed: BTreeMap<String, BTreeMap<String, ArtifactUploaded>> = BTreeMap::new();
    loop {
        let records = state
            .log
            .read_key(build_id, from, 1000)
            .await
            .map_err(internal)?;
        let Some(last) = records.last() else { break };
        from = last.offset + 1;
        for record in records {
            let Ok(env) = record.decode() else { continue };
            if !tenant_checked {
                if env.tenant != who.tenant {
                    return Err(not_found());
                }
                tenant_checked = true;
            }
            match env.payload {
                Some(Payload::ArtifactUploaded(a)) => {
                    let slot = latest.entry(a.job.clone()).or_default();
                    if a.attempt > slot.0 {
                        *slot = (a.attempt, BTreeMap::new());
                    }
                    if a.attempt == slot.0 {
                        slot.1.insert(a.path.clone(), a);
                    }
                }
                // A kept job (re-run of failed jobs) and a reused job did not run here: they
                // have the artifacts of the run they stand for.
                Some(Payload::BuildQueued(q)) => {
                    for job in q.plan.iter().flat_map(|p| &p.jobs) {
                        if !job.kept_from_build.is_empty() {
                            hand_over(&mut handed, &job.id, &job.kept_artifacts);
                        }
                    }
                }
                Some(Payload::JobReused(r)) => hand_over(&mut handed, &r.job, &r.artifacts),
                _ => {}
            }
        }
    }
    if !tenant_checked {
        return Err(not_found());
    }
    for (job, by_path) in handed {
        latest.entry(job).or_insert((0, by_path));
    }
    Ok(latest
        .into_values()
        .flat_map(|(_, by_path)| by_path.into_values())
        .collect())
}

/// Records `artifacts` as those of `job` in this build (named after it, whatever run they came
/// from), by path.
fn hand_over(
    handed: &mut BTreeMap<String, BTreeMap<String, ArtifactUploaded>>,
    job: &str,
    artifacts: &[ArtifactUploaded],
) {
    let slot = handed.entry(job.to_owned()).or_default();
    for a in artifacts {
        let mut a = a.clone();
        a.job = job.to_owned();
        slot.insert(a.path.clone(), a);
    }
}

/// The one artifact of `build_id` at `path` (of `job`, or of the only job having that path).
pub async fn find(
    state: &ApiState,
    who: &Principal,
    build_id: &str,
    job: &str,
    path: &str,
) -> Result<ArtifactUploaded, Status> {
    let all = list(state, who, build_id).await?;
    let mut hits: Vec<ArtifactUploaded> = all
        .into_iter()
        .filter(|a| a.path == path && (job.is_empty() || a.job == job))
        .collect();
    match hits.len() {
        0 => Err(Status::not_found(format!(
            "build {build_id} has no artifact {path}{}; list them with `tributary artifacts list \
             {build_id}`",
            if job.is_empty() {
                String::new()
            } else {
                format!(" from job {job}")
            }
        ))),
        1 => Ok(hits.remove(0)),
        _ => Err(Status::invalid_argument(format!(
            "several jobs of build {build_id} have an artifact {path} ({}); name the job",
            hits.iter()
                .map(|a| a.job.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// A verified local copy of `artifact` (a temporary file deleted on drop), open for reading.
pub async fn fetch_verified(
    state: &ApiState,
    artifact: &ArtifactUploaded,
) -> Result<(tempfile::TempPath, tokio::fs::File), Status> {
    let objects = state.objects.as_ref().ok_or_else(|| {
        Status::failed_precondition("this server has no object storage configured")
    })?;
    let tmp = tempfile::NamedTempFile::new()
        .map_err(|e| Status::internal(format!("cannot create a temporary file: {e}")))?
        .into_temp_path();
    let expected = Stored {
        size: artifact.size,
        sha256: artifact.sha256.clone(),
    };
    objects
        .get_verified(&artifact.object_key, &expected, &tmp)
        .await
        .map_err(|e| match e {
            ObjectsError::Corrupt { .. } => Status::data_loss(e.to_string()),
            ObjectsError::NotFound { .. } => Status::not_found(e.to_string()),
            e => Status::unavailable(e.to_string()),
        })?;
    let file = tokio::fs::File::open(&tmp)
        .await
        .map_err(|e| Status::internal(format!("cannot open the downloaded artifact: {e}")))?;
    Ok((tmp, file))
}

/// The file as a stream of chunks; the temporary file lives as long as the stream.
pub fn chunks(
    tmp: tempfile::TempPath,
    mut file: tokio::fs::File,
) -> impl Stream<Item = std::io::Result<Bytes>> + Send {
    async_stream(move |tx| async move {
        let _keep = tmp;
        loop {
            let mut buf = vec![0u8; CHUNK];
            match file.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => {
                    buf.truncate(n);
                    if tx.send(Ok(Bytes::from(buf))).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    break;
                }
            }
        }
    })
}

/// A stream fed by a task through a small channel.
fn async_stream<T, F, Fut>(f: F) -> impl Stream<Item = T> + Send
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

pub struct ArtifactsApi {
    state: ApiState,
}

impl ArtifactsApi {
    pub fn new(state: ApiState) -> Self {
        ArtifactsApi { state }
    }

    fn who<T>(&self, request: &Request<T>) -> Result<Principal, Status> {
        let who = self.state.directory(|d| authenticate(d, request))??;
        who.require_user()?;
        Ok(who)
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<ArtifactChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Artifacts for ArtifactsApi {
    async fn list_artifacts(
        &self,
        request: Request<ListArtifactsRequest>,
    ) -> Result<Response<ListArtifactsResponse>, Status> {
        let who = self.who(&request)?;
        let id = crate::builds::resolve_id(&self.state, &who, &request.get_ref().build_id).await?;
        let artifacts = list(&self.state, &who, &id).await?;
        Ok(Response::new(ListArtifactsResponse { artifacts }))
    }

    type DownloadArtifactStream = ChunkStream;
    type FetchArtifactStream = ChunkStream;

    async fn upload_artifact(
        &self,
        request: Request<tonic::Streaming<UploadArtifactChunk>>,
    ) -> Result<Response<ArtifactUploaded>, Status> {
        let who = crate::agent_artifacts::agent(&self.state, &request)?;
        let uploaded =
            crate::agent_artifacts::upload(&self.state, &who, request.into_inner()).await?;
        Ok(Response::new(uploaded))
    }

    async fn fetch_artifact(
        &self,
        request: Request<FetchArtifactRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let who = crate::agent_artifacts::agent(&self.state, &request)?;
        let req = request.into_inner();
        let artifact =
            crate::agent_artifacts::needed(&self.state, &who, &req.lease_id, &req.object_key)?;
        let (tmp, file) = fetch_verified(&self.state, &artifact).await?;
        Ok(Response::new(Box::pin(chunk_messages(tmp, file))))
    }

    async fn download_artifact(
        &self,
        request: Request<DownloadArtifactRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let who = self.who(&request)?;
        let req = request.into_inner();
        let id = crate::builds::resolve_id(&self.state, &who, &req.build_id).await?;
        let artifact = find(&self.state, &who, &id, &req.job, &req.path).await?;
        let (tmp, file) = fetch_verified(&self.state, &artifact).await?;
        Ok(Response::new(Box::pin(chunk_messages(tmp, file))))
    }
}

/// [`chunks`] as gRPC messages.
fn chunk_messages(
    tmp: tempfile::TempPath,
    file: tokio::fs::File,
) -> impl Stream<Item = Result<ArtifactChunk, Status>> + Send {
    futures::StreamExt::map(chunks(tmp, file), |chunk| {
        chunk
            .map(|data| ArtifactChunk {
                data: data.to_vec(),
            })
            .map_err(|e| Status::internal(format!("reading the artifact: {e}")))
    })
}
