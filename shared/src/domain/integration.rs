//! Integrations: the webhook endpoints through which a provider tells us about an account's
//! emails and payments, and the log of every event they delivered.

use std::fmt;

use time::OffsetDateTime;

use super::AccountId;

/// Who sends events to an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// Checkout and invoice payments: a paying prospect is converted.
    Stripe,
    /// Bounces and complaints of emails sent through Resend (Standard Webhooks signatures).
    Resend,
    /// Bounces and complaints of emails sent through SendGrid (its signed Event Webhook).
    Sendgrid,
    /// Amazon SES notifications delivered by Amazon SNS over HTTPS (`POST /webhooks/ses`): one
    /// endpoint for the whole deployment, allowed by topic, not created per account.
    Ses,
}

impl Provider {
    /// The providers an account creates endpoints for.
    pub const PER_ACCOUNT: [Self; 3] = [Self::Stripe, Self::Resend, Self::Sendgrid];

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stripe => "stripe",
            Self::Resend => "resend",
            Self::Sendgrid => "sendgrid",
            Self::Ses => "ses",
        }
    }

    /// Parses the lowercase name.
    #[must_use]
    pub fn parse(raw: &str) -> Option<Self> {
        [Self::Stripe, Self::Resend, Self::Sendgrid, Self::Ses].into_iter().find(|p| p.as_str() == raw)
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The unguessable id in an endpoint's URL: `whep_` and 32 lowercase hex digits (128 random
/// bits). Knowing it is not enough to deliver an event: every event is signed too.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EndpointId(String);

const ENDPOINT_PREFIX: &str = "whep_";

/// A string that is not an endpoint id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an endpoint id is \"whep_\" and 32 lowercase hex digits")]
pub struct InvalidEndpointId;

impl EndpointId {
    /// A fresh random id.
    #[must_use]
    pub fn new() -> Self {
        Self(format!("{ENDPOINT_PREFIX}{}", super::hex_lower(&rand::random::<[u8; 16]>())))
    }

    /// # Errors
    /// [`InvalidEndpointId`] for anything but the shape [`EndpointId::new`] makes.
    pub fn parse(raw: &str) -> Result<Self, InvalidEndpointId> {
        let hex = raw.strip_prefix(ENDPOINT_PREFIX).ok_or(InvalidEndpointId)?;
        if hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            Ok(Self(raw.to_owned()))
        } else {
            Err(InvalidEndpointId)
        }
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for EndpointId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for EndpointId {
    type Err = InvalidEndpointId;
    fn from_str(raw: &str) -> Result<Self, InvalidEndpointId> {
        Self::parse(raw)
    }
}

impl TryFrom<String> for EndpointId {
    type Error = InvalidEndpointId;
    fn try_from(raw: String) -> Result<Self, InvalidEndpointId> {
        Self::parse(&raw)
    }
}

impl From<EndpointId> for String {
    fn from(id: EndpointId) -> Self {
        id.0
    }
}

/// A provider's signing secret (for SendGrid, its public verification key), checked for the
/// provider's shape when the endpoint is created. Its `Debug` shows no part of it.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct SigningSecret(String);

impl fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningSecret(..)")
    }
}

/// A secret that is not what its provider issues.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidSecret(pub &'static str);

impl SigningSecret {
    /// Checks `raw` for `provider`'s shape: Stripe's and Resend's secrets start `whsec_`
    /// (Resend's is base64 after it); SendGrid's is the base64 public key it shows.
    ///
    /// # Errors
    /// [`InvalidSecret`] saying what was expected (never echoing `raw`).
    pub fn parse(provider: Provider, raw: &str) -> Result<Self, InvalidSecret> {
        let raw = raw.trim();
        match provider {
            Provider::Stripe if raw.starts_with("whsec_") && raw.len() > "whsec_".len() => {}
            Provider::Stripe => return Err(InvalidSecret("a Stripe signing secret starts with \"whsec_\"")),
            Provider::Resend if super::standard_webhook_key(raw).is_ok() => {}
            Provider::Resend => return Err(InvalidSecret("a Resend signing secret is \"whsec_\" followed by base64")),
            Provider::Sendgrid if super::parse_sendgrid_public_key(raw).is_ok() => {}
            Provider::Sendgrid => {
                return Err(InvalidSecret("a SendGrid verification key is the base64 EC P-256 public key its settings show"));
            }
            Provider::Ses => return Err(InvalidSecret("Amazon SES is not configured per account: see CADENHQ_SNS_TOPIC_ARNS")),
        }
        Ok(Self(raw.to_owned()))
    }

    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// What `integrations list` shows of it: its last four characters.
    #[must_use]
    pub fn hint(&self) -> String {
        let skip = self.0.chars().count().saturating_sub(4);
        format!("...{}", self.0.chars().skip(skip).collect::<String>())
    }
}

/// One webhook endpoint of one account.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Integration {
    pub id: EndpointId,
    pub account_id: AccountId,
    pub provider: Provider,
    pub secret: SigningSecret,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// What a received event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventOutcome {
    /// It changed a prospect (or was recorded against its send).
    Applied,
    /// Received and applied before: nothing changed.
    Duplicate,
    /// It names no prospect of the account.
    Unmatched,
    /// A type of event that changes nothing (a Stripe refund, an SES open).
    Ignored,
    /// Refused: a signature that did not verify, a stale timestamp, a body that is not the
    /// provider's.
    Rejected,
}

impl EventOutcome {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Duplicate => "duplicate",
            Self::Unmatched => "unmatched",
            Self::Ignored => "ignored",
            Self::Rejected => "rejected",
        }
    }

    /// Whether receiving the same event again is a duplicate: it was taken, not refused.
    #[must_use]
    pub fn is_final(self) -> bool {
        matches!(self, Self::Applied | Self::Unmatched | Self::Ignored)
    }
}

/// One event as received: what `integrations events` lists.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReceivedEvent {
    pub provider: Provider,
    /// The endpoint it came through (`None` for `POST /webhooks/ses`).
    pub endpoint_id: Option<EndpointId>,
    /// The account it concerns, when known (an SES notification names it through its email).
    pub account_id: Option<AccountId>,
    /// The provider's id of the event (Stripe's `evt_...`, the `svix-id`, SendGrid's
    /// `sg_event_id`, SNS's `MessageId`); empty for a refused event that had none.
    pub event_id: String,
    /// The provider's type of the event (`invoice.paid`, `email.bounced`, `bounce`, ...).
    pub event_type: String,
    #[serde(with = "time::serde::rfc3339")]
    pub received_at: OffsetDateTime,
    pub outcome: EventOutcome,
}

/// How many received events `integrations events` lists at most.
pub const EVENTS_LISTED_MAX: u32 = 1_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_ids_are_random_and_parse_back() {
        let (a, b) = (EndpointId::new(), EndpointId::new());
        assert_ne!(a, b);
        assert_eq!(EndpointId::parse(a.as_str()), Ok(a.clone()));
        for bad in ["", "whep_", "whep_XYZ", "wh_00000000000000000000000000000000", &format!("{a}0"), &a.as_str().to_uppercase()] {
            assert_eq!(EndpointId::parse(bad), Err(InvalidEndpointId), "{bad}");
        }
    }

    #[test]
    fn secrets_are_checked_for_their_providers_shape_and_never_shown() {
        let stripe = SigningSecret::parse(Provider::Stripe, " whsec_abc123 ").unwrap();
        assert_eq!(stripe.expose(), "whsec_abc123");
        assert_eq!(stripe.hint(), "...c123");
        assert_eq!(format!("{stripe:?}"), "SigningSecret(..)");
        assert!(SigningSecret::parse(Provider::Stripe, "sk_live_1").is_err());
        assert!(SigningSecret::parse(Provider::Resend, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_ok());
        assert!(SigningSecret::parse(Provider::Resend, "whsec_***").is_err());
        assert!(SigningSecret::parse(Provider::Sendgrid, "not a key").is_err());
        assert!(SigningSecret::parse(Provider::Ses, "whsec_x").is_err());
        let e = SigningSecret::parse(Provider::Stripe, "sk_live_secret").unwrap_err();
        assert!(!e.to_string().contains("sk_live_secret"));
    }

    #[test]
    fn providers_parse_their_names() {
        for p in [Provider::Stripe, Provider::Resend, Provider::Sendgrid, Provider::Ses] {
            assert_eq!(Provider::parse(p.as_str()), Some(p));
        }
        assert_eq!(Provider::parse("Stripe"), None);
    }
}
