//! The campaign job: the one message type shared by the producers (the POST handler) and the
//! consumer (the scheduler). Serialized as JSON on SQS and in the embedded queue.

use time::OffsetDateTime;

use super::{AccountId, CampaignId, EnrollmentId, ProspectId};

/// "Send step `step` of enrollment `enrollment_id` when it is due."
///
/// The job is published *before* the enrollment is written. A job whose enrollment never
/// appears (the write failed, or a concurrent request won the race) is dropped by the scheduler
/// once it is older than its grace period, so a publish is never lost and never doubled.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CampaignJob {
    pub account_id: AccountId,
    pub prospect_id: ProspectId,
    /// Hash of the normalized email: with `account_id`, the prospect's storage key.
    pub email_hash: String,
    pub enrollment_id: EnrollmentId,
    pub campaign_id: CampaignId,
    /// Zero-based index of the step to send. Its due time is the enrollment time plus the
    /// delays of steps `0..=step`, computed by the scheduler from the campaign.
    pub step: u32,
    /// When the enrollment's first job was published: the scheduler's clock for the grace
    /// period in which a job may arrive before its enrollment is visible.
    #[serde(with = "time::serde::rfc3339")]
    pub published_at: OffsetDateTime,
    /// How many times sending this step failed transiently so far.
    #[serde(default)]
    pub attempt: u32,
    /// Not to be handled before this: the step's due time (set when the previous step queues
    /// it) or the end of a retry's backoff. An earlier delivery is re-queued unread.
    #[serde(default, with = "time::serde::rfc3339::option", skip_serializing_if = "Option::is_none")]
    pub not_before: Option<OffsetDateTime>,
}

impl CampaignJob {
    /// The job's wire form.
    ///
    /// # Panics
    /// Never: every field serializes infallibly.
    #[must_use]
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("CampaignJob always serializes")
    }
}
