//! The `cadenhq` binary as a user runs it: the admin commands on both backends, one-line
//! errors for bad input, and `serve` from first start to a clean shutdown and a restart.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

use serde_json::{json, Value};

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
#[allow(clippy::zombie_processes)] // the caller waits for it in `interrupt_and_wait`
pub(crate) fn start_server(data_dir: &Path) -> (Child, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cadenhq"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(["serve", "--addr", "127.0.0.1:0"])
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
