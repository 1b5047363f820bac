//! The incoming webhook routes: `POST /webhooks/ses` (Amazon SNS) and
//! `POST /webhooks/{provider}/{endpoint_id}` (Stripe, Resend, SendGrid). No API key: each
//! delivery is verified by its sender's signature.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use tower_http::catch_panic::CatchPanicLayer;

use super::ApiError;
use crate::domain::Provider;
use crate::service::ServiceError;
use crate::webhooks::{Receipt, WebhookError, WebhookService};

pub const SES_WEBHOOK_PATH: &str = "/webhooks/ses";
pub const PROVIDER_WEBHOOK_PATH: &str = "/webhooks/{provider}/{endpoint_id}";
/// Largest webhook body accepted, in bytes (a SendGrid batch can be large).
pub const WEBHOOK_BODY_LIMIT_BYTES: usize = 256 * 1024;

type WebhookState = Arc<WebhookService>;

/// The webhook routes alone, with their own body limit and panic guard, for merging into a
/// router that has the fallbacks.
pub(super) fn routes(service: WebhookService) -> Router {
    Router::new()
        .route(SES_WEBHOOK_PATH, post(ses))
        .route(PROVIDER_WEBHOOK_PATH, post(provider))
        .layer(DefaultBodyLimit::max(WEBHOOK_BODY_LIMIT_BYTES))
        .layer(CatchPanicLayer::custom(|_| {
            tracing::error!("webhook handler panicked");
            ApiError::Internal("handler panicked".into()).into_response()
        }))
        .with_state(Arc::new(service))
}

impl From<WebhookError> for ApiError {
    fn from(e: WebhookError) -> Self {
        match e {
            WebhookError::NotAccepted => Self::InvalidSignature,
            WebhookError::RateLimited(decision) => Self::TooManyRequests(decision),
            WebhookError::Malformed(m) => Self::BadRequest(format!("Not an event of this provider: {m}")),
            WebhookError::TopicNotAllowed => Self::Forbidden("The SNS topic is not allowed here (CADENHQ_SNS_TOPIC_ARNS)".into()),
            WebhookError::SnsUnreachable => Self::Unavailable("Amazon SNS could not be reached".into()),
            WebhookError::Store(e) => ServiceError::from(e).into(),
        }
    }
}

fn answer(result: Result<Receipt, WebhookError>) -> Response {
    match result {
        Ok(receipt) => (StatusCode::OK, Json(serde_json::json!({ "received": true, "events": receipt.events }))).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

fn webhook_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    super::body_within(body, WEBHOOK_BODY_LIMIT_BYTES)
}

async fn ses(State(service): State<WebhookState>, body: Result<Bytes, BytesRejection>) -> Response {
    match webhook_body(body) {
        Ok(body) => answer(service.receive_sns(&body).await),
        Err(e) => e.into_response(),
    }
}

async fn provider(
    State(service): State<WebhookState>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let Ok(Path((provider, endpoint))) = path else { return ApiError::RouteNotFound.into_response() };
    let Some(provider) = Provider::parse(&provider).filter(|p| Provider::PER_ACCOUNT.contains(p)) else {
        return ApiError::RouteNotFound.into_response();
    };
    match webhook_body(body) {
        Ok(body) => answer(service.receive(provider, &endpoint, &headers, &body).await),
        Err(e) => e.into_response(),
    }
}
