//! The domain: what a prospect, a campaign, an account and an API key are, and the rules
//! that hold for them whatever stores them. Nothing here knows of HTTP, AWS or SQLite.

mod campaign;
mod email;
mod feedback;
mod ids;
mod idempotency;
mod integration;
mod job;
mod key;
mod listing;
mod progress;
mod prospect;
mod rate_limit;
mod send;
mod sns;
mod unsubscribe;
mod webhooks;

pub use campaign::{sample_prospect, Campaign, CampaignDefinition, CampaignError, CampaignState, Pause, RenderedEmail, SendingChange, Step};
pub use listing::{millis, ListPosition, ListQuery, DEFAULT_PAGE, MAX_PAGE};
pub use progress::{enrollment_view, EndedReason, EnrollmentState, EnrollmentView};
pub use send::{ClaimOwner, SendKey, SendRecord, SendState, SendTally, SEND_STATES};
pub use sns::{
    is_sns_cert_file_name, is_stale, CertUrl, SignatureVersion, SnsError, SnsKind, SnsMessage, SubscribeUrl, SNS_MAX_AGE, SNS_MAX_CLOCK_SKEW,
};
pub use unsubscribe::{InvalidToken, UnsubscribeSecret, WeakSecret};
pub use webhooks::{
    parse_resend_event, parse_sendgrid_events, parse_sendgrid_public_key, parse_stripe_event, standard_webhook_key, verify_sendgrid, verify_standard_webhook,
    verify_stripe, PaymentMatch, PayloadError, SendgridKey, SignatureError, StandardWebhookKey, StripeEvent, SIGNATURE_TOLERANCE,
};
pub use email::{EmailError, NormalizedEmail};
pub use feedback::{
    parse_ses_notification, transient_bounces_exhausted, BounceClass, Effect, EmailReference, Feedback, FeedbackError, FeedbackKind, TRANSIENT_BOUNCE_LIMIT,
    TRANSIENT_BOUNCE_WINDOW,
};
pub use ids::{AccountId, CampaignId, EnrollmentId, IdError, KeyId, ProspectId};
pub use idempotency::{
    request_fingerprint, IdempotencyBegin, IdempotencyKey, InvalidIdempotencyKey, StoredResponse, IDEMPOTENCY_TTL,
    IN_FLIGHT_LEASE,
};
pub use job::CampaignJob;
pub use integration::{EndpointId, EventOutcome, Integration, InvalidEndpointId, InvalidSecret, Provider, ReceivedEvent, SigningSecret, EVENTS_LISTED_MAX};
pub use rate_limit::{ceil_seconds, gcra, gcra_take, lease_size, RateDecision, RateLimit, Take, LEASE_LIFETIME};
pub use key::{ApiKey, ApiKeyRecord, KeyHash};
pub use prospect::{
    Enrollment, ExternalId, FieldChange, FieldError, Prospect, ProspectChanges, ProspectStatus,
    StatusError, StatusReason, StatusChange, StoredStatusChange, StepProgress, status_history, TextFields, TEXT_FIELDS, METADATA_MAX_BYTES, TEXT_FIELD_MAX_CHARS, text_field_index,
};

/// Lowercase hex of `bytes`. (`hex::encode` collects one `char` at a time, which showed in
/// the CPU profile of every request: each hashes its API key and its email.)
#[must_use]
fn hex_lower(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = vec![0; bytes.len() * 2];
    for (pair, &byte) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(byte >> 4)];
        pair[1] = DIGITS[usize::from(byte & 0x0f)];
    }
    String::from_utf8(out).expect("hex digits are ASCII")
}

/// Whether `s` has more than `max` characters; counts them only when its bytes could be more.
fn more_chars_than(s: &str, max: usize) -> bool {
    s.len() > max && s.chars().count() > max
}

/// An account: the tenant every key, campaign and prospect belongs to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Account {
    pub id: AccountId,
    pub name: String,
    /// The campaign new prospects are enrolled in when a POST names none.
    pub default_campaign_id: Option<CampaignId>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: time::OffsetDateTime,
}

/// The source of "now", injected so that tests can move time.
pub trait Clock: Send + Sync {
    fn now(&self) -> time::OffsetDateTime;
}

/// The wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> time::OffsetDateTime {
        time::OffsetDateTime::now_utc()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_lower_writes_two_lowercase_digits_per_byte() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(super::hex_lower(&bytes), hex::encode(&bytes));
        assert_eq!(super::hex_lower(&[]), "");
    }

    #[test]
    fn more_chars_than_counts_characters_not_bytes() {
        assert!(!super::more_chars_than("ééé", 3));
        assert!(super::more_chars_than("éééé", 3));
        assert!(!super::more_chars_than("abc", 3));
        assert!(super::more_chars_than("abcd", 3));
    }
}
