//! Lambda function: `GET` and `POST /unsubscribe/{token}`, the one-click unsubscribe link of
//! every campaign email.

use std::sync::Arc;

use shared::backend::Backend;
use shared::config::{aws_sdk_config, unsubscribe_secret_from_aws, TableConfig};
use shared::domain::SystemClock;
use shared::http::{router, Routes};
use shared::telemetry::{init, LogFormat};

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    init(LogFormat::Json);
    let table = TableConfig::from_env()?;
    let aws = aws_sdk_config().await;
    let secret = unsubscribe_secret_from_aws(&aws).await?;
    let backend = Backend::aws(&aws, &table.table_name, None);
    let service = backend.service(Arc::new(SystemClock)).with_unsubscribe_secret(secret);
    lambda_http::run(router(service, Routes::Unsubscribe)).await
}
