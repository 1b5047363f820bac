//! Lambda function: POST /api/v1/prospects.

use std::sync::Arc;

use shared::adapters::dynamodb::DynamoStore;
use shared::adapters::sqs::SqsQueue;
use shared::config::{aws_sdk_config, QueueConfig, TableConfig};
use shared::domain::SystemClock;
use shared::http::{router, Routes};
use shared::ports::{JobQueue, KeyStore, ProspectRepository};
use shared::service::ProspectService;
use shared::telemetry::{init, LogFormat};

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    init(LogFormat::Json);
    let table = TableConfig::from_env()?;
    let queue = QueueConfig::from_env()?;
    let aws = aws_sdk_config().await;
    let jobs: Arc<dyn JobQueue> = Arc::new(SqsQueue::new(aws_sdk_sqs::Client::new(&aws), queue.queue_url));
    let store = Arc::new(DynamoStore::new(aws_sdk_dynamodb::Client::new(&aws), table.table_name));
    let repo: Arc<dyn ProspectRepository> = store.clone();
    let keys: Arc<dyn KeyStore> = store;
    let service = ProspectService::new(repo, Some(jobs), keys, Arc::new(SystemClock));
    lambda_http::run(router(service, Routes::Upsert)).await
}
