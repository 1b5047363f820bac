//! The HTTP API: one axum router, served by the Lambda functions through `lambda_http` and by
//! `cadenhq serve` through a TCP listener. Request DTOs are parsed into domain commands here.

mod error;
mod idempotency;
mod openapi;
mod request;
mod unsubscribe;

pub use openapi::OPENAPI_JSON;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Extension, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{patch, post};
use axum::{Json, Router};
use serde_json::json;
use tower_http::catch_panic::CatchPanicLayer;

pub use error::{ApiError, UNAUTHORIZED_MESSAGE};

use crate::domain::{ExternalId, ProspectId};
use crate::ports::ProspectRef;
use crate::service::{Caller, ProspectService};

/// The header carrying the API key.
pub const KEY_HEADER: &str = "x-cadenhq-key";
/// Largest request body accepted, in bytes.
pub const BODY_LIMIT_BYTES: usize = 64 * 1024;

pub const PROSPECTS_PATH: &str = "/api/v1/prospects";
pub const PROSPECT_BY_ID_PATH: &str = "/api/v1/prospects/{prospect_id}";
pub const PROSPECT_BY_EXTERNAL_ID_PATH: &str = "/api/v1/prospects/external/{*external_id}";
pub const UNSUBSCRIBE_PATH: &str = "/unsubscribe/{token}";
pub const OPENAPI_PATH: &str = "/api/v1/openapi.json";

/// Which routes a router serves: a Lambda function serves only its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routes {
    /// Every route (`cadenhq serve`).
    All,
    /// `POST /api/v1/prospects`.
    Upsert,
    /// Both PATCH routes.
    Status,
    /// `GET` and `POST /unsubscribe/{token}` (no API key: the token is the credential).
    Unsubscribe,
}

/// The router for `routes`, with the JSON fallbacks, body limit and panic guard.
pub fn router(service: ProspectService, routes: Routes) -> Router {
    let state = Arc::new(service);
    let mut api = Router::new();
    if matches!(routes, Routes::All | Routes::Upsert) {
        api = api.route(PROSPECTS_PATH, post(upsert_prospect));
    }
    if matches!(routes, Routes::All | Routes::Status) {
        api = api
            .route(PROSPECT_BY_ID_PATH, patch(patch_by_id))
            .route(PROSPECT_BY_EXTERNAL_ID_PATH, patch(patch_by_external_id));
    }
    let mut router = if routes == Routes::Unsubscribe {
        api
    } else {
        api.route_layer(middleware::from_fn_with_state(Arc::clone(&state), admit))
    };
    if routes == Routes::All {
        router = router.route(OPENAPI_PATH, axum::routing::get(openapi::document));
    }
    if matches!(routes, Routes::All | Routes::Unsubscribe) {
        router = router.route(
            UNSUBSCRIBE_PATH,
            axum::routing::get(unsubscribe::confirmation_page).post(unsubscribe::unsubscribe),
        );
    }
    router
        .fallback(|| async { ApiError::RouteNotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(BODY_LIMIT_BYTES))
        .layer(CatchPanicLayer::custom(|_| {
            tracing::error!("handler panicked");
            ApiError::Internal("handler panicked".into()).into_response()
        }))
        .with_state(state)
}

pub(crate) type AppState = Arc<ProspectService>;

/// Admits an API request (key and rate limit) before its handler runs, hands the handler the
/// [`Caller`], and adds the `RateLimit-*` headers to the response.
async fn admit(State(service): State<AppState>, mut request: Request, next: Next) -> Response {
    let raw = request.headers().get(KEY_HEADER).and_then(|v| v.to_str().ok());
    match service.admit(raw).await {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            let mut response = next.run(request).await;
            error::set_rate_limit_headers(&mut response, &caller.rate);
            response
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge
        } else {
            ApiError::BadRequest("Request body could not be read".into())
        }
    })
}

async fn upsert_prospect(
    State(service): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body_bytes(body) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    idempotency::run(&service, &caller, &headers, "POST", PROSPECTS_PATH, &body, || async {
        let command = request::parse_upsert(&body)?;
        let outcome = service.upsert(caller.account, &command).await?;
        let status = if outcome.created { StatusCode::CREATED } else { StatusCode::OK };
        let body = json!({ "accepted": true, "prospect_id": outcome.prospect_id.to_string(), "created": outcome.created });
        Ok((status, Json(body)).into_response())
    })
    .await
}

async fn patch_by_id(
    State(service): State<AppState>,
    Extension(caller): Extension<Caller>,
    uri: Uri,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let reference = id.ok().and_then(|Path(raw)| ProspectId::parse(&raw).ok()).map(ProspectRef::Id);
    set_status(&service, &caller, &headers, uri.path(), reference, body).await
}

async fn patch_by_external_id(
    State(service): State<AppState>,
    Extension(caller): Extension<Caller>,
    uri: Uri,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let reference = id.ok().and_then(|Path(raw)| ExternalId::parse(&raw).ok()).map(ProspectRef::ExternalId);
    set_status(&service, &caller, &headers, uri.path(), reference, body).await
}

/// Both PATCH routes: the body is checked first (400), then the prospect looked up (404).
async fn set_status(
    service: &ProspectService,
    caller: &Caller,
    headers: &HeaderMap,
    path: &str,
    prospect: Option<ProspectRef>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body_bytes(body) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    idempotency::run(service, caller, headers, "PATCH", path, &body, || async {
        let status = request::parse_status(&body)?;
        let prospect = prospect.ok_or(ApiError::ProspectNotFound)?;
        let updated = service.set_status(caller.account, &prospect, status).await?;
        let body = json!({ "accepted": true, "prospect_id": updated.id.to_string(), "status": updated.status.as_str() });
        Ok((StatusCode::OK, Json(body)).into_response())
    })
    .await
}
