//! Writing to stdout and stderr without panicking: a closed pipe (`cadenhq outbox list | head`)
//! is an error the command returns, and ends quietly.

use std::fmt::Display;
use std::io::Write;

/// Writes `text` and a newline to stdout, flushed.
///
/// # Errors
/// The write error; [`std::io::ErrorKind::BrokenPipe`] when the reader has gone.
pub fn line(text: impl Display) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")?;
    out.flush()
}

/// Writes `text` to stdout exactly as it is, flushed.
///
/// # Errors
/// As [`line`].
pub fn raw(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

/// Writes one line to stderr; there is nowhere to report a failure to.
pub fn error_line(text: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

/// Whether `e` says that the reader of our output has gone.
pub fn is_closed(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::BrokenPipe
}
