//! Rate-limit buckets: the `RATE#` items, leased a few requests at a time.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::Client;
use time::OffsetDateTime;

use super::{get_n, key, n, sdk_error};
use crate::domain::{ceil_seconds, gcra_take, lease_size, RateDecision, RateLimit, LEASE_LIFETIME};
use crate::ports::{RateLimiter, StoreError};

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
