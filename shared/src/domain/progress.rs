//! Where each enrollment of a prospect stands: derived from what the store keeps with the
//! prospect (its status history and each step's recorded outcome) and the campaign.

use time::OffsetDateTime;

use super::{Campaign, CampaignId, CampaignState, Enrollment, EnrollmentId, Prospect, ProspectStatus};

/// An enrollment's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnrollmentState {
    /// Steps are still to be sent (or the campaign is paused).
    Active,
    /// Every step has an outcome.
    Completed,
    /// A status change, a refused address or the campaign's deactivation ended it early.
    Ended,
}

impl EnrollmentState {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Completed => "completed",
            Self::Ended => "ended",
        }
    }
}

/// What ended an enrollment early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndedReason {
    /// The prospect's status changed to this one.
    Status(ProspectStatus),
    /// The provider refused the address (the prospect is bounced in the same breath).
    Rejected,
    /// The campaign was deactivated.
    CampaignDeactivated,
    /// The campaign no longer exists.
    CampaignMissing,
}

impl EndedReason {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Status(status) => status.as_str(),
            Self::Rejected => "rejected",
            Self::CampaignDeactivated => "campaign_deactivated",
            Self::CampaignMissing => "campaign_missing",
        }
    }
}

/// One enrollment as a reader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrollmentView {
    pub id: EnrollmentId,
    pub campaign_id: CampaignId,
    pub state: EnrollmentState,
    pub enrolled_at: OffsetDateTime,
    /// Steps the provider accepted.
    pub steps_sent: u32,
    /// The next step to send (0-based), while active and not paused.
    pub next_step: Option<u32>,
    /// When it is due (a retry's time for a step being retried); `None` while paused.
    pub next_send_at: Option<OffsetDateTime>,
    pub ended_at: Option<OffsetDateTime>,
    pub ended_reason: Option<EndedReason>,
}

/// Whether a step with this recorded state is over (never sent again).
fn is_over(state: &str) -> bool {
    matches!(state, "sent" | "unknown" | "skipped" | "rejected")
}

/// Where `enrollment` of `prospect` stands, with its campaign as now stored (`None`: gone).
#[must_use]
pub fn enrollment_view(prospect: &Prospect, enrollment: &Enrollment, campaign: Option<&Campaign>) -> EnrollmentView {
    let outcomes: Vec<_> = prospect.progress.iter().filter(|p| p.enrollment == enrollment.id).collect();
    let outcome = |step: u32| outcomes.iter().find(|p| p.step == step);
    let steps_sent = u32::try_from(outcomes.iter().filter(|p| p.state == "sent").count()).unwrap_or(u32::MAX);
    let mut view = EnrollmentView {
        id: enrollment.id,
        campaign_id: enrollment.campaign_id,
        state: EnrollmentState::Active,
        enrolled_at: enrollment.enrolled_at,
        steps_sent,
        next_step: None,
        next_send_at: None,
        ended_at: None,
        ended_reason: None,
    };
    let Some(campaign) = campaign else {
        view.state = EnrollmentState::Ended;
        view.ended_reason = Some(EndedReason::CampaignMissing);
        return view;
    };
    let steps = u32::try_from(campaign.steps.len()).unwrap_or(u32::MAX);
    if let Some(rejected) = outcomes.iter().find(|p| p.state == "rejected") {
        view.state = EnrollmentState::Ended;
        view.ended_at = Some(rejected.at);
        view.ended_reason = Some(EndedReason::Rejected);
        return view;
    }
    let Some(next) = (0..steps).find(|s| !outcome(*s).is_some_and(|p| is_over(&p.state))) else {
        view.state = EnrollmentState::Completed;
        return view;
    };
    if enrollment.seq <= prospect.ended_through {
        // The first change that ended campaigns after the enrollment was made ended it.
        let change = prospect.history.iter().find(|c| c.to.ends_campaigns() && c.at >= enrollment.enrolled_at);
        let change = change.or_else(|| prospect.history.iter().rev().find(|c| c.to.ends_campaigns()));
        view.state = EnrollmentState::Ended;
        view.ended_at = change.map(|c| c.at);
        view.ended_reason = Some(EndedReason::Status(change.map_or(prospect.status, |c| c.to)));
        return view;
    }
    match campaign.state() {
        CampaignState::Inactive => {
            view.state = EnrollmentState::Ended;
            view.ended_at = campaign.deactivated_at;
            view.ended_reason = Some(EndedReason::CampaignDeactivated);
        }
        CampaignState::Paused => view.next_step = Some(next),
        CampaignState::Active => {
            view.next_step = Some(next);
            view.next_send_at = match outcome(next) {
                Some(p) if p.state == "retry_scheduled" => p.retry_at,
                _ => campaign.due_with_pauses(enrollment.enrolled_at, next),
            };
        }
    }
    view
}
