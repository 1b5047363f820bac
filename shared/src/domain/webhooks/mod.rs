//! The webhooks providers send us, checked and read: Stripe's payment events, Resend's email
//! events (signed as Standard Webhooks) and SendGrid's signed Event Webhook. Pure functions
//! over what a request carries (header values, the raw body) and what we hold (the secret,
//! the time): no I/O, no HTTP types. A signature is always checked over the exact bytes
//! received, before the body is read.

mod resend;
mod sendgrid;
mod stripe;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use time::{Duration, OffsetDateTime};

pub use resend::{parse_resend_event, standard_webhook_key, verify_standard_webhook, StandardWebhookKey};
pub use sendgrid::{parse_sendgrid_events, parse_sendgrid_public_key, verify_sendgrid, SendgridKey};
pub use stripe::{parse_stripe_event, verify_stripe, PaymentMatch, StripeEvent};

/// How far a signed timestamp may be from now, in either direction, for all three providers:
/// Stripe's default tolerance and the Standard Webhooks libraries' window. SendGrid documents
/// none; the same five minutes apply.
pub const SIGNATURE_TOLERANCE: Duration = Duration::minutes(5);

/// Why a webhook's signature was refused. No message names the secret or echoes a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// A part the signature needs is absent (a header, its timestamp, any `v1` signature).
    #[error("the signature is missing its {0}")]
    Missing(&'static str),
    /// A header is there but not of the provider's shape.
    #[error("the signature is malformed: {0}")]
    Malformed(&'static str),
    /// The secret (or SendGrid public key) we hold cannot check anything.
    #[error("the webhook secret is unusable: {0}")]
    InvalidSecret(&'static str),
    /// No signature matches the body.
    #[error("no signature matches the body")]
    Mismatch,
    /// The signature matches, but its timestamp is more than [`SIGNATURE_TOLERANCE`] from now.
    #[error("the signed timestamp is more than five minutes from now")]
    Stale,
}

/// A verified body that is not what the provider sends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the webhook body is not of the expected shape: {0}")]
pub struct PayloadError(pub String);

impl PayloadError {
    fn json(e: &serde_json::Error) -> Self {
        Self(e.to_string())
    }
}

/// Standard base64, padded or not (secrets and signatures are seen both ways).
const BASE64: GeneralPurpose =
    GeneralPurpose::new(&base64::alphabet::STANDARD, GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent));

/// A timestamp header: Unix seconds, ASCII digits only.
fn unix_seconds(raw: &str) -> Result<i64, SignatureError> {
    if raw.is_empty() {
        return Err(SignatureError::Missing("timestamp"));
    }
    if !raw.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SignatureError::Malformed("the timestamp is not Unix seconds"));
    }
    raw.parse().map_err(|_| SignatureError::Malformed("the timestamp is out of range"))
}

/// Whether `timestamp` (Unix seconds) is within [`SIGNATURE_TOLERANCE`] of `now`.
fn check_fresh(timestamp: i64, now: OffsetDateTime) -> Result<(), SignatureError> {
    if now.unix_timestamp().abs_diff(timestamp) > SIGNATURE_TOLERANCE.whole_seconds().unsigned_abs() {
        Err(SignatureError::Stale)
    } else {
        Ok(())
    }
}

/// The time of Unix seconds `at`, if representable.
fn from_unix(at: i64) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp(at).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_digits_and_fresh_within_five_minutes_either_way() {
        let now = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        assert_eq!(unix_seconds("1700000000"), Ok(1_700_000_000));
        for bad in ["+1700000000", "-1", "17e8", " 1700000000", "1700000000.5", "99999999999999999999"] {
            assert!(matches!(unix_seconds(bad), Err(SignatureError::Malformed(_))), "{bad}");
        }
        assert_eq!(unix_seconds(""), Err(SignatureError::Missing("timestamp")));
        assert_eq!(check_fresh(1_700_000_300, now), Ok(()));
        assert_eq!(check_fresh(1_699_999_700, now), Ok(()));
        assert_eq!(check_fresh(1_700_000_301, now), Err(SignatureError::Stale));
        assert_eq!(check_fresh(1_699_999_699, now), Err(SignatureError::Stale));
        assert_eq!(check_fresh(i64::MIN, now), Err(SignatureError::Stale));
        assert_eq!(check_fresh(i64::MAX, now), Err(SignatureError::Stale));
    }
}
