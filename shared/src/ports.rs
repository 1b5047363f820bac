//! Ports: what the service needs from storage and from the job queue. The embedded (SQLite)
//! and AWS (DynamoDB, SQS) adapters implement every one of them, and one contract suite holds
//! both to the same behaviour.

use async_trait::async_trait;
use time::OffsetDateTime;

use crate::domain::{
    Account, AccountId, ApiKeyRecord, Campaign, CampaignId, CampaignJob, ClaimOwner, EmailReference, ExternalId, SendKey, SendRecord,
    SendState, SendTally, StatusReason, ListQuery,
    IdempotencyBegin, IdempotencyKey, KeyHash, KeyId, NormalizedEmail, Prospect, ProspectId, ProspectStatus,
    RateDecision, RateLimit, StoredResponse, EndpointId, Integration, Provider, ReceivedEvent,
};

/// A failure of a storage or queue adapter.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A conditional write lost: the thing named already exists or changed meanwhile.
    #[error("conflict: {0:?}")]
    Conflict(Conflict),
    /// The backend is throttling or unreachable for now; the caller may retry.
    #[error("backend temporarily unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Anything else: a bug or broken infrastructure.
    #[error("backend failure")]
    Other(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl StoreError {
    pub fn other(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Other(e.into())
    }
}

/// Which condition a conflicting write ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conflict {
    /// Another prospect of the account has this email (a concurrent insert won).
    Email,
    /// Another prospect of the account has this external_id.
    ExternalId,
    /// The prospect changed since it was read.
    Version,
}

/// How a request names an existing prospect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProspectRef {
    Id(ProspectId),
    ExternalId(ExternalId),
    Email(NormalizedEmail),
    /// The hash of the normalized email (what campaign jobs carry).
    EmailHash(String),
}

/// One page of a listing.
#[derive(Debug, Clone, Default)]
pub struct ListPage {
    pub prospects: Vec<Prospect>,
    /// Whether prospects past the last of this page pass the filters too.
    pub has_more: bool,
}

/// Everything an upsert needs to decide, read in one round trip.
#[derive(Debug, Clone, Default)]
pub struct UpsertContext {
    /// The prospect with this email in this account, if any (strongly consistent).
    pub prospect: Option<Prospect>,
    /// The account's default campaign id, if it has one. Only a new prospect is enrolled in
    /// it, so an adapter may leave it out when `prospect` is found.
    pub default_campaign_id: Option<CampaignId>,
    /// The campaign the request named, if it exists (of any account: the service checks).
    pub requested_campaign: Option<Campaign>,
    /// Whether a prospect with this address was erased (a suppression entry is kept).
    pub suppressed: bool,
}

/// What [`ProspectRepository::update`] needs of the prospect as it was read: the version the
/// write is conditional on, and the external_id whose lookup entry moves if it changed. (Not
/// the whole prospect: the service changes the one it read in place, without a copy.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replacing {
    pub version: u64,
    pub external_id: Option<ExternalId>,
}

impl Replacing {
    #[must_use]
    pub fn of(prospect: &Prospect) -> Self {
        Self { version: prospect.version, external_id: prospect.external_id.clone() }
    }
}

/// Prospect storage.
#[async_trait]
pub trait ProspectRepository: Send + Sync {
    /// Reads the prospect keyed by (`account`, `email`) together with the account's default
    /// campaign id and the requested campaign.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Other`].
    async fn upsert_context(
        &self,
        account: AccountId,
        email: &NormalizedEmail,
        campaign: Option<CampaignId>,
    ) -> Result<UpsertContext, StoreError>;

    /// Stores a new prospect (version 0 becomes 1).
    ///
    /// # Errors
    /// [`Conflict::Email`] when the account already has a prospect with this email,
    /// [`Conflict::ExternalId`] when its external_id is taken; nothing is written then.
    async fn insert(&self, prospect: Prospect) -> Result<(), StoreError>;

    /// Replaces the stored prospect by `updated` (same id) if nobody wrote it since it was
    /// read as `previous`.
    ///
    /// # Errors
    /// [`Conflict::Version`] when it changed meanwhile, [`Conflict::ExternalId`] when the new
    /// external_id is taken; nothing is written then.
    async fn update(&self, previous: Replacing, updated: Prospect) -> Result<(), StoreError>;

    /// Sets the status in one atomic write; a status other than `new` ends every enrollment
    /// in that same write, and the change (with `reason`) is appended to the prospect's
    /// status history in it too. Returns the prospect as written, or `None` if the account
    /// has no such prospect. Strongly consistent with every acknowledged write.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Other`].
    async fn set_status(
        &self,
        account: AccountId,
        prospect: &ProspectRef,
        status: ProspectStatus,
        reason: StatusReason,
        now: OffsetDateTime,
    ) -> Result<Option<Prospect>, StoreError>;

    /// Reads one prospect of the account.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Other`].
    async fn find(&self, account: AccountId, prospect: &ProspectRef) -> Result<Option<Prospect>, StoreError>;

    /// One page of the account's prospects, newest first, that pass the query's filters:
    /// up to `limit` of them, and whether more follow. On DynamoDB an index serves it, so
    /// it may lag writes by a moment.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Other`].
    async fn list(&self, query: &ListQuery) -> Result<ListPage, StoreError>;

    /// Erases the prospect: it, its pointers and everything that names its address or fields
    /// go in one atomic write, which keeps only a suppression entry (the hash of its
    /// normalized address, the time, the reason `erased`). Returns its id, or `None` if the
    /// account has no such prospect.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Other`].
    async fn erase(&self, account: AccountId, prospect: &ProspectRef, now: OffsetDateTime) -> Result<Option<ProspectId>, StoreError>;
}

/// The campaign job queue.
#[async_trait]
pub trait JobQueue: Send + Sync {
    /// Publishes a job that becomes visible to the scheduler at `visible_at`, or earlier if
    /// the queue cannot delay that long (SQS: 15 minutes); the scheduler re-queues a job that
    /// arrives before its step is due.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Other`] when it was not accepted.
    async fn publish(&self, job: &CampaignJob, visible_at: OffsetDateTime) -> Result<(), StoreError>;

    /// Publishes several jobs, as few calls as the queue allows (SQS: one `SendMessageBatch`
    /// per 10). Returns one result per job, in order: a job may fail while others are taken.
    async fn publish_batch(&self, jobs: &[(CampaignJob, OffsetDateTime)]) -> Vec<Result<(), StoreError>> {
        let mut results = Vec::with_capacity(jobs.len());
        for (job, visible_at) in jobs {
            results.push(self.publish(job, *visible_at).await);
        }
        results
    }
}

/// Where a prospect is stored: its account, id and the hash of its normalized address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProspectKey {
    pub account: AccountId,
    pub prospect: ProspectId,
    pub email_hash: String,
}

/// A claim of one step's send, and everything it is conditional on: the prospect still `new`
/// with this enrollment active, and the campaign still at the sending version the scheduler
/// read. Stores check all of it in the one atomic write that takes the claim (DynamoDB: one
/// transaction with condition checks on the prospect and campaign items; SQLite: one
/// transaction), so a status change or a pause acknowledged before the claim stops the email.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    pub key: SendKey,
    pub account: AccountId,
    pub prospect: ProspectId,
    /// With `account`, the prospect's storage key.
    pub email_hash: String,
    /// The enrollment's sequence number: active while above the prospect's `ended_through`.
    pub enrollment_seq: u32,
    pub campaign: CampaignId,
    pub campaign_version: u64,
    /// This claim's owner: random per attempt.
    pub owner: ClaimOwner,
    /// Which attempt this is (0 for the first). A retry takes over a record in
    /// `retry_scheduled` for this attempt.
    pub attempt: u32,
    /// The claim whose attempt failed in a way that proved the email was not taken, named by
    /// the retry job that claim published: a retry may take over that claim even when
    /// recording `retry_scheduled` failed.
    pub retry_of: Option<ClaimOwner>,
    pub now: OffsetDateTime,
}

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimResult {
    /// This worker holds the claim (a new one, a retry's, or its own claim written twice).
    Won,
    /// The step is someone else's claim or already has an outcome: nothing was written.
    Taken(SendRecord),
    /// The prospect is gone, not `new`, or this enrollment ended: nothing was written.
    ProspectChanged,
    /// The campaign is gone or its sending state changed (paused, resumed, deactivated) since
    /// the version named: nothing was written.
    CampaignChanged,
}

/// The record of each (enrollment, step) send: what makes delivery at most once, and what
/// says where every step stands.
#[async_trait]
pub trait SendLog: Send + Sync {
    /// Claims a step's send with one atomic, conditional write (see [`ClaimRequest`]). A
    /// write retried after its answer was lost finds its own owner and wins.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Other`].
    async fn claim_send(&self, claim: &ClaimRequest) -> Result<ClaimResult, StoreError>;

    /// Moves a step still claimed by `owner` to `state`, and keeps the outcome (with the
    /// `subject` of the email rendered, if it was) with the
    /// prospect at `prospect` in the same write (see [`Prospect::progress`]). `false`
    /// (nothing written) when the record is no longer that owner's claim, e.g. a redelivery
    /// found its lease expired and recorded `unknown`.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Other`].
    async fn record_send(
        &self,
        prospect: &ProspectKey,
        key: SendKey,
        owner: ClaimOwner,
        state: &SendState,
        subject: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError>;

    /// The record of one step, if it was ever claimed.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Other`].
    async fn send_record(&self, key: SendKey) -> Result<Option<SendRecord>, StoreError>;

    /// How many of `campaign`'s sends are in each state, per step. An operator's read: on
    /// DynamoDB it scans the table.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Other`].
    async fn tally(&self, campaign: CampaignId) -> Result<SendTally, StoreError>;
}

/// What one piece of feedback does to its prospect, once the rule has been applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedbackChange {
    /// Sets the status, as a PATCH would (ending every enrollment in the same write, with
    /// the change and its reason in the status history).
    Status(ProspectStatus, StatusReason),
    /// A transient or undetermined bounce: recorded; the [`crate::domain::TRANSIENT_BOUNCE_LIMIT`]th
    /// within [`crate::domain::TRANSIENT_BOUNCE_WINDOW`] sets the status `bounced` (reason `bounce`)
    /// in the same write.
    TransientBounce,
}

/// One piece of feedback about one recipient, to apply once to its prospect.
#[derive(Debug, Clone)]
pub struct FeedbackWrite {
    /// The provider's id of the notification: with the prospect's address hash, what makes
    /// it apply once.
    pub feedback_id: String,
    /// The prospect, where its address (the recipient's, normalized) stores it. Nothing is
    /// written unless the prospect stored there is this one.
    pub prospect: ProspectKey,
    /// The feedback's kind ([`crate::domain::FeedbackKind::as_str`]).
    pub kind: &'static str,
    /// When the provider observed it.
    pub at: OffsetDateTime,
    pub change: FeedbackChange,
    pub now: OffsetDateTime,
}

/// What applying a piece of feedback did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedbackApplied {
    /// Recorded; the status set in the same write, if one was.
    Applied(Option<ProspectStatus>),
    /// This feedback (id, recipient) was applied before: nothing was written.
    Duplicate,
    /// No such prospect at that address (erased, never there, another address): nothing was
    /// written.
    Unmatched,
}

/// Feedback from mail providers: what ties it to a send, and its effect on the prospect.
#[async_trait]
pub trait FeedbackLog: Send + Sync {
    /// The prospect and step of the email the provider's message id was recorded for (a
    /// `sent` send record), if any.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Other`].
    async fn sent_email(&self, provider_message_id: &str) -> Result<Option<EmailReference>, StoreError>;

    /// Applies `write` once, in one atomic write: the record that it was applied and the
    /// change to the prospect.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Other`].
    async fn apply_feedback(&self, write: &FeedbackWrite) -> Result<FeedbackApplied, StoreError>;

    /// Records that the step's email was delivered at `at`; `false` when the step has no
    /// `sent` record.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Other`].
    async fn record_delivery(&self, send: SendKey, at: OffsetDateTime) -> Result<bool, StoreError>;
}

/// Webhook endpoints and the log of the events received through them.
#[async_trait]
pub trait IntegrationStore: Send + Sync {
    /// # Errors
    /// [`StoreError`] on a backend failure.
    async fn create_integration(&self, integration: &Integration) -> Result<(), StoreError>;
    /// # Errors
    /// [`StoreError`] on a backend failure.
    async fn find_integration(&self, id: &EndpointId) -> Result<Option<Integration>, StoreError>;
    /// An account's endpoints, oldest first.
    ///
    /// # Errors
    /// [`StoreError`] on a backend failure.
    async fn list_integrations(&self, account: AccountId) -> Result<Vec<Integration>, StoreError>;
    /// Deletes an endpoint of `account`; `false` when it has none of that id.
    ///
    /// # Errors
    /// [`StoreError`] on a backend failure.
    async fn delete_integration(&self, account: AccountId, id: &EndpointId) -> Result<bool, StoreError>;
    /// Whether the event (provider, account, event id) was taken before (recorded with a final
    /// [`crate::domain::EventOutcome`]) within the log's retention.
    ///
    /// # Errors
    /// [`StoreError`] on a backend failure.
    async fn event_taken(&self, provider: Provider, account: Option<AccountId>, event_id: &str) -> Result<bool, StoreError>;
    /// Appends `event` to the log (kept [`EVENT_RETENTION`]).
    ///
    /// # Errors
    /// [`StoreError`] on a backend failure.
    async fn record_event(&self, event: &ReceivedEvent) -> Result<(), StoreError>;
    /// The newest `limit` events of `account` (with `None`: those that named no account),
    /// newest first.
    ///
    /// # Errors
    /// [`StoreError`] on a backend failure.
    async fn list_events(&self, account: Option<AccountId>, limit: u32) -> Result<Vec<ReceivedEvent>, StoreError>;
}

/// How long a received event is kept, and recognised when delivered again (Stripe retries for
/// three days).
pub const EVENT_RETENTION: time::Duration = time::Duration::days(30);

/// A queue the process pulls due jobs from itself (the embedded store's), rather than one
/// that pushes them to a function (SQS).
#[async_trait]
pub trait PullQueue: Send + Sync {
    /// Takes up to `limit` jobs visible at `now` and hides them until `lease_until`, so a job
    /// whose worker dies is handed out again then.
    ///
    /// # Errors
    /// [`StoreError`] on a backend failure.
    async fn lease_due(&self, now: OffsetDateTime, lease_until: OffsetDateTime, limit: u32) -> Result<Vec<LeasedJob>, StoreError>;

    /// Removes a job that was handled.
    ///
    /// # Errors
    /// [`StoreError`] on a backend failure.
    async fn ack(&self, id: i64) -> Result<(), StoreError>;

    /// Moves a job that cannot be handled aside, with the reason.
    ///
    /// # Errors
    /// [`StoreError`] on a backend failure.
    async fn dead_letter(&self, id: i64, reason: String) -> Result<(), StoreError>;
}

/// A job taken from a [`PullQueue`], invisible to others until its lease ends.
#[derive(Debug, Clone)]
pub struct LeasedJob {
    pub id: i64,
    pub body: String,
    /// How many times it has been handed out, this time included.
    pub deliveries: u32,
}

/// Looking up keys for authentication.
#[async_trait]
pub trait KeyStore: Send + Sync {
    /// The key stored under this hash, revoked or not.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Other`].
    async fn find_key(&self, hash: &KeyHash) -> Result<Option<ApiKeyRecord>, StoreError>;

    /// Records that the key was used at `now`.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Other`].
    async fn touch_key(&self, hash: &KeyHash, now: OffsetDateTime) -> Result<(), StoreError>;
}

/// Responses kept under idempotency keys, per account, for [`crate::domain::IDEMPOTENCY_TTL`].
#[async_trait]
pub trait IdempotencyStore: Send + Sync {
    /// Takes the key for a request identified by `fingerprint`, unless it is held or done:
    /// one conditional write. A key whose response expired, or whose request has held it past
    /// [`crate::domain::IN_FLIGHT_LEASE`], is taken afresh.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Other`].
    async fn begin(
        &self,
        account: AccountId,
        key: &IdempotencyKey,
        fingerprint: &str,
        now: OffsetDateTime,
    ) -> Result<IdempotencyBegin, StoreError>;

    /// Keeps the response of the request that holds the key.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Other`].
    async fn finish(&self, account: AccountId, key: &IdempotencyKey, response: &StoredResponse, now: OffsetDateTime) -> Result<(), StoreError>;

    /// Frees the key after a request failed on our side, so a retry runs again.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Other`].
    async fn abandon(&self, account: AccountId, key: &IdempotencyKey) -> Result<(), StoreError>;
}

/// Per-key request rate limiting.
#[async_trait]
pub trait RateLimiter: Send + Sync {
    /// Counts one request of `key` against `limit` and decides.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Other`].
    async fn check(&self, key: KeyId, limit: RateLimit, now: OffsetDateTime) -> Result<RateDecision, StoreError>;
}

/// Reads campaigns: what the service needs of them to tell where an enrollment stands.
#[async_trait]
pub trait CampaignReader: Send + Sync {
    /// # Errors
    /// [`StoreError`] on a backend failure.
    async fn get_campaign(&self, id: CampaignId) -> Result<Option<Campaign>, StoreError>;
}

/// Accounts, keys and campaigns: what the `cadenhq` admin commands manage.
#[async_trait]
pub trait AdminStore: CampaignReader {
    /// # Errors
    /// [`StoreError`] on a backend failure.
    async fn create_account(&self, account: &Account) -> Result<(), StoreError>;
    /// # Errors
    /// [`StoreError`] on a backend failure.
    async fn get_account(&self, id: AccountId) -> Result<Option<Account>, StoreError>;
    /// Whether the store holds no account at all (a fresh install).
    ///
    /// # Errors
    /// [`StoreError`] on a backend failure.
    async fn is_empty(&self) -> Result<bool, StoreError>;
    /// # Errors
    /// [`StoreError`] on a backend failure.
    async fn create_key(&self, key: &ApiKeyRecord) -> Result<(), StoreError>;
    /// Marks a key revoked; `false` if there is no such key.
    ///
    /// # Errors
    /// [`StoreError`] on a backend failure.
    async fn revoke_key(&self, id: KeyId, now: OffsetDateTime) -> Result<bool, StoreError>;
    /// # Errors
    /// [`StoreError`] on a backend failure.
    async fn list_keys(&self, account: AccountId) -> Result<Vec<ApiKeyRecord>, StoreError>;
    /// Sets (or with `None` removes) a key's rate-limit override; `false` if there is no such
    /// key.
    ///
    /// # Errors
    /// [`StoreError`] on a backend failure.
    async fn set_rate_limit(&self, id: KeyId, limit: Option<RateLimit>) -> Result<bool, StoreError>;
    /// Stores a campaign, and makes it the account's default if `make_default`.
    ///
    /// # Errors
    /// [`StoreError`] on a backend failure.
    async fn create_campaign(&self, campaign: &Campaign, make_default: bool) -> Result<(), StoreError>;
    /// # Errors
    /// [`StoreError`] on a backend failure.
    async fn list_campaigns(&self, account: AccountId) -> Result<Vec<Campaign>, StoreError>;
    /// Replaces a campaign's stored state by `campaign` if its sending version is still
    /// `expected_version` (one conditional write); a campaign that is no longer active stops
    /// being its account's default. `false` when it changed meanwhile or does not exist.
    ///
    /// # Errors
    /// [`StoreError`] on a backend failure.
    async fn replace_campaign(&self, campaign: &Campaign, expected_version: u64) -> Result<bool, StoreError>;
    /// Every account, oldest first.
    ///
    /// # Errors
    /// [`StoreError`] on a backend failure.
    async fn list_accounts(&self) -> Result<Vec<Account>, StoreError>;
}

/// One rendered campaign email, ready for a mail provider.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OutgoingEmail {
    /// The recipient address, as the prospect gave it.
    pub to: String,
    /// The sender address (`From:`), from configuration.
    pub from: String,
    pub subject: String,
    /// Plain-text body (template variables inserted as is).
    pub text_body: String,
    /// HTML body (template variables HTML-escaped).
    pub html_body: String,
    /// The one-click unsubscribe URL. Every adapter sends it as the RFC 8058 headers
    /// `List-Unsubscribe: <URL>` and `List-Unsubscribe-Post: List-Unsubscribe=One-Click`.
    pub unsubscribe_url: String,
}

/// Why a mail provider did not take an email, by what its answer proves.
#[derive(Debug, thiserror::Error)]
pub enum MailError {
    /// The provider's answer proves it did not take the email (throttled, connection refused,
    /// a 4xx answer before acceptance, a message that could not be built): safe to retry.
    #[error("mail provider did not take the email")]
    NotAccepted(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The provider refused the recipient for good (5xx SMTP reply to RCPT, SES rejection of
    /// the address): the prospect is marked bounced.
    #[error("recipient rejected: {0}")]
    Rejected(String),
    /// The provider may have taken the email (a timeout or a dropped connection after the
    /// request was written, a 5xx answer): never resent automatically.
    #[error("mail provider outcome unknown")]
    Unknown(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// An email the provider took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// The provider's id of the message (SES `MessageId`, or the `Message-ID` header).
    pub message_id: String,
    /// Whether the mailer recorded the send itself, in the same transaction as the email (the
    /// embedded outbox), so the scheduler writes nothing more.
    pub recorded: bool,
}

/// Which claimed step an email is sent for: lets a mailer that shares the send log's store
/// record the send with the email, atomically, and every mailer name the step in the email
/// (its `Message-ID`, SES message tags) so that feedback about it finds its prospect.
#[derive(Debug, Clone, Copy)]
pub struct SendClaim {
    pub reference: EmailReference,
    pub owner: ClaimOwner,
    pub now: OffsetDateTime,
}

/// Sends campaign emails.
#[async_trait]
pub trait Mailer: Send + Sync {
    /// Sends one email, for the step `claim` holds.
    ///
    /// # Errors
    /// [`MailError::NotAccepted`] when a retry may send it, [`MailError::Rejected`] when the
    /// recipient address is refused for good, [`MailError::Unknown`] when it may have been sent.
    async fn send(&self, email: &OutgoingEmail, claim: &SendClaim) -> Result<Delivered, MailError>;
}
