//! `ferry-worker`: parse the configuration, start logging, load the model, serve until a signal.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use ferry_worker::config::{Config, LogFormat};
use ferry_worker::consumer::Worker;
use ferry_worker::engine::Engine;
use ferry_worker::model::Model;
use tracing::{error, info};

fn main() -> ExitCode {
    let config = Config::parse();
    init_logging(&config);
    if let Err(e) = config.validate() {
        error!("{e}");
        return ExitCode::from(2);
    }
    if let Some(threads) = config.runtime.threads {
        // candle and gemm size their thread pools from this variable; it must be set before
        // either starts a thread, which is why it happens first.
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.telemetry.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match config.telemetry.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn run(config: Config) -> anyhow::Result<()> {
    let worker_id = config.runtime.worker_id();
    let started = Instant::now();
    let opts = config.model.load_options();
    let device = config.runtime.device.open()?;
    let model = tokio::task::spawn_blocking(move || Model::load(&opts, &device))
        .await
        .context("model loader panicked")??;
    info!(model = %model.name, sha256 = %model.sha256, context = model.context_length,
        load_ms = started.elapsed().as_millis() as u64, "model loaded");
    let bootstrap = match &config.kafka.bootstrap_file {
        Some(path) => ferry_worker::config::read_bootstrap_file(path, Duration::from_secs(60)).await?,
        None => config.kafka.bootstrap_servers.clone(),
    };
    let engine = Engine::new(Arc::new(model));
    let worker = Worker::new(&bootstrap, &config.kafka, engine, worker_id)?;
    worker.run(shutdown_signal()).await?;
    Ok(())
}

/// Completes on SIGTERM (Kubernetes eviction) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            error!("cannot listen for SIGTERM: {e}");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT received"),
    }
}
