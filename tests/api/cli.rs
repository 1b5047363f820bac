//! The `cadenhq` binary as a user runs it: the admin commands on both backends, one-line
//! errors for bad input, and `serve` from first start to a clean shutdown and a restart.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use shared::backend::Backend;
use shared::domain::{AccountId, CampaignDefinition, NormalizedEmail, Prospect, UnsubscribeSecret};
use shared::scheduler::DeliverySettings;

use crate::helpers::{create_table, emulator_sdk_config, CAMPAIGN_FILE};

pub(crate) fn cadenhq(data_dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cadenhq"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env_remove("CADENHQ_BACKEND")
        .output()
        .expect("run cadenhq")
}

pub(crate) fn json_of(output: &Output) -> Value {
    assert!(output.status.success(), "stderr: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stdout)))
}

fn str_of<'a>(v: &'a Value, field: &str) -> &'a str {
    v[field].as_str().unwrap_or_else(|| panic!("{field} in {v}"))
}

/// Runs the admin commands end to end with `extra` global arguments; returns the account id.
fn admin_round_trip(run: &dyn Fn(&[&str]) -> Output, campaign_file: &Path) {
    let account = json_of(&run(&["accounts", "create", "--name", "Acme", "--json"]));
    let account_id = str_of(&account, "account_id").to_owned();
    let created = json_of(&run(&["keys", "create", "--account", &account_id, "--label", "prod", "--json"]));
    assert_eq!(created["account_id"], account_id.as_str());
    let key = str_of(&created, "key").to_owned();
    assert!(key.starts_with("chq_"));
    let key_id = str_of(&created, "key_id").to_owned();

    let listed = json_of(&run(&["keys", "list", "--account", &account_id, "--json"]));
    assert_eq!(listed["keys"][0]["label"], "prod");
    assert_eq!(listed["keys"][0]["active"], true);
    assert!(!listed.to_string().contains(&key), "a listing never shows the secret");
    assert!(key.starts_with(str_of(&listed["keys"][0], "prefix")));
    assert_eq!(listed["keys"][0]["last_used_at"], Value::Null);
    assert_eq!(listed["keys"][0]["rate_limit"], json!({"per_second": 20, "burst": 40}), "the default");

    let limited = json_of(&run(&["keys", "limit", &key_id, "--rate", "5", "--burst", "10", "--json"]));
    assert_eq!(limited["rate_limit"], json!({"per_second": 5, "burst": 10}));
    let listed = json_of(&run(&["keys", "list", "--account", &account_id, "--json"]));
    assert_eq!(listed["keys"][0]["rate_limit"], json!({"per_second": 5, "burst": 10}));
    assert!(!run(&["keys", "limit", &key_id, "--rate", "0", "--burst", "1"]).status.success());
    let reset = json_of(&run(&["keys", "limit", &key_id, "--default", "--json"]));
    assert_eq!(reset["default"], true);

    let campaign = json_of(&run(&["campaigns", "create", "--account", &account_id, "--file", campaign_file.to_str().unwrap(), "--default", "--json"]));
    let campaign_id = str_of(&campaign, "campaign_id").to_owned();
    let campaigns = json_of(&run(&["campaigns", "list", "--account", &account_id, "--json"]));
    assert_eq!(campaigns["campaigns"][0]["default"], true);
    assert_eq!(campaigns["campaigns"][0]["steps"].as_array().map(Vec::len), Some(3));
    json_of(&run(&["campaigns", "deactivate", &campaign_id, "--json"]));
    let campaigns = json_of(&run(&["campaigns", "list", "--account", &account_id, "--json"]));
    assert_eq!(campaigns["campaigns"][0]["active"], false);
    assert_eq!(campaigns["campaigns"][0]["default"], false, "a deactivated campaign stops being the default");

    json_of(&run(&["keys", "revoke", &key_id, "--json"]));
    let listed = json_of(&run(&["keys", "list", "--account", &account_id, "--json"]));
    assert_eq!(listed["keys"][0]["active"], false);

    let missing = run(&["prospects", "show", "--account", &account_id, "--email", "nobody@example.com"]);
    assert!(!missing.status.success());
}

#[test]
fn admin_commands_round_trip_on_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("campaign.json");
    std::fs::write(&file, CAMPAIGN_FILE).unwrap();
    let data = dir.path().join("data");
    admin_round_trip(&|args| cadenhq(&data, args), &file);
}

#[tokio::test]
async fn admin_commands_round_trip_on_dynamodb() {
    let sdk = emulator_sdk_config().await;
    let table = format!("cli-{}", uuid::Uuid::new_v4().simple());
    create_table(&sdk, &table).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("campaign.json");
    std::fs::write(&file, CAMPAIGN_FILE).unwrap();
    let data = dir.path().join("unused");
    tokio::task::spawn_blocking(move || {
        admin_round_trip(
            &|args| {
                Command::new(env!("CARGO_BIN_EXE_cadenhq"))
                    .args(["--backend", "aws", "--data-dir"])
                    .arg(&data)
                    .args(args)
                    .env("CADENHQ_TABLE_NAME", &table)
                    .output()
                    .unwrap()
            },
            &file,
        );
        assert!(!data.exists(), "the AWS backend touches no local store");
    })
    .await
    .unwrap();
}

#[test]
fn invalid_input_gets_a_one_line_error_and_a_non_zero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let bad_campaign = dir.path().join("bad.json");
    std::fs::write(&bad_campaign, r#"{"name": "x", "steps": []}"#).unwrap();
    let account = json_of(&cadenhq(dir.path(), &["accounts", "create", "--name", "A", "--json"]));
    let account_id = str_of(&account, "account_id");
    let unknown = uuid::Uuid::new_v4().to_string();
    let cases: Vec<Vec<&str>> = vec![
        vec!["keys", "create", "--account", "not-a-uuid"],
        vec!["keys", "create", "--account", &unknown],
        vec!["keys", "revoke", &unknown],
        vec!["campaigns", "create", "--account", account_id, "--file", "does/not/exist.json"],
        vec!["campaigns", "create", "--account", account_id, "--file", bad_campaign.to_str().unwrap()],
        vec!["campaigns", "deactivate", &unknown],
        vec!["prospects", "show", "--account", account_id],
        vec!["prospects", "show", "--account", account_id, "--email", "not an email"],
        vec!["accounts", "create", "--name", "  "],
        vec!["no-such-command"],
        vec!["--backend", "aws", "accounts", "create", "--name", "X"],
    ];
    for args in cases {
        let mut command = Command::new(env!("CARGO_BIN_EXE_cadenhq"));
        command.arg("--data-dir").arg(dir.path()).args(&args).env_remove("CADENHQ_TABLE_NAME");
        let out = command.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// Starts `cadenhq serve` on a free port; returns the child, its base URL and what it printed
/// before it was ready.
pub(crate) fn start_server(data_dir: &Path) -> (Child, String, String) {
    start_server_with(data_dir, &["--addr", "127.0.0.1:0"], &[])
}

/// [`start_server`] with other `serve` arguments and variables.
#[allow(clippy::zombie_processes)] // the caller waits for it in `interrupt_and_wait`
fn start_server_with(data_dir: &Path, serve_args: &[&str], env: &[(&str, &str)]) -> (Child, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cadenhq"))
        .arg("--data-dir")
        .arg(data_dir)
        .arg("serve")
        .args(serve_args)
        .envs(env.iter().copied())
        .env_remove("CADENHQ_BACKEND")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut printed = String::new();
    loop {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).unwrap() > 0, "server exited early: {printed}");
        printed.push_str(&line);
        if let Some(url) = line.trim().strip_prefix("CadenHQ Prospects API listening on ") {
            let url = url.to_owned();
            std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
            return (child, url, printed);
        }
    }
}

pub(crate) fn interrupt_and_wait(mut child: Child) {
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    assert!(child.wait().unwrap().success(), "clean shutdown on Ctrl-C");
}

#[tokio::test]
async fn serve_prints_a_working_key_on_first_start_and_keeps_data_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let (child, url, printed) = start_server(dir.path());
    let key = printed.split_whitespace().find(|w| w.starts_with("chq_")).expect("key printed").to_owned();
    assert!(printed.contains("curl"), "{printed}");
    let http = reqwest::Client::new();

    let response = http
        .post(format!("{url}/api/v1/prospects"))
        .header("X-CadenHQ-Key", &key)
        .json(&json!({"email": "first@example.com", "external_id": "ext-1", "first_name": "Jane"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);

    // The in-process scheduler sends step 1 of the demo campaign to the outbox.
    let mut emails = Value::Null;
    for _ in 0..50 {
        emails = json_of(&cadenhq(dir.path(), &["outbox", "list", "--json"]));
        if emails["emails"].as_array().is_some_and(|e| !e.is_empty()) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let email = &emails["emails"][0];
    assert_eq!(email["to"], "first@example.com");
    assert_eq!(email["subject"], "Welcome, Jane!");
    let unsubscribe = str_of(email, "unsubscribe_url");
    assert!(unsubscribe.starts_with(&format!("{url}/unsubscribe/")), "{unsubscribe}");
    assert!(str_of(email, "text_body").contains(unsubscribe));
    let text = String::from_utf8(cadenhq(dir.path(), &["outbox", "list"]).stdout).unwrap();
    assert!(text.contains("Welcome, Jane!"), "{text}");
    // What was sent is what is shown: the exact MIME message, headers included.
    let headers: Vec<(String, String)> = serde_json::from_value(email["headers"].clone()).expect("headers as name/value pairs");
    let header = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
    assert_eq!(header("List-Unsubscribe"), Some(format!("<{unsubscribe}>")));
    assert_eq!(header("List-Unsubscribe-Post").as_deref(), Some("List-Unsubscribe=One-Click"));
    let message_id = str_of(email, "message_id");
    assert_eq!(header("Message-ID"), Some(format!("<{message_id}>")));
    let id = email["id"].as_i64().expect("outbox id").to_string();
    let raw = String::from_utf8(cadenhq(dir.path(), &["outbox", "show", &id, "--raw"]).stdout).unwrap();
    assert!(raw.starts_with("From: "), "{raw}");
    assert!(raw.contains(&format!("\r\nMessage-ID: <{message_id}>\r\n")), "{raw}");
    assert!(raw.contains("\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"), "{raw}");
    assert!(raw.contains("Content-Type: multipart/alternative;"), "{raw}");
    let missing = cadenhq(dir.path(), &["outbox", "show", "999999"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no email #999999"), "{missing:?}");
    interrupt_and_wait(child);

    let (child, url, printed) = start_server(dir.path());
    assert!(!printed.contains("chq_"), "no second demo key: {printed}");
    let response = http
        .patch(format!("{url}/api/v1/prospects/external/ext-1"))
        .header("X-CadenHQ-Key", &key)
        .json(&json!({"status": "converted"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "the prospect and the key survived the restart");
    interrupt_and_wait(child);
}

/// `cadenhq` on one backend: the embedded store in `data_dir`, or a DynamoDB table in the
/// emulator (with `data_dir` given too, and never created).
#[derive(Clone)]
struct Cli {
    data_dir: PathBuf,
    table: Option<String>,
}

impl Cli {
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_cadenhq"));
        command.arg("--data-dir").arg(&self.data_dir).env_remove("CADENHQ_BACKEND").env_remove("CADENHQ_UNSUBSCRIBE_SECRET");
        match &self.table {
            Some(table) => command.args(["--backend", "aws"]).env("CADENHQ_TABLE_NAME", table),
            None => command.env_remove("CADENHQ_TABLE_NAME"),
        };
        command.args(args);
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run cadenhq")
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.push("--json");
        json_of(&self.run(&args))
    }

    /// A new account's id.
    fn account(&self, name: &str) -> String {
        str_of(&self.json(&["accounts", "create", "--name", name]), "account_id").to_owned()
    }

    /// A campaign of `account` from `definition`; its id.
    fn campaign(&self, account: &str, definition: &str) -> String {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), definition).unwrap();
        str_of(&self.json(&["campaigns", "create", "--account", account, "--file", file.path().to_str().unwrap()]), "campaign_id").to_owned()
    }

    fn is_aws(&self) -> bool {
        self.table.is_some()
    }
}

/// Runs `check` on the embedded store (a fresh data directory), then on DynamoDB (a fresh
/// table in the emulator); it gets the runner and, on AWS, the SDK configuration.
async fn on_both_backends(check: fn(&Cli)) {
    let dir = tempfile::tempdir().unwrap();
    let embedded = Cli { data_dir: dir.path().join("data"), table: None };
    tokio::task::spawn_blocking(move || check(&embedded)).await.unwrap();

    let sdk = emulator_sdk_config().await;
    let table = format!("cli-{}", uuid::Uuid::new_v4().simple());
    create_table(&sdk, &table).await;
    let aws = Cli { data_dir: dir.path().join("unused"), table: Some(table) };
    let unused = aws.data_dir.clone();
    tokio::task::spawn_blocking(move || check(&aws)).await.unwrap();
    assert!(!unused.exists(), "the AWS backend touches no local store");
}

/// The one line a failed command printed on stderr.
fn error_line(output: &Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "{what} succeeded: {}", String::from_utf8_lossy(&output.stdout));
    assert_eq!(stderr.trim_end().lines().count(), 1, "{what}: {stderr}");
    assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    stderr.trim_end().to_owned()
}

const ONE_STEP: &str = r#"{"name":"One","steps":[{"delay_seconds":0,"subject":"Hi {{ first_name }}","body":"Hello {{ first_name | default('there') }} at {{ metadata.company.name }}"}]}"#;

#[tokio::test]
async fn a_template_the_sender_cannot_render_is_refused_at_creation_naming_step_and_field() {
    on_both_backends(|cli| {
        let account = cli.account("Acme");
        let file = tempfile::NamedTempFile::new().unwrap();
        let broken = r#"{"name":"x","steps":[{"delay_seconds":0,"subject":"ok","body":"ok"},{"delay_seconds":60,"subject":"x {{ first_name | nosuchfilter }}","body":"b"}]}"#;
        std::fs::write(file.path(), broken).unwrap();
        let out = cli.run(&["campaigns", "create", "--account", &account, "--file", file.path().to_str().unwrap()]);
        let line = error_line(&out, "a campaign with an unknown filter");
        assert!(line.contains("step 2: subject cannot be rendered") && line.contains("nosuchfilter"), "{line}");
        let listed = cli.json(&["campaigns", "list", "--account", &account]);
        assert_eq!(listed["campaigns"], json!([]), "nothing was stored");
    })
    .await;
}

#[test]
fn a_first_start_that_fails_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cases: [(&str, &[(&str, &str)]); 5] = [
        ("an unknown mailer", &[("CADENHQ_MAILER", "bogus")]),
        ("smtp without a URL", &[("CADENHQ_MAILER", "smtp")]),
        ("an invalid SMTP URL", &[("CADENHQ_MAILER", "smtp"), ("CADENHQ_SMTP_URL", "ftp://nowhere")]),
        ("a short secret", &[("CADENHQ_UNSUBSCRIBE_SECRET", "short")]),
        ("an invalid sender", &[("CADENHQ_SENDER", "not an address")]),
    ];
    for (what, env) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_cadenhq"))
            .arg("--data-dir")
            .arg(&data)
            .args(["serve", "--addr", "127.0.0.1:0"])
            .env_remove("CADENHQ_BACKEND")
            .env_remove("CADENHQ_MAILER")
            .env_remove("CADENHQ_SMTP_URL")
            .env_remove("CADENHQ_SENDER")
            .env_remove("CADENHQ_UNSUBSCRIBE_SECRET")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        error_line(&out, what);
        assert!(!String::from_utf8_lossy(&out.stdout).contains("chq_"), "{what}: no key printed");
        assert!(!data.exists(), "{what}: no store created");
    }
    // An address in use fails before the store too.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_cadenhq")).arg("--data-dir").arg(&data).args(["serve", "--addr", &addr]).env_remove("CADENHQ_BACKEND").output().unwrap();
    assert!(error_line(&out, "an address in use").contains("cannot listen on"));
    assert!(!data.exists(), "no store created when the address is taken");
}

#[test]
fn missing_arguments_are_named_on_one_line_in_clap_s_words() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&[&str], &str); 7] = [
        (&["keys", "list"], "--account <ID>"),
        (&["keys", "create"], "--account <ID>"),
        (&["keys", "limit"], "<KEY_ID>"),
        (&["campaigns", "create"], "--account <ID> --file <FILE>"),
        (&["accounts", "create"], "--name <NAME>"),
        (&["prospects", "show"], "--account <ID>"),
        (&["invoke"], "--function <FUNCTION>"),
    ];
    for (args, named) in cases {
        let out = cadenhq(dir.path(), args);
        let line = error_line(&out, &args.join(" "));
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(line.starts_with("error: the following required arguments were not provided: "), "{args:?}: {line}");
        assert!(line.contains(named), "{args:?} names {named}: {line}");
        assert!(line.ends_with(&format!("(see cadenhq {} --help)", args.join(" "))), "{args:?}: {line}");
    }
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "no store created");
}

#[test]
fn a_command_group_without_a_subcommand_lists_its_subcommands() {
    let dir = tempfile::tempdir().unwrap();
    for (group, subcommands) in [("keys", &["create", "revoke", "list", "limit"][..]), ("campaigns", &["create", "list", "show", "preview", "deactivate"]), ("accounts", &["create", "list"])] {
        let out = cadenhq(dir.path(), &[group]);
        assert_eq!(out.status.code(), Some(2), "{group}");
        let help = String::from_utf8_lossy(&out.stderr);
        assert!(help.contains(&format!("Usage: cadenhq {group}")), "{group}: {help}");
        for sub in subcommands {
            assert!(help.lines().any(|l| l.trim_start().starts_with(&format!("{sub} "))), "{group} lists {sub}: {help}");
        }
    }
}

#[tokio::test]
async fn output_to_a_closed_pipe_ends_quietly() {
    on_both_backends(|cli| {
        let account = cli.account("Acme");
        cli.campaign(&account, CAMPAIGN_FILE);
        let mut commands: Vec<Vec<&str>> = vec![vec!["campaigns", "list", "--account", &account, "--json"], vec!["accounts", "list"]];
        if !cli.is_aws() {
            commands.push(vec!["outbox", "list", "--json"]);
        }
        for args in commands {
            let mut child = cli.command(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
            drop(child.stdout.take()); // the reader is gone before anything is written
            let out = child.wait_with_output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{args:?}: {:?} {stderr}", out.status);
            assert!(stderr.is_empty(), "{args:?}: {stderr}");
        }
    })
    .await;
}

#[test]
fn read_only_commands_create_no_store_and_say_none_is_there() {
    let dir = tempfile::tempdir().unwrap();
    let nested = dir.path().join("a/b/data");
    let id = uuid::Uuid::new_v4().to_string();
    let file = dir.path().join("campaign.json");
    std::fs::write(&file, CAMPAIGN_FILE).unwrap();
    let cases: Vec<Vec<&str>> = vec![
        vec!["outbox", "list"],
        vec!["accounts", "list"],
        vec!["keys", "list", "--account", &id],
        vec!["keys", "create", "--account", &id],
        vec!["keys", "revoke", &id],
        vec!["keys", "limit", &id, "--default"],
        vec!["campaigns", "list", "--account", &id],
        vec!["campaigns", "show", &id],
        vec!["campaigns", "preview", &id],
        vec!["campaigns", "deactivate", &id],
        vec!["campaigns", "create", "--account", &id, "--file", file.to_str().unwrap()],
        vec!["prospects", "show", "--account", &id, "--email", "a@example.com"],
    ];
    for args in &cases {
        let out = cadenhq(&nested, args);
        let line = error_line(&out, &args.join(" "));
        assert!(line.contains("no store in"), "{args:?}: {line}");
        assert!(!dir.path().join("a").exists(), "{args:?} created {}", nested.display());
        // And the default data directory, in the working directory.
        let out = Command::new(env!("CARGO_BIN_EXE_cadenhq")).args(args).current_dir(dir.path()).env_remove("CADENHQ_DATA_DIR").env_remove("CADENHQ_BACKEND").output().unwrap();
        assert!(error_line(&out, &args.join(" ")).contains("no store in .cadenhq"));
        assert!(!dir.path().join(".cadenhq").exists(), "{args:?} created ./.cadenhq");
    }
    // Creating an account creates the store, parents included; then the listings work.
    json_of(&cadenhq(&nested, &["accounts", "create", "--name", "A", "--json"]));
    assert_eq!(json_of(&cadenhq(&nested, &["outbox", "list", "--json"]))["emails"], json!([]));
}

#[tokio::test]
async fn a_second_serve_on_the_same_data_dir_refuses_while_the_first_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (child, _, _) = start_server(dir.path());
    let second = Command::new(env!("CARGO_BIN_EXE_cadenhq"))
        .arg("--data-dir")
        .arg(dir.path())
        .args(["serve", "--addr", "127.0.0.1:0"])
        .env_remove("CADENHQ_BACKEND")
        .output()
        .unwrap();
    let line = error_line(&second, "a second serve");
    assert!(line.contains("another cadenhq serve is running on"), "{line}");
    assert!(second.stdout.is_empty(), "{}", String::from_utf8_lossy(&second.stdout));
    // Admin commands still work beside the server.
    json_of(&cadenhq(dir.path(), &["accounts", "list", "--json"]));
    interrupt_and_wait(child);
    let (child, _, _) = start_server(dir.path());
    interrupt_and_wait(child);
}

#[tokio::test]
async fn keys_list_text_shows_the_rate_limit_and_an_unknown_account_is_refused() {
    on_both_backends(|cli| {
        let account = cli.account("Acme");
        let key = cli.json(&["keys", "create", "--account", &account]);
        let text = String::from_utf8(cli.run(&["keys", "list", "--account", &account]).stdout).unwrap();
        assert!(text.contains("20/s, bursts of 40 (default)"), "{text}");
        cli.json(&["keys", "limit", str_of(&key, "key_id"), "--rate", "5", "--burst", "10"]);
        let text = String::from_utf8(cli.run(&["keys", "list", "--account", &account]).stdout).unwrap();
        assert!(text.contains("5/s, bursts of 10") && !text.contains("(default)"), "{text}");

        let unknown = uuid::Uuid::new_v4().to_string();
        for args in [["keys", "list", "--account", &unknown], ["campaigns", "list", "--account", &unknown]] {
            let line = error_line(&cli.run(&args), &args.join(" "));
            assert_eq!(line, format!("error: no account {unknown}"));
        }
    })
    .await;
}

/// Reads `serve --json`'s one line; returns the child, the object and what it prints after
/// it (to the end).
#[allow(clippy::zombie_processes)] // the caller waits for it in `interrupt_and_wait`
fn start_json_server(data_dir: &Path, env: &[(&str, &str)]) -> (Child, Value, std::thread::JoinHandle<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cadenhq"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(["serve", "--addr", "127.0.0.1:0", "--json"])
        .envs(env.iter().copied())
        .env_remove("CADENHQ_BACKEND")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let value: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    let rest = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut reader, &mut rest);
        rest
    });
    (child, value, rest)
}

#[tokio::test]
async fn serve_json_prints_one_object_with_the_demo_key_on_first_start() {
    let dir = tempfile::tempdir().unwrap();
    let (child, first, rest) = start_json_server(dir.path(), &[]);
    let url = str_of(&first, "url").to_owned();
    assert_eq!(first["mailer"], "outbox");
    let response = reqwest::Client::new()
        .post(format!("{url}/api/v1/prospects"))
        .header("X-CadenHQ-Key", str_of(&first, "key"))
        .json(&json!({"email": "json@example.com"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201, "the printed key works");
    let accounts = json_of(&cadenhq(dir.path(), &["accounts", "list", "--json"]));
    assert_eq!(accounts["accounts"][0]["account_id"], first["account_id"]);
    assert_eq!(accounts["accounts"][0]["default_campaign_id"], first["campaign_id"]);
    interrupt_and_wait(child);
    assert_eq!(rest.join().unwrap(), "", "one JSON object, nothing more");

    let (child, again, rest) = start_json_server(dir.path(), &[]);
    assert!(again.get("key").is_none() && again.get("account_id").is_none(), "no second demo: {again}");
    assert!(again["url"].as_str().is_some_and(|u| u.starts_with("http://127.0.0.1:")), "{again}");
    interrupt_and_wait(child);
    assert_eq!(rest.join().unwrap(), "");
}

#[tokio::test]
async fn the_banner_names_the_smtp_relay_without_its_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = [("CADENHQ_MAILER", "smtp"), ("CADENHQ_SMTP_URL", "smtp://user:hunter2secret@127.0.0.1:1")];
    let (child, _, printed) = start_server_with(dir.path(), &["--addr", "127.0.0.1:0"], &smtp);
    assert!(printed.contains("sent through the SMTP relay 127.0.0.1:1"), "{printed}");
    assert!(!printed.contains("outbox") && !printed.contains("hunter2secret"), "{printed}");
    interrupt_and_wait(child);
    let (child, value, _) = start_json_server(dir.path(), &smtp);
    assert_eq!(value["mailer"], "smtp");
    interrupt_and_wait(child);
}

#[tokio::test]
async fn serve_resolves_a_host_name_in_addr() {
    let dir = tempfile::tempdir().unwrap();
    let (child, url, _) = start_server_with(dir.path(), &["--addr", "localhost:0"], &[]);
    let response = reqwest::get(format!("{url}/api/v1/openapi.json")).await.unwrap();
    assert_eq!(response.status(), 200);
    interrupt_and_wait(child);
}

#[tokio::test]
async fn one_step_is_one_step_and_schema_errors_name_the_field() {
    on_both_backends(|cli| {
        let account = cli.account("Acme");
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), ONE_STEP).unwrap();
        let path = file.path().to_str().unwrap();
        let created = String::from_utf8(cli.run(&["campaigns", "create", "--account", &account, "--file", path]).stdout).unwrap();
        assert!(created.contains("(One, 1 step)"), "{created}");
        let listed = String::from_utf8(cli.run(&["campaigns", "list", "--account", &account]).stdout).unwrap();
        assert!(listed.contains("  1 step  One"), "{listed}");

        let cases = [
            (r#"{"name":"x","steps":[{"delay_seconds":"soon","subject":"a","body":"b"}]}"#, "campaign file: step 1, delay_seconds: invalid type"),
            (r#"{"name":"x","steps":[{"delay_seconds":0,"subject":"a","body":"b","sender":"me"}]}"#, "campaign file: step 1, sender: unknown field `sender`"),
            (r#"{"name":"x","steps":[{"delay_seconds":0,"subject":"a"}]}"#, "missing field `body`"),
            (r#"{"name":7,"steps":[]}"#, "campaign file: name: invalid type"),
            (r#"{"name":"x","steps":["#, "campaign file is not valid JSON"),
        ];
        for (definition, said) in cases {
            std::fs::write(file.path(), definition).unwrap();
            let line = error_line(&cli.run(&["campaigns", "create", "--account", &account, "--file", path]), definition);
            assert!(line.contains(said), "{definition}: {line}");
            if !said.contains("not valid JSON") {
                assert!(!line.contains("not valid JSON"), "{definition}: {line}");
            }
        }
    })
    .await;
}

#[tokio::test]
async fn accounts_list_shows_every_account_with_its_key_count() {
    on_both_backends(|cli| {
        let first = cli.account("First");
        let second = cli.account("Second");
        cli.json(&["keys", "create", "--account", &first]);
        let key = cli.json(&["keys", "create", "--account", &first]);
        cli.json(&["keys", "revoke", str_of(&key, "key_id")]);

        let listed = cli.json(&["accounts", "list"]);
        let accounts = listed["accounts"].as_array().unwrap();
        assert_eq!(accounts.len(), 2, "{listed}");
        assert_eq!((accounts[0]["account_id"].as_str(), accounts[1]["account_id"].as_str()), (Some(first.as_str()), Some(second.as_str())), "oldest first");
        assert_eq!((accounts[0]["keys"].as_u64(), accounts[0]["active_keys"].as_u64()), (Some(2), Some(1)));
        assert_eq!(accounts[1]["keys"], 0);
        assert!(accounts[0]["created_at"].as_str().is_some());
        let text = String::from_utf8(cli.run(&["accounts", "list"]).stdout).unwrap();
        assert!(text.contains(&format!("{first}  First  created ")) && text.contains("2 keys (1 active)"), "{text}");
        assert!(text.contains(&format!("{second}  Second")) && text.contains("0 keys (0 active)"), "{text}");
    })
    .await;
}

#[tokio::test]
async fn campaigns_show_gives_steps_delays_default_and_state() {
    on_both_backends(|cli| {
        let account = cli.account("Acme");
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), CAMPAIGN_FILE).unwrap();
        let created = cli.json(&["campaigns", "create", "--account", &account, "--file", file.path().to_str().unwrap(), "--default"]);
        let id = str_of(&created, "campaign_id").to_owned();

        let shown = cli.json(&["campaigns", "show", &id]);
        assert_eq!((shown["active"].as_bool(), shown["default"].as_bool()), (Some(true), Some(true)));
        assert_eq!(shown["steps"][1], json!({"delay_seconds": 600, "subject": "Tips", "body": "Here are tips"}));
        let nothing_yet = json!({"step": 2, "claimed": 0, "sent": 0, "retry_scheduled": 0, "rejected": 0, "unknown": 0, "skipped": 0});
        assert_eq!(shown["sends"][1], nothing_yet, "each step's sends counted by state");
        let text = String::from_utf8(cli.run(&["campaigns", "show", &id]).stdout).unwrap();
        assert!(text.contains("active, the account's default"), "{text}");
        assert!(text.contains("Step 1, on enrollment\n  Subject: Hi {{first_name}}"), "{text}");
        assert!(text.contains("Step 2, 10 minutes after the previous step"), "{text}");
        assert!(text.contains("Step 3, 3 days after the previous step"), "{text}");
        assert!(text.contains("  Sends: none yet"), "{text}");

        cli.json(&["campaigns", "deactivate", &id]);
        let shown = cli.json(&["campaigns", "show", &id]);
        assert_eq!((shown["active"].as_bool(), shown["default"].as_bool()), (Some(false), Some(false)));
        assert!(String::from_utf8(cli.run(&["campaigns", "show", &id]).stdout).unwrap().contains("inactive"));

        let unknown = uuid::Uuid::new_v4().to_string();
        assert_eq!(error_line(&cli.run(&["campaigns", "show", &unknown]), "unknown campaign"), format!("error: no campaign {unknown}"));
    })
    .await;
}

const PREVIEW_SECRET: &str = "a-preview-secret-of-at-least-32-bytes!!";

/// Stores a prospect of `account` through the backend's own port, as a POST would.
fn store_prospect(cli: &Cli, account: &str) -> Prospect {
    let account = AccountId::parse(account).unwrap();
    let mut prospect = Prospect::new(account, NormalizedEmail::parse("Ada@Example.com").unwrap(), time::OffsetDateTime::now_utc());
    prospect.fields.set("first_name", Some("Ada <&>".into()));
    let cli = cli.clone();
    let stored = prospect.clone();
    tokio::runtime::Handle::current().block_on(async move {
        let backend = match &cli.table {
            Some(table) => Backend::aws(&emulator_sdk_config().await, table, None),
            None => Backend::embedded(&cli.data_dir).unwrap(),
        };
        backend.repo.insert(stored).await.unwrap();
    });
    prospect
}

#[tokio::test]
async fn campaigns_preview_renders_every_step_as_the_sender_would_and_records_nothing() {
    on_both_backends(|cli| {
        let account = cli.account("Acme");
        let id = cli.campaign(&account, CAMPAIGN_FILE);
        let prospect = store_prospect(cli, &account);
        let before = cli.json(&["prospects", "show", "--account", &account, "--email", "ada@example.com"]);
        let outbox_before = (!cli.is_aws()).then(|| cli.json(&["outbox", "list"]));

        let preview = |args: &[&str]| {
            let mut command = cli.command(&[&["campaigns", "preview", &id, "--json", "--public-url", "https://api.example.com"], args].concat());
            json_of(&command.env("CADENHQ_UNSUBSCRIBE_SECRET", PREVIEW_SECRET).output().unwrap())
        };
        let settings = DeliverySettings {
            sender: "CadenHQ <campaigns@cadenhq.localhost>".into(),
            public_url: "https://api.example.com".into(),
            unsubscribe_secret: UnsubscribeSecret::new(PREVIEW_SECRET.as_bytes().to_vec()).unwrap(),
        };
        let expected_url = settings.unsubscribe_url(&prospect);
        let steps = CampaignDefinition::parse(CAMPAIGN_FILE).unwrap().steps;
        for by in [vec!["--email", "ADA@example.com"], vec!["--prospect-id", &prospect.id.to_string()]] {
            let shown = preview(&by);
            assert_eq!(shown["sample"], false);
            assert_eq!(shown["to"], "Ada@Example.com");
            assert_eq!(shown["unsubscribe_url"], expected_url.as_str());
            assert_eq!(shown["placeholder_secret"], false);
            assert_eq!(shown["steps"].as_array().map(Vec::len), Some(3));
            for (i, step) in steps.iter().enumerate() {
                let email = step.render(&prospect, &expected_url).unwrap();
                let got = &shown["steps"][i];
                assert_eq!((got["subject"].as_str(), got["text_body"].as_str(), got["html_body"].as_str()), (Some(email.subject.as_str()), Some(email.text_body.as_str()), Some(email.html_body.as_str())), "step {}", i + 1);
            }
            assert_eq!(shown["steps"][0]["subject"], "Hi Ada <&>");
            assert!(str_of(&shown["steps"][2], "html_body").contains(&format!("<a href=\"{expected_url}\">Unsubscribe</a>")), "{shown}");
        }
        let sample = preview(&["--sample"]);
        assert_eq!((sample["sample"].as_bool(), sample["prospect_id"].is_null()), (Some(true), true));
        assert_eq!(sample["steps"][0]["subject"], "Hi Jane");
        assert_eq!(preview(&[])["steps"][0]["subject"], "Hi Jane", "the sample is the default");

        // Without a configured secret: a placeholder, said so, and no secret file written.
        let out = cli.run(&["campaigns", "preview", &id]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains("the link's token is a placeholder") && text.contains("Subject: Hi Jane"), "{text}");
        assert!(!cli.data_dir.join("unsubscribe.secret").exists());

        let unknown = uuid::Uuid::new_v4().to_string();
        error_line(&cli.run(&["campaigns", "preview", &id, "--prospect-id", &unknown]), "an unknown prospect");
        error_line(&cli.run(&["campaigns", "preview", &id, "--sample", "--email", "a@example.com"]), "two selectors");

        // Nothing was sent or recorded.
        assert_eq!(cli.json(&["prospects", "show", "--account", &account, "--email", "ada@example.com"]), before);
        if let Some(outbox) = outbox_before {
            assert_eq!(cli.json(&["outbox", "list"]), outbox);
        }
    })
    .await;
}

#[cfg(unix)]
#[test]
fn invoke_ends_on_its_timeout() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    // A function that never polls, and whose child keeps its output pipes open.
    let function = dir.path().join("never-polls");
    std::fs::write(&function, "#!/bin/sh\necho starting\nsleep 5\n").unwrap();
    std::fs::set_permissions(&function, std::fs::Permissions::from_mode(0o755)).unwrap();
    let event = dir.path().join("event.json");
    std::fs::write(&event, "{}").unwrap();
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_cadenhq"))
        .args(["invoke", "--timeout", "1", "--function"])
        .arg(&function)
        .arg("--event")
        .arg(&event)
        .output()
        .unwrap();
    let took = started.elapsed();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.trim_end().lines().last().is_some_and(|l| l.contains("did not poll for an event within 1 s")), "{stderr}");
    assert!(took >= Duration::from_secs(1) && took < Duration::from_millis(1600), "ended after {took:?}");
}

#[tokio::test]
async fn prospects_show_list_and_export_print_what_the_read_api_returns() {
    on_both_backends(|cli| {
        let account = cli.account("Acme");
        let prospect = store_prospect(cli, &account);
        let id = prospect.id.to_string();

        let shown = cli.json(&["prospects", "show", "--account", &account, "--id", &id]);
        assert_eq!((shown["id"].as_str(), shown["email"].as_str(), shown["status"].as_str()), (Some(id.as_str()), Some("Ada@Example.com"), Some("new")));
        assert_eq!((shown["first_name"].as_str(), shown["status_reason"].as_str()), (Some("Ada <&>"), Some("api")));
        assert_eq!(shown["enrollments"], json!([]));

        let page = cli.json(&["prospects", "list", "--account", &account]);
        assert_eq!(page["data"], json!([shown]), "the page holds the same resource");
        assert_eq!((page["has_more"].as_bool(), page["next_cursor"].is_null()), (Some(false), true));
        let text = String::from_utf8(cli.run(&["prospects", "list", "--account", &account, "--status", "new"]).stdout).unwrap();
        assert!(text.starts_with(&format!("{id}  Ada@Example.com  new  created ")), "{text}");
        let none = String::from_utf8(cli.run(&["prospects", "list", "--account", &account, "--status", "bounced"]).stdout).unwrap();
        assert_eq!(none.trim_end(), "No prospects.");
        let bad = cli.run(&["prospects", "list", "--account", &account, "--limit", "500"]);
        assert!(error_line(&bad, "a limit over 100").contains("limit must be an integer from 1 to 100"), "{bad:?}");

        let export = cli.json(&["prospects", "export", "--account", &account, "--id", &id]);
        assert_eq!(export["prospect"], shown);
        assert_eq!((export["emails"].clone(), export["status_changes"].clone()), (json!([]), json!([])));
        let unknown = uuid::Uuid::new_v4().to_string();
        let missing = cli.run(&["prospects", "export", "--account", &account, "--id", &unknown]);
        assert_eq!(error_line(&missing, "an unknown prospect"), "error: prospect not found");
    })
    .await;
}

#[tokio::test]
async fn an_erased_prospect_leaves_nothing_in_the_outbox_or_the_database_files() {
    let dir = tempfile::tempdir().unwrap();
    let (child, url, printed) = start_server(dir.path());
    let key = printed.split_whitespace().find(|w| w.starts_with("chq_")).expect("key printed").to_owned();
    let http = reqwest::Client::new();
    let traces = ["Quill.Erase-9z@Example.org", "quill.erase-9z@example.org", "Quillon9z", "crm-9z-erase", "meta-9z-value"];
    let body = json!({"email": traces[0], "first_name": traces[2], "external_id": traces[3], "metadata": {"n": traces[4]}});
    let response = http.post(format!("{url}/api/v1/prospects")).header("X-CadenHQ-Key", &key).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 201);
    let mut emails = Value::Null;
    for _ in 0..50 {
        emails = json_of(&cadenhq(dir.path(), &["outbox", "list", "--json"]));
        if emails["emails"].as_array().is_some_and(|e| !e.is_empty()) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(emails["emails"][0]["to"], traces[0], "the first step is in the outbox");
    let account = str_of(&json_of(&cadenhq(dir.path(), &["accounts", "list", "--json"]))["accounts"][0], "account_id").to_owned();

    let erased = json_of(&cadenhq(dir.path(), &["prospects", "erase", "--account", &account, "--external-id", traces[3], "--json"]));
    assert_eq!(erased["erased"], true);
    let again = cadenhq(dir.path(), &["prospects", "erase", "--account", &account, "--email", traces[1]]);
    assert_eq!(error_line(&again, "a second erasure"), "error: prospect not found");
    assert_eq!(json_of(&cadenhq(dir.path(), &["outbox", "list", "--json"]))["emails"], json!([]), "its email is gone from the outbox");
    interrupt_and_wait(child);

    let mut files = String::new();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        files.push_str(&String::from_utf8_lossy(&std::fs::read(entry.unwrap().path()).unwrap()));
    }
    for trace in traces {
        assert!(!files.contains(trace), "{trace} is still in the database files");
    }
}

#[tokio::test]
async fn integrations_create_prints_the_url_to_paste_and_list_never_shows_the_secret() {
    on_both_backends(|cli| {
        let account = cli.account("Acme");
        let secret = "whsec_9f8e7d6c5b4a39281706f5e4d3c2b1a0";
        let created = cli.json(&["integrations", "create", "--account", &account, "--provider", "stripe", "--secret", secret, "--public-url", "https://api.acme.example/"]);
        let endpoint = str_of(&created, "endpoint_id").to_owned();
        assert_eq!(created["url"], format!("https://api.acme.example/webhooks/stripe/{endpoint}"));
        let listed = cli.json(&["integrations", "list", "--account", &account]);
        assert_eq!(listed["integrations"][0]["endpoint_id"], endpoint.as_str());
        assert_eq!(listed["integrations"][0]["secret_hint"], "...b1a0");
        assert!(!listed.to_string().contains(secret), "{listed}");

        let refused = error_line(&cli.run(&["integrations", "create", "--account", &account, "--provider", "resend", "--secret", "sk_live_oops"]), "a Stripe key as a Resend secret");
        assert!(refused.contains("whsec_") && !refused.contains("sk_live_oops"), "{refused}");
        assert_eq!(cli.json(&["integrations", "events", "--account", &account])["events"], json!([]));

        assert_eq!(cli.json(&["integrations", "delete", &endpoint, "--account", &account])["deleted"], true);
        assert_eq!(cli.json(&["integrations", "list", "--account", &account])["integrations"], json!([]));
        error_line(&cli.run(&["integrations", "delete", &endpoint, "--account", &account]), "deleting it twice");
        if !cli.is_aws() {
            error_line(&cli.run(&["integrations", "list", "--account", &AccountId::new().to_string()]), "an unknown account");
        }
    })
    .await;
}

#[tokio::test]
async fn serve_takes_webhooks_and_integrations_events_lists_them() {
    let dir = tempfile::tempdir().unwrap();
    let (child, url, _) = start_server(dir.path());
    let cli = Cli { data_dir: dir.path().to_owned(), table: None };
    let account = str_of(&cli.json(&["accounts", "list"])["accounts"][0], "account_id").to_owned();
    let created = cli.json(&["integrations", "create", "--account", &account, "--provider", "stripe", "--secret", "whsec_abc123", "--public-url", &url]);
    let endpoint_url = str_of(&created, "url").to_owned();

    let http = reqwest::Client::new();
    let response = http.post(&endpoint_url).header("stripe-signature", "t=1,v1=00").body(r#"{"id":"evt_1"}"#).send().await.unwrap();
    assert_eq!(response.status(), 400);
    let body = r#"{"id":"evt_2","type":"customer.created","data":{"object":{}}}"#;
    let header = crate::helpers::sign(&["stripe", "whsec_abc123", &time::OffsetDateTime::now_utc().unix_timestamp().to_string()], body);
    let response = http.post(&endpoint_url).header("stripe-signature", header).body(body).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let response = http.post(format!("{url}/webhooks/ses")).body("{}").send().await.unwrap();
    assert_eq!(response.status(), 400, "an SNS message that is not one");
    interrupt_and_wait(child);

    let events = cli.json(&["integrations", "events", "--account", &account]);
    let outcomes: Vec<(&str, &str)> = events["events"].as_array().unwrap().iter().map(|e| (str_of(e, "event_id"), str_of(e, "outcome"))).collect();
    assert_eq!(outcomes, [("evt_2", "ignored"), ("", "rejected")]);
    let text = String::from_utf8(cli.run(&["integrations", "events", "--account", &account]).stdout).unwrap();
    assert!(text.contains("stripe") && text.contains("customer.created") && text.contains("ignored"), "{text}");
    let unattributed = cli.json(&["integrations", "events"]);
    assert_eq!(unattributed["events"][0]["provider"], "ses", "{unattributed}");
}
