//! The campaign scheduler: turns campaign jobs into emails, each step at most once, on time,
//! never after the prospect left the campaign or the campaign was paused, and every step that
//! reached a claim left in a named state (see [`crate::domain::SendState`]).
//!
//! Delays: a job is published when its step becomes due; a queue that cannot hold it that long
//! (SQS: 15 minutes) hands it over early and the scheduler re-queues it unread until it is due,
//! so a delay of days costs one small message every 15 minutes. The embedded queue holds a job
//! until its due time exactly.
//!
//! At most once: before sending, the scheduler claims (enrollment, step) with one atomic write
//! that is conditional on the prospect still being `new` with this enrollment active and on the
//! campaign's sending version (pause, resume and deactivation bump it). The claim carries a
//! random owner; only that owner records the outcome. What a redelivered or duplicate job
//! finds decides what it does, never a guess:
//!
//! - `sent`, `unknown`, `skipped`: the step is over. Within [`CLAIM_LEASE`] of that outcome,
//!   the job is a duplicate delivered alongside the claimant, which queued the next step: it
//!   does nothing. Later, it is a redelivery after the claimant failed to queue the next step
//!   (the queue redelivers only after longer than the lease): it queues it (a duplicate
//!   next-step job finds that step's record in turn).
//! - `rejected`: it makes sure the prospect is bounced.
//! - `retry_scheduled`: the retry job takes it; the job whose attempt failed re-publishes that
//!   retry, in case publishing it was what failed.
//! - `claimed` within [`CLAIM_LEASE`]: another worker is sending; nothing to do.
//! - `claimed` past the lease: the claimant stopped before recording what the provider said.
//!   The email may have gone out, so it records `unknown` (never resends) and moves on.
//!
//! A provider answer that proves the email was not taken schedules a retry with backoff; an
//! answer that does not prove it (a timeout after the request was written) is `unknown`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use time::{Duration, OffsetDateTime};
use tracing::{info, instrument, warn};

use crate::domain::{
    EmailReference,
    Campaign, CampaignId, CampaignJob, CampaignState, ClaimOwner, Clock, Enrollment, Prospect, ProspectStatus, SendKey,
    SendRecord, SendState, StatusReason, UnsubscribeSecret,
};
use crate::ports::{
    AdminStore, ClaimRequest, ClaimResult, JobQueue, MailError, Mailer, OutgoingEmail, ProspectKey, ProspectRef, ProspectRepository,
    SendClaim, SendLog, StoreError,
};
use crate::service::{ProspectService, ServiceError};

/// How long a job may arrive before its enrollment is visible (the job is published just
/// before the enrollment is written) before it is taken for an orphan and dropped.
pub const ORPHAN_GRACE: Duration = Duration::minutes(5);
/// How long a claimant may take between its claim and recording the outcome. Longer than a
/// worker holds a job (the scheduler function's timeout is 30 s, a send's own timeout 10 s), and
/// shorter than the queue takes to deliver a job again after its handling failed (the SQS
/// visibility timeout, 180 s; the embedded queue's lease, 2 minutes).
pub const CLAIM_LEASE: Duration = Duration::minutes(1);
/// Attempts at sending one step whose provider proved each time it did not take the email.
pub const MAX_SEND_ATTEMPTS: u32 = 8;
/// The backoff after the first failed attempt; it doubles with every further one.
pub const FIRST_BACKOFF: Duration = Duration::seconds(60);
/// How often a job of a paused campaign looks again (SQS cannot hold a job longer).
pub const PAUSED_RECHECK: Duration = Duration::minutes(15);

/// What handling a job did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The step's email was sent.
    Sent,
    /// Not due yet (or its campaign is paused): re-queued for then.
    NotDue(OffsetDateTime),
    /// The provider proved it did not take the email: a retry is queued for then.
    Retrying(OffsetDateTime),
    /// The provider may or may not have taken the email: recorded, not resent.
    Unknown,
    /// The step was not sent, and is recorded as skipped.
    Skipped,
    /// Nothing to do, and nothing left to do for this job.
    Dropped(&'static str),
}

/// A job that could not be handled; the queue keeps it and, past its retries, dead-letters it.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("storage or queue failure")]
    Store(#[from] StoreError),
    #[error("the status change failed")]
    Status(#[source] ServiceError),
    #[error("malformed job: {0}")]
    Malformed(String),
}

/// Where emails come from and where their unsubscribe links point.
#[derive(Debug, Clone)]
pub struct DeliverySettings {
    /// `From:` address, e.g. `Acme <hello@acme.example>`.
    pub sender: String,
    /// Public base URL of the API: links are `{public_url}/unsubscribe/{token}`.
    pub public_url: String,
    pub unsubscribe_secret: UnsubscribeSecret,
}

impl DeliverySettings {
    /// The one-click unsubscribe URL of a prospect.
    #[must_use]
    pub fn unsubscribe_url(&self, prospect: &Prospect) -> String {
        let token = self.unsubscribe_secret.sign(prospect.account_id, prospect.id);
        format!("{}/unsubscribe/{token}", self.public_url.trim_end_matches('/'))
    }
}

/// The ports the scheduler works through, and the service every status change goes through.
#[derive(Clone)]
pub struct SchedulerPorts {
    pub repo: Arc<dyn ProspectRepository>,
    pub campaigns: Arc<dyn AdminStore>,
    pub sends: Arc<dyn SendLog>,
    pub queue: Arc<dyn JobQueue>,
    pub mailer: Arc<dyn Mailer>,
    pub clock: Arc<dyn Clock>,
    pub statuses: ProspectService,
}

/// Handles campaign jobs.
pub struct Scheduler {
    ports: SchedulerPorts,
    settings: DeliverySettings,
    /// Campaigns as last read. Steps never change; the sending state may, which every claim
    /// checks against the store (a stale entry fails its claim and is read again).
    campaigns: Mutex<HashMap<CampaignId, Arc<Campaign>>>,
}

/// What handling one job decided: its outcome, and which job (if any) goes on the queue after
/// it (the same job re-queued, its retry, or the next step), so a batch can publish them
/// together.
#[derive(Debug)]
pub struct Handled {
    pub outcome: Outcome,
    /// The job to put on the queue, and when it becomes visible.
    pub publish: Option<(CampaignJob, OffsetDateTime)>,
}

impl Handled {
    fn done(outcome: Outcome) -> Self {
        Self { outcome, publish: None }
    }

    fn requeue(job: &CampaignJob, at: OffsetDateTime) -> Self {
        Self { outcome: Outcome::NotDue(at), publish: Some((job.clone(), at)) }
    }
}

/// What a job works on once its prospect, enrollment and campaign are read.
struct Context<'a> {
    job: &'a CampaignJob,
    prospect: &'a Prospect,
    enrollment: &'a Enrollment,
    campaign: Arc<Campaign>,
    now: OffsetDateTime,
}

impl Context<'_> {
    fn key(&self) -> SendKey {
        SendKey { enrollment: self.enrollment.id, step: self.job.step }
    }

    /// Where the job's prospect is stored.
    fn prospect_key(&self) -> ProspectKey {
        ProspectKey { account: self.job.account_id, prospect: self.job.prospect_id, email_hash: self.job.email_hash.clone() }
    }

    /// The next step's job, due when that step is; none after the last step.
    fn next_step(&self) -> Option<(CampaignJob, OffsetDateTime)> {
        if self.campaign.is_last_step(self.job.step) {
            info!("enrollment completed its campaign");
            return None;
        }
        let step = self.job.step + 1;
        let due = self.campaign.due_with_pauses(self.enrollment.enrolled_at, step).unwrap_or(self.now);
        Some((CampaignJob { step, attempt: 0, not_before: Some(due), retry_of: None, ..self.job.clone() }, due))
    }

    /// The step is over: make sure the next one is queued.
    fn advance(&self, outcome: Outcome) -> Handled {
        Handled { outcome, publish: self.next_step() }
    }
}

impl Scheduler {
    #[must_use]
    pub fn new(ports: SchedulerPorts, settings: DeliverySettings) -> Self {
        Self { ports, settings, campaigns: Mutex::new(HashMap::new()) }
    }

    /// The queue the scheduler publishes follow-up jobs to.
    #[must_use]
    pub fn queue(&self) -> &Arc<dyn JobQueue> {
        &self.ports.queue
    }

    /// The scheduler's clock.
    #[must_use]
    pub fn now(&self) -> OffsetDateTime {
        self.ports.clock.now()
    }

    /// Parses and handles one queue message, then publishes its follow-up job.
    ///
    /// # Errors
    /// [`JobError::Malformed`] for a body that is not a campaign job; see [`Self::process`].
    pub async fn process_message(&self, body: &str) -> Result<Outcome, JobError> {
        self.process(&parse_job(body)?).await
    }

    /// Handles one job and publishes its follow-up job.
    ///
    /// # Errors
    /// [`JobError::Store`] when storage or the queue failed (the job should be retried);
    /// [`JobError::Status`] when the bounce of a rejected address could not be written.
    pub async fn process(&self, job: &CampaignJob) -> Result<Outcome, JobError> {
        let handled = self.handle(job).await?;
        if let Some((next, visible_at)) = &handled.publish {
            self.ports.queue.publish(next, *visible_at).await?;
        }
        Ok(handled.outcome)
    }

    /// A campaign: from the cache unless `fresh`, or while the cached copy is paused (a
    /// resume must be seen without a failed claim to tell).
    async fn campaign(&self, id: CampaignId, fresh: bool) -> Result<Option<Arc<Campaign>>, StoreError> {
        if !fresh {
            let cached = self.campaigns.lock().ok().and_then(|m| m.get(&id).cloned());
            if let Some(c) = cached.filter(|c| c.state() == CampaignState::Active) {
                return Ok(Some(c));
            }
        }
        let Some(campaign) = self.ports.campaigns.get_campaign(id).await? else { return Ok(None) };
        let campaign = Arc::new(campaign);
        if let Ok(mut cache) = self.campaigns.lock() {
            cache.insert(id, Arc::clone(&campaign));
        }
        Ok(Some(campaign))
    }

    /// Handles one job without publishing: says which job, if any, goes on the queue after
    /// it (the queue's driver publishes them, a batch at a time where it can).
    ///
    /// # Errors
    /// As [`Self::process`].
    #[instrument(skip_all, fields(account_id = %job.account_id, prospect_id = %job.prospect_id, enrollment_id = %job.enrollment_id, step = job.step))]
    pub async fn handle(&self, job: &CampaignJob) -> Result<Handled, JobError> {
        let now = self.ports.clock.now();
        // A job that knows it is early (the next step, or a retry after backoff) goes back on
        // the queue without reading anything.
        if let Some(not_before) = job.not_before.filter(|t| *t > now) {
            return Ok(Handled::requeue(job, not_before));
        }
        let prospect = self.ports.repo.find(job.account_id, &ProspectRef::EmailHash(job.email_hash.clone())).await?;
        let found = prospect.as_ref().and_then(|p| {
            p.enrollments.iter().find(|e| e.id == job.enrollment_id && p.id == job.prospect_id).map(|e| (p, e))
        });
        let Some((prospect, enrollment)) = found else {
            if now - job.published_at < ORPHAN_GRACE {
                return Ok(Handled::requeue(job, now + FIRST_BACKOFF));
            }
            return Ok(Handled::done(Outcome::Dropped("no such enrollment")));
        };
        if !prospect.is_active(enrollment) {
            return Ok(Handled::done(Outcome::Dropped("enrollment ended")));
        }
        let mut fresh = false;
        loop {
            let Some(campaign) = self.campaign(job.campaign_id, fresh).await? else {
                return Ok(Handled::done(Outcome::Dropped("no such campaign")));
            };
            let cx = Context { job, prospect, enrollment, campaign, now };
            match self.claim(&cx).await? {
                Ok(owner) => return self.send(&cx, owner).await,
                Err(Some(handled)) => return Ok(handled),
                // The campaign changed since it was read: read it again, once.
                Err(None) if !fresh => fresh = true,
                Err(None) => return Ok(Handled::requeue(job, now + FIRST_BACKOFF)),
            }
        }
    }

    /// Claims the job's step if it is due and wanted. `Ok(owner)` to send; `Err(Some(_))` when
    /// the job is handled without sending; `Err(None)` when the campaign changed since read.
    async fn claim(&self, cx: &Context<'_>) -> Result<Result<ClaimOwner, Option<Handled>>, JobError> {
        let (job, campaign) = (cx.job, &cx.campaign);
        match campaign.state() {
            CampaignState::Inactive => return Ok(Err(Some(Handled::done(Outcome::Dropped("campaign deactivated"))))),
            CampaignState::Paused => return Ok(Err(Some(Handled::requeue(job, cx.now + PAUSED_RECHECK)))),
            CampaignState::Active => {}
        }
        if usize::try_from(job.step).ok().and_then(|i| campaign.steps.get(i)).is_none() {
            return Ok(Err(Some(Handled::done(Outcome::Dropped("no such step")))));
        }
        let step_due = campaign.due_with_pauses(cx.enrollment.enrolled_at, job.step).unwrap_or(cx.now);
        let due = job.not_before.map_or(step_due, |t| t.max(step_due));
        if due > cx.now {
            return Ok(Err(Some(Handled::requeue(job, due))));
        }
        let owner = ClaimOwner::new();
        let request = ClaimRequest {
            key: cx.key(),
            account: job.account_id,
            prospect: job.prospect_id,
            email_hash: job.email_hash.clone(),
            enrollment_seq: cx.enrollment.seq,
            campaign: job.campaign_id,
            campaign_version: campaign.sending_version,
            owner,
            attempt: job.attempt,
            retry_of: job.retry_of,
            now: cx.now,
        };
        Ok(match self.ports.sends.claim_send(&request).await? {
            ClaimResult::Won => Ok(owner),
            ClaimResult::ProspectChanged => Err(Some(Handled::done(Outcome::Dropped("enrollment ended")))),
            ClaimResult::CampaignChanged => Err(None),
            ClaimResult::Taken(record) => Err(Some(self.resume(cx, record).await?)),
        })
    }

    /// What a job does with a step someone else claimed or finished: see the module docs.
    async fn resume(&self, cx: &Context<'_>, record: SendRecord) -> Result<Handled, JobError> {
        match &record.state {
            // Its claimant published the next step a moment ago: a duplicate delivered alongside
            // does nothing. Later, a delivery is one whose publish failed: it ensures the next.
            SendState::Sent { .. } | SendState::Unknown { .. } | SendState::Skipped { .. } if cx.now - record.updated_at < CLAIM_LEASE => {
                Ok(Handled::done(Outcome::Dropped("step already handled")))
            }
            SendState::Sent { .. } | SendState::Unknown { .. } | SendState::Skipped { .. } => {
                Ok(cx.advance(Outcome::Dropped("step already handled; next step ensured")))
            }
            SendState::Rejected { .. } => {
                self.bounce(cx).await?;
                Ok(Handled::done(Outcome::Dropped("recipient rejected")))
            }
            SendState::RetryScheduled { attempt, retry_at, .. } if cx.job.attempt + 1 == *attempt => {
                // This job's attempt failed and its retry was recorded; publishing the retry
                // may be what failed, so it is published again (a duplicate finds the claim).
                let retry = CampaignJob { attempt: *attempt, not_before: Some(*retry_at), retry_of: None, ..cx.job.clone() };
                Ok(Handled { outcome: Outcome::Retrying(*retry_at), publish: Some((retry, *retry_at)) })
            }
            SendState::RetryScheduled { .. } => Ok(Handled::done(Outcome::Dropped("a retry of this step is scheduled"))),
            SendState::Claimed { .. } if cx.now - record.claimed_at < CLAIM_LEASE => {
                Ok(Handled::done(Outcome::Dropped("another worker holds the step")))
            }
            SendState::Claimed { owner } => {
                let reason = "the worker that claimed the step stopped before recording what the provider answered".to_owned();
                let unknown = SendState::Unknown { reason };
                if self.ports.sends.record_send(&cx.prospect_key(), cx.key(), *owner, &unknown, None, cx.now).await? {
                    warn!("claim found past its lease: recorded the step as unknown, not resending it");
                    return Ok(cx.advance(Outcome::Unknown));
                }
                // The claimant recorded its outcome meanwhile: act on that.
                let record = self.ports.sends.send_record(cx.key()).await?.ok_or_else(|| StoreError::other("a send record vanished"))?;
                if matches!(record.state, SendState::Claimed { .. }) {
                    return Ok(Handled::done(Outcome::Dropped("another worker holds the step")));
                }
                Box::pin(self.resume(cx, record)).await
            }
        }
    }

    /// Renders and sends the claimed step, and records what the provider answered.
    async fn send(&self, cx: &Context<'_>, owner: ClaimOwner) -> Result<Handled, JobError> {
        let (job, prospect, key, now) = (cx.job, cx.prospect, cx.key(), cx.now);
        let at = cx.prospect_key();
        let record = |state: SendState, subject: Option<&str>| {
            let (at, subject) = (&at, subject.map(str::to_owned));
            async move { self.ports.sends.record_send(at, key, owner, &state, subject.as_deref(), now).await }
        };
        let step = usize::try_from(job.step).ok().and_then(|i| cx.campaign.steps.get(i)).ok_or_else(|| StoreError::other("step vanished"))?;
        let unsubscribe_url = self.settings.unsubscribe_url(prospect);
        let rendered = match step.render(prospect, &unsubscribe_url) {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "step cannot be rendered: recorded as skipped");
                record(SendState::Skipped { reason: e.to_string() }, None).await?;
                return Ok(cx.advance(Outcome::Skipped));
            }
        };
        let email = OutgoingEmail {
            to: prospect.email.original().to_owned(),
            from: self.settings.sender.clone(),
            subject: rendered.subject,
            text_body: rendered.text_body,
            html_body: rendered.html_body,
            unsubscribe_url,
        };
        let reference = EmailReference { account: cx.job.account_id, prospect: cx.job.prospect_id, send: key };
        match self.ports.mailer.send(&email, &SendClaim { reference, owner, now }).await {
            Ok(delivered) => {
                info!("campaign email sent");
                if !delivered.recorded && !record(SendState::Sent { message_id: delivered.message_id }, Some(&email.subject)).await? {
                    warn!("the email was sent after its claim was taken over; the record keeps the takeover's state");
                }
                Ok(cx.advance(Outcome::Sent))
            }
            Err(MailError::NotAccepted(e)) => {
                let e = without_address(&e.to_string(), &email.to);
                let attempt = job.attempt + 1;
                if attempt >= MAX_SEND_ATTEMPTS {
                    warn!(error = %e, attempt, "the provider refused every attempt: the step is skipped");
                    let reason = format!("the provider did not take the email in {attempt} attempts: {e}");
                    record(SendState::Skipped { reason }, Some(&email.subject)).await?;
                    return Ok(cx.advance(Outcome::Skipped));
                }
                let retry_at = now + FIRST_BACKOFF * 2_i32.pow(job.attempt.min(10));
                warn!(error = %e, attempt, "the provider did not take the email; retrying with backoff");
                let retrying = SendState::RetryScheduled { attempt, retry_at, error: e };
                if let Err(e) = record(retrying, Some(&email.subject)).await {
                    // The retry job names this claim, so it may take it over all the same.
                    warn!(error = %e, "recording the retry failed; the retry job carries the claim");
                }
                let retry = CampaignJob { attempt, not_before: Some(retry_at), retry_of: Some(owner), ..job.clone() };
                Ok(Handled { outcome: Outcome::Retrying(retry_at), publish: Some((retry, retry_at)) })
            }
            Err(MailError::Unknown(e)) => {
                let reason = without_address(&e.to_string(), &email.to);
                warn!(error = %reason, "the provider's answer is unknown: recorded, not resending");
                record(SendState::Unknown { reason }, Some(&email.subject)).await?;
                Ok(cx.advance(Outcome::Unknown))
            }
            Err(MailError::Rejected(reason)) => {
                let reason = without_address(&reason, &email.to);
                warn!(reason = %reason, "recipient rejected: marking the prospect bounced");
                record(SendState::Rejected { reason }, Some(&email.subject)).await?;
                self.bounce(cx).await?;
                Ok(Handled::done(Outcome::Dropped("recipient rejected")))
            }
        }
    }

    /// Marks the prospect bounced through the service, as every status change goes.
    async fn bounce(&self, cx: &Context<'_>) -> Result<(), JobError> {
        let by = ProspectRef::Id(cx.prospect.id);
        match self.ports.statuses.set_status(cx.job.account_id, &by, ProspectStatus::Bounced, StatusReason::Rejected).await {
            Ok(_) | Err(ServiceError::NotFound) => Ok(()),
            Err(e) => Err(JobError::Status(e)),
        }
    }
}

/// A provider's answer with the recipient's address taken out (answers often quote it): what
/// is logged and kept in the send log, which must name no address.
fn without_address(text: &str, address: &str) -> String {
    let (lower, address) = (text.to_lowercase(), address.trim().to_lowercase());
    if address.is_empty() || lower.len() != text.len() {
        return if lower.contains(&address) && !address.is_empty() { "(the provider's answer named the recipient)".to_owned() } else { text.to_owned() };
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = 0;
    for (at, _) in lower.match_indices(&address) {
        out.push_str(&text[rest..at]);
        out.push_str("<recipient>");
        rest = at + address.len();
    }
    out.push_str(&text[rest..]);
    out
}

/// Parses a queue message into a campaign job.
///
/// # Errors
/// [`JobError::Malformed`] for a body that is not one.
pub fn parse_job(body: &str) -> Result<CampaignJob, JobError> {
    serde_json::from_str(body).map_err(|e| JobError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::without_address;

    #[test]
    fn a_provider_answer_keeps_no_address() {
        let answer = "550 5.1.1 <Ada@Example.com>: Recipient address rejected; ada@example.com unknown";
        assert_eq!(without_address(answer, "ada@example.COM"), "550 5.1.1 <<recipient>>: Recipient address rejected; <recipient> unknown");
        assert_eq!(without_address("timed out", "ada@example.com"), "timed out");
        assert_eq!(without_address("\u{130} ada@example.com", "ada@example.com"), "(the provider's answer named the recipient)");
    }
}
