//! Log output: text for people, or one JSON object per line for log collectors.
//!
//! In JSON, the fields of every span around an event are written at the top level beside the
//! event's own, so a line about a request carries `topic`, `partition`, `offset` (the "message"
//! span), `request_id` (the "request" span) and `trace_id` / `span_id` without a collector having
//! to dig into nested span objects. An event's own field wins over a span's of the same name;
//! `spans` names the enclosing spans, outermost first.
//!
//! ```json
//! {"timestamp":"2025-01-01T12:00:00.000000Z","level":"INFO","target":"ferry_worker::consumer::request",
//!  "spans":"message:request","topic":"ferry.requests","partition":0,"offset":41,
//!  "trace_id":"4bf9…","request_id":"r1","completion_tokens":32,"message":"answered"}
//! ```

use std::fmt;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormattedFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

use crate::config::LogFormat;

/// Installs the global subscriber: `format` on stderr, filtered by `filter` (`tracing` syntax;
/// `info` when it does not parse), and the spans that pass the filter handed to `tracer` too
/// when there is one (see [`super::otel`]).
pub fn init(format: LogFormat, filter: &str, tracer: Option<opentelemetry_sdk::trace::SdkTracer>) {
    use tracing_subscriber::layer::{Layered, SubscriberExt};
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer, Registry};
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let mut layers: Vec<Box<dyn Layer<Layered<EnvFilter, Registry>> + Send + Sync>> = vec![match format {
        LogFormat::Json => fmt.fmt_fields(JsonFields::new()).event_format(FlatJson).boxed(),
        LogFormat::Text => fmt
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed(),
    }];
    if let Some(tracer) = tracer {
        layers.push(tracing_opentelemetry::layer().with_tracer(tracer).boxed());
    }
    tracing_subscriber::registry().with(filter).with(layers).init();
}

/// A JSON subscriber writing to `writer`, for tests.
pub fn json_subscriber<W>(writer: W) -> impl Subscriber + Send + Sync
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .with_writer(writer)
        .fmt_fields(JsonFields::new())
        .event_format(FlatJson)
        .finish()
}

/// The JSON event format with span fields flattened (see the module doc).
#[derive(Debug, Clone, Copy, Default)]
pub struct FlatJson;

impl<S> FormatEvent<S, JsonFields> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut line = Map::new();
        let now = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        line.insert("timestamp".into(), Value::String(now));
        line.insert("level".into(), Value::String(meta.level().to_string()));
        line.insert("target".into(), Value::String(meta.target().to_string()));
        if let Some(scope) = ctx.event_scope() {
            let mut names = Vec::new();
            for span in scope.from_root() {
                names.push(span.name());
                let ext = span.extensions();
                let Some(fields) = ext.get::<FormattedFields<JsonFields>>() else {
                    continue;
                };
                if let Ok(Value::Object(map)) = serde_json::from_str::<Value>(&fields.fields) {
                    line.extend(map);
                }
            }
            if !names.is_empty() {
                line.insert("spans".into(), Value::String(names.join(":")));
            }
        }
        event.record(&mut Fields(&mut line));
        let text = serde_json::to_string(&line).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

/// Collects an event's fields into the line.
struct Fields<'a>(&'a mut Map<String, Value>);

impl Visit for Fields<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        let v = serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number);
        self.0.insert(field.name().into(), v);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0.insert(field.name().into(), value.to_string().into());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("buffer").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'w self) -> Buffer {
            self.clone()
        }
    }

    #[test]
    fn a_request_line_carries_the_fields_of_its_spans() {
        let buf = Buffer::default();
        tracing::subscriber::with_default(json_subscriber(buf.clone()), || {
            let message = tracing::info_span!(
                "message",
                topic = "ferry.requests",
                partition = 2,
                offset = 41,
                trace_id = tracing::field::Empty
            );
            let _m = message.enter();
            message.record("trace_id", "4bf92f3577b34da6a3ce929d0e0e4736");
            let request = tracing::info_span!("request", request_id = %"r1");
            let _r = request.enter();
            tracing::info!(completion_tokens = 32, offset = 99, ratio = 0.5, "answered");
        });
        let out = String::from_utf8(buf.0.lock().expect("buffer").clone()).expect("utf-8");
        let line: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"));
        assert_eq!(line["message"], "answered");
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["request_id"], "r1");
        assert_eq!(line["topic"], "ferry.requests");
        assert_eq!(line["partition"], 2);
        assert_eq!(line["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(line["completion_tokens"], 32);
        assert_eq!(line["ratio"], 0.5);
        assert_eq!(line["offset"], 99, "the event's own field wins");
        assert_eq!(line["spans"], "message:request");
        assert!(line["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')));
    }
}
