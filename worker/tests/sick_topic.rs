//! A reply topic that cannot take a record is one request's failure, not the worker's. The
//! test hosts librdkafka's mock cluster in its own process and takes the leader away from the
//! reply topic's only partition, so every record for it waits for a leader until
//! `--publish-timeout` and times out, while every other topic takes records: the failure a
//! production cluster shows for a topic that lost its in-sync replicas or its leader. A request
//! naming that topic is dead-lettered (`reply_topic_unwritable`, with the topic and the broker's
//! reason) and committed, the worker stays up, and the request after it is answered. Before,
//! the timeout was taken for the cluster's: the worker exited with the request uncommitted, and
//! the next worker did the same with the redelivered message, so one message stopped the fleet.
//!
//! The limit: this is at-least-once delivery. Exactly-once needs real Kafka, and a single-node
//! Kafka cannot have a sick topic beside healthy ones: since Kafka 3.7 a topic's effective
//! `min.insync.replicas` is capped at its replica count (KAFKA-15583), so a topic whose setting
//! exceeds its replicas takes records like any other.

use std::time::Duration;

use ferry_schemas::{DeadLetter, ErrorCode, Reply};
use ferry_testkit::{block_on, unique, wait_for, Cluster, Pipeline};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

#[test]
fn a_reply_topic_without_a_leader_dead_letters_its_request_and_the_worker_goes_on() {
    let mock: MockCluster<'static, DefaultProducerContext> = MockCluster::new(1).expect("a mock cluster");
    let p = Pipeline::new();
    let sick = unique("sick");
    for topic in [&p.requests, &p.replies, &p.dlq, &sick] {
        mock.create_topic(topic, 1, 1).expect("a topic");
    }
    mock.partition_leader(&sick, 0, None)
        .expect("no leader for the sick topic");
    let cluster = Cluster::hosted(mock.bootstrap_servers());
    let args = p
        .args()
        .set("--publish-timeout", "5s")
        .set("--http-addr", "off")
        .set("--snapshot-store", cluster.snapshot_store());
    let mut worker = cluster.start_worker("worker-sick", args, &[]);

    let producer = cluster.producer();
    let sick_request =
        format!(r#"{{"id":"to-sick","reply_to":"{sick}","prompt":"The capital of France is","max_tokens":4}}"#);
    block_on(cluster.publish(&producer, &p.requests, "to-sick", sick_request.as_bytes()));
    let after = br#"{"id":"after","prompt":"The capital of France is","max_tokens":4}"#;
    let last = block_on(cluster.publish(&producer, &p.requests, "after", after));

    let reader = cluster.reader(&p.group);
    wait_for(Duration::from_secs(600), "both requests to be committed", || {
        if let Some(status) = worker.wait_exit(Duration::ZERO) {
            panic!("the worker exited ({status}):\n{}", worker.log());
        }
        cluster.committed(&reader, &p.requests).filter(|&c| c > last)
    });
    assert!(worker.wait_exit(Duration::ZERO).is_none(), "the worker exited");

    let dead: Vec<DeadLetter> = cluster
        .read_all(&p.dlq)
        .iter()
        .map(|(_, v, _)| serde_json::from_slice(v).expect("a dead letter"))
        .collect();
    match dead.as_slice() {
        [d] => {
            assert_eq!(d.request_id.as_deref(), Some("to-sick"));
            assert_eq!(d.reason.code, ErrorCode::ReplyTopicUnwritable, "{}", d.reason.message);
            assert!(
                d.reason.message.contains(&sick),
                "the reason names the topic: {}",
                d.reason.message
            );
        }
        other => panic!("expected one dead letter, got {other:?}\n{}", worker.log()),
    }
    let replies = cluster.replies(&p.replies);
    assert!(
        replies
            .iter()
            .any(|r| matches!(r, Reply::Response(r) if r.id == "after")),
        "the request after the sick one was not answered:\n{}",
        worker.log()
    );
    assert!(
        replies.iter().all(|r| r.id() != "to-sick"),
        "the caller's error reply went elsewhere than its own reply topic"
    );
}
