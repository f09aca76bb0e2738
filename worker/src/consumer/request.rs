//! One request, from its message to a settled offset: parse, look for a stored answer, count
//! the attempt, generate (resuming from a snapshot when there is one), stream chunks, publish
//! the answer (or hand the request to the fallback topic when this worker cannot serve it),
//! then commit it or leave a done marker.
//!
//! [`Inner::process`] is the entry; the phases are files of their own, each an `impl Inner`:
//! [`intake`] (parse, validate, prepare, or refuse), [`attempt`] (stored answer, deadline,
//! budget, slot, and how an attempt ends), [`generate`] (the engine, snapshots and stream), and
//! [`settle`] (commit, done marker, transaction).

mod attempt;
mod generate;
mod intake;
mod settle;

use generate::{answered, log_answered, past_deadline};
use intake::rejected;

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_schemas::{headers, Chunk, ErrorCode, FinishReason, Reply, Request, SCHEMA_VERSION};
use rdkafka::message::{Headers, OwnedMessage};
use rdkafka::Message;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn, Instrument};

use super::fallback::{self, Handoff};
use super::inflight::InFlight;
use super::publish::{PublishError, Publisher, Refused, RefusedKind, ReplyTo};
use super::transaction::{self, Scope, Settled, Transactions};
use super::{WorkerConsumer, WorkerError};
use crate::engine::{
    Checkpoint, Completion, Engine, EngineHandle, Finish, Job, JobControl, Outcome, Prepared, StreamChunk,
};
use crate::intake::{parse, Invalid};
use crate::model::ModelError;
use crate::offsets::TopicPartition;
use crate::ops::metrics::Answered;
use crate::ops::otel;
use crate::ops::trace::{new_span_id, Propagation};
use crate::ops::{FallbackReason, Ops, RequestOutcome};
use crate::reply::{self, WorkContext};
use crate::snapshot::format::request_prefix;
use crate::snapshot::ledger::{AttemptEntry, AttemptError, AttemptLog, EntryOutcome};
use crate::snapshot::Snapshots;

/// Everything a request task uses, shared by all of them.
pub struct Inner {
    pub consumer: WorkerConsumer,
    /// Every record goes through it, to topics it chooses ([`super::publish`]).
    pub publisher: Publisher,
    /// The attempts this worker has begun and not ended ([`OpenAttempts`]).
    pub open_attempts: OpenAttempts,
    pub engine: Engine,
    pub engine_thread: EngineHandle,
    /// The request topics whose messages may carry hand-off headers (`--fallback-lane`): only
    /// there does a `ferry-handoff-*` header mean another worker handed the request off.
    pub fallback_lanes: std::collections::HashSet<String>,
    /// The durable store's service, or [`Snapshots::none`] without one.
    pub snapshots: Snapshots,
    pub inflight: Arc<InFlight>,
    pub max_attempts: u32,
    /// Generations hold it shared; a suspect (a request an earlier attempt of which died with
    /// its worker) holds it alone, so if it crashes this worker too, it takes no bystander
    /// down with it, and only the suspect's attempt budget is spent.
    pub isolation: tokio::sync::RwLock<()>,
    /// Memory admission: a generation starts only when its worst-case KV cache fits.
    pub kv_budget: super::admission::KvBudget,
    /// Metrics, and the health state the circuit breaker reports to.
    pub ops: Arc<Ops>,
}

impl Inner {
    /// Whether `msg` was handed off by another worker: it carries the hand-off headers and
    /// came from a fallback lane. Anywhere else those headers are a producer's own, and mean
    /// nothing.
    pub(super) fn is_handed_off(&self, msg: &OwnedMessage) -> bool {
        self.fallback_lanes.contains(msg.topic()) && fallback::is_handed_off(msg)
    }

    /// The open attempt of a served request leaves [`Inner::open_attempts`] once the request
    /// is settled: answered (committed, or its answer kept for the commit to pass), there is
    /// nothing more to close; not committed under exactly-once (told to suspend before its
    /// turn, or revoked), its attempt says nothing about the request and ends as suspended.
    pub(super) async fn settle_attempt(&self, prefix: Option<&str>, settled: Settled) {
        let Some(prefix) = prefix else {
            return;
        };
        if let (Some(attempt), Settled::Suspended) = (self.open_attempts.take(prefix), settled) {
            let note = "answered, not committed: left to the partition's next owner".to_string();
            self.snapshots
                .end_attempt(prefix, attempt, EntryOutcome::Suspended, Some(note.into()))
                .await;
        }
    }
}

/// The attempts this worker has begun in the store's ledger and not ended, by request prefix: a
/// controlled exit closes them as suspended ([`Inner::close_open_attempts`]), so that only real
/// deaths count against a request's budget. An entry leaves when its attempt ends or its
/// request is settled, whichever comes first; `ferry_attempts_open` follows the count.
pub struct OpenAttempts {
    by_prefix: std::sync::Mutex<std::collections::HashMap<String, u32>>,
    ops: Arc<Ops>,
}

impl OpenAttempts {
    pub fn new(ops: Arc<Ops>) -> Self {
        Self {
            by_prefix: std::sync::Mutex::default(),
            ops,
        }
    }

    /// Applies `f` to the map and updates the gauge; `None` if the lock is poisoned.
    fn update<T>(&self, f: impl FnOnce(&mut std::collections::HashMap<String, u32>) -> T) -> Option<T> {
        let mut map = self.by_prefix.lock().ok()?;
        let out = f(&mut map);
        self.ops.metrics.set_attempts_open(map.len());
        Some(out)
    }

    /// Records that `attempt` of the request under `prefix` runs.
    pub fn open(&self, prefix: &str, attempt: u32) {
        self.update(|m| m.insert(prefix.to_string(), attempt));
    }

    /// Takes the open attempt of `prefix`, if any.
    pub fn take(&self, prefix: &str) -> Option<u32> {
        self.update(|m| m.remove(prefix)).flatten()
    }

    /// Forgets `attempt` of `prefix`, if it is the one open.
    pub fn close(&self, prefix: &str, attempt: u32) {
        self.update(|m| {
            if m.get(prefix) == Some(&attempt) {
                m.remove(prefix);
            }
        });
    }

    /// Takes every open attempt.
    pub fn drain(&self) -> Vec<(String, u32)> {
        self.update(|m| m.drain().collect()).unwrap_or_default()
    }
}

/// How serving a message ended.
enum Served {
    /// Answered, dead-lettered with an error reply, or handed to the fallback topic: its offset
    /// may be committed. `prefix` names its snapshot-store entries; `reply` is the final reply as
    /// published, kept as a done marker when the offset cannot be committed yet (a handoff has
    /// none: its ledger entry does that job).
    Answered {
        prefix: Option<String>,
        reply: Option<Vec<u8>>,
    },
    /// Suspended by a drain or a revocation, its state in a snapshot: left uncommitted.
    Suspended,
}

impl Served {
    fn rejected() -> Self {
        Served::Answered {
            prefix: None,
            reply: None,
        }
    }
}

/// The right to generate, held for one attempt.
#[allow(dead_code)] // Held for its drop.
enum Slot<'a> {
    Shared(tokio::sync::RwLockReadGuard<'a, ()>),
    Alone(tokio::sync::RwLockWriteGuard<'a, ()>),
}

impl Inner {
    /// Serves a message and settles its offset. Runs as its own task.
    pub async fn process(
        self: Arc<Self>,
        msg: OwnedMessage,
        epoch: u64,
        control: Arc<JobControl>,
    ) -> Result<(), WorkerError> {
        let tp: TopicPartition = (msg.topic().to_string(), msg.partition());
        let _in_flight = self.ops.metrics.request_started();
        let span = tracing::info_span!(
            "message",
            topic = %tp.0,
            partition = tp.1,
            offset = msg.offset(),
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
            parent_span_id = tracing::field::Empty,
        );
        let mut trace = Propagation::from_headers(
            header(&msg, headers::TRACEPARENT),
            header(&msg, headers::TRACESTATE),
            new_span_id(),
        );
        if let Ok(Some(t)) = &mut trace {
            // With spans exported, the worker's span id is the exported span's.
            if let Some(id) = otel::adopt(&span, Some(&t.parent), t.tracestate.as_deref()) {
                t.own = t.parent.child(id);
            }
            span.record("trace_id", t.own.trace_id_hex());
            span.record("span_id", t.own.span_id_hex());
            span.record("parent_span_id", t.parent.span_id_hex());
        }
        let scope = self.publisher.transactions.as_ref().map(|_| {
            Arc::new(Scope::new(
                tp.clone(),
                msg.offset(),
                epoch,
                control.clone(),
                self.inflight.clone(),
            ))
        });
        // The generation's slot, held until the request is settled (see `answer`).
        let mut held = None;
        let result = transaction::within(scope.clone(), async {
            let trace = trace.unwrap_or_else(|e| {
                debug!(error = %e, "ignoring an invalid traceparent header");
                None
            });
            let served = self.serve(&msg, trace.as_ref(), control, &mut held).await;
            match (served, &scope, &self.publisher.transactions) {
                (Ok(Served::Answered { prefix, .. }), Some(scope), Some(txns)) => {
                    let settled = self
                        .settle_in_transaction(txns, scope, &tp, msg.offset(), epoch, prefix.clone())
                        .await?;
                    self.settle_attempt(prefix.as_deref(), settled).await;
                }
                (Ok(Served::Answered { prefix, reply }), _, _) => {
                    self.settle_answered(&tp, msg.offset(), epoch, prefix.clone(), reply)
                        .await;
                    self.settle_attempt(prefix.as_deref(), Settled::Committed).await;
                }
                (Ok(Served::Suspended), _, _) => self.ops.metrics.request_settled(RequestOutcome::Suspended),
                (Err(e), _, _) => return Err(e),
            }
            Ok(())
        })
        .instrument(span)
        .await;
        drop(held);
        // Whatever is still open in this request's transaction (it failed, or suspended after
        // publishing) is aborted: none of it becomes visible.
        let result = match (&scope, &self.publisher.transactions) {
            (Some(scope), Some(txns)) => match txns.abort(scope).await {
                Ok(()) => result,
                Err(e) => result.and(Err(e)),
            },
            _ => result,
        };
        self.inflight.settle(&tp, msg.offset());
        result
    }
}

/// The value of a message header, if the message has it.
fn header<'a>(msg: &'a OwnedMessage, key: &str) -> Option<&'a [u8]> {
    msg.headers()?.iter().find(|h| h.key == key)?.value
}

/// From the message's Kafka timestamp to now.
fn queued_for(msg: &OwnedMessage) -> Duration {
    msg.timestamp()
        .to_millis()
        .and_then(|ts| millis_since(time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000, ts))
        .map(Duration::from_millis)
        .unwrap_or_default()
}

/// Milliseconds from `ts` to `now_ms`; `None` when `ts` is in the future or so far in the past
/// that the difference does not fit. A record's timestamp is its producer's to set, so any
/// `i64` (`i64::MIN` included) must come through without overflowing.
fn millis_since(now_ms: i128, ts: i64) -> Option<u64> {
    u64::try_from(now_ms.checked_sub(i128::from(ts))?).ok()
}

/// The monotonic instant of a wall-clock deadline (now, when it has passed).
fn deadline_instant(deadline: time::OffsetDateTime) -> Instant {
    let left = deadline - time::OffsetDateTime::now_utc();
    Instant::now() + Duration::try_from(left).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::attempt::done_marker;
    use ferry_schemas::Reply;

    #[test]
    fn a_done_marker_is_only_a_final_reply_for_the_same_id() {
        let response = include_bytes!("../../../schemas/examples/response.json");
        let id = "prompt-0b9e44d2";
        match done_marker(response, id) {
            Ok(r) => assert_eq!(r.id(), id),
            Err(why) => panic!("a response for the same id is a done marker: {why}"),
        }
        assert!(done_marker(response, "b")
            .expect_err("another id")
            .contains("another request"));
        let chunk = include_bytes!("../../../schemas/examples/chunk.json");
        assert!(done_marker(chunk, id).expect_err("a chunk").contains("chunk"));
        let error = include_bytes!("../../../schemas/examples/error.json");
        let error_id = serde_json::from_slice::<Reply>(error)
            .expect("an error reply")
            .id()
            .to_string();
        assert!(done_marker(error, &error_id).is_ok(), "an error reply is a final reply");
        assert!(done_marker(b"\x00\x01", id).is_err());
    }

    #[test]
    fn queue_time_survives_any_record_timestamp() {
        let now = 1_700_000_000_000i128;
        assert_eq!(super::millis_since(now, 1_699_999_999_000), Some(1_000));
        assert_eq!(super::millis_since(now, 1_800_000_000_000), None, "in the future");
        assert_eq!(
            super::millis_since(now, i64::MIN),
            Some((now - i128::from(i64::MIN)) as u64)
        );
        assert_eq!(super::millis_since(now, i64::MAX), None);
    }
}

/// Faults for tests, compiled only with the `fault-injection` feature (never in a release
/// build): `FERRY_FAULT_CRASH_ON=<request id>` makes the worker abort, as a segfault or an OOM
/// kill would, right after it recorded the attempt on that request;
/// `FERRY_FAULT_FAIL_GENERATION=1` reports every finished generation as failed in the engine,
/// as a broken device would; `FERRY_FAULT_OOM_ON=<request id>` reports that request's
/// generations as failed with the CUDA driver's out-of-memory error, as candle words it;
/// `FERRY_FAULT_DELAY_SLOT_ON=<request id>:<ms>` delays that request's slot.
#[cfg(feature = "fault-injection")]
mod fault_injection {
    use super::ModelError;
    use crate::engine::Outcome;

    pub fn maybe_crash(request_id: &str) {
        if std::env::var("FERRY_FAULT_CRASH_ON").is_ok_and(|id| id == request_id) {
            tracing::error!(request_id, "fault injection: crashing on this request");
            std::process::abort();
        }
    }

    pub fn maybe_fail(request_id: &str, generated: Result<Outcome, ModelError>) -> Result<Outcome, ModelError> {
        match generated {
            Ok(Outcome::Finished(_)) if std::env::var("FERRY_FAULT_OOM_ON").is_ok_and(|id| id == request_id) => {
                Err(ModelError::OutOfMemory(
                    "fault injection: DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
                ))
            }
            Ok(Outcome::Finished(_)) if std::env::var_os("FERRY_FAULT_FAIL_GENERATION").is_some() => {
                Err(ModelError::Backend("fault injection: the engine failed".into()))
            }
            other => other,
        }
    }

    /// `FERRY_FAULT_DELAY_SLOT_ON=<request id>:<ms>`: that request waits so long before it
    /// asks for its generation slot, so that a request after it takes one first.
    pub async fn delay_slot(request_id: &str) {
        let Ok(spec) = std::env::var("FERRY_FAULT_DELAY_SLOT_ON") else {
            return;
        };
        let Some((id, ms)) = spec.rsplit_once(':') else {
            return;
        };
        if let (true, Ok(ms)) = (id == request_id, ms.parse()) {
            tracing::warn!(request_id, ms, "fault injection: delaying the request's slot");
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
    }

    /// `FERRY_FAULT_SLOW_PUBLISH_MS=<ms>`: a finished generation waits that long before its
    /// answer is published, widening the window between the two.
    pub async fn slow_publish() {
        if let Some(ms) = std::env::var("FERRY_FAULT_SLOW_PUBLISH_MS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
    }
}
