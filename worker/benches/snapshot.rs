//! What snapshots cost and what they buy, measured in one run on one machine:
//!
//! 1. Decode overhead: single-sequence decode tokens/s without snapshots over tokens/s with a
//!    snapshot every 16 tokens (cache mode, file store, the real writer task on a tokio runtime,
//!    `maybe_offer` after every step as the engine does). Runs alternate, without and with, and
//!    the medians are compared, so drift in machine speed cancels.
//! 2. Bytes written per generated token, in cache mode and in tokens mode.
//! 3. Restoring a snapshot (`Snapshots::find` + `Sequence::resume` with the cache) against
//!    re-prefilling the same tokens, at 256, 1024 and 4096 positions of context.
//!
//! Recovery across processes (SIGTERM and SIGKILL, on real Kafka and on the mock) is the
//! `recovery` bench's (`recovery.json`).
//!
//! `cargo bench -p ferry-worker --bench snapshot` writes `snapshot.json` into `FERRY_BENCH_OUT`
//! (default `target/bench`) and prints it. Pin `RAYON_NUM_THREADS` (it uses that many compute
//! threads).
//!
//! Limits: the file store lives on the local disk, and a restore reads a snapshot just written
//! (in the page cache): a survivor on another node reading a network volume pays more.

#[path = "support/report.rs"]
mod report;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use candle_core::Device;
use clap::Parser;
use ferry_schemas::Request;
use ferry_testkit::model::model_path;
use ferry_worker::config::SnapshotConfig;
use ferry_worker::engine::{Engine, Prepared, Sequence};
use ferry_worker::model::{Model, WeightFormat};
use ferry_worker::snapshot::format::snapshot_prefix;
use ferry_worker::snapshot::store::{self, SnapshotStore};
use ferry_worker::snapshot::writer::SnapshotSink;
use ferry_worker::snapshot::{SnapshotPolicy, Snapshots};
use serde_json::json;

const SNAPSHOT_EVERY_TOKENS: usize = 16;
const DECODE_TOKENS: usize = 256;
const REPEATS: usize = 3;
/// Context sizes for restore against re-prefill, and how many re-prefills each: a re-prefill
/// of 1024 or more positions takes many seconds on one core, and one sample is plenty next to a
/// restore two orders of magnitude faster.
const CONTEXTS: [(usize, usize); 3] = [(256, REPEATS), (1024, 1), (4096, 1)];
/// A raw prompt the model continues greedily for hundreds of tokens without an end of sequence,
/// so that every run does the same model work (each run checks it).
const COUNT_PROMPT: &str = "Count from 1 to 1000, separated by commas: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,";
const FILLER: &str = "The lighthouse keeper climbed the spiral stairs each evening, trimmed the wick, \
polished the great lens and wrote the weather, the ships and the sea birds in a leather log. ";

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn count_request(id: &str, max_tokens: u32) -> anyhow::Result<Request> {
    let value = json!({ "id": id, "prompt": COUNT_PROMPT, "max_tokens": max_tokens, "temperature": 0.0 });
    Ok(serde_json::from_value(value)?)
}

/// The worker's snapshot flags and their defaults, so the bench measures what the worker runs.
#[derive(Parser)]
struct WorkerSnapshotFlags {
    #[command(flatten)]
    snapshot: SnapshotConfig,
}

fn worker_policy(mode: &str) -> anyhow::Result<SnapshotPolicy> {
    let every = SNAPSHOT_EVERY_TOKENS.to_string();
    let flags = ["bench", "--snapshot-every-tokens", every.as_str(), "--resume", mode];
    Ok(WorkerSnapshotFlags::try_parse_from(flags)?.snapshot.policy())
}

/// The in-process parts: the model, a runtime for the writer task, and a file store.
struct InProcess {
    model: Arc<Model>,
    engine: Engine,
    /// One runtime thread for the writer task, as the worker has; decoding runs on the bench's
    /// own thread, as on the worker's engine thread.
    rt: tokio::runtime::Runtime,
    store: Arc<dyn SnapshotStore>,
    _dir: tempfile::TempDir,
}

/// What a run with snapshots wrote.
struct Written {
    bytes: u64,
    snapshots: u64,
    skipped: u64,
    write_ms: f64,
}

impl InProcess {
    fn new() -> anyhow::Result<Self> {
        let model = Arc::new(report::load_model(&model_path(), WeightFormat::Q8_0)?);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let dir = tempfile::tempdir()?;
        let url = format!("file://{}", dir.path().display());
        let store = rt.block_on(store::open(&url, Duration::from_secs(3600)))?;
        Ok(Self {
            engine: Engine::new(model.clone()),
            model,
            rt,
            store,
            _dir: dir,
        })
    }

    fn snapshots(&self, mode: &str) -> anyhow::Result<Snapshots> {
        Ok(Snapshots::new(
            self.store.clone(),
            worker_policy(mode)?,
            &self.model,
            "q8_0",
            &Device::Cpu,
        ))
    }

    /// Decodes `prepared` from a fresh prefill to its `max_tokens`, offering snapshots to `sink`
    /// after every step as the engine does, and returns decode tokens/s (prefill excluded).
    fn decode(&self, prepared: &Prepared, mut sink: Option<&mut SnapshotSink>) -> anyhow::Result<f64> {
        let m = &*self.model;
        let mut seq = Sequence::new(m, prepared.prompt.clone(), prepared.params.clone());
        seq.prefill(m)?;
        let start = Instant::now();
        while seq.finish().is_none() {
            seq.step(m)?;
            if let Some(sink) = sink.as_deref_mut() {
                sink.maybe_offer(&seq)?;
            }
        }
        let secs = start.elapsed().as_secs_f64();
        let n = seq.generated().len();
        ensure!(
            n == prepared.params.max_tokens,
            "the count prompt ended after {n} tokens: runs would differ"
        );
        Ok(n as f64 / secs)
    }

    /// A decode run with a writer, as the worker runs a request.
    fn decode_with_snapshots(&self, prepared: &Prepared, mode: &str, run: usize) -> anyhow::Result<(f64, Written)> {
        let snaps = self.snapshots(mode)?;
        let prefix = snapshot_prefix("bench", &format!("decode-{mode}-{run}"));
        let (writer, mut sink) = {
            let _rt = self.rt.enter();
            snaps
                .writer(&prefix, prepared, "bench", None)
                .context("snapshots are on")?
        };
        let tps = self.decode(prepared, Some(&mut sink));
        // Everything offered is written before the counters are read, so that every run
        // counts the same snapshots; the worker likewise waits for no write on the decode path.
        self.rt.block_on(async {
            writer.idle().await;
            writer.stop().await;
            snaps.delete(&prefix).await;
        });
        let s = &snaps.stats;
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        ensure!(load(&s.failed) == 0, "{} snapshot writes failed", load(&s.failed));
        let written = Written {
            bytes: load(&s.bytes),
            snapshots: load(&s.written),
            skipped: load(&s.skipped),
            write_ms: load(&s.write_micros) as f64 / 1e3,
        };
        Ok((tps?, written))
    }

    /// Parts 1 and 2.
    fn overhead(&self) -> anyhow::Result<serde_json::Value> {
        let prepared = self
            .engine
            .prepare(&count_request("bench-decode", DECODE_TOKENS as u32)?)?;
        // A short warm-up, so the first measured run does not pay for first touches.
        let mut warm = prepared.clone();
        warm.params.max_tokens = 32;
        self.decode(&warm, None)?;
        let (mut without, mut with, mut cache) = (Vec::new(), Vec::new(), None);
        for run in 0..REPEATS {
            without.push(self.decode(&prepared, None)?);
            let (tps, w) = self.decode_with_snapshots(&prepared, "cache", run)?;
            with.push(tps);
            cache = Some(w);
        }
        let cache = cache.context("at least one run")?;
        let (tokens_mode_tps, tokens) = self.decode_with_snapshots(&prepared, "tokens", 0)?;
        let shape = self.snapshots("cache")?.shape();
        let per_token = |w: &Written| w.bytes as f64 / DECODE_TOKENS as f64;
        let figures = |w: &Written| {
            json!({
                "bytes_per_token": per_token(w),
                "bytes": w.bytes,
                "snapshots": w.snapshots,
                "skipped": w.skipped,
                "write_ms": w.write_ms,
            })
        };
        let (a, b) = (median(without.clone()), median(with.clone()));
        Ok(json!({
            "prompt_tokens": prepared.prompt.len(),
            "decode_tokens": DECODE_TOKENS,
            "repeats": REPEATS,
            "decode_tokens_per_s_without": a,
            "decode_tokens_per_s_with": b,
            "samples_without": without,
            "samples_with": with,
            "snapshot_overhead_ratio": a / b,
            "tokens_mode_decode_tokens_per_s": tokens_mode_tps,
            "kv_bytes_per_position": shape.values_per_tensor(1) * 2 * shape.n_layer as usize * 4,
            "cache_mode": figures(&cache),
            "tokens_mode": figures(&tokens),
            "bytes_per_token_cache": per_token(&cache),
            "bytes_per_token_tokens": per_token(&tokens),
        }))
    }

    /// Part 3, for one context size: `positions - 1` prompt tokens and one generated token.
    fn restore_vs_reprefill(
        &self,
        filler: &[u32],
        positions: usize,
        repeats: usize,
    ) -> anyhow::Result<serde_json::Value> {
        let m = &*self.model;
        let prompt = filler[..positions - 1].to_vec();
        let tokens = vec![filler[positions - 1]];
        let prepared = Prepared::greedy(prompt.clone(), 64);
        let params = prepared.params.clone();
        // Re-prefill: a resume without a cache runs the prompt and the generated token through
        // the model, as a worker that finds no snapshot does (it would then decode the
        // generated tokens one at a time, which costs more; one token keeps this a lower bound).
        let mut reprefill = Vec::new();
        let mut fresh = None;
        for _ in 0..repeats {
            let start = Instant::now();
            let seq = Sequence::resume(m, prompt.clone(), params.clone(), tokens.clone(), None)?;
            reprefill.push(ms(start.elapsed()));
            fresh = Some(seq);
        }
        let mut fresh = fresh.context("at least one re-prefill")?;
        let snaps = self.snapshots("cache")?;
        let prefix = snapshot_prefix("bench", &format!("restore-{positions}"));
        let (writer, mut sink) = {
            let _rt = self.rt.enter();
            snaps
                .writer(&prefix, &prepared, "bench", None)
                .context("snapshots are on")?
        };
        sink.offer(&fresh)?;
        self.rt.block_on(writer.flush_and_stop());
        let bytes = snaps.stats.bytes.load(std::sync::atomic::Ordering::Relaxed);
        let (mut find, mut restore, mut restored) = (Vec::new(), Vec::new(), None);
        for _ in 0..REPEATS {
            let start = Instant::now();
            let found = self
                .rt
                .block_on(snaps.find(&prefix, &prepared))
                .context("the snapshot just written")?;
            find.push(ms(start.elapsed()));
            let r = found.resume;
            let seq = Sequence::resume(m, prompt.clone(), params.clone(), r.tokens, r.cache)?;
            restore.push(ms(start.elapsed()));
            restored = Some(seq);
        }
        self.rt.block_on(snaps.delete(&prefix));
        // Both ways must continue identically.
        let mut restored = restored.context("at least one restore")?;
        fresh.step(m)?;
        restored.step(m)?;
        ensure!(
            fresh.generated() == restored.generated(),
            "restored and re-prefilled sequences differ at {positions}"
        );
        let (reprefill_ms, restore_ms) = (median(reprefill.clone()), median(restore.clone()));
        Ok(json!({
            "positions": positions,
            "snapshot_bytes": bytes,
            "restore_ms": restore_ms,
            "restore_find_ms": median(find),
            "reprefill_ms": reprefill_ms,
            "reprefill_vs_restore_ratio": reprefill_ms / restore_ms,
            "restore_samples_ms": restore,
            "reprefill_samples_ms": reprefill,
        }))
    }

    fn restores(&self) -> anyhow::Result<serde_json::Value> {
        let longest = CONTEXTS.iter().map(|c| c.0).max().unwrap_or(0);
        let mut filler = Vec::new();
        while filler.len() < longest {
            filler.extend(self.model.tokenizer.encode(FILLER)?);
        }
        let sizes = CONTEXTS
            .iter()
            .map(|&(n, repeats)| self.restore_vs_reprefill(&filler, n, repeats))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(json!(sizes))
    }
}

/// Whether `part` is to run: `FERRY_BENCH_PARTS` lists some of `decode,restore`
/// (all when unset), to rerun one part alone.
fn selected(part: &str) -> bool {
    std::env::var("FERRY_BENCH_PARTS").map_or(true, |parts| parts.split(',').any(|p| p.trim() == part))
}

/// `{"256": x, "1024": y, …}` from the restore results' field `key`.
fn by_positions(restores: &serde_json::Value, key: &str) -> serde_json::Value {
    let sizes = restores.as_array().into_iter().flatten();
    json!(sizes
        .map(|r| (r["positions"].to_string(), r[key].clone()))
        .collect::<serde_json::Map<_, _>>())
}

fn main() -> anyhow::Result<()> {
    let started = Instant::now();
    let threads = candle_core::utils::get_num_threads();
    let policy = worker_policy("cache")?;
    let (mut overhead, mut restores) = (serde_json::Value::Null, serde_json::Value::Null);
    if selected("decode") || selected("restore") {
        let bench = InProcess::new()?;
        if selected("decode") {
            eprintln!("decode overhead and bytes per token…");
            overhead = bench.overhead()?;
        }
        if selected("restore") {
            eprintln!("restore against re-prefill…");
            restores = bench.restores()?;
        }
    }
    let report = json!({
        "model": model_path().file_name().map(|f| f.to_string_lossy().into_owned()),
        "weights": "q8_0",
        "threads": threads,
        "snapshot_every_tokens": policy.every_tokens,
        "snapshot_max_pieces": policy.max_pieces,
        "snapshot_overhead_ratio": overhead["snapshot_overhead_ratio"],
        "bytes_per_token_cache": overhead["bytes_per_token_cache"],
        "bytes_per_token_tokens": overhead["bytes_per_token_tokens"],
        "reprefill_vs_restore_ratio": by_positions(&restores, "reprefill_vs_restore_ratio"),
        "restore_ms": by_positions(&restores, "restore_ms"),
        "reprefill_ms": by_positions(&restores, "reprefill_ms"),
        "decode": overhead,
        "restore": restores,
        "bench_s": started.elapsed().as_secs_f64(),
        "notes": NOTES,
    });
    report::save_and_print("snapshot", &report)
}

/// How the figures were taken, for whoever reads the JSON without this file.
const NOTES: &[&str] = &[
    "snapshot_overhead_ratio: median decode tokens/s without snapshots over median with a snapshot every \
     16 tokens (cache mode, file store on local disk, writer task on a one-thread tokio runtime, decode \
     on the bench thread), runs alternating without/with; both runs decode the same greedy count prompt \
     to exactly the same number of tokens.",
    "bytes_per_token_*: bytes the writer stored (pieces and manifests) over generated tokens; the \
     cache-mode figure includes the prompt's KV once; tokens-mode manifests carry all token ids, so they \
     grow with the answer.",
    "restore: Snapshots::find (read, verify, rebuild the cache) plus Sequence::resume (one forward pass \
     of the last token), from a snapshot just written (page cache warm). reprefill: Sequence::resume \
     without a cache, one forward pass over all positions; a worker without a snapshot would also \
     re-decode the generated tokens one by one, so the ratio is a lower bound.",
];
