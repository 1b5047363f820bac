//! Sets an API key's rate limit in an embedded store, for `scripts/bench` (a load test runs far
//! past the default 20 requests per second). Stands in for `cadenhq keys limit` until that
//! command exists.
//!
//! `cargo run --release -p cadenhq --example bench_key_limit -- DATA_DIR KEY_ID RATE BURST`

use std::path::Path;
use std::process::ExitCode;

use shared::backend::Backend;
use shared::domain::{KeyId, RateLimit};

async fn set_limit(args: &[String]) -> Result<(), String> {
    let [dir, key_id, rate, burst] = args else { return Err("usage: bench_key_limit DATA_DIR KEY_ID RATE BURST".into()) };
    let key_id = KeyId::parse(key_id).map_err(|e| e.to_string())?;
    let (rate, burst) = match (rate.parse(), burst.parse()) {
        (Ok(rate), Ok(burst)) => (rate, burst),
        _ => return Err("RATE and BURST must be whole numbers".into()),
    };
    let limit = RateLimit::new(rate, burst)?;
    let backend = Backend::embedded(Path::new(dir)).map_err(|e| e.to_string())?;
    match backend.admin.set_rate_limit(key_id, Some(limit)).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(format!("no key {key_id}")),
        Err(e) => Err(e.to_string()),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match set_limit(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
