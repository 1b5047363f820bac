//! `ApiError`: every failure a client can see, its status and its JSON body, in one place.

use crate::telemetry::error_chain;
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::domain::RateDecision;
use crate::service::ServiceError;

/// The body of every 401.
pub const UNAUTHORIZED_MESSAGE: &str = "Missing or invalid X-CadenHQ-Key";
/// Seconds a client is told to wait after a 503.
const RETRY_AFTER_SECONDS: &str = "1";

/// A failure as the client sees it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("unauthorized")]
    Unauthorized,
    #[error("prospect not found")]
    ProspectNotFound,
    #[error("route not found")]
    RouteNotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("payload too large")]
    PayloadTooLarge(usize),
    /// A webhook whose signature did not verify, or sent to no endpoint of ours: one answer
    /// for both, so an endpoint's URL cannot be probed.
    #[error("invalid signature")]
    InvalidSignature,
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("rate limited")]
    TooManyRequests(RateDecision),
    #[error("validation failed")]
    Unprocessable(Vec<String>),
    #[error("service unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl ApiError {
    #[must_use]
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) | Self::InvalidSignature => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::ProspectNotFound | Self::RouteNotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl ApiError {
    /// The `Retry-After` value a client is told, for a 429 or 503.
    #[must_use]
    pub fn retry_after(&self) -> Option<HeaderValue> {
        match self {
            Self::Unavailable(_) => Some(HeaderValue::from_static(RETRY_AFTER_SECONDS)),
            Self::TooManyRequests(decision) => Some(HeaderValue::from(decision.retry_after_seconds)),
            _ => None,
        }
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::Unauthorized => Self::Unauthorized,
            ServiceError::NotFound => Self::ProspectNotFound,
            ServiceError::Invalid(errors) => Self::Unprocessable(errors),
            ServiceError::InvalidToken => Self::BadRequest("Invalid unsubscribe link".into()),
            ServiceError::RateLimited(decision) => Self::TooManyRequests(decision),
            ServiceError::Unavailable(source) => Self::Unavailable(Box::new(source)),
            ServiceError::Internal(source) => Self::Internal(Box::new(source)),
        }
    }
}


impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = match &self {
            Self::BadRequest(msg) => json!({ "error": msg }),
            Self::Unauthorized => json!({ "error": UNAUTHORIZED_MESSAGE }),
            Self::ProspectNotFound => json!({ "error": "Prospect not found" }),
            Self::RouteNotFound => json!({ "error": "Not found" }),
            Self::MethodNotAllowed => json!({ "error": "Method not allowed" }),
            Self::PayloadTooLarge(limit) => json!({ "error": format!("Request body is too large (limit {limit} bytes)") }),
            Self::InvalidSignature => json!({ "error": "Invalid signature, or no such endpoint" }),
            Self::Forbidden(msg) => json!({ "error": msg }),
            Self::Conflict(msg) => json!({ "error": msg }),
            Self::TooManyRequests(d) => json!({ "error": format!("Rate limit exceeded: retry in {} s", d.retry_after_seconds) }),
            Self::Unprocessable(errors) => json!({ "errors": errors }),
            Self::Unavailable(_) => {
                tracing::warn!(error = %error_chain(&self), "request failed: backend unavailable");
                json!({ "error": "Service temporarily unavailable, retry later" })
            }
            Self::Internal(_) => {
                tracing::error!(error = %error_chain(&self), "request failed: internal error");
                json!({ "error": "Internal server error" })
            }
        };
        let mut response = (status, Json(body)).into_response();
        if let Some(retry_after) = self.retry_after() {
            response.headers_mut().insert(header::RETRY_AFTER, retry_after);
        }
        if let Self::TooManyRequests(decision) = &self {
            set_rate_limit_headers(&mut response, decision);
        }
        response
    }
}

const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// Adds `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset` to a response.
pub(super) fn set_rate_limit_headers(response: &mut Response, decision: &RateDecision) {
    let headers = response.headers_mut();
    headers.reserve(3);
    headers.insert(RATELIMIT_LIMIT, HeaderValue::from(decision.limit));
    headers.insert(RATELIMIT_REMAINING, HeaderValue::from(decision.remaining));
    headers.insert(RATELIMIT_RESET, HeaderValue::from(decision.reset_seconds));
}
