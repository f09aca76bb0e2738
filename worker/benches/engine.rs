//! Single-sequence engine speed: prefill and decode tokens/s, for the GGUF file's own weights
//! and for weights re-quantised to Q8_0 at load, measured in one run on one machine.
//!
//! `make bench` runs it and writes `target/bench/engine.json`. Threads follow
//! `RAYON_NUM_THREADS` (all cores when unset); the figure is printed with the results.

#[path = "support/report.rs"]
mod report;

use std::path::{Path, PathBuf};
use std::time::Instant;

use ferry_worker::engine::sampler::{sample, SamplingParams};
use ferry_worker::model::{SequenceCache, WeightFormat};

/// The chat prompt both runs use (rendered by the model's template).
const QUESTION: &str = "Explain in a few sentences why the sky is blue, and what changes at sunset.";
const DECODE_TOKENS: usize = 128;
const REPEATS: usize = 3;

struct Measure {
    prompt_tokens: usize,
    prefill_tps: f64,
    decode_tps: f64,
    load_s: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn measure(path: &Path, weights: WeightFormat) -> anyhow::Result<Measure> {
    let start = Instant::now();
    let model = report::load_model(path, weights)?;
    let load_s = start.elapsed().as_secs_f64();
    let template = model
        .template
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("no chat template"))?;
    let msg = ferry_schemas::ChatMessage {
        role: ferry_schemas::Role::User,
        content: QUESTION.into(),
    };
    let text = template.render(&[msg], "", "")?;
    let prompt = model.tokenizer.encode(&text)?;
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    for _ in 0..REPEATS {
        let mut cache = SequenceCache::new(&model.weights.config);
        let t = Instant::now();
        let logits = model.weights.forward(&prompt, &mut cache)?;
        prefill.push(prompt.len() as f64 / t.elapsed().as_secs_f64());
        // Decode a fixed number of greedy tokens, ignoring end-of-sequence, so every run
        // measures the same work.
        let mut token = sample(&logits.to_vec1::<f32>()?, &SamplingParams::GREEDY, 0);
        let t = Instant::now();
        for n in 0..DECODE_TOKENS {
            let logits = model.weights.forward(&[token], &mut cache)?;
            token = sample(&logits.to_vec1::<f32>()?, &SamplingParams::GREEDY, n as u64 + 1);
        }
        decode.push(DECODE_TOKENS as f64 / t.elapsed().as_secs_f64());
    }
    Ok(Measure {
        prompt_tokens: prompt.len(),
        prefill_tps: median(prefill),
        decode_tps: median(decode),
        load_s,
    })
}

fn main() -> anyhow::Result<()> {
    let path = std::env::var_os("FERRY_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    let threads = candle_core::utils::get_num_threads();
    let native = measure(&path, WeightFormat::Native)?;
    let q8 = measure(&path, WeightFormat::Q8_0)?;
    let report = serde_json::json!({
        "model": path.file_name().map(|f| f.to_string_lossy().into_owned()),
        "threads": threads,
        "prompt_tokens": native.prompt_tokens,
        "decode_tokens": DECODE_TOKENS,
        "repeats": REPEATS,
        "q4_1": {
            "prefill_tokens_per_s": native.prefill_tps,
            "decode_tokens_per_s": native.decode_tps,
            "load_s": native.load_s,
        },
        "q8_0": {
            "prefill_tokens_per_s": q8.prefill_tps,
            "decode_tokens_per_s": q8.decode_tps,
            "load_s": q8.load_s,
        },
        "q8_0_vs_q4_1_decode_ratio": q8.decode_tps / native.decode_tps,
        "q8_0_vs_q4_1_prefill_ratio": q8.prefill_tps / native.prefill_tps,
    });
    report::save_and_print("engine", &report)
}
