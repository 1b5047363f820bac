//! Our own CPU per request: POST (new and existing prospect) and PATCH through the real
//! `shared::http::router` (admission, rate limit, parsing, the service, the JSON response), over
//! in-memory ports, next to the floor: `serde_json` parsing the same body into a `Value`.
//!
//! `cargo bench -p cadenhq-shared --bench handlers` prints criterion's estimates, then a table of
//! p50/p99 from 10,000 individually timed requests per case (after 2,000 warm-up requests) and
//! each one's ratio to its floor. `scripts/bench` runs it with the other benchmarks.
//!
//! The fakes keep prospects as structs: the adapters' own encoding (SQLite rows and JSON
//! documents, DynamoDB attribute maps) and the I/O are not in these figures; the embedded server
//! benchmark (wrk) and the round-trip counts cover them.

use foldhash::HashMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration as StdDuration, Instant};

use async_trait::async_trait;
use axum::body::{to_bytes, Body};
use axum::http::{Method, Request, StatusCode};
use axum::Router;
use criterion::{BatchSize, Criterion};
use shared::domain::{
    gcra, Account, AccountId, ApiKey, ApiKeyRecord, Campaign, CampaignDefinition, CampaignId, CampaignJob,
    IdempotencyBegin, IdempotencyKey, KeyHash, KeyId, NormalizedEmail, Prospect, ProspectId, ProspectStatus,
    RateDecision,
    RateLimit, StoredResponse, SystemClock, ListPosition, ListQuery, StatusReason,
};
use shared::http::{router, Routes, KEY_HEADER, PROSPECTS_PATH};
use shared::ports::{
    CampaignReader, Conflict, IdempotencyStore, ListPage, JobQueue, KeyStore, ProspectRef, ProspectRepository, RateLimiter, Replacing, StoreError,
    UpsertContext,
};
use shared::service::{ProspectService, ServicePorts};
use time::OffsetDateTime;
use tower::ServiceExt;

/// Requests timed one by one per case for the percentile table.
const TIMED_REQUESTS: usize = 10_000;
/// Requests run before timing, so caches, allocator and branch predictors are warm.
const WARM_UP_REQUESTS: usize = 2_000;
/// Requests of one case in a row before the next case's turn (divides [`TIMED_REQUESTS`]).
const ROUND: usize = 100;

/// A realistic POST body (the README's example plus a few more fields); `{n}` is replaced to make
/// the email and external_id unique.
const POST_BODY: &str = r#"{"email":"Jane.Doe+{n}@Example.com","first_name":"Jane","last_name":"Doe","external_id":"crm-{n}","source":"landing_page","utm_source":"google","utm_medium":"cpc","utm_campaign":"spring","metadata":{"plan":"trial","seats":5}}"#;
const PATCH_BODY: &str = r#"{"status":"converted"}"#;

fn post_body(n: u64, first_name: &str) -> Vec<u8> {
    POST_BODY.replace("{n}", &n.to_string()).replace("\"Jane\"", &format!("\"{first_name}\"")).into_bytes()
}

fn email(n: u64) -> NormalizedEmail {
    NormalizedEmail::parse(&format!("jane.doe+{n}@example.com")).expect("valid email")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Every table of the in-memory store.
#[derive(Default)]
struct Tables {
    accounts: HashMap<AccountId, Account>,
    campaigns: HashMap<CampaignId, Campaign>,
    keys: HashMap<KeyHash, ApiKeyRecord>,
    prospects: HashMap<ProspectId, Prospect>,
    /// Per account: prospect ids by the hash of the normalized email, and by external_id.
    by_email: HashMap<AccountId, HashMap<String, ProspectId>>,
    by_external_id: HashMap<AccountId, HashMap<String, ProspectId>>,
    idempotency: HashMap<(AccountId, String), (String, Option<StoredResponse>)>,
    rate: HashMap<KeyId, OffsetDateTime>,
}

/// Every port the service needs, over HashMaps behind one mutex.
#[derive(Default)]
struct MemoryStore {
    tables: Mutex<Tables>,
    published: AtomicU64,
}

impl Tables {
    fn resolve(&self, account: AccountId, by: &ProspectRef) -> Option<ProspectId> {
        let (index, key) = match by {
            ProspectRef::Id(id) => return self.prospects.get(id).filter(|p| p.account_id == account).map(|p| p.id),
            ProspectRef::Email(email) => (&self.by_email, email.key_hash()),
            ProspectRef::EmailHash(hash) => (&self.by_email, hash.as_str()),
            ProspectRef::ExternalId(ext) => (&self.by_external_id, ext.as_str()),
        };
        index.get(&account).and_then(|ids| ids.get(key)).copied()
    }

    /// Drops every prospect but those whose email hashes to one of `keep` (see
    /// [`Bench::unique`]).
    fn forget_prospects(&mut self, keep: &[String]) {
        self.prospects.retain(|_, p| keep.iter().any(|hash| hash == p.email.key_hash()));
        let prospects = &self.prospects;
        for ids in self.by_email.values_mut().chain(self.by_external_id.values_mut()) {
            ids.retain(|_, id| prospects.contains_key(id));
        }
    }

    fn external_id_taken(&self, prospect: &Prospect) -> bool {
        prospect.external_id.as_ref().is_some_and(|ext| {
            self.by_external_id
                .get(&prospect.account_id)
                .and_then(|ids| ids.get(ext.as_str()))
                .is_some_and(|owner| *owner != prospect.id)
        })
    }
}

#[async_trait]
impl ProspectRepository for MemoryStore {
    async fn upsert_context(
        &self,
        account: AccountId,
        email: &NormalizedEmail,
        campaign: Option<CampaignId>,
    ) -> Result<UpsertContext, StoreError> {
        let t = lock(&self.tables);
        let id = t.by_email.get(&account).and_then(|ids| ids.get(email.key_hash())).copied();
        Ok(UpsertContext {
            prospect: id.and_then(|id| t.prospects.get(&id).cloned()),
            default_campaign_id: t.accounts.get(&account).and_then(|a| a.default_campaign_id),
            requested_campaign: campaign.and_then(|c| t.campaigns.get(&c).cloned()),
            suppressed: false,
        })
    }

    async fn insert(&self, prospect: Prospect) -> Result<(), StoreError> {
        let mut t = lock(&self.tables);
        let account = prospect.account_id;
        if t.by_email.get(&account).is_some_and(|ids| ids.contains_key(prospect.email.key_hash())) {
            return Err(StoreError::Conflict(Conflict::Email));
        }
        if t.external_id_taken(&prospect) {
            return Err(StoreError::Conflict(Conflict::ExternalId));
        }
        if let Some(ext) = &prospect.external_id {
            t.by_external_id.entry(account).or_default().insert(ext.as_str().to_owned(), prospect.id);
        }
        t.by_email.entry(account).or_default().insert(prospect.email.key_hash().to_owned(), prospect.id);
        t.prospects.insert(prospect.id, Prospect { version: 1, ..prospect });
        Ok(())
    }

    async fn update(&self, previous: Replacing, updated: Prospect) -> Result<(), StoreError> {
        let mut t = lock(&self.tables);
        if t.prospects.get(&updated.id).map(|p| p.version) != Some(previous.version) {
            return Err(StoreError::Conflict(Conflict::Version));
        }
        if t.external_id_taken(&updated) {
            return Err(StoreError::Conflict(Conflict::ExternalId));
        }
        if previous.external_id != updated.external_id {
            let ids = t.by_external_id.entry(updated.account_id).or_default();
            if let Some(old) = &previous.external_id {
                ids.remove(old.as_str());
            }
            if let Some(new) = &updated.external_id {
                ids.insert(new.as_str().to_owned(), updated.id);
            }
        }
        t.prospects.insert(updated.id, Prospect { version: previous.version + 1, ..updated });
        Ok(())
    }

    async fn set_status(
        &self,
        account: AccountId,
        prospect: &ProspectRef,
        status: ProspectStatus,
        reason: StatusReason,
        now: OffsetDateTime,
    ) -> Result<Option<Prospect>, StoreError> {
        let mut t = lock(&self.tables);
        let Some(id) = t.resolve(account, prospect) else { return Ok(None) };
        let Some(p) = t.prospects.get_mut(&id) else { return Ok(None) };
        p.set_status(status, reason, now);
        p.version += 1;
        Ok(Some(p.clone()))
    }

    async fn find(&self, account: AccountId, prospect: &ProspectRef) -> Result<Option<Prospect>, StoreError> {
        let t = lock(&self.tables);
        Ok(t.resolve(account, prospect).and_then(|id| t.prospects.get(&id).cloned()))
    }

    async fn erase(&self, account: AccountId, prospect: &ProspectRef, _: OffsetDateTime) -> Result<Option<ProspectId>, StoreError> {
        let mut t = lock(&self.tables);
        let Some(id) = t.resolve(account, prospect) else { return Ok(None) };
        Ok(t.prospects.remove(&id).map(|p| p.id))
    }

    async fn list(&self, query: &ListQuery) -> Result<ListPage, StoreError> {
        let t = lock(&self.tables);
        let mut found: Vec<Prospect> = t
            .prospects
            .values()
            .filter(|p| p.account_id == query.account && query.admits(p))
            .filter(|p| query.before.is_none_or(|b| ListPosition::of(p.created_at, p.id) < b))
            .cloned()
            .collect();
        found.sort_by_key(|p| std::cmp::Reverse(ListPosition::of(p.created_at, p.id)));
        let limit = usize::try_from(query.limit).unwrap_or(usize::MAX);
        let has_more = found.len() > limit;
        found.truncate(limit);
        Ok(ListPage { prospects: found, has_more })
    }
}

#[async_trait]
impl CampaignReader for MemoryStore {
    async fn get_campaign(&self, id: CampaignId) -> Result<Option<Campaign>, StoreError> {
        Ok(lock(&self.tables).campaigns.get(&id).cloned())
    }
}

#[async_trait]
impl KeyStore for MemoryStore {
    async fn find_key(&self, hash: &KeyHash) -> Result<Option<ApiKeyRecord>, StoreError> {
        Ok(lock(&self.tables).keys.get(hash).cloned())
    }

    async fn touch_key(&self, hash: &KeyHash, now: OffsetDateTime) -> Result<(), StoreError> {
        if let Some(record) = lock(&self.tables).keys.get_mut(hash) {
            record.last_used_at = Some(now);
        }
        Ok(())
    }
}

#[async_trait]
impl IdempotencyStore for MemoryStore {
    async fn begin(
        &self,
        account: AccountId,
        key: &IdempotencyKey,
        fingerprint: &str,
        _now: OffsetDateTime,
    ) -> Result<IdempotencyBegin, StoreError> {
        let mut t = lock(&self.tables);
        match t.idempotency.get(&(account, key.hash().to_owned())) {
            Some((stored, _)) if stored != fingerprint => Ok(IdempotencyBegin::Mismatch),
            Some((_, Some(response))) => Ok(IdempotencyBegin::Replay(response.clone())),
            Some((_, None)) => Ok(IdempotencyBegin::InFlight),
            None => {
                t.idempotency.insert((account, key.hash().to_owned()), (fingerprint.to_owned(), None));
                Ok(IdempotencyBegin::Started)
            }
        }
    }

    async fn finish(&self, account: AccountId, key: &IdempotencyKey, response: &StoredResponse, _now: OffsetDateTime) -> Result<(), StoreError> {
        if let Some(entry) = lock(&self.tables).idempotency.get_mut(&(account, key.hash().to_owned())) {
            entry.1 = Some(response.clone());
        }
        Ok(())
    }

    async fn abandon(&self, account: AccountId, key: &IdempotencyKey) -> Result<(), StoreError> {
        lock(&self.tables).idempotency.remove(&(account, key.hash().to_owned()));
        Ok(())
    }
}

#[async_trait]
impl RateLimiter for MemoryStore {
    /// The real GCRA step, as the embedded limiter runs it; a bucket that runs dry is refilled
    /// rather than denied, since a benchmark runs far past any key's limit and measures the
    /// admitted path.
    async fn check(&self, key: KeyId, limit: RateLimit, now: OffsetDateTime) -> Result<RateDecision, StoreError> {
        let mut t = lock(&self.tables);
        let (mut decision, mut tat) = gcra(t.rate.get(&key).copied(), now, limit);
        if tat.is_none() {
            (decision, tat) = gcra(None, now, limit);
        }
        if let Some(tat) = tat {
            t.rate.insert(key, tat);
        }
        Ok(decision)
    }
}

#[async_trait]
impl JobQueue for MemoryStore {
    /// Encodes the job as the queue adapters do, and counts it.
    async fn publish(&self, job: &CampaignJob, _visible_at: OffsetDateTime) -> Result<(), StoreError> {
        black_box(job.to_json());
        self.published.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// The router over the in-memory store, with one account (a default 3-step campaign) and its key.
struct Bench {
    app: Router,
    /// The same HTTP stack with a handler that only parses the body and answers JSON.
    axum_floor: Router,
    store: Arc<MemoryStore>,
    key: String,
    /// Unique suffixes for new prospects.
    next: AtomicU64,
    /// Key hashes of the prospects the other cases use (created first, never forgotten).
    kept: Vec<String>,
}

impl Bench {
    fn new() -> Self {
        let store = Arc::new(MemoryStore::default());
        let now = OffsetDateTime::now_utc();
        let account_id = AccountId::new();
        let definition = CampaignDefinition::parse(shared::admin::DEMO_CAMPAIGN).expect("demo campaign parses");
        let campaign = Campaign::new(account_id, definition, now);
        let key = ApiKey::generate();
        let mut record = ApiKeyRecord::new(&key, account_id, Some("bench".into()), now);
        record.rate_limit = Some(RateLimit::new(100_000, 100_000).expect("valid limit"));
        {
            let mut t = lock(&store.tables);
            t.accounts.insert(account_id, Account { id: account_id, name: "Bench".into(), default_campaign_id: Some(campaign.id), created_at: now });
            t.campaigns.insert(campaign.id, campaign);
            t.keys.insert(record.hash.clone(), record);
        }
        let service = ProspectService::new(ServicePorts {
            repo: store.clone(),
            queue: Some(store.clone()),
            campaigns: store.clone(),
            keys: store.clone(),
            idempotency: store.clone(),
            limiter: store.clone(),
            clock: Arc::new(SystemClock),
            // As in a warm Lambda instance: the key record comes from the service's cache.
            key_cache_ttl: shared::backend::LAMBDA_KEY_CACHE_TTL,
        });
        let axum_floor = Router::new().route(
            PROSPECTS_PATH,
            axum::routing::post(|body: axum::body::Bytes| async move {
                let value: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                axum::Json(serde_json::json!({ "accepted": value.is_object(), "prospect_id": "00000000-0000-0000-0000-000000000000", "created": false }))
            }),
        );
        let kept = (1..=2).map(|i| email(i).key_hash().to_owned()).collect();
        Self { app: router(service, Routes::All), axum_floor, store, key: key.expose().to_owned(), next: AtomicU64::new(0), kept }
    }

    fn request(&self, method: Method, path: &str, body: Vec<u8>) -> Request<Body> {
        Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .header(KEY_HEADER, &self.key)
            .body(Body::from(body))
            .expect("valid request")
    }

    /// Runs one request through a router and reads the whole response.
    async fn run(&self, app: &Router, request: Request<Body>, expected: StatusCode) {
        let response = app.clone().oneshot(request).await.expect("the router is infallible");
        let status = response.status();
        let body = to_bytes(response.into_body(), usize::MAX).await.expect("response body");
        assert_eq!(status, expected, "{}", String::from_utf8_lossy(&body));
        black_box(body);
    }

    /// POSTs a new prospect and returns its id.
    async fn create(&self, n: u64) -> String {
        let response = self.app.clone().oneshot(self.request(Method::POST, PROSPECTS_PATH, post_body(n, "Jane"))).await.expect("router");
        assert_eq!(response.status(), StatusCode::CREATED);
        let body = to_bytes(response.into_body(), usize::MAX).await.expect("body");
        let value: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        value["prospect_id"].as_str().expect("prospect_id").to_owned()
    }

    /// A number for a new prospect's email. The prospects created before it (all but the two
    /// the other cases use) are dropped first, outside the timed part: a real store keeps no
    /// prospect in this process's memory, and a fake that kept a thousand measured its own
    /// growing maps (POST new took about 0.7 µs more).
    fn unique(&self) -> u64 {
        lock(&self.store.tables).forget_prospects(&self.kept);
        self.next.fetch_add(1, Ordering::Relaxed) + 1_000_000
    }
}

/// One measured case: how to build its input (untimed) and what to run (timed).
struct Case {
    name: &'static str,
    /// Index of the floor case this one is compared with.
    floor: Option<usize>,
    input: Box<dyn Fn(u64) -> Input>,
}

enum Input {
    Parse(Vec<u8>),
    Http(Request<Body>, StatusCode),
    AxumFloor(Request<Body>),
}

fn cases(bench: &Arc<Bench>, rt: &tokio::runtime::Runtime) -> Vec<Case> {
    rt.block_on(bench.create(1));
    let id = rt.block_on(bench.create(2));
    let patch_path = format!("{PROSPECTS_PATH}/{id}");
    let external_path = format!("{PROSPECTS_PATH}/external/crm-2");
    let (b0, b1, b2, b3, b4, b5) = (bench.clone(), bench.clone(), bench.clone(), bench.clone(), bench.clone(), bench.clone());
    vec![
        Case { name: "floor: serde_json parses the POST body", floor: None, input: Box::new(|_| Input::Parse(post_body(1, "Jane"))) },
        Case {
            name: "(axum alone: parse the POST body, answer JSON)",
            floor: Some(0),
            input: Box::new(move |_| Input::AxumFloor(b0.request(Method::POST, PROSPECTS_PATH, post_body(1, "Jane")))),
        },
        Case {
            name: "POST, new prospect (201, enrolled)",
            floor: Some(0),
            input: Box::new(move |_| Input::Http(b1.request(Method::POST, PROSPECTS_PATH, post_body(b1.unique(), "Jane")), StatusCode::CREATED)),
        },
        Case {
            name: "POST, existing prospect, unchanged",
            floor: Some(0),
            input: Box::new(move |_| Input::Http(b2.request(Method::POST, PROSPECTS_PATH, post_body(1, "Jane")), StatusCode::OK)),
        },
        Case {
            name: "POST, existing prospect, one field changed",
            floor: Some(0),
            input: Box::new(move |i| {
                let name = if i % 2 == 0 { "Janet" } else { "Jane" };
                Input::Http(b3.request(Method::POST, PROSPECTS_PATH, post_body(1, name)), StatusCode::OK)
            }),
        },
        Case { name: "floor: serde_json parses the PATCH body", floor: None, input: Box::new(|_| Input::Parse(PATCH_BODY.as_bytes().to_vec())) },
        Case {
            name: "PATCH by id",
            floor: Some(5),
            input: Box::new(move |_| Input::Http(b4.request(Method::PATCH, &patch_path, PATCH_BODY.into()), StatusCode::OK)),
        },
        Case {
            name: "PATCH by external_id",
            floor: Some(5),
            input: Box::new(move |_| Input::Http(b5.request(Method::PATCH, &external_path, PATCH_BODY.into()), StatusCode::OK)),
        },
    ]
}

fn execute(bench: &Bench, rt: &tokio::runtime::Runtime, input: Input) {
    match input {
        Input::Parse(body) => {
            black_box(serde_json::from_slice::<serde_json::Value>(black_box(&body)).expect("valid JSON"));
        }
        Input::Http(request, expected) => rt.block_on(bench.run(&bench.app, request, expected)),
        Input::AxumFloor(request) => rt.block_on(bench.run(&bench.axum_floor, request, StatusCode::OK)),
    }
}

fn criterion_estimates(c: &mut Criterion, bench: &Arc<Bench>, rt: &tokio::runtime::Runtime, cases: &[Case]) {
    let mut group = c.benchmark_group("handlers");
    for case in cases {
        let mut i = 0_u64;
        group.bench_function(case.name, |b| {
            b.iter_batched(
                || {
                    i += 1;
                    (case.input)(i)
                },
                |input| execute(bench, rt, input),
                BatchSize::SmallInput,
            );
        });
    }
    group.finish();
}

fn percentile(sorted: &[StdDuration], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1e6
}

/// Times each request on its own and prints p50/p99 and the ratio to the case's floor. The
/// cases take turns, [`ROUND`] requests at a time, so that a slower spell of this shared
/// machine falls on every case alike instead of on whichever ran then.
fn percentile_table(bench: &Arc<Bench>, rt: &tokio::runtime::Runtime, cases: &[Case]) {
    let mut counters = vec![0_u64; cases.len()];
    let mut samples: Vec<Vec<StdDuration>> = cases.iter().map(|_| Vec::with_capacity(TIMED_REQUESTS)).collect();
    for (case, i) in cases.iter().zip(&mut counters) {
        for _ in 0..WARM_UP_REQUESTS {
            *i += 1;
            execute(bench, rt, (case.input)(*i));
        }
    }
    for _ in 0..TIMED_REQUESTS / ROUND {
        for ((case, i), samples) in cases.iter().zip(&mut counters).zip(&mut samples) {
            for _ in 0..ROUND {
                *i += 1;
                let input = (case.input)(*i);
                let start = Instant::now();
                execute(bench, rt, input);
                samples.push(start.elapsed());
            }
        }
    }
    println!();
    println!("CPU per request: {TIMED_REQUESTS} requests timed one by one per case (the cases taking turns, {ROUND} at a time), after {WARM_UP_REQUESTS} warm-up requests");
    println!("(round ×floor: the median over the rounds of the case's p50 in a round to its floor's p50 in the same round)");
    println!("{:<44} {:>9} {:>9} {:>11} {:>11} {:>13}", "case", "p50 µs", "p99 µs", "p50 ×floor", "p99 ×floor", "round ×floor");
    let round_p50s: Vec<Vec<f64>> = samples.iter().map(|s| s.chunks(ROUND).map(median).collect()).collect();
    let mut results: Vec<(f64, f64)> = Vec::new();
    for (c, (case, mut samples)) in cases.iter().zip(samples).enumerate() {
        samples.sort_unstable();
        let (p50, p99) = (percentile(&samples, 50.0), percentile(&samples, 99.0));
        results.push((p50, p99));
        match case.floor.and_then(|f| Some((f, results.get(f)?))) {
            Some((f, &(f50, f99))) => {
                let mut ratios: Vec<f64> = round_p50s[c].iter().zip(&round_p50s[f]).map(|(case, floor)| case / floor).collect();
                ratios.sort_unstable_by(f64::total_cmp);
                let round_ratio = ratios[ratios.len() / 2];
                println!("{:<44} {p50:>9.2} {p99:>9.2} {:>10.1}× {:>10.1}× {round_ratio:>12.1}×", case.name, p50 / f50, p99 / f99);
            }
            None => println!("{:<44} {p50:>9.2} {p99:>9.2} {:>11} {:>11} {:>13}", case.name, "", "", ""),
        }
    }
}

/// The p50 of one round's timings, in microseconds.
fn median(round: &[StdDuration]) -> f64 {
    let mut sorted = round.to_vec();
    sorted.sort_unstable();
    percentile(&sorted, 50.0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let benchmarking = args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--test" || a == "--list");
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("tokio runtime");
    let bench = Arc::new(Bench::new());
    let cases = cases(&bench, &rt);
    let mut c = Criterion::default()
        .warm_up_time(StdDuration::from_secs(1))
        .measurement_time(StdDuration::from_secs(3))
        .sample_size(50)
        .configure_from_args();
    criterion_estimates(&mut c, &bench, &rt, &cases);
    c.final_summary();
    if benchmarking {
        percentile_table(&bench, &rt, &cases);
    }
}

