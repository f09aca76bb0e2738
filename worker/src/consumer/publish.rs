//! Writing to Kafka: replies, stream chunks and dead-letter records, each acknowledged by the
//! broker (`acks=all`, idempotent producer) before the worker counts it as published.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use ferry_schemas::{headers, Attempt, Chunk, Reply, SourceRecord, SCHEMA_VERSION};
use rdkafka::consumer::Consumer;
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use tracing::warn;

use super::WorkerError;
use crate::intake::Invalid;
use crate::ops::trace::Propagation;
use crate::reply;

/// The producer side of a worker.
pub struct Publisher {
    pub producer: FutureProducer,
    pub worker_id: String,
    pub timeout: Duration,
    /// Reply topics already seen to exist, so metadata is asked once per topic.
    known_topics: Mutex<HashSet<String>>,
}

impl Publisher {
    pub fn new(producer: FutureProducer, worker_id: String, timeout: Duration) -> Self {
        Self {
            producer,
            worker_id,
            timeout,
            known_topics: Mutex::new(HashSet::new()),
        }
    }

    /// Publishes a final reply (or a chunk) keyed by its request id, with the worker's trace
    /// context for the request, and waits for the broker's acknowledgement.
    pub async fn reply(&self, topic: &str, reply: &Reply, trace: Option<&Propagation>) -> Result<Vec<u8>, WorkerError> {
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
    ) -> Result<(), WorkerError> {
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
        if let Err((e, _)) = self.producer.send_result(rec) {
            warn!(error = %e, seq = chunk.seq, "cannot queue a stream chunk; the final reply still follows");
        }
    }

    /// Dead-letters a message with the reason (and its attempts, when it used them up), and
    /// tells its caller with an error reply when the caller can be told. Returns whether it was.
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
    ) -> Result<bool, WorkerError> {
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
        let attempt = attempts.len().max(1) as u32;
        let mut record = reply::dead_letter(invalid, source, msg.payload().unwrap_or_default(), &self.worker_id);
        record.attempts = attempts;
        let body = serde_json::to_vec(&record)?;
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
        let mut rec = FutureRecord::<[u8], [u8]>::to(dlq_topic).payload(&body).headers(hdrs);
        if let Some(key) = msg.key() {
            rec = rec.key(key);
        }
        self.send(dlq_topic, rec).await?;
        if let Some(reply) = reply::error_reply(invalid, &self.worker_id, attempt) {
            let topic = invalid
                .reply_to
                .clone()
                .unwrap_or_else(|| default_reply_topic.to_string());
            if self.topic_exists(&topic, consumer) {
                self.reply(&topic, &reply, trace).await?;
                return Ok(true);
            }
            warn!(topic, "no error reply: the reply topic does not exist");
        }
        Ok(false)
    }

    /// Publishes a copy of `msg` (its key and value as they are) with `headers` to the fallback
    /// topic, and waits for the broker's acknowledgement: only then may the original offset be
    /// committed (see [`super::fallback`]).
    pub async fn hand_off(&self, topic: &str, msg: &OwnedMessage, headers: OwnedHeaders) -> Result<(), WorkerError> {
        let mut rec = FutureRecord::<[u8], [u8]>::to(topic)
            .payload(msg.payload().unwrap_or_default())
            .headers(headers);
        if let Some(key) = msg.key() {
            rec = rec.key(key);
        }
        self.send(topic, rec).await
    }

    /// Sends and waits for the delivery report.
    async fn send<K: rdkafka::message::ToBytes + ?Sized>(
        &self,
        topic: &str,
        rec: FutureRecord<'_, K, [u8]>,
    ) -> Result<(), WorkerError> {
        match self.producer.send(rec, self.timeout).await {
            Ok(_) => Ok(()),
            Err((source, _)) => Err(WorkerError::Publish {
                topic: topic.to_string(),
                source,
            }),
        }
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
mod tests {
    use super::*;
    use rdkafka::message::Headers;

    fn header<'a>(h: &'a OwnedHeaders, key: &str) -> Option<&'a str> {
        h.iter()
            .find(|x| x.key == key)
            .and_then(|x| x.value)
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    #[test]
    fn replies_carry_the_workers_span_of_the_callers_trace() {
        let trace = Propagation::from_headers(
            Some(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some(b"congo=t61rcWkgMzE"),
            [0x11; 8],
        )
        .expect("valid")
        .expect("present");
        let h = reply_headers("response", Some(&trace));
        assert_eq!(header(&h, headers::KIND), Some("response"));
        assert_eq!(
            header(&h, headers::TRACEPARENT),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-1111111111111111-01")
        );
        assert_eq!(header(&h, headers::TRACESTATE), Some("congo=t61rcWkgMzE"));
        let none = reply_headers("chunk", None);
        assert_eq!(header(&none, headers::TRACEPARENT), None);
        assert_eq!(header(&none, headers::SCHEMA_VERSION), Some("1"));
    }
}
