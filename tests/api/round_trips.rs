//! How many DynamoDB and SQS calls each request and each campaign step costs on AWS, counted by
//! an SDK interceptor against the emulator. Counts are deterministic, so each is asserted
//! exactly: a change that adds a round trip fails here. The targets and where the design
//! stands against them: docs/benchmarks.md.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use aws_sdk_dynamodb::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_dynamodb::error::BoxError;
use serde_json::{json, Value};
use shared::adapters::sqs::SqsQueue;
use shared::admin;
use shared::backend::Backend;
use shared::domain::{CampaignDefinition, CampaignJob, Clock, RateLimit, SystemClock};
use shared::http::{router, Routes, KEY_HEADER};
use shared::adapters::sqs::handle_batch;
use shared::scheduler::{DeliverySettings, Scheduler};
use time::{Duration, OffsetDateTime};

use crate::helpers::{create_queues, create_table, emulator_sdk_config, test_secret, ModelSqsDelays, RecordingMailer, CAMPAIGN_FILE};

/// The AWS calls made, as `Service.Operation`, in order.
#[derive(Debug, Default)]
struct Calls(Mutex<Vec<String>>);

impl Calls {
    /// The calls since the last `take`, counted per operation.
    fn take(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for call in self.0.lock().unwrap().drain(..) {
            *counts.entry(call).or_default() += 1;
        }
        counts
    }
}

/// Records each operation once, after it is serialized and before its first attempt (so a
/// retry would not count twice), named from its `X-Amz-Target` header: DynamoDB and SQS both
/// speak the AWS JSON protocol.
#[derive(Debug)]
struct CountCalls(Arc<Calls>);

impl Intercept for CountCalls {
    fn name(&self) -> &'static str {
        "CountCalls"
    }

    fn read_after_serialization(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let target = context.request().headers().get("x-amz-target").unwrap_or("unknown.unknown");
        let (service, operation) = target.split_once('.').unwrap_or(("unknown", target));
        let service = if service.starts_with("DynamoDB") { "DynamoDB" } else if service.starts_with("AmazonSQS") { "SQS" } else { service };
        self.0 .0.lock().unwrap().push(format!("{service}.{operation}"));
        Ok(())
    }
}

/// A clock the test moves by hand.
struct TestClock(Mutex<OffsetDateTime>);

impl TestClock {
    fn advance(&self, by: Duration) {
        *self.0.lock().unwrap() += by;
    }
}

impl Clock for TestClock {
    fn now(&self) -> OffsetDateTime {
        *self.0.lock().unwrap()
    }
}

/// The app on the AWS backend in the emulator, with counting SDK clients, as one warm Lambda
/// instance serves it: the router on a loopback port and the scheduler's batch handler.
struct CountedApp {
    calls: Arc<Calls>,
    clock: Arc<TestClock>,
    mailer: Arc<RecordingMailer>,
    scheduler: Scheduler,
    base: String,
    http: reqwest::Client,
    key: String,
    /// An uncounted client that plays the Lambda event source: receives and deletes messages.
    sqs: aws_sdk_sqs::Client,
    queue_url: String,
    /// The backend over the counting clients, and its account.
    backend: Backend,
    account: shared::domain::AccountId,
}

impl CountedApp {
    /// The app with a key limited to `limit`.
    async fn spawn(limit: RateLimit) -> Self {
        let sdk = emulator_sdk_config().await;
        let table = format!("round-trips-{}", uuid::Uuid::new_v4().simple());
        create_table(&sdk, &table).await;
        let sqs = aws_sdk_sqs::Client::new(&sdk);
        let queue_url = create_queues(&sdk, &format!("round-trips-{}", uuid::Uuid::new_v4().simple())).await.url;

        let calls = Arc::new(Calls::default());
        let dynamo_config = aws_sdk_dynamodb::config::Builder::from(&sdk).interceptor(CountCalls(calls.clone())).build();
        let clock = Arc::new(TestClock(Mutex::new(OffsetDateTime::now_utc())));
        let sqs_config = aws_sdk_sqs::config::Builder::from(&sdk)
            .interceptor(CountCalls(calls.clone()))
            .interceptor(ModelSqsDelays(clock.clone()))
            .build();
        let counted_sqs = aws_sdk_sqs::Client::from_conf(sqs_config);
        let backend = Backend::aws_with_clients(aws_sdk_dynamodb::Client::from_conf(dynamo_config), &table, Some((counted_sqs.clone(), &queue_url)));
        // The same adapter over the same counting client, on the test's clock; its delays are
        // played by ModelSqsDelays, and every job published comes back at the next delivery:
        // the scheduler, not SQS, decides when a step is due.
        let backend = Backend { queue: Some(Arc::new(SqsQueue::new(counted_sqs, &queue_url).with_clock(clock.clone()))), ..backend };

        let store = backend.admin.as_ref();
        let account = admin::create_account(store, "Round trips", &SystemClock).await.unwrap();
        let (record, key) = admin::create_key(store, account.id, None, &SystemClock).await.unwrap();
        store.set_rate_limit(record.key_id, Some(limit)).await.unwrap();
        let definition = CampaignDefinition::parse(CAMPAIGN_FILE).unwrap();
        admin::create_campaign(store, account.id, definition, true, &SystemClock).await.unwrap();

        let mailer = Arc::new(RecordingMailer::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let settings = DeliverySettings { sender: "Acme <hello@acme.example>".into(), public_url: base.clone(), unsubscribe_secret: test_secret() };
        let scheduler = Scheduler::new(backend.scheduler_ports(mailer.clone(), clock.clone()).expect("queue"), settings);
        let app = router(backend.service(clock.clone()), Routes::All);
        tokio::spawn(async move { axum::serve(listener, app).await });

        let key = key.expose().to_owned();
        let app = Self { calls, clock, mailer, scheduler, base, http: reqwest::Client::new(), key, sqs, queue_url, backend, account: account.id };
        app.calls.take();
        app
    }

    /// Asserts the calls made since the last check, exactly, and prints them (`scripts/bench`
    /// shows them with `--nocapture`).
    fn check(&self, what: &str, expected: &[(&str, usize)]) {
        let actual = self.calls.take();
        let shown: Vec<String> = actual.iter().map(|(op, n)| format!("{n} {op}")).collect();
        println!("round trips | {what} | {}", shown.join(", "));
        let expected: BTreeMap<String, usize> = expected.iter().map(|(op, n)| ((*op).to_owned(), *n)).collect();
        assert_eq!(actual, expected, "{what}");
    }

    async fn request(&self, method: reqwest::Method, path: &str, body: &Value) -> (u16, Value) {
        let response = self
            .http
            .request(method, format!("{}/api/v1/prospects{path}", self.base))
            .header(KEY_HEADER, &self.key)
            .body(body.to_string())
            .send()
            .await
            .expect("request reaches the app");
        let status = response.status().as_u16();
        (status, response.json().await.expect("JSON body"))
    }

    /// POSTs a body; asserts the status; returns the prospect id.
    async fn post(&self, body: &Value, expected: u16) -> String {
        let (status, response) = self.request(reqwest::Method::POST, "", body).await;
        assert_eq!(status, expected, "{response}");
        response["prospect_id"].as_str().unwrap().to_owned()
    }

    async fn get(&self, path: &str, expected: u16) {
        let (status, response) = self.request(reqwest::Method::GET, path, &Value::Null).await;
        assert_eq!(status, expected, "{response}");
    }

    async fn patch(&self, path: &str, expected: u16) {
        let (status, response) = self.request(reqwest::Method::PATCH, path, &json!({"status": "converted"})).await;
        assert_eq!(status, expected, "{response}");
    }

    /// Every message visible on the queue, hidden for five minutes.
    async fn receive(&self) -> Vec<aws_sdk_sqs::types::Message> {
        crate::helpers::receive_all(&self.sqs, &self.queue_url).await
    }

    async fn delete(&self, messages: &[aws_sdk_sqs::types::Message]) {
        for m in messages {
            self.sqs.delete_message().queue_url(&self.queue_url).receipt_handle(m.receipt_handle().unwrap()).send().await.unwrap();
        }
    }

    /// Hands every queued job to the scheduler in one SQS event, as Lambda would (the queue
    /// holds at most 10 here, the function's batch size), and deletes them as Lambda does after
    /// a batch without failures. Returns the jobs delivered and the emails sent.
    async fn deliver(&self) -> (Vec<CampaignJob>, usize) {
        let messages = self.receive().await;
        assert!(messages.len() <= 10, "one batch at most: {} messages", messages.len());
        let mut event = aws_lambda_events::event::sqs::SqsEvent::default();
        for m in &messages {
            let mut record = aws_lambda_events::event::sqs::SqsMessage::default();
            record.message_id = m.message_id.clone();
            record.body = m.body.clone();
            event.records.push(record);
        }
        let sent_before = self.mailer.sent().len();
        let response = handle_batch(&self.scheduler, event).await;
        assert!(response.batch_item_failures.is_empty(), "no job failed");
        self.delete(&messages).await;
        let jobs = messages.iter().map(|m| serde_json::from_str(m.body().unwrap()).unwrap()).collect();
        (jobs, self.mailer.sent().len() - sent_before)
    }

    /// Empties the queue without handling anything.
    async fn discard(&self) {
        let messages = self.receive().await;
        self.delete(&messages).await;
    }
}

/// A limit no test reaches: its key takes leases of 100 requests from its bucket, so requests
/// after the first of an instance make no rate-limit write (see the last test for a lease's cost).
const GENEROUS: RateLimit = RateLimit { per_second: 10_000, burst: 10_000 };

fn prospect(n: u32) -> Value {
    json!({"email": format!("lead{n}@example.com"), "first_name": "Lee", "external_id": format!("crm-{n}"), "source": "landing_page"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_costs_these_round_trips_with_the_key_already_cached() {
    let app = CountedApp::spawn(GENEROUS).await;
    app.post(&prospect(0), 201).await;
    app.check(
        "POST new, cold instance (key read, last use recorded)",
        &[("DynamoDB.BatchGetItem", 1), ("DynamoDB.GetItem", 1), ("DynamoDB.TransactWriteItems", 1), ("DynamoDB.UpdateItem", 2), ("SQS.SendMessage", 1)],
    );

    // From here the key is cached and the rate limit leased.
    app.post(&prospect(1), 201).await;
    app.check("POST new", &[("DynamoDB.BatchGetItem", 1), ("DynamoDB.TransactWriteItems", 1), ("SQS.SendMessage", 1)]);
    app.post(&prospect(1), 200).await;
    app.check("POST existing, unchanged (writes nothing)", &[("DynamoDB.BatchGetItem", 1)]);
    app.post(&json!({"email": "lead1@example.com", "first_name": "Leah"}), 200).await;
    app.check("POST existing, changed (write conditional on the version read)", &[("DynamoDB.BatchGetItem", 1), ("DynamoDB.PutItem", 1)]);
    app.post(&json!({"email": "lead1@example.com", "external_id": "crm-1b"}), 200).await;
    app.check(
        "POST existing, new external_id (pointer moved in a transaction)",
        &[("DynamoDB.BatchGetItem", 1), ("DynamoDB.TransactWriteItems", 1)],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_costs_these_round_trips_with_the_key_already_cached() {
    let app = CountedApp::spawn(GENEROUS).await;
    let id = app.post(&prospect(0), 201).await;
    app.post(&prospect(1), 201).await;
    app.calls.take();

    // The pointer's GetItem (strongly consistent), the status UpdateItem.
    app.patch(&format!("/{id}"), 200).await;
    app.check("PATCH by id", &[("DynamoDB.GetItem", 1), ("DynamoDB.UpdateItem", 1)]);
    app.patch("/external/crm-1", 200).await;
    app.check("PATCH by external_id", &[("DynamoDB.GetItem", 1), ("DynamoDB.UpdateItem", 1)]);
    app.patch(&format!("/{}", uuid::Uuid::new_v4()), 404).await;
    app.check("PATCH of an unknown id", &[("DynamoDB.GetItem", 1)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_costs_these_round_trips_with_the_key_already_cached() {
    let app = CountedApp::spawn(GENEROUS).await;
    let id = app.post(&prospect(0), 201).await;
    app.calls.take();

    // The pointer's GetItem (strongly consistent), the prospect's: each step's outcome is kept
    // on the prospect item, and campaigns are kept as long as keys are.
    app.get(&format!("/{id}"), 200).await;
    app.check("GET by id, first of an instance (+ the campaign, then kept)", &[("DynamoDB.GetItem", 3)]);
    app.get(&format!("/{id}"), 200).await;
    app.check("GET by id", &[("DynamoDB.GetItem", 2)]);
    app.get("/external/crm-0", 200).await;
    app.check("GET by external_id", &[("DynamoDB.GetItem", 2)]);
    app.get(&format!("/{}", uuid::Uuid::new_v4()), 404).await;
    app.check("GET of an unknown id", &[("DynamoDB.GetItem", 1)]);

    // A page: one Query per shard of the listing index (whole items projected: no read
    // follows); an email filter is a lookup of the prospect's own item.
    app.post(&prospect(1), 201).await;
    app.calls.take();
    app.get("?limit=25", 200).await;
    app.check("GET a page of the listing", &[("DynamoDB.Query", 8)]);
    app.get("?email=lead1%40example.com", 200).await;
    app.check("GET the listing filtered by email", &[("DynamoDB.GetItem", 1)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_costs_one_read_and_one_transaction() {
    let app = CountedApp::spawn(GENEROUS).await;
    let id = app.post(&prospect(0), 201).await;
    app.post(&prospect(1), 201).await;
    app.calls.take();

    // The pointer (which names its sibling pointer), then one transaction: the item and both
    // pointers deleted, the suppression entry put.
    let (status, _) = app.request(reqwest::Method::DELETE, &format!("/{id}"), &Value::Null).await;
    assert_eq!(status, 200);
    app.check("DELETE by id", &[("DynamoDB.GetItem", 1), ("DynamoDB.TransactWriteItems", 1)]);
    let (status, _) = app.request(reqwest::Method::DELETE, "/external/crm-1", &Value::Null).await;
    assert_eq!(status, 200);
    app.check("DELETE by external_id", &[("DynamoDB.GetItem", 1), ("DynamoDB.TransactWriteItems", 1)]);
    let (status, _) = app.request(reqwest::Method::DELETE, &format!("/{id}"), &Value::Null).await;
    assert_eq!(status, 404);
    app.check("DELETE of an erased prospect", &[("DynamoDB.GetItem", 1)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_for_a_known_prospect_costs_at_most_two_calls() {
    use crate::feedback::{bounce, ses_notification, Naming};
    use shared::domain::{EmailReference, ProspectId, SendKey, SendState};

    let app = CountedApp::spawn(GENEROUS).await;
    let mut sent = Vec::new();
    for n in 0..3 {
        let id = ProspectId::parse(&app.post(&prospect(n), 201).await).unwrap();
        let (_, emails) = app.deliver().await;
        assert_eq!(emails, 1);
        app.discard().await;
        let found = app.backend.repo.find(app.account, &shared::ports::ProspectRef::Id(id)).await.unwrap().unwrap();
        let send = SendKey { enrollment: found.enrollments[0].id, step: 0 };
        let SendState::Sent { message_id } = app.backend.sends.send_record(send).await.unwrap().unwrap().state else { panic!("not sent") };
        sent.push((EmailReference { account: app.account, prospect: id, send }, message_id, format!("lead{n}@example.com")));
    }
    let feedback = app.backend.feedback_service(app.clock.clone());
    let now = app.clock.now();
    app.calls.take();

    // Tagged (the stack's configuration set): the FEEDBACK# put and the status write, in one
    // transaction.
    let (reference, message_id, email) = &sent[0];
    let notification = ses_notification(Naming::Tags(reference), "Bounce", message_id, email, now, bounce("fb-rt-1", "Permanent", "5.1.1"));
    feedback.apply_ses_notification(&notification).await.unwrap();
    app.check("feedback: a permanent bounce, tagged", &[("DynamoDB.TransactWriteItems", 1)]);
    // Named only by SES's message id: its MSG# item first.
    let (_, message_id, email) = &sent[1];
    let complaint = json!({"feedbackId": "fb-rt-2", "complaintFeedbackType": "abuse"});
    let notification = ses_notification(Naming::MessageId, "Complaint", message_id, email, now, complaint);
    feedback.apply_ses_notification(&notification).await.unwrap();
    app.check("feedback: a complaint, by SES's message id", &[("DynamoDB.GetItem", 1), ("DynamoDB.TransactWriteItems", 1)]);
    // A transient bounce: the address's recent bounces read, then one transaction.
    let (reference, message_id, email) = &sent[2];
    let notification = ses_notification(Naming::Tags(reference), "Bounce", message_id, email, now, bounce("fb-rt-3", "Transient", "4.2.2"));
    feedback.apply_ses_notification(&notification).await.unwrap();
    app.check("feedback: a transient bounce, tagged", &[("DynamoDB.GetItem", 1), ("DynamoDB.TransactWriteItems", 1)]);
    let delivery = ses_notification(Naming::Tags(reference), "Delivery", message_id, email, now, json!({"smtpResponse": "250 ok"}));
    feedback.apply_ses_notification(&delivery).await.unwrap();
    app.check("feedback: a delivery, tagged", &[("DynamoDB.UpdateItem", 1)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_is_read_once_per_cache_period_and_its_use_recorded_once_a_minute() {
    let app = CountedApp::spawn(GENEROUS).await;
    let body = prospect(0);
    app.post(&body, 201).await;
    app.calls.take();
    // After a clock step the rate-limit lease is over a second old: each such request takes a
    // new one (UpdateItem RATE#), apart from the key's own calls.
    let cached = [("DynamoDB.BatchGetItem", 1)];
    let cached_new_lease = [("DynamoDB.BatchGetItem", 1), ("DynamoDB.UpdateItem", 1)];

    app.post(&body, 200).await;
    app.check("key cached: POST existing at once", &cached);
    app.clock.advance(Duration::seconds(29));
    app.post(&body, 200).await;
    app.check("key cached: POST existing 29 s later (new rate-limit lease)", &cached_new_lease);

    app.clock.advance(Duration::seconds(2));
    app.post(&body, 200).await;
    app.check(
        "key cache expired at 31 s: key read again (last use 31 s ago: not recorded; new lease)",
        &[("DynamoDB.BatchGetItem", 1), ("DynamoDB.GetItem", 1), ("DynamoDB.UpdateItem", 1)],
    );
    app.post(&body, 200).await;
    app.check("key cached again", &cached);

    app.clock.advance(Duration::seconds(30));
    app.post(&body, 200).await;
    app.check(
        "key cache expired at 61 s: key read, last use recorded (once a minute; new lease)",
        &[("DynamoDB.BatchGetItem", 1), ("DynamoDB.GetItem", 1), ("DynamoDB.UpdateItem", 2)],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_costs_these_round_trips_per_step() {
    let app = CountedApp::spawn(GENEROUS).await;
    app.post(&prospect(0), 201).await;
    app.calls.take();
    let (jobs, sent) = app.deliver().await;
    assert_eq!((jobs.len(), sent), (1, 1));
    app.check(
        "scheduler, cold instance: first step (campaign read once, then kept)",
        &[("DynamoDB.GetItem", 2), ("DynamoDB.TransactWriteItems", 2), ("SQS.SendMessageBatch", 1)],
    );
    app.discard().await;

    // A step: read the prospect, claim the send (one transaction: the claim's put, conditional
    // on the prospect and the campaign), send, record the provider's message id (one
    // transaction: the record's update, conditional on the claim's owner, and the outcome
    // kept on the prospect item), publish the next (with the batch's other follow-ups: here
    // the batch is this one job).
    let step = [("DynamoDB.GetItem", 1), ("DynamoDB.TransactWriteItems", 2), ("SQS.SendMessageBatch", 1)];
    app.post(&prospect(1), 201).await;
    app.calls.take();
    let (jobs, sent) = app.deliver().await;
    assert_eq!((jobs[0].step, sent), (0, 1));
    app.check("scheduler: step 1 of 3 delivered", &step);

    let (jobs, sent) = app.deliver().await;
    assert_eq!((jobs[0].step, sent), (1, 0));
    app.check("scheduler: a job that is not due yet, re-queued unread", &[("SQS.SendMessageBatch", 1)]);

    app.clock.advance(Duration::seconds(600));
    let (jobs, sent) = app.deliver().await;
    assert_eq!((jobs[0].step, sent), (1, 1));
    app.check("scheduler: step 2 of 3 delivered", &step);

    app.clock.advance(Duration::seconds(259_200));
    let (jobs, sent) = app.deliver().await;
    assert_eq!((jobs[0].step, sent), (2, 1));
    app.check(
        "scheduler: last step delivered (its send record, sent, records the completion)",
        &[("DynamoDB.GetItem", 1), ("DynamoDB.TransactWriteItems", 2)],
    );
    assert!(app.receive().await.is_empty(), "nothing left to publish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_publishes_a_batch_of_follow_ups_in_one_call() {
    let app = CountedApp::spawn(GENEROUS).await;
    for n in 0..10 {
        app.post(&prospect(n), 201).await;
    }
    app.calls.take();
    let (jobs, sent) = app.deliver().await;
    assert_eq!((jobs.len(), sent), (10, 10));
    app.check(
        "scheduler: a batch of 10 first steps (campaign read once)",
        &[("DynamoDB.GetItem", 11), ("DynamoDB.TransactWriteItems", 20), ("SQS.SendMessageBatch", 1)],
    );

    let (jobs, sent) = app.deliver().await;
    assert_eq!((jobs.len(), sent), (10, 0));
    assert!(jobs.iter().all(|j| j.step == 1));
    app.check("scheduler: a batch of 10 jobs not due yet, re-queued unread", &[("SQS.SendMessageBatch", 1)]);
    assert_eq!(app.receive().await.len(), 10, "every job is back on the queue");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_bucket_is_written_once_per_lease() {
    // 20/s with bursts of 40: leases of 5 requests.
    let app = CountedApp::spawn(RateLimit::DEFAULT).await;
    let body = prospect(0);
    app.post(&body, 201).await;
    app.calls.take();
    for _ in 0..4 {
        app.post(&body, 200).await;
    }
    app.check("rate limit: 4 more requests on the first lease", &[("DynamoDB.BatchGetItem", 4)]);
    for _ in 0..35 {
        app.post(&body, 200).await;
    }
    app.check("rate limit: 35 more requests, 7 leases", &[("DynamoDB.BatchGetItem", 35), ("DynamoDB.UpdateItem", 7)]);
    // 40 requests at one instant: the whole burst. The next is denied by the TAT this instance
    // remembers, without a call.
    let (status, _) = app.request(reqwest::Method::POST, "", &body).await;
    assert_eq!(status, 429);
    app.check("rate limit: over the limit, 429", &[]);
    app.clock.advance(Duration::seconds(1));
    app.post(&body, 200).await;
    app.check("rate limit: a second later, a new lease", &[("DynamoDB.BatchGetItem", 1), ("DynamoDB.UpdateItem", 1)]);
}
