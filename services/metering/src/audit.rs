//! Audit by replay: fold the log from offset 0 of every events partition into a fresh
//! metering state and compare it, row by row, with the stored read model and with every
//! issued invoice. The first divergence (lowest offset) is reported with the position of the
//! event where the row's replayed value was last set — the stored row should equal the replay
//! from there on.

use std::collections::BTreeMap;
use std::sync::Arc;

use tributary_eventlog::runtime::{Consumer, Fold, Position};
use tributary_eventlog::{EventLog, Partition};
use tributary_proto::events::Envelope;

use crate::fold::{MeteringState, Pos};
use crate::store::MeteringStore;
use crate::MeteringError;

/// A fold handing each decoded event to a closure, with its offset: audit's one pass over the
/// log for several models at once.
struct Each<F>(F);

impl<F: FnMut(u64, &Envelope) + Send> Fold for Each<F> {
    type Error = MeteringError;

    fn name(&self) -> &'static str {
        "audit"
    }

    async fn apply(&mut self, at: Position, env: Envelope) -> Result<(), MeteringError> {
        (self.0)(at.offset, &env);
        Ok(())
    }
}

/// Reads `[0, end)` of a one-partition log on the consumer runtime (reading the next page while
/// this one is folded) and calls `f` for every decodable event, in offset order. Returns the
/// number of malformed records skipped.
pub async fn replay_log(
    log: Arc<dyn EventLog>,
    end: u64,
    f: impl FnMut(u64, &Envelope) + Send,
) -> Result<u64, MeteringError> {
    let mut consumer = Consumer::new(Each(f));
    consumer.catch_up_to(log.as_ref(), &[(0, end)]).await?;
    Ok(consumer.skipped().malformed)
}

/// A fresh metering state from `[0, end)` of a one-partition log: [`replay_partitions`].
pub async fn replay(log: Arc<dyn EventLog>, end: u64) -> Result<MeteringState, MeteringError> {
    replay_partitions(log, &BTreeMap::from([(0, end)])).await
}

/// A fresh metering state from every partition of `ends` (partition -> end offset), on the
/// consumer runtime in the canonical order ([`crate::projector::Barriers`]) from offset 0,
/// each record read through [`crate::view::view`] (usage ticks borrowed from the record's
/// bytes, events metering does not fold never decoded). The fold's decisions do not depend on
/// how partitions interleave (invoices wait for their cut).
pub async fn replay_partitions(
    log: Arc<dyn EventLog>,
    ends: &BTreeMap<Partition, u64>,
) -> Result<MeteringState, MeteringError> {
    let mut consumer = Consumer::new(crate::projector::MeteringFold::in_memory());
    consumer
        .catch_up_in(
            log.as_ref(),
            ends,
            &mut crate::projector::Barriers::default(),
        )
        .await?;
    let mut state = consumer.into_fold().state;
    state.take_decided();
    Ok(state)
}

/// The end offset of every events partition of `log`, now.
pub async fn events_ends(log: &dyn EventLog) -> Result<BTreeMap<Partition, u64>, MeteringError> {
    let ends = log.end_offsets().await?;
    Ok(crate::projector::partitions(log)
        .map(|p| (p, ends.get(p as usize).copied().unwrap_or(0)))
        .collect())
}

/// Rebuilds `store` from a replay of the whole log as of now (`tributary replay`); returns the
/// end offsets it reached. The store changes in one transaction, or not at all.
pub async fn rebuild(
    log: Arc<dyn EventLog>,
    store: &MeteringStore,
) -> Result<BTreeMap<Partition, u64>, MeteringError> {
    let ends = events_ends(log.as_ref()).await?;
    let state = replay_partitions(log, &ends).await?;
    store.replace_all(&state).await?;
    Ok(ends)
}

/// On PostgreSQL: replays the whole log as of now into a fresh schema
/// (`metering_replay_<id>`, migrated), then in one transaction drops the live schema and
/// renames the fresh one in its place: readers see the old model until it commits. Stop the
/// metering service first. Returns the end offsets replayed.
pub async fn rebuild_fresh(
    log: Arc<dyn EventLog>,
    url: &str,
    live: &MeteringStore,
) -> Result<BTreeMap<Partition, u64>, MeteringError> {
    use sqlx::Executor;
    let schema = format!(
        "metering_replay_{}",
        tributary_proto::new_id().replace('-', "")
    );
    let fresh = MeteringStore::connect_schema(url, &schema).await?;
    let ends = events_ends(log.as_ref()).await?;
    let result = async {
        let state = replay_partitions(log, &ends).await?;
        fresh.replace_all(&state).await?;
        fresh.close().await;
        let mut tx = live.pool().begin().await?;
        tx.execute(format!("DROP SCHEMA IF EXISTS {} CASCADE", live.schema()).as_str())
            .await?;
        tx.execute(format!("ALTER SCHEMA {schema} RENAME TO {}", live.schema()).as_str())
            .await?;
        tx.commit().await?;
        Ok::<_, MeteringError>(())
    }
    .await;
    if let Err(e) = result {
        if let Ok(mut conn) = live.pool().acquire().await {
            let _ = conn
                .execute(format!("DROP SCHEMA IF EXISTS {schema} CASCADE").as_str())
                .await;
        }
        return Err(e);
    }
    Ok(ends)
}

/// Compares `store` with a replay of the log up to the offsets it stored (`tributary replay
/// --check`, `tributary audit`): every difference, earliest first, and those offsets.
pub async fn check(
    log: Arc<dyn EventLog>,
    store: &MeteringStore,
    tenant: Option<&str>,
) -> Result<(Vec<Divergence>, BTreeMap<Partition, u64>, MeteringState), MeteringError> {
    let stored = store.load_all().await?;
    let ends: BTreeMap<Partition, u64> = crate::projector::partitions(log.as_ref())
        .map(|p| (p, stored.position(p)))
        .collect();
    let replayed = replay_partitions(log, &ends).await?;
    Ok((compare(&stored, &replayed, tenant), ends, replayed))
}

/// A difference between the stored and the replayed metering model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Divergence {
    /// Which row: `usage acme/web/linux-2cpu-4gb/2026-11-25`, `invoice acme 2026-10`, ...
    pub row: String,
    pub stored: String,
    pub replayed: String,
    /// The event where the divergence starts.
    pub at: Pos,
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: stored {} but replay gives {} (from the event at {})",
            self.row, self.stored, self.replayed, self.at
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
    let mut diff = |row: String, a: Option<String>, b: Option<String>, at: Pos| {
        if a != b {
            out.push(Divergence {
                row,
                stored: a.unwrap_or_else(|| "nothing".into()),
                replayed: b.unwrap_or_else(|| "nothing".into()),
                at,
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
            b.or(a).map_or(Pos::default(), |u| u.last),
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
            b.or(a).map_or(Pos::default(), |p| p.last),
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
            b.or(a).map_or(Pos::default(), |u| u.last),
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
                + &format!(" at {}", i.at)
        };
        diff(
            format!("issued invoice {} {}", k.0, k.1),
            a.map(show),
            b.map(show),
            b.or(a).map_or(Pos::default(), |i| i.at),
        );
    }
    let tenants: BTreeMap<_, _> = stored
        .pending
        .keys()
        .chain(replayed.pending.keys())
        .filter(|t| mine(t))
        .map(|t| (t, ()))
        .collect();
    for t in tenants.keys() {
        let show = |q: &std::collections::VecDeque<crate::fold::PendingInvoice>| {
            q.iter()
                .map(|p| format!("{} at {}", p.event.period, p.at))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let a = stored.pending.get(*t);
        let b = replayed.pending.get(*t);
        diff(
            format!("pending invoices of {t}"),
            a.map(show),
            b.map(show),
            b.or(a)
                .and_then(|q| q.front())
                .map_or(Pos::default(), |p| p.at),
        );
    }
    out.sort_by_key(|d| (d.at.offset, d.at.partition));
    out
}
