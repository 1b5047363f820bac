//! `template.yaml` as the tests read it, and the AWS resources they run against, created in the
//! emulator from the template's own definitions: the table from `ProspectsTable` (attributes,
//! key schema, indexes with their projection, billing mode, TTL) and the job queue with its
//! dead-letter queue from `CampaignJobsQueue` and `CampaignJobsDeadLetterQueue` (their
//! attributes, the redrive policy pointing at the dead-letter queue just created). There is no
//! second schema to drift: a property of those resources that this module neither creates nor
//! lists as not emulated fails every test that creates them.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType, Projection, ProjectionType,
    ScalarAttributeType, TimeToLiveSpecification,
};
use aws_sdk_sqs::types::QueueAttributeName;
use serde_norway::Value;

/// Properties of the table the emulator does not model; everything else is created.
const TABLE_NOT_EMULATED: &[&str] = &["PointInTimeRecoverySpecification", "SSESpecification"];
/// Queue properties passed as the SQS attribute of the same name.
const QUEUE_ATTRIBUTES: &[&str] =
    &["VisibilityTimeout", "MessageRetentionPeriod", "DelaySeconds", "MaximumMessageSize", "ReceiveMessageWaitTimeSeconds", "SqsManagedSseEnabled"];

/// `template.yaml`, parsed once; CloudFormation's short-form tags (`!Ref`, `!GetAtt`, `!Sub`,
/// ...) are kept as tagged values.
pub fn template() -> &'static Value {
    static TEMPLATE: OnceLock<Value> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../template.yaml"));
        let text = std::fs::read_to_string(path).expect("read template.yaml");
        serde_norway::from_str(&text).expect("template.yaml parses, short-form tags included")
    })
}

/// The resource `logical_id` of the template.
///
/// # Panics
/// When the template has no such resource.
pub fn resource(logical_id: &str) -> &'static Value {
    let resource = &template()["Resources"][logical_id];
    assert!(resource.is_mapping(), "template.yaml has no resource {logical_id}");
    resource
}

/// The `Properties` of `logical_id`, by name; fails on any not in `handled`.
fn properties(logical_id: &str, handled: &[&str]) -> &'static serde_norway::Mapping {
    let properties = resource(logical_id)["Properties"].as_mapping().unwrap_or_else(|| panic!("{logical_id}: Properties"));
    for name in properties.keys() {
        let name = name.as_str().expect("a property name");
        assert!(handled.contains(&name), "{logical_id}.{name}: the tests do not create it yet; create it in tests/api/template.rs");
    }
    properties
}

fn str_of<'a>(value: &'a Value, what: &str) -> &'a str {
    value.as_str().unwrap_or_else(|| panic!("{what}: expected a string, found {value:?}"))
}

/// A plain value of the template with `!Ref` and `!GetAtt` resolved from `known` (logical id or
/// `LogicalId.Attribute` to its value in the emulator).
fn resolve(value: &Value, known: &BTreeMap<String, String>) -> serde_json::Value {
    match value {
        Value::Tagged(tagged) if tagged.tag == "Ref" || tagged.tag == "GetAtt" => {
            let name = str_of(&tagged.value, "a !Ref or !GetAtt");
            let found = known.get(name).unwrap_or_else(|| panic!("{} {name}: not created by the tests", tagged.tag));
            serde_json::Value::String(found.clone())
        }
        Value::Tagged(tagged) => panic!("{}: not resolved by the tests", tagged.tag),
        other => serde_json::to_value(other).expect("a plain value"),
    }
}

fn key_schema(value: &Value) -> Vec<KeySchemaElement> {
    value
        .as_sequence()
        .expect("KeySchema is a list")
        .iter()
        .map(|k| {
            KeySchemaElement::builder()
                .attribute_name(str_of(&k["AttributeName"], "AttributeName"))
                .key_type(KeyType::from(str_of(&k["KeyType"], "KeyType")))
                .build()
                .expect("key schema element")
        })
        .collect()
}

/// Creates table `name` as `ProspectsTable` defines it.
///
/// # Panics
/// When the emulator refuses it, or the definition has a property this module does not create.
pub async fn create_table(sdk: &aws_config::SdkConfig, name: &str) {
    let handled = ["BillingMode", "AttributeDefinitions", "KeySchema", "GlobalSecondaryIndexes", "TimeToLiveSpecification"];
    let p = properties("ProspectsTable", &[&handled[..], TABLE_NOT_EMULATED].concat());
    let client = aws_sdk_dynamodb::Client::new(sdk);
    let mut table = client
        .create_table()
        .table_name(name)
        .billing_mode(BillingMode::from(str_of(&p["BillingMode"], "BillingMode")))
        .set_key_schema(Some(key_schema(&p["KeySchema"])));
    for a in p["AttributeDefinitions"].as_sequence().expect("AttributeDefinitions is a list") {
        table = table.attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name(str_of(&a["AttributeName"], "AttributeName"))
                .attribute_type(ScalarAttributeType::from(str_of(&a["AttributeType"], "AttributeType")))
                .build()
                .expect("attribute definition"),
        );
    }
    for index in p.get("GlobalSecondaryIndexes").and_then(Value::as_sequence).into_iter().flatten() {
        let projection = &index["Projection"];
        let non_key = projection["NonKeyAttributes"].as_sequence().map(|n| n.iter().map(|a| str_of(a, "NonKeyAttributes").to_owned()).collect());
        table = table.global_secondary_indexes(
            GlobalSecondaryIndex::builder()
                .index_name(str_of(&index["IndexName"], "IndexName"))
                .set_key_schema(Some(key_schema(&index["KeySchema"])))
                .projection(
                    Projection::builder()
                        .projection_type(ProjectionType::from(str_of(&projection["ProjectionType"], "ProjectionType")))
                        .set_non_key_attributes(non_key)
                        .build(),
                )
                .build()
                .expect("global secondary index"),
        );
    }
    table.send().await.expect("create table in the emulator");

    if let Some(ttl) = p.get("TimeToLiveSpecification") {
        let spec = TimeToLiveSpecification::builder()
            .attribute_name(str_of(&ttl["AttributeName"], "TimeToLiveSpecification.AttributeName"))
            .enabled(ttl["Enabled"].as_bool().expect("TimeToLiveSpecification.Enabled"))
            .build()
            .expect("TTL specification");
        client.update_time_to_live().table_name(name).time_to_live_specification(spec).send().await.expect("enable TTL in the emulator");
    }
}

/// A job queue and its dead-letter queue in the emulator.
#[derive(Debug, Clone)]
pub struct Queues {
    pub url: String,
    pub dead_letter_url: String,
    pub dead_letter_arn: String,
}

/// Creates queue `logical_id` named `name`, `known` resolving its references; returns its URL
/// and ARN.
async fn create_queue(sqs: &aws_sdk_sqs::Client, logical_id: &str, name: &str, known: &BTreeMap<String, String>) -> (String, String) {
    let p = properties(logical_id, &[QUEUE_ATTRIBUTES, &["RedrivePolicy"]].concat());
    let mut request = sqs.create_queue().queue_name(name);
    for (property, value) in p {
        let property = str_of(property, "a property name");
        let value = match value.as_mapping() {
            // RedrivePolicy: its JSON, with its references resolved.
            Some(fields) => {
                let fields: serde_json::Map<String, serde_json::Value> =
                    fields.iter().map(|(k, v)| (str_of(k, "a field name").to_owned(), resolve(v, known))).collect();
                serde_json::Value::Object(fields).to_string()
            }
            None => match resolve(value, known) {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            },
        };
        request = request.attributes(QueueAttributeName::from(property), value);
    }
    let url = request.send().await.unwrap_or_else(|e| panic!("create {logical_id} in the emulator: {e:?}")).queue_url.expect("queue url");
    let arn = sqs
        .get_queue_attributes()
        .queue_url(&url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .expect("queue attributes")
        .attributes
        .and_then(|mut a| a.remove(&QueueAttributeName::QueueArn))
        .expect("queue arn");
    (url, arn)
}

/// Creates the job queue `name` and its dead-letter queue `name-dlq` as `CampaignJobsQueue` and
/// `CampaignJobsDeadLetterQueue` define them.
///
/// # Panics
/// When the emulator refuses them, or a definition has a property this module does not create.
pub async fn create_queues(sdk: &aws_config::SdkConfig, name: &str) -> Queues {
    let sqs = aws_sdk_sqs::Client::new(sdk);
    let mut known = BTreeMap::new();
    let (dead_letter_url, dead_letter_arn) = create_queue(&sqs, "CampaignJobsDeadLetterQueue", &format!("{name}-dlq"), &known).await;
    known.insert("CampaignJobsDeadLetterQueue".to_owned(), dead_letter_url.clone());
    known.insert("CampaignJobsDeadLetterQueue.Arn".to_owned(), dead_letter_arn.clone());
    let (url, _) = create_queue(&sqs, "CampaignJobsQueue", name, &known).await;
    Queues { url, dead_letter_url, dead_letter_arn }
}

#[tokio::test]
async fn the_emulated_table_and_queues_have_the_templates_settings() {
    let sdk = crate::helpers::emulator_sdk_config().await;
    let name = format!("template-{}", uuid::Uuid::new_v4().simple());

    create_table(&sdk, &name).await;
    let queues = create_queues(&sdk, &name).await;

    let dynamo = aws_sdk_dynamodb::Client::new(&sdk);
    let table = dynamo.describe_table().table_name(&name).send().await.unwrap().table.unwrap();
    let gsi = &table.global_secondary_indexes()[0];
    assert_eq!(gsi.index_name(), Some(shared::adapters::dynamodb::GSI1));
    assert_eq!(gsi.projection().and_then(|p| p.projection_type()), Some(&ProjectionType::All));
    assert_eq!(gsi.key_schema().len(), 2);
    let ttl = dynamo.describe_time_to_live().table_name(&name).send().await.unwrap().time_to_live_description.unwrap();
    assert_eq!(ttl.attribute_name(), Some("expires_at"));

    let sqs = aws_sdk_sqs::Client::new(&sdk);
    let attributes = sqs.get_queue_attributes().queue_url(&queues.url).attribute_names(QueueAttributeName::All).send().await.unwrap().attributes.unwrap();
    assert_eq!(attributes[&QueueAttributeName::VisibilityTimeout], "180");
    let redrive: serde_json::Value = serde_json::from_str(&attributes[&QueueAttributeName::RedrivePolicy]).unwrap();
    assert_eq!(redrive["deadLetterTargetArn"], queues.dead_letter_arn.as_str());
    assert_eq!(redrive["maxReceiveCount"].to_string().trim_matches('"'), "5");
    let dead_letter =
        sqs.get_queue_attributes().queue_url(&queues.dead_letter_url).attribute_names(QueueAttributeName::All).send().await.unwrap().attributes.unwrap();
    assert_eq!(dead_letter[&QueueAttributeName::MessageRetentionPeriod], "1209600");
}
