//! Building the messages the worker publishes: responses, error replies, dead-letter records.
//! Pure functions of their inputs, so their shapes are tested without a broker.

use std::time::Duration;

use ferry_schemas::{
    DeadLetter, ErrorDetail, ErrorReply, Reply, Request, Response, SourceRecord, Timings, Usage, SCHEMA_VERSION,
};
use time::OffsetDateTime;

use crate::engine::Completion;
use crate::intake::Invalid;

/// Facts about the work on one request that are not in the completion.
#[derive(Debug, Clone)]
pub struct WorkContext<'a> {
    pub worker: &'a str,
    pub model: &'a str,
    pub attempt: u32,
    /// From the message's Kafka timestamp to the start of work.
    pub queued: Duration,
    /// From the start of work to now.
    pub total: Duration,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// The reply that answers `req` with `completion`.
pub fn response(req: &Request, completion: &Completion, cx: &WorkContext<'_>) -> Reply {
    let completion_tokens = completion.tokens.len() as u32;
    let prompt_tokens = completion.prompt_tokens as u32;
    Reply::Response(Response {
        version: SCHEMA_VERSION,
        id: req.id.clone(),
        model: cx.model.to_string(),
        text: completion.text.clone(),
        finish_reason: completion.finish.reason,
        stop_sequence: completion.finish.stop_sequence.clone(),
        usage: Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        },
        timings: Timings {
            queued_ms: ms(cx.queued),
            prefill_ms: ms(completion.prefill),
            decode_ms: ms(completion.decode),
            total_ms: ms(cx.total),
        },
        worker: cx.worker.to_string(),
        attempt: cx.attempt,
        resumed_from_token: None,
        metadata: req.metadata.clone(),
    })
}

/// The error reply for a rejected message, when it had a readable id.
pub fn error_reply(invalid: &Invalid, worker: &str, attempt: u32) -> Option<Reply> {
    let id = invalid.id.clone()?;
    Some(Reply::Error(ErrorReply {
        version: SCHEMA_VERSION,
        id,
        error: ErrorDetail {
            code: invalid.code,
            message: invalid.message.clone(),
        },
        worker: worker.to_string(),
        attempt,
        metadata: invalid.metadata.clone(),
    }))
}

/// The dead-letter record for a rejected message.
pub fn dead_letter(invalid: &Invalid, source: SourceRecord, payload: &[u8], worker: &str) -> DeadLetter {
    DeadLetter {
        version: SCHEMA_VERSION,
        reason: ErrorDetail {
            code: invalid.code,
            message: invalid.message.clone(),
        },
        source,
        request_id: invalid.id.clone(),
        payload_base64: DeadLetter::encode_payload(payload),
        worker: worker.to_string(),
        dead_lettered_at: OffsetDateTime::now_utc(),
        attempts: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_schemas::ErrorCode;

    fn invalid(id: Option<&str>) -> Invalid {
        Invalid {
            code: ErrorCode::InvalidRequest,
            message: "max_tokens: must be 1 to 32768, got 0".into(),
            id: id.map(str::to_string),
            reply_to: None,
            metadata: None,
        }
    }

    #[test]
    fn error_reply_needs_an_id() {
        assert!(error_reply(&invalid(None), "w", 1).is_none());
        let reply = error_reply(&invalid(Some("r1")), "w", 1).expect("has id");
        assert_eq!(reply.id(), "r1");
        assert_eq!(reply.kind(), "error");
    }

    #[test]
    fn dead_letter_keeps_the_original_bytes() {
        let source = SourceRecord {
            topic: "t".into(),
            partition: 2,
            offset: 9,
            key: None,
            timestamp_ms: None,
        };
        let dl = dead_letter(&invalid(Some("r1")), source, b"\x00\xffraw", "w");
        assert_eq!(dl.payload().ok(), Some(b"\x00\xffraw".to_vec()));
        assert_eq!(dl.source.offset, 9);
        assert_eq!(dl.reason.code, ErrorCode::InvalidRequest);
    }
}
