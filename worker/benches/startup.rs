//! Start-up time: from `ferry-worker`'s process start to its first `/readyz` 200, which is what a
//! Kubernetes startup probe waits for and what a scale-up or a replacement pod costs before it
//! takes work. Ready means the model is loaded and its sha256 verified, and the consumer group
//! has given the worker its first assignment.
//!
//! Each run starts the release worker with the model (Q8_0 re-quantised at load, the default),
//! `--model-sha256` pinned, one compute thread, JSON logs, in a fresh consumer group on a running
//! `ferry broker`, and polls `/readyz` every 5 ms from the moment it spawned the process. The
//! worker's own log gives the phases: `model file ready` (`hash_ms`: reading and hashing the
//! file) and `model loaded` (`load_ms`: from the start of `run` to the model in memory); the
//! rest, up to ready, is the Kafka side (clients, subscribe, the group's first assignment).
//! Also timed: `ferry-worker --fetch-model-only` on the same file, the init container's step
//! when the file is already in the node's cache (it only verifies).
//!
//! `cargo bench -p ferry-worker --bench startup` writes `startup.json` into `FERRY_BENCH_OUT`
//! (default `target/bench`) and prints it. It needs the broker binary beside the worker's: run
//! `cargo build --release -p ferry -p ferry-worker` first (`make bench` does).
//!
//! Limits: the model file is in the page cache after the first run (a cold node reads it from
//! disk, or downloads it first, in the init step). The group's first assignment comes from the
//! test support's broker: real Kafka by default (`ferry broker --kafka`, which sets
//! `group.initial.rebalance.delay.ms=0`), the mock with `FERRY_TEST_BROKER=mock` (whose first
//! rebalance waits 3 s, Kafka's default delay), or the cluster `FERRY_TEST_BOOTSTRAP_SERVERS`
//! names. A worker joining a group that already has
//! members waits for a rebalance instead.

#[path = "support/report.rs"]
mod report;

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_testkit::model::model_path;
use ferry_testkit::{bin, http, unique, BrokerChoice, ChildGuard, Cluster, Pipeline};
use serde_json::{json, Value};

/// Worker starts measured; the median is reported.
const RUNS: usize = 5;
const POLL: Duration = Duration::from_millis(5);
const READY_WITHIN: Duration = Duration::from_secs(300);

/// The median; NaN (null in the JSON) for no values.
fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A numeric field of the first JSON log line whose message is `message`.
fn log_field(log: &str, message: &str, field: &str) -> Option<f64> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["message"] == message)
        .and_then(|v| v[field].as_f64())
}

/// One start: the seconds from spawn to the first answer of the HTTP endpoint, to `/readyz`
/// 200, and the phases from the worker's log.
fn one_start(cluster: &Cluster, topic: &str, replies: &str, sha: &str, run: usize) -> anyhow::Result<Value> {
    let addr = http::free_addr();
    let pipeline = Pipeline {
        requests: topic.to_string(),
        replies: replies.to_string(),
        group: unique("bench-startup"),
        dlq: format!("{topic}.dlq"),
    };
    let args = pipeline
        .args()
        .set("--http-addr", addr.to_string())
        .set("--model-sha256", sha);
    let args = args.set("--log-format", "json");
    let spawned = Instant::now();
    let mut w = cluster.start_worker(&format!("worker-startup-{run}"), args, &[]);
    let mut http_up = None;
    let ready = loop {
        match http::get(addr, "/readyz") {
            Some((200, _)) => break spawned.elapsed(),
            Some(_) if http_up.is_none() => http_up = Some(spawned.elapsed()),
            _ => {}
        }
        if let Some(status) = w.wait_exit(Duration::ZERO) {
            bail!("the worker exited ({status}) before it was ready:\n{}", w.log());
        }
        if spawned.elapsed() > READY_WITHIN {
            bail!("not ready after {READY_WITHIN:?}:\n{}", w.log());
        }
        std::thread::sleep(POLL);
    };
    w.signal("TERM");
    w.wait_exit(Duration::from_secs(30))
        .context("the worker did not exit after SIGTERM")?;
    let log = w.log();
    let load_ms = log_field(&log, "model loaded", "load_ms").context("no `model loaded` line with load_ms")?;
    let hash_ms = log_field(&log, "model file ready", "hash_ms").context("no `model file ready` line with hash_ms")?;
    let ready_s = ready.as_secs_f64();
    Ok(json!({
        "ready_s": ready_s,
        "http_up_s": http_up.map(|d| d.as_secs_f64()),
        "model_load_s": load_ms / 1e3,
        "model_hash_s": hash_ms / 1e3,
        "kafka_to_ready_s": ready_s - load_ms / 1e3,
    }))
}

/// Seconds `ferry-worker --fetch-model-only` takes on the local file, pinned.
fn fetch_only(sha: &str, dir: &std::path::Path, run: usize) -> anyhow::Result<f64> {
    let mut cmd = Command::new(bin("ferry-worker"));
    cmd.args(["--fetch-model-only", "--http-addr", "off", "--model"])
        .arg(model_path())
        .args(["--model-sha256", sha]);
    let started = Instant::now();
    let mut p = ChildGuard::spawn("fetch", &mut cmd, dir.join(format!("fetch-{run}.log")));
    let status = p
        .wait_exit(Duration::from_secs(120))
        .context("--fetch-model-only did not exit")?;
    let took = started.elapsed().as_secs_f64();
    if !status.success() {
        bail!("--fetch-model-only failed ({status}):\n{}", p.log());
    }
    Ok(took)
}

fn main() -> anyhow::Result<()> {
    let started = Instant::now();
    let path = model_path();
    let sha = ferry_worker::model::file_sha256(&path)?;
    let bytes = std::fs::metadata(&path)?.len();
    let (topic, replies) = (unique("bench-startup-req"), unique("bench-startup-rep"));
    let dlq = format!("{topic}.dlq");
    let cluster = Cluster::start(&[&topic, &replies, &dlq]);
    let mut runs = Vec::new();
    for run in 0..RUNS {
        eprintln!("start-up run {} of {RUNS}…", run + 1);
        runs.push(one_start(&cluster, &topic, &replies, &sha, run)?);
    }
    let fetch: Vec<f64> = (0..RUNS)
        .map(|run| fetch_only(&sha, cluster.dir.path(), run))
        .collect::<anyhow::Result<_>>()?;
    let field = |k: &str| -> Vec<f64> { runs.iter().filter_map(|r| r[k].as_f64()).collect() };
    let ready = median(field("ready_s"));
    let load = median(field("model_load_s"));
    let report = json!({
        "model": path.file_name().map(|f| f.to_string_lossy().into_owned()),
        "model_bytes": bytes,
        "weights": "q8_0",
        "threads": 1,
        "runs": RUNS,
        "ready_s_median": ready,
        "ready_s_min": field("ready_s").into_iter().fold(f64::INFINITY, f64::min),
        "ready_s_max": field("ready_s").into_iter().fold(0.0, f64::max),
        "model_load_s_median": load,
        "model_load_share": load / ready,
        "model_hash_s_median": median(field("model_hash_s")),
        "kafka_to_ready_s_median": median(field("kafka_to_ready_s")),
        "http_up_s_median": median(field("http_up_s")),
        "fetch_model_only_s_median": median(fetch.clone()),
        "per_run": runs,
        "fetch_model_only_s": fetch,
        "broker": BrokerChoice::from_env().describe(),
        "bench_s": started.elapsed().as_secs_f64(),
        "notes": NOTES,
    });
    report::save_and_print("startup", &report)
}

/// How the figures were taken, for whoever reads the JSON without this file.
const NOTES: &[&str] = &[
    "ready_s: from spawning the release ferry-worker to its first /readyz 200, polled every 5 ms; ready means \
     the model loaded with its sha256 verified and the consumer group's first assignment received (a fresh \
     group per run, one topic of one partition).",
    "model_load_s: the worker's own `load_ms` (from the start of its runtime to the model in memory: read, \
     hash, parse, re-quantise to Q8_0); model_load_share = median model_load_s / median ready_s; \
     model_hash_s: reading and hashing the file, part of the load.",
    "kafka_to_ready_s: ready_s minus model_load_s: creating the Kafka clients, subscribing, and the group's \
     first assignment, on the broker named by `broker`; a new group's first rebalance waits \
     group.initial.rebalance.delay.ms: 0 on ferry broker --kafka, 3 s on the mock (Kafka's default), \
     which is then most of it.",
    "http_up_s: the first answer of the HTTP endpoint (503 while loading), so probes have something to ask.",
    "fetch_model_only_s: `ferry-worker --fetch-model-only` with the file already local (the init step on a \
     node whose cache holds the model): hash and verify, then exit.",
    "the model file is in the page cache after the first run; a cold node adds reading it from disk, and a \
     first download from the Hub is the init step's, before the worker process starts.",
];
