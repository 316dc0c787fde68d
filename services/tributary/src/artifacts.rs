//! `tributary artifacts list|get`: a build's artifacts through the server's `Artifacts` API.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use sha2::{Digest, Sha256};
use tributary_proto::api::{self, artifacts_client::ArtifactsClient};
use tributary_proto::events::ArtifactUploaded;

use crate::cli::{ArtifactsCommand, ServerArgs};
use crate::client::{channel, status};

pub async fn command(cmd: ArtifactsCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ArtifactsCommand::List {
            build,
            json,
            server,
        } => {
            let list = list(&server, &build).await?;
            if json {
                for a in &list {
                    println!(
                        "{}",
                        serde_json::json!({
                            "job": a.job, "attempt": a.attempt, "path": a.path,
                            "size": a.size, "sha256": a.sha256,
                        })
                    );
                }
            } else if list.is_empty() {
                println!("build {build} has no artifacts");
            } else {
                for a in &list {
                    println!("{:<24} {:<40} {:>12}  {}", a.job, a.path, a.size, a.sha256);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ArtifactsCommand::Get {
            build,
            path,
            job,
            output,
            server,
        } => get(&server, &build, &path, job.as_deref(), output).await,
    }
}

async fn list(server: &ServerArgs, build: &str) -> anyhow::Result<Vec<ArtifactUploaded>> {
    let (ch, auth) = channel(server).await?;
    let mut client = ArtifactsClient::with_interceptor(ch, auth);
    Ok(client
        .list_artifacts(api::ListArtifactsRequest {
            build_id: build.to_owned(),
        })
        .await
        .map_err(status)?
        .into_inner()
        .artifacts)
}

/// Downloads into a temporary file beside the destination, checks size and sha256 against the
/// listing, then renames it into place: a file that appears is the artifact.
async fn get(
    server: &ServerArgs,
    build: &str,
    path: &str,
    job: Option<&str>,
    output: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let listed = list(server, build).await?;
    let wanted: Vec<&ArtifactUploaded> = listed
        .iter()
        .filter(|a| a.path == path && job.is_none_or(|j| a.job == j))
        .collect();
    let [artifact] = wanted.as_slice() else {
        if wanted.is_empty() {
            anyhow::bail!(
                "build {build} has no artifact {path}; `tributary artifacts list {build}` shows \
                 what it has"
            );
        }
        anyhow::bail!("several jobs have an artifact {path}: choose one with --job");
    };
    let (ch, auth) = channel(server).await?;
    let mut client = ArtifactsClient::with_interceptor(ch, auth);
    let mut stream = client
        .download_artifact(api::DownloadArtifactRequest {
            build_id: build.to_owned(),
            job: artifact.job.clone(),
            path: path.to_owned(),
        })
        .await
        .map_err(status)?
        .into_inner();

    let to_stdout = output.as_deref() == Some(std::path::Path::new("-"));
    let dest = output.unwrap_or_else(|| {
        PathBuf::from(
            path.rsplit('/')
                .next()
                .filter(|n| !n.is_empty())
                .unwrap_or("artifact"),
        )
    });
    let mut sink: Box<dyn Write> = Box::new(Vec::new());
    let mut tmp = None;
    if !to_stdout {
        let dir = dest
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        let file = tempfile::NamedTempFile::new_in(dir)
            .with_context(|| format!("cannot write into {}", dir.display()))?;
        sink = Box::new(file.reopen()?);
        tmp = Some(file);
    }
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut out = std::io::stdout().lock();
    while let Some(chunk) = stream.message().await.map_err(status)? {
        hasher.update(&chunk.data);
        size += chunk.data.len() as u64;
        if to_stdout {
            out.write_all(&chunk.data)?;
        } else {
            sink.write_all(&chunk.data)?;
        }
    }
    sink.flush()?;
    let sha = hex::encode(hasher.finalize());
    anyhow::ensure!(
        sha == artifact.sha256 && size == artifact.size,
        "artifact {path} arrived damaged: {size} bytes with sha256 {sha}, expected {} bytes with \
         sha256 {}; nothing was written",
        artifact.size,
        artifact.sha256
    );
    if let Some(tmp) = tmp {
        tmp.persist(&dest)
            .with_context(|| format!("cannot write {}", dest.display()))?;
        eprintln!(
            "{} ({} bytes, sha256 {} verified)",
            dest.display(),
            size,
            artifact.sha256
        );
    }
    Ok(ExitCode::SUCCESS)
}
