//! The `ferry` binary: parse the command line, start logging, run the command, and turn its
//! outcome into an exit code (see [`ferry::Error::exit_code`]).

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use ferry::cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ferry: {error:#}");
            let code = error.downcast_ref::<ferry::Error>().map_or(1, ferry::Error::exit_code);
            ExitCode::from(code)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    ferry::telemetry::init(&cli.log, cli.log_format).context("could not start logging")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("could not start the Tokio runtime")?;
    let result = runtime.block_on(ferry::run(cli));
    // Blocking Kafka calls (a commit waiting on an unreachable coordinator) must not keep the
    // process from exiting once the command is done.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    result?;
    Ok(())
}
