//! The OpenAPI document (`docs/openapi.json`) against the router: it is OpenAPI 3.1 and every
//! `$ref` in it resolves, `GET /api/v1/openapi.json` serves exactly the file, and its paths and
//! methods are exactly the router's routes, both as the router's source declares them (every
//! `.route(...)` names a `*_PATH` constant of `shared/src/http`) and as the running app answers
//! them (a documented method is served; any other method answers 405 with an `Allow` header
//! listing the documented ones). A route added without being documented fails here.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;
use shared::http::{KEY_HEADER, OPENAPI_JSON, OPENAPI_PATH};

use crate::helpers::{Kind, TestApp};

const DOC_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
const HTTP_SOURCES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/src/http");
/// The methods an OpenAPI path item can hold, as its keys spell them.
const OPENAPI_METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];
/// Every method probed on each documented path (HEAD is served wherever GET is).
const PROBED_METHODS: [&str; 9] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "QUERY"];

/// (path in OpenAPI form, method in upper case).
type Operation = (String, String);

fn document() -> Value {
    let text = std::fs::read_to_string(DOC_FILE).expect("docs/openapi.json is readable");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("docs/openapi.json is not JSON: {e}"))
}

fn documented_operations(doc: &Value) -> BTreeSet<Operation> {
    let paths = doc["paths"].as_object().expect("paths is an object");
    paths
        .iter()
        .flat_map(|(path, item)| {
            let item = item.as_object().unwrap_or_else(|| panic!("path item {path} is an object"));
            item.keys()
                .filter(|key| OPENAPI_METHODS.contains(&key.as_str()))
                .map(move |method| (path.clone(), method.to_uppercase()))
        })
        .collect()
}

/// An axum path template in OpenAPI form: `{*external_id}` (a wildcard) is `{external_id}`.
fn openapi_path(axum_path: &str) -> String {
    axum_path.replace("{*", "{")
}

/// Source text without its comment lines, so that prose about routes is not read as routes.
fn code_of(file: &str) -> String {
    file.lines().filter(|line| !line.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n")
}

/// The text between the parenthesis that opens at `open` and its matching close.
fn parenthesized(code: &str, open: usize) -> &str {
    let mut depth = 0;
    for (i, c) in code[open..].char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return &code[open + 1..open + i];
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced parentheses after byte {open}")
}

/// The HTTP methods a method-router expression serves: every `get(`, `post(`, ... in it.
fn methods_of(expression: &str) -> BTreeSet<String> {
    for unsupported in ["any(", "on(", "MethodFilter", "any_service(", "on_service("] {
        assert!(!expression.contains(unsupported), "route serves methods this test cannot read: {expression}");
    }
    let mut methods = BTreeSet::new();
    let bytes = expression.as_bytes();
    let mut start = None;
    for (i, &b) in bytes.iter().enumerate() {
        if b.is_ascii_alphanumeric() || b == b'_' {
            start.get_or_insert(i);
            continue;
        }
        if let Some(s) = start.take() {
            let word = &expression[s..i];
            if b == b'(' && OPENAPI_METHODS.contains(&word) {
                methods.insert(word.to_uppercase());
            }
        }
    }
    assert!(!methods.is_empty(), "no method found in route {expression}");
    methods
}

/// Every (path, method) the router's source declares, with the `*_PATH` constants resolved.
fn routes_in_source() -> BTreeSet<Operation> {
    let mut code = String::new();
    for entry in std::fs::read_dir(HTTP_SOURCES).expect("shared/src/http is readable") {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "rs") {
            code.push_str(&code_of(&std::fs::read_to_string(&path).unwrap()));
            code.push('\n');
        }
    }
    // A merged router's routes are `.route(` calls in these sources too: they are read.
    for unsupported in [".nest(", ".nest_service(", ".route_service("] {
        assert!(!code.contains(unsupported), "the router uses {unsupported}: teach this test to read it");
    }
    let constants: BTreeMap<&str, &str> = code
        .lines()
        .filter_map(|line| {
            let rest = line.trim().strip_prefix("pub const ")?;
            let (name, value) = rest.split_once(": &str = \"")?;
            Some((name, value.strip_suffix("\";")?))
        })
        .filter(|(name, _)| name.ends_with("_PATH"))
        .collect();
    assert!(constants.len() >= 5, "found the path constants: {constants:?}");

    let mut routes = BTreeSet::new();
    for (at, _) in code.match_indices(".route(") {
        let args = parenthesized(&code, at + ".route".len());
        let (path, methods) = args.split_once(',').unwrap_or_else(|| panic!("route without a method router: {args}"));
        let path = path.trim();
        let path = constants
            .get(path)
            .copied()
            .unwrap_or_else(|| panic!("route path {path} is not a *_PATH constant of shared/src/http"));
        for method in methods_of(methods) {
            routes.insert((openapi_path(path), method));
        }
    }
    routes
}

/// Resolves a local `$ref` (`#/components/...`) in the document.
fn resolve<'a>(doc: &'a Value, reference: &str) -> Option<&'a Value> {
    doc.pointer(reference.strip_prefix('#')?)
}

fn check_refs(doc: &Value, value: &Value, at: &str) {
    match value {
        Value::Object(map) => {
            if let Some(reference) = map.get("$ref") {
                let reference = reference.as_str().unwrap_or_default();
                assert!(resolve(doc, reference).is_some(), "{at}: $ref {reference} does not resolve");
            }
            for (key, child) in map {
                check_refs(doc, child, &format!("{at}/{key}"));
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                check_refs(doc, child, &format!("{at}/{i}"));
            }
        }
        _ => {}
    }
}

/// A concrete URL path for a documented template: a fresh id, a well-formed token, an
/// external id with a slash in it.
fn concrete(path: &str) -> String {
    path.replace("{prospect_id}", &uuid::Uuid::new_v4().to_string())
        .replace("{external_id}", "crm/probe-1")
        .replace("{token}", &"0".repeat(128))
        .replace("{provider}", "stripe")
        .replace("{endpoint_id}", &format!("whep_{}", "0".repeat(32)))
}

struct Answer {
    status: u16,
    allow: Option<String>,
    body: String,
}

async fn probe(app: &TestApp, method: &str, path: &str, key: Option<&str>) -> Answer {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut request = app.http.request(method, format!("{}{}", app.base, concrete(path))).body("{}");
    if let Some(key) = key {
        request = request.header(KEY_HEADER, key);
    }
    let response = request.send().await.expect("request reaches the app");
    let status = response.status().as_u16();
    let allow = response.headers().get("allow").and_then(|v| v.to_str().ok()).map(str::to_owned);
    Answer { status, allow, body: response.text().await.unwrap_or_default() }
}

fn is_unknown_route(answer: &Answer) -> bool {
    answer.status == 404 && serde_json::from_str::<Value>(&answer.body).is_ok_and(|b| b["error"] == "Not found")
}

#[test]
fn the_document_is_openapi_3_1_and_every_ref_resolves() {
    let doc = document();

    let version = doc["openapi"].as_str().unwrap_or_default();
    assert!(version.starts_with("3.1."), "openapi is {version:?}");
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    check_refs(&doc, &doc, "#");
    for (path, method) in documented_operations(&doc) {
        let operation = &doc["paths"][&path][method.to_lowercase()];
        let responses = operation["responses"].as_object().unwrap_or_else(|| panic!("{method} {path} has responses"));
        assert!(!responses.is_empty(), "{method} {path} documents no response");
        assert!(operation["operationId"].is_string(), "{method} {path} has an operationId");
    }
    let scheme = &doc["components"]["securitySchemes"]["apiKey"];
    assert_eq!((scheme["type"].as_str(), scheme["in"].as_str()), (Some("apiKey"), Some("header")));
    assert!(scheme["name"].as_str().is_some_and(|n| n.eq_ignore_ascii_case(KEY_HEADER)));
}

#[tokio::test]
async fn the_served_document_is_the_file() {
    let app = TestApp::spawn(Kind::Embedded).await;

    let response = app.http.get(format!("{}{OPENAPI_PATH}", app.base)).send().await.unwrap();

    assert_eq!(response.status(), 200);
    let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    assert!(content_type.starts_with("application/json"), "{content_type}");
    let served = response.text().await.unwrap();
    let file = std::fs::read_to_string(DOC_FILE).unwrap();
    assert!(served == file, "the served document differs from docs/openapi.json: rebuild");
    assert!(OPENAPI_JSON == file);
}

#[test]
fn the_documented_paths_and_methods_are_the_routes_of_the_router() {
    let documented = documented_operations(&document());
    let routed = routes_in_source();

    let undocumented: Vec<_> = routed.difference(&documented).collect();
    let unrouted: Vec<_> = documented.difference(&routed).collect();
    assert!(undocumented.is_empty(), "routes missing from docs/openapi.json: {undocumented:?}");
    assert!(unrouted.is_empty(), "documented but not routed: {unrouted:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_method_is_served_and_every_other_answers_405() {
    let app = TestApp::spawn(Kind::Embedded).await;
    let documented = documented_operations(&document());
    let paths: BTreeSet<&String> = documented.iter().map(|(path, _)| path).collect();

    for path in paths {
        let methods: BTreeSet<&str> = documented.iter().filter(|(p, _)| p == path).map(|(_, m)| m.as_str()).collect();
        for method in PROBED_METHODS {
            let answer = probe(&app, method, path, Some(&app.key)).await;
            let served = methods.contains(method) || (method == "HEAD" && methods.contains("GET"));
            if served {
                assert!(answer.status != 405 && !is_unknown_route(&answer), "{method} {path} is documented but answered {} {}", answer.status, answer.body);
            } else {
                assert_eq!(answer.status, 405, "{method} {path} is not documented but answered {} {}", answer.status, answer.body);
                let allow: BTreeSet<String> =
                    answer.allow.unwrap_or_default().split(',').map(|m| m.trim().to_uppercase()).filter(|m| m != "HEAD").collect();
                let expected: BTreeSet<String> = methods.iter().map(|m| (*m).to_owned()).collect();
                assert_eq!(allow, expected, "Allow of {method} {path}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_the_operations_the_document_secures_need_a_key() {
    let app = TestApp::spawn(Kind::Embedded).await;
    let doc = document();

    for (path, method) in documented_operations(&doc) {
        let operation = &doc["paths"][&path][method.to_lowercase()];
        let security = operation.get("security").unwrap_or(&doc["security"]);
        let secured = security.as_array().is_some_and(|s| !s.is_empty());

        let answer = probe(&app, &method, &path, None).await;

        assert_eq!(answer.status == 401, secured, "{method} {path} without a key answered {} {}", answer.status, answer.body);
    }
}
