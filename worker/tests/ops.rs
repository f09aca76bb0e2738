//! The operational surface of a worker process: `/healthz`, `/readyz` and `/metrics` over HTTP,
//! JSON logs with the request's fields, `traceparent` from request to reply, spans exported over
//! OTLP, and the health
//! trips (an unrecoverable accelerator, an open circuit breaker) that drain the worker and exit
//! it non-zero.
//!
//! Every test runs a worker process against a Kafka-protocol broker in its own process (or the
//! cluster named by `FERRY_TEST_BOOTSTRAP_SERVERS`), with its own topics, group and HTTP port.

use std::net::SocketAddr;
use std::time::Duration;

use ferry_schemas::Reply;
use ferry_testkit::http::{free_addr, get, wait_status};
use ferry_testkit::otlp::Collector;
use ferry_testkit::{block_on, unique, wait_for, ChildGuard, Cluster, Setup};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Starts a worker serving HTTP on a free port. With `dead_store`, its snapshot store is
/// unreachable: every snapshot write fails, so a drain with a generation in flight lasts its
/// whole deadline (a window in which to watch `/readyz`), and the request stays uncommitted.
fn worker(
    cluster: &Cluster,
    name: &str,
    topics: (&str, &str, &str),
    extra: &[&str],
    env: &[(&str, &str)],
    dead_store: bool,
) -> (ChildGuard, SocketAddr) {
    let addr = free_addr();
    let addr_arg = addr.to_string();
    let (requests, replies, group) = topics;
    let mut args = vec![
        "--topic",
        requests,
        "--reply-topic",
        replies,
        "--group-id",
        group,
        "--http-addr",
        &addr_arg,
        "--drain-timeout",
        "3s",
    ];
    if dead_store {
        args.extend(["--snapshot-store", "redis://127.0.0.1:1"]);
    }
    args.extend_from_slice(extra);
    (cluster.worker_with_env(name, &args, env), addr)
}

/// Publishes a request that generates for minutes, and waits until the worker is generating it.
fn start_long_request(cluster: &Cluster, w: &ChildGuard, requests: &str, id: &str) {
    let payload = format!(r#"{{"id":"{id}","prompt":"Once upon a time","max_tokens":4000}}"#);
    rt().block_on(cluster.publish(&cluster.producer(), requests, id, payload.as_bytes()));
    wait_for(
        Duration::from_secs(60),
        "the long request's first snapshot attempt",
        || w.log().contains("write failed").then_some(()),
    );
}

#[test]
fn probes_metrics_logs_and_trace_context() {
    let (requests, replies, group) = (unique("req"), unique("rep"), unique("group"));
    let dlq = format!("{requests}.dlq");
    let cluster = Cluster::start(&[&requests, &replies, &dlq]);
    let (mut w, addr) = worker(
        &cluster,
        "worker-ops",
        (&requests, &replies, &group),
        &["--kafka-stats-interval", "1s", "--log-format", "json"],
        &[],
        true,
    );

    // Alive at once; not ready until the model is loaded and the group has assigned partitions.
    let (status, _) = wait_for(Duration::from_secs(30), "the HTTP endpoint", || get(addr, "/healthz"));
    assert_eq!(status, 200);
    let (status, why) = get(addr, "/readyz").expect("answers");
    assert_eq!(status, 503, "ready before the model and the group: {why}");
    assert!(
        why.contains("loading the model") || why.contains("first assignment"),
        "{why}"
    );
    wait_status(addr, "/readyz", 200, Duration::from_secs(120));

    // A request with a trace context: the reply is a child span of the same trace.
    let caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let payload = br#"{"id":"traced","prompt":"The capital of France is","max_tokens":8}"#;
    let offset = rt().block_on(cluster.publish_with_headers(
        &cluster.producer(),
        &requests,
        "traced",
        payload,
        &[("traceparent", caller), ("tracestate", "congo=t61rcWkgMzE")],
    ));
    // Counted once published; in flight until its offset is settled.
    let metrics = wait_for(Duration::from_secs(120), "the settled answer in /metrics", || {
        get(addr, "/metrics").map(|(_, m)| m).filter(|m| {
            m.contains("ferry_requests_total{outcome=\"answered\"} 1\n") && m.contains("ferry_requests_in_flight 0\n")
        })
    });
    for line in [
        "ferry_queue_wait_seconds_bucket{le=\"+Inf\"} 1\n",
        "ferry_queue_wait_seconds_count 1\n",
        "ferry_time_to_first_token_seconds_count 1\n",
        "ferry_decode_tokens_per_second_count 1\n",
        "ferry_dead_lettered_total",
        "ferry_snapshot_write_seconds_count",
        "ferry_ready 1\n",
    ] {
        assert!(metrics.contains(line), "{line:?} missing from\n{metrics}");
    }
    let replied = cluster.read_all_with_headers(&replies);
    let reply = replied.iter().find(|r| r.key == "traced").expect("the reply");
    let Reply::Response(r) = serde_json::from_slice(&reply.value).expect("a reply") else {
        panic!("expected a response: {}", String::from_utf8_lossy(&reply.value))
    };
    assert_eq!(r.id, "traced");
    let header = |k: &str| reply.headers.iter().find(|(h, _)| h == k).map(|(_, v)| v.clone());
    let traceparent = header("traceparent").expect("the reply carries a traceparent");
    let fields: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(fields.len(), 4, "{traceparent}");
    assert_eq!(fields[0], "00");
    assert_eq!(fields[1], "0af7651916cd43dd8448eb211c80319c", "same trace");
    assert_ne!(fields[2], "b7ad6b7169203331", "the worker's own span");
    assert!(fields[2].len() == 16 && fields[2] != "0000000000000000");
    assert_eq!(fields[3], "01", "same flags");
    assert_eq!(header("tracestate").as_deref(), Some("congo=t61rcWkgMzE"));

    // The JSON log line of the answer carries the request's fields and its trace.
    let line = w
        .log()
        .lines()
        .find(|l| l.contains("\"message\":\"answered\""))
        .map(str::to_string)
        .expect("an `answered` log line");
    let line: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    assert_eq!(line["request_id"], "traced", "{line}");
    assert_eq!(line["topic"], requests.as_str());
    assert_eq!(line["partition"], 0);
    assert_eq!(line["offset"], offset);
    assert_eq!(line["trace_id"], "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(line["span_id"], fields[2]);
    assert_eq!(line["parent_span_id"], "b7ad6b7169203331");

    // librdkafka's statistics give the consumer lag of the assigned partition.
    let lag = format!("ferry_consumer_lag_messages{{topic=\"{requests}\",partition=\"0\"}} ");
    wait_for(Duration::from_secs(30), "the consumer lag from statistics", || {
        get(addr, "/metrics").filter(|(_, m)| m.contains(&lag)).map(|_| ())
    });

    // While it drains, the worker is not ready (and still alive).
    start_long_request(&cluster, &w, &requests, "long");
    let metrics = get(addr, "/metrics").expect("metrics").1;
    assert!(metrics.contains("ferry_requests_in_flight 1\n"), "{metrics}");
    let commit_lag = format!("ferry_commit_lag_messages{{topic=\"{requests}\",partition=\"0\"}} 1\n");
    wait_for(Duration::from_secs(5), "the commit lag of the running request", || {
        get(addr, "/metrics")
            .filter(|(_, m)| m.contains(&commit_lag))
            .map(|_| ())
    });
    w.signal("TERM");
    let why = wait_status(addr, "/readyz", 503, Duration::from_secs(3));
    assert_eq!(why, "draining\n");
    assert_eq!(get(addr, "/healthz").map(|(s, _)| s), Some(200), "draining is not dead");
    let status = w.wait_exit(Duration::from_secs(15)).expect("exits after the drain");
    assert!(status.success(), "a signalled drain exits 0: {status}");
}

/// Each answered request's attempt leaves the worker's open attempts once it is settled: none is
/// left behind after a batch is served, so memory does not grow with every request and a
/// controlled exit closes only the attempts really in flight.
#[test]
fn answered_requests_leave_no_open_attempt_behind() {
    let setup = Setup::new(1);
    let (cluster, p) = (&setup.cluster, &setup.pipeline);
    let addr = free_addr();
    let args = setup.args().set("--http-addr", addr.to_string());
    let mut w = setup.worker("worker-attempts", args);
    let producer = cluster.producer();
    for i in 0..3 {
        let id = format!("a{i}");
        let payload = format!(r#"{{"id":"{id}","prompt":"The capital of France is","max_tokens":3}}"#);
        block_on(cluster.publish(&producer, &p.requests, &id, payload.as_bytes()));
    }
    let metrics = wait_for(Duration::from_secs(300), "three answers settled", || {
        assert!(w.wait_exit(Duration::ZERO).is_none(), "the worker exited:\n{}", w.log());
        get(addr, "/metrics").map(|(_, m)| m).filter(|m| {
            m.contains("ferry_requests_total{outcome=\"answered\"} 3\n") && m.contains("ferry_requests_in_flight 0\n")
        })
    });
    assert!(metrics.contains("ferry_attempts_open 0\n"), "{metrics}");
}

/// An accelerator that reports an unrecoverable error: the worker turns unready, drains the
/// generation in flight, and exits with status 3 to be restarted; nothing is committed.
#[cfg(feature = "fault-injection")]
#[test]
fn an_unrecoverable_accelerator_drains_and_exits_non_zero() {
    let (requests, replies, group) = (unique("req"), unique("rep"), unique("group"));
    let dlq = format!("{requests}.dlq");
    let cluster = Cluster::start(&[&requests, &replies, &dlq]);
    let broken = cluster.dir.path().join("gpu-broken");
    let broken_env = broken.to_str().expect("utf-8 path").to_string();
    let (mut w, addr) = worker(
        &cluster,
        "worker-gpu",
        (&requests, &replies, &group),
        &["--health-interval", "100ms"],
        &[("FERRY_FAULT_ACCELERATOR_FILE", &broken_env)],
        true,
    );
    wait_status(addr, "/readyz", 200, Duration::from_secs(120));
    start_long_request(&cluster, &w, &requests, "long");
    std::fs::write(&broken, b"").expect("break the accelerator");
    let why = wait_status(addr, "/readyz", 503, Duration::from_secs(3));
    assert!(why.starts_with("accelerator unhealthy: fault-injection: "), "{why}");
    let metrics = get(addr, "/metrics").expect("metrics").1;
    assert!(metrics.contains("ferry_accelerator_unrecoverable 1\n"), "{metrics}");
    let status = w.wait_exit(Duration::from_secs(15)).expect("exits after the drain");
    assert_eq!(status.code(), Some(3), "{}", w.log());
    assert!(
        w.log().contains("draining: suspending the generations in flight"),
        "{}",
        w.log()
    );
    assert_eq!(
        cluster.committed(&cluster.reader(&group), &requests),
        None,
        "nothing committed"
    );
}

/// Generations of different requests failing in a row open the circuit breaker: the worker
/// drains and exits with status 3.
#[cfg(feature = "fault-injection")]
#[test]
fn repeated_engine_failures_open_the_circuit_breaker() {
    let (requests, replies, group) = (unique("req"), unique("rep"), unique("group"));
    let dlq = format!("{requests}.dlq");
    let cluster = Cluster::start(&[&requests, &replies, &dlq]);
    let (mut w, addr) = worker(
        &cluster,
        "worker-breaker",
        (&requests, &replies, &group),
        &["--breaker-failures", "2", "--max-attempts", "1", "--max-in-flight", "1"],
        &[("FERRY_FAULT_FAIL_GENERATION", "1")],
        false,
    );
    wait_status(addr, "/readyz", 200, Duration::from_secs(120));
    let producer = cluster.producer();
    for id in ["fails-1", "fails-2"] {
        let payload = format!(r#"{{"id":"{id}","prompt":"Hello","max_tokens":2}}"#);
        rt().block_on(cluster.publish(&producer, &requests, id, payload.as_bytes()));
    }
    let status = w
        .wait_exit(Duration::from_secs(120))
        .expect("exits once the breaker opens");
    assert_eq!(status.code(), Some(3), "{}", w.log());
    let log = w.log();
    assert!(
        log.contains("circuit breaker open: 2 different requests failed in a row"),
        "{log}"
    );
}

/// With `--otlp-endpoint`, the worker exports the span of a request to the collector, in the
/// caller's trace: its parent is the caller's span, the reply's `traceparent` names it, and the
/// spans the worker opens inside it are its children.
#[test]
fn spans_are_exported_over_otlp_in_the_callers_trace() {
    let collector = Collector::start();
    let s = Setup::new(1);
    let args = s.pipeline.args().set("--otlp-endpoint", collector.url());
    let _w = s.worker("worker-otlp", args.set("--otlp-service-name", "ferry-test"));
    let caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let payload = br#"{"id":"exported","prompt":"The capital of France is","max_tokens":4}"#;
    let producer = s.cluster.producer();
    let headers = [("traceparent", caller)];
    block_on(
        s.cluster
            .publish_with_headers(&producer, &s.pipeline.requests, "exported", payload, &headers),
    );
    let reply = wait_for(Duration::from_secs(120), "the reply", || {
        let replies = s.cluster.read_all_with_headers(&s.pipeline.replies);
        replies.into_iter().find(|r| r.key == "exported")
    });
    let traceparent = reply
        .headers
        .iter()
        .find(|(k, _)| k == "traceparent")
        .expect("a traceparent");
    let own = traceparent.1.split('-').nth(2).expect("a span id").to_string();
    let span = wait_for(Duration::from_secs(60), "the request's span at the collector", || {
        collector.spans().into_iter().find(|s| s.span_id == own)
    });
    assert_eq!(span.name, "message");
    assert_eq!(span.trace_id, "0af7651916cd43dd8448eb211c80319c", "the caller's trace");
    assert_eq!(span.parent_span_id, "b7ad6b7169203331", "the caller's span");
    assert_eq!(span.service, "ferry-test");
    let children = wait_for(Duration::from_secs(60), "the spans inside the request's", || {
        let children: Vec<_> = collector
            .spans()
            .into_iter()
            .filter(|c| c.parent_span_id == own)
            .collect();
        children.iter().any(|c| c.name == "request").then_some(children)
    });
    assert!(children.iter().all(|c| c.trace_id == span.trace_id), "{children:?}");
}
