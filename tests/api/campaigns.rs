//! The campaign engine, on both backends: each step's email at its (injected) time, exactly
//! once, never after the prospect left; poison messages; unsubscribe links.

use reqwest::Method;
use serde_json::json;
use shared::admin;
use shared::domain::{
    Campaign, CampaignDefinition, CampaignJob, Clock, EnrollmentId, NormalizedEmail, ProspectId, ProspectStatus, SendingChange,
    SystemClock,
};
use shared::scheduler::{Outcome, CLAIM_LEASE, ORPHAN_GRACE};
use time::Duration;

use crate::contract_tests;
use crate::helpers::{by_email, Kind, MailFault, TestApp, CAMPAIGN_FILE};

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
    a_patch_between_the_read_and_the_claim_stops_the_email,
    a_claim_whose_answer_was_lost_sends_its_step_once,
    a_worker_that_stopped_after_claiming_leaves_the_step_unknown_not_resent,
    a_send_whose_record_was_lost_is_not_sent_again,
    a_failed_retry_record_still_retries_the_step_once,
    a_failed_bounce_write_is_completed_by_the_redelivery,
    an_unknown_provider_answer_is_recorded_and_never_resent,
    a_step_that_cannot_be_rendered_is_recorded_as_skipped,
    a_step_the_provider_never_takes_is_skipped_after_eight_attempts,
    pausing_holds_every_step_and_resuming_shifts_the_rest,
    deactivating_a_campaign_ends_its_enrollments,
    a_three_day_step_is_requeued_as_often_as_the_queue_needs,
);

/// Moves the clock past the claim lease and the queue's redelivery delay, then ticks.
async fn redeliver(app: &crate::helpers::TestApp) {
    app.clock.advance(Duration::minutes(3));
    assert!(Duration::minutes(3) > CLAIM_LEASE);
    app.tick(1).await;
}

/// Delivers the remaining two steps at their due times.
async fn deliver_the_rest(app: &crate::helpers::TestApp) {
    app.clock.advance(STEP_2);
    app.tick(1).await;
    app.clock.advance(STEP_3);
    app.tick(1).await;
}

async fn a_patch_between_the_read_and_the_claim_stops_the_email(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    app.post(&json!({"email": "pat@example.com", "external_id": "pat"})).await;
    let (http, url, key) = (app.http.clone(), format!("{}/api/v1/prospects/external/pat", app.base), app.key.clone());
    app.sends.before_next_claim(Box::pin(async move {
        let response = http.patch(url).header("x-cadenhq-key", key).body(r#"{"status":"converted"}"#).send().await.unwrap();
        assert_eq!(response.status(), 200, "the PATCH is acknowledged before the claim");
    }));

    app.tick(1).await;
    deliver_the_rest(&app).await;

    assert!(app.mailer.sent().is_empty(), "no email after the PATCH was acknowledged");
    assert_eq!(app.send_states("pat@example.com", 3).await, ["-", "-", "-"], "nothing was claimed");
    assert!(app.queued_jobs().await.is_empty());
}

async fn a_claim_whose_answer_was_lost_sends_its_step_once(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    app.post(&json!({"email": "lou@example.com"})).await;
    app.sends.lose_next_claim_answer();

    app.tick(1).await;
    deliver_the_rest(&app).await;

    assert_eq!(app.mailer.subjects(), ["Hi ", "Tips", "Last call"], "every step once");
    assert_eq!(app.send_states("lou@example.com", 3).await, ["sent", "sent", "sent"]);
}

async fn a_worker_that_stopped_after_claiming_leaves_the_step_unknown_not_resent(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    app.post(&json!({"email": "cal@example.com"})).await;
    app.sends.crash_after_next_claim();

    app.tick(1).await;
    assert!(app.mailer.sent().is_empty());
    assert_eq!(app.send_states("cal@example.com", 1).await, ["claimed"]);
    redeliver(&app).await;
    deliver_the_rest(&app).await;

    assert_eq!(app.mailer.subjects(), ["Tips", "Last call"], "the first step is not guessed at");
    let first = app.send_record("cal@example.com", 0).await.unwrap();
    assert_eq!(first.state.name(), "unknown");
    assert!(first.state.detail().unwrap().contains("stopped"), "{first:?}");
    assert_eq!(app.send_states("cal@example.com", 3).await, ["unknown", "sent", "sent"]);
}

async fn a_send_whose_record_was_lost_is_not_sent_again(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    app.post(&json!({"email": "sam@example.com"})).await;
    app.sends.fail_next_records(1);

    app.tick(1).await;
    redeliver(&app).await;
    redeliver(&app).await;
    deliver_the_rest(&app).await;

    assert_eq!(app.mailer.subjects(), ["Hi ", "Tips", "Last call"], "sent once, never again");
    assert_eq!(app.send_states("sam@example.com", 3).await, ["unknown", "sent", "sent"]);
}

async fn a_failed_retry_record_still_retries_the_step_once(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    app.post(&json!({"email": "rae@example.com"})).await;
    app.mailer.fail_next(MailFault::NotAccepted);
    app.sends.fail_next_records(1);

    app.tick(1).await;
    assert!(app.mailer.sent().is_empty());
    app.clock.advance(Duration::seconds(60));
    app.tick(1).await;
    redeliver(&app).await;
    deliver_the_rest(&app).await;

    assert_eq!(app.mailer.subjects(), ["Hi ", "Tips", "Last call"], "retried once after the backoff");
    let first = app.send_record("rae@example.com", 0).await.unwrap();
    assert_eq!((first.state.name(), first.attempts), ("sent", 2));
}

async fn a_failed_bounce_write_is_completed_by_the_redelivery(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    app.post(&json!({"email": "bea@example.com"})).await;
    app.mailer.fail_next(MailFault::Reject);
    app.repo.fail_next_status_writes(1);

    app.tick(1).await;
    assert_eq!(app.prospect(by_email("bea@example.com")).await.unwrap().status, ProspectStatus::New, "the bounce write failed");
    redeliver(&app).await;
    deliver_the_rest(&app).await;

    assert_eq!(app.prospect(by_email("bea@example.com")).await.unwrap().status, ProspectStatus::Bounced);
    assert!(app.mailer.sent().is_empty(), "nothing goes to a rejected address");
    assert_eq!(app.send_states("bea@example.com", 3).await, ["rejected", "-", "-"]);
}

async fn an_unknown_provider_answer_is_recorded_and_never_resent(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    app.post(&json!({"email": "una@example.com"})).await;
    app.mailer.fail_next(MailFault::TookItButTimedOut);

    app.tick(1).await;
    redeliver(&app).await;
    deliver_the_rest(&app).await;

    assert_eq!(app.mailer.subjects(), ["Hi ", "Tips", "Last call"], "the provider took the first once; it is not resent");
    assert_eq!(app.send_states("una@example.com", 3).await, ["unknown", "sent", "sent"]);
    let tally = app.backend.sends.tally(app.campaign.id).await.unwrap();
    let counted = |step| tally.of_step(step).filter(|(_, n)| *n > 0).collect::<Vec<_>>();
    assert_eq!((counted(0), counted(1), counted(2)), (vec![("unknown", 1)], vec![("sent", 1)], vec![("sent", 1)]), "counted per campaign and step");
}

async fn a_step_that_cannot_be_rendered_is_recorded_as_skipped(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    // Stored as an earlier version may have kept it: a template that fails on some data only.
    let mut campaign = Campaign::new(app.account, CampaignDefinition::parse(CAMPAIGN_FILE).unwrap(), app.clock.now());
    campaign.steps[0].subject = "Offer {{ metadata.n + 1 }}".into();
    app.backend.admin.create_campaign(&campaign, false).await.unwrap();
    app.post(&json!({"email": "sid@example.com", "campaign_id": campaign.id, "metadata": {"n": "x"}})).await;

    app.tick(1).await;
    deliver_the_rest(&app).await;

    assert_eq!(app.mailer.subjects(), ["Tips", "Last call"]);
    let first = app.send_record("sid@example.com", 0).await.unwrap();
    assert_eq!(first.state.name(), "skipped");
    assert!(first.state.detail().unwrap().contains("render"), "{first:?}");
}

async fn a_step_the_provider_never_takes_is_skipped_after_eight_attempts(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    app.post(&json!({"email": "ned@example.com"})).await;
    for _ in 0..shared::scheduler::MAX_SEND_ATTEMPTS {
        app.mailer.fail_next(MailFault::NotAccepted);
    }

    app.tick(1).await;
    for attempt in 0..shared::scheduler::MAX_SEND_ATTEMPTS - 1 {
        assert_eq!(app.send_states("ned@example.com", 1).await, ["retry_scheduled"], "after attempt {attempt}");
        app.clock.advance(shared::scheduler::FIRST_BACKOFF * 2_i32.pow(attempt));
        app.tick(1).await;
    }
    let first = app.send_record("ned@example.com", 0).await.unwrap();
    assert_eq!((first.state.name(), first.attempts), ("skipped", 8));
    assert!(first.state.detail().unwrap().contains("8 attempts"), "{first:?}");
    deliver_the_rest(&app).await;

    assert_eq!(app.mailer.subjects(), ["Tips", "Last call"], "the enrollment goes on");
}

async fn pausing_holds_every_step_and_resuming_shifts_the_rest(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let store = app.backend.admin.as_ref();
    let (id, clock) = (app.campaign.id, app.clock.as_ref());
    app.post(&json!({"email": "pia@example.com"})).await;
    app.tick(1).await;
    assert_eq!(app.mailer.sent().len(), 1);

    // Paused one minute after the first step for three minutes: the second step, due at ten
    // minutes, had nine minutes left, so it is due at thirteen.
    app.clock.advance(Duration::minutes(1));
    admin::change_campaign_sending(store, id, SendingChange::Pause, clock).await.unwrap();
    app.clock.advance(Duration::minutes(3));
    admin::change_campaign_sending(store, id, SendingChange::Resume, clock).await.unwrap();
    app.clock.advance(Duration::minutes(9) - Duration::seconds(1));
    app.tick(1).await;
    assert_eq!(app.mailer.sent().len(), 1, "not before the time it had left after the resume");
    app.clock.advance(Duration::seconds(1));
    app.tick(1).await;
    assert_eq!(app.mailer.subjects(), ["Hi ", "Tips"]);

    // Paused again just as the last step is due: nothing is sent until the resume, and then at
    // once (it had no time left), within the 15 minutes after which a paused job looks again.
    app.clock.advance(STEP_3);
    admin::change_campaign_sending(store, id, SendingChange::Pause, clock).await.unwrap();
    app.clock.advance(Duration::minutes(20));
    app.tick(1).await;
    assert_eq!(app.mailer.sent().len(), 2, "nothing is sent while paused");
    admin::change_campaign_sending(store, id, SendingChange::Resume, clock).await.unwrap();
    app.clock.advance(shared::scheduler::PAUSED_RECHECK);
    app.tick(1).await;

    assert_eq!(app.mailer.subjects(), ["Hi ", "Tips", "Last call"], "a paused job looks again within 15 minutes");
    let err = admin::change_campaign_sending(store, id, SendingChange::Resume, &SystemClock).await.unwrap_err();
    assert!(err.to_string().contains("not paused"), "{err}");
}

async fn deactivating_a_campaign_ends_its_enrollments(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    app.post(&json!({"email": "dee@example.com"})).await;
    app.tick(1).await;

    admin::change_campaign_sending(app.backend.admin.as_ref(), app.campaign.id, SendingChange::Deactivate, &SystemClock).await.unwrap();
    deliver_the_rest(&app).await;

    assert_eq!(app.mailer.subjects(), ["Hi "]);
    assert!(app.queued_jobs().await.is_empty(), "the enrollment's job was dropped");
    let (status, body) = app.post(&json!({"email": "new@example.com", "campaign_id": app.campaign.id})).await;
    assert_eq!(status, 422, "{body}");
}

async fn a_three_day_step_is_requeued_as_often_as_the_queue_needs(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    app.post(&json!({"email": "tim@example.com"})).await;
    app.tick(1).await;
    app.clock.advance(STEP_2);
    app.tick(1).await;
    assert_eq!(app.mailer.sent().len(), 2);

    let quarter_hours = STEP_3.whole_minutes() / 15;
    for _ in 0..quarter_hours {
        app.clock.advance(Duration::minutes(15));
        app.tick(1).await;
    }

    assert_eq!(app.mailer.subjects(), ["Hi ", "Tips", "Last call"], "the last step exactly three days later");
    // SQS holds a message at most 15 minutes: the job comes back every quarter hour, is
    // re-queued unread each time, and is sent on its 288th delivery. The embedded queue holds
    // it until it is due.
    let expected = if kind == Kind::Aws { 288 } else { 1 };
    assert_eq!(app.deliveries_of(2), expected);
}

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

    app.mailer.fail_next(MailFault::NotAccepted);
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
        retry_of: None,
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
    assert_eq!(app.scheduler.process(&first).await.unwrap(), Outcome::Dropped("step already handled; next step ensured"));
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
