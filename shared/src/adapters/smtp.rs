//! SMTP mailer: sends campaign emails through any relay named by a URL, and builds the MIME
//! message (plain text and HTML alternatives, RFC 8058 one-click unsubscribe headers) that the
//! SES adapter (and the embedded outbox) send as well.
//!
//! What a failure proves decides what happens next. A permanent reply in the mail-system range
//! (55x: mailbox unavailable, not local, storage exceeded, name not allowed, transaction failed)
//! rejects the recipient. Any other reply, a refused connection, a TLS or client-side failure
//! proves the relay did not take the message: it is retried later (a misconfigured relay fills
//! the dead-letter queue instead of bouncing every prospect). A timeout or a connection lost
//! mid-transaction may have happened after the relay took the message: the outcome is unknown
//! and the email is not sent again. Provider replies are kept for diagnostics with every
//! address in them redacted.

use std::fmt;

use async_trait::async_trait;
use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::response::{Category, Severity};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use crate::domain::EmailReference;
use crate::ports::{Delivered, MailError, Mailer, OutgoingEmail, SendClaim};

const LIST_UNSUBSCRIBE: HeaderName = HeaderName::new_from_ascii_str("List-Unsubscribe");
const LIST_UNSUBSCRIBE_POST: HeaderName = HeaderName::new_from_ascii_str("List-Unsubscribe-Post");
const ONE_CLICK: &str = "List-Unsubscribe=One-Click";

/// Why an [`SmtpMailer`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SmtpConfigError {
    #[error("invalid SMTP URL: {0} (expected smtp://host:port, smtps://user:pass@host or smtp://host:port?tls=required)")]
    InvalidUrl(lettre::transport::smtp::Error),
    #[error("the SMTP mailer must be built inside a Tokio runtime")]
    NoRuntime,
}

/// Sends emails through one SMTP relay, over a pool of connections.
pub struct SmtpMailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
}

impl fmt::Debug for SmtpMailer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpMailer").finish_non_exhaustive()
    }
}

impl SmtpMailer {
    /// A mailer for the relay at `url`: `smtp://host:port` (plain), `smtp://host:port?tls=required`
    /// (STARTTLS), `smtps://user:pass@host` (TLS from the start); credentials are optional and
    /// percent-encoded. Connects lazily, on the first send.
    ///
    /// # Errors
    /// [`SmtpConfigError::InvalidUrl`] for a URL lettre cannot use, [`SmtpConfigError::NoRuntime`]
    /// when called outside a Tokio runtime (the pool runs a cleanup task on it).
    pub fn from_url(url: &str) -> Result<Self, SmtpConfigError> {
        let builder = AsyncSmtpTransport::<Tokio1Executor>::from_url(url).map_err(SmtpConfigError::InvalidUrl)?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(SmtpConfigError::NoRuntime);
        }
        Ok(Self { transport: builder.build() })
    }
}

#[async_trait]
impl Mailer for SmtpMailer {
    async fn send(&self, email: &OutgoingEmail, claim: &SendClaim) -> Result<Delivered, MailError> {
        let message = build_message(email, &claim.reference)?;
        let message_id = message_id(&message);
        self.transport.send(message).await.map_err(|e| classify(&e))?;
        Ok(Delivered { message_id, recorded: false })
    }
}

fn classify(error: &lettre::transport::smtp::Error) -> MailError {
    let failure = ProviderFailure::new(&error.to_string());
    if let Some(code) = error.status() {
        if code.severity == Severity::PermanentNegativeCompletion && code.category == Category::MailSystem {
            return MailError::Rejected(format!("SMTP {failure}"));
        }
        return MailError::NotAccepted(Box::new(failure));
    }
    if error.is_client() || error.is_tls() || error.is_transport_shutdown() || refused_connection(error) {
        return MailError::NotAccepted(Box::new(failure));
    }
    MailError::Unknown(Box::new(failure))
}

/// Whether the failure is a connection the relay never accepted.
pub(crate) fn refused_connection(error: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind;
    let mut source = Some(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(io.kind(), ErrorKind::ConnectionRefused | ErrorKind::AddrNotAvailable | ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable) {
                return true;
            }
        }
        source = e.source();
    }
    false
}

/// The `Message-ID` header of a built message, without its angle brackets.
pub(crate) fn message_id(message: &Message) -> String {
    message.headers().get_raw("Message-ID").unwrap_or_default().trim().trim_start_matches('<').trim_end_matches('>').to_owned()
}

/// The headers of a MIME message, in order, with folded lines joined.
pub(crate) fn header_lines(mime: &str) -> Vec<(String, String)> {
    let mut headers: Vec<(String, String)> = Vec::new();
    for line in mime.split("\r\n").take_while(|l| !l.is_empty()) {
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = headers.last_mut() {
                value.push(' ');
                value.push_str(line.trim());
            }
        } else if let Some((name, value)) = line.split_once(':') {
            headers.push((name.to_owned(), value.trim().to_owned()));
        }
    }
    headers
}

/// The MIME message for `email`: `From`, `To`, `Subject` (RFC 2047-encoded when needed),
/// `Date`, `Message-ID` (naming `reference`: [`EmailReference::message_id`]), the two RFC 8058
/// headers, and a multipart/alternative body with the plain-text part first and the HTML part
/// last.
///
/// # Errors
/// [`MailError::Rejected`] when `to` is not an email address; [`MailError::NotAccepted`] when
/// `from` is not one (a configuration problem: the job is retried and dead-lettered rather than
/// the prospect marked bounced; [`validate_sender`] catches it at start-up) or when the
/// unsubscribe URL is not a plain ASCII URL (a bug upstream, handled the same way).
/// Checks a configured sender (`From:`) address, so a typo fails at start-up.
///
/// # Errors
/// A message naming the problem.
pub fn validate_sender(sender: &str) -> Result<(), String> {
    sender.parse::<Mailbox>().map(drop).map_err(|e| format!("the sender address {sender:?} is invalid: {e}"))
}

pub(crate) fn build_message(email: &OutgoingEmail, reference: &EmailReference) -> Result<Message, MailError> {
    let to: Mailbox =
        email.to.parse().map_err(|e| MailError::Rejected(format!("invalid recipient address: {e}")))?;
    let from: Mailbox = email
        .from
        .parse()
        .map_err(|e| MailError::NotAccepted(Box::new(ProviderFailure::new(&format!("invalid sender address: {e}")))))?;
    // The sender's domain is ours: the Message-ID is of our domain whatever host sends it.
    let message_id = format!("<{}>", reference.message_id(from.email.domain()));
    let url = &email.unsubscribe_url;
    if url.is_empty() || !url.bytes().all(|b| b.is_ascii_graphic() && b != b'<' && b != b'>') {
        return Err(MailError::NotAccepted(Box::new(ProviderFailure::new(
            "the unsubscribe URL is empty or not a plain ASCII URL",
        ))));
    }
    Message::builder()
        .from(from)
        .to(to)
        .subject(email.subject.as_str())
        .message_id(Some(message_id))
        .raw_header(HeaderValue::new(LIST_UNSUBSCRIBE, format!("<{url}>")))
        .raw_header(HeaderValue::new(LIST_UNSUBSCRIBE_POST, ONE_CLICK.to_owned()))
        .multipart(MultiPart::alternative_plain_html(email.text_body.clone(), email.html_body.clone()))
        .map_err(|e| MailError::NotAccepted(Box::new(e)))
}

/// A mail provider's failure as text, with every address in it redacted.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct ProviderFailure(String);

impl ProviderFailure {
    pub(crate) fn new(text: &str) -> Self {
        Self(redact_addresses(text))
    }
}

/// `text` with every word that contains an `@` replaced by `[address]`.
pub(crate) fn redact_addresses(text: &str) -> String {
    text.split_whitespace().map(|word| if word.contains('@') { "[address]" } else { word }).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn email() -> OutgoingEmail {
        OutgoingEmail {
            to: "ada@example.com".into(),
            from: "CadenHQ <hello@cadenhq.test>".into(),
            subject: "Welcome aboard".into(),
            text_body: "Hi Ada".into(),
            html_body: "<p>Hi Ada</p>".into(),
            unsubscribe_url: "https://api.cadenhq.test/unsubscribe?token=abc123".into(),
        }
    }

    fn reference() -> EmailReference {
        use crate::domain::{AccountId, EnrollmentId, ProspectId, SendKey};
        EmailReference { account: AccountId::new(), prospect: ProspectId::new(), send: SendKey { enrollment: EnrollmentId::new(), step: 1 } }
    }

    fn build_message_for(email: &OutgoingEmail) -> Result<Message, MailError> {
        build_message(email, &reference())
    }

    fn formatted(email: &OutgoingEmail) -> String {
        String::from_utf8(build_message(email, &reference()).expect("valid email").formatted()).expect("ASCII message")
    }

    fn header_block(message: &str) -> &str {
        message.split("\r\n\r\n").next().unwrap_or_default()
    }

    #[test]
    fn message_carries_both_one_click_unsubscribe_headers() {
        let message = formatted(&email());

        let headers = header_block(&message);
        assert!(headers.contains("\r\nList-Unsubscribe: <https://api.cadenhq.test/unsubscribe?token=abc123>\r\n"), "{headers}");
        assert!(headers.contains("\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"), "{headers}");
    }

    #[test]
    fn message_is_multipart_alternative_with_text_before_html() {
        let message = formatted(&email());

        assert!(header_block(&message).contains("Content-Type: multipart/alternative;"), "{message}");
        let text = message.find("Content-Type: text/plain").expect("text part");
        let html = message.find("Content-Type: text/html").expect("html part");
        assert!(text < html, "the preferred (HTML) part must come last");
        assert!(message.contains("\r\n\r\nHi Ada\r\n"), "{message}");
        assert!(message.contains("\r\n\r\n<p>Hi Ada</p>\r\n"), "{message}");
    }

    #[test]
    fn message_has_addresses_date_and_message_id() {
        let message = formatted(&email());

        let headers = header_block(&message);
        assert!(headers.contains("From: CadenHQ <hello@cadenhq.test>\r\n"), "{headers}");
        assert!(headers.contains("To: ada@example.com\r\n"), "{headers}");
        assert!(headers.contains("Date: "), "{headers}");
        assert!(headers.contains("Message-ID: <"), "{headers}");
    }

    #[test]
    fn the_message_id_is_of_the_senders_domain_and_names_the_step() {
        let reference = reference();
        let message = build_message(&email(), &reference).unwrap();
        let id = message_id(&message);
        assert!(id.ends_with("@cadenhq.test"), "{id}");
        assert_eq!(EmailReference::from_message_id(&id), Some(reference));
        assert!(header_block(&formatted(&email())).contains("Message-ID: <cadenhq."), "one header, in angle brackets");
    }

    #[test]
    fn non_ascii_subject_is_an_encoded_word() {
        let message = formatted(&OutgoingEmail { subject: "Bienvenue, Zoé".into(), ..email() });

        let headers = header_block(&message);
        assert!(headers.contains("Subject: Bienvenue, =?utf-8?b?Wm/DqQ==?=\r\n"), "{headers}");
    }

    #[test]
    fn line_breaks_in_subject_cannot_inject_headers() {
        let message = formatted(&OutgoingEmail { subject: "Hi\r\nBcc: victim@example.com".into(), ..email() });

        let headers = header_block(&message);
        assert!(!headers.contains("\r\nBcc:"), "{headers}");
    }

    #[test]
    fn invalid_recipient_is_rejected() {
        let result = build_message_for(&OutgoingEmail { to: "not an address".into(), ..email() });

        assert!(matches!(result, Err(MailError::Rejected(m)) if m.contains("recipient")));
    }

    #[test]
    fn invalid_sender_is_a_configuration_failure_not_a_bounce() {
        let result = build_message_for(&OutgoingEmail { from: "cadenhq.test".into(), ..email() });

        assert!(matches!(result, Err(MailError::NotAccepted(e)) if e.to_string().contains("sender")));
        assert!(validate_sender("cadenhq.test").is_err());
        assert!(validate_sender("Acme <hello@acme.example>").is_ok());
    }

    #[test]
    fn unsubscribe_url_that_would_break_the_header_is_not_sent() {
        for url in ["", "https://x.test/u?t=a b", "https://x.test/u>", "https://x.test/ü"] {
            let result = build_message_for(&OutgoingEmail { unsubscribe_url: url.into(), ..email() });

            assert!(matches!(result, Err(MailError::NotAccepted(_))), "{url:?}");
        }
    }

    #[test]
    fn header_lines_unfold_and_keep_the_order() {
        let message = build_message(&email(), &reference()).unwrap();
        let text = String::from_utf8(message.formatted()).unwrap();

        let headers = header_lines(&text);

        let names: Vec<&str> = headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names.first(), Some(&"From"), "{names:?}");
        assert!(names.contains(&"List-Unsubscribe") && names.contains(&"List-Unsubscribe-Post"), "{names:?}");
        let id = &headers.iter().find(|(n, _)| n == "Message-ID").expect("Message-ID").1;
        assert_eq!(*id, format!("<{}>", message_id(&message)));
        assert!(!message_id(&message).is_empty());
    }

    #[test]
    fn redaction_hides_every_address() {
        let text = redact_addresses("550 5.1.1 <ada@example.com>: Recipient address rejected: ada@example.com");

        assert_eq!(text, "550 5.1.1 [address] Recipient address rejected: [address]");
    }

    #[tokio::test]
    async fn unknown_url_scheme_is_a_config_error() {
        let result = SmtpMailer::from_url("http://127.0.0.1:25");

        assert!(matches!(result, Err(SmtpConfigError::InvalidUrl(_))));
    }

    #[test]
    fn building_outside_a_runtime_is_a_config_error() {
        let result = SmtpMailer::from_url("smtp://127.0.0.1:25");

        assert!(matches!(result, Err(SmtpConfigError::NoRuntime)));
    }
}
