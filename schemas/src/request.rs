//! The request a caller publishes.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::OffsetDateTime;

use crate::limits::*;

/// One generation request. Exactly one of `messages` and `prompt` is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Contract version; 1 when omitted.
    #[serde(default = "default_version")]
    pub version: u32,
    /// The caller's id for this request: the reply is keyed by it. Unique per caller.
    pub id: String,
    /// The model the caller expects. When set, a worker serving another model dead-letters the
    /// request instead of answering with the wrong one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// A chat, rendered with the model's own chat template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<ChatMessage>>,
    /// Raw text, tokenised as is with no template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Most tokens to generate; [`DEFAULT_MAX_TOKENS`] when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Sampling temperature; 0 (the default) is greedy decoding, and so is a positive
    /// temperature too small for the worker's f32 arithmetic (below about 1.2e-38).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Keep only the `top_k` most likely tokens; 0 or omitted keeps all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    /// Seed of the random draws. When omitted it is derived from `id`, so a redelivered request
    /// samples exactly as its first delivery did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Generation stops before the first occurrence of any of these strings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    /// The topic the reply goes to; the worker's default reply topic when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// After this instant (RFC 3339) the caller no longer wants the answer.
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub deadline: Option<OffsetDateTime>,
    /// Caller data echoed unchanged on the reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Map<String, Value>>,
    /// With `stream: true`, token chunks ([`crate::Chunk`]) go to the reply topic before the
    /// final response. False when omitted, and then omitted when written.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
}

fn default_version() -> u32 {
    crate::SCHEMA_VERSION
}

/// One turn of a chat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

/// Who spoke a chat turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// The role's name as chat templates expect it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// A request that parsed but breaks a rule of the contract.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    /// The offending field, as a JSON path such as `messages[2].content`.
    pub field: String,
    /// What is wrong with it, for a person.
    pub message: String,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ValidationError {
    ValidationError {
        field: field.into(),
        message: message.into(),
    }
}

impl Request {
    /// Checks every range and cross-field rule the JSON Schema states.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.version != crate::SCHEMA_VERSION {
            return Err(invalid(
                "version",
                format!(
                    "unsupported version {}; this worker speaks {}",
                    self.version,
                    crate::SCHEMA_VERSION
                ),
            ));
        }
        check_len("id", &self.id, 1, MAX_ID_LEN)?;
        if let Some(model) = &self.model {
            check_len("model", model, 1, MAX_MODEL_LEN)?;
        }
        match (&self.messages, &self.prompt) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "messages",
                    "give exactly one of `messages` and `prompt`, not both",
                ))
            }
            (None, None) => return Err(invalid("messages", "give exactly one of `messages` and `prompt`")),
            (Some(messages), None) => {
                if messages.is_empty() || messages.len() > MAX_MESSAGES {
                    return Err(invalid(
                        "messages",
                        format!("must hold 1 to {MAX_MESSAGES} messages, got {}", messages.len()),
                    ));
                }
                for (i, m) in messages.iter().enumerate() {
                    check_len(&format!("messages[{i}].content"), &m.content, 0, MAX_TEXT_LEN)?;
                }
            }
            (None, Some(prompt)) => check_len("prompt", prompt, 1, MAX_TEXT_LEN)?,
        }
        if let Some(n) = self.max_tokens {
            if n == 0 || n > MAX_MAX_TOKENS {
                return Err(invalid("max_tokens", format!("must be 1 to {MAX_MAX_TOKENS}, got {n}")));
            }
        }
        if let Some(t) = self.temperature {
            if !(0.0..=MAX_TEMPERATURE).contains(&t) {
                return Err(invalid(
                    "temperature",
                    format!("must be 0 to {MAX_TEMPERATURE}, got {t}"),
                ));
            }
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(invalid(
                    "top_p",
                    format!("must be greater than 0 and at most 1, got {p}"),
                ));
            }
        }
        if let Some(k) = self.top_k {
            if k > MAX_TOP_K {
                return Err(invalid("top_k", format!("must be 0 to {MAX_TOP_K}, got {k}")));
            }
        }
        if self.stop.len() > MAX_STOP {
            return Err(invalid(
                "stop",
                format!("at most {MAX_STOP} stop strings, got {}", self.stop.len()),
            ));
        }
        for (i, s) in self.stop.iter().enumerate() {
            check_len(&format!("stop[{i}]"), s, 1, MAX_STOP_LEN)?;
        }
        if let Some(topic) = &self.reply_to {
            check_topic("reply_to", topic)?;
        }
        if let Some(metadata) = &self.metadata {
            let size = serde_json::to_string(metadata).map(|s| s.len()).unwrap_or(usize::MAX);
            if size > MAX_METADATA_BYTES {
                return Err(invalid(
                    "metadata",
                    format!("at most {MAX_METADATA_BYTES} bytes of JSON, got {size}"),
                ));
            }
        }
        Ok(())
    }

    /// `max_tokens`, or its default.
    pub fn max_tokens_or_default(&self) -> u32 {
        self.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS)
    }

    /// The seed of the random draws: the request's own, or one derived from its id (FNV-1a, 64
    /// bits), so that any worker that receives the request draws the same numbers.
    pub fn effective_seed(&self) -> u64 {
        self.seed.unwrap_or_else(|| {
            self.id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            })
        })
    }
}

fn check_len(field: &str, s: &str, min: usize, max: usize) -> Result<(), ValidationError> {
    if s.len() < min || s.len() > max {
        return Err(invalid(
            field,
            format!("length must be {min} to {max} bytes, got {}", s.len()),
        ));
    }
    Ok(())
}

/// Kafka's own topic-name rule: 1 to 249 characters of `[a-zA-Z0-9._-]`.
fn check_topic(field: &str, topic: &str) -> Result<(), ValidationError> {
    check_len(field, topic, 1, MAX_TOPIC_LEN)?;
    if !topic
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(invalid(
            field,
            "a topic name may only hold letters, digits, '.', '_' and '-'",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Request {
        serde_json::from_str(r#"{"id":"r1","prompt":"hi"}"#).expect("minimal request parses")
    }

    #[test]
    fn minimal_request_is_valid_and_takes_defaults() {
        let r = base();
        assert_eq!(r.validate(), Ok(()));
        assert_eq!(r.version, 1);
        assert_eq!(r.max_tokens_or_default(), DEFAULT_MAX_TOKENS);
    }

    #[test]
    fn exactly_one_of_messages_and_prompt() {
        let mut r = base();
        r.messages = Some(vec![ChatMessage {
            role: Role::User,
            content: "x".into(),
        }]);
        assert_eq!(r.validate().map_err(|e| e.field), Err("messages".into()));
        r.prompt = None;
        assert_eq!(r.validate(), Ok(()));
        r.messages = None;
        assert!(r.validate().is_err());
    }

    #[test]
    fn ranges_are_checked() {
        for (json, field) in [
            (r#"{"id":"r","prompt":"p","max_tokens":0}"#, "max_tokens"),
            (r#"{"id":"r","prompt":"p","temperature":2.5}"#, "temperature"),
            (r#"{"id":"r","prompt":"p","top_p":0}"#, "top_p"),
            (r#"{"id":"r","prompt":"p","top_k":1001}"#, "top_k"),
            (r#"{"id":"r","prompt":"p","stop":[""]}"#, "stop[0]"),
            (r#"{"id":"r","prompt":"p","reply_to":"bad topic"}"#, "reply_to"),
            (r#"{"id":"","prompt":"p"}"#, "id"),
            (r#"{"id":"r","prompt":"p","version":2}"#, "version"),
        ] {
            let r: Request = serde_json::from_str(json).expect("shape is right");
            assert_eq!(r.validate().map_err(|e| e.field), Err(field.to_string()), "{json}");
        }
    }

    #[test]
    fn unknown_fields_are_rejected() {
        assert!(serde_json::from_str::<Request>(r#"{"id":"r","prompt":"p","max_token":3}"#).is_err());
    }

    #[test]
    fn derived_seed_depends_only_on_id() {
        let a = base();
        let mut b = base();
        b.prompt = Some("other".into());
        assert_eq!(a.effective_seed(), b.effective_seed());
        b.id = "r2".into();
        assert_ne!(a.effective_seed(), b.effective_seed());
        b.seed = Some(7);
        assert_eq!(b.effective_seed(), 7);
    }
}
