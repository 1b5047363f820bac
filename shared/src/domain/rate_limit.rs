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

fn ceil_seconds(d: Duration) -> u64 {
    let nanos = d.whole_nanoseconds().max(0);
    u64::try_from((nanos + 999_999_999) / 1_000_000_000).unwrap_or(u64::MAX)
}

/// One GCRA step: given the stored TAT (if any), decides and returns the TAT to store when
/// the request is allowed (`None` when denied: nothing is written).
#[must_use]
pub fn gcra(tat: Option<OffsetDateTime>, now: OffsetDateTime, limit: RateLimit) -> (RateDecision, Option<OffsetDateTime>) {
    let interval = limit.interval();
    let burst = i32::try_from(limit.burst).unwrap_or(i32::MAX);
    let start = tat.map_or(now, |t| t.max(now));
    let new_tat = start + interval;
    let allow_at = new_tat - interval * burst;
    if now < allow_at {
        let decision = RateDecision {
            allowed: false,
            limit: limit.burst,
            remaining: 0,
            reset_seconds: ceil_seconds(start - now),
            retry_after_seconds: ceil_seconds(allow_at - now).max(1),
        };
        return (decision, None);
    }
    let spare = (now - allow_at).whole_nanoseconds() / interval.whole_nanoseconds().max(1);
    let decision = RateDecision {
        allowed: true,
        limit: limit.burst,
        remaining: u32::try_from(spare).unwrap_or(u32::MAX).min(limit.burst),
        reset_seconds: ceil_seconds(new_tat - now),
        retry_after_seconds: 0,
    };
    (decision, Some(new_tat))
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
    fn zero_limits_are_refused() {
        assert!(RateLimit::new(0, 1).is_err());
        assert!(RateLimit::new(1, 0).is_err());
    }
}
