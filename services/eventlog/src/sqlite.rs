//! The embedded backend: the whole log in one SQLite file in WAL mode.
//!
//! # Schema
//!
//! ```sql
//! events (offset INTEGER PRIMARY KEY,    -- 0-based, assigned by the writer, never reused
//!         key TEXT NOT NULL,             -- partition key (build id); index (key, offset)
//!         event_id BLOB UNIQUE,          -- 16-byte UUID, or the id's text bytes if it is not a
//!                                        -- UUID; NULL for an empty id and for raw records
//!         data BLOB NOT NULL)            -- the encoded Envelope
//! consumer_offsets (consumer_group TEXT PRIMARY KEY, next_offset INTEGER NOT NULL)
//! ```
//!
//! The schema is created with idempotent DDL on [`SqliteLog::open`].
//!
//! # Writes: one writer, group commit
//!
//! [`EventLog::append`] encodes its envelopes in the caller's task and sends the batch, with a
//! oneshot reply channel, to the single writer, which owns the only writing connection and runs
//! on a thread of its own (`eventlog-writer`, with a small runtime: its many round trips to
//! sqlx's worker thread must not queue behind the application's tasks). The writer takes
//! everything pending (up to [`SqliteLogOptions::max_group_events`]) and writes it in one
//! `BEGIN IMMEDIATE` transaction with multi-row `INSERT`s of up to 256 rows, commits (one
//! `fsync` of the WAL with `synchronous=FULL`), publishes the new end offset on a
//! [`tokio::sync::watch`] channel and answers every caller with its offsets. While a commit is in
//! flight new batches queue up and go into the next transaction, so the cost of a commit is
//! shared by all concurrent producers. Consumer-group commits ([`EventLog::commit`]) go through
//! the same writer, so the process never contends with itself for SQLite's write lock.
//!
//! Offsets are `MAX(offset) + 1` read inside the write transaction, so they stay contiguous even
//! if another process appends to the same file.
//!
//! Idempotence: the fast path inserts without looking anything up; the `UNIQUE` index on
//! `event_id` rejects a batch that carries an id already on the log (a producer retrying after an
//! ambiguous failure: a timeout, a crash, a cancelled call). The writer then rolls the group back
//! and writes each batch of the group in its own transaction, looking up every event id first: an
//! envelope already on the log (or earlier in the same batch) is not stored again and gets its
//! existing offset. The same per-batch path isolates any other failure: an error fails only the
//! batch that causes it, and earlier events are never touched since a failed transaction rolls
//! back entirely. (An append whose caller gave up waiting may still be committed: retrying it
//! is safe for that reason.)
//!
//! Checkpoints (copying the WAL back into the database file) run on a connection of their own,
//! woken every 16 MiB appended. A passive checkpoint never takes the write lock, so its copies
//! and `fsync`s overlap with appends instead of stalling the writer's commits.
//!
//! # Reads and subscriptions
//!
//! Reads go through a small pool of reading connections; in WAL mode they never block the
//! writer nor see an uncommitted row. They run on a blocking thread and step SQLite directly on
//! the connection handle sqlx lends out (see `raw`): sqlx's row API copies every column into a
//! new allocation and ships each row between threads, which caps a catch-up read at about a
//! fifth of what SQLite delivers.
//!
//! The writer also keeps the newest committed records in memory (`recent`: up to 4096 records
//! or 4 MiB), and a read that starts inside that window is answered from it: subscribers at the
//! head of the log — every service following it live — get a new commit without a query each.
//!
//! A subscription reads committed rows after its position in batches of
//! [`SqliteLogOptions::subscription_batch`] until it reaches the end offset published on the
//! watch channel, then waits for the channel to change. A watch channel holds only the latest
//! value, so a slow subscriber can never lag out of it: it just reads more rows at once.
//!
//! Another process may open the same file to read and subscribe. Its appends (or anybody's) are
//! not announced on this process's watch channel, so while there are subscribers the writer
//! also polls the end offset every [`SqliteLogOptions::poll_interval`] (100 ms) and publishes it
//! on the same channel: a subscriber wakes on whichever comes first, and however many
//! subscribers there are, the file is polled once.
//!
//! When the [`SqliteLog`] is dropped or [`SqliteLog::close`]d, the writer finishes the batches
//! already queued, then drops the watch sender, and every subscription returns
//! [`LogError::Closed`].

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use prost::Message;
use sqlx::sqlite::{
    LockedSqliteHandle, SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool,
    SqlitePoolOptions,
};
use sqlx::Connection;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::MissedTickBehavior;
use tributary_proto::events::Envelope;

pub use sqlx::sqlite::SqliteSynchronous;

use crate::group::{GroupSlots, SingleMemberGroup, SinglePartitionPort};
use crate::{
    Capabilities, EventLog, FailedSubscription, GroupSubscription, LogError, Offset, Partition,
    Record, Subscription, Topic,
};

mod raw;
mod recent;

use recent::Recent;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    offset   INTEGER PRIMARY KEY,
    key      TEXT NOT NULL,
    event_id BLOB UNIQUE,
    data     BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_key ON events (key, offset);
CREATE TABLE IF NOT EXISTS consumer_offsets (
    consumer_group TEXT PRIMARY KEY,
    next_offset    INTEGER NOT NULL
);
";

/// `ORDER BY ... DESC LIMIT 1` rather than `MAX()` wrapped in an expression, which SQLite would
/// answer with a full scan.
const LAST_OFFSET: &str = "SELECT offset FROM events ORDER BY offset DESC LIMIT 1";
const READ: &str =
    "SELECT offset, key, data FROM events WHERE offset >= ?1 ORDER BY offset LIMIT ?2";
const READ_KEY: &str =
    "SELECT offset, key, data FROM events WHERE key = ?1 AND offset >= ?2 ORDER BY offset LIMIT ?3";
const FIND_ID: &str = "SELECT offset FROM events WHERE event_id = ?1";
const UPSERT_GROUP: &str =
    "INSERT INTO consumer_offsets (consumer_group, next_offset) VALUES (?1, ?2) \
     ON CONFLICT (consumer_group) DO UPDATE SET next_offset = excluded.next_offset";
const COMMITTED: &str = "SELECT next_offset FROM consumer_offsets WHERE consumer_group = ?1";

/// Rows per multi-row `INSERT` (4 parameters each, far below SQLite's 32766 limit). Smaller
/// remainders are written with statements of 128, 64, ..., 1 rows, so only 9 statement shapes
/// exist and all stay in the prepared-statement cache.
const MAX_INSERT_ROWS: usize = 256;
const INSERT_SHAPES: usize = MAX_INSERT_ROWS.trailing_zeros() as usize + 1;

/// Appended bytes after which the checkpointer is woken. Larger than SQLite's default (1000
/// pages) so that index pages changed by many commits are copied once.
const CHECKPOINT_BYTES: usize = 16 << 20;
/// The writer checkpoints by itself only if the WAL grows past this many pages (the
/// checkpointer is stuck or far behind).
const WRITER_AUTOCHECKPOINT_PAGES: u32 = 50_000;
/// Page cache of the writing connection, in KiB: room for the pages a whole group dirties
/// (SQLite's default of 2 MiB spills them to the WAL in the middle of a large transaction).
const WRITER_CACHE_KIB: u32 = 16 * 1024;
/// A WAL file larger than this is truncated back when it restarts.
const JOURNAL_SIZE_LIMIT: u64 = 64 << 20;
/// The newest records kept in memory for subscribers at the head of the log ([`Recent`]): at
/// most this many, and this many bytes.
const RECENT_RECORDS: usize = 4096;
const RECENT_BYTES: usize = 4 << 20;

/// Tuning and durability of a [`SqliteLog`].
#[derive(Clone, Debug)]
pub struct SqliteLogOptions {
    /// `PRAGMA synchronous`. [`SqliteSynchronous::Full`] (the default) syncs the WAL on every
    /// commit: an append that returned survives a power loss. `Normal` survives a crash of the
    /// process but may lose the last commits on power loss.
    pub synchronous: SqliteSynchronous,
    /// How long a connection waits for a lock held by another connection or process.
    pub busy_timeout: Duration,
    /// Page size of a newly created file (ignored for an existing one). The default, 8 KiB,
    /// measured best overall: against SQLite's 4 KiB, batched appends are 2-10% faster and
    /// catch-up reads ~15% faster, for ~10% more latency on a lone single-event append. 16 KiB
    /// is faster still for large commit groups but slower for small ones (a commit rewrites
    /// every index page it touches, in full).
    pub page_size: u32,
    /// Size of the pool of reading connections (reads, subscriptions, `end_offset`).
    pub read_connections: u32,
    /// Records a subscription reads at once while catching up.
    pub subscription_batch: usize,
    /// How often, while there are subscribers, the end offset is re-read from the file to notice
    /// appends by other processes.
    pub poll_interval: Duration,
    /// The writer stops draining pending appends into one transaction beyond this many events.
    pub max_group_events: usize,
    /// Append requests that may wait for the writer before `append` itself waits.
    pub queue_depth: usize,
}

impl Default for SqliteLogOptions {
    fn default() -> Self {
        SqliteLogOptions {
            synchronous: SqliteSynchronous::Full,
            busy_timeout: Duration::from_secs(10),
            page_size: 8192,
            read_connections: 4,
            subscription_batch: 4096,
            poll_interval: Duration::from_millis(100),
            max_group_events: 16 * 1024,
            queue_depth: 1024,
        }
    }
}

/// The SQLite event log. Cheap to share behind an `Arc`; see the [module docs](self).
pub struct SqliteLog {
    path: PathBuf,
    /// Set by the writer while its file cannot be written (disk full): `probe` reports it.
    unwritable: Arc<std::sync::Mutex<Option<String>>>,
    writer: mpsc::Sender<WriterMsg>,
    /// Kept so that subscriptions can clone it; the writer task owns the sender.
    end: watch::Receiver<Offset>,
    reader: Reader,
    subscription_batch: usize,
    /// The active member of each consumer group (see [`crate::group`]).
    groups: GroupSlots,
}

impl std::fmt::Debug for SqliteLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteLog")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SqliteLog {
    /// Opens (creating if needed) the log at `path` with the default, durable options.
    pub async fn open(path: &Path) -> Result<Self, LogError> {
        Self::open_with(path, SqliteLogOptions::default()).await
    }

    /// Opens (creating if needed) the log at `path`.
    pub async fn open_with(path: &Path, options: SqliteLogOptions) -> Result<Self, LogError> {
        if options.subscription_batch == 0 || options.read_connections == 0 {
            return Err(LogError::Invalid(
                "subscription_batch and read_connections must be positive".into(),
            ));
        }
        let connect = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .page_size(options.page_size)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(options.synchronous)
            .busy_timeout(options.busy_timeout)
            .foreign_keys(false);
        // The writer leaves checkpoints to the checkpointer, unless it falls far behind.
        let writer_connect = connect
            .clone()
            .pragma(
                "wal_autocheckpoint",
                WRITER_AUTOCHECKPOINT_PAGES.to_string(),
            )
            .pragma("journal_size_limit", JOURNAL_SIZE_LIMIT.to_string())
            .pragma("cache_size", format!("-{WRITER_CACHE_KIB}"));
        let mut conn = SqliteConnection::connect_with(&writer_connect).await?;
        sqlx::raw_sql(SCHEMA).execute(&mut conn).await?;
        let end = next_offset(&mut conn).await?;

        let connect = connect.create_if_missing(false);
        let checkpointer = SqliteConnection::connect_with(&connect).await?;
        let pool = SqlitePoolOptions::new()
            .max_connections(options.read_connections)
            .min_connections(0)
            .test_before_acquire(false)
            .connect_with(connect)
            .await?;

        let recent = Arc::new(Recent::new(RECENT_RECORDS, RECENT_BYTES));
        let (end_tx, end_rx) = watch::channel(end);
        let (writer_tx, writer_rx) = mpsc::channel(options.queue_depth.max(1));
        // The writer gets a thread (and runtime) of its own: each of its many round trips to
        // sqlx's worker thread would otherwise wait behind whatever else the application's
        // runtime is busy with, and that latency adds up on the append path.
        let (ready_tx, ready_rx) = oneshot::channel();
        let inserts = (0..INSERT_SHAPES).map(|k| insert_sql(1 << k)).collect();
        let log_path = path.to_owned();
        let unwritable: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
        let writer_unwritable = unwritable.clone();
        let writer_recent = recent.clone();
        std::thread::Builder::new()
            .name("eventlog-writer".into())
            .spawn(move || {
                // Built here: a runtime must not be dropped in async code, as `open_with` would
                // if the thread could not start.
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        let _ = ready_tx.send(Err(error));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                runtime.block_on(async move {
                    let (checkpoint_tx, checkpoint_rx) = mpsc::channel(1);
                    let checkpointer = tokio::spawn(checkpoint(checkpointer, checkpoint_rx));
                    let writer = Writer {
                        conn,
                        connect: writer_connect,
                        path: log_path,
                        unwritable: writer_unwritable,
                        inserts,
                        end: end_tx,
                        recent: writer_recent,
                        checkpoint: checkpoint_tx,
                        unchecked_bytes: 0,
                    };
                    let close_reply = writer
                        .run(writer_rx, options.poll_interval, options.max_group_events)
                        .await;
                    let _ = checkpointer.await;
                    if let Some(reply) = close_reply {
                        let _ = reply.send(());
                    }
                });
            })?;
        ready_rx
            .await
            .map_err(|_| LogError::Invalid("the event log writer thread died".into()))??;
        tracing::debug!(path = %path.display(), end, "opened SQLite event log");

        Ok(SqliteLog {
            unwritable,
            path: path.to_owned(),
            writer: writer_tx,
            end: end_rx,
            reader: Reader { pool, recent },
            subscription_batch: options.subscription_batch,
            groups: GroupSlots::default(),
        })
    }

    /// The file the log lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `data` verbatim as one record under `key`, without an event id (so without
    /// de-duplication). For tests of malformed records: readers see it like any other record and
    /// skip it when [`Record::decode`] fails.
    pub async fn append_raw(&self, key: &str, data: Vec<u8>) -> Result<Offset, LogError> {
        let rows = vec![NewEvent {
            key: key.to_owned(),
            event_id: None,
            data,
        }];
        let offsets = self.send_append(rows).await?;
        offsets
            .first()
            .copied()
            .ok_or_else(|| LogError::Invalid("writer returned no offset for a raw append".into()))
    }

    /// Runs SQLite's `PRAGMA integrity_check` on the file; an error lists the problems found.
    pub async fn integrity_check(&self) -> Result<(), LogError> {
        let rows: Vec<String> = sqlx::query_scalar("PRAGMA integrity_check")
            .fetch_all(&self.reader.pool)
            .await
            .map_err(storage)?;
        if rows.len() == 1 && rows[0] == "ok" {
            Ok(())
        } else {
            Err(LogError::Invalid(format!(
                "integrity check failed: {}",
                rows.join("; ")
            )))
        }
    }

    /// Finishes the appends already queued, then closes the file. Later appends and every
    /// subscription return [`LogError::Closed`]. Dropping the log has the same effect, without
    /// waiting.
    pub async fn close(&self) {
        let (reply, done) = oneshot::channel();
        if self.writer.send(WriterMsg::Close(reply)).await.is_ok() {
            let _ = done.await;
        }
        self.reader.pool.close().await;
    }

    async fn send_append(&self, rows: Vec<NewEvent>) -> Result<Vec<Offset>, LogError> {
        let (reply, answer) = oneshot::channel();
        self.writer
            .send(WriterMsg::Append(AppendReq { rows, reply }))
            .await
            .map_err(|_| LogError::Closed)?;
        // The writer dropping the reply means it shut down before writing the batch.
        answer.await.map_err(|_| LogError::Closed)?
    }
}

#[async_trait]
impl EventLog for SqliteLog {
    async fn append(&self, events: &[Envelope]) -> Result<Vec<Offset>, LogError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let rows = events
            .iter()
            .map(|e| NewEvent {
                key: e.partition_key().to_owned(),
                event_id: event_id_bytes(&e.event_id),
                data: e.encode_to_vec(),
            })
            .collect();
        self.send_append(rows).await
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            dedupes_event_ids: true,
            atomic_append: true,
        }
    }

    /// Not ready while the last write failed for want of space (or an I/O error): reads still
    /// work, appends do not.
    async fn probe(&self, _within: Duration) -> Result<(), LogError> {
        match self.unwritable.lock().ok().and_then(|w| w.clone()) {
            Some(why) => Err(LogError::Invalid(why)),
            None => Ok(()),
        }
    }

    async fn read_partition(
        &self,
        partition: Partition,
        from: Offset,
        max: usize,
    ) -> Result<Vec<Record>, LogError> {
        only_partition(partition)?;
        self.reader.read(from, max).await
    }

    async fn read_key_in(
        &self,
        _topic: Topic,
        key: &str,
        from: Offset,
        max: usize,
    ) -> Result<Vec<Record>, LogError> {
        self.reader.read_key(key, from, max).await
    }

    async fn end_offsets(&self) -> Result<Vec<Offset>, LogError> {
        let mut conn = self.reader.pool.acquire().await.map_err(storage)?;
        Ok(vec![next_offset(&mut conn).await?])
    }

    fn subscribe_partitions(&self, from: &[(Partition, Offset)]) -> Box<dyn Subscription> {
        match from {
            [(0, from)] => Box::new(SqliteSubscription {
                reader: self.reader.clone(),
                end: self.end.clone(),
                position: *from,
                batch: self.subscription_batch,
            }),
            _ => Box::new(FailedSubscription::new(
                LogError::Invalid(format!(
                    "the SQLite event log has one partition, 0: cannot subscribe to {from:?}"
                )),
                from,
            )),
        }
    }

    async fn commit_partitions(
        &self,
        group: &str,
        positions: &[(Partition, Offset)],
    ) -> Result<(), LogError> {
        let mut next = None;
        for (partition, offset) in positions {
            only_partition(*partition)?;
            next = Some(to_sql(*offset)?);
        }
        let Some(next) = next else {
            return Ok(());
        };
        let (reply, answer) = oneshot::channel();
        self.writer
            .send(WriterMsg::Commit(CommitReq {
                group: group.to_owned(),
                next,
                reply,
            }))
            .await
            .map_err(|_| LogError::Closed)?;
        answer.await.map_err(|_| LogError::Closed)?
    }

    async fn join_group(
        &self,
        group: &str,
        _topics: &[Topic],
    ) -> Result<Box<dyn GroupSubscription>, LogError> {
        let port = SqlitePort {
            writer: self.writer.downgrade(),
            end: self.end.clone(),
            reader: self.reader.clone(),
            batch: self.subscription_batch,
        };
        Ok(Box::new(SingleMemberGroup::new(port, &self.groups, group)))
    }

    async fn committed_partitions(
        &self,
        group: &str,
    ) -> Result<BTreeMap<Partition, Offset>, LogError> {
        let next: Option<i64> = sqlx::query_scalar(COMMITTED)
            .bind(group)
            .fetch_optional(&self.reader.pool)
            .await
            .map_err(storage)?;
        Ok(next
            .map(from_sql)
            .transpose()?
            .map(|next| (0, next))
            .into_iter()
            .collect())
    }

    async fn append_raw(&self, key: &str, data: Vec<u8>) -> Result<Offset, LogError> {
        SqliteLog::append_raw(self, key, data).await
    }
}

/// What a group member of a [`SqliteLog`] uses of it. It holds the writer weakly: a member does
/// not keep a dropped log open.
struct SqlitePort {
    writer: mpsc::WeakSender<WriterMsg>,
    end: watch::Receiver<Offset>,
    reader: Reader,
    batch: usize,
}

#[async_trait]
impl SinglePartitionPort for SqlitePort {
    fn subscribe(&self, from: Offset) -> Box<dyn Subscription> {
        Box::new(SqliteSubscription {
            reader: self.reader.clone(),
            end: self.end.clone(),
            position: from,
            batch: self.batch,
        })
    }

    async fn commit(&self, group: &str, next: Offset) -> Result<(), LogError> {
        let writer = self.writer.upgrade().ok_or(LogError::Closed)?;
        let (reply, answer) = oneshot::channel();
        writer
            .send(WriterMsg::Commit(CommitReq {
                group: group.to_owned(),
                next: to_sql(next)?,
                reply,
            }))
            .await
            .map_err(|_| LogError::Closed)?;
        answer.await.map_err(|_| LogError::Closed)?
    }

    async fn committed(&self, group: &str) -> Result<Option<Offset>, LogError> {
        let next: Option<i64> = sqlx::query_scalar(COMMITTED)
            .bind(group)
            .fetch_optional(&self.reader.pool)
            .await
            .map_err(storage)?;
        next.map(from_sql).transpose()
    }
}

/// A subscription to a [`SqliteLog`]; see the [module docs](self).
pub struct SqliteSubscription {
    reader: Reader,
    end: watch::Receiver<Offset>,
    position: Offset,
    batch: usize,
}

#[async_trait]
impl Subscription for SqliteSubscription {
    async fn next_batch(&mut self) -> Result<Vec<Record>, LogError> {
        loop {
            // The writer task dropping the sender means the log was closed or dropped.
            if self.end.has_changed().is_err() {
                return Err(LogError::Closed);
            }
            let end = *self.end.borrow_and_update();
            if self.position < end {
                let records = self.reader.read(self.position, self.batch).await?;
                if let (Some(first), Some(last)) = (records.first(), records.last()) {
                    if first.offset != self.position {
                        tracing::warn!(
                            expected = self.position,
                            got = first.offset,
                            "gap in the event log: records are missing"
                        );
                    }
                    self.position = last.offset + 1;
                    return Ok(records);
                }
            }
            if self.end.changed().await.is_err() {
                return Err(LogError::Closed);
            }
        }
    }

    fn position(&self) -> Offset {
        self.position
    }

    fn positions(&self) -> Vec<(Partition, Offset)> {
        vec![(0, self.position)]
    }
}

/// The SQLite log has one partition, 0.
fn only_partition(partition: Partition) -> Result<(), LogError> {
    if partition == 0 {
        Ok(())
    } else {
        Err(LogError::Invalid(format!(
            "the SQLite event log has one partition, 0: there is no partition {partition}"
        )))
    }
}

/// The reading side, shared by the log and its subscriptions.
#[derive(Clone)]
struct Reader {
    pool: SqlitePool,
    /// The newest records, written by the writer after each commit.
    recent: Arc<Recent>,
}

/// What a [`Reader`] reads.
enum ReadQuery {
    From { from: i64, limit: i64 },
    Key { key: String, from: i64, limit: i64 },
}

impl Reader {
    async fn read(&self, from: Offset, max: usize) -> Result<Vec<Record>, LogError> {
        if !self.pool.is_closed() {
            if let Some(records) = self.recent.read(from, max) {
                return Ok(records);
            }
        }
        let (Ok(from), Some(limit)) = (i64::try_from(from), sql_limit(max)) else {
            return Ok(Vec::new());
        };
        self.run(ReadQuery::From { from, limit }).await
    }

    async fn read_key(&self, key: &str, from: Offset, max: usize) -> Result<Vec<Record>, LogError> {
        let (Ok(from), Some(limit)) = (i64::try_from(from), sql_limit(max)) else {
            return Ok(Vec::new());
        };
        self.run(ReadQuery::Key {
            key: key.to_owned(),
            from,
            limit,
        })
        .await
    }

    /// Runs `query` with direct SQLite calls ([`raw`]) on a pooled connection, on a blocking
    /// thread so that a large batch does not hold up a runtime worker.
    async fn run(&self, query: ReadQuery) -> Result<Vec<Record>, LogError> {
        let mut conn = self.pool.acquire().await.map_err(storage)?;
        let runtime = tokio::runtime::Handle::current();
        let (conn, result) = tokio::task::spawn_blocking(move || {
            // Only channel operations with sqlx's worker thread: no I/O driver needed.
            let result = match runtime.block_on(conn.lock_handle()) {
                Ok(mut lock) => read_records(&mut lock, &query),
                Err(error) => Err(storage(error)),
            };
            (conn, result)
        })
        .await
        .map_err(|error| LogError::Invalid(format!("event log read task failed: {error}")))?;
        // Back to the pool from here, inside the runtime.
        drop(conn);
        result
    }
}

/// `LIMIT` for `max` records, `None` for zero.
fn sql_limit(max: usize) -> Option<i64> {
    (max > 0).then(|| i64::try_from(max).unwrap_or(i64::MAX))
}

/// Reads `(offset, key, data)` rows. All payloads of the batch are copied into one buffer that
/// the records' [`Bytes`] share, which saves an allocation per record (and keeps the buffer alive
/// while any record of the batch is).
fn read_records(
    lock: &mut LockedSqliteHandle<'_>,
    query: &ReadQuery,
) -> Result<Vec<Record>, LogError> {
    let (mut stmt, limit) = match query {
        ReadQuery::From { from, limit } => {
            let mut stmt = raw::Statement::prepare(lock, READ)?;
            stmt.bind_i64(1, *from)?;
            stmt.bind_i64(2, *limit)?;
            (stmt, *limit)
        }
        ReadQuery::Key { key, from, limit } => {
            let mut stmt = raw::Statement::prepare(lock, READ_KEY)?;
            stmt.bind_text(1, key)?;
            stmt.bind_i64(2, *from)?;
            stmt.bind_i64(3, *limit)?;
            (stmt, *limit)
        }
    };
    stmt.expect_columns(3)?;
    let expected = usize::try_from(limit).unwrap_or(usize::MAX).min(4096);
    let mut buf = Vec::with_capacity(expected * 256);
    let mut spans: Vec<(Offset, String, usize, usize)> = Vec::with_capacity(expected);
    while let Some(row) = stmt.step()? {
        let offset = from_sql(row.int64(0))?;
        // Bytes, not &str: a key that is not UTF-8 (written by some other tool) must not make
        // the whole batch unreadable.
        let key = row.bytes(1);
        let key = match spans.last() {
            Some((_, last, _, _)) if last.as_bytes() == key => last.clone(),
            _ => String::from_utf8_lossy(key).into_owned(),
        };
        let start = buf.len();
        buf.extend_from_slice(row.bytes(2));
        spans.push((offset, key, start, buf.len()));
    }
    let buf = Bytes::from(buf);
    Ok(spans
        .into_iter()
        .map(|(offset, key, start, end)| Record {
            partition: 0,
            offset,
            key,
            data: buf.slice(start..end),
        })
        .collect())
}

/// One event ready to be written.
struct NewEvent {
    key: String,
    /// `None`: no de-duplication (raw records, empty ids).
    event_id: Option<Vec<u8>>,
    data: Vec<u8>,
}

/// The stored form of an event id: the 16 bytes of a UUID, or the text's bytes if it does not
/// parse as one. An empty id cannot identify anything and is stored as NULL (never de-duplicated).
fn event_id_bytes(id: &str) -> Option<Vec<u8>> {
    if id.is_empty() {
        return None;
    }
    Some(match uuid::Uuid::try_parse(id) {
        Ok(uuid) => uuid.as_bytes().to_vec(),
        Err(_) => id.as_bytes().to_vec(),
    })
}

struct AppendReq {
    rows: Vec<NewEvent>,
    reply: oneshot::Sender<Result<Vec<Offset>, LogError>>,
}

struct CommitReq {
    group: String,
    next: i64,
    reply: oneshot::Sender<Result<(), LogError>>,
}

enum WriterMsg {
    Append(AppendReq),
    Commit(CommitReq),
    Close(oneshot::Sender<()>),
}

/// The single writer task's state.
struct Writer {
    conn: SqliteConnection,
    /// How `conn` was opened: a connection left inside a failed transaction is replaced.
    connect: SqliteConnectOptions,
    /// The log's file, for errors.
    path: PathBuf,
    /// Why the last write failed for want of space (or an I/O error); None once one succeeds.
    /// `probe` (`/readyz`) reports it.
    unwritable: Arc<std::sync::Mutex<Option<String>>>,
    /// `inserts[k]`: the multi-row `INSERT` of `2^k` rows.
    inserts: Vec<String>,
    end: watch::Sender<Offset>,
    /// Where each group committed goes before its end offset is published.
    recent: Arc<Recent>,
    /// Wakes the checkpointer; dropping it ends the checkpointer.
    checkpoint: mpsc::Sender<()>,
    /// Bytes appended since the checkpointer was last woken.
    unchecked_bytes: usize,
}

impl Writer {
    /// Writes until the log is dropped or closed; returns the reply to a [`SqliteLog::close`].
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<WriterMsg>,
        poll_interval: Duration,
        max_group_events: usize,
    ) -> Option<oneshot::Sender<()>> {
        let mut poll = tokio::time::interval(poll_interval);
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut close_reply = None;
        loop {
            let first = tokio::select! {
                biased;
                msg = rx.recv() => match msg {
                    Some(msg) => msg,
                    None => break,
                },
                _ = poll.tick() => {
                    self.poll_end().await;
                    continue;
                }
            };
            // Group commit: everything pending goes into one transaction.
            let mut appends = Vec::new();
            let mut commits = Vec::new();
            let mut events = 0;
            let mut next = Some(first);
            while let Some(msg) = next.take() {
                match msg {
                    WriterMsg::Append(req) => {
                        events += req.rows.len();
                        appends.push(req);
                    }
                    WriterMsg::Commit(req) => commits.push(req),
                    WriterMsg::Close(reply) => {
                        close_reply = Some(reply);
                        break;
                    }
                }
                if events < max_group_events {
                    next = rx.try_recv().ok();
                }
            }
            self.write_group(appends, commits).await;
            if close_reply.is_some() {
                break;
            }
        }
        // Requests still queued are dropped: their callers get `Closed`.
        drop(rx);
        let Writer {
            conn, end, recent, ..
        } = self;
        recent.clear();
        // Subscriptions see `Closed` from here on.
        drop(end);
        if let Err(error) = conn.close().await {
            tracing::warn!(%error, "closing the event log's writing connection failed");
        }
        close_reply
    }

    /// Publishes the end offset found in the file (appends by other processes), if anybody is
    /// subscribed.
    async fn poll_end(&mut self) {
        // One receiver is the log's own template; more are subscriptions.
        if self.end.receiver_count() <= 1 {
            return;
        }
        match next_offset(&mut self.conn).await {
            Ok(end) => publish(&self.end, end),
            Err(error) => tracing::warn!(%error, "polling the event log's end offset failed"),
        }
    }

    async fn write_group(&mut self, appends: Vec<AppendReq>, commits: Vec<CommitReq>) {
        if appends.is_empty() && commits.is_empty() {
            return;
        }
        match self.try_group(&appends, &commits).await {
            Ok((first, end)) => {
                let bytes = appends
                    .iter()
                    .flat_map(|req| &req.rows)
                    .map(|row| row.data.len())
                    .sum();
                let mut records = Vec::with_capacity((end - first) as usize);
                let mut replies = Vec::with_capacity(appends.len());
                let mut next = first;
                for req in appends {
                    let n = req.rows.len() as Offset;
                    records.extend(
                        req.rows
                            .into_iter()
                            .zip(next..)
                            .map(|(row, offset)| Record {
                                partition: 0,
                                offset,
                                key: row.key,
                                data: Bytes::from(row.data),
                            }),
                    );
                    replies.push((req.reply, next..next + n));
                    next += n;
                }
                self.recent.push(records);
                publish(&self.end, end);
                self.set_unwritable(None);
                self.written(bytes);
                for (reply, offsets) in replies {
                    let _ = reply.send(Ok(offsets.collect()));
                }
                for req in commits {
                    let _ = req.reply.send(Ok(()));
                }
            }
            Err(error) => {
                self.recover().await;
                // Usually a retried event id hitting the UNIQUE index. Write each request on its
                // own, with lookups, so that a failure only fails its own caller.
                tracing::debug!(
                    %error,
                    batches = appends.len(),
                    "group commit failed; writing its batches one by one"
                );
                // Some of them may get the offsets of rows already stored: what the writer
                // stores from here does not simply follow the newest records any more.
                self.recent.clear();
                for req in appends {
                    let result = write_one(&mut self.conn, &self.inserts, &req.rows).await;
                    let result = match result {
                        Ok((offsets, end)) => {
                            publish(&self.end, end);
                            self.written(req.rows.iter().map(|row| row.data.len()).sum());
                            Ok(offsets)
                        }
                        Err(error) => {
                            self.recover().await;
                            let error = self.unwritable(error);
                            tracing::warn!(%error, events = req.rows.len(), "append failed");
                            Err(error)
                        }
                    };
                    let _ = req.reply.send(result);
                }
                for req in commits {
                    let result = commit_one(&mut self.conn, &req).await;
                    let result = match result {
                        Ok(()) => Ok(()),
                        Err(error) => {
                            self.recover().await;
                            let error = self.unwritable(error);
                            tracing::warn!(%error, group = %req.group, "consumer offset commit failed");
                            Err(error)
                        }
                    };
                    let _ = req.reply.send(result);
                }
            }
        }
    }

    /// After a failed transaction: a connection still inside it (a COMMIT that fails for want
    /// of space leaves SQLite's transaction open, and sqlx then refuses to begin another) is
    /// closed, which rolls it back, and replaced by a fresh one. Nothing committed is touched.
    async fn recover(&mut self) {
        if !self.conn.is_in_transaction() {
            return;
        }
        match SqliteConnection::connect_with(&self.connect).await {
            Ok(fresh) => {
                let stale = std::mem::replace(&mut self.conn, fresh);
                if let Err(error) = stale.close().await {
                    tracing::debug!(%error, "closing the event log's failed writer connection");
                }
                tracing::warn!(path = %self.path.display(), "event log writer: rolled back a failed transaction and reconnected");
            }
            Err(error) => {
                tracing::error!(%error, path = %self.path.display(), "event log writer: cannot reconnect after a failed transaction; retrying at the next append");
            }
        }
    }

    /// `error` as the caller should read it: a full disk or an I/O error names the file and
    /// what to do.
    fn unwritable(&self, error: LogError) -> LogError {
        let LogError::Storage(sqlx::Error::Database(db)) = &error else {
            return error;
        };
        let code: Option<i64> = db.code().and_then(|c| c.parse().ok());
        let cause = match code.map(|c| c & 0xff) {
            Some(13) => "the disk is full (no space left on device)".to_owned(),
            Some(10) => format!("an I/O error ({})", db.message()),
            _ => return error,
        };
        let error = LogError::Unwritable {
            path: self.path.display().to_string(),
            cause,
        };
        self.set_unwritable(Some(error.to_string()));
        error
    }

    fn set_unwritable(&self, why: Option<String>) {
        if let Ok(mut flag) = self.unwritable.lock() {
            *flag = why;
        }
    }

    /// Counts `bytes` appended, and wakes the checkpointer every [`CHECKPOINT_BYTES`].
    fn written(&mut self, bytes: usize) {
        self.unchecked_bytes += bytes;
        if self.unchecked_bytes >= CHECKPOINT_BYTES {
            self.unchecked_bytes = 0;
            // Full means a wake-up is already pending.
            let _ = self.checkpoint.try_send(());
        }
    }

    /// The fast path: all appends and commits of the group in one transaction, no lookups.
    /// Returns the first offset written and the new end.
    async fn try_group(
        &mut self,
        appends: &[AppendReq],
        commits: &[CommitReq],
    ) -> Result<(Offset, Offset), LogError> {
        let mut tx = self.conn.begin_with("BEGIN IMMEDIATE").await?;
        let first = next_offset(&mut tx).await?;
        let rows: Vec<&NewEvent> = appends.iter().flat_map(|req| req.rows.iter()).collect();
        insert_rows(&mut tx, &self.inserts, first, &rows).await?;
        for req in commits {
            sqlx::query(UPSERT_GROUP)
                .bind(&req.group)
                .bind(req.next)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok((first, first + rows.len() as Offset))
    }
}

/// The checkpointer task: copies committed pages from the WAL into the database file when the
/// writer says enough was appended, on its own connection. A passive checkpoint runs alongside
/// the writer (it never takes the write lock), so its page copies and `fsync`s stay off the
/// append path. It ends when the writer drops its sender.
async fn checkpoint(mut conn: SqliteConnection, mut wake: mpsc::Receiver<()>) {
    while wake.recv().await.is_some() {
        let result: Result<(i64, i64, i64), sqlx::Error> =
            sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
                .fetch_one(&mut conn)
                .await;
        match result {
            Ok((_, wal_pages, copied)) => {
                tracing::trace!(wal_pages, copied, "checkpointed the event log");
            }
            Err(error) => tracing::warn!(%error, "checkpointing the event log failed"),
        }
    }
    if let Err(error) = conn.close().await {
        tracing::warn!(%error, "closing the event log's checkpointing connection failed");
    }
}

/// The careful path for one batch: skips (and returns the offsets of) events whose id is
/// already on the log or earlier in the batch. Returns the offsets and the new end.
async fn write_one(
    conn: &mut SqliteConnection,
    inserts: &[String],
    rows: &[NewEvent],
) -> Result<(Vec<Offset>, Offset), LogError> {
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    let first = next_offset(&mut tx).await?;
    let mut next = first;
    let mut offsets = Vec::with_capacity(rows.len());
    let mut fresh = Vec::with_capacity(rows.len());
    let mut seen: HashMap<&[u8], Offset> = HashMap::new();
    for row in rows {
        if let Some(id) = row.event_id.as_deref() {
            if let Some(&offset) = seen.get(id) {
                offsets.push(offset);
                continue;
            }
            let existing: Option<i64> = sqlx::query_scalar(FIND_ID)
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
            if let Some(offset) = existing {
                let offset = from_sql(offset)?;
                seen.insert(id, offset);
                offsets.push(offset);
                continue;
            }
            seen.insert(id, next);
        }
        offsets.push(next);
        fresh.push(row);
        next += 1;
    }
    insert_rows(&mut tx, inserts, first, &fresh).await?;
    tx.commit().await?;
    Ok((offsets, next))
}

async fn commit_one(conn: &mut SqliteConnection, req: &CommitReq) -> Result<(), LogError> {
    sqlx::query(UPSERT_GROUP)
        .bind(&req.group)
        .bind(req.next)
        .execute(conn)
        .await?;
    Ok(())
}

/// Inserts `rows` at offsets `first, first + 1, ...` with multi-row `INSERT`s.
///
/// `OR FAIL`: a constraint violation stops the statement where it is instead of undoing its
/// earlier rows, so SQLite needs no statement journal for these multi-row statements (which
/// otherwise costs a write of every page they touch). The caller rolls back the whole
/// transaction on any error anyway.
async fn insert_rows(
    conn: &mut SqliteConnection,
    inserts: &[String],
    first: Offset,
    rows: &[&NewEvent],
) -> Result<(), LogError> {
    let mut offset = to_sql(first)?;
    let mut rest = rows;
    while !rest.is_empty() {
        let n = if rest.len() >= MAX_INSERT_ROWS {
            MAX_INSERT_ROWS
        } else {
            // The largest power of two that fits.
            1 << (usize::BITS - 1 - rest.len().leading_zeros())
        };
        let (chunk, tail) = rest.split_at(n);
        let sql = &inserts[n.trailing_zeros() as usize];
        let mut query = sqlx::query(sql);
        for row in chunk {
            query = query
                .bind(offset)
                .bind(row.key.as_str())
                .bind(row.event_id.as_deref())
                .bind(row.data.as_slice());
            offset += 1;
        }
        query.execute(&mut *conn).await?;
        rest = tail;
    }
    Ok(())
}

fn insert_sql(rows: usize) -> String {
    let mut sql = String::from("INSERT OR FAIL INTO events (offset, key, event_id, data) VALUES ");
    for i in 0..rows {
        if i > 0 {
            sql.push(',');
        }
        sql.push_str("(?,?,?,?)");
    }
    sql
}

/// The offset the next record will get: one past the last one in the file.
async fn next_offset(conn: &mut SqliteConnection) -> Result<Offset, LogError> {
    let last: Option<i64> = sqlx::query_scalar(LAST_OFFSET)
        .fetch_optional(conn)
        .await
        .map_err(storage)?;
    match last {
        Some(last) => Ok(from_sql(last)? + 1),
        None => Ok(0),
    }
}

fn publish(end: &watch::Sender<Offset>, new_end: Offset) {
    end.send_if_modified(|current| {
        if new_end > *current {
            *current = new_end;
            true
        } else {
            false
        }
    });
}

fn storage(error: sqlx::Error) -> LogError {
    match error {
        sqlx::Error::PoolClosed => LogError::Closed,
        error => LogError::Storage(error),
    }
}

fn to_sql(offset: Offset) -> Result<i64, LogError> {
    i64::try_from(offset).map_err(|_| LogError::Invalid(format!("offset {offset} is out of range")))
}

fn from_sql(offset: i64) -> Result<Offset, LogError> {
    Offset::try_from(offset)
        .map_err(|_| LogError::Invalid(format!("corrupt event log: negative offset {offset}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_are_stored_compactly() {
        let id = "0190f2c4-6e5b-7cc1-9d7e-8b2f0e2d4a11";
        assert_eq!(event_id_bytes(id).map(|b| b.len()), Some(16));
        assert_eq!(event_id_bytes("not-a-uuid"), Some(b"not-a-uuid".to_vec()));
        assert_eq!(event_id_bytes(""), None);
    }

    #[test]
    fn insert_shapes_cover_every_size() {
        assert_eq!(INSERT_SHAPES, 9);
        assert_eq!(insert_sql(2).matches('?').count(), 8);
    }
}
