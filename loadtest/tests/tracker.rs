//! The load side against a real Kafka-protocol broker, with the test playing the worker: it reads
//! the request topic with a plain consumer and writes chunks, responses, duplicates and error
//! replies to the reply topic, then checks what the tracker recorded, what the load loops sent,
//! and what the report makes of it.
//!
//! The tests share one real Apache Kafka (`ferry broker --kafka`, started by the first test,
//! stopped when the test binary exits) and create random topics on it with the admin API; with
//! `FERRY_TEST_BOOTSTRAP_SERVERS` set they use that cluster instead, and with
//! `FERRY_TEST_BROKER=mock` each starts its own `ferry broker` (librdkafka's mock cluster).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_loadtest::load::{self, drive, Limit, LoadSpec, Mode};
use ferry_loadtest::metrics::Report;
use ferry_loadtest::prompts::PromptSet;
use ferry_loadtest::track::Tracker;
use ferry_schemas::{
    Chunk, ErrorCode, ErrorDetail, ErrorReply, FinishReason, Reply, Request, Response, Timings, Usage,
};
use ferry_testkit::{unique, Cluster};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

const PARTITIONS: i32 = 3;

/// A broker with the test's topics, each of `PARTITIONS` partitions (see `ferry_testkit::Cluster`).
fn start_cluster(topics: &[&str]) -> Cluster {
    Cluster::start_with_partitions(topics, PARTITIONS)
}

fn producer(cluster: &Cluster) -> BaseProducer {
    ClientConfig::new()
        .set("bootstrap.servers", &cluster.bootstrap)
        .set("enable.idempotence", "true")
        .create()
        .expect("producer")
}

/// Publishes raw bytes keyed by `key` and waits until the broker has them.
fn publish(producer: &BaseProducer, topic: &str, key: &str, payload: &[u8]) {
    producer
        .send(BaseRecord::to(topic).key(key).payload(payload))
        .map_err(|(e, _)| e)
        .expect("queued");
    producer.flush(Duration::from_secs(10)).expect("delivered");
}

/// What the fake worker does with a request.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Behaviour {
    /// Chunks (for a streamed request) then one response.
    Answer,
    /// Like `Answer`, then the same response again: a redelivered request answered twice.
    AnswerTwice,
    /// Chunk 0, chunk 0 again (a resumed stream resends it), chunk 1, then the response.
    ResendChunk,
    /// An `engine_error` reply.
    Refuse,
    /// Nothing at all: a lost request.
    Ignore,
}

fn response(request: &Request, text: &str) -> Reply {
    Reply::Response(Response {
        version: 1,
        id: request.id.clone(),
        model: "fake".into(),
        text: text.into(),
        finish_reason: FinishReason::Length,
        stop_sequence: None,
        usage: Usage {
            prompt_tokens: 5,
            completion_tokens: 2,
            total_tokens: 7,
        },
        timings: Timings {
            queued_ms: 3.0,
            prefill_ms: 1.0,
            decode_ms: 2.0,
            total_ms: 3.0,
        },
        worker: "fake-worker".into(),
        attempt: 1,
        resumed_from_token: None,
        metadata: None,
    })
}

fn chunk(request: &Request, seq: u32, text: &str) -> Reply {
    Reply::Chunk(Chunk {
        version: 1,
        id: request.id.clone(),
        seq,
        text: text.into(),
    })
}

/// The replies for `request`, in order.
fn replies(request: &Request, behaviour: Behaviour) -> Vec<Reply> {
    let mut out = Vec::new();
    if request.stream && behaviour != Behaviour::Ignore && behaviour != Behaviour::Refuse {
        out.push(chunk(request, 0, "Hel"));
        if behaviour == Behaviour::ResendChunk {
            out.push(chunk(request, 0, "Hel"));
        }
        out.push(chunk(request, 1, "lo"));
    }
    match behaviour {
        Behaviour::Answer | Behaviour::ResendChunk => out.push(response(request, "Hello")),
        Behaviour::AnswerTwice => out.extend([response(request, "Hello"), response(request, "Hello")]),
        Behaviour::Refuse => out.push(Reply::Error(ErrorReply {
            version: 1,
            id: request.id.clone(),
            error: ErrorDetail {
                code: ErrorCode::EngineError,
                message: "the fake worker refuses".into(),
            },
            worker: "fake-worker".into(),
            attempt: 1,
            metadata: None,
        })),
        Behaviour::Ignore => {}
    }
    out
}

/// A worker played by the test: reads every request from the start of `topic` and answers each
/// `delay` after it arrived, as `behave` says. Records the most requests it held at once.
struct FakeWorker {
    stop: Arc<AtomicBool>,
    max_pending: Arc<Mutex<usize>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeWorker {
    fn start(
        cluster: &Cluster,
        topic: &str,
        delay: Duration,
        behave: impl Fn(&Request) -> Behaviour + Send + 'static,
    ) -> FakeWorker {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &cluster.bootstrap)
            .set("group.id", unique("fake-worker"))
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        for p in 0..PARTITIONS {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .expect("partition");
        }
        consumer.assign(&tpl).expect("assign");
        let producer = producer(cluster);
        let (stop, max_pending) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(0)));
        let thread = {
            let (stop, max_pending) = (stop.clone(), max_pending.clone());
            std::thread::spawn(move || {
                let mut pending: Vec<(Instant, Request)> = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    if let Some(Ok(m)) = consumer.poll(Duration::from_millis(20)) {
                        let request: Request =
                            serde_json::from_slice(m.payload().unwrap_or_default()).expect("a valid request");
                        assert_eq!(m.key(), Some(request.id.as_bytes()), "requests are keyed by id");
                        pending.push((Instant::now() + delay, request));
                        let mut max = max_pending.lock().expect("lock");
                        *max = (*max).max(pending.len());
                    }
                    let now = Instant::now();
                    for (_, request) in pending.extract_if(.., |(due, _)| *due <= now) {
                        let reply_to = request.reply_to.clone().expect("requests name their reply topic");
                        for reply in replies(&request, behave(&request)) {
                            let payload = serde_json::to_vec(&reply).expect("replies serialise");
                            producer
                                .send(BaseRecord::to(&reply_to).key(&request.id).payload(&payload))
                                .map_err(|(e, _)| e)
                                .expect("queued");
                        }
                    }
                    producer.poll(Duration::ZERO);
                }
                producer.flush(Duration::from_secs(10)).expect("flushed");
            })
        };
        FakeWorker {
            stop,
            max_pending,
            thread: Some(thread),
        }
    }

    fn max_pending(&self) -> usize {
        *self.max_pending.lock().expect("lock")
    }
}

impl Drop for FakeWorker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() && !std::thread::panicking() {
                panic!("the fake worker panicked");
            }
        }
    }
}

async fn start_tracker(cluster: &Cluster, replies: &str, t0: Instant) -> Tracker {
    let (bootstrap, replies) = (cluster.bootstrap.clone(), replies.to_string());
    tokio::task::spawn_blocking(move || Tracker::start(&bootstrap, &replies, t0))
        .await
        .expect("tracker task")
        .expect("tracker starts")
}

/// Waits for `done` with a deadline, re-checking whenever an answer comes (or every 100 ms).
async fn eventually(tracker: &Tracker, what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        let _ = tokio::time::timeout(Duration::from_millis(100), tracker.next_answer()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracker_records_every_reply_and_the_report_counts_them() {
    let (requests, replies_topic) = (unique("lt-requests"), unique("lt-replies"));
    let cluster = start_cluster(&[&requests, &replies_topic]);
    let prompts = PromptSet::default_set();
    let id = |n: usize| load::request_id("trk", n);
    // A reply already on the topic before the tracker starts must not be taken for an answer.
    let producer = producer(&cluster);
    let stale = prompts.request(0, id(1), 0, false, &replies_topic);
    let stale_reply = serde_json::to_vec(&response(&stale, "stale")).expect("serialise");
    publish(&producer, &replies_topic, &id(1), &stale_reply);

    let t0 = Instant::now();
    let tracker = start_tracker(&cluster, &replies_topic, t0).await;
    let behaviours = [
        Behaviour::Answer,
        Behaviour::Answer,
        Behaviour::AnswerTwice,
        Behaviour::Refuse,
        Behaviour::Ignore,
        Behaviour::ResendChunk,
    ];
    let by_id: HashMap<String, Behaviour> = behaviours.iter().enumerate().map(|(n, &b)| (id(n), b)).collect();
    let _worker = FakeWorker::start(&cluster, &requests, Duration::ZERO, move |r| by_id[&r.id]);
    for n in 0..behaviours.len() {
        let stream = n == 0 || n == 5;
        let request = prompts.request(n, id(n), 100 + n as u64, stream, &replies_topic);
        tracker.publish(&requests, request, n).await.expect("published");
    }
    let again = prompts.request(0, id(0), 0, false, &replies_topic);
    assert!(
        tracker.publish(&requests, again, 0).await.is_err(),
        "an id is sent once"
    );
    // Replies for someone else's request, and a message that is no reply at all.
    let foreign = prompts.request(0, "someone-else".into(), 0, false, &replies_topic);
    let foreign_reply = serde_json::to_vec(&response(&foreign, "not ours")).expect("serialise");
    publish(&producer, &replies_topic, "someone-else", &foreign_reply);
    publish(&producer, &replies_topic, "junk", b"not json");

    assert!(
        tracker.wait_for(&id(5), Duration::from_secs(30)).await,
        "request 5 answered"
    );
    eventually(&tracker, "five answers, the duplicate and the ignored messages", || {
        let records = tracker.records();
        tracker.answered_count() == 5 && records[2].responses.len() == 2 && tracker.ignored_counts() == (1, 1)
    })
    .await;
    assert!(
        !tracker.wait_answered(Duration::from_millis(300)).await,
        "request 4 is never answered"
    );
    assert_eq!(
        (tracker.sent_count(), tracker.unanswered(), tracker.errors_count()),
        (6, 1, 1)
    );
    assert_eq!(tracker.publish_failures(), 0);

    let records = tracker.records();
    let ids: Vec<&str> = records.iter().map(|r| r.request.id.as_str()).collect();
    assert_eq!(ids, (0..6).map(id).collect::<Vec<_>>());
    for (n, r) in records.iter().enumerate() {
        assert_eq!(r.prompt_index, n);
        assert!(r.sent_ms >= 0.0 && r.sent_ms <= t0.elapsed().as_secs_f64() * 1000.0);
    }
    let seqs = |n: usize| records[n].chunks.iter().map(|c| c.seq).collect::<Vec<_>>();
    assert_eq!(seqs(0), [0, 1]);
    assert_eq!(seqs(5), [0, 0, 1], "a resent chunk is recorded as it came");
    assert!(records[1].chunks.is_empty(), "no chunks without stream");
    assert_eq!(records[1].responses.len(), 1, "the stale reply was not read");
    assert_eq!(records[1].responses[0].response.text, "Hello");
    assert_eq!(records[2].responses.len(), 2);
    assert_eq!(records[3].errors.len(), 1);
    assert_eq!(records[3].errors[0].error.error.code, ErrorCode::EngineError);
    assert!(records[4].answered_ms().is_none());
    assert_eq!(tracker.record(&id(3)).map(|r| r.errors.len()), Some(1));

    let report = Report::build(&records, &[], t0.elapsed());
    let c = &report.counts;
    assert_eq!(
        (c.sent, c.answered, c.responses, c.errors, c.unanswered),
        (6, 5, 4, 1, 1)
    );
    assert_eq!((c.duplicate_replies, c.streamed, c.chunks), (1, 2, 5));
    assert_eq!((report.tokens.count, report.tokens.p50), (4, Some(2.0)));
    assert_eq!(report.time_to_first_token_ms.count, 2);
    // Percentiles come from the histogram: within 0.1% of the value.
    assert!(
        report.queue_wait_ms.p99.is_some_and(|v| (v - 3.0).abs() < 0.01),
        "{:?}",
        report.queue_wait_ms
    );
    let table = report.summary_table();
    assert!(
        table.contains("6 sent, 5 answered (4 responses, 1 errors), 1 unanswered, 1 duplicate final replies"),
        "{table}"
    );
    assert!(table.contains("engine_error 1"), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_keeps_its_concurrency() {
    let (requests, replies_topic) = (unique("lt-requests"), unique("lt-replies"));
    let cluster = start_cluster(&[&requests, &replies_topic]);
    let prompts = PromptSet::default_set();
    let t0 = Instant::now();
    let tracker = start_tracker(&cluster, &replies_topic, t0).await;
    // Each answer takes a while, so the loop's callers overlap at the worker.
    let worker = FakeWorker::start(&cluster, &requests, Duration::from_millis(300), |_| Behaviour::Answer);
    let spec = LoadSpec {
        mode: Mode::Closed { concurrency: 2 },
        limit: Limit::Requests(7),
        seed: 3,
        stream: false,
    };
    let sent = drive(&spec, &prompts, &tracker, &requests, &replies_topic, "cl", None)
        .await
        .expect("drive");
    assert_eq!(sent, 7);
    assert!(tracker.wait_answered(Duration::from_secs(30)).await);
    assert!(
        worker.max_pending() <= 2,
        "{} requests in flight at once",
        worker.max_pending()
    );

    let mut records = tracker.records();
    records.sort_by(|a, b| a.request.id.cmp(&b.request.id));
    for (n, r) in records.iter().enumerate() {
        assert_eq!(r.request.id, load::request_id("cl", n));
        assert_eq!(r.prompt_index, load::prompt_index(3, n, prompts.len()));
        assert_eq!(r.request.reply_to.as_deref(), Some(replies_topic.as_str()));
        let own_seed = prompts.get(r.prompt_index).as_request().seed;
        assert_eq!(r.request.seed, Some(own_seed.unwrap_or(load::request_seed(3, n))));
    }
    // Latency includes the worker's 300 ms.
    let report = Report::build(&records, &[], t0.elapsed());
    assert!(
        report.latency_ms.min.is_some_and(|m| m >= 290.0),
        "{:?}",
        report.latency_ms
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_sends_on_schedule_and_streams() {
    let (requests, replies_topic) = (unique("lt-requests"), unique("lt-replies"));
    let cluster = start_cluster(&[&requests, &replies_topic]);
    let prompts = PromptSet::default_set();
    let t0 = Instant::now();
    let tracker = start_tracker(&cluster, &replies_topic, t0).await;
    let _worker = FakeWorker::start(&cluster, &requests, Duration::ZERO, |_| Behaviour::Answer);
    let spec = LoadSpec {
        mode: Mode::Open { rate_per_s: 40.0 },
        limit: Limit::Requests(12),
        seed: 8,
        stream: true,
    };
    let started = Instant::now();
    let sent = drive(&spec, &prompts, &tracker, &requests, &replies_topic, "ol", None)
        .await
        .expect("drive");
    assert_eq!(sent, 12);
    // The last request is not sent before its scheduled arrival.
    let last = load::poisson_arrivals(40.0, 8).nth(11).expect("an arrival");
    assert!(started.elapsed() >= last, "{:?} < {last:?}", started.elapsed());
    assert!(tracker.wait_answered(Duration::from_secs(30)).await);
    let records = tracker.records();
    assert!(records
        .iter()
        .all(|r| r.request.stream && r.chunks.len() == 2 && r.responses.len() == 1));
    let report = Report::build(&records, &[], t0.elapsed());
    assert_eq!(report.time_to_first_token_ms.count, 12);
    assert_eq!(report.counts.answered, 12);
    assert_eq!(report.per_second.iter().map(|s| s.answers).sum::<usize>(), 12);
}
