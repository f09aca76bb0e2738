//! Engine throughput, measured in one run on one machine:
//!
//! 1. Single-sequence decode, Ferry against llama.cpp, side by side: the same GGUF file, the
//!    same prompt token ids (Ferry's tokenizer makes them and hands them to llama.cpp), the same
//!    number of decode tokens and of compute threads. llama.cpp runs in a subprocess
//!    (`scripts/llama_cpp_bench.py`, with the Python that `FERRY_LLAMA_CPP_PYTHON` names, or else
//!    the one `scripts/setup-llama-cpp.sh` installs llama-cpp-python into). Runs alternate, Ferry
//!    then llama.cpp, and the medians are compared as `vs_llama_cpp_ratio`, so drift in machine
//!    speed cancels. Ferry's side goes
//!    through the engine thread (`EngineHandle`), as a request does.
//! 2. Aggregate decode tokens/s with 1, 4, 8 and 16 sequences in flight through
//!    `EngineHandle::spawn(engine, n)`, each with its own prompt, and `batch8_vs_batch1_ratio`:
//!    1 and 8 in flight run alternately, three times each, and the ratio is of their medians.
//! 3. Prefill of a long prompt (`PREFILL_TOKENS`), Ferry against llama.cpp, alternating, as
//!    `prefill_vs_llama_cpp_ratio`: the prompt goes through the engine in its chunks, llama.cpp
//!    takes it in one batch of 512.
//! 4. Parts 1 to 3 again with 2 compute threads (when the bench runs with one and the machine
//!    has two cores): the bench re-executes itself with `FERRY_BENCH_THREADS_CHILD` set and
//!    `RAYON_NUM_THREADS=2` (and the llama.cpp interpreter found once, in
//!    `FERRY_LLAMA_CPP_PYTHON`), and reports the child's figures under `two_threads`.
//! 5. Peak resident memory (VmHWM) of a process that loads the model as the worker does and runs
//!    8 sequences of 1024 tokens each (long prompts, then decode) through the engine thread, all 8
//!    in flight at once (the report says whether they were): the bench re-executes itself with
//!    `FERRY_BENCH_RSS_CHILD` set, so the figure is not inflated by the parts above.
//!
//! Decode tokens/s is taken from the stream: a job's chunks are timestamped as they arrive, and
//! the rate counts tokens from the moment every job in flight has emitted its first token (all
//! prefills done) to the moment the first job finishes (all still in flight), so prefill and
//! stragglers do not dilute it. For one sequence that is the time of N forward passes of one
//! token, sampling included, which is how the llama.cpp script measures it too.
//!
//! The report names the kernel path that ran and the CPU's features (`machine`, and `kernels`
//! from the model itself); `FERRY_KERNELS` picks the path as for the worker.
//!
//! `make bench` runs it and writes `throughput.json` into `FERRY_BENCH_OUT` (default
//! `target/bench`). Threads follow `RAYON_NUM_THREADS` (all cores when unset), and llama.cpp
//! gets the same number.
//!
//! Limits: Ferry runs the weights re-quantised to Q8_0 at load (its default, what a worker
//! serves) and llama.cpp runs them as stored (Q4_1, for which it has SIMD kernels), so their
//! greedy outputs can part after a while; the prompt is a counting task that neither stops early,
//! and llama.cpp ignores end of sequence, so both do the same work per token. The llama.cpp build
//! names its instruction sets (AVX2/FMA, plus AVX-512 VNNI where the CPU has it; see the set-up
//! script), and Ferry picks its kernel path at run time, AVX-512 VNNI included. If llama.cpp cannot be
//! installed, the report records why (`llama_cpp_error`) and the ratio is null.

mod compare;
mod llama_cpp;
mod memory;
#[path = "../support/report.rs"]
mod report;
mod runs;

use compare::Comparison;
use llama_cpp::{llama_cpp_python, llama_cpp_run, LlamaCpp};
use memory::{peak_memory, rss_child};
use runs::{aggregates, run_all};

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, ensure, Context};
use ferry_schemas::FinishReason;
use ferry_worker::engine::{Completion, Engine, EngineHandle, Job, Outcome, Prepared};
use ferry_worker::model::{Model, WeightFormat};
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// Forward passes of one token timed in the single-sequence comparison.
const DECODE_TOKENS: usize = 128;
const REPEATS: usize = 3;
const IN_FLIGHT: [usize; 4] = [1, 4, 8, 16];
/// The jobs in flight that `batch8_vs_batch1_ratio` compares: measured alternately.
const RATIO_IN_FLIGHT: [usize; 2] = [1, 8];
/// Tokens each sequence generates in the aggregate runs.
const AGGREGATE_MAX_TOKENS: usize = 128;
const RSS_SEQUENCES: usize = 8;
/// Prompt plus generated tokens of each sequence in the memory run.
const RSS_POSITIONS: usize = 1024;
/// Of those, generated; the rest is prompt, which costs far less per token than decode. Long
/// enough that the first sequence is still decoding when the last has finished its prefill
/// (the engine prefills one sequence at a time, in chunks), so all 8 caches are full at once.
const RSS_DECODE_TOKENS: usize = 128;
const RSS_CHILD_ENV: &str = "FERRY_BENCH_RSS_CHILD";
const THREADS_CHILD_ENV: &str = "FERRY_BENCH_THREADS_CHILD";
/// Tokens of the prompt whose prefill is compared.
const PREFILL_TOKENS: usize = 512;
const FILLER: &str = "The lighthouse keeper climbed the spiral stairs each evening, trimmed the wick, \
polished the great lens and wrote the weather, the ships and the sea birds in a leather log. ";

/// A raw prompt the model continues greedily for hundreds of tokens without an end of sequence
/// (each run checks it), different for each `from`.
fn count_prompt(from: usize) -> String {
    let first: Vec<String> = (from..from + 10).map(|n| n.to_string()).collect();
    format!(
        "Count from {from} to {}, separated by commas: {},",
        from + 999,
        first.join(", ")
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn load_model(path: &Path) -> anyhow::Result<Arc<Model>> {
    Ok(Arc::new(report::load_model(path, WeightFormat::Q8_0)?))
}

/// Parts 1 to 3 with this process's threads: the figures the report compares.
fn speed(c: Comparison) -> anyhow::Result<Value> {
    let single = c.single_sequence()?;
    let prefill = c.prefill()?;
    let aggregate = aggregates(c.rt, c.model)?;
    let rate = |n: usize| {
        aggregate
            .iter()
            .find(|a| a["in_flight"] == n)
            .and_then(|a| a["decode_tokens_per_s"].as_f64())
    };
    let batch_ratio = rate(8).zip(rate(1)).map(|(b8, b1)| b8 / b1);
    Ok(json!({
        "threads": c.threads,
        "vs_llama_cpp_ratio": single["vs_llama_cpp_ratio"],
        "prefill_vs_llama_cpp_ratio": prefill["prefill_vs_llama_cpp_ratio"],
        "batch8_vs_batch1_ratio": batch_ratio,
        "single_sequence": single,
        "prefill": prefill,
        "aggregate": aggregate,
    }))
}

/// Runs this bench again as a child with `env` set, and reads the JSON of its last line.
fn child(what: &str, env: &[(&str, &str)]) -> anyhow::Result<Value> {
    let out = Command::new(std::env::current_exe()?)
        .envs(env.iter().copied())
        .stderr(Stdio::inherit())
        .output()?;
    ensure!(out.status.success(), "the {what} child failed ({})", out.status);
    let stdout = String::from_utf8_lossy(&out.stdout);
    Ok(serde_json::from_str(
        stdout
            .lines()
            .last()
            .with_context(|| format!("the {what} child printed nothing"))?,
    )?)
}

/// Part 4, from the parent: parts 1 to 3 again in a child with 2 threads, on the same llama.cpp
/// (an empty path when it could not be had: the child does not try again).
fn two_threads(llama: &LlamaCpp) -> anyhow::Result<Value> {
    let python = llama
        .as_ref()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    child(
        "2-thread",
        &[
            (THREADS_CHILD_ENV, "1"),
            ("RAYON_NUM_THREADS", "2"),
            ("FERRY_LLAMA_CPP_PYTHON", &python),
        ],
    )
}

fn main() -> anyhow::Result<()> {
    let path = std::env::var_os("FERRY_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    if std::env::var_os(RSS_CHILD_ENV).is_some() {
        return rss_child(&path);
    }
    let started = Instant::now();
    let threads = candle_core::utils::get_num_threads();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let model = load_model(&path)?;
    let kernels = model
        .weights
        .kernel_path()
        .map_or("candle", ferry_worker::kernels::Path::name);
    let llama: LlamaCpp = llama_cpp_python().map_err(|e| format!("{e:#}"));
    let compared = Comparison {
        rt: &rt,
        model: &model,
        path: &path,
        threads,
        llama: &llama,
    };
    if std::env::var_os(THREADS_CHILD_ENV).is_some() {
        println!("{}", speed(compared)?);
        return Ok(());
    }
    let speed = speed(compared)?;
    drop(model);
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let two = if threads == 1 && cpus >= 2 {
        two_threads(&llama).unwrap_or_else(|e| json!({ "error": format!("{e:#}") }))
    } else {
        Value::Null
    };
    let memory = peak_memory().unwrap_or_else(|e| json!({ "error": format!("{e:#}") }));
    let report = json!({
        "model": path.file_name().map(|f| f.to_string_lossy().into_owned()),
        "kernels": kernels,
        "threads": threads,
        "cpus": cpus,
        "vs_llama_cpp_ratio": speed["vs_llama_cpp_ratio"],
        "prefill_vs_llama_cpp_ratio": speed["prefill_vs_llama_cpp_ratio"],
        "batch8_vs_batch1_ratio": speed["batch8_vs_batch1_ratio"],
        "targets": { "vs_llama_cpp_ratio": 1.0, "prefill_vs_llama_cpp_ratio": 1.0, "batch8_vs_batch1_ratio": 3.0 },
        "single_sequence": speed["single_sequence"],
        "prefill": speed["prefill"],
        "aggregate": speed["aggregate"],
        "two_threads": two,
        "memory": memory,
        "wall_s": started.elapsed().as_secs_f64(),
    });
    let file = report::save("throughput", &report)?;
    print_table(&report);
    println!("wrote {}", file.display());
    Ok(())
}

fn print_table(r: &Value) {
    let f = |v: &Value| v.as_f64().map_or("n/a".to_string(), |x| format!("{x:.2}"));
    let s = &r["single_sequence"];
    println!(
        "kernels: {}, threads: {}, cpu: {}",
        r["kernels"],
        r["threads"],
        report::machine()["cpu"]
    );
    println!("single sequence, {} decode tokens:", s["decode_tokens"]);
    println!(
        "  Ferry (Q8_0)      decode {:>8} tok/s   prefill {:>8} tok/s",
        f(&s["ferry"]["decode_tokens_per_s"]),
        f(&s["ferry"]["prefill_tokens_per_s"])
    );
    match s["llama_cpp_error"].as_str() {
        Some(e) => println!("  llama.cpp         unavailable: {e}"),
        None => println!(
            "  llama.cpp (Q4_1)  decode {:>8} tok/s   prefill {:>8} tok/s",
            f(&s["llama_cpp"]["decode_tokens_per_s"]),
            f(&s["llama_cpp"]["prefill_tokens_per_s"])
        ),
    }
    println!("  vs_llama_cpp_ratio {} (target 1.0)", f(&r["vs_llama_cpp_ratio"]));
    let p = &r["prefill"];
    println!(
        "prefill of {} tokens: Ferry {} tok/s, llama.cpp {} tok/s",
        p["prompt_tokens"],
        f(&p["ferry_prefill_tokens_per_s"]),
        f(&p["llama_cpp_prefill_tokens_per_s"])
    );
    println!(
        "  prefill_vs_llama_cpp_ratio {} (target 1.0)",
        f(&r["prefill_vs_llama_cpp_ratio"])
    );
    println!("aggregate decode:");
    for a in r["aggregate"].as_array().into_iter().flatten() {
        println!(
            "  {:>2} in flight  {:>8} tok/s   per sequence {:>7} tok/s   end to end {:>8} tok/s",
            a["in_flight"],
            f(&a["decode_tokens_per_s"]),
            f(&a["per_sequence_decode_tokens_per_s"]),
            f(&a["end_to_end_tokens_per_s"])
        );
    }
    println!(
        "  batch8_vs_batch1_ratio {} (target 3.0)",
        f(&r["batch8_vs_batch1_ratio"])
    );
    let t = &r["two_threads"];
    if !t.is_null() {
        println!(
            "2 threads: vs_llama_cpp_ratio {}, prefill_vs_llama_cpp_ratio {}, batch8_vs_batch1_ratio {}{}",
            f(&t["vs_llama_cpp_ratio"]),
            f(&t["prefill_vs_llama_cpp_ratio"]),
            f(&t["batch8_vs_batch1_ratio"]),
            t["error"].as_str().map(|e| format!(" ({e})")).unwrap_or_default()
        );
    }
    let m = &r["memory"];
    println!(
        "peak RSS, {} sequences of {} tokens: {} MiB (after load {} MiB, KV cache {} MiB)",
        m["sequences"],
        RSS_POSITIONS,
        f(&m["peak_rss_mib"]),
        f(&m["rss_after_load_mib"]),
        f(&m["kv_cache_mib"])
    );
    println!("wall {} s", f(&r["wall_s"]));
}
