//! The Kafka loop: one request at a time, offsets committed only after the answer is durable.
//!
//! For each message: parse and validate it ([`crate::intake`]), prepare and generate
//! ([`crate::engine`]), publish the reply (or the dead-letter record and error reply), wait for
//! the broker's delivery report, and only then commit the message's offset. If the worker dies
//! anywhere before the commit, the group redelivers the message to a surviving worker: a request
//! may be answered twice, never zero times.
//!
//! Limit: one request at a time, and a generation longer than `max.poll.interval.ms` would get
//! the worker thrown out of the group; the concurrency issue lifts both.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferry_schemas::{headers, Reply, Request, SourceRecord, SCHEMA_VERSION};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tracing::{error, info, warn};

use crate::config::KafkaConfig;
use crate::engine::{Engine, EngineHandle};
use crate::intake::{self, Invalid};
use crate::reply::{self, WorkContext};

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
    consumer: StreamConsumer,
    producer: FutureProducer,
    engine: Engine,
    engine_thread: EngineHandle,
    worker_id: String,
    reply_topic: String,
    dead_letter_topic: String,
    publish_timeout: Duration,
    /// Reply topics already seen to exist, so metadata is asked once per topic.
    known_topics: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("worker_id", &self.worker_id).finish_non_exhaustive()
    }
}

/// librdkafka settings shared by the consumer and the producer.
fn base_config(bootstrap: &str, cfg: &KafkaConfig) -> Result<ClientConfig, WorkerError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap);
    for (k, v) in cfg.property_pairs().map_err(|e| WorkerError::Setup(KafkaError::ClientCreation(e.0)))? {
        c.set(k, v);
    }
    Ok(c)
}

impl Worker {
    pub fn new(bootstrap: &str, cfg: &KafkaConfig, engine: Engine, worker_id: String) -> Result<Self, WorkerError> {
        let consumer: StreamConsumer = base_config(bootstrap, cfg)?
            .set("group.id", &cfg.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", cfg.session_timeout.as_millis().to_string())
            .set("client.id", &worker_id)
            .create()
            .map_err(WorkerError::Setup)?;
        let producer: FutureProducer = base_config(bootstrap, cfg)?
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
        })
    }

    /// Serves requests until `shutdown` completes. A generation in progress at shutdown is
    /// abandoned uncommitted, so the group redelivers it.
    pub async fn run(&self, shutdown: impl std::future::Future<Output = ()>) -> Result<(), WorkerError> {
        tokio::pin!(shutdown);
        info!(worker = %self.worker_id, "consuming");
        loop {
            let msg = tokio::select! {
                _ = &mut shutdown => break,
                msg = self.consumer.recv() => msg,
            };
            let msg = match msg {
                Ok(m) => m,
                Err(e) => {
                    // librdkafka reports transient broker trouble here and recovers by itself.
                    warn!(error = %e, "consumer error");
                    if matches!(e, KafkaError::MessageConsumption(RDKafkaErrorCode::Fatal)) {
                        return Err(WorkerError::Consume(e));
                    }
                    continue;
                }
            };
            tokio::select! {
                _ = &mut shutdown => {
                    warn!(partition = msg.partition(), offset = msg.offset(),
                        "shutting down mid-request; it stays uncommitted and will be redelivered");
                    break;
                }
                done = self.handle(&msg) => done?,
            }
            self.commit(&msg);
        }
        info!("stopped consuming");
        Ok(())
    }

    /// Answers or dead-letters one message. Returns once what it published is acknowledged.
    async fn handle(&self, msg: &BorrowedMessage<'_>) -> Result<(), WorkerError> {
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
            Err(invalid) => return self.reject(msg, &invalid).await,
        };
        let span = tracing::info_span!("request", request_id = %request.id, partition = msg.partition(), offset = msg.offset());
        let _enter = span.enter();
        let reply_topic = request.reply_to.clone().unwrap_or_else(|| self.reply_topic.clone());
        let prepared = match self.engine.prepare(&request) {
            Ok(p) => p,
            Err(rejection) => return self.reject(msg, &rejected(&request, rejection.code(), rejection.to_string())).await,
        };
        if !self.topic_exists(&reply_topic) {
            let message = format!("the reply topic {reply_topic:?} does not exist");
            return self.reject(msg, &rejected(&request, ferry_schemas::ErrorCode::InvalidRequest, message)).await;
        }
        let prompt_tokens = prepared.prompt.len();
        let completion = match self.engine_thread.generate(prepared).await? {
            Ok(c) => c,
            Err(e) => {
                error!(error = %e, "generation failed");
                let invalid = rejected(&request, ferry_schemas::ErrorCode::EngineError, e.to_string());
                return self.reject(msg, &invalid).await;
            }
        };
        let cx = WorkContext {
            worker: &self.worker_id,
            model: &self.engine.model().name,
            attempt: 1,
            queued,
            total: started.elapsed(),
        };
        let reply = reply::response(&request, &completion, &cx);
        self.publish_reply(&reply_topic, &reply, msg).await?;
        let decode_s = completion.decode.as_secs_f64();
        info!(
            prompt_tokens,
            completion_tokens = completion.tokens.len(),
            finish_reason = ?completion.finish.reason,
            decode_tokens_per_s = if decode_s > 0.0 { completion.tokens.len() as f64 / decode_s } else { 0.0 },
            total_ms = started.elapsed().as_millis() as u64,
            "answered"
        );
        Ok(())
    }

    /// Dead-letters a message and tells its caller, when it can be told.
    async fn reject(&self, msg: &BorrowedMessage<'_>, invalid: &Invalid) -> Result<(), WorkerError> {
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
            .insert(Header { key: headers::DLQ_REASON, value: Some(invalid.code.as_str()) })
            .insert(Header { key: headers::SCHEMA_VERSION, value: Some(&SCHEMA_VERSION.to_string()) });
        let mut rec = FutureRecord::<[u8], [u8]>::to(&self.dead_letter_topic).payload(&body).headers(hdrs);
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

    async fn publish_reply(&self, topic: &str, reply: &Reply, request: &BorrowedMessage<'_>) -> Result<(), WorkerError> {
        let body = serde_json::to_vec(reply)?;
        let mut hdrs = OwnedHeaders::new()
            .insert(Header { key: headers::KIND, value: Some(reply.kind()) })
            .insert(Header { key: headers::SCHEMA_VERSION, value: Some(&SCHEMA_VERSION.to_string()) });
        if let Some(tp) = request.headers().and_then(|h| h.iter().find(|h| h.key == headers::TRACEPARENT)) {
            hdrs = hdrs.insert(Header { key: headers::TRACEPARENT, value: tp.value });
        }
        let rec = FutureRecord::to(topic).key(reply.id()).payload(body.as_slice()).headers(hdrs);
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
            Err((source, _)) => Err(WorkerError::Publish { topic: topic.to_string(), source }),
        }
    }

    /// Commits the offset after `msg`. A failed commit is logged, not fatal: the message is then
    /// answered again after a redelivery, with the same answer.
    fn commit(&self, msg: &BorrowedMessage<'_>) {
        let mut tpl = TopicPartitionList::new();
        if let Err(e) = tpl.add_partition_offset(msg.topic(), msg.partition(), Offset::Offset(msg.offset() + 1)) {
            warn!(error = %e, "cannot build the commit");
            return;
        }
        if let Err(e) = self.consumer.commit(&tpl, CommitMode::Sync) {
            warn!(partition = msg.partition(), offset = msg.offset(), error = %e,
                "commit failed; the message may be redelivered and answered again");
        }
    }

    /// Whether `topic` exists, asking the broker once per topic. A request whose reply topic
    /// does not exist is dead-lettered instead of blocking the worker on a reply it cannot send.
    fn topic_exists(&self, topic: &str) -> bool {
        let known = |t: &str| self.known_topics.lock().map(|k| k.contains(t)).unwrap_or(false);
        if known(topic) {
            return true;
        }
        let exists = match self.consumer.fetch_metadata(Some(topic), Duration::from_secs(10)) {
            Ok(md) => md.topics().iter().any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty()),
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
    Invalid { code, message, id: Some(req.id.clone()), reply_to: req.reply_to.clone(), metadata: req.metadata.clone() }
}
