//! Per-project secrets: set, list (names and when, never values) and delete, for user tokens
//! of the project's tenant.
//!
//! A value is sealed with the server key ([`crate::seal`]) before it is appended: the log only
//! ever holds `SecretSet.sealed_value`. The directory fold keeps the sealed value; it is opened
//! only by [`for_job`], into the lease of a job of the same project that names it, which
//! travels on the agent's authenticated work stream. Agents set it as an environment variable
//! and mask it (`***`) in every event they send.

use tonic::{Request, Response, Status};
use tributary_executor::mask::{Secrets as Masks, MIN_SECRET_LEN};
use tributary_projections::directory::Directory;
use tributary_proto::api::{secrets_server::Secrets, *};
use tributary_proto::events::{envelope::Payload, EnvVar, SecretDeleted, SecretSet};

use crate::auth::authenticate;
use crate::seal::ServerKey;
use crate::state::{directory_event, ApiState};

/// Largest secret value.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

/// Why a secret cannot be stored as given; the message says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretProblem {
    #[error(
        "invalid secret name {0:?}: a secret becomes an environment variable, so its name starts \
         with a letter or `_` and has only letters, digits and `_` (e.g. DEPLOY_TOKEN)"
    )]
    Name(String),
    #[error("the value of {0} is empty; pipe the value on standard input")]
    Empty(String),
    #[error("the value of {0} is larger than {MAX_VALUE_BYTES} bytes; store a file's path or a key to it instead")]
    TooLarge(String),
    #[error("the value of {0} is not UTF-8 text or contains a NUL byte; base64-encode it and decode it in the job")]
    NotText(String),
    #[error(
        "the value of {0} is too short to be masked in logs: a secret (or one of its lines) must \
         be at least {MIN_SECRET_LEN} bytes long, or it would mask every short word of every log"
    )]
    TooShort(String),
}

/// Checks a secret before it is sealed. Pure.
pub fn check(name: &str, value: &[u8]) -> Result<(), SecretProblem> {
    if !tributary_pipeline::valid_env_name(name) || name.len() > 128 {
        return Err(SecretProblem::Name(name.to_owned()));
    }
    if value.is_empty() {
        return Err(SecretProblem::Empty(name.to_owned()));
    }
    if value.len() > MAX_VALUE_BYTES {
        return Err(SecretProblem::TooLarge(name.to_owned()));
    }
    if std::str::from_utf8(value).is_err() || value.contains(&0) {
        return Err(SecretProblem::NotText(name.to_owned()));
    }
    if !Masks::maskable(value) {
        return Err(SecretProblem::TooShort(name.to_owned()));
    }
    Ok(())
}

/// The secrets a job of `tenant`/`project` names, opened with `key`: (found, missing names).
/// A secret that the key cannot open (sealed by another server key) counts as missing. Pure.
pub fn for_job(
    directory: &Directory,
    key: Option<&ServerKey>,
    tenant: &str,
    project: &str,
    names: &[String],
) -> (Vec<EnvVar>, Vec<String>) {
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for name in names {
        let opened = directory
            .secret(tenant, project, name)
            .and_then(|s| key?.open(&s.sealed_value))
            .and_then(|v| String::from_utf8(v).ok());
        match opened {
            Some(value) => found.push(EnvVar {
                name: name.clone(),
                value,
            }),
            None => missing.push(name.clone()),
        }
    }
    (found, missing)
}

pub struct SecretsApi {
    state: ApiState,
}

impl SecretsApi {
    pub fn new(state: ApiState) -> Self {
        SecretsApi { state }
    }

    /// The caller's tenant, if the project exists in it (another tenant's project is NOT_FOUND,
    /// exactly like a project that does not exist).
    fn tenant_of<T>(
        &self,
        request: &Request<T>,
        project: &str,
    ) -> Result<(String, String), Status> {
        let who = self.state.directory(|d| authenticate(d, request))??;
        who.require_user()?;
        let exists = self
            .state
            .directory(|d| d.project(&who.tenant, project).is_some())?;
        if !exists {
            return Err(Status::not_found(format!(
                "no project {project}; `tributary project add {project} --repo PATH_OR_URL` \
                 creates it"
            )));
        }
        Ok((who.tenant, who.name))
    }
}

fn info(project: &str, name: &str, s: &tributary_projections::directory::Secret) -> SecretInfo {
    SecretInfo {
        project: project.to_owned(),
        name: name.to_owned(),
        set_us: s.set_us,
        who: s.who.clone(),
    }
}

#[tonic::async_trait]
impl Secrets for SecretsApi {
    async fn set_secret(
        &self,
        request: Request<SetSecretRequest>,
    ) -> Result<Response<SecretInfo>, Status> {
        let (tenant, who) = self.tenant_of(&request, &request.get_ref().project)?;
        let req = request.into_inner();
        check(&req.name, &req.value).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let key = self.state.server_key.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "this server has no key to seal secrets with; start it with `tributary up`, \
                 which creates one in its data directory",
            )
        })?;
        let set = SecretSet {
            tenant: tenant.clone(),
            project: req.project.clone(),
            name: req.name.clone(),
            sealed_value: key.seal(&req.value),
            who,
        };
        let events = [directory_event(&tenant, Payload::SecretSet(set))];
        let offsets = self.state.append(&events).await?;
        self.state
            .wait_directory(&self.state.mark_after(&events, &offsets))
            .await?;
        tracing::info!(tenant = %tenant, project = %req.project, name = %req.name, "secret set");
        let stored = self.state.directory(|d| {
            d.secret(&tenant, &req.project, &req.name)
                .map(|s| info(&req.project, &req.name, s))
        })?;
        stored
            .map(Response::new)
            .ok_or_else(|| Status::internal("the secret vanished"))
    }

    async fn list_secrets(
        &self,
        request: Request<ListSecretsRequest>,
    ) -> Result<Response<ListSecretsResponse>, Status> {
        let (tenant, _) = self.tenant_of(&request, &request.get_ref().project)?;
        let project = request.into_inner().project;
        let secrets = self.state.directory(|d| {
            d.secrets_of(&tenant, &project)
                .map(|(name, s)| info(&project, name, s))
                .collect()
        })?;
        Ok(Response::new(ListSecretsResponse { secrets }))
    }

    async fn delete_secret(
        &self,
        request: Request<DeleteSecretRequest>,
    ) -> Result<Response<DeleteSecretResponse>, Status> {
        let (tenant, who) = self.tenant_of(&request, &request.get_ref().project)?;
        let req = request.into_inner();
        let exists = self
            .state
            .directory(|d| d.secret(&tenant, &req.project, &req.name).is_some())?;
        if !exists {
            return Err(Status::not_found(format!(
                "project {} has no secret {}; `tributary secret list {}` shows its secrets",
                req.project, req.name, req.project
            )));
        }
        let deleted = SecretDeleted {
            tenant: tenant.clone(),
            project: req.project.clone(),
            name: req.name.clone(),
            who,
        };
        let events = [directory_event(&tenant, Payload::SecretDeleted(deleted))];
        let offsets = self.state.append(&events).await?;
        self.state
            .wait_directory(&self.state.mark_after(&events, &offsets))
            .await?;
        tracing::info!(tenant = %tenant, project = %req.project, name = %req.name, "secret deleted");
        Ok(Response::new(DeleteSecretResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tributary_proto::events::{envelope, Envelope};

    #[test]
    fn check_names_and_values() {
        assert_eq!(check("DEPLOY_TOKEN", b"hunter22"), Ok(()));
        assert!(matches!(
            check("1X", b"hunter22"),
            Err(SecretProblem::Name(_))
        ));
        assert!(matches!(
            check("A-B", b"hunter22"),
            Err(SecretProblem::Name(_))
        ));
        assert!(matches!(check("X", b""), Err(SecretProblem::Empty(_))));
        assert!(matches!(
            check("X", b"abc"),
            Err(SecretProblem::TooShort(_))
        ));
        assert!(matches!(
            check("X", b"a\x00bcd"),
            Err(SecretProblem::NotText(_))
        ));
        assert!(matches!(
            check("X", &[0xff; 8]),
            Err(SecretProblem::NotText(_))
        ));
        let big = vec![b'a'; MAX_VALUE_BYTES + 1];
        assert!(matches!(check("X", &big), Err(SecretProblem::TooLarge(_))));
        // A multi-line value is fine when some line can be masked.
        assert_eq!(
            check("KEY", b"-----BEGIN KEY-----\nab\n-----END KEY-----\n"),
            Ok(())
        );
    }

    #[test]
    fn a_job_gets_only_its_projects_secrets_and_the_missing_names() {
        let key = ServerKey::generate();
        let mut d = Directory::default();
        let set =
            |tenant: &str, project: &str, name: &str, value: &[u8], key: &ServerKey| Envelope {
                payload: Some(envelope::Payload::SecretSet(SecretSet {
                    tenant: tenant.into(),
                    project: project.into(),
                    name: name.into(),
                    sealed_value: key.seal(value),
                    who: "ci".into(),
                })),
                ..Envelope::default()
            };
        d.apply(&set("acme", "web", "TOKEN", b"acme-web-token", &key));
        d.apply(&set("acme", "api", "OTHER", b"acme-api-other", &key));
        d.apply(&set("evil", "web", "STOLEN", b"evil-web-stolen", &key));
        d.apply(&set(
            "acme",
            "web",
            "OLD_KEY",
            b"sealed-elsewhere",
            &ServerKey::generate(),
        ));
        let names: Vec<String> = ["TOKEN", "OTHER", "STOLEN", "OLD_KEY"]
            .map(String::from)
            .to_vec();
        let (found, missing) = for_job(&d, Some(&key), "acme", "web", &names);
        assert_eq!(
            found,
            [EnvVar {
                name: "TOKEN".into(),
                value: "acme-web-token".into()
            }]
        );
        assert_eq!(missing, ["OTHER", "STOLEN", "OLD_KEY"]);
        let (found, missing) = for_job(&d, None, "acme", "web", &names[..1]);
        assert!(found.is_empty());
        assert_eq!(missing, ["TOKEN"]);
    }
}
