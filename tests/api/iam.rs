//! Each function's IAM actions in `template.yaml` against the AWS calls its code can make, both
//! ways: nothing missing, nothing extra. Five tables say what the code can call, and tests keep
//! each of them honest:
//!
//! - [`ADAPTER_ACTIONS`]: the IAM actions each port method of the AWS adapters needs, from the
//!   requests it sends (a `TransactWriteItems` needs the action of each item it holds, a
//!   `SendMessageBatch` needs `sqs:SendMessage`, an SES v2 `SendEmail` with raw content needs
//!   `ses:SendRawEmail` as well as `ses:SendEmail`).
//! - [`FUNCTIONS`]: per function, what its `main.rs` wires (checked against the source) and the
//!   port methods that wiring can call.
//! - [`SQS_EVENT_SOURCE_ACTIONS`]: what Lambda's SQS poller does with the function's role.
//! - [`ADAPTER_PARTITIONS`]: for an action a function is granted on some partitions of the table
//!   only (a `dynamodb:LeadingKeys` condition), the partitions each port method's requests of
//!   that action name.
//! - [`DEAD_LETTER_QUEUE_ACTIONS`]: what Lambda does with the role of a function SNS invokes
//!   when an invocation has failed for the last time.
//!
//! `template_iam_actions_are_exactly_what_each_function_can_call` compares the template (inline
//! policy statements, and what SAM adds for each event: nothing on the role for `HttpApi` or
//! `SNS`; a managed policy on every queue for `SQS`, which it refuses; and for a
//! `DeadLetterQueue`, `sqs:SendMessage` on that queue) with the tables, and checks every
//! statement's resource; a statement's condition may only be a `dynamodb:LeadingKeys` one,
//! whose partitions must be exactly those the function's rows name for its actions.
//! `each_function_calls_only_and_all_of_the_actions_its_rows_list` runs each function's wiring
//! against the emulator through every path of its rows, with SDK clients whose interceptor
//! records the IAM action and the partition (`pk` prefix) of each request, and requires the
//! actions recorded to be exactly the tables' (except the secret read, whose client
//! `shared::config` builds itself: it runs against the emulator in `lambda.rs`), and the
//! partitions of each partition-limited action exactly its rows'. A port method added to a
//! function without a row, a row left behind, or an adapter that starts sending another request
//! (or one to another partition) fails one of them; a change of what the code calls is a change
//! of rows, not of these tests.
//! SAM's own `AWSLambdaBasicExecutionRole` (CloudWatch Logs) is the runtime's, not the code's.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use aws_sdk_dynamodb::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_dynamodb::error::BoxError;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::json;
use serde_norway::Value;
use shared::adapters::dynamodb::DynamoStore;
use shared::adapters::ses::SesMailer;
use shared::adapters::sns::handle_feedback;
use shared::adapters::sns_http::{HttpsGet, ReqwestGet, SnsVerifier};
use shared::adapters::sqs::SqsQueue;
use shared::admin;
use shared::backend::Backend;
use shared::domain::{CampaignDefinition, Clock, EmailReference, ExternalId, ProspectStatus, Provider, SendKey, SendState, SystemClock};
use shared::feedback::FeedbackOutcome;
use shared::http::{router, webhooks_router, Routes, KEY_HEADER};
use shared::ports::{Mailer, ProspectRef};
use shared::adapters::sqs::handle_batch;
use shared::scheduler::{DeliverySettings, Scheduler};
use shared::webhooks::WebhookService;

use crate::feedback::{bounce, ses_notification, Naming};
use crate::helpers::{
    create_queues, create_table, emulator_sdk_config, sign, sns_test_signer, test_secret, MailFault, ModelSqsDelays, RecordingMailer, CAMPAIGN_FILE,
    SNS_TEST_TOPIC,
};
use crate::lambda::stripe_signature;
use crate::template::{resource, template};

/// The IAM actions each port method of the AWS adapters needs.
const ADAPTER_ACTIONS: &[(&str, &[&str])] = &[
    // DynamoStore (shared/src/adapters/dynamodb/)
    ("ProspectRepository::upsert_context", &["dynamodb:BatchGetItem"]),
    // A transaction of conditional Puts: the prospect and its pointers.
    ("ProspectRepository::insert", &["dynamodb:PutItem"]),
    // A conditional PutItem; with a new external_id, a transaction that also Deletes the old pointer.
    ("ProspectRepository::update", &["dynamodb:PutItem", "dynamodb:DeleteItem"]),
    // The pointer's GetItem, then the UpdateItem.
    ("ProspectRepository::set_status", &["dynamodb:GetItem", "dynamodb:UpdateItem"]),
    ("ProspectRepository::find", &["dynamodb:GetItem"]),
    // The pointer's GetItem (or the prospect item's, for a pointer naming no sibling, and
    // after a failed condition), then one transaction: Deletes of the prospect item and its
    // pointers, the Put of the suppression entry.
    ("ProspectRepository::erase", &["dynamodb:GetItem", "dynamodb:DeleteItem", "dynamodb:PutItem"]),
    // One Query per shard of the listing index.
    ("ProspectRepository::list", &["dynamodb:Query"]),
    ("KeyStore::find_key", &["dynamodb:GetItem"]),
    ("KeyStore::touch_key", &["dynamodb:UpdateItem"]),
    // A conditional PutItem; GetItem when a failed condition does not return the old item.
    ("IdempotencyStore::begin", &["dynamodb:PutItem", "dynamodb:GetItem"]),
    ("IdempotencyStore::finish", &["dynamodb:UpdateItem"]),
    ("IdempotencyStore::abandon", &["dynamodb:DeleteItem"]),
    // DynamoRateLimiter: a conditional UpdateItem; GetItem when a failed condition does not
    // return the old item.
    ("RateLimiter::check", &["dynamodb:UpdateItem", "dynamodb:GetItem"]),
    // One transaction: condition checks on the prospect and the campaign, the claim's Put;
    // GetItem when a failed condition does not return the old record.
    ("SendLog::claim_send", &["dynamodb:ConditionCheckItem", "dynamodb:PutItem", "dynamodb:GetItem"]),
    // One transaction: the conditional Update of the send record and the prospect's progress;
    // for a `sent` one, the Put of the provider's message id's item.
    ("SendLog::record_send", &["dynamodb:UpdateItem", "dynamodb:PutItem"]),
    ("SendLog::send_record", &["dynamodb:GetItem"]),
    ("AdminStore::get_campaign", &["dynamodb:GetItem"]),
    // The prospect and step an SES message id was sent for: a GetItem.
    ("FeedbackLog::sent_email", &["dynamodb:GetItem"]),
    // A bounce or complaint: one transaction, the Put of what was applied and the prospect's
    // status Update. A transient bounce: the GetItem of the address's recent ones, then one
    // transaction: the same Put, the prospect's ConditionCheck (or its status Update, at the
    // limit) and the Put of the recent ones.
    ("FeedbackLog::apply_feedback", &["dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:ConditionCheckItem"]),
    // A conditional UpdateItem of the send record.
    ("FeedbackLog::record_delivery", &["dynamodb:UpdateItem"]),
    // Webhook endpoints and the events received through them: a GetItem of the endpoint, of an
    // event taken, and the PutItem of each receipt.
    ("IntegrationStore::find_integration", &["dynamodb:GetItem"]),
    ("IntegrationStore::event_taken", &["dynamodb:GetItem"]),
    ("IntegrationStore::record_event", &["dynamodb:PutItem"]),
    // SqsQueue (shared/src/adapters/sqs.rs): SendMessage, SendMessageBatch.
    ("JobQueue::publish", &["sqs:SendMessage"]),
    ("JobQueue::publish_batch", &["sqs:SendMessage"]),
    // SesMailer (shared/src/adapters/ses.rs): SES v2 SendEmail with raw content.
    ("Mailer::send", &["ses:SendEmail", "ses:SendRawEmail"]),
    // shared::config: the unsubscribe signing secret, once per cold start.
    ("unsubscribe_secret_from_aws", &["secretsmanager:GetSecretValue"]),
];

/// For the actions a function's template grants on some partitions of the table only, the
/// partitions (`pk` up to its first `#`, as in the item table of
/// `shared/src/adapters/dynamodb/mod.rs`) each port method's requests of that action name.
const ADAPTER_PARTITIONS: &[(&str, &str, &[&str])] = &[
    // The key's `last_used_at`.
    ("KeyStore::touch_key", "dynamodb:UpdateItem", &["KEY#"]),
    // The key's bucket.
    ("RateLimiter::check", "dynamodb:UpdateItem", &["RATE#"]),
    // The prospect item and its id and external_id pointers.
    ("ProspectRepository::erase", "dynamodb:DeleteItem", &["PROSPECT#", "PID#", "EXT#"]),
    // The erased address's suppression entry.
    ("ProspectRepository::erase", "dynamodb:PutItem", &["SUPPRESS#"]),
    // The provider's message id's item, written with the `sent` send record.
    ("FeedbackLog::sent_email", "dynamodb:GetItem", &["MSG#"]),
    // The address's recent transient bounces.
    ("FeedbackLog::apply_feedback", "dynamodb:GetItem", &["BOUNCES#"]),
    // What was applied (once per notification and address), and the recent transient bounces.
    ("FeedbackLog::apply_feedback", "dynamodb:PutItem", &["FEEDBACK#", "BOUNCES#"]),
    // The prospect item: its status write, or the check that it is the prospect named.
    ("FeedbackLog::apply_feedback", "dynamodb:UpdateItem", &["PROSPECT#"]),
    ("FeedbackLog::apply_feedback", "dynamodb:ConditionCheckItem", &["PROSPECT#"]),
    // The send record.
    ("FeedbackLog::record_delivery", "dynamodb:UpdateItem", &["SEND#"]),
    // The bucket, read after a failed write that did not return it (it had expired).
    ("RateLimiter::check", "dynamodb:GetItem", &["RATE#"]),
    // The id or external_id pointer, then the prospect item (an address names the item itself).
    ("ProspectRepository::find", "dynamodb:GetItem", &["PID#", "EXT#", "PROSPECT#"]),
    // The id or external_id pointer, then the prospect item's status write.
    ("ProspectRepository::set_status", "dynamodb:GetItem", &["PID#", "EXT#"]),
    ("ProspectRepository::set_status", "dynamodb:UpdateItem", &["PROSPECT#"]),
    // The endpoint.
    ("IntegrationStore::find_integration", "dynamodb:GetItem", &["INTEGRATION#"]),
    // The event taken, by its provider, account and id.
    ("IntegrationStore::event_taken", "dynamodb:GetItem", &["EVENT#"]),
    // An event taken (applied, unmatched, ignored), or any other receipt.
    ("IntegrationStore::record_event", "dynamodb:PutItem", &["EVENT#", "RECEIVED#"]),
];

/// What Lambda's SQS event source mapping does with the function's role, on its queue
/// (AWS Lambda Developer Guide, "Using Lambda with Amazon SQS": execution role permissions).
const SQS_EVENT_SOURCE_ACTIONS: &[&str] = &["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes"];

/// What Lambda does with the role of a function invoked asynchronously (by an SNS event) when
/// an invocation has failed its last attempt: it sends the event to the function's dead-letter
/// queue (AWS Lambda Developer Guide, "Asynchronous invocation": dead-letter queues). SAM grants
/// exactly this, on that queue only, for a function's `DeadLetterQueue` (its
/// `DeadLetterQueuePolicy`): an SNS function without one misses it, and one with a queue but no
/// asynchronous event has it extra.
const DEAD_LETTER_QUEUE_ACTIONS: &[&str] = &["sqs:SendMessage"];

/// The pieces of wiring a function's `main.rs` may use, as written there.
const WIRING: &[&str] = &[
    "Routes::Upsert",
    "Routes::Status",
    "Routes::Read",
    "Routes::Erase",
    "Routes::Unsubscribe",
    "QueueConfig::from_env",
    "unsubscribe_secret_from_aws",
    "SesMailer::from_sdk_config",
    "handle_batch",
    "handle_feedback",
    "webhooks_router",
];

/// A function: its `functions/` folder, what its `main.rs` wires, and the port methods that
/// wiring can call.
struct Function {
    binary: &'static str,
    wires: &'static [&'static str],
    calls: &'static [&'static str],
}

/// The POST function: admission (key lookup, last use, rate limit, Idempotency-Key), then the upsert
/// and its first campaign job.
const POST_CALLS: &[&str] = &[
    "KeyStore::find_key",
    "KeyStore::touch_key",
    "RateLimiter::check",
    "IdempotencyStore::begin",
    "IdempotencyStore::finish",
    "IdempotencyStore::abandon",
    "ProspectRepository::upsert_context",
    "ProspectRepository::insert",
    "ProspectRepository::update",
    "JobQueue::publish",
];

/// The PATCH function: admission, then the status change.
const PATCH_CALLS: &[&str] = &[
    "KeyStore::find_key",
    "KeyStore::touch_key",
    "RateLimiter::check",
    "IdempotencyStore::begin",
    "IdempotencyStore::finish",
    "IdempotencyStore::abandon",
    "ProspectRepository::set_status",
];

/// The GET function: admission without an Idempotency-Key, then the prospect and the campaign of
/// each of its enrollments.
const READ_CALLS: &[&str] =
    &["KeyStore::find_key", "KeyStore::touch_key", "RateLimiter::check", "ProspectRepository::find", "ProspectRepository::list", "AdminStore::get_campaign"];

/// The DELETE function: admission without an Idempotency-Key, then the erasure.
const ERASE_CALLS: &[&str] = &["KeyStore::find_key", "KeyStore::touch_key", "RateLimiter::check", "ProspectRepository::erase"];

const FUNCTIONS: &[Function] = &[
    Function { binary: "prospects-post", wires: &["Routes::Upsert", "QueueConfig::from_env"], calls: POST_CALLS },
    Function { binary: "prospects-patch", wires: &["Routes::Status"], calls: PATCH_CALLS },
    Function { binary: "prospects-read", wires: &["Routes::Read"], calls: READ_CALLS },
    Function { binary: "prospects-erase", wires: &["Routes::Erase"], calls: ERASE_CALLS },
    Function {
        binary: "unsubscribe",
        wires: &["Routes::Unsubscribe", "unsubscribe_secret_from_aws"],
        calls: &["ProspectRepository::set_status", "unsubscribe_secret_from_aws"],
    },
    Function {
        binary: "scheduler",
        wires: &["QueueConfig::from_env", "unsubscribe_secret_from_aws", "SesMailer::from_sdk_config", "handle_batch"],
        calls: &[
            "AdminStore::get_campaign",
            "ProspectRepository::find",
            "SendLog::claim_send",
            "SendLog::record_send",
            // A claim found past its lease whose claimant recorded its outcome meanwhile.
            "SendLog::send_record",
            // A rejected recipient: the prospect is marked bounced.
            "ProspectRepository::set_status",
            "JobQueue::publish",
            "JobQueue::publish_batch",
            "Mailer::send",
            "unsubscribe_secret_from_aws",
        ],
    },
    // SES notifications: a prospect found by tags or by SES's message id, its feedback applied,
    // a delivery recorded on its send.
    Function {
        binary: "feedback",
        wires: &["handle_feedback"],
        calls: &["FeedbackLog::sent_email", "FeedbackLog::apply_feedback", "FeedbackLog::record_delivery"],
    },
    // Incoming webhooks: the endpoint, and its bad-signature bucket; a Stripe payment's prospect
    // found and converted, once per event; providers' feedback applied as the feedback function
    // applies it (the prospect found by its address, its Message-ID or SES's message id); every
    // delivery recorded.
    Function {
        binary: "webhooks",
        wires: &["webhooks_router"],
        calls: &[
            "IntegrationStore::find_integration",
            "IntegrationStore::event_taken",
            "IntegrationStore::record_event",
            "RateLimiter::check",
            "ProspectRepository::find",
            "ProspectRepository::set_status",
            "FeedbackLog::sent_email",
            "FeedbackLog::apply_feedback",
            "FeedbackLog::record_delivery",
        ],
    },
];

/// Methods whose requests the recording test cannot see (see the module documentation).
const NOT_RECORDED: &[&str] = &["unsubscribe_secret_from_aws"];

fn repo_root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn function_row(binary: &str) -> &'static Function {
    FUNCTIONS.iter().find(|f| f.binary == binary).unwrap_or_else(|| panic!("{binary}: no row in FUNCTIONS"))
}

fn actions_of(methods: &[&str]) -> BTreeSet<String> {
    methods
        .iter()
        .flat_map(|m| {
            let (_, actions) = ADAPTER_ACTIONS.iter().find(|(name, _)| name == m).unwrap_or_else(|| panic!("{m}: no row in ADAPTER_ACTIONS"));
            actions.iter().map(|a| (*a).to_owned())
        })
        .collect()
}

/// The template's functions: logical id and `BuildProperties.Binary`.
fn template_functions() -> Vec<(String, String)> {
    let resources = template()["Resources"].as_mapping().expect("Resources");
    resources
        .iter()
        .filter(|(_, r)| r["Type"].as_str() == Some("AWS::Serverless::Function"))
        .map(|(id, r)| {
            let binary = r["Metadata"]["BuildProperties"]["Binary"].as_str().expect("BuildProperties.Binary");
            (id.as_str().expect("logical id").to_owned(), binary.to_owned())
        })
        .collect()
}

/// `!Ref X` or `!GetAtt X.Y` as (tag, target).
fn reference(value: &Value) -> Option<(String, String)> {
    match value {
        Value::Tagged(t) => Some((t.tag.to_string().trim_start_matches('!').to_owned(), t.value.as_str()?.to_owned())),
        _ => None,
    }
}

fn list(value: &Value) -> Vec<&Value> {
    match value {
        Value::Sequence(items) => items.iter().collect(),
        Value::Null => Vec::new(),
        one => vec![one],
    }
}

/// The event source mappings of `logical_id` (their properties).
fn event_source_mappings(logical_id: &str) -> Vec<&'static Value> {
    let resources = template()["Resources"].as_mapping().expect("Resources");
    resources
        .values()
        .filter(|r| r["Type"].as_str() == Some("AWS::Lambda::EventSourceMapping"))
        .map(|r| &r["Properties"])
        .filter(|p| reference(&p["FunctionName"]).is_some_and(|(_, target)| target == logical_id))
        .collect()
}

/// The template's configuration set, and the name [`evaluate`] gives it.
const CONFIGURATION_SET: &str = "SendingConfigurationSet";
const CONFIGURATION_SET_NAME: &str = "cadenhq-sending";

/// The sender the SES identity scope is computed for in [`evaluate`].
const SENDER_VALUE: &str = "Acme <hello@acme.example>";

/// A CloudFormation value with the intrinsic functions the policies use evaluated, parameters
/// from `params` and pseudo parameters as in account 123456789012, us-east-1.
fn evaluate(value: &Value, params: &BTreeMap<&str, String>) -> Value {
    let Value::Tagged(tagged) = value else { return value.clone() };
    let tag = tagged.tag.to_string();
    let arg = &tagged.value;
    let text = |v: &Value| evaluate(v, params).as_str().unwrap_or_else(|| panic!("{tag}: expected a string in {v:?}")).to_owned();
    let result = match tag.trim_start_matches('!') {
        "Ref" => {
            let name = arg.as_str().expect("!Ref name");
            match name {
                "AWS::Partition" => "aws".to_owned(),
                "AWS::Region" => "us-east-1".to_owned(),
                "AWS::AccountId" => "123456789012".to_owned(),
                other => params.get(other).unwrap_or_else(|| panic!("!Ref {other}: not a parameter the test sets")).clone(),
            }
        }
        "Sub" => {
            let (format, vars) = match arg {
                Value::Sequence(parts) => (parts[0].as_str().expect("!Sub format").to_owned(), Some(&parts[1])),
                other => (other.as_str().expect("!Sub format").to_owned(), None),
            };
            let mut out = format;
            for (name, v) in vars.and_then(Value::as_mapping).into_iter().flatten() {
                out = out.replace(&format!("${{{}}}", name.as_str().expect("!Sub variable")), &text(v));
            }
            for (name, v) in params {
                out = out.replace(&format!("${{{name}}}"), v);
            }
            for (name, v) in [("AWS::Partition", "aws"), ("AWS::Region", "us-east-1"), ("AWS::AccountId", "123456789012")] {
                out = out.replace(&format!("${{{name}}}"), v);
            }
            assert!(!out.contains("${"), "!Sub: unresolved variable in {out}");
            out
        }
        "Select" => {
            let parts = arg.as_sequence().expect("!Select [index, list]");
            let index = parts[0].as_u64().expect("!Select index") as usize;
            let items = evaluate(&parts[1], params);
            let items = items.as_sequence().expect("!Select list");
            items.get(index).unwrap_or_else(|| panic!("!Select {index}: out of range in {items:?}")).as_str().expect("a string").to_owned()
        }
        "Split" => {
            let parts = arg.as_sequence().expect("!Split [separator, string]");
            let separator = parts[0].as_str().expect("!Split separator");
            let split: Vec<Value> = text(&parts[1]).split(separator).map(|s| Value::String(s.to_owned())).collect();
            return Value::Sequence(split);
        }
        other => panic!("!{other}: not evaluated by this test"),
    };
    Value::String(result)
}

/// The resources a statement of these actions may name: the template's own resource for the
/// table, the queue and the secret; for SES, the sender's address identity and its domain's.
fn expected_resources(service: &str, actions: &[String]) -> Vec<(String, String)> {
    let r = |tag: &str, target: &str| (tag.to_owned(), target.to_owned());
    match service {
        // A Query reads the listing index, and nothing else of the table.
        "dynamodb" if actions.iter().all(|a| a == "dynamodb:Query") => vec![r("Sub", "${ProspectsTable.Arn}/index/gsi2")],
        "dynamodb" => vec![r("GetAtt", "ProspectsTable.Arn")],
        "sqs" => vec![r("GetAtt", "CampaignJobsQueue.Arn")],
        "secretsmanager" => vec![r("Ref", "UnsubscribeSecret")],
        other => panic!("{other}: no resource is expected for it"),
    }
}

/// The partitions (`pk` prefixes such as `KEY#`) a statement's `Condition` limits its actions
/// to; `None` when it has none. The one condition understood: `ForAllValues:StringLike` on
/// `dynamodb:LeadingKeys` (the partition key of each item a request names), every value a
/// prefix followed by `*` (`KEY#*`). Anything else fails: what it allows is not known to this
/// test.
fn leading_key_prefixes(logical_id: &str, statement: &Value) -> Option<BTreeSet<String>> {
    let sid = statement["Sid"].as_str().unwrap_or("a statement");
    let condition = &statement["Condition"];
    if condition.is_null() {
        return None;
    }
    let actions = list(&statement["Action"]);
    assert!(
        actions.iter().all(|a| a.as_str().is_some_and(|a| a.starts_with("dynamodb:"))),
        "{logical_id} {sid}: a condition is understood by this test on DynamoDB actions only"
    );
    let operators = condition.as_mapping().unwrap_or_else(|| panic!("{logical_id} {sid}: Condition is not a mapping"));
    let keys = operators
        .iter()
        .find_map(|(operator, keys)| (operator.as_str() == Some("ForAllValues:StringLike")).then_some(keys))
        .filter(|_| operators.len() == 1)
        .and_then(Value::as_mapping)
        .filter(|keys| keys.len() == 1)
        .unwrap_or_else(|| panic!("{logical_id} {sid}: {condition:?}: only ForAllValues:StringLike on dynamodb:LeadingKeys is understood by this test"));
    let values = keys.get("dynamodb:LeadingKeys").unwrap_or_else(|| panic!("{logical_id} {sid}: {keys:?}: only dynamodb:LeadingKeys is understood by this test"));
    let prefixes: BTreeSet<String> = list(values)
        .iter()
        .map(|v| {
            let v = v.as_str().unwrap_or_else(|| panic!("{logical_id} {sid}: {v:?} is not a string"));
            let prefix = v.strip_suffix('*').filter(|p| p.ends_with('#') && p.len() > 1 && !p[..p.len() - 1].contains(['#', '*', '?']));
            prefix.unwrap_or_else(|| panic!("{logical_id} {sid}: {v:?}: only a partition prefix then `*` (KEY#*) is understood by this test")).to_owned()
        })
        .collect();
    assert!(!prefixes.is_empty(), "{logical_id} {sid}: dynamodb:LeadingKeys lists no partition");
    Some(prefixes)
}

/// The DynamoDB actions the policies of `logical_id` grant, each with the partitions a
/// `dynamodb:LeadingKeys` condition limits it to, or `None` when some statement grants it on
/// every item of the table.
fn table_grants(logical_id: &str) -> BTreeMap<String, Option<BTreeSet<String>>> {
    let mut grants: BTreeMap<String, Option<BTreeSet<String>>> = BTreeMap::new();
    for policy in list(&resource(logical_id)["Properties"]["Policies"]) {
        for statement in list(&policy["Statement"]) {
            let scope = leading_key_prefixes(logical_id, statement);
            for action in list(&statement["Action"]).iter().filter_map(|a| a.as_str()).filter(|a| a.starts_with("dynamodb:")) {
                match grants.get_mut(action) {
                    None => {
                        grants.insert(action.to_owned(), scope.clone());
                    }
                    Some(granted) => match (granted.as_mut(), &scope) {
                        (Some(partitions), Some(more)) => partitions.extend(more.iter().cloned()),
                        _ => *granted = None,
                    },
                }
            }
        }
    }
    grants
}

/// The partitions the requests of `action` made by `calls` name, from [`ADAPTER_PARTITIONS`];
/// each row used goes into `used`.
fn partitions_needed(calls: &[&'static str], action: &str, used: &mut BTreeSet<(&'static str, &'static str)>) -> BTreeSet<String> {
    let mut needed = BTreeSet::new();
    for call in calls.iter().filter(|c| actions_of(&[**c]).contains(action)) {
        let (method, row_action, partitions) = ADAPTER_PARTITIONS
            .iter()
            .find(|(method, a, _)| method == call && *a == action)
            .unwrap_or_else(|| panic!("{call}: {action} is granted on some partitions only: add its partitions to ADAPTER_PARTITIONS"));
        used.insert((*method, *row_action));
        needed.extend(partitions.iter().map(|p| (*p).to_owned()));
    }
    needed
}

#[test]
fn template_iam_actions_are_exactly_what_each_function_can_call() {
    let functions = template_functions();
    let mut binaries: Vec<&str> = functions.iter().map(|(_, b)| b.as_str()).collect();
    binaries.sort_unstable();
    let mut rows: Vec<&str> = FUNCTIONS.iter().map(|f| f.binary).collect();
    rows.sort_unstable();
    assert_eq!(binaries, rows, "one FUNCTIONS row per template function");
    let mut partition_rows_used = BTreeSet::new();

    for (logical_id, binary) in &functions {
        let row = function_row(binary);
        let main_rs = std::fs::read_to_string(repo_root().join("functions").join(binary).join("src/main.rs")).unwrap();
        let wired: BTreeSet<&str> = WIRING.iter().copied().filter(|w| main_rs.contains(w)).collect();
        assert_eq!(wired, row.wires.iter().copied().collect(), "{binary}: what main.rs wires vs its FUNCTIONS row");

        let function = resource(logical_id);
        let mut granted = BTreeSet::new();
        for policy in list(&function["Properties"]["Policies"]) {
            assert!(policy.is_mapping(), "{logical_id}: {policy:?}: only inline statements, whose actions this test can read");
            for statement in list(&policy["Statement"]) {
                let sid = statement["Sid"].as_str().unwrap_or("a statement");
                assert_eq!(statement["Effect"].as_str(), Some("Allow"), "{logical_id} {sid}");
                let actions: Vec<String> = list(&statement["Action"]).iter().map(|a| a.as_str().expect("an action").to_owned()).collect();
                let services: BTreeSet<&str> = actions.iter().map(|a| a.split(':').next().unwrap_or_default()).collect();
                assert_eq!(services.len(), 1, "{logical_id} {sid}: one service per statement");
                let service = *services.first().unwrap();
                let resources = list(&statement["Resource"]);
                assert!(!resources.is_empty(), "{logical_id} {sid}: a resource");
                if service == "ses" {
                    let params = BTreeMap::from([("SenderAddress", SENDER_VALUE.to_owned()), (CONFIGURATION_SET, CONFIGURATION_SET_NAME.to_owned())]);
                    let arns: Vec<String> = resources.iter().map(|r| evaluate(r, &params).as_str().expect("an ARN").to_owned()).collect();
                    assert_eq!(
                        arns,
                        [
                            "arn:aws:ses:us-east-1:123456789012:identity/hello@acme.example",
                            "arn:aws:ses:us-east-1:123456789012:identity/acme.example",
                            "arn:aws:ses:us-east-1:123456789012:configuration-set/cadenhq-sending"
                        ],
                        "{logical_id} {sid}: only the configured sender's identity (its address or its domain), through the stack's configuration set"
                    );
                } else {
                    let named: Vec<(String, String)> =
                        resources.iter().map(|r| reference(r).unwrap_or_else(|| panic!("{logical_id} {sid}: {r:?} is not a reference"))).collect();
                    assert_eq!(named, expected_resources(service, &actions), "{logical_id} {sid}: resources");
                }
                granted.extend(actions);
            }
        }
        let mut needed = actions_of(row.calls);
        for (name, event) in function["Properties"]["Events"].as_mapping().into_iter().flatten() {
            match event["Type"].as_str() {
                // SAM adds a resource policy letting API Gateway invoke the function: nothing on its role.
                Some("HttpApi") => {}
                // SAM adds the topic's subscription and a resource policy letting SNS invoke the
                // function for that topic: nothing on its role. SNS invokes it asynchronously:
                // an event that fails its last attempt is sent to the function's dead-letter
                // queue, with its role.
                Some("SNS") => {
                    assert_eq!(
                        reference(&event["Properties"]["Topic"]),
                        Some(("Ref".into(), "FeedbackTopic".into())),
                        "{logical_id} {name:?}: the topic SES publishes to"
                    );
                    needed.extend(DEAD_LETTER_QUEUE_ACTIONS.iter().map(|a| (*a).to_owned()));
                }
                Some("SQS") => panic!(
                    "{logical_id} {name:?}: SAM's SQS event attaches AWSLambdaSQSQueueExecutionRole, on every queue; \
                     use an AWS::Lambda::EventSourceMapping and grant its actions on the queue"
                ),
                other => panic!("{logical_id} {name:?}: what SAM grants for a {other:?} event is not known to this test"),
            }
        }
        let dead_letter = &function["Properties"]["DeadLetterQueue"];
        if !dead_letter.is_null() {
            assert_eq!(dead_letter["Type"].as_str(), Some("SQS"), "{logical_id}: DeadLetterQueue");
            let target = reference(&dead_letter["TargetArn"]);
            let queue = target.as_ref().and_then(|(tag, target)| (tag == "GetAtt").then(|| target.strip_suffix(".Arn")).flatten());
            let queue = queue.unwrap_or_else(|| panic!("{logical_id}: DeadLetterQueue.TargetArn is not !GetAtt Queue.Arn: {target:?}"));
            assert_eq!(resource(queue)["Type"].as_str(), Some("AWS::SQS::Queue"), "{logical_id}: {queue}");
            assert_ne!(queue, "CampaignJobsQueue", "{logical_id}: failed events are not campaign jobs");
            // SAM's DeadLetterQueuePolicy, on that queue only.
            granted.extend(DEAD_LETTER_QUEUE_ACTIONS.iter().map(|a| (*a).to_owned()));
        }
        for mapping in event_source_mappings(logical_id) {
            assert_eq!(reference(&mapping["EventSourceArn"]), Some(("GetAtt".into(), "CampaignJobsQueue.Arn".into())), "{logical_id}");
            needed.extend(SQS_EVENT_SOURCE_ACTIONS.iter().map(|a| (*a).to_owned()));
        }
        let missing: Vec<&String> = needed.difference(&granted).collect();
        let extra: Vec<&String> = granted.difference(&needed).collect();
        assert!(missing.is_empty() && extra.is_empty(), "{logical_id}: missing {missing:?}, extra {extra:?}");

        for (action, scope) in table_grants(logical_id) {
            let Some(allowed) = scope else { continue };
            let needed = partitions_needed(row.calls, &action, &mut partition_rows_used);
            assert_eq!(allowed, needed, "{logical_id}: the partitions its {action} is granted on vs the ADAPTER_PARTITIONS rows of its calls");
        }
    }
    let partition_rows: BTreeSet<(&str, &str)> = ADAPTER_PARTITIONS.iter().map(|(method, action, _)| (*method, *action)).collect();
    let left_behind: Vec<_> = partition_rows.difference(&partition_rows_used).collect();
    assert!(left_behind.is_empty(), "ADAPTER_PARTITIONS rows no partition-limited grant needs: {left_behind:?}");
}

#[test]
fn the_read_function_can_write_no_prospect_and_only_the_keys_last_use_and_rate_limit_bucket() {
    let grants = table_grants("ProspectsReadFunction");
    for action in ["dynamodb:PutItem", "dynamodb:DeleteItem", "dynamodb:BatchWriteItem", "dynamodb:PartiQLInsert", "dynamodb:PartiQLUpdate", "dynamodb:PartiQLDelete"] {
        assert!(!grants.contains_key(action), "ProspectsReadFunction is granted {action}");
    }
    let updates = grants.get("dynamodb:UpdateItem").expect("UpdateItem: the key's last use and its rate-limit bucket");
    let partitions = updates.as_ref().expect("UpdateItem limited to some partitions by a dynamodb:LeadingKeys condition");
    assert_eq!(partitions.iter().map(String::as_str).collect::<Vec<_>>(), ["KEY#", "RATE#"]);
}

#[test]
fn the_erase_function_can_delete_only_a_prospect_and_its_pointers_and_put_only_a_suppression_entry() {
    let grants = table_grants("ProspectsEraseFunction");
    for action in [
        "dynamodb:BatchWriteItem",
        "dynamodb:BatchGetItem",
        "dynamodb:Query",
        "dynamodb:Scan",
        "dynamodb:ConditionCheckItem",
        "dynamodb:PartiQLSelect",
        "dynamodb:PartiQLInsert",
        "dynamodb:PartiQLUpdate",
        "dynamodb:PartiQLDelete",
    ] {
        assert!(!grants.contains_key(action), "ProspectsEraseFunction is granted {action}");
    }
    assert_eq!(grants.get("dynamodb:GetItem"), Some(&None), "GetItem: the key, the bucket, the pointer or the prospect, by key");
    let scoped = |action: &str| -> Vec<String> {
        let scope = grants.get(action).unwrap_or_else(|| panic!("ProspectsEraseFunction is not granted {action}"));
        let partitions = scope.as_ref().unwrap_or_else(|| panic!("{action} limited to some partitions by a dynamodb:LeadingKeys condition"));
        partitions.iter().cloned().collect()
    };
    // Not an account, key, campaign, send record or idempotency record: only what erasure removes.
    assert_eq!(scoped("dynamodb:DeleteItem"), ["EXT#", "PID#", "PROSPECT#"]);
    // Nothing but the suppression entry is created or replaced.
    assert_eq!(scoped("dynamodb:PutItem"), ["SUPPRESS#"]);
    assert_eq!(scoped("dynamodb:UpdateItem"), ["KEY#", "RATE#"]);
    assert_eq!(grants.len(), 4, "GetItem, DeleteItem, PutItem and UpdateItem only: {grants:?}");
}

#[test]
fn the_feedback_function_reads_writes_and_checks_only_the_partitions_feedback_touches() {
    let grants = table_grants("FeedbackFunction");
    let scoped = |action: &str| -> Vec<String> {
        let scope = grants.get(action).unwrap_or_else(|| panic!("FeedbackFunction is not granted {action}"));
        let partitions = scope.as_ref().unwrap_or_else(|| panic!("{action} limited to some partitions by a dynamodb:LeadingKeys condition"));
        partitions.iter().cloned().collect()
    };
    // No API key, campaign, idempotency record or pointer; no prospect read whole.
    assert_eq!(scoped("dynamodb:GetItem"), ["BOUNCES#", "MSG#"]);
    // Nothing but what was applied and the recent transient bounces is created or replaced.
    assert_eq!(scoped("dynamodb:PutItem"), ["BOUNCES#", "FEEDBACK#"]);
    assert_eq!(scoped("dynamodb:UpdateItem"), ["PROSPECT#", "SEND#"]);
    assert_eq!(scoped("dynamodb:ConditionCheckItem"), ["PROSPECT#"]);
    assert_eq!(grants.len(), 4, "GetItem, PutItem, UpdateItem and ConditionCheckItem only (no delete, query or scan): {grants:?}");

    let function = resource("FeedbackFunction");
    let events: Vec<&Value> = function["Properties"]["Events"].as_mapping().expect("Events").values().collect();
    assert_eq!(events.len(), 1, "one trigger");
    assert_eq!(events[0]["Type"].as_str(), Some("SNS"));
    let dead_letter = &function["Properties"]["DeadLetterQueue"];
    let target = reference(&dead_letter["TargetArn"]);
    assert_eq!(target, Some(("GetAtt".into(), "FeedbackDeadLetterQueue.Arn".into())), "what failed three times is kept");
    let queue = &resource("FeedbackDeadLetterQueue")["Properties"];
    assert_eq!(queue["SqsManagedSseEnabled"].as_bool(), Some(true), "SES notifications carry addresses: encrypted at rest");
    assert_eq!(queue["MessageRetentionPeriod"].as_u64(), Some(1_209_600), "kept 14 days");
}

/// Whether `grants` (see [`table_grants`]) allow `action` on the item whose partition key is `pk`.
fn allows(grants: &BTreeMap<String, Option<BTreeSet<String>>>, action: &str, pk: &str) -> bool {
    grants.get(action).is_some_and(|scope| scope.as_ref().is_none_or(|prefixes| prefixes.iter().any(|p| pk.starts_with(p.as_str()))))
}

#[test]
fn the_webhooks_function_reads_and_writes_only_the_partitions_webhooks_touch() {
    let grants = table_grants("WebhooksFunction");
    let scoped = |action: &str| -> Vec<String> {
        let scope = grants.get(action).unwrap_or_else(|| panic!("WebhooksFunction is not granted {action}"));
        let partitions = scope.as_ref().unwrap_or_else(|| panic!("{action} limited to some partitions by a dynamodb:LeadingKeys condition"));
        partitions.iter().cloned().collect()
    };
    assert_eq!(scoped("dynamodb:GetItem"), ["BOUNCES#", "EVENT#", "EXT#", "INTEGRATION#", "MSG#", "PID#", "PROSPECT#", "RATE#"]);
    assert_eq!(scoped("dynamodb:PutItem"), ["BOUNCES#", "EVENT#", "FEEDBACK#", "RECEIVED#"]);
    assert_eq!(scoped("dynamodb:UpdateItem"), ["PROSPECT#", "RATE#", "SEND#"]);
    assert_eq!(scoped("dynamodb:ConditionCheckItem"), ["PROSPECT#"]);
    assert_eq!(grants.len(), 4, "GetItem, PutItem, UpdateItem and ConditionCheckItem only (no delete, query or scan): {grants:?}");

    // What a Stripe conversion, a Resend bounce and an SES notification over HTTPS send is
    // allowed (the recording test checks these are exactly the partitions named)...
    for (action, pk) in [
        ("dynamodb:GetItem", "INTEGRATION#whep_0123"),
        ("dynamodb:GetItem", "EXT#account#crm-1"),
        ("dynamodb:UpdateItem", "PROSPECT#account#hash"),
        ("dynamodb:PutItem", "EVENT#stripe#account#hash"),
        ("dynamodb:PutItem", "FEEDBACK#hash#hash"),
        ("dynamodb:ConditionCheckItem", "PROSPECT#account#hash"),
        ("dynamodb:GetItem", "MSG#0100018f-aaaa"),
    ] {
        assert!(allows(&grants, action, pk), "{action} on {pk} is allowed");
    }
    // ...and nothing else: no key, account, campaign, endpoint or pointer is written, no idempotency
    // record read, nothing deleted.
    for (action, pk) in [
        ("dynamodb:PutItem", "KEY#hash"),
        ("dynamodb:UpdateItem", "KEY#hash"),
        ("dynamodb:GetItem", "KEY#hash"),
        ("dynamodb:GetItem", "IDEM#account#hash"),
        ("dynamodb:PutItem", "INTEGRATION#whep_0123"),
        ("dynamodb:PutItem", "PROSPECT#account#hash"),
        ("dynamodb:PutItem", "PID#account#id"),
        ("dynamodb:UpdateItem", "ACCOUNT#account"),
        ("dynamodb:UpdateItem", "CAMPAIGN#campaign"),
        ("dynamodb:DeleteItem", "INTEGRATION#whep_0123"),
        ("dynamodb:DeleteItem", "PROSPECT#account#hash"),
    ] {
        assert!(!allows(&grants, action, pk), "{action} on {pk} is denied");
    }
    let events: Vec<(&str, &str)> = resource("WebhooksFunction")["Properties"]["Events"]
        .as_mapping()
        .expect("Events")
        .values()
        .map(|e| (e["Properties"]["Method"].as_str().unwrap_or_default(), e["Properties"]["Path"].as_str().unwrap_or_default()))
        .collect();
    assert_eq!(events, [("POST", shared::http::SES_WEBHOOK_PATH), ("POST", shared::http::PROVIDER_WEBHOOK_PATH)], "the routes webhooks_router serves");
}

#[test]
fn the_scheduler_consumes_its_queue_through_a_mapping_with_the_batch_settings() {
    let mappings = event_source_mappings("SchedulerFunction");
    assert_eq!(mappings.len(), 1);
    let m = mappings[0];
    assert_eq!(m["BatchSize"].as_u64(), Some(10));
    assert_eq!(m["MaximumBatchingWindowInSeconds"].as_u64(), Some(1));
    assert_eq!(list(&m["FunctionResponseTypes"]), [&Value::String("ReportBatchItemFailures".into())]);
}

#[test]
fn the_ses_scope_follows_the_sender_with_or_without_a_display_name() {
    let function = resource("SchedulerFunction");
    let statement = list(&function["Properties"]["Policies"])
        .into_iter()
        .flat_map(|p| list(&p["Statement"]))
        .find(|s| list(&s["Action"]).iter().any(|a| a.as_str().is_some_and(|a| a.starts_with("ses:"))))
        .expect("the SES statement");
    for sender in ["hello@acme.example", "Acme <hello@acme.example>", "Acme Inc. <hello@mail.acme.example>"] {
        let params = BTreeMap::from([("SenderAddress", sender.to_owned()), (CONFIGURATION_SET, CONFIGURATION_SET_NAME.to_owned())]);
        let arns: Vec<String> = list(&statement["Resource"]).iter().map(|r| evaluate(r, &params).as_str().unwrap().to_owned()).collect();
        let domain = sender.rsplit('@').next().unwrap().trim_end_matches('>');
        let address = format!("hello@{domain}");
        let prefix = "arn:aws:ses:us-east-1:123456789012";
        let set = format!("{prefix}:configuration-set/{CONFIGURATION_SET_NAME}");
        assert_eq!(arns, [format!("{prefix}:identity/{address}"), format!("{prefix}:identity/{domain}"), set], "{sender}");
    }
}

/// What the requests made asked for, as the interceptor saw them.
#[derive(Debug, Default)]
struct Recorded {
    /// The IAM action of each.
    actions: BTreeSet<String>,
    /// Each DynamoDB action with the partition of each item it names (see [`partition_of`]).
    partitions: BTreeSet<(String, String)>,
}

#[derive(Debug, Default)]
struct Seen(Mutex<Recorded>);

impl Seen {
    fn take(&self) -> Recorded {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// The partition of an item's key (`{"pk": {"S": "KEY#..."}}`) as [`ADAPTER_PARTITIONS`] names
/// it: `pk` up to its first `#`, included; a key without one is named as it is.
fn partition_of(key: &serde_json::Value) -> String {
    match key["pk"]["S"].as_str() {
        Some(pk) => pk.split_once('#').map_or_else(|| pk.to_owned(), |(prefix, _)| format!("{prefix}#")),
        None => format!("no pk in {key}"),
    }
}

/// Records the IAM action(s) of each request once it is serialized: from `X-Amz-Target` for the
/// AWS JSON protocol (DynamoDB, SQS), expanding a `TransactWriteItems` into its items' actions
/// and SQS batches into their single-message actions; SES v2 by its path. For DynamoDB, also the
/// partition of each item named (`Key`, a `PutItem`'s `Item`, each key of a `BatchGetItem`).
#[derive(Debug)]
struct RecordActions(Arc<Seen>);

impl Intercept for RecordActions {
    fn name(&self) -> &'static str {
        "RecordActions"
    }

    fn read_after_serialization(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let request = context.request();
        let body: serde_json::Value = request.body().bytes().and_then(|b| serde_json::from_slice(b).ok()).unwrap_or_default();
        let mut actions = Vec::new();
        let mut partitions = Vec::new();
        let item_key = |request: &serde_json::Value| if request.get("Item").is_some() { request["Item"].clone() } else { request["Key"].clone() };
        if let Some(target) = request.headers().get("x-amz-target") {
            let (service, operation) = target.split_once('.').unwrap_or(("", target));
            if service.starts_with("DynamoDB") {
                if operation == "TransactWriteItems" {
                    for item in body["TransactItems"].as_array().into_iter().flatten() {
                        for (kind, action) in [("Put", "PutItem"), ("Delete", "DeleteItem"), ("Update", "UpdateItem"), ("ConditionCheck", "ConditionCheckItem")] {
                            if let Some(request) = item.get(kind) {
                                actions.push(format!("dynamodb:{action}"));
                                partitions.push((format!("dynamodb:{action}"), partition_of(&item_key(request))));
                            }
                        }
                    }
                } else {
                    let action = format!("dynamodb:{operation}");
                    if operation == "BatchGetItem" {
                        let keys = body["RequestItems"].as_object().into_iter().flat_map(|tables| tables.values()).flat_map(|t| t["Keys"].as_array().into_iter().flatten());
                        partitions.extend(keys.map(|key| (action.clone(), partition_of(key))));
                    } else {
                        partitions.push((action.clone(), partition_of(&item_key(&body))));
                    }
                    actions.push(action);
                }
            } else if service == "AmazonSQS" {
                actions.push(format!("sqs:{}", operation.strip_suffix("Batch").unwrap_or(operation)));
            } else {
                actions.push(format!("unknown:{target}"));
            }
        } else if request.uri().ends_with("/v2/email/outbound-emails") {
            actions.push("ses:SendEmail".to_owned());
            if body["Content"].get("Raw").is_some() {
                actions.push("ses:SendRawEmail".to_owned());
            }
        } else {
            actions.push(format!("unknown:{}", request.uri()));
        }
        let mut recorded = self.0 .0.lock().unwrap();
        recorded.actions.extend(actions);
        recorded.partitions.extend(partitions);
        Ok(())
    }
}

/// A key-authenticated request to `base`; returns the status.
async fn request(http: &reqwest::Client, method: reqwest::Method, url: String, key: &str, idempotency: Option<&str>, body: serde_json::Value) -> u16 {
    let mut request = http.request(method, url).header(KEY_HEADER, key).body(body.to_string());
    if let Some(k) = idempotency {
        request = request.header("Idempotency-Key", k);
    }
    request.send().await.expect("request reaches the app").status().as_u16()
}

/// Serves `routes` of `backend` on a loopback port; returns its base URL.
async fn serve(backend: &Backend, routes: Routes) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let service = backend.service(Arc::new(SystemClock)).with_unsubscribe_secret(test_secret());
    let app = router(service, routes);
    tokio::spawn(async move { axum::serve(listener, app).await });
    base
}

/// Serves the webhooks function's router over `service` on a loopback port; returns its base URL.
async fn serve_webhooks(service: WebhookService) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, webhooks_router(service)).await });
    base
}

/// An SNS notification of the test topic carrying `message`, signed now with the test certificate.
fn sns_notification(message_id: &str, message: &str) -> String {
    let unsigned = json!({
        "Type": "Notification", "MessageId": message_id, "TopicArn": SNS_TEST_TOPIC, "Message": message,
        "Timestamp": SystemClock.now().format(&time::format_description::well_known::Rfc3339).unwrap(), "SignatureVersion": "2",
        "SigningCertURL": sns_test_signer().cert_url,
        "UnsubscribeURL": format!("https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe&SubscriptionArn={SNS_TEST_TOPIC}:4f2a"),
    });
    sign(&["sns", sns_test_signer().key.to_str().unwrap()], &unsigned.to_string())
}

/// The headers of a Standard Webhooks (Resend) delivery of `body`, signed now with `secret`.
fn resend_headers(secret: &str, id: &str, body: &str) -> [(&'static str, String); 3] {
    let key = base64::engine::general_purpose::STANDARD.decode(secret.strip_prefix("whsec_").unwrap()).unwrap();
    let t = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{t}.{body}").as_bytes());
    let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    [("svix-id", id.to_owned()), ("svix-timestamp", t.to_string()), ("svix-signature", format!("v1,{signature}"))]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_function_calls_only_and_all_of_the_actions_its_rows_list() {
    let sdk = emulator_sdk_config().await;
    let name = format!("iam-{}", uuid::Uuid::new_v4().simple());
    create_table(&sdk, &name).await;
    let queues = create_queues(&sdk, &name).await;
    let seen = Arc::new(Seen::default());
    let dynamo = aws_sdk_dynamodb::Client::from_conf(aws_sdk_dynamodb::config::Builder::from(&sdk).interceptor(RecordActions(seen.clone())).build());
    let sqs = aws_sdk_sqs::Client::from_conf(aws_sdk_sqs::config::Builder::from(&sdk).interceptor(RecordActions(seen.clone())).build());
    let ses = aws_sdk_sesv2::Client::from_conf(aws_sdk_sesv2::config::Builder::from(&sdk).interceptor(RecordActions(seen.clone())).build());
    let plain_sqs = aws_sdk_sqs::Client::new(&sdk);
    let backend = Backend::aws_with_clients(dynamo.clone(), &name, Some((sqs.clone(), &queues.url)));
    let account = admin::create_account(backend.admin.as_ref(), "IAM", &SystemClock).await.unwrap();
    let (_, key) = admin::create_key(backend.admin.as_ref(), account.id, None, &SystemClock).await.unwrap();
    let key = key.expose().to_owned();
    admin::create_campaign(backend.admin.as_ref(), account.id, CampaignDefinition::parse(CAMPAIGN_FILE).unwrap(), true, &SystemClock)
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let mut recorded: BTreeMap<&str, Recorded> = BTreeMap::new();

    // prospects-post: new, changed, a new external_id (pointer moved), an Idempotency-Key kept,
    // and one freed after a 5xx (the queue is gone).
    seen.take();
    let base = serve(&backend, Routes::Upsert).await;
    let post = |email: &str, extra: serde_json::Value| {
        let mut body = json!({"email": email});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    let url = format!("{base}/api/v1/prospects");
    assert_eq!(request(&http, reqwest::Method::POST, url.clone(), &key, Some("post-1"), post("ada@example.com", json!({"external_id": "crm-1"}))).await, 201);
    assert_eq!(request(&http, reqwest::Method::POST, url.clone(), &key, None, post("ada@example.com", json!({"first_name": "Ada"}))).await, 200);
    assert_eq!(request(&http, reqwest::Method::POST, url.clone(), &key, None, post("ada@example.com", json!({"external_id": "crm-2"}))).await, 200);
    let gone = SqsQueue::new(sqs.clone(), format!("{}-gone", queues.url));
    let broken = serve(&Backend { queue: Some(Arc::new(gone)), ..backend.clone() }, Routes::Upsert).await;
    let status = request(&http, reqwest::Method::POST, format!("{broken}/api/v1/prospects"), &key, Some("post-2"), post("bob@example.com", json!({}))).await;
    assert!(status >= 500, "{status}");
    recorded.insert("prospects-post", seen.take());

    // prospects-patch: by id and by external_id with an Idempotency-Key, and one freed after a
    // 5xx (the prospect table is gone for the status write).
    let prospect = backend.repo.find(account.id, &crate::helpers::by_email("ada@example.com")).await.unwrap().expect("the prospect");
    seen.take();
    let base = serve(&backend, Routes::Status).await;
    let converted = json!({"status": "converted"});
    assert_eq!(request(&http, reqwest::Method::PATCH, format!("{base}/api/v1/prospects/{}", prospect.id), &key, Some("patch-1"), converted.clone()).await, 200);
    assert_eq!(request(&http, reqwest::Method::PATCH, format!("{base}/api/v1/prospects/external/crm-2"), &key, None, json!({"status": "new"})).await, 200);
    let broken = serve(&Backend { repo: Arc::new(DynamoStore::new(dynamo.clone(), format!("{name}-gone"))), ..backend.clone() }, Routes::Status).await;
    let status = request(&http, reqwest::Method::PATCH, format!("{broken}/api/v1/prospects/{}", prospect.id), &key, Some("patch-2"), converted).await;
    assert!(status >= 500, "{status}");
    recorded.insert("prospects-patch", seen.take());

    // prospects-read: by id (the campaign of its enrollment read too), by external_id, and an
    // unknown id, with a key not used before (so its last use is written, as is its bucket).
    let (_, reader) = admin::create_key(backend.admin.as_ref(), account.id, None, &SystemClock).await.unwrap();
    let reader = reader.expose().to_owned();
    assert!(!prospect.enrollments.is_empty(), "the prospect read has an enrollment");
    seen.take();
    let base = serve(&backend, Routes::Read).await;
    for (path, expected) in [
        (format!("/api/v1/prospects/{}", prospect.id), 200),
        ("/api/v1/prospects/external/crm-2".to_owned(), 200),
        (format!("/api/v1/prospects/{}", uuid::Uuid::new_v4()), 404),
        (format!("/api/v1/prospects/{}/export", prospect.id), 200),
        ("/api/v1/prospects?limit=5".to_owned(), 200),
        ("/api/v1/prospects?email=ada%40example.com".to_owned(), 200),
    ] {
        let status = http.get(format!("{base}{path}")).header(KEY_HEADER, &reader).send().await.expect("request reaches the app").status();
        assert_eq!(status.as_u16(), expected, "GET {path}");
    }
    recorded.insert("prospects-read", seen.take());

    // unsubscribe: the confirmation page and the one-click POST of a signed link.
    let token = test_secret().sign(account.id, prospect.id);
    seen.take();
    let base = serve(&backend, Routes::Unsubscribe).await;
    assert_eq!(http.get(format!("{base}/unsubscribe/{token}")).send().await.unwrap().status(), 200);
    assert_eq!(http.post(format!("{base}/unsubscribe/{token}")).send().await.unwrap().status(), 200);
    recorded.insert("unsubscribe", seen.take());

    // scheduler: jobs of new prospects sent through SES, sent, not accepted (retry recorded and
    // published), rejected (prospect bounced), and a follow-up not yet due.
    for (n, email) in ["s1@example.com", "s2@example.com", "s3@example.com", "s4@example.com"].iter().enumerate() {
        let status = request(&http, reqwest::Method::POST, url.clone(), &key, None, json!({"email": email})).await;
        assert_eq!(status, 201, "prospect {n}");
    }
    // The four first steps (the first prospect's job, of an enrollment that ended, is left out).
    let messages: Vec<_> = crate::helpers::receive_all(&plain_sqs, &queues.url)
        .await
        .into_iter()
        .filter(|m| !m.body().unwrap_or_default().contains(&prospect.id.to_string()))
        .collect();
    assert_eq!(messages.len(), 4);
    seen.take();
    let settings = || DeliverySettings { sender: "Acme <hello@acme.example>".into(), public_url: "https://api.acme.example".into(), unsubscribe_secret: test_secret() };
    let ses_mailer: Arc<dyn Mailer> = Arc::new(SesMailer::new(ses));
    let recording = Arc::new(RecordingMailer::default());
    // Follow-ups come back at once (their delays kept aside), so one not yet due can be handed over.
    let undelayed = aws_sdk_sqs::Client::from_conf(sqs.config().to_builder().interceptor(ModelSqsDelays(Arc::new(SystemClock))).build());
    let immediate = Backend { queue: Some(Arc::new(SqsQueue::new(undelayed, &queues.url))), ..backend.clone() };
    let through_ses = Scheduler::new(immediate.scheduler_ports(ses_mailer, Arc::new(SystemClock)).unwrap(), settings());
    let through_recording = Scheduler::new(immediate.scheduler_ports(recording.clone(), Arc::new(SystemClock)).unwrap(), settings());
    let event = |from: &[aws_sdk_sqs::types::Message]| {
        let mut event = aws_lambda_events::event::sqs::SqsEvent::default();
        for m in from {
            let mut record = aws_lambda_events::event::sqs::SqsMessage::default();
            record.message_id = m.message_id.clone();
            record.body = m.body.clone();
            event.records.push(record);
        }
        event
    };
    handle_batch(&through_ses, event(&messages[0..1])).await;
    handle_batch(&through_recording, event(&messages[1..2])).await;
    recording.fail_next(MailFault::NotAccepted);
    handle_batch(&through_recording, event(&messages[2..3])).await;
    recording.fail_next(MailFault::Reject);
    handle_batch(&through_recording, event(&messages[3..4])).await;
    let follow_ups = crate::helpers::receive_all(&plain_sqs, &queues.url).await;
    assert!(!follow_ups.is_empty(), "next steps and the retry were published");
    handle_batch(&through_recording, event(&follow_ups[0..1])).await;
    recorded.insert("scheduler", seen.take());

    // feedback: SES notifications about a prospect whose first step was sent: a delivery and a
    // transient bounce found by their tags, a complaint found by SES's message id alone, a
    // permanent bounce, and what is ignored (a Send event, a message that is not one).
    let mut sent = None;
    for email in ["s1@example.com", "s2@example.com", "s3@example.com", "s4@example.com"] {
        let p = backend.repo.find(account.id, &crate::helpers::by_email(email)).await.unwrap().expect("a prospect");
        let send = SendKey { enrollment: p.enrollments[0].id, step: 0 };
        if let Some(SendState::Sent { message_id }) = backend.sends.send_record(send).await.unwrap().map(|r| r.state) {
            sent = Some((email, EmailReference { account: account.id, prospect: p.id, send }, message_id));
            break;
        }
    }
    let (email, reference, message_id) = sent.expect("a first step sent");
    seen.take();
    let now = SystemClock.now();
    let notifications = [
        ses_notification(Naming::Tags(&reference), "Delivery", &message_id, email, now, json!({"smtpResponse": "250 2.0.0 OK"})),
        ses_notification(Naming::Tags(&reference), "Bounce", &message_id, email, now, bounce("iam-fb-1", "Transient", "4.2.2")),
        ses_notification(Naming::MessageId, "Complaint", &message_id, email, now, json!({"feedbackId": "iam-fb-2"})),
        ses_notification(Naming::Tags(&reference), "Bounce", &message_id, email, now, bounce("iam-fb-3", "Permanent", "5.1.1")),
        json!({"eventType": "Send", "send": {}, "mail": {"messageId": message_id}}).to_string(),
        "Successfully validated SNS topic for Amazon SES event publishing.".to_owned(),
    ];
    let mut event = aws_lambda_events::event::sns::SnsEvent::default();
    for (n, notification) in notifications.into_iter().enumerate() {
        let mut record = aws_lambda_events::event::sns::SnsRecord::default();
        record.event_source = "aws:sns".into();
        record.sns.message_id = format!("iam-{n}");
        record.sns.message = notification;
        event.records.push(record);
    }
    let outcomes = handle_feedback(&backend.feedback_service(Arc::new(SystemClock)), event).await.expect("applied");
    assert_eq!(
        outcomes,
        [
            FeedbackOutcome::Recorded,
            FeedbackOutcome::Applied(None),
            FeedbackOutcome::Applied(Some(ProspectStatus::Unsubscribed)),
            FeedbackOutcome::Applied(Some(ProspectStatus::Bounced)),
        ]
    );
    recorded.insert("feedback", seen.take());

    // webhooks: a Stripe payment naming an unknown prospect id, then the external_id of one
    // (converted), delivered twice (a duplicate); bad signatures at the endpoint, then one more
    // once its bucket has expired (read after the write that found it gone); Resend events: a
    // transient bounce of a prospect found by its address, a delivery found by its Message-ID;
    // an SES complaint over SNS HTTPS named by SES's message id only.
    let stripe_secret = "whsec_iam0123456789abcdefghijklmnop";
    let resend_secret = format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(b"iam-resend-signing-key-0123456789"));
    let integrations = backend.integrations.as_ref();
    let stripe = admin::create_integration(backend.admin.as_ref(), integrations, account.id, Provider::Stripe, stripe_secret, &SystemClock).await.unwrap();
    let resend = admin::create_integration(backend.admin.as_ref(), integrations, account.id, Provider::Resend, &resend_secret, &SystemClock).await.unwrap();
    let fetcher: Arc<dyn HttpsGet> = Arc::new(ReqwestGet::new().unwrap());
    let sns = SnsVerifier::new(vec![SNS_TEST_TOPIC.to_owned()], fetcher).with_cert_dir(&sns_test_signer().dir).unwrap();
    let notification = sns_notification("iam-sns-1", &ses_notification(Naming::MessageId, "Complaint", &message_id, email, SystemClock.now(), json!({"feedbackId": "iam-fb-9"})));
    let base = serve_webhooks(backend.webhook_service(Arc::new(SystemClock), sns)).await;
    seen.take();
    let stripe_url = format!("{base}/webhooks/stripe/{}", stripe.id);
    let payment = json!({
        "id": "evt_iam_1",
        "type": "checkout.session.completed",
        "data": {"object": {"payment_status": "paid", "client_reference_id": "crm-2", "metadata": {"prospect_id": uuid::Uuid::new_v4().to_string()}}},
    })
    .to_string();
    for _ in 0..2 {
        let signature = stripe_signature(stripe_secret, SystemClock.now().unix_timestamp(), &payment);
        let status = http.post(&stripe_url).header("stripe-signature", signature).body(payment.clone()).send().await.unwrap().status();
        assert_eq!(status, 200, "the Stripe payment");
    }
    let paid = backend.repo.find(account.id, &ProspectRef::ExternalId(ExternalId::parse("crm-2").unwrap())).await.unwrap().expect("the prospect paying");
    assert_eq!(paid.status, ProspectStatus::Converted);
    let bad_signature = || {
        let signature = stripe_signature("whsec_another", SystemClock.now().unix_timestamp(), &payment);
        http.post(&stripe_url).header("stripe-signature", signature).body(payment.clone()).send()
    };
    for _ in 0..4 {
        assert_eq!(bad_signature().await.unwrap().status(), 400);
    }
    let unrecorded = aws_sdk_dynamodb::Client::new(&sdk);
    let buckets = unrecorded
        .scan()
        .table_name(&name)
        .filter_expression("begins_with(pk, :p)")
        .expression_attribute_values(":p", aws_sdk_dynamodb::types::AttributeValue::S("RATE#".into()))
        .send()
        .await
        .unwrap();
    assert!(!buckets.items().is_empty(), "the endpoint's bucket was written");
    for bucket in buckets.items() {
        unrecorded.delete_item().table_name(&name).key("pk", bucket["pk"].clone()).send().await.unwrap();
    }
    assert_eq!(bad_signature().await.unwrap().status(), 400);
    let resend_url = format!("{base}/webhooks/resend/{}", resend.id);
    let header_message_id = format!("<{}>", reference.message_id("acme.example"));
    for (id, body) in [
        ("msg_iam_1", json!({"type": "email.bounced", "data": {"email_id": "re-iam-1", "to": ["s3@example.com"], "bounce": {"type": "Transient"}}})),
        ("msg_iam_2", json!({"type": "email.delivered", "data": {"email_id": "re-iam-2", "to": [email], "headers": [{"name": "Message-ID", "value": header_message_id}]}})),
    ] {
        let body = body.to_string();
        let mut request = http.post(&resend_url).body(body.clone());
        for (header, value) in resend_headers(&resend_secret, id, &body) {
            request = request.header(header, value);
        }
        let answer: serde_json::Value = request.send().await.unwrap().json().await.unwrap();
        assert_eq!(answer["events"][0]["outcome"], "applied", "{id}: {answer}");
    }
    let answer: serde_json::Value = http.post(format!("{base}/webhooks/ses")).body(notification).send().await.unwrap().json().await.unwrap();
    assert_eq!(answer["events"][0]["outcome"], "applied", "a complaint named by SES's message id: {answer}");
    recorded.insert("webhooks", seen.take());

    // prospects-erase (last: it removes prospects the others use): by id a prospect without an
    // external_id, by external_id one with both pointers, the first again (erased already) and
    // an unknown id, with a key not used before (so its last use is written, as is its bucket).
    let plain = backend.repo.find(account.id, &crate::helpers::by_email("s1@example.com")).await.unwrap().expect("a prospect");
    assert!(plain.external_id.is_none(), "the prospect erased by id has no external_id");
    let (_, eraser) = admin::create_key(backend.admin.as_ref(), account.id, None, &SystemClock).await.unwrap();
    let eraser = eraser.expose().to_owned();
    seen.take();
    let base = serve(&backend, Routes::Erase).await;
    for (path, expected) in [
        (format!("/api/v1/prospects/{}", plain.id), 200),
        ("/api/v1/prospects/external/crm-2".to_owned(), 200),
        (format!("/api/v1/prospects/{}", plain.id), 404),
        (format!("/api/v1/prospects/{}", uuid::Uuid::new_v4()), 404),
    ] {
        let status = http.delete(format!("{base}{path}")).header(KEY_HEADER, &eraser).send().await.expect("request reaches the app").status();
        assert_eq!(status.as_u16(), expected, "DELETE {path}");
    }
    recorded.insert("prospects-erase", seen.take());
    for erased in [plain.id, prospect.id] {
        assert_eq!(backend.repo.find(account.id, &ProspectRef::Id(erased)).await.unwrap(), None, "{erased} is erased");
    }

    let logical_ids: BTreeMap<String, String> = template_functions().into_iter().map(|(id, binary)| (binary, id)).collect();
    for row in FUNCTIONS {
        let Recorded { actions, partitions } = &recorded[row.binary];
        assert!(!actions.iter().any(|a| a.starts_with("unknown:")), "{}: {actions:?}", row.binary);
        let recordable: Vec<&str> = row.calls.iter().copied().filter(|m| !NOT_RECORDED.contains(m)).collect();
        let listed = actions_of(&recordable);
        // A row's action that only a path the emulator does not take needs (see the rows'
        // comments) is seen here through another call of the same function.
        let can_call = actions_of(row.calls);
        let missing: Vec<&String> = actions.difference(&can_call).collect();
        let unseen: Vec<&String> = listed.difference(actions).collect();
        assert!(missing.is_empty() && unseen.is_empty(), "{}: called but not in its rows {missing:?}; in its rows but never called {unseen:?}", row.binary);

        // An action granted on some partitions only: the partitions its requests named are
        // exactly its rows' (one outside them is refused by IAM; one never named is a row left
        // behind).
        for (action, scope) in table_grants(&logical_ids[row.binary]) {
            if scope.is_none() {
                continue;
            }
            let named: BTreeSet<String> = partitions.iter().filter(|(a, _)| *a == action).map(|(_, p)| p.clone()).collect();
            let listed = partitions_needed(row.calls, &action, &mut BTreeSet::new());
            assert_eq!(named, listed, "{}: the partitions its {action} requests named vs its ADAPTER_PARTITIONS rows", row.binary);
        }
    }
}
