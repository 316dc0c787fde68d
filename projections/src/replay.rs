//! Replay: rebuild a read model from offset 0, and compare it with the stored one.

use serde_json::Value;
use tributary_eventlog::EventLog;

use crate::builds::{Build, BuildsState};
use crate::store::BuildsStore;
use crate::ProjectionError;

/// Folds the log prefix `[0, end)` into a fresh state, in memory.
pub async fn fold_log(log: &dyn EventLog, end: u64) -> Result<(BuildsState, u64), ProjectionError> {
    let mut state = BuildsState::default();
    let mut malformed = 0;
    let mut next = 0;
    while next < end {
        let records = log.read(next, 8192).await?;
        if records.is_empty() {
            break;
        }
        for record in &records {
            if record.offset >= end {
                break;
            }
            next = record.offset + 1;
            match record.decode() {
                Ok(env) => state.apply(record.offset, &env),
                Err(_) => malformed += 1,
            }
        }
    }
    Ok((state, malformed))
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

/// Replays `[0, stored offset)` and compares with what the store holds.
pub async fn check(
    log: &dyn EventLog,
    store: &BuildsStore,
) -> Result<Option<Divergence>, ProjectionError> {
    let end = store.next_offset().await?;
    let stored = store.load_all().await?;
    let (replayed, _) = fold_log(log, end).await?;
    Ok(compare(&stored, &replayed))
}

/// Rebuilds the store from offset 0 up to the current end of the log.
pub async fn rebuild(log: &dyn EventLog, store: &BuildsStore) -> Result<u64, ProjectionError> {
    let end = log.end_offset().await?;
    let (state, _) = fold_log(log, end).await?;
    store.replace_all(&state, end).await?;
    Ok(end)
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
