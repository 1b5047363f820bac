//! Administration: accounts, keys, campaigns and webhook endpoints, as the `cadenhq` commands manage them on
//! either backend.

use crate::domain::{
    Account, AccountId, ApiKey, ApiKeyRecord, Campaign, CampaignDefinition, CampaignId, Clock, EndpointId, Integration, Provider, ReceivedEvent,
    SendingChange, SigningSecret, EVENTS_LISTED_MAX,
};
use crate::ports::{AdminStore, IntegrationStore, StoreError};

/// Why an admin command failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("no account {0}")]
    UnknownAccount(AccountId),
    #[error("no campaign {0}")]
    UnknownCampaign(CampaignId),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Creates an account.
///
/// # Errors
/// [`AdminError::Invalid`] for a blank or over-long name; storage errors.
pub async fn create_account(store: &dyn AdminStore, name: &str, clock: &dyn Clock) -> Result<Account, AdminError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 255 {
        return Err(AdminError::Invalid("account name must be 1 to 255 characters".into()));
    }
    let account = Account { id: AccountId::new(), name: name.to_owned(), default_campaign_id: None, created_at: clock.now() };
    store.create_account(&account).await?;
    Ok(account)
}

/// How many times a campaign change re-reads after another change won the race.
const CAMPAIGN_CHANGE_ATTEMPTS: usize = 5;

/// Pauses, resumes or deactivates a campaign: one conditional write on the campaign's sending
/// version, re-read and retried if another change won. Pausing stops every running enrollment
/// from sending; resuming continues each from its next step, due no earlier than the resume
/// time plus the time it had left; deactivating ends them and takes no new enrollments.
///
/// # Errors
/// [`AdminError::UnknownCampaign`]; [`AdminError::Invalid`] when the change does not apply
/// (e.g. pausing a paused campaign); storage errors.
pub async fn change_campaign_sending(
    store: &dyn AdminStore,
    id: CampaignId,
    change: SendingChange,
    clock: &dyn Clock,
) -> Result<Campaign, AdminError> {
    for _ in 0..CAMPAIGN_CHANGE_ATTEMPTS {
        let mut campaign = store.get_campaign(id).await?.ok_or(AdminError::UnknownCampaign(id))?;
        let expected = campaign.sending_version;
        campaign.apply(change, clock.now()).map_err(|e| AdminError::Invalid(e.to_string()))?;
        if store.replace_campaign(&campaign, expected).await? {
            return Ok(campaign);
        }
    }
    Err(AdminError::Invalid(format!("campaign {id} kept changing; try again")))
}

async fn existing_account(store: &dyn AdminStore, id: AccountId) -> Result<Account, AdminError> {
    store.get_account(id).await?.ok_or(AdminError::UnknownAccount(id))
}

/// Every account, oldest first, with its keys.
///
/// # Errors
/// Storage errors.
pub async fn list_accounts(store: &dyn AdminStore) -> Result<Vec<(Account, Vec<ApiKeyRecord>)>, AdminError> {
    let mut listed = Vec::new();
    for account in store.list_accounts().await? {
        let keys = store.list_keys(account.id).await?;
        listed.push((account, keys));
    }
    Ok(listed)
}

/// An account's keys, oldest first.
///
/// # Errors
/// [`AdminError::UnknownAccount`]; storage errors.
pub async fn list_keys(store: &dyn AdminStore, account: AccountId) -> Result<Vec<ApiKeyRecord>, AdminError> {
    existing_account(store, account).await?;
    Ok(store.list_keys(account).await?)
}

/// An account and its campaigns, oldest first.
///
/// # Errors
/// [`AdminError::UnknownAccount`]; storage errors.
pub async fn list_campaigns(store: &dyn AdminStore, account: AccountId) -> Result<(Account, Vec<Campaign>), AdminError> {
    let account = existing_account(store, account).await?;
    let campaigns = store.list_campaigns(account.id).await?;
    Ok((account, campaigns))
}

/// A campaign, and whether it is its account's default.
///
/// # Errors
/// [`AdminError::UnknownCampaign`]; storage errors.
pub async fn campaign(store: &dyn AdminStore, id: CampaignId) -> Result<(Campaign, bool), AdminError> {
    let campaign = store.get_campaign(id).await?.ok_or(AdminError::UnknownCampaign(id))?;
    let is_default = store.get_account(campaign.account_id).await?.and_then(|a| a.default_campaign_id) == Some(id);
    Ok((campaign, is_default))
}

/// Creates a key for an account. The returned [`ApiKey`] is the only copy of the secret.
///
/// # Errors
/// [`AdminError::UnknownAccount`]; storage errors.
pub async fn create_key(
    store: &dyn AdminStore,
    account: AccountId,
    label: Option<String>,
    clock: &dyn Clock,
) -> Result<(ApiKeyRecord, ApiKey), AdminError> {
    existing_account(store, account).await?;
    if label.as_ref().is_some_and(|l| l.chars().count() > 255) {
        return Err(AdminError::Invalid("label must be at most 255 characters".into()));
    }
    let key = ApiKey::generate();
    let record = ApiKeyRecord::new(&key, account, label, clock.now());
    store.create_key(&record).await?;
    Ok((record, key))
}

/// Creates a campaign from a definition, optionally as the account's default.
///
/// # Errors
/// [`AdminError::UnknownAccount`]; storage errors.
pub async fn create_campaign(
    store: &dyn AdminStore,
    account: AccountId,
    definition: CampaignDefinition,
    make_default: bool,
    clock: &dyn Clock,
) -> Result<Campaign, AdminError> {
    existing_account(store, account).await?;
    let campaign = Campaign::new(account, definition, clock.now());
    store.create_campaign(&campaign, make_default).await?;
    Ok(campaign)
}

/// The campaign a fresh install starts with.
pub const DEMO_CAMPAIGN: &str = r#"{
  "name": "Welcome series",
  "steps": [
    {"delay_seconds": 0, "subject": "Welcome, {{first_name}}!", "body": "Hi {{first_name}}, thanks for your interest."},
    {"delay_seconds": 172800, "subject": "Getting started", "body": "Here is how teams get value in their first week."},
    {"delay_seconds": 432000, "subject": "Still curious?", "body": "Reply to this email and we will set up a call."}
  ]
}"#;

/// What a first start created.
#[derive(Debug)]
pub struct Demo {
    pub account: Account,
    pub campaign: Campaign,
    pub key: ApiKey,
}

/// On an empty store, creates a demo account with a default campaign and a key.
///
/// # Errors
/// Storage errors.
pub async fn bootstrap_demo(store: &dyn AdminStore, clock: &dyn Clock) -> Result<Option<Demo>, AdminError> {
    if !store.is_empty().await? {
        return Ok(None);
    }
    let account = create_account(store, "Demo account", clock).await?;
    let definition = CampaignDefinition::parse(DEMO_CAMPAIGN).map_err(|e| AdminError::Invalid(e.to_string()))?;
    let campaign = create_campaign(store, account.id, definition, true, clock).await?;
    let (_, key) = create_key(store, account.id, Some("demo".into()), clock).await?;
    Ok(Some(Demo { account: Account { default_campaign_id: Some(campaign.id), ..account }, campaign, key }))
}

/// Creates a webhook endpoint of `account` for `provider`, with the provider's signing secret
/// (for SendGrid, its public verification key).
///
/// # Errors
/// [`AdminError::UnknownAccount`]; [`AdminError::Invalid`] for a secret not of the provider's
/// shape (the message never repeats it); storage errors.
pub async fn create_integration(
    store: &dyn AdminStore,
    integrations: &dyn IntegrationStore,
    account: AccountId,
    provider: Provider,
    secret: &str,
    clock: &dyn Clock,
) -> Result<Integration, AdminError> {
    existing_account(store, account).await?;
    let secret = SigningSecret::parse(provider, secret).map_err(|e| AdminError::Invalid(e.to_string()))?;
    let integration = Integration { id: EndpointId::new(), account_id: account, provider, secret, created_at: clock.now() };
    integrations.create_integration(&integration).await?;
    Ok(integration)
}

/// An account's webhook endpoints.
///
/// # Errors
/// [`AdminError::UnknownAccount`]; storage errors.
pub async fn list_integrations(store: &dyn AdminStore, integrations: &dyn IntegrationStore, account: AccountId) -> Result<Vec<Integration>, AdminError> {
    existing_account(store, account).await?;
    Ok(integrations.list_integrations(account).await?)
}

/// The newest events received for `account` (with `None`: those of `POST /webhooks/ses` that
/// named no account), newest first.
///
/// # Errors
/// [`AdminError::UnknownAccount`]; [`AdminError::Invalid`] for a limit out of range; storage
/// errors.
pub async fn list_events(
    store: &dyn AdminStore,
    integrations: &dyn IntegrationStore,
    account: Option<AccountId>,
    limit: u32,
) -> Result<Vec<ReceivedEvent>, AdminError> {
    if let Some(account) = account {
        existing_account(store, account).await?;
    }
    if !(1..=EVENTS_LISTED_MAX).contains(&limit) {
        return Err(AdminError::Invalid(format!("the limit must be 1 to {EVENTS_LISTED_MAX}")));
    }
    Ok(integrations.list_events(account, limit).await?)
}
