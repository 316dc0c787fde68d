//! Artifact paths: what a job may name as a file it produced, and the one spelling it is stored
//! under.
//!
//! A path is relative to the job's workspace, `/`-separated. `.` components and repeated or
//! trailing slashes are dropped (`./dist//app.tar` is `dist/app.tar`); anything that could leave
//! the workspace or mean different files on different systems is refused with the reason:
//! `..`, absolute paths, backslashes, NUL and other control characters, and empty paths.
//! Symbolic links are the file system's business: see `collect` in the agent, which refuses
//! links that leave the workspace.

use std::fmt;

/// Longest artifact path accepted, in bytes.
pub const MAX_PATH_BYTES: usize = 1024;

/// A normalised, safe, relative artifact path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ArtifactPath(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("artifact path {path:?} is refused: {reason}")]
pub struct PathError {
    pub path: String,
    pub reason: &'static str,
}

impl ArtifactPath {
    pub fn parse(path: &str) -> Result<ArtifactPath, PathError> {
        let refuse = |reason| PathError {
            path: path.to_owned(),
            reason,
        };
        if path.len() > MAX_PATH_BYTES {
            return Err(refuse("it is longer than 1024 bytes"));
        }
        if path.starts_with('/') {
            return Err(refuse(
                "it is absolute; name files relative to the workspace",
            ));
        }
        if path.contains('\\') {
            return Err(refuse("it contains a backslash; use / between directories"));
        }
        if path.chars().any(char::is_control) {
            return Err(refuse("it contains a control character"));
        }
        let mut parts = Vec::new();
        for part in path.split('/') {
            match part {
                "" | "." => continue,
                ".." => return Err(refuse("it contains `..`, which could leave the workspace")),
                p => parts.push(p),
            }
        }
        if parts.is_empty() {
            return Err(refuse("it names no file"));
        }
        Ok(ArtifactPath(parts.join("/")))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ArtifactPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One component of an object key (a tenant, project, build or job id): refused when it could
/// change the key's structure.
pub fn key_component(what: &'static str, value: &str) -> Result<(), PathError> {
    let refuse = |reason| PathError {
        path: format!("{what} {value}"),
        reason,
    };
    if value.is_empty() || value == "." || value == ".." {
        return Err(refuse("it is empty or a relative directory name"));
    }
    if value.contains(['/', '\\']) || value.chars().any(char::is_control) {
        return Err(refuse("it contains a slash or a control character"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn normal_paths_are_normalised() {
        for (given, stored) in [
            ("dist/app.tar", "dist/app.tar"),
            ("./dist//app.tar", "dist/app.tar"),
            ("out/", "out"),
            ("a/./b", "a/b"),
            ("ünïcode/ファイル.txt", "ünïcode/ファイル.txt"),
            ("..hidden/x..y", "..hidden/x..y"),
        ] {
            assert_eq!(
                ArtifactPath::parse(given).unwrap().as_str(),
                stored,
                "{given}"
            );
        }
    }

    #[test]
    fn paths_that_could_escape_are_refused_with_the_reason() {
        for (given, reason) in [
            ("../secret", "`..`"),
            ("a/../../b", "`..`"),
            ("/etc/passwd", "absolute"),
            ("a\\..\\b", "backslash"),
            ("a\0b", "control"),
            ("", "names no file"),
            ("./", "names no file"),
        ] {
            let e = ArtifactPath::parse(given).unwrap_err();
            assert!(e.to_string().contains(reason), "{given:?}: {e}");
        }
        assert!(ArtifactPath::parse(&"a/".repeat(600)).is_err());
    }

    #[test]
    fn key_components_cannot_change_the_key() {
        assert!(key_component("job", "build-1").is_ok());
        for bad in ["", ".", "..", "a/b", "a\\b", "a\nb"] {
            assert!(key_component("job", bad).is_err(), "{bad:?}");
        }
    }

    proptest! {
        /// Whatever is accepted is relative, has no `.`/`..`/empty component, and is a fixed
        /// point of parsing.
        #[test]
        fn accepted_paths_stay_inside(path in "[a-z./\\\\]{0,24}") {
            if let Ok(p) = ArtifactPath::parse(&path) {
                let s = p.as_str();
                prop_assert!(!s.starts_with('/'));
                prop_assert!(s.split('/').all(|c| !c.is_empty() && c != "." && c != ".."));
                prop_assert_eq!(ArtifactPath::parse(s).unwrap(), p.clone());
            }
        }
    }
}
