//! `--delivery exactly-once` on real Kafka (the test binary's shared broker): every answer, dead
//! letter and offset committed in one transaction per request, and a zombie fenced.
//!
//! - Requests of two partitions, several in flight per partition so they finish out of order,
//!   valid and hostile: each valid one is answered once, each hostile one dead-lettered once, as
//!   a `read_committed` reader sees them, and the group's offsets reach the end of the topic.
//! - A worker that freezes (SIGSTOP, by fault injection) with its answer published in its open
//!   transaction, just before it adds the offset: a second worker takes the partition over after
//!   the session timeout and answers; the first resumes and tries to commit with the group
//!   generation it read while the partition was its own. The coordinator refuses it, the
//!   transaction is aborted, and a `read_committed` reader sees one answer (a
//!   `read_uncommitted` reader sees both: the zombie did publish).
//! - On the mock, which does not store transactional offsets, the worker refuses to start.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ferry_schemas::{Reply, Request, Response};
use ferry_testkit::read::responses;
use ferry_testkit::requests::chat;
use ferry_testkit::{unique, wait_for, BrokerChoice, ChildGuard, Cluster, Pipeline};
use ferry_worker::engine::Engine;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

const EXACTLY_ONCE: [&str; 2] = ["--delivery", "exactly-once"];

fn reference(r: &Request) -> String {
    let engine = Engine::new(support::shared());
    engine
        .generate(engine.prepare(r).expect("prepares"))
        .expect("generates")
        .text
}

struct Topics {
    cluster: Cluster,
    pipeline: Pipeline,
}

impl Topics {
    fn new(partitions: i32) -> Self {
        let pipeline = Pipeline::new();
        let cluster = Cluster::start_with_partitions(&pipeline.topics(), partitions);
        Self { cluster, pipeline }
    }

    fn worker(&self, name: &str, more: &[&str], env: &[(&str, &str)]) -> ChildGuard {
        let args = self.pipeline.args().extra(&EXACTLY_ONCE).extra(more);
        self.cluster.start_worker(name, args, env)
    }

    fn publish(&self, partition: i32, key: &str, payload: &[u8]) {
        let producer = self.cluster.producer();
        let requests = &self.pipeline.requests;
        ferry_testkit::block_on(self.cluster.publish_to(&producer, requests, partition, key, payload));
    }

    /// Waits for the group to commit `position`, failing at once if `worker` exits meanwhile.
    fn wait_committed(&self, partition: i32, position: i64, worker: &mut ChildGuard) {
        let reader = self.cluster.reader(&self.pipeline.group);
        wait_for(
            Duration::from_secs(240),
            &format!("partition {partition} committed to {position}"),
            || {
                if let Some(status) = worker.wait_exit(Duration::ZERO) {
                    panic!("{} exited ({status}):\n{}", worker.name, worker.log());
                }
                self.cluster
                    .committed_in(&reader, &self.pipeline.requests, partition)
                    .filter(|&c| c >= position)
            },
        );
    }

    /// Every record of `topic` a reader with `isolation` reaches: read until its position
    /// passes the end of every partition (control records included), or, for a
    /// `read_committed` reader held back by an open transaction, until `patience` passes.
    fn read(&self, topic: &str, isolation: &str, patience: Duration) -> Vec<Vec<u8>> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.cluster.bootstrap)
            .set("group.id", unique("eos-reader"))
            .set("enable.auto.commit", "false")
            .set("isolation.level", isolation)
            .create()
            .expect("consumer");
        let highs = self.cluster.high_watermarks(&c, topic);
        let mut tpl = TopicPartitionList::new();
        for p in 0..highs.len() as i32 {
            tpl.add_partition_offset(topic, p, Offset::Beginning).expect("tpl");
        }
        c.assign(&tpl).expect("assign");
        let deadline = Instant::now() + patience;
        let mut out = Vec::new();
        loop {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
                out.push(m.payload().unwrap_or_default().to_vec());
            }
            let done = c
                .position()
                .expect("position")
                .elements()
                .iter()
                .all(|e| match e.offset() {
                    Offset::Offset(o) => o >= highs[e.partition() as usize],
                    _ => highs[e.partition() as usize] == 0,
                });
            if done || Instant::now() > deadline {
                return out;
            }
        }
    }

    /// The final responses by request id, as a reader with `isolation` sees them.
    fn responses(&self, isolation: &str, patience: Duration) -> BTreeMap<String, Vec<Response>> {
        let replies = self.read(&self.pipeline.replies, isolation, patience);
        responses(
            replies
                .iter()
                .map(|v| serde_json::from_slice::<Reply>(v).expect("a reply")),
        )
    }
}

#[test]
fn answers_dead_letters_and_offsets_commit_together() {
    if BrokerChoice::is_mock() {
        eprintln!("skipped: the mock cluster does not store transactional offsets");
        return;
    }
    let t = Topics::new(2);
    let mut w = t.worker("worker-eos", &["--max-in-flight", "4"], &[]);
    // Long first, short after, on each partition: they finish out of order, and commit in order.
    let prompts = [
        ("Write a long story about a dragon who learns to bake bread.", 48),
        ("Name a colour.", 4),
        ("Say hello.", 6),
    ];
    let mut valid = Vec::new();
    for p in 0..2 {
        for (content, max_tokens) in prompts {
            let mut r = chat(&unique("eos"), content, max_tokens);
            // The long ones stream: their chunks go on the idempotent producer, their final reply
            // in a transaction, and the final must still follow the chunks in the log.
            r.stream = max_tokens > 40;
            t.publish(p, &r.id, &serde_json::to_vec(&r).expect("json"));
            valid.push(r);
        }
        t.publish(p, "hostile", b"{not json");
    }
    for p in 0..2 {
        t.wait_committed(p, 4, &mut w);
    }
    let answers = t.responses("read_committed", Duration::from_secs(60));
    for r in &valid {
        let got = answers.get(&r.id).map_or(0, Vec::len);
        assert_eq!(got, 1, "{} answered {got} times:\n{}", r.id, w.log());
        assert_eq!(
            answers[&r.id][0].text,
            reference(r),
            "{} differs from the reference",
            r.id
        );
    }
    let log: Vec<Reply> = t
        .read(&t.pipeline.replies, "read_committed", Duration::from_secs(60))
        .iter()
        .map(|v| serde_json::from_slice(v).expect("a reply"))
        .collect();
    for r in valid.iter().filter(|r| r.stream) {
        let at = |final_reply: bool| {
            log.iter()
                .enumerate()
                .filter(|(_, x)| x.id() == r.id && matches!(x, Reply::Chunk(_)) != final_reply)
                .map(|(i, _)| i)
                .collect::<Vec<_>>()
        };
        let (chunks, finals) = (at(false), at(true));
        assert!(!chunks.is_empty(), "{} streamed no chunk", r.id);
        assert!(
            finals.iter().all(|f| chunks.iter().all(|c| c < f)),
            "{}: a chunk after the final reply (chunks at {chunks:?}, final at {finals:?})",
            r.id
        );
    }
    let dead = t.read(&t.pipeline.dlq, "read_committed", Duration::from_secs(60));
    assert_eq!(dead.len(), 2, "one dead letter per hostile message");
    // Nothing aborted along the way: a reader of uncommitted records sees the same.
    let all = t.responses("read_uncommitted", Duration::from_secs(60));
    assert_eq!(all.values().map(Vec::len).sum::<usize>(), valid.len());
    assert!(
        w.wait_exit(Duration::ZERO).is_none(),
        "the worker is still serving:\n{}",
        w.log()
    );
}

#[test]
fn a_frozen_workers_answer_is_fenced_after_its_partition_moves() {
    if BrokerChoice::is_mock() {
        eprintln!("skipped: the mock cluster does not store transactional offsets");
        return;
    }
    let t = Topics::new(1);
    let freeze = t.cluster.dir.path().join(unique("freeze"));
    std::fs::write(&freeze, b"").expect("freeze file");
    let freeze_env = freeze.display().to_string();
    // The zombie's transaction must outlive its freeze (else the broker aborts it first, which
    // proves less): a long transaction timeout, a short session.
    let timing = ["--session-timeout", "6s", "--transaction-timeout", "120s"];
    let zombie = t.worker(
        "worker-zombie",
        &timing,
        &[("FERRY_FAULT_FREEZE_BEFORE_COMMIT_FILE", &freeze_env)],
    );
    wait_for(
        Duration::from_secs(120),
        "a partition assigned to the first worker",
        || zombie.log().contains("partitions assigned").then_some(()),
    );
    let r = chat(&unique("zombie"), "Name three fruits.", 24);
    t.publish(0, &r.id, &serde_json::to_vec(&r).expect("json"));
    wait_for(
        Duration::from_secs(180),
        "the first worker frozen before its commit",
        || {
            zombie
                .log()
                .contains("fault injection: freezing before the commit")
                .then_some(())
        },
    );
    let mut survivor = t.worker("worker-survivor", &timing, &[]);
    t.wait_committed(0, 1, &mut survivor);
    // Both answers are in the log: the zombie's in its open transaction, the survivor's
    // committed behind it.
    let seen = t.responses("read_uncommitted", Duration::from_secs(60));
    assert_eq!(
        seen.get(&r.id).map_or(0, Vec::len),
        2,
        "the zombie published in its transaction and the survivor answered:\n{}",
        survivor.log()
    );
    zombie.signal("CONT");
    wait_for(Duration::from_secs(120), "the zombie's transaction aborted", || {
        zombie.log().contains("transaction aborted").then_some(())
    });
    let committed = t.responses("read_committed", Duration::from_secs(120));
    let answers = committed.get(&r.id).cloned().unwrap_or_default();
    assert_eq!(
        answers.len(),
        1,
        "a read_committed reader sees one answer:\n{}\n{}",
        zombie.log(),
        survivor.log()
    );
    for l in zombie
        .log()
        .lines()
        .filter(|l| l.contains("transaction") || l.contains("revoked"))
    {
        eprintln!("zombie: {l}");
    }
    assert_eq!(answers[0].worker, "worker-survivor");
    assert_eq!(answers[0].text, reference(&r));
}

/// A request handed off under exactly-once while a lower offset of its partition is still to
/// run alone lets its slot go before it waits for its turn. Before, it held the slot while it
/// waited for that offset to commit, and the offset waited for the slot: nothing more was
/// answered until the worker was stopped.
///
/// The suspect is made by a first worker that dies on its attempt (fault injection), and the
/// race for the slot is settled by delaying the suspect's request for it, so that the request
/// after it (which runs out of memory, by fault injection, and is handed off) holds one first.
#[test]
fn a_hand_off_waiting_for_its_turn_lets_a_suspect_below_it_run_alone() {
    if BrokerChoice::is_mock() {
        eprintln!("skipped: the mock cluster does not store transactional offsets");
        return;
    }
    let t = Topics::new(1);
    let fallback = unique("fallback");
    ferry_testkit::broker::create_topics(&t.cluster.bootstrap, &[&fallback], 1);
    let store = t.cluster.snapshot_store();
    let suspect = chat(&unique("suspect"), "Name a colour.", 4);
    let oom = chat(&unique("oom"), "Say hello.", 4);
    for r in [&suspect, &oom] {
        t.publish(0, &r.id, &serde_json::to_vec(r).expect("json"));
    }
    let crash = t
        .pipeline
        .args()
        .set("--snapshot-store", &store)
        .set("--max-in-flight", "1");
    let mut first = t
        .cluster
        .start_worker("worker-dies", crash, &[("FERRY_FAULT_CRASH_ON", &suspect.id)]);
    first
        .wait_exit(Duration::from_secs(240))
        .expect("the first worker dies on the suspect's attempt");
    let delay = format!("{}:3000", suspect.id);
    let mut w = t.worker(
        "worker-eos",
        &[
            "--snapshot-store",
            &store,
            "--fallback-topic",
            &fallback,
            "--max-in-flight",
            "2",
        ],
        &[("FERRY_FAULT_OOM_ON", &oom.id), ("FERRY_FAULT_DELAY_SLOT_ON", &delay)],
    );
    t.wait_committed(0, 2, &mut w);
    let answers = t.responses("read_committed", Duration::from_secs(60));
    let got = answers.get(&suspect.id).cloned().unwrap_or_default();
    assert_eq!(got.len(), 1, "the suspect is answered once:\n{}", w.log());
    assert_eq!(got[0].text, reference(&suspect));
    assert!(
        !answers.contains_key(&oom.id),
        "the handed-off request is not answered here"
    );
    let handed = t.read(&fallback, "read_committed", Duration::from_secs(60));
    assert_eq!(
        handed.len(),
        1,
        "the out-of-memory request is handed off once:\n{}",
        w.log()
    );
    assert!(
        w.log().contains("running this request alone"),
        "the suspect ran alone:\n{}",
        w.log()
    );
}

#[test]
fn the_mock_cluster_is_refused() {
    let t = Cluster::start_mock(&["eos-mock-req", "eos-mock-rep", "eos-mock-req.dlq"], 1);
    let mut w = t.worker(
        "worker-mock",
        &[
            "--topic",
            "eos-mock-req",
            "--reply-topic",
            "eos-mock-rep",
            "--delivery",
            "exactly-once",
        ],
    );
    let status = w.wait_exit(Duration::from_secs(120)).expect("the worker exits");
    assert!(!status.success());
    assert!(
        w.log().contains("mock cluster does not store transactional offsets"),
        "{}",
        w.log()
    );
}
