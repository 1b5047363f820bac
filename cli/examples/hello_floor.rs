//! The HTTP floor of the embedded server benchmark: the same HTTP stack as `cadenhq serve`
//! (axum on tokio's multi-threaded runtime, one TCP listener, the same allocator), with
//! handlers that read the request body and answer a small JSON body, and nothing else.
//! `scripts/bench` puts it under the same load as the API; the gap between the two is what our
//! own code and storage cost.
//!
//! `cargo run --release -p cadenhq --example hello_floor -- [ADDR]` (default `127.0.0.1:0`)
//! prints `listening on http://ADDR` once it accepts connections.

use std::net::SocketAddr;

use axum::body::Bytes;
use axum::http::StatusCode;
use axum::routing::{patch, post};
use axum::{Json, Router};
use serde_json::{json, Value};
// Linked for its global allocator only, the one `cadenhq serve` runs with.
use shared as _;

async fn answer(body: Bytes) -> (StatusCode, Json<Value>) {
    (StatusCode::OK, Json(json!({ "accepted": true, "received_bytes": body.len() })))
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr: SocketAddr = match std::env::args().nth(1) {
        Some(raw) => raw.parse().map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{raw}: {e}")))?,
        None => SocketAddr::from(([127, 0, 0, 1], 0)),
    };
    let app = Router::new().route("/api/v1/prospects", post(answer)).route("/api/v1/prospects/{id}", patch(answer));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await
}
