//! Listing an account's prospects: newest first, in pages, by a position that no insert or
//! update moves (creation time, then id), so a walk through every page sees each prospect
//! that existed when it began exactly once.

use time::OffsetDateTime;

use super::{AccountId, CampaignId, ProspectId, ProspectStatus};

/// Most prospects a page holds, and how many it holds when the client does not say.
pub const MAX_PAGE: u32 = 100;
pub const DEFAULT_PAGE: u32 = 25;

/// Where a prospect sits in its account's listing: its creation time (milliseconds since the
/// Unix epoch), then its id. Written as text that sorts the same way (what the DynamoDB index
/// keys and the cursor hold).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ListPosition {
    pub created_ms: i64,
    pub id: ProspectId,
}

impl ListPosition {
    /// The position of a prospect created at `created_at` with id `id`.
    #[must_use]
    pub fn of(created_at: OffsetDateTime, id: ProspectId) -> Self {
        Self { created_ms: millis(created_at), id }
    }

    /// `{ms, 15 digits}#{id}`: sorts as the position does.
    #[must_use]
    pub fn key(&self) -> String {
        format!("{:015}#{}", self.created_ms.max(0), self.id)
    }

    /// Parses what [`Self::key`] wrote.
    #[must_use]
    pub fn parse_key(raw: &str) -> Option<Self> {
        let (ms, id) = raw.split_once('#')?;
        if ms.len() != 15 || !ms.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(Self { created_ms: ms.parse().ok()?, id: ProspectId::parse(id).ok()? })
    }
}

/// Milliseconds since the Unix epoch.
#[must_use]
pub fn millis(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// One page request of an account's prospects (the email filter is a lookup, not a listing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    pub account: AccountId,
    /// 1 to [`MAX_PAGE`].
    pub limit: u32,
    /// Only prospects older than this position (the previous page's last).
    pub before: Option<ListPosition>,
    pub status: Option<ProspectStatus>,
    /// Only prospects ever enrolled in this campaign.
    pub campaign: Option<CampaignId>,
    pub created_after: Option<OffsetDateTime>,
    pub updated_after: Option<OffsetDateTime>,
}

impl ListQuery {
    /// Whether a prospect passes the filters other than the position and creation time
    /// (which the stores' indexes serve).
    #[must_use]
    pub fn admits(&self, p: &super::Prospect) -> bool {
        self.status.is_none_or(|s| p.status == s)
            && self.campaign.is_none_or(|c| p.enrollments.iter().any(|e| e.campaign_id == c))
            && self.updated_after.is_none_or(|t| p.updated_at > t)
            && self.created_after.is_none_or(|t| p.created_at > t)
    }
}
