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
//! On real Kafka the same is tried with the failure itself: the test joins a second broker to a
//! Kafka of its own, puts the reply topic's replicas on both with `min.insync.replicas` 2, and
//! kills the second, so that every produce with `acks=all` is answered `NOT_ENOUGH_REPLICAS`
//! while every other topic (on the first broker) takes records. On one node that cannot be had:
//! since Kafka 3.7 a topic's effective `min.insync.replicas` is capped at its replica count
//! (KAFKA-15583). Under at-least-once the request is dead-lettered as above. Under exactly-once
//! a transaction that touched the sick partition cannot end until the partition heals (Kafka
//! cannot write its abort marker there), so the worker that tried must stop; that attempt
//! counts, and once `--max-attempts` is spent the next worker dead-letters the request without
//! touching the topic, and goes on.

use std::time::Duration;

use ferry_schemas::{DeadLetter, ErrorCode, Reply};
use ferry_testkit::broker::{create_topic_on, BrokerProcess};
use ferry_testkit::joined::JoinedBroker;
use ferry_testkit::{block_on, unique, wait_for, BrokerChoice, ChildGuard, Cluster, Pipeline};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

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

    wait_for_dead_letter(&cluster, &p, &sick, &mut worker);
}

/// Publishes a request naming `sick` as its reply topic and a plain one after it, waits for both
/// to be committed with `worker` running, and checks what each became: the first dead-lettered
/// as `reply_topic_unwritable` naming the topic, the second answered.
fn wait_for_dead_letter(cluster: &Cluster, p: &Pipeline, sick: &str, worker: &mut ChildGuard) {
    let last = publish_pair(cluster, p, sick);
    let reader = cluster.reader(&p.group);
    wait_for(Duration::from_secs(600), "both requests to be committed", || {
        if let Some(status) = worker.wait_exit(Duration::ZERO) {
            panic!("the worker exited ({status}):\n{}", worker.log());
        }
        cluster.committed(&reader, &p.requests).filter(|&c| c > last)
    });
    assert!(worker.wait_exit(Duration::ZERO).is_none(), "the worker exited");
    let (d, replies) = settled(cluster, p, &worker.log());
    assert_eq!(d.request_id.as_deref(), Some("to-sick"));
    assert_eq!(d.reason.code, ErrorCode::ReplyTopicUnwritable, "{}", d.reason.message);
    assert!(
        d.reason.message.contains(sick),
        "the reason names the topic: {}",
        d.reason.message
    );
    assert!(
        replies.iter().all(|r| r.id() != "to-sick"),
        "the caller's error reply went elsewhere than its own reply topic"
    );
}

/// Publishes a request naming `sick` as its reply topic, then a plain one; returns the offset
/// of the second.
fn publish_pair(cluster: &Cluster, p: &Pipeline, sick: &str) -> i64 {
    let producer = cluster.producer();
    let sick_request =
        format!(r#"{{"id":"to-sick","reply_to":"{sick}","prompt":"The capital of France is","max_tokens":4}}"#);
    block_on(cluster.publish(&producer, &p.requests, "to-sick", sick_request.as_bytes()));
    let after = br#"{"id":"after","prompt":"The capital of France is","max_tokens":4}"#;
    block_on(cluster.publish(&producer, &p.requests, "after", after))
}

/// The one dead letter of `p` and its replies, as a `read_committed` reader sees them, once the
/// request after the sick one is answered (`log`, the worker's, for the failure message).
fn settled(cluster: &Cluster, p: &Pipeline, log: &str) -> (DeadLetter, Vec<Reply>) {
    let dead: Vec<DeadLetter> = committed_records(cluster, &p.dlq)
        .iter()
        .map(|v| serde_json::from_slice(v).expect("a dead letter"))
        .collect();
    let [d] =
        <[DeadLetter; 1]>::try_from(dead).unwrap_or_else(|d| panic!("expected one dead letter, got {d:?}\n{log}"));
    let replies: Vec<Reply> = committed_records(cluster, &p.replies)
        .iter()
        .map(|v| serde_json::from_slice(v).expect("a reply"))
        .collect();
    assert!(
        replies
            .iter()
            .any(|r| matches!(r, Reply::Response(r) if r.id == "after")),
        "the request after the sick one was not answered:\n{log}"
    );
    (d, replies)
}

#[test]
fn a_reply_topic_short_of_in_sync_replicas_dead_letters_its_request_under_both_delivery_modes() {
    if BrokerChoice::from_env() != BrokerChoice::Kafka {
        eprintln!("skipped: needs a Kafka of the test's own, to join a second broker to");
        return;
    }
    let (alo, eos) = (Pipeline::new(), Pipeline::new());
    let kafka_dir = tempfile::tempdir().expect("tempdir");
    let dir = kafka_dir.path().join("kafka");
    let dir_arg = dir.display().to_string();
    let mut args = vec!["--kafka", "--kafka-dir", &dir_arg, "--partitions", "1"];
    for t in alo.topics().into_iter().chain(eos.topics()) {
        args.extend(["--topic", t]);
    }
    let mut broker = BrokerProcess::spawn(&args);
    let cluster = Cluster::hosted(broker.wait_ready());
    // Both workers start before the second broker joins, so the group and transaction topics
    // they create live on the first, which stays.
    let worker_args = |p: &Pipeline| {
        p.args()
            .set("--max-attempts", "2")
            .set("--publish-timeout", "5s")
            .set("--http-addr", "off")
            .set("--snapshot-store", cluster.snapshot_store())
    };
    let mut at_least_once = cluster.start_worker("worker-alo", worker_args(&alo), &[]);
    let exactly_once = cluster.start_worker("worker-eos", worker_args(&eos).set("--delivery", "exactly-once"), &[]);
    for w in [&at_least_once, &exactly_once] {
        wait_for(Duration::from_secs(240), "the worker's partitions", || {
            w.log().contains("partitions assigned").then_some(())
        });
    }
    let second = JoinedBroker::join(&dir, 2);
    let reader = cluster.reader(&unique("metadata"));
    wait_for(Duration::from_secs(120), "the second broker to register", || {
        let md = reader.fetch_metadata(None, Duration::from_secs(5)).ok()?;
        (md.brokers().len() == 2).then_some(())
    });
    let sick = unique("sick");
    create_topic_on(&cluster.bootstrap, &sick, &[1, 2], &[("min.insync.replicas", "2")]);
    let isr = |want: usize| {
        wait_for(
            Duration::from_secs(120),
            &format!("{want} in-sync replicas of {sick}"),
            || {
                let md = reader.fetch_metadata(Some(&sick), Duration::from_secs(5)).ok()?;
                let t = md.topics().iter().find(|t| t.name() == sick)?;
                (t.partitions().first()?.isr().len() == want).then_some(())
            },
        )
    };
    isr(2);
    second.kill();
    isr(1);
    wait_for_dead_letter(&cluster, &alo, &sick, &mut at_least_once);

    // Exactly-once: a transaction that touched the sick partition cannot end (Kafka cannot
    // write its abort marker there) until the partition heals, so each worker that tries to
    // answer stops. Each such attempt counts, and once the budget (2) is spent the next worker
    // dead-letters the request without touching the topic, and answers the request after it.
    let last = publish_pair(&cluster, &eos, &sick);
    let group = cluster.reader(&eos.group);
    let mut worker = exactly_once;
    let mut started = 1;
    loop {
        let committed = wait_for(Duration::from_secs(600), "the worker to commit or stop", || {
            if worker.wait_exit(Duration::ZERO).is_some() {
                return Some(false);
            }
            cluster
                .committed(&group, &eos.requests)
                .filter(|&c| c > last)
                .map(|_| true)
        });
        if committed {
            break;
        }
        assert!(started < 3, "a third worker stopped too:\n{}", worker.log());
        let args = worker_args(&eos).set("--delivery", "exactly-once");
        worker = cluster.start_worker(&format!("worker-eos-{started}"), args, &[]);
        started += 1;
    }
    assert_eq!(
        started, 3,
        "two workers stopped on the sick topic, and the third dead-lettered it"
    );
    let (d, _) = settled(&cluster, &eos, &worker.log());
    assert_eq!(d.reason.code, ErrorCode::ReplyTopicUnwritable, "{}", d.reason.message);
    assert_eq!(d.attempts.len(), 2, "both attempts in the history: {:?}", d.attempts);
}

/// The values of `topic`'s one partition that a `read_committed` reader sees: read until its
/// position passes the end (transactions' control records take offsets but are not delivered).
fn committed_records(cluster: &Cluster, topic: &str) -> Vec<Vec<u8>> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &cluster.bootstrap)
        .set("group.id", unique("committed-reader"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .expect("consumer");
    let (_, high) = c
        .fetch_watermarks(topic, 0, Duration::from_secs(10))
        .expect("watermarks");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning).expect("tpl");
    c.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    wait_for(Duration::from_secs(60), &format!("the end of {topic}"), || {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            out.push(m.payload().unwrap_or_default().to_vec());
        }
        let at = c.position().ok()?.elements().first().map(|e| e.offset());
        matches!(at, Some(Offset::Offset(o)) if o >= high).then_some(())
    });
    out
}
