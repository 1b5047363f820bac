//! Applying what mail providers report after a send: a bounce makes the prospect `bounced`, a
//! complaint `unsubscribed`, each once, through the store's one status write (the one a PATCH
//! makes); deliveries are recorded against their send. Notifications that match no prospect
//! change nothing.

use std::sync::Arc;

use tracing::{info, instrument, warn};

use crate::domain::{parse_ses_notification, Clock, Effect, Feedback, FeedbackError, FeedbackKind, NormalizedEmail, ProspectStatus, StatusReason};
use crate::ports::{FeedbackApplied, FeedbackChange, FeedbackLog, FeedbackWrite, ProspectKey, StoreError};

/// What one piece of feedback did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedbackOutcome {
    /// Applied to its prospect; the status it set, if any (a first or second transient bounce
    /// sets none).
    Applied(Option<ProspectStatus>),
    /// A delivery or a rejection, recorded against its send (or nothing to record it on).
    Recorded,
    /// Applied before: nothing changed.
    Duplicate,
    /// It names no prospect we hold (not our email, an erased prospect, another address).
    Unmatched,
}

impl FeedbackOutcome {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Applied(_) => "applied",
            Self::Recorded => "recorded",
            Self::Duplicate => "duplicate",
            Self::Unmatched => "unmatched",
        }
    }
}

/// The feedback service.
#[derive(Clone)]
pub struct FeedbackService {
    log: Arc<dyn FeedbackLog>,
    clock: Arc<dyn Clock>,
}

impl FeedbackService {
    #[must_use]
    pub fn new(log: Arc<dyn FeedbackLog>, clock: Arc<dyn Clock>) -> Self {
        Self { log, clock }
    }

    /// Applies every piece of feedback of one Amazon SES notification (either shape), in order.
    ///
    /// # Errors
    /// [`NotificationError::Unreadable`] for a notification that is not one (nothing is applied:
    /// redelivering it cannot help), [`NotificationError::Store`] when the store failed (what was
    /// applied before the failure stays applied, once: redelivering it is safe).
    pub async fn apply_ses_notification(&self, json: &str) -> Result<Vec<FeedbackOutcome>, NotificationError> {
        let feedback = match parse_ses_notification(json, self.clock.now()) {
            Ok(f) => f,
            Err(FeedbackError::Ignored(kind)) => {
                info!(kind, "SES notification of a type that is not feedback: ignored");
                return Ok(Vec::new());
            }
            Err(e) => return Err(NotificationError::Unreadable(e)),
        };
        let mut outcomes = Vec::with_capacity(feedback.len());
        for f in &feedback {
            outcomes.push(self.apply(f).await?);
        }
        Ok(outcomes)
    }

    /// Applies one piece of feedback. The prospect is found by the email's tags or
    /// `Message-ID` (else by the provider's message id in the send log), and must be stored at
    /// the recipient's address.
    ///
    /// # Errors
    /// Storage errors.
    #[instrument(level = "debug", skip_all, fields(kind = feedback.kind.as_str()))]
    pub async fn apply(&self, feedback: &Feedback) -> Result<FeedbackOutcome, StoreError> {
        let unmatched = || {
            info!(kind = feedback.kind.as_str(), "feedback that names no email of ours: nothing changed");
            Ok(FeedbackOutcome::Unmatched)
        };
        // The address first: a recipient that is not one costs no lookup.
        let Ok(email) = NormalizedEmail::parse(&feedback.recipient) else { return unmatched() };
        let reference = match feedback.reference {
            Some(r) => Some(r),
            None => self.log.sent_email(&feedback.provider_message_id).await?,
        };
        let Some(reference) = reference else { return unmatched() };
        let change = match feedback.kind.effect() {
            Effect::Bounced => FeedbackChange::Status(ProspectStatus::Bounced, StatusReason::Bounce),
            Effect::Complained => FeedbackChange::Status(ProspectStatus::Unsubscribed, StatusReason::Complaint),
            Effect::Transient => FeedbackChange::TransientBounce,
            Effect::Recorded => {
                if feedback.kind == FeedbackKind::Delivery && !self.log.record_delivery(reference.send, feedback.at).await? {
                    info!(prospect_id = %reference.prospect, "delivery of an email with no sent record: nothing recorded");
                }
                return Ok(FeedbackOutcome::Recorded);
            }
        };
        let write = FeedbackWrite {
            feedback_id: feedback.feedback_id.clone(),
            prospect: ProspectKey { account: reference.account, prospect: reference.prospect, email_hash: email.key_hash().to_owned() },
            kind: feedback.kind.as_str(),
            at: feedback.at,
            change,
            now: self.clock.now(),
        };
        let outcome = match self.log.apply_feedback(&write).await? {
            FeedbackApplied::Applied(status) => FeedbackOutcome::Applied(status),
            FeedbackApplied::Duplicate => FeedbackOutcome::Duplicate,
            FeedbackApplied::Unmatched => FeedbackOutcome::Unmatched,
        };
        match outcome {
            FeedbackOutcome::Applied(Some(status)) => {
                warn!(account_id = %reference.account, prospect_id = %reference.prospect, kind = write.kind, status = status.as_str(), "feedback changed the prospect's status");
            }
            other => info!(account_id = %reference.account, prospect_id = %reference.prospect, kind = write.kind, outcome = other.as_str(), "feedback applied"),
        }
        Ok(outcome)
    }
}

/// Why a notification was not applied.
#[derive(Debug, thiserror::Error)]
pub enum NotificationError {
    #[error(transparent)]
    Unreadable(FeedbackError),
    #[error(transparent)]
    Store(#[from] StoreError),
}
