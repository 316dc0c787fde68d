//! Audit by replay: fold the log from offset 0 into a fresh metering state and compare it,
//! row by row, with the stored read model and with every issued invoice. The first
//! divergence (lowest offset) is reported with the offset of the event where the row's
//! replayed value was last set — the stored row should equal the replay from there on.

use std::collections::BTreeMap;
use std::sync::Arc;

use tributary_eventlog::{EventLog, Record};
use tributary_proto::events::Envelope;

use crate::fold::MeteringState;
use crate::store::MeteringStore;
use crate::view::view;
use crate::MeteringError;

/// Reads `[0, end)` and calls `f` for every decodable event, in offset order. Three stages
/// overlap: the log's reader, a task that decodes the next batch, and the caller's fold.
/// Returns the number of malformed records skipped.
pub async fn replay_log(
    log: Arc<dyn EventLog>,
    end: u64,
    mut f: impl FnMut(u64, &Envelope),
) -> Result<u64, MeteringError> {
    const BATCH: usize = 8192;
    type Decoded = (Vec<(u64, Envelope)>, u64);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Decoded, MeteringError>>(4);
    let reader = tokio::spawn(async move {
        let mut next = 0;
        let mut pending: Option<tokio::task::JoinHandle<Result<Vec<Record>, MeteringError>>> = None;
        loop {
            // Start reading the following batch before decoding this one.
            let records = match pending.take() {
                Some(h) => match h.await {
                    Ok(r) => r,
                    Err(e) => Err(MeteringError::Corrupt(format!("log reader failed: {e}"))),
                },
                None if next < end => log.read(next, BATCH).await.map_err(Into::into),
                None => break,
            };
            let records = match records {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    break;
                }
            };
            let Some(last) = records.last() else { break };
            next = last.offset + 1;
            if next < end {
                let log = log.clone();
                pending = Some(tokio::spawn(async move {
                    log.read(next, BATCH).await.map_err(Into::into)
                }));
            }
            let mut malformed = 0;
            let mut decoded = Vec::with_capacity(records.len());
            for record in &records {
                if record.offset >= end {
                    break;
                }
                match record.decode() {
                    Ok(env) => decoded.push((record.offset, env)),
                    Err(_) => malformed += 1,
                }
            }
            if tx.send(Ok((decoded, malformed))).await.is_err() {
                break;
            }
        }
        if let Some(h) = pending {
            h.abort();
        }
    });
    let mut malformed = 0;
    while let Some(batch) = rx.recv().await {
        let (events, bad) = batch?;
        malformed += bad;
        for (offset, env) in &events {
            f(*offset, env);
        }
    }
    let _ = reader.await;
    Ok(malformed)
}

/// A fresh metering state from `[0, end)`: two stages overlap, the log's reader and this
/// task, which reads each record through [`view`] (usage ticks borrowed from the record's
/// bytes, events metering does not fold never decoded) and folds it.
pub async fn replay(log: Arc<dyn EventLog>, end: u64) -> Result<MeteringState, MeteringError> {
    const BATCH: usize = 16_384;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Vec<Record>, MeteringError>>(4);
    let reader = tokio::spawn(async move {
        let mut next = 0;
        while next < end {
            let records = log.read(next, BATCH).await.map_err(MeteringError::from);
            if let Ok(records) = &records {
                match records.last() {
                    Some(last) => next = last.offset + 1,
                    None => break,
                }
            }
            let failed = records.is_err();
            if tx.send(records).await.is_err() || failed {
                break;
            }
        }
    });
    let mut state = MeteringState::default();
    while let Some(batch) = rx.recv().await {
        for record in &batch? {
            if record.offset >= end {
                break;
            }
            // A malformed record is skipped, as every fold skips it.
            if let Ok(event) = view(&record.data) {
                state.apply_view(record.offset, &event);
            }
        }
    }
    let _ = reader.await;
    Ok(state)
}

/// Rebuilds `store` from a replay of the whole log as of now (`tributary replay`); returns the
/// offset it reached. The store changes in one transaction, or not at all.
pub async fn rebuild(log: Arc<dyn EventLog>, store: &MeteringStore) -> Result<u64, MeteringError> {
    let end = log.end_offset().await?;
    let state = replay(log, end).await?;
    store.replace_all(&state, end).await?;
    Ok(end)
}

/// Compares `store` with a replay of the log up to the offset it reached (`tributary replay
/// --check`): every difference, earliest first, and that offset.
pub async fn check(
    log: Arc<dyn EventLog>,
    store: &MeteringStore,
) -> Result<(Vec<Divergence>, u64), MeteringError> {
    let (stored, end) = store.load_all().await?;
    let replayed = replay(log, end).await?;
    Ok((compare(&stored, &replayed, None), end))
}

/// A difference between the stored and the replayed metering model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Divergence {
    /// Which row: `usage acme/web/linux-2cpu-4gb/2026-11-25`, `invoice acme 2026-10`, ...
    pub row: String,
    pub stored: String,
    pub replayed: String,
    /// The event where the divergence starts.
    pub offset: u64,
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: stored {} but replay gives {} (from the event at offset {})",
            self.row, self.stored, self.replayed, self.offset
        )
    }
}

/// Every difference, earliest offset first. `tenant` limits the comparison to one tenant.
pub fn compare(
    stored: &MeteringState,
    replayed: &MeteringState,
    tenant: Option<&str>,
) -> Vec<Divergence> {
    let mine = |t: &str| tenant.is_none_or(|x| x == t);
    let mut out = Vec::new();
    let mut diff = |row: String, a: Option<String>, b: Option<String>, offset: u64| {
        if a != b {
            out.push(Divergence {
                row,
                stored: a.unwrap_or_else(|| "nothing".into()),
                replayed: b.unwrap_or_else(|| "nothing".into()),
                offset,
            });
        }
    };
    let usage: BTreeMap<_, _> = stored
        .usage
        .keys()
        .chain(replayed.usage.keys())
        .filter(|k| mine(&k.tenant))
        .map(|k| (k, ()))
        .collect();
    for k in usage.keys() {
        let a = stored.usage.get(k);
        let b = replayed.usage.get(k);
        diff(
            format!(
                "usage {}/{}/{}/{}",
                k.tenant, k.project, k.machine_class, k.day
            ),
            a.map(|u| format!("{} ms", u.millis)),
            b.map(|u| format!("{} ms", u.millis)),
            b.or(a).map_or(0, |u| u.last_offset),
        );
    }
    let parts: BTreeMap<_, _> = stored
        .parts
        .keys()
        .chain(replayed.parts.keys())
        .filter(|k| mine(&k.tenant))
        .map(|k| (k, ()))
        .collect();
    for k in parts.keys() {
        let a = stored.parts.get(k);
        let b = replayed.parts.get(k);
        let show = |p: &crate::fold::Part| {
            format!(
                "{} ms (billed {:?}, project {})",
                p.millis, p.billed_millis, p.project
            )
        };
        diff(
            format!(
                "job usage {} {} build {} job {} attempt {} ({})",
                k.tenant, k.period, k.build_id, k.job, k.attempt, k.machine_class
            ),
            a.map(show),
            b.map(show),
            b.or(a).map_or(0, |p| p.last_offset),
        );
    }
    let attempts: BTreeMap<_, _> = stored
        .attempts
        .iter()
        .chain(replayed.attempts.iter())
        .filter(|(_, a)| mine(&a.tenant))
        .map(|(k, _)| (k, ()))
        .collect();
    for k in attempts.keys() {
        let a = stored.attempts.get(k);
        let b = replayed.attempts.get(k);
        let show = |u: &crate::fold::AttemptUsage| {
            format!(
                "{} ms in {} ticks (class {}, complete {}, ended {})",
                u.millis, u.ticks, u.machine_class, u.complete, u.ended
            )
        };
        diff(
            format!(
                "attempt build {} job {} attempt {}",
                k.build_id, k.job, k.attempt
            ),
            a.map(show),
            b.map(show),
            b.or(a).map_or(0, |u| u.last_offset),
        );
    }
    let invoices: BTreeMap<_, _> = stored
        .issued
        .keys()
        .chain(replayed.issued.keys())
        .filter(|(t, _)| mine(t))
        .map(|k| (k, ()))
        .collect();
    for k in invoices.keys() {
        let a = stored.issued.get(k);
        let b = replayed.issued.get(k);
        let show = |i: &crate::fold::IssuedInvoice| {
            serde_json::to_string(&i.invoice).unwrap_or_else(|_| "?".into())
                + &format!(" at offset {}", i.offset)
        };
        diff(
            format!("issued invoice {} {}", k.0, k.1),
            a.map(show),
            b.map(show),
            b.or(a).map_or(0, |i| i.offset),
        );
    }
    out.sort_by_key(|d| d.offset);
    out
}
