//! The metering read model in SQLite (`metering.db`), next to its consumer offset.
//!
//! Invariant (as in `projections/src/store.rs`): rows and the `next_offset` row are written
//! in the same transaction ([`MeteringStore::commit_batch`]), so the stored model is always
//! exactly the fold of the log prefix `[0, next_offset)`.

use std::path::Path;
use std::str::FromStr;

use prost::Message;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use tributary_proto::events::InvoiceIssued;

use crate::calendar::{Day, Period};
use crate::fold::{
    AttemptKey, AttemptUsage, Dirty, IssuedInvoice, MeteringState, Part, PartKey, SeqSet, Usage,
    UsageKey,
};
use crate::invoice::Invoice;
use crate::MeteringError;

pub const PROJECTION: &str = "metering";

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS projection_offsets (
    projection TEXT PRIMARY KEY,
    next_offset INTEGER NOT NULL,
    rejected INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS usage_daily (
    tenant TEXT NOT NULL,
    project TEXT NOT NULL,
    machine_class TEXT NOT NULL,
    day TEXT NOT NULL,
    millis INTEGER NOT NULL,
    last_offset INTEGER NOT NULL,
    PRIMARY KEY (tenant, project, machine_class, day)
);
CREATE TABLE IF NOT EXISTS job_parts (
    tenant TEXT NOT NULL,
    period TEXT NOT NULL,
    build_id TEXT NOT NULL,
    job TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    machine_class TEXT NOT NULL,
    project TEXT NOT NULL,
    millis INTEGER NOT NULL,
    billed_millis INTEGER,
    last_offset INTEGER NOT NULL,
    PRIMARY KEY (tenant, period, build_id, job, attempt, machine_class)
);
CREATE TABLE IF NOT EXISTS attempts (
    build_id TEXT NOT NULL,
    job TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    tenant TEXT NOT NULL,
    project TEXT NOT NULL,
    machine_class TEXT NOT NULL,
    millis INTEGER NOT NULL,
    ticks INTEGER NOT NULL,
    complete INTEGER NOT NULL,
    ended INTEGER NOT NULL,
    seq_contiguous INTEGER NOT NULL,
    seq_sparse TEXT NOT NULL,
    seq_ids TEXT NOT NULL,
    last_offset INTEGER NOT NULL,
    PRIMARY KEY (build_id, job, attempt)
);
CREATE TABLE IF NOT EXISTS invoices (
    tenant TEXT NOT NULL,
    period TEXT NOT NULL,
    offset INTEGER NOT NULL,
    time_us INTEGER NOT NULL,
    event_id TEXT NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (tenant, period)
);
"#;

#[derive(Clone)]
pub struct MeteringStore {
    pool: SqlitePool,
}

type Tx<'a> = sqlx::Transaction<'a, sqlx::Sqlite>;

impl MeteringStore {
    pub async fn open(path: &Path) -> Result<Self, MeteringError> {
        let options = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(std::time::Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        sqlx::raw_sql(SCHEMA).execute(&pool).await?;
        Ok(MeteringStore { pool })
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Raw access for tests and tools (e.g. tampering with a row to prove `audit` notices).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    pub async fn next_offset(&self) -> Result<u64, MeteringError> {
        let v: Option<i64> =
            sqlx::query_scalar("SELECT next_offset FROM projection_offsets WHERE projection = ?")
                .bind(PROJECTION)
                .fetch_optional(&self.pool)
                .await?;
        Ok(v.map_or(0, to_u64))
    }

    /// Writes the rows `dirty` names and the new offset, in one transaction.
    pub async fn commit_batch(
        &self,
        state: &MeteringState,
        dirty: &Dirty,
        next_offset: u64,
    ) -> Result<(), MeteringError> {
        let mut tx = self.pool.begin().await?;
        for key in &dirty.usage {
            if let Some(u) = state.usage.get(key) {
                write_usage(&mut tx, key, u).await?;
            }
        }
        for key in &dirty.parts {
            if let Some(p) = state.parts.get(key) {
                write_part(&mut tx, key, p).await?;
            }
        }
        for key in &dirty.attempts {
            if let Some(a) = state.attempts.get(key) {
                write_attempt(&mut tx, key, a).await?;
            }
        }
        for key in &dirty.invoices {
            if let Some(i) = state.issued.get(key) {
                write_invoice(&mut tx, i).await?;
            }
        }
        write_offset(&mut tx, state, next_offset).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Replaces the whole stored model with `state` (the fold of `[0, next_offset)`), in one
    /// transaction: `tributary replay` rebuilding metering.db from the log.
    pub async fn replace_all(
        &self,
        state: &MeteringState,
        next_offset: u64,
    ) -> Result<(), MeteringError> {
        let mut tx = self.pool.begin().await?;
        for table in ["usage_daily", "job_parts", "attempts", "invoices"] {
            sqlx::query(&format!("DELETE FROM {table}"))
                .execute(&mut *tx)
                .await?;
        }
        for (key, u) in &state.usage {
            write_usage(&mut tx, key, u).await?;
        }
        for (key, p) in &state.parts {
            write_part(&mut tx, key, p).await?;
        }
        for (key, a) in &state.attempts {
            write_attempt(&mut tx, key, a).await?;
        }
        for i in state.issued.values() {
            write_invoice(&mut tx, i).await?;
        }
        write_offset(&mut tx, state, next_offset).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The whole stored model and its offset, read in one transaction (a consistent snapshot
    /// even while the projector writes).
    pub async fn load_all(&self) -> Result<(MeteringState, u64), MeteringError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "SELECT next_offset, rejected FROM projection_offsets WHERE projection = ?",
        )
        .bind(PROJECTION)
        .fetch_optional(&mut *tx)
        .await?;
        let (next, rejected) = match row {
            Some(r) => (to_u64(r.try_get(0)?), to_u64(r.try_get(1)?)),
            None => (0, 0),
        };
        let mut state = MeteringState::tracking();
        state.rejected = rejected;
        load_parts(&mut tx, None, &mut state).await?;
        load_invoices(&mut tx, None, &mut state).await?;
        for row in sqlx::query("SELECT * FROM usage_daily")
            .fetch_all(&mut *tx)
            .await?
        {
            let day: String = row.try_get("day")?;
            let key = UsageKey {
                tenant: row.try_get("tenant")?,
                project: row.try_get("project")?,
                machine_class: row.try_get("machine_class")?,
                day: Day::parse(&day).ok_or_else(|| corrupt(format!("day {day:?}")))?,
            };
            state.usage.insert(
                key,
                Usage {
                    millis: to_u64(row.try_get("millis")?),
                    last_offset: to_u64(row.try_get("last_offset")?),
                },
            );
        }
        for row in sqlx::query("SELECT * FROM attempts")
            .fetch_all(&mut *tx)
            .await?
        {
            let (key, a) = attempt_from_row(&row)?;
            state.attempts.insert(key, a);
        }
        tx.commit().await?;
        state.take_dirty();
        Ok((state, next))
    }

    /// What pricing needs of one tenant: its job parts and issued invoices.
    pub async fn load_tenant(&self, tenant: &str) -> Result<MeteringState, MeteringError> {
        let mut tx = self.pool.begin().await?;
        let mut state = MeteringState::default();
        load_parts(&mut tx, Some(tenant), &mut state).await?;
        load_invoices(&mut tx, Some(tenant), &mut state).await?;
        tx.commit().await?;
        Ok(state)
    }

    pub async fn issued(
        &self,
        tenant: &str,
        period: Period,
    ) -> Result<Option<IssuedInvoice>, MeteringError> {
        let row = sqlx::query("SELECT * FROM invoices WHERE tenant = ? AND period = ?")
            .bind(tenant)
            .bind(period.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| invoice_from_row(&r)).transpose()
    }

    /// Usage of one build's job attempts, in job order.
    pub async fn build_usage(
        &self,
        build_id: &str,
    ) -> Result<Vec<(AttemptKey, AttemptUsage)>, MeteringError> {
        let rows = sqlx::query("SELECT * FROM attempts WHERE build_id = ? ORDER BY job, attempt")
            .bind(build_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(attempt_from_row).collect()
    }

    /// Usage records (tenant, project, class, day, millis) of a tenant, ordered.
    pub async fn usage_records(&self, tenant: &str) -> Result<Vec<(UsageKey, u64)>, MeteringError> {
        let rows = sqlx::query(
            "SELECT * FROM usage_daily WHERE tenant = ? ORDER BY day, project, machine_class",
        )
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::new();
        for row in rows {
            let day: String = row.try_get("day")?;
            out.push((
                UsageKey {
                    tenant: row.try_get("tenant")?,
                    project: row.try_get("project")?,
                    machine_class: row.try_get("machine_class")?,
                    day: Day::parse(&day).ok_or_else(|| corrupt(format!("day {day:?}")))?,
                },
                to_u64(row.try_get("millis")?),
            ));
        }
        Ok(out)
    }
}

fn corrupt(what: String) -> MeteringError {
    MeteringError::Corrupt(format!("metering.db holds an invalid {what}"))
}

async fn load_parts(
    tx: &mut Tx<'_>,
    tenant: Option<&str>,
    state: &mut MeteringState,
) -> Result<(), MeteringError> {
    let rows = sqlx::query("SELECT * FROM job_parts WHERE ? IS NULL OR tenant = ?")
        .bind(tenant)
        .bind(tenant)
        .fetch_all(&mut **tx)
        .await?;
    for row in rows {
        let period: String = row.try_get("period")?;
        let key = PartKey {
            tenant: row.try_get("tenant")?,
            period: Period::parse(&period).map_err(|_| corrupt(format!("period {period:?}")))?,
            build_id: row.try_get("build_id")?,
            job: row.try_get("job")?,
            attempt: row.try_get("attempt")?,
            machine_class: row.try_get("machine_class")?,
        };
        state.part_keys.insert(key.clone());
        state.parts.insert(
            key,
            Part {
                project: row.try_get("project")?,
                millis: to_u64(row.try_get("millis")?),
                billed_millis: row.try_get::<Option<i64>, _>("billed_millis")?.map(to_u64),
                last_offset: to_u64(row.try_get("last_offset")?),
            },
        );
    }
    Ok(())
}

async fn load_invoices(
    tx: &mut Tx<'_>,
    tenant: Option<&str>,
    state: &mut MeteringState,
) -> Result<(), MeteringError> {
    let rows = sqlx::query("SELECT * FROM invoices WHERE ? IS NULL OR tenant = ?")
        .bind(tenant)
        .bind(tenant)
        .fetch_all(&mut **tx)
        .await?;
    for row in rows {
        let inv = invoice_from_row(&row)?;
        let period = Period::parse(&inv.invoice.period)
            .map_err(|_| corrupt(format!("period {:?}", inv.invoice.period)))?;
        state
            .issued
            .insert((inv.invoice.tenant.clone(), period), inv);
    }
    Ok(())
}

fn invoice_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<IssuedInvoice, MeteringError> {
    let body: Vec<u8> = row.try_get("body")?;
    let event = InvoiceIssued::decode(body.as_slice())
        .map_err(|e| corrupt(format!("invoice body ({e})")))?;
    Ok(IssuedInvoice {
        invoice: Invoice::from_event(&event),
        offset: to_u64(row.try_get("offset")?),
        time_us: row.try_get("time_us")?,
        event_id: row.try_get("event_id")?,
    })
}

fn attempt_from_row(
    row: &sqlx::sqlite::SqliteRow,
) -> Result<(AttemptKey, AttemptUsage), MeteringError> {
    let sparse: String = row.try_get("seq_sparse")?;
    let ids: String = row.try_get("seq_ids")?;
    Ok((
        AttemptKey {
            build_id: row.try_get("build_id")?,
            job: row.try_get("job")?,
            attempt: row.try_get("attempt")?,
        },
        AttemptUsage {
            tenant: row.try_get("tenant")?,
            project: row.try_get("project")?,
            machine_class: row.try_get("machine_class")?,
            millis: to_u64(row.try_get("millis")?),
            ticks: to_u64(row.try_get("ticks")?),
            complete: row.try_get("complete")?,
            ended: row.try_get("ended")?,
            seqs: SeqSet {
                contiguous: row.try_get("seq_contiguous")?,
                sparse: serde_json::from_str(&sparse)
                    .map_err(|_| corrupt("tick sequence set".into()))?,
                ids: serde_json::from_str(&ids).map_err(|_| corrupt("tick id set".into()))?,
            },
            last_offset: to_u64(row.try_get("last_offset")?),
        },
    ))
}

async fn write_offset(
    tx: &mut Tx<'_>,
    state: &MeteringState,
    next_offset: u64,
) -> Result<(), MeteringError> {
    sqlx::query(
        "INSERT INTO projection_offsets (projection, next_offset, rejected) VALUES (?, ?, ?) \
         ON CONFLICT (projection) DO UPDATE SET next_offset = excluded.next_offset, \
         rejected = excluded.rejected",
    )
    .bind(PROJECTION)
    .bind(to_i64(next_offset))
    .bind(to_i64(state.rejected))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn write_usage(tx: &mut Tx<'_>, k: &UsageKey, u: &Usage) -> Result<(), MeteringError> {
    sqlx::query(
        "INSERT OR REPLACE INTO usage_daily (tenant, project, machine_class, day, millis, \
         last_offset) VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(&k.tenant)
    .bind(&k.project)
    .bind(&k.machine_class)
    .bind(k.day.to_string())
    .bind(to_i64(u.millis))
    .bind(to_i64(u.last_offset))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn write_part(tx: &mut Tx<'_>, k: &PartKey, p: &Part) -> Result<(), MeteringError> {
    sqlx::query(
        "INSERT OR REPLACE INTO job_parts (tenant, period, build_id, job, attempt, \
         machine_class, project, millis, billed_millis, last_offset) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&k.tenant)
    .bind(k.period.to_string())
    .bind(&k.build_id)
    .bind(&k.job)
    .bind(k.attempt)
    .bind(&k.machine_class)
    .bind(&p.project)
    .bind(to_i64(p.millis))
    .bind(p.billed_millis.map(to_i64))
    .bind(to_i64(p.last_offset))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn write_attempt(
    tx: &mut Tx<'_>,
    k: &AttemptKey,
    a: &AttemptUsage,
) -> Result<(), MeteringError> {
    sqlx::query(
        "INSERT OR REPLACE INTO attempts (build_id, job, attempt, tenant, project, \
         machine_class, millis, ticks, complete, ended, seq_contiguous, seq_sparse, seq_ids, \
         last_offset) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&k.build_id)
    .bind(&k.job)
    .bind(k.attempt)
    .bind(&a.tenant)
    .bind(&a.project)
    .bind(&a.machine_class)
    .bind(to_i64(a.millis))
    .bind(to_i64(a.ticks))
    .bind(a.complete)
    .bind(a.ended)
    .bind(a.seqs.contiguous)
    .bind(serde_json::to_string(&a.seqs.sparse)?)
    .bind(serde_json::to_string(&a.seqs.ids)?)
    .bind(to_i64(a.last_offset))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn write_invoice(tx: &mut Tx<'_>, i: &IssuedInvoice) -> Result<(), MeteringError> {
    let body = InvoiceIssued {
        tenant: i.invoice.tenant.clone(),
        period: i.invoice.period.clone(),
        plan_version: i.invoice.plan_version.clone(),
        plan_toml: String::new(),
        currency: i.invoice.currency.clone(),
        lines: i.invoice.lines.clone(),
        total_micros: i.invoice.total_micros,
    }
    .encode_to_vec();
    sqlx::query(
        "INSERT OR REPLACE INTO invoices (tenant, period, offset, time_us, event_id, body) \
         VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(&i.invoice.tenant)
    .bind(&i.invoice.period)
    .bind(to_i64(i.offset))
    .bind(i.time_us)
    .bind(&i.event_id)
    .bind(body)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}
