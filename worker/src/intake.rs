//! From a Kafka message's bytes to a valid request, or the reason it is not one.
//!
//! This is pure: no I/O, so every kind of bad input is tested directly. When a message is
//! rejected, whatever could still be read of it (its id, its `reply_to`, its metadata) is kept,
//! so that the caller can be told even when the rest is wrong.

use ferry_schemas::{ErrorCode, Request};
use serde_json::{Map, Value};

/// A message that is not a valid request.
#[derive(Debug, Clone, PartialEq)]
pub struct Invalid {
    pub code: ErrorCode,
    pub message: String,
    /// The request id, if the message had a readable one.
    pub id: Option<String>,
    /// The reply topic, if the message named a readable one.
    pub reply_to: Option<String>,
    pub metadata: Option<Map<String, Value>>,
}

/// Parses and validates a message value.
pub fn parse(payload: Option<&[u8]>) -> Result<Request, Box<Invalid>> {
    let bare = |code, message: String| {
        Box::new(Invalid {
            code,
            message,
            id: None,
            reply_to: None,
            metadata: None,
        })
    };
    let Some(bytes) = payload else {
        return Err(bare(ErrorCode::InvalidJson, "the message has no value".into()));
    };
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| bare(ErrorCode::InvalidJson, format!("the message is not JSON: {e}")))?;
    // Keep what can be salvaged for an error reply before the strict parse.
    let salvage = |code, message: String| {
        let field = |k: &str| value.get(k).and_then(Value::as_str).map(str::to_string);
        let id = field("id").filter(|id| !id.is_empty() && id.len() <= ferry_schemas::MAX_ID_LEN);
        let reply_to = field("reply_to").filter(|t| valid_topic(t));
        // Metadata is echoed on the error reply only when it keeps within the contract's limit:
        // an oversized one may be the very reason for the rejection.
        let metadata = value
            .get("metadata")
            .and_then(Value::as_object)
            .filter(|m| serde_json::to_vec(m).is_ok_and(|b| b.len() <= ferry_schemas::MAX_METADATA_BYTES))
            .cloned();
        Box::new(Invalid {
            code,
            message,
            id,
            reply_to,
            metadata,
        })
    };
    if !value.is_object() {
        return Err(salvage(
            ErrorCode::InvalidSchema,
            "the message must be a JSON object".into(),
        ));
    }
    // The strict parse reads the bytes again rather than the `Value`: a `Value` keeps only the
    // last of two fields with one name, and a request such as `{"prompt":"a","prompt":"b"}`
    // must be refused, not read one way here and another way by whatever checked it upstream.
    let request: Request = serde_json::from_slice(bytes)
        .map_err(|e| salvage(ErrorCode::InvalidSchema, format!("not a valid request: {e}")))?;
    request
        .validate()
        .map_err(|e| salvage(ErrorCode::InvalidRequest, e.to_string()))?;
    Ok(request)
}

fn valid_topic(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= ferry_schemas::MAX_TOPIC_LEN
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(payload: &[u8]) -> ErrorCode {
        parse(Some(payload)).expect_err("must be rejected").code
    }

    #[test]
    fn accepts_a_valid_request() {
        let r = parse(Some(br#"{"id":"a","prompt":"hi","max_tokens":3}"#)).expect("valid");
        assert_eq!(r.id, "a");
    }

    #[test]
    fn classifies_each_kind_of_bad_message() {
        assert_eq!(code(b"\xff\xfe not utf8"), ErrorCode::InvalidJson);
        assert_eq!(code(b"{not json"), ErrorCode::InvalidJson);
        assert_eq!(code(b"[1,2]"), ErrorCode::InvalidSchema);
        assert_eq!(code(br#"{"id":"a","prompt":5}"#), ErrorCode::InvalidSchema);
        assert_eq!(code(br#"{"id":"a"}"#), ErrorCode::InvalidRequest);
        assert_eq!(
            code(br#"{"id":"a","prompt":"x","prompt":"y"}"#),
            ErrorCode::InvalidSchema
        );
        assert_eq!(
            code(br#"{"id":"a","prompt":"x","temperature":9}"#),
            ErrorCode::InvalidRequest
        );
        assert_eq!(parse(None).expect_err("empty").code, ErrorCode::InvalidJson);
    }

    #[test]
    fn salvages_id_reply_to_and_metadata() {
        let bad = parse(Some(
            br#"{"id":"a","reply_to":"r.t","prompt":"x","max_tokens":-1,"metadata":{"k":1}}"#,
        ))
        .expect_err("negative max_tokens");
        assert_eq!(bad.id.as_deref(), Some("a"));
        assert_eq!(bad.reply_to.as_deref(), Some("r.t"));
        assert_eq!(bad.metadata.and_then(|m| m.get("k").cloned()), Some(Value::from(1)));
        let bad = parse(Some(br#"{"id":"a","reply_to":"no spaces allowed","prompt":3}"#)).expect_err("bad");
        assert_eq!(bad.reply_to, None);
    }

    #[test]
    fn oversized_metadata_is_not_salvaged_for_the_error_reply() {
        let big = "x".repeat(ferry_schemas::MAX_METADATA_BYTES + 1);
        let msg = serde_json::json!({"id": "a", "prompt": "hi", "metadata": {"k": big}});
        let bad = parse(Some(&serde_json::to_vec(&msg).expect("json"))).expect_err("metadata too large");
        assert_eq!(bad.code, ErrorCode::InvalidRequest);
        assert_eq!(bad.id.as_deref(), Some("a"));
        assert_eq!(bad.metadata, None);
    }
}
