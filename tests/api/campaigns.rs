//! The campaign engine, on both backends: each step's email at its (injected) time, exactly
//! once, never after the prospect left; poison messages; unsubscribe links.

use reqwest::Method;
use serde_json::json;
use shared::domain::{CampaignJob, Clock, EnrollmentId, NormalizedEmail, ProspectId, ProspectStatus};
use shared::scheduler::{Outcome, CLAIM_LEASE, ORPHAN_GRACE};
use time::Duration;

use crate::contract_tests;
use crate::helpers::{by_email, Kind, MailFault, TestApp};

/// The default campaign's delays (see `CAMPAIGN_FILE`): 0, 10 minutes, 3 days.
const STEP_2: Duration = Duration::minutes(10);
const STEP_3: Duration = Duration::days(3);

contract_tests!(
    a_three_step_campaign_sends_each_email_at_its_due_time,
    converting_between_steps_stops_the_remaining_steps,
    redelivered_jobs_send_each_step_exactly_once,
    a_poison_message_does_not_block_the_others,
    the_unsubscribe_link_stops_the_campaign,
    transient_failures_are_retried_and_rejections_mark_the_prospect_bounced,
    a_job_whose_enrollment_never_appeared_is_dropped,
    a_next_step_lost_after_sending_is_published_by_the_redelivery,
);

async fn a_three_step_campaign_sends_each_email_at_its_due_time(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    app.post(&json!({"email": "ada@example.com", "first_name": "Ada"})).await;

    app.tick(1).await;
    let sent = app.mailer.sent();
    assert_eq!(sent.len(), 1, "step 1 at enrollment");
    assert_eq!(sent[0].subject, "Hi Ada");
    assert_eq!(sent[0].to, "ada@example.com");
    assert!(sent[0].unsubscribe_url.contains("/unsubscribe/"));

    app.clock.advance(STEP_2 - Duration::seconds(1));
    app.tick(1).await;
    assert_eq!(app.mailer.sent().len(), 1, "step 2 not before its delay");
    app.clock.advance(Duration::seconds(1));
    app.tick(1).await;
    assert_eq!(app.mailer.sent().len(), 2, "step 2 ten minutes after step 1");
    assert_eq!(app.mailer.sent()[1].subject, "Tips");

    app.clock.advance(STEP_3 - Duration::seconds(1));
    app.tick(1).await;
    assert_eq!(app.mailer.sent().len(), 2, "step 3 not before its delay");
    app.clock.advance(Duration::seconds(1));
    app.tick(1).await;
    assert_eq!(app.mailer.sent().len(), 3, "step 3 three days after step 2");

    app.clock.advance(Duration::days(30));
    app.tick(1).await;
    assert_eq!(app.mailer.sent().len(), 3);
    let stored = app.prospect(by_email("ada@example.com")).await.unwrap();
    assert!(app.backend.completions(&stored).await.unwrap()[0].is_some(), "enrollment completed after the last step");
    assert!(app.queued_jobs().await.is_empty());
}

async fn converting_between_steps_stops_the_remaining_steps(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    app.post(&json!({"email": "bo@example.com", "external_id": "bo"})).await;
    app.tick(1).await;
    assert_eq!(app.mailer.sent().len(), 1);

    assert_eq!(app.patch("external/bo", &json!({"status": "converted"})).await.0, 200);
    app.clock.advance(Duration::days(10));
    app.tick(1).await;

    assert_eq!(app.mailer.sent().len(), 1, "nothing after converting");
    assert!(app.queued_jobs().await.is_empty(), "the queued step was dropped");
}

async fn redelivered_jobs_send_each_step_exactly_once(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    app.post(&json!({"email": "cy@example.com"})).await;
    app.clock.advance(Duration::days(4));

    for _ in 0..4 {
        app.tick(3).await;
    }

    let subjects: Vec<String> = app.mailer.sent().into_iter().map(|e| e.subject).collect();
    assert_eq!(subjects, vec!["Hi ", "Tips", "Last call"], "one email per step");
}

async fn a_poison_message_does_not_block_the_others(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    app.enqueue_raw("this is not json").await;
    app.enqueue_raw(r#"{"kind":"something else"}"#).await;
    app.post(&json!({"email": "di@example.com"})).await;

    let failed = app.tick(1).await;

    assert_eq!(failed, 2, "each bad message reported on its own");
    assert_eq!(app.mailer.sent().len(), 1, "the good job was handled");
}

async fn the_unsubscribe_link_stops_the_campaign(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    app.post(&json!({"email": "ed@example.com"})).await;
    app.tick(1).await;
    let url = app.mailer.sent()[0].unsubscribe_url.clone();
    let path = url.strip_prefix(&app.base).expect("link points at this server").to_owned();
    let http = reqwest::Client::new();

    let page = http.get(&url).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    assert!(page.text().await.unwrap().contains("method=\"post\""));
    let mut tampered = path.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == '0' { '1' } else { '0' });
    let (status, _) = app.send(Method::POST, &tampered, None, String::new()).await;
    assert_eq!(status, 400, "a tampered token is refused");
    let (status, body) = app.send(Method::POST, "/unsubscribe/%FF%FE", None, String::new()).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("Invalid unsubscribe link")), "an undecodable one too, as JSON");
    assert_eq!(app.prospect(by_email("ed@example.com")).await.unwrap().status, ProspectStatus::New);

    let (status, body) = app.send(Method::POST, &path, None, "List-Unsubscribe=One-Click".into()).await;
    assert_eq!((status, body["unsubscribed"].as_bool()), (200, Some(true)));
    let (status, _) = app.send(Method::POST, &path, None, "List-Unsubscribe=One-Click".into()).await;
    assert_eq!(status, 200, "idempotent");

    let stored = app.prospect(by_email("ed@example.com")).await.unwrap();
    assert_eq!(stored.status, ProspectStatus::Unsubscribed);
    app.clock.advance(Duration::days(10));
    app.tick(1).await;
    assert_eq!(app.mailer.sent().len(), 1, "nothing after unsubscribing");
}

async fn transient_failures_are_retried_and_rejections_mark_the_prospect_bounced(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    app.post(&json!({"email": "flo@example.com"})).await;

    app.mailer.fail_next(MailFault::Transient);
    app.tick(1).await;
    assert_eq!(app.mailer.sent().len(), 0, "provider down");
    app.clock.advance(Duration::seconds(30));
    app.tick(1).await;
    assert_eq!(app.mailer.sent().len(), 0, "backoff not over yet");
    app.clock.advance(Duration::seconds(30));
    app.tick(1).await;
    assert_eq!(app.mailer.sent().len(), 1, "retried after the backoff");

    app.mailer.fail_next(MailFault::Reject);
    app.clock.advance(STEP_2);
    app.tick(1).await;
    let stored = app.prospect(by_email("flo@example.com")).await.unwrap();
    assert_eq!(stored.status, ProspectStatus::Bounced);
    assert!(stored.enrollments.iter().all(|e| !stored.is_active(e)));
    app.clock.advance(STEP_3);
    app.tick(1).await;
    assert_eq!(app.mailer.sent().len(), 1);
}

async fn a_job_whose_enrollment_never_appeared_is_dropped(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let job = CampaignJob {
        account_id: app.account,
        prospect_id: ProspectId::new(),
        email_hash: NormalizedEmail::parse("ghost@example.com").unwrap().key_hash().to_owned(),
        enrollment_id: EnrollmentId::new(),
        campaign_id: app.campaign.id,
        step: 0,
        published_at: app.clock.now(),
        attempt: 0,
        not_before: None,
    };

    let early = app.scheduler.process(&job).await.unwrap();
    app.clock.advance(ORPHAN_GRACE + Duration::seconds(1));
    let late = app.scheduler.process(&job).await.unwrap();

    assert!(matches!(early, Outcome::NotDue(_)), "within the grace period the enrollment may still appear: {early:?}");
    assert_eq!(late, Outcome::Dropped("no such enrollment"));
    assert!(app.mailer.sent().is_empty());
}

async fn a_next_step_lost_after_sending_is_published_by_the_redelivery(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    app.post(&json!({"email": "gil@example.com"})).await;
    let first = app.queued_jobs().await.remove(0);

    // The first step is sent, then the queue refuses its next step: the job fails.
    app.queue.fail_next(1);
    assert!(app.scheduler.process(&first).await.is_err(), "the job fails when its next step is not queued");
    assert_eq!(app.mailer.sent().len(), 1);

    // The queue delivers it again after its visibility timeout (embedded: its lease), longer
    // than the claim's lease: nothing is sent, the next step is published.
    app.clock.advance(Duration::minutes(2));
    assert!(Duration::minutes(2) > CLAIM_LEASE);
    assert_eq!(app.scheduler.process(&first).await.unwrap(), Outcome::Dropped("already sent; next step ensured"));
    app.tick(1).await;
    assert_eq!(app.mailer.sent().len(), 1, "the first step is not sent again");

    app.clock.advance(STEP_2);
    app.tick(1).await;
    app.clock.advance(STEP_3);
    app.tick(1).await;
    app.tick(1).await;
    let subjects: Vec<String> = app.mailer.sent().into_iter().map(|e| e.subject).collect();
    assert_eq!(subjects, vec!["Hi ", "Tips", "Last call"], "every step once");
}
