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

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};
use time::OffsetDateTime;
use tokio::sync::oneshot;

use super::record::{rfc3339, ProspectRecord};
use crate::domain::{
    Account, AccountId, ApiKeyRecord, Campaign, CampaignId, CampaignJob, KeyHash, KeyId,
    NormalizedEmail, Prospect, ProspectStatus,
};
use crate::domain::{
    ClaimOwner, SendKey, SendRecord, SendState, IdempotencyBegin, IdempotencyKey, RateLimit, StoredResponse, IDEMPOTENCY_TTL, IN_FLIGHT_LEASE,
};
pub use crate::ports::LeasedJob;
use crate::ports::{
    AdminStore, ClaimRequest, ClaimResult, Conflict, Delivered, IdempotencyStore, JobQueue, KeyStore, MailError, Mailer,
    OutgoingEmail, ProspectRef, ProspectRepository, PullQueue, Replacing, SendClaim, SendLog, StoreError, UpsertContext,
};

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
];

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

/// Key records kept in memory at most (the cache is emptied when full).
const KEY_CACHE_MAX: usize = 10_000;


/// An email the outbox mailer stored instead of sending: the exact MIME message the SMTP and
/// SES mailers would send, and what it was made from.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OutboxEntry {
    pub id: i64,
    pub queued_at: String,
    /// The `Message-ID` header.
    pub message_id: Option<String>,
    /// Every header of the message, in order.
    pub headers: Vec<(String, String)>,
    #[serde(flatten)]
    pub email: OutgoingEmail,
    /// The message as an `.eml` file holds it (`cadenhq outbox show ID --raw`).
    #[serde(skip)]
    pub raw: Option<String>,
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn unix_ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// The columns of `prospects`, in the order [`read_prospect`] reads them.
macro_rules! prospect_columns {
    () => {
        "id, account_id, email_hash, external_id, status, ended_through, version, updated_at, doc"
    };
}

/// The query finding one prospect of an account by `$column`.
macro_rules! select_prospect_by {
    ($column:literal) => {
        concat!("SELECT ", prospect_columns!(), " FROM prospects WHERE account_id = ?1 AND ", $column, " = ?2")
    };
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
}

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
fn write_loop(conn: &Connection, pin: &Pin, writes: &mpsc::Receiver<Box<dyn PendingWrite>>) {
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
        conn.execute_batch(SCHEMA).map_err(db_error)?;
        add_missing_columns(&conn).map_err(db_error)?;
        let reader = open_reader(&path)?;
        let pin = open_reader(&path)?;
        // A pin that cannot be had at once is skipped, never waited for: writes wait on it.
        pin.busy_timeout(Duration::ZERO).map_err(db_error)?;
        let pin = Pin(pin);
        let (writes, queue) = mpsc::channel::<Box<dyn PendingWrite>>();
        let writer = std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || write_loop(&conn, &pin, &queue))
            .map_err(StoreError::other)?;
        Ok(Self {
            inner: Arc::new(Inner {
                path,
                readers: Mutex::new(vec![reader]),
                keys: Mutex::default(),
                writes: Some(writes),
                writer: Some(writer),
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

    /// Takes up to `limit` jobs visible at `now` and hides them until `lease_until`, so a job
    /// whose worker dies is handed out again then.
    ///
    /// # Errors
    /// [`StoreError`] on a database failure.
    pub async fn lease_due_jobs(&self, now: OffsetDateTime, lease_until: OffsetDateTime, limit: u32) -> Result<Vec<LeasedJob>, StoreError> {
        let (now, until) = (unix_ms(now), unix_ms(lease_until));
        self.write(move |conn| {
            let jobs = {
                let mut stmt = conn
                    .prepare_cached("SELECT id, body, deliveries + 1 FROM jobs WHERE visible_at_ms <= ?1 ORDER BY visible_at_ms, id LIMIT ?2")
                    .map_err(db_error)?;
                let rows = stmt
                    .query_map(params![now, limit], |r| Ok(LeasedJob { id: r.get(0)?, body: r.get(1)?, deliveries: r.get(2)? }))
                    .map_err(db_error)?;
                rows.collect::<Result<Vec<_>, _>>().map_err(db_error)?
            };
            for job in &jobs {
                execute(conn, "UPDATE jobs SET visible_at_ms = ?2, deliveries = deliveries + 1 WHERE id = ?1", params![job.id, until])
                    .map_err(db_error)?;
            }
            Ok(jobs)
        })
        .await
    }

    /// Removes a job that was handled.
    ///
    /// # Errors
    /// [`StoreError`] on a database failure.
    pub async fn ack_job(&self, id: i64) -> Result<(), StoreError> {
        self.write(move |conn| execute(conn, "DELETE FROM jobs WHERE id = ?1", [id]).map(drop).map_err(db_error)).await
    }

    /// Moves a job that cannot be handled to the dead-letter table.
    ///
    /// # Errors
    /// [`StoreError`] on a database failure.
    pub async fn dead_letter_job(&self, id: i64, reason: String) -> Result<(), StoreError> {
        let now = rfc3339(OffsetDateTime::now_utc());
        self.write(move |conn| {
            execute(
                conn,
                "INSERT INTO dead_jobs (id, body, reason, failed_at) SELECT id, body, ?2, ?3 FROM jobs WHERE id = ?1",
                params![id, reason, now],
            )
            .map_err(db_error)?;
            execute(conn, "DELETE FROM jobs WHERE id = ?1", [id]).map(drop).map_err(db_error)
        })
        .await
    }

    /// Jobs that were dead-lettered, with the reason.
    ///
    /// # Errors
    /// [`StoreError`] on a database failure.
    pub async fn dead_jobs(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached("SELECT body, reason FROM dead_jobs ORDER BY id").map_err(db_error)?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).map_err(db_error)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db_error)
        })
    }

    /// Puts a raw message on the embedded queue (tests use it to inject poison messages).
    ///
    /// # Errors
    /// [`StoreError`] on a database failure.
    pub async fn enqueue_raw(&self, body: String, visible_at: OffsetDateTime) -> Result<(), StoreError> {
        let (at, now) = (unix_ms(visible_at), rfc3339(OffsetDateTime::now_utc()));
        self.write(move |conn| {
            execute(conn, "INSERT INTO jobs (body, visible_at_ms, created_at) VALUES (?1, ?2, ?3)", params![body, at, now])
                .map(drop)
                .map_err(db_error)
        })
        .await
    }

    /// The emails the outbox mailer stored, oldest first.
    ///
    /// # Errors
    /// [`StoreError`] on a database failure.
    pub async fn outbox(&self) -> Result<Vec<OutboxEntry>, StoreError> {
        self.read(|conn| {
            let mut stmt =
                conn.prepare_cached("SELECT id, queued_at, doc, mime, message_id FROM outbox ORDER BY id").map_err(db_error)?;
            let rows = stmt.query_map([], read_outbox).map_err(db_error)?;
            rows.map(|row| row.map_err(db_error)?).collect()
        })
    }

    /// One email of the outbox.
    ///
    /// # Errors
    /// [`StoreError`] on a database failure.
    pub async fn outbox_entry(&self, id: i64) -> Result<Option<OutboxEntry>, StoreError> {
        self.read(|conn| {
            query_row(conn, "SELECT id, queued_at, doc, mime, message_id FROM outbox WHERE id = ?1", [id], read_outbox)
                .optional()
                .map_err(db_error)?
                .transpose()
        })
    }

    /// The bodies of the jobs of the embedded queue visible at `now`, oldest first.
    ///
    /// # Errors
    /// [`StoreError`] on a database failure.
    pub async fn queued_jobs_visible(&self, now: OffsetDateTime) -> Result<Vec<String>, StoreError> {
        let now = unix_ms(now);
        self.read(|conn| {
            let mut stmt = conn.prepare_cached("SELECT body FROM jobs WHERE visible_at_ms <= ?1 ORDER BY visible_at_ms, id").map_err(db_error)?;
            let bodies = stmt.query_map([now], |r| r.get::<_, String>(0)).map_err(db_error)?;
            bodies.collect::<Result<Vec<_>, _>>().map_err(db_error)
        })
    }

    /// Every campaign job waiting in the embedded queue, due or not.
    ///
    /// # Errors
    /// [`StoreError`] on a database failure.
    pub async fn queued_jobs(&self) -> Result<Vec<CampaignJob>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached("SELECT body FROM jobs ORDER BY id").map_err(db_error)?;
            let bodies = stmt.query_map([], |r| r.get::<_, String>(0)).map_err(db_error)?;
            bodies
                .map(|b| serde_json::from_str(&b.map_err(db_error)?).map_err(json_error))
                .collect()
        })
    }
}

/// How long a job taken from the embedded queue stays hidden while it is handled.
const EMBEDDED_LEASE: time::Duration = time::Duration::minutes(2);
// A job the embedded queue hands out again finds its claim past the claim lease.
const _: () = assert!(EMBEDDED_LEASE.whole_seconds() > crate::scheduler::CLAIM_LEASE.whole_seconds());
/// A job that failed on storage this many times is dead-lettered.
const EMBEDDED_MAX_DELIVERIES: u32 = 10;
/// Most jobs taken from the embedded queue in one pass.
pub const DRAIN_BATCH: u32 = 1024;
/// Jobs of a pass handled at once. Their claims, outbox writes and acks reach the store's
/// writer together, which commits them in groups (one fsync per group), so a pass costs a few
/// commits rather than three per job.
const DRAIN_CONCURRENCY: usize = 128;

/// One pass of the embedded scheduler over a queue it pulls from: handles the jobs that are
/// due at the scheduler's `now` (up to [`DRAIN_BATCH`]), many at once. Returns how many jobs
/// it took; a full batch means more may be due, and `cadenhq serve` then runs the next pass at
/// once. Tests call it with an injected clock.
///
/// # Errors
/// [`StoreError`] when the queue itself cannot be read or written.
pub async fn drain_due_jobs(scheduler: &crate::scheduler::Scheduler, queue: &dyn PullQueue) -> Result<usize, StoreError> {
    use futures::stream::{self, StreamExt};

    let now = scheduler.now();
    let jobs = queue.lease_due(now, now + EMBEDDED_LEASE, DRAIN_BATCH).await?;
    // Every job runs to its end (none is dropped mid-send when another fails); the first
    // queue failure is returned after.
    let taken = jobs.len();
    let results: Vec<Result<(), StoreError>> = stream::iter(jobs)
        .map(|job| async move { handle_leased(scheduler, queue, &job).await })
        .buffer_unordered(DRAIN_CONCURRENCY)
        .collect()
        .await;
    results.into_iter().collect::<Result<(), StoreError>>()?;
    Ok(taken)
}

/// Handles one leased job, then acks it, dead-letters it, or leaves it for its lease to end.
async fn handle_leased(scheduler: &crate::scheduler::Scheduler, queue: &dyn PullQueue, job: &LeasedJob) -> Result<(), StoreError> {
    use crate::scheduler::JobError;
    match scheduler.process_message(&job.body).await {
        Ok(_) => queue.ack(job.id).await,
        Err(e @ JobError::Malformed(_)) => {
            tracing::warn!(job_id = job.id, error = %e, "campaign job dead-lettered");
            queue.dead_letter(job.id, e.to_string()).await
        }
        Err(e) if job.deliveries >= EMBEDDED_MAX_DELIVERIES => {
            tracing::warn!(job_id = job.id, error = %e, "campaign job kept failing; dead-lettered");
            queue.dead_letter(job.id, e.to_string()).await
        }
        Err(e) => {
            tracing::warn!(job_id = job.id, error = %e, "campaign job failed; it will be retried");
            Ok(())
        }
    }
}

fn read_outbox(row: &rusqlite::Row<'_>) -> rusqlite::Result<Result<OutboxEntry, StoreError>> {
    let (id, queued_at, doc, mime, message_id): (i64, String, String, Option<String>, Option<String>) =
        (row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?);
    Ok(serde_json::from_str(&doc).map_err(json_error).map(|email| OutboxEntry {
        id,
        queued_at,
        message_id,
        headers: mime.as_deref().map(super::smtp::header_lines).unwrap_or_default(),
        email,
        raw: mime,
    }))
}

fn read_prospect(row: &rusqlite::Row<'_>) -> rusqlite::Result<ProspectRecord> {
    Ok(ProspectRecord {
        id: row.get(0)?,
        account_id: row.get(1)?,
        email_hash: row.get(2)?,
        external_id: row.get(3)?,
        status: row.get(4)?,
        ended_through: row.get(5)?,
        version: row.get(6)?,
        updated_at: row.get(7)?,
        doc: row.get(8)?,
    })
}

fn find_prospect(conn: &Connection, account: AccountId, by: &ProspectRef) -> Result<Option<Prospect>, StoreError> {
    match by {
        ProspectRef::Id(id) => find_prospect_where(conn, select_prospect_by!("id"), account, &id.to_string()),
        ProspectRef::ExternalId(ext) => find_prospect_where(conn, select_prospect_by!("external_id"), account, ext.as_str()),
        ProspectRef::Email(email) => find_prospect_where(conn, select_prospect_by!("email_hash"), account, email.key_hash()),
        ProspectRef::EmailHash(hash) => find_prospect_where(conn, select_prospect_by!("email_hash"), account, hash),
    }
}

/// The account's prospect that `sql` (a `select_prospect_by!`) finds by `value`.
fn find_prospect_where(conn: &Connection, sql: &str, account: AccountId, value: &str) -> Result<Option<Prospect>, StoreError> {
    query_row(conn, sql, params![account.to_string(), value], read_prospect)
        .optional()
        .map_err(db_error)?
        .map(ProspectRecord::into_prospect)
        .transpose()
}

/// Maps a unique-constraint failure to the conflict it means.
fn write_error(e: rusqlite::Error) -> StoreError {
    if let rusqlite::Error::SqliteFailure(err, Some(msg)) = &e {
        if err.code == rusqlite::ErrorCode::ConstraintViolation {
            if msg.contains("external_id") {
                return StoreError::Conflict(Conflict::ExternalId);
            }
            if msg.contains("email_hash") || msg.contains("prospects.id") {
                return StoreError::Conflict(Conflict::Email);
            }
        }
    }
    db_error(e)
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

#[async_trait]
impl ProspectRepository for SqliteStore {
    async fn upsert_context(
        &self,
        account: AccountId,
        email: &NormalizedEmail,
        campaign: Option<CampaignId>,
    ) -> Result<UpsertContext, StoreError> {
        // Each lookup reads the latest commit; they need no common snapshot: the account's
        // default and the requested campaign do not depend on the prospect.
        self.read(|conn| {
            let prospect = find_prospect_where(conn, select_prospect_by!("email_hash"), account, email.key_hash())?;
            // Only a new prospect is enrolled in the default campaign.
            let account: Option<Account> = match prospect {
                Some(_) => None,
                None => get_doc(conn, "SELECT doc FROM accounts WHERE id = ?1", account.to_string())?,
            };
            let requested_campaign = match campaign {
                Some(id) => get_doc(conn, "SELECT doc FROM campaigns WHERE id = ?1", id.to_string())?,
                None => None,
            };
            Ok(UpsertContext { prospect, default_campaign_id: account.and_then(|a| a.default_campaign_id), requested_campaign })
        })
    }

    async fn insert(&self, prospect: Prospect) -> Result<(), StoreError> {
        let r = ProspectRecord::from_prospect(&prospect, 1);
        self.write(move |conn| {
            execute(
                conn,
                concat!("INSERT INTO prospects (", prospect_columns!(), ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"),
                params![r.id, r.account_id, r.email_hash, r.external_id, r.status, r.ended_through, r.version, r.updated_at, r.doc],
            )
            .map_err(write_error)?;
            Ok(())
        })
        .await
    }

    async fn update(&self, previous: Replacing, updated: Prospect) -> Result<(), StoreError> {
        let r = ProspectRecord::from_prospect(&updated, previous.version + 1);
        let expected = i64::try_from(previous.version).unwrap_or(i64::MAX);
        self.write(move |conn| {
            let n = execute(
                conn,
                "UPDATE prospects SET external_id = ?2, status = ?3, ended_through = ?4, version = ?5,
                 updated_at = ?6, doc = ?7 WHERE id = ?1 AND version = ?8",
                params![r.id, r.external_id, r.status, r.ended_through, r.version, r.updated_at, r.doc, expected],
            )
            .map_err(write_error)?;
            if n == 0 {
                return Err(StoreError::Conflict(Conflict::Version));
            }
            Ok(())
        })
        .await
    }

    async fn set_status(
        &self,
        account: AccountId,
        prospect: &ProspectRef,
        status: ProspectStatus,
        now: OffsetDateTime,
    ) -> Result<Option<Prospect>, StoreError> {
        let by = prospect.clone();
        // Read and update on the write connection, in the group's transaction: nothing can
        // change the prospect in between.
        self.write(move |conn| {
            let Some(mut p) = find_prospect(conn, account, &by)? else { return Ok(None) };
            p.set_status(status, now);
            p.version += 1;
            execute(
                conn,
                "UPDATE prospects SET status = ?2, ended_through = ?3, version = version + 1, updated_at = ?4 WHERE id = ?1",
                params![p.id.to_string(), p.status.as_str(), p.ended_through, rfc3339(now)],
            )
            .map_err(db_error)?;
            Ok(Some(p))
        })
        .await
    }

    async fn find(&self, account: AccountId, prospect: &ProspectRef) -> Result<Option<Prospect>, StoreError> {
        self.read(|conn| find_prospect(conn, account, prospect))
    }
}

#[async_trait]
impl JobQueue for SqliteStore {
    async fn publish(&self, job: &CampaignJob, visible_at: OffsetDateTime) -> Result<(), StoreError> {
        self.enqueue_raw(job.to_json(), visible_at).await
    }
}

#[async_trait]
impl PullQueue for SqliteStore {
    async fn lease_due(&self, now: OffsetDateTime, lease_until: OffsetDateTime, limit: u32) -> Result<Vec<LeasedJob>, StoreError> {
        self.lease_due_jobs(now, lease_until, limit).await
    }

    async fn ack(&self, id: i64) -> Result<(), StoreError> {
        self.ack_job(id).await
    }

    async fn dead_letter(&self, id: i64, reason: String) -> Result<(), StoreError> {
        self.dead_letter_job(id, reason).await
    }
}

/// The columns of `sends`, in the order [`read_send`] reads them.
const SEND_COLUMNS: &str = "enrollment_id, step, state, owner, detail, attempts, retry_at, claimed_at, updated_at";

fn read_send(row: &rusqlite::Row<'_>) -> rusqlite::Result<Result<SendRecord, StoreError>> {
    let (enrollment, step): (String, u32) = (row.get(0)?, row.get(1)?);
    let (state, owner, detail): (String, Option<String>, Option<String>) = (row.get(2)?, row.get(3)?, row.get(4)?);
    let (attempts, retry_at, claimed_at, updated_at): (u32, Option<String>, String, Option<String>) =
        (row.get(5)?, row.get(6)?, row.get(7)?, row.get(8)?);
    Ok((|| {
        let corrupt = |what: &str| StoreError::other(format!("stored send record has an invalid {what}"));
        let retry_at = retry_at.as_deref().map(super::record::parse_rfc3339).transpose()?;
        let claimed_at = super::record::parse_rfc3339(&claimed_at)?;
        let state = SendState::from_parts(&state, owner.as_deref(), detail, attempts, retry_at).map_err(StoreError::other)?;
        Ok(SendRecord {
            key: SendKey { enrollment: crate::domain::EnrollmentId::parse(&enrollment).map_err(|_| corrupt("enrollment id"))?, step },
            state,
            // A record of an earlier version has no owner; no claim can match the nil one.
            owner: owner.as_deref().map(ClaimOwner::parse).transpose().map_err(|_| corrupt("owner"))?.unwrap_or(ClaimOwner::NIL),
            claimed_at,
            updated_at: updated_at.as_deref().map(super::record::parse_rfc3339).transpose()?.unwrap_or(claimed_at),
            attempts,
        })
    })())
}

fn find_send(conn: &Connection, key: SendKey) -> Result<Option<SendRecord>, StoreError> {
    let sql = format!("SELECT {SEND_COLUMNS} FROM sends WHERE enrollment_id = ?1 AND step = ?2");
    query_row(conn, &sql, params![key.enrollment.to_string(), key.step], read_send).optional().map_err(db_error)?.transpose()
}

/// The stored parts of a state: (name, detail, retry time).
fn state_parts(state: &SendState) -> (&'static str, Option<String>, Option<String>) {
    let retry_at = match state {
        SendState::RetryScheduled { retry_at, .. } => Some(rfc3339(*retry_at)),
        _ => None,
    };
    (state.name(), state.detail().map(str::to_owned), retry_at)
}

/// Moves the record claimed by `owner` to `state`, on `conn`; `false` if it is not that claim.
fn record_send_on(conn: &Connection, key: SendKey, owner: ClaimOwner, state: &SendState, now: OffsetDateTime) -> Result<bool, StoreError> {
    let (name, detail, retry_at) = state_parts(state);
    let attempts_after = match state {
        // A retry's attempt number is how many attempts were made before it.
        SendState::RetryScheduled { attempt, .. } => Some(*attempt),
        _ => None,
    };
    let changed = execute(
        conn,
        "UPDATE sends SET state = ?4, detail = ?5, retry_at = ?6, updated_at = ?7, attempts = COALESCE(?8, attempts)
         WHERE enrollment_id = ?1 AND step = ?2 AND state = 'claimed' AND owner = ?3",
        params![key.enrollment.to_string(), key.step, owner.to_string(), name, detail, retry_at, rfc3339(now), attempts_after],
    )
    .map_err(db_error)?;
    Ok(changed == 1)
}

#[async_trait]
impl SendLog for SqliteStore {
    async fn claim_send(&self, claim: &ClaimRequest) -> Result<ClaimResult, StoreError> {
        let claim = claim.clone();
        // Checked and written on the write connection, in one transaction: no status change,
        // pause or other claim can come in between.
        self.write(move |conn| {
            let active: Option<bool> = query_row(
                conn,
                "SELECT status = 'new' AND ended_through < ?4 FROM prospects WHERE account_id = ?1 AND email_hash = ?2 AND id = ?3",
                params![claim.account.to_string(), claim.email_hash, claim.prospect.to_string(), claim.enrollment_seq],
                |r| r.get(0),
            )
            .optional()
            .map_err(db_error)?;
            if active != Some(true) {
                return Ok(ClaimResult::ProspectChanged);
            }
            let version: Option<i64> =
                query_row(conn, "SELECT sending_version FROM campaigns WHERE id = ?1", [claim.campaign.to_string()], |r| r.get(0))
                    .optional()
                    .map_err(db_error)?;
            if version.and_then(|v| u64::try_from(v).ok()) != Some(claim.campaign_version) {
                return Ok(ClaimResult::CampaignChanged);
            }
            let existing = find_send(conn, claim.key)?;
            let may_take = match &existing {
                None => true,
                Some(record) => match &record.state {
                    SendState::Claimed { owner } => *owner == claim.owner || Some(*owner) == claim.retry_of,
                    SendState::RetryScheduled { attempt, .. } => *attempt == claim.attempt,
                    _ => false,
                },
            };
            if let (false, Some(record)) = (may_take, existing) {
                return Ok(ClaimResult::Taken(record));
            }
            let now = rfc3339(claim.now);
            execute(
                conn,
                "INSERT INTO sends (enrollment_id, step, state, owner, detail, attempts, retry_at, claimed_at, updated_at)
                 VALUES (?1, ?2, 'claimed', ?3, NULL, ?4, NULL, ?5, ?5)
                 ON CONFLICT (enrollment_id, step) DO UPDATE SET state = 'claimed', owner = ?3, detail = NULL,
                     attempts = ?4, retry_at = NULL, claimed_at = ?5, updated_at = ?5",
                params![claim.key.enrollment.to_string(), claim.key.step, claim.owner.to_string(), claim.attempt + 1, now],
            )
            .map_err(db_error)?;
            Ok(ClaimResult::Won)
        })
        .await
    }

    async fn record_send(&self, key: SendKey, owner: ClaimOwner, state: &SendState, now: OffsetDateTime) -> Result<bool, StoreError> {
        let state = state.clone();
        self.write(move |conn| record_send_on(conn, key, owner, &state, now)).await
    }

    async fn send_record(&self, key: SendKey) -> Result<Option<SendRecord>, StoreError> {
        self.read(|conn| find_send(conn, key))
    }
}

/// The outbox mailer: stores each email in the embedded store instead of sending it
/// (`cadenhq outbox list` shows them), as the exact MIME message the SMTP and SES mailers
/// would send. The message and its send record (`sent`) are written in one transaction: a
/// step is in the outbox exactly once, across crashes too. The default for `cadenhq serve`.
#[async_trait]
impl Mailer for SqliteStore {
    async fn send(&self, email: &OutgoingEmail, claim: &SendClaim) -> Result<Delivered, MailError> {
        let message = super::smtp::build_message(email)?;
        let message_id = super::smtp::message_id(&message);
        let mime = String::from_utf8_lossy(&message.formatted()).into_owned();
        let doc = serde_json::to_string(email).map_err(|e| MailError::NotAccepted(Box::new(e)))?;
        let now = rfc3339(OffsetDateTime::now_utc());
        let claim = *claim;
        let sent = SendState::Sent { message_id: message_id.clone() };
        let id = message_id.clone();
        self.write(move |conn| {
            execute(
                conn,
                "INSERT INTO outbox (queued_at, doc, mime, message_id) VALUES (?1, ?2, ?3, ?4)",
                params![now, doc, mime, id],
            )
            .map_err(db_error)?;
            if !record_send_on(conn, claim.key, claim.owner, &sent, claim.now)? {
                // Rolls the email back with it: the claim is no longer this worker's.
                return Err(StoreError::other("the send's claim is no longer held"));
            }
            Ok(())
        })
        .await
        .map_err(|e| MailError::NotAccepted(Box::new(e)))?;
        Ok(Delivered { message_id, recorded: true })
    }
}

#[async_trait]
impl KeyStore for SqliteStore {
    async fn find_key(&self, hash: &KeyHash) -> Result<Option<ApiKeyRecord>, StoreError> {
        self.read(|conn| {
            // The version first: a key changed after it is read gets a newer version, so a record
            // is never cached under a version newer than itself.
            let version: i64 = query_row(conn, "SELECT keys_version FROM meta WHERE id = 1", [], |r| r.get(0)).map_err(db_error)?;
            let cached = |keys: &HashMap<String, (i64, ApiKeyRecord)>| keys.get(hash.as_str()).filter(|(v, _)| *v == version).map(|(_, r)| r.clone());
            if let Some(record) = cached(&self.inner.keys.lock().unwrap_or_else(PoisonError::into_inner)) {
                return Ok(Some(record));
            }
            let record: Option<ApiKeyRecord> = get_doc(conn, "SELECT doc FROM api_keys WHERE hash = ?1", hash.as_str().to_owned())?;
            if let Some(r) = &record {
                let mut keys = self.inner.keys.lock().unwrap_or_else(PoisonError::into_inner);
                if keys.len() >= KEY_CACHE_MAX {
                    keys.clear();
                }
                keys.insert(hash.as_str().to_owned(), (version, r.clone()));
            }
            Ok(record)
        })
    }

    async fn touch_key(&self, hash: &KeyHash, now: OffsetDateTime) -> Result<(), StoreError> {
        let (hash, at) = (hash.as_str().to_owned(), rfc3339(now));
        self.write(move |conn| {
            execute(conn, "UPDATE api_keys SET doc = json_set(doc, '$.last_used_at', ?2) WHERE hash = ?1", params![hash, at])
                .map(drop)
                .map_err(db_error)
        })
        .await
    }
}

#[async_trait]
impl IdempotencyStore for SqliteStore {
    async fn begin(
        &self,
        account: AccountId,
        key: &IdempotencyKey,
        fingerprint: &str,
        now: OffsetDateTime,
    ) -> Result<IdempotencyBegin, StoreError> {
        let (account, key, fingerprint) = (account.to_string(), key.hash().to_owned(), fingerprint.to_owned());
        let (now_ms, lease, expires) = (unix_ms(now), unix_ms(now + IN_FLIGHT_LEASE), unix_ms(now + IDEMPOTENCY_TTL));
        self.write(move |conn| {
            let existing: Option<(String, Option<u16>, Option<String>, i64, i64)> = query_row(
                conn,
                "SELECT fingerprint, status, body, lease_until_ms, expires_at_ms FROM idempotency WHERE account_id = ?1 AND key_hash = ?2",
                params![account, key],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .optional()
            .map_err(db_error)?;
            let outcome = match existing {
                Some((_, _, _, _, expires_at)) if expires_at <= now_ms => None,
                Some((_, None, _, lease_until, _)) if lease_until <= now_ms => None,
                Some((stored, _, _, _, _)) if stored != fingerprint => Some(IdempotencyBegin::Mismatch),
                Some((_, None, _, _, _)) => Some(IdempotencyBegin::InFlight),
                Some((_, Some(status), body, _, _)) => {
                    Some(IdempotencyBegin::Replay(StoredResponse { status, body: body.unwrap_or_default() }))
                }
                None => None,
            };
            if let Some(outcome) = outcome {
                return Ok(outcome);
            }
            execute(
                conn,
                "INSERT OR REPLACE INTO idempotency (account_id, key_hash, fingerprint, status, body, lease_until_ms, expires_at_ms)
                 VALUES (?1, ?2, ?3, NULL, NULL, ?4, ?5)",
                params![account, key, fingerprint, lease, expires],
            )
            .map_err(db_error)?;
            Ok(IdempotencyBegin::Started)
        })
        .await
    }

    async fn finish(&self, account: AccountId, key: &IdempotencyKey, response: &StoredResponse, now: OffsetDateTime) -> Result<(), StoreError> {
        let (account, key, status, body) = (account.to_string(), key.hash().to_owned(), response.status, response.body.clone());
        let expires = unix_ms(now + IDEMPOTENCY_TTL);
        self.write(move |conn| {
            execute(
                conn,
                "UPDATE idempotency SET status = ?3, body = ?4, expires_at_ms = ?5 WHERE account_id = ?1 AND key_hash = ?2",
                params![account, key, status, body, expires],
            )
            .map(drop)
            .map_err(db_error)
        })
        .await
    }

    async fn abandon(&self, account: AccountId, key: &IdempotencyKey) -> Result<(), StoreError> {
        let (account, key) = (account.to_string(), key.hash().to_owned());
        self.write(move |conn| {
            execute(conn, "DELETE FROM idempotency WHERE account_id = ?1 AND key_hash = ?2", params![account, key])
                .map(drop)
                .map_err(db_error)
        })
        .await
    }
}

#[async_trait]
impl AdminStore for SqliteStore {
    async fn create_account(&self, account: &Account) -> Result<(), StoreError> {
        let (id, doc) = (account.id.to_string(), serde_json::to_string(account).map_err(json_error)?);
        self.write(move |conn| {
            execute(conn, "INSERT INTO accounts (id, doc) VALUES (?1, ?2)", params![id, doc]).map_err(db_error)?;
            Ok(())
        })
        .await
    }

    async fn get_account(&self, id: AccountId) -> Result<Option<Account>, StoreError> {
        self.read(|conn| get_doc(conn, "SELECT doc FROM accounts WHERE id = ?1", id.to_string()))
    }

    async fn is_empty(&self) -> Result<bool, StoreError> {
        self.read(|conn| {
            let n: i64 = query_row(conn, "SELECT COUNT(*) FROM accounts", [], |r| r.get(0)).map_err(db_error)?;
            Ok(n == 0)
        })
    }

    async fn create_key(&self, key: &ApiKeyRecord) -> Result<(), StoreError> {
        let doc = serde_json::to_string(key).map_err(json_error)?;
        let (id, hash, account) = (key.key_id.to_string(), key.hash.as_str().to_owned(), key.account_id.to_string());
        self.write(move |conn| {
            execute(
                conn,
                "INSERT INTO api_keys (key_id, hash, account_id, doc) VALUES (?1, ?2, ?3, ?4)",
                params![id, hash, account, doc],
            )
            .map_err(db_error)?;
            Ok(())
        })
        .await
    }

    async fn revoke_key(&self, id: KeyId, now: OffsetDateTime) -> Result<bool, StoreError> {
        self.write(move |conn| {
            let Some(mut key) = get_doc::<ApiKeyRecord>(conn, "SELECT doc FROM api_keys WHERE key_id = ?1", id.to_string())? else {
                return Ok(false);
            };
            key.revoked_at.get_or_insert(now);
            let doc = serde_json::to_string(&key).map_err(json_error)?;
            execute(conn, "UPDATE api_keys SET doc = ?2 WHERE key_id = ?1", params![id.to_string(), doc]).map_err(db_error)?;
            Ok(true)
        })
        .await
    }

    async fn list_keys(&self, account: AccountId) -> Result<Vec<ApiKeyRecord>, StoreError> {
        self.read(|conn| list_docs(conn, "SELECT doc FROM api_keys WHERE account_id = ?1 ORDER BY rowid", account.to_string()))
    }

    async fn set_rate_limit(&self, id: KeyId, limit: Option<RateLimit>) -> Result<bool, StoreError> {
        self.write(move |conn| {
            let Some(mut key) = get_doc::<ApiKeyRecord>(conn, "SELECT doc FROM api_keys WHERE key_id = ?1", id.to_string())? else {
                return Ok(false);
            };
            key.rate_limit = limit;
            let doc = serde_json::to_string(&key).map_err(json_error)?;
            execute(conn, "UPDATE api_keys SET doc = ?2 WHERE key_id = ?1", params![id.to_string(), doc]).map_err(db_error)?;
            Ok(true)
        })
        .await
    }

    async fn create_campaign(&self, campaign: &Campaign, make_default: bool) -> Result<(), StoreError> {
        let doc = serde_json::to_string(campaign).map_err(json_error)?;
        let (id, account, version) = (campaign.id, campaign.account_id, to_i64(campaign.sending_version));
        self.write(move |conn| {
            execute(
                conn,
                "INSERT INTO campaigns (id, account_id, doc, sending_version) VALUES (?1, ?2, ?3, ?4)",
                params![id.to_string(), account.to_string(), doc, version],
            )
            .map_err(db_error)?;
            if make_default {
                let mut acc: Account = get_doc(conn, "SELECT doc FROM accounts WHERE id = ?1", account.to_string())?
                    .ok_or_else(|| StoreError::other("campaign's account does not exist"))?;
                acc.default_campaign_id = Some(id);
                let doc = serde_json::to_string(&acc).map_err(json_error)?;
                execute(conn, "UPDATE accounts SET doc = ?2 WHERE id = ?1", params![account.to_string(), doc]).map_err(db_error)?;
            }
            Ok(())
        })
        .await
    }

    async fn list_campaigns(&self, account: AccountId) -> Result<Vec<Campaign>, StoreError> {
        self.read(|conn| list_docs(conn, "SELECT doc FROM campaigns WHERE account_id = ?1 ORDER BY rowid", account.to_string()))
    }

    async fn replace_campaign(&self, campaign: &Campaign, expected_version: u64) -> Result<bool, StoreError> {
        let doc = serde_json::to_string(campaign).map_err(json_error)?;
        let (id, account, active) = (campaign.id, campaign.account_id, campaign.active);
        let (expected, version) = (to_i64(expected_version), to_i64(campaign.sending_version));
        self.write(move |conn| {
            let changed = execute(
                conn,
                "UPDATE campaigns SET doc = ?2, sending_version = ?4 WHERE id = ?1 AND sending_version = ?3",
                params![id.to_string(), doc, expected, version],
            )
            .map_err(db_error)?;
            if changed == 0 {
                return Ok(false);
            }
            if !active {
                if let Some(mut acc) = get_doc::<Account>(conn, "SELECT doc FROM accounts WHERE id = ?1", account.to_string())? {
                    if acc.default_campaign_id == Some(id) {
                        acc.default_campaign_id = None;
                        let doc = serde_json::to_string(&acc).map_err(json_error)?;
                        execute(conn, "UPDATE accounts SET doc = ?2 WHERE id = ?1", params![acc.id.to_string(), doc]).map_err(db_error)?;
                    }
                }
            }
            Ok(true)
        })
        .await
    }

    async fn get_campaign(&self, id: CampaignId) -> Result<Option<Campaign>, StoreError> {
        self.read(|conn| get_doc(conn, "SELECT doc FROM campaigns WHERE id = ?1", id.to_string()))
    }

    async fn list_accounts(&self) -> Result<Vec<Account>, StoreError> {
        let mut accounts: Vec<Account> = self.read(|conn| {
            let mut stmt = conn.prepare_cached("SELECT doc FROM accounts ORDER BY rowid").map_err(db_error)?;
            let docs = stmt.query_map([], |r| r.get::<_, String>(0)).map_err(db_error)?;
            docs.map(|d| serde_json::from_str(&d.map_err(db_error)?).map_err(json_error)).collect()
        })?;
        accounts.sort_by_key(|a| a.created_at);
        Ok(accounts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Answer<T> = oneshot::Receiver<Result<T, StoreError>>;

    fn request<T, F>(f: F) -> (Box<dyn PendingWrite>, Answer<T>)
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        (Box::new(Request { write: Some(f), result: None, reply }), answer)
    }

    /// A connection with a deferred foreign key: a violation of it fails the `COMMIT`.
    fn connection() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "PRAGMA foreign_keys = ON;
             CREATE TABLE parents (id INTEGER PRIMARY KEY);
             CREATE TABLE children (id INTEGER PRIMARY KEY, parent INTEGER REFERENCES parents(id) DEFERRABLE INITIALLY DEFERRED);",
        )
        .unwrap();
        conn
    }

    fn insert_parent(conn: &Connection, id: i64) -> Result<(), StoreError> {
        execute(conn, "INSERT INTO parents (id) VALUES (?1)", [id]).map(drop).map_err(db_error)
    }

    fn parents(conn: &Connection) -> Vec<i64> {
        let mut stmt = conn.prepare("SELECT id FROM parents ORDER BY id").unwrap();
        let ids = stmt.query_map([], |r| r.get(0)).unwrap().collect::<Result<_, _>>().unwrap();
        ids
    }

    #[test]
    fn a_failing_write_is_rolled_back_alone_and_the_rest_of_its_group_commits() {
        let conn = connection();
        let (first, first_answer) = request(|conn| insert_parent(conn, 1));
        // Inserts 2, then fails on 1: its insert of 2 goes too.
        let (conflicting, conflicting_answer) = request(|conn| {
            insert_parent(conn, 2)?;
            insert_parent(conn, 1)
        });
        let (panicking, panicking_answer) = request(|conn| -> Result<(), StoreError> {
            insert_parent(conn, 3)?;
            panic!("a bug in a write")
        });
        let (last, last_answer) = request(|conn| insert_parent(conn, 4).map(|()| "done"));

        commit_group(&conn, vec![first, conflicting, panicking, last]);

        assert!(first_answer.blocking_recv().unwrap().is_ok());
        assert!(matches!(conflicting_answer.blocking_recv().unwrap(), Err(StoreError::Other(_))));
        assert!(panicking_answer.blocking_recv().unwrap().is_err());
        assert_eq!(last_answer.blocking_recv().unwrap().unwrap(), "done");
        assert_eq!(parents(&conn), [1, 4]);
        assert!(conn.is_autocommit(), "the group's transaction is over");
    }

    #[test]
    fn a_failed_commit_fails_every_write_of_its_group_and_the_next_group_commits() {
        let conn = connection();
        let (parent, parent_answer) = request(|conn| insert_parent(conn, 1));
        let (orphan, orphan_answer) = request(|conn| {
            execute(conn, "INSERT INTO children (id, parent) VALUES (1, 99)", []).map(drop).map_err(db_error)
        });

        commit_group(&conn, vec![parent, orphan]);

        assert!(parent_answer.blocking_recv().unwrap().is_err(), "its commit failed: it must not be acknowledged");
        assert!(orphan_answer.blocking_recv().unwrap().is_err());
        assert_eq!(parents(&conn), Vec::<i64>::new());
        assert!(conn.is_autocommit());

        let (again, again_answer) = request(|conn| insert_parent(conn, 1));
        commit_group(&conn, vec![again]);
        assert!(again_answer.blocking_recv().unwrap().is_ok());
        assert_eq!(parents(&conn), [1]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_are_acknowledged_once_durable_and_visible_to_every_later_read() {
        let dir = std::env::temp_dir().join(format!("cadenhq-sqlite-{}", uuid::Uuid::new_v4()));
        let store = SqliteStore::open(&dir).unwrap();
        let writers: Vec<_> = (0..64)
            .map(|n| {
                let store = store.clone();
                tokio::spawn(async move {
                    let account =
                        Account { id: AccountId::new(), name: format!("account {n}"), default_campaign_id: None, created_at: OffsetDateTime::now_utc() };
                    store.create_account(&account).await.unwrap();
                    let read = store.get_account(account.id).await.unwrap();
                    assert_eq!(read.map(|a| a.name), Some(account.name.clone()), "an acknowledged write is visible");
                    assert!(store.create_account(&account).await.is_err(), "the same account twice fails alone");
                    account.id
                })
            })
            .collect();
        let mut ids = Vec::new();
        for writer in writers {
            ids.push(writer.await.unwrap());
        }
        drop(store);

        let reopened = SqliteStore::open(&dir).unwrap();
        for id in ids {
            assert!(reopened.get_account(id).await.unwrap().is_some());
        }
        drop(reopened);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_of_another_connection_is_visible_to_the_next_read() {
        let dir = std::env::temp_dir().join(format!("cadenhq-sqlite-{}", uuid::Uuid::new_v4()));
        let store = SqliteStore::open(&dir).unwrap();
        let account = Account { id: AccountId::new(), name: "before".into(), default_campaign_id: None, created_at: OffsetDateTime::now_utc() };
        store.create_account(&account).await.unwrap();
        assert_eq!(store.get_account(account.id).await.unwrap().unwrap().name, "before");
        // As the CLI would, from another process: the store's writer is idle, its pin held.
        let other = Connection::open(dir.join(DB_FILE)).unwrap();
        let renamed = serde_json::to_string(&Account { name: "after".into(), ..account.clone() }).unwrap();
        other.execute("UPDATE accounts SET doc = ?2 WHERE id = ?1", params![account.id.to_string(), renamed]).unwrap();

        assert_eq!(store.get_account(account.id).await.unwrap().unwrap().name, "after");
        drop((other, store));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cached_key_revoked_by_another_process_is_refused_at_once() {
        let dir = std::env::temp_dir().join(format!("cadenhq-sqlite-{}", uuid::Uuid::new_v4()));
        let store = SqliteStore::open(&dir).unwrap();
        let clock = crate::domain::SystemClock;
        let account = crate::admin::create_account(&store, "Keys", &clock).await.unwrap();
        let (record, key) = crate::admin::create_key(&store, account.id, None, &clock).await.unwrap();
        let hash = key.hash();
        assert!(store.find_key(&hash).await.unwrap().unwrap().is_active());
        assert!(store.find_key(&hash).await.unwrap().unwrap().is_active(), "served from the cache");

        // The CLI, from another process, with a store of its own.
        let cli = SqliteStore::open(&dir).unwrap();
        assert!(cli.revoke_key(record.key_id, OffsetDateTime::now_utc()).await.unwrap());

        assert!(!store.find_key(&hash).await.unwrap().unwrap().is_active(), "the revocation applies at once");
        drop((cli, store));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
