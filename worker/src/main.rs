//! `ferry-worker`: parse the configuration, start logging, load the model, serve until a signal.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use ferry_worker::config::{Config, LogFormat};
use ferry_worker::consumer::{Worker, WorkerOptions};
use ferry_worker::engine::Engine;
use ferry_worker::model::Model;
use ferry_worker::snapshot::Snapshots;
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

// Two runtime threads: a rebalance callback blocks the thread that polls the consumer while the
// revoked partitions' requests settle on the other (the model runs on its own thread).
#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn run(config: Config) -> anyhow::Result<()> {
    let worker_id = config.runtime.worker_id();
    let started = Instant::now();
    let opts = config.model.load_options();
    let device = config.runtime.device.open()?;
    let device_for_snapshots = device.clone();
    let model = tokio::task::spawn_blocking(move || Model::load(&opts, &device))
        .await
        .context("model loader panicked")??;
    info!(model = %model.name, sha256 = %model.sha256, context = model.context_length,
        load_ms = started.elapsed().as_millis() as u64, "model loaded");
    let bootstrap = match &config.kafka.bootstrap_file {
        Some(path) => ferry_worker::config::read_bootstrap_file(path, Duration::from_secs(60)).await?,
        None => config.kafka.bootstrap_servers.clone(),
    };
    let snapshots = match &config.snapshot.snapshot_store {
        Some(url) => {
            let store = ferry_worker::snapshot::store::open(url, config.snapshot.snapshot_ttl).await?;
            let weights = format!("{:?}", config.model.weights).to_lowercase();
            let s = Snapshots::new(store, config.snapshot.policy(), &model, &weights, &device_for_snapshots);
            s.spawn_sweeper(config.snapshot.snapshot_ttl, Duration::from_secs(300));
            info!(store = %url, every_tokens = config.snapshot.snapshot_every_tokens, mode = ?config.snapshot.resume, "snapshots on");
            Some(s)
        }
        None => {
            info!("no --snapshot-store: interrupted requests will start over");
            None
        }
    };
    let engine = Engine::new(Arc::new(model));
    let worker = Worker::new(
        &bootstrap,
        &config.kafka,
        engine,
        WorkerOptions {
            worker_id,
            snapshots,
            drain_timeout: config.shutdown.drain_timeout,
        },
    )?;
    let (tx, signals) = tokio::sync::watch::channel(0u32);
    tokio::spawn(count_signals(tx));
    worker.run(signals).await?;
    Ok(())
}

/// Counts SIGTERM (Kubernetes eviction) and SIGINT (Ctrl-C): the first starts the drain, the
/// second ends it.
async fn count_signals(tx: tokio::sync::watch::Sender<u32>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            error!("cannot listen for signals");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received"),
            _ = int.recv() => info!("SIGINT received"),
        }
        tx.send_modify(|n| *n += 1);
    }
}
