//! The AWS job queue: campaign jobs as JSON messages on an SQS queue.

use async_trait::async_trait;
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
}

#[async_trait]
impl JobQueue for SqsQueue {
    async fn publish(&self, job: &CampaignJob, visible_at: OffsetDateTime) -> Result<(), StoreError> {
        let delay = (visible_at - OffsetDateTime::now_utc()).whole_seconds().clamp(0, self.max_delay_seconds);
        self.client
            .send_message()
            .queue_url(&self.queue_url)
            .message_body(job.to_json())
            .delay_seconds(i32::try_from(delay).unwrap_or(0))
            .send()
            .await
            .map_err(sdk_error)?;
        Ok(())
    }
}
