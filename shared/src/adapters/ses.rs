//! Amazon SES v2 mailer: sends the MIME message the SMTP adapter builds as a raw message, so the
//! one-click unsubscribe headers reach the recipient. `MessageRejected` rejects the recipient
//! (suppressed address, unverified recipient in the sandbox), unless SES names the sender in
//! it (an unverified sending identity: our configuration, not the prospect's address).
//! Throttling, sending limits, paused or suspended sending, an unverified MAIL FROM domain,
//! timeouts, dispatch failures and anything unknown are transient: a misclassified failure
//! goes to the dead-letter queue rather than losing the email or bouncing the prospect.

use crate::telemetry::error_chain;
use async_trait::async_trait;
use aws_sdk_sesv2::operation::send_email::SendEmailError;
use aws_sdk_sesv2::primitives::Blob;
use aws_sdk_sesv2::types::{Destination, EmailContent, RawMessage};
use aws_sdk_sesv2::Client;

use super::smtp::{build_message, redact_addresses, ProviderFailure};
use crate::ports::{MailError, Mailer, OutgoingEmail};

/// Sends emails with the SES v2 `SendEmail` API.
#[derive(Clone, Debug)]
pub struct SesMailer {
    client: Client,
}

impl SesMailer {
    #[must_use]
    pub fn new(client: Client) -> Self {
        Self { client }
    }
}

#[async_trait]
impl Mailer for SesMailer {
    async fn send(&self, email: &OutgoingEmail) -> Result<(), MailError> {
        let message = build_message(email)?;
        let sender = message.envelope().from().map(ToString::to_string);
        let recipients = message.envelope().to().iter().map(ToString::to_string).collect();
        let raw = RawMessage::builder()
            .data(Blob::new(message.formatted()))
            .build()
            .map_err(|e| MailError::Transient(Box::new(e)))?;
        self.client
            .send_email()
            .set_from_email_address(sender.clone())
            .destination(Destination::builder().set_to_addresses(Some(recipients)).build())
            .content(EmailContent::builder().raw(raw).build())
            .send()
            .await
            .map(drop)
            .map_err(|e| classify(&e.into_service_error(), sender.as_deref()))
    }
}

fn classify(error: &SendEmailError, sender: Option<&str>) -> MailError {
    if let SendEmailError::MessageRejected(rejected) = error {
        let reason = rejected.message().unwrap_or_default();
        let names_sender = sender.is_some_and(|s| reason.to_ascii_lowercase().contains(&s.to_ascii_lowercase()));
        if !names_sender {
            return MailError::Rejected(format!("SES MessageRejected: {}", redact_addresses(reason)));
        }
    }
    MailError::Transient(Box::new(ProviderFailure::new(&error_chain(error))))
}


#[cfg(test)]
mod tests {
    use aws_sdk_sesv2::error::ErrorMetadata;
    use aws_sdk_sesv2::types::error::{
        AccountSuspendedException, BadRequestException, LimitExceededException, MailFromDomainNotVerifiedException,
        MessageRejected, NotFoundException, SendingPausedException, TooManyRequestsException,
    };

    use super::*;

    const SENDER: &str = "hello@cadenhq.test";

    fn rejected(message: &str) -> SendEmailError {
        SendEmailError::MessageRejected(MessageRejected::builder().message(message).build())
    }

    #[test]
    fn message_rejected_for_the_recipient_rejects_it_without_naming_it() {
        let error = rejected("Email address is not verified. The following identities failed the check in region US-EAST-1: ada@example.com");

        let result = classify(&error, Some(SENDER));

        let MailError::Rejected(reason) = result else { panic!("expected Rejected") };
        assert!(reason.starts_with("SES MessageRejected: Email address is not verified."), "{reason}");
        assert!(!reason.contains('@'), "{reason}");
    }

    #[test]
    fn message_rejected_naming_the_sender_is_transient() {
        let error = rejected("Email address is not verified. The following identities failed the check in region US-EAST-1: Hello@CadenHQ.test");

        let result = classify(&error, Some(SENDER));

        let MailError::Transient(source) = result else { panic!("expected Transient") };
        assert!(!source.to_string().contains('@'), "{source}");
    }

    #[test]
    fn throttling_limits_and_account_problems_are_transient() {
        let errors = [
            SendEmailError::TooManyRequestsException(TooManyRequestsException::builder().message("slow down").build()),
            SendEmailError::LimitExceededException(LimitExceededException::builder().message("quota").build()),
            SendEmailError::MailFromDomainNotVerifiedException(MailFromDomainNotVerifiedException::builder().build()),
            SendEmailError::SendingPausedException(SendingPausedException::builder().build()),
            SendEmailError::AccountSuspendedException(AccountSuspendedException::builder().build()),
            SendEmailError::BadRequestException(BadRequestException::builder().build()),
            SendEmailError::NotFoundException(NotFoundException::builder().build()),
            SendEmailError::generic(ErrorMetadata::builder().code("InternalFailure").build()),
        ];

        for error in errors {
            assert!(matches!(classify(&error, Some(SENDER)), MailError::Transient(_)), "{error}");
        }
    }
}
