//! Lambda function: POST /webhooks/ses (Amazon SNS deliveries of SES events) and
//! POST /webhooks/{provider}/{endpoint_id} (Stripe, Resend, SendGrid).

use std::sync::Arc;

use shared::adapters::sns_http::SnsVerifier;
use shared::backend::Backend;
use shared::config::{aws_sdk_config, TableConfig};
use shared::domain::SystemClock;
use shared::http::webhooks_router;
use shared::telemetry::{init, LogFormat};

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    init(LogFormat::Json);
    let table = TableConfig::from_env()?;
    let sns = SnsVerifier::from_env().map_err(|e| e.to_string())?;
    let aws = aws_sdk_config().await;
    let backend = Backend::aws(&aws, &table.table_name, None);
    lambda_http::run(webhooks_router(backend.webhook_service(Arc::new(SystemClock), sns))).await
}
