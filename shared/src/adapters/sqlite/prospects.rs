//! Prospects: the `prospects` table and its rows.

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};
use time::OffsetDateTime;

use super::{db_error, execute, get_doc, query_row, SqliteStore};
use crate::adapters::record::{from_json, parse_rfc3339, rfc3339, to_json, ProspectRecord};
use crate::domain::{
    millis, Account, AccountId, CampaignId, EnrollmentId, ProspectId, ListQuery, NormalizedEmail, Prospect, ProspectStatus, StatusChange, StatusReason,
    StepProgress,
};
use crate::ports::{Conflict, ListPage, ProspectRef, ProspectRepository, Replacing, StoreError, UpsertContext};

/// The columns of `prospects`, in the order [`read_prospect`] reads them.
macro_rules! prospect_columns {
    () => {
        "id, account_id, email_hash, external_id, status, ended_through, version, updated_at, doc, history"
    };
}

/// [`prospect_columns`], of the table named `p`.
macro_rules! qualified_prospect_columns {
    () => {
        "p.id, p.account_id, p.email_hash, p.external_id, p.status, p.ended_through, p.version, p.updated_at, p.doc, p.history"
    };
}

/// Each step's recorded outcome for the prospect row of `$table`, from the send log: one JSON
/// array column after the others, so a prospect and its outcomes are one statement (one
/// snapshot) and [`read_progress`] parses it.
macro_rules! progress_column {
    ($table:literal) => {
        concat!(
            "(SELECT json_group_array(json_array(enrollment_id, step, state, coalesce(updated_at, claimed_at), retry_at, detail, subject)) FROM sends WHERE prospect_id = ",
            $table,
            ".id AND state <> 'claimed')"
        )
    };
}

/// The query finding one prospect of an account by `$column`.
macro_rules! select_prospect_by {
    ($column:literal) => {
        concat!("SELECT ", prospect_columns!(), ", ", progress_column!("prospects"), " FROM prospects WHERE account_id = ?1 AND ", $column, " = ?2")
    };
}

/// A prospect's row as [`read_prospect`] reads it: the record, its stored status history and
/// its steps' outcomes (JSON).
type ProspectRow = (ProspectRecord, Option<String>, String);

fn read_prospect(row: &rusqlite::Row<'_>) -> rusqlite::Result<ProspectRow> {
    let record = ProspectRecord {
        id: row.get(0)?,
        account_id: row.get(1)?,
        email_hash: row.get(2)?,
        external_id: row.get(3)?,
        status: row.get(4)?,
        ended_through: row.get(5)?,
        version: row.get(6)?,
        updated_at: row.get(7)?,
        doc: row.get(8)?,
        history: Vec::new(),
        progress: Vec::new(),
    };
    Ok((record, row.get(9)?, row.get(10)?))
}

/// The JSON a prospect's status history is stored as.
fn history_json(p: &Prospect) -> String {
    to_json(&p.history.iter().map(StatusChange::stored).collect::<Vec<_>>())
}

/// The steps' outcomes of a [`progress_column`]: (enrollment, step, state, time, retry time,
/// provider detail, subject) each.
fn read_progress(json: &str) -> Result<Vec<StepProgress>, StoreError> {
    type StoredStep = (String, u32, String, String, Option<String>, Option<String>, Option<String>);
    let steps: Vec<StoredStep> = from_json(json, "send log")?;
    steps
        .into_iter()
        .map(|(enrollment, step, state, at, retry_at, detail, subject)| {
            Ok(StepProgress {
                enrollment: EnrollmentId::parse(&enrollment).map_err(|_| StoreError::other("stored send record has an invalid enrollment id"))?,
                step,
                at: parse_rfc3339(&at)?,
                retry_at: retry_at.as_deref().map(parse_rfc3339).transpose()?,
                message_id: detail.filter(|_| state == "sent"),
                state,
                subject,
            })
        })
        .collect()
}

pub(super) fn find_prospect(conn: &Connection, account: AccountId, by: &ProspectRef) -> Result<Option<Prospect>, StoreError> {
    match by {
        ProspectRef::Id(id) => find_prospect_where(conn, select_prospect_by!("id"), account, &id.to_string()),
        ProspectRef::ExternalId(ext) => find_prospect_where(conn, select_prospect_by!("external_id"), account, ext.as_str()),
        ProspectRef::Email(email) => find_prospect_where(conn, select_prospect_by!("email_hash"), account, email.key_hash()),
        ProspectRef::EmailHash(hash) => find_prospect_where(conn, select_prospect_by!("email_hash"), account, hash),
    }
}

/// The account's prospect that `sql` (a `select_prospect_by!`) finds by `value`.
fn find_prospect_where(conn: &Connection, sql: &str, account: AccountId, value: &str) -> Result<Option<Prospect>, StoreError> {
    let Some(row) = query_row(conn, sql, params![account.to_string(), value], read_prospect).optional().map_err(db_error)? else {
        return Ok(None);
    };
    into_prospect(row).map(Some)
}

/// A prospect from its row, its stored history and its steps' outcomes in the send log.
fn into_prospect((mut record, history, progress): ProspectRow) -> Result<Prospect, StoreError> {
    record.history = history.map(|h| from_json(&h, "status history")).transpose()?.unwrap_or_default();
    record.progress = read_progress(&progress)?;
    record.into_prospect()
}

/// Sets a prospect's status, reading it first on the write connection, in the group's
/// transaction: nothing can change the prospect in between.
fn set_status_on(
    conn: &Connection,
    account: AccountId,
    by: &ProspectRef,
    status: ProspectStatus,
    reason: StatusReason,
    now: OffsetDateTime,
) -> Result<Option<Prospect>, StoreError> {
    let Some(p) = find_prospect(conn, account, by)? else { return Ok(None) };
    write_status(conn, p, status, reason, now).map(Some)
}

/// Sets the status of `p`, as read in this write: every status change (PATCH, unsubscribe
/// link, the scheduler's bounce, providers' feedback) is this write.
pub(super) fn write_status(conn: &Connection, mut p: Prospect, status: ProspectStatus, reason: StatusReason, now: OffsetDateTime) -> Result<Prospect, StoreError> {
    p.set_status(status, reason, now);
    p.version += 1;
    execute(
        conn,
        "UPDATE prospects SET status = ?2, ended_through = ?3, version = version + 1, updated_at = ?4, history = ?5, updated_ms = ?6 WHERE id = ?1",
        params![p.id.to_string(), p.status.as_str(), p.ended_through, rfc3339(now), history_json(&p), millis(now)],
    )
    .map_err(db_error)?;
    Ok(p)
}

/// Gives rows of earlier versions what the listing's indexes read: their creation and update
/// times in milliseconds, and a row per campaign they were enrolled in.
pub(super) fn fill_listing_positions(conn: &Connection) -> Result<(), StoreError> {
    let mut statement = conn.prepare("SELECT id, account_id, doc, updated_at FROM prospects WHERE created_ms IS NULL OR updated_ms IS NULL").map_err(db_error)?;
    let rows: Vec<(String, String, String, String)> =
        statement.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))).map_err(db_error)?.collect::<Result<_, _>>().map_err(db_error)?;
    for (id, account, doc, updated_at) in rows {
        #[derive(serde::Deserialize)]
        struct Listed {
            #[serde(with = "time::serde::rfc3339")]
            created_at: OffsetDateTime,
            #[serde(default)]
            enrollments: Vec<crate::domain::Enrollment>,
        }
        let listed: Listed = from_json(&doc, "document")?;
        let (created_ms, updated_ms) = (millis(listed.created_at), millis(parse_rfc3339(&updated_at)?));
        execute(conn, "UPDATE prospects SET created_ms = ?2, updated_ms = ?3 WHERE id = ?1", params![id, created_ms, updated_ms]).map_err(db_error)?;
        for enrollment in &listed.enrollments {
            add_campaign_row(conn, &account, enrollment.campaign_id, created_ms, &id)?;
        }
    }
    Ok(())
}

/// Records that the prospect was enrolled in `campaign` (the listing's campaign filter reads it).
fn add_campaign_row(conn: &Connection, account: &str, campaign: CampaignId, created_ms: i64, prospect: &str) -> Result<(), StoreError> {
    execute(
        conn,
        "INSERT OR IGNORE INTO prospect_campaigns (account_id, campaign_id, created_ms, prospect_id) VALUES (?1, ?2, ?3, ?4)",
        params![account, campaign.to_string(), created_ms, prospect],
    )
    .map_err(db_error)?;
    Ok(())
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
            let account_id = account;
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
            let suppressed = prospect.is_none()
                && query_row(conn, "SELECT EXISTS (SELECT 1 FROM suppressions WHERE account_id = ?1 AND email_hash = ?2)", params![account_id.to_string(), email.key_hash()], |r| r.get(0))
                    .map_err(db_error)?;
            Ok(UpsertContext { prospect, default_campaign_id: account.and_then(|a| a.default_campaign_id), requested_campaign, suppressed })
        })
    }

    async fn insert(&self, prospect: Prospect) -> Result<(), StoreError> {
        let r = ProspectRecord::from_prospect(&prospect, 1);
        let (history, created_ms, updated_ms) = (history_json(&prospect), millis(prospect.created_at), millis(prospect.updated_at));
        let campaigns: Vec<CampaignId> = prospect.enrollments.iter().map(|e| e.campaign_id).collect();
        self.write(move |conn| {
            execute(
                conn,
                concat!("INSERT INTO prospects (", prospect_columns!(), ", created_ms, updated_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"),
                params![r.id, r.account_id, r.email_hash, r.external_id, r.status, r.ended_through, r.version, r.updated_at, r.doc, history, created_ms, updated_ms],
            )
            .map_err(write_error)?;
            for campaign in &campaigns {
                add_campaign_row(conn, &r.account_id, *campaign, created_ms, &r.id)?;
            }
            Ok(())
        })
        .await
    }

    async fn update(&self, previous: Replacing, updated: Prospect) -> Result<(), StoreError> {
        let r = ProspectRecord::from_prospect(&updated, previous.version + 1);
        let expected = i64::try_from(previous.version).unwrap_or(i64::MAX);
        let (created_ms, updated_ms) = (millis(updated.created_at), millis(updated.updated_at));
        let campaigns: Vec<CampaignId> = updated.enrollments.iter().map(|e| e.campaign_id).collect();
        self.write(move |conn| {
            let n = execute(
                conn,
                "UPDATE prospects SET external_id = ?2, status = ?3, ended_through = ?4, version = ?5,
                 updated_at = ?6, doc = ?7, updated_ms = ?9 WHERE id = ?1 AND version = ?8",
                params![r.id, r.external_id, r.status, r.ended_through, r.version, r.updated_at, r.doc, expected, updated_ms],
            )
            .map_err(write_error)?;
            if n == 0 {
                return Err(StoreError::Conflict(Conflict::Version));
            }
            // Enrollments only ever grow: the rows of the ones before are there already.
            for campaign in &campaigns {
                add_campaign_row(conn, &r.account_id, *campaign, created_ms, &r.id)?;
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
        reason: StatusReason,
        now: OffsetDateTime,
    ) -> Result<Option<Prospect>, StoreError> {
        let by = prospect.clone();
        self.write(move |conn| set_status_on(conn, account, &by, status, reason, now)).await
    }

    async fn find(&self, account: AccountId, prospect: &ProspectRef) -> Result<Option<Prospect>, StoreError> {
        self.read(|conn| find_prospect(conn, account, prospect))
    }

    /// One write transaction: the emails of the outbox sent to the prospect, its send log
    /// rows, its row; a suppression entry in their place. The WAL is truncated after the
    /// commit, and freed pages are zeroed (`secure_delete`), so the file keeps no copy.
    async fn erase(&self, account: AccountId, prospect: &ProspectRef, now: OffsetDateTime) -> Result<Option<ProspectId>, StoreError> {
        let by = prospect.clone();
        let (done, truncated) = tokio::sync::oneshot::channel();
        let waiters = std::sync::Arc::clone(&self.inner.wal_truncations);
        let erased = self
            .write(move |conn| {
                let Some(p) = find_prospect(conn, account, &by)? else { return Ok(None) };
                let id = p.id.to_string();
                execute(
                    conn,
                    "DELETE FROM outbox WHERE message_id IN (SELECT detail FROM sends WHERE prospect_id = ?1 AND state = 'sent')
                        OR lower(trim(json_extract(doc, '$.to'))) = ?2",
                    params![id, p.email.as_str()],
                )
                .map_err(db_error)?;
                execute(conn, "DELETE FROM sends WHERE prospect_id = ?1", [&id]).map_err(db_error)?;
                execute(conn, "DELETE FROM feedback WHERE prospect_id = ?1", [&id]).map_err(db_error)?;
                execute(conn, "DELETE FROM prospect_campaigns WHERE prospect_id = ?1", [&id]).map_err(db_error)?;
                execute(conn, "DELETE FROM prospects WHERE id = ?1", [&id]).map_err(db_error)?;
                execute(
                    conn,
                    "INSERT OR REPLACE INTO suppressions (account_id, email_hash, reason, at) VALUES (?1, ?2, 'erased', ?3)",
                    params![account.to_string(), p.email.key_hash(), rfc3339(now)],
                )
                .map_err(db_error)?;
                waiters.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(done);
                Ok(Some(p.id))
            })
            .await?;
        if erased.is_some() {
            let _ = truncated.await;
        }
        Ok(erased)
    }

    /// One query, on the index that serves its filters: `prospect_campaigns` for a campaign,
    /// `prospects_status_listing` for a status, `prospects_listing` otherwise (the position and
    /// creation filters are ranges of each); `prospects_updated` serves an update filter
    /// where the planner finds it narrower.
    async fn list(&self, query: &ListQuery) -> Result<ListPage, StoreError> {
        let (before_ms, before_id) = query.before.map_or((i64::MAX, String::new()), |p| (p.created_ms, p.id.to_string()));
        let mut args: Vec<Box<dyn rusqlite::ToSql>> =
            vec![Box::new(query.account.to_string()), Box::new(before_ms), Box::new(before_id), Box::new(query.created_after.map_or(i64::MIN, millis))];
        let (from, on) = match query.campaign {
            Some(campaign) => {
                args.push(Box::new(campaign.to_string()));
                ("prospect_campaigns c JOIN prospects p ON p.id = c.prospect_id", "c")
            }
            None => ("prospects p", "p"),
        };
        let id = if on == "c" { "c.prospect_id" } else { "p.id" };
        let mut sql = format!(
            concat!("SELECT ", qualified_prospect_columns!(), ", ", progress_column!("p"), " FROM {from} WHERE {on}.account_id = ?1 AND ({on}.created_ms < ?2 OR ({on}.created_ms = ?2 AND (?3 = '' OR {id} < ?3))) AND {on}.created_ms > ?4"),
            from = from,
            on = on,
            id = id
        );
        if query.campaign.is_some() {
            sql.push_str(" AND c.campaign_id = ?5");
        }
        if let Some(status) = query.status {
            args.push(Box::new(status.as_str()));
            sql.push_str(&format!(" AND p.status = ?{}", args.len()));
        }
        if let Some(updated_after) = query.updated_after {
            args.push(Box::new(millis(updated_after)));
            sql.push_str(&format!(" AND p.updated_ms >= ?{}", args.len()));
        }
        args.push(Box::new(query.limit + 1));
        sql.push_str(&format!(" ORDER BY {on}.created_ms DESC, {id} DESC LIMIT ?{}", args.len()));
        self.read(|conn| {
            let mut statement = conn.prepare_cached(&sql).map_err(db_error)?;
            let rows = statement.query_map(rusqlite::params_from_iter(args.iter().map(AsRef::as_ref)), read_prospect).map_err(db_error)?;
            let mut prospects = Vec::new();
            for row in rows {
                prospects.push(into_prospect(row.map_err(db_error)?)?);
            }
            // The SQL filters are the query's own; the domain's check is the one both stores share.
            prospects.retain(|p| query.admits(p));
            let has_more = prospects.len() > usize::try_from(query.limit).unwrap_or(usize::MAX);
            prospects.truncate(usize::try_from(query.limit).unwrap_or(usize::MAX));
            Ok(ListPage { prospects, has_more })
        })
    }
}
