//! `cadenhq invoke`: runs a Lambda function binary on this machine, as `sam local invoke` does
//! in a container. It plays the Lambda Runtime API on a loopback port, starts the binary with
//! `AWS_LAMBDA_RUNTIME_API` and the environment Lambda and the template give it, hands it one
//! event each time it polls, prints what it answers, and measures init (process start to the
//! first poll), the first answer and peak RSS. A function that reports an init error, exits or
//! stops answering fails the command.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::Instant as Deadline;

use std::io::Write;

use crate::args::InvokeArgs;

/// Account id in the ARNs the function is told about.
const ACCOUNT_ID: &str = "123456789012";
/// `AWS_LAMBDA_FUNCTION_MEMORY_SIZE` when the template does not say.
const DEFAULT_MEMORY_MB: u64 = 256;
/// Lambda's limit on a synchronous response.
const MAX_PAYLOAD: usize = 6 * 1024 * 1024;
/// Lines of the function's output kept for a failure report.
const LOG_TAIL: usize = 20;
/// How long a function that reported an init error gets to exit before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(1);
/// How long the output a killed function left in its pipes gets to be copied, all pipes
/// together (a process it started may hold them open for ever).
const DRAIN_GRACE: Duration = Duration::from_millis(200);

/// Why an invocation run failed.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    /// The template or an event file cannot be used.
    #[error("{0}")]
    Input(String),
    #[error("cannot start {}: {source}", .path.display())]
    Spawn { path: PathBuf, source: std::io::Error },
    #[error("cannot listen on loopback: {0}")]
    Listen(std::io::Error),
    /// The function reported an init error, exited or stopped answering.
    #[error("{0}")]
    Function(String),
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
}

/// What the function is started with.
struct Setup {
    binary: PathBuf,
    name: String,
    memory_mb: u64,
    region: String,
    env: Vec<(String, String)>,
    events: Vec<(String, Bytes)>,
    timeout: Duration,
}

/// Measurements of one process, from start to kill.
struct Start {
    init: Duration,
    first_answer: Option<Duration>,
    peak_rss_kb: Option<u64>,
    polls: usize,
    invocations: usize,
}

/// Starts the function `args.repeat` times, feeding each process every event in order, prints
/// each answer and a summary.
///
/// # Errors
/// [`InvokeError`] when the template or an event cannot be read, or the function fails to
/// start, reports an init error, exits or times out.
pub async fn run(args: &InvokeArgs, json_output: bool) -> Result<(), InvokeError> {
    let setup = setup(args)?;
    let mut starts = Vec::new();
    for _ in 0..args.repeat {
        starts.push(run_once(&setup, json_output).await?);
    }
    print_summary(&setup, &starts, json_output)?;
    Ok(())
}

fn setup(args: &InvokeArgs) -> Result<Setup, InvokeError> {
    let template = match (&args.env_from_template, &args.logical_id) {
        (Some(path), Some(id)) => Some(read_template(path, id)?),
        _ => None,
    };
    let mut env = Vec::new();
    for (name, value) in template.as_ref().map(|t| t.variables.as_slice()).unwrap_or_default() {
        if args.env.iter().any(|(n, _)| n == name) {
            continue;
        }
        match value {
            TemplateValue::Plain(v) => env.push((name.clone(), v.clone())),
            TemplateValue::Intrinsic(expr) => {
                return Err(InvokeError::Input(format!("{name} is `{expr}` in the template: give its value with --env {name}=VALUE")));
            }
        }
    }
    env.extend(args.env.iter().cloned());
    let events = args
        .events
        .iter()
        .map(|path| {
            let raw = std::fs::read(path).map_err(|e| InvokeError::Input(format!("cannot read {}: {e}", path.display())))?;
            Ok((path.display().to_string(), Bytes::from(raw)))
        })
        .collect::<Result<_, InvokeError>>()?;
    let name = match &args.logical_id {
        Some(id) => id.clone(),
        None => args.function.file_name().map_or_else(|| "function".into(), |n| n.to_string_lossy().into_owned()),
    };
    let region = ["AWS_REGION", "AWS_DEFAULT_REGION"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|r| !r.is_empty()))
        .unwrap_or_else(|| "us-east-1".into());
    Ok(Setup {
        binary: args.function.clone(),
        name,
        memory_mb: template.and_then(|t| t.memory_mb).unwrap_or(DEFAULT_MEMORY_MB),
        region,
        env,
        events,
        timeout: Duration::from_secs(args.timeout),
    })
}

/// A function's settings in a SAM template.
struct TemplateFunction {
    variables: Vec<(String, TemplateValue)>,
    memory_mb: Option<u64>,
}

/// A variable's value in the template: a literal, or an intrinsic (`!Ref`, `!Sub`, `!GetAtt`,
/// ...) that only CloudFormation can resolve, kept as written for the error message.
enum TemplateValue {
    Plain(String),
    Intrinsic(String),
}

/// Reads `Environment.Variables` (the function's over `Globals`) and `MemorySize`.
fn read_template(path: &Path, logical_id: &str) -> Result<TemplateFunction, InvokeError> {
    use serde_norway::Value as Yaml;
    let text = std::fs::read_to_string(path).map_err(|e| InvokeError::Input(format!("cannot read {}: {e}", path.display())))?;
    let doc: Yaml = serde_norway::from_str(&text).map_err(|e| InvokeError::Input(format!("{}: {e}", path.display())))?;
    let function = &doc["Resources"][logical_id];
    if !function.is_mapping() {
        return Err(InvokeError::Input(format!("{}: no resource {logical_id}", path.display())));
    }
    let (globals, properties) = (&doc["Globals"]["Function"], &function["Properties"]);
    let mut variables: Vec<(String, TemplateValue)> = Vec::new();
    for scope in [globals, properties] {
        let Some(map) = scope["Environment"]["Variables"].as_mapping() else { continue };
        for (name, value) in map {
            let Some(name) = name.as_str() else { continue };
            let value = match value {
                Yaml::String(s) => TemplateValue::Plain(s.clone()),
                Yaml::Number(n) => TemplateValue::Plain(n.to_string()),
                Yaml::Bool(b) => TemplateValue::Plain(b.to_string()),
                other => TemplateValue::Intrinsic(serde_norway::to_string(other).unwrap_or_default().trim().replace('\n', " ")),
            };
            variables.retain(|(n, _)| n != name);
            variables.push((name.to_owned(), value));
        }
    }
    let memory_mb = properties["MemorySize"].as_u64().or_else(|| globals["MemorySize"].as_u64());
    Ok(TemplateFunction { variables, memory_mb })
}

/// One event handed to the function.
struct Invocation {
    request_id: String,
    payload: Bytes,
    deadline_ms: u128,
    function_arn: String,
    trace_id: String,
}

/// What the Runtime API saw the function do.
enum Note {
    Poll(Instant),
    Answer { request_id: String, kind: &'static str, body: Bytes, at: Instant },
    InitError(Bytes),
}

/// The Runtime API's state: the event the next poll gets, and where notes go.
#[derive(Clone)]
struct RuntimeApi {
    next: Arc<tokio::sync::Mutex<mpsc::Receiver<Invocation>>>,
    notes: mpsc::UnboundedSender<Note>,
}

fn runtime_api(state: RuntimeApi) -> Router {
    Router::new()
        .route("/2018-06-01/runtime/invocation/next", get(next_invocation))
        .route("/2018-06-01/runtime/invocation/{id}/response", post(invocation_response))
        .route("/2018-06-01/runtime/invocation/{id}/error", post(invocation_error))
        .route("/2018-06-01/runtime/init/error", post(init_error))
        .layer(DefaultBodyLimit::max(MAX_PAYLOAD))
        .with_state(state)
}

async fn next_invocation(State(api): State<RuntimeApi>) -> Response {
    let _ = api.notes.send(Note::Poll(Instant::now()));
    let Some(invocation) = api.next.lock().await.recv().await else {
        return StatusCode::GONE.into_response();
    };
    let headers = [
        ("lambda-runtime-aws-request-id", invocation.request_id),
        ("lambda-runtime-deadline-ms", invocation.deadline_ms.to_string()),
        ("lambda-runtime-invoked-function-arn", invocation.function_arn),
        ("lambda-runtime-trace-id", invocation.trace_id),
        ("content-type", "application/json".to_owned()),
    ];
    (headers, invocation.payload).into_response()
}

fn accepted() -> Response {
    (StatusCode::ACCEPTED, Json(json!({ "status": "OK" }))).into_response()
}

async fn invocation_response(State(api): State<RuntimeApi>, UrlPath(request_id): UrlPath<String>, body: Bytes) -> Response {
    let _ = api.notes.send(Note::Answer { request_id, kind: "response", body, at: Instant::now() });
    accepted()
}

async fn invocation_error(State(api): State<RuntimeApi>, UrlPath(request_id): UrlPath<String>, body: Bytes) -> Response {
    let _ = api.notes.send(Note::Answer { request_id, kind: "error", body, at: Instant::now() });
    accepted()
}

async fn init_error(State(api): State<RuntimeApi>, body: Bytes) -> Response {
    let _ = api.notes.send(Note::InitError(body));
    accepted()
}

/// The variables Lambda sets for every function.
fn lambda_env(setup: &Setup, api_addr: &str) -> Vec<(String, String)> {
    let today = time::OffsetDateTime::now_utc().date();
    let stream = format!("{}/{:02}/{:02}/[$LATEST]{}", today.year(), u8::from(today.month()), today.day(), uuid::Uuid::new_v4().simple());
    let task_root = setup.binary.parent().map(|p| p.display().to_string()).unwrap_or_default();
    [
        ("AWS_LAMBDA_RUNTIME_API", api_addr.to_owned()),
        ("AWS_LAMBDA_FUNCTION_NAME", setup.name.clone()),
        ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", setup.memory_mb.to_string()),
        ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST".to_owned()),
        ("AWS_LAMBDA_LOG_GROUP_NAME", format!("/aws/lambda/{}", setup.name)),
        ("AWS_LAMBDA_LOG_STREAM_NAME", stream),
        ("AWS_LAMBDA_INITIALIZATION_TYPE", "on-demand".to_owned()),
        ("_HANDLER", "bootstrap".to_owned()),
        ("AWS_REGION", setup.region.clone()),
        ("AWS_DEFAULT_REGION", setup.region.clone()),
        ("LAMBDA_TASK_ROOT", task_root),
        ("PATH", "/usr/local/bin:/usr/bin/:/bin:/opt/bin".to_owned()),
        ("TZ", ":UTC".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// The caller's variables the function also gets: AWS credentials, endpoints and profile (as
/// Lambda's execution role would provide), and the Rust log and backtrace settings. Nothing
/// else leaks in, so a variable missing from the template is missing here too.
fn passed_through() -> impl Iterator<Item = (String, String)> {
    std::env::vars().filter(|(name, _)| {
        (name.starts_with("AWS_") && !name.starts_with("AWS_LAMBDA_") && name != "AWS_REGION" && name != "AWS_DEFAULT_REGION")
            || name == "RUST_LOG"
            || name == "RUST_BACKTRACE"
    })
}

/// The last lines the function wrote, for a failure report.
type Tail = Arc<Mutex<VecDeque<String>>>;

/// Copies the function's output to stderr, keeping the last lines.
fn forward(output: impl AsyncRead + Unpin + Send + 'static, tail: Tail) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut lines = BufReader::new(output).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = writeln!(std::io::stderr().lock(), "{line}");
            if let Ok(mut tail) = tail.lock() {
                if tail.len() == LOG_TAIL {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        }
    })
}

/// What waiting on the function gave.
enum Waited {
    Note(Note),
    Exited(std::io::Result<ExitStatus>),
    TimedOut,
}

/// A running function process and its Runtime API.
struct Process {
    child: Child,
    notes: mpsc::UnboundedReceiver<Note>,
    events: mpsc::Sender<Invocation>,
    tail: Tail,
    forwarders: Vec<tokio::task::JoinHandle<()>>,
    server: tokio::task::JoinHandle<()>,
    started: Instant,
    polls: usize,
}

impl Process {
    async fn start(setup: &Setup) -> Result<Self, InvokeError> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(InvokeError::Listen)?;
        let addr = listener.local_addr().map_err(InvokeError::Listen)?;
        let (events, next) = mpsc::channel(1);
        let (notes_tx, notes) = mpsc::unbounded_channel();
        let api = runtime_api(RuntimeApi { next: Arc::new(tokio::sync::Mutex::new(next)), notes: notes_tx });
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, api).await;
        });

        let mut command = Command::new(&setup.binary);
        command
            .env_clear()
            .envs(lambda_env(setup, &addr.to_string()))
            .envs(passed_through())
            .envs(setup.env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let started = Instant::now();
        let mut child = command.spawn().map_err(|source| InvokeError::Spawn { path: setup.binary.clone(), source })?;
        let tail = Tail::default();
        let mut forwarders = Vec::new();
        if let Some(out) = child.stdout.take() {
            forwarders.push(forward(out, tail.clone()));
        }
        if let Some(err) = child.stderr.take() {
            forwarders.push(forward(err, tail.clone()));
        }
        Ok(Self { child, notes, events, tail, forwarders, server, started, polls: 0 })
    }

    /// Waits for the next note, the process's exit or `deadline`.
    async fn wait(&mut self, deadline: Deadline) -> Waited {
        tokio::select! {
            biased;
            Some(note) = self.notes.recv() => Waited::Note(note),
            status = self.child.wait() => Waited::Exited(status),
            () = tokio::time::sleep_until(deadline) => Waited::TimedOut,
        }
    }

    /// Waits for the function's next poll; `during` names the phase for a failure report.
    async fn next_poll(&mut self, timeout: Duration, during: &str) -> Result<Instant, Failure> {
        let deadline = Deadline::now() + timeout;
        loop {
            match self.wait(deadline).await {
                Waited::Note(Note::Poll(at)) => {
                    self.polls += 1;
                    return Ok(at);
                }
                Waited::Note(Note::Answer { .. }) => {}
                Waited::Note(Note::InitError(body)) => return Err(self.init_error(body).await),
                Waited::Exited(status) => return Err(self.exited(status, during).await),
                Waited::TimedOut => return Err(self.failure("timeout", format!("did not poll for an event within {} s {during}", timeout.as_secs()), None).await),
            }
        }
    }

    /// Hands `payload` to the polling function and waits for its answer.
    /// Returns the answer's kind (`response` or `error`), its body, and when it was handed
    /// over and answered.
    async fn invoke(&mut self, setup: &Setup, event: &str, payload: &Bytes) -> Result<(&'static str, Bytes, Instant, Instant), Failure> {
        let request_id = uuid::Uuid::new_v4().to_string();
        let epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let random = uuid::Uuid::new_v4().simple().to_string();
        let invocation = Invocation {
            request_id: request_id.clone(),
            payload: payload.clone(),
            deadline_ms: (epoch + setup.timeout).as_millis(),
            function_arn: format!("arn:aws:lambda:{}:{ACCOUNT_ID}:function:{}", setup.region, setup.name),
            trace_id: format!("Root=1-{:08x}-{};Parent={};Sampled=0", epoch.as_secs(), &random[..24], &random[16..]),
        };
        let handed = Instant::now();
        let deadline = Deadline::now() + setup.timeout;
        if self.events.send(invocation).await.is_err() {
            return Err(self.failure("exit", "the Runtime API stopped".into(), None).await);
        }
        loop {
            match self.wait(deadline).await {
                Waited::Note(Note::Answer { request_id: id, kind, body, at }) if id == request_id => {
                    return Ok((kind, body, handed, at));
                }
                Waited::Note(Note::Poll(_)) => self.polls += 1,
                Waited::Note(Note::Answer { .. }) => {}
                Waited::Note(Note::InitError(body)) => return Err(self.init_error(body).await),
                Waited::Exited(status) => return Err(self.exited(status, &format!("while handling {event}")).await),
                Waited::TimedOut => {
                    return Err(self.failure("timeout", format!("did not answer {event} within {} s", setup.timeout.as_secs()), None).await);
                }
            }
        }
    }

    async fn init_error(&mut self, body: Bytes) -> Failure {
        let _ = tokio::time::timeout(EXIT_GRACE, self.child.wait()).await;
        let message = format!("reported an init error: {}", String::from_utf8_lossy(&body));
        self.failure("init_error", message, Some(payload_value(&body))).await
    }

    async fn exited(&mut self, status: std::io::Result<ExitStatus>, during: &str) -> Failure {
        let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
        let kind = if self.polls == 0 { "init_error" } else { "exit" };
        self.failure(kind, format!("exited {during} ({status})"), None).await
    }

    /// Stops the process and collects its last output into a failure report.
    async fn failure(&mut self, kind: &'static str, message: String, payload: Option<Value>) -> Failure {
        self.stop().await;
        let log: Vec<String> = self.tail.lock().map(|t| t.iter().cloned().collect()).unwrap_or_default();
        Failure { kind, message, payload, log }
    }

    async fn stop(&mut self) {
        let _ = self.child.kill().await;
        let drained = Deadline::now() + DRAIN_GRACE;
        for mut forwarder in self.forwarders.drain(..) {
            if tokio::time::timeout_at(drained, &mut forwarder).await.is_err() {
                forwarder.abort();
            }
        }
        self.server.abort();
    }
}

/// Why a process did not serve its events.
struct Failure {
    kind: &'static str,
    message: String,
    payload: Option<Value>,
    log: Vec<String>,
}

fn payload_value(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

/// Reads the process's peak resident set size (`VmHWM`, Linux only).
fn peak_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?;
    line.trim().strip_suffix("kB")?.trim().parse().ok()
}

/// Starts the function once and feeds it every event; prints each answer as it arrives.
async fn run_once(setup: &Setup, json_output: bool) -> Result<Start, InvokeError> {
    let mut process = Process::start(setup).await?;
    match serve_events(&mut process, setup, json_output).await {
        Ok(start) => Ok(start),
        Err(Served::Output(e)) => {
            process.stop().await;
            Err(InvokeError::Output(e))
        }
        Err(Served::Failed(event, failure)) => {
            let last = failure.log.last().cloned().unwrap_or_default();
            if json_output {
                let line = json!({
                    "event": event, "kind": failure.kind, "message": failure.message,
                    "payload": failure.payload, "log": failure.log,
                });
                crate::output::line(line)?;
            }
            let output = if last.is_empty() { String::new() } else { format!("; its last output: {last}") };
            Err(InvokeError::Function(format!("{} {}{output}", setup.name, failure.message)))
        }
    }
}

async fn serve_events(process: &mut Process, setup: &Setup, json_output: bool) -> Result<Start, Served> {
    let first_poll = process.next_poll(setup.timeout, "during init").await.map_err(|f| Served::Failed(None, f))?;
    let mut first_answer = None;
    for (event, payload) in &setup.events {
        let (kind, body, handed, answered) = process.invoke(setup, event, payload).await.map_err(|f| Served::Failed(Some(event.clone()), f))?;
        first_answer.get_or_insert(answered - process.started);
        print_answer(event, kind, &body, answered - handed, json_output).map_err(Served::Output)?;
        process.next_poll(setup.timeout, &format!("after answering {event}")).await.map_err(|f| Served::Failed(Some(event.clone()), f))?;
    }
    let peak_rss_kb = process.child.id().and_then(peak_rss_kb);
    process.stop().await;
    Ok(Start {
        init: first_poll - process.started,
        first_answer,
        peak_rss_kb,
        polls: process.polls,
        invocations: setup.events.len(),
    })
}

/// Why serving the events stopped early.
enum Served {
    /// The function failed, at init (no event) or at an event.
    Failed(Option<String>, Failure),
    /// Our output could not be written (the reader went away).
    Output(std::io::Error),
}

fn print_answer(event: &str, kind: &str, body: &[u8], took: Duration, json_output: bool) -> std::io::Result<()> {
    let payload = payload_value(body);
    if json_output {
        crate::output::line(json!({ "event": event, "kind": kind, "payload": payload, "ms": ms(took) }))
    } else {
        crate::output::line(format!("{event}: {kind} in {} ms\n{payload}", ms(took)))
    }
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some(((values[n / 2 - 1] + values[n / 2]) / 2.0 * 10.0).round() / 10.0),
    }
}

fn print_summary(setup: &Setup, starts: &[Start], json_output: bool) -> std::io::Result<()> {
    let inits: Vec<f64> = starts.iter().map(|s| ms(s.init)).collect();
    let init = median(inits.clone());
    let first = median(starts.iter().filter_map(|s| s.first_answer.map(ms)).collect());
    let rss = starts.iter().filter_map(|s| s.peak_rss_kb).max();
    let invocations: usize = starts.iter().map(|s| s.invocations).sum();
    let polls: usize = starts.iter().map(|s| s.polls).sum();
    if json_output {
        let line = json!({
            "kind": "summary", "function": setup.name, "starts": starts.len(), "invocations": invocations,
            "polls": polls, "init_ms": init, "init_ms_each": inits, "first_response_ms": first, "peak_rss_kb": rss,
        });
        return crate::output::line(line);
    }
    let of = if starts.len() > 1 { format!(" (median of {} starts)", starts.len()) } else { String::new() };
    let first = first.map_or_else(|| "-".into(), |v| format!("{v} ms"));
    let rss = rss.map_or_else(|| "-".into(), |kb| format!("{:.1} MiB", kb as f64 / 1024.0));
    crate::output::line(format!(
        "{}: init {} ms{of}, first response {first}, peak RSS {rss}; {} start(s), {invocations} invocation(s), {polls} poll(s)",
        setup.name,
        init.unwrap_or_default(),
        starts.len()
    ))
}
