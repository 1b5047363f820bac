//! Lambda function: PATCH /api/v1/prospects/{id} and /api/v1/prospects/external/{external_id}.

use std::sync::Arc;

use shared::adapters::dynamodb::DynamoStore;
use shared::config::{aws_sdk_config, TableConfig};
use shared::domain::SystemClock;
use shared::http::{router, Routes};
use shared::ports::{KeyStore, ProspectRepository};
use shared::service::ProspectService;
use shared::telemetry::{init, LogFormat};

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    init(LogFormat::Json);
    let table = TableConfig::from_env()?;
    let aws = aws_sdk_config().await;
    let store = Arc::new(DynamoStore::new(aws_sdk_dynamodb::Client::new(&aws), table.table_name));
    let repo: Arc<dyn ProspectRepository> = store.clone();
    let keys: Arc<dyn KeyStore> = store;
    let service = ProspectService::new(repo, None, keys, Arc::new(SystemClock));
    lambda_http::run(router(service, Routes::Status)).await
}
