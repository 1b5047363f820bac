//! Spawns the real app for a test: the same router `cadenhq serve` and the Lambda functions
//! use, on a loopback port, over the embedded store (a fresh SQLite file) or over DynamoDB and
//! SQS (a fresh table and queue in the emulator that the test command starts). Every test gets
//! its own store, account and key.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde_json::Value;
use shared::adapters::sqlite::SqliteStore;
use shared::admin;
use shared::backend::Backend;
use shared::adapters::sqs::SqsQueue;
use shared::domain::{
    AccountId, Campaign, CampaignDefinition, CampaignJob, Clock, KeyId, RateLimit, SystemClock, UnsubscribeSecret,
};
use shared::http::{router, Routes, KEY_HEADER};
use shared::ports::{JobQueue, MailError, Mailer, OutgoingEmail, ProspectRef, StoreError};
use shared::scheduler::{drain_embedded, handle_sqs_batch, DeliverySettings, Scheduler};
use time::{Duration, OffsetDateTime};

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
    delay_ms: AtomicUsize,
}

impl FaultyQueue {
    /// Makes every publish take `ms` milliseconds longer (a slow queue).
    pub fn slow_down(&self, ms: usize) {
        self.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Makes the next `n` publishes fail as if the queue were unreachable.
    pub fn fail_next(&self, n: usize) {
        self.failures_left.store(n, Ordering::SeqCst);
    }
}

#[async_trait]
impl JobQueue for FaultyQueue {
    async fn publish(&self, job: &CampaignJob, visible_at: OffsetDateTime) -> Result<(), StoreError> {
        let injected = self
            .failures_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if injected {
            return Err(StoreError::Unavailable("injected queue failure".into()));
        }
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(delay as u64)).await;
        }
        self.inner.publish(job, visible_at).await
    }
}

/// A clock the test moves by hand.
pub struct ManualClock(Mutex<OffsetDateTime>);

impl ManualClock {
    pub fn advance(&self, by: Duration) {
        *self.0.lock().unwrap() += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        *self.0.lock().unwrap()
    }
}

/// What the recording mailer does with the next emails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MailFault {
    Transient,
    Reject,
}

/// A mailer that keeps what it is given, and can be told to fail.
#[derive(Default)]
pub struct RecordingMailer {
    pub sent: Mutex<Vec<OutgoingEmail>>,
    faults: Mutex<Vec<MailFault>>,
}

impl RecordingMailer {
    pub fn fail_next(&self, fault: MailFault) {
        self.faults.lock().unwrap().push(fault);
    }

    pub fn sent(&self) -> Vec<OutgoingEmail> {
        self.sent.lock().unwrap().clone()
    }
}

#[async_trait]
impl Mailer for RecordingMailer {
    async fn send(&self, email: &OutgoingEmail) -> Result<(), MailError> {
        let fault = self.faults.lock().unwrap().pop();
        match fault {
            Some(MailFault::Transient) => Err(MailError::Transient("injected provider failure".into())),
            Some(MailFault::Reject) => Err(MailError::Rejected("injected: mailbox does not exist".into())),
            None => {
                self.sent.lock().unwrap().push(email.clone());
                Ok(())
            }
        }
    }
}

/// The secret unsubscribe links of test apps are signed with.
pub fn test_secret() -> UnsubscribeSecret {
    UnsubscribeSecret::new(b"test-unsubscribe-secret-0123456789abcdef".to_vec()).unwrap()
}

/// Where the AWS backend's resources live, for reading them back.
pub struct AwsResources {
    pub sqs: aws_sdk_sqs::Client,
    pub queue_url: String,
    pub sdk: aws_config::SdkConfig,
    pub table: String,
}

/// A running app with one account and one key.
pub struct TestApp {
    pub clock: Arc<ManualClock>,
    pub mailer: Arc<RecordingMailer>,
    pub scheduler: Scheduler,
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

/// How the tests name a prospect: by its email.
pub fn by_email(email: &str) -> ProspectRef {
    ProspectRef::Email(shared::domain::NormalizedEmail::parse(email).unwrap())
}

/// Receives every visible message of an SQS queue, hiding them for five minutes.
pub async fn receive_all(sqs: &aws_sdk_sqs::Client, queue_url: &str) -> Vec<aws_sdk_sqs::types::Message> {
    let mut all = Vec::new();
    loop {
        let out = sqs
            .receive_message()
            .queue_url(queue_url)
            .max_number_of_messages(10)
            .visibility_timeout(300)
            .send()
            .await
            .expect("receive messages");
        let messages = out.messages.unwrap_or_default();
        if messages.is_empty() {
            return all;
        }
        all.extend(messages);
    }
}

/// The table and queues are created from template.yaml's own definitions.
pub use crate::template::{create_queues, create_table};

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
                let queue_url = create_queues(&sdk, &unique("jobs")).await.url;
                // Delays come from the injected clock: re-queued jobs come straight back.
                let queue = SqsQueue::new(sqs.clone(), &queue_url).with_max_delay_seconds(0);
                let backend = Backend { queue: Some(Arc::new(queue)), ..Backend::aws(&sdk, &table, None) };
                (backend, None, Some(AwsResources { sqs, queue_url, sdk, table }))
            }
        };
        let queue = Arc::new(FaultyQueue { inner: base_backend.queue.clone().expect("backend has a queue"), failures_left: AtomicUsize::new(0), delay_ms: AtomicUsize::new(0) });
        let backend = Backend { queue: Some(queue.clone() as Arc<dyn JobQueue>), ..base_backend };
        let account = admin::create_account(backend.admin.as_ref(), "Test account", &SystemClock).await.unwrap();
        let (record, key) = admin::create_key(backend.admin.as_ref(), account.id, Some("test".into()), &SystemClock).await.unwrap();
        // Tests send bursts under a frozen clock: a generous limit keeps them clear of it;
        // the rate-limit tests use keys of their own.
        backend.admin.set_rate_limit(record.key_id, Some(RateLimit::new(10_000, 10_000).unwrap())).await.unwrap();
        let campaign = admin::create_campaign(
            backend.admin.as_ref(),
            account.id,
            CampaignDefinition::parse(CAMPAIGN_FILE).unwrap(),
            true,
            &SystemClock,
        )
        .await
        .unwrap();

        let clock = Arc::new(ManualClock(Mutex::new(OffsetDateTime::now_utc())));
        let mailer = Arc::new(RecordingMailer::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ports = backend.scheduler_ports(mailer.clone(), clock.clone()).expect("queue");
        let settings = DeliverySettings {
            sender: "Acme <hello@acme.example>".into(),
            public_url: format!("http://{addr}"),
            unsubscribe_secret: test_secret(),
        };
        let scheduler = Scheduler::new(ports, settings);
        let service = backend.service(clock.clone()).with_unsubscribe_secret(test_secret());
        let app = router(service, Routes::All);
        tokio::spawn(async move { axum::serve(listener, app).await });

        Self {
            clock,
            mailer,
            scheduler,
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

    /// A further key of this app's account with the given rate limit.
    pub async fn key_with_limit(&self, per_second: u32, burst: u32) -> (KeyId, String) {
        let store = self.backend.admin.as_ref();
        let (record, key) = admin::create_key(store, self.account, Some("limited".into()), &SystemClock).await.unwrap();
        store.set_rate_limit(record.key_id, Some(RateLimit::new(per_second, burst).unwrap())).await.unwrap();
        (record.key_id, key.expose().to_owned())
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
        let (status, _, body) = self.send_with(method, path, key, &[], body).await;
        (status, body)
    }

    /// Like [`Self::send`], with extra request headers; also returns the response headers.
    pub async fn send_with(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&str>,
        headers: &[(&str, &str)],
        body: String,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.base)).body(body);
        if let Some(key) = key {
            request = request.header(KEY_HEADER, key);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.expect("request reaches the app");
        let status = response.status().as_u16();
        let response_headers = response.headers().clone();
        let content_type = response_headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        assert!(content_type.starts_with("application/json"), "status {status}: content-type {content_type:?}");
        let body: Value = response.json().await.expect("JSON body");
        (status, response_headers, body)
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
        let messages = self.receive_all().await;
        messages.iter().map(|m| serde_json::from_str(m.body().unwrap_or_default()).expect("job body")).collect()
    }

    /// Receives every visible message of the AWS queue, hiding them for five minutes.
    async fn receive_all(&self) -> Vec<aws_sdk_sqs::types::Message> {
        let aws = self.aws.as_ref().expect("aws resources");
        receive_all(&aws.sqs, &aws.queue_url).await
    }

    /// Everything the backend stores, as text: every SQLite table (and the database files'
    /// raw bytes), or every item of the DynamoDB table.
    pub async fn dump_store(&self) -> String {
        if self.embedded.is_some() {
            let mut out = String::new();
            for entry in std::fs::read_dir(self._dir.path()).unwrap() {
                let bytes = std::fs::read(entry.unwrap().path()).unwrap();
                out.push_str(&String::from_utf8_lossy(&bytes));
            }
            return out;
        }
        let aws = self.aws.as_ref().expect("aws resources");
        let client = aws_sdk_dynamodb::Client::new(&aws.sdk);
        let items = client.scan().table_name(&aws.table).send().await.unwrap().items.unwrap_or_default();
        format!("{items:?}")
    }

    /// Puts a raw message on the backend's queue, visible now.
    pub async fn enqueue_raw(&self, body: &str) {
        if let Some(store) = &self.embedded {
            return store.enqueue_raw(body.to_owned(), self.clock.now()).await.unwrap();
        }
        let aws = self.aws.as_ref().expect("aws resources");
        aws.sqs.send_message().queue_url(&aws.queue_url).message_body(body).send().await.unwrap();
    }

    /// Runs the scheduler until it is quiet, as the queue would: the embedded loop's pass, or
    /// the scheduler Lambda's SQS handler fed with what the queue holds. Each job is delivered
    /// `deliveries` times. Returns how many messages were reported failed (AWS) or
    /// dead-lettered (embedded) in this tick.
    pub async fn tick(&self, deliveries: usize) -> usize {
        let mut failed = 0;
        for _ in 0..8 {
            let before = self.mailer.sent().len();
            let handled = match &self.embedded {
                Some(store) if deliveries == 1 => {
                    let dead_before = store.dead_jobs().await.unwrap().len();
                    let handled = drain_embedded(&self.scheduler, store).await.unwrap();
                    failed += store.dead_jobs().await.unwrap().len() - dead_before;
                    handled
                }
                Some(store) => {
                    // Redelivery: every leased job handled `deliveries` times before its ack.
                    let now = self.clock.now();
                    let jobs = store.lease_due_jobs(now, now + Duration::minutes(2), 100).await.unwrap();
                    for job in &jobs {
                        let mut results = Vec::new();
                        for _ in 0..deliveries {
                            results.push(self.scheduler.process_message(&job.body).await);
                        }
                        if results.iter().all(Result::is_err) {
                            failed += 1;
                            store.dead_letter_job(job.id, "failed".into()).await.unwrap();
                        } else {
                            store.ack_job(job.id).await.unwrap();
                        }
                    }
                    jobs.len()
                }
                None => {
                    let aws = self.aws.as_ref().unwrap();
                    let messages = self.receive_all().await;
                    let mut event = aws_lambda_events::event::sqs::SqsEvent::default();
                    for m in &messages {
                        for _ in 0..deliveries {
                            let mut record = aws_lambda_events::event::sqs::SqsMessage::default();
                            record.message_id = m.message_id.clone();
                            record.body = m.body.clone();
                            event.records.push(record);
                        }
                    }
                    let response = handle_sqs_batch(&self.scheduler, event).await;
                    let failures: std::collections::HashSet<_> =
                        response.batch_item_failures.iter().map(|f| f.item_identifier.clone()).collect();
                    for m in &messages {
                        if failures.contains(m.message_id().unwrap_or_default()) {
                            failed += 1;
                        } else {
                            aws.sqs.delete_message().queue_url(&aws.queue_url).receipt_handle(m.receipt_handle().unwrap_or_default()).send().await.unwrap();
                        }
                    }
                    messages.len()
                }
            };
            if handled == 0 || self.mailer.sent().len() == before {
                break;
            }
        }
        failed
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
