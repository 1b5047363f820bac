//! The prospect resource: the one representation every read of a prospect returns (GET, the
//! CLI's `prospects show`), converted from the domain at the edge.

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};
use serde_json::{Map, Value};
use time::OffsetDateTime;

use crate::domain::{EnrollmentView, StatusReason, TextFields, TEXT_FIELDS};
use crate::service::ProspectView;

/// RFC 3339 in UTC, as every time in the API is written.
fn utc(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC).format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// A prospect as the API returns it.
#[derive(Debug, Serialize)]
pub struct ProspectResource<'a> {
    pub id: String,
    pub email: &'a str,
    pub status: &'static str,
    pub status_changed_at: String,
    pub status_reason: &'static str,
    /// Every text field, `null` when unset.
    #[serde(flatten)]
    pub fields: EveryTextField<'a>,
    pub external_id: Option<&'a str>,
    pub metadata: &'a Map<String, Value>,
    pub created_at: String,
    pub updated_at: String,
    pub enrollments: Vec<EnrollmentResource>,
}

/// Every one of [`TEXT_FIELDS`] with its value, `null` when unset, written from the prospect's
/// own fields (nothing copied).
#[derive(Debug)]
pub struct EveryTextField<'a>(pub &'a TextFields);

impl Serialize for EveryTextField<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(TEXT_FIELDS.len()))?;
        for (name, value) in self.0.each() {
            map.serialize_entry(name, &value)?;
        }
        map.end()
    }
}

/// One enrollment of a prospect as the API returns it; steps are numbered from 1.
#[derive(Debug, Serialize)]
pub struct EnrollmentResource {
    pub id: String,
    pub campaign_id: String,
    pub state: &'static str,
    pub enrolled_at: String,
    pub steps_sent: u32,
    pub next_step: Option<u32>,
    pub next_send_at: Option<String>,
    pub ended_at: Option<String>,
    pub ended_reason: Option<&'static str>,
}

impl From<&EnrollmentView> for EnrollmentResource {
    fn from(e: &EnrollmentView) -> Self {
        Self {
            id: e.id.to_string(),
            campaign_id: e.campaign_id.to_string(),
            state: e.state.as_str(),
            enrolled_at: utc(e.enrolled_at),
            steps_sent: e.steps_sent,
            next_step: e.next_step.map(|s| s + 1),
            next_send_at: e.next_send_at.map(utc),
            ended_at: e.ended_at.map(utc),
            ended_reason: e.ended_reason.map(|r| r.as_str()),
        }
    }
}

impl<'a> From<&'a ProspectView> for ProspectResource<'a> {
    fn from(view: &'a ProspectView) -> Self {
        let p = &view.prospect;
        let last = p.history.last();
        Self {
            id: p.id.to_string(),
            email: p.email.original(),
            status: p.status.as_str(),
            // Never changed: the status is the one it was created with.
            status_changed_at: utc(last.map_or(p.created_at, |c| c.at)),
            status_reason: last.map_or(StatusReason::Api, |c| c.reason).as_str(),
            fields: EveryTextField(&p.fields),
            external_id: p.external_id.as_ref().map(|e| e.as_str()),
            metadata: &p.metadata,
            created_at: utc(p.created_at),
            updated_at: utc(p.updated_at),
            enrollments: view.enrollments.iter().map(EnrollmentResource::from).collect(),
        }
    }
}

/// Everything held about a person (a GDPR access request): the resource, each email sent to
/// them and each change of their status.
#[derive(Debug, Serialize)]
pub struct ProspectExport<'a> {
    pub prospect: ProspectResource<'a>,
    pub emails: Vec<EmailSent<'a>>,
    pub status_changes: Vec<StatusChangeResource>,
}

/// One campaign email whose sending was recorded: `sent` (the provider took it) or `unknown`
/// (it may have).
#[derive(Debug, Serialize)]
pub struct EmailSent<'a> {
    pub campaign_id: String,
    pub enrollment_id: String,
    pub step: u32,
    pub state: &'a str,
    pub subject: Option<&'a str>,
    pub sent_at: String,
    pub message_id: Option<&'a str>,
}

/// One change of a prospect's status.
#[derive(Debug, Serialize)]
pub struct StatusChangeResource {
    pub from: &'static str,
    pub to: &'static str,
    pub at: String,
    pub reason: &'static str,
}

impl<'a> From<&'a ProspectView> for ProspectExport<'a> {
    fn from(view: &'a ProspectView) -> Self {
        let p = &view.prospect;
        let mut sent: Vec<_> = p.progress.iter().filter(|s| matches!(s.state.as_str(), "sent" | "unknown")).collect();
        sent.sort_by_key(|s| (s.at, s.step));
        let emails = sent
            .into_iter()
            .map(|s| EmailSent {
                campaign_id: p.enrollments.iter().find(|e| e.id == s.enrollment).map(|e| e.campaign_id.to_string()).unwrap_or_default(),
                enrollment_id: s.enrollment.to_string(),
                step: s.step + 1,
                state: &s.state,
                subject: s.subject.as_deref(),
                sent_at: utc(s.at),
                message_id: s.message_id.as_deref(),
            })
            .collect();
        let status_changes = p
            .history
            .iter()
            .map(|c| StatusChangeResource { from: c.from.as_str(), to: c.to.as_str(), at: utc(c.at), reason: c.reason.as_str() })
            .collect();
        Self { prospect: ProspectResource::from(view), emails, status_changes }
    }
}
