//! The campaign scheduler: turns campaign jobs into emails, each step once, on time, and
//! never after the prospect left the campaign.
//!
//! Delays: a job is published when its step becomes due; a queue that cannot hold it that long
//! (SQS: 15 minutes) hands it over early and the scheduler re-queues it until it is due, so
//! delays of days cost one small message every 15 minutes. The embedded queue holds a job
//! until its due time exactly.
//!
//! Exactly once: before sending, the scheduler claims (enrollment, step) with one conditional
//! write. A redelivered or concurrent job finds the claim and sends nothing. Only the claim's
//! winner publishes the next step, unless the claim is older than [`CLAIM_LEASE`] (its worker
//! died between claiming and publishing), in which case the next step is published without
//! sending again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use time::{Duration, OffsetDateTime};
use tracing::{info, instrument, warn};

use crate::domain::{
    Campaign, CampaignId, CampaignJob, Clock, Enrollment, Prospect, ProspectStatus, UnsubscribeSecret,
};
use crate::ports::{
    AdminStore, Claim, Conflict, JobQueue, MailError, Mailer, OutgoingEmail, ProspectRef, ProspectRepository, SendLog,
    StoreError,
};

/// How long a job may arrive before its enrollment is visible (the job is published just
/// before the enrollment is written) before it is taken for an orphan and dropped.
pub const ORPHAN_GRACE: Duration = Duration::minutes(5);
/// How long after a claim its worker is presumed dead if the next step is still missing.
pub const CLAIM_LEASE: Duration = Duration::minutes(5);
/// Transient provider failures are retried this many times, with exponential backoff.
pub const MAX_SEND_ATTEMPTS: u32 = 8;
const FIRST_BACKOFF_SECONDS: i64 = 30;

/// What handling a job did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The step's email was sent.
    Sent,
    /// Not due yet: re-queued for its due time.
    NotDue(OffsetDateTime),
    /// The provider failed transiently: re-queued with backoff.
    Retrying(OffsetDateTime),
    /// Nothing to do, and nothing left to do for this job.
    Dropped(&'static str),
}

/// A job that could not be handled; the queue keeps it and, past its retries, dead-letters it.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("storage or queue failure")]
    Store(#[from] StoreError),
    #[error("sending failed {0} times")]
    Exhausted(u32),
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

/// The ports the scheduler works through.
#[derive(Clone)]
pub struct SchedulerPorts {
    pub repo: Arc<dyn ProspectRepository>,
    pub campaigns: Arc<dyn AdminStore>,
    pub sends: Arc<dyn SendLog>,
    pub queue: Arc<dyn JobQueue>,
    pub mailer: Arc<dyn Mailer>,
    pub clock: Arc<dyn Clock>,
}

/// Handles campaign jobs.
pub struct Scheduler {
    ports: SchedulerPorts,
    settings: DeliverySettings,
    /// Campaign steps never change once created, so they are cached for the process's life.
    campaigns: Mutex<HashMap<CampaignId, Arc<Campaign>>>,
}

impl Scheduler {
    #[must_use]
    pub fn new(ports: SchedulerPorts, settings: DeliverySettings) -> Self {
        Self { ports, settings, campaigns: Mutex::new(HashMap::new()) }
    }

    /// Parses and handles one queue message.
    ///
    /// # Errors
    /// [`JobError::Malformed`] for a body that is not a campaign job; see [`Self::process`].
    pub async fn process_message(&self, body: &str) -> Result<Outcome, JobError> {
        let job: CampaignJob = serde_json::from_str(body).map_err(|e| JobError::Malformed(e.to_string()))?;
        self.process(&job).await
    }

    async fn campaign(&self, id: CampaignId) -> Result<Option<Arc<Campaign>>, StoreError> {
        if let Some(c) = self.campaigns.lock().ok().and_then(|m| m.get(&id).cloned()) {
            return Ok(Some(c));
        }
        let Some(campaign) = self.ports.campaigns.get_campaign(id).await? else { return Ok(None) };
        let campaign = Arc::new(campaign);
        if let Ok(mut cache) = self.campaigns.lock() {
            cache.insert(id, Arc::clone(&campaign));
        }
        Ok(Some(campaign))
    }

    /// Handles one job: sends its step if due and still wanted, then queues the next step.
    ///
    /// # Errors
    /// [`JobError::Store`] when storage or the queue failed (the job should be retried);
    /// [`JobError::Exhausted`] when the provider failed transiently too many times.
    #[instrument(skip_all, fields(account_id = %job.account_id, prospect_id = %job.prospect_id, enrollment_id = %job.enrollment_id, step = job.step))]
    pub async fn process(&self, job: &CampaignJob) -> Result<Outcome, JobError> {
        let now = self.ports.clock.now();
        // A job that knows it is early (the next step, or a retry after backoff) goes back on
        // the queue without reading anything.
        if let Some(not_before) = job.not_before.filter(|t| *t > now) {
            self.ports.queue.publish(job, not_before).await?;
            return Ok(Outcome::NotDue(not_before));
        }
        let prospect = self.ports.repo.find(job.account_id, &ProspectRef::EmailHash(job.email_hash.clone())).await?;
        let found = prospect.as_ref().and_then(|p| {
            p.enrollments.iter().find(|e| e.id == job.enrollment_id && p.id == job.prospect_id).cloned().map(|e| (p, e))
        });
        let Some((prospect, enrollment)) = found else {
            if now - job.published_at < ORPHAN_GRACE {
                let again = now + Duration::seconds(FIRST_BACKOFF_SECONDS);
                self.ports.queue.publish(job, again).await?;
                return Ok(Outcome::NotDue(again));
            }
            return Ok(Outcome::Dropped("no such enrollment"));
        };
        if !prospect.is_active(&enrollment) {
            return Ok(Outcome::Dropped("enrollment ended"));
        }
        let Some(campaign) = self.campaign(job.campaign_id).await? else { return Ok(Outcome::Dropped("no such campaign")) };
        let Some(step) = usize::try_from(job.step).ok().and_then(|i| campaign.steps.get(i)) else {
            return Ok(Outcome::Dropped("no such step"));
        };
        let step_due = campaign.due_at(enrollment.enrolled_at, job.step).unwrap_or(now);
        let due = job.not_before.map_or(step_due, |t| t.max(step_due));
        if due > now {
            self.ports.queue.publish(job, due).await?;
            return Ok(Outcome::NotDue(due));
        }

        match self.ports.sends.claim_send(enrollment.id, job.step, now).await? {
            Claim::Won => {}
            Claim::Held { since } if now - since >= CLAIM_LEASE => {
                self.advance(prospect, &enrollment, &campaign, job, now).await?;
                return Ok(Outcome::Dropped("already sent; next step ensured"));
            }
            Claim::Held { .. } => return Ok(Outcome::Dropped("already sent")),
        }

        let unsubscribe_url = self.settings.unsubscribe_url(prospect);
        let rendered = match step.render(prospect, &unsubscribe_url) {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "step cannot be rendered; skipping it");
                self.advance(prospect, &enrollment, &campaign, job, now).await?;
                return Ok(Outcome::Dropped("template failed to render"));
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
        match self.ports.mailer.send(&email).await {
            Ok(()) => {
                info!("campaign email sent");
                self.advance(prospect, &enrollment, &campaign, job, now).await?;
                Ok(Outcome::Sent)
            }
            Err(MailError::Transient(e)) => {
                self.ports.sends.release_send(enrollment.id, job.step).await?;
                let attempt = job.attempt + 1;
                if attempt >= MAX_SEND_ATTEMPTS {
                    warn!(error = %e, attempt, "mail provider kept failing; giving up on this job");
                    return Err(JobError::Exhausted(attempt));
                }
                let backoff = Duration::seconds(FIRST_BACKOFF_SECONDS << attempt.min(10));
                warn!(error = %e, attempt, "mail provider failed; retrying with backoff");
                let retry = CampaignJob { attempt, not_before: Some(now + backoff), ..job.clone() };
                self.ports.queue.publish(&retry, now + backoff).await?;
                Ok(Outcome::Retrying(now + backoff))
            }
            Err(MailError::Rejected(reason)) => {
                warn!(reason = %reason, "recipient rejected: marking the prospect bounced");
                self.ports.repo.set_status(job.account_id, &ProspectRef::Id(prospect.id), ProspectStatus::Bounced, now).await?;
                Ok(Outcome::Dropped("recipient rejected"))
            }
        }
    }

    /// After a step: queue the next one, or mark the enrollment completed after the last.
    async fn advance(
        &self,
        prospect: &Prospect,
        enrollment: &Enrollment,
        campaign: &Campaign,
        job: &CampaignJob,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        if campaign.is_last_step(job.step) {
            return self.complete(prospect.clone(), enrollment, now).await;
        }
        let due = campaign.due_at(enrollment.enrolled_at, job.step + 1).unwrap_or(now);
        let next = CampaignJob { step: job.step + 1, attempt: 0, not_before: Some(due), ..job.clone() };
        self.ports.queue.publish(&next, due).await
    }

    async fn complete(&self, mut current: Prospect, enrollment: &Enrollment, now: OffsetDateTime) -> Result<(), StoreError> {
        for _ in 0..5 {
            let mut updated = current.clone();
            let Some(e) = updated.enrollments.iter_mut().find(|e| e.id == enrollment.id) else { return Ok(()) };
            if e.completed_at.is_some() {
                return Ok(());
            }
            e.completed_at = Some(now);
            updated.updated_at = now;
            match self.ports.repo.update(&current, &updated).await {
                Err(StoreError::Conflict(Conflict::Version)) => {
                    let reread = self.ports.repo.find(current.account_id, &ProspectRef::Id(current.id)).await?;
                    let Some(p) = reread else { return Ok(()) };
                    current = p;
                }
                other => return other,
            }
        }
        Err(StoreError::Unavailable("prospect kept changing while completing its enrollment".into()))
    }
}

/// The SQS entry point of the scheduler Lambda: each message is parsed and handled on its own,
/// and only the ids of those that failed are returned (`ReportBatchItemFailures`), so one bad
/// message never fails the batch; SQS redelivers the failed ones and, past the queue's
/// `maxReceiveCount`, moves them to the dead-letter queue.
pub async fn handle_sqs_batch(
    scheduler: &Scheduler,
    event: aws_lambda_events::event::sqs::SqsEvent,
) -> aws_lambda_events::event::sqs::SqsBatchResponse {
    let mut response = aws_lambda_events::event::sqs::SqsBatchResponse::default();
    for record in event.records {
        let id = record.message_id.unwrap_or_default();
        let result = scheduler.process_message(record.body.as_deref().unwrap_or_default()).await;
        if let Err(e) = result {
            warn!(message_id = %id, error = %e, "campaign job failed");
            let mut failure = aws_lambda_events::event::sqs::BatchItemFailure::default();
            failure.item_identifier = id;
            response.batch_item_failures.push(failure);
        }
    }
    response
}

/// How long a job taken from the embedded queue stays hidden while it is handled.
const EMBEDDED_LEASE: Duration = Duration::minutes(2);
/// A job that failed on storage this many times is dead-lettered.
const EMBEDDED_MAX_DELIVERIES: u32 = 10;

/// One pass of the embedded scheduler: handles every job of the SQLite queue that is due at
/// the scheduler's `now`. Returns how many jobs it handled. `cadenhq serve` runs it every
/// second; tests call it with an injected clock.
///
/// # Errors
/// [`StoreError`] when the queue itself cannot be read or written.
pub async fn drain_embedded(scheduler: &Scheduler, store: &crate::adapters::sqlite::SqliteStore) -> Result<usize, StoreError> {
    let now = scheduler.ports.clock.now();
    let jobs = store.lease_due_jobs(now, now + EMBEDDED_LEASE, 100).await?;
    for job in &jobs {
        match scheduler.process_message(&job.body).await {
            Ok(_) => store.ack_job(job.id).await?,
            Err(e @ (JobError::Malformed(_) | JobError::Exhausted(_))) => {
                warn!(job_id = job.id, error = %e, "campaign job dead-lettered");
                store.dead_letter_job(job.id, e.to_string()).await?;
            }
            Err(e) if job.deliveries >= EMBEDDED_MAX_DELIVERIES => {
                warn!(job_id = job.id, error = %e, "campaign job kept failing; dead-lettered");
                store.dead_letter_job(job.id, e.to_string()).await?;
            }
            Err(e) => warn!(job_id = job.id, error = %e, "campaign job failed; it will be retried"),
        }
    }
    Ok(jobs.len())
}
