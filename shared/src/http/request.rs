//! Request bodies: JSON in, checked domain commands out. Anything a client can send ends in a
//! command or in an `ApiError` with the documented status, never in a panic.

use serde_json::{Map, Value};

use super::ApiError;
use crate::domain::{
    CampaignId, EmailError, ExternalId, FieldChange, FieldError, NormalizedEmail, ProspectChanges,
    ProspectStatus, TEXT_FIELDS,
};
use crate::service::UpsertCommand;

fn json_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::BadRequest("Request body must be a JSON object".into())),
        Err(_) => Err(ApiError::BadRequest("Request body must be valid JSON".into())),
    }
}

fn text_change(name: &str, value: Option<&Value>) -> Result<FieldChange<String>, FieldError> {
    match value {
        None => Ok(FieldChange::Unchanged),
        Some(Value::Null) => Ok(FieldChange::Clear),
        Some(Value::String(s)) => ProspectChanges::text(name, s).map(FieldChange::Set),
        Some(_) => Err(FieldError::NotAString(name.to_owned())),
    }
}

/// Parses a POST body.
///
/// # Errors
/// 400 for a body that is not a JSON object or lacks an email; 422 listing every invalid field.
pub(super) fn parse_upsert(body: &[u8]) -> Result<UpsertCommand, ApiError> {
    let obj = json_object(body)?;
    let mut errors = Vec::new();

    let email = match obj.get("email") {
        None | Some(Value::Null) => return Err(ApiError::BadRequest(EmailError::Blank.to_string())),
        Some(Value::String(raw)) => match NormalizedEmail::parse(raw) {
            Ok(email) => Some(email),
            Err(EmailError::Blank) => return Err(ApiError::BadRequest(EmailError::Blank.to_string())),
            Err(e) => {
                errors.push(e.to_string());
                None
            }
        },
        Some(_) => {
            errors.push("email must be a string".to_owned());
            None
        }
    };

    let mut changes = ProspectChanges::default();
    for name in TEXT_FIELDS {
        match text_change(name, obj.get(name)) {
            Ok(FieldChange::Unchanged) => {}
            Ok(change) => {
                changes.fields.insert(name, change);
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    match text_change("external_id", obj.get("external_id")) {
        Ok(FieldChange::Set(raw)) => match ExternalId::parse(&raw) {
            Ok(id) => changes.external_id = FieldChange::Set(id),
            Err(e) => errors.push(e.to_string()),
        },
        Ok(FieldChange::Clear) => changes.external_id = FieldChange::Clear,
        Ok(FieldChange::Unchanged) => {}
        Err(e) => errors.push(e.to_string()),
    }
    match obj.get("metadata") {
        None => {}
        Some(Value::Object(patch)) => changes.metadata = Some(patch.clone()),
        Some(_) => errors.push(FieldError::MetadataNotObject.to_string()),
    }
    let campaign_id = match obj.get("campaign_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(raw)) => match CampaignId::parse(raw) {
            Ok(id) => Some(id),
            Err(e) => {
                errors.push(e.to_string());
                None
            }
        },
        Some(_) => {
            errors.push("campaign_id must be a UUID string".to_owned());
            None
        }
    };

    match email {
        Some(email) if errors.is_empty() => Ok(UpsertCommand { email, campaign_id, changes }),
        _ => Err(ApiError::Unprocessable(errors)),
    }
}

/// Parses a PATCH body.
///
/// # Errors
/// 400 for a body that is not a JSON object or a missing or unknown status.
pub(super) fn parse_status(body: &[u8]) -> Result<ProspectStatus, ApiError> {
    let obj = json_object(body)?;
    match obj.get("status") {
        Some(Value::String(raw)) => ProspectStatus::parse(raw).map_err(|e| ApiError::BadRequest(e.to_string())),
        _ => Err(ApiError::BadRequest("status is required: one of new, converted, unsubscribed, bounced".into())),
    }
}

#[cfg(test)] #[path = "request_proptest.rs"] mod proptests;

#[cfg(test)]
mod tests {
    use super::*;

    fn status_of(body: &str) -> u16 {
        match parse_upsert(body.as_bytes()) {
            Ok(_) => 200,
            Err(e) => e.status().as_u16(),
        }
    }

    #[test]
    fn missing_null_or_blank_email_is_a_bad_request() {
        for body in [r#"{}"#, r#"{"email":null}"#, r#"{"email":"  "}"#] {
            assert_eq!(status_of(body), 400, "{body}");
        }
    }

    #[test]
    fn non_object_bodies_are_bad_requests() {
        for body in ["", "[]", "\"x\"", "{", "nul"] {
            assert_eq!(status_of(body), 400, "{body}");
        }
    }

    #[test]
    fn wrong_types_are_unprocessable_with_every_error_listed() {
        let Err(ApiError::Unprocessable(errors)) =
            parse_upsert(br#"{"email":"a@b.io","city":5,"zip":"1","metadata":[],"campaign_id":"x"}"#)
        else {
            panic!("expected 422")
        };
        assert_eq!(errors.len(), 3, "{errors:?}");
    }

    #[test]
    fn non_string_email_is_unprocessable() {
        assert_eq!(status_of(r#"{"email":42}"#), 422);
    }

    #[test]
    fn unknown_fields_are_ignored() {
        assert_eq!(status_of(r#"{"email":"a@b.io","favourite_colour":"blue"}"#), 200);
    }

    #[test]
    fn status_must_be_one_of_four() {
        assert!(parse_status(br#"{"status":"converted"}"#).is_ok());
        assert_eq!(parse_status(br#"{"status":"won"}"#).unwrap_err().status().as_u16(), 400);
        assert_eq!(parse_status(br#"{}"#).unwrap_err().status().as_u16(), 400);
    }
}
