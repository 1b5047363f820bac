//! The read API and erasure on both backends: GET of one prospect by id or external_id returns the one
//! prospect resource, sees every acknowledged write at once, and shows where each enrollment
//! stands.

use reqwest::Method;
use serde_json::{json, Value};
use shared::domain::{Clock, ProspectId, SendingChange};
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};

use crate::contract_tests;
use crate::helpers::{Kind, MailFault, TestApp};

contract_tests!(
    get_returns_the_prospect_resource_by_id_and_by_external_id,
    get_sees_a_patch_at_once_with_its_reason_and_the_enrollments_it_ended,
    get_hides_unknown_malformed_and_foreign_prospects,
    get_shows_where_each_enrollment_stands_as_its_steps_are_sent,
    get_shows_paused_deactivated_and_rejected_enrollments,
    export_holds_the_resource_every_email_sent_and_every_status_change,
    list_pages_newest_first_and_filters_as_asked,
    list_refuses_bad_parameters_and_foreign_or_tampered_cursors,
    a_walk_through_every_page_sees_each_prospect_once_while_others_are_written,
    erasure_leaves_no_trace_stops_queued_jobs_and_a_later_post_starts_unsubscribed,
    erasure_hides_foreign_and_malformed_prospects,
);

impl TestApp {
    /// GETs a path under /api/v1/prospects/ with this app's key.
    async fn get(&self, path: &str) -> (u16, Value) {
        self.send(Method::GET, &format!("/api/v1/prospects/{path}"), Some(&self.key), String::new()).await
    }

    /// The resource of the prospect at `path`, which must exist.
    async fn resource(&self, path: &str) -> Value {
        let (status, body) = self.get(path).await;
        assert_eq!(status, 200, "{path}: {body}");
        body
    }
}

fn time_of(v: &Value) -> OffsetDateTime {
    OffsetDateTime::parse(v.as_str().unwrap_or_else(|| panic!("a time, not {v}")), &Rfc3339).unwrap()
}

/// The same instant, to the second (stores keep sub-second precision; comparisons need not).
fn same_second(a: OffsetDateTime, b: OffsetDateTime) -> bool {
    (a - b).abs() < Duration::seconds(1)
}

async fn get_returns_the_prospect_resource_by_id_and_by_external_id(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let (_, created) = app
        .post(&json!({"email": "  Ada.Lovelace@Example.COM ", "first_name": "Ada", "utm_source": "ads",
                      "external_id": "crm/7 ü", "metadata": {"plan": "pro", "seats": 3}}))
        .await;
    let id = created["prospect_id"].as_str().unwrap().to_owned();

    let body = app.resource(&id).await;
    assert_eq!(body["id"], id.as_str());
    assert_eq!(body["email"], "Ada.Lovelace@Example.COM", "as sent, trimmed");
    assert_eq!((body["status"].as_str(), body["status_reason"].as_str()), (Some("new"), Some("api")));
    assert_eq!(body["first_name"], "Ada");
    assert_eq!(body["utm_source"], "ads");
    assert!(body["last_name"].is_null() && body.as_object().unwrap().contains_key("last_name"), "every text field, null when unset");
    assert_eq!(body["external_id"], "crm/7 ü");
    assert_eq!(body["metadata"], json!({"plan": "pro", "seats": 3}));
    let created_at = time_of(&body["created_at"]);
    assert!(body["created_at"].as_str().unwrap().ends_with('Z'), "UTC");
    assert!(same_second(created_at, app.clock.now()));
    assert_eq!(body["updated_at"], body["created_at"]);
    assert_eq!(body["status_changed_at"], body["created_at"]);
    let enrollments = body["enrollments"].as_array().unwrap();
    assert_eq!(enrollments.len(), 1);
    let enrollment = &enrollments[0];
    assert_eq!(enrollment["campaign_id"], app.campaign.id.to_string());
    assert_eq!((enrollment["state"].as_str(), enrollment["steps_sent"].as_u64(), enrollment["next_step"].as_u64()), (Some("active"), Some(0), Some(1)));
    assert!(same_second(time_of(&enrollment["next_send_at"]), created_at), "the first step is due at once");
    assert!(enrollment["ended_at"].is_null() && enrollment["ended_reason"].is_null());
    assert!(enrollment["id"].is_string() && enrollment["enrolled_at"] == body["created_at"]);

    let by_external = app.resource("external/crm%2F7%20%C3%BC").await;
    assert_eq!(by_external, body, "one representation, whatever the route");
}

async fn get_sees_a_patch_at_once_with_its_reason_and_the_enrollments_it_ended(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let (_, created) = app.post(&json!({"email": "bo@example.com", "external_id": "bo"})).await;
    let id = created["prospect_id"].as_str().unwrap().to_owned();
    app.clock.advance(Duration::minutes(5));

    assert_eq!(app.patch(&id, &json!({"status": "converted"})).await.0, 200);
    let body = app.resource(&id).await;
    assert_eq!((body["status"].as_str(), body["status_reason"].as_str()), (Some("converted"), Some("api")));
    let changed_at = time_of(&body["status_changed_at"]);
    assert!(same_second(changed_at, app.clock.now()));
    assert_eq!(body["updated_at"], body["status_changed_at"]);
    let enrollment = &body["enrollments"][0];
    assert_eq!((enrollment["state"].as_str(), enrollment["ended_reason"].as_str()), (Some("ended"), Some("converted")));
    assert_eq!(enrollment["ended_at"], body["status_changed_at"]);
    assert!(enrollment["next_step"].is_null() && enrollment["next_send_at"].is_null());

    // A PATCH that sets the status the prospect has changes nothing it reports.
    app.clock.advance(Duration::minutes(5));
    assert_eq!(app.patch("external/bo", &json!({"status": "converted"})).await.0, 200);
    assert_eq!(app.resource("external/bo").await["status_changed_at"], body["status_changed_at"]);

    let token = crate::helpers::test_secret().sign(app.account, ProspectId::parse(&id).unwrap());
    let (status, _) = app.send(Method::POST, &format!("/unsubscribe/{token}"), None, "List-Unsubscribe=One-Click".into()).await;
    assert_eq!(status, 200, "the one-click unsubscribe");
    let body = app.resource(&id).await;
    assert_eq!((body["status"].as_str(), body["status_reason"].as_str()), (Some("unsubscribed"), Some("unsubscribe_link")));
    assert_eq!(body["enrollments"][0]["ended_reason"], "converted", "what ended it first");
}

async fn get_hides_unknown_malformed_and_foreign_prospects(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let (_, created) = app.post(&json!({"email": "kim@example.com", "external_id": "kim"})).await;
    let id = created["prospect_id"].as_str().unwrap().to_owned();
    let (_, other_key) = app.other_account().await;

    let not_found = json!({"error": "Prospect not found"});
    for path in [ProspectId::new().to_string(), "not-a-uuid".to_owned(), "external/nobody".to_owned()] {
        assert_eq!(app.get(&path).await, (404, not_found.clone()), "{path}");
    }
    assert_eq!(app.get("external/").await.0, 404);
    for path in [format!("/api/v1/prospects/{id}"), "/api/v1/prospects/external/kim".to_owned()] {
        assert_eq!(app.send(Method::GET, &path, Some(&other_key), String::new()).await, (404, not_found.clone()), "other account");
        let (status, body) = app.send(Method::GET, &path, None, String::new()).await;
        assert_eq!((status, body), (401, json!({"error": "Missing or invalid X-CadenHQ-Key"})));
    }
}

async fn get_shows_where_each_enrollment_stands_as_its_steps_are_sent(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let (_, created) = app.post(&json!({"email": "cy@example.com", "first_name": "Cy"})).await;
    let id = created["prospect_id"].as_str().unwrap().to_owned();
    let enrolled_at = app.clock.now();

    app.tick(1).await;
    let enrollment = app.resource(&id).await["enrollments"][0].clone();
    assert_eq!((enrollment["state"].as_str(), enrollment["steps_sent"].as_u64(), enrollment["next_step"].as_u64()), (Some("active"), Some(1), Some(2)));
    assert!(same_second(time_of(&enrollment["next_send_at"]), enrolled_at + Duration::seconds(600)), "{enrollment}");

    // The second step's provider answer is unknown: over, never resent, but not sent.
    app.mailer.fail_next(MailFault::TookItButTimedOut);
    app.clock.advance(Duration::seconds(600));
    app.tick(1).await;
    let enrollment = app.resource(&id).await["enrollments"][0].clone();
    assert_eq!((enrollment["steps_sent"].as_u64(), enrollment["next_step"].as_u64()), (Some(1), Some(3)), "{enrollment}");
    assert!(same_second(time_of(&enrollment["next_send_at"]), enrolled_at + Duration::seconds(600 + 259_200)));

    app.clock.advance(Duration::seconds(259_200));
    app.tick(1).await;
    let enrollment = app.resource(&id).await["enrollments"][0].clone();
    assert_eq!((enrollment["state"].as_str(), enrollment["steps_sent"].as_u64()), (Some("completed"), Some(2)), "{enrollment}");
    assert!(enrollment["next_step"].is_null() && enrollment["next_send_at"].is_null() && enrollment["ended_reason"].is_null());

    // Completed stays completed when the prospect converts later.
    assert_eq!(app.patch(&id, &json!({"status": "converted"})).await.0, 200);
    assert_eq!(app.resource(&id).await["enrollments"][0]["state"], "completed");
}

async fn get_shows_paused_deactivated_and_rejected_enrollments(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let (_, rae) = app.post(&json!({"email": "rae@example.com"})).await;
    app.mailer.fail_next(MailFault::Reject);
    app.tick(1).await;
    let body = app.resource(rae["prospect_id"].as_str().unwrap()).await;
    assert_eq!((body["status"].as_str(), body["status_reason"].as_str()), (Some("bounced"), Some("rejected")));
    let enrollment = &body["enrollments"][0];
    assert_eq!((enrollment["state"].as_str(), enrollment["ended_reason"].as_str(), enrollment["steps_sent"].as_u64()), (Some("ended"), Some("rejected"), Some(0)));

    let webinar = app.create_campaign("Webinar").await;
    let (_, created) = app.post(&json!({"email": "di@example.com"})).await;
    let id = created["prospect_id"].as_str().unwrap().to_owned();
    app.post(&json!({"email": "di@example.com", "campaign_id": webinar.id.to_string()})).await;
    app.tick(1).await;

    shared::admin::change_campaign_sending(app.backend.admin.as_ref(), app.campaign.id, SendingChange::Pause, app.clock.as_ref()).await.unwrap();
    app.clock.advance(Duration::minutes(1));
    shared::admin::change_campaign_sending(app.backend.admin.as_ref(), webinar.id, SendingChange::Deactivate, app.clock.as_ref()).await.unwrap();
    let body = app.resource(&id).await;
    let (paused, deactivated) = (&body["enrollments"][0], &body["enrollments"][1]);
    assert_eq!((paused["state"].as_str(), paused["next_step"].as_u64()), (Some("active"), Some(2)), "{paused}");
    assert!(paused["next_send_at"].is_null(), "nothing is due while the campaign is paused");
    assert_eq!((deactivated["state"].as_str(), deactivated["ended_reason"].as_str()), (Some("ended"), Some("campaign_deactivated")));
    assert!(same_second(time_of(&deactivated["ended_at"]), app.clock.now()));

}

async fn export_holds_the_resource_every_email_sent_and_every_status_change(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let (_, created) = app.post(&json!({"email": "eve@example.com", "first_name": "Eve"})).await;
    let id = created["prospect_id"].as_str().unwrap().to_owned();
    app.tick(1).await;
    app.clock.advance(Duration::seconds(600));
    app.tick(1).await;
    assert_eq!(app.patch(&id, &json!({"status": "converted"})).await.0, 200);
    app.clock.advance(Duration::minutes(1));
    assert_eq!(app.patch(&id, &json!({"status": "new"})).await.0, 200);

    let (status, export) = app.get(&format!("{id}/export")).await;
    assert_eq!(status, 200, "{export}");
    assert_eq!(export["prospect"], app.resource(&id).await, "the resource as GET returns it");
    let emails = export["emails"].as_array().unwrap();
    assert_eq!(emails.len(), 2, "{export}");
    assert_eq!((emails[0]["step"].as_u64(), emails[0]["subject"].as_str(), emails[0]["state"].as_str()), (Some(1), Some("Hi Eve"), Some("sent")));
    assert_eq!((emails[1]["step"].as_u64(), emails[1]["subject"].as_str()), (Some(2), Some("Tips")));
    assert_eq!(emails[0]["campaign_id"], app.campaign.id.to_string());
    assert!(emails.iter().all(|e| e["message_id"].as_str().is_some_and(|m| !m.is_empty()) && e["sent_at"].is_string()), "{export}");
    let changes = export["status_changes"].as_array().unwrap();
    let summary: Vec<_> = changes.iter().map(|c| (c["from"].as_str().unwrap(), c["to"].as_str().unwrap(), c["reason"].as_str().unwrap())).collect();
    assert_eq!(summary, [("new", "converted", "api"), ("converted", "new", "api")]);
    assert!(time_of(&changes[0]["at"]) < time_of(&changes[1]["at"]));

    let (_, other_key) = app.other_account().await;
    let (status, _) = app.send(Method::GET, &format!("/api/v1/prospects/{id}/export"), Some(&other_key), String::new()).await;
    assert_eq!(status, 404, "another account's prospect");
    assert_eq!(app.get(&format!("{}/export", ProspectId::new())).await.0, 404);
}

/// Every page of a listing from `query` on, walked with the app's key: the ids in order, and
/// how many pages it took.
async fn walk(app: &TestApp, query: &str, mut between_pages: impl FnMut(usize) -> futures::future::BoxFuture<'static, ()>) -> (Vec<String>, usize) {
    let (mut ids, mut pages, mut cursor) = (Vec::new(), 0, None::<String>);
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/prospects?{query}&cursor={c}"),
            None => format!("/api/v1/prospects?{query}"),
        };
        let (status, page) = app.send(Method::GET, &path, Some(&app.key), String::new()).await;
        assert_eq!(status, 200, "{path}: {page}");
        pages += 1;
        ids.extend(page["data"].as_array().unwrap().iter().map(|p| p["id"].as_str().unwrap().to_owned()));
        assert_eq!(page["has_more"].as_bool(), Some(page["next_cursor"].is_string()), "{page}");
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return (ids, pages),
        }
        between_pages(pages).await;
    }
}

fn no_pause(_: usize) -> futures::future::BoxFuture<'static, ()> {
    Box::pin(async {})
}

async fn list_pages_newest_first_and_filters_as_asked(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let webinar = app.create_campaign("Webinar").await;
    let mut ids = Vec::new();
    for n in 0..5 {
        let (_, created) = app.post(&json!({"email": format!("p{n}@example.com"), "first_name": format!("P{n}")})).await;
        ids.push(created["prospect_id"].as_str().unwrap().to_owned());
        app.clock.advance(Duration::seconds(1));
    }
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();

    let (status, page) = app.send(Method::GET, "/api/v1/prospects", Some(&app.key), String::new()).await;
    assert_eq!(status, 200);
    assert_eq!((page["has_more"].as_bool(), page["next_cursor"].is_null()), (Some(false), true));
    assert_eq!(page["data"][0], app.resource(&ids[4]).await, "each item is the prospect resource");
    assert_eq!(walk(&app, "limit=2", no_pause).await, (newest_first.clone(), 3));

    let midpoint = time_of(&app.resource(&ids[2]).await["created_at"]);
    app.clock.advance(Duration::seconds(10));
    let changed_at = app.clock.now();
    app.clock.advance(Duration::seconds(1));
    app.patch(&ids[1], &json!({"status": "converted"})).await;
    app.patch(&ids[3], &json!({"status": "converted"})).await;
    app.post(&json!({"email": "P0@example.com", "campaign_id": webinar.id.to_string()})).await;
    let stamp = |t: OffsetDateTime| t.format(&Rfc3339).unwrap().replace('+', "%2B");

    for (query, expected) in [
        ("status=converted".to_owned(), vec![&ids[3], &ids[1]]),
        ("status=new&limit=1".to_owned(), vec![&ids[4], &ids[2], &ids[0]]),
        ("email=%20P2%40EXAMPLE.com".to_owned(), vec![&ids[2]]),
        ("email=p2%40example.com&status=converted".to_owned(), vec![]),
        ("email=nobody%40example.com".to_owned(), vec![]),
        (format!("campaign_id={}", webinar.id), vec![&ids[0]]),
        (format!("created_after={}", stamp(midpoint)), vec![&ids[4], &ids[3]]),
        (format!("updated_after={}&limit=1", stamp(changed_at)), vec![&ids[3], &ids[1], &ids[0]]),
    ] {
        let expected: Vec<String> = expected.into_iter().cloned().collect();
        assert_eq!(walk(&app, &query, no_pause).await.0, expected, "{query}");
    }

    let (_, other_key) = app.other_account().await;
    let (_, foreign) = app.send(Method::GET, "/api/v1/prospects", Some(&other_key), String::new()).await;
    assert_eq!(foreign["data"], json!([]), "another account's prospects are not listed");
}

async fn list_refuses_bad_parameters_and_foreign_or_tampered_cursors(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    for n in 0..3 {
        app.post(&json!({"email": format!("q{n}@example.com")})).await;
    }
    let (_, page) = app.send(Method::GET, "/api/v1/prospects?limit=1", Some(&app.key), String::new()).await;
    let cursor = page["next_cursor"].as_str().unwrap().to_owned();
    let (_, other_key) = app.other_account().await;
    let (status, body) = app.send(Method::GET, &format!("/api/v1/prospects?cursor={cursor}"), Some(&other_key), String::new()).await;
    assert_eq!(status, 400, "a foreign cursor: {body}");
    let mut tampered = cursor.clone().into_bytes();
    tampered[0] = if tampered[0] == b'3' { b'4' } else { b'3' };
    let tampered = String::from_utf8(tampered).unwrap();
    for query in ["limit=0", "limit=101", "limit=ten", "status=won", "email=not-an-address", "campaign_id=42", "created_after=yesterday", "updated_after=2026-13-01T00:00:00Z", "limit=1&limit=2", "cursor=", &format!("cursor={tampered}")] {
        let (status, body) = app.send(Method::GET, &format!("/api/v1/prospects?{query}"), Some(&app.key), String::new()).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{query}: {body}");
    }
    assert_eq!(app.send(Method::GET, "/api/v1/prospects", None, String::new()).await.0, 401);
}

async fn a_walk_through_every_page_sees_each_prospect_once_while_others_are_written(kind: Kind) {
    let app = std::sync::Arc::new(TestApp::spawn(kind).await);
    let mut before = Vec::new();
    for n in 0..30 {
        let (_, created) = app.post(&json!({"email": format!("w{n}@example.com")})).await;
        before.push(created["prospect_id"].as_str().unwrap().to_owned());
        if n % 4 == 0 {
            app.clock.advance(Duration::milliseconds(1));
        }
    }
    let writer = app.clone();
    let ids = before.clone();
    let (seen, pages) = walk(&app, "limit=4", move |page| {
        let (app, ids) = (writer.clone(), ids.clone());
        Box::pin(async move {
            // Between pages: new prospects, and updates and status changes of listed and unlisted ones.
            for n in 0..3 {
                app.post(&json!({"email": format!("new{page}-{n}@example.com")})).await;
            }
            app.post(&json!({"email": format!("w{}@example.com", page * 3 % 30), "first_name": "Changed"})).await;
            app.patch(&ids[(page * 7) % 30], &json!({"status": "converted"})).await;
        })
    })
    .await;
    assert!(pages >= 8, "{pages} pages");
    let mut counted = std::collections::HashMap::<&str, usize>::new();
    for id in &seen {
        *counted.entry(id.as_str()).or_default() += 1;
    }
    assert!(counted.values().all(|n| *n == 1), "no prospect twice");
    assert!(before.iter().all(|id| counted.contains_key(id.as_str())), "every prospect that existed when the walk began");
}

async fn erasure_leaves_no_trace_stops_queued_jobs_and_a_later_post_starts_unsubscribed(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let traces = ["Zed.Erasable-7q@Example.com", "zed.erasable-7q@example.com", "Zebediah7q", "ext-7q-unique", "m7q-secret-value"];
    let (_, created) = app
        .post(&json!({"email": traces[0], "first_name": traces[2], "external_id": traces[3], "metadata": {"note": traces[4]}}))
        .await;
    let id = created["prospect_id"].as_str().unwrap().to_owned();
    app.tick(1).await;
    assert_eq!(app.mailer.subjects(), ["Hi Zebediah7q"], "the first step went out");
    app.clock.advance(Duration::seconds(600));
    let (_, kept) = app.post(&json!({"email": "kept@example.com"})).await;

    let (status, body) = app.send(Method::DELETE, &format!("/api/v1/prospects/{id}"), Some(&app.key), String::new()).await;
    assert_eq!((status, body), (200, json!({"erased": true, "prospect_id": id})));
    assert_eq!(app.send(Method::DELETE, &format!("/api/v1/prospects/{id}"), Some(&app.key), String::new()).await.0, 404, "a second erasure");
    assert_eq!(app.send(Method::DELETE, "/api/v1/prospects/external/ext-7q-unique", Some(&app.key), String::new()).await.0, 404);
    assert_eq!(app.get(&id).await.0, 404);
    let dump = app.dump_store().await;
    for trace in traces {
        assert!(!dump.contains(trace), "{trace} is still stored");
    }
    assert!(!dump.contains("Hi Zebediah7q"), "the subject sent is still stored");

    // The queued second step sends nothing; the other prospect's mail goes on.
    app.tick(1).await;
    assert_eq!(app.mailer.subjects(), ["Hi Zebediah7q", "Hi "], "only the other prospect's first step");
    assert_eq!(app.resource(kept["prospect_id"].as_str().unwrap()).await["enrollments"][0]["steps_sent"], 1);

    // The external_id is free; the address comes back unsubscribed, in no campaign.
    let (status, again) = app.post(&json!({"email": traces[1], "external_id": traces[3]})).await;
    assert_eq!(status, 201, "{again}");
    let again_id = again["prospect_id"].as_str().unwrap().to_owned();
    assert_ne!(again_id, id);
    let body = app.resource(&again_id).await;
    assert_eq!((body["status"].as_str(), body["status_reason"].as_str()), (Some("unsubscribed"), Some("erased")));
    assert_eq!(body["enrollments"], json!([]));
    app.tick(1).await;
    assert_eq!(app.mailer.subjects().len(), 2, "nothing is sent to it");
    // Only an explicit PATCH to new makes it mailable again.
    assert_eq!(app.patch(&again_id, &json!({"status": "new"})).await.0, 200);
    let (_, enrolled) = app.post(&json!({"email": traces[1], "campaign_id": app.campaign.id.to_string()})).await;
    assert_eq!(enrolled["created"], false);
    assert_eq!(app.resource(&again_id).await["enrollments"].as_array().map(Vec::len), Some(1));
}

async fn erasure_hides_foreign_and_malformed_prospects(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let (_, created) = app.post(&json!({"email": "own@example.com", "external_id": "own"})).await;
    let id = created["prospect_id"].as_str().unwrap().to_owned();
    let (_, other_key) = app.other_account().await;
    for path in [format!("/api/v1/prospects/{id}"), "/api/v1/prospects/external/own".to_owned()] {
        let (status, body) = app.send(Method::DELETE, &path, Some(&other_key), String::new()).await;
        assert_eq!((status, body), (404, json!({"error": "Prospect not found"})), "another account's");
        assert_eq!(app.send(Method::DELETE, &path, None, String::new()).await.0, 401);
    }
    assert_eq!(app.send(Method::DELETE, "/api/v1/prospects/not-a-uuid", Some(&app.key), String::new()).await.0, 404);
    assert_eq!(app.resource(&id).await["id"], id.as_str(), "still there");
    let (status, body) = app.send(Method::DELETE, "/api/v1/prospects/external/own", Some(&app.key), String::new()).await;
    assert_eq!((status, body["erased"].as_bool()), (200, Some(true)), "by external_id");
}
