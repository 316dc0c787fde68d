//! Persistence of the builds read model in SQL tables, next to the projector's consumer offset.
//!
//! Invariant: rows and the `(projection, partition) -> next_offset` row are only ever written
//! in the same transaction ([`BuildsStore::commit_batch`]), so the stored read model is always
//! exactly the fold of the log prefix `[0, next_offset)`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;

use sqlx::any::AnyRow;
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, Row};
use tributary_sqlstore::{to_i64, to_u32, to_u64, Location, Migrations, Settings, Synchronous};

use crate::builds::{Build, BuildsState, Job, Line, Phase, Step, Touch};
use crate::chunks::{overlay, ChunkCounts, ChunkKey};
use crate::ProjectionError;

/// A partition's stored next offset moving from `from` to `to` (see
/// [`BuildsStore::commit_batch_at`]): what a batch of the consumer runtime moved.
pub use tributary_eventlog::runtime::Advance;

/// Per build id, the ids of the events last applied to it (oldest first).
pub type EventIds = HashMap<String, VecDeque<String>>;

/// Name of the builds projection in the offsets table.
pub const BUILDS_PROJECTION: &str = "builds";

/// The read model's migrations, one directory per engine (`projections/migrations/{sqlite,postgres}`).
static MIGRATIONS: Migrations = Migrations {
    sqlite: &SQLITE_MIGRATIONS,
    postgres: &POSTGRES_MIGRATIONS,
};
static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");

/// The database engine behind a [`BuildsStore`] (the shared store module's).
pub use tributary_sqlstore::Engine;

/// The builds read model's tables in one SQLite or PostgreSQL database.
///
/// The SQL is shared: `$n` parameters (SQLite reads them as positional too) and
/// `INSERT ... ON CONFLICT ... DO UPDATE` upserts, through sqlx's `Any` driver. Opening (engine,
/// URL, pool, per-engine migrations from `projections/migrations/{sqlite,postgres}`) is
/// `tributary-sqlstore`'s.
#[derive(Clone)]
pub struct BuildsStore {
    pool: AnyPool,
    engine: Engine,
    /// The PostgreSQL URL (for the `LISTEN` connection of [`crate::positions`]); None on
    /// SQLite.
    url: Option<std::sync::Arc<str>>,
}

impl BuildsStore {
    /// Opens (creating if needed) the SQLite read-model database at `path`, whatever the path
    /// holds (`#`, `?`, `%`, spaces).
    pub async fn open(path: &Path) -> Result<Self, ProjectionError> {
        Self::open_at(&Location::SqliteFile(path.to_path_buf())).await
    }

    /// Connects to the read-model database at `url`: `sqlite://PATH[?mode=rwc]` or
    /// `postgres://USER:PASSWORD@HOST:PORT/DATABASE`, and migrates its schema.
    pub async fn connect(url: &str) -> Result<Self, ProjectionError> {
        Self::open_at(&Location::Url(url.to_owned())).await
    }

    async fn open_at(location: &Location) -> Result<Self, ProjectionError> {
        let settings = Settings {
            what: "read-model",
            migrations: MIGRATIONS,
            // WAL without a sync per commit: a read model is rebuilt from the log, and its
            // offset commits with its rows, so a power loss can only take both back to an
            // earlier consistent point, from which the projector replays. (A sync per commit
            // here would queue behind, and ahead of, the log's own syncs on the same disk.)
            synchronous: Synchronous::Normal,
            schema: None,
        };
        let store = tributary_sqlstore::open(location, &settings).await?;
        let url = (store.engine == Engine::Postgres).then(|| store.url.as_str().into());
        Ok(BuildsStore {
            pool: store.pool,
            engine: store.engine,
            url,
        })
    }

    /// The database engine.
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// The PostgreSQL URL the store was opened with (None on SQLite).
    pub fn url(&self) -> Option<&str> {
        self.url.as_deref()
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// The next log offset the projection has to apply (0 for a fresh store).
    pub async fn next_offset(&self) -> Result<u64, ProjectionError> {
        let row = sqlx::query(
            "SELECT next_offset FROM projection_offsets WHERE projection = $1 AND partition = 0",
        )
        .bind(BUILDS_PROJECTION)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            Some(row) => to_u64(row.try_get::<i64, _>(0)?, "next_offset")?,
            None => 0,
        })
    }

    /// The next offset to apply of every partition the projection has stored one for.
    pub async fn next_offsets(&self) -> Result<BTreeMap<u32, u64>, ProjectionError> {
        let rows = sqlx::query(
            "SELECT partition, next_offset FROM projection_offsets WHERE projection = $1",
        )
        .bind(BUILDS_PROJECTION)
        .fetch_all(&self.pool)
        .await?;
        let mut offsets = BTreeMap::new();
        for row in rows {
            let partition = to_u32(row.try_get::<i64, _>(0)?, "partition")?;
            offsets.insert(partition, to_u64(row.try_get::<i64, _>(1)?, "next_offset")?);
        }
        Ok(offsets)
    }

    /// Writes what `touched` names of `state`, and the new offset, in one transaction.
    pub async fn commit_batch(
        &self,
        state: &BuildsState,
        touched: &[(String, Touch)],
        next_offset: u64,
    ) -> Result<(), ProjectionError> {
        let mut tx = self.pool.begin().await?;
        for (build_id, touch) in touched {
            if let Some(build) = state.builds.get(build_id) {
                write_touch(&mut tx, build, touch).await?;
            }
        }
        write_offset_of(&mut tx, 0, next_offset).await?;
        self.notify_positions(&mut tx, [(0, next_offset)]).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Writes what `touched` names of `state`, the recent event ids of those builds (from
    /// `event_ids`), and advances each partition's offset in `advances`, in one transaction.
    ///
    /// Fenced: each [`Advance`] applies only if the stored offset is still its `from` (else
    /// another projector, e.g. one that took the partition over while this one stalled, has
    /// written since): then nothing is written and [`ProjectionError::Fenced`] says which
    /// partition; the caller reloads its offsets and state and retries.
    pub async fn commit_batch_at(
        &self,
        state: &BuildsState,
        touched: &[(String, Touch)],
        advances: &[Advance],
        event_ids: &EventIds,
    ) -> Result<(), ProjectionError> {
        let mut tx = self.pool.begin().await?;
        let mut ids_written = Vec::new();
        for (build_id, touch) in touched {
            let Some(build) = state.builds.get(build_id) else {
                continue;
            };
            write_touch(&mut tx, build, touch).await?;
            if let Some(ids) = event_ids.get(build_id) {
                if !ids_written.contains(&build_id) {
                    write_event_ids(&mut tx, build_id, ids).await?;
                    ids_written.push(build_id);
                }
            }
        }
        for advance in advances {
            advance_offset(&mut tx, advance).await?;
        }
        self.notify_positions(&mut tx, advances.iter().map(|a| (a.partition, a.to)))
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// On PostgreSQL, tells the API processes listening ([`crate::positions`]) where the
    /// read model now is; delivered when `tx` commits, never before.
    async fn notify_positions(
        &self,
        tx: &mut Tx<'_>,
        positions: impl IntoIterator<Item = (u32, u64)>,
    ) -> Result<(), ProjectionError> {
        if self.engine != Engine::Postgres {
            return Ok(());
        }
        let payload = crate::positions::describe(positions.into_iter());
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(crate::positions::NOTIFY_CHANNEL)
            .bind(payload)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// The ids of the events last applied to build `id` (oldest first), as stored.
    pub async fn load_event_ids(&self, id: &str) -> Result<VecDeque<String>, ProjectionError> {
        let ids: Option<String> =
            sqlx::query_scalar("SELECT ids FROM build_event_ids WHERE build_id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(match ids {
            Some(ids) => serde_json::from_str(&ids)?,
            None => VecDeque::new(),
        })
    }

    /// One build with its jobs, steps and lines.
    pub async fn load_build(&self, id: &str) -> Result<Option<Build>, ProjectionError> {
        let row = sqlx::query("SELECT * FROM builds WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let mut build = build_from_row(&row)?;
        load_children(&self.pool, &mut build).await?;
        let counts = self.load_chunk_counts(id).await?;
        overlay(&mut build, &counts);
        Ok(Some(build))
    }

    /// The log byte counters of build `id` (from a separate logs topic; see [`crate::chunks`]).
    pub async fn load_chunk_counts(&self, id: &str) -> Result<ChunkCounts, ProjectionError> {
        let rows = sqlx::query(
            "SELECT job, attempt, step, line, bytes FROM chunk_bytes WHERE build_id = $1",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        let mut counts = ChunkCounts::new();
        for row in rows {
            let key = ChunkKey {
                build_id: id.to_owned(),
                job: row.try_get("job")?,
                attempt: to_u32(row.try_get("attempt")?, "attempt")?,
                step: to_u32(row.try_get("step")?, "step")?,
                line: to_u32(row.try_get("line")?, "line")?,
            };
            counts.insert(key, to_u64(row.try_get("bytes")?, "bytes")?);
        }
        Ok(counts)
    }

    /// The ids of the chunks last counted for build `id` (oldest first).
    pub async fn load_chunk_event_ids(
        &self,
        id: &str,
    ) -> Result<VecDeque<String>, ProjectionError> {
        let ids: Option<String> =
            sqlx::query_scalar("SELECT ids FROM chunk_event_ids WHERE build_id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(match ids {
            Some(ids) => serde_json::from_str(&ids)?,
            None => VecDeque::new(),
        })
    }

    /// Adds `increments` to the chunk counters, stores the recent chunk ids of those builds
    /// and advances each logs partition in `advances`, in one transaction, fenced like
    /// [`Self::commit_batch_at`].
    pub async fn commit_chunks(
        &self,
        increments: &ChunkCounts,
        event_ids: &EventIds,
        advances: &[Advance],
    ) -> Result<(), ProjectionError> {
        let mut tx = self.pool.begin().await?;
        add_chunk_bytes(&mut tx, increments, true).await?;
        let builds: std::collections::BTreeSet<&String> =
            increments.keys().map(|k| &k.build_id).collect();
        for build_id in builds {
            if let Some(ids) = event_ids.get(build_id) {
                sqlx::query(
                    "INSERT INTO chunk_event_ids (build_id, ids) VALUES ($1, $2) \
                     ON CONFLICT (build_id) DO UPDATE SET ids = excluded.ids",
                )
                .bind(build_id)
                .bind(serde_json::to_string(ids)?)
                .execute(&mut *tx)
                .await?;
            }
        }
        for advance in advances {
            advance_offset(&mut tx, advance).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Builds (without jobs), newest first.
    pub async fn list_builds(&self, limit: u32) -> Result<Vec<Build>, ProjectionError> {
        let rows = sqlx::query("SELECT * FROM builds ORDER BY triggered_us DESC, id DESC LIMIT $1")
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(build_from_row).collect()
    }

    /// A tenant's builds (without jobs), newest first, optionally of one project and phase.
    pub async fn list_builds_for(
        &self,
        tenant: &str,
        project: Option<&str>,
        phase: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Build>, ProjectionError> {
        let rows = sqlx::query(
            "SELECT * FROM builds WHERE tenant = $1 AND ($2 IS NULL OR project = $2) \
             AND ($3 IS NULL OR phase = $3) ORDER BY triggered_us DESC, id DESC LIMIT $4",
        )
        .bind(tenant)
        .bind(project)
        .bind(phase)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(build_from_row).collect()
    }

    /// Ids of builds starting with `prefix` (of `tenant`, or of any tenant with `None`), at
    /// most `limit`, in id order: how a shortened build id is resolved. A prefix with anything
    /// but hex digits and `-` matches nothing (no LIKE wildcards get through).
    pub async fn build_ids_with_prefix(
        &self,
        tenant: Option<&str>,
        prefix: &str,
        limit: u32,
    ) -> Result<Vec<String>, ProjectionError> {
        if prefix.is_empty() || !prefix.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM builds WHERE id LIKE $1 AND ($2 IS NULL OR tenant = $2) \
             ORDER BY id LIMIT $3",
        )
        .bind(format!("{}%", prefix.to_ascii_lowercase()))
        .bind(tenant)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(ids)
    }

    /// The whole stored read model.
    pub async fn load_all(&self) -> Result<BuildsState, ProjectionError> {
        let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM builds ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        let mut state = BuildsState::default();
        for id in ids {
            if let Some(build) = self.load_build(&id).await? {
                state.builds.insert(id, build);
            }
        }
        Ok(state)
    }

    /// Replaces the whole stored read model with `state` at `next_offset`, in one transaction.
    pub async fn replace_all(
        &self,
        state: &BuildsState,
        next_offset: u64,
    ) -> Result<(), ProjectionError> {
        self.replace_all_at(state, &ChunkCounts::new(), &[(0, next_offset)])
            .await
    }

    /// Replaces the whole stored read model with `state`, its stored offsets with `positions`
    /// (one per partition), in one transaction. The recent event ids are cleared: a replay
    /// dedupes by event id over the whole log.
    pub async fn replace_all_at(
        &self,
        state: &BuildsState,
        counts: &ChunkCounts,
        positions: &[(u32, u64)],
    ) -> Result<(), ProjectionError> {
        let mut tx = self.pool.begin().await?;
        for table in [
            "builds",
            "jobs",
            "steps",
            "lines",
            "build_event_ids",
            "chunk_bytes",
            "chunk_event_ids",
        ] {
            sqlx::query(&format!("DELETE FROM {table}"))
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("DELETE FROM projection_offsets WHERE projection = $1")
            .bind(BUILDS_PROJECTION)
            .execute(&mut *tx)
            .await?;
        for build in state.builds.values() {
            write_touch(&mut tx, build, &Touch::WholeBuild).await?;
        }
        add_chunk_bytes(&mut tx, counts, false).await?;
        for (partition, next) in positions {
            write_offset_of(&mut tx, *partition, *next).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Raw access for tests and tools (e.g. tampering with a row to prove `--check` notices).
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }
}

type Tx<'a> = sqlx::Transaction<'a, sqlx::Any>;

/// Moves a partition's stored offset from `from` to `to`, only if it is still `from` (a
/// partition never stored counts as 0).
async fn advance_offset(tx: &mut Tx<'_>, advance: &Advance) -> Result<(), ProjectionError> {
    let updated = sqlx::query(
        "UPDATE projection_offsets SET next_offset = $4 \
         WHERE projection = $1 AND partition = $2 AND next_offset = $3",
    )
    .bind(BUILDS_PROJECTION)
    .bind(i64::from(advance.partition))
    .bind(to_i64(advance.from, "next_offset")?)
    .bind(to_i64(advance.to, "next_offset")?)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if updated == 1 {
        return Ok(());
    }
    if advance.from == 0 {
        let inserted = sqlx::query(
            "INSERT INTO projection_offsets (projection, partition, next_offset) \
             VALUES ($1, $2, $3) ON CONFLICT (projection, partition) DO NOTHING",
        )
        .bind(BUILDS_PROJECTION)
        .bind(i64::from(advance.partition))
        .bind(to_i64(advance.to, "next_offset")?)
        .execute(&mut **tx)
        .await?
        .rows_affected();
        if inserted == 1 {
            return Ok(());
        }
    }
    Err(ProjectionError::Fenced {
        partition: advance.partition,
        expected: advance.from,
    })
}

/// Records the projection's next offset in `partition`; always inside the transaction that
/// wrote its rows.
async fn write_offset_of(
    tx: &mut Tx<'_>,
    partition: u32,
    next_offset: u64,
) -> Result<(), ProjectionError> {
    sqlx::query(
        "INSERT INTO projection_offsets (projection, partition, next_offset) VALUES ($1, $2, $3) \
         ON CONFLICT (projection, partition) DO UPDATE SET next_offset = excluded.next_offset",
    )
    .bind(BUILDS_PROJECTION)
    .bind(i64::from(partition))
    .bind(to_i64(next_offset, "next_offset")?)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Adds `counts` to the counters (`add`), or writes them as they are.
async fn add_chunk_bytes(
    tx: &mut Tx<'_>,
    counts: &ChunkCounts,
    add: bool,
) -> Result<(), ProjectionError> {
    let sql = if add {
        "INSERT INTO chunk_bytes (build_id, job, attempt, step, line, bytes) VALUES \
         ($1, $2, $3, $4, $5, $6) ON CONFLICT (build_id, job, attempt, step, line) \
         DO UPDATE SET bytes = chunk_bytes.bytes + excluded.bytes"
    } else {
        "INSERT INTO chunk_bytes (build_id, job, attempt, step, line, bytes) VALUES \
         ($1, $2, $3, $4, $5, $6) ON CONFLICT (build_id, job, attempt, step, line) \
         DO UPDATE SET bytes = excluded.bytes"
    };
    for (key, bytes) in counts {
        sqlx::query(sql)
            .bind(&key.build_id)
            .bind(&key.job)
            .bind(i64::from(key.attempt))
            .bind(i64::from(key.step))
            .bind(i64::from(key.line))
            .bind(to_i64(*bytes, "bytes")?)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

async fn write_event_ids(
    tx: &mut Tx<'_>,
    build_id: &str,
    ids: &VecDeque<String>,
) -> Result<(), ProjectionError> {
    sqlx::query(
        "INSERT INTO build_event_ids (build_id, ids) VALUES ($1, $2) \
         ON CONFLICT (build_id) DO UPDATE SET ids = excluded.ids",
    )
    .bind(build_id)
    .bind(serde_json::to_string(ids)?)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn write_touch(tx: &mut Tx<'_>, build: &Build, touch: &Touch) -> Result<(), ProjectionError> {
    match touch {
        Touch::Nothing => return Ok(()),
        Touch::Build => write_build(tx, build).await?,
        Touch::WholeBuild => {
            write_build(tx, build).await?;
            for table in ["jobs", "steps", "lines"] {
                sqlx::query(&format!("DELETE FROM {table} WHERE build_id = $1"))
                    .bind(&build.id)
                    .execute(&mut **tx)
                    .await?;
            }
            for (j, job) in build.jobs.iter().enumerate() {
                write_job_tree(tx, build, j, job).await?;
            }
        }
        Touch::Job(job_id) => {
            write_build(tx, build).await?;
            if let Some((j, job)) = build.jobs.iter().enumerate().find(|(_, j)| &j.id == job_id) {
                write_job_tree(tx, build, j, job).await?;
            }
        }
        Touch::Line { job, step, line } => {
            write_build(tx, build).await?;
            if let Some((j, job)) = build.jobs.iter().enumerate().find(|(_, j)| &j.id == job) {
                write_job(tx, build, j, job).await?;
                if let Some(s) = job.steps.get(*step as usize) {
                    write_step(tx, build, j, *step as usize, s).await?;
                    if let Some(l) = s.lines.get(*line as usize) {
                        write_line(tx, build, j, *step as usize, *line as usize, l).await?;
                    }
                }
            }
        }
    }
    Ok(())
}

async fn write_build(tx: &mut Tx<'_>, b: &Build) -> Result<(), ProjectionError> {
    sqlx::query(
        "INSERT INTO builds (id, tenant, project, number, phase, who, source, repository, \
         git_ref, commit_sha, pipeline_path, triggered_us, started_us, finished_us, \
         reason, last_offset) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, \
         $13, $14, $15, $16) ON CONFLICT (id) DO UPDATE SET tenant = excluded.tenant, \
         project = excluded.project, number = excluded.number, phase = excluded.phase, \
         who = excluded.who, source = excluded.source, repository = excluded.repository, \
         git_ref = excluded.git_ref, commit_sha = excluded.commit_sha, pipeline_path = \
         excluded.pipeline_path, triggered_us = excluded.triggered_us, started_us = \
         excluded.started_us, finished_us = excluded.finished_us, reason = \
         excluded.reason, last_offset = excluded.last_offset",
    )
    .bind(&b.id)
    .bind(&b.tenant)
    .bind(&b.project)
    .bind(to_i64(b.number, "number")?)
    .bind(b.phase.name())
    .bind(&b.who)
    .bind(&b.source)
    .bind(&b.repository)
    .bind(&b.git_ref)
    .bind(&b.commit)
    .bind(&b.pipeline_path)
    .bind(b.triggered_us)
    .bind(b.started_us)
    .bind(b.finished_us)
    .bind(&b.reason)
    .bind(to_i64(b.last_offset, "last_offset")?)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn write_job_tree(
    tx: &mut Tx<'_>,
    b: &Build,
    j: usize,
    job: &Job,
) -> Result<(), ProjectionError> {
    write_job(tx, b, j, job).await?;
    for (s, step) in job.steps.iter().enumerate() {
        write_step(tx, b, j, s, step).await?;
        for (l, line) in step.lines.iter().enumerate() {
            write_line(tx, b, j, s, l, line).await?;
        }
    }
    Ok(())
}

async fn write_job(tx: &mut Tx<'_>, b: &Build, j: usize, job: &Job) -> Result<(), ProjectionError> {
    sqlx::query(
        "INSERT INTO jobs (build_id, idx, id, name, matrix, needs, phase, attempt, \
         agent_id, lease_id, queued_us, started_us, finished_us, exit_code, reason, \
         log_bytes) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, \
         $15, $16) ON CONFLICT (build_id, idx) DO UPDATE SET id = excluded.id, name = \
         excluded.name, matrix = excluded.matrix, needs = excluded.needs, phase = \
         excluded.phase, attempt = excluded.attempt, agent_id = excluded.agent_id, \
         lease_id = excluded.lease_id, queued_us = excluded.queued_us, started_us = \
         excluded.started_us, finished_us = excluded.finished_us, exit_code = \
         excluded.exit_code, reason = excluded.reason, log_bytes = excluded.log_bytes",
    )
    .bind(&b.id)
    .bind(j as i64)
    .bind(&job.id)
    .bind(&job.name)
    .bind(serde_json::to_string(&job.matrix)?)
    .bind(serde_json::to_string(&job.needs)?)
    .bind(job.phase.name())
    .bind(i64::from(job.attempt))
    .bind(&job.agent_id)
    .bind(&job.lease_id)
    .bind(job.queued_us)
    .bind(job.started_us)
    .bind(job.finished_us)
    .bind(job.exit_code)
    .bind(&job.reason)
    .bind(to_i64(job.log_bytes, "log_bytes")?)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn write_step(
    tx: &mut Tx<'_>,
    b: &Build,
    j: usize,
    s: usize,
    step: &Step,
) -> Result<(), ProjectionError> {
    sqlx::query(
        "INSERT INTO steps (build_id, job_idx, idx, name, phase, started_us, duration_us, \
         exit_code) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (build_id, \
         job_idx, idx) DO UPDATE SET name = excluded.name, phase = excluded.phase, \
         started_us = excluded.started_us, duration_us = excluded.duration_us, exit_code \
         = excluded.exit_code",
    )
    .bind(&b.id)
    .bind(j as i64)
    .bind(s as i64)
    .bind(&step.name)
    .bind(step.phase.name())
    .bind(step.started_us)
    .bind(
        step.duration_us
            .map(|d| to_i64(d, "duration_us"))
            .transpose()?,
    )
    .bind(step.exit_code)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn write_line(
    tx: &mut Tx<'_>,
    b: &Build,
    j: usize,
    s: usize,
    l: usize,
    line: &Line,
) -> Result<(), ProjectionError> {
    sqlx::query(
        "INSERT INTO lines (build_id, job_idx, step_idx, idx, text, phase, started_us, \
         duration_us, exit_code, log_bytes) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, \
         $10) ON CONFLICT (build_id, job_idx, step_idx, idx) DO UPDATE SET text = \
         excluded.text, phase = excluded.phase, started_us = excluded.started_us, \
         duration_us = excluded.duration_us, exit_code = excluded.exit_code, log_bytes = \
         excluded.log_bytes",
    )
    .bind(&b.id)
    .bind(j as i64)
    .bind(s as i64)
    .bind(l as i64)
    .bind(&line.text)
    .bind(line.phase.name())
    .bind(line.started_us)
    .bind(
        line.duration_us
            .map(|d| to_i64(d, "duration_us"))
            .transpose()?,
    )
    .bind(line.exit_code)
    .bind(to_i64(line.log_bytes, "log_bytes")?)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn load_children(pool: &AnyPool, build: &mut Build) -> Result<(), ProjectionError> {
    let jobs = sqlx::query("SELECT * FROM jobs WHERE build_id = $1 ORDER BY idx")
        .bind(&build.id)
        .fetch_all(pool)
        .await?;
    for row in &jobs {
        build.jobs.push(Job {
            id: row.try_get("id")?,
            name: row.try_get("name")?,
            matrix: serde_json::from_str(row.try_get::<&str, _>("matrix")?)?,
            needs: serde_json::from_str(row.try_get::<&str, _>("needs")?)?,
            phase: phase(row.try_get("phase")?)?,
            attempt: u32::try_from(row.try_get::<i64, _>("attempt")?).unwrap_or(0),
            agent_id: row.try_get("agent_id")?,
            lease_id: row.try_get("lease_id")?,
            queued_us: row.try_get("queued_us")?,
            started_us: row.try_get("started_us")?,
            finished_us: row.try_get("finished_us")?,
            exit_code: row.try_get("exit_code")?,
            reason: row.try_get("reason")?,
            log_bytes: to_u64(row.try_get("log_bytes")?, "log_bytes")?,
            steps: Vec::new(),
        });
    }
    let steps = sqlx::query("SELECT * FROM steps WHERE build_id = $1 ORDER BY job_idx, idx")
        .bind(&build.id)
        .fetch_all(pool)
        .await?;
    for row in &steps {
        let j: i64 = row.try_get("job_idx")?;
        let Some(job) = build.jobs.get_mut(j as usize) else {
            continue;
        };
        job.steps.push(Step {
            name: row.try_get("name")?,
            phase: phase(row.try_get("phase")?)?,
            started_us: row.try_get("started_us")?,
            duration_us: row
                .try_get::<Option<i64>, _>("duration_us")?
                .map(|v| to_u64(v, "duration_us"))
                .transpose()?,
            exit_code: row.try_get("exit_code")?,
            lines: Vec::new(),
        });
    }
    let lines =
        sqlx::query("SELECT * FROM lines WHERE build_id = $1 ORDER BY job_idx, step_idx, idx")
            .bind(&build.id)
            .fetch_all(pool)
            .await?;
    for row in &lines {
        let j: i64 = row.try_get("job_idx")?;
        let s: i64 = row.try_get("step_idx")?;
        let Some(step) = build
            .jobs
            .get_mut(j as usize)
            .and_then(|job| job.steps.get_mut(s as usize))
        else {
            continue;
        };
        step.lines.push(Line {
            text: row.try_get("text")?,
            phase: phase(row.try_get("phase")?)?,
            started_us: row.try_get("started_us")?,
            duration_us: row
                .try_get::<Option<i64>, _>("duration_us")?
                .map(|v| to_u64(v, "duration_us"))
                .transpose()?,
            exit_code: row.try_get("exit_code")?,
            log_bytes: to_u64(row.try_get("log_bytes")?, "log_bytes")?,
        });
    }
    Ok(())
}

fn build_from_row(row: &AnyRow) -> Result<Build, ProjectionError> {
    Ok(Build {
        id: row.try_get("id")?,
        tenant: row.try_get("tenant")?,
        project: row.try_get("project")?,
        number: to_u64(row.try_get("number")?, "number")?,
        phase: phase(row.try_get("phase")?)?,
        who: row.try_get("who")?,
        source: row.try_get("source")?,
        repository: row.try_get("repository")?,
        git_ref: row.try_get("git_ref")?,
        commit: row.try_get("commit_sha")?,
        pipeline_path: row.try_get("pipeline_path")?,
        triggered_us: row.try_get("triggered_us")?,
        started_us: row.try_get("started_us")?,
        finished_us: row.try_get("finished_us")?,
        reason: row.try_get("reason")?,
        last_offset: to_u64(row.try_get("last_offset")?, "last_offset")?,
        jobs: Vec::new(),
    })
}

fn phase(s: &str) -> Result<Phase, ProjectionError> {
    Phase::parse(s).ok_or_else(|| ProjectionError::Corrupt(format!("unknown phase {s:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn opens_a_path_with_url_characters() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a dir #1 100%?").join("rm.db");
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        let store = BuildsStore::open(&path).await.expect("open");
        assert_eq!(store.engine(), Engine::Sqlite);
        assert_eq!(store.next_offset().await.expect("next_offset"), 0);
        store.close().await;
        assert!(path.exists(), "the database is at the path given");
    }

    #[tokio::test]
    async fn a_stored_number_out_of_range_is_an_error_not_zero() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = BuildsStore::open(&dir.path().join("rm.db"))
            .await
            .expect("open");
        sqlx::query(
            "INSERT INTO projection_offsets (projection, partition, next_offset) \
             VALUES ($1, 0, -5)",
        )
        .bind(BUILDS_PROJECTION)
        .execute(&store.pool)
        .await
        .expect("tamper");
        let e = store.next_offset().await.expect_err("-5 is no offset");
        assert!(e.to_string().contains("next_offset"), "{e}");
        assert!(store.next_offsets().await.is_err());
        store.close().await;
    }
}
