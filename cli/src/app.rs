//! What each command does, over whichever backend was chosen.

use shared::telemetry::error_chain as chain;
use serde_json::{json, Value};
use shared::admin::{self, AdminError};
use shared::backend::Backend;
use shared::config::{aws_sdk_config, ConfigError, TableConfig, QUEUE_URL};
use shared::domain::{RateLimit, SendingChange, ApiKeyRecord, Campaign, CampaignDefinition, ExternalId, NormalizedEmail, Prospect, SystemClock};
use shared::ports::{ProspectRef, StoreError};

use crate::args::{AccountsCommand, BackendKind, CampaignsCommand, Cli, Command, KeysCommand, OutboxCommand, ProspectsCommand};
use crate::serve::serve;

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
}


async fn open_backend(cli: &Cli) -> Result<Backend, AppError> {
    match cli.backend {
        BackendKind::Embedded => Ok(Backend::embedded(&cli.data_dir)?),
        BackendKind::Aws => {
            let table = TableConfig::from_env()?;
            let queue = std::env::var(QUEUE_URL).ok().filter(|q| !q.is_empty());
            Ok(Backend::aws(&aws_sdk_config().await, &table.table_name, queue.as_deref()))
        }
    }
}

/// Prints `value` as JSON, or `text` for people.
fn emit(json_output: bool, value: &Value, text: &str) {
    if json_output {
        println!("{value}");
    } else {
        println!("{text}");
    }
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// Runs one command.
///
/// # Errors
/// [`AppError`] describing what went wrong, for a one-line message.
pub async fn run(cli: Cli) -> Result<(), AppError> {
    if let Command::Invoke(args) = &cli.command {
        return Ok(crate::invoke::run(args, cli.json).await?);
    }
    let backend = open_backend(&cli).await?;
    let clock = SystemClock;
    let store = backend.admin.as_ref();
    let j = cli.json;
    match cli.command {
        Command::Invoke(_) => unreachable!("handled before a backend is opened"),
        Command::Serve { addr, public_url } => serve(backend, &cli.data_dir, addr, public_url).await?,
        Command::Outbox(OutboxCommand::Show { id, raw }) => {
            let BackendKind::Embedded = cli.backend else {
                return Err(AppError::Usage("the outbox belongs to the embedded store; on AWS, emails go through SES".into()));
            };
            let entry = shared::adapters::sqlite::SqliteStore::open(&cli.data_dir)?
                .outbox_entry(id)
                .await?
                .ok_or_else(|| AppError::Usage(format!("no email #{id} in the outbox")))?;
            if raw {
                let mime = entry.raw.as_deref().ok_or_else(|| AppError::Usage(format!("email #{id} was stored before messages were kept whole")))?;
                print!("{mime}");
            } else {
                let headers = entry.headers.iter().map(|(n, v)| format!("{n}: {v}")).collect::<Vec<_>>().join("\n");
                let text = format!("{headers}\n\n{}", entry.email.text_body);
                emit(j, &json!(entry), &text);
            }
        }
        Command::Outbox(OutboxCommand::List) => {
            let BackendKind::Embedded = cli.backend else {
                return Err(AppError::Usage("the outbox belongs to the embedded store; on AWS, emails go through SES".into()));
            };
            let entries = shared::adapters::sqlite::SqliteStore::open(&cli.data_dir)?.outbox().await?;
            let text = entries
                .iter()
                .map(|e| format!("#{}  {}  to {}  \"{}\"", e.id, e.queued_at, e.email.to, e.email.subject))
                .collect::<Vec<_>>()
                .join("\n");
            emit(j, &json!({ "emails": entries }), if entries.is_empty() { "The outbox is empty." } else { &text });
        }
        Command::Accounts(AccountsCommand::Create { name }) => {
            let account = admin::create_account(store, &name, &clock).await?;
            emit(j, &json!({ "account_id": account.id, "name": account.name }), &format!("Created account {} ({})", account.id, account.name));
        }
        Command::Keys(KeysCommand::Create { account, label }) => {
            let (record, key) = admin::create_key(store, account, label, &clock).await?;
            emit(
                j,
                &json!({ "key_id": record.key_id, "account_id": record.account_id, "key": key.expose(), "label": record.label }),
                &format!("Created key {} for account {}\n\n    {}\n\nStore it now: it is shown only once.", record.key_id, account, key.expose()),
            );
        }
        Command::Keys(KeysCommand::Revoke { key_id }) => {
            if !store.revoke_key(key_id, time::OffsetDateTime::now_utc()).await? {
                return Err(AppError::Usage(format!("no key {key_id}")));
            }
            emit(j, &json!({ "key_id": key_id, "revoked": true }), &format!("Revoked key {key_id}"));
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
            );
        }
        Command::Keys(KeysCommand::List { account }) => {
            let keys = store.list_keys(account).await?;
            let text = keys.iter().map(key_line).collect::<Vec<_>>().join("\n");
            emit(j, &json!({ "account_id": account, "keys": keys.iter().map(key_json).collect::<Vec<_>>() }), if keys.is_empty() { "No keys." } else { &text });
        }
        Command::Campaigns(CampaignsCommand::Create { account, file, default }) => {
            let text = std::fs::read_to_string(&file).map_err(|e| AppError::Usage(format!("cannot read {}: {e}", file.display())))?;
            let definition = CampaignDefinition::parse(&text).map_err(|e| AppError::Usage(e.to_string()))?;
            let campaign = admin::create_campaign(store, account, definition, default, &clock).await?;
            emit(j, &campaign_json(&campaign, default), &format!("Created campaign {} ({}, {} steps){}", campaign.id, campaign.name, campaign.steps.len(), if default { ", the account's default" } else { "" }));
        }
        Command::Campaigns(CampaignsCommand::List { account }) => {
            let default = store.get_account(account).await?.and_then(|a| a.default_campaign_id);
            let campaigns = store.list_campaigns(account).await?;
            let text = campaigns
                .iter()
                .map(|c| format!("{}  {}  {} steps  {}{}", c.id, format!("{:<8}", c.state().as_str()), c.steps.len(), c.name, if Some(c.id) == default { "  (default)" } else { "" }))
                .collect::<Vec<_>>()
                .join("\n");
            let list: Vec<Value> = campaigns.iter().map(|c| campaign_json(c, Some(c.id) == default)).collect();
            emit(j, &json!({ "account_id": account, "campaigns": list }), if campaigns.is_empty() { "No campaigns." } else { &text });
        }
        Command::Campaigns(CampaignsCommand::Deactivate { id }) => {
            let campaign = admin::change_campaign_sending(store, id, SendingChange::Deactivate, &clock).await?;
            emit(j, &campaign_json(&campaign, false), &format!("Deactivated campaign {id}: its enrollments end"));
        }
        Command::Campaigns(CampaignsCommand::Pause { id }) => {
            let campaign = admin::change_campaign_sending(store, id, SendingChange::Pause, &clock).await?;
            emit(j, &campaign_json(&campaign, false), &format!("Paused campaign {id}: nothing is sent until it is resumed"));
        }
        Command::Campaigns(CampaignsCommand::Resume { id }) => {
            let campaign = admin::change_campaign_sending(store, id, SendingChange::Resume, &clock).await?;
            emit(j, &campaign_json(&campaign, false), &format!("Resumed campaign {id}: each enrollment continues from its next step"));
        }
        Command::Prospects(ProspectsCommand::Show { account, by }) => {
            let reference = if let Some(id) = by.id {
                ProspectRef::Id(id)
            } else if let Some(email) = by.email {
                ProspectRef::Email(NormalizedEmail::parse(&email).map_err(|e| AppError::Usage(e.to_string()))?)
            } else {
                let raw = by.external_id.unwrap_or_default();
                ProspectRef::ExternalId(ExternalId::parse(&raw).map_err(|e| AppError::Usage(e.to_string()))?)
            };
            let prospect = backend.repo.find(account, &reference).await?.ok_or_else(|| AppError::Usage("prospect not found".into()))?;
            let completions = backend.completions(&prospect).await?;
            let value = prospect_json(&prospect, &completions);
            let text = serde_json::to_string_pretty(&value).unwrap_or_default();
            emit(j, &value, &text);
        }
    }
    Ok(())
}

fn key_json(k: &ApiKeyRecord) -> Value {
    json!({
        "key_id": k.key_id, "account_id": k.account_id, "label": k.label, "prefix": k.prefix,
        "created_at": rfc3339(k.created_at), "revoked_at": k.revoked_at.map(rfc3339), "active": k.is_active(),
        "last_used_at": k.last_used_at.map(rfc3339), "rate_limit": k.effective_rate_limit(),
    })
}

fn key_line(k: &ApiKeyRecord) -> String {
    format!(
        "{}  {}…  {}  created {}  last used {}{}",
        k.key_id,
        k.prefix,
        k.label.as_deref().unwrap_or("-"),
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

fn prospect_json(p: &Prospect, completions: &[Option<time::OffsetDateTime>]) -> Value {
    let enrollments: Vec<Value> = p
        .enrollments
        .iter()
        .zip(completions)
        .map(|(e, completed_at)| json!({
            "enrollment_id": e.id, "campaign_id": e.campaign_id, "enrolled_at": rfc3339(e.enrolled_at),
            "completed_at": completed_at.map(rfc3339), "active": p.is_active(e) && completed_at.is_none(),
        }))
        .collect();
    json!({
        "prospect_id": p.id, "account_id": p.account_id, "email": p.email.original(),
        "email_normalized": p.email.as_str(), "status": p.status.as_str(),
        "external_id": p.external_id.as_ref().map(ExternalId::as_str), "fields": p.fields,
        "metadata": p.metadata, "enrollments": enrollments,
        "created_at": rfc3339(p.created_at), "updated_at": rfc3339(p.updated_at),
    })
}

