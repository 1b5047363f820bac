//! The feedback function's entry point: Amazon SES notifications as SNS delivers them to a
//! Lambda subscription ([`handle_feedback`]).

use aws_lambda_events::event::sns::SnsEvent;
use tracing::warn;

use super::smtp::redact_addresses;
use crate::feedback::{FeedbackOutcome, FeedbackService, NotificationError};
use crate::ports::StoreError;

/// Applies the SES notification of every record of `event`, in order; returns what each piece
/// of feedback did. A record that is not an SES notification is logged and skipped: no
/// redelivery could make it one.
///
/// # Errors
/// The first storage failure. The invocation fails then, and Lambda runs it again (an SNS
/// delivery is asynchronous: two more attempts, then the function's dead-letter queue); what
/// was applied before the failure is not applied twice.
pub async fn handle_feedback(service: &FeedbackService, event: SnsEvent) -> Result<Vec<FeedbackOutcome>, StoreError> {
    let mut outcomes = Vec::new();
    for record in event.records {
        let message_id = record.sns.message_id;
        match service.apply_ses_notification(&record.sns.message).await {
            Ok(applied) => outcomes.extend(applied),
            Err(NotificationError::Unreadable(e)) => {
                warn!(%message_id, error = %redact_addresses(&e.to_string()), "SNS message that is not an SES notification: skipped");
            }
            Err(NotificationError::Store(e)) => return Err(e),
        }
    }
    Ok(outcomes)
}
