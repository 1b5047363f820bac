//! Spawns the real app for a test: the same router `cadenhq serve` and the Lambda functions
//! use, on a loopback port, over the embedded store (a fresh SQLite file) or over DynamoDB and
//! SQS (a fresh table and queue in the emulator that the test command starts). Every test gets
//! its own store, account and key.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use aws_sdk_sqs::config::interceptors::BeforeSerializationInterceptorContextMut;
use aws_sdk_sqs::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_sqs::error::BoxError;
use aws_sdk_sqs::operation::send_message::SendMessageInput;
use aws_sdk_sqs::operation::send_message_batch::SendMessageBatchInput;
use aws_sdk_sqs::types::MessageAttributeValue;
use futures::future::BoxFuture;
use serde_json::Value;
use shared::adapters::sqlite::{drain_due_jobs, SqliteStore};
use shared::adapters::sqs::handle_batch;
use shared::admin;
use shared::backend::Backend;
use shared::adapters::sqs::SqsQueue;
use shared::domain::{
    AccountId, Campaign, CampaignId, CampaignDefinition, CampaignJob, ClaimOwner, Clock, KeyId, NormalizedEmail, Prospect, ProspectStatus,
    RateLimit, SendKey, StatusReason, SendRecord, SendState, SendTally, SystemClock, UnsubscribeSecret,
};
use shared::adapters::sns_http::{HttpsGet, SnsVerifier};
use shared::http::{router_with_webhooks, KEY_HEADER};
use shared::ports::{
    ClaimRequest, ClaimResult, Delivered, JobQueue, MailError, Mailer, OutgoingEmail, ProspectKey, ProspectRef, ProspectRepository,
    Replacing, SendClaim, SendLog, StoreError, UpsertContext,
};
use shared::scheduler::{DeliverySettings, Scheduler};
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
    /// The provider proves it did not take the email (throttled, say).
    NotAccepted,
    /// The provider refuses the recipient for good.
    Reject,
    /// The provider took the email, but its answer never arrived (a timeout after the request).
    TookItButTimedOut,
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

    pub fn subjects(&self) -> Vec<String> {
        self.sent().into_iter().map(|e| e.subject).collect()
    }
}

#[async_trait]
impl Mailer for RecordingMailer {
    async fn send(&self, email: &OutgoingEmail, _claim: &SendClaim) -> Result<Delivered, MailError> {
        let fault = self.faults.lock().unwrap().pop();
        match fault {
            Some(MailFault::NotAccepted) => Err(MailError::NotAccepted("injected: the provider is throttling".into())),
            Some(MailFault::Reject) => Err(MailError::Rejected("injected: mailbox does not exist".into())),
            Some(MailFault::TookItButTimedOut) => {
                self.sent.lock().unwrap().push(email.clone());
                Err(MailError::Unknown("injected: the answer timed out".into()))
            }
            None => {
                self.sent.lock().unwrap().push(email.clone());
                Ok(Delivered { message_id: format!("test-{}", uuid::Uuid::new_v4().simple()), recorded: false })
            }
        }
    }
}

/// A send log in front of the backend's own that can lose answers, fail writes, or run
/// something (a PATCH, say) just before the next claim, to inject faults.
pub struct FaultySendLog {
    inner: Arc<dyn SendLog>,
    lose_next_claim_answer: AtomicBool,
    crash_after_next_claim: AtomicBool,
    failing_records: AtomicUsize,
    before_next_claim: Mutex<Option<BoxFuture<'static, ()>>>,
}

impl FaultySendLog {
    /// The next claim is written, its answer lost, and the write retried (as the SDK does).
    pub fn lose_next_claim_answer(&self) {
        self.lose_next_claim_answer.store(true, Ordering::SeqCst);
    }

    /// The next claim is written, then its worker stops (the job fails before sending).
    pub fn crash_after_next_claim(&self) {
        self.crash_after_next_claim.store(true, Ordering::SeqCst);
    }

    /// The next `n` outcome writes fail as if the store were unreachable.
    pub fn fail_next_records(&self, n: usize) {
        self.failing_records.store(n, Ordering::SeqCst);
    }

    /// Runs `f` between the scheduler's read of the prospect and its claim.
    pub fn before_next_claim(&self, f: BoxFuture<'static, ()>) {
        *self.before_next_claim.lock().unwrap() = Some(f);
    }
}

#[async_trait]
impl SendLog for FaultySendLog {
    async fn claim_send(&self, claim: &ClaimRequest) -> Result<ClaimResult, StoreError> {
        let hook = self.before_next_claim.lock().unwrap().take();
        if let Some(hook) = hook {
            hook.await;
        }
        if self.lose_next_claim_answer.swap(false, Ordering::SeqCst) {
            let lost = self.inner.claim_send(claim).await?;
            assert_eq!(lost, ClaimResult::Won, "the first write of the claim took it");
        }
        let result = self.inner.claim_send(claim).await?;
        if self.crash_after_next_claim.swap(false, Ordering::SeqCst) {
            return Err(StoreError::Unavailable("injected: the worker stopped after claiming".into()));
        }
        Ok(result)
    }

    async fn record_send(
        &self,
        prospect: &ProspectKey,
        key: SendKey,
        owner: ClaimOwner,
        state: &SendState,
        subject: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        if self.failing_records.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
            return Err(StoreError::Unavailable("injected send-log failure".into()));
        }
        self.inner.record_send(prospect, key, owner, state, subject, now).await
    }

    async fn send_record(&self, key: SendKey) -> Result<Option<SendRecord>, StoreError> {
        self.inner.send_record(key).await
    }

    async fn tally(&self, campaign: CampaignId) -> Result<SendTally, StoreError> {
        self.inner.tally(campaign).await
    }
}

/// A prospect repository in front of the backend's own whose status writes can be told to fail.
pub struct FaultyRepo {
    inner: Arc<dyn ProspectRepository>,
    failing_status_writes: AtomicUsize,
}

impl FaultyRepo {
    /// The next `n` status changes fail as if the store were unreachable.
    pub fn fail_next_status_writes(&self, n: usize) {
        self.failing_status_writes.store(n, Ordering::SeqCst);
    }
}

#[async_trait]
impl ProspectRepository for FaultyRepo {
    async fn upsert_context(&self, account: AccountId, email: &NormalizedEmail, campaign: Option<shared::domain::CampaignId>) -> Result<UpsertContext, StoreError> {
        self.inner.upsert_context(account, email, campaign).await
    }

    async fn insert(&self, prospect: Prospect) -> Result<(), StoreError> {
        self.inner.insert(prospect).await
    }

    async fn update(&self, previous: Replacing, updated: Prospect) -> Result<(), StoreError> {
        self.inner.update(previous, updated).await
    }

    async fn set_status(
        &self,
        account: AccountId,
        prospect: &ProspectRef,
        status: ProspectStatus,
        reason: StatusReason,
        now: OffsetDateTime,
    ) -> Result<Option<Prospect>, StoreError> {
        if self.failing_status_writes.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
            return Err(StoreError::Unavailable("injected status-write failure".into()));
        }
        self.inner.set_status(account, prospect, status, reason, now).await
    }

    async fn find(&self, account: AccountId, prospect: &ProspectRef) -> Result<Option<Prospect>, StoreError> {
        self.inner.find(account, prospect).await
    }

    async fn list(&self, query: &shared::domain::ListQuery) -> Result<shared::ports::ListPage, StoreError> {
        self.inner.list(query).await
    }

    async fn erase(&self, account: AccountId, prospect: &ProspectRef, now: OffsetDateTime) -> Result<Option<shared::domain::ProspectId>, StoreError> {
        self.inner.erase(account, prospect, now).await
    }
}

/// The message attribute in which [`ModelSqsDelays`] keeps when a message becomes visible.
const VISIBLE_AT: &str = "test-visible-at";

/// Plays SQS's message delays on the test's clock: the queue adapter computes each delay as
/// it would for SQS (from the injected clock, capped at SQS's 15 minutes); this interceptor
/// moves that delay into a message attribute (the visible time on the test clock) and sends
/// the message undelayed, and the test's queue driver holds it back until the clock gets there.
pub struct ModelSqsDelays(pub Arc<dyn Clock>);

impl ModelSqsDelays {
    fn attribute(&self, delay: Option<i32>) -> MessageAttributeValue {
        let at = self.0.now().unix_timestamp() + i64::from(delay.unwrap_or(0));
        MessageAttributeValue::builder().data_type("Number").string_value(at.to_string()).build().expect("attribute")
    }
}

impl std::fmt::Debug for ModelSqsDelays {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ModelSqsDelays")
    }
}

impl Intercept for ModelSqsDelays {
    fn name(&self) -> &'static str {
        "ModelSqsDelays"
    }

    fn modify_before_serialization(
        &self,
        context: &mut BeforeSerializationInterceptorContextMut<'_>,
        _components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let input = context.input_mut();
        if let Some(send) = input.downcast_mut::<SendMessageInput>() {
            assert!(send.delay_seconds.unwrap_or(0) <= 900, "SQS caps delays at 15 minutes");
            let attribute = self.attribute(send.delay_seconds.take());
            send.message_attributes.get_or_insert_with(HashMap::new).insert(VISIBLE_AT.into(), attribute);
        } else if let Some(batch) = input.downcast_mut::<SendMessageBatchInput>() {
            for entry in batch.entries.iter_mut().flatten() {
                assert!(entry.delay_seconds.unwrap_or(0) <= 900, "SQS caps delays at 15 minutes");
                let attribute = self.attribute(entry.delay_seconds.take());
                entry.message_attributes.get_or_insert_with(HashMap::new).insert(VISIBLE_AT.into(), attribute);
            }
        }
        Ok(())
    }
}

/// A message taken off the emulator's queue, waiting in the test's driver until it is visible.
#[derive(Debug, Clone)]
struct Pending {
    visible_at: i64,
    id: String,
    body: String,
}

/// The one SNS topic test apps accept on POST /webhooks/ses.
pub const SNS_TEST_TOPIC: &str = "arn:aws:sns:us-east-1:123456789012:cadenhq-feedback";

/// An HTTPS client that fetches nothing: it records each URL and answers an empty body, so a
/// certificate missing from the test folder is a failure to verify, and a subscription
/// confirmation is seen.
#[derive(Default)]
pub struct RecordingHttps(Mutex<Vec<String>>);

impl RecordingHttps {
    pub fn urls(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

#[async_trait]
impl HttpsGet for RecordingHttps {
    async fn get(&self, url: &str) -> Result<Vec<u8>, String> {
        self.0.lock().unwrap().push(url.to_owned());
        Ok(Vec::new())
    }
}

/// Runs tests/support/sign.py (in the test virtualenv, with the providers' libraries) with
/// `args`, `stdin` its input; its output, trimmed.
///
/// # Panics
/// When the virtualenv is missing (run the suite with scripts/test) or the script fails.
pub fn sign(args: &[&str], stdin: &str) -> String {
    use std::io::Write;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = root.join(".venv/bin/python");
    assert!(python.exists(), "{} is missing: run the suite with scripts/test, which installs the test tools", python.display());
    let mut child = std::process::Command::new(python)
        .arg(root.join("tests/support/sign.py"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run sign.py");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "sign.py {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// The certificate SNS test messages are signed with: made once per test run, in a folder
/// that seeds every test app's certificate cache (as CADENHQ_SNS_CERT_DIR does).
pub struct SnsSigner {
    pub dir: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub cert_url: String,
    _dir: tempfile::TempDir,
}

pub const SNS_TEST_CERT: &str = "SimpleNotificationService-0123456789abcdef0123456789abcdef.pem";

pub fn sns_test_signer() -> &'static SnsSigner {
    static SIGNER: std::sync::OnceLock<SnsSigner> = std::sync::OnceLock::new();
    SIGNER.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        sign(&["sns-cert", dir.path().to_str().unwrap(), SNS_TEST_CERT], "");
        let certs = dir.path().join("certs");
        std::fs::create_dir(&certs).unwrap();
        std::fs::rename(dir.path().join(SNS_TEST_CERT), certs.join(SNS_TEST_CERT)).unwrap();
        SnsSigner {
            dir: certs,
            key: dir.path().join(format!("{SNS_TEST_CERT}.key")),
            cert_url: format!("https://sns.us-east-1.amazonaws.com/{SNS_TEST_CERT}"),
            _dir: dir,
        }
    })
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
    /// What the app fetched over HTTPS (SNS certificates, subscription confirmations).
    pub https: Arc<RecordingHttps>,
    pub queue: Arc<FaultyQueue>,
    pub sends: Arc<FaultySendLog>,
    pub repo: Arc<FaultyRepo>,
    pub account: AccountId,
    pub key: String,
    pub campaign: Campaign,
    /// How many times the queue handed out a job, per step (0-based), since the app started.
    pub deliveries: Mutex<HashMap<u32, usize>>,
    embedded: Option<SqliteStore>,
    aws: Option<AwsResources>,
    /// AWS: messages taken off the emulator's queue that are not visible yet on the test clock.
    pending: Mutex<Vec<Pending>>,
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

/// Receives every visible message of an SQS queue with its attributes, hiding them for five
/// minutes.
pub async fn receive_all(sqs: &aws_sdk_sqs::Client, queue_url: &str) -> Vec<aws_sdk_sqs::types::Message> {
    let mut all = Vec::new();
    loop {
        let out = sqs
            .receive_message()
            .queue_url(queue_url)
            .max_number_of_messages(10)
            .visibility_timeout(300)
            .message_attribute_names("All")
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
        let clock = Arc::new(ManualClock(Mutex::new(OffsetDateTime::now_utc())));
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
                // Delays as SQS would give them, on the test's clock (see ModelSqsDelays).
                let publishing = aws_sdk_sqs::Client::from_conf(
                    aws_sdk_sqs::config::Builder::from(&sdk).interceptor(ModelSqsDelays(clock.clone())).build(),
                );
                let queue = SqsQueue::new(publishing, &queue_url).with_clock(clock.clone());
                let backend = Backend { queue: Some(Arc::new(queue)), ..Backend::aws(&sdk, &table, None) };
                (backend, None, Some(AwsResources { sqs, queue_url, sdk, table }))
            }
        };
        let queue = Arc::new(FaultyQueue { inner: base_backend.queue.clone().expect("backend has a queue"), failures_left: AtomicUsize::new(0), delay_ms: AtomicUsize::new(0) });
        let sends = Arc::new(FaultySendLog {
            inner: base_backend.sends.clone(),
            lose_next_claim_answer: AtomicBool::new(false),
            crash_after_next_claim: AtomicBool::new(false),
            failing_records: AtomicUsize::new(0),
            before_next_claim: Mutex::new(None),
        });
        let repo = Arc::new(FaultyRepo { inner: base_backend.repo.clone(), failing_status_writes: AtomicUsize::new(0) });
        let backend = Backend {
            queue: Some(queue.clone() as Arc<dyn JobQueue>),
            sends: sends.clone() as Arc<dyn SendLog>,
            repo: repo.clone() as Arc<dyn ProspectRepository>,
            ..base_backend
        };
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
        let https = Arc::new(RecordingHttps::default());
        let sns = SnsVerifier::new(vec![SNS_TEST_TOPIC.to_owned()], https.clone()).with_cert_dir(&sns_test_signer().dir).expect("the test certificate");
        let app = router_with_webhooks(service, backend.webhook_service(clock.clone(), sns));
        tokio::spawn(async move { axum::serve(listener, app).await });

        Self {
            clock,
            mailer,
            scheduler,
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
            backend,
            https,
            queue,
            sends,
            repo,
            account: account.id,
            key: key.expose().to_owned(),
            campaign,
            deliveries: Mutex::new(HashMap::new()),
            embedded,
            aws,
            pending: Mutex::new(Vec::new()),
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

    /// Every campaign job waiting in the queue, due or not.
    pub async fn queued_jobs(&self) -> Vec<CampaignJob> {
        if let Some(store) = &self.embedded {
            return store.queued_jobs().await.unwrap();
        }
        self.pull_from_emulator().await;
        let pending = self.pending.lock().unwrap();
        pending.iter().map(|m| serde_json::from_str(&m.body).expect("job body")).collect()
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

    /// The send record of a step (0-based) of the prospect's first enrollment.
    pub async fn send_record(&self, email: &str, step: u32) -> Option<SendRecord> {
        let prospect = self.prospect(by_email(email)).await.expect("prospect");
        let key = SendKey { enrollment: prospect.enrollments[0].id, step };
        self.backend.sends.send_record(key).await.expect("read send record")
    }

    /// The state names of the first `steps` send records of the prospect's first enrollment
    /// (`-` where a step has none).
    pub async fn send_states(&self, email: &str, steps: u32) -> Vec<String> {
        let mut states = Vec::new();
        for step in 0..steps {
            states.push(self.send_record(email, step).await.map_or("-".to_owned(), |r| r.state.name().to_owned()));
        }
        states
    }

    fn count_delivery(&self, body: &str) {
        if let Ok(job) = serde_json::from_str::<CampaignJob>(body) {
            *self.deliveries.lock().unwrap().entry(job.step).or_default() += 1;
        }
    }

    /// How many times the queue handed out a job of `step` (0-based).
    pub fn deliveries_of(&self, step: u32) -> usize {
        self.deliveries.lock().unwrap().get(&step).copied().unwrap_or(0)
    }

    /// Runs the scheduler until it is quiet, as the queue would: the embedded loop's pass, or
    /// the scheduler Lambda's SQS handler fed with what the queue holds and is visible on the
    /// test clock. Each job is delivered `deliveries` times. Returns how many messages were
    /// reported failed (AWS) or dead-lettered (embedded) in this tick.
    pub async fn tick(&self, deliveries: usize) -> usize {
        let mut failed = 0;
        for _ in 0..8 {
            let before = self.mailer.sent().len();
            let handled = match &self.embedded {
                Some(store) if deliveries == 1 => {
                    let dead_before = store.dead_jobs().await.unwrap().len();
                    for job in store.queued_jobs_visible(self.clock.now()).await.unwrap() {
                        self.count_delivery(&job);
                    }
                    let handled = drain_due_jobs(&self.scheduler, store).await.unwrap();
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
                            self.count_delivery(&job.body);
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
                    let due = self.take_visible().await;
                    let mut event = aws_lambda_events::event::sqs::SqsEvent::default();
                    for m in &due {
                        for _ in 0..deliveries {
                            self.count_delivery(&m.body);
                            let mut record = aws_lambda_events::event::sqs::SqsMessage::default();
                            record.message_id = Some(m.id.clone());
                            record.body = Some(m.body.clone());
                            event.records.push(record);
                        }
                    }
                    let response = handle_batch(&self.scheduler, event).await;
                    let failures: std::collections::HashSet<_> =
                        response.batch_item_failures.iter().map(|f| f.item_identifier.clone()).collect();
                    // A failed message comes back after the queue's visibility timeout.
                    let visible_again = (self.clock.now() + Duration::seconds(180)).unix_timestamp();
                    for m in &due {
                        if failures.contains(&m.id) {
                            failed += 1;
                            self.pending.lock().unwrap().push(Pending { visible_at: visible_again, ..m.clone() });
                        }
                    }
                    due.len()
                }
            };
            if handled == 0 || self.mailer.sent().len() == before {
                break;
            }
        }
        failed
    }

    /// AWS: takes every message off the emulator's queue into the pending list, and returns
    /// (and removes) those visible on the test clock.
    async fn take_visible(&self) -> Vec<Pending> {
        self.pull_from_emulator().await;
        let now = self.clock.now().unix_timestamp();
        let mut pending = self.pending.lock().unwrap();
        let (due, later): (Vec<Pending>, Vec<Pending>) = pending.drain(..).partition(|p| p.visible_at <= now);
        *pending = later;
        due
    }

    /// AWS: moves every message of the emulator's queue into the pending list.
    async fn pull_from_emulator(&self) {
        let aws = self.aws.as_ref().expect("aws resources");
        for m in receive_all(&aws.sqs, &aws.queue_url).await {
            let visible_at = m
                .message_attributes()
                .and_then(|a| a.get(VISIBLE_AT))
                .and_then(|v| v.string_value())
                .and_then(|v| v.parse().ok())
                .unwrap_or(i64::MIN);
            aws.sqs.delete_message().queue_url(&aws.queue_url).receipt_handle(m.receipt_handle().unwrap_or_default()).send().await.unwrap();
            let pending = Pending { visible_at, id: m.message_id().unwrap_or_default().to_owned(), body: m.body().unwrap_or_default().to_owned() };
            self.pending.lock().unwrap().push(pending);
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
