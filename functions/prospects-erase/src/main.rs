//! Lambda function: DELETE /api/v1/prospects/{id} and /api/v1/prospects/external/{external_id}.

use std::sync::Arc;

use shared::backend::Backend;
use shared::config::{aws_sdk_config, TableConfig};
use shared::domain::SystemClock;
use shared::http::{router, Routes};
use shared::telemetry::{init, LogFormat};

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    init(LogFormat::Json);
    let table = TableConfig::from_env()?;
    let aws = aws_sdk_config().await;
    let backend = Backend::aws(&aws, &table.table_name, None);
    lambda_http::run(router(backend.service(Arc::new(SystemClock)), Routes::Erase)).await
}
