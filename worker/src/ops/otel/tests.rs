use opentelemetry::trace::TraceContextExt;
use tracing_subscriber::layer::SubscriberExt;

use super::*;

fn url(s: &str) -> url::Url {
    s.parse().expect("a URL")
}

#[test]
fn traces_go_to_the_collectors_traces_path() {
    assert_eq!(
        traces_url(&url("http://collector:4318")),
        "http://collector:4318/v1/traces"
    );
    assert_eq!(
        traces_url(&url("http://collector:4318/")),
        "http://collector:4318/v1/traces"
    );
    assert_eq!(
        traces_url(&url("https://c.example/otlp/v1/traces")),
        "https://c.example/otlp/v1/traces"
    );
    assert_eq!(
        traces_url(&url("https://c.example/otlp")),
        "https://c.example/otlp/v1/traces"
    );
}

const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[test]
fn without_an_exporter_a_span_is_not_adopted() {
    let parent = TraceContext::parse(PARENT).expect("valid");
    let span = tracing::info_span!("message");
    assert_eq!(adopt(&span, Some(&parent), None), None);
}

#[test]
fn an_adopted_span_continues_the_callers_trace_with_an_id_of_its_own() {
    let provider = SdkTracerProvider::builder().build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("test"));
    let subscriber = tracing_subscriber::registry().with(layer);
    tracing::subscriber::with_default(subscriber, || {
        let parent = TraceContext::parse(PARENT).expect("valid");
        let span = tracing::info_span!("message");
        let own = adopt(&span, Some(&parent), Some("vendor=x")).expect("an id from the exporter");
        assert_ne!(own, parent.span_id);
        assert_ne!(own, [0; 8]);
        let context = span.context();
        let sc = context.span().span_context().clone();
        assert_eq!(sc.trace_id().to_bytes(), parent.trace_id);
        assert_eq!(sc.span_id().to_bytes(), own);
        assert!(sc.is_sampled(), "the caller's sampled flag is kept");
        assert_eq!(sc.trace_state().get("vendor"), Some("x"));

        // No caller: a trace of the worker's own.
        let root = tracing::info_span!("message");
        let id = adopt(&root, None, None).expect("an id");
        assert_ne!(
            root.context().span().span_context().trace_id().to_bytes(),
            parent.trace_id
        );
        assert_ne!(id, [0; 8]);
    });
}
