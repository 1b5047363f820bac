//! The AWS job queue: campaign jobs as JSON messages on an SQS queue.

use async_trait::async_trait;
use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
use aws_sdk_sqs::Client;
use time::OffsetDateTime;

use super::dynamodb::sdk_error;
use crate::domain::CampaignJob;
use crate::ports::{JobQueue, StoreError};

/// The longest delay SQS can give a message.
pub const MAX_DELAY_SECONDS: i64 = 900;

/// Publishes campaign jobs to one SQS queue.
#[derive(Clone, Debug)]
pub struct SqsQueue {
    client: Client,
    queue_url: String,
    max_delay_seconds: i64,
}

impl SqsQueue {
    #[must_use]
    pub fn new(client: Client, queue_url: impl Into<String>) -> Self {
        Self { client, queue_url: queue_url.into(), max_delay_seconds: MAX_DELAY_SECONDS }
    }

    /// Caps message delays lower than SQS does. Tests that drive the scheduler with an
    /// injected clock use 0, so re-queued jobs come straight back and the clock decides.
    #[must_use]
    pub fn with_max_delay_seconds(mut self, seconds: i64) -> Self {
        self.max_delay_seconds = seconds.clamp(0, MAX_DELAY_SECONDS);
        self
    }

    fn delay_seconds(&self, visible_at: OffsetDateTime) -> i32 {
        let delay = (visible_at - OffsetDateTime::now_utc()).whole_seconds().clamp(0, self.max_delay_seconds);
        i32::try_from(delay).unwrap_or(0)
    }

    /// One `SendMessageBatch` of at most [`BATCH_MAX`] jobs; one result per job.
    async fn send_batch(&self, jobs: &[(CampaignJob, OffsetDateTime)]) -> Vec<Result<(), StoreError>> {
        let entries: Result<Vec<_>, _> = jobs
            .iter()
            .enumerate()
            .map(|(i, (job, visible_at))| {
                SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(job.to_json())
                    .delay_seconds(self.delay_seconds(*visible_at))
                    .build()
            })
            .collect();
        let entries = match entries {
            Ok(entries) => entries,
            Err(e) => return batch_failed(jobs.len(), &StoreError::other(e)),
        };
        let out = match self.client.send_message_batch().queue_url(&self.queue_url).set_entries(Some(entries)).send().await {
            Ok(out) => out,
            Err(e) => return batch_failed(jobs.len(), &sdk_error(e)),
        };
        let mut results: Vec<Result<(), StoreError>> = (0..jobs.len()).map(|_| Ok(())).collect();
        for failure in out.failed {
            let Some(slot) = failure.id.parse::<usize>().ok().and_then(|i| results.get_mut(i)) else { continue };
            let reason = format!("SQS refused the message: {} {}", failure.code, failure.message.unwrap_or_default());
            *slot = Err(if failure.sender_fault { StoreError::other(reason) } else { StoreError::Unavailable(reason.into()) });
        }
        results
    }
}

/// Entries a `SendMessageBatch` call takes at most.
pub const BATCH_MAX: usize = 10;

/// The result of every job of a batch whose call failed as a whole.
fn batch_failed(len: usize, error: &StoreError) -> Vec<Result<(), StoreError>> {
    let message = format!("SendMessageBatch failed: {error}");
    (0..len)
        .map(|_| match error {
            StoreError::Unavailable(_) => Err(StoreError::Unavailable(message.clone().into())),
            _ => Err(StoreError::other(message.clone())),
        })
        .collect()
}

#[async_trait]
impl JobQueue for SqsQueue {
    async fn publish(&self, job: &CampaignJob, visible_at: OffsetDateTime) -> Result<(), StoreError> {
        self.client
            .send_message()
            .queue_url(&self.queue_url)
            .message_body(job.to_json())
            .delay_seconds(self.delay_seconds(visible_at))
            .send()
            .await
            .map_err(sdk_error)?;
        Ok(())
    }

    async fn publish_batch(&self, jobs: &[(CampaignJob, OffsetDateTime)]) -> Vec<Result<(), StoreError>> {
        let mut results = Vec::with_capacity(jobs.len());
        for chunk in jobs.chunks(BATCH_MAX) {
            results.extend(self.send_batch(chunk).await);
        }
        results
    }
}
