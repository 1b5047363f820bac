//! The embedded scheduler's throughput: how many emails a second `cadenhq serve`'s scheduler
//! loop delivers for N due jobs (one-step campaign), into the outbox and through a local SMTP
//! sink, next to the store's floor measured in the same run: the same number of bare writes
//! (three per job: a claim-sized row, an email-sized row and an ack-sized row, one after the
//! other per job, as many jobs at once as the scheduler handles) through the same writer, so
//! grouped into commits the same way, with nothing else.
//!
//! `cargo run --release -p cadenhq --example scheduler_throughput -- [N]` (default 10000)
//! prints one line per case and the ratios.

use std::sync::Arc;
use std::time::Instant;

use futures::stream::{self, StreamExt};
use shared::adapters::smtp::SmtpMailer;
use shared::adapters::sqlite::{drain_due_jobs, SqliteStore};
use shared::admin;
use shared::backend::Backend;
use shared::domain::{CampaignDefinition, NormalizedEmail, ProspectChanges, SystemClock, UnsubscribeSecret};
use shared::ports::Mailer;
use shared::scheduler::{DeliverySettings, Scheduler};
use shared::service::UpsertCommand;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const CAMPAIGN: &str = r#"{"name":"Bench","steps":[{"delay_seconds":0,"subject":"Hi {{ first_name }}","body":"Welcome aboard.\nHere is what to do next."}]}"#;
/// Jobs handled at once by one scheduler pass (as `drain_due_jobs` does).
const CONCURRENCY: usize = 128;

/// A store with `n` new prospects of a one-step default campaign: `n` due jobs.
async fn store_with_due_jobs(n: usize) -> (tempfile::TempDir, SqliteStore, Backend) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(dir.path()).expect("open store");
    let backend = Backend::from_embedded(&store);
    let account = admin::create_account(backend.admin.as_ref(), "Bench", &SystemClock).await.expect("account");
    let definition = CampaignDefinition::parse(CAMPAIGN).expect("campaign");
    admin::create_campaign(backend.admin.as_ref(), account.id, definition, true, &SystemClock).await.expect("campaign");
    let service = backend.service(Arc::new(SystemClock));
    stream::iter(0..n)
        .for_each_concurrent(CONCURRENCY, |i| {
            let service = service.clone();
            async move {
                let email = NormalizedEmail::parse(&format!("lead{i}@example.com")).expect("email");
                let cmd = UpsertCommand { email, campaign_id: None, changes: ProspectChanges::default() };
                service.upsert(account.id, &cmd).await.expect("upsert");
            }
        })
        .await;
    (dir, store, backend)
}

/// Seconds the scheduler takes to handle every due job of a fresh store through `mailer`.
async fn drain(n: usize, mailer: impl FnOnce(&SqliteStore) -> Arc<dyn Mailer>) -> f64 {
    let (_dir, store, backend) = store_with_due_jobs(n).await;
    let ports = backend.scheduler_ports(mailer(&store), Arc::new(SystemClock)).expect("queue");
    let secret = UnsubscribeSecret::new(b"bench-unsubscribe-secret-0123456789abcdef".to_vec()).expect("secret");
    let settings = DeliverySettings { sender: "Bench <bench@cadenhq.test>".into(), public_url: "http://127.0.0.1:3000".into(), unsubscribe_secret: secret };
    let scheduler = Scheduler::new(ports, settings);
    let started = Instant::now();
    let mut handled = 0;
    loop {
        let taken = drain_due_jobs(&scheduler, &store).await.expect("scheduler pass");
        if taken == 0 {
            break;
        }
        handled += taken;
    }
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(handled, n, "every job handled once");
    seconds
}

/// Seconds the store takes for the floor's bare writes of `n` jobs.
async fn floor(n: usize) -> f64 {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(dir.path()).expect("open store");
    let (small, email) = ("x".repeat(200), "x".repeat(4096));
    let now = time::OffsetDateTime::now_utc() + time::Duration::days(1);
    let started = Instant::now();
    stream::iter(0..n)
        .for_each_concurrent(CONCURRENCY, |_| {
            let (store, small, email) = (store.clone(), small.clone(), email.clone());
            async move {
                for body in [small.clone(), email, small] {
                    store.enqueue_raw(body, now).await.expect("floor write");
                }
            }
        })
        .await;
    started.elapsed().as_secs_f64()
}

/// An SMTP server on loopback that takes every message (as fast as a relay can); its address.
async fn smtp_sink() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                if write.write_all(b"220 sink ESMTP\r\n").await.is_err() {
                    return;
                }
                let mut in_data = false;
                while let Ok(Some(line)) = lines.next_line().await {
                    let reply: &[u8] = if in_data {
                        if line != "." {
                            continue;
                        }
                        in_data = false;
                        b"250 queued\r\n"
                    } else {
                        match line.split_whitespace().next().unwrap_or_default().to_ascii_uppercase().as_str() {
                            "EHLO" | "HELO" => b"250 sink\r\n",
                            "DATA" => {
                                in_data = true;
                                b"354 go on\r\n"
                            }
                            "QUIT" => {
                                let _ = write.write_all(b"221 bye\r\n").await;
                                return;
                            }
                            _ => b"250 ok\r\n",
                        }
                    };
                    if write.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("smtp://{addr}")
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let floor_s = floor(n).await;
    let outbox_s = drain(n, |store| Arc::new(store.clone())).await;
    let url = smtp_sink().await;
    let smtp_s = drain(n, |_| Arc::new(SmtpMailer::from_url(&url).expect("SMTP URL"))).await;

    let rate = |seconds: f64| n as f64 / seconds;
    println!("scheduler | {n} due jobs, {CONCURRENCY} at once");
    println!("scheduler | store floor (3 bare writes per job): {:.0} jobs/s ({floor_s:.2} s)", rate(floor_s));
    println!("scheduler | outbox: {:.0} emails/s ({outbox_s:.2} s), {:.2}x the floor", rate(outbox_s), floor_s / outbox_s);
    println!("scheduler | SMTP sink: {:.0} emails/s ({smtp_s:.2} s), {:.2}x the floor", rate(smtp_s), floor_s / smtp_s);
}
