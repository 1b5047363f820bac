//! Applying what mail providers report after a send: a bounce makes the prospect `bounced`, a
//! complaint `unsubscribed`, each once, through the store's one status write (the one a PATCH
//! makes); deliveries are recorded against their send. Notifications that match no prospect
//! change nothing.

use std::sync::Arc;

use tracing::{info, instrument, warn};

use crate::domain::{
    parse_ses_notification, AccountId, Clock, Effect, EmailReference, Feedback, FeedbackError, FeedbackKind, NormalizedEmail, ProspectId, ProspectStatus,
    SendKey, StatusReason,
};
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
    pub async fn apply(&self, feedback: &Feedback) -> Result<FeedbackOutcome, StoreError> {
        // The address first: a recipient that is not one costs no lookup.
        if NormalizedEmail::parse(&feedback.recipient).is_err() {
            return Ok(unmatched(feedback));
        }
        match self.resolve(feedback).await? {
            Some(target) => self.apply_to(feedback, target).await,
            None => Ok(unmatched(feedback)),
        }
    }

    /// The email a piece of feedback is about: from its tags or `Message-ID`, else from the
    /// send log by the provider's message id.
    ///
    /// # Errors
    /// Storage errors.
    pub async fn resolve(&self, feedback: &Feedback) -> Result<Option<FeedbackTarget>, StoreError> {
        let reference = match feedback.reference {
            Some(r) => Some(r),
            None if feedback.provider_message_id.is_empty() => None,
            None => self.log.sent_email(&feedback.provider_message_id).await?,
        };
        Ok(reference.map(FeedbackTarget::from))
    }

    /// Applies one piece of feedback to the prospect `target` names, if it is the one stored at
    /// the recipient's address.
    ///
    /// # Errors
    /// Storage errors.
    #[instrument(level = "debug", skip_all, fields(kind = feedback.kind.as_str()))]
    pub async fn apply_to(&self, feedback: &Feedback, target: FeedbackTarget) -> Result<FeedbackOutcome, StoreError> {
        let Ok(email) = NormalizedEmail::parse(&feedback.recipient) else { return Ok(unmatched(feedback)) };
        let change = match feedback.kind.effect() {
            Effect::Bounced => FeedbackChange::Status(ProspectStatus::Bounced, StatusReason::Bounce),
            Effect::Complained => FeedbackChange::Status(ProspectStatus::Unsubscribed, StatusReason::Complaint),
            Effect::Transient => FeedbackChange::TransientBounce,
            Effect::Recorded => {
                let recorded = match target.send {
                    Some(send) if feedback.kind == FeedbackKind::Delivery => self.log.record_delivery(send, feedback.at).await?,
                    _ => false,
                };
                if !recorded && feedback.kind == FeedbackKind::Delivery {
                    info!(prospect_id = %target.prospect, "delivery of an email with no sent record: nothing recorded");
                }
                return Ok(FeedbackOutcome::Recorded);
            }
        };
        let write = FeedbackWrite {
            feedback_id: feedback.feedback_id.clone(),
            prospect: ProspectKey { account: target.account, prospect: target.prospect, email_hash: email.key_hash().to_owned() },
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
                warn!(account_id = %target.account, prospect_id = %target.prospect, kind = write.kind, status = status.as_str(), "feedback changed the prospect's status");
            }
            other => info!(account_id = %target.account, prospect_id = %target.prospect, kind = write.kind, outcome = other.as_str(), "feedback applied"),
        }
        Ok(outcome)
    }
}

fn unmatched(feedback: &Feedback) -> FeedbackOutcome {
    info!(kind = feedback.kind.as_str(), "feedback that names no email of ours: nothing changed");
    FeedbackOutcome::Unmatched
}

/// The prospect a piece of feedback is for, and the step whose email it is about when known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedbackTarget {
    pub account: AccountId,
    pub prospect: ProspectId,
    pub send: Option<SendKey>,
}

impl From<EmailReference> for FeedbackTarget {
    fn from(r: EmailReference) -> Self {
        Self { account: r.account, prospect: r.prospect, send: Some(r.send) }
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
