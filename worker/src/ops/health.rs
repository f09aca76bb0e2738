//! Whether the worker should get work (`/readyz`), whether it is alive (`/healthz`), and what
//! makes it give up on itself: an accelerator that reports an unrecoverable error, or a circuit
//! breaker that opens after repeated engine failures.
//!
//! Either *trip* does what a SIGTERM does, on purpose: the worker turns unready, drains (every
//! generation in flight snapshotted, the group left at once so the partitions move), and then
//! exits with [`EXIT_UNHEALTHY`] so that Kubernetes restarts it. A fresh process gets a fresh CUDA
//! context; a GPU that stays broken fails again at its next check and the pod never turns ready,
//! which is what the operator's alert should catch. A trip is final for the process: there is no
//! half-open state to try the engine again, since serving on a broken device could answer wrong.
//!
//! The readiness state is plain atomics; the breaker is a pure value; the monitor is a loop over
//! an injected [`HealthSource`], so all of it is tested without a GPU.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{error, info, warn};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;

use super::metrics::encode_value;

/// The exit status after a trip: drained, unhealthy, to be restarted.
pub const EXIT_UNHEALTHY: u8 = 3;

/// How long one health check may take before the device counts as hung.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(60);

/// What a health source reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Healthy,
    /// Working, with something worth a warning (logged once per change; readiness unaffected).
    Degraded(String),
    /// The device cannot be trusted any more: the worker drains and exits.
    Unrecoverable(String),
}

/// Something that can say whether the accelerator still works. `check` may block (it runs on a
/// blocking thread).
pub trait HealthSource: Send + Sync + 'static {
    /// A short name for logs and reasons (`cuda:0`).
    fn name(&self) -> String;
    fn check(&self) -> Health;
}

/// Opens after `threshold` consecutive generation failures of *different* requests, with no
/// successful generation between them. The retries of one request count once, so a single
/// poison message (which its attempt budget already handles) never opens it; a device that
/// fails whatever it runs opens it after `threshold` requests. It never closes: the process
/// exits (see the module doc). A threshold of 0 turns it off.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    threshold: usize,
    /// The distinct requests of the current failure streak.
    streak: Vec<String>,
    open: bool,
}

impl CircuitBreaker {
    pub fn new(threshold: u32) -> Self {
        Self {
            threshold: threshold as usize,
            streak: Vec::new(),
            open: false,
        }
    }

    pub fn record_success(&mut self) {
        if !self.open {
            self.streak.clear();
        }
    }

    /// Records a failed generation of `request`; true when this failure opened the breaker.
    pub fn record_failure(&mut self, request: &str) -> bool {
        if self.open || self.threshold == 0 {
            return false;
        }
        if !self.streak.iter().any(|r| r == request) {
            self.streak.push(request.to_string());
        }
        self.open = self.streak.len() >= self.threshold;
        self.open
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Failures of distinct requests in the current streak.
    pub fn streak(&self) -> usize {
        self.streak.len()
    }
}

/// Why the worker gave up on itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Trip {
    /// A [`HealthSource`] reported an unrecoverable error.
    #[error("accelerator unhealthy: {0}")]
    Accelerator(String),
    /// The [`CircuitBreaker`] opened.
    #[error("circuit breaker open: {0}")]
    Breaker(String),
}

/// The worker's health, shared by the consumer, the monitor and the HTTP endpoints.
#[derive(Debug)]
pub struct HealthState {
    model_loaded: AtomicBool,
    /// The group has given this worker its first assignment (an empty one counts: a worker
    /// without partitions in a fleet larger than the topic is a healthy standby).
    consuming: AtomicBool,
    draining: AtomicBool,
    tripped: Mutex<Option<Trip>>,
    /// What each health source that reports a degraded state says, by source: one source's
    /// recovery does not clear another's report (CUDA's context check and NVML run side by side).
    degraded: Mutex<BTreeMap<String, String>>,
    breaker: Mutex<CircuitBreaker>,
    /// The signal counter the consumer watches: a trip counts as the first signal.
    signals: Arc<watch::Sender<u32>>,
    started: Instant,
    /// When the consumer loop last went round, in ms since `started`, plus one (0: not yet).
    loop_beat: AtomicU64,
    /// How long the loop may stand still before `/healthz` fails.
    stall_limit: Duration,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl HealthState {
    /// `signals` is the counter the consumer drains on; `breaker_failures` the breaker's
    /// threshold (0: off); `stall_limit` how long the consumer loop may stand still.
    pub fn new(signals: Arc<watch::Sender<u32>>, breaker_failures: u32, stall_limit: Duration) -> Self {
        Self {
            model_loaded: AtomicBool::new(false),
            consuming: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            tripped: Mutex::new(None),
            degraded: Mutex::new(BTreeMap::new()),
            breaker: Mutex::new(CircuitBreaker::new(breaker_failures)),
            signals,
            started: Instant::now(),
            loop_beat: AtomicU64::new(0),
            stall_limit,
        }
    }

    pub fn set_model_loaded(&self) {
        self.model_loaded.store(true, Ordering::Release);
    }

    /// The group assigned partitions to this worker (possibly none).
    pub fn set_consuming(&self) {
        if !self.consuming.swap(true, Ordering::AcqRel) {
            info!("first assignment received: ready");
        }
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// The consumer loop went round.
    pub fn beat(&self) {
        let ms = self.started.elapsed().as_millis() as u64 + 1;
        self.loop_beat.store(ms, Ordering::Release);
    }

    /// `Ok` when the worker should be given work; otherwise the reason, in one line.
    pub fn readiness(&self) -> Result<(), String> {
        if let Some(t) = lock(&self.tripped).as_ref() {
            return Err(t.to_string());
        }
        if self.draining.load(Ordering::Acquire) {
            return Err("draining".into());
        }
        if !self.model_loaded.load(Ordering::Acquire) {
            return Err("loading the model".into());
        }
        if !self.consuming.load(Ordering::Acquire) {
            return Err("waiting for the consumer group's first assignment".into());
        }
        Ok(())
    }

    /// `Ok` while the process works; an error when the consumer loop, once started, has stood
    /// still longer than the stall limit outside a drain (librdkafka has then left the group on
    /// its own, and only a restart brings the worker back).
    pub fn liveness(&self) -> Result<(), String> {
        self.liveness_at(Instant::now())
    }

    fn liveness_at(&self, now: Instant) -> Result<(), String> {
        let beat = self.loop_beat.load(Ordering::Acquire);
        if beat == 0 || self.draining.load(Ordering::Acquire) {
            return Ok(());
        }
        let last = self.started + Duration::from_millis(beat - 1);
        let still = now.saturating_duration_since(last);
        if still > self.stall_limit {
            return Err(format!("the consumer loop has not run for {}s", still.as_secs()));
        }
        Ok(())
    }

    /// Gives up: unready from now on, and the drain starts as a first SIGTERM would start it
    /// (unless a drain is already under way: a second signal would cut it short). The first
    /// trip is the one reported.
    pub fn trip(&self, trip: Trip) {
        {
            let mut t = lock(&self.tripped);
            if t.is_some() {
                return;
            }
            error!(reason = %trip, "draining and exiting to be restarted");
            *t = Some(trip);
        }
        self.signals.send_if_modified(|n| {
            if *n == 0 {
                *n = 1;
                true
            } else {
                false
            }
        });
    }

    /// Why the process should exit unhealthy, if it tripped.
    pub fn exit_reason(&self) -> Option<String> {
        lock(&self.tripped).as_ref().map(Trip::to_string)
    }

    /// The trip, once the worker has given up on itself: what it still holds cannot be served
    /// here (see `--fallback-topic`).
    pub fn tripped(&self) -> Option<Trip> {
        lock(&self.tripped).clone()
    }

    pub fn generation_succeeded(&self) {
        lock(&self.breaker).record_success();
    }

    /// Records a failed generation of `request`; trips when the breaker opens.
    pub fn generation_failed(&self, request: &str, error: &str) {
        let (opened, threshold) = {
            let mut b = lock(&self.breaker);
            (b.record_failure(request), b.threshold)
        };
        if opened {
            self.trip(Trip::Breaker(format!(
                "{threshold} different requests failed in a row; the last: {error}"
            )));
        }
    }

    /// Applies one health check's result; returns false once the monitor should stop (tripped).
    pub fn observe(&self, source: &str, health: Health) -> bool {
        match health {
            Health::Healthy => {
                if lock(&self.degraded).remove(source).is_some() {
                    info!(source, "accelerator healthy again");
                }
                true
            }
            Health::Degraded(why) => {
                let mut d = lock(&self.degraded);
                if d.get(source) != Some(&why) {
                    warn!(source, reason = %why, "accelerator degraded");
                    d.insert(source.to_string(), why);
                }
                true
            }
            Health::Unrecoverable(why) => {
                self.trip(Trip::Accelerator(format!("{source}: {why}")));
                false
            }
        }
    }
}

/// The health gauges for `/metrics`, read from the state at every scrape.
#[derive(Debug, Clone)]
pub struct HealthGauges(pub Arc<HealthState>);

impl Collector for HealthGauges {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.0;
        let tripped = lock(&s.tripped).clone();
        let breaker = lock(&s.breaker).clone();
        let gauges = [
            (
                "ferry_ready",
                "1 while /readyz answers 200.",
                i64::from(s.readiness().is_ok()),
            ),
            (
                "ferry_draining",
                "1 once the worker drains (a signal or a trip).",
                i64::from(s.draining.load(Ordering::Acquire)),
            ),
            (
                "ferry_accelerator_degraded",
                "1 while any of the accelerator's health sources reports a degraded state.",
                i64::from(!lock(&s.degraded).is_empty()),
            ),
            (
                "ferry_accelerator_unrecoverable",
                "1 once the accelerator reported an unrecoverable error.",
                i64::from(matches!(tripped, Some(Trip::Accelerator(_)))),
            ),
            (
                "ferry_circuit_breaker_open",
                "1 once repeated engine failures opened the circuit breaker.",
                i64::from(breaker.is_open()),
            ),
            (
                "ferry_circuit_breaker_failure_streak",
                "Different requests that failed in a row since the last successful generation.",
                i64::try_from(breaker.streak()).unwrap_or(i64::MAX),
            ),
        ];
        for (name, help, v) in gauges {
            encode_value(&mut e, name, help, MetricType::Gauge, v)?;
        }
        Ok(())
    }
}

/// Checks `source` every `every` until it reports an unrecoverable error (then trips and
/// returns). A check that does not return within [`CHECK_TIMEOUT`] counts as unrecoverable: a
/// hung device is as useless as a broken one.
pub async fn monitor(source: Arc<dyn HealthSource>, every: Duration, state: Arc<HealthState>) {
    let name = source.name();
    info!(source = %name, every = ?every, "accelerator health monitor started");
    loop {
        let s = source.clone();
        let check = tokio::task::spawn_blocking(move || s.check());
        let health = match tokio::time::timeout(CHECK_TIMEOUT, check).await {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => Health::Unrecoverable(format!("the health check panicked: {e}")),
            Err(_) => Health::Unrecoverable(format!("the health check did not return within {CHECK_TIMEOUT:?}")),
        };
        if !state.observe(&name, health) {
            return;
        }
        tokio::time::sleep(every).await;
    }
}

/// Test-only accelerator failure, compiled only with the `fault-injection` feature:
/// `FERRY_FAULT_ACCELERATOR_FILE=<path>` reports an unrecoverable error once that file exists.
#[cfg(feature = "fault-injection")]
pub mod fault {
    use super::{Health, HealthSource};

    #[derive(Debug)]
    pub struct FileFault(pub std::path::PathBuf);

    impl FileFault {
        pub fn from_env() -> Option<Self> {
            std::env::var_os("FERRY_FAULT_ACCELERATOR_FILE").map(|p| Self(p.into()))
        }
    }

    impl HealthSource for FileFault {
        fn name(&self) -> String {
            "fault-injection".into()
        }

        fn check(&self) -> Health {
            if self.0.exists() {
                Health::Unrecoverable("injected fault (CUDA_ERROR_ECC_UNCORRECTABLE)".into())
            } else {
                Health::Healthy
            }
        }
    }
}

#[cfg(test)]
mod tests;
