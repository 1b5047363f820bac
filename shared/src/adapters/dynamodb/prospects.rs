//! Prospects: the prospect items and their id and external_id pointers.

use std::collections::HashMap;

use async_trait::async_trait;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::types::{AttributeValue, Delete, KeysAndAttributes, Put, ReturnValue, TransactWriteItem};
use time::OffsetDateTime;

use super::{
    account_pk, campaign_pk, doc_of, external_pointer_pk, get_n, get_s, id_pointer_pk, key, n, prospect_pk, s, sdk_error, DynamoStore, Item,
};
use crate::adapters::record::{from_json, rfc3339, to_json, ProspectRecord};
use crate::domain::{
    Account, AccountId, CampaignId, EnrollmentId, ListPosition, ListQuery, NormalizedEmail, Prospect, ProspectId, ProspectStatus, StatusReason,
    StoredStatusChange,
};
use crate::ports::{Conflict, ListPage, ProspectRef, ProspectRepository, Replacing, StoreError, UpsertContext};

/// How many partitions of the listing index each account's prospects are spread over. A
/// partition of an index takes about 1,000 writes a second; an account inserting 3,000
/// prospects a second (and updating them as campaigns run) puts under 400 writes a second on
/// each of 8, so the index never throttles its table. A page costs one Query per shard (run
/// together), each reading up to one page of items.
pub(super) const LIST_SHARDS: u8 = 8;

/// The listing shard of a prospect: its id's first byte, spread over [`LIST_SHARDS`].
fn shard_of(id: ProspectId) -> u8 {
    id.as_bytes()[0] % LIST_SHARDS
}

fn listing_partition(account: &str, shard: u8) -> String {
    format!("PROSPECTS#{account}#{shard}")
}

fn prospect_item(r: &ProspectRecord, enroll_count: u32, position: Option<ListPosition>) -> Item {
    let mut item = HashMap::from([
        ("pk".to_owned(), s(prospect_pk(&r.account_id, &r.email_hash))),
        ("id".to_owned(), s(&r.id)),
        ("account_id".to_owned(), s(&r.account_id)),
        ("email_hash".to_owned(), s(&r.email_hash)),
        ("status".to_owned(), s(&r.status)),
        ("ended_through".to_owned(), n(r.ended_through)),
        ("enroll_count".to_owned(), n(enroll_count)),
        ("version".to_owned(), n(r.version)),
        ("updated_at".to_owned(), s(&r.updated_at)),
        ("doc".to_owned(), s(&r.doc)),
    ]);
    if let Some(ext) = &r.external_id {
        item.insert("external_id".to_owned(), s(ext));
    }
    if let Some(position) = position {
        item.insert("gsi2pk".to_owned(), s(listing_partition(&r.account_id, shard_of(position.id))));
        item.insert("gsi2sk".to_owned(), s(position.key()));
    }
    if !r.history.is_empty() {
        item.insert("history".to_owned(), AttributeValue::L(r.history.iter().map(|c| s(to_json(c))).collect()));
    }
    for step in &r.progress {
        item.insert(progress_attribute(step.enrollment, step.step), s(to_json(step)));
    }
    item
}

/// The update of a prospect item that sets its status: every status change (PATCH, the
/// unsubscribe link, the scheduler's bounce, providers' feedback) is this expression, alone
/// (`set_status`) or in a transaction. The change is appended to the history unread: its
/// `from` is the status before it (see `StoredStatusChange`), and one that changes nothing is
/// left out when read. A status other than `new` ends every enrollment.
pub(super) struct StatusWrite {
    pub expression: String,
    pub names: HashMap<String, String>,
    pub values: HashMap<String, AttributeValue>,
}

impl StatusWrite {
    pub(super) fn new(status: ProspectStatus, reason: StatusReason, now: OffsetDateTime) -> Self {
        let change = StoredStatusChange { to: status, at: now, reason };
        let mut expression =
            "SET #status = :s, updated_at = :now, version = version + :one, history = list_append(if_not_exists(history, :none), :change)".to_owned();
        if status.ends_campaigns() {
            expression.push_str(", ended_through = enroll_count");
        }
        let values = HashMap::from([
            (":s".to_owned(), s(status.as_str())),
            (":now".to_owned(), s(rfc3339(now))),
            (":one".to_owned(), n(1)),
            (":none".to_owned(), AttributeValue::L(Vec::new())),
            (":change".to_owned(), AttributeValue::L(vec![s(to_json(&change))])),
        ]);
        Self { expression, names: HashMap::from([("#status".to_owned(), "status".to_owned())]), values }
    }
}

/// The prospect item's attribute holding one step's recorded outcome.
pub(super) fn progress_attribute(enrollment: EnrollmentId, step: u32) -> String {
    format!("{PROGRESS_PREFIX}{enrollment}#{step}")
}

const PROGRESS_PREFIX: &str = "step#";

fn prospect_from_item(item: &Item) -> Result<Prospect, StoreError> {
    ProspectRecord {
        id: get_s(item, "id")?,
        account_id: get_s(item, "account_id")?,
        email_hash: get_s(item, "email_hash")?,
        external_id: item.get("external_id").and_then(|v| v.as_s().ok()).cloned(),
        status: get_s(item, "status")?,
        ended_through: get_n(item, "ended_through")?,
        version: get_n(item, "version")?,
        updated_at: get_s(item, "updated_at")?,
        doc: get_s(item, "doc")?,
        history: match item.get("history") {
            Some(AttributeValue::L(entries)) => {
                entries.iter().map(|e| e.as_s().map_err(|_| StoreError::other("stored status history is not text")).and_then(|raw| from_json(raw, "status history"))).collect::<Result<_, _>>()?
            }
            _ => Vec::new(),
        },
        progress: item
            .iter()
            .filter(|(name, _)| name.starts_with(PROGRESS_PREFIX))
            .map(|(_, v)| v.as_s().map_err(|_| StoreError::other("stored step progress is not text")).and_then(|raw| from_json(raw, "step progress")))
            .collect::<Result<_, _>>()?,
    }
    .into_prospect()
}

/// A pointer to the prospect item `target`, with what its sibling pointer is keyed by
/// (`sibling`: the id pointer names the external_id, if any; the external_id pointer the id),
/// so an erasure finds every item of the prospect from the one pointer it reads.
fn pointer_item(pk: String, target: &str, sibling: (&str, Option<&str>)) -> Item {
    let mut item = HashMap::from([("pk".to_owned(), s(pk)), ("target".to_owned(), s(target)), ("links".to_owned(), AttributeValue::Bool(true))]);
    if let (name, Some(value)) = sibling {
        item.insert(name.to_owned(), s(value));
    }
    item
}

/// The Put of a new pointer (see [`pointer_item`]), conditional on there being none.
fn pointer_put(table: &str, pk: String, target: &str, sibling: (&str, Option<&str>)) -> Result<TransactWriteItem, StoreError> {
    let item = pointer_item(pk, target, sibling);
    let put = Put::builder()
        .table_name(table)
        .set_item(Some(item))
        .condition_expression("attribute_not_exists(pk)")
        .build()
        .map_err(StoreError::other)?;
    Ok(TransactWriteItem::builder().put(put).build())
}

#[async_trait]
impl ProspectRepository for DynamoStore {
    async fn upsert_context(
        &self,
        account: AccountId,
        email: &NormalizedEmail,
        campaign: Option<CampaignId>,
    ) -> Result<UpsertContext, StoreError> {
        let prospect_key = prospect_pk(&account.to_string(), email.key_hash());
        let suppression_key = suppression_pk(&account.to_string(), email.key_hash());
        let mut keys = vec![key(&prospect_key), key(account_pk(account)), key(&suppression_key)];
        if let Some(c) = campaign {
            keys.push(key(campaign_pk(c)));
        }
        let mut found: Vec<Item> = Vec::new();
        for _ in 0..3 {
            let request = KeysAndAttributes::builder().set_keys(Some(keys)).consistent_read(true).build().map_err(StoreError::other)?;
            let out = self
                .client
                .batch_get_item()
                .request_items(&self.table, request)
                .send()
                .await
                .map_err(sdk_error)?;
            found.extend(out.responses.and_then(|mut r| r.remove(&self.table)).unwrap_or_default());
            keys = out.unprocessed_keys.and_then(|mut u| u.remove(&self.table)).map(|k| k.keys).unwrap_or_default();
            if keys.is_empty() {
                break;
            }
        }
        if !keys.is_empty() {
            return Err(StoreError::Unavailable("batch read left keys unprocessed".into()));
        }
        let mut ctx = UpsertContext::default();
        for item in &found {
            let pk = get_s(item, "pk")?;
            if pk == prospect_key {
                ctx.prospect = Some(prospect_from_item(item)?);
            } else if pk == suppression_key {
                ctx.suppressed = true;
            } else if pk.starts_with("ACCOUNT#") {
                ctx.default_campaign_id = doc_of::<Account>(item)?.default_campaign_id;
            } else {
                ctx.requested_campaign = Some(doc_of(item)?);
            }
        }
        Ok(ctx)
    }

    async fn insert(&self, prospect: Prospect) -> Result<(), StoreError> {
        let r = ProspectRecord::from_prospect(&prospect, 1);
        let pk = prospect_pk(&r.account_id, &r.email_hash);
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(prospect_item(&r, prospect.enrollment_count(), Some(ListPosition::of(prospect.created_at, prospect.id)))))
            .condition_expression("attribute_not_exists(pk)")
            .build()
            .map_err(StoreError::other)?;
        let id_pointer = pointer_put(&self.table, id_pointer_pk(&r.account_id, &r.id), &pk, ("external_id", r.external_id.as_deref()))?;
        let mut items = vec![TransactWriteItem::builder().put(put).build(), id_pointer];
        let mut conflicts = vec![Conflict::Email, Conflict::Email];
        if let Some(ext) = &r.external_id {
            items.push(pointer_put(&self.table, external_pointer_pk(&r.account_id, ext), &pk, ("id", Some(&r.id)))?);
            conflicts.push(Conflict::ExternalId);
        }
        self.transact(items, &conflicts).await
    }

    async fn update(&self, previous: Replacing, updated: Prospect) -> Result<(), StoreError> {
        let r = ProspectRecord::from_prospect(&updated, previous.version + 1);
        let pk = prospect_pk(&r.account_id, &r.email_hash);
        let item = prospect_item(&r, updated.enrollment_count(), Some(ListPosition::of(updated.created_at, updated.id)));
        let version = n(previous.version);
        if previous.external_id == updated.external_id {
            let result = self
                .client
                .put_item()
                .table_name(&self.table)
                .set_item(Some(item))
                .condition_expression("version = :v")
                .expression_attribute_values(":v", version)
                .send()
                .await;
            return match result {
                Ok(_) => Ok(()),
                Err(SdkError::ServiceError(se)) if se.err().is_conditional_check_failed_exception() => {
                    Err(StoreError::Conflict(Conflict::Version))
                }
                Err(e) => Err(sdk_error(e)),
            };
        }
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("version = :v")
            .expression_attribute_values(":v", version)
            .build()
            .map_err(StoreError::other)?;
        let mut items = vec![TransactWriteItem::builder().put(put).build()];
        let mut conflicts = vec![Conflict::Version];
        if let Some(old) = &previous.external_id {
            let delete = Delete::builder()
                .table_name(&self.table)
                .set_key(Some(key(external_pointer_pk(&r.account_id, old.as_str()))))
                .build()
                .map_err(StoreError::other)?;
            items.push(TransactWriteItem::builder().delete(delete).build());
            conflicts.push(Conflict::Version);
        }
        if let Some(new) = &r.external_id {
            items.push(pointer_put(&self.table, external_pointer_pk(&r.account_id, new), &pk, ("id", Some(&r.id)))?);
            conflicts.push(Conflict::ExternalId);
        }
        // The id pointer names the new external_id (the prospect item's condition covers it).
        let id_pointer = Put::builder()
            .table_name(&self.table)
            .set_item(Some(pointer_item(id_pointer_pk(&r.account_id, &r.id), &pk, ("external_id", r.external_id.as_deref()))))
            .build()
            .map_err(StoreError::other)?;
        items.push(TransactWriteItem::builder().put(id_pointer).build());
        conflicts.push(Conflict::Version);
        self.transact(items, &conflicts).await
    }

    async fn set_status(
        &self,
        account: AccountId,
        prospect: &ProspectRef,
        status: ProspectStatus,
        reason: StatusReason,
        now: OffsetDateTime,
    ) -> Result<Option<Prospect>, StoreError> {
        let Some(pk) = self.resolve(account, prospect).await? else { return Ok(None) };
        let change = StatusWrite::new(status, reason, now);
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(pk)))
            .update_expression(change.expression)
            .condition_expression("attribute_exists(pk) AND account_id = :account")
            .set_expression_attribute_names(Some(change.names))
            .set_expression_attribute_values(Some(change.values))
            .expression_attribute_values(":account", s(account.to_string()))
            .return_values(ReturnValue::AllNew)
            .send()
            .await;
        match result {
            Ok(out) => out.attributes.as_ref().map(prospect_from_item).transpose(),
            Err(SdkError::ServiceError(se)) if se.err().is_conditional_check_failed_exception() => Ok(None),
            Err(e) => Err(sdk_error(e)),
        }
    }

    async fn find(&self, account: AccountId, prospect: &ProspectRef) -> Result<Option<Prospect>, StoreError> {
        let Some(pk) = self.resolve(account, prospect).await? else { return Ok(None) };
        let Some(item) = self.get(pk, true).await? else { return Ok(None) };
        let p = prospect_from_item(&item)?;
        Ok((p.account_id == account).then_some(p))
    }

    /// One read (the pointer, which names the sibling pointer; or the prospect item, read by
    /// address) and one transaction: the prospect item and both pointers deleted, conditional
    /// on the item still being this prospect with that external_id, and the suppression entry
    /// put. Send records keep no address or field, so they stay (their TTL ends them).
    async fn erase(&self, account: AccountId, prospect: &ProspectRef, now: OffsetDateTime) -> Result<Option<ProspectId>, StoreError> {
        let acc = account.to_string();
        // A failed condition means what was read changed (an external_id moved, a concurrent
        // write): the next attempt reads the item itself.
        for attempt in 0..3 {
            let found = if attempt == 0 { self.erasure_keys(&acc, prospect).await? } else { self.erasure_keys_from_item(&acc, prospect).await? };
            let Some(ErasureKeys { target, id, external_id }) = found else { return Ok(None) };
            let email_hash = target.rsplit('#').next().unwrap_or_default().to_owned();
            let mut condition = "id = :pid".to_owned();
            let mut delete = Delete::builder().table_name(&self.table).set_key(Some(key(&target))).expression_attribute_values(":pid", s(&id));
            match &external_id {
                Some(ext) => {
                    condition.push_str(" AND external_id = :ext");
                    delete = delete.expression_attribute_values(":ext", s(ext));
                }
                None => condition.push_str(" AND attribute_not_exists(external_id)"),
            }
            let delete_pointer = |pk: String| Delete::builder().table_name(&self.table).set_key(Some(key(pk))).build().map_err(StoreError::other);
            let mut suppression = key(suppression_pk(&acc, &email_hash));
            suppression.insert("reason".into(), s("erased"));
            suppression.insert("at".into(), s(rfc3339(now)));
            let mut items = vec![
                TransactWriteItem::builder().delete(delete.condition_expression(condition).build().map_err(StoreError::other)?).build(),
                TransactWriteItem::builder().delete(delete_pointer(id_pointer_pk(&acc, &id))?).build(),
                TransactWriteItem::builder().put(Put::builder().table_name(&self.table).set_item(Some(suppression)).build().map_err(StoreError::other)?).build(),
            ];
            if let Some(ext) = &external_id {
                items.push(TransactWriteItem::builder().delete(delete_pointer(external_pointer_pk(&acc, ext))?).build());
            }
            let conflicts = vec![Conflict::Version; items.len()];
            match self.transact(items, &conflicts).await {
                Ok(()) => return ProspectId::parse(&id).map(Some).map_err(|_| StoreError::other("stored prospect has an invalid id")),
                Err(StoreError::Conflict(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Unavailable("the prospect kept changing during its erasure".into()))
    }

    /// One Query per listing shard, together, each newest first from the position, paging
    /// on within its shard until it has a page of prospects that pass the filters (or none
    /// is left); the shards' pages are merged and the newest `limit` returned.
    async fn list(&self, query: &ListQuery) -> Result<ListPage, StoreError> {
        let limit = usize::try_from(query.limit).unwrap_or(usize::MAX);
        let shards = (0..LIST_SHARDS).map(|shard| self.list_shard(query, shard, limit + 1));
        let mut found: Vec<(ListPosition, Prospect)> = Vec::new();
        for shard in futures::future::join_all(shards).await {
            found.extend(shard?);
        }
        found.sort_by_key(|(position, _)| std::cmp::Reverse(*position));
        let has_more = found.len() > limit;
        Ok(ListPage { prospects: found.into_iter().take(limit).map(|(_, p)| p).collect(), has_more })
    }
}

impl DynamoStore {
    /// Up to `wanted` prospects of one listing shard that pass the query, newest first.
    async fn list_shard(&self, query: &ListQuery, shard: u8, wanted: usize) -> Result<Vec<(ListPosition, Prospect)>, StoreError> {
        let before = query.before.map_or_else(|| "~".to_owned(), |p| p.key());
        // The creation filter to the millisecond here; to the nanosecond in `admits`.
        let after = query.created_after.map_or_else(|| "0".to_owned(), |t| format!("{:015}#", crate::domain::millis(t).max(0)));
        let mut found = Vec::new();
        let mut start = None;
        loop {
            let page = self
                .client
                .query()
                .table_name(&self.table)
                .index_name(super::GSI2)
                .key_condition_expression("gsi2pk = :p AND gsi2sk BETWEEN :after AND :before")
                .expression_attribute_values(":p", s(listing_partition(&query.account.to_string(), shard)))
                .expression_attribute_values(":after", s(after.clone()))
                .expression_attribute_values(":before", s(before.clone()))
                .scan_index_forward(false)
                .limit(i32::try_from(wanted.min(1000)).unwrap_or(1000))
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(sdk_error)?;
            for item in page.items() {
                let position = ListPosition::parse_key(&get_s(item, "gsi2sk")?).ok_or_else(|| StoreError::other("stored listing key is invalid"))?;
                // BETWEEN includes both ends: the position itself was on the previous page.
                if query.before == Some(position) {
                    continue;
                }
                let prospect = prospect_from_item(item)?;
                if prospect.account_id == query.account && query.admits(&prospect) {
                    found.push((position, prospect));
                }
            }
            start = page.last_evaluated_key().cloned();
            if found.len() >= wanted || start.is_none() {
                found.truncate(wanted);
                return Ok(found);
            }
        }
    }
}

/// The id a reference by id names (empty for any other reference).
fn pointer_id(by: &ProspectRef) -> String {
    match by {
        ProspectRef::Id(id) => id.to_string(),
        _ => String::new(),
    }
}

/// The suppression entry of an erased address.
fn suppression_pk(account: &str, email_hash: &str) -> String {
    format!("SUPPRESS#{account}#{email_hash}")
}

/// Every key an erasure deletes: the prospect item's, its id's and its external_id's.
struct ErasureKeys {
    target: String,
    id: String,
    external_id: Option<String>,
}

impl DynamoStore {
    /// The erasure keys from the one pointer (or item) `by` names; from the item when the
    /// pointer was written before pointers named their sibling.
    async fn erasure_keys(&self, account: &str, by: &ProspectRef) -> Result<Option<ErasureKeys>, StoreError> {
        let (pointer, sibling) = match by {
            ProspectRef::Id(id) => (id_pointer_pk(account, &id.to_string()), "external_id"),
            ProspectRef::ExternalId(ext) => (external_pointer_pk(account, ext.as_str()), "id"),
            ProspectRef::Email(_) | ProspectRef::EmailHash(_) => return self.erasure_keys_from_item(account, by).await,
        };
        let Some(item) = self.get(pointer, true).await? else { return Ok(None) };
        if !item.contains_key("links") {
            return self.erasure_keys_from_item(account, by).await;
        }
        let target = get_s(&item, "target")?;
        let sibling = item.get(sibling).and_then(|v| v.as_s().ok()).cloned();
        Ok(Some(if let ProspectRef::ExternalId(ext) = by {
            let id = sibling.ok_or_else(|| StoreError::other("an external_id pointer names no id"))?;
            ErasureKeys { target, id, external_id: Some(ext.as_str().to_owned()) }
        } else {
            ErasureKeys { target, id: pointer_id(by), external_id: sibling }
        }))
    }

    /// The erasure keys from the prospect item itself.
    async fn erasure_keys_from_item(&self, account: &str, by: &ProspectRef) -> Result<Option<ErasureKeys>, StoreError> {
        let Some(target) = self.resolve(AccountId::parse(account).map_err(StoreError::other)?, by).await? else { return Ok(None) };
        let Some(item) = self.get(target.clone(), true).await? else { return Ok(None) };
        if get_s(&item, "account_id")? != account {
            return Ok(None);
        }
        Ok(Some(ErasureKeys { target, id: get_s(&item, "id")?, external_id: item.get("external_id").and_then(|v| v.as_s().ok()).cloned() }))
    }
}
