//! CadenHQ Prospects API: the domain, its ports, the service over them, the storage and queue
//! adapters (embedded SQLite; DynamoDB and SQS) and the HTTP mapping. Every entry point (the
//! Lambda functions and the `cadenhq` binary) is thin wiring over this crate.

pub mod adapters;
pub mod backend;
pub mod admin;
pub mod config;
pub mod domain;
pub mod http;
pub mod ports;
pub mod scheduler;
pub mod service;
pub mod telemetry;
