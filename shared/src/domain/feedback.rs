//! What the world tells us about an email after it was sent: bounces, complaints, deliveries
//! and rejections, as Amazon SES reports them, and the rule that turns each into a change of
//! the prospect's status (or none).
//!
//! Every campaign email names its step in two ways that survive the trip: SES message tags
//! ([`EmailReference::tags`], returned in each event-publishing notification) and a
//! `Message-ID` of the sender's own domain ([`EmailReference::message_id`]) that an SMTP
//! provider's events carry back.

use std::collections::BTreeMap;

use serde::Deserialize;
use time::{Duration, OffsetDateTime};

use super::{AccountId, EnrollmentId, ProspectId, SendKey};

/// A transient or undetermined bounce is only recorded; the [`TRANSIENT_BOUNCE_LIMIT`]th
/// within this window makes the prospect bounced.
pub const TRANSIENT_BOUNCE_WINDOW: Duration = Duration::days(30);

/// How many transient or undetermined bounces within [`TRANSIENT_BOUNCE_WINDOW`] make a
/// prospect bounced.
pub const TRANSIENT_BOUNCE_LIMIT: usize = 3;

/// The first label of every `Message-ID` local part we write.
const MESSAGE_ID_PREFIX: &str = "cadenhq";

/// The SES message tag names of [`EmailReference::tags`].
pub const TAG_ACCOUNT: &str = "cadenhq-account";
pub const TAG_PROSPECT: &str = "cadenhq-prospect";
pub const TAG_ENROLLMENT: &str = "cadenhq-enrollment";
pub const TAG_STEP: &str = "cadenhq-step";

/// Which prospect and step one campaign email was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmailReference {
    pub account: AccountId,
    pub prospect: ProspectId,
    pub send: SendKey,
}

impl EmailReference {
    /// The `Message-ID` (without its angle brackets) of this step's email, in `domain` (the
    /// sender's): `cadenhq.{account}.{prospect}.{enrollment}.{step}@{domain}`. Only ids, no
    /// address: what a recipient sees names nobody.
    #[must_use]
    pub fn message_id(&self, domain: &str) -> String {
        format!("{MESSAGE_ID_PREFIX}.{}.{}.{}.{}@{domain}", self.account, self.prospect, self.send.enrollment, self.send.step)
    }

    /// The reference a [`message_id`](Self::message_id) names, with or without its angle
    /// brackets; `None` for any other `Message-ID` (another sender's, a changed one).
    #[must_use]
    pub fn from_message_id(raw: &str) -> Option<Self> {
        let raw = raw.trim();
        let raw = raw.strip_prefix('<').and_then(|r| r.strip_suffix('>')).unwrap_or(raw);
        let (local, domain) = raw.rsplit_once('@')?;
        if domain.is_empty() {
            return None;
        }
        let mut labels = local.split('.');
        if labels.next()? != MESSAGE_ID_PREFIX {
            return None;
        }
        let reference = Self {
            account: AccountId::parse(labels.next()?).ok()?,
            prospect: ProspectId::parse(labels.next()?).ok()?,
            send: SendKey { enrollment: EnrollmentId::parse(labels.next()?).ok()?, step: labels.next()?.parse().ok()? },
        };
        labels.next().is_none().then_some(reference)
    }

    /// The SES message tags naming this step (names and values within SES's alphabet: ASCII
    /// letters, digits, `_` and `-`).
    #[must_use]
    pub fn tags(&self) -> [(&'static str, String); 4] {
        [
            (TAG_ACCOUNT, self.account.to_string()),
            (TAG_PROSPECT, self.prospect.to_string()),
            (TAG_ENROLLMENT, self.send.enrollment.to_string()),
            (TAG_STEP, self.send.step.to_string()),
        ]
    }

    /// The reference the [`tags`](Self::tags) of a notification's `mail.tags` name, if all
    /// four are there and valid.
    #[must_use]
    pub fn from_tags(tags: &BTreeMap<String, Vec<String>>) -> Option<Self> {
        let one = |name: &str| tags.get(name).and_then(|values| values.first()).map(String::as_str);
        Some(Self {
            account: AccountId::parse(one(TAG_ACCOUNT)?).ok()?,
            prospect: ProspectId::parse(one(TAG_PROSPECT)?).ok()?,
            send: SendKey { enrollment: EnrollmentId::parse(one(TAG_ENROLLMENT)?).ok()?, step: one(TAG_STEP)?.parse().ok()? },
        })
    }
}

/// How a bounce was classified by the provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BounceClass {
    Permanent,
    Transient,
    Undetermined,
}

/// What one notification says about one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedbackKind {
    /// The receiving side refused the email; `status` is the recipient's SMTP enhanced
    /// status code (`5.1.1`) when the provider gave one.
    Bounce { class: BounceClass, status: Option<String> },
    /// The recipient marked the email as spam.
    Complaint,
    /// The receiving side accepted the email.
    Delivery,
    /// The provider refused to send the email at all (for example, it found a virus).
    Reject,
}

/// What a piece of feedback does to the prospect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// The address is dead: the prospect becomes `bounced`.
    Bounced,
    /// The recipient complained: the prospect becomes `unsubscribed`.
    Complained,
    /// A transient or undetermined bounce: recorded; the [`TRANSIENT_BOUNCE_LIMIT`]th within
    /// [`TRANSIENT_BOUNCE_WINDOW`] makes the prospect bounced ([`transient_bounces_exhausted`]).
    Transient,
    /// Recorded against the send, and nothing else.
    Recorded,
}

impl FeedbackKind {
    /// The rule: a permanent bounce, or any bounce whose SMTP status is `5.x.x` whatever its
    /// label (providers have labelled `5.4.4` transient), makes the prospect bounced; a
    /// complaint unsubscribes it; another bounce counts towards the transient limit; a
    /// delivery or a rejection by the provider changes nothing.
    #[must_use]
    pub fn effect(&self) -> Effect {
        match self {
            Self::Bounce { class: BounceClass::Permanent, .. } => Effect::Bounced,
            Self::Bounce { status: Some(status), .. } if is_permanent_status(status) => Effect::Bounced,
            Self::Bounce { .. } => Effect::Transient,
            Self::Complaint => Effect::Complained,
            Self::Delivery | Self::Reject => Effect::Recorded,
        }
    }

    /// The kind's name, as records and logs keep it.
    #[must_use]
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Bounce { .. } if self.effect() == Effect::Bounced => "bounce",
            Self::Bounce { .. } => "transient_bounce",
            Self::Complaint => "complaint",
            Self::Delivery => "delivery",
            Self::Reject => "reject",
        }
    }
}

/// Whether an SMTP enhanced status code (RFC 3463 `class.subject.detail`) is a permanent
/// failure: class 5.
fn is_permanent_status(status: &str) -> bool {
    let mut parts = status.trim().split('.');
    parts.next() == Some("5") && parts.clone().count() == 2 && parts.all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether the transient bounces recorded for an address (their times, this one included)
/// reach the limit within the window that ends at `now`.
#[must_use]
pub fn transient_bounces_exhausted(bounces: &[OffsetDateTime], now: OffsetDateTime) -> bool {
    bounces.iter().filter(|at| now - **at < TRANSIENT_BOUNCE_WINDOW && **at <= now).count() >= TRANSIENT_BOUNCE_LIMIT
}

/// One notification's news about one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Feedback {
    /// The provider's id of the notification (SES `feedbackId`; for a delivery, which has
    /// none, the message id). With `recipient`, what makes applying it once possible.
    pub feedback_id: String,
    /// The address the news is about, as the provider wrote it.
    pub recipient: String,
    pub kind: FeedbackKind,
    /// The provider's id of the email (SES `mail.messageId`), as the send log records it.
    pub provider_message_id: String,
    /// The step the email was for, from its tags or its `Message-ID` header, if either
    /// survived.
    pub reference: Option<EmailReference>,
    /// When the provider observed it.
    pub at: OffsetDateTime,
}

/// Why a notification could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FeedbackError {
    #[error("the notification is not JSON of the expected shape: {0}")]
    Malformed(String),
    /// A notification of a type that says nothing about a recipient (Send, Open, Click, …):
    /// acknowledged and ignored.
    #[error("notifications of type {0:?} are not feedback")]
    Ignored(String),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Notification {
    event_type: Option<String>,
    notification_type: Option<String>,
    mail: Mail,
    bounce: Option<Bounce>,
    complaint: Option<Complaint>,
    delivery: Option<Delivery>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Mail {
    message_id: String,
    #[serde(default, with = "time::serde::rfc3339::option")]
    timestamp: Option<OffsetDateTime>,
    #[serde(default)]
    tags: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    headers: Vec<Header>,
    #[serde(default)]
    destination: Vec<String>,
}

#[derive(Deserialize)]
struct Header {
    name: String,
    value: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Bounce {
    feedback_id: String,
    bounce_type: String,
    #[serde(default)]
    bounced_recipients: Vec<Recipient>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    timestamp: Option<OffsetDateTime>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Recipient {
    email_address: String,
    status: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Complaint {
    feedback_id: String,
    #[serde(default)]
    complained_recipients: Vec<Recipient>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    timestamp: Option<OffsetDateTime>,
}

#[derive(Deserialize)]
struct Delivery {
    #[serde(default)]
    recipients: Vec<String>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    timestamp: Option<OffsetDateTime>,
}

/// Reads an Amazon SES notification, in either shape: event publishing through a
/// configuration set (`eventType`) or identity notifications (`notificationType`). One piece
/// of feedback per recipient named; fields not read here are ignored, so new ones do not
/// break it. `received` stands in for a time the notification leaves out.
///
/// # Errors
/// [`FeedbackError::Malformed`] for JSON that is not a notification (or lacks what its type
/// needs), [`FeedbackError::Ignored`] for a type that is not feedback.
pub fn parse_ses_notification(json: &str, received: OffsetDateTime) -> Result<Vec<Feedback>, FeedbackError> {
    let n: Notification = serde_json::from_str(json).map_err(|e| FeedbackError::Malformed(e.to_string()))?;
    let kind = n.event_type.or(n.notification_type).ok_or_else(|| FeedbackError::Malformed("neither eventType nor notificationType".into()))?;
    let missing = |part: &str| FeedbackError::Malformed(format!("a {kind} notification without its {part:?} object"));
    let reference = EmailReference::from_tags(&n.mail.tags)
        .or_else(|| n.mail.headers.iter().filter(|h| h.name.eq_ignore_ascii_case("Message-ID")).find_map(|h| EmailReference::from_message_id(&h.value)));
    let mail_at = n.mail.timestamp.unwrap_or(received);
    let message_id = n.mail.message_id;
    let feedback = |feedback_id: &str, recipient: String, kind: FeedbackKind, at: Option<OffsetDateTime>| Feedback {
        feedback_id: feedback_id.to_owned(),
        recipient,
        kind,
        provider_message_id: message_id.clone(),
        reference,
        at: at.unwrap_or(mail_at),
    };
    match kind.as_str() {
        "Bounce" => {
            let b = n.bounce.ok_or_else(|| missing("bounce"))?;
            let class = match b.bounce_type.as_str() {
                "Permanent" => BounceClass::Permanent,
                "Transient" => BounceClass::Transient,
                _ => BounceClass::Undetermined,
            };
            Ok(b.bounced_recipients
                .into_iter()
                .map(|r| feedback(&b.feedback_id, r.email_address, FeedbackKind::Bounce { class, status: r.status }, b.timestamp))
                .collect())
        }
        "Complaint" => {
            let c = n.complaint.ok_or_else(|| missing("complaint"))?;
            Ok(c.complained_recipients.into_iter().map(|r| feedback(&c.feedback_id, r.email_address, FeedbackKind::Complaint, c.timestamp)).collect())
        }
        "Delivery" => {
            let d = n.delivery.ok_or_else(|| missing("delivery"))?;
            Ok(d.recipients.into_iter().map(|r| feedback(&message_id, r, FeedbackKind::Delivery, d.timestamp)).collect())
        }
        "Reject" => Ok(n.mail.destination.into_iter().map(|r| feedback(&message_id, r, FeedbackKind::Reject, None)).collect()),
        other => Err(FeedbackError::Ignored(other.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference() -> EmailReference {
        EmailReference { account: AccountId::new(), prospect: ProspectId::new(), send: SendKey { enrollment: EnrollmentId::new(), step: 2 } }
    }

    const NOW: &str = "2026-12-01T10:00:00Z";

    fn now() -> OffsetDateTime {
        OffsetDateTime::parse(NOW, &time::format_description::well_known::Rfc3339).unwrap()
    }

    /// An event-publishing notification of `event` with the `part` object, tagged for `r`.
    fn published(r: &EmailReference, event: &str, part: &str) -> String {
        let tags: serde_json::Map<String, serde_json::Value> =
            r.tags().into_iter().map(|(k, v)| (k.to_owned(), serde_json::json!([v]))).chain([("ses:configuration-set".to_owned(), serde_json::json!(["cadenhq"]))]).collect();
        format!(
            r#"{{"eventType":"{event}",{part},"mail":{{"timestamp":"2026-12-01T09:59:00.000Z","source":"hello@acme.example","messageId":"0100018c-ses-id","destination":["ada@example.com","bob@example.com"],"tags":{}, "unknownField": 1}}}}"#,
            serde_json::Value::Object(tags)
        )
    }

    #[test]
    fn a_message_id_names_its_step_and_reads_back() {
        let r = reference();
        let id = r.message_id("acme.example");
        assert!(id.starts_with("cadenhq.") && id.ends_with("@acme.example"), "{id}");
        assert!(!id.contains("example.com"));
        assert_eq!(EmailReference::from_message_id(&id), Some(r));
        assert_eq!(EmailReference::from_message_id(&format!("<{id}>")), Some(r));
        assert_eq!(EmailReference::from_message_id(&format!(" <{id}> ")), Some(r));
    }

    #[test]
    fn other_message_ids_name_nothing() {
        let r = reference();
        let id = r.message_id("acme.example");
        for other in [
            "<0100018c-ses-id@email.amazonses.com>".to_owned(),
            String::new(),
            "<>".into(),
            id.replacen("cadenhq.", "other.", 1),
            id.replace("@acme.example", "@"),
            id.replace("@acme.example", ".9@acme.example"),
            id.replace(".2@", ".two@"),
            id.replace(".2@", ".-1@"),
            id.replace(&r.account.to_string(), "not-an-id"),
            "cadenhq.a.b.c.d".into(),
        ] {
            assert_eq!(EmailReference::from_message_id(&other), None, "{other}");
        }
    }

    #[test]
    fn tags_fit_the_ses_alphabet_and_read_back() {
        let r = reference();
        for (name, value) in r.tags() {
            for text in [name, value.as_str()] {
                assert!(!text.is_empty() && text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'), "{text}");
            }
        }
        let tags: BTreeMap<String, Vec<String>> = r.tags().into_iter().map(|(k, v)| (k.to_owned(), vec![v])).collect();
        assert_eq!(EmailReference::from_tags(&tags), Some(r));
        let mut partial = tags.clone();
        partial.remove(TAG_STEP);
        assert_eq!(EmailReference::from_tags(&partial), None);
    }

    #[test]
    fn the_rule_for_each_kind() {
        let bounce = |class, status: Option<&str>| FeedbackKind::Bounce { class, status: status.map(str::to_owned) };
        assert_eq!(bounce(BounceClass::Permanent, Some("5.1.1")).effect(), Effect::Bounced);
        assert_eq!(bounce(BounceClass::Permanent, None).effect(), Effect::Bounced);
        assert_eq!(bounce(BounceClass::Transient, Some("5.4.4")).effect(), Effect::Bounced, "5.x.x whatever its label");
        assert_eq!(bounce(BounceClass::Undetermined, Some("5.0.0")).effect(), Effect::Bounced);
        assert_eq!(bounce(BounceClass::Transient, Some("4.2.2")).effect(), Effect::Transient);
        assert_eq!(bounce(BounceClass::Transient, None).effect(), Effect::Transient);
        assert_eq!(bounce(BounceClass::Undetermined, None).effect(), Effect::Transient);
        for odd in ["5", "5.", "5.1", "5.1.", "5.x.1", "55.1.1", "5.1.1.1", "5.1234.1", " "] {
            assert_eq!(bounce(BounceClass::Transient, Some(odd)).effect(), Effect::Transient, "{odd:?}");
        }
        assert_eq!(FeedbackKind::Complaint.effect(), Effect::Complained);
        assert_eq!(FeedbackKind::Delivery.effect(), Effect::Recorded);
        assert_eq!(FeedbackKind::Reject.effect(), Effect::Recorded);
    }

    #[test]
    fn the_third_transient_bounce_within_thirty_days_exhausts() {
        let now = now();
        let days = |d: i64| now - Duration::days(d);
        assert!(!transient_bounces_exhausted(&[now], now));
        assert!(!transient_bounces_exhausted(&[days(3), now], now));
        assert!(transient_bounces_exhausted(&[days(29), days(3), now], now));
        assert!(!transient_bounces_exhausted(&[days(30), days(3), now], now), "one is 30 days old");
        assert!(!transient_bounces_exhausted(&[days(45), days(31), now], now));
    }

    #[test]
    fn a_permanent_bounce_names_every_recipient() {
        let r = reference();
        let json = published(
            &r,
            "Bounce",
            r#""bounce":{"feedbackId":"fb-1","bounceType":"Permanent","bounceSubType":"General","timestamp":"2026-12-01T09:59:30.000Z","bouncedRecipients":[{"emailAddress":"ada@example.com","status":"5.1.1","action":"failed"},{"emailAddress":"bob@example.com"}],"reportingMTA":"dns; example.com"}"#,
        );
        let feedback = parse_ses_notification(&json, now()).unwrap();
        assert_eq!(feedback.len(), 2);
        assert_eq!(feedback[0].recipient, "ada@example.com");
        assert_eq!(feedback[0].kind, FeedbackKind::Bounce { class: BounceClass::Permanent, status: Some("5.1.1".into()) });
        assert_eq!(feedback[1].kind, FeedbackKind::Bounce { class: BounceClass::Permanent, status: None });
        for f in &feedback {
            assert_eq!((f.feedback_id.as_str(), f.provider_message_id.as_str(), f.reference), ("fb-1", "0100018c-ses-id", Some(r)));
            assert_eq!(f.at, OffsetDateTime::parse("2026-12-01T09:59:30Z", &time::format_description::well_known::Rfc3339).unwrap());
            assert_eq!(f.kind.effect(), Effect::Bounced);
        }
    }

    #[test]
    fn a_complaint_in_the_identity_notification_shape_with_the_message_id_header() {
        let r = reference();
        let json = format!(
            r#"{{"notificationType":"Complaint","complaint":{{"feedbackId":"fb-2","complaintFeedbackType":"abuse","complainedRecipients":[{{"emailAddress":"ada@example.com"}}],"timestamp":"2026-12-01T09:59:40.000Z"}},"mail":{{"messageId":"ses-2","timestamp":"2026-12-01T09:59:00.000Z","headers":[{{"name":"From","value":"hello@acme.example"}},{{"name":"Message-ID","value":"<{}>"}}]}}}}"#,
            r.message_id("acme.example")
        );
        let feedback = parse_ses_notification(&json, now()).unwrap();
        assert_eq!(feedback.len(), 1);
        assert_eq!((feedback[0].kind.effect(), feedback[0].reference, feedback[0].feedback_id.as_str()), (Effect::Complained, Some(r), "fb-2"));
    }

    #[test]
    fn deliveries_and_rejections_are_recorded_only() {
        let r = reference();
        let delivery = published(&r, "Delivery", r#""delivery":{"timestamp":"2026-12-01T09:59:10.000Z","recipients":["ada@example.com"],"smtpResponse":"250 ok"}"#);
        let feedback = parse_ses_notification(&delivery, now()).unwrap();
        assert_eq!((feedback.len(), feedback[0].kind.effect(), feedback[0].feedback_id.as_str()), (1, Effect::Recorded, "0100018c-ses-id"));
        let reject = published(&r, "Reject", r#""reject":{"reason":"Bad content"}"#);
        let feedback = parse_ses_notification(&reject, now()).unwrap();
        assert_eq!(feedback.iter().map(|f| f.kind.clone()).collect::<Vec<_>>(), [FeedbackKind::Reject, FeedbackKind::Reject]);
    }

    #[test]
    fn a_notification_without_our_tags_or_header_names_no_step() {
        let json = r#"{"notificationType":"Bounce","bounce":{"feedbackId":"fb-3","bounceType":"Transient","bouncedRecipients":[{"emailAddress":"ada@example.com","status":"4.2.2"}]},"mail":{"messageId":"ses-3"}}"#;
        let feedback = parse_ses_notification(json, now()).unwrap();
        assert_eq!((feedback[0].reference, feedback[0].at, feedback[0].kind.effect()), (None, now(), Effect::Transient));
    }

    #[test]
    fn other_types_are_ignored_and_bad_json_is_malformed() {
        let r = reference();
        assert_eq!(parse_ses_notification(&published(&r, "Open", r#""open":{}"#), now()), Err(FeedbackError::Ignored("Open".into())));
        for bad in ["", "null", "[]", "{}", r#"{"eventType":"Bounce"}"#, r#"{"eventType":"Bounce","mail":{"messageId":"x"}}"#, r#"{"mail":{"messageId":"x"}}"#] {
            assert!(matches!(parse_ses_notification(bad, now()), Err(FeedbackError::Malformed(_))), "{bad}");
        }
    }
}
