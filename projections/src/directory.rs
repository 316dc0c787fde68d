//! The directory read model: tenants, API tokens and projects.
//!
//! Small and read on every API call, so it lives in memory and is rebuilt from the log at
//! start (a pure fold like every read model). Tokens are known only by their sha256: the log
//! never holds a usable secret.

use std::collections::BTreeMap;

use tributary_proto::events::{envelope::Payload, Envelope};

/// What a token allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    /// Everything, every tenant: creates tenants and tokens, lists and revokes agents.
    Admin,
    /// The API, within its tenant.
    User,
    /// Registers agents (for its tenant, or shared agents when issued by the admin tenant).
    Enrollment,
    /// An agent's own identity.
    Agent,
}

impl TokenKind {
    pub fn parse(s: &str) -> Option<TokenKind> {
        Some(match s {
            "admin" => TokenKind::Admin,
            "user" => TokenKind::User,
            "enrollment" => TokenKind::Enrollment,
            "agent" => TokenKind::Agent,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            TokenKind::Admin => "admin",
            TokenKind::User => "user",
            TokenKind::Enrollment => "enrollment",
            TokenKind::Agent => "agent",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Token {
    pub id: String,
    pub tenant: String,
    pub kind: TokenKind,
    pub name: String,
    pub revoked: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Project {
    pub tenant: String,
    pub name: String,
    pub repository: String,
    pub sealed_webhook_secret: Vec<u8>,
    pub max_concurrent_jobs: u32,
    /// Its repository was set with the admin token (`ProjectCreated.by_admin`).
    pub by_admin: bool,
}

/// A project's secret: only its sealed value (the server key opens it).
#[derive(Clone, Debug, PartialEq)]
pub struct Secret {
    pub sealed_value: Vec<u8>,
    /// When it was last set (the event's time) and by whom.
    pub set_us: i64,
    pub who: String,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Directory {
    pub tenants: BTreeMap<String, ()>,
    /// By sha256 (lower-case hex) of the token.
    pub tokens: BTreeMap<String, Token>,
    /// By (tenant, name).
    pub projects: BTreeMap<(String, String), Project>,
    /// By (tenant, project, name).
    pub secrets: BTreeMap<(String, String, String), Secret>,
}

impl Directory {
    /// The fold. Pure; a second creation of the same tenant/project/token changes nothing.
    pub fn apply(&mut self, env: &Envelope) {
        let Some(payload) = &env.payload else { return };
        match payload {
            Payload::TenantCreated(e) => {
                self.tenants.entry(e.name.clone()).or_insert(());
            }
            Payload::TokenIssued(e) => {
                let Some(kind) = TokenKind::parse(&e.kind) else {
                    return;
                };
                if self.tokens.values().any(|t| t.id == e.token_id) {
                    return;
                }
                self.tokens.entry(e.sha256.clone()).or_insert(Token {
                    id: e.token_id.clone(),
                    tenant: e.tenant.clone(),
                    kind,
                    name: e.name.clone(),
                    revoked: false,
                });
            }
            Payload::TokenRevoked(e) => {
                for token in self.tokens.values_mut().filter(|t| t.id == e.token_id) {
                    token.revoked = true;
                }
            }
            Payload::ProjectCreated(e) => {
                self.projects
                    .entry((e.tenant.clone(), e.name.clone()))
                    .or_insert(Project {
                        tenant: e.tenant.clone(),
                        name: e.name.clone(),
                        repository: e.repository.clone(),
                        sealed_webhook_secret: e.sealed_webhook_secret.clone(),
                        max_concurrent_jobs: e.max_concurrent_jobs,
                        by_admin: e.by_admin,
                    });
            }
            Payload::ProjectRepositoryChanged(e) => {
                if let Some(p) = self.projects.get_mut(&(e.tenant.clone(), e.name.clone())) {
                    p.repository = e.repository.clone();
                    p.by_admin = e.by_admin;
                }
            }
            Payload::SecretSet(e) => {
                self.secrets.insert(
                    (e.tenant.clone(), e.project.clone(), e.name.clone()),
                    Secret {
                        sealed_value: e.sealed_value.clone(),
                        set_us: env.time_us,
                        who: e.who.clone(),
                    },
                );
            }
            Payload::SecretDeleted(e) => {
                self.secrets
                    .remove(&(e.tenant.clone(), e.project.clone(), e.name.clone()));
            }
            Payload::AgentRevoked(e) => {
                // An agent's token dies with the agent (its name is the agent id).
                for token in self
                    .tokens
                    .values_mut()
                    .filter(|t| t.kind == TokenKind::Agent && t.name == e.agent_id)
                {
                    token.revoked = true;
                }
            }
            _ => {}
        }
    }

    /// The live token with this sha256.
    pub fn token(&self, sha256: &str) -> Option<&Token> {
        self.tokens.get(sha256).filter(|t| !t.revoked)
    }

    pub fn project(&self, tenant: &str, name: &str) -> Option<&Project> {
        self.projects.get(&(tenant.to_owned(), name.to_owned()))
    }

    /// The secrets of a project, by name.
    pub fn secrets_of<'a>(
        &'a self,
        tenant: &'a str,
        project: &'a str,
    ) -> impl Iterator<Item = (&'a str, &'a Secret)> + 'a {
        self.secrets
            .iter()
            .filter(move |((t, p, _), _)| t == tenant && p == project)
            .map(|((_, _, name), s)| (name.as_str(), s))
    }

    pub fn secret(&self, tenant: &str, project: &str, name: &str) -> Option<&Secret> {
        self.secrets
            .get(&(tenant.to_owned(), project.to_owned(), name.to_owned()))
    }

    pub fn projects_of<'a>(&'a self, tenant: &'a str) -> impl Iterator<Item = &'a Project> + 'a {
        self.projects.values().filter(move |p| p.tenant == tenant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tributary_proto::events::*;

    fn env(payload: envelope::Payload) -> Envelope {
        Envelope {
            payload: Some(payload),
            ..Envelope::default()
        }
    }

    #[test]
    fn tokens_projects_and_revocation() {
        let mut d = Directory::default();
        d.apply(&env(envelope::Payload::TenantCreated(TenantCreated {
            name: "acme".into(),
        })));
        d.apply(&env(envelope::Payload::TokenIssued(TokenIssued {
            token_id: "t1".into(),
            tenant: "acme".into(),
            kind: "user".into(),
            name: "ci".into(),
            sha256: "aa".into(),
        })));
        // A token of an unknown kind (newer schema) is ignored, not misread.
        d.apply(&env(envelope::Payload::TokenIssued(TokenIssued {
            token_id: "t2".into(),
            kind: "superuser".into(),
            sha256: "bb".into(),
            ..TokenIssued::default()
        })));
        d.apply(&env(envelope::Payload::ProjectCreated(ProjectCreated {
            tenant: "acme".into(),
            name: "web".into(),
            repository: "/repo".into(),
            ..ProjectCreated::default()
        })));
        assert_eq!(d.token("aa").map(|t| t.kind), Some(TokenKind::User));
        assert!(d.token("bb").is_none());
        assert_eq!(d.projects_of("acme").count(), 1);
        assert_eq!(d.projects_of("other").count(), 0);
        assert!(!d.project("acme", "web").unwrap().by_admin);
        // A repository change replaces the repository (and who set it) only.
        let change = |tenant: &str| {
            env(envelope::Payload::ProjectRepositoryChanged(
                ProjectRepositoryChanged {
                    tenant: tenant.into(),
                    name: "web".into(),
                    repository: "https://example.com/web.git".into(),
                    by_admin: true,
                    ..ProjectRepositoryChanged::default()
                },
            ))
        };
        d.apply(&change("other"));
        assert_eq!(d.projects_of("other").count(), 0);
        d.apply(&change("acme"));
        let web = d.project("acme", "web").unwrap();
        assert_eq!(web.repository, "https://example.com/web.git");
        assert!(web.by_admin);
        d.apply(&env(envelope::Payload::TokenRevoked(TokenRevoked {
            token_id: "t1".into(),
        })));
        assert!(d.token("aa").is_none());
    }

    #[test]
    fn secrets_are_set_replaced_and_deleted_per_tenant_and_project() {
        let mut d = Directory::default();
        let set = |tenant: &str, value: &[u8], time_us| Envelope {
            time_us,
            ..env(envelope::Payload::SecretSet(SecretSet {
                tenant: tenant.into(),
                project: "web".into(),
                name: "TOKEN".into(),
                sealed_value: value.to_vec(),
                who: "ci".into(),
            }))
        };
        d.apply(&set("acme", b"v1", 1));
        d.apply(&set("other", b"o1", 2));
        d.apply(&set("acme", b"v2", 3));
        let s = d.secret("acme", "web", "TOKEN").cloned();
        assert_eq!(
            s.map(|s| (s.sealed_value, s.set_us)),
            Some((b"v2".to_vec(), 3))
        );
        assert_eq!(d.secrets_of("acme", "web").count(), 1);
        assert_eq!(d.secrets_of("acme", "api").count(), 0);
        d.apply(&env(envelope::Payload::SecretDeleted(SecretDeleted {
            tenant: "acme".into(),
            project: "web".into(),
            name: "TOKEN".into(),
            who: "ci".into(),
        })));
        assert!(d.secret("acme", "web", "TOKEN").is_none());
        assert!(d.secret("other", "web", "TOKEN").is_some());
    }
}
