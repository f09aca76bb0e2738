//! Requests and engine jobs as the tests build them.

use std::sync::Arc;

use ferry_schemas::Request;
use ferry_worker::engine::{Job, JobControl, Prepared};

/// A request of one user message.
pub fn chat(id: &str, content: &str, max_tokens: u32) -> Request {
    serde_json::from_value(serde_json::json!({
        "id": id,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
    }))
    .expect("a valid request")
}

/// A job for the engine thread: not resuming, not snapshotted, no deadline, no stream.
#[allow(dead_code)]
pub fn job(prepared: Prepared) -> Job {
    Job {
        prepared,
        resume: None,
        snapshots: None,
        control: Arc::new(JobControl::default()),
        deadline: None,
        chunks: None,
    }
}
