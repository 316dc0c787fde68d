//! The metering read model in SQLite (`metering.db`) or PostgreSQL (schema `metering`), next to
//! its consumer offsets: one next offset per events partition.
//!
//! Invariant (as in `projections/src/store.rs`): rows and the offsets are written in the same
//! transaction ([`MeteringStore::commit_batch`]), so the stored model is always exactly the
//! fold of the log up to the stored offsets.
//!
//! The SQL is shared through sqlx's `Any` driver (`$n` parameters, `ON CONFLICT` upserts); the
//! schema comes from per-engine migrations (`services/metering/migrations/{sqlite,postgres}`).
//! On PostgreSQL the tables live in their own schema (default `metering`), so they share a
//! database with the builds read model without sharing its migration history.
//!
//! **One writer**: [`MeteringStore::lock_writer`] takes a PostgreSQL session advisory lock on
//! a dedicated connection and routes every write through that connection; a replica that lost
//! the connection (and so the lock) cannot commit. Standby replicas wait in `lock_writer`.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use sqlx::any::{AnyConnectOptions, AnyRow};
use sqlx::migrate::Migrator;
use sqlx::{AnyConnection, AnyPool, ConnectOptions, Connection, Executor, Row};
use tokio::sync::Mutex;
use tributary_proto::events::InvoiceIssued;

use crate::calendar::{Day, Period};
use crate::fold::{
    AttemptKey, AttemptUsage, Dirty, IssuedInvoice, MeteringState, Part, PartKey, PendingInvoice,
    Pos, SeqSet, Usage, UsageKey,
};
use crate::invoice::Invoice;
use crate::MeteringError;
use tributary_sqlstore::{to_i64, to_u32, to_u64, Location, Migrations, Settings, Synchronous};

/// The PostgreSQL schema of the live metering tables.
pub const SCHEMA: &str = "metering";

static MIGRATIONS: Migrations = Migrations {
    sqlite: &SQLITE_MIGRATIONS,
    postgres: &POSTGRES_MIGRATIONS,
};
static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");

/// The database engine behind a [`MeteringStore`] (the shared store module's).
pub use tributary_sqlstore::Engine;

type Tx<'a> = sqlx::Transaction<'a, sqlx::Any>;

#[derive(Clone)]
pub struct MeteringStore {
    pool: AnyPool,
    engine: Engine,
    url: String,
    schema: String,
    /// The writer's own connection, holding the advisory lock (PostgreSQL, after
    /// [`MeteringStore::lock_writer`]).
    writer: Option<Arc<Mutex<Option<AnyConnection>>>>,
}

impl MeteringStore {
    /// Opens (creating if needed) the SQLite metering database at `path`, whatever the path
    /// holds (`#`, `?`, `%`, spaces).
    pub async fn open(path: &Path) -> Result<Self, MeteringError> {
        Self::open_at(&Location::SqliteFile(path.to_path_buf()), SCHEMA).await
    }

    /// Connects to `sqlite://PATH` or `postgres://USER:PASSWORD@HOST:PORT/DB` (schema
    /// [`SCHEMA`]) and migrates it.
    pub async fn connect(url: &str) -> Result<Self, MeteringError> {
        Self::connect_schema(url, SCHEMA).await
    }

    /// As [`MeteringStore::connect`], in PostgreSQL schema `schema` (created if missing;
    /// ignored on SQLite). Replay builds a fresh model in a schema of its own.
    pub async fn connect_schema(url: &str, schema: &str) -> Result<Self, MeteringError> {
        Self::open_at(&Location::Url(url.to_owned()), schema).await
    }

    async fn open_at(location: &Location, schema: &str) -> Result<Self, MeteringError> {
        let settings = Settings {
            what: "metering",
            migrations: MIGRATIONS,
            synchronous: Synchronous::Full,
            schema: Some(schema.to_owned()),
        };
        let store = tributary_sqlstore::open(location, &settings).await?;
        Ok(MeteringStore {
            pool: store.pool,
            engine: store.engine,
            url: store.url,
            schema: schema.to_owned(),
            writer: None,
        })
    }

    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// The PostgreSQL schema of the tables.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// Becomes the only writer: on PostgreSQL, waits (checking `stop` every second) until
    /// this process holds the session advisory lock of the schema on a connection of its own,
    /// through which every later write of the returned store goes. When that connection is
    /// lost, so is the lock, and every write fails: a replica that lost the lock cannot
    /// commit. On SQLite (one process per data directory) it returns the store as it is.
    /// `None` when `stop` fired first.
    pub async fn lock_writer(
        &self,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Result<Option<MeteringStore>, MeteringError> {
        if self.engine == Engine::Sqlite {
            return Ok(Some(self.clone()));
        }
        let options: AnyConnectOptions = self.url.parse()?;
        let mut conn = options.connect().await?;
        conn.execute(format!("SET search_path TO {}", self.schema).as_str())
            .await?;
        let key = format!("tributary.metering.{}", self.schema);
        let mut waited = false;
        loop {
            let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1))")
                .bind(&key)
                .fetch_one(&mut conn)
                .await?;
            if got {
                break;
            }
            if !waited {
                tracing::info!("another metering replica is active; standing by");
                waited = true;
            }
            tokio::select! {
                () = stop.cancelled() => return Ok(None),
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        let mut store = self.clone();
        store.writer = Some(Arc::new(Mutex::new(Some(conn))));
        Ok(Some(store))
    }

    /// Fails unless this store's writer connection is alive (and so still holds the lock).
    pub async fn check_writer(&self) -> Result<(), MeteringError> {
        if let Some(writer) = &self.writer {
            match writer.lock().await.as_mut() {
                Some(conn) => conn.ping().await?,
                None => return Err(released()),
            }
        }
        Ok(())
    }

    /// Gives the writer's lock up (closing its connection): a standby takes over, and this
    /// store's writes fail from now on.
    pub async fn release_writer(&self) {
        if let Some(writer) = &self.writer {
            if let Some(conn) = writer.lock().await.take() {
                let _ = conn.close().await;
            }
        }
    }

    pub async fn close(&self) {
        self.release_writer().await;
        self.pool.close().await;
    }

    /// Raw access for tests and tools (e.g. tampering with a row to prove `audit` notices).
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// The stored next offset of partition 0 (the single-partition log's only one).
    pub async fn next_offset(&self) -> Result<u64, MeteringError> {
        Ok(self.positions().await?.get(&0).copied().unwrap_or(0))
    }

    /// The stored next offset of every partition that has one.
    pub async fn positions(&self) -> Result<BTreeMap<u32, u64>, MeteringError> {
        let rows = sqlx::query("SELECT partition, next_offset FROM metering_offsets")
            .fetch_all(&self.pool)
            .await?;
        let mut out = BTreeMap::new();
        for row in rows {
            out.insert(
                to_u32(row.try_get(0)?, "partition")?,
                to_u64(row.try_get(1)?, "next_offset")?,
            );
        }
        Ok(out)
    }

    async fn write_conn(&self) -> Result<WriteConn<'_>, MeteringError> {
        match &self.writer {
            Some(writer) => Ok(WriteConn::Locked(writer.lock().await)),
            None => Ok(WriteConn::Pool(self.pool.acquire().await?)),
        }
    }

    /// Writes the rows `dirty` names and the fold's positions, in one transaction.
    pub async fn commit_batch(
        &self,
        state: &MeteringState,
        dirty: &Dirty,
    ) -> Result<(), MeteringError> {
        let mut conn = self.write_conn().await?;
        let mut tx = conn.conn()?.begin().await?;
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
        for tenant in &dirty.pending {
            write_pending(&mut tx, tenant, state.pending.get(tenant)).await?;
        }
        write_positions(&mut tx, state).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Replaces the whole stored model with `state` (and its positions), in one transaction:
    /// `tributary replay` rebuilding the metering model from the log.
    pub async fn replace_all(&self, state: &MeteringState) -> Result<(), MeteringError> {
        let mut conn = self.write_conn().await?;
        let mut tx = conn.conn()?.begin().await?;
        for table in [
            "usage_daily",
            "job_parts",
            "attempts",
            "invoices",
            "pending_invoices",
            "metering_offsets",
        ] {
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
        for (tenant, queue) in &state.pending {
            write_pending(&mut tx, tenant, Some(queue)).await?;
        }
        write_positions(&mut tx, state).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The whole stored model with its positions, read in one transaction (a consistent
    /// snapshot even while the projector writes).
    pub async fn load_all(&self) -> Result<MeteringState, MeteringError> {
        let mut tx = self.pool.begin().await?;
        let mut state = MeteringState::tracking();
        for row in sqlx::query("SELECT partition, next_offset FROM metering_offsets")
            .fetch_all(&mut *tx)
            .await?
        {
            state.set_position(
                to_u32(row.try_get(0)?, "partition")?,
                to_u64(row.try_get(1)?, "next_offset")?,
            );
        }
        let rejected: Option<i64> =
            sqlx::query_scalar("SELECT value FROM metering_counters WHERE name = 'rejected'")
                .fetch_optional(&mut *tx)
                .await?;
        state.rejected = rejected.map_or(Ok(0), |v| to_u64(v, "rejected"))?;
        load_parts(&mut tx, None, &mut state).await?;
        load_invoices(&mut tx, None, &mut state).await?;
        for row in sqlx::query("SELECT * FROM usage_daily")
            .fetch_all(&mut *tx)
            .await?
        {
            let (key, millis) = usage_from_row(&row)?;
            state.usage.insert(
                key,
                Usage {
                    millis,
                    last: pos_of(&row, "last_partition", "last_offset")?,
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
        for row in sqlx::query("SELECT * FROM pending_invoices ORDER BY tenant, seq")
            .fetch_all(&mut *tx)
            .await?
        {
            let tenant: String = row.try_get("tenant")?;
            let body: Vec<u8> = row.try_get("body")?;
            let event = InvoiceIssued::decode(body.as_slice())
                .map_err(|e| corrupt(format!("pending invoice body ({e})")))?;
            state
                .pending
                .entry(tenant)
                .or_default()
                .push_back(PendingInvoice {
                    event,
                    at: pos_of(&row, "partition", "offset")?,
                    time_us: row.try_get("time_us")?,
                    event_id: row.try_get("event_id")?,
                });
        }
        tx.commit().await?;
        state.take_dirty();
        Ok(state)
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
        let row = sqlx::query("SELECT * FROM invoices WHERE tenant = $1 AND period = $2")
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
        let rows = sqlx::query("SELECT * FROM attempts WHERE build_id = $1 ORDER BY job, attempt")
            .bind(build_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(attempt_from_row).collect()
    }

    /// Usage records (tenant, project, class, day, millis) of a tenant, ordered.
    pub async fn usage_records(&self, tenant: &str) -> Result<Vec<(UsageKey, u64)>, MeteringError> {
        let rows = sqlx::query(
            "SELECT * FROM usage_daily WHERE tenant = $1 ORDER BY day, project, machine_class",
        )
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(usage_from_row).collect()
    }
}

/// The connection writes go through: one of the pool's, or the locked writer's.
enum WriteConn<'a> {
    Pool(sqlx::pool::PoolConnection<sqlx::Any>),
    Locked(tokio::sync::MutexGuard<'a, Option<AnyConnection>>),
}

impl WriteConn<'_> {
    fn conn(&mut self) -> Result<&mut AnyConnection, MeteringError> {
        match self {
            WriteConn::Pool(c) => Ok(c),
            WriteConn::Locked(c) => c.as_mut().ok_or_else(released),
        }
    }
}

fn released() -> MeteringError {
    MeteringError::Corrupt(
        "this metering replica gave up the writer's lock: it no longer writes".into(),
    )
}

fn corrupt(what: String) -> MeteringError {
    MeteringError::Corrupt(format!("the metering database holds an invalid {what}"))
}

fn pos_of(
    row: &AnyRow,
    partition: &'static str,
    offset: &'static str,
) -> Result<Pos, MeteringError> {
    Ok(Pos {
        partition: to_u32(row.try_get(partition)?, partition)?,
        offset: to_u64(row.try_get(offset)?, offset)?,
    })
}

fn usage_from_row(row: &AnyRow) -> Result<(UsageKey, u64), MeteringError> {
    let day: String = row.try_get("day")?;
    Ok((
        UsageKey {
            tenant: row.try_get("tenant")?,
            project: row.try_get("project")?,
            machine_class: row.try_get("machine_class")?,
            day: Day::parse(&day).ok_or_else(|| corrupt(format!("day {day:?}")))?,
        },
        to_u64(row.try_get("millis")?, "millis")?,
    ))
}

async fn load_parts(
    tx: &mut Tx<'_>,
    tenant: Option<&str>,
    state: &mut MeteringState,
) -> Result<(), MeteringError> {
    let rows = match tenant {
        Some(t) => {
            sqlx::query("SELECT * FROM job_parts WHERE tenant = $1")
                .bind(t)
                .fetch_all(&mut **tx)
                .await?
        }
        None => {
            sqlx::query("SELECT * FROM job_parts")
                .fetch_all(&mut **tx)
                .await?
        }
    };
    for row in rows {
        let period: String = row.try_get("period")?;
        let key = PartKey {
            tenant: row.try_get("tenant")?,
            period: Period::parse(&period).map_err(|_| corrupt(format!("period {period:?}")))?,
            build_id: row.try_get("build_id")?,
            job: row.try_get("job")?,
            attempt: to_u32(row.try_get("attempt")?, "attempt")?,
            machine_class: row.try_get("machine_class")?,
        };
        state.part_keys.insert(key.clone());
        state.parts.insert(
            key,
            Part {
                project: row.try_get("project")?,
                millis: to_u64(row.try_get("millis")?, "millis")?,
                billed_millis: row
                    .try_get::<Option<i64>, _>("billed_millis")?
                    .map(|v| to_u64(v, "billed_millis"))
                    .transpose()?,
                last: pos_of(&row, "last_partition", "last_offset")?,
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
    let rows = match tenant {
        Some(t) => {
            sqlx::query("SELECT * FROM invoices WHERE tenant = $1")
                .bind(t)
                .fetch_all(&mut **tx)
                .await?
        }
        None => {
            sqlx::query("SELECT * FROM invoices")
                .fetch_all(&mut **tx)
                .await?
        }
    };
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

fn invoice_from_row(row: &AnyRow) -> Result<IssuedInvoice, MeteringError> {
    let body: Vec<u8> = row.try_get("body")?;
    let event = InvoiceIssued::decode(body.as_slice())
        .map_err(|e| corrupt(format!("invoice body ({e})")))?;
    Ok(IssuedInvoice {
        invoice: Invoice::from_event(&event),
        at: pos_of(row, "partition", "offset")?,
        time_us: row.try_get("time_us")?,
        event_id: row.try_get("event_id")?,
    })
}

fn attempt_from_row(row: &AnyRow) -> Result<(AttemptKey, AttemptUsage), MeteringError> {
    let sparse: String = row.try_get("seq_sparse")?;
    let ids: String = row.try_get("seq_ids")?;
    Ok((
        AttemptKey {
            build_id: row.try_get("build_id")?,
            job: row.try_get("job")?,
            attempt: to_u32(row.try_get("attempt")?, "attempt")?,
        },
        AttemptUsage {
            tenant: row.try_get("tenant")?,
            project: row.try_get("project")?,
            machine_class: row.try_get("machine_class")?,
            millis: to_u64(row.try_get("millis")?, "millis")?,
            ticks: to_u64(row.try_get("ticks")?, "ticks")?,
            complete: row.try_get::<i64, _>("complete")? != 0,
            ended: row.try_get::<i64, _>("ended")? != 0,
            seqs: SeqSet {
                contiguous: to_u32(row.try_get("seq_contiguous")?, "seq_contiguous")?,
                sparse: serde_json::from_str(&sparse)
                    .map_err(|_| corrupt("tick sequence set".into()))?,
                ids: serde_json::from_str(&ids).map_err(|_| corrupt("tick id set".into()))?,
            },
            last: pos_of(row, "last_partition", "last_offset")?,
        },
    ))
}

async fn write_positions(
    tx: &mut AnyConnection,
    state: &MeteringState,
) -> Result<(), MeteringError> {
    for (partition, next) in state.positions.iter().enumerate() {
        sqlx::query(
            "INSERT INTO metering_offsets (partition, next_offset) VALUES ($1, $2) \
             ON CONFLICT (partition) DO UPDATE SET next_offset = excluded.next_offset",
        )
        .bind(partition as i64)
        .bind(to_i64(*next, "next_offset")?)
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query(
        "INSERT INTO metering_counters (name, value) VALUES ('rejected', $1) \
         ON CONFLICT (name) DO UPDATE SET value = excluded.value",
    )
    .bind(to_i64(state.rejected, "rejected")?)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

async fn write_usage(tx: &mut AnyConnection, k: &UsageKey, u: &Usage) -> Result<(), MeteringError> {
    sqlx::query(
        "INSERT INTO usage_daily (tenant, project, machine_class, day, millis, last_offset, \
         last_partition) VALUES ($1, $2, $3, $4, $5, $6, $7) \
         ON CONFLICT (tenant, project, machine_class, day) DO UPDATE SET \
         millis = excluded.millis, last_offset = excluded.last_offset, \
         last_partition = excluded.last_partition",
    )
    .bind(&k.tenant)
    .bind(&k.project)
    .bind(&k.machine_class)
    .bind(k.day.to_string())
    .bind(to_i64(u.millis, "millis")?)
    .bind(to_i64(u.last.offset, "offset")?)
    .bind(i64::from(u.last.partition))
    .execute(&mut *tx)
    .await?;
    Ok(())
}

async fn write_part(tx: &mut AnyConnection, k: &PartKey, p: &Part) -> Result<(), MeteringError> {
    sqlx::query(
        "INSERT INTO job_parts (tenant, period, build_id, job, attempt, machine_class, project, \
         millis, billed_millis, last_offset, last_partition) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
         ON CONFLICT (tenant, period, build_id, job, attempt, machine_class) DO UPDATE SET \
         project = excluded.project, millis = excluded.millis, \
         billed_millis = excluded.billed_millis, last_offset = excluded.last_offset, \
         last_partition = excluded.last_partition",
    )
    .bind(&k.tenant)
    .bind(k.period.to_string())
    .bind(&k.build_id)
    .bind(&k.job)
    .bind(i64::from(k.attempt))
    .bind(&k.machine_class)
    .bind(&p.project)
    .bind(to_i64(p.millis, "millis")?)
    .bind(
        p.billed_millis
            .map(|v| to_i64(v, "billed_millis"))
            .transpose()?,
    )
    .bind(to_i64(p.last.offset, "offset")?)
    .bind(i64::from(p.last.partition))
    .execute(&mut *tx)
    .await?;
    Ok(())
}

async fn write_attempt(
    tx: &mut AnyConnection,
    k: &AttemptKey,
    a: &AttemptUsage,
) -> Result<(), MeteringError> {
    sqlx::query(
        "INSERT INTO attempts (build_id, job, attempt, tenant, project, machine_class, millis, \
         ticks, complete, ended, seq_contiguous, seq_sparse, seq_ids, last_offset, \
         last_partition) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, \
         $15) ON CONFLICT (build_id, job, attempt) DO UPDATE SET tenant = excluded.tenant, \
         project = excluded.project, machine_class = excluded.machine_class, \
         millis = excluded.millis, ticks = excluded.ticks, complete = excluded.complete, \
         ended = excluded.ended, seq_contiguous = excluded.seq_contiguous, \
         seq_sparse = excluded.seq_sparse, seq_ids = excluded.seq_ids, \
         last_offset = excluded.last_offset, last_partition = excluded.last_partition",
    )
    .bind(&k.build_id)
    .bind(&k.job)
    .bind(i64::from(k.attempt))
    .bind(&a.tenant)
    .bind(&a.project)
    .bind(&a.machine_class)
    .bind(to_i64(a.millis, "millis")?)
    .bind(to_i64(a.ticks, "ticks")?)
    .bind(i64::from(a.complete))
    .bind(i64::from(a.ended))
    .bind(i64::from(a.seqs.contiguous))
    .bind(serde_json::to_string(&a.seqs.sparse)?)
    .bind(serde_json::to_string(&a.seqs.ids)?)
    .bind(to_i64(a.last.offset, "offset")?)
    .bind(i64::from(a.last.partition))
    .execute(&mut *tx)
    .await?;
    Ok(())
}

fn invoice_body(i: &Invoice) -> Vec<u8> {
    InvoiceIssued {
        tenant: i.tenant.clone(),
        period: i.period.clone(),
        plan_version: i.plan_version.clone(),
        plan_toml: String::new(),
        currency: i.currency.clone(),
        lines: i.lines.clone(),
        total_micros: i.total_micros,
        cut: Vec::new(),
    }
    .encode_to_vec()
}

async fn write_invoice(tx: &mut AnyConnection, i: &IssuedInvoice) -> Result<(), MeteringError> {
    sqlx::query(
        "INSERT INTO invoices (tenant, period, \"offset\", time_us, event_id, body, partition) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (tenant, period) DO UPDATE SET \
         \"offset\" = excluded.\"offset\", time_us = excluded.time_us, \
         event_id = excluded.event_id, body = excluded.body, partition = excluded.partition",
    )
    .bind(&i.invoice.tenant)
    .bind(&i.invoice.period)
    .bind(to_i64(i.at.offset, "offset")?)
    .bind(i.time_us)
    .bind(&i.event_id)
    .bind(invoice_body(&i.invoice))
    .bind(i64::from(i.at.partition))
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Replaces the stored queue of `tenant`'s pending invoices with `queue`.
async fn write_pending(
    tx: &mut AnyConnection,
    tenant: &str,
    queue: Option<&VecDeque<PendingInvoice>>,
) -> Result<(), MeteringError> {
    sqlx::query("DELETE FROM pending_invoices WHERE tenant = $1")
        .bind(tenant)
        .execute(&mut *tx)
        .await?;
    for (seq, p) in queue.into_iter().flatten().enumerate() {
        sqlx::query(
            "INSERT INTO pending_invoices (tenant, seq, partition, \"offset\", time_us, \
             event_id, body) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(tenant)
        .bind(seq as i64)
        .bind(i64::from(p.at.partition))
        .bind(to_i64(p.at.offset, "offset")?)
        .bind(p.time_us)
        .bind(&p.event_id)
        .bind(p.event.encode_to_vec())
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}
