//! Ferry against llama.cpp, alternating: one sequence's decode (part 1) and a long prompt's
//! prefill (part 3).

use super::*;

/// What parts 1 and 3 compare: this process's model on its runtime, and llama.cpp on the same
/// file with the same threads.
#[derive(Clone, Copy)]
pub struct Comparison<'a> {
    pub rt: &'a tokio::runtime::Runtime,
    pub model: &'a Arc<Model>,
    pub path: &'a Path,
    pub threads: usize,
    pub llama: &'a LlamaCpp,
}

impl Comparison<'_> {
    /// Part 1: Ferry and llama.cpp on one sequence, alternating.
    pub fn single_sequence(&self) -> anyhow::Result<Value> {
        let prompt = self.model.tokenizer.encode(&count_prompt(1))?;
        let handle = EngineHandle::spawn(Engine::new(self.model.clone()), 1)?;
        // One forward pass after the first token's is timed per token; one more ends the job.
        let job = || Prepared::greedy(prompt.clone(), DECODE_TOKENS + 2);
        self.rt
            .block_on(run_all(&handle, vec![Prepared::greedy(prompt.clone(), 8)]))?;
        let (mut ferry_decode, mut ferry_prefill, mut llama_runs) = (Vec::new(), Vec::new(), Vec::new());
        let mut llama_error = self.llama.as_ref().err().cloned();
        let mut ferry_tokens = Vec::new();
        for _ in 0..REPEATS {
            let trace = self.rt.block_on(run_all(&handle, vec![job()]))?.remove(0);
            let (forwards, rate) = trace.decode_tokens_per_s()?;
            ensure!(
                forwards == DECODE_TOKENS,
                "Ferry stopped after {forwards} decode tokens"
            );
            ferry_decode.push(rate);
            ferry_prefill.push(prompt.len() as f64 / trace.completion.prefill.as_secs_f64());
            ferry_tokens = trace.completion.tokens;
            if let (Ok(python), None) = (self.llama, &llama_error) {
                match llama_cpp_run(python, self.path, self.threads, &prompt, DECODE_TOKENS) {
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
    pub fn prefill(&self) -> anyhow::Result<Value> {
        let filler = self.model.tokenizer.encode(&FILLER.repeat(PREFILL_TOKENS / 20))?;
        ensure!(filler.len() >= PREFILL_TOKENS, "filler too short");
        let prompt = filler[..PREFILL_TOKENS].to_vec();
        let handle = EngineHandle::spawn(Engine::new(self.model.clone()), 1)?;
        self.rt
            .block_on(run_all(&handle, vec![Prepared::greedy(prompt[..64].to_vec(), 1)]))?;
        let mut llama_error = self.llama.as_ref().err().cloned();
        let (mut ferry, mut llama_runs) = (Vec::new(), Vec::new());
        for _ in 0..REPEATS {
            let trace = self
                .rt
                .block_on(run_all(&handle, vec![Prepared::greedy(prompt.clone(), 1)]))?
                .remove(0);
            ferry.push(prompt.len() as f64 / trace.completion.prefill.as_secs_f64());
            if let (Ok(python), None) = (self.llama, &llama_error) {
                match llama_cpp_run(python, self.path, self.threads, &prompt, 1) {
                    Ok(v) => llama_runs.extend(v["prefill_tokens_per_s"].as_f64()),
                    Err(e) => llama_error = Some(format!("{e:#}")),
                }
            }
        }
        let ratio = (llama_error.is_none() && !llama_runs.is_empty())
            .then(|| median(ferry.clone()) / median(llama_runs.clone()));
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
}
