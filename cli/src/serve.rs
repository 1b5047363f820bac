//! `cadenhq serve`: the HTTP API and, on the embedded store, the campaign scheduler loop, in
//! one process.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use shared::adapters::smtp::SmtpMailer;
use shared::adapters::sqlite::drain_due_jobs;
use shared::admin;
use shared::backend::Backend;
use shared::config::{MAILER, SENDER, SMTP_URL, UNSUBSCRIBE_SECRET};
use shared::domain::{SystemClock, UnsubscribeSecret};
use shared::http::{router, Routes, KEY_HEADER, PROSPECTS_PATH};
use shared::ports::{Mailer, PullQueue};
use shared::scheduler::{DeliverySettings, Scheduler};
use tokio::sync::watch;

use crate::app::AppError;

/// How often the embedded scheduler looks for due jobs.
const SCHEDULER_TICK: Duration = Duration::from_secs(1);
/// File in the data directory holding the generated unsubscribe secret.
const SECRET_FILE: &str = "unsubscribe.secret";
const DEFAULT_SENDER: &str = "CadenHQ <campaigns@cadenhq.localhost>";

fn usage(e: impl std::fmt::Display) -> AppError {
    AppError::Usage(e.to_string())
}

/// The unsubscribe secret: from the environment, else generated once into the data directory.
fn unsubscribe_secret(data_dir: &Path) -> Result<UnsubscribeSecret, AppError> {
    if let Ok(value) = std::env::var(UNSUBSCRIBE_SECRET) {
        return UnsubscribeSecret::new(value.into_bytes()).map_err(usage);
    }
    let path = data_dir.join(SECRET_FILE);
    let value = match std::fs::read_to_string(&path) {
        Ok(v) => v,
        Err(_) => {
            let generated = shared::domain::ApiKey::generate().expose().to_owned();
            std::fs::write(&path, &generated).map_err(|e| usage(format!("cannot write {}: {e}", path.display())))?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
            }
            generated
        }
    };
    UnsubscribeSecret::new(value.trim().as_bytes().to_vec()).map_err(usage)
}

fn mailer(outbox: &Arc<dyn Mailer>) -> Result<Arc<dyn Mailer>, AppError> {
    match std::env::var(MAILER).as_deref() {
        Err(_) | Ok("" | "outbox") => Ok(Arc::clone(outbox)),
        Ok("smtp") => {
            let url = std::env::var(SMTP_URL).map_err(|_| usage(format!("{MAILER}=smtp needs {SMTP_URL}")))?;
            Ok(Arc::new(SmtpMailer::from_url(&url).map_err(usage)?))
        }
        Ok(other) => Err(usage(format!("{MAILER} must be outbox or smtp, not {other:?}"))),
    }
}

/// Runs the server until Ctrl-C or SIGTERM.
///
/// # Errors
/// [`AppError`] when the address cannot be bound or the store opened.
pub async fn serve(backend: Backend, data_dir: &Path, addr: SocketAddr, public_url: Option<String>) -> Result<(), AppError> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| usage(format!("cannot listen on {addr}: {e}")))?;
    let local = listener.local_addr().map_err(usage)?;
    let public_url = public_url.unwrap_or_else(|| format!("http://{local}"));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut service = backend.service(Arc::new(SystemClock));
    let mut scheduler_task = None;

    if let (Some(queue), Some(outbox)) = (backend.pull_queue.clone(), backend.outbox.clone()) {
        if let Some(demo) = admin::bootstrap_demo(backend.admin.as_ref(), &SystemClock).await? {
            println!("First start: created a demo account ({}), its default campaign and an API key:", demo.account.id);
            println!("\n    {}\n\nIt is shown only once. Try it:\n", demo.key.expose());
            println!(
                "curl -i -X POST {public_url}{PROSPECTS_PATH} -H 'Content-Type: application/json' -H '{KEY_HEADER}: {}' -d '{{\"email\":\"jane@example.com\",\"first_name\":\"Jane\"}}'\n",
                demo.key.expose()
            );
            println!("Campaign emails go to the outbox: cadenhq outbox list\n");
        }
        let secret = unsubscribe_secret(data_dir)?;
        service = service.with_unsubscribe_secret(secret.clone());
        let ports = backend.scheduler_ports(mailer(&outbox)?, Arc::new(SystemClock)).ok_or_else(|| usage("the embedded store has no queue"))?;
        let sender = std::env::var(SENDER).unwrap_or_else(|_| DEFAULT_SENDER.to_owned());
        shared::adapters::smtp::validate_sender(&sender).map_err(usage)?;
        let scheduler = Scheduler::new(ports, DeliverySettings { sender, public_url: public_url.clone(), unsubscribe_secret: secret });
        scheduler_task = Some(tokio::spawn(run_scheduler(scheduler, queue, stop_rx.clone())));
    }

    let app = router(service, Routes::All);
    println!("CadenHQ Prospects API listening on http://{local}");
    let mut stop = stop_rx;
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
        let _ = stop.changed().await;
    });
    server.await.map_err(|e| usage(format!("server failed: {e}")))?;
    if let Some(task) = scheduler_task {
        let _ = task.await;
    }
    println!("Shut down cleanly.");
    Ok(())
}

/// The embedded scheduler loop: every tick, handle the jobs that are due.
async fn run_scheduler(scheduler: Scheduler, queue: Arc<dyn PullQueue>, mut stop: watch::Receiver<bool>) {
    loop {
        if let Err(e) = drain_due_jobs(&scheduler, queue.as_ref()).await {
            tracing::warn!(error = %e, "scheduler pass failed; retrying next tick");
        }
        tokio::select! {
            () = tokio::time::sleep(SCHEDULER_TICK) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! { () = ctrl_c => {}, () = terminate => {} }
}
