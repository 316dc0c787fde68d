//! Where each build starts on the log, so that readers of one build (tails, the web UI's live
//! log, `authorize_on_log`, leases, artifact lists) read from there and not from a partition's
//! beginning: Kafka has no index by key, and a scan from offset 0 costs the whole partition.
//!
//! [`BuildStarts`] is a pure fold of the events partitions' records: per build, the offset of
//! its first record in its events partition (its `BuildTriggered`), its tenant, and where its
//! chunks start in its logs partition at the earliest (`BuildTriggered.logs_from`, the logs
//! partition's end when the build was triggered). Only a key's first record is decoded, so the
//! fold costs a hash lookup per record. [`Starts`] keeps it following the log.
//!
//! It also knows, per build, the offset of the last record it has seen (a hash lookup per
//! record, no decoding): a read of a build waits for the read model to have applied that far
//! ([`Start::seen`]), so it sees its own writes without waiting for anyone else's appends.
//!
//! Memory: one entry per build ever triggered (its id, tenant and four offsets), and one per
//! other partition key seen first (agent ids, the directory's keys).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};

use tonic::Status;
use tributary_eventlog::runtime::{Fold, Position};
use tributary_eventlog::{EventLog, LogError, Offset, Partition, Record};
use tributary_proto::events::{envelope::Payload, Envelope};

use crate::follow::{BuildPartitions, Cursor};
use crate::state::{Folded, Mark};

/// Where one build starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Start {
    pub tenant: String,
    /// Offset of the build's first record (`BuildTriggered`) in its events partition.
    pub events: Offset,
    /// No chunk of the build is before this offset of its logs partition.
    pub logs: Offset,
    /// Where its first record is: the build's events partition.
    pub partition: Partition,
    /// The offset of the build's last record in its events partition the index has seen.
    pub last: Offset,
}

impl Start {
    /// Just past every record of the build the index has seen: what a read of the build waits
    /// for the read model to have applied (its own writes included).
    pub fn seen(&self) -> Mark {
        Mark(vec![(self.partition, self.last + 1)])
    }
}

impl Start {
    /// The cursor a reader of the whole build starts at. On a shared partition (SQLite) it is
    /// the first record's offset: chunks come after the build's trigger there.
    pub fn cursor(&self, parts: BuildPartitions) -> Cursor {
        if parts.shared() {
            Cursor::at(self.events)
        } else {
            Cursor {
                events: self.events,
                logs: self.logs,
            }
        }
    }
}

/// The fold: builds by id, and the other keys met first (never a build's).
#[derive(Debug, Default)]
pub struct BuildStarts {
    builds: HashMap<String, Start>,
    others: HashSet<String>,
    /// Per tenant, per events partition: just past the newest build start seen (what a list of
    /// the tenant's builds waits for the read model to have applied).
    newest: HashMap<String, BTreeMap<Partition, Offset>>,
}

impl BuildStarts {
    /// Folds one record of an events partition. A key's first well-formed record decides: a
    /// build's (its key is its build id) is its start, anything else is remembered as not a
    /// build. Malformed records are skipped (the key's next record counts).
    pub fn apply(&mut self, record: &Record) {
        if self.seen_again(record) {
            return;
        }
        let Ok(env) = record.decode() else { return };
        self.apply_first(&record.key, record.partition, record.offset, env);
    }

    /// Whether `record`'s key's first record was folded already; a build's record moves its
    /// `last`.
    pub fn seen_again(&mut self, record: &Record) -> bool {
        if let Some(start) = self.builds.get_mut(&record.key) {
            start.last = start.last.max(record.offset);
            return true;
        }
        self.others.contains(&record.key)
    }

    /// Whether `key`'s first record was folded.
    pub fn knows(&self, key: &str) -> bool {
        self.builds.contains_key(key) || self.others.contains(key)
    }

    /// Folds `env`, the first well-formed record of `key`, at `offset`.
    pub fn apply_first(&mut self, key: &str, partition: Partition, offset: Offset, env: Envelope) {
        if env.build_id.is_empty() || env.build_id != key {
            self.others.insert(key.to_owned());
            return;
        }
        let logs = match &env.payload {
            Some(Payload::BuildTriggered(t)) => t.logs_from,
            _ => 0,
        };
        let newest = self
            .newest
            .entry(env.tenant.clone())
            .or_default()
            .entry(partition)
            .or_default();
        *newest = (*newest).max(offset + 1);
        self.builds.insert(
            key.to_owned(),
            Start {
                tenant: env.tenant,
                events: offset,
                logs,
                partition,
                last: offset,
            },
        );
    }

    pub fn get(&self, build_id: &str) -> Option<&Start> {
        self.builds.get(build_id)
    }

    /// Just past the newest build start of `tenant` in each partition.
    pub fn newest_of(&self, tenant: &str) -> Mark {
        Mark(
            self.newest
                .get(tenant)
                .map(|ends| ends.iter().map(|(p, o)| (*p, *o)).collect())
                .unwrap_or_default(),
        )
    }
}

/// [`BuildStarts`] following every events partition of the log from offset 0.
#[derive(Clone)]
pub struct Starts(Folded<BuildStarts>);

/// [`BuildStarts`] as the runtime drives it: a record whose key is known is skipped before it
/// is decoded.
struct StartsFold {
    state: Arc<RwLock<BuildStarts>>,
    /// The key of the record admitted last (the one `apply` gets next).
    key: String,
}

impl Fold for StartsFold {
    type Error = LogError;

    fn name(&self) -> &'static str {
        "api-starts"
    }

    fn admit(&mut self, record: &Record) -> bool {
        let known = self
            .state
            .write()
            .map_or(true, |mut s| s.seen_again(record));
        if !known {
            self.key.clone_from(&record.key);
        }
        !known
    }

    async fn apply(&mut self, at: Position, env: Envelope) -> Result<(), LogError> {
        if let Ok(mut s) = self.state.write() {
            s.apply_first(&self.key, at.partition, at.offset, env);
        }
        Ok(())
    }
}

impl Starts {
    pub fn start(log: &Arc<dyn EventLog>) -> Starts {
        let state = Arc::new(RwLock::new(BuildStarts::default()));
        let fold = StartsFold {
            state: state.clone(),
            key: String::new(),
        };
        Starts(Folded::run(log, fold, state))
    }

    /// Where `build_id` starts, as far as the index has folded.
    pub fn lookup(&self, build_id: &str) -> Result<Option<Start>, Status> {
        self.0.read(|s| s.get(build_id).cloned())
    }

    /// Waits (bounded) until the index has folded past `mark`.
    pub async fn wait(&self, mark: &Mark) -> Result<(), Status> {
        self.0.wait(mark).await
    }

    /// Just past the newest build start of `tenant` the index has folded, per partition.
    pub fn newest_of(&self, tenant: &str) -> Result<Mark, Status> {
        self.0.read(|s| s.newest_of(tenant))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use tributary_proto::events::{BuildTriggered, JobQueued, TenantCreated};

    fn record(offset: Offset, env: &Envelope) -> Record {
        Record {
            partition: 0,
            offset,
            key: env.partition_key(),
            data: env.encode_to_vec().into(),
        }
    }

    #[test]
    fn a_build_starts_at_its_first_record_with_its_triggers_logs_position() {
        let build = tributary_proto::new_id();
        let triggered = Envelope::new(
            "acme",
            "p",
            &build,
            Payload::BuildTriggered(BuildTriggered {
                logs_from: 42,
                ..BuildTriggered::default()
            }),
        );
        let queued = Envelope::new(
            "acme",
            "p",
            &build,
            Payload::JobQueued(JobQueued {
                job: "j".into(),
                attempt: 1,
            }),
        );
        let tenant = Envelope::new(
            "acme",
            "",
            "",
            Payload::TenantCreated(TenantCreated {
                name: "acme".into(),
            }),
        );
        let mut starts = BuildStarts::default();
        starts.apply(&record(3, &tenant));
        starts.apply(&Record {
            partition: 0,
            offset: 4,
            key: build.clone(),
            data: vec![0xff, 0xff].into(),
        });
        starts.apply(&record(7, &triggered));
        starts.apply(&record(9, &queued));
        assert_eq!(
            starts.get(&build),
            Some(&Start {
                tenant: "acme".into(),
                events: 7,
                logs: 42,
                partition: 0,
                last: 9,
            })
        );
        assert_eq!(
            starts.get(&build).map(Start::seen),
            Some(Mark(vec![(0, 10)]))
        );
        assert_eq!(starts.newest_of("acme"), Mark(vec![(0, 8)]));
        assert_eq!(starts.newest_of("other"), Mark(vec![]));
        assert_eq!(starts.get(""), None);
        assert_eq!(starts.get(&tenant.partition_key()), None);
    }

    #[test]
    fn the_start_cursor_is_the_first_record_on_a_shared_partition() {
        let start = Start {
            tenant: "t".into(),
            events: 10,
            logs: 4,
            partition: 0,
            last: 10,
        };
        assert_eq!(
            start.cursor(BuildPartitions { events: 0, logs: 0 }),
            Cursor::at(10)
        );
        assert_eq!(
            start.cursor(BuildPartitions { events: 1, logs: 5 }),
            Cursor {
                events: 10,
                logs: 4
            }
        );
    }
}
