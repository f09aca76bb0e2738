//! Token-exact resume, in process: a generation interrupted at random tokens, its snapshot
//! written through the real writer to a real store, resumed by a fresh sequence, must finish
//! with exactly the uninterrupted answer. Both resume modes, greedy and seeded sampling, and
//! both kinds of interruption: a drain (snapshot at the current token) and a crash (whatever
//! periodic snapshot was durable).

mod support;

use std::sync::Arc;
use std::time::Duration;

use ferry_schemas::Request;
use ferry_worker::engine::{Engine, Job, JobControl, Outcome, Prepared, Sequence};
use ferry_worker::model::Model;
use ferry_worker::snapshot::format::snapshot_prefix;
use ferry_worker::snapshot::{store, ResumeMode, SnapshotPolicy, Snapshots};
use rand::{Rng, SeedableRng};

fn request(id: &str, temperature: f64) -> Request {
    serde_json::from_value(serde_json::json!({
        "id": id,
        "messages": [{"role": "user", "content": "Tell me a short story about a lighthouse keeper."}],
        "max_tokens": 40,
        "temperature": temperature,
        "top_p": 0.95,
        "seed": 1234,
    }))
    .expect("request")
}

async fn snapshots(model: &Model, dir: &std::path::Path, mode: ResumeMode) -> Snapshots {
    let url = format!("file://{}", dir.display());
    let store = store::open(&url, Duration::from_secs(3600)).await.expect("file store");
    let policy = SnapshotPolicy {
        every_tokens: 4,
        every: None,
        mode,
        max_pieces: 3,
    };
    Snapshots::new(store, policy, model, "q8_0", &candle_core::Device::Cpu)
}

/// Generates up to `k` tokens with snapshots on, then stops as a drain (`graceful`) or a crash
/// would, and returns once the store holds what it would hold after that.
async fn interrupt_at(
    model: &Arc<Model>,
    snaps: &Snapshots,
    prefix: &str,
    prepared: &Prepared,
    k: usize,
    graceful: bool,
) {
    let (writer, mut sink) = snaps
        .writer(prefix, prepared, "interrupted", None)
        .expect("snapshots on");
    let mut seq = Sequence::new(model, prepared.prompt.clone(), prepared.params.clone());
    seq.prefill(model).expect("prefill");
    while seq.generated().len() < k && seq.finish().is_none() {
        seq.step(model).expect("step");
        sink.maybe_offer(&seq).expect("offer");
        // Let the writer keep up, so the crash case has durable periodic snapshots.
        writer.idle().await;
    }
    if graceful {
        sink.offer(&seq).expect("final offer");
        writer.flush_and_stop().await;
    } else {
        // A crash: whatever was durable stays; nothing more is written.
        writer.stop().await;
    }
}

/// Runs the request as a worker that received it would: from its snapshot if there is one
/// (returning how many tokens it had), from the beginning otherwise (returning 0).
async fn resume(engine: &Engine, snaps: &Snapshots, prefix: &str, prepared: &Prepared) -> (usize, Vec<u32>, String) {
    let found = snaps.find(prefix, prepared).await;
    let from = found.as_ref().map_or(0, |f| f.manifest.tokens.len());
    let resume = found.map(|f| f.resume);
    let job = Job {
        prepared: prepared.clone(),
        resume,
        snapshots: None,
        control: Arc::new(JobControl::default()),
        deadline: None,
        chunks: None,
    };
    match engine.run(job).expect("resumed run") {
        Outcome::Finished(c) => (from, c.tokens, c.text),
        Outcome::Suspended { .. } => panic!("not asked to suspend"),
    }
}

async fn check_mode(mode: ResumeMode) {
    let model = support::shared();
    let engine = Engine::new(model.clone());
    let dir = tempfile::tempdir().expect("tempdir");
    let snaps = snapshots(&model, dir.path(), mode).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    for (name, temperature) in [("greedy", 0.0), ("seeded", 0.9)] {
        let req = request(name, temperature);
        let prepared = engine.prepare(&req).expect("prepares");
        let reference = engine.generate(prepared.clone()).expect("reference");
        assert!(
            reference.tokens.len() > 8,
            "the reference must be long enough to interrupt"
        );
        for round in 0..4 {
            let graceful = round % 2 == 0;
            let k = rng.random_range(1..reference.tokens.len());
            let prefix = snapshot_prefix("t", &format!("{name}-{round}-{mode:?}"));
            interrupt_at(&model, &snaps, &prefix, &prepared, k, graceful).await;
            let (from, tokens, text) = resume(&engine, &snaps, &prefix, &prepared).await;
            if graceful {
                assert_eq!(from, k, "a drain snapshots the current token");
            } else {
                // Periodic snapshots every 4 tokens: a crash loses fewer than 4.
                assert!(from <= k && k - from < 4, "crash at {k} resumed from {from}");
            }
            assert_eq!(
                tokens, reference.tokens,
                "{name}, {mode:?}, interrupted at {k}, resumed from {from}"
            );
            assert_eq!(text, reference.text);
            snaps.delete(&prefix).await;
            assert!(
                snaps.store.list(&prefix).await.expect("list").is_empty(),
                "delete leaves nothing"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_token_exactly_from_the_cache() {
    check_mode(ResumeMode::Cache).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_token_exactly_from_tokens_only() {
    check_mode(ResumeMode::Tokens).await;
}

/// A snapshot that does not verify is discarded, and the request starts over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_or_foreign_snapshots_are_discarded() {
    let model = support::shared();
    let engine = Engine::new(model.clone());
    let dir = tempfile::tempdir().expect("tempdir");
    let snaps = snapshots(&model, dir.path(), ResumeMode::Cache).await;
    let prepared = engine.prepare(&request("corrupt", 0.0)).expect("prepares");
    let prefix = snapshot_prefix("t", "corrupt");

    interrupt_at(&model, &snaps, &prefix, &prepared, 10, true).await;
    assert!(snaps.find(&prefix, &prepared).await.is_some());
    // The same id with other parameters is another request: its snapshot must not be used.
    let mut other = prepared.clone();
    other.params.max_tokens += 1;
    assert!(snaps.find(&prefix, &other).await.is_none());
    let before = snaps.stats.discarded.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(before, 1);

    // Flip a byte in a piece: the checksum catches it.
    interrupt_at(&model, &snaps, &prefix, &prepared, 10, true).await;
    let piece = snaps
        .store
        .list(&prefix)
        .await
        .expect("list")
        .into_iter()
        .find(|k| k.contains("piece-"))
        .expect("a piece");
    let mut bytes = snaps
        .store
        .get(&piece, usize::MAX)
        .await
        .expect("get")
        .expect("exists")
        .to_vec();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    snaps.store.put(&piece, bytes.into()).await.expect("put");
    assert!(
        snaps.find(&prefix, &prepared).await.is_none(),
        "a corrupt piece must not be resumed"
    );

    // A torn manifest likewise.
    interrupt_at(&model, &snaps, &prefix, &prepared, 10, true).await;
    let manifest = format!("{prefix}manifest");
    let bytes = snaps
        .store
        .get(&manifest, usize::MAX)
        .await
        .expect("get")
        .expect("exists");
    snaps
        .store
        .put(&manifest, bytes.slice(..bytes.len() / 2))
        .await
        .expect("put");
    assert!(
        snaps.find(&prefix, &prepared).await.is_none(),
        "a torn manifest must not be resumed"
    );
    assert_eq!(snaps.stats.discarded.load(std::sync::atomic::Ordering::Relaxed), 3);
}

/// A store slower than generation: every write takes a while.
#[derive(Debug)]
struct SlowStore {
    inner: Arc<dyn store::SnapshotStore>,
    delay: Duration,
}

#[async_trait::async_trait]
impl store::SnapshotStore for SlowStore {
    async fn put(&self, key: &str, value: bytes::Bytes) -> Result<(), store::StoreError> {
        tokio::time::sleep(self.delay).await;
        self.inner.put(key, value).await
    }
    async fn get(&self, key: &str, max_bytes: usize) -> Result<Option<bytes::Bytes>, store::StoreError> {
        self.inner.get(key, max_bytes).await
    }
    async fn delete(&self, key: &str) -> Result<(), store::StoreError> {
        self.inner.delete(key).await
    }
    async fn delete_prefix(&self, prefix: &str) -> Result<(), store::StoreError> {
        self.inner.delete_prefix(prefix).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<String>, store::StoreError> {
        self.inner.list(prefix).await
    }
    async fn sweep_expired(&self, prefix: &str, ttl: Duration) -> Result<usize, store::StoreError> {
        self.inner.sweep_expired(prefix, ttl).await
    }
}

/// When the store is slower than generation, decoding does not wait: snapshot points coalesce
/// into the newest state (counted), and the snapshot that lands still resumes token-exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_store_coalesces_instead_of_queueing() {
    let model = support::shared();
    let engine = Engine::new(model.clone());
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("file://{}", dir.path().display());
    let inner = store::open(&url, Duration::from_secs(3600)).await.expect("file store");
    let slow: Arc<dyn store::SnapshotStore> = Arc::new(SlowStore {
        inner,
        delay: Duration::from_millis(250),
    });
    let policy = SnapshotPolicy {
        every_tokens: 2,
        every: None,
        mode: ResumeMode::Cache,
        max_pieces: 32,
    };
    let snaps = Snapshots::new(slow, policy, &model, "q8_0", &candle_core::Device::Cpu);
    let prepared = engine.prepare(&request("slow", 0.9)).expect("prepares");
    let reference = engine.generate(prepared.clone()).expect("reference");
    let prefix = snapshot_prefix("t", "slow");

    let (writer, mut sink) = snaps.writer(&prefix, &prepared, "w", None).expect("snapshots on");
    let mut seq = Sequence::new(&model, prepared.prompt.clone(), prepared.params.clone());
    seq.prefill(&model).expect("prefill");
    let started = std::time::Instant::now();
    while seq.generated().len() < 30 {
        seq.step(&model).expect("step");
        sink.maybe_offer(&seq).expect("offer");
    }
    let decode = started.elapsed();
    sink.offer(&seq).expect("final offer");
    writer.flush_and_stop().await;
    let stats = &snaps.stats;
    let (written, skipped) = (
        stats.written.load(std::sync::atomic::Ordering::Relaxed),
        stats.skipped.load(std::sync::atomic::Ordering::Relaxed),
    );
    // 15 snapshot points and a final one, each write taking 2 × 250 ms: had decoding waited,
    // 30 tokens would have taken at least 7.5 s.
    assert!(skipped > 0, "no snapshot point was coalesced ({written} written)");
    assert!(written < 16, "{written} snapshots written for 16 points");
    // How long decoding took is a figure (machines differ); the counts above are the proof.
    eprintln!("30 tokens decoded in {decode:?} beside a store taking 500 ms a snapshot");
    let (from, tokens, text) = resume(&engine, &snaps, &prefix, &prepared).await;
    assert_eq!(from, 30);
    assert_eq!((tokens, text), (reference.tokens, reference.text));
}
