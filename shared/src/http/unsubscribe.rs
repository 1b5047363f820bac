//! One-click unsubscribe (RFC 8058): `POST /unsubscribe/{token}` unsubscribes, as mail clients
//! do from the `List-Unsubscribe-Post` header; `GET` shows a page whose button POSTs.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::{ApiError, AppState};

fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width\">\
         <title>{title}</title></head><body style=\"font-family:sans-serif;max-width:32em;margin:4em auto\">\
         <h1>{title}</h1>{body}</body></html>"
    )
}

fn wants_html(headers: &HeaderMap) -> bool {
    headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|a| a.contains("text/html"))
}

fn html_error(status: StatusCode, message: &str) -> Response {
    (status, Html(page("Unsubscribe", &format!("<p>{message}</p>")))).into_response()
}

/// `GET`: a confirmation page with a button; changes nothing.
pub(super) async fn confirmation_page(State(service): State<AppState>, token: Result<Path<String>, PathRejection>) -> Response {
    if token.map_or(true, |Path(token)| service.verify_unsubscribe(&token).is_err()) {
        return html_error(StatusCode::BAD_REQUEST, "This unsubscribe link is not valid.");
    }
    let body = "<p>Click the button to stop receiving these emails.</p>\
                <form method=\"post\"><button type=\"submit\">Unsubscribe</button></form>";
    Html(page("Unsubscribe", body)).into_response()
}

/// `POST`: unsubscribes. JSON for mail clients, a page for a browser's form.
pub(super) async fn unsubscribe(
    State(service): State<AppState>,
    headers: HeaderMap,
    token: Result<Path<String>, PathRejection>,
) -> Response {
    let html = wants_html(&headers);
    // A path that does not even decode is no token of ours: the same 400 as a forged one.
    let token = token.map(|Path(t)| t).unwrap_or_default();
    match service.unsubscribe(&token).await {
        Ok(_) if html => Html(page("Unsubscribed", "<p>You will not receive these emails any more.</p>")).into_response(),
        Ok(prospect) => (StatusCode::OK, Json(json!({ "unsubscribed": true, "prospect_id": prospect.id.to_string() }))).into_response(),
        Err(e) => {
            let error = ApiError::from(e);
            if html {
                let message = match error.status() {
                    StatusCode::BAD_REQUEST => "This unsubscribe link is not valid.",
                    StatusCode::NOT_FOUND => "We could not find this subscription.",
                    _ => "Something went wrong. Please try again later.",
                };
                let mut response = html_error(error.status(), message);
                if let Some(retry_after) = error.retry_after() {
                    response.headers_mut().insert(header::RETRY_AFTER, retry_after);
                }
                response
            } else {
                error.into_response()
            }
        }
    }
}
