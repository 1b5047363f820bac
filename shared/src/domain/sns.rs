//! Amazon SNS messages as an HTTP/HTTPS subscription receives them: the JSON envelope of a
//! notification or of a subscription or unsubscribe confirmation, parsed so that a message is
//! only ever whole for its type, the exact text SNS signs, the rules for the URLs a message may
//! point us at (an SNS endpoint host, over HTTPS) and the window a message is fresh in.
//! Fetching certificates and checking signatures is the adapter's (`adapters::sns_http`).

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde::Deserialize;
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};

/// How old a message may be: SNS signs a message when it first sends it and keeps the
/// signature on its retries, which end within the hour.
pub const SNS_MAX_AGE: Duration = Duration::hours(1);

/// How far ahead of our clock a message's `Timestamp` may be (clock skew between SNS and us);
/// a message further in the future is refused like a stale one.
pub const SNS_MAX_CLOCK_SKEW: Duration = Duration::minutes(5);

/// Why a message was refused. The messages name the rule that failed, never a field's value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnsError {
    /// Not the JSON of an SNS message, or a field its type needs is missing or unreadable.
    #[error("malformed SNS message: {0}")]
    Malformed(String),
    /// A `SignatureVersion` other than 1 (SHA1withRSA) or 2 (SHA256withRSA).
    #[error("unsupported SNS signature version")]
    UnsupportedSignatureVersion,
    /// A `SigningCertURL` that is not an SNS certificate on an SNS endpoint host over HTTPS.
    #[error("SNS signing certificate URL rejected")]
    CertUrlRejected,
    /// A `SubscribeURL` or `UnsubscribeURL` that is not on an SNS endpoint host over HTTPS.
    #[error("SNS subscription URL rejected")]
    SubscribeUrlRejected,
    /// A `Timestamp` older than [`SNS_MAX_AGE`] or more than [`SNS_MAX_CLOCK_SKEW`] ahead.
    #[error("SNS message outside its validity window")]
    Stale,
    /// The signature does not verify with the signing certificate.
    #[error("SNS message signature does not verify")]
    BadSignature,
    /// The signing certificate could not be had (or was not a certificate): a passing failure
    /// as far as the sender is concerned.
    #[error("SNS signing certificate unavailable: {0}")]
    CertificateUnavailable(String),
    /// A `TopicArn` that is not one of those configured.
    #[error("SNS topic not allowed")]
    TopicNotAllowed,
    /// The GET of a `SubscribeURL` failed.
    #[error("SNS subscription confirmation failed: {0}")]
    ConfirmationFailed(String),
}

fn malformed(reason: &str) -> SnsError {
    SnsError::Malformed(reason.to_owned())
}

/// The hash of the RSA (PKCS #1 v1.5) signature over [`SnsMessage::string_to_sign`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureVersion {
    /// `SignatureVersion` `1`: SHA1withRSA (the default of a topic).
    Sha1WithRsa,
    /// `SignatureVersion` `2`: SHA256withRSA.
    Sha256WithRsa,
}

impl SignatureVersion {
    /// # Errors
    /// [`SnsError::UnsupportedSignatureVersion`] for anything but `1` or `2`.
    pub fn parse(raw: &str) -> Result<Self, SnsError> {
        match raw {
            "1" => Ok(Self::Sha1WithRsa),
            "2" => Ok(Self::Sha256WithRsa),
            _ => Err(SnsError::UnsupportedSignatureVersion),
        }
    }
}

/// The URL of an SNS signing certificate: `https://sns.<region>.amazonaws.com` (or
/// `.amazonaws.com.cn` for a China region), no user info, no port, no query, and a path whose
/// last segment is `SimpleNotificationService-<name>.pem`. Kept exactly as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertUrl {
    url: String,
    file_name_at: usize,
}

impl CertUrl {
    /// # Errors
    /// [`SnsError::CertUrlRejected`] for any URL outside the rule above.
    pub fn parse(raw: &str) -> Result<Self, SnsError> {
        let path = sns_https_rest(raw).ok_or(SnsError::CertUrlRejected)?;
        let segments = path.strip_prefix('/').ok_or(SnsError::CertUrlRejected)?;
        let mut segments = segments.split('/').peekable();
        while let Some(segment) = segments.next() {
            let is_last = segments.peek().is_none();
            let plain = !segment.is_empty()
                && segment != "."
                && segment != ".."
                && segment.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
            if !plain || (is_last && !is_sns_cert_file_name(segment)) {
                return Err(SnsError::CertUrlRejected);
            }
        }
        let file_name_at = raw.rfind('/').map_or(raw.len(), |slash| slash + 1);
        Ok(Self { url: raw.to_owned(), file_name_at })
    }

    /// The URL, as received.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.url
    }

    /// The last path segment, `SimpleNotificationService-<name>.pem`: the name certificates are
    /// cached and configured under.
    #[must_use]
    pub fn file_name(&self) -> &str {
        &self.url[self.file_name_at..]
    }
}

/// Whether `name` is `SimpleNotificationService-<letters, digits, '-' or '_'>.pem`, the name
/// of a certificate SNS signs with.
#[must_use]
pub fn is_sns_cert_file_name(name: &str) -> bool {
    name.strip_prefix("SimpleNotificationService-")
        .and_then(|rest| rest.strip_suffix(".pem"))
        .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_')))
}

/// A URL on an SNS endpoint host over HTTPS (the host rule of [`CertUrl`]), with any path and
/// query: what a `SubscribeURL` (and a notification's `UnsubscribeURL`) must be before it is
/// fetched. Kept exactly as received, since a `SubscribeURL` is part of the signed text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeUrl(String);

impl SubscribeUrl {
    /// # Errors
    /// [`SnsError::SubscribeUrlRejected`] for another scheme or host, user info, a port, a
    /// fragment, or a character outside printable ASCII (or a backslash).
    pub fn parse(raw: &str) -> Result<Self, SnsError> {
        let rest = sns_https_rest(raw).ok_or(SnsError::SubscribeUrlRejected)?;
        let clean = rest.bytes().all(|b| b.is_ascii_graphic() && b != b'\\' && b != b'#');
        if !clean || !(rest.is_empty() || rest.starts_with('/') || rest.starts_with('?')) {
            return Err(SnsError::SubscribeUrlRejected);
        }
        Ok(Self(raw.to_owned()))
    }

    /// The URL, as received.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What follows the host of `raw` (path, query…) when `raw` is `https://` and an SNS endpoint
/// host with neither user info nor a port; `None` otherwise.
fn sns_https_rest(raw: &str) -> Option<&str> {
    let after_scheme = raw.strip_prefix("https://")?;
    let host_end = after_scheme.find(['/', '?', '#', '\\']).unwrap_or(after_scheme.len());
    let (host, rest) = after_scheme.split_at(host_end);
    is_sns_host(host).then_some(rest)
}

/// Whether `host` is `sns.<region>.amazonaws.com`, or `sns.cn-<…>.amazonaws.com.cn` for a
/// China region: lowercase, nothing before `sns.` and nothing after the suffix (so no user
/// info, port, trailing dot or further labels).
fn is_sns_host(host: &str) -> bool {
    let Some(rest) = host.strip_prefix("sns.") else { return false };
    let (region, china) = if let Some(region) = rest.strip_suffix(".amazonaws.com.cn") {
        (region, true)
    } else if let Some(region) = rest.strip_suffix(".amazonaws.com") {
        (region, false)
    } else {
        return false;
    };
    is_region(region) && region.starts_with("cn-") == china
}

/// Whether `region` reads like an AWS region name: `us-east-1`, `us-gov-west-1`,
/// `ap-southeast-7` (lowercase letters, then labels, then a number, joined by `-`).
fn is_region(region: &str) -> bool {
    let labels: Vec<&str> = region.split('-').collect();
    let [first, middle @ .., last] = labels.as_slice() else { return false };
    !middle.is_empty()
        && !first.is_empty()
        && first.bytes().all(|b| b.is_ascii_lowercase())
        && middle.iter().all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()))
        && !last.is_empty()
        && last.bytes().all(|b| b.is_ascii_digit())
}

/// Whether a message signed at `timestamp` is refused at `now`: older than [`SNS_MAX_AGE`], or
/// more than [`SNS_MAX_CLOCK_SKEW`] in the future.
#[must_use]
pub fn is_stale(timestamp: OffsetDateTime, now: OffsetDateTime) -> bool {
    now - timestamp > SNS_MAX_AGE || timestamp - now > SNS_MAX_CLOCK_SKEW
}

/// What a message is, with the fields only its type has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnsKind {
    Notification {
        subject: Option<String>,
        /// Not signed: only ever on an SNS host, but its content is not vouched for.
        unsubscribe_url: Option<SubscribeUrl>,
    },
    SubscriptionConfirmation { subscribe_url: SubscribeUrl, token: String },
    UnsubscribeConfirmation { subscribe_url: SubscribeUrl, token: String },
}

/// One SNS message, whole for its type; its signature is not checked yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnsMessage {
    kind: SnsKind,
    message_id: String,
    topic_arn: String,
    message: String,
    /// As received: it is part of the signed text.
    timestamp_raw: String,
    timestamp: OffsetDateTime,
    signature_version: SignatureVersion,
    signature: Vec<u8>,
    signing_cert_url: CertUrl,
}

/// The JSON envelope as sent. Unknown fields (`MessageAttributes`…) are ignored; a field given
/// twice is an error.
#[derive(Deserialize)]
struct Wire {
    #[serde(rename = "Type")]
    kind: Option<String>,
    #[serde(rename = "MessageId")]
    message_id: Option<String>,
    #[serde(rename = "TopicArn")]
    topic_arn: Option<String>,
    #[serde(rename = "Subject")]
    subject: Option<String>,
    #[serde(rename = "Message")]
    message: Option<String>,
    #[serde(rename = "Timestamp")]
    timestamp: Option<String>,
    #[serde(rename = "SignatureVersion")]
    signature_version: Option<String>,
    #[serde(rename = "Signature")]
    signature: Option<String>,
    #[serde(rename = "SigningCertURL")]
    signing_cert_url: Option<String>,
    #[serde(rename = "SubscribeURL")]
    subscribe_url: Option<String>,
    #[serde(rename = "Token")]
    token: Option<String>,
    #[serde(rename = "UnsubscribeURL")]
    unsubscribe_url: Option<String>,
}

fn required(field: Option<String>, name: &str) -> Result<String, SnsError> {
    field.ok_or_else(|| SnsError::Malformed(format!("missing {name}")))
}

impl SnsMessage {
    /// Parses an HTTP request body.
    ///
    /// # Errors
    /// [`SnsError::Malformed`] for anything but the JSON of a `Notification`,
    /// `SubscriptionConfirmation` or `UnsubscribeConfirmation` with every field its type needs
    /// (an unknown `Type` included), an unreadable `Timestamp` or `Signature`;
    /// [`SnsError::UnsupportedSignatureVersion`], [`SnsError::CertUrlRejected`] and
    /// [`SnsError::SubscribeUrlRejected`] as their types' `parse` say.
    pub fn parse(body: &[u8]) -> Result<Self, SnsError> {
        // serde_json's messages may quote the input: only the position is kept.
        let wire: Wire = serde_json::from_slice(body).map_err(|e| {
            SnsError::Malformed(format!("not the JSON of an SNS message (line {}, column {})", e.line(), e.column()))
        })?;
        let kind_name = required(wire.kind, "Type")?;
        let kind = match kind_name.as_str() {
            "Notification" => SnsKind::Notification {
                subject: wire.subject,
                unsubscribe_url: wire.unsubscribe_url.as_deref().map(SubscribeUrl::parse).transpose()?,
            },
            "SubscriptionConfirmation" | "UnsubscribeConfirmation" => {
                let subscribe_url = SubscribeUrl::parse(&required(wire.subscribe_url, "SubscribeURL")?)?;
                let token = required(wire.token, "Token")?;
                if kind_name == "SubscriptionConfirmation" {
                    SnsKind::SubscriptionConfirmation { subscribe_url, token }
                } else {
                    SnsKind::UnsubscribeConfirmation { subscribe_url, token }
                }
            }
            _ => return Err(malformed("unknown Type")),
        };
        let timestamp_raw = required(wire.timestamp, "Timestamp")?;
        let timestamp = OffsetDateTime::parse(&timestamp_raw, &Rfc3339).map_err(|_| malformed("Timestamp is not RFC 3339"))?;
        let signature_version = SignatureVersion::parse(&required(wire.signature_version, "SignatureVersion")?)?;
        let signature = BASE64
            .decode(required(wire.signature, "Signature")?)
            .map_err(|_| malformed("Signature is not base64"))?;
        Ok(Self {
            kind,
            message_id: required(wire.message_id, "MessageId")?,
            topic_arn: required(wire.topic_arn, "TopicArn")?,
            message: required(wire.message, "Message")?,
            timestamp_raw,
            timestamp,
            signature_version,
            signature,
            signing_cert_url: CertUrl::parse(&required(wire.signing_cert_url, "SigningCertURL")?)?,
        })
    }

    /// The text SNS signs: `Key\nValue\n` for each key, in SNS's fixed order. A notification:
    /// `Message`, `MessageId`, `Subject` (only when the message has one), `Timestamp`,
    /// `TopicArn`, `Type`. A confirmation: `Message`, `MessageId`, `SubscribeURL`, `Timestamp`,
    /// `Token`, `TopicArn`, `Type`.
    #[must_use]
    pub fn string_to_sign(&self) -> String {
        let mut fields: Vec<(&str, &str)> = vec![("Message", &self.message), ("MessageId", &self.message_id)];
        match &self.kind {
            SnsKind::Notification { subject, .. } => {
                if let Some(subject) = subject {
                    fields.push(("Subject", subject));
                }
                fields.extend([("Timestamp", self.timestamp_raw.as_str()), ("TopicArn", &self.topic_arn)]);
            }
            SnsKind::SubscriptionConfirmation { subscribe_url, token } | SnsKind::UnsubscribeConfirmation { subscribe_url, token } => {
                fields.extend([
                    ("SubscribeURL", subscribe_url.as_str()),
                    ("Timestamp", &self.timestamp_raw),
                    ("Token", token),
                    ("TopicArn", &self.topic_arn),
                ]);
            }
        }
        fields.push(("Type", self.type_name()));
        let mut text = String::with_capacity(fields.iter().map(|(k, v)| k.len() + v.len() + 2).sum());
        for (key, value) in fields {
            for part in [key, "\n", value, "\n"] {
                text.push_str(part);
            }
        }
        text
    }

    /// The `Type`, as SNS spells it.
    #[must_use]
    pub fn type_name(&self) -> &'static str {
        match self.kind {
            SnsKind::Notification { .. } => "Notification",
            SnsKind::SubscriptionConfirmation { .. } => "SubscriptionConfirmation",
            SnsKind::UnsubscribeConfirmation { .. } => "UnsubscribeConfirmation",
        }
    }

    #[must_use]
    pub fn kind(&self) -> &SnsKind {
        &self.kind
    }

    /// Consumes the message for its type's fields.
    #[must_use]
    pub fn into_kind(self) -> SnsKind {
        self.kind
    }

    /// The same on every retry of one delivery.
    #[must_use]
    pub fn message_id(&self) -> &str {
        &self.message_id
    }

    #[must_use]
    pub fn topic_arn(&self) -> &str {
        &self.topic_arn
    }

    /// The published message (for SES feedback, its notification JSON as a string).
    #[must_use]
    pub fn message(&self) -> &str {
        &self.message
    }

    #[must_use]
    pub fn timestamp(&self) -> OffsetDateTime {
        self.timestamp
    }

    #[must_use]
    pub fn signature_version(&self) -> SignatureVersion {
        self.signature_version
    }

    /// The signature, base64-decoded.
    #[must_use]
    pub fn signature(&self) -> &[u8] {
        &self.signature
    }

    #[must_use]
    pub fn signing_cert_url(&self) -> &CertUrl {
        &self.signing_cert_url
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CERT: &str = "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-7506a1e35b36ef5a444dd1a8e7cc3ed8.pem";
    const SUBSCRIBE: &str = "https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription&TopicArn=arn:aws:sns:us-east-1:123456789012:t&Token=abc";

    fn notification(subject: Option<&str>) -> serde_json::Value {
        let mut body = serde_json::json!({
            "Type": "Notification",
            "MessageId": "m-1",
            "TopicArn": "arn:aws:sns:us-east-1:123456789012:t",
            "Message": "line one\nline \"two\"",
            "Timestamp": "2026-03-02T10:15:30.123Z",
            "SignatureVersion": "2",
            "Signature": "AAEC",
            "SigningCertURL": CERT,
            "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe&SubscriptionArn=x",
            "MessageAttributes": {"a": {"Type": "String", "Value": "b"}},
        });
        if let Some(subject) = subject {
            body["Subject"] = subject.into();
        }
        body
    }

    fn confirmation(kind: &str) -> serde_json::Value {
        serde_json::json!({
            "Type": kind,
            "MessageId": "m-2",
            "Token": "abc",
            "TopicArn": "arn:aws:sns:us-east-1:123456789012:t",
            "Message": "You have chosen to subscribe.",
            "SubscribeURL": SUBSCRIBE,
            "Timestamp": "2026-03-02T10:15:30.123Z",
            "SignatureVersion": "1",
            "Signature": "AAEC",
            "SigningCertURL": CERT,
        })
    }

    fn at(rfc3339: &str) -> OffsetDateTime {
        OffsetDateTime::parse(rfc3339, &Rfc3339).unwrap()
    }

    fn parse(body: &serde_json::Value) -> Result<SnsMessage, SnsError> {
        SnsMessage::parse(body.to_string().as_bytes())
    }

    #[test]
    fn notification_with_subject_signs_its_subject_between_message_id_and_timestamp() {
        let message = parse(&notification(Some("Hello"))).unwrap();

        assert_eq!(
            message.string_to_sign(),
            "Message\nline one\nline \"two\"\nMessageId\nm-1\nSubject\nHello\nTimestamp\n2026-03-02T10:15:30.123Z\n\
             TopicArn\narn:aws:sns:us-east-1:123456789012:t\nType\nNotification\n"
        );
    }

    #[test]
    fn notification_without_subject_signs_no_subject_key() {
        let message = parse(&notification(None)).unwrap();

        assert_eq!(
            message.string_to_sign(),
            "Message\nline one\nline \"two\"\nMessageId\nm-1\nTimestamp\n2026-03-02T10:15:30.123Z\n\
             TopicArn\narn:aws:sns:us-east-1:123456789012:t\nType\nNotification\n"
        );
    }

    #[test]
    fn confirmations_sign_subscribe_url_and_token_in_order() {
        for kind in ["SubscriptionConfirmation", "UnsubscribeConfirmation"] {
            let message = parse(&confirmation(kind)).unwrap();

            assert_eq!(
                message.string_to_sign(),
                format!(
                    "Message\nYou have chosen to subscribe.\nMessageId\nm-2\nSubscribeURL\n{SUBSCRIBE}\n\
                     Timestamp\n2026-03-02T10:15:30.123Z\nToken\nabc\nTopicArn\narn:aws:sns:us-east-1:123456789012:t\nType\n{kind}\n"
                )
            );
            assert_eq!(message.type_name(), kind);
        }
    }

    #[test]
    fn a_subject_on_a_confirmation_is_not_signed() {
        let mut body = confirmation("SubscriptionConfirmation");
        body["Subject"] = "ignored".into();

        assert!(!parse(&body).unwrap().string_to_sign().contains("Subject"));
    }

    #[test]
    fn parsed_fields_are_kept() {
        let message = parse(&notification(Some("Hello"))).unwrap();

        assert_eq!(message.message_id(), "m-1");
        assert_eq!(message.topic_arn(), "arn:aws:sns:us-east-1:123456789012:t");
        assert_eq!(message.message(), "line one\nline \"two\"");
        assert_eq!(message.timestamp(), at("2026-03-02T10:15:30.123Z"));
        assert_eq!(message.signature_version(), SignatureVersion::Sha256WithRsa);
        assert_eq!(message.signature(), &[0, 1, 2]);
        assert_eq!(message.signing_cert_url().file_name(), "SimpleNotificationService-7506a1e35b36ef5a444dd1a8e7cc3ed8.pem");
        assert!(matches!(message.kind(), SnsKind::Notification { subject: Some(s), unsubscribe_url: Some(_) } if s == "Hello"));
    }

    #[test]
    fn a_field_the_type_needs_missing_is_malformed() {
        let notification_fields = ["Type", "MessageId", "TopicArn", "Message", "Timestamp", "SignatureVersion", "Signature", "SigningCertURL"];
        for field in notification_fields {
            let mut body = notification(None);
            body.as_object_mut().unwrap().remove(field);
            assert!(matches!(parse(&body), Err(SnsError::Malformed(_))), "without {field}");
        }
        for field in ["SubscribeURL", "Token"] {
            let mut body = confirmation("SubscriptionConfirmation");
            body.as_object_mut().unwrap().remove(field);
            assert!(matches!(parse(&body), Err(SnsError::Malformed(_))), "without {field}");
        }
    }

    #[test]
    fn a_notification_needs_no_subscribe_url_nor_token() {
        assert!(parse(&notification(None)).is_ok());
    }

    #[test]
    fn unknown_type_bad_timestamp_and_bad_base64_are_malformed() {
        let cases = [("Type", "Publish"), ("Timestamp", "yesterday"), ("Signature", "not base64!")];
        for (field, value) in cases {
            let mut body = notification(None);
            body[field] = value.into();
            assert!(matches!(parse(&body), Err(SnsError::Malformed(_))), "{field} = {value}");
        }
    }

    #[test]
    fn signature_versions_other_than_1_and_2_are_unsupported() {
        for version in ["0", "3", "", "v2"] {
            let mut body = notification(None);
            body["SignatureVersion"] = version.into();
            assert_eq!(parse(&body), Err(SnsError::UnsupportedSignatureVersion), "{version:?}");
        }
    }

    #[test]
    fn garbage_bodies_are_malformed_without_quoting_them() {
        let bodies: [&[u8]; 6] = [b"", b"null", b"[]", b"{", b"\xff\xfe", b"{\"Type\": 7}"];
        for body in bodies {
            let error = SnsMessage::parse(body).unwrap_err();
            assert!(matches!(error, SnsError::Malformed(_)), "{body:?}");
        }
        let secret = br#"{"Type": {"secret@example.com": 1}}"#;
        assert!(!SnsMessage::parse(secret).unwrap_err().to_string().contains("secret"));
    }

    #[test]
    fn a_field_given_twice_is_malformed() {
        let body = notification(None).to_string();
        let twice = body.replacen('{', "{\"Message\":\"other\",", 1);
        assert!(parse(&notification(None)).is_ok());

        assert!(matches!(SnsMessage::parse(twice.as_bytes()), Err(SnsError::Malformed(_))));
    }

    #[test]
    fn sns_certificate_urls_are_accepted() {
        let urls = [
            CERT,
            "https://sns.eu-west-1.amazonaws.com/SimpleNotificationService-01d088a6f77103d0fe307c0069e40ed6.pem",
            "https://sns.us-gov-west-1.amazonaws.com/SimpleNotificationService-abc.pem",
            "https://sns.cn-north-1.amazonaws.com.cn/SimpleNotificationService-abc.pem",
            "https://sns.ap-southeast-7.amazonaws.com/certs/SimpleNotificationService-abc.pem",
        ];
        for url in urls {
            let parsed = CertUrl::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(parsed.as_str(), url);
            assert!(parsed.file_name().starts_with("SimpleNotificationService-"));
        }
        assert_eq!(CertUrl::parse(urls[4]).unwrap().file_name(), "SimpleNotificationService-abc.pem");
    }

    #[test]
    fn other_certificate_urls_are_rejected() {
        let file = "SimpleNotificationService-abc.pem";
        let urls = [
            format!("http://sns.us-east-1.amazonaws.com/{file}"),
            format!("HTTPS://sns.us-east-1.amazonaws.com/{file}"),
            format!("ftp://sns.us-east-1.amazonaws.com/{file}"),
            format!("//sns.us-east-1.amazonaws.com/{file}"),
            format!("https://sns.us-east-1.amazonaws.com.evil.com/{file}"),
            format!("https://sns.us-east-1.amazonaws.com@evil.com/{file}"),
            format!("https://evil.com@sns.us-east-1.amazonaws.com/{file}"),
            format!("https://user:pass@sns.us-east-1.amazonaws.com/{file}"),
            format!("https://sns.us-east-1.amazonaws.com:443/{file}"),
            format!("https://sns.us-east-1.amazonaws.com:8443/{file}"),
            format!("https://sns.us-east-1.amazonaws.com./{file}"),
            format!("https://sns.us-east-1.amazonaws.com\\@evil.com/{file}"),
            format!("https://sns.us-east-1.amazonaws.com\\evil.com/{file}"),
            format!("https://SNS.US-EAST-1.AMAZONAWS.COM/{file}"),
            format!("https://evilsns.us-east-1.amazonaws.com/{file}"),
            format!("https://sns.evil.com.amazonaws.com/{file}"),
            format!("https://s3.us-east-1.amazonaws.com/{file}"),
            format!("https://sns.amazonaws.com/{file}"),
            format!("https://sns.us-east-1.evilamazonaws.com/{file}"),
            format!("https://sns.us-east-1.amazonaws.com.cn/{file}"),
            format!("https://sns.cn-north-1.amazonaws.com/{file}"),
            format!("https://sns.us-east-1.amazonaws.com\t.evil.com/{file}"),
            format!("https://sns.us-east-.amazonaws.com/{file}"),
            format!("https://sns.us--1.amazonaws.com/{file}"),
            format!("https://sns.us-east-1a.amazonaws.com/{file}"),
            format!("https://sns.1-east-1.amazonaws.com/{file}"),
            format!("https://sns.us-east-1.amazonaws.com/{file}?x=1"),
            format!("https://sns.us-east-1.amazonaws.com/{file}#x"),
            format!("https://sns.us-east-1.amazonaws.com/../{file}"),
            format!("https://sns.us-east-1.amazonaws.com//{file}"),
            format!("https://sns.us-east-1.amazonaws.com/%2e%2e/{file}"),
            format!(" https://sns.us-east-1.amazonaws.com/{file}"),
            "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.pem.exe".to_owned(),
            "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-.pem".to_owned(),
            "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-a%2Fb.pem".to_owned(),
            "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.pem/".to_owned(),
            "https://sns.us-east-1.amazonaws.com/evil.pem".to_owned(),
            "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.PEM".to_owned(),
            "https://sns.us-east-1.amazonaws.com".to_owned(),
            "https://sns.us-east-1.amazonaws.com/".to_owned(),
            String::new(),
        ];
        for url in &urls {
            assert_eq!(CertUrl::parse(url), Err(SnsError::CertUrlRejected), "{url:?}");
        }
    }

    #[test]
    fn subscribe_urls_need_an_sns_host_over_https() {
        assert_eq!(SubscribeUrl::parse(SUBSCRIBE).unwrap().as_str(), SUBSCRIBE);
        assert!(SubscribeUrl::parse("https://sns.cn-northwest-1.amazonaws.com.cn/?Action=ConfirmSubscription").is_ok());
        let rejected = [
            "http://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription",
            "https://sns.us-east-1.amazonaws.com.evil.com/?Action=ConfirmSubscription",
            "https://sns.us-east-1.amazonaws.com@evil.com/?Action=ConfirmSubscription",
            "https://sns.us-east-1.amazonaws.com:444/?Action=ConfirmSubscription",
            "https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription#x",
            "https://sns.us-east-1.amazonaws.com/?Action=Confirm Subscription",
            "https://sns.us-east-1.amazonaws.com\\@evil.com/",
            "https://evil.com/?https://sns.us-east-1.amazonaws.com/",
        ];
        for url in rejected {
            assert_eq!(SubscribeUrl::parse(url), Err(SnsError::SubscribeUrlRejected), "{url:?}");
        }
    }

    #[test]
    fn a_confirmation_to_another_host_is_refused_at_parse() {
        let mut body = confirmation("SubscriptionConfirmation");
        body["SubscribeURL"] = "https://evil.com/?Action=ConfirmSubscription".into();

        assert_eq!(parse(&body), Err(SnsError::SubscribeUrlRejected));
    }

    #[test]
    fn a_message_signed_elsewhere_is_refused_at_parse() {
        let mut body = notification(None);
        body["SigningCertURL"] = "https://evil.com/SimpleNotificationService-abc.pem".into();

        assert_eq!(parse(&body), Err(SnsError::CertUrlRejected));
    }

    #[test]
    fn messages_up_to_an_hour_old_are_fresh() {
        let signed = at("2026-03-02T10:15:30Z");

        assert!(!is_stale(signed, signed));
        assert!(!is_stale(signed, signed + Duration::minutes(59)));
        assert!(!is_stale(signed, signed + SNS_MAX_AGE));
        assert!(is_stale(signed, signed + SNS_MAX_AGE + Duration::seconds(1)));
        assert!(is_stale(signed, signed + Duration::minutes(61)));
    }

    #[test]
    fn messages_more_than_five_minutes_ahead_are_refused() {
        let now = at("2026-03-02T10:15:30Z");

        assert!(!is_stale(now + Duration::minutes(4), now));
        assert!(!is_stale(now + SNS_MAX_CLOCK_SKEW, now));
        assert!(is_stale(now + Duration::minutes(6), now));
    }
}
