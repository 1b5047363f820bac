//! CadenHQ Prospects API: the domain, its ports, the service over them, the storage and queue
//! adapters (embedded SQLite; DynamoDB and SQS) and the HTTP mapping. Every entry point (the
//! Lambda functions and the `cadenhq` binary) is thin wiring over this crate.

pub mod adapters;
pub mod backend;
pub mod admin;
pub mod config;
pub mod domain;
pub mod feedback;
pub mod webhooks;
pub mod http;
pub mod ports;
pub mod scheduler;
pub mod service;
pub mod telemetry;

/// The allocator of every binary built on this crate (the Lambda functions, `cadenhq`, the
/// benchmarks and tests). A request allocates and frees many small strings and maps; with
/// glibc's allocator, `malloc` and `free` were a third of a POST's CPU profile. The figures
/// are in docs/benchmarks.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
