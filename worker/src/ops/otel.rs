//! OpenTelemetry traces, exported over OTLP/HTTP (protobuf) to the collector that
//! `--otlp-endpoint` names, and off unless it does.
//!
//! The worker's `tracing` spans become OpenTelemetry spans through `tracing-opentelemetry`; the
//! SDK batches them on a thread of its own and posts them to `<endpoint>/v1/traces`. The span of
//! a request (the consumer's `message` span) is made the child of the caller's span when the
//! request carries a valid `traceparent` ([`adopt`]), and the span id the SDK gave it is the one
//! the worker writes on everything it publishes for the request, so a trace viewer links the
//! caller, the worker's spans and the reply's consumer. A caller's sampled flag is honoured
//! (parent-based sampling); a request without a `traceparent` starts a trace of its own, exported
//! but not propagated (see [`super::trace`]).
//!
//! The exporter never blocks the worker: a collector that is down or slow costs dropped spans
//! (the batch queue is bounded), never a request.

use std::time::Duration;

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry::KeyValue;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::trace::TraceContext;

/// How long one export may take before it is abandoned.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// The exporter of a worker whose traces go somewhere.
#[derive(Debug)]
pub struct Exporter {
    provider: SdkTracerProvider,
}

impl Exporter {
    /// An exporter to the collector at `endpoint` (its OTLP/HTTP base URL, such as
    /// `http://collector:4318`; a URL that already ends in `/v1/traces` is used as it is), its
    /// spans named for `service` and this worker, `instance`.
    pub fn new(endpoint: &url::Url, service: &str, instance: &str) -> Result<Self, String> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(traces_url(endpoint))
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| format!("cannot build the OTLP exporter for {endpoint}: {e}"))?;
        let resource = Resource::builder()
            .with_service_name(service.to_string())
            .with_attribute(KeyValue::new("service.instance.id", instance.to_string()))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
            .with_resource(resource)
            .build();
        Ok(Self { provider })
    }

    /// The tracer the `tracing` layer hands spans to.
    pub fn tracer(&self) -> SdkTracer {
        self.provider.tracer("ferry-worker")
    }

    /// Exports what is still queued and stops: called once, as the worker exits.
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "could not export the last spans");
        }
    }
}

/// Where OTLP/HTTP traces go, given a collector's base URL.
pub fn traces_url(endpoint: &url::Url) -> String {
    let base = endpoint.as_str().trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        base.to_string()
    } else {
        format!("{base}/v1/traces")
    }
}

/// Makes `span` (not yet entered) the child of the caller's span `parent`, with its
/// `tracestate`, and returns the span id the exporter gave it; `None` when no spans are
/// exported (then the worker draws an id of its own).
pub fn adopt(span: &tracing::Span, parent: Option<&TraceContext>, tracestate: Option<&str>) -> Option<[u8; 8]> {
    if let Some(p) = parent {
        let state = tracestate
            .and_then(|s| s.parse::<TraceState>().ok())
            .unwrap_or_default();
        let remote = SpanContext::new(
            TraceId::from_bytes(p.trace_id),
            SpanId::from_bytes(p.span_id),
            TraceFlags::new(p.flags),
            true,
            state,
        );
        // Without the layer (no exporter) there is nothing to parent, and nothing to report.
        span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote))
            .ok()?;
    }
    let context = span.context();
    let own = context.span().span_context().clone();
    own.is_valid().then(|| own.span_id().to_bytes())
}

#[cfg(test)]
mod tests;
