//! An attempt's artifacts: the ones of the jobs it needs are downloaded into its workspace
//! (sha256-verified) before it runs; its own (the job's `artifacts` patterns) are uploaded after
//! it succeeded, each recorded by an ArtifactUploaded event.
//!
//! Paths are normalised ([`ArtifactPath`]); a symbolic link that leaves the workspace is never
//! uploaded and never written through on download.

use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tributary_objects::{keys, ArtifactPath, Objects, Stored};
use tributary_pipeline::artifacts::Matcher;
use tributary_proto::api::{FetchArtifactRequest, UploadArtifactChunk};
use tributary_proto::events::ArtifactUploaded;

use crate::attempt::BuildRef;
use crate::client::ServerArtifacts;

/// Where an attempt's artifacts go and come from: the object storage the agent shares with the
/// server, or the server itself (an agent without `--objects`).
pub(crate) enum Store<'a> {
    Objects(&'a Objects),
    Server {
        client: &'a ServerArtifacts,
        lease_id: &'a str,
    },
}

/// Bytes per upload message.
const CHUNK: usize = 256 * 1024;

/// Most files one job may upload.
const MAX_FILES: usize = 10_000;

/// Downloads `inputs` into `workdir`, each verified against its recorded size and sha256.
/// Returns how many bytes were written.
pub(crate) async fn download(
    store: &Store<'_>,
    inputs: &[ArtifactUploaded],
    workdir: &Path,
) -> Result<u64, String> {
    let mut bytes = 0;
    for a in inputs {
        let path = ArtifactPath::parse(&a.path)
            .map_err(|e| format!("artifact of job {:?}: {e}", a.job))?;
        let dest = workdir.join(path.as_str());
        if let Some(link) = symlink_on_the_way(workdir, &dest) {
            return Err(format!(
                "cannot put artifact {path} of job {:?} into the workspace: {} is a symbolic \
                 link, and writing through it could leave the workspace",
                a.job,
                link.display()
            ));
        }
        let expected = Stored {
            size: a.size,
            sha256: a.sha256.clone(),
        };
        match store {
            Store::Objects(objects) => objects
                .get_verified(&a.object_key, &expected, &dest)
                .await
                .map_err(|e| e.to_string()),
            Store::Server { client, lease_id } => {
                fetch(client, lease_id, &a.object_key, &expected, &dest).await
            }
        }
        .map_err(|e| format!("artifact {path} of job {:?}: {e}", a.job))?;
        tracing::debug!(path = %path, job = %a.job, size = a.size, "artifact downloaded");
        bytes += a.size;
    }
    Ok(bytes)
}

/// Uploads the files of `workdir` that `patterns` match. Refuses (and uploads nothing) when a
/// matched symbolic link leads outside the workspace.
pub(crate) async fn upload(
    store: &Store<'_>,
    build: &BuildRef,
    job: &str,
    attempt: u32,
    patterns: &[String],
    workdir: &Path,
) -> Result<Vec<ArtifactUploaded>, String> {
    let matcher = tributary_pipeline::artifacts::matcher(patterns)?;
    let root = workdir.to_path_buf();
    let files = tokio::task::spawn_blocking(move || collect(&root, &matcher, MAX_FILES))
        .await
        .map_err(|e| format!("listing the artifacts failed: {e}"))??;
    let mut uploaded = Vec::with_capacity(files.len());
    for (path, file) in files {
        let (key, stored) = match store {
            Store::Objects(objects) => {
                let key =
                    keys::artifact(&build.tenant, &build.project, &build.build_id, job, &path)
                        .map_err(|e| e.to_string())?;
                let stored = objects
                    .put_file(&key, &file)
                    .await
                    .map_err(|e| format!("cannot upload artifact {path}: {e}"))?;
                (key, stored)
            }
            Store::Server { client, lease_id } => {
                let got = send(client, lease_id, &path, &file)
                    .await
                    .map_err(|e| format!("cannot upload artifact {path} to the server: {e}"))?;
                let stored = Stored {
                    size: got.size,
                    sha256: got.sha256,
                };
                (got.object_key, stored)
            }
        };
        tracing::debug!(path = %path, size = stored.size, "artifact uploaded");
        uploaded.push(ArtifactUploaded {
            job: job.to_owned(),
            attempt,
            path: path.to_string(),
            size: stored.size,
            sha256: stored.sha256,
            object_key: key,
        });
    }
    Ok(uploaded)
}

/// Sends `file` to the server as artifact `path` of the lease's job, hashing it while it is
/// read; the server hashes what it receives and refuses a difference.
async fn send(
    client: &ServerArtifacts,
    lease_id: &str,
    path: &ArtifactPath,
    file: &Path,
) -> Result<ArtifactUploaded, String> {
    let mut f = tokio::fs::File::open(file)
        .await
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let first = UploadArtifactChunk {
        lease_id: lease_id.to_owned(),
        path: path.to_string(),
        ..UploadArtifactChunk::default()
    };
    let display = file.display().to_string();
    let reader = tokio::spawn(async move {
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut msg = first;
        loop {
            let mut buf = vec![0u8; CHUNK];
            let n = f
                .read(&mut buf)
                .await
                .map_err(|e| format!("cannot read {display}: {e}"))?;
            buf.truncate(n);
            hasher.update(&buf);
            size += n as u64;
            msg.data = buf;
            if n == 0 {
                msg.last = true;
                msg.size = size;
                msg.sha256 = hex::encode(hasher.finalize_reset());
                let sha = msg.sha256.clone();
                let _ = tx.send(msg).await;
                return Ok::<_, String>((size, sha));
            }
            if tx.send(msg).await.is_err() {
                return Err("the server stopped the upload".to_owned());
            }
            msg = UploadArtifactChunk::default();
        }
    });
    let answer = client
        .clone()
        .upload_artifact(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    let (size, sha256) = reader
        .await
        .map_err(|e| format!("reading the file failed: {e}"))??;
    let got = answer.map_err(|s| s.message().to_owned())?.into_inner();
    if got.size != size || got.sha256 != sha256 {
        return Err(format!(
            "the server stored {} bytes with sha256 {}, the agent sent {size} bytes with sha256 \
             {sha256}",
            got.size, got.sha256
        ));
    }
    Ok(got)
}

/// Fetches `object_key` from the server into `dest`: written beside it, renamed into place only
/// when size and sha256 are `expected`'s.
async fn fetch(
    client: &ServerArtifacts,
    lease_id: &str,
    object_key: &str,
    expected: &Stored,
    dest: &Path,
) -> Result<(), String> {
    if let Some(dir) = dest.parent() {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tributary-{:016x}", rand::random::<u64>()));
    let tmp = dest.with_file_name(name);
    let result = async {
        let mut stream = client
            .clone()
            .fetch_artifact(FetchArtifactRequest {
                lease_id: lease_id.to_owned(),
                object_key: object_key.to_owned(),
            })
            .await
            .map_err(|s| s.message().to_owned())?
            .into_inner();
        let mut out = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = stream.message().await.map_err(|s| s.message().to_owned())? {
            hasher.update(&chunk.data);
            size += chunk.data.len() as u64;
            out.write_all(&chunk.data)
                .await
                .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        }
        out.flush()
            .await
            .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        let sha256 = hex::encode(hasher.finalize());
        if size != expected.size || sha256 != expected.sha256 {
            return Err(format!(
                "received {size} bytes with sha256 {sha256} from the server, but {} bytes with \
                 sha256 {} were recorded: refusing to use it",
                expected.size, expected.sha256
            ));
        }
        tokio::fs::rename(&tmp, dest)
            .await
            .map_err(|e| format!("cannot move into {}: {e}", dest.display()))
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    result
}

/// The files under `root` (not `.git`) that `matcher` matches, as (artifact path, file to read),
/// sorted by path. Symbolic links are not followed while walking; a matched link is uploaded as
/// the file it points to if that is inside the workspace, and refused otherwise.
pub(crate) fn collect(
    root: &Path,
    matcher: &Matcher,
    max_files: usize,
) -> Result<Vec<(ArtifactPath, PathBuf)>, String> {
    let real_root = root
        .canonicalize()
        .map_err(|e| format!("cannot open the workspace {}: {e}", root.display()))?;
    let mut found = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries =
            std::fs::read_dir(&dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
        for entry in entries {
            let entry = entry.map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
            let full = entry.path();
            let Ok(rel) = full.strip_prefix(root) else {
                continue;
            };
            if rel == Path::new(".git") {
                continue;
            }
            let Some(rel_str) = rel.to_str() else {
                tracing::warn!(path = %full.display(), "skipping a file name that is not UTF-8");
                continue;
            };
            let kind = entry
                .file_type()
                .map_err(|e| format!("cannot inspect {}: {e}", full.display()))?;
            if kind.is_dir() {
                dirs.push(full);
                continue;
            }
            if matcher.matches(rel_str).is_empty() {
                continue;
            }
            let path = ArtifactPath::parse(rel_str).map_err(|e| e.to_string())?;
            if kind.is_symlink() {
                let target = full.canonicalize().map_err(|e| {
                    format!("artifact {path} is a symbolic link that cannot be followed: {e}")
                })?;
                if !target.starts_with(&real_root) {
                    return Err(format!(
                        "artifact {path} is a symbolic link to {}, outside the workspace: refused",
                        target.display()
                    ));
                }
                if !target.is_file() {
                    continue; // a link to a directory: its files are matched by their own paths
                }
                found.push((path, target));
            } else if kind.is_file() {
                found.push((path, full));
            }
            if found.len() > max_files {
                return Err(format!(
                    "the patterns match more than {max_files} files; narrow them or archive \
                     the files into one (e.g. tar czf out.tar.gz out/)"
                ));
            }
        }
    }
    found.sort();
    Ok(found)
}

/// The first directory between `root` and `dest` (exclusive) that is a symbolic link.
pub(crate) fn symlink_on_the_way(root: &Path, dest: &Path) -> Option<PathBuf> {
    let rel = dest.strip_prefix(root).ok()?;
    let mut at = root.to_path_buf();
    let parts: Vec<Component<'_>> = rel.components().collect();
    for part in parts.iter().take(parts.len().saturating_sub(1)) {
        at.push(part);
        if at
            .symlink_metadata()
            .is_ok_and(|m| m.file_type().is_symlink())
        {
            return Some(at);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(p: &[&str]) -> Matcher {
        tributary_pipeline::artifacts::matcher(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap()
    }

    #[test]
    fn collects_matches_follows_inside_links_refuses_outside_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let ws = tmp.path().join("ws");
        std::fs::create_dir_all(ws.join("dist/sub")).unwrap();
        std::fs::create_dir_all(ws.join(".git")).unwrap();
        std::fs::write(ws.join("dist/a.tar"), "a").unwrap();
        std::fs::write(ws.join("dist/sub/b.tar"), "b").unwrap();
        std::fs::write(ws.join(".git/x.tar"), "git").unwrap();
        std::fs::write(ws.join("src.rs"), "s").unwrap();
        std::os::unix::fs::symlink("a.tar", ws.join("dist/link.tar")).unwrap();
        let got: Vec<String> = collect(&ws, &matcher(&["dist"]), MAX_FILES)
            .unwrap()
            .into_iter()
            .map(|(p, _)| p.to_string())
            .collect();
        assert_eq!(got, ["dist/a.tar", "dist/link.tar", "dist/sub/b.tar"]);

        std::fs::write(tmp.path().join("secret"), "s3cret").unwrap();
        std::os::unix::fs::symlink(tmp.path().join("secret"), ws.join("dist/leak.tar")).unwrap();
        let e = collect(&ws, &matcher(&["dist/*.tar"]), MAX_FILES).unwrap_err();
        assert!(
            e.contains("dist/leak.tar") && e.contains("outside the workspace"),
            "{e}"
        );
    }

    #[test]
    fn a_symlinked_directory_on_the_way_is_found() {
        let tmp = tempfile::tempdir().unwrap();
        let ws = tmp.path().join("ws");
        std::fs::create_dir_all(&ws).unwrap();
        std::os::unix::fs::symlink(tmp.path(), ws.join("out")).unwrap();
        assert_eq!(
            symlink_on_the_way(&ws, &ws.join("out/x/y.bin")),
            Some(ws.join("out"))
        );
        assert_eq!(symlink_on_the_way(&ws, &ws.join("dist/y.bin")), None);
    }
}
