//! Resend: Standard Webhooks signatures (the `svix-*` headers, or their `webhook-*` names) and
//! the email events that are feedback.

use std::fmt;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::{check_fresh, unix_seconds, PayloadError, SignatureError, BASE64};
use crate::domain::{BounceClass, EmailReference, Feedback, FeedbackKind};

type HmacSha256 = Hmac<Sha256>;

/// The HMAC key of a Standard Webhooks secret. Its `Debug` shows no part of it.
#[derive(Clone, PartialEq, Eq)]
pub struct StandardWebhookKey(Vec<u8>);

impl fmt::Debug for StandardWebhookKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StandardWebhookKey(..)")
    }
}

/// The key of a Standard Webhooks secret: `whsec_` and the base64 (standard alphabet) of the
/// key bytes; a secret without the prefix is decoded whole.
///
/// # Errors
/// [`SignatureError::InvalidSecret`] when the rest is not base64 or decodes to nothing.
pub fn standard_webhook_key(secret: &str) -> Result<StandardWebhookKey, SignatureError> {
    let secret = secret.trim();
    let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
    let key = BASE64.decode(encoded).map_err(|_| SignatureError::InvalidSecret("a Standard Webhooks secret is \"whsec_\" and base64"))?;
    if key.is_empty() {
        return Err(SignatureError::InvalidSecret("the Standard Webhooks secret is empty"));
    }
    Ok(StandardWebhookKey(key))
}

/// Checks a Standard Webhooks signature, as Resend (through Svix) sends it: the values of
/// `svix-id`, `svix-timestamp` and `svix-signature` (or `webhook-id`, `webhook-timestamp` and
/// `webhook-signature`). The signed content is `"{id}.{timestamp}.{body}"`, HMAC-SHA256 keyed
/// by [`standard_webhook_key`] of `secret`, base64. The signature header is a space-separated
/// list of `version,signature`; any `v1` matching is enough, other versions are ignored. The
/// timestamp must be within [`SIGNATURE_TOLERANCE`](super::SIGNATURE_TOLERANCE) of `now`.
///
/// # Errors
/// [`SignatureError::Missing`] without an id, a timestamp or any `v1` signature,
/// [`SignatureError::Malformed`] for a timestamp that is not Unix seconds or a list entry
/// without its comma, [`SignatureError::InvalidSecret`] for a secret that is not one,
/// [`SignatureError::Mismatch`] when no `v1` matches, [`SignatureError::Stale`] for a matching
/// signature with a timestamp too far from `now`.
pub fn verify_standard_webhook(id: &str, timestamp: &str, signature_header: &str, body: &[u8], secret: &str, now: OffsetDateTime) -> Result<(), SignatureError> {
    let key = standard_webhook_key(secret)?;
    if id.is_empty() {
        return Err(SignatureError::Missing("id"));
    }
    let at = unix_seconds(timestamp)?;
    let mut mac = HmacSha256::new_from_slice(&key.0).map_err(|_| SignatureError::InvalidSecret("HMAC refused the key"))?;
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    let mut any_v1 = false;
    let mut matched = false;
    for entry in signature_header.split_ascii_whitespace() {
        let (version, signature) = entry.split_once(',').ok_or(SignatureError::Malformed("a signature is not \"version,signature\""))?;
        if version != "v1" {
            continue;
        }
        any_v1 = true;
        matched |= BASE64.decode(signature).is_ok_and(|signature| mac.clone().verify_slice(&signature).is_ok());
    }
    if !any_v1 {
        return Err(SignatureError::Missing("v1 signature"));
    }
    if !matched {
        return Err(SignatureError::Mismatch);
    }
    check_fresh(at, now)
}

#[derive(Deserialize)]
struct Event {
    #[serde(rename = "type")]
    event_type: String,
    created_at: Option<String>,
    #[serde(default)]
    data: serde_json::Value,
}

#[derive(Deserialize)]
struct EmailData {
    email_id: String,
    #[serde(default)]
    to: Vec<String>,
    /// The email's `Message-ID`, in newer payloads.
    message_id: Option<String>,
    #[serde(default)]
    headers: serde_json::Value,
    bounce: Option<Bounce>,
}

#[derive(Deserialize)]
struct Bounce {
    #[serde(rename = "type")]
    class: Option<String>,
}

/// Reads a Resend webhook body: its type, and its feedback. `email.bounced` (with `data.bounce.type` `Permanent`,
/// `Transient` or anything else as undetermined; Resend gives no SMTP status),
/// `email.complained` and `email.delivered` give one piece of feedback per address in
/// `data.to`; every other type gives none. The body carries no event id: `event_id` is the
/// `svix-id` (or `webhook-id`) header's. The provider's message id is `data.email_id`; the
/// step comes from a `Message-ID` among `data.headers` (a list of `{name, value}`, or an
/// object), else from `data.message_id`; the time is the event's `created_at`, else `now`.
///
/// # Errors
/// [`PayloadError`] for a body that is not a Resend event, or an email event without its
/// `data.email_id` or with a `data.to` that is not a list of strings.
pub fn parse_resend_event(body: &[u8], event_id: &str, now: OffsetDateTime) -> Result<(String, Vec<Feedback>), PayloadError> {
    let event: Event = serde_json::from_slice(body).map_err(|e| PayloadError::json(&e))?;
    if !matches!(event.event_type.as_str(), "email.bounced" | "email.complained" | "email.delivered") {
        return Ok((event.event_type, Vec::new()));
    }
    let data = EmailData::deserialize(&event.data).map_err(|e| PayloadError(format!("data of {}: {e}", event.event_type)))?;
    let kind = match event.event_type.as_str() {
        "email.bounced" => {
            let class = match data.bounce.as_ref().and_then(|b| b.class.as_deref()) {
                Some("Permanent") => BounceClass::Permanent,
                Some("Transient" | "Temporary") => BounceClass::Transient,
                _ => BounceClass::Undetermined,
            };
            FeedbackKind::Bounce { class, status: None }
        }
        "email.complained" => FeedbackKind::Complaint,
        _ => FeedbackKind::Delivery,
    };
    let reference = header_message_ids(&data.headers)
        .chain(data.message_id.as_deref())
        .find_map(EmailReference::from_message_id);
    let at = event.created_at.and_then(|at| OffsetDateTime::parse(&at, &Rfc3339).ok()).unwrap_or(now);
    let feedback = data
        .to
        .into_iter()
        .map(|recipient| Feedback {
            feedback_id: event_id.to_owned(),
            recipient,
            kind: kind.clone(),
            provider_message_id: data.email_id.clone(),
            reference,
            at,
        })
        .collect();
    Ok((event.event_type, feedback))
}

/// The values of the `Message-ID` headers in `headers`: `[{"name": .., "value": ..}]` or
/// `{"Message-ID": ..}`.
fn header_message_ids(headers: &serde_json::Value) -> impl Iterator<Item = &str> {
    let is_message_id = |name: &str| name.eq_ignore_ascii_case("Message-ID");
    let listed = headers.as_array().into_iter().flatten().filter_map(move |h| {
        if is_message_id(h.get("name")?.as_str()?) {
            h.get("value")?.as_str()
        } else {
            None
        }
    });
    let mapped = headers.as_object().into_iter().flatten().filter(move |(name, _)| is_message_id(name)).filter_map(|(_, value)| value.as_str());
    listed.chain(mapped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{AccountId, EnrollmentId, ProspectId, SendKey};

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const T: &str = "1614265330";

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_614_265_330 + 60).unwrap()
    }

    /// `v1,` and the base64 HMAC-SHA256 of `"{id}.{t}.{body}"` under the decoded secret.
    fn sign(secret: &str, id: &str, t: &str, body: &[u8]) -> String {
        let mut mac = HmacSha256::new_from_slice(&standard_webhook_key(secret).unwrap().0).unwrap();
        mac.update(format!("{id}.{t}.").as_bytes());
        mac.update(body);
        format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
    }

    const BODY: &[u8] = br#"{"type":"email.delivered","created_at":"2021-02-25T15:02:10Z","data":{"email_id":"e-1","to":["ada@example.com"]}}"#;

    #[test]
    fn the_standard_webhooks_test_vector_verifies() {
        let body = br#"{"email":"test@example.com","username":"test_user"}"#;
        let signature = "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=";
        let at = OffsetDateTime::from_unix_timestamp(1_649_367_553).unwrap();
        let secret = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
        assert_eq!(sign(secret, "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk", "1649367553", body), signature);
        assert_eq!(verify_standard_webhook("msg_27UH4WbU6Z5A5EzD8u03UvzRbpk", "1649367553", signature, body, secret, at), Ok(()));
        assert_eq!(verify_standard_webhook("msg_27UH4WbU6Z5A5EzD8u03UvzRbpk", "1649367553", signature, body, "C2FVsBQIhrscChlQIMV+b5sSYspob7oD", at), Ok(()), "no prefix");
    }

    #[test]
    fn a_signed_body_is_accepted() {
        assert_eq!(verify_standard_webhook(ID, T, &sign(SECRET, ID, T, BODY), BODY, SECRET, now()), Ok(()));
    }

    #[test]
    fn a_tampered_body_id_or_timestamp_or_another_secret_is_refused() {
        let signature = sign(SECRET, ID, T, BODY);
        let mut tampered = BODY.to_vec();
        tampered[3] ^= 0x20;
        assert_eq!(verify_standard_webhook(ID, T, &signature, &tampered, SECRET, now()), Err(SignatureError::Mismatch));
        assert_eq!(verify_standard_webhook("msg_other", T, &signature, BODY, SECRET, now()), Err(SignatureError::Mismatch));
        assert_eq!(verify_standard_webhook(ID, "1614265331", &signature, BODY, SECRET, now()), Err(SignatureError::Mismatch));
        assert_eq!(verify_standard_webhook(ID, T, &signature, BODY, "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD", now()), Err(SignatureError::Mismatch));
    }

    #[test]
    fn a_timestamp_more_than_five_minutes_away_is_stale() {
        let base = 1_614_265_330;
        for (t, now) in [(base, base + 301), (base + 301, base)] {
            let t = t.to_string();
            let now = OffsetDateTime::from_unix_timestamp(now).unwrap();
            assert_eq!(verify_standard_webhook(ID, &t, &sign(SECRET, ID, &t, BODY), BODY, SECRET, now), Err(SignatureError::Stale), "{t}");
        }
    }

    #[test]
    fn one_matching_v1_among_several_is_enough_and_other_versions_are_ignored() {
        let good = sign(SECRET, ID, T, BODY);
        let old = sign("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD", ID, T, BODY);
        let header = format!("{old} v1a,{} v1,!!notbase64 {good}", &good[3..]);
        assert_eq!(verify_standard_webhook(ID, T, &header, BODY, SECRET, now()), Ok(()));
        assert_eq!(verify_standard_webhook(ID, T, &format!("v2,{}", &good[3..]), BODY, SECRET, now()), Err(SignatureError::Missing("v1 signature")));
    }

    #[test]
    fn malformed_headers_and_secrets_are_refused() {
        let good = sign(SECRET, ID, T, BODY);
        assert_eq!(verify_standard_webhook("", T, &good, BODY, SECRET, now()), Err(SignatureError::Missing("id")));
        assert_eq!(verify_standard_webhook(ID, "", &good, BODY, SECRET, now()), Err(SignatureError::Missing("timestamp")));
        assert_eq!(verify_standard_webhook(ID, T, "", BODY, SECRET, now()), Err(SignatureError::Missing("v1 signature")));
        for bad in ["v1", "garbage", &good.replace(',', "=")] {
            assert!(matches!(verify_standard_webhook(ID, T, bad, BODY, SECRET, now()), Err(SignatureError::Malformed(_))), "{bad}");
        }
        for bad in ["1614265330.5", "2021-02-25", "-1614265330"] {
            assert!(matches!(verify_standard_webhook(ID, bad, &good, BODY, SECRET, now()), Err(SignatureError::Malformed(_))), "{bad}");
        }
        for bad in ["whsec_***", "whsec_", "", "whsec_not base64!"] {
            let e = verify_standard_webhook(ID, T, &good, BODY, bad, now()).unwrap_err();
            assert!(matches!(e, SignatureError::InvalidSecret(_)), "{bad}");
            assert!(!e.to_string().contains("***"));
        }
        assert_eq!(format!("{:?}", standard_webhook_key(SECRET).unwrap()), "StandardWebhookKey(..)");
    }

    fn reference() -> EmailReference {
        EmailReference { account: AccountId::new(), prospect: ProspectId::new(), send: SendKey { enrollment: EnrollmentId::new(), step: 1 } }
    }

    fn parse(body: &serde_json::Value) -> Result<Vec<Feedback>, PayloadError> {
        parse_resend_event(&serde_json::to_vec(body).unwrap(), "msg_1", now()).map(|(_, feedback)| feedback)
    }

    #[test]
    fn a_bounce_names_every_recipient_with_its_class() {
        let r = reference();
        let body = serde_json::json!({
            "type": "email.bounced", "created_at": "2024-11-22T23:41:12.126Z",
            "data": {
                "created_at": "2024-11-22T23:41:11.894719+00:00", "email_id": "56761188", "from": "Acme <hello@acme.example>",
                "to": ["ada@example.com", "bob@example.com"], "subject": "Hi", "tags": {"category": "x"},
                "headers": [{"name": "X-Other", "value": "1"}, {"name": "message-id", "value": format!("<{}>", r.message_id("acme.example"))}],
                "bounce": {"message": "hard bounce", "subType": "Suppressed", "type": "Permanent"}
            }
        });
        let feedback = parse(&body).unwrap();
        assert_eq!(feedback.iter().map(|f| f.recipient.as_str()).collect::<Vec<_>>(), ["ada@example.com", "bob@example.com"]);
        for f in &feedback {
            assert_eq!(f.kind, FeedbackKind::Bounce { class: BounceClass::Permanent, status: None });
            assert_eq!((f.feedback_id.as_str(), f.provider_message_id.as_str(), f.reference), ("msg_1", "56761188", Some(r)));
            assert_eq!(f.at, OffsetDateTime::parse("2024-11-22T23:41:12.126Z", &Rfc3339).unwrap());
        }
    }

    #[test]
    fn bounce_classes_complaints_and_deliveries_map() {
        let kind = |event: &str, bounce: serde_json::Value| {
            let body = serde_json::json!({"type": event, "data": {"email_id": "e", "to": ["ada@example.com"], "bounce": bounce}});
            parse(&body).unwrap().pop().map(|f| f.kind)
        };
        let bounce = |class| Some(FeedbackKind::Bounce { class, status: None });
        assert_eq!(kind("email.bounced", serde_json::json!({"type": "Transient"})), bounce(BounceClass::Transient));
        assert_eq!(kind("email.bounced", serde_json::json!({"type": "Undetermined"})), bounce(BounceClass::Undetermined));
        assert_eq!(kind("email.bounced", serde_json::Value::Null), bounce(BounceClass::Undetermined));
        assert_eq!(kind("email.complained", serde_json::Value::Null), Some(FeedbackKind::Complaint));
        assert_eq!(kind("email.delivered", serde_json::Value::Null), Some(FeedbackKind::Delivery));
    }

    #[test]
    fn the_message_id_field_or_a_headers_object_names_the_step_and_the_time_defaults_to_now() {
        let r = reference();
        let body = serde_json::json!({"type": "email.delivered", "data": {"email_id": "e", "to": ["ada@example.com"], "message_id": format!("<{}>", r.message_id("acme.example"))}});
        let f = parse(&body).unwrap().remove(0);
        assert_eq!((f.reference, f.at), (Some(r), now()));
        let body = serde_json::json!({"type": "email.delivered", "created_at": "yesterday", "data": {"email_id": "e", "to": ["ada@example.com"], "headers": {"Message-ID": r.message_id("acme.example")}, "message_id": "<other@resend.dev>"}});
        let f = parse(&body).unwrap().remove(0);
        assert_eq!((f.reference, f.at), (Some(r), now()));
        let body = serde_json::json!({"type": "email.delivered", "data": {"email_id": "e", "to": ["ada@example.com"], "message_id": "<111-222@email.example.com>"}});
        assert_eq!(parse(&body).unwrap()[0].reference, None);
    }

    #[test]
    fn other_types_give_nothing_and_bad_bodies_are_errors() {
        for other in ["email.sent", "email.opened", "email.clicked", "contact.created", "domain.updated"] {
            assert_eq!(parse(&serde_json::json!({"type": other, "data": {"id": 5}})), Ok(vec![]), "{other}");
        }
        assert_eq!(parse(&serde_json::json!({"type": "email.bounced", "data": {"email_id": "e", "to": []}})), Ok(vec![]));
        for bad in [&b""[..], b"null", b"[]", b"{}", b"\xff", br#"{"type":5}"#, br#"{"type":"email.bounced"}"#, br#"{"type":"email.bounced","data":{"to":["a@b"]}}"#, br#"{"type":"email.bounced","data":{"email_id":"e","to":"a@b"}}"#] {
            assert!(parse_resend_event(bad, "msg_1", now()).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
