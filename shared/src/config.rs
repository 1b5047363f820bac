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

/// A required variable that is missing or empty.
#[derive(Debug, thiserror::Error)]
#[error("environment variable {0} must be set")]
pub struct ConfigError(pub &'static str);

fn required(name: &'static str) -> Result<String, ConfigError> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty()).ok_or(ConfigError(name))
}

/// What a function that reads and writes prospects needs.
#[derive(Debug, Clone)]
pub struct TableConfig {
    pub table_name: String,
}

impl TableConfig {
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
    /// # Errors
    /// [`ConfigError`] naming [`QUEUE_URL`] when it is unset.
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self { queue_url: required(QUEUE_URL)? })
    }
}

/// The AWS SDK configuration from the standard environment, loaded once per process.
pub async fn aws_sdk_config() -> aws_config::SdkConfig {
    aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await
}
