//! Hostile input, as a new user and as an attacker would send it, through Kafka to a worker
//! process: malformed bytes, every field with the wrong type, values just inside and just past
//! every limit (the contract's, the worker's record budget, the broker's default record size),
//! hostile headers, forbidden and missing reply topics, one id reused by two callers at once,
//! unicode edge cases and chat control tokens in content.
//!
//! Each message is either dead-lettered with its reason (the dead letter fitting the worker's
//! `--max-record-bytes`, with the original's size and sha256) or answered correctly (the answer
//! the engine gives in process); the worker never exits; every offset is committed; and a valid
//! request sent after all of them is answered.

mod cases;
#[path = "../support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::time::Duration;

use cases::{Case, Expect, Topics};
use ferry_schemas::{DeadLetter, Reply, Request};
use ferry_testkit::{block_on, unique, wait_for, Cluster, Pipeline};
use ferry_worker::engine::Engine;
use rdkafka::consumer::Consumer;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use sha2::{Digest, Sha256};

/// The worker's record budget in this test: small, so that an answer can exceed it.
const MAX_RECORD_BYTES: usize = 16_384;
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// A reply as read back: its key, the reply, its headers.
type Published = (String, Reply, Vec<(String, String)>);

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn hostile_messages_are_dead_lettered_or_answered_and_the_worker_keeps_serving() {
    let p = Pipeline::new();
    let topics = Topics {
        requests: p.requests.clone(),
        replies: p.replies.clone(),
        other_replies: unique("rep"),
        dlq: p.dlq.clone(),
        denied: unique("denied"),
        journal: unique("journal"),
    };
    let Topics {
        requests,
        replies,
        other_replies,
        dlq,
        denied,
        journal,
    } = &topics;
    let group = &p.group;
    let cluster = Cluster::start(&[requests, replies, other_replies, dlq, denied, journal]);
    let args = p.args().set("--max-context", "256").set("--max-in-flight", "2");
    let args = args.set("--max-record-bytes", MAX_RECORD_BYTES.to_string());
    let args = args
        .set("--reply-topic-allow", "re:rep-[0-9a-f]{32}")
        .set("--journal-topic", journal);
    let mut worker = cluster.start_worker(
        "worker-hostile",
        args.set("--snapshot-store", cluster.snapshot_store()),
        &[],
    );

    let cases = cases::all(&topics);
    assert!(cases.len() >= 40, "{} kinds", cases.len());

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &cluster.bootstrap)
        .set("message.max.bytes", "10000000")
        .create()
        .expect("producer");
    let group_reader = cluster.reader(group);
    let mut settled = |offset: i64, what: &str| {
        wait_for(Duration::from_secs(900), what, || {
            assert!(worker.wait_exit(Duration::ZERO).is_none(), "the worker exited");
            let (low, _) = group_reader
                .fetch_watermarks(requests, 0, Duration::from_secs(10))
                .expect("watermarks");
            let committed = cluster.committed(&group_reader, requests);
            assert!(
                low <= offset || committed.is_some_and(|c| c > offset),
                "the broker dropped offset {offset} before the worker read it (low watermark {low})"
            );
            committed.filter(|&c| c > offset)
        });
    };
    // The mock broker keeps about 5 MB per partition and drops older records to make room, so
    // the large messages go one at a time, each once everything before it is settled (a real
    // broker needs no such care; the worker handles them the same either way).
    let large = |c: &Case| c.payload.as_ref().map_or(0, Vec::len) + c.key.as_ref().map_or(0, Vec::len) > 300_000;
    let mut offsets: HashMap<i64, usize> = HashMap::new();
    let mut send = |i: usize, c: &Case| -> i64 {
        let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(requests).partition(0);
        if let Some(k) = &c.key {
            rec = rec.key(k.as_slice());
        }
        if let Some(p) = &c.payload {
            rec = rec.payload(p.as_slice());
        }
        let mut hs = OwnedHeaders::new();
        for (k, v) in &c.headers {
            hs = hs.insert(Header {
                key: k,
                value: Some(v.as_slice()),
            });
        }
        rec = rec.headers(hs);
        let delivered = block_on(producer.send(rec, Duration::from_secs(30)))
            .unwrap_or_else(|(e, _)| panic!("{}: the broker refused the test's message: {e}", c.name));
        offsets.insert(delivered.offset, i);
        delivered.offset
    };
    let mut last = -1;
    for (i, c) in cases.iter().enumerate().filter(|(_, c)| !large(c)) {
        last = send(i, c);
    }
    settled(last, "the small hostile messages to be settled");
    for (i, c) in cases.iter().enumerate().filter(|(_, c)| large(c)) {
        let offset = send(i, c);
        settled(offset, &format!("{} to be settled", c.name));
    }
    let last = block_on(cluster.publish(
        &producer,
        requests,
        "after",
        br#"{"id":"after","prompt":"Once upon a time","max_tokens":4}"#,
    ));
    settled(last, "the request sent after the hostile ones");
    assert!(worker.wait_exit(Duration::ZERO).is_none(), "the worker exited");

    // Dead letters: one per dead case, each within the budget, the original's size and hash kept.
    let mut dead_by_case: HashMap<usize, DeadLetter> = HashMap::new();
    for r in cluster.read_all_with_headers(dlq) {
        let size = r.key.len() + r.value.len() + r.headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
        let d: DeadLetter = serde_json::from_slice(&r.value).expect("a dead-letter record");
        let i = offsets[&d.source.offset];
        assert!(
            size <= MAX_RECORD_BYTES,
            "{}: a dead letter of {size} bytes",
            cases[i].name
        );
        let original = cases[i].payload.clone().unwrap_or_default();
        assert_eq!(d.payload_size, Some(original.len() as u64), "{}", cases[i].name);
        assert_eq!(
            d.payload_sha256.as_deref(),
            Some(hex(&Sha256::digest(&original)).as_str())
        );
        let kept = d.payload().expect("base64");
        assert_eq!(d.payload_truncated, kept.len() < original.len(), "{}", cases[i].name);
        assert_eq!(
            &original[..kept.len()],
            kept.as_slice(),
            "{}: a prefix of the original",
            cases[i].name
        );
        assert!(d.reason.message.len() <= 1024, "{}: a bounded reason", cases[i].name);
        assert!(
            r.headers
                .iter()
                .any(|(k, v)| k == "ferry-dlq-reason" && v == d.reason.code.as_str()),
            "{}",
            cases[i].name
        );
        assert!(
            dead_by_case.insert(i, d).is_none(),
            "{}: dead-lettered twice",
            cases[i].name
        );
    }

    let read_replies = |topic: &str| -> Vec<Published> {
        cluster
            .read_all_with_headers(topic)
            .into_iter()
            .map(|r| {
                let reply: Reply = serde_json::from_slice(&r.value).expect("a reply");
                (r.key, reply, r.headers)
            })
            .collect()
    };
    let mut on_topic: HashMap<String, Vec<Published>> = HashMap::new();
    on_topic.insert(replies.clone(), read_replies(replies));
    on_topic.insert(other_replies.clone(), read_replies(other_replies));
    for (_, reply, headers) in on_topic.values().flatten() {
        for (k, v) in headers {
            assert!(
                k != "tracestate" || v.len() <= 512,
                "an unbounded tracestate was echoed"
            );
        }
        let size: usize = serde_json::to_vec(reply).expect("json").len();
        assert!(size <= MAX_RECORD_BYTES, "a reply of {size} bytes");
    }
    for topic in [&denied, &journal, &dlq] {
        if topic != &dlq {
            assert!(
                cluster.read_all(topic).is_empty(),
                "the worker wrote the forbidden topic {topic}"
            );
        }
    }

    let engine = Engine::new(support::shared());
    let mut failures = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        match &c.expect {
            Expect::Dead { code, told } => {
                let Some(d) = dead_by_case.get(&i) else {
                    failures.push(format!("{}: not dead-lettered", c.name));
                    continue;
                };
                if d.reason.code != *code {
                    failures.push(format!(
                        "{}: {:?} ({}), expected {code:?}",
                        c.name, d.reason.code, d.reason.message
                    ));
                }
                let id = d.request_id.clone().unwrap_or_default();
                let error_reply = on_topic[replies.as_str()]
                    .iter()
                    .any(|(_, r, _)| matches!(r, Reply::Error(e) if e.id == id && e.error.code == *code));
                if error_reply != *told {
                    failures.push(format!("{}: error reply {error_reply}, expected {told}", c.name));
                }
            }
            Expect::Answered { reply_topic } => {
                if let Some(d) = dead_by_case.get(&i) {
                    failures.push(format!(
                        "{}: dead-lettered as {:?}: {}",
                        c.name, d.reason.code, d.reason.message
                    ));
                    continue;
                }
                let payload = c.payload.as_ref().expect("answered cases have a payload");
                let request: Request = serde_json::from_slice(payload).expect("a valid request");
                let prepared = engine.prepare(&request).expect("prepares");
                let expected = if request.deadline.is_some_and(|d| d < time::OffsetDateTime::now_utc()) {
                    String::new()
                } else {
                    engine.generate(prepared).expect("generates").text
                };
                let texts: Vec<&str> = on_topic[reply_topic]
                    .iter()
                    .filter_map(|(_, r, _)| match r {
                        Reply::Response(r) if r.id == request.id => Some(r.text.as_str()),
                        _ => None,
                    })
                    .collect();
                if !texts.contains(&expected.as_str()) {
                    failures.push(format!("{}: answers {texts:?}, expected {expected:?}", c.name));
                }
            }
        }
    }
    let after = on_topic[replies.as_str()]
        .iter()
        .any(|(k, r, _)| k == "after" && matches!(r, Reply::Response(_)));
    assert!(after, "the valid request sent after the hostile ones was not answered");
    assert!(
        failures.is_empty(),
        "{} of {} kinds failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    eprintln!(
        "{} hostile kinds: each dead-lettered with its reason or answered correctly",
        cases.len()
    );
}
