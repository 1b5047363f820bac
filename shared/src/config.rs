//! Configuration from the environment. The variable names are the constants below and the
//! same names are set in `template.yaml`. The AWS SDK reads its own standard variables
//! (`AWS_REGION`, credentials, and `AWS_ENDPOINT_URL` to point every client at an emulator).

/// DynamoDB table holding prospects, accounts, keys and campaigns.
pub const TABLE_NAME: &str = "CADENHQ_TABLE_NAME";
/// URL of the SQS queue campaign jobs are published to.
pub const QUEUE_URL: &str = "CADENHQ_QUEUE_URL";
/// Directory of the embedded store (`cadenhq` only).
pub const DATA_DIR: &str = "CADENHQ_DATA_DIR";
/// `embedded` (default) or `aws`: which backend the `cadenhq` admin commands use.
pub const BACKEND: &str = "CADENHQ_BACKEND";

/// `From:` address of campaign emails, e.g. `Acme <hello@acme.example>`.
pub const SENDER: &str = "CADENHQ_SENDER";
/// Amazon SES configuration set campaign emails are sent through (the scheduler Lambda;
/// `template.yaml` creates it and has it publish bounces, complaints, deliveries and rejections).
pub const SES_CONFIGURATION_SET: &str = "CADENHQ_SES_CONFIGURATION_SET";
/// Public base URL of the API, for unsubscribe links.
pub const PUBLIC_URL: &str = "CADENHQ_PUBLIC_URL";
/// ARN of the Secrets Manager secret holding the unsubscribe signing secret (Lambda).
pub const UNSUBSCRIBE_SECRET_ARN: &str = "CADENHQ_UNSUBSCRIBE_SECRET_ARN";
/// The unsubscribe signing secret itself (`cadenhq serve`; at least 32 bytes).
pub const UNSUBSCRIBE_SECRET: &str = "CADENHQ_UNSUBSCRIBE_SECRET";
/// `outbox` (default) or `smtp`: how `cadenhq serve` delivers campaign emails.
pub const MAILER: &str = "CADENHQ_MAILER";
/// SMTP relay URL for the `smtp` mailer, e.g. `smtps://user:pass@smtp.example.com`.
pub const SMTP_URL: &str = "CADENHQ_SMTP_URL";

/// A required variable that is missing or empty, or a configured value that is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("environment variable {0} must be set")]
    Missing(&'static str),
    #[error("{0}")]
    Invalid(String),
}

fn required(name: &'static str) -> Result<String, ConfigError> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty()).ok_or(ConfigError::Missing(name))
}

/// Where campaign emails come from and where their links point.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    pub sender: String,
    pub public_url: String,
    /// [`SES_CONFIGURATION_SET`].
    pub ses_configuration_set: String,
}

impl DeliveryConfig {
    /// The variables [`DeliveryConfig::from_env`] reads.
    pub const VARS: &'static [&'static str] = &[SENDER, PUBLIC_URL, SES_CONFIGURATION_SET];

    /// # Errors
    /// [`ConfigError`] naming [`SENDER`], [`PUBLIC_URL`] or [`SES_CONFIGURATION_SET`] when unset, or
    /// for an invalid sender.
    pub fn from_env() -> Result<Self, ConfigError> {
        let sender = required(SENDER)?;
        crate::adapters::smtp::validate_sender(&sender).map_err(ConfigError::Invalid)?;
        Ok(Self { sender, public_url: required(PUBLIC_URL)?, ses_configuration_set: required(SES_CONFIGURATION_SET)? })
    }
}

/// The variables [`unsubscribe_secret_from_aws`] reads.
pub const UNSUBSCRIBE_SECRET_FROM_AWS_VARS: &[&str] = &[UNSUBSCRIBE_SECRET_ARN];

/// Reads the unsubscribe signing secret from Secrets Manager, once per cold start; the ARN
/// comes from [`UNSUBSCRIBE_SECRET_ARN`].
///
/// # Errors
/// [`ConfigError`] when the variable is unset, the secret cannot be read, or it is too short.
pub async fn unsubscribe_secret_from_aws(sdk: &aws_config::SdkConfig) -> Result<crate::domain::UnsubscribeSecret, ConfigError> {
    let arn = required(UNSUBSCRIBE_SECRET_ARN)?;
    let out = aws_sdk_secretsmanager::Client::new(sdk)
        .get_secret_value()
        .secret_id(arn)
        .send()
        .await
        .map_err(|e| ConfigError::Invalid(format!("cannot read the unsubscribe secret: {}", aws_sdk_secretsmanager::error::DisplayErrorContext(e))))?;
    let value = out.secret_string().unwrap_or_default();
    crate::domain::UnsubscribeSecret::new(value.as_bytes().to_vec()).map_err(|e| ConfigError::Invalid(e.to_string()))
}

/// What a function that reads and writes prospects needs.
#[derive(Debug, Clone)]
pub struct TableConfig {
    pub table_name: String,
}

impl TableConfig {
    /// The variables [`TableConfig::from_env`] reads.
    pub const VARS: &'static [&'static str] = &[TABLE_NAME];

    /// # Errors
    /// [`ConfigError`] naming [`TABLE_NAME`] when it is unset.
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self { table_name: required(TABLE_NAME)? })
    }
}

/// What a function that publishes campaign jobs needs.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    pub queue_url: String,
}

impl QueueConfig {
    /// The variables [`QueueConfig::from_env`] reads.
    pub const VARS: &'static [&'static str] = &[QUEUE_URL];

    /// # Errors
    /// [`ConfigError`] naming [`QUEUE_URL`] when it is unset.
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self { queue_url: required(QUEUE_URL)? })
    }
}

/// Each AWS call: at most 3 attempts (standard retry mode: throttling and 5xx are retried
/// with jittered exponential backoff from 50 ms), each attempt at most 2 s, the whole call at
/// most 5 s, connecting at most 1 s. A request makes a few calls in sequence, so it ends well
/// within the functions' 10 s timeout and API Gateway's 30 s; when AWS stays unavailable the
/// client gets 503 with `Retry-After`.
pub const AWS_MAX_ATTEMPTS: u32 = 3;
const AWS_INITIAL_BACKOFF: std::time::Duration = std::time::Duration::from_millis(50);
const AWS_ATTEMPT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
const AWS_OPERATION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
const AWS_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// The AWS SDK configuration from the standard environment (region, credentials,
/// `AWS_ENDPOINT_URL`), with the retry and timeout settings above; loaded once per process.
pub async fn aws_sdk_config() -> aws_config::SdkConfig {
    let retry = aws_config::retry::RetryConfig::standard()
        .with_max_attempts(AWS_MAX_ATTEMPTS)
        .with_initial_backoff(AWS_INITIAL_BACKOFF);
    let timeouts = aws_config::timeout::TimeoutConfig::builder()
        .connect_timeout(AWS_CONNECT_TIMEOUT)
        .operation_attempt_timeout(AWS_ATTEMPT_TIMEOUT)
        .operation_timeout(AWS_OPERATION_TIMEOUT)
        .build();
    aws_config::defaults(aws_config::BehaviorVersion::latest()).retry_config(retry).timeout_config(timeouts).load().await
}
