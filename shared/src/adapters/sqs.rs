//! The AWS job queue: campaign jobs as JSON messages on an SQS queue.

use async_trait::async_trait;
use aws_sdk_sqs::Client;

use super::dynamodb::sdk_error;
use crate::domain::CampaignJob;
use crate::ports::{JobQueue, StoreError};

/// Publishes campaign jobs to one SQS queue.
#[derive(Clone, Debug)]
pub struct SqsQueue {
    client: Client,
    queue_url: String,
}

impl SqsQueue {
    #[must_use]
    pub fn new(client: Client, queue_url: impl Into<String>) -> Self {
        Self { client, queue_url: queue_url.into() }
    }
}

#[async_trait]
impl JobQueue for SqsQueue {
    async fn publish(&self, job: &CampaignJob) -> Result<(), StoreError> {
        self.client
            .send_message()
            .queue_url(&self.queue_url)
            .message_body(job.to_json())
            .send()
            .await
            .map_err(sdk_error)?;
        Ok(())
    }
}
