//! The campaign job: the one message type shared by the producers (the POST handler) and the
//! consumer (the scheduler). Serialized as JSON on SQS and in the embedded queue.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::{AccountId, CampaignId, ClaimOwner, EnrollmentId, ProspectId};

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
    /// On a retry: the claim whose attempt the provider proved it did not take. The retry may
    /// take over that claim even if recording the retry failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_of: Option<ClaimOwner>,
}

impl CampaignJob {
    /// The job's wire form: the bytes `serde_json` gives for it (a test holds the two equal),
    /// written directly because every job published costs one. Ids and times are written as
    /// they are, since neither can need escaping; so is an `email_hash` with nothing to escape.
    ///
    /// # Panics
    /// Never for a time from a clock: RFC 3339 fails only outside the years 0 to 9999.
    #[must_use]
    pub fn to_json(&self) -> String {
        let mut out = Vec::with_capacity(320);
        out.extend_from_slice(b"{\"account_id\":");
        self.account_id.write_json(&mut out);
        out.extend_from_slice(b",\"prospect_id\":");
        self.prospect_id.write_json(&mut out);
        out.extend_from_slice(b",\"email_hash\":");
        // The bytes JSON escapes (controls, quote, backslash), looked for without a branch per
        // byte: a hash's digits and letters are random, so branching on them mispredicts.
        let needs_escape = self.email_hash.bytes().fold(false, |esc, b| esc | (b < 0x20) | (b == b'"') | (b == b'\\'));
        if !needs_escape {
            out.push(b'"');
            out.extend_from_slice(self.email_hash.as_bytes());
            out.push(b'"');
        } else {
            serde_json::to_writer(&mut out, self.email_hash.as_str()).expect("a string serializes");
        }
        out.extend_from_slice(b",\"enrollment_id\":");
        self.enrollment_id.write_json(&mut out);
        out.extend_from_slice(b",\"campaign_id\":");
        self.campaign_id.write_json(&mut out);
        out.extend_from_slice(b",\"step\":");
        write_number(&mut out, self.step);
        out.extend_from_slice(b",\"published_at\":");
        write_time(&mut out, self.published_at);
        out.extend_from_slice(b",\"attempt\":");
        write_number(&mut out, self.attempt);
        if let Some(not_before) = self.not_before {
            out.extend_from_slice(b",\"not_before\":");
            write_time(&mut out, not_before);
        }
        if let Some(owner) = self.retry_of {
            out.extend_from_slice(b",\"retry_of\":\"");
            out.extend_from_slice(owner.to_string().as_bytes());
            out.push(b'"');
        }
        out.push(b'}');
        String::from_utf8(out).expect("JSON is UTF-8")
    }
}

fn write_number(out: &mut Vec<u8>, n: u32) {
    serde_json::to_writer(out, &n).expect("a number serializes");
}

/// Appends a time as the JSON string `time::serde::rfc3339` gives (RFC 3339 needs no escaping).
fn write_time(out: &mut Vec<u8>, at: OffsetDateTime) {
    out.push(b'"');
    at.format_into(out, &Rfc3339).expect("a clock time formats as RFC 3339");
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use time::Duration;

    use super::*;

    proptest! {
        #[test]
        fn to_json_is_the_serde_form(
            step: u32,
            attempt: u32,
            email_hash in prop_oneof![any::<String>(), "[0-9a-f]{64}"],
            unix_nanos in 0_i128..253_402_300_799_000_000_000,
            not_before_nanos in proptest::option::of(0_i64..i64::MAX),
            retried: bool,
        ) {
            let published_at = OffsetDateTime::from_unix_timestamp_nanos(unix_nanos).unwrap();
            let job = CampaignJob {
                account_id: AccountId::new(),
                prospect_id: ProspectId::new(),
                email_hash,
                enrollment_id: EnrollmentId::new(),
                campaign_id: CampaignId::new(),
                step,
                published_at,
                attempt,
                not_before: not_before_nanos.map(|n| OffsetDateTime::UNIX_EPOCH + Duration::nanoseconds(n)),
                retry_of: retried.then(ClaimOwner::new),
            };
            let json = job.to_json();
            prop_assert_eq!(&json, &serde_json::to_string(&job).unwrap());
            prop_assert_eq!(serde_json::from_str::<CampaignJob>(&json).unwrap(), job);
        }
    }
}
