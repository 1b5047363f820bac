//! Incoming webhooks over HTTP, on both backends: Stripe payments convert, Resend and SendGrid
//! bounces and complaints stop campaigns, SES notifications arrive through Amazon SNS over
//! HTTPS. Every payload is signed here the way its provider signs (tests/support/sign.py, with
//! the providers' own libraries); whatever is not signed right changes nothing.

use serde_json::{json, Value};
use shared::admin;
use shared::domain::{Clock, EventOutcome, Integration, Provider, ReceivedEvent, SystemClock};
use time::format_description::well_known::Rfc3339;
use time::Duration;

use crate::contract_tests;
use crate::feedback::{bounce, sent_to, ses_notification, Naming};
use crate::helpers::{by_email, sign, sns_test_signer, Kind, TestApp, SNS_TEST_TOPIC};

contract_tests!(
    a_stripe_payment_converts_the_prospect_it_names,
    a_stripe_event_not_signed_right_changes_nothing_and_is_answered_like_an_unknown_endpoint,
    a_resend_bounce_stops_the_next_step_of_a_running_campaign,
    sendgrid_events_signed_with_its_key_apply_each_once,
    ses_notifications_delivered_by_sns_over_https_apply_once,
    sns_messages_not_signed_right_or_for_another_topic_are_refused,
    bad_signatures_are_rate_limited_per_endpoint,
);

async fn endpoint(app: &TestApp, provider: Provider, secret: &str) -> Integration {
    admin::create_integration(app.backend.admin.as_ref(), app.backend.integrations.as_ref(), app.account, provider, secret, &SystemClock)
        .await
        .expect("endpoint created")
}

async fn deliver(app: &TestApp, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, Value) {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    let (status, _, body) = app.send_with(reqwest::Method::POST, path, None, &all, body.to_owned()).await;
    (status, body)
}

fn url(integration: &Integration) -> String {
    format!("/webhooks/{}/{}", integration.provider, integration.id)
}

fn now_ts(app: &TestApp) -> String {
    app.clock.now().unix_timestamp().to_string()
}

async fn events(app: &TestApp) -> Vec<ReceivedEvent> {
    admin::list_events(app.backend.admin.as_ref(), app.backend.integrations.as_ref(), Some(app.account), 100).await.unwrap()
}

fn outcomes(body: &Value) -> Vec<String> {
    body["events"].as_array().expect("events").iter().map(|e| e["outcome"].as_str().unwrap().to_owned()).collect()
}

async fn status_of(app: &TestApp, email: &str) -> (String, String) {
    let prospect = app.prospect(by_email(email)).await.expect("prospect");
    let (status, body) = app.send(reqwest::Method::GET, &format!("/api/v1/prospects/{}", prospect.id), Some(&app.key), String::new()).await;
    assert_eq!(status, 200, "{body}");
    (body["status"].as_str().unwrap().to_owned(), body["status_reason"].as_str().unwrap().to_owned())
}

const STRIPE_SECRET: &str = "whsec_test_5f0a1c9e2b7d4f3a8c6e1b0d9f2a7c4e";

fn stripe_event(id: &str, event_type: &str, object: Value) -> String {
    json!({"id": id, "object": "event", "type": event_type, "api_version": "2025-01-27", "created": 1_764_000_000, "data": {"object": object}}).to_string()
}

async fn a_stripe_payment_converts_the_prospect_it_names(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    for (email, external_id) in [("ada@example.com", "crm-ada"), ("bo@example.com", "crm-bo"), ("cy@example.com", "crm-cy")] {
        let (status, body) = app.post(&json!({"email": email, "external_id": external_id})).await;
        assert_eq!(status, 201, "{body}");
    }
    let stripe = endpoint(&app, Provider::Stripe, STRIPE_SECRET).await;
    let send = |body: String| {
        let header = sign(&["stripe", STRIPE_SECRET, &now_ts(&app)], &body);
        let app = &app;
        let path = url(&stripe);
        async move { deliver(app, &path, &[("stripe-signature", &header)], &body).await }
    };

    // By client_reference_id, the account's external_id.
    let paid = stripe_event("evt_1", "checkout.session.completed", json!({"object": "checkout.session", "payment_status": "paid", "client_reference_id": "crm-ada"}));
    let (status, body) = send(paid.clone()).await;
    assert_eq!((status, outcomes(&body)), (200, vec!["applied".to_owned()]), "{body}");
    assert_eq!(status_of(&app, "ada@example.com").await, ("converted".into(), "payment".into()));
    // The same event again changes nothing.
    let (status, body) = send(paid).await;
    assert_eq!((status, outcomes(&body)), (200, vec!["duplicate".to_owned()]), "{body}");
    // By the customer's email, normalized like the upsert.
    let invoice = stripe_event("evt_2", "invoice.paid", json!({"object": "invoice", "customer_email": " Bo@Example.COM "}));
    let (_, body) = send(invoice).await;
    assert_eq!(outcomes(&body), ["applied"], "{body}");
    assert_eq!(status_of(&app, "bo@example.com").await, ("converted".into(), "payment".into()));
    // An unpaid checkout, another type of event, and a payment of nobody we hold: 200, nothing changes.
    let unpaid = stripe_event("evt_3", "checkout.session.completed", json!({"payment_status": "unpaid", "client_reference_id": "crm-cy"}));
    let refund = stripe_event("evt_4", "charge.refunded", json!({"object": "charge", "receipt_email": "cy@example.com"}));
    let stranger = stripe_event("evt_5", "checkout.session.async_payment_succeeded", json!({"customer_details": {"email": "zed@example.com"}}));
    for (event, expected) in [(unpaid, "ignored"), (refund, "ignored"), (stranger, "unmatched")] {
        let (status, body) = send(event).await;
        assert_eq!((status, outcomes(&body)), (200, vec![expected.to_owned()]), "{body}");
    }
    assert_eq!(status_of(&app, "cy@example.com").await, ("new".into(), "api".into()));

    let logged: Vec<(String, EventOutcome)> = events(&app).await.into_iter().map(|e| (e.event_id, e.outcome)).collect();
    assert_eq!(
        logged,
        [
            ("evt_5".to_owned(), EventOutcome::Unmatched),
            ("evt_4".to_owned(), EventOutcome::Ignored),
            ("evt_3".to_owned(), EventOutcome::Ignored),
            ("evt_2".to_owned(), EventOutcome::Applied),
            ("evt_1".to_owned(), EventOutcome::Duplicate),
            ("evt_1".to_owned(), EventOutcome::Applied),
        ]
    );
}

async fn a_stripe_event_not_signed_right_changes_nothing_and_is_answered_like_an_unknown_endpoint(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    app.post(&json!({"email": "ada@example.com", "external_id": "crm-ada"})).await;
    let stripe = endpoint(&app, Provider::Stripe, STRIPE_SECRET).await;
    let body = stripe_event("evt_1", "invoice.paid", json!({"metadata": {"external_id": "crm-ada"}}));
    let header = sign(&["stripe", STRIPE_SECRET, &now_ts(&app)], &body);
    let tampered = body.replacen("crm-ada", "crm-adb", 1);
    let other_secret = sign(&["stripe", "whsec_another", &now_ts(&app)], &body);
    let stale = sign(&["stripe", STRIPE_SECRET, &(app.clock.now() - Duration::seconds(301)).unix_timestamp().to_string()], &body);

    let unknown = "/webhooks/stripe/whep_00000000000000000000000000000000";
    let cases: [(&str, &str, &str); 6] = [
        (&url(&stripe), &tampered, &header),
        (&url(&stripe), &body, &other_secret),
        (&url(&stripe), &body, &stale),
        (&url(&stripe), &body, "t=1,v0=abc"),
        (unknown, &body, &header),
        ("/webhooks/stripe/not-an-endpoint", &body, &header),
    ];
    let mut answers = Vec::new();
    for (path, body, header) in cases {
        answers.push(deliver(&app, path, &[("stripe-signature", header)], body).await);
    }
    let (unsigned_status, unsigned_body) = deliver(&app, &url(&stripe), &[], &body).await;
    answers.push((unsigned_status, unsigned_body));
    for (status, body) in &answers {
        assert_eq!((*status, body), (400, &json!({"error": "Invalid signature, or no such endpoint"})));
    }
    assert_eq!(status_of(&app, "ada@example.com").await, ("new".into(), "api".into()));
    // Refusals at a known endpoint are in its account's log; the signed one then applies.
    let logged = events(&app).await;
    assert_eq!(logged.len(), 5, "{logged:?}");
    assert!(logged.iter().all(|e| e.outcome == EventOutcome::Rejected));
    let (status, answer) = deliver(&app, &url(&stripe), &[("stripe-signature", &header)], &body).await;
    assert_eq!((status, outcomes(&answer)), (200, vec!["applied".to_owned()]), "{answer}");
    // A body over 256 KiB is refused before anything else.
    let (status, answer) = deliver(&app, &url(&stripe), &[("stripe-signature", &header)], &" ".repeat(256 * 1024 + 1)).await;
    assert_eq!(status, 413, "{answer}");
}

const RESEND_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

async fn a_resend_bounce_stops_the_next_step_of_a_running_campaign(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let (reference, _) = sent_to(&app, "ada@example.com").await;
    let resend = endpoint(&app, Provider::Resend, RESEND_SECRET).await;
    let at = app.clock.now().format(&Rfc3339).unwrap();
    let bounced = json!({"type": "email.bounced", "created_at": at, "data": {
        "email_id": "4ef9a417-02e9-4d39-ad75-9611e0fcc33c", "to": ["Ada@Example.com"], "subject": "Hi Ada",
        "message_id": format!("<{}>", reference.message_id("acme.example")),
        "bounce": {"type": "Permanent", "subType": "General", "message": "The recipient's mailbox does not exist."}}})
    .to_string();
    let ts = now_ts(&app);
    let signature = sign(&["standard", RESEND_SECRET, "msg_2Kq1", &ts], &bounced);
    let headers = [("svix-id", "msg_2Kq1"), ("svix-timestamp", ts.as_str()), ("svix-signature", signature.as_str())];

    let (status, body) = deliver(&app, &url(&resend), &headers, &bounced).await;
    assert_eq!((status, outcomes(&body)), (200, vec!["applied".to_owned()]), "{body}");
    assert_eq!(status_of(&app, "ada@example.com").await, ("bounced".into(), "bounce".into()));
    let (_, again) = deliver(&app, &url(&resend), &headers, &bounced).await;
    assert_eq!(outcomes(&again), ["duplicate"], "{again}");
    app.clock.advance(Duration::days(4));
    app.tick(1).await;
    assert_eq!(app.mailer.subjects(), ["Hi Ada"], "no step after the bounce");

    // A tampered byte, or a signature of another message id: refused.
    let tampered = bounced.replacen("Permanent", "Transient", 1);
    let (status, _) = deliver(&app, &url(&resend), &headers, &tampered).await;
    assert_eq!(status, 400);
    let (status, _) = deliver(&app, &url(&resend), &[("svix-id", "msg_other"), headers[1], headers[2]], &bounced).await;
    assert_eq!(status, 400);
}

async fn sendgrid_events_signed_with_its_key_apply_each_once(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    for email in ["cy@example.com", "di@example.com"] {
        app.post(&json!({"email": email})).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("sendgrid.pem");
    let public_key = sign(&["sendgrid-key", key_file.to_str().unwrap()], "");
    let sendgrid = endpoint(&app, Provider::Sendgrid, &public_key).await;
    let unix = app.clock.now().unix_timestamp();
    let batch = json!([
        {"email": "cy@example.com", "timestamp": unix, "event": "spamreport", "sg_event_id": "sg-1", "sg_message_id": "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0"},
        {"email": "Di@example.com", "timestamp": unix, "event": "bounce", "type": "bounce", "status": "5.1.1", "reason": "550 5.1.1 unknown user", "sg_event_id": "sg-2"},
        {"email": "zed@example.com", "timestamp": unix, "event": "bounce", "type": "bounce", "status": "5.1.1", "sg_event_id": "sg-3"},
        {"email": "cy@example.com", "timestamp": unix, "event": "open", "sg_event_id": "sg-4"}
    ])
    .to_string();
    let ts = now_ts(&app);
    let signature = sign(&["sendgrid", key_file.to_str().unwrap(), &ts], &batch);
    let headers = [("x-twilio-email-event-webhook-signature", signature.as_str()), ("x-twilio-email-event-webhook-timestamp", ts.as_str())];

    let (status, body) = deliver(&app, &url(&sendgrid), &headers, &batch).await;
    assert_eq!((status, outcomes(&body)), (200, vec!["applied".to_owned(), "applied".to_owned(), "unmatched".to_owned()]), "{body}");
    assert_eq!(status_of(&app, "cy@example.com").await, ("unsubscribed".into(), "complaint".into()));
    assert_eq!(status_of(&app, "di@example.com").await, ("bounced".into(), "bounce".into()));
    let (_, again) = deliver(&app, &url(&sendgrid), &headers, &batch).await;
    assert_eq!(outcomes(&again), ["duplicate", "duplicate", "unmatched"], "{again}");

    let (status, _) = deliver(&app, &url(&sendgrid), &headers, &batch.replacen("sg-1", "sg-9", 1)).await;
    assert_eq!(status, 400, "a tampered byte");
    // Another account's endpoint cannot reach this account's prospects.
    let (other, _) = app.other_account().await;
    let foreign = admin::create_integration(app.backend.admin.as_ref(), app.backend.integrations.as_ref(), other, Provider::Sendgrid, &public_key, &SystemClock).await.unwrap();
    let one = json!([{"email": "cy@example.com", "timestamp": unix, "event": "bounce", "type": "bounce", "status": "5.1.1", "sg_event_id": "sg-5"}]).to_string();
    let signature = sign(&["sendgrid", key_file.to_str().unwrap(), &ts], &one);
    let (status, body) = deliver(&app, &url(&foreign), &[("x-twilio-email-event-webhook-signature", &signature), headers[1]], &one).await;
    assert_eq!((status, outcomes(&body)), (200, vec!["unmatched".to_owned()]), "{body}");
    assert_eq!(status_of(&app, "cy@example.com").await, ("unsubscribed".into(), "complaint".into()));
}

/// An SNS Notification of `message` (an SES notification), signed with the test certificate
/// (SignatureVersion `version`).
fn sns_message(app: &TestApp, message_id: &str, topic: &str, message: &str, version: &str) -> String {
    let unsigned = json!({
        "Type": "Notification", "MessageId": message_id, "TopicArn": topic, "Message": message,
        "Timestamp": app.clock.now().format(&Rfc3339).unwrap(), "SignatureVersion": version,
        "SigningCertURL": sns_test_signer().cert_url,
        "UnsubscribeURL": format!("https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe&SubscriptionArn={topic}:4f2a"),
    });
    sign(&["sns", sns_test_signer().key.to_str().unwrap()], &unsigned.to_string())
}

async fn post_sns(app: &TestApp, signed: &str) -> (u16, Value) {
    deliver(app, "/webhooks/ses", &[("x-amz-sns-message-type", "Notification")], signed).await
}

async fn ses_notifications_delivered_by_sns_over_https_apply_once(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let mut sent = Vec::new();
    for email in ["ada@example.com", "bo@example.com", "cy@example.com", "di@example.com"] {
        sent.push(sent_to(&app, email).await);
    }
    let now = app.clock.now();
    let note = |i: usize, email: &str, event: &str, detail: Value| ses_notification(Naming::Tags(&sent[i].0), event, &sent[i].1, email, now, detail);
    let cases = [
        (note(0, "ada@example.com", "Bounce", bounce("fb-1", "Permanent", "5.1.1")), "1", "applied"),
        (note(0, "ada@example.com", "Bounce", bounce("fb-1", "Permanent", "5.1.1")), "2", "duplicate"),
        (note(1, "bo@example.com", "Complaint", json!({"feedbackId": "fb-2"})), "1", "applied"),
        (note(2, "cy@example.com", "Bounce", bounce("fb-3", "Transient", "4.4.7")), "2", "applied"),
        (note(2, "cy@example.com", "Bounce", bounce("fb-4", "Transient", "4.4.7")), "2", "applied"),
        (note(2, "cy@example.com", "Bounce", bounce("fb-5", "Transient", "4.4.7")), "2", "applied"),
        (note(3, "di@example.com", "Bounce", bounce("fb-6", "Transient", "5.2.1")), "2", "applied"),
        (note(3, "zed@example.com", "Bounce", bounce("fb-7", "Permanent", "5.1.1")), "2", "unmatched"),
    ];
    for (i, (message, version, expected)) in cases.iter().enumerate() {
        let signed = sns_message(&app, &format!("9e3c0b5e-0000-4000-8000-00000000000{i}"), SNS_TEST_TOPIC, message, version);
        let (status, body) = post_sns(&app, &signed).await;
        assert_eq!((status, outcomes(&body)), (200, vec![(*expected).to_owned()]), "case {i}: {body}");
    }
    assert_eq!(status_of(&app, "ada@example.com").await, ("bounced".into(), "bounce".into()));
    assert_eq!(status_of(&app, "bo@example.com").await, ("unsubscribed".into(), "complaint".into()));
    assert_eq!(status_of(&app, "cy@example.com").await, ("bounced".into(), "bounce".into()), "the third transient bounce");
    assert_eq!(status_of(&app, "di@example.com").await, ("bounced".into(), "bounce".into()), "a 5.x.x status whatever its label");
    assert!(app.https.urls().is_empty(), "the certificate came from the seeded folder: {:?}", app.https.urls());
    assert_eq!(events(&app).await.len(), 8, "each named an email of this account");

    // A subscription confirmation for the allowed topic is confirmed at its SubscribeURL.
    let subscribe = format!("https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription&TopicArn={SNS_TEST_TOPIC}&Token=2336412f37");
    let unsigned = json!({
        "Type": "SubscriptionConfirmation", "MessageId": "165545c9-2a5c-472c-8df2-7ff2be2b3b1b", "Token": "2336412f37",
        "TopicArn": SNS_TEST_TOPIC, "Message": "You have chosen to subscribe to the topic.", "SubscribeURL": subscribe,
        "Timestamp": app.clock.now().format(&Rfc3339).unwrap(), "SignatureVersion": "2", "SigningCertURL": sns_test_signer().cert_url,
    });
    let signed = sign(&["sns", sns_test_signer().key.to_str().unwrap()], &unsigned.to_string());
    let (status, body) = post_sns(&app, &signed).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(app.https.urls(), [subscribe]);
}

async fn sns_messages_not_signed_right_or_for_another_topic_are_refused(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let (reference, message_id) = sent_to(&app, "ada@example.com").await;
    let message = ses_notification(Naming::Tags(&reference), "Bounce", &message_id, "ada@example.com", app.clock.now(), bounce("fb-1", "Permanent", "5.1.1"));
    let good = sns_message(&app, "m-1", SNS_TEST_TOPIC, &message, "2");
    let with = |field: &str, value: Value| {
        let mut v: Value = serde_json::from_str(&good).unwrap();
        v[field] = value;
        v.to_string()
    };
    let tampered = with("Message", json!(message.replacen("Permanent", "Transient", 1)));
    let other_topic = sns_message(&app, "m-2", "arn:aws:sns:us-east-1:999999999999:elsewhere", &message, "2");
    let other_host = with("SigningCertURL", json!(sns_test_signer().cert_url.replace("sns.us-east-1.amazonaws.com", "sns.us-east-1.amazonaws.com.evil.example")));
    let unsigned = with("Signature", json!(""));
    // A bad signature is 400 and another topic 403; a certificate URL on another host, a
    // message without a signature and one missing its fields are refused (4xx) before any fetch.
    let cases = [(tampered, Some(400)), (other_topic, Some(403)), (other_host, None), (unsigned, None), ("{\"Type\":\"Notification\"}".to_owned(), None)];
    for (i, (body, expected)) in cases.iter().enumerate() {
        let (status, answer) = post_sns(&app, body).await;
        assert!((400..500).contains(&status), "case {i}: {status} {answer}");
        if let Some(expected) = expected {
            assert_eq!(status, *expected, "case {i}: {answer}");
        }
    }
    // Signed an hour and a minute before it arrives: stale.
    app.clock.advance(Duration::minutes(61));
    let (status, answer) = post_sns(&app, &good).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(status_of(&app, "ada@example.com").await, ("new".into(), "api".into()), "nothing changed");
    assert!(app.https.urls().is_empty(), "no certificate fetched from another host: {:?}", app.https.urls());
}

async fn bad_signatures_are_rate_limited_per_endpoint(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    app.post(&json!({"email": "ada@example.com", "external_id": "crm-ada"})).await;
    let stripe = endpoint(&app, Provider::Stripe, STRIPE_SECRET).await;
    let other = endpoint(&app, Provider::Stripe, STRIPE_SECRET).await;
    let body = stripe_event("evt_1", "invoice.paid", json!({"metadata": {"external_id": "crm-ada"}}));
    let bad = "t=1,v1=00";
    let mut statuses = Vec::new();
    for _ in 0..11 {
        statuses.push(deliver(&app, &url(&stripe), &[("stripe-signature", bad)], &body).await.0);
    }
    assert_eq!(statuses, [[400; 10].as_slice(), &[429]].concat(), "ten bad signatures, then 429");
    // Another endpoint has its own budget, and a good signature still gets through.
    assert_eq!(deliver(&app, &url(&other), &[("stripe-signature", bad)], &body).await.0, 400);
    let header = sign(&["stripe", STRIPE_SECRET, &now_ts(&app)], &body);
    let (status, answer) = deliver(&app, &url(&stripe), &[("stripe-signature", &header)], &body).await;
    assert_eq!((status, outcomes(&answer)), (200, vec!["applied".to_owned()]), "{answer}");
}
