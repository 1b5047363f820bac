//! Every API Gateway event in `events/` (the payloads `sam local invoke -e` takes) run through
//! the router of the function that owns its route, as `lambda_http` hands it over in Lambda.

use std::path::Path;
use std::sync::Arc;

use serde_json::Value;
use shared::adapters::sqlite::SqliteStore;
use shared::admin;
use shared::backend::Backend;
use shared::domain::{ApiKey, ApiKeyRecord, CampaignDefinition, SystemClock};
use shared::http::{router, Routes};
use tower::ServiceExt;

/// The key the events carry; seeded into the store by this test only.
const EVENTS_KEY: &str = "chq_0000000000000000000000000000000000000000000e7e47";

/// Each event, in the order they run against one store, with the status it must get.
const EXPECTED: [(&str, u16); 14] = [
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
];

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
    let mut listed: Vec<String> = EXPECTED.iter().map(|(name, _)| (*name).to_owned()).collect();
    listed.sort();
    assert_eq!(files, listed);
}

#[tokio::test]
async fn api_gateway_events_get_their_documented_status_from_the_lambda_handlers() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    let backend = Backend::from_embedded(&store);
    let account = admin::create_account(backend.admin.as_ref(), "Events", &SystemClock).await.unwrap();
    let key = ApiKey::from_raw(EVENTS_KEY);
    backend.admin.create_key(&ApiKeyRecord::new(&key, account.id, None, time::OffsetDateTime::now_utc())).await.unwrap();
    let campaign = CampaignDefinition::parse(crate::helpers::CAMPAIGN_FILE).unwrap();
    admin::create_campaign(backend.admin.as_ref(), account.id, campaign, true, &SystemClock).await.unwrap();
    let service = backend.service(Arc::new(SystemClock));
    let post_function = router(service.clone(), Routes::Upsert);
    let patch_function = router(service, Routes::Status);

    for (name, expected) in EXPECTED {
        let raw = std::fs::read_to_string(events_dir().join(format!("{name}.json"))).unwrap();
        let request = lambda_http::request::from_str(&raw).unwrap_or_else(|e| panic!("{name}: {e}"));
        let function = if request.method() == "POST" { &post_function } else { &patch_function };

        let response = function.clone().oneshot(request).await.unwrap();

        assert_eq!(response.status().as_u16(), expected, "{name}");
        assert_eq!(response.headers()["content-type"], "application/json", "{name}");
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        let body: Value = serde_json::from_slice(&bytes).unwrap();
        match expected {
            200 | 201 => assert_eq!(body["accepted"], true, "{name}: {body}"),
            422 => assert!(body["errors"].is_array(), "{name}: {body}"),
            _ => assert!(body["error"].is_string(), "{name}: {body}"),
        }
    }
    let jobs = store.queued_jobs().await.unwrap();
    assert_eq!(jobs.len(), 1, "one enrollment, one job");
}
