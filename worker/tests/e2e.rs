//! End to end: a broker and a worker as separate processes, requests through Kafka.

mod support;

use std::time::Duration;

use ferry_schemas::{DeadLetter, ErrorCode, Reply, Request};
use ferry_testkit::{block_on, unique, wait_for, Cluster, Pipeline, Setup};
use ferry_worker::engine::Engine;
use rdkafka::consumer::Consumer;

fn parse_reply(bytes: &[u8]) -> Reply {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|e| panic!("reply is not a Reply ({e}): {}", String::from_utf8_lossy(bytes)))
}

/// A request published with rdkafka gets the answer the engine gives in-process, and the group's
/// committed offset passes it only once the reply is in the reply topic.
#[test]
fn answers_through_kafka_and_commits_only_after_the_reply() {
    let s = Setup::new(1);
    let (cluster, p) = (&s.cluster, &s.pipeline);
    let (requests, replies, group) = (&p.requests, &p.replies, &p.group);
    let worker = s.worker("worker-e2e", p.args());

    let request: Request = serde_json::from_value(serde_json::json!({
        "id": "e2e-1",
        "messages": [{"role": "user", "content": "Write a haiku about autumn."}],
        "max_tokens": 32,
        "temperature": 0.7,
        "seed": 11,
        "metadata": {"trace": "abc"}
    }))
    .expect("request");
    let engine = Engine::new(support::shared());
    let expected = engine
        .generate(engine.prepare(&request).expect("prepares"))
        .expect("generates");

    let producer = cluster.producer();
    let payload = serde_json::to_vec(&request).expect("json");
    let offset = block_on(cluster.publish(&producer, requests, &request.id, &payload));

    // Watch the group's committed offset. Each time it is read, the reply topic's end is read
    // right after: once the commit has passed the request, the reply must already be below that
    // end, or the worker committed before the reply existed.
    let group_reader = cluster.reader(group);
    let reply_end = wait_for(Duration::from_secs(180), "the commit past the request", || {
        let committed = cluster.committed(&group_reader, requests)?;
        let (_, high) = group_reader
            .fetch_watermarks(replies, 0, Duration::from_secs(10))
            .ok()?;
        (committed > offset).then_some(high)
    });
    let all = cluster.read_all(replies);
    let (_, body, reply_offset) = all
        .iter()
        .find(|(k, _, _)| k == &request.id)
        .expect("a reply keyed by the id");
    assert!(
        *reply_offset < reply_end,
        "the offset was committed before the reply was published"
    );

    let Reply::Response(r) = parse_reply(body) else {
        panic!("expected a response")
    };
    assert_eq!(r.text, expected.text);
    assert_eq!(r.usage.completion_tokens as usize, expected.tokens.len());
    assert_eq!(r.usage.prompt_tokens as usize, expected.prompt_tokens);
    assert_eq!(r.finish_reason, expected.finish.reason);
    assert_eq!(r.worker, "worker-e2e");
    assert_eq!((r.attempt, r.resumed_from_token), (1, None));
    assert_eq!(r.metadata, request.metadata);
    assert!(r.timings.decode_ms > 0.0 && r.timings.total_ms >= r.timings.decode_ms);
    drop(worker);
}

/// Every kind of unservable message lands in the dead-letter topic with its reason, its source
/// offset and its original bytes; callers with a readable id get an error reply; the offsets
/// are committed; and a valid request sent after them all is answered.
#[test]
fn bad_messages_are_dead_lettered_and_the_worker_keeps_serving() {
    let s = Setup::new(1);
    let (cluster, p) = (&s.cluster, &s.pipeline);
    let (requests, replies, group, dlq) = (&p.requests, &p.replies, &p.group, &p.dlq);
    let _worker = s.worker("worker-dlq", p.args().set("--max-context", "128"));

    let long_prompt = "word ".repeat(300);
    let missing_topic = unique("no-such-topic");
    let bad: Vec<(&str, Vec<u8>, ErrorCode)> = vec![
        ("k-not-json", b"this is not json".to_vec(), ErrorCode::InvalidJson),
        ("k-not-utf8", b"\xff\xfe{\"id\":1}".to_vec(), ErrorCode::InvalidJson),
        (
            "bad-types",
            br#"{"id":"bad-types","prompt":42}"#.to_vec(),
            ErrorCode::InvalidSchema,
        ),
        (
            "bad-range",
            br#"{"id":"bad-range","prompt":"hi","max_tokens":0}"#.to_vec(),
            ErrorCode::InvalidRequest,
        ),
        (
            "too-long",
            serde_json::to_vec(&serde_json::json!({"id": "too-long", "prompt": long_prompt})).expect("json"),
            ErrorCode::PromptTooLong,
        ),
        (
            "wrong-model",
            br#"{"id":"wrong-model","model":"gpt-17","prompt":"hi"}"#.to_vec(),
            ErrorCode::UnknownModel,
        ),
        (
            "no-topic",
            serde_json::to_vec(&serde_json::json!({"id": "no-topic", "prompt": "hi", "reply_to": missing_topic}))
                .expect("json"),
            ErrorCode::InvalidRequest,
        ),
    ];
    let producer = cluster.producer();
    let mut offsets = Vec::new();
    for (key, payload, _) in &bad {
        offsets.push(block_on(cluster.publish(&producer, requests, key, payload)));
    }
    let good = br#"{"id":"good","prompt":"The quick brown fox","max_tokens":8}"#;
    let good_offset = block_on(cluster.publish(&producer, requests, "good", good));

    let group_reader = cluster.reader(group);
    wait_for(Duration::from_secs(180), "every message to be committed", || {
        cluster.committed(&group_reader, requests).filter(|&c| c > good_offset)
    });

    let mut dead: Vec<DeadLetter> = cluster
        .read_all(dlq)
        .iter()
        .map(|(_, v, _)| serde_json::from_slice(v).expect("a dead-letter record"))
        .collect();
    // Several messages are served at once, so their records arrive in completion order.
    dead.sort_by_key(|d| d.source.offset);
    assert_eq!(dead.len(), bad.len(), "{dead:#?}");
    for ((key, payload, code), (record, offset)) in bad.iter().zip(dead.iter().zip(&offsets)) {
        assert_eq!(record.reason.code, *code, "{key}: {}", record.reason.message);
        assert!(!record.reason.message.is_empty());
        assert_eq!(
            (
                record.source.topic.as_str(),
                record.source.partition,
                record.source.offset
            ),
            (requests.as_str(), 0, *offset)
        );
        assert_eq!(record.source.key.as_deref(), Some(*key));
        assert_eq!(record.payload().expect("base64"), *payload, "{key}");
        assert_eq!(record.worker, "worker-dlq");
    }

    let replies: Vec<Reply> = cluster
        .read_all(replies)
        .iter()
        .map(|(_, v, _)| parse_reply(v))
        .collect();
    let mut errors: Vec<(&str, ErrorCode)> = replies
        .iter()
        .filter_map(|r| match r {
            Reply::Error(e) => Some((e.id.as_str(), e.error.code)),
            Reply::Response(_) | Reply::Chunk(_) => None,
        })
        .collect();
    errors.sort_unstable_by_key(|(id, _)| *id);
    // Messages with a readable id get an error reply; the one whose reply topic is missing
    // cannot, and the two with no id cannot either.
    assert_eq!(
        errors,
        [
            ("bad-range", ErrorCode::InvalidRequest),
            ("bad-types", ErrorCode::InvalidSchema),
            ("too-long", ErrorCode::PromptTooLong),
            ("wrong-model", ErrorCode::UnknownModel),
        ]
    );
    let answered: Vec<&str> = replies
        .iter()
        .filter_map(|r| match r {
            Reply::Response(r) => Some(r.id.as_str()),
            Reply::Error(_) | Reply::Chunk(_) => None,
        })
        .collect();
    assert_eq!(answered, ["good"]);
}

/// A worker whose dead-letter topic does not exist refuses to start, and says which topic to
/// create: a dead letter it could not write later would otherwise stop its partition.
#[test]
fn a_missing_dead_letter_topic_is_a_clear_error_at_start_up() {
    let p = Pipeline::new();
    let cluster = Cluster::start(&[&p.requests, &p.replies]);
    let mut worker = cluster.start_worker("worker-no-dlq", p.args(), &[]);
    let requests = &p.requests;
    let status = worker
        .wait_exit(Duration::from_secs(120))
        .expect("the worker stops by itself");
    assert!(!status.success(), "{status}");
    let log = worker.log();
    let dlq = format!("{requests}.dlq");
    assert!(
        log.contains(&format!(
            "the dead-letter topic (--dead-letter-topic) {dlq:?} does not exist: create it"
        )),
        "{log}"
    );
}
