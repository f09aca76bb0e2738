//! What the worker measures, recorded through typed functions (one per event, so a call site
//! cannot misspell a metric or a label) and written out for `/metrics` by the Prometheus project's
//! Rust client (`prometheus-client`), in the OpenMetrics text format.
//!
//! Names follow `ferry_<thing>_<unit>[_total]` (a counter is registered without `_total`; the
//! format adds it to the sample). Labels are bounded sets only (an outcome, a dead-letter reason
//! code, a topic and partition): never a request id. What is read at scrape time rather than
//! counted here goes through a [`Collector`]: the lag gauges (replaced wholesale, so a revoked
//! partition disappears), the snapshot writer's own [`SnapshotStats`] (handed over by
//! [`Metrics::attach_snapshot_stats`]) and the health gauges ([`Metrics::register_collector`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use ferry_schemas::{ErrorCode, FinishReason};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::offsets::TopicPartition;
use crate::snapshot::store::{FaultKind, StoreOp};
use crate::snapshot::SnapshotStats;

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

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

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// The worker's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<OutcomeLabel, Counter>,
    in_flight: Gauge,
    queue_wait: Histogram,
    time_to_first_token: Histogram,
    prefill_rate: Histogram,
    decode_rate: Histogram,
    prompt_tokens: Counter,
    generated_tokens: Counter,
    generation_failures: Counter,
    redeliveries: Counter,
    dead_lettered: Family<ReasonLabel, Counter>,
    fallbacks: Family<ReasonLabel, Counter>,
    assigned_partitions: Gauge,
    kv_budget: Gauge,
    kv_reserved: Gauge,
    kv_admission_waits: Counter,
    attempts_open: Gauge,
    scraped: Arc<ScrapeTime>,
}

impl Default for Metrics {
    fn default() -> Self {
        let seconds = || Histogram::new(SECONDS.iter().copied());
        let rate = || Histogram::new(TOKENS_PER_SECOND.iter().copied());
        let mut m = Self {
            registry: Registry::default(),
            requests: Family::default(),
            in_flight: Gauge::default(),
            queue_wait: seconds(),
            time_to_first_token: seconds(),
            prefill_rate: rate(),
            decode_rate: rate(),
            prompt_tokens: Counter::default(),
            generated_tokens: Counter::default(),
            generation_failures: Counter::default(),
            redeliveries: Counter::default(),
            dead_lettered: Family::default(),
            fallbacks: Family::default(),
            assigned_partitions: Gauge::default(),
            kv_budget: Gauge::default(),
            kv_reserved: Gauge::default(),
            kv_admission_waits: Counter::default(),
            attempts_open: Gauge::default(),
            scraped: Arc::default(),
        };
        // Every outcome, fallback reason and dead-letter reason is present from the start, at 0.
        for o in RequestOutcome::ALL {
            let _ = m.requests.get_or_create(&OutcomeLabel { outcome: o.as_str() });
        }
        for r in FallbackReason::ALL {
            let _ = m.fallbacks.get_or_create(&ReasonLabel { reason: r.as_str() });
        }
        for code in ErrorCode::ALL {
            let _ = m.dead_lettered.get_or_create(&ReasonLabel { reason: code.as_str() });
        }
        m.register();
        m
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    fn register(&mut self) {
        let r = &mut self.registry;
        r.register(
            "ferry_requests",
            "Requests handled, by outcome: answered, deadline, suspended, republished, error_reply, dead_lettered, handed_off.",
            self.requests.clone(),
        );
        r.register(
            "ferry_requests_in_flight",
            "Requests being served now (generating, publishing, or waiting for a slot).",
            self.in_flight.clone(),
        );
        r.register(
            "ferry_queue_wait_seconds",
            "From a request's Kafka timestamp to the start of its work, for answered requests.",
            self.queue_wait.clone(),
        );
        r.register(
            "ferry_time_to_first_token_seconds",
            "Prefill time of generations that did not resume: the engine's time to the first token.",
            self.time_to_first_token.clone(),
        );
        r.register(
            "ferry_prefill_tokens_per_second",
            "Prompt tokens per second of prefill, one observation per generation that did not resume.",
            self.prefill_rate.clone(),
        );
        r.register(
            "ferry_decode_tokens_per_second",
            "Generated tokens per second of decode, one observation per answered generation.",
            self.decode_rate.clone(),
        );
        r.register(
            "ferry_prompt_tokens",
            "Prompt tokens of answered generations.",
            self.prompt_tokens.clone(),
        );
        r.register(
            "ferry_generated_tokens",
            "Tokens generated for answered requests.",
            self.generated_tokens.clone(),
        );
        r.register(
            "ferry_generation_failures",
            "Generation attempts that failed in the engine.",
            self.generation_failures.clone(),
        );
        r.register(
            "ferry_redeliveries",
            "Deliveries of requests worked on before: an earlier attempt in the ledger, a snapshot resumed, or a stored answer republished.",
            self.redeliveries.clone(),
        );
        r.register(
            "ferry_dead_lettered",
            "Messages sent to the dead-letter topic, by reason code.",
            self.dead_lettered.clone(),
        );
        r.register(
            "ferry_fallback",
            "Requests handed to the fallback topic, by reason: out_of_memory, circuit_breaker_open, accelerator_unhealthy.",
            self.fallbacks.clone(),
        );
        r.register(
            "ferry_assigned_partitions",
            "Partitions assigned to this worker, from librdkafka's statistics.",
            self.assigned_partitions.clone(),
        );
        r.register(
            "ferry_kv_budget_bytes",
            "Memory for KV caches that admitted requests may reserve at most (--kv-budget); 0 when unlimited.",
            self.kv_budget.clone(),
        );
        r.register(
            "ferry_kv_reserved_bytes",
            "Worst-case KV cache memory reserved by the requests admitted now.",
            self.kv_reserved.clone(),
        );
        r.register(
            "ferry_kv_admission_waits",
            "Requests that waited for KV budget before they could start.",
            self.kv_admission_waits.clone(),
        );
        r.register(
            "ferry_attempts_open",
            "Attempts this worker recorded in the ledger that have neither ended nor been settled; a controlled exit closes them as suspended.",
            self.attempts_open.clone(),
        );
        r.register_collector(Box::new(self.scraped.clone()));
    }

    /// How many attempts are open now (see `ferry_attempts_open`).
    pub fn set_attempts_open(&self, n: usize) {
        self.attempts_open.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Adds what `collector` reports at every scrape (the health gauges, for one).
    pub fn register_collector(&mut self, collector: Box<dyn Collector>) {
        self.registry.register_collector(collector);
    }

    /// Every family, in the OpenMetrics text format ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Reads the snapshot writer's counters at every scrape from now on.
    pub fn attach_snapshot_stats(&self, stats: Arc<SnapshotStats>) {
        let _ = self.scraped.snapshots.set(stats);
    }

    /// A request task started; it counts as in flight until the guard drops.
    pub fn request_started(&self) -> InFlightGuard<'_> {
        self.in_flight.inc();
        InFlightGuard(&self.in_flight)
    }

    pub fn request_settled(&self, outcome: RequestOutcome) {
        self.requests
            .get_or_create(&OutcomeLabel {
                outcome: outcome.as_str(),
            })
            .inc();
    }

    /// A generated answer was published.
    pub fn answered(&self, a: &Answered) {
        self.request_settled(if a.finish == FinishReason::Deadline {
            RequestOutcome::Deadline
        } else {
            RequestOutcome::Answered
        });
        self.queue_wait.observe(a.queued.as_secs_f64());
        self.prompt_tokens.inc_by(a.prompt_tokens as u64);
        self.generated_tokens.inc_by(a.completion_tokens as u64);
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
        self.dead_lettered
            .get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            })
            .inc();
    }

    /// A request was handed to the fallback topic and its offset may be committed.
    pub fn handed_off(&self, reason: FallbackReason) {
        self.request_settled(RequestOutcome::HandedOff);
        self.fallbacks
            .get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            })
            .inc();
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
        *lock(&self.scraped.commit_lag) = lag.into_iter().collect();
    }

    /// librdkafka's consumer lag per assigned partition, from its statistics.
    pub fn set_consumer_lag(&self, lag: impl IntoIterator<Item = (TopicPartition, i64)>) {
        *lock(&self.scraped.consumer_lag) = lag.into_iter().collect();
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
        self.kv_reserved.inc_by(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// An admitted request's reservation was released.
    pub fn kv_released(&self, bytes: u64) {
        self.kv_reserved.dec_by(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// A request had to wait for KV budget before it could start.
    pub fn kv_admission_waited(&self) {
        self.kv_admission_waits.inc();
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

mod scrape;
pub use scrape::encode_value;
use scrape::ScrapeTime;

#[cfg(test)]
mod tests;
