//! Providers' feedback: the `MSG#` items (which prospect and step a provider's message id was
//! sent for, written with the `sent` record), the `FEEDBACK#` items (what was applied, once per
//! notification and address) and the `BOUNCES#` items (each address's recent transient bounces).

use std::collections::HashMap;

use async_trait::async_trait;
use aws_sdk_dynamodb::types::{AttributeValue, ConditionCheck, Put, TransactWriteItem, Update};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use super::prospects::StatusWrite;
use super::{cancellation_code, get_n, get_s, key, n, prospect_pk, s, sdk_error, updated, DynamoStore, Item};
use crate::adapters::record::{parse_rfc3339, rfc3339};
use crate::domain::{
    transient_bounces_exhausted, AccountId, EmailReference, EnrollmentId, ProspectId, ProspectStatus, SendKey, StatusReason,
    TRANSIENT_BOUNCE_WINDOW,
};
use crate::ports::{FeedbackApplied, FeedbackChange, FeedbackLog, FeedbackWrite, StoreError};

/// How long a `FEEDBACK#` item is kept: longer than any provider redelivers a notification
/// (SNS retries a Lambda subscription for up to 23 days).
const FEEDBACK_TTL_SECONDS: i64 = 35 * 24 * 3600;

/// Attempts at a transient bounce's read and write when another write changes the item
/// between them.
const ATTEMPTS: usize = 3;

fn message_pk(provider_message_id: &str) -> String {
    format!("MSG#{provider_message_id}")
}

fn feedback_pk(feedback_id: &str, email_hash: &str) -> String {
    format!("FEEDBACK#{}#{email_hash}", hex::encode(Sha256::digest(feedback_id.as_bytes())))
}

fn bounces_pk(account: &str, email_hash: &str) -> String {
    format!("BOUNCES#{account}#{email_hash}")
}

/// The `MSG#` item of a `sent` send record: what finds the prospect and step from a
/// notification that names only the provider's message id. Kept as long as the send record.
pub(super) fn message_item(provider_message_id: &str, reference: &EmailReference, expires_at: i64) -> Item {
    let mut item = key(message_pk(provider_message_id));
    item.extend([
        ("account".to_owned(), s(reference.account.to_string())),
        ("prospect".to_owned(), s(reference.prospect.to_string())),
        ("enrollment".to_owned(), s(reference.send.enrollment.to_string())),
        ("step".to_owned(), n(reference.send.step)),
        ("expires_at".to_owned(), n(expires_at)),
    ]);
    item
}

impl DynamoStore {
    /// The `FEEDBACK#` item of `write`, put only if it is not there yet.
    fn feedback_put(&self, write: &FeedbackWrite) -> Result<TransactWriteItem, StoreError> {
        let key = &write.prospect;
        let mut item = super::key(feedback_pk(&write.feedback_id, &key.email_hash));
        item.extend([
            ("account".to_owned(), s(key.account.to_string())),
            ("prospect".to_owned(), s(key.prospect.to_string())),
            ("kind".to_owned(), s(write.kind)),
            ("at".to_owned(), s(rfc3339(write.at))),
            ("expires_at".to_owned(), n(write.now.unix_timestamp() + FEEDBACK_TTL_SECONDS)),
        ]);
        let put = Put::builder().table_name(&self.table).set_item(Some(item)).condition_expression("attribute_not_exists(pk)").build().map_err(StoreError::other)?;
        Ok(TransactWriteItem::builder().put(put).build())
    }

    /// The prospect item's status write (the one `set_status` makes), conditional on the item
    /// being the prospect named.
    fn status_update(&self, write: &FeedbackWrite, status: ProspectStatus, reason: StatusReason) -> Result<TransactWriteItem, StoreError> {
        let key = &write.prospect;
        let change = StatusWrite::new(status, reason, write.now);
        let update = Update::builder()
            .table_name(&self.table)
            .set_key(Some(super::key(prospect_pk(&key.account.to_string(), &key.email_hash))))
            .update_expression(change.expression)
            .condition_expression("id = :pid")
            .set_expression_attribute_names(Some(change.names))
            .set_expression_attribute_values(Some(change.values))
            .expression_attribute_values(":pid", s(key.prospect.to_string()))
            .build()
            .map_err(StoreError::other)?;
        Ok(TransactWriteItem::builder().update(update).build())
    }

    /// A check that the prospect item is the prospect named.
    fn prospect_check(&self, write: &FeedbackWrite) -> Result<TransactWriteItem, StoreError> {
        let key = &write.prospect;
        let check = ConditionCheck::builder()
            .table_name(&self.table)
            .set_key(Some(super::key(prospect_pk(&key.account.to_string(), &key.email_hash))))
            .condition_expression("id = :pid")
            .expression_attribute_values(":pid", s(key.prospect.to_string()))
            .build()
            .map_err(StoreError::other)?;
        Ok(TransactWriteItem::builder().condition_check(check).build())
    }

    /// Runs a feedback transaction whose item 0 is the `FEEDBACK#` put and item 1 the
    /// prospect's write or check. `None`: another write met this one (try again).
    async fn feedback_transaction(&self, items: Vec<TransactWriteItem>, applied: FeedbackApplied) -> Result<Option<FeedbackApplied>, StoreError> {
        let Err(e) = self.client.transact_write_items().set_transact_items(Some(items)).send().await else { return Ok(Some(applied)) };
        let codes: Vec<Option<String>> = (0..3).map(|i| cancellation_code(&e, i)).collect();
        if codes[0].as_deref() == Some("ConditionalCheckFailed") {
            return Ok(Some(FeedbackApplied::Duplicate));
        }
        if codes[1].as_deref() == Some("ConditionalCheckFailed") {
            return Ok(Some(FeedbackApplied::Unmatched));
        }
        if codes.iter().any(|c| c.as_deref() == Some("TransactionConflict")) || codes[2].as_deref() == Some("ConditionalCheckFailed") {
            return Ok(None);
        }
        Err(sdk_error(e))
    }

    /// A transient bounce: the address's recent ones read, this one added; the limit reached
    /// sets the status in the same transaction.
    async fn apply_transient(&self, write: &FeedbackWrite) -> Result<FeedbackApplied, StoreError> {
        let key = &write.prospect;
        let pk = bounces_pk(&key.account.to_string(), &key.email_hash);
        for _ in 0..ATTEMPTS {
            let stored = self.get(pk.clone(), true).await?;
            let version: u64 = stored.as_ref().map(|item| get_n(item, "version")).transpose()?.unwrap_or(0);
            let mut times: Vec<OffsetDateTime> = match stored.as_ref().and_then(|item| item.get("times")) {
                Some(AttributeValue::L(list)) => list.iter().filter_map(|v| v.as_s().ok()).map(|t| parse_rfc3339(t)).collect::<Result<_, _>>()?,
                _ => Vec::new(),
            };
            times.retain(|at| write.now - *at < TRANSIENT_BOUNCE_WINDOW);
            times.push(write.at);
            let exhausted = transient_bounces_exhausted(&times, write.now);
            let latest = times.iter().max().copied().unwrap_or(write.now);
            let mut item = super::key(pk.clone());
            item.extend([
                ("prospect".to_owned(), s(key.prospect.to_string())),
                ("times".to_owned(), AttributeValue::L(times.iter().map(|t| s(rfc3339(*t))).collect())),
                ("version".to_owned(), n(version + 1)),
                ("expires_at".to_owned(), n((latest + TRANSIENT_BOUNCE_WINDOW).unix_timestamp())),
            ]);
            let condition = if stored.is_some() { "version = :v" } else { "attribute_not_exists(pk)" };
            let mut put = Put::builder().table_name(&self.table).set_item(Some(item)).condition_expression(condition);
            if stored.is_some() {
                put = put.expression_attribute_values(":v", n(version));
            }
            let bounces = TransactWriteItem::builder().put(put.build().map_err(StoreError::other)?).build();
            let (prospect, applied) = if exhausted {
                (self.status_update(write, ProspectStatus::Bounced, StatusReason::Bounce)?, FeedbackApplied::Applied(Some(ProspectStatus::Bounced)))
            } else {
                (self.prospect_check(write)?, FeedbackApplied::Applied(None))
            };
            if let Some(done) = self.feedback_transaction(vec![self.feedback_put(write)?, prospect, bounces], applied).await? {
                return Ok(done);
            }
        }
        Err(StoreError::other("a transient bounce met another write of the address three times"))
    }
}

#[async_trait]
impl FeedbackLog for DynamoStore {
    async fn sent_email(&self, provider_message_id: &str) -> Result<Option<EmailReference>, StoreError> {
        let Some(item) = self.get(message_pk(provider_message_id), false).await? else { return Ok(None) };
        let corrupt = || StoreError::other("stored message item names an invalid id");
        Ok(Some(EmailReference {
            account: AccountId::parse(&get_s(&item, "account")?).map_err(|_| corrupt())?,
            prospect: ProspectId::parse(&get_s(&item, "prospect")?).map_err(|_| corrupt())?,
            send: SendKey { enrollment: EnrollmentId::parse(&get_s(&item, "enrollment")?).map_err(|_| corrupt())?, step: get_n(&item, "step")? },
        }))
    }

    /// A bounce or complaint: one transaction (the `FEEDBACK#` put and the prospect's status
    /// write). A transient bounce: one read of the address's `BOUNCES#` item, then one
    /// transaction (the `FEEDBACK#` put, the prospect checked or its status set, the item).
    async fn apply_feedback(&self, write: &FeedbackWrite) -> Result<FeedbackApplied, StoreError> {
        match write.change {
            FeedbackChange::Status(status, reason) => {
                let items = vec![self.feedback_put(write)?, self.status_update(write, status, reason)?];
                for _ in 0..ATTEMPTS {
                    if let Some(done) = self.feedback_transaction(items.clone(), FeedbackApplied::Applied(Some(status))).await? {
                        return Ok(done);
                    }
                }
                Err(StoreError::other("feedback met another write of the prospect three times"))
            }
            FeedbackChange::TransientBounce => self.apply_transient(write).await,
        }
    }

    async fn record_delivery(&self, send: SendKey, at: OffsetDateTime) -> Result<bool, StoreError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(super::sends::send_pk(send))))
            .update_expression("SET delivered_at = :at")
            .condition_expression("#state = :sent")
            .set_expression_attribute_names(Some(HashMap::from([("#state".to_owned(), "state".to_owned())])))
            .expression_attribute_values(":at", s(rfc3339(at)))
            .expression_attribute_values(":sent", s("sent"))
            .send()
            .await;
        updated(result)
    }
}
