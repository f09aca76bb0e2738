//! Peak resident memory of a process running 8 long sequences (part 5).

use super::*;

/// Part 5, in the child process: 8 long sequences, then this process's peak resident memory.
pub fn rss_child(path: &Path) -> anyhow::Result<()> {
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
            Ok(Prepared::greedy(prompt, RSS_DECODE_TOKENS))
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
pub fn proc_status_kib(field: &str) -> anyhow::Result<u64> {
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
pub fn peak_memory() -> anyhow::Result<Value> {
    child("memory", &[(RSS_CHILD_ENV, "1")])
}
