//! What a worker publishes to the dead-letter topic.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::reply::ErrorDetail;

/// A message the worker could not serve, kept with everything needed to inspect or replay it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetter {
    pub version: u32,
    /// Why the message was dead-lettered.
    pub reason: ErrorDetail,
    /// Where the message was read from.
    pub source: SourceRecord,
    /// The request id, when the message could be read far enough to find one.
    pub request_id: Option<String>,
    /// The message's value exactly as it was read, base64-encoded (standard alphabet, padded);
    /// only its first bytes when [`DeadLetter::payload_truncated`] (a dead letter must fit in one
    /// Kafka record however large the original was).
    pub payload_base64: String,
    /// The size in bytes of the original value, whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_size: Option<u64>,
    /// The SHA-256 of the original value, whole, in lowercase hex: what a replay of a truncated
    /// record can be checked against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_sha256: Option<String>,
    /// Whether `payload_base64` holds only a prefix of the original value.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub payload_truncated: bool,
    /// The worker that dead-lettered it.
    pub worker: String,
    #[serde(with = "time::serde::rfc3339")]
    pub dead_lettered_at: OffsetDateTime,
    /// The attempts to serve the request, oldest first, as far as they were recorded: a record
    /// with the reason `attempts_exhausted` carries them; one refused before any attempt (not
    /// JSON, not a valid request) has none. Omitted from the JSON when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<Attempt>,
}

impl DeadLetter {
    /// Encodes the original bytes for [`DeadLetter::payload_base64`].
    pub fn encode_payload(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    /// The original bytes of the message.
    pub fn payload(&self) -> Result<Vec<u8>, base64::DecodeError> {
        base64::engine::general_purpose::STANDARD.decode(&self.payload_base64)
    }
}

/// One attempt to serve a request: which worker took it, when, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attempt {
    /// The attempt's number, counting from 1.
    pub attempt: u32,
    /// The worker that made it (its pod name in Kubernetes).
    pub worker: String,
    /// When the worker started on the request.
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    pub outcome: AttemptOutcome,
    /// What went wrong, for a person, when the worker recorded it (a `failed` attempt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    /// The worker stopped without recording an outcome: a crash or the loss of its node.
    Died,
    /// Generation returned an error.
    Failed,
    /// The worker stopped on purpose, for a drain or a rebalance. Not counted against the
    /// `--max-attempts` budget.
    Suspended,
}

/// The Kafka coordinates of the original message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// The message key, when it had one and it was UTF-8.
    pub key: Option<String>,
    /// The message's Kafka timestamp, in milliseconds since the Unix epoch, when it had one.
    pub timestamp_ms: Option<i64>,
}
