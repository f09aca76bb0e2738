//! A reply topic that cannot take a record is one request's failure, not the worker's: on real
//! Kafka, a reply topic whose `min.insync.replicas` (2) exceeds its replicas (1) answers every
//! produce with `acks=all` with `NOT_ENOUGH_REPLICAS`, while every other topic takes records. A
//! request naming it is dead-lettered (`reply_topic_unwritable`, with the topic and the broker's
//! reason) and committed, the worker stays up, and the request after it is answered, under both
//! delivery modes. Before, the publish failed past `--publish-timeout`, the worker exited as if
//! the cluster were down, and the next worker did the same with the redelivered message: one
//! message stopped the fleet.
//!
//! The mock broker has no replicas to lack, so these run on real Kafka only.

use std::time::Duration;

use ferry_schemas::{DeadLetter, ErrorCode, Reply};
use ferry_testkit::broker::create_topics_with_config;
use ferry_testkit::{block_on, unique, wait_for, BrokerChoice, Setup};

fn sick_reply_topic_is_the_requests_failure(delivery: &str) {
    if BrokerChoice::is_mock() {
        eprintln!("skipped: the mock broker has no min.insync.replicas");
        return;
    }
    let setup = Setup::new(1);
    let (cluster, p) = (&setup.cluster, &setup.pipeline);
    let sick = unique("sick");
    create_topics_with_config(&cluster.bootstrap, &[&sick], 1, &[("min.insync.replicas", "2")]);
    let args = setup
        .args()
        .set("--delivery", delivery)
        .set("--publish-timeout", "5s")
        .set("--http-addr", "off");
    let mut worker = setup.worker(&format!("worker-sick-{delivery}"), args);

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
    let answered = cluster
        .replies(&p.replies)
        .into_iter()
        .any(|r| matches!(r, Reply::Response(r) if r.id == "after"));
    assert!(
        answered,
        "the request after the sick one was not answered:\n{}",
        worker.log()
    );
    assert!(
        cluster.replies(&p.replies).iter().all(|r| r.id() != "to-sick"),
        "the caller's error reply went elsewhere than its own reply topic"
    );
}

#[test]
fn a_sick_reply_topic_dead_letters_its_request_at_least_once() {
    sick_reply_topic_is_the_requests_failure("at-least-once");
}

#[test]
fn a_sick_reply_topic_dead_letters_its_request_exactly_once() {
    sick_reply_topic_is_the_requests_failure("exactly-once");
}
