//! Incoming webhooks: what Stripe, Resend, SendGrid and Amazon SNS (for SES) tell us, each
//! verified the way its sender signs, applied through the one status path (a Stripe payment
//! converts; a bounce or complaint goes through the feedback service), and every delivery
//! recorded in the account's event log.

use std::sync::Arc;

use axum::http::HeaderMap;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tracing::{info, warn};

use crate::adapters::sns_http::{SnsVerifier, VerifiedSns};
use crate::domain::{
    parse_resend_event, parse_sendgrid_events, parse_ses_notification, parse_stripe_event, verify_sendgrid, verify_standard_webhook, verify_stripe,
    AccountId, Clock, EndpointId, EventOutcome, ExternalId, Feedback, FeedbackError, Integration, KeyId, NormalizedEmail, PaymentMatch, Provider,
    ProspectId, ProspectStatus, RateDecision, RateLimit, ReceivedEvent, SnsError, StatusReason,
};
use crate::feedback::{FeedbackOutcome, FeedbackService, FeedbackTarget};
use crate::ports::{IntegrationStore, ProspectRef, ProspectRepository, RateLimiter, StoreError};
use crate::service::{ProspectService, ServiceError};

/// Bad signatures an endpoint takes before it answers 429: one a second, in bursts of ten.
/// A provider signing correctly never spends any of it.
pub fn bad_signature_limit() -> RateLimit {
    RateLimit::new(1, 10).expect("a valid rate limit")
}

/// The bad-signature budget of `POST /webhooks/ses` (one for the deployment).
const SES_BUCKET: &str = "ses";

/// Why a delivery was not taken. The HTTP layer maps each to its status.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// No such endpoint, or a signature that does not verify (missing, tampered, stale, another
    /// secret): one answer, so a URL cannot be probed.
    #[error("invalid signature, or no such endpoint")]
    NotAccepted,
    /// Too many bad signatures at this endpoint.
    #[error("too many invalid signatures")]
    RateLimited(RateDecision),
    /// Signed, but not a body of the provider's.
    #[error("malformed event: {0}")]
    Malformed(String),
    /// An SNS message of a topic that is not allowed.
    #[error("topic not allowed")]
    TopicNotAllowed,
    /// Amazon SNS could not be reached (for the signing certificate, or to confirm a
    /// subscription): SNS retries.
    #[error("Amazon SNS unreachable")]
    SnsUnreachable,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<ServiceError> for WebhookError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::Unavailable(e) | ServiceError::Internal(e) => Self::Store(e),
            other => Self::Store(StoreError::other(other.to_string())),
        }
    }
}

/// What a delivery did: each event in it and its outcome.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Receipt {
    pub events: Vec<ReceiptEvent>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReceiptEvent {
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub outcome: EventOutcome,
}

/// The webhook service.
#[derive(Clone)]
pub struct WebhookService {
    integrations: Arc<dyn IntegrationStore>,
    repo: Arc<dyn ProspectRepository>,
    prospects: ProspectService,
    feedback: FeedbackService,
    limiter: Arc<dyn RateLimiter>,
    sns: SnsVerifier,
    clock: Arc<dyn Clock>,
}

/// The ports of the webhook service.
pub struct WebhookPorts {
    pub integrations: Arc<dyn IntegrationStore>,
    pub repo: Arc<dyn ProspectRepository>,
    pub prospects: ProspectService,
    pub feedback: FeedbackService,
    pub limiter: Arc<dyn RateLimiter>,
    pub sns: SnsVerifier,
    pub clock: Arc<dyn Clock>,
}

/// The value of header `name`, if it is text.
fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The first of `names` present.
fn header_of<'a>(headers: &'a HeaderMap, names: &[&str]) -> Option<&'a str> {
    names.iter().find_map(|n| header(headers, n))
}

impl WebhookService {
    #[must_use]
    pub fn new(ports: WebhookPorts) -> Self {
        let WebhookPorts { integrations, repo, prospects, feedback, limiter, sns, clock } = ports;
        Self { integrations, repo, prospects, feedback, limiter, sns, clock }
    }

    /// Takes one delivery to the endpoint `endpoint` of `provider`.
    ///
    /// # Errors
    /// [`WebhookError`]: nothing was applied.
    pub async fn receive(&self, provider: Provider, endpoint: &str, headers: &HeaderMap, body: &[u8]) -> Result<Receipt, WebhookError> {
        let now = self.clock.now();
        let integration = match EndpointId::parse(endpoint) {
            Ok(id) => self.integrations.find_integration(&id).await?.filter(|i| i.provider == provider),
            Err(_) => None,
        };
        let Some(integration) = integration else {
            return Err(self.refuse(endpoint, now).await);
        };
        let verified = match provider {
            Provider::Stripe => {
                header(headers, "stripe-signature").map(|sig| verify_stripe(sig, body, integration.secret.expose(), now).is_ok())
            }
            Provider::Resend => {
                let id = header_of(headers, &["svix-id", "webhook-id"]);
                let ts = header_of(headers, &["svix-timestamp", "webhook-timestamp"]);
                let sig = header_of(headers, &["svix-signature", "webhook-signature"]);
                match (id, ts, sig) {
                    (Some(id), Some(ts), Some(sig)) => Some(verify_standard_webhook(id, ts, sig, body, integration.secret.expose(), now).is_ok()),
                    _ => None,
                }
            }
            Provider::Sendgrid => {
                let sig = header(headers, "x-twilio-email-event-webhook-signature");
                let ts = header(headers, "x-twilio-email-event-webhook-timestamp");
                match (sig, ts) {
                    (Some(sig), Some(ts)) => Some(verify_sendgrid(sig, ts, body, integration.secret.expose(), now).is_ok()),
                    _ => None,
                }
            }
            Provider::Ses => None,
        };
        if verified != Some(true) {
            warn!(provider = provider.as_str(), endpoint_id = %integration.id, "webhook refused: its signature does not verify");
            let refusal = self.refuse(endpoint, now).await;
            // A flood past the limit is not logged one by one.
            if matches!(refusal, WebhookError::NotAccepted) {
                let event_id = header_of(headers, &["svix-id", "webhook-id"]).unwrap_or_default().to_owned();
                self.log(&integration, Some(integration.account_id), event_id, String::new(), EventOutcome::Rejected, now).await?;
            }
            return Err(refusal);
        }
        match provider {
            Provider::Stripe => self.take_stripe(&integration, body, now).await,
            Provider::Resend => {
                let event_id = header_of(headers, &["svix-id", "webhook-id"]).unwrap_or_default();
                let (event_type, feedback) = parse_resend_event(body, event_id, now).map_err(|e| WebhookError::Malformed(e.to_string()))?;
                let outcome = self.take_feedback_event(&integration, &feedback).await?;
                self.log(&integration, Some(integration.account_id), event_id.to_owned(), event_type.clone(), outcome, now).await?;
                Ok(Receipt { events: vec![ReceiptEvent { id: event_id.to_owned(), event_type, outcome }] })
            }
            Provider::Sendgrid => {
                let feedback = parse_sendgrid_events(body, now).map_err(|e| WebhookError::Malformed(e.to_string()))?;
                let mut events = Vec::with_capacity(feedback.len());
                for f in &feedback {
                    let outcome = self.take_feedback_event(&integration, std::slice::from_ref(f)).await?;
                    let event_type = f.kind.as_str().to_owned();
                    self.log(&integration, Some(integration.account_id), f.feedback_id.clone(), event_type.clone(), outcome, now).await?;
                    events.push(ReceiptEvent { id: f.feedback_id.clone(), event_type, outcome });
                }
                Ok(Receipt { events })
            }
            Provider::Ses => Err(WebhookError::NotAccepted),
        }
    }

    /// Counts a refused delivery against the endpoint's bad-signature budget.
    async fn refuse(&self, endpoint: &str, now: OffsetDateTime) -> WebhookError {
        let digest = Sha256::digest(format!("webhook-endpoint:{endpoint}").as_bytes());
        let mut bytes = [0; 16];
        bytes.copy_from_slice(&digest[..16]);
        match self.limiter.check(KeyId::from_bytes(bytes), bad_signature_limit(), now).await {
            Ok(decision) if !decision.allowed => WebhookError::RateLimited(decision),
            Ok(_) => WebhookError::NotAccepted,
            Err(e) => WebhookError::Store(e),
        }
    }

    async fn log(
        &self,
        integration: &Integration,
        account: Option<AccountId>,
        event_id: String,
        event_type: String,
        outcome: EventOutcome,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let event = ReceivedEvent {
            provider: integration.provider,
            endpoint_id: Some(integration.id.clone()),
            account_id: account,
            event_id,
            event_type,
            received_at: now,
            outcome,
        };
        self.integrations.record_event(&event).await
    }

    async fn take_stripe(&self, integration: &Integration, body: &[u8], now: OffsetDateTime) -> Result<Receipt, WebhookError> {
        let event = parse_stripe_event(body).map_err(|e| WebhookError::Malformed(e.to_string()))?;
        let account = integration.account_id;
        let outcome = if self.integrations.event_taken(Provider::Stripe, Some(account), &event.id).await? {
            EventOutcome::Duplicate
        } else if let Some(payment) = &event.payment {
            match self.paying_prospect(account, payment).await? {
                Some(prospect) => match self.prospects.set_status(account, &ProspectRef::Id(prospect), ProspectStatus::Converted, StatusReason::Payment).await {
                    Ok(_) => EventOutcome::Applied,
                    // Erased since it was found.
                    Err(ServiceError::NotFound) => EventOutcome::Unmatched,
                    Err(e) => return Err(e.into()),
                },
                None => {
                    info!(account_id = %account, "a Stripe payment that names no prospect of the account: nothing changed");
                    EventOutcome::Unmatched
                }
            }
        } else {
            EventOutcome::Ignored
        };
        self.log(integration, Some(account), event.id.clone(), event.event_type.clone(), outcome, now).await?;
        Ok(Receipt { events: vec![ReceiptEvent { id: event.id, event_type: event.event_type, outcome }] })
    }

    /// The account's prospect a payment names: by `metadata.prospect_id`, then
    /// `client_reference_id` (our id, else the account's external_id), then
    /// `metadata.external_id`, then the customer's email.
    async fn paying_prospect(&self, account: AccountId, payment: &PaymentMatch) -> Result<Option<ProspectId>, StoreError> {
        let mut candidates = Vec::new();
        if let Some(id) = payment.prospect_id.as_deref().and_then(|id| ProspectId::parse(id).ok()) {
            candidates.push(ProspectRef::Id(id));
        }
        if let Some(reference) = payment.client_reference_id.as_deref() {
            match ProspectId::parse(reference) {
                Ok(id) => candidates.push(ProspectRef::Id(id)),
                Err(_) => candidates.extend(ExternalId::parse(reference).ok().map(ProspectRef::ExternalId)),
            }
        }
        candidates.extend(payment.external_id.as_deref().and_then(|e| ExternalId::parse(e).ok()).map(ProspectRef::ExternalId));
        candidates.extend(payment.emails.iter().filter_map(|e| NormalizedEmail::parse(e).ok()).map(ProspectRef::Email));
        for candidate in &candidates {
            if let Some(prospect) = self.repo.find(account, candidate).await? {
                return Ok(Some(prospect.id));
            }
        }
        Ok(None)
    }

    /// Applies the feedback of one event of an SMTP provider within the endpoint's account: by
    /// the `Message-ID` we set (when it names this account), else by the recipient's address.
    async fn take_feedback_event(&self, integration: &Integration, feedback: &[Feedback]) -> Result<EventOutcome, StoreError> {
        if feedback.is_empty() {
            return Ok(EventOutcome::Ignored);
        }
        let account = integration.account_id;
        let mut outcomes = Vec::with_capacity(feedback.len());
        for f in feedback {
            let target = match f.reference.filter(|r| r.account == account) {
                Some(reference) => Some(FeedbackTarget::from(reference)),
                None => match NormalizedEmail::parse(&f.recipient) {
                    Ok(email) => self
                        .repo
                        .find(account, &ProspectRef::Email(email))
                        .await?
                        .map(|p| FeedbackTarget { account, prospect: p.id, send: None }),
                    Err(_) => None,
                },
            };
            let outcome = match target {
                Some(target) => self.feedback.apply_to(f, target).await?,
                None => FeedbackOutcome::Unmatched,
            };
            outcomes.push(outcome);
        }
        Ok(summarize(&outcomes))
    }

    /// Takes one Amazon SNS delivery (`POST /webhooks/ses`): a notification of SES events is
    /// applied through the feedback service; a subscription confirmation of an allowed topic is
    /// confirmed.
    ///
    /// # Errors
    /// [`WebhookError`]: nothing was applied.
    pub async fn receive_sns(&self, body: &[u8]) -> Result<Receipt, WebhookError> {
        let now = self.clock.now();
        let verified = match self.sns.verify(body, now).await {
            Ok(v) => v,
            Err(e) => {
                warn!(error = %e, "SNS message refused");
                let refusal = match e {
                    SnsError::TopicNotAllowed => WebhookError::TopicNotAllowed,
                    SnsError::Malformed(m) => WebhookError::Malformed(m),
                    SnsError::CertificateUnavailable(_) => return Err(WebhookError::SnsUnreachable),
                    _ => self.refuse(SES_BUCKET, now).await,
                };
                if !matches!(refusal, WebhookError::RateLimited(_)) {
                    let record = ReceivedEvent {
                        provider: Provider::Ses,
                        endpoint_id: None,
                        account_id: None,
                        event_id: String::new(),
                        event_type: String::new(),
                        received_at: now,
                        outcome: EventOutcome::Rejected,
                    };
                    self.integrations.record_event(&record).await?;
                }
                return Err(refusal);
            }
        };
        let (event_id, event_type, account, outcome) = match verified {
            VerifiedSns::Notification { message_id, message, .. } => {
                let (account, event_type, outcome) = self.take_ses(&message, now).await?;
                (message_id, event_type, account, outcome)
            }
            VerifiedSns::SubscriptionConfirmation { topic_arn, subscribe_url, .. } => {
                self.sns.confirm(&subscribe_url).await.map_err(|_| WebhookError::SnsUnreachable)?;
                info!(topic_arn, "SNS subscription confirmed");
                (topic_arn, "SubscriptionConfirmation".to_owned(), None, EventOutcome::Applied)
            }
            VerifiedSns::UnsubscribeConfirmation { topic_arn, .. } => (topic_arn, "UnsubscribeConfirmation".to_owned(), None, EventOutcome::Ignored),
        };
        let record = ReceivedEvent {
            provider: Provider::Ses,
            endpoint_id: None,
            account_id: account,
            event_id: event_id.clone(),
            event_type: event_type.clone(),
            received_at: now,
            outcome,
        };
        self.integrations.record_event(&record).await?;
        Ok(Receipt { events: vec![ReceiptEvent { id: event_id, event_type, outcome }] })
    }

    /// Applies one SES notification; the account its email named, its type and its outcome.
    async fn take_ses(&self, message: &str, now: OffsetDateTime) -> Result<(Option<AccountId>, String, EventOutcome), WebhookError> {
        let feedback = match parse_ses_notification(message, now) {
            Ok(f) => f,
            Err(FeedbackError::Ignored(kind)) => return Ok((None, kind, EventOutcome::Ignored)),
            Err(e) => return Err(WebhookError::Malformed(e.to_string())),
        };
        let event_type = feedback.first().map(|f| f.kind.as_str().to_owned()).unwrap_or_default();
        let (mut account, mut outcomes) = (None, Vec::with_capacity(feedback.len()));
        for f in &feedback {
            let outcome = match self.feedback.resolve(f).await? {
                Some(target) => {
                    account = Some(target.account);
                    self.feedback.apply_to(f, target).await?
                }
                None => FeedbackOutcome::Unmatched,
            };
            outcomes.push(outcome);
        }
        Ok((account, event_type, summarize(&outcomes)))
    }
}

/// One outcome for an event of several pieces of feedback: applied if any applied, a
/// duplicate if all were, else unmatched.
fn summarize(outcomes: &[FeedbackOutcome]) -> EventOutcome {
    if outcomes.iter().any(|o| matches!(o, FeedbackOutcome::Applied(_) | FeedbackOutcome::Recorded)) {
        EventOutcome::Applied
    } else if !outcomes.is_empty() && outcomes.iter().all(|o| *o == FeedbackOutcome::Duplicate) {
        EventOutcome::Duplicate
    } else if outcomes.is_empty() {
        EventOutcome::Ignored
    } else {
        EventOutcome::Unmatched
    }
}
