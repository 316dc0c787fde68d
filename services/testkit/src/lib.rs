//! Fixtures the integration tests share: the real engines `scripts/setup-brokers.sh` starts.
//!
//! * [`kafka_brokers`]: the test broker's address (`TRIBUTARY_TEST_KAFKA`, default
//!   127.0.0.1:19092), checked to answer; [`kafka_options`]: options for topics of a test's own
//!   on it; [`tenant_with_admin_token`]: the events of a tenant and its admin token.
//! * [`TestDatabase`] (a guard: dropped with the test, passed or failed), or [`fresh_database`] /
//!   [`drop_database`]: a PostgreSQL database of a test's own, made through
//!   `TRIBUTARY_TEST_DATABASE_URL` (default the `tributary_test` database on 127.0.0.1:5432).
//! * [`kubeconfig`]: the kubeconfig of the test Kubernetes API server of
//!   `scripts/setup-kube.sh` (`TRIBUTARY_TEST_KUBECONFIG`).
//! * [`s3`]: the test S3 server (MinIO) of `scripts/setup-s3.sh`, fresh buckets on it, and the
//!   `AWS_*` environment for a child process.
//!
//! * [`SmallFs`]: a tmpfs of a few MB of a test's own (a disk that fills on demand), unmounted
//!   on drop; needs root (`require!(SmallFs)`).
//! * [`engines`]: [`require!`] at the top of a test that needs an engine: without it the test is
//!   skipped visibly (a line on stderr, and the one-line summary at the end of `cargo test`), or
//!   fails when `TRIBUTARY_REQUIRE_ENGINES=1` (`scripts/test.sh`, CI).
//!
//! Past [`require!`], a missing engine fails the test with a message naming the script that
//! starts it: tests never skip silently. A dev-dependency only.

mod s3;
pub mod smallfs;

pub use s3::{s3, TestS3};
pub use smallfs::SmallFs;

use std::path::PathBuf;
use std::time::Duration;

pub mod engines;
pub use engines::{engine_or_skip, Engine};

use sqlx::{AnyConnection, Connection, Executor};
use tributary_eventlog::kafka::KafkaOptions;
use tributary_proto::events::{envelope::Payload, Envelope, TenantCreated, TokenIssued};

/// The test broker's bootstrap servers; panics naming the script that starts one if nothing
/// listens there.
pub fn kafka_brokers() -> String {
    let brokers = kafka_address();
    let first = brokers.split(',').next().unwrap_or_default().to_owned();
    let reachable = std::net::ToSocketAddrs::to_socket_addrs(&first)
        .ok()
        .and_then(|mut addrs| addrs.next())
        .is_some_and(|addr| {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)).is_ok()
        });
    assert!(
        reachable,
        "no Kafka broker at {brokers}: run scripts/setup-brokers.sh (it starts one on \
         127.0.0.1:19092), or set TRIBUTARY_TEST_KAFKA to a reachable broker"
    );
    brokers
}

/// Where the test broker should be: `TRIBUTARY_TEST_KAFKA`, default 127.0.0.1:19092.
pub fn kafka_address() -> String {
    std::env::var("TRIBUTARY_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

/// Options for a `KafkaLog` on the test broker with topics of its own (prefix
/// `test-<name>-<fresh id>`, replication 1): `event_partitions` events and `log_partitions` logs
/// partitions (0: log chunks go to the events topic).
pub fn kafka_options(name: &str, event_partitions: u32, log_partitions: u32) -> KafkaOptions {
    let mut options = KafkaOptions::new(kafka_brokers());
    options.topic_prefix = format!("test-{name}-{}", tributary_proto::new_id());
    options.event_partitions = event_partitions;
    options.log_partitions = log_partitions;
    options.replication_factor = 1;
    options
}

/// The events that make `tenant` and give it an admin token whose sha256 (hex) is
/// `token_sha256` (from `tributary_api::auth::new_token`), as `tributary up` does on first start:
/// for tests that assemble the services on a log of their own.
pub fn tenant_with_admin_token(tenant: &str, token_sha256: String) -> Vec<Envelope> {
    let event = |payload| Envelope::new(tenant, "", "", payload);
    vec![
        event(Payload::TenantCreated(TenantCreated {
            name: tenant.into(),
        })),
        event(Payload::TokenIssued(TokenIssued {
            token_id: tributary_proto::new_id(),
            tenant: tenant.into(),
            kind: "admin".into(),
            name: "admin".into(),
            sha256: token_sha256,
        })),
    ]
}

/// The URL of the database test databases are made from (its role needs CREATEDB).
pub fn postgres_admin_url() -> String {
    std::env::var("TRIBUTARY_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://tributary:tributary@127.0.0.1:5432/tributary_test".into())
}

/// A fresh PostgreSQL database: `(url, name)`. Drop it with [`drop_database`], or use
/// [`TestDatabase`], a guard that drops it.
pub async fn fresh_database() -> (String, String) {
    sqlx::any::install_default_drivers();
    let admin = postgres_admin_url();
    let mut conn = AnyConnection::connect(&admin)
        .await
        .unwrap_or_else(|error| {
            panic!(
                "no PostgreSQL at {admin} ({error}): run scripts/setup-brokers.sh (it starts one \
                 on 127.0.0.1:5432 with that database), or set TRIBUTARY_TEST_DATABASE_URL"
            )
        });
    let name = format!("test_{}", tributary_proto::new_id().replace('-', ""));
    conn.execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .expect("create a test database (the role needs CREATEDB)");
    let _ = conn.close().await;
    let base = admin
        .rsplit_once('/')
        .map_or(admin.as_str(), |(base, _)| base);
    (format!("{base}/{name}"), name)
}

/// A PostgreSQL database of a test's own (see [`fresh_database`]), dropped when the guard is
/// dropped: when the test ends, whether it passed or panicked.
#[derive(Debug)]
pub struct TestDatabase {
    /// Its URL, for a store or a `--database` flag.
    pub url: String,
    pub name: String,
}

impl TestDatabase {
    /// A fresh database (panics naming the script that starts PostgreSQL if there is none).
    pub async fn create() -> TestDatabase {
        let (url, name) = fresh_database().await;
        TestDatabase { url, name }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Drop may run inside a runtime (an async test): the cleanup gets a thread and a
        // runtime of its own.
        let name = self.name.clone();
        let dropped =
            std::thread::spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(async {
                        let _ = tokio::time::timeout(Duration::from_secs(30), drop_database(&name))
                            .await;
                    }),
                    Err(e) => eprintln!("warning: cannot drop the test database {name}: {e}"),
                }
            });
        let _ = dropped.join();
    }
}

/// Drops a database made by [`fresh_database`], closing its connections. Cleanup only: a
/// failure is printed, not a test failure. Prefer [`TestDatabase`], which drops it even when
/// the test fails.
pub async fn drop_database(name: &str) {
    let dropped = async {
        let mut conn = AnyConnection::connect(&postgres_admin_url()).await?;
        conn.execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
            .await?;
        conn.close().await
    };
    if let Err(e) = dropped.await {
        eprintln!("warning: cannot drop the test database {name}: {e}");
    }
}

/// The kubeconfig of the test Kubernetes API server (`TRIBUTARY_TEST_KUBECONFIG`, default the
/// one `scripts/setup-kube.sh` writes); panics naming the script if it is missing.
pub fn kubeconfig() -> PathBuf {
    let path = kubeconfig_path();
    assert!(
        path.exists(),
        "no Kubernetes API server for the tests: {} is missing; run scripts/setup-kube.sh \
         (it builds and starts etcd + kube-apiserver on 127.0.0.1:16443) or set \
         TRIBUTARY_TEST_KUBECONFIG",
        path.display()
    );
    path
}

/// Where the test kubeconfig should be: `TRIBUTARY_TEST_KUBECONFIG`, default the one
/// `scripts/setup-kube.sh` writes.
pub fn kubeconfig_path() -> PathBuf {
    std::env::var_os("TRIBUTARY_TEST_KUBECONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/tributary-kube/kubeconfig"))
}
