//! What the harness observes: one record per request it sent, one per fault it injected. Times
//! are milliseconds since the start of the run, so records from all parts line up on one axis.

use ferry_schemas::{ErrorReply, Request, Response};
use serde::{Deserialize, Serialize};

/// A stream chunk as received.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChunkSeen {
    pub seq: u32,
    pub text: String,
    pub at_ms: f64,
}

/// A final reply as received.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseSeen {
    pub response: Response,
    pub at_ms: f64,
}

/// An error reply as received.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorSeen {
    pub error: ErrorReply,
    pub at_ms: f64,
}

/// Everything seen about one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    pub request: Request,
    /// Index of its prompt in the prompt set.
    pub prompt_index: usize,
    /// When it was acknowledged by the broker.
    pub sent_ms: f64,
    /// Every chunk, in arrival order (a resumed stream repeats some `seq`s).
    pub chunks: Vec<ChunkSeen>,
    /// Every final response, in arrival order (more than one is a duplicate).
    pub responses: Vec<ResponseSeen>,
    pub errors: Vec<ErrorSeen>,
}

impl RequestRecord {
    pub fn new(request: Request, prompt_index: usize, sent_ms: f64) -> Self {
        Self {
            request,
            prompt_index,
            sent_ms,
            chunks: Vec::new(),
            responses: Vec::new(),
            errors: Vec::new(),
        }
    }

    /// The first final reply, response or error.
    pub fn answered_ms(&self) -> Option<f64> {
        let r = self.responses.first().map(|r| r.at_ms);
        let e = self.errors.first().map(|e| e.at_ms);
        match (r, e) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// A fault the harness injected, or a fleet change it made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// SIGTERM: a Kubernetes eviction.
    Evict,
    /// SIGKILL: node loss, OOM kill.
    Crash,
    /// SIGSTOP, later SIGCONT: a frozen process.
    Freeze,
    /// Several workers evicted at once: a node drained.
    NodeDrain,
    /// The broker unreachable for a while (SIGSTOP, later SIGCONT): a broker stalled, a network
    /// partition.
    BrokerOutage,
    /// The broker SIGKILLed and started again on its data (real Kafka only): a broker crash.
    BrokerCrash,
    /// A worker (re)started: a Deployment bringing a pod back, or a scale-out.
    Start,
    /// A worker stopped by the autoscaler: a scale-in.
    ScaleIn,
}

/// One injected fault or fleet change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultEvent {
    pub kind: FaultKind,
    /// When it was applied.
    pub at_ms: f64,
    /// The workers it hit, by name (empty for the broker).
    pub workers: Vec<String>,
    /// When it ended, for faults with a duration (a freeze, a broker outage).
    pub until_ms: Option<f64>,
}
