//! The application service: authentication, the POST upsert and the PATCH status change,
//! written once against the ports and used by every entry point.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration as StdDuration;

use time::{Duration, OffsetDateTime};
use tracing::{info, instrument};

use crate::domain::{
    enrollment_view, ListQuery, AccountId, ApiKey, ApiKeyRecord, Campaign, CampaignId, EnrollmentView, CampaignJob, Clock, Enrollment, FieldError, IdempotencyBegin,
    IdempotencyKey, KeyHash, KeyId, NormalizedEmail, Prospect, ProspectChanges, ProspectId, ProspectStatus,
    RateDecision, StatusReason, StoredResponse, UnsubscribeSecret,
};
use crate::ports::{
    CampaignReader, Conflict, IdempotencyStore, JobQueue, ListPage, KeyStore, ProspectRef, ProspectRepository, RateLimiter, Replacing, StoreError,
};

/// Campaigns read for a prospect's enrollments are kept at least this long (on the embedded
/// store too, where keys are not kept): a pause shows in a read within a second.
const CAMPAIGN_CACHE_MIN: StdDuration = StdDuration::from_secs(1);
/// How many times an upsert re-reads after losing a race before giving up with 503.
const UPSERT_ATTEMPTS: usize = 5;
/// Longest header value even looked up as a key.
const KEY_MAX_LEN: usize = 128;
/// A key's last-used time is written at most this often.
const TOUCH_INTERVAL: Duration = Duration::minutes(1);

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
    #[error("rate limited")]
    RateLimited(RateDecision),
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
pub struct UpsertCommand<'a> {
    pub email: NormalizedEmail,
    pub campaign_id: Option<CampaignId>,
    pub changes: ProspectChanges<'a>,
}

/// What an upsert did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpsertOutcome {
    pub prospect_id: ProspectId,
    pub created: bool,
}

/// What the service works through.
#[derive(Clone)]
pub struct ServicePorts {
    pub repo: Arc<dyn ProspectRepository>,
    /// `None` in a function that never enrolls (PATCH, unsubscribe).
    pub queue: Option<Arc<dyn JobQueue>>,
    /// Campaigns, read to tell where a prospect's enrollments stand.
    pub campaigns: Arc<dyn CampaignReader>,
    pub keys: Arc<dyn KeyStore>,
    pub idempotency: Arc<dyn IdempotencyStore>,
    pub limiter: Arc<dyn RateLimiter>,
    pub clock: Arc<dyn Clock>,
    /// How long a looked-up key is trusted before it is read again: zero on the embedded
    /// store (a revocation applies at once), under a minute on Lambda (a revocation applies
    /// within that time, and a warm instance reads each key at most once per period).
    /// Campaigns read for a prospect's enrollments are kept as long (at least a second).
    pub key_cache_ttl: StdDuration,
}

/// The caller of an API request, once admitted.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub account: AccountId,
    pub key_id: KeyId,
    /// The rate-limit state after this request, for the `RateLimit-*` headers.
    pub rate: RateDecision,
}

/// Key records by hash, with when they were read; shared, not copied, by the requests. Hashed
/// with foldhash rather than SipHash: only keys that exist are ever inserted, so no client can
/// choose the entries to flood the map with colliding ones.
type KeyCache = foldhash::HashMap<KeyHash, (Arc<ApiKeyRecord>, OffsetDateTime)>;

/// Campaigns by id (`None`: there is none), with when they were read.
type CampaignCache = HashMap<CampaignId, (Option<Arc<Campaign>>, OffsetDateTime)>;

/// A prospect as a reader sees it: the stored prospect and where each enrollment stands, in
/// the order of its enrollments.
#[derive(Debug, Clone)]
pub struct ProspectView {
    pub prospect: Prospect,
    pub enrollments: Vec<EnrollmentView>,
}

/// The prospects service.
#[derive(Clone)]
pub struct ProspectService {
    ports: ServicePorts,
    key_cache: Arc<Mutex<KeyCache>>,
    campaign_cache: Arc<Mutex<CampaignCache>>,
    unsubscribe_secret: Option<UnsubscribeSecret>,
}

impl ProspectService {
    /// A service over the given ports.
    #[must_use]
    pub fn new(ports: ServicePorts) -> Self {
        Self { ports, key_cache: Arc::default(), campaign_cache: Arc::default(), unsubscribe_secret: None }
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
        self.set_status(account, &ProspectRef::Id(prospect), ProspectStatus::Unsubscribed, StatusReason::UnsubscribeLink).await
    }

    /// One prospect of the account, and where each of its enrollments stands. Reads the
    /// prospect (strongly consistent: it sees every acknowledged write) and, through a cache
    /// kept as long as keys are, its campaigns.
    ///
    /// # Errors
    /// [`ServiceError::NotFound`] when the account has no such prospect; storage errors.
    #[instrument(level = "debug", skip_all, fields(account_id = %account))]
    pub async fn get(&self, account: AccountId, prospect: &ProspectRef) -> Result<ProspectView, ServiceError> {
        let prospect = self.ports.repo.find(account, prospect).await?.ok_or(ServiceError::NotFound)?;
        self.view(prospect).await
    }

    /// Erases one prospect of the account (see [`ProspectRepository::erase`]).
    ///
    /// # Errors
    /// [`ServiceError::NotFound`] when the account has no such prospect (erased already
    /// included); storage errors.
    #[instrument(level = "debug", skip_all, fields(account_id = %account))]
    pub async fn erase(&self, account: AccountId, prospect: &ProspectRef) -> Result<ProspectId, ServiceError> {
        let id = self.ports.repo.erase(account, prospect, self.ports.clock.now()).await?.ok_or(ServiceError::NotFound)?;
        info!(account_id = %account, prospect_id = %id, "prospect erased");
        Ok(id)
    }

    /// One page of the account's prospects that pass `query`, newest first, and whether more
    /// follow. With `email`, the one prospect with that address (a lookup, not a listing), if
    /// it passes the other filters.
    ///
    /// # Errors
    /// Storage errors.
    #[instrument(level = "debug", skip_all, fields(account_id = %query.account))]
    pub async fn list(&self, query: &ListQuery, email: Option<NormalizedEmail>) -> Result<(Vec<ProspectView>, bool), ServiceError> {
        let page = match email {
            Some(email) => {
                let found = self.ports.repo.find(query.account, &ProspectRef::Email(email)).await?;
                ListPage { prospects: found.into_iter().filter(|p| query.admits(p)).collect(), has_more: false }
            }
            None => self.ports.repo.list(query).await?,
        };
        let mut views = Vec::with_capacity(page.prospects.len());
        for prospect in page.prospects {
            views.push(self.view(prospect).await?);
        }
        Ok((views, page.has_more))
    }

    /// A prospect and where each of its enrollments stands.
    async fn view(&self, prospect: Prospect) -> Result<ProspectView, ServiceError> {
        let mut enrollments = Vec::with_capacity(prospect.enrollments.len());
        for enrollment in &prospect.enrollments {
            let campaign = self.campaign(enrollment.campaign_id).await?;
            enrollments.push(enrollment_view(&prospect, enrollment, campaign.as_deref()));
        }
        Ok(ProspectView { prospect, enrollments })
    }

    /// A campaign, through the campaign cache.
    async fn campaign(&self, id: CampaignId) -> Result<Option<Arc<Campaign>>, ServiceError> {
        let (ttl, now) = (self.ports.key_cache_ttl.max(CAMPAIGN_CACHE_MIN), self.ports.clock.now());
        let fresh = |(_, at): &&(Option<Arc<Campaign>>, OffsetDateTime)| (now - *at).unsigned_abs() < ttl;
        if let Some((campaign, _)) = self.campaign_cache.lock().ok().and_then(|c| c.get(&id).filter(fresh).cloned()) {
            return Ok(campaign);
        }
        let campaign = self.ports.campaigns.get_campaign(id).await?.map(Arc::new);
        if let Ok(mut cache) = self.campaign_cache.lock() {
            cache.insert(id, (campaign.clone(), now));
        }
        Ok(campaign)
    }

    /// The stored record of a presented key, through the key cache.
    async fn key_record(&self, hash: &KeyHash, now: OffsetDateTime) -> Result<Option<Arc<ApiKeyRecord>>, ServiceError> {
        let ttl = self.ports.key_cache_ttl;
        if !ttl.is_zero() {
            let fresh = |(_, at): &&(Arc<ApiKeyRecord>, OffsetDateTime)| (now - *at).unsigned_abs() < ttl;
            let cached = self.key_cache.lock().ok().and_then(|c| c.get(hash).filter(fresh).map(|(r, _)| Arc::clone(r)));
            if let Some(record) = cached {
                return Ok(Some(record));
            }
        }
        let record = self.ports.keys.find_key(hash).await?.map(Arc::new);
        if let (Some(r), false) = (&record, ttl.is_zero()) {
            if let Ok(mut cache) = self.key_cache.lock() {
                cache.insert(hash.clone(), (Arc::clone(r), now));
            }
        }
        Ok(record)
    }

    /// Admits an API request: the key must be known and not revoked, and within its rate
    /// limit. Records the key's last use at most once a minute.
    ///
    /// # Errors
    /// [`ServiceError::Unauthorized`] for a missing, unknown or revoked key;
    /// [`ServiceError::RateLimited`] over the key's limit; storage errors.
    pub async fn admit(&self, raw_key: Option<&str>) -> Result<Caller, ServiceError> {
        let raw = raw_key.map(str::trim).filter(|k| !k.is_empty() && k.len() <= KEY_MAX_LEN);
        let Some(raw) = raw else { return Err(ServiceError::Unauthorized) };
        let hash = ApiKey::hash_of(raw);
        let now = self.ports.clock.now();
        let record = match self.key_record(&hash, now).await? {
            Some(record) if record.is_active() => record,
            _ => return Err(ServiceError::Unauthorized),
        };
        if record.last_used_at.is_none_or(|t| now - t >= TOUCH_INTERVAL) {
            if let Err(e) = self.ports.keys.touch_key(&hash, now).await {
                tracing::warn!(key_id = %record.key_id, error = %e, "could not record the key's last use");
            }
            if let Ok(mut cache) = self.key_cache.lock() {
                if let Some((cached, _)) = cache.get_mut(&hash) {
                    Arc::make_mut(cached).last_used_at = Some(now);
                }
            }
        }
        let rate = self.ports.limiter.check(record.key_id, record.effective_rate_limit(), now).await?;
        if !rate.allowed {
            return Err(ServiceError::RateLimited(rate));
        }
        Ok(Caller { account: record.account_id, key_id: record.key_id, rate })
    }

    /// Takes an idempotency key for a request (see [`IdempotencyStore::begin`]).
    ///
    /// # Errors
    /// Storage errors.
    pub async fn idempotency_begin(&self, account: AccountId, key: &IdempotencyKey, fingerprint: &str) -> Result<IdempotencyBegin, ServiceError> {
        Ok(self.ports.idempotency.begin(account, key, fingerprint, self.ports.clock.now()).await?)
    }

    /// Keeps a finished request's response under its idempotency key.
    ///
    /// # Errors
    /// Storage errors.
    pub async fn idempotency_finish(&self, account: AccountId, key: &IdempotencyKey, response: &StoredResponse) -> Result<(), ServiceError> {
        Ok(self.ports.idempotency.finish(account, key, response, self.ports.clock.now()).await?)
    }

    /// Frees an idempotency key after a failure on our side.
    ///
    /// # Errors
    /// Storage errors.
    pub async fn idempotency_abandon(&self, account: AccountId, key: &IdempotencyKey) -> Result<(), ServiceError> {
        Ok(self.ports.idempotency.abandon(account, key).await?)
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
    // The span is at debug level: at info, every request would format its fields even when it
    // logs nothing (an identical POST); the event below names what a reader needs.
    #[instrument(level = "debug", skip_all, fields(account_id = %account, email_hash = %cmd.email.key_hash()))]
    pub async fn upsert(&self, account: AccountId, cmd: &UpsertCommand<'_>) -> Result<UpsertOutcome, ServiceError> {
        for _ in 0..UPSERT_ATTEMPTS {
            let ctx = self.ports.repo.upsert_context(account, &cmd.email, cmd.campaign_id).await?;
            let requested = match cmd.campaign_id {
                Some(id) => match &ctx.requested_campaign {
                    Some(c) if c.id == id && c.is_usable_by(account) => Some(id),
                    _ => return Err(ServiceError::Invalid(vec!["campaign_id must name an active campaign of this account".into()])),
                },
                None => None,
            };
            let now = self.ports.clock.now();
            let result = match ctx.prospect {
                None => {
                    let mut prospect = Prospect::new(account, cmd.email.clone(), now);
                    prospect.apply(&cmd.email, &cmd.changes)?;
                    if ctx.suppressed {
                        // The address was erased before: the prospect starts unsubscribed, in no
                        // campaign, until a PATCH to `new` says otherwise.
                        prospect.set_status(ProspectStatus::Unsubscribed, StatusReason::Erased, now);
                    }
                    let enrollment = requested.or(ctx.default_campaign_id).and_then(|c| prospect.enroll(c, now));
                    self.publish_first_step(&prospect, enrollment.as_ref(), now).await?;
                    let outcome = UpsertOutcome { prospect_id: prospect.id, created: true };
                    self.ports.repo.insert(prospect).await.map(|()| outcome)
                }
                Some(mut prospect) => {
                    let outcome = UpsertOutcome { prospect_id: prospect.id, created: false };
                    // An identical POST (the common retry) is answered before anything is written.
                    let enrolls = requested.is_some_and(|c| prospect.can_enroll(c));
                    if !enrolls && !prospect.would_change(&cmd.email, &cmd.changes)? {
                        return Ok(outcome);
                    }
                    let previous = Replacing::of(&prospect);
                    prospect.apply(&cmd.email, &cmd.changes)?;
                    let enrollment = requested.and_then(|c| prospect.enroll(c, now));
                    prospect.updated_at = now;
                    self.publish_first_step(&prospect, enrollment.as_ref(), now).await?;
                    self.ports.repo.update(previous, prospect).await.map(|()| outcome)
                }
            };
            match result {
                Ok(outcome) => {
                    info!(account_id = %account, prospect_id = %outcome.prospect_id, created = outcome.created, "prospect upserted");
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
            email_hash: prospect.email.key_hash().to_owned(),
            enrollment_id: enrollment.id,
            campaign_id: enrollment.campaign_id,
            step: 0,
            published_at: now,
            attempt: 0,
            not_before: None,
            retry_of: None,
        };
        let Some(queue) = &self.ports.queue else {
            return Err(ServiceError::Internal(StoreError::other("no job queue is configured")));
        };
        queue.publish(&job, now).await.map_err(|e| match e {
            StoreError::Unavailable(_) => ServiceError::Unavailable(e),
            other => ServiceError::Internal(other),
        })
    }

    /// Sets a prospect's status; any status but `new` ends all its enrollments in that write.
    /// The one path for every status change: PATCH, the unsubscribe link and the scheduler's
    /// bounce on a rejected address all come through here, each naming its `reason`.
    ///
    /// # Errors
    /// [`ServiceError::NotFound`] when the account has no such prospect; storage errors.
    #[instrument(level = "debug", skip_all, fields(account_id = %account))]
    pub async fn set_status(
        &self,
        account: AccountId,
        prospect: &ProspectRef,
        status: ProspectStatus,
        reason: StatusReason,
    ) -> Result<Prospect, ServiceError> {
        let updated = self
            .ports
            .repo
            .set_status(account, prospect, status, reason, self.ports.clock.now())
            .await?
            .ok_or(ServiceError::NotFound)?;
        info!(account_id = %account, prospect_id = %updated.id, status = status.as_str(), reason = reason.as_str(), "prospect status set");
        Ok(updated)
    }
}
