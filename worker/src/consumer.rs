//! The Kafka loop: one request at a time, offsets committed only after the answer is durable.
//!
//! For each message: parse and validate it ([`crate::intake`]), prepare and generate
//! ([`crate::engine`]), publish the reply (or the dead-letter record and error reply), wait for
//! the broker's delivery report, and only then commit the message's offset. If the worker dies
//! anywhere before the commit, the group redelivers the message to a surviving worker: a request
//! may be answered twice, never zero times.
//!
//! While it generates, the worker snapshots the generation ([`crate::snapshot`]); a request that
//! arrives with a verified snapshot continues from it. On SIGTERM the worker drains: it stops
//! fetching, suspends the generation at its current token, waits (within `--drain-timeout`) for
//! that snapshot to be durable, closes the consumer so the group hands its partitions to the
//! survivors at once, and exits. A second signal, or the deadline, ends it sooner; the request
//! stays uncommitted either way, so nothing is lost.
//!
//! Limit: one request at a time, and a generation longer than `max.poll.interval.ms` would get
//! the worker thrown out of the group; the concurrency issue lifts both.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_schemas::{headers, Reply, Request, SourceRecord, SCHEMA_VERSION};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, ClientContext, Message, Offset, TopicPartitionList};
use tracing::{error, info, warn};

use crate::config::KafkaConfig;
use crate::engine::{Engine, EngineHandle, Job, JobControl, Outcome};
use crate::intake::{self, Invalid};
use crate::reply::{self, WorkContext};
use crate::snapshot::format::snapshot_prefix;
use crate::snapshot::Snapshots;

/// Failures that stop the worker. Its uncommitted message is then redelivered to another.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The Kafka clients could not be created or subscribed.
    #[error("kafka setup: {0}")]
    Setup(#[source] KafkaError),
    /// The broker did not acknowledge a reply or dead-letter record in time.
    #[error("publishing to {topic} failed: {source}")]
    Publish { topic: String, source: KafkaError },
    /// Reading from the consumer failed in a way librdkafka does not recover from.
    #[error("consuming: {0}")]
    Consume(#[source] KafkaError),
    /// The engine thread died.
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineStopped),
    /// Serialising a reply failed (a bug).
    #[error("serialising a reply: {0}")]
    Serialize(#[from] serde_json::Error),
}

/// The worker's Kafka side.
pub struct Worker {
    consumer: WorkerConsumer,
    producer: FutureProducer,
    engine: Engine,
    engine_thread: EngineHandle,
    worker_id: String,
    reply_topic: String,
    dead_letter_topic: String,
    publish_timeout: Duration,
    /// Reply topics already seen to exist, so metadata is asked once per topic.
    known_topics: Mutex<HashSet<String>>,
    snapshots: Option<Snapshots>,
    /// The running job's controls, so a drain can suspend it.
    current: Mutex<Option<Arc<JobControl>>>,
    drain_timeout: Duration,
}

/// How handling a message ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Handled {
    /// Answered or dead-lettered: commit it, then delete its snapshot (under this prefix).
    Done(Option<String>),
    /// Suspended by a drain, its state in a snapshot: leave it uncommitted.
    Suspended,
}

/// Signals the worker counts: the first starts a drain, the second ends the process at once.
pub type Signals = tokio::sync::watch::Receiver<u32>;

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("worker_id", &self.worker_id)
            .finish_non_exhaustive()
    }
}

/// Consumer callbacks.
struct WorkerContext;

impl ClientContext for WorkerContext {}

impl ConsumerContext for WorkerContext {
    /// A partition handed (back) to this worker starts unpaused. librdkafka keeps an
    /// application's pause across a revoke and a re-assign, which would leave a partition paused
    /// during one request, and reassigned while the worker waits idle, unfetched forever.
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                info!(partitions = tpl.count(), "partitions assigned");
                if tpl.count() > 0 {
                    if let Err(e) = consumer.resume(tpl) {
                        warn!(error = %e, "cannot resume newly assigned partitions");
                    }
                }
            }
            Rebalance::Revoke(tpl) => info!(partitions = tpl.count(), "partitions revoked"),
            Rebalance::Error(e) => warn!(error = %e, "rebalance error"),
        }
    }
}

type WorkerConsumer = StreamConsumer<WorkerContext>;

/// librdkafka settings shared by the consumer and the producer.
fn base_config(bootstrap: &str, cfg: &KafkaConfig, defaults: &[(&str, &str)]) -> Result<ClientConfig, WorkerError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap);
    for (k, v) in defaults {
        c.set(*k, *v);
    }
    for (k, v) in cfg
        .property_pairs()
        .map_err(|e| WorkerError::Setup(KafkaError::ClientCreation(e.0)))?
    {
        c.set(k, v);
    }
    Ok(c)
}

impl Worker {
    pub fn new(
        bootstrap: &str,
        cfg: &KafkaConfig,
        engine: Engine,
        worker_id: String,
        snapshots: Option<Snapshots>,
        drain_timeout: Duration,
    ) -> Result<Self, WorkerError> {
        // A worker just handed an evicted worker's partition should see its message at once,
        // not after librdkafka's default 500 ms fetch wait. Overridable.
        let consumer: WorkerConsumer = base_config(bootstrap, cfg, &[("fetch.wait.max.ms", "100")])?
            .set("group.id", &cfg.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", cfg.session_timeout.as_millis().to_string())
            .set("client.id", &worker_id)
            .create_with_context(WorkerContext)
            .map_err(WorkerError::Setup)?;
        let producer: FutureProducer = base_config(bootstrap, cfg, &[])?
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", cfg.publish_timeout.as_millis().to_string())
            .set("client.id", &worker_id)
            .create()
            .map_err(WorkerError::Setup)?;
        consumer.subscribe(&[&cfg.topic]).map_err(WorkerError::Setup)?;
        let engine_thread = EngineHandle::spawn(engine.clone())
            .map_err(|e| WorkerError::Setup(KafkaError::ClientCreation(format!("engine thread: {e}"))))?;
        Ok(Self {
            consumer,
            producer,
            engine,
            engine_thread,
            worker_id,
            reply_topic: cfg.reply_topic.clone(),
            dead_letter_topic: cfg.dead_letter_topic(),
            publish_timeout: cfg.publish_timeout,
            known_topics: Mutex::new(HashSet::new()),
            snapshots,
            current: Mutex::new(None),
            drain_timeout,
        })
    }

    /// Serves requests until the first signal, then drains (see the module doc).
    pub async fn run(&self, mut signals: Signals) -> Result<(), WorkerError> {
        info!(worker = %self.worker_id, "consuming");
        // Messages received while a request was running, served next. A partition is paused when
        // one of its messages lands here, so this holds at most one message per partition.
        let mut backlog: VecDeque<OwnedMessage> = VecDeque::new();
        // Per partition, the offset after the last message this worker answered. A message
        // below it is a redelivery of an answered one (its partition was revoked and handed back
        // mid-request): its offset is committed again instead of answering it twice.
        let mut answered: HashMap<(String, i32), i64> = HashMap::new();
        // Whether a partition was paused for the backlog (resuming is only done then: it makes
        // librdkafka restart its fetch).
        let mut paused = false;
        loop {
            let msg = match backlog.pop_front() {
                Some(m) => {
                    if !self.is_assigned(m.topic(), m.partition()) {
                        // The partition moved to another worker while the message waited here.
                        continue;
                    }
                    m
                }
                None => {
                    if std::mem::take(&mut paused) {
                        self.resume_all();
                    }
                    let received = tokio::select! {
                        _ = signals.changed() => break,
                        m = self.consumer.recv() => m,
                    };
                    match received {
                        Ok(m) => m.detach(),
                        Err(e) => {
                            // librdkafka reports transient broker trouble here and recovers.
                            warn!(error = %e, "consumer error");
                            if matches!(e, KafkaError::MessageConsumption(RDKafkaErrorCode::Fatal)) {
                                return Err(WorkerError::Consume(e));
                            }
                            continue;
                        }
                    }
                }
            };
            if let Some(&next) = answered.get(&(msg.topic().to_string(), msg.partition())) {
                if msg.offset() < next {
                    info!(
                        partition = msg.partition(),
                        offset = msg.offset(),
                        "already answered here; committing again"
                    );
                    self.commit_offset(msg.topic(), msg.partition(), next);
                    continue;
                }
            }
            // One request at a time. The worker keeps polling while it runs (a member that stops
            // polling holds up every rebalance of the group, and so every takeover of an evicted
            // worker's partitions); a message that arrives meanwhile waits in the backlog, and
            // its partition is paused until the backlog is served.
            let handling = self.handle(&msg);
            tokio::pin!(handling);
            let finished = loop {
                tokio::select! {
                    r = &mut handling => break Some(r?),
                    _ = signals.changed() => break None,
                    m = self.consumer.recv() => match m {
                        Ok(m) => {
                            let mut tpl = TopicPartitionList::new();
                            tpl.add_partition(m.topic(), m.partition());
                            if let Err(e) = self.consumer.pause(&tpl) {
                                warn!(error = %e, "cannot pause a partition for the backlog");
                            }
                            paused = true;
                            backlog.push_back(m.detach());
                        }
                        Err(e) => warn!(error = %e, "consumer error"),
                    },
                }
            };
            let (handled, draining) = match finished {
                Some(h) => (h, false),
                None => {
                    info!(
                        partition = msg.partition(),
                        offset = msg.offset(),
                        "draining: suspending the generation in flight"
                    );
                    self.suspend_current();
                    let drained = tokio::time::timeout(self.drain_timeout, async {
                        tokio::select! {
                            r = &mut handling => Some(r),
                            _ = signals.changed() => None,
                        }
                    })
                    .await;
                    match drained {
                        Ok(Some(r)) => (r?, true),
                        Ok(None) => {
                            warn!("second signal: exiting now; the request stays uncommitted");
                            break;
                        }
                        Err(_) => {
                            warn!("drain deadline passed: exiting; the request stays uncommitted");
                            break;
                        }
                    }
                }
            };
            let suspended = handled == Handled::Suspended;
            if let Handled::Done(prefix) = handled {
                answered.insert((msg.topic().to_string(), msg.partition()), msg.offset() + 1);
                let committed = self.commit_offset(msg.topic(), msg.partition(), msg.offset() + 1);
                // After a failed commit the request may come back: keep its snapshot for that
                // (it expires with the TTL otherwise).
                if let (true, Some(s), Some(prefix)) = (committed, &self.snapshots, prefix) {
                    s.delete(&prefix).await;
                }
            }
            if draining || suspended {
                break;
            }
        }
        // Leave the group now, so the partitions move to the survivors without waiting for the
        // session timeout.
        self.consumer.unsubscribe();
        info!("left the consumer group");
        Ok(())
    }

    /// Resumes fetching from every assigned partition (the backlog is empty).
    fn resume_all(&self) {
        let Ok(assignment) = self.consumer.assignment() else {
            return;
        };
        if assignment.count() > 0 {
            if let Err(e) = self.consumer.resume(&assignment) {
                warn!(error = %e, "cannot resume the assigned partitions");
            }
        }
    }

    fn suspend_current(&self) {
        if let Ok(cur) = self.current.lock() {
            if let Some(c) = cur.as_ref() {
                c.suspend.store(true, std::sync::atomic::Ordering::Release);
            }
        }
    }

    /// Answers or dead-letters one message, or suspends it when draining. Returns once what it
    /// published is acknowledged (or the snapshot is durable).
    async fn handle(&self, msg: &OwnedMessage) -> Result<Handled, WorkerError> {
        let started = Instant::now();
        let queued = msg
            .timestamp()
            .to_millis()
            .and_then(|ts| {
                let now = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
                u64::try_from(now as i64 - ts).ok()
            })
            .map(Duration::from_millis)
            .unwrap_or_default();
        let request = match intake::parse(msg.payload()) {
            Ok(r) => r,
            Err(invalid) => return self.reject(msg, &invalid).await.map(|()| Handled::Done(None)),
        };
        let span = tracing::info_span!("request", request_id = %request.id, partition = msg.partition(), offset = msg.offset());
        let _enter = span.enter();
        let reply_topic = request.reply_to.clone().unwrap_or_else(|| self.reply_topic.clone());
        let prepared = match self.engine.prepare(&request) {
            Ok(p) => p,
            Err(rejection) => {
                let invalid = rejected(&request, rejection.code(), rejection.to_string());
                return self.reject(msg, &invalid).await.map(|()| Handled::Done(None));
            }
        };
        if !self.topic_exists(&reply_topic) {
            let message = format!("the reply topic {reply_topic:?} does not exist");
            let invalid = rejected(&request, ferry_schemas::ErrorCode::InvalidRequest, message);
            return self.reject(msg, &invalid).await.map(|()| Handled::Done(None));
        }
        let prompt_tokens = prepared.prompt.len();
        let prefix = snapshot_prefix(msg.topic(), &request.id);
        let found = match &self.snapshots {
            Some(s) => s.find(&prefix, &prepared).await,
            None => None,
        };
        let attempt = found.as_ref().map_or(1, |f| f.manifest.attempt + 1);
        let resumed_from = found.as_ref().map(|f| f.manifest.tokens.len() as u32);
        let writer = self
            .snapshots
            .as_ref()
            .and_then(|s| s.writer(&prefix, &prepared, &self.worker_id, found.as_ref().map(|f| &f.manifest)));
        let (writer, sink) = match writer {
            Some((w, s)) => (Some(w), Some(s)),
            None => (None, None),
        };
        let control = Arc::new(JobControl::default());
        if let Ok(mut cur) = self.current.lock() {
            *cur = Some(control.clone());
        }
        info!(prompt_tokens, resumed_from_token = resumed_from, attempt, "generating");
        let job = Job {
            prepared,
            resume: found.map(|f| f.resume),
            snapshots: sink,
            control,
        };
        let outcome = self.engine_thread.run(job).await?;
        if let Ok(mut cur) = self.current.lock() {
            *cur = None;
        }
        let completion = match outcome {
            Ok(Outcome::Finished(c)) => c,
            Ok(Outcome::Suspended { tokens }) => {
                if let Some(w) = writer {
                    w.flush_and_stop().await;
                }
                if tokens == 0 {
                    info!("suspended before the first token; nothing to snapshot");
                } else {
                    info!(tokens, "suspended; snapshot written");
                }
                return Ok(Handled::Suspended);
            }
            Err(e) => {
                if let Some(w) = writer {
                    w.stop().await;
                }
                error!(error = %e, "generation failed");
                let invalid = rejected(&request, ferry_schemas::ErrorCode::EngineError, e.to_string());
                return self.reject(msg, &invalid).await.map(|()| Handled::Done(Some(prefix)));
            }
        };
        let cx = WorkContext {
            worker: &self.worker_id,
            model: &self.engine.model().name,
            attempt,
            queued,
            total: started.elapsed(),
        };
        let mut reply = reply::response(&request, &completion, &cx);
        if let Reply::Response(r) = &mut reply {
            r.resumed_from_token = resumed_from;
        }
        self.publish_reply(&reply_topic, &reply, msg).await?;
        if let Some(w) = writer {
            w.stop().await;
        }
        let decode_s = completion.decode.as_secs_f64();
        let tps = if decode_s > 0.0 {
            completion.tokens.len() as f64 / decode_s
        } else {
            0.0
        };
        if let Some(s) = &self.snapshots {
            if tps > 0.0 {
                s.stats.record_decode_speed(tps);
            }
        }
        info!(
            prompt_tokens,
            completion_tokens = completion.tokens.len(),
            finish_reason = ?completion.finish.reason,
            resumed_from_token = resumed_from,
            attempt,
            decode_tokens_per_s = tps,
            total_ms = started.elapsed().as_millis() as u64,
            "answered"
        );
        Ok(Handled::Done(Some(prefix)))
    }

    /// Dead-letters a message and tells its caller, when it can be told.
    async fn reject(&self, msg: &OwnedMessage, invalid: &Invalid) -> Result<(), WorkerError> {
        warn!(
            request_id = invalid.id.as_deref().unwrap_or(""),
            partition = msg.partition(),
            offset = msg.offset(),
            code = invalid.code.as_str(),
            reason = %invalid.message,
            "dead-lettering"
        );
        let source = SourceRecord {
            topic: msg.topic().to_string(),
            partition: msg.partition(),
            offset: msg.offset(),
            key: msg.key().and_then(|k| std::str::from_utf8(k).ok()).map(str::to_string),
            timestamp_ms: msg.timestamp().to_millis(),
        };
        let record = reply::dead_letter(invalid, source, msg.payload().unwrap_or_default(), &self.worker_id);
        let body = serde_json::to_vec(&record)?;
        let hdrs = OwnedHeaders::new()
            .insert(Header {
                key: headers::DLQ_REASON,
                value: Some(invalid.code.as_str()),
            })
            .insert(Header {
                key: headers::SCHEMA_VERSION,
                value: Some(&SCHEMA_VERSION.to_string()),
            });
        let mut rec = FutureRecord::<[u8], [u8]>::to(&self.dead_letter_topic)
            .payload(&body)
            .headers(hdrs);
        if let Some(key) = msg.key() {
            rec = rec.key(key);
        }
        self.send(&self.dead_letter_topic, rec).await?;
        if let Some(reply) = reply::error_reply(invalid, &self.worker_id, 1) {
            let topic = invalid.reply_to.clone().unwrap_or_else(|| self.reply_topic.clone());
            if self.topic_exists(&topic) {
                self.publish_reply(&topic, &reply, msg).await?;
            } else {
                warn!(topic, "no error reply: the reply topic does not exist");
            }
        }
        Ok(())
    }

    async fn publish_reply(&self, topic: &str, reply: &Reply, request: &OwnedMessage) -> Result<(), WorkerError> {
        let body = serde_json::to_vec(reply)?;
        let mut hdrs = OwnedHeaders::new()
            .insert(Header {
                key: headers::KIND,
                value: Some(reply.kind()),
            })
            .insert(Header {
                key: headers::SCHEMA_VERSION,
                value: Some(&SCHEMA_VERSION.to_string()),
            });
        if let Some(tp) = request
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == headers::TRACEPARENT))
        {
            hdrs = hdrs.insert(Header {
                key: headers::TRACEPARENT,
                value: tp.value,
            });
        }
        let rec = FutureRecord::to(topic)
            .key(reply.id())
            .payload(body.as_slice())
            .headers(hdrs);
        self.send(topic, rec).await
    }

    /// Sends and waits for the delivery report.
    async fn send<K: rdkafka::message::ToBytes + ?Sized>(
        &self,
        topic: &str,
        rec: FutureRecord<'_, K, [u8]>,
    ) -> Result<(), WorkerError> {
        match self.producer.send(rec, self.publish_timeout).await {
            Ok(_) => Ok(()),
            Err((source, _)) => Err(WorkerError::Publish {
                topic: topic.to_string(),
                source,
            }),
        }
    }

    /// Commits `next` as the partition's position. A failed commit is logged, not fatal: the
    /// message is then answered again after a redelivery, with the same answer.
    fn commit_offset(&self, topic: &str, partition: i32, next: i64) -> bool {
        let mut tpl = TopicPartitionList::new();
        if let Err(e) = tpl.add_partition_offset(topic, partition, Offset::Offset(next)) {
            warn!(error = %e, "cannot build the commit");
            return false;
        }
        match self.consumer.commit(&tpl, CommitMode::Sync) {
            Ok(()) => true,
            Err(e) => {
                warn!(partition, offset = next - 1, error = %e,
                    "commit failed; the message may be redelivered and answered again");
                false
            }
        }
    }

    fn is_assigned(&self, topic: &str, partition: i32) -> bool {
        self.consumer
            .assignment()
            .map(|a| a.find_partition(topic, partition).is_some())
            .unwrap_or(false)
    }

    /// Whether `topic` exists, asking the broker once per topic. A request whose reply topic
    /// does not exist is dead-lettered instead of blocking the worker on a reply it cannot send.
    fn topic_exists(&self, topic: &str) -> bool {
        let known = |t: &str| self.known_topics.lock().map(|k| k.contains(t)).unwrap_or(false);
        if known(topic) {
            return true;
        }
        let exists = match self.consumer.fetch_metadata(Some(topic), Duration::from_secs(10)) {
            Ok(md) => md
                .topics()
                .iter()
                .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty()),
            // Metadata trouble is not the request's fault: assume the topic exists and let
            // publishing decide.
            Err(e) => {
                warn!(topic, error = %e, "cannot read topic metadata");
                true
            }
        };
        if exists {
            if let Ok(mut k) = self.known_topics.lock() {
                k.insert(topic.to_string());
            }
        }
        exists
    }
}

fn rejected(req: &Request, code: ferry_schemas::ErrorCode, message: String) -> Invalid {
    Invalid {
        code,
        message,
        id: Some(req.id.clone()),
        reply_to: req.reply_to.clone(),
        metadata: req.metadata.clone(),
    }
}
