//! The embedded store: one SQLite file holding accounts, keys, campaigns, prospects and the
//! campaign job queue. WAL journal with `synchronous = FULL`: a write is on disk before it is
//! acknowledged, so a crash or power loss never loses an answered request.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};
use time::OffsetDateTime;

use super::record::{rfc3339, ProspectRecord};
use crate::domain::{
    Account, AccountId, ApiKeyRecord, Campaign, CampaignId, CampaignJob, KeyHash, KeyId,
    NormalizedEmail, Prospect, ProspectStatus,
};
use crate::domain::{
    EnrollmentId, IdempotencyBegin, IdempotencyKey, RateLimit, StoredResponse, IDEMPOTENCY_TTL, IN_FLIGHT_LEASE,
};
use crate::ports::{
    AdminStore, Claim, Conflict, IdempotencyStore, JobQueue, KeyStore, MailError, Mailer, OutgoingEmail,
    ProspectRef, ProspectRepository, SendLog, StoreError, UpsertContext,
};

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "cadenhq.db";

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
";

/// A job taken from the embedded queue, invisible to others until its lease ends.
#[derive(Debug, Clone)]
pub struct LeasedJob {
    pub id: i64,
    pub body: String,
    /// How many times it has been handed out, this time included.
    pub deliveries: u32,
}

/// An email the outbox mailer stored instead of sending.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OutboxEntry {
    pub id: i64,
    pub queued_at: String,
    #[serde(flatten)]
    pub email: OutgoingEmail,
}

fn unix_ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

const PROSPECT_COLUMNS: &str =
    "id, account_id, email_hash, external_id, status, ended_through, version, updated_at, doc";

/// The embedded store. Cheap to clone; all clones share one connection.
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
}

fn db_error(e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => StoreError::Unavailable(Box::new(e)),
        _ => StoreError::Other(Box::new(e)),
    }
}

fn json_error(e: serde_json::Error) -> StoreError {
    StoreError::Other(Box::new(e))
}

impl SqliteStore {
    /// Opens (creating if needed) the store in `data_dir`.
    ///
    /// # Errors
    /// [`StoreError::Other`] when the directory or database cannot be created or opened.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(StoreError::other)?;
        let conn = Connection::open(data_dir.join(DB_FILE)).map_err(db_error)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(db_error)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(db_error)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(db_error)?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(db_error)?;
        conn.execute_batch(SCHEMA).map_err(db_error)?;
        Ok(Self { conn: Arc::new(Mutex::new(conn)) })
    }

    /// Runs `f` on the connection on the blocking pool.
    async fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().map_err(|_| StoreError::other("sqlite connection poisoned"))?;
            f(&mut guard)
        })
        .await
        .map_err(StoreError::other)?
    }

    /// Takes up to `limit` jobs visible at `now` and hides them until `lease_until`, so a job
    /// whose worker dies is handed out again then.
    ///
    /// # Errors
    /// [`StoreError`] on a database failure.
    pub async fn lease_due_jobs(&self, now: OffsetDateTime, lease_until: OffsetDateTime, limit: u32) -> Result<Vec<LeasedJob>, StoreError> {
        let (now, until) = (unix_ms(now), unix_ms(lease_until));
        self.call(move |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(db_error)?;
            let jobs = {
                let mut stmt = tx
                    .prepare("SELECT id, body, deliveries + 1 FROM jobs WHERE visible_at_ms <= ?1 ORDER BY visible_at_ms, id LIMIT ?2")
                    .map_err(db_error)?;
                let rows = stmt
                    .query_map(params![now, limit], |r| Ok(LeasedJob { id: r.get(0)?, body: r.get(1)?, deliveries: r.get(2)? }))
                    .map_err(db_error)?;
                rows.collect::<Result<Vec<_>, _>>().map_err(db_error)?
            };
            for job in &jobs {
                tx.execute("UPDATE jobs SET visible_at_ms = ?2, deliveries = deliveries + 1 WHERE id = ?1", params![job.id, until])
                    .map_err(db_error)?;
            }
            tx.commit().map_err(db_error)?;
            Ok(jobs)
        })
        .await
    }

    /// Removes a job that was handled.
    ///
    /// # Errors
    /// [`StoreError`] on a database failure.
    pub async fn ack_job(&self, id: i64) -> Result<(), StoreError> {
        self.call(move |conn| conn.execute("DELETE FROM jobs WHERE id = ?1", [id]).map(drop).map_err(db_error)).await
    }

    /// Moves a job that cannot be handled to the dead-letter table.
    ///
    /// # Errors
    /// [`StoreError`] on a database failure.
    pub async fn dead_letter_job(&self, id: i64, reason: String) -> Result<(), StoreError> {
        let now = rfc3339(OffsetDateTime::now_utc());
        self.call(move |conn| {
            let tx = conn.transaction().map_err(db_error)?;
            tx.execute(
                "INSERT INTO dead_jobs (id, body, reason, failed_at) SELECT id, body, ?2, ?3 FROM jobs WHERE id = ?1",
                params![id, reason, now],
            )
            .map_err(db_error)?;
            tx.execute("DELETE FROM jobs WHERE id = ?1", [id]).map_err(db_error)?;
            tx.commit().map_err(db_error)
        })
        .await
    }

    /// Jobs that were dead-lettered, with the reason.
    ///
    /// # Errors
    /// [`StoreError`] on a database failure.
    pub async fn dead_jobs(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.call(|conn| {
            let mut stmt = conn.prepare("SELECT body, reason FROM dead_jobs ORDER BY id").map_err(db_error)?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).map_err(db_error)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db_error)
        })
        .await
    }

    /// Puts a raw message on the embedded queue (tests use it to inject poison messages).
    ///
    /// # Errors
    /// [`StoreError`] on a database failure.
    pub async fn enqueue_raw(&self, body: String, visible_at: OffsetDateTime) -> Result<(), StoreError> {
        let (at, now) = (unix_ms(visible_at), rfc3339(OffsetDateTime::now_utc()));
        self.call(move |conn| {
            conn.execute("INSERT INTO jobs (body, visible_at_ms, created_at) VALUES (?1, ?2, ?3)", params![body, at, now])
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
        self.call(|conn| {
            let mut stmt = conn.prepare("SELECT id, queued_at, doc FROM outbox ORDER BY id").map_err(db_error)?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, String>(2)?))).map_err(db_error)?;
            rows.map(|row| {
                let (id, queued_at, doc) = row.map_err(db_error)?;
                Ok(OutboxEntry { id, queued_at, email: serde_json::from_str(&doc).map_err(json_error)? })
            })
            .collect()
        })
        .await
    }

    /// Every campaign job waiting in the embedded queue, due or not.
    ///
    /// # Errors
    /// [`StoreError`] on a database failure.
    pub async fn queued_jobs(&self) -> Result<Vec<CampaignJob>, StoreError> {
        self.call(|conn| {
            let mut stmt = conn.prepare("SELECT body FROM jobs ORDER BY id").map_err(db_error)?;
            let bodies = stmt.query_map([], |r| r.get::<_, String>(0)).map_err(db_error)?;
            bodies
                .map(|b| serde_json::from_str(&b.map_err(db_error)?).map_err(json_error))
                .collect()
        })
        .await
    }
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
    let (column, value) = match by {
        ProspectRef::Id(id) => ("id", id.to_string()),
        ProspectRef::ExternalId(ext) => ("external_id", ext.as_str().to_owned()),
        ProspectRef::Email(email) => ("email_hash", email.key_hash()),
        ProspectRef::EmailHash(hash) => ("email_hash", hash.clone()),
    };
    let sql = format!("SELECT {PROSPECT_COLUMNS} FROM prospects WHERE account_id = ?1 AND {column} = ?2");
    conn.query_row(&sql, params![account.to_string(), value], read_prospect)
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
    let doc: Option<String> = conn.query_row(sql, [id], |r| r.get(0)).optional().map_err(db_error)?;
    doc.map(|d| serde_json::from_str(&d).map_err(json_error)).transpose()
}

fn list_docs<T: serde::de::DeserializeOwned>(conn: &Connection, sql: &str, id: String) -> Result<Vec<T>, StoreError> {
    let mut stmt = conn.prepare(sql).map_err(db_error)?;
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
        let email = email.clone();
        self.call(move |conn| {
            let prospect = find_prospect(conn, account, &ProspectRef::Email(email))?;
            let account: Option<Account> = get_doc(conn, "SELECT doc FROM accounts WHERE id = ?1", account.to_string())?;
            let requested_campaign = match campaign {
                Some(id) => get_doc(conn, "SELECT doc FROM campaigns WHERE id = ?1", id.to_string())?,
                None => None,
            };
            Ok(UpsertContext {
                prospect,
                default_campaign_id: account.and_then(|a| a.default_campaign_id),
                requested_campaign,
            })
        })
        .await
    }

    async fn insert(&self, prospect: &Prospect) -> Result<(), StoreError> {
        let r = ProspectRecord::from_prospect(prospect, 1);
        self.call(move |conn| {
            conn.execute(
                &format!("INSERT INTO prospects ({PROSPECT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"),
                params![r.id, r.account_id, r.email_hash, r.external_id, r.status, r.ended_through, r.version, r.updated_at, r.doc],
            )
            .map_err(write_error)?;
            Ok(())
        })
        .await
    }

    async fn update(&self, previous: &Prospect, updated: &Prospect) -> Result<(), StoreError> {
        let r = ProspectRecord::from_prospect(updated, previous.version + 1);
        let expected = i64::try_from(previous.version).unwrap_or(i64::MAX);
        self.call(move |conn| {
            let n = conn
                .execute(
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
        self.call(move |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(db_error)?;
            let Some(mut p) = find_prospect(&tx, account, &by)? else { return Ok(None) };
            p.set_status(status, now);
            p.version += 1;
            tx.execute(
                "UPDATE prospects SET status = ?2, ended_through = ?3, version = version + 1, updated_at = ?4 WHERE id = ?1",
                params![p.id.to_string(), p.status.as_str(), p.ended_through, rfc3339(now)],
            )
            .map_err(db_error)?;
            tx.commit().map_err(db_error)?;
            Ok(Some(p))
        })
        .await
    }

    async fn find(&self, account: AccountId, prospect: &ProspectRef) -> Result<Option<Prospect>, StoreError> {
        let by = prospect.clone();
        self.call(move |conn| find_prospect(conn, account, &by)).await
    }
}

#[async_trait]
impl JobQueue for SqliteStore {
    async fn publish(&self, job: &CampaignJob, visible_at: OffsetDateTime) -> Result<(), StoreError> {
        self.enqueue_raw(job.to_json(), visible_at).await
    }
}

#[async_trait]
impl SendLog for SqliteStore {
    async fn claim_send(&self, enrollment: EnrollmentId, step: u32, now: OffsetDateTime) -> Result<Claim, StoreError> {
        let (id, at) = (enrollment.to_string(), rfc3339(now));
        self.call(move |conn| {
            let inserted = conn
                .execute("INSERT OR IGNORE INTO sends (enrollment_id, step, claimed_at) VALUES (?1, ?2, ?3)", params![id, step, at])
                .map_err(db_error)?;
            if inserted == 1 {
                return Ok(Claim::Won);
            }
            let since: String = conn
                .query_row("SELECT claimed_at FROM sends WHERE enrollment_id = ?1 AND step = ?2", params![id, step], |r| r.get(0))
                .map_err(db_error)?;
            Ok(Claim::Held { since: super::record::parse_rfc3339(&since)? })
        })
        .await
    }

    async fn release_send(&self, enrollment: EnrollmentId, step: u32) -> Result<(), StoreError> {
        let id = enrollment.to_string();
        self.call(move |conn| {
            conn.execute("DELETE FROM sends WHERE enrollment_id = ?1 AND step = ?2", params![id, step]).map(drop).map_err(db_error)
        })
        .await
    }

    async fn claimed_at(&self, enrollment: EnrollmentId, step: u32) -> Result<Option<OffsetDateTime>, StoreError> {
        let id = enrollment.to_string();
        self.call(move |conn| {
            let since: Option<String> = conn
                .query_row("SELECT claimed_at FROM sends WHERE enrollment_id = ?1 AND step = ?2", params![id, step], |r| r.get(0))
                .optional()
                .map_err(db_error)?;
            since.as_deref().map(super::record::parse_rfc3339).transpose()
        })
        .await
    }
}

/// The outbox mailer: stores each email in the embedded store instead of sending it
/// (`cadenhq outbox list` shows them). The default for `cadenhq serve`.
#[async_trait]
impl Mailer for SqliteStore {
    async fn send(&self, email: &OutgoingEmail) -> Result<(), MailError> {
        let doc = serde_json::to_string(email).map_err(|e| MailError::Transient(Box::new(e)))?;
        let now = rfc3339(OffsetDateTime::now_utc());
        self.call(move |conn| {
            conn.execute("INSERT INTO outbox (queued_at, doc) VALUES (?1, ?2)", params![now, doc]).map(drop).map_err(db_error)
        })
        .await
        .map_err(|e| MailError::Transient(Box::new(e)))
    }
}

#[async_trait]
impl KeyStore for SqliteStore {
    async fn find_key(&self, hash: &KeyHash) -> Result<Option<ApiKeyRecord>, StoreError> {
        let hash = hash.as_str().to_owned();
        self.call(move |conn| get_doc(conn, "SELECT doc FROM api_keys WHERE hash = ?1", hash)).await
    }

    async fn touch_key(&self, hash: &KeyHash, now: OffsetDateTime) -> Result<(), StoreError> {
        let (hash, at) = (hash.as_str().to_owned(), rfc3339(now));
        self.call(move |conn| {
            conn.execute("UPDATE api_keys SET doc = json_set(doc, '$.last_used_at', ?2) WHERE hash = ?1", params![hash, at])
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
        self.call(move |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(db_error)?;
            let existing: Option<(String, Option<u16>, Option<String>, i64, i64)> = tx
                .query_row(
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
            tx.execute(
                "INSERT OR REPLACE INTO idempotency (account_id, key_hash, fingerprint, status, body, lease_until_ms, expires_at_ms)
                 VALUES (?1, ?2, ?3, NULL, NULL, ?4, ?5)",
                params![account, key, fingerprint, lease, expires],
            )
            .map_err(db_error)?;
            tx.commit().map_err(db_error)?;
            Ok(IdempotencyBegin::Started)
        })
        .await
    }

    async fn finish(&self, account: AccountId, key: &IdempotencyKey, response: &StoredResponse, now: OffsetDateTime) -> Result<(), StoreError> {
        let (account, key, status, body) = (account.to_string(), key.hash().to_owned(), response.status, response.body.clone());
        let expires = unix_ms(now + IDEMPOTENCY_TTL);
        self.call(move |conn| {
            conn.execute(
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
        self.call(move |conn| {
            conn.execute("DELETE FROM idempotency WHERE account_id = ?1 AND key_hash = ?2", params![account, key])
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
        self.call(move |conn| {
            conn.execute("INSERT INTO accounts (id, doc) VALUES (?1, ?2)", params![id, doc]).map_err(db_error)?;
            Ok(())
        })
        .await
    }

    async fn get_account(&self, id: AccountId) -> Result<Option<Account>, StoreError> {
        self.call(move |conn| get_doc(conn, "SELECT doc FROM accounts WHERE id = ?1", id.to_string())).await
    }

    async fn is_empty(&self) -> Result<bool, StoreError> {
        self.call(|conn| {
            let n: i64 = conn.query_row("SELECT COUNT(*) FROM accounts", [], |r| r.get(0)).map_err(db_error)?;
            Ok(n == 0)
        })
        .await
    }

    async fn create_key(&self, key: &ApiKeyRecord) -> Result<(), StoreError> {
        let doc = serde_json::to_string(key).map_err(json_error)?;
        let (id, hash, account) = (key.key_id.to_string(), key.hash.as_str().to_owned(), key.account_id.to_string());
        self.call(move |conn| {
            conn.execute(
                "INSERT INTO api_keys (key_id, hash, account_id, doc) VALUES (?1, ?2, ?3, ?4)",
                params![id, hash, account, doc],
            )
            .map_err(db_error)?;
            Ok(())
        })
        .await
    }

    async fn revoke_key(&self, id: KeyId, now: OffsetDateTime) -> Result<bool, StoreError> {
        self.call(move |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(db_error)?;
            let Some(mut key) = get_doc::<ApiKeyRecord>(&tx, "SELECT doc FROM api_keys WHERE key_id = ?1", id.to_string())? else {
                return Ok(false);
            };
            key.revoked_at.get_or_insert(now);
            let doc = serde_json::to_string(&key).map_err(json_error)?;
            tx.execute("UPDATE api_keys SET doc = ?2 WHERE key_id = ?1", params![id.to_string(), doc]).map_err(db_error)?;
            tx.commit().map_err(db_error)?;
            Ok(true)
        })
        .await
    }

    async fn list_keys(&self, account: AccountId) -> Result<Vec<ApiKeyRecord>, StoreError> {
        self.call(move |conn| list_docs(conn, "SELECT doc FROM api_keys WHERE account_id = ?1 ORDER BY rowid", account.to_string()))
            .await
    }

    async fn set_rate_limit(&self, id: KeyId, limit: Option<RateLimit>) -> Result<bool, StoreError> {
        self.call(move |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(db_error)?;
            let Some(mut key) = get_doc::<ApiKeyRecord>(&tx, "SELECT doc FROM api_keys WHERE key_id = ?1", id.to_string())? else {
                return Ok(false);
            };
            key.rate_limit = limit;
            let doc = serde_json::to_string(&key).map_err(json_error)?;
            tx.execute("UPDATE api_keys SET doc = ?2 WHERE key_id = ?1", params![id.to_string(), doc]).map_err(db_error)?;
            tx.commit().map_err(db_error)?;
            Ok(true)
        })
        .await
    }

    async fn create_campaign(&self, campaign: &Campaign, make_default: bool) -> Result<(), StoreError> {
        let doc = serde_json::to_string(campaign).map_err(json_error)?;
        let (id, account) = (campaign.id, campaign.account_id);
        self.call(move |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(db_error)?;
            tx.execute(
                "INSERT INTO campaigns (id, account_id, doc) VALUES (?1, ?2, ?3)",
                params![id.to_string(), account.to_string(), doc],
            )
            .map_err(db_error)?;
            if make_default {
                let mut acc: Account = get_doc(&tx, "SELECT doc FROM accounts WHERE id = ?1", account.to_string())?
                    .ok_or_else(|| StoreError::other("campaign's account does not exist"))?;
                acc.default_campaign_id = Some(id);
                let doc = serde_json::to_string(&acc).map_err(json_error)?;
                tx.execute("UPDATE accounts SET doc = ?2 WHERE id = ?1", params![account.to_string(), doc]).map_err(db_error)?;
            }
            tx.commit().map_err(db_error)?;
            Ok(())
        })
        .await
    }

    async fn list_campaigns(&self, account: AccountId) -> Result<Vec<Campaign>, StoreError> {
        self.call(move |conn| list_docs(conn, "SELECT doc FROM campaigns WHERE account_id = ?1 ORDER BY rowid", account.to_string()))
            .await
    }

    async fn deactivate_campaign(&self, id: CampaignId) -> Result<bool, StoreError> {
        self.call(move |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(db_error)?;
            let Some(mut campaign) = get_doc::<Campaign>(&tx, "SELECT doc FROM campaigns WHERE id = ?1", id.to_string())? else {
                return Ok(false);
            };
            campaign.active = false;
            let doc = serde_json::to_string(&campaign).map_err(json_error)?;
            tx.execute("UPDATE campaigns SET doc = ?2 WHERE id = ?1", params![id.to_string(), doc]).map_err(db_error)?;
            if let Some(mut acc) = get_doc::<Account>(&tx, "SELECT doc FROM accounts WHERE id = ?1", campaign.account_id.to_string())? {
                if acc.default_campaign_id == Some(id) {
                    acc.default_campaign_id = None;
                    let doc = serde_json::to_string(&acc).map_err(json_error)?;
                    tx.execute("UPDATE accounts SET doc = ?2 WHERE id = ?1", params![acc.id.to_string(), doc]).map_err(db_error)?;
                }
            }
            tx.commit().map_err(db_error)?;
            Ok(true)
        })
        .await
    }

    async fn get_campaign(&self, id: CampaignId) -> Result<Option<Campaign>, StoreError> {
        self.call(move |conn| get_doc(conn, "SELECT doc FROM campaigns WHERE id = ?1", id.to_string())).await
    }
}
