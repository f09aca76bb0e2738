//! `ferry-loadtest chaos`: a broker and a fleet of workers under streaming load while faults
//! are injected, then every answer checked against the uninterrupted reference.
//!
//! The run, in order: start `ferry broker` (or attach to `--bootstrap-servers`) with topics and
//! a group of its own, start `--workers` workers sharing a file snapshot store in `--out`, start
//! the tracker, then drive the load (`stream: true`) while the fault schedule runs
//! ([`inject`]) and, with `--autoscale`, KEDA's rule ([`crate::autoscale`]). Once the load is
//! sent, faults stop; the run waits for every answer (`--answer-timeout`), stops the fleet
//! gracefully, computes the reference with `ferry-generate` on the same model and weights,
//! verifies ([`crate::verify`]) and writes `report.json` and `chart.svg` to `--out`. The exit
//! status is 1 when any request was lost or answered wrongly.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::autoscale::{OffsetResetPolicy, ScalerSpec, Target};
use crate::faults::{self, schedule, Action, DefaultSpec, Scenario, Step};
use crate::fleet::{default_bin_dir, BrokerKind, Fleet, WorkerSpec};
use crate::load::{self, Limit, LoadSpec, Mode};
use crate::metrics::{Progress, Report};
use crate::prompts::PromptSet;
use crate::record::{FaultEvent, FaultKind, RequestRecord};
use crate::track::Tracker;
use crate::verify;

mod inject;
mod report;

/// The chaos command's flags; every one also reads a `FERRY_CHAOS_*` variable.
#[derive(Debug, Clone, Args)]
pub struct ChaosArgs {
    /// Workers at the start (the fleet's size, which replacements restore).
    #[arg(long, env = "FERRY_CHAOS_WORKERS", default_value_t = 3)]
    pub workers: usize,
    /// Requests to send (unless `--duration` is given).
    #[arg(long, env = "FERRY_CHAOS_REQUESTS", default_value_t = 150)]
    pub requests: usize,
    /// Send for this long instead of a number of requests (`90s`, `5m`).
    #[arg(long, env = "FERRY_CHAOS_DURATION", value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Open loop: Poisson arrivals at this many requests per second.
    #[arg(long, env = "FERRY_CHAOS_RATE", conflicts_with = "concurrency")]
    pub rate: Option<f64>,
    /// Closed loop (the default): this many requests in flight.
    #[arg(long, env = "FERRY_CHAOS_CONCURRENCY", default_value_t = 6)]
    pub concurrency: usize,
    /// The fault schedule.
    #[arg(long, env = "FERRY_CHAOS_SCENARIO", value_enum, default_value = "default")]
    pub scenario: Scenario,
    /// Time between two faults of the default scenario.
    #[arg(long, env = "FERRY_CHAOS_FAULT_EVERY", value_parser = humantime::parse_duration, default_value = "8s")]
    pub fault_every: Duration,
    /// No fault before this long after the load starts (workers load the model and join).
    #[arg(long, env = "FERRY_CHAOS_WARMUP", value_parser = humantime::parse_duration, default_value = "10s")]
    pub warmup: Duration,
    /// At most this many faults, whatever the run's length: a slower machine makes the same
    /// load last longer, and without a cap it meets more faults (and a request killed
    /// `--max-attempts` times is rightly given up). Unset: as many as the load lasts.
    #[arg(long, env = "FERRY_CHAOS_MAX_FAULTS")]
    pub max_faults: Option<usize>,
    /// Only these kinds of faults (comma-separated) from the scenario; the faults kept take the
    /// scenario's first slots, one every `--fault-every` after the warm-up.
    #[arg(
        long,
        env = "FERRY_CHAOS_FAULT_KINDS",
        value_enum,
        value_delimiter = ',',
        default_value = "evict,crash,freeze,node-drain,broker-outage,broker-crash"
    )]
    pub fault_kinds: Vec<Kind>,
    /// Scale the fleet by KEDA's Kafka rule on the group's lag.
    #[arg(long, env = "FERRY_CHAOS_AUTOSCALE")]
    pub autoscale: bool,
    /// KEDA's `lagThreshold`.
    #[arg(long, env = "FERRY_CHAOS_LAG_THRESHOLD", default_value_t = 4)]
    pub lag_threshold: u64,
    /// KEDA's `activationLagThreshold`.
    #[arg(long, env = "FERRY_CHAOS_ACTIVATION_LAG_THRESHOLD", default_value_t = 0)]
    pub activation_lag_threshold: u64,
    /// KEDA's `minReplicaCount`.
    #[arg(long, env = "FERRY_CHAOS_MIN_REPLICAS", default_value_t = 1)]
    pub min_replicas: usize,
    /// KEDA's `maxReplicaCount` (the partition count when not given).
    #[arg(long, env = "FERRY_CHAOS_MAX_REPLICAS")]
    pub max_replicas: Option<usize>,
    /// Partitions of the request topic.
    #[arg(long, env = "FERRY_CHAOS_PARTITIONS", default_value_t = 3)]
    pub partitions: u32,
    /// The broker the harness starts: a real single-node Apache Kafka (`ferry broker --kafka`),
    /// or librdkafka's mock (`ferry broker`), on which broker crashes are skipped (it keeps
    /// nothing to restart with).
    #[arg(long, env = "FERRY_CHAOS_BROKER", value_enum, default_value = "kafka")]
    pub broker: BrokerKind,
    /// The workers' `--delivery`: `at-least-once` (the worker's default), or `exactly-once`
    /// (transactions; real Kafka only). The report's `duplicates` are what a `read_committed`
    /// reader saw under it.
    #[arg(long, env = "FERRY_CHAOS_DELIVERY", default_value = "at-least-once", value_parser = ["at-least-once", "exactly-once"])]
    pub delivery: String,
    /// Attach to this cluster instead of starting a broker (the broker's faults are skipped).
    #[arg(long, env = "FERRY_CHAOS_BOOTSTRAP_SERVERS")]
    pub bootstrap_servers: Option<String>,
    /// The GGUF model the workers and the reference run.
    #[arg(
        long,
        env = "FERRY_CHAOS_MODEL",
        default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
    )]
    pub model: PathBuf,
    /// Weight format of the workers and the reference (`q8-0` or `native`).
    #[arg(long, env = "FERRY_CHAOS_WEIGHTS", default_value = "q8-0")]
    pub weights: String,
    /// Prompt templates (JSON lines); the shipped set when not given.
    #[arg(long, env = "FERRY_CHAOS_PROMPTS")]
    pub prompts: Option<PathBuf>,
    /// Cap every request's `max_tokens` at this.
    #[arg(long, env = "FERRY_CHAOS_MAX_TOKENS")]
    pub max_tokens: Option<u32>,
    /// Where the report, the chart, the logs and the snapshot store go.
    #[arg(long, env = "FERRY_CHAOS_OUT", default_value = "target/chaos")]
    pub out: PathBuf,
    /// Seeds the load and the fault schedule.
    #[arg(long, env = "FERRY_CHAOS_SEED", default_value_t = 1)]
    pub seed: u64,
    /// A replacement starts this long after a worker is evicted or killed.
    #[arg(long, env = "FERRY_CHAOS_RESTART_DELAY", value_parser = humantime::parse_duration, default_value = "2s")]
    pub restart_delay: Duration,
    /// How long to wait for the last answers once the load is sent.
    #[arg(long, env = "FERRY_CHAOS_ANSWER_TIMEOUT", value_parser = humantime::parse_duration, default_value = "180s")]
    pub answer_timeout: Duration,
    /// An extra argument for every worker (repeat the flag; a flag given here replaces the
    /// harness's own setting of it).
    #[arg(
        long = "worker-arg",
        env = "FERRY_CHAOS_WORKER_ARGS",
        value_delimiter = ' ',
        allow_hyphen_values = true
    )]
    pub worker_args: Vec<String>,
    /// Where `ferry`, `ferry-worker` and `ferry-generate` are (next to this executable by default).
    #[arg(long, env = "FERRY_CHAOS_BIN_DIR")]
    pub bin_dir: Option<PathBuf>,
}

/// A kind of fault, as `--fault-kinds` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    Evict,
    Crash,
    Freeze,
    NodeDrain,
    BrokerOutage,
    BrokerCrash,
}

impl Kind {
    fn of(action: Action) -> Kind {
        match action {
            Action::Evict => Kind::Evict,
            Action::Crash => Kind::Crash,
            Action::Freeze(_) => Kind::Freeze,
            Action::NodeDrain(_) => Kind::NodeDrain,
            Action::BrokerOutage(_) => Kind::BrokerOutage,
            Action::BrokerCrash(_) => Kind::BrokerCrash,
        }
    }
}

/// What every worker gets unless `--worker-arg` says otherwise: one compute thread (the cores
/// are shared), frequent snapshots (little to recompute after a crash), a short session timeout
/// (a crashed worker's partitions move soon) and two requests in flight.
const WORKER_DEFAULTS: [(&str, &str); 5] = [
    ("--threads", "1"),
    ("--snapshot-every-tokens", "8"),
    ("--session-timeout", "6s"),
    ("--max-in-flight", "2"),
    ("--log-format", "text"),
];
/// Time the workers get to drain and exit at the end.
const STOP_GRACE: Duration = Duration::from_secs(30);
/// Steps of the default schedule are generated this far ahead; the load's end stops them.
const HORIZON: Duration = Duration::from_secs(3_600);

pub async fn run(args: ChaosArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    anyhow::ensure!(args.workers >= 1, "--workers must be at least 1");
    anyhow::ensure!(
        args.model.is_file(),
        "model {} not found (`make model` fetches it)",
        args.model.display()
    );
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => default_bin_dir()?,
    };
    let out = &args.out;
    prepare_out(out)?;
    let prompts = prompts(&args)?;
    let steps: Vec<Step> = faults::keep(
        &schedule(
            args.scenario,
            &DefaultSpec {
                warmup: args.warmup,
                every: args.fault_every,
                horizon: HORIZON,
                seed: args.seed,
            },
        ),
        |a| args.fault_kinds.contains(&Kind::of(a)),
        args.max_faults.unwrap_or(usize::MAX),
    );

    // Topics and a group of the run's own, so that nothing of an earlier run is read again.
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let topic = format!("chaos-{run_id}.requests");
    let reply_topic = format!("chaos-{run_id}.replies");
    let group = format!("chaos-{run_id}");
    let spec = WorkerSpec {
        model: std::path::absolute(&args.model)?,
        weights: args.weights.clone(),
        topic: topic.clone(),
        reply_topic: reply_topic.clone(),
        group_id: group.clone(),
        snapshot_dir: std::path::absolute(out.join("snapshots"))?,
        defaults: WORKER_DEFAULTS
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .chain([("--delivery".to_string(), args.delivery.clone())])
            .collect(),
        extra: args.worker_args.clone(),
    };
    let topics = [topic.clone(), reply_topic.clone(), format!("{topic}.dlq")];
    let logs = out.join("logs");
    let fleet = start_fleet(&args, &bin_dir, &logs, topics, spec).await?;
    let bootstrap = fleet.bootstrap().to_string();
    let fleet = Arc::new(Mutex::new(fleet));
    let events: Arc<Mutex<Vec<FaultEvent>>> = Arc::default();

    let t0 = Instant::now();
    let tracker = {
        let (b, r) = (bootstrap.clone(), reply_topic.clone());
        tokio::task::spawn_blocking(move || Tracker::start(&b, &r, t0)).await??
    };
    {
        let mut f = fleet.lock().expect("fleet lock: no panic while held");
        for _ in 0..args.workers {
            let name = f.start_worker()?;
            events.lock().expect("events lock").push(FaultEvent {
                kind: FaultKind::Start,
                at_ms: tracker.now_ms(),
                workers: vec![name],
                until_ms: None,
            });
        }
    }
    eprintln!(
        "chaos: broker at {bootstrap}, {} workers, scenario {:?}, logs in {}",
        args.workers,
        args.scenario,
        logs.display()
    );

    let limit = match args.duration {
        Some(d) => Limit::Duration(d),
        None => Limit::Requests(args.requests),
    };
    let mode = match args.rate {
        Some(rate_per_s) => Mode::Open { rate_per_s },
        None => Mode::Closed {
            concurrency: args.concurrency,
        },
    };
    let load_spec = LoadSpec {
        mode,
        limit,
        seed: args.seed,
        stream: true,
    };
    let progress = Progress::start(&tracker, &limit);
    let (no_more_faults, stop) = (CancellationToken::new(), CancellationToken::new());
    let injector = inject::Injector {
        steps,
        fleet: fleet.clone(),
        events: events.clone(),
        tracker: tracker.clone(),
        progress: progress.clone(),
        workers: args.workers,
        restart_delay: args.restart_delay,
        seed: args.seed,
        load_start: Instant::now(),
    };
    let injecting = tokio::spawn(injector.run(no_more_faults.clone(), stop.clone()));
    let scaling = args.autoscale.then(|| {
        let target = Target {
            bootstrap: bootstrap.clone(),
            topic: topic.clone(),
            group: group.clone(),
        };
        let scaler = crate::autoscale::run_loop(
            scaler_spec(&args),
            target,
            fleet.clone(),
            events.clone(),
            t0,
            stop.clone(),
        );
        tokio::spawn(scaler)
    });

    progress.set_phase("sending");
    let sent = load::drive(
        &load_spec,
        &prompts,
        &tracker,
        &topic,
        &reply_topic,
        "chaos",
        Some(&progress),
    )
    .await;
    no_more_faults.cancel();
    progress.set_phase("waiting for the last answers");
    let all_answered = tracker.wait_answered(args.answer_timeout).await;
    let elapsed = t0.elapsed();
    stop.cancel();
    let injected = injecting.await.context("the fault injector failed")?;
    if let Some(s) = scaling {
        let _ = s.await;
    }
    progress.finish();
    let sent = sent?;
    if !all_answered {
        eprintln!(
            "chaos: {} of {sent} requests unanswered after {:?}",
            tracker.unanswered(),
            args.answer_timeout
        );
    }
    let killed = {
        let fleet = fleet.clone();
        tokio::task::spawn_blocking(move || fleet.lock().expect("fleet lock").stop_all(STOP_GRACE)).await?
    };
    if !killed.is_empty() {
        eprintln!(
            "chaos: {} did not drain within {STOP_GRACE:?} and were killed",
            killed.join(", ")
        );
    }

    let records = tracker.records();
    let faults = events.lock().expect("events lock").clone();
    eprintln!(
        "chaos: computing the uninterrupted reference of {} requests ...",
        records.len()
    );
    let requests: Vec<_> = records.iter().map(|r| r.request.clone()).collect();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let generate = crate::fleet::bin(&bin_dir, "ferry-generate")?;
    let reference = verify::reference(&generate, &args.model, &args.weights, &requests, cores).await?;
    let verification = verify::verify(&records, &faults, &reference);
    let load_report = Report::build(&records, &faults, elapsed);
    let chaos_report = report::ChaosReport::new(&args, &verification, injected, load_report, started.elapsed());
    let svg = crate::chart::render_svg(&records, &faults, elapsed);
    write(out, &chaos_report, &records, &svg)?;
    println!("{}", chaos_report.load.summary_table());
    println!("{}", report::summary(&verification, &chaos_report.drains));
    println!("report: {}", out.join("report.json").display());
    Ok(if verification.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Starts `ferry broker` with `topics`, or creates them on the cluster `--bootstrap-servers`
/// names, and returns the fleet (no workers yet).
async fn start_fleet(
    args: &ChaosArgs,
    bin_dir: &Path,
    logs: &Path,
    topics: [String; 3],
    spec: WorkerSpec,
) -> anyhow::Result<Fleet> {
    match &args.bootstrap_servers {
        Some(b) => {
            for t in &topics {
                ferry::topics::create_topic(b, t, args.partitions as i32, Duration::from_secs(30))
                    .await
                    .with_context(|| format!("cannot create topic {t}"))?;
            }
            let broker_faults = [Kind::BrokerOutage, Kind::BrokerCrash];
            if args.fault_kinds.iter().any(|k| broker_faults.contains(k)) && args.scenario == Scenario::Default {
                eprintln!(
                    "chaos: attached to {b}: the broker's faults will be skipped (the harness did not start the broker)"
                );
            }
            Ok(Fleet::attach(bin_dir, logs, b, spec))
        }
        None => {
            let (bin_dir, logs, partitions, kind) =
                (bin_dir.to_path_buf(), logs.to_path_buf(), args.partitions, args.broker);
            if kind == BrokerKind::Kafka {
                eprintln!(
                    "chaos: starting Apache Kafka {} (ferry broker --kafka) ...",
                    ferry::broker::jars::KAFKA_VERSION
                );
            }
            tokio::task::spawn_blocking(move || Fleet::start_broker(&bin_dir, &logs, &topics, partitions, kind, spec))
                .await?
        }
    }
}

/// KEDA's trigger as `--lag-threshold` and friends set it. `offsetResetPolicy` is `earliest`,
/// as Ferry's workers read (see [`crate::autoscale`] on the group that never committed).
fn scaler_spec(args: &ChaosArgs) -> ScalerSpec {
    ScalerSpec {
        lag_threshold: args.lag_threshold,
        activation_lag_threshold: args.activation_lag_threshold,
        offset_reset_policy: OffsetResetPolicy::Earliest,
        scale_to_zero_on_invalid_offset: false,
        allow_idle_consumers: false,
        min_replicas: args.min_replicas,
        max_replicas: args.max_replicas.unwrap_or(args.partitions as usize),
    }
}

/// The prompt set, with every request's `max_tokens` capped by `--max-tokens`.
fn prompts(args: &ChaosArgs) -> anyhow::Result<PromptSet> {
    let set = match &args.prompts {
        Some(p) => PromptSet::from_file(p)?,
        None => PromptSet::default_set(),
    };
    let Some(cap) = args.max_tokens else { return Ok(set) };
    // The set is rebuilt through its own parser, so capped templates are checked like any.
    let mut lines = String::new();
    for t in set.iter() {
        let mut r = t.as_request().clone();
        r.max_tokens = Some(r.max_tokens.unwrap_or(ferry_schemas::DEFAULT_MAX_TOKENS).min(cap));
        let mut v = serde_json::to_value(&r)?;
        if let Some(o) = v.as_object_mut() {
            o.remove("id");
        }
        lines.push_str(&v.to_string());
        lines.push('\n');
    }
    PromptSet::parse(&lines)
}

/// Empties what an earlier run left in `out` (only the paths a run writes).
fn prepare_out(out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    for dir in ["logs", "snapshots"] {
        let p = out.join(dir);
        if p.exists() {
            std::fs::remove_dir_all(&p).with_context(|| format!("cannot clear {}", p.display()))?;
        }
        std::fs::create_dir_all(&p)?;
    }
    for file in ["report.json", "chart.svg", "records.jsonl"] {
        let _ = std::fs::remove_file(out.join(file));
    }
    Ok(())
}

/// Writes the report, the chart, and every request's record (one JSON line each, for a look at
/// what happened to a request after the fact).
fn write(out: &Path, report: &impl Serialize, records: &[RequestRecord], svg: &str) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(report)?;
    std::fs::write(out.join("report.json"), json + "\n").context("cannot write report.json")?;
    let mut lines = String::new();
    for r in records {
        lines.push_str(&serde_json::to_string(r)?);
        lines.push('\n');
    }
    std::fs::write(out.join("records.jsonl"), lines).context("cannot write records.jsonl")?;
    std::fs::write(out.join("chart.svg"), svg).context("cannot write chart.svg")?;
    Ok(())
}

#[cfg(test)]
mod tests;
