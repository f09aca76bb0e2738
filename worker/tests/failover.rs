//! Evictions and crashes across processes: a generation is interrupted in one worker process
//! (SIGTERM, then SIGKILL, at random tokens) and finished by others, and the answer is the
//! uninterrupted one, byte for byte.

mod support;

use std::time::{Duration, Instant};

use ferry_schemas::{Reply, Request};
use ferry_testkit::{unique, wait_for, ChildGuard, Cluster, Pipeline, Setup};
use ferry_worker::engine::Engine;
use ferry_worker::snapshot::format::{request_prefix, Manifest};
use rand::{Rng, SeedableRng};

/// Generated tokens in the request's snapshot manifest, read straight from the file store.
fn snapshot_tokens(dir: &std::path::Path, prefix: &str) -> usize {
    std::fs::read(dir.join(prefix).join("manifest"))
        .ok()
        .and_then(|b| Manifest::peek(&b).ok())
        .map_or(0, |m| m.tokens.len())
}

#[test]
fn generation_survives_evictions_and_crashes_token_for_token() {
    let mut rng = rand::rngs::StdRng::from_os_rng();
    let s = Setup::new(1);
    let (cluster, store_dir) = (&s.cluster, &s.store_dir);
    let (requests, replies, group) = (&s.pipeline.requests, &s.pipeline.replies, &s.pipeline.group);
    let args = s
        .args()
        .set("--snapshot-every-tokens", "8")
        .set("--session-timeout", "6s");

    let request: Request = serde_json::from_value(serde_json::json!({
        "id": unique("failover"),
        "messages": [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}],
        "max_tokens": 200,
        "temperature": 0.8,
        "top_p": 0.95,
        "seed": 99
    }))
    .expect("request");
    let engine = Engine::new(support::shared());
    let reference = engine
        .generate(engine.prepare(&request).expect("prepares"))
        .expect("reference");
    assert_eq!(
        reference.tokens.len(),
        200,
        "the reference must run long enough to interrupt four times"
    );
    let prefix = request_prefix(
        requests,
        &request.id,
        replies,
        &serde_json::to_vec(&request).expect("json"),
    );

    s.publish(0, &request);

    // Interrupt the generation four times at random tokens, alternating eviction (SIGTERM)
    // and crash (SIGKILL), each time in a new worker process that resumed it.
    let mut seen = 0;
    let mut crashed_at = 0;
    for (round, sig) in ["TERM", "KILL", "TERM", "KILL"].into_iter().enumerate() {
        let mut w = s.worker(&format!("worker-{round}"), args.clone());
        let k = rng.random_range(seen + 9..seen + 36);
        wait_for(
            Duration::from_secs(120),
            "a snapshot past the interruption point",
            || (snapshot_tokens(store_dir, &prefix) >= k).then_some(()),
        );
        w.signal(sig);
        if sig == "TERM" {
            let status = w
                .wait_exit(Duration::from_secs(20))
                .expect("a drained worker exits within the drain timeout");
            assert!(status.success(), "drained worker exit status {status}");
            let drained_at = snapshot_tokens(store_dir, &prefix);
            assert!(
                drained_at >= k,
                "the drain snapshot holds {drained_at} tokens, fewer than the {k} seen before it"
            );
            seen = drained_at;
        } else {
            w.wait_exit(Duration::from_secs(5)).expect("a killed worker is gone");
            crashed_at = snapshot_tokens(store_dir, &prefix);
            seen = crashed_at;
        }
        eprintln!("round {round}: SIG{sig} after {k}+ tokens; the snapshot holds {seen}");
    }

    let _c: ChildGuard = s.worker("worker-last", args);
    let group_reader = cluster.reader(group);
    wait_for(Duration::from_secs(120), "the answer to be committed", || {
        cluster.committed(&group_reader, requests).filter(|&c| c > 0)
    });
    let answers: Vec<Reply> = cluster
        .read_all(replies)
        .iter()
        .map(|(_, v, _)| serde_json::from_slice(v).expect("a reply"))
        .collect();
    assert_eq!(answers.len(), 1, "exactly one answer: {answers:?}");
    let Reply::Response(r) = &answers[0] else {
        panic!("expected a response: {answers:?}")
    };
    assert_eq!(
        r.text, reference.text,
        "the resumed answer differs from the uninterrupted one"
    );
    assert_eq!(r.usage.completion_tokens as usize, reference.tokens.len());
    assert_eq!(r.worker, "worker-last");
    assert_eq!(r.attempt, 5);
    let resumed = r.resumed_from_token.expect("worker-c resumed from a snapshot") as usize;
    assert!(
        resumed >= crashed_at.saturating_sub(8) && resumed <= crashed_at,
        "resumed from {resumed}, snapshot had {crashed_at}"
    );
    // The snapshot is deleted once the answer is committed.
    wait_for(Duration::from_secs(10), "the snapshot to be deleted", || {
        (!store_dir.join(&prefix).join("manifest").exists()).then_some(())
    });
}

/// Starts a worker whose snapshot store is unreachable (every write fails), publishes a long
/// request, and returns once the worker is generating it.
fn worker_with_a_dead_store(name: &str, drain_timeout: &str) -> (Setup, ChildGuard) {
    let s = Setup::new(1);
    let args = s.pipeline.args().set("--snapshot-store", "redis://127.0.0.1:1");
    let worker = s.worker(name, args.set("--drain-timeout", drain_timeout));
    let payload = br#"{"id":"long","prompt":"Once upon a time","max_tokens":4000}"#;
    let producer = s.cluster.producer();
    ferry_testkit::block_on(s.cluster.publish(&producer, &s.pipeline.requests, "long", payload));
    // The first snapshot point (16 tokens) fails: the worker is well into the generation.
    wait_for(Duration::from_secs(60), "a failed snapshot write", || {
        worker.log().contains("write failed").then_some(())
    });
    (s, worker)
}

/// When the snapshot cannot be made durable, the drain deadline still ends the process (and
/// the request stays uncommitted, to be redelivered).
#[test]
fn the_drain_deadline_bounds_the_exit() {
    let (s, mut w) = worker_with_a_dead_store("worker-deadline", "2s");
    let t = Instant::now();
    w.signal("TERM");
    let status = w
        .wait_exit(Duration::from_secs(60))
        .expect("exits after the drain deadline");
    assert!(status.success(), "{status}");
    // A figure, not an assertion: the log line below is what proves the deadline ended it.
    eprintln!("exited {:?} after the signal (drain deadline 2 s)", t.elapsed());
    assert!(w.log().contains("drain deadline passed"), "{}", w.log());
    assert_eq!(s.committed(0), None, "nothing may be committed");
}

/// A second signal ends the drain at once.
#[test]
fn a_second_signal_ends_the_drain() {
    let (s, mut w) = worker_with_a_dead_store("worker-twice", "20s");
    let t = Instant::now();
    w.signal("TERM");
    wait_for(Duration::from_secs(10), "the drain to start", || {
        w.log().contains("draining").then_some(())
    });
    w.signal("TERM");
    // The drain deadline is 20 s: exiting well before it is the second signal's doing.
    let status = w
        .wait_exit(Duration::from_secs(15))
        .expect("exits on the second signal");
    assert!(status.success(), "{status}");
    eprintln!("exited {:?} after the first signal", t.elapsed());
    assert!(w.log().contains("second signal"), "{}", w.log());
    assert_eq!(s.committed(0), None, "nothing may be committed");
}

/// A worker that stops for a reason of its own (here: the broker gone for longer than
/// `--publish-timeout`, so its finished answer cannot be published) closes the attempts it has
/// in flight as suspended before it exits: they say nothing about the requests, so a fleet that
/// keeps losing its broker does not dead-letter innocent requests as `attempts_exhausted`.
#[test]
fn a_controlled_exit_closes_the_attempts_in_flight_as_suspended() {
    let p = Pipeline::new();
    let Some(mut cluster) = Cluster::start_dedicated(&p.topics(), 1) else {
        eprintln!("skipped: this test kills the broker, which it can do only to one it started");
        return;
    };
    let args = p.args().set("--snapshot-store", cluster.snapshot_store());
    let args = args.set("--publish-timeout", "2s").set("--max-in-flight", "2");
    let store = cluster.snapshot_dir();
    let mut w = cluster.start_worker("worker-controlled", args, &[]);
    let producer = cluster.producer();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    for (id, n) in [("short", 48), ("long", 2000)] {
        let payload = format!(r#"{{"id":"{id}","prompt":"Once upon a time","max_tokens":{n}}}"#);
        rt.block_on(cluster.publish(&producer, &p.requests, id, payload.as_bytes()));
    }
    wait_for(Duration::from_secs(120), "both requests generating", || {
        (w.log().matches("generating").count() >= 2).then_some(())
    });
    cluster.kill_broker();
    let status = w
        .wait_exit(Duration::from_secs(300))
        .expect("the worker stops once it cannot publish");
    assert!(
        !status.success(),
        "a worker that cannot publish exits with an error: {status}"
    );
    assert!(
        w.log().contains("closed the attempts in flight as suspended"),
        "{}",
        w.log()
    );
    let mut logs = 0;
    for dir in std::fs::read_dir(store.join("ferry")).expect("the store has requests") {
        let Ok(bytes) = std::fs::read(dir.expect("entry").path().join("attempts")) else {
            continue;
        };
        let log: serde_json::Value = serde_json::from_slice(&bytes).expect("an attempt log");
        for a in log["attempts"].as_array().expect("attempts") {
            assert_eq!(a["outcome"], "suspended", "{log}");
        }
        logs += 1;
    }
    assert_eq!(logs, 2, "both requests' attempts were recorded");
}

/// A request whose deadline passes while it is redelivered after a crash is answered with the
/// text its snapshot had reached, as the engine answers a deadline mid-generation, not with the
/// empty text of a request that never started: a caller that was streamed part of it does not
/// get a final answer that takes it back.
#[test]
fn a_deadline_that_passes_during_a_redelivery_keeps_the_snapshots_text() {
    let s = Setup::new(1);
    let (cluster, store_dir) = (&s.cluster, &s.store_dir);
    let args = s
        .args()
        .set("--snapshot-every-tokens", "8")
        .set("--session-timeout", "6s");
    // Far enough for the first worker to start and snapshot, near enough to wait for.
    let deadline = time::OffsetDateTime::now_utc() + time::Duration::seconds(45);
    let mut request: Request = serde_json::from_value(serde_json::json!({
        "id": unique("deadline"),
        "prompt": "Once upon a time",
        "max_tokens": 4000,
        "stream": true,
    }))
    .expect("request");
    request.deadline = Some(deadline);
    let prefix = request_prefix(
        &s.pipeline.requests,
        &request.id,
        &s.pipeline.replies,
        &serde_json::to_vec(&request).expect("json"),
    );
    s.publish(0, &request);
    let mut first = s.worker("worker-first", args.clone());
    wait_for(Duration::from_secs(120), "a snapshot of 16 tokens", || {
        (snapshot_tokens(store_dir, &prefix) >= 16).then_some(())
    });
    first.signal("KILL");
    first
        .wait_exit(Duration::from_secs(5))
        .expect("a killed worker is gone");
    let kept = snapshot_tokens(store_dir, &prefix);
    let left = deadline - time::OffsetDateTime::now_utc();
    if let Ok(left) = Duration::try_from(left) {
        std::thread::sleep(left + Duration::from_secs(1));
    }
    let _second: ChildGuard = s.worker("worker-second", args);
    let group_reader = cluster.reader(&s.pipeline.group);
    wait_for(Duration::from_secs(120), "the answer to be committed", || {
        cluster
            .committed(&group_reader, &s.pipeline.requests)
            .filter(|&c| c > 0)
    });
    let finals: Vec<Reply> = cluster
        .replies(&s.pipeline.replies)
        .into_iter()
        .filter(|r| !matches!(r, Reply::Chunk(_)))
        .collect();
    let [Reply::Response(r)] = finals.as_slice() else {
        panic!("expected one response: {finals:?}")
    };
    assert_eq!(r.finish_reason, ferry_schemas::FinishReason::Deadline);
    assert_eq!(
        r.usage.completion_tokens as usize, kept,
        "the snapshot's tokens, no more"
    );
    assert!(!r.text.is_empty(), "the text the snapshot had reached, not none");
    let engine = Engine::new(support::shared());
    let mut uninterrupted = request.clone();
    uninterrupted.deadline = None;
    uninterrupted.max_tokens = Some(kept as u32);
    let reference = engine
        .generate(engine.prepare(&uninterrupted).expect("prepares"))
        .expect("reference");
    assert!(
        reference.text.starts_with(&r.text),
        "{:?} is not where the uninterrupted run was: {:?}",
        r.text,
        reference.text
    );
}
