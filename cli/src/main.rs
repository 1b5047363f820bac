//! `cadenhq`: the local Prospects API server and the admin commands.

mod app;
mod args;
mod invoke;
mod serve;

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match args::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let rendered = e.render().to_string();
            let line = rendered.lines().next().unwrap_or("error: invalid arguments");
            eprintln!("{line} (see cadenhq --help)");
            return ExitCode::from(2);
        }
    };
    shared::telemetry::init(shared::telemetry::LogFormat::Text);
    match app::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
