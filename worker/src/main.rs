//! `ferry-worker`: parse the configuration, start logging and the operational endpoints, load
//! the model, serve until a signal (or until the worker finds itself unhealthy). With
//! `--fetch-model-only`: fetch and verify the model, and exit.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use ferry_worker::config::{Config, HttpAddr};
use ferry_worker::consumer::{Worker, WorkerOptions};
use ferry_worker::engine::Engine;
use ferry_worker::model::Model;
use ferry_worker::ops::{self, HealthSource, Ops};
use ferry_worker::snapshot::Snapshots;
use tracing::{error, info};

fn main() -> ExitCode {
    let config = Config::parse();
    let telemetry = &config.telemetry;
    let exporter = telemetry
        .otlp_endpoint
        .as_ref()
        .map(|endpoint| ops::otel::Exporter::new(endpoint, &telemetry.otlp_service_name, &config.runtime.worker_id()));
    let (exporter, exporter_error) = match exporter.transpose() {
        Ok(e) => (e, None),
        Err(e) => (None, Some(e)),
    };
    ops::logging::init(
        telemetry.log_format,
        &telemetry.log,
        exporter.as_ref().map(|e| e.tracer()),
    );
    if let Some(e) = exporter_error {
        error!("{e}");
        return ExitCode::from(2);
    }
    let status = serve(config);
    if let Some(exporter) = exporter {
        exporter.shutdown();
    }
    status
}

/// Everything after logging starts: the exit status of a run, of a model fetch, or of a
/// configuration refused.
fn serve(config: Config) -> ExitCode {
    if let Err(e) = config.validate() {
        error!("{e}");
        return ExitCode::from(2);
    }
    if config.model.fetch_model_only {
        return fetch_model(&config);
    }
    if let Some(threads) = config.runtime.threads {
        // candle and gemm size their thread pools from this variable; it must be set before
        // either starts a thread, which is why it happens first.
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    match run(config) {
        Ok(None) => ExitCode::SUCCESS,
        Ok(Some(reason)) => {
            error!(reason, "drained; exiting unhealthy so that the worker is restarted");
            ExitCode::from(ops::EXIT_UNHEALTHY)
        }
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `--fetch-model-only`: the model into its cache and verified, or a non-zero exit that says why.
fn fetch_model(config: &Config) -> ExitCode {
    match ferry_worker::model::fetch(&config.model.load_options()) {
        Ok(f) => {
            info!(
                path = %f.path.display(),
                sha256 = %f.sha256,
                verified = config.model.model_sha256.is_some(),
                resolve_ms = f.resolve_time.as_millis() as u64,
                hash_ms = f.hash_time.as_millis() as u64,
                "model fetched"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// Serves until drained. `Some(reason)` when the worker tripped (see [`ops::health`]) and
/// should exit unhealthy.
// Two runtime threads: a rebalance callback blocks the thread that polls the consumer while the
// revoked partitions' requests settle on the other (the model runs on its own thread).
#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn run(config: Config) -> anyhow::Result<Option<String>> {
    let worker_id = config.runtime.worker_id();
    let started = Instant::now();
    // The signal counter the consumer drains on: signals and health trips both count.
    let (signal_tx, signals) = tokio::sync::watch::channel(0u32);
    let signal_tx = Arc::new(signal_tx);
    // A consumer loop that stands still for longer than librdkafka tolerates has been dropped
    // from the group already: that is when /healthz fails.
    let ops = Ops::new(
        signal_tx.clone(),
        config.health.breaker_failures,
        config.kafka.max_poll_interval,
    );
    // The endpoints come first: /readyz answers 503 while the model loads. A taken port does not
    // stop the worker: several workers on one machine (the demo, the tests, the chaos harness)
    // share the default addresses, and in Kubernetes, where each pod has its own, probes that
    // never answer make the failure plain anyway (with the error line in the log).
    let endpoints = [
        ("--http-addr", config.telemetry.http_addr, ops::http::Endpoint::MAIN),
        ("--probe-addr", config.telemetry.probe_addr, ops::http::Endpoint::PROBES),
    ];
    for (flag, addr, endpoint) in endpoints {
        let HttpAddr(Some(addr)) = addr else { continue };
        match ops::http::bind(addr, endpoint).await {
            Ok(listener) => {
                tokio::spawn(ops::http::serve(listener, ops.clone(), endpoint));
            }
            Err(e) => {
                error!(%addr, error = %e, "cannot serve {} ({flag}); running without them", endpoint.routes.paths())
            }
        }
    }
    let opts = config.model.load_options();
    let device = config.runtime.device.open()?;
    let device_for_snapshots = device.clone();
    let health_sources = accelerator_health(&device);
    let model = tokio::task::spawn_blocking(move || Model::load(&opts, &device))
        .await
        .context("model loader panicked")??;
    info!(model = %model.name, sha256 = %model.sha256, context = model.context_length,
        load_ms = started.elapsed().as_millis() as u64, "model loaded");
    ops.health.set_model_loaded();
    for source in health_sources {
        tokio::spawn(ops::health::monitor(
            source,
            config.health.health_interval,
            ops.health.clone(),
        ));
    }
    let bootstrap = match &config.kafka.bootstrap_file {
        Some(path) => ferry_worker::config::read_bootstrap_file(path, Duration::from_secs(60)).await?,
        None => config.kafka.bootstrap_servers.clone(),
    };
    let snapshots = match &config.snapshot.snapshot_store {
        Some(url) => {
            let timeout = config.snapshot.snapshot_store_timeout;
            let store = ferry_worker::snapshot::store::open_within(url, config.snapshot.snapshot_ttl, timeout).await?;
            let weights = format!("{:?}", config.model.weights).to_lowercase();
            let s = Snapshots::new(store, config.snapshot.policy(), &model, &weights, &device_for_snapshots)
                .with_store_timeout(timeout)
                .with_max_reply_bytes(config.kafka.max_record_bytes);
            s.spawn_sweeper(config.snapshot.snapshot_ttl, Duration::from_secs(300));
            ops.metrics.attach_snapshot_stats(s.stats.clone());
            info!(store = %ferry_worker::snapshot::store::redact(url), every_tokens = config.snapshot.snapshot_every_tokens, mode = ?config.snapshot.resume, "snapshots on");
            s
        }
        None => {
            info!("no --snapshot-store: interrupted requests will start over");
            Snapshots::none(model.weights.config.clone())
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
            ops: ops.clone(),
        },
    )?;
    tokio::spawn(count_signals(signal_tx));
    worker.run(signals).await?;
    Ok(ops.health.exit_reason())
}

/// What watches the accelerator: with `--device cuda` (in a `cuda` build) the CUDA context, and
/// NVML's view of the same GPU where the driver provides NVML; the test-only injected fault;
/// nothing on the CPU.
fn accelerator_health(device: &candle_core::Device) -> Vec<Arc<dyn HealthSource>> {
    #[cfg(feature = "fault-injection")]
    if let Some(fault) = ops::health::fault::FileFault::from_env() {
        return vec![Arc::new(fault)];
    }
    #[cfg(feature = "cuda")]
    if let Some(cuda) = ops::cuda::CudaHealth::new(device) {
        let nvml = cuda.nvml_uuid().map(|uuid| ops::nvml::NvmlHealth::open(&uuid));
        let mut sources: Vec<Arc<dyn HealthSource>> = vec![Arc::new(cuda)];
        match nvml {
            Some(Ok(nvml)) => sources.push(Arc::new(nvml)),
            Some(Err(e)) => tracing::warn!(error = %e, "no NVML health source; the CUDA context is still checked"),
            None => tracing::warn!("the CUDA device has no UUID; no NVML health source"),
        }
        return sources;
    }
    let _ = device;
    Vec::new()
}

/// Counts SIGTERM (Kubernetes eviction) and SIGINT (Ctrl-C): the first starts the drain, the
/// second ends it.
async fn count_signals(tx: Arc<tokio::sync::watch::Sender<u32>>) {
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
