//! Providers' feedback: the `feedback` table (what was applied, once per notification and
//! address), and the send log's message ids and delivery times.

use async_trait::async_trait;
use rusqlite::{params, OptionalExtension};
use time::OffsetDateTime;

use super::prospects::{find_prospect, write_status};
use super::{db_error, execute, query_row, unix_ms, SqliteStore};
use crate::adapters::record::{parse_rfc3339, rfc3339};
use crate::domain::{
    transient_bounces_exhausted, AccountId, EmailReference, EnrollmentId, ProspectId, ProspectStatus, SendKey, StatusReason,
    TRANSIENT_BOUNCE_WINDOW,
};
use crate::ports::{FeedbackApplied, FeedbackChange, FeedbackLog, FeedbackWrite, ProspectRef, StoreError};

#[async_trait]
impl FeedbackLog for SqliteStore {
    async fn sent_email(&self, provider_message_id: &str) -> Result<Option<EmailReference>, StoreError> {
        let found: Option<(String, u32, String, String)> = self.read(|conn| {
            query_row(
                conn,
                "SELECT s.enrollment_id, s.step, p.id, p.account_id FROM sends s JOIN prospects p ON p.id = s.prospect_id
                 WHERE s.detail = ?1 AND s.state = 'sent'",
                [provider_message_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()
            .map_err(db_error)
        })?;
        let Some((enrollment, step, prospect, account)) = found else { return Ok(None) };
        let corrupt = || StoreError::other("stored send record names an invalid id");
        Ok(Some(EmailReference {
            account: AccountId::parse(&account).map_err(|_| corrupt())?,
            prospect: ProspectId::parse(&prospect).map_err(|_| corrupt())?,
            send: SendKey { enrollment: EnrollmentId::parse(&enrollment).map_err(|_| corrupt())?, step },
        }))
    }

    /// One write transaction: the prospect checked at the recipient's address, the feedback
    /// recorded (a second time is a duplicate), and the status set by the same write as every
    /// other status change.
    async fn apply_feedback(&self, write: &FeedbackWrite) -> Result<FeedbackApplied, StoreError> {
        let w = write.clone();
        self.write(move |conn| {
            let key = &w.prospect;
            let (account, prospect) = (key.account.to_string(), key.prospect.to_string());
            let Some(stored) = find_prospect(conn, key.account, &ProspectRef::EmailHash(key.email_hash.clone()))?.filter(|p| p.id == key.prospect) else {
                return Ok(FeedbackApplied::Unmatched);
            };
            let inserted = execute(
                conn,
                "INSERT OR IGNORE INTO feedback (feedback_id, email_hash, account_id, prospect_id, kind, at, at_ms, received_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![w.feedback_id, key.email_hash, account, prospect, w.kind, rfc3339(w.at), unix_ms(w.at), rfc3339(w.now)],
            )
            .map_err(db_error)?;
            if inserted == 0 {
                return Ok(FeedbackApplied::Duplicate);
            }
            let (status, reason) = match w.change {
                FeedbackChange::Status(status, reason) => (status, reason),
                FeedbackChange::TransientBounce => {
                    let since = unix_ms(w.now - TRANSIENT_BOUNCE_WINDOW);
                    let mut statement = conn
                        .prepare_cached("SELECT at FROM feedback WHERE prospect_id = ?1 AND kind = ?2 AND at_ms > ?3")
                        .map_err(db_error)?;
                    let times = statement
                        // This bounce's kind: the one every transient bounce is recorded as.
                        .query_map(params![prospect, w.kind, since], |r| r.get::<_, String>(0))
                        .map_err(db_error)?
                        .map(|t| t.map_err(db_error).and_then(|t| parse_rfc3339(&t)))
                        .collect::<Result<Vec<OffsetDateTime>, _>>()?;
                    if !transient_bounces_exhausted(&times, w.now) {
                        return Ok(FeedbackApplied::Applied(None));
                    }
                    (ProspectStatus::Bounced, StatusReason::Bounce)
                }
            };
            let updated = write_status(conn, stored, status, reason, w.now)?;
            Ok(FeedbackApplied::Applied(Some(updated.status)))
        })
        .await
    }

    async fn record_delivery(&self, send: SendKey, at: OffsetDateTime) -> Result<bool, StoreError> {
        self.write(move |conn| {
            execute(
                conn,
                "UPDATE sends SET delivered_at = ?3 WHERE enrollment_id = ?1 AND step = ?2 AND state = 'sent'",
                params![send.enrollment.to_string(), send.step, rfc3339(at)],
            )
            .map(|n| n > 0)
            .map_err(db_error)
        })
        .await
    }
}
