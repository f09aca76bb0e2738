//! Generates an answer in-process, without Kafka: `cargo run --example generate -- [--native]
//! "question" ...`. Handy to see what the engine says and how fast.

use std::path::PathBuf;

use ferry_schemas::Request;
use ferry_worker::engine::Engine;
use ferry_worker::model::{LoadOptions, Model, ModelSource, WeightFormat};

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let native = args.iter().any(|a| a == "--native");
    args.retain(|a| a != "--native");
    let path = std::env::var("FERRY_TEST_MODEL").unwrap_or_else(|_| "models/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let weights = if native {
        WeightFormat::Native
    } else {
        WeightFormat::Q8_0
    };
    let opts = LoadOptions::new(ModelSource::Path(PathBuf::from(path)), weights);
    let engine = Engine::new(std::sync::Arc::new(Model::load(&opts, &candle_core::Device::Cpu)?));
    for q in args {
        let req: Request = serde_json::from_value(serde_json::json!({
            "id": "example", "messages": [{"role": "user", "content": q}], "max_tokens": 64
        }))?;
        let prepared = engine.prepare(&req).map_err(|e| anyhow::anyhow!("{e}"))?;
        let c = engine.generate(prepared)?;
        println!(
            "Q: {q}\nA: {}\n   [{} prompt + {} tokens, {:?}, decode {:.1} tok/s]\n",
            c.text,
            c.prompt_tokens,
            c.tokens.len(),
            c.finish.reason,
            c.tokens.len() as f64 / c.decode.as_secs_f64()
        );
    }
    Ok(())
}
