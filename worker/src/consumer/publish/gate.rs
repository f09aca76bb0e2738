//! The one gate every record of the worker's passes: where it may go, how large it may be, what
//! its headers may hold, and what a failure to publish it means.
//!
//! A record is an [`Outgoing`], and only [`Publisher::send`] turns one into a Kafka record. Its
//! [`Destination`] says which of three kinds of topic it goes to, and each kind has one way to be
//! made: a reply topic only from a [`ReplyTo`], which only [`Publisher::reply_to`] makes, through
//! the [`ReplyTopicPolicy`]; the dead-letter and fallback topics only from the worker's own
//! configuration. So no path of the worker, old or new, can write a reply to a topic the policy
//! refuses: there is no other way to name one (the `tidy` test keeps `FutureRecord::to` out of
//! every other file but the transaction's replay of records that came through here).
//!
//! In order, a record meets the reply-topic policy (when its [`ReplyTo`] is made: a reply
//! topic has no other way in), then in [`Publisher::send`] the header bounds and the record
//! budget (`--max-record-bytes`), and is then sent, a failure classified by what the broker said
//! ([`record_level`]).

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureRecord};

use super::{PublishError, Publisher};
use crate::consumer::{transaction, WorkerError};

/// At most this many headers on a record (a hand-off's copy keeps the original's).
pub const MAX_HEADERS: usize = 1_000;
/// The longest value of a header of the worker's own (`ferry-*`, `traceparent`, `tracestate`).
pub const MAX_OWN_HEADER_BYTES: usize = 1_024;

/// A reply topic the [`ReplyTopicPolicy`](crate::reply_topics::ReplyTopicPolicy) allows. The
/// field is private: [`Publisher::reply_to`] is the only way to make one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyTo(pub(super) String);

impl ReplyTo {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ReplyTo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a record goes.
#[derive(Debug, Clone, Copy)]
pub(super) enum Destination<'a> {
    /// A caller's reply topic: replies, error replies, chunks, stored answers.
    Reply(&'a ReplyTo),
    /// The dead-letter topic of the lane the message came from.
    DeadLetter(&'a str),
    /// `--fallback-topic`.
    Fallback(&'a str),
}

impl<'a> Destination<'a> {
    pub(super) fn topic(&self) -> &'a str {
        match self {
            Destination::Reply(r) => r.as_str(),
            Destination::DeadLetter(t) | Destination::Fallback(t) => t,
        }
    }
}

/// A record on its way to the gate.
pub(super) struct Outgoing<'a> {
    pub to: Destination<'a>,
    pub key: Option<&'a [u8]>,
    pub payload: &'a [u8],
    pub headers: OwnedHeaders,
}

/// Why one record was not published: the failure of the request it belongs to, not of the
/// worker (see the module doc of [`super`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the record for {topic} was refused: {reason}")]
pub struct Refused {
    pub topic: String,
    pub kind: RefusedKind,
    pub reason: String,
    /// The producer's error, when the broker or librdkafka refused it.
    pub source: Option<KafkaError>,
}

/// What about a record was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusedKind {
    /// Larger than `--max-record-bytes` or than the broker accepts, or headers out of bounds.
    TooLarge,
    /// The topic: unknown, invalid, not authorised, a policy refused the record, or the record
    /// itself is invalid for it (its timestamp).
    Topic,
    /// The topic or its partition could not take the record in time: too few in-sync replicas,
    /// no leader, a timeout. That may be the topic's trouble or the whole cluster's: a reply
    /// refused so is dead-lettered, and if the dead-letter topic cannot take a record either,
    /// the worker stops (see [`super::Publisher::dead_letter`]), so it is the request's failure
    /// only where another topic was written.
    Unavailable,
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
        | C::InvalidRecord
        | C::InvalidTimestamp => Some(RefusedKind::Topic),
        C::NotEnoughReplicas
        | C::NotEnoughReplicasAfterAppend
        | C::MessageTimedOut
        | C::RequestTimedOut
        | C::LeaderNotAvailable
        | C::NotLeaderForPartition
        | C::KafkaStorageError => Some(RefusedKind::Unavailable),
        _ => None,
    }
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
            source: Some(source),
        }),
        None => PublishError::Worker(WorkerError::Publish {
            topic: topic.to_string(),
            source,
        }),
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

/// Whether a header is one the worker writes of its own.
fn is_own_header(key: &str) -> bool {
    key.starts_with("ferry-") || key == ferry_schemas::headers::TRACEPARENT || key == ferry_schemas::headers::TRACESTATE
}

/// The header bounds: `Err(why)` when they are broken.
pub(super) fn check_headers(headers: &OwnedHeaders) -> Result<(), String> {
    if headers.count() > MAX_HEADERS {
        return Err(format!("{} headers, more than {MAX_HEADERS}", headers.count()));
    }
    for h in headers.iter() {
        let len = h.value.map_or(0, <[u8]>::len);
        if is_own_header(h.key) && len > MAX_OWN_HEADER_BYTES {
            return Err(format!(
                "the header {:?} holds {len} bytes, more than {MAX_OWN_HEADER_BYTES}",
                h.key
            ));
        }
    }
    Ok(())
}

impl Publisher {
    /// The checks every record passes before it is sent, after its destination (whose reply
    /// topic the policy allowed when its [`ReplyTo`] was made): the header bounds, then the
    /// record budget. Returns the record to send, or why it is too large.
    fn checked<'a>(&self, out: Outgoing<'a>) -> Result<FutureRecord<'a, [u8], [u8]>, String> {
        check_headers(&out.headers)?;
        let size = record_size(out.key, Some(out.payload), Some(&out.headers));
        if size > self.max_record_bytes {
            return Err(format!(
                "{size} bytes, more than --max-record-bytes {}",
                self.max_record_bytes
            ));
        }
        let mut rec = FutureRecord::<[u8], [u8]>::to(out.to.topic())
            .payload(out.payload)
            .headers(out.headers);
        if let Some(key) = out.key {
            rec = rec.key(key);
        }
        Ok(rec)
    }

    /// The gate: checks the record, sends it, waits for the broker's acknowledgement (or hands it
    /// to the request's transaction), and classifies a failure. A refusal of this one record is
    /// [`PublishError::Refused`]; anything else stops the worker.
    pub(super) async fn send(&self, out: Outgoing<'_>) -> Result<(), PublishError> {
        let topic = out.to.topic();
        let rec = self.checked(out).map_err(|reason| {
            PublishError::Refused(Refused {
                topic: topic.to_string(),
                kind: RefusedKind::TooLarge,
                reason,
                source: None,
            })
        })?;
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

    /// Queues a record without waiting for its acknowledgement (stream chunks, which are a
    /// preview: the final reply follows them and is what counts), checked as
    /// [`Publisher::send`] checks. The future resolves with its delivery report.
    pub(super) fn queue(&self, out: Outgoing<'_>) -> Result<DeliveryFuture, String> {
        let rec = self.checked(out)?;
        self.producer.send_result(rec).map_err(|(e, _)| e.to_string())
    }
}
