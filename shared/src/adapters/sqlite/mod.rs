//! The embedded store: one SQLite file holding accounts, keys, campaigns, prospects and the
//! campaign job queue.
//!
//! Durability: WAL journal with `synchronous = FULL`. Every commit fsyncs the WAL before it
//! returns, and no write is acknowledged before its commit returned, so a crash or power loss
//! never loses an answered request. That fsync is what a write costs; the store pays it once per
//! group of writes rather than once per write (below), and never skips it.
//!
//! Reads run inline, on the thread of the task that asks, on a small pool of read-only
//! connections to the same file. A WAL reader never waits for the writer and sees every commit
//! made before its read began, so an acknowledged write is visible to every later read. Key
//! records are also kept in memory, each with the version of the keys table it was read at: a
//! trigger bumps that version on every change to a key, from any process, so a key lookup is
//! one read of the version while no key changed, and a revocation still applies at once.
//! A request's lookups hit cached pages and take
//! microseconds, less than handing them to another thread would cost; the price is that a read
//! holds its runtime thread while it runs. Between write groups the writer thread keeps one
//! read transaction open on the latest commit, so that reads do not each take and drop the
//! WAL's file lock (`Pin`).
//!
//! Writes go to one writer thread, which owns the only connection that writes. It waits for a
//! write, takes every other one already queued (up to `MAX_GROUP`) and runs them all in one
//! `BEGIN IMMEDIATE` transaction, each in its own savepoint: a write that fails is rolled back
//! alone and the others of its group carry on. One `COMMIT`, so one fsync, then makes the whole
//! group durable, and only then is each caller answered. Writes arriving one at a time commit
//! one at a time, as before; under load, the fsyncs per second stop being the limit on writes
//! per second. The costs: a write waits for the group ahead of it to commit before its own
//! starts (at most one group's statements and one fsync); a slow write delays the rest of its
//! group; and a failed commit (disk full, I/O error) fails every write of the group, writes
//! that might have succeeded alone included. None of them was acknowledged, so each caller
//! gets an error and may retry; nothing is lost or half-written.
//!
//! Other processes (`cadenhq serve` and the `cadenhq` CLI) may open the same file at once.
//! SQLite's file locks serialize their writers; a connection waits up to five seconds for the
//! lock, after which the request fails as [`StoreError::Unavailable`].

mod admin;
mod feedback;
mod idempotency;
mod integrations;
mod keys;
mod prospects;
mod sends;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};
use time::OffsetDateTime;
use tokio::sync::oneshot;

use crate::domain::ApiKeyRecord;
pub use crate::ports::LeasedJob;
use crate::ports::StoreError;
pub use sends::{drain_due_jobs, OutboxEntry, DRAIN_BATCH};

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "cadenhq.db";

/// Most writes committed together in one transaction.
const MAX_GROUP: usize = 256;

/// Idle read connections kept for reuse; a read finding none opens another.
const MAX_IDLE_READERS: usize = 16;

/// Prepared statements each connection keeps (every statement of the store fits).
const STATEMENT_CACHE: usize = 64;

/// How long a connection waits for another one's lock before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS accounts (id TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY, hash TEXT NOT NULL UNIQUE, account_id TEXT NOT NULL, doc TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS api_keys_account ON api_keys(account_id);
CREATE TABLE IF NOT EXISTS campaigns (id TEXT PRIMARY KEY, account_id TEXT NOT NULL, doc TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS campaigns_account ON campaigns(account_id);
CREATE TABLE IF NOT EXISTS prospects (
    id TEXT PRIMARY KEY, account_id TEXT NOT NULL, email_hash TEXT NOT NULL, external_id TEXT,
    status TEXT NOT NULL, ended_through INTEGER NOT NULL, version INTEGER NOT NULL,
    updated_at TEXT NOT NULL, doc TEXT NOT NULL,
    UNIQUE (account_id, email_hash));
CREATE UNIQUE INDEX IF NOT EXISTS prospects_external_id
    ON prospects(account_id, external_id) WHERE external_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT NOT NULL, visible_at_ms INTEGER NOT NULL,
    deliveries INTEGER NOT NULL DEFAULT 0, created_at TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS jobs_visible ON jobs(visible_at_ms);
CREATE TABLE IF NOT EXISTS dead_jobs (
    id INTEGER PRIMARY KEY, body TEXT NOT NULL, reason TEXT NOT NULL, failed_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sends (
    enrollment_id TEXT NOT NULL, step INTEGER NOT NULL, claimed_at TEXT NOT NULL,
    PRIMARY KEY (enrollment_id, step));
CREATE TABLE IF NOT EXISTS idempotency (
    account_id TEXT NOT NULL, key_hash TEXT NOT NULL, fingerprint TEXT NOT NULL, status INTEGER,
    body TEXT, lease_until_ms INTEGER NOT NULL, expires_at_ms INTEGER NOT NULL,
    PRIMARY KEY (account_id, key_hash));
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, queued_at TEXT NOT NULL, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS prospect_campaigns (
    account_id TEXT NOT NULL, campaign_id TEXT NOT NULL, created_ms INTEGER NOT NULL, prospect_id TEXT NOT NULL,
    PRIMARY KEY (account_id, campaign_id, created_ms, prospect_id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS prospect_campaigns_prospect ON prospect_campaigns(prospect_id);
CREATE TABLE IF NOT EXISTS suppressions (
    account_id TEXT NOT NULL, email_hash TEXT NOT NULL, reason TEXT NOT NULL, at TEXT NOT NULL,
    PRIMARY KEY (account_id, email_hash));
CREATE TABLE IF NOT EXISTS feedback (
    feedback_id TEXT NOT NULL, email_hash TEXT NOT NULL, account_id TEXT NOT NULL, prospect_id TEXT NOT NULL,
    kind TEXT NOT NULL, at TEXT NOT NULL, at_ms INTEGER NOT NULL, received_at TEXT NOT NULL,
    PRIMARY KEY (feedback_id, email_hash));
CREATE INDEX IF NOT EXISTS feedback_prospect ON feedback(prospect_id, kind, at_ms);
CREATE TABLE IF NOT EXISTS integrations (id TEXT PRIMARY KEY, account_id TEXT NOT NULL, doc TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS integrations_account ON integrations(account_id);
CREATE TABLE IF NOT EXISTS received_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, provider TEXT NOT NULL, account_id TEXT NOT NULL, event_id TEXT NOT NULL,
    outcome TEXT NOT NULL, received_ms INTEGER NOT NULL, doc TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS received_events_account ON received_events(account_id, seq);
CREATE INDEX IF NOT EXISTS received_events_event ON received_events(provider, account_id, event_id);
CREATE INDEX IF NOT EXISTS received_events_received ON received_events(received_ms);
CREATE TABLE IF NOT EXISTS meta (id INTEGER PRIMARY KEY CHECK (id = 1), keys_version INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (id, keys_version) VALUES (1, 0);
CREATE TRIGGER IF NOT EXISTS api_keys_inserted AFTER INSERT ON api_keys
    BEGIN UPDATE meta SET keys_version = keys_version + 1 WHERE id = 1; END;
CREATE TRIGGER IF NOT EXISTS api_keys_updated AFTER UPDATE ON api_keys
    BEGIN UPDATE meta SET keys_version = keys_version + 1 WHERE id = 1; END;
CREATE TRIGGER IF NOT EXISTS api_keys_deleted AFTER DELETE ON api_keys
    BEGIN UPDATE meta SET keys_version = keys_version + 1 WHERE id = 1; END;
";

/// Columns added to tables of earlier versions, in order: (table, column, declaration). A
/// send record of an earlier version (a bare claim) reads as `sent`, which is what it meant.
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("sends", "state", "TEXT NOT NULL DEFAULT 'sent'"),
    ("sends", "owner", "TEXT"),
    ("sends", "detail", "TEXT"),
    ("sends", "attempts", "INTEGER NOT NULL DEFAULT 1"),
    ("sends", "retry_at", "TEXT"),
    ("sends", "updated_at", "TEXT"),
    ("campaigns", "sending_version", "INTEGER NOT NULL DEFAULT 0"),
    ("outbox", "mime", "TEXT"),
    ("outbox", "message_id", "TEXT"),
    ("sends", "campaign_id", "TEXT"),
    ("sends", "prospect_id", "TEXT"),
    ("sends", "subject", "TEXT"),
    ("prospects", "history", "TEXT"),
    ("prospects", "created_ms", "INTEGER"),
    ("prospects", "updated_ms", "INTEGER"),
    ("sends", "delivered_at", "TEXT"),
];

/// Indexes on columns of [`ADDED_COLUMNS`], created once those exist.
const ADDED_INDEXES: &str = "
CREATE INDEX IF NOT EXISTS sends_campaign ON sends(campaign_id, step, state);
CREATE INDEX IF NOT EXISTS sends_prospect ON sends(prospect_id);
CREATE INDEX IF NOT EXISTS sends_message ON sends(detail) WHERE state = 'sent';
CREATE INDEX IF NOT EXISTS prospects_listing ON prospects(account_id, created_ms DESC, id DESC);
CREATE INDEX IF NOT EXISTS prospects_status_listing ON prospects(account_id, status, created_ms DESC, id DESC);
CREATE INDEX IF NOT EXISTS prospects_updated ON prospects(account_id, updated_ms);
";

/// Adds the columns of [`ADDED_COLUMNS`] that a table lacks.
fn add_missing_columns(conn: &Connection) -> rusqlite::Result<()> {
    for (table, column, declaration) in ADDED_COLUMNS {
        let exists: bool = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2)",
            params![table, column],
            |r| r.get(0),
        )?;
        if !exists {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {declaration}"))?;
        }
    }
    Ok(())
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn unix_ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// The embedded store. Cheap to clone; all clones share the read connections and the writer
/// thread, which ends once the last clone is dropped.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// Idle read connections.
    readers: Mutex<Vec<Connection>>,
    /// Key records by hash, with the `keys_version` they were read at: every change to
    /// `api_keys`, from this process or another (the `cadenhq` CLI), bumps that version, so
    /// a cached record is used only while no key changed since it was read.
    keys: Mutex<HashMap<String, (i64, ApiKeyRecord)>>,
    /// The writer thread's queue; `None` only while dropping.
    writes: Option<mpsc::Sender<Box<dyn PendingWrite>>>,
    writer: Option<JoinHandle<()>>,
    /// Writers waiting for the WAL to be emptied and truncated after their commit.
    wal_truncations: WalTruncations,
}

/// Who waits for the WAL to be truncated once the group they wrote in is committed: an
/// erasure, so that no copy of what it deleted stays in the WAL file.
type WalTruncations = Arc<Mutex<Vec<oneshot::Sender<()>>>>;

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue ends the writer thread once it has committed what it holds. Waiting
        // for it closes its connections before the read connections, the last of which copies
        // the WAL back into the database file, as a single connection closing used to.
        drop(self.writes.take());
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

fn db_error(e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => StoreError::Unavailable(Box::new(e)),
        _ => StoreError::Other(Box::new(e)),
    }
}

/// The error of a group commit, for each write of the group.
fn group_error(e: &rusqlite::Error) -> StoreError {
    match e {
        rusqlite::Error::SqliteFailure(code, message) => db_error(rusqlite::Error::SqliteFailure(*code, message.clone())),
        other => StoreError::other(other.to_string()),
    }
}

fn json_error(e: serde_json::Error) -> StoreError {
    StoreError::Other(Box::new(e))
}

/// Runs one statement through the connection's statement cache.
fn execute<P: rusqlite::Params>(conn: &Connection, sql: &str, params: P) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute(params)
}

/// Reads one row through the connection's statement cache.
fn query_row<T, P, F>(conn: &Connection, sql: &str, params: P, f: F) -> rusqlite::Result<T>
where
    P: rusqlite::Params,
    F: FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
{
    conn.prepare_cached(sql)?.query_row(params, f)
}

fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(db_error)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(db_error)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let conn = open_connection(path)?;
    conn.pragma_update(None, "query_only", true).map_err(db_error)?;
    Ok(conn)
}

/// A write waiting for the writer thread.
trait PendingWrite: Send {
    /// Runs the write on the write connection, inside the group's transaction and its own
    /// savepoint; `false` when it failed and its savepoint must be rolled back.
    fn run(&mut self, conn: &Connection) -> bool;
    /// Answers its caller, once the group's commit is known: `group` is its outcome.
    fn answer(self: Box<Self>, group: Result<(), StoreError>);
}

struct Request<T, F> {
    write: Option<F>,
    result: Option<Result<T, StoreError>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> PendingWrite for Request<T, F>
where
    T: Send,
    F: FnOnce(&Connection) -> Result<T, StoreError> + Send,
{
    fn run(&mut self, conn: &Connection) -> bool {
        let Some(write) = self.write.take() else { return false };
        let result = catch_unwind(AssertUnwindSafe(|| write(conn))).unwrap_or_else(|_| Err(StoreError::other("the write panicked")));
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn answer(self: Box<Self>, group: Result<(), StoreError>) {
        let outcome = match (self.result, group) {
            // Its own failure: it was rolled back whatever became of the others.
            (Some(Err(e)), _) | (Some(Ok(_)) | None, Err(e)) => Err(e),
            (Some(Ok(value)), Ok(())) => Ok(value),
            (None, Ok(())) => Err(StoreError::other("the write did not run")),
        };
        // The caller may have stopped waiting; the write stands all the same.
        let _ = self.reply.send(outcome);
    }
}

/// The writer thread: commits the queued writes group by group until every store is dropped.
/// Between groups, `pin` holds a read transaction on the latest commit (see [`Pin`]).
fn write_loop(conn: &Connection, pin: &Pin, writes: &mpsc::Receiver<Box<dyn PendingWrite>>, truncations: &WalTruncations) {
    pin.hold();
    loop {
        let first = match writes.recv_timeout(PIN_REFRESH) {
            Ok(write) => write,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                pin.release();
                pin.hold();
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match writes.try_recv() {
                Ok(write) => group.push(write),
                Err(_) => break,
            }
        }
        pin.release();
        commit_group(conn, group);
        let waiting = std::mem::take(&mut *truncations.lock().unwrap_or_else(PoisonError::into_inner));
        if !waiting.is_empty() {
            // Copies every frame back and empties the file (waiting for readers as long as
            // the busy timeout lets it); the pin is not held now.
            if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())) {
                tracing::warn!(error = %e, "the WAL could not be truncated after an erasure");
            }
            for waiter in waiting {
                let _ = waiter.send(());
            }
        }
        pin.hold();
    }
    pin.release();
}

/// A read transaction held open between write groups, on a connection of its own, so that the
/// WAL read lock of the latest commit is always held by this process.
///
/// SQLite counts the read locks of one process's connections itself and takes or drops the
/// file lock (an `fcntl` call, and a mutex held across it) only when that count leaves or
/// reaches zero. Without a holder, nearly every read transaction pays both calls, most of the
/// cost of a lookup. The pin changes no read's snapshot: each read still begins its own, on
/// the latest commit. It is released before each group begins, so that the group's write can
/// restart the WAL from its beginning and the checkpoint after its commit can copy all of it
/// back, and taken again after the commit. Idle, it is renewed every [`PIN_REFRESH`], so that it
/// never keeps a checkpoint from copying back what other processes committed for longer.
struct Pin(Connection);

/// How often an idle writer renews its [`Pin`].
const PIN_REFRESH: Duration = Duration::from_secs(1);

impl Pin {
    fn hold(&self) {
        let conn = &self.0;
        let begun = execute(conn, "BEGIN", []).and_then(|_| query_row(conn, "PRAGMA schema_version", [], |r| r.get::<_, i64>(0)));
        if begun.is_err() {
            // Only slower reads until the next try.
            self.release();
        }
    }

    fn release(&self) {
        let conn = &self.0;
        if !conn.is_autocommit() && execute(conn, "COMMIT", []).is_err() {
            let _ = execute(conn, "ROLLBACK", []);
        }
    }
}

/// Runs `group` in one transaction, each write in its own savepoint, commits it and answers
/// every write.
fn commit_group(conn: &Connection, group: Vec<Box<dyn PendingWrite>>) {
    let mut pending = group.into_iter();
    // More than one pass only when SQLite itself rolled a transaction back.
    while pending.len() > 0 {
        if let Err(e) = execute(conn, "BEGIN IMMEDIATE", []) {
            for write in pending {
                write.answer(Err(group_error(&e)));
            }
            return;
        }
        let mut done: Vec<Box<dyn PendingWrite>> = Vec::with_capacity(pending.len());
        let mut aborted = None;
        for mut write in pending.by_ref() {
            if let Err(e) = execute(conn, "SAVEPOINT write", []) {
                aborted = Some((write, group_error(&e)));
                break;
            }
            let ok = write.run(conn);
            // Some failures (disk full, I/O errors) make SQLite roll back the whole
            // transaction: whatever ran in it is gone.
            if conn.is_autocommit() {
                aborted = Some((write, StoreError::other("the transaction was rolled back by a failed write")));
                break;
            }
            let end = if ok {
                execute(conn, "RELEASE write", [])
            } else {
                execute(conn, "ROLLBACK TO write", []).and_then(|_| execute(conn, "RELEASE write", []))
            };
            if let Err(e) = end {
                aborted = Some((write, group_error(&e)));
                break;
            }
            done.push(write);
        }
        if let Some((write, error)) = aborted {
            if !conn.is_autocommit() {
                let _ = execute(conn, "ROLLBACK", []);
            }
            for earlier in done {
                earlier.answer(Err(StoreError::other("the transaction was rolled back by a failed write")));
            }
            write.answer(Err(error));
            continue;
        }
        let commit = execute(conn, "COMMIT", []);
        if commit.is_err() && !conn.is_autocommit() {
            let _ = execute(conn, "ROLLBACK", []);
        }
        for write in done {
            write.answer(commit.as_ref().map(drop).map_err(group_error));
        }
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the store in `data_dir`.
    ///
    /// # Errors
    /// [`StoreError::Other`] when the directory or database cannot be created or opened.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(StoreError::other)?;
        let path = data_dir.join(DB_FILE);
        let conn = open_connection(&path)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(db_error)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(db_error)?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(db_error)?;
        // Deleted content is overwritten, so an erased prospect leaves no trace in free pages.
        conn.pragma_update(None, "secure_delete", "ON").map_err(db_error)?;
        conn.execute_batch(SCHEMA).map_err(db_error)?;
        add_missing_columns(&conn).map_err(db_error)?;
        prospects::fill_listing_positions(&conn)?;
        conn.execute_batch(ADDED_INDEXES).map_err(db_error)?;
        let reader = open_reader(&path)?;
        let pin = open_reader(&path)?;
        // A pin that cannot be had at once is skipped, never waited for: writes wait on it.
        pin.busy_timeout(Duration::ZERO).map_err(db_error)?;
        let pin = Pin(pin);
        let (writes, queue) = mpsc::channel::<Box<dyn PendingWrite>>();
        let wal_truncations = WalTruncations::default();
        let truncations = Arc::clone(&wal_truncations);
        let writer = std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || write_loop(&conn, &pin, &queue, &truncations))
            .map_err(StoreError::other)?;
        Ok(Self {
            inner: Arc::new(Inner {
                path,
                readers: Mutex::new(vec![reader]),
                keys: Mutex::default(),
                writes: Some(writes),
                writer: Some(writer),
                wal_truncations,
            }),
        })
    }

    /// Opens the store in `data_dir` if there is one; `None` (and nothing created) if not.
    ///
    /// # Errors
    /// [`StoreError::Other`] when the store is there but cannot be opened.
    pub fn open_existing(data_dir: &Path) -> Result<Option<Self>, StoreError> {
        if !data_dir.join(DB_FILE).is_file() {
            return Ok(None);
        }
        Self::open(data_dir).map(Some)
    }

    /// Runs `f` on a read connection, on this thread.
    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let idle = self.inner.readers.lock().unwrap_or_else(PoisonError::into_inner).pop();
        let conn = match idle {
            Some(conn) => conn,
            None => open_reader(&self.inner.path)?,
        };
        let result = f(&conn);
        // Only a connection holding no transaction and no unfinished statement goes back: either
        // would pin an old snapshot and hide later commits from the next read.
        if conn.is_autocommit() && !conn.is_busy() {
            let mut readers = self.inner.readers.lock().unwrap_or_else(PoisonError::into_inner);
            if readers.len() < MAX_IDLE_READERS {
                readers.push(conn);
            }
        }
        result
    }

    /// Runs `f` on the writer thread, in a group transaction, and answers once it is committed.
    async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let request = Box::new(Request { write: Some(f), result: None, reply });
        let writes = self.inner.writes.as_ref().ok_or_else(|| StoreError::other("the sqlite writer has stopped"))?;
        writes.send(request).map_err(|_| StoreError::other("the sqlite writer has stopped"))?;
        answer.await.map_err(|_| StoreError::other("the sqlite writer stopped before answering"))?
    }
}

fn get_doc<T: serde::de::DeserializeOwned>(conn: &Connection, sql: &str, id: String) -> Result<Option<T>, StoreError> {
    let doc: Option<String> = query_row(conn, sql, [id], |r| r.get(0)).optional().map_err(db_error)?;
    doc.map(|d| serde_json::from_str(&d).map_err(json_error)).transpose()
}

fn list_docs<T: serde::de::DeserializeOwned>(conn: &Connection, sql: &str, id: String) -> Result<Vec<T>, StoreError> {
    let mut stmt = conn.prepare_cached(sql).map_err(db_error)?;
    let docs = stmt.query_map([id], |r| r.get::<_, String>(0)).map_err(db_error)?;
    docs.map(|d| serde_json::from_str(&d.map_err(db_error)?).map_err(json_error)).collect()
}
