//! Where each kind of object lives in the store. Every component is validated, so a key's
//! structure cannot be changed by an id or a path.

use crate::path::{key_component, ArtifactPath, PathError};

/// `artifacts/<tenant>/<project>/<build>/<job>/<path>`.
pub fn artifact(
    tenant: &str,
    project: &str,
    build: &str,
    job: &str,
    path: &ArtifactPath,
) -> Result<String, PathError> {
    key_component("tenant", tenant)?;
    key_component("project", project)?;
    key_component("build", build)?;
    key_component("job", job)?;
    Ok(format!("artifacts/{tenant}/{project}/{build}/{job}/{path}"))
}

/// `caches/<tenant>/<project>/<sha256 of the cache key>/<save>.tar`: the user's key may hold
/// any character, so it is hashed; every save of a key is an object of its own (`save`, a
/// fresh id), never written again, so a restore reads exactly the archive the index names
/// even while another job saves the same key.
pub fn cache(
    tenant: &str,
    project: &str,
    cache_key: &str,
    save: &str,
) -> Result<String, PathError> {
    use sha2::{Digest, Sha256};
    key_component("tenant", tenant)?;
    key_component("project", project)?;
    key_component("save", save)?;
    let digest = hex::encode(Sha256::digest(cache_key.as_bytes()));
    Ok(format!("caches/{tenant}/{project}/{digest}/{save}.tar"))
}

/// The prefix of every cache of a project (for its size limit).
pub fn caches_of(tenant: &str, project: &str) -> Result<String, PathError> {
    key_component("tenant", tenant)?;
    key_component("project", project)?;
    Ok(format!("caches/{tenant}/{project}/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_laid_out_by_tenant_and_refuse_slashes() {
        let p = ArtifactPath::parse("dist/app.tar").unwrap();
        assert_eq!(
            artifact("acme", "web", "b1", "build", &p).unwrap(),
            "artifacts/acme/web/b1/build/dist/app.tar"
        );
        assert!(artifact("acme/../other", "web", "b1", "build", &p).is_err());
        assert!(artifact("acme", "web", "b1", "..", &p).is_err());
        let key = "cargo-${{ hashFiles('Cargo.lock') }}/../x";
        let c = cache("acme", "web", key, "s1").unwrap();
        assert!(
            c.starts_with("caches/acme/web/") && c.ends_with("/s1.tar"),
            "{c}"
        );
        assert_eq!(c.matches('/').count(), 4);
        // Two saves of one key are two objects.
        assert_ne!(c, cache("acme", "web", key, "s2").unwrap());
        assert!(cache("acme", "web", key, "../s").is_err());
    }
}
