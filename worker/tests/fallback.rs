//! Graceful degradation: a request this worker cannot serve for a reason of its own (here, the
//! accelerator out of memory, injected) goes to `--fallback-topic`, where a worker of another
//! model answers it, once, and says so in the reply's `model`; without a fallback topic it fails
//! its attempts and is dead-lettered; a handed-off request is never handed off again.
//!
//! Real processes throughout: a Kafka-protocol broker (or the cluster named by
//! `FERRY_TEST_BOOTSTRAP_SERVERS`), worker processes with the real model, the out-of-memory error
//! injected by the test-only `fault-injection` feature (`FERRY_FAULT_OOM_ON=<request id>`: the
//! request's generations fail with the CUDA driver's out-of-memory error, as candle reports it).

use std::time::Duration;

use ferry_schemas::{AttemptOutcome, DeadLetter, ErrorCode, Reply};
use ferry_testkit::http::{free_addr, get, wait_status};
use ferry_testkit::{unique, wait_for, ChildGuard, Cluster};

const WAIT: Duration = Duration::from_secs(180);

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A request for the model named `big` (which the fallback worker does not serve by that name).
fn request(id: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "id": id,
        "model": "big",
        "messages": [{"role": "user", "content": "Name a colour."}],
        "max_tokens": 6,
    }))
    .expect("json")
}

/// The final replies on `topic`, in order, as (key, reply).
fn finals(cluster: &Cluster, topic: &str) -> Vec<(String, Reply)> {
    cluster
        .read_all(topic)
        .into_iter()
        .map(|(k, v, _)| (k, serde_json::from_slice::<Reply>(&v).expect("a reply")))
        .filter(|(_, r)| r.is_final())
        .collect()
}

/// The final replies for request `id`.
fn of<'a>(replies: &'a [(String, Reply)], id: &str) -> Vec<&'a Reply> {
    replies.iter().filter(|(k, _)| k == id).map(|(_, r)| r).collect()
}

/// Waits until `group` has committed `offset` on partition 0 of `topic`.
fn wait_committed(cluster: &Cluster, group: &str, topic: &str, offset: i64) {
    let reader = cluster.reader(group);
    wait_for(WAIT, &format!("{group} to commit {offset} on {topic}"), || {
        (cluster.committed(&reader, topic) == Some(offset)).then_some(())
    });
}

struct Topics {
    requests: String,
    replies: String,
    fallback: String,
    dlq: String,
    fallback_dlq: String,
    cluster: Cluster,
}

impl Topics {
    fn start() -> Self {
        let (requests, replies, fallback) = (unique("req"), unique("rep"), unique("fallback"));
        let (dlq, fallback_dlq) = (format!("{requests}.dlq"), format!("{fallback}.dlq"));
        let cluster = Cluster::start(&[&requests, &replies, &fallback, &dlq, &fallback_dlq]);
        Self {
            requests,
            replies,
            fallback,
            dlq,
            fallback_dlq,
            cluster,
        }
    }

    /// A worker process serving `topic` in `group` as the model named `model`, replying to the
    /// test's reply topic, with `extra` flags and environment.
    fn worker(
        &self,
        name: &str,
        model: &str,
        topic: &str,
        group: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> ChildGuard {
        let mut args = vec![
            "--model-name",
            model,
            "--topic",
            topic,
            "--reply-topic",
            &self.replies,
            "--group-id",
            group,
        ];
        args.extend_from_slice(extra);
        self.cluster.worker_with_env(name, &args, env)
    }

    /// The fallback fleet: the small model on the fallback topic, with no fallback of its own.
    fn small_worker(&self, group: &str) -> ChildGuard {
        self.worker(
            "worker-small",
            "small",
            &self.fallback,
            group,
            &["--http-addr", "off", "--fallback-lane", &self.fallback],
            &[],
        )
    }

    /// A `file://` snapshot store of the test's own, which keeps the attempts ledger.
    fn store(&self, name: &str) -> String {
        let dir = self.cluster.dir.path().join(name);
        std::fs::create_dir_all(&dir).expect("store dir");
        format!("file://{}", dir.display())
    }
}

#[test]
fn an_out_of_memory_request_is_answered_once_by_the_fallback_model() {
    let t = Topics::start();
    let (main_group, small_group) = (unique("group-big"), unique("group-small"));
    let oom = unique("oom");
    let ok = unique("ok");
    let addr = free_addr().to_string();
    let main = t.worker(
        "worker-big",
        "big",
        &t.requests,
        &main_group,
        &[
            "--fallback-topic",
            &t.fallback,
            "--snapshot-store",
            &t.store("big"),
            "--max-in-flight",
            "1",
            "--http-addr",
            &addr,
        ],
        &[("FERRY_FAULT_OOM_ON", &oom)],
    );
    let small = t.small_worker(&small_group);
    let addr = addr.parse().expect("addr");
    wait_status(addr, "/readyz", 200, WAIT);

    let producer = t.cluster.producer();
    let oom_body = request(&oom);
    let caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let oom_offset = rt().block_on(t.cluster.publish_with_headers(
        &producer,
        &t.requests,
        &oom,
        &oom_body,
        &[("traceparent", caller), ("x-caller", "fallback-test")],
    ));
    rt().block_on(t.cluster.publish(&producer, &t.requests, &ok, &request(&ok)));

    // Both offsets of the request topic are committed by the big model's group, the handed-off
    // copy's by the small one's: nothing more will be published for either request.
    wait_committed(&t.cluster, &main_group, &t.requests, 2);
    wait_committed(&t.cluster, &small_group, &t.fallback, 1);

    let replies = finals(&t.cluster, &t.replies);
    let answered = of(&replies, &oom);
    assert_eq!(
        answered.len(),
        1,
        "one final reply for the handed-off request: {replies:?}"
    );
    let Reply::Response(r) = answered[0] else {
        panic!("the handed-off request got {:?}", answered[0])
    };
    assert_eq!(r.model, "small", "the reply names the model that produced it");
    assert_eq!(r.worker, "worker-small");
    assert!(!r.text.is_empty() || r.usage.completion_tokens > 0, "{r:?}");
    let other = of(&replies, &ok);
    assert_eq!(other.len(), 1, "{replies:?}");
    let Reply::Response(r) = other[0] else {
        panic!("the other request got {:?}", other[0])
    };
    assert_eq!((r.model.as_str(), r.worker.as_str()), ("big", "worker-big"));

    // The copy on the fallback topic is the original message, with its headers, plus the
    // handoff's.
    let copies = t.cluster.read_all_with_headers(&t.fallback);
    assert_eq!(copies.len(), 1, "handed off once");
    let copy = &copies[0];
    assert_eq!(copy.key, oom);
    assert_eq!(copy.value, oom_body, "the value is unchanged");
    let header = |k: &str| copy.headers.iter().find(|(h, _)| h == k).map(|(_, v)| v.as_str());
    assert_eq!(header("traceparent"), Some(caller));
    assert_eq!(header("x-caller"), Some("fallback-test"));
    assert_eq!(header("ferry-handoff-reason"), Some("out_of_memory"));
    assert_eq!(header("ferry-handoff-worker"), Some("worker-big"));
    assert_eq!(header("ferry-handoff-model"), Some("big"));
    let source = format!("{}/0/{oom_offset}", t.requests);
    assert_eq!(header("ferry-handoff-source"), Some(source.as_str()));
    assert!(
        header("ferry-handoff-error").is_some_and(|e| e.contains("CUDA_ERROR_OUT_OF_MEMORY")),
        "{:?}",
        copy.headers
    );

    assert!(t.cluster.read_all(&t.dlq).is_empty(), "nothing dead-lettered");
    assert!(t.cluster.read_all(&t.fallback_dlq).is_empty());
    let metrics = get(addr, "/metrics").expect("metrics").1;
    for line in [
        "ferry_fallback_total{reason=\"out_of_memory\"} 1\n",
        "ferry_fallback_total{reason=\"circuit_breaker_open\"} 0\n",
        "ferry_requests_total{outcome=\"handed_off\"} 1\n",
        "ferry_requests_total{outcome=\"answered\"} 1\n",
    ] {
        assert!(metrics.contains(line), "{line:?} missing from\n{metrics}");
    }
    assert!(
        small.log().contains("serving a request handed off by another worker"),
        "{}",
        small.log()
    );
    drop(main);
}

#[test]
fn without_a_fallback_an_out_of_memory_request_is_dead_lettered_after_its_attempts() {
    let t = Topics::start();
    let group = unique("group");
    let oom = unique("oom");
    let ok = unique("ok");
    let w = t.worker(
        "worker-big",
        "big",
        &t.requests,
        &group,
        &[
            "--snapshot-store",
            &t.store("big"),
            "--max-attempts",
            "2",
            "--http-addr",
            "off",
        ],
        &[("FERRY_FAULT_OOM_ON", &oom)],
    );
    let producer = t.cluster.producer();
    let offset = rt().block_on(t.cluster.publish(&producer, &t.requests, &oom, &request(&oom)));
    rt().block_on(t.cluster.publish(&producer, &t.requests, &ok, &request(&ok)));
    wait_committed(&t.cluster, &group, &t.requests, 2);

    let dead = t.cluster.read_all(&t.dlq);
    assert_eq!(dead.len(), 1, "the out-of-memory request is dead-lettered, once");
    let record: DeadLetter = serde_json::from_slice(&dead[0].1).expect("a dead letter");
    assert_eq!(record.request_id.as_deref(), Some(oom.as_str()));
    assert_eq!(record.source.offset, offset);
    assert_eq!(record.reason.code, ErrorCode::AttemptsExhausted);
    let outcomes: Vec<AttemptOutcome> = record.attempts.iter().map(|a| a.outcome).collect();
    assert_eq!(outcomes, [AttemptOutcome::Failed, AttemptOutcome::Failed], "{record:?}");
    for a in &record.attempts {
        assert!(
            a.error
                .as_deref()
                .is_some_and(|e| e.contains("CUDA_ERROR_OUT_OF_MEMORY")),
            "{a:?}"
        );
    }
    let replies = finals(&t.cluster, &t.replies);
    match of(&replies, &oom).as_slice() {
        [Reply::Error(e)] => assert_eq!(e.error.code, ErrorCode::AttemptsExhausted),
        other => panic!("the caller got {other:?}"),
    }
    assert!(
        matches!(of(&replies, &ok).as_slice(), [Reply::Response(_)]),
        "{replies:?}"
    );
    assert!(t.cluster.read_all(&t.fallback).is_empty(), "no fallback, no handoff");
    assert!(
        w.log()
            .contains("the last attempt ran out of accelerator memory: running this request alone"),
        "the retry after running out of memory runs alone:\n{}",
        w.log()
    );
}

#[test]
fn a_handed_off_request_is_never_handed_off_again() {
    let t = Topics::start();
    let (main_group, small_group) = (unique("group-big"), unique("group-small"));
    let oom = unique("oom");
    let worker = |name: &str, model: &str, topic: &str, group: &str, fallback: &str, lane: &str| -> ChildGuard {
        let lane: &[&str] = if lane.is_empty() {
            &[]
        } else {
            &["--fallback-lane", lane]
        };
        t.worker(
            name,
            model,
            topic,
            group,
            &[
                lane,
                &[
                    "--fallback-topic",
                    fallback,
                    "--snapshot-store",
                    &t.store(name),
                    "--max-attempts",
                    "2",
                    "--http-addr",
                    "off",
                ],
            ]
            .concat(),
            &[("FERRY_FAULT_OOM_ON", &oom)],
        )
    };
    // Each names the other's topic as its fallback: a loop, had the handoff no memory. The small
    // fleet's topic is its fallback lane, where hand-off headers count.
    let _main = worker("worker-big", "big", &t.requests, &main_group, &t.fallback, "");
    let small = worker(
        "worker-small",
        "small",
        &t.fallback,
        &small_group,
        &t.requests,
        &t.fallback,
    );
    rt().block_on(
        t.cluster
            .publish(&t.cluster.producer(), &t.requests, &oom, &request(&oom)),
    );

    wait_committed(&t.cluster, &main_group, &t.requests, 1);
    wait_committed(&t.cluster, &small_group, &t.fallback, 1);
    assert_eq!(t.cluster.read_all(&t.fallback).len(), 1, "handed off once");
    assert_eq!(
        t.cluster.read_all(&t.requests).len(),
        1,
        "and never handed back: the request topic holds only the original"
    );
    let dead = t.cluster.read_all(&t.fallback_dlq);
    assert_eq!(dead.len(), 1, "the fallback worker dead-letters it after its attempts");
    let record: DeadLetter = serde_json::from_slice(&dead[0].1).expect("a dead letter");
    assert_eq!(record.reason.code, ErrorCode::AttemptsExhausted);
    assert_eq!(record.worker, "worker-small");
    assert!(t.cluster.read_all(&t.dlq).is_empty());
    match finals(&t.cluster, &t.replies).as_slice() {
        [(id, Reply::Error(e))] => {
            assert_eq!(id, &oom);
            assert_eq!(e.error.code, ErrorCode::AttemptsExhausted);
            assert_eq!(e.worker, "worker-small");
        }
        other => panic!("expected one error reply, got {other:?}"),
    }
    assert!(
        small
            .log()
            .contains("handed off once already: not handing it off again"),
        "{}",
        small.log()
    );
}

#[test]
fn the_request_that_opens_the_circuit_breaker_is_handed_off() {
    let t = Topics::start();
    let (main_group, small_group) = (unique("group-big"), unique("group-small"));
    let id = unique("breaks");
    // Every generation of this worker fails in the engine, as on a broken device; the first
    // failure opens its breaker.
    let mut main = t.worker(
        "worker-big",
        "big",
        &t.requests,
        &main_group,
        &[
            "--fallback-topic",
            &t.fallback,
            "--breaker-failures",
            "1",
            "--http-addr",
            "off",
        ],
        &[("FERRY_FAULT_FAIL_GENERATION", "1")],
    );
    let _small = t.small_worker(&small_group);
    rt().block_on(
        t.cluster
            .publish(&t.cluster.producer(), &t.requests, &id, &request(&id)),
    );

    let status = main.wait_exit(WAIT).expect("the tripped worker exits");
    assert_eq!(status.code(), Some(3), "{}", main.log());
    wait_committed(&t.cluster, &main_group, &t.requests, 1);
    wait_committed(&t.cluster, &small_group, &t.fallback, 1);
    let copies = t.cluster.read_all_with_headers(&t.fallback);
    assert_eq!(copies.len(), 1);
    let reason = copies[0].headers.iter().find(|(k, _)| k == "ferry-handoff-reason");
    assert_eq!(reason.map(|(_, v)| v.as_str()), Some("circuit_breaker_open"));
    let replies = finals(&t.cluster, &t.replies);
    match of(&replies, &id).as_slice() {
        [Reply::Response(r)] => assert_eq!((r.model.as_str(), r.worker.as_str()), ("small", "worker-small")),
        other => panic!("expected one response from the fallback, got {other:?}"),
    }
    assert!(t.cluster.read_all(&t.dlq).is_empty());
}
