//! Publishing requests and reading every reply to them: the load generator's only contact with
//! the workers.
//!
//! A [`Tracker`] owns an idempotent producer and one consumer of the reply topic. The consumer
//! joins no group and commits nothing: [`Tracker::start`] reads the high watermark of every
//! partition and assigns each at exactly that offset before it returns, so a reply to any request
//! published afterwards is at or beyond those offsets and is read, whichever partition it lands
//! on. Replies are matched to requests by the `id` in their body and recorded with the time they
//! arrived, chunks, responses and error replies alike, duplicates included: the harness reports
//! what the fleet did, it does not tidy it up.
//!
//! A reply can arrive before the broker's acknowledgement of its request reaches us (a fast worker
//! on a busy producer), so a request is registered as pending before it is sent and replies to a
//! pending id are kept until its record exists. Replies to ids never sent by this tracker (other
//! clients sharing the reply topic) are counted and dropped.
//!
//! The limit: the consumer reads the whole reply topic. That is what a load generator wants (one
//! consumer for thousands of requests), but a shared reply topic busy with other traffic costs it
//! the bandwidth of that traffic too; give a load test a reply topic of its own.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use ferry_schemas::{headers, Reply, Request};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio::sync::watch;

use crate::record::{ChunkSeen, ErrorSeen, RequestRecord, ResponseSeen};

/// How long [`Tracker::start`] keeps asking for the reply topic's partitions and offsets: a topic
/// created a moment ago may still be electing its leaders.
const METADATA_WAIT: Duration = Duration::from_secs(30);
/// How long the reader thread blocks in one poll; also how quickly it notices it should stop.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Publishes requests and records every reply to them. Cheap to clone: clones share one producer,
/// one consumer and one set of records. The consumer stops when the last clone is dropped.
#[derive(Clone)]
pub struct Tracker {
    inner: Arc<Inner>,
}

struct Inner {
    producer: FutureProducer,
    shared: Arc<Shared>,
    /// The thread polling the reply consumer; joined on drop.
    reader: Option<JoinHandle<()>>,
}

/// What the reader thread and the publishers share.
struct Shared {
    t0: Instant,
    state: Mutex<State>,
    stop: AtomicBool,
    /// The number of answered requests, so that waiters wake when it changes.
    answered: watch::Sender<usize>,
}

#[derive(Default)]
struct State {
    records: Vec<RequestRecord>,
    /// Index into `records` by request id.
    index: HashMap<String, usize>,
    /// Requests being published, with any replies that beat their acknowledgement.
    pending: HashMap<String, Vec<(Reply, f64)>>,
    /// Requests with at least one final reply.
    answered: usize,
    /// Requests whose first final reply was an error.
    errored: usize,
    publish_failures: usize,
    /// Replies for ids this tracker never sent.
    foreign: usize,
    /// Messages on the reply topic that are not valid replies.
    invalid: usize,
}

impl Tracker {
    /// Connects to `bootstrap`, assigns every partition of `reply_topic` at its current end and
    /// starts reading replies. Times are recorded in milliseconds since `t0`. Blocks the calling
    /// thread for the metadata requests (milliseconds on a healthy cluster, up to 30 s while the
    /// topic's leaders are unknown).
    pub fn start(bootstrap: &str, reply_topic: &str, t0: Instant) -> anyhow::Result<Tracker> {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("enable.idempotence", "true")
            .set("linger.ms", "1")
            .create()
            .context("cannot create the Kafka producer")?;
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            // `assign` needs a group id, but this consumer never joins or commits to the group.
            .set("group.id", format!("ferry-loadtest-{}", uuid::Uuid::new_v4().simple()))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // What a caller sees: records of aborted transactions never, committed ones once.
            .set("isolation.level", "read_committed")
            // Time to first token and recovery are measured from arrival times: without this,
            // librdkafka's default 500 ms fetch wait would batch chunks to within half a second.
            .set("fetch.wait.max.ms", "20")
            .create()
            .context("cannot create the Kafka consumer")?;
        assign_at_end(&consumer, reply_topic)?;
        let (answered, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            t0,
            state: Mutex::new(State::default()),
            stop: AtomicBool::new(false),
            answered,
        });
        let reader = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("ferry-loadtest-replies".into())
                .spawn(move || read_replies(&consumer, &shared))
                .context("cannot start the reply reader thread")?
        };
        Ok(Tracker {
            inner: Arc::new(Inner {
                producer,
                shared,
                reader: Some(reader),
            }),
        })
    }

    /// The instant that times are measured from.
    pub fn t0(&self) -> Instant {
        self.inner.shared.t0
    }

    /// Milliseconds since [`Tracker::t0`].
    pub fn now_ms(&self) -> f64 {
        self.inner.shared.now_ms()
    }

    /// Publishes `request` to `topic` as JSON keyed by its id and waits for the broker's
    /// acknowledgement, which is when its record is created with `sent_ms`. An id this tracker
    /// has already sent is refused, since its replies could not be told apart. Dropping the
    /// returned future before it completes forgets the request, even if the broker gets it.
    pub async fn publish(&self, topic: &str, request: Request, prompt_index: usize) -> anyhow::Result<()> {
        let shared = &self.inner.shared;
        let payload = serde_json::to_vec(&request).context("cannot serialise the request")?;
        {
            let mut state = shared.lock();
            if state.index.contains_key(&request.id) || state.pending.contains_key(&request.id) {
                bail!("request id {} was already sent", request.id);
            }
            state.pending.insert(request.id.clone(), Vec::new());
        }
        let version = request.version.to_string();
        let record = FutureRecord::to(topic)
            .key(request.id.as_bytes())
            .payload(&payload)
            .headers(OwnedHeaders::new().insert(Header {
                key: headers::SCHEMA_VERSION,
                value: Some(&version),
            }));
        // Waiting without limit for room in the producer's queue is right for a load generator:
        // the delivery itself is bounded by librdkafka's `message.timeout.ms`.
        let result = self.inner.producer.send(record, Timeout::Never).await;
        let at_ms = shared.now_ms();
        let mut state = shared.lock();
        let early = state.pending.remove(&request.id).unwrap_or_default();
        if let Err((error, _)) = result {
            state.publish_failures += 1;
            return Err(anyhow!(error).context(format!("request {} was not delivered to {topic}", request.id)));
        }
        let id = request.id.clone();
        let index = state.records.len();
        state.index.insert(id.clone(), index);
        state.records.push(RequestRecord::new(request, prompt_index, at_ms));
        let mut newly_answered = false;
        for (reply, at) in early {
            newly_answered |= state.apply(&id, reply, at);
        }
        let answered = state.answered;
        drop(state);
        if newly_answered {
            shared.answered.send_replace(answered);
        }
        Ok(())
    }

    /// A copy of every record, in the order the requests were acknowledged.
    pub fn records(&self) -> Vec<RequestRecord> {
        self.inner.shared.lock().records.clone()
    }

    /// The record of one request, if it was sent.
    pub fn record(&self, id: &str) -> Option<RequestRecord> {
        let state = self.inner.shared.lock();
        state.index.get(id).map(|&i| state.records[i].clone())
    }

    /// Requests acknowledged by the broker.
    pub fn sent_count(&self) -> usize {
        self.inner.shared.lock().records.len()
    }

    /// Requests with a final reply (a response or an error reply).
    pub fn answered_count(&self) -> usize {
        self.inner.shared.lock().answered
    }

    /// Requests whose first final reply was an error reply.
    pub fn errors_count(&self) -> usize {
        self.inner.shared.lock().errored
    }

    /// Requests sent but without a final reply yet.
    pub fn unanswered(&self) -> usize {
        let state = self.inner.shared.lock();
        state.records.len() - state.answered
    }

    /// Requests that could not be published.
    pub fn publish_failures(&self) -> usize {
        self.inner.shared.lock().publish_failures
    }

    /// Messages on the reply topic for ids this tracker never sent, and messages that are not
    /// replies at all.
    pub fn ignored_counts(&self) -> (usize, usize) {
        let state = self.inner.shared.lock();
        (state.foreign, state.invalid)
    }

    /// Whether request `id` has a final reply.
    pub fn is_answered(&self, id: &str) -> bool {
        self.inner.shared.lock().is_answered(id)
    }

    /// Waits until every sent request has a final reply; false if `timeout` passes first.
    pub async fn wait_answered(&self, timeout: Duration) -> bool {
        self.wait_until(timeout, |t| t.unanswered() == 0).await
    }

    /// Waits until request `id` has a final reply; false if `timeout` passes first.
    pub async fn wait_for(&self, id: &str, timeout: Duration) -> bool {
        self.wait_until(timeout, |t| t.is_answered(id)).await
    }

    /// Waits until one more request is answered than when it was called. To wait without missing
    /// an answer that comes between a check and the call, subscribe with [`Tracker::answers`].
    pub async fn next_answer(&self) {
        let mut rx = self.answers();
        // The sender lives as long as the tracker, so this only returns on a change.
        let _ = rx.changed().await;
    }

    /// A receiver of the answered count, marked as seen at its current value.
    pub fn answers(&self) -> watch::Receiver<usize> {
        self.inner.shared.answered.subscribe()
    }

    async fn wait_until(&self, timeout: Duration, done: impl Fn(&Tracker) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        // Subscribing before checking means no answer can slip between the check and the wait.
        let mut rx = self.answers();
        loop {
            if done(self) {
                return true;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return done(self),
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

impl Shared {
    fn now_ms(&self) -> f64 {
        self.t0.elapsed().as_secs_f64() * 1000.0
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind, still worth reporting.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn on_reply(&self, reply: Reply, at_ms: f64) {
        let mut state = self.lock();
        let id = reply.id().to_string();
        let newly_answered = if state.index.contains_key(&id) {
            state.apply(&id, reply, at_ms)
        } else if let Some(early) = state.pending.get_mut(&id) {
            early.push((reply, at_ms));
            false
        } else {
            state.foreign += 1;
            false
        };
        let answered = state.answered;
        drop(state);
        if newly_answered {
            self.answered.send_replace(answered);
        }
    }
}

impl State {
    fn is_answered(&self, id: &str) -> bool {
        self.index
            .get(id)
            .is_some_and(|&i| self.records[i].answered_ms().is_some())
    }

    /// Records `reply` on the record of `id`; true if it is that request's first final reply.
    fn apply(&mut self, id: &str, reply: Reply, at_ms: f64) -> bool {
        let Some(&i) = self.index.get(id) else {
            return false;
        };
        let record = &mut self.records[i];
        let first_final = reply.is_final() && record.answered_ms().is_none();
        match reply {
            Reply::Chunk(c) => record.chunks.push(ChunkSeen {
                seq: c.seq,
                text: c.text,
                at_ms,
            }),
            Reply::Response(response) => record.responses.push(ResponseSeen { response, at_ms }),
            Reply::Error(error) => {
                if first_final {
                    self.errored += 1;
                }
                record.errors.push(ErrorSeen { error, at_ms });
            }
        }
        if first_final {
            self.answered += 1;
        }
        first_final
    }
}

/// The reader thread: polls the reply consumer until the tracker is dropped. Errors from the
/// consumer (a broker restarting, a partition moving) are transient for librdkafka, which
/// reconnects on its own, so they are skipped.
fn read_replies(consumer: &BaseConsumer, shared: &Shared) {
    while !shared.stop.load(Ordering::Relaxed) {
        let Some(Ok(message)) = consumer.poll(POLL_INTERVAL) else {
            continue;
        };
        let at_ms = shared.now_ms();
        match message.payload().map(serde_json::from_slice::<Reply>) {
            Some(Ok(reply)) => shared.on_reply(reply, at_ms),
            _ => shared.lock().invalid += 1,
        }
    }
}

/// Assigns every partition of `topic` at its current high watermark, retrying what the cluster
/// cannot answer yet for up to [`METADATA_WAIT`].
fn assign_at_end(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + METADATA_WAIT;
    let remaining = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let retry = |what: String| -> anyhow::Result<()> {
        if Instant::now() >= deadline {
            bail!("cannot read the partitions of reply topic {topic}: {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
        Ok(())
    };
    let partitions: Vec<i32> = loop {
        match consumer.fetch_metadata(Some(topic), remaining()) {
            Err(e) => retry(e.to_string())?,
            Ok(metadata) => match metadata.topics().iter().find(|t| t.name() == topic) {
                None => retry("not in the metadata".into())?,
                Some(t) => match t.error().map(RDKafkaErrorCode::from) {
                    Some(RDKafkaErrorCode::UnknownTopicOrPartition) => {
                        retry("it does not exist; create it first".into())?
                    }
                    Some(code) => retry(code.to_string())?,
                    None if t.partitions().is_empty() => retry("no partitions yet".into())?,
                    None => break t.partitions().iter().map(|p| p.id()).collect(),
                },
            },
        }
    };
    let mut assignment = TopicPartitionList::new();
    for partition in partitions {
        let high = loop {
            match consumer.fetch_watermarks(topic, partition, remaining()) {
                Ok((_low, high)) => break high,
                Err(e) => retry(format!("partition {partition}: {e}"))?,
            }
        };
        assignment.add_partition_offset(topic, partition, Offset::Offset(high))?;
    }
    consumer.assign(&assignment).context("cannot assign the reply topic")?;
    Ok(())
}
