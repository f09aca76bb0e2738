//! Evictions and crashes across processes: a generation is interrupted in one worker process
//! (SIGTERM, then SIGKILL, at random tokens) and finished by others, and the answer is the
//! uninterrupted one, byte for byte.

mod support {
    pub mod kafka;
    pub mod model;
}

use std::time::{Duration, Instant};

use ferry_schemas::{Reply, Request};
use ferry_worker::engine::Engine;
use ferry_worker::snapshot::format::snapshot_prefix;
use rand::{Rng, SeedableRng};
use support::kafka::{unique, wait_for, ChildGuard, Cluster};

/// Generated tokens in the request's snapshot manifest, read straight from the file store.
fn snapshot_tokens(dir: &std::path::Path, prefix: &str) -> usize {
    let Ok(bytes) = std::fs::read(dir.join(prefix).join("manifest")) else { return 0 };
    let body = &bytes[bytes.iter().position(|&b| b == b'\n').map_or(0, |i| i + 1)..];
    let json = &body[..body.iter().rposition(|&b| b == b'\n').unwrap_or(body.len())];
    serde_json::from_slice::<serde_json::Value>(json)
        .ok()
        .and_then(|v| v["tokens"].as_array().map(Vec::len))
        .unwrap_or(0)
}

#[test]
fn generation_survives_an_eviction_and_a_crash_token_for_token() {
    let mut rng = rand::rngs::StdRng::from_os_rng();
    let (requests, replies, group) = (unique("req"), unique("rep"), unique("group"));
    let dlq = format!("{requests}.dlq");
    let cluster = Cluster::start(&[&requests, &replies, &dlq]);
    let store_dir = cluster.dir.path().join("snapshots");
    std::fs::create_dir_all(&store_dir).expect("store dir");
    let store_url = format!("file://{}", store_dir.display());
    let args = [
        "--topic", &requests, "--reply-topic", &replies, "--group-id", &group,
        "--snapshot-store", &store_url, "--snapshot-every-tokens", "8", "--session-timeout", "6s",
    ];

    let request: Request = serde_json::from_value(serde_json::json!({
        "id": unique("failover"),
        "messages": [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}],
        "max_tokens": 120,
        "temperature": 0.8,
        "top_p": 0.95,
        "seed": 99
    }))
    .expect("request");
    let engine = Engine::new(support::model::shared());
    let reference = engine.generate(engine.prepare(&request).expect("prepares")).expect("reference");
    assert_eq!(reference.tokens.len(), 120, "the reference must run long enough to interrupt twice");
    let prefix = snapshot_prefix(&requests, &request.id);

    let producer = cluster.producer();
    let payload = serde_json::to_vec(&request).expect("json");
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt").block_on(cluster.publish(
        &producer,
        &requests,
        &request.id,
        &payload,
    ));

    // Evict the first worker (SIGTERM) somewhere in the first third of the answer.
    let mut a = cluster.worker("worker-a", &args);
    let k1 = rng.random_range(9..40);
    wait_for(Duration::from_secs(120), "worker-a's snapshot", || (snapshot_tokens(&store_dir, &prefix) >= k1).then_some(()));
    let t = Instant::now();
    a.signal("TERM");
    let status = a.wait_exit(Duration::from_secs(20)).expect("worker-a drains and exits within the drain timeout");
    assert!(status.success(), "drained worker exit status {status}");
    let drained_at = snapshot_tokens(&store_dir, &prefix);
    assert!(drained_at >= k1, "the drain snapshot holds {drained_at} tokens, fewer than the {k1} seen before it");
    eprintln!("worker-a evicted at ~{k1} tokens, drained with {drained_at} in {:?}", t.elapsed());

    // Crash the second (SIGKILL) further on.
    let b = cluster.worker("worker-b", &args);
    let k2 = rng.random_range(drained_at + 9..drained_at + 40);
    wait_for(Duration::from_secs(120), "worker-b's snapshot", || (snapshot_tokens(&store_dir, &prefix) >= k2).then_some(()));
    b.signal("KILL");
    let crashed_at = snapshot_tokens(&store_dir, &prefix);
    eprintln!("worker-b killed with {crashed_at} tokens in its last snapshot");
    drop(b);

    let _c: ChildGuard = cluster.worker("worker-c", &args);
    let group_reader = cluster.reader(&group);
    wait_for(Duration::from_secs(120), "the answer to be committed", || {
        cluster.committed(&group_reader, &requests).filter(|&c| c > 0)
    });
    let answers: Vec<Reply> = cluster
        .read_all(&replies)
        .iter()
        .map(|(_, v, _)| serde_json::from_slice(v).expect("a reply"))
        .collect();
    assert_eq!(answers.len(), 1, "exactly one answer: {answers:?}");
    let Reply::Response(r) = &answers[0] else { panic!("expected a response: {answers:?}") };
    assert_eq!(r.text, reference.text, "the resumed answer differs from the uninterrupted one");
    assert_eq!(r.usage.completion_tokens as usize, reference.tokens.len());
    assert_eq!(r.worker, "worker-c");
    assert_eq!(r.attempt, 3);
    let resumed = r.resumed_from_token.expect("worker-c resumed from a snapshot") as usize;
    assert!(resumed >= crashed_at.saturating_sub(8) && resumed <= crashed_at, "resumed from {resumed}, snapshot had {crashed_at}");
    // The snapshot is deleted once the answer is committed.
    wait_for(Duration::from_secs(10), "the snapshot to be deleted", || (!store_dir.join(&prefix).join("manifest").exists()).then_some(()));
}
