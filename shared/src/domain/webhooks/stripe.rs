//! Stripe: the `Stripe-Signature` header and the events that mean a prospect paid.

use std::collections::BTreeMap;

use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use time::OffsetDateTime;

use super::{check_fresh, unix_seconds, PayloadError, SignatureError};

type HmacSha256 = Hmac<Sha256>;

/// Checks a `Stripe-Signature` header (`t=<unix>,v1=<hex>[,v1=<hex>...]`): HMAC-SHA256 over
/// `"{t}.{body}"`, keyed by the bytes of the whole `whsec_...` secret as Stripe shows it (not
/// base64-decoded). Any one `v1` matching is enough (Stripe sends several while a secret is
/// rolled); other schemes (`v0`) are ignored. The timestamp must be within
/// [`SIGNATURE_TOLERANCE`](super::SIGNATURE_TOLERANCE) of `now`, in either direction.
///
/// # Errors
/// [`SignatureError::Missing`] without `t` or any `v1`, [`SignatureError::Malformed`] for a
/// `t` that is not Unix seconds (or given twice), [`SignatureError::InvalidSecret`] for an
/// empty secret, [`SignatureError::Mismatch`] when no `v1` matches, [`SignatureError::Stale`]
/// for a matching signature with an old (or future) timestamp.
pub fn verify_stripe(header: &str, body: &[u8], secret: &str, now: OffsetDateTime) -> Result<(), SignatureError> {
    if secret.is_empty() {
        return Err(SignatureError::InvalidSecret("the Stripe signing secret is empty"));
    }
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for item in header.split(',') {
        let Some((scheme, value)) = item.trim().split_once('=') else { continue };
        match scheme {
            "t" if timestamp.is_some() => return Err(SignatureError::Malformed("the header has more than one timestamp")),
            "t" => timestamp = Some(value),
            "v1" => signatures.push(value),
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(SignatureError::Missing("timestamp"))?;
    let at = unix_seconds(timestamp)?;
    if signatures.is_empty() {
        return Err(SignatureError::Missing("v1 signature"));
    }
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).map_err(|_| SignatureError::InvalidSecret("HMAC refused the key"))?;
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    let matched = signatures.iter().filter_map(|hex| hex::decode(hex).ok()).any(|signature| mac.clone().verify_slice(&signature).is_ok());
    if !matched {
        return Err(SignatureError::Mismatch);
    }
    check_fresh(at, now)
}

/// One Stripe event, as far as we read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StripeEvent {
    /// `evt_...`: the same on every retry of the event.
    pub id: String,
    /// `checkout.session.completed`, `invoice.paid`, ...
    pub event_type: String,
    /// What names the payer, when the event is a payment that converts a prospect.
    pub payment: Option<PaymentMatch>,
}

/// What a payment says about who paid, to find the prospect by (each field is absent when
/// empty).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PaymentMatch {
    /// `metadata.prospect_id`.
    pub prospect_id: Option<String>,
    /// The Checkout Session's `client_reference_id`.
    pub client_reference_id: Option<String>,
    /// `metadata.external_id`.
    pub external_id: Option<String>,
    /// `customer_details.email`, `customer_email` and `receipt_email`, in that order, those
    /// present and not empty, each once.
    pub emails: Vec<String>,
}

#[derive(Deserialize)]
struct Event {
    id: String,
    #[serde(rename = "type")]
    event_type: String,
    data: Option<Data>,
}

#[derive(Deserialize)]
struct Data {
    object: serde_json::Value,
}

/// The fields of a Checkout Session or an Invoice that name the payer.
#[derive(Deserialize)]
struct Payment {
    payment_status: Option<String>,
    client_reference_id: Option<String>,
    metadata: Option<Metadata>,
    customer_details: Option<CustomerDetails>,
    customer_email: Option<String>,
    receipt_email: Option<String>,
    /// Invoices before API version 2025-03-31.
    subscription_details: Option<WithMetadata>,
    /// Invoices from API version 2025-03-31.
    parent: Option<Parent>,
}

/// Stripe's metadata values are strings; anything else is read as absent.
type Metadata = BTreeMap<String, serde_json::Value>;

#[derive(Deserialize)]
struct CustomerDetails {
    email: Option<String>,
}

#[derive(Deserialize)]
struct WithMetadata {
    metadata: Option<Metadata>,
}

#[derive(Deserialize)]
struct Parent {
    subscription_details: Option<WithMetadata>,
}

/// Reads a Stripe event. A payment converts on `checkout.session.completed` whose
/// `payment_status` is `paid` or `no_payment_required` (a delayed method's session completes
/// `unpaid` and converts on `checkout.session.async_payment_succeeded`), and on
/// `invoice.paid`. `prospect_id` and `external_id` come from the object's own `metadata`;
/// for an invoice they may instead be on the subscription that created it, whose metadata the
/// invoice snapshots in `parent.subscription_details.metadata` (API versions from 2025-03-31)
/// or `subscription_details.metadata` (earlier), looked at in that order. Every other type
/// reads with `payment: None`; unknown fields are ignored.
///
/// # Errors
/// [`PayloadError`] for a body that is not a Stripe event, or a payment event whose
/// `data.object` is not an object.
pub fn parse_stripe_event(body: &[u8]) -> Result<StripeEvent, PayloadError> {
    let event: Event = serde_json::from_slice(body).map_err(|e| PayloadError::json(&e))?;
    let converts = |payment: &Payment| match event.event_type.as_str() {
        "checkout.session.completed" => matches!(payment.payment_status.as_deref(), Some("paid" | "no_payment_required")),
        "checkout.session.async_payment_succeeded" | "invoice.paid" => true,
        _ => false,
    };
    let payment = match event.event_type.as_str() {
        "checkout.session.completed" | "checkout.session.async_payment_succeeded" | "invoice.paid" => {
            let data = event.data.as_ref().ok_or_else(|| PayloadError(format!("a {} event without data", event.event_type)))?;
            let payment = Payment::deserialize(&data.object).map_err(|e| PayloadError::json(&e))?;
            converts(&payment).then(|| payment.to_match())
        }
        _ => None,
    };
    Ok(StripeEvent { id: event.id, event_type: event.event_type, payment })
}

impl Payment {
    fn to_match(&self) -> PaymentMatch {
        let metadata = [
            self.metadata.as_ref(),
            self.parent.as_ref().and_then(|p| p.subscription_details.as_ref()).and_then(|s| s.metadata.as_ref()),
            self.subscription_details.as_ref().and_then(|s| s.metadata.as_ref()),
        ];
        let from_metadata = |key: &str| metadata.iter().flatten().find_map(|m| m.get(key).and_then(serde_json::Value::as_str).and_then(non_empty));
        let mut emails: Vec<String> = Vec::new();
        for email in [self.customer_details.as_ref().and_then(|d| d.email.as_deref()), self.customer_email.as_deref(), self.receipt_email.as_deref()]
            .into_iter()
            .flatten()
            .filter_map(non_empty)
        {
            if !emails.contains(&email) {
                emails.push(email);
            }
        }
        PaymentMatch {
            prospect_id: from_metadata("prospect_id"),
            client_reference_id: self.client_reference_id.as_deref().and_then(non_empty),
            external_id: from_metadata("external_id"),
            emails,
        }
    }
}

fn non_empty(s: &str) -> Option<String> {
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_test_secret_0123456789";
    const T: i64 = 1_700_000_000;

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(T + 30).unwrap()
    }

    /// The `v1` Stripe computes: lowercase hex of HMAC-SHA256 keyed by the secret's bytes.
    fn v1(secret: &str, t: i64, body: &[u8]) -> String {
        let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{t}.").as_bytes());
        mac.update(body);
        hex::encode(mac.finalize().into_bytes())
    }

    const BODY: &[u8] = br#"{"id":"evt_1","type":"invoice.paid","data":{"object":{"customer_email":"ada@example.com"}}}"#;

    #[test]
    fn a_signature_over_the_timestamp_and_body_is_accepted() {
        let header = format!("t={T},v1={}", v1(SECRET, T, BODY));
        assert_eq!(verify_stripe(&header, BODY, SECRET, now()), Ok(()));
    }

    #[test]
    fn the_key_is_the_whole_secret_string_not_its_decoding() {
        let without_prefix = format!("t={T},v1={}", v1("test_secret_0123456789", T, BODY));
        assert_eq!(verify_stripe(&without_prefix, BODY, SECRET, now()), Err(SignatureError::Mismatch));
    }

    #[test]
    fn a_tampered_body_or_another_secret_is_refused() {
        let header = format!("t={T},v1={}", v1(SECRET, T, BODY));
        let mut tampered = BODY.to_vec();
        tampered[10] ^= 1;
        assert_eq!(verify_stripe(&header, &tampered, SECRET, now()), Err(SignatureError::Mismatch));
        assert_eq!(verify_stripe(&header, BODY, "whsec_other", now()), Err(SignatureError::Mismatch));
        let other_time = format!("t={},v1={}", T + 1, v1(SECRET, T, BODY));
        assert_eq!(verify_stripe(&other_time, BODY, SECRET, now()), Err(SignatureError::Mismatch));
    }

    #[test]
    fn a_timestamp_more_than_five_minutes_away_is_stale() {
        for t in [T - 301, T + 400] {
            let at = OffsetDateTime::from_unix_timestamp(T).unwrap();
            let header = format!("t={t},v1={}", v1(SECRET, t, BODY));
            assert_eq!(verify_stripe(&header, BODY, SECRET, at), Err(SignatureError::Stale), "{t}");
        }
    }

    #[test]
    fn any_matching_v1_is_enough_and_v0_is_ignored() {
        let good = v1(SECRET, T, BODY);
        let old = v1("whsec_old", T, BODY);
        let header = format!("t={T}, v1={old}, v1=zz, v1={good}, v0={good}");
        assert_eq!(verify_stripe(&header, BODY, SECRET, now()), Ok(()));
        let only_v0 = format!("t={T},v0={good}");
        assert_eq!(verify_stripe(&only_v0, BODY, SECRET, now()), Err(SignatureError::Missing("v1 signature")));
    }

    #[test]
    fn malformed_headers_are_refused() {
        let good = v1(SECRET, T, BODY);
        assert_eq!(verify_stripe(&format!("v1={good}"), BODY, SECRET, now()), Err(SignatureError::Missing("timestamp")));
        assert_eq!(verify_stripe(&format!("t={T}"), BODY, SECRET, now()), Err(SignatureError::Missing("v1 signature")));
        assert_eq!(verify_stripe(&format!("t={T},t={T},v1={good}"), BODY, SECRET, now()), Err(SignatureError::Malformed("the header has more than one timestamp")));
        for bad in ["", ",,,", "t", "t=", "t=abc,v1=00", "t=-5,v1=00", "=,=", "t=99999999999999999999999,v1=00", "\u{0}\u{ff}é"] {
            assert!(verify_stripe(bad, BODY, SECRET, now()).is_err(), "{bad:?}");
        }
        assert_eq!(verify_stripe(&format!("t={T},v1={good}"), BODY, "", now()), Err(SignatureError::InvalidSecret("the Stripe signing secret is empty")));
    }

    #[test]
    fn errors_never_show_the_secret() {
        let header = format!("t={T},v1=00");
        let e = verify_stripe(&header, BODY, SECRET, now()).unwrap_err();
        assert!(!e.to_string().contains("whsec"), "{e}");
    }

    fn event(event_type: &str, object: &serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({"id": "evt_9", "object": "event", "type": event_type, "livemode": false, "data": {"object": object}})).unwrap()
    }

    #[test]
    fn a_paid_checkout_session_names_its_payer() {
        let object = serde_json::json!({
            "object": "checkout.session", "payment_status": "paid", "client_reference_id": "ref-7",
            "metadata": {"prospect_id": "p-1", "external_id": "crm-1"},
            "customer_details": {"email": "Ada@Example.com", "name": "Ada"}, "customer_email": "ada@example.com", "unknown": [1]
        });
        let e = parse_stripe_event(&event("checkout.session.completed", &object)).unwrap();
        assert_eq!((e.id.as_str(), e.event_type.as_str()), ("evt_9", "checkout.session.completed"));
        assert_eq!(
            e.payment,
            Some(PaymentMatch {
                prospect_id: Some("p-1".into()),
                client_reference_id: Some("ref-7".into()),
                external_id: Some("crm-1".into()),
                emails: vec!["Ada@Example.com".into(), "ada@example.com".into()],
            })
        );
    }

    #[test]
    fn a_session_without_payment_yet_converts_nobody_until_its_async_payment_succeeds() {
        let object = serde_json::json!({"payment_status": "unpaid", "customer_details": {"email": "ada@example.com"}});
        assert_eq!(parse_stripe_event(&event("checkout.session.completed", &object)).unwrap().payment, None);
        let later = parse_stripe_event(&event("checkout.session.async_payment_succeeded", &object)).unwrap();
        assert_eq!(later.payment.map(|p| p.emails), Some(vec!["ada@example.com".to_owned()]));
        let free = serde_json::json!({"payment_status": "no_payment_required", "customer_email": "bob@example.com", "customer_details": null, "metadata": {}});
        assert_eq!(parse_stripe_event(&event("checkout.session.completed", &free)).unwrap().payment.map(|p| p.emails), Some(vec!["bob@example.com".to_owned()]));
    }

    #[test]
    fn a_paid_invoice_reads_its_own_metadata_then_its_subscriptions() {
        let own = serde_json::json!({"object": "invoice", "customer_email": "ada@example.com", "metadata": {"prospect_id": "p-own"}, "parent": {"subscription_details": {"metadata": {"prospect_id": "p-sub", "external_id": "x-sub"}}}});
        let p = parse_stripe_event(&event("invoice.paid", &own)).unwrap().payment.unwrap();
        assert_eq!((p.prospect_id.as_deref(), p.external_id.as_deref(), p.client_reference_id), (Some("p-own"), Some("x-sub"), None));
        let legacy = serde_json::json!({"customer_email": "", "receipt_email": "ada@example.com", "metadata": {"prospect_id": ""}, "subscription_details": {"metadata": {"prospect_id": "p-legacy"}}});
        let p = parse_stripe_event(&event("invoice.paid", &legacy)).unwrap().payment.unwrap();
        assert_eq!((p.prospect_id.as_deref(), p.emails), (Some("p-legacy"), vec!["ada@example.com".to_owned()]));
    }

    #[test]
    fn other_types_read_without_a_payment_and_bad_bodies_are_errors() {
        let refund = parse_stripe_event(&event("charge.refunded", &serde_json::json!({"metadata": 5}))).unwrap();
        assert_eq!((refund.event_type.as_str(), refund.payment), ("charge.refunded", None));
        assert!(parse_stripe_event(br#"{"id":"evt_1","type":"customer.created"}"#).unwrap().payment.is_none());
        for bad in [&b""[..], b"null", b"[]", b"{}", b"\xff\xfe", br#"{"id":"evt_1"}"#, br#"{"id":"evt_1","type":"invoice.paid"}"#, br#"{"id":"evt_1","type":"invoice.paid","data":{"object":[]}}"#] {
            assert!(parse_stripe_event(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
