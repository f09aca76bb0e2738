//! Building the messages the worker publishes: responses, error replies, dead-letter records.
//! Pure functions of their inputs, so their shapes are tested without a broker.

use std::time::Duration;

use ferry_schemas::{
    DeadLetter, ErrorDetail, ErrorReply, Reply, Request, Response, SourceRecord, Timings, Usage, SCHEMA_VERSION,
};
use sha2::{Digest, Sha256};
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
        resumed_from_token: completion.resumed_from,
        metadata: req.metadata.clone(),
    })
}

/// Most bytes of a reason's message in an error reply or a dead letter. Messages quote parts of
/// the input (serde names the value of a wrong type), so an input of megabytes would otherwise
/// make a reason of megabytes.
pub const MAX_REASON_BYTES: usize = 1024;

/// Most bytes of the original key kept on a dead letter (as its record key and in `source.key`).
pub const MAX_KEPT_KEY_BYTES: usize = 1024;

/// `s` cut to at most `max` bytes on a character boundary, with `…` when it was cut.
pub fn truncate_utf8(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// The error reply for a rejected message, when it had a readable id.
pub fn error_reply(invalid: &Invalid, worker: &str, attempt: u32) -> Option<Reply> {
    let id = invalid.id.clone()?;
    Some(Reply::Error(ErrorReply {
        version: SCHEMA_VERSION,
        id,
        error: ErrorDetail {
            code: invalid.code,
            message: truncate_utf8(&invalid.message, MAX_REASON_BYTES),
        },
        worker: worker.to_string(),
        attempt,
        metadata: invalid.metadata.clone(),
    }))
}

/// The dead-letter record for a rejected message, with the whole payload (see [`fit_dead_letter`]).
pub fn dead_letter(invalid: &Invalid, mut source: SourceRecord, payload: &[u8], worker: &str) -> DeadLetter {
    if source.key.as_ref().is_some_and(|k| k.len() > MAX_KEPT_KEY_BYTES) {
        source.key = None;
    }
    DeadLetter {
        version: SCHEMA_VERSION,
        reason: ErrorDetail {
            code: invalid.code,
            message: truncate_utf8(&invalid.message, MAX_REASON_BYTES),
        },
        source,
        request_id: invalid.id.clone(),
        payload_base64: DeadLetter::encode_payload(payload),
        payload_size: Some(payload.len() as u64),
        payload_sha256: Some(hex(&Sha256::digest(payload))),
        payload_truncated: false,
        worker: worker.to_string(),
        dead_lettered_at: OffsetDateTime::now_utc(),
        attempts: Vec::new(),
    }
}

/// The JSON of `record`, at most `max_bytes` long: when the whole original does not fit, its
/// payload is cut to the longest prefix that does (`payload_truncated`, with `payload_size` and
/// `payload_sha256` still of the whole). `None` when even the record without any payload is
/// larger (only a budget below a few kilobytes allows that).
pub fn fit_dead_letter(record: &mut DeadLetter, original: &[u8], max_bytes: usize) -> Option<Vec<u8>> {
    for a in &mut record.attempts {
        if let Some(e) = &a.error {
            a.error = Some(truncate_utf8(e, MAX_REASON_BYTES));
        }
    }
    let whole = serde_json::to_vec(record).ok()?;
    if whole.len() <= max_bytes {
        return Some(whole);
    }
    record.payload_truncated = true;
    record.payload_base64.clear();
    let bare = serde_json::to_vec(record).ok()?.len();
    let room = max_bytes.checked_sub(bare)?;
    // Base64 writes 4 characters for every 3 bytes; a whole number of groups needs no padding.
    let keep = (room / 4 * 3).min(original.len());
    record.payload_base64 = DeadLetter::encode_payload(&original[..keep]);
    let fitted = serde_json::to_vec(record).ok()?;
    (fitted.len() <= max_bytes).then_some(fitted)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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

    #[test]
    fn a_dead_letter_of_a_huge_message_is_cut_to_fit_and_says_so() {
        let source = SourceRecord {
            topic: "t".into(),
            partition: 0,
            offset: 1,
            key: Some("k".repeat(5000)),
            timestamp_ms: None,
        };
        let original: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut bad = invalid(Some("r1"));
        bad.message = "é".repeat(100_000);
        let mut dl = dead_letter(&bad, source, &original, "w");
        assert_eq!(dl.source.key, None, "a 5 KB key is not copied");
        assert!(dl.reason.message.len() <= MAX_REASON_BYTES);
        for budget in [4_096usize, 10_000, 900_000] {
            let mut d = dl.clone();
            let bytes = fit_dead_letter(&mut d, &original, budget).expect("fits");
            assert!(bytes.len() <= budget, "{} > {budget}", bytes.len());
            assert!(
                bytes.len() > budget - 8,
                "uses the room it has: {} of {budget}",
                bytes.len()
            );
            let back: DeadLetter = serde_json::from_slice(&bytes).expect("valid JSON");
            assert!(back.payload_truncated);
            assert_eq!(back.payload_size, Some(5_000_000));
            let kept = back.payload().expect("base64");
            assert_eq!(&original[..kept.len()], kept.as_slice(), "a prefix of the original");
            assert_eq!(back.payload_sha256, Some(hex(&Sha256::digest(&original))));
        }
        assert_eq!(fit_dead_letter(&mut dl, &original, 100), None);
        let small = b"{}";
        let mut d = dead_letter(&invalid(None), dl.source.clone(), small, "w");
        let bytes = fit_dead_letter(&mut d, small, 4096).expect("fits");
        let back: DeadLetter = serde_json::from_slice(&bytes).expect("json");
        assert!(!back.payload_truncated);
        assert_eq!(back.payload().expect("b64"), small.to_vec());
    }

    #[test]
    fn truncation_keeps_characters_whole() {
        assert_eq!(truncate_utf8("abc", 3), "abc");
        let cut = truncate_utf8("ééééé", 6);
        assert!(cut.len() <= 6 && cut.ends_with('…'), "{cut}");
        assert_eq!(truncate_utf8("abcdef", 4), "a…");
    }
}
