//! The OpenAPI 3.1 document of the HTTP API, kept in the repository (`docs/openapi.json`) and
//! served at `/api/v1/openapi.json`.

use axum::http::header;
use axum::response::{IntoResponse, Response};

/// The document, compiled in.
pub const OPENAPI_JSON: &str = include_str!("../../../docs/openapi.json");

/// `GET /api/v1/openapi.json`.
pub(super) async fn document() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON).into_response()
}
