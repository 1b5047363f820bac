//! What a client retrying, racing and overrunning its limit can rely on, on both backends:
//! idempotency keys, per-key rate limits, key bookkeeping; and 503 (never 500, never a partial
//! write) when AWS throttles or fails.

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use reqwest::Method;
use serde_json::{json, Value};
use shared::backend::Backend;
use shared::domain::SystemClock;
use shared::http::{router, Routes};
use shared::ports::ProspectRef;
use time::Duration;

use crate::contract_tests;
use crate::helpers::{by_email, create_table, emulator_sdk_config, Kind, TestApp};

contract_tests!(
    a_retried_post_with_an_idempotency_key_is_replayed_and_writes_once,
    an_idempotency_key_reused_for_another_request_or_too_long_is_refused,
    a_second_request_with_a_key_in_flight_gets_409,
    a_failed_request_does_not_keep_its_idempotency_key,
    a_key_over_its_rate_limit_gets_429_and_refills,
    a_key_records_its_last_use_at_most_once_a_minute,
);

async fn post_with_key(app: &TestApp, key: &str, body: &Value) -> (u16, reqwest::header::HeaderMap, Value) {
    app.send_with(Method::POST, "/api/v1/prospects", Some(&app.key), &[("Idempotency-Key", key)], body.to_string()).await
}

async fn a_retried_post_with_an_idempotency_key_is_replayed_and_writes_once(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let body = json!({"email": "idem@example.com", "first_name": "Ida"});

    let (first, first_headers, first_body) = post_with_key(&app, "order-42", &body).await;
    let (again, again_headers, again_body) = post_with_key(&app, "order-42", &body).await;

    assert_eq!((first, again), (201, 201), "the first response is replayed, created included");
    assert_eq!(first_body, again_body);
    assert!(first_headers.get("idempotent-replayed").is_none());
    assert_eq!(again_headers["idempotent-replayed"], "true");
    assert_eq!(app.queued_jobs().await.len(), 1, "no second campaign job");
    let (status, patched, _) = app
        .send_with(Method::PATCH, "/api/v1/prospects/external/none", Some(&app.key), &[("Idempotency-Key", "order-42")], "{}".into())
        .await;
    assert_eq!(status, 422, "the key belongs to the POST: {patched:?}");

    let path = format!("/api/v1/prospects/{}", first_body["prospect_id"].as_str().unwrap());
    let status_body = json!({"status": "converted"}).to_string();
    let headers = [("Idempotency-Key", "patch-1")];
    let (s1, _, b1) = app.send_with(Method::PATCH, &path, Some(&app.key), &headers, status_body.clone()).await;
    let (s2, h2, b2) = app.send_with(Method::PATCH, &path, Some(&app.key), &headers, status_body).await;
    assert_eq!((s1, s2, b1 == b2), (200, 200, true));
    assert_eq!(h2["idempotent-replayed"], "true");
}

async fn an_idempotency_key_reused_for_another_request_or_too_long_is_refused(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    post_with_key(&app, "k-1", &json!({"email": "a@example.com"})).await;

    let (status, _, body) = post_with_key(&app, "k-1", &json!({"email": "b@example.com"})).await;
    assert_eq!(status, 422);
    assert!(body["errors"][0].as_str().unwrap().contains("Idempotency-Key"));
    assert!(app.prospect(by_email("b@example.com")).await.is_none(), "nothing written");

    let (status, _, body) = post_with_key(&app, &"k".repeat(256), &json!({"email": "c@example.com"})).await;
    assert_eq!(status, 400, "{body}");
    assert!(app.prospect(by_email("c@example.com")).await.is_none());

    let (other_account, other_key) = app.other_account().await;
    let _ = other_account;
    let (status, _, _) = app
        .send_with(Method::POST, "/api/v1/prospects", Some(&other_key), &[("Idempotency-Key", "k-1")], json!({"email": "b@example.com"}).to_string())
        .await;
    assert_eq!(status, 201, "keys are scoped to the account");
}

async fn a_second_request_with_a_key_in_flight_gets_409(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    app.queue.slow_down(700);
    let body = json!({"email": "slow@example.com"});

    let (first, second) = tokio::join!(post_with_key(&app, "same", &body), async {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        post_with_key(&app, "same", &body).await
    });

    assert_eq!(first.0, 201);
    assert_eq!(second.0, 409, "{:?}", second.2);
    assert!(second.2["error"].is_string());
    app.queue.slow_down(0);
    let (third, headers, _) = post_with_key(&app, "same", &body).await;
    assert_eq!((third, &headers["idempotent-replayed"]), (201, &"true".parse::<reqwest::header::HeaderValue>().unwrap()));
    assert_eq!(app.queued_jobs().await.len(), 1);
}

async fn a_failed_request_does_not_keep_its_idempotency_key(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let body = json!({"email": "retry@example.com"});
    app.queue.fail_next(1);

    let (failed, _, _) = post_with_key(&app, "r-1", &body).await;
    let (retried, headers, _) = post_with_key(&app, "r-1", &body).await;

    assert_eq!((failed, retried), (503, 201));
    assert!(headers.get("idempotent-replayed").is_none(), "the retry ran");
    assert_eq!(app.prospect(by_email("retry@example.com")).await.unwrap().enrollments.len(), 1);
}

async fn a_key_over_its_rate_limit_gets_429_and_refills(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let (_, key) = app.key_with_limit(2, 3).await;
    let send = |email: &'static str| {
        let key = key.clone();
        let app = &app;
        async move { app.send_with(Method::POST, "/api/v1/prospects", Some(&key), &[], json!({ "email": email }).to_string()).await }
    };

    let mut remaining = Vec::new();
    for email in ["r1@example.com", "r2@example.com", "r3@example.com"] {
        let (status, headers, _) = send(email).await;
        assert_eq!(status, 201);
        assert_eq!(headers["ratelimit-limit"], "3");
        assert!(headers.contains_key("ratelimit-reset"));
        remaining.push(headers["ratelimit-remaining"].to_str().unwrap().to_owned());
    }
    let (status, headers, body) = send("r4@example.com").await;

    assert_eq!(remaining, vec!["2", "1", "0"]);
    assert_eq!(status, 429, "{body}");
    assert!(body["error"].is_string());
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(headers["ratelimit-remaining"], "0");
    assert!(app.prospect(by_email("r4@example.com")).await.is_none(), "a refused request writes nothing");
    app.clock.advance(Duration::milliseconds(500));
    assert_eq!(send("r4@example.com").await.0, 201, "one token back after 1/rate");
    assert_eq!(send("r5@example.com").await.0, 429);
    assert_eq!(app.post(&json!({"email": "r5@example.com"})).await.0, 201, "limits are per key");
}

async fn a_key_records_its_last_use_at_most_once_a_minute(kind: Kind) {
    let app = TestApp::spawn(kind).await;
    let last_used = || async {
        let keys = app.backend.admin.list_keys(app.account).await.unwrap();
        keys.iter().find(|k| k.label.as_deref() == Some("test")).unwrap().last_used_at
    };
    assert_eq!(last_used().await, None);

    app.post(&json!({"email": "u1@example.com"})).await;
    let first = last_used().await.expect("recorded");
    app.clock.advance(Duration::seconds(30));
    app.post(&json!({"email": "u2@example.com"})).await;
    assert_eq!(last_used().await, Some(first), "not rewritten within a minute");
    app.clock.advance(Duration::seconds(31));
    app.post(&json!({"email": "u3@example.com"})).await;

    assert!(last_used().await.unwrap() > first);
}

/// A stand-in AWS endpoint that throttles or fails every call, as DynamoDB and SQS do under
/// overload.
async fn failing_endpoint(status: StatusCode, error_type: &'static str) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new().fallback(move || async move {
        let body = json!({"__type": error_type, "message": "injected by the test"}).to_string();
        (status, [("content-type", "application/x-amz-json-1.0"), ("x-amzn-query-error", "InternalError;Receiver")], body)
            .into_response()
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

/// Serves the API over `backend` on a loopback port; returns its base URL.
async fn serve(backend: &Backend) -> String {
    let app = router(backend.service(Arc::new(SystemClock)), Routes::All);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    base
}

/// The emulator's SDK configuration sent to `url` instead: the service-config loader is
/// dropped so that `AWS_ENDPOINT_URL` from the environment does not win over the override.
fn pointed_at(sdk: &aws_config::SdkConfig, url: String) -> aws_config::SdkConfig {
    sdk.to_builder().service_config(NoEnvironment).endpoint_url(url).build()
}

#[derive(Debug)]
struct NoEnvironment;

impl aws_types::service_config::LoadServiceConfig for NoEnvironment {
    fn load_config(&self, _key: aws_types::service_config::ServiceConfigKey<'_>) -> Option<String> {
        None
    }
}

#[tokio::test]
async fn dynamodb_throttling_gets_503_with_retry_after_never_500() {
    let sdk = emulator_sdk_config().await;
    let throttling = failing_endpoint(StatusCode::BAD_REQUEST, "com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException").await;
    let throttled_sdk = pointed_at(&sdk, throttling);
    let backend = Backend::aws(&throttled_sdk, "any-table", None);
    let base = serve(&backend).await;

    let response = reqwest::Client::new()
        .post(format!("{base}/api/v1/prospects"))
        .header("X-CadenHQ-Key", "chq_anything")
        .json(&json!({"email": "t@example.com"}))
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    let body: Value = response.json().await.unwrap();
    assert!(body["error"].is_string());
}

#[tokio::test]
async fn sqs_failures_get_503_and_leave_no_partial_write() {
    let sdk = emulator_sdk_config().await;
    let table = format!("sqs-fail-{}", uuid::Uuid::new_v4().simple());
    create_table(&sdk, &table).await;
    let failing = failing_endpoint(StatusCode::INTERNAL_SERVER_ERROR, "InternalError").await;
    let failing_sdk = pointed_at(&sdk, failing);
    let sqs = shared::adapters::sqs::SqsQueue::new(aws_sdk_sqs::Client::new(&failing_sdk), "http://queue.invalid/jobs");
    let backend = Backend { queue: Some(Arc::new(sqs)), ..Backend::aws(&sdk, &table, None) };
    let account = shared::admin::create_account(backend.admin.as_ref(), "A", &SystemClock).await.unwrap();
    let definition = shared::domain::CampaignDefinition::parse(crate::helpers::CAMPAIGN_FILE).unwrap();
    shared::admin::create_campaign(backend.admin.as_ref(), account.id, definition, true, &SystemClock).await.unwrap();
    let (_, key) = shared::admin::create_key(backend.admin.as_ref(), account.id, None, &SystemClock).await.unwrap();
    let base = serve(&backend).await;

    let response = reqwest::Client::new()
        .post(format!("{base}/api/v1/prospects"))
        .header("X-CadenHQ-Key", key.expose())
        .json(&json!({"email": "q@example.com", "external_id": "q-1"}))
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    let stored = backend.repo.find(account.id, &by_email("q@example.com")).await.unwrap();
    assert!(stored.is_none(), "no prospect written without its campaign job");
    let by_external = backend.repo.find(account.id, &ProspectRef::ExternalId(shared::domain::ExternalId::parse("q-1").unwrap())).await.unwrap();
    assert!(by_external.is_none());
}
