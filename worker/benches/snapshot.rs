//! What snapshots cost and what they buy, measured in one run on one machine:
//!
//! 1. Decode overhead: single-sequence decode tokens/s without snapshots over tokens/s with a
//!    snapshot every 16 tokens (cache mode, file store, the real writer task on a tokio runtime,
//!    `maybe_offer` after every step as the engine does). Runs alternate, without and with, and
//!    the medians are compared, so drift in machine speed cancels.
//! 2. Bytes written per generated token, in cache mode and in tokens mode.
//! 3. Restoring a snapshot (`Snapshots::find` + `Sequence::resume` with the cache) against
//!    re-prefilling the same tokens, at 256, 1024 and 4096 positions of context.
//! 4. Recovery across processes with the real binaries: a broker, two workers, a long request;
//!    the worker generating it gets SIGTERM (drain), then, in a second round, SIGKILL; the bench
//!    times the signal to the survivor's progress and counts the tokens computed twice.
//!
//! `cargo bench -p ferry-worker --bench snapshot` writes `snapshot.json` into `FERRY_BENCH_OUT`
//! (default `target/bench`) and prints it. Part 4 needs the broker binary beside the worker's:
//! run `cargo build --release -p ferry -p ferry-worker` first. Pin `RAYON_NUM_THREADS` (the
//! in-process parts use that many compute threads; the worker processes use one each).
//!
//! Limits: part 4 runs on `ferry broker` (librdkafka's mock cluster) unless
//! `FERRY_TEST_BOOTSTRAP_SERVERS` names a real cluster, and the mock's group coordinator waits
//! longer to rebalance than a real broker does, so its recovery times are upper bounds. The
//! file store lives on the local disk, and a restore reads a snapshot just written (in the page
//! cache): a survivor on another node reading a network volume pays more.

#[path = "../tests/support/kafka.rs"]
mod kafka;
#[path = "../tests/support/model.rs"]
mod model;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context};
use candle_core::Device;
use clap::Parser;
use ferry_schemas::{Reply, Request};
use ferry_worker::config::SnapshotConfig;
use ferry_worker::engine::{Engine, GenerationParams, Prepared, SamplingParams, Sequence};
use ferry_worker::model::{Model, WeightFormat};
use ferry_worker::snapshot::format::{request_prefix, snapshot_prefix};
use ferry_worker::snapshot::store::{self, SnapshotStore};
use ferry_worker::snapshot::writer::SnapshotSink;
use ferry_worker::snapshot::{SnapshotPolicy, Snapshots};
use kafka::{unique, ChildGuard, Cluster};
use serde_json::json;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

const SNAPSHOT_EVERY_TOKENS: usize = 16;
const DECODE_TOKENS: usize = 256;
const REPEATS: usize = 3;
/// Context sizes for restore against re-prefill, and how many re-prefills each: a re-prefill
/// of 1024 or more positions takes many seconds on one core, and one sample is plenty next to a
/// restore two orders of magnitude faster.
const CONTEXTS: [(usize, usize); 3] = [(256, REPEATS), (1024, 1), (4096, 1)];
const SESSION_TIMEOUT: &str = "6s";
const FAILOVER_MAX_TOKENS: u32 = 200;
/// The worker is interrupted once its snapshot holds at least this many tokens.
const INTERRUPT_AFTER: usize = 32;
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
        let model = Arc::new(model::load(WeightFormat::Q8_0));
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
        let params = GenerationParams {
            sampling: SamplingParams::GREEDY,
            max_tokens: 64,
            stop: Vec::new(),
        };
        let prepared = Prepared {
            prompt: prompt.clone(),
            params: params.clone(),
        };
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

/// Part 4: the cross-process recovery.
mod failover {
    use super::*;

    /// One observed state of a request's snapshot manifest.
    #[derive(Debug, Clone)]
    pub struct Seen {
        pub at: Instant,
        pub tokens: usize,
        pub worker: String,
    }

    /// Generated tokens and writer of the manifest at `path`, read straight from the file store:
    /// a first line `FERRY-SNAPSHOT-MANIFEST`, the JSON, and a checksum line of 8 hex digits.
    fn read_manifest(path: &Path) -> Option<(usize, String)> {
        let m = ferry_worker::snapshot::format::Manifest::peek(&std::fs::read(path).ok()?).ok()?;
        Some((m.tokens.len(), m.worker))
    }

    /// Every change of one manifest, polled every few milliseconds (a write is a rename, so a
    /// read never sees half of one).
    pub struct Watch {
        path: PathBuf,
        pub seen: Vec<Seen>,
    }

    impl Watch {
        pub fn new(path: PathBuf) -> Self {
            Self { path, seen: Vec::new() }
        }

        fn poll(&mut self) {
            if let Some((tokens, worker)) = read_manifest(&self.path) {
                let last = self.seen.last();
                if last.is_none_or(|s| s.tokens != tokens || s.worker != worker) {
                    self.seen.push(Seen {
                        at: Instant::now(),
                        tokens,
                        worker,
                    });
                }
            }
        }

        /// Polls until `done` holds, for at most `timeout`. `tick` runs at every poll too.
        pub fn until(
            &mut self,
            timeout: Duration,
            what: &str,
            mut done: impl FnMut(&[Seen]) -> bool,
            mut tick: impl FnMut(),
        ) -> anyhow::Result<()> {
            let deadline = Instant::now() + timeout;
            loop {
                self.poll();
                tick();
                if done(&self.seen) {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    bail!(
                        "timed out after {timeout:?} waiting for {what}; manifests seen: {:?}",
                        self.seen
                    );
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }

        pub fn last(&self) -> anyhow::Result<&Seen> {
            self.seen.last().context("no manifest seen")
        }

        /// Manifests by `worker` seen after `t`.
        pub fn by(&self, worker: &str, t: Instant) -> Vec<&Seen> {
            self.seen.iter().filter(|s| s.worker == worker && s.at > t).collect()
        }
    }

    /// Generation speed from the first and last of `seen`, tokens/s.
    pub fn rate(seen: &[&Seen]) -> Option<f64> {
        let (a, b) = (seen.first()?, seen.last()?);
        let dt = b.at.duration_since(a.at).as_secs_f64();
        (b.tokens > a.tokens && dt > 0.0).then(|| (b.tokens - a.tokens) as f64 / dt)
    }

    /// The first line of `log` after `since` that contains `needle`, as (seconds after `since`,
    /// the line). Worker logs are text, each line starting with an RFC 3339 UTC timestamp.
    pub fn log_event(log: &str, needle: &str, since: SystemTime) -> Option<(f64, String)> {
        let since = OffsetDateTime::from(since);
        log.lines().filter(|l| l.contains(needle)).find_map(|l| {
            let ts = OffsetDateTime::parse(l.split_whitespace().next()?, &Rfc3339).ok()?;
            let dt = (ts - since).as_seconds_f64();
            (dt >= 0.0).then(|| (dt, l.to_string()))
        })
    }

    /// The `tokens=N` field of a log line.
    pub fn tokens_field(line: &str) -> Option<usize> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix("tokens=")?.parse().ok())
    }

    fn poll_until<T>(
        timeout: Duration,
        every: Duration,
        what: &str,
        mut f: impl FnMut() -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f() {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                bail!("timed out after {timeout:?} waiting for {what}");
            }
            std::thread::sleep(every);
        }
    }

    /// The cluster, the workers, and what the rounds share.
    pub struct Rig {
        cluster: Cluster,
        store_dir: PathBuf,
        requests: String,
        replies: String,
        group: String,
        args: Vec<String>,
        pub workers: Vec<ChildGuard>,
        rt: tokio::runtime::Runtime,
        producer: rdkafka::producer::FutureProducer,
    }

    impl Rig {
        pub fn start() -> anyhow::Result<Self> {
            let worker_bin = PathBuf::from(env!("CARGO_BIN_EXE_ferry-worker"));
            let broker_bin = worker_bin.with_file_name("ferry");
            ensure!(
                broker_bin.exists() || std::env::var_os("FERRY_TEST_BOOTSTRAP_SERVERS").is_some(),
                "{} is missing: run `cargo build --release -p ferry -p ferry-worker` first",
                broker_bin.display()
            );
            let (requests, replies, group) = (unique("bench-req"), unique("bench-rep"), unique("bench-group"));
            let dlq = format!("{requests}.dlq");
            let cluster = Cluster::start(&[&requests, &replies, &dlq]);
            let store_dir = cluster.dir.path().join("snapshots");
            std::fs::create_dir_all(&store_dir)?;
            let args = [
                "--topic",
                &requests,
                "--reply-topic",
                &replies,
                "--group-id",
                &group,
                "--snapshot-store",
                &format!("file://{}", store_dir.display()),
                "--snapshot-every-tokens",
                &SNAPSHOT_EVERY_TOKENS.to_string(),
                "--session-timeout",
                SESSION_TIMEOUT,
                // librdkafka's group log, to see when the group has settled and when a
                // survivor is handed the partition.
                "--kafka-property",
                "debug=cgrp",
                "--log",
                "info,librdkafka=debug",
            ]
            .map(String::from)
            .to_vec();
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let producer = cluster.producer();
            let mut rig = Self {
                cluster,
                store_dir,
                requests,
                replies,
                group,
                args,
                workers: Vec::new(),
                rt,
                producer,
            };
            rig.add_worker("worker-a")?;
            rig.add_worker("worker-b")?;
            Ok(rig)
        }

        /// Starts a worker and waits until the group, with it, is settled: a request published
        /// before that could be reassigned mid-generation by the join.
        pub fn add_worker(&mut self, name: &str) -> anyhow::Result<()> {
            let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
            self.workers.push(self.cluster.worker(name, &args));
            let workers = &self.workers;
            poll_until(
                Duration::from_secs(120),
                Duration::from_millis(50),
                "the consumer group to settle",
                || {
                    // Each member reaches `steady` once a generation that includes it is assigned;
                    // the newest worker's generation includes every earlier one.
                    workers.iter().all(|w| w.log().contains("-> steady")).then_some(())
                },
            )
            .with_context(|| self.log_tails())
        }

        pub fn log_tails(&self) -> String {
            let tail = |s: String| {
                s.lines()
                    .rev()
                    .take(15)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            self.workers
                .iter()
                .map(|w| format!("----- {} -----\n{}", w.name, tail(w.log())))
                .collect::<Vec<_>>()
                .join("\n")
        }

        /// Publishes a long request and returns its id, offset and manifest watch.
        pub fn publish(&self, label: &str) -> anyhow::Result<(String, i64, Watch)> {
            let id = unique(label);
            let payload = serde_json::to_vec(&count_request(&id, FAILOVER_MAX_TOKENS)?)?;
            let offset = self
                .rt
                .block_on(self.cluster.publish(&self.producer, &self.requests, &id, &payload));
            let prefix = request_prefix(&self.requests, &id, &self.replies, &payload);
            Ok((id, offset, Watch::new(self.store_dir.join(prefix).join("manifest"))))
        }

        pub fn worker_index(&self, name: &str) -> anyhow::Result<usize> {
            self.workers
                .iter()
                .position(|w| w.name == name)
                .with_context(|| format!("no worker {name}"))
        }

        /// Waits until the request at `offset` is committed and returns its answer.
        pub fn answer(&self, id: &str, offset: i64) -> anyhow::Result<ferry_schemas::Response> {
            let reader = self.cluster.reader(&self.group);
            poll_until(
                Duration::from_secs(180),
                Duration::from_millis(200),
                "the answer to be committed",
                || self.cluster.committed(&reader, &self.requests).filter(|&c| c > offset),
            )
            .with_context(|| self.log_tails())?;
            let answers: Vec<Reply> = self
                .cluster
                .read_all(&self.replies)
                .iter()
                .filter_map(|(_, v, _)| serde_json::from_slice(v).ok())
                .collect();
            answers
                .into_iter()
                .find_map(|r| match r {
                    Reply::Response(r) if r.id == id => Some(r),
                    _ => None,
                })
                .with_context(|| format!("no response to {id}"))
        }
    }

    /// Waits for the survivor's first two new snapshots after `t0`, polling `tick` meanwhile.
    fn survivor_progress(
        watch: &mut Watch,
        survivor: &str,
        t0: Instant,
        tick: impl FnMut(),
    ) -> anyhow::Result<(Seen, Option<f64>)> {
        watch.until(
            Duration::from_secs(180),
            "the survivor's new snapshots",
            |s| s.iter().filter(|m| m.worker == survivor && m.at > t0).count() >= 2,
            tick,
        )?;
        let new = watch.by(survivor, t0);
        let first = (*new.first().context("a new snapshot")?).clone();
        Ok((first, rate(&new)))
    }

    /// The survivor's timeline after a signal at `wall`, from its log.
    fn survivor_log(rig: &Rig, survivor: &str, wall: SystemTime) -> anyhow::Result<serde_json::Value> {
        let log = rig.workers[rig.worker_index(survivor)?].log();
        let log = log.as_str();
        let assigned = log_event(log, "delegating assign of 1 partition(s)", wall).map(|e| e.0);
        let resumed = log_event(log, "resuming from snapshot", wall);
        Ok(json!({
            "signal_to_assigned_s": assigned,
            "signal_to_resume_found_s": resumed.as_ref().map(|e| e.0),
            "resume_found_tokens": resumed.as_ref().and_then(|e| tokens_field(&e.1)),
        }))
    }

    /// The signal to the survivor's first new token, estimated from its first new snapshot
    /// (which lands `tokens - resumed - 1` tokens after that one) and its measured speed.
    fn first_new_token_s(first: &Seen, resumed: usize, survivor_tps: Option<f64>, t0: Instant) -> Option<f64> {
        let later = first.tokens.checked_sub(resumed + 1)? as f64;
        Some(first.at.duration_since(t0).as_secs_f64() - later / survivor_tps?)
    }

    /// SIGTERM the worker generating a request; the other resumes it.
    pub fn sigterm(rig: &mut Rig) -> anyhow::Result<serde_json::Value> {
        let (id, offset, mut watch) = rig.publish("bench-sigterm")?;
        watch.until(
            Duration::from_secs(180),
            "a first snapshot",
            |s| s.last().is_some_and(|m| m.tokens >= INTERRUPT_AFTER),
            || {},
        )?;
        let at_signal = watch.last()?.clone();
        let hi = rig.worker_index(&at_signal.worker)?;
        let survivor = rig
            .workers
            .iter()
            .find(|w| w.name != at_signal.worker)
            .context("a survivor")?
            .name
            .clone();
        let (t0, wall) = (Instant::now(), SystemTime::now());
        rig.workers[hi].signal("TERM");
        let mut exited = None;
        let holder = &mut rig.workers[hi];
        let (first, survivor_tps) = survivor_progress(&mut watch, &survivor, t0, || {
            if exited.is_none() {
                exited = holder
                    .wait_exit(Duration::ZERO)
                    .map(|status| (t0.elapsed().as_secs_f64(), status));
            }
        })?;
        let (exit_s, status) = match exited {
            Some(e) => e,
            None => (
                f64::NAN,
                holder
                    .wait_exit(Duration::from_secs(30))
                    .context("the drained worker exits")?,
            ),
        };
        ensure!(status.success(), "the drained worker exited with {status}");
        let drained_log = log_event(&holder.log(), "suspended; snapshot written", wall);
        // Only live workers stay in the rig: the next round picks its survivor among them.
        rig.workers.remove(hi);
        // The drain snapshot is the drained worker's last manifest.
        let drained = watch
            .seen
            .iter()
            .filter(|s| s.worker == at_signal.worker)
            .map(|s| s.tokens)
            .max()
            .unwrap_or(0);
        let answer = rig.answer(&id, offset)?;
        let resumed = answer
            .resumed_from_token
            .context("the survivor resumed from a snapshot")? as usize;
        let recovery_s = first.at.duration_since(t0).as_secs_f64();
        Ok(json!({
            "drained_worker": at_signal.worker,
            "survivor": survivor,
            "answered_by": answer.worker,
            "attempt": answer.attempt,
            "tokens_in_snapshot_at_signal": at_signal.tokens,
            "drained_tokens": drained,
            "drained_tokens_from_log": drained_log.as_ref().and_then(|e| tokens_field(&e.1)),
            "resumed_from_token": resumed,
            "tokens_recomputed": drained as i64 - resumed as i64,
            "signal_to_drained_s": drained_log.map(|e| e.0),
            "signal_to_exit_s": exit_s,
            "survivor_log": survivor_log(rig, &survivor, wall)?,
            "first_new_snapshot_tokens": first.tokens,
            "signal_to_first_new_snapshot_s": recovery_s,
            "signal_to_first_new_token_est_s": first_new_token_s(&first, resumed, survivor_tps, t0),
            "survivor_tokens_per_s": survivor_tps,
        }))
    }

    /// SIGKILL the worker generating a request, at a random point between two snapshots; the
    /// other resumes it once the group notices (the session timeout).
    pub fn sigkill(rig: &mut Rig) -> anyhow::Result<serde_json::Value> {
        let (id, offset, mut watch) = rig.publish("bench-sigkill")?;
        // Two snapshots by the same worker give its speed; the kill comes after a third.
        watch.until(
            Duration::from_secs(180),
            "two snapshots",
            |s| s.last().is_some_and(|m| m.tokens >= INTERRUPT_AFTER) && s.len() >= 2,
            || {},
        )?;
        let n = watch.seen.len();
        watch.until(Duration::from_secs(60), "another snapshot", |s| s.len() > n, || {})?;
        let last = watch.last()?.clone();
        let own: Vec<&Seen> = watch.seen.iter().filter(|s| s.worker == last.worker).collect();
        let tps = rate(&own).context("the worker's speed")?;
        // Uniform within one snapshot interval after the write just seen.
        let delay = rand::random::<f64>() * SNAPSHOT_EVERY_TOKENS as f64 / tps;
        std::thread::sleep(Duration::from_secs_f64(delay));
        let hi = rig.worker_index(&last.worker)?;
        let survivor = rig
            .workers
            .iter()
            .find(|w| w.name != last.worker)
            .context("a survivor")?
            .name
            .clone();
        let (t0, wall) = (Instant::now(), SystemTime::now());
        rig.workers[hi].signal("KILL");
        let since_write = t0.duration_since(last.at).as_secs_f64();
        let generated_est = last.tokens as f64 + tps * since_write;
        let (first, survivor_tps) = survivor_progress(&mut watch, &survivor, t0, || {})?;
        let answer = rig.answer(&id, offset)?;
        let resumed = answer
            .resumed_from_token
            .context("the survivor resumed from a snapshot")? as usize;
        Ok(json!({
            "killed_worker": last.worker,
            "survivor": survivor,
            "answered_by": answer.worker,
            "attempt": answer.attempt,
            "last_snapshot_tokens": last.tokens,
            "killed_worker_tokens_per_s": tps,
            "s_from_last_snapshot_to_kill": since_write,
            "generated_at_kill_est": generated_est,
            "resumed_from_token": resumed,
            "tokens_recomputed_est": generated_est - resumed as f64,
            "survivor_log": survivor_log(rig, &survivor, wall)?,
            "first_new_snapshot_tokens": first.tokens,
            "signal_to_first_new_snapshot_s": first.at.duration_since(t0).as_secs_f64(),
            "signal_to_first_new_token_est_s": first_new_token_s(&first, resumed, survivor_tps, t0),
            "survivor_tokens_per_s": survivor_tps,
        }))
    }

    pub fn run() -> anyhow::Result<serde_json::Value> {
        let mut rig = Rig::start()?;
        let sigterm = sigterm(&mut rig).with_context(|| rig.log_tails())?;
        // Replace the drained worker, so that two are alive again.
        rig.add_worker("worker-c")?;
        let sigkill = sigkill(&mut rig).with_context(|| rig.log_tails())?;
        Ok(json!({ "sigterm": sigterm, "sigkill": sigkill }))
    }
}

/// Whether `part` is to run: `FERRY_BENCH_PARTS` lists some of `decode,restore,failover`
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
    let failover = if selected("failover") {
        eprintln!("recovery across processes…");
        failover::run()
    } else {
        Ok(serde_json::Value::Null)
    };
    let f = failover.as_ref().ok();
    let pick = |round: &str, key: &str| f.map_or(serde_json::Value::Null, |f| f[round][key].clone());
    let report = json!({
        "model": model::model_path().file_name().map(|f| f.to_string_lossy().into_owned()),
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
        "session_timeout_s": humantime::parse_duration(SESSION_TIMEOUT)?.as_secs_f64(),
        "sigterm_recovery_s": pick("sigterm", "signal_to_first_new_snapshot_s"),
        "sigterm_tokens_recomputed": pick("sigterm", "tokens_recomputed"),
        "sigkill_recovery_s": pick("sigkill", "signal_to_first_new_snapshot_s"),
        "sigkill_tokens_recomputed": pick("sigkill", "tokens_recomputed_est"),
        "decode": overhead,
        "restore": restores,
        "failover": match &failover {
            Ok(f) => f.clone(),
            Err(e) => json!({ "error": format!("{e:#}") }),
        },
        "bench_s": started.elapsed().as_secs_f64(),
        "notes": NOTES,
    });
    let out = std::env::var_os("FERRY_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench"));
    std::fs::create_dir_all(&out)?;
    let file = out.join("snapshot.json");
    std::fs::write(&file, serde_json::to_string_pretty(&report)? + "\n")?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    println!("wrote {}", file.display());
    failover.map(|_| ())
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
    "recovery_s: from the signal to the survivor's first new snapshot manifest (polled every 5 ms), 16 \
     tokens after the resume point; signal_to_first_new_token_est_s subtracts those tokens at \
     the survivor's measured speed; survivor_log gives, from its log timestamps, when it was assigned the \
     partition and when it found the snapshot.",
    "sigterm tokens_recomputed: tokens in the drained worker's final snapshot minus the survivor's \
     resumed_from_token from the reply.",
    "sigkill tokens_recomputed_est: the killed worker's last manifest plus its measured tokens/s times \
     the time from seeing that manifest to the kill (the kill is placed uniformly within one snapshot \
     interval), minus resumed_from_token; it slightly underestimates by the manifest's write latency.",
    "recovery times on ferry broker (librdkafka's mock cluster) include its group coordinator's rebalance \
     delays, longer than a real broker's; SIGKILL recovery includes the session timeout.",
];
