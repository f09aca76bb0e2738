use super::*;

fn render(m: &Metrics) -> String {
    m.render()
}

#[test]
fn outcomes_are_counted_with_every_label_present_from_the_start() {
    let m = Metrics::new();
    let text = render(&m);
    for o in RequestOutcome::ALL {
        assert!(
            text.contains(&format!("ferry_requests_total{{outcome=\"{}\"}} 0\n", o.as_str())),
            "{text}"
        );
    }
    m.dead_lettered(ErrorCode::InvalidJson, false);
    m.dead_lettered(ErrorCode::PromptTooLong, true);
    m.request_settled(RequestOutcome::Suspended);
    assert!(
        text.contains("ferry_fallback_total{reason=\"out_of_memory\"} 0\n"),
        "{text}"
    );
    m.handed_off(FallbackReason::OutOfMemory);
    let text = render(&m);
    assert!(
        text.contains("ferry_fallback_total{reason=\"out_of_memory\"} 1\n"),
        "{text}"
    );
    assert!(text.contains("ferry_fallback_total{reason=\"circuit_breaker_open\"} 0\n"));
    assert!(text.contains("ferry_requests_total{outcome=\"handed_off\"} 1\n"));
    assert!(text.contains("ferry_requests_total{outcome=\"dead_lettered\"} 1\n"));
    assert!(text.contains("ferry_requests_total{outcome=\"error_reply\"} 1\n"));
    assert!(text.contains("ferry_requests_total{outcome=\"suspended\"} 1\n"));
    assert!(text.contains("ferry_dead_lettered_total{reason=\"invalid_json\"} 1\n"));
    assert!(text.contains("ferry_dead_lettered_total{reason=\"prompt_too_long\"} 1\n"));
}

#[test]
fn an_answer_feeds_the_latency_and_speed_histograms() {
    let m = Metrics::new();
    let answer = Answered {
        queued: Duration::from_millis(30),
        finish: FinishReason::Length,
        prompt_tokens: 50,
        completion_tokens: 20,
        prefill: Duration::from_millis(500),
        decode: Duration::from_secs(2),
        resumed: false,
    };
    m.answered(&answer);
    m.answered(&Answered {
        resumed: true,
        finish: FinishReason::Deadline,
        ..answer
    });
    let text = render(&m);
    assert!(
        text.contains("ferry_requests_total{outcome=\"answered\"} 1\n"),
        "{text}"
    );
    assert!(text.contains("ferry_requests_total{outcome=\"deadline\"} 1\n"));
    assert!(text.contains("ferry_queue_wait_seconds_count 2\n"));
    assert!(text.contains("ferry_queue_wait_seconds_bucket{le=\"0.05\"} 2\n"));
    // A resumed generation's prefill is a restore: not a time to first token.
    assert!(text.contains("ferry_time_to_first_token_seconds_count 1\n"));
    assert!(text.contains("ferry_time_to_first_token_seconds_sum 0.5\n"));
    // OpenMetrics writes a float sum with its decimal point (the hand-written format wrote `100`).
    assert!(text.contains("ferry_prefill_tokens_per_second_sum 100.0\n"));
    assert!(text.contains("ferry_decode_tokens_per_second_sum 20.0\n"));
    assert!(text.contains("ferry_generated_tokens_total 40\n"));
}

#[test]
fn lag_gauges_are_replaced_wholesale_and_labelled_by_partition() {
    let m = Metrics::new();
    m.set_consumer_lag([(("t".to_string(), 0), 5), (("t".to_string(), 1), 0)]);
    m.set_commit_lag([(("t".to_string(), 1), 3)]);
    let text = render(&m);
    assert!(
        text.contains("ferry_consumer_lag_messages{topic=\"t\",partition=\"0\"} 5\n"),
        "{text}"
    );
    assert!(text.contains("ferry_commit_lag_messages{topic=\"t\",partition=\"1\"} 3\n"));
    m.set_consumer_lag([]);
    assert!(!render(&m).contains("ferry_consumer_lag_messages{"));
}

#[test]
fn snapshot_counters_are_the_writers_own() {
    use std::sync::atomic::Ordering::Relaxed;
    let m = Metrics::new();
    assert!(render(&m).contains("ferry_snapshot_bytes_total 0\n"));
    let stats = Arc::new(SnapshotStats::default());
    m.attach_snapshot_stats(stats.clone());
    stats.bytes.fetch_add(4096, Relaxed);
    stats.written.fetch_add(2, Relaxed);
    stats.failed.fetch_add(1, Relaxed);
    stats.write_micros.fetch_add(1_500_000, Relaxed);
    let text = render(&m);
    assert!(text.contains("ferry_snapshot_bytes_total 4096\n"), "{text}");
    assert!(text.contains("ferry_snapshot_write_seconds_sum 1.5\n"));
    assert!(text.contains("ferry_snapshot_write_seconds_count 3\n"));
    assert!(text.contains("ferry_snapshot_write_failures_total 1\n"));
    assert!(text.contains("ferry_snapshot_store_errors_total{op=\"put\",kind=\"timeout\"} 0\n"));
    stats.store_faults.record(
        StoreOp::Put,
        &crate::snapshot::store::StoreError::Timeout {
            op: "put",
            after: Duration::from_secs(2),
        },
    );
    let text = render(&m);
    assert!(
        text.contains("ferry_snapshot_store_errors_total{op=\"put\",kind=\"timeout\"} 1\n"),
        "{text}"
    );
    assert!(text.contains("ferry_snapshot_store_errors_total{op=\"get\",kind=\"error\"} 0\n"));
}

#[test]
fn in_flight_follows_the_guards() {
    let m = Metrics::new();
    let a = m.request_started();
    let b = m.request_started();
    drop(a);
    assert!(render(&m).contains("ferry_requests_in_flight 1\n"));
    drop(b);
    assert!(render(&m).contains("ferry_requests_in_flight 0\n"));
}
