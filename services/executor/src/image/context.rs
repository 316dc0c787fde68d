//! A build's context: read from the job's workspace, keyed, and made into the tar the engine
//! builds from.
//!
//! Which files: in a git work tree (a checkout, or a local run's working tree), those git
//! would commit — tracked files and untracked ones it does not ignore — so `target/` and
//! other ignored leftovers never reach the key, and a local run of a clean tree has the key a
//! server build of its commit has; elsewhere every file. `.git` is never part of it. Then the
//! context's `.dockerignore`. Modes are git's (`100644`, `100755`, `120000` for a symbolic
//! link, whose target is its content); directories are not recorded (git has none).

use std::path::Path;

use super::ignore::DockerIgnore;
use super::key::{self, ContextFile, MODE_EXECUTABLE, MODE_FILE, MODE_SYMLINK};
use tributary_proto::events::ImageBuild;

/// Largest context read into memory (files after `.dockerignore`, plus the Dockerfile).
pub const MAX_CONTEXT_BYTES: u64 = 1 << 30;

/// Name of the Dockerfile in the tar when it lives outside the context.
pub const OUTSIDE_DOCKERFILE: &str = ".tributary.Dockerfile";

/// Everything an image build needs: what to build, from which files, and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildContext {
    pub spec: ImageBuild,
    /// The context's files after `.dockerignore`, sorted by path; the Dockerfile is among them
    /// when it lives in the context.
    pub files: Vec<ContextFile>,
    /// The Dockerfile's path in the tar.
    pub dockerfile_path: String,
    pub dockerfile: Vec<u8>,
    /// [`key::image_key`] of the above.
    pub key: String,
}

impl BuildContext {
    /// The context from `files` (all of the context directory's files, relative to it) and the
    /// Dockerfile: `.dockerignore` applied (the Dockerfile always stays), key computed. Pure.
    pub fn new(
        spec: ImageBuild,
        files: Vec<ContextFile>,
        dockerfile: Vec<u8>,
    ) -> Result<BuildContext, String> {
        let ignore = match files.iter().find(|f| f.path == ".dockerignore") {
            Some(f) => DockerIgnore::parse(&String::from_utf8_lossy(&f.data))
                .map_err(|e| format!("{}: {e}", join(&spec.context, ".dockerignore")))?,
            None => DockerIgnore::default(),
        };
        let dockerfile_path = inside(&spec.context, &spec.dockerfile)
            .unwrap_or_else(|| OUTSIDE_DOCKERFILE.to_owned());
        let mut files: Vec<ContextFile> = files
            .into_iter()
            .filter(|f| f.path == dockerfile_path || !ignore.excludes(&f.path))
            .collect();
        if !files.iter().any(|f| f.path == dockerfile_path) {
            files.push(ContextFile {
                path: dockerfile_path.clone(),
                mode: MODE_FILE,
                data: dockerfile.clone(),
            });
        }
        files.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
        let key = key::image_key(&dockerfile_path, &dockerfile, &files);
        Ok(BuildContext {
            spec,
            files,
            dockerfile_path,
            dockerfile,
            key,
        })
    }

    /// Bytes of the context's files.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.data.len() as u64).sum()
    }

    /// The context as an uncompressed tar: the same bytes for the same key (sorted, time 0,
    /// owner root, git's modes), parent directories before their files.
    pub fn tar(&self) -> std::io::Result<Vec<u8>> {
        let mut out = tar::Builder::new(Vec::new());
        out.mode(tar::HeaderMode::Deterministic);
        let mut dirs = std::collections::BTreeSet::new();
        for f in &self.files {
            let mut parent = String::new();
            let parts: Vec<&str> = f.path.split('/').collect();
            for part in &parts[..parts.len() - 1] {
                if !parent.is_empty() {
                    parent.push('/');
                }
                parent.push_str(part);
                if dirs.insert(parent.clone()) {
                    let mut h = tar::Header::new_gnu();
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    h.set_size(0);
                    h.set_mtime(0);
                    out.append_data(&mut h, format!("{parent}/"), std::io::empty())?;
                }
            }
            let mut h = tar::Header::new_gnu();
            h.set_mtime(0);
            if f.mode == MODE_SYMLINK {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                let target = String::from_utf8_lossy(&f.data).into_owned();
                out.append_link(&mut h, &f.path, target)?;
            } else {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(if f.mode == MODE_EXECUTABLE {
                    0o755
                } else {
                    0o644
                });
                h.set_size(f.data.len() as u64);
                out.append_data(&mut h, &f.path, f.data.as_slice())?;
            }
        }
        out.into_inner()
    }
}

/// Reads the build context of `spec` from `workspace` (the repository's root in the job's
/// workspace). Blocking file and git work: call it on a blocking thread. Errors are sentences
/// for the job's log.
pub fn read(workspace: &Path, spec: &ImageBuild) -> Result<BuildContext, String> {
    let context_dir = workspace.join(&spec.context);
    let dockerfile_file = workspace.join(&spec.dockerfile);
    let dockerfile = match std::fs::read(&dockerfile_file) {
        Ok(data) => data,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!(
                "the Dockerfile {} is not in the repository at this commit; add it, or fix \
                 `image: {{build: ...}}` in the pipeline",
                spec.dockerfile
            ))
        }
        Err(e) => {
            return Err(format!(
                "cannot read the Dockerfile {}: {e}",
                spec.dockerfile
            ))
        }
    };
    if !context_dir.is_dir() {
        return Err(format!(
            "the build context {} is not a directory of the repository at this commit; fix \
             `context:` (or leave it out to use the Dockerfile's directory)",
            spec.context
        ));
    }
    let paths = match git_files(&context_dir) {
        Some(paths) => paths,
        None => walk(&context_dir)?,
    };
    let mut files = Vec::with_capacity(paths.len());
    let mut total = dockerfile.len() as u64;
    for path in paths {
        if path.split('/').any(|c| c == ".git") {
            continue;
        }
        let Some(file) = read_file(&context_dir, &path)? else {
            continue;
        };
        total += file.data.len() as u64;
        if total > MAX_CONTEXT_BYTES {
            return Err(format!(
                "the build context {} holds more than {} MiB; choose a smaller `context:` or \
                 leave files out with a .dockerignore",
                spec.context,
                MAX_CONTEXT_BYTES >> 20
            ));
        }
        files.push(file);
    }
    BuildContext::new(spec.clone(), files, dockerfile)
}

/// One file of the context (`None`: gone, or neither a file nor a symbolic link).
fn read_file(dir: &Path, path: &str) -> Result<Option<ContextFile>, String> {
    use std::os::unix::fs::PermissionsExt;
    let full = dir.join(path);
    let meta = match std::fs::symlink_metadata(&full) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", full.display())),
    };
    let unreadable = |e: std::io::Error| format!("cannot read {}: {e}", full.display());
    let (mode, data) = if meta.file_type().is_symlink() {
        let target = std::fs::read_link(&full).map_err(unreadable)?;
        (
            MODE_SYMLINK,
            target.to_string_lossy().into_owned().into_bytes(),
        )
    } else if meta.is_file() {
        let mode = if meta.permissions().mode() & 0o111 != 0 {
            MODE_EXECUTABLE
        } else {
            MODE_FILE
        };
        (mode, std::fs::read(&full).map_err(unreadable)?)
    } else {
        return Ok(None);
    };
    Ok(Some(ContextFile {
        path: path.to_owned(),
        mode,
        data,
    }))
}

/// Files under `dir` git would commit (tracked, and untracked but not ignored), relative to
/// `dir`; `None` when `dir` is not in a git work tree.
fn git_files(dir: &Path) -> Option<Vec<String>> {
    let out = std::process::Command::new("git")
        .args([
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
            "--",
            ".",
        ])
        .current_dir(dir)
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let mut paths: Vec<String> = out
        .stdout
        .split(|b| *b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    paths.sort();
    paths.dedup();
    Some(paths)
}

/// Every file and symbolic link under `dir` (not following links), relative to it.
fn walk(dir: &Path) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut pending = vec![String::new()];
    while let Some(rel) = pending.pop() {
        let here = if rel.is_empty() {
            dir.to_path_buf()
        } else {
            dir.join(&rel)
        };
        let entries =
            std::fs::read_dir(&here).map_err(|e| format!("cannot list {}: {e}", here.display()))?;
        for entry in entries {
            let entry = entry.map_err(|e| format!("cannot list {}: {e}", here.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == ".git" {
                continue;
            }
            let path = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            match entry.file_type() {
                Ok(t) if t.is_dir() => pending.push(path),
                Ok(_) => out.push(path),
                Err(e) => return Err(format!("cannot read {path}: {e}")),
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The Dockerfile's path relative to the context, if it is inside it.
fn inside(context: &str, dockerfile: &str) -> Option<String> {
    if context == "." {
        return Some(dockerfile.to_owned());
    }
    dockerfile
        .strip_prefix(context)
        .and_then(|rest| rest.strip_prefix('/'))
        .map(str::to_owned)
}

fn join(dir: &str, name: &str) -> String {
    if dir == "." {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dockerfile: &str, context: &str) -> ImageBuild {
        ImageBuild {
            dockerfile: dockerfile.into(),
            context: context.into(),
        }
    }

    fn file(path: &str, data: &str) -> ContextFile {
        ContextFile {
            path: path.into(),
            mode: MODE_FILE,
            data: data.into(),
        }
    }

    fn paths(c: &BuildContext) -> Vec<&str> {
        c.files.iter().map(|f| f.path.as_str()).collect()
    }

    #[test]
    fn dockerignore_is_honoured_but_the_dockerfile_stays() {
        let files = vec![
            file("Dockerfile", "FROM x"),
            file(".dockerignore", "*\n!tools\n"),
            file("tools/a.sh", "a"),
            file("notes.txt", "n"),
        ];
        let c = BuildContext::new(
            spec("ci/Dockerfile", "ci"),
            files.clone(),
            b"FROM x".to_vec(),
        )
        .unwrap();
        assert_eq!(paths(&c), ["Dockerfile", "tools/a.sh"]);
        assert_eq!(c.dockerfile_path, "Dockerfile");
        // An ignored file changing does not change the key; a kept one does.
        let mut other = files.clone();
        other[3].data = b"changed".to_vec();
        let c2 = BuildContext::new(spec("ci/Dockerfile", "ci"), other, b"FROM x".to_vec()).unwrap();
        assert_eq!(c.key, c2.key);
        let mut other = files;
        other[2].data = b"changed".to_vec();
        let c3 = BuildContext::new(spec("ci/Dockerfile", "ci"), other, b"FROM x".to_vec()).unwrap();
        assert_ne!(c.key, c3.key);
    }

    #[test]
    fn a_dockerfile_outside_the_context_is_added() {
        let c = BuildContext::new(
            spec("docker/Dockerfile", "app"),
            vec![file("main.sh", "m")],
            b"FROM y".to_vec(),
        )
        .unwrap();
        assert_eq!(paths(&c), [OUTSIDE_DOCKERFILE, "main.sh"]);
        assert_eq!(c.dockerfile_path, OUTSIDE_DOCKERFILE);
        let c = BuildContext::new(spec("Dockerfile", "."), vec![], b"FROM y".to_vec()).unwrap();
        assert_eq!(c.dockerfile_path, "Dockerfile");
    }

    #[test]
    fn the_tar_is_deterministic_and_complete() {
        let files = vec![
            file("a/b/c.txt", "c"),
            file("Dockerfile", "FROM x"),
            ContextFile {
                path: "a/run.sh".into(),
                mode: MODE_EXECUTABLE,
                data: b"#!/bin/sh\n".to_vec(),
            },
            ContextFile {
                path: "a/link".into(),
                mode: MODE_SYMLINK,
                data: b"run.sh".to_vec(),
            },
        ];
        let c = BuildContext::new(spec("Dockerfile", "."), files, b"FROM x".to_vec()).unwrap();
        let tar = c.tar().unwrap();
        assert_eq!(tar, c.tar().unwrap());
        let mut archive = tar::Archive::new(tar.as_slice());
        let entries: Vec<(String, u32, tar::EntryType)> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (
                    e.path().unwrap().to_string_lossy().into_owned(),
                    h.mode().unwrap(),
                    h.entry_type(),
                )
            })
            .collect();
        assert_eq!(
            entries,
            [
                ("Dockerfile".into(), 0o644, tar::EntryType::Regular),
                ("a/".into(), 0o755, tar::EntryType::Directory),
                ("a/b/".into(), 0o755, tar::EntryType::Directory),
                ("a/b/c.txt".into(), 0o644, tar::EntryType::Regular),
                ("a/link".into(), 0o777, tar::EntryType::Symlink),
                ("a/run.sh".into(), 0o755, tar::EntryType::Regular),
            ]
        );
    }

    #[test]
    fn read_takes_what_git_would_commit() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let git = |args: &[&str]| {
            let ok = std::process::Command::new("git")
                .args(["-c", "user.email=a@b", "-c", "user.name=b"])
                .args(args)
                .current_dir(root)
                .output()
                .unwrap()
                .status
                .success();
            assert!(ok, "git {args:?}");
        };
        std::fs::create_dir_all(root.join("ci/target")).unwrap();
        std::fs::write(root.join("ci/Dockerfile"), "FROM x\n").unwrap();
        std::fs::write(root.join("ci/tool.sh"), "echo\n").unwrap();
        std::fs::write(root.join("ci/target/junk"), "ignored by git\n").unwrap();
        std::fs::write(root.join(".gitignore"), "target/\n").unwrap();
        git(&["init", "-q", "."]);
        git(&["add", "-A"]);
        git(&["commit", "-qm", "one"]);
        let spec = spec("ci/Dockerfile", "ci");
        let committed = read(root, &spec).unwrap();
        assert_eq!(paths(&committed), ["Dockerfile", "tool.sh"]);
        // Untracked, not ignored: part of the working tree's context (and its key).
        std::fs::write(root.join("ci/new.sh"), "new\n").unwrap();
        let untracked = read(root, &spec).unwrap();
        assert_eq!(paths(&untracked), ["Dockerfile", "new.sh", "tool.sh"]);
        assert_ne!(committed.key, untracked.key);
        std::fs::remove_file(root.join("ci/new.sh")).unwrap();
        // Outside git: every file, the same key for the same files.
        std::fs::remove_dir_all(root.join(".git")).unwrap();
        std::fs::remove_dir_all(root.join("ci/target")).unwrap();
        assert_eq!(read(root, &spec).unwrap().key, committed.key);
        let missing = read(root, &self::spec("ci/Nope", "ci")).unwrap_err();
        assert!(
            missing.contains("the Dockerfile ci/Nope is not in the repository"),
            "{missing}"
        );
    }
}
