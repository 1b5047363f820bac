//! Feedback from Amazon SES after the send, on both backends: bounces and complaints change the
//! prospect's status once, through the same write as a PATCH; what names no prospect of ours
//! changes nothing.

use serde_json::{json, Value};
use shared::domain::{Clock, EmailReference, ProspectStatus, SendKey, SendState};
use shared::feedback::FeedbackOutcome;
use shared::ports::ProspectRef;
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};

use crate::contract_tests;
use crate::helpers::{by_email, Kind, TestApp};

contract_tests!(
    a_permanent_bounce_makes_the_prospect_bounced_and_stops_its_campaign,
    a_complaint_found_by_the_providers_message_id_unsubscribes_the_prospect,
    the_third_transient_bounce_within_thirty_days_makes_the_prospect_bounced,
    a_transient_bounce_with_a_permanent_status_is_a_bounce,
    a_notification_applied_twice_changes_the_prospect_once,
    feedback_that_names_no_prospect_of_ours_changes_nothing,
    deliveries_are_recorded_against_their_send,
);

/// How an SES notification names its email: by our tags (event publishing through the
/// configuration set), or only by SES's message id (identity notifications).
#[derive(Clone, Copy)]
pub enum Naming<'a> {
    Tags(&'a EmailReference),
    MessageId,
}

/// An Amazon SES notification about the email `ses_message_id` to `recipient`: `event` is
/// `Bounce`, `Complaint` or `Delivery`; `detail` the event's object (the recipient is added).
pub fn ses_notification(naming: Naming<'_>, event: &str, ses_message_id: &str, recipient: &str, at: OffsetDateTime, mut detail: Value) -> String {
    let at = at.format(&Rfc3339).unwrap();
    let mut mail = json!({"timestamp": at, "source": "hello@acme.example", "messageId": ses_message_id, "destination": [recipient]});
    let type_key = match naming {
        Naming::Tags(reference) => {
            let mut tags: serde_json::Map<String, Value> = reference.tags().into_iter().map(|(name, value)| (name.to_owned(), json!([value]))).collect();
            tags.insert("ses:configuration-set".into(), json!(["cadenhq-sending"]));
            mail["tags"] = Value::Object(tags);
            "eventType"
        }
        Naming::MessageId => "notificationType",
    };
    let part = event.to_ascii_lowercase();
    detail["timestamp"] = json!(at);
    match event {
        "Bounce" => detail["bouncedRecipients"] = json!([{"emailAddress": recipient, "status": detail["status"].clone(), "action": "failed"}]),
        "Complaint" => detail["complainedRecipients"] = json!([{"emailAddress": recipient}]),
        _ => detail["recipients"] = json!([recipient]),
    }
    json!({ type_key: event, part: detail, "mail": mail }).to_string()
}

/// A bounce object: `bounce_type` (`Permanent`, `Transient`, `Undetermined`) and the
/// recipient's SMTP status.
pub fn bounce(feedback_id: &str, bounce_type: &str, status: &str) -> Value {
    json!({"feedbackId": feedback_id, "bounceType": bounce_type, "bounceSubType": "General", "status": status})
}

/// The prospect `email` (created by a POST, its first step sent) and its first email's
/// reference and provider message id.
pub async fn sent_to(app: &TestApp, email: &str) -> (EmailReference, String) {
    let (status, body) = app.post(&json!({"email": email, "first_name": "Ada"})).await;
    assert_eq!(status, 201, "{body}");
    app.tick(1).await;
    let prospect = app.prospect(by_email(email)).await.expect("prospect");
    let send = SendKey { enrollment: prospect.enrollments[0].id, step: 0 };
    let record = app.backend.sends.send_record(send).await.unwrap().expect("the first step's record");
    let SendState::Sent { message_id } = record.state else { panic!("first step not sent: {record:?}") };
    (EmailReference { account: app.account, prospect: prospect.id, send }, message_id)
}

async fn apply(app: &TestApp, notification: &str) -> Vec<FeedbackOutcome> {
    app.backend.feedback_service(app.clock.clone()).apply_ses_notification(notification).await.expect("applied")
}

/// The prospect as the API returns it.
async fn resource(app: &TestApp, reference: &EmailReference) -> Value {
    let (status, body) = app.send(reqwest::Method::GET, &format!("/api/v1/prospects/{}", reference.prospect), Some(&app.key), String::new()).await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn a_permanent_bounce_makes_the_prospect_bounced_and_stops_its_campaign(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let (reference, message_id) = sent_to(&app, "ada@example.com").await;
    let notification = ses_notification(Naming::Tags(&reference), "Bounce", &message_id, "Ada@Example.com", app.clock.now(), bounce("fb-1", "Permanent", "5.1.1"));

    let outcomes = apply(&app, &notification).await;

    assert_eq!(outcomes, [FeedbackOutcome::Applied(Some(ProspectStatus::Bounced))]);
    let body = resource(&app, &reference).await;
    assert_eq!((body["status"].as_str(), body["status_reason"].as_str()), (Some("bounced"), Some("bounce")), "{body}");
    assert_eq!(body["enrollments"][0]["state"], "ended", "{body}");
    assert_eq!(body["enrollments"][0]["ended_reason"], "bounced", "{body}");
    app.clock.advance(Duration::days(4));
    app.tick(1).await;
    assert_eq!(app.mailer.subjects(), ["Hi Ada"], "no step after the bounce");
}

async fn a_complaint_found_by_the_providers_message_id_unsubscribes_the_prospect(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let (reference, message_id) = sent_to(&app, "cam@example.com").await;
    let detail = json!({"feedbackId": "fb-2", "complaintFeedbackType": "abuse"});
    let notification = ses_notification(Naming::MessageId, "Complaint", &message_id, "cam@example.com", app.clock.now(), detail);

    let outcomes = apply(&app, &notification).await;

    assert_eq!(outcomes, [FeedbackOutcome::Applied(Some(ProspectStatus::Unsubscribed))]);
    let (status, body) = app.send(reqwest::Method::GET, &format!("/api/v1/prospects/{}/export", reference.prospect), Some(&app.key), String::new()).await;
    assert_eq!(status, 200, "{body}");
    let changes = body["status_changes"].as_array().expect("status changes");
    assert_eq!(changes.last().map(|c| (c["from"].clone(), c["to"].clone(), c["reason"].clone())), Some((json!("new"), json!("unsubscribed"), json!("complaint"))), "{body}");
}

async fn the_third_transient_bounce_within_thirty_days_makes_the_prospect_bounced(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let (reference, message_id) = sent_to(&app, "tia@example.com").await;
    let transient = |id: &str, at: OffsetDateTime| {
        ses_notification(Naming::Tags(&reference), "Bounce", &message_id, "tia@example.com", at, bounce(id, "Transient", "4.2.2"))
    };
    // One long ago: outside the window by the time the others arrive.
    assert_eq!(apply(&app, &transient("fb-old", app.clock.now())).await, [FeedbackOutcome::Applied(None)]);
    app.clock.advance(Duration::days(31));
    assert_eq!(apply(&app, &transient("fb-a", app.clock.now())).await, [FeedbackOutcome::Applied(None)]);
    app.clock.advance(Duration::days(10));
    assert_eq!(apply(&app, &transient("fb-b", app.clock.now())).await, [FeedbackOutcome::Applied(None)]);
    assert_eq!(resource(&app, &reference).await["status"], "new", "two within thirty days");

    app.clock.advance(Duration::days(10));
    let outcomes = apply(&app, &transient("fb-c", app.clock.now())).await;

    assert_eq!(outcomes, [FeedbackOutcome::Applied(Some(ProspectStatus::Bounced))]);
    let body = resource(&app, &reference).await;
    assert_eq!((body["status"].as_str(), body["status_reason"].as_str()), (Some("bounced"), Some("bounce")), "{body}");
}

async fn a_transient_bounce_with_a_permanent_status_is_a_bounce(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let (reference, message_id) = sent_to(&app, "dom@example.com").await;
    // SES has labelled "5.4.4 invalid domain" transient.
    let notification = ses_notification(Naming::Tags(&reference), "Bounce", &message_id, "dom@example.com", app.clock.now(), bounce("fb-3", "Transient", "5.4.4"));

    assert_eq!(apply(&app, &notification).await, [FeedbackOutcome::Applied(Some(ProspectStatus::Bounced))]);
    assert_eq!(resource(&app, &reference).await["status"], "bounced");
}

async fn a_notification_applied_twice_changes_the_prospect_once(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let (reference, message_id) = sent_to(&app, "dup@example.com").await;
    let notification = ses_notification(Naming::Tags(&reference), "Bounce", &message_id, "dup@example.com", app.clock.now(), bounce("fb-4", "Permanent", "5.1.1"));
    assert_eq!(apply(&app, &notification).await, [FeedbackOutcome::Applied(Some(ProspectStatus::Bounced))]);
    let (status, _) = app.patch(&reference.prospect.to_string(), &json!({"status": "new"})).await;
    assert_eq!(status, 200);

    let outcomes = apply(&app, &notification).await;

    assert_eq!(outcomes, [FeedbackOutcome::Duplicate]);
    assert_eq!(resource(&app, &reference).await["status"], "new", "the PATCH after the bounce stands");
    let transient = ses_notification(Naming::Tags(&reference), "Bounce", &message_id, "dup@example.com", app.clock.now(), bounce("fb-5", "Transient", ""));
    assert_eq!(apply(&app, &transient).await, [FeedbackOutcome::Applied(None)]);
    assert_eq!(apply(&app, &transient).await, [FeedbackOutcome::Duplicate], "a transient bounce counts once");
}

async fn feedback_that_names_no_prospect_of_ours_changes_nothing(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let (reference, message_id) = sent_to(&app, "eve@example.com").await;
    let now = app.clock.now();
    let permanent = |id: &str| bounce(id, "Permanent", "5.1.1");
    let cases = [
        ("an unknown message id", ses_notification(Naming::MessageId, "Bounce", "0100-not-ours", "eve@example.com", now, permanent("fb-6"))),
        ("another recipient", ses_notification(Naming::Tags(&reference), "Bounce", &message_id, "mallory@example.com", now, permanent("fb-7"))),
        ("a recipient that is not an address", ses_notification(Naming::Tags(&reference), "Bounce", &message_id, "not an address", now, permanent("fb-8"))),
    ];
    for (what, notification) in &cases {
        assert_eq!(apply(&app, notification).await, [FeedbackOutcome::Unmatched], "{what}");
    }
    assert_eq!(resource(&app, &reference).await["status"], "new");

    let (status, _) = app.send(reqwest::Method::DELETE, &format!("/api/v1/prospects/{}", reference.prospect), Some(&app.key), String::new()).await;
    assert_eq!(status, 200);
    let after_erasure = ses_notification(Naming::Tags(&reference), "Bounce", &message_id, "eve@example.com", now, permanent("fb-9"));
    assert_eq!(apply(&app, &after_erasure).await, [FeedbackOutcome::Unmatched], "an erased prospect");
    let untagged = ses_notification(Naming::MessageId, "Bounce", &message_id, "eve@example.com", now, permanent("fb-10"));
    assert_eq!(apply(&app, &untagged).await, [FeedbackOutcome::Unmatched], "an erased prospect, by message id");
    let (status, body) = app.post(&json!({"email": "eve@example.com"})).await;
    assert_eq!((status, body["created"].as_bool()), (201, Some(true)), "{body}");
    let again = app.prospect(ProspectRef::Email(shared::domain::NormalizedEmail::parse("eve@example.com").unwrap())).await.unwrap();
    assert_eq!(again.status, ProspectStatus::Unsubscribed, "still suppressed, as an erased address is");
}

async fn deliveries_are_recorded_against_their_send(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let (reference, message_id) = sent_to(&app, "del@example.com").await;
    let delivery = json!({"smtpResponse": "250 2.0.0 OK", "processingTimeMillis": 120});
    let notification = ses_notification(Naming::Tags(&reference), "Delivery", &message_id, "del@example.com", app.clock.now(), delivery.clone());

    assert_eq!(apply(&app, &notification).await, [FeedbackOutcome::Recorded]);
    assert_eq!(resource(&app, &reference).await["status"], "new");
    let untagged = ses_notification(Naming::MessageId, "Delivery", &message_id, "del@example.com", app.clock.now(), delivery);
    assert_eq!(apply(&app, &untagged).await, [FeedbackOutcome::Recorded]);
    assert_eq!(app.send_states("del@example.com", 1).await, ["sent"]);
}
