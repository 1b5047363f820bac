//! A backend: every port bound to one set of adapters. `cadenhq` and the test suite pick one
//! at run time; the Lambda functions wire only the ports they use.

use std::path::Path;
use std::sync::Arc;

use crate::adapters::dynamodb::{DynamoRateLimiter, DynamoStore};
use crate::adapters::local_rate_limit::LocalRateLimiter;
use crate::adapters::sqlite::SqliteStore;
use crate::adapters::sqs::SqsQueue;
use crate::domain::{Clock, Prospect, SendKey, SendState};
use crate::feedback::FeedbackService;
use crate::ports::{
    FeedbackLog, IntegrationStore,
    AdminStore, IdempotencyStore, JobQueue, KeyStore, Mailer, ProspectRepository, PullQueue, RateLimiter, SendLog,
    StoreError,
};
use crate::scheduler::SchedulerPorts;
use crate::service::{ProspectService, ServicePorts};

/// How long a Lambda instance trusts a key it looked up: a revoked key stops working within
/// this time (promised: within 60 seconds).
pub const LAMBDA_KEY_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(30);

/// When an enrollment whose steps' records are `steps` completed its campaign: the time its
/// last step was sent (or found unknown, which is never resent); `None` while it has steps to
/// go, or when its last step was skipped.
#[must_use]
pub fn completed_at(steps: &[Option<crate::domain::SendRecord>]) -> Option<time::OffsetDateTime> {
    steps
        .last()?
        .as_ref()
        .filter(|r| matches!(r.state, SendState::Sent { .. } | SendState::Unknown { .. }))
        .map(|r| r.updated_at)
}

/// The ports of one backend.
#[derive(Clone)]
pub struct Backend {
    pub repo: Arc<dyn ProspectRepository>,
    pub keys: Arc<dyn KeyStore>,
    pub admin: Arc<dyn AdminStore>,
    pub sends: Arc<dyn SendLog>,
    pub feedback: Arc<dyn FeedbackLog>,
    pub integrations: Arc<dyn IntegrationStore>,
    pub idempotency: Arc<dyn IdempotencyStore>,
    pub limiter: Arc<dyn RateLimiter>,
    pub key_cache_ttl: std::time::Duration,
    pub queue: Option<Arc<dyn JobQueue>>,
    /// The same queue, when the process pulls due jobs from it itself (the embedded store's);
    /// `None` when the queue pushes them to a function (SQS).
    pub pull_queue: Option<Arc<dyn PullQueue>>,
    /// A mailer that keeps emails in the store instead of sending them (the embedded outbox).
    pub outbox: Option<Arc<dyn Mailer>>,
}

impl Backend {
    /// The send record of every step of every enrollment of `prospect` (`None` for a step never
    /// claimed), in the order of `prospect.enrollments`: where each email stands.
    ///
    /// # Errors
    /// [`StoreError`] on a backend failure.
    pub async fn send_records(&self, prospect: &Prospect) -> Result<Vec<Vec<Option<crate::domain::SendRecord>>>, StoreError> {
        let mut all = Vec::with_capacity(prospect.enrollments.len());
        for enrollment in &prospect.enrollments {
            let steps = self.admin.get_campaign(enrollment.campaign_id).await?.map_or(0, |c| c.steps.len());
            let mut records = Vec::with_capacity(steps);
            for step in (0..steps).filter_map(|s| u32::try_from(s).ok()) {
                records.push(self.sends.send_record(SendKey { enrollment: enrollment.id, step }).await?);
            }
            all.push(records);
        }
        Ok(all)
    }

    /// When each enrollment of `prospect` completed its campaign, in the order of
    /// `prospect.enrollments` (see [`completed_at`]).
    ///
    /// # Errors
    /// [`StoreError`] on a backend failure.
    pub async fn completions(&self, prospect: &Prospect) -> Result<Vec<Option<time::OffsetDateTime>>, StoreError> {
        Ok(self.send_records(prospect).await?.iter().map(|steps| completed_at(steps)).collect())
    }

    /// The embedded backend: one SQLite file in `data_dir`, job queue included.
    ///
    /// # Errors
    /// [`StoreError`] when the store cannot be opened.
    pub fn embedded(data_dir: &Path) -> Result<Self, StoreError> {
        let store = SqliteStore::open(data_dir)?;
        Ok(Self::from_embedded(&store))
    }

    /// The embedded backend over an already open store.
    #[must_use]
    pub fn from_embedded(store: &SqliteStore) -> Self {
        Self {
            repo: Arc::new(store.clone()),
            keys: Arc::new(store.clone()),
            admin: Arc::new(store.clone()),
            sends: Arc::new(store.clone()),
            feedback: Arc::new(store.clone()),
            integrations: Arc::new(store.clone()),
            idempotency: Arc::new(store.clone()),
            limiter: Arc::new(LocalRateLimiter::default()),
            key_cache_ttl: std::time::Duration::ZERO,
            queue: Some(Arc::new(store.clone())),
            pull_queue: Some(Arc::new(store.clone())),
            outbox: Some(Arc::new(store.clone())),
        }
    }

    /// The AWS backend: DynamoDB `table` and, if given, the SQS queue at `queue_url`.
    #[must_use]
    pub fn aws(sdk: &aws_config::SdkConfig, table: &str, queue_url: Option<&str>) -> Self {
        let sqs = queue_url.map(|url| (aws_sdk_sqs::Client::new(sdk), url));
        Self::aws_with_clients(aws_sdk_dynamodb::Client::new(sdk), table, sqs)
    }

    /// The AWS backend over clients built by the caller (with interceptors, say).
    #[must_use]
    pub fn aws_with_clients(client: aws_sdk_dynamodb::Client, table: &str, sqs: Option<(aws_sdk_sqs::Client, &str)>) -> Self {
        let store = DynamoStore::new(client.clone(), table);
        let queue = sqs.map(|(sqs, url)| Arc::new(SqsQueue::new(sqs, url)) as Arc<dyn JobQueue>);
        Self {
            repo: Arc::new(store.clone()),
            keys: Arc::new(store.clone()),
            admin: Arc::new(store.clone()),
            sends: Arc::new(store.clone()),
            feedback: Arc::new(store.clone()),
            integrations: Arc::new(store.clone()),
            idempotency: Arc::new(store),
            limiter: Arc::new(DynamoRateLimiter::new(client, table)),
            key_cache_ttl: LAMBDA_KEY_CACHE_TTL,
            queue,
            pull_queue: None,
            outbox: None,
        }
    }

    /// The scheduler's ports over this backend, sending through `mailer`; `None` without a
    /// queue.
    #[must_use]
    pub fn scheduler_ports(&self, mailer: Arc<dyn Mailer>, clock: Arc<dyn Clock>) -> Option<SchedulerPorts> {
        Some(SchedulerPorts {
            repo: Arc::clone(&self.repo),
            campaigns: Arc::clone(&self.admin),
            sends: Arc::clone(&self.sends),
            queue: self.queue.clone()?,
            mailer,
            statuses: self.service(Arc::clone(&clock)),
            clock,
        })
    }

    /// The feedback service over this backend (bounces, complaints and deliveries reported by
    /// mail providers).
    #[must_use]
    pub fn feedback_service(&self, clock: Arc<dyn Clock>) -> FeedbackService {
        FeedbackService::new(Arc::clone(&self.feedback), clock)
    }

    /// The incoming-webhooks service over this backend, verifying SNS messages with `sns`.
    #[must_use]
    pub fn webhook_service(&self, clock: Arc<dyn Clock>, sns: crate::adapters::sns_http::SnsVerifier) -> crate::webhooks::WebhookService {
        crate::webhooks::WebhookService::new(crate::webhooks::WebhookPorts {
            integrations: Arc::clone(&self.integrations),
            repo: Arc::clone(&self.repo),
            prospects: self.service(Arc::clone(&clock)),
            feedback: self.feedback_service(Arc::clone(&clock)),
            limiter: Arc::clone(&self.limiter),
            sns,
            clock,
        })
    }

    /// The prospects service over this backend.
    #[must_use]
    pub fn service(&self, clock: Arc<dyn Clock>) -> ProspectService {
        ProspectService::new(ServicePorts {
            repo: Arc::clone(&self.repo),
            queue: self.queue.clone(),
            campaigns: Arc::clone(&self.admin) as Arc<dyn crate::ports::CampaignReader>,
            keys: Arc::clone(&self.keys),
            idempotency: Arc::clone(&self.idempotency),
            limiter: Arc::clone(&self.limiter),
            clock,
            key_cache_ttl: self.key_cache_ttl,
        })
    }
}
