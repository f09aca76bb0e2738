//! The message contract of Ferry, as serde types.
//!
//! The language-neutral contract is the set of JSON Schema files beside this crate
//! (`schemas/*.schema.json`); these types are its Rust form, and a test validates every example
//! message against its schema and round-trips it through these types. The limits below are the
//! same numbers the schema files state, so a client in any language learns them from the schema.
//!
//! Deserialising only checks shapes and types; [`Request::validate`] checks the ranges and the
//! cross-field rules (exactly one of `messages` and `prompt`). A worker runs both before it
//! spends any compute, and anything that fails goes to the dead-letter topic with the reason.
//!
//! # Messages
//!
//! - [`Request`]: what a caller publishes to a request topic, keyed by its `id`.
//! - [`Reply`]: what the worker publishes to the request's `reply_to` topic, keyed by the same
//!   `id`, told apart by the `kind` field: a [`Response`] or an [`ErrorReply`], the final reply,
//!   and for a request with `stream: true`, [`Chunk`]s of the text before it. Chunks are
//!   numbered by generation step so that a resumed generation can resend them safely; see
//!   [`Chunk`] for how a client puts them together.
//! - [`DeadLetter`]: what the worker publishes to `<request topic>.dlq` for a message it could
//!   not serve, with the original bytes and, when known, its history of [`Attempt`]s.

mod dead_letter;
mod limits;
mod reply;
mod request;

pub use dead_letter::{Attempt, AttemptOutcome, DeadLetter, SourceRecord};
pub use limits::*;
pub use reply::{Chunk, ErrorCode, ErrorDetail, ErrorReply, FinishReason, Reply, Response, Timings, Usage};
pub use request::{ChatMessage, Request, Role, ValidationError};

/// The version of the message contract these types implement. Every message carries it in its
/// `version` field (defaulting to this value when a request omits it).
pub const SCHEMA_VERSION: u32 = 1;

/// Kafka header names Ferry reads and writes. Headers are optional for callers; they let
/// consumers route or filter replies without parsing the JSON body.
pub mod headers {
    /// On replies: `response`, `error` or `chunk`, the same as the body's `kind`.
    pub const KIND: &str = "ferry-kind";
    /// On every message Ferry writes: the contract version, as decimal text.
    pub const SCHEMA_VERSION: &str = "ferry-schema-version";
    /// On dead-letter records: the machine-readable reason code.
    pub const DLQ_REASON: &str = "ferry-dlq-reason";
    /// W3C trace context. On a request: the caller's span. On what a worker publishes for it
    /// (chunks, the reply, the dead-letter record): the same trace id and flags with the
    /// worker's own span id, so the worker appears as a child span of the caller.
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C vendor trace state, passed from a request to its replies unchanged (only beside a
    /// valid `traceparent`).
    pub const TRACESTATE: &str = "tracestate";
    /// On a request a worker handed to its fallback topic: why (`out_of_memory`,
    /// `circuit_breaker_open`, `accelerator_unhealthy`). Its presence marks the message as
    /// handed off, and a handed-off request is never handed off again.
    pub const HANDOFF_REASON: &str = "ferry-handoff-reason";
    /// On a handed-off request: the worker that handed it off (its pod name in Kubernetes).
    pub const HANDOFF_WORKER: &str = "ferry-handoff-worker";
    /// On a handed-off request: the model of the worker that handed it off.
    pub const HANDOFF_MODEL: &str = "ferry-handoff-model";
    /// On a handed-off request: where it was read from, `topic/partition/offset`.
    pub const HANDOFF_SOURCE: &str = "ferry-handoff-source";
    /// On a handed-off request: the error that made the worker hand it off, for a person.
    pub const HANDOFF_ERROR: &str = "ferry-handoff-error";
}

/// The dead-letter topic for a request topic: `<topic>.dlq`.
pub fn dead_letter_topic(request_topic: &str) -> String {
    format!("{request_topic}.dlq")
}
