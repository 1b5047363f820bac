//! Lambda function: the campaign scheduler, consuming campaign jobs from SQS and sending
//! each step's email through Amazon SES.

use std::sync::Arc;

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use lambda_runtime::{service_fn, LambdaEvent};
use shared::adapters::ses::SesMailer;
use shared::adapters::sqs::handle_batch;
use shared::backend::Backend;
use shared::config::{aws_sdk_config, unsubscribe_secret_from_aws, DeliveryConfig, QueueConfig, TableConfig};
use shared::domain::SystemClock;
use shared::scheduler::{DeliverySettings, Scheduler};
use shared::telemetry::{init, LogFormat};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    init(LogFormat::Json);
    let (table, queue, delivery) = (TableConfig::from_env()?, QueueConfig::from_env()?, DeliveryConfig::from_env()?);
    let aws = aws_sdk_config().await;
    let unsubscribe_secret = unsubscribe_secret_from_aws(&aws).await?;
    let backend = Backend::aws(&aws, &table.table_name, Some(&queue.queue_url));
    let mailer = Arc::new(SesMailer::from_sdk_config(&aws).with_configuration_set(Some(delivery.ses_configuration_set)));
    let ports = backend.scheduler_ports(mailer, Arc::new(SystemClock)).ok_or("the scheduler needs the job queue")?;
    let settings = DeliverySettings { sender: delivery.sender, public_url: delivery.public_url, unsubscribe_secret };
    let scheduler = Arc::new(Scheduler::new(ports, settings));
    lambda_runtime::run(service_fn(move |event: LambdaEvent<SqsEvent>| {
        let scheduler = Arc::clone(&scheduler);
        async move { Ok::<SqsBatchResponse, lambda_runtime::Error>(handle_batch(&scheduler, event.payload).await) }
    }))
    .await
}
