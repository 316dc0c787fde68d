//! Replay: rebuild a read model from offset 0, and compare it with the stored one.

use serde_json::Value;
use tributary_eventlog::runtime::{Consumer, Fold, Interest, Position, SeenIds};
use tributary_eventlog::{EventLog, Partition, Topic};
use tributary_proto::events::Envelope;

use crate::builds::{Build, BuildsState};
use crate::chunks::{self, ChunkCounts};
use crate::store::BuildsStore;
use crate::ProjectionError;

/// Folds the log prefix `[0, end)` of a single-partition log into a fresh state, in memory.
/// Returns the state and the number of malformed records skipped.
pub async fn fold_log(log: &dyn EventLog, end: u64) -> Result<(BuildsState, u64), ProjectionError> {
    fold_partitions(log, &[(0, end)]).await
}

/// The builds fold as a replay drives it: from offset 0, in memory.
#[derive(Default)]
struct ReplayFold {
    state: BuildsState,
}

impl Fold for ReplayFold {
    type Error = ProjectionError;

    fn name(&self) -> &'static str {
        "replay"
    }

    async fn apply(&mut self, at: Position, env: Envelope) -> Result<(), ProjectionError> {
        self.state.apply(at.offset, &env);
        Ok(())
    }
}

/// Folds each `(partition, end)` prefix `[0, end)` into a fresh state, in memory, through the
/// consumer runtime (builds are independent and a build's state events are in one partition,
/// so the order of partitions does not matter). An event id met again anywhere is skipped.
/// Returns the state and the number of malformed records skipped.
pub async fn fold_partitions(
    log: &dyn EventLog,
    ends: &[(Partition, u64)],
) -> Result<(BuildsState, u64), ProjectionError> {
    let mut replay = Consumer::with_seen(ReplayFold::default(), SeenIds::unbounded());
    replay.catch_up_to(log, ends).await?;
    let malformed = replay.skipped().malformed;
    Ok((replay.into_fold().state, malformed))
}

/// Log chunks counted as a replay drives it.
struct ChunksFold {
    counts: ChunkCounts,
}

impl Fold for ChunksFold {
    type Error = ProjectionError;

    fn name(&self) -> &'static str {
        "replay-logs"
    }

    fn interest(&self) -> Interest {
        Interest::of(&[LOG_CHUNK])
    }

    async fn apply(&mut self, _at: Position, env: Envelope) -> Result<(), ProjectionError> {
        chunks::add(&mut self.counts, &env);
        Ok(())
    }
}

/// `LogChunk`'s payload field number (events.proto).
const LOG_CHUNK: u32 = 18;

/// Counts the log chunks of each logs-topic `(partition, end)` prefix (skipping event ids met
/// before, as the chunk counters do), and overlays the counts on `state`'s builds.
pub async fn count_chunks(
    log: &dyn EventLog,
    ends: &[(Partition, u64)],
    state: &mut BuildsState,
) -> Result<ChunkCounts, ProjectionError> {
    let mut replay = Consumer::with_seen(
        ChunksFold {
            counts: ChunkCounts::new(),
        },
        SeenIds::unbounded(),
    );
    replay.catch_up_to(log, ends).await?;
    let counts = replay.into_fold().counts;
    for build in state.builds.values_mut() {
        chunks::overlay(build, &counts);
    }
    Ok(counts)
}

/// The ends of the logs topic's partitions (none on a log without one).
async fn log_ends(log: &dyn EventLog) -> Result<Vec<(Partition, u64)>, ProjectionError> {
    let layout = log.layout();
    if layout.logs == 0 {
        return Ok(Vec::new());
    }
    let ends = log.end_offsets().await?;
    Ok(layout
        .topic_partitions(Topic::Logs)
        .map(|p| (p, ends.get(p as usize).copied().unwrap_or(0)))
        .collect())
}

/// The end of each events partition of `log`: what a rebuild folds.
pub async fn event_ends(log: &dyn EventLog) -> Result<Vec<(Partition, u64)>, ProjectionError> {
    let ends = log.end_offsets().await?;
    Ok(log
        .layout()
        .topic_partitions(Topic::Events)
        .map(|p| (p, ends.get(p as usize).copied().unwrap_or(0)))
        .collect())
}

/// The first difference between the stored and the replayed read model.
#[derive(Debug, Clone, PartialEq)]
pub struct Divergence {
    pub build_id: String,
    /// Path of the first differing field, e.g. `jobs[1].steps[0].lines[2].exit_code`.
    pub path: String,
    pub stored: String,
    pub replayed: String,
    /// Offset of the last event the replay applied to this build: the fold diverges at or
    /// before it.
    pub offset: Option<u64>,
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "build {}: {}: stored {} but replay gives {}",
            self.build_id, self.path, self.stored, self.replayed
        )?;
        if let Some(offset) = self.offset {
            write!(f, " (last event applied to this build at offset {offset})")?;
        }
        Ok(())
    }
}

/// Compares two states; returns the first difference in build-id order.
pub fn compare(stored: &BuildsState, replayed: &BuildsState) -> Option<Divergence> {
    let mut ids: Vec<&String> = stored.builds.keys().chain(replayed.builds.keys()).collect();
    ids.sort();
    ids.dedup();
    for id in ids {
        let a = stored.builds.get(id);
        let b = replayed.builds.get(id);
        if a == b {
            continue;
        }
        let offset = b.map(|b| b.last_offset);
        let (path, sa, sb) = match (a, b) {
            (Some(a), Some(b)) => first_diff(&to_value(a), &to_value(b), String::new())
                .unwrap_or_else(|| (String::new(), "?".into(), "?".into())),
            (Some(_), None) => ("(build)".into(), "present".into(), "absent".into()),
            (None, _) => ("(build)".into(), "absent".into(), "present".into()),
        };
        return Some(Divergence {
            build_id: id.clone(),
            path,
            stored: sa,
            replayed: sb,
            offset,
        });
    }
    None
}

/// Replays each events partition up to the offset the store holds for it, and compares with
/// what the store holds.
pub async fn check(
    log: &dyn EventLog,
    store: &BuildsStore,
) -> Result<Option<Divergence>, ProjectionError> {
    let stored_offsets = store.next_offsets().await?;
    let stored = store.load_all().await?;
    let ends: Vec<(Partition, u64)> = log
        .layout()
        .topic_partitions(Topic::Events)
        .map(|p| (p, stored_offsets.get(&p).copied().unwrap_or(0)))
        .collect();
    let (mut replayed, _) = fold_partitions(log, &ends).await?;
    let layout = log.layout();
    if layout.logs > 0 {
        let log_ends: Vec<(Partition, u64)> = layout
            .topic_partitions(Topic::Logs)
            .map(|p| (p, stored_offsets.get(&p).copied().unwrap_or(0)))
            .collect();
        count_chunks(log, &log_ends, &mut replayed).await?;
    }
    Ok(compare(&stored, &replayed))
}

/// Rebuilds the store from offset 0 up to the current end of every events partition, then
/// swaps it in: the fold runs in memory, and the old rows and offsets are replaced by the new
/// ones in one transaction (readers see the old read model until it commits). Projectors must
/// be stopped meanwhile. Returns the end offset of partition 0.
pub async fn rebuild(log: &dyn EventLog, store: &BuildsStore) -> Result<u64, ProjectionError> {
    let ends = event_ends(log).await?;
    let (mut state, _) = fold_partitions(log, &ends).await?;
    let log_ends = log_ends(log).await?;
    let counts = count_chunks(log, &log_ends, &mut state).await?;
    let positions: Vec<(Partition, u64)> = ends.iter().chain(&log_ends).copied().collect();
    store.replace_all_at(&state, &counts, &positions).await?;
    Ok(ends.first().map_or(0, |(_, end)| *end))
}

/// The tables of the builds read model, as the migrations create them.
const TABLES: [&str; 8] = [
    "builds",
    "jobs",
    "steps",
    "lines",
    "projection_offsets",
    "build_event_ids",
    "chunk_bytes",
    "chunk_event_ids",
];

/// Rebuilds the PostgreSQL read model at `url` (the database of `live`) into fresh tables, then
/// swaps them in: the tables are created by the migrations in a new schema `replay_<id>`, filled
/// by a projector and a chunk counter reading every partition from offset 0 (streaming: memory
/// stays bounded by the builds in flight), and moved into the live schema in one transaction
/// that drops the old ones. Readers see the old read model until that commits. Stop the
/// projectors first. Returns the offsets rebuilt to (partition, next offset).
pub async fn rebuild_fresh(
    log: &dyn EventLog,
    url: &str,
    live: &BuildsStore,
) -> Result<Vec<(Partition, u64)>, ProjectionError> {
    let schema = format!("replay_{}", tributary_proto::new_id().replace('-', ""));
    let live_schema: String = sqlx::query_scalar("SELECT current_schema()::text")
        .fetch_one(live.pool())
        .await?;
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(live.pool())
        .await?;
    let result = fill_and_swap(log, url, live, &schema, &live_schema).await;
    if let Err(error) = sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .execute(live.pool())
        .await
    {
        tracing::warn!(%error, schema, "could not drop the replay schema");
    }
    result
}

async fn fill_and_swap(
    log: &dyn EventLog,
    url: &str,
    live: &BuildsStore,
    schema: &str,
    live_schema: &str,
) -> Result<Vec<(Partition, u64)>, ProjectionError> {
    let separator = if url.contains('?') { '&' } else { '?' };
    let fresh_url = format!("{url}{separator}options[search_path]={schema}");
    let fresh = BuildsStore::connect(&fresh_url).await?;
    let mut projector = crate::BuildsProjector::open(fresh.clone()).await?;
    projector.catch_up(log).await?;
    if log.layout().logs > 0 {
        crate::ChunkCounter::new(fresh.clone())
            .catch_up(log)
            .await?;
    }
    let offsets = fresh.next_offsets().await?;
    fresh.close().await;
    let mut tx = live.pool().begin().await?;
    for table in TABLES {
        sqlx::query(&format!("DROP TABLE IF EXISTS {live_schema}.{table}"))
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!(
            "ALTER TABLE {schema}.{table} SET SCHEMA {live_schema}"
        ))
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(offsets.into_iter().collect())
}

fn to_value(b: &Build) -> Value {
    serde_json::to_value(b).unwrap_or(Value::Null)
}

fn first_diff(a: &Value, b: &Value, path: String) -> Option<(String, String, String)> {
    if a == b {
        return None;
    }
    match (a, b) {
        (Value::Object(ma), Value::Object(mb)) => {
            for (k, va) in ma {
                let vb = mb.get(k).unwrap_or(&Value::Null);
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                if let Some(d) = first_diff(va, vb, p) {
                    return Some(d);
                }
            }
            None
        }
        (Value::Array(va), Value::Array(vb)) if va.len() == vb.len() => va
            .iter()
            .zip(vb)
            .enumerate()
            .find_map(|(i, (x, y))| first_diff(x, y, format!("{path}[{i}]"))),
        _ => Some((path, a.to_string(), b.to_string())),
    }
}
