//! Writing to Kafka: replies, stream chunks and dead-letter records, each acknowledged by the
//! broker (`acks=all`, idempotent producer) before the worker counts it as published.
//!
//! # Failures of one record and failures of the producer
//!
//! A record can be refused for a reason of its own: larger than `--max-record-bytes` (checked
//! here, before sending) or than the broker's limit, a topic that does not exist, an invalid
//! name, no permission to write it, a topic policy. That is the failure of the request it
//! belongs to ([`Refused`]): the request is dead-lettered and its offset committed, and the
//! worker goes on. Anything else (the broker unreachable past `--publish-timeout`, a fatal
//! producer error) may be the worker's own trouble and stops it ([`WorkerError::Publish`]), so
//! the request is redelivered to another worker: answered late, never lost.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use ferry_schemas::{headers, Attempt, Chunk, Reply, SourceRecord, SCHEMA_VERSION};
use rdkafka::consumer::Consumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage, ToBytes};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use tracing::{error, warn};

use super::transaction::{self, Transactions};
use super::WorkerError;
use crate::intake::Invalid;
use crate::ops::trace::Propagation;
use crate::reply;

/// The producer side of a worker.
pub struct Publisher {
    /// Idempotent, not transactional: every record under at-least-once delivery, and stream
    /// chunks under exactly-once.
    pub producer: FutureProducer,
    /// Under `--delivery exactly-once`: replies, dead letters and hand-offs go in the request's
    /// transaction ([`super::transaction`]).
    pub transactions: Option<Transactions>,
    pub worker_id: String,
    pub timeout: Duration,
    /// Largest record (key, value and headers) the worker publishes (`--max-record-bytes`).
    pub max_record_bytes: usize,
    /// Reply topics already seen to exist, so metadata is asked once per topic.
    known_topics: Mutex<HashSet<String>>,
}

/// Why one record was not published: the failure of the request it belongs to, not of the
/// worker (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the record for {topic} was refused: {reason}")]
pub struct Refused {
    pub topic: String,
    pub kind: RefusedKind,
    pub reason: String,
}

/// What about a record was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusedKind {
    /// Larger than `--max-record-bytes` or than the broker accepts.
    TooLarge,
    /// The topic: unknown, invalid, not authorised, or a policy refused the record.
    Topic,
}

/// How publishing a record failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The record was refused: the request's failure, the worker goes on.
    #[error(transparent)]
    Refused(Refused),
    /// The worker must stop (see [`WorkerError`]).
    #[error(transparent)]
    Worker(#[from] WorkerError),
    /// Exactly-once delivery: the request was told to suspend (a drain, a revocation) while it
    /// waited for its turn to commit; nothing of it is published.
    #[error("suspended before its turn to commit")]
    Suspended,
}

impl From<serde_json::Error> for PublishError {
    fn from(e: serde_json::Error) -> Self {
        PublishError::Worker(e.into())
    }
}

/// Whether a producer error belongs to the one record it was reported for, and how.
pub fn record_level(code: RDKafkaErrorCode) -> Option<RefusedKind> {
    use RDKafkaErrorCode as C;
    match code {
        C::MessageSizeTooLarge | C::MessageBatchTooLarge | C::InvalidMessageSize => Some(RefusedKind::TooLarge),
        C::UnknownTopicOrPartition
        | C::UnknownTopic
        | C::UnknownPartition
        | C::UnknownTopicId
        | C::InvalidTopic
        | C::TopicAuthorizationFailed
        | C::PolicyViolation
        | C::InvalidRecord => Some(RefusedKind::Topic),
        _ => None,
    }
}

/// The bytes a record takes against `--max-record-bytes`: key, value, and each header's name
/// and value.
pub fn record_size(key: Option<&[u8]>, payload: Option<&[u8]>, headers: Option<&OwnedHeaders>) -> usize {
    let headers = headers.map_or(0, |h| {
        h.iter().map(|x| x.key.len() + x.value.map_or(0, <[u8]>::len)).sum()
    });
    key.map_or(0, <[u8]>::len) + payload.map_or(0, <[u8]>::len) + headers
}

impl Publisher {
    pub fn new(
        producer: FutureProducer,
        transactions: Option<Transactions>,
        worker_id: String,
        timeout: Duration,
        max_record_bytes: usize,
    ) -> Self {
        Self {
            producer,
            transactions,
            worker_id,
            timeout,
            max_record_bytes,
            known_topics: Mutex::new(HashSet::new()),
        }
    }

    /// Publishes a final reply (or a chunk) keyed by its request id, with the worker's trace
    /// context for the request, and waits for the broker's acknowledgement.
    pub async fn reply(
        &self,
        topic: &str,
        reply: &Reply,
        trace: Option<&Propagation>,
    ) -> Result<Vec<u8>, PublishError> {
        let body = serde_json::to_vec(reply)?;
        self.reply_bytes(topic, reply.id(), reply.kind(), &body, trace).await?;
        Ok(body)
    }

    /// Publishes reply bytes as they were first published (a done marker's).
    pub async fn reply_bytes(
        &self,
        topic: &str,
        id: &str,
        kind: &str,
        body: &[u8],
        trace: Option<&Propagation>,
    ) -> Result<(), PublishError> {
        let rec = FutureRecord::to(topic)
            .key(id)
            .payload(body)
            .headers(reply_headers(kind, trace));
        self.send(topic, rec).await
    }

    /// Queues a stream chunk without waiting for it: chunks are a preview, the final reply
    /// (published after them on the same partition, so after them in the log) is what counts.
    pub fn chunk(&self, topic: &str, chunk: &Chunk, trace: Option<&Propagation>) {
        let reply = Reply::Chunk(chunk.clone());
        let Ok(body) = serde_json::to_vec(&reply) else {
            return;
        };
        let rec = FutureRecord::to(topic)
            .key(chunk.id.as_str())
            .payload(body.as_slice())
            .headers(reply_headers(reply.kind(), trace));
        if let Err(refused) = self.check_size(&rec) {
            warn!(error = %refused, seq = chunk.seq, "not publishing a stream chunk; the final reply still follows");
            return;
        }
        if let Err((e, _)) = self.producer.send_result(rec) {
            warn!(error = %e, seq = chunk.seq, "cannot queue a stream chunk; the final reply still follows");
        }
    }

    /// Dead-letters a message with the reason (and its attempts, when it used them up), and
    /// tells its caller with an error reply when the caller can be told. Returns whether it was.
    ///
    /// The record always fits `--max-record-bytes`: the original bytes are cut when they must be
    /// ([`reply::fit_dead_letter`]). If the dead-letter topic still refuses it, the refusal is
    /// logged as an error and counted, and the message is settled all the same: a dead letter
    /// that cannot be written must not stop its partition (the topics are checked at start-up,
    /// see [`Publisher::check_topics`]).
    #[allow(clippy::too_many_arguments)]
    pub async fn dead_letter(
        &self,
        dlq_topic: &str,
        default_reply_topic: &str,
        msg: &OwnedMessage,
        invalid: &Invalid,
        attempts: Vec<Attempt>,
        consumer: &impl Consumer<super::inflight::WorkerContext>,
        trace: Option<&Propagation>,
    ) -> Result<DeadLettered, PublishError> {
        warn!(
            request_id = invalid.id.as_deref().unwrap_or(""),
            partition = msg.partition(),
            offset = msg.offset(),
            code = invalid.code.as_str(),
            reason = %reply::truncate_utf8(&invalid.message, reply::MAX_REASON_BYTES),
            "dead-lettering"
        );
        let source = SourceRecord {
            topic: msg.topic().to_string(),
            partition: msg.partition(),
            offset: msg.offset(),
            key: msg.key().and_then(|k| std::str::from_utf8(k).ok()).map(str::to_string),
            timestamp_ms: msg.timestamp().to_millis(),
        };
        let attempt = attempts.len().max(1) as u32;
        let original = msg.payload().unwrap_or_default();
        let mut record = reply::dead_letter(invalid, source, original, &self.worker_id);
        record.attempts = attempts;
        let hdrs = with_trace(
            OwnedHeaders::new()
                .insert(Header {
                    key: headers::DLQ_REASON,
                    value: Some(invalid.code.as_str()),
                })
                .insert(Header {
                    key: headers::SCHEMA_VERSION,
                    value: Some(&SCHEMA_VERSION.to_string()),
                }),
            trace,
        );
        // The original key when it is short; else the request id, so the record still lands on
        // one partition per request.
        let key = msg
            .key()
            .filter(|k| k.len() <= reply::MAX_KEPT_KEY_BYTES)
            .or_else(|| invalid.id.as_deref().map(str::as_bytes));
        let room = self
            .max_record_bytes
            .saturating_sub(record_size(key, None, Some(&hdrs)));
        let stored = match reply::fit_dead_letter(&mut record, original, room) {
            Some(body) => {
                let mut rec = FutureRecord::<[u8], [u8]>::to(dlq_topic).payload(&body).headers(hdrs);
                if let Some(key) = key {
                    rec = rec.key(key);
                }
                match self.send(dlq_topic, rec).await {
                    Ok(()) => true,
                    Err(PublishError::Refused(r)) => {
                        error!(error = %r, "the dead-letter topic refused the record: the message is settled without one");
                        false
                    }
                    Err(e) => return Err(e),
                }
            }
            None => {
                error!(
                    max_record_bytes = self.max_record_bytes,
                    "a dead letter cannot fit even without the original bytes: the message is settled without one"
                );
                false
            }
        };
        let mut told = false;
        if let Some(reply) = reply::error_reply(invalid, &self.worker_id, attempt) {
            // A reply topic that is itself the problem gets nothing: the default reply topic
            // is not the caller's, and the forbidden or refused one must not be written.
            let topic_is_the_problem = matches!(
                invalid.code,
                ferry_schemas::ErrorCode::ReplyTopicForbidden | ferry_schemas::ErrorCode::ReplyTopicUnwritable
            );
            let topic = invalid
                .reply_to
                .clone()
                .unwrap_or_else(|| default_reply_topic.to_string());
            if topic_is_the_problem {
                warn!(topic, "no error reply: the reply topic is the problem");
            } else if !self.topic_exists(&topic, consumer) {
                warn!(topic, "no error reply: the reply topic does not exist");
            } else {
                let mut reply = reply;
                for last_try in [false, true] {
                    match self.reply(&topic, &reply, trace).await {
                        Ok(_) => {
                            told = true;
                            break;
                        }
                        // The metadata echoed back can be what makes the error reply too large.
                        Err(PublishError::Refused(r)) if r.kind == RefusedKind::TooLarge && !last_try => {
                            if let Reply::Error(e) = &mut reply {
                                e.metadata = None;
                            }
                        }
                        Err(PublishError::Refused(r)) => {
                            warn!(error = %r, "no error reply: the reply topic refused it");
                            break;
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Ok(DeadLettered { stored, told })
    }

    /// Publishes a copy of `msg` (its key and value as they are) with `headers` to the fallback
    /// topic, and waits for the broker's acknowledgement: only then may the original offset be
    /// committed (see [`super::fallback`]).
    pub async fn hand_off(&self, topic: &str, msg: &OwnedMessage, headers: OwnedHeaders) -> Result<(), PublishError> {
        let mut rec = FutureRecord::<[u8], [u8]>::to(topic)
            .payload(msg.payload().unwrap_or_default())
            .headers(headers);
        if let Some(key) = msg.key() {
            rec = rec.key(key);
        }
        self.send(topic, rec).await
    }

    /// Refuses a record larger than `--max-record-bytes` before it is sent.
    fn check_size<K: ToBytes + ?Sized>(&self, rec: &FutureRecord<'_, K, [u8]>) -> Result<(), Refused> {
        let size = record_size(
            rec.key.map(ToBytes::to_bytes),
            rec.payload.map(ToBytes::to_bytes),
            rec.headers.as_ref(),
        );
        if size > self.max_record_bytes {
            return Err(Refused {
                topic: rec.topic.to_string(),
                kind: RefusedKind::TooLarge,
                reason: format!("{size} bytes, more than --max-record-bytes {}", self.max_record_bytes),
            });
        }
        Ok(())
    }

    /// Sends and waits for the delivery report; a refusal of this one record is
    /// [`PublishError::Refused`], anything else stops the worker.
    async fn send<K: ToBytes + ?Sized>(&self, topic: &str, rec: FutureRecord<'_, K, [u8]>) -> Result<(), PublishError> {
        self.check_size(&rec).map_err(PublishError::Refused)?;
        if let Some(transactions) = &self.transactions {
            let Some(scope) = transaction::current() else {
                return Err(PublishError::Worker(WorkerError::Transaction(format!(
                    "a record for {topic} outside any request's transaction (a bug)"
                ))));
            };
            return transactions.send(&scope, topic, rec).await;
        }
        match self.producer.send(rec, self.timeout).await {
            Ok(_) => Ok(()),
            Err((source, _)) => Err(classify(topic, source)),
        }
    }

    /// Checks at start-up that the topics the worker must be able to write whatever a request
    /// says (dead-letter and fallback topics) exist and can be described, so a missing one is a
    /// clear error now rather than a refused record later. `what` names each topic's role for
    /// the message. Write permission itself shows only when a record is written: a refusal then
    /// is logged as an error (see [`Publisher::dead_letter`]).
    pub fn check_topics(
        &self,
        topics: &[(String, &str)],
        consumer: &impl Consumer<super::inflight::WorkerContext>,
    ) -> Result<(), WorkerError> {
        for (topic, what) in topics {
            let md = consumer
                .fetch_metadata(Some(topic), Duration::from_secs(30))
                .map_err(|e| WorkerError::Topics(format!("cannot read the metadata of the {what} {topic:?}: {e}")))?;
            let found = md.topics().iter().find(|t| t.name() == topic.as_str());
            let problem = match found {
                None => Some("does not exist".to_string()),
                Some(t) => match t.error().map(RDKafkaErrorCode::from) {
                    Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => {
                        Some("does not exist".to_string())
                    }
                    Some(e) => Some(format!("is not usable: {e}")),
                    None if t.partitions().is_empty() => Some("does not exist".to_string()),
                    None => None,
                },
            };
            if let Some(problem) = problem {
                return Err(WorkerError::Topics(format!(
                    "the {what} {topic:?} {problem}: create it (for example `kafka-topics.sh --create --topic {topic}`) \
                     and let this worker write it, or name another with the flag for it"
                )));
            }
            if let Ok(mut k) = self.known_topics.lock() {
                k.insert(topic.clone());
            }
        }
        Ok(())
    }

    /// Whether `topic` exists, asking the broker once per topic. A request whose reply topic
    /// does not exist is dead-lettered instead of blocking the worker on a reply it cannot send.
    pub fn topic_exists(&self, topic: &str, consumer: &impl Consumer<super::inflight::WorkerContext>) -> bool {
        let known = |t: &str| self.known_topics.lock().map(|k| k.contains(t)).unwrap_or(false);
        if known(topic) {
            return true;
        }
        let exists = match consumer.fetch_metadata(Some(topic), Duration::from_secs(10)) {
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

/// What became of a dead-lettered message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadLettered {
    /// The dead-letter record was published.
    pub stored: bool,
    /// The caller got an error reply.
    pub told: bool,
}

/// A producer error as a [`PublishError`].
pub fn classify(topic: &str, source: KafkaError) -> PublishError {
    let code = match &source {
        KafkaError::MessageProduction(code) => Some(*code),
        _ => None,
    };
    match code.and_then(record_level) {
        Some(kind) => PublishError::Refused(Refused {
            topic: topic.to_string(),
            kind,
            reason: source.to_string(),
        }),
        None => PublishError::Worker(WorkerError::Publish {
            topic: topic.to_string(),
            source,
        }),
    }
}

/// Headers of a reply: its kind, the contract version, and the worker's trace context.
fn reply_headers(kind: &str, trace: Option<&Propagation>) -> OwnedHeaders {
    let hdrs = OwnedHeaders::new()
        .insert(Header {
            key: headers::KIND,
            value: Some(kind),
        })
        .insert(Header {
            key: headers::SCHEMA_VERSION,
            value: Some(&SCHEMA_VERSION.to_string()),
        });
    with_trace(hdrs, trace)
}

/// Adds `traceparent` (the worker's span) and `tracestate` (as received), when there is a trace.
fn with_trace(mut hdrs: OwnedHeaders, trace: Option<&Propagation>) -> OwnedHeaders {
    if let Some(t) = trace {
        hdrs = hdrs.insert(Header {
            key: headers::TRACEPARENT,
            value: Some(&t.outgoing()),
        });
        if let Some(state) = &t.tracestate {
            hdrs = hdrs.insert(Header {
                key: headers::TRACESTATE,
                value: Some(state.as_str()),
            });
        }
    }
    hdrs
}

#[cfg(test)]
mod tests;
