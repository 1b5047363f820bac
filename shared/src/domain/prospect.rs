//! The prospect: one lead of one account, upserted by normalized email, with its status and
//! its campaign enrollments.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, IgnoredAny, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde_json::{Map, Value};
use time::OffsetDateTime;

use super::{AccountId, CampaignId, EnrollmentId, NormalizedEmail, ProspectId};

/// The optional free-text fields a client may set, besides `external_id`.
pub const TEXT_FIELDS: [&str; 15] = [
    "display_name", "first_name", "last_name", "phone", "address", "city", "state", "zip",
    "country", "source", "utm_source", "utm_medium", "utm_campaign", "utm_term", "utm_content",
];
/// The position of the text field `name` in [`TEXT_FIELDS`].
#[must_use]
pub fn text_field_index(name: &str) -> Option<usize> {
    TEXT_FIELDS.iter().position(|field| *field == name)
}

/// Longest value of a text field or `external_id`, in characters.
pub const TEXT_FIELD_MAX_CHARS: usize = 255;
/// Largest stored `metadata` object, serialized as compact JSON, in bytes.
pub const METADATA_MAX_BYTES: usize = 16 * 1024;

/// A field value a client sent that cannot be stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    #[error("{0} must be a string or null")]
    NotAString(String),
    #[error("{0} must be at most {TEXT_FIELD_MAX_CHARS} characters")]
    TooLong(String),
    #[error("external_id must not be empty")]
    EmptyExternalId,
    #[error("metadata must be an object")]
    MetadataNotObject,
    #[error("metadata must be at most {METADATA_MAX_BYTES} bytes once merged")]
    MetadataTooLarge,
}

/// A status value that is not one of the four.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("status must be one of: new, converted, unsubscribed, bounced")]
pub struct StatusError;

/// Where a prospect stands. Every status but `new` ends its campaigns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProspectStatus {
    New,
    Converted,
    Unsubscribed,
    Bounced,
}

impl ProspectStatus {
    /// # Errors
    /// [`StatusError`] for anything but the four lowercase names.
    pub fn parse(raw: &str) -> Result<Self, StatusError> {
        match raw {
            "new" => Ok(Self::New),
            "converted" => Ok(Self::Converted),
            "unsubscribed" => Ok(Self::Unsubscribed),
            "bounced" => Ok(Self::Bounced),
            _ => Err(StatusError),
        }
    }

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::New => "new",
            Self::Converted => "converted",
            Self::Unsubscribed => "unsubscribed",
            Self::Bounced => "bounced",
        }
    }

    /// Whether moving to this status ends every enrollment.
    #[must_use]
    pub fn ends_campaigns(self) -> bool {
        self != Self::New
    }
}

/// What set a prospect's status: every status change names its cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StatusReason {
    /// A PATCH through the API.
    Api,
    /// The prospect's one-click unsubscribe link.
    UnsubscribeLink,
    /// The mail provider refused the address when a campaign email was sent.
    Rejected,
    /// The address was erased before: a prospect created for it again starts unsubscribed.
    Erased,
    /// The provider reported the address dead after the send (a permanent bounce, or the
    /// third transient one within 30 days).
    Bounce,
    /// The recipient marked a campaign email as spam.
    Complaint,
    /// A payment provider (Stripe) reported the prospect paid.
    Payment,
}

impl StatusReason {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Api => "api",
            Self::UnsubscribeLink => "unsubscribe_link",
            Self::Rejected => "rejected",
            Self::Erased => "erased",
            Self::Bounce => "bounce",
            Self::Complaint => "complaint",
            Self::Payment => "payment",
        }
    }
}

/// One change of a prospect's status, as its history keeps it (oldest first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusChange {
    pub from: ProspectStatus,
    pub to: ProspectStatus,
    pub at: OffsetDateTime,
    pub reason: StatusReason,
}

/// A status change as stored: its `from` is the status before it, so it is not kept (a
/// store appends a change in the same write that sets the status, without reading first).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredStatusChange {
    pub to: ProspectStatus,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub reason: StatusReason,
}

/// The history of status changes from its stored entries: each change's `from` is the
/// status before it (`new` first); an entry that set the status it found changed nothing
/// and is left out.
#[must_use]
pub fn status_history(stored: &[StoredStatusChange]) -> Vec<StatusChange> {
    let mut status = ProspectStatus::New;
    let mut history = Vec::new();
    for entry in stored {
        if entry.to != status {
            history.push(StatusChange { from: status, to: entry.to, at: entry.at, reason: entry.reason });
            status = entry.to;
        }
    }
    history
}

impl StatusChange {
    /// The change as stored.
    #[must_use]
    pub fn stored(&self) -> StoredStatusChange {
        StoredStatusChange { to: self.to, at: self.at, reason: self.reason }
    }
}

/// Where one step of one of the prospect's enrollments stands, as the store keeps it with the
/// prospect (so one read of the prospect tells where each enrollment is). Only outcomes are
/// kept: a step being sent right now is not here yet.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StepProgress {
    pub enrollment: EnrollmentId,
    pub step: u32,
    /// The send state's name (see [`crate::domain::SendState::name`]).
    pub state: String,
    /// When the outcome was recorded.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// For `retry_scheduled`: when the retry is due.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "time::serde::rfc3339::option")]
    pub retry_at: Option<OffsetDateTime>,
    /// For `sent`: the provider's message id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// The subject of the email, once rendered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
}

/// The client's own identifier for a prospect: 1 to 255 characters, unique per account.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct ExternalId(String);

impl ExternalId {
    /// # Errors
    /// [`FieldError`] when empty or over [`TEXT_FIELD_MAX_CHARS`] characters.
    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        if raw.is_empty() {
            return Err(FieldError::EmptyExternalId);
        }
        if super::more_chars_than(raw, TEXT_FIELD_MAX_CHARS) {
            return Err(FieldError::TooLong("external_id".into()));
        }
        Ok(Self(raw.to_owned()))
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What a request says about one optional field.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum FieldChange<T> {
    /// Absent from the request: keep what is stored.
    #[default]
    Unchanged,
    /// `null`: clear it.
    Clear,
    /// A value: replace.
    Set(T),
}

/// The attribute changes of one POST, already checked. Text values are borrowed from the request
/// body where they needed no unescaping: they are copied once, into the prospect.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ProspectChanges<'a> {
    /// What the request says about each of [`TEXT_FIELDS`], by position.
    pub fields: [FieldChange<Cow<'a, str>>; TEXT_FIELDS.len()],
    pub external_id: FieldChange<ExternalId>,
    /// An RFC 7396 merge patch for the stored metadata.
    pub metadata: Option<Map<String, Value>>,
}

impl<'a> ProspectChanges<'a> {
    /// Checks one text field's value.
    ///
    /// # Errors
    /// [`FieldError::TooLong`] over [`TEXT_FIELD_MAX_CHARS`] characters.
    pub fn text(name: &str, value: Cow<'a, str>) -> Result<Cow<'a, str>, FieldError> {
        if super::more_chars_than(&value, TEXT_FIELD_MAX_CHARS) {
            return Err(FieldError::TooLong(name.to_owned()));
        }
        Ok(value)
    }
}

/// One enrollment of a prospect in a campaign. It may send while the prospect's status is
/// `new` and no status change has ended it (see [`Prospect::is_active`]). Its progress is in
/// the send log, not here: after the last step no job follows, so completing an enrollment
/// writes nothing (see [`crate::ports::SendLog::claimed_at`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Enrollment {
    pub id: EnrollmentId,
    /// 1-based position among the prospect's enrollments.
    pub seq: u32,
    pub campaign_id: CampaignId,
    #[serde(with = "time::serde::rfc3339")]
    pub enrolled_at: OffsetDateTime,
}

/// A prospect's text fields: at most one value for each of [`TEXT_FIELDS`], by position.
/// Serialized as an object of the fields that are set; names not in [`TEXT_FIELDS`] are
/// dropped when one is read.
///
/// The slots are allocated when the first field is set: a prospect stays small to move (every
/// port call and future holds one), and one without fields allocates nothing.
#[derive(Debug, Clone, Default)]
pub struct TextFields(Vec<Option<String>>);

impl TextFields {
    /// The value of the field `name`, if it is set.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<&str> {
        text_field_index(name).and_then(|i| self.at(i))
    }

    /// Sets (`Some`) or clears (`None`) the field `name`. Returns `false`, changing nothing,
    /// for a name not in [`TEXT_FIELDS`].
    pub fn set(&mut self, name: &str, value: Option<String>) -> bool {
        let Some(i) = text_field_index(name) else { return false };
        self.slots()[i] = value;
        true
    }

    /// The fields that are set, in [`TEXT_FIELDS`] order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &str)> {
        TEXT_FIELDS.into_iter().zip(&self.0).filter_map(|(name, value)| Some((name, value.as_deref()?)))
    }

    /// Every field in [`TEXT_FIELDS`] order, with its value if it is set.
    pub fn each(&self) -> impl Iterator<Item = (&'static str, Option<&str>)> {
        TEXT_FIELDS.into_iter().enumerate().map(|(i, name)| (name, self.at(i)))
    }

    fn at(&self, i: usize) -> Option<&str> {
        self.0.get(i).and_then(Option::as_deref)
    }

    /// One slot per text field, allocated on first use.
    fn slots(&mut self) -> &mut [Option<String>] {
        if self.0.is_empty() {
            self.0.resize(TEXT_FIELDS.len(), None);
        }
        &mut self.0
    }

    /// Whether `changes` would change any field.
    fn would_change(&self, changes: &[FieldChange<Cow<'_, str>>; TEXT_FIELDS.len()]) -> bool {
        changes.iter().enumerate().any(|(i, change)| match change {
            FieldChange::Unchanged => false,
            FieldChange::Clear => self.at(i).is_some(),
            FieldChange::Set(v) => self.at(i) != Some(&**v),
        })
    }

    /// Applies `changes`, reusing a stored value's buffer where one is replaced.
    fn apply(&mut self, changes: &[FieldChange<Cow<'_, str>>; TEXT_FIELDS.len()]) {
        if changes.iter().all(|c| matches!(c, FieldChange::Unchanged)) {
            return;
        }
        for (value, change) in self.slots().iter_mut().zip(changes) {
            match (change, value.as_mut()) {
                (FieldChange::Unchanged, _) => {}
                (FieldChange::Clear, _) => *value = None,
                (FieldChange::Set(v), Some(current)) => {
                    current.clear();
                    current.push_str(v);
                }
                (FieldChange::Set(v), None) => *value = Some(String::from(&**v)),
            }
        }
    }
}

impl PartialEq for TextFields {
    /// The same values set: slots not yet allocated are all unset.
    fn eq(&self, other: &Self) -> bool {
        (0..TEXT_FIELDS.len()).all(|i| self.at(i) == other.at(i))
    }
}

impl Eq for TextFields {}

impl serde::Serialize for TextFields {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        for (name, value) in self.iter() {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

impl<'de> serde::Deserialize<'de> for TextFields {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        /// A key, as its position in [`TEXT_FIELDS`] (`None` for any other name).
        struct Index(Option<usize>);
        impl<'de> serde::Deserialize<'de> for Index {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct IndexVisitor;
                impl Visitor<'_> for IndexVisitor {
                    type Value = Index;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str("a field name")
                    }
                    fn visit_str<E: de::Error>(self, name: &str) -> Result<Index, E> {
                        Ok(Index(text_field_index(name)))
                    }
                }
                deserializer.deserialize_str(IndexVisitor)
            }
        }
        struct FieldsVisitor;
        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = TextFields;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of text fields")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TextFields, A::Error> {
                let mut fields = TextFields::default();
                while let Some(Index(index)) = map.next_key()? {
                    match index {
                        Some(i) => fields.slots()[i] = Some(map.next_value()?),
                        None => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(fields)
            }
        }
        deserializer.deserialize_map(FieldsVisitor)
    }
}

/// A stored prospect.
#[derive(Debug, Clone, PartialEq)]
pub struct Prospect {
    pub id: ProspectId,
    pub account_id: AccountId,
    pub email: NormalizedEmail,
    pub fields: TextFields,
    pub external_id: Option<ExternalId>,
    pub metadata: Map<String, Value>,
    pub status: ProspectStatus,
    pub enrollments: Vec<Enrollment>,
    /// Every enrollment with `seq <= ended_through` was ended by a status change. Kept as one
    /// number so that a status change ends every enrollment in one atomic write.
    pub ended_through: u32,
    /// Optimistic-concurrency version, incremented by every write.
    pub version: u64,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
    /// Every status change, oldest first.
    pub history: Vec<StatusChange>,
    /// The recorded outcome of each step of each enrollment, in no particular order.
    pub progress: Vec<StepProgress>,
}

impl Prospect {
    /// A new prospect with status `new` and no enrollment.
    #[must_use]
    pub fn new(account_id: AccountId, email: NormalizedEmail, now: OffsetDateTime) -> Self {
        Self {
            id: ProspectId::new(),
            account_id,
            email,
            fields: TextFields::default(),
            external_id: None,
            metadata: Map::new(),
            status: ProspectStatus::New,
            enrollments: Vec::new(),
            ended_through: 0,
            version: 0,
            created_at: now,
            updated_at: now,
            history: Vec::new(),
            progress: Vec::new(),
        }
    }

    /// Applies a POST's changes and the address as sent this time. Returns whether anything
    /// changed, so an identical POST costs no write.
    ///
    /// # Errors
    /// [`FieldError::MetadataTooLarge`] when the merged metadata is over [`METADATA_MAX_BYTES`];
    /// the prospect is then left as it was.
    pub fn apply(&mut self, email: &NormalizedEmail, changes: &ProspectChanges<'_>) -> Result<bool, FieldError> {
        if !self.would_change(email, changes)? {
            return Ok(false);
        }
        let merged = match &changes.metadata {
            Some(patch) if merge_changes(&self.metadata, patch) => {
                let mut merged = self.metadata.clone();
                merge(&mut merged, patch);
                check_metadata_size(&merged)?;
                Some(merged)
            }
            _ => None,
        };
        if self.email.original() != email.original() {
            self.email = email.clone();
        }
        self.fields.apply(&changes.fields);
        match &changes.external_id {
            FieldChange::Unchanged => {}
            FieldChange::Clear => self.external_id = None,
            FieldChange::Set(v) => self.external_id = Some(v.clone()),
        }
        if let Some(merged) = merged {
            self.metadata = merged;
        }
        Ok(true)
    }

    /// Whether [`Prospect::apply`] would change anything, without changing the prospect (and
    /// without the cost of a copy when it would not).
    ///
    /// # Errors
    /// [`FieldError::MetadataTooLarge`] when the metadata is unchanged by the patch but over
    /// [`METADATA_MAX_BYTES`]; a changing patch is checked by `apply`.
    pub fn would_change(&self, email: &NormalizedEmail, changes: &ProspectChanges<'_>) -> Result<bool, FieldError> {
        if let Some(patch) = &changes.metadata {
            if merge_changes(&self.metadata, patch) {
                return Ok(true);
            }
            check_metadata_size(&self.metadata)?;
        }
        let field_changes = self.fields.would_change(&changes.fields);
        let external_id_changes = match &changes.external_id {
            FieldChange::Unchanged => false,
            FieldChange::Clear => self.external_id.is_some(),
            FieldChange::Set(v) => self.external_id.as_ref() != Some(v),
        };
        Ok(self.email.original() != email.original() || field_changes || external_id_changes)
    }

    /// Whether [`Prospect::enroll`] would enroll the prospect in `campaign_id`.
    #[must_use]
    pub fn can_enroll(&self, campaign_id: CampaignId) -> bool {
        self.status == ProspectStatus::New && !self.enrollments.iter().any(|e| e.campaign_id == campaign_id)
    }

    /// Enrolls the prospect in `campaign_id` unless its status is not `new` or it was ever
    /// enrolled in that campaign before. Returns the new enrollment.
    pub fn enroll(&mut self, campaign_id: CampaignId, now: OffsetDateTime) -> Option<Enrollment> {
        if !self.can_enroll(campaign_id) {
            return None;
        }
        let enrollment = Enrollment {
            id: EnrollmentId::new(),
            seq: u32::try_from(self.enrollments.len()).map_or(u32::MAX, |n| n.saturating_add(1)),
            campaign_id,
            enrolled_at: now,
        };
        self.enrollments.push(enrollment.clone());
        Some(enrollment)
    }

    /// Whether an enrollment may still send email.
    #[must_use]
    pub fn is_active(&self, enrollment: &Enrollment) -> bool {
        self.status == ProspectStatus::New && enrollment.seq > self.ended_through
    }

    /// Sets the status, for `reason`; a status other than `new` ends every enrollment.
    /// Setting `new` again revives none. A change is kept in the history.
    pub fn set_status(&mut self, status: ProspectStatus, reason: StatusReason, now: OffsetDateTime) {
        if status != self.status {
            self.history.push(StatusChange { from: self.status, to: status, at: now, reason });
        }
        self.status = status;
        if status.ends_campaigns() {
            self.ended_through = self.enrollment_count();
        }
        self.updated_at = now;
    }

    /// How many enrollments the prospect has ever had.
    #[must_use]
    pub fn enrollment_count(&self) -> u32 {
        u32::try_from(self.enrollments.len()).unwrap_or(u32::MAX)
    }
}

/// Whether merging the RFC 7396 `patch` into `target` changes it.
fn merge_changes(target: &Map<String, Value>, patch: &Map<String, Value>) -> bool {
    patch.iter().any(|(key, value)| match (target.get(key), value) {
        (None, Value::Null) => false,
        (None, _) | (Some(_), Value::Null) => true,
        (Some(Value::Object(current)), Value::Object(patch)) => merge_changes(current, patch),
        (Some(_), Value::Object(_)) => true,
        (Some(current), value) => current != value,
    })
}

/// Merges the RFC 7396 `patch` into `target`.
fn merge(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            json_patch::merge(target.entry(key.as_str()).or_insert(Value::Null), value);
        }
    }
}

/// Refuses metadata over [`METADATA_MAX_BYTES`] as compact JSON, counting the bytes rather
/// than keeping them, and stopping at the limit.
fn check_metadata_size(metadata: &Map<String, Value>) -> Result<(), FieldError> {
    /// Counts what is written, failing once past the limit.
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            if self.0 > METADATA_MAX_BYTES {
                return Err(std::io::ErrorKind::FileTooLarge.into());
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    serde_json::to_writer(&mut Counter(0), metadata).map_err(|_| FieldError::MetadataTooLarge)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn prospect() -> Prospect {
        Prospect::new(AccountId::new(), NormalizedEmail::parse("a@b.io").unwrap(), OffsetDateTime::UNIX_EPOCH)
    }

    fn metadata_patch(v: Value) -> ProspectChanges<'static> {
        ProspectChanges { metadata: v.as_object().cloned(), ..ProspectChanges::default() }
    }

    #[test]
    fn metadata_is_merged_as_a_json_merge_patch() {
        let mut p = prospect();
        let email = p.email.clone();
        p.apply(&email, &metadata_patch(json!({"plan": "pro", "ui": {"theme": "dark", "lang": "en"}}))).unwrap();
        p.apply(&email, &metadata_patch(json!({"plan": null, "ui": {"lang": "fr"}}))).unwrap();
        assert_eq!(Value::Object(p.metadata), json!({"ui": {"theme": "dark", "lang": "fr"}}));
    }

    #[test]
    fn oversized_metadata_is_refused_and_leaves_the_prospect_unchanged() {
        let mut p = prospect();
        let email = p.email.clone();
        let big = "x".repeat(METADATA_MAX_BYTES);
        assert_eq!(p.apply(&email, &metadata_patch(json!({ "big": big }))), Err(FieldError::MetadataTooLarge));
        assert!(p.metadata.is_empty());
    }

    #[test]
    fn text_fields_serialize_as_an_object_and_read_back_dropping_unknown_names() {
        let mut fields = TextFields::default();
        assert!(fields.set("zip", Some("0150".into())));
        assert!(fields.set("city", Some("Oslo".into())));
        assert!(!fields.set("nickname", Some("x".into())));
        let json = serde_json::to_value(&fields).unwrap();
        assert_eq!(json, json!({"city": "Oslo", "zip": "0150"}));
        let read: TextFields = serde_json::from_str(r#"{"zip":"1","city":"Oslo","nickname":"x","zip":"0150"}"#).unwrap();
        assert_eq!(read, fields);
        assert_eq!(read.iter().collect::<Vec<_>>(), [("city", "Oslo"), ("zip", "0150")]);
    }

    #[test]
    fn absent_fields_are_kept_null_fields_are_cleared() {
        let mut p = prospect();
        let email = p.email.clone();
        let mut set = ProspectChanges::default();
        set.fields[text_field_index("city").unwrap()] = FieldChange::Set("Oslo".into());
        set.fields[text_field_index("zip").unwrap()] = FieldChange::Set("0150".into());
        p.apply(&email, &set).unwrap();
        let mut clear = ProspectChanges::default();
        clear.fields[text_field_index("zip").unwrap()] = FieldChange::Clear;
        assert!(p.apply(&email, &clear).unwrap());
        assert_eq!(p.fields.get("city"), Some("Oslo"));
        assert_eq!(p.fields.get("zip"), None);
    }

    #[test]
    fn identical_changes_report_no_change() {
        let mut p = prospect();
        let email = p.email.clone();
        let mut set = ProspectChanges::default();
        set.fields[text_field_index("city").unwrap()] = FieldChange::Set("Oslo".into());
        assert!(p.apply(&email, &set).unwrap());
        assert!(!p.apply(&email, &set).unwrap());
    }

    #[test]
    fn only_a_changing_metadata_patch_counts_as_a_change() {
        let mut p = prospect();
        let email = p.email.clone();
        let patch = metadata_patch(json!({"plan": "pro", "ui": {"theme": "dark"}, "gone": null}));
        assert_eq!(p.would_change(&email, &patch), Ok(true));
        assert!(p.apply(&email, &patch).unwrap());
        for same in [json!({"plan": "pro"}), json!({"ui": {"theme": "dark", "x": null}}), json!({"gone": null}), json!({})] {
            assert_eq!(p.would_change(&email, &metadata_patch(same.clone())), Ok(false), "{same}");
            assert!(!p.apply(&email, &metadata_patch(same)).unwrap());
        }
    }

    /// `apply` as it was: merge into a copy, then compare everything before and after.
    fn reference_apply(p: &mut Prospect, email: &NormalizedEmail, changes: &ProspectChanges<'_>) -> Result<bool, FieldError> {
        let metadata = match &changes.metadata {
            Some(patch) => {
                let mut merged = Value::Object(p.metadata.clone());
                json_patch::merge(&mut merged, &Value::Object(patch.clone()));
                let Value::Object(merged) = merged else { return Err(FieldError::MetadataNotObject) };
                if serde_json::to_vec(&merged).map_or(usize::MAX, |v| v.len()) > METADATA_MAX_BYTES {
                    return Err(FieldError::MetadataTooLarge);
                }
                Some(merged)
            }
            None => None,
        };
        let before = p.clone();
        p.email = email.clone();
        for (name, change) in TEXT_FIELDS.into_iter().zip(&changes.fields) {
            match change {
                FieldChange::Unchanged => {}
                FieldChange::Clear => {
                    p.fields.set(name, None);
                }
                FieldChange::Set(v) => {
                    p.fields.set(name, Some(v.to_string()));
                }
            }
        }
        match &changes.external_id {
            FieldChange::Unchanged => {}
            FieldChange::Clear => p.external_id = None,
            FieldChange::Set(v) => p.external_id = Some(v.clone()),
        }
        if let Some(merged) = metadata {
            p.metadata = merged;
        }
        Ok(before.email.original() != p.email.original()
            || before.fields != p.fields
            || before.external_id != p.external_id
            || before.metadata != p.metadata)
    }

    fn small_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            (0..3i64).prop_map(Value::from),
            prop::sample::select(vec!["a", "b", ""]).prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
                prop::collection::btree_map(prop::sample::select(vec!["k", "l", "m"]), inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())),
            ]
        })
    }

    fn small_object() -> impl Strategy<Value = Map<String, Value>> {
        prop::collection::btree_map(prop::sample::select(vec!["k", "l", "m"]), small_json(), 0..4)
            .prop_map(|m| m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
    }

    fn change<T: std::fmt::Debug + Clone>(value: impl Strategy<Value = T>) -> impl Strategy<Value = FieldChange<T>> {
        prop_oneof![Just(FieldChange::Unchanged), Just(FieldChange::Clear), value.prop_map(FieldChange::Set)]
    }

    fn changes() -> impl Strategy<Value = ProspectChanges<'static>> {
        (
            change(prop::sample::select(vec!["Oslo", "Bergen"])),
            change(prop::sample::select(vec!["1", "2"])),
            change(prop::sample::select(vec!["e-1", "e-2"])),
            prop::option::of(small_object()),
        )
            .prop_map(|(city, zip, external_id, metadata)| {
                let mut changes = ProspectChanges { metadata, ..ProspectChanges::default() };
                for (name, c) in [("city", city), ("zip", zip)] {
                    let c = match c {
                        FieldChange::Set(v) => FieldChange::Set(Cow::Borrowed(v)),
                        FieldChange::Clear => FieldChange::Clear,
                        FieldChange::Unchanged => FieldChange::Unchanged,
                    };
                    changes.fields[text_field_index(name).unwrap()] = c;
                }
                changes.external_id = match external_id {
                    FieldChange::Set(v) => FieldChange::Set(ExternalId::parse(v).unwrap()),
                    FieldChange::Clear => FieldChange::Clear,
                    FieldChange::Unchanged => FieldChange::Unchanged,
                };
                changes
            })
    }

    proptest! {
        #[test]
        fn apply_and_would_change_agree_with_comparing_a_copy(
            first in changes(),
            second in changes(),
            email in prop::sample::select(vec!["a@b.io", "A@b.io"]),
        ) {
            let mut p = prospect();
            p.apply(&p.email.clone(), &first).unwrap();
            let email = NormalizedEmail::parse(email).unwrap();
            let mut expected = p.clone();
            let want = reference_apply(&mut expected, &email, &second);
            prop_assert_eq!(p.would_change(&email, &second), want.clone());
            prop_assert_eq!(p.apply(&email, &second), want);
            prop_assert_eq!(p, expected);
        }
    }

    #[test]
    fn oversized_stored_metadata_is_refused_even_by_a_patch_that_changes_nothing() {
        let mut p = prospect();
        let email = p.email.clone();
        p.metadata.insert("big".into(), Value::String("x".repeat(METADATA_MAX_BYTES)));
        let patch = metadata_patch(json!({}));
        assert_eq!(p.would_change(&email, &patch), Err(FieldError::MetadataTooLarge));
        assert_eq!(p.apply(&email, &patch), Err(FieldError::MetadataTooLarge));
        assert_eq!(p.apply(&email, &ProspectChanges::default()), Ok(false));
    }

    #[test]
    fn a_status_change_ends_every_enrollment_and_new_does_not_revive_them() {
        let mut p = prospect();
        let now = OffsetDateTime::UNIX_EPOCH;
        let first = p.enroll(CampaignId::new(), now).unwrap();
        p.set_status(ProspectStatus::Converted, StatusReason::Api, now);
        assert!(!p.is_active(&first));
        p.set_status(ProspectStatus::New, StatusReason::Api, now);
        assert!(!p.is_active(&first));
        let second = p.enroll(CampaignId::new(), now).unwrap();
        assert!(p.is_active(&second));
    }

    #[test]
    fn a_prospect_is_enrolled_in_a_campaign_at_most_once() {
        let mut p = prospect();
        let campaign = CampaignId::new();
        assert!(p.enroll(campaign, OffsetDateTime::UNIX_EPOCH).is_some());
        assert!(p.enroll(campaign, OffsetDateTime::UNIX_EPOCH).is_none());
    }

    #[test]
    fn a_converted_prospect_is_never_enrolled() {
        let mut p = prospect();
        p.set_status(ProspectStatus::Bounced, StatusReason::Rejected, OffsetDateTime::UNIX_EPOCH);
        assert!(p.enroll(CampaignId::new(), OffsetDateTime::UNIX_EPOCH).is_none());
    }

    #[test]
    fn status_names_parse_and_others_do_not() {
        assert_eq!(ProspectStatus::parse("converted"), Ok(ProspectStatus::Converted));
        assert_eq!(ProspectStatus::parse("Converted"), Err(StatusError));
    }
}
