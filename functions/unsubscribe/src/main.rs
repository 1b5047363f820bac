//! Lambda function: `GET` and `POST /unsubscribe/{token}`, the one-click unsubscribe link of
//! every campaign email.

use std::sync::Arc;

use shared::adapters::dynamodb::DynamoStore;
use shared::config::{aws_sdk_config, unsubscribe_secret_from_aws, TableConfig};
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
    let secret = unsubscribe_secret_from_aws(&aws).await?;
    let store = Arc::new(DynamoStore::new(aws_sdk_dynamodb::Client::new(&aws), table.table_name));
    let repo: Arc<dyn ProspectRepository> = store.clone();
    let keys: Arc<dyn KeyStore> = store;
    let service = ProspectService::new(repo, None, keys, Arc::new(SystemClock)).with_unsubscribe_secret(secret);
    lambda_http::run(router(service, Routes::Unsubscribe)).await
}
