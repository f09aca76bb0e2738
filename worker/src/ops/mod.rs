//! The worker's operational surface: what an operator and Kubernetes see of it.
//!
//! - [`http`]: `/healthz`, `/readyz` and `/metrics` on `--http-addr`, and the probes alone on
//!   `--probe-addr`.
//! - [`metrics`]: what is measured, recorded through typed functions and written in the
//!   OpenMetrics text format by `prometheus-client`.
//! - [`health`]: readiness, liveness, the accelerator health monitor and the circuit breaker,
//!   and the *trip* that drains the worker and exits it to be restarted.
//! - [`trace`]: W3C `traceparent` from a request's Kafka headers to its reply.
//! - [`otel`]: OpenTelemetry spans exported over OTLP/HTTP, off unless `--otlp-endpoint` is set.
//! - [`logging`]: JSON log lines with the fields of every enclosing span (`request_id`, `topic`,
//!   `partition`, `offset`, `trace_id`) at the top level.
//! - `cuda` (with the `cuda` feature): the CUDA health source; [`nvml`]: the GPU's own health
//!   from NVML, where a driver is installed.
//!
//! The consumer records into an [`Ops`] it is handed; nothing here reaches into the consumer.

pub mod health;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod nvml;
pub mod otel;
pub mod trace;

#[cfg(feature = "cuda")]
pub mod cuda;

use std::sync::Arc;
use std::time::Duration;

pub use health::{Health, HealthSource, HealthState, Trip, EXIT_UNHEALTHY};
pub use metrics::{FallbackReason, Metrics, RequestOutcome};

/// Metrics and health, shared by the consumer, the monitor and the HTTP server.
#[derive(Debug)]
pub struct Ops {
    pub metrics: Metrics,
    pub health: Arc<HealthState>,
}

impl Ops {
    /// `signals` is the counter the consumer drains on (a trip counts as the first signal).
    pub fn new(
        signals: Arc<tokio::sync::watch::Sender<u32>>,
        breaker_failures: u32,
        stall_limit: Duration,
    ) -> Arc<Self> {
        let health = Arc::new(HealthState::new(signals, breaker_failures, stall_limit));
        let mut metrics = Metrics::new();
        metrics.register_collector(Box::new(health::HealthGauges(health.clone())));
        Arc::new(Self { metrics, health })
    }

    /// Everything `/metrics` shows.
    pub fn render_metrics(&self) -> String {
        self.metrics.render()
    }
}

/// Whether a CUDA driver error code (`CUresult`) means the context, or the device, can no longer
/// be trusted. These are the *sticky* errors, after which every call on the context fails the
/// same way (illegal address, failed launch, hardware exceptions, assert), plus the ones that say
/// the device or driver is gone (uncorrectable ECC or NVLink error, device unavailable, driver
/// deinitialised, destroyed context, unknown). Anything else (out of memory, say) is reported as
/// degraded, not fatal.
pub fn is_unrecoverable(code: u32) -> bool {
    matches!(
        code,
        3 // NOT_INITIALIZED
        | 4 // DEINITIALIZED
        | 46 // DEVICE_UNAVAILABLE
        | 201 // INVALID_CONTEXT
        | 214 // ECC_UNCORRECTABLE
        | 220 // NVLINK_UNCORRECTABLE
        | 700 // ILLEGAL_ADDRESS
        | 702 // LAUNCH_TIMEOUT
        | 709 // CONTEXT_IS_DESTROYED
        | 710 // ASSERT
        | 714
            ..=719 // HARDWARE_STACK_ERROR, ILLEGAL_INSTRUCTION, MISALIGNED_ADDRESS,
                    // INVALID_ADDRESS_SPACE, INVALID_PC, LAUNCH_FAILED
        | 999 // UNKNOWN
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sticky_and_device_lost_errors_are_unrecoverable() {
        for code in [214, 220, 700, 702, 710, 714, 715, 716, 717, 718, 719, 46, 999] {
            assert!(is_unrecoverable(code), "{code}");
        }
        // Success, out of memory, launch out of resources, not supported: not fatal.
        for code in [0, 2, 701, 801, 720] {
            assert!(!is_unrecoverable(code), "{code}");
        }
    }

    #[test]
    fn metrics_include_health() {
        let (tx, _rx) = tokio::sync::watch::channel(0);
        let ops = Ops::new(Arc::new(tx), 5, Duration::from_secs(60));
        let text = ops.render_metrics();
        assert!(text.contains("ferry_requests_total{outcome=\"answered\"} 0\n"));
        assert!(text.contains("ferry_ready 0\n"));
    }
}
