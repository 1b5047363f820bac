//! `kill -9` of `cadenhq serve` in the middle of a concurrent write load loses nothing. Eight
//! clients, each with its own key, POST new prospects (two clients at a time POST the same
//! email, so upserts race) and PATCH some of those already answered; the server is killed once
//! enough writes were answered, with requests still in flight. In the store it left behind, and
//! then through the server restarted on it: every write answered 2xx is there, no email or
//! external_id is stored twice, and every enrollment's job is still queued or done.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use shared::adapters::sqlite::{SqliteStore, DB_FILE};
use shared::backend::Backend;
use shared::domain::{AccountId, ProspectId, ProspectStatus};
use shared::http::KEY_HEADER;
use shared::ports::ProspectRef;

use crate::cli::{cadenhq, interrupt_and_wait, json_of, start_server};

const CLIENTS: usize = 8;
/// Requests one client sends at most, if the server is still up.
const MAX_POSTS_PER_CLIENT: usize = 300;
/// The server is killed once this many writes were answered 2xx, or after `KILL_AFTER`.
const KILL_AT_ANSWERED: usize = 400;
const KILL_AFTER: Duration = Duration::from_secs(20);

/// Mixed case: the store must upsert by the normalized address.
fn email(n: usize) -> String {
    format!("Lead-{n}@Crash.Example")
}

fn external_id(n: usize) -> String {
    format!("lead-{n}")
}

/// The writes the server answered 2xx.
#[derive(Default)]
struct Answered {
    /// (lead number, prospect_id, created).
    posts: Vec<(usize, String, bool)>,
    /// Lead numbers whose PATCH to `converted` was answered.
    converted: Vec<usize>,
}

struct Load {
    url: String,
    answered: Mutex<Answered>,
    count: AtomicUsize,
}

impl Load {
    fn record_post(&self, n: usize, body: &Value) {
        let id = body["prospect_id"].as_str().expect("prospect_id").to_owned();
        let created = body["created"].as_bool().expect("created");
        self.answered.lock().unwrap().posts.push((n, id, created));
        self.count.fetch_add(1, Ordering::SeqCst);
    }

    fn record_patch(&self, n: usize) {
        self.answered.lock().unwrap().converted.push(n);
        self.count.fetch_add(1, Ordering::SeqCst);
    }
}

/// Sends a write; `None` once the server is gone. Waits out a 429 as a client should.
async fn write(request: reqwest::RequestBuilder) -> Option<(u16, Value)> {
    let response = request.send().await.ok()?;
    let status = response.status().as_u16();
    let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let body = response.json::<Value>().await.ok()?;
    if status == 429 {
        tokio::time::sleep(Duration::from_secs(retry_after.unwrap_or(1))).await;
    }
    Some((status, body))
}

/// One client: POSTs leads (client `c` and `c ^ 1` POST the same ones), and PATCHes every third
/// one answered to `converted`, by external id or by prospect id. Returns whether the crash cut
/// it off.
async fn client(load: Arc<Load>, c: usize, key: String) -> bool {
    let http = reqwest::Client::new();
    for i in 0..MAX_POSTS_PER_CLIENT {
        let n = (i * CLIENTS + c) / 2;
        let body = json!({ "email": email(n), "external_id": external_id(n), "first_name": "Lead" });
        let post = http.post(format!("{}/api/v1/prospects", load.url)).header(KEY_HEADER, &key).json(&body);
        let Some((status, answer)) = write(post).await else { return true };
        if !(200..300).contains(&status) {
            continue;
        }
        load.record_post(n, &answer);
        if i % 3 != 0 {
            continue;
        }
        let path = if i % 2 == 0 { format!("external/{}", external_id(n)) } else { answer["prospect_id"].as_str().unwrap().to_owned() };
        let patch = http
            .patch(format!("{}/api/v1/prospects/{path}", load.url))
            .header(KEY_HEADER, &key)
            .json(&json!({ "status": "converted" }));
        let Some((status, _)) = write(patch).await else { return true };
        if status == 200 {
            load.record_patch(n);
        }
    }
    false
}

fn demo_account(printed: &str) -> AccountId {
    let id = printed.split("demo account (").nth(1).and_then(|rest| rest.split(')').next()).expect("demo account printed");
    AccountId::parse(id).unwrap()
}

fn count(db: &rusqlite::Connection, sql: &str) -> i64 {
    db.query_row(sql, [], |row| row.get(0)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_concurrent_writes_loses_no_answered_write_and_no_enrollment() {
    // Arrange: a server with the demo account, and one key per client.
    let dir = tempfile::tempdir().unwrap();
    let (mut child, url, printed) = start_server(dir.path());
    let account = demo_account(&printed);
    let mut keys = vec![printed.split_whitespace().find(|w| w.starts_with("chq_")).expect("key printed").to_owned()];
    for _ in 1..CLIENTS {
        let created = json_of(&cadenhq(dir.path(), &["keys", "create", "--account", &account.to_string(), "--json"]));
        keys.push(created["key"].as_str().unwrap().to_owned());
    }
    let load = Arc::new(Load { url: url.clone(), answered: Mutex::default(), count: AtomicUsize::new(0) });

    // Act: the load, and kill -9 in its middle.
    let clients: Vec<_> = keys.iter().enumerate().map(|(c, key)| tokio::spawn(client(Arc::clone(&load), c, key.clone()))).collect();
    let started = Instant::now();
    while load.count.load(Ordering::SeqCst) < KILL_AT_ANSWERED && started.elapsed() < KILL_AFTER && !clients.iter().all(|c| c.is_finished()) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let cut_off = futures::future::join_all(clients).await.into_iter().filter(|c| *c.as_ref().unwrap()).count();
    let answered = std::mem::take(&mut *load.answered.lock().unwrap());
    assert!(cut_off > 0, "the server was killed with the load still running");
    assert!(answered.posts.len() >= 50, "only {} POSTs were answered before the kill", answered.posts.len());

    // Assert, on the store the killed server left: every answered write is there.
    let store = SqliteStore::open(dir.path()).unwrap();
    let backend = Backend::from_embedded(&store);
    let mut answered_ids: BTreeMap<usize, String> = BTreeMap::new();
    let mut created = HashSet::new();
    for (n, id, was_created) in &answered.posts {
        let first = answered_ids.entry(*n).or_insert_with(|| id.clone());
        assert_eq!(first, id, "lead {n} was answered with two prospect ids");
        assert!(!was_created || created.insert(*n), "lead {n} was answered created twice");
        let prospect = backend.repo.find(account, &ProspectRef::Id(ProspectId::parse(id).unwrap())).await.unwrap();
        let prospect = prospect.unwrap_or_else(|| panic!("lead {n} ({id}) was answered 2xx but is not stored"));
        assert_eq!(prospect.email.as_str(), email(*n).to_lowercase());
        assert_eq!(prospect.external_id.as_ref().map(|e| e.as_str().to_owned()), Some(external_id(*n)));
    }
    for n in &answered.converted {
        let prospect = backend.repo.find(account, &ProspectRef::Id(ProspectId::parse(&answered_ids[n]).unwrap())).await.unwrap().unwrap();
        assert_eq!(prospect.status, ProspectStatus::Converted, "lead {n}: its PATCH was answered 200");
        assert_eq!(prospect.ended_through, u32::try_from(prospect.enrollments.len()).unwrap(), "lead {n}: converted ends every enrollment");
    }

    // No email and no external_id is stored twice.
    let db = rusqlite::Connection::open_with_flags(dir.path().join(DB_FILE), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let twice = |column: &str| {
        let sql = format!("SELECT COUNT(*) FROM (SELECT 1 FROM prospects WHERE {column} IS NOT NULL GROUP BY account_id, {column} HAVING COUNT(*) > 1)");
        count(&db, &sql)
    };
    assert_eq!(twice("email_hash"), 0, "an email is stored twice");
    assert_eq!(twice("external_id"), 0, "an external_id is stored twice");
    let stored: Vec<String> = {
        let mut statement = db.prepare("SELECT id FROM prospects").unwrap();
        let ids = statement.query_map([], |row| row.get(0)).unwrap().collect::<Result<_, _>>().unwrap();
        ids
    };
    assert!(stored.len() >= answered_ids.len());

    // Every enrollment of every stored prospect has its job queued, or sent, or dropped
    // because a status change ended the enrollment.
    let queued: HashSet<_> = store.queued_jobs().await.unwrap().into_iter().map(|job| job.enrollment_id).collect();
    let sent_to: HashSet<_> = store.outbox().await.unwrap().into_iter().map(|entry| entry.email.to.to_lowercase()).collect();
    for id in &stored {
        let prospect = backend.repo.find(account, &ProspectRef::Id(ProspectId::parse(id).unwrap())).await.unwrap().unwrap();
        assert!(!prospect.enrollments.is_empty(), "prospect {id} was stored without its enrollment");
        for enrollment in &prospect.enrollments {
            let done = queued.contains(&enrollment.id)
                || sent_to.contains(prospect.email.as_str())
                || prospect.status != ProspectStatus::New;
            assert!(done, "enrollment {} of prospect {id} has no job queued and sent nothing", enrollment.id);
        }
    }
    drop((db, backend, store));

    // The restarted server serves every answered prospect.
    let (child, url, printed) = start_server(dir.path());
    assert!(!printed.contains("chq_"), "the restart found its store: {printed}");
    let http = reqwest::Client::new();
    let checks = answered_ids.iter().enumerate().map(|(i, (n, id))| {
        let request = http
            .patch(format!("{url}/api/v1/prospects/external/{}", external_id(*n)))
            .header(KEY_HEADER, &keys[i % CLIENTS])
            .json(&json!({ "status": "converted" }));
        async move {
            loop {
                let (status, body) = write(request.try_clone().unwrap()).await.expect("the restarted server answers");
                if status != 429 {
                    assert_eq!((status, body["prospect_id"].as_str()), (200, Some(id.as_str())), "lead {n} after the restart: {body}");
                    return;
                }
            }
        }
    });
    futures::stream::iter(checks).buffer_unordered(CLIENTS).collect::<Vec<()>>().await;
    interrupt_and_wait(child);
}
