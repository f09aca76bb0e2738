//! Churn: several worker processes share a three-partition request topic under steady load while
//! the fleet changes under them: a worker joins, one is evicted (SIGTERM, graceful drain), one
//! crashes (SIGKILL) in the middle of a generation, and replacements join. No request is lost,
//! every answer to a request is the uninterrupted one, and duplicates, which at-least-once
//! delivery allows, are counted and reported.
//!
//! On `ferry broker`, duplicates are common: the mock group refuses commits while it rebalances,
//! and a worker that is generating does not rejoin until it finishes, so an answer that lands
//! during a rebalance is not committed and its request is generated again.
//!
//! Limit: the churn is driven by what the test can see from outside (a snapshot manifest names
//! the worker generating a request), so it checks the guarantee for this schedule, not for every
//! interleaving; the model's speed and the group's rebalances vary the rest from run to run.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use ferry_schemas::{Reply, Request, Response};
use ferry_testkit::{wait_for, ChildGuard, Cluster, Setup, WorkerArgs};
use ferry_worker::config::DRAIN_MARGIN;
use ferry_worker::engine::Engine;
use ferry_worker::snapshot::format::{request_prefix, Manifest};

/// Requests published in the run.
const REQUESTS: usize = 12;
/// Partitions of every topic, so that up to three workers share the requests.
const PARTITIONS: i32 = 3;
/// Time between two published requests: a steady trickle rather than one burst.
const PACE: Duration = Duration::from_millis(400);
/// The workers' drain deadline; a worker sent SIGTERM must exit within it, plus `DRAIN_MARGIN`.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Snapshot interval, in tokens. A generation is "in flight" for the test once its first
/// snapshot exists, so a worker is evicted or killed only with work worth resuming.
const SNAPSHOT_EVERY: usize = 8;

const PROMPTS: [&str; REQUESTS] = [
    "Write a short poem about the sea.",
    "Explain what a compiler does, in simple words.",
    "List three uses of a paperclip.",
    "Tell me a story about a lighthouse keeper.",
    "What is the capital of France, and why is it famous?",
    "The sun rose slowly over the mountains, and",
    "Give advice to someone learning to cook.",
    "Why do cats purr?",
    "Write a letter to a friend about a trip to the forest.",
    "Summarise the water cycle.",
    "Invent a new board game and explain its rules.",
    "A good teacher is someone who",
];

/// The `i`th request: even ones greedy, odd ones sampled under an explicit seed; every third a
/// raw prompt rather than a chat; `max_tokens` spread over 32..=64.
fn request(i: usize) -> Request {
    let max_tokens = 32 + (i * 17) % 33;
    let mut json = serde_json::json!({ "id": format!("churn-{i:02}"), "max_tokens": max_tokens });
    if i % 3 == 2 {
        json["prompt"] = PROMPTS[i].into();
    } else {
        json["messages"] = serde_json::json!([{"role": "user", "content": PROMPTS[i]}]);
    }
    if i % 2 == 1 {
        json["temperature"] = (0.6 + 0.1 * (i % 4) as f64).into();
        json["top_p"] = 0.95.into();
        json["seed"] = (1_000 + 7 * i as u64).into();
    }
    serde_json::from_value(json).expect("a valid request")
}

/// What a snapshot manifest in the file store says, read straight from the file: who wrote it
/// and how many tokens it holds. `None` while there is no manifest (or it is being replaced).
fn manifest(store: &Path, prefix: &str) -> Option<(String, usize)> {
    let m = Manifest::peek(&std::fs::read(store.join(prefix).join("manifest")).ok()?).ok()?;
    Some((m.worker, m.tokens.len()))
}

/// The worker processes of the test, by name. Dropping it kills every one still running; on a
/// failing test, every worker's log is printed, the stopped ones' too.
struct Fleet<'a> {
    cluster: &'a Cluster,
    args: WorkerArgs,
    alive: Vec<ChildGuard>,
    /// Workers that have exited, kept for their logs.
    gone: Vec<ChildGuard>,
}

impl Fleet<'_> {
    fn join(&mut self, name: &str) {
        self.alive.push(self.cluster.start_worker(name, self.args.clone(), &[]));
        eprintln!("{name} joins");
    }

    fn take(&mut self, name: &str) -> ChildGuard {
        let i = self
            .alive
            .iter()
            .position(|w| w.name == name)
            .unwrap_or_else(|| panic!("{name} is not running"));
        assert!(self.alive.len() > 1, "the test must keep at least one worker alive");
        self.alive.swap_remove(i)
    }

    /// SIGTERMs `workers` together; each must drain and exit 0 within its drain deadline.
    fn stop(&mut self, workers: Vec<ChildGuard>) {
        let t = Instant::now();
        for w in &workers {
            w.signal("TERM");
        }
        for mut w in workers {
            // The drain deadline, plus the margin the worker keeps for leaving the group and exiting.
            let status = w.wait_exit((DRAIN_TIMEOUT + DRAIN_MARGIN).saturating_sub(t.elapsed()));
            let name = w.name.clone();
            self.gone.push(w);
            let status = status.unwrap_or_else(|| panic!("{name} did not exit within the drain timeout"));
            assert!(status.success(), "{name} exited with {status} after SIGTERM");
            eprintln!("{name} drained and exited within {:?}", t.elapsed());
        }
    }

    fn evict(&mut self, name: &str) {
        let w = self.take(name);
        self.stop(vec![w]);
    }

    /// SIGKILL: the worker dies at once, its work uncommitted.
    fn kill(&mut self, name: &str) {
        let w = self.take(name);
        w.signal("KILL");
        self.gone.push(w);
        eprintln!("{name} killed");
    }

    /// Stops every worker still running, gracefully.
    fn stop_all(&mut self) {
        let all = std::mem::take(&mut self.alive);
        self.stop(all);
    }

    /// Fails the test at once if a worker that should be running has exited (a bad flag, a
    /// crash), rather than after a deadline that waits for its work.
    fn check_alive(&mut self) {
        for w in &mut self.alive {
            if let Some(status) = w.wait_exit(Duration::ZERO) {
                panic!("{} exited on its own with {status}", w.name);
            }
        }
    }

    /// A request some live worker is generating, with at least `min_tokens` in its snapshot:
    /// (worker, request id, tokens). The one furthest along, so the interruption has work to
    /// save.
    fn busy(
        &self,
        store: &Path,
        prefixes: &HashMap<String, String>,
        min_tokens: usize,
    ) -> Option<(String, String, usize)> {
        prefixes
            .iter()
            .filter_map(|(prefix, id)| manifest(store, prefix).map(|(w, n)| (w, id.clone(), n)))
            .filter(|(w, _, n)| *n >= min_tokens && self.alive.iter().any(|a| &a.name == w))
            .max_by_key(|(_, _, n)| *n)
    }
}

#[test]
fn a_churning_fleet_loses_no_request_and_never_answers_one_two_ways() {
    let started = Instant::now();
    let batch: Vec<Request> = (0..REQUESTS).map(request).collect();

    // The uninterrupted answers, computed in this process with the worker's default weights.
    let engine = Engine::new(support::shared());
    let expected: HashMap<String, (String, usize)> = batch
        .iter()
        .map(|r| {
            let c = engine
                .generate(engine.prepare(r).expect("prepares"))
                .expect("generates");
            assert!(
                c.tokens.len() >= SNAPSHOT_EVERY,
                "{}: {} tokens are too few to interrupt",
                r.id,
                c.tokens.len()
            );
            (r.id.clone(), (c.text, c.tokens.len()))
        })
        .collect();
    eprintln!("{REQUESTS} reference answers in {:?}", started.elapsed());

    let setup = Setup::new(PARTITIONS);
    let (cluster, store) = (&setup.cluster, &setup.store_dir);
    let p = &setup.pipeline;
    let (requests, replies, group, dlq) = (&p.requests, &p.replies, &p.group, &p.dlq);
    let prefixes: HashMap<String, String> = batch
        .iter()
        .map(|r| {
            (
                request_prefix(requests, &r.id, replies, &serde_json::to_vec(r).expect("json")),
                r.id.clone(),
            )
        })
        .collect();
    let (every, drain) = (SNAPSHOT_EVERY.to_string(), format!("{}s", DRAIN_TIMEOUT.as_secs()));
    let args = setup
        .args()
        .set("--snapshot-every-tokens", every)
        .set("--session-timeout", "6s");
    // Several requests in flight per worker: revocations and drains suspend several at once,
    // and answers finish out of order.
    let args = args.set("--drain-timeout", drain).set("--max-in-flight", "3");
    let mut fleet = Fleet {
        cluster,
        args,
        alive: Vec::new(),
        gone: Vec::new(),
    };
    fleet.join("worker-a");
    fleet.join("worker-b");

    std::thread::scope(|s| {
        let publisher = s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let producer = cluster.producer();
            for r in &batch {
                let payload = serde_json::to_vec(r).expect("json");
                rt.block_on(cluster.publish(&producer, requests, &r.id, &payload));
                std::thread::sleep(PACE);
            }
        });

        // A third worker joins once the first two are at work.
        wait_for(Duration::from_secs(90), "a first generation", || {
            fleet.check_alive();
            fleet.busy(store, &prefixes, 1)
        });
        fleet.join("worker-c");

        // One worker is evicted mid-generation, and a replacement joins.
        let (victim, id, tokens) = wait_for(Duration::from_secs(90), "a generation to evict", || {
            fleet.check_alive();
            fleet.busy(store, &prefixes, SNAPSHOT_EVERY)
        });
        eprintln!("evicting {victim}, generating {id} ({tokens} tokens in its snapshot)");
        fleet.evict(&victim);
        fleet.join("worker-d");

        // Another crashes mid-generation, and a replacement joins.
        let (victim, id, tokens) = wait_for(Duration::from_secs(90), "a generation to crash", || {
            fleet.check_alive();
            fleet.busy(store, &prefixes, SNAPSHOT_EVERY)
        });
        eprintln!("killing {victim}, generating {id} ({tokens} tokens in its snapshot)");
        fleet.kill(&victim);
        fleet.join("worker-e");

        publisher.join().expect("the publisher");
    });

    // Every request is answered and committed, on every partition. On a timeout the committed
    // offsets say which partitions were left behind.
    let reader = cluster.reader(group);
    let highs = cluster.high_watermarks(&reader, requests);
    assert_eq!(highs.iter().sum::<i64>(), REQUESTS as i64, "published {highs:?}");
    let deadline = Instant::now() + Duration::from_secs(150);
    loop {
        fleet.check_alive();
        let committed: Vec<Option<i64>> = (0..highs.len() as i32)
            .map(|p| cluster.committed_in(&reader, requests, p))
            .collect();
        if highs
            .iter()
            .zip(&committed)
            .all(|(&high, c)| high == 0 || c.is_some_and(|c| c >= high))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every request was committed in time: per partition, committed {committed:?} of {highs:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Stop the survivors gracefully, so that a reply still on its way is in the topic when it is
    // read, and the last drains are checked too.
    fleet.stop_all();

    let dead = cluster.read_all_partitions(dlq);
    assert!(dead.is_empty(), "requests were dead-lettered: {dead:?}");
    let mut answers: BTreeMap<String, Vec<Response>> = BTreeMap::new();
    for (_, key, body, _) in cluster.read_all_partitions(replies) {
        let reply: Reply = serde_json::from_slice(&body).unwrap_or_else(|e| panic!("not a reply ({e}): {key}"));
        match reply {
            Reply::Response(r) => answers.entry(r.id.clone()).or_default().push(r),
            Reply::Error(e) => panic!("{} answered with an error: {:?}", e.id, e.error),
            Reply::Chunk(c) => panic!("{} got a chunk, but it did not ask to stream", c.id),
        }
    }
    let mut duplicates = 0;
    for (id, responses) in &answers {
        let (text, tokens) = expected
            .get(id)
            .unwrap_or_else(|| panic!("a reply to an unknown request {id}"));
        let mut texts: Vec<&str> = responses.iter().map(|r| r.text.as_str()).collect();
        texts.sort_unstable();
        texts.dedup();
        assert_eq!(
            texts.len(),
            1,
            "{id} was answered with {} different texts: {texts:#?}",
            texts.len()
        );
        for r in responses {
            assert_eq!(
                (&r.text, r.usage.completion_tokens as usize),
                (text, *tokens),
                "{id}: the answer of {} (attempt {}, resumed from {:?}) differs from the uninterrupted one",
                r.worker,
                r.attempt,
                r.resumed_from_token
            );
        }
        duplicates += responses.len() - 1;
        // Each answer as worker#attempt, with @token when it resumed from a snapshot.
        let how: Vec<String> = responses
            .iter()
            .map(|r| {
                format!(
                    "{}#{}{}",
                    r.worker,
                    r.attempt,
                    r.resumed_from_token.map_or(String::new(), |t| format!("@{t}"))
                )
            })
            .collect();
        eprintln!("  {id}: {}", how.join(", "));
    }
    let lost: Vec<&String> = batch
        .iter()
        .map(|r| &r.id)
        .filter(|id| !answers.contains_key(*id))
        .collect();
    assert!(lost.is_empty(), "requests never answered: {lost:?}");
    let resumed = answers
        .values()
        .flatten()
        .filter(|r| r.resumed_from_token.is_some())
        .count();
    eprintln!(
        "churn summary: requests={REQUESTS} answered={} duplicates={duplicates} resumed={resumed} elapsed={:?}",
        answers.len(),
        started.elapsed()
    );
}
