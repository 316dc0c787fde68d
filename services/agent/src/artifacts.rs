//! An attempt's artifacts: the ones of the jobs it needs are downloaded into its workspace
//! (sha256-verified) before it runs; its own (the job's `artifacts` patterns) are uploaded after
//! it succeeded, each recorded by an ArtifactUploaded event.
//!
//! Paths are normalised ([`ArtifactPath`]); a symbolic link that leaves the workspace is never
//! uploaded and never written through on download.

use std::path::{Component, Path, PathBuf};

use tributary_objects::{keys, ArtifactPath, Objects, Stored};
use tributary_pipeline::artifacts::Matcher;
use tributary_proto::events::ArtifactUploaded;

use crate::attempt::BuildRef;

/// Most files one job may upload.
const MAX_FILES: usize = 10_000;

/// Downloads `inputs` into `workdir`, each verified against its recorded size and sha256.
/// Returns how many bytes were written.
pub(crate) async fn download(
    objects: &Objects,
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
        objects
            .get_verified(&a.object_key, &expected, &dest)
            .await
            .map_err(|e| format!("artifact {path} of job {:?}: {e}", a.job))?;
        tracing::debug!(path = %path, job = %a.job, size = a.size, "artifact downloaded");
        bytes += a.size;
    }
    Ok(bytes)
}

/// Uploads the files of `workdir` that `patterns` match. Refuses (and uploads nothing) when a
/// matched symbolic link leads outside the workspace.
pub(crate) async fn upload(
    objects: &Objects,
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
        let key = keys::artifact(&build.tenant, &build.project, &build.build_id, job, &path)
            .map_err(|e| e.to_string())?;
        let stored = objects
            .put_file(&key, &file)
            .await
            .map_err(|e| format!("cannot upload artifact {path}: {e}"))?;
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
