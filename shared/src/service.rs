//! The application service: authentication, the POST upsert and the PATCH status change,
//! written once against the ports and used by every entry point.

use std::sync::Arc;

use time::OffsetDateTime;
use tracing::{info, instrument};

use crate::domain::{
    AccountId, ApiKey, CampaignId, CampaignJob, Clock, Enrollment, FieldError, NormalizedEmail,
    Prospect, ProspectChanges, ProspectId, ProspectStatus, UnsubscribeSecret,
};
use crate::ports::{Conflict, JobQueue, KeyStore, ProspectRef, ProspectRepository, StoreError};

/// How many times an upsert re-reads after losing a race before giving up with 503.
const UPSERT_ATTEMPTS: usize = 5;
/// Longest header value even looked up as a key.
const KEY_MAX_LEN: usize = 128;

/// Why a request could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("missing or invalid key")]
    Unauthorized,
    #[error("prospect not found")]
    NotFound,
    #[error("validation failed: {0:?}")]
    Invalid(Vec<String>),
    #[error("invalid unsubscribe token")]
    InvalidToken,
    #[error("storage temporarily unavailable")]
    Unavailable(#[source] StoreError),
    #[error("storage failure")]
    Internal(#[source] StoreError),
}

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) => Self::Unavailable(e),
            StoreError::Conflict(_) | StoreError::Other(_) => Self::Internal(e),
        }
    }
}

impl From<FieldError> for ServiceError {
    fn from(e: FieldError) -> Self {
        Self::Invalid(vec![e.to_string()])
    }
}

/// A checked POST body.
#[derive(Debug, Clone)]
pub struct UpsertCommand {
    pub email: NormalizedEmail,
    pub campaign_id: Option<CampaignId>,
    pub changes: ProspectChanges,
}

/// What an upsert did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpsertOutcome {
    pub prospect_id: ProspectId,
    pub created: bool,
}

/// The prospects service.
#[derive(Clone)]
pub struct ProspectService {
    repo: Arc<dyn ProspectRepository>,
    queue: Option<Arc<dyn JobQueue>>,
    keys: Arc<dyn KeyStore>,
    clock: Arc<dyn Clock>,
    unsubscribe_secret: Option<UnsubscribeSecret>,
}

impl ProspectService {
    /// A service over the given ports. One without a queue (the PATCH function's) serves
    /// status changes; an upsert that would enroll a prospect then fails with a 500.
    #[must_use]
    pub fn new(
        repo: Arc<dyn ProspectRepository>,
        queue: Option<Arc<dyn JobQueue>>,
        keys: Arc<dyn KeyStore>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self { repo, queue, keys, clock, unsubscribe_secret: None }
    }

    /// Enables unsubscribe links signed with `secret`.
    #[must_use]
    pub fn with_unsubscribe_secret(mut self, secret: UnsubscribeSecret) -> Self {
        self.unsubscribe_secret = Some(secret);
        self
    }

    /// Checks an unsubscribe token without changing anything.
    ///
    /// # Errors
    /// [`ServiceError::InvalidToken`] for a tampered or foreign token (or when no secret is
    /// configured).
    pub fn verify_unsubscribe(&self, token: &str) -> Result<(AccountId, ProspectId), ServiceError> {
        let secret = self.unsubscribe_secret.as_ref().ok_or(ServiceError::InvalidToken)?;
        secret.verify(token).map_err(|_| ServiceError::InvalidToken)
    }

    /// One-click unsubscribe: sets the status `unsubscribed`, ending every enrollment.
    /// Idempotent.
    ///
    /// # Errors
    /// [`ServiceError::InvalidToken`]; [`ServiceError::NotFound`] when the prospect is gone.
    pub async fn unsubscribe(&self, token: &str) -> Result<Prospect, ServiceError> {
        let (account, prospect) = self.verify_unsubscribe(token)?;
        self.set_status(account, &ProspectRef::Id(prospect), ProspectStatus::Unsubscribed).await
    }

    /// The account a presented key belongs to.
    ///
    /// # Errors
    /// [`ServiceError::Unauthorized`] for a missing, unknown or revoked key; storage errors.
    pub async fn authenticate(&self, raw_key: Option<&str>) -> Result<AccountId, ServiceError> {
        let raw = raw_key.map(str::trim).filter(|k| !k.is_empty() && k.len() <= KEY_MAX_LEN);
        let Some(raw) = raw else { return Err(ServiceError::Unauthorized) };
        match self.keys.find_key(&ApiKey::from_raw(raw).hash()).await? {
            Some(record) if record.is_active() => Ok(record.account_id),
            _ => Err(ServiceError::Unauthorized),
        }
    }

    /// Creates or updates the prospect keyed by the command's normalized email.
    ///
    /// A new prospect gets status `new` and is enrolled in the named campaign or else the
    /// account's default one. The campaign job is published *before* the write that records
    /// the enrollment: if the publish fails nothing is written and a retry starts afresh; if the
    /// write then loses a race, the orphaned job finds no enrollment and is dropped.
    ///
    /// # Errors
    /// [`ServiceError::Invalid`] for a campaign the account cannot use, a taken external_id or
    /// oversized metadata; [`ServiceError::Unavailable`] when storage or the queue is
    /// unavailable or the prospect is contended beyond [`UPSERT_ATTEMPTS`].
    #[instrument(skip_all, fields(account_id = %account, prospect_id, email_hash = %cmd.email.key_hash()))]
    pub async fn upsert(&self, account: AccountId, cmd: &UpsertCommand) -> Result<UpsertOutcome, ServiceError> {
        for _ in 0..UPSERT_ATTEMPTS {
            let ctx = self.repo.upsert_context(account, &cmd.email, cmd.campaign_id).await?;
            let requested = match cmd.campaign_id {
                Some(id) => match &ctx.requested_campaign {
                    Some(c) if c.id == id && c.is_usable_by(account) => Some(id),
                    _ => return Err(ServiceError::Invalid(vec!["campaign_id must name an active campaign of this account".into()])),
                },
                None => None,
            };
            let now = self.clock.now();
            let result = match ctx.prospect {
                None => {
                    let mut prospect = Prospect::new(account, cmd.email.clone(), now);
                    prospect.apply(&cmd.email, &cmd.changes)?;
                    let enrollment = requested.or(ctx.default_campaign_id).and_then(|c| prospect.enroll(c, now));
                    self.publish_first_step(&prospect, enrollment.as_ref(), now).await?;
                    self.repo.insert(&prospect).await.map(|()| UpsertOutcome { prospect_id: prospect.id, created: true })
                }
                Some(previous) => {
                    let mut prospect = previous.clone();
                    let mut changed = prospect.apply(&cmd.email, &cmd.changes)?;
                    let enrollment = requested.and_then(|c| prospect.enroll(c, now));
                    changed |= enrollment.is_some();
                    let outcome = UpsertOutcome { prospect_id: prospect.id, created: false };
                    if !changed {
                        return Ok(outcome);
                    }
                    prospect.updated_at = now;
                    self.publish_first_step(&prospect, enrollment.as_ref(), now).await?;
                    self.repo.update(&previous, &prospect).await.map(|()| outcome)
                }
            };
            match result {
                Ok(outcome) => {
                    tracing::Span::current().record("prospect_id", tracing::field::display(outcome.prospect_id));
                    info!(created = outcome.created, "prospect upserted");
                    return Ok(outcome);
                }
                Err(StoreError::Conflict(Conflict::ExternalId)) => {
                    return Err(ServiceError::Invalid(vec!["external_id is already used by another prospect of this account".into()]));
                }
                Err(StoreError::Conflict(Conflict::Email | Conflict::Version)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Err(ServiceError::Unavailable(StoreError::Conflict(Conflict::Version)))
    }

    async fn publish_first_step(
        &self,
        prospect: &Prospect,
        enrollment: Option<&Enrollment>,
        now: OffsetDateTime,
    ) -> Result<(), ServiceError> {
        let Some(enrollment) = enrollment else { return Ok(()) };
        let job = CampaignJob {
            account_id: prospect.account_id,
            prospect_id: prospect.id,
            email_hash: prospect.email.key_hash(),
            enrollment_id: enrollment.id,
            campaign_id: enrollment.campaign_id,
            step: 0,
            published_at: now,
            attempt: 0,
            not_before: None,
        };
        let Some(queue) = &self.queue else {
            return Err(ServiceError::Internal(StoreError::other("no job queue is configured")));
        };
        queue.publish(&job, now).await.map_err(|e| match e {
            StoreError::Unavailable(_) => ServiceError::Unavailable(e),
            other => ServiceError::Internal(other),
        })
    }

    /// Sets a prospect's status; any status but `new` ends all its enrollments in that write.
    ///
    /// # Errors
    /// [`ServiceError::NotFound`] when the account has no such prospect; storage errors.
    #[instrument(skip_all, fields(account_id = %account, prospect_id))]
    pub async fn set_status(
        &self,
        account: AccountId,
        prospect: &ProspectRef,
        status: ProspectStatus,
    ) -> Result<Prospect, ServiceError> {
        let updated = self
            .repo
            .set_status(account, prospect, status, self.clock.now())
            .await?
            .ok_or(ServiceError::NotFound)?;
        tracing::Span::current().record("prospect_id", tracing::field::display(updated.id));
        info!(status = status.as_str(), "prospect status set");
        Ok(updated)
    }
}
