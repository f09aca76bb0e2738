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

#[path = "support/report.rs"]
mod report;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, ensure, Context};
use ferry_schemas::FinishReason;
use ferry_worker::engine::{
    Completion, Engine, EngineHandle, GenerationParams, Job, Outcome, Prepared, SamplingParams,
};
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

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> Prepared {
    Prepared {
        prompt,
        params: GenerationParams {
            sampling: SamplingParams::GREEDY,
            max_tokens,
            stop: Vec::new(),
        },
    }
}

/// One job's run as seen from outside the engine.
struct Trace {
    submitted: Instant,
    /// Each stream chunk as it arrived: (tokens generated once it was sent, arrival).
    chunks: Vec<(usize, Instant)>,
    done: Instant,
    completion: Completion,
}

impl Trace {
    fn first_token(&self) -> anyhow::Result<(usize, Instant)> {
        self.chunks.first().copied().context("a job released no text")
    }

    /// Tokens generated by `t`, as far as the stream shows.
    fn tokens_by(&self, t: Instant) -> usize {
        if self.done <= t {
            return self.completion.tokens.len();
        }
        self.chunks
            .iter()
            .take_while(|(_, at)| *at <= t)
            .last()
            .map_or(0, |(n, _)| *n)
    }

    /// Forward passes of one token after the first chunk, over their time. The step that ends a
    /// generation runs none (its token is the last, or end of sequence).
    fn decode_tokens_per_s(&self) -> anyhow::Result<(usize, f64)> {
        let (n, at) = self.first_token()?;
        let last_without_forward = usize::from(self.completion.finish.reason == FinishReason::Length);
        let forwards = self.completion.tokens.len().saturating_sub(n + last_without_forward);
        Ok((forwards, forwards as f64 / (self.done - at).as_secs_f64()))
    }
}

/// Submits every job at once and waits for all of them.
async fn run_all(handle: &EngineHandle, jobs: Vec<Prepared>) -> anyhow::Result<Vec<Trace>> {
    let runs = jobs.into_iter().map(|prepared| async move {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let job = Job {
            prepared,
            resume: None,
            snapshots: None,
            control: Arc::default(),
            deadline: None,
            chunks: Some(tx),
        };
        let submitted = Instant::now();
        let run = async {
            let outcome = handle.run(job).await;
            (outcome, Instant::now())
        };
        let stream = async {
            let mut chunks = Vec::new();
            while let Some(c) = rx.recv().await {
                chunks.push((c.seq as usize + 1, Instant::now()));
            }
            chunks
        };
        let ((outcome, done), chunks) = tokio::join!(run, stream);
        match outcome?? {
            Outcome::Finished(completion) => Ok(Trace {
                submitted,
                chunks,
                done,
                completion,
            }),
            Outcome::Suspended { .. } => bail!("a job was suspended"),
        }
    });
    futures::future::try_join_all(runs).await
}

/// Aggregate figures of jobs that ran together.
fn aggregate(in_flight: usize, traces: &[Trace]) -> anyhow::Result<Value> {
    let start = traces
        .iter()
        .map(|t| t.first_token().map(|(_, at)| at))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let start = *start.iter().max().context("no jobs")?;
    let end = traces.iter().map(|t| t.done).min().context("no jobs")?;
    ensure!(end > start, "a job finished before every job had started decoding");
    let window_tokens: usize = traces.iter().map(|t| t.tokens_by(end) - t.tokens_by(start)).sum();
    let generated: usize = traces.iter().map(|t| t.completion.tokens.len()).sum();
    let first_submit = traces.iter().map(|t| t.submitted).min().context("no jobs")?;
    let last_done = traces.iter().map(|t| t.done).max().context("no jobs")?;
    let wall = (last_done - first_submit).as_secs_f64();
    let per_seq = traces
        .iter()
        .map(|t| t.decode_tokens_per_s().map(|(_, r)| r))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let stopped_early = traces
        .iter()
        .filter(|t| t.completion.finish.reason != FinishReason::Length)
        .count();
    Ok(json!({
        "in_flight": in_flight,
        "max_tokens": AGGREGATE_MAX_TOKENS,
        "generated_tokens": generated,
        "stopped_early": stopped_early,
        "decode_tokens_per_s": window_tokens as f64 / (end - start).as_secs_f64(),
        "decode_window_tokens": window_tokens,
        "decode_window_s": (end - start).as_secs_f64(),
        "per_sequence_decode_tokens_per_s": median(per_seq),
        "end_to_end_tokens_per_s": generated as f64 / wall,
        "wall_s": wall,
    }))
}

/// The Python that imports llama.cpp: `FERRY_LLAMA_CPP_PYTHON` when the caller already ran the
/// set-up (empty when it failed there, so a failed compile is not tried twice), or else the set-up
/// script's answer, installing llama.cpp if needed (the benchmark's own set-up).
fn llama_cpp_python() -> anyhow::Result<PathBuf> {
    if let Some(python) = std::env::var_os("FERRY_LLAMA_CPP_PYTHON") {
        ensure!(!python.is_empty(), "scripts/setup-llama-cpp.sh failed before the run");
        return Ok(PathBuf::from(python));
    }
    let script = repo_root().join("scripts/setup-llama-cpp.sh");
    let out = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {}", script.display()))?;
    ensure!(out.status.success(), "{} failed ({})", script.display(), out.status);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let python = stdout
        .lines()
        .last()
        .context("the set-up script named no interpreter")?;
    Ok(PathBuf::from(python.trim()))
}

/// One llama.cpp run of `prompt` through the comparison script.
fn llama_cpp_run(
    python: &Path,
    model: &Path,
    threads: usize,
    prompt: &[u32],
    decode_tokens: usize,
) -> anyhow::Result<Value> {
    let script = repo_root().join("scripts/llama_cpp_bench.py");
    let mut child = Command::new(python)
        .arg(&script)
        .arg("--model")
        .arg(model)
        .arg("--threads")
        .arg(threads.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", python.display()))?;
    let request = json!({ "prompt": prompt, "decode_tokens": decode_tokens, "repeats": 1 });
    child
        .stdin
        .take()
        .context("no stdin")?
        .write_all(request.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "llama_cpp_bench.py failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The Python that imports llama.cpp, found once per run (see [`llama_cpp_python`]), or why not.
type LlamaCpp = Result<PathBuf, String>;

/// Part 1: Ferry and llama.cpp on one sequence, alternating.
fn single_sequence(
    rt: &tokio::runtime::Runtime,
    model: &Arc<Model>,
    path: &Path,
    threads: usize,
    llama: &LlamaCpp,
) -> anyhow::Result<Value> {
    let prompt = model.tokenizer.encode(&count_prompt(1))?;
    let handle = EngineHandle::spawn(Engine::new(model.clone()), 1)?;
    // One forward pass after the first token's is timed per token; one more ends the job.
    let job = || greedy(prompt.clone(), DECODE_TOKENS + 2);
    rt.block_on(run_all(&handle, vec![greedy(prompt.clone(), 8)]))?;
    let (mut ferry_decode, mut ferry_prefill, mut llama_runs) = (Vec::new(), Vec::new(), Vec::new());
    let mut llama_error = llama.as_ref().err().cloned();
    let mut ferry_tokens = Vec::new();
    for _ in 0..REPEATS {
        let trace = rt.block_on(run_all(&handle, vec![job()]))?.remove(0);
        let (forwards, rate) = trace.decode_tokens_per_s()?;
        ensure!(
            forwards == DECODE_TOKENS,
            "Ferry stopped after {forwards} decode tokens"
        );
        ferry_decode.push(rate);
        ferry_prefill.push(prompt.len() as f64 / trace.completion.prefill.as_secs_f64());
        ferry_tokens = trace.completion.tokens;
        if let (Ok(python), None) = (llama, &llama_error) {
            match llama_cpp_run(python, path, threads, &prompt, DECODE_TOKENS) {
                Ok(v) => llama_runs.push(v),
                Err(e) => llama_error = Some(format!("{e:#}")),
            }
        }
    }
    let ferry = json!({
        "weights": "q8_0",
        "decode_tokens_per_s": median(ferry_decode.clone()),
        "decode_tokens_per_s_runs": ferry_decode,
        "prefill_tokens_per_s": median(ferry_prefill),
    });
    let mut report = json!({
        "prompt_tokens": prompt.len(),
        "decode_tokens": DECODE_TOKENS,
        "repeats": REPEATS,
        "ferry": ferry,
        "llama_cpp": null,
        "llama_cpp_error": llama_error,
        "vs_llama_cpp_ratio": null,
    });
    if llama_error.is_none() && !llama_runs.is_empty() {
        let field = |k: &str| llama_runs.iter().filter_map(|r| r[k].as_f64()).collect::<Vec<_>>();
        let decode = field("decode_tokens_per_s");
        let llama_tokens: Vec<u32> = serde_json::from_value(llama_runs[0]["generated"].clone())?;
        // Where greedy decoding parts: Q8_0 and Q4_1 weights give slightly different logits.
        let same_prefix = ferry_tokens
            .iter()
            .zip(&llama_tokens)
            .take_while(|(a, b)| a == b)
            .count();
        report["llama_cpp"] = json!({
            "weights": "as stored (q4_1)",
            "llama_cpp_python": llama_runs[0]["llama_cpp_python"],
            "system_info": llama_runs[0]["system_info"],
            "decode_tokens_per_s": median(decode.clone()),
            "decode_tokens_per_s_runs": decode,
            "prefill_tokens_per_s": median(field("prefill_tokens_per_s")),
            "greedy_tokens_same_as_ferry": same_prefix,
        });
        report["vs_llama_cpp_ratio"] = json!(
            report["ferry"]["decode_tokens_per_s"].as_f64().unwrap_or(0.0)
                / report["llama_cpp"]["decode_tokens_per_s"].as_f64().unwrap_or(f64::NAN)
        );
    }
    Ok(report)
}

/// Part 3: prefill of a long prompt, Ferry and llama.cpp alternating.
fn prefill(
    rt: &tokio::runtime::Runtime,
    model: &Arc<Model>,
    path: &Path,
    threads: usize,
    llama: &LlamaCpp,
) -> anyhow::Result<Value> {
    let filler = model.tokenizer.encode(&FILLER.repeat(PREFILL_TOKENS / 20))?;
    ensure!(filler.len() >= PREFILL_TOKENS, "filler too short");
    let prompt = filler[..PREFILL_TOKENS].to_vec();
    let handle = EngineHandle::spawn(Engine::new(model.clone()), 1)?;
    rt.block_on(run_all(&handle, vec![greedy(prompt[..64].to_vec(), 1)]))?;
    let mut llama_error = llama.as_ref().err().cloned();
    let (mut ferry, mut llama_runs) = (Vec::new(), Vec::new());
    for _ in 0..REPEATS {
        let trace = rt
            .block_on(run_all(&handle, vec![greedy(prompt.clone(), 1)]))?
            .remove(0);
        ferry.push(prompt.len() as f64 / trace.completion.prefill.as_secs_f64());
        if let (Ok(python), None) = (llama, &llama_error) {
            match llama_cpp_run(python, path, threads, &prompt, 1) {
                Ok(v) => llama_runs.extend(v["prefill_tokens_per_s"].as_f64()),
                Err(e) => llama_error = Some(format!("{e:#}")),
            }
        }
    }
    let ratio =
        (llama_error.is_none() && !llama_runs.is_empty()).then(|| median(ferry.clone()) / median(llama_runs.clone()));
    Ok(json!({
        "prompt_tokens": prompt.len(),
        "ferry_prefill_tokens_per_s": median(ferry.clone()),
        "ferry_prefill_tokens_per_s_runs": ferry,
        "llama_cpp_prefill_tokens_per_s": (!llama_runs.is_empty()).then(|| median(llama_runs.clone())),
        "llama_cpp_prefill_tokens_per_s_runs": llama_runs,
        "llama_cpp_error": llama_error,
        "prefill_vs_llama_cpp_ratio": ratio,
    }))
}

/// Parts 1 to 3 with this process's threads: the figures the report compares.
fn speed(
    rt: &tokio::runtime::Runtime,
    model: &Arc<Model>,
    path: &Path,
    threads: usize,
    llama: &LlamaCpp,
) -> anyhow::Result<Value> {
    let single = single_sequence(rt, model, path, threads, llama)?;
    let prefill = prefill(rt, model, path, threads, llama)?;
    let aggregate = aggregates(rt, model)?;
    let rate = |n: usize| {
        aggregate
            .iter()
            .find(|a| a["in_flight"] == n)
            .and_then(|a| a["decode_tokens_per_s"].as_f64())
    };
    let batch_ratio = rate(8).zip(rate(1)).map(|(b8, b1)| b8 / b1);
    Ok(json!({
        "threads": threads,
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

/// Part 2: aggregate decode with several sequences in flight.
fn aggregates(rt: &tokio::runtime::Runtime, model: &Arc<Model>) -> anyhow::Result<Vec<Value>> {
    let once = |n: usize| -> anyhow::Result<Value> {
        let jobs = (0..n)
            .map(|i| {
                Ok(greedy(
                    model.tokenizer.encode(&count_prompt(1 + 100 * i))?,
                    AGGREGATE_MAX_TOKENS,
                ))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let handle = EngineHandle::spawn(Engine::new(model.clone()), n)?;
        let traces = rt.block_on(run_all(&handle, jobs))?;
        aggregate(n, &traces)
    };
    // The two the ratio compares run alternately, `REPEATS` times each, and report their
    // medians, so that drift in machine speed cancels as in parts 1 and 3.
    let mut runs: Vec<Vec<Value>> = vec![Vec::new(); IN_FLIGHT.len()];
    for _ in 0..REPEATS {
        for (i, &n) in IN_FLIGHT.iter().enumerate() {
            if RATIO_IN_FLIGHT.contains(&n) {
                runs[i].push(once(n)?);
            }
        }
    }
    let mut out = Vec::new();
    for (i, &n) in IN_FLIGHT.iter().enumerate() {
        if runs[i].is_empty() {
            out.push(once(n)?);
            continue;
        }
        let rates: Vec<f64> = runs[i]
            .iter()
            .filter_map(|r| r["decode_tokens_per_s"].as_f64())
            .collect();
        let mid = median(rates.clone());
        let mut report = runs[i]
            .iter()
            .find(|r| r["decode_tokens_per_s"].as_f64() == Some(mid))
            .cloned()
            .context("no run")?;
        report["decode_tokens_per_s_runs"] = json!(rates);
        out.push(report);
    }
    Ok(out)
}

/// Part 5, in the child process: 8 long sequences, then this process's peak resident memory.
fn rss_child(path: &Path) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let model = load_model(path)?;
    let after_load_kib = proc_status_kib("VmRSS")?;
    let c = &model.weights.config;
    let filler = model.tokenizer.encode(&FILLER.repeat(RSS_POSITIONS / 20))?;
    let jobs = (0..RSS_SEQUENCES)
        .map(|i| {
            let tail = model.tokenizer.encode(&count_prompt(1 + 100 * i))?;
            let head = RSS_POSITIONS - RSS_DECODE_TOKENS - tail.len();
            ensure!(filler.len() >= head + i, "filler too short");
            // Each prompt starts at a different place in the filler, so no two are the same.
            let prompt = [&filler[i..i + head], &tail[..]].concat();
            Ok(greedy(prompt, RSS_DECODE_TOKENS))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let start = Instant::now();
    let handle = EngineHandle::spawn(Engine::new(model.clone()), RSS_SEQUENCES)?;
    let traces = rt.block_on(run_all(&handle, jobs))?;
    // Every sequence had started decoding before the first one ended: all 8 caches were held.
    let all_started = traces.iter().filter_map(|t| t.chunks.first().map(|(_, at)| *at)).max();
    let first_done = traces.iter().map(|t| t.done).min();
    let all_at_once = all_started.zip(first_done).is_some_and(|(s, d)| s < d);
    let positions: Vec<usize> = traces
        .iter()
        .map(|t| t.completion.prompt_tokens + t.completion.tokens.len())
        .collect();
    let kv_bytes_per_position = c.n_layer * 2 * c.n_kv_head * c.head_dim * std::mem::size_of::<f32>();
    println!(
        "{}",
        json!({
            "sequences": RSS_SEQUENCES,
            "positions": positions,
            "all_in_flight_at_once": all_at_once,
            "peak_rss_mib": proc_status_kib("VmHWM")? as f64 / 1024.0,
            "rss_after_load_mib": after_load_kib as f64 / 1024.0,
            "kv_cache_mib": (kv_bytes_per_position * positions.iter().sum::<usize>()) as f64 / (1024.0 * 1024.0),
            "wall_s": start.elapsed().as_secs_f64(),
        })
    );
    Ok(())
}

/// A `kB` field of /proc/self/status.
fn proc_status_kib(field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .with_context(|| format!("no {field} in /proc/self/status"))?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("malformed /proc/self/status")?
        .parse()?)
}

/// Part 5, from the parent: runs the memory child and reads its figures.
fn peak_memory() -> anyhow::Result<Value> {
    child("memory", &[(RSS_CHILD_ENV, "1")])
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
    if std::env::var_os(THREADS_CHILD_ENV).is_some() {
        println!("{}", speed(&rt, &model, &path, threads, &llama)?);
        return Ok(());
    }
    let speed = speed(&rt, &model, &path, threads, &llama)?;
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
