//! Adapters behind the ports: the embedded store (SQLite: prospects, accounts, keys, campaigns
//! and the job queue in one file) and the AWS backend (DynamoDB single table, SQS queue).

pub mod dynamodb;
pub mod local_rate_limit;
pub mod ses;
pub mod smtp;
pub mod sns;
pub mod sns_http;
mod record;
pub mod sqlite;
pub mod sqs;
