//! Writing to Kafka: replies, stream chunks, dead letters and hand-offs, each acknowledged by the
//! broker (`acks=all`, idempotent producer) before the worker counts it as published, and each
//! through the one gate of [`gate`]: the reply-topic policy, the header bounds, the record
//! budget and the classification of failures, applied in that order to every record.
//!
//! # Failures of one record and failures of the producer
//!
//! A record can be refused for a reason of its own: larger than `--max-record-bytes` (checked
//! here, before sending) or than the broker's limit, a topic that does not exist, an invalid
//! name, no permission to write it, a topic policy, an invalid timestamp. That is the failure of
//! the request it belongs to ([`Refused`]): the request is dead-lettered and its offset
//! committed, and the worker goes on. A topic that cannot take a record in time (too few
//! in-sync replicas, no leader, a timeout) may be sick on its own or with the whole cluster:
//! the reply is dead-lettered, and the dead letter decides: written, the trouble was the reply
//! topic's and the worker goes on; refused the same way, the cluster is in trouble and the
//! worker stops ([`WorkerError::Publish`]). Anything else (the broker unreachable past
//! `--publish-timeout`, a fatal producer error) may be the worker's own trouble and stops it, so
//! the request is redelivered to another worker: answered late, never lost.

mod dead_letter;
mod gate;

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use ferry_schemas::{headers, Chunk, Reply, SCHEMA_VERSION};
use rdkafka::consumer::Consumer;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{DeliveryFuture, FutureProducer};
use rdkafka::Message;
use tracing::warn;

pub use gate::{classify, Refused, RefusedKind, ReplyTo};
use gate::{Destination, Outgoing};

use super::transaction::Transactions;
use super::WorkerError;
use crate::ops::trace::Propagation;
use crate::reply_topics::ReplyTopicPolicy;

/// Where the worker's records may go: the reply-topic policy and the fleet's own topics.
#[derive(Debug, Clone)]
pub struct Topics {
    /// Which reply topics a request may name ([`crate::reply_topics`]).
    pub policy: ReplyTopicPolicy,
    /// Where replies go for requests that name no `reply_to`.
    pub reply_topic: String,
    /// One dead-letter topic for every lane, when configured; else `<topic>.dlq` per lane.
    pub dead_letter_topic: Option<String>,
    /// Where requests this worker cannot serve for a reason of its own go (`--fallback-topic`).
    pub fallback_topic: Option<String>,
}

/// The producer side of a worker.
pub struct Publisher {
    /// Idempotent, not transactional: every record under at-least-once delivery, and stream
    /// chunks under exactly-once. Private: only the gate writes with it.
    producer: FutureProducer,
    /// Under `--delivery exactly-once`: replies, dead letters and hand-offs go in the request's
    /// transaction ([`super::transaction`]).
    pub transactions: Option<Transactions>,
    pub worker_id: String,
    /// How long a send may wait for room in the producer's queue.
    timeout: Duration,
    /// Largest record (key, value and headers) the worker publishes (`--max-record-bytes`).
    max_record_bytes: usize,
    policy: ReplyTopicPolicy,
    reply_topic: String,
    dead_letter_topic: Option<String>,
    fallback_topic: Option<String>,
    /// Reply topics already seen to exist, so metadata is asked once per topic.
    known_topics: Mutex<HashSet<String>>,
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

impl Publisher {
    pub fn new(
        producer: FutureProducer,
        transactions: Option<Transactions>,
        worker_id: String,
        timeout: Duration,
        max_record_bytes: usize,
        topics: Topics,
    ) -> Self {
        Self {
            producer,
            transactions,
            worker_id,
            timeout,
            max_record_bytes,
            policy: topics.policy,
            reply_topic: topics.reply_topic,
            dead_letter_topic: topics.dead_letter_topic,
            fallback_topic: topics.fallback_topic,
            known_topics: Mutex::new(HashSet::new()),
        }
    }

    /// The reply topic of a request that names `requested` (or none: the worker's
    /// `--reply-topic`), when the policy allows it; else why not, for the dead letter. The only
    /// way to make a [`ReplyTo`].
    pub fn reply_to(&self, requested: Option<&str>) -> Result<ReplyTo, String> {
        let topic = requested.unwrap_or(&self.reply_topic);
        self.policy.check(topic)?;
        Ok(ReplyTo(topic.to_string()))
    }

    /// The dead-letter topic of messages read from `source`.
    pub fn dead_letter_topic(&self, source: &str) -> String {
        self.dead_letter_topic
            .clone()
            .unwrap_or_else(|| ferry_schemas::dead_letter_topic(source))
    }

    /// `--fallback-topic`, if set.
    pub fn fallback_topic(&self) -> Option<&str> {
        self.fallback_topic.as_deref()
    }

    /// Publishes a final reply keyed by its request id, with the worker's trace context for the
    /// request, and waits for the broker's acknowledgement. Returns the bytes published.
    pub async fn reply(
        &self,
        to: &ReplyTo,
        reply: &Reply,
        trace: Option<&Propagation>,
    ) -> Result<Vec<u8>, PublishError> {
        let body = serde_json::to_vec(reply)?;
        self.reply_bytes(to, reply.id(), reply.kind(), &body, trace).await?;
        Ok(body)
    }

    /// Publishes reply bytes as they were first published (a done marker's).
    pub async fn reply_bytes(
        &self,
        to: &ReplyTo,
        id: &str,
        kind: &str,
        body: &[u8],
        trace: Option<&Propagation>,
    ) -> Result<(), PublishError> {
        self.send(Outgoing {
            to: Destination::Reply(to),
            key: Some(id.as_bytes()),
            payload: body,
            headers: reply_headers(kind, trace),
        })
        .await
    }

    /// Queues a stream chunk without waiting for it: chunks are a preview, the final reply
    /// (published after them on the same partition, so after them in the log) is what counts.
    /// Returns its delivery report's future, for a caller that must order the final reply after
    /// it on another producer (exactly-once).
    pub fn chunk(&self, to: &ReplyTo, chunk: &Chunk, trace: Option<&Propagation>) -> Option<DeliveryFuture> {
        let reply = Reply::Chunk(chunk.clone());
        let body = serde_json::to_vec(&reply).ok()?;
        let queued = self.queue(Outgoing {
            to: Destination::Reply(to),
            key: Some(chunk.id.as_bytes()),
            payload: &body,
            headers: reply_headers(reply.kind(), trace),
        });
        match queued {
            Ok(delivery) => Some(delivery),
            Err(why) => {
                warn!(error = %why, seq = chunk.seq, "not publishing a stream chunk; the final reply still follows");
                None
            }
        }
    }

    /// Publishes a copy of `msg` (its key and value as they are) with `headers` to the fallback
    /// topic, and waits for the broker's acknowledgement: only then may the original offset be
    /// committed (see [`super::fallback`]). Without a fallback topic, nothing is sent.
    pub async fn hand_off(&self, msg: &OwnedMessage, headers: OwnedHeaders) -> Result<(), PublishError> {
        let Some(topic) = &self.fallback_topic else {
            return Err(PublishError::Worker(WorkerError::Topics(
                "a hand-off without --fallback-topic (a bug)".into(),
            )));
        };
        self.send(Outgoing {
            to: Destination::Fallback(topic),
            key: msg.key(),
            payload: msg.payload().unwrap_or_default(),
            headers,
        })
        .await
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
