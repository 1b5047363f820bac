//! The stored shape of a prospect, shared by both backends: the attributes that keys, indexes
//! and atomic updates need stay top-level; the rest is one JSON document.

use serde_json::{Map, Value};
use time::OffsetDateTime;

use crate::domain::{
    status_history, StatusChange, StepProgress, StoredStatusChange, AccountId, Enrollment, ExternalId, NormalizedEmail, Prospect, ProspectId, ProspectStatus, TextFields,
};
use crate::ports::StoreError;

/// The document part of a stored prospect, as written: borrowed from the prospect.
#[derive(serde::Serialize)]
struct ProspectDoc<'a> {
    email: &'a str,
    fields: &'a TextFields,
    metadata: &'a Map<String, Value>,
    enrollments: &'a [Enrollment],
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
}

/// The document part of a stored prospect, as read back (the same JSON as [`ProspectDoc`]).
#[derive(serde::Deserialize)]
struct StoredDoc {
    email: String,
    #[serde(default)]
    fields: TextFields,
    #[serde(default)]
    metadata: Map<String, Value>,
    #[serde(default)]
    enrollments: Vec<Enrollment>,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
}

/// A prospect as its storage row or item holds it.
pub(crate) struct ProspectRecord {
    pub id: String,
    pub account_id: String,
    pub email_hash: String,
    pub external_id: Option<String>,
    pub status: String,
    pub ended_through: u32,
    pub version: i64,
    pub updated_at: String,
    pub doc: String,
    /// The status changes, oldest first (stored apart from the document: a status change
    /// appends one without rewriting it).
    pub history: Vec<StoredStatusChange>,
    /// Each step's recorded outcome (on DynamoDB kept on the item; on SQLite read from the
    /// send log).
    pub progress: Vec<StepProgress>,
}

fn corrupt(what: &str) -> StoreError {
    StoreError::other(format!("stored prospect has an invalid {what}"))
}

pub(crate) fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

pub(crate) fn parse_rfc3339(s: &str) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).map_err(|_| corrupt("timestamp"))
}

impl ProspectRecord {
    pub fn from_prospect(p: &Prospect, version: u64) -> Self {
        let doc = ProspectDoc {
            email: p.email.original(),
            fields: &p.fields,
            metadata: &p.metadata,
            enrollments: &p.enrollments,
            created_at: p.created_at,
        };
        Self {
            id: p.id.to_string(),
            account_id: p.account_id.to_string(),
            email_hash: p.email.key_hash().to_owned(),
            external_id: p.external_id.as_ref().map(|e| e.as_str().to_owned()),
            status: p.status.as_str().to_owned(),
            ended_through: p.ended_through,
            version: i64::try_from(version).unwrap_or(i64::MAX),
            updated_at: rfc3339(p.updated_at),
            doc: serde_json::to_string(&doc).unwrap_or_default(),
            history: p.history.iter().map(StatusChange::stored).collect(),
            progress: p.progress.clone(),
        }
    }

    /// # Errors
    /// [`StoreError::Other`] when a stored value does not parse.
    pub fn into_prospect(self) -> Result<Prospect, StoreError> {
        let doc: StoredDoc = serde_json::from_str(&self.doc).map_err(|_| corrupt("document"))?;
        Ok(Prospect {
            id: ProspectId::parse(&self.id).map_err(|_| corrupt("id"))?,
            account_id: AccountId::parse(&self.account_id).map_err(|_| corrupt("account id"))?,
            email: NormalizedEmail::from_stored(doc.email),
            fields: doc.fields,
            external_id: self.external_id.as_deref().map(ExternalId::parse).transpose().map_err(|_| corrupt("external id"))?,
            metadata: doc.metadata,
            status: ProspectStatus::parse(&self.status).map_err(|_| corrupt("status"))?,
            enrollments: doc.enrollments,
            ended_through: self.ended_through,
            version: u64::try_from(self.version).map_err(|_| corrupt("version"))?,
            created_at: doc.created_at,
            updated_at: parse_rfc3339(&self.updated_at)?,
            history: status_history(&self.history),
            progress: self.progress,
        })
    }
}

/// The JSON of one stored status change or step outcome, as both backends keep it.
pub(crate) fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// Parses what [`to_json`] wrote.
///
/// # Errors
/// [`StoreError::Other`] when it does not parse.
pub(crate) fn from_json<T: serde::de::DeserializeOwned>(raw: &str, what: &str) -> Result<T, StoreError> {
    serde_json::from_str(raw).map_err(|_| corrupt(what))
}
