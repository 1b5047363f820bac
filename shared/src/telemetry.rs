//! Structured logging. Log lines carry account and prospect ids and hashes, never a raw email
//! address or API key.

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line (Lambda, where CloudWatch adds the timestamp).
    Json,
    /// Human-readable lines on stderr (the local server and the CLI).
    Text,
}

/// Installs the global subscriber; `RUST_LOG` overrides the default level (`info`).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().without_time().with_current_span(true).try_init(),
        LogFormat::Text => builder.try_init(),
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
