//! The AWS storage backend: one DynamoDB table with a string partition key `pk`.
//!
//! | item | `pk` | holds |
//! |---|---|---|
//! | prospect | `PROSPECT#{account}#{sha256(normalized email)}` | top-level status/version attributes + JSON `doc` |
//! | id pointer | `PID#{account}#{prospect_id}` | `target`: the prospect's `pk`; `external_id`, `links` |
//! | external_id pointer | `EXT#{account}#{external_id}` | `target`: the prospect's `pk`; `id`, `links` |
//! | account | `ACCOUNT#{id}` | JSON `doc` |
//! | key | `KEY#{sha256(key)}` | JSON `doc`; `gsi1pk` = `ACCOUNT#{id}#KEYS` |
//! | key id pointer | `KEYID#{key_id}` | `hash` |
//! | campaign | `CAMPAIGN#{id}` | JSON `doc`; `sv` (sending version); `gsi1pk` = `ACCOUNT#{id}#CAMPAIGNS` |
//! | (prospect listing) | | `gsi2pk` = `PROSPECTS#{account}#{shard}`, `gsi2sk` = `{created ms, 15 digits}#{id}` on the prospect item |
//! | suppression of an erased address | `SUPPRESS#{account}#{sha256(normalized email)}` | `reason` (`erased`), `at` |
//! | send record | `SEND#{enrollment_id}#{step}` | `state`, `owner`, `detail`, `attempts`, `retry_at`, `claimed_at`, `updated_at`; `expires_at` (TTL) |
//! | provider message id | `MSG#{message id}` | `account`, `prospect`, `enrollment`, `step` of the `sent` send record; `expires_at` (TTL, as the send record) |
//! | applied feedback | `FEEDBACK#{sha256(feedback id)}#{sha256(normalized email)}` | `account`, `prospect`, `kind`, `at`; `expires_at` (TTL, 35 days) |
//! | recent transient bounces | `BOUNCES#{account}#{sha256(normalized email)}` | `times` (the last 30 days'), `prospect`, `version`; `expires_at` (TTL) |
//! | webhook endpoint | `INTEGRATION#{endpoint id}` | JSON `doc` (the provider's secret included); `gsi1pk` = `ACCOUNT#{id}#INTEGRATIONS` |
//! | received event, taken | `EVENT#{provider}#{account or -}#{sha256(event id)}` | JSON `doc`; `gsi1pk` = `EVENTS#{account or -}`, `gsi1sk` = `{received ms, 15 digits}#{arrival ns, 20 digits}#{receipt}`; `expires_at` (TTL, 30 days) |
//! | received event, refused or duplicate | `RECEIVED#{receipt}` | as above |
//! | idempotency record | `IDEM#{account}#{sha256(key)}` | `fingerprint`, `status`, `body`, `lease_until`; `expires_at` (TTL) |
//! | rate-limit bucket | `RATE#{key_id}` | `tat` (GCRA, Unix nanoseconds); `expires_at` (TTL) |
//!
//! Every prospect has its own partition (account + email), so one large account never
//! concentrates writes on one key. Lookups by id or external_id go through pointer items read
//! with strong consistency (never an index), so a PATCH right after a POST always finds it.
//! Uniqueness of email and external_id is enforced by conditional writes in one transaction.

mod admin;
mod feedback;
mod idempotency;
mod integrations;
mod keys;
mod prospects;
mod rate_limit;
mod sends;

use std::collections::HashMap;

use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{AttributeValue, TransactWriteItem};
use aws_sdk_dynamodb::Client;

use crate::domain::{AccountId, CampaignId, KeyId};
use crate::ports::{Conflict, ProspectRef, StoreError};
pub use rate_limit::{DynamoRateLimiter, RATE_LIMIT_WRITE_ATTEMPTS};

/// Name of the table's one global secondary index (keys and campaigns by account).
pub const GSI1: &str = "gsi1";
/// Name of the index listing each account's prospects, newest first, in shards.
pub const GSI2: &str = "gsi2";
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

/// The cancellation code of item `i` of a cancelled transaction (`ConditionalCheckFailed`,
/// `TransactionConflict`, ...), if it was cancelled.
fn cancellation_code(
    e: &SdkError<aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError, aws_sdk_dynamodb::config::http::HttpResponse>,
    i: usize,
) -> Option<String> {
    match e {
        SdkError::ServiceError(se) => match se.err() {
            aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError::TransactionCanceledException(tc) => {
                tc.cancellation_reasons().get(i).and_then(|r| r.code()).map(str::to_owned)
            }
            _ => None,
        },
        _ => None,
    }
}

/// What a conditional `UpdateItem` did: `true` written, `false` its condition failed.
fn updated<T>(
    result: Result<T, SdkError<aws_sdk_dynamodb::operation::update_item::UpdateItemError, aws_sdk_dynamodb::config::http::HttpResponse>>,
) -> Result<bool, StoreError> {
    match result {
        Ok(_) => Ok(true),
        Err(SdkError::ServiceError(se)) if se.err().is_conditional_check_failed_exception() => Ok(false),
        Err(e) => Err(sdk_error(e)),
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
        self.query_gsi_with(gsi1pk, false, usize::MAX).await
    }

    /// Up to `limit` items of `gsi1pk` on `gsi1`, oldest first or newest first.
    async fn query_gsi_with(&self, gsi1pk: String, newest_first: bool, limit: usize) -> Result<Vec<Item>, StoreError> {
        let mut items = Vec::new();
        let mut start = None;
        loop {
            let want = i32::try_from(limit - items.len()).ok();
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .index_name(GSI1)
                .key_condition_expression("gsi1pk = :p")
                .expression_attribute_values(":p", s(&gsi1pk))
                .scan_index_forward(!newest_first)
                .set_limit(want)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(sdk_error)?;
            items.extend(out.items.unwrap_or_default());
            start = out.last_evaluated_key;
            if start.is_none() || items.len() >= limit {
                items.truncate(limit);
                return Ok(items);
            }
        }
    }
}
