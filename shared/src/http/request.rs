//! Request bodies: JSON in, checked domain commands out. Anything a client can send ends in a
//! command or in an `ApiError` with the documented status, never in a panic.
//!
//! A body is read straight into the fields the rules look at (strings borrowed from the body
//! where they need no unescaping), not through a `serde_json::Value`. Every value is still
//! parsed in full, unknown fields too, so a body is accepted exactly when `serde_json` accepts
//! it as a `Value`. Whenever that fast path fails, the body is parsed again as a `Value`, which
//! gives the error its exact message; the rules are then checked on the same fields either way.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::ApiError;
use crate::domain::{
    CampaignId, EmailError, ExternalId, FieldChange, FieldError, NormalizedEmail, ProspectChanges,
    ProspectStatus, TEXT_FIELDS,
};
use crate::service::UpsertCommand;

/// The key under which `serde_json` (with its `raw_value` feature) reads an object as raw JSON
/// text. A body that uses it anywhere is left to the `Value` parse, which gives it that meaning.
const RAW_VALUE_TOKEN: &str = "$serde_json::private::RawValue";

fn json_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::BadRequest("Request body must be a JSON object".into())),
        Err(_) => Err(ApiError::BadRequest("Request body must be valid JSON".into())),
    }
}

/// A top-level field's value, as far as the rules care.
#[derive(Debug, Default)]
enum Raw<'a> {
    #[default]
    Absent,
    Null,
    Str(Cow<'a, str>),
    /// A number, boolean, array or object.
    Other,
}

impl Raw<'static> {
    /// A field of a body parsed as a `Value` (the slow path, for bodies the direct read refused).
    fn of(value: Option<Value>) -> Self {
        match value {
            None => Self::Absent,
            Some(Value::Null) => Self::Null,
            Some(Value::String(s)) => Self::Str(Cow::Owned(s)),
            Some(_) => Self::Other,
        }
    }
}

/// `metadata`, as far as the rules care.
#[derive(Debug, Default)]
enum Metadata {
    #[default]
    Absent,
    Object(Map<String, Value>),
    /// Anything but an object, `null` included.
    Other,
}

impl Metadata {
    fn of(value: Option<Value>) -> Self {
        match value {
            None => Self::Absent,
            Some(Value::Object(map)) => Self::Object(map),
            Some(_) => Self::Other,
        }
    }
}

/// The fields of a POST body the rules look at; the last of duplicate keys wins, as in a `Value`.
#[derive(Debug, Default)]
struct UpsertFields<'a> {
    email: Raw<'a>,
    text: [Raw<'a>; TEXT_FIELDS.len()],
    external_id: Raw<'a>,
    metadata: Metadata,
    campaign_id: Raw<'a>,
}

impl UpsertFields<'static> {
    fn of(mut obj: Map<String, Value>) -> Self {
        Self {
            email: Raw::of(obj.remove("email")),
            text: TEXT_FIELDS.map(|name| Raw::of(obj.remove(name))),
            external_id: Raw::of(obj.remove("external_id")),
            metadata: Metadata::of(obj.remove("metadata")),
            campaign_id: Raw::of(obj.remove("campaign_id")),
        }
    }
}

/// The fields of a PATCH body the rules look at.
#[derive(Debug, Default)]
struct StatusFields<'a> {
    status: Raw<'a>,
}

/// A key of a request body: one the rules look at, or any other.
enum Key {
    Email,
    Text(usize),
    ExternalId,
    Metadata,
    CampaignId,
    Status,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_str<E: de::Error>(self, key: &str) -> Result<Key, E> {
                Ok(match key {
                    "email" => Key::Email,
                    "external_id" => Key::ExternalId,
                    "metadata" => Key::Metadata,
                    "campaign_id" => Key::CampaignId,
                    "status" => Key::Status,
                    // TEXT_FIELDS, by position (a test checks the two agree).
                    "display_name" => Key::Text(0),
                    "first_name" => Key::Text(1),
                    "last_name" => Key::Text(2),
                    "phone" => Key::Text(3),
                    "address" => Key::Text(4),
                    "city" => Key::Text(5),
                    "state" => Key::Text(6),
                    "zip" => Key::Text(7),
                    "country" => Key::Text(8),
                    "source" => Key::Text(9),
                    "utm_source" => Key::Text(10),
                    "utm_medium" => Key::Text(11),
                    "utm_campaign" => Key::Text(12),
                    "utm_term" => Key::Text(13),
                    "utm_content" => Key::Text(14),
                    RAW_VALUE_TOKEN => return Err(E::custom("raw value")),
                    _ => Key::Other,
                })
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// Any JSON value, parsed in full as a `Value` would be and then dropped.
struct Skip;

impl<'de> Deserialize<'de> for Skip {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(RawVisitor).map(|_| Self)
    }
}

impl<'de> Deserialize<'de> for Raw<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(RawVisitor)
    }
}

/// Reads any JSON value into a [`Raw`], walking arrays and objects to their end.
struct RawVisitor;

impl<'de> Visitor<'de> for RawVisitor {
    type Value = Raw<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E>(self) -> Result<Raw<'de>, E> {
        Ok(Raw::Null)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Raw<'de>, E> {
        Ok(Raw::Other)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Raw<'de>, E> {
        Ok(Raw::Other)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Raw<'de>, E> {
        Ok(Raw::Other)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Raw<'de>, E> {
        Ok(Raw::Other)
    }
    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Raw<'de>, E> {
        Ok(Raw::Str(Cow::Borrowed(s)))
    }
    fn visit_str<E>(self, s: &str) -> Result<Raw<'de>, E> {
        Ok(Raw::Str(Cow::Owned(s.to_owned())))
    }
    fn visit_string<E>(self, s: String) -> Result<Raw<'de>, E> {
        Ok(Raw::Str(Cow::Owned(s)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Raw<'de>, A::Error> {
        while seq.next_element::<Skip>()?.is_some() {}
        Ok(Raw::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Raw<'de>, A::Error> {
        // A nested key is read as a top-level one (which refuses the raw-value token) and dropped.
        while map.next_entry::<Key, Skip>()?.is_some() {}
        Ok(Raw::Other)
    }
}

/// Fields read from the keys of a body.
trait BodyFields<'de> {
    /// Reads the value of `key` into the fields.
    fn read<A: MapAccess<'de>>(&mut self, key: Key, map: &mut A) -> Result<(), A::Error>;
}

/// Reads a body that is a JSON object into the fields, one key at a time.
struct ObjectSeed<'a, T>(&'a mut T);

impl<'de, T: BodyFields<'de>> Visitor<'de> for ObjectSeed<'_, T> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<Key>()? {
            self.0.read(key, &mut map)?;
        }
        Ok(())
    }
}

impl<'de, T: BodyFields<'de>> DeserializeSeed<'de> for ObjectSeed<'_, T> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> BodyFields<'de> for UpsertFields<'de> {
    fn read<A: MapAccess<'de>>(&mut self, key: Key, map: &mut A) -> Result<(), A::Error> {
        match key {
            Key::Email => self.email = map.next_value()?,
            Key::Text(i) => self.text[i] = map.next_value()?,
            Key::ExternalId => self.external_id = map.next_value()?,
            Key::Metadata => self.metadata = Metadata::of(Some(map.next_value()?)),
            Key::CampaignId => self.campaign_id = map.next_value()?,
            Key::Status | Key::Other => {
                map.next_value::<Skip>()?;
            }
        }
        Ok(())
    }
}

impl<'de> BodyFields<'de> for StatusFields<'de> {
    fn read<A: MapAccess<'de>>(&mut self, key: Key, map: &mut A) -> Result<(), A::Error> {
        match key {
            Key::Status => self.status = map.next_value()?,
            _ => {
                map.next_value::<Skip>()?;
            }
        }
        Ok(())
    }
}

/// Reads a body that is a JSON object straight into `fields`; `false` when that fails for any
/// reason (the fields are then partly read), so that the `Value` parse decides.
fn read_fields<'de, T: BodyFields<'de>>(body: &'de [u8], fields: &mut T) -> bool {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    ObjectSeed(fields).deserialize(&mut deserializer).is_ok() && deserializer.end().is_ok()
}

fn text_change<'a>(name: &str, value: Raw<'a>) -> Result<FieldChange<Cow<'a, str>>, FieldError> {
    match value {
        Raw::Absent => Ok(FieldChange::Unchanged),
        Raw::Null => Ok(FieldChange::Clear),
        Raw::Str(s) => ProspectChanges::text(name, s).map(FieldChange::Set),
        Raw::Other => Err(FieldError::NotAString(name.to_owned())),
    }
}

/// Parses a POST body.
///
/// # Errors
/// 400 for a body that is not a JSON object or lacks an email; 422 listing every invalid field.
pub(super) fn parse_upsert(body: &[u8]) -> Result<UpsertCommand<'_>, ApiError> {
    let mut fields = UpsertFields::default();
    if read_fields(body, &mut fields) {
        upsert_command(fields)
    } else {
        upsert_command(UpsertFields::of(json_object(body)?))
    }
}

/// Checks a POST body's fields.
fn upsert_command(fields: UpsertFields<'_>) -> Result<UpsertCommand<'_>, ApiError> {
    let mut errors = Vec::new();

    let email = match &fields.email {
        Raw::Absent | Raw::Null => return Err(ApiError::BadRequest(EmailError::Blank.to_string())),
        Raw::Str(raw) => match NormalizedEmail::parse(raw) {
            Ok(email) => Some(email),
            Err(EmailError::Blank) => return Err(ApiError::BadRequest(EmailError::Blank.to_string())),
            Err(e) => {
                errors.push(e.to_string());
                None
            }
        },
        Raw::Other => {
            errors.push("email must be a string".to_owned());
            None
        }
    };

    let mut changes = ProspectChanges::default();
    for ((name, value), change) in TEXT_FIELDS.into_iter().zip(fields.text).zip(&mut changes.fields) {
        match text_change(name, value) {
            Ok(c) => *change = c,
            Err(e) => errors.push(e.to_string()),
        }
    }
    match &fields.external_id {
        Raw::Absent => {}
        Raw::Null => changes.external_id = FieldChange::Clear,
        Raw::Str(raw) => match ExternalId::parse(raw) {
            Ok(id) => changes.external_id = FieldChange::Set(id),
            Err(e) => errors.push(e.to_string()),
        },
        Raw::Other => errors.push(FieldError::NotAString("external_id".to_owned()).to_string()),
    }
    match fields.metadata {
        Metadata::Absent => {}
        Metadata::Object(patch) => changes.metadata = Some(patch),
        Metadata::Other => errors.push(FieldError::MetadataNotObject.to_string()),
    }
    let campaign_id = match &fields.campaign_id {
        Raw::Absent | Raw::Null => None,
        Raw::Str(raw) => match CampaignId::parse(raw) {
            Ok(id) => Some(id),
            Err(e) => {
                errors.push(e.to_string());
                None
            }
        },
        Raw::Other => {
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
    let mut fields = StatusFields::default();
    let status = if read_fields(body, &mut fields) { fields.status } else { Raw::of(json_object(body)?.remove("status")) };
    match status {
        Raw::Str(raw) => ProspectStatus::parse(&raw).map_err(|e| ApiError::BadRequest(e.to_string())),
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

    fn read<'a, T: BodyFields<'a> + Default>(body: &'a [u8]) -> Option<T> {
        let mut fields = T::default();
        read_fields(body, &mut fields).then_some(fields)
    }

    #[test]
    fn every_text_field_is_read_into_its_place() {
        for (i, name) in TEXT_FIELDS.iter().enumerate() {
            let body = format!(r#"{{"{name}":"x"}}"#);
            let fields = read::<UpsertFields<'_>>(body.as_bytes()).expect("read directly");
            for (j, value) in fields.text.iter().enumerate() {
                assert_eq!(matches!(value, Raw::Str(_)), i == j, "{name}");
            }
        }
    }

    #[test]
    fn a_plain_body_is_read_directly_borrowing_its_strings() {
        let body = br#"{"email":"a@b.io","city":"Oslo","zip":"0\u00351","metadata":{"plan":"pro"},"x":[1,{"y":null}]}"#;
        let fields = read::<UpsertFields<'_>>(body).expect("read directly");
        assert!(matches!(fields.email, Raw::Str(Cow::Borrowed("a@b.io"))));
        assert!(matches!(&fields.text[5], Raw::Str(Cow::Borrowed("Oslo"))));
        assert!(matches!(&fields.text[7], Raw::Str(Cow::Owned(zip)) if zip == "051"));
        assert!(matches!(fields.metadata, Metadata::Object(_)));
        assert!(read::<StatusFields<'_>>(br#"{"status":"new"}"#).is_some());
        assert!(read::<UpsertFields<'_>>(b"[]").is_none());
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
