//! `Idempotency-Key` on POST and PATCH: the first response to a key is kept for 24 hours and
//! replayed (with `Idempotent-Replayed: true`) for a retry of the same request; the same key
//! with another request is 422, and while the first request still runs, 409. A response with
//! a 5xx status is not kept, so a retry runs again.

use std::convert::Infallible;
use std::future::Future;

use axum::body::{to_bytes, Body};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::{ApiError, BODY_LIMIT_BYTES};
use crate::domain::{request_fingerprint, IdempotencyBegin, IdempotencyKey, InvalidIdempotencyKey, StoredResponse};
use crate::service::{Caller, ProspectService};

/// The request header.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";
/// The response header on a replay.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";
/// [`IDEMPOTENCY_HEADER`], parsed once.
const IDEMPOTENCY_HEADER_NAME: HeaderName = HeaderName::from_static(IDEMPOTENCY_HEADER);

/// A request's `Idempotency-Key` header (taken out of the headers, not copied) and, when it
/// has one, the path the key's fingerprint covers.
pub(super) struct Idempotency {
    header: Option<HeaderValue>,
    path: String,
}

impl Idempotency {
    /// The request's path, when it has an `Idempotency-Key` (empty otherwise).
    pub(super) fn path(&self) -> &str {
        &self.path
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Idempotency {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
        let header = parts.headers.remove(IDEMPOTENCY_HEADER_NAME);
        let path = if header.is_some() { parts.uri.path().to_owned() } else { String::new() };
        Ok(Self { header, path })
    }
}

/// Runs `handler` under the request's idempotency key, if it has one; `path` is the one its
/// fingerprint covers.
pub(super) async fn run<F, Fut>(
    service: &ProspectService,
    caller: &Caller,
    idempotency: &Idempotency,
    method: &str,
    path: &str,
    body: &[u8],
    handler: F,
) -> Response
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<Response, ApiError>>,
{
    let Some(raw) = &idempotency.header else {
        return handler().await.unwrap_or_else(IntoResponse::into_response);
    };
    let key = match raw.to_str().map_err(|_| InvalidIdempotencyKey).and_then(IdempotencyKey::parse) {
        Ok(key) => key,
        Err(e) => return ApiError::BadRequest(e.to_string()).into_response(),
    };
    let fingerprint = request_fingerprint(method, path, body);
    match service.idempotency_begin(caller.account, &key, &fingerprint).await {
        Err(e) => ApiError::from(e).into_response(),
        Ok(IdempotencyBegin::InFlight) => {
            ApiError::Conflict("A request with this Idempotency-Key is still being processed; retry later".into()).into_response()
        }
        Ok(IdempotencyBegin::Mismatch) => {
            ApiError::Unprocessable(vec!["Idempotency-Key was already used with a different request".into()]).into_response()
        }
        Ok(IdempotencyBegin::Replay(stored)) => replay(stored),
        Ok(IdempotencyBegin::Started) => {
            let response = handler().await.unwrap_or_else(IntoResponse::into_response);
            if response.status().is_server_error() {
                abandon(service, caller, &key).await;
                return response;
            }
            let (parts, body) = response.into_parts();
            let Ok(bytes) = to_bytes(body, BODY_LIMIT_BYTES * 4).await else {
                abandon(service, caller, &key).await;
                return ApiError::Internal("response body could not be buffered".into()).into_response();
            };
            let stored = StoredResponse { status: parts.status.as_u16(), body: String::from_utf8_lossy(&bytes).into_owned() };
            if let Err(e) = service.idempotency_finish(caller.account, &key, &stored).await {
                tracing::warn!(error = %e, "could not keep the response of an idempotent request");
                abandon(service, caller, &key).await;
            }
            Response::from_parts(parts, Body::from(bytes))
        }
    }
}

async fn abandon(service: &ProspectService, caller: &Caller, key: &IdempotencyKey) {
    if let Err(e) = service.idempotency_abandon(caller.account, key).await {
        tracing::warn!(error = %e, "could not free an idempotency key; it frees itself when its lease ends");
    }
}

fn replay(stored: StoredResponse) -> Response {
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    let mut response = super::json_response(status, stored.body);
    response.headers_mut().insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    response
}
