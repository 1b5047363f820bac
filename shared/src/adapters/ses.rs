//! Amazon SES v2 mailer: sends the MIME message the SMTP adapter builds as a raw message, so the
//! one-click unsubscribe headers reach the recipient.
//!
//! A send is retried only when SES's answer proves it did not take the email, so its client
//! has settings of its own ([`SesMailer::from_sdk_config`]): no SDK retries (the scheduler
//! retries what may be retried, with backoff, and records each attempt), a short connect
//! timeout (a connection never made sent nothing) and a bounded attempt timeout (after which
//! the outcome is unknown, and the email is not sent again).
//!
//! `MessageRejected` rejects the recipient (suppressed address, unverified recipient in the
//! sandbox), unless SES names the sender in it (an unverified sending identity: our
//! configuration, not the prospect's address). Any other 4xx answer (throttling, sending
//! limits, paused or suspended sending, an unverified MAIL FROM domain), a request that could
//! not be built, and a refused connection did not send anything: not accepted. A timeout, a
//! dropped connection, an unreadable answer or a 5xx answer may follow acceptance: unknown.

use std::time::Duration;

use crate::telemetry::error_chain;
use async_trait::async_trait;
use aws_sdk_sesv2::config::retry::RetryConfig;
use aws_sdk_sesv2::config::timeout::TimeoutConfig;
use aws_sdk_sesv2::error::SdkError;
use aws_sdk_sesv2::operation::send_email::SendEmailError;
use aws_sdk_sesv2::primitives::Blob;
use aws_sdk_sesv2::types::{Destination, EmailContent, MessageTag, RawMessage};
use aws_sdk_sesv2::Client;

use super::smtp::{build_message, redact_addresses, refused_connection, ProviderFailure};
use crate::ports::{Delivered, MailError, Mailer, OutgoingEmail, SendClaim};

/// Longest wait for a connection to SES: one not made in this time sent nothing.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for SES's answer to one send; after it the outcome is unknown. Well inside the
/// scheduler function's timeout and its claims' lease.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends emails with the SES v2 `SendEmail` API.
#[derive(Clone, Debug)]
pub struct SesMailer {
    client: Client,
    configuration_set: Option<String>,
}

impl SesMailer {
    /// A mailer over a client built by the caller, used as it is.
    #[must_use]
    pub fn new(client: Client) -> Self {
        Self { client, configuration_set: None }
    }

    /// Sends through the configuration set `name` (whose event destinations report bounces,
    /// complaints and deliveries), or without one for `None`.
    #[must_use]
    pub fn with_configuration_set(self, name: Option<String>) -> Self {
        Self { configuration_set: name, ..self }
    }

    /// A mailer over a client with the sending settings above (one attempt, bounded timeouts).
    #[must_use]
    pub fn from_sdk_config(sdk: &aws_config::SdkConfig) -> Self {
        let config = aws_sdk_sesv2::config::Builder::from(sdk)
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .operation_attempt_timeout(SEND_TIMEOUT)
                    .operation_timeout(SEND_TIMEOUT)
                    .build(),
            )
            .build();
        Self::new(Client::from_conf(config))
    }
}

#[async_trait]
impl Mailer for SesMailer {
    async fn send(&self, email: &OutgoingEmail, claim: &SendClaim) -> Result<Delivered, MailError> {
        let message = build_message(email, &claim.reference)?;
        // SES replaces the Message-ID; its event notifications carry these tags back instead.
        let tags = claim
            .reference
            .tags()
            .into_iter()
            .map(|(name, value)| MessageTag::builder().name(name).value(value).build().map_err(|e| MailError::NotAccepted(Box::new(e))))
            .collect::<Result<Vec<_>, _>>()?;
        let sender = message.envelope().from().map(ToString::to_string);
        let recipients = message.envelope().to().iter().map(ToString::to_string).collect();
        let raw = RawMessage::builder()
            .data(Blob::new(message.formatted()))
            .build()
            .map_err(|e| MailError::NotAccepted(Box::new(e)))?;
        let out = self
            .client
            .send_email()
            .set_from_email_address(sender.clone())
            .destination(Destination::builder().set_to_addresses(Some(recipients)).build())
            .content(EmailContent::builder().raw(raw).build())
            .set_configuration_set_name(self.configuration_set.clone())
            .set_email_tags(Some(tags))
            .send()
            .await
            .map_err(|e| classify_sdk(e, sender.as_deref()))?;
        Ok(Delivered { message_id: out.message_id.unwrap_or_default(), recorded: false })
    }
}

fn classify_sdk(error: SdkError<SendEmailError, aws_sdk_sesv2::config::http::HttpResponse>, sender: Option<&str>) -> MailError {
    let failure = |e: &dyn std::error::Error| ProviderFailure::new(&error_chain(e));
    match error {
        SdkError::ConstructionFailure(_) => MailError::NotAccepted(Box::new(failure(&error))),
        SdkError::DispatchFailure(ref d) if refused_connection(&error) || d.is_user() => {
            MailError::NotAccepted(Box::new(failure(&error)))
        }
        SdkError::ServiceError(ref se) => {
            let client_error = se.raw().status().is_client_error();
            classify(se.err(), sender, client_error)
        }
        _ => MailError::Unknown(Box::new(failure(&error))),
    }
}

/// What an answer of SES proves: `client_error` when its HTTP status was 4xx.
fn classify(error: &SendEmailError, sender: Option<&str>, client_error: bool) -> MailError {
    if let SendEmailError::MessageRejected(rejected) = error {
        let reason = rejected.message().unwrap_or_default();
        let names_sender = sender.is_some_and(|s| reason.to_ascii_lowercase().contains(&s.to_ascii_lowercase()));
        if !names_sender {
            return MailError::Rejected(format!("SES MessageRejected: {}", redact_addresses(reason)));
        }
    }
    let failure = Box::new(ProviderFailure::new(&error_chain(error)));
    if client_error {
        MailError::NotAccepted(failure)
    } else {
        MailError::Unknown(failure)
    }
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

        let result = classify(&error, Some(SENDER), true);

        let MailError::Rejected(reason) = result else { panic!("expected Rejected") };
        assert!(reason.starts_with("SES MessageRejected: Email address is not verified."), "{reason}");
        assert!(!reason.contains('@'), "{reason}");
    }

    #[test]
    fn message_rejected_naming_the_sender_is_not_accepted() {
        let error = rejected("Email address is not verified. The following identities failed the check in region US-EAST-1: Hello@CadenHQ.test");

        let result = classify(&error, Some(SENDER), true);

        let MailError::NotAccepted(source) = result else { panic!("expected NotAccepted") };
        assert!(!source.to_string().contains('@'), "{source}");
    }

    #[test]
    fn four_hundreds_prove_nothing_was_sent_and_five_hundreds_do_not() {
        let errors = [
            SendEmailError::TooManyRequestsException(TooManyRequestsException::builder().message("slow down").build()),
            SendEmailError::LimitExceededException(LimitExceededException::builder().message("quota").build()),
            SendEmailError::MailFromDomainNotVerifiedException(MailFromDomainNotVerifiedException::builder().build()),
            SendEmailError::SendingPausedException(SendingPausedException::builder().build()),
            SendEmailError::AccountSuspendedException(AccountSuspendedException::builder().build()),
            SendEmailError::BadRequestException(BadRequestException::builder().build()),
            SendEmailError::NotFoundException(NotFoundException::builder().build()),
        ];
        for error in errors {
            assert!(matches!(classify(&error, Some(SENDER), true), MailError::NotAccepted(_)), "{error}");
        }

        let internal = SendEmailError::generic(ErrorMetadata::builder().code("InternalFailure").build());
        assert!(matches!(classify(&internal, Some(SENDER), false), MailError::Unknown(_)));
    }
}
