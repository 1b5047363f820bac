//! The AWS storage backend: one DynamoDB table with a string partition key `pk`.
//!
//! | item | `pk` | holds |
//! |---|---|---|
//! | prospect | `PROSPECT#{account}#{sha256(normalized email)}` | top-level status/version attributes + JSON `doc` |
//! | id pointer | `PID#{account}#{prospect_id}` | `target`: the prospect's `pk` |
//! | external_id pointer | `EXT#{account}#{external_id}` | `target`: the prospect's `pk` |
//! | account | `ACCOUNT#{id}` | JSON `doc` |
//! | key | `KEY#{sha256(key)}` | JSON `doc`; `gsi1pk` = `ACCOUNT#{id}#KEYS` |
//! | key id pointer | `KEYID#{key_id}` | `hash` |
//! | campaign | `CAMPAIGN#{id}` | JSON `doc`; `sv` (sending version); `gsi1pk` = `ACCOUNT#{id}#CAMPAIGNS` |
//! | send record | `SEND#{enrollment_id}#{step}` | `state`, `owner`, `detail`, `attempts`, `retry_at`, `claimed_at`, `updated_at`; `expires_at` (TTL) |
//! | idempotency record | `IDEM#{account}#{sha256(key)}` | `fingerprint`, `status`, `body`, `lease_until`; `expires_at` (TTL) |
//! | rate-limit bucket | `RATE#{key_id}` | `tat` (GCRA, Unix nanoseconds); `expires_at` (TTL) |
//!
//! Every prospect has its own partition (account + email), so one large account never
//! concentrates writes on one key. Lookups by id or external_id go through pointer items read
//! with strong consistency (never an index), so a PATCH right after a POST always finds it.
//! Uniqueness of email and external_id is enforced by conditional writes in one transaction.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{
    AttributeValue, ConditionCheck, Delete, KeysAndAttributes, Put, ReturnValue, ReturnValuesOnConditionCheckFailure,
    TransactWriteItem,
};
use aws_sdk_dynamodb::Client;
use time::OffsetDateTime;

use super::record::{rfc3339, ProspectRecord};
use crate::domain::{
    Account, AccountId, ApiKeyRecord, Campaign, CampaignId, KeyHash, KeyId, NormalizedEmail, Prospect,
    ProspectStatus,
};
use crate::domain::{
    ceil_seconds, gcra_take, lease_size, ClaimOwner, EnrollmentId, SendKey, SendRecord, SendState, LEASE_LIFETIME, IdempotencyBegin, IdempotencyKey, RateDecision, RateLimit, StoredResponse, IDEMPOTENCY_TTL,
    IN_FLIGHT_LEASE,
};
use crate::ports::{
    AdminStore, ClaimRequest, ClaimResult, Conflict, IdempotencyStore, KeyStore, ProspectRef, ProspectRepository, RateLimiter, Replacing, SendLog,
    StoreError, UpsertContext,
};

/// How long a send record is kept (DynamoDB TTL attribute `expires_at`): longer than any
/// campaign can run.
const SEND_RECORD_TTL_SECONDS: i64 = 400 * 24 * 3600;

/// Name of the table's one global secondary index (keys and campaigns by account).
pub const GSI1: &str = "gsi1";
type Item = HashMap<String, AttributeValue>;

/// Error codes that mean "try again later", not "broken".
const RETRYABLE_CODES: [&str; 7] = [
    "ProvisionedThroughputExceededException",
    "ThrottlingException",
    "RequestLimitExceeded",
    "InternalServerError",
    "ServiceUnavailable",
    "LimitExceededException",
    "TransactionInProgressException",
];

/// Translates an SDK failure: throttling, timeouts and unreachable endpoints are
/// [`StoreError::Unavailable`]; anything else [`StoreError::Other`].
pub(crate) fn sdk_error<E>(e: SdkError<E, aws_sdk_dynamodb::config::http::HttpResponse>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let retryable = match &e {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => true,
        SdkError::ServiceError(se) => {
            se.raw().status().is_server_error() || se.err().code().is_some_and(|c| RETRYABLE_CODES.contains(&c))
        }
        _ => false,
    };
    if retryable {
        StoreError::Unavailable(Box::new(e))
    } else {
        StoreError::Other(Box::new(e))
    }
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn key(pk: impl Into<String>) -> Item {
    HashMap::from([("pk".to_owned(), s(pk))])
}

fn get_s(item: &Item, name: &str) -> Result<String, StoreError> {
    match item.get(name) {
        Some(AttributeValue::S(v)) => Ok(v.clone()),
        _ => Err(StoreError::other(format!("item lacks string attribute {name}"))),
    }
}

fn get_n<T: std::str::FromStr>(item: &Item, name: &str) -> Result<T, StoreError> {
    match item.get(name) {
        Some(AttributeValue::N(v)) => v.parse().map_err(|_| StoreError::other(format!("attribute {name} is not a number"))),
        _ => Err(StoreError::other(format!("item lacks number attribute {name}"))),
    }
}

fn doc_of<T: serde::de::DeserializeOwned>(item: &Item) -> Result<T, StoreError> {
    serde_json::from_str(&get_s(item, "doc")?).map_err(StoreError::other)
}

fn to_doc<T: serde::Serialize>(v: &T) -> Result<AttributeValue, StoreError> {
    serde_json::to_string(v).map(s).map_err(StoreError::other)
}

/// A key item: its document, with `last_used_at` kept as its own attribute (so recording a
/// use is one small update).
fn key_record_of(item: &Item) -> Result<ApiKeyRecord, StoreError> {
    let mut record: ApiKeyRecord = doc_of(item)?;
    if let Ok(t) = get_s(item, "last_used_at") {
        record.last_used_at = Some(super::record::parse_rfc3339(&t)?);
    }
    Ok(record)
}

fn prospect_pk(account: &str, email_hash: &str) -> String {
    format!("PROSPECT#{account}#{email_hash}")
}

fn id_pointer_pk(account: &str, id: &str) -> String {
    format!("PID#{account}#{id}")
}

fn external_pointer_pk(account: &str, external_id: &str) -> String {
    format!("EXT#{account}#{external_id}")
}

fn account_pk(id: AccountId) -> String {
    format!("ACCOUNT#{id}")
}

fn campaign_pk(id: CampaignId) -> String {
    format!("CAMPAIGN#{id}")
}

fn key_pk(hash: &str) -> String {
    format!("KEY#{hash}")
}

fn key_id_pk(id: KeyId) -> String {
    format!("KEYID#{id}")
}

fn prospect_item(r: &ProspectRecord, enroll_count: u32) -> Item {
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
    item
}

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
    }
    .into_prospect()
}

fn pointer_put(table: &str, pk: String, target: &str) -> Result<TransactWriteItem, StoreError> {
    let put = Put::builder()
        .table_name(table)
        .set_item(Some(HashMap::from([("pk".to_owned(), s(pk)), ("target".to_owned(), s(target))])))
        .condition_expression("attribute_not_exists(pk)")
        .build()
        .map_err(StoreError::other)?;
    Ok(TransactWriteItem::builder().put(put).build())
}

/// The DynamoDB store.
#[derive(Clone, Debug)]
pub struct DynamoStore {
    client: Client,
    table: String,
}

impl DynamoStore {
    #[must_use]
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self { client, table: table.into() }
    }

    async fn get(&self, pk: String, consistent: bool) -> Result<Option<Item>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key(pk)))
            .consistent_read(consistent)
            .send()
            .await
            .map_err(sdk_error)?;
        Ok(out.item)
    }

    async fn put(&self, item: Item, condition: Option<&str>) -> Result<(), StoreError> {
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .set_condition_expression(condition.map(str::to_owned))
            .send()
            .await
            .map_err(sdk_error)?;
        Ok(())
    }

    /// Runs a transaction; a cancelled one maps the first failed condition through `conflicts`
    /// (by item index), and a transaction conflict to [`Conflict::Version`].
    async fn transact(&self, items: Vec<TransactWriteItem>, conflicts: &[Conflict]) -> Result<(), StoreError> {
        let result = self.client.transact_write_items().set_transact_items(Some(items)).send().await;
        let Err(e) = result else { return Ok(()) };
        if let SdkError::ServiceError(se) = &e {
            if let aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError::TransactionCanceledException(tc) =
                se.err()
            {
                for (i, reason) in tc.cancellation_reasons().iter().enumerate() {
                    match reason.code() {
                        Some("ConditionalCheckFailed") => {
                            return Err(StoreError::Conflict(conflicts.get(i).copied().unwrap_or(Conflict::Version)));
                        }
                        Some("TransactionConflict") => return Err(StoreError::Conflict(Conflict::Version)),
                        _ => {}
                    }
                }
            }
        }
        Err(sdk_error(e))
    }

    /// The prospect `pk` a reference resolves to (one strongly consistent read for a pointer).
    async fn resolve(&self, account: AccountId, by: &ProspectRef) -> Result<Option<String>, StoreError> {
        let acc = account.to_string();
        let pointer = match by {
            ProspectRef::Email(email) => return Ok(Some(prospect_pk(&acc, email.key_hash()))),
            ProspectRef::EmailHash(hash) => return Ok(Some(prospect_pk(&acc, hash))),
            ProspectRef::Id(id) => id_pointer_pk(&acc, &id.to_string()),
            ProspectRef::ExternalId(ext) => external_pointer_pk(&acc, ext.as_str()),
        };
        self.get(pointer, true).await?.map(|item| get_s(&item, "target")).transpose()
    }

    async fn query_gsi(&self, gsi1pk: String) -> Result<Vec<Item>, StoreError> {
        let mut items = Vec::new();
        let mut start = None;
        loop {
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .index_name(GSI1)
                .key_condition_expression("gsi1pk = :p")
                .expression_attribute_values(":p", s(&gsi1pk))
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(sdk_error)?;
            items.extend(out.items.unwrap_or_default());
            start = out.last_evaluated_key;
            if start.is_none() {
                return Ok(items);
            }
        }
    }
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
        let mut keys = vec![key(&prospect_key), key(account_pk(account))];
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
            .set_item(Some(prospect_item(&r, prospect.enrollment_count())))
            .condition_expression("attribute_not_exists(pk)")
            .build()
            .map_err(StoreError::other)?;
        let mut items = vec![TransactWriteItem::builder().put(put).build(), pointer_put(&self.table, id_pointer_pk(&r.account_id, &r.id), &pk)?];
        let mut conflicts = vec![Conflict::Email, Conflict::Email];
        if let Some(ext) = &r.external_id {
            items.push(pointer_put(&self.table, external_pointer_pk(&r.account_id, ext), &pk)?);
            conflicts.push(Conflict::ExternalId);
        }
        self.transact(items, &conflicts).await
    }

    async fn update(&self, previous: Replacing, updated: Prospect) -> Result<(), StoreError> {
        let r = ProspectRecord::from_prospect(&updated, previous.version + 1);
        let pk = prospect_pk(&r.account_id, &r.email_hash);
        let item = prospect_item(&r, updated.enrollment_count());
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
            items.push(pointer_put(&self.table, external_pointer_pk(&r.account_id, new), &pk)?);
            conflicts.push(Conflict::ExternalId);
        }
        self.transact(items, &conflicts).await
    }

    async fn set_status(
        &self,
        account: AccountId,
        prospect: &ProspectRef,
        status: ProspectStatus,
        now: OffsetDateTime,
    ) -> Result<Option<Prospect>, StoreError> {
        let Some(pk) = self.resolve(account, prospect).await? else { return Ok(None) };
        let mut expression = "SET #status = :s, updated_at = :now, version = version + :one".to_owned();
        if status.ends_campaigns() {
            expression.push_str(", ended_through = enroll_count");
        }
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(pk)))
            .update_expression(expression)
            .condition_expression("attribute_exists(pk) AND account_id = :account")
            .expression_attribute_names("#status", "status")
            .expression_attribute_values(":s", s(status.as_str()))
            .expression_attribute_values(":now", s(rfc3339(now)))
            .expression_attribute_values(":one", n(1))
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
}

#[async_trait]
impl KeyStore for DynamoStore {
    async fn find_key(&self, hash: &KeyHash) -> Result<Option<ApiKeyRecord>, StoreError> {
        self.get(key_pk(hash.as_str()), false).await?.as_ref().map(key_record_of).transpose()
    }

    async fn touch_key(&self, hash: &KeyHash, now: OffsetDateTime) -> Result<(), StoreError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(key_pk(hash.as_str()))))
            .update_expression("SET last_used_at = :t")
            .condition_expression("attribute_exists(pk)")
            .expression_attribute_values(":t", s(rfc3339(now)))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(SdkError::ServiceError(se)) if se.err().is_conditional_check_failed_exception() => Ok(()),
            Err(e) => Err(sdk_error(e)),
        }
    }
}

fn epoch_ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

fn idempotency_pk(account: AccountId, key: &IdempotencyKey) -> String {
    format!("IDEM#{account}#{}", key.hash())
}

#[async_trait]
impl IdempotencyStore for DynamoStore {
    async fn begin(
        &self,
        account: AccountId,
        key: &IdempotencyKey,
        fingerprint: &str,
        now: OffsetDateTime,
    ) -> Result<IdempotencyBegin, StoreError> {
        let pk = idempotency_pk(account, key);
        let mut item = self::key(&pk);
        item.insert("fingerprint".into(), s(fingerprint));
        item.insert("lease_until".into(), n(epoch_ms(now + IN_FLIGHT_LEASE)));
        item.insert("expires_at".into(), n((now + IDEMPOTENCY_TTL).unix_timestamp()));
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression(
                "attribute_not_exists(pk) OR expires_at <= :now_s OR (attribute_not_exists(#status) AND lease_until <= :now_ms)",
            )
            .expression_attribute_names("#status", "status")
            .expression_attribute_values(":now_s", n(now.unix_timestamp()))
            .expression_attribute_values(":now_ms", n(epoch_ms(now)))
            .return_values_on_condition_check_failure(aws_sdk_dynamodb::types::ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        let old = match result {
            Ok(_) => return Ok(IdempotencyBegin::Started),
            Err(SdkError::ServiceError(se)) if se.err().is_conditional_check_failed_exception() => match se.err() {
                aws_sdk_dynamodb::operation::put_item::PutItemError::ConditionalCheckFailedException(e) => e.item().cloned(),
                _ => None,
            },
            Err(e) => return Err(sdk_error(e)),
        };
        let old = match old {
            Some(item) => item,
            None => match self.get(pk, true).await? {
                Some(item) => item,
                None => return Ok(IdempotencyBegin::InFlight),
            },
        };
        if get_s(&old, "fingerprint")? != fingerprint {
            return Ok(IdempotencyBegin::Mismatch);
        }
        match old.get("status") {
            None => Ok(IdempotencyBegin::InFlight),
            Some(_) => Ok(IdempotencyBegin::Replay(StoredResponse { status: get_n(&old, "status")?, body: get_s(&old, "body")? })),
        }
    }

    async fn finish(&self, account: AccountId, key: &IdempotencyKey, response: &StoredResponse, now: OffsetDateTime) -> Result<(), StoreError> {
        self.client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(self::key(idempotency_pk(account, key))))
            .update_expression("SET #status = :st, body = :b, expires_at = :exp")
            .expression_attribute_names("#status", "status")
            .expression_attribute_values(":st", n(response.status))
            .expression_attribute_values(":b", s(&response.body))
            .expression_attribute_values(":exp", n((now + IDEMPOTENCY_TTL).unix_timestamp()))
            .send()
            .await
            .map_err(sdk_error)?;
        Ok(())
    }

    async fn abandon(&self, account: AccountId, key: &IdempotencyKey) -> Result<(), StoreError> {
        self.client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(self::key(idempotency_pk(account, key))))
            .send()
            .await
            .map_err(sdk_error)?;
        Ok(())
    }
}

/// Rate limiting across Lambda instances: GCRA buckets in the table, taken a few requests at
/// a time. One conditional write moves a key's TAT forward by [`lease_size`] intervals at once
/// (fewer if the bucket holds fewer), and the instance admits that many requests locally, for
/// at most [`LEASE_LIFETIME`], before it writes again: a request costs 1/[`lease_size`] bucket
/// writes on average (1/5 at the default limit). A small limit leases 1 at a time: every
/// request writes, and the limit is exact.
///
/// The limit still holds across instances: a lease is paid for in the shared bucket before it
/// is used, and what an instance leased but did not use within the lifetime is dropped, so in
/// any window a key gets at most its burst plus one lifetime's worth of its rate (the lease an
/// instance still holds when the bucket refills). A key spread over many idle instances gets
/// somewhat less than its limit (their unused leases), never more.
///
/// Each instance remembers the last TAT it saw per key; only when another instance moved the
/// bucket meanwhile does the failed write return the current TAT and another write follow. A
/// request denied by the remembered TAT costs no call: other instances only move a TAT
/// forward, so the denial stands. Requests of one key in one instance take turns. Should the
/// bucket stay contended past [`RATE_LIMIT_WRITE_ATTEMPTS`], the request is let through (and
/// logged): the limiter never makes the API unavailable.
#[derive(Debug)]
pub struct DynamoRateLimiter {
    client: Client,
    table: String,
    seen: std::sync::Mutex<HashMap<crate::domain::KeyId, Arc<tokio::sync::Mutex<Bucket>>>>,
}

/// What an instance knows of one key's bucket.
#[derive(Debug, Default)]
struct Bucket {
    /// The TAT this instance last wrote or saw.
    tat: Option<OffsetDateTime>,
    lease: Option<Lease>,
}

/// Requests taken from the shared bucket and not used yet.
#[derive(Debug, Clone, Copy)]
struct Lease {
    left: u32,
    until: OffsetDateTime,
    /// What the shared bucket held after the lease was taken (for `RateLimit-Remaining`).
    bucket_left: u32,
}

/// Conditional writes one request may spend on its rate-limit bucket.
pub const RATE_LIMIT_WRITE_ATTEMPTS: usize = 3;

impl DynamoRateLimiter {
    #[must_use]
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self { client, table: table.into(), seen: std::sync::Mutex::new(HashMap::new()) }
    }

    fn bucket(&self, key: crate::domain::KeyId) -> Arc<tokio::sync::Mutex<Bucket>> {
        match self.seen.lock() {
            Ok(mut m) => Arc::clone(m.entry(key).or_default()),
            Err(_) => Arc::default(),
        }
    }

    /// Writes `new_tat` if the bucket still holds `seen` (or, when `seen` is past, nothing
    /// newer than `now`). `Ok(None)` when written; `Ok(Some(current))` when another instance
    /// moved it.
    async fn write_tat(
        &self,
        key_id: crate::domain::KeyId,
        seen: Option<OffsetDateTime>,
        new_tat: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<Option<Option<OffsetDateTime>>, StoreError> {
        let now_nanos = now.unix_timestamp_nanos();
        let mut request = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(format!("RATE#{key_id}"))))
            .update_expression("SET tat = :new, expires_at = :exp")
            .expression_attribute_values(":new", n(new_tat.unix_timestamp_nanos()))
            .expression_attribute_values(":exp", n(new_tat.unix_timestamp() + 3600))
            .return_values_on_condition_check_failure(aws_sdk_dynamodb::types::ReturnValuesOnConditionCheckFailure::AllOld);
        request = match seen.filter(|t| t.unix_timestamp_nanos() > now_nanos) {
            Some(t) => request.condition_expression("tat = :seen").expression_attribute_values(":seen", n(t.unix_timestamp_nanos())),
            None => request
                .condition_expression("attribute_not_exists(tat) OR tat <= :now")
                .expression_attribute_values(":now", n(now_nanos)),
        };
        match request.send().await {
            Ok(_) => Ok(None),
            Err(SdkError::ServiceError(se)) if se.err().is_conditional_check_failed_exception() => {
                let current = match se.err() {
                    aws_sdk_dynamodb::operation::update_item::UpdateItemError::ConditionalCheckFailedException(e) => {
                        e.item().and_then(|item| get_n::<i128>(item, "tat").ok())
                    }
                    _ => None,
                };
                let current = match current {
                    Some(nanos) => Some(nanos),
                    None => self.get_tat(key_id).await?,
                };
                Ok(Some(current.and_then(|nanos| OffsetDateTime::from_unix_timestamp_nanos(nanos).ok())))
            }
            Err(e) => Err(sdk_error(e)),
        }
    }
}

#[async_trait]
impl RateLimiter for DynamoRateLimiter {
    async fn check(&self, key_id: crate::domain::KeyId, limit: RateLimit, now: OffsetDateTime) -> Result<RateDecision, StoreError> {
        let bucket = self.bucket(key_id);
        let mut bucket = bucket.lock().await;
        let reset = bucket.tat.map_or(0, |t| ceil_seconds(t - now));
        if let Some(lease) = bucket.lease.as_mut().filter(|l| l.left > 0 && now < l.until) {
            lease.left -= 1;
            return Ok(RateDecision {
                allowed: true,
                limit: limit.burst,
                remaining: lease.left.saturating_add(lease.bucket_left).min(limit.burst),
                reset_seconds: reset,
                retry_after_seconds: 0,
            });
        }
        bucket.lease = None;
        let mut last = None;
        for _ in 0..RATE_LIMIT_WRITE_ATTEMPTS {
            let take = gcra_take(bucket.tat, now, limit, lease_size(limit));
            last = Some(take.decision);
            let Some(new_tat) = take.new_tat else { return Ok(take.decision) };
            match self.write_tat(key_id, bucket.tat, new_tat, now).await? {
                None => {
                    bucket.tat = Some(new_tat);
                    let bucket_left = take.decision.remaining.saturating_sub(take.granted - 1);
                    bucket.lease = Some(Lease { left: take.granted - 1, until: now + LEASE_LIFETIME, bucket_left });
                    return Ok(take.decision);
                }
                Some(current) => bucket.tat = current,
            }
        }
        tracing::warn!(key_id = %key_id, "rate-limit bucket stayed contended; letting the request through");
        Ok(last.unwrap_or(RateDecision { allowed: true, limit: limit.burst, remaining: 0, reset_seconds: 0, retry_after_seconds: 0 }))
    }
}

impl DynamoRateLimiter {
    async fn get_tat(&self, key_id: crate::domain::KeyId) -> Result<Option<i128>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key(format!("RATE#{key_id}"))))
            .consistent_read(true)
            .send()
            .await
            .map_err(sdk_error)?;
        Ok(out.item.as_ref().and_then(|item| get_n::<i128>(item, "tat").ok()))
    }
}

#[async_trait]
impl AdminStore for DynamoStore {
    async fn create_account(&self, account: &Account) -> Result<(), StoreError> {
        let mut item = key(account_pk(account.id));
        item.insert("doc".into(), to_doc(account)?);
        self.put(item, Some("attribute_not_exists(pk)")).await
    }

    async fn get_account(&self, id: AccountId) -> Result<Option<Account>, StoreError> {
        self.get(account_pk(id), true).await?.as_ref().map(doc_of).transpose()
    }

    async fn is_empty(&self) -> Result<bool, StoreError> {
        let mut start = None;
        loop {
            let out = self.scan_accounts(start, false).await?;
            if out.count > 0 {
                return Ok(false);
            }
            start = out.last_evaluated_key;
            if start.is_none() {
                return Ok(true);
            }
        }
    }

    async fn create_key(&self, record: &ApiKeyRecord) -> Result<(), StoreError> {
        let mut item = key(key_pk(record.hash.as_str()));
        item.insert("doc".into(), to_doc(record)?);
        item.insert("gsi1pk".into(), s(format!("{}#KEYS", account_pk(record.account_id))));
        item.insert("gsi1sk".into(), s(format!("{}#{}", rfc3339(record.created_at), record.key_id)));
        let put = Put::builder().table_name(&self.table).set_item(Some(item)).condition_expression("attribute_not_exists(pk)").build().map_err(StoreError::other)?;
        let mut pointer = key(key_id_pk(record.key_id));
        pointer.insert("hash".into(), s(record.hash.as_str()));
        let put_pointer = Put::builder().table_name(&self.table).set_item(Some(pointer)).condition_expression("attribute_not_exists(pk)").build().map_err(StoreError::other)?;
        self.transact(
            vec![TransactWriteItem::builder().put(put).build(), TransactWriteItem::builder().put(put_pointer).build()],
            &[Conflict::Version, Conflict::Version],
        )
        .await
    }

    async fn revoke_key(&self, id: KeyId, now: OffsetDateTime) -> Result<bool, StoreError> {
        let Some(pointer) = self.get(key_id_pk(id), true).await? else { return Ok(false) };
        let pk = key_pk(&get_s(&pointer, "hash")?);
        let Some(mut item) = self.get(pk, true).await? else { return Ok(false) };
        let mut record: ApiKeyRecord = doc_of(&item)?;
        record.revoked_at.get_or_insert(now);
        item.insert("doc".into(), to_doc(&record)?);
        self.put(item, None).await?;
        Ok(true)
    }

    async fn list_keys(&self, account: AccountId) -> Result<Vec<ApiKeyRecord>, StoreError> {
        self.query_gsi(format!("{}#KEYS", account_pk(account))).await?.iter().map(key_record_of).collect()
    }

    async fn set_rate_limit(&self, id: KeyId, limit: Option<RateLimit>) -> Result<bool, StoreError> {
        let Some(pointer) = self.get(key_id_pk(id), true).await? else { return Ok(false) };
        let pk = key_pk(&get_s(&pointer, "hash")?);
        let Some(item) = self.get(pk.clone(), true).await? else { return Ok(false) };
        let mut record: ApiKeyRecord = doc_of(&item)?;
        record.rate_limit = limit;
        self.client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(pk)))
            .update_expression("SET doc = :doc")
            .expression_attribute_values(":doc", to_doc(&record)?)
            .send()
            .await
            .map_err(sdk_error)?;
        Ok(true)
    }

    async fn create_campaign(&self, campaign: &Campaign, make_default: bool) -> Result<(), StoreError> {
        let mut item = key(campaign_pk(campaign.id));
        item.insert("doc".into(), to_doc(campaign)?);
        item.insert("sv".into(), n(campaign.sending_version));
        item.insert("gsi1pk".into(), s(format!("{}#CAMPAIGNS", account_pk(campaign.account_id))));
        item.insert("gsi1sk".into(), s(format!("{}#{}", rfc3339(campaign.created_at), campaign.id)));
        self.put(item, Some("attribute_not_exists(pk)")).await?;
        if make_default {
            let mut account = self
                .get_account(campaign.account_id)
                .await?
                .ok_or_else(|| StoreError::other("campaign's account does not exist"))?;
            account.default_campaign_id = Some(campaign.id);
            self.create_or_replace_account(&account).await?;
        }
        Ok(())
    }

    async fn list_campaigns(&self, account: AccountId) -> Result<Vec<Campaign>, StoreError> {
        self.query_gsi(format!("{}#CAMPAIGNS", account_pk(account))).await?.iter().map(doc_of).collect()
    }

    async fn replace_campaign(&self, campaign: &Campaign, expected_version: u64) -> Result<bool, StoreError> {
        let condition = if expected_version == 0 {
            "attribute_exists(pk) AND (attribute_not_exists(sv) OR sv = :expected)"
        } else {
            "sv = :expected"
        };
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(campaign_pk(campaign.id))))
            .update_expression("SET doc = :doc, sv = :v")
            .condition_expression(condition)
            .expression_attribute_values(":doc", to_doc(campaign)?)
            .expression_attribute_values(":v", n(campaign.sending_version))
            .expression_attribute_values(":expected", n(expected_version))
            .send()
            .await;
        match result {
            Ok(_) => {}
            Err(SdkError::ServiceError(se)) if se.err().is_conditional_check_failed_exception() => return Ok(false),
            Err(e) => return Err(sdk_error(e)),
        }
        if !campaign.active {
            if let Some(mut account) = self.get_account(campaign.account_id).await? {
                if account.default_campaign_id == Some(campaign.id) {
                    account.default_campaign_id = None;
                    self.create_or_replace_account(&account).await?;
                }
            }
        }
        Ok(true)
    }

    async fn get_campaign(&self, id: CampaignId) -> Result<Option<Campaign>, StoreError> {
        self.get(campaign_pk(id), true).await?.as_ref().map(doc_of).transpose()
    }

    async fn list_accounts(&self) -> Result<Vec<Account>, StoreError> {
        let mut accounts: Vec<Account> = Vec::new();
        let mut start = None;
        loop {
            let out = self.scan_accounts(start, true).await?;
            for item in out.items() {
                accounts.push(doc_of(item)?);
            }
            start = out.last_evaluated_key;
            if start.is_none() {
                break;
            }
        }
        accounts.sort_by_key(|a| a.created_at);
        Ok(accounts)
    }
}

fn send_pk(key: SendKey) -> String {
    format!("SEND#{}#{}", key.enrollment, key.step)
}

fn send_record_of(item: &Item) -> Result<SendRecord, StoreError> {
    let pk = get_s(item, "pk")?;
    let corrupt = || StoreError::other("stored send record has an invalid key");
    let (enrollment, step) = pk.strip_prefix("SEND#").and_then(|rest| rest.rsplit_once('#')).ok_or_else(corrupt)?;
    let key = SendKey { enrollment: EnrollmentId::parse(enrollment).map_err(|_| corrupt())?, step: step.parse().map_err(|_| corrupt())? };
    let opt = |name: &str| item.get(name).and_then(|v| v.as_s().ok()).cloned();
    let claimed_at = super::record::parse_rfc3339(&get_s(item, "claimed_at")?)?;
    // A record of an earlier version (a bare claim) has no state: it meant "sent".
    let name = opt("state").unwrap_or_else(|| "sent".to_owned());
    let owner = opt("owner");
    let attempts = if item.contains_key("attempts") { get_n(item, "attempts")? } else { 1 };
    let retry_at = opt("retry_at").as_deref().map(super::record::parse_rfc3339).transpose()?;
    let state = SendState::from_parts(&name, owner.as_deref(), opt("detail"), attempts, retry_at).map_err(StoreError::other)?;
    Ok(SendRecord {
        key,
        state,
        owner: owner.as_deref().map(ClaimOwner::parse).transpose().map_err(|_| corrupt())?.unwrap_or(ClaimOwner::NIL),
        claimed_at,
        updated_at: opt("updated_at").as_deref().map(super::record::parse_rfc3339).transpose()?.unwrap_or(claimed_at),
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

    async fn record_send(&self, key: SendKey, owner: ClaimOwner, state: &SendState, now: OffsetDateTime) -> Result<bool, StoreError> {
        let mut update = self
            .client
            .update_item()
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
        if let SendState::RetryScheduled { attempt, retry_at, .. } = state {
            expression.push_str(", retry_at = :retry_at, attempts = :attempts");
            update = update
                .expression_attribute_values(":retry_at", s(rfc3339(*retry_at)))
                .expression_attribute_values(":attempts", n(*attempt));
        }
        match update.update_expression(expression).send().await {
            Ok(_) => Ok(true),
            Err(SdkError::ServiceError(se)) if se.err().is_conditional_check_failed_exception() => Ok(false),
            Err(e) => Err(sdk_error(e)),
        }
    }

    async fn send_record(&self, key: SendKey) -> Result<Option<SendRecord>, StoreError> {
        self.get(send_pk(key), true).await?.as_ref().map(send_record_of).transpose()
    }
}

impl DynamoStore {
    /// One page of a scan for the account items, from `start`.
    async fn scan_accounts(
        &self,
        start: Option<Item>,
        consistent: bool,
    ) -> Result<aws_sdk_dynamodb::operation::scan::ScanOutput, StoreError> {
        self.client
            .scan()
            .table_name(&self.table)
            .filter_expression("begins_with(pk, :a)")
            .expression_attribute_values(":a", s("ACCOUNT#"))
            .consistent_read(consistent)
            .set_exclusive_start_key(start)
            .send()
            .await
            .map_err(sdk_error)
    }

    async fn create_or_replace_account(&self, account: &Account) -> Result<(), StoreError> {
        let mut item = key(account_pk(account.id));
        item.insert("doc".into(), to_doc(account)?);
        self.put(item, None).await
    }
}
