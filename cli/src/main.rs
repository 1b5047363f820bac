//! `cadenhq`: the local Prospects API server and the admin commands.

mod app;
mod args;
mod invoke;
mod output;
mod serve;

use std::io::Write;
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match args::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            // `cadenhq keys` alone: the help, which lists the subcommands.
            let _ = e.print();
            return ExitCode::from(2);
        }
        Err(e) => {
            output::error_line(&usage_line(&e.render().to_string()));
            return ExitCode::from(2);
        }
    };
    shared::telemetry::init(shared::telemetry::LogFormat::Text);
    match app::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`| head`): nothing is left to say, as with any Unix tool.
        Err(e) if e.is_closed_output() => ExitCode::SUCCESS,
        Err(e) => {
            output::error_line(&format!("error: {e}"));
            let _ = std::io::stderr().flush();
            ExitCode::FAILURE
        }
    }
}

/// Clap's message in one line: its first paragraph (what is wrong, with the arguments it
/// names), and the command whose `--help` tells more.
fn usage_line(rendered: &str) -> String {
    let message = rendered.lines().take_while(|l| !l.trim().is_empty()).map(str::trim).collect::<Vec<_>>().join(" ");
    let message = if message.is_empty() { "error: invalid arguments".to_owned() } else { message };
    let command = rendered
        .lines()
        .find_map(|l| l.trim().strip_prefix("Usage:"))
        .map(|usage| usage.split_whitespace().take_while(|w| !w.starts_with(['-', '<', '['])).collect::<Vec<_>>().join(" "))
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "cadenhq".to_owned());
    format!("{message} (see {command} --help)")
}

