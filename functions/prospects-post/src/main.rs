//! Lambda function: POST /api/v1/prospects.

use std::sync::Arc;

use shared::backend::Backend;
use shared::config::{aws_sdk_config, QueueConfig, TableConfig};
use shared::domain::SystemClock;
use shared::http::{router, Routes};
use shared::telemetry::{init, LogFormat};

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    init(LogFormat::Json);
    let (table, queue) = (TableConfig::from_env()?, QueueConfig::from_env()?);
    let aws = aws_sdk_config().await;
    let backend = Backend::aws(&aws, &table.table_name, Some(&queue.queue_url));
    lambda_http::run(router(backend.service(Arc::new(SystemClock)), Routes::Upsert)).await
}
