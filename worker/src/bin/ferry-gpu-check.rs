//! `ferry-gpu-check`: what a GPU machine must show before a GPU fleet is trusted, in one JSON
//! report (`scripts/gpu-check.sh` runs it there). On `--device` (a GPU, or the CPU for a dry run):
//!
//! 1. **Logits**: the model's logits on the device against the CPU's on the same weights (native,
//!    candle's kernels on both sides), a prompt and three decode steps. Passes when every step
//!    picks the same next token and the logits are within 10% in L2 (the tolerance Ferry's own
//!    kernels are held to against candle's; GPU kernels quantise activations differently).
//! 2. **Resume**: a generation interrupted by a drain and by a crash, its snapshot written through
//!    the worker's snapshot writer to a file store and resumed on the device, in both resume
//!    modes: each must finish with the uninterrupted answer, byte for byte.
//! 3. **Throughput**: 1 and 8 sequences in flight through the engine thread, as the worker runs
//!    them: aggregate prefill and decode tokens/s.
//! 4. **Snapshot overhead**: one sequence's decode tokens/s with snapshots every 16 tokens
//!    against none.
//!
//! Exits 0 when 1 and 2 pass, 1 otherwise; the figures of 3 and 4 are reported, not judged.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use clap::Parser;
use ferry_worker::config::DeviceChoice;
use ferry_worker::engine::{Checkpoint, Engine, EngineHandle, Job, Outcome, Prepared, Sequence};
use ferry_worker::model::closeness::closeness;
use ferry_worker::model::{Kernels, LoadOptions, Model, ModelSource, SequenceCache, WeightFormat};
use ferry_worker::snapshot::format::snapshot_prefix;
use ferry_worker::snapshot::{device_fingerprint, store, ResumeMode, SnapshotPolicy, Snapshots};
use serde_json::{json, Value};

#[derive(Parser, Debug)]
struct Args {
    /// The GGUF file (a small one derived from the real model will do).
    #[arg(long)]
    model: PathBuf,
    /// The device under test: `cuda`, `cuda:N`, or `cpu` for a dry run.
    #[arg(long, default_value = "cuda", value_parser = ferry_worker::config::parse_device)]
    device: DeviceChoice,
    /// Where the JSON report goes (it is printed too).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Tokens each throughput sequence generates.
    #[arg(long, default_value_t = 64)]
    tokens: usize,
}

fn load(path: &std::path::Path, device: &candle_core::Device, weights: WeightFormat) -> anyhow::Result<Arc<Model>> {
    let opts = LoadOptions {
        kernels: Kernels::Candle,
        ..LoadOptions::new(ModelSource::Path(path.to_path_buf()), weights)
    };
    Ok(Arc::new(Model::load(&opts, device)?))
}

/// A raw prompt the model continues for a long while, different for each `from`.
fn prompt(model: &Model, from: usize, tokens: usize) -> anyhow::Result<Vec<u32>> {
    let text: String = (from..).take(tokens).map(|n| format!("{n}, ")).collect();
    let mut ids = model.tokenizer.encode(&text)?;
    ids.truncate(tokens);
    Ok(ids)
}

/// A file snapshot store in a fresh directory of this run's (removed at the end of `main`).
async fn file_store(name: &str) -> anyhow::Result<Arc<dyn store::SnapshotStore>> {
    let dir = scratch().join(name);
    std::fs::create_dir_all(&dir)?;
    Ok(store::open(&format!("file://{}", dir.display()), Duration::from_secs(3600)).await?)
}

fn scratch() -> PathBuf {
    std::env::temp_dir().join(format!("ferry-gpu-check-{}", std::process::id()))
}

/// Part 1: the device's logits against the CPU's.
fn logits(cpu: &Model, dev: &Model) -> anyhow::Result<Value> {
    let run = |m: &Model| -> anyhow::Result<Vec<Vec<f32>>> {
        let p = m
            .tokenizer
            .encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")?;
        let mut cache = SequenceCache::new(&m.weights.config);
        let mut out = vec![m.weights.forward(&p, &mut cache)?.to_vec1::<f32>()?];
        for token in [504u32, 3575, 282] {
            out.push(m.weights.forward(&[token], &mut cache)?.to_vec1::<f32>()?);
        }
        Ok(out)
    };
    let (a, b) = (run(cpu)?, run(dev)?);
    let mut steps = Vec::new();
    let mut pass = true;
    for (cpu, device) in a.iter().zip(&b) {
        let c = closeness(device, cpu);
        pass &= c.same_argmax && c.relative <= 0.10;
        steps.push(json!({"same_next_token": c.same_argmax, "relative_l2": c.relative, "max_abs_diff": c.max}));
    }
    Ok(json!({"pass": pass, "tolerance": "same next token, relative L2 <= 0.10", "steps": steps}))
}

/// Part 2: interrupted and resumed on the device, byte for byte.
async fn resume(model: &Arc<Model>, device: &candle_core::Device) -> anyhow::Result<Value> {
    let engine = Engine::new(model.clone());
    let store = file_store("resume").await?;
    let prepared = Prepared::greedy(prompt(model, 1, 24)?, 48);
    let reference = engine.generate(prepared.clone())?;
    let mut runs = Vec::new();
    let mut pass = true;
    for mode in [ResumeMode::Cache, ResumeMode::Tokens] {
        let policy = SnapshotPolicy {
            every_tokens: 4,
            every: None,
            mode,
            max_pieces: 3,
        };
        let snaps = Snapshots::new(store.clone(), policy, model, "native", device);
        for graceful in [true, false] {
            // A crash between two periodic snapshots loses the tokens since the last one.
            let k = reference.tokens.len() / 2 + usize::from(!graceful);
            let prefix = snapshot_prefix("gpu-check", &format!("{mode:?}-{graceful}"));
            let (writer, mut sink) = snaps
                .writer(&prefix, &prepared, "gpu-check", None)
                .context("snapshots on")?;
            let mut seq = Sequence::new(model, prepared.prompt.clone(), prepared.params.clone());
            seq.prefill(model)?;
            while seq.generated().len() < k && seq.finish().is_none() {
                seq.step(model)?;
                sink.maybe_offer(&seq)?;
                writer.idle().await;
            }
            if graceful {
                sink.offer(&seq)?;
                writer.flush_and_stop().await;
            } else {
                writer.stop().await;
            }
            let found = snaps.find(&prefix, &prepared).await;
            let from = found.as_ref().map_or(0, |f| f.manifest.tokens.len());
            let job = Job {
                resume: found.map(|f| f.resume),
                ..Job::new(prepared.clone())
            };
            let Outcome::Finished(c) = engine.run(job)? else {
                anyhow::bail!("the resumed run was suspended");
            };
            let same = c.tokens == reference.tokens && c.text == reference.text;
            pass &= same && from > 0;
            runs.push(
                json!({"mode": format!("{mode:?}"), "drain": graceful, "interrupted_at": k,
                "resumed_from": from, "identical": same}),
            );
        }
    }
    Ok(json!({"pass": pass, "reference_tokens": reference.tokens.len(), "runs": runs}))
}

/// Part 3: `n` sequences at once through the engine thread: (prefill, decode) tokens/s.
async fn in_flight(handle: &EngineHandle, model: &Model, n: usize, tokens: usize) -> anyhow::Result<Value> {
    let jobs: Vec<Prepared> = (0..n)
        .map(|i| prompt(model, 100 * i + 1, 128).map(|p| Prepared::greedy(p, tokens)))
        .collect::<Result<_, _>>()?;
    let prompt_tokens: usize = jobs.iter().map(|j| j.prompt.len()).sum();
    let started = Instant::now();
    let runs = jobs.into_iter().map(|p| handle.run(Job::new(p)));
    let mut completions = Vec::new();
    for outcome in futures::future::join_all(runs).await {
        match outcome.map_err(|e| anyhow::anyhow!("{e}"))?? {
            Outcome::Finished(c) => completions.push(c),
            Outcome::Suspended { .. } => anyhow::bail!("suspended"),
        }
    }
    let wall = started.elapsed().as_secs_f64();
    let prefill = completions.iter().map(|c| c.prefill.as_secs_f64()).fold(0.0, f64::max);
    let generated: usize = completions.iter().map(|c| c.tokens.len()).sum();
    Ok(
        json!({"in_flight": n, "prompt_tokens": prompt_tokens, "generated_tokens": generated,
        "prefill_tokens_per_s": prompt_tokens as f64 / prefill, "decode_tokens_per_s": generated as f64 / (wall - prefill),
        "wall_s": wall}),
    )
}

/// Part 4: one sequence's decode tokens/s with snapshots every 16 tokens, and without.
async fn snapshot_overhead(model: &Arc<Model>, device: &candle_core::Device, tokens: usize) -> anyhow::Result<Value> {
    let engine = Engine::new(model.clone());
    let store = file_store("overhead").await?;
    let policy = SnapshotPolicy {
        every_tokens: 16,
        every: None,
        mode: ResumeMode::Cache,
        max_pieces: 4,
    };
    let snaps = Snapshots::new(store, policy, model, "native", device);
    let mut rates = Vec::new();
    for with in [false, true, false, true] {
        let prepared = Prepared::greedy(prompt(model, 7, 64)?, tokens);
        let mut job = Job::new(prepared.clone());
        let writer = if with {
            let (w, sink) = snaps
                .writer(
                    &snapshot_prefix("gpu-check", &format!("o{}", rates.len())),
                    &prepared,
                    "gpu-check",
                    None,
                )
                .context("snapshots on")?;
            job.snapshots = Some(Box::new(sink) as Box<dyn Checkpoint>);
            Some(w)
        } else {
            None
        };
        let Outcome::Finished(c) = engine.run(job)? else {
            anyhow::bail!("suspended");
        };
        if let Some(w) = writer {
            w.stop().await;
        }
        rates.push((with, c.tokens.len() as f64 / c.decode.as_secs_f64()));
    }
    let mean = |w: bool| rates.iter().filter(|r| r.0 == w).map(|r| r.1).sum::<f64>() / 2.0;
    Ok(json!({"every_tokens": 16, "decode_tokens_per_s_without": mean(false),
        "decode_tokens_per_s_with": mean(true), "with_over_without": mean(true) / mean(false)}))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<std::process::ExitCode> {
    let args = Args::parse();
    let device = args.device.open()?;
    let started = Instant::now();
    let cpu = load(&args.model, &candle_core::Device::Cpu, WeightFormat::Native)?;
    let dev = load(&args.model, &device, WeightFormat::Native)?;
    let logits = logits(&cpu, &dev)?;
    drop(cpu);
    let resume = resume(&dev, &device).await?;
    let handle = EngineHandle::spawn(Engine::new(dev.clone()), 8)?;
    let mut throughput = Vec::new();
    for n in [1, 8] {
        throughput.push(in_flight(&handle, &dev, n, args.tokens).await?);
    }
    let overhead = snapshot_overhead(&dev, &device, args.tokens).await?;
    let pass = logits["pass"] == true && resume["pass"] == true;
    let report = json!({
        "pass": pass,
        "device": device_fingerprint(&device, dev.weights.kernels()),
        "model": args.model.display().to_string(),
        "layers": dev.weights.config.n_layer,
        "logits_vs_cpu": logits,
        "resume": resume,
        "throughput": throughput,
        "snapshot_overhead": overhead,
        "seconds": started.elapsed().as_secs_f64(),
    });
    let _ = std::fs::remove_dir_all(scratch());
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Some(out) = &args.out {
        std::fs::write(out, &text).with_context(|| format!("cannot write {}", out.display()))?;
    }
    ensure!(report["device"].is_string(), "no device in the report");
    Ok(if pass {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(1)
    })
}
