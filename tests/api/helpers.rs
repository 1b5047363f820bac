//! Spawns the real app for a test: the same router `cadenhq serve` and the Lambda functions
//! use, on a loopback port, over the embedded store (a fresh SQLite file) or over DynamoDB and
//! SQS (a fresh table and queue in the emulator that the test command starts). Every test gets
//! its own store, account and key.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType, Projection,
    ProjectionType, ScalarAttributeType,
};
use serde_json::Value;
use shared::adapters::dynamodb::GSI1;
use shared::adapters::sqlite::SqliteStore;
use shared::admin;
use shared::backend::Backend;
use shared::domain::{AccountId, Campaign, CampaignDefinition, CampaignJob, SystemClock};
use shared::http::{router, Routes, KEY_HEADER};
use shared::ports::{JobQueue, ProspectRef, StoreError};

/// Which backend a contract test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Embedded,
    Aws,
}

/// A queue in front of the backend's own that can be told to fail, to inject faults.
pub struct FaultyQueue {
    inner: Arc<dyn JobQueue>,
    failures_left: AtomicUsize,
}

impl FaultyQueue {
    /// Makes the next `n` publishes fail as if the queue were unreachable.
    pub fn fail_next(&self, n: usize) {
        self.failures_left.store(n, Ordering::SeqCst);
    }
}

#[async_trait]
impl JobQueue for FaultyQueue {
    async fn publish(&self, job: &CampaignJob) -> Result<(), StoreError> {
        let injected = self
            .failures_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if injected {
            return Err(StoreError::Unavailable("injected queue failure".into()));
        }
        self.inner.publish(job).await
    }
}

/// Where the AWS backend's resources live, for reading them back.
pub struct AwsResources {
    pub sqs: aws_sdk_sqs::Client,
    pub queue_url: String,
}

/// A running app with one account and one key.
pub struct TestApp {
    pub base: String,
    pub http: reqwest::Client,
    pub backend: Backend,
    pub queue: Arc<FaultyQueue>,
    pub account: AccountId,
    pub key: String,
    pub campaign: Campaign,
    embedded: Option<SqliteStore>,
    aws: Option<AwsResources>,
    _dir: tempfile::TempDir,
}

/// A three-step campaign file.
pub const CAMPAIGN_FILE: &str = r#"{"name":"Conversion","steps":[
    {"delay_seconds":0,"subject":"Hi {{first_name}}","body":"Welcome"},
    {"delay_seconds":600,"subject":"Tips","body":"Here are tips"},
    {"delay_seconds":259200,"subject":"Last call","body":"Talk to us"}]}"#;

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// The emulator's SDK configuration.
///
/// # Panics
/// When `AWS_ENDPOINT_URL` is unset: the AWS half of the suite needs the emulator that
/// `scripts/test` starts, and fails rather than skipping without it.
pub async fn emulator_sdk_config() -> aws_config::SdkConfig {
    assert!(
        std::env::var("AWS_ENDPOINT_URL").is_ok_and(|v| !v.is_empty()),
        "AWS_ENDPOINT_URL is not set: run the suite with scripts/test, which starts the AWS emulator"
    );
    shared::config::aws_sdk_config().await
}

/// Creates a table with the production schema (see template.yaml).
pub async fn create_table(sdk: &aws_config::SdkConfig, name: &str) {
    let client = aws_sdk_dynamodb::Client::new(sdk);
    let attr = |n: &str| AttributeDefinition::builder().attribute_name(n).attribute_type(ScalarAttributeType::S).build().unwrap();
    let key = |n: &str, t: KeyType| KeySchemaElement::builder().attribute_name(n).key_type(t).build().unwrap();
    client
        .create_table()
        .table_name(name)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(attr("pk"))
        .attribute_definitions(attr("gsi1pk"))
        .attribute_definitions(attr("gsi1sk"))
        .key_schema(key("pk", KeyType::Hash))
        .global_secondary_indexes(
            GlobalSecondaryIndex::builder()
                .index_name(GSI1)
                .key_schema(key("gsi1pk", KeyType::Hash))
                .key_schema(key("gsi1sk", KeyType::Range))
                .projection(Projection::builder().projection_type(ProjectionType::All).build())
                .build()
                .unwrap(),
        )
        .send()
        .await
        .expect("create table in the emulator");
}

impl TestApp {
    /// Spawns the app on `kind` with an account, its key and a default 3-step campaign.
    pub async fn spawn(kind: Kind) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let (base_backend, embedded, aws) = match kind {
            Kind::Embedded => {
                let store = SqliteStore::open(dir.path()).expect("open store");
                (Backend::from_embedded(&store), Some(store), None)
            }
            Kind::Aws => {
                let sdk = emulator_sdk_config().await;
                let table = unique("prospects");
                create_table(&sdk, &table).await;
                let sqs = aws_sdk_sqs::Client::new(&sdk);
                let queue_url = sqs.create_queue().queue_name(unique("jobs")).send().await.expect("create queue").queue_url.unwrap();
                let backend = Backend::aws(&sdk, &table, Some(&queue_url));
                (backend, None, Some(AwsResources { sqs, queue_url }))
            }
        };
        let queue = Arc::new(FaultyQueue { inner: base_backend.queue.clone().expect("backend has a queue"), failures_left: AtomicUsize::new(0) });
        let backend = Backend { queue: Some(queue.clone() as Arc<dyn JobQueue>), ..base_backend };
        let account = admin::create_account(backend.admin.as_ref(), "Test account", &SystemClock).await.unwrap();
        let (_, key) = admin::create_key(backend.admin.as_ref(), account.id, Some("test".into()), &SystemClock).await.unwrap();
        let campaign = admin::create_campaign(
            backend.admin.as_ref(),
            account.id,
            CampaignDefinition::parse(CAMPAIGN_FILE).unwrap(),
            true,
            &SystemClock,
        )
        .await
        .unwrap();

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = router(backend.service(Arc::new(SystemClock)), Routes::All);
        tokio::spawn(async move { axum::serve(listener, app).await });

        Self {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
            backend,
            queue,
            account: account.id,
            key: key.expose().to_owned(),
            campaign,
            embedded,
            aws,
            _dir: dir,
        }
    }

    /// A second account with its own key, on the same backend.
    pub async fn other_account(&self) -> (AccountId, String) {
        let store = self.backend.admin.as_ref();
        let account = admin::create_account(store, "Other account", &SystemClock).await.unwrap();
        let (_, key) = admin::create_key(store, account.id, None, &SystemClock).await.unwrap();
        (account.id, key.expose().to_owned())
    }

    /// Another campaign of this app's account.
    pub async fn create_campaign(&self, name: &str) -> Campaign {
        let def = CampaignDefinition::parse(&CAMPAIGN_FILE.replace("Conversion", name)).unwrap();
        admin::create_campaign(self.backend.admin.as_ref(), self.account, def, false, &SystemClock).await.unwrap()
    }

    /// POSTs a JSON body with this app's key.
    pub async fn post(&self, body: &Value) -> (u16, Value) {
        self.post_as(&self.key, body).await
    }

    pub async fn post_as(&self, key: &str, body: &Value) -> (u16, Value) {
        self.send(reqwest::Method::POST, "/api/v1/prospects", Some(key), body.to_string()).await
    }

    /// PATCHes a path under /api/v1/prospects/ with this app's key.
    pub async fn patch(&self, path: &str, body: &Value) -> (u16, Value) {
        self.send(reqwest::Method::PATCH, &format!("/api/v1/prospects/{path}"), Some(&self.key), body.to_string()).await
    }

    /// Sends any request; returns the status and the parsed JSON body, checking that every
    /// response is JSON.
    pub async fn send(&self, method: reqwest::Method, path: &str, key: Option<&str>, body: String) -> (u16, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.base)).body(body);
        if let Some(key) = key {
            request = request.header(KEY_HEADER, key);
        }
        let response = request.send().await.expect("request reaches the app");
        let status = response.status().as_u16();
        let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        assert!(content_type.starts_with("application/json"), "status {status}: content-type {content_type:?}");
        let body: Value = response.json().await.expect("JSON body");
        (status, body)
    }

    /// Reads a prospect of this app's account straight from the store.
    pub async fn prospect(&self, by: ProspectRef) -> Option<shared::domain::Prospect> {
        self.backend.repo.find(self.account, &by).await.expect("read prospect")
    }

    /// Every campaign job published so far (drains the AWS queue: call once per test).
    pub async fn queued_jobs(&self) -> Vec<CampaignJob> {
        if let Some(store) = &self.embedded {
            return store.queued_jobs().await.unwrap();
        }
        let aws = self.aws.as_ref().expect("aws resources");
        let mut jobs = Vec::new();
        loop {
            let out = aws
                .sqs
                .receive_message()
                .queue_url(&aws.queue_url)
                .max_number_of_messages(10)
                .visibility_timeout(300)
                .send()
                .await
                .expect("receive messages");
            let messages = out.messages.unwrap_or_default();
            if messages.is_empty() {
                return jobs;
            }
            for m in messages {
                jobs.push(serde_json::from_str(m.body().unwrap_or_default()).expect("job body"));
            }
        }
    }
}

/// Declares each async test `fn name(kind: Kind)` once per backend:
/// `embedded::name` and `aws::name`.
#[macro_export]
macro_rules! contract_tests {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::Kind::Embedded).await;
                }
            )*
        }
        mod aws {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::Kind::Aws).await;
                }
            )*
        }
    };
}
