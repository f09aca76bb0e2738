//! What a worker publishes to the reply topic.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A message on a reply topic, keyed by the request id: the answer, why there is none, or, for
/// a request with `stream: true`, a piece of the answer sent ahead of it.
///
/// Every processing of a request ends with exactly one final reply, a [`Reply::Response`] or a
/// [`Reply::Error`]; any [`Reply::Chunk`]s come before it on the same partition, because they
/// share its key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reply {
    Response(Response),
    Error(ErrorReply),
    Chunk(Chunk),
}

impl Reply {
    /// The id of the request this reply answers.
    pub fn id(&self) -> &str {
        match self {
            Reply::Response(r) => &r.id,
            Reply::Error(e) => &e.id,
            Reply::Chunk(c) => &c.id,
        }
    }

    /// Whether this reply ends the request: a response or an error, not a chunk. A client that
    /// waits for the answer skips replies for which this is false.
    pub fn is_final(&self) -> bool {
        match self {
            Reply::Response(_) | Reply::Error(_) => true,
            Reply::Chunk(_) => false,
        }
    }

    /// The value of the `ferry-kind` header for this reply.
    pub fn kind(&self) -> &'static str {
        match self {
            Reply::Response(_) => "response",
            Reply::Error(_) => "error",
            Reply::Chunk(_) => "chunk",
        }
    }
}

/// A piece of the generated text, published ahead of the final reply when the request asked for
/// `stream: true`.
///
/// # Numbering, and why a chunk can arrive twice
///
/// `seq` is the number of the generation step that released `text`, counted from 0 over the
/// whole generation; it is not a count of chunks. A step that releases no text (for example a
/// token that is only part of a character, or text held back while it may still turn into a
/// stop string) sends no chunk, so seqs can have gaps. When a worker resumes an interrupted
/// generation from a snapshot, it continues from the snapshot's step with the same numbering,
/// so the chunks the first worker sent after that step come again, with the same seq and the
/// same text.
///
/// A client therefore keeps the highest seq it has seen for a request and appends a chunk's
/// text only when its seq is higher; the concatenation is then the final response's `text`.
/// The final [`Response`] (or [`ErrorReply`]) always follows the chunks on the same partition,
/// since it has the same key, and it is authoritative: a client that only wants the answer
/// ignores chunks altogether. As with any reply, a redelivered request can be processed again,
/// so a client that has its final reply ignores later messages for that id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Chunk {
    pub version: u32,
    /// The request's id.
    pub id: String,
    /// The generation step that released `text`, from 0; see the type's documentation.
    pub seq: u32,
    /// The text released at that step.
    pub text: String,
}

/// The answer to a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Response {
    pub version: u32,
    /// The request's id.
    pub id: String,
    /// The model that produced the text.
    pub model: String,
    /// The generated text, without the stop string that ended it.
    pub text: String,
    pub finish_reason: FinishReason,
    /// The stop string that ended generation, when `finish_reason` is `stop` because of one.
    #[serde(default)]
    pub stop_sequence: Option<String>,
    pub usage: Usage,
    pub timings: Timings,
    /// The worker that answered (its pod name in Kubernetes).
    pub worker: String,
    /// How many workers have worked on this request, as far as its snapshots record: 1 for a
    /// generation run from the start, n + 1 for one resumed from a snapshot written by the n-th.
    /// A worker that dies before its first snapshot leaves no record, so a redelivery can still
    /// say 1 (durable attempt counting is the delivery issue's).
    pub attempt: u32,
    /// When the generation continued from a snapshot, the number of generated tokens it
    /// started from; null for a generation run from the start.
    pub resumed_from_token: Option<u32>,
    /// The request's `metadata`, unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Map<String, Value>>,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model produced its end-of-sequence token, or a stop string appeared.
    Stop,
    /// `max_tokens` tokens were generated.
    Length,
    /// The model's context window filled up.
    ContextLength,
    /// The request's deadline passed.
    Deadline,
}

/// Token counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

/// Where the time went, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timings {
    /// From the request's Kafka timestamp to the moment the worker started on it.
    pub queued_ms: f64,
    /// Processing the prompt.
    pub prefill_ms: f64,
    /// Generating the completion.
    pub decode_ms: f64,
    /// From the start of work to the reply being ready (excludes `queued_ms`).
    pub total_ms: f64,
}

/// The reply sent instead of an answer when a request cannot be served.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorReply {
    pub version: u32,
    /// The request's id.
    pub id: String,
    pub error: ErrorDetail,
    /// The worker that rejected the request.
    pub worker: String,
    pub attempt: u32,
    /// The request's `metadata`, when it could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Map<String, Value>>,
}

/// What went wrong, for a program (`code`) and for a person (`message`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    pub message: String,
}

/// Why a message could not be served. Also the reason code of a dead-letter record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The bytes are not JSON (or not UTF-8).
    InvalidJson,
    /// JSON, but not a request: a missing field, a wrong type, an unknown field.
    InvalidSchema,
    /// A request whose values break a limit of the contract.
    InvalidRequest,
    /// The prompt does not fit in the model's context window.
    PromptTooLong,
    /// The request names a model this worker does not serve.
    UnknownModel,
    /// The chat could not be rendered with the model's template.
    TemplateError,
    /// The engine failed on a valid request.
    EngineError,
    /// The request failed, or its worker died, `--max-attempts` times; it is in the dead-letter
    /// topic with its history ([`crate::DeadLetter::attempts`]).
    AttemptsExhausted,
    /// The request names a reply topic this worker must not write: an internal topic (`__*`), one
    /// of the fleet's own request, dead-letter, fallback or journal topics, or one outside
    /// `--reply-topic-allow`. Refused before any compute.
    ReplyTopicForbidden,
    /// The broker refused to let the worker write the reply topic (it does not exist, its name is
    /// invalid, the worker is not authorised, or a topic policy refused the record).
    ReplyTopicUnwritable,
    /// The answer would be larger than the worker may publish (`--max-record-bytes`, or the
    /// broker's own limit for the topic).
    ReplyTooLarge,
}

impl ErrorCode {
    /// Every code, in the order of the schema's enum.
    pub const ALL: [ErrorCode; 11] = [
        ErrorCode::InvalidJson,
        ErrorCode::InvalidSchema,
        ErrorCode::InvalidRequest,
        ErrorCode::PromptTooLong,
        ErrorCode::UnknownModel,
        ErrorCode::TemplateError,
        ErrorCode::EngineError,
        ErrorCode::AttemptsExhausted,
        ErrorCode::ReplyTopicForbidden,
        ErrorCode::ReplyTopicUnwritable,
        ErrorCode::ReplyTooLarge,
    ];

    /// The code as it appears in JSON and in the `ferry-dlq-reason` header.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidSchema => "invalid_schema",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::PromptTooLong => "prompt_too_long",
            ErrorCode::UnknownModel => "unknown_model",
            ErrorCode::TemplateError => "template_error",
            ErrorCode::EngineError => "engine_error",
            ErrorCode::AttemptsExhausted => "attempts_exhausted",
            ErrorCode::ReplyTopicForbidden => "reply_topic_forbidden",
            ErrorCode::ReplyTopicUnwritable => "reply_topic_unwritable",
            ErrorCode::ReplyTooLarge => "reply_too_large",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_code_strings_match_serde() {
        for code in ErrorCode::ALL {
            assert_eq!(
                serde_json::to_value(code).ok(),
                Some(Value::String(code.as_str().into()))
            );
        }
    }
}
