//! Prepared statements on sqlx's own connection handle, for staging's inserts and look-ups.
//!
//! Staging writes two rows per record and looks every key up first. Through sqlx each bound
//! value becomes an owned argument shipped to the connection's worker thread, and a multi-row
//! statement is rebuilt as text for every chunk; measured here that was most of staging's time
//! (31,600 records/s for 98k records, the SQLite engine itself a third of it).
//! `SqliteConnection::lock_handle` hands out the raw handle for this purpose: the statements
//! below are prepared once per transaction, bound straight from the records (inserts without a
//! copy, `SQLITE_STATIC`, through [`Statement::run_with`]; a query's key copied once), stepped
//! and finalized while the handle is locked, inside the transaction sqlx opened and commits.
//!
//! Everything unsafe of billsync is in this file. The invariants are local: a [`Raw`] borrows
//! the locked handle mutably for its whole life, so sqlx cannot use the connection meanwhile; a
//! [`Statement`] borrows its [`Raw`], so it is finalized before the handle is unlocked; neither
//! is `Send`, so every call happens on the thread that locked the handle.

use std::ffi::{c_int, CStr};
use std::marker::PhantomData;
use std::ptr::NonNull;

use libsqlite3_sys as ffi;
use sqlx::sqlite::LockedSqliteHandle;

/// An error SQLite reported, with its message.
#[derive(Debug, thiserror::Error)]
#[error("{message} (SQLite code {code})")]
pub struct RawError {
    /// The extended result code.
    pub code: i32,
    pub message: String,
}

/// The raw connection, borrowed from a locked sqlx handle.
pub struct Raw<'h> {
    db: NonNull<ffi::sqlite3>,
    _locked: PhantomData<&'h mut ()>,
}

impl<'h> Raw<'h> {
    pub fn new(handle: &'h mut LockedSqliteHandle<'_>) -> Self {
        Raw {
            db: handle.as_raw_handle().cast(),
            _locked: PhantomData,
        }
    }

    fn error(&self, code: c_int) -> RawError {
        // SAFETY: `db` is a live connection handle (locked for `'h`); sqlite3_errmsg returns a
        // NUL-terminated string owned by SQLite, copied out before any other call.
        let message = unsafe {
            let msg = ffi::sqlite3_errmsg(self.db.as_ptr());
            if msg.is_null() {
                String::from("unknown error")
            } else {
                CStr::from_ptr(msg).to_string_lossy().into_owned()
            }
        };
        let extended = unsafe { ffi::sqlite3_extended_errcode(self.db.as_ptr()) };
        RawError {
            code: if extended != 0 { extended } else { code },
            message,
        }
    }

    /// Prepare one statement (`sql` must hold exactly one).
    pub fn prepare<'r>(&'r self, sql: &str) -> Result<Statement<'r, 'h>, RawError> {
        let len = c_int::try_from(sql.len()).map_err(|_| RawError {
            code: ffi::SQLITE_TOOBIG,
            message: "statement too long".into(),
        })?;
        let mut stmt: *mut ffi::sqlite3_stmt = std::ptr::null_mut();
        // SAFETY: `sql` is valid for `len` bytes (no NUL needed when the length is given);
        // `stmt` receives an owned statement, finalized by `Statement::drop`.
        let rc = unsafe {
            ffi::sqlite3_prepare_v2(
                self.db.as_ptr(),
                sql.as_ptr().cast(),
                len,
                &mut stmt,
                std::ptr::null_mut(),
            )
        };
        if rc != ffi::SQLITE_OK {
            return Err(self.error(rc));
        }
        let stmt = NonNull::new(stmt).ok_or_else(|| RawError {
            code: ffi::SQLITE_MISUSE,
            message: "empty statement".into(),
        })?;
        Ok(Statement { raw: self, stmt })
    }
}

/// A prepared statement. Values are bound by 1-based index, then [`Statement::run`] or
/// [`Statement::next_row`] steps it.
pub struct Statement<'r, 'h> {
    raw: &'r Raw<'h>,
    stmt: NonNull<ffi::sqlite3_stmt>,
}

impl Statement<'_, '_> {
    fn check(&self, rc: c_int) -> Result<(), RawError> {
        if rc == ffi::SQLITE_OK {
            Ok(())
        } else {
            Err(self.raw.error(rc))
        }
    }

    pub fn text(&mut self, index: c_int, value: &str) -> Result<(), RawError> {
        // SAFETY: SQLITE_TRANSIENT makes SQLite copy the bytes before returning; an empty
        // value points at a real (static) byte rather than a dangling address.
        let rc = unsafe {
            ffi::sqlite3_bind_text64(
                self.stmt.as_ptr(),
                index,
                non_dangling(value.as_bytes()).cast(),
                value.len() as u64,
                ffi::SQLITE_TRANSIENT(),
                ffi::SQLITE_UTF8 as u8,
            )
        };
        self.check(rc)
    }

    pub fn int(&mut self, index: c_int, value: i64) -> Result<(), RawError> {
        // SAFETY: plain value bind on a live statement.
        let rc = unsafe { ffi::sqlite3_bind_int64(self.stmt.as_ptr(), index, value) };
        self.check(rc)
    }

    pub fn opt_int(&mut self, index: c_int, value: Option<i64>) -> Result<(), RawError> {
        match value {
            Some(v) => self.int(index, v),
            None => self.null(index),
        }
    }

    pub fn null(&mut self, index: c_int) -> Result<(), RawError> {
        // SAFETY: plain bind on a live statement.
        let rc = unsafe { ffi::sqlite3_bind_null(self.stmt.as_ptr(), index) };
        self.check(rc)
    }

    /// Step a statement that returns no rows (an `INSERT`), then reset it for the next values.
    pub fn run(&mut self) -> Result<(), RawError> {
        // SAFETY: stepping and resetting a live statement of a locked connection. A failed
        // step's message is taken before the reset.
        let rc = unsafe { ffi::sqlite3_step(self.stmt.as_ptr()) };
        let result = match rc {
            ffi::SQLITE_DONE => Ok(()),
            ffi::SQLITE_ROW => Err(RawError {
                code: ffi::SQLITE_MISUSE,
                message: "statement returned rows".into(),
            }),
            rc => Err(self.raw.error(rc)),
        };
        let reset = unsafe { ffi::sqlite3_reset(self.stmt.as_ptr()) };
        result.and_then(|()| self.check(reset))
    }

    /// Step a query: `Some(row)` while it has rows, `None` at the end (the statement is then
    /// reset for the next values). A row's columns are read before the next step.
    pub fn next_row(&mut self) -> Result<Option<Row<'_>>, RawError> {
        // SAFETY: stepping a live statement of a locked connection.
        let rc = unsafe { ffi::sqlite3_step(self.stmt.as_ptr()) };
        match rc {
            ffi::SQLITE_ROW => Ok(Some(Row {
                stmt: self.stmt,
                _stmt: PhantomData,
            })),
            ffi::SQLITE_DONE => {
                let reset = unsafe { ffi::sqlite3_reset(self.stmt.as_ptr()) };
                self.check(reset).map(|()| None)
            }
            rc => {
                let err = self.raw.error(rc);
                unsafe { ffi::sqlite3_reset(self.stmt.as_ptr()) };
                Err(err)
            }
        }
    }
}

impl<'r, 'h> Statement<'r, 'h> {
    /// Bind values without copying them (`SQLITE_STATIC`), step, reset and unbind.
    ///
    /// Staging binds some 600 bytes per record; with `SQLITE_TRANSIENT` SQLite first copies
    /// every value into its own memory and then copies it again into the row, and the first
    /// copy was a visible share of the stager's time. `SQLITE_STATIC` requires the bytes to
    /// stay put until the statement is stepped and the value unbound. The signature makes that
    /// so: every value borrows for `'v`, a lifetime of this call's caller that outlives the
    /// call, so nothing bound can be changed or freed before this returns; and before it
    /// returns every binding is cleared, so none outlives the call.
    pub fn run_with<'v>(
        &mut self,
        bind: impl FnOnce(&mut Values<'_, 'r, 'h, 'v>) -> Result<(), RawError>,
    ) -> Result<(), RawError> {
        let bound = bind(&mut Values {
            stmt: self,
            _values: PhantomData,
        });
        let result = bound.and_then(|()| self.run());
        // SAFETY: a live statement; unbinding only sets every parameter to NULL.
        unsafe { ffi::sqlite3_clear_bindings(self.stmt.as_ptr()) };
        result
    }
}

/// The values of one [`Statement::run_with`]: each borrowed for `'v`, bound without a copy.
pub struct Values<'s, 'r, 'h, 'v> {
    stmt: &'s mut Statement<'r, 'h>,
    _values: PhantomData<&'v [u8]>,
}

impl<'v> Values<'_, '_, '_, 'v> {
    pub fn text(&mut self, index: c_int, value: &'v str) -> Result<(), RawError> {
        // SAFETY: SQLITE_STATIC: `value` outlives the `run_with` call that steps the statement
        // and then clears this binding (see there); empty values point at a static byte.
        let rc = unsafe {
            ffi::sqlite3_bind_text64(
                self.stmt.stmt.as_ptr(),
                index,
                non_dangling(value.as_bytes()).cast(),
                value.len() as u64,
                ffi::SQLITE_STATIC(),
                ffi::SQLITE_UTF8 as u8,
            )
        };
        self.stmt.check(rc)
    }

    pub fn opt_text(&mut self, index: c_int, value: Option<&'v str>) -> Result<(), RawError> {
        match value {
            Some(v) => self.text(index, v),
            None => self.stmt.null(index),
        }
    }

    pub fn blob(&mut self, index: c_int, value: &'v [u8]) -> Result<(), RawError> {
        // SAFETY: as `text`.
        let rc = unsafe {
            ffi::sqlite3_bind_blob64(
                self.stmt.stmt.as_ptr(),
                index,
                non_dangling(value),
                value.len() as u64,
                ffi::SQLITE_STATIC(),
            )
        };
        self.stmt.check(rc)
    }

    pub fn int(&mut self, index: c_int, value: i64) -> Result<(), RawError> {
        self.stmt.int(index, value)
    }

    pub fn opt_int(&mut self, index: c_int, value: Option<i64>) -> Result<(), RawError> {
        self.stmt.opt_int(index, value)
    }
}

impl Drop for Statement<'_, '_> {
    fn drop(&mut self) {
        // SAFETY: the statement is owned and finalized exactly once.
        unsafe { ffi::sqlite3_finalize(self.stmt.as_ptr()) };
    }
}

/// A pointer SQLite may read `bytes.len()` bytes from: for an empty slice, a static byte
/// instead of the dangling address Rust gives empty slices.
fn non_dangling(bytes: &[u8]) -> *const std::ffi::c_void {
    static EMPTY: u8 = 0;
    if bytes.is_empty() {
        std::ptr::from_ref(&EMPTY).cast()
    } else {
        bytes.as_ptr().cast()
    }
}

/// The current row of a query; borrowing the statement keeps it from stepping meanwhile.
pub struct Row<'s> {
    stmt: NonNull<ffi::sqlite3_stmt>,
    _stmt: PhantomData<&'s mut ()>,
}

impl Row<'_> {
    pub fn int(&self, column: c_int) -> i64 {
        // SAFETY: reading a column of the current row of a live statement.
        unsafe { ffi::sqlite3_column_int64(self.stmt.as_ptr(), column) }
    }

    /// A blob column; empty when it is NULL or empty.
    pub fn blob(&self, column: c_int) -> &[u8] {
        // SAFETY: as `text`: sqlite3_column_blob's buffer lives until the statement this row
        // borrows steps, resets or is finalized; its length is read after it. NULL (and an
        // empty blob) come back as a null pointer.
        unsafe {
            let ptr = ffi::sqlite3_column_blob(self.stmt.as_ptr(), column);
            if ptr.is_null() {
                return &[];
            }
            let len = ffi::sqlite3_column_bytes(self.stmt.as_ptr(), column);
            std::slice::from_raw_parts(ptr.cast::<u8>(), usize::try_from(len).unwrap_or(0))
        }
    }

    /// A text column, `None` when it is NULL or not UTF-8.
    pub fn text(&self, column: c_int) -> Option<&str> {
        // SAFETY: sqlite3_column_text returns a buffer valid until the next step, reset or
        // finalize of the statement, all of which need the `&mut Statement` this row borrows;
        // its length comes from sqlite3_column_bytes called after it, as SQLite requires.
        unsafe {
            let ptr = ffi::sqlite3_column_text(self.stmt.as_ptr(), column);
            if ptr.is_null() {
                return None;
            }
            let len = ffi::sqlite3_column_bytes(self.stmt.as_ptr(), column);
            let bytes = std::slice::from_raw_parts(ptr, usize::try_from(len).ok()?);
            std::str::from_utf8(bytes).ok()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Connection;

    #[tokio::test]
    async fn binds_reads_and_reports_errors_by_name() {
        let mut conn = sqlx::SqliteConnection::connect("sqlite::memory:")
            .await
            .unwrap();
        sqlx::query("CREATE TABLE t (id INTEGER PRIMARY KEY, s TEXT, b BLOB NOT NULL)")
            .execute(&mut conn)
            .await
            .unwrap();
        let mut handle = conn.lock_handle().await.unwrap();
        let raw = Raw::new(&mut handle);
        let mut insert = raw.prepare("INSERT INTO t VALUES (?1, ?2, ?3)").unwrap();
        let mut put = |id: i64, s: Option<&str>, b: &[u8]| -> Result<(), RawError> {
            insert.run_with(|v| {
                v.int(1, id)?;
                v.opt_text(2, s)?;
                v.blob(3, b)
            })
        };
        put(1, Some(""), b"").unwrap();
        put(2, Some("ü€"), &[0, 1, 2]).unwrap();
        // A duplicate id: SQLite's own message and extended code, and the statement is reset
        // and usable for the next values.
        let err = put(1, Some("again"), b"x").unwrap_err();
        assert_eq!(err.code, ffi::SQLITE_CONSTRAINT_PRIMARYKEY, "{err}");
        assert!(
            err.message.contains("UNIQUE constraint failed: t.id"),
            "{err}"
        );
        put(3, None, b"x").unwrap();
        // `run_with` leaves nothing bound: stepped again without values, the statement sees
        // NULLs (not the bytes of a value that no longer exists), and the NOT NULL refuses it.
        let err = insert.run().unwrap_err();
        assert_eq!(err.code, ffi::SQLITE_CONSTRAINT_NOTNULL, "{err}");
        // A value that fails to bind leaves the statement usable and unbound too.
        let err = insert
            .run_with(|v| {
                v.int(1, 9)?;
                v.text(7, "no such parameter")
            })
            .unwrap_err();
        assert_eq!(err.code, ffi::SQLITE_RANGE, "{err}");

        let mut query = raw
            .prepare("SELECT id, s, length(b), typeof(b) FROM t ORDER BY id")
            .unwrap();
        let mut rows = Vec::new();
        while let Some(row) = query.next_row().unwrap() {
            rows.push((
                row.int(0),
                row.text(1).map(str::to_owned),
                row.int(2),
                row.text(3).unwrap().to_owned(),
            ));
        }
        assert_eq!(
            rows,
            [
                (1, Some(String::new()), 0, "blob".to_string()),
                (2, Some("ü€".to_string()), 3, "blob".to_string()),
                (3, None, 1, "blob".to_string()),
            ]
        );
        // Done and reset: the same query runs again.
        assert_eq!(query.next_row().unwrap().map(|r| r.int(0)), Some(1));

        let err = raw.prepare("SELEC 1").err().expect("a syntax error");
        assert!(err.message.contains("syntax error"), "{err}");
    }
}
