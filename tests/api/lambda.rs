//! The Lambda functions as AWS runs them: each built function binary started by
//! `cadenhq invoke`, which plays the Lambda Runtime API, with the environment `template.yaml`
//! gives it (values pointing at a fresh table, queue and secret in the emulator), fed every
//! event in `events/` that belongs to it in one warm process (the GET and DELETE by id, and the
//! SES notifications, with the ids of the prospect the POST event created in place of their
//! placeholders; the DELETE events last, as they erase it). Also: each SES notification's
//! effect on the prospect it names, one invocation each; a signed Stripe payment converting the
//! prospect it names through the webhooks function; a handler error is a Runtime API error
//! report and not a crash, a function missing a variable its template sets fails at init naming
//! it (unless the variable may be unset), an SNS configuration that cannot be read fails init
//! saying why, and the variables each function's code reads are exactly the ones its template
//! sets. The binaries are built beside `cadenhq` (`scripts/test` builds them first).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use shared::adapters::sns_http::{CERT_DIR, TOPIC_ARNS};
use shared::admin;
use shared::backend::Backend;
use shared::config::{
    DeliveryConfig, QueueConfig, TableConfig, PUBLIC_URL, QUEUE_URL, SENDER, SES_CONFIGURATION_SET, TABLE_NAME, UNSUBSCRIBE_SECRET_ARN,
    UNSUBSCRIBE_SECRET_FROM_AWS_VARS,
};
use shared::domain::{AccountId, ApiKey, ApiKeyRecord, CampaignDefinition, Prospect, ProspectStatus, Provider, StatusReason, SystemClock};
use shared::ports::ProspectRef;

use crate::events::{
    assert_erase_body, assert_erased, assert_read_body, assert_status_changes, assert_webhook_body, created_prospect, first_step, is_erase,
    is_read, is_webhook, with_created_references, CREATED_PROSPECT_ID, EXPECTED, SNS_EVENTS, SQS_EVENTS, WEBHOOKS_SNS_TOPIC,
};
use crate::helpers::{create_queues, create_table, emulator_sdk_config, CAMPAIGN_FILE};

/// How each configuration reader called in a function's `main.rs` maps to the variables it reads.
const READERS: [(&str, &[&str]); 5] = [
    ("TableConfig::from_env", TableConfig::VARS),
    ("QueueConfig::from_env", QueueConfig::VARS),
    ("DeliveryConfig::from_env", DeliveryConfig::VARS),
    ("unsubscribe_secret_from_aws", UNSUBSCRIBE_SECRET_FROM_AWS_VARS),
    ("SnsVerifier::from_env", &[TOPIC_ARNS, CERT_DIR]),
];

/// Variables read that may be unset: the function starts without them (no SNS topic accepted;
/// SNS certificates fetched, not read from a folder). A template may leave them out.
const OPTIONAL: [&str; 2] = [TOPIC_ARNS, CERT_DIR];

const SENDER_VALUE: &str = "Acme <hello@acme.example>";
const PUBLIC_URL_VALUE: &str = "https://api.acme.example";

fn repo_root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn event_path(name: &str) -> PathBuf {
    repo_root().join("events").join(format!("{name}.json"))
}

fn read_event(name: &str) -> Value {
    let raw = std::fs::read_to_string(event_path(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    serde_json::from_str(&raw).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The function binary `name`, built into the same directory as `cadenhq`.
fn function_binary(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_cadenhq")).with_file_name(name);
    assert!(path.is_file(), "{} is not built: scripts/test runs `cargo build --workspace --bins` first", path.display());
    path
}

/// A function of `template.yaml`: its logical id, its `BuildProperties.Binary` (the folder in `functions/`)
/// and the names of the variables it sets.
struct TemplateFunction {
    logical_id: String,
    binary: String,
    variables: Vec<String>,
}

fn template_functions() -> Vec<TemplateFunction> {
    let text = std::fs::read_to_string(repo_root().join("template.yaml")).unwrap();
    let template: serde_norway::Value = serde_norway::from_str(&text).expect("template.yaml parses, short tags included");
    let resources = template["Resources"].as_mapping().expect("Resources");
    let mut functions: Vec<TemplateFunction> = resources
        .iter()
        .filter(|(_, r)| r["Type"].as_str() == Some("AWS::Serverless::Function"))
        .map(|(id, r)| {
            let variables = r["Properties"]["Environment"]["Variables"]
                .as_mapping()
                .map(|m| m.keys().filter_map(|k| k.as_str().map(str::to_owned)).collect())
                .unwrap_or_default();
            TemplateFunction {
                logical_id: id.as_str().unwrap().to_owned(),
                binary: r["Metadata"]["BuildProperties"]["Binary"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{id:?} has no Metadata.BuildProperties.Binary"))
                    .to_owned(),
                variables,
            }
        })
        .collect();
    functions.sort_by(|a, b| a.binary.cmp(&b.binary));
    functions
}

fn template_function(binary: &str) -> TemplateFunction {
    template_functions().into_iter().find(|f| f.binary == binary).unwrap_or_else(|| panic!("no function with Binary: {binary}"))
}

/// The function (`functions/` folder) an event belongs to, from its route or event source.
fn owner(event: &Value) -> &'static str {
    if event["Records"][0]["eventSource"] == "aws:sqs" {
        return "scheduler";
    }
    // SNS spells its record's fields in PascalCase.
    if event["Records"][0]["EventSource"] == "aws:sns" {
        return "feedback";
    }
    match event["routeKey"].as_str().unwrap_or_default().split_once(' ') {
        Some(("POST", path)) if path.starts_with("/webhooks/") => "webhooks",
        Some(("POST", "/api/v1/prospects")) => "prospects-post",
        Some(("PATCH", path)) if path.starts_with("/api/v1/prospects/") => "prospects-patch",
        Some(("GET", path)) if path.starts_with("/api/v1/prospects") => "prospects-read",
        Some(("DELETE", path)) if path.starts_with("/api/v1/prospects/") => "prospects-erase",
        Some((_, path)) if path.starts_with("/unsubscribe/") => "unsubscribe",
        _ => panic!("no function owns {event}"),
    }
}

/// A fresh table, queue and unsubscribe secret in the emulator, with the account and key the
/// events carry and a default campaign; returns each template variable's value, the backend on
/// them and the account.
async fn emulated_environment() -> (BTreeMap<&'static str, String>, Backend, AccountId) {
    let sdk = emulator_sdk_config().await;
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let table = format!("lambda-{suffix}");
    create_table(&sdk, &table).await;
    let queue_url = create_queues(&sdk, &format!("lambda-{suffix}")).await.url;
    let secret_arn = aws_sdk_secretsmanager::Client::new(&sdk)
        .create_secret()
        .name(format!("lambda-{suffix}"))
        .secret_string("s".repeat(64))
        .send()
        .await
        .expect("create secret")
        .arn
        .expect("secret arn");
    let configuration_set = format!("lambda-{suffix}");
    aws_sdk_sesv2::Client::new(&sdk)
        .create_configuration_set()
        .configuration_set_name(&configuration_set)
        .send()
        .await
        .expect("create the configuration set");

    let backend = Backend::aws(&sdk, &table, Some(&queue_url));
    let account = admin::create_account(backend.admin.as_ref(), "Events", &SystemClock).await.unwrap();
    let events_key = read_event("post-prospect-created")["headers"]["x-cadenhq-key"].as_str().expect("the events' key").to_owned();
    let record = ApiKeyRecord::new(&ApiKey::from_raw(&events_key), account.id, None, time::OffsetDateTime::now_utc());
    backend.admin.create_key(&record).await.unwrap();
    let campaign = CampaignDefinition::parse(CAMPAIGN_FILE).unwrap();
    admin::create_campaign(backend.admin.as_ref(), account.id, campaign, true, &SystemClock).await.unwrap();

    let values = BTreeMap::from([
        (TABLE_NAME, table),
        (QUEUE_URL, queue_url),
        (SENDER, SENDER_VALUE.to_owned()),
        (PUBLIC_URL, PUBLIC_URL_VALUE.to_owned()),
        (UNSUBSCRIBE_SECRET_ARN, secret_arn),
        (SES_CONFIGURATION_SET, configuration_set),
        (TOPIC_ARNS, WEBHOOKS_SNS_TOPIC.to_owned()),
    ]);
    (values, backend, account.id)
}

/// The variables the template sets for `binary`, with their values from `values`.
fn template_env<'a>(binary: &str, values: &'a BTreeMap<&'static str, String>) -> Vec<(&'static str, &'a str)> {
    template_function(binary)
        .variables
        .iter()
        .map(|v| {
            let (name, value) = values.get_key_value(v.as_str()).unwrap_or_else(|| panic!("no test value for {v}"));
            (*name, value.as_str())
        })
        .collect()
}

/// Runs `cadenhq invoke --json` on `binary` with `env` and `events`; returns the output and
/// its JSON lines.
fn invoke(binary: &str, env: &[(&str, &str)], events: &[PathBuf], with_template: bool) -> (Output, Vec<Value>) {
    let function = template_function(binary);
    let mut command = Command::new(env!("CARGO_BIN_EXE_cadenhq"));
    command.args(["invoke", "--json", "--function"]).arg(function_binary(binary));
    if with_template {
        command.arg("--env-from-template").arg(repo_root().join("template.yaml")).args(["--logical-id", &function.logical_id]);
    }
    for event in events {
        command.arg("--event").arg(event);
    }
    for (name, value) in env {
        command.arg("--env").arg(format!("{name}={value}"));
    }
    let output = command.output().expect("run cadenhq invoke");
    let lines = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    (output, lines)
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The summary line closing a successful run.
fn summary(lines: &[Value]) -> &Value {
    let last = lines.last().expect("output");
    assert_eq!(last["kind"], "summary", "{last}");
    last
}

/// Checks one HTTP answer: the status events.rs documents and the body's shape; for a GET or
/// DELETE event, the body events.rs checks against `read`, the prospect the GET events read and
/// the DELETE events erase.
fn assert_http_answer(name: &str, expected: u16, payload: &Value, read: Option<&Prospect>) {
    assert_eq!(payload["statusCode"], expected, "{name}: {payload}");
    let content_type = payload["headers"]["content-type"].as_str().unwrap_or_default();
    if content_type.starts_with("text/html") {
        assert!(name.starts_with("unsubscribe-page"), "{name}: only the unsubscribe page is HTML");
        return;
    }
    assert_eq!(content_type, "application/json", "{name}: {payload}");
    let body: Value = serde_json::from_str(payload["body"].as_str().unwrap_or_default()).unwrap_or_else(|e| panic!("{name}: {e}"));
    if is_read(name) {
        return assert_read_body(name, expected, &body, read.unwrap_or_else(|| panic!("{name}: the prospect it reads")));
    }
    if is_erase(name) {
        return assert_erase_body(name, expected, &body, read.unwrap_or_else(|| panic!("{name}: the prospect it erases")));
    }
    if is_webhook(name) {
        return assert_webhook_body(name, expected, &body);
    }
    match expected {
        200 | 201 => assert_eq!(body["accepted"], true, "{name}: {body}"),
        422 => assert!(body["errors"].is_array(), "{name}: {body}"),
        _ => assert!(body["error"].is_string(), "{name}: {body}"),
    }
}

/// What an event must get back.
enum Expected {
    /// The HTTP status (events.rs `EXPECTED`).
    Status(u16),
    /// The SQS message ids reported failed (events.rs `SQS_EVENTS`).
    Failures(&'static [&'static str]),
    /// An SNS event: handled (no error, so no retry), with the status change it makes to a `new`
    /// prospect, if any (events.rs `SNS_EVENTS`).
    Feedback(Option<(ProspectStatus, StatusReason)>),
}

/// Every event `binary` owns, in the order events.rs runs them, with what it must get back.
fn events_of(binary: &str) -> Vec<(&'static str, Expected)> {
    let http = EXPECTED.iter().map(|(name, status)| (*name, Expected::Status(*status)));
    let sqs = SQS_EVENTS.iter().map(|(name, ids)| (*name, Expected::Failures(ids)));
    let sns = SNS_EVENTS.iter().map(|(name, _, change)| (*name, Expected::Feedback(*change)));
    http.chain(sqs).chain(sns).filter(|(name, _)| owner(&read_event(name)) == binary).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_function_binary_answers_its_events_as_documented_from_one_warm_process() {
    let (values, backend, account) = emulated_environment().await;
    // POST, then PATCH, then GET, then the SES notifications, then DELETE (which erases the
    // prospect the others change and read): the events run in the order events.rs gives,
    // against one table.
    let binaries = ["prospects-post", "prospects-patch", "prospects-read", "feedback", "prospects-erase", "unsubscribe", "scheduler", "webhooks"];
    let mut all: Vec<String> = template_functions().into_iter().map(|f| f.binary).collect();
    all.sort();
    let mut run: Vec<&str> = binaries.to_vec();
    run.sort_unstable();
    assert_eq!(run, all, "every function of the template runs its events here");
    let mut erased = None;
    for binary in binaries {
        let expected = events_of(binary);
        assert!(!expected.is_empty(), "{binary} has events");
        let env = template_env(binary, &values);
        // The GET events read (and the SES notifications name, and the DELETE events erase) the
        // prospect the POST event created, as the PATCH events left it; the ones naming it get
        // its ids in a copy of the event.
        let read = if matches!(binary, "prospects-read" | "feedback" | "prospects-erase") {
            Some(created_prospect(backend.repo.as_ref(), account).await)
        } else {
            None
        };
        let copies = tempfile::tempdir().unwrap();
        let events: Vec<PathBuf> = expected
            .iter()
            .map(|(name, _)| {
                let raw = std::fs::read_to_string(event_path(name)).unwrap();
                match &read {
                    Some(prospect) if raw.contains(CREATED_PROSPECT_ID) => {
                        let copy = copies.path().join(format!("{name}.json"));
                        std::fs::write(&copy, with_created_references(&raw, prospect)).unwrap();
                        copy
                    }
                    _ => event_path(name),
                }
            })
            .collect();

        let (output, lines) = invoke(binary, &env, &events, true);

        assert!(output.status.success(), "{binary}: {}", stderr(&output));
        let answers: Vec<&Value> = lines.iter().filter(|l| l["kind"] != "summary").collect();
        assert_eq!(answers.len(), expected.len(), "{binary}: one answer per event");
        for (answer, (name, expected)) in answers.iter().zip(&expected) {
            assert!(answer["event"].as_str().unwrap_or_default().ends_with(&format!("{name}.json")), "{answer}");
            assert_eq!(answer["kind"], "response", "{name}: {answer}");
            match expected {
                Expected::Status(status) => assert_http_answer(name, *status, &answer["payload"], read.as_ref()),
                Expected::Failures(bad_ids) => {
                    let failures = answer["payload"]["batchItemFailures"].as_array().unwrap_or_else(|| panic!("{name}: {answer}"));
                    let ids: Vec<&str> = failures.iter().filter_map(|f| f["itemIdentifier"].as_str()).collect();
                    assert_eq!(ids, *bad_ids, "{name}");
                }
                Expected::Feedback(_) => assert!(answer["payload"].is_null(), "{name}: {answer}"),
            }
        }
        if binary == "feedback" {
            // One after the other on the prospect as the PATCH events left it: exactly the
            // changes of the events that make one, in order.
            let changes: Vec<_> = expected.iter().filter_map(|(_, e)| if let Expected::Feedback(change) = e { *change } else { None }).collect();
            let before = read.as_ref().expect("the prospect the SES notifications name");
            let after = created_prospect(backend.repo.as_ref(), account).await;
            assert_status_changes(binary, before, &after, &changes);
        }
        let summary = summary(&lines);
        assert_eq!(summary["starts"], 1, "{binary}: one process");
        assert_eq!(summary["invocations"], expected.len(), "{binary}");
        assert_eq!(summary["polls"], expected.len() + 1, "{binary}: one init, then a poll after every answer");
        assert!(summary["init_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{summary}");
        assert!(summary["peak_rss_kb"].as_u64().is_some_and(|kb| kb > 0), "{summary}");
        if binary == "prospects-erase" {
            erased = read;
        }
    }
    assert_erased(backend.repo.as_ref(), account, &erased.expect("the DELETE events ran")).await;

    let sdk = emulator_sdk_config().await;
    let queued = aws_sdk_sqs::Client::new(&sdk)
        .receive_message()
        .queue_url(&values[QUEUE_URL])
        .max_number_of_messages(10)
        .send()
        .await
        .unwrap()
        .messages
        .unwrap_or_default();
    assert_eq!(queued.len(), 1, "the created prospect's first campaign job, published by the POST function");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_ses_notification_makes_its_change_to_the_new_prospect_it_names_and_a_store_failure_fails_the_invocation() {
    let (values, backend, account) = emulated_environment().await;
    let (output, lines) = invoke("prospects-post", &template_env("prospects-post", &values), &[event_path("post-prospect-created")], true);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(lines[0]["payload"]["statusCode"], 201, "{}", lines[0]);
    let prospect = created_prospect(backend.repo.as_ref(), account).await;
    let address = prospect.email.as_str().to_owned();
    let mut env = template_env("feedback", &values);
    // Whatever is logged, the address a notification names is not.
    env.push(("RUST_LOG", "trace"));
    let copies = tempfile::tempdir().unwrap();
    let copy_of = |name: &str| {
        let copy = copies.path().join(format!("{name}.json"));
        std::fs::write(&copy, with_created_references(&std::fs::read_to_string(event_path(name)).unwrap(), &prospect)).unwrap();
        copy
    };

    for (name, _, change) in SNS_EVENTS {
        // Each from a `new` prospect: what the one event does, whatever ran before it.
        let now = time::OffsetDateTime::now_utc();
        backend.repo.set_status(account, &ProspectRef::Id(prospect.id), ProspectStatus::New, StatusReason::Api, now).await.unwrap();
        let before = created_prospect(backend.repo.as_ref(), account).await;

        let (output, lines) = invoke("feedback", &env, &[copy_of(name)], true);

        assert!(output.status.success(), "{name}: {}", stderr(&output));
        assert_eq!(lines[0]["kind"], "response", "{name}: handled, not failed (so not run again): {}", lines[0]);
        let after = created_prospect(backend.repo.as_ref(), account).await;
        assert_status_changes(name, &before, &after, change.as_slice());
        assert_eq!(backend.sends.send_record(first_step(&prospect)).await.unwrap(), None, "{name}: no send record is made");
        assert!(!stderr(&output).to_lowercase().contains(&address), "{name}: the function's output carries the address");
    }

    // The table is not there: the notification is not applied, and the invocation fails, so
    // Lambda runs it again; the next event (not one to apply) is handled by the same process.
    let missing = [(TABLE_NAME, "lambda-no-such-table")];
    let events = [copy_of("feedback-permanent-bounce"), event_path("feedback-not-an-ses-notification")];
    let (output, lines) = invoke("feedback", &missing, &events, false);

    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(lines[0]["kind"], "error", "{}", lines[0]);
    let report = &lines[0]["payload"];
    assert_eq!(report["errorType"], "StoreError", "{report}");
    // The cause, for the dead-letter queue's message and the log.
    let message = report["errorMessage"].as_str().unwrap_or_default();
    assert!(message.starts_with("backend failure: ") && message.contains("ResourceNotFound"), "{report}");
    let logs = stderr(&output);
    assert!(logs.lines().any(|l| l.contains(r#""level":"ERROR""#) && l.contains("ResourceNotFound")), "the failure is logged: {logs}");
    assert_eq!(lines[1]["kind"], "response", "{}", lines[1]);
}

/// A `Stripe-Signature` header for `body` signed at `t` (Unix seconds) with `secret`, as
/// Stripe makes it: `t=<t>,v1=<hex HMAC-SHA256 of "<t>.<body>">`, keyed by the whole `whsec_`
/// secret.
pub(crate) fn stripe_signature(secret: &str, t: i64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(format!("{t}.{body}").as_bytes());
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_stripe_payment_converts_the_prospect_it_names_once_through_the_webhooks_function() {
    let (values, backend, account) = emulated_environment().await;
    let (output, lines) = invoke("prospects-post", &template_env("prospects-post", &values), &[event_path("post-prospect-created")], true);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(lines[0]["payload"]["statusCode"], 201, "{}", lines[0]);
    let before = created_prospect(backend.repo.as_ref(), account).await;
    let secret = "whsec_lambda0123456789abcdefghijklmnop";
    let integration =
        admin::create_integration(backend.admin.as_ref(), backend.integrations.as_ref(), account, Provider::Stripe, secret, &SystemClock).await.unwrap();
    // The unknown-endpoint event (its payment names the created prospect's external_id), sent to
    // this endpoint and signed now with its secret.
    let mut event = read_event("webhooks-stripe-unknown-endpoint");
    let path = format!("/webhooks/stripe/{}", integration.id);
    event["rawPath"] = Value::String(path.clone());
    event["requestContext"]["http"]["path"] = Value::String(path);
    event["pathParameters"]["endpoint_id"] = Value::String(integration.id.to_string());
    let body = event["body"].as_str().expect("a body").to_owned();
    let signature = stripe_signature(secret, time::OffsetDateTime::now_utc().unix_timestamp(), &body);
    event["headers"]["stripe-signature"] = Value::String(signature);
    let dir = tempfile::tempdir().unwrap();
    let signed = dir.path().join("webhooks-stripe-signed.json");
    std::fs::write(&signed, event.to_string()).unwrap();

    // Delivered twice, as Stripe retries.
    let (output, lines) = invoke("webhooks", &template_env("webhooks", &values), &[signed.clone(), signed], true);

    assert!(output.status.success(), "{}", stderr(&output));
    let stripe_event: Value = serde_json::from_str(&body).unwrap();
    for (line, outcome) in lines.iter().take(2).zip(["applied", "duplicate"]) {
        assert_eq!(line["payload"]["statusCode"], 200, "{line}");
        let answer: Value = serde_json::from_str(line["payload"]["body"].as_str().unwrap_or_default()).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(answer["received"], true, "{answer}");
        assert_eq!(answer["events"][0]["id"], stripe_event["id"], "{answer}");
        assert_eq!(answer["events"][0]["type"], "checkout.session.completed", "{answer}");
        assert_eq!(answer["events"][0]["outcome"], outcome, "{answer}");
    }
    let after = created_prospect(backend.repo.as_ref(), account).await;
    assert_status_changes("a Stripe payment delivered twice", &before, &after, &[(ProspectStatus::Converted, StatusReason::Payment)]);
}

#[test]
fn the_webhooks_function_with_an_sns_certificate_folder_it_cannot_read_fails_init_saying_so() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-folder");
    let missing = missing.to_str().unwrap();
    let env = [(TABLE_NAME, "unused"), (TOPIC_ARNS, WEBHOOKS_SNS_TOPIC), (CERT_DIR, missing)];

    let (output, lines) = invoke("webhooks", &env, &[event_path("webhooks-ses-unsigned")], false);

    assert!(!output.status.success(), "exits non-zero");
    let report = lines.last().expect("a report");
    assert_eq!(report["kind"], "init_error", "{report}");
    let log = report["log"].to_string();
    assert!(log.contains("SNS certificate folder") && log.contains(missing), "the function's output says why: {report}");
}

#[test]
fn a_handler_error_is_reported_to_the_runtime_api_and_the_process_serves_the_next_event() {
    let dir = tempfile::tempdir().unwrap();
    let not_an_api_event = dir.path().join("not-an-api-gateway-event.json");
    std::fs::write(&not_an_api_event, r#"{"foo": 1}"#).unwrap();
    let env = [(TABLE_NAME, "unused"), (QUEUE_URL, "http://127.0.0.1:9/000000000000/unused")];

    let (output, lines) = invoke("prospects-post", &env, &[not_an_api_event, event_path("post-prospect-missing-key")], false);

    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(lines[0]["kind"], "error", "{}", lines[0]);
    assert!(lines[0]["payload"]["errorType"].is_string() && lines[0]["payload"]["errorMessage"].is_string(), "{}", lines[0]);
    assert_eq!(lines[1]["kind"], "response", "{}", lines[1]);
    assert_eq!(lines[1]["payload"]["statusCode"], 401, "{}", lines[1]);
    let summary = summary(&lines);
    assert_eq!((summary["starts"].as_u64(), summary["polls"].as_u64()), (Some(1), Some(3)), "{summary}");
}

#[test]
fn a_function_started_without_a_variable_its_template_sets_fails_init_naming_it() {
    let values = BTreeMap::from([
        (TABLE_NAME, "unused"),
        (QUEUE_URL, "http://127.0.0.1:9/000000000000/unused"),
        (SENDER, SENDER_VALUE),
        (PUBLIC_URL, PUBLIC_URL_VALUE),
        (UNSUBSCRIBE_SECRET_ARN, "arn:aws:secretsmanager:us-east-1:000000000000:secret:unused"),
        (SES_CONFIGURATION_SET, "unused"),
        (TOPIC_ARNS, WEBHOOKS_SNS_TOPIC),
    ]);
    for function in template_functions() {
        let (event, _) = events_of(&function.binary).into_iter().next().expect("the function has an event");
        for missing in &function.variables {
            let env: Vec<(&str, &str)> =
                function.variables.iter().filter(|v| *v != missing).map(|v| (v.as_str(), values[v.as_str()])).collect();

            let (output, lines) = invoke(&function.binary, &env, &[event_path(event)], false);

            let what = format!("{} without {missing}", function.binary);
            if OPTIONAL.contains(&missing.as_str()) {
                assert!(output.status.success(), "{what}: starts: {}", stderr(&output));
                assert_eq!(lines[0]["kind"], "response", "{what}: answers its event: {}", lines[0]);
                continue;
            }
            assert!(!output.status.success(), "{what}: exits non-zero");
            let report = lines.last().unwrap_or_else(|| panic!("{what}: a report"));
            assert_eq!(report["kind"], "init_error", "{what}: {report}");
            assert!(report["log"].to_string().contains(missing.as_str()), "{what}: the function's output names it: {report}");
            let message = stderr(&output).lines().last().unwrap_or_default().to_owned();
            assert!(message.starts_with("error: ") && message.contains(missing.as_str()), "{what}: {message}");
        }
    }
}

#[test]
fn invoke_names_a_template_variable_it_has_no_value_for() {
    let (output, lines) = invoke("prospects-patch", &[], &[event_path("patch-prospect-missing-key")], true);

    assert!(!output.status.success());
    assert!(lines.is_empty(), "nothing was started");
    let message = stderr(&output);
    assert_eq!(message.lines().count(), 1, "{message}");
    assert!(message.contains(TABLE_NAME) && message.contains("--env"), "{message}");
}

/// The `shared::config` readers `main.rs` calls, each as written (`TableConfig::from_env`).
fn readers_called(main_rs: &str) -> Vec<String> {
    let mut calls = Vec::new();
    for pattern in ["from_env(", "_from_aws("] {
        for (at, _) in main_rs.match_indices(pattern) {
            let start = main_rs[..at].rfind(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')).map_or(0, |i| i + 1);
            calls.push(main_rs[start..at + pattern.len() - 1].to_owned());
        }
    }
    calls
}

#[test]
fn every_variable_a_function_reads_is_set_in_its_template_function_and_every_one_set_is_read() {
    let functions = template_functions();
    let mut folders: Vec<String> = std::fs::read_dir(repo_root().join("functions"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    folders.sort();
    assert_eq!(functions.iter().map(|f| f.binary.clone()).collect::<Vec<_>>(), folders, "one template function per folder");

    for function in &functions {
        let main_rs = std::fs::read_to_string(repo_root().join("functions").join(&function.binary).join("src/main.rs")).unwrap();
        assert!(!main_rs.contains("env::var"), "{}: variables are read through shared::config only", function.binary);
        let mut reads: Vec<&str> = Vec::new();
        for call in readers_called(&main_rs) {
            let (_, vars) = READERS
                .iter()
                .find(|(reader, _)| call.ends_with(reader))
                .unwrap_or_else(|| panic!("{}: {call} reads variables this test does not know: add it to READERS", function.binary));
            reads.extend(vars.iter());
        }
        reads.sort_unstable();
        reads.dedup();
        let mut set: Vec<&str> = function.variables.iter().map(String::as_str).collect();
        set.sort_unstable();
        // A variable that may be unset is set or not, as the template chooses.
        reads.retain(|v| !OPTIONAL.contains(v) || set.contains(v));

        assert_eq!(reads, set, "{} ({}): variables read by main.rs vs set in template.yaml", function.binary, function.logical_id);
    }
}

#[test]
fn the_claim_lease_outlasts_a_scheduler_invocation_and_ends_before_sqs_redelivers() {
    let text = std::fs::read_to_string(repo_root().join("template.yaml")).unwrap();
    let template: serde_norway::Value = serde_norway::from_str(&text).unwrap();
    let seconds = |v: &serde_norway::Value| v.as_i64().expect("a number of seconds");
    let function_timeout = seconds(&template["Resources"]["SchedulerFunction"]["Properties"]["Timeout"]);
    let visibility_timeout = seconds(&template["Resources"]["CampaignJobsQueue"]["Properties"]["VisibilityTimeout"]);
    let lease = shared::scheduler::CLAIM_LEASE.whole_seconds();
    assert!(function_timeout < lease, "a claim outlives the invocation that made it ({function_timeout} s >= {lease} s)");
    assert!(lease < visibility_timeout, "a redelivered job finds its claim past the lease ({lease} s >= {visibility_timeout} s)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_rust_log_trace_a_function_prints_neither_the_key_nor_the_email_of_its_event() {
    let (values, ..) = emulated_environment().await;
    let function = template_function("prospects-post");
    let mut env: Vec<(&str, &str)> = function.variables.iter().map(|v| (v.as_str(), values[v.as_str()].as_str())).collect();
    env.push(("RUST_LOG", "trace"));
    let event = read_event("post-prospect-created");
    let key = event["headers"]["x-cadenhq-key"].as_str().expect("the event's key").to_owned();
    let body: Value = serde_json::from_str(event["body"].as_str().expect("a JSON body")).expect("a JSON body");
    let email = body["email"].as_str().expect("the event's email").to_owned();

    let (output, lines) = invoke("prospects-post", &env, &[event_path("post-prospect-created")], true);

    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(lines[0]["payload"]["statusCode"], 201, "{}", lines[0]);
    let logs = stderr(&output);
    assert!(logs.contains(r#""name":"upsert""#), "RUST_LOG=trace is in effect: the upsert's debug span is logged: {logs}");
    for secret in [key.as_str(), email.as_str(), &email.to_lowercase()] {
        assert!(!logs.contains(secret), "the function's output carries {secret:?}");
    }
}
