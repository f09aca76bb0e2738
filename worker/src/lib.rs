//! Ferry's worker: consumes generation requests from Kafka, answers them with a local LLM, and
//! commits each request's offset only once its answer is safely published.
//!
//! # Layout
//!
//! Data flows top to bottom:
//!
//! - [`config`]: every setting, from flags or `FERRY_*` environment variables, validated once.
//! - [`consumer`]: the Kafka loop. Reads a message, runs it through [`intake`], hands it to the
//!   engine, publishes the reply or dead-letter record, waits for the broker's acknowledgement,
//!   and only then commits the offset.
//! - [`intake`]: bytes to a valid [`ferry_schemas::Request`], or the reason it is not one.
//! - [`engine`]: request to prompt tokens, and the generation loop with sampling and stop rules,
//!   run on a thread of its own.
//! - [`model`]: the GGUF model: our llama forward pass with an explicit per-sequence KV cache,
//!   the tokenizer and the chat template.
//! - [`snapshot`]: periodic KV-cache snapshots to a durable store, and resuming from them.
//! - [`reply`]: building the reply and dead-letter messages, cut to fit one Kafka record.
//! - [`reply_topics`]: which reply topics a request may name.
//! - [`offsets`]: the commit position of a partition when requests finish out of order.
//! - [`ops`]: what operators see: `/healthz`, `/readyz`, `/metrics`, JSON logs, trace context,
//!   and the accelerator health monitor and circuit breaker that drain and restart the worker.

pub mod config;
pub mod consumer;
pub mod engine;
pub mod intake;
pub mod model;
pub mod offsets;
pub mod ops;
pub mod reply;
pub mod reply_topics;
pub mod snapshot;

/// Ferry's quantised matrix products, re-exported so that tests and benches can name a path.
pub use ferry_kernels as kernels;
