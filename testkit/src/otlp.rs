//! An OTLP/HTTP trace receiver: what a collector receives from a worker started with
//! `--otlp-endpoint`, decoded with OpenTelemetry's own protobuf types. It answers every export
//! with 200 and keeps the spans for the test to read.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message as _;

/// A span as exported: ids as lowercase hex, the parent's empty for a root span.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedSpan {
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    /// The exporting process's `service.name`.
    pub service: String,
}

/// A receiver on a free local port, serving until the test ends.
pub struct Collector {
    port: u16,
    spans: Arc<Mutex<Vec<ExportedSpan>>>,
    /// What came to `/v1/traces` and could not be read, to fail the test with.
    errors: Arc<Mutex<Vec<String>>>,
}

impl Collector {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (spans, errors) = (Arc::default(), Arc::default());
        let (s, e) = (Arc::clone(&spans), Arc::clone(&errors));
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let (s, e) = (Arc::clone(&s), Arc::clone(&e));
                std::thread::spawn(move || serve(stream, &s, &e));
            }
        });
        Self { port, spans, errors }
    }

    /// The base URL to give `--otlp-endpoint`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every span received so far; panics if an export could not be read.
    pub fn spans(&self) -> Vec<ExportedSpan> {
        let errors = self.errors.lock().expect("lock").clone();
        assert!(errors.is_empty(), "unreadable exports: {errors:?}");
        self.spans.lock().expect("lock").clone()
    }
}

/// Answers the HTTP/1.1 requests of one connection (the exporter keeps it alive).
fn serve(stream: TcpStream, spans: &Mutex<Vec<ExportedSpan>>, errors: &Mutex<Vec<String>>) {
    let mut out = match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        if request_line.starts_with("POST /v1/traces ") {
            match ExportTraceServiceRequest::decode(body.as_slice()) {
                Ok(export) => spans.lock().expect("lock").extend(flatten(export)),
                Err(e) => errors.lock().expect("lock").push(e.to_string()),
            }
        } else {
            errors
                .lock()
                .expect("lock")
                .push(format!("unexpected request: {}", request_line.trim()));
        }
        let answer = "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
        if out.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

fn flatten(export: ExportTraceServiceRequest) -> Vec<ExportedSpan> {
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let mut out = Vec::new();
    for resource in export.resource_spans {
        let service = resource
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|a| a.key == "service.name")
            .and_then(|a| a.value.as_ref())
            .and_then(|v| match &v.value {
                Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_default();
        for scope in resource.scope_spans {
            for span in scope.spans {
                out.push(ExportedSpan {
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    service: service.clone(),
                });
            }
        }
    }
    out
}
