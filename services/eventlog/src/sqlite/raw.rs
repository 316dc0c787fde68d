//! Direct SQLite calls for the read hot path.
//!
//! Through sqlx every column of every row is copied into a freshly allocated value on sqlx's
//! worker thread and each row is sent over a channel; for a catch-up read that costs about five
//! times SQLite's own work (about 0.55 M records/s against 3 M/s here). So reads step their
//! statement directly on the connection handle that sqlx hands out with
//! [`sqlx::sqlite::SqliteConnection::lock_handle`], copying columns straight out of SQLite's row.
//!
//! Safety: a [`Statement`] is created from, and borrows, a [`LockedSqliteHandle`], which
//! guarantees that sqlx's worker thread makes no call on the connection meanwhile; the statement
//! is finalized when dropped, before the lock can be released. A [`Row`] mutably borrows its
//! statement, so the column slices it lends cannot outlive the next step, reset or finalize,
//! which are what invalidate them. Column indexes are checked against the statement's column
//! count, since SQLite leaves out-of-range indexes undefined.

use std::borrow::Cow;
use std::ffi::{c_int, CStr};
use std::marker::PhantomData;
use std::ptr::{self, NonNull};

use libsqlite3_sys as ffi;
use sqlx::error::{DatabaseError, ErrorKind};
use sqlx::sqlite::LockedSqliteHandle;

use crate::LogError;

/// A prepared statement on a locked connection.
pub(super) struct Statement<'l> {
    db: NonNull<ffi::sqlite3>,
    stmt: NonNull<ffi::sqlite3_stmt>,
    columns: c_int,
    _lock: PhantomData<&'l mut ()>,
}

impl<'l> Statement<'l> {
    /// Prepares the single SQL statement `sql`.
    pub(super) fn prepare(
        lock: &'l mut LockedSqliteHandle<'_>,
        sql: &str,
    ) -> Result<Statement<'l>, LogError> {
        let db = lock.as_raw_handle();
        let len = c_int::try_from(sql.len())
            .map_err(|_| LogError::Invalid("SQL statement too long".into()))?;
        let mut stmt = ptr::null_mut();
        // SAFETY: `db` is an open connection that `lock` keeps away from any other thread;
        // `sql` points to `len` valid bytes; `stmt` is a valid out-pointer.
        let rc = unsafe {
            ffi::sqlite3_prepare_v2(
                db.as_ptr(),
                sql.as_ptr().cast(),
                len,
                &mut stmt,
                ptr::null_mut(),
            )
        };
        if rc != ffi::SQLITE_OK {
            return Err(error(db, rc));
        }
        let stmt = NonNull::new(stmt)
            .ok_or_else(|| LogError::Invalid(format!("no SQL statement in {sql:?}")))?;
        // SAFETY: `stmt` was just prepared on `db`.
        let columns = unsafe { ffi::sqlite3_column_count(stmt.as_ptr()) };
        Ok(Statement {
            db,
            stmt,
            columns,
            _lock: PhantomData,
        })
    }

    /// Binds the 1-based parameter `index`.
    pub(super) fn bind_i64(&mut self, index: c_int, value: i64) -> Result<(), LogError> {
        // SAFETY: `stmt` is a live statement; SQLite checks `index`.
        let rc = unsafe { ffi::sqlite3_bind_int64(self.stmt.as_ptr(), index, value) };
        self.check(rc)
    }

    /// Binds the 1-based parameter `index` to a copy of `value`.
    pub(super) fn bind_text(&mut self, index: c_int, value: &str) -> Result<(), LogError> {
        let len = c_int::try_from(value.len())
            .map_err(|_| LogError::Invalid("SQL text parameter too long".into()))?;
        // SAFETY: `stmt` is a live statement; `value` points to `len` valid bytes, which SQLite
        // copies (SQLITE_TRANSIENT) before returning.
        let rc = unsafe {
            ffi::sqlite3_bind_text(
                self.stmt.as_ptr(),
                index,
                value.as_ptr().cast(),
                len,
                ffi::SQLITE_TRANSIENT(),
            )
        };
        self.check(rc)
    }

    /// Fails unless the statement returns exactly `n` columns.
    pub(super) fn expect_columns(&self, n: c_int) -> Result<(), LogError> {
        if self.columns == n {
            Ok(())
        } else {
            Err(LogError::Invalid(format!(
                "statement returns {} columns, not {n}",
                self.columns
            )))
        }
    }

    /// The next row, or `None` when the statement is done.
    pub(super) fn step(&mut self) -> Result<Option<Row<'_>>, LogError> {
        // SAFETY: `stmt` is a live statement on the locked connection.
        let rc = unsafe { ffi::sqlite3_step(self.stmt.as_ptr()) };
        match rc {
            ffi::SQLITE_ROW => Ok(Some(Row {
                stmt: self.stmt,
                columns: self.columns,
                _step: PhantomData,
            })),
            ffi::SQLITE_DONE => Ok(None),
            rc => Err(error(self.db, rc)),
        }
    }

    fn check(&self, rc: c_int) -> Result<(), LogError> {
        if rc == ffi::SQLITE_OK {
            Ok(())
        } else {
            Err(error(self.db, rc))
        }
    }
}

impl Drop for Statement<'_> {
    fn drop(&mut self) {
        // SAFETY: `stmt` is live and finalized exactly once, here, while the lock is still held.
        // Its return value repeats the last step's error, already reported.
        unsafe {
            ffi::sqlite3_finalize(self.stmt.as_ptr());
        }
    }
}

/// The current row of a [`Statement`].
pub(super) struct Row<'s> {
    stmt: NonNull<ffi::sqlite3_stmt>,
    columns: c_int,
    _step: PhantomData<&'s mut ()>,
}

impl Row<'_> {
    /// Column `col` as an integer (0 if out of range).
    pub(super) fn int64(&self, col: c_int) -> i64 {
        if !(0..self.columns).contains(&col) {
            return 0;
        }
        // SAFETY: the statement points at a row (the last step returned SQLITE_ROW, and the
        // borrow of the statement prevents any other step) and `col` is in range.
        unsafe { ffi::sqlite3_column_int64(self.stmt.as_ptr(), col) }
    }

    /// Column `col`'s bytes, whether a blob or text (empty if NULL or out of range).
    pub(super) fn bytes(&self, col: c_int) -> &[u8] {
        if !(0..self.columns).contains(&col) {
            return &[];
        }
        // SAFETY: as in `int64`. `sqlite3_column_blob` is called before `sqlite3_column_bytes`,
        // as SQLite requires; the pointer stays valid until the statement is stepped, reset or
        // finalized, none of which can happen while `self` borrows it, and no other call on
        // this column converts its type.
        unsafe {
            let data = ffi::sqlite3_column_blob(self.stmt.as_ptr(), col);
            let len = ffi::sqlite3_column_bytes(self.stmt.as_ptr(), col);
            match usize::try_from(len) {
                Ok(len) if !data.is_null() && len > 0 => {
                    std::slice::from_raw_parts(data.cast(), len)
                }
                _ => &[],
            }
        }
    }
}

/// The connection's last error, as a storage error like sqlx's own.
fn error(db: NonNull<ffi::sqlite3>, rc: c_int) -> LogError {
    // SAFETY: `db` is a live connection; `sqlite3_errmsg` returns a NUL-terminated string that
    // stays valid until the next call on the connection, and is copied right away.
    let (code, message) = unsafe {
        let message = ffi::sqlite3_errmsg(db.as_ptr());
        let message = if message.is_null() {
            format!("SQLite error {rc}")
        } else {
            CStr::from_ptr(message).to_string_lossy().into_owned()
        };
        (ffi::sqlite3_extended_errcode(db.as_ptr()), message)
    };
    LogError::Storage(sqlx::Error::Database(Box::new(RawSqliteError {
        code,
        message,
    })))
}

/// An error returned by a direct SQLite call.
#[derive(Debug)]
struct RawSqliteError {
    /// The extended result code.
    code: c_int,
    message: String,
}

impl std::fmt::Display for RawSqliteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "(code: {}) {}", self.code, self.message)
    }
}

impl std::error::Error for RawSqliteError {}

impl DatabaseError for RawSqliteError {
    fn message(&self) -> &str {
        &self.message
    }

    fn code(&self) -> Option<Cow<'_, str>> {
        Some(self.code.to_string().into())
    }

    fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
        self
    }

    fn kind(&self) -> ErrorKind {
        ErrorKind::Other
    }
}
