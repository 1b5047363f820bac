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
//! winner publishes the next step, unless the claim is older than [`CLAIM_LEASE`]: then the job
//! is a redelivery after its worker failed between claiming and publishing (the queue redelivers
//! only after longer than that), and it publishes the next step without sending again (a
//! duplicate next-step job would find that step's claim in turn). After the last step nothing
//! is written: its claim records the completion.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use time::{Duration, OffsetDateTime};
use tracing::{info, instrument, warn};

use crate::domain::{
    Campaign, CampaignId, CampaignJob, Clock, Enrollment, Prospect, ProspectStatus, UnsubscribeSecret,
};
use crate::ports::{
    AdminStore, Claim, JobQueue, MailError, Mailer, OutgoingEmail, ProspectRef, ProspectRepository, SendLog,
    StoreError,
};

/// How long a job may arrive before its enrollment is visible (the job is published just
/// before the enrollment is written) before it is taken for an orphan and dropped.
pub const ORPHAN_GRACE: Duration = Duration::minutes(5);
/// How long after a claim its worker is presumed done or dead. Longer than a worker holds a
/// job (the scheduler function's timeout is 30 s), and shorter than the queue takes to deliver
/// a job again after its handling failed (the SQS visibility timeout, 180 s; the embedded
/// queue's lease, 2 minutes): so a job redelivered because its next step was not published
/// always finds the claim past its lease and publishes that step, while a duplicate delivered
/// alongside the claimant finds it fresh and does nothing.
pub const CLAIM_LEASE: Duration = Duration::minutes(1);
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
        self.process(&parse_job(body)?).await
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
    pub async fn process(&self, job: &CampaignJob) -> Result<Outcome, JobError> {
        let handled = self.handle(job).await?;
        if let Some((next, visible_at)) = &handled.publish {
            self.ports.queue.publish(next, *visible_at).await?;
        }
        Ok(handled.outcome)
    }

    /// Handles one job and says which job, if any, goes on the queue after it (the same job
    /// re-queued, its retry, or the next step), so a batch can publish them together.
    #[instrument(skip_all, fields(account_id = %job.account_id, prospect_id = %job.prospect_id, enrollment_id = %job.enrollment_id, step = job.step))]
    async fn handle(&self, job: &CampaignJob) -> Result<Handled, JobError> {
        let now = self.ports.clock.now();
        // A job that knows it is early (the next step, or a retry after backoff) goes back on
        // the queue without reading anything.
        if let Some(not_before) = job.not_before.filter(|t| *t > now) {
            return Ok(Handled::requeue(job, not_before));
        }
        let prospect = self.ports.repo.find(job.account_id, &ProspectRef::EmailHash(job.email_hash.clone())).await?;
        let found = prospect.as_ref().and_then(|p| {
            p.enrollments.iter().find(|e| e.id == job.enrollment_id && p.id == job.prospect_id).cloned().map(|e| (p, e))
        });
        let Some((prospect, enrollment)) = found else {
            if now - job.published_at < ORPHAN_GRACE {
                return Ok(Handled::requeue(job, now + Duration::seconds(FIRST_BACKOFF_SECONDS)));
            }
            return Ok(Handled::done(Outcome::Dropped("no such enrollment")));
        };
        if !prospect.is_active(&enrollment) {
            return Ok(Handled::done(Outcome::Dropped("enrollment ended")));
        }
        let Some(campaign) = self.campaign(job.campaign_id).await? else {
            return Ok(Handled::done(Outcome::Dropped("no such campaign")));
        };
        let Some(step) = usize::try_from(job.step).ok().and_then(|i| campaign.steps.get(i)) else {
            return Ok(Handled::done(Outcome::Dropped("no such step")));
        };
        let step_due = campaign.due_at(enrollment.enrolled_at, job.step).unwrap_or(now);
        let due = job.not_before.map_or(step_due, |t| t.max(step_due));
        if due > now {
            return Ok(Handled::requeue(job, due));
        }

        match self.ports.sends.claim_send(enrollment.id, job.step, now).await? {
            Claim::Won => {}
            Claim::Held { since } if now - since >= CLAIM_LEASE => {
                let next = self.advance(&enrollment, &campaign, job, now);
                return Ok(Handled { outcome: Outcome::Dropped("already sent; next step ensured"), publish: next });
            }
            Claim::Held { .. } => return Ok(Handled::done(Outcome::Dropped("already sent"))),
        }

        let unsubscribe_url = self.settings.unsubscribe_url(prospect);
        let rendered = match step.render(prospect, &unsubscribe_url) {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "step cannot be rendered; skipping it");
                let next = self.advance(&enrollment, &campaign, job, now);
                return Ok(Handled { outcome: Outcome::Dropped("template failed to render"), publish: next });
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
                Ok(Handled { outcome: Outcome::Sent, publish: self.advance(&enrollment, &campaign, job, now) })
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
                Ok(Handled { outcome: Outcome::Retrying(now + backoff), publish: Some((retry, now + backoff)) })
            }
            Err(MailError::Rejected(reason)) => {
                warn!(reason = %reason, "recipient rejected: marking the prospect bounced");
                self.ports.repo.set_status(job.account_id, &ProspectRef::Id(prospect.id), ProspectStatus::Bounced, now).await?;
                Ok(Handled::done(Outcome::Dropped("recipient rejected")))
            }
        }
    }

    /// After a step: the next step's job, due when that step is. After the last step there
    /// is none, and nothing is written: the last step's claim in the send log is the record
    /// that the enrollment completed.
    fn advance(&self, enrollment: &Enrollment, campaign: &Campaign, job: &CampaignJob, now: OffsetDateTime) -> Option<(CampaignJob, OffsetDateTime)> {
        if campaign.is_last_step(job.step) {
            info!("enrollment completed its campaign");
            return None;
        }
        let due = campaign.due_at(enrollment.enrolled_at, job.step + 1).unwrap_or(now);
        Some((CampaignJob { step: job.step + 1, attempt: 0, not_before: Some(due), ..job.clone() }, due))
    }
}

fn parse_job(body: &str) -> Result<CampaignJob, JobError> {
    serde_json::from_str(body).map_err(|e| JobError::Malformed(e.to_string()))
}

/// What handling one job decided.
struct Handled {
    outcome: Outcome,
    /// The job to put on the queue, and when it becomes visible.
    publish: Option<(CampaignJob, OffsetDateTime)>,
}

impl Handled {
    fn done(outcome: Outcome) -> Self {
        Self { outcome, publish: None }
    }

    fn requeue(job: &CampaignJob, at: OffsetDateTime) -> Self {
        Self { outcome: Outcome::NotDue(at), publish: Some((job.clone(), at)) }
    }
}

/// The SQS entry point of the scheduler Lambda: each message is parsed and handled on its own,
/// and only the ids of those that failed are returned (`ReportBatchItemFailures`), so one bad
/// message never fails the batch; SQS redelivers the failed ones and, past the queue's
/// `maxReceiveCount`, moves them to the dead-letter queue.
///
/// The jobs the batch hands back to the queue (re-queued early jobs, retries, next steps) are
/// published together at the end, in as few calls as the queue allows (one `SendMessageBatch`
/// per 10); a message whose follow-up job was not taken is reported failed, so SQS delivers it
/// again and its claim, or its lease, decides what happens then.
pub async fn handle_sqs_batch(
    scheduler: &Scheduler,
    event: aws_lambda_events::event::sqs::SqsEvent,
) -> aws_lambda_events::event::sqs::SqsBatchResponse {
    let mut failed = Vec::new();
    let mut follow_ups = Vec::new();
    for record in event.records {
        let id = record.message_id.unwrap_or_default();
        let body = record.body.as_deref().unwrap_or_default();
        let handled = match parse_job(body) {
            Ok(job) => scheduler.handle(&job).await,
            Err(e) => Err(e),
        };
        match handled {
            Ok(Handled { publish: Some(follow_up), .. }) => follow_ups.push((id, follow_up)),
            Ok(Handled { publish: None, .. }) => {}
            Err(e) => {
                warn!(message_id = %id, error = %e, "campaign job failed");
                failed.push(id);
            }
        }
    }
    if !follow_ups.is_empty() {
        let (ids, jobs): (Vec<String>, Vec<(CampaignJob, OffsetDateTime)>) = follow_ups.into_iter().unzip();
        let results = scheduler.ports.queue.publish_batch(&jobs).await;
        for (id, result) in ids.into_iter().zip(results) {
            if let Err(e) = result {
                warn!(message_id = %id, error = %e, "campaign job's follow-up was not queued");
                failed.push(id);
            }
        }
    }
    let mut response = aws_lambda_events::event::sqs::SqsBatchResponse::default();
    for id in failed {
        let mut failure = aws_lambda_events::event::sqs::BatchItemFailure::default();
        failure.item_identifier = id;
        response.batch_item_failures.push(failure);
    }
    response
}

/// How long a job taken from the embedded queue stays hidden while it is handled.
const EMBEDDED_LEASE: Duration = Duration::minutes(2);
// A job the embedded queue hands out again finds its claim past the lease (see CLAIM_LEASE).
const _: () = assert!(EMBEDDED_LEASE.whole_seconds() > CLAIM_LEASE.whole_seconds());
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
