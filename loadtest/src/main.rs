//! `ferry-loadtest`: parse the command, run it, map the outcome to an exit code (non-zero on any
//! lost or wrong answer).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "ferry-loadtest", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Drive load at a running fleet through Kafka and report latency and throughput.
    Run(ferry_loadtest::run::RunArgs),
    /// Start (or attach to) a broker and workers, drive load while injecting faults, and verify
    /// every answer against the uninterrupted reference.
    Chaos(ferry_loadtest::chaos::ChaosArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferry-loadtest: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Run(args) => ferry_loadtest::run::run(args).await,
            Command::Chaos(args) => ferry_loadtest::chaos::run(args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry-loadtest: {e:#}");
            ExitCode::from(2)
        }
    }
}
