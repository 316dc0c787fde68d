//! Built images on the engine: look one up, build one from a context's tar, list a project's,
//! remove one. Decisions (the key, what to prune) are in [`crate::image`].

use std::collections::HashMap;

use bollard::errors::Error as ApiError;
use bollard::models::BuildInfo;
use bollard::query_parameters::{BuildImageOptions, ListImagesOptions, RemoveImageOptions};
use futures::Stream;

use super::Engine;
use crate::image::prune::LocalImage;
use crate::image::{LABEL_BUILT_US, LABEL_KEY, LABEL_PROJECT, LABEL_TENANT};

/// An image present on the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundImage {
    pub id: String,
    pub bytes: u64,
}

impl Engine {
    /// The image called `name`, if the engine has it.
    pub async fn find_image(&self, name: &str) -> Result<Option<FoundImage>, String> {
        match self.docker.inspect_image(name).await {
            Ok(image) => Ok(Some(FoundImage {
                id: image.id.unwrap_or_default(),
                bytes: image.size.map_or(0, |s| u64::try_from(s).unwrap_or(0)),
            })),
            Err(ApiError::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(e) => Err(format!(
                "cannot inspect image {name} on {}: {e}",
                self.address
            )),
        }
    }

    /// Builds `tag` from `tar` (an uncompressed tar of the context) with the Dockerfile at
    /// `dockerfile` in it, labelled with `labels`. The builder's messages, as the engine sends
    /// them; a message with `error` set is the build's failure.
    pub fn build_image(
        &self,
        tar: Vec<u8>,
        dockerfile: &str,
        tag: &str,
        labels: HashMap<String, String>,
    ) -> impl Stream<Item = Result<BuildInfo, ApiError>> + '_ {
        let options = BuildImageOptions {
            dockerfile: dockerfile.to_owned(),
            t: Some(tag.to_owned()),
            rm: true,
            forcerm: true,
            labels: Some(labels),
            ..BuildImageOptions::default()
        };
        self.docker
            .build_image(options, None, Some(bollard::body_full(tar.into())))
    }

    /// The images built for `tenant`'s `project` (by their labels), one entry per tag.
    pub async fn project_images(
        &self,
        tenant: &str,
        project: &str,
    ) -> Result<Vec<LocalImage>, String> {
        // One label in the filter: Podman 4.3 answers nothing for two. The tenant is checked
        // below.
        let filters = HashMap::from([(
            "label".to_owned(),
            vec![format!("{LABEL_PROJECT}={project}")],
        )]);
        let options = ListImagesOptions {
            filters: Some(filters),
            ..ListImagesOptions::default()
        };
        let list = self
            .docker
            .list_images(Some(options))
            .await
            .map_err(|e| format!("cannot list the images of project {project}: {e}"))?;
        let mut out = Vec::new();
        for image in list {
            // The engine may match a label filter loosely: check them again.
            if image.labels.get(LABEL_TENANT).map(String::as_str) != Some(tenant)
                || image.labels.get(LABEL_PROJECT).map(String::as_str) != Some(project)
            {
                continue;
            }
            let Some(key) = image.labels.get(LABEL_KEY) else {
                continue;
            };
            for tag in &image.repo_tags {
                if tag.ends_with(&format!(":{key}")) {
                    out.push(LocalImage {
                        tag: tag.clone(),
                        key: key.clone(),
                        id: image.id.clone(),
                        created: image
                            .labels
                            .get(LABEL_BUILT_US)
                            .and_then(|us| us.parse().ok())
                            .unwrap_or(image.created.saturating_mul(1_000_000)),
                        bytes: u64::try_from(image.size).unwrap_or(0),
                    });
                }
            }
        }
        Ok(out)
    }

    /// Removes the image called `name` (not forced: an image a container still uses stays,
    /// and that is an error).
    pub async fn remove_image(&self, name: &str) -> Result<(), String> {
        let options = RemoveImageOptions {
            force: false,
            noprune: false,
            ..RemoveImageOptions::default()
        };
        match self.docker.remove_image(name, Some(options), None).await {
            Ok(_)
            | Err(ApiError::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            Err(e) => Err(format!("cannot remove image {name}: {e}")),
        }
    }
}
