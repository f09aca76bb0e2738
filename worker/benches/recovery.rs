//! What a fault costs a request, through a real broker, measured in one run on one machine:
//!
//! 1. SIGTERM (a Kubernetes eviction): two workers of one group, a long greedy request; the
//!    worker generating it is sent SIGTERM, drains to a snapshot and leaves the group; the bench
//!    times the signal to the survivor's first new token and counts the tokens computed twice.
//! 2. SIGKILL (node loss): the same, but the worker is killed at a random point between two
//!    snapshots, so the group only notices after the session timeout.
//! 3. Fleet throughput: the same requests answered through Kafka by one worker, against the same
//!    requests generated in this process by the engine, with the same compute threads.
//!
//! Parts 1 and 2 run `ROUNDS` rounds on real Apache Kafka (`ferry broker --kafka`, the test
//! support's shared broker, or the cluster `FERRY_TEST_BOOTSTRAP_SERVERS` names) and then on
//! `ferry broker`'s mock, so both brokers' figures come from the same machine and build. Part 3
//! runs on the real broker only.
//!
//! `cargo bench -p ferry-worker --bench recovery` writes `recovery.json` into `FERRY_BENCH_OUT`
//! (default `target/bench`) and prints it. It needs the release `ferry` beside the release
//! worker: `cargo build --release -p ferry -p ferry-worker` first (`make bench` does). Pin
//! `RAYON_NUM_THREADS`: the in-process generation and the throughput worker use that many
//! compute threads; the failover workers use one each.

#[path = "support/failover.rs"]
mod failover;
#[path = "support/report.rs"]
mod report;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use ferry_schemas::Reply;
use ferry_testkit::model::model_path;
use ferry_testkit::{unique, BrokerChoice, Setup};
use ferry_worker::engine::{Engine, Job, Outcome};
use ferry_worker::model::WeightFormat;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::{json, Value};

/// Rounds of a SIGTERM and a SIGKILL on each broker (`FERRY_BENCH_RECOVERY_ROUNDS`).
const ROUNDS: usize = 3;
/// Requests of the throughput part, and the tokens each generates.
const THROUGHPUT_REQUESTS: usize = 8;
const THROUGHPUT_TOKENS: u32 = 128;
/// Alternating runs of each kind in the throughput part.
const THROUGHPUT_RUNS: usize = 3;

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

/// The CPU, as `/proc/cpuinfo` names it, and the SIMD flags that decide which kernels run.
fn cpu() -> Value {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let flags = field("flags").unwrap_or_default();
    let simd: Vec<&str> = ["avx2", "fma", "avx512f", "avx512_vnni", "avx512bw", "amx_tile"]
        .into_iter()
        .filter(|f| flags.split_whitespace().any(|x| x == *f))
        .collect();
    json!({
        "model": field("model name"),
        "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "simd": simd,
    })
}

/// Medians over the rounds of one broker.
fn summarize(rounds: &[Value]) -> Value {
    let pick = |round: &str, key: &str| -> Vec<f64> { rounds.iter().filter_map(|r| r[round][key].as_f64()).collect() };
    let session_s = humantime::parse_duration(failover::SESSION_TIMEOUT).map_or(f64::NAN, |d| d.as_secs_f64());
    let sigkill_token = median(pick("sigkill", "signal_to_first_new_token_est_s"));
    // The group notices a killed member a session timeout after its last heartbeat, which came
    // up to one heartbeat interval before the kill: the worst round is the one to hold against
    // the session timeout.
    let sigkill_worst = pick("sigkill", "signal_to_first_new_token_est_s")
        .into_iter()
        .filter(|x| x.is_finite())
        .reduce(f64::max);
    json!({
        "rounds": rounds.len(),
        "sigterm_signal_to_first_new_token_s": median(pick("sigterm", "signal_to_first_new_token_est_s")),
        "sigterm_signal_to_first_new_snapshot_s": median(pick("sigterm", "signal_to_first_new_snapshot_s")),
        "sigterm_tokens_recomputed_max": pick("sigterm", "tokens_recomputed").into_iter().reduce(f64::max),
        "sigkill_signal_to_first_new_token_s": sigkill_token,
        "sigkill_signal_to_first_new_token_max_s": sigkill_worst,
        "sigkill_max_beyond_session_timeout_s": sigkill_worst.map(|s| s - session_s),
        "sigkill_signal_to_first_new_snapshot_s": median(pick("sigkill", "signal_to_first_new_snapshot_s")),
        "sigkill_tokens_recomputed_max": pick("sigkill", "tokens_recomputed_est").into_iter().reduce(f64::max),
    })
}

/// Part 3, in process: the requests one after another through the engine's own loop
/// (`Engine::run`, the worker's engine-thread rounds with a batch of one), prefill included,
/// without snapshots.
fn in_process_tokens_per_s(requests: &[ferry_schemas::Request]) -> anyhow::Result<(f64, usize)> {
    let engine = Engine::new(std::sync::Arc::new(report::load_model(
        &model_path(),
        WeightFormat::Q8_0,
    )?));
    let started = Instant::now();
    let mut tokens = 0;
    for request in requests {
        let prepared = engine.prepare(request).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let job = Job {
            prepared,
            resume: None,
            snapshots: None,
            control: Default::default(),
            deadline: None,
            chunks: None,
        };
        match engine.run(job)? {
            Outcome::Finished(c) => tokens += c.tokens.len(),
            other => anyhow::bail!("the in-process generation did not finish: {other:?}"),
        }
    }
    Ok((tokens as f64 / started.elapsed().as_secs_f64(), tokens))
}

/// Part 3, through Kafka: one worker with `threads` compute threads and one request in flight
/// (as the in-process run), a warm-up request answered first, then all of `requests` published
/// at once; tokens/s from the first publish to the last answer.
fn fleet_tokens_per_s(requests: &[ferry_schemas::Request], threads: usize) -> anyhow::Result<(f64, usize)> {
    let s = Setup::new(1);
    let (cluster, topic, replies) = (&s.cluster, &s.pipeline.requests, &s.pipeline.replies);
    let args = s
        .args()
        .set("--threads", threads.to_string())
        .set("--max-in-flight", "1");
    let worker = s.worker("tput-worker", args);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let producer = cluster.producer();
    let reader: BaseConsumer = cluster.reader(&unique("tput-reader"));
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(replies, 0, Offset::Beginning)?;
    reader.assign(&tpl)?;
    let wait_for = |ids: &HashSet<String>| -> anyhow::Result<usize> {
        let mut left = ids.clone();
        let mut tokens = 0;
        let deadline = Instant::now() + Duration::from_secs(600);
        while !left.is_empty() {
            ensure!(
                Instant::now() < deadline,
                "{} answers missing; worker log:\n{}",
                left.len(),
                worker.log()
            );
            if let Some(m) = reader.poll(Duration::from_millis(20)) {
                let m = m?;
                if let Ok(Reply::Response(r)) = serde_json::from_slice::<Reply>(m.payload().unwrap_or_default()) {
                    if left.remove(&r.id) {
                        tokens += r.usage.completion_tokens as usize;
                    }
                }
            }
        }
        Ok(tokens)
    };
    let warm = failover::count_request(&unique("tput-warm"), 8)?;
    rt.block_on(cluster.publish(&producer, topic, &warm.id, &serde_json::to_vec(&warm)?));
    wait_for(&HashSet::from([warm.id.clone()]))?;
    let started = Instant::now();
    for r in requests {
        rt.block_on(cluster.publish(&producer, topic, &r.id, &serde_json::to_vec(r)?));
    }
    let ids: HashSet<String> = requests.iter().map(|r| r.id.clone()).collect();
    let tokens = wait_for(&ids)?;
    Ok((tokens as f64 / started.elapsed().as_secs_f64(), tokens))
}

/// Fleet and in-process runs of the same requests, alternating, [`THROUGHPUT_RUNS`] of each:
/// the machine's speed drifts by several percent between runs, so the ratio is of the medians.
fn throughput(threads: usize) -> anyhow::Result<Value> {
    let requests = |run: usize| {
        (0..THROUGHPUT_REQUESTS)
            .map(|i| failover::count_request(&format!("tput-{run}-{i}-{}", unique("r")), THROUGHPUT_TOKENS))
            .collect::<anyhow::Result<Vec<_>>>()
    };
    let (mut fleet, mut local) = (Vec::new(), Vec::new());
    for run in 0..THROUGHPUT_RUNS {
        let batch = requests(run)?;
        let (f, fleet_tokens) = fleet_tokens_per_s(&batch, threads)?;
        let (l, local_tokens) = in_process_tokens_per_s(&batch)?;
        ensure!(
            fleet_tokens == local_tokens,
            "the fleet generated {fleet_tokens} tokens, the engine {local_tokens}: the runs differ"
        );
        eprintln!("throughput run {run}: fleet {f:.1} tokens/s, in process {l:.1}");
        fleet.push(f);
        local.push(l);
    }
    let (f, l) = (median(fleet.clone()), median(local.clone()));
    Ok(json!({
        "requests": THROUGHPUT_REQUESTS,
        "tokens_per_request": THROUGHPUT_TOKENS,
        "threads": threads,
        "runs": THROUGHPUT_RUNS,
        "fleet_tokens_per_s": f,
        "in_process_tokens_per_s": l,
        "fleet_runs_tokens_per_s": fleet,
        "in_process_runs_tokens_per_s": local,
        "fleet_over_in_process": f.zip(l).map(|(f, l)| f / l),
    }))
}

fn main() -> anyhow::Result<()> {
    let started = Instant::now();
    let threads = candle_core::utils::get_num_threads();
    let rounds = std::env::var("FERRY_BENCH_RECOVERY_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ROUNDS);
    let broker = match BrokerChoice::from_env() {
        BrokerChoice::External(b) => format!("the cluster at {b} (FERRY_TEST_BOOTSTRAP_SERVERS)"),
        _ => format!("Apache Kafka {} (ferry broker --kafka)", kafka_version()),
    };
    let (mut real, mut mock) = (Vec::new(), Vec::new());
    if selected("recovery") {
        eprintln!("recovery on {broker}: {rounds} rounds …");
        real = failover::run(false, rounds).context("recovery on the real broker")?;
        eprintln!("recovery on the mock: {rounds} rounds …");
        mock = failover::run(true, rounds).context("recovery on the mock broker")?;
    }
    let throughput = if selected("throughput") {
        eprintln!("fleet throughput …");
        throughput(threads).context("fleet throughput")?
    } else {
        Value::Null
    };
    let report = json!({
        "cpu": cpu(),
        "model": model_path().file_name().map(|f| f.to_string_lossy().into_owned()),
        "weights": "q8_0",
        "broker": broker,
        "session_timeout_s": humantime::parse_duration(failover::SESSION_TIMEOUT)?.as_secs_f64(),
        "snapshot_every_tokens": failover::SNAPSHOT_EVERY_TOKENS,
        "kafka": summarize(&real),
        "mock": summarize(&mock),
        "throughput": throughput,
        "rounds": { "kafka": real, "mock": mock },
        "bench_s": started.elapsed().as_secs_f64(),
        "notes": NOTES,
    });
    report::save_and_print("recovery", &report)
}

/// Whether `part` is to run: `FERRY_BENCH_PARTS` lists some of `recovery,throughput` (all when
/// unset), to rerun one part alone.
fn selected(part: &str) -> bool {
    std::env::var("FERRY_BENCH_PARTS").map_or(true, |parts| parts.split(',').any(|p| p.trim() == part))
}

/// The Kafka version `ferry broker --kafka` runs: the pom's `kafka.version`.
fn kafka_version() -> String {
    let pom = include_str!("../../producer/kafka/pom.xml");
    pom.split("<kafka.version>")
        .nth(1)
        .and_then(|rest| rest.split('<').next())
        .unwrap_or("?")
        .to_string()
}

/// How the figures were taken, for whoever reads the JSON without this file.
const NOTES: &[&str] = &[
    "signal_to_first_new_token_s: from the signal to the survivor's first token after the resume point, \
     estimated from its first new snapshot manifest (polled every 5 ms, 16 tokens after the resume point) \
     less those tokens at the survivor's measured speed; signal_to_first_new_snapshot_s is the raw figure. \
     Medians over the rounds.",
    "sigterm tokens_recomputed: tokens in the drained worker's final snapshot minus the survivor's \
     resumed_from_token from the reply (0: nothing computed twice).",
    "sigkill tokens_recomputed_est: the killed worker's last manifest plus its measured tokens/s times the \
     time from that manifest to the kill (placed uniformly within one snapshot interval), minus \
     resumed_from_token. sigkill_max_beyond_session_timeout_s: the slowest round's recovery less the \
     session timeout; the group notices a dead member a session timeout after its last heartbeat, so a \
     round can take less than the session timeout.",
    "the mock's group coordinator waits the session timeout (less 1 s) after a member leaves before it \
     rebalances, so its SIGTERM figures include that wait; a real broker rebalances at once.",
    "throughput: one worker, --max-in-flight 1, a file snapshot store with the default snapshot \
     settings, requests published at once after a warm-up; tokens/s from the first publish to the last \
     answer, over Engine::run's tokens/s generating the same requests one after another in this \
     process (prefill included, no snapshots): the cost of Kafka, the worker's plumbing and its \
     snapshots. Fleet and in-process runs alternate, three of each, and the ratio is of the medians.",
];
