//! Command-line arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use shared::config::{BACKEND, DATA_DIR, PUBLIC_URL};
use shared::domain::{AccountId, CampaignId, EndpointId, KeyId, Provider, ProspectId};

#[derive(Debug, Parser)]
#[command(name = "cadenhq", version, about = "CadenHQ Prospects API: local server and admin commands", arg_required_else_help = true)]
pub struct Cli {
    /// Directory of the embedded store.
    #[arg(long, global = true, env = DATA_DIR, default_value = ".cadenhq")]
    pub data_dir: PathBuf,
    /// Backend: the embedded store, or DynamoDB/SQS configured from the environment.
    #[arg(long, global = true, env = BACKEND, value_enum, default_value_t = BackendKind::Embedded)]
    pub backend: BackendKind,
    /// Print one JSON object instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    Embedded,
    Aws,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the Prospects API over HTTP.
    Serve {
        /// Address to listen on: HOST:PORT, the host a name (localhost) or an IP address.
        #[arg(long, default_value = "127.0.0.1:3000")]
        addr: String,
        /// Base URL of unsubscribe links in emails (default: http://ADDR).
        #[arg(long, env = PUBLIC_URL)]
        public_url: Option<String>,
    },
    /// Manage accounts.
    #[command(subcommand, arg_required_else_help = true)]
    Accounts(AccountsCommand),
    /// Manage API keys.
    #[command(subcommand, arg_required_else_help = true)]
    Keys(KeysCommand),
    /// Manage campaigns.
    #[command(subcommand, arg_required_else_help = true)]
    Campaigns(CampaignsCommand),
    /// Inspect prospects.
    #[command(subcommand, arg_required_else_help = true)]
    Prospects(ProspectsCommand),
    /// Webhook endpoints for Stripe, Resend and SendGrid, and the events received.
    #[command(subcommand, arg_required_else_help = true)]
    Integrations(IntegrationsCommand),
    /// Campaign emails stored by the embedded server's outbox mailer.
    #[command(subcommand, arg_required_else_help = true)]
    Outbox(OutboxCommand),
    /// Run a Lambda function binary on this machine: play the Lambda Runtime API, feed it
    /// event files in order, print each response.
    Invoke(InvokeArgs),
}

#[derive(Debug, Args)]
pub struct InvokeArgs {
    /// The function's executable (what `bootstrap` is on Lambda), e.g. target/debug/prospects-post.
    #[arg(long)]
    pub function: PathBuf,
    /// An event file; repeat to invoke the same process once per file, in order.
    #[arg(long = "event", required = true)]
    pub events: Vec<PathBuf>,
    /// A SAM template whose `Environment.Variables` the function gets.
    #[arg(long, requires = "logical_id")]
    pub env_from_template: Option<PathBuf>,
    /// The function's logical id in the template, e.g. ProspectsPostFunction.
    #[arg(long, requires = "env_from_template")]
    pub logical_id: Option<String>,
    /// A variable for the function, added or overriding the template's; repeatable.
    #[arg(long = "env", value_name = "NAME=VALUE", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Start the function this many times, each fed every event (for init time medians).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub repeat: u32,
    /// Seconds the function gets to poll, and to answer each event.
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
}

fn parse_env(raw: &str) -> Result<(String, String), String> {
    match raw.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("expected NAME=VALUE, got {raw:?}")),
    }
}

#[derive(Debug, Subcommand)]
pub enum OutboxCommand {
    /// List the stored emails, oldest first (with `--json`: every header too).
    List,
    /// Show one stored email: its headers and parts, or with `--raw` the exact MIME message
    /// (an `.eml` file).
    Show {
        id: i64,
        /// Print the message exactly as the SMTP and SES mailers would send it.
        #[arg(long)]
        raw: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum AccountsCommand {
    /// Create an account.
    Create {
        #[arg(long)]
        name: String,
    },
    /// List every account: id, name, created, keys.
    List,
}

/// The providers an account creates a webhook endpoint for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProviderArg {
    Stripe,
    Resend,
    Sendgrid,
}

impl From<ProviderArg> for Provider {
    fn from(p: ProviderArg) -> Self {
        match p {
            ProviderArg::Stripe => Self::Stripe,
            ProviderArg::Resend => Self::Resend,
            ProviderArg::Sendgrid => Self::Sendgrid,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum IntegrationsCommand {
    /// Create an endpoint; prints the URL to paste into the provider's webhook settings.
    Create {
        #[arg(long, value_name = "ID")]
        account: AccountId,
        #[arg(long, value_enum)]
        provider: ProviderArg,
        /// The provider's signing secret (Stripe and Resend: `whsec_...`); for SendGrid, the
        /// public verification key its Event Webhook settings show.
        #[arg(long, env = "CADENHQ_INTEGRATION_SECRET", hide_env_values = true)]
        secret: String,
        /// Base URL the provider reaches this API at (default: http://127.0.0.1:3000, as
        /// `serve`; on AWS, the stack's `ApiUrl` output).
        #[arg(long, env = PUBLIC_URL)]
        public_url: Option<String>,
    },
    /// List an account's endpoints (never their secrets).
    List {
        #[arg(long, value_name = "ID")]
        account: AccountId,
    },
    /// Delete an endpoint: events sent to it are refused from then on.
    Delete {
        endpoint_id: EndpointId,
        #[arg(long, value_name = "ID")]
        account: AccountId,
    },
    /// The events received, newest first: provider, event id, type, when, outcome.
    Events {
        /// The account's events; without it, those of POST /webhooks/ses that named no
        /// prospect of ours.
        #[arg(long, value_name = "ID")]
        account: Option<AccountId>,
        /// How many, 1 to 1000.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key; the secret is printed once and never stored.
    Create {
        #[arg(long, value_name = "ID")]
        account: AccountId,
        /// Who or what the key is for (owner, environment).
        #[arg(long)]
        label: Option<String>,
    },
    /// Revoke a key by its id.
    Revoke { key_id: KeyId },
    /// List an account's keys (never the secrets).
    List {
        #[arg(long, value_name = "ID")]
        account: AccountId,
    },
    /// Override a key's rate limit (default: 20 requests/s, bursts of 40).
    Limit {
        key_id: KeyId,
        /// Sustained requests per second.
        #[arg(long, required_unless_present = "default", requires = "burst")]
        rate: Option<u32>,
        /// Requests allowed at once after a quiet period.
        #[arg(long, requires = "rate")]
        burst: Option<u32>,
        /// Remove the override: back to the default limit.
        #[arg(long, conflicts_with_all = ["rate", "burst"])]
        default: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum CampaignsCommand {
    /// Create a campaign from a JSON file.
    Create {
        #[arg(long, value_name = "ID")]
        account: AccountId,
        #[arg(long)]
        file: PathBuf,
        /// Make it the account's default conversion campaign.
        #[arg(long)]
        default: bool,
    },
    /// List an account's campaigns.
    List {
        #[arg(long, value_name = "ID")]
        account: AccountId,
    },
    /// Show one campaign: its steps and delays, whether it is active and the default.
    Show {
        /// The campaign's id.
        id: CampaignId,
    },
    /// Render every step for a prospect (default: a sample with every variable set) exactly
    /// as the sender would, unsubscribe link included; sends and records nothing.
    Preview {
        /// The campaign's id.
        id: CampaignId,
        #[command(flatten)]
        by: PreviewSelector,
        /// Base URL of the unsubscribe link (default: http://127.0.0.1:3000, as `serve`).
        #[arg(long, env = PUBLIC_URL)]
        public_url: Option<String>,
    },
    /// Deactivate a campaign: ends its running enrollments and takes no new ones.
    Deactivate { id: CampaignId },
    /// Pause a campaign: none of its enrollments sends until it is resumed.
    Pause { id: CampaignId },
    /// Resume a paused campaign: each enrollment continues from its next step, due no earlier
    /// than now plus the time it had left when paused.
    Resume { id: CampaignId },
}

#[derive(Debug, Args)]
#[group(multiple = false)]
pub struct PreviewSelector {
    /// A stored prospect of the campaign's account, by id.
    #[arg(long, value_name = "ID")]
    pub prospect_id: Option<ProspectId>,
    /// A stored prospect of the campaign's account, by email.
    #[arg(long)]
    pub email: Option<String>,
    /// A sample prospect with every variable set (the default).
    #[arg(long)]
    pub sample: bool,
}

#[derive(Debug, Subcommand)]
pub enum ProspectsCommand {
    /// Show one stored prospect: the resource GET /api/v1/prospects/{id} returns.
    Show {
        #[arg(long, value_name = "ID")]
        account: AccountId,
        #[command(flatten)]
        by: ProspectSelector,
        /// Also each step's send record, under each enrollment's `steps`.
        #[arg(long)]
        steps: bool,
    },
    /// List an account's prospects, newest first: a page as GET /api/v1/prospects returns it.
    List {
        #[arg(long, value_name = "ID")]
        account: AccountId,
        /// Only prospects with this status (new, converted, unsubscribed, bounced).
        #[arg(long, value_name = "STATUS")]
        status: Option<String>,
        /// Prospects per page, 1 to 100.
        #[arg(long, value_name = "N", default_value_t = shared::domain::DEFAULT_PAGE)]
        limit: u32,
        /// The `next_cursor` of the previous page.
        #[arg(long, value_name = "CURSOR")]
        cursor: Option<String>,
    },
    /// Erase one prospect (a GDPR erasure request), as DELETE /api/v1/prospects/{id} does.
    Erase {
        #[arg(long, value_name = "ID")]
        account: AccountId,
        #[command(flatten)]
        by: ProspectSelector,
    },
    /// Everything held about one prospect (a GDPR access request), as one JSON document.
    Export {
        #[arg(long, value_name = "ID")]
        account: AccountId,
        #[arg(long, value_name = "ID")]
        id: ProspectId,
    },
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct ProspectSelector {
    #[arg(long, value_name = "ID")]
    pub id: Option<ProspectId>,
    #[arg(long)]
    pub email: Option<String>,
    #[arg(long)]
    pub external_id: Option<String>,
}
