//! The server's services as roles: each is `run(backends, options, shutdown)`, where the
//! backends are what it reads and writes (opened by the caller), the options what it is told,
//! and `shutdown` a token that ends it cleanly. `tributary serve X` (`serve.rs`) runs one role
//! on the backends its flags name; `tributary up` (`server.rs`) runs every role in one process
//! on the embedded backends of a data directory. What they share is here: the signal, the
//! listener, the scheduler's configuration (`--lease-ttl` checked once), the server key and the
//! admin token.

pub mod api;
pub mod autoscaler;
pub mod metering;
pub mod projector;
pub mod scheduler;

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tributary_eventlog::EventLog;
use tributary_proto::events::{envelope::Payload, Envelope, TenantCreated, TokenIssued};

/// The tenant the admin token belongs to (and the default for its own projects).
pub const DEFAULT_TENANT: &str = "default";

/// SIGINT and SIGTERM, caught from the moment this is made (not from the first wait).
struct Signals {
    interrupt: Option<tokio::signal::unix::Signal>,
    terminate: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        Signals {
            interrupt: signal(SignalKind::interrupt()).ok(),
            terminate: signal(SignalKind::terminate()).ok(),
        }
    }

    async fn recv(mut self) {
        async fn one(signal: Option<&mut tokio::signal::unix::Signal>) {
            match signal {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        }
        tokio::select! {
            () = one(self.interrupt.as_mut()) => {}
            () = one(self.terminate.as_mut()) => {}
        }
    }
}

/// Resolves at the next SIGINT or SIGTERM.
pub async fn wait_for_signal() {
    Signals::new().recv().await;
}

/// A token cancelled at the first SIGINT or SIGTERM from now on: the `shutdown` of a role
/// run alone (`tributary serve X`).
pub fn shutdown_on_signal() -> CancellationToken {
    let shutdown = CancellationToken::new();
    let cancel = shutdown.clone();
    let signals = Signals::new();
    tokio::spawn(async move {
        signals.recv().await;
        cancel.cancel();
    });
    shutdown
}

/// The listener of the API's one port (gRPC, HTTP, web UI).
pub async fn bind(listen: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}; pick another --listen ADDR"))
}

/// The key that seals secrets at rest: 32 random bytes in `path` (0600), made on first start.
pub fn load_or_create_key(
    path: &std::path::Path,
) -> anyhow::Result<tributary_api::seal::ServerKey> {
    if let Ok(bytes) = std::fs::read(path) {
        let key: [u8; 32] = bytes.try_into().map_err(|_| {
            anyhow::anyhow!(
                "{} is not a 32-byte key; restore it from backup",
                path.display()
            )
        })?;
        return Ok(tributary_api::seal::ServerKey::new(key));
    }
    let key = tributary_api::seal::ServerKey::generate();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(key.bytes())?;
    file.sync_all()?;
    Ok(key)
}

/// The token in `path`, or a new one written there (mode 0600).
pub fn read_or_create_token(path: &Path) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_owned()),
        Ok(_) => anyhow::bail!("{} is empty: put the admin token in it", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    let (token, _) = tributary_api::auth::new_token();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    writeln!(file, "{token}")?;
    file.sync_all()?;
    println!("admin token written to {} (mode 0600)", path.display());
    Ok(token)
}

/// First start: the default tenant and an admin token, whose sha256 goes on the log and whose
/// text goes to `path` (readable by the owner only).
pub async fn create_admin_token(log: &dyn EventLog, path: &std::path::Path) -> anyhow::Result<()> {
    let (token, sha256) = tributary_api::auth::new_token();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    register_admin_token(log, &sha256, true).await?;
    writeln!(file, "{token}")?;
    file.sync_all()?;
    Ok(())
}

/// Puts the admin token's sha256 (and, first, the default tenant) on the log.
pub async fn register_admin_token(
    log: &dyn EventLog,
    sha256: &str,
    with_tenant: bool,
) -> anyhow::Result<()> {
    let mut events = Vec::new();
    if with_tenant {
        events.push(Envelope::new(
            DEFAULT_TENANT,
            "",
            "",
            Payload::TenantCreated(TenantCreated {
                name: DEFAULT_TENANT.into(),
            }),
        ));
    }
    events.push(Envelope::new(
        DEFAULT_TENANT,
        "",
        "",
        Payload::TokenIssued(TokenIssued {
            token_id: tributary_proto::new_id(),
            tenant: DEFAULT_TENANT.into(),
            kind: "admin".into(),
            name: "admin".into(),
            sha256: sha256.to_owned(),
        }),
    ));
    log.append(&events).await?;
    Ok(())
}
