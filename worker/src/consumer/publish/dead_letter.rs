//! Dead letters: the record on the dead-letter topic, and the error reply that tells the caller
//! where the caller can be told.

use ferry_schemas::{headers, Attempt, ErrorCode, Reply, SourceRecord, SCHEMA_VERSION};
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
use rdkafka::Message;
use tracing::{error, warn};

use super::gate::{record_size, Destination, Outgoing};
use super::{with_trace, PublishError, Publisher, RefusedKind, ReplyTo};
use crate::consumer::WorkerError;
use crate::intake::Invalid;
use crate::ops::trace::Propagation;
use crate::reply;

/// What became of a dead-lettered message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadLettered {
    /// The dead-letter record was published.
    pub stored: bool,
    /// The caller got an error reply.
    pub told: bool,
}

impl Publisher {
    /// Dead-letters a message with the reason (and its attempts, when it used them up), and
    /// tells its caller with an error reply when the caller can be told. Returns whether it was.
    ///
    /// The error reply goes where a reply would, through the same policy: a `reply_to` salvaged
    /// from a message that does not parse is checked as a valid request's is, and one the policy
    /// refuses gets nothing (the dead letter says why). So a message cannot plant an error
    /// record, under an id of its choosing, in a topic the worker would never answer on.
    ///
    /// The record always fits `--max-record-bytes`: the original bytes are cut when they must be
    /// ([`reply::fit_dead_letter`]). If the dead-letter topic refuses it for a reason of the
    /// record's, the refusal is logged as an error and counted, and the message is settled all
    /// the same: a dead letter that cannot be written must not stop its partition (the topics
    /// are checked at start-up, see [`Publisher::check_topics`]). If the dead-letter topic cannot
    /// take a record in time ([`RefusedKind::Unavailable`]), the cluster is in trouble, not the
    /// message: the worker stops, and the message is redelivered.
    pub async fn dead_letter(
        &self,
        msg: &OwnedMessage,
        invalid: &Invalid,
        attempts: Vec<Attempt>,
        consumer: &impl Consumer<crate::consumer::inflight::WorkerContext>,
        trace: Option<&Propagation>,
    ) -> Result<DeadLettered, PublishError> {
        let dlq_topic = self.dead_letter_topic(msg.topic());
        let (tell, why_not) = self.error_reply_topic(invalid, consumer);
        let mut invalid = invalid.clone();
        if let Some(why) = &why_not {
            invalid.message = format!("{}; no error reply: {why}", invalid.message);
        }
        let invalid = &invalid;
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
                let sent = self
                    .send(Outgoing {
                        to: Destination::DeadLetter(&dlq_topic),
                        key,
                        payload: &body,
                        headers: hdrs,
                    })
                    .await;
                match sent {
                    Ok(()) => true,
                    Err(PublishError::Refused(r)) if r.kind == RefusedKind::Unavailable => {
                        error!(error = %r, "the dead-letter topic cannot take a record either: the cluster is in trouble, stopping");
                        let source = r.source.unwrap_or(KafkaError::Canceled);
                        return Err(PublishError::Worker(WorkerError::Publish {
                            topic: dlq_topic,
                            source,
                        }));
                    }
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
        if let (Some(to), Some(mut reply)) = (tell, reply::error_reply(invalid, &self.worker_id, attempt)) {
            for last_try in [false, true] {
                match self.reply(&to, &reply, trace).await {
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
        Ok(DeadLettered { stored, told })
    }

    /// Where the error reply for `invalid` goes, or why there is none (`None` with no reason:
    /// the caller cannot be told, having no readable id).
    fn error_reply_topic(
        &self,
        invalid: &Invalid,
        consumer: &impl Consumer<crate::consumer::inflight::WorkerContext>,
    ) -> (Option<ReplyTo>, Option<String>) {
        if invalid.id.is_none() {
            return (None, None);
        }
        // A reply topic that is itself the problem gets nothing: the default reply topic is not
        // the caller's, and the forbidden or refused one must not be written.
        if matches!(
            invalid.code,
            ErrorCode::ReplyTopicForbidden | ErrorCode::ReplyTopicUnwritable
        ) {
            warn!("no error reply: the reply topic is the problem");
            return (None, None);
        }
        match self.reply_to(invalid.reply_to.as_deref()) {
            Err(why) => {
                warn!(reason = %why, "no error reply: the reply topic is not allowed");
                (None, Some(why))
            }
            Ok(to) if !self.topic_exists(to.as_str(), consumer) => {
                warn!(topic = %to, "no error reply: the reply topic does not exist");
                (None, None)
            }
            Ok(to) => (Some(to), None),
        }
    }
}
