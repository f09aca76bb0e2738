//! Limits of the contract. The JSON Schema files state the same numbers; a test checks that they
//! agree.

/// Longest request id, in bytes of UTF-8.
pub const MAX_ID_LEN: usize = 256;
/// Most chat messages in one request.
pub const MAX_MESSAGES: usize = 256;
/// Longest raw prompt or single message content, in bytes of UTF-8 (the model's context bounds
/// it further, in tokens; that check needs the tokenizer and happens in the worker).
pub const MAX_TEXT_LEN: usize = 262_144;
/// Largest `max_tokens`.
pub const MAX_MAX_TOKENS: u32 = 32_768;
/// `max_tokens` when the request does not say.
pub const DEFAULT_MAX_TOKENS: u32 = 256;
/// Largest `temperature`.
pub const MAX_TEMPERATURE: f64 = 2.0;
/// Largest `top_k` (0 turns top-k off).
pub const MAX_TOP_K: u32 = 1_000;
/// Most stop strings.
pub const MAX_STOP: usize = 8;
/// Longest stop string, in bytes of UTF-8.
pub const MAX_STOP_LEN: usize = 128;
/// Longest topic name Kafka accepts.
pub const MAX_TOPIC_LEN: usize = 249;
/// Longest model name.
pub const MAX_MODEL_LEN: usize = 256;
/// Largest `metadata` object, in bytes of its JSON text.
pub const MAX_METADATA_BYTES: usize = 16_384;
