//! `cadenhq serve`: the HTTP API and, on the embedded store, the campaign scheduler loop, in
//! one process. Every setting is checked and the address bound before the store is touched,
//! so a start that fails creates nothing; a lock in the data directory keeps a second server
//! off a store one is already running on.

use std::fs::{File, TryLockError};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use shared::adapters::smtp::SmtpMailer;
use shared::adapters::sqlite::{drain_due_jobs, SqliteStore, DRAIN_BATCH};
use shared::admin::{self, Demo};
use shared::backend::Backend;
use shared::config::{aws_sdk_config, TableConfig, MAILER, QUEUE_URL, SENDER, SMTP_URL, UNSUBSCRIBE_SECRET};
use shared::domain::{SystemClock, UnsubscribeSecret};
use shared::adapters::sns_http::SnsVerifier;
use shared::http::{router_with_webhooks, KEY_HEADER, PROSPECTS_PATH};
use shared::ports::{Mailer, PullQueue};
use shared::scheduler::{DeliverySettings, Scheduler};
use tokio::sync::watch;

use crate::app::AppError;
use crate::args::BackendKind;
use crate::output;

/// How often the embedded scheduler looks for due jobs when none were waiting.
const SCHEDULER_TICK: Duration = Duration::from_secs(1);
/// File in the data directory holding the generated unsubscribe secret.
const SECRET_FILE: &str = "unsubscribe.secret";
/// File in the data directory the running server holds locked.
const LOCK_FILE: &str = "serve.lock";
pub const DEFAULT_SENDER: &str = "CadenHQ <campaigns@cadenhq.localhost>";
/// Base URL of unsubscribe links when `serve` runs on its default address.
pub const DEFAULT_PUBLIC_URL: &str = "http://127.0.0.1:3000";

fn usage(e: impl std::fmt::Display) -> AppError {
    AppError::Usage(e.to_string())
}

/// How `cadenhq serve` was asked to run.
pub struct Serve<'a> {
    pub backend: BackendKind,
    pub data_dir: &'a Path,
    pub addr: &'a str,
    pub public_url: Option<String>,
    pub json: bool,
}

/// The secret generated into the data directory by an earlier start, if there is one.
///
/// # Errors
/// [`AppError::Usage`] when the file is there but cannot be read or is too short.
pub fn stored_secret(data_dir: &Path) -> Result<Option<UnsubscribeSecret>, AppError> {
    let path = data_dir.join(SECRET_FILE);
    match std::fs::read_to_string(&path) {
        Ok(value) => UnsubscribeSecret::new(value.trim().as_bytes().to_vec()).map(Some).map_err(|e| usage(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(usage(format!("cannot read {}: {e}", path.display()))),
    }
}

/// The secret from the data directory, generated there on the first start.
fn secret_from_data_dir(data_dir: &Path) -> Result<UnsubscribeSecret, AppError> {
    if let Some(secret) = stored_secret(data_dir)? {
        return Ok(secret);
    }
    let path = data_dir.join(SECRET_FILE);
    let generated = shared::domain::ApiKey::generate().expose().to_owned();
    std::fs::write(&path, &generated).map_err(|e| usage(format!("cannot write {}: {e}", path.display())))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    }
    UnsubscribeSecret::new(generated.into_bytes()).map_err(usage)
}

/// Where the embedded server's campaign emails go.
enum MailerChoice {
    Outbox,
    /// The relay's `host[:port]`, for the banner (never its credentials).
    Smtp(SmtpMailer, String),
}

impl MailerChoice {
    fn from_env() -> Result<Self, AppError> {
        match std::env::var(MAILER).as_deref() {
            Err(_) | Ok("" | "outbox") => Ok(Self::Outbox),
            Ok("smtp") => {
                let url = std::env::var(SMTP_URL).ok().filter(|u| !u.is_empty()).ok_or_else(|| usage(format!("{MAILER}=smtp needs {SMTP_URL}")))?;
                let mailer = SmtpMailer::from_url(&url).map_err(|e| usage(format!("{SMTP_URL}: {e}")))?;
                Ok(Self::Smtp(mailer, relay_of(&url).to_owned()))
            }
            Ok(other) => Err(usage(format!("{MAILER} must be outbox or smtp, not {other:?}"))),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Outbox => "outbox",
            Self::Smtp(..) => "smtp",
        }
    }

    fn banner(&self) -> String {
        match self {
            Self::Outbox => "Campaign emails go to the outbox: cadenhq outbox list".to_owned(),
            Self::Smtp(_, relay) => format!("Campaign emails are sent through the SMTP relay {relay}"),
        }
    }

    fn into_mailer(self, store: &SqliteStore) -> Arc<dyn Mailer> {
        match self {
            Self::Outbox => Arc::new(store.clone()),
            Self::Smtp(mailer, _) => Arc::new(mailer),
        }
    }
}

/// `host[:port]` of an SMTP URL, without its scheme, credentials or options.
fn relay_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    authority.rsplit_once('@').map_or(authority, |(_, host)| host)
}

/// Holds the data directory's lock file for as long as the server runs.
fn lock_data_dir(data_dir: &Path) -> Result<File, AppError> {
    let path = data_dir.join(LOCK_FILE);
    let file = File::options().create(true).truncate(false).write(true).open(&path).map_err(|e| usage(format!("cannot open {}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(usage(format!(
            "another cadenhq serve is running on {} (it holds {}); stop it first, or give another --data-dir",
            data_dir.display(),
            path.display()
        ))),
        Err(TryLockError::Error(e)) => Err(usage(format!("cannot lock {}: {e}", path.display()))),
    }
}

/// The embedded server's settings, all read and checked before the store is touched.
struct EmbeddedSettings {
    mailer: MailerChoice,
    sender: String,
    secret_from_env: Option<UnsubscribeSecret>,
}

impl EmbeddedSettings {
    fn from_env() -> Result<Self, AppError> {
        let mailer = MailerChoice::from_env()?;
        let sender = std::env::var(SENDER).unwrap_or_else(|_| DEFAULT_SENDER.to_owned());
        shared::adapters::smtp::validate_sender(&sender).map_err(usage)?;
        let secret_from_env = match std::env::var(UNSUBSCRIBE_SECRET) {
            Ok(value) => Some(UnsubscribeSecret::new(value.into_bytes()).map_err(|e| usage(format!("{UNSUBSCRIBE_SECRET}: {e}")))?),
            Err(_) => None,
        };
        Ok(Self { mailer, sender, secret_from_env })
    }
}

/// Runs the server until Ctrl-C or SIGTERM.
///
/// # Errors
/// [`AppError`] when a setting is invalid, the address cannot be bound, another server holds
/// the data directory, or the store cannot be opened; nothing is created then.
pub async fn serve(options: Serve<'_>) -> Result<(), AppError> {
    let Serve { backend: kind, data_dir, addr, public_url, json } = options;
    let settings = match kind {
        BackendKind::Embedded => Some(EmbeddedSettings::from_env()?),
        BackendKind::Aws => None,
    };
    let aws = match kind {
        BackendKind::Aws => {
            let table = TableConfig::from_env()?;
            let queue = std::env::var(QUEUE_URL).ok().filter(|q| !q.is_empty());
            Some(Backend::aws(&aws_sdk_config().await, &table.table_name, queue.as_deref()))
        }
        BackendKind::Embedded => None,
    };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| usage(format!("cannot listen on {addr}: {e}")))?;
    let local = listener.local_addr().map_err(usage)?;
    let public_url = public_url.unwrap_or_else(|| format!("http://{local}"));
    let (stop_tx, stop_rx) = watch::channel(false);

    let mut _lock = None;
    let mut demo = None;
    let mut scheduler_task = None;
    let sns = SnsVerifier::from_env().map_err(|e| usage(e.to_string()))?;
    let (service, webhooks, mailer) = if let Some(settings) = settings {
        std::fs::create_dir_all(data_dir).map_err(|e| usage(format!("cannot create {}: {e}", data_dir.display())))?;
        _lock = Some(lock_data_dir(data_dir)?);
        let store = SqliteStore::open(data_dir)?;
        let backend = Backend::from_embedded(&store);
        let secret = match settings.secret_from_env {
            Some(secret) => secret,
            None => secret_from_data_dir(data_dir)?,
        };
        demo = admin::bootstrap_demo(backend.admin.as_ref(), &SystemClock).await?;
        let service = backend.service(Arc::new(SystemClock)).with_unsubscribe_secret(secret.clone());
        let webhooks = backend.webhook_service(Arc::new(SystemClock), sns);
        let (name, banner) = (settings.mailer.name(), settings.mailer.banner());
        let ports = backend
            .scheduler_ports(settings.mailer.into_mailer(&store), Arc::new(SystemClock))
            .ok_or_else(|| usage("the embedded store has no queue"))?;
        let scheduler = Scheduler::new(ports, DeliverySettings { sender: settings.sender, public_url: public_url.clone(), unsubscribe_secret: secret });
        scheduler_task = Some(tokio::spawn(run_scheduler(scheduler, Arc::new(store.clone()), stop_rx.clone())));
        (service, webhooks, (name, banner))
    } else {
        let backend = aws.ok_or_else(|| usage("no backend"))?;
        let webhooks = backend.webhook_service(Arc::new(SystemClock), sns);
        (backend.service(Arc::new(SystemClock)), webhooks, ("none", "Campaign emails are sent by the scheduler function on AWS, not by this process".to_owned()))
    };

    let banner = if json {
        let mut value = json!({ "url": format!("http://{local}"), "public_url": public_url, "mailer": mailer.0 });
        if let Some(Demo { account, campaign, key }) = &demo {
            value["account_id"] = json!(account.id);
            value["campaign_id"] = json!(campaign.id);
            value["key"] = json!(key.expose());
        }
        value.to_string()
    } else {
        let mut text = String::new();
        if let Some(demo) = &demo {
            text.push_str(&format!(
                "First start: created a demo account ({}), its default campaign and an API key:\n\n    {}\n\nIt is shown only once. Try it:\n\n",
                demo.account.id,
                demo.key.expose()
            ));
            text.push_str(&format!(
                "curl -i -X POST {public_url}{PROSPECTS_PATH} -H 'Content-Type: application/json' -H '{KEY_HEADER}: {}' -d '{{\"email\":\"jane@example.com\",\"first_name\":\"Jane\"}}'\n\n",
                demo.key.expose()
            ));
        }
        text.push_str(&format!("{}\nCadenHQ Prospects API listening on http://{local}", mailer.1));
        text
    };
    let signal = shutdown_signal();
    let printed = output::line(banner);

    let app = router_with_webhooks(service, webhooks);
    let mut stop = stop_rx;
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        // A reader that is gone before the banner (`serve | head -1` read less) stops the server.
        if printed.is_ok() {
            signal.await;
        }
        let _ = stop_tx.send(true);
        let _ = stop.changed().await;
    });
    server.await.map_err(|e| usage(format!("server failed: {e}")))?;
    if let Some(task) = scheduler_task {
        let _ = task.await;
    }
    if !json {
        // Where the reader has gone, there is no one to tell.
        let _ = output::line("Shut down cleanly.");
    }
    Ok(())
}

/// The embedded scheduler loop: every tick, handle the jobs that are due.
async fn run_scheduler(scheduler: Scheduler, queue: Arc<dyn PullQueue>, mut stop: watch::Receiver<bool>) {
    loop {
        // A full pass means more jobs may be due: the next one starts at once.
        let pause = match drain_due_jobs(&scheduler, queue.as_ref()).await {
            Ok(taken) if taken >= DRAIN_BATCH as usize => Duration::ZERO,
            Ok(_) => SCHEDULER_TICK,
            Err(e) => {
                tracing::warn!(error = %e, "scheduler pass failed; retrying next tick");
                SCHEDULER_TICK
            }
        };
        if *stop.borrow() {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Resolves at Ctrl-C or SIGTERM. The handlers are installed when this is called, so a
/// signal sent as soon as the banner is out is already caught.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let interrupt = signal(SignalKind::interrupt());
        let terminate = signal(SignalKind::terminate());
        async move {
            match (interrupt, terminate) {
                (Ok(mut interrupt), Ok(mut terminate)) => {
                    tokio::select! { _ = interrupt.recv() => {}, _ = terminate.recv() => {} }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
