//! The HTTP API: one axum router, served by the Lambda functions through `lambda_http` and by
//! `cadenhq serve` through a TCP listener. Request DTOs are parsed into domain commands here.

mod error;
mod openapi;
mod request;
mod unsubscribe;

pub use openapi::OPENAPI_JSON;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{patch, post};
use axum::{Json, Router};
use serde_json::json;
use tower_http::catch_panic::CatchPanicLayer;

pub use error::{ApiError, UNAUTHORIZED_MESSAGE};

use crate::domain::{AccountId, ExternalId, ProspectId};
use crate::ports::ProspectRef;
use crate::service::ProspectService;

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
    let mut router = Router::new();
    if matches!(routes, Routes::All | Routes::Upsert) {
        router = router.route(PROSPECTS_PATH, post(upsert_prospect));
    }
    if matches!(routes, Routes::All | Routes::Status) {
        router = router
            .route(PROSPECT_BY_ID_PATH, patch(patch_by_id))
            .route(PROSPECT_BY_EXTERNAL_ID_PATH, patch(patch_by_external_id));
    }
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
        .with_state(Arc::new(service))
}

pub(crate) type AppState = Arc<ProspectService>;

/// The account of the request's API key.
struct Authenticated(AccountId);

impl FromRequestParts<AppState> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let raw = parts.headers.get(KEY_HEADER).and_then(|v| v.to_str().ok());
        Ok(Self(state.authenticate(raw).await?))
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
    Authenticated(account): Authenticated,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let command = request::parse_upsert(&body_bytes(body)?)?;
    let outcome = service.upsert(account, &command).await?;
    let status = if outcome.created { StatusCode::CREATED } else { StatusCode::OK };
    let body = json!({ "accepted": true, "prospect_id": outcome.prospect_id.to_string(), "created": outcome.created });
    Ok((status, Json(body)).into_response())
}

async fn patch_by_id(
    State(service): State<AppState>,
    Authenticated(account): Authenticated,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let status = request::parse_status(&body_bytes(body)?)?;
    let id = id.ok().and_then(|Path(raw)| ProspectId::parse(&raw).ok()).ok_or(ApiError::ProspectNotFound)?;
    set_status(&service, account, ProspectRef::Id(id), status).await
}

async fn patch_by_external_id(
    State(service): State<AppState>,
    Authenticated(account): Authenticated,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let status = request::parse_status(&body_bytes(body)?)?;
    let id = id.ok().and_then(|Path(raw)| ExternalId::parse(&raw).ok()).ok_or(ApiError::ProspectNotFound)?;
    set_status(&service, account, ProspectRef::ExternalId(id), status).await
}

async fn set_status(
    service: &ProspectService,
    account: AccountId,
    prospect: ProspectRef,
    status: crate::domain::ProspectStatus,
) -> Result<Response, ApiError> {
    let updated = service.set_status(account, &prospect, status).await?;
    let body = json!({ "accepted": true, "prospect_id": updated.id.to_string(), "status": updated.status.as_str() });
    Ok((StatusCode::OK, Json(body)).into_response())
}
