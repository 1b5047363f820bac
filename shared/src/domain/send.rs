//! The send record: what happened to one step of one enrollment. Every step that reached the
//! scheduler's claim ends in one named state, so an operator can answer for each email.
//!
//! ```text
//! claimed ──► sent (provider message id, time)
//!    │   ├──► retry_scheduled ──► claimed (by the retry job) ──► ...
//!    │   ├──► rejected (the recipient refused for good; the prospect is bounced)
//!    │   ├──► unknown (the provider may or may not have taken it: never resent automatically)
//!    │   └──► skipped (reason: the step could not be rendered)
//! ```
//!
//! A claim carries a random [`ClaimOwner`], so a claim write retried after its answer was lost
//! recognises itself, and only the claimant (or, once its lease expired, a redelivery that
//! records `unknown`) may move the record on.

use std::fmt;

use time::OffsetDateTime;

use super::EnrollmentId;

/// Identifies one claim of a send record: random per attempt, never derived from the job, so a
/// redelivered copy of a job can never pass for the worker that claimed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct ClaimOwner(uuid::Uuid);

impl ClaimOwner {
    /// The owner of records written before claims had owners: no claim is ever made by it.
    pub const NIL: Self = Self(uuid::Uuid::nil());

    #[must_use]
    pub fn new() -> Self {
        Self(uuid::Uuid::new_v4())
    }

    /// Parses a stored owner.
    ///
    /// # Errors
    /// When `raw` is not a UUID.
    pub fn parse(raw: &str) -> Result<Self, uuid::Error> {
        uuid::Uuid::parse_str(raw).map(Self)
    }
}

impl Default for ClaimOwner {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for ClaimOwner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Which step of which enrollment a record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SendKey {
    pub enrollment: EnrollmentId,
    pub step: u32,
}

/// Where one step's email stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendState {
    /// A worker took the step at `at` and has not recorded an outcome yet.
    Claimed { owner: ClaimOwner },
    /// The provider accepted the email.
    Sent { message_id: String },
    /// The provider proved it did not take the email (throttled, refused the connection,
    /// answered 4xx); a retry job for `attempt` is due at `retry_at`.
    RetryScheduled { attempt: u32, retry_at: OffsetDateTime, error: String },
    /// The provider refused the recipient for good.
    Rejected { reason: String },
    /// The provider may or may not have taken the email (a timeout after the request was
    /// written, a worker that stopped between claiming and recording): not resent.
    Unknown { reason: String },
    /// The step was not sent, for the reason given.
    Skipped { reason: String },
}

impl SendState {
    /// The state's name, as stored and shown.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Self::Claimed { .. } => "claimed",
            Self::Sent { .. } => "sent",
            Self::RetryScheduled { .. } => "retry_scheduled",
            Self::Rejected { .. } => "rejected",
            Self::Unknown { .. } => "unknown",
            Self::Skipped { .. } => "skipped",
        }
    }

    /// The text the state carries (message id, error or reason), if any.
    #[must_use]
    pub fn detail(&self) -> Option<&str> {
        match self {
            Self::Claimed { .. } => None,
            Self::Sent { message_id } => Some(message_id),
            Self::RetryScheduled { error, .. } => Some(error),
            Self::Rejected { reason } | Self::Unknown { reason } | Self::Skipped { reason } => Some(reason),
        }
    }

    /// Rebuilds a state from its stored parts: name, owner, detail, attempt and retry time.
    ///
    /// # Errors
    /// A message naming what is missing or unknown.
    pub fn from_parts(
        name: &str,
        owner: Option<&str>,
        detail: Option<String>,
        attempt: u32,
        retry_at: Option<OffsetDateTime>,
    ) -> Result<Self, String> {
        let detail = || detail.clone().unwrap_or_default();
        Ok(match name {
            "claimed" => {
                let owner = owner.ok_or("a claimed send record has no owner")?;
                Self::Claimed { owner: ClaimOwner::parse(owner).map_err(|e| format!("invalid owner: {e}"))? }
            }
            "sent" => Self::Sent { message_id: detail() },
            "retry_scheduled" => Self::RetryScheduled {
                attempt,
                retry_at: retry_at.ok_or("a retry_scheduled send record has no retry time")?,
                error: detail(),
            },
            "rejected" => Self::Rejected { reason: detail() },
            "unknown" => Self::Unknown { reason: detail() },
            "skipped" => Self::Skipped { reason: detail() },
            other => return Err(format!("unknown send state {other:?}")),
        })
    }
}

/// One step's send record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendRecord {
    pub key: SendKey,
    pub state: SendState,
    /// The owner of the latest claim (kept after the outcome is recorded).
    pub owner: ClaimOwner,
    /// When the latest claim was made.
    pub claimed_at: OffsetDateTime,
    /// When the state was last changed.
    pub updated_at: OffsetDateTime,
    /// Sending attempts made so far (1 after the first claim).
    pub attempts: u32,
}

/// The names of every send state, in the order a step moves through them.
pub const SEND_STATES: [&str; 6] = ["claimed", "sent", "retry_scheduled", "rejected", "unknown", "skipped"];

/// How many of a campaign's sends are in each state, per step (0-based): what an operator
/// reads to see what went out, what is being retried and which outcomes are unknown.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SendTally {
    steps: std::collections::BTreeMap<u32, [u64; SEND_STATES.len()]>,
}

impl SendTally {
    /// Counts `n` more sends of `step` in the state named `state`.
    ///
    /// # Errors
    /// The name, when it is not one of [`SEND_STATES`] (a record this version cannot read).
    pub fn add(&mut self, step: u32, state: &str, n: u64) -> Result<(), String> {
        let at = SEND_STATES.iter().position(|s| *s == state).ok_or_else(|| format!("unknown send state {state:?}"))?;
        self.steps.entry(step).or_default()[at] += n;
        Ok(())
    }

    /// How many sends of `step` are in the state named `state`.
    #[must_use]
    pub fn count(&self, step: u32, state: &str) -> u64 {
        let at = SEND_STATES.iter().position(|s| *s == state);
        self.steps.get(&step).zip(at).map_or(0, |(counts, at)| counts[at])
    }

    /// Each state's name and count for `step`, in the order of [`SEND_STATES`].
    pub fn of_step(&self, step: u32) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        SEND_STATES.iter().map(move |s| (*s, self.count(step, s)))
    }
}
