//! The contract suite: what a client of the API can observe, identical on both backends.

use std::collections::HashSet;

use futures::future::join_all;
use reqwest::Method;
use serde_json::{json, Value};
use shared::domain::{CampaignId, ExternalId, ProspectId, ProspectStatus};
use shared::ports::ProspectRef;

use crate::contract_tests;
use crate::helpers::{by_email, Kind, TestApp};

fn id_of(body: &Value) -> ProspectId {
    ProspectId::parse(body["prospect_id"].as_str().expect("prospect_id")).unwrap()
}

contract_tests!(
    new_prospect_is_created_with_status_new_and_enrolled_in_the_default_campaign,
    existing_prospect_is_updated_field_by_field_without_restarting_its_campaign,
    invalid_bodies_are_refused_with_the_documented_status_and_store_nothing,
    external_id_is_unique_per_account,
    campaign_id_must_name_an_active_campaign_of_the_account,
    post_with_a_new_campaign_enrolls_only_prospects_whose_status_is_new,
    patch_sets_status_by_id_or_external_id_and_ends_every_enrollment,
    patch_refuses_bad_status_and_hides_unknown_or_foreign_prospects,
    keys_are_required_and_scoped_to_their_account,
    concurrent_posts_of_one_new_email_create_exactly_one_prospect_and_enrollment,
    a_failed_queue_publish_loses_no_enrollment_and_a_retry_completes_it,
    unknown_routes_wrong_methods_and_large_bodies_get_json_errors,
);

async fn new_prospect_is_created_with_status_new_and_enrolled_in_the_default_campaign(kind: Kind) {
    let app = TestApp::spawn(kind).await;

    let (status, body) = app.post(&json!({"email": "  Jane.Doe@Example.COM ", "first_name": "Jane", "source": "landing_page"})).await;

    assert_eq!(status, 201);
    assert_eq!(body["accepted"], true);
    assert_eq!(body["created"], true);
    let stored = app.prospect(by_email("jane.doe@example.com")).await.expect("stored");
    assert_eq!(stored.id, id_of(&body));
    assert_eq!(stored.email.original(), "Jane.Doe@Example.COM");
    assert_eq!(stored.status, ProspectStatus::New);
    assert_eq!(stored.fields.get("first_name"), Some("Jane"));
    assert_eq!(stored.enrollments.len(), 1);
    assert_eq!(stored.enrollments[0].campaign_id, app.campaign.id);
    let jobs = app.queued_jobs().await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].enrollment_id, stored.enrollments[0].id);
    assert_eq!(jobs[0].prospect_id, stored.id);
    assert_eq!(jobs[0].step, 0);
}

async fn existing_prospect_is_updated_field_by_field_without_restarting_its_campaign(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let (_, created) = app
        .post(&json!({"email": "sam@example.com", "first_name": "Sam", "city": "Oslo", "zip": "0150",
                      "metadata": {"plan": "free", "ui": {"theme": "dark", "lang": "en"}}}))
        .await;

    let (status, body) = app
        .post(&json!({"email": "SAM@example.com", "city": "Bergen", "zip": null,
                      "metadata": {"plan": null, "ui": {"lang": "nb"}, "seats": 3}}))
        .await;

    assert_eq!(status, 200);
    assert_eq!(body, json!({"accepted": true, "prospect_id": created["prospect_id"], "created": false}));
    let stored = app.prospect(by_email("sam@example.com")).await.unwrap();
    assert_eq!(stored.fields.get("first_name"), Some("Sam"), "absent field unchanged");
    assert_eq!(stored.fields.get("city"), Some("Bergen"), "value replaced");
    assert_eq!(stored.fields.get("zip"), None, "null clears");
    assert_eq!(Value::Object(stored.metadata), json!({"ui": {"theme": "dark", "lang": "nb"}, "seats": 3}));
    assert_eq!(stored.enrollments.len(), 1, "campaign not restarted");
    assert_eq!(app.queued_jobs().await.len(), 1, "no second job");
}

async fn invalid_bodies_are_refused_with_the_documented_status_and_store_nothing(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let long = "x".repeat(256);
    let bad_requests = [
        "{}".to_owned(),
        r#"{"email": null}"#.to_owned(),
        r#"{"email": "   "}"#.to_owned(),
        "not json".to_owned(),
        "[1, 2]".to_owned(),
        r#"{"email": "a@b.io""#.to_owned(),
    ];
    for body in bad_requests {
        let (status, json) = app.send(Method::POST, "/api/v1/prospects", Some(&app.key), body.clone()).await;
        assert_eq!(status, 400, "{body}");
        assert!(json["error"].is_string(), "{body}: {json}");
    }
    let unprocessable = [
        json!({"email": 42}),
        json!({"email": "not-an-address"}),
        json!({"email": format!("{}@example.com", "a".repeat(250))}),
        json!({"email": "ok@example.com", "first_name": 7}),
        json!({"email": "ok@example.com", "city": long}),
        json!({"email": "ok@example.com", "external_id": ""}),
        json!({"email": "ok@example.com", "metadata": "nope"}),
        json!({"email": "ok@example.com", "metadata": {"blob": "y".repeat(20_000)}}),
        json!({"email": "ok@example.com", "campaign_id": "not-a-uuid"}),
        json!({"email": "ok@example.com", "campaign_id": CampaignId::new().to_string()}),
    ];
    for body in unprocessable {
        let (status, json) = app.post(&body).await;
        assert_eq!(status, 422, "{body}");
        assert!(json["errors"].as_array().is_some_and(|e| !e.is_empty()), "{body}: {json}");
    }
    assert!(app.prospect(by_email("ok@example.com")).await.is_none(), "nothing stored");
    assert!(app.queued_jobs().await.is_empty(), "nothing queued");

    let (status, _) = app.post(&json!({"email": "ok@example.com", "favourite_colour": "blue"})).await;
    assert_eq!(status, 201, "unknown fields are ignored");
}

async fn external_id_is_unique_per_account(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    assert_eq!(app.post(&json!({"email": "one@example.com", "external_id": "crm-1"})).await.0, 201);

    let (status, body) = app.post(&json!({"email": "two@example.com", "external_id": "crm-1"})).await;

    assert_eq!(status, 422, "{body}");
    assert!(app.prospect(by_email("two@example.com")).await.is_none());
    let (_, other_key) = app.other_account().await;
    assert_eq!(app.post_as(&other_key, &json!({"email": "two@example.com", "external_id": "crm-1"})).await.0, 201);
    // Moving an external_id frees the old one.
    assert_eq!(app.post(&json!({"email": "one@example.com", "external_id": "crm-2"})).await.0, 200);
    assert_eq!(app.post(&json!({"email": "two@example.com", "external_id": "crm-1"})).await.0, 201);
    assert_eq!(app.patch("external/crm-2", &json!({"status": "converted"})).await.0, 200);
}

async fn campaign_id_must_name_an_active_campaign_of_the_account(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let other = app.create_campaign("Webinar").await;
    let retired = app.create_campaign("Retired").await;
    shared::admin::change_campaign_sending(app.backend.admin.as_ref(), retired.id, shared::domain::SendingChange::Deactivate, &shared::domain::SystemClock).await.unwrap();
    let (other_account, other_key) = app.other_account().await;
    let foreign = shared::admin::create_campaign(
        app.backend.admin.as_ref(),
        other_account,
        shared::domain::CampaignDefinition::parse(crate::helpers::CAMPAIGN_FILE).unwrap(),
        false,
        &shared::domain::SystemClock,
    )
    .await
    .unwrap();

    assert_eq!(app.post(&json!({"email": "x@example.com", "campaign_id": retired.id.to_string()})).await.0, 422);
    assert_eq!(app.post(&json!({"email": "x@example.com", "campaign_id": foreign.id.to_string()})).await.0, 422);
    let (status, _) = app.post(&json!({"email": "x@example.com", "campaign_id": other.id.to_string()})).await;

    assert_eq!(status, 201);
    let stored = app.prospect(by_email("x@example.com")).await.unwrap();
    assert_eq!(stored.enrollments.iter().map(|e| e.campaign_id).collect::<Vec<_>>(), vec![other.id], "named campaign replaces the default");
    assert_eq!(app.post_as(&other_key, &json!({"email": "y@example.com", "campaign_id": foreign.id.to_string()})).await.0, 201);
}

async fn post_with_a_new_campaign_enrolls_only_prospects_whose_status_is_new(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let webinar = app.create_campaign("Webinar").await;
    app.post(&json!({"email": "new@example.com"})).await;
    app.post(&json!({"email": "won@example.com", "external_id": "won"})).await;
    assert_eq!(app.patch("external/won", &json!({"status": "converted"})).await.0, 200);

    let (s1, _) = app.post(&json!({"email": "new@example.com", "campaign_id": webinar.id.to_string()})).await;
    let (s2, _) = app.post(&json!({"email": "new@example.com", "campaign_id": webinar.id.to_string()})).await;
    let (s3, _) = app.post(&json!({"email": "won@example.com", "campaign_id": webinar.id.to_string()})).await;

    assert_eq!((s1, s2, s3), (200, 200, 200));
    let new = app.prospect(by_email("new@example.com")).await.unwrap();
    assert_eq!(new.enrollments.len(), 2, "enrolled once in the new campaign");
    assert!(new.enrollments.iter().all(|e| new.is_active(e)));
    let won = app.prospect(by_email("won@example.com")).await.unwrap();
    assert_eq!(won.enrollments.len(), 1, "a converted prospect is never enrolled by POST");
    assert_eq!(won.status, ProspectStatus::Converted, "POST never changes status");
    assert_eq!(app.queued_jobs().await.len(), 3);
}

async fn patch_sets_status_by_id_or_external_id_and_ends_every_enrollment(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let webinar = app.create_campaign("Webinar").await;
    let odd_id = "crm/42 ünï?&#";
    let (_, created) = app.post(&json!({"email": "lee@example.com", "external_id": odd_id})).await;
    app.post(&json!({"email": "lee@example.com", "campaign_id": webinar.id.to_string()})).await;
    let id = id_of(&created);

    let encoded: String = percent_encode(odd_id);
    let (status, body) = app.patch(&format!("external/{encoded}"), &json!({"status": "converted"})).await;

    assert_eq!(status, 200);
    assert_eq!(body, json!({"accepted": true, "prospect_id": id.to_string(), "status": "converted"}));
    let stored = app.prospect(ProspectRef::Id(id)).await.unwrap();
    assert_eq!(stored.status, ProspectStatus::Converted);
    assert_eq!(stored.enrollments.len(), 2);
    assert!(stored.enrollments.iter().all(|e| !stored.is_active(e)), "every enrollment ended");

    let (status, body) = app.patch(&id.to_string(), &json!({"status": "new"})).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("new")));
    let stored = app.prospect(ProspectRef::ExternalId(ExternalId::parse(odd_id).unwrap())).await.unwrap();
    assert!(stored.enrollments.iter().all(|e| !stored.is_active(e)), "setting new does not re-enroll");
    for status in ["unsubscribed", "bounced"] {
        assert_eq!(app.patch(&id.to_string(), &json!({ "status": status })).await.0, 200);
    }
}

fn percent_encode(raw: &str) -> String {
    raw.bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b == b'-' { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

async fn patch_refuses_bad_status_and_hides_unknown_or_foreign_prospects(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let (_, created) = app.post(&json!({"email": "kim@example.com", "external_id": "kim"})).await;
    let id = created["prospect_id"].as_str().unwrap().to_owned();
    let (_, other_key) = app.other_account().await;

    for body in [json!({}), json!({"status": "won"}), json!({"status": 1}), json!({"status": "CONVERTED"})] {
        let (status, json) = app.patch(&id, &body).await;
        assert_eq!(status, 400, "{body}");
        assert!(json["error"].is_string());
    }
    for path in [ProspectId::new().to_string(), "not-a-uuid".to_owned(), "external/nobody".to_owned()] {
        let (status, json) = app.patch(&path, &json!({"status": "converted"})).await;
        assert_eq!((status, json), (404, json!({"error": "Prospect not found"})), "{path}");
    }
    assert_eq!(app.patch("external/", &json!({"status": "converted"})).await.0, 404);
    for path in [format!("/api/v1/prospects/{id}"), "/api/v1/prospects/external/kim".to_owned()] {
        let (status, json) = app.send(Method::PATCH, &path, Some(&other_key), json!({"status": "converted"}).to_string()).await;
        assert_eq!((status, json), (404, json!({"error": "Prospect not found"})), "other account");
    }
    assert_eq!(app.prospect(by_email("kim@example.com")).await.unwrap().status, ProspectStatus::New);
}

async fn keys_are_required_and_scoped_to_their_account(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let unauthorized = json!({"error": "Missing or invalid X-CadenHQ-Key"});
    let body = json!({"email": "a@example.com"}).to_string();

    for key in [None, Some(""), Some("chq_0000"), Some("x".repeat(10_000).as_str())] {
        let (status, json) = app.send(Method::POST, "/api/v1/prospects", key, body.clone()).await;
        assert_eq!((status, &json), (401, &unauthorized), "{:?}", key.map(str::len));
    }
    let (status, json) = app.send(Method::PATCH, &format!("/api/v1/prospects/{}", ProspectId::new()), None, "{}".into()).await;
    assert_eq!((status, json), (401, unauthorized.clone()));

    let keys = app.backend.admin.list_keys(app.account).await.unwrap();
    app.backend.admin.revoke_key(keys[0].key_id, time::OffsetDateTime::now_utc()).await.unwrap();
    let (status, json) = app.post(&json!({"email": "a@example.com"})).await;
    assert_eq!((status, json), (401, unauthorized), "revoked key");
    assert!(app.prospect(by_email("a@example.com")).await.is_none());
}

async fn concurrent_posts_of_one_new_email_create_exactly_one_prospect_and_enrollment(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let body = json!({"email": "race@example.com", "first_name": "Race"});

    let results = join_all((0..16).map(|_| app.post(&body))).await;

    let created = results.iter().filter(|(s, _)| *s == 201).count();
    let updated = results.iter().filter(|(s, _)| *s == 200).count();
    assert_eq!((created, updated), (1, 15), "{results:?}");
    let ids: HashSet<_> = results.iter().map(|(_, b)| b["prospect_id"].clone()).collect();
    assert_eq!(ids.len(), 1, "one prospect");
    let stored = app.prospect(by_email("race@example.com")).await.unwrap();
    assert_eq!(stored.enrollments.len(), 1, "one enrollment");
    let jobs = app.queued_jobs().await;
    let live: Vec<_> = jobs.iter().filter(|j| j.enrollment_id == stored.enrollments[0].id).collect();
    assert_eq!(live.len(), 1, "one job for the enrollment; jobs of losing requests name no enrollment and are dropped");
}

async fn a_failed_queue_publish_loses_no_enrollment_and_a_retry_completes_it(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let body = json!({"email": "flaky@example.com"});

    app.queue.fail_next(1);
    let (status, json) = app.post(&body).await;
    assert_eq!(status, 503, "{json}");
    assert!(json["error"].is_string());
    let (status, json) = app.post(&body).await;

    assert_eq!((status, json["created"].as_bool()), (201, Some(true)));
    let stored = app.prospect(by_email("flaky@example.com")).await.unwrap();
    assert_eq!(stored.enrollments.len(), 1);

    // The same for an existing prospect enrolled in a further campaign.
    let webinar = app.create_campaign("Webinar").await;
    let enroll = json!({"email": "flaky@example.com", "campaign_id": webinar.id.to_string()});
    app.queue.fail_next(1);
    assert_eq!(app.post(&enroll).await.0, 503);
    assert_eq!(app.prospect(by_email("flaky@example.com")).await.unwrap().enrollments.len(), 1, "nothing half-written");
    assert_eq!(app.post(&enroll).await.0, 200);
    let stored = app.prospect(by_email("flaky@example.com")).await.unwrap();
    assert_eq!(stored.enrollments.len(), 2);

    let jobs = app.queued_jobs().await;
    let mut enrollment_ids: Vec<_> = jobs.iter().map(|j| j.enrollment_id).collect();
    enrollment_ids.sort();
    let mut expected: Vec<_> = stored.enrollments.iter().map(|e| e.id).collect();
    expected.sort();
    assert_eq!(enrollment_ids, expected, "exactly one job per enrollment");
}

async fn unknown_routes_wrong_methods_and_large_bodies_get_json_errors(kind: Kind) {
    let app = TestApp::spawn(kind).await;

    let (status, json) = app.send(Method::GET, "/api/v1/nothing-here", Some(&app.key), String::new()).await;
    assert_eq!((status, json["error"].is_string()), (404, true));
    let (status, json) = app.send(Method::PUT, "/api/v1/prospects", Some(&app.key), String::new()).await;
    assert_eq!((status, json["error"].is_string()), (405, true));
    let (status, _) = app.send(Method::PUT, &format!("/api/v1/prospects/{}", ProspectId::new()), Some(&app.key), String::new()).await;
    assert_eq!(status, 405);
    let huge = json!({"email": "big@example.com", "metadata": {"x": "y".repeat(70_000)}}).to_string();
    let (status, json) = app.send(Method::POST, "/api/v1/prospects", Some(&app.key), huge).await;
    assert_eq!((status, json["error"].is_string()), (413, true));
    assert!(app.prospect(by_email("big@example.com")).await.is_none());
}
