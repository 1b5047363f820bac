//! Send records: the `SEND#` items.

use async_trait::async_trait;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::types::{ConditionCheck, Put, ReturnValuesOnConditionCheckFailure, TransactWriteItem, Update};
use time::OffsetDateTime;

use super::feedback::message_item;
use super::prospects::progress_attribute;
use super::{cancellation_code, campaign_pk, get_n, get_s, key, n, prospect_pk, s, sdk_error, updated, DynamoStore, Item};
use crate::adapters::record::{rfc3339, to_json};
use crate::domain::{CampaignId, ClaimOwner, EmailReference, EnrollmentId, ProspectStatus, SendKey, SendRecord, SendState, SendTally, StepProgress};
use crate::ports::{ClaimRequest, ClaimResult, ProspectKey, SendLog, StoreError};

/// How long a send record is kept (DynamoDB TTL attribute `expires_at`): longer than any
/// campaign can run.
const SEND_RECORD_TTL_SECONDS: i64 = 400 * 24 * 3600;

pub(super) fn send_pk(key: SendKey) -> String {
    format!("SEND#{}#{}", key.enrollment, key.step)
}

fn send_record_of(item: &Item) -> Result<SendRecord, StoreError> {
    let pk = get_s(item, "pk")?;
    let corrupt = || StoreError::other("stored send record has an invalid key");
    let (enrollment, step) = pk.strip_prefix("SEND#").and_then(|rest| rest.rsplit_once('#')).ok_or_else(corrupt)?;
    let key = SendKey { enrollment: EnrollmentId::parse(enrollment).map_err(|_| corrupt())?, step: step.parse().map_err(|_| corrupt())? };
    let opt = |name: &str| item.get(name).and_then(|v| v.as_s().ok()).cloned();
    let claimed_at = crate::adapters::record::parse_rfc3339(&get_s(item, "claimed_at")?)?;
    // A record of an earlier version (a bare claim) has no state: it meant "sent".
    let name = opt("state").unwrap_or_else(|| "sent".to_owned());
    let owner = opt("owner");
    let attempts = if item.contains_key("attempts") { get_n(item, "attempts")? } else { 1 };
    let retry_at = opt("retry_at").as_deref().map(crate::adapters::record::parse_rfc3339).transpose()?;
    let state = SendState::from_parts(&name, owner.as_deref(), opt("detail"), attempts, retry_at).map_err(StoreError::other)?;
    Ok(SendRecord {
        key,
        state,
        owner: owner.as_deref().map(ClaimOwner::parse).transpose().map_err(|_| corrupt())?.unwrap_or(ClaimOwner::NIL),
        claimed_at,
        updated_at: opt("updated_at").as_deref().map(crate::adapters::record::parse_rfc3339).transpose()?.unwrap_or(claimed_at),
        attempts,
    })
}

fn build<T, E: std::error::Error + Send + Sync + 'static>(r: Result<T, E>) -> Result<T, StoreError> {
    r.map_err(StoreError::other)
}

#[async_trait]
impl SendLog for DynamoStore {
    /// One `TransactWriteItems`: a condition check that the prospect is `new` with this
    /// enrollment active, one that the campaign is at the sending version read, and the put
    /// of the claim, conditional on the step being unclaimed, retry-scheduled for this
    /// attempt, held by the failed claim this retry follows, or this very claim (a retry of
    /// the write after its answer was lost).
    async fn claim_send(&self, claim: &ClaimRequest) -> Result<ClaimResult, StoreError> {
        let now = rfc3339(claim.now);
        let prospect = build(
            ConditionCheck::builder()
                .table_name(&self.table)
                .set_key(Some(key(prospect_pk(&claim.account.to_string(), &claim.email_hash))))
                .condition_expression("id = :pid AND #status = :new AND ended_through < :seq")
                .expression_attribute_names("#status", "status")
                .expression_attribute_values(":pid", s(claim.prospect.to_string()))
                .expression_attribute_values(":new", s(ProspectStatus::New.as_str()))
                .expression_attribute_values(":seq", n(claim.enrollment_seq))
                .build(),
        )?;
        let campaign_condition =
            if claim.campaign_version == 0 { "attribute_exists(pk) AND (attribute_not_exists(sv) OR sv = :v)" } else { "sv = :v" };
        let campaign = build(
            ConditionCheck::builder()
                .table_name(&self.table)
                .set_key(Some(key(campaign_pk(claim.campaign))))
                .condition_expression(campaign_condition)
                .expression_attribute_values(":v", n(claim.campaign_version))
                .build(),
        )?;
        let mut item = key(send_pk(claim.key));
        item.insert("state".into(), s("claimed"));
        item.insert("owner".into(), s(claim.owner.to_string()));
        item.insert("campaign".into(), s(claim.campaign.to_string()));
        item.insert("attempts".into(), n(claim.attempt + 1));
        item.insert("claimed_at".into(), s(&now));
        item.insert("updated_at".into(), s(&now));
        item.insert("expires_at".into(), n(claim.now.unix_timestamp() + SEND_RECORD_TTL_SECONDS));
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression(
                "attribute_not_exists(pk) OR (#state = :retry AND attempts = :attempt) OR (#state = :claimed AND (#owner = :me OR #owner = :prev))",
            )
            .expression_attribute_names("#state", "state")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_values(":retry", s("retry_scheduled"))
            .expression_attribute_values(":attempt", n(claim.attempt))
            .expression_attribute_values(":claimed", s("claimed"))
            .expression_attribute_values(":me", s(claim.owner.to_string()))
            .expression_attribute_values(":prev", s(claim.retry_of.unwrap_or(claim.owner).to_string()))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        let items = vec![
            TransactWriteItem::builder().condition_check(prospect).build(),
            TransactWriteItem::builder().condition_check(campaign).build(),
            TransactWriteItem::builder().put(build(put.build())?).build(),
        ];
        let result = self.client.transact_write_items().set_transact_items(Some(items)).send().await;
        let Err(e) = result else { return Ok(ClaimResult::Won) };
        if let SdkError::ServiceError(se) = &e {
            if let aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError::TransactionCanceledException(tc) =
                se.err()
            {
                let failed = |i: usize| tc.cancellation_reasons().get(i).and_then(|r| r.code()) == Some("ConditionalCheckFailed");
                if failed(0) {
                    return Ok(ClaimResult::ProspectChanged);
                }
                if failed(1) {
                    return Ok(ClaimResult::CampaignChanged);
                }
                if failed(2) {
                    let old = tc.cancellation_reasons().get(2).and_then(|r| r.item()).filter(|i| !i.is_empty());
                    // Without the old item (an emulator may leave it out) it is read back.
                    let record = match old {
                        Some(item) => Some(send_record_of(item)?),
                        None => self.send_record(claim.key).await?,
                    };
                    return record.map(ClaimResult::Taken).ok_or_else(|| StoreError::other("a send record vanished while claimed"));
                }
                if tc.cancellation_reasons().iter().any(|r| r.code() == Some("TransactionConflict")) {
                    return Err(StoreError::Unavailable("the claim ran into a concurrent transaction".into()));
                }
            }
        }
        Err(sdk_error(e))
    }

    /// One `TransactWriteItems`: the record's update, conditional on the claim's owner, and
    /// the outcome kept on the prospect item (for reads of the prospect: see
    /// [`crate::domain::Prospect::progress`]), bumping its version so an upsert that read it
    /// before writes again. A prospect item gone meanwhile gets the record's update alone.
    async fn record_send(
        &self,
        prospect: &ProspectKey,
        key: SendKey,
        owner: ClaimOwner,
        state: &SendState,
        subject: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let mut update = Update::builder()
            .table_name(&self.table)
            .set_key(Some(self::key(send_pk(key))))
            .condition_expression("#state = :claimed AND #owner = :owner")
            .expression_attribute_names("#state", "state")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_values(":claimed", s("claimed"))
            .expression_attribute_values(":owner", s(owner.to_string()))
            .expression_attribute_values(":to", s(state.name()))
            .expression_attribute_values(":now", s(rfc3339(now)));
        let mut expression = "SET #state = :to, updated_at = :now".to_owned();
        if let Some(detail) = state.detail() {
            expression.push_str(", detail = :detail");
            update = update.expression_attribute_values(":detail", s(detail));
        }
        let mut retry_at = None;
        if let SendState::RetryScheduled { attempt, retry_at: at, .. } = state {
            expression.push_str(", retry_at = :retry_at, attempts = :attempts");
            update = update.expression_attribute_values(":retry_at", s(rfc3339(*at))).expression_attribute_values(":attempts", n(*attempt));
            retry_at = Some(*at);
        }
        let record = build(update.update_expression(expression).build())?;
        let progress = StepProgress {
            enrollment: key.enrollment,
            step: key.step,
            state: state.name().to_owned(),
            at: now,
            retry_at,
            message_id: matches!(state, SendState::Sent { .. }).then(|| state.detail().unwrap_or_default().to_owned()),
            subject: subject.map(str::to_owned),
        };
        let on_prospect = build(
            Update::builder()
                .table_name(&self.table)
                .set_key(Some(self::key(prospect_pk(&prospect.account.to_string(), &prospect.email_hash))))
                .condition_expression("id = :pid")
                .update_expression("SET #progress = :progress, version = version + :one")
                .expression_attribute_names("#progress", progress_attribute(key.enrollment, key.step))
                .expression_attribute_values(":pid", s(prospect.prospect.to_string()))
                .expression_attribute_values(":progress", s(to_json(&progress)))
                .expression_attribute_values(":one", n(1))
                .build(),
        )?;
        let mut items = vec![TransactWriteItem::builder().update(record.clone()).build(), TransactWriteItem::builder().update(on_prospect).build()];
        if let SendState::Sent { message_id } = state {
            // What finds the prospect and step from a notification naming only this id.
            let reference = EmailReference { account: prospect.account, prospect: prospect.prospect, send: key };
            let expires_at = now.unix_timestamp() + SEND_RECORD_TTL_SECONDS;
            let put = build(Put::builder().table_name(&self.table).set_item(Some(message_item(message_id, &reference, expires_at))).build())?;
            items.push(TransactWriteItem::builder().put(put).build());
        }
        // A write of the prospect item at the same moment (an upsert) cancels the transaction
        // with a conflict, not a failed condition: the outcome is known, so it is written again.
        let mut attempt = 0;
        let e = loop {
            let Err(e) = self.client.transact_write_items().set_transact_items(Some(items.clone())).send().await else { return Ok(true) };
            let conflict = (0..items.len()).any(|i| cancellation_code(&e, i).as_deref() == Some("TransactionConflict"));
            attempt += 1;
            if !conflict || attempt == 3 {
                break e;
            }
        };
        let failed = |i: usize| cancellation_code(&e, i).as_deref() == Some("ConditionalCheckFailed");
        if failed(0) {
            return Ok(false);
        }
        if !failed(1) {
            return Err(sdk_error(e));
        }
        // The prospect is gone (erased): the record is updated alone.
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(record.key))
            .condition_expression(record.condition_expression.unwrap_or_default())
            .update_expression(record.update_expression)
            .set_expression_attribute_names(record.expression_attribute_names)
            .set_expression_attribute_values(record.expression_attribute_values)
            .send()
            .await;
        updated(result)
    }

    async fn send_record(&self, key: SendKey) -> Result<Option<SendRecord>, StoreError> {
        self.get(send_pk(key), true).await?.as_ref().map(send_record_of).transpose()
    }

    /// A scan of the table for the campaign's send records (an operator's read, not a
    /// request's); records of earlier versions (no `campaign`) are not counted.
    async fn tally(&self, campaign: CampaignId) -> Result<SendTally, StoreError> {
        let mut tally = SendTally::default();
        let mut start = None;
        loop {
            let page = self
                .client
                .scan()
                .table_name(&self.table)
                .filter_expression("begins_with(pk, :send) AND campaign = :c")
                .projection_expression("pk, #state")
                .expression_attribute_names("#state", "state")
                .expression_attribute_values(":send", s("SEND#"))
                .expression_attribute_values(":c", s(campaign.to_string()))
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(sdk_error)?;
            for item in page.items() {
                let pk = get_s(item, "pk")?;
                let step = pk.rsplit_once('#').and_then(|(_, step)| step.parse().ok());
                let step = step.ok_or_else(|| StoreError::other("stored send record has an invalid key"))?;
                tally.add(step, &get_s(item, "state")?, 1).map_err(StoreError::other)?;
            }
            start = page.last_evaluated_key().cloned();
            if start.is_none() {
                return Ok(tally);
            }
        }
    }
}
