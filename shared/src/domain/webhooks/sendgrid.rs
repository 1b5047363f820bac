//! SendGrid: the signed Event Webhook (ECDSA P-256 over the timestamp and the body) and the
//! events in its batches that are feedback.

use base64::Engine as _;
use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1};
use serde_json::Value;
use time::OffsetDateTime;

use super::{check_fresh, from_unix, unix_seconds, PayloadError, SignatureError, BASE64};
use crate::domain::{BounceClass, EmailReference, Feedback, FeedbackKind};

/// The length of an uncompressed P-256 point: `0x04`, X and Y.
const POINT_LEN: usize = 65;

/// SendGrid's verification key: the uncompressed EC P-256 point of its public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendgridKey([u8; POINT_LEN]);

const SEQUENCE: u8 = 0x30;
const BIT_STRING: u8 = 0x03;
const OBJECT_IDENTIFIER: u8 = 0x06;
/// id-ecPublicKey, 1.2.840.10045.2.1 (RFC 5480).
const ID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
/// prime256v1 (secp256r1), 1.2.840.10045.3.1.7 (RFC 5480).
const PRIME256V1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// Reads the verification key SendGrid's settings show: the base64 of a DER
/// SubjectPublicKeyInfo for an EC P-256 key (a PEM `BEGIN PUBLIC KEY` block of the same is
/// accepted). The algorithm must be id-ecPublicKey on prime256v1 and the point uncompressed;
/// whether the point is on the curve is checked with each signature.
///
/// # Errors
/// [`SignatureError::InvalidSecret`] for anything else.
pub fn parse_sendgrid_public_key(raw: &str) -> Result<SendgridKey, SignatureError> {
    let encoded: String = if raw.contains("-----BEGIN") {
        raw.lines().map(str::trim).filter(|line| !line.starts_with("-----")).collect()
    } else {
        raw.chars().filter(|c| !c.is_ascii_whitespace()).collect()
    };
    let der = BASE64.decode(encoded).map_err(|_| SignatureError::InvalidSecret("the SendGrid verification key is not base64"))?;
    let point = spki_p256_point(&der).ok_or(SignatureError::InvalidSecret("the SendGrid verification key is not an EC P-256 public key"))?;
    let point: [u8; POINT_LEN] = point.try_into().map_err(|_| SignatureError::InvalidSecret("the SendGrid verification key is not an uncompressed point"))?;
    if point[0] != 0x04 {
        return Err(SignatureError::InvalidSecret("the SendGrid verification key is not an uncompressed point"));
    }
    Ok(SendgridKey(point))
}

/// The subjectPublicKey of a DER SubjectPublicKeyInfo whose algorithm is id-ecPublicKey with
/// the named curve prime256v1, nothing before, after or between.
fn spki_p256_point(der: &[u8]) -> Option<&[u8]> {
    let (spki, rest) = der_take(der, SEQUENCE)?;
    if !rest.is_empty() {
        return None;
    }
    let (algorithm, rest) = der_take(spki, SEQUENCE)?;
    let (bits, rest) = der_take(rest, BIT_STRING)?;
    if !rest.is_empty() {
        return None;
    }
    let (oid, rest) = der_take(algorithm, OBJECT_IDENTIFIER)?;
    let (curve, rest) = der_take(rest, OBJECT_IDENTIFIER)?;
    if oid != ID_EC_PUBLIC_KEY || curve != PRIME256V1 || !rest.is_empty() {
        return None;
    }
    // A BIT STRING's first content byte counts the unused bits of its last: none for a key.
    match bits {
        [0, point @ ..] => Some(point),
        _ => None,
    }
}

/// One DER element of type `tag` at the start of `input`: its contents and what follows.
/// Definite lengths in their shortest form only (DER), up to 65535 bytes.
fn der_take(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&found, rest) = input.split_first()?;
    if found != tag {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = match first {
        0x00..=0x7f => (usize::from(first), rest),
        0x81 => {
            let (&len, rest) = rest.split_first()?;
            (len >= 0x80).then_some((usize::from(len), rest))?
        }
        0x82 => {
            let (&len, rest) = rest.split_first_chunk::<2>()?;
            let len = u16::from_be_bytes(len);
            (len >= 0x100).then_some((usize::from(len), rest))?
        }
        _ => return None,
    };
    (rest.len() >= len).then(|| rest.split_at(len))
}

impl SendgridKey {
    /// Checks a signed Event Webhook request: `signature_b64` is the
    /// `X-Twilio-Email-Event-Webhook-Signature` header (base64 of an ASN.1 DER ECDSA
    /// signature), `timestamp` the `X-Twilio-Email-Event-Webhook-Timestamp` header; the signed
    /// message is the timestamp's bytes followed by the body's, hashed with SHA-256. SendGrid
    /// documents no tolerance; the timestamp must be within
    /// [`SIGNATURE_TOLERANCE`](super::SIGNATURE_TOLERANCE) of `now`, in either direction.
    ///
    /// # Errors
    /// [`SignatureError::Missing`] for an empty header, [`SignatureError::Malformed`] for a
    /// signature that is not base64 or a timestamp that is not Unix seconds,
    /// [`SignatureError::Mismatch`] when the signature does not verify,
    /// [`SignatureError::Stale`] for a valid signature with a timestamp too far from `now`.
    pub fn verify(&self, signature_b64: &str, timestamp: &str, body: &[u8], now: OffsetDateTime) -> Result<(), SignatureError> {
        let signature_b64 = signature_b64.trim();
        if signature_b64.is_empty() {
            return Err(SignatureError::Missing("signature"));
        }
        let at = unix_seconds(timestamp)?;
        let signature = BASE64.decode(signature_b64).map_err(|_| SignatureError::Malformed("the signature is not base64"))?;
        let mut message = Vec::with_capacity(timestamp.len() + body.len());
        message.extend_from_slice(timestamp.as_bytes());
        message.extend_from_slice(body);
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &self.0).verify(&message, &signature).map_err(|_| SignatureError::Mismatch)?;
        check_fresh(at, now)
    }
}

/// [`parse_sendgrid_public_key`] of `public_key_b64`, then [`SendgridKey::verify`].
///
/// # Errors
/// As theirs.
pub fn verify_sendgrid(signature_b64: &str, timestamp: &str, body: &[u8], public_key_b64: &str, now: OffsetDateTime) -> Result<(), SignatureError> {
    parse_sendgrid_public_key(public_key_b64)?.verify(signature_b64, timestamp, body, now)
}

/// Reads an Event Webhook body: a JSON array of events, each giving at most one piece of
/// feedback. `bounce` is a bounce, permanent when its `type` is `bounce` (or absent),
/// transient when `blocked`, with its SMTP `status` (`5.1.1`) when given; `dropped` is a
/// permanent bounce when its `reason` is `Bounced Address` or `Invalid` and nothing
/// otherwise; `spamreport` is a complaint; `delivered` a delivery; other events (`processed`,
/// `deferred`, `open`, `click`, ...) give nothing. The recipient is `email`, the feedback id
/// `sg_event_id` (an event without either is skipped), the provider's message id
/// `sg_message_id` (else empty), the step the reference in `smtp-id` (the email's
/// `Message-ID`), the time `timestamp` (Unix seconds, else `now`).
///
/// # Errors
/// [`PayloadError`] for a body that is not a JSON array; an element that is not an event is
/// skipped.
pub fn parse_sendgrid_events(body: &[u8], now: OffsetDateTime) -> Result<Vec<Feedback>, PayloadError> {
    let events: Vec<Value> = serde_json::from_slice(body).map_err(|e| PayloadError::json(&e))?;
    Ok(events.iter().filter_map(|event| feedback(event, now)).collect())
}

fn feedback(event: &Value, now: OffsetDateTime) -> Option<Feedback> {
    let text = |name: &str| event.get(name).and_then(Value::as_str).map(str::trim).filter(|s| !s.is_empty());
    let kind = match text("event")? {
        "bounce" => {
            let class = match text("type") {
                Some("bounce") | None => BounceClass::Permanent,
                Some("blocked") => BounceClass::Transient,
                Some(_) => BounceClass::Undetermined,
            };
            FeedbackKind::Bounce { class, status: text("status").map(str::to_owned) }
        }
        "dropped" => {
            let reason = text("reason")?;
            if !(reason.eq_ignore_ascii_case("Bounced Address") || reason.eq_ignore_ascii_case("Invalid")) {
                return None;
            }
            FeedbackKind::Bounce { class: BounceClass::Permanent, status: None }
        }
        "spamreport" => FeedbackKind::Complaint,
        "delivered" => FeedbackKind::Delivery,
        _ => return None,
    };
    Some(Feedback {
        feedback_id: text("sg_event_id")?.to_owned(),
        recipient: text("email")?.to_owned(),
        kind,
        provider_message_id: text("sg_message_id").unwrap_or_default().to_owned(),
        reference: text("smtp-id").and_then(EmailReference::from_message_id),
        at: event.get("timestamp").and_then(Value::as_i64).and_then(from_unix).unwrap_or(now),
    })
}

#[cfg(test)]
mod tests {
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};

    use super::*;
    use crate::domain::{AccountId, EnrollmentId, ProspectId, SendKey};

    /// The DER that precedes the point in every P-256 SubjectPublicKeyInfo.
    const SPKI_PREFIX: [u8; 26] = [
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
        0x03, 0x42, 0x00,
    ];

    struct Signer {
        pair: EcdsaKeyPair,
        rng: SystemRandom,
    }

    impl Signer {
        fn new() -> Self {
            let rng = SystemRandom::new();
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
            Self { pair: EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng).unwrap(), rng }
        }

        /// The key as SendGrid shows it: base64 of the SubjectPublicKeyInfo.
        fn public_key_b64(&self) -> String {
            let der = [&SPKI_PREFIX[..], self.pair.public_key().as_ref()].concat();
            base64::engine::general_purpose::STANDARD.encode(der)
        }

        /// What SendGrid sends: base64 of the DER signature over timestamp and body.
        fn sign(&self, timestamp: &str, body: &[u8]) -> String {
            let signature = self.pair.sign(&self.rng, &[timestamp.as_bytes(), body].concat()).unwrap();
            base64::engine::general_purpose::STANDARD.encode(signature.as_ref())
        }
    }

    const T: &str = "1700000000";
    const BODY: &[u8] = br#"[{"email":"ada@example.com","timestamp":1700000000,"event":"delivered","sg_event_id":"e1"}]"#;

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_700_000_000 + 10).unwrap()
    }

    #[test]
    fn sendgrids_own_test_vector_verifies() {
        let key = "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEEDr2LjtURuePQzplybdC+u4CwrqDqBaWjcMMsTbhdbcwHBcepxo7yAQGhHPTnlvFYPAZFceEu/1FwCM/QmGUhA==";
        let signature = "MEUCIQCtIHJeH93Y+qpYeWrySphQgpNGNr/U+UyUlBkU6n7RAwIgJTz2C+8a8xonZGi6BpSzoQsbVRamr2nlxFDWYNH2j/0=";
        let body = br#"{"category":"example_payload","event":"test_event","message_id":"message_id"}"#;
        let at = OffsetDateTime::from_unix_timestamp(1_588_788_367).unwrap();
        assert_eq!(verify_sendgrid(signature, "1588788367", body, key, at), Ok(()));
        assert_eq!(verify_sendgrid(signature, "1588788367", b"payload", key, at), Err(SignatureError::Mismatch));
    }

    #[test]
    fn a_signed_batch_is_accepted_with_the_key_in_base64_or_pem() {
        let signer = Signer::new();
        let key = signer.public_key_b64();
        assert_eq!(verify_sendgrid(&signer.sign(T, BODY), T, BODY, &key, now()), Ok(()));
        let lines: Vec<&str> = key.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap()).collect();
        let pem = format!("-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n", lines.join("\n"));
        assert_eq!(parse_sendgrid_public_key(&pem), parse_sendgrid_public_key(&key));
        assert_eq!(verify_sendgrid(&signer.sign(T, BODY), T, BODY, &pem, now()), Ok(()));
    }

    #[test]
    fn a_tampered_body_or_timestamp_or_another_key_is_refused() {
        let signer = Signer::new();
        let signature = signer.sign(T, BODY);
        let mut tampered = BODY.to_vec();
        tampered[5] ^= 1;
        assert_eq!(verify_sendgrid(&signature, T, &tampered, &signer.public_key_b64(), now()), Err(SignatureError::Mismatch));
        assert_eq!(verify_sendgrid(&signature, "1700000001", BODY, &signer.public_key_b64(), now()), Err(SignatureError::Mismatch));
        assert_eq!(verify_sendgrid(&signature, T, BODY, &Signer::new().public_key_b64(), now()), Err(SignatureError::Mismatch));
    }

    #[test]
    fn a_timestamp_more_than_five_minutes_away_is_stale() {
        let signer = Signer::new();
        for (t, now) in [(1_700_000_000, 1_700_000_301), (1_700_000_400, 1_700_000_000)] {
            let t = t.to_string();
            let now = OffsetDateTime::from_unix_timestamp(now).unwrap();
            assert_eq!(verify_sendgrid(&signer.sign(&t, BODY), &t, BODY, &signer.public_key_b64(), now), Err(SignatureError::Stale), "{t}");
        }
    }

    #[test]
    fn malformed_headers_are_refused() {
        let signer = Signer::new();
        let key = signer.public_key_b64();
        let good = signer.sign(T, BODY);
        assert_eq!(verify_sendgrid("", T, BODY, &key, now()), Err(SignatureError::Missing("signature")));
        assert_eq!(verify_sendgrid(&good, "", BODY, &key, now()), Err(SignatureError::Missing("timestamp")));
        assert_eq!(verify_sendgrid("not base64!", T, BODY, &key, now()), Err(SignatureError::Malformed("the signature is not base64")));
        assert!(matches!(verify_sendgrid(&good, "timestamp", BODY, &key, now()), Err(SignatureError::Malformed(_))));
        for junk in ["AAAA", "MEUCIQ==", &good[..20]] {
            assert_eq!(verify_sendgrid(junk, T, BODY, &key, now()), Err(SignatureError::Mismatch), "{junk}");
        }
    }

    #[test]
    fn only_an_uncompressed_p256_spki_is_a_key() {
        let signer = Signer::new();
        let der = base64::engine::general_purpose::STANDARD.decode(signer.public_key_b64()).unwrap();
        let encode = |der: &[u8]| base64::engine::general_purpose::STANDARD.encode(der);
        assert!(parse_sendgrid_public_key(&encode(&der)).is_ok());
        let mut other_curve = der.clone();
        other_curve[22] = 0x08;
        let mut other_algorithm = der.clone();
        other_algorithm[12] = 0x02;
        let mut compressed = der.clone();
        compressed[26] = 0x02;
        let mut unused_bits = der.clone();
        unused_bits[25] = 0x01;
        let mut long_form = vec![0x30, 0x81, 0x59];
        long_form.extend_from_slice(&der[2..]);
        let mut trailing = der.clone();
        trailing.push(0);
        for bad in [other_curve, other_algorithm, compressed, unused_bits, long_form, trailing, der[..der.len() - 1].to_vec(), der[..30].to_vec(), vec![], vec![0x30], vec![0x30, 0x82, 0xff]] {
            assert!(matches!(parse_sendgrid_public_key(&encode(&bad)), Err(SignatureError::InvalidSecret(_))), "{bad:02x?}");
        }
        for bad in ["", "not a key", "whsec_abc", "-----BEGIN PUBLIC KEY-----\n-----END PUBLIC KEY-----"] {
            let e = parse_sendgrid_public_key(bad).unwrap_err();
            assert!(matches!(e, SignatureError::InvalidSecret(_)), "{bad}");
            assert!(!e.to_string().contains("whsec"));
        }
    }

    fn reference() -> EmailReference {
        EmailReference { account: AccountId::new(), prospect: ProspectId::new(), send: SendKey { enrollment: EnrollmentId::new(), step: 0 } }
    }

    fn parse(events: &serde_json::Value) -> Vec<Feedback> {
        parse_sendgrid_events(&serde_json::to_vec(events).unwrap(), now()).unwrap()
    }

    #[test]
    fn each_feedback_event_maps_and_others_are_skipped() {
        let r = reference();
        let base = |event: &str, id: &str, email: &str| {
            serde_json::json!({"email": email, "timestamp": 1_699_999_000, "smtp-id": format!("<{}>", r.message_id("acme.example")), "event": event, "sg_event_id": id, "sg_message_id": "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0", "category": ["cat"], "unique_arg": 1})
        };
        let mut hard = base("bounce", "b1", "ada@example.com");
        hard["type"] = "bounce".into();
        hard["status"] = "5.1.1".into();
        hard["reason"] = "550 5.1.1 unknown user".into();
        let mut blocked = base("bounce", "b2", "bob@example.com");
        blocked["type"] = "blocked".into();
        blocked["status"] = "4.0.0".into();
        let mut dropped = base("dropped", "d1", "cy@example.com");
        dropped["reason"] = "Bounced Address".into();
        let mut dropped_unsubscribed = base("dropped", "d2", "cy@example.com");
        dropped_unsubscribed["reason"] = "Unsubscribed Address".into();
        let events = serde_json::json!([
            base("processed", "p1", "ada@example.com"), hard, blocked, dropped, dropped_unsubscribed,
            base("spamreport", "s1", "dee@example.com"), base("delivered", "v1", "eve@example.com"), base("open", "o1", "eve@example.com"), base("deferred", "f1", "eve@example.com")
        ]);
        let feedback = parse(&events);
        let summary: Vec<_> = feedback.iter().map(|f| (f.feedback_id.as_str(), f.recipient.as_str(), f.kind.clone())).collect();
        assert_eq!(
            summary,
            [
                ("b1", "ada@example.com", FeedbackKind::Bounce { class: BounceClass::Permanent, status: Some("5.1.1".into()) }),
                ("b2", "bob@example.com", FeedbackKind::Bounce { class: BounceClass::Transient, status: Some("4.0.0".into()) }),
                ("d1", "cy@example.com", FeedbackKind::Bounce { class: BounceClass::Permanent, status: None }),
                ("s1", "dee@example.com", FeedbackKind::Complaint),
                ("v1", "eve@example.com", FeedbackKind::Delivery),
            ]
        );
        for f in &feedback {
            assert_eq!(f.reference, Some(r));
            assert_eq!(f.provider_message_id, "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0");
            assert_eq!(f.at, OffsetDateTime::from_unix_timestamp(1_699_999_000).unwrap());
        }
    }

    #[test]
    fn events_without_an_address_or_id_are_skipped_and_defaults_fill_in() {
        let events = serde_json::json!([
            {"event": "bounce", "sg_event_id": "x1"},
            {"event": "bounce", "email": "ada@example.com"},
            {"event": "bounce", "email": "", "sg_event_id": "x2"},
            {"event": "dropped", "email": "ada@example.com", "sg_event_id": "x3", "reason": "Invalid"},
            {"event": "spamreport", "email": "ada@example.com", "sg_event_id": "x4", "smtp-id": "<14c5d75ce93.dfd.64b469@ismtpd-555>", "timestamp": "soon"},
            5, "delivered", null, [], {}
        ]);
        let feedback = parse(&events);
        assert_eq!(feedback.len(), 2);
        assert_eq!(feedback[0].kind, FeedbackKind::Bounce { class: BounceClass::Permanent, status: None });
        assert_eq!((feedback[1].provider_message_id.as_str(), feedback[1].reference, feedback[1].at), ("", None, now()));
    }

    #[test]
    fn a_body_that_is_not_an_array_is_an_error() {
        assert_eq!(parse_sendgrid_events(b"[]", now()), Ok(vec![]));
        for bad in [&b""[..], b"{}", b"null", b"\"x\"", b"[", b"\xff", br#"{"event":"bounce"}"#] {
            assert!(parse_sendgrid_events(bad, now()).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
