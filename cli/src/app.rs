//! What each command does, over whichever backend was chosen.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use shared::adapters::sqlite::SqliteStore;
use shared::admin::{self, AdminError};
use shared::backend::Backend;
use shared::config::{aws_sdk_config, unsubscribe_secret_from_aws, ConfigError, TableConfig, QUEUE_URL, SENDER, UNSUBSCRIBE_SECRET, UNSUBSCRIBE_SECRET_ARN};
use shared::domain::{
    sample_prospect, Account, ApiKeyRecord, SendRecord, SendTally, Campaign, CampaignDefinition, ExternalId, NormalizedEmail, Prospect, RateLimit, SendingChange, SystemClock,
    UnsubscribeSecret,
};
use shared::ports::{ProspectRef, StoreError};
use shared::scheduler::DeliverySettings;
use shared::telemetry::error_chain as chain;

use crate::args::{AccountsCommand, BackendKind, CampaignsCommand, Cli, Command, IntegrationsCommand, KeysCommand, OutboxCommand, PreviewSelector, ProspectsCommand};
use crate::output;
use crate::serve::{serve, Serve};

/// Why a command failed; printed as one line.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Admin(#[from] AdminError),
    #[error("{}", chain(.0))]
    Store(#[from] StoreError),
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Invoke(#[from] crate::invoke::InvokeError),
    /// A command that only reads found no store to read.
    #[error("no store in {}: `cadenhq serve` or `cadenhq accounts create` creates one (or give --data-dir)", .0.display())]
    NoStore(PathBuf),
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
}

impl AppError {
    /// Whether the command stopped because the reader of its output went away.
    pub fn is_closed_output(&self) -> bool {
        match self {
            Self::Output(e) | Self::Invoke(crate::invoke::InvokeError::Output(e)) => output::is_closed(e),
            _ => false,
        }
    }
}

/// The backend the command works on. On the embedded store only `creates` may create it; any
/// other command finds one there or says there is none.
async fn open_backend(cli: &Cli, creates: bool) -> Result<Backend, AppError> {
    match cli.backend {
        BackendKind::Embedded if creates => Ok(Backend::embedded(&cli.data_dir)?),
        BackendKind::Embedded => {
            let store = SqliteStore::open_existing(&cli.data_dir)?.ok_or_else(|| AppError::NoStore(cli.data_dir.clone()))?;
            Ok(Backend::from_embedded(&store))
        }
        BackendKind::Aws => {
            let table = TableConfig::from_env()?;
            let queue = std::env::var(QUEUE_URL).ok().filter(|q| !q.is_empty());
            Ok(Backend::aws(&aws_sdk_config().await, &table.table_name, queue.as_deref()))
        }
    }
}

/// The embedded store whose outbox the outbox commands read; never created by them.
fn outbox_store(cli: &Cli) -> Result<SqliteStore, AppError> {
    let BackendKind::Embedded = cli.backend else {
        return Err(AppError::Usage("the outbox belongs to the embedded store; on AWS, emails go through SES".into()));
    };
    SqliteStore::open_existing(&cli.data_dir)?.ok_or_else(|| AppError::NoStore(cli.data_dir.clone()))
}

/// Prints `value` as JSON, or `text` for people.
fn emit(json_output: bool, value: &Value, text: &str) -> Result<(), AppError> {
    if json_output {
        output::line(value)?;
    } else {
        output::line(text)?;
    }
    Ok(())
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// `n` and the noun, singular for one: "1 step", "3 steps".
fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// Runs one command.
///
/// # Errors
/// [`AppError`] describing what went wrong, for a one-line message.
pub async fn run(cli: Cli) -> Result<(), AppError> {
    match &cli.command {
        Command::Invoke(args) => return Ok(crate::invoke::run(args, cli.json).await?),
        Command::Serve { addr, public_url } => {
            let options = Serve { backend: cli.backend, data_dir: &cli.data_dir, addr, public_url: public_url.clone(), json: cli.json };
            return serve(options).await;
        }
        _ => {}
    }
    let creates = matches!(cli.command, Command::Accounts(AccountsCommand::Create { .. }));
    let backend = open_backend(&cli, creates).await?;
    let clock = SystemClock;
    let store = backend.admin.as_ref();
    let j = cli.json;
    match cli.command {
        Command::Invoke(_) | Command::Serve { .. } => unreachable!("handled before a backend is opened"),
        Command::Outbox(OutboxCommand::Show { id, raw }) => {
            let entry = outbox_store(&cli)?.outbox_entry(id).await?.ok_or_else(|| AppError::Usage(format!("no email #{id} in the outbox")))?;
            if raw {
                let mime = entry.raw.as_deref().ok_or_else(|| AppError::Usage(format!("email #{id} was stored before messages were kept whole")))?;
                output::raw(mime)?;
            } else {
                let headers = entry.headers.iter().map(|(n, v)| format!("{n}: {v}")).collect::<Vec<_>>().join("\n");
                emit(j, &json!(entry), &format!("{headers}\n\n{}", entry.email.text_body))?;
            }
        }
        Command::Outbox(OutboxCommand::List) => {
            let entries = outbox_store(&cli)?.outbox().await?;
            let text = entries
                .iter()
                .map(|e| format!("#{}  {}  to {}  \"{}\"", e.id, e.queued_at, e.email.to, e.email.subject))
                .collect::<Vec<_>>()
                .join("\n");
            emit(j, &json!({ "emails": entries }), if entries.is_empty() { "The outbox is empty." } else { &text })?;
        }
        Command::Accounts(AccountsCommand::Create { name }) => {
            let account = admin::create_account(store, &name, &clock).await?;
            emit(j, &json!({ "account_id": account.id, "name": account.name }), &format!("Created account {} ({})", account.id, account.name))?;
        }
        Command::Accounts(AccountsCommand::List) => {
            let accounts = admin::list_accounts(store).await?;
            let text = accounts.iter().map(|(a, keys)| account_line(a, keys)).collect::<Vec<_>>().join("\n");
            let list: Vec<Value> = accounts.iter().map(|(a, keys)| account_json(a, keys)).collect();
            emit(j, &json!({ "accounts": list }), if accounts.is_empty() { "No accounts." } else { &text })?;
        }
        Command::Integrations(IntegrationsCommand::Create { account, provider, secret, public_url }) => {
            let integration = admin::create_integration(store, backend.integrations.as_ref(), account, provider.into(), &secret, &clock).await?;
            let base = public_url.as_deref().unwrap_or(crate::serve::DEFAULT_PUBLIC_URL).trim_end_matches('/');
            let url = format!("{base}/webhooks/{}/{}", integration.provider, integration.id);
            emit(
                j,
                &json!({ "endpoint_id": integration.id, "account_id": account, "provider": integration.provider, "url": url }),
                &format!(
                    "Created {} endpoint {} for account {account}\n\n    {url}\n\nPaste this URL into the provider's webhook settings.",
                    integration.provider, integration.id
                ),
            )?;
        }
        Command::Integrations(IntegrationsCommand::List { account }) => {
            let integrations = admin::list_integrations(store, backend.integrations.as_ref(), account).await?;
            let text = integrations
                .iter()
                .map(|i| format!("{}  {:<8}  created {}  secret {}", i.id, i.provider.as_str(), rfc3339(i.created_at), i.secret.hint()))
                .collect::<Vec<_>>()
                .join("\n");
            let list: Vec<Value> = integrations
                .iter()
                .map(|i| json!({ "endpoint_id": i.id, "provider": i.provider, "created_at": rfc3339(i.created_at), "secret_hint": i.secret.hint() }))
                .collect();
            emit(j, &json!({ "account_id": account, "integrations": list }), if integrations.is_empty() { "No endpoints." } else { &text })?;
        }
        Command::Integrations(IntegrationsCommand::Delete { endpoint_id, account }) => {
            if !backend.integrations.delete_integration(account, &endpoint_id).await? {
                return Err(AppError::Usage(format!("account {account} has no endpoint {endpoint_id}")));
            }
            emit(j, &json!({ "endpoint_id": endpoint_id, "deleted": true }), &format!("Deleted endpoint {endpoint_id}"))?;
        }
        Command::Integrations(IntegrationsCommand::Events { account, limit }) => {
            let events = admin::list_events(store, backend.integrations.as_ref(), account, limit).await?;
            let text = events
                .iter()
                .map(|e| {
                    let id = if e.event_id.is_empty() { "-" } else { &e.event_id };
                    let kind = if e.event_type.is_empty() { "-" } else { &e.event_type };
                    format!("{}  {:<8}  {:<9}  {kind}  {id}", rfc3339(e.received_at), e.provider.as_str(), e.outcome.as_str())
                })
                .collect::<Vec<_>>()
                .join("\n");
            emit(j, &json!({ "account_id": account, "events": events }), if events.is_empty() { "No events received." } else { &text })?;
        }
        Command::Keys(KeysCommand::Create { account, label }) => {
            let (record, key) = admin::create_key(store, account, label, &clock).await?;
            emit(
                j,
                &json!({ "key_id": record.key_id, "account_id": record.account_id, "key": key.expose(), "label": record.label }),
                &format!("Created key {} for account {}\n\n    {}\n\nStore it now: it is shown only once.", record.key_id, account, key.expose()),
            )?;
        }
        Command::Keys(KeysCommand::Revoke { key_id }) => {
            if !store.revoke_key(key_id, time::OffsetDateTime::now_utc()).await? {
                return Err(AppError::Usage(format!("no key {key_id}")));
            }
            emit(j, &json!({ "key_id": key_id, "revoked": true }), &format!("Revoked key {key_id}"))?;
        }
        Command::Keys(KeysCommand::Limit { key_id, rate, burst, .. }) => {
            let limit = match (rate, burst) {
                (Some(rate), Some(burst)) => Some(RateLimit::new(rate, burst).map_err(AppError::Usage)?),
                _ => None,
            };
            if !store.set_rate_limit(key_id, limit).await? {
                return Err(AppError::Usage(format!("no key {key_id}")));
            }
            let effective = limit.unwrap_or(RateLimit::DEFAULT);
            emit(
                j,
                &json!({ "key_id": key_id, "rate_limit": effective, "default": limit.is_none() }),
                &format!("Key {key_id}: {} requests/s, bursts of {}", effective.per_second, effective.burst),
            )?;
        }
        Command::Keys(KeysCommand::List { account }) => {
            let keys = admin::list_keys(store, account).await?;
            let text = keys.iter().map(key_line).collect::<Vec<_>>().join("\n");
            emit(j, &json!({ "account_id": account, "keys": keys.iter().map(key_json).collect::<Vec<_>>() }), if keys.is_empty() { "No keys." } else { &text })?;
        }
        Command::Campaigns(CampaignsCommand::Create { account, file, default }) => {
            let text = std::fs::read_to_string(&file).map_err(|e| AppError::Usage(format!("cannot read {}: {e}", file.display())))?;
            let definition = CampaignDefinition::parse(&text).map_err(|e| AppError::Usage(format!("{}: {e}", file.display())))?;
            let campaign = admin::create_campaign(store, account, definition, default, &clock).await?;
            emit(
                j,
                &campaign_json(&campaign, default),
                &format!(
                    "Created campaign {} ({}, {}){}",
                    campaign.id,
                    campaign.name,
                    count(campaign.steps.len(), "step"),
                    if default { ", the account's default" } else { "" }
                ),
            )?;
        }
        Command::Campaigns(CampaignsCommand::List { account }) => {
            let (account, campaigns) = admin::list_campaigns(store, account).await?;
            let default = account.default_campaign_id;
            let text = campaigns
                .iter()
                .map(|c| format!("{}  {}  {}  {}{}", c.id, state(c), count(c.steps.len(), "step"), c.name, if Some(c.id) == default { "  (default)" } else { "" }))
                .collect::<Vec<_>>()
                .join("\n");
            let list: Vec<Value> = campaigns.iter().map(|c| campaign_json(c, Some(c.id) == default)).collect();
            emit(j, &json!({ "account_id": account.id, "campaigns": list }), if campaigns.is_empty() { "No campaigns." } else { &text })?;
        }
        Command::Campaigns(CampaignsCommand::Show { id }) => {
            let (campaign, is_default) = admin::campaign(store, id).await?;
            let tally = backend.sends.tally(id).await?;
            let mut value = campaign_json(&campaign, is_default);
            value["sends"] = (0..campaign.steps.len())
                .filter_map(|s| u32::try_from(s).ok())
                .map(|step| {
                    let mut counts: serde_json::Map<String, Value> = tally.of_step(step).map(|(state, n)| (state.to_owned(), n.into())).collect();
                    counts.insert("step".into(), (step + 1).into());
                    Value::Object(counts)
                })
                .collect();
            emit(j, &value, &campaign_text(&campaign, is_default, &tally))?;
        }
        Command::Campaigns(CampaignsCommand::Preview { id, by, public_url }) => {
            let (campaign, _) = admin::campaign(store, id).await?;
            let (prospect, sample) = preview_prospect(&backend, &campaign, by).await?;
            let (secret, placeholder) = preview_secret(cli.backend, &cli.data_dir).await?;
            let settings = DeliverySettings {
                sender: std::env::var(SENDER).unwrap_or_else(|_| crate::serve::DEFAULT_SENDER.to_owned()),
                public_url: public_url.unwrap_or_else(|| crate::serve::DEFAULT_PUBLIC_URL.to_owned()),
                unsubscribe_secret: secret,
            };
            preview(j, &campaign, (&prospect, sample), &settings, placeholder)?;
        }
        Command::Campaigns(CampaignsCommand::Deactivate { id }) => {
            let campaign = admin::change_campaign_sending(store, id, SendingChange::Deactivate, &clock).await?;
            emit(j, &campaign_json(&campaign, false), &format!("Deactivated campaign {id}: its enrollments end"))?;
        }
        Command::Campaigns(CampaignsCommand::Pause { id }) => {
            let campaign = admin::change_campaign_sending(store, id, SendingChange::Pause, &clock).await?;
            emit(j, &campaign_json(&campaign, false), &format!("Paused campaign {id}: nothing is sent until it is resumed"))?;
        }
        Command::Campaigns(CampaignsCommand::Resume { id }) => {
            let campaign = admin::change_campaign_sending(store, id, SendingChange::Resume, &clock).await?;
            emit(j, &campaign_json(&campaign, false), &format!("Resumed campaign {id}: each enrollment continues from its next step"))?;
        }
        Command::Prospects(ProspectsCommand::List { account, status, limit, cursor }) => {
            let mut query = vec![format!("limit={limit}")];
            query.extend(status.map(|s| format!("status={s}")));
            query.extend(cursor.map(|c| format!("cursor={c}")));
            let service = backend.service(std::sync::Arc::new(clock));
            let page = shared::http::list_page(&service, account, &query.join("&")).await.map_err(|e| AppError::Usage(e.to_string()))?;
            let lines: Vec<String> = page["data"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| format!("{}  {}  {}  created {}", p["id"].as_str().unwrap_or_default(), p["email"].as_str().unwrap_or_default(), p["status"].as_str().unwrap_or_default(), p["created_at"].as_str().unwrap_or_default()))
                .collect();
            let mut text = if lines.is_empty() { "No prospects.".to_owned() } else { lines.join("\n") };
            if let Some(next) = page["next_cursor"].as_str() {
                text.push_str(&format!("\nMore: --cursor {next}"));
            }
            emit(j, &page, &text)?;
        }
        Command::Prospects(ProspectsCommand::Export { account, id }) => {
            let service = backend.service(std::sync::Arc::new(clock));
            let view = service.get(account, &ProspectRef::Id(id)).await.map_err(|e| AppError::Usage(service_error(&e)))?;
            let value = serde_json::to_value(shared::http::ProspectExport::from(&view)).map_err(|e| AppError::Usage(e.to_string()))?;
            output::line(&value)?;
        }
        Command::Prospects(ProspectsCommand::Erase { account, by }) => {
            let service = backend.service(std::sync::Arc::new(clock));
            let id = service.erase(account, &prospect_ref(by)?).await.map_err(|e| AppError::Usage(service_error(&e)))?;
            emit(j, &json!({ "erased": true, "prospect_id": id }), &format!("Erased prospect {id}: only a suppression entry of its address's hash is kept"))?;
        }
        Command::Prospects(ProspectsCommand::Show { account, by, steps }) => {
            let reference = prospect_ref(by)?;
            let service = backend.service(std::sync::Arc::new(clock));
            let view = service.get(account, &reference).await.map_err(|e| AppError::Usage(service_error(&e)))?;
            let mut value = serde_json::to_value(shared::http::ProspectResource::from(&view)).map_err(|e| AppError::Usage(e.to_string()))?;
            if steps {
                let records = backend.send_records(&view.prospect).await?;
                for (enrollment, records) in value["enrollments"].as_array_mut().into_iter().flatten().zip(&records) {
                    enrollment["steps"] = records.iter().enumerate().map(step_json).collect();
                }
            }
            let text = serde_json::to_string_pretty(&value).unwrap_or_default();
            emit(j, &value, &text)?;
        }
    }
    Ok(())
}

/// A campaign's state, padded to one width for the text listings.
fn state(c: &Campaign) -> String {
    format!("{:<8}", c.state().as_str())
}

fn account_json(a: &Account, keys: &[ApiKeyRecord]) -> Value {
    json!({
        "account_id": a.id, "name": a.name, "created_at": rfc3339(a.created_at),
        "default_campaign_id": a.default_campaign_id, "keys": keys.len(),
        "active_keys": keys.iter().filter(|k| k.is_active()).count(),
    })
}

fn account_line(a: &Account, keys: &[ApiKeyRecord]) -> String {
    let active = keys.iter().filter(|k| k.is_active()).count();
    format!("{}  {}  created {}  {} ({active} active)", a.id, a.name, rfc3339(a.created_at), count(keys.len(), "key"))
}

fn key_json(k: &ApiKeyRecord) -> Value {
    json!({
        "key_id": k.key_id, "account_id": k.account_id, "label": k.label, "prefix": k.prefix,
        "created_at": rfc3339(k.created_at), "revoked_at": k.revoked_at.map(rfc3339), "active": k.is_active(),
        "last_used_at": k.last_used_at.map(rfc3339), "rate_limit": k.effective_rate_limit(),
    })
}

fn key_line(k: &ApiKeyRecord) -> String {
    let limit = k.effective_rate_limit();
    format!(
        "{}  {}…  {}  {}/s, bursts of {}{}  created {}  last used {}{}",
        k.key_id,
        k.prefix,
        k.label.as_deref().unwrap_or("-"),
        limit.per_second,
        limit.burst,
        if k.rate_limit.is_none() { " (default)" } else { "" },
        rfc3339(k.created_at),
        k.last_used_at.map_or_else(|| "never".to_owned(), rfc3339),
        k.revoked_at.map(|t| format!("  revoked {}", rfc3339(t))).unwrap_or_default()
    )
}

fn campaign_json(c: &Campaign, is_default: bool) -> Value {
    json!({
        "campaign_id": c.id, "account_id": c.account_id, "name": c.name, "active": c.active, "state": c.state().as_str(),
        "default": is_default, "steps": c.steps, "created_at": rfc3339(c.created_at),
    })
}

/// When a step is sent, for people: "on enrollment", "2 days after the previous step".
fn timing(step: usize, delay_seconds: u64) -> String {
    let after = if step == 0 { "enrollment" } else { "the previous step" };
    if delay_seconds == 0 {
        return if step == 0 { "on enrollment".to_owned() } else { "right after the previous step".to_owned() };
    }
    let parts: Vec<String> = [(delay_seconds / 86_400, "day"), (delay_seconds % 86_400 / 3600, "hour"), (delay_seconds % 3600 / 60, "minute"), (delay_seconds % 60, "second")]
        .into_iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, unit)| count(usize::try_from(n).unwrap_or(usize::MAX), unit))
        .collect();
    format!("{} after {after}", parts.join(" "))
}

fn campaign_text(c: &Campaign, is_default: bool, tally: &SendTally) -> String {
    let mut text = format!(
        "Campaign {}  {}\n{}{}, account {}, created {}, {}",
        c.id,
        c.name,
        state(c).trim_end(),
        if is_default { ", the account's default" } else { "" },
        c.account_id,
        rfc3339(c.created_at),
        count(c.steps.len(), "step"),
    );
    for (i, step) in c.steps.iter().enumerate() {
        text.push_str(&format!("\n\nStep {}, {}\n  Subject: {}\n  Body:", i + 1, timing(i, step.delay_seconds), step.subject));
        for line in step.body.lines() {
            text.push_str(&format!("\n    {line}"));
        }
        let counts: Vec<String> = u32::try_from(i)
            .map(|step| tally.of_step(step).filter(|(_, n)| *n > 0).map(|(state, n)| format!("{n} {}", state.replace('_', " "))).collect())
            .unwrap_or_default();
        text.push_str(&format!("\n  Sends: {}", if counts.is_empty() { "none yet".to_owned() } else { counts.join(", ") }));
    }
    text
}

/// The prospect a preview renders for: one of the campaign's account, or the sample (`true`).
async fn preview_prospect(backend: &Backend, campaign: &Campaign, by: PreviewSelector) -> Result<(Prospect, bool), AppError> {
    let reference = match (by.prospect_id, by.email) {
        (Some(id), _) => ProspectRef::Id(id),
        (None, Some(email)) => ProspectRef::Email(NormalizedEmail::parse(&email).map_err(|e| AppError::Usage(e.to_string()))?),
        (None, None) => return Ok((sample_prospect(campaign.account_id), true)),
    };
    let found = backend.repo.find(campaign.account_id, &reference).await?;
    let prospect = found.ok_or_else(|| AppError::Usage(format!("no such prospect in account {}, the campaign's", campaign.account_id)))?;
    Ok((prospect, false))
}

/// The secret the sender signs unsubscribe links with, read without creating anything; when
/// none is configured yet, a placeholder (`true`) so the preview still shows the link's shape.
async fn preview_secret(backend: BackendKind, data_dir: &Path) -> Result<(UnsubscribeSecret, bool), AppError> {
    if let Ok(value) = std::env::var(UNSUBSCRIBE_SECRET) {
        return Ok((UnsubscribeSecret::new(value.into_bytes()).map_err(|e| AppError::Usage(format!("{UNSUBSCRIBE_SECRET}: {e}")))?, false));
    }
    let configured = match backend {
        BackendKind::Embedded => crate::serve::stored_secret(data_dir)?,
        BackendKind::Aws if std::env::var(UNSUBSCRIBE_SECRET_ARN).is_ok_and(|v| !v.is_empty()) => {
            Some(unsubscribe_secret_from_aws(&aws_sdk_config().await).await?)
        }
        BackendKind::Aws => None,
    };
    match configured {
        Some(secret) => Ok((secret, false)),
        None => {
            let placeholder = UnsubscribeSecret::new(vec![b'0'; 32]).map_err(|e| AppError::Usage(e.to_string()))?;
            Ok((placeholder, true))
        }
    }
}

/// Prints every step of `campaign` rendered for `prospect` as the sender renders it.
///
/// # Errors
/// [`AppError::Usage`] naming the first step that cannot be rendered for this prospect, after
/// printing every step (those with the reason they cannot be sent).
fn preview(j: bool, campaign: &Campaign, (prospect, sample): (&Prospect, bool), settings: &DeliverySettings, placeholder: bool) -> Result<(), AppError> {
    let unsubscribe_url = settings.unsubscribe_url(prospect);
    let rendered: Vec<_> = campaign.steps.iter().map(|step| step.render(prospect, &unsubscribe_url)).collect();
    let steps: Vec<Value> = campaign
        .steps
        .iter()
        .zip(&rendered)
        .enumerate()
        .map(|(i, (step, email))| match email {
            Ok(email) => json!({
                "step": i + 1, "delay_seconds": step.delay_seconds, "subject": email.subject,
                "text_body": email.text_body, "html_body": email.html_body,
            }),
            Err(e) => json!({ "step": i + 1, "delay_seconds": step.delay_seconds, "error": e.to_string() }),
        })
        .collect();
    let value = json!({
        "campaign_id": campaign.id, "prospect_id": if sample { Value::Null } else { json!(prospect.id) }, "sample": sample,
        "from": settings.sender, "to": prospect.email.original(), "unsubscribe_url": unsubscribe_url,
        "placeholder_secret": placeholder, "steps": steps,
    });
    let mut text = format!(
        "Preview of campaign {} ({}) for {}; nothing is sent or recorded.\nFrom: {}\nTo: {}\nUnsubscribe: {unsubscribe_url}{}",
        campaign.id,
        campaign.name,
        if sample { "a sample prospect with every variable set".to_owned() } else { format!("prospect {}", prospect.id) },
        settings.sender,
        prospect.email.original(),
        if placeholder { "\n(no unsubscribe secret is configured yet: the link's token is a placeholder)" } else { "" },
    );
    for (i, (step, email)) in campaign.steps.iter().zip(&rendered).enumerate() {
        text.push_str(&format!("\n\n== Step {}, {} ==\n", i + 1, timing(i, step.delay_seconds)));
        match email {
            Ok(email) => text.push_str(&format!("Subject: {}\n\n-- text --\n{}\n-- html --\n{}", email.subject, email.text_body.trim_end(), email.html_body)),
            Err(e) => text.push_str(&format!("cannot be rendered, so it would not be sent: {e}")),
        }
    }
    emit(j, &value, &text)?;
    match rendered.iter().enumerate().find_map(|(i, r)| r.as_ref().err().map(|e| (i, e))) {
        Some((i, e)) => Err(AppError::Usage(format!("step {} cannot be rendered for this prospect: {e}", i + 1))),
        None => Ok(()),
    }
}

/// One step's send record, as `prospects show --steps` prints it (numbered from 1).
fn step_json((i, record): (usize, &Option<SendRecord>)) -> Value {
    match record {
        None => json!({ "step": i + 1, "state": "pending" }),
        Some(r) => json!({
            "step": i + 1, "state": r.state.name(), "detail": r.state.detail(), "attempts": r.attempts,
            "claimed_at": rfc3339(r.claimed_at), "updated_at": rfc3339(r.updated_at),
        }),
    }
}

/// The prospect a selector names.
fn prospect_ref(by: crate::args::ProspectSelector) -> Result<ProspectRef, AppError> {
    Ok(if let Some(id) = by.id {
        ProspectRef::Id(id)
    } else if let Some(email) = by.email {
        ProspectRef::Email(NormalizedEmail::parse(&email).map_err(|e| AppError::Usage(e.to_string()))?)
    } else {
        let raw = by.external_id.unwrap_or_default();
        ProspectRef::ExternalId(ExternalId::parse(&raw).map_err(|e| AppError::Usage(e.to_string()))?)
    })
}

/// A service error as the CLI says it.
fn service_error(e: &shared::service::ServiceError) -> String {
    match e {
        shared::service::ServiceError::NotFound => "prospect not found".to_owned(),
        other => chain(other),
    }
}
