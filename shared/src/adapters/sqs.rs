//! The AWS job queue: campaign jobs as JSON messages on an SQS queue, and the scheduler
//! function's entry point that consumes them ([`handle_batch`]).

use std::sync::Arc;

use async_trait::async_trait;
use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent};
use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
use aws_sdk_sqs::Client;
use time::OffsetDateTime;
use tracing::warn;

use super::dynamodb::sdk_error;
use crate::domain::{CampaignJob, Clock, SystemClock};
use crate::ports::{JobQueue, StoreError};
use crate::scheduler::{parse_job, Handled, Scheduler};

/// The longest delay SQS can give a message.
pub const MAX_DELAY_SECONDS: i64 = 900;

/// Publishes campaign jobs to one SQS queue.
#[derive(Clone)]
pub struct SqsQueue {
    client: Client,
    queue_url: String,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for SqsQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqsQueue").field("queue_url", &self.queue_url).finish_non_exhaustive()
    }
}

impl SqsQueue {
    #[must_use]
    pub fn new(client: Client, queue_url: impl Into<String>) -> Self {
        Self { client, queue_url: queue_url.into(), clock: Arc::new(SystemClock) }
    }

    /// Computes delays from `clock` (the scheduler's), not the wall clock.
    #[must_use]
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The message delay that makes a job visible at `visible_at`, capped at what SQS allows.
    fn delay_seconds(&self, visible_at: OffsetDateTime) -> i32 {
        let delay = (visible_at - self.clock.now()).whole_seconds().clamp(0, MAX_DELAY_SECONDS);
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

/// The SQS entry point of the scheduler function: each message is parsed and handled on its
/// own, and only the ids of those that failed are returned (`ReportBatchItemFailures`), so one
/// bad message never fails the batch; SQS redelivers the failed ones and, past the queue's
/// `maxReceiveCount`, moves them to the dead-letter queue.
///
/// The jobs the batch hands back to the queue (re-queued early jobs, retries, next steps) are
/// published together at the end, in as few calls as the queue allows (one `SendMessageBatch`
/// per 10); a message whose follow-up job was not taken is reported failed, so SQS delivers it
/// again and its send record decides what happens then.
pub async fn handle_batch(scheduler: &Scheduler, event: SqsEvent) -> SqsBatchResponse {
    let mut failed = Vec::new();
    let mut follow_ups = Vec::new();
    for record in event.records {
        let id = record.message_id.unwrap_or_default();
        let body = record.body.as_deref().unwrap_or_default();
        let handled = match parse_job(body) {
            Ok(job) => scheduler.handle(&job).await,
            Err(e) => Err(e),
        };
        match handled {
            Ok(Handled { publish: Some(follow_up), .. }) => follow_ups.push((id, follow_up)),
            Ok(Handled { publish: None, .. }) => {}
            Err(e) => {
                warn!(message_id = %id, error = %e, "campaign job failed");
                failed.push(id);
            }
        }
    }
    if !follow_ups.is_empty() {
        let (ids, jobs): (Vec<String>, Vec<(CampaignJob, OffsetDateTime)>) = follow_ups.into_iter().unzip();
        let results = scheduler.queue().publish_batch(&jobs).await;
        for (id, result) in ids.into_iter().zip(results) {
            if let Err(e) = result {
                warn!(message_id = %id, error = %e, "campaign job's follow-up was not queued");
                failed.push(id);
            }
        }
    }
    let mut response = SqsBatchResponse::default();
    for id in failed {
        let mut failure = BatchItemFailure::default();
        failure.item_identifier = id;
        response.batch_item_failures.push(failure);
    }
    response
}
