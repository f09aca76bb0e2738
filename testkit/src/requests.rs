//! Requests as the tests build them.

use ferry_schemas::Request;

/// A request of one user message.
pub fn chat(id: &str, content: &str, max_tokens: u32) -> Request {
    serde_json::from_value(serde_json::json!({
        "id": id,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
    }))
    .expect("a valid request")
}
