//! Lambda function: the Amazon SES notifications (bounces, complaints, deliveries) SNS delivers
//! from the stack's configuration set, applied to the prospects and sends they name.

use std::sync::Arc;

use aws_lambda_events::event::sns::SnsEvent;
use lambda_runtime::{service_fn, Diagnostic, LambdaEvent};
use shared::adapters::sns::handle_feedback;
use shared::backend::Backend;
use shared::config::{aws_sdk_config, TableConfig};
use shared::domain::SystemClock;
use shared::telemetry::{error_chain, init, LogFormat};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    init(LogFormat::Json);
    let table = TableConfig::from_env()?;
    let aws = aws_sdk_config().await;
    let backend = Backend::aws(&aws, &table.table_name, None);
    let service = Arc::new(backend.feedback_service(Arc::new(SystemClock)));
    lambda_runtime::run(service_fn(move |event: LambdaEvent<SnsEvent>| {
        let service = Arc::clone(&service);
        // A storage failure fails the invocation (the runtime logs it): Lambda runs the event
        // again, twice, then keeps it in the function's dead-letter queue with this message.
        // What was applied before the failure is not applied twice.
        async move {
            handle_feedback(&service, event.payload)
                .await
                .map(drop)
                .map_err(|e| Diagnostic { error_type: "StoreError".to_owned(), error_message: error_chain(&e) })
        }
    }))
    .await
}
