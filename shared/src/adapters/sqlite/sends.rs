//! The job queue, the send log and the outbox (`jobs`, `dead_jobs`, `sends`, `outbox`), and the drain loop.

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};
use time::OffsetDateTime;

use super::{db_error, execute, json_error, query_row, unix_ms, LeasedJob, SqliteStore};
use crate::adapters::record::rfc3339;
use crate::domain::{CampaignId, CampaignJob, ClaimOwner, SendKey, SendRecord, SendState, SendTally};
use crate::ports::{
    ClaimRequest, ClaimResult, Delivered, JobQueue, MailError, Mailer, OutgoingEmail, ProspectKey, PullQueue, SendClaim, SendLog, StoreError,
};

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

impl SqliteStore {
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
        headers: mime.as_deref().map(crate::adapters::smtp::header_lines).unwrap_or_default(),
        email,
        raw: mime,
    }))
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
        let retry_at = retry_at.as_deref().map(crate::adapters::record::parse_rfc3339).transpose()?;
        let claimed_at = crate::adapters::record::parse_rfc3339(&claimed_at)?;
        let state = SendState::from_parts(&state, owner.as_deref(), detail, attempts, retry_at).map_err(StoreError::other)?;
        Ok(SendRecord {
            key: SendKey { enrollment: crate::domain::EnrollmentId::parse(&enrollment).map_err(|_| corrupt("enrollment id"))?, step },
            state,
            // A record of an earlier version has no owner; no claim can match the nil one.
            owner: owner.as_deref().map(ClaimOwner::parse).transpose().map_err(|_| corrupt("owner"))?.unwrap_or(ClaimOwner::NIL),
            claimed_at,
            updated_at: updated_at.as_deref().map(crate::adapters::record::parse_rfc3339).transpose()?.unwrap_or(claimed_at),
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
fn record_send_on(
    conn: &Connection,
    key: SendKey,
    owner: ClaimOwner,
    state: &SendState,
    subject: Option<&str>,
    now: OffsetDateTime,
) -> Result<bool, StoreError> {
    let (name, detail, retry_at) = state_parts(state);
    let attempts_after = match state {
        // A retry's attempt number is how many attempts were made before it.
        SendState::RetryScheduled { attempt, .. } => Some(*attempt),
        _ => None,
    };
    let changed = execute(
        conn,
        "UPDATE sends SET state = ?4, detail = ?5, retry_at = ?6, updated_at = ?7, attempts = COALESCE(?8, attempts),
             subject = COALESCE(?9, subject)
         WHERE enrollment_id = ?1 AND step = ?2 AND state = 'claimed' AND owner = ?3",
        params![key.enrollment.to_string(), key.step, owner.to_string(), name, detail, retry_at, rfc3339(now), attempts_after, subject],
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
                "INSERT INTO sends (enrollment_id, step, state, owner, detail, attempts, retry_at, claimed_at, updated_at, campaign_id, prospect_id)
                 VALUES (?1, ?2, 'claimed', ?3, NULL, ?4, NULL, ?5, ?5, ?6, ?7)
                 ON CONFLICT (enrollment_id, step) DO UPDATE SET state = 'claimed', owner = ?3, detail = NULL,
                     attempts = ?4, retry_at = NULL, claimed_at = ?5, updated_at = ?5, campaign_id = ?6, prospect_id = ?7",
                params![
                    claim.key.enrollment.to_string(),
                    claim.key.step,
                    claim.owner.to_string(),
                    claim.attempt + 1,
                    now,
                    claim.campaign.to_string(),
                    claim.prospect.to_string()
                ],
            )
            .map_err(db_error)?;
            Ok(ClaimResult::Won)
        })
        .await
    }

    /// The prospect's progress is read from the send log itself: only the record is written.
    async fn record_send(
        &self,
        _: &ProspectKey,
        key: SendKey,
        owner: ClaimOwner,
        state: &SendState,
        subject: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let (state, subject) = (state.clone(), subject.map(str::to_owned));
        self.write(move |conn| record_send_on(conn, key, owner, &state, subject.as_deref(), now)).await
    }

    async fn send_record(&self, key: SendKey) -> Result<Option<SendRecord>, StoreError> {
        self.read(|conn| find_send(conn, key))
    }

    /// One indexed query; records of earlier versions (no campaign) are not counted.
    async fn tally(&self, campaign: CampaignId) -> Result<SendTally, StoreError> {
        self.read(|conn| {
            let mut statement =
                conn.prepare_cached("SELECT step, state, COUNT(*) FROM sends WHERE campaign_id = ?1 GROUP BY step, state").map_err(db_error)?;
            let rows = statement
                .query_map([campaign.to_string()], |r| Ok((r.get::<_, u32>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?)))
                .map_err(db_error)?;
            let mut tally = SendTally::default();
            for row in rows {
                let (step, state, n) = row.map_err(db_error)?;
                tally.add(step, &state, u64::try_from(n).unwrap_or_default()).map_err(StoreError::other)?;
            }
            Ok(tally)
        })
    }
}

/// The outbox mailer: stores each email in the embedded store instead of sending it
/// (`cadenhq outbox list` shows them), as the exact MIME message the SMTP and SES mailers
/// would send. The message and its send record (`sent`) are written in one transaction: a
/// step is in the outbox exactly once, across crashes too. The default for `cadenhq serve`.
#[async_trait]
impl Mailer for SqliteStore {
    async fn send(&self, email: &OutgoingEmail, claim: &SendClaim) -> Result<Delivered, MailError> {
        let message = crate::adapters::smtp::build_message(email, &claim.reference)?;
        let message_id = crate::adapters::smtp::message_id(&message);
        let mime = String::from_utf8_lossy(&message.formatted()).into_owned();
        let doc = serde_json::to_string(email).map_err(|e| MailError::NotAccepted(Box::new(e)))?;
        let now = rfc3339(OffsetDateTime::now_utc());
        let claim = *claim;
        let sent = SendState::Sent { message_id: message_id.clone() };
        let (id, subject) = (message_id.clone(), email.subject.clone());
        self.write(move |conn| {
            execute(
                conn,
                "INSERT INTO outbox (queued_at, doc, mime, message_id) VALUES (?1, ?2, ?3, ?4)",
                params![now, doc, mime, id],
            )
            .map_err(db_error)?;
            if !record_send_on(conn, claim.reference.send, claim.owner, &sent, Some(&subject), claim.now)? {
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
