//! Where a service's log, read models and objects live: the flags every service shares.
//!
//! [`BackendArgs`] are the flags (`--kafka`, `--database`, `--objects`, `--data`, `--config`,
//! Kafka topic options), each also read from a `TRIBUTARY_*` environment variable and from a
//! TOML configuration file with the same keys. Precedence: flag > environment > file > default.
//! [`BackendArgs::resolve`] turns them into [`Backends`] (plain data; [`merge`] is the pure
//! part), whose `open_*` functions open the log, the builds store and the object storage.
//!
//! Defaults are the embedded ones, under the data directory (see [`crate::data_dir::default_dir`]): the SQLite log
//! `events.db`, the read models `readmodels.db`, objects in `objects/`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde::Deserialize;
use tributary_eventlog::kafka::{KafkaLog, KafkaOptions};
use tributary_eventlog::sqlite::SqliteLog;
use tributary_eventlog::EventLog;
use tributary_projections::BuildsStore;
use tributary_sqlstore::{redact, Engine};

/// The data directory [`merge`] puts when nothing names one; [`BackendArgs::resolve`] replaces
/// it with the per-repository default ([`crate::data_dir::default_dir`]), which falls back to it
/// without a home directory.
pub const DEFAULT_DATA: &str = ".tributary";

/// Where the log, the read models and the objects live. Shared by every service.
#[derive(Debug, Args, Clone, Default)]
#[command(next_help_heading = "Backends (flags > TRIBUTARY_* environment > --config file)")]
pub struct BackendArgs {
    /// Apache Kafka brokers (host:port[,host:port...]) holding the log, instead of the
    /// embedded SQLite log DIR/events.db.
    #[arg(long, value_name = "BROKERS", env = "TRIBUTARY_KAFKA")]
    pub kafka: Option<String>,
    /// The read-model database: sqlite://PATH or postgres://USER:PASSWORD@HOST:PORT/DB
    /// (default: sqlite DIR/readmodels.db).
    #[arg(long, value_name = "URL", env = "TRIBUTARY_DATABASE")]
    pub database: Option<String>,
    /// Object storage (logs, artifacts): a directory or s3://BUCKET/PREFIX (default:
    /// DIR/objects).
    #[arg(long, value_name = "URL", env = "TRIBUTARY_OBJECTS")]
    pub objects: Option<String>,
    /// Directory of the embedded backends (the defaults of the three above) [default: this
    /// repository's directory under $XDG_STATE_HOME/tributary or ~/.local/state/tributary].
    #[arg(long, value_name = "DIR", env = "TRIBUTARY_DATA")]
    pub data: Option<PathBuf>,
    /// A TOML file with the same keys, e.g.:
    ///   kafka = "kafka-1:9092,kafka-2:9092"
    ///   database = "postgres://tributary:secret@db:5432/tributary"
    ///   objects = "s3://ci-artifacts/tributary"
    ///   [kafka_topics]
    ///   prefix = "tributary"   # topics PREFIX.events and PREFIX.logs
    ///   event_partitions = 12  # used when Tributary creates the topics
    ///   log_partitions = 12    # 0: log chunks go to the events topic
    ///   replication_factor = 3
    #[arg(
        long,
        value_name = "FILE",
        env = "TRIBUTARY_CONFIG",
        verbatim_doc_comment
    )]
    pub config: Option<PathBuf>,
    /// Kafka topics are PREFIX.events and PREFIX.logs, consumer groups PREFIX.<group>
    /// [default: tributary].
    #[arg(long, value_name = "PREFIX", env = "TRIBUTARY_KAFKA_TOPIC_PREFIX")]
    pub kafka_topic_prefix: Option<String>,
    /// Partitions of the events topic when Tributary creates it [default: 12]. An existing
    /// topic keeps its own.
    #[arg(long, value_name = "N", env = "TRIBUTARY_KAFKA_EVENT_PARTITIONS")]
    pub kafka_event_partitions: Option<u32>,
    /// Partitions of the logs topic when Tributary creates it; 0: no logs topic, log chunks go
    /// to the events topic [default: 12].
    #[arg(long, value_name = "N", env = "TRIBUTARY_KAFKA_LOG_PARTITIONS")]
    pub kafka_log_partitions: Option<u32>,
    /// Replication factor of the topics Tributary creates [default: the broker's].
    #[arg(long, value_name = "N", env = "TRIBUTARY_KAFKA_REPLICATION")]
    pub kafka_replication: Option<i32>,
    /// Seconds after which a consumer-group member that died (without leaving) loses its
    /// partitions to the others [default: 10].
    #[arg(long, value_name = "SECS", env = "TRIBUTARY_KAFKA_SESSION_TIMEOUT")]
    pub kafka_session_timeout: Option<u64>,
}

/// The `--config` file: the same keys as the flags.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub kafka: Option<String>,
    pub database: Option<String>,
    pub objects: Option<String>,
    pub data: Option<PathBuf>,
    #[serde(default)]
    pub kafka_topics: KafkaTopics,
}

/// `[kafka_topics]` of the configuration file.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KafkaTopics {
    pub prefix: Option<String>,
    pub event_partitions: Option<u32>,
    pub log_partitions: Option<u32>,
    pub replication_factor: Option<i32>,
    pub session_timeout_secs: Option<u64>,
}

/// Where everything lives, resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct Backends {
    pub data: PathBuf,
    /// Kafka options when the log is on Kafka.
    pub kafka: Option<KafkaSettings>,
    pub database: Option<String>,
    pub objects: Option<String>,
}

/// The Kafka part of [`Backends`].
#[derive(Clone, Debug, PartialEq)]
pub struct KafkaSettings {
    pub brokers: String,
    pub prefix: String,
    pub event_partitions: u32,
    pub log_partitions: u32,
    pub replication_factor: i32,
    pub session_timeout: Duration,
}

/// Flags (already merged with the environment by clap) over the file, over the defaults. Pure.
pub fn merge(args: &BackendArgs, file: ConfigFile) -> Backends {
    let topics = file.kafka_topics;
    let kafka = args.kafka.clone().or(file.kafka).map(|brokers| {
        let defaults = KafkaOptions::new(brokers.clone());
        KafkaSettings {
            brokers,
            prefix: args
                .kafka_topic_prefix
                .clone()
                .or(topics.prefix)
                .unwrap_or(defaults.topic_prefix),
            event_partitions: args
                .kafka_event_partitions
                .or(topics.event_partitions)
                .unwrap_or(defaults.event_partitions),
            log_partitions: args
                .kafka_log_partitions
                .or(topics.log_partitions)
                .unwrap_or(defaults.log_partitions),
            replication_factor: args
                .kafka_replication
                .or(topics.replication_factor)
                .unwrap_or(defaults.replication_factor),
            session_timeout: args
                .kafka_session_timeout
                .or(topics.session_timeout_secs)
                .map_or(defaults.session_timeout, Duration::from_secs),
        }
    });
    Backends {
        data: args
            .data
            .clone()
            .or(file.data)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA)),
        kafka,
        database: args.database.clone().or(file.database),
        objects: args.objects.clone().or(file.objects),
    }
}

/// Reads and parses the configuration file; errors say which file and where.
pub fn read_config(path: &Path) -> anyhow::Result<ConfigFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the configuration file {}", path.display()))?;
    toml::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{}: {e}\nThe keys are those of the flags: kafka, database, objects, data and \
             [kafka_topics] prefix, event_partitions, log_partitions, replication_factor, \
             session_timeout_secs (see --help).",
            path.display()
        )
    })
}

impl BackendArgs {
    /// Merges the flags with the `--config` file (if any) and the defaults.
    pub fn resolve(&self) -> anyhow::Result<Backends> {
        let file = match &self.config {
            Some(path) => read_config(path)?,
            None => ConfigFile::default(),
        };
        let named = self.data.is_some() || file.data.is_some();
        let mut backends = merge(self, file);
        if !named {
            // Not part of the pure merge: it asks git and the environment.
            backends.data = crate::data_dir::default_dir();
        }
        Ok(backends)
    }
}

impl Backends {
    /// The Kafka options of a Kafka-backed log.
    pub fn kafka_options(&self) -> Option<KafkaOptions> {
        self.kafka.as_ref().map(|k| {
            let mut options = KafkaOptions::new(k.brokers.clone());
            options.topic_prefix = k.prefix.clone();
            options.event_partitions = k.event_partitions;
            options.log_partitions = k.log_partitions;
            options.replication_factor = k.replication_factor;
            options.session_timeout = k.session_timeout;
            options
        })
    }

    fn ensure_data(&self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.data)
            .with_context(|| format!("cannot create data directory {}", self.data.display()))
    }

    /// The data directory's writer lock ([`crate::dir_lock`]) when this process keeps the log or
    /// a read model there (no `--kafka` or no `--database`); `None` when both are elsewhere.
    pub fn lock_data(&self) -> anyhow::Result<Option<crate::dir_lock::DirLock>> {
        if self.kafka.is_some() && self.database.is_some() {
            return Ok(None);
        }
        crate::dir_lock::lock(&self.data).map(Some)
    }

    /// Opens the log: Kafka (creating or configuring its topics) or DIR/events.db.
    pub async fn open_log(&self) -> anyhow::Result<Arc<dyn EventLog>> {
        if let Some(options) = self.kafka_options() {
            let brokers = options.brokers.clone();
            let log = KafkaLog::connect(options)
                .await
                .with_context(|| format!("cannot open the event log on Kafka at {brokers}"))?;
            return Ok(Arc::new(log));
        }
        self.ensure_data()?;
        let path = self.data.join("events.db");
        let log = SqliteLog::open(&path)
            .await
            .with_context(|| format!("cannot open the event log {}", path.display()))?;
        Ok(Arc::new(log))
    }

    /// Opens the builds read model: `--database` or DIR/readmodels.db.
    pub async fn open_store(&self) -> anyhow::Result<BuildsStore> {
        match &self.database {
            Some(url) => BuildsStore::connect(url)
                .await
                .with_context(|| format!("cannot open the read-model database {}", redact(url))),
            None => {
                self.ensure_data()?;
                let path = self.data.join("readmodels.db");
                BuildsStore::open(&path)
                    .await
                    .with_context(|| format!("cannot open the read models {}", path.display()))
            }
        }
    }

    /// Opens the metering read model: the `metering` schema of a PostgreSQL `--database`, or
    /// DIR/metering.db (also when `--database` is a SQLite file: metering keeps its own).
    pub async fn open_metering(&self) -> anyhow::Result<tributary_metering::MeteringStore> {
        match &self.database {
            Some(url) if Engine::of_url(url) != Some(Engine::Sqlite) => {
                tributary_metering::MeteringStore::connect(url)
                    .await
                    .with_context(|| format!("cannot open the metering tables in {}", redact(url)))
            }
            _ => {
                self.ensure_data()?;
                let path = self.data.join("metering.db");
                tributary_metering::MeteringStore::open(&path)
                    .await
                    .with_context(|| {
                        format!("cannot open the metering database {}", path.display())
                    })
            }
        }
    }

    /// Where the metering read model is, for messages.
    pub fn metering_location(&self) -> String {
        match &self.database {
            Some(url) if Engine::of_url(url) != Some(Engine::Sqlite) => {
                format!("schema metering of {}", redact(url))
            }
            _ => self.data.join("metering.db").display().to_string(),
        }
    }

    /// Opens the object storage: `--objects` or DIR/objects.
    // For `serve api` and the agents' uploads (next steps); tested below.
    #[allow(dead_code)]
    pub fn open_objects(&self) -> anyhow::Result<tributary_objects::Objects> {
        match &self.objects {
            Some(url) => tributary_objects::Objects::open(url)
                .with_context(|| format!("cannot open the object storage {url}")),
            None => Ok(tributary_objects::Objects::local(
                &self.data.join("objects"),
            )?),
        }
    }

    /// Where the log is, for messages.
    pub fn log_location(&self) -> String {
        match &self.kafka {
            Some(k) => format!("Kafka {} (topics {}.*)", k.brokers, k.prefix),
            None => self.data.join("events.db").display().to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let file: ConfigFile = toml::from_str(
            "kafka = \"file:9092\"\ndatabase = \"postgres://u:p@db/x\"\n\
             [kafka_topics]\nprefix = \"ci\"\nevent_partitions = 4\n",
        )
        .expect("parse");
        let args = BackendArgs {
            kafka_event_partitions: Some(8),
            objects: Some("s3://bucket/p".into()),
            ..BackendArgs::default()
        };
        let b = merge(&args, file);
        let kafka = b.kafka.expect("kafka from the file");
        assert_eq!(kafka.brokers, "file:9092");
        assert_eq!(kafka.prefix, "ci");
        assert_eq!(kafka.event_partitions, 8, "the flag wins");
        assert_eq!(kafka.log_partitions, 12, "the default");
        assert_eq!(b.database.as_deref(), Some("postgres://u:p@db/x"));
        assert_eq!(b.objects.as_deref(), Some("s3://bucket/p"));
        assert_eq!(b.data, PathBuf::from(DEFAULT_DATA));
    }

    #[test]
    fn no_flags_no_file_is_the_embedded_default() {
        let b = merge(&BackendArgs::default(), ConfigFile::default());
        assert_eq!(b.kafka, None);
        assert_eq!(b.database, None);
        assert_eq!(b.data, PathBuf::from(".tributary"));
    }

    #[test]
    fn a_bad_file_names_itself_and_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.toml");
        std::fs::write(&path, "kafka = \"k:1\"\ndatabse = \"x\"\n").expect("write");
        let error = read_config(&path).expect_err("unknown key").to_string();
        assert!(error.contains("t.toml"), "{error}");
        assert!(error.contains("databse"), "{error}");
        assert!(error.contains("line 2"), "{error}");
    }

    #[tokio::test]
    async fn opens_the_embedded_defaults_under_the_data_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let args = BackendArgs {
            data: Some(dir.path().join("d")),
            ..BackendArgs::default()
        };
        let backends = args.resolve().expect("resolve");
        let log = backends.open_log().await.expect("log");
        assert_eq!(log.layout().partitions(), 1);
        let store = backends.open_store().await.expect("store");
        assert_eq!(store.next_offset().await.expect("offset"), 0);
        backends.open_objects().expect("objects");
        assert!(dir.path().join("d/events.db").exists());
        assert!(dir.path().join("d/readmodels.db").exists());
    }
}
