//! The agent's identity (`agent_id` and its own token), kept in `WORKDIR/agent.json` so a
//! restarted agent is the same agent.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::AgentError;

/// File name of the identity inside the agent's work directory.
pub const IDENTITY_FILE: &str = "agent.json";

/// Who this agent is to the server.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub agent_id: String,
    /// Bearer token for every call after Register.
    pub agent_token: String,
    /// The server it registered with (informational).
    #[serde(default)]
    pub server: String,
    /// The name it registered under (informational).
    #[serde(default)]
    pub name: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("agent_id", &self.agent_id)
            .field("agent_token", &"***")
            .field("server", &self.server)
            .field("name", &self.name)
            .finish()
    }
}

/// Where the identity of the agent working in `workdir` is stored.
pub fn identity_path(workdir: &Path) -> PathBuf {
    workdir.join(IDENTITY_FILE)
}

impl Identity {
    /// The stored identity, or `None` when there is no file yet.
    pub fn load(workdir: &Path) -> Result<Option<Identity>, AgentError> {
        let path = identity_path(workdir);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(AgentError::io(format!("cannot read {}", path.display()), e)),
        };
        let identity: Identity = serde_json::from_str(&text).map_err(|e| {
            AgentError::Config(format!(
                "{} is not a valid agent identity ({e}); delete it and register again with an \
                 enrollment token",
                path.display()
            ))
        })?;
        if identity.agent_id.is_empty() || identity.agent_token.is_empty() {
            return Err(AgentError::Config(format!(
                "{} has no agent_id or agent_token; delete it and register again with an \
                 enrollment token",
                path.display()
            )));
        }
        Ok(Some(identity))
    }

    /// Writes the identity to `workdir/agent.json`, readable by the owner only (mode 0600), by
    /// writing a temporary file and renaming it over the old one.
    pub fn save(&self, workdir: &Path) -> Result<(), AgentError> {
        std::fs::create_dir_all(workdir)
            .map_err(|e| AgentError::io(format!("cannot create {}", workdir.display()), e))?;
        let path = identity_path(workdir);
        let tmp = workdir.join(format!("{IDENTITY_FILE}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            // The mode given to open is masked by the umask; make sure.
            file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
            file.write_all(text.as_bytes())?;
            file.write_all(b"\n")?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            if let Ok(dir) = std::fs::File::open(workdir) {
                let _ = dir.sync_all();
            }
            Ok(())
        };
        write().map_err(|e| AgentError::io(format!("cannot write {}", path.display()), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Identity {
        Identity {
            agent_id: "a-1".into(),
            agent_token: "secret".into(),
            server: "http://127.0.0.1:7700".into(),
            name: "box".into(),
        }
    }

    #[test]
    fn save_then_load_round_trips_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let workdir = dir.path().join("agent");
        assert_eq!(Identity::load(&workdir).unwrap(), None);
        sample().save(&workdir).unwrap();
        assert_eq!(Identity::load(&workdir).unwrap(), Some(sample()));
        let mode = std::fs::metadata(identity_path(&workdir))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!workdir.join("agent.json.tmp").exists());

        // Saving again replaces it and keeps it private.
        let other = Identity {
            agent_id: "a-2".into(),
            ..sample()
        };
        other.save(&workdir).unwrap();
        assert_eq!(Identity::load(&workdir).unwrap(), Some(other));
        let mode = std::fs::metadata(identity_path(&workdir))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn broken_files_are_reported_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(identity_path(dir.path()), "{not json").unwrap();
        let err = Identity::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("delete it"), "{err}");
        std::fs::write(
            identity_path(dir.path()),
            r#"{"agent_id":"","agent_token":""}"#,
        )
        .unwrap();
        let err = Identity::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("no agent_id"), "{err}");
    }

    #[test]
    fn debug_output_hides_the_token() {
        let text = format!("{:?}", sample());
        assert!(!text.contains("secret"), "{text}");
        assert!(text.contains("a-1"));
    }

    #[test]
    fn older_files_without_optional_fields_load() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            identity_path(dir.path()),
            r#"{"agent_id":"a","agent_token":"t"}"#,
        )
        .unwrap();
        let id = Identity::load(dir.path()).unwrap().unwrap();
        assert_eq!((id.agent_id.as_str(), id.agent_token.as_str()), ("a", "t"));
    }
}
