use super::*;
use crate::record::{ChunkSeen, ErrorSeen, FaultKind, ResponseSeen};
use ferry_schemas::{ErrorCode, ErrorDetail, ErrorReply, FinishReason, Request, Response, Timings, Usage};

pub(crate) fn request(id: &str, stream: bool) -> Request {
    let mut r: Request = serde_json::from_str(r#"{"id":"x","prompt":"p"}"#).expect("valid request");
    r.id = id.to_string();
    r.stream = stream;
    r
}

pub(crate) fn response(id: &str, tokens: u32, queued_ms: f64) -> Response {
    Response {
        version: 1,
        id: id.to_string(),
        model: "m".into(),
        text: "t".into(),
        finish_reason: FinishReason::Length,
        stop_sequence: None,
        usage: Usage {
            prompt_tokens: 3,
            completion_tokens: tokens,
            total_tokens: 3 + tokens,
        },
        timings: Timings {
            queued_ms,
            prefill_ms: 1.0,
            decode_ms: 2.0,
            total_ms: 3.0,
        },
        worker: "w".into(),
        attempt: 1,
        resumed_from_token: None,
        metadata: None,
    }
}

/// A run of `n` greedy requests, request k sent at k * 100 ms and answered (k + 1) * 10 ms
/// later with k + 1 tokens and k ms of queue wait; the last one is streamed with a chunk 5 ms
/// after sending, the one before is answered twice, and one more is answered with an error.
pub(crate) fn sample_records(n: usize) -> Vec<RequestRecord> {
    let mut records: Vec<RequestRecord> = (0..n)
        .map(|k| {
            let id = format!("r{k}");
            let sent = k as f64 * 100.0;
            let mut r = RequestRecord::new(request(&id, k == n - 1), k, sent);
            let at_ms = sent + (k as f64 + 1.0) * 10.0;
            r.responses.push(ResponseSeen {
                response: response(&id, k as u32 + 1, k as f64),
                at_ms,
            });
            if k == n - 1 {
                r.chunks.push(ChunkSeen {
                    seq: 0,
                    text: "t".into(),
                    at_ms: sent + 5.0,
                });
            }
            if k == n - 2 {
                r.responses.push(ResponseSeen {
                    response: response(&id, k as u32 + 1, k as f64),
                    at_ms: at_ms + 50.0,
                });
            }
            r
        })
        .collect();
    let mut failed = RequestRecord::new(request("bad", false), 0, 0.0);
    failed.errors.push(ErrorSeen {
        error: ErrorReply {
            version: 1,
            id: "bad".into(),
            error: ErrorDetail {
                code: ErrorCode::EngineError,
                message: "boom".into(),
            },
            worker: "w".into(),
            attempt: 1,
            metadata: None,
        },
        at_ms: 2.0,
    });
    records.push(failed);
    records.push(RequestRecord::new(request("lost", false), 0, 50.0));
    records
}

#[test]
fn counts_and_percentiles() {
    let records = sample_records(100);
    let faults = [FaultEvent {
        kind: FaultKind::Crash,
        at_ms: 500.0,
        workers: vec!["w-1".into()],
        until_ms: None,
    }];
    let report = Report::build(&records, &faults, Duration::from_secs(10));
    let c = &report.counts;
    assert_eq!(
        (c.sent, c.answered, c.responses, c.errors, c.unanswered),
        (102, 101, 100, 1, 1)
    );
    assert_eq!(
        (c.duplicate_replies, c.duplicated_requests, c.streamed, c.chunks),
        (1, 1, 1, 1)
    );
    assert_eq!(c.errors_by_code.get("engine_error"), Some(&1));
    assert_eq!(report.tokens.count, 100);
    assert_eq!(report.tokens.p50, Some(50.0));
    assert_eq!(report.tokens.p99, Some(99.0));
    assert_eq!(report.tokens.max, Some(100.0));
    // Latencies are 10..=1000 ms for the responses and 2 ms for the error reply.
    let near = |v: Option<f64>, x: f64| v.is_some_and(|v| (v - x).abs() <= x * 0.001 + 0.01);
    assert!(near(report.latency_ms.p50, 500.0), "{:?}", report.latency_ms);
    assert!(near(report.latency_ms.max, 1000.0), "{:?}", report.latency_ms);
    assert!(near(report.latency_ms.min, 2.0), "{:?}", report.latency_ms);
    assert!(near(report.queue_wait_ms.p90, 89.0), "{:?}", report.queue_wait_ms);
    assert_eq!(report.time_to_first_token_ms.count, 1);
    assert!(near(report.time_to_first_token_ms.p50, 5.0));
    assert!((report.throughput.answers_per_s - 10.1).abs() < 1e-9);
    assert!((report.throughput.tokens_per_s - 505.0).abs() < 1e-9);
    assert_eq!(report.faults, faults);
}

#[test]
fn per_second_series_covers_the_run() {
    let records = sample_records(20);
    let series = per_second(&records, Duration::from_millis(3500));
    assert_eq!(series.len(), 4);
    assert_eq!(series.iter().map(|s| s.errors).sum::<usize>(), 1);
    assert_eq!(series.iter().map(|s| s.tokens).sum::<u64>(), (1..=20).sum::<u64>());
    // Request k is answered at 110 k + 10 ms: request 9 at 1000 ms, the first of second 1,
    // and request 19 at 2100 ms; the error reply comes at 2 ms.
    let answers: Vec<usize> = series.iter().map(|s| s.answers).collect();
    assert_eq!(answers, [10, 10, 1, 0]);
    assert_eq!(series[3].latency_max_ms, None);
    assert!(series[0].latency_max_ms.is_some_and(|m| (m - 90.0).abs() < 1e-9));
    assert!(series[2].latency_p50_ms.is_some_and(|m| (m - 200.0).abs() < 1e-9));
}

#[test]
fn summary_table_and_json_report() -> anyhow::Result<()> {
    let report = Report::build(&sample_records(10), &[], Duration::from_secs(2));
    let table = report.summary_table();
    assert!(table.contains("12 sent, 11 answered (10 responses, 1 errors), 1 unanswered, 1 duplicate"));
    assert!(table.contains("errors by code: engine_error 1"), "{table}");
    for row in [
        "queue wait (ms)",
        "time to first token (ms)",
        "total latency (ms)",
        "tokens generated",
    ] {
        assert!(table.lines().any(|l| l.starts_with(row)), "{row} missing from\n{table}");
    }
    let tokens_row = table
        .lines()
        .find(|l| l.starts_with("tokens generated"))
        .unwrap_or_default();
    assert_eq!(
        tokens_row.split_whitespace().skip(2).collect::<Vec<_>>(),
        ["10", "5", "9", "10", "10"]
    );
    let json = serde_json::to_value(&report)?;
    assert_eq!(json["counts"]["answered"], 11);
    assert_eq!(json["tokens"]["p90"], 9.0);
    assert_eq!(json["per_second"].as_array().map(Vec::len), Some(2));
    assert!(json.get("histograms").is_none());
    Ok(())
}

#[test]
fn empty_run_has_no_percentiles() {
    let report = Report::build(&[], &[], Duration::ZERO);
    assert_eq!(report.latency_ms, Summary::default());
    assert_eq!(report.throughput, Throughput::default());
    assert!(report.summary_table().contains("total latency (ms)"));
}
