//! The embedded backend's rate limiter: one process serves every request, so the buckets live
//! in memory and are exact.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use time::OffsetDateTime;

use crate::domain::{gcra, KeyId, RateDecision, RateLimit};
use crate::ports::{RateLimiter, StoreError};

/// In-memory GCRA buckets, one per key.
#[derive(Debug, Default)]
pub struct LocalRateLimiter {
    tats: Mutex<HashMap<KeyId, OffsetDateTime>>,
}

#[async_trait]
impl RateLimiter for LocalRateLimiter {
    async fn check(&self, key: KeyId, limit: RateLimit, now: OffsetDateTime) -> Result<RateDecision, StoreError> {
        let mut tats = self.tats.lock().map_err(|_| StoreError::other("rate limiter poisoned"))?;
        let (decision, new_tat) = gcra(tats.get(&key).copied(), now, limit);
        if let Some(tat) = new_tat {
            tats.insert(key, tat);
        }
        Ok(decision)
    }
}
