//! Images built from the repository (`image: {build: PATH, context: DIR}`), pinned by content.
//!
//! Before such a job runs, the agent reads the build context from the job's workspace
//! ([`context::read`]: the files git would commit, `.dockerignore` honoured) and computes its
//! key ([`key::image_key`]: sha256 over the files' paths, modes and contents and over the
//! Dockerfile). The image is tagged [`key::tag`] `localhost/tributary/<tenant>/<project>:<key>`
//! on the agent's engine: present, it is reused; missing, it is built through the Docker Engine
//! API from a tar of the context ([`context::BuildContext::tar`]). Builds of one key in one
//! process run once at a time ([`lock`]), so concurrent jobs of the same key build it once.
//! After a build, images of the project beyond the newest `--image-keep` keys are removed
//! ([`prune::beyond_newest`]).
//!
//! Everything here but [`context::read`] and [`lock`] is pure.

pub mod context;
pub mod dockerfile;
pub mod ignore;
pub mod key;
pub mod prune;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

/// Labels every built image carries (prune lists a project's images by them).
pub const LABEL_TENANT: &str = "tributary.tenant";
pub const LABEL_PROJECT: &str = "tributary.project";
pub const LABEL_KEY: &str = "tributary.image-key";
/// When the build started, µs since the epoch (engines list creation times in seconds only,
/// too coarse to order builds of one second).
pub const LABEL_BUILT_US: &str = "tributary.built-us";

/// Holds the build of one image (engine address + tag) in this process: a second job of the
/// same key waits for the first one's build, then finds the image and reuses it.
pub async fn lock(engine: &str, tag: &str) -> tokio::sync::OwnedMutexGuard<()> {
    static BUILDS: Mutex<Option<HashMap<String, Weak<tokio::sync::Mutex<()>>>>> = Mutex::new(None);
    let id = format!("{engine}\n{tag}");
    let lock = {
        let mut map = BUILDS.lock().unwrap_or_else(|e| e.into_inner());
        let map = map.get_or_insert_with(HashMap::new);
        map.retain(|_, weak| weak.strong_count() > 0);
        match map.get(&id).and_then(Weak::upgrade) {
            Some(lock) => lock,
            None => {
                let lock = Arc::new(tokio::sync::Mutex::new(()));
                map.insert(id, Arc::downgrade(&lock));
                lock
            }
        }
    };
    lock.lock_owned().await
}
