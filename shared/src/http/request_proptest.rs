//! Property tests of request parsing: whatever bytes a client sends (random bytes, invalid
//! UTF-8, JSON nested 10,000 deep, numbers past `f64`, megabyte strings, any JSON type in any
//! field), `parse_upsert` and `parse_status` end in a command or in a 4xx `ApiError`, never in
//! a panic or a 5xx. A model of the field rules predicts which, and how many errors a 422 lists.
//! Every answer, error messages included, is also checked against a reference parser that reads
//! the body through a `serde_json::Value`, as the parser did before it read bodies directly.

use proptest::prelude::*;
use serde_json::{Map, Value};

use super::{parse_status, parse_upsert};
use crate::domain::{CampaignId, ExternalId, NormalizedEmail, ProspectStatus, TEXT_FIELDS, TEXT_FIELD_MAX_CHARS};
use crate::http::ApiError;

const CASES: u32 = 256;
/// Nesting past serde_json's recursion limit (128) is refused, however deep.
const DEEP: usize = 10_000;
const MEGABYTE: usize = 1024 * 1024;
const STATUSES: [&str; 4] = ["new", "converted", "unsubscribed", "bounced"];
/// Byte sequences that are never valid UTF-8: a stray continuation byte, bytes that never occur,
/// an overlong encoding, a UTF-16 surrogate, a code point past U+10FFFF, a truncated sequence.
const INVALID_UTF8: [&[u8]; 6] = [&[0x80], &[0xFF], &[0xC0, 0x80], &[0xED, 0xA0, 0x80], &[0xF4, 0x90, 0x80, 0x80], &[0xE2, 0x82]];

/// Every field of the POST body, plus one the API does not know.
fn post_fields() -> Vec<&'static str> {
    let mut fields = vec!["email", "external_id", "metadata", "campaign_id", "favourite_colour"];
    fields.extend(TEXT_FIELDS);
    fields
}

/// The status a parse ends in (200 for a command), after checking that a failure is a 4xx.
fn outcome<T>(result: Result<T, ApiError>) -> Result<u16, TestCaseError> {
    match result {
        Ok(_) => Ok(200),
        Err(e) => {
            let status = e.status().as_u16();
            prop_assert!((400..500).contains(&status), "{e:?} is a {status}");
            Ok(status)
        }
    }
}

/// Parses `body` with both parsers, checking each against its reference.
fn both_parsers(body: &[u8]) -> Result<(u16, u16), TestCaseError> {
    let (upsert, status) = (parse_upsert(body), parse_status(body));
    prop_assert_eq!(format!("{upsert:?}"), format!("{:?}", reference::parse_upsert(body)));
    prop_assert_eq!(format!("{status:?}"), format!("{:?}", reference::parse_status(body)));
    Ok((outcome(upsert)?, outcome(status)?))
}

/// The parsers as they were, through a `serde_json::Value`: what the direct parse must answer.
mod reference {
    use std::borrow::Cow;

    use serde_json::{Map, Value};

    use crate::domain::{
        CampaignId, EmailError, ExternalId, FieldChange, FieldError, NormalizedEmail, ProspectChanges,
        ProspectStatus, TEXT_FIELDS,
    };
    use crate::http::ApiError;
    use crate::service::UpsertCommand;

    fn json_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(map)) => Ok(map),
            Ok(_) => Err(ApiError::BadRequest("Request body must be a JSON object".into())),
            Err(_) => Err(ApiError::BadRequest("Request body must be valid JSON".into())),
        }
    }

    fn text_change(name: &str, value: Option<&Value>) -> Result<FieldChange<Cow<'static, str>>, FieldError> {
        match value {
            None => Ok(FieldChange::Unchanged),
            Some(Value::Null) => Ok(FieldChange::Clear),
            Some(Value::String(s)) => ProspectChanges::text(name, Cow::Owned(s.clone())).map(FieldChange::Set),
            Some(_) => Err(FieldError::NotAString(name.to_owned())),
        }
    }

    pub(super) fn parse_upsert(body: &[u8]) -> Result<UpsertCommand<'static>, ApiError> {
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
        for (name, change) in TEXT_FIELDS.into_iter().zip(&mut changes.fields) {
            match text_change(name, obj.get(name)) {
                Ok(c) => *change = c,
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

    pub(super) fn parse_status(body: &[u8]) -> Result<ProspectStatus, ApiError> {
        let obj = json_object(body)?;
        match obj.get("status") {
            Some(Value::String(raw)) => ProspectStatus::parse(raw).map_err(|e| ApiError::BadRequest(e.to_string())),
            _ => Err(ApiError::BadRequest("status is required: one of new, converted, unsubscribed, bounced".into())),
        }
    }
}

/// What `parse_upsert` must answer for an object: 200, 400, or 422 with this many errors.
#[derive(Debug, PartialEq)]
enum Expected {
    Command,
    BadRequest,
    Unprocessable(usize),
}

fn expected_upsert(body: &Map<String, Value>) -> Expected {
    let mut invalid = 0;
    match body.get("email") {
        None | Some(Value::Null) => return Expected::BadRequest,
        Some(Value::String(s)) if s.trim().is_empty() => return Expected::BadRequest,
        Some(Value::String(s)) => invalid += usize::from(NormalizedEmail::parse(s).is_err()),
        Some(_) => invalid += 1,
    }
    for name in TEXT_FIELDS {
        invalid += usize::from(match body.get(name) {
            None | Some(Value::Null) => false,
            Some(Value::String(s)) => s.chars().count() > TEXT_FIELD_MAX_CHARS,
            Some(_) => true,
        });
    }
    invalid += usize::from(match body.get("external_id") {
        None | Some(Value::Null) => false,
        Some(Value::String(s)) => ExternalId::parse(s).is_err(),
        Some(_) => true,
    });
    invalid += usize::from(!matches!(body.get("metadata"), None | Some(Value::Object(_))));
    invalid += usize::from(match body.get("campaign_id") {
        None | Some(Value::Null) => false,
        Some(Value::String(s)) => CampaignId::parse(s).is_err(),
        Some(_) => true,
    });
    if invalid == 0 {
        Expected::Command
    } else {
        Expected::Unprocessable(invalid)
    }
}

fn actual_upsert(body: &[u8]) -> Result<Expected, TestCaseError> {
    match parse_upsert(body) {
        Ok(_) => Ok(Expected::Command),
        Err(ApiError::BadRequest(_)) => Ok(Expected::BadRequest),
        Err(ApiError::Unprocessable(errors)) => Ok(Expected::Unprocessable(errors.len())),
        Err(e) => Err(TestCaseError::fail(format!("unexpected {e:?}"))),
    }
}

/// Strings a field's rules care about: empty, blank, addresses, UUIDs, lengths at and past the
/// limit (counted in characters, not bytes), control characters, and anything at all.
fn interesting_string() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("  \t ".to_owned()),
        "[A-Za-z0-9._%+-]{1,20}@[a-z0-9-]{1,12}\\.[a-z]{2,6}",
        Just(" Jane.Doe@Example.COM ".to_owned()),
        Just(format!("{}@example.com", "a".repeat(250))),
        Just("00000000-0000-4000-8000-000000000000".to_owned()),
        Just("{00000000-0000-4000-8000-000000000000}".to_owned()),
        Just("a".repeat(TEXT_FIELD_MAX_CHARS)),
        Just("é".repeat(TEXT_FIELD_MAX_CHARS)),
        Just("x".repeat(TEXT_FIELD_MAX_CHARS + 1)),
        Just("\u{0}\u{1f}\u{7f}\u{202e}".to_owned()),
        prop::sample::select(STATUSES.to_vec()).prop_map(|s| s.to_owned()),
        any::<String>(),
    ]
}

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from), // NaN and infinities become null
    ]
}

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        interesting_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(interesting_string(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A value of each JSON type in turn: null, bool, number, string, array, object.
fn value_of_every_type() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        interesting_string().prop_map(Value::String),
        prop::collection::vec(json_value(), 0..4).prop_map(Value::Array),
        prop::collection::btree_map(interesting_string(), json_value(), 0..4)
            .prop_map(|m| Value::Object(m.into_iter().collect())),
    ]
}

/// A value the field accepts: a body made only of these parses to a command.
fn acceptable(field: &str) -> BoxedStrategy<Value> {
    match field {
        "email" => "[a-z0-9.]{1,10}@[a-z]{1,8}\\.(io|com)".prop_map(Value::String).boxed(),
        "metadata" => prop::collection::btree_map(interesting_string(), json_value(), 0..4)
            .prop_map(|m| Value::Object(m.into_iter().collect()))
            .boxed(),
        "campaign_id" => prop_oneof![Just(Value::Null), any::<u128>().prop_map(|n| Value::from(uuid::Uuid::from_u128(n).to_string()))].boxed(),
        "external_id" => prop_oneof![Just(Value::Null), "[a-z0-9/ -]{1,20}".prop_map(Value::String)].boxed(),
        "favourite_colour" => json_value().boxed(),
        _ => prop_oneof![Just(Value::Null), ".{0,40}".prop_map(Value::String)].boxed(),
    }
}

/// A POST body: each field absent, acceptable, or of any JSON type, so that bodies parse to a
/// command, to a 422 listing one or several fields, and to a 400.
fn post_body() -> impl Strategy<Value = Map<String, Value>> {
    let fields = post_fields();
    let values = fields
        .iter()
        .map(|field| prop::option::weighted(0.6, prop_oneof![3 => acceptable(field), 1 => value_of_every_type()]))
        .collect::<Vec<_>>();
    let email = prop_oneof![6 => acceptable("email"), 1 => value_of_every_type()];
    (prop::option::weighted(0.9, email), values).prop_map(move |(email, values)| {
        let mut body = Map::new();
        for (name, value) in fields.iter().zip(values) {
            if let Some(value) = value {
                body.insert((*name).to_owned(), value);
            }
        }
        match email {
            Some(email) => body.insert("email".to_owned(), email),
            None => body.remove("email"),
        };
        body
    })
}

/// A key as JSON text: a field's name, plain or with a character escaped, `serde_json`'s raw
/// value marker, or anything; so that keys repeat.
fn key_spelling() -> impl Strategy<Value = String> {
    let mut names = post_fields();
    names.push("status");
    names.push("$serde_json::private::RawValue");
    (prop::sample::select(names), any::<bool>(), any::<String>(), 0..8u8).prop_map(|(name, escape, other, pick)| {
        let name = if pick == 0 { other } else { name.to_owned() };
        match name.chars().next() {
            Some(first) if escape && first.is_ascii() => format!("\"\\u{:04x}{}\"", u32::from(first), &name[1..]),
            _ => serde_json::to_string(&name).unwrap(),
        }
    })
}

/// `depth` nested arrays or objects around `1`.
fn nested(depth: usize, arrays: bool) -> String {
    let (open, close) = if arrays { ("[", "]") } else { ("{\"a\":", "}") };
    format!("{}1{}", open.repeat(depth), close.repeat(depth))
}

/// A JSON number literal: up to 400 digits, a fraction, an exponent up to ±1000.
fn number_literal() -> impl Strategy<Value = String> {
    (any::<bool>(), "[1-9][0-9]{0,399}", prop::option::of("[0-9]{1,40}"), prop::option::of(-1000i32..=1000))
        .prop_map(|(negative, digits, fraction, exponent)| {
            let sign = if negative { "-" } else { "" };
            let fraction = fraction.map(|f| format!(".{f}")).unwrap_or_default();
            let exponent = exponent.map(|e| format!("e{e}")).unwrap_or_default();
            format!("{sign}{digits}{fraction}{exponent}")
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn arbitrary_bytes_end_in_a_command_or_a_client_error(body in prop::collection::vec(any::<u8>(), 0..512)) {
        both_parsers(&body)?;
    }

    #[test]
    fn a_corrupted_valid_body_ends_in_a_command_or_a_client_error(
        body in post_body(),
        at in any::<prop::sample::Index>(),
        bytes in prop::collection::vec(any::<u8>(), 1..8),
    ) {
        let mut raw = serde_json::to_vec(&body).unwrap();
        let at = at.index(raw.len() + 1);
        raw.splice(at..at, bytes);
        both_parsers(&raw)?;
    }

    #[test]
    fn invalid_utf8_anywhere_is_a_bad_request(
        body in post_body(),
        at in any::<prop::sample::Index>(),
        bad in prop::sample::select(INVALID_UTF8.to_vec()),
    ) {
        let mut raw = serde_json::to_vec(&body).unwrap();
        let at = at.index(raw.len() + 1);
        raw.splice(at..at, bad.iter().copied());
        prop_assert_eq!(both_parsers(&raw)?, (400, 400));
    }

    #[test]
    fn every_field_with_every_json_type_is_parsed_as_the_rules_say(body in post_body()) {
        let raw = serde_json::to_vec(&body).unwrap();
        prop_assert_eq!(actual_upsert(&raw)?, expected_upsert(&body));
        both_parsers(&raw)?;
    }

    #[test]
    fn repeated_escaped_and_reserved_keys_are_read_as_a_value_reads_them(
        entries in prop::collection::vec((key_spelling(), value_of_every_type()), 0..12),
        pretty in any::<bool>(),
    ) {
        let separator = if pretty { ",\n  " } else { "," };
        let members: Vec<String> = entries.iter().map(|(key, value)| format!("{key}:{value}")).collect();
        let body = format!("{{{}}}", members.join(separator));
        both_parsers(body.as_bytes())?;
    }

    #[test]
    fn a_status_of_any_json_type_is_accepted_only_when_it_is_one_of_four(status in value_of_every_type()) {
        let body = serde_json::json!({ "status": status }).to_string();
        let parsed = parse_status(body.as_bytes());
        let expected = status.as_str().and_then(|s| ProspectStatus::parse(s).ok());
        match (parsed, expected) {
            (Ok(got), Some(want)) => prop_assert_eq!(got, want),
            (Err(e), None) => prop_assert_eq!(e.status().as_u16(), 400),
            (got, want) => return Err(TestCaseError::fail(format!("{status}: got {got:?}, want {want:?}"))),
        }
    }

    #[test]
    fn nesting_at_any_depth_is_a_command_or_a_client_error(
        depth in 1..=DEEP,
        arrays in any::<bool>(),
        field in prop::sample::select(post_fields()),
        top_level in any::<bool>(),
    ) {
        let value = nested(depth, arrays);
        let body = if top_level { value } else { format!("{{\"email\":\"a@b.io\",\"{field}\":{value}}}") };
        let (upsert, status) = both_parsers(body.as_bytes())?;
        if depth > 200 {
            prop_assert_eq!((upsert, status), (400, 400), "depth {}", depth);
        }
    }

    #[test]
    fn huge_numbers_in_any_field_are_a_command_or_a_client_error(
        number in number_literal(),
        field in prop::sample::select(post_fields()),
        in_metadata in any::<bool>(),
    ) {
        let value = if in_metadata { format!("{{\"{field}\":{number}}}") } else { number };
        let field = if in_metadata { "metadata" } else { field };
        let body = if field == "email" {
            format!("{{\"email\":{value}}}")
        } else {
            format!("{{\"email\":\"a@b.io\",\"{field}\":{value}}}")
        };
        let (upsert, _) = both_parsers(body.as_bytes())?;
        if !matches!(field, "metadata" | "favourite_colour") {
            prop_assert!(matches!(upsert, 400 | 422), "{} in {} gave {}", body.len(), field, upsert);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn megabyte_strings_in_any_field_are_a_command_or_a_client_error(
        field in prop::sample::select(post_fields()),
        unit in prop::sample::select(vec!["a", "é", "𝄞", "\\u0000", "\\\"", " "]),
        in_metadata in any::<bool>(),
    ) {
        let text = unit.repeat(MEGABYTE / unit.len());
        let value = if in_metadata { format!("{{\"{field}\":\"{text}\"}}") } else { format!("\"{text}\"") };
        let field = if in_metadata { "metadata" } else { field };
        let body = if field == "email" {
            format!("{{\"email\":{value}}}")
        } else {
            format!("{{\"email\":\"a@b.io\",\"{field}\":{value}}}")
        };
        let (upsert, _) = both_parsers(body.as_bytes())?;
        let expected = match field {
            _ if in_metadata => 200,
            "favourite_colour" => 200,
            "email" if unit == " " => 400,
            _ => 422,
        };
        prop_assert_eq!(upsert, expected, "{} of {:?}", field, unit);
    }
}

#[test]
fn ten_thousand_levels_of_nesting_are_a_bad_request() {
    for arrays in [true, false] {
        let value = nested(DEEP, arrays);
        for body in [value.clone(), format!("{{\"email\":\"a@b.io\",\"metadata\":{value}}}"), format!("{{\"status\":{value}}}")] {
            assert_eq!(parse_upsert(body.as_bytes()).unwrap_err().status().as_u16(), 400);
            assert_eq!(parse_status(body.as_bytes()).unwrap_err().status().as_u16(), 400);
        }
    }
}

#[test]
fn numbers_past_f64_are_a_bad_request_and_300_digits_fit() {
    for number in ["1e400", "-1e400", &"9".repeat(400)] {
        let body = format!("{{\"email\":\"a@b.io\",\"metadata\":{{\"n\":{number}}}}}");
        assert_eq!(parse_upsert(body.as_bytes()).unwrap_err().status().as_u16(), 400, "{number}");
    }
    let body = format!("{{\"email\":\"a@b.io\",\"metadata\":{{\"n\":{}}}}}", "9".repeat(300));
    assert!(parse_upsert(body.as_bytes()).is_ok());
    let body = format!("{{\"email\":\"a@b.io\",\"city\":{}}}", "9".repeat(300));
    assert_eq!(parse_upsert(body.as_bytes()).unwrap_err().status().as_u16(), 422);
}

#[test]
fn generated_bodies_reach_commands_bad_requests_and_unprocessables_alike() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = post_body();
    let (mut commands, mut bad, mut unprocessable) = (0, 0, 0);
    for _ in 0..CASES {
        let body = strategy.new_tree(&mut runner).unwrap().current();
        match expected_upsert(&body) {
            Expected::Command => commands += 1,
            Expected::BadRequest => bad += 1,
            Expected::Unprocessable(_) => unprocessable += 1,
        }
    }
    assert!([commands, bad, unprocessable].iter().all(|&n| n >= CASES / 20), "{commands} {bad} {unprocessable}");
}

#[test]
fn serde_json_raw_value_marker_keeps_the_meaning_a_value_gives_it() {
    let marker = "$serde_json::private::RawValue";
    for body in [
        format!(r#"{{"{marker}":"{{\"email\":\"a@b.io\"}}"}}"#),
        format!(r#"{{"{marker}":5}}"#),
        format!(r#"{{"email":"a@b.io","city":{{"{marker}":"\"Oslo\""}}}}"#),
        format!(r#"{{"email":"a@b.io","favourite_colour":[{{"{marker}":"1e400"}}]}}"#),
        format!(r#"{{"email":"a@b.io","metadata":{{"{marker}":"{{}}"}}}}"#),
        format!(r#"{{"status":"new","{marker}":"{{\"status\":\"converted\"}}"}}"#),
        format!(r#"{{"{marker}":"{{\"status\":\"converted\"}}"}}"#),
    ] {
        both_parsers(body.as_bytes()).unwrap();
    }
}

#[test]
fn the_last_of_repeated_keys_wins() {
    let body = br#"{"email":5,"city":7,"email":"a@b.io","city":"Oslo","status":"x","status":"new"}"#;
    assert_eq!(both_parsers(body).unwrap(), (200, 200));
}
