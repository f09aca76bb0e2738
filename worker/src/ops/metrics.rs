//! What the worker measures, recorded through typed functions (one per event, so a call site
//! cannot misspell a metric or a label) and written out for `/metrics`.
//!
//! Names follow `ferry_<thing>_<unit>[_total]`. Labels are bounded sets only (an outcome, a
//! dead-letter reason code, a topic and partition): never a request id. The snapshot counters are
//! not duplicated here: [`Metrics::attach_snapshot_stats`] hands over the writer's own
//! [`SnapshotStats`], read at scrape time.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use ferry_schemas::{ErrorCode, FinishReason};

use super::exposition::{Counter, Exposition, Gauge, Histogram, Kind};
use crate::offsets::TopicPartition;
use crate::snapshot::store::{FaultKind, StoreOp};
use crate::snapshot::SnapshotStats;

/// How the handling of one delivered request ended, as `ferry_requests_total{outcome}` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestOutcome {
    /// Generated and answered (any finish reason but `deadline`).
    Answered,
    /// Answered with `finish_reason: "deadline"`: before any compute, or cut short.
    Deadline,
    /// Stopped by a drain or a revocation, its state in a snapshot, left to be redelivered.
    Suspended,
    /// Its answer was already stored (a done marker) and was published again.
    Republished,
    /// Dead-lettered, and its caller told with an error reply.
    ErrorReply,
    /// Dead-lettered without an error reply (no readable id, or no reply topic).
    DeadLettered,
    /// Handed to the fallback topic (`--fallback-topic`), where another worker answers it.
    HandedOff,
}

impl RequestOutcome {
    pub const ALL: [RequestOutcome; 7] = [
        RequestOutcome::Answered,
        RequestOutcome::Deadline,
        RequestOutcome::Suspended,
        RequestOutcome::Republished,
        RequestOutcome::ErrorReply,
        RequestOutcome::DeadLettered,
        RequestOutcome::HandedOff,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RequestOutcome::Answered => "answered",
            RequestOutcome::Deadline => "deadline",
            RequestOutcome::Suspended => "suspended",
            RequestOutcome::Republished => "republished",
            RequestOutcome::ErrorReply => "error_reply",
            RequestOutcome::DeadLettered => "dead_lettered",
            RequestOutcome::HandedOff => "handed_off",
        }
    }
}

/// Why a request was handed to the fallback topic, as `ferry_fallback_total{reason}` counts it
/// and the `ferry-handoff-reason` header names it. Every reason is the worker's, never the
/// request's: a request that is itself at fault fails the same way on any model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FallbackReason {
    /// The engine ran out of accelerator memory.
    OutOfMemory,
    /// The circuit breaker opened: the worker is draining to be restarted.
    CircuitBreakerOpen,
    /// The accelerator reported an unrecoverable error: the worker is draining to be restarted.
    AcceleratorUnhealthy,
}

impl FallbackReason {
    pub const ALL: [FallbackReason; 3] = [
        FallbackReason::OutOfMemory,
        FallbackReason::CircuitBreakerOpen,
        FallbackReason::AcceleratorUnhealthy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FallbackReason::OutOfMemory => "out_of_memory",
            FallbackReason::CircuitBreakerOpen => "circuit_breaker_open",
            FallbackReason::AcceleratorUnhealthy => "accelerator_unhealthy",
        }
    }
}

/// A generation answered: what `/metrics` learns from it.
#[derive(Debug, Clone)]
pub struct Answered {
    /// From the request's Kafka timestamp to the start of work (the reply's `queued_ms`).
    pub queued: Duration,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// The engine's prefill time; for a resumed generation, the time to restore its state.
    pub prefill: Duration,
    pub decode: Duration,
    /// Resumed from a snapshot: its prefill is a restore, not a prompt's compute.
    pub resumed: bool,
}

const SECONDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];
const TOKENS_PER_SECOND: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 20000.0,
];

/// The worker's metrics.
#[derive(Debug)]
pub struct Metrics {
    requests: [Counter; RequestOutcome::ALL.len()],
    in_flight: Gauge,
    queue_wait: Histogram,
    time_to_first_token: Histogram,
    prefill_rate: Histogram,
    decode_rate: Histogram,
    prompt_tokens: Counter,
    generated_tokens: Counter,
    generation_failures: Counter,
    redeliveries: Counter,
    dead_lettered: Mutex<BTreeMap<&'static str, u64>>,
    fallbacks: [Counter; FallbackReason::ALL.len()],
    commit_lag: Mutex<BTreeMap<TopicPartition, i64>>,
    consumer_lag: Mutex<BTreeMap<TopicPartition, i64>>,
    assigned_partitions: Gauge,
    kv_budget: Gauge,
    kv_reserved: Gauge,
    kv_admission_waits: Counter,
    snapshots: OnceLock<Arc<SnapshotStats>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Default::default(),
            in_flight: Gauge::default(),
            queue_wait: Histogram::new(SECONDS),
            time_to_first_token: Histogram::new(SECONDS),
            prefill_rate: Histogram::new(TOKENS_PER_SECOND),
            decode_rate: Histogram::new(TOKENS_PER_SECOND),
            prompt_tokens: Counter::default(),
            generated_tokens: Counter::default(),
            generation_failures: Counter::default(),
            redeliveries: Counter::default(),
            dead_lettered: Mutex::default(),
            fallbacks: Default::default(),
            commit_lag: Mutex::default(),
            consumer_lag: Mutex::default(),
            assigned_partitions: Gauge::default(),
            kv_budget: Gauge::default(),
            kv_reserved: Gauge::default(),
            kv_admission_waits: Counter::default(),
            snapshots: OnceLock::new(),
        }
    }
}

/// Holds a request's place in `ferry_requests_in_flight` until dropped (also on a panic).
#[derive(Debug)]
pub struct InFlightGuard<'a>(&'a Gauge);

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain numbers behind the lock: a panic elsewhere leaves nothing inconsistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads the snapshot writer's counters at every scrape from now on.
    pub fn attach_snapshot_stats(&self, stats: Arc<SnapshotStats>) {
        let _ = self.snapshots.set(stats);
    }

    /// A request task started; it counts as in flight until the guard drops.
    pub fn request_started(&self) -> InFlightGuard<'_> {
        self.in_flight.inc();
        InFlightGuard(&self.in_flight)
    }

    pub fn request_settled(&self, outcome: RequestOutcome) {
        self.requests[RequestOutcome::ALL.iter().position(|o| *o == outcome).unwrap_or(0)].inc();
    }

    /// A generated answer was published.
    pub fn answered(&self, a: &Answered) {
        self.request_settled(if a.finish == FinishReason::Deadline {
            RequestOutcome::Deadline
        } else {
            RequestOutcome::Answered
        });
        self.queue_wait.observe(a.queued.as_secs_f64());
        self.prompt_tokens.add(a.prompt_tokens as u64);
        self.generated_tokens.add(a.completion_tokens as u64);
        let prefill = a.prefill.as_secs_f64();
        if !a.resumed && prefill > 0.0 {
            // The first token is sampled from the prefill's logits: prefill time is the time to
            // first token once the engine took the job (the wait before it is queue wait).
            self.time_to_first_token.observe(prefill);
            self.prefill_rate.observe(a.prompt_tokens as f64 / prefill);
        }
        let decode = a.decode.as_secs_f64();
        if decode > 0.0 && a.completion_tokens > 0 {
            self.decode_rate.observe(a.completion_tokens as f64 / decode);
        }
    }

    /// A message went to the dead-letter topic; `told` when its caller got an error reply.
    pub fn dead_lettered(&self, reason: ErrorCode, told: bool) {
        self.request_settled(if told {
            RequestOutcome::ErrorReply
        } else {
            RequestOutcome::DeadLettered
        });
        *lock(&self.dead_lettered).entry(reason.as_str()).or_default() += 1;
    }

    /// A request was handed to the fallback topic and its offset may be committed.
    pub fn handed_off(&self, reason: FallbackReason) {
        self.request_settled(RequestOutcome::HandedOff);
        self.fallbacks[FallbackReason::ALL.iter().position(|r| *r == reason).unwrap_or(0)].inc();
    }

    /// A generation attempt failed (the request is retried, handed off or dead-lettered).
    pub fn generation_failed(&self) {
        self.generation_failures.inc();
    }

    /// A delivery of a request that an earlier delivery already worked on.
    pub fn redelivered(&self) {
        self.redeliveries.inc();
    }

    /// Messages received and not yet committed, per partition, as the offset tracker sees them.
    pub fn set_commit_lag(&self, lag: impl IntoIterator<Item = (TopicPartition, i64)>) {
        *lock(&self.commit_lag) = lag.into_iter().collect();
    }

    /// librdkafka's consumer lag per assigned partition, from its statistics.
    pub fn set_consumer_lag(&self, lag: impl IntoIterator<Item = (TopicPartition, i64)>) {
        *lock(&self.consumer_lag) = lag.into_iter().collect();
    }

    pub fn set_assigned_partitions(&self, n: i64) {
        self.assigned_partitions.set(n);
    }

    /// The KV budget in bytes; `None` when it is unlimited.
    pub fn set_kv_budget(&self, bytes: Option<u64>) {
        self.kv_budget
            .set(bytes.map_or(0, |b| i64::try_from(b).unwrap_or(i64::MAX)));
    }

    /// A request was admitted with this worst case of KV cache reserved.
    pub fn kv_reserved(&self, bytes: u64) {
        self.kv_reserved.add(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// An admitted request's reservation was released.
    pub fn kv_released(&self, bytes: u64) {
        self.kv_reserved.add(-i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// A request had to wait for KV budget before it could start.
    pub fn kv_admission_waited(&self) {
        self.kv_admission_waits.inc();
    }

    /// Writes every family.
    pub fn render(&self, e: &mut Exposition) {
        e.family(
            "ferry_requests_total",
            Kind::Counter,
            "Requests handled, by outcome: answered, deadline, suspended, republished, error_reply, dead_lettered, handed_off.",
        );
        for (o, c) in RequestOutcome::ALL.iter().zip(&self.requests) {
            e.sample("ferry_requests_total", &[("outcome", o.as_str())], c.get() as f64);
        }
        e.gauge(
            "ferry_requests_in_flight",
            "Requests being served now (generating, publishing, or waiting for a slot).",
            self.in_flight.get() as f64,
        );
        e.histogram(
            "ferry_queue_wait_seconds",
            "From a request's Kafka timestamp to the start of its work, for answered requests.",
            &self.queue_wait,
        );
        e.histogram(
            "ferry_time_to_first_token_seconds",
            "Prefill time of generations that did not resume: the engine's time to the first token.",
            &self.time_to_first_token,
        );
        e.histogram(
            "ferry_prefill_tokens_per_second",
            "Prompt tokens per second of prefill, one observation per generation that did not resume.",
            &self.prefill_rate,
        );
        e.histogram(
            "ferry_decode_tokens_per_second",
            "Generated tokens per second of decode, one observation per answered generation.",
            &self.decode_rate,
        );
        e.counter(
            "ferry_prompt_tokens_total",
            "Prompt tokens of answered generations.",
            self.prompt_tokens.get(),
        );
        e.counter(
            "ferry_generated_tokens_total",
            "Tokens generated for answered requests.",
            self.generated_tokens.get(),
        );
        e.counter(
            "ferry_generation_failures_total",
            "Generation attempts that failed in the engine.",
            self.generation_failures.get(),
        );
        e.counter(
            "ferry_redeliveries_total",
            "Deliveries of requests worked on before: an earlier attempt in the ledger, a snapshot resumed, or a stored answer republished.",
            self.redeliveries.get(),
        );
        e.family(
            "ferry_dead_lettered_total",
            Kind::Counter,
            "Messages sent to the dead-letter topic, by reason code.",
        );
        for (reason, n) in lock(&self.dead_lettered).iter() {
            e.sample("ferry_dead_lettered_total", &[("reason", reason)], *n as f64);
        }
        e.family(
            "ferry_fallback_total",
            Kind::Counter,
            "Requests handed to the fallback topic, by reason: out_of_memory, circuit_breaker_open, accelerator_unhealthy.",
        );
        for (r, c) in FallbackReason::ALL.iter().zip(&self.fallbacks) {
            e.sample("ferry_fallback_total", &[("reason", r.as_str())], c.get() as f64);
        }
        lag_family(
            e,
            "ferry_commit_lag_messages",
            "Messages received on a partition and not yet committed (running, or finished above a running one).",
            &lock(&self.commit_lag),
        );
        lag_family(
            e,
            "ferry_consumer_lag_messages",
            "Messages on an assigned partition not yet fetched or committed, from librdkafka's statistics.",
            &lock(&self.consumer_lag),
        );
        e.gauge(
            "ferry_assigned_partitions",
            "Partitions assigned to this worker, from librdkafka's statistics.",
            self.assigned_partitions.get() as f64,
        );
        e.gauge(
            "ferry_kv_budget_bytes",
            "Memory for KV caches that admitted requests may reserve at most (--kv-budget); 0 when unlimited.",
            self.kv_budget.get() as f64,
        );
        e.gauge(
            "ferry_kv_reserved_bytes",
            "Worst-case KV cache memory reserved by the requests admitted now.",
            self.kv_reserved.get() as f64,
        );
        e.counter(
            "ferry_kv_admission_waits_total",
            "Requests that waited for KV budget before they could start.",
            self.kv_admission_waits.get(),
        );
        self.render_snapshots(e);
    }

    fn render_snapshots(&self, e: &mut Exposition) {
        use std::sync::atomic::Ordering::Relaxed;
        let zero = SnapshotStats::default();
        let s = self.snapshots.get().map_or(&zero, |s| s.as_ref());
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Relaxed);
        e.counter(
            "ferry_snapshots_written_total",
            "Snapshots made durable (manifests written).",
            get(&s.written),
        );
        e.counter(
            "ferry_snapshot_bytes_total",
            "Bytes written to the snapshot store, pieces and manifests.",
            get(&s.bytes),
        );
        e.family(
            "ferry_snapshot_write_seconds",
            Kind::Summary,
            "Time spent writing snapshots, and how many writes (made or failed) it covers.",
        );
        e.sample(
            "ferry_snapshot_write_seconds_sum",
            &[],
            get(&s.write_micros) as f64 / 1e6,
        );
        e.sample(
            "ferry_snapshot_write_seconds_count",
            &[],
            (get(&s.written) + get(&s.failed)) as f64,
        );
        e.counter(
            "ferry_snapshots_skipped_total",
            "Snapshot points merged into a newer one because the store was still busy.",
            get(&s.skipped),
        );
        e.counter(
            "ferry_snapshot_write_failures_total",
            "Snapshot writes that failed (retried with the next snapshot).",
            get(&s.failed),
        );
        e.counter(
            "ferry_snapshots_discarded_total",
            "Snapshots found on resume that did not verify and were discarded.",
            get(&s.discarded),
        );
        e.counter(
            "ferry_resumes_total",
            "Generations resumed from a snapshot.",
            get(&s.resumed),
        );
        e.counter(
            "ferry_tokens_recomputed_total",
            "Tokens computed again on resume (tokens-mode snapshots).",
            get(&s.tokens_recomputed),
        );
        e.family(
            "ferry_snapshot_store_errors_total",
            Kind::Counter,
            "Snapshot store calls that failed, by op (get, put, delete, list, sweep) and kind: timeout (no answer within --snapshot-store-timeout), skipped (not tried: the store timed out or was unreachable moments ago), error (any other failure). Each was served around: the request went on without the store.",
        );
        for op in StoreOp::ALL {
            for kind in FaultKind::ALL {
                e.sample(
                    "ferry_snapshot_store_errors_total",
                    &[("op", op.as_str()), ("kind", kind.as_str())],
                    s.store_faults.count(op, kind) as f64,
                );
            }
        }
    }
}

fn lag_family(e: &mut Exposition, name: &str, help: &str, lag: &BTreeMap<TopicPartition, i64>) {
    e.family(name, Kind::Gauge, help);
    for ((topic, partition), n) in lag {
        e.sample(
            name,
            &[("topic", topic), ("partition", &partition.to_string())],
            *n as f64,
        );
    }
}

#[cfg(test)]
mod tests;
