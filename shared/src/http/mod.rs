//! The HTTP API: one axum router, served by the Lambda functions through `lambda_http` and by
//! `cadenhq serve` through a TCP listener. Request DTOs are parsed into domain commands here.

mod error;
mod idempotency;
mod listing;
mod openapi;
mod request;
mod resource;
mod unsubscribe;
mod webhooks;

pub use openapi::OPENAPI_JSON;
pub use webhooks::{PROVIDER_WEBHOOK_PATH, SES_WEBHOOK_PATH, WEBHOOK_BODY_LIMIT_BYTES};
pub use resource::{EmailSent, EnrollmentResource, ProspectExport, ProspectResource, StatusChangeResource};

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, patch, post};
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;

pub use error::{ApiError, UNAUTHORIZED_MESSAGE};
use idempotency::Idempotency;

use crate::domain::{AccountId, ExternalId, ProspectId, ProspectStatus, StatusReason};
use crate::ports::ProspectRef;
use crate::service::{Caller, ProspectService, ProspectView};

/// The header carrying the API key.
pub const KEY_HEADER: &str = "x-cadenhq-key";
/// [`KEY_HEADER`], parsed once.
const KEY_HEADER_NAME: HeaderName = HeaderName::from_static(KEY_HEADER);
/// Largest request body accepted, in bytes.
pub const BODY_LIMIT_BYTES: usize = 64 * 1024;

pub const PROSPECTS_PATH: &str = "/api/v1/prospects";
pub const PROSPECT_BY_ID_PATH: &str = "/api/v1/prospects/{prospect_id}";
pub const PROSPECT_BY_EXTERNAL_ID_PATH: &str = "/api/v1/prospects/external/{*external_id}";
pub const PROSPECT_EXPORT_PATH: &str = "/api/v1/prospects/{prospect_id}/export";
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
    /// `DELETE` of one prospect by id or external_id: erasure.
    Erase,
    /// The read routes: `GET` of the listing, of one prospect by id or external_id, and of
    /// its export.
    Read,
    /// `GET` and `POST /unsubscribe/{token}` (no API key: the token is the credential).
    Unsubscribe,
}

/// The router for `routes`, with the JSON fallbacks, body limit and panic guard.
pub fn router(service: ProspectService, routes: Routes) -> Router {
    let state = Arc::new(service);
    let mut router = Router::new();
    if matches!(routes, Routes::All | Routes::Upsert) {
        router = router.route(PROSPECTS_PATH, post(upsert_prospect));
    }
    if matches!(routes, Routes::All | Routes::Status) {
        router = router
            .route(PROSPECT_BY_ID_PATH, patch(patch_by_id))
            .route(PROSPECT_BY_EXTERNAL_ID_PATH, patch(patch_by_external_id));
    }
    if matches!(routes, Routes::All | Routes::Erase) {
        router = router
            .route(PROSPECT_BY_ID_PATH, delete(erase_by_id))
            .route(PROSPECT_BY_EXTERNAL_ID_PATH, delete(erase_by_external_id));
    }
    // The same paths: their method routers merge.
    if matches!(routes, Routes::All | Routes::Read) {
        router = router
            .route(PROSPECTS_PATH, get(list_prospects))
            .route(PROSPECT_BY_ID_PATH, get(get_by_id))
            .route(PROSPECT_BY_EXTERNAL_ID_PATH, get(get_by_external_id))
            .route(PROSPECT_EXPORT_PATH, get(export_by_id));
    }
    if routes == Routes::All {
        router = router.route(OPENAPI_PATH, get(openapi::document));
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

/// Every route of [`router`] and the webhook routes: what `cadenhq serve` serves.
pub fn router_with_webhooks(service: ProspectService, webhooks: crate::webhooks::WebhookService) -> Router {
    router(service, Routes::All).merge(webhooks::routes(webhooks))
}

/// The webhook routes alone, with the JSON fallbacks: what the webhooks function serves.
pub fn webhooks_router(webhooks: crate::webhooks::WebhookService) -> Router {
    webhooks::routes(webhooks)
        .fallback(|| async { ApiError::RouteNotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
}

pub(crate) type AppState = Arc<ProspectService>;

/// The caller of an API request, admitted (key and rate limit) before anything else of the
/// request is looked at, the body included: the extractor's rejection is the 401, 429 or 503.
/// Every response to an admitted request carries the `RateLimit-*` headers (see
/// [`with_rate_limit`]).
struct Admitted(Caller);

impl FromRequestParts<AppState> for Admitted {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, service: &AppState) -> Result<Self, Response> {
        let raw = parts.headers.get(KEY_HEADER_NAME).and_then(|v| v.to_str().ok());
        service.admit(raw).await.map(Self).map_err(|e| ApiError::from(e).into_response())
    }
}

/// Adds the `RateLimit-*` headers of the admitted caller to its response, whatever the status.
fn with_rate_limit(mut response: Response, caller: &Caller) -> Response {
    error::set_rate_limit_headers(&mut response, &caller.rate);
    response
}

fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body_within(body, BODY_LIMIT_BYTES)
}

/// The body of a route whose body limit is `limit`, or the error its rejection is.
fn body_within(body: Result<Bytes, BytesRejection>, limit: usize) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(limit)
        } else {
            ApiError::BadRequest("Request body could not be read".into())
        }
    })
}

/// A response whose JSON body is already written.
fn json_response(status: StatusCode, body: impl Into<Body>) -> Response {
    let mut response = Response::new(body.into());
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// Length of a UUID as a JSON string.
const ID_JSON_LEN: usize = 38;

/// The body of a POST's 200 or 201: `{"accepted":true,"created":…,"prospect_id":"…"}`, the keys
/// sorted as in a JSON object (nothing in it needs escaping). Sized exactly: a `Vec` whose
/// capacity is its length becomes the response's `Bytes` without another allocation.
fn upserted_body(created: bool, prospect_id: ProspectId) -> Vec<u8> {
    let head: &[u8] = if created { b"{\"accepted\":true,\"created\":true,\"prospect_id\":" } else { b"{\"accepted\":true,\"created\":false,\"prospect_id\":" };
    let mut body = Vec::with_capacity(head.len() + ID_JSON_LEN + 1);
    body.extend_from_slice(head);
    prospect_id.write_json(&mut body);
    body.push(b'}');
    body
}

/// The body of a PATCH's 200: `{"accepted":true,"prospect_id":"…","status":"…"}`, sized exactly.
fn status_set_body(prospect_id: ProspectId, status: ProspectStatus) -> Vec<u8> {
    let (head, middle, status, tail) = (b"{\"accepted\":true,\"prospect_id\":", b",\"status\":\"", status.as_str().as_bytes(), b"\"}");
    let mut body = Vec::with_capacity(head.len() + ID_JSON_LEN + middle.len() + status.len() + tail.len());
    body.extend_from_slice(head);
    prospect_id.write_json(&mut body);
    body.extend_from_slice(middle);
    body.extend_from_slice(status);
    body.extend_from_slice(tail);
    body
}

async fn upsert_prospect(
    Admitted(caller): Admitted,
    State(service): State<AppState>,
    idempotency: Idempotency,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body_bytes(body) {
        Ok(b) => b,
        Err(e) => return with_rate_limit(e.into_response(), &caller),
    };
    let response = idempotency::run(&service, &caller, &idempotency, "POST", PROSPECTS_PATH, &body, || async {
        let command = request::parse_upsert(&body)?;
        let outcome = service.upsert(caller.account, &command).await?;
        let status = if outcome.created { StatusCode::CREATED } else { StatusCode::OK };
        Ok(json_response(status, upserted_body(outcome.created, outcome.prospect_id)))
    })
    .await;
    with_rate_limit(response, &caller)
}

async fn patch_by_id(
    Admitted(caller): Admitted,
    State(service): State<AppState>,
    idempotency: Idempotency,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let reference = id.ok().and_then(|Path(raw)| ProspectId::parse(&raw).ok()).map(ProspectRef::Id);
    with_rate_limit(set_status(&service, &caller, &idempotency, reference, body).await, &caller)
}

async fn patch_by_external_id(
    Admitted(caller): Admitted,
    State(service): State<AppState>,
    idempotency: Idempotency,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let reference = id.ok().and_then(|Path(raw)| ExternalId::parse(&raw).ok()).map(ProspectRef::ExternalId);
    with_rate_limit(set_status(&service, &caller, &idempotency, reference, body).await, &caller)
}

/// A page of the listing: `{"data":[...],"has_more":…,"next_cursor":…}`.
#[derive(serde::Serialize)]
struct ListBody<'a> {
    data: Vec<ProspectResource<'a>>,
    has_more: bool,
    next_cursor: Option<String>,
}

/// One page of `account`'s listing for the query string `raw_query`, as the listing route
/// returns it (the CLI's `prospects list` too).
///
/// # Errors
/// [`ApiError::BadRequest`] for a bad parameter or cursor; what the service gives.
pub async fn list_page(service: &ProspectService, account: AccountId, raw_query: &str) -> Result<serde_json::Value, ApiError> {
    let request = listing::parse(account, Some(raw_query))?;
    let (views, has_more) = service.list(&request.query, request.email).await?;
    let next_cursor =
        views.last().filter(|_| has_more).map(|v| listing::cursor(account, crate::domain::ListPosition::of(v.prospect.created_at, v.prospect.id)));
    let body = ListBody { data: views.iter().map(ProspectResource::from).collect(), has_more, next_cursor };
    serde_json::to_value(&body).map_err(|e| ApiError::Internal(Box::new(e)))
}

async fn list_prospects(Admitted(caller): Admitted, State(service): State<AppState>, uri: axum::http::Uri) -> Response {
    let response = match list_page(&service, caller.account, uri.query().unwrap_or_default()).await {
        Ok(page) => json_response(StatusCode::OK, page.to_string()),
        Err(e) => e.into_response(),
    };
    with_rate_limit(response, &caller)
}

async fn erase_by_id(Admitted(caller): Admitted, State(service): State<AppState>, id: Result<Path<String>, PathRejection>) -> Response {
    let reference = id.ok().and_then(|Path(raw)| ProspectId::parse(&raw).ok()).map(ProspectRef::Id);
    with_rate_limit(erase(&service, &caller, reference).await, &caller)
}

async fn erase_by_external_id(Admitted(caller): Admitted, State(service): State<AppState>, id: Result<Path<String>, PathRejection>) -> Response {
    let reference = id.ok().and_then(|Path(raw)| ExternalId::parse(&raw).ok()).map(ProspectRef::ExternalId);
    with_rate_limit(erase(&service, &caller, reference).await, &caller)
}

/// Both DELETE routes: `{"erased":true,"prospect_id":"…"}`; a second erasure is 404.
async fn erase(service: &ProspectService, caller: &Caller, prospect: Option<ProspectRef>) -> Response {
    let Some(prospect) = prospect else { return ApiError::ProspectNotFound.into_response() };
    match service.erase(caller.account, &prospect).await {
        Ok(id) => json_response(StatusCode::OK, serde_json::json!({ "erased": true, "prospect_id": id.to_string() }).to_string()),
        Err(e) => ApiError::from(e).into_response(),
    }
}

async fn get_by_id(Admitted(caller): Admitted, State(service): State<AppState>, id: Result<Path<String>, PathRejection>) -> Response {
    let reference = id.ok().and_then(|Path(raw)| ProspectId::parse(&raw).ok()).map(ProspectRef::Id);
    with_rate_limit(read_prospect(&service, &caller, reference, |view| serde_json::to_vec(&ProspectResource::from(view))).await, &caller)
}

async fn export_by_id(Admitted(caller): Admitted, State(service): State<AppState>, id: Result<Path<String>, PathRejection>) -> Response {
    let reference = id.ok().and_then(|Path(raw)| ProspectId::parse(&raw).ok()).map(ProspectRef::Id);
    with_rate_limit(read_prospect(&service, &caller, reference, |view| serde_json::to_vec(&ProspectExport::from(view))).await, &caller)
}

async fn get_by_external_id(Admitted(caller): Admitted, State(service): State<AppState>, id: Result<Path<String>, PathRejection>) -> Response {
    let reference = id.ok().and_then(|Path(raw)| ExternalId::parse(&raw).ok()).map(ProspectRef::ExternalId);
    with_rate_limit(read_prospect(&service, &caller, reference, |view| serde_json::to_vec(&ProspectResource::from(view))).await, &caller)
}

/// The GET routes: the prospect as `body` writes it. A malformed reference is a prospect not
/// found, as an unknown one is.
async fn read_prospect(
    service: &ProspectService,
    caller: &Caller,
    prospect: Option<ProspectRef>,
    body: impl FnOnce(&ProspectView) -> serde_json::Result<Vec<u8>>,
) -> Response {
    let Some(prospect) = prospect else { return ApiError::ProspectNotFound.into_response() };
    match service.get(caller.account, &prospect).await {
        Ok(view) => match body(&view) {
            Ok(body) => json_response(StatusCode::OK, body),
            Err(e) => ApiError::Internal(Box::new(e)).into_response(),
        },
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// Both PATCH routes: the body is checked first (400), then the prospect looked up (404).
async fn set_status(
    service: &ProspectService,
    caller: &Caller,
    idempotency: &Idempotency,
    prospect: Option<ProspectRef>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body_bytes(body) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let path = idempotency.path();
    idempotency::run(service, caller, idempotency, "PATCH", path, &body, || async {
        let status = request::parse_status(&body)?;
        let prospect = prospect.ok_or(ApiError::ProspectNotFound)?;
        let updated = service.set_status(caller.account, &prospect, status, StatusReason::Api).await?;
        Ok(json_response(StatusCode::OK, status_set_body(updated.id, updated.status)))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn response_bodies_are_the_bytes_a_json_object_of_the_same_fields_gives() {
        let id = ProspectId::new();
        for created in [true, false] {
            let body = upserted_body(created, id);
            assert_eq!(body.len(), body.capacity());
            assert_eq!(body, json!({ "accepted": true, "prospect_id": id.to_string(), "created": created }).to_string().into_bytes());
        }
        for status in [ProspectStatus::New, ProspectStatus::Converted, ProspectStatus::Unsubscribed, ProspectStatus::Bounced] {
            let body = status_set_body(id, status);
            assert_eq!(body.len(), body.capacity());
            assert_eq!(body, json!({ "accepted": true, "prospect_id": id.to_string(), "status": status.as_str() }).to_string().into_bytes());
        }
    }
}
