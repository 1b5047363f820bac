//! Every event in `events/` (the payloads `sam local invoke -e` takes) through the handler of
//! the function that owns it: API Gateway events through that function's router as
//! `lambda_http` hands them over (the webhook events through the webhooks function's router),
//! SQS events through the scheduler's batch handler, SNS events (Amazon SES notifications)
//! through the feedback function's handler.

use std::path::Path;
use std::sync::Arc;

use serde_json::Value;
use shared::adapters::sqlite::SqliteStore;
use shared::admin;
use shared::backend::Backend;
use shared::domain::{
    AccountId, ApiKey, ApiKeyRecord, CampaignDefinition, ExternalId, NormalizedEmail, Prospect, ProspectId, ProspectStatus, SendKey, StatusReason,
    SystemClock,
};
use aws_lambda_events::event::sns::SnsEvent;
use aws_lambda_events::event::sqs::SqsEvent;
use shared::feedback::FeedbackOutcome;
use shared::adapters::sns_http::{ReqwestGet, SnsVerifier};
use shared::http::{router, webhooks_router, Routes, UNAUTHORIZED_MESSAGE};
use shared::ports::{ProspectRef, ProspectRepository};
use shared::adapters::sns::handle_feedback;
use shared::adapters::sqs::handle_batch;
use shared::scheduler::{DeliverySettings, Scheduler};
use tower::ServiceExt;

use crate::helpers::{test_secret, RecordingMailer};

/// The key the events carry; seeded into the store by this test only.
const EVENTS_KEY: &str = "chq_0000000000000000000000000000000000000000000e7e47";

/// Each event, in the order they run against one store, with the status it must get. The
/// DELETE events come after every other event about a prospect: they erase the one the others
/// read.
pub(crate) const EXPECTED: [(&str, u16); 29] = [
    ("post-prospect-created", 201),
    ("post-prospect-updated", 200),
    ("post-prospect-missing-email", 400),
    ("post-prospect-malformed-json", 400),
    ("post-prospect-invalid-fields", 422),
    ("post-prospect-unknown-campaign", 422),
    ("post-prospect-missing-key", 401),
    ("post-prospect-invalid-key", 401),
    ("patch-prospect-by-external-id", 200),
    ("patch-prospect-external-id-not-found", 404),
    ("patch-prospect-by-id-not-found", 404),
    ("patch-prospect-malformed-id", 404),
    ("patch-prospect-invalid-status", 400),
    ("patch-prospect-missing-key", 401),
    ("get-prospect-by-id", 200),
    ("get-prospect-by-external-id", 200),
    ("get-prospect-not-found", 404),
    ("get-prospect-malformed-id", 404),
    ("get-prospect-missing-key", 401),
    ("get-prospect-export", 200),
    ("list-prospects", 200),
    ("list-prospects-bad-limit", 400),
    // Signed, but for no endpoint of ours: the one answer a bad signature gets too.
    ("webhooks-stripe-unknown-endpoint", 400),
    // An SES notification posted as it is, not in a signed SNS message.
    ("webhooks-ses-unsigned", 400),
    ("delete-prospect-by-id", 200),
    ("delete-prospect-not-found", 404),
    ("delete-prospect-missing-key", 401),
    ("unsubscribe-page-invalid-token", 400),
    ("unsubscribe-one-click-invalid-token", 400),
];

/// SQS events for the scheduler, with the message ids it must report failed.
pub(crate) const SQS_EVENTS: [(&str, &[&str]); 1] = [(
    "scheduler-batch-with-poison",
    &["3c9a2e10-6f4b-4d8e-9a1c-0b2d4f6e8a02", "3c9a2e10-6f4b-4d8e-9a1c-0b2d4f6e8a03"],
)];

/// SNS events for the feedback function (Amazon SES notifications, and one message that is
/// not), in the order they run against one store, each with what the feedback handler reports
/// for it and the status change it makes to the created prospect when that is `new` (`None`:
/// it changes nothing). Every one is handled: none fails its invocation.
pub(crate) type SnsExpectation = (&'static str, &'static [FeedbackOutcome], Option<(ProspectStatus, StatusReason)>);
pub(crate) const SNS_EVENTS: [SnsExpectation; 6] = [
    // Recorded against the step's send record, if it has a `sent` one (it has none here).
    ("feedback-delivery", &[FeedbackOutcome::Recorded], None),
    ("feedback-send-ignored", &[], None),
    // What SES publishes when the event destination is created: skipped.
    ("feedback-not-an-ses-notification", &[], None),
    // The first transient bounce of the address: counted, nothing set.
    ("feedback-transient-bounce", &[FeedbackOutcome::Applied(None)], None),
    (
        "feedback-permanent-bounce",
        &[FeedbackOutcome::Applied(Some(ProspectStatus::Bounced))],
        Some((ProspectStatus::Bounced, StatusReason::Bounce)),
    ),
    (
        "feedback-complaint",
        &[FeedbackOutcome::Applied(Some(ProspectStatus::Unsubscribed))],
        Some((ProspectStatus::Unsubscribed, StatusReason::Complaint)),
    ),
];

/// The prospect id `get-prospect-by-id` (and `delete-prospect-by-id`) carries in its path, and
/// the SNS events in their `cadenhq-prospect` tag. The prospect it reads (and erases) is the one
/// `post-prospect-created` creates, whose id is only known once created: the tests put that id
/// in this one's place (see [`with_created_prospect`]).
pub(crate) const CREATED_PROSPECT_ID: &str = "7a0e2c4f-3b1d-4e5a-9c8b-6d2f1e0a3b4c";

/// The account id the SNS events carry in their `cadenhq-account` tag (and `Message-ID`): the
/// created prospect's account, in its place (see [`with_created_references`]).
pub(crate) const CREATED_ACCOUNT_ID: &str = "2d6b1f0e-8a4c-4e3b-9f7d-5c1a0b9e8d7f";

/// The enrollment id the SNS events carry in their `cadenhq-enrollment` tag (and
/// `Message-ID`): the created prospect's first enrollment, in its place (step 0 is sent first).
pub(crate) const CREATED_ENROLLMENT_ID: &str = "e4c3b2a1-0f9e-4d8c-b7a6-958473625140";

/// The text of an event with `id` in place of [`CREATED_PROSPECT_ID`].
pub(crate) fn with_created_prospect(raw: &str, id: ProspectId) -> String {
    raw.replace(CREATED_PROSPECT_ID, &id.to_string())
}

/// The text of an event with the account, the id and the first enrollment of `prospect` in
/// place of [`CREATED_ACCOUNT_ID`], [`CREATED_PROSPECT_ID`] and [`CREATED_ENROLLMENT_ID`].
pub(crate) fn with_created_references(raw: &str, prospect: &Prospect) -> String {
    let enrollment = prospect.enrollments.first().expect("the created prospect is enrolled in the default campaign").id;
    with_created_prospect(raw, prospect.id)
        .replace(CREATED_ACCOUNT_ID, &prospect.account_id.to_string())
        .replace(CREATED_ENROLLMENT_ID, &enrollment.to_string())
}

/// The send the SNS events name: the created prospect's first step.
pub(crate) fn first_step(prospect: &Prospect) -> SendKey {
    SendKey { enrollment: prospect.enrollments.first().expect("the created prospect is enrolled").id, step: 0 }
}

/// Checks what feedback did to a prospect, `before` and `after`: exactly the status changes
/// `changes` (to, reason) were added to its history, in order, each from the status the one
/// before left; its status is the last one's (or unchanged); its history before is kept.
pub(crate) fn assert_status_changes(what: &str, before: &Prospect, after: &Prospect, changes: &[(ProspectStatus, StatusReason)]) {
    let kept = after.history.len() >= before.history.len() && after.history[..before.history.len()] == before.history[..];
    assert!(kept, "{what}: the history before is kept: {:?}", after.history);
    let added: Vec<_> = after.history[before.history.len()..].iter().map(|c| (c.from, c.to, c.reason)).collect();
    let mut status = before.status;
    let expected: Vec<_> = changes
        .iter()
        .map(|&(to, reason)| {
            let change = (status, to, reason);
            status = to;
            change
        })
        .collect();
    assert_eq!(added, expected, "{what}: the status changes made");
    assert_eq!(after.status, status, "{what}: the status left");
}

/// The prospect `post-prospect-created` created (by its external_id, which the other events
/// name too), as `repo` holds it now.
pub(crate) async fn created_prospect(repo: &dyn ProspectRepository, account: AccountId) -> Prospect {
    let raw = std::fs::read_to_string(events_dir().join("post-prospect-created.json")).unwrap();
    let event: Value = serde_json::from_str(&raw).unwrap();
    let body: Value = serde_json::from_str(event["body"].as_str().expect("a JSON body")).unwrap();
    let external_id = ExternalId::parse(body["external_id"].as_str().expect("the event's external_id")).unwrap();
    repo.find(account, &ProspectRef::ExternalId(external_id)).await.unwrap().expect("post-prospect-created created its prospect")
}

/// Whether the event is one of the read function's (a GET of a prospect, its export or a page).
pub(crate) fn is_read(name: &str) -> bool {
    name.starts_with("get-") || name.starts_with("list-")
}

/// Whether the event is one of the webhooks function's (a POST to a webhook endpoint).
pub(crate) fn is_webhook(name: &str) -> bool {
    name.starts_with("webhooks-")
}

/// The SNS topic the webhooks function is configured with in the tests (the
/// `CADENHQ_SNS_TOPIC_ARNS` it gets); no test event is signed for it.
pub(crate) const WEBHOOKS_SNS_TOPIC: &str = "arn:aws:sns:us-east-1:123456789012:cadenhq-ses-elsewhere";

/// Checks the JSON body a webhook event got (each is a 400): for an unknown endpoint, the one
/// answer a bad signature gets too (so a URL cannot be probed); for a body that is not the
/// provider's, an error saying so.
pub(crate) fn assert_webhook_body(name: &str, status: u16, body: &Value) {
    assert_eq!(status, 400, "{name}: no webhook event expects {status}");
    if name.ends_with("-unknown-endpoint") {
        assert_eq!(*body, serde_json::json!({ "error": "Invalid signature, or no such endpoint" }), "{name}");
    } else {
        assert!(body["error"].as_str().is_some_and(|e| e.starts_with("Not an event of this provider")), "{name}: {body}");
    }
}

/// Whether the event is one of the erase function's (a DELETE of a prospect).
pub(crate) fn is_erase(name: &str) -> bool {
    name.starts_with("delete-")
}

/// Checks the JSON body an erase event got: for a 200, the erasure of `prospect`; for a 404,
/// the prospect not found; for a 401, the missing or invalid key.
pub(crate) fn assert_erase_body(name: &str, status: u16, body: &Value, prospect: &Prospect) {
    match status {
        200 => assert_eq!(*body, serde_json::json!({ "erased": true, "prospect_id": prospect.id.to_string() }), "{name}"),
        404 => assert_eq!(*body, serde_json::json!({ "error": "Prospect not found" }), "{name}"),
        401 => assert_eq!(*body, serde_json::json!({ "error": UNAUTHORIZED_MESSAGE }), "{name}"),
        other => panic!("{name}: no DELETE event expects {other}"),
    }
}

/// Checks the JSON body a read event got: for a 200, the resource of `prospect` (the export's
/// `prospect`, or the page's item of that id); for a 404, the prospect not found; for a 401,
/// the missing or invalid key; for a 400, an error.
pub(crate) fn assert_read_body(name: &str, status: u16, body: &Value, prospect: &Prospect) {
    if status == 200 && name.starts_with("list-") {
        let data = body["data"].as_array().unwrap_or_else(|| panic!("{name}: data: {body}"));
        let item = data.iter().find(|p| p["id"] == prospect.id.to_string()).unwrap_or_else(|| panic!("{name}: the prospect is listed: {body}"));
        return assert_read_body("get-", status, item, prospect);
    }
    if status == 200 && name.ends_with("-export") {
        assert!(body["emails"].is_array() && body["status_changes"].is_array(), "{name}: {body}");
        return assert_read_body("get-", status, &body["prospect"], prospect);
    }
    match status {
        400 => assert!(body["error"].is_string(), "{name}: {body}"),
        200 => {
            assert_eq!(body["id"], prospect.id.to_string(), "{name}: {body}");
            assert_eq!(body["email"], prospect.email.original(), "{name}: {body}");
            assert_eq!(body["status"], prospect.status.as_str(), "{name}: {body}");
            assert_eq!(body["external_id"].as_str(), prospect.external_id.as_ref().map(|e| e.as_str()), "{name}: {body}");
            assert_eq!(body["metadata"], Value::Object(prospect.metadata.clone()), "{name}: {body}");
            for field in ["status_changed_at", "status_reason", "created_at", "updated_at"] {
                assert!(body[field].is_string(), "{name}: {field}: {body}");
            }
            let enrollments = body["enrollments"].as_array().unwrap_or_else(|| panic!("{name}: enrollments: {body}"));
            let campaigns: Vec<String> = prospect.enrollments.iter().map(|e| e.campaign_id.to_string()).collect();
            assert_eq!(enrollments.iter().map(|e| e["campaign_id"].as_str().unwrap_or_default()).collect::<Vec<_>>(), campaigns, "{name}: {body}");
        }
        404 => assert_eq!(*body, serde_json::json!({ "error": "Prospect not found" }), "{name}"),
        401 => assert_eq!(*body, serde_json::json!({ "error": UNAUTHORIZED_MESSAGE }), "{name}"),
        other => panic!("{name}: no GET event expects {other}"),
    }
}

fn events_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../events"))
}

#[test]
fn every_event_file_has_an_expected_outcome() {
    let mut files: Vec<String> = std::fs::read_dir(events_dir())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".json").map(str::to_owned))
        .collect();
    files.sort();
    let mut listed: Vec<String> = EXPECTED
        .iter()
        .map(|(name, _)| (*name).to_owned())
        .chain(SQS_EVENTS.iter().map(|(name, _)| (*name).to_owned()))
        .chain(SNS_EVENTS.iter().map(|(name, ..)| (*name).to_owned()))
        .collect();
    listed.sort();
    assert_eq!(files, listed);
}

#[test]
fn the_delete_events_run_after_every_other_event_about_a_prospect() {
    let about_a_prospect = |name: &str| !name.starts_with("unsubscribe-");
    let first_erase = EXPECTED.iter().position(|(name, _)| is_erase(name)).expect("DELETE events");
    let last_other = EXPECTED.iter().rposition(|(name, _)| about_a_prospect(name) && !is_erase(name)).expect("other events");
    assert!(last_other < first_erase, "{} runs after {}, which erases the prospect", EXPECTED[last_other].0, EXPECTED[first_erase].0);
}

/// An embedded store in `dir` with what the events name: an account, the events' key and a
/// default campaign.
async fn events_backend(dir: &std::path::Path) -> (SqliteStore, Backend, shared::domain::Account) {
    let store = SqliteStore::open(dir).unwrap();
    let backend = Backend::from_embedded(&store);
    let account = admin::create_account(backend.admin.as_ref(), "Events", &SystemClock).await.unwrap();
    let key = ApiKey::from_raw(EVENTS_KEY);
    backend.admin.create_key(&ApiKeyRecord::new(&key, account.id, None, time::OffsetDateTime::now_utc())).await.unwrap();
    let campaign = CampaignDefinition::parse(crate::helpers::CAMPAIGN_FILE).unwrap();
    admin::create_campaign(backend.admin.as_ref(), account.id, campaign, true, &SystemClock).await.unwrap();
    (store, backend, account)
}

#[tokio::test]
async fn api_gateway_events_get_their_documented_status_from_the_lambda_handlers() {
    let dir = tempfile::tempdir().unwrap();
    let (store, backend, account) = events_backend(dir.path()).await;
    let service = backend.service(Arc::new(SystemClock)).with_unsubscribe_secret(test_secret());
    let post_function = router(service.clone(), Routes::Upsert);
    let patch_function = router(service.clone(), Routes::Status);
    let read_function = router(service.clone(), Routes::Read);
    let erase_function = router(service.clone(), Routes::Erase);
    let unsubscribe_function = router(service, Routes::Unsubscribe);
    let sns = SnsVerifier::new(vec![WEBHOOKS_SNS_TOPIC.to_owned()], Arc::new(ReqwestGet::new().unwrap()));
    let webhooks_function = webhooks_router(backend.webhook_service(Arc::new(SystemClock), sns));

    // The prospect the DELETE events erase, as the events before them left it.
    let mut erased: Option<Prospect> = None;
    for (name, expected) in EXPECTED {
        let mut raw = std::fs::read_to_string(events_dir().join(format!("{name}.json"))).unwrap();
        // The GET events run after the POST and PATCH ones: they read the prospect as those left it.
        let read = if is_read(name) { Some(created_prospect(backend.repo.as_ref(), account.id).await) } else { None };
        if is_erase(name) && erased.is_none() {
            erased = Some(created_prospect(backend.repo.as_ref(), account.id).await);
        }
        let erase = if is_erase(name) { erased.as_ref() } else { None };
        if let Some(prospect) = read.as_ref().or(erase) {
            raw = with_created_prospect(&raw, prospect.id);
        }
        let request = lambda_http::request::from_str(&raw).unwrap_or_else(|e| panic!("{name}: {e}"));
        let function = if request.uri().path().starts_with("/unsubscribe/") {
            &unsubscribe_function
        } else if request.uri().path().starts_with("/webhooks/") {
            &webhooks_function
        } else if request.method() == "POST" {
            &post_function
        } else if request.method() == "GET" {
            &read_function
        } else if request.method() == "DELETE" {
            &erase_function
        } else {
            &patch_function
        };

        let response = function.clone().oneshot(request).await.unwrap();

        assert_eq!(response.status().as_u16(), expected, "{name}");
        let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        if content_type.starts_with("text/html") {
            assert!(name.starts_with("unsubscribe-page"), "{name}: only the unsubscribe page is HTML");
            continue;
        }
        assert_eq!(content_type, "application/json", "{name}");
        let body: Value = serde_json::from_slice(&bytes).unwrap();
        if let Some(prospect) = &read {
            assert_read_body(name, expected, &body, prospect);
            continue;
        }
        if let Some(prospect) = erase {
            assert_erase_body(name, expected, &body, prospect);
            continue;
        }
        if is_webhook(name) {
            assert_webhook_body(name, expected, &body);
            continue;
        }
        match expected {
            200 | 201 => assert_eq!(body["accepted"], true, "{name}: {body}"),
            422 => assert!(body["errors"].is_array(), "{name}: {body}"),
            _ => assert!(body["error"].is_string(), "{name}: {body}"),
        }
    }
    let prospect = erased.expect("the DELETE events ran");
    assert_erased(backend.repo.as_ref(), account.id, &prospect).await;
    let jobs = store.queued_jobs().await.unwrap();
    assert_eq!(jobs.len(), 1, "one enrollment, one job");
}

/// Checks that `repo` holds `prospect` no more, by id, by external_id or by address.
pub(crate) async fn assert_erased(repo: &dyn ProspectRepository, account: AccountId, prospect: &Prospect) {
    let mut references = vec![ProspectRef::Id(prospect.id), ProspectRef::Email(prospect.email.clone())];
    references.extend(prospect.external_id.clone().map(ProspectRef::ExternalId));
    for reference in references {
        assert_eq!(repo.find(account, &reference).await.unwrap(), None, "{reference:?}: the erased prospect is gone");
    }
}

#[tokio::test]
async fn sqs_events_report_exactly_their_bad_messages_from_the_scheduler_handler() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    let backend = Backend::from_embedded(&store);
    let mailer = Arc::new(RecordingMailer::default());
    let ports = backend.scheduler_ports(mailer.clone(), Arc::new(SystemClock)).unwrap();
    let settings = DeliverySettings { sender: "a@example.com".into(), public_url: "http://x".into(), unsubscribe_secret: test_secret() };
    let scheduler = Scheduler::new(ports, settings);

    for (name, bad_ids) in SQS_EVENTS {
        let raw = std::fs::read_to_string(events_dir().join(format!("{name}.json"))).unwrap();
        let event: SqsEvent = serde_json::from_str(&raw).unwrap_or_else(|e| panic!("{name}: {e}"));

        let response = handle_batch(&scheduler, event).await;

        let failed: Vec<&str> = response.batch_item_failures.iter().map(|f| f.item_identifier.as_str()).collect();
        assert_eq!(failed, bad_ids, "{name}");
        let wire = serde_json::to_value(&response).unwrap();
        assert!(wire["batchItemFailures"].is_array(), "{name}: the Lambda response shape");
    }
    assert!(mailer.sent().is_empty());
}

/// The SES notification an SNS event's record carries, if its message is one (JSON with a
/// `mail` object).
fn ses_notification(record: &Value) -> Option<Value> {
    let notification: Value = serde_json::from_str(record["Sns"]["Message"].as_str()?).ok()?;
    notification["mail"].is_object().then_some(notification)
}

#[test]
fn sns_events_are_lambda_sns_records_whose_ses_notifications_name_the_created_prospect_at_its_address() {
    let created: Value = serde_json::from_str(&std::fs::read_to_string(events_dir().join("post-prospect-created.json")).unwrap()).unwrap();
    let body: Value = serde_json::from_str(created["body"].as_str().unwrap()).unwrap();
    let address = NormalizedEmail::parse(body["email"].as_str().unwrap()).unwrap();
    let mut notifications = 0;
    for (name, ..) in SNS_EVENTS {
        let event: Value = serde_json::from_str(&std::fs::read_to_string(events_dir().join(format!("{name}.json"))).unwrap()).unwrap();
        let records = event["Records"].as_array().unwrap_or_else(|| panic!("{name}: Records"));
        assert!(!records.is_empty(), "{name}");
        for record in records {
            assert_eq!(record["EventSource"], "aws:sns", "{name}");
            // The fields of the record Lambda hands a function subscribed to a topic (the
            // certificate and unsubscribe URLs spelled as there, not as in an HTTPS delivery).
            let sns = record["Sns"].as_object().unwrap_or_else(|| panic!("{name}: Sns"));
            for field in [
                "Type",
                "MessageId",
                "TopicArn",
                "Subject",
                "Message",
                "Timestamp",
                "SignatureVersion",
                "Signature",
                "SigningCertUrl",
                "UnsubscribeUrl",
                "MessageAttributes",
            ] {
                assert!(sns.contains_key(field), "{name}: Sns.{field}");
            }
            assert_eq!(sns["Type"], "Notification", "{name}");
            let Some(notification) = ses_notification(record) else { continue };
            notifications += 1;
            let mail = &notification["mail"];
            let tags = &mail["tags"];
            for (tag, value) in [
                ("cadenhq-account", CREATED_ACCOUNT_ID),
                ("cadenhq-prospect", CREATED_PROSPECT_ID),
                ("cadenhq-enrollment", CREATED_ENROLLMENT_ID),
                ("cadenhq-step", "0"),
            ] {
                assert_eq!(tags[tag], serde_json::json!([value]), "{name}: mail.tags.{tag}");
            }
            let mut recipients: Vec<&Value> = mail["destination"].as_array().into_iter().flatten().collect();
            let parts = [
                ("bounce", "bouncedRecipients", Some("emailAddress")),
                ("complaint", "complainedRecipients", Some("emailAddress")),
                ("delivery", "recipients", None),
            ];
            for (part, list, field) in parts {
                for recipient in notification[part][list].as_array().into_iter().flatten() {
                    recipients.push(field.map_or(recipient, |f| &recipient[f]));
                }
            }
            assert!(!recipients.is_empty(), "{name}: a recipient");
            for recipient in recipients {
                let parsed = NormalizedEmail::parse(recipient.as_str().unwrap_or_default());
                let recipient = parsed.unwrap_or_else(|e| panic!("{name}: {recipient}: {e:?}"));
                assert_eq!(recipient.as_str(), address.as_str(), "{name}: the created prospect's address");
            }
        }
    }
    assert_eq!(notifications, SNS_EVENTS.len() - 1, "every SNS event but one carries an SES notification");
}

#[tokio::test]
async fn sns_events_apply_their_feedback_to_the_prospect_they_name_through_the_feedback_handler() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, backend, account) = events_backend(dir.path()).await;
    let raw = std::fs::read_to_string(events_dir().join("post-prospect-created.json")).unwrap();
    let post_function = router(backend.service(Arc::new(SystemClock)), Routes::Upsert);
    let response = post_function.oneshot(lambda_http::request::from_str(&raw).unwrap()).await.unwrap();
    assert_eq!(response.status(), 201);
    let prospect = created_prospect(backend.repo.as_ref(), account.id).await;
    let feedback = backend.feedback_service(Arc::new(SystemClock));

    for (name, outcomes, change) in SNS_EVENTS {
        // Each from a `new` prospect: what the one event does, whatever ran before it.
        let now = time::OffsetDateTime::now_utc();
        backend.repo.set_status(account.id, &ProspectRef::Id(prospect.id), ProspectStatus::New, StatusReason::Api, now).await.unwrap();
        let before = created_prospect(backend.repo.as_ref(), account.id).await;
        let raw = std::fs::read_to_string(events_dir().join(format!("{name}.json"))).unwrap();
        let event: SnsEvent = serde_json::from_str(&with_created_references(&raw, &prospect)).unwrap_or_else(|e| panic!("{name}: {e}"));

        let applied = handle_feedback(&feedback, event).await.unwrap_or_else(|e| panic!("{name}: {e}"));

        assert_eq!(applied, outcomes, "{name}");
        let after = created_prospect(backend.repo.as_ref(), account.id).await;
        assert_status_changes(name, &before, &after, change.as_slice());
        assert_eq!(backend.sends.send_record(first_step(&prospect)).await.unwrap(), None, "{name}: no send record is made");
    }
}
