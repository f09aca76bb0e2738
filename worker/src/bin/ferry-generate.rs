//! `ferry-generate`: answers requests in-process, without Kafka, exactly as a worker would
//! answer them uninterrupted. Reads requests as JSON lines on stdin, writes one JSON line per
//! request on stdout: `{"id", "text", "completion_tokens", "finish_reason"}`. The demo and the
//! chaos harness use it as the reference an interrupted, resumed answer must equal.

use std::io::{BufRead, Write};
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use ferry_schemas::Request;
use ferry_worker::engine::Engine;
use ferry_worker::model::{Kernels, LoadOptions, Model, ModelSource, WeightFormat};

#[derive(Debug, Parser)]
#[command(name = "ferry-generate", version, about)]
struct Args {
    /// The GGUF model, as for the worker.
    #[arg(long, env = "FERRY_MODEL")]
    model: ModelSource,
    /// Weight format, as for the worker (it must match for answers to be identical).
    #[arg(long, env = "FERRY_WEIGHTS", value_enum, default_value = "q8-0")]
    weights: WeightFormat,
    /// Which code runs the Q8_0 matrix products, as for the worker (it must match too).
    #[arg(long, env = "FERRY_KERNELS", default_value = "auto")]
    kernels: Kernels,
    /// Compute threads.
    #[arg(long, env = "FERRY_THREADS")]
    threads: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(t) = args.threads {
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
    }
    let opts = LoadOptions {
        kernels: args.kernels,
        ..LoadOptions::new(args.model, args.weights)
    };
    let engine = Engine::new(Arc::new(Model::load(&opts, &candle_core::Device::Cpu)?));
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for (n, line) in std::io::stdin().lock().lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let req: Request = serde_json::from_str(&line).with_context(|| format!("line {}", n + 1))?;
        req.validate().with_context(|| format!("line {}", n + 1))?;
        let prepared = engine
            .prepare(&req)
            .map_err(|e| anyhow::anyhow!("line {}: {e}", n + 1))?;
        let c = engine.generate(prepared)?;
        let row = serde_json::json!({
            "id": req.id,
            "text": c.text,
            "completion_tokens": c.tokens.len(),
            "finish_reason": c.finish.reason,
        });
        writeln!(out, "{row}")?;
        out.flush()?;
    }
    Ok(())
}
