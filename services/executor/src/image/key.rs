//! The key of an image built from the repository, and its tag. Pure.
//!
//! The key is the lower-case hex sha256 of a versioned description of the build's inputs: the
//! Dockerfile (its path in the context's tar and its bytes) and every file of the context after
//! `.dockerignore` (path, mode as git records it, sha256 of the content), sorted by path. Time
//! stamps, owners and the order files were read in never enter it, so the same context at any
//! commit, on any machine, has the same key. What the key cannot see: images the Dockerfile
//! names (`FROM` a moving tag) and what its `RUN` lines download.

use sha2::{Digest, Sha256};

/// A regular file, as git records it.
pub const MODE_FILE: u32 = 0o100644;
/// An executable file.
pub const MODE_EXECUTABLE: u32 = 0o100755;
/// A symbolic link (its content is the link's target).
pub const MODE_SYMLINK: u32 = 0o120000;

/// One file of a build context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextFile {
    /// Relative to the context directory, `/`-separated, normalised.
    pub path: String,
    /// [`MODE_FILE`], [`MODE_EXECUTABLE`] or [`MODE_SYMLINK`].
    pub mode: u32,
    /// The content (a symbolic link's target).
    pub data: Vec<u8>,
}

/// The key of a build: the Dockerfile at `dockerfile_path` (in the context's tar) with
/// `dockerfile` as content, over `files` (in any order).
pub fn image_key(dockerfile_path: &str, dockerfile: &[u8], files: &[ContextFile]) -> String {
    let mut sorted: Vec<&ContextFile> = files.iter().collect();
    sorted.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
    let mut h = Sha256::new();
    h.update(b"tributary-image-key/1\n");
    h.update(b"dockerfile\0");
    h.update(dockerfile_path.as_bytes());
    h.update(b"\0");
    h.update(hex::encode(Sha256::digest(dockerfile)).as_bytes());
    h.update(b"\n");
    for f in sorted {
        h.update(format!("{:o}\0", f.mode).as_bytes());
        h.update(f.path.as_bytes());
        h.update(b"\0");
        h.update(hex::encode(Sha256::digest(&f.data)).as_bytes());
        h.update(b"\n");
    }
    hex::encode(h.finalize())
}

/// `localhost/tributary/<tenant>/<project>`: where a project's built images live on an engine.
/// Each part is made a valid image name component (lower case `[a-z0-9]` runs separated by
/// `.`, `_` or `-`). `localhost/` keeps engines from looking for it in a registry; pushing
/// later means replacing that host.
pub fn repository(tenant: &str, project: &str) -> String {
    format!(
        "localhost/tributary/{}/{}",
        component(tenant),
        component(project)
    )
}

/// The image's full name: [`repository`]`:<key>`.
pub fn tag(tenant: &str, project: &str, key: &str) -> String {
    format!("{}:{key}", repository(tenant, project))
}

/// `name` as an image name component: lower case, other characters as `-`, runs of
/// separators as one, none at either end; `_` when nothing is left.
pub fn component(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.is_empty() && !out.ends_with(['-', '.', '_']) {
            out.push(if c == '.' || c == '_' { c } else { '-' });
        }
    }
    while out.ends_with(['-', '.', '_']) {
        out.pop();
    }
    if out.is_empty() {
        "_".to_owned()
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn file(path: &str, mode: u32, data: &str) -> ContextFile {
        ContextFile {
            path: path.into(),
            mode,
            data: data.as_bytes().to_vec(),
        }
    }

    fn context() -> Vec<ContextFile> {
        vec![
            file("Dockerfile", MODE_FILE, "FROM localhost/ci-busybox\n"),
            file("tools/install.sh", MODE_EXECUTABLE, "echo hi\n"),
            file("tools/link", MODE_SYMLINK, "install.sh"),
        ]
    }

    #[test]
    fn the_key_is_stable_across_versions() {
        // Keys name images on agents' engines: changing how they are computed rebuilds every
        // image. Change this value only together with the version string in the hash.
        let key = image_key("Dockerfile", b"FROM localhost/ci-busybox\n", &context());
        assert_eq!(key.len(), 64);
        assert_eq!(
            key, "ba92eaa981c6eb9ad2c54e12812fe5481145ae2f440d230e4e9da2e57f2e9d0b",
            "the key of a fixed context changed"
        );
    }

    #[test]
    fn every_input_counts() {
        let base = image_key("Dockerfile", b"FROM x\n", &context());
        assert_ne!(base, image_key("Dockerfile", b"FROM y\n", &context()));
        assert_ne!(base, image_key("ci/Dockerfile", b"FROM x\n", &context()));
        let mut changed = context();
        changed[1].data = b"echo ho\n".to_vec();
        assert_ne!(base, image_key("Dockerfile", b"FROM x\n", &changed));
        let mut mode = context();
        mode[1].mode = MODE_FILE;
        assert_ne!(base, image_key("Dockerfile", b"FROM x\n", &mode));
        let mut renamed = context();
        renamed[1].path = "tools/setup.sh".into();
        assert_ne!(base, image_key("Dockerfile", b"FROM x\n", &renamed));
        let mut fewer = context();
        fewer.pop();
        assert_ne!(base, image_key("Dockerfile", b"FROM x\n", &fewer));
        // Content moved between two files' boundaries is a different context too.
        let a = [file("a", MODE_FILE, "xy"), file("b", MODE_FILE, "z")];
        let b = [file("a", MODE_FILE, "x"), file("b", MODE_FILE, "yz")];
        assert_ne!(image_key("D", b"", &a), image_key("D", b"", &b));
    }

    proptest! {
        #[test]
        fn order_does_not_matter(seed in any::<u64>()) {
            let mut files = context();
            files.push(file("a", MODE_FILE, "1"));
            files.push(file("z/y", MODE_FILE, "2"));
            let key = image_key("Dockerfile", b"FROM x", &files);
            // A permutation from the seed.
            let mut s = seed;
            for i in (1..files.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                files.swap(i, (s >> 33) as usize % (i + 1));
            }
            prop_assert_eq!(key, image_key("Dockerfile", b"FROM x", &files));
        }

        #[test]
        fn components_are_valid(name in "\\PC{0,40}") {
            let c = component(&name);
            prop_assert!(!c.is_empty());
            prop_assert!(c.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c)));
            prop_assert!(c == "_" || (c.starts_with(|c: char| c.is_ascii_alphanumeric()) && c.ends_with(|c: char| c.is_ascii_alphanumeric())));
            prop_assert!(!c.contains("--") && !c.contains("..") && !c.contains("-.") && !c.contains(".-"));
        }
    }

    #[test]
    fn tags() {
        assert_eq!(
            tag("local", "tmp.AbC x", "k"),
            "localhost/tributary/local/tmp.abc-x:k"
        );
        assert_eq!(component("--My_Project--"), "my_project");
        assert_eq!(component("ü"), "_");
    }
}
