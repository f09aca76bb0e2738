//! The group protocols a fleet may run, each on real Kafka (the test binary's shared broker),
//! each through the same fault: two workers share two partitions, both generating, and the one
//! generating a chosen request is evicted (SIGTERM) mid-generation. The other member (or, with
//! static membership, the evicted pod restarted under its instance id) finishes it from the
//! snapshot, and every answer is the uninterrupted one, byte for byte.
//!
//! - classic, eager (`--assignment-strategy range`): every partition is revoked and reassigned;
//! - classic, cooperative-sticky (the default): only the leaver's partition moves;
//! - classic with static membership (`--group-instance-id`): the leaver keeps its partition for
//!   the session timeout and takes it back when restarted under the same id;
//! - the consumer protocol (KIP-848, `--group-protocol consumer`): the broker assigns.
//!
//! And the guard against librdkafka 2.12's KIP-848 `max.poll.interval.ms` bug: a worker whose
//! consumer loop stalls past `--max-poll-interval` (within the broker's session timeout) carries
//! on without leaving the group.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use ferry_schemas::{Request, Response};
use ferry_testkit::{unique, wait_for, ChildGuard, Setup};
use ferry_worker::engine::Engine;
use ferry_worker::snapshot::format::{request_prefix, Manifest};

/// Long enough that both requests are still generating when the fault comes.
const MAX_TOKENS: u32 = 120;

struct Fleet {
    setup: Setup,
    /// Flags of every worker of the test, after the shared ones.
    extra: Vec<String>,
}

impl Fleet {
    fn new(extra: &[&str]) -> Self {
        Self {
            setup: Setup::new(2),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn worker(&self, name: &str, more: &[&str]) -> ChildGuard {
        self.worker_with_env(name, more, &[])
    }

    /// [`Fleet::worker`] with extra environment variables (fault injection).
    fn worker_with_env(&self, name: &str, more: &[&str], env: &[(&str, &str)]) -> ChildGuard {
        let args = self
            .setup
            .args()
            .set("--snapshot-every-tokens", "8")
            .set("--max-in-flight", "1");
        self.setup
            .cluster
            .start_worker(name, args.extra(&self.extra).extra(more), env)
    }

    /// The request's snapshot manifest: its generated tokens and the worker that wrote it.
    fn manifest(&self, r: &Request) -> Option<(usize, String)> {
        let p = &self.setup.pipeline;
        let prefix = request_prefix(&p.requests, &r.id, &p.replies, &serde_json::to_vec(r).expect("json"));
        let bytes = std::fs::read(self.setup.store_dir.join(prefix).join("manifest")).ok()?;
        Manifest::peek(&bytes).ok().map(|m| (m.tokens.len(), m.worker))
    }

    fn wait_committed(&self, partition: i32, position: i64) {
        self.setup.wait_committed(partition, position, Duration::from_secs(240));
    }

    fn responses(&self) -> BTreeMap<String, Vec<Response>> {
        self.setup.cluster.responses(&self.setup.pipeline.replies)
    }
}

fn chat(id: &str, content: &str) -> Request {
    serde_json::from_value(serde_json::json!({
        "id": id,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": MAX_TOKENS,
    }))
    .expect("a valid request")
}

const PROMPTS: [&str; 2] = [
    "Write a long story about a dragon who learns to bake bread.",
    "Describe a journey across a desert, in detail.",
];

/// The uninterrupted answers to [`PROMPTS`], computed once per test binary.
fn reference(prompt: &str) -> String {
    static REFERENCE: std::sync::OnceLock<HashMap<String, String>> = std::sync::OnceLock::new();
    let all = REFERENCE.get_or_init(|| {
        let engine = Engine::new(support::shared());
        PROMPTS
            .iter()
            .map(|p| {
                let r = chat("reference", p);
                let c = engine
                    .generate(engine.prepare(&r).expect("prepares"))
                    .expect("generates");
                (p.to_string(), c.text)
            })
            .collect()
    });
    all[prompt].clone()
}

/// How the evicted worker's work continues.
#[derive(Clone, Copy, PartialEq)]
enum Takeover {
    /// The other member takes the partition over.
    ByTheOther,
    /// The evicted pod is restarted under the same `--group-instance-id` and takes it back.
    ByTheRestartedPod,
}

/// The scenario of the module documentation, with `extra` flags for every worker.
fn evict_mid_generation(extra: &[&str], takeover: Takeover) {
    let fleet = Fleet::new(extra);
    let statics = takeover == Takeover::ByTheRestartedPod;
    // One after the other, each waited for until the group has given it a partition of the
    // request topic, so that the two requests land on different workers.
    let mut workers: Vec<ChildGuard> = Vec::new();
    for n in ["a", "b"] {
        let instance = format!("pod-{n}");
        let more: &[&str] = if statics {
            &["--group-instance-id", &instance]
        } else {
            &[]
        };
        let w = fleet.worker(&format!("worker-{n}"), more);
        wait_for(
            Duration::from_secs(120),
            "a partition assigned to the new worker",
            || {
                w.log()
                    .lines()
                    .any(|l| l.contains("partitions assigned") && l.contains(&fleet.setup.pipeline.requests))
                    .then_some(())
            },
        );
        workers.push(w);
    }
    let requests: Vec<Request> = PROMPTS.iter().map(|p| chat(&unique("proto"), p)).collect();
    for (p, r) in requests.iter().enumerate() {
        fleet.setup.publish(p as i32, r);
    }
    // Both generating, one on each worker: the group has settled with a partition each.
    let holders = wait_for(Duration::from_secs(180), "both requests generating", || {
        let m: Vec<(usize, String)> = requests.iter().filter_map(|r| fleet.manifest(r)).collect();
        (m.len() == 2 && m.iter().all(|(t, _)| *t >= 8)).then(|| m.into_iter().map(|(_, w)| w).collect::<Vec<_>>())
    });
    assert_ne!(holders[0], holders[1], "one worker holds both partitions: {holders:?}");
    // Evict the worker generating the first request.
    let at = workers
        .iter()
        .position(|w| w.name == holders[0])
        .expect("a holder of ours");
    let mut evicted = workers.remove(at);
    let survivor = workers[0].name.clone();
    evicted.signal("TERM");
    let status = evicted
        .wait_exit(Duration::from_secs(30))
        .expect("an evicted worker drains and exits");
    assert!(status.success(), "drained worker exit status {status}");
    let instance = format!("pod-{}", evicted.name.trim_start_matches("worker-"));
    let restarted_name = format!("{}-restarted", evicted.name);
    let _restarted = statics.then(|| fleet.worker(&restarted_name, &["--group-instance-id", &instance]));
    for p in 0..2 {
        fleet.wait_committed(p, 1);
    }
    let all = fleet.responses();
    for (r, prompt) in requests.iter().zip(PROMPTS) {
        let answers = &all[&r.id];
        for x in answers {
            assert_eq!(
                x.text,
                reference(prompt),
                "{} by {} differs from the reference",
                r.id,
                x.worker
            );
        }
    }
    let finished = all[&requests[0].id].last().expect("answered").clone();
    let expected = if statics { &restarted_name } else { &survivor };
    assert_eq!(
        &finished.worker,
        expected,
        "the evicted worker's request was finished by {}, expected {expected}:\n{}",
        finished.worker,
        workers[0].log()
    );
    assert!(
        finished.resumed_from_token.is_some(),
        "the takeover resumed from the snapshot, not from the start"
    );
}

#[test]
fn classic_eager_assignment_hands_over_an_evicted_workers_request() {
    evict_mid_generation(&["--assignment-strategy", "range"], Takeover::ByTheOther);
}

#[test]
fn classic_cooperative_sticky_assignment_hands_over_an_evicted_workers_request() {
    evict_mid_generation(&["--assignment-strategy", "cooperative-sticky"], Takeover::ByTheOther);
}

#[test]
fn static_membership_gives_an_evicted_pods_request_back_to_it_restarted() {
    evict_mid_generation(&["--session-timeout", "30s"], Takeover::ByTheRestartedPod);
}

#[test]
fn the_consumer_protocol_hands_over_an_evicted_workers_request() {
    evict_mid_generation(&["--group-protocol", "consumer"], Takeover::ByTheOther);
}

/// librdkafka 2.12 is known to fail a KIP-848 consumer fatally once `max.poll.interval.ms`
/// passes between two polls, so under `--group-protocol consumer` its limit is set out of reach
/// and `--max-poll-interval` is the worker's liveness check's alone. A worker whose consumer loop
/// stands still past `--max-poll-interval` (fault injection blocks it while librdkafka's threads
/// run on, as a stuck worker's would) and moves again within the broker's session timeout carries
/// on without leaving the group.
#[test]
fn the_consumer_protocol_survives_a_stall_past_max_poll_interval() {
    if ferry_testkit::BrokerChoice::is_mock() {
        eprintln!("skipped: the mock cluster does not speak the consumer protocol");
        return;
    }
    let fleet = Fleet::new(&[
        "--group-protocol",
        "consumer",
        "--max-poll-interval",
        "3s",
        "--revoke-timeout",
        "2s",
    ]);
    let stall = fleet.setup.cluster.dir.path().join("stall");
    let stall_env = stall.display().to_string();
    let mut w = fleet.worker_with_env("worker-a", &[], &[("FERRY_FAULT_STALL_POLL_FILE", &stall_env)]);
    let first = chat(&unique("stall"), "Say hello.");
    fleet.setup.publish(0, &first);
    fleet.wait_committed(0, 1);
    std::fs::write(&stall, b"").expect("stall file");
    wait_for(Duration::from_secs(30), "the consumer loop to stall", || {
        w.log()
            .contains("fault injection: the consumer loop stalls")
            .then_some(())
    });
    // Past --max-poll-interval, within the test broker's 10 s consumer session timeout.
    std::thread::sleep(Duration::from_secs(6));
    std::fs::remove_file(&stall).expect("stall file removed");
    let second = chat(&unique("stall"), "Name a colour.");
    fleet.setup.publish(0, &second);
    fleet.wait_committed(0, 2);
    assert!(
        w.wait_exit(Duration::ZERO).is_none(),
        "the worker died after the stall:\n{}",
        w.log()
    );
    let all = fleet.responses();
    assert!(all.contains_key(&first.id) && all.contains_key(&second.id));
    // The guard: librdkafka's own limit is out of reach, so the stall cost no leave and no
    // rebalance (without it, librdkafka logs PollExceeded and revokes everything).
    let log = w.log();
    assert!(
        !log.contains("PollExceeded") && !log.contains("partitions revoked"),
        "the stall made the worker leave the group:\n{log}"
    );
}
