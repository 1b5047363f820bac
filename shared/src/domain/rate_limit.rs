//! Per-key rate limits: a token bucket of `burst` requests refilled at `per_second`, computed
//! as GCRA (the generic cell rate algorithm), whose whole state is one timestamp per key (the
//! theoretical arrival time, TAT), so it fits in one conditional write.

use time::{Duration, OffsetDateTime};

/// A key's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RateLimit {
    /// Sustained requests per second.
    pub per_second: u32,
    /// Requests that may arrive at once after a quiet period.
    pub burst: u32,
}

impl RateLimit {
    /// The limit of a key without an override.
    pub const DEFAULT: Self = Self { per_second: 20, burst: 40 };

    /// # Errors
    /// A message when either number is zero or absurdly large.
    pub fn new(per_second: u32, burst: u32) -> Result<Self, String> {
        if !(1..=100_000).contains(&per_second) || !(1..=100_000).contains(&burst) {
            return Err("rate and burst must be between 1 and 100000".into());
        }
        Ok(Self { per_second, burst })
    }

    fn interval(self) -> Duration {
        Duration::nanoseconds(1_000_000_000 / i64::from(self.per_second.max(1)))
    }
}

/// What the limiter decided for one request, with what the `RateLimit-*` headers say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateDecision {
    pub allowed: bool,
    /// `RateLimit-Limit`: the burst size.
    pub limit: u32,
    /// `RateLimit-Remaining`: requests that could be made right now.
    pub remaining: u32,
    /// `RateLimit-Reset`: seconds until the bucket is full again.
    pub reset_seconds: u64,
    /// `Retry-After` when denied: seconds until one request is allowed.
    pub retry_after_seconds: u64,
}

/// A duration in whole seconds, rounded up (0 for a negative one).
#[must_use]
pub fn ceil_seconds(d: Duration) -> u64 {
    let nanos = d.whole_nanoseconds().max(0);
    u64::try_from((nanos + 999_999_999) / 1_000_000_000).unwrap_or(u64::MAX)
}

/// One GCRA step: given the stored TAT (if any), decides and returns the TAT to store when
/// the request is allowed (`None` when denied: nothing is written).
#[must_use]
pub fn gcra(tat: Option<OffsetDateTime>, now: OffsetDateTime, limit: RateLimit) -> (RateDecision, Option<OffsetDateTime>) {
    let take = gcra_take(tat, now, limit, 1);
    (take.decision, take.new_tat)
}

/// What [`gcra_take`] granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Take {
    /// The decision for the request that asked (allowed when `granted >= 1`).
    pub decision: RateDecision,
    /// How many requests the bucket admitted: that one and `granted - 1` more.
    pub granted: u32,
    /// The TAT to store (`None` when nothing was granted: nothing is written).
    pub new_tat: Option<OffsetDateTime>,
}

/// GCRA for up to `want` requests at once: admits as many as the bucket holds, at least one
/// unless it is empty. `want = 1` is one plain GCRA step.
#[must_use]
pub fn gcra_take(tat: Option<OffsetDateTime>, now: OffsetDateTime, limit: RateLimit, want: u32) -> Take {
    let interval = limit.interval();
    let interval_nanos = interval.whole_nanoseconds().max(1);
    let burst = i32::try_from(limit.burst).unwrap_or(i32::MAX);
    let start = tat.map_or(now, |t| t.max(now));
    // Requests the bucket admits right now: the i-th is allowed while start + i·T − burst·T <= now.
    let available = ((interval * burst) - (start - now)).whole_nanoseconds().max(0) / interval_nanos;
    let available = u32::try_from(available).unwrap_or(u32::MAX).min(limit.burst);
    let granted = want.max(1).min(available);
    if granted == 0 {
        let allow_at = start + interval - interval * burst;
        let decision = RateDecision {
            allowed: false,
            limit: limit.burst,
            remaining: 0,
            reset_seconds: ceil_seconds(start - now),
            retry_after_seconds: ceil_seconds(allow_at - now).max(1),
        };
        return Take { decision, granted: 0, new_tat: None };
    }
    let new_tat = start + interval * i32::try_from(granted).unwrap_or(i32::MAX);
    let decision = RateDecision {
        allowed: true,
        limit: limit.burst,
        remaining: available - 1,
        reset_seconds: ceil_seconds(new_tat - now),
        retry_after_seconds: 0,
    };
    Take { decision, granted, new_tat: Some(new_tat) }
}

/// How long the requests a shared bucket granted at once may be used: past it, the unused
/// ones are dropped (so a key never gets more than its burst plus one lifetime's worth of its
/// rate in any window, however many instances serve it).
pub const LEASE_LIFETIME: Duration = Duration::seconds(1);

/// How many requests an instance takes from a shared bucket with one write (see
/// `adapters::dynamodb::DynamoRateLimiter`): a quarter second of the key's rate, at most a
/// quarter of its burst (so several instances can share it) and at most 100; at least 1. A
/// key limited to 20/s with bursts of 40 costs one bucket write per 5 requests.
#[must_use]
pub fn lease_size(limit: RateLimit) -> u32 {
    (limit.per_second / 4).min(limit.burst / 4).clamp(1, 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_bucket_allows_a_burst_then_denies() {
        let limit = RateLimit::new(2, 3).unwrap();
        let now = OffsetDateTime::UNIX_EPOCH;
        let mut tat = None;
        let mut remaining = Vec::new();
        for _ in 0..3 {
            let (d, next) = gcra(tat, now, limit);
            assert!(d.allowed);
            remaining.push(d.remaining);
            tat = next;
        }
        assert_eq!(remaining, vec![2, 1, 0]);
        let (denied, next) = gcra(tat, now, limit);
        assert!(!denied.allowed);
        assert_eq!(next, None);
        assert_eq!(denied.retry_after_seconds, 1);
    }

    #[test]
    fn the_bucket_refills_at_the_rate() {
        let limit = RateLimit::new(2, 2).unwrap();
        let t0 = OffsetDateTime::UNIX_EPOCH;
        let (_, tat) = gcra(None, t0, limit);
        let (_, tat) = gcra(tat, t0, limit);
        assert!(!gcra(tat, t0, limit).0.allowed);
        assert!(gcra(tat, t0 + Duration::milliseconds(500), limit).0.allowed, "one token after 1/rate");
        let (full, _) = gcra(tat, t0 + Duration::seconds(10), limit);
        assert_eq!(full.remaining, 1, "never more than the burst");
    }

    #[test]
    fn taking_several_grants_what_the_bucket_holds() {
        let limit = RateLimit::new(4, 10).unwrap();
        let t0 = OffsetDateTime::UNIX_EPOCH;
        let first = gcra_take(None, t0, limit, 6);
        assert_eq!((first.granted, first.decision.remaining), (6, 9));
        let second = gcra_take(first.new_tat, t0, limit, 6);
        assert_eq!((second.granted, second.decision.remaining), (4, 3), "only what is left");
        let empty = gcra_take(second.new_tat, t0, limit, 6);
        assert_eq!((empty.granted, empty.decision.allowed, empty.new_tat), (0, false, None));
        let later = gcra_take(second.new_tat, t0 + Duration::milliseconds(500), limit, 6);
        assert_eq!(later.granted, 2, "two intervals later, two requests");
    }

    #[test]
    fn leases_are_a_quarter_second_of_the_rate() {
        assert_eq!(lease_size(RateLimit::DEFAULT), 5);
        assert_eq!(lease_size(RateLimit::new(2, 3).unwrap()), 1);
        assert_eq!(lease_size(RateLimit::new(10_000, 10_000).unwrap()), 100);
        assert_eq!(lease_size(RateLimit::new(1000, 8).unwrap()), 2);
    }

    #[test]
    fn zero_limits_are_refused() {
        assert!(RateLimit::new(0, 1).is_err());
        assert!(RateLimit::new(1, 0).is_err());
    }
}
