//! Structured logging. Log lines carry account and prospect ids and hashes, never a raw email
//! address or API key; the libraries below us are held to the same whatever `RUST_LOG` asks
//! (see [`CAPPED_TARGETS`]), and colour codes are written only to a terminal.

use std::io::IsTerminal;

use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line (Lambda, where CloudWatch adds the timestamp).
    Json,
    /// Human-readable lines on stderr (the local server and the CLI).
    Text,
}

/// Target prefixes of the libraries whose own debug and trace output carries what a request
/// or an event holds: the Lambda runtime (`lambda_runtime` traces every raw event), the AWS
/// SDK and smithy runtime (requests, responses and operation outputs at trace, the signer's
/// canonical request), the HTTP stack (hyper, h2, rustls, tower, axum, reqwest) and lettre
/// (the SMTP dialogue, recipients included, at debug). They log at `info` and above only,
/// whatever `RUST_LOG` says: the cap is a second filter beside it, not a directive in it.
pub const CAPPED_TARGETS: &[&str] = &["lambda_", "aws_", "hyper", "h2", "rustls", "tower", "axum", "reqwest", "lettre"];

/// The most verbose level a [`CAPPED_TARGETS`] library may log at.
pub const CAPPED_LEVEL: LevelFilter = LevelFilter::INFO;

/// The cap on [`CAPPED_TARGETS`]; everything else passes (to `RUST_LOG`'s filter).
fn library_caps() -> Targets {
    CAPPED_TARGETS
        .iter()
        .fold(Targets::new().with_default(LevelFilter::TRACE), |caps, target| caps.with_target(*target, CAPPED_LEVEL))
}

/// Installs the global subscriber; `RUST_LOG` overrides the default level (`info`) within
/// the library caps. ANSI colours only when stderr is a terminal.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::stderr().is_terminal();
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    let registry = tracing_subscriber::registry().with(filter).with(library_caps());
    let _ = match format {
        LogFormat::Json => registry.with(layer.json().without_time().with_current_span(true)).try_init(),
        LogFormat::Text => registry.with(layer).try_init(),
    };
}

/// An error and all its causes on one line: `outer: cause: root cause`.
#[must_use]
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use tracing::Level;

    use super::*;

    #[test]
    fn library_debug_and_trace_output_is_capped_and_ours_is_not() {
        let caps = library_caps();
        for target in [
            "lambda_runtime::layers::api_response",
            "lambda_http",
            "aws_smithy_runtime::client::orchestrator",
            "aws_sigv4",
            "hyper_util::client",
            "lettre::transport::smtp",
        ] {
            assert!(!caps.would_enable(target, &Level::TRACE), "{target} at trace");
            assert!(!caps.would_enable(target, &Level::DEBUG), "{target} at debug");
            assert!(caps.would_enable(target, &Level::INFO), "{target} at info");
        }
        for target in ["shared::scheduler", "cadenhq", "prospects_post"] {
            assert!(caps.would_enable(target, &Level::TRACE), "{target} at trace");
        }
    }
}
